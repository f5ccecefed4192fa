#!/usr/bin/env python3
"""Load the sample shop database into a PostgreSQL server you already have (no Docker needed).

    python load_sample_db.py                      # the local server, as your OS user
    python load_sample_db.py --admin-url postgresql://postgres@localhost:5432/postgres

It creates the role and the database named by the settings (``DB_USER``, ``DB_PASSWORD``,
``DB_NAME``, on ``DB_HOST``:``DB_PORT``; or the ones in ``DATABASE_URL``) through an
administrator connection, then runs ``db/init/*.sql`` in that database as that role, so the
role owns the sample tables exactly as with ``docker compose up``. Running it again changes
nothing: an existing role keeps its password, an existing database keeps its data.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO
from urllib.parse import unquote, urlsplit

import psycopg2
from psycopg2 import sql
from psycopg2.extensions import make_dsn

import config
from errors import ConfigError, DBConnectionError, ExitCode, PipelineError, QueryError

INIT_DIR = Path(__file__).resolve().parent / "db" / "init"
#: A table the sample's first script creates: its presence means "already loaded".
MARKER_TABLE = "public.customers"


@dataclass(frozen=True)
class Target:
    """The role and database the pipeline's settings point at."""

    host: str | None
    port: int | None
    user: str
    password: str | None
    dbname: str


def target_from_settings(settings: config.Settings) -> Target:
    """Where the sample goes: ``DATABASE_URL`` or the ``DB_*`` settings. Raises ConfigError."""
    settings.db_connect_kwargs()  # refuses placeholders such as your_user with the fix
    if settings.database_url:
        parts = urlsplit(settings.database_url)
        user = unquote(parts.username or "")
        password = unquote(parts.password) if parts.password is not None else None
        dbname = unquote(parts.path.lstrip("/"))
        host, port = parts.hostname, parts.port
        missing = "the user name" if not user else "the database name" if not dbname else None
        if missing:
            raise ConfigError(
                f"DATABASE_URL has no {missing}, so there is nothing to create.",
                hint="Fix: write it as postgresql://USER:PASSWORD@HOST:PORT/DBNAME in .env.",
            )
        return Target(host, port, user, password, dbname)
    missing_names = [name for name, value in (("DB_USER", settings.db_user), ("DB_NAME", settings.db_name)) if not value]
    if missing_names:
        raise ConfigError(
            f"{' and '.join(missing_names)} {'is' if len(missing_names) == 1 else 'are'} not set, "
            "so there is no role or database to create.",
            hint="Fix: cp .env.example .env (it names the sample's DB_USER, DB_PASSWORD and DB_NAME), "
            "or set them in the environment.",
        )
    return Target(settings.db_host, settings.db_port, settings.db_user or "", settings.db_password,
                  settings.db_name or "")


def admin_dsn(admin_url: str | None, target: Target, dbname: str | None = None) -> str:
    """The administrator connection: ``--admin-url``, else the target's server as the OS user.

    ``dbname`` replaces the database the URL names (the loader connects to the new database).
    """
    if admin_url:
        return make_dsn(admin_url, **({"dbname": dbname} if dbname else {}))
    kwargs: dict[str, Any] = {"dbname": dbname or "postgres"}
    if target.host:
        kwargs["host"] = target.host
    if target.port:
        kwargs["port"] = target.port
    return make_dsn(**kwargs)


def _connect(dsn: str, what: str, secrets: list[str]) -> Any:
    try:
        conn = psycopg2.connect(dsn, connect_timeout=10)
    except psycopg2.OperationalError as exc:
        message = config.mask_secrets(" / ".join(str(exc).strip().splitlines()[:2]), secrets)
        raise DBConnectionError(
            f"Cannot connect to PostgreSQL as {what}: {message}",
            hint="Fix: is the server running (brew services list, pg_ctlcluster ... start, Postgres.app)? "
            "Give an administrator connection with --admin-url, e.g.\n"
            "     python load_sample_db.py --admin-url postgresql://postgres@localhost:5432/postgres",
        ) from None
    conn.autocommit = True
    return conn


def ensure_role(cur: Any, target: Target) -> str:
    """Create the login role if missing; an existing role is left as it is."""
    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (target.user,))
    if cur.fetchone():
        return f"role {target.user}: already exists (left unchanged)"
    if target.password:
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(target.user)),
                    (target.password,))
    else:
        cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(target.user)))
    return f"role {target.user}: created"


def ensure_database(cur: Any, target: Target) -> str:
    """Create the database, owned by the role, if missing."""
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target.dbname,))
    if cur.fetchone():
        return f"database {target.dbname}: already exists"
    cur.execute(sql.SQL("CREATE DATABASE {} OWNER {} ENCODING 'UTF8' TEMPLATE template0").format(
        sql.Identifier(target.dbname), sql.Identifier(target.user)))
    return f"database {target.dbname}: created (owner {target.user})"


def load_scripts(conn: Any, target: Target, scripts: Sequence[Path]) -> str:
    """Run the sample's SQL scripts as the role, in one transaction, unless already loaded."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (MARKER_TABLE,))
        if cur.fetchone()[0]:
            return f"sample data: already loaded in {target.dbname} (nothing changed)"
    conn.autocommit = False
    try:
        with conn.cursor() as cur:
            # As the role, so it owns the tables, as when docker compose loads them.
            cur.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(target.user)))
            for script in scripts:
                cur.execute(script.read_text(encoding="utf-8"))
        conn.commit()
    except psycopg2.Error as exc:
        conn.rollback()
        primary = exc.diag.message_primary or str(exc).strip().splitlines()[0]
        raise QueryError(
            f"Loading the sample into {target.dbname} failed: {primary}",
            hint="Fix: the administrator connection must be a superuser or a member of the role "
            f"{target.user}; nothing was loaded (the transaction was rolled back).",
            sqlstate=exc.pgcode,
        ) from None
    finally:
        conn.autocommit = True
    return f"sample data: loaded {len(scripts)} script(s) into {target.dbname}"


def check_login(target: Target, secrets: list[str]) -> str:
    """Connect as the pipeline will, and count the sample's customers."""
    kwargs: dict[str, Any] = {"user": target.user, "dbname": target.dbname}
    for key, value in (("host", target.host), ("port", target.port), ("password", target.password)):
        if value:
            kwargs[key] = value
    try:
        conn = psycopg2.connect(connect_timeout=10, **kwargs)
    except psycopg2.OperationalError as exc:
        message = config.mask_secrets(" / ".join(str(exc).strip().splitlines()[:2]), secrets)
        raise DBConnectionError(
            f"The sample is in place, but logging in as {target.user} failed: {message}",
            hint=f"Fix: if the role existed before, its password (or its LOGIN right) differs from the settings: run\n"
            f"     ALTER ROLE \"{target.user}\" LOGIN PASSWORD '...';  (as an administrator), or change DB_PASSWORD in .env.",
        ) from None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM customers")
            customers = cur.fetchone()[0]
    finally:
        conn.close()
    return f"login as {target.user}: ok ({customers} customers in {target.dbname})"


def load_sample(settings: config.Settings, admin_url: str | None, out: TextIO) -> None:
    """Create the role and database if needed and load the sample; report each step on ``out``."""
    target = target_from_settings(settings)
    secrets = settings.secrets()
    if admin_url and urlsplit(admin_url).password:
        secrets.append(unquote(urlsplit(admin_url).password or ""))
    scripts = sorted(INIT_DIR.glob("*.sql"))
    if not scripts:
        raise ConfigError(f"No SQL scripts in {INIT_DIR}.", hint="Fix: run this from a complete clone.")
    who = "the administrator given by --admin-url" if admin_url else f"your OS user ({getpass.getuser()})"
    admin = _connect(admin_dsn(admin_url, target), who, secrets)
    try:
        with admin.cursor() as cur:
            out.write(ensure_role(cur, target) + "\n")
            out.write(ensure_database(cur, target) + "\n")
    finally:
        admin.close()
    loader = _connect(admin_dsn(admin_url, target, target.dbname), who, secrets)
    try:
        out.write(load_scripts(loader, target, scripts) + "\n")
    finally:
        loader.close()
    out.write(check_login(target, secrets) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python load_sample_db.py",
        description="Create the role and database named by DB_USER, DB_PASSWORD and DB_NAME (or DATABASE_URL)\n"
        "on a PostgreSQL server you already have, and load the sample shop data into it.\n"
        "Safe to run again: what exists is left as it is.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--admin-url", metavar="URL",
                        help="an administrator connection (a superuser, or a role allowed to create roles and "
                        "databases); default: the settings' DB_HOST:DB_PORT as your OS user")
    parser.add_argument("--env-file", metavar="FILE", help="read settings from FILE instead of .env")
    return parser


def main(argv: Sequence[str] | None = None, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the loader; return the exit code (0 ok, 2 settings, 3 connection, 4 loading failed)."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        settings = config.load_settings({"ENV_FILE": args.env_file})
        load_sample(settings, args.admin_url, out)
    except PipelineError as exc:
        err.write(f"Error [{exc.code}]: {config.mask_secrets(str(exc))}\n")
        return int(exc.exit_code)
    out.write("Done. Try: python db_to_model_pipeline.py --query \"SELECT * FROM reviews LIMIT 5\" --dry-run\n")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
