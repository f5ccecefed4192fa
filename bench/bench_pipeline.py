"""Benchmark: the pipeline's own overhead against a model server that answers instantly.

    python bench/bench_pipeline.py [--admin-url postgresql://postgres@127.0.0.1:5432/postgres] [--runs 30]

It creates a throwaway database with the sample data, starts a loopback PC
server (tests/fake_pc_server.py) that answers at once, and prints medians of:
  request alone   the same POST /api/generate made with a bare requests.Session
  in-process      run_pipeline() over 100 sample rows (query + prompt + request)
  whole process   python db_to_model_pipeline.py --query ... (interpreter start included)
  python startup  python -c pass, and the import of the three runtime packages, for reference
Targets: in-process < 10 ms beyond the request, whole process < 150 ms.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))

import psycopg2  # noqa: E402
import requests  # noqa: E402

import config  # noqa: E402
from db_to_model_pipeline import run_pipeline  # noqa: E402
from fake_pc_server import FakePCServer  # noqa: E402

QUERY = "SELECT * FROM orders ORDER BY id LIMIT 100"


def create_sample_database(admin_url: str) -> str:
    name = f"pipeline_bench_{secrets.token_hex(4)}"
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}" ENCODING \'UTF8\' TEMPLATE template0')
    admin.close()
    url = urlunsplit(urlsplit(admin_url)._replace(path="/" + name))
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        for script in sorted((REPO_ROOT / "db" / "init").glob("*.sql")):
            cur.execute(script.read_text(encoding="utf-8"))
    conn.close()
    return url


def drop_database(admin_url: str, url: str) -> None:
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path[1:]}" WITH (FORCE)')
    admin.close()


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-url", default=os.environ.get("TEST_DATABASE_URL")
                        or "postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()

    db_url = create_sample_database(args.admin_url)
    try:
        with FakePCServer(generation_time=0.001) as server:
            settings = config.load_settings(
                {"DATABASE_URL": db_url, "API_BASE_URL": server.base_url, "API_PROTOCOL": "pc", "LOG_FILE": ""},
                environ={},
            )
            _, stats, _ = run_pipeline(QUERY, settings=settings)
            prompt_text = server.requests[-1].json["prompt"]
            session = requests.Session()
            session.trust_env = False
            payload = {"prompt": prompt_text, "max_new_tokens": 512, "temperature": 0.7}

            def request_alone() -> None:
                session.post(f"{server.base_url}/api/generate", json=payload, timeout=(5, 300)).json()

            request_ms = median_ms(request_alone, args.runs)
            in_process_ms = median_ms(lambda: run_pipeline(QUERY, settings=settings), args.runs)

            env = {k: v for k, v in os.environ.items() if k not in {v.name for v in config.VARIABLES}}
            env.update(DATABASE_URL=db_url, API_BASE_URL=server.base_url, API_PROTOCOL="pc", LOG_FILE="")
            # As on a user's laptop: Python caches compiled modules (some sandboxes turn that off).
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            command = [sys.executable, str(REPO_ROOT / "db_to_model_pipeline.py"), "--query", QUERY,
                       "--no-stream", "--quiet"]

            def whole_process() -> None:
                subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True)

            process_ms = median_ms(whole_process, max(5, args.runs // 3))
            startup_ms = median_ms(lambda: subprocess.run([sys.executable, "-c", "pass"], env=env, check=True),
                                   max(5, args.runs // 3))
            packages_ms = median_ms(
                lambda: subprocess.run([sys.executable, "-c", "import requests, psycopg2, dotenv"], env=env,
                                       check=True),
                max(5, args.runs // 3))
    finally:
        drop_database(args.admin_url, db_url)

    overhead = in_process_ms - request_ms
    print(f"pipeline overhead, {stats['rows_shown']} rows ({stats['prompt_chars']:,}-char prompt), "
          f"instant loopback PC server, median of {args.runs} runs")
    print(f"  request alone (bare requests.Session)   {request_ms:8.2f} ms")
    print(f"  run_pipeline() in-process               {in_process_ms:8.2f} ms   "
          f"overhead beyond the request {overhead:6.2f} ms (target < 10)   ratio x{in_process_ms / request_ms:.1f}")
    print(f"  whole process (python script ...)       {process_ms:8.2f} ms   (target < 150)")
    print(f"  python -c pass (interpreter start)      {startup_ms:8.2f} ms")
    print(f"  python -c 'import requests, psycopg2, dotenv'  {packages_ms:5.2f} ms   "
          f"(the runtime packages' import floor)")
    print(f"  our share beyond that floor             {process_ms - packages_ms:8.2f} ms   "
          f"(our modules, DB connect, query, prompt, request)")
    print(f"targets: in-process {'met' if overhead < 10 else 'NOT met'}, "
          f"whole process {'met' if process_ms < 150 else 'NOT met'}")


if __name__ == "__main__":
    main()
