"""Run a level of independent model calls at once: reuse checkpointed answers, retry, record, count.

One :class:`CallRunner` serves every level of a question over every row (the map calls, then
each reduce level). For each call it first looks in the checkpoint; the calls still to do go
to ``concurrency`` worker threads, which send them through the backend (anything with
``generate(prompt, system_prompt, max_new_tokens, temperature, *, retry_ambiguous)`` and
``capacity``). A worker records each answer in the checkpoint the moment it arrives, so it is
durable before the next call starts.

A failed call is retried a bounded number of times with a growing pause, when retrying can help
(unreachable, timed out, cut off, a 5xx or 429); a request the server refused as invalid, or a
model that is not there, fails at once. When a call fails for good, no new call starts, the
calls already running finish (their answers are recorded), and the first error is raised.
Worker threads are daemons: Ctrl-C returns at once and answers recorded so far stay recorded.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, TextIO

from errors import (
    BadResponseError,
    InvalidPromptError,
    ModelAPIError,
    ModelConnectionError,
    ModelNotLoadedError,
    ModelServerError,
    ModelTimeoutError,
)
from generation import GenerationStats
from mr_checkpoint import Checkpoint
from progress import ProgressBar
from token_count import log_difference

logger = logging.getLogger(__name__)

#: Attempts per call in all, unless told otherwise (the command passes API_MAX_ATTEMPTS); the
#: transport's own retries of refused connections and 429/503 happen within each attempt.
CALL_ATTEMPTS = 3
#: Pause before the second attempt, doubled for each later one.
FIRST_PAUSE = 0.5


@dataclass
class Call:
    """One model call of a run: what it asks (rows or answers below it) and, once done, its answer."""

    stage: str  # "map" or "reduce"
    level: int  # 0 for map calls, 1, 2 ... for reduce levels
    index: int  # position in its level
    first_row: int  # 1-based, inclusive
    last_row: int
    key: str  # mr_checkpoint.call_key of the request
    prompt_tokens: int
    prompt_chars: int
    counter: str  # which counter gave prompt_tokens
    inputs: tuple[int, ...] = ()  # reduce: the answers of the level below it combines
    shortened: tuple[dict[str, int], ...] = ()  # map: rows cut to fit ({"row": n, "max_cell_chars": k})
    answer: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    reused: bool = False
    attempts: int = 0
    error: str | None = None
    carried: bool = False  # reduce: a group of one answer, passed up unchanged without a call

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def retryable(error: ModelAPIError) -> bool:
    """Whether another attempt at the same call can succeed."""
    if isinstance(error, (InvalidPromptError, ModelNotLoadedError)):
        return False
    if isinstance(error, ModelServerError):
        return error.status is None or error.status >= 500 or error.status == 429
    return isinstance(error, (ModelConnectionError, ModelTimeoutError, BadResponseError))


def _stats_dict(stats: Any) -> dict[str, Any]:
    if isinstance(stats, GenerationStats):
        return stats.as_dict()  # times rounded to milliseconds
    if stats is None:
        return {}
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return dataclasses.asdict(stats)
    return dict(stats)


class TokenCheck:
    """Our prompt token counts against the servers' own (pc and Ollama report them), summed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = 0
        self.ours = 0
        self.theirs = 0

    def add(self, call: Call, extra: int, reported: Any) -> None:
        """Log one call's difference (``extra``: tokens outside the prompt, such as the system prompt)."""
        if not isinstance(reported, int) or isinstance(reported, bool) or reported <= 0:
            return
        ours = call.prompt_tokens + extra
        log_difference(ours, call.counter, reported, f"{call.stage} call {call.index + 1} (level {call.level})")
        with self._lock:
            self.calls += 1
            self.ours += ours
            self.theirs += reported

    def summary(self) -> dict[str, Any] | None:
        if not self.calls:
            return None
        return {"calls": self.calls, "our_tokens": self.ours, "server_tokens": self.theirs,
                "server_over_ours": round(self.theirs / max(self.ours, 1), 4)}


@dataclass
class CallSettings:
    """What every call of a run sends besides its prompt, and how the calls run."""

    system_prompt: str | None
    max_new_tokens: int
    temperature: float | None
    concurrency: int
    system_tokens: int = 0  # tokens of the system prompt and its separator, for the token check
    attempts: int = CALL_ATTEMPTS
    sleep: Callable[[float], None] | None = None  # None: wait on the run's stop event


class CallRunner:
    """Runs levels of calls through ``backend``, reusing and recording answers in ``checkpoint``."""

    def __init__(self, backend: Any, settings: CallSettings, checkpoint: Checkpoint | None, *,
                 stream: TextIO | None = None, quiet: bool = True) -> None:
        self.backend = backend
        self.settings = settings
        self.checkpoint = checkpoint
        self.tokens = TokenCheck()
        self._stream, self._quiet = stream, quiet
        self._stop = threading.Event()
        self._cut_said = threading.Event()
        self._bar: ProgressBar | None = None
        self._total: int | None = None  # of the level running or about to run, once known
        self._bar_lock = threading.Lock()

    def run(self, jobs: Iterable[tuple[Call, str]], label: str, total: int | None = None) -> None:
        """Answer every call (filling ``answer``, ``stats``, ``reused``, ``attempts``); raise the first failure.

        ``jobs`` yields ``(call, prompt)`` and is read in this thread, only while fewer than twice
        ``concurrency`` calls wait or run, so no more prompts than that are held. ``total`` (when
        known) sizes the progress bar; else :meth:`set_total` does once it is known, or the end
        of ``jobs``.
        """
        bar = None
        with self._bar_lock:
            total = total if total is not None else self._total
            if self._stream is not None:
                bar = self._bar = ProgressBar(total, unit="calls", stream=self._stream, quiet=self._quiet,
                                              label=label)
        try:
            self._run_workers(iter(jobs), bar)
        finally:
            with self._bar_lock:
                self._bar, self._total = None, None
            if bar is not None:
                bar.close()

    def set_total(self, total: int) -> None:
        """The calls planned for the level that runs next or now (from any thread)."""
        with self._bar_lock:
            self._total = total
            if self._bar is not None:
                self._bar.set_total(total)

    def _reuse(self, call: Call) -> bool:
        record = self.checkpoint.get(call.key) if self.checkpoint is not None else None
        if record is None:
            return False
        call.answer, call.stats = record["answer"], dict(record.get("stats") or {})
        call.reused, call.attempts = True, int(record.get("attempts") or 0)
        return True

    def _run_workers(self, pending: Iterator[tuple[Call, str]], bar: ProgressBar | None) -> None:
        jobs: queue.Queue[tuple[Call, str] | None] = queue.Queue()
        done: queue.Queue[tuple[Call, BaseException | None]] = queue.Queue()
        workers = max(1, self.settings.concurrency)
        threads = 0
        in_flight = seen = 0
        exhausted = False
        failure: BaseException | None = None
        try:
            while True:
                while failure is None and not exhausted and in_flight < 2 * workers:
                    item = next(pending, None)
                    if item is None:
                        exhausted = True
                        if bar is not None and bar.total is None:
                            bar.set_total(seen)
                        break
                    call, prompt = item
                    seen += 1
                    if self._reuse(call):
                        if bar is not None:
                            bar.update(1)
                        continue
                    if threads < min(workers, in_flight + 1):  # threads only for calls actually sent
                        threading.Thread(target=self._work, args=(jobs, done), name=f"model-call-{threads + 1}",
                                         daemon=True).start()
                        threads += 1
                    jobs.put((call, prompt))
                    in_flight += 1
                if in_flight == 0:
                    break
                call, error = _next_result(done)
                in_flight -= 1
                if error is _NOT_STARTED:
                    continue
                if bar is not None:
                    bar.update(1, failed=1 if error else 0)
                if error is not None and failure is None:
                    failure = error
                    self._stop.set()  # pauses before retries end at once
        except BaseException:  # Ctrl-C: no more retries either
            self._stop.set()
            raise
        finally:
            for _ in range(threads):
                jobs.put(None)
        if failure is not None:
            raise failure

    def _work(self, jobs: queue.Queue[tuple[Call, str] | None], done: queue.Queue[Any]) -> None:
        while (job := jobs.get()) is not None:
            call, prompt = job
            if self._stop.is_set():  # another call failed for good: queued calls are not started
                done.put((call, _NOT_STARTED))
                continue
            try:
                self._call(call, prompt)
            except Exception as exc:  # noqa: BLE001 - handed to the main thread, which raises it
                call.error = f"{type(exc).__name__}: {exc}"
                self._stop.set()  # before this worker takes the next queued call
                done.put((call, exc))
            else:
                done.put((call, None))

    def _call(self, call: Call, prompt: str) -> None:
        s = self.settings
        for attempt in range(1, s.attempts + 1):
            call.attempts = attempt
            try:
                generation = self.backend.generate(prompt, s.system_prompt, s.max_new_tokens, s.temperature,
                                                   retry_ambiguous=True)
                text = generation.text
            except ModelAPIError as exc:
                if attempt == s.attempts or not retryable(exc) or self._stop.is_set():
                    raise
                pause = FIRST_PAUSE * 2 ** (attempt - 1)
                logger.warning("%s call %d (%s) failed: %s; trying again in %.1f s (attempt %d of %d)",
                               call.stage, call.index + 1, _rows(call), exc.message, pause, attempt + 1, s.attempts)
                if s.sleep is not None:
                    s.sleep(pause)
                elif self._stop.wait(pause):
                    raise
                continue
            call.answer, call.stats, call.error = text, _stats_dict(generation.stats), None
            self.tokens.add(call, s.system_tokens, call.stats.get("input_tokens"))
            if answer_was_cut(call.stats, s.max_new_tokens) and not self._cut_said.is_set():
                self._cut_said.set()  # said once; the statistics count every such answer
                logger.warning("The answer of %s call %d (%s) was cut at MAX_NEW_TOKENS=%d, so it is incomplete; "
                               "the final answer may miss what it left out. Raise --max-new-tokens for this job.",
                               call.stage, call.index + 1, _rows(call), s.max_new_tokens)
            if self.checkpoint is not None:
                self._record(call)
            return

    def _record(self, call: Call) -> None:
        record = {k: v for k, v in call.as_dict().items() if k not in ("reused", "error")}
        try:
            self.checkpoint.record(record)  # type: ignore[union-attr]
        except (OSError, ValueError) as exc:  # a full disk, or the run already closed it after Ctrl-C
            logger.warning("Could not record the answer of %s call %d in the checkpoint: %s", call.stage,
                           call.index + 1, exc)


#: What a worker reports for a queued call it did not start because the run is stopping.
_NOT_STARTED = RuntimeError("not started: the run is stopping")


def answer_was_cut(stats: dict[str, Any], max_new_tokens: int | None) -> bool:
    """Whether an answer stopped at the token limit: the server says so (``finish_reason``
    ``length``), or, for a server that gives no reason (the pc one), it used every token."""
    reason = stats.get("finish_reason")
    if reason is not None:
        return reason == "length"
    generated = stats.get("generated_tokens")
    return max_new_tokens is not None and isinstance(generated, int) and generated >= max_new_tokens


def _rows(call: Call) -> str:
    return f"rows {call.first_row:,}–{call.last_row:,}"


def _next_result(done: queue.Queue[Any]) -> tuple[Call, BaseException | None]:
    """The next finished call; waits in short steps so that Ctrl-C is seen at once."""
    while True:
        try:
            return done.get(timeout=0.2)
        except queue.Empty:
            continue
