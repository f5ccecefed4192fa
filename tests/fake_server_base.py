"""Shared machinery of the fake model servers: real HTTP on 127.0.0.1, stdlib only.

The servers themselves are one module per protocol: ``fake_pc_server.FakePCServer``,
``fake_ollama_server.FakeOllamaServer``, ``fake_openai_server.FakeOpenAIServer``. This module has
what they share: the threaded HTTP server, the request log, and the fault switches of
:class:`FakeServer` (refused connections, slow or failing answers, cut streams, split UTF-8,
trickled bodies, endless lines ...). Tests import them by module name (``tests/`` is on the
path), one way only::

    from fake_pc_server import FakePCServer

    with FakePCServer(delay=0.5, fail_first=1, fail_status=503) as srv:
        ...  # srv.base_url, srv.requests, srv.count("POST"), srv.disconnects, srv.peak_generations

Standalone, for end-to-end tests that need a separate process: ``tests/run_fake_server.py``.
"""

from __future__ import annotations

import json
import re
import socket
import socketserver
import ssl
import sys
import threading
import time
from contextlib import nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, NamedTuple
from urllib.parse import urlsplit

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
    client: tuple[str, int] | None = None  # the client's address: one per connection


def free_port() -> int:
    """A TCP port on 127.0.0.1 with nothing listening (connections to it are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def split_pieces(text: str) -> list[str]:
    """Token-like pieces: each word with the whitespace after it."""
    return re.findall(r"\S+\s*|\s+", text) or [text]


def prompt_text(body: Any) -> str:
    """The prompt of a generation request: ``prompt`` (pc), else the last message's content."""
    if not isinstance(body, dict):
        return ""
    if isinstance(body.get("prompt"), str):
        return body["prompt"]
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return str(messages[-1].get("content", ""))
    return ""


def count_tokens(text: str) -> int:
    return len(text.split())


def prompt_text(body: Any) -> str:
    """The user's prompt in a generation request of any protocol ("" when there is none)."""
    if not isinstance(body, dict):
        return ""
    if isinstance(body.get("prompt"), str):
        return body["prompt"]
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        return str(messages[-1].get("content", ""))
    return ""


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

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that closes its keep-alive connection abruptly (a stream stopped early), or
        # that refuses the certificate in TLS mode, is normal here, not a server error worth a traceback.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, ssl.SSLError)):
            super().handle_error(request, client_address)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.fake.tls is not None:
            # The handshake happens on the handler's first read, in its own thread: a client that
            # stalls or refuses the certificate never blocks the accept loop.
            sock = self.fake.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls getfqdn(), which can stall on a machine with slow DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else small writes wait ~40 ms for delayed ACKs
    server: _HTTPServer
    generating = False  # this request is a generation (the fault switches apply)
    generation_ended = False  # counted out of ``in_progress`` already

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    status_sent = 0

    def send_response(self, code: int, message: str | None = None) -> None:
        self.status_sent = code
        super().send_response(code, message)

    def setup(self) -> None:
        super().setup()
        self.server.fake._connection_opened(self.connection)

    def finish(self) -> None:
        self.server.fake._connection_closed(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _dispatch(self, method: str) -> None:
        fake = self.server.fake
        self.generating = False  # the handler lives as long as its keep-alive connection
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw.decode("utf-8")) if raw else None
        except (UnicodeDecodeError, ValueError):
            body = None
        path = self.path.split("?", 1)[0]
        if "://" in path:  # absolute form: the client sent it as to a proxy (HTTP_PROXY pointing here)
            path = urlsplit(path).path or "/"
        fake._record(RecordedRequest(method, path, body, dict(self.headers.items()), self.client_address[:2]))
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
        if self.command == "HEAD":
            pass
        elif fake.trickle and self.generating:
            self.wfile.flush()
            for index in range(len(data)):  # one byte at a time: never silent for long, never done
                if fake._stopping.wait(fake.trickle):
                    raise _ClientGone()
                self.wfile.write(data[index : index + 1])
                self.wfile.flush()
        else:
            self.end_generation()
            self.wfile.write(data)
        self.wfile.flush()

    def end_generation(self) -> None:
        """The model's work on this request is over: its last bytes are about to go out. (Counted
        here rather than after the write: the client may send its next request the moment the
        answer has arrived, before this thread gets to run again.)"""
        if self.generating and not self.generation_ended:
            self.generation_ended = True
            self.server.fake._generation_ended()

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
        if fake.long_line and pieces_are_chunks:
            self._send_long_line(fake.long_line, chunked)
        sent = 0
        items = [item for item in items if item]  # an empty chunk would end a chunked body
        for index, item in enumerate(items):
            if index == len(items) - 1:
                self.end_generation()
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

    def _send_long_line(self, size: int, chunked: bool) -> None:
        """``size`` bytes without a newline, in 64 KiB chunks (a stream that is not line-based)."""
        block = b"x" * 65536
        left = size
        while left > 0:
            piece = block[: min(left, len(block))]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            left -= len(piece)
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
        trickle: send a whole (non-streamed) answer one byte every ``trickle`` seconds: never
            silent for long, never done (a read timeout alone never fires).
        long_line: start a stream with that many bytes without a newline (not a line protocol).
        gate: a ``threading.Event``: generations wait until it is set (the test decides when the
            model "finishes"), after any ``delay``.
        drop: close the connection on a generation request without answering (a crash, or a
            proxy dropping it): the request may have reached the model.
        tls: a server-side ``ssl.SSLContext`` holding the certificate: serve HTTPS (``base_url``
            is then ``https://``), e.g. from ``trustme``: ``ca.issue_cert("127.0.0.1").configure_cert(ctx)``.

    The server also answers requests in absolute form (``GET http://host/path``), so a test can
    point ``HTTP_PROXY`` at it and reach any URL through loopback only.
        fail_when: answer with ``fail_status`` every generation whose prompt contains this text
            (a server that fails specific rows), besides the first ``fail_first``.
        answer_for: ``prompt -> answer text``, called per generation instead of ``answer``
            (different answers for different rows; the prompt is the last message's content).

    Inspection: ``requests`` (every request), ``count()``, ``generations`` (generation POSTs),
    ``answered`` (the prompt of each generation answered with a 2xx in full), ``peak_generations`` (most
    generations in progress at once), ``disconnects``, ``pieces_sent``. ``kill()`` dies like a
    crashed process, dropping the connections in progress.
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
        trickle: float | None = None,
        long_line: int | None = None,
        drop: bool = False,
        tls: ssl.SSLContext | None = None,
        gate: threading.Event | None = None,
        fail_when: str | None = None,
        answer_for: Callable[[str], str] | None = None,
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
        self.trickle = trickle
        self.long_line = long_line
        self.drop = drop
        self.tls = tls
        self.gate = gate
        self.fail_when = fail_when
        self.answer_for = answer_for
        self.requests: list[RecordedRequest] = []
        self.answered: list[str] = []  # the prompt of every generation answered in full
        self._connections: set[socket.socket] = set()
        self.disconnects = 0
        self.pieces_sent = 0
        self.in_progress = 0
        self.peak_generations = 0
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
        return f"{'https' if self.tls is not None else 'http'}://{self.host}:{self.port}"

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
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True,
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

    def kill(self) -> None:
        """Die like a crashed process: stop listening and drop every open connection, answering nothing
        more (generations in progress are abandoned; their clients see the connection close)."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed already

    def _connection_opened(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.add(connection)

    def _connection_closed(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)

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
        if method != "POST" or path not in self.generate_paths:
            self.route(h, method, path, body, raw)
            return
        h.generating, h.generation_ended = True, False
        with self._lock:
            fail = self._failed < self.fail_first
            if fail:
                self._failed += 1
            if self.fail_when is not None and self.fail_when in prompt_text(body):
                fail = True
            self.in_progress += 1
            self.peak_generations = max(self.peak_generations, self.in_progress)
        try:
            if self.drop:
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
            elif fail:
                self._send_failure(h)
            elif self.delay and self._stopping.wait(self.delay):
                return
            elif self.gate is not None and not self._wait_for_gate():
                return
            elif self.malformed_json:
                h.send_bytes(200, b'{"response": "\xeb\xb6\x84\xec\x84\x9d", "stats": {"generation_time": 2.',
                             "application/json")
            elif not self._stopping.is_set():
                h.status_sent = 0
                self.route(h, method, path, body, raw)
                if 200 <= h.status_sent < 300:
                    with self._lock:
                        self.answered.append(prompt_text(body))
        finally:
            h.end_generation()

    def _generation_ended(self) -> None:
        with self._lock:
            self.in_progress -= 1

    def _wait_for_gate(self) -> bool:
        """Wait until the gate opens (True) or the server stops (False)."""
        assert self.gate is not None
        while not self.gate.wait(0.02):
            if self._stopping.is_set():
                return False
        return not self._stopping.is_set()

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

    def pieces(self, limit: int | None = None, body: Any = None) -> tuple[list[str], bool]:
        """(pieces to send, truncated by the token limit?); ``body``: the request, for ``answer_for``."""
        answer = self.answer if self.answer_for is None else self.answer_for(prompt_text(body))
        pieces = split_pieces(answer)
        if limit is not None and 0 <= limit < len(pieces):
            return pieces[:limit], True
        return pieces, False


