"""How values and rows are written into a prompt: one cell, one row, one data block.

Four formats (:data:`FORMATS`). Rendering rules (the same in every format unless noted):

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
  text, ``""`` is the empty string. RFC 4180 has no escapes, but a raw ESC,
  BEL or DEL would reach the model and, in ``--dry-run``, the terminal, so
  inside a field the control characters other than tab, LF and CR
  (U+0000-U+001F, U+007F) are written ``\\xNN``, as in Markdown and records,
  and for that to stay unambiguous a backslash is written ``\\\\``. Tab and
  line breaks stay raw inside a quoted field, as RFC 4180 allows. Reading a
  field back: undo the quoting, then turn ``\\\\`` into ``\\`` and ``\\xNN``
  into its character.
* JSON is JSON Lines: one object per row, keys in the query's column order.
  Non-finite floats and Decimals become the strings ``"NaN"``, ``"Infinity"``,
  ``"-Infinity"`` (JSON has no such numbers); Decimals are exact numbers.
* Decimal without float noise; dates and times in ISO 8601 (with offset when
  the value has one); intervals as ISO 8601 durations (``P1DT2H3M4S``); uuid as
  text; bytea as ``<bytea 1,234 bytes>``; json/jsonb and arrays as compact JSON;
  ranges as PostgreSQL writes them (``[1,5)``); anything else as ``str(value)``.
* A value longer than ``max_cell_chars`` keeps its first ``max_cell_chars``
  characters followed by ``…(+N chars)``.
* A lone surrogate (it cannot be sent as UTF-8) is escaped as ``\\uDXXX`` where
  the format has escapes for it (Markdown, records, JSON) and becomes U+FFFD,
  the replacement character, in CSV, templates and context.

A :class:`RowLayout` renders whole rows of one format: the header (Markdown,
CSV), the text between rows, and one row at a given per-value limit (the row
packer lowers the limit for a row too large for a prompt).
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from errors import PromptError

FORMATS = ("markdown", "json", "csv", "records")
ELLIPSIS = "…"

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
# In CSV: a backslash, and the control characters a CSV reader cannot take raw.
_CSV_SPECIAL = re.compile("[\\\\\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CSV_ESCAPES = {ord("\\"): "\\\\", **{cp: f"\\x{cp:02x}" for cp in [*range(0x20), 0x7F] if chr(cp) not in "\t\n\r"}}
_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(text: str) -> str:
    """``text`` with each lone surrogate (not encodable as UTF-8) replaced by U+FFFD."""
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
    lower = "" if value.lower is None else plain_text(value.lower)
    upper = "" if value.upper is None else plain_text(value.upper)
    return f"{'[' if value.lower_inc else '('}{lower},{upper}{']' if value.upper_inc else ')'}"


def plain_text(value: Any) -> str:
    """Canonical text of a non-NULL value, before any format's escaping and shortening."""
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
        text = plain_text(value)
        # JSON has no NaN or Infinity: those become strings.
        return text if text not in ("NaN", "Infinity", "-Infinity") else _json_string(text)
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{_json_string(str(k))}:{_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_json(v) for v in value) + "]"
    if isinstance(value, int):  # int subclasses such as IntEnum
        return _json(int(value))
    return _json_string(plain_text(value))


def _quote_if_ambiguous(text: str) -> str:
    # Injective: NULL stays the only bare "NULL", "" the only empty text.
    if not text or text == "NULL" or text[0] == '"':
        return f'"{text}"'
    return text


def _markdown_cell(value: Any, limit: int | None) -> str:
    if value is None:
        return "NULL"
    text = _quote_if_ambiguous(_shorten(plain_text(value), limit))
    if _MD_SPECIAL.search(text):
        text = text.translate(_MD_ESCAPES)
    return text


def _record_value(value: Any, limit: int | None) -> str:
    if value is None:
        return "NULL"
    text = _quote_if_ambiguous(_shorten(plain_text(value), limit))
    if _LINE_SPECIAL.search(text):
        text = text.translate(_LINE_ESCAPES)
    return text


def _csv_field(value: Any, limit: int | None) -> str:
    if value is None:
        return "NULL"
    text = encodable(_shorten(plain_text(value), limit))
    if _CSV_SPECIAL.search(text):
        text = text.translate(_CSV_ESCAPES)
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
            return _json_string(_shorten(plain_text(value), limit))
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
    check_format(fmt)
    check_limit("max_cell_chars", max_cell_chars)
    return _CELL_RENDERERS[fmt](value, max_cell_chars)



@dataclass(frozen=True)
class RowLayout:
    """How rows of one format are written: the header, the text between rows, one row."""

    columns: tuple[Any, ...]
    #: Text before the first row ("" when the format has no header).
    head: str
    #: Put between two rows, and between the head and the first row.
    joiner: str
    #: ``(row, 0-based index in the result, max_cell_chars) -> text``; raises PromptError for a malformed row.
    render: Callable[[Any, int, int | None], str]

    def block(self, rows: Sequence[Any], start: int = 0, max_cell_chars: int | None = None) -> str:
        """The data block for ``rows`` (the first one at index ``start``), header included."""
        pieces = [self.head] if self.head else []
        pieces += [self.render(r, start + i, max_cell_chars) for i, r in enumerate(rows)]
        return self.joiner.join(pieces)


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


def row_layout(fmt: str, columns: Sequence[Any]) -> RowLayout:
    """The :class:`RowLayout` of format ``fmt`` for rows with these columns (in this order)."""
    check_format(fmt)
    columns = tuple(columns)
    names = [str(c) for c in columns]
    if fmt == "markdown":
        head = "| " + " | ".join(_markdown_cell(n, None) for n in names) + " |\n|" + "---|" * len(names)

        def markdown_row(r: Any, i: int, limit: int | None) -> str:
            return "| " + " | ".join([_markdown_cell(v, limit) for v in _row_values(r, i, columns)]) + " |"

        return RowLayout(columns, head, "\n", markdown_row)
    if fmt == "csv":

        def csv_row(r: Any, i: int, limit: int | None) -> str:
            return ",".join([_csv_field(v, limit) for v in _row_values(r, i, columns)])

        return RowLayout(columns, ",".join(_csv_field(n, None) for n in names), "\n", csv_row)
    if fmt == "json":
        keys = [_json_string(n) + ":" for n in names]

        def json_row(r: Any, i: int, limit: int | None) -> str:
            values = _row_values(r, i, columns)
            return "{" + ",".join([k + _json_field(v, limit) for k, v in zip(keys, values)]) + "}"

        return RowLayout(columns, "", "\n", json_row)
    # records: one block per row, "name: value" lines
    labels = [_record_value(n, None) + ": " for n in names]

    def record_row(r: Any, i: int, limit: int | None) -> str:
        values = _row_values(r, i, columns)
        return f"[row {i + 1}]\n" + "\n".join([k + _record_value(v, limit) for k, v in zip(labels, values)])

    return RowLayout(columns, "", "\n\n", record_row)


def check_format(fmt: Any) -> None:
    """Raise PromptError unless ``fmt`` is one of :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise PromptError(
            f"Unknown data format {fmt!r}",
            hint=f"Use one of: {', '.join(FORMATS)}.",
        )


def check_limit(name: str, value: Any, minimum: int = 1) -> None:
    """Raise PromptError unless ``value`` is None or an integer >= ``minimum``."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise PromptError(f"{name} must be an integer >= {minimum} or None, got {value!r}")
