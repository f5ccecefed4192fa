"""model_api_client against real HTTP servers on 127.0.0.1 (tests/model_servers.py); no mocks."""

from __future__ import annotations

import email.utils
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

import config
import model_api_client
from errors import (
    BadResponseError,
    InvalidPromptError,
    ModelConnectionError,
    ModelNotLoadedError,
    ModelServerError,
    ModelTimeoutError,
)
from model_api_client import STATS_KEYS, ModelAPIClient
from tests.model_servers import (
    DEFAULT_ANSWER,
    BlackholeServer,
    FakeOllamaServer,
    FakeOpenAIServer,
    FakePCServer,
    free_port,
    split_pieces,
)

REPO = Path(__file__).resolve().parents[1]
HANGUL = "가나다라마바사 한국어 답변입니다. 끝."
PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No ./.env, no cached detection, no default client or settings left from another test."""
    monkeypatch.chdir(tmp_path)
    model_api_client.clear_detection_cache()
    monkeypatch.setattr(model_api_client, "_default_client", None)
    monkeypatch.setattr(config, "_cached", None)
    yield
    model_api_client.clear_detection_cache()


def make_client(url: str, **overrides) -> ModelAPIClient:
    values = {
        "API_BASE_URL": url,
        "API_CONNECT_TIMEOUT": 1,
        "API_HEALTH_TIMEOUT": 1,
        "API_TIMEOUT": 5,
        "API_RETRY_AFTER_MAX": 5,
    }
    values.update(overrides)
    return ModelAPIClient(config.load_settings(values, environ={}))


def timed(fn, *args, **kwargs):
    started = time.monotonic()
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - returned for the test to assert on
        return exc, time.monotonic() - started
    return result, time.monotonic() - started


def drain(iterator):
    """(pieces, stats, error) from a stream()."""
    pieces, stats = [], None
    try:
        for item in iterator:
            if isinstance(item, dict):
                stats = item
            else:
                pieces.append(item)
    except Exception as exc:  # noqa: BLE001
        return pieces, stats, exc
    return pieces, stats, None


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
    assert stats["finish_reason"] is None  # the PC server does not say; not invented
    assert 0 < stats["wall_time"] < 2
    posts = [r.json for r in srv.requests if r.method == "POST"]
    # system_prompt None: the key is left out (the server answers 422 to null, see below).
    assert posts[0] == {"prompt": "매출을 요약해줘", "max_new_tokens": 512, "temperature": 0.7}
    assert posts[1] == {"prompt": "요약", "system_prompt": "너는 분석가야", "max_new_tokens": 64, "temperature": 0.2}


def test_fake_pc_server_rejects_null_system_prompt_like_the_real_one():
    with FakePCServer() as srv:
        resp = requests.post(srv.base_url + "/api/generate", json={"prompt": "x", "system_prompt": None}, timeout=5)
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["body", "system_prompt"]


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
    assert stats["generation_time"] == pytest.approx((120.5 + 25.0 * n) / 1000)
    assert stats["tokens_per_second"] == pytest.approx(40.0)
    assert stats["generated_tokens"] == n and stats["finish_reason"] == "stop"
    assert stream_stats["generated_tokens"] == 5 and stream_stats["finish_reason"] == "length"
    assert stream_stats["generation_time"] == pytest.approx((120.5 + 25.0 * 5) / 1000)
    body = [r.json for r in srv.requests if r.method == "POST"][1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 5 and body["model"] == "phi4"


def test_openai_without_timings_or_usage_leaves_values_none():
    with FakeOpenAIServer(owned_by="vllm", usage_in_stream=False) as srv:
        client = make_client(srv.base_url)
        _, stats = client.generate("질문")
        pieces, stream_stats, error = drain(client.stream("질문"))
    assert error is None and "".join(pieces) == DEFAULT_ANSWER
    assert stats["generation_time"] is None and stats["tokens_per_second"] is None
    assert stats["generated_tokens"] == len(split_pieces(DEFAULT_ANSWER))  # from usage
    # No usage chunk: token counts stay unknown instead of being guessed from chunks.
    assert stream_stats["generated_tokens"] is None and stream_stats["input_tokens"] is None
    assert stream_stats["wall_time"] > 0 and stream_stats["finish_reason"] == "stop"


# --- detection ---


@pytest.mark.parametrize(
    "factory, expected, kind",
    [
        (lambda: FakePCServer(), "pc", "PC server"),
        (lambda: FakeOllamaServer(), "ollama", "Ollama 0.5.1"),
        (lambda: FakeOpenAIServer(owned_by="llamacpp"), "openai", "llama.cpp"),
        (lambda: FakeOpenAIServer(owned_by="vllm"), "openai", "vLLM"),
        (lambda: FakeOpenAIServer(owned_by="organization_owner"), "openai", "LM Studio"),
    ],
    ids=["pc", "ollama", "llamacpp", "vllm", "lmstudio"],
)
def test_auto_detection_uses_only_gets_once_per_process(factory, expected, kind, caplog):
    caplog.set_level(logging.INFO, logger="model_api_client")
    with factory() as srv:
        assert make_client(srv.base_url).detect_protocol() == expected
        probes = len(srv.requests)
        second = make_client(srv.base_url)
        assert second.detect_protocol() == expected
        assert second.server_kind == kind
        assert len(srv.requests) == probes  # cached for the process: no new probes
    assert {r.method for r in srv.requests} == {"GET"}
    assert f"Detected the {expected} protocol" in caplog.text


def test_explicit_protocol_skips_probing():
    with FakeOllamaServer() as srv:
        client = make_client(srv.base_url, API_PROTOCOL="ollama")
        assert client.detect_protocol() == "ollama"
        assert srv.requests == []


def test_base_url_with_trailing_v1_works():
    with FakeOpenAIServer() as srv:
        client = make_client(srv.base_url + "/v1/")
        text, _ = client.generate("질문")
    assert client.base_url == srv.base_url
    assert text == DEFAULT_ANSWER
    assert ("POST", "/v1/chat/completions") in [(r.method, r.path) for r in srv.requests]
    assert not any(r.path.startswith("/v1/v1") for r in srv.requests)


def test_unknown_server_is_reported_not_guessed():
    with FakePCServer() as srv:
        srv.route = lambda h, *a: h.send_text(404, "<html>router login</html>", "text/html")
        with pytest.raises(BadResponseError, match="not like a known model server") as info:
            make_client(srv.base_url).detect_protocol()
    assert "API_PROTOCOL" in info.value.hint


# --- retries ---


def test_refused_until_the_server_starts_then_succeeds():
    port = free_port()
    with FakePCServer(port=port, start_delay=0.8) as srv:
        client = make_client(srv.base_url, API_PROTOCOL="pc", API_MAX_ATTEMPTS=4)
        (text, _), elapsed = timed(client.generate, "질문")
    assert text == DEFAULT_ANSWER
    assert elapsed >= 0.8
    assert srv.generations == 1  # refused attempts never reached the server


def test_503_then_200_is_retried():
    with FakePCServer(fail_first=1, fail_status=503) as srv:
        client = make_client(srv.base_url, API_PROTOCOL="pc")
        (text, _), elapsed = timed(client.generate, "질문")
    assert text == DEFAULT_ANSWER
    assert srv.generations == 2
    assert elapsed >= 0.37  # first backoff: 0.5 s minus at most 25 % jitter


def test_503_every_time_gives_up_after_the_configured_attempts():
    with FakePCServer(fail_first=100, fail_status=503, fail_body={"detail": "서버가 바쁩니다"}) as srv:
        client = make_client(srv.base_url, API_PROTOCOL="pc", API_MAX_ATTEMPTS=2)
        with pytest.raises(ModelServerError) as info:
            client.generate("질문")
    assert srv.generations == 2
    assert info.value.status == 503
    assert "서버가 바쁩니다" in str(info.value) and "after 2 attempts" in str(info.value)


@pytest.mark.parametrize(
    "retry_after, cap, low, high",
    [
        ("1", 60, 0.95, 1.8),  # seconds, honoured
        ("30", 0.5, 0.45, 1.5),  # capped by API_RETRY_AFTER_MAX
        (email.utils.formatdate(time.time() + 3600, usegmt=True), 0.5, 0.45, 1.5),  # HTTP-date, capped
    ],
    ids=["seconds", "capped", "http-date"],
)
def test_429_retry_after_is_honoured_up_to_the_cap(retry_after, cap, low, high):
    with FakeOpenAIServer(fail_first=1, fail_status=429, retry_after=retry_after) as srv:
        client = make_client(srv.base_url, API_PROTOCOL="openai", API_RETRY_AFTER_MAX=cap)
        (text, _), elapsed = timed(client.generate, "질문")
    assert text == DEFAULT_ANSWER
    assert srv.generations == 2
    assert low <= elapsed <= high


@pytest.mark.parametrize(
    "status, body, error",
    [
        (400, {"detail": "프롬프트가 필요합니다"}, InvalidPromptError),
        (422, {"detail": [{"type": "missing", "loc": ["body", "prompt"], "msg": "Field required"}]}, InvalidPromptError),
        (404, {"detail": "Not Found"}, ModelServerError),
    ],
)
def test_client_errors_are_not_retried(status, body, error):
    with FakePCServer(fail_first=100, fail_status=status, fail_body=body) as srv:
        client = make_client(srv.base_url, API_PROTOCOL="pc")
        with pytest.raises(error) as info:
            client.generate("질문")
    assert srv.generations == 1
    assert info.value.status == status
    assert f"HTTP {status}" in str(info.value)
    if status == 400:
        assert "프롬프트가 필요합니다" in str(info.value)
    if status == 422:
        assert "prompt: Field required" in str(info.value)


def test_read_timeout_is_not_retried_and_fails_near_the_timeout():
    with FakePCServer(delay=4) as srv:
        client = make_client(srv.base_url, API_PROTOCOL="pc", API_TIMEOUT=1)
        error, elapsed = timed(client.generate, "질문")
        assert isinstance(error, ModelTimeoutError)
        assert srv.generations == 1
    assert 0.9 <= elapsed < 2.0
    assert error.code == "TIMEOUT_ERROR"
    assert "API_TIMEOUT=1s" in str(error) and "raise API_TIMEOUT" in str(error)


def test_down_server_fails_within_connect_timeout_times_attempts():
    port = free_port()  # nothing listening: refused at once
    client = make_client(f"http://127.0.0.1:{port}", API_MAX_ATTEMPTS=3, API_CONNECT_TIMEOUT=1)
    error, elapsed = timed(client.generate, "질문")
    assert isinstance(error, ModelConnectionError)
    assert error.code == "CONNECTION_ERROR"
    # two backoffs (0.5 s + 1 s, minus up to 25 % jitter) and three instant refusals
    assert 1.1 <= elapsed < 3 * 1 + 1.5
    message = str(error)
    assert f"http://127.0.0.1:{port}" in message and "3 attempts" in message
    assert "PC_IP" in message and "firewall" in message and "running on the PC" in message


def test_connect_timeout_is_retried_then_reported_within_the_budget():
    with BlackholeServer() as hole:
        client = make_client(hole.base_url, API_PROTOCOL="pc", API_MAX_ATTEMPTS=2, API_CONNECT_TIMEOUT=0.5)
        error, elapsed = timed(client.generate, "질문")
    assert isinstance(error, ModelConnectionError)
    assert "API_CONNECT_TIMEOUT=0.5s" in str(error) and "2 attempts" in str(error)
    assert 0.5 * 2 + 0.37 <= elapsed < 0.5 * 2 + 0.5 + 1.0


# --- bad answers ---


def test_html_502_page_is_reported_with_status_and_excerpt():
    with FakePCServer(html_error=502) as srv:
        client = make_client(srv.base_url, API_PROTOCOL="pc", API_MAX_ATTEMPTS=1)
        with pytest.raises(ModelServerError) as info:
            client.generate("질문")
    assert info.value.status == 502
    assert "HTML page titled '502 Bad Gateway'" in str(info.value)
    assert "nginx" in str(info.value)  # the excerpt


def test_html_page_with_200_is_a_bad_response():
    page = "<!DOCTYPE html><html><head><title>Router login</title></head><body>ipTIME</body></html>"
    with FakePCServer(fail_first=1, fail_status=200, fail_body=page, fail_content_type="text/html") as srv:
        client = make_client(srv.base_url, API_PROTOCOL="pc")
        with pytest.raises(BadResponseError, match="HTML page titled 'Router login'"):
            client.generate("질문")


@pytest.mark.parametrize("factory", [FakePCServer, FakeOllamaServer, FakeOpenAIServer], ids=["pc", "ollama", "openai"])
def test_malformed_json_is_a_bad_response_with_excerpt(factory):
    with factory(malformed_json=True) as srv:
        client = make_client(srv.base_url, API_PROTOCOL=factory.protocol)
        with pytest.raises(BadResponseError) as info:
            client.generate("질문")
    assert "not valid JSON" in str(info.value)
    assert '{"response": "분석"' in str(info.value)  # excerpt, decoded as UTF-8


@pytest.mark.parametrize("close_delimited", [False, True], ids=["chunked", "close-delimited"])
@pytest.mark.parametrize("factory", [FakeOllamaServer, FakeOpenAIServer], ids=["ollama", "openai"])
def test_stream_cut_midway_keeps_the_partial_text(factory, close_delimited):
    with factory(cut_after=3, close_delimited=close_delimited) as srv:
        client = make_client(srv.base_url)
        pieces, stats, error = drain(client.stream("질문"))
    assert isinstance(error, BadResponseError)
    assert "ended early" in str(error)
    assert pieces == split_pieces(DEFAULT_ANSWER)[:3]
    assert error.partial_text == "".join(pieces)
    assert stats is None


@pytest.mark.parametrize(
    "factory, detail",
    [(FakeOllamaServer, "unexpected EOF"), (FakeOpenAIServer, "slot crashed")],
    ids=["ollama", "openai"],
)
def test_error_event_mid_stream_is_a_server_error_with_partial_text(factory, detail):
    with factory(stream_error_after=2) as srv:
        pieces, _, error = drain(make_client(srv.base_url).stream("질문"))
    assert isinstance(error, ModelServerError)
    assert detail in str(error)
    assert error.partial_text == "".join(split_pieces(DEFAULT_ANSWER)[:2]) == "".join(pieces)


def test_fake_server_really_splits_hangul_across_chunks():
    body = b'{"messages":[{"role":"user","content":"x"}],"stream":true}'
    with FakeOpenAIServer(byte_chunks=True, answer=HANGUL) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            raw = b"".join(iter(lambda: sock.recv(65536), b""))  # chunked framing left in place
    first = "가".encode()
    assert first[:1] + b"\r\n1\r\n" + first[1:2] in raw  # one byte per chunk: the character is split


@pytest.mark.parametrize("factory", [FakeOllamaServer, FakeOpenAIServer, FakePCServer], ids=["ollama", "openai", "pc"])
def test_hangul_split_across_chunks_arrives_intact(factory):
    with factory(byte_chunks=True, answer=HANGUL) as srv:
        client = make_client(srv.base_url)
        pieces, stats, error = drain(client.stream("질문"))
        text, _ = client.generate("질문")
    assert error is None and stats is not None
    assert "".join(pieces).strip() == HANGUL == text.strip()
    assert "\ufffd" not in "".join(pieces)


def test_stream_read_timeout_applies_between_pieces_not_to_the_whole_answer():
    answer = "one two three four five six"
    with FakeOpenAIServer(answer=answer, piece_delay=0.3) as srv:
        client = make_client(srv.base_url, API_TIMEOUT=1)
        (result, elapsed) = timed(drain, client.stream("질문"))
    pieces, stats, error = result
    assert error is None and "".join(pieces) == answer
    assert elapsed > 1.0  # longer than the read timeout in total, yet no timeout


def test_close_delimited_stream_pieces_arrive_promptly_and_intact():
    answer = "첫째 둘째 셋째"
    with FakeOpenAIServer(answer=answer, piece_delay=0.4, close_delimited=True, byte_chunks=True) as srv:
        stream = make_client(srv.base_url).stream("질문")
        started = time.monotonic()
        first = next(stream)
        first_after = time.monotonic() - started
        pieces, stats, error = drain(stream)
    assert first == "첫째 " and first_after < 0.3  # not held back until the body ends (0.8 s)
    assert error is None and first + "".join(pieces) == answer


def test_stream_request_answered_with_plain_json_still_yields_the_answer():
    with FakeOpenAIServer(ignores_stream=True) as srv:
        pieces, stats, error = drain(make_client(srv.base_url).stream("질문"))
    assert error is None and pieces == [DEFAULT_ANSWER]
    assert stats["generated_tokens"] == len(split_pieces(DEFAULT_ANSWER))


@pytest.mark.parametrize("close_delimited", [False, True], ids=["chunked", "close-delimited"])
def test_stream_silence_longer_than_the_read_timeout_is_a_timeout_with_partial_text(close_delimited):
    with FakeOllamaServer(answer="first second third", piece_delay=3, close_delimited=close_delimited) as srv:
        client = make_client(srv.base_url, API_TIMEOUT=0.5)
        (pieces, _, error), elapsed = timed(drain, client.stream("질문"))
    assert isinstance(error, ModelTimeoutError)
    assert "between two pieces" in str(error)
    assert error.partial_text == "first " == "".join(pieces)
    assert elapsed < 1.5


# --- model availability ---


def test_pc_model_not_loaded_health_false_and_failed_lazy_load_is_model_not_loaded():
    with FakePCServer(model_loaded=False, load_fails=True) as srv:
        client = make_client(srv.base_url)
        report = client.check_health()
        error, _ = timed(client.generate, "질문")
        generations = srv.generations
    assert report.ok is False and report.reachable is True and report.model_ready is False
    assert "not loaded" in report.detail and "finish loading" in report.fix
    assert isinstance(error, ModelNotLoadedError) and error.code == "MODEL_NOT_LOADED"
    assert "모델을 로드할 수 없습니다" in str(error)
    assert generations == 1  # a failed load is not retried, although it is a 503


def test_pc_generate_posts_even_when_health_says_not_loaded():
    with FakePCServer(model_loaded=False) as srv:  # the server loads lazily on generate
        client = make_client(srv.base_url)
        assert client.check_health().ok is False
        text, _ = client.generate("질문")
        assert client.check_health().ok is True
    assert text == DEFAULT_ANSWER


def test_ollama_model_not_pulled_names_the_pull_command_and_the_models_there():
    with FakeOllamaServer(models=["llama3.2:latest", "qwen2.5:7b"]) as srv:
        client = make_client(srv.base_url)
        with pytest.raises(ModelNotLoadedError) as info:
            client.generate("질문")
        report = client.check_health()
    message = str(info.value)
    assert "ollama pull phi4" in message and "llama3.2:latest" in message and "qwen2.5:7b" in message
    assert srv.count("POST") == 0  # checked with a GET before posting
    assert report.ok is False and report.available_models == ["llama3.2:latest", "qwen2.5:7b"]
    assert "ollama pull phi4" in report.fix


def test_ollama_404_model_not_found_from_chat_is_model_not_loaded():
    body = {"error": "model 'phi4' not found"}
    with FakeOllamaServer(fail_first=1, fail_status=404, fail_body=body) as srv:
        with pytest.raises(ModelNotLoadedError, match="ollama pull phi4"):
            make_client(srv.base_url).generate("질문")
        assert srv.generations == 1


def test_openai_model_missing_from_models_lists_what_is_there():
    with FakeOpenAIServer(owned_by="vllm", models=["qwen2.5-7b-instruct", "mistral-7b"]) as srv:
        with pytest.raises(ModelNotLoadedError) as info:
            make_client(srv.base_url).generate("질문")
    assert "'phi4'" in str(info.value)
    assert "qwen2.5-7b-instruct, mistral-7b" in str(info.value)
    assert srv.count("POST") == 0


def test_llamacpp_single_model_under_another_name_is_used():
    with FakeOpenAIServer(owned_by="llamacpp", models=["models/phi-4-Q4_K_M.gguf"]) as srv:
        text, stats = make_client(srv.base_url).generate("질문")
    assert text == DEFAULT_ANSWER
    assert stats["model"] == "models/phi-4-Q4_K_M.gguf"
    assert [r.json["model"] for r in srv.requests if r.method == "POST"] == ["models/phi-4-Q4_K_M.gguf"]


def test_llamacpp_still_loading_is_not_ready():
    with FakeOpenAIServer(loading=True) as srv:
        client = make_client(srv.base_url, API_MAX_ATTEMPTS=1)
        report = client.check_health()
        with pytest.raises(ModelNotLoadedError, match="still loading"):
            client.generate("질문")
    assert report.ok is False and report.reachable is True and "Loading model" in report.detail


# --- requests before sending, secrets, proxies ---


def test_pc_temperature_zero_is_rejected_before_sending():
    with FakePCServer() as srv:
        with pytest.raises(InvalidPromptError, match="TEMPERATURE must be > 0 for the PC server"):
            make_client(srv.base_url, API_PROTOCOL="pc").generate("질문", temperature=0)
        with pytest.raises(InvalidPromptError, match="empty"):
            make_client(srv.base_url, API_PROTOCOL="pc").generate("   ")
        assert srv.requests == []


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


def test_environment_proxy_does_not_break_lan_calls(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    with FakePCServer() as srv:
        text, _ = make_client(srv.base_url).generate("질문")
        assert text == DEFAULT_ANSWER
        # The override really switches the environment's proxy on (and then it fails):
        with pytest.raises(ModelConnectionError, match="proxy"):
            make_client(srv.base_url, API_PROTOCOL="pc", API_USE_ENV_PROXY="true", API_MAX_ATTEMPTS=1).generate("질문")


# --- health ---


def test_check_health_reports_a_busy_pc_server_without_hanging():
    with FakePCServer(delay=3) as srv:  # serial: health waits while a generation runs
        client = make_client(srv.base_url, API_HEALTH_TIMEOUT=0.5)  # auto: detection's probe is reused
        worker = threading.Thread(target=timed, args=(make_client(srv.base_url, API_PROTOCOL="pc").generate, "질문"))
        worker.start()
        time.sleep(0.2)
        report, elapsed = timed(client.check_health)
    assert report.ok is False and report.reachable is True
    assert "busy with a generation" in report.detail and report.protocol == "pc"
    assert 0.5 <= elapsed < 0.9  # one health timeout, not one per probe


def test_check_health_down_and_wrong_protocol():
    report, elapsed = timed(make_client(f"http://127.0.0.1:{free_port()}", API_MAX_ATTEMPTS=3).check_health)
    assert report.ok is False and report.reachable is False
    assert "firewall" in report.fix
    assert elapsed < 0.5  # one attempt, no backoff
    with FakeOllamaServer() as srv:
        report = make_client(srv.base_url, API_PROTOCOL="pc").check_health()
    assert report.ok is False and report.reachable is True and "wrong protocol" in report.detail


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
        srv.model_loaded = False
        assert model_api_client.check_server_health() is False


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
    env.update(PC_IP="127.0.0.1", API_PORT=str(port), API_HEALTH_TIMEOUT="2", PYTHONPATH=str(REPO))
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


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs SIGALRM")
def test_keyboard_interrupt_inside_requests_propagates_and_closes_the_stream():
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with FakeOllamaServer(answer="first second third", piece_delay=0.8) as srv:
            stream = make_client(srv.base_url).stream("질문")
            assert next(stream) == "first "
            signal.setitimer(signal.ITIMER_REAL, 0.3)  # fires while requests waits for the next piece
            started = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                next(stream)
            assert time.monotonic() - started < 1.5
            stream.close()
            assert srv.wait_for_disconnect(timeout=4)

            signal.setitimer(signal.ITIMER_REAL, 0.3)
            slow = FakePCServer(delay=2)
            with slow:
                with pytest.raises(KeyboardInterrupt):
                    make_client(slow.base_url, API_PROTOCOL="pc").generate("질문")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- the fake servers as a subprocess (for the end-to-end tests) ---


def test_fake_server_runs_standalone_until_interrupted():
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "model_servers.py"), "--protocol", "ollama", "--port", "0",
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
