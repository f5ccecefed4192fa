"""Shared by the --all-rows command tests: a 3,000-row table with a marker per row, an in-process runner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import psycopg2
import pytest
from conftest import REPO_ROOT, CliResult, run_cli

SCRIPT = str(REPO_ROOT / "db_to_model_pipeline.py")
ROWS = 3000
QUERY = "SELECT * FROM mr_reviews ORDER BY id"
# A small budget over 3,000 rows: about 30 map prompts.
SMALL = ("--prompt-budget", "1500", "--max-new-tokens", "30")



def create_mr_table(url: str) -> str:
    """3,000 review-like rows, each with a unique marker r000001 ... r003000."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            "DROP TABLE IF EXISTS mr_reviews; "
            "CREATE TABLE mr_reviews AS SELECT g AS id, 'r' || lpad(g::text, 6, '0') AS marker, 1 + g % 5 AS rating, "
            "CASE WHEN g % 2 = 0 THEN '배송이 빠르고 포장도 꼼꼼했어요' ELSE 'Smaller than expected; asked for an exchange' "
            f"END AS body FROM generate_series(1, {ROWS}) g"
        )
    conn.close()
    return "mr_reviews"


def cli_runner(test_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliResult]:
    """``runner(*args, env=...)``: the command in-process, settings in the environment, the cache in tmp_path."""

    def runner(*args: str, env: dict | None = None) -> CliResult:
        values = {"DATABASE_URL": test_db_url, "LOG_FILE": str(tmp_path / "client.log"), "API_CONNECT_TIMEOUT": "1",
                  "XDG_CACHE_HOME": str(tmp_path / "cache")}
        return run_cli(monkeypatch, args, {**values, **(env or {})})

    return runner


def answers_in(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("type") == "answer"]


def all_calls(doc: dict) -> list[dict]:
    return doc["plan"]["map"] + [c for level in doc["plan"]["reduce"] for c in level["calls"] if not c["carried"]]
