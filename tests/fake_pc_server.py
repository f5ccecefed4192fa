"""A fake of this project's PC server (FastAPI + Phi-4) on 127.0.0.1, for the tests.

``/api/health`` (200 with ``model_loaded``, also while the model is not loaded), ``/api/generate``
(FastAPI ``{"detail": ...}`` errors, 422 for ``"system_prompt": null``, lazy model load on
generate, 503 when that load fails), one request at a time. Fault switches: ``fake_server_base``.
"""

from __future__ import annotations

from typing import Any

from fake_server_base import FakeServer, _Handler, count_tokens


class FakePCServer(FakeServer):
    """This project's PC server (FastAPI + Phi-4; reference implementation ``LooGee/TestLLm`` model_api_server.py).

    Extra args: ``model_loaded`` (health's flag), ``load_fails`` (the lazy load on generate fails
    with 503), ``generation_time`` (reported in stats, seconds), ``serial`` (default True: one
    request at a time, so health does not answer during a generation).
    """

    protocol = "pc"
    generate_paths = ("/api/generate",)

    def __init__(
        self, *, model_loaded: bool = True, load_fails: bool = False, generation_time: float = 2.5,
        serial: bool = True, **faults: Any,
    ) -> None:
        super().__init__(serial=serial, **faults)
        self.model_loaded = model_loaded
        self.load_fails = load_fails
        self.generation_time = generation_time

    def error_body(self, status: int, message: str) -> Any:
        return {"detail": message}

    def route(self, h: _Handler, method: str, path: str, body: Any, raw: bytes) -> None:
        if path == "/api/health" and method == "GET":
            h.send_json(200, {"status": "healthy", "model_loaded": self.model_loaded})
        elif path == "/" and method == "GET":
            h.send_json(200, {"message": "Phi-4 Model API Server", "version": "1.0.0"})
        elif path == "/openapi.json" and method == "GET":
            h.send_json(200, {
                "openapi": "3.1.0",
                "info": {"title": "Phi-4 Model API Server", "version": "1.0.0"},
                "paths": {"/api/generate": {"post": {}}, "/api/health": {"get": {}}},
            })
        elif path == "/api/generate" and method == "POST":
            self._generate(h, body, raw)
        elif path in ("/api/generate", "/api/health"):
            h.send_json(405, {"detail": "Method Not Allowed"})
        else:
            h.send_json(404, {"detail": "Not Found"})

    def _generate(self, h: _Handler, body: Any, raw: bytes) -> None:
        if not isinstance(body, dict):
            h.send_json(422, {"detail": [{"type": "json_invalid" if raw else "missing", "loc": ["body"],
                                          "msg": "JSON decode error" if raw else "Field required", "input": None}]})
            return
        problems = []
        for name, kind, required in (("prompt", str, True), ("system_prompt", str, False),
                                     ("max_new_tokens", int, False), ("temperature", (int, float), False)):
            if name not in body:
                if required:
                    problems.append({"type": "missing", "loc": ["body", name], "msg": "Field required", "input": body})
                continue
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, kind):
                type_name = {str: "string", int: "int"}.get(kind, "float")  # type: ignore[arg-type]
                problems.append({"type": f"{type_name}_type", "loc": ["body", name],
                                 "msg": f"Input should be a valid {'number' if type_name == 'float' else type_name}",
                                 "input": value})
        if problems:
            h.send_json(422, {"detail": problems})
            return
        if not body["prompt"].strip():
            h.send_json(400, {"detail": "프롬프트가 필요합니다"})
            return
        if not self.model_loaded:
            if self.load_fails:
                h.send_json(503, {"detail": "모델을 로드할 수 없습니다: CUDA out of memory. Tried to allocate 20.00 MiB"})
                return
            self.model_loaded = True  # the server loads the model lazily on generate
        temperature = float(body.get("temperature", 0.7))
        if temperature <= 0:
            h.send_json(500, {"detail": "모델 실행 중 오류 발생: `temperature` (=0.0) has to be a strictly "
                                        "positive float, otherwise your next token scores will be invalid."})
            return
        pieces, _ = self.pieces(body.get("max_new_tokens", 512), body)
        text = "".join(pieces).strip()
        system = body.get("system_prompt")
        full_prompt = f"{system}\n\n{body['prompt']}" if system else body["prompt"]
        input_tokens, generated = count_tokens(full_prompt) + 4, len(pieces)
        h.send_json(200, {"response": text, "stats": {
            "generation_time": self.generation_time,
            "input_tokens": input_tokens,
            "generated_tokens": generated,
            "total_tokens": input_tokens + generated,
            "tokens_per_second": generated / self.generation_time if self.generation_time > 0 else 0.0,
        }})
