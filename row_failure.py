"""What a failed request means for one row of a per-row run, and for the run itself.

* ``RETRY``: try the row again after a pause (a timeout, a dropped connection that may have
  reached the model, HTTP 429 or 5xx, a model still loading, a garbled answer). In per-row mode a
  duplicate generation for one row costs less than losing the row.
* ``OUTAGE``: no server could be reached at all (nothing left the laptop): wait for one to come
  back without spending the row's retries.
* ``FATAL``: the same for every row (a wrong API key, a wrong endpoint, a model that is not there,
  the PC server's failed model load): stop the run.
* ``ROW``: this row's own problem (the server rejected its prompt): record it and go on.
"""

from __future__ import annotations

import enum

from errors import (
    BadResponseError,
    ModelAPIError,
    ModelConnectionError,
    ModelDisconnectedError,
    ModelNotLoadedError,
    ModelServerError,
    ModelTimeoutError,
    PipelineError,
)
from protocol_base import PC_LOAD_FAILED


class Failure(enum.Enum):
    RETRY = "retry"
    OUTAGE = "outage"
    FATAL = "fatal"
    ROW = "row"


def classify(error: PipelineError) -> Failure:
    """What a failed request means for the row and for the run."""
    if isinstance(error, ModelDisconnectedError):
        return Failure.RETRY  # it may have reached the model: in batch mode a duplicate is acceptable
    if isinstance(error, ModelConnectionError):
        return Failure.OUTAGE  # never reached any model
    if isinstance(error, ModelNotLoadedError):
        # 503 while loading: wait; not there at all, or the PC server's load failed: stop.
        loading = error.status == 503 and not (error.detail or "").startswith(PC_LOAD_FAILED)
        return Failure.RETRY if loading else Failure.FATAL
    if isinstance(error, ModelTimeoutError | BadResponseError):
        return Failure.RETRY
    if isinstance(error, ModelServerError):
        status = error.status
        if status in (401, 403, 404):
            return Failure.FATAL  # wrong key or wrong endpoint: the same for every row
        return Failure.RETRY if status is None or status == 429 or status >= 500 else Failure.ROW
    if isinstance(error, ModelAPIError):
        return Failure.ROW  # InvalidPromptError: this row's prompt
    return Failure.FATAL  # ConfigError and the like
