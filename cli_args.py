"""The command line's parse step: flags -> a checked :class:`Command`.

:func:`parse_arguments` runs argparse; :func:`prepare` reads what the flags point at (the SQL,
template, context and system prompt files, standard input) and checks everything that can be
checked before the database or the model server is contacted: a refused write, a template
typo, an ``--output`` that could not be written, an unconfigured model server.
"""

from __future__ import annotations

import argparse
import logging
import re
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Sequence, TextIO

import config
import prompt_builder
from cli_output import check_output_path
from config import Settings
import sql_guard
from db_connector import check_read_only_query
from errors import QueryError, UsageError
from runner import DEFAULT_FETCH_ROWS, Question
from server_spec import checked_ca_bundle

logger = logging.getLogger(__name__)

EPILOG = """\
examples:
  %(prog)s --query "SELECT 1 as test"
  %(prog)s --query "SELECT * FROM reviews LIMIT 10"
  %(prog)s --query "SELECT * FROM reviews" --template "다음 데이터를 분석해주세요: {data}"
  %(prog)s --query-file examples/low_rated_reviews.sql --param max_rating=2 --output answer.txt
  %(prog)s --query "SELECT * FROM customers WHERE city = %%(city)s" --param city=서울 --format csv
  echo "SELECT * FROM product_review_summary" | %(prog)s --json > result.json
  %(prog)s --query "SELECT * FROM orders" --dry-run          # show the prompt, send nothing
  %(prog)s --query "SELECT * FROM reviews" --all-rows --template "What do customers complain about? {data}"
  %(prog)s --check                                           # doctor: settings, database, model server

template placeholders: {data} {context} {row_count} {columns} {query}
  other braces (JSON examples) stay as written; {{data}} writes a literal {data}
parameters: --param city=서울 binds %%(city)s in the SQL (values are never pasted into the SQL)

one model call per row (--per-row): the template gets {row} (the whole row) and {row.COLUMN};
  results are JSON Lines (stdout, or --output FILE.jsonl); rerunning the same command continues
  %(prog)s --per-row --query "SELECT id, body FROM reviews" --template "Sentiment of: {row.body}" --output s.jsonl

exit codes:
  0 success            3 database connection error    6 model server error or bad response
  1 internal error     4 query error or refused write 7 --per-row finished, some rows failed (rerun retries them)
  2 usage/config error 5 model server unreachable or timed out   130 interrupted (Ctrl-C)   143 terminated (SIGTERM)
  141 standard output closed before everything was written (e.g. piped into head)
"""

# Flags that set a setting, by the variable they override (flags beat the environment and .env).
SETTING_FLAGS = {
    "API_BASE_URL": "api_url", "API_PROTOCOL": "protocol", "MODEL_NAME": "model", "API_TIMEOUT": "timeout",
    "MAX_NEW_TOKENS": "max_new_tokens", "TEMPERATURE": "temperature", "LOG_FILE": "log_file",
    "ENV_FILE": "env_file",
}
#: The flag that gives each setting, for messages ("API_TIMEOUT must be ... (from --timeout)").
SETTING_FLAG_NAMES = {name: "--" + attribute.replace("_", "-") for name, attribute in SETTING_FLAGS.items()}


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, not the whole usage block above the message."""

    def error(self, message: str) -> NoReturn:
        # "argument --max-rows: expected ..." -> "error: --max-rows: expected ... (see --help)"
        self.exit(2, f"error: {message.removeprefix('argument ')} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python db_to_model_pipeline.py",
        description="Run a read-only SQL query, turn the rows into a prompt, send it to the LLM server\n"
        "on the PC (this project's FastAPI server, Ollama or OpenAI-compatible) and print the answer.\n"
        "The answer goes to stdout; progress and statistics go to stderr. Settings: .env (see README).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _query_options(parser.add_argument_group("query"))
    _prompt_options(parser.add_argument_group("prompt"))
    _model_options(parser.add_argument_group("model server (override .env)"))
    _output_options(parser.add_argument_group("output and modes"))
    _all_rows_options(parser.add_argument_group("every row: one question answered over all rows (map-reduce)"))
    _per_row_options(parser.add_argument_group("one model call per row"))
    _many_calls_options(parser.add_argument_group("many model calls (--all-rows, --per-row)"))
    return parser


def _query_options(q: argparse._ArgumentGroup) -> None:
    source = q.add_mutually_exclusive_group()
    source.add_argument("--query", metavar="SQL", help='one SELECT statement; "-" reads it from stdin')
    source.add_argument("--query-file", metavar="FILE", help="read the SQL from a .sql file (UTF-8)")
    q.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="bind a value to %%(NAME)s in the SQL (repeatable)")
    q.add_argument("--max-rows", type=positive_int, metavar="N",
                   help=f"read at most N rows from the database (default {DEFAULT_FETCH_ROWS:,}; "
                   "no default limit with --all-rows or --per-row)")


def _prompt_options(p: argparse._ArgumentGroup) -> None:
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
    p.add_argument("--prompt-rows", type=positive_int, metavar="N", help="put at most N rows in the prompt")
    p.add_argument("--prompt-budget", type=positive_int, metavar="TOKENS",
                   help="bound the prompt's estimated tokens (default: MODEL_CONTEXT_TOKENS - MAX_NEW_TOKENS - margin)")
    p.add_argument("--prompt-max-chars", type=positive_int, metavar="N", help="bound the prompt's characters")
    p.add_argument("--max-cell-chars", type=positive_int, metavar="N",
                   help=f"shorten longer values (default {prompt_builder.DEFAULT_MAX_CELL_CHARS}; --per-row: none)")


def _model_options(m: argparse._ArgumentGroup) -> None:
    m.add_argument("--api-url", action="append", metavar="URL",
                   help="model server base URL (API_BASE_URL), e.g. http://192.168.0.10:11434; repeat it (or give a "
                   "comma-separated list) for several servers, each with optional #slots=N&model=NAME")
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


def _output_options(o: argparse._ArgumentGroup) -> None:
    o.add_argument("--json", action="store_true", help="print one JSON object (answer, stats, rows) on stdout")
    o.add_argument("--output", metavar="FILE", help="also save the answer (or the JSON with --json) to FILE")
    o.add_argument("--dry-run", action="store_true", help="print the prompt that would be sent; contact no model server")
    o.add_argument("--check", action="store_true", help="check settings, database and model server, then exit")
    o.add_argument("--env-file", metavar="FILE",
                   help="read settings from FILE instead of .env (./.env, else the one beside the scripts); "
                   "/dev/null: none")
    o.add_argument("--log-file", metavar="FILE", help="LOG_FILE (default laptop_client.log; '' for none)")
    verbosity = o.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="debug logging (SQL included) and tracebacks")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="no progress or statistics on stderr")


def _all_rows_options(a: argparse._ArgumentGroup) -> None:
    a.add_argument("--all-rows", action="store_true",
                   help="ask about every row: when the rows do not fit one prompt, answer the template for each "
                   "part of them and combine the answers (no default row cap). Answers are checkpointed beside "
                   "--output FILE (FILE.mapreduce.jsonl), else in ~/.cache/db_to_model_pipeline/ "
                   "($XDG_CACHE_HOME/db_to_model_pipeline/ when set); rerunning the same command reuses them")
    reduce = a.add_mutually_exclusive_group()
    reduce.add_argument("--reduce-template", metavar="TEXT",
                        help="how partial answers are combined; needs {answers}; also {question} {rows} {query} "
                        "{context} {columns} {row_count}")
    reduce.add_argument("--reduce-template-file", metavar="FILE", help="read the reduce template from a UTF-8 file")
    a.add_argument("--max-reduce-levels", type=positive_int, metavar="N",
                   help="stop when the partial answers still do not fit one prompt after N levels of combining (default 4)")


def _per_row_options(r: argparse._ArgumentGroup) -> None:
    r.add_argument("--per-row", action="store_true",
                   help="run the template once for every row the query returns ({row}, {row.COLUMN}); "
                   "results as JSON Lines, resumable")
    r.add_argument("--key", metavar="COLUMN[,COLUMN...]",
                   help="each row's identity, for resuming (default: the column id, else a hash of the row)")
    r.add_argument("--schema", metavar="FILE.json",
                   help="a JSON Schema each answer must match (asked natively, validated, one repair)")
    r.add_argument("--results-table", metavar="NAME",
                   help="also upsert each result into this PostgreSQL table (RESULTS_DATABASE_URL)")
    r.add_argument("--restart", action="store_true",
                   help="start over, also when --output or --results-table holds another job's results "
                   "(the old file is kept aside)")


def _many_calls_options(m: argparse._ArgumentGroup) -> None:
    m.add_argument("--concurrency", type=positive_int, metavar="N",
                   help="--per-row: rows sent at once; --all-rows: calls sent at once (default: what the model "
                   "servers can run at once)")
    m.add_argument("--retries", type=non_negative_int, metavar="N",
                   help="tries again per row (--per-row, default 2) or per call (--all-rows, default "
                   "API_MAX_ATTEMPTS - 1) after a timeout, dropped connection or HTTP 429/5xx")


PER_ROW_ONLY = ("key", "schema", "results_table", "restart")
#: Flags of the --all-rows group (without --all-rows they are refused).
ALL_ROWS_ONLY = ("reduce_template", "reduce_template_file", "max_reduce_levels")
#: Flags for runs of many model calls: --per-row or --all-rows, not a single question.
MANY_CALLS_ONLY = ("concurrency", "retries")
#: --retries when --per-row is not told otherwise.
DEFAULT_ROW_RETRIES = 2


def _given(args: argparse.Namespace, name: str) -> bool:
    return getattr(args, name, None) not in (None, False, "")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_mode_flags(args: argparse.Namespace) -> None:
    """Raise UsageError for flags that belong to another mode than the one chosen."""
    if getattr(args, "per_row", False):
        if getattr(args, "all_rows", False):
            raise UsageError("--per-row and --all-rows do not go together.",
                             hint="Fix: --per-row asks the template once for every row (one answer each); "
                             "--all-rows asks one question over all rows (one answer). Choose one.")
        for flag, wrong in (("--json", args.json), ("--prompt-rows", args.prompt_rows is not None)):
            if wrong:
                raise UsageError(f"{flag} does not apply to --per-row.",
                                 hint="--per-row writes one JSON object per row already (JSON Lines); "
                                 "drop " + flag + ".")
        for name in ALL_ROWS_ONLY:
            if _given(args, name):
                raise UsageError(f"{_flag(name)} applies only to --all-rows, not to --per-row.",
                                 hint=f"Fix: drop {_flag(name)}: --per-row answers every row on its own, so "
                                 "there are no partial answers to combine.")
        return
    for name in PER_ROW_ONLY:
        if _given(args, name):
            raise UsageError(f"{_flag(name)} applies only to --per-row.",
                             hint="Fix: add --per-row to run the template once for every row, or drop the flag.")
    if not getattr(args, "all_rows", False):
        for name in MANY_CALLS_ONLY:
            if _given(args, name):
                raise UsageError(f"{_flag(name)} applies only to --per-row and --all-rows: a single question is "
                                 "one model call.",
                                 hint="Fix: add --all-rows (one question over every row, in several calls) or "
                                 "--per-row (one call per row), or drop the flag.")


def _whole_number(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0, "0 or more")


def positive_int(text: str) -> int:
    return _whole_number(text, 1, "a number of 1 or more")


def parse_arguments(argv: Sequence[str] | None, stdout: TextIO, stderr: TextIO) -> argparse.Namespace | int:
    """The parsed flags, or the exit code when argparse stopped (``--help``: 0, a bad flag: 2).

    argparse prints help and usage errors itself; they go to the given streams.
    """
    with redirect_stdout(stdout), redirect_stderr(stderr):  # type: ignore[type-var]
        try:
            return build_parser().parse_args(argv)
        except SystemExit as exc:
            return int(exc.code or 0)


def setting_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given by flags, for :func:`config.load_settings` (None: not given).

    A repeated flag (``--api-url A --api-url B``) gives a comma-separated list.
    """
    overrides = {name: getattr(args, attribute) for name, attribute in SETTING_FLAGS.items()}
    return {name: ",".join(value) if isinstance(value, list) else value for name, value in overrides.items()}


@dataclass(frozen=True)
class Command:
    """What the command line asked for, with every input read and checked."""

    settings: Settings
    question: Question
    dry_run: bool
    stream: bool  # receive the answer in pieces
    echo: bool  # print the pieces as they arrive (streaming without --json)
    json: bool
    output: str | None


def prepare(args: argparse.Namespace, settings: Settings, stdin: TextIO, stdout_is_terminal: bool) -> Command:
    """Read the inputs the flags name and check them; raises UsageError, QueryError, PromptError, ConfigError."""
    check_mode_flags(args)
    per_row = getattr(args, "per_row", False)
    query = _resolve_query(args, stdin)
    params = _parse_params(args.param)
    template = _read_text_file(args.template_file, "template") if args.template_file else args.template
    context = _read_text_file(args.context_file, "context") if args.context_file else args.context
    system_prompt = (_read_text_file(args.system_prompt_file, "system prompt")
                     if args.system_prompt_file else args.system_prompt)
    if args.output:
        check_output_path(args.output)  # not after a long generation
    check_read_only_query(query)  # a refused write fails before anything else runs
    check_params(query, params)  # a %(name)s without its --param fails before the query runs
    if template is not None and not per_row:  # a per-row template has its own placeholders
        prompt_builder.check_template(template)  # a typo fails before the query runs
    if not args.dry_run:
        for spec in settings.server_specs():  # an unconfigured PC_IP fails before the query runs,
            checked_ca_bundle(spec)  # and so does a missing #ca= file
    question = Question(
        query, template, context, params=params, system_prompt=system_prompt, data_format=args.format,
        fetch_rows=args.max_rows if args.max_rows is not None or per_row else DEFAULT_FETCH_ROWS,
        prompt_rows=args.prompt_rows, prompt_tokens=args.prompt_budget, prompt_chars=args.prompt_max_chars,
        max_cell_chars=(args.max_cell_chars if args.max_cell_chars is not None or per_row
                        else prompt_builder.DEFAULT_MAX_CELL_CHARS),
    )
    # With --json the pieces are collected, not printed: stdout carries one JSON object, and an
    # interrupted --json --stream run still reports what had arrived.
    stream = args.stream if args.stream is not None else (stdout_is_terminal and not args.json)
    return Command(settings, question, dry_run=args.dry_run, stream=stream, echo=stream and not args.json,
                   json=args.json, output=args.output)


def check_params(query: str, params: dict[str, str] | None) -> None:
    """Every ``%(name)s`` needs ``--param name=...``; a ``--param`` the query does not use is warned about.

    Raises UsageError naming the missing parameters and the flag to give them, or for a
    positional ``%s`` (which ``--param`` cannot fill).
    """
    used = sql_guard.placeholders(query, bound=params is not None)
    if params is None and used:
        try:  # "a %(b)s" may also be SQL (a % (b) AS s): placeholders only if it does not parse as written
            sql_guard.check_statement(query, placeholders=False)
            return
        except QueryError:
            pass
    if "%s" in used:
        raise UsageError(
            "The query has a positional %s placeholder, which --param cannot fill.",
            hint="Fix: name it, e.g. WHERE city = %(city)s with --param city=서울 (write a literal % as %%).",
        )
    names = list(dict.fromkeys(used))
    missing = [name for name in names if name not in (params or {})]
    if missing:
        them = "it" if len(missing) == 1 else "them"
        raise UsageError(
            f"The query uses {' and '.join(f'%({name})s' for name in missing)}, but no --param gives {them} a value.",
            hint=f"Fix: add {' '.join(f'--param {name}=...' for name in missing)} "
            "(values are bound by the database driver, never pasted into the SQL).",
        )
    for name in params or {}:
        if name not in names:
            logger.warning("--param %s is not used: the query has no %%(%s)s placeholder.", name, name)


def _read_text_file(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"The {what} file {path} does not exist.", hint="Fix: check the path.") from None
    except UnicodeDecodeError:
        raise UsageError(f"The {what} file {path} is not UTF-8.", hint="Fix: save it as UTF-8.") from None
    except OSError as exc:
        raise UsageError(f"Cannot read the {what} file {path}: {exc.strerror}.") from None


#: For the modes' own flags (a reduce template file ...).
read_text_file = _read_text_file


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
