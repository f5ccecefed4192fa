"""A lean loopback model server for benchmarks: asyncio, in its own process, fixed time per answer.

The test fakes (``tests/fake_*_server.py``) run a thread per connection inside the benchmark's own
process, so on a small machine their threads compete with the client's for one interpreter lock
and the benchmark measures that contention. This server runs in a child process with one asyncio
loop: a generation is an ``asyncio.sleep``, so its cost is the sleep and little else.

It speaks just enough of two protocols for detection, health, limits and generation:

* ``pc``: ``GET /api/health``, ``POST /api/generate`` (this project's PC server; one at a time);
* ``llamacpp``: ``GET /health``, ``/v1/models``, ``/props`` (``total_slots``),
  ``POST /v1/chat/completions``.

:class:`LeanServer` starts it and talks to it over a pipe: ``stats()`` (answered prompts, peak
concurrent generations) and ``kill()`` (like a crash: stop listening and reset every connection;
generations in progress are never answered). ``stop()`` ends the process.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import threading
from typing import Any


class _State:
    def __init__(self, protocol: str, slots: int, delay: float) -> None:
        self.protocol, self.slots, self.delay = protocol, slots, delay
        self.answered: list[str] = []
        self.in_progress = self.peak = 0
        self.dead = False
        self.writers: set[asyncio.StreamWriter] = set()


def _route(state: _State, method: str, path: str) -> tuple[int, Any] | None:
    """Answers that need no generation (None: a generation)."""
    if state.protocol == "pc":
        if method == "GET" and path == "/api/health":
            return 200, {"status": "healthy", "model_loaded": True}
        return None if (method, path) == ("POST", "/api/generate") else (404, {"detail": "Not Found"})
    if method == "GET" and path == "/health":
        return 200, {"status": "ok"}
    if method == "GET" and path == "/v1/models":
        return 200, {"object": "list", "data": [{"id": "phi4", "object": "model", "owned_by": "llamacpp"}]}
    if method == "GET" and path == "/props":
        return 200, {"total_slots": state.slots}
    if (method, path) == ("POST", "/v1/chat/completions"):
        return None
    return 404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}


def _answer(state: _State, prompt: str) -> dict[str, Any]:
    if state.protocol == "pc":
        return {"response": f"answer to {prompt}", "stats": {"generation_time": state.delay, "input_tokens": 3,
                                                              "generated_tokens": 3, "total_tokens": 6}}
    return {"id": "x", "object": "chat.completion", "model": "phi4", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": f"answer to {prompt}"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}


def _prompt(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("prompt"), str):
        return body["prompt"]
    messages = body.get("messages") if isinstance(body, dict) else None
    return str(messages[-1].get("content", "")) if messages else ""


async def _handle(state: _State, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    state.writers.add(writer)
    try:
        while not state.dead:
            line = await reader.readline()
            if not line:
                return
            method, path = line.decode("latin-1").split(" ")[:2]
            length = 0
            while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = header.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            body = json.loads(await reader.readexactly(length)) if length else None
            routed = _route(state, method, path.split("?")[0])
            if routed is None:
                state.in_progress += 1
                state.peak = max(state.peak, state.in_progress)
                await asyncio.sleep(state.delay)
                state.in_progress -= 1
                if state.dead:
                    return
                routed = 200, _answer(state, _prompt(body))
                state.answered.append(_prompt(body))  # no await between this and the write below
            status, payload = routed
            data = json.dumps(payload).encode("utf-8")
            writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (status, len(data), data))
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return
    finally:
        state.writers.discard(writer)
        writer.close()


def _serve(protocol: str, slots: int, delay: float, conn: Any) -> None:
    """The child process: serve on a free loopback port (sent back first), obey the pipe."""
    state = _State(protocol, slots, delay)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(lambda r, w: _handle(state, r, w), "127.0.0.1", 0, backlog=512)
        conn.send(server.sockets[0].getsockname()[1])

        def kill() -> None:
            state.dead = True
            server.close()
            for writer in list(state.writers):
                writer.transport.abort()  # a reset, as the OS sends for a crashed process

        def control() -> None:
            while True:
                command = conn.recv()
                if command == "kill":
                    done = threading.Event()
                    loop.call_soon_threadsafe(lambda: (kill(), done.set()))
                    done.wait()
                    conn.send("killed")
                elif command == "stats":
                    conn.send({"answered": list(state.answered), "peak": state.peak})

        threading.Thread(target=control, daemon=True).start()
        await asyncio.Event().wait()  # until the parent ends the process

    asyncio.run(main())


class LeanServer:
    """One lean server in a child process. ``protocol``: ``"pc"`` or ``"llamacpp"``."""

    def __init__(self, protocol: str, slots: int = 1, delay: float = 0.1) -> None:
        self._conn, child = multiprocessing.Pipe()
        self._process = multiprocessing.Process(target=_serve, args=(protocol, slots, delay, child), daemon=True)
        self._process.start()
        self.port = self._conn.recv()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()

    def _ask(self, command: str) -> Any:
        with self._lock:
            self._conn.send(command)
            return self._conn.recv()

    def stats(self) -> dict[str, Any]:
        """``{"answered": [prompt, ...], "peak": most generations at once}``."""
        return self._ask("stats")

    def kill(self) -> None:
        """Die like a crashed server: no more connections, every open one reset, nothing more answered."""
        self._ask("kill")

    def stop(self) -> None:
        """End the process (it holds nothing worth a clean shutdown)."""
        self._process.kill()
        self._process.join(timeout=5)
