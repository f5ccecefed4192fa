"""Benchmark --all-rows: how full the map prompts are, how many calls, how fast at a server's capacity.

    python bench/bench_map_reduce.py [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
                                     [--rows 20000] [--budget 4000] [--delay 0.1] [--slots 4]
                                     [--memory 20000 200000]

It creates a throwaway database with ``--rows`` review-like rows (Korean and English text, a
rating, a date), starts a loopback llama.cpp-like server that reports ``--slots`` slots and
answers every generation after ``--delay`` seconds, and runs the map-reduce engine over all
rows with a ``--budget``-token prompt budget. It prints:

* packing: the map calls against ceil(total tokens of the rows / budget) (target <= 1.1x), and
  each map prompt's fill of the budget by the real cl100k count (target >= 90 %, the last
  prompt aside); the same plan made with the estimate instead of the tokenizer, for comparison;
* speed: the wall time of the whole run (spool, plan, map, reduce) against calls / (slots /
  delay) per second (target <= 1.25x), and the server's peak concurrent generations;
* token counting: the estimate against the real count on the sample data, Korean and English
  text and random hashes, and the time to count 1 MB (from bench_token_count.py);
* with ``--memory SMALL LARGE``: the peak RSS of the real command (a separate process, measured
  by ``os.wait4`` in a small launcher) over SMALL and then LARGE rows, default prompt budget, an instant 8-slot server.

The speed is measured twice: the engine in this process through the servers' pool (the backend
the command builds), and the real command as a separate process from start to exit, interpreter
start and the database read included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT / "bench"))

import psycopg2  # noqa: E402
import psycopg2.extras  # noqa: E402

import bench_token_count  # noqa: E402
import config  # noqa: E402
import mr_cli  # noqa: E402
import resources  # noqa: E402
import token_count  # noqa: E402
from bench_pipeline import create_sample_database, drop_database  # noqa: E402
from fake_map_reduce_server import MapReduceOpenAIServer  # noqa: E402
from map_reduce import AllRowsOptions, run_all_rows  # noqa: E402
from runner import Question  # noqa: E402
from value_format import row_layout  # noqa: E402

QUERY = "SELECT * FROM bench_reviews ORDER BY id"
PRODUCTS = ["무선 이어폰", "스마트 워치", "노트북 거치대", "USB-C 충전기", "기계식 키보드", "Wireless Mouse",
            "4K Monitor", "Desk Lamp", "보조배터리 20000mAh", "Running Shoes"]
NAMES = ["김민준", "이서연", "박지호", "최수아", "정도윤", "Emma Wilson", "Liam Chen", "강하은", "윤지우", "Olivia Park"]


def review_rows(count: int, seed: int = 7) -> list[tuple]:
    """Review-like rows: Korean and English sentences of varying length, like real shop reviews."""
    rnd = random.Random(seed)
    sentences = bench_token_count.KOREAN + bench_token_count.ENGLISH
    rows = []
    for n in range(1, count + 1):
        body = " ".join(rnd.choice(sentences) for _ in range(rnd.randint(1, 4)))
        rows.append((n, rnd.choice(PRODUCTS), rnd.choice(NAMES), rnd.randint(1, 5), body,
                     f"2024-{rnd.randint(1, 12):02d}-{rnd.randint(1, 28):02d}"))
    return rows


def load_rows(url: str, count: int) -> None:
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE bench_reviews (id int PRIMARY KEY, product text, customer text, rating int, "
                    "body text, created date)")
        psycopg2.extras.execute_values(cur, "INSERT INTO bench_reviews VALUES %s", review_rows(count), page_size=2000)
    conn.close()


def rows_tokens(url: str, counter: token_count.TokenCounter) -> int:
    """Tokens of every row as the prompts write them (Markdown rows, one per line), header not included."""
    conn = psycopg2.connect(url)
    with conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(QUERY)
        rows = cur.fetchall()
    conn.close()
    layout = row_layout("markdown", list(rows[0].keys()))
    return counter.count("\n".join(layout.render(row, i, 500) for i, row in enumerate(rows)))


def packing(url: str, budget: int) -> None:
    counter = token_count.get_counter()
    counter.count("load the vocabulary before timing")
    settings = config.load_settings({"DATABASE_URL": url, "LOG_FILE": ""}, environ={})
    question = Question(QUERY, fetch_rows=None, prompt_tokens=budget)
    started = time.perf_counter()
    plan = run_all_rows(question, AllRowsOptions(checkpoint=False), settings, None, dry_run=True, counter=counter)
    plan_seconds = time.perf_counter() - started
    estimate_plan = run_all_rows(question, AllRowsOptions(checkpoint=False), settings, None, dry_run=True,
                                 counter=token_count.ESTIMATE)
    total = rows_tokens(url, counter)
    ideal = math.ceil(total / budget)
    calls = len(plan.map_calls)
    print(f"packing {plan.rows_total:,} rows, budget {budget:,} tokens, counted with {counter.name}")
    print(f"  rows' tokens in all            {total:,} (ideal: ceil({total:,} / {budget:,}) = {ideal} calls)")
    print(f"  map calls                      {calls}   ratio to ideal x{calls / ideal:.3f} (target <= 1.1)")
    print(f"  map calls, packed by estimate  {len(estimate_plan.map_calls)}   "
          f"(x{len(estimate_plan.map_calls) / calls:.2f} the calls of the tokenizer's plan)")
    print(f"  planning time (read + pack)    {plan_seconds:.2f} s (a real run packs while the calls run), "
          f"reduce calls expected per level with full-length answers {plan.expected_levels}")


def speed(url: str, budget: int, delay: float, slots: int) -> None:
    """The engine in this process through the servers' pool, as the command builds it."""
    with MapReduceOpenAIServer(slots=slots, delay=delay) as server:
        settings = config.load_settings({"DATABASE_URL": url, "API_BASE_URL": server.base_url, "LOG_FILE": "",
                                         "API_TIMEOUT": 60}, environ={})
        backend = mr_cli.model_backend(settings)
        assert backend.capacity == slots
        question = Question(QUERY, fetch_rows=None, prompt_tokens=budget)
        started = time.perf_counter()
        run = run_all_rows(question, AllRowsOptions(checkpoint=False), settings, backend)
        wall = time.perf_counter() - started
        counter = token_count.get_counter()
        last_note = f"–{run.rows_total:,} of {run.rows_total:,}: one part of the data"
        maps = server.map_prompts()
        last = [counter.count(p) / budget for p in maps if last_note in p]
        fills = sorted(counter.count(p) / budget for p in maps if last_note not in p)
        peak = server.peak_generations
    resources.close_resources()
    calls = len(run.calls())
    rate = slots / delay
    floor = calls / rate
    print(f"map prompts' fill of the budget by the real count, all but the last: min {fills[0]:.1%} "
          f"(target >= 90 %), median {statistics.median(fills):.1%}, max {fills[-1]:.1%}; the last one "
          f"(the rows left over): {last[0]:.1%}")
    print(f"speed: {calls} calls ({len(run.map_calls)} map + {calls - len(run.map_calls)} reduce in "
          f"{len(run.levels)} level(s)), server of {slots} slots, {delay * 1000:.0f} ms per call")
    print(f"  engine in this process (server pool): wall time {wall:.2f} s, floor calls / {rate:.0f} per s = "
          f"{floor:.2f} s, ratio x{wall / floor:.3f} (target <= 1.25); peak concurrent generations {peak} "
          f"(limit {slots})")
    print(f"  answer: {run.answer!r}")


def command_env(url: str, server_url: str, cache: str) -> dict[str, str]:
    names = {var.name for var in config.VARIABLES} | {"ENV_FILE"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(DATABASE_URL=url, API_BASE_URL=server_url, LOG_FILE="", API_TIMEOUT="60", XDG_CACHE_HOME=cache)
    return env


# Runs the command in a fresh child of a small process and writes the child's peak RSS (KiB) to
# argv[1]. Linux counts the peak of the memory a process had before exec in its ru_maxrss, and a
# child started straight from this benchmark (hundreds of MB of rows and vocabulary) would report
# this process's size instead of its own.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_command(args: list[str], env: dict[str, str]) -> tuple[float, float, dict]:
    """(wall seconds, peak RSS in MB, the --json document) of the real command, run to its end."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as peak:
        started = time.perf_counter()
        code = subprocess.call([sys.executable, "-c", _LAUNCHER, peak.name, sys.executable,
                                str(REPO_ROOT / "db_to_model_pipeline.py"), *args, "--json", "-q",
                                "--env-file", os.devnull], env=env, stdout=out, stderr=err)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        if code != 0:
            raise SystemExit(f"the command exited {code}:\n{err.read().decode('utf-8', 'replace')}")
        return wall, int(peak.read()) / 1024, json.loads(out.read())


def whole_command(url: str, budget: int, delay: float, slots: int) -> None:
    """The real command as a separate process, from start to exit (interpreter start and the read included)."""
    with MapReduceOpenAIServer(slots=slots, delay=delay) as server, tempfile.TemporaryDirectory() as cache:
        wall, _, doc = run_command(["--query", QUERY, "--all-rows", "--prompt-budget", str(budget)],
                                   command_env(url, server.base_url, cache))
        peak = server.peak_generations
    calls = doc["stats"]["map_calls"] + doc["stats"]["reduce_calls"]
    floor = calls / (slots / delay)
    print(f"  whole command (python db_to_model_pipeline.py --all-rows ...): {calls} calls, wall time {wall:.2f} s, "
          f"ratio x{wall / floor:.3f} to the floor (target <= 1.25); peak concurrent generations {peak}")


def memory(admin_url: str, sizes: tuple[int, int]) -> None:
    """Peak RSS of the real command over ``sizes`` rows (default prompt budget, an instant 8-slot server)."""
    url = create_sample_database(admin_url)
    try:
        load_rows(url, max(sizes))
        peaks = []
        with MapReduceOpenAIServer(slots=8) as server, tempfile.TemporaryDirectory() as cache:
            for rows in sorted(sizes):
                query = f"SELECT * FROM bench_reviews WHERE id <= {rows} ORDER BY id"
                wall, rss, doc = run_command(["--query", query, "--all-rows", "--max-new-tokens", "60"],
                                             command_env(url, server.base_url, cache))
                assert doc["rows_total"] == rows and doc["answer"] == f"SUM 1-{rows}", doc["answer"]
                peaks.append(rss)
                print(f"  {rows:,} rows: {doc['stats']['map_calls']} map + {doc['stats']['reduce_calls']} reduce "
                      f"calls, {wall:.1f} s, peak RSS {rss:.1f} MB")
        print(f"  peak RSS {max(sizes):,} rows / {min(sizes):,} rows: x{peaks[-1] / peaks[0]:.2f} (flat memory)")
    finally:
        resources.close_resources()
        drop_database(admin_url, url)


def counting() -> None:
    counter = token_count.Cl100kCounter()
    assert counter.load(), counter.failure
    text = bench_token_count.megabyte()
    for name, count in (("cl100k_base (tiktoken)", counter.count), ("estimate", token_count.estimate_tokens)):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            count(text)
            times.append(time.perf_counter() - t0)
        print(f"  count 1 MB with {name}: {statistics.median(times) * 1000:.0f} ms")
    print(f"  {'estimate / real cl100k':<32} {'min':>6} {'mean':>6} {'max':>6}")
    cases = [("sample data rows (csv)", [
        bench_token_count.prompt_builder.format_db_results([row], "csv").split("\n", 1)[1]
        for rows in bench_token_count.sample_rows().values() for row in rows]),
        ("Korean review sentences", bench_token_count.KOREAN),
        ("English review sentences", bench_token_count.ENGLISH),
        ("random hex / base64", bench_token_count.hashes(200))]
    for label, texts in cases:
        low, mean, high, _ = bench_token_count.ratio(counter, texts)
        print(f"  {label:<32} {low:>6.2f} {mean:>6.2f} {high:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-url", default=os.environ.get("TEST_DATABASE_URL")
                        or "postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--budget", type=int, default=4000)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--memory", type=int, nargs=2, metavar=("SMALL", "LARGE"),
                        help="also measure the peak RSS of the real command over SMALL and LARGE rows "
                        "(e.g. --memory 20000 200000)")
    args = parser.parse_args()
    print(f"map-reduce benchmark — Python {sys.version.split()[0]}, {os.cpu_count()} cores")
    url = create_sample_database(args.admin_url)
    try:
        load_rows(url, args.rows)
        packing(url, args.budget)
        speed(url, args.budget, args.delay, args.slots)
        whole_command(url, args.budget, args.delay, args.slots)
    finally:
        resources.close_resources()
        drop_database(args.admin_url, url)
    print("token counting")
    counting()
    if args.memory:
        print("memory of the whole command")
        memory(args.admin_url, tuple(args.memory))


if __name__ == "__main__":
    main()
