"""server_pool.ModelServerPool against real loopback servers of each protocol: limits, dispatch,
waiting in order, health and failover, all asserted at the servers (what each one received and
answered). No assertion depends on how fast this machine is: servers are held with a gate, and
every wait is a generous bound on a condition, not a measured time."""

from __future__ import annotations

import collections
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import pytest

from errors import (
    BadResponseError,
    ConfigError,
    InvalidPromptError,
    ModelConnectionError,
    ModelDisconnectedError,
    ModelNotLoadedError,
    ModelServerError,
    ModelTimeoutError,
    PipelineError,
)
from fake_ollama_server import FakeOllamaServer
from fake_openai_server import FakeOpenAIServer
from fake_pc_server import FakePCServer
from fake_server_base import DEFAULT_ANSWER, free_port, prompt_text
from model_api_client import ModelServerPool
from model_clients import Sleeps, settings_for
from pool_health import AMBIGUOUS, FAILOVER, FATAL, failure_kind


def make_pool(*urls: str, cooldown: float = 0.05, rand: Callable[[], float] | None = None,
              **overrides: Any) -> ModelServerPool:
    """A pool over ``urls`` with short timeouts and cooldowns; backoff recorded, not slept."""
    extra = {"rand": rand} if rand is not None else {}
    return ModelServerPool(settings_for(",".join(urls), **overrides), sleep=Sleeps(), cooldown=cooldown,
                           max_cooldown=0.2, **extra)


def wait_until(condition: Callable[[], bool], what: str, bound: float = 20.0) -> None:
    """Wait for a condition (a generous bound: a loaded machine is slow, not wrong)."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.005)


def run_many(pool: ModelServerPool, prompts: list[str], threads: int, **kw: Any) -> dict[str, Any]:
    """Each prompt through the pool from ``threads`` threads: {prompt: Generation or the error raised}."""
    def one(prompt: str) -> Any:
        try:
            return pool.generate(prompt, **kw)
        except PipelineError as exc:
            return exc

    with ThreadPoolExecutor(threads) as executor:
        return dict(zip(prompts, executor.map(one, prompts)))


def answered_counts(*servers: Any) -> collections.Counter:
    return collections.Counter(prompt for srv in servers for prompt in srv.answered)


def posts_with(srv: Any, prompt: str) -> int:
    return sum(1 for r in srv.requests if r.method == "POST" and prompt_text(r.json) == prompt)


# --- dispatch and limits ---


def test_mixed_protocols_share_the_work_within_their_limits():
    with FakePCServer(delay=0.02, serial=False) as pc, FakeOpenAIServer(delay=0.02, slots=2) as llama, \
            FakeOllamaServer(delay=0.02) as ollama:
        pool = make_pool(pc.base_url, llama.base_url, ollama.base_url + "#slots=3")
        prompts = [f"질문 {i}" for i in range(60)]
        results = run_many(pool, prompts, threads=12)
        statuses = pool.statuses()
    assert all(not isinstance(r, Exception) for r in results.values()), results
    # Every request answered exactly once, by the server its stats name.
    assert answered_counts(pc, llama, ollama) == collections.Counter(prompts)
    by_url = {pc.base_url: pc, llama.base_url: llama, ollama.base_url: ollama}
    for prompt, generation in results.items():
        assert generation.text == DEFAULT_ANSWER
        assert prompt in by_url[generation.stats.server].answered
    # Never more generations at once at a server than its limit (pc 1, llama.cpp's slots, #slots).
    assert pc.peak_generations <= 1 and llama.peak_generations <= 2 and ollama.peak_generations <= 3
    assert all(srv.answered for srv in (pc, llama, ollama))  # every server took part
    assert [(s.limit, s.limit_source) for s in statuses] == [
        (1, "the pc server runs one at a time"), (2, "reported by the server"), (3, "#slots")]
    assert [s.served for s in statuses] == [len(pc.answered), len(llama.answered), len(ollama.answered)]
    assert pool.capacity == 6 and pool.in_flight == 0 and pool.waiting == 0


def test_extra_callers_wait_on_the_laptop_instead_of_piling_onto_the_server():
    gate = threading.Event()
    with FakeOpenAIServer(slots=3, gate=gate) as srv:
        pool = make_pool(srv.base_url)
        with ThreadPoolExecutor(10) as executor:
            futures = [executor.submit(pool.generate, f"q{i}") for i in range(10)]
            wait_until(lambda: srv.in_progress == 3 and pool.waiting == 7, "3 at the server, 7 waiting")
            assert pool.in_flight == 3
            gate.set()
            texts = [future.result(timeout=30).text for future in futures]
    assert texts == [DEFAULT_ANSWER] * 10
    assert srv.peak_generations == 3 and srv.generations == 10
    assert answered_counts(srv) == collections.Counter(f"q{i}" for i in range(10))


def test_callers_are_served_in_the_order_they_came():
    gate = threading.Event()
    with FakePCServer(serial=False, gate=gate) as srv:
        pool = make_pool(srv.base_url)
        with ThreadPoolExecutor(6) as executor:
            futures = [executor.submit(pool.generate, "q0")]
            wait_until(lambda: srv.in_progress == 1, "the first request at the server")
            for i in range(1, 6):
                futures.append(executor.submit(pool.generate, f"q{i}"))
                wait_until(lambda i=i: pool.waiting == i, f"{i} callers waiting")
            gate.set()
            for future in futures:
                future.result(timeout=30)
    assert srv.answered == [f"q{i}" for i in range(6)]
    assert srv.peak_generations == 1


def test_ctrl_c_while_waiting_for_a_slot_leaves_the_line_and_takes_no_slot():
    gate = threading.Event()

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with FakePCServer(serial=False, gate=gate) as srv:
            pool = make_pool(srv.base_url)
            with ThreadPoolExecutor(1) as executor:
                first = executor.submit(pool.generate, "first")
                wait_until(lambda: srv.in_progress == 1, "the first request at the server")
                signal.setitimer(signal.ITIMER_REAL, 0.2)  # fires while this thread waits in line
                with pytest.raises(KeyboardInterrupt):
                    pool.generate("interrupted")
                assert pool.waiting == 0 and pool.in_flight == 1
                gate.set()
                assert first.result(timeout=30).text == DEFAULT_ANSWER
            assert pool.generate("after").text == DEFAULT_ANSWER and pool.in_flight == 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert srv.answered == ["first", "after"]


def test_dispatch_goes_by_free_capacity_relative_to_the_limit_not_round_robin():
    gate = threading.Event()
    with FakeOpenAIServer(slots=2, gate=gate) as small, FakeOpenAIServer(slots=4, gate=gate) as big:
        pool = make_pool(small.base_url, big.base_url, rand=lambda: 0.0)  # ties go to the first listed
        assert all(report.ok for report in pool.check_health())  # both known before the first request
        with ThreadPoolExecutor(6) as executor:
            futures = []
            for i in range(6):
                futures.append(executor.submit(pool.generate, f"q{i}"))
                wait_until(lambda i=i: small.in_progress + big.in_progress == i + 1, f"request {i} at a server")
            # free/limit: tie (1.0) -> small; big 1.0 > 0.5; big 0.75 > 0.5; tie (0.5) -> small; then big, big
            assert (small.in_progress, big.in_progress) == (2, 4)
            gate.set()
            [future.result(timeout=30) for future in futures]
    assert sorted(small.answered) == ["q0", "q3"]
    assert sorted(big.answered) == ["q1", "q2", "q4", "q5"]


def test_ties_are_broken_at_random():
    with FakeOllamaServer() as first, FakeOllamaServer() as second:
        pool = make_pool(first.base_url, second.base_url, rand=lambda: 0.99)
        pool.check_health()
        pool.generate("q")
    assert (first.answered, second.answered) == ([], ["q"])


def test_many_threads_calling_one_pool_each_get_their_own_answer():
    with FakeOllamaServer(delay=0.01) as a, FakeOpenAIServer(slots=4) as b:
        pool = make_pool(a.base_url + "#slots=2", b.base_url)
        prompts = [f"p{i}" for i in range(200)]
        results = run_many(pool, prompts, threads=32)
    assert answered_counts(a, b) == collections.Counter(prompts)
    assert all(r.text == DEFAULT_ANSWER for r in results.values())
    assert a.peak_generations <= 2 and b.peak_generations <= 4


# --- per-server settings after # ---


def test_fragment_settings_apply_to_their_server_and_never_reach_it():
    turns = iter([0.0, 0.99] * 1000)
    with FakeOllamaServer(models=["llama3.2:latest"]) as ollama, FakePCServer() as pc:
        pool = make_pool(ollama.base_url + "#model=llama3.2&slots=2", pc.base_url + "#protocol=pc",
                         rand=lambda: next(turns))
        sent = 0
        while not (ollama.answered and pc.answered) and sent < 200:
            pool.generate(f"q{sent}")
            sent += 1
    # This server's model name (MODEL_NAME is phi4), and no detection where the protocol is given.
    assert [r.json["model"] for r in ollama.requests if r.method == "POST"] == ["llama3.2"] * len(ollama.answered)
    assert ollama.answered and pc.answered and {r.method for r in pc.requests} == {"POST"}
    for request in ollama.requests + pc.requests:
        assert "#" not in request.path and "slots" not in request.path and "model=" not in request.path
    assert [s.limit for s in pool.statuses()] == [2, 1]


def test_a_missing_ca_file_is_a_configuration_error_naming_the_server(tmp_path):
    with pytest.raises(ConfigError) as info:
        make_pool("http://127.0.0.1:9#slots=2", f"http://127.0.0.1:8#ca={tmp_path}/nope.pem")
    assert "http://127.0.0.1:8" in info.value.message and "nope.pem" in info.value.message
    assert "#ca=" in info.value.hint
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n", encoding="utf-8")
    pool = make_pool(f"https://127.0.0.1:8#ca={bundle}")
    assert pool.clients[0].transport.options.ca_bundle == str(bundle)
    assert pool.clients[0].base_url == "https://127.0.0.1:8"


# --- health and failover ---


def test_a_server_refusing_connections_from_the_start_gets_no_work(caplog):
    caplog.set_level(logging.INFO, logger="server_pool")
    dead = f"http://127.0.0.1:{free_port()}"
    with FakeOllamaServer() as alive:
        pool = make_pool(dead, alive.base_url)
        results = run_many(pool, [f"q{i}" for i in range(12)], threads=4)
        # On a loaded machine the live server may answer all 12 before the dead one's first probe
        # has given its verdict: wait for it (nothing is waiting, so no re-check follows it).
        wait_until(lambda: pool.statuses()[0].state == "down", "the dead server's verdict")
        statuses = pool.statuses()
    assert answered_counts(alive) == collections.Counter(f"q{i}" for i in range(12))
    assert all(r.stats.server == alive.base_url for r in results.values())
    assert statuses[0].state == "down" and statuses[0].served == 0
    assert f"Model server {dead} is down" in caplog.text


def test_a_request_that_never_reached_a_model_goes_to_another_server_at_once():
    with FakeOpenAIServer(slots=2) as loading, FakePCServer(serial=False) as pc:
        pool = make_pool(loading.base_url, pc.base_url, rand=lambda: 0.0)  # the loading one is tried first
        assert all(report.ok for report in pool.check_health())
        loading.loading = True  # it restarts and loads its model again
        generation = pool.generate("q0")
    assert generation.stats.server == pc.base_url and pc.answered == ["q0"]
    assert loading.generations == 1 and loading.answered == []  # one 503, no retry there with backoff


def test_a_server_slow_to_load_gets_work_once_a_get_says_it_is_ready(caplog):
    caplog.set_level(logging.INFO, logger="server_pool")
    with FakeOpenAIServer(loading=True, slots=2, delay=0.01) as llama, FakePCServer(serial=False, delay=0.02) as pc:
        pool = make_pool(llama.base_url, pc.base_url, cooldown=0.01)
        results = run_many(pool, [f"a{i}" for i in range(20)], threads=4)
        assert llama.generations <= 2  # at most its limit, before the first 503 took it out
        assert llama.answered == [] and answered_counts(pc) == collections.Counter(list(results))
        marker = len(llama.requests)
        llama.loading = False
        sent = 0
        while not llama.answered and sent < 2000:  # demand drives the re-checks
            pool.generate(f"b{sent}")
            sent += 1
        assert llama.answered, "the server that finished loading never got work"
    after = llama.requests[marker:]
    first_post = next(i for i, r in enumerate(after) if r.method == "POST")
    assert first_post > 0 and all(r.method == "GET" for r in after[:first_post])  # checked with GETs first
    everything = answered_counts(llama, pc)
    assert max(everything.values()) == 1 and sum(everything.values()) == 20 + sent
    # The log records each change: down (with why), then back.
    assert f"Model server {llama.base_url} is down: The model server at {llama.base_url} is still loading" in caplog.text
    assert f"Model server {llama.base_url} is back: openai, 2 at a time" in caplog.text


def test_an_ambiguous_failure_is_not_resent_unless_asked():
    with FakeOllamaServer(drop=True) as dropping, FakeOllamaServer() as good:
        pool = make_pool(dropping.base_url, good.base_url, rand=lambda: 0.0)
        pool.check_health()  # both up: the tie goes to the first listed, the dropping one
        with pytest.raises(ModelDisconnectedError) as info:
            pool.generate("only once")
        assert info.value.exit_code == 5
        assert posts_with(dropping, "only once") == 1 and posts_with(good, "only once") == 0
        assert pool.statuses()[0].state in ("down", "probing")
        assert pool.check_health()[0].ok and pool.statuses()[0].state == "up"  # a GET brings it back
        resent = pool.generate("resend me", retry_ambiguous=True)
    assert resent.stats.server == good.base_url and good.answered == ["resend me"]
    assert posts_with(dropping, "resend me") == 1


def test_a_server_killed_mid_run_fails_only_what_it_was_generating():
    gate = threading.Event()
    victim = FakeOpenAIServer(slots=2, gate=gate).start()
    with FakePCServer(serial=False, delay=0.05) as survivor:
        pool = make_pool(victim.base_url, survivor.base_url, rand=lambda: 0.0)
        with ThreadPoolExecutor(8) as executor:
            futures = {f"q{i}": executor.submit(pool.generate, f"q{i}") for i in range(30)}
            wait_until(lambda: victim.in_progress == 2, "two generations at the victim")
            victim.kill()
            results = {prompt: _outcome(future) for prompt, future in futures.items()}
    failed = {p for p, r in results.items() if isinstance(r, Exception)}
    assert len(failed) >= 2 and all(isinstance(results[p], ModelDisconnectedError) for p in failed)
    for prompt in failed:  # not silently sent to the other server
        assert posts_with(survivor, prompt) == 0 and posts_with(victim, prompt) == 1
    answered = answered_counts(victim, survivor)
    assert set(answered) == set(results) - failed and max(answered.values()) == 1
    assert victim.peak_generations <= 2 and survivor.peak_generations <= 1


def test_a_killed_server_with_retry_ambiguous_loses_nothing_and_answers_nothing_twice(caplog):
    gate = threading.Event()
    victim = FakeOllamaServer(gate=gate).start()
    with FakeOpenAIServer(slots=2, delay=0.05) as survivor:
        pool = make_pool(victim.base_url + "#slots=3", survivor.base_url)
        prompts = [f"q{i}" for i in range(40)]
        with ThreadPoolExecutor(10) as executor:
            futures = [executor.submit(pool.generate, p, retry_ambiguous=True) for p in prompts]
            wait_until(lambda: victim.in_progress == 3, "three generations at the victim")
            victim.kill()
            results = [future.result(timeout=60) for future in futures]
    assert all(r.stats.server == survivor.base_url for r in results)
    assert answered_counts(victim, survivor) == collections.Counter(prompts)
    resent = [r.getMessage() for r in caplog.records if "trying another server" in r.getMessage()]
    assert resent and not any("not retried" in text or "not sent again" in text for text in resent), resent


def test_a_stream_cut_after_the_first_piece_keeps_the_partial_answer_and_is_not_resent():
    answer = " ".join(f"w{i}" for i in range(20))
    with FakeOpenAIServer(answer=answer, cut_after=3) as cutting, FakeOllamaServer() as other:
        pool = make_pool(cutting.base_url, other.base_url, rand=lambda: 0.0)
        pool.check_health()  # both up: the tie goes to the first listed, the cutting one
        generation = pool.stream("cut me")
        assert pool.in_flight == 1  # the slot is held while the answer streams
        pieces = []
        with pytest.raises(BadResponseError) as info:
            for piece in generation:
                pieces.append(piece)
        assert pool.in_flight == 0
    assert info.value.partial_text == "w0 w1 w2 " == "".join(pieces)
    assert posts_with(other, "cut me") == 0
    assert pool.statuses()[0].state in ("down", "probing")


def test_a_stream_frees_its_slot_when_closed_early():
    with FakeOpenAIServer(answer="a b c d e f", piece_delay=0.01) as srv:
        pool = make_pool(srv.base_url)
        with pool.stream("q") as generation:
            assert next(iter(generation)) == "a "
            assert pool.in_flight == 1
        assert pool.in_flight == 0
        assert pool.generate("again").text == "a b c d e f"
    assert pool.statuses()[0].failed == 0


def test_all_servers_down_names_each_one_and_exits_5():
    first, second = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    pool = make_pool(first, second)
    with pytest.raises(ModelConnectionError) as info:
        pool.generate("q")
    message = info.value.message
    assert info.value.exit_code == 5 and "all 2 are down" in message
    assert f"{first}: Cannot connect" in message and f"{second}: Cannot connect" in message
    assert "--check" in info.value.hint


def test_one_server_down_raises_its_own_error_as_before():
    url = f"http://127.0.0.1:{free_port()}"
    pool = make_pool(url, API_PROTOCOL="pc")
    with pytest.raises(ModelConnectionError) as info:
        pool.generate("q")
    assert "Cannot connect to the model server" in info.value.message and "firewall" in info.value.hint
    with pytest.raises(ModelConnectionError):  # a later call checks again (GET) instead of trusting old news
        pool.generate("q")


def test_wait_for_server_waits_for_one_to_come_back():
    port = free_port()
    pool = make_pool(f"http://127.0.0.1:{port}", API_PROTOCOL="ollama", cooldown=0.01)
    with pytest.raises(ModelConnectionError):
        pool.generate("q")  # down, and no waiting asked for
    late = FakeOllamaServer(port=port, start_delay=0.3).start()  # refuses until it binds the port
    try:
        generation = pool.generate("q", wait_for_server=60)
    finally:
        late.stop()
    assert generation.text == DEFAULT_ANSWER and late.answered == ["q"]


def test_wait_for_server_gives_up_after_its_bound_and_says_so():
    pool = make_pool(f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}", cooldown=0.01)
    with pytest.raises(ModelConnectionError) as info:
        pool.generate("q", wait_for_server=0.2)
    assert "waited 0.2 s for one to come back" in info.value.message


# --- health checks ---


def test_check_health_reports_every_server_and_puts_ready_ones_to_work(caplog):
    caplog.set_level(logging.INFO)
    dead = f"http://127.0.0.1:{free_port()}"
    with FakePCServer() as pc, FakeOllamaServer(models=["llama3.2:latest"]) as no_model, \
            FakeOpenAIServer(slots=4) as llama:
        pool = make_pool(pc.base_url, no_model.base_url, dead, llama.base_url)
        reports = pool.check_health()
        assert [r.ok for r in reports] == [True, False, False, True]
        assert [r.server for r in reports] == [pc.base_url, no_model.base_url, dead, llama.base_url]
        assert (reports[0].concurrency, reports[3].concurrency) == (1, 4)
        assert reports[1].reachable and "ollama pull" in reports[1].fix and not reports[2].reachable
        assert [s.state for s in pool.statuses()] == ["up", "down", "down", "up"]
        assert pool.capacity == 5
        assert pool.generate("q").stats.server in (pc.base_url, llama.base_url)
    for server in (pc, no_model, llama):  # the checks sent GETs only
        assert server.count("POST") == len(server.answered)
    assert dead in caplog.text and no_model.base_url in caplog.text


def test_check_server_health_reports_on_every_configured_server(monkeypatch, caplog):
    import model_api_client

    caplog.set_level(logging.INFO)
    with FakePCServer() as ready:
        dead = f"http://127.0.0.1:{free_port()}"
        monkeypatch.setenv("API_BASE_URL", f"{dead},{ready.base_url}")
        monkeypatch.setenv("API_CONNECT_TIMEOUT", "1")
        assert model_api_client.check_server_health() is True
        text, stats = model_api_client.send_prompt("질문")
    assert text == DEFAULT_ANSWER and stats["server"] == ready.base_url
    assert dead in caplog.text and "Model server healthy" in caplog.text


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ModelConnectionError("refused"), FAILOVER),
        (ModelNotLoadedError("loading", status=503), FAILOVER),
        (ModelServerError("busy", status=429), FAILOVER),
        (ModelServerError("unavailable", status=503), FAILOVER),
        (ModelDisconnectedError("dropped"), AMBIGUOUS),
        (ModelTimeoutError("slow"), AMBIGUOUS),
        (BadResponseError("cut", partial_text="half"), AMBIGUOUS),
        (ModelServerError("gateway", status=504), AMBIGUOUS),
        (ModelServerError("crash", status=500), FATAL),
        (ModelServerError("key", status=401), FATAL),
        (InvalidPromptError("too long", status=400), FATAL),
        (ConfigError("bad"), FATAL),
    ],
)
def test_failure_kinds(error, kind):
    assert failure_kind(error) == kind


def _outcome(future: Any) -> Any:
    try:
        return future.result(timeout=60)
    except PipelineError as exc:
        return exc


def test_an_empty_prompt_is_refused_before_it_takes_a_slot_or_reaches_a_server():
    with FakeOllamaServer() as srv:
        pool = make_pool(srv.base_url)
        with pytest.raises(InvalidPromptError, match="The prompt is empty"):
            pool.generate("   ")
        with pytest.raises(InvalidPromptError):
            pool.stream("")
        assert srv.requests == [] and pool.statuses()[0].failed == 0 and pool.in_flight == 0
