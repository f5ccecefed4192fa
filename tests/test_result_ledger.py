"""row_keys.py and result_ledger.py: keys, duplicates, the results file, resume, restart, CSV."""

from __future__ import annotations

import csv
import datetime
import decimal
import io
import json
import uuid

import pytest

from errors import JobChanged, UsageError
from result_ledger import Job, ResultLedger, export_csv, read_results, row_record
from row_keys import RowKey, canonical, choose_key, find_duplicate, json_safe

JOB = Job({"mode": "per-row", "query": "SELECT * FROM reviews", "template": "Classify {row.body}"})


def record(key, status="ok", answer="positive", **more):
    return row_record(key, status, JOB.fingerprint, answer=answer, **more)


# --- keys -----------------------------------------------------------------------------------


def test_key_defaults_to_id_else_the_row_hash():
    assert choose_key(["id", "body"], None) == RowKey(("id",))
    hashed = choose_key(["name", "body"], None)
    assert hashed.hashed and hashed.describe() == "a hash of each row's values"
    row = {"name": "a", "body": "b"}
    assert hashed.of(row) == hashed.of(dict(row)) and len(hashed.of(row)) == 16
    assert hashed.of(row) != hashed.of({"name": "a", "body": "c"})


def test_named_keys_and_their_errors():
    key = choose_key(["order_id", "product_id", "qty"], "order_id, product_id")
    assert key.of({"order_id": 1, "product_id": 7, "qty": 2}) == {"order_id": 1, "product_id": 7}
    assert key.show({"order_id": 1, "product_id": 7}) == "order_id=1, product_id=7"
    with pytest.raises(UsageError) as info:
        choose_key(["id", "body"], "ID")
    assert "ID" in info.value.message and "id, body" in info.value.hint
    with pytest.raises(UsageError, match="twice"):
        choose_key(["id"], "id,id")


def test_keys_read_back_from_json_compare_equal():
    values = [17, "A-17", None, 1.5, decimal.Decimal("12.50"), datetime.date(2024, 5, 1), uuid.UUID(int=5),
              b"\xde\xad", {"a": [1, 2]}]
    for value in values:
        key = json_safe(value)
        assert canonical(json.loads(json.dumps(key))) == canonical(key), value
    assert json_safe(decimal.Decimal("12.50")) == "12.50" and json_safe(b"\xde\xad") == "\\xdead"


def test_duplicates_are_found_with_their_rows():
    rows = [{"id": i, "body": "x"} for i in range(1, 3001)] + [{"id": 1500, "body": "again"}]
    assert find_duplicate(rows, RowKey(("id",))) == (1500, 1500, 3001)
    assert find_duplicate(rows[:3000], RowKey(("id",))) is None
    assert find_duplicate([{"a": 1}, {"a": 1}], RowKey(())) == (RowKey(()).of({"a": 1}), 1, 2)


# --- the results file ---------------------------------------------------------------------


def open_ledger(path, job=JOB, key=RowKey(("id",)), **kwargs):
    ledger = ResultLedger(job, output=str(path), stdout=io.StringIO(), **kwargs)
    ledger.check()
    return ledger, ledger.open(key)


def test_a_new_file_starts_with_the_job_then_one_line_per_row(tmp_path):
    path = tmp_path / "out.jsonl"
    ledger, resume = open_ledger(path)
    assert resume.done == set() and resume.sources == []
    ledger.write(record(1))
    ledger.write(record(2, "error", None, error_code="TIMEOUT_ERROR", error="too slow"))
    assert ledger.close() == [str(path)]
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["job"] == JOB.fingerprint and lines[0]["parts"] == JOB.parts and lines[0]["key_columns"] == ["id"]
    assert [(r["key"], r["status"]) for r in lines[1:]] == [(1, "ok"), (2, "error")]
    assert set(lines[1]) == {"key", "status", "answer", "error_code", "error", "server", "attempts", "input_tokens",
                             "output_tokens", "seconds", "finish_reason", "job"}


def test_resume_skips_ok_rows_retries_failed_ones_and_repairs_a_torn_line(tmp_path):
    path = tmp_path / "out.jsonl"
    ledger, _ = open_ledger(path)
    for key, status in ((1, "ok"), (2, "error"), (3, "ok"), (2, "ok"), (4, "invalid")):
        ledger.write(record(key, status))
    ledger.close()
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"key": 5, "status": "o')  # a killed run's last line
    peeked = ResultLedger(JOB, output=str(path), stdout=io.StringIO()).peek()
    assert peeked.done == {"1", "2", "3"} and path.read_text(encoding="utf-8").endswith('"o')  # peek changes nothing
    ledger, resume = open_ledger(path)
    assert resume.done == {"1", "2", "3"} and resume.failed == {"4"} and resume.sources == [str(path)]
    ledger.write(record(5))
    ledger.close()
    keys = [r["key"] for _, r in read_results(path) if "status" in r]
    assert keys == [1, 2, 3, 2, 4, 5]  # the torn line is gone; the new record starts on its own line


def test_another_job_is_refused_saying_what_changed_unless_restart(tmp_path):
    path = tmp_path / "out.jsonl"
    ledger, _ = open_ledger(path)
    ledger.write(record(1))
    ledger.close()
    other = Job(dict(JOB.parts, template="Rate {row.body}"))
    with pytest.raises(JobChanged) as info:
        ResultLedger(other, output=str(path), stdout=io.StringIO()).check()
    assert "template: 'Classify {row.body}' -> 'Rate {row.body}'" in info.value.message
    assert info.value.exit_code == 2 and "--restart" in info.value.hint
    ledger, resume = open_ledger(path, job=other, restart=True)
    ledger.close()
    assert resume.done == set() and ledger.set_aside is not None and ledger.set_aside.name.startswith("out.jsonl.previous-")
    assert [r["key"] for _, r in read_results(ledger.set_aside) if "status" in r] == [1]  # kept, not lost
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0])["job"] == other.fingerprint


def test_a_file_that_is_not_ours_is_refused(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"hello": "world"}\n', encoding="utf-8")
    with pytest.raises(UsageError, match="not a per-row results file"):
        ResultLedger(JOB, output=str(path), stdout=io.StringIO()).check()
    path.write_text("The answer of a single question.\n", encoding="utf-8")
    with pytest.raises(UsageError, match="not a per-row results file"):
        ResultLedger(JOB, output=str(path), stdout=io.StringIO()).check()
    path.write_text('{"job": "x", "parts": {}}\nnot json\n', encoding="utf-8")
    with pytest.raises(UsageError, match="line 2"):
        list(read_results(path))


def test_without_output_the_lines_go_to_stdout(tmp_path):
    out = io.StringIO()
    ledger = ResultLedger(JOB, output=None, stdout=out)
    ledger.check()
    ledger.open(RowKey(("id",)))
    ledger.write(record(1, answer="긍정"))
    assert ledger.close() == []
    assert [json.loads(line)["answer"] for line in out.getvalue().splitlines()] == ["긍정"]


def test_csv_holds_the_last_record_per_key_and_defuses_formulas(tmp_path):
    ledger = ResultLedger(JOB, output=str(tmp_path / "out.csv"), stdout=io.StringIO(), csv_fields=["sentiment", "tags"])
    ledger.check()
    ledger.open(RowKey(("id",)))
    ledger.write(row_record(1, "error", JOB.fingerprint, schema=True, error="timeout"))
    ledger.write(row_record(1, "ok", JOB.fingerprint, schema=True, parsed={"sentiment": "=HYPERLINK(1)", "tags": ["a"]}))
    ledger.write(row_record(2, "ok", JOB.fingerprint, schema=True, parsed={"sentiment": "-3", "tags": []}))
    assert ledger.close() == [str(tmp_path / "out.jsonl"), str(tmp_path / "out.csv")]
    raw = (tmp_path / "out.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # Excel reads the BOM as UTF-8
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    assert rows == [["id", "status", "sentiment", "tags", "error"],
                    ["1", "ok", "'=HYPERLINK(1)", '["a"]', ""],
                    ["2", "ok", "-3", "[]", ""]]


def test_csv_of_composite_and_hashed_keys(tmp_path):
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"job": "x", "parts": {}},
        record({"order_id": 1, "product_id": 2}, answer="좋음"),
    ]) + "\n", encoding="utf-8")
    assert export_csv(jsonl, tmp_path / "r.csv", RowKey(("order_id", "product_id")), []) == 1
    text = (tmp_path / "r.csv").read_text(encoding="utf-8-sig")
    assert text.splitlines() == ["order_id,product_id,status,answer,error", "1,2,ok,좋음,"]


def test_restart_of_the_same_job_redoes_every_row_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.jsonl"
    ledger, _ = open_ledger(path)
    ledger.write(record(1))
    ledger.close()
    ledger, resume = open_ledger(path, restart=True)
    ledger.close()
    assert resume.done == set() and ledger.set_aside is not None
    assert [r["key"] for _, r in read_results(ledger.set_aside) if "status" in r] == [1]
    assert [r for _, r in read_results(path) if "status" in r] == []


def test_a_run_killed_while_writing_its_first_line_starts_afresh(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"job": "' + JOB.fingerprint[:5], encoding="utf-8")
    ledger, resume = open_ledger(path)
    ledger.close()
    assert resume.done == set()
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[0])["job"] == JOB.fingerprint
