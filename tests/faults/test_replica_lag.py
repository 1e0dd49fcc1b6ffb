"""--replica URL --max-lag: chunks wait while a real streaming replica lags.

The test owns an embedded primary and a standby made from it with pg_basebackup; the
standby's replay is paused (pg_wal_replay_pause) while the job runs, so its lag grows
for real, and resumed later."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.conftest import db_url, execute, run_etl, scalar

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def primary_and_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """URLs of the ``app`` database on an embedded primary and on its streaming replica."""
    from etl import embedded

    p_home = tmp_path_factory.mktemp("primary")
    r_home = tmp_path_factory.mktemp("replica")
    primary = embedded.start(p_home)
    execute(primary, "CREATE DATABASE app")
    owner = embedded._owner()
    if owner is not None:  # the server runs as its own user: it must own the standby's home
        _, utils = embedded._bin()
        utils.ensure_prefix_permissions(r_home)
        os.chown(r_home, *owner)
    data = Path(r_home) / "pg"
    made = embedded._run("pg_basebackup", ["-D", str(data), "-R", "-X", "stream", "-c", "fast",
                                           "-h", "127.0.0.1", "-p", str(urlsplit(primary).port),
                                           "-U", "postgres"], timeout=120)
    assert made.returncode == 0, made.stderr
    embedded._write_conf(data, embedded._free_port())  # its own port
    replica = embedded.start(r_home)
    try:
        yield db_url(primary, "app"), db_url(replica, "app")
    finally:
        embedded.stop(r_home)
        embedded.stop(p_home)


def _replayed(replica: str, query: str, expected: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if scalar(replica, query) == expected:
                return
        except psycopg.Error:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the replica did not replay {query!r} = {expected!r} in {timeout}s")


def test_backfill_waits_while_the_replica_lags_then_finishes(
        primary_and_replica: tuple[str, str], spawn) -> None:
    primary, replica = primary_and_replica
    execute(primary, "DROP TABLE IF EXISTS ev; CREATE TABLE ev (id int PRIMARY KEY, n int); "
                     "INSERT INTO ev SELECT g, g FROM generate_series(1, 20000) g")
    _replayed(replica, "SELECT count(*) FROM ev", 20000)
    execute(replica, "SELECT pg_wal_replay_pause()")
    # the lag counts from the last replayed commit: make it older than --max-lag, or a job
    # that starts and runs fast could finish before the lag it causes exceeds it
    time.sleep(1.0)
    try:
        proc = spawn("backfill", "--target", primary, "--table", "ev", "--set", "n = n + 1",
                     "--replica", replica, "--max-lag", "0.5s", "--chunk-size", "2000",
                     "--json", "--no-progress")
        time.sleep(3)  # the job's first writes (its state store, a chunk or a few) are not
        assert proc.poll() is None, proc.communicate()  # replayed, so the lag grows
        held = scalar(primary, "SELECT count(*) FROM ev WHERE n = id + 1")
        # chunks of 2,000 may go until the standby has received some of the job's WAL (its
        # lag is 0 until then); then the job holds until replay resumes
        assert held < 20000, held
        time.sleep(1)
        assert scalar(primary, "SELECT count(*) FROM ev WHERE n = id + 1") == held
    finally:
        execute(replica, "SELECT pg_wal_replay_resume()")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert scalar(primary, "SELECT count(*) FROM ev WHERE n <> id + 1") == 0
    assert doc["metadata"]["replica_waits"] >= 1
    assert doc["metadata"]["replica_wait_seconds"] >= 2
    assert "lags" in err and "--max-lag 0.5s" in err


def test_replica_that_is_not_a_standby_is_refused(primary_and_replica: tuple[str, str]) -> None:
    primary, _ = primary_and_replica
    execute(primary, "DROP TABLE IF EXISTS ev2; CREATE TABLE ev2 (id int PRIMARY KEY, n int)")
    proc = run_etl("backfill", "--target", primary, "--table", "ev2", "--set", "n = 1",
                   "--replica", primary)
    assert proc.returncode == 2, proc.stderr
    assert "is not a replica" in proc.stderr


def test_archive_waits_while_the_replica_lags_then_finishes(
        primary_and_replica: tuple[str, str], spawn) -> None:
    primary, replica = primary_and_replica
    execute(primary, "DROP TABLE IF EXISTS old; DROP TABLE IF EXISTS old_archive; "
                     "CREATE TABLE old (id int PRIMARY KEY, n int); "
                     "INSERT INTO old SELECT g, g FROM generate_series(1, 20000) g")
    _replayed(replica, "SELECT count(*) FROM old", 20000)
    execute(replica, "SELECT pg_wal_replay_pause()")
    # the lag counts from the last replayed commit: make it older than --max-lag, or a job
    # that starts and runs fast could finish before the lag it causes exceeds it
    time.sleep(1.0)
    try:
        proc = spawn("archive", "--source", primary, "--table", "old", "--where", "n <= 15000",
                     "--to-table", "old_archive", "--replica", replica, "--max-lag", "0.5s",
                     "--chunk-size", "2000", "--json", "--no-progress")
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()
        left = scalar(primary, "SELECT count(*) FROM old")
        time.sleep(1)
        assert scalar(primary, "SELECT count(*) FROM old") == left > 5000  # held, not done
    finally:
        execute(replica, "SELECT pg_wal_replay_resume()")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert scalar(primary, "SELECT count(*) FROM old") == 5000
    assert scalar(primary, "SELECT count(*) FROM old_archive") == 15000
    assert doc["metadata"]["replica_waits"] >= 1
