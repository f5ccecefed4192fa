"""model_api_client, the public face: the (text, stats) and str|dict stream shapes scripts use,
the module-level functions, Ctrl-C, and the standalone fake server. Real HTTP on 127.0.0.1."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import config
import model_api_client
from errors import ModelServerError
from fake_ollama_server import FakeOllamaServer
from fake_openai_server import FakeOpenAIServer
from fake_pc_server import FakePCServer
from fake_server_base import DEFAULT_ANSWER, free_port, split_pieces
from generation import Generation, GenerationStats
from model_api_client import PROTOCOLS, RETRY_STATUSES, STATS_KEYS, ModelAPIClient
from model_clients import drain, make_client, timed

REPO = Path(__file__).resolve().parents[1]
PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")


@pytest.fixture(autouse=True)
def fresh_default_client():
    """No default client left from another test (the public reset)."""
    model_api_client.clear_detection_cache()
    yield
    model_api_client.clear_detection_cache()


def test_public_names_are_kept():
    assert PROTOCOLS == ("pc", "ollama", "openai")
    assert RETRY_STATUSES == frozenset({429, 502, 503, 504})
    assert STATS_KEYS[:9] == ("generation_time", "input_tokens", "generated_tokens", "total_tokens",
                              "tokens_per_second", "wall_time", "protocol", "model", "finish_reason")
    assert "server" in STATS_KEYS
    for name in ("ModelAPIClient", "HealthReport", "get_default_client", "send_prompt", "stream_prompt",
                 "check_server_health", "clear_detection_cache"):
        assert hasattr(model_api_client, name)


# --- success per protocol, stats normalised ---


def test_pc_generate_sends_guide_payload_and_normalises_stats():
    with FakePCServer() as srv:
        client = make_client(srv.base_url)
        text, stats = client.generate("매출을 요약해줘")
        text2, _ = client.generate("요약", system_prompt="너는 분석가야", max_new_tokens=64, temperature=0.2)

    assert text == DEFAULT_ANSWER and text2 == DEFAULT_ANSWER
    assert set(stats) == set(STATS_KEYS)
    words = len(DEFAULT_ANSWER.split())
    assert stats["generation_time"] == 2.5
    assert stats["generated_tokens"] == words
    assert stats["total_tokens"] == stats["input_tokens"] + words
    assert stats["tokens_per_second"] == pytest.approx(words / 2.5)
    assert stats["protocol"] == "pc" and stats["model"] == "phi4-quantized"
    assert stats["server"] == srv.base_url
    assert stats["finish_reason"] is None  # the PC server does not say; not invented
    assert 0 < stats["wall_time"] < 2
    posts = [r.json for r in srv.requests if r.method == "POST"]
    # system_prompt None: the key is left out (the server answers 422 to null).
    assert posts[0] == {"prompt": "매출을 요약해줘", "max_new_tokens": 512, "temperature": 0.7}
    assert posts[1] == {"prompt": "요약", "system_prompt": "너는 분석가야", "max_new_tokens": 64, "temperature": 0.2}


def test_pc_stream_yields_the_whole_answer_once_then_stats():
    with FakePCServer() as srv:
        client = make_client(srv.base_url)
        assert client.supports_streaming() is False
        items = list(client.stream("질문"))
    assert items[0] == DEFAULT_ANSWER
    assert isinstance(items[1], dict) and items[1]["protocol"] == "pc"
    assert len(items) == 2


def test_ollama_generate_and_stream_convert_nanoseconds():
    with FakeOllamaServer() as srv:
        client = make_client(srv.base_url, MAX_NEW_TOKENS=100, TEMPERATURE=0.3)
        text, stats = client.generate("질문", system_prompt="시스템")
        pieces, stream_stats, error = drain(client.stream("질문"))

    assert error is None
    assert text == DEFAULT_ANSWER and "".join(pieces) == DEFAULT_ANSWER
    assert len(pieces) == len(split_pieces(DEFAULT_ANSWER)) > 1
    n = len(split_pieces(DEFAULT_ANSWER))
    for s in (stats, stream_stats):
        assert set(s) == set(STATS_KEYS)
        assert s["generated_tokens"] == n
        assert s["generation_time"] == pytest.approx(0.1 + n * 0.02)  # prompt eval + eval, ns -> s
        assert s["tokens_per_second"] == pytest.approx(50.0)
        assert s["total_tokens"] == s["input_tokens"] + n
        assert s["protocol"] == "ollama" and s["model"] == "phi4" and s["finish_reason"] == "stop"
        assert s["server"] == srv.base_url
    chat = [r.json for r in srv.requests if r.method == "POST"]
    assert chat[0]["options"] == {"num_predict": 100, "temperature": 0.3, "num_ctx": 16384}
    assert chat[0]["messages"][0] == {"role": "system", "content": "시스템"}
    assert chat[0]["stream"] is False and chat[1]["stream"] is True


def test_openai_llamacpp_generate_and_stream_convert_milliseconds():
    with FakeOpenAIServer(owned_by="llamacpp") as srv:
        client = make_client(srv.base_url)
        text, stats = client.generate("질문")
        pieces, stream_stats, error = drain(client.stream("질문", max_new_tokens=5))

    assert error is None
    assert text == DEFAULT_ANSWER
    assert "".join(pieces) == "".join(split_pieces(DEFAULT_ANSWER)[:5])
    n = len(split_pieces(DEFAULT_ANSWER))
    assert stats["generation_time"] == pytest.approx((120.5 + 25.0 * n) / 1000, abs=0.001)  # whole milliseconds
    assert stats["tokens_per_second"] == pytest.approx(40.0)
    assert stats["generated_tokens"] == n and stats["finish_reason"] == "stop"
    assert stream_stats["generated_tokens"] == 5 and stream_stats["finish_reason"] == "length"
    assert stream_stats["generation_time"] == pytest.approx((120.5 + 25.0 * 5) / 1000, abs=0.001)
    assert stats["measured"] == [] and stream_stats["measured"] == []  # the server reported everything
    body = [r.json for r in srv.requests if r.method == "POST"][1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 5 and body["model"] == "phi4"


def test_openai_without_timings_or_usage_the_client_measures_and_says_so():
    # vLLM reports no timings; with usage_in_stream=False it is like llama-cpp-python, whose
    # stream has no usage either.
    with FakeOpenAIServer(owned_by="vllm", usage_in_stream=False) as srv:
        client = make_client(srv.base_url)
        _, stats = client.generate("질문")
        pieces, stream_stats, error = drain(client.stream("질문"))
    assert error is None and "".join(pieces) == DEFAULT_ANSWER
    assert stats["generation_time"] is None  # the server's own time is never made up
    assert stats["generated_tokens"] == len(split_pieces(DEFAULT_ANSWER))  # from usage
    assert stats["tokens_per_second"] > 0 and stats["measured"] == ["tokens_per_second"]
    # No usage chunk: the streamed pieces are counted, and the stats say so.
    assert stream_stats["generated_tokens"] == len(pieces) and stream_stats["input_tokens"] is None
    assert stream_stats["tokens_per_second"] > 0 and stream_stats["generation_time"] is None
    assert stream_stats["measured"] == ["generated_tokens", "tokens_per_second"]
    assert stream_stats["wall_time"] > 0 and stream_stats["finish_reason"] == "stop"


def test_typed_results_are_one_attribute_away():
    with FakeOllamaServer() as srv:
        client = make_client(srv.base_url)
        generation = client.server.stream("질문")
        assert isinstance(generation, Generation) and isinstance(generation.stats, GenerationStats)
        assert "".join(generation) == DEFAULT_ANSWER == generation.text
    assert client.base_url == srv.base_url and client.server_kind == "Ollama 0.5.1"


def test_api_key_is_sent_as_bearer_and_never_logged(caplog):
    caplog.set_level(logging.DEBUG)  # every logger, urllib3 included
    secret = "sk-test-3f9a0c1d"
    with FakeOpenAIServer(api_key=secret) as srv:
        client = make_client(srv.base_url, API_KEY=secret)
        text, _ = client.generate("질문")
        drain(client.stream("질문"))
        wrong = make_client(srv.base_url, API_KEY="sk-wrong-key-77")
        with pytest.raises(ModelServerError) as info:
            wrong.generate("질문")
    assert text == DEFAULT_ANSWER
    posts = [r for r in srv.requests if r.method == "POST"]
    assert posts[0].headers["Authorization"] == f"Bearer {secret}"
    assert info.value.status == 401 and "API_KEY" in str(info.value) and "sk-wrong" not in str(info.value)
    assert caplog.records  # something was logged
    assert secret not in caplog.text and "sk-wrong-key-77" not in caplog.text


# --- the module-level functions on the default client ---


def _use_environment(monkeypatch, port: int) -> None:
    for name in PROXY_VARS + ("API_BASE_URL", "API_PROTOCOL", "ENV_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PC_IP", "127.0.0.1")
    monkeypatch.setenv("API_PORT", str(port))
    monkeypatch.setenv("API_HEALTH_TIMEOUT", "1")


def test_check_server_health_function(monkeypatch):
    with FakePCServer() as srv:
        _use_environment(monkeypatch, srv.port)
        assert model_api_client.check_server_health() is True
        assert model_api_client.send_prompt("질문")[0] == DEFAULT_ANSWER
        pieces, stats, error = drain(model_api_client.stream_prompt("질문"))
        assert error is None and pieces == [DEFAULT_ANSWER] and stats["protocol"] == "pc"
        srv.model_loaded = False
        assert model_api_client.check_server_health() is False


def test_clear_detection_cache_resets_the_default_client(monkeypatch):
    with FakePCServer() as first, FakeOllamaServer() as second:
        _use_environment(monkeypatch, first.port)
        client = model_api_client.get_default_client()
        assert client is model_api_client.get_default_client()
        assert client.detect_protocol() == "pc"
        monkeypatch.setenv("API_PORT", str(second.port))  # the server was replaced
        model_api_client.clear_detection_cache()
        config.get_settings(reload=True)
        fresh = model_api_client.get_default_client()
        assert fresh is not client
        assert fresh.detect_protocol() == "ollama"


def test_check_server_health_false_quickly_when_down(monkeypatch):
    _use_environment(monkeypatch, free_port())
    result, elapsed = timed(model_api_client.check_server_health)
    assert result is False and elapsed < 1.0


def test_check_server_health_false_when_not_configured(monkeypatch, caplog):
    for name in ("PC_IP", "API_BASE_URL", "ENV_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert model_api_client.check_server_health() is False
    assert "PC_IP" in caplog.text


def _health_command(tmp_path: Path, port: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS and not k.startswith(("API_", "PC_", "MODEL_"))}
    env.update(PC_IP="127.0.0.1", API_PORT=str(port), API_HEALTH_TIMEOUT="2", PYTHONPATH=str(REPO),
               ENV_FILE=os.devnull)  # no .env beside the scripts
    code = "from model_api_client import check_server_health; print(check_server_health())"
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)


def test_health_command_from_the_plan(tmp_path):
    with FakePCServer() as ready, FakePCServer(model_loaded=False) as loading:
        results = [_health_command(tmp_path, ready.port), _health_command(tmp_path, loading.port)]
    results.append(_health_command(tmp_path, free_port()))
    assert [r.stdout.strip() for r in results] == ["True", "False", "False"], [r.stderr for r in results]
    assert "not loaded" in results[1].stderr
    assert "Cannot connect" in results[2].stderr


# --- Ctrl-C and closing a stream ---


def test_closing_a_stream_disconnects_from_the_server():
    answer = " ".join(f"w{i}" for i in range(40))
    with FakeOpenAIServer(answer=answer, piece_delay=0.05) as srv:
        stream = make_client(srv.base_url).stream("질문")
        assert next(stream) == "w0 "
        stream.close()
        assert srv.wait_for_disconnect(timeout=3)
        assert srv.pieces_sent < 40


def test_keyboard_interrupt_inside_requests_propagates_and_closes_the_stream():
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with FakeOllamaServer(answer="first second third", piece_delay=0.5) as srv:
            stream = make_client(srv.base_url).stream("질문")
            assert next(stream) == "first "
            signal.setitimer(signal.ITIMER_REAL, 0.2)  # fires while requests waits for the next piece
            started = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                next(stream)
            assert time.monotonic() - started < 1.5
            stream.close()
            assert srv.wait_for_disconnect(timeout=4)

            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with FakePCServer(delay=2) as slow:
                with pytest.raises(KeyboardInterrupt):
                    make_client(slow.base_url, API_PROTOCOL="pc").generate("질문")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_client_is_a_context_manager_and_close_is_idempotent():
    with FakePCServer() as srv:
        with make_client(srv.base_url) as client:
            assert client.generate("질문")[0] == DEFAULT_ANSWER
        client.close()
        assert client.generate("질문")[0] == DEFAULT_ANSWER  # a closed client reconnects on use
        client.close()
    assert isinstance(client, ModelAPIClient)


# --- the fake servers as a subprocess (for the end-to-end tests) ---


def test_fake_server_runs_standalone_until_interrupted():
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "run_fake_server.py"), "--protocol", "ollama", "--port", "0",
         "--answer", "안녕 세계", "--events"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        text, stats = make_client(url).generate("질문")
        assert text == "안녕 세계" and stats["protocol"] == "ollama"
        assert '"path": "/api/chat"' in "".join(proc.stdout.readline() for _ in range(4))
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
