"""Shared fixtures: a throwaway PostgreSQL database loaded with the sample schema.

The server comes from ``TEST_DATABASE_URL`` (an admin URL, e.g.
``postgresql://postgres@127.0.0.1:5432/postgres``), else libpq's ``PG*``
variables, else the local server. The suite creates ``pipeline_test_<random>``
there, loads ``db/init/*.sql`` into it and drops it at the end; it never
touches the database named in your ``.env``. When no server is reachable the
database tests fail (they never skip).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import cli_logging  # noqa: E402
import config  # noqa: E402
import db_connector  # noqa: E402
import env_files  # noqa: E402
import link_safety  # noqa: E402
import model_api_client  # noqa: E402
import resources  # noqa: E402

INIT_SQL = sorted((REPO_ROOT / "db" / "init").glob("*.sql"))
# Every variable our settings read, plus ENV_FILE: scrubbed from each test's environment.
SETTING_NAMES = [var.name for var in config.VARIABLES] + ["ENV_FILE"]


def _admin_url() -> str:
    if os.environ.get("TEST_DATABASE_URL"):
        return os.environ["TEST_DATABASE_URL"]
    host = os.environ.get("PGHOST", "127.0.0.1")
    port = os.environ.get("PGPORT", "5432")
    user = os.environ.get("PGUSER", "postgres")
    return f"postgresql://{user}@{host}:{port}/{os.environ.get('PGDATABASE', 'postgres')}"


def _with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


@pytest.fixture(scope="session")
def admin_url() -> str:
    url = _admin_url()
    try:
        psycopg2.connect(url, connect_timeout=5).close()
    except psycopg2.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {config.mask_url_password(url)}: {str(exc).strip()}\n"
            "Start it (docker compose up -d, or pg_ctlcluster 15 main start) or set TEST_DATABASE_URL "
            "to an admin URL of a server the tests may create databases on.",
            pytrace=False,
        )
    return url


@pytest.fixture(scope="session")
def test_db_url(admin_url: str) -> Iterator[str]:
    """URL of a fresh database with the sample schema and data; dropped afterwards."""
    name = f"pipeline_test_{secrets.token_hex(4)}"
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}" ENCODING \'UTF8\' TEMPLATE template0')
    url = _with_database(admin_url, name)
    try:
        conn = psycopg2.connect(url)
        with conn, conn.cursor() as cur:
            for script in INIT_SQL:
                cur.execute(script.read_text(encoding="utf-8"))
            # Objects the tests use to prove that nothing was written.
            cur.execute("CREATE TABLE audit (id serial PRIMARY KEY, note text)")
            cur.execute(
                "CREATE FUNCTION write_audit(t text) RETURNS int LANGUAGE plpgsql AS "
                "$$ BEGIN INSERT INTO audit(note) VALUES (t); RETURN 1; END $$"
            )
        conn.close()
        yield url
    finally:
        db_connector.close_pool()
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def admin_conn(test_db_url: str) -> Iterator[psycopg2.extensions.connection]:
    """A read-write superuser connection to the test database, for setup and checks."""
    conn = psycopg2.connect(test_db_url)
    conn.autocommit = True
    yield conn
    conn.close()


def make_settings(test_db_url: str, **overrides: object) -> config.Settings:
    values = {"DATABASE_URL": test_db_url, "DB_CONNECT_TIMEOUT": 2, "DB_CONNECT_RETRIES": 1}
    values.update(overrides)
    return config.load_settings(values, environ={})


@pytest.fixture
def settings(test_db_url: str) -> config.Settings:
    return make_settings(test_db_url)


@pytest.fixture
def db(settings: config.Settings) -> Iterator[db_connector.Database]:
    database = db_connector.Database(settings)
    yield database
    database.close()


def reset_process_state() -> None:
    """Forget every process-wide cache, through each module's public reset, as a new process would.

    The default settings, the default database pool, the pool and client run_pipeline shares,
    the detected protocols, the credential warnings already said, and any logging handler the
    command line left on the root logger.
    """
    config.reset_settings()
    link_safety.new_run()
    db_connector.close_pool()
    resources.close_resources()
    model_api_client.clear_detection_cache()
    cli_logging.remove_log_handlers()


@dataclass
class CliResult:
    """What one run of the command returned and printed (like subprocess.CompletedProcess)."""

    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_cli(monkeypatch: pytest.MonkeyPatch, args: Sequence[str], settings: Mapping[str, str],
            stdin: str = "") -> CliResult:
    """The command run in-process (``main(argv, stdin, stdout, stderr)``) with ``settings`` in the
    environment; afterwards the process state is reset, so the next run starts like a new process."""
    import db_to_model_pipeline

    out, err = io.StringIO(), io.StringIO()
    with monkeypatch.context() as patch:
        for name, value in settings.items():
            patch.setenv(name, value)
        code = db_to_model_pipeline.main(list(args), stdin=io.StringIO(stdin), stdout=out, stderr=err)
    reset_process_state()
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No user settings leak in: settings variables removed, cwd in an empty folder, caches reset.

    The .env beside the scripts (the one a user's quick start creates in the clone) is looked for
    in a folder of this test's own instead, so a developer's settings never reach the tests.
    """
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(env_files, "SCRIPT_DIR", tmp_path / "scripts")
    reset_process_state()
    yield
    reset_process_state()
