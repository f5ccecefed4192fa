"""The project's one exception hierarchy, and the exit codes it maps to.

Every module raises a subclass of :class:`PipelineError`; foreign exceptions
(psycopg2, requests) are translated where they enter and never leak.

Each error class carries:

* ``code``: a stable label for logs and ``--json`` (``DB_CONNECTION_ERROR``,
  ``CONNECTION_ERROR`` ...);
* ``exit_code``: the process exit code the command line returns for it (an
  :class:`ExitCode`); only the CLI edge turns it into an exit status;
* ``hint``: one or more lines saying what to do.

``str(err)`` is the one-screen message shown to the user: what happened, then the fix.
Context an error needs (the URL, HTTP status, partial answer, stats so far) is
declared on its class and passed to the constructor, never attached afterwards.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    """Process exit codes (documented in --help and the README)."""

    OK = 0
    INTERNAL = 1  # a bug: please report it with --verbose output
    USAGE = 2  # bad flags, settings or template
    DB_CONNECTION = 3
    QUERY = 4  # including a refused write
    MODEL_UNREACHABLE = 5  # connection failed or timed out
    MODEL_ERROR = 6  # the server's own error or a bad response
    ROWS_FAILED = 7  # --per-row finished, but some rows failed (rerunning the same command retries them)
    INTERRUPTED = 130  # Ctrl-C (SIGINT)
    BROKEN_PIPE = 141  # standard output closed by its reader (| head), as a process stopped by SIGPIPE
    TERMINATED = 143  # SIGTERM


class PipelineError(Exception):
    """Root of every error this project raises on purpose."""

    code = "PIPELINE_ERROR"
    exit_code = ExitCode.INTERNAL

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n{self.hint}"
        return self.message


class ConfigError(PipelineError):
    """A setting is missing, malformed or still a placeholder."""

    code = "CONFIG_ERROR"
    exit_code = ExitCode.USAGE


class UsageError(ConfigError):
    """A command-line mistake: a bad flag, a missing file, flags that do not go together."""

    code = "USAGE_ERROR"


class DatabaseError(PipelineError):
    """Anything that went wrong talking to PostgreSQL."""

    code = "DB_ERROR"
    exit_code = ExitCode.DB_CONNECTION


class DBConnectionError(DatabaseError):
    """Could not connect to PostgreSQL (after retries where retrying made sense)."""

    code = "DB_CONNECTION_ERROR"


class QueryError(DatabaseError):
    """PostgreSQL rejected or failed the query; keeps SQLSTATE and position."""

    code = "QUERY_ERROR"
    exit_code = ExitCode.QUERY

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        sqlstate: str | None = None,
        position: int | None = None,
    ) -> None:
        super().__init__(message, hint)
        self.sqlstate = sqlstate
        self.position = position


class ReadOnlyViolation(QueryError):
    """The query tried to write, or to change session state; it was refused."""

    code = "READ_ONLY_VIOLATION"


class JobChanged(UsageError):
    """A rerun's job (query, template, model ...) differs from the one whose results it would continue."""

    code = "JOB_CHANGED"


class PromptError(PipelineError):
    """The template, context or budget cannot produce a valid prompt."""

    code = "PROMPT_ERROR"
    exit_code = ExitCode.USAGE


class ReduceNotConvergingError(PipelineError):
    """Combining partial answers would not finish: a level did not shrink them, or the depth limit was reached."""

    code = "REDUCE_NOT_CONVERGING"
    exit_code = ExitCode.MODEL_ERROR


class ModelAPIError(PipelineError):
    """Anything that went wrong talking to the model server.

    Args:
        url: the URL of the request that failed (or the server's base URL).
        status: the HTTP status, when the server answered.
        detail: the server's own error text (FastAPI ``detail``, ``error.message`` ...).
        partial_text: what had arrived of the answer before it broke ("" if nothing).
        stats: the statistics known so far (a ``GenerationStats`` or a dict), or None.
    """

    code = "MODEL_API_ERROR"
    exit_code = ExitCode.MODEL_ERROR

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        *,
        url: str | None = None,
        status: int | None = None,
        detail: str | None = None,
        partial_text: str = "",
        stats: Any = None,
    ) -> None:
        super().__init__(message, hint)
        self.url = url
        self.status = status
        self.detail = detail
        self.partial_text = partial_text
        self.stats = stats


class ModelConnectionError(ModelAPIError):
    """The model server could not be reached (refused, DNS, connect timeout)."""

    code = "CONNECTION_ERROR"
    exit_code = ExitCode.MODEL_UNREACHABLE


class ModelDisconnectedError(ModelConnectionError):
    """The connection broke after the request was sent: it may have reached the model (not retried)."""


class ModelTLSError(ModelConnectionError):
    """The HTTPS handshake failed (a certificate not trusted, for another name, expired ...).

    A connection error: nothing was sent, so the request may go to another server, and the
    exit code is the unreachable server's. Not retried: a certificate does not change by waiting.
    """

    code = "TLS_ERROR"


class ModelTimeoutError(ModelAPIError):
    """The model server accepted the request but did not answer in time."""

    code = "TIMEOUT_ERROR"
    exit_code = ExitCode.MODEL_UNREACHABLE


class ModelNotLoadedError(ModelAPIError):
    """The server runs but its model is not loaded, pulled or available."""

    code = "MODEL_NOT_LOADED"

    def __init__(self, message: str, hint: str | None = None, *, available_models: list[str] | None = None,
                 **context: Any) -> None:
        super().__init__(message, hint, **context)
        self.available_models = available_models


class InvalidPromptError(ModelAPIError):
    """The server rejected the request as invalid (400/422)."""

    code = "INVALID_PROMPT"


class ModelServerError(ModelAPIError):
    """The server answered with an error status of its own (5xx, 4xx not covered above)."""

    code = "SERVER_ERROR"


class BadResponseError(ModelAPIError):
    """The server answered, but not with the protocol's expected shape."""

    code = "BAD_RESPONSE"


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (the partial answer is kept) but exiting 143.

    Not a PipelineError: like KeyboardInterrupt it must pass through ``except Exception``.
    """

    code = "TERMINATED"
    exit_code = ExitCode.TERMINATED
