"""The model backend interface over one loopback server, for tests that call the runners directly.

``generate(prompt, system_prompt, max_new_tokens, temperature, *, json_schema, retry_ambiguous)``
and ``capacity``, as the server pool offers them; ``capacity`` is the given number (default:
what the server reports, else 1). ``calls`` counts the generate calls made through it.
"""

from __future__ import annotations

import threading
from typing import Any

from generation import Generation
from server_client import ServerClient


class SingleServerBackend:
    def __init__(self, server: ServerClient, capacity: int | None = None) -> None:
        self.server = server
        self._capacity = capacity
        self.calls = 0
        self.ambiguous_allowed: list[bool] = []
        self._lock = threading.Lock()

    @property
    def capacity(self) -> int:
        if self._capacity is None:
            self._capacity = self.server.slots() or 1
        return self._capacity

    def generate(self, prompt: str, system_prompt: str | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, *, json_schema: Any = None,
                 retry_ambiguous: bool = False) -> Generation:
        with self._lock:
            self.calls += 1
            self.ambiguous_allowed.append(retry_ambiguous)
        return self.server.generate(prompt, system_prompt, max_new_tokens, temperature, json_schema=json_schema)
