"""jsonl_log.py and job_identity.py: durable result lines and the job's identity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO_ROOT
from job_identity import describe_changes, fingerprint
from jsonl_log import JsonlLog, read_records, repair


def test_records_are_lines_jq_can_read(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlLog(path) as log:
        log.append({"key": 1, "answer": "긍정 😀", "status": "ok"})
        log.append({"key": 2, "answer": None, "status": "error"})
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["key"] for line in lines] == [1, 2]
    assert "긍정 😀" in lines[0]  # UTF-8, not \\u escapes


def test_a_torn_last_line_is_cut_before_the_next_append(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"key": 1}\n{"key": 2, "answer": "\xea\xb8')  # a crash mid-write, mid-character
    with JsonlLog(path) as log:
        log.append({"key": 3})
    assert [record["key"] for _, record in read_records(path)] == [1, 3]


def test_repair_leaves_a_whole_file_alone_and_empties_a_single_torn_line(tmp_path):
    whole, torn = tmp_path / "whole.jsonl", tmp_path / "torn.jsonl"
    whole.write_text('{"a": 1}\n', encoding="utf-8")
    torn.write_bytes(b'{"a": ' + b"x" * 100_000)  # longer than one read block
    assert repair(whole) == 0 and whole.read_text(encoding="utf-8") == '{"a": 1}\n'
    assert repair(torn) == 100_006 and torn.read_bytes() == b""


def test_a_bad_line_in_the_middle_is_named(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"a": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        list(read_records(path))


def test_threads_never_interleave_lines(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlLog(path, fsync=False) as log:
        def write(worker: int) -> None:
            for i in range(300):
                log.append({"worker": worker, "i": i, "text": "x" * (i % 50)})

        threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    records = [record for _, record in read_records(path)]
    assert len(records) == 2400
    assert {(r["worker"], r["i"]) for r in records} == {(w, i) for w in range(8) for i in range(300)}


WRITER = """
import sys
sys.path.insert(0, sys.argv[2])
from jsonl_log import JsonlLog
log = JsonlLog(sys.argv[1])
i = 0
while True:
    log.append({"i": i, "pad": "가" * 2000})
    print(i, flush=True)
    i += 1
"""


def test_sigkill_mid_run_loses_no_acknowledged_record(tmp_path):
    path = tmp_path / "out.jsonl"
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(REPO_ROOT)],
                             stdout=subprocess.PIPE, text=True)
    acknowledged = -1
    deadline = time.monotonic() + 20
    while acknowledged < 200 and time.monotonic() < deadline:
        acknowledged = int(child.stdout.readline())
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()
    with JsonlLog(path) as log:  # reopening repairs a torn last line, if the kill left one
        log.append({"i": "after"})
    records = [record for _, record in read_records(path)]
    numbers = [r["i"] for r in records[:-1]]
    assert numbers == list(range(len(numbers))) and len(numbers) > acknowledged
    assert records[-1] == {"i": "after"}


def test_fingerprint_is_stable_and_changes_are_described():
    job = {"query": "SELECT * FROM reviews", "template": "Classify: {row}", "params": {"a": 1, "b": 2}}
    same = {"params": {"b": 2, "a": 1}, "template": "Classify: {row}", "query": "SELECT * FROM reviews"}
    assert fingerprint(job) == fingerprint(same)
    changed = {**job, "template": "Rate: {row}", "schema": {"type": "object"}}
    assert fingerprint(changed) != fingerprint(job)
    assert describe_changes(job, changed) == [
        "template: 'Classify: {row}' -> 'Rate: {row}'",
        "schema: (not recorded) -> '{\"type\":\"object\"}'",
    ]


def test_a_change_deep_in_a_long_value_is_shown_where_it_is():
    template = "Classify the sentiment of this product review (rating {row.rating} of 5).\n" \
               "Give a score and up to five topics it mentions.\n\nReview: {row.body}\n"
    schema = {"type": "object", "properties": {"score": {"type": "number", "maximum": 1},
                                               "topics": {"type": "array", "maxItems": 5}}}
    wider = {**schema, "properties": {**schema["properties"], "topics": {"type": "array", "maxItems": 3},
                                      "lang": {"type": "string"}}}
    lines = describe_changes({"template": template, "schema": schema},
                             {"template": template.replace("five", "three"), "schema": wider})
    assert lines[0].startswith("template: '…") and "up to five topics" in lines[0].split(" -> ")[0]
    assert "up to three topics" in lines[0].split(" -> ")[1]
    assert lines[1:] == ["schema.properties.topics.maxItems: '5' -> '3'",
                         "schema.properties.lang: (none) -> '{\"type\":\"string\"}'"]
    many = {f"p{i}": i for i in range(10)}
    lines = describe_changes({"params": many}, {"params": {k: v + 1 for k, v in many.items()}})
    assert len(lines) == 6 and lines[-1] == "params: ... and 5 more changes"
