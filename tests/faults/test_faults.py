"""kill -9 of a Python script that calls the library (the CLI's faults are in test_copy_faults.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psycopg
import pytest

from tests.conftest import etl_cmd, execute, fingerprint, run_etl, scalar

pytestmark = pytest.mark.timeout(180)

ROWS = 30_000
SLOW = ["--chunk-size", "500", "--sleep", "0.02", "--no-progress"]
SLOWER = ["--chunk-size", "500", "--sleep", "0.1", "--no-progress"]  # ≥ 6 s for the whole table


def _source(url: str, rows: int = ROWS) -> None:
    execute(url, f"""
        CREATE TABLE ev (id bigint PRIMARY KEY, account int NOT NULL, body text,
                         amount numeric(12, 2), at timestamptz, tags text[], doc jsonb);
        INSERT INTO ev SELECT g, g % 97, repeat('x', g % 50) || E'\\t' || g, g / 7.0,
               '2024-01-01'::timestamptz + g * interval '1 min', ARRAY['a', g::text],
               jsonb_build_object('g', g)
        FROM generate_series(1, {rows}) g;
    """)


def _copy_args(src: str, dst: str, *extra: str) -> list[str]:
    return ["copy", "--source", src, "--target", dst, "--table", "ev", *extra]


def _start(src: str, dst: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(etl_cmd(*_copy_args(src, dst, *extra)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _committed(dst: str) -> int:
    try:
        return scalar(dst, "SELECT coalesce(max(processed), 0) FROM etl.checkpoints") or 0
    except psycopg.errors.UndefinedTable:
        return 0


def _wait_for_rows(dst: str, at_least: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _committed(dst) >= at_least:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"no {at_least} committed rows within {timeout}s")


def _finish(src: str, dst: str) -> dict:
    proc = run_etl(*_copy_args(src, dst, "--json", "--no-progress"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _assert_exact(src: str, dst: str, doc: dict) -> None:
    rows, checksum, distinct = fingerprint(dst, "ev")
    assert (rows, checksum, distinct) == fingerprint(src, "ev")
    assert distinct == rows  # no duplicates
    s = doc["summary"]
    assert s["succeeded"] + s["failed"] + s["skipped"] == s["total_items"] == rows


def test_kill_9_of_a_library_caller_leaves_both_or_neither(src: str, dst: str) -> None:
    """The same guarantee through `etl.copy(...)` in a script, killed mid-run."""
    _source(src)
    script = (f"import etl; etl.copy(source={src!r}, target={dst!r}, table='ev', "
              "chunk_size=700, sleep=0.02)")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ})
    _wait_for_rows(dst, 3000, proc)  # type: ignore[arg-type]
    proc.kill()
    proc.wait(10)
    assert scalar(dst, "SELECT count(*) FROM ev") == _committed(dst)
    _assert_exact(src, dst, _finish(src, dst))
