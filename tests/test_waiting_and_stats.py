"""Waiting and statistics: a spinner while a non-streamed answer is awaited, and the figures a
server did not report, measured by the client and marked as such.

CLI behaviour runs in-process (``main`` with a terminal-like stream, or the ``run`` fixture);
Ctrl-C needs a real process.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import db_to_model_pipeline as pipeline
from conftest import REPO_ROOT, reset_process_state
from fake_ollama_server import FakeOllamaServer
from fake_openai_server import FakeOpenAIServer
from fake_pc_server import FakePCServer
from progress import SPINNER_FRAMES
from test_pipeline import ANSWER, posts, run  # noqa: F401  (run: the fixture)


# --- the spinner ---------------------------------------------------------------------------


class Terminal(io.StringIO):
    """stdout and stderr of one terminal: what is written, and the screen it leaves (``\\r`` rewrites a line)."""

    def __init__(self, tty: bool = True) -> None:
        super().__init__()
        self.tty = tty
        self.spun = threading.Event()

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> int:
        if any(frame in text for frame in SPINNER_FRAMES):
            self.spun.set()
        return super().write(text)

    def screen(self) -> list[str]:
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
        return lines + (["".join(line).rstrip()] if line else [])


class HeldPCServer(FakePCServer):
    """A PC server that answers only once the spinner has been drawn (or after 10 s)."""

    def __init__(self, terminal: Terminal, **kwargs) -> None:
        super().__init__(**kwargs)
        self.terminal = terminal

    def route(self, h, method, path, body, raw):
        if method == "POST":
            self.terminal.spun.wait(10)
        super().route(h, method, path, body, raw)


def _run_on(terminal: Terminal, args: list[str], env: dict, monkeypatch) -> int:
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        code = pipeline.main(args, stdin=io.StringIO(), stdout=terminal, stderr=terminal)
    reset_process_state()
    return code


@pytest.mark.parametrize("stream_flag", ["--no-stream", "--stream"])  # the pc server never streams
def test_a_spinner_while_waiting_then_the_answer_on_a_clean_line(test_db_url, tmp_path, monkeypatch, stream_flag):
    terminal = Terminal()
    with HeldPCServer(terminal, answer=ANSWER) as srv:
        code = _run_on(terminal, ["--query", "SELECT 1 AS x", stream_flag],
                       {"DATABASE_URL": test_db_url, "LOG_FILE": "", "API_BASE_URL": srv.base_url}, monkeypatch)
    assert code == 0
    assert terminal.spun.is_set()
    assert re.search(rf"[{SPINNER_FRAMES}] waiting for the answer from {re.escape(srv.base_url)} \.\.\. \d+s",
                     terminal.getvalue())
    screen = terminal.screen()
    assert ANSWER in screen  # the answer is a line of its own: no spinner left before or on it
    assert not any(frame in line for line in screen for frame in SPINNER_FRAMES)
    assert screen[-1].startswith("rows 1/1")


@pytest.mark.parametrize(("tty", "quiet"), [(False, False), (True, True)], ids=["not-a-terminal", "quiet"])
def test_no_spinner_off_a_terminal_or_with_quiet(test_db_url, monkeypatch, tty, quiet):
    terminal = Terminal(tty=tty)
    with FakePCServer(answer=ANSWER, delay=0.5) as srv:
        code = _run_on(terminal, ["--query", "SELECT 1 AS x", "--no-stream"] + (["-q"] if quiet else []),
                       {"DATABASE_URL": test_db_url, "LOG_FILE": "", "API_BASE_URL": srv.base_url}, monkeypatch)
    assert code == 0
    assert "\r" not in terminal.getvalue() and not terminal.spun.is_set()
    assert ANSWER in terminal.getvalue()


# --- statistics from servers that report less ----------------------------------------------------


def test_a_stream_without_usage_is_counted_and_marked(run):
    # llama-cpp-python: no usage chunk in a stream, no timings.
    with FakeOpenAIServer(answer=ANSWER, owned_by="vllm", usage_in_stream=False) as srv:
        plain = run("--query", "SELECT 1 AS x", "--stream", env={"API_BASE_URL": srv.base_url})
        as_json = run("--query", "SELECT 1 AS x", "--stream", "--json", env={"API_BASE_URL": srv.base_url})
    pieces = len(ANSWER.split())
    assert plain.returncode == 0, plain.stderr
    stats_line = plain.stderr.strip().splitlines()[-1]
    assert f"out ~{pieces}" in stats_line and re.search(r"\| ~\d+\.\d tok/s", stats_line)
    assert "~: measured by the client" in stats_line
    stats = json.loads(as_json.stdout)["stats"]
    assert stats["generated_tokens"] == pieces and stats["tokens_per_second"] > 0
    assert stats["measured"] == ["generated_tokens", "tokens_per_second"] and stats["input_tokens"] is None


def test_a_server_that_reports_everything_is_not_marked(run):
    with FakeOpenAIServer(answer=ANSWER, owned_by="llamacpp") as srv:
        result = run("--query", "SELECT 1 AS x", "--stream", "--json", env={"API_BASE_URL": srv.base_url})
    stats = json.loads(result.stdout)["stats"]
    assert stats["measured"] == [] and stats["tokens_per_second"] == 40.0


def test_times_are_whole_milliseconds(run):
    with FakeOllamaServer(answer=ANSWER) as srv:
        result = run("--query", "SELECT 1 AS x", "--stream", "--json", env={"API_BASE_URL": srv.base_url})
    stats = json.loads(result.stdout)["stats"]
    times = {key: value for key, value in stats.items() if key.endswith("_time")}
    assert set(times) >= {"generation_time", "wall_time", "db_time", "total_time"}
    for key, value in times.items():
        assert value == round(value, 3), (key, value)


def _start(args: list[str], test_db_url: str, tmp_path: Path, url: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "PC_", "DB_", "MODEL_"))}
    env.update(DATABASE_URL=test_db_url, LOG_FILE="", API_BASE_URL=url, ENV_FILE=os.devnull)
    return subprocess.Popen([sys.executable, str(REPO_ROOT / "db_to_model_pipeline.py"), *args], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert condition(), "timed out"


def test_json_after_ctrl_c_while_waiting_keeps_protocol_and_model(test_db_url, tmp_path):
    with FakePCServer(delay=30) as srv:
        proc = _start(["--query", "SELECT 1 AS x", "--no-stream", "--json"], test_db_url, tmp_path, srv.base_url)
        _wait_for(lambda: posts(srv))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    doc = json.loads(out)
    assert doc["error"]["code"] == "INTERRUPTED" and doc["complete"] is False
    assert (doc["protocol"], doc["model"]) == ("pc", "phi4-quantized")
    assert doc["stats"]["server"] == srv.base_url


def test_json_after_ctrl_c_with_several_servers_names_the_one_asked(test_db_url, tmp_path):
    with FakePCServer(delay=30) as first, FakePCServer(delay=30) as second:
        proc = _start(["--query", "SELECT 1 AS x", "--no-stream", "--json"], test_db_url, tmp_path,
                      f"{first.base_url},{second.base_url}")
        _wait_for(lambda: posts(first) or posts(second))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    doc = json.loads(out)
    asked = first if posts(first) else second
    assert (doc["protocol"], doc["model"]) == ("pc", "phi4-quantized")
    assert doc["stats"]["server"] == asked.base_url


def test_json_after_ctrl_c_mid_stream_keeps_protocol_model_and_counts(test_db_url, tmp_path):
    answer = "one two three four five six seven eight nine ten eleven twelve"
    with FakeOpenAIServer(answer=answer, owned_by="vllm", usage_in_stream=False, piece_delay=0.3) as srv:
        proc = _start(["--query", "SELECT 1 AS x", "--stream", "--json"], test_db_url, tmp_path, srv.base_url)
        _wait_for(lambda: srv.pieces_sent >= 2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    doc = json.loads(out)
    assert (doc["protocol"], doc["model"]) == ("openai", "phi4")
    received = len(doc["answer"].split())
    assert doc["stats"]["generated_tokens"] == received and "generated_tokens" in doc["stats"]["measured"]
    assert doc["stats"]["wall_time"] == round(doc["stats"]["wall_time"], 3)
