"""HTTP to one model server: with :mod:`http_reply`, the only modules that import ``requests`` and ``urllib3``.

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
* **TLS.** An https server is verified against the system's CAs, certifi's and the options'
  ``ca_bundle`` (one ``ssl.SSLContext`` from :mod:`tls` on each adapter); never turned off.
* **Credentials in clear** (``API_KEY``, URL passwords) to another machine over plain HTTP: one
  warning when the transport is built (:mod:`link_safety`).
* **Errors** leave as the project's own (worded in :mod:`transport_errors`), with ``url=`` and,
  for streams, the partial answer and the stats so far.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import time
import weakref
from typing import Any, Callable, Mapping

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

import link_safety
import tls
import transport_errors
from errors import ModelConnectionError, ModelTimeoutError
from http_bodies import decode, shorten
from http_reply import Reply, connect_phase, connect_reason, read_timed_out, tls_cause  # noqa: F401
from masking import mask_url_password
from retry_policy import GATEWAY_STATUSES, RETRY_STATUSES, backoff

# Re-exported: callers import these from here.
from transport_errors import timeout_error  # noqa: F401
from transport_options import DEFAULT_MAX_RESPONSE_BYTES, TransportOptions  # noqa: F401

logger = logging.getLogger(__name__)

USER_AGENT = "laptop-model-api-client/1.0 " + requests.utils.default_user_agent()

Sleep = Callable[[float], None]
Clock = Callable[[], float]


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


class _TrustAdapter(HTTPAdapter):
    """An adapter whose HTTPS connections verify against one ``ssl.SSLContext`` (:func:`tls.trust_context`),
    through requests' subclassing hooks; ``None`` keeps requests' own verification."""

    def __init__(self, ssl_context: ssl.SSLContext | None, **kwargs: Any) -> None:
        self._ssl_context = ssl_context  # before super().__init__, which builds the pool manager
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **pool_kwargs: Any) -> None:
        if self._ssl_context is not None:
            pool_kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(*args, **pool_kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        if self._ssl_context is not None:
            proxy_kwargs.setdefault("ssl_context", self._ssl_context)
        return super().proxy_manager_for(proxy, **proxy_kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)
        if self._ssl_context is not None and verify is True:
            # The context already holds every CA to trust; left set, certifi's file would be
            # loaded into it again for every new connection.
            conn.ca_certs = conn.ca_cert_dir = None


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
        self.base_url = base_url.rstrip("/")  # sent as is: a user:password@ in it becomes basic auth
        # What messages, logs and replies name: a password in the URL never reaches them, whoever
        # reads them (the command line masks its own output; a script calling us does not).
        self.display_url = mask_url_password(self.base_url)
        self.options = options or TransportOptions()
        self._sleep = sleep
        self._clock = clock
        self._rand = rand
        self._local = threading.local()
        # Every thread's sessions, for close(); weak, so a finished thread's session goes with it.
        self._sessions: weakref.WeakSet[requests.Session] = weakref.WeakSet()
        self._lock = threading.Lock()
        warning = link_safety.credential_warning(self.base_url, bool(self.options.api_key))
        if warning and link_safety.first_time(warning):  # once per run and server (--check says it itself)
            logger.warning("%s%s", warning[0].upper(), warning[1:])

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
        retry = _ConnectRetry(total=None, connect=connect_retries, read=False, redirect=0, status=0, other=0,
                              raise_on_status=False)
        retry.pause = self._sleep
        retry.schedule = lambda attempt: options.retry.backoff(attempt, self._rand)
        retry.target = self.display_url
        retry.retrying = self._attempt_starts
        # https: verified against the system's CAs, certifi's and the CA bundle; ConfigError for a bad bundle.
        context = tls.trust_context(options.ca_bundle) if self.base_url.lower().startswith("https:") else None
        adapter = _TrustAdapter(context, max_retries=retry)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        logger.debug("Proxy settings from the environment (HTTP_PROXY, NO_PROXY ...) for %s: %s", self.display_url,
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
        url, shown = self.base_url + path, self.display_url + path
        attempts = max(1, attempts or self.options.retry.max_attempts)
        data = json.dumps(body, ensure_ascii=False).encode("utf-8") if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if stream:
            headers["Accept"] = "text/event-stream, application/x-ndjson"
        gateway_retries = 0
        attempt = 0
        while True:
            attempt += 1
            reply = self._send(method, url, shown, data, headers, stream=stream, health=health, attempt=attempt,
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
                           method, shown, reply.status, attempt, attempts, delay, why)
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

    def _send(self, method: str, url: str, shown: str, data: bytes | None, headers: dict[str, str], *, stream: bool,
              health: bool, attempt: int, attempts: int) -> Reply | None:
        """One send of ``url`` (urllib3 retrying the connection); None for a dropped GET worth retrying.
        ``shown`` is the URL for messages and the reply (its password masked)."""
        logger.info("%s %s (%d bytes)%s", method, shown, len(data or b""), " streaming" if stream else "")
        if data is not None and logger.isEnabledFor(logging.DEBUG):  # a prompt can be 70 KB
            logger.debug("Request body: %s", shorten(decode(data), 500))
        timeouts = self._timeouts(health)
        connect_retries = attempts - 1
        self._attempt_starts()
        try:
            response = self._request(self._session(connect_retries), method, url, data, headers, timeouts)
        except requests.exceptions.SSLError as exc:  # the handshake failed: nothing was sent
            raise tls.tls_error(shown, tls_cause(exc), self.options.ca_bundle) from exc
        except requests.ConnectionError as exc:
            # ConnectTimeout and ProxyError are ConnectionErrors too; a ReadTimeout is not. A
            # connection dropped after the request was sent may have reached the model: a GET is
            # retried, a POST (a generation) is not.
            if connect_phase(exc):
                raise self._connection_error(shown, exc, connect_retries + 1) from exc
            if method == "GET" and attempt < attempts:
                return None
            raise transport_errors.disconnected(shown, str(exc)) from exc
        except requests.Timeout as exc:  # ReadTimeout: the request reached the server
            raise self._timeout_error(shown, health) from exc
        except requests.RequestException as exc:
            raise ModelConnectionError(f"The request to {shown} failed: {shorten(str(exc))}.", url=shown) from exc
        started = self._local.attempt_started
        if stream and not health:
            limit = self.options.stream_max_seconds
            deadline = started + limit if limit > 0 else None
        else:
            deadline = started + timeouts[1]
        setting = ("API_HEALTH_TIMEOUT", timeouts[1]) if health else ("API_TIMEOUT", timeouts[1])
        return Reply(response, url=shown, attempts=attempt, deadline=deadline, options=self.options,
                     clock=self._clock, timeout_setting=setting)

    def _request(self, session: requests.Session, method: str, url: str, data: bytes | None,
                 headers: dict[str, str], timeouts: tuple[float, float]) -> requests.Response:
        """``session.request(...)`` at a fraction of its CPU cost, for the thousands of POSTs of a run.

        The request prepared for a method, URL and headers is kept (this thread's) and copied with
        the body, and sent straight through the session's adapter: no re-preparing (~0.2 ms each),
        no hooks, no redirect handling. Only while that is the same thing as ``session.request``:
        ``trust_env`` off (the default) and no cookies yet (a cookie the server sets is kept, and
        later requests go the usual way); a redirect is followed as ``session.request`` follows it.
        """
        if session.trust_env or session.cookies:
            return session.request(method, url, data=data, headers=headers, timeout=timeouts, stream=True)
        prepared_by_key: dict[tuple[Any, ...], requests.PreparedRequest] = self._local.__dict__.setdefault(
            "prepared", {})
        key = (id(session), method, url, tuple(headers.items()))
        template = prepared_by_key.get(key)
        if template is None:
            template = prepared_by_key[key] = session.prepare_request(requests.Request(method, url, headers=headers))
        prepared = template.copy()
        if data is not None:
            prepared.body = data
            prepared.headers["Content-Length"] = str(len(data))
        response = session.get_adapter(url).send(prepared, timeout=timeouts, stream=True)
        if "set-cookie" in response.headers:  # kept as requests keeps it; the next requests carry it
            requests.cookies.extract_cookies_to_jar(session.cookies, prepared, response.raw)
        if response.is_redirect:  # rare, and nothing was generated there: follow it as requests would
            for response in session.resolve_redirects(response, prepared, stream=True, timeout=timeouts):
                pass
        return response

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
        timeout = self.options.connect_timeout if isinstance(exc, requests.ConnectTimeout) else None
        return transport_errors.connection_error(
            url, self.display_url, connect_reason(exc), attempts=attempts, connect_timeout=timeout,
            proxy_failed=isinstance(exc, requests.exceptions.ProxyError))

    def _timeout_error(self, url: str, health: bool) -> ModelTimeoutError:
        setting, value = ("API_HEALTH_TIMEOUT", self.options.health_timeout) if health else (
            "API_TIMEOUT", self.options.read_timeout)
        return transport_errors.no_answer(url, setting, value)
