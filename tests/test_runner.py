"""The runner: run_question fills a typed RunResult step by step; run_pipeline keeps its return shape."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import resources
from conftest import make_settings
from errors import ModelAPIError, QueryError
from fake_ollama_server import FakeOllamaServer
from fake_pc_server import FakePCServer
from runner import Question, RunResult, run_pipeline, run_question

ANSWER = "one two three four five six seven eight"


def test_a_finished_run_holds_rows_prompt_answer_and_stats(test_db_url):
    with FakePCServer(answer=ANSWER) as srv:
        settings = make_settings(test_db_url, API_BASE_URL=srv.base_url)
        run = run_question(Question("SELECT name FROM customers ORDER BY id", prompt_rows=5), settings)
    # The prompt stops reading once it is full: the run holds the rows it read, and the total counted.
    assert run.queried and len(run.rows) == 6 and run.columns == ["name"] and run.more_rows is False
    assert run.rows_total == 12 and run.db_data()["row_count"] == 12
    assert (run.rows_shown, run.rows_total, run.truncated) == (5, 12, True)
    assert run.prompt is not None and "(showing 5 of 12 rows)" in run.prompt.text
    assert run.complete and run.answer == ANSWER == run.received_text
    stats = run.stats()
    assert stats["rows_fetched"] == 6 and stats["protocol"] == "pc" and stats["total_time"] >= stats["db_time"]


def test_after_a_failure_the_run_still_holds_what_was_done(test_db_url):
    with FakeOllamaServer(answer=ANSWER, cut_after=3) as srv:
        settings = make_settings(test_db_url, API_BASE_URL=srv.base_url)
        run = RunResult("SELECT 1 AS x")
        with pytest.raises(ModelAPIError) as info:
            run_question(Question("SELECT 1 AS x"), settings, run, stream=True)
    assert run.rows == [{"x": 1}] and run.prompt is not None
    assert not run.complete and run.answer is None
    assert run.received_text.startswith("one two") and len(run.received_text) < len(ANSWER)
    assert run.stats()["rows_shown"] == 1 and "total_time" not in run.stats()
    # Nothing is attached to the exception beyond what its class declares.
    assert not hasattr(info.value, "db_data") and not hasattr(info.value, "rows")


def test_a_failed_query_leaves_the_run_unqueried(test_db_url):
    run = RunResult("SELECT nope FROM customers")
    with pytest.raises(QueryError):
        run_question(Question(run.query), make_settings(test_db_url), run, dry_run=True)
    assert not run.queried and run.stats() == {}
    assert run.db_data() == {"query": "SELECT nope FROM customers", "results": [], "row_count": 0}


def test_run_pipeline_keeps_its_return_shape(test_db_url):
    settings = make_settings(test_db_url)
    answer, stats, db_data = run_pipeline("SELECT id FROM orders ORDER BY id", settings=settings, dry_run=True,
                                          prompt_rows=3)
    assert answer is None and "(showing 3 of 120 rows)" in stats["prompt"]
    assert list(stats) == ["rows_fetched", "more_rows", "db_time", "rows_shown", "rows_total", "truncated",
                           "prompt_chars", "prompt_tokens_estimate", "prompt_token_counter", "prompt_warnings",
                           "prompt"]
    assert set(db_data) == {"query", "results", "row_count", "columns", "more_rows"}
    assert db_data["row_count"] == 120 and db_data["columns"] == ["id"]
    none, empty_stats, _ = run_pipeline("SELECT 1 WHERE false", settings=settings)
    assert none is None and (empty_stats["rows_shown"], empty_stats["truncated"]) == (0, False)


def test_runs_share_one_pool_and_client_until_close_resources(test_db_url):
    with FakePCServer(answer=ANSWER) as srv:
        settings = make_settings(test_db_url, API_BASE_URL=srv.base_url)
        run_pipeline("SELECT 1", settings=settings)
        database, client = resources.shared_database(settings), resources.shared_model_client(settings)
        run_pipeline("SELECT 2", settings=settings)
        assert resources.shared_database(settings) is database and resources.shared_model_client(settings) is client
        resources.close_resources()
        assert resources.shared_database(settings) is not database
        other = make_settings(test_db_url, API_BASE_URL=srv.base_url, MAX_NEW_TOKENS=7)
        assert resources.shared_model_client(other) is not resources.shared_model_client(settings)


def test_stats_accept_the_model_statistics_as_a_dataclass():
    @dataclass
    class Stats:
        protocol: str
        generated_tokens: int

    run = RunResult("SELECT 1", model_stats=Stats("ollama", 7))
    assert run.stats() == {"protocol": "ollama", "generated_tokens": 7}


def test_a_huge_fetch_cap_reads_only_what_the_prompt_shows(test_db_url):
    """--max-rows 10000000 once held every row in memory to put a few hundred in the prompt."""
    import tracemalloc

    query = "SELECT g AS id, md5(g::text) AS hash FROM generate_series(1, 300000) g"
    tracemalloc.start()
    try:
        run = run_question(Question(query, fetch_rows=10_000_000), make_settings(test_db_url), dry_run=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert run.rows_total == 300_000 and not run.more_rows
    assert run.rows_shown < 2_000 and len(run.rows) <= run.rows_shown + 2_000  # at most one batch more
    assert f"(showing {run.rows_shown:,} of 300,000 rows)" in run.prompt.text
    assert peak < 30 * 1024 * 1024  # 300,000 row dicts alone take well over 100 MB


def test_a_fetch_cap_below_the_rows_says_at_least(test_db_url):
    query = "SELECT g AS id FROM generate_series(1, 5000) g"
    run = run_question(Question(query, fetch_rows=1000, prompt_rows=10), make_settings(test_db_url), dry_run=True)
    assert run.more_rows and run.rows_total == 1000
    assert "(showing 10 of at least 1,000 rows)" in run.prompt.text
