"""--per-row end to end, in-process: real PostgreSQL, loopback model servers, files and tables checked.

The command runs through ``main(argv, stdin, stdout, stderr)`` like the other CLI tests; the
runs that must be separate processes (SIGKILL, Ctrl-C) are in test_per_row_process.py.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import secrets
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from conftest import REPO_ROOT, CliResult, run_cli
from fake_ollama_server import FakeOllamaServer
from fake_openai_server import FakeOpenAIServer
from fake_pc_server import FakePCServer
from fake_server_base import free_port, prompt_text

from results_table import setup_sql

BULK_ROWS = 3000
SCHEMA_FILE = str(REPO_ROOT / "examples" / "sentiment_schema.json")



@pytest.fixture(scope="module")
def bulk_reviews(test_db_url):
    """A table of 3,000 generated reviews; every 500th body carries the marker FAILME."""
    conn = psycopg2.connect(test_db_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("""
            CREATE TABLE IF NOT EXISTS bulk_reviews AS
            SELECT g AS id, 1 + mod(g, 5) AS rating,
                   CASE WHEN mod(g, 500) = 0 THEN 'FAILME review ' ELSE '리뷰 ' END || g || ': '
                       || repeat('배송이 빨라요 and the quality is fine. ', 1 + mod(g, 4)) AS body
            FROM generate_series(1, %s) AS g""", (BULK_ROWS,))
    conn.close()
    return "bulk_reviews"


@pytest.fixture
def run(test_db_url, tmp_path, monkeypatch):
    def runner(*args: str, env: dict | None = None) -> CliResult:
        values = {"DATABASE_URL": test_db_url, "LOG_FILE": str(tmp_path / "client.log"), "API_CONNECT_TIMEOUT": "1",
                  "API_MAX_ATTEMPTS": "1"}
        return run_cli(monkeypatch, args, {**values, **(env or {})})

    return runner


def posts(server) -> list[str]:
    return [prompt_text(r.json) for r in server.requests if r.method == "POST"]


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if '"status"' in line]


def final(path: Path) -> dict:
    """The last record of each key."""
    return {json.dumps(r["key"]): r for r in rows_of(path)}


REVIEWS = "SELECT id, rating, title, body FROM reviews ORDER BY id"


def test_thousands_of_rows_some_failing_then_a_rerun_retries_only_those(run, bulk_reviews, tmp_path):
    query = f"SELECT id, body FROM {bulk_reviews} ORDER BY id"
    args = ["--per-row", "--query", query, "--template", "Sentiment of: {row.body}", "--output", "out.jsonl",
            "--concurrency", "4", "--retries", "1"]
    with FakeOllamaServer(answer="positive", fail_when="FAILME", fail_status=500) as srv:
        first = run(*args, env={"API_BASE_URL": srv.base_url})
    assert first.returncode == 7, first.stderr
    assert "Rows: 2,994 ok, 6 failed (6 error), 0 skipped (already done), 0 not done." in first.stderr
    assert "6 rows failed: rerun the same command to retry them" in first.stderr
    assert srv.peak_generations <= 4
    records = rows_of(tmp_path / "out.jsonl")
    assert len(records) == BULK_ROWS and Counter(r["status"] for r in records) == {"ok": 2994, "error": 6}
    assert sorted(r["key"] for r in records if r["status"] == "error") == list(range(500, 3001, 500))
    with FakeOllamaServer(answer="positive") as again:
        second = run(*args, env={"API_BASE_URL": again.base_url})
    assert second.returncode == 0, second.stderr
    assert "2,994 of 3,000 rows already done, 6 failed before and sent again" in second.stderr
    assert sorted(int(re.search(r"FAILME review (\d+)", p).group(1)) for p in posts(again)) == list(range(500, 3001, 500))
    done = final(tmp_path / "out.jsonl")
    assert len(done) == BULK_ROWS and {r["status"] for r in done.values()} == {"ok"}


def test_a_server_killed_mid_run_and_restarted_loses_no_row_and_answers_none_twice(run, tmp_path):
    """Three servers' worth of slots; the llama.cpp one dies after 30 answers and a new one starts on its
    port: every row ends ok once, no prompt is answered twice, and the log says down and back."""
    rows = 150
    victim = FakeOpenAIServer(slots=2, delay=0.03).start()
    replacement = FakeOpenAIServer(slots=2, delay=0.03, port=victim.port)
    done = threading.Event()

    def kill_after_30() -> None:
        while len(victim.answered) + len(survivor.answered) < 30 and not done.is_set():
            time.sleep(0.005)
        victim.kill()
        replacement.start()  # back on the same port; the pool finds out with a GET after its cooldown

    with FakeOllamaServer(delay=0.03) as survivor:
        killer = threading.Thread(target=kill_after_30, daemon=True)
        killer.start()
        try:
            # The survivor alone needs >= 3 s for the rows left after the kill (0.03 s each, one at a
            # time), longer than the 2 s cooldown: the victim's return always falls within the run.
            result = run("--per-row", "--query", f"SELECT g AS id FROM generate_series(1, {rows}) g",
                         "--template", "Row {row.id}", "--output", "out.jsonl",
                         env={"API_BASE_URL": f"{victim.base_url},{survivor.base_url}"})
        finally:
            done.set()
            killer.join(10)
            replacement.stop()
    assert result.returncode == 0, result.stderr
    records = rows_of(tmp_path / "out.jsonl")
    assert Counter(r["key"] for r in records) == Counter(range(1, rows + 1))
    assert {r["status"] for r in records} == {"ok"}
    answered = Counter([*victim.answered, *replacement.answered, *survivor.answered])
    assert answered == Counter(f"Row {i}" for i in range(1, rows + 1))  # each prompt answered exactly once
    assert victim.answered and replacement.answered and survivor.answered
    assert max(victim.peak_generations, replacement.peak_generations) <= 2 and survivor.peak_generations <= 1
    log = (tmp_path / "client.log").read_text(encoding="utf-8")
    assert f"Model server {victim.base_url} is down" in log and f"Model server {victim.base_url} is back" in log


def test_without_output_the_rows_go_to_stdout_and_the_summary_to_stderr(run):
    with FakePCServer(answer="긍정") as srv:
        result = run("--per-row", "--query", REVIEWS, "--template", "{row}", "--format", "json",
                     env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["key"] for r in lines] == list(range(1, 21)) and {r["answer"] for r in lines} == {"긍정"}
    assert "Rows: 20 ok, 0 failed" in result.stderr and f"  {srv.base_url}: 20 answers" in result.stderr
    assert "rows/s" in result.stderr and "tokens in" in result.stderr
    assert posts(srv)[0].startswith('{"id":1,"rating":5,')  # {row} in JSON, one object


@pytest.mark.parametrize(("template", "expected"), [
    ("Analyse {data}", "write {row} for the whole row"),
    ("Sentiment of {row.bdy}", "{row.bdy} (did you mean {row.body}?)"),
    ("Say hi", "uses no part of the row"),
])
def test_template_mistakes_stop_before_any_model_call(run, template, expected):
    with FakeOllamaServer() as srv:
        result = run("--per-row", "--query", REVIEWS, "--template", template, env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr.replace("\n", " ") and posts(srv) == []
    if "bdy" in template:
        assert "id, rating, title, body" in result.stderr


def test_a_template_is_required(run):
    result = run("--per-row", "--query", REVIEWS, env={"API_BASE_URL": "http://127.0.0.1:9"})
    assert result.returncode == 2 and "--per-row needs a template" in result.stderr


def test_duplicate_keys_are_refused_with_an_example(run):
    with FakeOllamaServer() as srv:
        by_default = run("--per-row", "--query", "SELECT product_id AS id, body FROM reviews ORDER BY id",
                         "--template", "{row.body}", env={"API_BASE_URL": srv.base_url})
        by_flag = run("--per-row", "--query", REVIEWS, "--key", "rating", "--template", "{row.body}",
                      env={"API_BASE_URL": srv.base_url})
    assert by_default.returncode == 2 and re.search(r"rows \d+ and \d+ both have id=\d+", by_default.stderr)
    assert by_flag.returncode == 2 and "both have rating=" in by_flag.stderr and "--key" in by_flag.stderr
    assert posts(srv) == []


def test_rows_without_a_key_are_identified_by_a_hash_and_the_tool_says_so(run, tmp_path):
    with FakeOllamaServer() as srv:
        result = run("--per-row", "--query", "SELECT title, body FROM reviews", "--template", "{row.body}",
                     "--output", "h.jsonl", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    assert "identified by a hash of its values" in result.stderr
    keys = [r["key"] for r in rows_of(tmp_path / "h.jsonl")]
    assert len(set(keys)) == 20 and all(re.fullmatch(r"[0-9a-f]{16}", k) for k in keys)
    header = json.loads((tmp_path / "h.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert header["key_columns"] is None and header["key"] == "a hash of each row's values"


def test_a_changed_template_is_refused_and_restart_keeps_the_old_file(run, tmp_path):
    base = ["--per-row", "--query", REVIEWS, "--output", "out.jsonl"]
    with FakeOllamaServer(answer="positive") as srv:
        env = {"API_BASE_URL": srv.base_url}
        assert run(*base, "--template", "Sentiment: {row.body}", env=env).returncode == 0
        sent = len(posts(srv))
        changed = run(*base, "--template", "Mood: {row.body}", env=env)
        assert changed.returncode == 2
        assert "template: 'Sentiment: {row.body}' -> 'Mood: {row.body}'" in changed.stderr
        assert "--restart" in changed.stderr and len(posts(srv)) == sent  # nothing sent
        restarted = run(*base, "--template", "Mood: {row.body}", "--restart", env=env)
    assert restarted.returncode == 0, restarted.stderr
    kept = list(tmp_path.glob("out.jsonl.previous-*"))
    assert len(kept) == 1 and "the earlier results were kept as" in restarted.stderr
    assert len(rows_of(kept[0])) == 20 and len(rows_of(tmp_path / "out.jsonl")) == 20
    assert len(posts(srv)) == 40


def test_a_template_file_changed_near_its_end_is_refused_showing_the_change(run, tmp_path):
    template = (REPO_ROOT / "examples" / "templates" / "review_sentiment_per_row.txt").read_text(encoding="utf-8")
    (tmp_path / "t.txt").write_text(template, encoding="utf-8")
    args = ["--per-row", "--query", REVIEWS, "--template-file", "t.txt", "--schema", SCHEMA_FILE,
            "--output", "s.jsonl"]
    with FakeOllamaServer(answer='{"sentiment": "neutral", "score": 0, "topics": []}') as srv:
        assert run(*args, env={"API_BASE_URL": srv.base_url}).returncode == 0
        (tmp_path / "t.txt").write_text(template.replace("Review: {row.body}", "Text: {row.body}"), encoding="utf-8")
        changed = run(*args, env={"API_BASE_URL": srv.base_url})
    assert changed.returncode == 2
    line = next(line for line in changed.stderr.splitlines() if line.strip().startswith("template: "))
    assert "Review: {row.body}" in line.split(" -> ")[0] and "Text: {row.body}" in line.split(" -> ")[1]


def test_dry_run_shows_three_prompts_counts_tokens_and_time_without_generating(run):
    with FakeOllamaServer() as srv:
        result = run("--per-row", "--query", REVIEWS, "--template", "Sentiment of: {row.body}",
                     "--system-prompt", "You label reviews.", "--dry-run", env={"API_BASE_URL": srv.base_url})
        unconfigured = run("--per-row", "--query", REVIEWS, "--template", "{row.body}", "--dry-run",
                           env={"PC_IP": "192.168.0.XXX"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- row ") == 3 and result.stdout.startswith("--- row 1 of 20 (id=1) ---\nYou label")
    assert "Dry run: 20 rows (key: id), 20 to send; prompts about" in result.stderr
    assert "At the servers' capacity (1 at once): 20 rows take 20 x the time of one answer" in result.stderr
    assert "Nothing was sent." in result.stderr and posts(srv) == []
    assert unconfigured.returncode == 0 and "No time estimate: PC_IP is not configured yet" in unconfigured.stderr


def sentiment_answer(prompt: str) -> str:
    if "Your previous answer" in prompt:
        return '{"sentiment": "neutral", "score": 0, "topics": []}'
    if "Review: " in prompt and "별로" in prompt:
        return "I think it is negative."  # not JSON: repaired
    return '{"sentiment": "positive", "score": 0.8, "topics": ["quality"]}'


def test_schema_answers_are_parsed_and_exported_to_csv(run, tmp_path):
    template = str(REPO_ROOT / "examples" / "templates" / "review_sentiment_per_row.txt")
    with FakeOllamaServer(answer_for=sentiment_answer) as srv:
        result = run("--per-row", "--query", REVIEWS, "--template-file", template, "--schema", SCHEMA_FILE,
                     "--output", "sentiment.csv", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    body = [r.json for r in srv.requests if r.method == "POST"][0]
    assert body["format"]["required"] == ["sentiment", "score", "topics"]  # Ollama's native structured output
    assert '"enum": [' in body["messages"][-1]["content"]  # and the schema in the prompt
    records = final(tmp_path / "sentiment.jsonl")
    assert {r["status"] for r in records.values()} == {"ok"}
    assert all(r["parsed"]["sentiment"] in ("positive", "neutral") for r in records.values())
    with open(tmp_path / "sentiment.csv", encoding="utf-8-sig", newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["id", "status", "sentiment", "score", "topics", "error"] and len(table) == 21
    assert table[1][:5] == ["1", "ok", "positive", "0.8", '["quality"]']


def test_no_server_reachable_at_the_start_stops_at_once_before_anything_is_written(run, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: a wrong address, a server not started
    result = run("--per-row", "--query", REVIEWS, "--template", "{row.body}", "--output", "o.jsonl",
                 env={"API_BASE_URL": url})
    assert result.returncode == 5, result.stderr
    assert f"Cannot connect to the model server at {url}" in result.stderr and "rows wait" not in result.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_a_missing_model_stops_the_run_with_the_servers_own_error_before_any_generation(run, tmp_path):
    with FakeOllamaServer(models=["llama3.2:latest"]) as srv:  # reachable, but without phi4
        result = run("--per-row", "--query", REVIEWS, "--template", "{row.body}", "--output", "o.jsonl",
                     env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 6, result.stderr
    assert "Stopped early:" in result.stderr and "phi4" in result.stderr and "ollama pull phi4" in result.stderr
    assert "Cannot connect" not in result.stderr and posts(srv) == []
    assert "20 not done" in result.stderr and rows_of(tmp_path / "o.jsonl") == []


def test_401_stops_early_and_keeps_the_file(run, tmp_path):
    with FakeOpenAIServer(api_key="right") as srv:
        result = run("--per-row", "--query", REVIEWS, "--template", "{row.body}", "--output", "o.jsonl",
                     env={"API_BASE_URL": srv.base_url, "API_KEY": "wrong"})
    assert result.returncode == 6
    assert "Stopped early: The server refused the request (HTTP 401)" in result.stderr and "API_KEY" in result.stderr
    assert "20 not done" in result.stderr and len(posts(srv)) == 1
    lines = (tmp_path / "o.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["job"]  # the job line, valid; no row recorded


def test_403_stops_early_after_one_request(run, tmp_path):
    with FakeOllamaServer(fail_when="review", fail_status=403) as srv:  # a proxy that refuses this laptop
        result = run("--per-row", "--query", REVIEWS, "--template", "review: {row.body}", "--output", "o.jsonl",
                     "--concurrency", "1", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 6, result.stderr
    assert "Stopped early:" in result.stderr and "403" in result.stderr and "20 not done" in result.stderr
    assert len(posts(srv)) == 1 and rows_of(tmp_path / "o.jsonl") == []


def test_a_template_every_server_rejects_stops_after_the_first_rows(run):
    with FakeOllamaServer(fail_when="BROKEN", fail_status=400) as srv:
        result = run("--per-row", "--query", REVIEWS, "--template", "BROKEN {row.body}",
                     env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 6
    assert "Stopped early: the first 5 rows all failed the same way, error (INVALID_PROMPT)" in result.stderr
    assert len(posts(srv)) == 5 and len(result.stdout.splitlines()) == 5


@pytest.mark.parametrize("args", [["--key", "id"], ["--schema", "s.json"], ["--results-table", "t"], ["--restart"]])
def test_per_row_flags_need_per_row(run, args):
    result = run("--query", "SELECT 1", *args, "--dry-run")
    assert result.returncode == 2 and "applies only to --per-row" in result.stderr


def test_json_does_not_apply_to_per_row(run):
    result = run("--per-row", "--query", REVIEWS, "--template", "{row}", "--json", "--dry-run")
    assert result.returncode == 2 and "--json does not apply to --per-row" in result.stderr


# --- the results table ----------------------------------------------------------------------


@pytest.fixture
def writer_url(test_db_url, admin_conn):
    """A role that may write the results tables and nothing else (the README's GRANTs)."""
    role, password = f"pipeline_writer_{secrets.token_hex(3)}", secrets.token_hex(8)
    with admin_conn.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        cur.execute(f"GRANT CONNECT ON DATABASE {admin_conn.info.dbname} TO {role}")
        cur.execute(setup_sql("review_sentiment", role))  # what `python results_table.py NAME --role ROLE` prints
    parts = urlsplit(test_db_url)
    host = parts.hostname or "127.0.0.1"
    yield urlunsplit(parts._replace(netloc=f"{role}:{password}@{host}:{parts.port or 5432}"))
    with admin_conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS review_sentiment, review_sentiment_jobs")
        cur.execute(f"DROP OWNED BY {role}")
        cur.execute(f"DROP ROLE {role}")


def test_results_are_upserted_into_a_table_and_a_rerun_resumes_from_it(run, writer_url, admin_conn):
    args = ["--per-row", "--query", REVIEWS, "--template", "{row.body}", "--schema", SCHEMA_FILE,
            "--results-table", "Review_Sentiment"]
    with FakeOllamaServer(answer='{"sentiment": "negative", "score": -0.5, "topics": ["배송"]}',
                          fail_when="#7#", fail_status=400) as srv:
        env = {"API_BASE_URL": srv.base_url, "RESULTS_DATABASE_URL": writer_url}
        first = run(*args, "--template", "#{row.id}# {row.body}", env=env)
        assert first.returncode == 7, first.stderr
        with admin_conn.cursor() as cur:
            cur.execute("SELECT key, key_value, status, parsed->>'sentiment', parsed->'topics', error_code, job, "
                        "input_tokens > 0, server FROM review_sentiment ORDER BY (key_value)::int")
            rows = cur.fetchall()
            cur.execute("SELECT count(*), min(parts->>'template') FROM review_sentiment_jobs")
            jobs = cur.fetchone()
        assert len(rows) == 20 and rows[0][:5] == ("1", 1, "ok", "negative", ["배송"])
        assert rows[6][2] == "error" and rows[6][5] == "INVALID_PROMPT" and rows[6][3] is None
        assert len({row[6] for row in rows}) == 1 and all(row[7] for row in rows if row[2] == "ok")
        assert rows[0][8] == srv.base_url and jobs == (1, "#{row.id}# {row.body}")
        sent = len(posts(srv))
        again = run(*args, "--template", "#{row.id}# {row.body}", env=env)
        assert again.returncode == 7 and "19 of 20 rows already done" in again.stderr
        assert [p.split("#")[1] for p in posts(srv)[sent:]] == ["7"]  # only the failed row, from the table
        changed = run(*args, "--template", "{row.body}!", env=env)
    assert changed.returncode == 2 and "--results-table review_sentiment holds the results of a different job" in \
        changed.stderr


def test_the_writer_role_may_write_only_the_results_tables(writer_url):
    conn = psycopg2.connect(writer_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("INSERT INTO customers (id, name, city, joined_at) VALUES (999, 'x', 'y', now())")
        with conn.cursor() as cur, pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("CREATE TABLE sneaky (id int)")
    finally:
        conn.close()


def test_results_table_needs_its_own_setting_and_a_plain_name(run):
    missing = run("--per-row", "--query", REVIEWS, "--template", "{row}", "--results-table", "r", "--dry-run")
    assert missing.returncode == 2 and "RESULTS_DATABASE_URL" in missing.stderr
    bad = run("--per-row", "--query", REVIEWS, "--template", "{row}", "--results-table", "r; DROP TABLE x",
              "--dry-run", env={"RESULTS_DATABASE_URL": "postgresql://u@localhost/db"})
    assert bad.returncode == 2 and "is not a plain table name" in bad.stderr


def test_the_tables_are_created_when_missing_and_the_role_may_create_them(run, test_db_url, admin_conn):
    with FakePCServer(answer="요약") as srv:
        result = run("--per-row", "--query", REVIEWS, "--template", "{row.body}", "--results-table", "created_here",
                     env={"API_BASE_URL": srv.base_url, "RESULTS_DATABASE_URL": test_db_url})
    try:
        assert result.returncode == 0, result.stderr
        with admin_conn.cursor() as cur:
            cur.execute("SELECT count(*), min(answer), max(status) FROM created_here")
            assert cur.fetchone() == (20, "요약", "ok")
            cur.execute("SELECT count(*) FROM created_here_jobs")
            assert cur.fetchone() == (1,)
    finally:
        with admin_conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS created_here, created_here_jobs")


def test_dry_run_after_a_partial_run_counts_what_is_left_and_times_it_from_earlier_answers(run, tmp_path):
    args = ["--per-row", "--query", REVIEWS, "--template", "#{row.id}# {row.body}", "--output", "out.jsonl"]
    with FakeOllamaServer(fail_when="#3#", fail_status=400) as srv:
        assert run(*args, env={"API_BASE_URL": srv.base_url}).returncode == 7
        dry = run(*args, "--dry-run", env={"API_BASE_URL": srv.base_url})
    assert dry.returncode == 0, dry.stderr
    assert "Dry run: 20 rows (key: id), 19 already done in out.jsonl, 1 to send" in dry.stderr
    assert "this job's earlier answers took" in dry.stderr
    assert dry.stdout.startswith("--- row 3 of 20 (id=3) ---\n#3#")
    assert len(posts(srv)) == 20


def test_transport_retry_warnings_stay_quiet_during_a_run_unless_verbose():
    from batch_cli import _request_logs_quiet

    transport, pool = logging.getLogger("http_transport"), logging.getLogger("server_pool")
    before = transport.level
    with _request_logs_quiet(verbose=False):
        # "Connecting to ... failed; retry 1" repeats for every request while a server is away.
        assert not transport.isEnabledFor(logging.WARNING) and transport.isEnabledFor(logging.ERROR)
        assert pool.isEnabledFor(logging.WARNING) and not pool.isEnabledFor(logging.INFO)  # down / back stay
    with _request_logs_quiet(verbose=True):
        assert transport.level == before
    assert transport.level == before
