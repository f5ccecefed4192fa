"""The parts of --all-rows on their own: prompts and grouping, checkpoints, the call runner, the engine.

The call runner and the engine talk to real loopback servers through the backend interface
(``tests/single_server_backend.py``); pauses between attempts are recorded, not slept.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import psycopg2
import pytest

import mr_prompts
from conftest import make_settings
from errors import InvalidPromptError, ModelServerError, PromptError
from fake_map_reduce_server import MapReducePCServer
from fake_pc_server import FakePCServer
from map_reduce import AllRowsOptions, run_all_rows
from model_clients import Sleeps, make_server
from mr_calls import Call, CallRunner, CallSettings
from mr_checkpoint import Checkpoint, cache_directory, call_key, checkpoint_path, load_answers
from mr_prompts import Answer, ReducePrompts
from runner import Question
from single_server_backend import SingleServerBackend
from token_count import get_counter

# --- prompts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("first", "last", "total", "label"), [
    (1201, 2400, 9870, "rows 1,201–2,400 of 9,870"),
    (7, 7, 9870, "row 7 of 9,870"),
    (1, 9870, 9870, "all 9,870 rows"),
    (1, 1, 1, "the only row"),
])
def test_rows_label(first, last, total, label):
    assert mr_prompts.rows_label(first, last, total) == label


def test_the_map_note_says_which_part_of_the_data_a_prompt_is():
    note = mr_prompts.map_note(9870, False)
    assert note(1200, 1200, True) == ("(Rows 1,201–2,400 of 9,870: one part of the data. Answer from these rows "
                                      "only; the answers for all parts are combined afterwards.)")
    assert "the query returned more rows than were read" in mr_prompts.map_note(500, True)(0, 10, True)


def _reducer(budget: int, template: str | None = None) -> ReducePrompts:
    values = {"question": "What do customers complain about?", "query": "SELECT 1", "context": "", "columns": "a"}
    return ReducePrompts(template, values, 300, budget=budget, max_chars=None, outside=(), counter=get_counter())


def test_reduce_groups_keep_the_order_and_fill_the_budget():
    counter = get_counter()
    reducer = _reducer(700)
    answers = [Answer(f"answer {i}: " + "late delivery, " * 12, i * 10 + 1, i * 10 + 10) for i in range(30)]
    groups = reducer.group(answers)
    assert [i for g in groups for i in g.inputs] == list(range(30))
    assert len(groups) > 2 and all(counter.count(g.text) <= 700 for g in groups)
    for group, following in zip(groups, groups[1:]):  # greedy: the next answer would not have fitted
        assert counter.count(reducer.render(answers[group.inputs[0]:following.inputs[0] + 1])) > 700
    assert groups[0].text.count("[Answer ") == len(groups[0].inputs)
    assert f"[Answer 1: rows 1–10 of 300]\n{answers[0].text.strip()}" in groups[0].text
    assert (groups[1].first_row, groups[1].last_row) == (answers[groups[1].inputs[0]].first_row,
                                                          answers[groups[1].inputs[-1]].last_row)


def test_an_answer_too_large_for_any_reduce_prompt_is_an_error():
    with pytest.raises(PromptError, match=r"A partial answer \(rows 1–10 of 300\) does not fit"):
        _reducer(300).group([Answer("word " * 400, 1, 10), Answer("short", 11, 20)])


def test_the_built_in_reduce_prompt_restates_the_question():
    text = _reducer(2000).render([Answer("A", 1, 150), Answer("B", 151, 300)])
    assert "Combine the partial answers into one answer for all 300 rows." in text
    assert "Question:\nWhat do customers complain about?" in text
    assert "[Answer 1: rows 1–150 of 300]\nA\n\n[Answer 2: rows 151–300 of 300]\nB" in text


@pytest.mark.parametrize(("calls", "fan_in", "levels"), [
    (1, 5, []), (2, 2, [1]), (30, 38, [1]), (63, 10, [7, 1]), (1000, 10, [100, 10, 1]), (5, 1, None),
])
def test_calls_per_level(calls, fan_in, levels):
    assert mr_prompts.calls_per_level(calls, fan_in) == levels


def test_reduce_prompt_tokens_per_level_count_frames_and_full_length_answers():
    heading = mr_prompts._HEADING_TOKENS
    # 63 answers of 100 tokens, 10 per prompt: 7 prompts, then 1 over the 7 answers they give.
    assert mr_prompts.reduce_prompt_tokens(63, 10, 100, 50) == [7 * 50 + 63 * (100 + heading), 50 + 7 * (100 + heading)]
    assert mr_prompts.reduce_prompt_tokens(1, 10, 100, 50) == []


def test_reduce_templates_are_checked():
    assert mr_prompts.check_reduce_template("Merge {answers} for {rows}").names == ("answers", "rows")
    with pytest.raises(PromptError, match=r"no \{answers\} placeholder"):
        mr_prompts.check_reduce_template("Merge them")
    with pytest.raises(PromptError, match=r"\{answer\} \(did you mean \{answers\}\?\)"):
        mr_prompts.check_reduce_template("{answer}")


# --- checkpoints ------------------------------------------------------------------------------


def _answer(key: str, text: str = "an answer") -> dict:
    return {"key": key, "stage": "map", "level": 0, "index": 0, "answer": text, "stats": {"wall_time": 1.5}}


def test_a_checkpoint_keeps_answers_across_opens_and_is_private(tmp_path):
    path = tmp_path / "job.mapreduce.jsonl"
    with Checkpoint.open(path, "f1", {"query": "SELECT 1"}) as checkpoint:
        assert checkpoint.get("k1") is None and checkpoint.loaded == 0
        checkpoint.record(_answer("k1"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with Checkpoint.open(path, "f1", {"query": "SELECT 1"}) as again:
        assert again.loaded == 1 and again.get("k1")["answer"] == "an answer" and again.notice is None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [r["type"] for r in records] == ["job", "answer"] and records[0]["fingerprint"] == "f1"


def test_a_torn_last_line_is_skipped_then_cut_off(tmp_path):
    path = tmp_path / "job.mapreduce.jsonl"
    with Checkpoint.open(path, "f1", {}) as checkpoint:
        checkpoint.record(_answer("k1"))
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"type": "answer", "key": "k2", "ans')  # a crash in the middle of a write
    answers, _, problem = load_answers(path, "f1")
    assert problem is None and list(answers) == ["k1"]
    with Checkpoint.open(path, "f1", {}) as checkpoint:
        assert checkpoint.loaded == 1
        checkpoint.record(_answer("k3"))
    assert all(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())


@pytest.mark.parametrize(("content", "problem"), [
    ('{"type": "job", "fingerprint": "other", "parts": {"query": "SELECT 2"}}\n', "written for a different job"),
    ('{"type": "job", "fingerprint": "f1"}\nnot json\n{"type": "answer"}\n', "line 2 is not valid JSON"),
    ('{"type": "answer", "key": "k", "answer": "a"}\n', "has no job record"),
])
def test_a_checkpoint_that_cannot_be_used_is_moved_aside(tmp_path, content, problem):
    path = tmp_path / "job.mapreduce.jsonl"
    path.write_text(content, encoding="utf-8")
    with Checkpoint.open(path, "f1", {"query": "SELECT 1"}) as checkpoint:
        assert checkpoint.loaded == 0 and problem in checkpoint.notice and "moved to" in checkpoint.notice
    assert (tmp_path / "job.mapreduce.jsonl.old").read_text(encoding="utf-8") == content
    assert json.loads(path.read_text(encoding="utf-8"))["fingerprint"] == "f1"


def test_the_call_key_covers_everything_that_decides_the_answer():
    base = dict(system_prompt=None, model="phi4", max_new_tokens=512, temperature=0.7)
    key = call_key("prompt", **base)
    assert key == call_key("prompt", **base)
    changed = [call_key("prompt!", **base)] + [call_key("prompt", **{**base, name: value}) for name, value in
                                               (("system_prompt", "Be brief"), ("model", "llama3"),
                                                ("max_new_tokens", 256), ("temperature", 0.2))]
    assert key not in changed and len(set(changed)) == len(changed)


def test_where_checkpoints_go(tmp_path):
    assert cache_directory({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "db_to_model_pipeline"
    assert cache_directory({"XDG_CACHE_HOME": "relative/dir"}) == Path.home() / ".cache" / "db_to_model_pipeline"
    assert cache_directory({}) == Path.home() / ".cache" / "db_to_model_pipeline"
    assert checkpoint_path("out/answer.md", "abc") == Path("out/answer.md.mapreduce.jsonl")
    assert checkpoint_path(None, "abc", {"XDG_CACHE_HOME": str(tmp_path)}) == (
        tmp_path / "db_to_model_pipeline" / "mapreduce-abc.jsonl")


# --- the call runner --------------------------------------------------------------------------


def _calls(count: int) -> list[Call]:
    return [Call("map", 0, i, i + 1, i + 1, f"key-{i}", 10, 40, "estimate") for i in range(count)]


def _runner(url: str, checkpoint=None, *, concurrency: int = 1, sleeps: Sleeps | None = None) -> CallRunner:
    backend = SingleServerBackend(make_server(url), capacity=concurrency)
    return CallRunner(backend, CallSettings(None, 20, 0.7, concurrency, sleep=sleeps or Sleeps()), checkpoint)


def test_a_failed_call_is_retried_with_growing_pauses():
    sleeps = Sleeps()
    with FakePCServer(fail_first=2, fail_status=500, answer="ok") as srv:
        runner = _runner(srv.base_url, sleeps=sleeps)
        calls = _calls(1)
        runner.run(((c, f"prompt {c.index}") for c in calls), "map")
    assert calls[0].answer == "ok" and calls[0].attempts == 3 and srv.generations == 3
    assert sleeps.calls == [0.5, 1.0]
    assert runner.backend.ambiguous_allowed == [True] * 3  # a map call may be sent again elsewhere


def test_an_invalid_prompt_is_not_retried():
    with FakePCServer(fail_first=5, fail_status=400) as srv:
        calls = _calls(1)
        with pytest.raises(InvalidPromptError):
            _runner(srv.base_url).run(((c, "prompt") for c in calls), "map")
    assert srv.generations == 1 and calls[0].attempts == 1 and "InvalidPromptError" in calls[0].error


def test_after_a_failure_no_new_call_starts_and_the_answers_so_far_are_recorded(tmp_path):
    with Checkpoint.open(tmp_path / "c.jsonl", "f", {}) as checkpoint, \
            MapReducePCServer(fail_from=3, fail_status=500) as srv:
        calls = _calls(10)
        with pytest.raises(ModelServerError):
            _runner(srv.base_url, checkpoint).run(((c, f"prompt {c.index}") for c in calls), "map")
    assert [c.answer is not None for c in calls] == [True, True] + [False] * 8
    assert srv.generation_count == 2 + 3  # the third call's three attempts, then nothing more
    assert [r["key"] for r in load_answers(tmp_path / "c.jsonl", "f")[0].values()] == ["key-0", "key-1"]


def test_checkpointed_answers_are_reused_without_a_request(tmp_path):
    with Checkpoint.open(tmp_path / "c.jsonl", "f", {}) as checkpoint:
        checkpoint.record(_answer("key-1", "from before"))
        with FakePCServer(answer="fresh") as srv:
            calls = _calls(3)
            _runner(srv.base_url, checkpoint, concurrency=2).run(((c, f"prompt {c.index}") for c in calls), "map")
    assert [c.answer for c in calls] == ["fresh", "from before", "fresh"]
    assert [c.reused for c in calls] == [False, True, False] and srv.generations == 2


# --- the engine -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_table(test_db_url):
    conn = psycopg2.connect(test_db_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS mr_small; CREATE TABLE mr_small AS SELECT g AS id, "
                    "'r' || lpad(g::text, 6, '0') AS marker, repeat('note ', 1 + g % 7) AS body "
                    "FROM generate_series(1, 600) g")
    conn.close()
    return "mr_small"


def test_no_database_transaction_is_open_while_the_model_works(test_db_url, small_table):
    busy: list[int] = []

    def reply(prompt: str) -> str:
        with psycopg2.connect(test_db_url) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid() AND state <> 'idle'")
            busy.append(cur.fetchone()[0])
        return "noted"

    question = Question("SELECT * FROM mr_small ORDER BY id", fetch_rows=None, prompt_tokens=600, max_new_tokens=20)
    with MapReducePCServer(reply=reply) as srv:
        settings = make_settings(test_db_url, API_BASE_URL=srv.base_url)
        backend = SingleServerBackend(make_server(srv.base_url))
        run = run_all_rows(question, AllRowsOptions(checkpoint=False), settings, backend)
    assert run.answer == "noted" and len(run.map_calls) > 5
    assert len(busy) == backend.calls == len(run.calls()) and set(busy) == {0}


def test_the_engine_fills_the_run_as_it_goes_even_when_it_fails(test_db_url, small_table):
    question = Question("SELECT * FROM mr_small ORDER BY id", fetch_rows=None, prompt_tokens=600, max_new_tokens=20)
    with MapReducePCServer(fail_from=4, fail_status=500) as srv:
        settings = make_settings(test_db_url, API_BASE_URL=srv.base_url)
        from mr_result import MapReduceRun

        run = MapReduceRun(question.query)
        with pytest.raises(ModelServerError):
            run_all_rows(question, AllRowsOptions(checkpoint=False), settings,
                         SingleServerBackend(make_server(srv.base_url)), run, sleep=Sleeps())
    assert run.rows_total == 600 and run.answers_done() == (3, len(run.map_calls))
    assert run.stats()["calls_answered"] == 3 and run.total_time is not None and run.answer is None


def test_a_dry_run_plans_without_a_backend(test_db_url, small_table, tmp_path):
    question = Question("SELECT * FROM mr_small ORDER BY id", fetch_rows=None, prompt_tokens=600, max_new_tokens=20)
    run = run_all_rows(question, AllRowsOptions(output=str(tmp_path / "a.txt")), make_settings(test_db_url), None,
                       dry_run=True)
    assert len(run.map_calls) > 5 and run.expected_levels[-1] == 1 and run.answer is None
    assert run.checkpoint_path == str(tmp_path / "a.txt.mapreduce.jsonl") and run.reusable == 0
    assert not os.path.exists(run.checkpoint_path)  # a dry run writes nothing
    assert "one part of the data" in run.sample_prompt


def test_a_progress_total_can_be_set_once_known():
    import io

    from progress import ProgressBar

    clock = iter(range(0, 1000, 10)).__next__
    out = io.StringIO()
    bar = ProgressBar(None, unit="calls", stream=out, label="map", interval=5, clock=clock)
    bar.update(3)
    assert bar.status().startswith("map calls 3, ")
    bar.set_total(12)
    bar.update(3)
    assert bar.status().startswith("map calls 6/12 (50%)")
