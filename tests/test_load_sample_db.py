"""load_sample_db.py: the sample loaded into an existing PostgreSQL, without Docker."""

from __future__ import annotations

import io
import secrets
from urllib.parse import urlsplit

import psycopg2
import pytest

import load_sample_db

PASSWORD = "sample-pw-" + secrets.token_hex(4)


@pytest.fixture
def names(admin_url):
    """A role and database name of our own; both dropped afterwards."""
    suffix = secrets.token_hex(4)
    role, dbname = f"pipeline_sample_{suffix}", f"shop_sample_{suffix}"
    yield role, dbname
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        cur.execute(f'DROP ROLE IF EXISTS "{role}"')
    admin.close()


def env_file(tmp_path, admin_url, role, dbname, password=PASSWORD):
    parts = urlsplit(admin_url)
    path = tmp_path / "sample.env"
    path.write_text(
        f"DB_HOST={parts.hostname or 'localhost'}\nDB_PORT={parts.port or 5432}\n"
        f"DB_USER={role}\nDB_PASSWORD={password}\nDB_NAME={dbname}\n",
        encoding="utf-8",
    )
    return str(path)


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = load_sample_db.main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_loads_the_sample_and_the_role_can_query_it(tmp_path, admin_url, names):
    role, dbname = names
    code, out, err = run("--admin-url", admin_url, "--env-file", env_file(tmp_path, admin_url, *names))
    assert code == 0, err
    assert f"role {role}: created" in out and f"database {dbname}: created" in out
    assert "login as" in out and "customers" in out
    parts = urlsplit(admin_url)
    conn = psycopg2.connect(host=parts.hostname, port=parts.port, user=role, password=PASSWORD, dbname=dbname)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM reviews")
        assert cur.fetchone()[0] > 0
        cur.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'customers'")
        assert cur.fetchone()[0] == role  # owned by the role, as with docker compose
    conn.close()
    assert PASSWORD not in out + err


def test_a_second_run_changes_nothing(tmp_path, admin_url, names):
    role, dbname = names
    settings_file = env_file(tmp_path, admin_url, *names)
    assert run("--admin-url", admin_url, "--env-file", settings_file)[0] == 0
    admin = psycopg2.connect(load_sample_db.make_dsn(admin_url, dbname=dbname))
    with admin, admin.cursor() as cur:
        cur.execute("INSERT INTO customers (id, name, city, joined_at) VALUES (9999, 'kept', '서울', now())")
    admin.close()
    code, out, err = run("--admin-url", admin_url, "--env-file", settings_file)
    assert code == 0, err
    assert "already exists" in out and "already loaded" in out
    admin = psycopg2.connect(load_sample_db.make_dsn(admin_url, dbname=dbname))
    with admin.cursor() as cur:
        cur.execute("SELECT name FROM customers WHERE id = 9999")
        assert cur.fetchone() == ("kept",)  # a rerun never reloads over the user's data
    admin.close()


def test_unreachable_admin_server_names_the_flag(tmp_path, admin_url, names):
    url = "postgresql://postgres@127.0.0.1:1/postgres"
    code, out, err = run("--admin-url", url, "--env-file", env_file(tmp_path, admin_url, *names))
    assert code == 3
    assert "--admin-url" in err and "Traceback" not in err


def test_missing_settings_are_a_configuration_error(tmp_path, admin_url):
    empty = tmp_path / "empty.env"
    empty.write_text("DB_HOST=localhost\n", encoding="utf-8")
    code, out, err = run("--admin-url", admin_url, "--env-file", str(empty))
    assert code == 2
    assert "DB_USER and DB_NAME are not set" in err and "cp .env.example .env" in err


def test_an_existing_role_with_another_password_is_reported_with_the_fix(tmp_path, admin_url, names):
    role, dbname = names
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'the-old-one'")
    admin.close()
    parts = urlsplit(admin_url)
    if parts.hostname in (None, "", "localhost", "127.0.0.1"):
        # This server trusts local logins, so any password works; the message is still checked
        # through a role that cannot log in at all.
        admin = psycopg2.connect(admin_url)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f'ALTER ROLE "{role}" NOLOGIN')
        admin.close()
    code, out, err = run("--admin-url", admin_url, "--env-file", env_file(tmp_path, admin_url, *names))
    assert f"role {role}: already exists (left unchanged)" in out
    assert code == 3
    assert "ALTER ROLE" in err and PASSWORD not in err and "the-old-one" not in err
