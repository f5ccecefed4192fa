"""structured_output.py: schema files, parsing answers, validation messages, the repair prompt."""

from __future__ import annotations

import json

import pytest

from errors import UsageError
from structured_output import AnswerSchema, load_schema, parse_json_answer

SCHEMA = {
    "type": "object",
    "properties": {"sentiment": {"enum": ["positive", "neutral", "negative"]}, "score": {"type": "number"}},
    "required": ["sentiment"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("text", [
    '{"sentiment": "positive"}',
    '  {"sentiment": "positive"}\n',
    '```json\n{"sentiment": "positive"}\n```',
    '```\n{"sentiment": "positive"}\n```',
    'Here is the answer: {"sentiment": "positive"} Hope this helps.',
])
def test_answers_parse_through_fences_and_chatter(text):
    assert parse_json_answer(text) == {"sentiment": "positive"}


@pytest.mark.parametrize(("text", "why"), [("", "empty"), ("positive", "not JSON"), ("{'a': 1}", "not JSON")])
def test_non_json_answers_say_why(text, why):
    with pytest.raises(ValueError, match=why):
        parse_json_answer(text)


def test_check_reports_the_first_problem_with_its_place():
    schema = AnswerSchema(SCHEMA)
    assert schema.check('{"sentiment": "negative", "score": -0.5}') == ({"sentiment": "negative", "score": -0.5}, None)
    value, problem = schema.check('{"sentiment": "angry"}')
    assert value == {"sentiment": "angry"} and "'angry' is not one of" in problem and "$.sentiment" in problem
    assert schema.check('{"score": 1}')[1].startswith("'sentiment' is a required property")
    assert schema.check("no json here") == (None, "the answer is not JSON (Expecting value: line 1 column 1 (char 0))")
    assert schema.properties == ["sentiment", "score"]


def test_repair_prompt_quotes_the_answer_and_the_problem():
    schema = AnswerSchema(SCHEMA)
    prompt = schema.repair_prompt("Classify: great", '{"sentiment": "angry"}', "'angry' is not one of [...]")
    assert prompt.startswith("Classify: great\n\nYour previous answer was:\n{\"sentiment\": \"angry\"}")
    assert "'angry' is not one of [...]" in prompt and "only the corrected JSON object" in prompt


def test_schema_files_are_checked(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(SCHEMA), encoding="utf-8")
    assert load_schema(str(good)) == SCHEMA
    cases = {
        "missing.json": None,
        "not_json.json": "{sentiment: positive}",
        "list.json": "[1, 2]",
        "bad_type.json": json.dumps({"type": "object", "properties": {"a": {"type": "strin"}}}),
    }
    messages = {}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(UsageError) as info:
            load_schema(str(tmp_path / name))
        messages[name] = info.value.message
    assert "does not exist" in messages["missing.json"]
    assert "is not JSON" in messages["not_json.json"]
    assert "not a schema object" in messages["list.json"]
    assert "not a valid JSON Schema" in messages["bad_type.json"] and "properties.a.type" in messages["bad_type.json"]
