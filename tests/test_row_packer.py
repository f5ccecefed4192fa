"""Tests for row_packer: chunks over many rows, lazy reading, oversized rows, the real tokenizer."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prompt_builder as pb
from errors import PromptError
from row_packer import Chunk, Frame, PromptBudget, RowPacker, ShortenedRow
from token_count import ESTIMATE, Cl100kCounter, byte_bound
from value_format import row_layout

WORDS_KO = ["배송", "포장", "가격", "품질", "만족", "교환", "환불", "추천", "소리", "배터리", "사이즈", "색상"]
WORDS_EN = ["fast", "delivery", "great", "value", "battery", "refund", "sound", "manual", "size", "colour"]


def reviews(n: int, seed: int = 7) -> list[dict]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        words = WORDS_KO if rnd.random() < 0.6 else WORDS_EN
        rows.append({"id": i + 1, "rating": rnd.randint(1, 5), "body": " ".join(rnd.choices(words, k=rnd.randint(3, 25)))})
    return rows


class Source:
    """An iterator over rows that records how many were taken (a streaming cursor stand-in)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows
        self.taken = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.taken >= len(self.rows):
            raise StopIteration
        self.taken += 1
        return self.rows[self.taken - 1]


@pytest.fixture(scope="module")
def real() -> Cl100kCounter:
    counter = Cl100kCounter()
    assert counter.load(), counter.failure
    return counter


FRAME = Frame(("Summarize these reviews.\n", "\nWhat do customers complain about most?"))


def note(start: int, count: int, more: bool) -> str:
    return f"(rows {start + 1:,}-{start + count:,})"


@pytest.mark.parametrize("fmt", pb.FORMATS)
def test_every_row_lands_in_exactly_one_chunk_and_each_chunk_is_filled_close_to_the_budget(real, fmt):
    rows = reviews(3000)
    layout = row_layout(fmt, ["id", "rating", "body"])
    chunks = list(RowPacker(rows, layout, FRAME, max_tokens=1500, counter=real, note=note))
    assert len(chunks) > 10
    assert [c.start for c in chunks] == [0] + [c.end for c in chunks[:-1]] and chunks[-1].end == 3000
    for chunk in chunks:
        if chunk.counter == "estimate":  # within the budget in bytes: never counted for real
            assert chunk is chunks[-1] and byte_bound(chunk.text) <= 1500
        else:
            assert chunk.tokens == real.count(chunk.text) <= 1500 and chunk.counter == "cl100k_base (tiktoken)"
        assert chunk.block == layout.block(rows[chunk.start : chunk.end], chunk.start) + "\n\n" + chunk.note
        assert chunk.note == f"(rows {chunk.start + 1:,}-{chunk.end:,})" and chunk.text == FRAME.render(chunk.block)
        assert chunk.more == (chunk is not chunks[-1]) and chunk.shortened == ()
    # Packing by the real count fills each prompt: one more row would not have fitted.
    for chunk in chunks[:-1]:
        assert chunk.tokens >= 0.9 * 1500
        one_more = FRAME.render(layout.block(rows[chunk.start : chunk.end + 1], chunk.start) + "\n\n" + chunk.note)
        assert real.count(one_more) > 1500


def test_the_real_counter_packs_more_rows_per_prompt_than_the_estimate(real):
    rows = reviews(2000)
    layout = row_layout("markdown", ["id", "rating", "body"])
    by_real = list(RowPacker(rows, layout, FRAME, max_tokens=4000, counter=real))
    by_estimate = list(RowPacker(rows, layout, FRAME, max_tokens=4000, counter=ESTIMATE))
    assert len(by_real) < len(by_estimate)
    assert all(real.count(c.text) <= 4000 for c in by_estimate)  # the estimate errs high on such rows


def test_the_first_chunk_stops_reading_the_input(real):
    source = Source(reviews(100_000))
    packer = RowPacker(source, row_layout("csv", ["id", "rating", "body"]), FRAME, max_tokens=2000, counter=real)
    chunk = packer.next_chunk()
    assert 20 < chunk.count < 500 and chunk.more
    # The rows of the chunk and the one that did not fit; nothing else was read.
    assert source.taken == packer.rows_read == chunk.count + 1
    assert not packer.input_exhausted and packer.has_more()
    second = packer.next_chunk()
    assert second.start == chunk.end and source.taken == packer.rows_read == second.end + 1


def test_a_row_cap_per_chunk_reads_one_row_ahead():
    source = Source(reviews(50))
    packer = RowPacker(source, row_layout("json", ["id", "rating", "body"]), FRAME, max_tokens=10**9,
                       counter=ESTIMATE, max_rows=10)
    chunks = list(packer)
    assert [c.count for c in chunks] == [10] * 5 and packer.input_exhausted
    assert [c.more for c in chunks] == [True] * 4 + [False]


def test_small_prompts_never_load_the_tokenizer():
    counter = Cl100kCounter()
    packer = RowPacker(reviews(5), row_layout("markdown", ["id", "rating", "body"]), FRAME, max_tokens=15808,
                       counter=counter)
    chunk = packer.next_chunk()
    assert chunk.count == 5 and chunk.counter == "estimate"
    assert counter.source is None  # the bytes fitted the budget: nothing was counted for real
    assert byte_bound(chunk.text) <= 15808


@pytest.mark.parametrize("shorten", [True, False])
def test_a_row_too_large_for_any_prompt_is_shortened_and_flagged_never_dropped(real, shorten):
    rows = reviews(30)
    rows[12]["body"] = "배송 문제 " * 20_000  # ~120,000 characters: far beyond one prompt
    layout = row_layout("markdown", ["id", "rating", "body"])
    packer = RowPacker(rows, layout, FRAME, max_tokens=800, counter=real, note=note, shorten=shorten)
    if not shorten:
        first = packer.next_chunk()
        assert first.end == 12
        with pytest.raises(PromptError, match="Not even one row fits in the prompt budget"):
            packer.next_chunk()
        return
    chunks = list(packer)
    assert sum(c.count for c in chunks) == 30
    big = next(c for c in chunks if c.start == 12)
    assert big.count == 1 and big.tokens <= 800
    assert big.shortened == (ShortenedRow(12, big.shortened[0].max_cell_chars),)
    limit = big.shortened[0].max_cell_chars
    assert 100 < limit < 2000 and "…(+" in big.block
    # The largest limit that fits: a few more characters would not have.
    assert real.count(FRAME.render(layout.head + "\n" + layout.render(rows[12], 12, limit + 20) + "\n\n(rows 13-13)")) > 800
    assert all(c.shortened == () for c in chunks if c is not big)


def test_a_row_that_cannot_fit_even_at_one_character_per_value_is_an_error():
    columns = [f"c{i}" for i in range(200)]
    row = {c: "x" for c in columns}
    packer = RowPacker([row], row_layout("markdown", columns), FRAME, max_tokens=300, counter=ESTIMATE)
    with pytest.raises(PromptError, match="Row 1 does not fit in one prompt even with every value cut to 1 character"):
        packer.next_chunk()


def test_a_frame_over_budget_fails_before_reading_any_row():
    source = Source(reviews(10))
    frame = Frame(("긴 지시문 " * 500, ""))
    with pytest.raises(PromptError, match="template, context and query alone exceed the prompt budget"):
        RowPacker(source, row_layout("csv", ["id", "rating", "body"]), frame, max_tokens=1000, counter=ESTIMATE)
    assert source.taken == 0


def test_outside_texts_and_repeated_data_slots_share_the_budget(real):
    system = "You are a careful analyst. " * 40
    frame = Frame(("A:\n", "\nB:\n", "\nEnd."), outside=(system, "\n\n"))
    chunk = RowPacker(reviews(500), row_layout("csv", ["id", "rating", "body"]), frame, max_tokens=3000,
                      counter=real).next_chunk()
    assert chunk.text.count(chunk.block) == 2
    assert chunk.tokens + real.count(system) + real.count("\n\n") <= 3000
    budget = PromptBudget(real, frame, 3000, None)
    assert budget.measure(chunk.text)[0]


def test_max_chars_bounds_each_chunk():
    rows = reviews(400)
    chunks = list(RowPacker(rows, row_layout("records", ["id", "rating", "body"]), FRAME, max_tokens=10**9,
                            max_chars=5000, counter=ESTIMATE))
    assert all(c.chars <= 5000 for c in chunks) and sum(c.count for c in chunks) == 400
    assert all(isinstance(c, Chunk) for c in chunks)


def test_iterating_with_a_zero_row_cap_is_refused():
    packer = RowPacker(reviews(3), row_layout("csv", ["id", "rating", "body"]), FRAME, max_tokens=1000, max_rows=0,
                       counter=ESTIMATE)
    with pytest.raises(PromptError, match="max_rows must be at least 1"):
        list(packer)


def test_an_empty_input_has_no_chunks():
    assert list(RowPacker(iter([]), row_layout("csv", ["a"]), FRAME, max_tokens=100, counter=ESTIMATE)) == []


cells = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=40),
    st.text(alphabet="가나다라 abc0123|,\"\\\n\x1b", min_size=50, max_size=3000),
    st.text(alphabet="0123456789abcdef", min_size=32, max_size=64),  # hashes: the estimate under-counts them
)


@st.composite
def tables(draw):
    names = draw(st.lists(st.sampled_from(["id", "name", "memo", "hash", "가격"]), min_size=1, max_size=4, unique=True))
    rows = draw(st.lists(st.fixed_dictionaries({n: cells for n in names}), min_size=1, max_size=40))
    return names, rows


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=tables(),
    fmt=st.sampled_from(pb.FORMATS),
    max_tokens=st.integers(60, 3000),
    max_chars=st.none() | st.integers(200, 8000),
    max_cell_chars=st.none() | st.integers(1, 300),
    use_real=st.booleans(),
)
def test_property_chunks_cover_every_row_once_and_each_fits(real, table, fmt, max_tokens, max_chars, max_cell_chars,
                                                           use_real):
    names, rows = table
    counter = real if use_real else ESTIMATE
    layout = row_layout(fmt, names)
    frame = Frame(("Rows:\n", "\nDone."))
    packer = RowPacker(iter(rows), layout, frame, max_tokens=max_tokens, max_chars=max_chars, counter=counter,
                       max_cell_chars=max_cell_chars, note=note)
    try:
        chunks = list(packer)
    except PromptError as exc:
        # Only a row that cannot fit even at one character per value may stop the packing.
        assert "even with every value cut to 1 character" in exc.message
        return
    assert [c.start for c in chunks] == [0] + [c.end for c in chunks[:-1]] and chunks[-1].end == len(rows)
    for chunk in chunks:
        assert chunk.count >= 1 and chunk.text == frame.render(chunk.block)
        assert counter.count(chunk.text) <= max_tokens and (max_chars is None or chunk.chars <= max_chars)
        if chunk.shortened:
            (short,) = chunk.shortened
            assert chunk.count == 1 and short.index == chunk.start
            assert max_cell_chars is None or short.max_cell_chars < max_cell_chars
            limit = short.max_cell_chars
        else:
            limit = max_cell_chars
        assert chunk.block.startswith(layout.block(rows[chunk.start : chunk.end], chunk.start, limit))
