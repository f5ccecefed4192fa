"""HTTP client for the model server on the PC: the public face.

Speaks three protocols (setting ``API_PROTOCOL``): ``pc`` (this project's FastAPI server),
``ollama`` (Ollama's native API) and ``openai`` (llama.cpp's server, vLLM, LM Studio ...);
``auto`` (the default) finds out which with GET requests only, once per client.

The work is done below this module:

* :mod:`server_pool`: several servers as one (``ModelServerPool``): concurrency limits, dispatch
  by free capacity, health checks and failover;
* :mod:`server_client`: one server (``ServerClient``): detection, model check, generation, health;
* :mod:`model_protocols`: one class per protocol, in a registry;
* :mod:`http_transport`: the HTTP session per thread, retries, timeouts, limits, error translation;
* :mod:`generation`: typed results (``Generation``, ``GenerationStats``, ``HealthReport``).

This module keeps the API scripts use: ``ModelAPIClient`` (one server; ``generate`` returns
``(text, stats_dict)``; ``stream`` yields text pieces and then one stats dict) and the
module-level ``send_prompt``, ``stream_prompt`` and ``check_server_health``, which work on every
configured server (``API_BASE_URL`` may list several) through a default :class:`ModelServerPool`
built lazily from :func:`config.get_settings`. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterator

import config
from errors import ConfigError, PipelineError
from generation import STATS_KEYS, Generation, GenerationStats, HealthReport
from http_bodies import DETAIL_CHARS, EXCERPT_CHARS
from model_protocols import PROTOCOLS as _PROTOCOL_CLASSES
from retry_policy import RETRY_STATUSES
from server_client import ServerClient
from server_pool import ModelServerPool, ServerStatus
from server_spec import ServerSpec

__all__ = [
    "DETAIL_CHARS", "EXCERPT_CHARS", "PROTOCOLS", "RETRY_STATUSES", "STATS_KEYS", "Generation", "GenerationStats", "HealthReport", "ModelAPIClient",
    "ModelServerPool", "ServerClient", "ServerSpec", "ServerStatus", "check_server_health", "clear_detection_cache",
    "get_default_client", "get_default_pool", "send_prompt", "stream_prompt",
]

logger = logging.getLogger(__name__)

PROTOCOLS = tuple(_PROTOCOL_CLASSES)  # ("pc", "ollama", "openai")


class ModelAPIClient:
    """One model server, with the project's settings: the API scripts have always used.

    ``base_url`` defaults to the first configured server, resolved on first use (so a dry run
    never needs ``PC_IP``); a trailing ``/v1`` is stripped and re-added where needed. For every
    configured server at once, use :class:`ModelServerPool`. ``sleep``
    and ``clock`` reach the transport (tests pass their own so that backoff takes no time).
    For typed results use :attr:`server` (a :class:`ServerClient`).
    """

    def __init__(self, settings: config.Settings, base_url: str | None = None, *,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._base_url_arg = base_url
        self._sleep = sleep
        self._clock = clock
        self._server: ServerClient | None = None
        self._lock = threading.Lock()

    @property
    def server(self) -> ServerClient:
        """The :class:`ServerClient` doing the work (built on first use; ConfigError if unconfigured)."""
        with self._lock:
            if self._server is None:
                self._server = ServerClient(self.settings, self._base_url_arg, sleep=self._sleep, clock=self._clock)
            return self._server

    @property
    def base_url(self) -> str:
        """The server's root URL, without a trailing ``/`` or ``/v1``."""
        return self.server.base_url

    @property
    def server_kind(self) -> str | None:
        """What detection found ("llama.cpp", "Ollama 0.5.1", "PC server" ...), or None."""
        return self.server.server_kind

    def detect_protocol(self) -> str:
        """'pc', 'ollama' or 'openai'. An explicit API_PROTOCOL skips probing."""
        return self.server.detect()

    def supports_streaming(self) -> bool:
        """False for the PC server, which has no streaming endpoint."""
        return self.server.supports_streaming()

    def generate(self, prompt: str, system_prompt: str | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None) -> tuple[str, dict[str, Any]]:
        """Send one prompt and wait for the whole answer. Returns ``(text, stats)``.

        Raises ModelConnectionError, ModelTimeoutError, ModelNotLoadedError, InvalidPromptError,
        ModelServerError or BadResponseError (all ModelAPIError), or ConfigError.
        """
        generation = self.server.generate(prompt, system_prompt, max_new_tokens, temperature)
        return generation.text, generation.stats.as_dict()

    def stream(self, prompt: str, system_prompt: str | None = None, max_new_tokens: int | None = None,
               temperature: float | None = None) -> Iterator[str | dict[str, Any]]:
        """Yield the answer's text pieces as they arrive, then exactly one stats dict.

        The PC server has no streaming endpoint: its whole answer comes as one piece. If the
        stream breaks, the error has ``partial_text`` (what arrived) and ``stats``. Closing the
        generator (or Ctrl-C while iterating) closes the connection, so the server sees the
        client go away.
        """
        generation = self.server.stream(prompt, system_prompt, max_new_tokens, temperature)
        try:
            yield from generation
            yield generation.stats.as_dict()
        finally:
            generation.close()

    def check_health(self) -> HealthReport:
        """Is the server up and its model ready? Never raises; one short attempt per GET."""
        try:
            server = self.server
        except ConfigError as exc:
            logger.info("Model server not ready: %s (%s)", exc.message, exc.hint)
            return HealthReport(ok=False, reachable=False, detail=exc.message, fix=exc.hint)
        return server.check_health()

    def close(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.close()

    def __enter__(self) -> ModelAPIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- module-level functions (the ones in the README), on a default pool built lazily ---

_default_client: ModelAPIClient | None = None
_default_pool: ModelServerPool | None = None
_default_lock = threading.Lock()


def get_default_client() -> ModelAPIClient:
    """A client of the first configured server, built from :func:`config.get_settings`."""
    global _default_client
    with _default_lock:
        if _default_client is None:
            _default_client = ModelAPIClient(config.get_settings())
        return _default_client


def get_default_pool() -> ModelServerPool:
    """The pool of every configured server behind the module-level functions (ConfigError if none)."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = ModelServerPool(config.get_settings())
        return _default_pool


def clear_detection_cache() -> None:
    """Reset the default client and pool: their detected protocols, checked models, server states and
    HTTP sessions are forgotten, and the next call builds new ones from the current settings.
    Clients you built yourself keep their own state (``client.server.forget()`` resets one)."""
    global _default_client, _default_pool
    with _default_lock:
        client, _default_client = _default_client, None
        pool, _default_pool = _default_pool, None
    if client is not None:
        client.close()
    if pool is not None:
        pool.close()


def check_server_health() -> bool:
    """True when at least one configured server answers and its model is ready.

    Checks every server (GETs only) and logs each one's state; never raises.
    """
    try:
        pool = get_default_pool()
    except PipelineError as exc:
        logger.error("Cannot check the model server: %s", exc)
        return False
    reports = pool.check_health()
    for report in reports:
        if not report.ok:
            logger.warning("Model server %s not ready: %s%s", report.server, report.detail,
                           f" ({report.fix})" if report.fix else "")
    return any(report.ok for report in reports)


def send_prompt(prompt: str, system_prompt: str | None = None, max_new_tokens: int | None = None,
                temperature: float | None = None) -> tuple[str, dict[str, Any]]:
    """Send a prompt to the freest configured server; returns ``(answer, stats)``.

    ``stats["server"]`` names the server that answered.
    """
    generation = get_default_pool().generate(prompt, system_prompt, max_new_tokens, temperature)
    return generation.text, generation.stats.as_dict()


def stream_prompt(prompt: str, system_prompt: str | None = None, max_new_tokens: int | None = None,
                  temperature: float | None = None) -> Iterator[str | dict[str, Any]]:
    """Like :func:`send_prompt`, but yields text pieces as they arrive, then the stats dict."""
    generation = get_default_pool().stream(prompt, system_prompt, max_new_tokens, temperature)
    try:
        yield from generation
        yield generation.stats.as_dict()
    finally:
        generation.close()
