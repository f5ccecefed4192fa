"""End to end: the command as a user runs it, against the test database and loopback model servers.

The command runs in-process through ``main(argv, stdin, stdout, stderr)``, with its settings in
the (monkeypatched) environment and the current directory in a fresh tmp_path; conftest resets
every process-wide cache between tests. Only the signal tests (SIGINT, SIGTERM) start a real
process, since a signal must reach a real one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SETTING_NAMES, CliResult, run_cli
from fake_ollama_server import FakeOllamaServer
from fake_openai_server import FakeOpenAIServer
from fake_pc_server import FakePCServer
from fake_server_base import free_port

import db_to_model_pipeline as pipeline

SCRIPT = str(REPO_ROOT / "db_to_model_pipeline.py")
ANSWER = "분석 결과: 서울 고객이 가장 많습니다. Seoul has the most customers."



@pytest.fixture
def run(test_db_url, tmp_path, monkeypatch):
    """Run the command in-process with its settings in the environment, pointed at the test database."""

    def runner(*args: str, env: dict | None = None, stdin: str | None = None) -> CliResult:
        values = {"DATABASE_URL": test_db_url, "LOG_FILE": str(tmp_path / "client.log"), "API_CONNECT_TIMEOUT": "1"}
        return run_cli(monkeypatch, args, {**values, **(env or {})}, stdin or "")

    return runner


def posts(server) -> list:
    return [r for r in server.requests if r.method == "POST"]


# --- the README's commands, and each protocol ---------------------------------------------


def test_readme_command_select_1(run):
    with FakePCServer(answer=ANSWER) as srv:
        result = run("--query", "SELECT 1 as test", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    assert result.stdout == ANSWER + "\n"
    assert "rows 1/1" in result.stderr and "tok/s" in result.stderr
    sent = posts(srv)[0].json
    assert "| test |" in sent["prompt"] and "| 1 |" in sent["prompt"]
    assert "system_prompt" not in sent  # the pc server rejects null: the key is left out


def test_readme_command_with_korean_template(run):
    with FakePCServer(answer=ANSWER) as srv:
        result = run("--query", "SELECT name, city FROM customers ORDER BY id LIMIT 3",
                     "--template", "다음 데이터를 분석해주세요: {data}", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    prompt = posts(srv)[0].json["prompt"]
    assert prompt.startswith("다음 데이터를 분석해주세요:\n| name | city |")  # a table starts on its own line
    assert "| 김민준 | 서울 |" in prompt
    assert result.stdout.strip() == ANSWER


def test_table_placeholder_in_a_query_explains_itself(run):
    result = run("--query", "SELECT * FROM table LIMIT 10", "--dry-run")
    assert result.returncode == 4
    assert '"table" in the examples stands for your table' in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("server_factory", "stream_flag"),
    [
        (lambda: FakePCServer(answer=ANSWER), "--no-stream"),
        (lambda: FakePCServer(answer=ANSWER), "--stream"),
        (lambda: FakeOllamaServer(answer=ANSWER), "--no-stream"),
        (lambda: FakeOllamaServer(answer=ANSWER), "--stream"),
        (lambda: FakeOpenAIServer(answer=ANSWER, owned_by="llamacpp"), "--no-stream"),
        (lambda: FakeOpenAIServer(answer=ANSWER, owned_by="llamacpp"), "--stream"),
        (lambda: FakeOpenAIServer(answer=ANSWER, owned_by="vllm"), "--stream"),
    ],
    ids=["pc", "pc-stream", "ollama", "ollama-stream", "llamacpp", "llamacpp-stream", "vllm-stream"],
)
def test_each_protocol_end_to_end(run, server_factory, stream_flag):
    with server_factory() as srv:
        result = run("--query", "SELECT name, city FROM customers ORDER BY id", stream_flag,
                     env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    assert result.stdout == ANSWER + "\n"
    assert f"{srv.protocol}:" in result.stderr and "rows 12/12" in result.stderr
    assert len(posts(srv)) == 1
    if srv.protocol != "pc":  # the pc server has no streaming endpoint
        assert posts(srv)[0].json["stream"] is (stream_flag == "--stream")  # --no-stream waits for the whole answer


@pytest.mark.parametrize("protocol_server", [FakeOllamaServer, FakeOpenAIServer])
def test_json_without_stream_waits_for_the_whole_answer(run, protocol_server):
    with protocol_server(answer=ANSWER) as srv:
        result = run("--query", "SELECT 1 AS x", "--json", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    assert posts(srv)[0].json["stream"] is False and json.loads(result.stdout)["answer"] == ANSWER


@pytest.mark.parametrize("server_class", [FakeOllamaServer, FakeOpenAIServer], ids=["ollama", "openai"])
def test_a_trickled_whole_answer_stops_at_the_timeout_with_no_stream(run, server_class):
    # One byte every 50 ms: never silent for the read timeout, never done. A whole answer must
    # finish within --timeout; a streamed request would only be bound between pieces.
    with server_class(answer=ANSWER, trickle=0.05) as srv:
        result = run("--query", "SELECT 1 AS x", "--no-stream", "--timeout", "0.5", env={"API_BASE_URL": srv.base_url})
        sent = posts(srv)[0].json
    assert result.returncode == 5, result.stderr
    assert "was still sending its answer when API_TIMEOUT=0.5s ran out" in result.stderr
    assert sent["stream"] is False


def test_a_row_cap_that_stopped_the_count_says_at_least_on_every_line(run):
    result = run("--query", "SELECT g FROM generate_series(1, 50) AS g", "--max-rows", "20", "--prompt-rows", "5",
                 "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "(showing 5 of at least 20 rows)" in result.stdout
    assert "Only 5 of at least 20 rows fit" in result.stderr
    assert "Dry run: 5 of at least 20 rows," in result.stderr


def test_csv_dry_run_shows_control_characters_from_the_data_escaped(run):
    result = run("--query", "SELECT E'a\\x1b[31mred\\x07bell\\x7f' AS v, 2 AS n", "--format", "csv", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "v,n\na\\x1b[31mred\\x07bell\\x7f,2\n" in result.stdout  # visible, as in the other formats
    assert not set("\x1b\x07\x7f") & set(result.stdout + result.stderr)  # nothing raw reaches the terminal


def test_json_output_parses_back(run):
    with FakeOllamaServer(answer=ANSWER) as srv:
        result = run("--query", "SELECT * FROM reviews ORDER BY id", "--json", "--prompt-rows", "5",
                     env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["answer"] == ANSWER and doc["complete"] is True
    assert (doc["rows_shown"], doc["rows_total"], doc["truncated"]) == (5, 20, True)
    assert doc["protocol"] == "ollama" and doc["model"].startswith("phi4")
    assert doc["prompt_chars"] > 0 and doc["stats"]["generated_tokens"] > 0
    assert doc["stats"]["generation_time"] is not None
    assert "(showing 5 of 20 rows)" in posts(srv)[0].json["messages"][-1]["content"]


def test_output_file_holds_the_answer_or_the_json(run, tmp_path):
    with FakePCServer(answer=ANSWER) as srv:
        plain = run("--query", "SELECT 1 AS x", "--output", "answer.txt", env={"API_BASE_URL": srv.base_url})
        as_json = run("--query", "SELECT 1 AS x", "--json", "--output", "answer.json",
                      env={"API_BASE_URL": srv.base_url})
    assert plain.returncode == 0 and as_json.returncode == 0
    assert (tmp_path / "answer.txt").read_text(encoding="utf-8") == ANSWER
    assert json.loads((tmp_path / "answer.json").read_text(encoding="utf-8"))["answer"] == ANSWER
    assert not list(tmp_path.glob(".answer*"))  # no temporary files left behind


# --- dry run, zero rows, inputs --------------------------------------------------------


def test_dry_run_needs_no_model_server(run):
    result = run("--query", "SELECT name FROM customers ORDER BY id", "--dry-run",
                 "--system-prompt", "You are a data analyst.", env={"PC_IP": "192.168.0.XXX"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("You are a data analyst.\n\n")
    assert "| 김민준 |" in result.stdout and "| 한시우 |" in result.stdout
    assert "12 of 12 rows" in result.stderr and "nothing was sent" in result.stderr


def test_dry_run_json_carries_the_prompt(run):
    result = run("--query", "SELECT id FROM orders", "--dry-run", "--json", "--prompt-rows", "3")
    doc = json.loads(result.stdout)
    assert doc["answer"] is None and doc["rows_shown"] == 3 and doc["rows_total"] == 120
    assert "(showing 3 of 120 rows)" in doc["prompt"]


def test_zero_rows_sends_nothing_and_exits_0(run):
    with FakePCServer() as srv:
        result = run("--query", "SELECT * FROM customers WHERE city = 'Atlantis'", env={"API_BASE_URL": srv.base_url})
        as_json = run("--query", "SELECT * FROM customers WHERE false", "--json", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0
    assert "returned no rows: nothing was sent to the model" in result.stderr
    assert result.stdout == ""
    assert posts(srv) == []
    doc = json.loads(as_json.stdout)
    assert doc["answer"] is None and doc["rows_total"] == 0


def test_query_from_stdin_and_from_a_file(run, tmp_path):
    (tmp_path / "q.sql").write_text("-- 서울 고객\nSELECT name FROM customers WHERE city = '서울' ORDER BY id;\n",
                                    encoding="utf-8")
    from_stdin = run("--dry-run", stdin="SELECT name FROM customers WHERE city = '부산'")
    from_file = run("--dry-run", "--query-file", "q.sql")
    assert from_stdin.returncode == 0 and "| 이서연 |" in from_stdin.stdout
    assert from_file.returncode == 0 and "| 김민준 |" in from_file.stdout and "| 이서연 |" not in from_file.stdout


@pytest.mark.parametrize(
    "value", ["x'; DROP TABLE customers; --", "%(city)s", "서울' OR '1'='1", "$$; DELETE FROM orders; $$"]
)
def test_hostile_parameters_are_bound(run, value, admin_conn):
    result = run("--query", "SELECT name FROM customers WHERE city = %(city)s", "--param", f"city={value}",
                 "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "no rows" in result.stderr
    with admin_conn.cursor() as cur:
        cur.execute("SELECT (SELECT count(*) FROM customers), (SELECT count(*) FROM orders)")
        assert cur.fetchone() == (12, 120)


def test_korean_parameter_selects_rows(run):
    result = run("--query", "SELECT name FROM customers WHERE city = %(city)s ORDER BY id", "--param", "city=서울",
                 "--dry-run")
    assert [line for line in result.stdout.splitlines() if line.startswith("| ") and "name" not in line] == [
        "| 김민준 |", "| 최수아 |", "| 장서윤 |", "| 한시우 |"]


def test_korean_end_to_end_with_files(run, tmp_path):
    (tmp_path / "t.txt").write_text("리뷰 {row_count}건을 요약하세요.\n{data}\n참고: {context}", encoding="utf-8")
    (tmp_path / "sys.txt").write_text("당신은 한국어 데이터 분석가입니다.", encoding="utf-8")
    with FakeOllamaServer(answer="요약: 배송 불만이 많습니다 😀") as srv:
        result = run("--query", "SELECT title, body FROM reviews WHERE language = 'ko' ORDER BY id",
                     "--template-file", "t.txt", "--system-prompt-file", "sys.txt", "--context", "2024년 데이터",
                     "--stream", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "요약: 배송 불만이 많습니다 😀\n"
    messages = posts(srv)[0].json["messages"]
    assert messages[0] == {"role": "system", "content": "당신은 한국어 데이터 분석가입니다."}
    assert messages[1]["content"].startswith("리뷰 16건을 요약하세요.")
    assert "노이즈 캔슬링이 정말 좋아요" in messages[1]["content"] and "참고: 2024년 데이터" in messages[1]["content"]


# --- the doctor ---------------------------------------------------------------------


def test_check_passes_with_database_and_server(run):
    with FakeOllamaServer() as srv:
        result = run("--check", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("[ OK ] settings")
    assert any(line.startswith("[ OK ] database: connected") and "PostgreSQL 15" in line for line in lines)
    assert any(line.startswith("[ OK ] read-only: sessions default to read-only") for line in lines)
    # One line per server: reachable, protocol, model, how many generations at once, ready.
    assert (f"[ OK ] model server: {srv.base_url}: ready; ollama (detected: Ollama 0.5.1); model phi4; 1 at a time "
            "(default; set #slots=N if the server runs more)") in lines
    assert posts(srv) == []  # checking never starts a generation


def test_check_fails_and_says_how_to_fix(run):
    result = run("--check", env={"API_BASE_URL": f"http://127.0.0.1:{free_port()}",
                                 "DATABASE_URL": f"postgresql://x@127.0.0.1:{free_port()}/db",
                                 "DB_CONNECT_RETRIES": "0"})
    assert result.returncode == 3
    assert "[FAIL] database: Cannot connect to PostgreSQL" in result.stdout
    assert "docker compose ps" in result.stdout
    assert "[FAIL] model server" in result.stdout and "firewall" in result.stdout


def test_check_reports_model_not_pulled(run):
    with FakeOllamaServer(models=["llama3.2:latest"]) as srv:
        result = run("--check", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 6
    assert "[FAIL] model" in result.stdout and "ollama pull phi4" in result.stdout


def test_check_with_bad_settings(run):
    result = run("--check", env={"API_PORT": "abc"})
    assert result.returncode == 2
    assert "API_PORT must be an integer from 1 to 65535, got 'abc'" in result.stdout


def test_check_shows_one_line_per_server_and_passes_while_one_is_usable(run):
    dead = f"http://127.0.0.1:{free_port()}"
    with FakePCServer() as pc, FakeOpenAIServer(slots=4) as llama:
        url = f"http://bob:Hunter2-Sentinel@127.0.0.1:{pc.port},{dead},{llama.base_url}#slots=2"
        result = run("--check", env={"API_BASE_URL": url, "API_MAX_ATTEMPTS": "1"})
    assert result.returncode == 0, result.stdout
    lines = [line for line in result.stdout.splitlines() if line.startswith("[") and " model server" in line]
    assert lines == [
        f"[ OK ] model server: http://bob:***@127.0.0.1:{pc.port}: ready; pc (detected: PC server); "
        "model phi4-quantized; 1 at a time (the pc server runs one at a time)",
        f"[WARN] model server: {dead}: unreachable: Cannot connect to the model server at {dead}/api/health: "
        "connection refused: nothing is listening on that port.",
        f"[ OK ] model server: {llama.base_url}: ready; openai (detected: llama.cpp); model phi4; 2 at a time "
        "(#slots)",
        "[ OK ] model servers: 2 of 3 ready; together they run 3 generations at once",
    ]
    assert "firewall" in result.stdout  # the dead server's fix
    assert result.stdout.count(f"Cannot connect to the model server at {dead}") == 1  # once, not also as a warning
    assert "Cannot connect" not in result.stderr
    assert "Hunter2-Sentinel" not in result.stdout + result.stderr
    assert posts(pc) == [] and posts(llama) == []


def test_check_fails_only_when_no_server_is_usable(run):
    first, second = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    with FakeOllamaServer(models=["llama3.2:latest"]) as no_model:
        result = run("--check", env={"API_BASE_URL": f"{first},{no_model.base_url},{second}",
                                     "API_MAX_ATTEMPTS": "1"})
    assert result.returncode == 5, result.stdout  # the first failure's code: unreachable
    fails = [line for line in result.stdout.splitlines() if line.startswith("[FAIL] model server: ")]
    assert len(fails) == 3 and first in fails[0] and no_model.base_url in fails[1] and second in fails[2]
    assert "not ready: The model 'phi4' is not available" in fails[1] and "ollama pull phi4" in result.stdout
    assert "[FAIL] model servers: none of the 3 is ready" in result.stdout


def test_a_question_over_several_servers_names_the_one_that_answered(run):
    with FakeOllamaServer(answer=ANSWER) as ollama, FakePCServer(answer=ANSWER) as pc:
        result = run("--query", "SELECT 1", "--json", "--api-url", ollama.base_url, "--api-url",
                     f"{pc.base_url}#slots=1")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["answer"] == ANSWER and doc["stats"]["server"] in (ollama.base_url, pc.base_url)
    assert len(posts(ollama)) + len(posts(pc)) == 1


def test_a_question_goes_to_another_server_when_the_first_refuses(run):
    dead = f"http://127.0.0.1:{free_port()}"
    with FakeOllamaServer(answer=ANSWER) as ollama:
        result = run("--query", "SELECT 1", "--api-url", f"{dead},{ollama.base_url}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ANSWER and f"ollama:phi4 at {ollama.base_url}" in result.stderr


def test_address_mistakes_are_usage_errors_that_show_the_fix(run):
    endpoint = run("--query", "SELECT 1", "--api-url", "http://127.0.0.1:8000/api/generate")
    assert endpoint.returncode == 2
    assert "is an endpoint (/api/generate), not the server's base URL: use http://127.0.0.1:8000" in endpoint.stderr
    port = run("--query", "SELECT 1", env={"PC_IP": "127.0.0.1:8000"})
    assert port.returncode == 2 and "write PC_IP=127.0.0.1 and API_PORT=8000" in port.stderr
    fragment = run("--query", "SELECT 1", "--api-url", "http://127.0.0.1:8000#slots=many")
    assert fragment.returncode == 2 and "slots must be a whole number" in fragment.stderr
    assert "http://127.0.0.1:8000#slots=4" in fragment.stderr
    ca = run("--query", "SELECT 1", "--api-url", "https://127.0.0.1:8443#ca=missing-ca.pem")
    assert ca.returncode == 2 and "The CA bundle missing-ca.pem given for the model server" in ca.stderr


# --- exit codes and messages ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        (["--query", "SELECT 1", "--temperature", "hot"], {}, 2, "TEMPERATURE must be a number"),
        (["--query", "SELECT 1"], {"PC_IP": "192.168.0.XXX"}, 2, "PC_IP is not configured yet"),
        (["--query", "SELECT 1", "--template", "{dta}"], {"PC_IP": "127.0.0.1"}, 2, "Unknown placeholder in the template: {dta}"),
        (["--query", "SELECT 1", "--param", "oops"], {"PC_IP": "127.0.0.1"}, 2, "is not NAME=VALUE"),
        (["--query", "SELECT 1", "--no-such-flag"], {}, 2, "unrecognized arguments"),
        (["--query-file", "missing.sql"], {"PC_IP": "127.0.0.1"}, 2, "missing.sql does not exist"),
        (["--query", "SELECT 1", "--env-file", "nope.env"], {}, 2, "nope.env does not exist"),
        (["--query", "SELECT 1"], {"DATABASE_URL": "postgresql://x@127.0.0.1:1/db", "DB_CONNECT_RETRIES": "0",
                                   "PC_IP": "127.0.0.1"}, 3, "Cannot connect to PostgreSQL"),
        (["--query", "SELEC 1"], {"PC_IP": "127.0.0.1"}, 4, "did you mean SELECT?"),
        (["--query", "SELECT 1 FROM"], {"PC_IP": "127.0.0.1"}, 4, "syntax error at end of input"),
        (["--query", "DELETE FROM orders"], {}, 4, "DELETE statements are not allowed"),
        (["--query", "SELECT 1; DROP TABLE orders"], {}, 4, "only one is allowed"),
        (["--query", "SELECT nope FROM customers"], {"PC_IP": "127.0.0.1"}, 4, 'column "nope" does not exist'),
    ],
)
def test_exit_codes_for_bad_input(run, args, env, code, message):
    result = run(*args, env=env)
    assert result.returncode == code, result.stderr
    assert result.stderr.count(message) == 1  # once: not also echoed by the logging fallback
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_exit_5_when_server_is_down_and_6_on_server_errors(run):
    # One attempt: the retries and their backoff are the client's tests; this one is about exit codes.
    down = run("--query", "SELECT 1", "--protocol", "pc", env={"API_BASE_URL": f"http://127.0.0.1:{free_port()}",
                                                               "API_MAX_ATTEMPTS": "1"})
    assert down.returncode == 5 and "[CONNECTION_ERROR]" in down.stderr and "firewall" in down.stderr
    with FakePCServer(delay=3) as srv:  # always later than the 0.3 s read timeout, however loaded the machine
        slow = run("--query", "SELECT 1", "--timeout", "0.3", env={"API_BASE_URL": srv.base_url})
    assert slow.returncode == 5 and "[TIMEOUT_ERROR]" in slow.stderr and "API_TIMEOUT" in slow.stderr
    with FakePCServer(html_error=502, fail_first=100) as srv:
        html = run("--query", "SELECT 1", "--protocol", "pc", env={"API_BASE_URL": srv.base_url,
                                                                   "API_MAX_ATTEMPTS": "1"})
    assert html.returncode == 6 and "502" in html.stderr and "Traceback" not in html.stderr
    with FakePCServer(model_loaded=False, load_fails=True) as srv:
        not_loaded = run("--query", "SELECT 1", env={"API_BASE_URL": srv.base_url})
    assert not_loaded.returncode == 6 and "[MODEL_NOT_LOADED]" in not_loaded.stderr


def test_verbose_shows_the_traceback(run):
    result = run("--query", "SELECT 1", "--verbose", "--protocol", "pc",
                 env={"API_BASE_URL": f"http://127.0.0.1:{free_port()}", "API_MAX_ATTEMPTS": "1"})
    assert result.returncode == 5 and "Traceback" in result.stderr


def test_internal_error_exits_1_with_a_bug_message(test_db_url, monkeypatch):
    class BrokenStdout(io.StringIO):
        def write(self, text: str) -> int:
            raise RuntimeError("disk on fire")

    monkeypatch.setenv("DATABASE_URL", test_db_url)
    monkeypatch.setenv("LOG_FILE", "")
    err = io.StringIO()
    code = pipeline.main(["--query", "SELECT 1", "--dry-run"], stdin=io.StringIO(), stdout=BrokenStdout(),
                         stderr=err)
    assert code == 1
    assert "Internal error: RuntimeError: disk on fire" in err.getvalue() and "This is a bug" in err.getvalue()


# --- logging and secrets -----------------------------------------------------------------


def test_log_file_records_the_run_without_secrets(run, tmp_path, test_db_url):
    secret_url = test_db_url.replace("postgres@", "postgres:Db-Sentinel-Pw@")
    with FakeOpenAIServer(answer=ANSWER, owned_by="vllm") as srv:
        result = run("--query", "SELECT name FROM customers LIMIT 2", "-v", "--no-stream",
                     env={"API_BASE_URL": srv.base_url, "API_KEY": "sk-Key-Sentinel", "DATABASE_URL": secret_url})
    assert result.returncode == 0, result.stderr
    assert srv.requests[-1].headers.get("Authorization") == "Bearer sk-Key-Sentinel"
    log = (tmp_path / "client.log").read_text(encoding="utf-8")
    for needle in ("Connected to PostgreSQL", "SQL: SELECT name FROM customers LIMIT 2", "Prompt built",
                   "/v1/chat/completions", "Done:"):
        assert needle in log
    for text in (log, result.stderr, result.stdout):
        assert "Db-Sentinel-Pw" not in text and "sk-Key-Sentinel" not in text


def test_log_file_default_level_has_no_sql(run, tmp_path):
    result = run("--query", "SELECT 42 AS answer", "--dry-run")
    assert result.returncode == 0
    log = (tmp_path / "client.log").read_text(encoding="utf-8")
    assert "Query returned 1 row(s)" in log and "SQL:" not in log
    assert re.search(r" - pid \d+ - runner - INFO - Query returned", log)  # time - pid - logger - level - message


# --- Ctrl-C -----------------------------------------------------------------------------


def _start(args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, SCRIPT, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, encoding="utf-8")


def _env(test_db_url: str, tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    env.update({"DATABASE_URL": test_db_url, "LOG_FILE": str(tmp_path / "client.log"),
                "ENV_FILE": os.devnull, **extra})  # no .env beside the scripts
    return env


def test_ctrl_c_while_streaming_keeps_the_partial_answer(test_db_url, tmp_path):
    answer = "하나 둘 셋 넷 다섯 여섯 일곱 여덟 아홉 열 " * 3
    with FakeOllamaServer(answer=answer, piece_delay=0.3) as srv:
        proc = _start(["--query", "SELECT 1 AS x", "--stream", "--output", "out.txt"],
                      _env(test_db_url, tmp_path, API_BASE_URL=srv.base_url), tmp_path)
        first = proc.stdout.read(2)  # the first streamed characters
        sent = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=10)
        elapsed = time.perf_counter() - sent
        saw_disconnect = srv.wait_for_disconnect(timeout=5)
    assert proc.returncode == 130, err
    assert elapsed < 2
    shown = first + rest
    assert shown.startswith("하나") and len(shown.strip()) < len(answer.strip())
    assert "Interrupted. The partial answer above was kept." in err and "Traceback" not in err
    assert (tmp_path / "out.txt.partial").read_text(encoding="utf-8").startswith("하나")
    assert not (tmp_path / "out.txt").exists()
    assert saw_disconnect  # the server saw the client go away


def test_ctrl_c_while_waiting_for_a_slow_answer(test_db_url, tmp_path):
    with FakePCServer(delay=30) as srv:
        proc = _start(["--query", "SELECT 1 AS x", "--no-stream"],
                      _env(test_db_url, tmp_path, API_BASE_URL=srv.base_url), tmp_path)
        deadline = time.time() + 10
        while not posts(srv) and time.time() < deadline:
            time.sleep(0.05)
        assert posts(srv), "the request never reached the server"
        sent = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert time.perf_counter() - sent < 2
    assert "Interrupted." in err and "Traceback" not in err and out == ""


def test_sigterm_keeps_the_partial_answer_and_exits_143(test_db_url, tmp_path):
    with FakeOpenAIServer(answer="one two three four five six seven eight nine ten", piece_delay=0.3) as srv:
        proc = _start(["--query", "SELECT 1 AS x", "--stream", "--json"],
                      _env(test_db_url, tmp_path, API_BASE_URL=srv.base_url), tmp_path)
        deadline = time.time() + 10
        while srv.pieces_sent < 2 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 143, err
    doc = json.loads(out)
    # Two pieces were sent; on a loaded machine the client may have read only the first.
    assert doc["complete"] is False and doc["answer"].startswith("one ")
    assert doc["ok"] is False and doc["error"]["code"] == "TERMINATED"
    assert doc["rows_shown"] == 1 and doc["query"] == "SELECT 1 AS x"
    assert "Terminated." in err and "Traceback" not in err


def test_every_exit_code_is_documented_in_help_and_readme(capsys):
    assert pipeline.main(["--help"]) == 0
    help_text = capsys.readouterr().out
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for code in pipeline.ExitCode:
        assert f"{code.value} " in help_text.split("exit codes:")[1], f"exit code {code.value} missing from --help"
        assert f"| {code.value} |" in readme, f"exit code {code.value} missing from the README table"


def test_every_flag_is_documented_in_the_readme():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for action in pipeline.build_parser()._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert f"`{flag}" in readme, f"{flag} is not in the README's option table"


def test_check_warns_when_env_file_with_a_password_is_world_readable(run, tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("DB_PASSWORD=secret-in-file\n", encoding="utf-8")
    env_file.chmod(0o644)
    with FakePCServer() as srv:
        loose = run("--check", env={"API_BASE_URL": srv.base_url})
        env_file.chmod(0o600)
        tight = run("--check", env={"API_BASE_URL": srv.base_url})
    assert loose.returncode == 0  # a warning, not a failure
    assert "[WARN] settings: .env holds DB_PASSWORD but other users can read it (mode 644)" in loose.stdout
    assert "chmod 600 .env" in loose.stdout
    assert "[WARN] settings" not in tight.stdout
    assert "secret-in-file" not in loose.stdout + loose.stderr


def test_json_failure_keeps_the_rows_and_stats(run):
    with FakePCServer(delay=3) as srv:
        result = run("--query", "SELECT name FROM customers ORDER BY id", "--json", "--timeout", "0.3",
                     env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 5
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["error"]["code"] == "TIMEOUT_ERROR" and "API_TIMEOUT" in doc["error"]["hint"]
    assert (doc["rows_shown"], doc["rows_total"], doc["query"]) == (12, 12, "SELECT name FROM customers ORDER BY id")
    assert doc["prompt_chars"] > 0 and doc["stats"]["db_time"] is not None


def test_password_in_the_server_url_never_reaches_stderr_json_or_log(run, tmp_path):
    url = f"http://bob:Hunter2-Sentinel@127.0.0.1:{free_port()}"
    plain = run("--query", "SELECT 1", "--protocol", "pc", "--api-url", url, env={"API_MAX_ATTEMPTS": "1"})
    as_json = run("--query", "SELECT 1", "--protocol", "pc", "--api-url", url, "--json", "-v",
                  env={"API_MAX_ATTEMPTS": "1"})
    assert plain.returncode == 5 and as_json.returncode == 5
    assert "bob:***@127.0.0.1" in plain.stderr  # the URL is still shown, its password is not
    assert "bob:***@127.0.0.1" in json.loads(as_json.stdout)["error"]["message"]
    log = (tmp_path / "client.log").read_text(encoding="utf-8")
    assert "bob:***@127.0.0.1" in log
    for text in (plain.stderr, plain.stdout, as_json.stderr, as_json.stdout, log):
        assert "Hunter2-Sentinel" not in text


@pytest.mark.parametrize("server_up", [True, False], ids=["server-up", "server-down"])
def test_check_masks_a_password_in_api_base_url_on_every_channel(run, tmp_path, server_up):
    with FakeOllamaServer() as srv:
        port = srv.port if server_up else free_port()
        url = f"http://bob:Hunter2-Sentinel@127.0.0.1:{port}"
        result = run("--check", "-v", env={"API_BASE_URL": url, "API_MAX_ATTEMPTS": "1"})
    log = (tmp_path / "client.log").read_text(encoding="utf-8")
    assert result.returncode == (0 if server_up else 5), result.stdout
    server_line = next(line for line in result.stdout.splitlines() if " model server: " in line)
    assert server_line.startswith("[ OK ]" if server_up else "[FAIL]")
    assert f"http://bob:***@127.0.0.1:{port}" in server_line  # the URL is shown, its password is not
    if not server_up:
        assert f"(tried http://bob:***@127.0.0.1:{port})" in result.stdout  # the hint's URL too
    for channel in (result.stderr, log):  # -v: the requests' URLs are logged on stderr and in the file
        assert f"bob:***@127.0.0.1:{port}" in channel
    for channel in (result.stdout, result.stderr, log):
        assert "Hunter2-Sentinel" not in channel


def test_several_servers_with_passwords_are_masked_on_every_channel(run, tmp_path):
    with FakeOllamaServer(answer=ANSWER) as up:
        down = free_port()
        urls = f"http://ann:Up-Sentinel-1@127.0.0.1:{up.port},http://bob:Down-Sentinel-2@127.0.0.1:{down}#slots=2"
        check = run("--check", "-v", env={"API_BASE_URL": urls, "API_MAX_ATTEMPTS": "1"})
        flags = run("--check", "--api-url", f"http://cy:Flag-Sentinel-3@127.0.0.1:{down}", "--api-url",
                    f"http://ann:Up-Sentinel-1@127.0.0.1:{up.port}", env={"API_MAX_ATTEMPTS": "1"})
        asked = run("--query", "SELECT 1 AS x", "--json", "-v", env={"API_BASE_URL": urls, "API_MAX_ATTEMPTS": "1"})
    log = (tmp_path / "client.log").read_text(encoding="utf-8")
    assert check.returncode == 0 and flags.returncode == 0 and asked.returncode == 0, check.stdout + asked.stderr
    assert f"http://ann:***@127.0.0.1:{up.port}: ready" in check.stdout
    assert f"http://bob:***@127.0.0.1:{down}: unreachable" in check.stdout
    assert f"http://cy:***@127.0.0.1:{down}: unreachable" in flags.stdout
    assert json.loads(asked.stdout)["stats"]["server"] == f"http://ann:***@127.0.0.1:{up.port}"
    for channel in (check.stdout, check.stderr, flags.stdout, flags.stderr, asked.stdout, asked.stderr, log):
        for secret in ("Up-Sentinel-1", "Down-Sentinel-2", "Flag-Sentinel-3"):
            assert secret not in channel


def test_percent_in_a_comment_with_parameters(run):
    result = run("--query", "SELECT name FROM customers -- 50% of them?\nWHERE city = %(city)s ORDER BY id",
                 "--param", "city=부산", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "| 이서연 |" in result.stdout


def test_literal_percent_next_to_parameters_gets_the_hint(run):
    result = run("--query", "SELECT %(c)s AS v, '50%' AS w", "--param", "c=1", "--dry-run")
    assert result.returncode == 4
    assert "write a literal % as %%" in result.stderr and "Traceback" not in result.stderr


def test_main_in_process_restores_signal_handler_and_logging(test_db_url, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", test_db_url)
    monkeypatch.setenv("LOG_FILE", "")

    before_handler = signal.getsignal(signal.SIGTERM)
    before_handlers = list(logging.getLogger().handlers)
    out, err = io.StringIO(), io.StringIO()
    assert pipeline.main(["--query", "SELECT 1 AS x", "--dry-run"], stdin=io.StringIO(), stdout=out, stderr=err) == 0
    assert "| 1 |" in out.getvalue()
    assert signal.getsignal(signal.SIGTERM) is before_handler
    assert logging.getLogger().handlers == before_handlers


# --- --output -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "message", "fix"),
    [
        ("missing/answer.txt", "--output missing/answer.txt: the directory missing does not exist.", "mkdir -p missing"),
        ("a_folder", "--output a_folder is a directory.", "name a file"),
        ("a_folder/", "--output a_folder/ is a directory.", "name a file"),
    ],
)
@pytest.mark.parametrize("mode", [[], ["--json"], ["--dry-run"]], ids=["plain", "json", "dry-run"])
def test_output_that_cannot_be_written_is_a_usage_error_before_anything_runs(run, tmp_path, target, message, fix,
                                                                               mode):
    (tmp_path / "a_folder").mkdir()
    with FakePCServer(answer=ANSWER) as srv:
        # The query would fail with exit 4 if it ran: the usage error comes first.
        result = run("--query", "SELECT nope FROM customers", "--output", target, *mode,
                     env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 2, result.stderr
    assert f"Error [USAGE_ERROR]: {message}" in result.stderr and fix in result.stderr
    assert "This is a bug" not in result.stderr and "does not exist\"" not in result.stderr
    assert srv.requests == []  # no model call, not even a probe
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder", "client.log"]  # no file, no .partial
    assert list((tmp_path / "a_folder").iterdir()) == []


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_output_replacing_a_file_keeps_its_mode_and_a_new_file_follows_the_umask(run, tmp_path):
    for name, mode in (("shared.txt", 0o644), ("group.txt", 0o640), ("private.txt", 0o600)):
        (tmp_path / name).write_text("old answer", encoding="utf-8")
        (tmp_path / name).chmod(mode)
    previous = os.umask(0o022)
    try:
        with FakePCServer(answer=ANSWER) as srv:
            for name in ("shared.txt", "group.txt", "private.txt", "new.txt"):
                assert run("--query", "SELECT 1 AS x", "--output", name, env={"API_BASE_URL": srv.base_url}
                           ).returncode == 0
            os.umask(0o077)
            assert run("--query", "SELECT 1 AS x", "--json", "--output", "new_private.json",
                       env={"API_BASE_URL": srv.base_url}).returncode == 0
    finally:
        os.umask(previous)
    modes = {name: _mode(tmp_path / name) for name in
             ("shared.txt", "group.txt", "private.txt", "new.txt", "new_private.json")}
    assert modes == {"shared.txt": 0o644, "group.txt": 0o640, "private.txt": 0o600, "new.txt": 0o644,
                     "new_private.json": 0o600}
    assert (tmp_path / "shared.txt").read_text(encoding="utf-8") == ANSWER
    assert not list(tmp_path.glob(".*.tmp"))
