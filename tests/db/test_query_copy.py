"""`etl copy --query SQL --to-table T --key COLS`: a query's result, resumable on its key."""

from __future__ import annotations

import json

import etl
from etl.runner import StopFlag
from tests.conftest import execute, run_etl, scalar

QUERY = ("SELECT o.id AS order_id, c.name AS customer, o.total * 2 AS doubled, "
         "o.placed::date AS day FROM orders o JOIN customers c ON c.id = o.customer "
         "WHERE c.name LIKE 'c%'")


def _source(src: str) -> None:
    execute(src, """
        CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL);
        INSERT INTO customers SELECT g, CASE WHEN g % 4 = 0 THEN 'x' ELSE 'c' END || g
        FROM generate_series(1, 100) g;
        CREATE TABLE orders (id bigint PRIMARY KEY, customer int REFERENCES customers,
                             total numeric(12, 2), placed timestamptz);
        INSERT INTO orders SELECT g, 1 + g % 100, g * 0.25,
                                  timestamptz '2024-01-01 12:00+00' + g * interval '1 hour'
        FROM generate_series(1, 20000) g;
    """)


def _expected(src: str) -> int:
    return scalar(src, f"SELECT count(*) FROM ({QUERY}) q")


def test_query_result_copied_with_its_types_and_resumed(src: str, dst: str) -> None:
    _source(src)
    flag = StopFlag()
    seen = {"chunks": 0}

    class StopAfterTwo:
        def start(self, *a, **k): ...
        def advance(self, rows, nbytes):
            seen["chunks"] += 1
            if seen["chunks"] == 2:
                flag.set("test")
        def finish(self, *a, **k): ...

    partial = etl.copy(source=src, target=dst, query=QUERY, to_table="report.big_orders",
                       key="order_id", chunk_size=2_000, progress=StopAfterTwo(), stop=flag)
    assert partial.status is etl.Status.STOPPED and partial.succeeded == 4_000
    done = etl.copy(source=src, target=dst, query=QUERY, to_table="report.big_orders",
                    key="order_id", chunk_size=2_000)
    assert done.status is etl.Status.COMPLETED, done.message
    assert done.rows_this_run == _expected(src) - 4_000
    assert scalar(dst, "SELECT count(*) FROM report.big_orders") == _expected(src)
    types = dict(scalar(dst, """SELECT array_agg(ARRAY[attname::text, format_type(atttypid, atttypmod)])
                                FROM pg_attribute WHERE attrelid = 'report.big_orders'::regclass
                                AND attnum > 0"""))
    assert types == {"order_id": "bigint", "customer": "text", "doubled": "numeric",
                     "day": "date"}
    # the same rows, value by value
    got = scalar(dst, "SELECT md5(string_agg(t::text, ',' ORDER BY order_id)) "
                      "FROM report.big_orders t")
    want = scalar(src, f"SELECT md5(string_agg(t::text, ',' ORDER BY order_id)) FROM ({QUERY}) t")
    assert got == want


def test_query_usage_errors(src: str, dst: str) -> None:
    _source(src)
    base = ["copy", "--source", src, "--target", dst, "--no-progress"]
    cases = [
        (["--query", QUERY, "--key", "order_id"], "--to-table"),
        (["--query", QUERY, "--to-table", "t"], "--key"),
        (["--query", QUERY, "--table", "orders", "--to-table", "t", "--key", "order_id"],
         "either --table or --query"),
        (["--query", "SELECT nope FROM orders", "--to-table", "t", "--key", "nope"],
         "does not run on the source"),
        (["--query", "SELECT id, id FROM orders", "--to-table", "t", "--key", "id"],
         "more than one column named id"),
    ]
    for extra, message in cases:
        proc = run_etl(*base, *extra)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_query_upsert_rerun_and_dry_run(src: str, dst: str) -> None:
    _source(src)
    args = ["copy", "--source", src, "--target", dst, "--query", QUERY, "--to-table", "bo",
            "--key", "order_id", "--mode", "upsert", "--no-progress", "--json"]
    dry = run_etl(*args[:-1], "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "query SELECT o.id" in dry.stdout and scalar(dst, "SELECT to_regclass('bo')") is None
    first = run_etl(*args)
    assert first.returncode == 0, first.stderr
    execute(dst, "UPDATE bo SET doubled = 0 WHERE order_id <= 10")
    again = run_etl(*args, "--restart")
    assert again.returncode == 0, again.stderr
    outcomes = json.loads(again.stdout)["metadata"]["outcomes"]
    changed = scalar(src, f"SELECT count(*) FROM ({QUERY}) q WHERE order_id <= 10")
    assert outcomes["updated"] == changed and outcomes["inserted"] == 0
    assert outcomes["unchanged"] == _expected(src) - changed
