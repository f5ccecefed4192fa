"""The transport's failures in words: what happened, where, and the setting that cures it.

Pure functions that build the project's errors from facts the transport gathered (the URL,
the setting and its value, how much had arrived); no I/O and no ``requests``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from errors import BadResponseError, ModelConnectionError, ModelDisconnectedError, ModelTimeoutError
from http_bodies import shorten


def timeout_error(setting: str, value: float, what: str, *, url: str, **context: Any) -> ModelTimeoutError:
    """The server took too long (``what`` says how); never retried, so the hint says why."""
    streamed = context.get("partial_text") is not None
    return ModelTimeoutError(
        f"The model server at {url} {what}.",
        hint=("The partial answer was kept. " if streamed else "")
        + f"Fix: raise {setting} (or --timeout) if answers legitimately take longer"
        + ("" if streamed else ", lower MAX_NEW_TOKENS, or use streaming")
        + ". The request was not retried: the PC may still be generating, and it serves one request at a time.",
        url=url, **context,
    )


def connection_error(url: str, base_url: str, reason: str, *, attempts: int, connect_timeout: float | None,
                     proxy_failed: bool) -> ModelConnectionError:
    """The connection was never made (``reason`` says why): the checks that find the cause."""
    port = urlsplit(url).port or (443 if url.startswith("https:") else 80)
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    timeout = f" within API_CONNECT_TIMEOUT={connect_timeout:g}s" if connect_timeout is not None else ""
    checks = [
        f"Is the model server running on the PC (and listening on port {port})?",
        f"Is PC_IP / API_BASE_URL right? (tried {base_url})",
        f"Is TCP port {port} open in the Windows firewall for the LAN (setup_firewall.ps1)?",
    ]
    if proxy_failed:
        checks.insert(0, "Unset HTTP_PROXY or set API_USE_ENV_PROXY=false (the default).")
    return ModelConnectionError(
        f"Cannot connect to the model server at {url}: {reason}{timeout}{tries}.",
        hint="Check:\n  - " + "\n  - ".join(checks), url=url,
    )


def disconnected(url: str, detail: str) -> ModelDisconnectedError:
    """The connection broke after the request was sent: it may have reached the model."""
    # "Not sent again" is the hint's: a pool asked to resend such a request logs the message alone.
    return ModelDisconnectedError(
        f"The model server at {url} closed the connection without answering ({shorten(detail, 160)}): "
        "the request may have reached it.",
        hint="It was not sent again, so that the PC does not generate it twice. Check the PC server's console "
        "(did it crash or restart?), then try again.", url=url,
    )


def too_big(url: str, status: int, limit: int, announced: int | None = None) -> BadResponseError:
    """A whole answer over ``API_MAX_RESPONSE_BYTES``: announced by its Content-Length, or found while reading."""
    what = (f"it announced {announced:,} bytes, more than API_MAX_RESPONSE_BYTES={limit:,} accepts; it was not read"
            if announced is not None else
            f"it went past API_MAX_RESPONSE_BYTES={limit:,} bytes; what had arrived was discarded, the rest not read")
    return BadResponseError(
        f"The answer from {url} is too large: {what}.",
        hint="Raise API_MAX_RESPONSE_BYTES if answers this large are expected, or lower MAX_NEW_TOKENS.",
        url=url, status=status,
    )


def cut_off(url: str, status: int, detail: str) -> BadResponseError:
    """A whole answer whose connection broke while it was being read."""
    return BadResponseError(
        f"The answer from {url} was cut off or garbled in transit: {shorten(detail, 160)}.",
        hint="Check the PC server's console (did it crash mid-answer?) and try again.", url=url, status=status,
    )


def line_too_long(max_line: int, size: int, *, url: str, **context: Any) -> BadResponseError:
    """A streamed line over the line cap: not a model server's stream of events."""
    return BadResponseError(
        f"The stream from {url} sent a line of more than {max_line:,} bytes without a newline "
        f"({size:,} so far): not a model server's stream of events.",
        hint="Check that API_BASE_URL points at the model server and API_PROTOCOL matches it.", url=url, **context)


def stream_too_long(limit: float, chars: int, *, url: str, **context: Any) -> ModelTimeoutError:
    """A stream that ran past ``API_STREAM_MAX_SECONDS``; the partial answer travels with the error."""
    return ModelTimeoutError(
        f"The stream from {url} ran longer than API_STREAM_MAX_SECONDS={limit:g}s; it was stopped after "
        f"{chars} characters of the answer.",
        hint="The partial answer was kept. Raise API_STREAM_MAX_SECONDS (0 = no limit) or lower MAX_NEW_TOKENS.",
        url=url, **context)


def stream_cut(detail: str, chars: int, *, url: str, **context: Any) -> BadResponseError:
    """A stream whose connection broke; the partial answer travels with the error."""
    return BadResponseError(
        f"The stream from {url} ended early: the connection broke ({shorten(detail, 120)}), after "
        f"{chars} characters of the answer.",
        hint="The partial answer was kept. Check the PC server's console; try again.", url=url, **context)


def read_too_slow(url: str, status: int, setting: str, value: float, size: int, deadline: bool) -> ModelTimeoutError:
    """A whole answer not read in time: the deadline passed while it arrived, or the server fell silent."""
    if deadline:
        arrived = "1 byte had" if size == 1 else f"{size:,} bytes had"
        what = (f"was still sending its answer when {setting}={value:g}s ran out ({arrived} arrived; "
                "discarded)")
    else:
        what = f"started answering but then sent nothing for the read timeout of {setting}={value:g}s"
    return timeout_error(setting, value, what, url=url, status=status)


def no_answer(url: str, setting: str, value: float) -> ModelTimeoutError:
    """The server accepted the request and then said nothing within the read timeout."""
    return timeout_error(setting, value, "accepted the request but sent no answer within the read timeout "
                         f"of {setting}={value:g}s", url=url)


def stream_silent(value: float, *, url: str, **context: Any) -> ModelTimeoutError:
    """A stream that fell silent for ``API_TIMEOUT`` between two pieces."""
    return timeout_error("API_TIMEOUT", value, "accepted the request but then sent nothing for the read timeout "
                         f"of API_TIMEOUT={value:g}s between two pieces", url=url, **context)
