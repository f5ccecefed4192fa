"""batch_runner.py against real loopback servers: concurrency, retries per row, early stops, schemas."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter

import pytest

from batch_runner import BatchRunner, BatchSettings, RowTask
from row_failure import Failure, classify
from errors import (
    BadResponseError,
    ConfigError,
    InvalidPromptError,
    ModelConnectionError,
    ModelDisconnectedError,
    ModelNotLoadedError,
    ModelServerError,
    ModelTimeoutError,
)
from fake_ollama_server import FakeOllamaServer
from fake_openai_server import FakeOpenAIServer
from fake_pc_server import FakePCServer
from fake_server_base import free_port, prompt_text
from model_clients import Sleeps
from single_server_backend import SingleServerBackend
from structured_output import AnswerSchema

SCHEMA = {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative"]}},
          "required": ["sentiment"]}


def tasks(count: int, text: str = "Classify review") -> list[RowTask]:
    return [RowTask(i, i + 1, f"{text} #{i + 1}#") for i in range(count)]


def row_of(prompt: str) -> int:
    return int(re.search(r"#(\d+)#", prompt).group(1))


class Records:
    """A thread-safe ``write`` that keeps the records."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self._lock = threading.Lock()

    def __call__(self, record: dict) -> None:
        with self._lock:
            self.items.append(record)

    def by_key(self) -> dict:
        return {r["key"]: r for r in self.items}


def run(backend, items, *, sleep=None, clock=None, **settings):
    settings.setdefault("concurrency", backend.capacity)
    records = Records()
    kwargs = {"sleep": sleep or Sleeps()}
    if clock is not None:
        kwargs["clock"] = clock
    runner = BatchRunner(backend, BatchSettings(**settings), records, job="job1", **kwargs)
    summary = runner.run(iter(items), len(items))
    return summary, records


def generation_prompts(server) -> list[str]:
    return [prompt_text(r.json) for r in server.requests if r.method == "POST"]


def test_every_row_once_and_never_more_in_flight_than_the_concurrency():
    with FakeOllamaServer(answer="positive", delay=0.01) as srv, SingleServerBackend(srv.base_url, capacity=4) as backend:
        summary, records = run(backend, tasks(300))
    assert summary.ok == 300 and summary.failed == 0 and summary.not_done == 0 and summary.stop is None
    assert sorted(records.by_key()) == list(range(1, 301)) and len(records.items) == 300
    assert Counter(row_of(p) for p in generation_prompts(srv)) == Counter(range(1, 301))
    assert srv.peak_generations <= 4
    assert set(backend.retry_ambiguous) == {True}  # a duplicate generation is acceptable per row
    record = records.by_key()[7]
    assert record["status"] == "ok" and record["answer"] == "positive" and record["attempts"] == 1
    assert record["server"] == srv.base_url and record["input_tokens"] > 0 and record["output_tokens"] == 1
    assert summary.servers[srv.base_url].answers == 300 and summary.output_tokens == 300


def test_a_row_the_server_keeps_failing_is_retried_then_recorded_and_the_run_goes_on():
    sleeps = Sleeps()
    with FakePCServer(answer="ok", fail_when="#13#", fail_status=500, serial=False) as srv, \
            SingleServerBackend(srv.base_url, capacity=2) as backend:
        summary, records = run(backend, tasks(40), sleep=sleeps, attempts=3)
    failed = records.by_key()[13]
    assert failed["status"] == "error" and failed["error_code"] == "SERVER_ERROR" and failed["attempts"] == 3
    assert "fake failure 500" in failed["error"]
    assert Counter(row_of(p) for p in generation_prompts(srv))[13] == 3
    assert summary.ok == 39 and summary.counts["error"] == 1 and summary.stop is None
    assert len(sleeps.calls) == 2 and 0.5 <= sleeps.calls[0] <= 1.0 and 1.0 <= sleeps.calls[1] <= 2.0  # backoff


def test_a_rejected_prompt_is_not_retried():
    with FakeOllamaServer(fail_when="#3#", fail_status=400) as srv, SingleServerBackend(srv.base_url) as backend:
        summary, records = run(backend, tasks(10))
    assert records.by_key()[3]["error_code"] == "INVALID_PROMPT" and records.by_key()[3]["attempts"] == 1
    assert summary.ok == 9 and len(generation_prompts(srv)) == 10


def test_401_stops_the_run_at_once():
    with FakeOpenAIServer(api_key="right-key") as srv, \
            SingleServerBackend(srv.base_url, capacity=2, API_KEY="wrong-key") as backend:
        summary, records = run(backend, tasks(50))
    assert summary.stop is not None and summary.stop.exit_code == 6 and "401" in summary.stop.message
    assert records.items == [] and summary.not_done == 50
    assert len(generation_prompts(srv)) <= 2  # the rows already in flight, nothing after


def test_a_missing_model_stops_the_run_before_any_generation():
    with FakeOllamaServer(models=["llama3.2:latest"]) as srv, SingleServerBackend(srv.base_url) as backend:
        summary, records = run(backend, tasks(5))
    assert summary.stop.error.code == "MODEL_NOT_LOADED" and "ollama pull phi4" in summary.stop.error.hint
    assert records.items == [] and generation_prompts(srv) == []


def test_first_rows_failing_the_same_way_stop_the_run():
    with FakeOllamaServer(fail_when="Classify", fail_status=400) as srv, SingleServerBackend(srv.base_url) as backend:
        summary, records = run(backend, tasks(1000), first_rows=5)
    assert summary.stop is not None and "first 5 rows all failed the same way" in summary.stop.message
    assert "INVALID_PROMPT" in summary.stop.message and summary.stop.exit_code == 6
    assert len(records.items) == 5 and len(generation_prompts(srv)) == 5


def test_an_outage_waits_without_spending_attempts_and_rows_go_on_when_the_server_is_back():
    port = free_port()
    server = FakeOllamaServer(answer="positive", port=port)
    sleeps = Sleeps(then=lambda n: server.start() if n == 3 else None)  # back after three waits
    backend = SingleServerBackend(f"http://127.0.0.1:{port}", API_MAX_ATTEMPTS=1)
    try:
        summary, records = run(backend, tasks(5), sleep=sleeps, concurrency=1)
    finally:
        backend.close()
        server.stop()
    assert summary.ok == 5 and summary.stop is None
    assert all(r["attempts"] == 1 for r in records.items)  # the unanswered tries are not attempts


def test_an_outage_is_reported_once_and_its_end_too_however_many_rows_wait(caplog):
    port = free_port()
    server = FakeOllamaServer(answer="positive", port=port)
    sleeps = Sleeps(then=lambda n: server.start() if n == 9 else None)  # back after nine waits in all
    backend = SingleServerBackend(f"http://127.0.0.1:{port}", API_MAX_ATTEMPTS=1)
    try:
        with caplog.at_level("WARNING", logger="batch_runner"):
            summary, _ = run(backend, tasks(12), sleep=sleeps, concurrency=3)
    finally:
        backend.close()
        server.stop()
    assert summary.ok == 12 and len(sleeps.calls) >= 9
    messages = [r.getMessage() for r in caplog.records if r.name == "batch_runner"]
    assert len([m for m in messages if m.startswith("No model server reachable")]) == 1
    assert len([m for m in messages if m.startswith("A model server answers again after")]) == 1


def test_an_outage_longer_than_the_bound_stops_the_run():
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with SingleServerBackend(f"http://127.0.0.1:{free_port()}", API_MAX_ATTEMPTS=1) as backend:
        summary, records = run(backend, tasks(20), sleep=sleep, clock=lambda: now[0], concurrency=1, down_limit=60)
    assert summary.stop is not None and summary.stop.exit_code == 5
    assert "no model server could be reached for" in summary.stop.message and records.items == []
    assert 60 <= now[0] <= 70


def answers_by_marker(prompt: str) -> str:
    if "Your previous answer" in prompt:
        return '{"sentiment": "negative"}' if "#2#" in prompt else "still not json"
    if "#1#" in prompt:
        return '```json\n{"sentiment": "positive"}\n```'
    return '{"sentiment": "furious"}'


def test_schema_valid_repaired_and_never_valid_answers():
    with FakeOllamaServer(answer_for=answers_by_marker) as srv, SingleServerBackend(srv.base_url) as backend:
        summary, records = run(backend, tasks(3), schema=AnswerSchema(SCHEMA))
    by_key = records.by_key()
    assert (by_key[1]["status"], by_key[1]["parsed"], by_key[1]["attempts"]) == ("ok", {"sentiment": "positive"}, 1)
    assert (by_key[2]["status"], by_key[2]["parsed"], by_key[2]["attempts"]) == ("ok", {"sentiment": "negative"}, 2)
    assert by_key[3]["status"] == "invalid" and by_key[3]["answer"] == "still not json" and by_key[3]["attempts"] == 2
    assert by_key[3]["error_code"] == "INVALID_ANSWER" and "not JSON" in by_key[3]["error"]
    assert by_key[2]["input_tokens"] > by_key[1]["input_tokens"]  # both requests counted
    posts = [r.json for r in srv.requests if r.method == "POST"]
    assert all(body["format"] == SCHEMA for body in posts)  # Ollama is asked natively
    repair = next(body for body in posts if "Your previous answer" in body["messages"][-1]["content"]
                  and "#2#" in body["messages"][-1]["content"])
    assert "'furious' is not one of ['positive', 'negative']" in repair["messages"][-1]["content"]
    assert summary.ok == 2 and summary.counts["invalid"] == 1


def test_answers_cut_at_the_token_limit_are_truncated():
    long_answer = " ".join(["word"] * 50)
    with FakeOllamaServer(answer=long_answer) as ollama, SingleServerBackend(ollama.base_url) as backend:
        _, ollama_records = run(backend, tasks(2), max_new_tokens=10)
    with FakePCServer(answer=long_answer) as pc, SingleServerBackend(pc.base_url) as backend:
        _, pc_records = run(backend, tasks(2), max_new_tokens=10)
    for records in (ollama_records, pc_records):
        assert {r["status"] for r in records.items} == {"truncated"}
        assert records.items[0]["answer"].strip() == " ".join(["word"] * 10) and records.items[0]["error_code"] == "TRUNCATED"
    assert ollama_records.items[0]["finish_reason"] == "length"


def test_a_prompt_longer_than_the_window_is_not_sent():
    with FakeOllamaServer() as srv, SingleServerBackend(srv.base_url) as backend:
        items = [RowTask(0, 1, "short #1#"), RowTask(1, 2, "x" * 5000 + " #2#")]
        _, records = run(backend, items, prompt_tokens=1000, prompt_counter=None, prompt_chars=4000)
    assert records.by_key()[1]["status"] == "ok"
    assert records.by_key()[2]["error_code"] == "PROMPT_ERROR" and "--prompt-max-chars" in records.by_key()[2]["error"]
    assert [row_of(p) for p in generation_prompts(srv)] == [1]


@pytest.mark.parametrize(("error", "kind"), [
    (ModelConnectionError("refused"), Failure.OUTAGE),
    (ModelDisconnectedError("dropped"), Failure.RETRY),
    (ModelTimeoutError("slow"), Failure.RETRY),
    (ModelServerError("busy", status=429), Failure.RETRY),
    (ModelServerError("boom", status=500), Failure.RETRY),
    (ModelServerError("key", status=401), Failure.FATAL),
    (ModelServerError("forbidden", status=403), Failure.FATAL),
    (ModelServerError("no endpoint", status=404), Failure.FATAL),
    (ModelServerError("teapot", status=418), Failure.ROW),
    (ModelNotLoadedError("loading", status=503), Failure.RETRY),
    (ModelNotLoadedError("not pulled", status=404), Failure.FATAL),
    (ModelNotLoadedError("load failed", status=503, detail="모델을 로드할 수 없습니다: CUDA out of memory"), Failure.FATAL),
    (BadResponseError("html"), Failure.RETRY),
    (InvalidPromptError("too long", status=400), Failure.ROW),
    (ConfigError("no PC_IP"), Failure.FATAL),
])
def test_classification(error, kind):
    assert classify(error) is kind


def test_records_are_json_and_name_the_job():
    with FakeOllamaServer(answer="네, 긍정입니다") as srv, SingleServerBackend(srv.base_url) as backend:
        _, records = run(backend, tasks(3))
    for record in records.items:
        assert json.loads(json.dumps(record, ensure_ascii=False)) == record and record["job"] == "job1"
