"""Serve one fake model server until killed, for end-to-end tests that need a separate process.

    python tests/run_fake_server.py --protocol pc --port 0 [--delay S] [--answer TEXT] [--events]

prints its URL on the first stdout line, then (with ``--events``) one JSON line per request and
per client disconnect, and serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from fake_ollama_server import FakeOllamaServer
from fake_openai_server import FakeOpenAIServer
from fake_pc_server import FakePCServer
from fake_server_base import DEFAULT_ANSWER

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
