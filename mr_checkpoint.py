"""Checkpoints of a question over every row: every answer obtained is kept, and a rerun reuses it.

Where: beside ``--output FILE`` as ``FILE.mapreduce.jsonl``; without ``--output``, in the cache
directory (:func:`cache_directory`: ``$XDG_CACHE_HOME/db_to_model_pipeline``, by default
``~/.cache/db_to_model_pipeline``) as ``mapreduce-<job fingerprint>.jsonl``. Files are created
readable by their owner only (answers describe the data), the cache directory likewise.

Format: JSON Lines, each record written whole and fsynced before the call counts as done
(:mod:`jsonl_log`), so a crash loses at most the calls still in flight. The first record
describes the job::

    {"type": "job", "version": 1, "fingerprint": "…", "parts": {"query": "…", …}, "created": "…"}

then one record per answered call, map or reduce::

    {"type": "answer", "key": "…", "stage": "map", "level": 0, "index": 3, "first_row": 3601,
     "last_row": 4800, "answer": "…", "stats": {…}, "attempts": 1, "at": "…"}

Reuse rule: a call's key (:func:`call_key`) is a hash of exactly what would be sent: the prompt,
the system prompt, the model, the answer length and the temperature. A call whose key is in the
file is not sent again; the recorded answer is used. The map prompts carry the rows and the
reduce prompts the answers below them, so changed data or a changed answer never reuses a stale
one. A file written for a different job (``--output`` reused with another query or template) is
moved aside to ``FILE.mapreduce.jsonl.old`` and a new one is started.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from job_identity import canonical_json, describe_changes
from jsonl_log import JsonlLog

logger = logging.getLogger(__name__)

VERSION = 1
CACHE_NAME = "db_to_model_pipeline"
SUFFIX = ".mapreduce.jsonl"


def cache_directory(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/db_to_model_pipeline``, else ``~/.cache/db_to_model_pipeline``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"  # the spec ignores relative paths
    return root / CACHE_NAME


def checkpoint_path(output: str | None, fingerprint: str, environ: Mapping[str, str] | None = None) -> Path:
    """``FILE.mapreduce.jsonl`` beside ``--output FILE``, else ``mapreduce-<fingerprint>.jsonl`` in the cache."""
    if output:
        return Path(output + SUFFIX)
    return cache_directory(environ) / f"mapreduce-{fingerprint}.jsonl"


def call_key(prompt: str, *, system_prompt: str | None, model: str | None, max_new_tokens: int,
             temperature: float) -> str:
    """The identity of one model call: a hash of everything that decides its answer."""
    request = {"prompt": prompt, "system_prompt": system_prompt, "model": model,
               "max_new_tokens": max_new_tokens, "temperature": temperature}
    return hashlib.sha256(canonical_json(request).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load_answers(path: Path, fingerprint: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None, str | None]:
    """``(answers by key, the job record, a problem)`` from an existing file; nothing when it is missing.

    Reads without changing the file: a torn last line (a crash in the middle of a write) is
    skipped here and cut off when the file is opened for appending. ``problem`` says why the
    file cannot be used for this job (another job's file, a damaged line); its answers are then
    not returned.
    """
    answers: dict[str, dict[str, Any]] = {}
    job: dict[str, Any] | None = None
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().split("\n")
    except FileNotFoundError:
        return answers, None, None
    except OSError as exc:
        return {}, None, f"it cannot be read ({exc.strerror or exc})"
    for number, line in enumerate(lines[:-1], start=1):  # the part after the last newline is torn or empty
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            return {}, job, f"line {number} is not valid JSON"
        if not isinstance(record, dict):
            return {}, job, f"line {number} is not a JSON object"
        if record.get("type") == "job" and job is None:
            job = record
        elif record.get("type") == "answer" and isinstance(record.get("answer"), str) and record.get("key"):
            answers[str(record["key"])] = record
    if job is None:
        return {}, None, "it has no job record" if any(line.strip() for line in lines) else None
    if job.get("fingerprint") != fingerprint:
        return {}, job, "it was written for a different job"
    return answers, job, None


class Checkpoint:
    """The answers of one job obtained so far, and the file new ones are appended to.

    Open with :meth:`open`. ``notice`` holds a sentence for the user when an existing file
    could not be used and was moved aside.
    """

    def __init__(self, path: Path, log: JsonlLog, answers: dict[str, dict[str, Any]], notice: str | None) -> None:
        self.path = path
        self._log = log
        self._answers = answers
        self.notice = notice
        self.loaded = len(answers)

    @classmethod
    def open(cls, path: Path, fingerprint: str, parts: Mapping[str, Any], *, fsync: bool = True) -> Checkpoint:
        """Load the answers in ``path`` (if it is this job's) and get ready to append; creates the file.

        Raises OSError when the file or its directory cannot be created.
        """
        answers, job, problem = load_answers(path, fingerprint)
        notice = None
        if problem and path.exists():
            aside = path.with_name(path.name + ".old")
            os.replace(path, aside)
            changes = describe_changes(job.get("parts") or {}, parts) if job and "different job" in problem else []
            notice = (f"The checkpoint {path} could not be reused: {problem}"
                      + (f" ({'; '.join(changes)})" if changes else "") + f". It was moved to {aside}.")
            logger.info("%s", notice)  # the command prints it
        _create_private(path)
        log = JsonlLog(path, fsync=fsync)
        if job is None or problem:
            log.append({"type": "job", "version": VERSION, "fingerprint": fingerprint, "parts": dict(parts),
                        "created": _now()})
        elif answers:
            logger.info("Checkpoint %s: %d answer(s) from an earlier run can be reused", path, len(answers))
        return cls(path, log, answers, notice)

    def get(self, key: str) -> dict[str, Any] | None:
        """The recorded answer for a call key, or None."""
        return self._answers.get(key)

    def record(self, record: Mapping[str, Any]) -> None:
        """Append one answer record (``key``, ``answer`` ...); durable when this returns."""
        entry = {"type": "answer", **record, "at": _now()}
        self._log.append(entry)
        self._answers[str(entry["key"])] = entry

    def close(self) -> None:
        self._log.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _create_private(path: Path) -> None:
    """Create the file (0600) and, for the cache, its directory (0700), unless they exist."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.close(fd)
