"""What a server pool decides from an error or a health report: failover, limits, the "all down" error.

Pure functions over the project's errors, so that :mod:`server_pool` keeps to its locking and
threads. Three kinds of failure:

* :data:`FAILOVER`: the request never reached a model (refused connection, connect timeout, 503
  while loading, 429, model not loaded): the server is taken out and the request may go to
  another server at once.
* :data:`AMBIGUOUS`: the request may already be generating (the connection dropped after it was
  sent, a read timeout, a stream cut, a 502/504 from a proxy): the server is taken out, but the
  request is sent again only when the caller says so.
* :data:`FATAL`: the request itself is at fault, or the server refused it (400/422, 401/403, 404,
  500, an error event in the stream): nothing is resent and the server stays in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
from generation import HealthReport
from server_client import ServerClient

FAILOVER = "failover"
AMBIGUOUS = "ambiguous"
FATAL = "fatal"

# Statuses a server sends before it starts working on a request: "busy" or "loading".
REFUSED_STATUSES = (429, 503)
GATEWAY_STATUSES = (502, 504)  # a proxy gave up: the server behind it may still be generating


@dataclass(frozen=True)
class ServerStatus:
    """A snapshot of one server in a pool (``ModelServerPool.statuses()``)."""

    url: str  # the base URL, password masked
    state: str  # "new" (not probed yet), "up", "down" or "probing"
    limit: int  # generations sent to it at once
    limit_source: str  # where the limit comes from
    in_flight: int
    served: int  # answers it completed
    failed: int  # requests that failed on it
    protocol: str | None
    model: str | None
    reason: str | None  # why it is down
    retry_in: float | None  # seconds until a down server is checked again



def failure_kind(error: BaseException) -> str:
    """:data:`FAILOVER`, :data:`AMBIGUOUS` or :data:`FATAL` for an error raised by a request."""
    if isinstance(error, ModelDisconnectedError):  # before ModelConnectionError: it is one
        return AMBIGUOUS
    if isinstance(error, (ModelConnectionError, ModelNotLoadedError)):
        return FAILOVER
    if isinstance(error, ModelServerError) and error.status in REFUSED_STATUSES and not error.partial_text:
        return FAILOVER
    if isinstance(error, ModelServerError) and error.status in GATEWAY_STATUSES:
        return AMBIGUOUS
    if isinstance(error, (ModelTimeoutError, BadResponseError)):
        return AMBIGUOUS
    return FATAL


def fresh_error(error: PipelineError, note: str = "") -> PipelineError:
    """A new error of the same class, message (plus ``note``) and hint, without the request-specific
    context (partial answer, stats): for a caller that did not send the request that failed."""
    message = error.message + note
    if isinstance(error, ModelNotLoadedError):
        return type(error)(message, error.hint, available_models=error.available_models, url=error.url,
                           status=error.status, detail=error.detail)
    if isinstance(error, ModelAPIError):
        return type(error)(message, error.hint, url=error.url, status=error.status, detail=error.detail)
    try:
        return type(error)(message, error.hint)
    except TypeError:  # a class with another signature: the root class keeps message and hint
        return PipelineError(message, error.hint)


def not_ready_error(report: HealthReport, display: str) -> PipelineError:
    """The error a failed health check stands for: unreachable, not a model server, or not ready."""
    fix = report.fix or "Run `python db_to_model_pipeline.py --check` for the server's state."
    if not report.reachable:
        return ModelConnectionError(report.detail or f"The model server at {display} cannot be reached.", fix,
                                    url=display)
    if not report.protocol:
        return BadResponseError(report.detail or f"{display} does not answer like a model server.", fix,
                                url=display)
    return ModelNotLoadedError(report.detail or f"The model server at {display} is not ready.", fix, url=display)


def limit_for(client: ServerClient) -> tuple[int, str]:
    """``(generations at once, where that comes from)``: ``#slots``, else what the server says, else 1.

    Raises what the server's probe raises (ModelConnectionError ...) when it must be asked.
    """
    if client.spec.slots:
        return client.spec.slots, "#slots"
    reported = client.slots()
    if reported:
        return reported, client.slots_source
    return 1, "default; set #slots=N if the server runs more"


def unavailable_error(servers: Sequence[tuple[str, PipelineError | None]], waited: float = 0.0) -> PipelineError:
    """The error for a request no server can take: every server is down.

    One server: that server's own error (its class, message and fix). Several: a
    ModelConnectionError (exit code 5) naming each server and why.
    """
    note = f" (waited {waited:g} s for it to come back)" if waited > 0 else ""
    if len(servers) == 1:
        display, error = servers[0]
        if error is None:
            return ModelConnectionError(f"The model server at {display} is not usable{note}.", url=display)
        return fresh_error(error, note)
    lines = [f"  - {display}: {_first_line(error.message) if error else 'not usable'}" for display, error in servers]
    waited_text = f"; waited {waited:g} s for one to come back" if waited > 0 else ""
    return ModelConnectionError(
        f"No model server can take the request: all {len(servers)} are down{waited_text}:\n" + "\n".join(lines),
        hint="Fix: start at least one of them (or fix what its line says), or remove the dead ones from "
        "API_BASE_URL / --api-url. `python db_to_model_pipeline.py --check` shows each server's state and fix.",
    )


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text
