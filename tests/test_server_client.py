"""server_client.ServerClient against real HTTP servers on 127.0.0.1: detection (GETs only, once per
client, thread-safe), typed Generations, bad answers, model availability, health, many threads."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from errors import (
    BadResponseError,
    InvalidPromptError,
    ModelNotLoadedError,
    ModelServerError,
)
from fake_ollama_server import FakeOllamaServer
from fake_openai_server import FakeOpenAIServer
from fake_pc_server import FakePCServer
from fake_server_base import DEFAULT_ANSWER, free_port, split_pieces
from generation import Generation
from model_clients import drain, drain_generation, make_client, make_server, timed

HANGUL = "가나다라마바사 한국어 답변입니다. 끝."


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
def test_auto_detection_uses_only_gets_once_per_client(factory, expected, kind, caplog):
    caplog.set_level(logging.INFO, logger="server_client")
    with factory() as srv:
        client = make_server(srv.base_url)
        assert client.protocol is None
        assert client.detect() == expected
        probes = len(srv.requests)
        assert client.detect() == expected and client.protocol == expected
        assert client.server_kind == kind
        assert len(srv.requests) == probes  # kept on the client: no new probes
        other = make_server(srv.base_url)  # state lives on the instance, not in the module
        assert other.protocol is None
    assert {r.method for r in srv.requests} == {"GET"}
    assert f"Detected the {expected} protocol" in caplog.text


def test_detection_runs_once_when_many_threads_start_at_once():
    with FakeOllamaServer(delay=0.05) as srv:
        client = make_server(srv.base_url)
        answers: list[str] = []
        barrier = threading.Barrier(6)

        def work() -> None:
            barrier.wait()
            answers.append(client.generate("질문").text)

        threads = [threading.Thread(target=work) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        client.close()
    assert answers == [DEFAULT_ANSWER] * 6
    assert srv.count("GET", "/api/version") == 1 and srv.count("GET", "/api/tags") == 1
    assert srv.generations == 6 and srv.peak_generations >= 2  # generations ran side by side


def test_explicit_protocol_skips_probing():
    with FakeOllamaServer() as srv:
        client = make_server(srv.base_url, API_PROTOCOL="ollama")
        assert client.detect() == "ollama" and client.protocol == "ollama"
        assert srv.requests == []


def test_forget_detects_again():
    with FakePCServer() as srv:
        client = make_server(srv.base_url)
        client.detect()
        client.forget()
        assert client.protocol is None
        assert client.detect() == "pc"
    assert srv.count("GET", "/api/health") == 2


def test_base_url_with_trailing_v1_works():
    with FakeOpenAIServer() as srv:
        client = make_server(srv.base_url + "/v1/")
        text = client.generate("질문").text
    assert client.base_url == srv.base_url
    assert text == DEFAULT_ANSWER
    assert ("POST", "/v1/chat/completions") in [(r.method, r.path) for r in srv.requests]
    assert not any(r.path.startswith("/v1/v1") for r in srv.requests)


# --- typed results ---


def test_generate_returns_a_complete_generation_with_typed_stats():
    with FakeOllamaServer() as srv:
        generation = make_server(srv.base_url).generate("질문")
    assert isinstance(generation, Generation) and generation.done and not generation.is_streamed
    assert generation.text == DEFAULT_ANSWER and list(generation) == [DEFAULT_ANSWER]
    stats = generation.stats
    assert stats.protocol == "ollama" and stats.model == "phi4" and stats.server == srv.base_url
    assert stats.generated_tokens == len(split_pieces(DEFAULT_ANSWER)) and stats.wall_time > 0
    assert stats.as_dict()["server"] == srv.base_url


def test_stats_and_reports_name_the_server_without_its_password():
    with FakePCServer() as srv:
        url = srv.base_url.replace("http://", "http://bob:Hunter2-Sentinel@")
        client = make_server(url)
        generation = client.generate("질문")
        report = client.check_health()
    masked = srv.base_url.replace("http://", "http://bob:***@")
    assert generation.stats.server == masked == report.server and report.ok
    assert srv.requests[-1].headers["Authorization"].startswith("Basic ")  # the URL's credentials are still sent


def test_stream_returns_a_generation_that_yields_pieces_then_has_stats():
    with FakeOpenAIServer() as srv:
        generation = make_server(srv.base_url).stream("질문")
        assert generation.is_streamed and not generation.done
        assert generation.stats.wall_time is None  # not finished yet
        first = next(iter(generation))
        rest = list(generation)  # a second loop continues where the first stopped
    assert [first, *rest] == split_pieces(DEFAULT_ANSWER)
    assert generation.done and generation.text == DEFAULT_ANSWER
    assert generation.stats.finish_reason == "stop" and generation.stats.wall_time > 0
    assert list(generation) == []  # consumed


def test_text_reads_the_rest_of_a_stream():
    with FakeOllamaServer() as srv:
        generation = make_server(srv.base_url).stream("질문")
        assert generation.text == DEFAULT_ANSWER and generation.done


def test_closing_a_generation_disconnects_and_keeps_what_arrived():
    answer = " ".join(f"w{i}" for i in range(40))
    with FakeOpenAIServer(answer=answer, piece_delay=0.05) as srv:
        with make_server(srv.base_url).stream("질문") as generation:
            assert next(iter(generation)) == "w0 "
        assert srv.wait_for_disconnect(timeout=3)
        assert srv.pieces_sent < 40
    assert generation.partial_text == "w0 " and not generation.done
    assert generation.text == "w0 "  # closed: nothing more is read
    generation.close()  # idempotent


# --- bad answers ---


def test_html_502_page_is_reported_with_status_and_excerpt():
    with FakePCServer(html_error=502) as srv:
        client = make_server(srv.base_url, API_PROTOCOL="pc", API_MAX_ATTEMPTS=1)
        with pytest.raises(ModelServerError) as info:
            client.generate("질문")
    assert info.value.status == 502 and info.value.url == srv.base_url + "/api/generate"
    assert "HTML page titled '502 Bad Gateway'" in str(info.value)
    assert "nginx" in str(info.value)  # the excerpt


def test_html_page_with_200_is_a_bad_response():
    page = "<!DOCTYPE html><html><head><title>Router login</title></head><body>ipTIME</body></html>"
    with FakePCServer(fail_first=1, fail_status=200, fail_body=page, fail_content_type="text/html") as srv:
        client = make_server(srv.base_url, API_PROTOCOL="pc")
        with pytest.raises(BadResponseError, match="HTML page titled 'Router login'"):
            client.generate("질문")


@pytest.mark.parametrize("factory", [FakePCServer, FakeOllamaServer, FakeOpenAIServer], ids=["pc", "ollama", "openai"])
def test_malformed_json_is_a_bad_response_with_excerpt(factory):
    with factory(malformed_json=True) as srv:
        client = make_server(srv.base_url, API_PROTOCOL=factory.protocol)
        with pytest.raises(BadResponseError) as info:
            client.generate("질문")
    assert "not valid JSON" in str(info.value)
    assert '{"response": "분석"' in str(info.value)  # excerpt, decoded as UTF-8


def test_error_on_http_200_is_a_server_error():
    with FakeOpenAIServer(fail_first=1, fail_status=200, fail_body={"error": "Model unloaded mid-request"}) as srv:
        with pytest.raises(ModelServerError, match="Model unloaded mid-request"):
            make_server(srv.base_url).generate("질문")


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
    assert error.stats is not None and error.stats.protocol == factory.protocol
    assert stats is None


@pytest.mark.parametrize(
    "factory, detail",
    [(FakeOllamaServer, "unexpected EOF"), (FakeOpenAIServer, "slot crashed")],
    ids=["ollama", "openai"],
)
def test_error_event_mid_stream_is_a_server_error_with_partial_text(factory, detail):
    with factory(stream_error_after=2) as srv:
        pieces, error = drain_generation(make_server(srv.base_url).stream("질문"))
    assert isinstance(error, ModelServerError)
    assert detail in str(error) and detail in error.detail
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


def test_close_delimited_stream_pieces_arrive_promptly_and_intact():
    answer = "첫째 둘째 셋째"
    with FakeOpenAIServer(answer=answer, piece_delay=0.4, close_delimited=True, byte_chunks=True) as srv:
        client = make_server(srv.base_url)
        client.detect()
        started = time.monotonic()
        generation = client.stream("질문")
        first = next(iter(generation))
        first_after = time.monotonic() - started
        pieces, error = drain_generation(generation)
    assert first == "첫째 " and first_after < 0.3  # not held back until the body ends (0.8 s)
    assert error is None and first + "".join(pieces) == answer


def test_stream_request_answered_with_plain_json_still_yields_the_answer():
    with FakeOpenAIServer(ignores_stream=True) as srv:
        pieces, stats, error = drain(make_client(srv.base_url).stream("질문"))
    assert error is None and pieces == [DEFAULT_ANSWER]
    assert stats["generated_tokens"] == len(split_pieces(DEFAULT_ANSWER))


# --- requests refused before sending ---


def test_pc_temperature_zero_and_empty_prompts_are_rejected_before_sending():
    with FakePCServer() as srv:
        with pytest.raises(InvalidPromptError, match="TEMPERATURE must be > 0 for the PC server"):
            make_server(srv.base_url, API_PROTOCOL="pc").generate("질문", temperature=0)
        with pytest.raises(InvalidPromptError, match="empty"):
            make_server(srv.base_url).generate("   ")
        assert srv.requests == []


# --- model availability ---


def test_pc_model_not_loaded_health_false_and_failed_lazy_load_is_model_not_loaded():
    with FakePCServer(model_loaded=False, load_fails=True) as srv:
        client = make_server(srv.base_url)
        report = client.check_health()
        error, _ = timed(client.generate, "질문")
        generations = srv.generations
    assert report.ok is False and report.reachable is True and report.model_ready is False
    assert report.server == srv.base_url
    assert "not loaded" in report.detail and "finish loading" in report.fix
    assert isinstance(error, ModelNotLoadedError) and error.code == "MODEL_NOT_LOADED"
    assert "모델을 로드할 수 없습니다" in str(error)
    assert generations == 1  # a failed load is not retried, although it is a 503


def test_pc_generate_posts_even_when_health_says_not_loaded():
    with FakePCServer(model_loaded=False) as srv:  # the server loads lazily on generate
        client = make_server(srv.base_url)
        assert client.check_health().ok is False
        text = client.generate("질문").text
        assert client.check_health().ok is True
    assert text == DEFAULT_ANSWER


def test_ollama_model_not_pulled_names_the_pull_command_and_the_models_there():
    with FakeOllamaServer(models=["llama3.2:latest", "qwen2.5:7b"]) as srv:
        client = make_server(srv.base_url)
        with pytest.raises(ModelNotLoadedError) as info:
            client.generate("질문")
        report = client.check_health()
        listed = client.list_models()
    message = str(info.value)
    assert "ollama pull phi4" in message and "llama3.2:latest" in message and "qwen2.5:7b" in message
    assert info.value.available_models == ["llama3.2:latest", "qwen2.5:7b"] == listed
    assert srv.count("POST") == 0  # checked with a GET before posting
    assert report.ok is False and report.available_models == ["llama3.2:latest", "qwen2.5:7b"]
    assert "ollama pull phi4" in report.fix and report.fix.startswith("Run `ollama pull phi4` on the PC")


def test_ollama_404_model_not_found_from_chat_is_model_not_loaded():
    body = {"error": "model 'phi4' not found"}
    with FakeOllamaServer(fail_first=1, fail_status=404, fail_body=body) as srv:
        with pytest.raises(ModelNotLoadedError, match="ollama pull phi4"):
            make_server(srv.base_url).generate("질문")
        assert srv.generations == 1


def test_openai_model_missing_from_models_lists_what_is_there():
    with FakeOpenAIServer(owned_by="vllm", models=["qwen2.5-7b-instruct", "mistral-7b"]) as srv:
        with pytest.raises(ModelNotLoadedError) as info:
            make_server(srv.base_url).generate("질문")
    assert "'phi4'" in str(info.value)
    assert "qwen2.5-7b-instruct, mistral-7b" in str(info.value)
    assert srv.count("POST") == 0


def test_llamacpp_single_model_under_another_name_is_used():
    with FakeOpenAIServer(owned_by="llamacpp", models=["models/phi-4-Q4_K_M.gguf"]) as srv:
        client = make_server(srv.base_url)
        generation = client.generate("질문")
    assert generation.text == DEFAULT_ANSWER
    assert generation.stats.model == "models/phi-4-Q4_K_M.gguf" == client.model
    assert [r.json["model"] for r in srv.requests if r.method == "POST"] == ["models/phi-4-Q4_K_M.gguf"]


def test_llamacpp_still_loading_is_not_ready():
    with FakeOpenAIServer(loading=True) as srv:
        client = make_server(srv.base_url, API_MAX_ATTEMPTS=1)
        report = client.check_health()
        with pytest.raises(ModelNotLoadedError, match="still loading"):
            client.generate("질문")
    assert report.ok is False and report.reachable is True and "Loading model" in report.detail


@pytest.mark.parametrize(
    "factory, slots",
    [(lambda: FakePCServer(), 1), (lambda: FakeOpenAIServer(owned_by="llamacpp", slots=4), 4),
     (lambda: FakeOpenAIServer(owned_by="vllm"), None), (lambda: FakeOllamaServer(), None)],
    ids=["pc", "llamacpp", "vllm", "ollama"],
)
def test_slots_says_how_many_generations_a_server_runs_at_once(factory, slots):
    with factory() as srv:
        assert make_server(srv.base_url).slots() == slots
    assert srv.count("POST") == 0


# --- health ---


def test_check_health_reports_a_busy_pc_server_without_hanging():
    with FakePCServer(delay=3) as srv:  # serial: health waits while a generation runs
        client = make_server(srv.base_url, API_HEALTH_TIMEOUT=0.5)  # auto: detection's probe is reused
        worker = threading.Thread(target=timed, args=(make_server(srv.base_url, API_PROTOCOL="pc").generate, "질문"))
        worker.start()
        deadline = time.monotonic() + 5
        while not srv.in_progress and time.monotonic() < deadline:  # the generation holds the server
            time.sleep(0.01)
        report, elapsed = timed(client.check_health)
    assert report.ok is False and report.reachable is True
    assert "busy with a generation" in report.detail and report.protocol == "pc"
    assert 0.45 <= elapsed < 1.4  # one health timeout, not one per probe


def test_check_health_down_and_wrong_protocol():
    report, elapsed = timed(make_server(f"http://127.0.0.1:{free_port()}", API_MAX_ATTEMPTS=3).check_health)
    assert report.ok is False and report.reachable is False
    assert "firewall" in report.fix
    assert elapsed < 0.5  # one attempt, no backoff
    with FakeOllamaServer() as srv:
        report = make_server(srv.base_url, API_PROTOCOL="pc").check_health()
    assert report.ok is False and report.reachable is True and "wrong protocol" in report.detail


def test_unknown_server_is_reported_not_guessed():
    with FakePCServer() as srv:
        srv.route = lambda h, *a: h.send_text(404, "<html>router login</html>", "text/html")
        with pytest.raises(BadResponseError, match="not like a known model server") as info:
            make_server(srv.base_url).detect()
    assert "API_PROTOCOL" in info.value.hint
    assert "/api/health, /api/version, /health, /v1/models" in str(info.value)
