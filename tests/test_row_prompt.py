"""row_prompt.py: per-row templates ({row}, {row.COLUMN}), their checks, and rendering."""

from __future__ import annotations

import datetime
import decimal
import json

import pytest

from errors import PromptError
from row_prompt import SCHEMA_INSTRUCTION, RowPrompt, parse_row_template, schema_prompt_text, value_text

COLUMNS = ["id", "title", "body", "rating"]
ROW = {"id": 7, "title": None, "body": "배송이 느려요.\n포장은 좋아요 | 괜찮음", "rating": decimal.Decimal("2.0")}


def render(template: str, fmt: str = "markdown", row: dict | None = None, **kwargs) -> str:
    prompt = RowPrompt(parse_row_template(template, has_schema="schema_text" in kwargs), COLUMNS,
                       data_format=fmt, **kwargs)
    return prompt.render(row or ROW, 6)


def test_a_column_value_is_plain_text_with_its_line_breaks():
    assert render("Review {row.id}: {row.body}") == "Review 7: 배송이 느려요.\n포장은 좋아요 | 괜찮음"
    assert render("[{row.title}] ({row.rating})") == "[NULL] (2.0)"


@pytest.mark.parametrize(("fmt", "expected"), [
    ("markdown", "| id | title | body | rating |\n|---|---|---|---|\n| 7 | NULL | 배송이 느려요.\\n포장은 좋아요 \\| 괜찮음 | 2.0 |"),
    ("json", '{"id":7,"title":null,"body":"배송이 느려요.\\n포장은 좋아요 | 괜찮음","rating":2.0}'),
    ("csv", 'id,title,body,rating\n7,NULL,"배송이 느려요.\n포장은 좋아요 | 괜찮음",2.0'),
    ("records", "id: 7\ntitle: NULL\nbody: 배송이 느려요.\\n포장은 좋아요 | 괜찮음\nrating: 2.0"),
])
def test_the_whole_row_in_each_format(fmt, expected):
    assert render("Row:\n{row}", fmt) == "Row:\n" + expected


def test_constants_are_filled_once_and_braces_stay_literal():
    text = render('{{row.id}} is {row.id} of {row_count} ({columns}); {context} / {query}',
                  query="SELECT * FROM reviews", context="2024", row_count=3000)
    assert text == '{row.id} is 7 of 3,000 (id, title, body, rating); 2024 / SELECT * FROM reviews'
    assert render('JSON like {"a": 1} stays: {row.id}') == 'JSON like {"a": 1} stays: 7'


def test_long_values_are_shortened_only_when_asked():
    row = dict(ROW, body="가" * 50)
    assert render("{row.body}", row=row) == "가" * 50
    assert render("{row.body}", row=row, max_cell_chars=10) == "가" * 10 + "…(+40 chars)"


def test_data_placeholder_suggests_row():
    with pytest.raises(PromptError) as info:
        parse_row_template("Classify: {data}")
    assert "{row}" in info.value.hint and "{row.COLUMN}" in info.value.hint


def test_a_template_that_ignores_the_row_is_refused():
    with pytest.raises(PromptError, match="uses no part of the row"):
        parse_row_template("Say hello about {query}")


def test_typos_are_named():
    with pytest.raises(PromptError, match=r"\{rows\}.*did you mean \{row\}"):
        parse_row_template("Classify {rows}")


def test_unknown_column_lists_the_columns():
    template = parse_row_template("{row.bdy} and {row.Title} and {row.nothing_like_it} and {row.BODY}")
    with pytest.raises(PromptError) as info:
        RowPrompt(template, COLUMNS)
    message = info.value.message
    assert "{row.bdy} (did you mean {row.body}?)" in message and "{row.Title} (did you mean {row.title}?)" in message
    assert "{row.nothing_like_it}" in message and "{row.BODY} (did you mean {row.body}?)" in message
    assert "id, title, body, rating" in info.value.hint


def test_schema_goes_where_the_template_says_or_at_the_end():
    schema = {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative"]}}}
    text = schema_prompt_text(schema)
    assert json.loads(text) == schema
    appended = render("Classify {row.body}", schema_text=text)
    assert appended.endswith("\n\n" + SCHEMA_INSTRUCTION + text)
    placed = render("Schema first:\n{schema}\nRow: {row.id}", schema_text=text)
    assert placed == f"Schema first:\n{text}\nRow: 7"
    with pytest.raises(PromptError, match="no --schema"):
        parse_row_template("{schema} {row}")


def test_value_text_of_types():
    assert value_text(datetime.date(2024, 5, 1)) == "2024-05-01"
    assert value_text(None) == "NULL" and value_text(True) == "true"
    assert value_text("\ud800x") == "\ufffdx"  # a lone surrogate cannot be sent as UTF-8
