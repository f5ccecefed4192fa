"""Ctrl-C while connecting or querying, in a real process; DATABASE_URL mistakes are usage errors."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import config
import db_to_model_pipeline as pipeline
from conftest import REPO_ROOT, SETTING_NAMES
from errors import ConfigError

SCRIPT = str(REPO_ROOT / "db_to_model_pipeline.py")


def _env(tmp_path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    env.update({"LOG_FILE": str(tmp_path / "client.log"), "PYTHONIOENCODING": "utf-8", "PYTHONPATH": str(REPO_ROOT)}
               | values)
    return env


def _our_active_backends(admin_conn) -> int:
    with admin_conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'db_to_model_pipeline' "
                    "AND datname = current_database() AND state = 'active'")
        return cur.fetchone()[0]


@pytest.fixture
def silent_database():
    """A port that accepts TCP connections and never says a word (a hung server or a bad proxy)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(20)
        yield listener


def _interrupt_when_connected(proc: subprocess.Popen, listener: socket.socket) -> float:
    client, _ = listener.accept()  # the process is now waiting for the server's first answer
    time.sleep(0.3)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    client.close()
    return time.monotonic() - sent


def test_ctrl_c_while_connecting_to_a_silent_server_stops_at_once(silent_database, tmp_path):
    port = silent_database.getsockname()[1]
    script = textwrap.dedent(
        """
        import sys
        from db_connector import execute_query
        try:
            execute_query("SELECT 1")
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
        print("finished", flush=True)
        """
    )
    env = _env(tmp_path, DATABASE_URL=f"postgresql://x@127.0.0.1:{port}/db", DB_CONNECT_TIMEOUT="120",
               DB_CONNECT_RETRIES="0")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    elapsed = _interrupt_when_connected(proc, silent_database)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert out.strip() == "interrupted"
    assert elapsed < 10  # not DB_CONNECT_TIMEOUT=120


def test_cli_ctrl_c_while_connecting_exits_130_without_traceback(silent_database, tmp_path):
    port = silent_database.getsockname()[1]
    env = _env(tmp_path, DATABASE_URL=f"postgresql://x@127.0.0.1:{port}/db", DB_CONNECT_TIMEOUT="120",
               DB_CONNECT_RETRIES="0")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--dry-run", "--query", "SELECT 1"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
    elapsed = _interrupt_when_connected(proc, silent_database)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert "Interrupted." in err and "Traceback" not in err and out == ""
    assert elapsed < 10


@pytest.mark.parametrize(("signum", "code", "said"), [(signal.SIGINT, 130, "Interrupted."),
                                                     (signal.SIGTERM, 143, "Terminated.")])
def test_cli_signal_during_a_query_cancels_it_on_the_server(test_db_url, admin_conn, tmp_path, signum, code, said):
    env = _env(tmp_path, DATABASE_URL=test_db_url)
    proc = subprocess.Popen([sys.executable, SCRIPT, "--dry-run", "--query", "SELECT pg_sleep(60) AS slow"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            encoding="utf-8")
    deadline = time.monotonic() + 30
    while _our_active_backends(admin_conn) == 0:
        assert time.monotonic() < deadline and proc.poll() is None, "the query never started"
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert time.monotonic() - sent < 10  # not the 60 s the query would take
    assert said in err and "Traceback" not in err
    # Cancelled, not abandoned: pg_sleep would otherwise keep the backend active for a minute.
    deadline = time.monotonic() + 10
    while _our_active_backends(admin_conn) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _our_active_backends(admin_conn) == 0


# --- DATABASE_URL mistakes are the user's, not bugs ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://alice:S3cr3t@db.example:abc/shop", "DATABASE_URL must be a URL whose port is a number"),
        ("postgresql://alice:S3cr3t@db.example:99999/shop", "DATABASE_URL must be a URL whose port is a number"),
        ("postgresql://alice:S3cr3t%zz@db.example/shop", "DATABASE_URL must be a URL whose % signs start"),
        ("postgresql://alice:S3cr3t100%@db.example/shop", "write a % in a password as %25"),
        ("postgresql://alice:S3cr3t@[::1/shop", "DATABASE_URL must be a valid URL (Invalid IPv6 URL), such as"),
    ],
)
def test_bad_database_url_is_a_config_error(url, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        config.load_settings({"DATABASE_URL": url}, environ={})
    assert info.value.exit_code == 2
    assert "S3cr3t" not in str(info.value)


@pytest.mark.parametrize("url", ["postgresql://alice:pw@db.example:abc/shop", "postgresql://a:p%zz@h/db"])
def test_cli_reports_a_bad_database_url_as_a_usage_error(url, tmp_path, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", url)
    stdout, stderr = io.StringIO(), io.StringIO()
    code = pipeline.main(["--dry-run", "--query", "SELECT 1"], stdin=io.StringIO(), stdout=stdout, stderr=stderr)
    assert code == 2, stderr.getvalue()
    assert "DATABASE_URL must be" in stderr.getvalue()
    assert "This is a bug" not in stderr.getvalue() and "Traceback" not in stderr.getvalue()


def test_multi_host_and_ipv6_urls_stay_valid():
    for url in ("postgresql://u@[::1]:5432/db", "postgresql://u@h1:5432,h2:5433/db", "postgresql:///db?host=/tmp",
                "postgresql://u:p%25w@h/db"):
        assert config.load_settings({"DATABASE_URL": url}, environ={}).database_url == url
