"""The model servers as long runs see them: one ``generate`` and a capacity, over the shared pool.

Per-row runs and map-reduce send many requests at once. They take a backend with two things:
``generate(...)`` (any configured server, the freest first) and ``capacity`` (how many requests
the configured servers run at once in all, which sets the default concurrency). The limits are
learned from one health check of every server (GET requests only) the first time one is asked.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

from generation import Generation, HealthReport
from pool_health import not_ready_error, unavailable_error
from server_pool import ModelServerPool


class PoolBackend:
    """``generate`` and ``capacity`` over a :class:`server_pool.ModelServerPool`.

    Args:
        pool: the servers.
        wait_for_server: seconds a request may wait for a server to come back when every one is
            down (0: fail at once, naming each server and why).
    """

    def __init__(self, pool: ModelServerPool, *, wait_for_server: float = 0.0) -> None:
        self.pool = pool
        self.wait_for_server = wait_for_server
        self._reports: list[HealthReport] | None = None
        self._lock = threading.Lock()

    def health(self) -> list[HealthReport]:
        """Every server's health (checked once; GET requests only)."""
        with self._lock:
            if self._reports is None:
                self._reports = self.pool.check_health()
            return self._reports

    check_health = health

    def require_reachable(self) -> None:
        """Raise what stops a run before it starts: not one server could be reached (health check).

        A server that answers but is not ready (a model still loading, a missing model) is left to
        the run, which waits for the first and stops with the second's own error.
        """
        reports = self.health()
        if not reports or any(report.reachable for report in reports):
            return
        raise unavailable_error([(report.server or "the model server",
                                  not_ready_error(report, report.server or "the model server")) for report in reports])

    @property
    def capacity(self) -> int:
        """Requests every configured server runs at once, in all (at least 1): the default concurrency.

        A server that is down when the run starts counts with its limit (1 when it never said), so
        it gets its share of the work once it is back; until then the pool holds the extra requests
        on the laptop, and never sends a server more than its limit.
        """
        self.health()
        return max(1, sum(status.limit for status in self.pool.statuses()))

    @property
    def ready_capacity(self) -> int:
        """Requests the servers ready now run at once, in all (at least 1): for time estimates."""
        self.health()
        return max(1, self.pool.capacity)

    def generate(self, prompt: str, system_prompt: str | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, *, json_schema: Mapping[str, Any] | None = None,
                 retry_ambiguous: bool = False) -> Generation:
        return self.pool.generate(prompt, system_prompt, max_new_tokens, temperature, json_schema=json_schema,
                                  retry_ambiguous=retry_ambiguous, wait_for_server=self.wait_for_server)
