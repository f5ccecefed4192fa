"""--all-rows over several servers, ``--concurrency`` and ``--retries`` in this mode, and what is said once.

The servers hold every generation at a gate until the test has seen how many run at once, so no
assertion depends on how fast this machine is.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import pytest

from fake_map_reduce_server import MARKER, MapReduceOllamaServer, MapReduceOpenAIServer, MapReducePCServer
from mr_fixtures import QUERY, ROWS, SMALL, all_calls, cli_runner, create_mr_table


@pytest.fixture(scope="module")
def mr_table(test_db_url):
    return create_mr_table(test_db_url)


@pytest.fixture
def run(test_db_url, tmp_path, monkeypatch, mr_table):
    return cli_runner(test_db_url, tmp_path, monkeypatch)


def wait_until(condition: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def held_run(run, servers, gate: threading.Event, busy: int, *args: str):
    """Run the command while ``gate`` holds the generations; ``(result, generations running at once)``.

    The gate opens once ``busy`` generations run at once (or the command has ended).
    """
    env = {"API_BASE_URL": ",".join(s.base_url for s in servers), "API_TIMEOUT": "120"}
    with ThreadPoolExecutor(1) as executor:
        future = executor.submit(run, "--query", QUERY, "--all-rows", *SMALL, "--json", *args, env=env)
        try:
            wait_until(lambda: sum(s.in_progress for s in servers) >= busy or future.done())
            seen = tuple(s.in_progress for s in servers)
        finally:
            gate.set()
        return future.result(timeout=300), seen


def test_map_calls_run_at_once_on_every_server_of_the_pool_up_to_its_limit(run):
    gate = threading.Event()
    with MapReduceOpenAIServer(slots=1, gate=gate) as one, MapReduceOpenAIServer(slots=3, gate=gate) as three:
        result, seen = held_run(run, [one, three], gate, 4)
    assert result.returncode == 0, result.stderr
    assert seen == (1, 3)  # the default concurrency is the pool's capacity: 1 + 3
    assert one.peak_generations == 1 and three.peak_generations == 3
    doc = result.json()
    assert doc["plan"]["concurrency"] == 4 and "4 calls at a time" in result.stderr
    maps = one.map_prompts() + three.map_prompts()
    seen_rows = Counter(m for prompt in maps for m in MARKER.findall(prompt))
    assert set(seen_rows) == {f"r{n:06d}" for n in range(1, ROWS + 1)} and set(seen_rows.values()) == {1}
    assert one.count("POST") + three.count("POST") == len(all_calls(doc))  # each call answered once
    assert sorted(doc["stats"]["servers"]) == sorted([one.base_url, three.base_url])
    assert doc["answer"] == f"SUM 1-{ROWS}"


def test_concurrency_caps_the_calls_at_once(run):
    gate = threading.Event()
    with MapReduceOpenAIServer(slots=4, gate=gate) as srv:
        result, seen = held_run(run, [srv], gate, 2, "--concurrency", "2")
    assert result.returncode == 0, result.stderr
    assert seen == (2,) and srv.peak_generations == 2
    assert result.json()["plan"]["concurrency"] == 2 and "2 calls at a time" in result.stderr


def test_concurrency_above_the_capacity_says_the_extra_calls_wait(run):
    with MapReducePCServer() as srv:
        result = run("--query", QUERY, "--all-rows", *SMALL, "--concurrency", "3", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    assert "Note: --concurrency 3 is more than the model servers run at once (1)" in result.stderr
    assert srv.peak_generations == 1


def test_the_dry_run_estimates_at_the_concurrency_when_it_is_lower(run):
    with MapReduceOpenAIServer(slots=4) as srv:
        env = {"API_BASE_URL": srv.base_url}
        full = run("--query", QUERY, "--all-rows", *SMALL, "--dry-run", "--json", env=env).json()["plan"]
        two = run("--query", QUERY, "--all-rows", *SMALL, "--dry-run", "--json", "--concurrency", "2", env=env)
        text = run("--query", QUERY, "--all-rows", *SMALL, "--dry-run", "--concurrency", "2", env=env)
    assert srv.count("POST") == 0
    plan = two.json()["plan"]
    assert (full["capacity"], full["concurrency"]) == (4, 4) and (plan["capacity"], plan["concurrency"]) == (4, 2)
    assert plan["estimated_seconds"] > full["estimated_seconds"]
    assert "at 2 calls at once" in text.stdout


def test_retries_set_the_attempts_per_call_over_api_max_attempts(run):
    # The server fails the 3rd generation and every later one. API_MAX_ATTEMPTS=3 would try that
    # call three times; --retries 0 makes it one attempt, so the run stops at the 3rd request.
    # (More attempts and their pauses: test_mr_parts, with the sleep injected.)
    with MapReducePCServer(fail_from=3, fail_status=500) as srv:
        result = run("--query", QUERY, "--all-rows", *SMALL, "--retries", "0", "--json",
                     env={"API_BASE_URL": srv.base_url, "API_MAX_ATTEMPTS": "3"})
    assert result.returncode == 6, result.stderr
    assert srv.generation_count == 3 and "trying again" not in result.stderr
    assert result.json()["plan"]["map"][2]["attempts"] == 1


@pytest.mark.parametrize(("args", "message"), [
    (("--concurrency", "2"), "--concurrency applies only to --per-row and --all-rows"),
    (("--retries", "1"), "--retries applies only to --per-row and --all-rows"),
    (("--per-row", "--template", "{row.body}", "--reduce-template", "{answers}"),
     "--reduce-template applies only to --all-rows, not to --per-row"),
    (("--per-row", "--template", "{row.body}", "--max-reduce-levels", "2"),
     "--max-reduce-levels applies only to --all-rows, not to --per-row"),
])
def test_flags_of_another_mode_are_refused_not_ignored(run, args, message):
    with MapReducePCServer() as srv:
        result = run("--query", QUERY, *args, env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert srv.count("POST") == 0


def test_a_template_warning_is_said_once(run):
    with MapReducePCServer() as srv:
        result = run("--query", QUERY, "--all-rows", *SMALL, "--template", "Summarize.", "--json",
                     env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("The template has no {data} placeholder") == 1
    assert result.json()["plan"]["warnings"] == ["The template has no {data} placeholder; the data was appended at the end."]


def test_one_prompt_for_every_row_also_logs_the_servers_token_count(run, tmp_path):
    with MapReduceOllamaServer() as srv:
        result = run("--query", "SELECT name, city FROM customers", "--all-rows", "-v",
                     env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0 and srv.generation_count == 1, result.stderr
    log = (tmp_path / "client.log").read_text(encoding="utf-8")
    assert "Tokens of the prompt:" in log and "by the server's" in log
