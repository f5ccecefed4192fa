"""PostgreSQL connections: opened with retries, pooled, and waited on interruptibly.

* :func:`open_connection` connects with the settings' timeouts and session options,
  retrying transient failures with capped, jittered backoff.
* :class:`ConnectionPool` keeps returned connections for reuse, opens new ones on demand,
  bounds how many are in use, and drops idle connections the server has closed.
* :func:`wait_callback` is installed as psycopg2's wait callback (process-wide, once): while
  a statement runs, Ctrl-C cancels it on the server, a query's deadline cancels it, and
  another thread can cancel it (:meth:`ConnectionPool.cancel_all`); while connecting, the
  connect timeout is enforced and Ctrl-C stops at once.
"""

from __future__ import annotations

import logging
import random
import re
import selectors
import threading
import time
from collections import deque
from typing import Any, Callable

import psycopg2
import psycopg2.extensions as ext
import psycopg2.extras

from config import Settings, mask_secrets
from errors import DBConnectionError

logger = logging.getLogger(__name__)

# Seconds to wait for the server to end a query cancelled by Ctrl-C before giving up on it.
INTERRUPT_GRACE = 2.0
# A cancel request that reaches the server between two statements is ignored: resend this often.
CANCEL_RESEND = 1.0

# libpq connect failures that retrying cannot fix; anything else (refused, timeout,
# starting up, too many clients, a message in the server's language) is retried.
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
    "invalid percent-encoded token",
    "permission denied",
)


class PipelineConnection(ext.connection):
    """A psycopg2 connection carrying the state :func:`wait_callback` acts on.

    Attributes:
        deadline: ``time.monotonic()`` value after which the running statement is cancelled, or None.
        cancel_reason: why statements on this connection are being cancelled
            (``"deadline"``, ``"cancelled"``, ``"interrupted"``), or None.
    """

    def __init__(self, dsn: str, *args: Any, **kwargs: Any) -> None:
        # Set before connecting: the wait callback may look at them during the connect.
        self.deadline: float | None = None
        self.cancel_reason: str | None = None
        super().__init__(dsn, *args, **kwargs)


# --- waiting ---------------------------------------------------------------------------


def install_wait_callback() -> None:
    """Make :func:`wait_callback` psycopg2's wait callback, unless another one is installed."""
    current = ext.get_wait_callback()
    if current is wait_callback:
        return
    if current is not None:
        logger.warning("Another psycopg2 wait callback is installed (%r): Ctrl-C and DB_STATEMENT_TIMEOUT "
                       "apply only as that callback allows", current)
        return
    ext.set_wait_callback(wait_callback)


def wait_callback(conn: ext.connection) -> None:
    """Wait for ``conn`` to finish connecting or running a statement (psycopg2's wait callback).

    Modelled on ``psycopg2.extras.wait_select``. While connecting it enforces the
    ``connect_timeout`` of the connection string (libpq ignores it once a wait callback is
    installed) and lets Ctrl-C stop at once. While a statement runs, it sends a cancel request
    when Ctrl-C arrives, when the connection's ``deadline`` passes or when ``cancel_reason``
    is set; after Ctrl-C it waits briefly for the server to end the statement, then raises
    KeyboardInterrupt (psycopg2 then closes the connection).
    """
    connecting = conn.status == ext.STATUS_SETUP
    connect_limit = time.monotonic() + _connect_timeout(conn) if connecting else None
    cancel_sent: float | None = None
    # The KeyboardInterrupt (or a subclass, e.g. the CLI's SIGTERM) to re-raise once the server answered.
    interrupt: KeyboardInterrupt | None = None
    give_up: float | None = None
    while True:
        try:
            state = conn.poll()
            if state == ext.POLL_OK:
                break
            now = time.monotonic()
            if connect_limit is not None and now >= connect_limit:
                raise psycopg2.OperationalError("timeout expired")
            if interrupt is not None and give_up is not None and now >= give_up:
                raise interrupt  # the server did not answer the cancel in time
            if not connecting and (cancel_sent is None or now - cancel_sent >= CANCEL_RESEND) \
                    and _should_cancel(conn, now):
                _cancel(conn)
                cancel_sent = now
            limits = [connect_limit, give_up, getattr(conn, "deadline", None) if cancel_sent is None else None]
            _select(conn, state, max(0.0, min([1.0] + [limit - now for limit in limits if limit is not None])))
        except KeyboardInterrupt as exc:
            if connecting or interrupt is not None:
                raise  # nothing to cancel yet, or a second Ctrl-C / no answer: stop now
            logger.warning("Interrupted: cancelling the running query")
            interrupt, cancel_sent = exc, time.monotonic()
            give_up = cancel_sent + INTERRUPT_GRACE
            if isinstance(conn, PipelineConnection):
                conn.cancel_reason = "interrupted"
            _cancel(conn)
    if interrupt is not None:
        raise interrupt  # psycopg2 then closes the connection; the statement was cancelled


def _connect_timeout(conn: ext.connection) -> float:
    try:
        value = float(ext.parse_dsn(conn.dsn).get("connect_timeout") or 0)
    except (psycopg2.Error, ValueError):
        value = 0
    return value if value > 0 else float("inf")


def _should_cancel(conn: ext.connection, now: float) -> bool:
    if not isinstance(conn, PipelineConnection):
        return False
    if conn.cancel_reason is None and conn.deadline is not None and now >= conn.deadline:
        conn.cancel_reason = "deadline"
    return conn.cancel_reason is not None


def _cancel(conn: ext.connection) -> None:
    try:
        conn.cancel()
    except psycopg2.Error as exc:  # the next resend or the connection's own failure will tell
        logger.warning("Could not send the cancel request: %s", str(exc).strip())


def _select(conn: ext.connection, state: int, timeout: float) -> None:
    if state == ext.POLL_READ:
        events = selectors.EVENT_READ
    elif state == ext.POLL_WRITE:
        events = selectors.EVENT_WRITE
    else:
        raise psycopg2.OperationalError(f"bad state from poll: {state}")
    with selectors.DefaultSelector() as selector:
        selector.register(conn.fileno(), events)
        selector.select(timeout)


# --- opening -----------------------------------------------------------------------------


def connect_kwargs(settings: Settings) -> dict[str, Any]:
    """``psycopg2.connect`` arguments: the target from settings, plus timeouts and a read-only session."""
    options = [
        "-c default_transaction_read_only=on",
        f"-c statement_timeout={int(settings.db_statement_timeout * 1000)}",
        "-c idle_in_transaction_session_timeout=60000",
        # sql_guard parses with PostgreSQL's default lexing; the server must lex the same way.
        "-c standard_conforming_strings=on",
    ]
    kwargs = settings.db_connect_kwargs()
    kwargs.update(
        connect_timeout=settings.db_connect_timeout,
        application_name="db_to_model_pipeline",
        client_encoding="UTF8",
        options=" ".join(options),
        # Notice a LAN that drops mid-query in about a minute, not hours.
        keepalives=1,
        keepalives_idle=30,
        keepalives_interval=10,
        keepalives_count=3,
    )
    return kwargs


def open_connection(settings: Settings, sleep: Callable[[float], None] = time.sleep) -> PipelineConnection:
    """Open one configured connection, retrying transient failures with backoff.

    Raises:
        DBConnectionError: a permanent failure, or a transient one that outlasted DB_CONNECT_RETRIES.
        ConfigError: a DB_* setting still holds the example value.
    """
    install_wait_callback()
    kwargs = connect_kwargs(settings)
    attempts = settings.db_connect_retries + 1
    for attempt in range(1, attempts + 1):
        try:
            conn = psycopg2.connect(connection_factory=PipelineConnection, **kwargs)
        except (psycopg2.OperationalError, psycopg2.ProgrammingError) as exc:
            message = mask_secrets(first_lines(str(exc)), settings.secrets())
            if _is_permanent(message) or attempt == attempts:
                raise connection_error(settings, message, attempt) from None
            delay = min(0.5 * 2 ** (attempt - 1), 8.0) * (1 - 0.25 * random.random())
            logger.warning("Database connection to %s failed (attempt %d of %d): %s; retrying in %.1f s",
                           settings.db_display(), attempt, attempts, message, delay)
            sleep(delay)
            continue
        _set_up(conn, settings)
        return conn
    raise AssertionError("unreachable")


def _set_up(conn: PipelineConnection, settings: Settings) -> None:
    conn.autocommit = True  # BEGIN READ ONLY / ROLLBACK are issued explicitly
    psycopg2.extras.register_uuid(conn_or_curs=conn)
    for caster in _TOLERANT_TYPES:
        ext.register_type(caster, conn)
    if conn.get_parameter_status("server_encoding") == "SQL_ASCII":
        logger.warning("Database %s has server encoding SQL_ASCII: non-ASCII text may fail to decode.",
                       settings.db_display())
    logger.info("Connected to PostgreSQL %s at %s", conn.get_parameter_status("server_version"),
                settings.db_display())


def connection_error(settings: Settings, message: str, attempts: int) -> DBConnectionError:
    """The error for a failed connect, naming the target, the attempts and the settings to check."""
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    names = "DATABASE_URL" if settings.database_url else "DB_HOST, DB_PORT, DB_NAME, DB_USER and DB_PASSWORD"
    return DBConnectionError(
        f"Cannot connect to PostgreSQL at {settings.db_display()}{tried}: {message}",
        hint=(
            "Fix: is the database running? With the bundled sample database: "
            "`docker compose ps`, then `docker compose up -d`;\n"
            "     without Docker, on a PostgreSQL you already have: `python load_sample_db.py` creates the "
            "sample's role and database there.\n"
            f"     Are {names} right in .env? "
            "Check with: python -c \"from db_connector import test_connection; print(test_connection())\""
        ),
    )


def first_lines(message: str, limit: int = 3) -> str:
    """The first non-empty lines of a (libpq) message, joined with `` / ``."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " / ".join(lines[:limit])


def _is_permanent(message: str) -> bool:
    text = message.lower()
    if "temporary failure in name resolution" in text:
        return False
    # libpq's check of an option's value, e.g. 'invalid sslmode value: "bogus"' from a DATABASE_URL.
    return any(fragment in text for fragment in _PERMANENT_CONNECT_ERRORS) or bool(re.search(r"invalid \w+ value", text))


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


# --- pooling -----------------------------------------------------------------------------


class ConnectionPool:
    """At most ``size`` connections in use; returned ones kept for reuse, new ones opened on demand.

    Args:
        size: how many connections may be in use (and kept idle) at once.
        opener: opens one new connection (retries are its business).
    """

    def __init__(self, size: int, opener: Callable[[], ext.connection]) -> None:
        self.size = size
        self._open = opener
        self._idle: deque[ext.connection] = deque()
        self._in_use: set[ext.connection] = set()
        self._retired: set[ext.connection] = set()  # in use when close() ran: closed when returned
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)

    def get(self, timeout: float, *, fresh: bool = False) -> ext.connection:
        """Borrow a connection: the most recently returned live one, else a new one (always new if ``fresh``).

        Raises:
            DBConnectionError: all ``size`` connections stayed in use for ``timeout`` seconds,
                or a new connection could not be opened.
        """
        if not self._slots.acquire(timeout=timeout):
            raise DBConnectionError(
                f"All {self.size} pooled database connections are in use.",
                hint="Fix: return connections with release_db(conn), or raise DB_POOL_SIZE.",
            )
        try:
            conn = None if fresh else self._pop_idle()
            if conn is None:
                conn = self._open()
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._in_use.add(conn)
        return conn

    def put(self, conn: ext.connection, *, discard: bool = False) -> None:
        """Return a borrowed connection: kept for reuse, or closed if ``discard`` or it is closed."""
        with self._lock:
            if conn not in self._in_use:
                logger.warning("A database connection was returned that is not in use; ignored")
                return
            self._in_use.discard(conn)
            keep = not discard and not conn.closed and conn not in self._retired
            self._retired.discard(conn)
            if keep:
                self._idle.append(conn)
        if not keep:
            conn.close()
        self._slots.release()

    def discard_idle(self) -> int:
        """Close every idle connection (after a connection was lost: they date from before); return how many."""
        with self._lock:
            stale = list(self._idle)
            self._idle.clear()
        for conn in stale:
            conn.close()
        return len(stale)

    def close(self) -> None:
        """Close idle connections now and borrowed ones when they are returned; the pool stays usable."""
        with self._lock:
            self._retired |= self._in_use
        self.discard_idle()

    def cancel_all(self) -> int:
        """Cancel the statements running on borrowed connections (from any thread); return how many were asked."""
        with self._lock:
            borrowed = list(self._in_use)
        for conn in borrowed:
            if isinstance(conn, PipelineConnection):
                conn.cancel_reason = "cancelled"
            _cancel(conn)
        return len(borrowed)

    def _pop_idle(self) -> ext.connection | None:
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn = self._idle.pop()  # the most recently used: least likely to have timed out
            if _is_alive(conn):
                return conn
            logger.info("Dropping a pooled database connection the server has closed")
            conn.close()


def reset_session(conn: ext.connection) -> bool:
    """Roll back and ``DISCARD ALL`` (undo any session state a query left); False if the connection is unusable."""
    if conn.closed:
        return False
    if isinstance(conn, PipelineConnection):
        conn.deadline = conn.cancel_reason = None  # must not cancel the reset itself
    try:
        if conn.info.transaction_status != ext.TRANSACTION_STATUS_IDLE:
            if conn.autocommit:
                with conn.cursor() as cur:
                    cur.execute("ROLLBACK")
            else:
                conn.rollback()
        if not conn.autocommit:
            conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("DISCARD ALL")
    except psycopg2.Error:
        return False
    return True


def _is_alive(conn: ext.connection) -> bool:
    """False for an idle connection that is closed or has unread data (the server's goodbye, e.g. after a restart)."""
    if conn.closed or conn.info.transaction_status != ext.TRANSACTION_STATUS_IDLE:
        return False
    with selectors.DefaultSelector() as selector:
        selector.register(conn.fileno(), selectors.EVENT_READ)
        return not selector.select(0)
