"""HTTP to one model server: the only module that imports ``requests`` and ``urllib3``.

* **One ``requests.Session`` per thread** (sessions are not safe to share), so one transport
  serves many worker threads at once. ``trust_env`` is off unless ``API_USE_ENV_PROXY``:
  requests applies a corporate ``HTTP_PROXY`` even to LAN and loopback addresses, and
  ``NO_PROXY=localhost`` does not cover ``127.0.0.1``.
* **Timeouts** ``(API_CONNECT_TIMEOUT, API_TIMEOUT)``: an unreachable PC fails within seconds.
  A non-streamed answer must also *finish* within ``API_TIMEOUT`` from sending the request (the
  body is read in pieces against that deadline, so a server trickling bytes cannot keep it
  alive forever). A stream allows ``API_TIMEOUT`` of silence between pieces and, optionally,
  ``API_STREAM_MAX_SECONDS`` in all.
* **Retries.** Failures before the request left (refused, DNS, connect timeout) are retried by
  urllib3's ``Retry`` on the mounted adapter, for any method: nothing reached the model. Read
  errors are never retried (a POST that timed out may still be generating on the PC). Statuses
  follow :mod:`retry_policy`. Sleep and clock are constructor arguments: tests need not wait.
* **Bounded reading.** A body over ``API_MAX_RESPONSE_BYTES`` is refused; streamed lines are
  split in linear time, each at most ``MAX_LINE_BYTES`` (:class:`http_bodies.LineSplitter`).
* **Errors** leave as the project's own, with ``url=`` and, for streams, the partial answer
  and the stats so far.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from errors import BadResponseError, ModelAPIError, ModelConnectionError, ModelDisconnectedError, ModelTimeoutError
from http_bodies import MAX_LINE_BYTES, LineSplitter, decode, shorten
from retry_policy import GATEWAY_STATUSES, RETRY_STATUSES, RetryPolicy, backoff

logger = logging.getLogger(__name__)

DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
USER_AGENT = "laptop-model-api-client/1.0 " + requests.utils.default_user_agent()

Sleep = Callable[[float], None]
Clock = Callable[[], float]


@dataclass(frozen=True)
class TransportOptions:
    """How to talk to one server. Field names follow the settings they come from."""

    connect_timeout: float = 5.0  # API_CONNECT_TIMEOUT
    read_timeout: float = 300.0  # API_TIMEOUT: whole non-streamed answer; silence between streamed pieces
    health_timeout: float = 5.0  # API_HEALTH_TIMEOUT: probes and health checks
    retry: RetryPolicy = field(default_factory=RetryPolicy)  # API_MAX_ATTEMPTS, API_RETRY_AFTER_MAX
    use_env_proxy: bool = False  # API_USE_ENV_PROXY
    api_key: str | None = None  # API_KEY, sent as a bearer token; never logged
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES  # API_MAX_RESPONSE_BYTES
    stream_max_seconds: float = 0.0  # API_STREAM_MAX_SECONDS; 0 = no total limit for a stream
    # TLS: a CA bundle (PEM file) that signs this server's certificate; None = the system's store.
    ca_bundle: str | None = None


class _ConnectRetry(Retry):
    """urllib3's ``Retry`` for connection failures, through public hooks only: ``get_backoff_time``
    (our schedule, from the first retry on), ``sleep`` (the injected sleep, one log line per retry)
    and ``new`` (urllib3 makes a new object per retry: the hooks travel along)."""

    pause: Sleep = staticmethod(time.sleep)
    schedule: Callable[[int], float] = staticmethod(backoff)
    retrying: Callable[[], None] = staticmethod(lambda: None)  # called as each new attempt starts
    target: str = ""

    def new(self, **kw: Any) -> _ConnectRetry:
        retry = super().new(**kw)
        for hook in ("pause", "schedule", "retrying", "target"):
            setattr(retry, hook, getattr(self, hook))
        return retry

    def get_backoff_time(self) -> float:
        failures = len(self.history)
        return self.schedule(failures - 1) if failures else 0.0

    def sleep(self, response: Any = None) -> None:
        delay = self.get_backoff_time()
        error = self.history[-1].error if self.history else None
        logger.warning("Connecting to %s failed (%s); retry %d, in %.1f s",
                       self.target, connect_reason(error) if error else "?", len(self.history), delay)
        if delay > 0:
            self.pause(delay)
        self.retrying()


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
        arrived instead of waiting for a full block."""
        raw = self._response.raw
        if raw.chunked and raw.supports_chunked_reads():
            yield from raw.read_chunked(size, decode_content=True)
            return
        while True:
            data = raw.read1(size, decode_content=True)
            if not data:
                return
            yield data

    def read(self) -> bytes:
        """The whole body, within the deadline and ``API_MAX_RESPONSE_BYTES``."""
        if self.body is not None:
            return self.body
        limit = self._options.max_response_bytes
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            self.close()
            raise self._too_big(f"announced {int(length):,} bytes")
        parts: list[bytes] = []
        size = 0
        try:
            for chunk in self._chunks(65536):
                size += len(chunk)
                if size > limit:
                    raise self._too_big(f"sent more than {limit:,} bytes")
                parts.append(chunk)
                if self._deadline is not None and self._clock() > self._deadline:
                    raise self._read_failure(None, size)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            self.close()
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

        def too_long(size: int) -> BadResponseError:
            return BadResponseError(
                f"The stream from {self.url} sent a line of more than {max_line:,} bytes without a newline "
                f"({size:,} so far): not a model server's stream of events.",
                hint="Check that API_BASE_URL points at the model server and API_PROTOCOL matches it.", **context())

        splitter = LineSplitter(max_line, too_long)
        try:
            for chunk in self._chunks(8192):
                yield from map(decode, splitter.feed(chunk))
                if self._deadline is not None and self._clock() > self._deadline:
                    limit = self._options.stream_max_seconds
                    raise ModelTimeoutError(
                        f"The stream from {self.url} ran longer than API_STREAM_MAX_SECONDS={limit:g}s; it was "
                        f"stopped after {len(context().get('partial_text', ''))} characters of the answer.",
                        hint="The partial answer was kept. Raise API_STREAM_MAX_SECONDS (0 = no limit) or lower "
                        "MAX_NEW_TOKENS.", **context())
            rest = splitter.finish()
            if rest.strip():
                yield decode(rest)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            if read_timed_out(exc):
                value = self._options.read_timeout
                raise timeout_error("API_TIMEOUT", value, "accepted the request but then sent nothing for the "
                                    f"read timeout of API_TIMEOUT={value:g}s between two pieces", **context()) from exc
            raise BadResponseError(
                f"The stream from {self.url} ended early: the connection broke ({shorten(str(exc), 120)}), after "
                f"{len(context().get('partial_text', ''))} characters of the answer.",
                hint="The partial answer was kept. Check the PC server's console; try again.", **context(),
            ) from exc

    # --- errors ---

    def _too_big(self, what: str) -> BadResponseError:
        return BadResponseError(
            f"The answer from {self.url} is too large: it {what}, more than API_MAX_RESPONSE_BYTES="
            f"{self._options.max_response_bytes:,} accepts; it was not read.",
            hint="Raise API_MAX_RESPONSE_BYTES if answers this large are expected, or lower MAX_NEW_TOKENS.",
            url=self.url, status=self.status,
        )

    def _read_failure(self, exc: BaseException | None, size: int = 0) -> ModelAPIError:
        """The whole-body read failed: the deadline passed (``exc`` None), silence, or a broken connection."""
        setting, value = self._timeout_setting
        if exc is None:
            what = (f"was still sending its answer when {setting}={value:g}s ran out ({size:,} bytes had arrived; "
                    "they were discarded)")
            return timeout_error(setting, value, what, url=self.url, status=self.status)
        if read_timed_out(exc):
            what = f"started answering but then sent nothing for the read timeout of {setting}={value:g}s"
            return timeout_error(setting, value, what, url=self.url, status=self.status)
        return BadResponseError(
            f"The answer from {self.url} was cut off or garbled in transit: {shorten(str(exc), 160)}.",
            hint="Check the PC server's console (did it crash mid-answer?) and try again.",
            url=self.url, status=self.status,
        )


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


class HttpTransport:
    """HTTP to one server's base URL, safe to use from many threads at once.

    Args:
        base_url: the server's root URL (no trailing ``/``); request paths are appended.
        options: timeouts, retry policy and limits (:class:`TransportOptions`).
        sleep: how to wait between attempts (default ``time.sleep``); tests pass a recorder.
        clock: monotonic seconds (default ``time.monotonic``), for deadlines and timings.
        rand: jitter source in [0, 1) (default ``random.random``).
    """

    def __init__(self, base_url: str, options: TransportOptions | None = None, *, sleep: Sleep = time.sleep,
                 clock: Clock = time.monotonic, rand: Callable[[], float] = random.random) -> None:
        self.base_url = base_url.rstrip("/")
        self.options = options or TransportOptions()
        self._sleep = sleep
        self._clock = clock
        self._rand = rand
        self._local = threading.local()
        # Every thread's sessions, for close(); weak, so a finished thread's session goes with it.
        self._sessions: weakref.WeakSet[requests.Session] = weakref.WeakSet()
        self._lock = threading.Lock()

    # --- sessions ---

    def _session(self, connect_retries: int) -> requests.Session:
        """This thread's session for that many connect retries (the retry policy is per adapter)."""
        sessions: dict[int, requests.Session] = self._local.__dict__.setdefault("sessions", {})
        session = sessions.get(connect_retries)
        if session is None:
            session = sessions[connect_retries] = self._new_session(connect_retries)
            with self._lock:
                self._sessions.add(session)
        return session

    def _new_session(self, connect_retries: int) -> requests.Session:
        options = self.options
        session = requests.Session()
        session.trust_env = options.use_env_proxy
        session.headers["User-Agent"] = USER_AGENT
        if options.api_key:
            session.headers["Authorization"] = f"Bearer {options.api_key}"
        # TLS settings for this server go here (one CA bundle per server).
        if options.ca_bundle:
            session.verify = options.ca_bundle
        retry = _ConnectRetry(total=None, connect=connect_retries, read=False, redirect=0, status=0, other=0,
                              raise_on_status=False)
        retry.pause = self._sleep
        retry.schedule = lambda attempt: options.retry.backoff(attempt, self._rand)
        retry.target = self.base_url
        retry.retrying = self._attempt_starts
        adapter = HTTPAdapter(max_retries=retry)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        logger.debug("Proxy settings from the environment (HTTP_PROXY, NO_PROXY ...) for %s: %s", self.base_url,
                     requests.utils.get_environ_proxies(self.base_url) or "none set" if options.use_env_proxy
                     else "ignored; set API_USE_ENV_PROXY=true to use them")
        return session

    def _attempt_starts(self) -> None:
        # Deadlines count from the attempt that got through, not from the refused ones before it.
        self._local.attempt_started = self._clock()

    def close(self) -> None:
        """Close every thread's session (their keep-alive connections)."""
        with self._lock:
            sessions, self._sessions = list(self._sessions), weakref.WeakSet()
        for session in sessions:
            session.close()
        self._local = threading.local()

    def __enter__(self) -> HttpTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- requests ---

    def get(self, path: str, *, attempts: int = 1) -> Reply:
        """A GET for detection or health (``API_HEALTH_TIMEOUT``, no retry on a status), body read.

        Returns any status; raises ModelConnectionError or ModelTimeoutError.
        """
        return self.request("GET", path, attempts=attempts)

    def post(self, path: str, body: Mapping[str, Any], *, stream: bool = False,
             give_up: Callable[[Reply], bool] | None = None) -> Reply:
        """A generation POST with the retry policy. ``give_up(reply)`` says that a retryable
        status cannot be cured by retrying (the PC server's failed model load)."""
        return self.request("POST", path, body, stream=stream, give_up=give_up)

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None, *, stream: bool = False,
                attempts: int | None = None, give_up: Callable[[Reply], bool] | None = None) -> Reply:
        """Send with the retry policy; return the reply (any status) or raise a ModelAPIError.

        A GET is a probe: health timeouts, and its status is the answer. The body of the reply is
        read unless ``stream`` is set and the status is 2xx.
        """
        health = method == "GET"
        statuses = frozenset() if health else RETRY_STATUSES
        url = self.base_url + path
        attempts = max(1, attempts or self.options.retry.max_attempts)
        data = json.dumps(body, ensure_ascii=False).encode("utf-8") if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if stream:
            headers["Accept"] = "text/event-stream, application/x-ndjson"
        gateway_retries = 0
        attempt = 0
        while True:
            attempt += 1
            reply = self._send(method, url, data, headers, stream=stream, health=health, attempt=attempt,
                               attempts=attempts)
            if reply is None:  # a dropped GET: retried like a refused connection
                self._pause(self.options.retry.backoff(attempt - 1, self._rand))
                continue
            wait = self._status_wait(reply, attempt, attempts, gateway_retries, statuses, give_up)
            if wait is None:
                if not stream or reply.status >= 300:
                    reply.read()
                self._log_reply(method, reply)
                return reply
            delay, why = wait
            gateway_retries += reply.status in GATEWAY_STATUSES
            logger.warning("%s %s answered %s; attempt %d/%d, retrying in %.1f s (%s)",
                           method, url, reply.status, attempt, attempts, delay, why)
            reply.close()
            self._pause(delay)

    def _pause(self, delay: float) -> None:
        if delay > 0:
            self._sleep(delay)

    def _timeouts(self, health: bool) -> tuple[float, float]:
        o = self.options
        if health:
            return (min(o.connect_timeout, o.health_timeout), o.health_timeout)
        return (o.connect_timeout, o.read_timeout)

    def _send(self, method: str, url: str, data: bytes | None, headers: dict[str, str], *, stream: bool,
              health: bool, attempt: int, attempts: int) -> Reply | None:
        """One send (urllib3 retrying the connection); None for a dropped GET worth retrying."""
        logger.info("%s %s (%d bytes)%s", method, url, len(data or b""), " streaming" if stream else "")
        if data is not None and logger.isEnabledFor(logging.DEBUG):  # a prompt can be 70 KB
            logger.debug("Request body: %s", shorten(decode(data), 500))
        timeouts = self._timeouts(health)
        connect_retries = attempts - 1
        self._attempt_starts()
        try:
            response = self._request(self._session(connect_retries), method, url, data, headers, timeouts)
        except requests.ConnectionError as exc:
            # ConnectTimeout and ProxyError are ConnectionErrors too; a ReadTimeout is not. A
            # connection dropped after the request was sent may have reached the model: a GET is
            # retried, a POST (a generation) is not.
            if connect_phase(exc):
                raise self._connection_error(url, exc, connect_retries + 1) from exc
            if method == "GET" and attempt < attempts:
                return None
            raise ModelDisconnectedError(
                f"The model server at {url} closed the connection without answering ({shorten(str(exc), 160)}). "
                "The request may have reached it, so it was not retried.",
                hint="Check the PC server's console (did it crash or restart?), then try again.", url=url,
            ) from exc
        except requests.Timeout as exc:  # ReadTimeout: the request reached the server
            raise self._timeout_error(url, health) from exc
        except requests.RequestException as exc:
            raise ModelConnectionError(f"The request to {url} failed: {shorten(str(exc))}.", url=url) from exc
        started = self._local.attempt_started
        if stream and not health:
            limit = self.options.stream_max_seconds
            deadline = started + limit if limit > 0 else None
        else:
            deadline = started + timeouts[1]
        setting = ("API_HEALTH_TIMEOUT", timeouts[1]) if health else ("API_TIMEOUT", timeouts[1])
        return Reply(response, url=url, attempts=attempt, deadline=deadline, options=self.options,
                     clock=self._clock, timeout_setting=setting)

    @staticmethod
    def _request(session: requests.Session, method: str, url: str, data: bytes | None, headers: dict[str, str],
                 timeouts: tuple[float, float]) -> requests.Response:
        """``session.request(...)`` without re-preparing the same request (~0.2 ms of CPU each): the
        prepared request per method, URL and headers is kept on the session and copied with the
        body. Only while that is the same thing: ``trust_env`` off (the default) and no cookies."""
        if session.trust_env or session.cookies:
            return session.request(method, url, data=data, headers=headers, timeout=timeouts, stream=True)
        cache: dict[tuple[Any, ...], requests.PreparedRequest] = session.__dict__.setdefault("_pipeline_prepared", {})
        key = (method, url, tuple(headers.items()))
        template = cache.get(key)
        if template is None:
            template = cache[key] = session.prepare_request(requests.Request(method, url, headers=headers))
        prepared = template.copy()
        if data is not None:
            prepared.body = data
            prepared.headers["Content-Length"] = str(len(data))
        return session.send(prepared, timeout=timeouts, stream=True, allow_redirects=True)

    def _status_wait(self, reply: Reply, attempt: int, attempts: int, gateway_retries: int,
                     retry_statuses: frozenset[int], give_up: Callable[[Reply], bool] | None) -> tuple[float, str] | None:
        """(seconds to wait, why) before another attempt, or None to return this reply."""
        wait = self.options.retry.wait(reply.status, reply.headers, attempt, attempts=attempts,
                                       gateway_retries=gateway_retries, statuses=retry_statuses, rand=self._rand)
        if wait is not None and give_up is not None:
            reply.read()  # a small error body: the caller decides from its detail
            if give_up(reply):
                return None
        return wait

    def _log_reply(self, method: str, reply: Reply) -> None:
        size = "" if reply.body is None else f" ({len(reply.body)} bytes)"
        logger.info("%s from %s %s%s%s", reply.status, method, reply.url, size,
                    f" after {reply.attempts} attempts" if reply.attempts > 1 else "")
        if reply.body is not None and logger.isEnabledFor(logging.DEBUG):
            logger.debug("Response body: %s", shorten(decode(reply.body), 500))

    # --- errors ---

    def _connection_error(self, url: str, exc: BaseException, attempts: int) -> ModelConnectionError:
        reason = connect_reason(exc)
        port = urlsplit(url).port or (443 if url.startswith("https:") else 80)
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        timeout = ""
        if isinstance(exc, requests.ConnectTimeout):
            timeout = f" within API_CONNECT_TIMEOUT={self.options.connect_timeout:g}s"
        checks = [
            f"Is the model server running on the PC (and listening on port {port})?",
            f"Is PC_IP / API_BASE_URL right? (tried {self.base_url})",
            f"Is TCP port {port} open in the Windows firewall for the LAN (setup_firewall.ps1)?",
        ]
        if isinstance(exc, requests.exceptions.ProxyError):
            checks.insert(0, "Unset HTTP_PROXY or set API_USE_ENV_PROXY=false (the default).")
        return ModelConnectionError(
            f"Cannot connect to the model server at {url}: {reason}{timeout}{tries}.",
            hint="Check:\n  - " + "\n  - ".join(checks), url=url,
        )

    def _timeout_error(self, url: str, health: bool) -> ModelTimeoutError:
        setting, value = ("API_HEALTH_TIMEOUT", self.options.health_timeout) if health else (
            "API_TIMEOUT", self.options.read_timeout)
        return timeout_error(setting, value, "accepted the request but sent no answer within the read timeout "
                             f"of {setting}={value:g}s", url=url)
