"""Helpers for the model-client tests: settings, clients with a recording sleep, draining streams."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable

import config
from model_api_client import ModelAPIClient
from server_client import ServerClient

FAST = {
    "API_CONNECT_TIMEOUT": 1,
    "API_HEALTH_TIMEOUT": 1,
    "API_TIMEOUT": 5,
    "API_RETRY_AFTER_MAX": 5,
}


class Sleeps:
    """A ``sleep`` that records what it was asked and returns at once (backoff without waiting).

    ``then`` runs on each call (e.g. start a server on the first pause).
    """

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.calls: list[float] = []
        self._then = then
        self._lock = threading.Lock()

    def __call__(self, seconds: float) -> None:
        with self._lock:
            self.calls.append(seconds)
            count = len(self.calls)
        if self._then is not None:
            self._then(count)

    @property
    def total(self) -> float:
        return sum(self.calls)


def settings_for(url: str, **overrides: Any) -> config.Settings:
    return config.load_settings({"API_BASE_URL": url, **FAST, **overrides}, environ={})


def make_client(url: str, *, sleep: Callable[[float], None] | None = None, **overrides: Any) -> ModelAPIClient:
    """The public client on ``url`` with short timeouts; backoff recorded, not slept."""
    return ModelAPIClient(settings_for(url, **overrides), sleep=sleep or Sleeps())


def make_server(url: str, *, sleep: Callable[[float], None] | None = None, **overrides: Any) -> ServerClient:
    """A ServerClient on ``url`` with short timeouts; backoff recorded, not slept."""
    return ServerClient(settings_for(url, **overrides), sleep=sleep or Sleeps())


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(result or the exception raised, seconds taken)."""
    started = time.monotonic()
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - returned for the test to assert on
        return exc, time.monotonic() - started
    return result, time.monotonic() - started


def drain(iterator: Iterable[Any]) -> tuple[list[str], dict[str, Any] | None, Exception | None]:
    """(pieces, stats dict, error) from ``ModelAPIClient.stream()``."""
    pieces: list[str] = []
    stats = None
    try:
        for item in iterator:
            if isinstance(item, dict):
                stats = item
            else:
                pieces.append(item)
    except Exception as exc:  # noqa: BLE001
        return pieces, stats, exc
    return pieces, stats, None


def drain_generation(generation: Iterable[str]) -> tuple[list[str], Exception | None]:
    """(pieces, error) from a streamed ``Generation``."""
    pieces: list[str] = []
    try:
        for piece in generation:
            pieces.append(piece)
    except Exception as exc:  # noqa: BLE001
        return pieces, exc
    return pieces, None
