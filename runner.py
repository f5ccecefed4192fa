"""One question about a query's rows: query -> prompt -> model, recorded in a typed run result.

:func:`run_question` is the pipeline itself. It fills a :class:`RunResult` step by step (the
rows, then the prompt, then the answer as it arrives), so whoever passed that object in can
still read the rows, the prompt's figures, the partial answer and the statistics after an
exception or Ctrl-C; nothing is attached to the exception. :func:`run_pipeline` is the same
run for scripts, with the ``(response, stats, db_data)`` return they already use.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import config
import prompt_builder
import token_count
from config import Settings
from db_connector import RowStream
from errors import ModelAPIError
from generation import GenerationStats
from prompt_builder import PromptResult
from resources import shared_database, shared_model_pool

logger = logging.getLogger(__name__)

DEFAULT_FETCH_ROWS = 10_000  # rows read from the database; far more than a 16K-token prompt holds


@dataclass(frozen=True)
class Question:
    """What to ask about which rows: everything a run needs besides the settings.

    ``max_new_tokens`` and ``temperature`` default to the settings' values; the prompt limits
    (``prompt_rows``, ``prompt_tokens``, ``prompt_chars``) default to the model's window.
    """

    query: str
    template: str | None = None
    context: str | None = None
    params: Mapping[str, Any] | Sequence[Any] | None = None
    system_prompt: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    data_format: str = "markdown"
    fetch_rows: int | None = DEFAULT_FETCH_ROWS
    prompt_rows: int | None = None
    prompt_tokens: int | None = None
    prompt_chars: int | None = None
    max_cell_chars: int | None = prompt_builder.DEFAULT_MAX_CELL_CHARS


def _as_dict(stats: Any) -> dict[str, Any]:
    """The model's statistics as a plain dict, whether it gave a mapping or a dataclass."""
    if stats is None:
        return {}
    if isinstance(stats, GenerationStats):
        return stats.as_dict()  # times rounded to milliseconds
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return dataclasses.asdict(stats)
    return dict(stats)


@dataclass
class RunResult:
    """One run of query -> prompt -> model, filled in as it goes.

    ``db_time`` is set once the query has run, ``prompt`` once the prompt is built, ``pieces``
    grows as a streamed answer arrives, and ``answer`` is set only when the whole answer is in.
    """

    query: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    more_rows: bool = False  # the query had more rows than were fetched
    db_time: float | None = None
    prompt: PromptResult | None = None
    pieces: list[str] = field(default_factory=list)
    answer: str | None = None
    model_stats: Any = field(default_factory=dict)  # the model client's stats (a mapping or a dataclass)
    total_time: float | None = None

    @property
    def queried(self) -> bool:
        """The query has run (it may have returned no rows)."""
        return self.db_time is not None

    @property
    def rows_shown(self) -> int:
        return self.prompt.rows_shown if self.prompt else 0

    @property
    def rows_total(self) -> int:
        return self.prompt.rows_total if self.prompt else 0

    @property
    def truncated(self) -> bool:
        return bool(self.prompt and self.prompt.truncated)

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.prompt.warnings if self.prompt else ()

    @property
    def complete(self) -> bool:
        """The whole answer arrived."""
        return self.answer is not None

    @property
    def received_text(self) -> str:
        """The answer as far as it arrived (all of it once complete)."""
        return self.answer if self.answer is not None else "".join(self.pieces)

    def db_data(self) -> dict[str, Any]:
        """``{"query", "results", "row_count", "columns", "more_rows"}`` (the last two once queried)."""
        count = max(self.rows_total, len(self.rows))
        data: dict[str, Any] = {"query": self.query, "results": self.rows, "row_count": count}
        if self.queried:
            data.update(columns=self.columns, more_rows=self.more_rows)
        return data

    def stats(self) -> dict[str, Any]:
        """Every figure known so far, flat: rows, prompt size, the model's statistics, total time."""
        stats: dict[str, Any] = {}
        if self.queried:
            stats.update(rows_fetched=len(self.rows), more_rows=self.more_rows, db_time=self.db_time)
            if not self.rows:
                stats.update(rows_shown=0, rows_total=0, truncated=False)
        if self.prompt is not None:
            p = self.prompt
            stats.update(rows_shown=p.rows_shown, rows_total=p.rows_total, truncated=p.truncated,
                         prompt_chars=p.char_count, prompt_tokens_estimate=p.estimated_tokens,
                         prompt_token_counter=p.token_counter,
                         prompt_warnings=list(p.warnings))
        stats.update(_as_dict(self.model_stats))
        if self.total_time is not None:
            stats["total_time"] = self.total_time
        return stats


def run_question(
    question: Question,
    settings: Settings,
    run: RunResult | None = None,
    *,
    stream: bool = False,
    on_text: Callable[[str], None] | None = None,
    dry_run: bool = False,
    progress: Callable[[str], None] | None = None,
    waiting: Callable[[str], ContextManager[Any]] | None = None,
) -> RunResult:
    """Run query -> prompt -> model, recording each step in ``run`` (a new one by default).

    No rows: nothing is sent to the model (``run.answer`` stays None). ``dry_run``: stops once
    the prompt is built (``run.prompt``). With ``stream``, ``on_text`` receives the answer's
    pieces as they arrive. ``waiting(server_url)`` is entered around the wait for the server's
    answer to begin (the whole answer when it is not streamed; the CLI shows a spinner there).
    Raises :class:`errors.PipelineError` subclasses; ``run`` then holds what was done before
    the error.
    """
    run = RunResult(question.query) if run is None else run
    q = question
    max_new_tokens = settings.max_new_tokens if q.max_new_tokens is None else q.max_new_tokens
    started = time.perf_counter()
    # Rows stream from a server-side cursor into the prompt, which stops reading once it is full
    # and has the rest counted without transferring them: memory follows the prompt, not
    # --max-rows. The connection goes back to the pool (idle, no open transaction) before the
    # model is asked.
    # (Named row_stream: ``stream`` is the caller's choice of a streamed answer, used below.)
    with shared_database(settings).stream_rows(q.query, q.params, max_rows=q.fetch_rows) as row_stream:
        run.columns = row_stream.columns
        rows = _RecordedRows(row_stream, run.rows)
        if not rows.peek():
            run.db_time = round(time.perf_counter() - started, 3)
            logger.info("Query returned no rows; nothing sent to the model")
            return run
        prompt = run.prompt = prompt_builder.build_prompt(
            {"query": q.query, "results": rows, "columns": row_stream.columns}, q.template, q.context,
            data_format=q.data_format, max_tokens=q.prompt_tokens, max_chars=q.prompt_chars,
            max_rows=q.prompt_rows, max_cell_chars=q.max_cell_chars,
            context_tokens=settings.model_context_tokens, max_new_tokens=max_new_tokens,
            system_prompt=q.system_prompt,
        )
        run.more_rows = row_stream.has_more
    run.db_time = round(time.perf_counter() - started, 3)
    at_least = "" if prompt.rows_total_exact and not run.more_rows else "at least "
    logger.info("Query returned %s%d row(s); %d read for the prompt in %.3f s", at_least, prompt.rows_total,
                len(run.rows), run.db_time)
    logger.info("Prompt built: %d of %s%d rows, %d chars, %d tokens (%s)%s", prompt.rows_shown,
                at_least, prompt.rows_total,
                prompt.char_count, prompt.estimated_tokens, prompt.token_counter,
                " (truncated)" if prompt.truncated else "")
    if dry_run:
        return run

    # Single-question mode: a request that may already be generating is never sent to a second
    # server (the pool's default), so the partial answer is kept and nothing is generated twice.
    client = shared_model_pool(settings)
    if progress:
        rows_text = "1 row" if prompt.rows_shown == 1 else f"{prompt.rows_shown:,} rows"
        progress(f"Sending {rows_text} ({prompt.char_count:,} chars) to {client.display} ...")
    try:
        generation = _ask(client, prompt.text, q, max_new_tokens, run, stream, on_text, waiting)
        response = generation.text
        run.model_stats = generation.stats  # includes "server", the base URL of the server that answered
    except ModelAPIError as exc:
        _keep_error_context(run, exc)
        _keep_known(run, client)
        raise
    except KeyboardInterrupt:
        _keep_known(run, client)
        raise
    run.answer = response
    run.total_time = round(time.perf_counter() - started, 3)
    token_count.log_difference(prompt.estimated_tokens, prompt.token_counter,
                               getattr(generation.stats, "input_tokens", None))
    return run


def _ask(client: Any, prompt: str, q: Question, max_new_tokens: int, run: RunResult, stream: bool,
         on_text: Callable[[str], None] | None, waiting: Callable[[str], ContextManager[Any]] | None) -> Any:
    """Send the prompt; a streamed answer's pieces go to ``run.pieces`` and ``on_text`` as they arrive."""
    wait = waiting(client.display) if waiting else nullcontext()
    if not stream:
        with wait:
            return client.generate(prompt, q.system_prompt, max_new_tokens, q.temperature)
    with wait:  # a server that does not stream (the pc one) sends the whole answer here
        generation = client.stream(prompt, q.system_prompt, max_new_tokens, q.temperature)
    with generation:
        run.model_stats = generation.stats  # filled in as the answer arrives; kept on Ctrl-C
        for piece in generation:
            run.pieces.append(piece)
            if on_text:
                on_text(piece)
    return generation


class _RecordedRows:
    """A row stream that keeps every row it hands out (the rows the prompt read) in ``sink``.

    ``count_remaining`` and ``has_more`` pass through, so the prompt can say how many rows there
    were in all without reading them.
    """

    def __init__(self, stream: RowStream, sink: list[dict[str, Any]]) -> None:
        self._stream = stream
        self._rows = iter(stream)
        self._sink = sink
        self._peeked: list[dict[str, Any]] = []

    def peek(self) -> bool:
        """Whether there is at least one row (reads it, and hands it out first)."""
        if not self._peeked:
            row = next(self._rows, None)
            if row is None:
                return False
            self._peeked.append(row)
        return True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for row in itertools.chain(self._peeked, self._rows):
            self._sink.append(row)
            yield row
        self._peeked = []

    @property
    def has_more(self) -> bool:
        return self._stream.has_more

    def count_remaining(self) -> int:
        return self._stream.count_remaining()


def _keep_error_context(run: RunResult, error: ModelAPIError) -> None:
    """Record what a failed model call declared: the answer so far and the statistics so far."""
    if error.partial_text and len(error.partial_text) > len(run.received_text):
        run.pieces[:] = [error.partial_text]
    if error.stats:
        run.model_stats = error.stats


def _keep_known(run: RunResult, pool: Any) -> None:
    """After an error or Ctrl-C before any stats: the protocol, model and server already known.

    With one server they are that server's; with several, the one that was asked is not known
    here (an error that knows it carries its stats).
    """
    if run.model_stats or len(pool.clients) != 1:
        return
    client = pool.clients[0]
    run.model_stats = GenerationStats(protocol=client.protocol, model=client.model, server=client.display_url)


def run_pipeline(
    query: str,
    template: str | None = None,
    additional_context: str | None = None,
    *,
    params: Mapping[str, Any] | Sequence[Any] | None = None,
    system_prompt: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    data_format: str = "markdown",
    fetch_rows: int | None = DEFAULT_FETCH_ROWS,
    prompt_rows: int | None = None,
    prompt_tokens: int | None = None,
    prompt_chars: int | None = None,
    max_cell_chars: int | None = prompt_builder.DEFAULT_MAX_CELL_CHARS,
    settings: Settings | None = None,
    stream: bool = False,
    on_text: Callable[[str], None] | None = None,
    dry_run: bool = False,
    progress: Callable[[str], None] | None = None,
) -> tuple[str | None, dict[str, Any], dict[str, Any]]:
    """Run query -> prompt -> model and return ``(response, stats, db_data)``.

    ``db_data`` is ``{"query", "results", "row_count", "columns", "more_rows"}``. ``response`` is
    None when the query returned no rows (nothing is sent to the model) or with ``dry_run``
    (``stats["prompt"]`` then holds the prompt). With ``stream``, ``on_text`` receives the
    answer's pieces as they arrive. Raises :class:`errors.PipelineError` subclasses. Settings
    default to the process-wide ones (:func:`config.get_settings`); the database pool and the
    model client are shared by every call in the process (see :mod:`resources`).
    """
    question = Question(
        query, template, additional_context, params=params, system_prompt=system_prompt,
        max_new_tokens=max_new_tokens, temperature=temperature, data_format=data_format, fetch_rows=fetch_rows,
        prompt_rows=prompt_rows, prompt_tokens=prompt_tokens, prompt_chars=prompt_chars,
        max_cell_chars=max_cell_chars,
    )
    run = run_question(question, settings or config.get_settings(), stream=stream, on_text=on_text,
                       dry_run=dry_run, progress=progress)
    stats = run.stats()
    if dry_run and run.prompt is not None:
        stats["prompt"] = run.prompt.text
    return run.answer, stats, run.db_data()
