"""What the command line writes: the answer file, the statistics line, the --json document.

Files named by ``--output`` are checked before anything runs (:func:`check_output_path`) and
written atomically (:func:`write_atomically`): a temporary file in the same directory, then a
rename, so an interruption never leaves half a file.
"""

from __future__ import annotations

import logging
import os
import secrets as random_names
import stat
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence, TextIO

import config
from errors import ExitCode, PipelineError, Terminated, UsageError
from runner import RunResult

logger = logging.getLogger(__name__)


class MaskedStream:
    """A text stream that hides secrets in everything written through it.

    It also holds at most one transient status line (the spinner's), drawn in place by
    :meth:`show_status`. Any other write erases that line first, so a warning logged while the
    spinner turns starts at the beginning of a line instead of after the spinner's text; the
    spinner draws itself again below it.
    """

    def __init__(self, stream: TextIO, secrets: Sequence[str] = ()) -> None:
        self._stream = stream
        self.secrets: list[str] = list(secrets)
        self._lock = threading.RLock()  # the spinner draws from its own thread
        self._status_width = 0  # characters of the status line on screen (0: none)

    def write(self, text: str) -> int:
        with self._lock:
            self._erase_status()
            return self._stream.write(config.mask_secrets(text, self.secrets))

    def show_status(self, text: str) -> None:
        """Draw ``text`` as the transient status line, in place of the previous one ('' erases it)."""
        with self._lock:
            if not text:
                self._erase_status()
            else:
                shown = config.mask_secrets(text, self.secrets)
                self._stream.write("\r" + shown + " " * max(0, self._status_width - len(shown)))
                self._status_width = len(shown)
            self._stream.flush()

    def _erase_status(self) -> None:
        if self._status_width:
            self._stream.write("\r" + " " * self._status_width + "\r")
            self._status_width = 0

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        """The underlying stream's descriptor (the terminal's width is read from it)."""
        return self._stream.fileno()


# --- files -------------------------------------------------------------------------------


def check_output_path(path: str) -> None:
    """Fail now, as a usage error, if ``--output FILE`` could not be written after the run.

    Raises UsageError when FILE is a directory, its directory does not exist (or is a file), or
    a file cannot be created there (not writable, a name too long, a read-only file system): the
    answer is written beside FILE through a temporary file, and creating one now proves it can be.
    An existing device or pipe (``/dev/stdout``) is written in place and needs no such check.
    """
    target = Path(path)
    try:
        info: os.stat_result | None = os.stat(target)
    except (FileNotFoundError, NotADirectoryError):
        info = None
    except OSError as exc:  # e.g. a name too long
        raise UsageError(f"--output {path} cannot be written: {exc.strerror or exc}.",
                         hint="Fix: choose another file name or directory.") from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise UsageError(f"--output {path} is a directory.",
                         hint=f"Fix: name a file, e.g. --output {target / 'answer.txt'}")
    if info is not None and not stat.S_ISREG(info.st_mode):
        return
    target = _real_target(target)
    directory = target.parent
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"--output {path}: {directory} is a file, not a directory.",
                         hint="Fix: choose a file in an existing directory.")
    if not directory.is_dir():
        raise UsageError(
            f"--output {path}: the directory {directory} does not exist.",
            hint=f"Fix: create it first (mkdir -p {directory}) or choose a file in an existing directory.",
        )
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UsageError(f"--output {path}: the directory {directory} is not writable.",
                         hint="Fix: choose a file in a directory you may write to.")
    _check_creatable(path, target)


def _check_creatable(path: str, target: Path) -> None:
    """Raise UsageError unless a file can be created beside ``target`` (a name too long for the file
    system fails earlier, when FILE is looked up)."""
    try:
        fd, tmp = _create_temporary(target)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UsageError(f"--output {path} cannot be written: {exc.strerror or exc}.",
                         hint="Fix: choose another file name or directory.") from None


def _real_target(target: Path) -> Path:
    """The file a link points to (replacing it keeps the link), else the path as given."""
    return Path(os.path.realpath(target)) if target.is_symlink() else target


def write_atomically(path: str, text: str) -> None:
    """Write UTF-8 text so that an interruption never leaves a half-written file.

    Replacing an existing file keeps that file's permission bits; a symbolic link keeps pointing
    at the file, which gets the new text. A new file gets the mode any program's new file gets
    (0666 less the umask, e.g. 0644), as with shell redirection. Raises OSError.
    """
    try:
        info: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        info = None
    if info is not None and not stat.S_ISREG(info.st_mode):
        # A device or pipe (/dev/stdout, /dev/null, a FIFO): renaming a file over it would
        # replace the device itself, so it is written in place.
        with open(path, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        return
    target = _real_target(Path(path))
    mode = stat.S_IMODE(info.st_mode) if info is not None else None
    fd, tmp = _create_temporary(target)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _create_temporary(target: Path) -> tuple[int, str]:
    """A new hidden file beside ``target``, created 0666 less the umask (the kernel applies it)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    # At most 200 bytes of the name: with the dot, the random part and ".tmp" it stays within the
    # 255 bytes file systems allow, whenever the target's own name does.
    stem = os.fsencode(target.name)[:200].decode(sys.getfilesystemencoding(), "ignore")
    for _ in range(100):
        tmp = str(target.parent / f".{stem}.{random_names.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


# --- statistics and the --json document ----------------------------------------------------


def _fmt_seconds(value: Any) -> str:
    return f"{value:.1f} s" if isinstance(value, (int, float)) else "?"


def format_stats(stats: Mapping[str, Any]) -> str:
    """One short human-readable line for stderr."""
    rows = f"rows {stats.get('rows_shown', 0):,}/{stats.get('rows_total', 0):,}"
    if stats.get("more_rows"):
        rows += "+"
    parts = [rows]
    if stats.get("prompt_chars") is not None:
        parts.append(f"prompt {stats['prompt_chars']:,} chars ~{stats.get('prompt_tokens_estimate', 0):,} tokens")
    if stats.get("protocol"):
        server = f" at {stats['server']}" if stats.get("server") else ""  # which of several servers answered
        parts.append(f"{stats['protocol']}:{stats.get('model') or '?'}{server}")
    if stats.get("wall_time") is not None:
        timing = f"time {_fmt_seconds(stats['wall_time'])}"
        if stats.get("generation_time") is not None:
            timing += f" (generation {_fmt_seconds(stats['generation_time'])})"
        parts.append(timing)
    # "~": the client counted or timed it, because the server did not say (GenerationStats.measured).
    measured = stats.get("measured") or ()
    mark = {key: "~" if key in measured else "" for key in ("generated_tokens", "tokens_per_second")}
    tokens = [f"{label} {mark.get(key, '')}{stats[key]:,}"
              for key, label in (("input_tokens", "in"), ("generated_tokens", "out")) if isinstance(stats.get(key), int)]
    if tokens:
        parts.append("tokens " + " / ".join(tokens))
    if isinstance(stats.get("tokens_per_second"), (int, float)):
        parts.append(f"{mark['tokens_per_second']}{stats['tokens_per_second']:.1f} tok/s")
    if measured:
        parts.append("~: measured by the client")
    return " | ".join(parts)


def truncation_hint(run: RunResult) -> str:
    """What a truncated single question tells the user: how many rows the model saw, and --all-rows."""
    total = f"{'at least ' if run.more_rows else ''}{run.rows_total:,}"
    return (f"Only {run.rows_shown:,} of {total} rows fit in the prompt, so the model saw only those. "
            "Add --all-rows to ask about every row (the rows are split over several calls and the answers "
            "combined into one).")


def json_document(run: RunResult | None, answer: str | None, error: dict[str, Any] | None = None,
                  complete: bool = True) -> dict[str, Any]:
    """The --json object for a run (None: the run never started, e.g. a usage error)."""
    stats = run.stats() if run is not None else {}
    prompt = run.prompt if run is not None else None
    return {
        "ok": error is None,
        "answer": answer,
        "complete": complete,
        "rows_shown": run.rows_shown if run is not None else 0,
        "rows_total": run.rows_total if run is not None else 0,
        "more_rows": bool(run and run.more_rows),
        "truncated": bool(run and run.truncated),
        "hint": truncation_hint(run) if run is not None and run.truncated else None,
        "prompt_chars": prompt.char_count if prompt else None,
        "prompt_tokens_estimate": prompt.estimated_tokens if prompt else None,
        "protocol": stats.get("protocol"),
        "model": stats.get("model"),
        "stats": {k: v for k, v in stats.items() if k not in ("prompt", "prompt_warnings")},
        "query": run.query if run is not None else None,
        "error": error,
    }


def exit_code_for(error: BaseException) -> ExitCode:
    """The process exit code for an exception: each error class carries its own."""
    if isinstance(error, (PipelineError, Terminated)):
        return ExitCode(error.exit_code)
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    return ExitCode.INTERNAL


def report_error(error: BaseException, err: TextIO, *, verbose: bool, kept: str = "") -> None:
    """Say on stderr (and in the log file) what stopped a run: a signal, or the error and its fix.

    ``kept``: a sentence on what was kept, said after an interruption.
    """
    if isinstance(error, KeyboardInterrupt):
        what = "Terminated" if isinstance(error, Terminated) else "Interrupted"
        err.write(f"\n{what}." + (f" {kept}" if kept else "") + "\n")
        logger.warning("%s by a signal", what, extra={"file_only": True})
        return
    assert isinstance(error, PipelineError)
    logger.error("%s: %s", error.code, error, exc_info=verbose, extra={"file_only": True})
    if verbose:
        traceback.print_exception(type(error), error, error.__traceback__, file=err)
    err.write(f"Error [{error.code}]: {error}\n")


def error_info(error: BaseException, secrets: Sequence[str]) -> dict[str, Any]:
    """The ``error`` object of the --json document, secrets masked."""
    if isinstance(error, Terminated):
        return {"code": "TERMINATED", "message": "Terminated by SIGTERM.", "hint": None}
    if not isinstance(error, PipelineError):
        return {"code": "INTERRUPTED", "message": "Interrupted (Ctrl-C).", "hint": None}
    return {
        "code": error.code,
        "message": config.mask_secrets(error.message, secrets),
        "hint": config.mask_secrets(error.hint, secrets) if error.hint else None,
    }
