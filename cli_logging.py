"""Logging for the command line: stderr, and a log file that several runs may share; secrets masked.

Only the command line configures logging; the library modules just log. Every line of the log
file carries the writing process's id, so concurrent runs can be told apart.

Several runs may write the same log file at once (a shell loop, a scheduler, batch jobs), and
any of them may find it full. The standard library's RotatingFileHandler rotates per process:
one process renames the file while the others keep appending to the renamed one and then
rotate again, so lines land in the wrong file or vanish with a backup deleted early.
:class:`SharedRotatingFileHandler` makes each write hold an exclusive ``flock`` on the current
log file. Under the lock it checks that its open file is still the one at the path (if another
process rotated it, it reopens the path and locks that), rotates when the line would push the
file past its limit, and appends the line. A rotation renames the backups (``.2`` -> ``.3``,
``.1`` -> ``.2``, the file -> ``.1``) while holding the lock on the file being renamed, so no
other writer appends to it or rotates it meanwhile; the oldest backup beyond the count is the
only one ever replaced. Without ``fcntl`` (Windows, where a file other processes hold open
cannot be renamed) the file is appended to and never rotated.
"""

from __future__ import annotations

import logging
import os
import traceback
from contextlib import contextmanager
from typing import Iterator, Sequence, TextIO

import config
from config import Settings

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOG_MAX_BYTES = 5 * 1024 * 1024
LOG_BACKUPS = 3
LOG_FORMAT = "%(asctime)s - pid %(process)d - %(name)s - %(levelname)s - %(message)s"


class SecretMaskingFilter(logging.Filter):
    """Replace known secrets, URL passwords and ``password=...`` in every record."""

    def __init__(self, secrets: Sequence[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def mask(self, text: str) -> str:
        return config.mask_secrets(text, self.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.mask(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.mask("".join(traceback.format_exception(*record.exc_info)))
        elif record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        record.exc_info = None
        return True


class SharedRotatingFileHandler(logging.Handler):
    """A size-rotated log file that several processes may write at once (see the module docstring).

    The file is created with mode 0600 (it may hold SQL and excerpts of prompts and answers).
    Raises OSError when the file cannot be opened.
    """

    def __init__(self, path: str | os.PathLike[str], max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS,
                 encoding: str = "utf-8") -> None:
        super().__init__()
        self.path = os.path.abspath(path)
        self.max_bytes = max_bytes if fcntl is not None and backups > 0 else 0  # 0: never rotate
        self.backups = backups
        self.encoding = encoding
        self._locking = fcntl is not None
        self._fd: int | None = self._open()

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        return os.open(self.path, flags, 0o600)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode(self.encoding, "backslashreplace")
            self._write(data)
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)

    def _write(self, data: bytes) -> None:
        if fcntl is None or not self._locking:
            self._append(data)
            return
        try:
            self._lock_current()
        except OSError:  # a file system without flock (some network mounts): append, never rotate
            self._locking, self.max_bytes = False, 0
            if self._fd is None:
                self._fd = self._open()
            self._append(data)
            return
        try:
            if self.max_bytes:
                size = os.fstat(self._fd).st_size
                if size and size + len(data) > self.max_bytes:
                    try:
                        self._rotate()
                    except OSError:  # e.g. a backup that may not be replaced: keep appending, retry next line
                        if self._fd is None:
                            raise
            self._append(data)
        finally:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _lock_current(self) -> None:
        """Hold the lock on the file now at the path, reopening first if it was rotated away."""
        while True:
            if self._fd is None:
                self._fd = self._open()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            mine = os.fstat(self._fd)
            try:
                current = os.stat(self.path)
            except FileNotFoundError:  # renamed by a rotation that has not created the new file yet
                current = None
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                return
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _rotate(self) -> None:
        """Shift the backups and start a new file; called holding the lock on the current file."""
        for index in range(self.backups - 1, 0, -1):
            source = f"{self.path}.{index}"
            if os.path.exists(source):
                os.replace(source, f"{self.path}.{index + 1}")  # replaces the oldest: the policy's only deletion
        os.replace(self.path, f"{self.path}.1")
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        self._lock_current()  # creates the new file (or takes the one another writer just created)

    def _append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def close(self) -> None:
        self.acquire()
        try:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        finally:
            self.release()
        super().close()


class _NotForConsole(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


def setup_logging(settings: Settings | None, verbose: bool, quiet: bool, stderr: TextIO) -> None:
    """Console (stderr) and the shared log file, both masking secrets. Only the CLI calls this.

    Without settings (before they are loaded) only the console handler is set up.
    """
    root = logging.getLogger()
    remove_log_handlers()
    masking = SecretMaskingFilter(settings.secrets() if settings else [])
    console = logging.StreamHandler(stderr)
    console.setLevel(logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    console.addFilter(_NotForConsole())
    console.addFilter(masking)
    _add(root, console)
    level = logging.DEBUG if verbose else logging.WARNING
    if settings and settings.log_file:
        try:
            file_handler = SharedRotatingFileHandler(settings.log_file)
        except OSError as exc:
            logger.warning("Cannot write the log file %s (%s); logging to the console only", settings.log_file,
                           exc.strerror)
        else:
            file_handler.setLevel(logging.DEBUG if verbose else getattr(logging, settings.log_level))
            file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
            file_handler.addFilter(masking)
            _add(root, file_handler)
            level = min(level, file_handler.level)
    root.setLevel(level)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # http_transport reports retries in its own words


def _add(root: logging.Logger, handler: logging.Handler) -> None:
    handler._pipeline_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)


def remove_log_handlers() -> None:
    """Remove (and close) the handlers setup_logging added; leave anyone else's alone."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_pipeline_handler", False):
            root.removeHandler(handler)
            handler.close()


@contextmanager
def command_logging(verbose: bool, quiet: bool, stderr: TextIO) -> Iterator[None]:
    """Console logging for one command; afterwards our handlers are gone and the root level restored."""
    root = logging.getLogger()
    level = root.level
    setup_logging(None, verbose, quiet, stderr)  # console only, until the settings name the log file
    try:
        yield
    finally:
        remove_log_handlers()
        root.setLevel(level)
