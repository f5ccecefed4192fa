"""One question over every row: split the rows into prompts that fit, answer each, combine the answers.

:func:`run_all_rows` is the ``--all-rows`` run. It reads the query's rows once into a spool file
(:class:`row_spool.RowSpool`: the database transaction ends before the first model call, and
memory stays flat), then:

1. **Fits one prompt?** When the single-question prompt holds every row, that prompt is sent as
   it is, once, and nothing else changes.
2. **Plan.** Otherwise the rows are packed into chunks that each fill the prompt budget
   (:class:`row_packer.RowPacker`, the user's template, a note naming the rows of each part).
   A row too large for a prompt of its own is shortened further and flagged, never dropped.
   Only the chunk boundaries stay in memory; the prompts wait in a temporary file.
3. **Map.** Every chunk is one call, run concurrently through the backend (:mod:`mr_calls`).
   A thread packs every chunk at once (:mod:`mr_pack_ahead`): the first call starts as soon as
   its chunk is packed, packing 20,000 rows costs no wall time while the servers are busy, and
   the number of calls is known within seconds.
4. **Reduce.** The partial answers are combined by reduce prompts (:mod:`mr_prompts`), in levels
   while they do not fit one prompt. Each level must have fewer answers and fewer tokens than the
   one below it (the last level, which leaves one answer, is exempt from the token rule: a final
   answer may be longer than short partial ones), and at most ``max_levels`` levels run: otherwise
   :class:`errors.ReduceNotConvergingError` stops the run, with every answer so far kept.

Every answer is recorded in a checkpoint (:mod:`mr_checkpoint`) as it arrives; a rerun of the
same command reuses each one and sends only the calls that are missing. The result,
:class:`MapReduceRun`, is filled as the run goes, so after an error or Ctrl-C it still holds
the plan and the answers obtained.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TextIO

import mr_prompts
import prompt_builder
from config import Settings
from errors import PipelineError, PromptError, ReduceNotConvergingError
from mr_calls import Call, CallRunner, CallSettings
from mr_checkpoint import Checkpoint, call_key, checkpoint_path, load_answers
from mr_pack_ahead import PackAhead
from mr_result import MapReduceRun
from job_identity import fingerprint
from resources import shared_database
from row_packer import RowPacker
from row_spool import RowSpool
from runner import Question, RunResult
from token_count import TokenCounter, get_counter, log_difference
from value_format import row_layout

logger = logging.getLogger(__name__)

#: Reduce levels a run may take before it is stopped as not converging.
DEFAULT_MAX_LEVELS = 4


@dataclass(frozen=True)
class AllRowsOptions:
    """How a question over every row runs, besides the question itself."""

    reduce_template: str | None = None  # None: mr_prompts.DEFAULT_REDUCE_TEMPLATE
    max_levels: int = DEFAULT_MAX_LEVELS
    concurrency: int | None = None  # None: the backend's capacity
    attempts: int | None = None  # per call, in all; None: API_MAX_ATTEMPTS
    output: str | None = None  # the checkpoint goes beside it (else in the cache directory)
    checkpoint: bool = True


@dataclass
class Reporter:
    """Where a run reports progress: short messages, and the progress bars' stream (None: nothing)."""

    message: Callable[[str], None] = lambda text: None
    stream: TextIO | None = None
    quiet: bool = True


def job_parts(question: Question, options: AllRowsOptions, settings: Settings) -> dict[str, Any]:
    """What makes two runs the same job (the checkpoint's fingerprint is a hash of these)."""
    q = question
    return {
        "query": q.query, "params": q.params, "template": q.template, "context": q.context,
        "system_prompt": q.system_prompt, "reduce_template": options.reduce_template, "format": q.data_format,
        "max_rows": q.fetch_rows, "prompt_rows": q.prompt_rows, "prompt_budget": q.prompt_tokens,
        "prompt_max_chars": q.prompt_chars, "max_cell_chars": q.max_cell_chars, "model": settings.model_name,
        "max_new_tokens": _max_new_tokens(q, settings), "temperature": _temperature(q, settings),
        "context_tokens": settings.model_context_tokens,
    }


def _max_new_tokens(q: Question, settings: Settings) -> int:
    return settings.max_new_tokens if q.max_new_tokens is None else q.max_new_tokens


def _temperature(q: Question, settings: Settings) -> float:
    return settings.temperature if q.temperature is None else q.temperature


def run_all_rows(question: Question, options: AllRowsOptions, settings: Settings, backend: Any,
                 run: MapReduceRun | None = None, *, dry_run: bool = False, reporter: Reporter | None = None,
                 counter: TokenCounter | None = None, sleep: Callable[[float], None] | None = None) -> MapReduceRun:
    """Answer ``question`` over every row the query returns; see the module docstring.

    ``backend`` sends the prompts (``generate(...)``, ``capacity``); with ``dry_run`` it is not
    used and only the plan is made. ``sleep`` replaces the pause between attempts (tests).
    Raises :class:`errors.PipelineError` subclasses; ``run`` then holds what was done.
    """
    run = run if run is not None else MapReduceRun(question.query)
    report = reporter or Reporter()
    counter = counter or get_counter()
    started = time.perf_counter()
    parts = job_parts(question, options, settings)
    run.fingerprint = fingerprint(parts)
    try:
        # The spool is a private temp file: packing reads it during the map calls, but the database
        # transaction ended when the rows were read.
        with RowSpool.read(shared_database(settings), question.query, question.params,
                           max_rows=question.fetch_rows) as spool:
            run.columns, run.rows_total, run.more_rows = list(spool.columns), spool.count, spool.has_more
            run.read_time = round(spool.read_time, 3)
            if not spool.count:
                logger.info("Query returned no rows; nothing sent to the model")
                return run
            fits, said = _fits_one_prompt(question, spool, settings, counter, run)
            if fits:
                if not dry_run:
                    _ask_once(question, settings, backend, run, report)
                return run
            planner = _Planner(question, options, spool, settings, counter, run, said)
            if dry_run:
                for _ in planner.chunks():
                    pass
                _count_reusable(run, options)
                return run
            _map_and_reduce(question, options, settings, backend, planner, run, report, counter, sleep, parts)
    finally:
        run.total_time = round(time.perf_counter() - started, 3)
    return run


def _fits_one_prompt(question: Question, spool: RowSpool, settings: Settings, counter: TokenCounter,
                     run: MapReduceRun) -> tuple[bool, tuple[str, ...]]:
    """Build the single-question prompt: ``(fits, the template warnings it logged)``.

    ``fits`` is True (and ``run.single`` set) when the prompt holds every row.
    """
    q = question
    try:
        prompt = prompt_builder.build_prompt(
            {"query": q.query, "results": spool, "columns": spool.columns, "row_count": spool.count,
             "more_rows": spool.has_more}, q.template, q.context,
            data_format=q.data_format, max_tokens=q.prompt_tokens, max_chars=q.prompt_chars,
            max_rows=q.prompt_rows, max_cell_chars=q.max_cell_chars,
            context_tokens=settings.model_context_tokens, max_new_tokens=_max_new_tokens(q, settings),
            system_prompt=q.system_prompt, counter=counter,
        )
    except PromptError as exc:  # not even one row fits as it is: the map prompts shorten it
        logger.info("The single-question prompt cannot be built (%s); splitting the rows", exc.message)
        return False, ()
    if prompt.truncated:
        return False, prompt.warnings
    run.single = RunResult(q.query, rows=list(spool), columns=list(spool.columns), more_rows=spool.has_more,
                           db_time=run.read_time, prompt=prompt)
    logger.info("All %d rows fit one prompt (%d tokens, %s): one call", spool.count, prompt.estimated_tokens,
                prompt.token_counter)
    return True, prompt.warnings


def _ask_once(question: Question, settings: Settings, backend: Any, run: MapReduceRun, report: Reporter) -> None:
    single = run.single
    assert single is not None and single.prompt is not None
    report.message(f"All {run.rows_total:,} rows fit one prompt ({single.prompt.char_count:,} chars): one call ...")
    generation = backend.generate(single.prompt.text, question.system_prompt, _max_new_tokens(question, settings),
                                  question.temperature)
    single.answer = generation.text
    single.model_stats = generation.stats
    run.answer = single.answer
    log_difference(single.prompt.estimated_tokens, single.prompt.token_counter,
                   getattr(generation.stats, "input_tokens", None))


class _Planner:
    """The map prompts of a run, packed from the spool as they are asked for, and the reduce prompts.

    Creating it checks, before any call, that two partial answers of full length fit one reduce
    prompt (else PromptError: the levels could never end). Each warning is logged once, as it
    arises (``said``: those the single-question prompt logged already), and kept in ``run.warnings``.
    """

    def __init__(self, question: Question, options: AllRowsOptions, spool: RowSpool, settings: Settings,
                 counter: TokenCounter, run: MapReduceRun, said: tuple[str, ...] = ()) -> None:
        q = self.question = question
        self.options, self.spool, self.run, self.counter = options, spool, run, counter
        self.key = _key_function(q, settings)
        max_new = run.max_new_tokens = _max_new_tokens(q, settings)
        mapped = mr_prompts.map_frame(q, spool.columns, spool.count, context_tokens=settings.model_context_tokens,
                                      max_new_tokens=max_new, counter=counter)
        self.mapped = mapped
        run.budget, run.counter = mapped.budget, counter.name
        for message in mapped.warnings:
            if message not in said:
                logger.warning("%s", message)
            run.warnings.append(message)
        values = {"question": mapped.question, "query": q.query, "context": q.context or "",
                  "columns": ", ".join(map(str, spool.columns))}
        self.reducer = mr_prompts.ReducePrompts(options.reduce_template, values, spool.count, budget=mapped.budget,
                                                max_chars=q.prompt_chars, outside=mapped.frame.outside, counter=counter)
        run.fan_in = self.reducer.fan_in(max_new)
        if run.fan_in < 2:
            raise PromptError(
                f"A reduce prompt of {mapped.budget:,} tokens cannot hold two partial answers of up to "
                f"{max_new:,} tokens (the reduce template takes {self.reducer.frame_tokens():,}), so the "
                "partial answers could never be combined.",
                hint="Fix: lower --max-new-tokens / MAX_NEW_TOKENS, or raise --prompt-budget / MODEL_CONTEXT_TOKENS.",
            )

    def chunks(self) -> Iterator[tuple[Call, str]]:
        """``(map call, its prompt)`` for each chunk, appended to ``run.map_calls`` as they are packed."""
        q, run = self.question, self.run
        packer = RowPacker(self.spool, row_layout(q.data_format, self.spool.columns), self.mapped.frame,
                           max_tokens=self.mapped.budget, max_chars=q.prompt_chars, counter=self.counter,
                           max_cell_chars=q.max_cell_chars, max_rows=q.prompt_rows,
                           note=mr_prompts.map_note(self.spool.count, self.spool.has_more), shorten=True)
        for index, chunk in enumerate(packer):
            shortened = tuple({"row": s.index + 1, "max_cell_chars": s.max_cell_chars} for s in chunk.shortened)
            for cut in shortened:  # the row packer logged it as it shortened the row
                run.warnings.append(f"Row {cut['row']:,} was too large for one prompt: its values were cut to "
                                    f"{cut['max_cell_chars']:,} characters (flagged in the plan).")
            call = Call("map", 0, index, chunk.start + 1, chunk.end, self.key(chunk.text), chunk.tokens,
                        chunk.chars, chunk.counter, shortened=shortened)
            run.map_calls.append(call)
            if index == 0:
                run.sample_prompt = chunk.text
            yield call, chunk.text
        self._planned()

    def _planned(self) -> None:
        run = self.run
        run.map_planned = True
        run.expected_levels = mr_prompts.calls_per_level(len(run.map_calls), run.fan_in or 2)
        run.expected_reduce_tokens = mr_prompts.reduce_prompt_tokens(
            len(run.map_calls), run.fan_in or 2, run.max_new_tokens or 0, self.reducer.frame_tokens())
        logger.info("Plan: %d rows in %d map prompts of up to %d tokens (%s); reduce calls expected per level: %s",
                    run.rows_total, len(run.map_calls), run.budget, run.counter, run.expected_levels)
        levels = len(run.expected_levels or [])
        if levels > self.options.max_levels:
            message = (f"Answers of the full {run.max_new_tokens:,} tokens would need {levels} reduce levels, more "
                       f"than --max-reduce-levels {self.options.max_levels}; shorter answers need fewer.")
            logger.warning("%s", message)
            run.warnings.append(message)


def _key_function(q: Question, settings: Settings) -> Callable[[str], str]:
    max_new, temperature = _max_new_tokens(q, settings), _temperature(q, settings)
    return lambda prompt: call_key(prompt, system_prompt=q.system_prompt, model=settings.model_name,
                                   max_new_tokens=max_new, temperature=temperature)


def _count_reusable(run: MapReduceRun, options: AllRowsOptions) -> None:
    """For a dry run: how many map answers an earlier run left in the checkpoint (the file is not changed)."""
    if not options.checkpoint:
        return
    path = checkpoint_path(options.output, run.fingerprint)
    answers, _, _ = load_answers(path, run.fingerprint)
    run.checkpoint_path = str(path)
    run.reusable = sum(1 for call in run.map_calls if call.key in answers)


def _open_checkpoint(options: AllRowsOptions, run: MapReduceRun, parts: dict[str, Any]) -> Checkpoint | None:
    if not options.checkpoint:
        return None
    path = checkpoint_path(options.output, run.fingerprint)
    try:
        checkpoint = Checkpoint.open(path, run.fingerprint, parts)
    except OSError as exc:
        run.checkpoint_notice = (f"Answers are not checkpointed: {path} cannot be written ({exc.strerror or exc}); "
                                 "a rerun after a failure starts over. Fix: set XDG_CACHE_HOME to a writable "
                                 "directory, or pass --output FILE.")
        logger.info("%s", run.checkpoint_notice)  # the command prints it
        return None
    run.checkpoint_path, run.checkpoint_notice = str(path), checkpoint.notice
    run.reusable = checkpoint.loaded
    return checkpoint


def _map_and_reduce(question: Question, options: AllRowsOptions, settings: Settings, backend: Any,
                    planner: _Planner, run: MapReduceRun, report: Reporter, counter: TokenCounter,
                    sleep: Callable[[float], None] | None, parts: dict[str, Any]) -> None:
    q = question
    checkpoint = _open_checkpoint(options, run, parts)
    try:
        capacity = max(1, int(backend.capacity))
        concurrency = options.concurrency or capacity
        if concurrency > capacity:
            report.message(f"Note: --concurrency {concurrency} is more than the model servers run at once "
                           f"({capacity}): the extra calls wait on the laptop.")
        system_tokens = sum(map(counter.count, planner.reducer.outside)) if q.system_prompt else 0
        # API_MAX_ATTEMPTS bounds the attempts of each call, as it bounds the transport's own retries,
        # unless the command was told otherwise (--retries).
        attempts = settings.api_max_attempts if options.attempts is None else options.attempts
        call_settings = CallSettings(q.system_prompt, run.max_new_tokens or 0, q.temperature, concurrency,
                                     system_tokens=system_tokens, attempts=attempts, sleep=sleep)
        calls = CallRunner(backend, call_settings,
                           checkpoint, stream=report.stream, quiet=report.quiet)
        run.concurrency = concurrency
        report.message(f"Map: the rows in prompts of up to {run.budget:,} tokens, {concurrency} call"
                       f"{'s' if concurrency != 1 else ''} at a time ...")
        try:
            # Every map prompt is packed at once, ahead of the calls: the progress has its total
            # within seconds, and a stopped run knows how many calls are left.
            with PackAhead(planner.chunks(), calls.set_total) as packed:
                try:
                    calls.run(packed, "map")
                except PipelineError:
                    packed.wait()  # finish the plan (no calls), so the report says how many calls are left
                    raise
            _reduce(run, planner.reducer, calls, options.max_levels, planner.key, report)
        finally:
            run.token_check = calls.tokens.summary()
            if run.token_check:
                logger.info("Prompt tokens over %d calls: %d by our count (%s), %d by the servers' (x%.3f)",
                            run.token_check["calls"], run.token_check["our_tokens"], counter.name,
                            run.token_check["server_tokens"], run.token_check["server_over_ours"])
    finally:
        if checkpoint is not None:
            checkpoint.close()


def _reduce(run: MapReduceRun, reducer: mr_prompts.ReducePrompts, calls: CallRunner, max_levels: int,
            key: Callable[[str], str], report: Reporter) -> None:
    """Combine the map answers level by level until one is left (``run.answer``)."""
    answers = [mr_prompts.Answer(c.answer or "", c.first_row, c.last_row) for c in run.map_calls]
    while len(answers) > 1:
        level = len(run.levels) + 1
        if level > max_levels:
            raise ReduceNotConvergingError(
                f"After {max_levels} reduce level(s) there are still {len(answers):,} partial answers to combine.",
                hint=f"Every answer so far is kept{_kept(run)}. Fix: rerun with --max-reduce-levels {max_levels + 1} "
                "(the answers obtained are reused), or ask for shorter answers (--max-new-tokens, --reduce-template).",
            )
        groups = reducer.group(answers)
        level_calls = _level_calls(groups, answers, level, key, reducer.counter.name)
        run.levels.append(level_calls)
        sent = [c for c in level_calls if not c.carried]
        if not sent:
            raise ReduceNotConvergingError(
                f"No two of the {len(answers):,} partial answers fit one reduce prompt of {reducer.budget:,} tokens.",
                hint=f"Every answer so far is kept{_kept(run)}. Fix: lower --max-new-tokens, shorten the reduce "
                "template, or raise --prompt-budget / MODEL_CONTEXT_TOKENS.",
            )
        texts = {c.index: g.text for c, g in zip(level_calls, groups)}
        report.message(f"Reduce level {level}: {len(answers):,} answers into {len(groups):,} "
                       f"({len(sent):,} call{'s' if len(sent) != 1 else ''}) ...")
        calls.run(((c, texts[c.index]) for c in sent), f"reduce level {level}", total=len(sent))
        if len(level_calls) > 1:  # the final answer may be longer than short partial answers
            _check_shrinks(run, answers, sent, level, reducer.counter)
        answers = [mr_prompts.Answer(c.answer or "", c.first_row, c.last_row) for c in level_calls]
    run.answer = answers[0].text


def _level_calls(groups: list[mr_prompts.ReduceGroup], answers: list[mr_prompts.Answer], level: int,
                 key: Callable[[str], str], counter_name: str) -> list[Call]:
    """One entry per group: a reduce call, or an answer carried up unchanged (a group of one)."""
    entries = []
    for index, group in enumerate(groups):
        if len(group.inputs) == 1:
            carried = answers[group.inputs[0]]
            entries.append(Call("reduce", level, index, group.first_row, group.last_row, "", 0, 0, "",
                                inputs=group.inputs, answer=carried.text, carried=True))
        else:
            entries.append(Call("reduce", level, index, group.first_row, group.last_row, key(group.text),
                                group.tokens, len(group.text), counter_name, inputs=group.inputs))
    return entries


def _check_shrinks(run: MapReduceRun, answers: list[mr_prompts.Answer], sent: list[Call], level: int,
                   counter: TokenCounter) -> None:
    """A level must give fewer tokens than the answers it combined, or the levels would never end."""
    before = sum(counter.count(answers[i].text) for call in sent for i in call.inputs)
    after = sum(counter.count(call.answer or "") for call in sent)
    if after >= before:
        raise ReduceNotConvergingError(
            f"Reduce level {level} did not shrink the text: {sum(len(c.inputs) for c in sent):,} partial answers "
            f"of {before:,} tokens in all came back as {len(sent):,} answer(s) of {after:,} tokens. The model "
            "repeats its input instead of combining it, so more levels would never end.",
            hint=f"Every answer so far is kept{_kept(run)}. Fix: a reduce template that asks for one short answer "
            "(--reduce-template), or a lower --max-new-tokens.",
        )
    logger.info("Reduce level %d: %d answers (%d tokens) became %d (%d tokens)", level,
                sum(len(c.inputs) for c in sent), before, len(sent), after)


def _kept(run: MapReduceRun) -> str:
    return f" in {run.checkpoint_path}" if run.checkpoint_path else ""
