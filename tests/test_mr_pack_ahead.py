"""Map prompts packed ahead of the calls: the plan is complete while the first calls still run."""

from __future__ import annotations

import io
import threading
import time

import psycopg2
import pytest

import mr_cli
from conftest import make_settings
from errors import PromptError
from fake_map_reduce_server import MapReducePCServer
from map_reduce import AllRowsOptions, run_all_rows
from model_clients import make_server
from mr_calls import Call, CallRunner, CallSettings
from mr_pack_ahead import PackAhead
from mr_result import MapReduceRun
from runner import Question
from single_server_backend import SingleServerBackend


def _call(index: int) -> Call:
    return Call("map", 0, index, index + 1, index + 1, f"key-{index}", 10, 10, "estimate")


def _wait_until(condition, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_every_prompt_is_packed_before_the_reader_asks_and_comes_back_in_order():
    planned: list[int] = []
    texts = [f"prompt {n} 리뷰 \ud800 " + "x" * n for n in range(50)]
    with PackAhead(((_call(n), t) for n, t in enumerate(texts)), planned.append) as packed:
        reader = iter(packed)
        first = next(reader)
        packed.wait()
        assert planned == [50]  # known after one prompt was read
        rest = list(reader)
    assert [c.index for c, _ in [first, *rest]] == list(range(50))
    assert [t for _, t in [first, *rest]] == texts


def test_a_packing_error_comes_after_the_prompts_packed_before_it():
    def chunks():
        yield _call(0), "one"
        yield _call(1), "two"
        raise PromptError("Row 3 does not fit", hint="Fix: fewer columns.")

    planned: list[int] = []
    with PackAhead(chunks(), planned.append) as packed:
        seen = []
        with pytest.raises(PromptError, match="Row 3"):
            for _, text in packed:
                seen.append(text)
    assert seen == ["one", "two"] and planned == []


def test_a_total_known_before_the_run_sizes_its_progress():
    out = io.StringIO()
    with MapReducePCServer() as srv:
        runner = CallRunner(SingleServerBackend(make_server(srv.base_url)), CallSettings(None, 10, 0.5, 1), None,
                            stream=out, quiet=False)
        runner.set_total(5)  # told before the level starts (packing ran ahead); the jobs end early here
        runner.run([(_call(0), "prompt")], "map")
        assert out.getvalue().startswith("map calls 1/5 (20%)")
        runner.run([(_call(1), "prompt")], "reduce level 1")  # a total is for one level only
    assert out.getvalue().splitlines()[1].startswith("reduce level 1 calls 1/1 (100%)")


@pytest.fixture(scope="module")
def pack_table(test_db_url):
    conn = psycopg2.connect(test_db_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS mr_pack; CREATE TABLE mr_pack AS SELECT g AS id, "
                    "repeat('note ', 1 + g % 7) AS body FROM generate_series(1, 600) g")
    conn.close()
    return "mr_pack"


def test_the_plan_is_complete_while_the_first_call_is_still_held(test_db_url, pack_table):
    gate = threading.Event()
    question = Question("SELECT * FROM mr_pack ORDER BY id", fetch_rows=None, prompt_tokens=600, max_new_tokens=20)
    run = MapReduceRun(question.query)
    with MapReducePCServer(gate=gate) as srv:
        settings = make_settings(test_db_url, API_BASE_URL=srv.base_url, API_TIMEOUT="120")
        backend = SingleServerBackend(make_server(srv.base_url))
        worker = threading.Thread(target=run_all_rows, daemon=True,
                                  args=(question, AllRowsOptions(checkpoint=False), settings, backend, run))
        worker.start()
        try:
            planned = _wait_until(lambda: run.map_planned)
            answered = run.answers_done()[0]
        finally:
            gate.set()
        worker.join(timeout=120)
    assert planned and answered == 0 and len(run.map_calls) > 5
    assert run.answer == f"SUM 1-{run.rows_total}" and run.answers_done() == (len(run.map_calls),) * 2


def test_a_run_stopped_before_the_plan_was_complete_says_so():
    run = MapReduceRun("SELECT 1")
    run.map_calls = [_call(n) for n in range(4)]
    assert "Stopped with 0 of at least 4 (the rest were not packed yet) map answers" in mr_cli._kept_message(run)
    run.map_planned = True
    assert "Stopped with 0 of 4 map answers" in mr_cli._kept_message(run)
