"""db_connector against a real PostgreSQL: reads, refusals, bounds, types, failures."""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from decimal import Decimal

import psycopg2
import pytest

import config
import db_connector
from conftest import REPO_ROOT, make_settings
from db_connector import Database, split_statements
from errors import DBConnectionError, QueryError, ReadOnlyViolation


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def audit_count(admin_conn) -> int:
    with admin_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit")
        return cur.fetchone()[0]


# --- reading ---------------------------------------------------------------------


def test_rows_are_dicts_in_query_column_order(db):
    rows = db.execute_query("SELECT name, id, city FROM customers ORDER BY id LIMIT 2")
    assert rows == [
        {"name": "김민준", "id": 1, "city": "서울"},
        {"name": "이서연", "id": 2, "city": "부산"},
    ]
    assert list(rows[0]) == ["name", "id", "city"]
    assert rows.columns == ["name", "id", "city"]
    assert rows.has_more is False


def test_repeated_column_names_are_all_kept(db):
    rows = db.execute_query("SELECT 1, 2, 3 AS a, 4 AS a")
    assert rows == [{"?column?": 1, "?column? (2)": 2, "a": 3, "a (2)": 4}]


@pytest.mark.parametrize(
    "query",
    [
        "SELECT 'a;b' AS x;",
        "SELECT $$ ; DELETE FROM audit; $$ AS x",
        "SELECT $tag$ ; $tag$ AS x -- ; DELETE FROM audit",
        "/* ; */ SELECT ';' AS x /* nested /* ; */ ; */",
        "SELECT E'\\' ; ' AS x",
        "SELECT \"weird;name\".x FROM (SELECT 1 AS x) AS \"weird;name\"",
    ],
)
def test_semicolons_inside_strings_and_comments_are_one_statement(db, query):
    rows = db.execute_query(query)
    assert len(rows) == 1


def test_percent_in_sql_without_params_is_sent_untouched(db):
    rows = db.execute_query("SELECT count(*) AS n FROM customers WHERE email LIKE '%example.com'")
    assert rows[0]["n"] == 10


HOSTILE = [
    "'; DROP TABLE customers; --",
    "%s %(x)s %%",
    "서울' OR '1'='1",
    "\\'; SELECT pg_sleep(5); --",
    "😀\x01\t\n",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_parameters_are_bound_not_formatted(db, admin_conn, value):
    named = db.execute_query("SELECT %(v)s AS v, count(*) AS n FROM customers WHERE city = %(v)s", {"v": value})
    assert named == [{"v": value, "n": 0}]
    positional = db.execute_query("SELECT %s AS v", [value])
    assert positional[0]["v"] == value
    with admin_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM customers")
        assert cur.fetchone()[0] == 12


def test_korean_parameter_filters_rows(db):
    rows = db.execute_query("SELECT name FROM customers WHERE city = %(city)s ORDER BY id", {"city": "서울"})
    assert [r["name"] for r in rows] == ["김민준", "최수아", "장서윤", "한시우"]


def test_placeholder_mismatch_is_a_clear_query_error(db):
    with pytest.raises(QueryError, match="placeholders do not match"):
        db.execute_query("SELECT %(missing)s", {"other": 1})


def test_show_and_explain_work(db):
    assert db.execute_query("SHOW default_transaction_read_only") == [{"default_transaction_read_only": "on"}]
    plan = db.execute_query("EXPLAIN SELECT * FROM customers")
    assert "Seq Scan on customers" in plan[0]["QUERY PLAN"]


# --- row cap -------------------------------------------------------------------------


def test_row_cap_on_a_huge_result_is_fast_and_reports_more(db):
    started = time.perf_counter()
    # generate_series in the select list streams; in FROM the server would materialise it first.
    rows = db.execute_query("SELECT generate_series(1, 50000000) AS n", max_rows=1000)
    elapsed = time.perf_counter() - started
    assert len(rows) == 1000
    assert rows[0] == {"n": 1} and rows[-1] == {"n": 1000}
    assert rows.has_more is True
    # A full fetch of 50 million rows takes minutes and gigabytes; the cap must not.
    assert elapsed < 5


@pytest.mark.parametrize(
    ("total", "cap", "expected_rows", "more"),
    [(10, 10, 10, False), (10, 9, 9, True), (0, 5, 0, False), (5, 0, 0, True), (4500, None, 4500, False)],
)
def test_row_cap_edges(db, total, cap, expected_rows, more):
    rows = db.execute_query(f"SELECT g FROM generate_series(1, {total}) AS g", max_rows=cap)
    assert len(rows) == expected_rows
    assert rows.has_more is more


def test_zero_row_result_keeps_its_columns(db):
    rows = db.execute_query("SELECT id, name FROM customers WHERE false")
    assert rows == [] and rows.columns == ["id", "name"]


# --- read-only -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("DELETE FROM audit", "DELETE statements are not allowed"),
        ("insert into audit(note) values ('x')", "INSERT statements are not allowed"),
        ("COMMIT; INSERT INTO audit(note) VALUES ('x')", "only one is allowed"),
        ("SELECT 1; COMMIT; INSERT INTO audit(note) VALUES ('x')", "only one is allowed"),
        ("SET TRANSACTION READ WRITE; INSERT INTO audit(note) VALUES ('x')", "only one is allowed"),
        ("BEGIN READ WRITE; INSERT INTO audit(note) VALUES ('x'); COMMIT", "only one is allowed"),
        ("SET default_transaction_read_only = off", "SET statements are not allowed"),
        ("SET statement_timeout = 0", "SET statements are not allowed"),
        ("  -- comment\n  TRUNCATE audit", "TRUNCATE statements are not allowed"),
        ("COPY (SELECT 1) TO PROGRAM 'touch /tmp/pwned'", "COPY statements are not allowed"),
    ],
)
def test_writes_and_session_changes_are_refused(db, admin_conn, query, message):
    with pytest.raises(ReadOnlyViolation, match=message):
        db.execute_query(query)
    assert audit_count(admin_conn) == 0


# Data-modifying WITH queries are refused earlier, by the parser guard: see test_sql_guard.py.
@pytest.mark.parametrize(
    "query",
    [
        "SELECT write_audit('via function')",
        "SELECT nextval('audit_id_seq')",
    ],
)
def test_writes_hidden_in_a_select_are_refused_by_the_server(db, admin_conn, query):
    with pytest.raises(QueryError) as info:
        db.execute_query(query)
    assert audit_count(admin_conn) == 0
    assert info.value.sqlstate in ("25006", "0A000")


def test_function_write_is_reported_as_read_only_refusal(db):
    with pytest.raises(ReadOnlyViolation, match="tried to write") as info:
        db.execute_query("SELECT write_audit('x')")
    assert info.value.code == "READ_ONLY_VIOLATION"


def test_session_changes_do_not_reach_the_next_user_of_the_connection(test_db_url, admin_conn):
    # The guard refuses set_config() and pg_advisory_lock() by name; a function that calls
    # them is beyond what a parser can see, so the session reset must undo what it did.
    with admin_conn.cursor() as cur:
        cur.execute(
            "CREATE OR REPLACE FUNCTION loosen_session() RETURNS int LANGUAGE sql AS $$ "
            "SELECT set_config('default_transaction_read_only', 'off', false), "
            "set_config('statement_timeout', '0', false), pg_advisory_lock(42); SELECT 1 $$"
        )
    database = Database(make_settings(test_db_url, DB_POOL_SIZE=1, DB_STATEMENT_TIMEOUT=30))
    try:
        pid = database.execute_query("SELECT pg_backend_pid() AS pid")[0]["pid"]
        assert database.execute_query("SELECT loosen_session() AS done") == [{"done": 1}]
        after = database.execute_query(
            "SELECT pg_backend_pid() AS pid, current_setting('default_transaction_read_only') AS ro, "
            "current_setting('statement_timeout') AS timeout, "
            "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS locks"
        )[0]
        assert after == {"pid": pid, "ro": "on", "timeout": "30s", "locks": 0}
    finally:
        database.close()


def test_connection_from_connect_db_is_read_only_by_default(test_db_url, monkeypatch, admin_conn):
    monkeypatch.setenv("DATABASE_URL", test_db_url)
    conn = db_connector.connect_db()
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.errors.ReadOnlySqlTransaction):
            cur.execute("INSERT INTO audit(note) VALUES ('raw')")
    finally:
        db_connector.release_db(conn)
    assert audit_count(admin_conn) == 0


def test_no_connection_is_left_idle_in_transaction(db, admin_conn):
    db.execute_query("SELECT * FROM customers", max_rows=3)
    with admin_conn.cursor() as cur:
        cur.execute(
            "SELECT state FROM pg_stat_activity WHERE application_name = 'db_to_model_pipeline' "
            "AND datname = current_database()"
        )
        states = [row[0] for row in cur.fetchall()]
    assert states and set(states) == {"idle"}


# --- errors ------------------------------------------------------------------------


def test_syntax_error_keeps_message_sqlstate_and_position(db):
    with pytest.raises(QueryError) as info:
        db.execute_query("SELECT id,, name FROM customers")
    err = info.value
    assert err.sqlstate == "42601"
    assert err.position == 11
    text = str(err)
    assert 'syntax error at or near ","' in text
    assert "LINE 1: SELECT id,, name FROM customers" in text
    caret_line = text.splitlines()[text.splitlines().index("LINE 1: SELECT id,, name FROM customers") + 1]
    assert caret_line.index("^") == len("LINE 1: ") + 10


def test_undefined_column_shows_the_servers_hint(db):
    with pytest.raises(QueryError) as info:
        db.execute_query("SELECT nmae FROM customers")
    assert info.value.sqlstate == "42703"
    assert "Perhaps you meant" in str(info.value)


def test_statement_timeout_is_enforced_and_explained(test_db_url):
    database = Database(make_settings(test_db_url, DB_STATEMENT_TIMEOUT=0.5))
    try:
        started = time.perf_counter()
        with pytest.raises(QueryError, match="DB_STATEMENT_TIMEOUT=0.5") as info:
            database.execute_query("SELECT pg_sleep(3)")
        assert time.perf_counter() - started < 2
        assert info.value.sqlstate == "57014"
        assert database.execute_query("SELECT 1 AS ok") == [{"ok": 1}]  # still usable
    finally:
        database.close()


def test_empty_query_is_rejected(db):
    with pytest.raises(QueryError, match="empty"):
        db.execute_query("  -- nothing\n ; ")


def test_query_errors_and_connection_errors_are_distinct_types(db):
    with pytest.raises(QueryError) as info:
        db.execute_query("SELECT * FROM no_such_table")
    assert not isinstance(info.value, DBConnectionError)


# --- connecting ----------------------------------------------------------------------


def test_server_down_is_retried_with_backoff_then_explained(caplog):
    port = free_port()  # nothing listens here: connection refused
    secret = "S3ntinel-pw"
    settings = make_settings(
        f"postgresql://alice:{secret}@127.0.0.1:{port}/shopdb", DB_CONNECT_RETRIES=2, DB_CONNECT_TIMEOUT=1
    )
    delays: list[float] = []
    database = Database(settings, sleep=delays.append)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(DBConnectionError) as info:
        database.execute_query("SELECT 1")
    # Two backoff sleeps: 0.5 s and 1 s, each shortened by up to 25 % jitter.
    assert len(delays) == 2 and 0.375 <= delays[0] <= 0.5 and 0.75 <= delays[1] <= 1.0
    message = str(info.value)
    assert f"alice@127.0.0.1:{port}/shopdb" in message
    assert "after 3 attempts" in message
    assert "docker compose ps" in message and "DATABASE_URL" in message
    assert info.value.code == "DB_CONNECTION_ERROR"
    assert secret not in message and secret not in caplog.text
    assert caplog.text.count("retrying in") == 2


def test_permanent_connect_errors_are_not_retried(admin_url):
    from conftest import _with_database

    settings = make_settings(_with_database(admin_url, "no_such_database_xyz"), DB_CONNECT_RETRIES=3)
    started = time.perf_counter()
    with pytest.raises(DBConnectionError, match='database "no_such_database_xyz" does not exist'):
        Database(settings).execute_query("SELECT 1")
    assert time.perf_counter() - started < 0.5


def test_a_bad_connection_option_in_the_url_is_not_retried(test_db_url):
    sleeps: list[float] = []
    settings = make_settings(test_db_url + "?sslmode=bogus", DB_CONNECT_RETRIES=3)
    with pytest.raises(DBConnectionError, match='invalid sslmode value: "bogus"') as info:
        Database(settings, sleep=sleeps.append).execute_query("SELECT 1")
    assert sleeps == [] and "attempts" not in str(info.value)  # one attempt, no backoff


def test_db_settings_message_names_the_db_variables_without_password():
    settings = __import__("config").load_settings(
        {"DB_HOST": "127.0.0.1", "DB_PORT": free_port(), "DB_NAME": "shop", "DB_USER": "bob",
         "DB_PASSWORD": "Very$ecret", "DB_CONNECT_RETRIES": 0},
        environ={},
    )
    with pytest.raises(DBConnectionError) as info:
        Database(settings).execute_query("SELECT 1")
    text = str(info.value)
    assert "bob@127.0.0.1" in text and "DB_HOST, DB_PORT, DB_NAME, DB_USER and DB_PASSWORD" in text
    assert "Very$ecret" not in text


def test_killed_pooled_connection_is_replaced(test_db_url, admin_conn):
    database = Database(make_settings(test_db_url, DB_POOL_SIZE=1))
    try:
        first = database.execute_query("SELECT pg_backend_pid() AS pid")[0]["pid"]
        with admin_conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (first,))
        time.sleep(0.2)
        second = database.execute_query("SELECT pg_backend_pid() AS pid")[0]["pid"]
        assert second != first
        third = database.execute_query("SELECT pg_backend_pid() AS pid")[0]["pid"]
        assert third == second  # the new connection is pooled, not reopened each time
    finally:
        database.close()


def test_test_connection_true_and_false_never_raises(test_db_url, monkeypatch, caplog):
    monkeypatch.setenv("DATABASE_URL", test_db_url)
    assert db_connector.test_connection() is True
    db_connector.close_pool()
    monkeypatch.setenv("DATABASE_URL", f"postgresql://nobody@127.0.0.1:{free_port()}/x")
    monkeypatch.setenv("DB_CONNECT_RETRIES", "0")
    config.get_settings(reload=True)
    assert db_connector.test_connection() is False
    assert "Cannot connect to PostgreSQL" in caplog.text
    db_connector.close_pool()
    monkeypatch.setenv("DB_PORT", "not-a-port")
    monkeypatch.delenv("DATABASE_URL")
    config.reset_settings()
    assert db_connector.test_connection() is False
    assert "DB_PORT must be an integer" in caplog.text


def test_health_check_command_from_the_readme(test_db_url, tmp_path):
    command = "from db_connector import test_connection; print(test_connection())"
    # ENV_FILE=/dev/null: no .env, not even one beside the scripts (a developer's own settings)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DATABASE_URL": test_db_url, "ENV_FILE": os.devnull}
    ok = subprocess.run([sys.executable, "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.stdout.strip() == "True", ok.stderr
    env["DATABASE_URL"] = f"postgresql://nobody@127.0.0.1:{free_port()}/x"
    env["DB_CONNECT_RETRIES"] = "0"
    bad = subprocess.run([sys.executable, "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.stdout.strip() == "False"
    assert "Traceback" not in bad.stderr


def test_ctrl_c_cancels_a_running_query(test_db_url, admin_conn, tmp_path):
    script = textwrap.dedent(
        """
        import sys, time
        sys.path.insert(0, sys.argv[1])
        from db_connector import execute_query
        print("start", flush=True)
        try:
            execute_query("SELECT pg_sleep(30)")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
        """
    )
    env = {**os.environ, "DATABASE_URL": test_db_url}
    proc = subprocess.Popen([sys.executable, "-c", script, str(REPO_ROOT)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "start"
    time.sleep(1.0)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 130, err
    assert time.perf_counter() - sent < 3
    assert "interrupted" in out
    # The cursor's query runs in a FETCH: none of ours may still be running (cancelled, not abandoned).
    deadline = time.monotonic() + 10
    while True:
        with admin_conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'db_to_model_pipeline' "
                        "AND datname = current_database() AND state = 'active'")
            active = cur.fetchone()[0]
        if not active or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert active == 0


# --- types ---------------------------------------------------------------------------


def test_common_postgres_types_come_back_usable(db):
    row = db.execute_query(
        """
        SELECT NULL::text AS null_text, ''::text AS empty_text, 12.50::numeric(10,2) AS price,
               'NaN'::numeric AS nan_numeric,
               '2024-03-01 12:30:00+09'::timestamptz AS tstz, '2024-03-01 12:30:00'::timestamp AS ts,
               '2024-03-01'::date AS d, '1 day 02:03:04'::interval AS iv,
               '8f14e45f-ceea-467f-a0e6-000000000001'::uuid AS u, '\\x00ff10'::bytea AS b,
               '{"a": [1, null, "한글"]}'::jsonb AS jb, '[1, 2]'::json AS j,
               ARRAY[1, NULL, 3] AS arr, '{}'::int[] AS empty_arr, '한국어 텍스트 😀' AS korean,
               'infinity'::date AS inf_date, '0044-03-15 BC'::date AS bc_date,
               '-infinity'::timestamptz AS neg_inf_ts, true AS flag, 9007199254740993::bigint AS big
        """
    )[0]
    assert row["null_text"] is None and row["empty_text"] == ""
    assert row["price"] == Decimal("12.50") and str(row["price"]) == "12.50"
    assert row["nan_numeric"].is_nan()
    assert row["tstz"] == dt.datetime(2024, 3, 1, 3, 30, tzinfo=dt.timezone.utc)
    assert row["tstz"].utcoffset() is not None
    assert row["ts"] == dt.datetime(2024, 3, 1, 12, 30) and row["ts"].tzinfo is None
    assert row["d"] == dt.date(2024, 3, 1)
    assert row["iv"] == dt.timedelta(days=1, hours=2, minutes=3, seconds=4)
    assert row["u"] == uuid.UUID("8f14e45f-ceea-467f-a0e6-000000000001")
    assert bytes(row["b"]) == b"\x00\xff\x10"
    assert row["jb"] == {"a": [1, None, "한글"]} and row["j"] == [1, 2]
    assert row["arr"] == [1, None, 3] and row["empty_arr"] == []
    assert row["korean"] == "한국어 텍스트 😀"
    # Values Python's date cannot hold come back as PostgreSQL's text, not as a fake 9999-12-31.
    assert row["inf_date"] == "infinity" and row["bc_date"] == "0044-03-15 BC"
    assert row["neg_inf_ts"] == "-infinity"
    assert row["flag"] is True and row["big"] == 9007199254740993


def test_sample_data_has_the_documented_shape(db):
    counts = db.execute_query(
        "SELECT (SELECT count(*) FROM customers) AS customers, (SELECT count(*) FROM products) AS products, "
        "(SELECT count(*) FROM orders) AS orders, (SELECT count(*) FROM reviews) AS reviews"
    )[0]
    assert counts == {"customers": 12, "products": 10, "orders": 120, "reviews": 20}


# --- statement splitting (pure) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "count"),
    [
        ("SELECT 1", 1),
        ("SELECT 1;", 1),
        ("SELECT 1; SELECT 2", 2),
        ("SELECT ';' ; ", 1),
        ("SELECT 'it''s; fine'", 1),
        ("SELECT $$a;b$$; SELECT 2", 2),
        ("SELECT $x$ $$ ; $x$", 1),
        ("-- only a comment; really", 0),
        ("SELECT 1 /* a /* nested; */ still; */", 1),
        ('SELECT 1 AS "a;b"', 1),
        ("SELECT E'\\';' ; SELECT 2", 2),
        ("SELECT price$1 FROM t; SELECT 2", 2),
    ],
)
def test_split_statements(sql, count):
    assert len(split_statements(sql)) == count


def test_pool_opens_connections_on_demand_and_keeps_them(test_db_url, admin_conn):
    database = Database(make_settings(test_db_url, DB_POOL_SIZE=3))

    def backends() -> int:
        with admin_conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'db_to_model_pipeline' "
                        "AND datname = current_database()")
            return cur.fetchone()[0]

    try:
        database.execute_query("SELECT 1")
        assert backends() == 1  # a single query opens a single connection
        held = [database.acquire() for _ in range(3)]
        for conn in held:
            database.release(conn)
        assert backends() == 3  # all three returned connections stay pooled
        pids = {database.execute_query("SELECT pg_backend_pid() AS p")[0]["p"] for _ in range(5)}
        assert len(pids) == 1 and backends() == 3  # reused, not reopened
        with pytest.raises(DBConnectionError, match="All 3 pooled database connections are in use"):
            held = [database.acquire() for _ in range(3)]
            database.settings = make_settings(test_db_url, DB_POOL_SIZE=3, DB_CONNECT_TIMEOUT=1)
            database.acquire()
    finally:
        for conn in held:
            database.release(conn)
        database.close()


def test_too_many_connections_for_role_is_retried(admin_url, test_db_url):
    from urllib.parse import urlsplit, urlunsplit

    role = f"pipeline_test_limited_{os.getpid()}"  # roles are cluster-wide: other suites run too
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP ROLE IF EXISTS {role}")
        cur.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 0")
    try:
        parts = urlsplit(test_db_url)
        url = urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))
        delays: list[float] = []
        with pytest.raises(DBConnectionError, match="too many connections for role") as info:
            Database(make_settings(url, DB_CONNECT_RETRIES=1), sleep=delays.append).execute_query("SELECT 1")
        assert "after 2 attempts" in str(info.value)  # transient: retried, unlike a missing role
        assert len(delays) == 1
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP ROLE IF EXISTS {role}")
        admin.close()
