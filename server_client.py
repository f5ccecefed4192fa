"""The client for one model server: a transport plus, once known, that server's protocol.

``ServerClient`` is safe to call from many threads at once (a pool of servers dispatches
concurrent requests to one client): the transport keeps one HTTP session per thread, the
protocol object is immutable, and the only state kept here (which protocol the server speaks,
which model name to send) is found once, under a lock. Nothing about a single request is kept
on the instance.

Detection uses GET requests only (a POST could start a generation on the PC) and runs once
per client; an explicit ``API_PROTOCOL`` skips it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable, Mapping

import config
from errors import (
    BadResponseError,
    ConfigError,
    InvalidPromptError,
    ModelConnectionError,
    ModelNotLoadedError,
    ModelServerError,
    ModelTimeoutError,
    PipelineError,
)
from generation import Generation, GenerationStats, HealthReport, StreamProgress, fill_measured
from http_bodies import DETAIL_CHARS, describe_body, error_detail, shorten
from http_transport import HttpTransport, Reply, TransportOptions
from model_protocols import PROTOCOLS, GenerationRequest, Probe, ProbeFn, Protocol, ServerInfo, detect_protocol
from retry_policy import RetryPolicy
from server_spec import ServerSpec, SpecProblem, checked_ca_bundle, parse_server

logger = logging.getLogger(__name__)


def normalise_base_url(raw: str) -> str:
    """The server's root URL: no trailing ``/`` or ``/v1`` (paths add ``/v1`` where needed)."""
    url = raw.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
        logger.debug("Stripped the trailing /v1 from the base URL %s", raw)
    return url


def transport_options(settings: config.Settings, ca_bundle: str | None = None) -> TransportOptions:
    """The transport's options from the project's settings (``ca_bundle``: one server's own CA file)."""
    return TransportOptions(
        connect_timeout=settings.api_connect_timeout,
        read_timeout=settings.api_timeout,
        health_timeout=settings.api_health_timeout,
        retry=RetryPolicy(max_attempts=settings.api_max_attempts, retry_after_max=settings.api_retry_after_max),
        use_env_proxy=settings.api_use_env_proxy,
        api_key=settings.api_key,
        max_response_bytes=settings.api_max_response_bytes,
        stream_max_seconds=settings.api_stream_max_seconds,
        ca_bundle=ca_bundle or settings.api_ca_bundle,  # a server's own #ca=PATH wins over API_CA_BUNDLE
    )


class ServerClient:
    """One model server.

    Args:
        settings: the project's settings (model name, timeouts, retry policy, limits).
        base_url: the server: a URL (a trailing ``/v1`` is fine; ``#slots=...&model=...`` settings
            after ``#`` are read, never sent) or a :class:`ServerSpec`; default the first configured
            server (``settings.server_specs()``; raises ConfigError when not configured). A
            server's ``#model=`` and ``#protocol=`` replace ``MODEL_NAME`` and ``API_PROTOCOL`` for it.
        transport: an :class:`HttpTransport` to use (default: one built from the settings).
        sleep, clock: passed to the default transport (tests inject them to skip real waits).
    """

    def __init__(self, settings: config.Settings, base_url: str | ServerSpec | None = None, *,
                 transport: HttpTransport | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        if isinstance(base_url, ServerSpec):
            spec = base_url
        elif base_url:
            try:
                spec = parse_server(base_url)
            except SpecProblem as exc:
                raise ConfigError(f"Cannot use the model server address: {exc}.",
                                  hint="Fix: pass the server's base URL, such as http://192.168.0.10:8000.") from None
        else:
            spec = settings.server_specs()[0]
        self.spec = spec
        self.base_url = normalise_base_url(spec.url)
        # For messages, logs, stats and reports, which a caller may print or save: never a password.
        # The protocols only ever name the server, so they get this one too.
        self.display_url = config.mask_url_password(self.base_url)
        self.model_name = spec.model or settings.model_name
        self.configured_protocol = spec.protocol or settings.api_protocol
        self._clock = clock
        self.transport = transport or HttpTransport(
            self.base_url, transport_options(settings, checked_ca_bundle(spec)), sleep=sleep, clock=clock)
        self._detect_lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._protocol: Protocol | None = None
        self._model: str | None = None  # the model name to send, once checked against the server
        if self.configured_protocol in PROTOCOLS:
            self._protocol = self._make_protocol(self.configured_protocol, None)

    # --- state ---

    @property
    def protocol(self) -> str | None:
        """The protocol's name, once known (``API_PROTOCOL`` or detection)."""
        return self._protocol.name if self._protocol else None

    @property
    def server_kind(self) -> str | None:
        """What detection found ("llama.cpp", "Ollama 0.5.1", "PC server" ...), or None."""
        return self._protocol.server.kind if self._protocol else None

    @property
    def model(self) -> str | None:
        """The model name sent to the server, once checked."""
        return self._model

    def _make_protocol(self, name: str, kind: str | None) -> Protocol:
        s = self.settings
        info = ServerInfo(base_url=self.display_url, model_name=self.model_name, model_label=s.model_type,
                          context_tokens=s.model_context_tokens, configured=self.configured_protocol, kind=kind)
        return PROTOCOLS[name](info)

    def forget(self) -> None:
        """Forget the detected protocol and checked model (the server was replaced or restarted)."""
        with self._detect_lock, self._model_lock:
            self._model = None
            if self.configured_protocol not in PROTOCOLS:
                self._protocol = None

    # --- probes and detection ---

    def _prober(self, attempts: int, cache: dict[str, Probe] | None = None) -> ProbeFn:
        """A ``get(path) -> Probe`` for the protocols; ``cache`` shares answers within one check."""

        def get(path: str) -> Probe:
            if cache is not None and path in cache:
                return cache[path]
            try:
                reply = self.transport.get(path, attempts=attempts)
            except ModelTimeoutError:
                probe = Probe(status=None, timed_out=True)
            else:
                text = reply.text()
                probe = Probe(status=reply.status, body=reply.json(), text=text, content_type=reply.content_type)
                logger.debug("GET %s -> %s %s", path, reply.status, shorten(text, 300))
            if cache is not None:
                cache[path] = probe
            return probe

        return get

    def detect(self) -> str:
        """``'pc'``, ``'ollama'`` or ``'openai'``; probes with GETs once, retrying a refused connection."""
        return self._detect(self._prober(self.settings.api_max_attempts)).name

    def _detect(self, get: ProbeFn) -> Protocol:
        with self._detect_lock:
            if self._protocol is None:
                found = detect_protocol(get, self.display_url)
                logger.info("Detected the %s protocol at %s (%s)", found.protocol, self.display_url, found.kind)
                self._protocol = self._make_protocol(found.protocol, found.kind)
            return self._protocol

    def supports_streaming(self) -> bool:
        """False for the PC server, which has no streaming endpoint."""
        return self._detect(self._prober(self.settings.api_max_attempts)).streams

    def _checked_model(self, protocol: Protocol) -> str:
        """The model name to send: MODEL_NAME checked once against the server's list (a GET)."""
        with self._model_lock:
            if self._model is not None:
                return self._model
            listing = protocol.list_models(self._prober(self.settings.api_max_attempts))
            if listing is None:
                self._model = protocol.default_model()
                return self._model
            model, problem = protocol.match_model(listing)
            if problem or model is None:
                raise ModelNotLoadedError(problem or "No model to use.", hint=protocol.missing_model_fix(),
                                          available_models=list(listing.names), url=self.display_url)
            self._model = model
            return model

    def list_models(self) -> list[str] | None:
        """The models the server lists (None for a server that does not list them, like the pc one)."""
        get = self._prober(self.settings.api_max_attempts)
        listing = self._detect(get).list_models(get)
        return None if listing is None else list(listing.names)

    @property
    def slots_source(self) -> str:
        """Where :meth:`slots`' figure comes from ("reported by the server", "the pc server runs one at a time")."""
        return self._protocol.slots_source if self._protocol else Protocol.slots_source

    def slots(self) -> int | None:
        """How many generations the server says it runs at once (pc: 1; llama.cpp: its slots), or None."""
        get = self._prober(1)
        return self._detect(get).slots(get)

    # --- generation ---

    def request(self, prompt: str, system_prompt: str | None = None, max_new_tokens: int | None = None,
                temperature: float | None = None, json_schema: Mapping[str, Any] | None = None) -> GenerationRequest:
        """A checked request with the settings' defaults filled in."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidPromptError("The prompt is empty.", hint="Fix: give a non-blank prompt.")
        return GenerationRequest(
            prompt=prompt, system_prompt=system_prompt,
            max_new_tokens=self.settings.max_new_tokens if max_new_tokens is None else int(max_new_tokens),
            temperature=self.settings.temperature if temperature is None else float(temperature),
            json_schema=json_schema,
        )

    def generate(self, prompt: str, system_prompt: str | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, *, json_schema: Mapping[str, Any] | None = None,
                 attempts: int | None = None) -> Generation:
        """Send one prompt and wait for the whole answer.

        ``attempts`` bounds the sends on a refused connection or a 429/503 (default
        ``API_MAX_ATTEMPTS``; a pool passes 1 when another server can take the request at once).
        Raises ModelConnectionError, ModelTimeoutError, ModelNotLoadedError, InvalidPromptError,
        ModelServerError or BadResponseError (all ModelAPIError), or ConfigError.
        """
        request = self.request(prompt, system_prompt, max_new_tokens, temperature, json_schema)
        protocol = self._ready(request)
        return self._generate(protocol, request, self._checked_model(protocol), attempts)

    def stream(self, prompt: str, system_prompt: str | None = None, max_new_tokens: int | None = None,
               temperature: float | None = None, *, json_schema: Mapping[str, Any] | None = None,
               attempts: int | None = None) -> Generation:
        """Send one prompt; the Generation yields the answer's pieces as they arrive.

        The PC server has no streaming endpoint: its answer comes whole, as one piece. Errors
        while reading carry ``partial_text`` and ``stats``; close the Generation (or let it end)
        to release the connection. ``attempts``: as for :meth:`generate`.
        """
        request = self.request(prompt, system_prompt, max_new_tokens, temperature, json_schema)
        protocol = self._ready(request)
        model = self._checked_model(protocol)
        if not protocol.streams:
            return self._generate(protocol, request, model, attempts)
        path, body = protocol.build_request(request, model, stream=True)
        started = self._clock()
        reply = self.transport.request("POST", path, body, stream=True, attempts=attempts,
                                       give_up=self._give_up(protocol))
        try:
            self._raise_for_status(protocol, reply, model)
            stats = self._new_stats(protocol, model)
            if reply.content_type.startswith("application/json"):
                # A server that ignored "stream": true (or LM Studio's 200-with-error).
                text = self._parse(protocol, reply, path, stats)
                stats.wall_time = self._clock() - started
                fill_measured(stats, seconds=stats.wall_time)
                return Generation.complete(text, stats)
            progress = StreamProgress(stats)
            events = protocol.stream_events(reply.lines(progress), stats, progress)
            return Generation.streamed(events, progress, close=reply.close, started=started, clock=self._clock,
                                       max_bytes=self.settings.api_max_response_bytes, url=reply.url)
        except BaseException:
            reply.close()
            raise

    def _ready(self, request: GenerationRequest) -> Protocol:
        protocol = self._detect(self._prober(self.settings.api_max_attempts))
        protocol.check_request(request)
        return protocol

    def _generate(self, protocol: Protocol, request: GenerationRequest, model: str,
                  attempts: int | None = None) -> Generation:
        path, body = protocol.build_request(request, model, stream=False)
        started = self._clock()
        reply = self.transport.request("POST", path, body, attempts=attempts, give_up=self._give_up(protocol))
        self._raise_for_status(protocol, reply, model)
        stats = self._new_stats(protocol, model)
        text = self._parse(protocol, reply, path, stats)
        stats.wall_time = self._clock() - started
        fill_measured(stats, seconds=stats.wall_time)  # a server without timings: the speed as the client saw it
        logger.info("Answer: %d chars, %s tokens in %.2f s (%s at %s)", len(text), stats.generated_tokens,
                    stats.wall_time, protocol.name, self.display_url)
        return Generation.complete(text, stats)

    def _new_stats(self, protocol: Protocol, model: str) -> GenerationStats:
        return GenerationStats(protocol=protocol.name, model=model, server=self.display_url)

    @staticmethod
    def _give_up(protocol: Protocol) -> Callable[[Reply], bool]:
        return lambda reply: protocol.gives_up(reply.status, error_detail(reply.json()) or "")

    @staticmethod
    def _raise_for_status(protocol: Protocol, reply: Reply, model: str | None) -> None:
        if reply.status >= 400:
            raise protocol.error_for_status(reply, model)

    @staticmethod
    def _parse(protocol: Protocol, reply: Reply, path: str, stats: GenerationStats) -> str:
        """A 2xx answer's text: JSON of the protocol's shape, or BadResponseError saying what came."""
        text = reply.text()
        try:
            data = json.loads(text)
        except ValueError:
            raise BadResponseError(
                f"The server at {reply.url} answered POST {path} with {describe_body(text, reply.content_type)}",
                hint="Check that API_BASE_URL / PC_IP and API_PORT point at the model server (not a router page "
                "or proxy), and that API_PROTOCOL matches it.", url=reply.url, status=reply.status,
            ) from None
        if isinstance(data, dict) and "error" in data:  # LM Studio and friends: errors on HTTP 200
            detail = error_detail(data) or ""
            raise ModelServerError(f"The server answered with an error: {shorten(detail, DETAIL_CHARS)}",
                                   url=reply.url, status=reply.status, detail=detail)
        return protocol.parse_answer(data, stats)

    # --- health ---

    def probe(self, attempts: int = 1) -> HealthReport:
        """Is the server ready to generate? GETs only (never a POST), ``attempts`` per GET.

        Returns the report when the server answered like a model server (ready or not, and why).
        Raises ModelConnectionError when it cannot be reached, BadResponseError when it does not
        answer like a known model server, ConfigError for a setting that makes the check impossible.
        """
        get = self._prober(attempts, cache={})  # detection's probes are reused by the health check
        report = self._detect(get).health(get)
        report.server = self.display_url
        report.server_kind = self.server_kind
        return report

    def check_health(self) -> HealthReport:
        """Is the server up and its model ready? GETs only, one short attempt each; never raises."""
        try:
            report = self.probe()
        except (ConfigError, ModelConnectionError) as exc:
            report = HealthReport(ok=False, reachable=False, detail=exc.message, fix=exc.hint)
        except PipelineError as exc:
            report = HealthReport(ok=False, reachable=True, protocol=self.protocol, detail=exc.message, fix=exc.hint)
        except Exception as exc:  # a health check must never raise; KeyboardInterrupt still does
            logger.debug("Unexpected error during the health check", exc_info=True)
            report = HealthReport(ok=False, reachable=False, protocol=self.protocol, detail=f"Unexpected error: {exc!r}")
        report.server = self.display_url
        # Info, not a warning: the report is returned, and whoever asked reports it (--check prints
        # it once, check_server_health() warns with it).
        if report.ok:
            logger.info("Model server healthy: %s", report.detail)
        else:
            logger.info("Model server not ready: %s%s", report.detail, f" ({report.fix})" if report.fix else "")
        return report

    # --- lifetime ---

    def close(self) -> None:
        """Close the HTTP sessions (every thread's)."""
        self.transport.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ServerClient {self.display_url} {self.protocol or 'protocol unknown'}>"
