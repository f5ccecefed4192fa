"""Where per-row results go, and how a rerun continues: the JSON Lines file, stdout, CSV, the table.

**Records.** One JSON object per finished row (:func:`row_record`): ``key``, ``status`` (``ok``,
``error``, ``invalid``, ``truncated``), ``answer``, ``parsed`` (with ``--schema``), ``error_code``
and ``error``, ``server``, ``attempts``, ``input_tokens``, ``output_tokens``, ``seconds``,
``finish_reason`` and ``job`` (the job's fingerprint).

**The results file** (``--output FILE.jsonl``) starts with one line describing the job
(``{"job": ..., "parts": {...}, "key_columns": [...], ...}``; rows are the lines that have a
``status``: ``jq 'select(.status)'``), then one line per finished row, appended as each row
finishes and flushed at once, so a killed process loses at most the line it was writing; the
file is ``fsync``-ed every half second and at the end (a power cut loses at most that). Without
``--output`` the row lines go to stdout (no job line). ``--output FILE.csv`` keeps the JSON
Lines file beside it (``FILE.jsonl``, the one a rerun continues) and writes the CSV from it at
the end of every run: the last record of each key, key columns first, then ``status``, the
answer (or one column per top-level schema property) and the error.

**Resume.** Opening the same file again continues the job: a torn last line is cut off,
keys whose last record is ``ok`` are done, every other key is sent again. A file written by a
different job (another query, template, model ...: the fingerprint differs) is refused with
what changed, unless ``restart``: the old file is then renamed aside
(``FILE.jsonl.previous-YYYYmmdd-HHMMSS``) and a new one begun. The results table
(:mod:`results_table`) resumes the same way; with both, a key is done when either store has
it ok, and rows ok only in the file are copied into the table before the run starts.
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, TextIO

from errors import JobChanged, UsageError
from job_identity import describe_changes, fingerprint
from jsonl_log import JsonlLog
from row_keys import RowKey, canonical

logger = logging.getLogger(__name__)

STATUSES = ("ok", "error", "invalid", "truncated")
FILE_FORMAT = "db_to_model_pipeline per-row results, version 1"
#: Seconds between two fsyncs of the results file while rows keep arriving.
SYNC_INTERVAL = 0.5
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class Job:
    """What makes two runs the same job: its parts, and their fingerprint."""

    parts: dict[str, Any]
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not self.fingerprint:
            object.__setattr__(self, "fingerprint", fingerprint(self.parts))


def row_record(key: Any, status: str, job: str, *, answer: str | None = None, parsed: Any = None,
               schema: bool = False, error_code: str | None = None, error: str | None = None,
               server: str | None = None, attempts: int = 0, input_tokens: int | None = None,
               output_tokens: int | None = None, seconds: float | None = None,
               finish_reason: str | None = None) -> dict[str, Any]:
    """One row's result, as written to the file, stdout and the table."""
    record: dict[str, Any] = {"key": key, "status": status, "answer": answer}
    if schema:
        record["parsed"] = parsed
    record.update(error_code=error_code, error=error, server=server, attempts=attempts, input_tokens=input_tokens,
                  output_tokens=output_tokens, seconds=None if seconds is None else round(seconds, 4),
                  finish_reason=finish_reason, job=job)
    return record


@dataclass
class Resume:
    """What earlier runs of this job left: the keys done (canonical text) and how many failed."""

    done: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    sources: list[str] = field(default_factory=list)
    copied_to_table: int = 0
    seconds_total: float = 0.0  # time of the earlier ok answers (for --dry-run's estimate)
    seconds_count: int = 0


class TableStore(Protocol):
    """What the ledger needs from the results table (:class:`results_table.ResultsTable`)."""

    name: str

    def check(self, job: Job) -> None: ...

    def open(self, job: Job, restart: bool) -> set[str]: ...

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def read_results(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each complete line; a torn last line (no newline) is skipped.

    Raises UsageError naming the line when a complete line is not a JSON object.
    """
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.endswith("\n") or not line.strip():
                continue  # a line a killed run was writing: cut off when the file is opened for writing
            try:
                record = json.loads(line)
            except ValueError as exc:
                record = exc
            if not isinstance(record, dict):
                raise UsageError(f"{path}, line {number}, is not a JSON object: the results file is damaged.",
                                 hint=f"Fix: delete that line (resume then sends its row again), or start over "
                                 f"with --restart (the file is kept as {path.name}.previous-...).")
            yield number, record


class ResultLedger:
    """One run's results: appended to a file (or stdout), mirrored to a table, exported to CSV.

    Args:
        job: the job (its fingerprint goes into every record).
        output: ``--output`` (``.csv``: the JSON Lines file is the same name with ``.jsonl``), or None
            for stdout.
        stdout: where the lines go without ``output``.
        table: the results table, or None.
        restart: set aside results of a different job instead of refusing.
        csv_fields: the answer's columns in the CSV (schema properties; empty: ``answer``).
        fsync: sync the file every ``SYNC_INTERVAL`` seconds and at the end (off only in benchmarks).
    """

    def __init__(self, job: Job, *, output: str | None, stdout: TextIO, table: TableStore | None = None,
                 restart: bool = False, csv_fields: list[str] | None = None, fsync: bool = True) -> None:
        self.job = job
        self.table = table
        self.restart = restart
        self.csv_path: Path | None = None
        self.path: Path | None = None
        if output:
            target = Path(output)
            if target.suffix.lower() == ".csv":
                self.csv_path, self.path = target, target.with_suffix(".jsonl")
            else:
                self.path = target
        self._stdout = stdout
        self._csv_fields = list(csv_fields or [])
        self._fsync = fsync
        self._log: JsonlLog | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._dirty = False
        self._last_sync = time.monotonic()
        self._key: RowKey | None = None
        self.set_aside: Path | None = None

    # --- before the run ---

    def _header(self) -> dict[str, Any] | None:
        """The job line of an existing, non-empty results file (None: no file, or empty)."""
        if self.path is None or not self.path.exists() or self.path.stat().st_size == 0:
            return None
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            first = handle.readline()
        try:
            record = json.loads(first)
        except ValueError:
            record = None
        if isinstance(record, dict) and "job" in record and "parts" in record:
            return record
        if not first.endswith("\n") and first.startswith("{"):
            return None  # a run killed while writing its very first line
        raise UsageError(f"{self.path} exists but is not a per-row results file of this tool.",
                         hint="Fix: choose another --output, or pass --restart to set it aside and start over.")

    def check(self) -> None:
        """Refuse (JobChanged) to continue results of a different job, before anything runs."""
        header = None if self.restart else self._header()
        if header is not None and header.get("job") != self.job.fingerprint:
            raise self._changed(f"--output {self.path} holds the results of a different job", header.get("parts", {}),
                                f"or add --restart to start over ({self.path} is then kept as "
                                f"{self.path.name}.previous-...)")
        if self.table is not None and not self.restart:
            self.table.check(self.job)

    def _changed(self, what: str, before: dict[str, Any], restart_hint: str) -> JobChanged:
        changes = describe_changes(before, self.job.parts) or ["(the fingerprint differs)"]
        return JobChanged(
            f"{what}, so this run would not continue it. What changed:\n  " + "\n  ".join(changes),
            hint=f"Fix: run the same command as before to continue that job, choose another --output, {restart_hint}.",
        )

    def peek(self) -> Resume:
        """What earlier runs left in the file, without changing anything (for --dry-run)."""
        resume = Resume()
        header = self._header() if not self.restart else None
        if header is not None and header.get("job") == self.job.fingerprint:
            self._load_file(resume, None)
        return resume

    def open(self, key: RowKey) -> Resume:
        """Load what earlier runs left, set aside another job's file (restart), start writing."""
        self._key = key
        resume = Resume()
        table_done = self.table.open(self.job, self.restart) if self.table is not None else set()
        if table_done:
            resume.sources.append(f"table {self.table.name}")  # type: ignore[union-attr]
        if self.path is not None:
            header = self._header() if not self.restart else None
            if self.restart and self.path.exists() and self.path.stat().st_size:
                self._set_aside()  # another job's results, or this job's to be redone: kept, not lost
            elif header is not None and header.get("job") != self.job.fingerprint:
                raise self._changed(f"--output {self.path} holds the results of a different job",
                                    header.get("parts", {}), "or add --restart to start over")
            if header is not None:
                self._load_file(resume, table_done)
            self._log = JsonlLog(self.path, fsync=False)
            if header is None:
                self._log.append({"job": self.job.fingerprint, "format": FILE_FORMAT,
                                  "key_columns": list(key.columns) or None, "key": key.describe(),
                                  "parts": self.job.parts, "started": _now()})
                self._log.sync()
        resume.failed -= table_done
        resume.done |= table_done
        return resume

    def _load_file(self, resume: Resume, table_done: set[str] | None) -> None:
        assert self.path is not None
        rows = 0
        for _, record in read_results(self.path):
            if "status" not in record or "key" not in record:
                continue
            rows += 1
            text = canonical(record["key"])
            if record["status"] == "ok":
                resume.done.add(text)
                resume.failed.discard(text)
                if isinstance(record.get("seconds"), (int, float)):
                    resume.seconds_total += record["seconds"]
                    resume.seconds_count += 1
                if table_done is not None and self.table is not None and text not in table_done:
                    self.table.write(record)  # ok only in the file: copy it into the table
                    resume.copied_to_table += 1
            else:
                resume.done.discard(text)
                resume.failed.add(text)
        if rows:
            resume.sources.append(str(self.path))

    def _set_aside(self) -> None:
        assert self.path is not None
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.previous-{stamp}")
        suffix = 1
        while target.exists():
            suffix += 1
            target = self.path.with_name(f"{self.path.name}.previous-{stamp}-{suffix}")
        os.replace(self.path, target)
        self.set_aside = target
        logger.warning("--restart: the earlier results were kept as %s", target)

    # --- during the run ---

    def write(self, record: dict[str, Any]) -> None:
        """Record one finished row (thread-safe); after close() records are dropped (an abandoned row)."""
        if self._closed:
            logger.info("Result for %s arrived after the run ended; not recorded", record.get("key"))
            return
        if self._log is not None:
            try:
                self._log.append(record)
            except ValueError:  # closed meanwhile: the run ended while this row was in flight
                logger.info("Result for %s arrived after the run ended; not recorded", record.get("key"))
                return
            self._dirty = True
        else:
            line = json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":")) + "\n"
            with self._lock:
                self._stdout.write(line)
                self._stdout.flush()
        if self.table is not None:
            self.table.write(record)

    def tick(self) -> None:
        """Called now and then by the run: fsync the file if rows arrived since the last sync."""
        if self._dirty and self._fsync and time.monotonic() - self._last_sync >= SYNC_INTERVAL:
            self.sync()

    def sync(self) -> None:
        if self._log is not None and self._fsync:
            self._dirty = False
            self._last_sync = time.monotonic()
            self._log.sync()

    def close(self) -> list[str]:
        """Make everything durable, write the CSV, close the table; return the files written."""
        if self._closed:
            return []
        self._closed = True
        written: list[str] = []
        if self._log is not None:
            self.sync()
            self._log.close()
            written.append(str(self.path))
            if self.csv_path is not None and self._key is not None:
                export_csv(self.path, self.csv_path, self._key, self._csv_fields)  # type: ignore[arg-type]
                written.append(str(self.csv_path))
        if self.table is not None:
            self.table.close()
        return written


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- CSV export ---------------------------------------------------------------------------


def _cell(value: Any) -> str:
    """A CSV cell: text as is (a leading = + - @ neutralised), JSON for objects, empty for null."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    # A spreadsheet runs a cell starting with = + - @ as a formula; a model's answer (or a review
    # quoted in it) must not. Numbers such as -3 stay numbers.
    if text.startswith(_FORMULA_START) and not _is_number(text):
        return "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def export_csv(jsonl: Path, target: Path, key: RowKey, fields: list[str]) -> int:
    """Write the last record of each key in ``jsonl`` to ``target`` (UTF-8 with BOM); return the rows.

    The BOM makes Excel read Korean text as UTF-8. The file is replaced atomically.
    """
    last: dict[str, int] = {}
    for number, record in read_results(jsonl):
        if "status" in record and "key" in record:
            last[canonical(record["key"])] = number
    wanted = set(last.values())
    del last
    header = key.csv_columns + ["status"] + (fields or ["answer"]) + ["error"]
    tmp = target.with_name(f".{target.name}.tmp")
    rows = 0
    with open(tmp, "w", encoding="utf-8-sig", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for number, record in read_results(jsonl):
            if number not in wanted:
                continue
            parsed = record.get("parsed") if isinstance(record.get("parsed"), dict) else {}
            answer = [parsed.get(name) for name in fields] if fields else [record.get("answer")]
            values = key.csv_values(record["key"]) + [record.get("status")] + answer + [record.get("error")]
            writer.writerow([_cell(v) for v in values])
            rows += 1
    os.replace(tmp, target)
    return rows
