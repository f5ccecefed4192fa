"""--per-row as a real process: killed with SIGKILL, or stopped with Ctrl-C, then run again.

The model server runs in the test process, so its request log shows every generation the
killed and the rerun processes asked for. Waits are for the results file to grow, with
generous limits; nothing asserts how fast anything was.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


from conftest import REPO_ROOT
from fake_ollama_server import FakeOllamaServer
from fake_server_base import prompt_text

SCRIPT = str(REPO_ROOT / "db_to_model_pipeline.py")
ROWS = 300
QUERY = f"SELECT g AS id, 'review number ' || g AS body FROM generate_series(1, {ROWS}) AS g"
ARGS = ["--per-row", "--query", QUERY, "--template", "#{row.id}# Sentiment of: {row.body}", "--output", "out.jsonl",
        "--concurrency", "3"]


def start(tmp_path: Path, test_db_url: str, server_url: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_", "DB_", "DATABASE", "PC_IP", "MODEL"))}
    # The fake Ollama server runs requests in parallel; the pool sends it 3 at once when told so.
    env.update(DATABASE_URL=test_db_url, API_BASE_URL=server_url + "#slots=3", LOG_FILE=str(tmp_path / "client.log"),
               PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, SCRIPT, *ARGS], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def complete_records(path: Path) -> list[dict]:
    """Every complete line's record (a line being written when the process died is not one)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]  # the part after the last newline is torn or empty
    return [json.loads(line) for line in lines if '"status"' in line]


def wait_for_rows(path: Path, count: int, proc: subprocess.Popen, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while len(complete_records(path)) < count:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "the results file did not grow"
        time.sleep(0.05)


def requested_rows(server) -> Counter:
    return Counter(int(re.match(r"#(\d+)#", prompt_text(r.json)).group(1))
                   for r in server.requests if r.method == "POST")


def test_sigkill_in_the_middle_then_a_rerun_finishes_without_asking_twice(tmp_path, test_db_url):
    out = tmp_path / "out.jsonl"
    with FakeOllamaServer(answer="positive", delay=0.02) as srv:
        proc = start(tmp_path, test_db_url, srv.base_url)
        wait_for_rows(out, 60, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        recorded = {r["key"] for r in complete_records(out)}
        asked_before = requested_rows(srv)
        assert 60 <= len(recorded) < ROWS
        rerun = start(tmp_path, test_db_url, srv.base_url)
        stdout, stderr = rerun.communicate(timeout=120)
        asked = requested_rows(srv)
    assert rerun.returncode == 0, stderr
    assert f"{len(recorded):,} of {ROWS} rows already done" in stderr
    records = complete_records(out)
    assert Counter(r["key"] for r in records) == Counter(range(1, ROWS + 1))  # each key exactly once
    assert {r["status"] for r in records} == {"ok"}
    assert all(asked[key] == 1 for key in recorded)  # a recorded row was never asked again
    in_flight = set(asked_before) - recorded
    assert len(in_flight) <= 3 and all(asked[key] <= 2 for key in in_flight)  # at most the rows in flight twice
    assert set(asked) == set(range(1, ROWS + 1))
    json.loads(out.read_text(encoding="utf-8").splitlines()[0])  # the job line survived


def test_ctrl_c_finishes_the_rows_in_flight_writes_the_summary_and_a_rerun_completes(tmp_path, test_db_url):
    out = tmp_path / "out.jsonl"
    with FakeOllamaServer(answer="positive", delay=0.05) as srv:
        proc = start(tmp_path, test_db_url, srv.base_url)
        wait_for_rows(out, 30, proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        asked_before = requested_rows(srv)
        recorded = [r["key"] for r in complete_records(out)]
        rerun = start(tmp_path, test_db_url, srv.base_url)
        _, rerun_stderr = rerun.communicate(timeout=120)
        asked = requested_rows(srv)
    assert proc.returncode == 130, stderr
    assert "Interrupted:" in stderr and "Rerun the same command to continue" in stderr
    assert re.search(r"Rows: \d+ ok, 0 failed, 0 skipped \(already done\), \d+ not done\.", stderr)
    assert "Traceback" not in stderr
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())  # every line is whole
    assert set(asked_before) == set(recorded)  # the rows in flight finished and were recorded
    assert rerun.returncode == 0, rerun_stderr
    final = complete_records(out)
    assert Counter(r["key"] for r in final) == Counter(range(1, ROWS + 1))
    assert all(count == 1 for count in asked.values())  # nothing was asked twice


def test_a_second_ctrl_c_stops_at_once_leaving_the_rows_in_flight_for_the_rerun(tmp_path, test_db_url):
    out = tmp_path / "out.jsonl"
    with FakeOllamaServer(answer="positive", delay=120) as srv:  # no answer comes while the test runs
        proc = start(tmp_path, test_db_url, srv.base_url)
        deadline = time.monotonic() + 60
        while srv.in_progress < 3:
            assert proc.poll() is None and time.monotonic() < deadline, "the rows were not sent"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)  # the first one is handled: it waits for the rows in flight
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)  # far sooner than the two minutes the rows would take
    assert proc.returncode == 130, stderr
    assert "Stopping: no new rows; waiting for the 3 row(s) in flight" in stderr
    assert f"Interrupted: 0 rows recorded, {ROWS} not done." in stderr and "Traceback" not in stderr
    assert complete_records(out) == [] and json.loads(out.read_text(encoding="utf-8"))["job"]


def test_sigterm_stops_at_once_with_143_and_keeps_what_was_recorded(tmp_path, test_db_url):
    out = tmp_path / "out.jsonl"
    with FakeOllamaServer(answer="positive", delay=0.05) as srv:
        proc = start(tmp_path, test_db_url, srv.base_url)
        wait_for_rows(out, 20, proc)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Terminated:" in stderr and "Rerun the same command to continue" in stderr and "Traceback" not in stderr
    records = complete_records(out)
    assert len(records) >= 20 and len({r["key"] for r in records}) == len(records)
    assert out.read_text(encoding="utf-8").endswith("\n")
