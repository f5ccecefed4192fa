"""--output beyond the plain file: names the file system refuses, devices and pipes, links, and a
file that can no longer be written when the answer arrives. None of them is reported as a bug."""

from __future__ import annotations

import os
import shutil
import stat

from fake_pc_server import FakePCServer
from test_pipeline import ANSWER, posts, run  # noqa: F401  (run: the fixture)


def test_a_file_where_the_directory_should_be_is_a_usage_error_before_anything_runs(run, tmp_path):
    (tmp_path / "notes").write_text("a file", encoding="utf-8")
    with FakePCServer(answer=ANSWER) as srv:
        result = run("--query", "SELECT 1 AS x", "--output", "notes/answer.txt", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 2, result.stderr
    assert "Error [USAGE_ERROR]: --output notes/answer.txt: notes is a file, not a directory." in result.stderr
    assert srv.requests == []


def test_a_name_too_long_for_the_file_system_is_a_usage_error_before_anything_runs(run, tmp_path):
    name = "답" * 90 + ".txt"  # 274 bytes in UTF-8: over the 255 most file systems allow
    with FakePCServer(answer=ANSWER) as srv:
        result = run("--query", "SELECT 1 AS x", "--output", name, env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 2, result.stderr
    assert "Error [USAGE_ERROR]: --output" in result.stderr and "This is a bug" not in result.stderr
    assert "cannot be written: File name too long." in result.stderr
    assert srv.requests == []


def test_a_long_name_that_fits_is_written(run, tmp_path):
    name = "a" * 250 + ".txt"  # 254 bytes: allowed, though its temporary sibling's name would not be
    with FakePCServer(answer=ANSWER) as srv:
        result = run("--query", "SELECT 1 AS x", "--output", name, env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / name).read_text(encoding="utf-8") == ANSWER


def test_a_pipe_is_written_through_not_replaced_by_a_file(run, tmp_path):
    # /dev/stdout, /dev/null or a FIFO: renaming a file over one replaced the device itself.
    fifo = tmp_path / "answer.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with FakePCServer(answer=ANSWER) as srv:
            result = run("--query", "SELECT 1 AS x", "--output", str(fifo), env={"API_BASE_URL": srv.base_url})
        received = os.read(reader, 65536).decode("utf-8")
    finally:
        os.close(reader)
    assert result.returncode == 0, result.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert received == ANSWER and result.stdout == ANSWER + "\n"


def test_a_link_keeps_pointing_at_its_file_which_gets_the_answer_and_keeps_its_mode(run, tmp_path):
    (tmp_path / "kept").mkdir()
    real = tmp_path / "kept" / "answer.md"
    real.write_text("old", encoding="utf-8")
    real.chmod(0o640)
    (tmp_path / "latest.md").symlink_to(real)
    with FakePCServer(answer=ANSWER) as srv:
        result = run("--query", "SELECT 1 AS x", "--output", "latest.md", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "latest.md").is_symlink() and os.readlink(tmp_path / "latest.md") == str(real)
    assert real.read_text(encoding="utf-8") == ANSWER and stat.S_IMODE(real.stat().st_mode) == 0o640
    assert not list((tmp_path / "kept").glob(".*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_an_output_that_fails_when_the_answer_arrives_is_reported_with_exit_2_not_as_a_bug(run, tmp_path):
    out_dir = tmp_path / "results"
    out_dir.mkdir()

    def answer_after_the_directory_went(prompt: str) -> str:
        shutil.rmtree(out_dir)  # e.g. a disk unmounted while the model was generating
        return ANSWER

    with FakePCServer(answer_for=answer_after_the_directory_went) as srv:
        result = run("--query", "SELECT 1 AS x", "--output", "results/answer.txt", "--no-stream",
                     env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 2, result.stderr
    assert result.stdout == ANSWER + "\n"  # the answer is not lost, and printed once
    assert "Error [USAGE_ERROR]: could not write --output results/answer.txt: No such file or directory" \
        in result.stderr
    assert "This is a bug" not in result.stderr and "rows 1/1" in result.stderr
    assert len(posts(srv)) == 1
