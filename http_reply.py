"""Reading a model server's response: the other half of the transport (:mod:`http_transport`).

:class:`Reply` holds a response's status and headers at once and reads its body on demand:
whole, within the answer's deadline and ``API_MAX_RESPONSE_BYTES``, or as a stream of lines
split in linear time. The helpers below read ``requests``' and ``urllib3``'s exceptions (which
phase failed: the connection, or a read). This module and :mod:`http_transport` are the only
ones that import ``requests`` and ``urllib3``.
"""

from __future__ import annotations

import json
import ssl
from typing import Any, Callable, Iterator, Mapping

import requests
import urllib3.exceptions
from urllib3.util.ssl_match_hostname import CertificateError

import transport_errors
from errors import ModelAPIError
from http_bodies import MAX_LINE_BYTES, LineSplitter, decode, shorten
from transport_options import TransportOptions

Clock = Callable[[], float]


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    """The exception and what it wraps (requests and urllib3 nest the socket error a few levels deep)."""
    for _ in range(8):
        if exc is None:
            return
        yield exc
        if isinstance(exc, urllib3.exceptions.MaxRetryError):
            exc = exc.reason
        elif exc.args and isinstance(exc.args[0], BaseException):
            exc = exc.args[0]
        else:
            exc = exc.__cause__ or exc.__context__


def connect_phase(exc: BaseException | None) -> bool:
    """True when the request never left: refused, DNS failure, connect timeout, proxy refused."""
    kinds = (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError,
             urllib3.exceptions.ProxyError, ConnectionRefusedError)
    return any(isinstance(seen, kinds) for seen in _causes(exc))


def read_timed_out(exc: BaseException) -> bool:
    """A read timeout, also when it is reported as ConnectionError("Read timed out")."""
    kinds = (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError, TimeoutError)
    return any(isinstance(seen, kinds) for seen in _causes(exc))


def tls_cause(exc: BaseException) -> BaseException:
    """The ``ssl`` error (or urllib3's host name mismatch) inside a requests SSLError."""
    kinds = (ssl.SSLError, CertificateError)
    return next((seen for seen in _causes(exc) if isinstance(seen, kinds)), exc)


def connect_reason(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, (requests.exceptions.ProxyError, urllib3.exceptions.ProxyError)):
        return "the proxy from the environment (HTTP_PROXY/HTTPS_PROXY) failed"
    if isinstance(exc, requests.ConnectTimeout) or (
        isinstance(exc, urllib3.exceptions.ConnectTimeoutError)
        and not isinstance(exc, urllib3.exceptions.NewConnectionError)
    ):
        return "no answer to the connection attempt"
    if "Name or service not known" in text or "NameResolution" in text or "getaddrinfo" in text:
        return "the host name could not be resolved"
    if "refused" in text.lower():
        return "connection refused: nothing is listening on that port"
    return shorten(text, 160)


class _DeadlinePassed(Exception):
    """Internal: the answer's deadline passed before the next read (turned into the timeout error)."""


class Reply:
    """A response from the server: status and headers at once, the body read on demand.

    Non-streamed requests and error statuses come back with the body already read (``body``);
    a streamed 2xx answer is read with :meth:`lines` (or :meth:`read`, for a server that
    answered JSON instead of a stream) and must be closed.
    """

    def __init__(self, response: requests.Response, *, url: str, attempts: int, deadline: float | None,
                 options: TransportOptions, clock: Clock, timeout_setting: tuple[str, float]) -> None:
        self._response = response
        self.url = url
        self.status: int = response.status_code
        self.reason: str = response.reason or ""
        self.headers: Mapping[str, str] = response.headers
        self.attempts = attempts  # sends it took, retries on status included
        self.body: bytes | None = None
        self._deadline = deadline
        self._options = options
        self._clock = clock
        self._timeout_setting = timeout_setting

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    def text(self) -> str:
        """The body decoded as UTF-8 (read first if needed)."""
        return decode(self.read())

    def json(self) -> Any:
        """The body parsed as JSON, or None when it is empty or not JSON."""
        text = self.text()
        try:
            return json.loads(text) if text.strip() else None
        except ValueError:
            return None

    def close(self) -> None:
        self._response.close()

    def _chunks(self, size: int) -> Iterator[bytes]:
        """The body's bytes as they arrive. A chunked body comes chunk by chunk; any other body
        (no length, ended by closing the connection) through ``read1``, which returns what has
        arrived instead of waiting for a full block. Each read waits at most until the deadline."""
        raw = self._response.raw
        if raw.chunked and raw.supports_chunked_reads():
            pieces = raw.read_chunked(size, decode_content=True)
            while True:
                self._bound_next_wait()
                data = next(pieces, None)
                if data is None:
                    return
                yield data
        while True:
            self._bound_next_wait()
            data = raw.read1(size, decode_content=True)
            if not data:
                return
            yield data

    def _bound_next_wait(self) -> None:
        """Let the next socket read wait no longer than the deadline leaves.

        The socket's timeout is the read timeout, the longest silence allowed; checked only
        as data arrives, a deadline could be overrun by one whole read timeout (a server
        sending a byte just before each timeout took twice API_TIMEOUT). Raises the deadline's
        error once it has passed.
        """
        if self._deadline is None:
            return
        left = self._deadline - self._clock()
        if left <= 0:
            raise _DeadlinePassed()
        connection = getattr(self._response.raw, "connection", None)  # urllib3's HTTPConnection
        sock = getattr(connection, "sock", None)
        if sock is not None:
            sock.settimeout(min(self._timeout_setting[1], left))

    def _past_deadline(self) -> bool:
        return self._deadline is not None and self._clock() >= self._deadline - 0.001

    def read(self) -> bytes:
        """The whole body, within the deadline and ``API_MAX_RESPONSE_BYTES``."""
        if self.body is not None:
            return self.body
        limit = self._options.max_response_bytes
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            self.close()
            raise self._too_big(int(length))
        parts: list[bytes] = []
        size = 0
        try:
            for chunk in self._chunks(65536):
                size += len(chunk)
                if size > limit:
                    raise self._too_big()
                parts.append(chunk)
        except _DeadlinePassed:
            self.close()
            raise self._read_failure(None, size) from None
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            self.close()
            if read_timed_out(exc) and self._past_deadline():
                raise self._read_failure(None, size) from exc
            raise self._read_failure(exc) from exc
        except BaseException:
            self.close()
            raise
        self.body = b"".join(parts)
        return self.body

    def lines(self, progress: Any = None) -> Iterator[str]:
        """A streamed body's lines, decoded. ``progress`` (a ``generation.StreamProgress``) gives
        the partial answer and stats that errors raised here carry."""

        def context() -> dict[str, Any]:
            if progress is None:
                return {"url": self.url}
            return {"url": self.url, "partial_text": progress.text(), "stats": progress.stats}

        max_line = min(MAX_LINE_BYTES, self._options.max_response_bytes)

        def too_long(size: int) -> ModelAPIError:
            return transport_errors.line_too_long(max_line, size, **context())

        def too_slow() -> ModelAPIError:
            return transport_errors.stream_too_long(self._options.stream_max_seconds,
                                                    len(context().get("partial_text", "")), **context())

        splitter = LineSplitter(max_line, too_long)
        try:
            for chunk in self._chunks(8192):
                yield from map(decode, splitter.feed(chunk))
            rest = splitter.finish()
            if rest.strip():
                yield decode(rest)
        except _DeadlinePassed:
            raise too_slow() from None
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            if read_timed_out(exc) and self._past_deadline():
                raise too_slow() from exc
            if read_timed_out(exc):
                raise transport_errors.stream_silent(self._options.read_timeout, **context()) from exc
            raise transport_errors.stream_cut(str(exc), len(context().get("partial_text", "")),
                                              **context()) from exc

    # --- errors ---

    def _too_big(self, announced: int | None = None) -> ModelAPIError:
        return transport_errors.too_big(self.url, self.status, self._options.max_response_bytes, announced)

    def _read_failure(self, exc: BaseException | None, size: int = 0) -> ModelAPIError:
        """The whole-body read failed: the deadline passed (``exc`` None), silence, or a broken connection."""
        if exc is not None and not read_timed_out(exc):
            return transport_errors.cut_off(self.url, self.status, str(exc))
        return transport_errors.read_too_slow(self.url, self.status, *self._timeout_setting, size, exc is None)
