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


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal text."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(parts: Mapping[str, Any]) -> str:
    """A short stable hash of the job's parts (16 hex digits)."""
    return hashlib.sha256(canonical_json(dict(parts)).encode("utf-8")).hexdigest()[:16]


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else canonical_json(value)
    text = " ".join(str(text).split())
    return repr(text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…")


def describe_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """One line per part that differs: ``template: 'Classify {row}' -> 'Rate {row}'``."""
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
            lines.append(f"{name}: {_shown(old)} -> {_shown(new)}")
    return lines
