"""Benchmark: the cost of the parser guard, of one guarded query, and of counting rows without reading them.

    python bench/bench_sql_guard.py [--url postgresql://postgres@127.0.0.1:5432/postgres] [--runs 200]

Prints medians:
  import   `from pglast import parser` in a fresh interpreter (ms)
  check    sql_guard.check_statement on a 3-line query with a join, a WHERE and comments (µs)
  bound    check on the text after binding two parameters (what execute_query does with params) (µs)
  query    Database.execute_query("SELECT 1") round trip, pooled connection (ms), beside a bare
           psycopg2 SELECT 1 on an autocommit connection (ms)
  count    stream_rows over 1,000,000 rows: read 10, count_remaining() (ms), beside reading all (ms)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

QUERY = """-- orders per city
SELECT c.city, count(*) AS orders, sum(o.total) AS revenue  /* money */
FROM customers AS c JOIN orders AS o ON o.customer_id = c.id
WHERE o.status <> 'cancelled' AND c.city = %(city)s GROUP BY c.city ORDER BY revenue DESC"""


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def import_ms(runs: int = 15) -> float:
    code = "import time; t = time.perf_counter(); from pglast import parser; print(time.perf_counter() - t)"
    return statistics.median(
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout) * 1000
        for _ in range(runs)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("TEST_DATABASE_URL")
                        or "postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()

    import psycopg2

    import config
    import sql_guard
    from db_connector import Database

    print(f"import  {import_ms():8.1f} ms   from pglast import parser")
    check = median_ms(lambda: sql_guard.check_statement(QUERY, placeholders=True), args.runs * 10)
    bound_text = QUERY.replace("%(city)s", "'서울'")
    bound = median_ms(lambda: sql_guard.check_statement(bound_text, placeholders=False), args.runs * 10)
    print(f"check   {check * 1000:8.1f} µs   check_statement, placeholders as values")
    print(f"bound   {bound * 1000:8.1f} µs   check_statement on the bound text")

    database = Database(config.load_settings({"DATABASE_URL": args.url}, environ={}))
    database.execute_query("SELECT 1")  # connect outside the timing
    ours = median_ms(lambda: database.execute_query("SELECT 1"), args.runs)
    conn = psycopg2.connect(args.url)
    conn.autocommit = True

    def bare() -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.fetchall()

    bare_ms = median_ms(bare, args.runs)
    print(f"query   {ours:8.2f} ms   execute_query('SELECT 1')   (bare psycopg2: {bare_ms:.2f} ms)")

    def count() -> None:
        with database.stream_rows("SELECT generate_series(1, 1000000) AS n") as rows:
            iterator = iter(rows)
            for _ in range(10):
                next(iterator)
            rows.count_remaining()

    def read_all() -> None:
        with database.stream_rows("SELECT generate_series(1, 1000000) AS n") as rows:
            for _ in rows:
                pass

    runs = max(3, args.runs // 40)
    print(f"count   {median_ms(count, runs):8.1f} ms   read 10 of 1,000,000 rows, count_remaining()   "
          f"(reading all: {median_ms(read_all, runs):.1f} ms)")
    conn.close()
    database.close()


if __name__ == "__main__":
    main()
