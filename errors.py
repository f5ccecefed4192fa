"""The project's one exception hierarchy.

Every module raises a subclass of :class:`PipelineError`; foreign exceptions
(psycopg2, requests) are translated where they enter and never leak. Exit codes
are assigned only at the CLI edge (``db_to_model_pipeline.py``).

Each error carries ``code``, the shared guide's error label (``DB_CONNECTION_ERROR``,
``CONNECTION_ERROR`` ...), and ``hint``, one or more lines saying what to do.
``str(err)`` is the one-screen message shown to the user: what happened, then the fix.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error this project raises on purpose."""

    code = "PIPELINE_ERROR"

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


class DatabaseError(PipelineError):
    """Anything that went wrong talking to PostgreSQL."""

    code = "DB_ERROR"


class DBConnectionError(DatabaseError):
    """Could not connect to PostgreSQL (after retries where retrying made sense)."""

    code = "DB_CONNECTION_ERROR"


class QueryError(DatabaseError):
    """PostgreSQL rejected or failed the query; keeps SQLSTATE and position."""

    code = "QUERY_ERROR"

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


class PromptError(PipelineError):
    """The template, context or budget cannot produce a valid prompt."""

    code = "PROMPT_ERROR"


class ModelAPIError(PipelineError):
    """Anything that went wrong talking to the model server."""

    code = "MODEL_API_ERROR"


class ModelConnectionError(ModelAPIError):
    """The model server could not be reached (refused, DNS, connect timeout)."""

    code = "CONNECTION_ERROR"


class ModelTimeoutError(ModelAPIError):
    """The model server accepted the request but did not answer in time."""

    code = "TIMEOUT_ERROR"


class ModelNotLoadedError(ModelAPIError):
    """The server runs but its model is not loaded, pulled or available."""

    code = "MODEL_NOT_LOADED"


class InvalidPromptError(ModelAPIError):
    """The server rejected the request as invalid (400/422)."""

    code = "INVALID_PROMPT"


class ModelServerError(ModelAPIError):
    """The server answered with an error status of its own (5xx, 4xx not covered above)."""

    code = "SERVER_ERROR"


class BadResponseError(ModelAPIError):
    """The server answered, but not with the protocol's expected shape."""

    code = "BAD_RESPONSE"
