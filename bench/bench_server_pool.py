"""Benchmark: a pool of three model servers under load, and one of them killed mid-run.

    python bench/bench_server_pool.py [--requests 300] [--threads 32] [--runs 1] [--fakes]

Three loopback servers with concurrency limits 1 (a pc server), 2 and 4 (llama.cpp servers
reporting their slots), each taking a fixed 100 ms per generation: together 70 generations per
second. The requests come from a thread pool through one ModelServerPool. The servers are lean
asyncio servers in their own processes (``bench/lean_model_server.py``); ``--fakes`` uses the
test fakes in this process instead, whose threads compete with the client's for the interpreter.

  steady   every request answered; throughput as a ratio to the combined capacity (target >= 0.9)
           and each server's share against its share of the capacity (target within +-15 %)
  killed   the limit-4 server is killed once 1/3 of the requests are answered (its connections
           dropped, like a crashed process); with retry_ambiguous=True every request must still be
           answered exactly once at the servers, and the throughput after the kill is compared with
           the remaining capacity (target >= 0.85)

Capacity is the servers' limits divided by the fixed 100 ms generation time; loopback, server and
client overhead all count against the pool.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

import config  # noqa: E402
from fake_openai_server import FakeOpenAIServer  # noqa: E402
from fake_pc_server import FakePCServer  # noqa: E402
from lean_model_server import LeanServer  # noqa: E402
from server_pool import ModelServerPool  # noqa: E402

GENERATION_SECONDS = 0.1
LIMITS = (1, 2, 4)


class _Fake:
    """A test fake behind the lean server's interface."""

    def __init__(self, fake: Any) -> None:
        self.fake = fake.start()
        self.base_url = fake.base_url

    def stats(self) -> dict[str, Any]:
        return {"answered": list(self.fake.answered), "peak": self.fake.peak_generations}

    def kill(self) -> None:
        self.fake.kill()

    def stop(self) -> None:
        self.fake.stop()


def start_servers(fakes: bool) -> list[Any]:
    """pc (1 at a time), llama.cpp with 2 slots, llama.cpp with 4 slots; 100 ms per generation."""
    if fakes:
        return [_Fake(FakePCServer(delay=GENERATION_SECONDS, serial=False)),
                _Fake(FakeOpenAIServer(delay=GENERATION_SECONDS, slots=2)),
                _Fake(FakeOpenAIServer(delay=GENERATION_SECONDS, slots=4))]
    return [LeanServer("pc", 1, GENERATION_SECONDS), LeanServer("llamacpp", 2, GENERATION_SECONDS),
            LeanServer("llamacpp", 4, GENERATION_SECONDS)]


def make_pool(servers: list[Any]) -> ModelServerPool:
    settings = config.load_settings({"API_BASE_URL": ",".join(s.base_url for s in servers),
                                     "API_CONNECT_TIMEOUT": 2, "API_TIMEOUT": 30}, environ={})
    pool = ModelServerPool(settings)
    reports = pool.check_health()  # protocols and limits known before the clock starts
    assert all(r.ok for r in reports) and [r.concurrency for r in reports] == list(LIMITS), reports
    return pool


def run(pool: ModelServerPool, prompts: list[str], threads: int, kill: Any = None,
        kill_after: int = 0) -> dict[str, Any]:
    """Send every prompt; optionally kill ``kill`` once ``kill_after`` answers are in."""
    done_times: list[float] = []
    lock = threading.Lock()
    killed_at: list[float] = []
    trigger = threading.Event()

    def on_done(future: Future) -> None:
        with lock:
            done_times.append(time.perf_counter())
            if kill is not None and len(done_times) == kill_after:
                trigger.set()

    def killer() -> None:
        trigger.wait()
        killed_at.append(time.perf_counter())
        kill.kill()

    killer_thread = threading.Thread(target=killer, daemon=True)
    if kill is not None:
        killer_thread.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as executor:
        futures = []
        for prompt in prompts:
            future = executor.submit(pool.generate, prompt, retry_ambiguous=True)
            future.add_done_callback(on_done)
            futures.append(future)
        results = [future.result() for future in futures]
    ended = time.perf_counter()
    after_kill = [t for t in done_times if killed_at and t > killed_at[0]]
    return {"started": started, "ended": ended, "results": results,
            "killed_at": killed_at[0] if killed_at else None, "answered_after_kill": len(after_kill)}


def steady(args: argparse.Namespace) -> bool:
    servers = start_servers(args.fakes)
    try:
        pool = make_pool(servers)
        prompts = [f"steady {i}" for i in range(args.requests)]
        outcome = run(pool, prompts, args.threads)
        wall = outcome["ended"] - outcome["started"]
        stats = [server.stats() for server in servers]
    finally:
        for server in servers:
            server.stop()
    capacity = sum(LIMITS) / GENERATION_SECONDS
    throughput = args.requests / wall
    ratio = throughput / capacity
    counts = collections.Counter(p for stat in stats for p in stat["answered"])
    once = counts == collections.Counter(prompts)
    print(f"steady: {args.requests} requests, {args.threads} threads, limits {LIMITS}, "
          f"{GENERATION_SECONDS * 1000:.0f} ms per generation")
    print(f"  wall {wall:.2f} s, throughput {throughput:.1f}/s = {ratio:.3f} x capacity {capacity:.0f}/s "
          f"(target >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})")
    shares_ok = True
    for stat, limit in zip(stats, LIMITS):
        answers = len(stat["answered"])
        share, expected = answers / args.requests, limit / sum(LIMITS)
        deviation = share / expected - 1
        shares_ok &= abs(deviation) <= 0.15
        print(f"  limit {limit}: {answers:3d} answers, share {share:.3f} vs capacity share "
              f"{expected:.3f} ({deviation:+.1%}); peak at the server {stat['peak']}")
    within = all(stat["peak"] <= limit for stat, limit in zip(stats, LIMITS))
    print(f"  shares within +-15 %: {'met' if shares_ok else 'NOT met'}; every request answered exactly once: "
          f"{'yes' if once else 'NO'}; never over a limit: {'yes' if within else 'NO'}")
    return ratio >= 0.9 and shares_ok and once and within


def killed(args: argparse.Namespace) -> bool:
    servers = start_servers(args.fakes)
    victim = servers[2]
    kill_after = args.requests // 3
    try:
        pool = make_pool(servers)
        prompts = [f"killed {i}" for i in range(args.requests)]
        outcome = run(pool, prompts, args.threads, kill=victim, kill_after=kill_after)
        stats = [server.stats() for server in servers]
    finally:
        for server in servers:
            server.stop()
    counts = collections.Counter(p for stat in stats for p in stat["answered"])
    all_once = counts == collections.Counter(prompts)
    twice = sum(1 for n in counts.values() if n > 1)
    after = outcome["ended"] - outcome["killed_at"]
    remaining = sum(LIMITS[:2]) / GENERATION_SECONDS
    throughput = outcome["answered_after_kill"] / after
    ratio = throughput / remaining
    lost = [r for r in outcome["results"] if not getattr(r, "text", None)]
    print(f"killed: the limit-4 server killed after {kill_after} answers")
    print(f"  answered {len(outcome['results']) - len(lost)}/{args.requests}, answered twice at the servers: {twice}, "
          f"every request answered exactly once: {'yes' if all_once else 'NO'}")
    print(f"  after the kill: {outcome['answered_after_kill']} answers in {after:.2f} s = {throughput:.1f}/s = "
          f"{ratio:.3f} x remaining capacity {remaining:.0f}/s (target >= 0.85: {'met' if ratio >= 0.85 else 'NOT met'})")
    print(f"  the killed server answered {len(stats[2]['answered'])} before it died; "
          f"{pool.statuses()[2].failed} requests failed there and went elsewhere")
    return all_once and not lost and ratio >= 0.85


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--fakes", action="store_true", help="use the test fakes, in this process")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the kill logs warnings by design
    ok = True
    for _ in range(args.runs):
        ok &= steady(args)
        ok &= killed(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
