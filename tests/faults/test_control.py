"""`etl pause|resume|cancel JOB` from a second process while a job runs."""

from __future__ import annotations

import json
import time

import pytest

import etl
from tests.conftest import execute, fingerprint, run_etl, scalar

ROWS = 60_000


@pytest.fixture
def running_copy(src: str, dst: str, spawn):
    """A copy that takes a few seconds (small chunks, a pause between them)."""
    execute(src, f"CREATE TABLE ev (id int PRIMARY KEY, v text); "
                 f"INSERT INTO ev SELECT g, 'v' || g FROM generate_series(1, {ROWS}) g")
    args = ("copy", "--source", src, "--target", dst, "--table", "ev", "--chunk-size", "1000",
            "--sleep", "0.05", "--no-progress", "--json")
    proc = spawn(*args)
    deadline = time.monotonic() + 60
    while True:  # the target table exists and a few chunks are in
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        try:
            if scalar(dst, "SELECT count(*) FROM ev") >= 3000:
                break
        except Exception:  # noqa: BLE001 - not created yet
            pass
        time.sleep(0.02)
    return proc, args


def test_pause_from_another_process_then_resume_finishes_exactly(src: str, dst: str,
                                                                running_copy) -> None:
    proc, args = running_copy
    out = run_etl("pause", "copy:public.ev", "--state", dst)
    assert out.returncode == 0 and "next chunk boundary" in out.stderr, out.stderr
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 4
    doc = json.loads(stdout)
    assert doc["status"] == "paused" and 0 < doc["summary"]["succeeded"] < ROWS
    done = scalar(dst, "SELECT count(*) FROM ev")
    assert done == doc["summary"]["succeeded"]  # the chunk in flight committed whole
    status = json.loads(run_etl("status", "copy:public.ev", "--state", dst, "--json").stdout)
    assert status[0]["status"] == "paused" and status[0]["paused_at"]
    # a paused job stays paused: the next run (cron's, say) stops at once
    again = run_etl(*args)
    assert again.returncode == 4 and json.loads(again.stdout)["status"] == "paused"
    assert scalar(dst, "SELECT count(*) FROM ev") == done
    # resume runs it again with the arguments it was started with
    resumed = run_etl("resume", "copy:public.ev", "--state", dst)
    assert resumed.returncode == 0, resumed.stderr
    assert "running it again: etl copy" in resumed.stderr
    assert fingerprint(dst, "ev") == fingerprint(src, "ev")
    status = json.loads(run_etl("status", "copy:public.ev", "--state", dst, "--json").stdout)
    assert status[0]["status"] == "completed" and status[0]["paused_at"] is None


def test_cancel_from_another_process_then_a_rerun_resumes(src: str, dst: str,
                                                          running_copy) -> None:
    proc, args = running_copy
    got = etl.cancel("copy:public.ev", state=dst)  # the library does the same
    assert got.running is not None and got.action == "cancel"
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 4 and json.loads(stdout)["status"] == "cancelled"
    done = scalar(dst, "SELECT count(*) FROM ev")
    assert 0 < done < ROWS
    status = json.loads(run_etl("status", "copy:public.ev", "--state", dst, "--json").stdout)
    assert status[0]["status"] == "cancelled"
    rerun = run_etl(*args)  # the checkpoint stayed: the rerun resumes, no row twice
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["metadata"]["rows_this_run"] == ROWS - done
    assert fingerprint(dst, "ev") == fingerprint(src, "ev")


def test_control_usage_errors_and_a_job_started_from_python(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10)")
    assert etl.copy(source=src, target=dst, table="t").ok
    out = run_etl("pause", "nope", "--state", dst)
    assert out.returncode == 2 and "no job 'nope'" in out.stderr, out.stderr
    out = run_etl("cancel", "copy:public.t", "--state", dst)
    assert out.returncode == 2 and "nothing to cancel" in out.stderr, out.stderr
    # paused while not running: the next run does nothing until resumed
    assert etl.pause("copy:public.t", state=dst).running is None
    execute(src, "INSERT INTO t SELECT generate_series(11, 20)")
    held = etl.copy(source=src, target=dst, table="t", mode="upsert")
    assert held.status is etl.Status.PAUSED and "etl resume copy:public.t" in held.message
    assert scalar(dst, "SELECT count(*) FROM t") == 10
    got = etl.resume("copy:public.t", state=dst)
    assert got.argv is None and "started from Python" in got.message
    assert etl.copy(source=src, target=dst, table="t", mode="upsert").ok
    assert scalar(dst, "SELECT count(*) FROM t") == 20


def test_status_of_a_running_job_then_of_one_killed_by_kill_9(src: str, dst: str,
                                                             running_copy) -> None:
    proc, args = running_copy
    time.sleep(1.5)  # a heartbeat or two with progress
    (job,) = json.loads(run_etl("status", "copy:public.ev", "--state", dst, "--json").stdout)
    live = job["last_run"]["progress"]
    assert job["status"] == "running" and job["last_run"]["pid"] == proc.pid
    assert live["total"] == ROWS and 0 < live["processed"] < ROWS
    assert live["rows_per_second"] > 0 and live["eta_seconds"] > 0
    assert job["last_run"]["heartbeat_age_seconds"] < 3
    table = run_etl("status", "--state", dst).stdout
    assert "copy:public.ev" in table and f"/{ROWS:,}" in table and f"pid {proc.pid}" in table
    proc.kill()
    proc.wait(10)
    time.sleep(2.5)  # no heartbeat since
    (job,) = json.loads(run_etl("status", "copy:public.ev", "--state", dst, "--json",
                                "--stale-after", "2s").stdout)
    assert job["status"] == "stale", job
    # the next run closes the dead one's run and finishes exactly
    rerun = run_etl(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert fingerprint(dst, "ev") == fingerprint(src, "ev")
    runs = json.loads(run_etl("runs", "copy:public.ev", "--state", dst, "--json").stdout)
    assert [r["status"] for r in runs[:2]] == ["completed", "failed"]


def test_a_pause_made_while_the_job_was_idle_is_lifted_by_resume(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE idle (id int PRIMARY KEY);"
                 "INSERT INTO idle SELECT generate_series(1, 3000)")
    assert etl.copy(source=src, target=dst, table="idle", chunk_size=1000).ok
    etl.pause("copy:public.idle", state=dst)  # not running: its next run is held
    assert etl.copy(source=src, target=dst, table="idle", mode="upsert",
                    restart=True).status is etl.Status.PAUSED
    etl.pause("copy:public.idle", state=dst)  # asked again while idle, then lifted
    etl.resume("copy:public.idle", state=dst)
    again = etl.copy(source=src, target=dst, table="idle", mode="upsert", restart=True,
                     chunk_size=1000)
    assert again.status is etl.Status.COMPLETED and again.succeeded == 3000
