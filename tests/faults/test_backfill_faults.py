"""`etl backfill` killed with SIGKILL at random moments, then resumed: every row updated
exactly once (the UPDATE and the checkpoint commit together), with a real PostgreSQL."""

from __future__ import annotations

import json
import os
import random
import signal
import time

import psycopg
import pytest

from tests.conftest import execute, run_etl, scalar

pytestmark = pytest.mark.timeout(240)

ROWS = 500_000


def test_kill_9_at_random_points_then_resume_updates_every_row_once(dst: str, spawn) -> None:
    seed = int(os.environ.get("ETL_FAULT_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    execute(dst, f"CREATE TABLE ev (id bigint PRIMARY KEY, n bigint NOT NULL); "
                 f"INSERT INTO ev SELECT g, g FROM generate_series(1, {ROWS}) g")
    args = ("backfill", "--target", dst, "--table", "ev", "--set", "n = n + 1",
            "--chunk-size", "20000", "--sleep", "0.05", "--no-progress")
    kills = 0
    for _ in range(2):
        before = _done(dst)
        proc = spawn(*args)
        deadline = time.monotonic() + 60
        while _done(dst) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere inside a later chunk (or between two)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            kills += 1
    assert kills >= 1, "the backfill finished before it could be killed"
    done = _done(dst)
    assert 0 < done < ROWS
    # the committed chunks are exactly the rows already updated
    assert scalar(dst, "SELECT count(*) FROM ev WHERE n = id + 1") == done
    final = run_etl(*args[:5], "--set", "n = n + 1", "--chunk-size", "50000", "--json",
                    "--no-progress")
    assert final.returncode == 0, final.stderr
    doc = json.loads(final.stdout)
    assert doc["summary"]["succeeded"] == doc["summary"]["total_items"] == ROWS
    assert scalar(dst, "SELECT count(*) FROM ev WHERE n <> id + 1") == 0
    assert scalar(dst, "SELECT count(*) FROM ev") == ROWS


def _done(url: str) -> int:
    try:
        return scalar(url, "SELECT coalesce(max(processed), 0) FROM etl.checkpoints") or 0
    except psycopg.errors.UndefinedTable:  # the state store is created by the first run
        return 0
