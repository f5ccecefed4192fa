"""The mistakes a new user makes in the first hour, and what the command answers.

Usage errors in one line, parameters named before the query runs, prompt limits named by their
flags, every message once. CLI behaviour runs in-process (the ``run`` fixture).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import sql_guard
from conftest import REPO_ROOT, SETTING_NAMES
from fake_pc_server import FakePCServer
from fake_server_base import free_port
from test_pipeline import run  # noqa: F401  (the fixture)

EXAMPLE_SQL = str(REPO_ROOT / "examples" / "low_rated_reviews.sql")


# --- usage errors: one line ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--max-rows", "0"], "error: --max-rows: expected a number of 1 or more, got 0 (see --help)"),
        (["--prompt-rows", "x"], "error: --prompt-rows: expected a whole number, got 'x' (see --help)"),
        (["--no-such-flag"], "error: unrecognized arguments: --no-such-flag (see --help)"),
        (["--query", "SELECT 1", "--query-file", "q.sql"],
         "error: --query-file: not allowed with argument --query (see --help)"),
    ],
)
def test_a_usage_error_is_one_line(run, args, line):
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr == line + "\n" and result.stdout == ""


# --- %(name)s and --param -----------------------------------------------------------------


def test_the_readme_example_without_its_param_names_the_flag(run):
    result = run("--query-file", EXAMPLE_SQL, "--dry-run")
    assert result.returncode == 2, result.stderr
    assert "Error [USAGE_ERROR]: The query uses %(max_rating)s, but no --param gives it a value." in result.stderr
    assert "--param max_rating=..." in result.stderr and "syntax error" not in result.stderr
    assert result.stdout == ""


def test_missing_parameters_fail_before_the_query_runs(run):
    with FakePCServer() as srv:
        # The query would fail (exit 4: no such column) if it ran, and nothing reaches the server.
        result = run("--query", "SELECT nope FROM customers WHERE city = %(city)s AND id > %(low)s",
                     "--param", "city=서울", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 2, result.stderr
    assert "The query uses %(low)s, but" in result.stderr and "--param low=..." in result.stderr
    assert srv.requests == []


def test_an_unused_param_is_warned_about_once(run):
    result = run("--query-file", EXAMPLE_SQL, "--param", "max_rating=2", "--param", "city=서울", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("--param city is not used: the query has no %(city)s placeholder.") == 1
    assert "max_rating is not used" not in result.stderr


def test_placeholders_in_literals_and_comments_are_text_when_no_param_is_given(run):
    result = run("--query", "SELECT '%(x)s' AS a, 1 AS \"%(y)s\" -- %(z)s", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "| %(x)s | 1 |" in result.stdout


def test_a_positional_placeholder_says_to_name_it(run):
    result = run("--query", "SELECT name FROM customers WHERE city = %s", "--dry-run")
    assert result.returncode == 2
    assert "positional %s placeholder" in result.stderr and "%(city)s" in result.stderr


@pytest.mark.parametrize(
    ("sql", "bound", "found"),
    [
        ("SELECT %(a)s, '%(b)s' -- %(c)s\n/* %(d)s */", False, ["a"]),
        ("SELECT %(a)s, '%(b)s' -- %(c)s\n/* %(d)s */", True, ["a", "b"]),  # psycopg2 reads inside quotes too
        ('SELECT $$%(a)s$$, E\'%(b)s\', U&"%(c)s", "%(d)s", %(e)s', False, ["e"]),
        ("SELECT 5 %% 2, %s, %(a)s", True, ["%s", "a"]),
        ("SELECT 'unterminated %(a)s", False, ["a"]),  # the lexer fails: the statement check reports it
    ],
)
def test_placeholders_by_postgresqls_lexer(sql, bound, found):
    assert sql_guard.placeholders(sql, bound=bound) == found


# --- prompt limits: the flags and settings that set them -----------------------------------


def test_a_tiny_budget_names_the_flags_and_settings(run):
    result = run("--query", "SELECT repeat('가', 400) AS long_text", "--prompt-budget", "50", "--dry-run")
    assert result.returncode == 2
    for name in ("--prompt-budget (now 50 tokens", "MODEL_CONTEXT_TOKENS", "MAX_NEW_TOKENS", "--max-cell-chars",
                 "--prompt-rows", "--template"):
        assert name in result.stderr, name
    assert "max_tokens / context size" not in result.stderr


def test_a_character_limit_names_its_flag(run):
    result = run("--query", "SELECT 1 AS x", "--prompt-max-chars", "40", "--dry-run")
    assert result.returncode == 2
    assert "--prompt-max-chars (now 40)" in result.stderr and "--template" in result.stderr


# --- every message once ------------------------------------------------------------------


def test_check_reports_a_model_server_failure_once(run):
    result = run("--check", env={"API_BASE_URL": f"http://127.0.0.1:{free_port()}", "API_MAX_ATTEMPTS": "1"})
    assert result.returncode == 5
    assert result.stdout.count("Cannot connect to the model server") == 1
    assert "Cannot connect" not in result.stderr and "not ready" not in result.stderr


def test_a_run_reports_its_only_servers_failure_once(run):
    result = run("--query", "SELECT 1 AS x", env={"API_BASE_URL": f"http://127.0.0.1:{free_port()}",
                                                  "API_MAX_ATTEMPTS": "1"})
    assert result.returncode == 5
    assert result.stderr.count("Cannot connect to the model server at") == 1, result.stderr
    assert "Error [CONNECTION_ERROR]: Cannot connect" in result.stderr


def test_a_template_without_data_warns_once(run):
    result = run("--query", "SELECT 1 AS x", "--template", "Summarise the rows.", "--dry-run")
    assert result.returncode == 0
    assert result.stderr.count("The template has no {data} placeholder") == 1


def test_the_database_error_names_both_routes(run):
    result = run("--query", "SELECT 1", env={"DATABASE_URL": f"postgresql://x@127.0.0.1:{free_port()}/db",
                                             "DB_CONNECT_RETRIES": "0", "PC_IP": "127.0.0.1"})
    assert result.returncode == 3
    assert "docker compose up -d" in result.stderr and "python load_sample_db.py" in result.stderr


# --- piping into head -------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["--query", "SELECT * FROM reviews", "--dry-run"], ["--check"],
     ["--per-row", "--query", "SELECT id, body FROM reviews", "--template", "Mood: {row.body}"]],
    ids=["answer", "check", "per-row"],
)
def test_stdout_closed_by_its_reader_is_not_reported_as_a_bug(test_db_url, tmp_path, args):
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    env.update(DATABASE_URL=test_db_url, LOG_FILE="", ENV_FILE=os.devnull)
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has already exited: every write fails with EPIPE
    try:
        with FakePCServer() as srv:
            result = subprocess.run([sys.executable, str(REPO_ROOT / "db_to_model_pipeline.py"), *args],
                                    cwd=tmp_path, env={**env, "API_BASE_URL": srv.base_url}, stdout=write_end,
                                    stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert result.returncode == 141, result.stderr
    assert "Internal error" not in result.stderr and "BrokenPipe" not in result.stderr
    assert "Exception ignored" not in result.stderr


# --- the two quick starts -------------------------------------------------------------------


def _quick_start(heading: str, next_heading: str) -> str:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return readme[readme.index(heading):readme.index(next_heading)]


def test_the_korean_and_english_quick_starts_say_the_same():
    korean = _quick_start("## 빠른 시작", "## Quick start")
    english = _quick_start("## Quick start", "## Usage")

    def commands(text: str) -> list[str]:  # the fenced commands, without their comments
        return [line.split("  #")[0].rstrip() for line in text.splitlines()
                if line.startswith(("python", "pip ", "cp ", "chmod ", "docker ", "echo "))]

    def inline(text: str) -> set[str]:  # `code` in the prose; the per-row example's template is in each language
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        return {span for span in re.findall(r"`([^`\n]+)`", prose) if "--per-row" not in span}

    assert commands(korean) == commands(english)
    assert inline(korean) == inline(english)
    for text in (korean, english):
        assert text.count("--per-row") == 1 and "pip install -r requirements-dev.txt" in text


def test_a_bad_value_from_a_flag_names_the_flag(run):
    result = run("--query", "SELECT 1", "--timeout", "abc", "--dry-run")
    assert result.returncode == 2
    assert "API_TIMEOUT must be a number" in result.stderr and "(from --timeout)" in result.stderr
