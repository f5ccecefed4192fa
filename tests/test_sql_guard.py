"""sql_guard: which statements may run, decided by PostgreSQL's parser; bypasses tried on a real server."""

from __future__ import annotations

import re
import secrets
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from hypothesis import HealthCheck, example, given, settings as hypothesis_settings, strategies as st

import sql_guard
from conftest import make_settings
from db_connector import Database
from errors import QueryError, ReadOnlyViolation
from sql_guard import Statement, check_statement, cursor_sql, split_statements

# --- allowed ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "kind", "text"),
    [
        ("SELECT 1", "SELECT", "SELECT 1"),
        ("  select 1 ;  ", "SELECT", "select 1"),
        ("/* lead */ SELECT 1 -- tail", "SELECT", "SELECT 1"),
        ("SELECT 1 /* a /* nested; */ still; */ AS x", "SELECT", "SELECT 1   AS x"),
        ("(SELECT 1) UNION ALL (SELECT 2)", "SELECT", "(SELECT 1) UNION ALL (SELECT 2)"),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r", "WITH", None),
        ("VALUES (1, 'a'), (2, 'b')", "VALUES", None),
        ("TABLE customers", "TABLE", None),
        ("SHOW statement_timeout", "SHOW", None),
        ("EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM customers", "EXPLAIN", None),
        ("EXPLAIN WITH x AS (SELECT 1) SELECT * FROM x", "EXPLAIN", None),
        ("SELECT 1 AS a$$b$", "SELECT", None),
        ("SELECT 1 AS x😀$q$", "SELECT", None),
        ("SELECT 1 AS 값$q$", "SELECT", None),
        ("SELECT $$a;b$$ AS \"한;$x\"", "SELECT", None),
        ("SELECT E'\\' ; ' AS x", "SELECT", None),
        ("SELECT U&'d\\0061t\\+000061' AS u", "SELECT", None),
        ("SELECT * FROM customers WHERE city = %(city)s AND id > %s AND email LIKE '%%@x'", "SELECT", None),
        ("SELECT 10 %s FROM (SELECT 3 AS s) AS t", "SELECT", None),  # the modulo operator, as written
        ("SELECT pg_sleep(0), current_setting('statement_timeout'), nextval('audit_id_seq')", "SELECT", None),
    ],
)
def test_reads_are_allowed(sql, kind, text):
    statement = check_statement(sql)
    assert statement.kind == kind
    if text is not None:
        assert statement.text == text
    assert statement.uses_cursor is (kind not in ("SHOW", "EXPLAIN"))
    assert sql_guard.check_read_only_query(sql) == kind


def test_placeholders_are_read_as_values_only_when_asked():
    assert check_statement("SELECT %(x)s", placeholders=True).text == "SELECT %(x)s"
    with pytest.raises(QueryError, match='syntax error at or near "%"'):
        check_statement("SELECT %(x)s", placeholders=False)


# --- refused -----------------------------------------------------------------------------

ISSUE_BYPASS = ("EXPLAIN SELECT 1 AS a$$b$; COMMIT; BEGIN READ WRITE; INSERT INTO audit(note) VALUES ($t$x$t$); "
                "COMMIT; SELECT 42 AS c$b$")

REFUSED = [
    (ISSUE_BYPASS, "6 statements (EXPLAIN, COMMIT, BEGIN, INSERT, COMMIT, SELECT); only one is allowed"),
    ("SELECT 1 AS a$$b$; COMMIT; BEGIN READ WRITE; INSERT INTO audit(note) VALUES ('x'); COMMIT; SELECT 42 AS c$b$",
     "contains 6 statements"),
    ("SELECT 1 AS x😀$q$; COMMIT; BEGIN READ WRITE; INSERT INTO audit(note) VALUES ('x'); COMMIT; SELECT 2 AS y$q$",
     "contains 6 statements"),
    ("SELECT 1 AS 값$q$; COMMIT; BEGIN READ WRITE; INSERT INTO audit(note) VALUES ('x'); COMMIT; SELECT 2 AS 끝$q$",
     "contains 6 statements"),
    ("SELECT 1 AS a$$b$; SET statement_timeout = 0; SELECT pg_sleep(0) AS c$b$", "contains 3 statements"),
    ("SELECT 1; SELEC 2", "contains 2 statements"),
    ("WITH d AS (INSERT INTO audit(note) VALUES ('cte') RETURNING id) SELECT * FROM d",
     "WITH clause contains a data-modifying statement (INSERT)"),
    ("WITH d AS (DELETE FROM audit RETURNING *) SELECT count(*) FROM d", "data-modifying statement (DELETE)"),
    ("WITH r AS (SELECT 1), u AS (UPDATE audit SET note = 'x' RETURNING 1) SELECT * FROM r",
     "data-modifying statement (UPDATE)"),
    ("SELECT * FROM (WITH d AS (DELETE FROM audit RETURNING 1) SELECT * FROM d) AS s", "data-modifying statement"),
    ("WITH x AS (SELECT 1) INSERT INTO audit(note) SELECT 'x' FROM x", "INSERT statements are not allowed"),
    ("SELECT * INTO audit_copy FROM audit", "SELECT ... INTO creates a table (audit_copy)"),
    ("SELECT * FROM customers FOR UPDATE", "FOR UPDATE locks the rows it reads"),
    ("SELECT * FROM (SELECT * FROM customers FOR KEY SHARE) AS c", "FOR KEY SHARE locks"),
    ("EXPLAIN ANALYZE INSERT INTO audit(note) VALUES ('explained')", "EXPLAIN of INSERT is not allowed"),
    ("EXPLAIN ANALYZE DELETE FROM audit", "EXPLAIN of DELETE is not allowed"),
    ("EXPLAIN ANALYZE CREATE TABLE t2 AS SELECT 1", "EXPLAIN of CREATE TABLE AS is not allowed"),
    ("EXPLAIN ANALYZE SELECT * INTO t3 FROM customers", "SELECT ... INTO creates a table"),
    ("EXPLAIN SELECT * FROM customers FOR UPDATE", "FOR UPDATE locks"),
    ("SELECT set_config('default_transaction_read_only', 'off', false)", "calls set_config()"),
    ("SELECT pg_catalog.SET_CONFIG('statement_timeout', '0', true)", "calls set_config()"),
    ("SELECT pg_advisory_lock(42)", "calls pg_advisory_lock(), which takes an advisory lock"),
    ("SELECT pg_try_advisory_xact_lock_shared(1)", "calls pg_try_advisory_xact_lock_shared()"),
    ("SELECT pg_notify('chan', 'x')", "calls pg_notify()"),
    ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity", "calls pg_terminate_backend()"),
    ("SELECT 1 WHERE pg_cancel_backend(1) IS NULL", "calls pg_cancel_backend()"),
    ("SELECT pg_reload_conf()", "calls pg_reload_conf()"),
    ("SELECT lo_export(1, '/tmp/x')", "calls lo_export(), which reads or writes files"),
    ("SELECT pg_read_file('/etc/passwd')", "calls pg_read_file()"),
    ("SELECT * FROM dblink('dbname=x', 'INSERT INTO audit(note) VALUES (1)') AS t(a text)", "calls dblink()"),
    ("SELECT query_to_xml('DELETE FROM audit', true, false, '')", "calls query_to_xml()"),
    ("DELETE FROM audit", "DELETE statements are not allowed"),
    ("MERGE INTO audit USING customers ON false WHEN NOT MATCHED THEN DO NOTHING", "MERGE statements are not allowed"),
    ("COPY (SELECT 1) TO PROGRAM 'touch /tmp/pwned'", "COPY statements are not allowed"),
    ("SET TRANSACTION READ WRITE", "SET statements are not allowed"),
    ("DELETE FRM audit", "DELETE statements are not allowed"),  # a broken write is still a write
    ("SELEC * FROM customers", "did you mean SELECT?"),
    ("CALL p()", "CALL statements are not allowed"),
    ("DECLARE c CURSOR FOR SELECT 1", "DECLARE statements are not allowed"),
]


@pytest.mark.parametrize(("sql", "message"), REFUSED)
def test_everything_else_is_refused_with_a_clear_message(sql, message):
    with pytest.raises(ReadOnlyViolation, match=_literal(message)) as info:
        check_statement(sql)
    assert info.value.code == "READ_ONLY_VIOLATION" and info.value.exit_code == 4
    assert info.value.hint


@pytest.mark.parametrize(
    ("sql", "message", "position"),
    [
        ("SELECT id,, name FROM customers", 'syntax error at or near ","', 11),
        ("SELECT '한글' ,, 1", 'syntax error at or near ","', 14),
        ("SELECT 1 FROM", "syntax error at end of input", 14),
        ("SELECT 'unterminated", "unterminated quoted string", 8),
        ("SELECT 1; SELECT 'unterminated", "unterminated quoted string", 18),
        ("SELECT * FROM table LIMIT 10", 'syntax error at or near "table"', 15),
    ],
)
def test_syntax_errors_carry_postgresqls_message_position_and_caret(sql, message, position):
    with pytest.raises(QueryError) as info:
        check_statement(sql)
    err = info.value
    assert not isinstance(err, ReadOnlyViolation)
    assert err.sqlstate == "42601" and err.position == position
    assert message in err.message
    lines = err.message.splitlines()
    assert lines[1].startswith("LINE 1: ") and lines[2].index("^") == len("LINE 1: ") + position - 1


def test_table_placeholder_gets_its_fix():
    with pytest.raises(QueryError) as info:
        check_statement("SELECT * FROM table LIMIT 10")
    assert '"table" in the examples stands for your table' in info.value.hint


@pytest.mark.parametrize("sql", ["", "  ", "-- only a comment; really", " ; ; ", "/* */"])
def test_empty_query_is_an_error(sql):
    with pytest.raises(QueryError, match="The query is empty"):
        check_statement(sql)


def test_nul_character_is_refused():
    # libpq and the parser both stop at NUL, so "SELECT 1\0; DELETE ..." must not look like one SELECT.
    with pytest.raises(QueryError, match="NUL character"):
        check_statement("SELECT 1\x00; DELETE FROM audit")


def test_absurdly_deep_nesting_is_refused_cleanly():
    with pytest.raises(QueryError, match="nested too deeply"):
        check_statement("SELECT " + "+".join(["1"] * 5000))


def test_cursor_sql_wraps_one_statement_and_refuses_the_rest():
    assert cursor_sql("c", check_statement("SELECT 1")) == "DECLARE c NO SCROLL CURSOR FOR SELECT 1"
    with pytest.raises(ValueError):
        cursor_sql("c", check_statement("SHOW search_path"))
    with pytest.raises(ReadOnlyViolation):  # a hand-made Statement the guard never saw
        cursor_sql("c", Statement("SELECT", "SELECT 1; DELETE FROM audit"))


@pytest.mark.parametrize(
    ("sql", "count"),
    [
        ("SELECT 1 AS a$$b$; COMMIT", 2),
        ("SELECT 1 AS x😀$q$; SELECT 2 AS y$q$", 2),
        ("SELECT $q$;$q$", 1),
        ("SELECT 1; garbage that does not parse; SELECT 2", 3),
    ],
)
def test_split_statements_agrees_with_postgresqls_lexer(sql, count):
    assert len(split_statements(sql)) == count


def _literal(text: str) -> str:
    return re.escape(text)


# --- against the real server: nothing is written -------------------------------------------


@pytest.fixture(scope="module")
def reader_url(test_db_url: str) -> Iterator[str]:
    """URL of a throwaway login role that may only SELECT in the test database."""
    role = f"pipeline_reader_{secrets.token_hex(4)}"
    admin = psycopg2.connect(test_db_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN")
        cur.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    parts = urlsplit(test_db_url)
    try:
        yield urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port or 5432}"))
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
            )
            cur.execute(f"DROP OWNED BY {role}")
            cur.execute(f"DROP ROLE IF EXISTS {role}")
        admin.close()


@pytest.fixture(params=["owner", "select-only role"])
def any_role_db(request, test_db_url) -> Iterator[Database]:
    url = test_db_url if request.param == "owner" else request.getfixturevalue("reader_url")
    database = Database(make_settings(url))
    yield database
    database.close()


def _audit_rows(admin_conn) -> int:
    with admin_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM audit")
        return cur.fetchone()[0]


def _table_exists(admin_conn, name: str) -> bool:
    with admin_conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
        return cur.fetchone()[0]


def test_the_issues_bypass_really_writes_without_the_guard(test_db_url, admin_conn):
    # The control: sent as one string inside BEGIN READ ONLY, PostgreSQL runs all six statements
    # and commits the INSERT. This is what the guard has to stop.
    table = f"bypass_probe_{secrets.token_hex(3)}"
    with admin_conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (what text)")
    conn = psycopg2.connect(test_db_url, options="-c default_transaction_read_only=on")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("BEGIN READ ONLY")
            cur.execute(ISSUE_BYPASS.replace("INSERT INTO audit(note)", f"INSERT INTO {table}(what)"))
            cur.execute("ROLLBACK")
        with admin_conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            assert cur.fetchone()[0] == 1  # committed, despite READ ONLY
    finally:
        conn.close()
        with admin_conn.cursor() as cur:
            cur.execute(f"DROP TABLE {table}")


@pytest.mark.parametrize(("sql", "message"), [case for case in REFUSED if "audit" in case[0]])
def test_bypasses_write_nothing_as_owner_or_select_only_role(any_role_db, admin_conn, sql, message):
    with pytest.raises(ReadOnlyViolation, match=_literal(message)):
        any_role_db.execute_query(sql)
    with pytest.raises(ReadOnlyViolation):
        with any_role_db.stream_rows(sql):
            pass
    assert _audit_rows(admin_conn) == 0
    assert not _table_exists(admin_conn, "audit_copy")


def test_statement_timeout_cannot_be_lifted(test_db_url, admin_conn):
    database = Database(make_settings(test_db_url, DB_STATEMENT_TIMEOUT=0.5))
    try:
        with pytest.raises(ReadOnlyViolation):
            database.execute_query("SELECT 1 AS a$$b$; SET statement_timeout = 0; SELECT pg_sleep(3) AS c$b$")
        with pytest.raises(ReadOnlyViolation, match="set_config"):
            database.execute_query("SELECT set_config('statement_timeout', '0', false), pg_sleep(3)")
        with pytest.raises(QueryError, match="DB_STATEMENT_TIMEOUT=0.5"):
            database.execute_query("SELECT pg_sleep(3)")
    finally:
        database.close()


def test_a_placeholder_inside_quotes_cannot_smuggle_a_second_statement(db, admin_conn):
    # psycopg2 formats the quoted value into the quotes: SELECT ''; INSERT ...; --'' is two statements.
    hostile = "; INSERT INTO audit(note) VALUES ('smuggled'); --"
    with pytest.raises(ReadOnlyViolation, match="2 statements"):
        db.execute_query("SELECT '%s' AS x", [hostile])
    assert _audit_rows(admin_conn) == 0
    assert db.execute_query("SELECT %s AS x", [hostile]) == [{"x": hostile}]  # bound as a value: fine


@pytest.mark.parametrize(
    ("sql", "row"),
    [
        ("SELECT 1 AS a$$b$", {"a$$b$": 1}),
        ("SELECT 1 AS x😀$q$", {"x😀$q$": 1}),
        ("SELECT 2 AS 값$q$", {"값$q$": 2}),
        ("SELECT price$1 FROM (SELECT 5 AS price$1) AS t", {"price$1": 5}),
        ("SELECT $$a;b$$ AS \"한;$x\"", {"한;$x": "a;b"}),
        ("WITH 고객$ AS (SELECT name FROM customers WHERE id = 1) SELECT name AS 이름 FROM 고객$", {"이름": "김민준"}),
    ],
)
def test_legitimate_identifiers_with_dollars_and_hangul_still_run(any_role_db, sql, row):
    assert any_role_db.execute_query(sql) == [row]


def test_a_function_that_writes_is_stopped_by_the_next_layers(any_role_db, admin_conn):
    # The parser cannot see inside write_audit(); the READ ONLY transaction (and, for the
    # SELECT-only role, its privileges) stop the write.
    with pytest.raises(QueryError) as info:
        any_role_db.execute_query("SELECT write_audit('hidden in a function')")
    assert info.value.sqlstate in ("25006", "42501")
    assert _audit_rows(admin_conn) == 0


# --- property: what the guard accepts as one statement, PostgreSQL parses as one -------------

_IDENT = st.sampled_from(["a", "a$", "a$$b$", "x😀$q$", "값$q$", "_1", "\"q;$\"", "\"\"\"\"", "가나다", "b$c$"])
_LITERAL = st.sampled_from([
    "1", "'x'", "';'", "''''", "$$;$$", "$q$ ; $ $$ $q$", "E'\\';'", "E'\\\\'", "U&'\\0041'", "B'01'",
    "'--'", "'/*'", "1.5e3", "NULL", "$a$x$a$",
])
_GAP = st.sampled_from([" ", "\n", " -- c; $$ '\n", " /* ; $x$ ' */ ", " /* /* ; */ */ ", "\t"])
_NOISE = st.sampled_from([";", "$", "$$", "'", "\"", "--", "/*", "*/", "\n", "E'", "\\", "$q$", "😀", "$1"])


@st.composite
def _sql_texts(draw) -> str:
    items = draw(st.lists(st.tuples(_LITERAL, _IDENT), min_size=1, max_size=4))
    parts = ["SELECT"]
    for i, (value, name) in enumerate(items):
        parts += [draw(_GAP), value, draw(_GAP), "AS", draw(_GAP), name] + ([","] if i < len(items) - 1 else [])
    text = "".join(parts)
    for _ in range(draw(st.integers(0, 3))):  # splice in fragments that could confuse a splitter
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(_NOISE) + text[at:]
    return text + draw(st.sampled_from(["", ";", " ; -- end", "\n"]))


@pytest.fixture
def reader_conn(reader_url) -> Iterator[psycopg2.extensions.connection]:
    conn = psycopg2.connect(reader_url, options="-c default_transaction_read_only=on")
    conn.autocommit = True
    yield conn
    conn.close()


@hypothesis_settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_sql_texts())
@example(text="SELECT 1 AS a, 1 AS a, '''' AS -- c; $$ '\na$$b$, /* ; $x$ ' */ $a$x$a$ /* ; $x$ '*/ */ $1AS a")
def test_property_one_statement_for_the_guard_is_one_for_postgresql(reader_conn, text):
    try:
        statement = check_statement(text, placeholders=False)
    except (QueryError, ReadOnlyViolation):
        return  # refused: nothing is sent
    # Sent as the pipeline sends it, as the SELECT-only role inside a rolled-back READ ONLY
    # transaction. Had the server read more than one statement, the status would be the last one's.
    with reader_conn.cursor() as cur:
        cur.execute("BEGIN READ ONLY")
        try:
            cur.execute(f"DECLARE probe NO SCROLL CURSOR FOR {statement.text}")  # the server alone judges
            assert cur.statusmessage == "DECLARE CURSOR", (text, cur.statusmessage)
            cur.execute("FETCH ALL FROM probe")
            assert len(cur.fetchall()) == 1, text
        except psycopg2.Error as exc:
            assert exc.pgcode != "42601", (text, exc.pgerror)  # PostgreSQL parsed it differently
        finally:
            cur.execute("ROLLBACK")


@pytest.mark.parametrize("query", ["SELECT $1", "SELECT 1 AS a WHERE 1 = $2", "SELECT 1 AS x, $1AS a",
                                   "VALUES ($1)", "EXPLAIN SELECT $1"])
def test_positional_parameters_are_refused_with_the_param_flag_to_use(query):
    with pytest.raises(QueryError) as info:
        check_statement(query, placeholders=False)
    assert "a positional parameter" in info.value.message and "--param name=value" in info.value.hint


def test_dollar_signs_that_are_not_parameters_still_run(db):
    rows = db.execute_query("SELECT '$1' AS \"$1\", 2 AS a$1")
    assert rows == [{"$1": "$1", "a$1": 2}]
