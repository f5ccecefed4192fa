"""What a long run shows on stderr while it works: a progress bar, plain progress lines, a spinner.

* On a terminal: a progress bar (done of total, rate, ETA, failures so far) drawn by ``tqdm``,
  imported only when a bar is shown; while waiting for a non-streamed answer, a spinner with the
  elapsed seconds.
* Not a terminal (a log file, a pipe, CI): a plain line every ``interval`` seconds and one at the
  end, so a job left running overnight still says how far it got; no spinner.
* Quiet (``-q``): nothing.

While a bar is drawn, log lines for the same stream (warnings from worker threads) and
:meth:`ProgressBar.note` lines are written above it: the bar is cleared, the line written, the
bar drawn again, so neither is left broken mid-line.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from typing import Any, Callable, TextIO

SPINNER_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``; under a minute: ``42s``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class ProgressBar:
    """Count finished items of a known (or unknown) total, with failures.

    Args:
        total: items planned, or None when unknown.
        unit: what is counted ("rows", "calls").
        stream: where to draw (stderr).
        quiet: show nothing.
        interval: seconds between plain lines when ``stream`` is not a terminal.
        label: a short prefix ("map", "rows").
        clock: injectable for tests.
    """

    def __init__(self, total: int | None, *, unit: str, stream: TextIO, quiet: bool = False,
                 interval: float = 30.0, label: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.unit = unit
        self.label = label
        self.done = 0
        self.failed = 0
        self._stream = stream
        self._quiet = quiet
        self._interval = interval
        self._clock = clock
        self._started = clock()
        self._last_line = self._started
        self._lock = threading.Lock()
        self._bar: Any = None
        if not quiet and _is_terminal(stream):
            from tqdm import tqdm  # only when a bar is drawn: it costs ~35 ms to import

            self._bar = tqdm(total=total, unit=f" {unit}", desc=label or None, file=stream,
                             dynamic_ncols=True, mininterval=0.2, smoothing=0.1)
        self._redirected: list[tuple[logging.StreamHandler, Any]] = []
        if self._bar is not None:
            above = _AboveTheBar(self, stream)
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.StreamHandler) and handler.stream is stream:
                    self._redirected.append((handler, handler.setStream(above)))

    def update(self, done: int = 1, failed: int = 0) -> None:
        """Record ``done`` more finished items, ``failed`` of which failed."""
        with self._lock:
            self.done += done
            self.failed += failed
            if self._bar is not None:
                if failed or self.failed:
                    self._bar.set_postfix_str(f"{self.failed:,} failed", refresh=False)
                self._bar.update(done)
            elif not self._quiet and self._clock() - self._last_line >= self._interval:
                self._write_line()

    def set_total(self, total: int) -> None:
        """Set the total once it is known (work that is planned while it runs)."""
        with self._lock:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
                self._bar.refresh()

    def status(self) -> str:
        """``rows 1,200/5,000 (24%), 35.2 rows/s, ETA 1m48s, 3 failed``."""
        elapsed = max(self._clock() - self._started, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label + ' ' if self.label else ''}{self.unit} {self.done:,}"
        if self.total:
            text += f"/{self.total:,} ({100 * self.done / self.total:.0f}%)"
        text += f", {rate:.1f} {self.unit}/s"
        if self.total and rate > 0 and self.done < self.total:
            text += f", ETA {format_duration((self.total - self.done) / rate)}"
        if self.failed:
            text += f", {self.failed:,} failed"
        return text

    def _write_line(self) -> None:
        self._last_line = self._clock()
        self._stream.write(self.status() + "\n")
        self._stream.flush()

    def note(self, message: str) -> None:
        """One line for the user (not with quiet): above the bar when one is drawn."""
        if self._quiet:
            return
        with self._lock:
            self._above(message + "\n")

    def _above(self, text: str) -> int:
        """Write ``text`` on its own lines above the bar (caller holds the lock)."""
        bar = self._bar
        if bar is not None:
            bar.clear()
        written = self._stream.write(text)
        self._stream.flush()
        if bar is not None:
            bar.refresh()
        return written

    def close(self) -> None:
        """Finish the bar, or write the last plain line."""
        for handler, stream in self._redirected:
            handler.setStream(stream)
        self._redirected = []
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            elif not self._quiet and self.done:
                self._write_line()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def terminal_columns(stream: TextIO) -> int:
    """The width of the terminal ``stream`` writes to (``COLUMNS``, else 80, when it cannot be read)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return shutil.get_terminal_size().columns


class _AboveTheBar:
    """The stream a log handler writes to while a bar is drawn: each line goes above the bar."""

    def __init__(self, bar: ProgressBar, stream: TextIO) -> None:
        self._bar = bar
        self._stream = stream

    def write(self, text: str) -> int:
        with self._bar._lock:
            return self._bar._above(text)

    def flush(self) -> None:
        self._stream.flush()


class Spinner:
    """``⠙ waiting for the answer from http://pc:8000 ... 12s`` on a terminal while a call runs.

    Use as a context manager around a blocking call. Draws nothing unless ``stream`` is a
    terminal and not ``quiet``; erases its line when done, so the answer starts on a clean line.
    The line is cut to the terminal's width: a wrapped line could not be redrawn in place. A
    stream with ``show_status`` (the command's stderr) draws the line itself, so that whatever
    else is written meanwhile (a logged warning) erases it first instead of following it.
    """

    def __init__(self, message: str, *, stream: TextIO, quiet: bool = False, interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.message = message
        self._stream = stream
        self._interval = interval
        self._clock = clock
        self._active = not quiet and _is_terminal(stream)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._width = 0
        self._columns = terminal_columns(stream) if self._active else 80

    def __enter__(self) -> Spinner:
        if self._active:
            self._thread = threading.Thread(target=self._spin, name="spinner", daemon=True)
            self._thread.start()
        return self

    def _spin(self) -> None:
        started = self._clock()
        frame = 0
        while not self._stop.wait(self._interval):
            text = f"{SPINNER_FRAMES[frame % len(SPINNER_FRAMES)]} {self.message} {format_duration(self._clock() - started)}"
            self._draw(text[: max(self._columns - 1, 1)])
            frame += 1

    def _draw(self, text: str) -> None:
        show_status = getattr(self._stream, "show_status", None)
        if show_status is not None:
            show_status(text)
            return
        if text or self._width:
            self._width = max(self._width, len(text))
            self._stream.write("\r" + text.ljust(self._width) + ("" if text else "\r"))
            self._stream.flush()

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._draw("")
