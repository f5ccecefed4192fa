"""row_spool.py: rows read once into a temporary file; no transaction stays open while they are used."""

from __future__ import annotations

import decimal
import tracemalloc

import psycopg2
import pytest

from errors import ReadOnlyViolation
from row_spool import RowSpool, row_fingerprint


def backend_states(admin_conn, dbname: str) -> list[str]:
    with admin_conn.cursor() as cur:
        cur.execute("SELECT state FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (dbname,))
        return [state for (state,) in cur.fetchall()]


def test_rows_come_back_with_their_types_and_no_transaction_stays_open(db, admin_conn):
    query = ("SELECT id, name, price, tags, attributes, sku FROM products ORDER BY id")
    with RowSpool.read(db, query) as spool:
        assert spool.columns == ["id", "name", "price", "tags", "attributes", "sku"]
        rows = list(spool)
        assert rows == db.execute_query(query)  # identical values, types included
        assert isinstance(rows[0]["price"], decimal.Decimal)
        assert list(spool) == rows  # iterable again
        dbname = admin_conn.info.dbname
        assert "idle in transaction" not in backend_states(admin_conn, dbname)


def test_bytea_ranges_dates_and_nulls_survive_the_spool(db):
    query = ("SELECT '\\xdeadbeef'::bytea AS raw, int4range(1, 5) AS r, NULL::text AS nothing, "
             "'infinity'::date AS forever, interval '1 day 2 hours' AS span")
    with RowSpool.read(db, query) as spool:
        (row,) = list(spool)
    assert row["raw"] == b"\xde\xad\xbe\xef"
    assert (row["r"].lower, row["r"].upper) == (1, 5)
    assert row["nothing"] is None and row["forever"] == "infinity"
    assert row["span"].total_seconds() == 26 * 3600


def test_memory_stays_flat_over_many_rows(db):
    tracemalloc.start()
    try:
        with RowSpool.read(db, "SELECT g AS id, md5(g::text) AS h FROM generate_series(1, 50000) g") as spool:
            total = sum(1 for _ in spool)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 50_000 and spool.count == 50_000
    assert peak < 4 * 1024 * 1024  # 50,000 row dicts in a list take over 15 MB


def test_a_row_cap_says_when_rows_were_left_out(db):
    with RowSpool.read(db, "SELECT g FROM generate_series(1, 50) g", max_rows=50) as exact:
        assert exact.count == 50 and not exact.has_more
    with RowSpool.read(db, "SELECT g FROM generate_series(1, 51) g", max_rows=50) as capped:
        assert capped.count == 50 and capped.has_more


def test_a_refused_query_leaves_no_file(db, tmp_path):
    with pytest.raises(ReadOnlyViolation):
        RowSpool.read(db, "DELETE FROM customers", directory=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_closed_spool_cannot_be_read(db):
    spool = RowSpool.read(db, "SELECT 1 AS one")
    spool.close()
    with pytest.raises(ValueError):
        list(spool)
    spool.close()  # twice is fine


def test_row_fingerprint_is_stable_and_tells_rows_apart():
    assert row_fingerprint((1, "a", None)) == row_fingerprint((1, "a", None))
    assert row_fingerprint((1, "a", None)) != row_fingerprint((1, "a", ""))
    assert row_fingerprint((memoryview(b"xy"),)) == row_fingerprint((b"xy",))  # not the object's address
