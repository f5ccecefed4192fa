"""One class per model-server protocol, in a registry keyed by name (:data:`PROTOCOLS`).

* ``pc``: this project's FastAPI server (``GET /api/health``, ``POST /api/generate``; no streaming);
* ``ollama``: Ollama's native API (``POST /api/chat`` with ``options.num_ctx``, NDJSON streaming);
* ``openai``: ``/v1/chat/completions`` (llama.cpp's server, vLLM, LM Studio, Ollama's ``/v1``).

Each class fills in :class:`protocol_base.Protocol`. Adding a protocol means adding one class
here and one entry in :data:`PROTOCOLS`.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Iterator, Mapping

from errors import BadResponseError, InvalidPromptError, ModelAPIError, ModelNotLoadedError
from generation import GenerationStats, HealthReport, StreamProgress
from http_bodies import describe_body, error_detail, shorten
from protocol_base import (
    NOT_READY_FIX,
    PC_LOAD_FAILED,
    ChatProtocol,
    Detection,
    GenerationRequest,
    ModelListing,
    Probe,
    ProbeFn,
    Protocol,
    ServerInfo,
    is_json_object,
    to_float,
    to_int,
    scaled,
    sum_or_none,
)

__all__ = ["PROTOCOLS", "Detection", "GenerationRequest", "ModelListing", "OllamaProtocol", "OpenAIProtocol",
           "PCProtocol", "Probe", "Protocol", "ServerInfo", "detect_protocol"]

logger = logging.getLogger(__name__)


class PCProtocol(Protocol):
    """This project's FastAPI server on the PC: one model, one request at a time, no streaming."""

    name = "pc"
    generate_path = "/api/generate"
    probe_paths = ("/api/health",)
    streams = False
    slots_source = "the pc server runs one at a time"

    @classmethod
    def detect(cls, get: ProbeFn) -> Detection | None:
        probe = get("/api/health")
        if probe.timed_out:
            logger.warning("/api/health did not answer within API_HEALTH_TIMEOUT: assuming the PC server, busy "
                           "with a generation (it serves one request at a time)")
            return Detection("pc", "PC server (busy)", certain=False)
        if is_json_object(probe) and "model_loaded" in probe.body:
            return Detection("pc", "PC server")
        return None

    def check_request(self, request: GenerationRequest) -> None:
        if request.temperature <= 0:
            raise InvalidPromptError(
                f"TEMPERATURE must be > 0 for the PC server (got {request.temperature:g}): it samples with "
                "do_sample=True.",
                hint="Fix: set TEMPERATURE (or --temperature) to a value such as 0.1 or 0.7.",
            )

    def build_request(self, request: GenerationRequest, model: str | None, stream: bool) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"prompt": request.prompt, "max_new_tokens": request.max_new_tokens,
                                "temperature": request.temperature}
        if request.system_prompt is not None:  # the PC server rejects "system_prompt": null with a 422
            body["system_prompt"] = request.system_prompt
        return self.generate_path, body

    def default_model(self) -> str:
        return self.server.model_label

    def parse_answer(self, data: Any, stats: GenerationStats) -> str:
        if not isinstance(data, dict) or not isinstance(data.get("response"), str):
            raise self._bad_shape(data, 'a "response" text', self.server.base_url + self.generate_path)
        raw = data.get("stats") if isinstance(data.get("stats"), dict) else {}
        stats.generation_time = to_float(raw.get("generation_time"))
        stats.input_tokens = to_int(raw.get("input_tokens"))
        stats.generated_tokens = to_int(raw.get("generated_tokens"))
        total = to_int(raw.get("total_tokens"))
        stats.total_tokens = total if total is not None else sum_or_none(stats.input_tokens, stats.generated_tokens)
        stats.tokens_per_second = to_float(raw.get("tokens_per_second"))
        return data["response"]

    def stream_events(self, lines: Iterator[str], stats: GenerationStats, progress: StreamProgress) -> Iterator[str]:
        raise NotImplementedError("the PC server has no streaming endpoint")

    def health(self, get: ProbeFn) -> HealthReport:
        base = self.server.base_url
        report = HealthReport(ok=False, reachable=True, protocol="pc", model_name=self.server.model_label)
        probe = get("/api/health")
        if probe.timed_out:
            report.detail = (f"The PC server at {base} accepted the connection but did not answer /api/health in "
                             "time (API_HEALTH_TIMEOUT): it is probably busy with a generation (it serves one "
                             "request at a time).")
            report.fix = "Wait for the running generation to finish, or raise API_HEALTH_TIMEOUT."
            return report
        if not is_json_object(probe) or "model_loaded" not in probe.body:
            shown = error_detail(probe.body) or describe_body(probe.text, probe.content_type)
            return self._wrong_protocol(report, f"{base}/api/health did not answer like the PC server "
                                        f"(HTTP {probe.status}: {shorten(shown, 120)})")
        if probe.body.get("model_loaded") is not True:
            report.detail = f"The PC server at {base} is running, but its model is not loaded (model_loaded: false)."
            report.fix = NOT_READY_FIX
            return report
        report.ok = report.model_ready = True
        report.detail = f"PC server at {base} is ready (model loaded)"
        return report

    def slots(self, get: ProbeFn) -> int | None:
        return 1  # it generates one request at a time, and does not even answer health meanwhile

    def gives_up(self, status: int, detail: str) -> bool:
        return status == 503 and detail.startswith(PC_LOAD_FAILED)

    def _special_error(self, status: int, detail: str, shown: str, model: str,
                       context: dict[str, Any]) -> ModelAPIError | None:
        if self.gives_up(status, detail):
            return ModelNotLoadedError(f"The PC server could not load its model (HTTP 503): {shown}",
                                       hint=NOT_READY_FIX, **context)
        return super()._special_error(status, detail, shown, model, context)


class OllamaProtocol(ChatProtocol):
    """Ollama's native API: ``/api/chat``, NDJSON streams, durations in nanoseconds."""

    name = "ollama"
    generate_path = "/api/chat"
    probe_paths = ("/api/version",)
    models_path = "/api/tags"
    models_key = "models"
    structured_output = True

    @classmethod
    def detect(cls, get: ProbeFn) -> Detection | None:
        probe = get("/api/version")
        if is_json_object(probe) and isinstance(probe.body.get("version"), str):
            return Detection("ollama", f"Ollama {probe.body['version']}")
        return None

    def build_request(self, request: GenerationRequest, model: str | None, stream: bool) -> tuple[str, dict[str, Any]]:
        # num_ctx: Ollama's default window is small and it silently cuts longer prompts.
        options = {"num_predict": request.max_new_tokens, "temperature": request.temperature,
                   "num_ctx": self.server.context_tokens}
        body: dict[str, Any] = {"model": model or self.server.model_name, "messages": request.messages(),
                                "stream": stream, "options": options}
        if request.json_schema is not None:
            body["format"] = dict(request.json_schema)
        return self.generate_path, body

    def _entry_name(self, entry: dict[str, Any]) -> Any:
        return entry.get("name") or entry.get("model")

    def missing_model_action(self) -> str:
        return f"run `ollama pull {self.server.model_name}` on the PC"

    @staticmethod
    def _fill_stats(stats: GenerationStats, raw: Mapping[str, Any]) -> None:
        # Durations are nanoseconds. generation_time = prompt evaluation + generation (like the PC
        # server's model.generate time; load_duration excluded).
        eval_s = scaled(raw.get("eval_duration"), 1e9)
        prompt_s = scaled(raw.get("prompt_eval_duration"), 1e9)
        if eval_s is not None:
            stats.generation_time = eval_s + (prompt_s or 0.0)
        stats.input_tokens = to_int(raw.get("prompt_eval_count"))
        stats.generated_tokens = to_int(raw.get("eval_count"))
        stats.total_tokens = sum_or_none(stats.input_tokens, stats.generated_tokens)
        if eval_s and stats.generated_tokens is not None:
            stats.tokens_per_second = stats.generated_tokens / eval_s
        stats.finish_reason = raw.get("done_reason")

    def parse_answer(self, data: Any, stats: GenerationStats) -> str:
        message = data.get("message") if isinstance(data, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise self._bad_shape(data, '"message.content"', self.server.base_url + self.generate_path)
        stats.model = data.get("model") or stats.model
        self._fill_stats(stats, data)
        return message["content"]

    def stream_events(self, lines: Iterator[str], stats: GenerationStats, progress: StreamProgress) -> Iterator[str]:
        """NDJSON: ``{"message": {"content": ...}, "done": false}`` ... ``{"done": true, counts}``."""
        for line in lines:
            if not line.strip():
                continue
            event = self._stream_event(line, "The Ollama stream sent a line", progress)
            if event is None:
                continue
            message = event.get("message")
            content = message.get("content") if isinstance(message, dict) else None
            if content:
                yield content
            if event.get("done"):
                stats.model = event.get("model") or stats.model
                self._fill_stats(stats, event)
                return
        raise self._stream_cut(progress, 'no final "done": true message')

    def health(self, get: ProbeFn) -> HealthReport:
        base = self.server.base_url
        report = HealthReport(ok=False, reachable=True, protocol="ollama", model_name=self.server.model_name)
        listing = self.list_models(get)
        if listing is None:
            return self._wrong_protocol(report, f"{base}/api/tags did not answer like {self.server.kind or 'Ollama'}")
        unready = self._listed_health(report, listing)
        if unready is not None:
            return unready
        report.ok = report.model_ready = True
        report.detail = f"{self.server.kind or 'Ollama'} at {base} is ready (model {report.model_name})"
        return report


class OpenAIProtocol(ChatProtocol):
    """OpenAI-compatible servers: ``/v1/chat/completions`` with SSE streams (llama.cpp, vLLM, LM Studio)."""

    name = "openai"
    generate_path = "/v1/chat/completions"
    probe_paths = ("/health", "/v1/models")
    models_path = "/v1/models"
    models_key = "data"
    structured_output = True
    OWNERS: ClassVar[dict[str, str]] = {"llamacpp": "llama.cpp", "vllm": "vLLM", "organization_owner": "LM Studio",
                                        "library": "Ollama"}

    @classmethod
    def detect(cls, get: ProbeFn) -> Detection | None:
        kind = None
        probe = get("/health")
        if probe.status in (200, 503) and isinstance(probe.body, dict):
            error = probe.body.get("error")
            if probe.status == 200 and probe.body.get("status") == "ok" and "error" not in probe.body:
                kind = "llama.cpp"
            elif isinstance(error, dict) and "loading model" in str(error.get("message", "")).lower():
                kind = "llama.cpp (loading the model)"
        elif probe.status == 200 and not probe.text.strip():
            kind = "vLLM or TGI"
        probe = get("/v1/models")
        if probe.status == 200 and isinstance(probe.body, dict) and isinstance(probe.body.get("data"), list):
            owners = {str(m.get("owned_by")) for m in probe.body["data"] if isinstance(m, dict)}
            named = next((name for owner, name in cls.OWNERS.items() if owner in owners), None)
            return Detection("openai", named or kind or "OpenAI-compatible server")
        if probe.status in (401, 403) and kind is None:
            return Detection("openai", "OpenAI-compatible server (needs API_KEY)")
        return Detection("openai", kind) if kind else None

    def build_request(self, request: GenerationRequest, model: str | None, stream: bool) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": model or self.server.model_name, "messages": request.messages(),
                                "max_tokens": request.max_new_tokens, "temperature": request.temperature,
                                "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if request.json_schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "answer", "schema": dict(request.json_schema), "strict": True}}
        return self.generate_path, body

    def match_model(self, listing: ModelListing) -> tuple[str | None, str | None]:
        model, problem = super().match_model(listing)
        # llama.cpp (one model) and LM Studio (one loaded model) ignore the requested name.
        if problem and len(listing.names) == 1 and listing.owners[0] in ("llamacpp", "organization_owner"):
            logger.warning("MODEL_NAME=%s is not in the server's list; it serves only %r, which will be used",
                           self.server.model_name, listing.names[0])
            return listing.names[0], None
        return model, problem

    def missing_model_action(self) -> str:
        if self.server.kind == "Ollama":
            return f"run `ollama pull {self.server.model_name}` on the PC"
        return super().missing_model_action()

    @staticmethod
    def _fill_stats(stats: GenerationStats, usage: Any, timings: Any) -> None:
        usage = usage if isinstance(usage, dict) else {}
        timings = timings if isinstance(timings, dict) else {}
        stats.input_tokens = to_int(usage.get("prompt_tokens"))
        stats.generated_tokens = to_int(usage.get("completion_tokens"))
        if stats.generated_tokens is None:
            stats.generated_tokens = to_int(timings.get("predicted_n"))
        total = to_int(usage.get("total_tokens"))
        stats.total_tokens = total if total is not None else sum_or_none(stats.input_tokens, stats.generated_tokens)
        predicted_s = scaled(timings.get("predicted_ms"), 1000)  # llama.cpp timings are milliseconds
        if predicted_s is not None:
            stats.generation_time = predicted_s + (scaled(timings.get("prompt_ms"), 1000) or 0.0)
        stats.tokens_per_second = to_float(timings.get("predicted_per_second"))

    def parse_answer(self, data: Any, stats: GenerationStats) -> str:
        url = self.server.base_url + self.generate_path
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise self._bad_shape(data, '"choices"', url)
        message = choices[0].get("message") or {}
        content = message.get("content") if isinstance(message, dict) else None
        if content is not None and not isinstance(content, str):
            raise self._bad_shape(data, '"choices[0].message.content" text', url)
        stats.model = data.get("model") or stats.model
        stats.finish_reason = choices[0].get("finish_reason")
        self._fill_stats(stats, data.get("usage"), data.get("timings"))
        return content or ""

    def stream_events(self, lines: Iterator[str], stats: GenerationStats, progress: StreamProgress) -> Iterator[str]:
        """SSE ``data:`` lines with chat.completion.chunk JSON, until ``data: [DONE]``."""
        usage: Any = None
        timings: Any = None
        for line in lines:
            if not line.startswith("data:"):
                continue  # blank line, keep-alive comment, or event:/id:/retry: fields
            data = line[5:].strip()
            if data == "[DONE]":
                self._fill_stats(stats, usage, timings)
                return
            event = self._stream_event(data, "The stream sent an event", progress)
            if event is None:
                continue
            stats.model = event.get("model") or stats.model
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
            for choice in event.get("choices") or []:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta") or {}
                content = delta.get("content") if isinstance(delta, dict) else None
                if content:
                    yield content
                if choice.get("finish_reason"):
                    stats.finish_reason = choice["finish_reason"]
        raise self._stream_cut(progress, "no final data: [DONE]")

    def health(self, get: ProbeFn) -> HealthReport:
        base = self.server.base_url
        kind = self.server.kind or "the OpenAI-compatible server"
        report = HealthReport(ok=False, reachable=True, protocol="openai", model_name=self.server.model_name)
        listing = self.list_models(get)
        health = get("/health")
        if listing is None:
            if health.status != 200:
                return self._wrong_protocol(report, f"{base}/v1/models (nor /health) did not answer like {kind}")
        else:
            unready = self._listed_health(report, listing)
            if unready is not None:
                return unready
        if health.status == 503:
            report.detail = f"{base} is up but not ready: {error_detail(health.body) or 'HTTP 503'}"
            report.fix = NOT_READY_FIX
            return report
        report.ok = report.model_ready = True
        report.detail = f"{self.server.kind or 'openai'} at {base} is ready (model {report.model_name})"
        return report

    def slots(self, get: ProbeFn) -> int | None:
        """llama.cpp reports its parallel slots in ``GET /props`` (``total_slots``)."""
        probe = get("/props")
        total = probe.body.get("total_slots") if is_json_object(probe) else None
        return total if isinstance(total, int) and not isinstance(total, bool) and total > 0 else None


# The registry: detection tries the protocols in this order (the pc server's probe is the cheapest
# and the most specific; OpenAI-compatible is the widest net, so it comes last).
PROTOCOLS: dict[str, type[Protocol]] = {"pc": PCProtocol, "ollama": OllamaProtocol, "openai": OpenAIProtocol}


def detect_protocol(get: ProbeFn, base_url: str) -> Detection:
    """Which protocol the server at ``base_url`` speaks, by GET probes in registry order."""
    for cls in PROTOCOLS.values():
        found = cls.detect(get)
        if found is not None:
            return found
    tried = ", ".join(path for cls in PROTOCOLS.values() for path in cls.probe_paths)
    raise BadResponseError(
        f"The server at {base_url} answers HTTP, but not like a known model server (tried GET {tried}).",
        hint="Check API_PORT / API_BASE_URL, or set API_PROTOCOL to pc, ollama or openai.", url=base_url,
    )
