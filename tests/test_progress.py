"""progress.py: what long runs show on stderr."""

from __future__ import annotations

import io
import logging
import re
import threading
import time

import pytest

from cli_output import MaskedStream
from progress import SPINNER_FRAMES, ProgressBar, Spinner, format_duration


class Terminal(io.StringIO):
    """A text stream that says it is a terminal, as stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (42.4, "42s"), (75, "1m15s"), (3725, "1h02m")])
def test_durations_read_naturally(seconds, text):
    assert format_duration(seconds) == text


def test_plain_lines_when_not_a_terminal_say_rate_eta_and_failures():
    out, clock = io.StringIO(), Clock()
    bar = ProgressBar(5000, unit="rows", stream=out, interval=30, clock=clock)
    clock.now += 10
    bar.update(100)
    assert out.getvalue() == ""  # not yet: one line per interval
    clock.now += 24  # 34 s in, 1,200 rows done
    bar.update(1100, failed=3)
    line = out.getvalue().strip()
    assert line.startswith("rows 1,200/5,000 (24%)")
    assert "35.3 rows/s" in line and "ETA 1m48s" in line and "3 failed" in line
    bar.close()
    assert out.getvalue().count("\n") == 2  # and a final line


def test_quiet_shows_nothing_even_on_a_terminal():
    out = Terminal()
    with ProgressBar(10, unit="rows", stream=out, quiet=True) as bar:
        bar.update(10)
    with Spinner("waiting", stream=out, quiet=True, interval=0.01):
        time.sleep(0.05)
    assert out.getvalue() == ""


def test_a_terminal_gets_a_bar_with_the_failures():
    out = Terminal()
    with ProgressBar(4, unit="rows", stream=out) as bar:
        bar.update(2)
        bar.update(1, failed=1)
        bar.update(1)
    drawn = out.getvalue()
    assert "4/4" in drawn and "1 failed" in drawn


def test_spinner_shows_elapsed_seconds_on_a_terminal_and_erases_itself():
    out = Terminal()
    with Spinner("waiting for the answer", stream=out, interval=0.01):
        time.sleep(0.1)
    drawn = out.getvalue()
    assert "waiting for the answer 0s" in drawn
    assert drawn.endswith("\r")  # the line is blanked: the answer starts clean


def test_no_spinner_when_not_a_terminal():
    out = io.StringIO()
    with Spinner("waiting", stream=out, interval=0.01):
        time.sleep(0.05)
    assert out.getvalue() == ""


class Screen(io.StringIO):
    """A terminal's text: what was written, the lines it leaves (``\\r`` rewrites a line), frames drawn."""

    def __init__(self) -> None:
        super().__init__()
        self.frames = 0
        self._drawn = threading.Condition()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._drawn:
            self.frames += sum(text.count(frame) for frame in SPINNER_FRAMES)
            self._drawn.notify_all()
        return super().write(text)

    def wait_for_frames(self, count: int) -> None:
        with self._drawn:
            assert self._drawn.wait_for(lambda: self.frames >= count, timeout=10)

    def lines(self) -> list[str]:
        lines, line, column = [], [], 0
        for char in self.getvalue():
            if char == "\n":
                lines.append("".join(line).rstrip())
                line, column = [], 0
            elif char == "\r":
                column = 0
            else:
                line[column:column + 1] = [char]
                column += 1
        return lines + ["".join(line).rstrip()]


def test_a_warning_logged_while_the_spinner_turns_starts_a_line_of_its_own():
    screen = Screen()
    err = MaskedStream(screen)
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log = logging.getLogger("test_progress.spinner")
    log.addHandler(handler)
    log.propagate = False
    try:
        with Spinner("waiting for the answer", stream=err, interval=0.01):
            screen.wait_for_frames(1)
            log.warning("Connecting to http://pc:8000 failed; retry 1, in 0.5 s")
            screen.wait_for_frames(screen.frames + 1)  # drawn again, below the warning
    finally:
        log.removeHandler(handler)
    lines = screen.lines()
    assert "WARNING: Connecting to http://pc:8000 failed; retry 1, in 0.5 s" in lines
    assert not any(frame in line for line in lines for frame in SPINNER_FRAMES)  # erased before and after
    assert lines[-1] == ""


def test_the_spinner_fits_the_terminals_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "30")  # a stream without a descriptor: the width comes from COLUMNS
    out = Screen()
    with Spinner("waiting for the answer from http://192.168.0.10:8000 ...", stream=out, interval=0.01):
        out.wait_for_frames(2)
    drawn = [part for part in out.getvalue().split("\r") if part.strip()]
    assert drawn and all(len(part) <= 29 for part in drawn)  # a wrapped line could not be redrawn in place


def test_log_lines_and_notes_go_above_a_drawn_bar_not_into_it():
    out = Terminal()
    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with ProgressBar(10, unit="rows", stream=out) as bar:
            bar.update(3)
            logging.getLogger("worker").warning("server down")
            bar.note("Stopping: no new rows")
            bar.update(2)
        assert handler.stream is out  # given back when the bar is closed
    finally:
        root.removeHandler(handler)
    drawn = out.getvalue()
    # Each line starts on a cleared line (the bar erased first, "\r") and the bar comes back after it.
    assert re.search(r"\r *\rserver down\n\r *30%", drawn), drawn
    assert re.search(r"\r *\rStopping: no new rows\n\r *30%", drawn), drawn


def test_notes_are_plain_lines_without_a_terminal_and_nothing_when_quiet():
    out = io.StringIO()
    with ProgressBar(10, unit="rows", stream=out) as bar:
        bar.note("Stopping: no new rows")
    assert out.getvalue() == "Stopping: no new rows\n"
    quiet = Terminal()
    with ProgressBar(10, unit="rows", stream=quiet, quiet=True) as bar:
        bar.note("Stopping: no new rows")
    assert quiet.getvalue() == ""
