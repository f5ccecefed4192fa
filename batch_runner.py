"""One model call per row: a bounded pool of worker threads, retries per row, early stops, Ctrl-C.

:class:`BatchRunner` takes prompts (:class:`RowTask`) from an iterator on the calling thread and
hands them through a small queue to ``concurrency`` worker threads, each of which asks the
model backend (``backend.generate(...)``; a server pool or one server) and passes the row's
record to ``write``. Memory stays flat: at most ``2 x concurrency`` prompts wait in the queue.

Failures, per row (:func:`classify`):

* **retry**: a request that reached a server but failed in a way another try may cure (a
  timeout, a dropped connection, HTTP 429/5xx, a model still loading, a garbled answer) is
  sent again after a backoff, up to ``attempts`` times in all, with ``retry_ambiguous=True``:
  in batch mode a row generated twice costs one answer, a row lost costs a rerun. Then the
  row is recorded as ``error`` and the run goes on.
* **outage**: no server could be reached at all. The row waits (backoff up to 8 s) without
  spending its attempts, so an outage does not turn rows into errors; when the servers stay
  unreachable longer than ``down_limit`` seconds the run stops.
* **fatal**: retrying any row is pointless (the model is missing, HTTP 401/403, a wrong
  endpoint, a configuration error): the run stops at once.
* **row**: this row's own problem (the server rejected its prompt): recorded as ``error``.

The run also stops when the first ``first_rows`` rows all fail the same way (a broken
template). On every stop the rows already recorded stay recorded; rows in flight finish.

Ctrl-C (KeyboardInterrupt on the calling thread): no new rows start, the rows in flight
finish and are recorded, and :meth:`BatchRunner.run` returns; a second Ctrl-C returns at once,
leaving the rows still in flight unrecorded (a rerun sends them). SIGTERM (``Terminated``)
returns at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from errors import (
    ExitCode,
    PipelineError,
    Terminated,
)
from result_ledger import row_record
from row_failure import Failure, classify
from retry_policy import backoff
from structured_output import AnswerSchema

logger = logging.getLogger(__name__)

#: Longest wait between two tries of a row while no server can be reached.
OUTAGE_WAIT_MAX = 8.0
#: How often the calling thread looks up from waiting (Ctrl-C, stops, the ledger's fsync).
POLL = 0.2


@dataclass(frozen=True)
class RowTask:
    """One row to send: its position in the result (0-based), its key (JSON) and its prompt."""

    index: int
    key: Any
    prompt: str


@dataclass(frozen=True)
class BatchSettings:
    """How rows are sent. ``prompt_tokens`` / ``prompt_chars``: a longer prompt is not sent
    (recorded as a PROMPT_ERROR); ``prompt_counter`` counts tokens when the byte size is over."""

    concurrency: int
    system_prompt: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    schema: AnswerSchema | None = None
    attempts: int = 3
    prompt_tokens: int | None = None
    prompt_chars: int | None = None
    prompt_counter: Any = None
    down_limit: float = 300.0
    first_rows: int = 5


@dataclass
class ServerTally:
    """What one server did in this run."""

    answers: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0


@dataclass
class Stop:
    """Why the run stopped early: the message, the exit code, and the error behind it (if any)."""

    message: str
    exit_code: int
    error: PipelineError | None = None


@dataclass
class BatchSummary:
    planned: int
    counts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "error": 0, "invalid": 0, "truncated": 0})
    wall_time: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    servers: dict[str, ServerTally] = field(default_factory=dict)
    stop: Stop | None = None
    interrupted: KeyboardInterrupt | None = None

    @property
    def finished(self) -> int:
        return sum(self.counts.values())

    @property
    def ok(self) -> int:
        return self.counts["ok"]

    @property
    def failed(self) -> int:
        return self.finished - self.ok

    @property
    def not_done(self) -> int:
        return max(0, self.planned - self.finished)


def _server_of(error: PipelineError) -> str:
    stats = getattr(error, "stats", None)
    server = _stat(stats, "server") if stats is not None else None
    if server:
        return server
    url = getattr(error, "url", None) or ""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else "(no server)"


class _Row:
    """What one row's requests added up to."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.attempts = 0
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.server: str | None = None
        self.finish_reason: str | None = None

    def add(self, stats: Any) -> None:
        if stats is None:
            return
        input_tokens, output_tokens = _stat(stats, "input_tokens"), _stat(stats, "generated_tokens")
        if isinstance(input_tokens, int):
            self.input_tokens = (self.input_tokens or 0) + input_tokens
        if isinstance(output_tokens, int):
            self.output_tokens = (self.output_tokens or 0) + output_tokens
        self.server = _stat(stats, "server") or self.server
        self.finish_reason = _stat(stats, "finish_reason")


def _stat(stats: Any, name: str) -> Any:
    """One figure from a GenerationStats, or from the stats dict an error may carry."""
    return stats.get(name) if isinstance(stats, dict) else getattr(stats, name, None)


class BatchRunner:
    """Send every row's prompt to ``backend`` with ``settings.concurrency`` threads.

    Args:
        backend: ``generate(prompt, system_prompt, max_new_tokens, temperature, *, json_schema,
            retry_ambiguous) -> Generation``.
        settings: :class:`BatchSettings`.
        write: records one finished row (called from worker threads; must be thread-safe).
        job: the job's fingerprint, put into every record.
        progress: ``update(done=1, failed=0|1)`` per finished row (a ``progress.ProgressBar``).
        tick: called on the calling thread about every ``POLL`` seconds (the ledger's fsync).
        notice: one line for the user (stderr), e.g. when Ctrl-C starts a stop.
        sleep, clock: injectable for tests (default: a sleep that a stop wakes, ``time.monotonic``).
    """

    def __init__(self, backend: Any, settings: BatchSettings, write: Callable[[dict[str, Any]], None], *,
                 job: str, progress: Any = None, tick: Callable[[], None] | None = None,
                 notice: Callable[[str], None] | None = None, sleep: Callable[[float], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backend = backend
        self.settings = settings
        self._write = write
        self._job = job
        self._progress = progress
        self._tick = tick or (lambda: None)
        self._notice = notice or (lambda message: None)
        self._stopping = threading.Event()
        self._sleep = sleep or self._stopping.wait
        self._clock = clock
        self._queue: queue.Queue[RowTask | None] = queue.Queue(maxsize=2 * settings.concurrency)
        self._lock = threading.Lock()
        self._summary = BatchSummary(0)
        self._first: list[tuple[str, str | None, PipelineError | None]] = []
        self._down_since: float | None = None
        self._in_flight = 0
        self._abandoned = False
        self._json_schema = settings.schema.schema if settings.schema is not None else None

    # --- the calling thread ---

    def run(self, tasks: Iterable[RowTask], planned: int) -> BatchSummary:
        """Send every task; return when all are recorded, the run stopped, or Ctrl-C."""
        summary = self._summary
        summary.planned = planned
        started = self._clock()
        threads = [threading.Thread(target=self._work, name=f"row-worker-{n + 1}", daemon=True)
                   for n in range(max(1, self.settings.concurrency))]
        for thread in threads:
            thread.start()
        try:
            self._feed(tasks)
            self._finish_feeding(threads)
            self._join(threads)
        except KeyboardInterrupt as exc:
            self._interrupted(exc, threads)
        summary.wall_time = self._clock() - started
        return summary

    def _feed(self, tasks: Iterable[RowTask]) -> None:
        for task in tasks:
            while not self._stopping.is_set():
                try:
                    self._queue.put(task, timeout=POLL)
                    break
                except queue.Full:
                    self._tick()
            if self._stopping.is_set():
                return
            self._tick()

    def _finish_feeding(self, threads: list[threading.Thread]) -> None:
        """One end marker per worker (workers skip the rest of the queue once stopping)."""
        for _ in threads:
            while True:
                try:
                    self._queue.put(None, timeout=POLL)
                    break
                except queue.Full:
                    self._tick()

    def _join(self, threads: list[threading.Thread]) -> None:
        for thread in threads:
            while thread.is_alive():
                thread.join(POLL)
                self._tick()

    def _interrupted(self, exc: KeyboardInterrupt, threads: list[threading.Thread]) -> None:
        self._summary.interrupted = exc
        self._stopping.set()
        if isinstance(exc, Terminated):
            self._abandoned = True
            return
        with self._lock:
            in_flight = self._in_flight
        if in_flight:
            self._notice(f"Stopping: no new rows; waiting for the {in_flight} row(s) in flight "
                         "(press Ctrl-C again to stop at once; a rerun sends them).")
        try:
            self._finish_feeding(threads)
            self._join(threads)
        except KeyboardInterrupt:
            self._abandoned = True

    def _stop(self, message: str, exit_code: int, error: PipelineError | None) -> None:
        with self._lock:
            if self._summary.stop is None:
                self._summary.stop = Stop(message, exit_code, error)
                logger.error("Stopping the run: %s", message)
        self._stopping.set()

    # --- the workers ---

    def _work(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            if self._stopping.is_set():
                continue  # not started: a rerun sends it
            with self._lock:
                self._in_flight += 1
            try:
                outcome = self._process(task)
                if outcome is not None and not self._abandoned:
                    self._finished(*outcome)
            except PipelineError as exc:  # the record could not be written (file, table)
                self._stop(f"results could not be recorded: {exc.message}", exc.exit_code, exc)
            except OSError as exc:  # a full disk, stdout closed by the reader (| head)
                code = ExitCode.BROKEN_PIPE if isinstance(exc, BrokenPipeError) else ExitCode.INTERNAL
                self._stop(f"results could not be written: {exc.strerror or exc}", code, None)
            except Exception as exc:  # noqa: BLE001 - a bug: stop cleanly rather than lose the thread
                logger.exception("Internal error while processing row %r", task.key)
                self._stop(f"internal error: {type(exc).__name__}: {exc}", 1, None)
            finally:
                with self._lock:
                    self._in_flight -= 1

    def _too_long(self, prompt: str) -> str | None:
        s = self.settings
        if s.prompt_chars is not None and len(prompt) > s.prompt_chars:
            return f"the prompt has {len(prompt):,} characters, more than --prompt-max-chars {s.prompt_chars:,}"
        limit = s.prompt_tokens
        if limit is None or 4 * len(prompt) <= limit or len(prompt.encode("utf-8", "replace")) <= limit:
            return None  # every token is at least one UTF-8 byte: no need to count
        tokens = s.prompt_counter.count(prompt) if s.prompt_counter is not None else None
        if tokens is None or tokens <= limit:
            return None
        return (f"the prompt needs {tokens:,} tokens, more than the {limit:,} left in the model's window "
                "(MODEL_CONTEXT_TOKENS - MAX_NEW_TOKENS - the system prompt)")

    def _process(self, task: RowTask) -> tuple[dict[str, Any], PipelineError | None] | None:
        """The row's record and the error behind it, or None when the row was not done (a stop)."""
        s = self.settings
        row = _Row(self._clock())
        problem = self._too_long(task.prompt)
        if problem is not None:
            return self._record(task, row, "error", error_code="PROMPT_ERROR",
                                error=f"Not sent: {problem}. Shorten the template or --max-cell-chars."), None
        prompt, failures, waits, repaired = task.prompt, 0, 0, False
        while True:
            if self._stopping.is_set() and (failures or waits or repaired):
                return None
            try:
                generation = self.backend.generate(prompt, s.system_prompt, s.max_new_tokens, s.temperature,
                                                   json_schema=self._json_schema, retry_ambiguous=True)
                text = generation.text
            except PipelineError as exc:
                kind = classify(exc)
                self._tally_failure(exc)
                if kind is Failure.OUTAGE:
                    waits += 1
                    if not self._wait_out_outage(exc, waits):
                        return None
                    continue
                self._note_up()
                if kind is Failure.FATAL:
                    self._stop(exc.message, exc.exit_code, exc)
                    return None
                row.attempts += 1
                row.add(exc.stats)
                failures += 1
                if kind is Failure.RETRY and failures < s.attempts and not self._stopping.is_set():
                    logger.warning("Row %r: %s (%s); trying again", task.key, exc.code, exc.message)
                    self._sleep(backoff(failures - 1, base=1.0))
                    continue
                return self._record(task, row, "error", answer=exc.partial_text or None, error_code=exc.code,
                                    error=exc.message, server=_server_of(exc)), exc
            self._note_up()
            row.attempts += 1
            row.add(generation.stats)
            self._tally_answer(generation.stats)
            if self._truncated(row, generation.stats):
                return self._record(task, row, "truncated", answer=text, error_code="TRUNCATED",
                                    error="The answer was cut off at the token limit (MAX_NEW_TOKENS)."), None
            if s.schema is None:
                return self._record(task, row, "ok", answer=text), None
            value, problem = s.schema.check(text)
            if problem is None:
                return self._record(task, row, "ok", answer=text, parsed=value), None
            if not repaired:
                repaired = True
                prompt = s.schema.repair_prompt(task.prompt, text, problem)
                continue
            return self._record(task, row, "invalid", answer=text, parsed=value, error_code="INVALID_ANSWER",
                                error=f"The answer does not match the schema: {problem}"), None

    def _truncated(self, row: _Row, stats: Any) -> bool:
        reason = getattr(stats, "finish_reason", None)
        if reason is not None:
            return reason == "length"
        limit, generated = self.settings.max_new_tokens, getattr(stats, "generated_tokens", None)
        return isinstance(generated, int) and limit is not None and generated >= limit

    def _record(self, task: RowTask, row: _Row, status: str, **fields: Any) -> dict[str, Any]:
        fields.setdefault("server", row.server)
        return row_record(task.key, status, self._job, schema=self.settings.schema is not None,
                          attempts=row.attempts, input_tokens=row.input_tokens, output_tokens=row.output_tokens,
                          seconds=self._clock() - row.started, finish_reason=row.finish_reason, **fields)

    # --- outages ---

    def _wait_out_outage(self, error: PipelineError, waits: int) -> bool:
        """Wait before trying again while no server answers; False once the outage is too long."""
        now = self._clock()
        with self._lock:
            starting = self._down_since is None
            if starting:
                self._down_since = now
            down_for = now - self._down_since
        limit = self.settings.down_limit
        if down_for >= limit:
            self._stop(f"no model server could be reached for {down_for:.0f} s (more than {limit:g} s): "
                       f"{error.message}", error.exit_code, error)
            return False
        if starting:  # once per outage, not once per row waiting in it
            logger.warning("No model server reachable (%s); rows wait, up to %g s in all", error.message, limit)
        self._sleep(min(backoff(waits - 1, base=1.0), OUTAGE_WAIT_MAX))
        return not self._stopping.is_set()

    def _note_up(self) -> None:
        if self._down_since is not None:
            with self._lock:
                since, self._down_since = self._down_since, None
            if since is not None:
                logger.warning("A model server answers again after %.0f s; the rows go on", self._clock() - since)

    # --- bookkeeping ---

    def _tally_answer(self, stats: Any) -> None:
        server = getattr(stats, "server", None) or "(unknown server)"
        with self._lock:
            tally = self._summary.servers.setdefault(server, ServerTally())
            tally.answers += 1
            if isinstance(getattr(stats, "input_tokens", None), int):
                tally.input_tokens += stats.input_tokens
                self._summary.input_tokens += stats.input_tokens
            if isinstance(getattr(stats, "generated_tokens", None), int):
                tally.output_tokens += stats.generated_tokens
                self._summary.output_tokens += stats.generated_tokens
            if isinstance(getattr(stats, "wall_time", None), (int, float)):
                tally.seconds += stats.wall_time

    def _tally_failure(self, error: PipelineError) -> None:
        with self._lock:
            self._summary.servers.setdefault(_server_of(error), ServerTally()).failures += 1

    def _finished(self, record: dict[str, Any], error: PipelineError | None) -> None:
        self._write(record)
        status = record["status"]
        with self._lock:
            self._summary.counts[status] += 1
            first = len(self._first) < self.settings.first_rows
            if first:
                self._first.append((status, record.get("error_code"), error))
        if self._progress is not None:
            self._progress.update(done=1, failed=0 if status == "ok" else 1)
        if first and len(self._first) == self.settings.first_rows:
            self._check_first_rows()

    def _check_first_rows(self) -> None:
        """Stop when the first rows all failed the same way: every other row would too."""
        signatures = {(status, code) for status, code, _ in self._first}
        if len(signatures) != 1:
            return
        status, code = signatures.pop()
        if status == "ok":
            return
        error = self._first[-1][2]
        count = len(self._first)
        why = f"{status} ({code})" + (f": {error.message}" if error is not None else "")
        self._stop(f"the first {count} rows all failed the same way, {why}; going on would most likely fail "
                   "every row (check the template, --schema and MAX_NEW_TOKENS)",
                   error.exit_code if error is not None else ExitCode.ROWS_FAILED, error)
