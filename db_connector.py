"""PostgreSQL access: a lazily created pool and read-only, bounded queries.

Public functions (users call them from ``python -c`` and their scripts):
``connect_db()``, ``release_db(conn)``, ``execute_query(query, params=None, max_rows=None)``,
``test_connection()`` and ``close_pool()``. They use a default :class:`Database`
built from the environment/.env; code that has a ``Settings`` uses ``Database(settings)``.

Read-only is a safety net against accidents, not a security boundary (use a
SELECT-only role for that, see the README): every user query must be one
statement starting with SELECT, WITH, VALUES, TABLE, SHOW or EXPLAIN; it runs
inside ``BEGIN READ ONLY`` on a session whose default is read-only, is always
rolled back, and the session is reset (``DISCARD ALL``) before the connection
goes back to the pool.
"""

from __future__ import annotations

import difflib
import logging
import random
import re
import threading
import time
from typing import Any, Callable, Mapping, Sequence, TypeVar

import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext
import psycopg2.extras
import psycopg2.pool

from config import Settings, get_settings, mask_secrets
from errors import ConfigError, DBConnectionError, QueryError, ReadOnlyViolation

logger = logging.getLogger(__name__)

Params = Sequence[Any] | Mapping[str, Any] | None
T = TypeVar("T")

FETCH_BATCH = 2000  # rows per FETCH round trip, as psycopg2's itersize default
_CURSOR_NAME = "pipeline_cursor"
_DECLARE_PREFIX = f"DECLARE {_CURSOR_NAME} NO SCROLL CURSOR FOR "
_CURSOR_KEYWORDS = {"SELECT", "WITH", "VALUES", "TABLE"}
_CLIENT_CURSOR_KEYWORDS = {"SHOW", "EXPLAIN"}
# PostgreSQL commands that are not reads: refused by name. Anything else is probably a typo.
_OTHER_COMMANDS = set(
    "INSERT UPDATE DELETE MERGE TRUNCATE COPY CREATE ALTER DROP GRANT REVOKE SET RESET BEGIN START COMMIT "
    "ROLLBACK END ABORT SAVEPOINT RELEASE PREPARE EXECUTE DEALLOCATE LOCK VACUUM ANALYZE ANALYSE CLUSTER "
    "REINDEX REFRESH CALL DO LISTEN NOTIFY UNLISTEN DISCARD LOAD SECURITY COMMENT IMPORT DECLARE FETCH MOVE "
    "CLOSE CHECKPOINT REASSIGN".split()
)

# libpq connect failures that retrying cannot fix (RELIABILITY.md 1.1); anything
# else (refused, timeout, starting up, too many clients, unknown text) is retried.
_PERMANENT_CONNECT_ERRORS = (
    "password authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "name or service not known",
    "nodename nor servname",
    "no password supplied",
    "invalid connection option",
    "invalid dsn",
    "invalid integer value",
    "permission denied",
)


class QueryResult(list):
    """The rows as a list of dicts, plus ``columns`` and ``has_more`` (a row cap cut the result)."""

    def __init__(self, rows: list[dict[str, Any]], columns: list[str], has_more: bool = False) -> None:
        super().__init__(rows)
        self.columns = columns
        self.has_more = has_more


# --- query inspection ---------------------------------------------------------------

_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def split_statements(sql: str) -> list[str]:
    """Split SQL on top-level semicolons, aware of quotes, dollar quotes and comments.

    Returns the non-empty statements with comments removed from their edges.
    """
    statements: list[str] = []
    current: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        if ch == "-" and nxt == "-":
            end = sql.find("\n", i)
            i = n if end < 0 else end
            current.append(" ")
            continue
        if ch == "/" and nxt == "*":
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            current.append(" ")
            continue
        if ch in ("'", '"'):
            # E'' strings allow backslash escapes; doubled quotes escape everywhere.
            escapes = ch == "'" and i > 0 and sql[i - 1] in "eE" and (i < 2 or not (sql[i - 2].isalnum() or sql[i - 2] == "_"))
            j = i + 1
            while j < n:
                if escapes and sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == ch:
                    if j + 1 < n and sql[j + 1] == ch:
                        j += 2
                        continue
                    break
                j += 1
            current.append(sql[i : j + 1])
            i = j + 1
            continue
        if ch == "$":
            match = _DOLLAR_TAG.match(sql, i)
            if match and not (i > 0 and (sql[i - 1].isalnum() or sql[i - 1] == "_")):
                tag = match.group(0)
                end = sql.find(tag, match.end())
                end = n if end < 0 else end + len(tag)
                current.append(sql[i:end])
                i = end
                continue
        if ch == ";":
            statements.append("".join(current))
            current = []
            i += 1
            continue
        current.append(ch)
        i += 1
    statements.append("".join(current))
    return [s.strip() for s in statements if s.strip()]


def first_keyword(statement: str) -> str:
    """The statement's first word, upper-cased, skipping opening parentheses."""
    match = re.match(r"[\s(]*([A-Za-z]+)", statement)
    return match.group(1).upper() if match else ""


def check_read_only_query(query: str) -> str:
    """Validate a user query; return its first keyword.

    Raises:
        QueryError: empty query.
        ReadOnlyViolation: several statements, or a statement that is not a read.
    """
    return _read_only_statement(query)[0]


def _read_only_statement(query: str) -> tuple[str, str]:
    """(first keyword, the single statement without comments) of a valid read-only query."""
    statements = split_statements(query)
    if not statements:
        raise QueryError(
            "The query is empty.",
            hint='Fix: give a SELECT statement, e.g. --query "SELECT * FROM customers LIMIT 10".',
        )
    if len(statements) > 1:
        raise ReadOnlyViolation(
            f"Refused: the query contains {len(statements)} statements; only one is allowed.",
            hint="Fix: send a single SELECT (a trailing semicolon is fine). "
            "Several statements could switch the transaction to read-write.",
        )
    keyword = first_keyword(statements[0])
    allowed = _CURSOR_KEYWORDS | _CLIENT_CURSOR_KEYWORDS
    if keyword not in allowed and keyword not in _OTHER_COMMANDS:
        guess = difflib.get_close_matches(keyword, sorted(allowed), n=1)
        raise ReadOnlyViolation(
            f"Refused: the query starts with {keyword or statements[0][:20]!r}, which is not a read statement"
            + (f" (did you mean {guess[0]}?)." if guess else "."),
            hint="Fix: use SELECT, WITH ... SELECT, VALUES, TABLE, SHOW or EXPLAIN.",
        )
    if keyword not in allowed:
        raise ReadOnlyViolation(
            f"Refused: {keyword} statements are not allowed; this pipeline only reads data.",
            hint="Fix: use SELECT, WITH ... SELECT, VALUES, TABLE, SHOW or EXPLAIN. "
            "To change data, use psql with a role that is allowed to write.",
        )
    return keyword, statements[0]


# --- connect: retries, classification, messages ------------------------------------


def _is_permanent(message: str) -> bool:
    text = message.lower()
    if "temporary failure in name resolution" in text:
        return False
    return any(fragment in text for fragment in _PERMANENT_CONNECT_ERRORS)


def _first_lines(message: str, limit: int = 3) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " / ".join(lines[:limit])


def _caster(base: Any, name: str) -> Any:
    """A type caster that returns PostgreSQL's text where Python cannot hold the value.

    ``infinity``, BC dates and years past 9999 would otherwise become ``date.max``
    (indistinguishable from a real 9999-12-31) or fail the whole fetch.
    """

    def cast(value: str | None, cursor: Any) -> Any:
        if value is None:
            return None
        if "infinity" in value or value.endswith(" BC"):
            return value
        try:
            return base(value, cursor)
        except ValueError:
            return value

    return ext.new_type(base.values, name, cast)


_TOLERANT_TYPES = [
    _caster(ext.PYDATE, "PIPELINE_DATE"),
    _caster(ext.PYDATETIME, "PIPELINE_TIMESTAMP"),
    _caster(ext.PYDATETIMETZ, "PIPELINE_TIMESTAMPTZ"),
]


class _RetryingPool(psycopg2.pool.ThreadedConnectionPool):
    """ThreadedConnectionPool whose new connections come from our connect function."""

    def __init__(self, size: int, opener: Callable[[], ext.connection]) -> None:
        self._opener = opener
        # Open connections on demand (a one-query CLI run needs one), yet keep every
        # returned one: putconn keeps a connection only while fewer than minconn are idle.
        super().__init__(0, size)
        self.minconn = size

    def _connect(self, key: Any = None) -> ext.connection:  # noqa: D401 - psycopg2 hook
        conn = self._opener()
        if key is not None:
            self._used[key] = conn
            self._rused[id(conn)] = key
        else:
            self._pool.append(conn)
        return conn


class Database:
    """A connection pool for one database, with read-only query execution."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool: _RetryingPool | None = None
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(settings.db_pool_size)

    # -- connections --

    def _connect_kwargs(self) -> dict[str, Any]:
        s = self.settings
        options = [
            "-c default_transaction_read_only=on",
            f"-c statement_timeout={int(s.db_statement_timeout * 1000)}",
            "-c idle_in_transaction_session_timeout=60000",
        ]
        kwargs = s.db_connect_kwargs()
        kwargs.update(
            connect_timeout=s.db_connect_timeout,
            application_name="db_to_model_pipeline",
            client_encoding="UTF8",
            options=" ".join(options),
            # Notice a LAN that drops mid-query in about a minute, not hours (RELIABILITY 1.3).
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
            keepalives_count=3,
        )
        return kwargs

    def _open_connection(self) -> ext.connection:
        """Open one configured connection, retrying transient failures with backoff."""
        s = self.settings
        kwargs = self._connect_kwargs()
        attempts = s.db_connect_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                conn = psycopg2.connect(**kwargs)
            except psycopg2.OperationalError as exc:
                message = mask_secrets(_first_lines(str(exc)), s.secrets())
                permanent = _is_permanent(message)
                if permanent or attempt == attempts:
                    raise self._connection_error(message, attempt) from None
                delay = min(0.5 * 2 ** (attempt - 1), 8.0) * (1 - 0.25 * random.random())
                logger.warning(
                    "Database connection to %s failed (attempt %d of %d): %s; retrying in %.1f s",
                    s.db_display(), attempt, attempts, message, delay,
                )
                time.sleep(delay)
                continue
            conn.autocommit = True  # we issue BEGIN READ ONLY / ROLLBACK ourselves
            psycopg2.extras.register_uuid(conn_or_curs=conn)
            for caster in _TOLERANT_TYPES:
                ext.register_type(caster, conn)
            encoding = conn.get_parameter_status("server_encoding")
            if encoding == "SQL_ASCII":
                logger.warning(
                    "Database %s has server encoding SQL_ASCII: non-ASCII text may fail to decode.",
                    s.db_display(),
                )
            logger.info(
                "Connected to PostgreSQL %s at %s", conn.get_parameter_status("server_version"), s.db_display()
            )
            return conn
        raise AssertionError("unreachable")

    def _connection_error(self, message: str, attempts: int) -> DBConnectionError:
        s = self.settings
        tried = f" after {attempts} attempts" if attempts > 1 else ""
        settings_hint = (
            "DATABASE_URL" if s.database_url else "DB_HOST, DB_PORT, DB_NAME, DB_USER and DB_PASSWORD"
        )
        return DBConnectionError(
            f"Cannot connect to PostgreSQL at {s.db_display()}{tried}: {message}",
            hint=(
                "Fix: is the database running? With the bundled sample database: "
                "`docker compose ps`, then `docker compose up -d`.\n"
                f"     Are {settings_hint} right in .env? "
                "Check with: python -c \"from db_connector import test_connection; print(test_connection())\""
            ),
        )

    def _get_pool(self) -> _RetryingPool:
        with self._lock:
            if self._pool is None or self._pool.closed:
                self._pool = _RetryingPool(self.settings.db_pool_size, self._open_connection)
            return self._pool

    def acquire(self) -> ext.connection:
        """Borrow a connection (waits up to DB_CONNECT_TIMEOUT for a free one)."""
        if not self._slots.acquire(timeout=self.settings.db_connect_timeout):
            raise DBConnectionError(
                f"All {self.settings.db_pool_size} pooled database connections are in use.",
                hint="Fix: return connections with release_db(conn), or raise DB_POOL_SIZE.",
            )
        try:
            return self._get_pool().getconn()
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: ext.connection, broken: bool = False) -> None:
        """Return a connection: rolled back and reset, or discarded if it broke."""
        pool = self._pool
        try:
            if not conn.closed and not broken:
                try:
                    _rollback_quietly(conn)
                    if not conn.autocommit:
                        conn.autocommit = True
                    with conn.cursor() as cur:
                        cur.execute("DISCARD ALL")  # undo any session state a query left
                except psycopg2.Error:
                    broken = True
            if pool is not None and not pool.closed:
                pool.putconn(conn, close=broken or bool(conn.closed))
            else:
                conn.close()
        finally:
            self._slots.release()

    def close(self) -> None:
        """Close every pooled connection; the next call reconnects."""
        with self._lock:
            if self._pool is not None and not self._pool.closed:
                self._pool.closeall()
            self._pool = None

    # -- queries --

    def execute_query(self, query: str, params: Params = None, max_rows: int | None = None) -> QueryResult:
        """Run one read-only query and return its rows as dicts (see module docstring).

        Args:
            query: one SELECT/WITH/VALUES/TABLE/SHOW/EXPLAIN statement; placeholders ``%s`` / ``%(name)s``.
            params: values bound by psycopg2, never formatted into the SQL by us.
            max_rows: fetch at most this many rows through a server-side cursor;
                ``result.has_more`` tells whether more existed.

        Raises:
            ReadOnlyViolation, QueryError, DBConnectionError.
        """
        if max_rows is not None and max_rows < 0:
            raise QueryError(f"max_rows must be 0 or more, got {max_rows}.")
        # The statement runs without its comments, so a % in a comment cannot confuse psycopg2's
        # parameter binding, and a caret always points into what was sent.
        keyword, statement = _read_only_statement(query)
        logger.debug("SQL: %s | params: %r | max_rows: %s", statement, params, max_rows)
        started = time.perf_counter()
        for attempt in (1, 2):
            conn = self.acquire()
            broken = False
            try:
                result = _run_interruptibly(
                    conn, lambda: self._run(conn, statement, params, max_rows, keyword)
                )
            except psycopg2.Error as exc:
                broken = bool(conn.closed)
                if broken and attempt == 1 and isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
                    # The pooled connection was dead (server restarted, backend killed).
                    logger.warning("Database connection was lost (%s); retrying once on a new connection",
                                   _first_lines(str(exc), 1))
                    continue
                raise self._query_error(exc, statement, params) from None
            finally:
                self.release(conn, broken=broken)
            logger.info(
                "Query returned %d row(s)%s in %.3f s",
                len(result), " (more rows available)" if result.has_more else "", time.perf_counter() - started,
            )
            return result
        raise AssertionError("unreachable")

    def _run(self, conn: ext.connection, statement: str, params: Params, max_rows: int | None,
             keyword: str) -> QueryResult:
        with conn.cursor() as cur:
            cur.execute("BEGIN TRANSACTION READ ONLY")
            try:
                if keyword in _CURSOR_KEYWORDS:
                    _execute(cur, _DECLARE_PREFIX + statement, params)
                    rows, columns, has_more = _fetch_cursor(cur, max_rows)
                else:
                    _execute(cur, statement, params)
                    rows, columns, has_more = _fetch_client(cur, max_rows)
            finally:
                _rollback_quietly(conn)
        names = _unique_names(columns)
        return QueryResult([dict(zip(names, row)) for row in rows], names, has_more)

    def _query_error(self, exc: psycopg2.Error, statement: str, params: Params) -> QueryError | DBConnectionError:
        if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) and exc.pgcode is None:
            return DBConnectionError(
                f"The connection to PostgreSQL at {self.settings.db_display()} was lost during the query "
                f"(also on a fresh connection): {mask_secrets(_first_lines(str(exc)), self.settings.secrets())}",
                hint="Fix: check that the server is up (docker compose ps) and the network to it; "
                "the server log may say why it closed the connection.",
            )
        diag = exc.diag
        primary = diag.message_primary or _first_lines(str(exc), 1)
        sqlstate = exc.pgcode
        lines = [f"Query failed: {primary}" + (f" (SQLSTATE {sqlstate})" if sqlstate else "")]
        if diag.message_detail:
            lines.append(f"Detail: {diag.message_detail}")
        position = None
        if diag.statement_position:
            offset = int(diag.statement_position) - (len(_DECLARE_PREFIX) if _declared(exc) else 0)
            if 1 <= offset <= len(statement):
                position = offset
                if params is None:
                    lines.extend(_caret(statement, offset))
        hint = f"Hint: {diag.message_hint}" if diag.message_hint else None
        if sqlstate == "42601" and position and re.match(r"(?i)table\b", statement[position - 1 :]):
            hint = (
                'Fix: "table" in the examples stands for your table\'s name, e.g. SELECT * FROM customers LIMIT 10.\n'
                "     List the tables: SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        if isinstance(exc, psycopg2.errors.ReadOnlySqlTransaction):
            return ReadOnlyViolation(
                "Refused: the query tried to write, and this pipeline runs queries read-only "
                f"({primary}).",
                hint="Fix: use a plain SELECT. To change data, use psql with a role that may write.",
                sqlstate=sqlstate,
            )
        if isinstance(exc, psycopg2.errors.QueryCanceled) and "statement timeout" in primary:
            hint = (f"Fix: the query ran longer than DB_STATEMENT_TIMEOUT={self.settings.db_statement_timeout:g} s; "
                    "add a WHERE/LIMIT, or raise DB_STATEMENT_TIMEOUT in .env (0 = no limit).")
        elif isinstance(exc, psycopg2.errors.InsufficientPrivilege):
            hint = (hint + "\n" if hint else "") + "Fix: grant this role SELECT on the table, or connect as another DB_USER."
        return QueryError("\n".join(lines), hint=hint, sqlstate=sqlstate, position=position)

    def test_connection(self) -> bool:
        """True if a query round trip works; False (with the reason logged) otherwise. Never raises."""
        try:
            rows = self.execute_query("SELECT 1 AS ok")
            return bool(rows and rows[0]["ok"] == 1)
        except (DBConnectionError, QueryError, ConfigError) as exc:
            logger.error("Database connection test failed: %s", exc)
            return False
        except Exception as exc:  # noqa: BLE001 - the contract is "never raises"
            logger.error("Database connection test failed unexpectedly: %r", exc)
            return False

    def server_info(self) -> dict[str, Any]:
        """Server version, database, user, whether sessions default to read-only, superuser (for ``--check``)."""
        row = self.execute_query(
            "SELECT current_setting('server_version') AS server_version, current_database() AS database, "
            "current_user AS user, current_setting('default_transaction_read_only') = 'on' AS read_only, "
            "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser"
        )[0]
        return {**row, "superuser": bool(row["superuser"])}


def _rollback_quietly(conn: ext.connection) -> None:
    """End whatever transaction is open; a dead connection is left for the caller to discard."""
    if conn.closed:
        return
    try:
        if conn.info.transaction_status != ext.TRANSACTION_STATUS_IDLE:
            if conn.autocommit:
                with conn.cursor() as cur:
                    cur.execute("ROLLBACK")
            else:
                conn.rollback()
    except psycopg2.Error:
        pass


def _declared(exc: psycopg2.Error) -> bool:
    """Whether the failed statement was our DECLARE wrapper (positions then include its prefix)."""
    query = getattr(getattr(exc, "cursor", None), "query", None)
    if query is None:
        return True
    return query.startswith(_DECLARE_PREFIX.encode())


def _caret(statement: str, position: int) -> list[str]:
    """The statement's line containing 1-based ``position`` and a caret under it."""
    before = statement[: position - 1]
    line_no = before.count("\n")
    line = statement.split("\n")[line_no]
    column = len(before) - (before.rfind("\n") + 1)
    prefix = f"LINE {line_no + 1}: "
    return [prefix + line, " " * (len(prefix) + column) + "^"]


def _execute(cur: ext.cursor, sql: str, params: Params) -> None:
    # Without params, psycopg2 must not %-interpolate: "LIKE 'a%'" would break (RELIABILITY 4.2).
    if params is None:
        cur.execute(sql)
    else:
        try:
            cur.execute(sql, params)
        except (IndexError, KeyError, TypeError, psycopg2.ProgrammingError) as exc:
            if isinstance(exc, psycopg2.ProgrammingError) and exc.pgcode is not None:
                raise  # a real server error, reported by _query_error
            raise QueryError(
                f"The query's placeholders do not match the parameters given ({type(exc).__name__}: {exc}).",
                hint="Fix: use %(name)s for each --param name=value (or %s for positional values); "
                "write a literal % as %%.",
            ) from None


def _fetch_cursor(cur: ext.cursor, max_rows: int | None) -> tuple[list[tuple], list[str], bool]:
    rows: list[tuple] = []
    description = None
    while True:
        want = FETCH_BATCH if max_rows is None else min(FETCH_BATCH, max_rows + 1 - len(rows))
        cur.execute(f"FETCH FORWARD {want} FROM {_CURSOR_NAME}")
        description = cur.description
        batch = cur.fetchall()
        rows.extend(batch)
        if len(batch) < want or (max_rows is not None and len(rows) > max_rows):
            break
    has_more = max_rows is not None and len(rows) > max_rows
    if has_more:
        del rows[max_rows:]
    return rows, [d.name for d in description or ()], has_more


def _fetch_client(cur: ext.cursor, max_rows: int | None) -> tuple[list[tuple], list[str], bool]:
    if cur.description is None:
        return [], [], False
    rows = cur.fetchall() if max_rows is None else cur.fetchmany(max_rows + 1)
    has_more = max_rows is not None and len(rows) > max_rows
    return rows[: max_rows] if has_more else rows, [d.name for d in cur.description], has_more


def _unique_names(columns: list[str]) -> list[str]:
    """Keep every column: a repeated name (two ``?column?``) gets `` (2)``, `` (3)``..."""
    seen: dict[str, int] = {}
    names = []
    for name in columns:
        count = seen.get(name, 0) + 1
        seen[name] = count
        names.append(name if count == 1 else f"{name} ({count})")
    return names


def _run_interruptibly(conn: ext.connection, work: Callable[[], T]) -> T:
    """Run ``work`` so that Ctrl-C cancels the running query instead of waiting for it.

    psycopg2 blocks in C, so the SIGINT handler only runs after the query ends
    (RELIABILITY 3.4). In the main thread the query runs in a worker thread; on
    KeyboardInterrupt we send a cancel request and re-raise.
    """
    if threading.current_thread() is not threading.main_thread():
        return work()
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="db-query", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.05)
    except KeyboardInterrupt:
        logger.warning("Interrupted: cancelling the running query")
        try:
            conn.cancel()
        except psycopg2.Error:
            pass
        worker.join(5)
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


# --- module-level API on a default Database -----------------------------------------

_default: Database | None = None
_default_lock = threading.Lock()


def get_database(settings: Settings | None = None) -> Database:
    """The process-wide default Database (built from the environment/.env on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Database(settings or get_settings())
        return _default


def connect_db() -> ext.connection:
    """Borrow a pooled connection (read-only by default). Give it back with ``release_db(conn)``."""
    return get_database().acquire()


def release_db(conn: ext.connection) -> None:
    """Return a connection obtained from ``connect_db()`` to the pool."""
    get_database().release(conn, broken=bool(conn.closed))


def execute_query(query: str, params: Params = None, max_rows: int | None = None) -> QueryResult:
    """Run one read-only query on the default database; see :meth:`Database.execute_query`."""
    return get_database().execute_query(query, params, max_rows)


def test_connection() -> bool:
    """True if the configured database answers a query; False (reason logged) otherwise."""
    try:
        database = get_database()
    except Exception as exc:  # noqa: BLE001 - e.g. ConfigError; the contract is "never raises"
        logger.error("Database connection test failed: %s", exc)
        return False
    return database.test_connection()


test_connection.__test__ = False  # not a pytest test, despite its name


def close_pool() -> None:
    """Close the default pool's connections (safe to call any time)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        _default = None
