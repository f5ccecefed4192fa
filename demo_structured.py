"""The demo server's structured answers: a small JSON value that matches a JSON Schema.

A real model asked for structured output answers JSON that matches the schema; the demo server
(:mod:`demo_model_server`) has no model, so it builds a small valid instance from the schema
itself, and says it is a demo in the first free-text string the schema allows (not in an
``enum``, ``const``, ``format`` or ``pattern`` string, and only where ``maxLength`` leaves room).

Where the schema comes from, per protocol:

- Ollama: the request's ``format`` (a schema object; the string ``"json"`` asks for any JSON
  object).
- OpenAI-compatible: ``response_format`` ``{"type": "json_schema", "json_schema": {"schema":
  ...}}`` (``{"type": "json_object"}``: any JSON object).
- Any protocol, the pc server's included (its API has no structured-output field): a JSON Schema
  written into the prompt, which is what ``--schema`` does for every server. The demo then
  behaves like a model that follows the prompt's instruction. A JSON object counts as a schema
  when it has ``$schema``, or ``"type": "object"`` with ``properties``; a JSON example of the
  expected answer (``{"summary": "..."}``) does not, and gets the usual canned prose.

Covered: ``type`` (one or a list), ``properties``/``required``, ``items``/``prefixItems`` with
``minItems``/``maxItems``, ``enum``, ``const``, ``minimum``/``maximum`` (exclusive too),
``multipleOf``, ``minLength``/``maxLength``, common ``format`` values, ``anyOf``/``oneOf``
(the first branch), ``allOf`` (merged) and local ``$ref`` (``#/$defs/...``). A ``pattern`` is met
only when one of a few stock strings matches it (``DEMO``, ``000``, ``a``, ...); otherwise the
string is ``"demo"`` and the tool records the row as invalid, as for a model that got it wrong. Which
``enum`` value is chosen depends on the prompt, so rows get different values, the same ones
every run. Standard library only, like the demo server.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from typing import Any, Mapping

#: The text that says the answer is made up, put in the first free-text string field.
DEMO_NOTE = "[demo] made up by demo_model_server.py from the JSON Schema, not by a model"
#: Nesting followed before giving up on a (recursive) schema.
MAX_DEPTH = 12
#: Prompts longer than this are not searched for a schema (the demo stays quick on huge prompts).
MAX_SEARCH_CHARS = 1_000_000

_FORMATS = {
    "date": "2025-01-01", "date-time": "2025-01-01T00:00:00Z", "time": "00:00:00Z", "duration": "P1D",
    "email": "demo@example.com", "idn-email": "demo@example.com", "hostname": "example.com",
    "idn-hostname": "example.com", "ipv4": "192.0.2.1", "ipv6": "2001:db8::1", "uri": "https://example.com/demo",
    "iri": "https://example.com/demo", "uri-reference": "/demo", "iri-reference": "/demo",
    "uuid": "00000000-0000-4000-8000-000000000000", "json-pointer": "/demo", "regex": "demo",
}


def looks_like_schema(value: Any) -> bool:
    """A JSON Schema as a prompt shows one: ``$schema``, or an object type with properties."""
    if not isinstance(value, dict):
        return False
    return "$schema" in value or (value.get("type") == "object" and isinstance(value.get("properties"), dict))


def schema_in_prompt(prompt: str) -> dict[str, Any] | None:
    """The first JSON Schema written into ``prompt`` (see :func:`looks_like_schema`), else None."""
    if len(prompt) > MAX_SEARCH_CHARS:
        return None
    decoder = json.JSONDecoder()
    position = prompt.find("{")
    while position >= 0:
        try:
            value, end = decoder.raw_decode(prompt, position)
        except ValueError:
            position = prompt.find("{", position + 1)
            continue
        if looks_like_schema(value):
            return value
        position = prompt.find("{", end)  # skip what was decoded: nested objects are not schemas on their own
    return None


def requested_schema(protocol: str, body: Mapping[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """``(JSON asked for, its schema or None)`` from a request's own structured-output field."""
    if protocol == "ollama":
        wanted = body.get("format")
        if isinstance(wanted, dict):
            return True, wanted
        return wanted == "json", None
    if protocol == "openai":
        wanted = body.get("response_format")
        if not isinstance(wanted, dict):
            return False, None
        if wanted.get("type") == "json_schema":
            spec = wanted.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            return True, schema if isinstance(schema, dict) else None
        return wanted.get("type") == "json_object", None
    return False, None  # the pc server's API has no such field


def structured_answer(protocol: str, body: Mapping[str, Any], prompt: str) -> str | None:
    """The JSON text to answer with, or None when no JSON is asked for (canned prose then)."""
    asked, schema = requested_schema(protocol, body)
    if schema is None:
        schema = schema_in_prompt(prompt)
    if schema is not None:
        return json.dumps(schema_instance(schema, seed=zlib.crc32(prompt.encode("utf-8", "replace"))),
                          ensure_ascii=False)
    if asked:
        return json.dumps({"answer": DEMO_NOTE}, ensure_ascii=False)
    return None


def schema_instance(schema: Any, *, note: str = DEMO_NOTE, seed: int = 0) -> Any:
    """A small value valid against ``schema``, with ``note`` in the first free-text string."""
    return _Builder(schema, note, seed).build(schema, 0)


class _Builder:
    def __init__(self, root: Any, note: str, seed: int) -> None:
        self.root = root
        self.note: str | None = note
        self.seed = seed
        self.strings = 0

    def build(self, schema: Any, depth: int) -> Any:
        if schema is True or schema == {} or not isinstance(schema, dict):
            return self.text({})
        if depth > MAX_DEPTH:
            return None
        schema = self.flatten(schema, depth)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            options = schema["enum"]
            return options[(self.seed + depth) % len(options)]
        kind = self.kind(schema)
        if kind == "object":
            return self.obj(schema, depth)
        if kind == "array":
            return self.array(schema, depth)
        if kind in ("integer", "number"):
            return self.number(schema, kind == "integer")
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return self.text(schema)

    def flatten(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        """Resolve ``$ref``, merge ``allOf``, take the first branch of ``anyOf``/``oneOf``."""
        for _ in range(MAX_DEPTH):
            ref = schema.get("$ref")
            if isinstance(ref, str):
                schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **self.resolve(ref)}
                continue
            if isinstance(schema.get("allOf"), list):
                merged = {k: v for k, v in schema.items() if k != "allOf"}
                for part in schema["allOf"]:
                    if isinstance(part, dict):
                        merged = _merge(merged, part)
                schema = merged
                continue
            branch = next((schema[k] for k in ("anyOf", "oneOf") if isinstance(schema.get(k), list) and schema[k]),
                          None)
            if branch is not None:
                rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
                first = next((b for b in branch if isinstance(b, dict) and b.get("type") != "null"), branch[0])
                schema = _merge(rest, first if isinstance(first, dict) else {})
                continue
            break
        return schema

    def resolve(self, ref: str) -> dict[str, Any]:
        if not ref.startswith("#"):
            return {}  # a remote schema: not fetched
        node: Any = self.root
        for part in ref[1:].strip("/").split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            node = node.get(part) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    @staticmethod
    def kind(schema: dict[str, Any]) -> str:
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
        if isinstance(kind, str):
            return kind
        if "properties" in schema or "required" in schema:
            return "object"
        if "items" in schema or "prefixItems" in schema:
            return "array"
        if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")):
            return "number"
        return "string"

    def obj(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        result: dict[str, Any] = {}
        for name, sub in properties.items():  # every declared property: the answer shows them all
            if sub is not False:
                result[name] = self.build(sub, depth + 1)
        extra = schema.get("additionalProperties", True)
        for name in schema.get("required") or []:
            if isinstance(name, str) and name not in result:
                result[name] = self.build(extra if isinstance(extra, dict) else {}, depth + 1)
        return result

    def array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        items = schema.get("items")
        if isinstance(items, list):  # drafts before 2020-12: items as a list is a tuple
            prefix, items = items, schema.get("additionalItems", {})
        values = [self.build(sub, depth + 1) for sub in prefix] if isinstance(prefix, list) else []
        low = schema.get("minItems") if isinstance(schema.get("minItems"), int) else 0
        high = schema.get("maxItems") if isinstance(schema.get("maxItems"), int) else None
        wanted = max(low, len(values), 1)
        if high is not None:
            wanted = min(wanted, high)
        values = values[:wanted]
        while len(values) < wanted and items is not False:
            values.append(self.build(items if items is not None else {}, depth + 1 + len(values)))
        return values

    def number(self, schema: dict[str, Any], integer: bool) -> int | float:
        low, low_open, high, high_open = _bounds(schema)
        step = schema.get("multipleOf")
        step = step if isinstance(step, (int, float)) and not isinstance(step, bool) and step > 0 else None

        def valid(value: float) -> bool:
            return ((low is None or value > low or (value == low and not low_open))
                    and (high is None or value < high or (value == high and not high_open))
                    and (step is None or abs(value / step - round(value / step)) < 1e-9))

        grid = step or (1 if integer else None)
        candidates: list[float] = [0]
        for bound in (low, high):
            if bound is not None:
                candidates += [(math.ceil(bound / grid) + k) * grid for k in (-1, 0, 1, 2)] if grid else [bound]
        if grid is None and low is not None and high is not None:
            candidates.append((low + high) / 2)
        for value in candidates:
            if integer:
                if not float(value).is_integer():
                    continue
                value = int(value)
            if valid(value):
                return value
        return low if low is not None else 0  # contradictory bounds: nothing is valid anyway

    def text(self, schema: dict[str, Any]) -> str:
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            return _FORMATS[fmt]
        low = schema.get("minLength") if isinstance(schema.get("minLength"), int) else 0
        high = schema.get("maxLength") if isinstance(schema.get("maxLength"), int) else None
        self.strings += 1
        value = "demo" if self.strings == 1 else f"demo {self.strings}"  # distinct: uniqueItems holds
        if self.note is not None and "pattern" not in schema and "format" not in schema \
                and (high is None or high >= len(self.note)):
            value, self.note = self.note, None
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            return _matching(pattern, low, high) or value
        if high is not None:
            value = value[:high]
        return value + "." * max(0, low - len(value))


#: Strings tried against a ``pattern``; the first that matches (and fits the lengths) is used.
_PATTERN_TRIES = ("demo", "DEMO", "Demo", "000", "0", "1", "a", "A", "A1", "a1", "demo-1", "demo_1", "x",
                  "2025-01-01", "demo@example.com", "https://example.com/demo")


def _matching(pattern: str, low: int, high: int | None) -> str | None:
    """A stock string that matches ``pattern`` (searched, as JSON Schema does) within the lengths."""
    try:
        compiled = re.compile(pattern)
    except re.error:
        return None
    return next((text for text in _PATTERN_TRIES
                 if low <= len(text) <= (high if high is not None else len(text)) and compiled.search(text)), None)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Two schemas that must both hold, merged well enough to build one instance of both."""
    merged = dict(base)
    for key, value in extra.items():
        if key == "properties" and isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        elif key == "required" and isinstance(merged.get(key), list) and isinstance(value, list):
            merged[key] = list(dict.fromkeys([*merged[key], *value]))
        else:
            merged[key] = value
    return merged


def _bounds(schema: Mapping[str, Any]) -> tuple[float | None, bool, float | None, bool]:
    """``(low, low exclusive, high, high exclusive)`` from either draft's keywords."""

    def number(name: str) -> float | None:
        value = schema.get(name)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    low, high = number("minimum"), number("maximum")
    low_open = schema.get("exclusiveMinimum") is True and low is not None  # draft 4: a flag
    high_open = schema.get("exclusiveMaximum") is True and high is not None
    open_low, open_high = number("exclusiveMinimum"), number("exclusiveMaximum")
    if open_low is not None and (low is None or open_low >= low):
        low, low_open = open_low, True
    if open_high is not None and (high is None or open_high <= high):
        high, high_open = open_high, True
    return low, low_open, high, high_open
