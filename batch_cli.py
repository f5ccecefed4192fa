"""The ``--per-row`` command: one model call for every row a query returns.

:func:`run_per_row` is the whole command after the settings are loaded: read and check the
inputs (the template's placeholders, the schema, the results table's name, and whether an
existing ``--output`` belongs to this job) before the query runs; read the rows into a spool
(:mod:`row_spool`: the transaction ends before the first model call); check the template's
columns and that the keys are unique before any model call; then either print the plan
(``--dry-run``) or run (:mod:`batch_runner`), recording every row (:mod:`result_ledger`), and
print the summary. It returns the exit code: 0 when every row is ok, 7 when some failed,
130 / 143 on Ctrl-C / SIGTERM, or the code of what stopped the run.
"""

from __future__ import annotations

import argparse
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import token_count
from batch_runner import BatchRunner, BatchSettings, BatchSummary, RowTask
from cli_args import DEFAULT_ROW_RETRIES, prepare
from config import Settings
from errors import ExitCode, PipelineError, PromptError, UsageError
from progress import ProgressBar, format_duration
from prompt_builder import DEFAULT_RESERVE_TOKENS, default_token_budget
from prompt_template import Template
from resources import shared_database
from result_ledger import Job, Resume, ResultLedger
from results_table import ResultsTable
from row_keys import RowKey, canonical, choose_key, find_duplicate
from row_prompt import RowPrompt, parse_row_template, schema_prompt_text
from row_spool import RowSpool
from structured_output import AnswerSchema, load_schema

logger = logging.getLogger(__name__)

#: Prompts shown by --dry-run.
DRY_RUN_PROMPTS = 3
#: Per-request log lines that a per-row run keeps quiet unless --verbose, and the level kept.
#: INFO lines (every request) would rotate the log file every few minutes over 200,000 rows. The
#: transport's retry warnings ("Connecting to ... failed; retry 1") repeat for every request while a
#: server is away; the run says it once itself (the rows waiting, each row tried again, each server
#: down and back), so they stay out too.
CHATTY_LOGGERS = {"http_transport": logging.ERROR, "server_client": logging.WARNING,
                  "server_pool": logging.WARNING}


def make_backend(settings: Settings) -> Any:
    """The model backend for a run: the configured servers' pool, shared with the rest of the process."""
    from model_backend import PoolBackend  # imports requests: only when a run needs a server
    from resources import shared_model_pool

    return PoolBackend(shared_model_pool(settings))


@dataclass
class PerRowPlan:
    """Everything checked before the query runs."""

    args: argparse.Namespace
    settings: Settings
    template: Template
    schema: AnswerSchema | None
    job: Job
    ledger: ResultLedger
    question: Any


def plan(args: argparse.Namespace, settings: Settings, console: Any) -> PerRowPlan:
    """Read and check every input that can be checked before the query runs."""
    command = prepare(args, settings, console.stdin, console.out.isatty())
    q = command.question
    if q.template is None:
        raise UsageError("--per-row needs a template: it is what each row is asked.",
                         hint="Fix: add --template 'Classify the sentiment of this review: {row.body}' "
                         "(or --template-file FILE).")
    schema_doc = load_schema(args.schema) if args.schema else None
    template = parse_row_template(q.template, has_schema=schema_doc is not None)
    table = ResultsTable(settings, args.results_table) if args.results_table else None
    schema = AnswerSchema(schema_doc) if schema_doc is not None else None
    job = Job({
        "mode": "per-row", "query": q.query, "params": q.params, "template": q.template, "context": q.context,
        "system_prompt": q.system_prompt, "schema": schema_doc, "format": q.data_format,
        "max_cell_chars": q.max_cell_chars, "key": args.key, "model": settings.model_name,
        "max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
    })
    ledger = ResultLedger(job, output=command.output, stdout=console.out, table=table, restart=args.restart,
                          csv_fields=schema.properties if schema is not None else None)
    ledger.check()
    return PerRowPlan(args, settings, template, schema, job, ledger, q)


def run_per_row(args: argparse.Namespace, settings: Settings, console: Any) -> ExitCode:
    """The ``--per-row`` command; returns the exit code (raises PipelineError for what stops it early)."""
    p = plan(args, settings, console)
    q = p.question
    console.progress(f"Reading the rows from {settings.db_display()} ...")
    with RowSpool.read(shared_database(settings), q.query, q.params, max_rows=q.fetch_rows,
                       on_progress=lambda n: console.progress(f"  {n:,} rows read ...")) as spool:
        if spool.count == 0:
            console.progress("The query returned no rows: nothing was sent to the model.")
            return ExitCode.OK
        prompts = RowPrompt(p.template, spool.columns, data_format=q.data_format, max_cell_chars=q.max_cell_chars,
                            query=q.query, context=q.context or "", row_count=spool.count,
                            schema_text=schema_prompt_text(p.schema.schema) if p.schema else None)
        key = _checked_key(spool, args.key, console)
        if args.dry_run:
            return _dry_run(p, spool, prompts, key, console)
        return _run(p, spool, prompts, key, console)


def _checked_key(spool: RowSpool, requested: str | None, console: Any) -> RowKey:
    key = choose_key(spool.columns, requested)
    if key.hashed:
        console.progress("The result has no id column and no --key was given: each row is identified by a hash of "
                         "its values (a row whose values change counts as a new row). Name a key with --key COLUMN.")
    duplicate = find_duplicate(spool, key)
    if duplicate is not None:
        value, first, second = duplicate
        raise UsageError(
            f"The key is not unique: rows {first:,} and {second:,} both have {key.show(value)}, so a rerun could not "
            "tell which of them is done.",
            hint="Fix: name a unique key with --key COLUMN[,COLUMN...], or make the query return each row once.",
        )
    return key


def _tasks(spool: RowSpool, prompts: RowPrompt, key: RowKey, done: set[str]) -> Iterator[RowTask]:
    render, key_of = prompts.render, key.of
    for index, row in enumerate(spool):
        value = key_of(row)
        if done and canonical(value) in done:
            continue
        yield RowTask(index, value, render(row, index))


def _prompt_limits(settings: Settings, q: Any) -> tuple[int, Any]:
    """The token bound of one row's prompt (the window minus the answer and the system prompt)."""
    counter = token_count.get_counter()
    if q.prompt_tokens is not None:
        return q.prompt_tokens, counter
    budget = default_token_budget(settings.model_context_tokens, settings.max_new_tokens, DEFAULT_RESERVE_TOKENS)
    if q.system_prompt:
        budget -= token_count.estimate_tokens(q.system_prompt + "\n\n")
    if budget <= 0:
        raise PromptError("The system prompt leaves no room for a row's prompt in the model's window.",
                          hint="Shorten the system prompt or lower MAX_NEW_TOKENS.")
    return budget, counter


@contextmanager
def _request_logs_quiet(verbose: bool) -> Iterator[None]:
    """Keep per-request lines out of the console and the log file for the run (see CHATTY_LOGGERS)."""
    loggers = [logging.getLogger(name) for name in CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    if not verbose:
        for lg in loggers:
            lg.setLevel(CHATTY_LOGGERS[lg.name])
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _run(p: PerRowPlan, spool: RowSpool, prompts: RowPrompt, key: RowKey, console: Any) -> ExitCode:
    args, settings, q = p.args, p.settings, p.question
    backend = make_backend(settings)
    try:
        # Rows wait out servers that go away during a run (a PC that reboots). Not one reachable at
        # the start is far more often a wrong address or a server not started: said at once.
        require_reachable = getattr(backend, "require_reachable", None)
        if require_reachable is not None:
            require_reachable()
        capacity = backend.capacity
        concurrency = args.concurrency or capacity
        if concurrency > capacity:
            console.progress(f"Note: --concurrency {concurrency} is more than the model servers run at once "
                             f"({capacity}): the extra rows wait on the laptop. A server that runs more at once "
                             "says so in API_BASE_URL with #slots=N (e.g. http://pc:11434#slots=4).")
        resume = p.ledger.open(key)
        planned = spool.count if not resume.done else sum(
            1 for row in spool if canonical(key.of(row)) not in resume.done)
        skipped = spool.count - planned
        _announce(console, spool.count, skipped, planned, resume, key, concurrency, p.ledger)
        tokens, counter = _prompt_limits(settings, q)
        retries = DEFAULT_ROW_RETRIES if args.retries is None else args.retries
        batch = BatchSettings(concurrency=concurrency, system_prompt=q.system_prompt,
                              max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                              schema=p.schema, attempts=retries + 1, prompt_tokens=tokens,
                              prompt_chars=q.prompt_chars, prompt_counter=counter)
        with ProgressBar(planned, unit="rows", stream=console.err, quiet=args.quiet) as bar, \
                _request_logs_quiet(args.verbose):
            runner = BatchRunner(backend, batch, p.ledger.write, job=p.job.fingerprint, progress=bar,
                                 tick=p.ledger.tick, notice=bar.note)
            summary = runner.run(_tasks(spool, prompts, key, resume.done), planned)
    finally:
        files = p.ledger.close()
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    return _report(summary, skipped, files, console)


def _announce(console: Any, total: int, skipped: int, planned: int, resume: Resume, key: RowKey,
              concurrency: int, ledger: ResultLedger) -> None:
    if ledger.set_aside is not None:
        console.progress(f"--restart: the earlier results were kept as {ledger.set_aside}.")
    if resume.sources:
        retried = len(resume.failed)
        console.progress(f"Continuing from {', '.join(resume.sources)}: {skipped:,} of {total:,} rows already done"
                         + (f", {retried:,} failed before and sent again" if retried else "") + ".")
    if resume.copied_to_table:
        console.progress(f"Copied {resume.copied_to_table:,} rows done earlier from the file into the results table.")
    if planned:
        console.progress(f"Sending {_rows(planned)} ({concurrency} at a time; key: {key.describe()}) ...")
    else:
        console.progress(f"Nothing to send: all {total:,} rows are done.")


def _report(summary: BatchSummary, skipped: int, files: list[str], console: Any) -> ExitCode:
    for line in summary_lines(summary, skipped, files):
        console.progress(line)
    stop, interrupted = summary.stop, summary.interrupted
    if stop is not None:
        console.err.write(f"Stopped early: {stop.message}\n")
        if stop.error is not None and stop.error.hint:
            console.err.write(stop.error.hint + "\n")
        console.err.write("Everything recorded so far is kept; rerun the same command to continue.\n")
        return ExitCode(stop.exit_code)
    if interrupted is not None:
        what = "Terminated" if getattr(interrupted, "exit_code", None) == ExitCode.TERMINATED else "Interrupted"
        console.err.write(f"{what}: {summary.finished:,} rows recorded, {summary.not_done:,} not done. "
                          "Rerun the same command to continue.\n")
        return ExitCode(getattr(interrupted, "exit_code", ExitCode.INTERRUPTED))
    if summary.failed:
        console.err.write(f"{summary.failed:,} rows failed: rerun the same command to retry them (rows already ok "
                          "are not sent again).\n")
        return ExitCode.ROWS_FAILED
    return ExitCode.OK


def summary_lines(summary: BatchSummary, skipped: int, files: list[str]) -> list[str]:
    """The summary for stderr: counts, time and rate, tokens, one line per server, the files."""
    counts = summary.counts
    failed = ", ".join(f"{counts[s]:,} {s}" for s in ("error", "invalid", "truncated") if counts[s])
    lines = [f"Rows: {summary.ok:,} ok, {summary.failed:,} failed" + (f" ({failed})" if failed else "")
             + f", {skipped:,} skipped (already done), {summary.not_done:,} not done."]
    rate = summary.finished / summary.wall_time if summary.wall_time > 0 else 0.0
    lines.append(f"Time {format_duration(summary.wall_time)} ({summary.wall_time:.1f} s), {rate:.1f} rows/s; "
                 f"tokens in {summary.input_tokens:,} / out {summary.output_tokens:,}.")
    for server, tally in sorted(summary.servers.items()):
        mean = f", {tally.seconds / tally.answers:.2f} s per answer" if tally.answers else ""
        lines.append(f"  {server}: {tally.answers:,} answers, {tally.failures:,} failed requests, "
                     f"tokens in {tally.input_tokens:,} / out {tally.output_tokens:,}{mean}")
    if files:
        lines.append("Results: " + ", ".join(files))
    return lines


# --- --dry-run ------------------------------------------------------------------------------


def _dry_run(p: PerRowPlan, spool: RowSpool, prompts: RowPrompt, key: RowKey, console: Any) -> ExitCode:
    """Print the first prompts and the plan; send nothing (a health check at most)."""
    q = p.question
    resume = p.ledger.peek()
    system = q.system_prompt or ""
    system_tokens = token_count.estimate_tokens(system + "\n\n") if system else 0
    shown = to_send = tokens = 0
    for index, row in enumerate(spool):
        value = key.of(row)
        if resume.done and canonical(value) in resume.done:
            continue
        prompt = prompts.render(row, index)
        to_send += 1
        tokens += system_tokens + token_count.estimate_tokens(prompt)
        if shown < DRY_RUN_PROMPTS:
            shown += 1
            console.out.write(f"--- row {index + 1:,} of {spool.count:,} ({key.show(value)}) ---\n")
            console.out.write((f"{system}\n\n" if system else "") + prompt + "\n")
    console.out.flush()
    skipped = spool.count - to_send
    lines = [f"Dry run: {spool.count:,} rows (key: {key.describe()})"
             + (f", {skipped:,} already done in {', '.join(resume.sources)}" if skipped else "")
             + f", {to_send:,} to send; prompts about {tokens:,} tokens in all"
             + (f" ({tokens // to_send:,} per row)" if to_send else "") + " by the estimate."]
    lines.append(_time_estimate(p, to_send, resume))
    lines.append("Nothing was sent.")
    for line in lines:
        console.progress(line)
    return ExitCode.OK


def _time_estimate(p: PerRowPlan, rows: int, resume: Resume) -> str:
    """How long ``rows`` answers take at the servers' capacity, when they answer a health check."""
    try:
        backend = make_backend(p.settings)
    except PipelineError as exc:
        return f"No time estimate: {exc.message}"
    try:
        ready, detail = _servers_ready(backend)
        if not ready:
            return f"No time estimate: the model servers are not ready ({detail})."
        capacity = min(p.args.concurrency or backend.ready_capacity, backend.ready_capacity)
    except PipelineError as exc:
        return f"No time estimate: {exc.message}"
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    rounds = math.ceil(rows / capacity) if rows else 0
    text = (f"At the servers' capacity ({capacity} at once): {_rows(rows)} take {rounds:,} x the time of one "
            "answer")
    if resume.seconds_count:
        mean = resume.seconds_total / resume.seconds_count
        return text + f"; this job's earlier answers took {mean:.1f} s each: about {format_duration(rounds * mean)}."
    return text + f" (e.g. {format_duration(rounds * 10)} at 10 s per answer)."


def _servers_ready(backend: Any) -> tuple[bool, str]:
    """Whether at least one server is ready, from the backend's health check."""
    check = getattr(backend, "check_health", None)
    if check is None:
        return True, ""
    result = check()
    reports = list(result) if isinstance(result, (list, tuple)) else [result]
    ready = [r for r in reports if getattr(r, "ok", bool(r))]
    detail = "; ".join(str(getattr(r, "detail", r)) for r in reports)
    return bool(ready), detail


def _rows(count: int) -> str:
    """``1 row``, ``2,000 rows``."""
    return f"{count:,} row{'' if count == 1 else 's'}"
