"""Failure paths, caused for real: kill -9, SIGTERM, SIGINT, a dropped connection, a held lock.

Every test ends by comparing the target with the source (row count, an
order-independent checksum of every row, distinct rows) and the report's counts.
"""

from __future__ import annotations

import json
import os
import random
import signal
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


def test_kill_9_at_random_points_then_resume(src: str, dst: str) -> None:
    seed = random.randrange(1_000_000)
    print(f"random seed {seed}")
    rng = random.Random(seed)
    _source(src)
    for _ in range(4):
        proc = _start(src, dst, *SLOWER)
        _wait_for_rows(dst, _committed(dst) + 1, proc)
        time.sleep(rng.uniform(0.0, 0.6))  # somewhere inside a chunk, or between chunks
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
    partial = scalar(dst, "SELECT count(*) FROM ev")
    assert 0 < partial < ROWS
    assert partial == _committed(dst)  # rows and checkpoint committed together
    doc = _finish(src, dst)
    _assert_exact(src, dst, doc)
    assert doc["metadata"]["rows_this_run"] == ROWS - partial
    # runs left open by killed processes were closed by the next run
    statuses = [r[0] for r in psycopg.connect(dst, autocommit=True).execute(
        "SELECT status FROM etl.runs ORDER BY started_at")]
    assert statuses == ["failed"] * 4 + ["completed"]


def test_sigterm_stops_at_a_chunk_boundary_with_exit_4(src: str, dst: str) -> None:
    _source(src)
    proc = _start(src, dst, *SLOW, "--json")
    _wait_for_rows(dst, 2000, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 4, err
    doc = json.loads(out)
    assert doc["status"] == "stopped" and "SIGTERM" in err
    assert doc["summary"]["succeeded"] == scalar(dst, "SELECT count(*) FROM ev") == _committed(dst)
    assert "Traceback" not in err
    _assert_exact(src, dst, _finish(src, dst))


def test_sigint_behaves_like_sigterm(src: str, dst: str) -> None:
    _source(src)
    proc = _start(src, dst, *SLOW)
    _wait_for_rows(dst, 1000, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 4, err
    assert "Traceback" not in err
    _assert_exact(src, dst, _finish(src, dst))


def test_max_runtime_exits_4_and_the_next_run_finishes(src: str, dst: str) -> None:
    _source(src)
    proc = run_etl(*_copy_args(src, dst, *SLOW, "--max-runtime", "1s", "--json"))
    assert proc.returncode == 4, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["status"] == "stopped" and 0 < doc["summary"]["succeeded"] < ROWS
    _assert_exact(src, dst, _finish(src, dst))


def test_second_run_of_the_same_job_exits_75_naming_the_holder(src: str, dst: str) -> None:
    _source(src)
    first = _start(src, dst, *SLOW)
    _wait_for_rows(dst, 500, first)
    t0 = time.monotonic()
    second = run_etl(*_copy_args(src, dst, "--no-progress"))
    assert time.monotonic() - t0 < 5
    assert second.returncode == 75, second.stderr
    assert f"pid {first.pid}" in second.stderr and "already running" in second.stderr
    assert "Traceback" not in second.stderr
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=30)
    _assert_exact(src, dst, _finish(src, dst))


def test_dropped_target_connection_fails_cleanly_and_resumes(src: str, dst: str, pg_server: str) -> None:
    _source(src)
    proc = _start(src, dst, *SLOW)
    _wait_for_rows(dst, 1000, proc)
    with psycopg.connect(pg_server, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name LIKE %s", (f"etl:target:%:{proc.pid}",)).fetchone()
    assert killed and killed[0] == 1
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("etl: error:")]) == 1
    _assert_exact(src, dst, _finish(src, dst))


def test_restart_in_append_mode_onto_a_keyed_target_fails_without_half_writes(src: str, dst: str) -> None:
    _source(src)
    run_etl(*_copy_args(src, dst, *SLOW, "--max-runtime", "0.5s"))
    before = scalar(dst, "SELECT count(*) FROM ev")
    assert before > 0
    proc = run_etl(*_copy_args(src, dst, "--restart", "--no-progress"))
    assert proc.returncode == 1
    assert "UniqueViolation" in proc.stderr or "duplicate key" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert scalar(dst, "SELECT count(*) FROM ev") == before
    # --restart with --mode replace starts over and ends exact
    ok = run_etl(*_copy_args(src, dst, "--restart", "--mode", "replace", "--json", "--no-progress"))
    assert ok.returncode == 0, ok.stderr
    _assert_exact(src, dst, json.loads(ok.stdout))


def test_two_processes_on_a_fresh_state_store_both_succeed(src: str, dst: str) -> None:
    _source(src, 2000)
    execute(src, "CREATE TABLE other AS SELECT * FROM ev; ALTER TABLE other ADD PRIMARY KEY (id)")
    procs = [subprocess.Popen(etl_cmd("copy", "--source", src, "--target", dst, "--table", table,
                                      "--no-progress"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for table in ("ev", "other")]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    versions = psycopg.connect(dst, autocommit=True).execute(
        "SELECT version, count(*) FROM etl.schema_version GROUP BY version").fetchall()
    assert versions and all(n == 1 for _, n in versions)
    assert fingerprint(dst, "ev") == fingerprint(src, "ev")
    assert fingerprint(dst, "other") == fingerprint(src, "other")


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
