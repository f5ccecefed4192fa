#!/usr/bin/env python3
"""A demo model server on this laptop: try the whole chain before the PC is ready.

    python demo_model_server.py [--protocol pc|ollama|openai] [--port 8000] [--host 127.0.0.1]

It speaks the real protocols (pc: ``/api/health``, ``/api/generate`` with stats; Ollama:
``/api/version``, ``/api/tags``, ``/api/chat`` with NDJSON streaming and nanosecond durations;
OpenAI-compatible: ``/v1/models``, ``/v1/chat/completions`` with SSE streaming and usage), so
detection, streaming and statistics work as with a real server. There is no model: answers are
canned text saying they come from this demo and what it received. When JSON matching a schema is
asked for (Ollama's ``format``, OpenAI's ``response_format``, or a JSON Schema in the prompt, the
only way the pc server can be asked), the answer is a small JSON value built from the schema
(:mod:`demo_structured`), so ``--per-row --schema`` runs too. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socketserver
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterable, Sequence

from demo_structured import structured_answer

PROTOCOLS = ("pc", "ollama", "openai")
DEFAULT_PORT = 8000
DEFAULT_SPEED = 40.0  # pretend tokens per second: answers take about a second, like a (fast) model


def describe_prompt(prompt: str, system_prompt: str | None) -> str:
    """What the demo received, in words: characters, and rows when the prompt says or shows them."""
    parts = [f"a prompt of {len(prompt):,} characters"]
    shown = re.search(r"\(showing ([\d,]+) of ([\d,]+) rows?\)", prompt)
    table = [line for line in prompt.splitlines() if line.startswith("|") and not line.startswith("|---")]
    if shown:
        parts.append(f"{shown.group(1)} of {shown.group(2)} rows")
    elif len(table) > 1:  # a Markdown table: a header line, then one line per row
        parts.append(f"{len(table) - 1:,} table row{'s' if len(table) > 2 else ''}")
    if system_prompt:
        parts.append(f"a system prompt of {len(system_prompt):,} characters")
    return ", ".join(parts)


def demo_answer(prompt: str, system_prompt: str | None = None) -> str:
    """The canned answer: says it is a demo, what it received, and what to do next."""
    return (f"[demo] 데모 서버의 답변입니다 (실제 모델이 아닙니다). This answer comes from demo_model_server.py, "
            f"not from a model. It received {describe_prompt(prompt, system_prompt)}. The whole chain works: "
            "database, prompt, model server, answer and statistics. For real answers, start the model server "
            "on the PC and set PC_IP (or API_BASE_URL) to its address.")


def answer_for(protocol: str, body: Any, prompt: str, system_prompt: str | None) -> str:
    """JSON built from the schema when one is asked for (by the request or in the prompt), else the canned prose."""
    structured = structured_answer(protocol, body if isinstance(body, dict) else {}, prompt)
    return structured if structured is not None else demo_answer(prompt, system_prompt)


def pieces_of(text: str) -> list[str]:
    """Token-like pieces: each word with the whitespace after it."""
    return re.findall(r"\S+\s*", text) or [text]


class _Handler(BaseHTTPRequestHandler):
    server: DemoHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the pipeline prints what matters
        pass

    def do_GET(self) -> None:  # and POST: the protocol's method decides
        method = self.command
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw.decode("utf-8")) if raw else None
        except (UnicodeDecodeError, ValueError):
            body = None
        path = self.path.split("?", 1)[0]
        try:
            getattr(self, "_" + self.server.demo.protocol)(method, path, body)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading (Ctrl-C): normal
            self.close_connection = True

    do_POST = do_GET

    # --- writing ---

    def send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_lines(self, content_type: str, lines: Iterable[bytes]) -> None:
        """A streamed body, one write per line, ended by closing the connection (HTTP/1.0)."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.end_headers()
        for line in lines:
            self.wfile.write(line)
            self.wfile.flush()

    def pace(self, pieces: int = 1) -> None:
        speed = self.server.demo.speed
        if speed > 0:
            time.sleep(pieces / speed)

    # --- the pc protocol: this project's FastAPI server ---

    def _pc(self, method: str, path: str, body: Any) -> None:
        if (method, path) == ("GET", "/api/health"):
            self.send_json(200, {"status": "healthy", "model_loaded": True})
        elif (method, path) == ("POST", "/api/generate"):
            prompt = body.get("prompt") if isinstance(body, dict) else None
            if not isinstance(prompt, str) or not prompt.strip():
                self.send_json(400, {"detail": "프롬프트가 필요합니다"})
                return
            started = time.perf_counter()
            system = body.get("system_prompt")
            answer = answer_for("pc", body, prompt, system)
            generated = len(pieces_of(answer))
            self.pace(generated)  # no streaming: the whole answer after the "generation"
            elapsed = max(time.perf_counter() - started, 1e-3)
            input_tokens = len(f"{system or ''} {prompt}".split())
            self.send_json(200, {"response": answer, "stats": {
                "generation_time": round(elapsed, 3), "input_tokens": input_tokens, "generated_tokens": generated,
                "total_tokens": input_tokens + generated, "tokens_per_second": round(generated / elapsed, 2)}})
        else:
            self.send_json(404, {"detail": "Not Found"})

    # --- Ollama's native API ---

    def _ollama(self, method: str, path: str, body: Any) -> None:
        model = self.server.demo.model
        if (method, path) == ("GET", "/api/version"):
            self.send_json(200, {"version": "0.0.0-demo"})
        elif (method, path) == ("GET", "/api/tags"):
            self.send_json(200, {"models": [{"name": f"{model}:latest", "model": f"{model}:latest", "size": 0,
                                             "modified_at": "2025-01-01T00:00:00Z", "digest": "demo"}]})
        elif (method, path) == ("POST", "/api/chat"):
            self._ollama_chat(body)
        else:
            self.send_json(404, {"error": "404 page not found"})

    def _ollama_chat(self, body: Any) -> None:
        request = self._chat_request(body, {"error": "messages are required"})
        if request is None:
            return
        prompt, system, answer_pieces = request
        model = str(body.get("model") or self.server.demo.model)
        created = datetime.now(timezone.utc).isoformat()
        started = time.perf_counter_ns()

        def final(content: str) -> dict[str, Any]:
            elapsed = max(time.perf_counter_ns() - started, 1_000_000)
            return {"model": model, "created_at": created, "message": {"role": "assistant", "content": content},
                    "done": True, "done_reason": "stop", "total_duration": elapsed + 1_000_000,
                    "load_duration": 500_000, "prompt_eval_count": len(f"{prompt} {system or ''}".split()),
                    "prompt_eval_duration": 500_000, "eval_count": len(answer_pieces), "eval_duration": elapsed}

        if body.get("stream") is False:
            self.pace(len(answer_pieces))
            self.send_json(200, final("".join(answer_pieces)))
            return

        def lines() -> Iterable[bytes]:
            for piece in answer_pieces:
                self.pace()
                event = {"model": model, "created_at": created,
                         "message": {"role": "assistant", "content": piece}, "done": False}
                yield json.dumps(event, ensure_ascii=False).encode("utf-8") + b"\n"
            yield json.dumps(final(""), ensure_ascii=False).encode("utf-8") + b"\n"

        self.send_lines("application/x-ndjson", lines())

    def _chat_request(self, body: Any, error: Any) -> tuple[str, str | None, list[str]] | None:
        """(user text, system prompt, answer pieces) of a chat request; None after a 400 for a bad one."""
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            self.send_json(400, error)
            return None
        texts: dict[str, list[str]] = {"user": [], "system": []}
        for message in messages:
            if isinstance(message, dict) and message.get("role") in texts:
                texts[str(message["role"])].append(str(message.get("content") or ""))
        prompt, system = "\n".join(texts["user"]), "\n".join(texts["system"]) or None
        return prompt, system, pieces_of(answer_for(self.server.demo.protocol, body, prompt, system))

    # --- OpenAI-compatible ---

    def _openai(self, method: str, path: str, body: Any) -> None:
        if (method, path) == ("GET", "/v1/models"):
            self.send_json(200, {"object": "list", "data": [{"id": self.server.demo.model, "object": "model",
                                                             "created": 1735689600, "owned_by": "demo"}]})
        elif (method, path) == ("POST", "/v1/chat/completions"):
            self._openai_chat(body)
        else:
            self.send_json(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}})

    def _openai_chat(self, body: Any) -> None:
        request = self._chat_request(body, {"error": {"code": 400, "message": "'messages' is required",
                                                      "type": "invalid_request_error"}})
        if request is None:
            return
        prompt, system, answer_pieces = request
        prompt_tokens = len(f"{prompt} {system or ''}".split())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(answer_pieces),
                 "total_tokens": prompt_tokens + len(answer_pieces)}
        base = {"id": "chatcmpl-demo", "created": int(time.time()), "model": str(body.get("model") or "demo")}
        if not body.get("stream"):
            self.pace(len(answer_pieces))
            self.send_json(200, {**base, "object": "chat.completion", "usage": usage, "choices": [{
                "index": 0, "message": {"role": "assistant", "content": "".join(answer_pieces)},
                "finish_reason": "stop"}]})
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def event(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
            choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
            chunk = {**base, "object": "chat.completion.chunk", "choices": choices, **extra}
            return b"data: " + json.dumps(chunk, ensure_ascii=False).encode("utf-8") + b"\n\n"

        def lines() -> Iterable[bytes]:
            yield event({"role": "assistant", "content": ""})
            for piece in answer_pieces:
                self.pace()
                yield event({"content": piece})
            yield event({}, "stop")
            if include_usage:  # as real servers do: the usage chunk only when asked for
                yield event(None, usage=usage)
            yield b"data: [DONE]\n\n"

        self.send_lines("text/event-stream", lines())


class DemoHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], demo: DemoServer) -> None:
        self.demo = demo
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up (getfqdn), which stalls where DNS is slow.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class DemoServer:
    """The demo server, for a thread in this process: ``with DemoServer("ollama", port=0) as srv: srv.base_url``."""

    def __init__(self, protocol: str = "pc", host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 speed: float = DEFAULT_SPEED, model: str = "phi4") -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.protocol, self.speed, self.model = protocol, speed, model
        self.httpd = DemoHTTPServer((host, port), self)  # OSError when the port is taken
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}"

    def __enter__(self) -> DemoServer:
        # A short poll interval: leaving the with block (shutdown) then takes milliseconds, not 0.5 s.
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="demo-model-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join()


def banner(server: DemoServer) -> str:
    """What to tell the user: the URL, the exact setting, a command to try."""
    url = server.base_url
    lines = [
        f"Demo model server ({server.protocol} protocol, canned answers, no model) at {url}",
        "Use it from the pipeline with either:",
        f"  API_BASE_URL={url}        (in .env or the environment; it overrides PC_IP and API_PORT)",
        f"  python db_to_model_pipeline.py --api-url {url} --query \"SELECT * FROM reviews LIMIT 5\"",
        f"Stop it with Ctrl-C (started in the background: kill {os.getpid()}).",
    ]
    if not server.httpd.server_address[0].startswith("127.") and server.httpd.server_address[0] != "::1":
        lines.insert(1, "Note: it listens beyond this machine (--host); anyone on the network can reach it.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python demo_model_server.py",
                     description="A loopback server that speaks the model servers' protocols with canned answers, "
                     "so the pipeline can be tried before the PC is ready.")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="pc",
                        help="pc (this project's PC server, default), ollama or openai")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--speed", type=float, default=DEFAULT_SPEED,
                        help=f"pretend tokens per second (default {DEFAULT_SPEED:g}; 0: answer at once)")
    parser.add_argument("--model", default="phi4", help="the model name it lists (default phi4, as MODEL_NAME)")
    args = parser.parse_args(argv)
    try:
        server = DemoServer(args.protocol, args.host, args.port, args.speed, args.model)
    except OSError as exc:
        sys.stderr.write(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}.\nFix: is "
                         "another server (or a demo started earlier) using the port? Choose another: "
                         f"--port {args.port + 1}, and use API_BASE_URL=http://127.0.0.1:{args.port + 1}\n")
        return 1
    print(banner(server), flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
