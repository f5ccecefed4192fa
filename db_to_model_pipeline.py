#!/usr/bin/env python3
"""Query PostgreSQL, turn the rows into a prompt, ask the model on the PC, print the answer.

    python db_to_model_pipeline.py --query "SELECT * FROM reviews LIMIT 10"

The answer goes to stdout (nothing else does); progress, statistics and errors go
to stderr. See ``--help`` for every option and the exit codes.

:func:`main` is the command: parse (:mod:`cli_args`) -> run (:mod:`runner`) -> report (here,
with :mod:`cli_output`). ``--check`` is :mod:`doctor`. Scripts call :func:`run_pipeline`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from typing import Any, Iterator, Sequence, TextIO

import config
import link_safety
import mr_cli

# Names this module offered before the command was split into modules, kept for users' scripts.
import prompt_builder  # noqa: E402,F401
from cli_args import (
    EPILOG,
    SETTING_FLAG_NAMES,
    Command,
    build_parser,
    parse_arguments,
    prepare,
    setting_overrides,
)
from cli_logging import (
    LOG_BACKUPS,
    LOG_MAX_BYTES,
    SecretMaskingFilter,
    command_logging,
    setup_logging,
)
from cli_output import (  # noqa: F401 - exit_code_for is re-exported
    MaskedStream, error_info, exit_code_for, format_stats, json_document, report_error, truncation_hint,
    write_atomically,
)
from config import Settings
from db_connector import Database, check_read_only_query  # noqa: E402,F401
from doctor import run_checks
from env_files import describe_env_file
from errors import (  # noqa: E402,F401
    ConfigError,
    DBConnectionError,
    ExitCode,
    PipelineError,
    QueryError,
    Terminated,
    UsageError,
)
from progress import Spinner
from resources import close_resources
from runner import DEFAULT_FETCH_ROWS, Question, RunResult, run_pipeline, run_question

__all__ = [
    "DEFAULT_FETCH_ROWS", "EPILOG", "LOG_BACKUPS", "LOG_MAX_BYTES", "ExitCode", "Question", "RunResult",
    "SecretMaskingFilter", "Settings", "Terminated", "build_parser", "close_resources", "exit_code_for",
    "format_stats", "main", "run_checks", "run_pipeline", "run_question", "setup_logging", "write_atomically",
]

logger = logging.getLogger("db_to_model_pipeline")


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextmanager
def _sigterm_raises_terminated() -> Iterator[None]:
    """SIGTERM stops the run like Ctrl-C does (partial answer kept); the old handler comes back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Console:
    """The command's three streams (stderr masks secrets) and what it prints on them."""

    def __init__(self, stdin: TextIO, stdout: TextIO, stderr: MaskedStream, quiet: bool) -> None:
        self.stdin, self.out, self.err, self.quiet = stdin, stdout, stderr, quiet
        self.save_failed = False  # --output could not be written at the end: the run exits 2

    def progress(self, message: str) -> None:
        if not self.quiet:
            self.err.write(message + "\n")
            self.err.flush()

    def emit(self, text: str, output: str | None) -> None:
        """Print the result on stdout and, with --output, save it atomically."""
        self.out.write(text if text.endswith("\n") else text + "\n")
        self.out.flush()
        if output:
            self.save(output, text)

    def save(self, output: str, text: str) -> None:
        """Write --output (checked before the run); a failure now (a full disk) is reported, not raised."""
        try:
            write_atomically(output, text)
        except OSError as exc:
            self.save_failed = True
            logger.error("Could not write --output %s: %s", output, exc, extra={"file_only": True})
            self.err.write(f"Error [USAGE_ERROR]: could not write --output {output}: {exc.strerror or exc}; "
                           "the result was printed on stdout only.\n")

    def emit_json(self, document: dict[str, Any], output: str | None) -> None:
        self.emit(json.dumps(document, ensure_ascii=False, indent=2), output)


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run the command line; return the exit code (never raises, never calls sys.exit)."""
    link_safety.new_run()  # each run warns once about credentials in clear, also a second run in this process
    err = MaskedStream(stderr or sys.stderr)
    out = stdout or sys.stdout
    args = parse_arguments(argv, out, err)
    if isinstance(args, int):  # --help, or argparse already printed a usage error
        return args
    console = _Console(stdin or sys.stdin, out, err, args.quiet)
    with _sigterm_raises_terminated(), command_logging(args.verbose, args.quiet, err):
        try:
            return int(_run_and_report(args, console))
        finally:
            close_resources()


def _run_and_report(args: argparse.Namespace, console: _Console) -> ExitCode:
    run: RunResult | None = None
    try:
        overrides = setting_overrides(args)
        if args.check:
            return _check(args, overrides, console)
        settings = config.load_settings(overrides, flag_names=SETTING_FLAG_NAMES)
        console.err.secrets = settings.secrets()
        setup_logging(settings, args.verbose, args.quiet, console.err)
        logger.info("Settings from %s", describe_env_file(settings.env_file, settings.sources))
        if args.per_row:  # one model call per row: its own module, loaded only for it
            from batch_cli import run_per_row

            return run_per_row(args, settings, console)
        command = prepare(args, settings, console.stdin, console.out.isatty())
        if mr_cli.wanted(args):  # one question over every row, in several calls: reported by mr_cli
            return _saved(mr_cli.run_and_report(args, command, console), console)
        run = RunResult(command.question.query)
        _run(command, run, console)
        return _saved(_report(command, run, console), console)
    except (KeyboardInterrupt, PipelineError) as exc:
        try:
            return _report_failure(exc, args, run, console)
        except Exception as report_error:  # noqa: BLE001 - e.g. stdout is gone
            return _report_bug(report_error, args, console)
    except Exception as exc:  # noqa: BLE001 - a bug: report it, with the traceback in the log
        return _report_bug(exc, args, console)


def _saved(code: ExitCode, console: _Console) -> ExitCode:
    """A finished run whose --output could not be written exits 2 (the result went to stdout)."""
    return ExitCode.USAGE if code == ExitCode.OK and console.save_failed else code


def _report_bug(error: Exception, args: argparse.Namespace, console: _Console) -> ExitCode:
    if isinstance(error, BrokenPipeError):  # the reader of stdout stopped (| head): not a bug, nothing to say
        logger.info("Standard output was closed before everything was written", extra={"file_only": True})
        _discard_stdout(console.out)
        return ExitCode.BROKEN_PIPE
    logger.error("Internal error", exc_info=error, extra={"file_only": True})
    if args.verbose:
        traceback.print_exception(type(error), error, error.__traceback__, file=console.err)
    console.err.write(f"Internal error: {type(error).__name__}: {error}\n"
                      "This is a bug. Run again with --verbose and report the output.\n")
    return ExitCode.INTERNAL


def _discard_stdout(out: TextIO) -> None:
    """Point the process's stdout at /dev/null, so that flushing it at exit does not fail again."""
    if out is not sys.stdout:
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _check(args: argparse.Namespace, overrides: dict[str, Any], console: _Console) -> ExitCode:
    """``--check``, logging to the log file too when the settings load (the doctor reports when they do not)."""
    try:
        settings = config.load_settings(overrides, flag_names=SETTING_FLAG_NAMES)
    except ConfigError:
        pass
    else:
        console.err.secrets = settings.secrets()
        setup_logging(settings, args.verbose, args.quiet, console.err)
    return run_checks(overrides, console.out, flag_names=SETTING_FLAG_NAMES)


def _run(command: Command, run: RunResult, console: _Console) -> None:
    """The run step: one question over the rows that fit one prompt."""
    def on_text(piece: str) -> None:
        if command.echo:
            console.out.write(piece)
            console.out.flush()

    def waiting(server: str) -> Spinner:  # on a terminal only, and not with -q
        return Spinner(f"waiting for the answer from {server} ...", stream=console.err, quiet=console.quiet)

    if not command.dry_run:
        console.progress(f"Querying {command.settings.db_display()} ...")
    run_question(command.question, command.settings, run, stream=command.stream, on_text=on_text,
                 dry_run=command.dry_run, progress=console.progress, waiting=waiting)


def _report(command: Command, run: RunResult, console: _Console) -> ExitCode:
    """The report step after a run that finished: the answer, prompt or JSON, then the statistics.

    The prompt's warnings (``run.warnings``) were logged as the prompt was built: not repeated here.
    """
    if run.truncated:
        console.progress(truncation_hint(run))
    if not run.rows:
        console.progress("The query returned no rows: nothing was sent to the model.")
        if command.json:
            console.emit_json(json_document(run, None), command.output)
        return ExitCode.OK
    if command.dry_run:
        assert run.prompt is not None
        system_prompt = command.question.system_prompt
        text = run.prompt.text if not system_prompt else f"{system_prompt}\n\n{run.prompt.text}"
        total = f"{'at least ' if run.more_rows else ''}{run.rows_total:,}"  # --max-rows stopped the count
        console.progress(f"Dry run: {run.rows_shown:,} of {total} rows, "
                         f"{len(text):,} chars ~{run.prompt.estimated_tokens:,} tokens; nothing was sent.")
        if command.json:
            document = json_document(run, None)
            document.update(prompt=run.prompt.text, system_prompt=system_prompt)
            console.emit_json(document, command.output)
        else:
            console.emit(text, command.output)
        return ExitCode.OK
    answer = run.answer
    assert answer is not None
    if command.json:
        console.emit_json(json_document(run, answer), command.output)
    elif command.echo:  # already printed piece by piece
        if not answer.endswith("\n"):
            console.out.write("\n")
        if command.output:
            console.save(command.output, answer)
    else:
        console.emit(answer, command.output)
    summary = format_stats(run.stats())
    console.progress(summary)
    logger.info("Done: %s", summary)
    return ExitCode.OK


def _report_failure(error: BaseException, args: argparse.Namespace, run: RunResult | None,
                    console: _Console) -> ExitCode:
    """The report step after an error or a signal: keep what arrived, say what happened."""
    partial = run.received_text if run is not None else ""
    if partial or args.json:
        _keep_partial(partial, args, run, console, error_info(error, console.err.secrets))
    report_error(error, console.err, verbose=args.verbose,
                 kept="The partial answer above was kept." if partial else "")
    return exit_code_for(error)


def _keep_partial(partial: str, args: argparse.Namespace, run: RunResult | None, console: _Console,
                  error: dict[str, Any]) -> None:
    """After an interruption or a failure, keep what arrived (stdout, FILE.partial, JSON)."""
    if args.json:
        text = json.dumps(json_document(run, partial or None, error, complete=False), ensure_ascii=False, indent=2)
        console.out.write(text + "\n")
    else:
        text = partial
        if partial and not partial.endswith("\n"):
            console.out.write("\n")
    console.out.flush()
    if args.output and run is not None and (partial or args.json):  # a run started: --output was checked
        try:
            write_atomically(args.output + ".partial", text)
        except OSError as exc:
            console.err.write(f"Could not save {args.output}.partial: {exc.strerror or exc}.\n")


if __name__ == "__main__":
    sys.exit(main())
