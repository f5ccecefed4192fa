"""Turn query results into the prompt text that goes to the model: template + one chunk of rows.

This module is pure: rows and a template in, a string out. It reads no
environment, opens no connection, and touches the file system only in
:func:`load_template`, when asked to.

Input is the usual query-result shape::

    {"query": "SELECT ...", "results": [{column: value, ...}, ...], "row_count": N}

or a plain list of row dicts. ``"columns"`` (the query's column names) and
``"more_rows": True`` (the database had more rows than were fetched) are
optional. ``"results"`` may also be an iterator (a generator, a streaming
cursor): rows are then read only until the prompt is full. The total in the
note is ``"row_count"`` when given, else the rows read plus what the
iterator's ``count_remaining()`` method returns when it has one, else a lower
bound (``(showing 637 of at least 638 rows)``).

Templates (:mod:`prompt_template`): ``{data}``, ``{context}``, ``{row_count}``,
``{columns}`` and ``{query}`` are substituted; ``{{name}}`` writes ``{name}``
literally; any other brace (JSON, code) stays as written; an unknown
``{name}`` is an error. The data block always starts on a line of its own.

Budget: the whole prompt (template, context and data) stays within a token
budget (by default a 16,384-token window minus the answer's
``MAX_NEW_TOKENS`` and a reserve) and an optional character limit. Tokens are
counted by :func:`token_count.get_counter` (the real cl100k tokenizer where
available, loaded only for prompts larger in bytes than the budget) unless a
``counter`` is given. Whole rows are dropped from the end (:mod:`row_packer`),
the prompt says ``(showing 120 of 5,000 rows)``, and only the rows shown are
ever formatted. Value rendering rules are in :mod:`value_format`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any

from errors import PromptError
from prompt_template import PLACEHOLDERS, Slot, Template, check_template, load_template, parse_template
from prompt_limits import FRAME_TOO_LONG, budget_fix
from row_packer import Chunk, Frame, PromptBudget, RowPacker
from token_count import TokenCounter, byte_bound, estimate_tokens, get_counter
from value_format import ELLIPSIS, FORMATS, check_format, check_limit, encodable, format_value, row_layout

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CONTEXT_TOKENS", "DEFAULT_MAX_CELL_CHARS", "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_RESERVE_TOKENS",
    "ELLIPSIS", "FORMATS", "PLACEHOLDERS", "PromptResult", "build_prompt", "build_prompt_from_data",
    "check_template", "default_token_budget", "estimate_tokens", "format_db_results", "format_value",
    "load_template", "prompt_frame",
]

# The window arithmetic lives with the other prompt-size rules; these names stay importable here.
from prompt_limits import (  # noqa: E402
    DEFAULT_CONTEXT_TOKENS, DEFAULT_MAX_CELL_CHARS, DEFAULT_MAX_NEW_TOKENS, DEFAULT_RESERVE_TOKENS,
    default_token_budget,
)


# ---------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------

_SHAPE_HINT = 'Pass {"query": "...", "results": [row dicts], "row_count": N} or a plain list of row dicts.'


@dataclass
class _Input:
    """``db_data`` taken apart."""

    rows: Iterable[Any]
    query: str | None
    row_count: int | None
    more_rows: bool
    columns: list[Any]
    #: ``len(results)`` when the results are a sequence; None for an iterator.
    size: int | None
    count_remaining: Callable[[], int] | None = None
    #: An iterator that learns while being read whether its source had more rows than it
    #: hands out (a row stream cut by a row cap) says so through ``has_more``.
    has_more: Callable[[], bool] | None = None

    def more_rows_now(self) -> bool:
        return self.more_rows or bool(self.has_more and self.has_more())


def _unpack(db_data: Any) -> _Input:
    """Check either accepted input shape and return its parts (an iterator's first row is peeked for columns)."""
    query, row_count, more_rows, columns = None, None, False, None
    if isinstance(db_data, Mapping):
        if "results" not in db_data:
            raise PromptError("db_data has no 'results' key", hint=_SHAPE_HINT)
        results = db_data["results"]
        query, row_count = db_data.get("query"), db_data.get("row_count")
        more_rows, columns = db_data.get("more_rows", False), db_data.get("columns")
    else:
        results = db_data
    if not isinstance(results, Iterable) or isinstance(results, (str, bytes, bytearray, Mapping, Set)):
        raise PromptError(f"Query results must be a list of row dicts, not {type(results).__name__}", hint=_SHAPE_HINT)
    if query is not None and not isinstance(query, str):
        raise PromptError(f"db_data['query'] must be text, not {type(query).__name__}")
    if row_count is not None and (not isinstance(row_count, int) or isinstance(row_count, bool) or row_count < 0):
        raise PromptError(f"db_data['row_count'] must be a non-negative integer, got {row_count!r}")
    if not isinstance(more_rows, bool):
        raise PromptError(f"db_data['more_rows'] must be True or False, got {more_rows!r}")
    if columns is not None and (not isinstance(columns, Sequence) or isinstance(columns, (str, bytes, bytearray))):
        raise PromptError(f"db_data['columns'] must be a list of column names, not {type(columns).__name__}")
    counter = getattr(results, "count_remaining", None)
    source = _Input(results, query, row_count, more_rows, [], None, counter if callable(counter) else None)
    if hasattr(results, "has_more"):
        source.has_more = lambda: bool(results.has_more)
    if isinstance(results, Sequence):
        source.size = len(results)
        first = results[0] if results else _NONE
    else:
        iterator = iter(results)
        first = next(iterator, _NONE)
        source.rows = iterator if first is _NONE else _chain(first, iterator)
        source.size = 0 if first is _NONE else None
    if columns is None and first is not _NONE:
        if not isinstance(first, Mapping):
            row_layout("csv", []).render(first, 0, None)  # raises the standard "not a mapping" error
        columns = list(first.keys())
    source.columns = list(columns or [])
    return source


_NONE = object()


def _chain(first: Any, rest: Iterable[Any]) -> Iterable[Any]:
    yield first
    yield from rest


def format_db_results(results: Any, format: str = "markdown", *, max_cell_chars: int | None = None) -> str:
    """Render every row as text, without any size budget.

    ``results`` is a list of row dicts (or an iterator of them) or a whole
    ``db_data`` dict. ``format`` is one of :data:`FORMATS`. Zero rows give ``"(no rows)"``.
    """
    check_format(format)
    check_limit("max_cell_chars", max_cell_chars)
    source = _unpack(results)
    rows = list(source.rows)
    if not rows:
        return "(no rows)"
    if not source.columns:
        return f"({len(rows):,} rows with no columns)"
    return row_layout(format, source.columns).block(rows, 0, max_cell_chars)


# ---------------------------------------------------------------------------
# Template and frame
# ---------------------------------------------------------------------------

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


def _template(template: str | os.PathLike[str] | None, fmt: str, source: _Input, context: str) -> Template:
    if template is None:
        return parse_template(_default_template(fmt, bool(source.query), bool(context)))
    if isinstance(template, os.PathLike):
        return parse_template(load_template(template))
    if isinstance(template, str):
        return parse_template(template)
    raise PromptError(f"A template must be text or a path, not {type(template).__name__}")


def _frame_parts(template: Template, source: _Input, context: str, rows_total: str) -> tuple[tuple[str, ...], list[str]]:
    """The text around the ``{data}`` slots, and warnings about the template."""
    warnings: list[str] = []
    parts = list(template.parts)
    if "data" not in template.names:
        warnings.append("The template has no {data} placeholder; the data was appended at the end.")
        parts += ["\n\nData:\n", Slot("data")]
    if context and "context" not in template.names:
        parts += ["\n\nAdditional context:\n", Slot("context")]
    # The data block always starts on a line of its own, so that a template
    # like "분석해주세요: {data}" does not glue its text onto the table header.
    for i, part in enumerate(parts):
        if part == Slot("data") and i > 0 and isinstance(parts[i - 1], str) and not parts[i - 1].endswith("\n"):
            parts[i - 1] = parts[i - 1].rstrip(" \t") + "\n"
    values = {
        "context": encodable(context),
        "row_count": rows_total,
        "columns": encodable(", ".join(str(c) for c in source.columns)),
        "query": encodable(source.query or ""),
    }
    parts = [encodable(p) if isinstance(p, str) else p for p in parts]
    return Template(tuple(parts)).split(values, at="data"), warnings


# ---------------------------------------------------------------------------
# Building the prompt
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptResult:
    """A finished prompt and what went into it."""

    text: str
    rows_shown: int
    #: ``db_data["row_count"]`` when given and >= the rows read, else the rows in the input
    #: (read, or counted by the iterator's ``count_remaining()``); see ``rows_total_exact``.
    rows_total: int
    #: Input rows were left out to fit the budget or ``max_rows``.
    truncated: bool
    char_count: int
    #: Tokens of ``text``, counted by ``token_counter``.
    estimated_tokens: int
    #: Things the caller should know (also logged at WARNING).
    warnings: tuple[str, ...]
    #: Rows taken from the input: those shown and at most a few more looked at.
    rows_read: int = 0
    #: Every input row was read (False: an iterator was left with rows in it).
    input_exhausted: bool = True
    #: False when ``rows_total`` is only a lower bound (an iterator not read to its end nor counted).
    rows_total_exact: bool = True
    #: Which counter gave ``estimated_tokens``: the real tokenizer when the prompt came near the
    #: budget, else ``"estimate"`` (a prompt within the budget in bytes is never counted for real).
    token_counter: str = "estimate"


def _note(shown: int, total: int, at_least: bool) -> str:
    if shown < total:
        return f"(showing {shown:,} of {'at least ' if at_least else ''}{total:,} rows)"
    if at_least:
        return f"(showing all {shown:,} fetched rows; the query returned more)"
    return ""


class _RowTotal:
    """How many rows the input holds, as far as can be known without reading them all."""

    def __init__(self, source: _Input) -> None:
        self.source = source
        self.packer: RowPacker | None = None
        self._unread: tuple[int, bool] | None = None

    def known(self) -> int | None:
        """The total when it is known before reading any row (a sequence, or a given row_count)."""
        s = self.source
        if s.size is not None:
            return s.row_count if s.row_count is not None and s.row_count >= s.size else s.size
        return s.row_count

    def resolve(self) -> tuple[int, bool]:
        """``(total, exact)``: exact unless an unread iterator could not be counted."""
        s, packer = self.source, self.packer
        assert packer is not None
        if s.size is not None:
            return self.known() or 0, True
        read = packer.rows_read
        if packer.input_exhausted or (s.row_count is not None and s.row_count > read):
            return (s.row_count if s.row_count is not None and s.row_count >= read else read), True
        if self._unread is None:  # counted once, when first needed
            self._unread = (read + s.count_remaining(), True) if s.count_remaining else (read, False)
        return self._unread

    def describe(self) -> str:
        total, exact = self.resolve()
        return f"{'' if exact else 'at least '}{total:,}"

    def note(self, start: int, count: int, more: bool) -> str:
        total, exact = self.resolve()
        return _note(count, total, self.source.more_rows_now() or not exact)


_WIDEST = "9" * 20


def _with_row_count(chunk: Chunk, template: Template, source: _Input, context: str, total: int,
                    sizes: PromptBudget) -> Chunk:
    """``chunk`` with the real total in place of the room kept for ``{row_count}``."""
    parts, _ = _frame_parts(template, source, context, str(total))
    text = Frame(parts).render(chunk.block)
    tokens = estimate_tokens(text) if chunk.counter == "estimate" else sizes.count(text)
    return dataclasses.replace(chunk, text=text, tokens=tokens)


def _check_options(data_format: Any, max_tokens: Any, max_chars: Any, max_rows: Any, max_cell_chars: Any,
                   additional_context: Any, system_prompt: Any) -> None:
    check_format(data_format)
    check_limit("max_tokens", max_tokens)
    check_limit("max_chars", max_chars)
    check_limit("max_rows", max_rows, minimum=0)
    check_limit("max_cell_chars", max_cell_chars)
    if additional_context is not None and not isinstance(additional_context, str):
        raise PromptError(f"additional_context must be text, not {type(additional_context).__name__}")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise PromptError(f"system_prompt must be text, not {type(system_prompt).__name__}")


def _budget(max_tokens: int | None, context_tokens: int, max_new_tokens: int, system_prompt: str | None,
            counter: TokenCounter) -> tuple[int, tuple[str, ...]]:
    """The token budget and the texts outside the prompt that share it (a system prompt)."""
    if max_tokens is not None:
        return max_tokens, ()
    budget = default_token_budget(context_tokens, max_new_tokens)
    if not system_prompt:
        return budget, ()
    # The server sends f"{system_prompt}\n\n{prompt}" to the model.
    outside = (system_prompt, "\n\n")
    if sum(map(byte_bound, outside)) >= budget:
        cost = sum(map(counter.count, outside))
        if cost >= budget:
            raise PromptError(
                f"The system prompt alone needs about {cost:,} tokens; "
                f"only {budget:,} are available for the whole prompt",
                hint="Shorten the system prompt or lower MAX_NEW_TOKENS.",
            )
    return budget, outside


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
    counter: TokenCounter | None = None,
) -> PromptResult:
    """Build the prompt for ``db_data`` within a size budget.

    Args:
        db_data: ``{"query", "results", "row_count"[, "columns", "more_rows"]}`` or a
            list of row dicts; ``results`` may be an iterator (read only as far as needed).
            ``columns`` (optional) fixes the column order; otherwise it is the first row's key order.
        template: template text, a path to a UTF-8 template file, or None for the default.
        additional_context: free text for ``{context}``; appended in its own
            section when the template has no ``{context}``.
        data_format: one of :data:`FORMATS`.
        max_tokens: token bound for the whole prompt. Default: what
            :func:`default_token_budget` leaves, minus the system prompt.
        max_chars: character bound for the whole prompt (default: none).
        max_rows: show at most this many rows.
        max_cell_chars: shorten longer values (None: no limit).
        context_tokens, max_new_tokens: the model window and answer length the
            default budget is derived from.
        system_prompt: only counted against the default budget; it is not
            part of the returned text.
        counter: token counter (default :func:`token_count.get_counter`).

    Rows that do not fit are dropped from the end, whole, and the prompt says
    so (``(showing 120 of 5,000 rows)``). Only the rows shown are formatted.

    Raises:
        PromptError: bad input, unknown placeholder, or a budget too small for
            the template and context or for even one row.
    """
    source = _unpack(db_data)
    _check_options(data_format, max_tokens, max_chars, max_rows, max_cell_chars, additional_context, system_prompt)
    counter = counter or get_counter()
    context = additional_context or ""
    budget, outside = _budget(max_tokens, context_tokens, max_new_tokens, system_prompt, counter)
    template_parsed = _template(template, data_format, source, context)
    if source.size == 0 or not source.columns:
        return _without_columns(source, template_parsed, context, budget, max_chars, outside, counter)

    total = _RowTotal(source)
    known = total.known()
    # An iterator's total is only known after packing: the frame is packed with room for a
    # 20-digit {row_count} and the real number is put in afterwards (never more tokens).
    parts, warnings = _frame_parts(template_parsed, source, context, str(known) if known is not None else _WIDEST)
    frame = Frame(parts, outside)
    packer = RowPacker(
        source.rows, row_layout(data_format, source.columns), frame,
        max_tokens=budget, max_chars=max_chars, counter=counter, max_cell_chars=max_cell_chars,
        max_rows=max_rows, note=total.note, shorten=False,
    )
    total.packer = packer
    chunk = packer.next_chunk()
    assert chunk is not None  # there are rows, so there is a first chunk
    if known is None and "row_count" in template_parsed.names:
        chunk = _with_row_count(chunk, template_parsed, source, context, total.resolve()[0], packer.budget)
    if chunk.more and (max_rows is None or chunk.count < max_rows):
        logger.info("only %d of %s rows fit in the prompt budget (%d tokens, %s characters)", chunk.count,
                    total.describe(), budget, max_chars if max_chars is not None else "no limit on")
    for message in warnings:
        logger.warning("%s", message)
    return _result(chunk, packer, total, warnings)


def _result(chunk: Chunk, packer: RowPacker, total: _RowTotal, warnings: list[str]) -> PromptResult:
    rows_total, exact = total.resolve()
    size = total.source.size
    read_all = packer.input_exhausted
    truncated = chunk.count < (size if size is not None else packer.rows_read) or not read_all
    return PromptResult(
        text=chunk.text, rows_shown=chunk.count, rows_total=rows_total, truncated=truncated,
        char_count=chunk.chars, estimated_tokens=chunk.tokens, warnings=tuple(warnings),
        rows_read=packer.rows_read, input_exhausted=read_all, rows_total_exact=exact, token_counter=chunk.counter,
    )


def _without_columns(source: _Input, template: Template, context: str, budget: int, max_chars: int | None,
                     outside: tuple[str, ...], counter: TokenCounter) -> PromptResult:
    """The prompt for zero rows, or for rows that have no columns."""
    rows = 0 if source.size == 0 else (source.size if source.size is not None else sum(1 for _ in source.rows))
    total = source.row_count if source.row_count is not None and source.row_count >= rows else rows
    parts, warnings = _frame_parts(template, source, context, str(total))
    frame = Frame(parts, outside)
    text = frame.render("(no rows)" if not rows else f"({rows:,} rows with no columns)")
    sizes = PromptBudget(counter, frame, budget, max_chars)
    fits, tokens, counter_name = sizes.measure(text)
    if not fits:
        raise PromptError(
            "The template, context and query alone exceed the prompt budget: " + sizes.excess(text),
            hint=budget_fix(sizes, text, FRAME_TOO_LONG),
        )
    for message in warnings:
        logger.warning("%s", message)
    return PromptResult(
        text=text, rows_shown=0, rows_total=total, truncated=rows > 0, char_count=len(text),
        estimated_tokens=tokens, warnings=tuple(warnings), rows_read=rows, token_counter=counter_name,
    )


def prompt_frame(db_data: Mapping[str, Any], template: str | os.PathLike[str] | None = None,
                 additional_context: str | None = None, *, data_format: str = "markdown", max_tokens: int | None = None,
                 context_tokens: int = DEFAULT_CONTEXT_TOKENS, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 system_prompt: str | None = None, counter: TokenCounter | None = None,
                 ) -> tuple[Frame, int, tuple[str, ...]]:
    """``(frame, token budget, warnings)``: what :func:`build_prompt` puts around the data, for modes that
    pack rows into several prompts. ``db_data`` gives ``columns``, ``row_count`` and ``query`` (no rows).
    """
    source = _unpack({**db_data, "results": []})
    _check_options(data_format, max_tokens, None, None, None, additional_context, system_prompt)
    counter = counter or get_counter()
    context = additional_context or ""
    budget, outside = _budget(max_tokens, context_tokens, max_new_tokens, system_prompt, counter)
    parsed = _template(template, data_format, source, context)
    parts, warnings = _frame_parts(parsed, source, context, str(source.row_count or 0))
    return Frame(parts, outside), budget, tuple(warnings)


def build_prompt_from_data(
    db_data: Any,
    template: str | os.PathLike[str] | None = None,
    additional_context: str | None = None,
    **kwargs: Any,
) -> str:
    """Return just the prompt text; see :func:`build_prompt` for the keyword arguments."""
    return build_prompt(db_data, template, additional_context, **kwargs).text
