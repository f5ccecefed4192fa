"""The model backend interface over one loopback server, for tests that call the runners directly.

The per-row runner and map-reduce take any object with ``generate(prompt, system_prompt,
max_new_tokens, temperature, *, json_schema, retry_ambiguous)`` and ``capacity``; the server
pool is one, this adapter over one ``ServerClient`` is another. ``capacity`` is the given
number (default: 1 for a URL; for a client, what the server reports, else 1). It records each call's ``retry_ambiguous``
flag for the tests to check; backoff inside the transport is recorded, not slept, when it is
built from a URL.
"""

from __future__ import annotations

import threading
from typing import Any

from generation import Generation
from model_clients import Sleeps, make_server
from server_client import ServerClient


class SingleServerBackend:
    def __init__(self, server: ServerClient | str, capacity: int | None = None, **overrides: Any) -> None:
        if isinstance(server, str):
            self.server = make_server(server, sleep=Sleeps(), **overrides)
            capacity = 1 if capacity is None else capacity  # never ask a server the test means to be down
        else:
            self.server = server
        self._capacity = capacity
        self.retry_ambiguous: list[bool] = []
        self._lock = threading.Lock()

    @property
    def calls(self) -> int:
        """How many generate calls were made through it."""
        return len(self.retry_ambiguous)

    @property
    def ambiguous_allowed(self) -> list[bool]:
        return self.retry_ambiguous

    @property
    def capacity(self) -> int:
        if self._capacity is None:
            self._capacity = self.server.slots() or 1
        return self._capacity

    def generate(self, prompt: str, system_prompt: str | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, *, json_schema: Any = None,
                 retry_ambiguous: bool = False) -> Generation:
        with self._lock:
            self.retry_ambiguous.append(retry_ambiguous)
        return self.server.generate(prompt, system_prompt, max_new_tokens, temperature, json_schema=json_schema)

    def close(self) -> None:
        self.server.close()

    def __enter__(self) -> SingleServerBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
