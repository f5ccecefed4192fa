"""HTTP client for the model server on the PC.

Speaks three protocols (setting ``API_PROTOCOL``):

* ``pc``: the shared guide's FastAPI server (``GET /api/health``, ``POST /api/generate``);
* ``ollama``: Ollama's native API (``POST /api/chat`` with ``options.num_ctx``, NDJSON streaming);
* ``openai``: ``/v1/chat/completions`` (llama.cpp's server, vLLM, LM Studio, Ollama's ``/v1``).

``auto`` (the default) finds out which one with GET requests only, once per process
(PROTOCOLS.md section 7): a POST could start a generation on the PC.

Reliability decisions (RELIABILITY.md section 5):

* Timeouts are ``(API_CONNECT_TIMEOUT, API_TIMEOUT)``: an unreachable PC fails within seconds,
  while the read timeout, the longest silence allowed between two bytes, covers a whole
  non-streamed generation (or the gap between two streamed pieces).
* Our own retry loop, ``API_MAX_ATTEMPTS`` attempts in all, exponential backoff with jitter, on
  failures where the request never reached the model (refused, DNS, connect timeout) and on
  429/502/503/504, honouring ``Retry-After`` up to ``API_RETRY_AFTER_MAX``. Never on 400/404/422,
  and never after a read timeout: the PC may still be generating, and a retry would queue a
  second generation behind it on a one-request-at-a-time server.
* One ``requests.Session`` (keep-alive). ``session.trust_env = API_USE_ENV_PROXY`` (default off):
  a corporate ``HTTP_PROXY`` is applied by requests even to LAN and loopback addresses, and
  ``NO_PROXY=localhost`` does not cover ``127.0.0.1``, so by default the environment's proxy
  settings (and ``.netrc``, ``REQUESTS_CA_BUNDLE``) are ignored for the model server.
* Bodies, streamed ones included, are decoded as UTF-8 whatever the headers say; streams are
  split into lines as bytes first, so a Hangul character cut across network chunks stays whole.

Nothing here reads the environment at import time. The module-level functions use a default
client built lazily from :func:`config.get_settings`.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import urlsplit

import requests
import urllib3.exceptions

import config
from errors import (
    BadResponseError,
    ConfigError,
    InvalidPromptError,
    ModelAPIError,
    ModelConnectionError,
    ModelNotLoadedError,
    ModelServerError,
    ModelTimeoutError,
    PipelineError,
)

logger = logging.getLogger(__name__)

PROTOCOLS = ("pc", "ollama", "openai")
STATS_KEYS = (
    "generation_time",
    "input_tokens",
    "generated_tokens",
    "total_tokens",
    "tokens_per_second",
    "wall_time",
    "protocol",
    "model",
    "finish_reason",
)
RETRY_STATUSES = frozenset({429, 502, 503, 504})
EXCERPT_CHARS = 200
DETAIL_CHARS = 300
# The PC server's 503 when its lazy model load failed (model_api_server.py).
_PC_LOAD_FAILED = "모델을 로드할 수 없습니다"
_NOT_READY_FIX = "Wait for the PC to finish loading the model, or check the PC server's console for errors."

# Protocol found per base URL: detection runs once per process.
_detected: dict[str, tuple[str, str]] = {}
_detected_lock = threading.Lock()


def clear_detection_cache() -> None:
    """Forget every detected protocol (for tests, or after the PC server was replaced)."""
    with _detected_lock:
        _detected.clear()


@dataclass
class HealthReport:
    """What :meth:`ModelAPIClient.check_health` found. ``ok`` means: ready to generate."""

    ok: bool
    reachable: bool
    protocol: str | None = None
    model_ready: bool = False
    model_name: str | None = None
    available_models: list[str] | None = None
    detail: str = ""
    fix: str | None = None


@dataclass
class _Probe:
    """A GET used for detection or health: status and parsed JSON, never raising on status."""

    status: int | None
    body: Any = None
    text: str = ""
    timed_out: bool = False
    headers: dict[str, str] = field(default_factory=dict)


# --- small helpers ---


def _shorten(text: str, limit: int = EXCERPT_CHARS) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode(data: bytes) -> str:
    """UTF-8 whatever the Content-Type says (requests would guess ISO-8859-1 for text/*)."""
    return data.decode("utf-8", errors="replace").lstrip("\ufeff")


def _looks_like_html(text: str, content_type: str) -> bool:
    start = text.lstrip()[:100].lower()
    return "html" in content_type.lower() or start.startswith(("<!doctype", "<html", "<head", "<body"))


def _excerpt(text: str, content_type: str) -> str:
    """Describe a body that is not the expected JSON, with a short excerpt."""
    if not text.strip():
        return "an empty body"
    if _looks_like_html(text, content_type):
        title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
        named = f" titled {_shorten(title.group(1), 80)!r}" if title else ""
        return f"an HTML page{named}, not JSON: {_shorten(text)!r}"
    return f"a body that is not valid JSON ({content_type or 'no Content-Type'}): {_shorten(text)!r}"


def _error_detail(body: Any) -> str | None:
    """The server's error text: FastAPI ``detail``, OpenAI/llama.cpp ``error.message``, Ollama ``error``."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    if error:
        return str(error)
    detail = body.get("detail")
    if isinstance(detail, list):  # pydantic validation errors
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item.get('msg', item)}" if loc else str(item.get("msg", item)))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if detail:
        return str(detail)
    if body.get("message"):
        return str(body["message"])
    return None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def _scaled(value: Any, divisor: float) -> float | None:
    number = _num(value)
    return None if number is None else number / divisor


def _sum(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _retry_after(resp: requests.Response) -> float | None:
    """Seconds asked by ``retry-after-ms`` / ``Retry-After`` (seconds or HTTP-date), or None."""
    value = resp.headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _backoff(attempt: int) -> float:
    """openai-python's schedule: 0.5 s, 1 s, 2 s ... capped at 8 s, minus up to 25 % jitter."""
    return min(0.5 * 2**attempt, 8.0) * (1 - 0.25 * random.random())


def _connect_phase(exc: BaseException) -> bool:
    """True when the request never left: refused, DNS failure, connect timeout, proxy refused."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(
            seen,
            (
                urllib3.exceptions.NewConnectionError,
                urllib3.exceptions.ConnectTimeoutError,
                urllib3.exceptions.ProxyError,
                ConnectionRefusedError,
            ),
        ):
            return True
        if isinstance(seen, urllib3.exceptions.MaxRetryError):
            seen = seen.reason
        elif seen.args and isinstance(seen.args[0], BaseException):
            seen = seen.args[0]
        else:
            seen = seen.__cause__ or seen.__context__
    return False


def _read_timed_out(exc: BaseException) -> bool:
    """A read timeout, also when requests reports it as ConnectionError("Read timed out")."""
    if isinstance(exc, requests.ReadTimeout):
        return True
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            return True
        seen = seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else seen.__context__
    return False


def _connect_reason(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, requests.exceptions.ProxyError):
        return "the proxy from the environment (HTTP_PROXY/HTTPS_PROXY) failed"
    if isinstance(exc, requests.ConnectTimeout):
        return "no answer to the connection attempt"
    if "Name or service not known" in text or "NameResolution" in text or "getaddrinfo" in text:
        return "the host name could not be resolved"
    if "refused" in text.lower():
        return "connection refused: nothing is listening on that port"
    return _shorten(text, 160)


def _body_chunks(resp: requests.Response) -> Iterator[bytes]:
    """A streamed body's bytes as soon as they arrive.

    urllib3 hands a chunked body over chunk by chunk, but reads any other body (no length, ended
    by closing the connection) in blocks of the requested size, holding pieces back until a
    block is full. ``read1`` returns what has arrived instead (urllib3 >= 2.3); without it,
    reading byte by byte is correct but costs ~9 µs per byte (docs/perf_model_api_client.md).
    """
    raw = resp.raw
    if getattr(raw, "chunked", False):
        yield from resp.iter_content(chunk_size=8192)
    elif hasattr(raw, "read1"):
        while True:
            data = raw.read1(8192, decode_content=True)  # requests opens raw with decoding off
            if not data:
                return
            yield data
    else:  # pragma: no cover - urllib3 < 2.3
        yield from resp.iter_content(chunk_size=1)


def _new_stats(protocol: str, model: str | None) -> dict[str, Any]:
    stats: dict[str, Any] = dict.fromkeys(STATS_KEYS)
    stats["protocol"] = protocol
    stats["model"] = model
    return stats


def _with_partial(error: ModelAPIError, partial: str) -> ModelAPIError:
    error.partial_text = partial  # type: ignore[attr-defined]
    return error


class ModelAPIClient:
    """One model server: its protocol, a keep-alive session and the project's settings.

    ``base_url`` defaults to ``settings.api_base_url()``, resolved on first use (so a dry run
    never needs ``PC_IP``); a trailing ``/v1`` is stripped and re-added where needed.
    """

    def __init__(self, settings: config.Settings, base_url: str | None = None) -> None:
        self.settings = settings
        self._base_url_arg = base_url
        self._base_url: str | None = None
        self._session: requests.Session | None = None
        self._protocol: str | None = settings.api_protocol if settings.api_protocol in PROTOCOLS else None
        self.server_kind: str | None = None
        self._model: str | None = None  # the model name to send, once checked against the server
        self._probe_cache: dict[str, _Probe] | None = None  # reuse detection's GETs within one health check

    # --- plumbing ---

    @property
    def base_url(self) -> str:
        """The server's root URL, without a trailing ``/`` or ``/v1``."""
        if self._base_url is None:
            raw = self._base_url_arg or self.settings.api_base_url()
            url = raw.strip().rstrip("/")
            if url.endswith("/v1"):
                url = url[: -len("/v1")]
                logger.debug("Stripped the trailing /v1 from the base URL %s", raw)
            self._base_url = url
        return self._base_url

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            session = requests.Session()
            session.trust_env = bool(getattr(self.settings, "api_use_env_proxy", False))
            session.headers["User-Agent"] = "laptop-model-api-client/1.0 " + requests.utils.default_user_agent()
            if self.settings.api_key:
                session.headers["Authorization"] = f"Bearer {self.settings.api_key}"
            if session.trust_env:
                logger.debug(
                    "API_USE_ENV_PROXY=true: environment proxy settings apply to the model server (%s)",
                    requests.utils.get_environ_proxies(self.base_url) or "none set",
                )
            else:
                logger.debug(
                    "Environment proxy settings (HTTP_PROXY, NO_PROXY ...) are ignored for the model "
                    "server; set API_USE_ENV_PROXY=true to use them"
                )
            self._session = session
        return self._session

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def __enter__(self) -> ModelAPIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _timeouts(self, health: bool = False) -> tuple[float, float]:
        s = self.settings
        if health:
            return (min(s.api_connect_timeout, s.api_health_timeout), s.api_health_timeout)
        return (s.api_connect_timeout, s.api_timeout)

    def _connection_error(self, url: str, exc: BaseException, attempts: int) -> ModelConnectionError:
        reason = _connect_reason(exc)
        port = urlsplit(url).port or 80
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        timeout = ""
        if isinstance(exc, requests.ConnectTimeout):
            timeout = f" within API_CONNECT_TIMEOUT={self.settings.api_connect_timeout:g}s"
        checks = [
            f"Is the model server running on the PC (and listening on port {port})?",
            f"Is PC_IP / API_BASE_URL right? (tried {self.base_url})",
            f"Is TCP port {port} open in the Windows firewall for the LAN (setup_firewall.ps1)?",
        ]
        if isinstance(exc, requests.exceptions.ProxyError):
            checks.insert(0, "Unset HTTP_PROXY or set API_USE_ENV_PROXY=false (the default).")
        err = ModelConnectionError(
            f"Cannot connect to the model server at {url}: {reason}{timeout}{tries}.",
            hint="Check:\n  - " + "\n  - ".join(checks),
        )
        err.url = url  # type: ignore[attr-defined]
        return err

    def _dropped_error(self, url: str, exc: BaseException) -> ModelConnectionError:
        err = ModelConnectionError(
            f"The model server at {url} closed the connection without answering "
            f"({_shorten(str(exc), 160)}). The request may have reached it, so it was not retried.",
            hint="Check the PC server's console (did it crash or restart?), then try again.",
        )
        err.url = url  # type: ignore[attr-defined]
        return err

    def _timeout_error(self, url: str, health: bool = False, streaming: bool = False) -> ModelTimeoutError:
        if health:
            setting, value = "API_HEALTH_TIMEOUT", self.settings.api_health_timeout
        else:
            setting, value = "API_TIMEOUT", self.settings.api_timeout
        if streaming:
            what = f"then sent nothing for the read timeout of {setting}={value:g}s between two pieces"
        else:
            what = f"sent no answer within the read timeout of {setting}={value:g}s"
        err = ModelTimeoutError(
            f"The model server at {url} accepted the request but {what}.",
            hint=f"Fix: raise {setting} (or --timeout) if answers legitimately take longer, lower "
            "MAX_NEW_TOKENS, or use streaming. The request was not retried: the PC may still be "
            "generating, and it serves one request at a time.",
        )
        err.url = url  # type: ignore[attr-defined]
        return err

    def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        stream: bool = False,
        health: bool = False,
        attempts: int | None = None,
        retry_statuses: frozenset[int] = RETRY_STATUSES,
    ) -> requests.Response:
        """Send with our retry policy; return the response (any status) or raise a ModelAPIError."""
        url = self.base_url + path
        attempts = attempts or self.settings.api_max_attempts
        data = json.dumps(body, ensure_ascii=False).encode("utf-8") if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        if stream:
            headers["Accept"] = "text/event-stream, application/x-ndjson"
        for attempt in range(attempts):
            logger.info("%s %s (%d bytes)%s", method, url, len(data or b""), " streaming" if stream else "")
            if data is not None and logger.isEnabledFor(logging.DEBUG):  # a prompt can be 70 KB
                logger.debug("Request body: %s", _shorten(_decode(data), 500))
            started = time.monotonic()
            try:
                resp = self.session.request(
                    method, url, data=data, headers=headers, timeout=self._timeouts(health), stream=stream
                )
            except requests.ConnectionError as exc:
                # ConnectTimeout and ProxyError are ConnectionErrors too; a ReadTimeout is not.
                # A connection dropped after the request was sent may have reached the model:
                # a GET is retried, a POST (a generation) is not.
                if not _connect_phase(exc) and method != "GET":
                    raise self._dropped_error(url, exc) from exc
                if attempt + 1 >= attempts:
                    raise self._connection_error(url, exc, attempts) from exc
                delay = _backoff(attempt)
                logger.warning(
                    "%s %s failed (%s); attempt %d/%d, retrying in %.1f s",
                    method, url, _connect_reason(exc), attempt + 1, attempts, delay,
                )
                time.sleep(delay)
                continue
            except requests.Timeout as exc:  # ReadTimeout: the request reached the server
                raise self._timeout_error(url, health=health) from exc
            except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as exc:
                raise BadResponseError(
                    f"The answer from {url} was cut off or garbled in transit: {_shorten(str(exc), 160)}.",
                    hint="Check the PC server's console (did it crash mid-answer?) and try again.",
                ) from exc
            except requests.RequestException as exc:
                raise ModelConnectionError(f"The request to {url} failed: {_shorten(str(exc))}.") from exc

            logger.info(
                "%s from %s %s in %.2f s%s",
                resp.status_code, method, url, time.monotonic() - started,
                "" if stream else f" ({len(resp.content)} bytes)",
            )
            if resp.status_code not in retry_statuses or attempt + 1 >= attempts:
                return resp
            if self._final_error_status(resp):
                return resp
            wait = _retry_after(resp)
            cap = self.settings.api_retry_after_max
            if wait is None:
                delay, why = _backoff(attempt), "backoff"
            else:
                delay = min(wait, cap)
                why = f"Retry-After {wait:g}s" + (f", capped at API_RETRY_AFTER_MAX={cap:g}s" if wait > cap else "")
            logger.warning(
                "%s %s answered %s; attempt %d/%d, retrying in %.1f s (%s)",
                method, url, resp.status_code, attempt + 1, attempts, delay, why,
            )
            resp.close()
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _final_error_status(self, resp: requests.Response) -> bool:
        """A retryable status that retrying cannot fix (the PC server's failed model load)."""
        if resp.status_code != 503:
            return False
        try:
            detail = _error_detail(json.loads(_decode(resp.content))) or ""
        except ValueError:
            return False
        return detail.startswith(_PC_LOAD_FAILED)

    def _probe(self, path: str, attempts: int = 1) -> _Probe:
        """GET for detection/health: connection errors raise, statuses and timeouts do not."""
        if self._probe_cache is not None and path in self._probe_cache:
            return self._probe_cache[path]
        try:
            resp = self._request("GET", path, health=True, attempts=attempts, retry_statuses=frozenset())
        except ModelTimeoutError:
            probe = _Probe(status=None, timed_out=True)
        else:
            text = _decode(resp.content)
            try:
                body = json.loads(text) if text.strip() else None
            except ValueError:
                body = None
            logger.debug("GET %s -> %s %s", path, resp.status_code, _shorten(text, 300))
            probe = _Probe(status=resp.status_code, body=body, text=text, headers=dict(resp.headers))
        if self._probe_cache is not None:
            self._probe_cache[path] = probe
        return probe

    def _json(self, resp: requests.Response, what: str) -> Any:
        """Parse a 200 body as JSON, or raise BadResponseError describing what came instead."""
        text = _decode(resp.content)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("Response body: %s", _shorten(text, 500))
        content_type = resp.headers.get("Content-Type", "")
        try:
            return json.loads(text)
        except ValueError:
            pass
        err = BadResponseError(
            f"The server at {resp.url} answered {what} with {_excerpt(text, content_type)}",
            hint="Check that API_BASE_URL / PC_IP and API_PORT point at the model server "
            "(not a router page or proxy), and that API_PROTOCOL matches it.",
        )
        err.status = resp.status_code  # type: ignore[attr-defined]
        raise err

    def _raise_for_status(self, resp: requests.Response, protocol: str) -> None:
        """Map an error status to the project's typed errors, with the server's detail."""
        status = resp.status_code
        if status < 400:
            return
        url = resp.url
        text = _decode(resp.content)
        content_type = resp.headers.get("Content-Type", "")
        try:
            body = json.loads(text) if text.strip() else None
        except ValueError:
            body = None
        detail = _error_detail(body)
        if detail is None and isinstance(body, dict):
            detail = _shorten(text, DETAIL_CHARS)
        shown = _shorten(detail, DETAIL_CHARS) if detail else _excerpt(text, content_type)
        error_obj = body.get("error") if isinstance(body, dict) else None
        err_type = error_obj.get("type") if isinstance(error_obj, dict) else None
        lower = (detail or "").lower()
        model = self._model or self.settings.model_name

        error: ModelAPIError
        if status == 503 and protocol == "pc" and (detail or "").startswith(_PC_LOAD_FAILED):
            error = ModelNotLoadedError(
                f"The PC server could not load its model (HTTP 503): {shown}", hint=_NOT_READY_FIX
            )
        elif status == 503 and "loading model" in lower:
            error = ModelNotLoadedError(
                f"The model server at {self.base_url} is still loading the model (HTTP 503).",
                hint="Wait until it has finished loading, then try again.",
            )
        elif status == 404 and protocol in ("ollama", "openai") and "model" in lower and (
            "not found" in lower or "does not exist" in lower
        ):
            fix = f"Fix: run `ollama pull {model}` on the PC" if protocol == "ollama" or self.server_kind == "Ollama" else (
                "Fix: load that model on the server"
            )
            error = ModelNotLoadedError(
                f"The server at {self.base_url} does not have the model '{model}' (HTTP 404): {shown}",
                hint=f"{fix}, or set MODEL_NAME to a model the server has.",
            )
        elif status in (400, 422):
            hint = "Fix: check the prompt and the request settings (MAX_NEW_TOKENS, TEMPERATURE)."
            if err_type == "exceed_context_size_error" or "context" in lower:
                hint = "Fix: the prompt is too long for the model's context; shorten it or send fewer rows."
            error = InvalidPromptError(f"The server rejected the request (HTTP {status}): {shown}", hint=hint)
        elif status in (401, 403):
            error = ModelServerError(
                f"The server refused the request (HTTP {status}): {shown}",
                hint="Fix: set API_KEY to the key the server expects (it is sent as a bearer token).",
            )
        elif status == 404:
            error = ModelServerError(
                f"The server at {self.base_url} has no {urlsplit(url).path} endpoint (HTTP 404): {shown}",
                hint=f"Check that API_PROTOCOL (now {self.settings.api_protocol}) and API_PORT match the server.",
            )
        else:
            reason = resp.reason or ""
            extra = f" after {self.settings.api_max_attempts} attempts" if status in RETRY_STATUSES else ""
            error = ModelServerError(
                f"The model server at {url} answered HTTP {status} {reason}{extra}: {shown}",
                hint="Check the PC server's console for the cause.",
            )
        error.status = status  # type: ignore[attr-defined]
        error.detail = detail  # type: ignore[attr-defined]
        error.url = url  # type: ignore[attr-defined]
        raise error

    # --- protocol detection ---

    def detect_protocol(self) -> str:
        """'pc', 'ollama' or 'openai'. An explicit API_PROTOCOL skips probing."""
        return self._detect(attempts=self.settings.api_max_attempts)

    def _detect(self, attempts: int) -> str:
        if self._protocol:
            return self._protocol
        with _detected_lock:
            cached = _detected.get(self.base_url)
        if cached:
            self._protocol, self.server_kind = cached
            return self._protocol
        protocol, kind = self._probe_protocol(attempts)
        logger.info("Detected the %s protocol at %s (%s)", protocol, self.base_url, kind)
        if not kind.endswith("(busy)"):  # a guess from a timeout is kept by this client only
            with _detected_lock:
                _detected[self.base_url] = (protocol, kind)
        self._protocol, self.server_kind = protocol, kind
        return protocol

    def _probe_protocol(self, attempts: int) -> tuple[str, str]:
        # PROTOCOLS.md section 7, order 2 -> 1 -> 3 -> 7, GETs only; a JSON "error" key means "no",
        # even on HTTP 200 (LM Studio answers unknown paths that way).
        probe = self._probe("/api/health", attempts=attempts)
        if probe.timed_out:
            logger.warning(
                "%s/api/health did not answer within API_HEALTH_TIMEOUT: assuming the PC server, "
                "busy with a generation (it serves one request at a time)", self.base_url,
            )
            return "pc", "PC server (busy)"
        if probe.status == 200 and isinstance(probe.body, dict) and "model_loaded" in probe.body and "error" not in probe.body:
            return "pc", "PC server"

        probe = self._probe("/api/version")
        if (
            probe.status == 200
            and isinstance(probe.body, dict)
            and isinstance(probe.body.get("version"), str)
            and "error" not in probe.body
        ):
            return "ollama", f"Ollama {probe.body['version']}"

        kind = None
        probe = self._probe("/health")
        if probe.status in (200, 503) and isinstance(probe.body, dict):
            error = probe.body.get("error")
            if probe.status == 200 and probe.body.get("status") == "ok" and "error" not in probe.body:
                kind = "llama.cpp"
            elif isinstance(error, dict) and "loading model" in str(error.get("message", "")).lower():
                kind = "llama.cpp (loading the model)"
        elif probe.status == 200 and not probe.text.strip():
            kind = "vLLM or TGI"

        probe = self._probe("/v1/models")
        if probe.status == 200 and isinstance(probe.body, dict) and isinstance(probe.body.get("data"), list):
            owners = {str(m.get("owned_by")) for m in probe.body["data"] if isinstance(m, dict)}
            named = {"llamacpp": "llama.cpp", "vllm": "vLLM", "organization_owner": "LM Studio", "library": "Ollama"}
            for owner, name in named.items():
                if owner in owners:
                    kind = name
                    break
            return "openai", kind or "OpenAI-compatible server"
        if probe.status in (401, 403) and kind is None:
            return "openai", "OpenAI-compatible server (needs API_KEY)"
        if kind:
            return "openai", kind
        raise BadResponseError(
            f"The server at {self.base_url} answers HTTP, but not like a known model server "
            "(tried GET /api/health, /api/version, /health, /v1/models).",
            hint="Check API_PORT / API_BASE_URL, or set API_PROTOCOL to pc, ollama or openai.",
        )

    def supports_streaming(self) -> bool:
        """False for the PC server, which has no streaming endpoint."""
        return self.detect_protocol() != "pc"

    # --- model name checks (cheap GETs before a POST) ---

    def _list_models(self, protocol: str, attempts: int | None = None) -> tuple[list[str], list[str]] | None:
        """(names, owners) from /api/tags or /v1/models, or None when the server does not list them."""
        path = "/api/tags" if protocol == "ollama" else "/v1/models"
        probe = self._probe(path, attempts=attempts or self.settings.api_max_attempts)
        key = "models" if protocol == "ollama" else "data"
        if probe.status != 200 or not isinstance(probe.body, dict) or not isinstance(probe.body.get(key), list):
            logger.info("%s%s does not list models (HTTP %s)", self.base_url, path, probe.status)
            return None
        names, owners = [], []
        for entry in probe.body[key]:
            if isinstance(entry, dict):
                name = entry.get("name") or entry.get("model") if protocol == "ollama" else entry.get("id")
                if name:
                    names.append(str(name))
                    owners.append(str(entry.get("owned_by", "")))
        return names, owners

    def _match_model(self, names: list[str], owners: list[str]) -> tuple[str | None, str | None]:
        """(model to send, None) or (None, error message). Tag rule: ``phi4`` matches ``phi4:latest``."""
        wanted = self.settings.model_name
        if any(n == wanted or n.startswith(wanted + ":") for n in names):
            return wanted, None
        # llama.cpp (one model) and LM Studio (one loaded model) ignore the requested name.
        if len(names) == 1 and owners and owners[0] in ("llamacpp", "organization_owner"):
            logger.warning(
                "MODEL_NAME=%s is not in the server's list; it serves only %r, which will be used", wanted, names[0]
            )
            return names[0], None
        listed = ", ".join(names) if names else "(none)"
        return None, f"The model '{wanted}' is not available on the server at {self.base_url}. Models there: {listed}."

    def _ensure_model(self, protocol: str) -> str:
        if self._model:
            return self._model
        listing = self._list_models(protocol)
        if listing is None:
            self._model = self.settings.model_name
            return self._model
        model, problem = self._match_model(*listing)
        if problem:
            if protocol == "ollama":
                hint = f"Fix: run `ollama pull {self.settings.model_name}` on the PC, or set MODEL_NAME to one of them."
            else:
                hint = "Fix: load that model on the server, or set MODEL_NAME to one of them."
            error = ModelNotLoadedError(problem, hint=hint)
            error.available_models = listing[0]  # type: ignore[attr-defined]
            raise error
        self._model = model
        return model  # type: ignore[return-value]

    # --- health ---

    def check_health(self) -> HealthReport:
        """Is the server up and its model ready? Never raises; one short attempt per GET."""
        self._probe_cache = {}
        try:
            report = self._health()
        except ConfigError as exc:
            report = HealthReport(ok=False, reachable=False, detail=exc.message, fix=exc.hint)
        except ModelConnectionError as exc:
            report = HealthReport(ok=False, reachable=False, detail=exc.message, fix=exc.hint)
        except PipelineError as exc:
            report = HealthReport(ok=False, reachable=True, protocol=self._protocol, detail=exc.message, fix=exc.hint)
        except Exception as exc:  # a health check must never raise; KeyboardInterrupt still does
            logger.debug("Unexpected error during the health check", exc_info=True)
            report = HealthReport(ok=False, reachable=False, protocol=self._protocol, detail=f"Unexpected error: {exc!r}")
        finally:
            self._probe_cache = None
        if report.ok:
            logger.info("Model server healthy: %s", report.detail)
        else:
            logger.warning("Model server not ready: %s%s", report.detail, f" ({report.fix})" if report.fix else "")
        return report

    def _health(self) -> HealthReport:
        protocol = self._detect(attempts=1)
        if protocol == "pc":
            return self._health_pc()
        report = HealthReport(ok=False, reachable=True, protocol=protocol, model_name=self.settings.model_name)
        listing = self._list_models(protocol, attempts=1)
        health = self._probe("/health") if protocol == "openai" else None
        if listing is None:
            if protocol == "ollama" or health is None or health.status != 200:
                path = "/api/tags" if protocol == "ollama" else "/v1/models (nor /health)"
                report.detail = f"{self.base_url}{path} did not answer like {self.server_kind or protocol}: wrong protocol or port?"
                report.fix = "Set API_PROTOCOL=auto (or the server's protocol: pc, ollama, openai) and check API_PORT."
                return report
        else:
            report.available_models = listing[0]
            model, problem = self._match_model(*listing)
            if problem:
                report.detail = problem
                report.fix = (
                    f"Run `ollama pull {self.settings.model_name}` on the PC, or set MODEL_NAME to one of them."
                    if protocol == "ollama"
                    else "Load that model on the server, or set MODEL_NAME to one of them."
                )
                return report
            report.model_name = model
        if health is not None and health.status == 503:
            report.detail = f"{self.base_url} is up but not ready: {_error_detail(health.body) or 'HTTP 503'}"
            report.fix = _NOT_READY_FIX
            return report
        report.ok = report.model_ready = True
        report.detail = f"{self.server_kind or protocol} at {self.base_url} is ready (model {report.model_name})"
        return report

    def _health_pc(self) -> HealthReport:
        report = HealthReport(ok=False, reachable=True, protocol="pc", model_name=self.settings.model_type)
        probe = self._probe("/api/health")
        if probe.timed_out:
            report.detail = (
                f"The PC server at {self.base_url} accepted the connection but did not answer "
                f"/api/health within API_HEALTH_TIMEOUT={self.settings.api_health_timeout:g}s: it is "
                "probably busy with a generation (it serves one request at a time)."
            )
            report.fix = "Wait for the running generation to finish, or raise API_HEALTH_TIMEOUT."
            return report
        body = probe.body
        if probe.status != 200 or not isinstance(body, dict) or "model_loaded" not in body or "error" in body:
            shown = _error_detail(body) or _excerpt(probe.text, probe.headers.get("Content-Type", ""))
            report.detail = (
                f"{self.base_url}/api/health did not answer like the PC server (HTTP {probe.status}: "
                f"{_shorten(shown, 120)}): wrong protocol or port?"
            )
            report.fix = "Set API_PROTOCOL=auto (or the server's protocol) and check API_PORT."
            return report
        if body.get("model_loaded") is not True:
            report.detail = f"The PC server at {self.base_url} is running, but its model is not loaded (model_loaded: false)."
            report.fix = _NOT_READY_FIX
            return report
        report.ok = report.model_ready = True
        report.detail = f"PC server at {self.base_url} is ready (model loaded)"
        return report

    # --- generation ---

    def _prepare(
        self, prompt: str, max_new_tokens: int | None, temperature: float | None
    ) -> tuple[str, int, float]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidPromptError("The prompt is empty.", hint="Fix: give a non-blank prompt.")
        protocol = self.detect_protocol()
        max_new = self.settings.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        temp = self.settings.temperature if temperature is None else float(temperature)
        if protocol == "pc" and temp <= 0:
            raise InvalidPromptError(
                f"TEMPERATURE must be > 0 for the PC server (got {temp:g}): it samples with do_sample=True.",
                hint="Fix: set TEMPERATURE (or --temperature) to a value such as 0.1 or 0.7.",
            )
        return protocol, max_new, temp

    @staticmethod
    def _messages(prompt: str, system_prompt: str | None) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return messages

    def _payload(self, protocol: str, prompt: str, system_prompt: str | None, max_new: int, temp: float,
                 stream: bool) -> tuple[str, dict[str, Any]]:
        if protocol == "pc":
            body: dict[str, Any] = {"prompt": prompt, "max_new_tokens": max_new, "temperature": temp}
            if system_prompt is not None:  # the PC server rejects "system_prompt": null with a 422
                body["system_prompt"] = system_prompt
            return "/api/generate", body
        model = self._ensure_model(protocol)
        messages = self._messages(prompt, system_prompt)
        if protocol == "ollama":
            options = {"num_predict": max_new, "temperature": temp, "num_ctx": self.settings.model_context_tokens}
            return "/api/chat", {"model": model, "messages": messages, "stream": stream, "options": options}
        body = {"model": model, "messages": messages, "max_tokens": max_new, "temperature": temp, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return "/v1/chat/completions", body

    def generate(
        self,
        prompt: str,
        system_prompt: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """Send one prompt and wait for the whole answer. Returns ``(text, stats)``.

        Raises ModelConnectionError, ModelTimeoutError, ModelNotLoadedError, InvalidPromptError,
        ModelServerError or BadResponseError (all ModelAPIError), or ConfigError.
        """
        protocol, max_new, temp = self._prepare(prompt, max_new_tokens, temperature)
        path, body = self._payload(protocol, prompt, system_prompt, max_new, temp, stream=False)
        started = time.monotonic()
        resp = self._request("POST", path, body)
        self._raise_for_status(resp, protocol)
        data = self._json(resp, f"POST {path}")
        wall = time.monotonic() - started
        if isinstance(data, dict) and "error" in data:  # LM Studio and friends: errors on HTTP 200
            raise ModelServerError(f"The server answered with an error: {_shorten(_error_detail(data) or '', DETAIL_CHARS)}")
        text, stats = self._parse_answer(protocol, data, resp)
        stats["wall_time"] = wall
        logger.info(
            "Answer: %d chars, %s tokens in %.2f s (%s)", len(text), stats["generated_tokens"], wall, protocol
        )
        return text, stats

    def _parse_answer(self, protocol: str, data: Any, resp: requests.Response) -> tuple[str, dict[str, Any]]:
        def bad(expected: str) -> BadResponseError:
            return BadResponseError(
                f"The server at {resp.url} answered JSON without {expected}: {_shorten(json.dumps(data, ensure_ascii=False))!r}",
                hint="Check that API_PROTOCOL matches the server.",
            )

        if protocol == "pc":
            if not isinstance(data, dict) or not isinstance(data.get("response"), str):
                raise bad('a "response" text')
            stats = _new_stats("pc", self.settings.model_type)
            self._pc_stats(stats, data.get("stats"))
            return data["response"], stats
        if protocol == "ollama":
            message = data.get("message") if isinstance(data, dict) else None
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise bad('"message.content"')
            stats = _new_stats("ollama", data.get("model") or self._model)
            self._ollama_stats(stats, data)
            return message["content"], stats
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise bad('"choices"')
        message = choices[0].get("message") or {}
        content = message.get("content") if isinstance(message, dict) else None
        if content is not None and not isinstance(content, str):
            raise bad('"choices[0].message.content" text')
        stats = _new_stats("openai", data.get("model") or self._model)
        stats["finish_reason"] = choices[0].get("finish_reason")
        self._openai_stats(stats, data.get("usage"), data.get("timings"))
        return content or "", stats

    @staticmethod
    def _pc_stats(stats: dict[str, Any], raw: Any) -> None:
        raw = raw if isinstance(raw, dict) else {}
        stats["generation_time"] = _num(raw.get("generation_time"))
        stats["input_tokens"] = _int(raw.get("input_tokens"))
        stats["generated_tokens"] = _int(raw.get("generated_tokens"))
        total = _int(raw.get("total_tokens"))
        stats["total_tokens"] = total if total is not None else _sum(stats["input_tokens"], stats["generated_tokens"])
        stats["tokens_per_second"] = _num(raw.get("tokens_per_second"))

    @staticmethod
    def _ollama_stats(stats: dict[str, Any], raw: dict[str, Any]) -> None:
        # Ollama durations are nanoseconds. generation_time = prompt evaluation + generation
        # (like the PC server's model.generate time; load_duration excluded).
        eval_s = _scaled(raw.get("eval_duration"), 1e9)
        prompt_s = _scaled(raw.get("prompt_eval_duration"), 1e9)
        if eval_s is not None:
            stats["generation_time"] = eval_s + (prompt_s or 0.0)
        stats["input_tokens"] = _int(raw.get("prompt_eval_count"))
        stats["generated_tokens"] = _int(raw.get("eval_count"))
        stats["total_tokens"] = _sum(stats["input_tokens"], stats["generated_tokens"])
        if eval_s and stats["generated_tokens"] is not None:
            stats["tokens_per_second"] = stats["generated_tokens"] / eval_s
        stats["finish_reason"] = raw.get("done_reason")

    @staticmethod
    def _openai_stats(stats: dict[str, Any], usage: Any, timings: Any) -> None:
        usage = usage if isinstance(usage, dict) else {}
        timings = timings if isinstance(timings, dict) else {}
        stats["input_tokens"] = _int(usage.get("prompt_tokens"))
        stats["generated_tokens"] = _int(usage.get("completion_tokens"))
        if stats["generated_tokens"] is None:
            stats["generated_tokens"] = _int(timings.get("predicted_n"))
        total = _int(usage.get("total_tokens"))
        stats["total_tokens"] = total if total is not None else _sum(stats["input_tokens"], stats["generated_tokens"])
        # llama.cpp timings are milliseconds.
        predicted_s = _scaled(timings.get("predicted_ms"), 1000)
        if predicted_s is not None:
            stats["generation_time"] = predicted_s + (_scaled(timings.get("prompt_ms"), 1000) or 0.0)
        stats["tokens_per_second"] = _num(timings.get("predicted_per_second"))

    # --- streaming ---

    def stream(
        self,
        prompt: str,
        system_prompt: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
    ) -> Iterator[str | dict[str, Any]]:
        """Yield the answer's text pieces as they arrive, then exactly one stats dict.

        The PC server has no streaming endpoint: its whole answer comes as one piece. If the
        stream breaks, the error (BadResponseError, ModelTimeoutError or ModelServerError) has a
        ``partial_text`` attribute with what arrived. Closing the generator (or Ctrl-C while
        iterating) closes the connection, so the server sees the client go away.
        """
        protocol, max_new, temp = self._prepare(prompt, max_new_tokens, temperature)
        if protocol == "pc":
            text, stats = self.generate(prompt, system_prompt, max_new, temp)
            yield text
            yield stats
            return
        path, body = self._payload(protocol, prompt, system_prompt, max_new, temp, stream=True)
        started = time.monotonic()
        resp = self._request("POST", path, body, stream=True)
        try:
            self._raise_for_status(resp, protocol)
            if resp.headers.get("Content-Type", "").startswith("application/json"):
                # A server that ignored "stream": true (or LM Studio's 200-with-error).
                data = self._json(resp, f"POST {path}")
                if isinstance(data, dict) and "error" in data:
                    raise ModelServerError(f"The server answered with an error: {_shorten(_error_detail(data) or '', DETAIL_CHARS)}")
                text, stats = self._parse_answer(protocol, data, resp)
                stats["wall_time"] = time.monotonic() - started
                if text:
                    yield text
                yield stats
                return
            stats = _new_stats(protocol, self._model)
            parts: list[str] = []
            lines = self._lines(resp, parts)
            events = self._ollama_events(lines, stats) if protocol == "ollama" else self._sse_events(lines, stats)
            for piece in events:
                parts.append(piece)
                yield piece
            stats["wall_time"] = time.monotonic() - started
            logger.info(
                "Stream from %s finished: %d pieces, %d chars in %.2f s",
                resp.url, len(parts), sum(map(len, parts)), stats["wall_time"],
            )
            yield stats
        finally:
            resp.close()

    def _lines(self, resp: requests.Response, parts: list[str]) -> Iterator[str]:
        """Complete lines, split as bytes on ``\n`` and then decoded as UTF-8; transport errors mapped.

        A ``\n`` byte never occurs inside a UTF-8 sequence, so a character split across network
        chunks is whole again once its line is complete.
        """
        buffer = b""
        try:
            for chunk in _body_chunks(resp):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    yield _decode(line.rstrip(b"\r"))
            if buffer.strip():
                yield _decode(buffer.rstrip(b"\r"))
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            partial = "".join(parts)
            if _read_timed_out(exc):
                raise _with_partial(self._timeout_error(resp.url, streaming=True), partial) from exc
            raise self._stream_cut(resp.url, partial, f"the connection broke ({_shorten(str(exc), 120)})") from exc

    @staticmethod
    def _stream_cut(url: str, partial: str, how: str) -> ModelAPIError:
        return _with_partial(
            BadResponseError(
                f"The stream from {url} ended early: {how}, after {len(partial)} characters of the answer.",
                hint="The partial answer was kept. Check the PC server's console; try again.",
            ),
            partial,
        )

    def _stream_error(self, detail: str, parts: list[str]) -> ModelAPIError:
        partial = "".join(parts)
        error = ModelServerError(
            f"The server reported an error mid-stream: {_shorten(detail, DETAIL_CHARS)}",
            hint="The partial answer was kept. Check the PC server's console (out of memory?); try again.",
        )
        error.detail = detail  # type: ignore[attr-defined]
        return _with_partial(error, partial)

    def _stream_event(self, text: str, what: str, received: list[str]) -> dict[str, Any] | None:
        """One streamed JSON object; None to skip it. Raises, keeping the partial text, on
        a line that is not JSON or on the server's mid-stream ``{"error": ...}``."""
        try:
            event = json.loads(text)
        except ValueError:
            raise _with_partial(
                BadResponseError(f"{what} that is not JSON: {_shorten(text)!r}"), "".join(received)
            ) from None
        if not isinstance(event, dict):
            return None
        if "error" in event:
            raise self._stream_error(_error_detail(event) or str(event["error"]), received)
        return event

    def _ollama_events(self, lines: Iterator[str], stats: dict[str, Any]) -> Iterator[str]:
        """NDJSON: ``{"message": {"content": ...}, "done": false}`` ... ``{"done": true, counts}``."""
        received: list[str] = []
        for line in lines:
            if not line.strip():
                continue
            event = self._stream_event(line, "The Ollama stream sent a line", received)
            if event is None:
                continue
            message = event.get("message")
            content = message.get("content") if isinstance(message, dict) else None
            if content:
                received.append(content)
                yield content
            if event.get("done"):
                stats["model"] = event.get("model") or stats["model"]
                self._ollama_stats(stats, event)
                return
        raise self._stream_cut("the Ollama server", "".join(received), 'no final "done": true message')

    def _sse_events(self, lines: Iterator[str], stats: dict[str, Any]) -> Iterator[str]:
        """SSE ``data:`` lines with chat.completion.chunk JSON, until ``data: [DONE]``."""
        received: list[str] = []
        usage: Any = None
        timings: Any = None
        for line in lines:
            if not line or line.startswith(":") or not line.startswith("data:"):
                continue  # blank line, keep-alive comment, or event:/id:/retry: fields
            data = line[5:].strip()
            if data == "[DONE]":
                self._openai_stats(stats, usage, timings)
                return
            event = self._stream_event(data, "The stream sent an event", received)
            if event is None:
                continue
            stats["model"] = event.get("model") or stats["model"]
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
            for choice in event.get("choices") or []:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta") or {}
                content = delta.get("content") if isinstance(delta, dict) else None
                if content:
                    received.append(content)
                    yield content
                if choice.get("finish_reason"):
                    stats["finish_reason"] = choice["finish_reason"]
        raise self._stream_cut("the server", "".join(received), "no final data: [DONE]")


# --- module-level API (the plan's functions), on a default client built lazily ---

_default_client: ModelAPIClient | None = None
_default_lock = threading.Lock()


def get_default_client() -> ModelAPIClient:
    """The client behind the module-level functions, built from :func:`config.get_settings`."""
    global _default_client
    with _default_lock:
        if _default_client is None:
            _default_client = ModelAPIClient(config.get_settings())
        return _default_client


def check_server_health() -> bool:
    """True only when the server answers and its model is ready. Logs why not; never raises."""
    try:
        client = get_default_client()
    except PipelineError as exc:
        logger.error("Cannot check the model server: %s", exc)
        return False
    return client.check_health().ok


def send_prompt(
    prompt: str,
    system_prompt: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
) -> tuple[str, dict[str, Any]]:
    """Send a prompt to the configured model server; returns ``(answer, stats)``."""
    return get_default_client().generate(prompt, system_prompt, max_new_tokens, temperature)


def stream_prompt(
    prompt: str,
    system_prompt: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
) -> Iterator[str | dict[str, Any]]:
    """Like :func:`send_prompt`, but yields text pieces as they arrive, then the stats dict."""
    return get_default_client().stream(prompt, system_prompt, max_new_tokens, temperature)
