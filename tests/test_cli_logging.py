"""The shared log file: several real processes writing and rotating it at once lose nothing.

Each writer is a real process (rotation races are between processes, not threads): a small
script that logs numbered lines through cli_logging.SharedRotatingFileHandler, or the command
itself. The checks read every file back: each line present exactly once and whole, no file
past the size limit, and no backup beyond the count.
"""

from __future__ import annotations

import io
import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import cli_logging
import db_to_model_pipeline as pipeline
from cli_logging import LOG_FORMAT, SharedRotatingFileHandler
from conftest import REPO_ROOT, SETTING_NAMES

WRITER = r"""
import logging, sys
sys.path.insert(0, sys.argv[1])
from cli_logging import LOG_FORMAT, SharedRotatingFileHandler
path, max_bytes, backups, tag, count = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
handler = SharedRotatingFileHandler(path, max_bytes=max_bytes, backups=backups)
handler.setFormatter(logging.Formatter(LOG_FORMAT))
log = logging.getLogger("writer")
log.addHandler(handler)
log.setLevel(logging.INFO)
log.propagate = False
print("ready", flush=True)
sys.stdin.readline()  # every writer starts at the same moment
for i in range(count):
    log.info("line %s %05d %s", tag, i, "x" * 60)
handler.close()
"""
LINE = re.compile(r"^\S+ \S+ - pid (\d+) - writer - INFO - line (w\d) (\d{5}) x{60}$")


def run_writers(path: Path, writers: int, lines: int, max_bytes: int, backups: int) -> None:
    """Start the writers, release them together, wait for all of them."""
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(REPO_ROOT), str(path), str(max_bytes), str(backups),
                          f"w{n}", str(lines)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for n in range(writers)
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0


def log_files(path: Path) -> list[Path]:
    """The log file and its backups, oldest first."""
    backups = sorted(path.parent.glob(path.name + ".*"), key=lambda p: int(p.suffix[1:]), reverse=True)
    return backups + [path]


def prefill(path: Path, size: int) -> list[str]:
    """Old history in the log file, up to ``size`` bytes, as an earlier run would have left it."""
    lines, total = [], 0
    while total + 40 <= size:
        line = f"earlier history line {len(lines):08d} ........"
        lines.append(line)
        total += len(line) + 1
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    path.chmod(0o600)
    return lines


def test_concurrent_writers_near_the_rotation_point_lose_no_line(tmp_path):
    path = tmp_path / "shared.log"
    max_bytes, backups, writers, lines = 64 * 1024, 6, 6, 400  # ~6 rotations; every line fits the 7 files
    history = prefill(path, max_bytes - 300)
    run_writers(path, writers, lines, max_bytes, backups)

    files = log_files(path)
    assert [p.name for p in files] == [f"shared.log.{n}" for n in range(len(files) - 1, 0, -1)] + ["shared.log"]
    assert len(files) - 1 <= backups
    seen: dict[tuple[str, int], int] = {}
    kept_history = []
    for file in files:
        assert file.stat().st_size <= max_bytes, f"{file.name} grew past the limit"
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        for text in file.read_text(encoding="utf-8").splitlines():
            if text.startswith("earlier history"):
                kept_history.append(text)
                continue
            match = LINE.match(text)
            assert match, f"a torn or mixed line in {file.name}: {text[:80]!r}"
            key = (match.group(2), int(match.group(3)))
            seen[key] = seen.get(key, 0) + 1
    assert kept_history == history  # the earlier history survived, whole and in order
    expected = {(f"w{n}", i) for n in range(writers) for i in range(lines)}
    assert set(seen) == expected, f"{len(expected - set(seen))} lines lost"
    assert set(seen.values()) == {1}


def test_rotation_deletes_only_what_the_backup_count_says(tmp_path):
    path = tmp_path / "shared.log"
    max_bytes, backups, writers, lines = 32 * 1024, 2, 4, 400  # ~200 KB through 3 files of 32 KB
    run_writers(path, writers, lines, max_bytes, backups)

    files = log_files(path)
    assert [p.name for p in files] == ["shared.log.2", "shared.log.1", "shared.log"]
    kept: dict[str, list[int]] = {}
    for file in files[:-1]:  # a backup is only made from a full file
        assert max_bytes - 200 <= file.stat().st_size <= max_bytes
    for file in files:
        for text in file.read_text(encoding="utf-8").splitlines():
            match = LINE.match(text)
            assert match, text[:80]
            kept.setdefault(match.group(2), []).append(int(match.group(3)))
    # Writes are serialised, so what survives is the newest part of each writer's lines, in order.
    for numbers in kept.values():
        assert numbers == list(range(numbers[0], lines))


def test_concurrent_command_runs_share_the_log_file_at_its_rotation_point(test_db_url, tmp_path):
    log = tmp_path / "laptop_client.log"
    history = prefill(log, cli_logging.LOG_MAX_BYTES - 10)  # the first line of any run rotates it
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    env.update(DATABASE_URL=test_db_url, LOG_FILE=str(log), ENV_FILE=os.devnull)  # no .env beside the scripts
    procs = [
        subprocess.Popen([sys.executable, str(REPO_ROOT / "db_to_model_pipeline.py"), "--query",
                          f"SELECT {n} AS run", "--dry-run", "--quiet"], cwd=tmp_path, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for n in range(8)  # the eight runs
    ]
    for proc in procs:
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        proc.stderr.close()

    assert [p.name for p in log_files(log)] == ["laptop_client.log.1", "laptop_client.log"]  # one rotation
    assert log.with_name("laptop_client.log.1").read_text(encoding="utf-8").splitlines() == history
    text = log.read_text(encoding="utf-8")
    for proc in procs:  # every run's lines, told apart by their process id
        assert re.search(rf" - pid {proc.pid} - runner - INFO - Prompt built: 1 of 1 rows", text)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_the_command_creates_the_log_file_0600_with_the_pid_on_each_line(test_db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", test_db_url)
    previous = os.umask(0o022)  # a new file would be 0644 unless created 0600
    try:
        code = pipeline.main(["--query", "SELECT 1 AS x", "--dry-run"], stdin=io.StringIO(), stdout=io.StringIO(),
                             stderr=io.StringIO())
    finally:
        os.umask(previous)
    assert code == 0
    log = tmp_path / "laptop_client.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    lines = log.read_text(encoding="utf-8").splitlines()
    assert lines and all(f" - pid {os.getpid()} - " in line for line in lines)


def test_a_file_renamed_away_by_another_process_is_followed(tmp_path):
    path = tmp_path / "a.log"
    handler = SharedRotatingFileHandler(path, max_bytes=10_000, backups=1)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "%s", ("first",), None)
    handler.emit(record)
    path.rename(tmp_path / "a.log.1")  # as another process's rotation does
    record.args = ("second",)
    handler.emit(record)
    handler.close()
    assert (tmp_path / "a.log.1").read_text() == "first\n"
    assert path.read_text() == "second\n"


@pytest.mark.parametrize("backups", [0, 3])
def test_one_line_longer_than_the_limit_is_written_whole(tmp_path, backups):
    path = tmp_path / "b.log"
    handler = SharedRotatingFileHandler(path, max_bytes=100, backups=backups)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for text in ("short", "y" * 500, "after"):
        handler.emit(logging.LogRecord("t", logging.INFO, __file__, 1, text, None, None))
    handler.close()
    whole = "".join(p.read_text() for p in log_files(path))
    assert whole == "short\n" + "y" * 500 + "\nafter\n"
