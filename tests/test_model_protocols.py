"""model_protocols: one class per protocol, each tested without a network (probes are a dict,
replies a small object), plus the one rule of the reshape: no branching on protocol names in the
client modules."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from errors import BadResponseError, InvalidPromptError, ModelNotLoadedError, ModelServerError
from fake_pc_server import FakePCServer
from generation import GenerationStats, StreamProgress
from model_protocols import (
    PROTOCOLS,
    GenerationRequest,
    ModelListing,
    OllamaProtocol,
    OpenAIProtocol,
    PCProtocol,
    Probe,
    Protocol,
    ServerInfo,
    detect_protocol,
)

REPO = Path(__file__).resolve().parents[1]
BASE = "http://pc.lan:8000"
SCHEMA = {"type": "object", "properties": {"sentiment": {"type": "string"}}, "required": ["sentiment"]}


def make(cls: type[Protocol], **info: object) -> Protocol:
    return cls(ServerInfo(base_url=BASE, **info))  # type: ignore[arg-type]


def prober(answers: dict[str, Probe]):
    asked: list[str] = []

    def get(path: str) -> Probe:
        asked.append(path)
        return answers.get(path, Probe(status=404, body={"detail": "Not Found"}))

    get.asked = asked  # type: ignore[attr-defined]
    return get


@dataclass
class FakeReply:
    status: int
    body: str
    url: str = BASE + "/v1/chat/completions"
    reason: str = ""
    attempts: int = 1
    content_type: str = "application/json"

    def text(self) -> str:
        return self.body


# --- the registry and the shape of a protocol ---


def test_registry_has_one_class_per_protocol():
    assert list(PROTOCOLS) == ["pc", "ollama", "openai"]
    for name, cls in PROTOCOLS.items():
        assert issubclass(cls, Protocol) and cls.name == name
        for method in ("detect", "build_request", "parse_answer", "stream_events", "health"):
            assert getattr(cls, method) is not getattr(Protocol, method), f"{name} lacks {method}"


def test_client_modules_do_not_branch_on_protocol_names():
    pattern = re.compile(r"""(==|!=)\s*["'](pc|ollama|openai)["']|protocol\s+in\s+\(""")
    for module in ("model_api_client.py", "server_client.py", "http_transport.py", "generation.py"):
        source = (REPO / module).read_text(encoding="utf-8")
        assert not pattern.search(source), f"{module} branches on a protocol name"


# --- requests ---


def test_pc_request_leaves_out_a_missing_system_prompt_and_cannot_constrain_output():
    pc = make(PCProtocol)
    assert pc.build_request(GenerationRequest("질문"), None, stream=False) == (
        "/api/generate", {"prompt": "질문", "max_new_tokens": 512, "temperature": 0.7})
    _, body = pc.build_request(GenerationRequest("질문", "시스템", 64, 0.2, json_schema=SCHEMA), None, stream=False)
    assert body == {"prompt": "질문", "system_prompt": "시스템", "max_new_tokens": 64, "temperature": 0.2}
    assert PCProtocol.structured_output is False and PCProtocol.streams is False
    with pytest.raises(InvalidPromptError, match="TEMPERATURE must be > 0"):
        pc.check_request(GenerationRequest("질문", temperature=0))


def test_ollama_request_sends_num_ctx_and_a_format_schema():
    ollama = make(OllamaProtocol, context_tokens=8192)
    path, body = ollama.build_request(GenerationRequest("질문", "시스템", 100, 0.3), "phi4:latest", stream=True)
    assert path == "/api/chat" and body["model"] == "phi4:latest" and body["stream"] is True
    assert body["options"] == {"num_predict": 100, "temperature": 0.3, "num_ctx": 8192}
    assert body["messages"] == [{"role": "system", "content": "시스템"}, {"role": "user", "content": "질문"}]
    assert "format" not in body
    _, body = ollama.build_request(GenerationRequest("질문", json_schema=SCHEMA), "phi4", stream=False)
    assert body["format"] == SCHEMA


def test_openai_request_asks_for_usage_when_streaming_and_a_json_schema_response():
    openai = make(OpenAIProtocol)
    _, body = openai.build_request(GenerationRequest("질문"), "phi4", stream=True)
    assert body["stream_options"] == {"include_usage": True} and body["max_tokens"] == 512
    _, body = openai.build_request(GenerationRequest("질문", json_schema=SCHEMA), "phi4", stream=False)
    assert "stream_options" not in body
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}


def test_fake_pc_server_rejects_null_system_prompt_like_the_real_one():
    with FakePCServer() as srv:
        resp = requests.post(srv.base_url + "/api/generate", json={"prompt": "x", "system_prompt": None}, timeout=5)
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["body", "system_prompt"]


# --- answers ---


def test_answers_are_normalised_to_seconds_and_token_counts():
    stats = GenerationStats()
    text = make(OllamaProtocol).parse_answer({"model": "phi4:latest", "message": {"content": "답"}, "done": True,
                                              "done_reason": "length", "prompt_eval_count": 10,
                                              "prompt_eval_duration": 500_000_000, "eval_count": 20,
                                              "eval_duration": 2_000_000_000}, stats)
    assert text == "답" and stats.model == "phi4:latest" and stats.finish_reason == "length"
    assert (stats.generation_time, stats.tokens_per_second, stats.total_tokens) == (2.5, 10.0, 30)

    stats = GenerationStats()
    make(OpenAIProtocol).parse_answer({"choices": [{"message": {"content": None}, "finish_reason": "stop"}],
                                       "usage": {"prompt_tokens": 3}, "timings": {"predicted_n": 7,
                                       "predicted_ms": 700, "prompt_ms": 300, "predicted_per_second": 10}}, stats)
    assert (stats.generated_tokens, stats.generation_time, stats.tokens_per_second) == (7, 1.0, 10)
    assert stats.total_tokens == 10 and stats.input_tokens == 3

    with pytest.raises(BadResponseError, match='without a "response" text'):
        make(PCProtocol).parse_answer({"answer": "x"}, GenerationStats())


def test_stream_events_parse_ndjson_and_sse_and_notice_a_missing_end():
    stats = GenerationStats()
    lines = ['{"message": {"content": "가"}, "done": false}', "", '{"message": {"content": "나"}, "done": false}',
             '{"done": true, "eval_count": 2, "eval_duration": 100000000, "done_reason": "stop"}']
    assert list(make(OllamaProtocol).stream_events(iter(lines), stats, StreamProgress(stats))) == ["가", "나"]
    assert stats.generated_tokens == 2 and stats.tokens_per_second == pytest.approx(20.0)

    stats = GenerationStats()
    lines = [": ping", "event: message", 'data: {"choices": [{"delta": {"content": "a"}}]}', "",
             'data: {"choices": [{"delta": {}, "finish_reason": "length"}]}',
             'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}', "data: [DONE]"]
    assert list(make(OpenAIProtocol).stream_events(iter(lines), stats, StreamProgress(stats))) == ["a"]
    assert stats.finish_reason == "length" and stats.total_tokens == 2

    stats = GenerationStats()
    progress = StreamProgress(stats)
    events = make(OpenAIProtocol).stream_events(iter(['data: {"choices": [{"delta": {"content": "a"}}]}']), stats,
                                                progress)
    progress.add(next(events))
    with pytest.raises(BadResponseError, match="no final data: \\[DONE\\]") as info:
        next(events)
    assert info.value.partial_text == "a" and info.value.stats is stats


# --- errors ---


@pytest.mark.parametrize(
    "cls, info, status, body, error, words",
    [
        (PCProtocol, {}, 503, '{"detail": "모델을 로드할 수 없습니다: CUDA out of memory"}', ModelNotLoadedError,
         "could not load its model"),
        (OpenAIProtocol, {}, 503, '{"error": {"code": 503, "message": "Loading model"}}', ModelNotLoadedError,
         "still loading"),
        (OllamaProtocol, {}, 404, '{"error": "model \'phi4\' not found"}', ModelNotLoadedError, "ollama pull phi4"),
        (OpenAIProtocol, {"kind": "Ollama"}, 404, '{"error": {"message": "model \\"phi4\\" not found"}}',
         ModelNotLoadedError, "ollama pull phi4"),
        (OpenAIProtocol, {"kind": "vLLM"}, 404, '{"error": {"message": "The model `phi4` does not exist."}}',
         ModelNotLoadedError, "load that model on the server"),
        (OpenAIProtocol, {}, 400, '{"error": {"type": "exceed_context_size_error", "message": "too long"}}',
         InvalidPromptError, "too long for the model's context"),
        (OpenAIProtocol, {}, 401, '{"error": {"message": "Invalid API Key"}}', ModelServerError, "API_KEY"),
        (PCProtocol, {}, 404, '{"detail": "Not Found"}', ModelServerError, "has no /v1/chat/completions endpoint"),
        (PCProtocol, {}, 500, "<html><title>Oops</title></html>", ModelServerError, "HTML page titled 'Oops'"),
    ],
    ids=["pc-load-failed", "llamacpp-loading", "ollama-not-pulled", "ollama-v1", "vllm-missing", "context",
         "api-key", "no-endpoint", "html-500"],
)
def test_error_statuses_map_to_errors_with_the_fix(cls, info, status, body, error, words):
    err = make(cls, **info).error_for_status(FakeReply(status, body), "phi4")
    assert type(err) is error and words in str(err)
    assert err.status == status and err.url == BASE + "/v1/chat/completions"


def test_only_the_pc_servers_failed_load_stops_retries():
    assert make(PCProtocol).gives_up(503, "모델을 로드할 수 없습니다: CUDA out of memory")
    assert not make(PCProtocol).gives_up(503, "busy")
    assert not make(OllamaProtocol).gives_up(503, "모델을 로드할 수 없습니다")


def test_503_after_retries_says_how_many_attempts():
    err = make(OllamaProtocol).error_for_status(FakeReply(503, '{"error": "busy"}', attempts=3, reason="Service "
                                                          "Unavailable"), "phi4")
    assert "HTTP 503 Service Unavailable after 3 attempts: busy" in str(err)


# --- detection and models, from probes ---


def test_detection_tries_the_protocols_in_registry_order_with_gets():
    get = prober({"/api/version": Probe(200, {"version": "0.5.1"})})
    assert detect_protocol(get, BASE).kind == "Ollama 0.5.1"
    assert get.asked == ["/api/health", "/api/version"]

    busy = prober({"/api/health": Probe(None, timed_out=True)})
    found = detect_protocol(busy, BASE)
    assert (found.protocol, found.certain) == ("pc", False)

    lm_studio = prober({path: Probe(200, {"error": "Unexpected endpoint"}) for path in ("/api/health", "/api/version",
                                                                                       "/health")})
    with pytest.raises(BadResponseError, match="not like a known model server"):
        detect_protocol(lm_studio, BASE)  # HTTP 200 with an "error" key means "no"


def test_model_names_match_with_a_tag_and_single_model_servers_serve_theirs():
    assert make(OllamaProtocol).match_model(ModelListing(("phi4:latest",), ("",))) == ("phi4", None)
    model, problem = make(OllamaProtocol).match_model(ModelListing(("llama3",), ("",)))
    assert model is None and "Models there: llama3" in problem
    assert make(OpenAIProtocol).match_model(ModelListing(("x.gguf",), ("llamacpp",))) == ("x.gguf", None)
    assert make(OpenAIProtocol).match_model(ModelListing(("x",), ("vllm",)))[0] is None
