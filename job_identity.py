"""What makes two runs "the same job", so a rerun may continue where the first one stopped.

A job is described by named parts (the query and its parameters, the template, the context,
the system prompt, the schema, the model and the generation settings ...). The fingerprint is
a hash of their canonical JSON; a rerun whose fingerprint differs is not the same job, and
:func:`describe_changes` says which parts changed, in words a user can act on.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

#: Longest value shown in full when describing a change.
SHOWN_CHARS = 60
#: Characters kept before the first difference when a long value is cut.
CONTEXT_CHARS = 20
#: How deep objects are compared entry by entry, and how many changed entries are listed.
MAX_DEPTH = 6
MAX_NESTED_LINES = 6


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(parts: Mapping[str, Any]) -> str:
    """A short stable hash of the job's parts (16 hex digits)."""
    return hashlib.sha256(canonical_json(dict(parts)).encode("utf-8")).hexdigest()[:16]


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else canonical_json(value)
    return " ".join(str(text).split())


def _shown(value: Any) -> str:
    text = _text(value)
    return repr(text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…")


def _shown_pair(old: Any, new: Any) -> str:
    """``'old' -> 'new'``; long values are cut around their first difference, so it shows."""
    before, after = _text(old), _text(new)
    if len(before) <= SHOWN_CHARS and len(after) <= SHOWN_CHARS:
        return f"{before!r} -> {after!r}"
    first = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    start = max(0, first - CONTEXT_CHARS)

    def window(text: str) -> str:
        piece = text[start:start + SHOWN_CHARS - 2]
        return repr(("…" if start else "") + piece + ("…" if start + len(piece) < len(text) else ""))

    return f"{window(before)} -> {window(after)}"


def _nested_changes(name: str, old: Mapping[str, Any], new: Mapping[str, Any], depth: int) -> list[str]:
    """The changed entries of two objects (a schema, the parameters), by their dotted path."""
    lines = []
    for key in list(old) + [k for k in new if k not in old]:
        path = f"{name}.{key}"
        if key not in old:
            lines.append(f"{path}: (none) -> {_shown(new[key])}")
        elif key not in new:
            lines.append(f"{path}: {_shown(old[key])} -> (none)")
        elif canonical_json(old[key]) != canonical_json(new[key]):
            lines.extend(_changed(path, old[key], new[key], depth + 1))
    return lines


def _changed(name: str, old: Any, new: Any, depth: int = 0) -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping) and depth < MAX_DEPTH:
        lines = _nested_changes(name, old, new, depth)
        if len(lines) <= MAX_NESTED_LINES:
            return lines
        return lines[:MAX_NESTED_LINES - 1] + [f"{name}: ... and {len(lines) - MAX_NESTED_LINES + 1} more changes"]
    return [f"{name}: {_shown_pair(old, new)}"]


def describe_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """One line per change: ``template: 'Classify {row}' -> 'Rate {row}'``, ``schema.properties.score.maximum: 1 -> 10``.

    A long text is shown around its first difference; objects are compared entry by entry.
    """
    lines = []
    for name in list(before) + [n for n in after if n not in before]:
        old, new = before.get(name), after.get(name)
        if canonical_json(old) == canonical_json(new):
            continue
        if name not in before:
            lines.append(f"{name}: (not recorded) -> {_shown(new)}")
        elif name not in after:
            lines.append(f"{name}: {_shown(old)} -> (not set)")
        else:
            lines.extend(_changed(name, old, new))
    return lines
