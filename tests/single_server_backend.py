"""A batch backend over one loopback server, for the per-row runner's tests.

The runner takes any object with ``generate(prompt, system_prompt, max_new_tokens, temperature, *,
json_schema, retry_ambiguous)`` and ``capacity``; the server pool is one, this adapter over one
``ServerClient`` is another. Backoff inside the transport is recorded, not slept; the calls'
``retry_ambiguous`` flags are kept for the tests to check.
"""

from __future__ import annotations

import threading
from typing import Any

from model_clients import Sleeps, make_server


class SingleServerBackend:
    def __init__(self, url: str, *, capacity: int = 1, **overrides: Any) -> None:
        self.server = make_server(url, sleep=Sleeps(), **overrides)
        self.capacity = capacity
        self.retry_ambiguous: list[bool] = []
        self._lock = threading.Lock()

    def generate(self, prompt: str, system_prompt: str | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, *, json_schema: Any = None, retry_ambiguous: bool = False) -> Any:
        with self._lock:
            self.retry_ambiguous.append(retry_ambiguous)
        return self.server.generate(prompt, system_prompt, max_new_tokens, temperature, json_schema=json_schema)

    def close(self) -> None:
        self.server.close()

    def __enter__(self) -> SingleServerBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
