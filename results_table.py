"""The results table: per-row results upserted into PostgreSQL, next to the data they describe.

``--results-table NAME`` writes through its own connection, ``RESULTS_DATABASE_URL``: the only
connection in the project that may write. The query connection stays read-only and guarded;
this one runs only the fixed statements below, on the one table named (and its ``NAME_jobs``
companion), whose name must be a plain identifier (``[a-z_][a-z0-9_]*``, optionally
``schema.name``; folded to lower case, as PostgreSQL folds unquoted names).

Two tables, created when missing::

    NAME       one row per key: key (text, primary key), key_value (jsonb), status, answer,
               parsed (jsonb), error_code, error, server, attempts, input_tokens,
               output_tokens, seconds, finish_reason, job, updated_at
    NAME_jobs  one row per job that wrote to NAME: job (fingerprint), parts (jsonb), last_run_at

Each finished row is one ``INSERT ... ON CONFLICT (key) DO UPDATE`` in its own transaction. A
rerun of the same job skips the keys whose row is ``ok`` for that job; a different job is
refused (saying what changed, from ``NAME_jobs``) unless ``--restart``, which makes it the
table's current job: rows of the earlier job stay until this job replaces them.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import threading
from typing import Any, Sequence
from urllib.parse import urlsplit

import psycopg2
import psycopg2.extensions as ext
from psycopg2 import sql
from psycopg2.extras import Json

from config import Settings, mask_secrets
from db_pool import first_lines
from errors import DBConnectionError, JobChanged, QueryError, UsageError
from job_identity import describe_changes
from result_ledger import Job
from row_keys import canonical

logger = logging.getLogger(__name__)

_PART = r"[a-z_][a-z0-9_]{0,57}"
_NAME = re.compile(rf"^(?:({_PART})\.)?({_PART})$")
_COLUMNS = ("key", "key_value", "status", "answer", "parsed", "error_code", "error", "server", "attempts",
            "input_tokens", "output_tokens", "seconds", "finish_reason", "job")

CREATE_RESULTS = """CREATE TABLE IF NOT EXISTS {table} (
    key           text PRIMARY KEY,
    key_value     jsonb NOT NULL,
    status        text NOT NULL CHECK (status IN ('ok', 'error', 'invalid', 'truncated')),
    answer        text,
    parsed        jsonb,
    error_code    text,
    error         text,
    server        text,
    attempts      integer NOT NULL DEFAULT 0,
    input_tokens  integer,
    output_tokens integer,
    seconds       double precision,
    finish_reason text,
    job           text NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
)"""
CREATE_JOBS = """CREATE TABLE IF NOT EXISTS {jobs} (
    job         text PRIMARY KEY,
    parts       jsonb NOT NULL,
    last_run_at timestamptz NOT NULL DEFAULT now()
)"""


def parse_table_name(text: str) -> tuple[str | None, str]:
    """``(schema or None, table)`` from ``--results-table``; raise UsageError for anything but identifiers."""
    match = _NAME.match(text.strip().lower())
    if not match:
        raise UsageError(
            f"--results-table {text!r} is not a plain table name.",
            hint="Fix: use letters, digits and underscores, starting with a letter (at most 58), optionally "
            "with a schema: --results-table review_sentiment or --results-table results.review_sentiment.",
        )
    return match.group(1), match.group(2)


def key_text(key: Any) -> str:
    """The ``key`` column: a text key as it is, anything else as JSON (``17``, ``{"a":1,"b":2}``)."""
    return key if isinstance(key, str) else canonical(key)


def _display(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.username or '(default user)'}@{parts.hostname or 'localhost'}:{parts.port or 5432}" \
           f"/{parts.path.lstrip('/') or '(default database)'}"


class ResultsTable:
    """Upserts per-row results into one table through ``RESULTS_DATABASE_URL`` (thread-safe).

    Raises UsageError at construction when the name is not an identifier or the setting is missing.
    """

    def __init__(self, settings: Settings, name: str) -> None:
        schema, table = parse_table_name(name)
        if not settings.results_database_url:
            raise UsageError(
                "--results-table needs RESULTS_DATABASE_URL: the connection that may write results "
                "(the query connection is read-only).",
                hint="Fix: set RESULTS_DATABASE_URL=postgresql://pipeline_writer:PASSWORD@HOST:5432/DBNAME in .env; "
                "the README's 'Results table' section has the GRANTs for a role that may write only that table.",
            )
        self.settings = settings
        self.name = f"{schema}.{table}" if schema else table
        self.jobs_name = f"{self.name}_jobs"
        self._table = sql.Identifier(schema, table) if schema else sql.Identifier(table)
        self._jobs = sql.Identifier(schema, table + "_jobs") if schema else sql.Identifier(table + "_jobs")
        self._url = settings.results_database_url
        self._where = _display(self._url)
        self._conn: ext.connection | None = None
        self._upsert: str | None = None
        self._lock = threading.Lock()
        self._closed = False

    # --- connection and errors ---

    def _connect(self) -> ext.connection:
        if self._conn is None or self._conn.closed:
            s = self.settings
            try:
                conn = psycopg2.connect(self._url, connect_timeout=s.db_connect_timeout,
                                        application_name="db_to_model_pipeline results",
                                        options=f"-c statement_timeout={int(s.db_statement_timeout * 1000)}")
            except psycopg2.Error as exc:
                raise DBConnectionError(
                    f"Cannot connect to the results database {self._where} (RESULTS_DATABASE_URL): "
                    f"{self._mask(first_lines(str(exc)))}",
                    hint="Fix: check RESULTS_DATABASE_URL (user, password, host, port, database) in .env.",
                ) from None
            conn.autocommit = True
            self._conn = conn
        return self._conn

    def _mask(self, text: str) -> str:
        return mask_secrets(text, self.settings.secrets())

    def _query_error(self, exc: psycopg2.Error, doing: str) -> QueryError:
        message = self._mask(first_lines(str(exc)))
        hint = None
        if exc.pgcode == "42501":  # insufficient_privilege
            hint = (f"Fix: let the RESULTS_DATABASE_URL role write {self.name} and {self.jobs_name}: create them as "
                    "their owner and GRANT SELECT, INSERT, UPDATE ON both to that role (README: 'Results table').")
        return QueryError(f"Could not {doing} the results table {self.name} at {self._where}: {message}",
                          hint=hint, sqlstate=exc.pgcode)

    def _run(self, doing: str, statement: Any, params: Any = None, fetch: bool = False) -> Any:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(statement, params)
                return cur.fetchall() if fetch else None
        except psycopg2.OperationalError as exc:
            conn.close()  # a dropped connection: the next statement reconnects
            raise self._query_error(exc, doing) from None
        except psycopg2.Error as exc:
            raise self._query_error(exc, doing) from None

    # --- the job ---

    def _exists(self, table: sql.Identifier) -> bool:
        name = table.as_string(self._connect())
        return self._run("look for", "SELECT to_regclass(%s) IS NOT NULL", (name,), fetch=True)[0][0]

    def _latest_job(self) -> tuple[str, dict[str, Any]] | None:
        if not self._exists(self._jobs):
            return None
        rows = self._run("read", sql.SQL("SELECT job, parts FROM {} ORDER BY last_run_at DESC LIMIT 1").format(
            self._jobs), fetch=True)
        return (rows[0][0], rows[0][1]) if rows else None

    def check(self, job: Job) -> None:
        """Raise JobChanged when the table's current job is another one."""
        latest = self._latest_job()
        if latest is not None and latest[0] != job.fingerprint:
            changes = describe_changes(latest[1] or {}, job.parts) or ["(the fingerprint differs)"]
            raise JobChanged(
                f"--results-table {self.name} holds the results of a different job, so this run would not "
                "continue it. What changed:\n  " + "\n  ".join(changes),
                hint="Fix: run the same command as before to continue that job, choose another --results-table, "
                "or add --restart to make this the table's job (earlier rows stay until replaced).",
            )

    def open(self, job: Job, restart: bool) -> set[str]:
        """Create the tables when missing, make ``job`` current, return the keys it has done (canonical).

        With ``restart`` nothing counts as done: every row is sent again and replaces its row.
        """
        if not restart:
            self.check(job)
        # Only when missing: a role that may write the tables need not be allowed to create any.
        if not self._exists(self._table):
            self._run("create", sql.SQL(CREATE_RESULTS).format(table=self._table))
        if not self._exists(self._jobs):
            self._run("create", sql.SQL(CREATE_JOBS).format(jobs=self._jobs))
        self._run("write", sql.SQL("INSERT INTO {} (job, parts) VALUES (%s, %s) ON CONFLICT (job) DO UPDATE "
                                   "SET last_run_at = now()").format(self._jobs), (job.fingerprint, Json(job.parts)))
        conn = self._connect()
        columns = sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
        updates = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in _COLUMNS[1:])
        self._upsert = sql.SQL("INSERT INTO {} ({}, updated_at) VALUES ({}, now()) ON CONFLICT (key) DO UPDATE "
                               "SET {}, updated_at = now()").format(
            self._table, columns, sql.SQL(", ").join(sql.Placeholder() * len(_COLUMNS)), updates).as_string(conn)
        return set() if restart else self._done_keys(job)

    def _done_keys(self, job: Job) -> set[str]:
        """Keys whose row is ok for this job, read through a server-side cursor (any number of rows)."""
        conn = self._connect()
        done: set[str] = set()
        conn.autocommit = False
        try:
            with conn.cursor(name="results_done_keys") as cur:
                cur.itersize = 5000
                cur.execute(sql.SQL("SELECT key_value FROM {} WHERE job = %s AND status = 'ok'").format(self._table),
                            (job.fingerprint,))
                for (value,) in cur:
                    done.add(canonical(value))
            conn.rollback()
        except psycopg2.Error as exc:
            conn.close()
            raise self._query_error(exc, "read") from None
        finally:
            if not conn.closed:
                conn.autocommit = True
        logger.info("Results table %s: %d row(s) already done for this job", self.name, len(done))
        return done

    # --- rows ---

    def write(self, record: dict[str, Any]) -> None:
        """Upsert one row's result (one transaction); a dropped connection is reopened once."""
        key = record["key"]
        parsed = record.get("parsed")
        params = (key_text(key), Json(key), record["status"], record.get("answer"),
                  None if parsed is None else Json(parsed), record.get("error_code"), record.get("error"),
                  record.get("server"), record.get("attempts") or 0, record.get("input_tokens"),
                  record.get("output_tokens"), record.get("seconds"), record.get("finish_reason"), record["job"])
        with self._lock:
            if self._closed:
                return
            try:
                self._run("write to", self._upsert, params)
            except QueryError:
                if self._conn is not None and not self._conn.closed:
                    raise
                logger.warning("The results database connection dropped; reconnecting once")
                self._run("write to", self._upsert, params)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None and not self._conn.closed:
                self._conn.close()
            self._conn = None


def setup_sql(name: str, role: str) -> str:
    """The SQL an owner runs once so that ``role`` may write the results tables ``name`` and
    ``name_jobs``, and nothing else (identifiers checked, then quoted)."""
    schema, table = parse_table_name(name)
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", role):
        raise UsageError(f"{role!r} is not a plain role name.", hint="Fix: use letters, digits and underscores.")
    qualified = f'"{schema}"."{table}"' if schema else f'"{table}"'
    jobs = f'"{schema}"."{table}_jobs"' if schema else f'"{table}_jobs"'
    return "\n".join([
        CREATE_RESULTS.format(table=qualified) + ";",
        CREATE_JOBS.format(jobs=jobs) + ";",
        f"GRANT USAGE ON SCHEMA \"{schema or 'public'}\" TO \"{role}\";",
        f"GRANT SELECT, INSERT, UPDATE ON {qualified}, {jobs} TO \"{role}\";",
    ]) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python results_table.py NAME --role ROLE`` prints the SQL that sets up a results table."""
    parser = argparse.ArgumentParser(prog="python results_table.py", description=main.__doc__)
    parser.add_argument("name", help="the --results-table name, e.g. review_sentiment")
    parser.add_argument("--role", default="pipeline_writer", help="the RESULTS_DATABASE_URL role (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(setup_sql(args.name, args.role))
    except UsageError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
