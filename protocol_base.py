"""What every model-server protocol class shares: the request and probe types, and the base class.

The protocol classes themselves (``pc``, ``ollama``, ``openai``) and their registry are in
:mod:`model_protocols`. A protocol class has the same methods whatever the server: ``detect``
(GET probes only: a POST could start a generation on the PC), ``check_request`` and
``build_request`` (path and JSON body), ``parse_answer`` (a non-streamed answer into text and
stats), ``stream_events`` (streamed lines into text pieces, filling the stats), ``list_models``,
``health``, ``slots``, and its own reading of error statuses. A protocol object holds nothing
but what it was built with, so one object serves many threads.

Nothing here does I/O: probes arrive through a ``get(path) -> Probe`` function and replies as
objects with ``status``, ``reason``, ``url``, ``attempts``, ``content_type`` and ``text()``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Protocol as TypingProtocol
from urllib.parse import urlsplit

from errors import (
    BadResponseError,
    InvalidPromptError,
    ModelAPIError,
    ModelNotLoadedError,
    ModelServerError,
)
from generation import GenerationStats, HealthReport, StreamProgress
from http_bodies import DETAIL_CHARS, describe_body, error_detail, shorten
from retry_policy import RETRY_STATUSES

logger = logging.getLogger(__name__)

NOT_READY_FIX = "Wait for the PC to finish loading the model, or check the PC server's console for errors."
# The PC server's 503 when its lazy model load failed (model_api_server.py).
PC_LOAD_FAILED = "모델을 로드할 수 없습니다"


@dataclass(frozen=True)
class Probe:
    """A GET used for detection or health: status and parsed JSON (never an error for a status)."""

    status: int | None
    body: Any = None
    text: str = ""
    timed_out: bool = False
    content_type: str = ""


ProbeFn = Callable[[str], Probe]


class ReplyLike(TypingProtocol):
    """What the error mapping needs from an HTTP reply (``http_transport.Reply`` has it)."""

    status: int
    reason: str
    url: str
    attempts: int

    @property
    def content_type(self) -> str: ...

    def text(self) -> str: ...


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt and its sampling settings, protocol-neutral.

    ``json_schema`` asks for an answer that is JSON matching that schema, where the protocol can
    say so (Ollama's ``format``, OpenAI's ``response_format``); the pc server cannot, and
    ignores it (``Protocol.structured_output`` tells which).
    """

    prompt: str
    system_prompt: str | None = None
    max_new_tokens: int = 512
    temperature: float = 0.7
    json_schema: Mapping[str, Any] | None = None

    def messages(self) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": self.prompt})
        return messages


@dataclass(frozen=True)
class ServerInfo:
    """What a protocol object knows about its server (fixed once the protocol is known)."""

    base_url: str
    model_name: str = "phi4"  # MODEL_NAME: what to ask Ollama / OpenAI-compatible servers for
    model_label: str = "phi4-quantized"  # MODEL_TYPE: the pc server's one model, for stats
    context_tokens: int = 16384  # MODEL_CONTEXT_TOKENS
    configured: str = "auto"  # API_PROTOCOL as configured, for hints
    kind: str | None = None  # "llama.cpp", "Ollama 0.5.1" ...: what detection found


@dataclass(frozen=True)
class Detection:
    """A protocol found by probing. ``certain`` is False for a guess (a busy PC server)."""

    protocol: str
    kind: str
    certain: bool = True


@dataclass(frozen=True)
class ModelListing:
    """Models a server lists, with their ``owned_by`` (empty where the protocol has none)."""

    names: tuple[str, ...]
    owners: tuple[str, ...]


def to_float(value: Any) -> float | None:
    return None if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)


def to_int(value: Any) -> int | None:
    return None if isinstance(value, bool) or not isinstance(value, (int, float)) else int(value)


def scaled(value: Any, divisor: float) -> float | None:
    number = to_float(value)
    return None if number is None else number / divisor


def sum_or_none(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def is_json_object(probe: Probe) -> bool:
    """A 200 JSON object without an ``error`` key (LM Studio answers unknown paths with 200 + error)."""
    return probe.status == 200 and isinstance(probe.body, dict) and "error" not in probe.body


class Protocol:
    """Base of the protocol classes: the shared parts, and the methods each one provides."""

    name: ClassVar[str] = ""
    generate_path: ClassVar[str] = ""
    probe_paths: ClassVar[tuple[str, ...]] = ()  # what detect() may GET, for the "unknown server" message
    streams: ClassVar[bool] = True
    structured_output: ClassVar[bool] = False  # honours GenerationRequest.json_schema
    #: Where the figure from :meth:`slots` comes from, for --check and the pool's log.
    slots_source: ClassVar[str] = "reported by the server"

    def __init__(self, server: ServerInfo) -> None:
        self.server = server

    # --- detection and requests ---

    @classmethod
    def detect(cls, get: ProbeFn) -> Detection | None:
        """GET probes only; a Detection if the server speaks this protocol, else None."""
        raise NotImplementedError

    def check_request(self, request: GenerationRequest) -> None:
        """Raise InvalidPromptError for a request this server would reject, before sending it."""

    def build_request(self, request: GenerationRequest, model: str | None, stream: bool) -> tuple[str, dict[str, Any]]:
        """``(path, JSON body)`` for one generation."""
        raise NotImplementedError

    def default_model(self) -> str:
        """The model name for stats when the server was not asked."""
        return self.server.model_name

    # --- answers ---

    def parse_answer(self, data: Any, stats: GenerationStats) -> str:
        """A non-streamed answer's text; fills ``stats``. Raises BadResponseError on another shape."""
        raise NotImplementedError

    def stream_events(self, lines: Iterator[str], stats: GenerationStats, progress: StreamProgress) -> Iterator[str]:
        """Text pieces from a streamed answer's lines; fills ``stats`` at the end."""
        raise NotImplementedError

    def _bad_shape(self, data: Any, expected: str, url: str) -> BadResponseError:
        return BadResponseError(
            f"The server at {url} answered JSON without {expected}: "
            f"{shorten(json.dumps(data, ensure_ascii=False))!r}",
            hint="Check that API_PROTOCOL matches the server.", url=url,
        )

    def _stream_event(self, text: str, what: str, progress: StreamProgress) -> dict[str, Any] | None:
        """One streamed JSON object; None to skip it. Raises, keeping the partial text, on a line
        that is not JSON or on the server's mid-stream ``{"error": ...}``."""

        def context() -> dict[str, Any]:  # built only on failure: joining the pieces costs O(answer)
            return {"url": self.server.base_url, "partial_text": progress.text(), "stats": progress.stats}

        try:
            event = json.loads(text)
        except ValueError:
            raise BadResponseError(f"{what} that is not JSON: {shorten(text)!r}", **context()) from None
        if not isinstance(event, dict):
            return None
        if "error" in event:
            detail = error_detail(event) or str(event["error"])
            raise ModelServerError(
                f"The server reported an error mid-stream: {shorten(detail, DETAIL_CHARS)}",
                hint="The partial answer was kept. Check the PC server's console (out of memory?); try again.",
                detail=detail, **context(),
            )
        return event

    def _stream_cut(self, progress: StreamProgress, how: str) -> BadResponseError:
        partial = progress.text()
        return BadResponseError(
            f"The stream from {self.server.base_url} ended early: {how}, after {len(partial)} characters of the answer.",
            hint="The partial answer was kept. Check the PC server's console; try again.",
            url=self.server.base_url, partial_text=partial, stats=progress.stats,
        )

    # --- models and health ---

    def list_models(self, get: ProbeFn) -> ModelListing | None:
        """The models the server lists, or None when it does not list them."""
        return None

    def match_model(self, listing: ModelListing) -> tuple[str | None, str | None]:
        """``(model to send, None)`` or ``(None, problem)``. ``phi4`` matches ``phi4:latest``."""
        wanted = self.server.model_name
        if any(n == wanted or n.startswith(wanted + ":") for n in listing.names):
            return wanted, None
        listed = ", ".join(listing.names) if listing.names else "(none)"
        return None, f"The model '{wanted}' is not available on the server at {self.server.base_url}. Models there: {listed}."

    def missing_model_action(self) -> str:
        """What to do on the PC when the model is missing."""
        return "load that model on the server"

    def missing_model_fix(self) -> str:
        return f"Fix: {self.missing_model_action()}, or set MODEL_NAME to one of them."

    def health(self, get: ProbeFn) -> HealthReport:
        """Is the server ready to generate? From GET probes only."""
        raise NotImplementedError

    def slots(self, get: ProbeFn) -> int | None:
        """How many generations the server runs at once, where it says so; None if unknown."""
        return None

    def _wrong_protocol(self, report: HealthReport, what: str) -> HealthReport:
        report.detail = f"{what}: wrong protocol or port?"
        report.fix = "Set API_PROTOCOL=auto (or the server's protocol: pc, ollama, openai) and check API_PORT."
        return report

    # --- errors ---

    def gives_up(self, status: int, detail: str) -> bool:
        """True for a retryable status that retrying cannot cure."""
        return False

    def error_for_status(self, reply: ReplyLike, model: str | None) -> ModelAPIError:
        """The project's error for an error status, with the server's own detail."""
        text = reply.text()
        try:
            body = json.loads(text) if text.strip() else None
        except ValueError:
            body = None
        detail = error_detail(body)
        if detail is None and isinstance(body, dict):
            detail = shorten(text, DETAIL_CHARS)
        shown = shorten(detail, DETAIL_CHARS) if detail else describe_body(text, reply.content_type)
        context = {"url": reply.url, "status": reply.status, "detail": detail}
        special = self._special_error(reply.status, detail or "", shown, model or self.server.model_name, context)
        if special is not None:
            return special
        return self._generic_error(reply, body, detail or "", shown, context)

    def _special_error(self, status: int, detail: str, shown: str, model: str,
                       context: dict[str, Any]) -> ModelAPIError | None:
        """The protocol's own reading of an error status (None: the generic one)."""
        if status == 503 and "loading model" in detail.lower():
            return ModelNotLoadedError(
                f"The model server at {self.server.base_url} is still loading the model (HTTP 503).",
                hint="Wait until it has finished loading, then try again.", **context,
            )
        return None

    def _generic_error(self, reply: ReplyLike, body: Any, detail: str, shown: str,
                       context: dict[str, Any]) -> ModelAPIError:
        status = reply.status
        if status in (400, 422):
            error_obj = body.get("error") if isinstance(body, dict) else None
            err_type = error_obj.get("type") if isinstance(error_obj, dict) else None
            hint = "Fix: check the prompt and the request settings (MAX_NEW_TOKENS, TEMPERATURE)."
            if err_type == "exceed_context_size_error" or "context" in detail.lower():
                hint = "Fix: the prompt is too long for the model's context; shorten it or send fewer rows."
            return InvalidPromptError(f"The server rejected the request (HTTP {status}): {shown}", hint=hint, **context)
        if status in (401, 403):
            return ModelServerError(
                f"The server refused the request (HTTP {status}): {shown}",
                hint="Fix: set API_KEY to the key the server expects (it is sent as a bearer token).", **context,
            )
        if status == 404:
            return ModelServerError(
                f"The server at {self.server.base_url} has no {urlsplit(reply.url).path} endpoint (HTTP 404): {shown}",
                hint=f"Check that API_PROTOCOL (now {self.server.configured}) and API_PORT match the server.",
                **context,
            )
        extra = f" after {reply.attempts} attempts" if status in RETRY_STATUSES and reply.attempts > 1 else ""
        return ModelServerError(
            f"The model server at {reply.url} answered HTTP {status} {reply.reason}{extra}: {shown}",
            hint="Check the PC server's console for the cause.", **context,
        )


class ChatProtocol(Protocol):
    """What Ollama's and OpenAI's chat APIs share: a model name checked against a list."""

    models_path: ClassVar[str] = ""
    models_key: ClassVar[str] = ""

    def list_models(self, get: ProbeFn) -> ModelListing | None:
        probe = get(self.models_path)
        entries = probe.body.get(self.models_key) if isinstance(probe.body, dict) else None
        if probe.status != 200 or not isinstance(entries, list):
            logger.info("%s%s does not list models (HTTP %s)", self.server.base_url, self.models_path, probe.status)
            return None
        names, owners = [], []
        for entry in entries:
            name = self._entry_name(entry) if isinstance(entry, dict) else None
            if name:
                names.append(str(name))
                owners.append(str(entry.get("owned_by", "")))
        return ModelListing(tuple(names), tuple(owners))

    def _entry_name(self, entry: dict[str, Any]) -> Any:
        return entry.get("id")

    def _model_missing(self, status: int, detail: str, shown: str, model: str,
                       context: dict[str, Any]) -> ModelAPIError | None:
        lower = detail.lower()
        if status == 404 and "model" in lower and ("not found" in lower or "does not exist" in lower):
            return ModelNotLoadedError(
                f"The server at {self.server.base_url} does not have the model '{model}' (HTTP 404): {shown}",
                hint=f"Fix: {self.missing_model_action()}, or set MODEL_NAME to a model the server has.",
                **context,
            )
        return None

    def _special_error(self, status: int, detail: str, shown: str, model: str,
                       context: dict[str, Any]) -> ModelAPIError | None:
        missing = self._model_missing(status, detail, shown, model, context)
        return missing or super()._special_error(status, detail, shown, model, context)

    def _listed_health(self, report: HealthReport, listing: ModelListing) -> HealthReport | None:
        """Fill the report from the model list; a finished (not ready) report when the model is missing."""
        report.available_models = list(listing.names)
        model, problem = self.match_model(listing)
        if problem:
            report.detail = problem
            action = self.missing_model_action()
            report.fix = f"{action[0].upper()}{action[1:]}, or set MODEL_NAME to one of them."
            return report
        report.model_name = model
        return None
