"""One database pool and one model client per settings, shared by every run in the process.

A script that calls ``run_pipeline`` for thousands of queries connects to PostgreSQL once and
keeps its HTTP keep-alive session and detected protocol. The process has one default
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

if TYPE_CHECKING:  # server_client imports requests: loaded on first use, so --dry-run never pays for it
    from server_client import ServerClient

logger = logging.getLogger(__name__)


class SharedResources:
    """A database pool and a model client for one settings value, replaced when the settings change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settings: Settings | None = None
        self._database: Database | None = None
        self._client: ServerClient | None = None

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

    def model_client(self, settings: Settings) -> ServerClient:
        """The model server client for these settings (created on first use)."""
        import server_client

        with self._lock:
            self._use(settings)
            if self._client is None:
                self._client = server_client.ServerClient(settings)
            return self._client

    def close(self) -> None:
        """Close the pooled connections and the HTTP session; the next use opens new ones."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        database, client = self._database, self._client
        self._settings = self._database = self._client = None
        if database is not None:
            database.close()
        if client is not None:
            client.close()


_default = SharedResources()


def shared_database(settings: Settings) -> Database:
    """The process-wide pooled database for ``settings``."""
    return _default.database(settings)


def shared_model_client(settings: Settings) -> ServerClient:
    """The process-wide model client for ``settings``."""
    return _default.model_client(settings)


def close_resources() -> None:
    """Close the pooled database connections and the HTTP session run_pipeline keeps."""
    _default.close()


atexit.register(close_resources)
