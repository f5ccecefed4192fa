"""Per-row prompts: one template, rendered once for every row of a query.

A per-row template knows :data:`PLACEHOLDERS`: ``{row}`` is the whole row in the chosen
format (a one-row Markdown table, CSV with its header, one JSON object, or ``name: value``
lines), ``{row.COLUMN}`` is one value as plain text (line breaks kept, NULL as ``NULL``),
and ``{query}``, ``{columns}``, ``{context}``, ``{row_count}`` work as in the single-question
template. ``{schema}`` places the JSON Schema of ``--schema`` (without it the schema is
appended after the template). ``{data}`` belongs to the single-question prompt and is an
error here that suggests ``{row}``; a template that uses no part of the row is an error too
(every prompt would be the same).

Rendering is cheap by construction: the template is parsed once, every placeholder that does
not depend on the row is substituted once, and a row costs one join of a few strings.
"""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from errors import PromptError
from prompt_template import Slot, Template, parse_template
from value_format import ELLIPSIS, encodable, plain_text, row_layout

logger = logging.getLogger(__name__)

#: The placeholders of a per-row template.
PLACEHOLDERS = ("row", "query", "columns", "context", "row_count", "schema")

SCHEMA_INSTRUCTION = "Answer with only a JSON object that matches this JSON Schema, and no other text:\n"


def parse_row_template(text: str, *, has_schema: bool = False) -> Template:
    """Parse a per-row template; raise PromptError for ``{data}``, typos, or no use of the row.

    Column names in ``{row.NAME}`` are checked later, against the query's columns
    (:class:`RowPrompt`), since they are known only once the query has run.
    """
    template = parse_template(text, names=(*PLACEHOLDERS, "data"), fields=("row",))
    names = template.names
    if "data" in names:
        raise PromptError(
            "{data} is the single-question placeholder (many rows in one prompt); a --per-row template "
            "gets one row at a time.",
            hint="Fix: write {row} for the whole row, or {row.COLUMN} for one value, e.g. "
            "--template 'Classify the sentiment of this review: {row.body}'.",
        )
    if "row" not in names:
        raise PromptError(
            "The --per-row template uses no part of the row, so every row would get the same prompt.",
            hint="Fix: put {row} (the whole row) or {row.COLUMN} (one value) in the template.",
        )
    if "schema" in names and not has_schema:
        raise PromptError("The template uses {schema}, but no --schema FILE.json was given.",
                          hint="Fix: pass --schema FILE.json, or remove {schema} from the template.")
    return template


def _shorten(text: str, limit: int | None) -> str:
    if limit is None or len(text) <= limit:
        return text
    return f"{text[:limit]}{ELLIPSIS}(+{len(text) - limit:,} chars)"


def value_text(value: Any, max_cell_chars: int | None = None) -> str:
    """One value as it goes into ``{row.COLUMN}``: plain text, line breaks kept, NULL as ``NULL``."""
    if value is None:
        return "NULL"
    return encodable(_shorten(plain_text(value), max_cell_chars))


@dataclass(frozen=True)
class _Field:
    column: str


class RowPrompt:
    """Renders one template for each row of one query.

    Args:
        template: from :func:`parse_row_template`.
        columns: the query's columns, in order.
        data_format: how ``{row}`` is written (``markdown``, ``json``, ``csv``, ``records``).
        max_cell_chars: shorten longer values (None: keep them whole).
        query, context, row_count: for ``{query}``, ``{context}`` and ``{row_count}``.
        schema_text: the JSON Schema as text (``--schema``): placed at ``{schema}`` or appended.

    Raises:
        PromptError: ``{row.NAME}`` names a column the query does not return (listing them).
    """

    def __init__(self, template: Template, columns: Sequence[str], *, data_format: str = "markdown",
                 max_cell_chars: int | None = None, query: str = "", context: str = "", row_count: int = 0,
                 schema_text: str | None = None) -> None:
        self.columns = list(columns)
        self._limit = max_cell_chars
        self._check_fields(template)
        constants = {
            "query": encodable(query), "columns": encodable(", ".join(self.columns)),
            "context": encodable(context), "row_count": f"{row_count:,}", "schema": schema_text or "",
        }
        parts: list[str | Slot | _Field] = []
        for part in template.parts:
            if isinstance(part, str):
                parts.append(encodable(part))
            elif part.name != "row":
                parts.append(constants[part.name])
            else:
                parts.append(part if part.field is None else _Field(part.field))
        if schema_text is not None and "schema" not in template.names:
            parts.append("\n\n" + SCHEMA_INSTRUCTION + schema_text)
        self._parts = _merge_literals(parts)
        self._whole_row = _whole_row_renderer(data_format, self.columns, max_cell_chars)

    def _check_fields(self, template: Template) -> None:
        known = set(self.columns)
        unknown = [p.field for p in template.parts
                   if isinstance(p, Slot) and p.name == "row" and p.field is not None and p.field not in known]
        if not unknown:
            return
        shown = []
        by_case = {column.lower(): column for column in self.columns}
        for name in dict.fromkeys(unknown):
            close = [by_case[name.lower()]] if name.lower() in by_case else \
                difflib.get_close_matches(name, self.columns, n=1, cutoff=0.6)
            shown.append(f"{{row.{name}}}" + (f" (did you mean {{row.{close[0]}}}?)" if close else ""))
        raise PromptError(
            f"The template names a column the query does not return: {', '.join(shown)}.",
            hint=f"The query's columns: {', '.join(self.columns)}. Column names are case-sensitive.",
        )

    def render(self, row: Mapping[str, Any], index: int = 0) -> str:
        """The prompt for one row (``index``: its 0-based position in the result)."""
        out = []
        for part in self._parts:
            if part.__class__ is str:
                out.append(part)  # type: ignore[arg-type]
            elif part.__class__ is _Field:
                out.append(value_text(row[part.column], self._limit))  # type: ignore[union-attr]
            else:
                out.append(self._whole_row(row, index))
        return "".join(out)


def _merge_literals(parts: list[Any]) -> tuple[Any, ...]:
    merged: list[Any] = []
    for part in parts:
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        elif not (isinstance(part, str) and not part):
            merged.append(part)
    return tuple(merged)


def _whole_row_renderer(data_format: str, columns: list[str], limit: int | None) -> Callable[[Mapping[str, Any], int], str]:
    """``{row}``: one row in ``data_format``, with the header where the format has one."""
    layout = row_layout(data_format, columns)
    render = layout.render
    if data_format == "records":
        # Without the "[row N]" label of a multi-row block: the prompt is about this row alone.
        return lambda row, index: render(row, index, limit).split("\n", 1)[1]
    if layout.head:
        head = layout.head + layout.joiner
        return lambda row, index: head + render(row, index, limit)
    return lambda row, index: render(row, index, limit)


def schema_prompt_text(schema: Mapping[str, Any]) -> str:
    """The JSON Schema as it is shown to the model (indented JSON, non-ASCII kept)."""
    return json.dumps(schema, ensure_ascii=False, indent=2)
