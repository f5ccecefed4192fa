"""The connection pool: reuse, recovery after the server dropped every connection, timeouts, cancellation."""

from __future__ import annotations

import logging
import socket
import threading
import time

import psycopg2
import pytest

from conftest import make_settings
from db_connector import Database
from errors import DBConnectionError, QueryError

RETRY_LINE = "retrying once on a new connection"


@pytest.fixture
def terminate_function(admin_conn):
    """terminate_backends(pids): terminates the given backends; hidden from the guard inside a function."""
    with admin_conn.cursor() as cur:
        cur.execute(
            "CREATE OR REPLACE FUNCTION terminate_backends(pids int[]) RETURNS int LANGUAGE sql AS "
            "$$ SELECT count(*) FILTER (WHERE pg_terminate_backend(p))::int FROM unnest(pids) AS p $$"
        )
    yield "terminate_backends"


def _fill_pool(database: Database, size: int) -> list[int]:
    """Open ``size`` connections and return them all to the pool; their backend pids."""
    held = [database.acquire() for _ in range(size)]
    pids = [conn.info.backend_pid for conn in held]
    for conn in held:
        database.release(conn)
    return pids


def _wait_gone(admin_conn, pids: list[int]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with admin_conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,))
            if cur.fetchone()[0] == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"backends {pids} did not exit")


@pytest.mark.parametrize("size", [2, 5])
def test_after_every_backend_died_while_idle_the_next_query_runs_on_a_new_connection(
        test_db_url, admin_conn, caplog, size):
    # What a server restart (pg_ctl restart -m fast) does to the client: every pooled backend ends.
    database = Database(make_settings(test_db_url, DB_POOL_SIZE=size))
    caplog.set_level(logging.INFO)
    try:
        old = _fill_pool(database, size)
        with admin_conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(p) FROM unnest(%s) AS p", (old,))
        _wait_gone(admin_conn, old)
        pid = database.execute_query("SELECT pg_backend_pid() AS pid")[0]["pid"]
        assert pid not in old
        assert caplog.text.count(RETRY_LINE) <= 1
        assert caplog.text.count("Connected to PostgreSQL") == size + 1  # exactly one new connection
    finally:
        database.close()


@pytest.mark.parametrize("size", [2, 5])
def test_connection_lost_mid_query_costs_one_retry_on_a_really_new_connection(
        test_db_url, admin_conn, terminate_function, caplog, size):
    database = Database(make_settings(test_db_url, DB_POOL_SIZE=size))
    caplog.set_level(logging.INFO)
    try:
        old = _fill_pool(database, size)
        # The query, on one of the pooled connections, kills every pooled backend including its own.
        row = database.execute_query(f"SELECT {terminate_function}(%s) AS killed, pg_backend_pid() AS pid", [old])[0]
        assert row["pid"] not in old  # the retry ran on a connection opened after the loss
        assert row["killed"] == 0  # ... and the first attempt had killed all of them
        assert caplog.text.count(RETRY_LINE) == 1
        if size > 1:
            assert f"dropped {size - 1} idle" in caplog.text
        assert caplog.text.count("Connected to PostgreSQL") == size + 1
        assert database.execute_query("SELECT pg_backend_pid() AS pid")[0]["pid"] == row["pid"]  # kept
    finally:
        database.close()


def test_losing_the_retry_too_says_so_truthfully(test_db_url, terminate_function, caplog):
    database = Database(make_settings(test_db_url))
    caplog.set_level(logging.INFO)
    try:
        _fill_pool(database, 2)
        with pytest.raises(DBConnectionError) as info:
            database.execute_query(f"SELECT {terminate_function}(ARRAY[pg_backend_pid()])")
        message = str(info.value)
        assert "was lost during the query, and again on a new connection" in message
        assert "terminating connection due to administrator command" in message
        assert caplog.text.count(RETRY_LINE) == 1
        assert caplog.text.count("Connected to PostgreSQL") == 3  # two pooled, one really new
        assert database.execute_query("SELECT 1 AS ok") == [{"ok": 1}]  # and it recovers
    finally:
        database.close()


def test_a_cancelled_or_timed_out_query_is_not_retried(test_db_url, caplog):
    database = Database(make_settings(test_db_url, DB_STATEMENT_TIMEOUT=0.3))
    caplog.set_level(logging.INFO)
    try:
        with pytest.raises(QueryError, match="DB_STATEMENT_TIMEOUT=0.3"):
            database.execute_query("SELECT pg_sleep(5)")
        assert RETRY_LINE not in caplog.text
    finally:
        database.close()


def test_connect_timeout_holds_with_the_wait_callback_installed(test_db_url):
    # libpq ignores connect_timeout once a wait callback is installed; ours enforces it.
    Database(make_settings(test_db_url)).test_connection()  # installs the callback
    with socket.socket() as silent:  # accepts TCP connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        database = Database(make_settings(f"postgresql://x@127.0.0.1:{port}/db", DB_CONNECT_TIMEOUT=1,
                                          DB_CONNECT_RETRIES=0))
        started = time.monotonic()
        with pytest.raises(DBConnectionError, match="timeout expired"):
            database.execute_query("SELECT 1")
        assert time.monotonic() - started < 15  # 1 s, generously bounded; without it: forever


def test_connect_retries_back_off_without_really_sleeping(caplog):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connection refused
        delays: list[float] = []
        database = Database(make_settings(f"postgresql://alice:S3ntinel-pw@127.0.0.1:{port}/shop",
                                          DB_CONNECT_RETRIES=3), sleep=delays.append)
        caplog.set_level(logging.DEBUG)
        with pytest.raises(DBConnectionError, match="after 4 attempts") as info:
            database.execute_query("SELECT 1")
    assert len(delays) == 3
    for delay, base in zip(delays, (0.5, 1.0, 2.0)):
        assert 0.75 * base <= delay <= base  # capped exponential backoff, up to 25 % jitter
    assert "S3ntinel-pw" not in str(info.value) and "S3ntinel-pw" not in caplog.text


# --- cancellation from another thread ----------------------------------------------------


def _wait_fetching(admin_conn, count: int) -> None:
    """Wait until ``count`` of our connections run a FETCH (where a cursor's query does its work)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with admin_conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'FETCH%%' "
                        "AND application_name = 'db_to_model_pipeline' AND datname = current_database()")
            if cur.fetchone()[0] >= count:
                return
        time.sleep(0.02)
    raise AssertionError(f"fewer than {count} queries started")


def test_cancel_all_stops_queries_running_in_worker_threads(db, admin_conn):
    outcomes: list[BaseException | object] = []

    def worker(seconds: int) -> None:
        try:
            outcomes.append(db.execute_query(f"SELECT pg_sleep({seconds}) AS slept_{seconds}"))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcomes.append(exc)

    threads = [threading.Thread(target=worker, args=(30 + i,), daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    _wait_fetching(admin_conn, 2)
    assert db.cancel_all() == 2
    for thread in threads:
        thread.join(20)
    assert not any(thread.is_alive() for thread in threads)
    assert len(outcomes) == 2
    for outcome in outcomes:
        assert isinstance(outcome, QueryError) and outcome.sqlstate == "57014"
        assert "cancel_all" in outcome.message
    assert db.execute_query("SELECT 1 AS ok") == [{"ok": 1}]  # queries after cancel_all run normally


def test_cancel_all_stops_a_stream_between_fetches(db):
    with db.stream_rows("SELECT generate_series(1, 100000) AS n", batch_size=10) as rows:
        iterator = iter(rows)
        assert next(iterator) == {"n": 1}
        db.cancel_all()  # no statement is running now: the next FETCH must not run either
        with pytest.raises(QueryError, match="cancel_all") as info:
            list(iterator)
        assert info.value.sqlstate == "57014"
    assert db.execute_query("SELECT 2 AS ok") == [{"ok": 2}]


def test_pool_is_bounded_and_waits_for_a_free_connection(test_db_url):
    database = Database(make_settings(test_db_url, DB_POOL_SIZE=1, DB_CONNECT_TIMEOUT=5))
    try:
        conn = database.acquire()
        threading.Timer(0.3, database.release, args=(conn,)).start()
        again = database.acquire()  # waits for the release above, then reuses that connection
        assert again is conn
        database.release(again)
    finally:
        database.close()


def test_returning_a_connection_twice_is_harmless(db, caplog):
    conn = db.acquire()
    db.release(conn)
    db.release(conn)
    assert "not in use" in caplog.text
    assert db.execute_query("SELECT 1 AS ok") == [{"ok": 1}]


def test_close_keeps_the_database_usable_and_closes_borrowed_connections_on_return(db):
    conn = db.acquire()
    db.close()
    assert db.execute_query("SELECT 1 AS ok") == [{"ok": 1}]
    assert not conn.closed
    db.release(conn)
    assert conn.closed  # it was in use when close() ran


def test_wait_callback_leaves_other_psycopg2_connections_working(db, test_db_url):
    db.test_connection()  # the wait callback is installed from here on
    assert psycopg2.extensions.get_wait_callback() is not None
    conn = psycopg2.connect(test_db_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1; SELECT 2")
            assert cur.fetchall() == [(2,)]
            with pytest.raises(psycopg2.errors.DivisionByZero):
                cur.execute("SELECT 1/0")
        conn.rollback()
    finally:
        conn.close()
