"""PostgreSQL access: a pool of read-only sessions and bounded queries.

Public functions (users call them from ``python -c`` and their scripts):
``connect_db()``, ``release_db(conn)``, ``execute_query(query, params=None, max_rows=None)``,
``test_connection()`` and ``close_pool()``. They use a default :class:`Database`
built from the environment/.env; code that has a ``Settings`` uses ``Database(settings)``,
which also offers :meth:`Database.stream_rows` and :meth:`Database.cancel_all`.

What may run, and the layers that hold it:

1. ``sql_guard`` (PostgreSQL's own parser) lets through exactly one statement of a
   reading kind (SELECT, VALUES, TABLE, WITH ... SELECT, SHOW, EXPLAIN of those), checked
   on the exact text sent after parameters are bound; anything else is refused before
   the database sees it.
2. That statement runs inside ``BEGIN READ ONLY`` on a session whose default is
   read-only, is always rolled back, and the session is reset (``DISCARD ALL``) before
   its connection is reused. ``DB_STATEMENT_TIMEOUT`` bounds the whole query: the
   server's ``statement_timeout`` each statement, a client deadline the DECLARE and
   every FETCH together.
3. Only privileges are a security boundary: connect as a SELECT-only role (README).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext

import sql_guard
from config import Settings, get_settings, mask_secrets
from db_pool import ConnectionPool, PipelineConnection, first_lines, open_connection, reset_session
from errors import ConfigError, DBConnectionError, QueryError, ReadOnlyViolation
from sql_guard import Statement, check_read_only_query, first_keyword, split_statements

__all__ = [
    "Database", "QueryResult", "RowStream", "check_read_only_query", "close_pool", "connect_db",
    "execute_query", "first_keyword", "get_database", "release_db", "split_statements", "test_connection",
]

logger = logging.getLogger(__name__)

Params = Sequence[Any] | Mapping[str, Any] | None

FETCH_BATCH = 2000  # rows per FETCH round trip, as psycopg2's itersize default
_CURSOR_NAME = "pipeline_cursor"
_DECLARE_PREFIX = f"DECLARE {_CURSOR_NAME} NO SCROLL CURSOR FOR "


class QueryResult(list):
    """The rows as a list of dicts, plus ``columns`` and ``has_more`` (a row cap cut the result)."""

    def __init__(self, rows: list[dict[str, Any]], columns: list[str], has_more: bool = False) -> None:
        super().__init__(rows)
        self.columns = columns
        self.has_more = has_more


class Database:
    """A connection pool for one database, with read-only query execution.

    Args:
        settings: the DB_* / DATABASE_URL settings.
        sleep: how to wait between connect attempts (tests pass a recorder).
    """

    def __init__(self, settings: Settings, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self._pool = ConnectionPool(settings.db_pool_size, lambda: open_connection(self.settings, sleep))

    # -- connections --

    def acquire(self, *, fresh: bool = False) -> ext.connection:
        """Borrow a connection (waits up to DB_CONNECT_TIMEOUT for a free one); ``fresh``: a new one."""
        return self._pool.get(self.settings.db_connect_timeout, fresh=fresh)

    def release(self, conn: ext.connection, broken: bool = False) -> None:
        """Return a connection: rolled back and reset, or discarded if it broke."""
        reset = False
        try:
            reset = not broken and reset_session(conn)
        finally:  # also on Ctrl-C: the pool always gets it back, kept only if reset
            self._pool.put(conn, discard=not reset)

    def close(self) -> None:
        """Close every pooled connection (borrowed ones when returned); the next call reconnects."""
        self._pool.close()

    def cancel_all(self) -> int:
        """Cancel the queries running on this database's connections, from any thread.

        Each cancelled query (the statement running now, and any later FETCH of the same
        query or stream) raises QueryError with SQLSTATE 57014; queries started afterwards
        run normally. Returns how many borrowed connections were asked to cancel.
        """
        return self._pool.cancel_all()

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
        started = time.perf_counter()
        with self.stream_rows(query, params, max_rows=max_rows) as stream:
            result = QueryResult(list(stream), stream.columns, stream.has_more)
        logger.info("Query returned %d row(s)%s in %.3f s", len(result),
                    " (more rows available)" if result.has_more else "", time.perf_counter() - started)
        return result

    def stream_rows(self, query: str, params: Params = None, *, max_rows: int | None = None,
                    batch_size: int = FETCH_BATCH) -> RowStream:
        """Start one read-only query whose rows are read in batches as they are iterated.

        Use it as a context manager: ``with db.stream_rows(sql) as rows:``; leaving the block
        (or ``rows.close()``) rolls back and returns the connection. The query is checked,
        bound and started (first batch fetched) before this returns, so errors surface here.
        A connection lost before the first batch is retried once on a new connection.

        Raises:
            ReadOnlyViolation, QueryError, DBConnectionError.
        """
        if max_rows is not None and max_rows < 0:
            raise QueryError(f"max_rows must be 0 or more, got {max_rows}.")
        if batch_size < 1:
            raise QueryError(f"batch_size must be 1 or more, got {batch_size}.")
        # Refuse before borrowing a connection; the bound text is checked again before it is sent.
        statement = sql_guard.check_statement(query, placeholders=params is not None)
        logger.debug("SQL: %s | params: %r | max_rows: %s", statement.text, params, max_rows)
        for attempt in (1, 2):
            conn = self.acquire(fresh=attempt == 2)
            stream = RowStream(self, conn, max_rows, batch_size)
            try:
                stream._start(statement, params)
                return stream
            except psycopg2.Error as exc:
                lost = isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) and bool(conn.closed)
                error = stream._error(exc, retried=attempt == 2)
                stream.close(broken=lost)
                if lost and attempt == 1:
                    dropped = self._pool.discard_idle()  # opened before the loss: likely dead too
                    logger.warning("Database connection was lost (%s); retrying once on a new connection%s",
                                   first_lines(str(exc), 1), f" (dropped {dropped} idle)" if dropped else "")
                    continue
                raise error from None
            except BaseException:
                stream.close(broken=bool(conn.closed))
                raise
        raise AssertionError("unreachable")

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


class RowStream:
    """The rows of one read-only query, fetched from a server-side cursor in batches as iterated.

    Made by :meth:`Database.stream_rows`. Iterating yields one dict per row (keys in
    ``columns`` order); only one batch is held in memory at a time.

    Attributes:
        columns: the column names (a repeated name gets `` (2)``, `` (3)``...).
        rows_read: rows yielded so far.
    """

    def __init__(self, database: Database, conn: ext.connection, max_rows: int | None, batch_size: int) -> None:
        self.columns: list[str] = []
        self.rows_read = 0
        self._database = database
        self._conn = conn
        self._max_rows = max_rows
        self._batch_size = batch_size
        self._cur = conn.cursor()
        self._sent: Statement | None = None  # the statement as sent, for error positions
        self._params: Params = None
        self._buffer: list[tuple] = []
        self._pos = 0
        self._fetched = 0  # rows taken from the server (read, buffered or skipped)
        self._exhausted = False
        self._closed = False

    @property
    def has_more(self) -> bool:
        """True once it is known that the result has more rows than ``max_rows``."""
        return self._max_rows is not None and self._fetched > self._max_rows

    def __enter__(self) -> RowStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            while self._pos < len(self._buffer):
                if self._max_rows is not None and self.rows_read >= self._max_rows:
                    return
                row = self._buffer[self._pos]
                self._pos += 1
                self.rows_read += 1
                yield dict(zip(self.columns, row))
            if self._exhausted or self._closed:
                return
            self._refill()

    def count_remaining(self) -> int:
        """Count the rows not read yet (up to ``max_rows`` in all) without transferring them; ends the iteration.

        ``rows_read + count_remaining()`` is the number of rows, or ``max_rows`` when
        ``has_more`` is then True (there were more than that).
        """
        if self._closed:
            raise QueryError("The row stream is closed: count the remaining rows before leaving the with block.")
        unread = len(self._buffer) - self._pos
        if not self._exhausted:
            want = None if self._max_rows is None else self._max_rows + 1 - self._fetched
            if want is None or want > 0:
                unread += self._skip(want)
        self._buffer, self._pos, self._exhausted = [], 0, True
        if self._max_rows is not None:
            unread = min(unread, self._max_rows - self.rows_read)
        return unread

    def close(self, broken: bool = False) -> None:
        """Roll back and return the connection (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        self._buffer = []
        try:
            self._cur.close()
        except psycopg2.Error:
            broken = True
        self._database.release(self._conn, broken=broken or bool(self._conn.closed))

    # -- internals --

    def _start(self, statement: Statement, params: Params) -> None:
        """BEGIN READ ONLY, send the checked statement, fetch the first batch (psycopg2 errors propagate)."""
        conn = self._conn
        if isinstance(conn, PipelineConnection):
            conn.cancel_reason = None
            limit = self._database.settings.db_statement_timeout
            conn.deadline = time.monotonic() + limit if limit > 0 else None
        self._params = params
        self._cur.execute("BEGIN TRANSACTION READ ONLY")
        sent = self._sent = self._bind(statement, params)
        self._cur.execute(sql_guard.cursor_sql(_CURSOR_NAME, sent) if sent.uses_cursor else sent.text)
        self._refill(translate=False)

    def _bind(self, statement: Statement, params: Params) -> Statement:
        """The exact text to send, checked by the guard after psycopg2 bound the parameters."""
        for name, value in (("standard_conforming_strings", "on"), ("client_encoding", "UTF8")):
            if self._conn.get_parameter_status(name) != value:
                raise ReadOnlyViolation(
                    f"Refused: the database session has {name}={self._conn.get_parameter_status(name)}, "
                    f"and the read-only check needs {value}.",
                    hint=f"Fix: remove the {name} setting from the role or database (ALTER ROLE ... RESET {name}).",
                )
        if params is None:
            return statement  # already checked as the exact text to send
        try:
            wire = self._cur.mogrify(statement.text, params).decode("utf-8")
        except (IndexError, KeyError, TypeError, ValueError, psycopg2.ProgrammingError) as exc:
            raise QueryError(
                f"The query's placeholders do not match the parameters given ({type(exc).__name__}: {exc}).",
                hint="Fix: use %(name)s for each --param name=value (or %s for positional values); "
                "write a literal % as %%.",
            ) from None
        return sql_guard.check_statement(wire, placeholders=False)

    def _refill(self, translate: bool = True) -> None:
        want = self._batch_size
        if self._max_rows is not None:
            want = min(want, self._max_rows + 1 - self._fetched)  # one extra row tells has_more
        rows = self._run(lambda: self._fetch(want), translate) if want > 0 else []
        self._fetched += len(rows)
        self._exhausted = len(rows) < want or self.has_more
        self._buffer, self._pos = rows, 0

    def _fetch(self, want: int) -> list[tuple]:
        cur = self._cur
        if self._sent is not None and self._sent.uses_cursor:
            cur.execute(f"FETCH FORWARD {want} FROM {_CURSOR_NAME}")
        rows = cur.fetchmany(want) if cur.description is not None else []
        if not self.columns and cur.description is not None:
            self.columns = _unique_names([d.name for d in cur.description])
        return rows

    def _skip(self, want: int | None) -> int:
        def move() -> int:
            cur = self._cur
            if self._sent is not None and self._sent.uses_cursor:
                cur.execute(f"MOVE FORWARD {'ALL' if want is None else want} FROM {_CURSOR_NAME}")
                return cur.rowcount
            left = max(0, cur.rowcount - (cur.rownumber or 0))
            return left if want is None else min(left, want)

        moved = self._run(move, True)
        self._fetched += moved
        return moved

    def _run(self, step: Callable[[], Any], translate: bool) -> Any:
        """Run one FETCH/MOVE step, unless the query was cancelled or is past its deadline."""
        conn = self._conn
        if self._closed:
            raise QueryError("The row stream is closed.")
        if isinstance(conn, PipelineConnection):
            if conn.cancel_reason is None and conn.deadline is not None and time.monotonic() >= conn.deadline:
                conn.cancel_reason = "deadline"
            if conn.cancel_reason is not None:
                raise _cancel_error(self._database.settings, conn.cancel_reason)
        try:
            return step()
        except psycopg2.Error as exc:
            if not translate:
                raise
            raise self._error(exc) from None

    def _error(self, exc: psycopg2.Error, retried: bool = False) -> QueryError | DBConnectionError:
        sent = self._sent.text if self._sent is not None else ""
        reason = getattr(self._conn, "cancel_reason", None)
        lost = bool(self._conn.closed) and isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError))
        return _query_error(self._database.settings, exc, sent, self._params, reason,
                            None if not lost else "again" if retried else "lost")


def _query_error(settings: Settings, exc: psycopg2.Error, statement: str, params: Params,
                 cancel_reason: str | None, lost: str | None) -> QueryError | DBConnectionError:
    """Translate a psycopg2 error into the user's error: what happened, where, and the fix.

    ``lost``: None, ``"lost"`` (the connection died) or ``"again"`` (it died on the retry too).
    """
    if lost or (isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) and exc.pgcode is None):
        again = ", and again on a new connection" if lost == "again" else ""
        return DBConnectionError(
            f"The connection to PostgreSQL at {settings.db_display()} was lost during the query{again}: "
            f"{mask_secrets(first_lines(str(exc)), settings.secrets())}",
            hint="Fix: check that the server is up (docker compose ps) and the network to it; "
            "the server log may say why it closed the connection.",
        )
    if isinstance(exc, psycopg2.errors.QueryCanceled) and cancel_reason in ("deadline", "cancelled"):
        return _cancel_error(settings, cancel_reason)
    diag = exc.diag
    primary = diag.message_primary or first_lines(str(exc), 1)
    sqlstate = exc.pgcode
    lines = [f"Query failed: {primary}" + (f" (SQLSTATE {sqlstate})" if sqlstate else "")]
    if diag.message_detail:
        lines.append(f"Detail: {diag.message_detail}")
    position = None
    if diag.statement_position:
        offset = int(diag.statement_position) - (len(_DECLARE_PREFIX) if _declared(exc) else 0)
        if 1 <= offset <= len(statement) + 1:
            position = offset
            if params is None:
                lines.extend(sql_guard.caret(statement, offset))
    hint = f"Hint: {diag.message_hint}" if diag.message_hint else None
    if sqlstate == "42601":
        hint = sql_guard.table_placeholder_hint(statement, position) or hint
    if isinstance(exc, psycopg2.errors.ReadOnlySqlTransaction):
        return ReadOnlyViolation(
            f"Refused: the query tried to write, and this pipeline runs queries read-only ({primary}).",
            hint="Fix: use a plain SELECT. To change data, use psql with a role that may write.",
            sqlstate=sqlstate,
        )
    if isinstance(exc, psycopg2.errors.QueryCanceled) and "statement timeout" in primary:
        return _cancel_error(settings, "deadline")
    if isinstance(exc, psycopg2.errors.InsufficientPrivilege):
        hint = (hint + "\n" if hint else "") + "Fix: grant this role SELECT on the table, or connect as another DB_USER."
    return QueryError("\n".join(lines), hint=hint, sqlstate=sqlstate, position=position)


def _cancel_error(settings: Settings, reason: str) -> QueryError:
    if reason == "deadline":
        limit = settings.db_statement_timeout
        return QueryError(
            f"Query failed: canceling statement due to statement timeout: the query ran longer than "
            f"DB_STATEMENT_TIMEOUT={limit:g} s (SQLSTATE 57014)",
            hint=f"Fix: the query ran longer than DB_STATEMENT_TIMEOUT={limit:g} s; add a WHERE/LIMIT, "
            "or raise DB_STATEMENT_TIMEOUT in .env (0 = no limit).",
            sqlstate="57014",
        )
    return QueryError(f"Query cancelled ({reason}): Database.cancel_all() was called while it ran.",
                      sqlstate="57014")


def _declared(exc: psycopg2.Error) -> bool:
    """Whether the failed statement was our DECLARE wrapper (positions then include its prefix)."""
    query = getattr(getattr(exc, "cursor", None), "query", None)
    if query is None:
        return True
    return query.startswith(_DECLARE_PREFIX.encode())


def _unique_names(columns: list[str]) -> list[str]:
    """Keep every column: a repeated name (two ``?column?``) gets `` (2)``, `` (3)``..."""
    seen: dict[str, int] = {}
    names = []
    for name in columns:
        count = seen.get(name, 0) + 1
        seen[name] = count
        names.append(name if count == 1 else f"{name} ({count})")
    return names


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
    """Close the default pool's connections and forget the default Database (safe to call any time)."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.close()
        _default = None
