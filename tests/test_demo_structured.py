"""The demo server honours structured output: JSON built from the schema, per protocol.

The README's first --per-row example (--schema examples/sentiment_schema.json) must run against
``demo_model_server.py`` on the laptop; the instances are checked with ``jsonschema`` itself.
"""

from __future__ import annotations

import csv
import json

import jsonschema
import pytest
import requests

from conftest import REPO_ROOT
from demo_model_server import DemoServer
from demo_structured import DEMO_NOTE, schema_in_prompt, schema_instance, structured_answer
from row_prompt import SCHEMA_INSTRUCTION, schema_prompt_text
from structured_output import AnswerSchema
from test_pipeline import run  # noqa: F401  (the fixture: the command in-process)

SENTIMENT = json.loads((REPO_ROOT / "examples" / "sentiment_schema.json").read_text(encoding="utf-8"))
PROTOCOLS = ["pc", "ollama", "openai"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_readme_schema_example_runs_against_the_demo(run, protocol, tmp_path):
    with DemoServer(protocol, port=0, speed=0) as demo:
        result = run("--per-row", "--query", "SELECT id, rating, title, body FROM reviews",
                     "--template-file", str(REPO_ROOT / "examples" / "templates" / "review_sentiment_per_row.txt"),
                     "--schema", str(REPO_ROOT / "examples" / "sentiment_schema.json"), "--output", "sentiment.csv",
                     env={"API_BASE_URL": demo.base_url})
    assert result.returncode == 0, result.stderr
    assert "Rows: 20 ok, 0 failed, 0 skipped (already done), 0 not done." in result.stderr
    records = [json.loads(line) for line in (tmp_path / "sentiment.jsonl").read_text(encoding="utf-8").splitlines()
               if '"status"' in line]
    assert len(records) == 20 and {r["status"] for r in records} == {"ok"}
    assert {r["attempts"] for r in records} == {1}  # valid at once: no repair request
    for record in records:
        jsonschema.validate(record["parsed"], SENTIMENT)
        assert record["parsed"]["topics"] == [DEMO_NOTE]  # it says it is a demo where a string may
    assert len({r["parsed"]["sentiment"] for r in records}) > 1  # the rows do not all get the same value
    with open(tmp_path / "sentiment.csv", encoding="utf-8-sig", newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["id", "status", "sentiment", "score", "topics", "error"] and len(table) == 21


def test_ollama_format_and_openai_response_format_are_honoured_without_the_schema_in_the_prompt():
    with DemoServer("ollama", port=0, speed=0) as demo:
        chat = {"model": "phi4", "messages": [{"role": "user", "content": "Classify: great"}], "format": SENTIMENT}
        whole = requests.post(f"{demo.base_url}/api/chat", json={**chat, "stream": False}, timeout=10).json()
        streamed = requests.post(f"{demo.base_url}/api/chat", json={**chat, "stream": True}, timeout=10)
        pieces = [json.loads(line)["message"]["content"] for line in streamed.text.splitlines()]
        any_json = requests.post(f"{demo.base_url}/api/chat", json={**chat, "format": "json", "stream": False},
                                 timeout=10).json()
    jsonschema.validate(json.loads(whole["message"]["content"]), SENTIMENT)
    assert "".join(pieces) == whole["message"]["content"]
    assert json.loads(any_json["message"]["content"]) == {"answer": DEMO_NOTE}
    with DemoServer("openai", port=0, speed=0) as demo:
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SENTIMENT, "strict": True}}
        body = {"messages": [{"role": "user", "content": "Classify: great"}], "response_format": fmt}
        reply = requests.post(f"{demo.base_url}/v1/chat/completions", json=body, timeout=10).json()
        plain = requests.post(f"{demo.base_url}/v1/chat/completions", timeout=10,
                              json={**body, "response_format": {"type": "json_object"}}).json()
    jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), SENTIMENT)
    assert json.loads(plain["choices"][0]["message"]["content"]) == {"answer": DEMO_NOTE}


def test_the_pc_demo_follows_a_schema_in_the_prompt_and_answers_prose_otherwise():
    prompt = f"Classify: great\n\n{SCHEMA_INSTRUCTION}{schema_prompt_text(SENTIMENT)}"
    with DemoServer("pc", port=0, speed=0) as demo:
        structured = requests.post(f"{demo.base_url}/api/generate", json={"prompt": prompt}, timeout=10).json()
        example = requests.post(f"{demo.base_url}/api/generate", timeout=10, json={
            "prompt": 'Answer ONLY with JSON in this shape:\n{"summary": "...", "risk": {"level": "low"}}'}).json()
    jsonschema.validate(json.loads(structured["response"]), SENTIMENT)
    assert structured["stats"]["generated_tokens"] > 0
    assert example["response"].startswith("[demo] ")  # a JSON example is not a schema: the canned prose


def test_the_schema_is_found_in_a_repair_prompt_not_the_previous_answer():
    schema = AnswerSchema(SENTIMENT)
    first = f"Classify: meh\n\n{SCHEMA_INSTRUCTION}{schema_prompt_text(SENTIMENT)}"
    repair = schema.repair_prompt(first, '{"type": "object", "properties": {}}', "'sentiment' is a required property")
    assert schema_in_prompt(repair) == SENTIMENT
    assert schema_in_prompt('no schema here {"a": 1} {broken') is None
    assert schema_in_prompt('{"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "string"}') == {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "string"}
    assert structured_answer("pc", {}, "Summarise: {row}") is None


NESTED = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]+$"},
                                                         "code": {"type": "string", "pattern": "^[0-9]{3}$"},
                                                         "qty": {"type": "integer", "minimum": 1}},
                       "required": ["sku", "qty"], "additionalProperties": False}},
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 2},
                   "note": {"type": ["string", "null"], "maxLength": 200}},
    "required": ["items", "note"],
}
CASES = {
    "sentiment": SENTIMENT,
    "strings with formats and lengths": {
        "type": "object", "additionalProperties": False, "required": ["when", "mail", "code", "id", "tiny"],
        "properties": {"when": {"type": "string", "format": "date-time"}, "mail": {"format": "email"},
                       "code": {"type": "string", "minLength": 12, "maxLength": 12}, "id": {"format": "uuid"},
                       "tiny": {"type": "string", "maxLength": 3}}},
    "numbers: exclusive bounds, both drafts, multipleOf": {
        "type": "object", "required": ["a", "b", "c", "d", "e"],
        "properties": {"a": {"type": "integer", "exclusiveMinimum": 3, "maximum": 10, "multipleOf": 4},
                       "b": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                       "c": {"type": "integer", "minimum": -20, "maximum": -5},
                       "d": {"type": "number", "minimum": 100},
                       "e": {"type": "number", "multipleOf": 0.25, "minimum": 0.3, "maximum": 0.6}}},
    "draft 4 exclusive flags": {
        "$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
        "properties": {"p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 0.5}},
        "required": ["p"]},
    "allOf, anyOf, oneOf with null, const, boolean": {
        "allOf": [{"type": "object", "properties": {"kind": {"const": "review"}}, "required": ["kind"]},
                  {"properties": {"flag": {"type": "boolean"}}, "required": ["flag"]}],
        "properties": {"maybe": {"oneOf": [{"type": "null"}, {"type": "integer", "minimum": 7}]},
                       "either": {"anyOf": [{"type": "string", "enum": ["x", "y"]}, {"type": "number"}]}},
        "required": ["maybe", "either"]},
    "arrays: tuples, unique, bounded": {
        "type": "object", "required": ["pair", "tags", "none"],
        "properties": {"pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                                "items": False, "minItems": 2},
                       "tags": {"type": "array", "items": {"type": "string"}, "minItems": 3, "uniqueItems": True},
                       "none": {"type": "array", "maxItems": 0}}},
    "draft 7 tuple items": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "array",
                            "items": [{"type": "boolean"}, {"type": "string"}], "additionalItems": False},
    "nested with $ref": NESTED,
    "required without properties": {"type": "object", "required": ["answer"],
                                     "additionalProperties": {"type": "string"}},
    "top-level array": {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 1},
}


@pytest.mark.parametrize("schema", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_instance_is_valid_against_its_schema(schema, seed):
    value = schema_instance(schema, seed=seed)
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator(schema, format_checker=validator.FORMAT_CHECKER).validate(value)


def test_the_demo_note_goes_once_into_the_first_free_text_string():
    value = schema_instance(CASES["strings with formats and lengths"])
    assert DEMO_NOTE not in json.dumps(value)  # no string there may hold it (formats, lengths)
    nested = schema_instance(NESTED)
    assert nested["note"] == DEMO_NOTE  # a pattern's string is not free text: the note goes further on
    assert nested["items"][0]["sku"] == "DEMO" and nested["items"][0]["code"] == "000"  # simple patterns met
    both = schema_instance({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "string"}}})
    assert both == {"a": DEMO_NOTE, "b": "demo 2"}
    assert schema_instance({"type": "string", "pattern": "^x{40}$"}) == "demo"  # beyond the demo: left unmatched
