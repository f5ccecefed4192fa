"""Benchmark: execute_query with a row cap over a huge result vs a naive full fetch.

    python bench/bench_db.py [--url postgresql://postgres@127.0.0.1:5432/postgres] [--runs 5]

Each case runs in its own child process, so its peak memory (ru_maxrss, which
includes libpq's C allocations that tracemalloc cannot see) is its own.
Cases:
  capped  execute_query("SELECT generate_series(1, 20000000) AS n", max_rows=1000)
  naive   a plain psycopg2 cursor, execute + fetchall over 1,000,000 rows
          (a smaller result: fetching all 20 million rows would need gigabytes)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CAPPED_SQL = "SELECT generate_series(1, 20000000) AS n"
NAIVE_SQL = "SELECT generate_series(1, 1000000) AS n"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(case: str, url: str) -> None:
    """Run one case once and print {seconds, rows, peak_mb, baseline_mb} as JSON."""
    sys.path.insert(0, str(REPO_ROOT))
    import psycopg2

    import config
    import db_connector

    if case == "capped":
        database = db_connector.Database(config.load_settings({"DATABASE_URL": url}, environ={}))
        database.execute_query("SELECT 1")  # connect outside the timing
        baseline = _rss_mb()
        started = time.perf_counter()
        rows = database.execute_query(CAPPED_SQL, max_rows=1000)
        seconds = time.perf_counter() - started
        count = len(rows)
        database.close()
    else:
        conn = psycopg2.connect(url)
        baseline = _rss_mb()
        started = time.perf_counter()
        with conn.cursor() as cur:
            cur.execute(NAIVE_SQL)
            count = len(cur.fetchall())
        seconds = time.perf_counter() - started
        conn.close()
    print(json.dumps({"seconds": seconds, "rows": count, "peak_mb": _rss_mb(), "baseline_mb": baseline}))


def run_case(case: str, url: str, runs: int) -> dict[str, float]:
    results = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, __file__, "--child", case, "--url", url],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout))
    return {
        "seconds": statistics.median(r["seconds"] for r in results),
        "rows": results[0]["rows"],
        "peak_mb": max(r["peak_mb"] for r in results),
        "added_mb": max(r["peak_mb"] - r["baseline_mb"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("TEST_DATABASE_URL")
                        or "postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.url)
        return
    capped = run_case("capped", args.url, args.runs)
    naive = run_case("naive", args.url, args.runs)
    print(f"median of {args.runs} runs, each in a fresh process")
    print(f"{'case':<52} {'rows':>9} {'seconds':>9} {'peak MB':>9} {'added MB':>9}")
    print(f"{'capped: 20,000,000-row result, max_rows=1000':<52} {capped['rows']:>9,} {capped['seconds']:>9.3f} "
          f"{capped['peak_mb']:>9.1f} {capped['added_mb']:>9.1f}")
    print(f"{'naive: fetchall of a 1,000,000-row result':<52} {naive['rows']:>9,} {naive['seconds']:>9.3f} "
          f"{naive['peak_mb']:>9.1f} {naive['added_mb']:>9.1f}")
    print(f"ratio naive/capped: time x{naive['seconds'] / capped['seconds']:.0f}, "
          f"peak memory x{naive['peak_mb'] / capped['peak_mb']:.1f} "
          f"(the naive case reads 20x fewer rows than the capped query could return)")
    target_ok = capped["seconds"] < 1 and capped["peak_mb"] < 100
    print(f"target (capped < 1 s and < 100 MB peak): {'met' if target_ok else 'NOT met'}")


if __name__ == "__main__":
    main()
