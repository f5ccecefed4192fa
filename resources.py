"""One database pool and one model server pool per settings, shared by every run in the process.

A script that calls ``run_pipeline`` for thousands of queries connects to PostgreSQL once and
keeps its HTTP keep-alive sessions, detected protocols and server states. The process has one default
:class:`SharedResources`; :func:`close_resources` closes and forgets what it holds (the CLI
calls it at the end of every run, tests between runs, ``atexit`` at the end of the process).
"""

from __future__ import annotations

import atexit
import logging
import threading
from typing import TYPE_CHECKING

from config import Settings
from db_connector import Database

if TYPE_CHECKING:  # server_pool imports requests: loaded on first use, so --dry-run never pays for it
    from server_pool import ModelServerPool

logger = logging.getLogger(__name__)


class SharedResources:
    """A database pool and a model server pool for one settings value, replaced when the settings change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settings: Settings | None = None
        self._database: Database | None = None
        self._servers: ModelServerPool | None = None

    def _use(self, settings: Settings) -> None:
        if self._settings != settings:
            self._close_locked()
            self._settings = settings

    def database(self, settings: Settings) -> Database:
        """The pooled database for these settings (created on first use)."""
        with self._lock:
            self._use(settings)
            if self._database is None:
                self._database = Database(settings)
            return self._database

    def model_servers(self, settings: Settings) -> ModelServerPool:
        """The pool of the configured model servers for these settings (created on first use)."""
        import server_pool

        with self._lock:
            self._use(settings)
            if self._servers is None:
                self._servers = server_pool.ModelServerPool(settings)
            return self._servers

    def close(self) -> None:
        """Close the pooled connections and the HTTP session; the next use opens new ones."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        database, servers = self._database, self._servers
        self._settings = self._database = self._servers = None
        if database is not None:
            database.close()
        if servers is not None:
            servers.close()


_default = SharedResources()


def shared_database(settings: Settings) -> Database:
    """The process-wide pooled database for ``settings``."""
    return _default.database(settings)


def shared_model_pool(settings: Settings) -> ModelServerPool:
    """The process-wide pool of model servers for ``settings`` (one server is a pool of one)."""
    return _default.model_servers(settings)


shared_model_client = shared_model_pool  # the name before several servers; generate/stream are the same


def close_resources() -> None:
    """Close the pooled database connections and the HTTP sessions run_pipeline keeps."""
    _default.close()


atexit.register(close_resources)
