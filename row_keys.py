"""Each row's identity in a per-row run: its key, as JSON, and the check that keys are unique.

The key is what a rerun uses to tell which rows are done. ``--key COLUMN[,COLUMN...]`` names
it; by default it is the column ``id`` when the query returns one, otherwise a stable hash of
the row's values (:func:`row_spool.row_fingerprint`: the same values give the same hash in
every run, but a row whose values change becomes a new row).

A key value is kept as JSON: the column's value for one column (``17``, ``"A-100"``), an
object ``{"order_id": 1, "product_id": 7}`` for several. Values JSON has no type for are
written as text the way the prompt shows them (a Decimal ``"12.50"``, a date
``"2024-05-01"``, bytea as ``"\\\\xdeadbeef"``). :func:`canonical` turns a key into the text
compared between runs, so a key read back from a results file matches the row it came from.
"""

from __future__ import annotations

import json
import logging
import math
from array import array
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from errors import UsageError
from row_spool import row_fingerprint
from value_format import plain_text

logger = logging.getLogger(__name__)

DEFAULT_KEY_COLUMN = "id"
_BUCKETS = 64


def json_safe(value: Any) -> Any:
    """A column value as a JSON value that reads back equal (text for types JSON lacks)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else plain_text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, (dict, list)):
        return value
    return plain_text(value)


def canonical(key: Any) -> str:
    """The text two keys are compared by: compact JSON with sorted object keys."""
    return json.dumps(key, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class RowKey:
    """How a row's key is taken: from ``columns``, or (``columns`` empty) a hash of the row."""

    columns: tuple[str, ...]

    @property
    def hashed(self) -> bool:
        return not self.columns

    def of(self, row: Mapping[str, Any]) -> Any:
        """The key of one row, as a JSON value."""
        columns = self.columns
        if not columns:
            return row_fingerprint(tuple(row.values()))
        if len(columns) == 1:
            return json_safe(row[columns[0]])
        return {name: json_safe(row[name]) for name in columns}

    def describe(self) -> str:
        """``id``, ``order_id, product_id`` or ``a hash of each row's values``."""
        return ", ".join(self.columns) if self.columns else "a hash of each row's values"

    def show(self, key: Any) -> str:
        """One key for a message: ``id=17``, ``order_id=1, product_id=7``, ``row hash 1a2b...``."""
        if not self.columns:
            return f"row hash {key}"
        if len(self.columns) == 1:
            return f"{self.columns[0]}={canonical(key)}"
        return ", ".join(f"{name}={canonical(key.get(name))}" for name in self.columns)

    @property
    def csv_columns(self) -> list[str]:
        """The key's columns in a CSV export (``key`` for the row hash)."""
        return list(self.columns) or ["key"]

    def csv_values(self, key: Any) -> list[Any]:
        if len(self.columns) > 1 and isinstance(key, dict):
            return [key.get(name) for name in self.columns]
        return [key]


def choose_key(columns: Sequence[str], requested: str | None) -> RowKey:
    """The key for a query with these columns: ``--key`` as given, else ``id``, else the row hash.

    Raises:
        UsageError: ``--key`` names a column the query does not return, or names one twice.
    """
    if requested is None:
        return RowKey((DEFAULT_KEY_COLUMN,)) if DEFAULT_KEY_COLUMN in columns else RowKey(())
    names = [name.strip() for name in requested.split(",")]
    if not all(names):
        raise UsageError(f"--key {requested!r} has an empty column name.",
                         hint="Fix: write --key COLUMN or --key COLUMN1,COLUMN2.")
    missing = [name for name in names if name not in columns]
    if missing:
        raise UsageError(f"--key names a column the query does not return: {', '.join(missing)}.",
                         hint=f"The query's columns: {', '.join(columns)}. Column names are case-sensitive.")
    if len(set(names)) != len(names):
        raise UsageError(f"--key {requested!r} names a column twice.", hint="Fix: list each key column once.")
    return RowKey(tuple(names))


def find_duplicate(rows: Iterable[Mapping[str, Any]], key: RowKey) -> tuple[Any, int, int] | None:
    """``(key, first row, second row)`` (1-based positions) for a key that two rows share, else None.

    ``rows`` is read twice at most (a :class:`row_spool.RowSpool` can be). Memory stays small for
    any number of rows: a 64-bit hash per row (8 bytes), checked in buckets; only when two hashes
    match are the rows read again to compare their keys themselves.
    """
    buckets = [array("q") for _ in range(_BUCKETS)]
    for row in rows:
        digest = hash(canonical(key.of(row)))
        buckets[digest % _BUCKETS].append(digest)
    repeated: set[int] = set()
    for bucket in buckets:
        seen: set[int] = set()
        for digest in bucket:
            if digest in seen:
                repeated.add(digest)
            seen.add(digest)
    del buckets
    if not repeated:
        return None
    first_seen: dict[str, int] = {}
    for position, row in enumerate(rows, start=1):
        value = key.of(row)
        text = canonical(value)
        if hash(text) in repeated:
            if text in first_seen:
                return value, first_seen[text], position
            first_seen[text] = position
    return None  # only the hashes were equal
