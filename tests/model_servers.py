"""Fake model servers on 127.0.0.1 for the tests: real HTTP over real sockets, stdlib only.

Three servers reproduce the documented shapes and quirks of the servers the client speaks to
(/work/shared/PROTOCOLS.md):

* :class:`FakePCServer`: the shared guide's FastAPI server (``/api/health``, ``/api/generate``;
  FastAPI ``{"detail": ...}`` errors, 422 for ``"system_prompt": null``, health 200 even when
  the model is not loaded, lazy load on generate, one request at a time);
* :class:`FakeOllamaServer`: Ollama's native API (``/api/version``, ``/api/tags``, ``/api/chat``
  with NDJSON streaming by default, durations in nanoseconds, 404 for a model not pulled);
* :class:`FakeOpenAIServer`: ``/v1/models`` and ``/v1/chat/completions`` (SSE, ``[DONE]``,
  usage chunk on request), flavoured by ``owned_by``: ``"llamacpp"`` (``/health``, ``timings`` in
  ms, ignores the model name), ``"vllm"`` (empty ``/health``, 404 for an unknown model),
  ``"organization_owner"`` (LM Studio: HTTP 200 with an ``error`` key for unknown paths).

Use in tests::

    with FakePCServer(delay=0.5, fail_first=1, fail_status=503) as srv:
        ...  # srv.base_url, srv.requests, srv.count("POST"), srv.disconnects

Every server records each request as ``RecordedRequest(method, path, json, headers)`` and takes
the fault switches of :class:`FakeServer`. Standalone (for end-to-end tests, e.g. SIGINT)::

    python tests/model_servers.py --protocol pc --port 0 [--delay S] [--answer TEXT]

prints its URL on the first stdout line and serves until killed (SIGINT or SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import socketserver
import sys
import threading
import time
from contextlib import nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable, NamedTuple

DEFAULT_ANSWER = "분석 결과: 매출이 지난달보다 12% 늘었습니다. Sales grew 12% month over month."
HTML_502_PAGE = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.24.0</center>\r\n"
    "</body>\r\n</html>\r\n"
)


class RecordedRequest(NamedTuple):
    """One request as the server received it (``json`` is None when the body was not JSON)."""

    method: str
    path: str
    json: Any
    headers: dict[str, str]


def free_port() -> int:
    """A TCP port on 127.0.0.1 with nothing listening (connections to it are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def split_pieces(text: str) -> list[str]:
    """Token-like pieces: each word with the whitespace after it."""
    return re.findall(r"\S+\s*|\s+", text) or [text]


def count_tokens(text: str) -> int:
    return len(text.split())


class BlackholeServer:
    """A port whose connection attempts time out (a PC that is off, or a firewall dropping SYNs).

    A listening socket with a full accept queue: the kernel drops further SYNs, so clients see a
    connect timeout rather than a refusal. ``with BlackholeServer() as hole: hole.base_url``.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self._sockets: list[socket.socket] = []

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BlackholeServer:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((self.host, 0))
        listener.listen(0)
        self._sockets.append(listener)
        self.port = listener.getsockname()[1]
        for _ in range(4):  # fill the accept queue (backlog 0 still queues one connection)
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(0.2)
            self._sockets.append(filler)
            try:
                filler.connect((self.host, self.port))
            except OSError:
                break  # the queue is full: this SYN was dropped
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sock in self._sockets:
            sock.close()


class Meta(bytes):
    """A streamed item that is framing, not a piece of the answer."""


class _ClientGone(Exception):
    """The client closed the connection while the server was writing."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], fake: FakeServer) -> None:
        self.fake = fake
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), which can stall on a machine with slow DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else small writes wait ~40 ms for delayed ACKs
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw.decode("utf-8")) if raw else None
        except (UnicodeDecodeError, ValueError):
            body = None
        path = self.path.split("?", 1)[0]
        fake._record(RecordedRequest(method, path, body, dict(self.headers.items())))
        with fake._serial_lock if fake.serial else nullcontext():
            try:
                fake._handle(self, method, path, body, raw)
            except _ClientGone:
                fake._note_disconnect()
                self.close_connection = True
            except (BrokenPipeError, ConnectionResetError):
                fake._note_disconnect()
                self.close_connection = True

    # --- writing ---

    def send_bytes(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        """A whole body: Content-Length, or byte-by-byte chunks when ``byte_chunks`` is on."""
        fake = self.server.fake
        if fake.byte_chunks and data:
            self.send_stream(status, content_type, [data], headers, pieces_are_chunks=False)
            return
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json", headers)

    def send_text(self, status: int, text: str, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_bytes(status, text.encode("utf-8"), content_type)

    def send_stream(
        self,
        status: int,
        content_type: str,
        items: Iterable[bytes],
        headers: dict[str, str] | None = None,
        pieces_are_chunks: bool = True,
    ) -> None:
        """Chunked body; each item is one chunk (or one chunk per byte with ``byte_chunks``).

        Items are the answer's pieces, or :class:`Meta` for framing (pings, role/finish/usage
        chunks, end markers). ``piece_delay`` seconds pass before each piece after the first; with
        ``cut_after`` set, the connection is closed without the final chunk once that many pieces
        were sent (before the next piece or the trailing framing).
        """
        fake = self.server.fake
        chunked = not (fake.close_delimited and pieces_are_chunks)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
            self.close_connection = True
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.flush()
        sent = 0
        for item in items:
            if not item:
                continue  # an empty chunk would end a chunked body
            is_piece = pieces_are_chunks and not isinstance(item, Meta)
            if pieces_are_chunks and fake.cut_after is not None and sent >= fake.cut_after and (is_piece or sent):
                self.close_connection = True
                return  # no terminating chunk: the client sees the body end early
            if is_piece and sent and fake.piece_delay:
                if fake._stopping.wait(fake.piece_delay):
                    raise _ClientGone()
            chunks = [item[i : i + 1] for i in range(len(item))] if fake.byte_chunks else [item]
            for chunk in chunks:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), bytes(chunk)) if chunked else bytes(chunk))
                self.wfile.flush()
                if fake.byte_chunks and chunk[0] >= 0xC0:
                    time.sleep(0.001)  # after a UTF-8 lead byte: the rest of the character comes later
            if is_piece:
                sent += 1
                fake._note_piece()
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class FakeServer:
    """Base of the fake servers: lifecycle, request log and the fault switches.

    Args (all keyword-only; faults apply to the generation endpoint only):
        answer: the text the model "generates" (split into word pieces when streamed).
        port: 0 for any free port, or a fixed one (see ``free_port()``).
        start_delay: seconds during which the port refuses connections before the server binds
            it (the PC server refuses connections while it loads the model).
        delay: seconds before answering a generation (a slow model; "hang past the read timeout").
        piece_delay: seconds between streamed pieces.
        fail_first: answer the first N generation requests with ``fail_status``.
        fail_status: status of those answers (503, 429, 400, 404, 422, 500, 502 ...).
        fail_body: their body (dict -> JSON, str/bytes as is); default: the protocol's error JSON.
        fail_content_type: Content-Type of a str/bytes ``fail_body``.
        retry_after: ``Retry-After`` header value on the failed answers.
        html_error: shortcut: every generation gets this status with an nginx HTML error page.
        malformed_json: answer generations with 200 and a truncated JSON body.
        cut_after: close the connection after N streamed pieces, without the stream's end marker.
        stream_error_after: after N streamed pieces send the protocol's mid-stream error event.
        byte_chunks: write every body one byte per HTTP chunk (splits multibyte characters).
        close_delimited: stream without chunked encoding: no length, the body ends when the
            server closes the connection (as simple or HTTP/1.0 servers do).
        serial: handle one request at a time, as a server whose handler blocks.
    """

    protocol = ""
    generate_paths: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        answer: str = DEFAULT_ANSWER,
        host: str = "127.0.0.1",
        port: int = 0,
        start_delay: float = 0.0,
        delay: float = 0.0,
        piece_delay: float = 0.0,
        fail_first: int = 0,
        fail_status: int = 503,
        fail_body: Any = None,
        fail_content_type: str = "application/json",
        retry_after: str | float | None = None,
        html_error: int | None = None,
        malformed_json: bool = False,
        cut_after: int | None = None,
        stream_error_after: int | None = None,
        byte_chunks: bool = False,
        close_delimited: bool = False,
        serial: bool = False,
    ) -> None:
        self.answer = answer
        self.host = host
        self.port = port
        self.start_delay = start_delay
        self.delay = delay
        self.piece_delay = piece_delay
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.fail_body = fail_body
        self.fail_content_type = fail_content_type
        self.retry_after = retry_after
        if html_error is not None:
            self.fail_first, self.fail_status = 10**9, html_error
            self.fail_body, self.fail_content_type = HTML_502_PAGE.replace("502 Bad Gateway", f"{html_error} Error"), "text/html"
            if html_error == 502:
                self.fail_body = HTML_502_PAGE
        self.malformed_json = malformed_json
        self.cut_after = cut_after
        self.stream_error_after = stream_error_after
        self.byte_chunks = byte_chunks
        self.close_delimited = close_delimited
        self.serial = serial
        self.requests: list[RecordedRequest] = []
        self.disconnects = 0
        self.pieces_sent = 0
        self._failed = 0
        self._lock = threading.Lock()
        self._serial_lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._starter: threading.Thread | None = None

    # --- lifecycle ---

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeServer:
        if self.start_delay > 0:
            if not self.port:
                self.port = free_port()
            self._starter = threading.Thread(target=self._delayed_bind, daemon=True)
            self._starter.start()
        else:
            self._bind()
        return self

    def _delayed_bind(self) -> None:
        if not self._stopping.wait(self.start_delay):
            self._bind()

    def _bind(self) -> None:
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
            name=f"fake-{self.protocol}-{self.port}",
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._starter is not None:
            self._starter.join(timeout=5)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- inspection ---

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """How many requests matched ``method`` and ``path`` (None matches any)."""
        with self._lock:
            return sum(
                1 for r in self.requests if (method is None or r.method == method) and (path is None or r.path == path)
            )

    @property
    def generations(self) -> int:
        """POSTs to the generation endpoint."""
        with self._lock:
            return sum(1 for r in self.requests if r.method == "POST" and r.path in self.generate_paths)

    def wait_for_disconnect(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.disconnects:
                return True
            time.sleep(0.02)
        return bool(self.disconnects)

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)
        self.on_event({"event": "request", "method": request.method, "path": request.path})

    def _note_disconnect(self) -> None:
        with self._lock:
            self.disconnects += 1
        self.on_event({"event": "disconnect"})

    def _note_piece(self) -> None:
        with self._lock:
            self.pieces_sent += 1

    def on_event(self, event: dict[str, Any]) -> None:
        """Hook for the standalone mode (``--events``); does nothing by default."""

    # --- request handling ---

    def _handle(self, h: _Handler, method: str, path: str, body: Any, raw: bytes) -> None:
        if method == "POST" and path in self.generate_paths:
            with self._lock:
                fail = self._failed < self.fail_first
                if fail:
                    self._failed += 1
            if fail:
                self._send_failure(h)
                return
            if self.delay and self._stopping.wait(self.delay):
                return
            if self.malformed_json:
                h.send_bytes(200, b'{"response": "\xeb\xb6\x84\xec\x84\x9d", "stats": {"generation_time": 2.', "application/json")
                return
        self.route(h, method, path, body, raw)

    def _send_failure(self, h: _Handler) -> None:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        body = self.fail_body
        if body is None:
            body = self.error_body(self.fail_status, f"fake failure {self.fail_status}")
        if isinstance(body, (dict, list)):
            h.send_json(self.fail_status, body, headers)
        else:
            data = body.encode("utf-8") if isinstance(body, str) else body
            h.send_bytes(self.fail_status, data, self.fail_content_type, headers)

    def error_body(self, status: int, message: str) -> Any:
        """The protocol's error JSON."""
        raise NotImplementedError

    def route(self, h: _Handler, method: str, path: str, body: Any, raw: bytes) -> None:
        raise NotImplementedError

    def pieces(self, limit: int | None = None) -> tuple[list[str], bool]:
        """(pieces to send, truncated by the token limit?)."""
        pieces = split_pieces(self.answer)
        if limit is not None and 0 <= limit < len(pieces):
            return pieces[:limit], True
        return pieces, False


class FakePCServer(FakeServer):
    """The shared guide's PC server (FastAPI + Phi-4, ``LooGee/TestLLm`` model_api_server.py).

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
        pieces, _ = self.pieces(body.get("max_new_tokens", 512))
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
        pieces, truncated = self.pieces(options.get("num_predict"))
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


class FakeOpenAIServer(FakeServer):
    """An OpenAI-compatible server. Extra args:

    ``models`` (ids in /v1/models), ``owned_by`` (``"llamacpp"``, ``"vllm"``,
    ``"organization_owner"`` for LM Studio: sets the flavour), ``timings`` (llama.cpp's ms
    timings; default on for llamacpp), ``loading`` (llama.cpp still loading: 503 on /health and
    completions), ``api_key`` (required as ``Authorization: Bearer`` on completions),
    ``strict_model`` (404 for a model not listed; default: not for llama.cpp / LM Studio, which
    ignore the name), ``usage_in_stream`` (send the usage chunk when asked with
    ``stream_options.include_usage``), ``ignores_stream`` (answer plain JSON even when asked to
    stream, as some servers do).

    llama.cpp timings are deterministic: prompt 120.5 ms, 25 ms per generated token (40 tokens/s).
    """

    protocol = "openai"
    generate_paths = ("/v1/chat/completions",)
    PROMPT_MS = 120.5
    MS_PER_TOKEN = 25.0

    def __init__(
        self, *, models: Iterable[str] = ("phi4",), owned_by: str = "llamacpp", timings: bool | None = None,
        loading: bool = False, api_key: str | None = None, strict_model: bool | None = None,
        usage_in_stream: bool = True, ignores_stream: bool = False, **faults: Any,
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
        pieces, truncated = self.pieces(body.get("max_tokens"))
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


SERVERS = {"pc": FakePCServer, "ollama": FakeOllamaServer, "openai": FakeOpenAIServer}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a fake model server on loopback until killed.")
    parser.add_argument("--protocol", choices=sorted(SERVERS), default="pc")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before answering a generation")
    parser.add_argument("--piece-delay", type=float, default=0.0, help="seconds between streamed pieces")
    parser.add_argument("--answer", default=DEFAULT_ANSWER)
    parser.add_argument("--model-not-loaded", action="store_true", help="pc: health says model_loaded false")
    parser.add_argument("--load-fails", action="store_true", help="pc: the lazy load on generate fails (503)")
    parser.add_argument("--models", help="ollama/openai: comma-separated model names")
    parser.add_argument("--owned-by", default="llamacpp", help="openai: llamacpp, vllm, organization_owner")
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--fail-status", type=int, default=503)
    parser.add_argument("--events", action="store_true", help="print one JSON line per request/disconnect")
    args = parser.parse_args(argv)

    kwargs: dict[str, Any] = {
        "answer": args.answer, "host": args.host, "port": args.port, "delay": args.delay,
        "piece_delay": args.piece_delay, "fail_first": args.fail_first, "fail_status": args.fail_status,
    }
    if args.protocol == "pc":
        kwargs.update(model_loaded=not args.model_not_loaded, load_fails=args.load_fails)
    elif args.models is not None:
        kwargs["models"] = [m for m in args.models.split(",") if m]
    if args.protocol == "openai":
        kwargs["owned_by"] = args.owned_by
    server = SERVERS[args.protocol](**kwargs)
    if args.events:
        print_lock = threading.Lock()

        def on_event(event: dict[str, Any]) -> None:
            with print_lock:
                print(json.dumps(event), flush=True)

        server.on_event = on_event  # type: ignore[method-assign]

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    print(server.base_url, flush=True)
    try:
        while not stop.wait(0.2):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
