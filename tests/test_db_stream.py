"""Database.stream_rows: rows in batches, counting without reading, and one deadline for the whole query."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from conftest import make_settings
from db_connector import Database, RowStream
from errors import QueryError, ReadOnlyViolation


def _our_states(admin_conn) -> list[str]:
    with admin_conn.cursor() as cur:
        cur.execute("SELECT state FROM pg_stat_activity WHERE application_name = 'db_to_model_pipeline' "
                    "AND datname = current_database()")
        return [row[0] for row in cur.fetchall()]


def test_stream_yields_dicts_in_batches_and_returns_the_connection(db, admin_conn):
    with db.stream_rows("SELECT g AS n, 'x' || g AS s FROM generate_series(1, 25) AS g", batch_size=10) as rows:
        assert isinstance(rows, RowStream)
        assert rows.columns == ["n", "s"]
        assert "idle in transaction" in _our_states(admin_conn)  # the cursor is open while reading
        got = list(rows)
    assert got[0] == {"n": 1, "s": "x1"} and got[-1] == {"n": 25, "s": "x25"} and len(got) == 25
    assert rows.rows_read == 25 and rows.has_more is False
    assert set(_our_states(admin_conn)) == {"idle"}  # rolled back and returned


def test_stream_with_a_cap_reports_has_more(db):
    with db.stream_rows("SELECT generate_series(1, 50000000) AS n", max_rows=5, batch_size=2) as rows:
        assert [r["n"] for r in rows] == [1, 2, 3, 4, 5]
        assert rows.has_more is True
    with db.stream_rows("SELECT generate_series(1, 5) AS n", max_rows=5) as rows:
        assert len(list(rows)) == 5 and rows.has_more is False


@pytest.mark.parametrize(
    ("total", "cap", "read", "remaining", "more"),
    [
        (1_000_000, None, 10, 999_990, False),
        (1_000_000, 1000, 10, 990, True),
        (1000, 1000, 10, 990, False),
        (1001, 1000, 0, 1000, True),
        (0, None, 0, 0, False),
        (3, None, 3, 0, False),
        (10, 0, 0, 0, True),
    ],
)
def test_count_remaining_counts_without_reading(db, total, cap, read, remaining, more):
    with db.stream_rows(f"SELECT generate_series(1, {total}) AS n", max_rows=cap, batch_size=7) as rows:
        iterator = iter(rows)
        for _ in range(read):
            next(iterator)
        assert rows.count_remaining() == remaining
        assert rows.has_more is more
        assert list(rows) == []  # counting ends the iteration
        assert rows.rows_read == read


def test_count_remaining_for_show_and_explain(db):
    with db.stream_rows("EXPLAIN SELECT * FROM customers AS c JOIN orders AS o ON o.customer_id = c.id") as rows:
        first = next(iter(rows))
        assert "QUERY PLAN" in first
        assert rows.count_remaining() >= 1
    with db.stream_rows("SHOW search_path") as rows:
        assert rows.columns == ["search_path"] and rows.count_remaining() == 1


def test_streaming_a_large_result_does_not_accumulate_rows(db):
    # Measured: execute_query (a list of 100,000 dicts) peaks at ~32 MB; the stream, one batch
    # of 2,000 rows at a time, at ~0.7 MB.
    sql = "SELECT g AS n, repeat('x', 40) AS pad FROM generate_series(1, 100000) AS g"
    db.test_connection()  # connect outside the measurement
    tracemalloc.start()
    try:
        with db.stream_rows(sql) as rows:
            count = sum(1 for _ in rows)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 100_000
    assert peak < 4_000_000, f"peak {peak:,} bytes"


def test_stream_refuses_writes_before_borrowing_a_connection(db, admin_conn):
    def our_backends() -> set[int]:
        with admin_conn.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'db_to_model_pipeline' "
                        "AND datname = current_database()")
            return {row[0] for row in cur.fetchall()}

    # Compared with the backends before: on a loaded machine an earlier test's closed connection
    # may still be listed for a moment (it only ever leaves the list).
    before = our_backends()
    with pytest.raises(ReadOnlyViolation):
        db.stream_rows("DELETE FROM audit")
    assert our_backends() <= before  # never connected


def test_closing_early_rolls_back_and_reuses_the_connection(db, admin_conn):
    rows = db.stream_rows("SELECT generate_series(1, 1000000) AS n")
    assert next(iter(rows)) == {"n": 1}
    rows.close()
    rows.close()  # twice is fine
    assert set(_our_states(admin_conn)) == {"idle"}
    with pytest.raises(QueryError, match="closed"):
        rows.count_remaining()
    assert db.execute_query("SELECT count(*) AS n FROM customers") == [{"n": 12}]


def test_params_and_errors_in_a_stream(db):
    with db.stream_rows("SELECT name FROM customers WHERE city = %(city)s ORDER BY id", {"city": "서울"},
                        batch_size=3) as rows:
        assert [r["name"] for r in rows] == ["김민준", "최수아", "장서윤", "한시우"]
    with pytest.raises(QueryError, match="division by zero"):
        with db.stream_rows("SELECT 1 / (g - 3) FROM generate_series(1, 10) AS g", batch_size=2) as rows:
            list(rows)  # the error surfaces in the second FETCH
    assert db.execute_query("SELECT 1 AS ok") == [{"ok": 1}]


# --- DB_STATEMENT_TIMEOUT is one deadline for the whole query ---------------------------------


def test_statement_timeout_bounds_the_whole_query_not_each_fetch(test_db_url):
    # Every FETCH of 50 rows takes ~0.1 s, far below the limit; all 30,000 rows would take a minute.
    database = Database(make_settings(test_db_url, DB_STATEMENT_TIMEOUT=1))
    try:
        started = time.monotonic()
        with pytest.raises(QueryError, match="DB_STATEMENT_TIMEOUT=1") as info:
            with database.stream_rows("SELECT g FROM generate_series(1, 30000) AS g WHERE pg_sleep(0.002) IS NOT NULL",
                                      batch_size=50) as rows:
                for _ in rows:
                    pass
        assert rows.rows_read >= 50  # several FETCHes ran before the deadline
        assert info.value.sqlstate == "57014"
        assert time.monotonic() - started < 20
        assert database.execute_query("SELECT 1 AS ok") == [{"ok": 1}]  # the connection is reusable
    finally:
        database.close()


def test_execute_query_has_the_same_whole_query_deadline(test_db_url):
    # Each FETCH of 2,000 rows takes ~0.6 s (under the 1.5 s limit); 30 FETCHes would take 18 s.
    database = Database(make_settings(test_db_url, DB_STATEMENT_TIMEOUT=1.5))
    try:
        started = time.monotonic()
        with pytest.raises(QueryError, match="DB_STATEMENT_TIMEOUT=1.5"):
            database.execute_query("SELECT g FROM generate_series(1, 60000) AS g "
                                   "WHERE g % 100 <> 0 OR pg_sleep(0.03) IS NOT NULL")
        assert time.monotonic() - started < 15
    finally:
        database.close()


def test_a_slow_reader_hits_the_deadline_before_the_next_fetch(test_db_url):
    database = Database(make_settings(test_db_url, DB_STATEMENT_TIMEOUT=0.5))
    try:
        with database.stream_rows("SELECT generate_series(1, 10) AS n", batch_size=2) as rows:
            iterator = iter(rows)
            next(iterator)
            time.sleep(0.6)
            assert next(iterator) == {"n": 2}  # still in the batch already fetched
            with pytest.raises(QueryError, match="DB_STATEMENT_TIMEOUT=0.5"):
                next(iterator)
    finally:
        database.close()


def test_zero_means_no_limit(test_db_url):
    database = Database(make_settings(test_db_url, DB_STATEMENT_TIMEOUT=0))
    try:
        assert database.execute_query("SELECT pg_sleep(0.3) IS NULL AS ok, current_setting('statement_timeout') AS t") \
            == [{"ok": False, "t": "0"}]
    finally:
        database.close()
