"""Split rows into chunks that each fit one prompt's token and character budget.

The packer reads rows lazily from any iterable (a list, a generator, a
streaming database cursor), renders them with a :class:`value_format.RowLayout`
and fills one chunk at a time: a chunk is as many consecutive rows as fit in
the :class:`Frame` (the prompt text around the data block) within
``max_tokens`` (and ``max_chars``), together with an optional note under the
rows (``(showing 120 of 5,000 rows)``). Only the rows of the chunk being
filled, plus the one that did not fit, are held in memory, and the packer
stops reading as soon as a chunk is full, so ``next_chunk()`` once is the
single-question prompt and iterating is map-reduce.

Sizes: characters are exact. Tokens are decided by the byte bound first
(:func:`token_count.byte_bound`: no counter here ever counts more tokens than
a text has UTF-8 bytes), so while a chunk is smaller in bytes than the budget
nothing is counted and the tokenizer is not even loaded. Past that, each row
is counted once by the counter, and the finished prompt is counted as a whole
(piece sums and the whole differ by a few tokens at the joins): rows are
handed back until it fits, or added while it still does. Filled this way a
chunk reaches 97-100 % of the budget by the real count.

A row too large for an empty chunk, even with ``max_cell_chars``, is either
an error (``shorten=False``: the single-question prompt reports "Not even one
row fits") or, by default, gets a smaller per-value limit, found by bisection,
in a chunk of its own; the chunk lists it in ``shortened``. Rows are never
dropped.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from errors import PromptError
from prompt_limits import FRAME_TOO_LONG, budget_fix
from token_count import TokenCounter, byte_bound, estimate_tokens, get_counter
from value_format import RowLayout

logger = logging.getLogger(__name__)

#: ``(start, count, more) -> note``: the line written under a chunk's rows ("" for none).
#: ``start`` is the 0-based index of the chunk's first row, ``more`` says whether rows follow it.
NoteFunction = Callable[[int, int, bool], str]

_END = object()


@dataclass(frozen=True)
class Frame:
    """The prompt around the data: ``parts`` with a copy of the data block between each two.

    ``outside`` holds texts that share the token budget without being part of the
    prompt (a system prompt the server puts before it, and the separator); each is
    counted on its own.
    """

    parts: tuple[str, ...] = ("", "")
    outside: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.parts) < 2:
            raise PromptError("A frame needs at least one data slot (two parts around it)")

    @property
    def copies(self) -> int:
        return len(self.parts) - 1

    def render(self, block: str) -> str:
        return block.join(self.parts)


@dataclass(frozen=True)
class ShortenedRow:
    """A row that only fitted with a smaller per-value limit than asked for."""

    index: int  # 0-based position in the input
    max_cell_chars: int


@dataclass(frozen=True)
class Chunk:
    """Consecutive rows that fit one prompt, and that prompt."""

    start: int  # 0-based index of the first row in the input
    count: int
    block: str  # the data block: header and rows, then "\n\n" and the note when there is one
    note: str
    text: str  # the whole prompt: the frame with the block in each data slot
    tokens: int  # tokens of ``text`` (``outside`` texts not included)
    counter: str  # name of the counter that gave ``tokens``
    more: bool  # rows follow this chunk
    shortened: tuple[ShortenedRow, ...] = ()

    @property
    def chars(self) -> int:
        return len(self.text)

    @property
    def end(self) -> int:
        """Index one past the chunk's last row."""
        return self.start + self.count


class PromptBudget:
    """Whether whole prompts fit ``max_tokens``/``max_chars``; counts only when the byte bound does not settle it.

    ``frame`` supplies the fixed text (for the packer's running sums) and the
    ``outside`` texts that share the budget.
    """

    def __init__(self, counter: TokenCounter, frame: Frame, max_tokens: int, max_chars: int | None) -> None:
        self.counter, self.frame, self.max_tokens, self.max_chars = counter, frame, max_tokens, max_chars
        self.fixed_chars = sum(map(len, frame.parts))
        self.fixed_bound = sum(map(byte_bound, frame.parts + frame.outside))
        self._fixed_exact: int | None = None
        self._outside_exact: int | None = None

    def fixed_tokens(self, exact: bool) -> int:
        """Tokens of the frame's own text and the outside texts, by the bound or by the counter."""
        if not exact:
            return self.fixed_bound
        if self._fixed_exact is None:
            self._fixed_exact = sum(map(self.counter.count, self.frame.parts)) + self.outside_tokens()
        return self._fixed_exact

    def outside_tokens(self) -> int:
        if self._outside_exact is None:
            self._outside_exact = sum(map(self.counter.count, self.frame.outside))
        return self._outside_exact

    def measure(self, text: str) -> tuple[bool, int, str]:
        """``(fits, tokens, counter name)`` for a whole prompt.

        Within the byte bound the text fits whatever the counter, and its tokens
        are reported by the cheap estimate; otherwise the counter counts them.
        """
        if self.max_chars is not None and len(text) > self.max_chars:
            return False, 0, ""
        if byte_bound(text) + sum(map(byte_bound, self.frame.outside)) <= self.max_tokens:
            return True, estimate_tokens(text), "estimate"
        tokens = self.counter.count(text)
        return tokens + self.outside_tokens() <= self.max_tokens, tokens, self.counter.name

    def count(self, text: str) -> int:
        return self.counter.count(text)

    def excess(self, text: str) -> str:
        """How far ``text`` is over the budget, for error messages."""
        tokens = self.count(text) + (self.outside_tokens() if self.frame.outside else 0)
        reasons = []
        if tokens > self.max_tokens:
            reasons.append(
                f"about {tokens:,} tokens against a budget of {self.max_tokens:,} (over by {tokens - self.max_tokens:,})"
            )
        if self.max_chars is not None and len(text) > self.max_chars:
            over = len(text) - self.max_chars
            reasons.append(f"{len(text):,} characters against a limit of {self.max_chars:,} (over by {over:,})")
        return "; ".join(reasons) or f"about {tokens:,} tokens, {len(text):,} characters"


class _Piece(NamedTuple):
    """A piece of a data block: its text, and the text whose count is charged for it.

    A row is written after its joiner (``"\\n| 2 | b |"``) but charged with the joiner
    after it (``"| 2 | b |\\n"``): the tokenizer merges a newline into the punctuation
    before it (``" |\\n"`` is one token), so counted that way the pieces add up to
    almost exactly the block's count instead of about one token more per row. The
    last piece has no joiner after it in the block: the sums take one joiner off.
    """

    text: str
    counted: str


class _Fill:
    """The running size of one chunk being filled: chars exact, tokens by the bound until it stops fitting."""

    def __init__(self, budget: PromptBudget, head: str, joiner: str) -> None:
        self.budget = budget
        self.exact = False
        self.pieces: list[_Piece] = []
        self.costs: list[tuple[int, int]] = []
        self.chars = self.tokens = 0
        self.joiner = joiner
        self.joiner_tokens = 0  # one joiner's count, taken off the sums once counting is exact
        if head:
            self.append(_Piece(head, head + joiner))

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.pieces)

    def cost(self, piece: _Piece) -> tuple[int, int]:
        """(chars, tokens) of ``piece``: tokens by the byte bound of its text, or counted once exact."""
        return len(piece.text), (self.budget.count(piece.counted) if self.exact else byte_bound(piece.text))

    def fits(self, chars: int, tokens: int) -> bool:
        b = self.budget
        if b.fixed_tokens(self.exact) + b.frame.copies * (self.tokens + tokens - self.joiner_tokens) > b.max_tokens:
            return False
        return b.max_chars is None or b.fixed_chars + b.frame.copies * (self.chars + chars) <= b.max_chars

    def fits_extra(self, piece: _Piece) -> tuple[int, int] | None:
        """The cost of ``piece`` if it fits after the pieces so far, else None.

        Switches to counting when the byte bound says no.
        """
        cost = self.cost(piece)
        if not self.exact and not self.fits(*cost):
            self.go_exact()
            cost = self.cost(piece)
        return cost if self.fits(*cost) else None

    def add(self, piece: _Piece) -> bool:
        """Append ``piece`` if it fits by the running sums."""
        cost = self.fits_extra(piece)
        if cost is None:
            return False
        self.append(piece, cost)
        return True

    def append(self, piece: _Piece, cost: tuple[int, int] | None = None) -> None:
        cost = cost or self.cost(piece)
        self.pieces.append(piece)
        self.costs.append(cost)
        self.chars += cost[0]
        self.tokens += cost[1]

    def pop(self) -> None:
        chars, tokens = self.costs.pop()
        self.pieces.pop()
        self.chars -= chars
        self.tokens -= tokens

    def go_exact(self) -> None:
        self.exact = True
        self.joiner_tokens = self.budget.count(self.joiner)
        self.costs = [self.cost(p) for p in self.pieces]
        self.tokens = sum(t for _, t in self.costs)


class RowPacker:
    """Fill chunks from ``rows`` one at a time; see the module docstring.

    Args:
        rows: row mappings, read lazily and once.
        layout: how rows are written (:func:`value_format.row_layout`).
        frame: the prompt text around the data block.
        max_tokens: token budget of the whole prompt (plus ``frame.outside``).
        max_chars: character budget of the whole prompt (None: none).
        counter: token counter (default :func:`token_count.get_counter`).
        max_cell_chars: per-value limit for every row (None: none).
        max_rows: at most this many rows per chunk (None: no cap; 0: empty chunks,
            only for a single :meth:`next_chunk`).
        note: text under each chunk's rows, see :data:`NoteFunction`.
        shorten: shorten a row too large for a prompt of its own (True) or raise
            PromptError "Not even one row fits" (False).

    Raises PromptError at once when the frame alone exceeds the budget.
    """

    def __init__(
        self,
        rows: Iterable[Any],
        layout: RowLayout,
        frame: Frame,
        *,
        max_tokens: int,
        max_chars: int | None = None,
        counter: TokenCounter | None = None,
        max_cell_chars: int | None = None,
        max_rows: int | None = None,
        note: NoteFunction | None = None,
        shorten: bool = True,
    ) -> None:
        self._source = iter(rows)
        self._pending: deque[Any] = deque()  # read but not yet in a chunk
        self._index = 0  # input index of the first pending row
        self._read = 0
        self._exhausted = False
        self.layout, self.frame = layout, frame
        self.max_cell_chars, self.max_rows = max_cell_chars, max_rows
        self.note, self.shorten = note, shorten
        self.budget = PromptBudget(counter or get_counter(), frame, max_tokens, max_chars)
        bare = frame.render("")
        if not self.budget.measure(bare)[0]:
            raise PromptError(
                "The template, context and query alone exceed the prompt budget: " + self.budget.excess(bare),
                hint=budget_fix(self.budget, bare, FRAME_TOO_LONG),
            )

    @property
    def rows_read(self) -> int:
        """Rows taken from the input so far (chunked ones and at most a few waiting)."""
        return self._read

    @property
    def input_exhausted(self) -> bool:
        """True once the input has no more rows to give (some may still wait for a chunk)."""
        return self._exhausted

    def has_more(self) -> bool:
        """True when rows remain for another chunk (reads one row ahead to know)."""
        if self._pending:
            return True
        row = self._pull()
        if row is _END:
            return False
        self._pending.appendleft(row)
        return True

    def __iter__(self) -> Iterator[Chunk]:
        if self.max_rows == 0:
            raise PromptError("max_rows must be at least 1 to split rows into chunks")
        while (chunk := self.next_chunk()) is not None:
            yield chunk

    def next_chunk(self) -> Chunk | None:
        """The next chunk, or None when every row is in a chunk."""
        if not self.has_more() and not (self._index == 0 and self.max_rows == 0):
            return None
        start = self._index
        fill = _Fill(self.budget, self.layout.head, self.layout.joiner)
        rows: list[Any] = []
        while self.max_rows is None or len(rows) < self.max_rows:
            row = self._pull()
            if row is _END:
                break
            if not fill.add(self._piece(row, start, len(rows), self.max_cell_chars)):
                self._pending.appendleft(row)
                break
            rows.append(row)
        chunk = self._finish(fill, rows, start) if self._fit_note(fill, rows, start) else None
        if chunk is None:
            chunk = self._single_row(start)
        self._index = chunk.end
        return chunk

    # -- inside a chunk ----------------------------------------------------------

    def _pull(self) -> Any:
        if self._pending:
            return self._pending.popleft()
        if self._exhausted:
            return _END
        row = next(self._source, _END)
        if row is _END:
            self._exhausted = True
        else:
            self._read += 1
        return row

    def _give_back(self, fill: _Fill, rows: list[Any]) -> None:
        fill.pop()
        self._pending.appendleft(rows.pop())

    def _piece(self, row: Any, start: int, position: int, limit: int | None) -> _Piece:
        text = self.layout.render(row, start + position, limit)
        joiner = self.layout.joiner
        return _Piece(joiner + text if position or self.layout.head else text, text + joiner)

    def _note(self, start: int, count: int) -> str:
        if self.note is None:
            return ""
        more = self.has_more()
        return self.note(start, count, more)

    def _fit_note(self, fill: _Fill, rows: list[Any], start: int) -> bool:
        """Hand rows back until the note fits under the rest; False when it does not fit even alone."""
        while True:
            note = self._note(start, len(rows))
            if not note or fill.fits_extra(_Piece("\n\n" + note, "\n\n" + note)) is not None:
                return True
            if not rows:
                return False
            self._give_back(fill, rows)

    def _finish(self, fill: _Fill, rows: list[Any], start: int) -> Chunk | None:
        """The chunk of ``rows``, counted as a whole; None when no row fits (or is wanted)."""
        while rows or self.max_rows == 0:
            block, note, text = self._render(fill, rows, start)
            if not fill.exact:
                # Bytes add up exactly, so a chunk filled under the byte bound fits as a whole.
                return self._chunk(start, rows, block, note, text, estimate_tokens(text), "estimate")
            fits, tokens, counter = self.budget.measure(text)
            if fits:
                return self._top_up(fill, rows, start, tokens) or self._chunk(
                    start, rows, block, note, text, tokens, counter
                )
            if not rows:
                break
            self._give_back(fill, rows)
        return None

    def _render(self, fill: _Fill, rows: list[Any], start: int) -> tuple[str, str, str]:
        note = self._note(start, len(rows))
        block = fill.text + ("\n\n" + note if note else "")
        return block, note, self.frame.render(block)

    def _top_up(self, fill: _Fill, rows: list[Any], start: int, tokens: int) -> Chunk | None:
        """Add the next rows while the whole prompt still fits; None when none was added.

        Piece sums and the whole prompt's count differ by a few tokens at the joins, so
        a chunk closed by piece sums can have room for another row. A row is tried only when the overcount seen so far
        could make room for it, so most chunks cost no extra count.
        """
        b, best = self.budget, None
        while self.max_rows is None or len(rows) < self.max_rows:
            slack = b.max_tokens - tokens - b.outside_tokens()
            note = self._note(start, len(rows))
            note_cost = fill.cost(_Piece("\n\n" + note, "\n\n" + note))[1] if note else 0
            overcount = b.fixed_tokens(True) + b.frame.copies * (fill.tokens - fill.joiner_tokens + note_cost) - tokens
            row = self._pull()
            if row is _END:
                break
            piece = self._piece(row, start, len(rows), self.max_cell_chars)
            cost = fill.cost(piece)
            if b.frame.copies * cost[1] > slack + max(overcount, 0):
                self._pending.appendleft(row)
                break
            fill.append(piece, cost)
            rows.append(row)
            block, note, text = self._render(fill, rows, start)
            fits, count, counter = b.measure(text)
            if not fits:
                self._give_back(fill, rows)
                break
            tokens, best = count, (block, note, text, count, counter)
        return None if best is None else self._chunk(start, rows, *best)

    def _chunk(self, start: int, rows: list[Any], block: str, note: str, text: str, tokens: int, counter: str,
               shortened: tuple[ShortenedRow, ...] = ()) -> Chunk:
        return Chunk(start, len(rows), block, note, text, tokens, counter, self.has_more(), shortened)

    def _single_row(self, start: int) -> Chunk:
        """A chunk of the one row that did not fit an empty chunk by piece sums: whole, or shortened."""
        if self.max_rows == 0:
            text = self.frame.render(self._empty_block(start))
            raise PromptError(
                "The template, context and query alone exceed the prompt budget: " + self.budget.excess(text),
                hint=budget_fix(self.budget, text, FRAME_TOO_LONG),
            )
        row = self._pull()
        attempt = self._one_row(row, start, self.max_cell_chars)
        if attempt is not None:
            return attempt
        if not self.shorten:
            text = self.frame.render(self._one_row_block(row, start, self.max_cell_chars)[0])
            raise PromptError(
                "Not even one row fits in the prompt budget: with the first row the prompt needs "
                + self.budget.excess(text),
                hint=budget_fix(self.budget, text, f"shorten long values with a lower --max-cell-chars (now "
                                     f"{self.max_cell_chars or 'no limit'}), select fewer columns, use --format csv, "
                                     "or shorten the --template / --context;"),
            )
        return self._shortened_row(row, start)

    def _empty_block(self, start: int) -> str:
        note = self._note(start, 0)
        return self.layout.head + ("\n\n" + note if note else "")

    def _one_row_block(self, row: Any, start: int, limit: int | None) -> tuple[str, str]:
        note = self._note(start, 1)
        block = self.layout.head + self._piece(row, start, 0, limit).text
        return block + ("\n\n" + note if note else ""), note

    def _one_row(self, row: Any, start: int, limit: int | None) -> Chunk | None:
        block, note = self._one_row_block(row, start, limit)
        text = self.frame.render(block)
        fits, tokens, counter = self.budget.measure(text)
        if not fits:
            return None
        shortened = () if limit == self.max_cell_chars else (ShortenedRow(start, limit),)  # type: ignore[arg-type]
        return self._chunk(start, [row], block, note, text, tokens, counter, shortened)

    def _shortened_row(self, row: Any, start: int) -> Chunk:
        """Bisect the largest per-value limit at which ``row`` fits a prompt of its own."""
        high = (self.max_cell_chars - 1) if self.max_cell_chars is not None else len(self._piece(row, start, 0, None).text)
        best = self._one_row(row, start, 1) if high >= 1 else None
        if best is None:
            text = self.frame.render(self._one_row_block(row, start, 1)[0])
            raise PromptError(
                f"Row {start + 1} does not fit in one prompt even with every value cut to 1 character: "
                + self.budget.excess(text),
                hint=budget_fix(self.budget, text, "select fewer columns, or shorten the --template / --context;"),
            )
        low = 1
        while low < high:
            mid = (low + high + 1) // 2
            attempt = self._one_row(row, start, mid)
            if attempt is None:
                high = mid - 1
            else:
                low, best = mid, attempt
        logger.warning("Row %s was too large for one prompt; its values were cut to %s characters", f"{start + 1:,}",
                       f"{low:,}")
        return best
