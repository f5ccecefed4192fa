"""Tests for prompt_template: the parser other modes (per-row, reduce) build on."""

from __future__ import annotations

import pytest

from errors import PromptError
from prompt_template import PLACEHOLDERS, Slot, Template, parse_template


def test_a_template_parses_into_literals_and_slots():
    template = parse_template('분석: {data}\n{"a": 1} {{query}} {query}')
    assert template.parts == ("분석: ", Slot("data"), '\n{"a": 1} {query} ', Slot("query"))
    assert template.names == ("data", "query")


def test_split_substitutes_every_slot_but_the_data_and_returns_the_runs_around_it():
    template = parse_template("{query}|{data}|{context}|{data}")
    assert template.split({"query": "Q {data}", "context": "C"}) == ("Q {data}|", "|C|", "")


def test_other_modes_bring_their_own_names_and_dotted_fields():
    names = ("row", "query", "context", "columns")
    template = parse_template("{row}\n가격: {row.price} {row.상품 이름} {{row.x}} {query.x}", names=names, fields=("row",))
    assert template.parts == (Slot("row"), "\n가격: ", Slot("row", "price"), " ", Slot("row", "상품 이름"),
                              " {row.x} {query.x}")
    assert Slot("row", "price").key == "row.price"
    filled = template.split({"row.price": "19,900", "row.상품 이름": "마우스"}, at="row")
    assert filled == ("", "\n가격: 19,900 마우스 {row.x} {query.x}")
    reduce = parse_template("Partial answers:\n{answers}\nQuestion: {query}", names=("answers", "query"))
    assert reduce.split({"query": "Q"}, at="answers") == ("Partial answers:\n", "\nQuestion: Q")


def test_dotted_placeholders_stay_literal_where_the_name_takes_no_fields():
    # The single-question template never had fields: "{data.x}" was and stays plain text.
    assert parse_template("{data.x} {{data.x}} {data}").parts == ("{data.x} {{data.x}} ", Slot("data"))


def test_unknown_names_are_reported_against_the_mode_s_names():
    with pytest.raises(PromptError) as info:
        parse_template("{data} {answer}", names=("answers", "query"))
    assert "{data}, {answer} (did you mean {answers}?)" in info.value.message
    assert info.value.hint.startswith("Known placeholders: {answers}, {query}.")
    with pytest.raises(PromptError, match="did you mean {data}"):
        parse_template("{dta}")
    assert PLACEHOLDERS == ("data", "context", "row_count", "columns", "query")


def test_a_template_is_text():
    with pytest.raises(PromptError, match="A template must be text, not bytes"):
        parse_template(b"{data}")  # type: ignore[arg-type]
    assert Template(()).split({}) == ("",)
