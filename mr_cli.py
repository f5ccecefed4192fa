"""``--all-rows`` on the command line: read the flags, run :func:`map_reduce.run_all_rows`, report.

The command (:mod:`db_to_model_pipeline`) hands over once the common flags are checked
(:func:`cli_args.prepare`); this module reads the flags of its own group, builds the backend,
runs, and reports: the answer on stdout (or the ``--json`` document with the plan), progress
and the summed statistics on stderr, the plan for ``--dry-run``. A failure is reported here
too, because what is kept differs from a single question: the answers obtained are in the
checkpoint, and the message says how a rerun continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

import mr_prompts
from cli_args import Command, read_text_file
from cli_output import error_info, exit_code_for, format_stats, json_document, report_error, write_atomically
from config import Settings
from errors import ConfigError, ExitCode, PipelineError, UsageError
from map_reduce import DEFAULT_MAX_LEVELS, AllRowsOptions, Reporter, run_all_rows
from mr_plan_text import estimate_seconds, plan_text, stats_line
from mr_result import MapReduceRun
from model_backend import PoolBackend
from resources import shared_model_pool

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_LEVELS", "model_backend", "probe_capacity", "run_and_report", "wanted"]


def model_backend(settings: Settings) -> PoolBackend:
    """The backend the map and reduce calls go through: the configured servers' pool."""
    return PoolBackend(shared_model_pool(settings))


def probe_capacity(settings: Settings) -> tuple[int | None, str]:
    """``(capacity, what was found)`` from a health check (GET requests only), for the dry run's estimate."""
    try:
        settings.api_base_url()
    except ConfigError:
        return None, "the model server is not configured (PC_IP / API_BASE_URL)"
    backend = model_backend(settings)
    reports = backend.health()
    ready = [report for report in reports if report.ok]
    if not ready:
        why = "; ".join(f"{report.server or 'the model server'}: {report.detail}" for report in reports)
        return None, f"no model server is ready ({why})"
    if len(reports) == 1:
        return backend.ready_capacity, f"{reports[0].server or 'the model server'} answered the health check"
    return backend.ready_capacity, f"{len(ready)} of {len(reports)} servers answered the health check"


def wanted(args: argparse.Namespace) -> bool:
    """Whether any flag of the --all-rows group was given (without --all-rows the others are an error)."""
    return bool(args.all_rows or args.reduce_template is not None or args.reduce_template_file
                or args.max_reduce_levels is not None)


def _options(args: argparse.Namespace, command: Command) -> AllRowsOptions:
    if not args.all_rows:
        raise UsageError(
            "--reduce-template, --reduce-template-file and --max-reduce-levels only apply with --all-rows.",
            hint="Fix: add --all-rows, or drop those flags.")
    template = (read_text_file(args.reduce_template_file, "reduce template") if args.reduce_template_file
                else args.reduce_template)
    if template is not None:
        mr_prompts.check_reduce_template(template)  # a typo fails before the query runs
    return AllRowsOptions(reduce_template=template, max_levels=args.max_reduce_levels or DEFAULT_MAX_LEVELS,
                          concurrency=args.concurrency, output=command.output,
                          attempts=None if args.retries is None else args.retries + 1)


def run_and_report(args: argparse.Namespace, command: Command, console: Any) -> ExitCode:
    """Run ``--all-rows`` and report it; returns the exit code (PipelineError and Ctrl-C are reported here)."""
    run: MapReduceRun | None = None
    try:
        options = _options(args, command)
        # The single question's default row cap does not apply: --max-rows only when given.
        question = dataclasses.replace(command.question, fetch_rows=args.max_rows)
        run = MapReduceRun(question.query)
        backend = None if command.dry_run else model_backend(command.settings)
        if not command.dry_run:
            console.progress(f"Querying {command.settings.db_display()} ...")
        reporter = Reporter(console.progress, console.err, console.quiet)
        run_all_rows(question, options, command.settings, backend, run, dry_run=command.dry_run, reporter=reporter)
        return _report(command, run, console, options)
    except (KeyboardInterrupt, PipelineError) as exc:
        return _report_failure(exc, args, command, run, console)


def _notes(run: MapReduceRun, console: Any) -> None:
    # run.warnings were logged as they arose (on stderr then): not repeated here.
    if run.checkpoint_notice:
        console.progress(f"Note: {run.checkpoint_notice}")


def _report(command: Command, run: MapReduceRun, console: Any, options: AllRowsOptions) -> ExitCode:
    _notes(run, console)
    if not run.rows_total:
        console.progress("The query returned no rows: nothing was sent to the model.")
        if command.json:
            console.emit_json(document(run, None), command.output)
        return ExitCode.OK
    if run.single is not None:
        return _report_single(command, run, console)
    if command.dry_run:
        return _report_plan(command, run, console, options)
    assert run.answer is not None
    if command.json:
        console.emit_json(document(run, run.answer), command.output)
    else:
        console.emit(run.answer, command.output)
    summary = stats_line(run)
    console.progress(summary)
    if run.checkpoint_path:
        console.progress(f"Answers are checkpointed in {run.checkpoint_path} (a rerun of this command reuses them).")
    logger.info("Done: %s", summary)
    return ExitCode.OK


def _report_plan(command: Command, run: MapReduceRun, console: Any, options: AllRowsOptions) -> ExitCode:
    """The dry run's plan, with the time at the servers' capacity (or at --concurrency, when lower)."""
    capacity, found = probe_capacity(command.settings)
    run.concurrency = options.concurrency or capacity
    at_once = min(capacity, run.concurrency or capacity) if capacity else None
    estimate = estimate_seconds(run, at_once) if at_once else None
    console.progress(f"Dry run: {len(run.map_calls):,} map calls planned over {run.rows_total:,} rows; "
                     "nothing was sent to the model.")
    if command.json:
        doc = document(run, None)
        doc["plan"].update(servers=found, capacity=capacity, estimated_seconds=estimate)
        console.emit_json(doc, command.output)
    else:
        console.emit(plan_text(run, at_once, found, estimate), command.output)
    return ExitCode.OK


def _report_single(command: Command, run: MapReduceRun, console: Any) -> ExitCode:
    """Every row fitted one prompt: reported as the single question is."""
    single = run.single
    assert single is not None and single.prompt is not None
    if command.dry_run:
        system_prompt = command.question.system_prompt
        text = single.prompt.text if not system_prompt else f"{system_prompt}\n\n{single.prompt.text}"
        console.progress(f"Dry run: all {run.rows_total:,} rows fit one prompt ({len(text):,} chars "
                         f"~{single.prompt.estimated_tokens:,} tokens): one call; nothing was sent.")
        if command.json:
            doc = document(run, None)
            doc.update(prompt=single.prompt.text, system_prompt=system_prompt)
            console.emit_json(doc, command.output)
        else:
            console.emit(text, command.output)
        return ExitCode.OK
    assert single.answer is not None
    if command.json:
        console.emit_json(document(run, single.answer), command.output)
    else:
        console.emit(single.answer, command.output)
    summary = format_stats(single.stats())
    console.progress(summary)
    logger.info("Done: %s", summary)
    return ExitCode.OK


def document(run: MapReduceRun | None, answer: str | None, error: dict[str, Any] | None = None,
             complete: bool = True) -> dict[str, Any]:
    """The --json object of an --all-rows run: the single question's keys, plus ``mode`` and ``plan``."""
    if run is not None and run.single is not None:
        doc = json_document(run.single, answer, error, complete=complete)
    else:
        stats = run.stats() if run is not None else {}
        doc = {
            "ok": error is None, "answer": answer, "complete": complete and answer is not None,
            "rows_shown": stats.get("rows_shown", 0), "rows_total": run.rows_total if run else 0,
            "more_rows": bool(run and run.more_rows), "truncated": False, "hint": None, "prompt_chars": None,
            "prompt_tokens_estimate": stats.get("prompt_tokens"), "protocol": stats.get("protocol"),
            "model": stats.get("model"), "stats": stats, "query": run.query if run else None, "error": error,
        }
    doc["mode"] = "all_rows"
    doc["plan"] = run.plan() if run is not None else None
    return doc


def _report_failure(error: BaseException, args: argparse.Namespace, command: Command, run: MapReduceRun | None,
                    console: Any) -> ExitCode:
    """After an error or a signal: say what happened, what is kept, and how a rerun continues."""
    if run is not None:
        _notes(run, console)
    if args.json:
        doc = document(run, None, error_info(error, console.err.secrets), complete=False)
        console.emit_json(doc, None)
        if args.output and run is not None:
            _save_partial(args.output, doc, console)
    report_error(error, console.err, verbose=args.verbose)
    if run is not None and run.map_calls and not command.dry_run:
        console.err.write(_kept_message(run) + "\n")
    return exit_code_for(error)


def _save_partial(output: str, doc: dict[str, Any], console: Any) -> None:
    import json

    try:
        write_atomically(output + ".partial", json.dumps(doc, ensure_ascii=False, indent=2))
    except OSError as exc:
        console.err.write(f"Could not save {output}.partial: {exc.strerror or exc}.\n")


def _kept_message(run: MapReduceRun) -> str:
    done, planned = run.answers_done()
    reduced = sum(1 for level in run.levels for c in level if not c.carried and c.answer is not None)
    of = f"{planned:,}" if run.map_planned else f"at least {planned:,} (the rest were not packed yet)"
    text = f"Stopped with {done:,} of {of} map answers" + (f" and {reduced:,} reduce answers" if reduced else "")
    if run.checkpoint_path:
        return (f"{text}; they are kept in {run.checkpoint_path}. Run the same command again to continue: "
                "it sends only the calls that are missing.")
    return f"{text}; they were not checkpointed, so a rerun starts over."
