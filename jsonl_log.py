"""An append-only JSON Lines file that a crash cannot corrupt, for results and checkpoints.

Each record is one line of UTF-8 JSON written whole, flushed and ``fsync``-ed before
:meth:`JsonlLog.append` returns, so a record the caller was told about survives a crash, a
Ctrl-C or a power cut. A crash in the middle of a write leaves at most one partial last line;
opening the file again cuts it off (at the last newline) before anything is appended, so the
next record never glues onto a torn one. ``jq`` reads the file as it is.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import IO, Any, Iterator

logger = logging.getLogger(__name__)


def repair(path: str | os.PathLike[str]) -> int:
    """Cut a partial last line (a crash mid-write) off ``path``; return how many bytes were cut."""
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return 0
        # Walk back to the last newline, in blocks.
        end = size
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            block = handle.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
    logger.warning("Removed an incomplete last line (%d bytes) from %s, left by an interrupted run",
                   size - keep, path)
    return size - keep


def read_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each JSON object line of ``path``.

    Raises ValueError naming the line for a line that is not a JSON object (other than a torn
    last line, which :func:`repair` removes first).
    """
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: a JSON {type(record).__name__}, not an object")
            yield number, record


class JsonlLog:
    """Append records to ``path`` durably, from any thread.

    Opening repairs a torn last line and creates the file (and its directory's entry, fsynced)
    when missing. ``fsync=False`` trades the power-cut guarantee for speed (tests, benchmarks).
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = Path(path)
        self._fsync = fsync
        self._lock = threading.Lock()
        existed = self.path.exists()
        if existed:
            repair(self.path)
        self._handle: IO[str] | None = open(self.path, "a", encoding="utf-8", newline="\n")
        if not existed and fsync:
            _fsync_directory(self.path.parent)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line; durable when this returns."""
        line = json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":")) + "\n"
        with self._lock:
            if self._handle is None:
                raise ValueError(f"{self.path} is closed")
            self._handle.write(line)
            self._handle.flush()
            if self._fsync:
                os.fsync(self._handle.fileno())

    def sync(self) -> None:
        """Make every record appended so far durable (for a log opened with ``fsync=False``).

        Such a log is still crash-safe for a killed process (each record is flushed to the
        operating system as it is appended); ``sync`` adds the power-cut guarantee in one
        ``fsync`` for many records, where one per record would cost more than the record.
        """
        with self._lock:
            if self._handle is not None:
                os.fsync(self._handle.fileno())

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None

    def __enter__(self) -> JsonlLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _fsync_directory(directory: Path) -> None:
    """Make a new file's directory entry durable too (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
