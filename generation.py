"""Typed results of talking to a model server.

* :class:`GenerationStats`: the normalised statistics of one answer, whatever the protocol
  (seconds, token counts, the server that produced it). ``as_dict()`` gives the plain dict
  the public API has always returned.
* :class:`Generation`: one answer. Non-streamed, it holds the whole text. Streamed, iterating
  it yields the text pieces as they arrive (consuming the stream, like a file); ``.text``
  afterwards is the joined text and ``.stats`` is complete. Closing it closes the HTTP
  response, so the server sees the client go away.
* :class:`StreamProgress`: what a streamed answer has delivered so far, shared by the line
  reader, the protocol's event parser and the Generation, so that an error raised anywhere
  in the chain carries the partial answer and the stats known so far.
* :class:`HealthReport`: what a health check found.

This module imports nothing from the rest of the project except ``errors``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterator

from errors import BadResponseError

logger = logging.getLogger(__name__)

# The keys of the stats dict of the public API, in order (``GenerationStats`` fields).
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
    "server",
    "measured",
)
# Stats in seconds: rounded to milliseconds wherever stats are shown or returned.
TIME_KEYS = frozenset({"generation_time", "wall_time"})


@dataclass
class GenerationStats:
    """Normalised statistics of one answer; None where the server did not say.

    Times are seconds (Ollama's nanoseconds and llama.cpp's milliseconds are converted).
    ``generation_time`` is the server's own measure (prompt evaluation + generation);
    ``wall_time`` is what the client waited, from sending the request to the last byte.
    ``measured`` names the figures the client worked out itself because the server did not
    report them (see :func:`fill_measured`): ``generated_tokens`` there is a count of streamed
    pieces (approximate: a piece is usually, not always, one token), ``tokens_per_second`` is
    computed from the client's clock.
    """

    generation_time: float | None = None
    input_tokens: int | None = None
    generated_tokens: int | None = None
    total_tokens: int | None = None
    tokens_per_second: float | None = None
    wall_time: float | None = None
    protocol: str | None = None
    model: str | None = None
    finish_reason: str | None = None
    server: str | None = None
    measured: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The plain stats dict (keys :data:`STATS_KEYS`), as ``send_prompt`` returns it.

        Times are rounded to milliseconds and tokens per second to two decimals; ``measured``
        is a list (JSON has no tuples).
        """
        stats = asdict(self)
        for key in TIME_KEYS:
            if isinstance(stats[key], float):
                stats[key] = round(stats[key], 3)
        if isinstance(stats["tokens_per_second"], float):
            stats["tokens_per_second"] = round(stats["tokens_per_second"], 2)
        stats["measured"] = list(self.measured)
        return stats


def fill_measured(stats: GenerationStats, *, pieces: int | None = None, seconds: float | None = None) -> None:
    """Fill in, from what the client saw, the figures the server did not report; name them in ``measured``.

    Some servers report less: llama-cpp-python sends no usage when streaming, vLLM and
    llama-cpp-python send no timings. ``pieces`` (the streamed text pieces received) stands in
    for the generated tokens; ``seconds`` (the client's time for the generation: from the first
    streamed piece to the end, or the whole wait for an answer that came at once) gives tokens
    per second. Figures the server gave are never replaced.
    """
    measured = list(stats.measured)
    if stats.generated_tokens is None and pieces is not None:
        stats.generated_tokens = pieces
        measured.append("generated_tokens")
        if stats.total_tokens is None and stats.input_tokens is not None:
            stats.total_tokens = stats.input_tokens + pieces
            measured.append("total_tokens")
    if stats.tokens_per_second is None and stats.generated_tokens and seconds and seconds > 0:
        stats.tokens_per_second = stats.generated_tokens / seconds
        measured.append("tokens_per_second")
    stats.measured = tuple(dict.fromkeys(measured))


assert tuple(f.name for f in fields(GenerationStats)) == STATS_KEYS


@dataclass
class HealthReport:
    """What a health check found. ``ok`` means: ready to generate."""

    ok: bool
    reachable: bool
    protocol: str | None = None
    model_ready: bool = False
    model_name: str | None = None
    available_models: list[str] | None = None
    detail: str = ""
    fix: str | None = None
    server: str | None = None
    server_kind: str | None = None  # what detection found ("llama.cpp", "Ollama 0.5.1" ...)
    concurrency: int | None = None  # generations the client sends it at once (a pool's limit)
    concurrency_source: str | None = None  # where that limit comes from ("#slots", "the server" ...)


@dataclass
class StreamProgress:
    """The pieces of a streamed answer received so far, and its stats so far."""

    stats: GenerationStats
    pieces: list[str] = field(default_factory=list)
    size: int = 0  # UTF-8 bytes of the pieces

    def add(self, piece: str) -> None:
        self.pieces.append(piece)
        self.size += len(piece.encode("utf-8"))

    def text(self) -> str:
        return "".join(self.pieces)


class Generation:
    """One answer from a model server: its text, its stats and, when streamed, its pieces.

    Build one with :meth:`complete` (the whole answer at once) or :meth:`streamed`. Iterating
    yields the text pieces; a complete answer yields its text as one piece, so callers can
    treat both alike. Iteration consumes a stream: a second loop yields only what was not
    read yet. ``.text`` reads whatever is left and returns the whole answer. Errors raised
    while reading (a cut stream, a timeout) carry ``partial_text`` and ``stats``.
    """

    def __init__(
        self,
        stats: GenerationStats,
        *,
        text: str | None = None,
        events: Iterator[str] | None = None,
        progress: StreamProgress | None = None,
        close: Callable[[], None] | None = None,
        started: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int | None = None,
        url: str | None = None,
    ) -> None:
        self._stats = stats
        self._events = events
        self._progress = progress if progress is not None else StreamProgress(stats)
        self._close = close
        self._started = started
        self._clock = clock
        self._max_bytes = max_bytes
        self._url = url
        self._done = events is None
        self._iterator: Iterator[str] | None = None
        self._closed = False
        self._first_piece_at: float | None = None  # when the first text arrived, for a measured speed
        self._callbacks: list[Callable[[BaseException | None], None]] = []
        self._ended = events is None  # a complete answer has ended already
        if text is not None:
            self._progress.add(text)

    @classmethod
    def complete(cls, text: str, stats: GenerationStats) -> Generation:
        """An answer that arrived whole (non-streamed, or a server that does not stream)."""
        return cls(stats, text=text)

    @classmethod
    def streamed(
        cls,
        events: Iterator[str],
        progress: StreamProgress,
        *,
        close: Callable[[], None],
        started: float,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int | None = None,
        url: str | None = None,
    ) -> Generation:
        """An answer still arriving: ``events`` yields its text pieces.

        ``close`` releases the HTTP response; ``max_bytes`` caps the accumulated answer
        (``API_MAX_RESPONSE_BYTES``); ``started`` is when the request was sent (for
        ``wall_time``).
        """
        return cls(progress.stats, events=events, progress=progress, close=close, started=started, clock=clock,
                   max_bytes=max_bytes, url=url)

    # --- reading ---

    def __iter__(self) -> Iterator[str]:
        # One iterator for the life of the answer: a second loop continues where the first stopped.
        if self._iterator is None:
            self._iterator = self._read()
        return self._iterator

    def _read(self) -> Iterator[str]:
        if self._events is None:
            text = self._progress.text()
            if text:
                yield text
            return
        try:
            for piece in self._events:
                if self._closed:
                    return
                if self._first_piece_at is None:
                    self._first_piece_at = self._clock()
                self._progress.add(piece)
                self._check_size()
                yield piece
            if not self._closed:
                self._finish()
        except Exception as exc:
            self._end(exc)
            raise
        finally:
            if not self._done:
                self._measure()  # the stats so far (an error or Ctrl-C reports them)
                self._release()  # abandoned, interrupted or failed: let the server know at once

    def _check_size(self) -> None:
        if self._max_bytes is not None and self._progress.size > self._max_bytes:
            raise BadResponseError(
                f"The streamed answer from {self._url or 'the model server'} grew past "
                f"API_MAX_RESPONSE_BYTES={self._max_bytes:,} bytes; the rest was not read.",
                hint="The partial answer was kept. Raise API_MAX_RESPONSE_BYTES if answers this long are "
                "expected, or lower MAX_NEW_TOKENS.",
                url=self._url,
                partial_text=self._progress.text(),
                stats=self._stats,
            )

    def _finish(self) -> None:
        self._done = True
        self._measure()
        self._release()
        self._end(None)
        logger.info(
            "Stream from %s finished: %d pieces, %d chars in %.2f s",
            self._url, len(self._progress.pieces), len(self.partial_text), self._stats.wall_time or 0.0,
        )

    def _measure(self) -> None:
        """Set ``wall_time``, and fill in what the server did not report from the pieces and the clock."""
        now = self._clock()
        if self._started is not None:
            self._stats.wall_time = now - self._started
        # The speed over the generation itself: from the first piece to the end (the wait before
        # the first piece is the prompt's evaluation); with one piece, the whole wait.
        first = self._first_piece_at
        seconds = now - first if first is not None and len(self._progress.pieces) > 1 else self._stats.wall_time
        fill_measured(self._stats, pieces=len(self._progress.pieces), seconds=seconds)

    @property
    def text(self) -> str:
        """The whole answer; reads the rest of a stream first."""
        if self._events is not None and not self._done and not self._closed:
            for _ in self:
                pass
        return self._progress.text()

    @property
    def partial_text(self) -> str:
        """What has arrived so far (the whole text once the answer is complete)."""
        return self._progress.text()

    @property
    def stats(self) -> GenerationStats:
        """The answer's stats; complete once the answer is (``wall_time`` set at the end)."""
        return self._stats

    @property
    def done(self) -> bool:
        """True once the whole answer has arrived."""
        return self._done

    @property
    def is_streamed(self) -> bool:
        return self._events is not None

    def close(self) -> None:
        """Stop reading and close the HTTP response (idempotent)."""
        self._closed = True
        iterator = self._iterator
        if iterator is not None and hasattr(iterator, "gi_running") and not iterator.gi_running:
            iterator.close()  # type: ignore[attr-defined]
        self._release()

    def _release(self) -> None:
        close, self._close = self._close, None
        if close is None:
            return
        try:
            if self._events is not None and hasattr(self._events, "close"):
                self._events.close()  # type: ignore[union-attr]
            close()
        finally:
            self._end(None)

    # --- the end of the answer ---

    def add_done_callback(self, callback: Callable[[BaseException | None], None]) -> None:
        """Call ``callback(error)`` once the answer has ended: whole (None), failed (the error) or
        closed before the end (None). A complete answer has ended already: called at once.

        A server pool uses it to free the server's slot when a stream ends.
        """
        if self._ended:
            callback(None)
        else:
            self._callbacks.append(callback)

    def _end(self, error: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(error)

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "done" if self._done else "streaming"
        return f"<Generation {state}, {len(self.partial_text)} chars, {self._stats.protocol}:{self._stats.model}>"
