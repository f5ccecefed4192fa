"""A fake Ollama server (native API) on 127.0.0.1, for the tests.

``/api/version``, ``/api/tags``, ``/api/chat`` with NDJSON streaming by default, durations in
nanoseconds, 404 for a model that is not pulled. Fault switches: ``fake_server_base``.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

from fake_server_base import FakeServer, Meta, _Handler, count_tokens


class FakeOllamaServer(FakeServer):
    """Ollama's native API. Extra args: ``models`` (names in /api/tags), ``version``.

    Stats are deterministic: 20 ms per generated token (50 tokens/s), prompt evaluation 0.1 s,
    load 5 ms; all durations in nanoseconds, as Ollama sends them.
    """

    protocol = "ollama"
    generate_paths = ("/api/chat", "/api/generate")
    EVAL_NS_PER_TOKEN = 20_000_000
    PROMPT_EVAL_NS = 100_000_000
    LOAD_NS = 5_000_000

    def __init__(self, *, models: Iterable[str] = ("phi4:latest", "llama3.2:latest"), version: str = "0.5.1",
                 **faults: Any) -> None:
        super().__init__(**faults)
        self.models = list(models)
        self.version = version

    def error_body(self, status: int, message: str) -> Any:
        return {"error": message}

    def _has(self, name: str) -> bool:
        return any(m == name or m == f"{name}:latest" for m in self.models)

    def route(self, h: _Handler, method: str, path: str, body: Any, raw: bytes) -> None:
        if path == "/" and method in ("GET", "HEAD"):
            h.send_text(200, "Ollama is running")
        elif path == "/api/version" and method == "GET":
            h.send_json(200, {"version": self.version})
        elif path == "/api/tags" and method == "GET":
            h.send_json(200, {"models": [{
                "name": m, "model": m, "modified_at": "2025-05-04T17:37:44.706015396-07:00",
                "size": 9053116391, "digest": "ac896e5b8b34" + "0" * 52,
                "details": {"parent_model": "", "format": "gguf", "family": "phi3", "families": ["phi3"],
                            "parameter_size": "14.7B", "quantization_level": "Q4_K_M"},
            } for m in self.models]})
        elif path == "/api/chat" and method == "POST":
            self._chat(h, body, raw)
        else:
            h.send_text(404, "404 page not found")

    def _chat(self, h: _Handler, body: Any, raw: bytes) -> None:
        if not raw:
            h.send_json(400, {"error": "missing request body"})
            return
        if not isinstance(body, dict):
            h.send_json(400, {"error": "invalid character 'x' looking for beginning of value"})
            return
        model = body.get("model")
        if not model:
            h.send_json(400, {"error": "model is required"})
            return
        if not self._has(model):
            h.send_json(404, {"error": f"model '{model}' not found"})
            return
        messages = body.get("messages") or []
        options = body.get("options") or {}
        pieces, truncated = self.pieces(options.get("num_predict"), body)
        prompt_tokens = sum(count_tokens(str(m.get("content", ""))) for m in messages if isinstance(m, dict)) + 6
        final = {
            "model": model, "created_at": "2025-06-01T10:00:00.000000Z",
            "message": {"role": "assistant", "content": ""}, "done": True,
            "done_reason": "length" if truncated else "stop",
            "total_duration": self.LOAD_NS + self.PROMPT_EVAL_NS + len(pieces) * self.EVAL_NS_PER_TOKEN + 1_000_000,
            "load_duration": self.LOAD_NS,
            "prompt_eval_count": prompt_tokens, "prompt_eval_duration": self.PROMPT_EVAL_NS,
            "eval_count": len(pieces), "eval_duration": len(pieces) * self.EVAL_NS_PER_TOKEN,
        }
        if body.get("stream", True) is False:
            final["message"] = {"role": "assistant", "content": "".join(pieces)}
            h.send_json(200, final)
            return

        def lines() -> Iterable[bytes]:
            for index, piece in enumerate(pieces):
                if self.stream_error_after is not None and index >= self.stream_error_after:
                    yield Meta(b'{"error":"an error was encountered while running the model: unexpected EOF"}\n')
                    return
                chunk = {"model": model, "created_at": "2025-06-01T10:00:00.000000Z",
                         "message": {"role": "assistant", "content": piece}, "done": False}
                yield json.dumps(chunk, ensure_ascii=False).encode("utf-8") + b"\n"
            yield Meta(json.dumps(final, ensure_ascii=False).encode("utf-8") + b"\n")

        h.send_stream(200, "application/x-ndjson", lines())
