"""A fake OpenAI-compatible server on 127.0.0.1, for the tests.

``/v1/models`` and ``/v1/chat/completions`` (SSE, ``[DONE]``, usage chunk on request), flavoured
by ``owned_by``: ``"llamacpp"`` (``/health``, ``/props`` with ``total_slots``, ``timings`` in ms,
ignores the model name), ``"vllm"`` (empty ``/health``, 404 for an unknown model),
``"organization_owner"`` (LM Studio: HTTP 200 with an ``error`` key for unknown paths). Fault
switches: ``fake_server_base``.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from fake_server_base import FakeServer, Meta, _Handler, count_tokens


class FakeOpenAIServer(FakeServer):
    """An OpenAI-compatible server. Extra args:

    ``models`` (ids in /v1/models), ``owned_by`` (``"llamacpp"``, ``"vllm"``,
    ``"organization_owner"`` for LM Studio: sets the flavour), ``timings`` (llama.cpp's ms
    timings; default on for llamacpp), ``loading`` (llama.cpp still loading: 503 on /health and
    completions), ``api_key`` (required as ``Authorization: Bearer`` on completions),
    ``strict_model`` (404 for a model not listed; default: not for llama.cpp / LM Studio, which
    ignore the name), ``usage_in_stream`` (send the usage chunk when asked with
    ``stream_options.include_usage``), ``ignores_stream`` (answer plain JSON even when asked to
    stream, as some servers do), ``slots`` (llama.cpp's ``total_slots`` in ``/props``).

    llama.cpp timings are deterministic: prompt 120.5 ms, 25 ms per generated token (40 tokens/s).
    """

    protocol = "openai"
    generate_paths = ("/v1/chat/completions",)
    PROMPT_MS = 120.5
    MS_PER_TOKEN = 25.0

    def __init__(
        self, *, models: Iterable[str] = ("phi4",), owned_by: str = "llamacpp", timings: bool | None = None,
        loading: bool = False, api_key: str | None = None, strict_model: bool | None = None,
        usage_in_stream: bool = True, ignores_stream: bool = False, slots: int = 1, **faults: Any,
    ) -> None:
        super().__init__(**faults)
        self.models = list(models)
        self.owned_by = owned_by
        self.timings = owned_by == "llamacpp" if timings is None else timings
        self.loading = loading
        self.api_key = api_key
        self.strict_model = owned_by not in ("llamacpp", "organization_owner") if strict_model is None else strict_model
        self.usage_in_stream = usage_in_stream
        self.ignores_stream = ignores_stream
        self.slots = slots

    def error_body(self, status: int, message: str) -> Any:
        kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 503: "unavailable_error"}
        return {"error": {"code": status, "message": message, "type": kinds.get(status, "server_error")}}

    def _unknown(self, h: _Handler, method: str, path: str) -> None:
        if self.owned_by == "organization_owner":  # LM Studio: 200 with an error key
            h.send_json(200, {"error": f"Unexpected endpoint or method. ({method} {path})"})
        elif self.owned_by == "vllm":
            h.send_json(404, {"detail": "Not Found"})
        else:
            h.send_json(404, self.error_body(404, "File Not Found"))

    def route(self, h: _Handler, method: str, path: str, body: Any, raw: bytes) -> None:
        if path == "/v1/models" and method == "GET":
            data = []
            for model in self.models:
                entry: dict[str, Any] = {"id": model, "object": "model", "created": 1735142223, "owned_by": self.owned_by}
                if self.owned_by == "llamacpp":
                    entry["meta"] = None if self.loading else {"n_ctx_train": 16384, "n_vocab": 100352}
                data.append(entry)
            h.send_json(200, {"object": "list", "data": data})
        elif path == "/health" and method == "GET" and self.owned_by == "llamacpp":
            if self.loading:
                h.send_json(503, self.error_body(503, "Loading model"))
            else:
                h.send_json(200, {"status": "ok"})
        elif path == "/props" and method == "GET" and self.owned_by == "llamacpp":
            h.send_json(200, {"default_generation_settings": {"n_ctx": 16384}, "total_slots": self.slots,
                              "model_path": f"models/{self.models[0] if self.models else 'model'}.gguf",
                              "build_info": "b5000-fake", "is_sleeping": False})
        elif path == "/health" and method == "GET" and self.owned_by == "vllm":
            h.send_bytes(200, b"", "application/json")
        elif path == "/v1/chat/completions" and method == "POST":
            self._completions(h, body)
        else:
            self._unknown(h, method, path)

    def _completions(self, h: _Handler, body: Any) -> None:
        if self.loading:
            h.send_json(503, self.error_body(503, "Loading model"))
            return
        if self.api_key and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            h.send_json(401, self.error_body(401, "Invalid API Key"))
            return
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            h.send_json(400, self.error_body(400, "'messages' is required and must be a non-empty array"))
            return
        model = str(body.get("model") or "")
        if self.strict_model and not any(m == model or m == f"{model}:latest" for m in self.models):
            h.send_json(404, {"error": {"message": f"The model `{model}` does not exist.", "type": "NotFoundError",
                                        "param": None, "code": 404}})
            return
        served = model if self.strict_model else (self.models[0] if self.models else model)
        pieces, truncated = self.pieces(body.get("max_tokens"), body)
        finish = "length" if truncated else "stop"
        prompt_tokens = sum(count_tokens(str(m.get("content", ""))) for m in body["messages"] if isinstance(m, dict)) + 6
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces),
                 "total_tokens": prompt_tokens + len(pieces)}
        timings = {
            "cache_n": 0, "prompt_n": prompt_tokens, "prompt_ms": self.PROMPT_MS,
            "prompt_per_token_ms": self.PROMPT_MS / prompt_tokens, "prompt_per_second": prompt_tokens / self.PROMPT_MS * 1000,
            "predicted_n": len(pieces), "predicted_ms": self.MS_PER_TOKEN * len(pieces),
            "predicted_per_token_ms": self.MS_PER_TOKEN, "predicted_per_second": 1000 / self.MS_PER_TOKEN,
        }
        base = {"id": "chatcmpl-fake", "created": 1700000000, "model": served, "system_fingerprint": "b5000-fake"}
        if not body.get("stream") or self.ignores_stream:
            answer = {**base, "object": "chat.completion", "choices": [{
                "index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                "finish_reason": finish, "logprobs": None}], "usage": usage}
            if self.timings:
                answer["timings"] = timings
            h.send_json(200, answer)
            return
        include_usage = self.usage_in_stream and bool((body.get("stream_options") or {}).get("include_usage"))

        def event(obj: Any, meta: bool = True) -> bytes:
            data = b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"
            return Meta(data) if meta else data

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

        def events() -> Iterable[bytes]:
            if self.owned_by == "llamacpp":
                yield Meta(b": ping\n\n")  # keep-alive comment (--sse-ping-interval)
                yield event(chunk({"role": "assistant", "content": None}))
            for index, piece in enumerate(pieces):
                if self.stream_error_after is not None and index >= self.stream_error_after:
                    yield event({"error": {"code": 500, "message": "slot crashed: out of memory", "type": "server_error"}})
                    return
                yield event(chunk({"content": piece}), meta=False)
            last = chunk({}, finish)
            if include_usage:
                yield event(last)
                last = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            if self.timings:
                last["timings"] = timings
            yield event(last)
            yield Meta(b"data: [DONE]\n\n")

        h.send_stream(200, "text/event-stream", events(), {"Cache-Control": "no-cache"})
