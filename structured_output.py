"""Structured answers: a JSON Schema per row, the answer parsed and validated, one repair.

``--schema FILE.json`` names a JSON Schema (any draft ``jsonschema`` knows; the file's
``$schema`` picks it, 2020-12 by default). The schema itself is checked when loaded, so a typo
in it is a usage error before any query runs. Each answer is then:

1. parsed: surrounding blanks and a Markdown code fence (```json ... ```) are removed, and
   when the text is not JSON as a whole, the part from the first ``{`` (or ``[``) to the last
   ``}`` (``]``) is tried, since models like to add a sentence before or after the object;
2. validated against the schema; the first error, with its place in the answer, is kept;
3. when either fails, asked again once with the problem stated (:meth:`AnswerSchema.repair_prompt`);
   an answer still not valid is recorded as invalid with the raw text kept.

``jsonschema`` (about 60-90 ms to import) is imported only when a schema is used.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Mapping

from errors import UsageError

logger = logging.getLogger(__name__)

_FENCE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\n?(.*?)\n?```$", re.DOTALL)
#: Longest excerpt of a wrong answer quoted back to the model in the repair prompt.
REPAIR_ANSWER_CHARS = 4000


def load_schema(path: str) -> dict[str, Any]:
    """Read and check a JSON Schema file; raise UsageError saying what is wrong with it."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UsageError(f"The schema file {path} does not exist.", hint="Fix: check the --schema path.") from None
    except UnicodeDecodeError:
        raise UsageError(f"The schema file {path} is not UTF-8.", hint="Fix: save it as UTF-8.") from None
    except OSError as exc:
        raise UsageError(f"Cannot read the schema file {path}: {exc.strerror or exc}.") from None
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"The schema file {path} is not JSON: {exc}.",
                         hint="Fix: --schema takes a JSON Schema document, e.g. "
                         '{"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative"]}}}.') from None
    if not isinstance(schema, dict):
        raise UsageError(f"The schema file {path} holds a JSON {type(schema).__name__}, not a schema object.",
                         hint='Fix: write a JSON Schema object, e.g. {"type": "object", "properties": {...}}.')
    check_schema(schema, f"The schema file {path}")
    return schema


def check_schema(schema: Mapping[str, Any], where: str = "the schema") -> None:
    """Raise UsageError when ``schema`` is not a valid JSON Schema of its draft."""
    import jsonschema

    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise UsageError(f"{where} is not a valid JSON Schema: {exc.message} (at {exc.json_path}).",
                         hint="Fix: correct the schema; https://json-schema.org/understanding-json-schema/ "
                         "describes every keyword.") from None


def parse_json_answer(text: str) -> Any:
    """The JSON value in a model's answer; raise ValueError saying why there is none."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not body:
        raise ValueError("the answer is empty")
    try:
        return json.loads(body)
    except ValueError as exc:
        first_error = exc
    for opening, closing in (("{", "}"), ("[", "]")):
        start, end = body.find(opening), body.rfind(closing)
        if 0 <= start < end:
            try:
                return json.loads(body[start:end + 1])
            except ValueError:
                continue
    raise ValueError(f"the answer is not JSON ({first_error})")


class AnswerSchema:
    """One JSON Schema, ready to check many answers (the validator is built once)."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        import jsonschema

        self.schema = dict(schema)
        validator_class = jsonschema.validators.validator_for(self.schema, default=jsonschema.Draft202012Validator)
        self._validator = validator_class(self.schema)
        self._best_match = jsonschema.exceptions.best_match

    @property
    def properties(self) -> list[str]:
        """The top-level property names (one CSV column each), in the schema's order."""
        props = self.schema.get("properties")
        return list(props) if isinstance(props, dict) else []

    def check(self, answer: str) -> tuple[Any, str | None]:
        """``(value, None)`` for a valid answer, else ``(value or None, what is wrong)``."""
        try:
            value = parse_json_answer(answer)
        except ValueError as exc:
            return None, str(exc)
        error = self._best_match(self._validator.iter_errors(value))
        if error is None:
            return value, None
        return value, f"{error.message} (at {error.json_path})"

    def repair_prompt(self, prompt: str, answer: str, problem: str) -> str:
        """The original prompt, the wrong answer and what is wrong with it: ask once more."""
        shown = answer if len(answer) <= REPAIR_ANSWER_CHARS else answer[:REPAIR_ANSWER_CHARS] + " …"
        return (
            f"{prompt}\n\nYour previous answer was:\n{shown}\n\n"
            f"It does not match the required JSON Schema: {problem}.\n"
            "Answer again with only the corrected JSON object, and no other text."
        )
