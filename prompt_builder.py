"""Turn query results into the prompt text that goes to the model.

This module is pure: rows and a template in, a string out. It reads no
environment, opens no connection, and touches the file system only in
:func:`load_template`, when asked to.

Input is the usual query-result shape::

    {"query": "SELECT ...", "results": [{column: value, ...}, ...], "row_count": N}

or a plain list of row dicts. ``"columns"`` (the query's column names) and
``"more_rows": True`` (the database had more rows than were fetched) are
optional.

Templates: ``{data}``, ``{context}``, ``{row_count}``, ``{columns}`` and
``{query}`` are substituted; ``{{name}}`` writes ``{name}`` literally; any other
brace (JSON, code) stays as written; an unknown ``{name}`` is an error. The
data block always starts on a line of its own.

Budget: the whole prompt (template, context and data) stays within an
estimated-token budget (by default a 16,384-token window minus the answer's
``MAX_NEW_TOKENS``) and an optional character limit. Whole rows are dropped
from the end, the prompt says ``(showing 120 of 5,000 rows)``, and only the
rows shown are ever formatted.

Rendering rules (the same in every format unless noted):

* ``NULL`` (``None``) is shown as the bare word ``NULL`` (JSON ``null``).
* In Markdown and records, a text that is empty, equals ``NULL`` or starts
  with ``"`` is wrapped in one more pair of double quotes, so ``""`` is the
  empty string and ``"NULL"`` the four-letter text. Inside a cell ``\\``,
  ``|`` (Markdown only), newline, CR, tab and other control or line-separator
  characters are escaped as ``\\\\``, ``\\|``, ``\\n``, ``\\r``, ``\\t``, ``\\xNN`` /
  ``\\uNNNN``: a cell never breaks its line.
* CSV follows RFC 4180 (comma, fields quoted with ``"`` doubled inside), with
  ``\\n`` line ends. NULL is the bare word ``NULL``; the text ``NULL``, the
  empty text, and texts containing ``,`` ``"`` line breaks or leading/trailing
  blanks are always quoted. So an unquoted ``NULL`` is SQL NULL, ``"NULL"`` is
  text, ``""`` is the empty string.
* JSON is JSON Lines: one object per row, keys in the query's column order.
  Non-finite floats and Decimals become the strings ``"NaN"``, ``"Infinity"``,
  ``"-Infinity"`` (JSON has no such numbers); Decimals are exact numbers.
* Decimal without float noise; dates and times in ISO 8601 (with offset when
  the value has one); intervals as ISO 8601 durations (``P1DT2H3M4S``); uuid as
  text; bytea as ``<bytea 1,234 bytes>``; json/jsonb and arrays as compact JSON;
  ranges as PostgreSQL writes them (``[1,5)``); anything else as ``str(value)``.
* A value longer than ``max_cell_chars`` keeps its first ``max_cell_chars``
  characters followed by ``…(+N chars)``.
"""

from __future__ import annotations

import datetime
import decimal
import difflib
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from errors import PromptError
from token_count import estimate_tokens

logger = logging.getLogger(__name__)

FORMATS = ("markdown", "json", "csv", "records")
PLACEHOLDERS = ("data", "context", "row_count", "columns", "query")

#: Phi-4's window, shared by the prompt and the answer.
DEFAULT_CONTEXT_TOKENS = 16384
#: The default answer length (``MAX_NEW_TOKENS``).
DEFAULT_MAX_NEW_TOKENS = 512
#: Kept free for the chat template's own tokens (``<|im_start|>user<|im_sep|>`` ...).
DEFAULT_RESERVE_TOKENS = 64
#: Per-value limit used by :func:`build_prompt` unless told otherwise.
DEFAULT_MAX_CELL_CHARS = 500

ELLIPSIS = "…"

def default_token_budget(
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    reserve: int = DEFAULT_RESERVE_TOKENS,
) -> int:
    """Tokens left for the user prompt: the window minus the answer and a reserve.

    The reserve covers the chat template's role markers; the system prompt, if
    any, is subtracted separately by :func:`build_prompt`.
    """
    for name, value in (("context_tokens", context_tokens), ("max_new_tokens", max_new_tokens), ("reserve", reserve)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PromptError(f"{name} must be a non-negative integer, got {value!r}")
    budget = context_tokens - max_new_tokens - reserve
    if budget <= 0:
        raise PromptError(
            f"No room for a prompt: context of {context_tokens:,} tokens minus {max_new_tokens:,} "
            f"for the answer and {reserve:,} reserved leaves {budget:,}",
            hint="Lower MAX_NEW_TOKENS or use a model with a larger context window.",
        )
    return budget


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------

_LINE_ESCAPES = {
    ord("\\"): "\\\\",
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
    0x85: "\\x85",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}
for _cp in list(range(0x20)) + [0x7F]:
    _LINE_ESCAPES.setdefault(_cp, f"\\x{_cp:02x}")
for _cp in range(0xD800, 0xE000):  # lone surrogates cannot be encoded as UTF-8
    _LINE_ESCAPES[_cp] = f"\\u{_cp:04x}"
_MD_ESCAPES = {**_LINE_ESCAPES, ord("|"): "\\|"}
_LINE_SPECIAL = re.compile("[\\\\\x00-\x1f\x7f\x85\u2028\u2029\ud800-\udfff]")
_MD_SPECIAL = re.compile("[\\\\|\x00-\x1f\x7f\x85\u2028\u2029\ud800-\udfff]")
# Characters JSON leaves raw that would split a line for str.splitlines() or
# cannot be encoded as UTF-8.
_JSON_SPECIAL = re.compile("[\x85\u2028\u2029\ud800-\udfff]")
_CSV_NEEDS_QUOTES = re.compile('[,"\r\n\x85\u2028\u2029]|^[ \t]|[ \t]$')
_SURROGATE = re.compile("[\ud800-\udfff]")


def _encodable(text: str) -> str:
    # A lone surrogate cannot be sent as UTF-8; where no escape syntax exists
    # (CSV, the template, the context) it becomes U+FFFD, the replacement character.
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def _shorten(text: str, limit: int | None) -> str:
    if limit is None or len(text) <= limit:
        return text
    return f"{text[:limit]}{ELLIPSIS}(+{len(text) - limit:,} chars)"


def _interval(value: datetime.timedelta) -> str:
    """ISO 8601 duration: ``P1DT2H3M4S``, ``-PT1S``, ``PT0S``."""
    micros = (value.days * 86400 + value.seconds) * 1_000_000 + value.microseconds
    sign = "-" if micros < 0 else ""
    micros = abs(micros)
    days, micros = divmod(micros, 86_400_000_000)
    hours, micros = divmod(micros, 3_600_000_000)
    minutes, micros = divmod(micros, 60_000_000)
    seconds, micros = divmod(micros, 1_000_000)
    time_part = ""
    if hours:
        time_part += f"{hours}H"
    if minutes:
        time_part += f"{minutes}M"
    if seconds or micros:
        time_part += f"{seconds}.{micros:06d}".rstrip("0").rstrip(".") + "S"
    if not days and not time_part:
        return "PT0S"
    return f"{sign}P{f'{days}D' if days else ''}{'T' + time_part if time_part else ''}"


def _int_text(value: int) -> str:
    try:
        return str(value)
    except ValueError:  # beyond sys.get_int_max_str_digits()
        return f"<integer of about {int(value.bit_length() * 0.30103):,} digits>"


def _float_text(value: float) -> str:
    if math.isfinite(value):
        return repr(value)
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _decimal_text(value: decimal.Decimal) -> str:
    if value.is_nan():
        return "NaN"
    if value.is_infinite():
        return "Infinity" if value > 0 else "-Infinity"
    # Plain notation (no exponent) unless that would be absurdly long.
    if abs(value.as_tuple().exponent) <= 100:  # type: ignore[arg-type]
        return format(value, "f")
    return str(value)


def _bytes_text(value: bytes | bytearray | memoryview) -> str:
    size = value.nbytes if isinstance(value, memoryview) else len(value)
    return f"<bytea {size:,} bytes>"


def _is_range(value: Any) -> bool:
    # psycopg2.extras.Range and subclasses, recognised without importing psycopg2.
    return type(value).__name__.endswith("Range") and hasattr(value, "isempty") and hasattr(value, "lower_inc")


def _range_text(value: Any) -> str:
    if value.isempty:
        return "empty"
    lower = "" if value.lower is None else _plain(value.lower)
    upper = "" if value.upper is None else _plain(value.upper)
    return f"{'[' if value.lower_inc else '('}{lower},{upper}{']' if value.upper_inc else ')'}"


def _plain(value: Any) -> str:
    """Canonical text of a non-NULL value, before any format's escaping."""
    kind = type(value)
    if kind is str:
        return value
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return _int_text(value)
    if kind is float:
        return _float_text(value)
    if kind is decimal.Decimal:
        return _decimal_text(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return _int_text(int(value))
    if isinstance(value, float):
        return _float_text(float(value))
    if isinstance(value, decimal.Decimal):
        return _decimal_text(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return _interval(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _bytes_text(value)
    if isinstance(value, (dict, list, tuple)):
        return _json(value)
    if _is_range(value):
        return _range_text(value)
    return str(value)


def _json_string(text: str) -> str:
    out = json.dumps(text, ensure_ascii=False)
    if _JSON_SPECIAL.search(out):
        out = _JSON_SPECIAL.sub(lambda m: f"\\u{ord(m.group()):04x}", out)
    return out


def _json(value: Any) -> str:
    """Compact JSON text for any value (nested json/jsonb, arrays, scalars)."""
    if value is None:
        return "null"
    kind = type(value)
    if kind is str:
        return _json_string(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        text = _int_text(value)
        return text if text[0] != "<" else _json_string(text)
    if kind is float or kind is decimal.Decimal or isinstance(value, (float, decimal.Decimal)):
        text = _plain(value)
        # JSON has no NaN or Infinity: those become strings.
        return text if text not in ("NaN", "Infinity", "-Infinity") else _json_string(text)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{_json_string(str(k))}:{_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_json(v) for v in value) + "]"
    if isinstance(value, int):  # int subclasses such as IntEnum
        return _json(int(value))
    return _json_string(_plain(value))


def _quote_if_ambiguous(text: str) -> str:
    # Injective: NULL stays the only bare "NULL", "" the only empty text.
    if not text or text == "NULL" or text[0] == '"':
        return f'"{text}"'
    return text


def _markdown_cell(value: Any, limit: int | None) -> str:
    if value is None:
        return "NULL"
    text = _quote_if_ambiguous(_shorten(_plain(value), limit))
    if _MD_SPECIAL.search(text):
        text = text.translate(_MD_ESCAPES)
    return text


def _record_value(value: Any, limit: int | None) -> str:
    if value is None:
        return "NULL"
    text = _quote_if_ambiguous(_shorten(_plain(value), limit))
    if _LINE_SPECIAL.search(text):
        text = text.translate(_LINE_ESCAPES)
    return text


def _csv_field(value: Any, limit: int | None) -> str:
    if value is None:
        return "NULL"
    text = _encodable(_shorten(_plain(value), limit))
    if not text or text == "NULL" or _CSV_NEEDS_QUOTES.search(text):
        return '"' + text.replace('"', '""') + '"'
    return text


def _json_field(value: Any, limit: int | None) -> str:
    if value is None:
        return "null"
    kind = type(value)
    if kind is str:
        return _json_string(_shorten(value, limit))
    text = _json(value)
    if limit is not None and len(text) > limit:
        if text[0] == '"':  # a string-valued scalar: shorten the text itself
            return _json_string(_shorten(_plain(value), limit))
        # Too long an object/array/number: keep a shortened copy of its JSON text as a string.
        return _json_string(_shorten(text, limit))
    return text


_CELL_RENDERERS: dict[str, Callable[[Any, int | None], str]] = {
    "markdown": _markdown_cell,
    "json": _json_field,
    "csv": _csv_field,
    "records": _record_value,
}


def format_value(value: Any, *, fmt: str = "markdown", max_cell_chars: int | None = None) -> str:
    """Render one value exactly as it appears in a cell of format ``fmt``.

    ``format_value(None)`` is ``"NULL"``; ``format_value("a|b")`` is ``"a\\\\|b"``;
    ``format_value(Decimal("1.10"), fmt="json")`` is ``"1.10"``.
    """
    _check_format(fmt)
    _check_limit("max_cell_chars", max_cell_chars)
    return _CELL_RENDERERS[fmt](value, max_cell_chars)


# ---------------------------------------------------------------------------
# Row layouts
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    head: str  # text before the first row ("" when the format has no header)
    joiner: str  # put between two rows, and between the head and the first row
    row: Callable[[Mapping[Any, Any], int], str]  # (row, 0-based index) -> text


def _row_values(row: Any, index: int, columns: Sequence[Any]) -> list[Any]:
    if not isinstance(row, Mapping):
        raise PromptError(
            f"Row {index + 1} is a {type(row).__name__}, not a mapping of column to value",
            hint="Pass rows as dicts (psycopg2's RealDictCursor returns them).",
        )
    try:
        values = [row[c] for c in columns]
    except KeyError as exc:
        raise PromptError(
            f"Row {index + 1} has no column {exc.args[0]!r}, which row 1 has",
            hint="Every row must have the same columns as the first.",
        ) from None
    if len(row) != len(columns):
        extra = [str(k) for k in row if k not in columns]
        raise PromptError(
            f"Row {index + 1} has columns that row 1 does not: {', '.join(extra)}",
            hint="Every row must have the same columns as the first.",
        )
    return values


def _layout(fmt: str, columns: Sequence[Any], limit: int | None) -> _Layout:
    names = [str(c) for c in columns]
    if fmt == "markdown":
        head = (
            "| " + " | ".join(_markdown_cell(n, None) for n in names) + " |\n"
            "|" + "---|" * len(names)
        )

        def row(r: Mapping[Any, Any], i: int) -> str:
            return "| " + " | ".join([_markdown_cell(v, limit) for v in _row_values(r, i, columns)]) + " |"

        return _Layout(head, "\n", row)
    if fmt == "csv":
        head = ",".join(_csv_field(n, None) for n in names)

        def row(r: Mapping[Any, Any], i: int) -> str:
            return ",".join([_csv_field(v, limit) for v in _row_values(r, i, columns)])

        return _Layout(head, "\n", row)
    if fmt == "json":
        keys = [_json_string(n) + ":" for n in names]

        def row(r: Mapping[Any, Any], i: int) -> str:
            values = _row_values(r, i, columns)
            return "{" + ",".join([k + _json_field(v, limit) for k, v in zip(keys, values)]) + "}"

        return _Layout("", "\n", row)
    # records: one block per row, "name: value" lines
    labels = [_record_value(n, None) + ": " for n in names]

    def row(r: Mapping[Any, Any], i: int) -> str:
        values = _row_values(r, i, columns)
        return f"[row {i + 1}]\n" + "\n".join([k + _record_value(v, limit) for k, v in zip(labels, values)])

    return _Layout("", "\n\n", row)


def _check_format(fmt: Any) -> None:
    if fmt not in FORMATS:
        raise PromptError(
            f"Unknown data format {fmt!r}",
            hint=f"Use one of: {', '.join(FORMATS)}.",
        )


def _check_limit(name: str, value: Any, minimum: int = 1) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise PromptError(f"{name} must be an integer >= {minimum} or None, got {value!r}")


def _unpack(db_data: Any) -> tuple[Sequence[Any], str | None, int, bool, list[Any]]:
    """Return (rows, query, rows_total, more_rows, columns) from either accepted input shape."""
    query = None
    row_count = None
    more_rows = False
    columns = None
    if isinstance(db_data, Mapping):
        if "results" not in db_data:
            raise PromptError(
                "db_data has no 'results' key",
                hint='Pass {"query": "...", "results": [row dicts], "row_count": N} or a plain list of row dicts.',
            )
        results = db_data["results"]
        query = db_data.get("query")
        row_count = db_data.get("row_count")
        more_rows = db_data.get("more_rows", False)
        columns = db_data.get("columns")
    else:
        results = db_data
    if not isinstance(results, Sequence) or isinstance(results, (str, bytes, bytearray)):
        raise PromptError(
            f"Query results must be a list of row dicts, not {type(results).__name__}",
            hint='Pass {"query": "...", "results": [row dicts], "row_count": N} or a plain list of row dicts.',
        )
    if query is not None and not isinstance(query, str):
        raise PromptError(f"db_data['query'] must be text, not {type(query).__name__}")
    if row_count is not None and (not isinstance(row_count, int) or isinstance(row_count, bool) or row_count < 0):
        raise PromptError(f"db_data['row_count'] must be a non-negative integer, got {row_count!r}")
    if not isinstance(more_rows, bool):
        raise PromptError(f"db_data['more_rows'] must be True or False, got {more_rows!r}")
    if columns is None:
        columns = _columns(results)
    elif not isinstance(columns, Sequence) or isinstance(columns, (str, bytes, bytearray)):
        raise PromptError(f"db_data['columns'] must be a list of column names, not {type(columns).__name__}")
    total = row_count if row_count is not None and row_count >= len(results) else len(results)
    return results, query, total, more_rows, list(columns)


def _columns(rows: Sequence[Any]) -> list[Any]:
    if not rows:
        return []
    first = rows[0]
    if not isinstance(first, Mapping):
        _row_values(first, 0, [])  # raises the standard "not a mapping" error
    return list(first.keys())


def format_db_results(results: Any, format: str = "markdown", *, max_cell_chars: int | None = None) -> str:
    """Render every row as text, without any size budget.

    ``results`` is a list of row dicts or a whole ``db_data`` dict. ``format`` is
    one of :data:`FORMATS`. Zero rows give ``"(no rows)"``.
    """
    _check_format(format)
    _check_limit("max_cell_chars", max_cell_chars)
    rows, _query, _total, _more, columns = _unpack(results)
    if not rows:
        return "(no rows)"
    if not columns:
        return f"({len(rows):,} rows with no columns)"
    layout = _layout(format, columns, max_cell_chars)
    body = layout.joiner.join(layout.row(r, i) for i, r in enumerate(rows))
    return layout.head + layout.joiner + body if layout.head else body


# ---------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------

# {{name}} is an escaped literal "{name}"; {name} is a placeholder. Any other
# brace (JSON, code, "{ }") is not matched and stays as written.
_SLOT = re.compile(r"\{\{([A-Za-z_][A-Za-z0-9_]*)\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
_KNOWN = ", ".join("{" + p + "}" for p in PLACEHOLDERS)


def _parse_template(template: str) -> list[str | None | tuple[str]]:
    """Split a template into literal text and ``(name,)`` placeholder slots."""
    parts: list[Any] = []
    unknown: list[str] = []
    pos = 0
    literal: list[str] = []
    for match in _SLOT.finditer(template):
        escaped, name = match.group(1), match.group(2)
        literal.append(template[pos : match.start()])
        pos = match.end()
        if escaped is not None:
            literal.append("{" + escaped + "}")
        elif name in PLACEHOLDERS:
            parts.append("".join(literal))
            literal = []
            parts.append((name,))
        elif name not in unknown:
            unknown.append(name)
    literal.append(template[pos:])
    parts.append("".join(literal))
    if unknown:
        guesses = []
        for name in unknown:
            close = difflib.get_close_matches(name, PLACEHOLDERS, n=1, cutoff=0.5)
            guesses.append(f"{{{name}}}" + (f" (did you mean {{{close[0]}}}?)" if close else ""))
        label = "placeholder" if len(unknown) == 1 else "placeholders"
        raise PromptError(
            f"Unknown {label} in the template: {', '.join(guesses)}",
            hint=f"Known placeholders: {_KNOWN}. To write braces literally, double them: {{{{{unknown[0]}}}}}.",
        )
    return [p for p in parts if p != ""]


def check_template(template: str) -> tuple[str, ...]:
    """Return the placeholders ``template`` uses, in order; raise PromptError for unknown ones."""
    if not isinstance(template, str):
        raise PromptError(f"A template must be text, not {type(template).__name__}")
    seen: list[str] = []
    for part in _parse_template(template):
        if isinstance(part, tuple) and part[0] not in seen:
            seen.append(part[0])
    return tuple(seen)


def load_template(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 template file (a leading BOM is dropped) and check its placeholders."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise PromptError(f"Template file not found: {os.fspath(path)}", hint="Check the path.") from None
    except IsADirectoryError:
        raise PromptError(f"Template path is a folder, not a file: {os.fspath(path)}") from None
    except UnicodeDecodeError as exc:
        raise PromptError(
            f"Template file is not valid UTF-8: {os.fspath(path)} (byte {exc.start})",
            hint="Save the template as UTF-8.",
        ) from None
    except OSError as exc:
        raise PromptError(f"Cannot read template file {os.fspath(path)}: {exc.strerror or exc}") from None
    try:
        _parse_template(text)
    except PromptError as exc:
        raise PromptError(f"{os.fspath(path)}: {exc.message}", hint=exc.hint) from None
    return text


_FORMAT_LABELS = {
    "markdown": "Markdown table",
    "json": "JSON Lines, one object per row",
    "csv": "CSV with a header row; an unquoted NULL is SQL NULL",
    "records": "one block of name: value lines per row",
}


def _default_template(fmt: str, has_query: bool, has_context: bool) -> str:
    text = "Analyze the following database query results."
    if has_query:
        text += "\n\nQuery:\n{query}"
    text += f"\n\nData ({_FORMAT_LABELS[fmt]}):\n{{data}}"
    if has_context:
        text += "\n\nAdditional context:\n{context}"
    text += (
        "\n\nSummarize the key patterns, notable values and anything unusual. "
        "Base every statement on the data shown."
    )
    return text


# ---------------------------------------------------------------------------
# Building the prompt
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptResult:
    """A finished prompt and what went into it."""

    text: str
    rows_shown: int
    #: ``db_data["row_count"]`` when given and >= the fetched rows, else the fetched rows.
    rows_total: int
    #: Rows were dropped to fit the budget or ``max_rows``.
    truncated: bool
    char_count: int
    estimated_tokens: int
    #: Things the caller should know (also logged at WARNING).
    warnings: tuple[str, ...]


def _note(shown: int, total: int, more_rows: bool) -> str:
    if shown < total:
        return f"(showing {shown:,} of {'at least ' if more_rows else ''}{total:,} rows)"
    if more_rows:
        return f"(showing all {shown:,} fetched rows; the query returned more)"
    return ""


def build_prompt(
    db_data: Any,
    template: str | os.PathLike[str] | None = None,
    additional_context: str | None = None,
    *,
    data_format: str = "markdown",
    max_tokens: int | None = None,
    max_chars: int | None = None,
    max_rows: int | None = None,
    max_cell_chars: int | None = DEFAULT_MAX_CELL_CHARS,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    system_prompt: str | None = None,
) -> PromptResult:
    """Build the prompt for ``db_data`` within a size budget.

    Args:
        db_data: ``{"query", "results", "row_count"[, "columns", "more_rows"]}`` or a
            list of row dicts. ``columns`` (optional) fixes the column order;
            otherwise it is the first row's key order.
        template: template text, a path to a UTF-8 template file, or None for the default.
        additional_context: free text for ``{context}``; appended in its own
            section when the template has no ``{context}``.
        data_format: one of :data:`FORMATS`.
        max_tokens: estimated-token bound for the whole prompt. Default: what
            :func:`default_token_budget` leaves, minus the system prompt.
        max_chars: character bound for the whole prompt (default: none).
        max_rows: show at most this many rows.
        max_cell_chars: shorten longer values (None: no limit).
        context_tokens, max_new_tokens: the model window and answer length the
            default budget is derived from.
        system_prompt: only counted against the default budget; it is not
            part of the returned text.

    Rows that do not fit are dropped from the end, whole, and the prompt says
    so (``(showing 120 of 5,000 rows)``). Only the rows shown are formatted.

    Raises:
        PromptError: bad input, unknown placeholder, or a budget too small for
            the template and context or for even one row.
    """
    rows, query, rows_total, more_rows, columns = _unpack(db_data)
    _check_format(data_format)
    _check_limit("max_tokens", max_tokens)
    _check_limit("max_chars", max_chars)
    _check_limit("max_rows", max_rows, minimum=0)
    _check_limit("max_cell_chars", max_cell_chars)
    if additional_context is not None and not isinstance(additional_context, str):
        raise PromptError(f"additional_context must be text, not {type(additional_context).__name__}")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise PromptError(f"system_prompt must be text, not {type(system_prompt).__name__}")
    context = additional_context or ""

    if max_tokens is None:
        max_tokens = default_token_budget(context_tokens, max_new_tokens)
        if system_prompt:
            # The server sends f"{system_prompt}\n\n{prompt}" to the model.
            system_cost = estimate_tokens(system_prompt) + 2
            if system_cost >= max_tokens:
                raise PromptError(
                    f"The system prompt alone needs about {system_cost:,} tokens; "
                    f"only {max_tokens:,} are available for the whole prompt",
                    hint="Shorten the system prompt or lower MAX_NEW_TOKENS.",
                )
            max_tokens -= system_cost

    if template is None:
        template_text = _default_template(data_format, bool(query), bool(context))
    elif isinstance(template, os.PathLike):
        template_text = load_template(template)
    elif isinstance(template, str):
        template_text = template
    else:
        raise PromptError(f"A template must be text or a path, not {type(template).__name__}")

    warnings: list[str] = []
    parts = _parse_template(template_text)
    used = {p[0] for p in parts if isinstance(p, tuple)}
    if "data" not in used:
        warnings.append("The template has no {data} placeholder; the data was appended at the end.")
        parts += ["\n\nData:\n", ("data",)]
    if context and "context" not in used:
        parts += ["\n\nAdditional context:\n", ("context",)]
    # The data block always starts on a line of its own, so that a template
    # like "분석해주세요: {data}" does not glue its text onto the table header.
    for i, part in enumerate(parts):
        if part == ("data",) and i > 0 and isinstance(parts[i - 1], str) and not parts[i - 1].endswith("\n"):
            parts[i - 1] = parts[i - 1].rstrip(" \t") + "\n"

    values = {
        "context": _encodable(context),
        "row_count": str(rows_total),
        "columns": _encodable(", ".join(str(c) for c in columns)),
        "query": _encodable(query or ""),
    }
    parts = [_encodable(p) if isinstance(p, str) else p for p in parts]
    # The text around the {data} slots, as runs between them.
    fixed: list[str] = []
    run: list[str] = []
    copies = 0
    for part in parts:
        if isinstance(part, tuple) and part[0] == "data":
            fixed.append("".join(run))
            run = []
            copies += 1
        else:
            run.append(values[part[0]] if isinstance(part, tuple) else part)
    fixed.append("".join(run))
    fixed_chars = sum(map(len, fixed))
    fixed_tokens = sum(map(estimate_tokens, fixed))

    def over_budget(extra_chars: int, extra_tokens: int) -> bool:
        if fixed_tokens + copies * extra_tokens > max_tokens:
            return True
        return max_chars is not None and fixed_chars + copies * extra_chars > max_chars

    if not rows or not columns:
        layout = None
        head = "(no rows)" if not rows else f"({len(rows):,} rows with no columns)"
    else:
        layout = _layout(data_format, columns, max_cell_chars)
        head = layout.head
    limit = len(rows) if max_rows is None else min(max_rows, len(rows))

    # Format row by row and stop at the first row that does not fit: the work
    # is proportional to the rows shown, not to the rows fetched.
    # A piece never costs more tokens than its UTF-8 bytes (see estimate_tokens), so
    # while that bound fits, rows are costed by their byte length; the exact estimate
    # is computed only once the budget comes near (then for every row kept).
    row_parts: list[str] = []
    costs: list[tuple[int, int]] = []
    used_chars = len(head)
    used_tokens = estimate_tokens(head)
    exact = False

    def make_exact() -> None:
        nonlocal exact, used_tokens
        exact = True
        for k, piece in enumerate(row_parts):
            costs[k] = (costs[k][0], estimate_tokens(piece))
        used_tokens = estimate_tokens(head) + sum(cost[1] for cost in costs)

    if layout is not None:
        for i in range(limit):
            piece = layout.row(rows[i], i)
            if i or head:
                piece = layout.joiner + piece
            if not exact:
                cost = (len(piece), len(piece.encode("utf-8", "surrogatepass")))
                if over_budget(used_chars + cost[0], used_tokens + cost[1]):
                    make_exact()
            if exact:
                cost = (len(piece), estimate_tokens(piece))
            if over_budget(used_chars + cost[0], used_tokens + cost[1]):
                break
            row_parts.append(piece)
            costs.append(cost)
            used_chars += cost[0]
            used_tokens += cost[1]

    # The "(showing N of M rows)" note needs room too: give it rows back.
    shown = len(row_parts)
    while shown > 0:
        note = _note(shown, rows_total, more_rows)
        note_cost = (len(note) + 2, estimate_tokens(note) + 2) if note else (0, 0)
        if not over_budget(used_chars + note_cost[0], used_tokens + note_cost[1]):
            break
        if not exact:
            make_exact()
            continue
        shown -= 1
        used_chars -= costs[shown][0]
        used_tokens -= costs[shown][1]

    # Piece-by-piece sums err high; before giving up on every row, try the
    # first one against the estimate of the whole text.
    if shown == 0 and limit > 0 and layout is not None:
        if not row_parts:
            row_parts.append((layout.joiner if head else "") + layout.row(rows[0], 0))
        shown = 1

    def render(n: int) -> str:
        note = _note(n, rows_total, more_rows) if layout is not None else ""
        body = head + "".join(row_parts[:n])
        return _fill(parts, values, f"{body}\n\n{note}" if note else body)

    def fits(text: str, tokens: int) -> bool:
        return tokens <= max_tokens and (max_chars is None or len(text) <= max_chars)

    # The estimate of the whole text is at most the sum of its pieces', so this
    # loop rarely drops a row; it makes the bound hold exactly.
    text = render(shown)
    tokens = estimate_tokens(text)
    while shown > 0 and not fits(text, tokens):
        shown -= 1
        text = render(shown)
        tokens = estimate_tokens(text)

    if not fits(text, tokens) or (shown == 0 and limit > 0 and layout is not None):
        bare = _fill(parts, values, "")
        if layout is None or not fits(bare, estimate_tokens(bare)):
            over = text if layout is None else bare
            raise PromptError(
                "The template, context and query alone exceed the prompt budget: "
                + _excess(len(over), estimate_tokens(over), max_chars, max_tokens),
                hint="Shorten the template or the context, or raise the budget (max_tokens / context size).",
            )
        one_row = render(1)
        raise PromptError(
            "Not even one row fits in the prompt budget: with the first row the prompt needs "
            + _excess(len(one_row), estimate_tokens(one_row), max_chars, max_tokens),
            hint="Lower max_cell_chars, shorten the context, use the csv format, or raise the budget.",
        )

    truncated = shown < len(rows)
    if shown < limit:
        logger.info(
            "only %d of %d rows fit in the prompt budget (%d tokens, %s characters)",
            shown, len(rows), max_tokens, max_chars if max_chars is not None else "no limit on",
        )
    for message in warnings:
        logger.warning("%s", message)
    return PromptResult(
        text=text,
        rows_shown=shown,
        rows_total=rows_total,
        truncated=truncated,
        char_count=len(text),
        estimated_tokens=tokens,
        warnings=tuple(warnings),
    )


def _excess(chars: int, tokens: int, max_chars: int | None, max_tokens: int) -> str:
    reasons = []
    if tokens > max_tokens:
        reasons.append(f"about {tokens:,} tokens against a budget of {max_tokens:,} (over by {tokens - max_tokens:,})")
    if max_chars is not None and chars > max_chars:
        reasons.append(f"{chars:,} characters against a limit of {max_chars:,} (over by {chars - max_chars:,})")
    return "; ".join(reasons) or f"about {tokens:,} tokens, {chars:,} characters"


def _fill(parts: Sequence[Any], values: Mapping[str, str], data_text: str) -> str:
    # Substituted values are inserted as they are and never scanned again.
    out = []
    for part in parts:
        if isinstance(part, tuple):
            out.append(data_text if part[0] == "data" else values[part[0]])
        else:
            out.append(part)
    return "".join(out)


def build_prompt_from_data(
    db_data: Any,
    template: str | os.PathLike[str] | None = None,
    additional_context: str | None = None,
    **kwargs: Any,
) -> str:
    """Return just the prompt text; see :func:`build_prompt` for the keyword arguments."""
    return build_prompt(db_data, template, additional_context, **kwargs).text
