#!/usr/bin/env python3
"""Query PostgreSQL, turn the rows into a prompt, ask the model on the PC, print the answer.

    python db_to_model_pipeline.py --query "SELECT * FROM reviews LIMIT 10"

The answer goes to stdout (nothing else does); progress, statistics and errors go
to stderr. See ``--help`` for every option and the exit codes.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import logging.handlers
import os
import re
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TextIO

import config
import prompt_builder
from config import Settings
from db_connector import Database, check_read_only_query
from errors import (
    ConfigError,
    DBConnectionError,
    ExitCode,
    PipelineError,
    QueryError,
    UsageError,
)

logger = logging.getLogger("db_to_model_pipeline")

DEFAULT_FETCH_ROWS = 10_000  # rows read from the database; far more than a 16K-token prompt holds
LOG_MAX_BYTES = 5 * 1024 * 1024
LOG_BACKUPS = 3


def exit_code_for(error: BaseException) -> ExitCode:
    """The process exit code for an exception: each error class carries its own."""
    if isinstance(error, PipelineError):
        return ExitCode(error.exit_code)
    if isinstance(error, Terminated):
        return ExitCode.TERMINATED
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    return ExitCode.INTERNAL


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (partial results kept) but exiting 143."""


# --- the library entry point ----------------------------------------------------------


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

    ``db_data`` is the shared guide's ``{"query", "results", "row_count"}`` (plus
    ``columns`` and ``more_rows``). ``response`` is None when the query returned no
    rows (nothing is sent to the model) or with ``dry_run`` (``stats["prompt"]``
    then holds the prompt). With ``stream``, ``on_text`` receives the answer's
    pieces as they arrive. Raises :class:`errors.PipelineError` subclasses.
    """
    settings = settings or config.get_settings()
    max_new_tokens = settings.max_new_tokens if max_new_tokens is None else max_new_tokens
    started = time.perf_counter()
    # Filled as the run goes; attached to any exception on the way out, so that a caller
    # (the CLI's --json) still reports the rows, the stats and the partial answer.
    db_data: dict[str, Any] = {"query": query, "results": [], "row_count": 0}
    stats: dict[str, Any] = {}
    pieces: list[str] = []
    try:
        # The connection goes back to the pool (idle, no open transaction) before the model is asked.
        rows = _database(settings).execute_query(query, params, max_rows=fetch_rows)
        db_data.update(results=list(rows), row_count=len(rows), columns=rows.columns, more_rows=rows.has_more)
        stats.update(rows_fetched=len(rows), more_rows=rows.has_more,
                     db_time=round(time.perf_counter() - started, 4))
        if not rows:
            stats.update(rows_shown=0, rows_total=0, truncated=False)
            logger.info("Query returned no rows; nothing sent to the model")
            return None, stats, db_data

        prompt = prompt_builder.build_prompt(
            db_data, template, additional_context,
            data_format=data_format, max_tokens=prompt_tokens, max_chars=prompt_chars, max_rows=prompt_rows,
            max_cell_chars=max_cell_chars, context_tokens=settings.model_context_tokens,
            max_new_tokens=max_new_tokens, system_prompt=system_prompt,
        )
        stats.update(
            rows_shown=prompt.rows_shown, rows_total=prompt.rows_total, truncated=prompt.truncated,
            prompt_chars=prompt.char_count, prompt_tokens_estimate=prompt.estimated_tokens,
            prompt_warnings=list(prompt.warnings),
        )
        logger.info("Prompt built: %d of %d rows, %d chars, ~%d tokens%s", prompt.rows_shown, prompt.rows_total,
                    prompt.char_count, prompt.estimated_tokens, " (truncated)" if prompt.truncated else "")
        if dry_run:
            stats["prompt"] = prompt.text
            return None, stats, db_data

        client = _model_client(settings)
        if progress:
            rows_text = "1 row" if prompt.rows_shown == 1 else f"{prompt.rows_shown:,} rows"
            progress(f"Sending {rows_text} ({prompt.char_count:,} chars) to {client.base_url} ...")
        if stream:
            with client.stream(prompt.text, system_prompt, max_new_tokens, temperature) as generation:
                for piece in generation:
                    pieces.append(piece)
                    if on_text:
                        on_text(piece)
        else:
            generation = client.generate(prompt.text, system_prompt, max_new_tokens, temperature)
        response = generation.text
        stats.update(generation.stats.as_dict())  # includes "server", the base URL that answered
        stats["total_time"] = round(time.perf_counter() - started, 4)
        return response, stats, db_data
    except BaseException as exc:
        exc.stats, exc.db_data = stats, db_data  # type: ignore[attr-defined]
        exc.partial_text = getattr(exc, "partial_text", "") or "".join(pieces)  # type: ignore[attr-defined]
        raise


# One database pool and one model client per settings, reused by every run_pipeline call
# in the process: a script looping over thousands of queries connects once and keeps
# its HTTP keep-alive session and detected protocol.
_shared: dict[str, Any] = {}


def _use_settings(settings: Settings) -> None:
    if _shared.get("settings") != settings:
        close_resources()
        _shared["settings"] = settings


def _database(settings: Settings) -> Database:
    _use_settings(settings)
    if "database" not in _shared:
        _shared["database"] = Database(settings)
    return _shared["database"]


def _model_client(settings: Settings) -> Any:
    import server_client  # imported on first use: --dry-run never needs requests

    _use_settings(settings)
    if "client" not in _shared:
        _shared["client"] = server_client.ServerClient(settings)
    return _shared["client"]


def close_resources() -> None:
    """Close the pooled database connections and the HTTP session run_pipeline keeps."""
    if _shared.get("database") is not None:
        _shared["database"].close()
    if _shared.get("client") is not None:
        _shared["client"].close()
    _shared.clear()


atexit.register(close_resources)


# --- command line ---------------------------------------------------------------------

EPILOG = """\
examples:
  %(prog)s --query "SELECT 1 as test"
  %(prog)s --query "SELECT * FROM reviews LIMIT 10"
  %(prog)s --query "SELECT * FROM reviews" --template "다음 데이터를 분석해주세요: {data}"
  %(prog)s --query-file examples/low_rated_reviews.sql --param max_rating=2 --output answer.txt
  %(prog)s --query "SELECT * FROM customers WHERE city = %%(city)s" --param city=서울 --format csv
  echo "SELECT * FROM product_review_summary" | %(prog)s --json > result.json
  %(prog)s --query "SELECT * FROM orders" --dry-run          # show the prompt, send nothing
  %(prog)s --check                                           # doctor: settings, database, model server

template placeholders: {data} {context} {row_count} {columns} {query}
  other braces (JSON examples) stay as written; {{data}} writes a literal {data}
parameters: --param city=서울 binds %%(city)s in the SQL (values are never pasted into the SQL)

exit codes:
  0 success            3 database connection error    6 model server error or bad response
  1 internal error     4 query error or refused write 130 interrupted (Ctrl-C)
  2 usage/config error 5 model server unreachable or timed out   143 terminated (SIGTERM)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python db_to_model_pipeline.py",
        description="Run a read-only SQL query, turn the rows into a prompt, send it to the LLM server\n"
        "on the PC (this project's FastAPI server, Ollama or OpenAI-compatible) and print the answer.\n"
        "The answer goes to stdout; progress and statistics go to stderr. Settings: .env (see README).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q = parser.add_argument_group("query")
    source = q.add_mutually_exclusive_group()
    source.add_argument("--query", metavar="SQL", help='one SELECT statement; "-" reads it from stdin')
    source.add_argument("--query-file", metavar="FILE", help="read the SQL from a .sql file (UTF-8)")
    q.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="bind a value to %%(NAME)s in the SQL (repeatable)")
    q.add_argument("--max-rows", type=_positive_int, default=DEFAULT_FETCH_ROWS, metavar="N",
                   help=f"read at most N rows from the database (default {DEFAULT_FETCH_ROWS:,})")

    p = parser.add_argument_group("prompt")
    template = p.add_mutually_exclusive_group()
    template.add_argument("--template", metavar="TEXT", help="prompt template, e.g. '다음 데이터를 분석해주세요: {data}'")
    template.add_argument("--template-file", metavar="FILE", help="read the template from a UTF-8 file")
    context = p.add_mutually_exclusive_group()
    context.add_argument("--context", metavar="TEXT", help="additional context for {context}")
    context.add_argument("--context-file", metavar="FILE", help="read the additional context from a file")
    system = p.add_mutually_exclusive_group()
    system.add_argument("--system-prompt", metavar="TEXT", help="system prompt sent with the prompt")
    system.add_argument("--system-prompt-file", metavar="FILE", help="read the system prompt from a file")
    p.add_argument("--format", choices=prompt_builder.FORMATS, default="markdown",
                   help="how rows appear in the prompt (default markdown)")
    p.add_argument("--prompt-rows", type=_positive_int, metavar="N", help="put at most N rows in the prompt")
    p.add_argument("--prompt-budget", type=_positive_int, metavar="TOKENS",
                   help="bound the prompt's estimated tokens (default: MODEL_CONTEXT_TOKENS - MAX_NEW_TOKENS - margin)")
    p.add_argument("--prompt-max-chars", type=_positive_int, metavar="N", help="bound the prompt's characters")
    p.add_argument("--max-cell-chars", type=_positive_int, default=prompt_builder.DEFAULT_MAX_CELL_CHARS,
                   metavar="N", help=f"shorten longer values (default {prompt_builder.DEFAULT_MAX_CELL_CHARS})")

    m = parser.add_argument_group("model server (override .env)")
    m.add_argument("--api-url", metavar="URL", help="server base URL (API_BASE_URL), e.g. http://192.168.0.10:11434")
    m.add_argument("--protocol", choices=config.PROTOCOLS, help="API_PROTOCOL (default auto-detect)")
    m.add_argument("--model", metavar="NAME", help="MODEL_NAME for Ollama/OpenAI-compatible servers")
    m.add_argument("--timeout", metavar="SECONDS", help="API_TIMEOUT: how long to wait for the answer")
    m.add_argument("--max-new-tokens", metavar="N", help="MAX_NEW_TOKENS: answer length")
    m.add_argument("--temperature", metavar="T", help="TEMPERATURE (0 to 2; the pc server needs > 0)")
    stream = m.add_mutually_exclusive_group()
    stream.add_argument("--stream", dest="stream", action="store_true", default=None,
                        help="print the answer as it is generated (default when stdout is a terminal); "
                        "with --json, receive it in pieces so an interrupted run keeps the partial answer")
    stream.add_argument("--no-stream", dest="stream", action="store_false", help="wait for the whole answer")

    o = parser.add_argument_group("output and modes")
    o.add_argument("--json", action="store_true", help="print one JSON object (answer, stats, rows) on stdout")
    o.add_argument("--output", metavar="FILE", help="also save the answer (or the JSON with --json) to FILE")
    o.add_argument("--dry-run", action="store_true", help="print the prompt that would be sent; contact no model server")
    o.add_argument("--check", action="store_true", help="check settings, database and model server, then exit")
    o.add_argument("--env-file", metavar="FILE", help="read settings from FILE instead of ./.env")
    o.add_argument("--log-file", metavar="FILE", help="LOG_FILE (default laptop_client.log; '' for none)")
    verbosity = o.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging (SQL included) and tracebacks")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="no progress or statistics on stderr")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of 1 or more, got {value}")
    return value


def _read_text_file(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"The {what} file {path} does not exist.", hint="Fix: check the path.") from None
    except UnicodeDecodeError:
        raise UsageError(f"The {what} file {path} is not UTF-8.", hint="Fix: save it as UTF-8.") from None
    except OSError as exc:
        raise UsageError(f"Cannot read the {what} file {path}: {exc.strerror}.") from None


def _parse_params(items: Sequence[str]) -> dict[str, str] | None:
    params: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise UsageError(
                f"--param {item!r} is not NAME=VALUE.",
                hint="Fix: write --param city=서울 and use %(city)s in the SQL.",
            )
        params[name] = value
    return params or None


def _resolve_query(args: argparse.Namespace, stdin: TextIO) -> str:
    if args.query_file:
        return _read_text_file(args.query_file, "query")
    if args.query and args.query != "-":
        return args.query
    if args.query == "-" or not stdin.isatty():
        text = stdin.read()
        if text.strip():
            return text
    raise UsageError(
        "No query given.",
        hint='Fix: pass --query "SELECT ...", --query-file FILE.sql, or pipe the SQL into standard input.',
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "API_BASE_URL": args.api_url, "API_PROTOCOL": args.protocol, "MODEL_NAME": args.model,
        "API_TIMEOUT": args.timeout, "MAX_NEW_TOKENS": args.max_new_tokens, "TEMPERATURE": args.temperature,
        "LOG_FILE": args.log_file, "ENV_FILE": args.env_file,
    }


# --- logging --------------------------------------------------------------------------

class SecretMaskingFilter(logging.Filter):
    """Replace known secrets, URL passwords and ``password=...`` in every record."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def mask(self, text: str) -> str:
        return config.mask_secrets(text, self.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.mask(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.mask("".join(traceback.format_exception(*record.exc_info)))
        elif record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        record.exc_info = None
        return True


class _NotForConsole(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def setup_logging(settings: Settings | None, verbose: bool, quiet: bool, stderr: TextIO) -> None:
    """Console (stderr) and rotating log file, both masking secrets. Only the CLI calls this."""
    root = logging.getLogger()
    _remove_our_log_handlers()
    masking = SecretMaskingFilter(settings.secrets() if settings else [])
    console = logging.StreamHandler(stderr)
    console.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    console.addFilter(_NotForConsole())
    console.addFilter(masking)
    console._pipeline_handler = True  # type: ignore[attr-defined]
    root.addHandler(console)
    level = logging.DEBUG if verbose else logging.WARNING
    if settings and settings.log_file:
        try:
            file_handler = logging.handlers.RotatingFileHandler(
                settings.log_file, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8"
            )
        except OSError as exc:
            logger.warning("Cannot write the log file %s (%s); logging to the console only", settings.log_file,
                           exc.strerror)
        else:
            file_handler.setLevel(logging.DEBUG if verbose else getattr(logging, settings.log_level))
            file_handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
            file_handler.addFilter(masking)
            file_handler._pipeline_handler = True  # type: ignore[attr-defined]
            root.addHandler(file_handler)
            level = min(level, file_handler.level)
    root.setLevel(level)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # http_transport reports retries in its own words


def _remove_our_log_handlers() -> None:
    """Remove (and close) the handlers setup_logging added; leave anyone else's alone."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_pipeline_handler", False):
            root.removeHandler(handler)
            handler.close()


# --- output ---------------------------------------------------------------------------


def write_atomically(path: str, text: str) -> None:
    """Write UTF-8 text so that an interruption never leaves a half-written file."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _fmt_seconds(value: Any) -> str:
    return f"{value:.1f} s" if isinstance(value, (int, float)) else "?"


def format_stats(stats: Mapping[str, Any]) -> str:
    """One short human-readable line for stderr."""
    rows = f"rows {stats.get('rows_shown', 0):,}/{stats.get('rows_total', 0):,}"
    if stats.get("more_rows"):
        rows += "+"
    parts = [rows]
    if stats.get("prompt_chars") is not None:
        parts.append(f"prompt {stats['prompt_chars']:,} chars ~{stats.get('prompt_tokens_estimate', 0):,} tokens")
    if stats.get("protocol"):
        parts.append(f"{stats['protocol']}:{stats.get('model') or '?'}")
    if stats.get("wall_time") is not None:
        timing = f"time {_fmt_seconds(stats['wall_time'])}"
        if stats.get("generation_time") is not None:
            timing += f" (generation {_fmt_seconds(stats['generation_time'])})"
        parts.append(timing)
    tokens = [f"{label} {stats[key]:,}" for key, label in (("input_tokens", "in"), ("generated_tokens", "out"))
              if isinstance(stats.get(key), int)]
    if tokens:
        parts.append("tokens " + " / ".join(tokens))
    if isinstance(stats.get("tokens_per_second"), (int, float)):
        parts.append(f"{stats['tokens_per_second']:.1f} tok/s")
    return " | ".join(parts)


def _json_document(answer: str | None, stats: Mapping[str, Any], db_data: Mapping[str, Any] | None,
                   error: dict[str, Any] | None = None, complete: bool = True) -> dict[str, Any]:
    public_stats = {k: v for k, v in stats.items() if k not in ("prompt", "prompt_warnings")}
    return {
        "ok": error is None,
        "answer": answer,
        "complete": complete,
        "rows_shown": stats.get("rows_shown", 0),
        "rows_total": stats.get("rows_total", 0),
        "more_rows": bool(stats.get("more_rows")),
        "truncated": bool(stats.get("truncated")),
        "prompt_chars": stats.get("prompt_chars"),
        "prompt_tokens_estimate": stats.get("prompt_tokens_estimate"),
        "protocol": stats.get("protocol"),
        "model": stats.get("model"),
        "stats": public_stats,
        "query": db_data.get("query") if db_data else None,
        "error": error,
    }


# --- the doctor -----------------------------------------------------------------------


def run_checks(overrides: Mapping[str, Any], out: TextIO) -> ExitCode:
    """``--check``: one line per check, with the fix for each failure."""
    failures: list[ExitCode] = []

    def line(ok: bool | None, what: str, detail: str, fix: str | None = None) -> None:
        mark = {True: "[ OK ]", False: "[FAIL]", None: "[WARN]"}[ok]
        out.write(f"{mark} {what}: {detail}\n")
        if fix:
            out.write("       " + fix.replace("\n", "\n       ") + "\n")

    try:
        settings = config.load_settings(overrides)
    except ConfigError as exc:
        line(False, "settings", exc.message, exc.hint)
        line(False, "database", "not checked (settings are invalid)")
        line(False, "model server", "not checked (settings are invalid)")
        return ExitCode.USAGE
    line(True, "settings", f"loaded from {settings.env_file or 'environment and defaults (no .env file)'}")
    exposed = _readable_secrets_file(settings)
    if exposed:
        line(None, "settings", exposed, f"Fix: chmod 600 {settings.env_file}")

    database = Database(settings)
    try:
        info = database.server_info()
    except (ConfigError, DBConnectionError, QueryError) as exc:
        line(False, "database", exc.message, exc.hint)
        failures.append(exit_code_for(exc))
    else:
        line(True, "database", f"connected to {settings.db_display()} (PostgreSQL {info['server_version']})")
        if info["read_only"]:
            line(True, "read-only", "sessions default to read-only; every query runs in a READ ONLY transaction")
        else:
            line(False, "read-only", "the session is not read-only", "Fix: report this as a bug.")
            failures.append(ExitCode.QUERY)
        if info["superuser"]:
            line(None, "database role", f"{info['user']} is a superuser: read-only is only a safety net",
                 "Tip: connect as a SELECT-only role (README: 'Read-only by design, and a SELECT-only role').")
    finally:
        database.close()

    import model_api_client

    try:
        base_url = settings.api_base_url()
    except ConfigError as exc:
        line(False, "model server", exc.message, exc.hint)
        failures.append(ExitCode.USAGE)
    else:
        with model_api_client.ModelAPIClient(settings) as client:
            report = client.check_health()
        if not report.reachable:
            line(False, "model server", f"{base_url}: {report.detail}", report.fix)
            failures.append(ExitCode.MODEL_UNREACHABLE)
        else:
            line(True, "model server", f"{base_url} answers")
            if report.protocol:
                line(True, "protocol", report.protocol + (" (detected)" if settings.api_protocol == "auto" else ""))
            else:
                line(False, "protocol", report.detail, report.fix)
                failures.append(ExitCode.MODEL_ERROR)
            if report.protocol:
                name = report.model_name or settings.model_name
                if report.model_ready:
                    line(True, "model", f"{name} is ready")
                else:
                    line(False, "model", report.detail, report.fix)
                    failures.append(ExitCode.MODEL_ERROR)
    return failures[0] if failures else ExitCode.OK


def _readable_secrets_file(settings: Settings) -> str | None:
    """Say so when the .env file holding a password or key is readable by other users."""
    if not settings.env_file or os.name != "posix":
        return None
    held = [name for name in sorted(config.SECRET_NAMES) if settings.source_of(name) == settings.env_file]
    try:
        mode = os.stat(settings.env_file).st_mode & 0o777
    except OSError:
        return None
    if held and mode & 0o077:
        return f"{settings.env_file} holds {', '.join(held)} but other users can read it (mode {mode:o})"
    return None


# --- main -----------------------------------------------------------------------------


class _MaskedStream:
    """A text stream that hides secrets in everything written through it (our stderr)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.secrets: list[str] = []

    def write(self, text: str) -> int:
        return self._stream.write(config.mask_secrets(text, self.secrets))

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()


def _error_info(error: BaseException, secrets: Sequence[str]) -> dict[str, Any]:
    """The ``error`` object of the --json document, secrets masked."""
    if isinstance(error, Terminated):
        return {"code": "TERMINATED", "message": "Terminated by SIGTERM.", "hint": None}
    if isinstance(error, KeyboardInterrupt):
        return {"code": "INTERRUPTED", "message": "Interrupted (Ctrl-C).", "hint": None}
    assert isinstance(error, PipelineError)
    return {
        "code": error.code,
        "message": config.mask_secrets(error.message, secrets),
        "hint": config.mask_secrets(error.hint, secrets) if error.hint else None,
    }


def _print_error(error: BaseException, stderr: TextIO, verbose: bool) -> None:
    if verbose:
        traceback.print_exception(type(error), error, error.__traceback__, file=stderr)
    label = getattr(error, "code", type(error).__name__)
    stderr.write(f"Error [{label}]: {error}\n")


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
         stderr: TextIO | None = None) -> int:
    """Run the command line; return the exit code (never raises, never calls sys.exit)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    err = _MaskedStream(stderr or sys.stderr)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage or help
        return int(exc.code or 0)

    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)
    verbose, quiet = args.verbose, args.quiet
    root_level = logging.getLogger().level
    setup_logging(None, verbose, quiet, err)  # console only, until the settings name the log file

    def progress(message: str) -> None:
        if not quiet:
            err.write(message + "\n")
            err.flush()

    answer_parts: list[str] = []
    stats: dict[str, Any] = {}
    db_data: dict[str, Any] | None = None
    try:
        overrides = _overrides(args)
        if args.check:
            return int(run_checks(overrides, stdout))
        settings = config.load_settings(overrides)
        err.secrets = settings.secrets()
        setup_logging(settings, verbose, quiet, err)
        query = _resolve_query(args, stdin)
        params = _parse_params(args.param)
        template = _read_text_file(args.template_file, "template") if args.template_file else args.template
        context = _read_text_file(args.context_file, "context") if args.context_file else args.context
        system_prompt = (_read_text_file(args.system_prompt_file, "system prompt")
                         if args.system_prompt_file else args.system_prompt)
        check_read_only_query(query)  # a refused write fails before anything else
        if template is not None:
            prompt_builder.check_template(template)  # a typo fails before the query runs
        if not args.dry_run:
            settings.api_base_url()  # an unconfigured PC_IP fails before the query runs

        # With --json the pieces are collected, not printed: stdout carries one JSON object,
        # and an interrupted --json --stream run still reports what had arrived.
        stream = args.stream if args.stream is not None else (stdout.isatty() and not args.json)
        echo = stream and not args.json

        def on_text(piece: str) -> None:
            answer_parts.append(piece)
            if echo:
                stdout.write(piece)
                stdout.flush()

        if not args.dry_run:
            progress(f"Querying {settings.db_display()} ...")
        answer, stats, db_data = run_pipeline(
            query, template, context, params=params, system_prompt=system_prompt,
            data_format=args.format, fetch_rows=args.max_rows, prompt_rows=args.prompt_rows,
            prompt_tokens=args.prompt_budget, prompt_chars=args.prompt_max_chars,
            max_cell_chars=args.max_cell_chars, settings=settings, stream=stream, on_text=on_text,
            dry_run=args.dry_run, progress=progress,
        )
        for warning in stats.get("prompt_warnings", []):
            progress(f"Warning: {warning}")
        if stats.get("rows_fetched", 0) == 0:
            progress("The query returned no rows: nothing was sent to the model.")
            if args.json:
                _emit(json.dumps(_json_document(None, stats, db_data), ensure_ascii=False, indent=2), args, stdout)
            return ExitCode.OK
        if args.dry_run:
            text = stats["prompt"] if not system_prompt else f"{system_prompt}\n\n{stats['prompt']}"
            progress(f"Dry run: {stats['rows_shown']:,} of {stats['rows_total']:,} rows, "
                     f"{len(text):,} chars ~{stats['prompt_tokens_estimate']:,} tokens; nothing was sent.")
            if args.json:
                doc = _json_document(None, stats, db_data)
                doc.update(prompt=stats["prompt"], system_prompt=system_prompt)
                _emit(json.dumps(doc, ensure_ascii=False, indent=2), args, stdout)
            else:
                _emit(text, args, stdout)
            return ExitCode.OK
        assert answer is not None
        if args.json:
            _emit(json.dumps(_json_document(answer, stats, db_data), ensure_ascii=False, indent=2), args, stdout)
        elif echo:
            if not answer.endswith("\n"):
                stdout.write("\n")
            if args.output:
                write_atomically(args.output, answer)
        else:
            _emit(answer, args, stdout)
        progress(format_stats(stats))
        logger.info("Done: %s", format_stats(stats))
        return ExitCode.OK
    except (KeyboardInterrupt, PipelineError) as exc:
        # run_pipeline attaches what it had: keep the rows, the stats and the partial answer.
        stats, db_data = getattr(exc, "stats", stats), getattr(exc, "db_data", db_data)
        partial = getattr(exc, "partial_text", "") or "".join(answer_parts)
        if partial or args.json:
            _keep_partial(partial, args, stdout, stats, db_data, _error_info(exc, err.secrets))
        if isinstance(exc, KeyboardInterrupt):
            what = "Terminated" if isinstance(exc, Terminated) else "Interrupted"
            err.write(f"\n{what}." + (" The partial answer above was kept.\n" if partial else "\n"))
            logger.warning("%s by a signal", what, extra={"file_only": True})
        else:
            logger.error("%s: %s", exc.code, exc, exc_info=verbose, extra={"file_only": True})
            _print_error(exc, err, verbose)
        return exit_code_for(exc)
    except Exception as exc:  # noqa: BLE001 - a bug: report it, with the traceback in the log
        logger.error("Internal error", exc_info=True, extra={"file_only": True})
        if verbose:
            traceback.print_exc(file=err)
        err.write(f"Internal error: {type(exc).__name__}: {exc}\n"
                  "This is a bug. Run again with --verbose and report the output.\n")
        return ExitCode.INTERNAL
    finally:
        close_resources()
        _remove_our_log_handlers()
        logging.getLogger().setLevel(root_level)
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _emit(text: str, args: argparse.Namespace, stdout: TextIO) -> None:
    """Print the result on stdout and, with --output, save it atomically."""
    stdout.write(text if text.endswith("\n") else text + "\n")
    stdout.flush()
    if args.output:
        write_atomically(args.output, text)


def _keep_partial(partial: str, args: argparse.Namespace, stdout: TextIO, stats: Mapping[str, Any],
                  db_data: Mapping[str, Any] | None, error: dict[str, Any]) -> None:
    """After an interruption or a failure, keep what arrived (stdout, FILE.partial, JSON)."""
    if args.json:
        doc = _json_document(partial or None, stats, db_data, error, complete=False)
        text = json.dumps(doc, ensure_ascii=False, indent=2)
        stdout.write(text + "\n")
    else:
        text = partial
        if partial and not partial.endswith("\n"):
            stdout.write("\n")
    stdout.flush()
    if args.output and (partial or args.json):
        write_atomically(args.output + ".partial", text)


if __name__ == "__main__":
    sys.exit(main())
