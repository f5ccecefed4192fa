"""The prompts of a question over every row: map prompts (one part of the rows each) and reduce prompts.

Map: the user's template (or the default one) around one chunk of rows, exactly as the
single-question prompt is built, with a note under the rows saying which part of the data it
is: ``(Rows 1,201–2,400 of 9,870: one part of the data ...)``. Chunks are filled by
:class:`row_packer.RowPacker` to the same token budget as a single prompt.

Reduce: partial answers, each headed by the rows it covers, inside a reduce template. The
built-in one restates the user's question (the map prompt with the rows left out) and asks for
one combined answer; ``--reduce-template`` replaces it and must contain ``{answers}``. Answers
are grouped greedily, in order, into prompts that fit the budget; each group becomes one call
whose answer covers the union of its rows (always one contiguous range).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

import prompt_builder
from errors import PromptError
from prompt_template import Template, parse_template
from row_packer import Frame, PromptBudget
from token_count import TokenCounter
from value_format import encodable

logger = logging.getLogger(__name__)

#: Placeholders of a reduce template.
REDUCE_PLACEHOLDERS = ("answers", "question", "rows", "query", "context", "columns", "row_count")

DEFAULT_REDUCE_TEMPLATE = """\
The question below was asked about the rows of a database query result. There were too many rows \
for one prompt, so they were split into parts and the question was answered for each part \
separately. Combine the partial answers into one answer for {rows}.

Question:
{question}

Partial answers, each about the rows named in its heading:

{answers}

Write one answer to the question as if you had seen all of these rows at once: merge what the \
partial answers say, add up counts and amounts, keep what several parts agree on and name real \
differences. Do not mention the parts. Keep it no longer than the longest partial answer."""

#: Where the rows were in the user's template, when the question is restated in a reduce prompt.
ROWS_STAND_IN = "(the rows of the query result)"

# Tokens charged per answer for its heading and the blank line after it, before it is counted.
_HEADING_TOKENS = 24


def rows_label(first: int, last: int, total: int) -> str:
    """``"rows 1,201–2,400 of 9,870"``, ``"row 7 of 9,870"`` or ``"all 9,870 rows"`` (1-based, inclusive)."""
    if first == 1 and last == total:
        return f"all {total:,} rows" if total != 1 else "the only row"
    if first == last:
        return f"row {first:,} of {total:,}"
    return f"rows {first:,}–{last:,} of {total:,}"


def map_note(total: int, more_rows: bool) -> Any:
    """The row packer's note function for map chunks: which part of the data a chunk is."""
    suffix = " (the query returned more rows than were read)" if more_rows else ""

    def note(start: int, count: int, more: bool) -> str:
        label = rows_label(start + 1, start + count, total)
        return (f"({label[0].upper()}{label[1:]}{suffix}: one part of the data. Answer from these rows only; "
                "the answers for all parts are combined afterwards.)")

    return note


@dataclass(frozen=True)
class MapFrame:
    """The frame and budget of every map prompt of one run, and the question they ask."""

    frame: Frame
    budget: int
    question: str  # the map prompt with the rows replaced by ROWS_STAND_IN, for reduce prompts
    warnings: tuple[str, ...]


def map_frame(question: Any, columns: Sequence[str], total: int, *, context_tokens: int, max_new_tokens: int,
              counter: TokenCounter) -> MapFrame:
    """The map prompts' frame for a :class:`runner.Question` over ``total`` rows with these columns."""
    q = question
    frame, budget, warnings = prompt_builder.prompt_frame(
        {"query": q.query, "columns": list(columns), "row_count": total}, q.template, q.context,
        data_format=q.data_format, max_tokens=q.prompt_tokens, context_tokens=context_tokens,
        max_new_tokens=max_new_tokens, system_prompt=q.system_prompt, counter=counter,
    )
    return MapFrame(frame, budget, frame.render(ROWS_STAND_IN).strip(), warnings)


def check_reduce_template(text: str) -> Template:
    """Parse a reduce template; PromptError for unknown placeholders or a missing ``{answers}``."""
    template = parse_template(text, names=REDUCE_PLACEHOLDERS)
    if "answers" not in template.names:
        raise PromptError(
            "The reduce template has no {answers} placeholder, so the partial answers would not reach the model.",
            hint="Fix: put {answers} where the partial answers go, e.g. --reduce-template "
            "'Combine these answers into one: {answers}'.",
        )
    return template


@dataclass(frozen=True)
class Answer:
    """A partial (or the final) answer and the rows it covers (1-based, inclusive)."""

    text: str
    first_row: int
    last_row: int


@dataclass(frozen=True)
class ReduceGroup:
    """Consecutive answers combined by one reduce call, and its prompt."""

    inputs: tuple[int, ...]  # indexes of the answers in the level below
    first_row: int
    last_row: int
    text: str
    tokens: int


class ReducePrompts:
    """Builds reduce prompts and groups answers into prompts that fit the budget.

    Args:
        template: the reduce template text (None: :data:`DEFAULT_REDUCE_TEMPLATE`).
        values: ``question``, ``query``, ``context``, ``columns`` (texts for the placeholders).
        total: the rows of the whole run (for ``{row_count}`` and the headings).
        budget, max_chars: as for the map prompts.
        outside: texts that share the budget (the system prompt and its separator).
        counter: the token counter.
    """

    def __init__(self, template: str | None, values: dict[str, str], total: int, *, budget: int,
                 max_chars: int | None, outside: tuple[str, ...], counter: TokenCounter) -> None:
        self.template = check_reduce_template(template if template is not None else DEFAULT_REDUCE_TEMPLATE)
        self.values = {k: encodable(v) for k, v in values.items()}
        self.values["row_count"] = str(total)
        self.total = total
        self.budget, self.max_chars, self.outside, self.counter = budget, max_chars, outside, counter
        self._frame_tokens: int | None = None

    def heading(self, number: int, answer: Answer) -> str:
        return f"[Answer {number}: {rows_label(answer.first_row, answer.last_row, self.total)}]"

    def render(self, answers: Sequence[Answer]) -> str:
        """The reduce prompt for these consecutive answers."""
        block = "\n\n".join(f"{self.heading(n, a)}\n{a.text.strip()}" for n, a in enumerate(answers, start=1))
        rows = rows_label(answers[0].first_row, answers[-1].last_row, self.total)
        parts = self.template.split({**self.values, "rows": rows}, at="answers")
        return block.join(parts)

    def _sizes(self) -> PromptBudget:
        return PromptBudget(self.counter, Frame(("", ""), self.outside), self.budget, self.max_chars)

    def frame_tokens(self) -> int:
        """Tokens of the reduce prompt without answers (the widest rows label), plus the outside texts."""
        if self._frame_tokens is None:
            self._frame_tokens = self._count_frame()
        return self._frame_tokens

    def _count_frame(self) -> int:
        widest = rows_label(self.total, self.total, self.total) if self.total > 1 else "all 1 rows"
        parts = self.template.split({**self.values, "rows": widest}, at="answers")
        return sum(map(self.counter.count, parts)) + self._sizes().outside_tokens()

    def fan_in(self, answer_tokens: int) -> int:
        """How many answers of ``answer_tokens`` tokens one reduce prompt holds."""
        room = self.budget - self.frame_tokens()
        return max(0, room // (answer_tokens + _HEADING_TOKENS))

    def group(self, answers: Sequence[Answer]) -> list[ReduceGroup]:
        """Consecutive answers packed greedily into prompts that fit; a group may hold a single answer.

        Each answer is counted once with its heading; a group is closed by those sums, then its
        whole prompt is counted, shortened while it is over and topped up while the next answer
        still fits (the sums and the whole differ by a few tokens at the joins).

        Raises PromptError when one answer alone does not fit a reduce prompt.
        """
        sizes = self._sizes()
        room = self.budget - self.frame_tokens()
        joiner = self.counter.count("\n\n")
        costs = [self.counter.count(f"{self.heading(n + 1, a)}\n{a.text.strip()}") + joiner
                 for n, a in enumerate(answers)]
        groups: list[ReduceGroup] = []
        start = 0
        while start < len(answers):
            end, used = start, 0
            while end < len(answers) and (end == start or used + costs[end] <= room):
                used += costs[end]
                end += 1
            groups.append(self._fitted(answers, start, end, sizes))
            start += len(groups[-1].inputs)
        return groups

    def _fitted(self, answers: Sequence[Answer], start: int, end: int, sizes: PromptBudget) -> ReduceGroup:
        """The group ``answers[start:end]``: shortened from the end until it fits, then topped up."""
        best: ReduceGroup | None = None
        while best is None:
            best = self._measured(answers, start, end, sizes)
            if best is None:
                if end - start == 1:
                    text = self.render(answers[start:end])
                    rows = rows_label(answers[start].first_row, answers[start].last_row, self.total)
                    raise PromptError(
                        f"A partial answer ({rows}) does not fit in a reduce prompt on its own: " + sizes.excess(text),
                        hint="Fix: lower --max-new-tokens (shorter partial answers), shorten the reduce template, "
                        "or raise --prompt-budget / MODEL_CONTEXT_TOKENS.",
                    )
                end -= 1
        while end < len(answers) and (more := self._measured(answers, start, end + 1, sizes)) is not None:
            best, end = more, end + 1
        return best

    def _measured(self, answers: Sequence[Answer], start: int, end: int, sizes: PromptBudget) -> ReduceGroup | None:
        chosen = answers[start:end]
        text = self.render(chosen)
        if not sizes.measure(text)[0]:
            return None
        tokens = self.counter.count(text)
        return ReduceGroup(tuple(range(start, end)), chosen[0].first_row, chosen[-1].last_row, text, tokens)


def reduce_prompt_tokens(calls: int, fan_in: int, answer_tokens: int, frame_tokens: int) -> list[int]:
    """Prompt tokens of each reduce level, at most, when every answer has ``answer_tokens`` tokens.

    A level of ``n`` answers in ``c`` prompts costs ``c`` frames plus ``n`` headed answers.
    """
    tokens = []
    for level_calls in calls_per_level(calls, fan_in) or []:
        tokens.append(level_calls * frame_tokens + calls * (answer_tokens + _HEADING_TOKENS))
        calls = level_calls
    return tokens


def calls_per_level(calls: int, fan_in: int) -> list[int] | None:
    """Reduce calls at each level for ``calls`` answers when each reduce call takes ``fan_in`` (None: never ends)."""
    if calls > 1 and fan_in < 2:
        return None
    levels = []
    while calls > 1:
        calls = math.ceil(calls / fan_in)
        levels.append(calls)
    return levels
