"""Transient failures are retried, caused for real: a killed connection, a held lock, a
deadlock, a server restart. Every test ends with an exact copy."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import (
    db_url,
    etl_cmd,
    execute,
    fingerprint,
    release_once_waited_for,
    run_etl,
    scalar,
)

pytestmark = pytest.mark.timeout(180)

ROWS = 20_000


def _source(url: str, rows: int = ROWS) -> None:
    execute(url, f"CREATE TABLE ev (id bigint PRIMARY KEY, body text, n numeric(10,2)); "
                 f"INSERT INTO ev SELECT g, md5(g::text), g / 3.0 FROM generate_series(1, {rows}) g")


def _start(src: str, dst: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(etl_cmd("copy", "--source", src, "--target", dst, "--table", "ev",
                                    "--json", "--no-progress", *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _sessions(admin: psycopg.Connection, pid: int, role: str) -> list[tuple[int, str | None, str | None]]:
    return admin.execute(
        "SELECT pid, state, wait_event_type FROM pg_stat_activity WHERE application_name LIKE %s",
        (f"etl:{role}:{pid}:%",)).fetchall()


def _wait(what: str, cond, proc: subprocess.Popen[str] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"etl ended before {what}: {proc.communicate()}")
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _done(dst: str) -> int:
    try:
        return scalar(dst, "SELECT coalesce(max(processed), 0) FROM etl.checkpoints") or 0
    except psycopg.errors.UndefinedTable:
        return 0


def _exact(src: str, dst: str, report: dict) -> None:
    rows, checksum, distinct = fingerprint(dst, "ev")
    assert (rows, checksum, distinct) == fingerprint(src, "ev") and distinct == rows
    s = report["summary"]
    assert s["succeeded"] + s["failed"] + s["skipped"] == s["total_items"] == rows


@pytest.mark.parametrize("role", ["target", "source", "state"])
def test_killed_connection_mid_run_reconnects_and_finishes(src: str, dst: str, pg_server: str,
                                                           role: str) -> None:
    _source(src)
    proc = _start(src, dst, "--chunk-size", "500", "--sleep", "0.03")
    with psycopg.connect(pg_server, autocommit=True) as admin:
        _wait("committed rows", lambda: _done(dst) >= 2000, proc)
        if role == "target":  # in the middle of a chunk's transaction when we can catch it
            _wait("a chunk in flight", lambda: any(
                state == "active" or state == "idle in transaction"
                for _, state, _ in _sessions(admin, proc.pid, "target")), proc)
        victims = [pid for pid, _, _ in _sessions(admin, proc.pid, role)]
        assert len(victims) == 1
        admin.execute("SELECT pg_terminate_backend(%s)", (victims[0],))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    report = json.loads(out)
    _exact(src, dst, report)
    if role != "state":  # the state session is only noticed when next used
        assert report["metadata"]["retry_attempts"] >= 1
        assert "retry 1 of 4" in err and "transient" in err


def test_killed_target_while_writing_in_pieces_finishes_exactly(src: str, dst: str,
                                                                 pg_server: str) -> None:
    """After the first bad row, chunks go as COPY statements of 10,000 rows whose ends are
    waited for on a worker thread: a target connection killed then is retried like any
    other, and no row or dead letter is written twice."""
    rows = 90_000
    execute(src, f"CREATE TABLE ev (id bigint PRIMARY KEY, body text, n int); "
                 f"INSERT INTO ev SELECT g, md5(g::text), CASE WHEN g % 7001 = 0 THEN -g ELSE g END "
                 f"FROM generate_series(1, {rows}) g")
    execute(dst, "CREATE TABLE ev (id bigint PRIMARY KEY, body text, n int CHECK (n > 0))")
    proc = _start(src, dst, "--chunk-size", "25000", "--sleep", "0.3")
    with psycopg.connect(pg_server, autocommit=True) as admin:
        _wait("the first chunk (with bad rows)", lambda: _done(dst) >= 25_000, proc)
        _wait("a chunk in flight", lambda: any(
            state == "active" for _, state, _ in _sessions(admin, proc.pid, "target")), proc)
        victims = [pid for pid, _, _ in _sessions(admin, proc.pid, "target")]
        admin.execute("SELECT pg_terminate_backend(%s)", (victims[0],))
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 3, err
    report = json.loads(out)
    assert report["metadata"]["retry_attempts"] >= 1
    bad = [i for i in range(1, rows + 1) if i % 7001 == 0]
    assert report["summary"]["failed"] == len(bad)
    assert report["summary"]["succeeded"] == rows - len(bad)
    with psycopg.connect(dst) as conn:
        letters = sorted(r[0][0] for r in conn.execute("SELECT item_key FROM etl.dead_letters"))
        kept = conn.execute("SELECT count(*), count(DISTINCT id), sum(id) FROM ev").fetchone()
    assert letters == bad
    assert kept == (rows - len(bad), rows - len(bad), rows * (rows + 1) // 2 - sum(bad))


def test_lock_held_by_another_session_is_waited_out(src: str, dst: str) -> None:
    _source(src, 3000)
    execute(dst, "CREATE TABLE ev (id bigint PRIMARY KEY, body text, n numeric(10,2))")
    holder = psycopg.connect(dst)
    holder.execute("LOCK TABLE ev IN ACCESS EXCLUSIVE MODE")  # e.g. a migration in progress
    release = release_once_waited_for(holder, dst)
    try:
        proc = run_etl("copy", "--source", src, "--target", dst, "--table", "ev", "--json",
                       "--no-progress", "--lock-timeout", "200ms", "--retries", "8",
                       "--retry-max-wait", "0.5s")
    finally:
        release.join()
        holder.close()
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["metadata"]["retries_by_reason"].get("55P03", 0) >= 1
    assert "55P03" in proc.stderr
    _exact(src, dst, report)


def test_deadlock_loser_is_retried(src: str, dst: str) -> None:
    _source(src, 10_000)
    execute(dst, "CREATE TABLE ev (id bigint PRIMARY KEY, body text, n numeric(10,2))")
    other = psycopg.connect(dst)
    other.execute("SET deadlock_timeout = '30s'")  # the etl session detects it, and loses
    other.execute("INSERT INTO ev VALUES (5000, 'other', 0)")  # etl's COPY will wait on this
    proc = _start(src, dst, "--chunk-size", "10000")
    try:
        with psycopg.connect(dst, autocommit=True) as admin:
            _wait("etl to wait on the row lock", lambda: any(
                wait == "Lock" for _, _, wait in _sessions(admin, proc.pid, "target")), proc)
        # now wait on a row etl's open transaction inserted: a cycle, which etl detects
        other.execute("INSERT INTO ev VALUES (10, 'other', 0)")
    except psycopg.errors.UniqueViolation:
        pass
    finally:
        other.rollback()
        other.close()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["metadata"]["retries_by_reason"].get("40P01") == 1, err
    _exact(src, dst, report)


@pytest.fixture
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """An embedded PostgreSQL this test may stop and start."""
    from etl import embedded

    home = tmp_path_factory.mktemp("own_pg")
    url = embedded.start(home)
    yield home, url
    embedded.stop(home)


def _own_dbs(url: str) -> tuple[str, str]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE DATABASE src")
        conn.execute("CREATE DATABASE dst")
    return db_url(url, "src"), db_url(url, "dst")


def _run_then_stop_server(own_server: tuple[Path, str], *retry: str
                          ) -> tuple[str, str, subprocess.Popen[str]]:
    """A slow copy on a server the test owns, which is stopped once rows are committed."""
    from etl import embedded

    home, url = own_server
    src, dst = _own_dbs(url)
    _source(src)
    proc = _start(src, dst, "--chunk-size", "500", "--sleep", "0.03", *retry)
    _wait("committed rows", lambda: _done(dst) >= 2000, proc)
    embedded.stop(home)
    return src, dst, proc


def test_server_restart_mid_run_is_retried(own_server: tuple[Path, str]) -> None:
    from etl import embedded

    src, dst, proc = _run_then_stop_server(own_server, "--retries", "10",
                                           "--retry-max-wait", "2s")
    home = own_server[0]
    time.sleep(0.5)
    embedded.start(home)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["metadata"]["retry_attempts"] >= 1
    _exact(src, dst, report)


def test_server_down_past_the_retry_budget_fails_then_rerun_finishes(
        own_server: tuple[Path, str]) -> None:
    from etl import embedded

    src, dst, proc = _run_then_stop_server(own_server, "--retries", "2", "--retry-max-wait", "0.2s")
    home = own_server[0]
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("etl: error:")]
    assert len(errors) == 1 and ("connect" in errors[0] or "57P01" in errors[0]), err
    embedded.start(home)
    rerun = run_etl("copy", "--source", src, "--target", dst, "--table", "ev", "--json",
                    "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    _exact(src, dst, json.loads(rerun.stdout))


def test_sigterm_while_retrying_stops_resumably(src: str, dst: str) -> None:
    _source(src, 3000)
    execute(dst, "CREATE TABLE ev (id bigint PRIMARY KEY, body text, n numeric(10,2))")
    holder = psycopg.connect(dst)
    holder.execute("LOCK TABLE ev IN ACCESS EXCLUSIVE MODE")
    try:
        proc = _start(src, dst, "--lock-timeout", "100ms", "--retries", "50",
                      "--retry-max-wait", "0.3s")
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        holder.rollback()
        holder.close()
    assert proc.returncode == 4, err
    assert json.loads(out)["status"] == "stopped"
    rerun = run_etl("copy", "--source", src, "--target", dst, "--table", "ev", "--json",
                    "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    _exact(src, dst, json.loads(rerun.stdout))


def test_lost_lock_session_never_lets_two_runs_commit(src: str, dst: str, pg_server: str) -> None:
    """Kill the session holding the job lock and start a second run at once: whichever
    run holds the lock commits; the other stops. No row is written twice."""
    _source(src)
    execute(dst, "CREATE TABLE ev (id bigint, body text, n numeric(10,2))")  # no key: dupes show
    first = _start(src, dst, "--chunk-size", "500", "--sleep", "0.05")
    with psycopg.connect(pg_server, autocommit=True) as admin:
        _wait("committed rows", lambda: _done(dst) >= 2000, first)
        (victim,) = [pid for pid, _, _ in _sessions(admin, first.pid, "state")]
        admin.execute("SELECT pg_terminate_backend(%s)", (victim,))
    second = _start(src, dst, "--chunk-size", "500")
    out2, err2 = second.communicate(timeout=60)
    out1, err1 = first.communicate(timeout=60)
    assert {first.returncode, second.returncode} <= {0, 1, 75}, (err1, err2)
    assert 0 in (first.returncode, second.returncode) or 75 in (first.returncode, second.returncode)
    final = run_etl("copy", "--source", src, "--target", dst, "--table", "ev", "--json",
                    "--no-progress")
    assert final.returncode == 0, final.stderr
    _exact(src, dst, json.loads(final.stdout))
