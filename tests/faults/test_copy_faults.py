"""Fault injection for `etl copy`: real processes, real signals, a real PostgreSQL. No mocks.

Every test starts the real CLI (`python -m etl copy …`) in a subprocess, hurts it
(SIGKILL, SIGTERM, SIGINT, --max-runtime, a second run of the same job, a
terminated server connection, concurrent first runs on a fresh database) and then
checks the contract of SPEC.md "Guarantees": after a finished rerun the target
equals the source — same rows, same checksum, no duplicates — and the report's
counts add up.

Random kill moments come from ``random.Random(seed)``; the seed is printed (shown
with ``-s`` or on failure) and can be replayed with ``ETL_FAULT_SEED=<seed>``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from etl.state.schema import migrations
from tests.conftest import ROOT, etl_cmd, execute, fingerprint, run_etl, scalar

pytestmark = pytest.mark.timeout(120)

ROWS = 30_000
JOB = "copy:public.ev"
HOST = socket.gethostname()
# A copy of ROWS rows in chunks of 500 with a 50 ms pause takes about 3.5 s:
# slow enough to interrupt, fast enough to keep the module well under a minute.
SLOW = ("--chunk-size", "500", "--sleep", "0.05")


def _seed() -> int:
    env = os.environ.get("ETL_FAULT_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**32)


@pytest.fixture
def rng() -> random.Random:
    seed = _seed()
    print(f"fault seed: ETL_FAULT_SEED={seed}")
    return random.Random(seed)


# -- data ------------------------------------------------------------------------------------

def make_events(url: str, rows: int = ROWS, table: str = "ev") -> None:
    """A table with mixed column types (an enum, arrays, jsonb, bytea, NULLs), sparse keys."""
    execute(url, f"""
        DO $$ BEGIN CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
        EXCEPTION WHEN duplicate_object THEN NULL; END $$;
        CREATE TABLE {table} (
            id      bigint PRIMARY KEY,
            name    text,
            amount  numeric(12, 2),
            ratio   double precision,
            at      timestamptz NOT NULL,
            day     date,
            flag    boolean,
            tags    text[],
            doc     jsonb,
            m       mood,
            u       uuid,
            raw     bytea
        );
        INSERT INTO {table}
        SELECT g * 3,
               CASE WHEN g % 11 = 0 THEN NULL ELSE 'name ' || g || ' ünïcödé, "q" \\t' END,
               g * 1.25, g / 7.0,
               timestamptz '2024-01-01 00:00:00+00' + g * interval '1 minute',
               date '2020-01-01' + g % 1000,
               CASE WHEN g % 5 = 0 THEN NULL ELSE g % 2 = 0 END,
               ARRAY['a' || g % 7, NULL, 'b,c'],
               jsonb_build_object('g', g, 'nested', jsonb_build_array(g, 'x')),
               (ARRAY['sad', 'ok', 'happy']::mood[])[g % 3 + 1],
               md5(g::text)::uuid,
               decode(md5(g::text), 'hex')
        FROM generate_series(1, {rows}) AS g;
        ANALYZE {table};
    """)


def make_plain(url: str, rows: int, table: str) -> None:
    """Mixed types but no user-defined type (see test_concurrent_first_runs_…)."""
    execute(url, f"""
        CREATE TABLE {table} (
            k     integer PRIMARY KEY,
            label varchar(40) NOT NULL,
            price numeric(10, 3),
            seen  timestamp,
            ok    boolean,
            attrs jsonb,
            nums  integer[]
        );
        INSERT INTO {table}
        SELECT g, 'label-' || g, g / 3.0, timestamp '2023-06-01' + g * interval '1 second',
               g % 3 = 0, jsonb_build_object('k', g), ARRAY[g, g + 1]
        FROM generate_series(1, {rows}) AS g;
    """)


def copy_args(src: str, dst: str, *extra: str, table: str = "ev") -> list[str]:
    return ["copy", "--source", src, "--target", dst, "--table", table, "--no-progress", *extra]


# -- processes ---------------------------------------------------------------------------------

def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = 15,
               proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"etl exited ({proc.returncode}) before {what}\nstdout: {out}\nstderr: {err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class Probe:
    """One autocommit connection to the target, to watch a running copy cheaply."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)

    def close(self) -> None:
        self.conn.close()

    def checkpoint(self, job: str = JOB) -> tuple[int, list | None] | None:
        """(processed, last_key) of the job's checkpoint, None before there is one."""
        if self.conn.execute("SELECT to_regclass('etl.checkpoints')").fetchone()[0] is None:
            return None
        row = self.conn.execute("SELECT processed, last_key FROM etl.checkpoints "
                                "WHERE job_id = %s AND partition = ''", (job,)).fetchone()
        return (int(row[0]), row[1]) if row else None

    def processed(self, job: str = JOB) -> int:
        cp = self.checkpoint(job)
        return cp[0] if cp else 0

    def sessions_of(self, pid: int, role: str = "%") -> list[int]:
        """Server pids of the sessions `etl` process ``pid`` opened (application_name etl:role:pid:host)."""
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE %s "
            "AND split_part(application_name, ':', 3) = %s",
            (f"etl:{role}:%", str(pid))).fetchall()
        return [r[0] for r in rows]

    def in_chunk_transaction(self, pid: int) -> bool:
        row = self.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'etl:target:%%' "
            "AND split_part(application_name, ':', 3) = %s AND xact_start IS NOT NULL",
            (str(pid),)).fetchone()
        return bool(row and row[0])


@pytest.fixture
def probe(dst: str) -> Iterator[Probe]:
    p = Probe(dst)
    yield p
    p.close()


def assert_consistent_partial(dst: str, probe: Probe, source_rows: int) -> int:
    """After an interruption: the target holds exactly the rows the checkpoint says, once each."""
    cp = probe.checkpoint()
    if scalar(dst, "SELECT to_regclass('public.ev')") is None:
        assert cp is None or cp[0] == 0
        return 0
    rows, _, distinct = fingerprint(dst, "ev")
    assert rows == distinct, "duplicated rows in the target"
    processed = cp[0] if cp else 0
    assert rows == processed, f"target has {rows} rows but the checkpoint says {processed}"
    assert processed <= source_rows
    if processed:
        assert cp is not None and cp[1] == [scalar(dst, "SELECT max(id) FROM ev")]
        # keyset order: the target holds exactly the first `processed` keys of the source
        assert scalar(dst, "SELECT count(*) FROM ev WHERE id %% 3 <> 0 OR id > %s",
                      (processed * 3,)) == 0
    return processed


def assert_exact_copy(src: str, dst: str, table: str = "ev") -> None:
    expected = fingerprint(src, table)
    got = fingerprint(dst, table)
    assert got[0] == got[2], f"{got[0] - got[2]} duplicated row(s) in the target"
    assert got == expected


def assert_totals(report: dict, total: int) -> None:
    s = report["summary"]
    assert s["succeeded"] + s["failed"] + s["skipped"] == s["total_items"] == total, s
    assert s["processed"] == total and s["failed"] == 0 and s["skipped"] == 0


def assert_one_line_error(stderr: str) -> str:
    """One error line (log lines such as retries and isolation warnings may precede it)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("etl: error: ")]
    assert len(lines) == 1, stderr
    others = [line for line in stderr.splitlines()
              if line.strip() and not line.startswith("etl: error: ") and " WARNING etl." not in line]
    assert not others, stderr
    return lines[0]


def resume_exactly(src: str, dst: str, done: int) -> None:
    """A rerun copies exactly the rows the interrupted run had not committed."""
    again = complete(src, dst)
    assert again["metadata"]["rows_this_run"] == ROWS - done
    assert_totals(again, ROWS)
    assert_exact_copy(src, dst)


def complete(src: str, dst: str, *extra: str, table: str = "ev") -> dict:
    """Rerun the job to the end; returns its report."""
    done = run_etl(*copy_args(src, dst, "--json", *extra, table=table))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["status"] == "completed"
    return report


# -- 1. kill -9 ----------------------------------------------------------------------------

def test_kill9_at_random_points_then_resume(src: str, dst: str, probe: Probe, spawn,
                                            rng: random.Random) -> None:
    make_events(src)
    killed_after_start = 0
    for attempt in range(4):
        chunk = rng.choice(["400", "500", "800"])
        proc = spawn(*copy_args(src, dst, "--chunk-size", chunk, "--sleep", "0.05"))
        if attempt == 0:
            # anywhere: interpreter start-up, planning, state-store creation, first chunks
            delay = rng.uniform(0.05, 0.6)
            time.sleep(delay)
            moment = f"{delay:.3f}s after start"
        elif attempt == 2:
            # inside a chunk's transaction: rows half-written, checkpoint not yet committed
            before = probe.processed()
            wait_until("new committed rows", lambda b=before: probe.processed() > b, proc=proc)
            deadline = time.monotonic() + 5
            caught = False
            while not caught and time.monotonic() < deadline:
                caught = probe.in_chunk_transaction(proc.pid)
            moment = "inside a chunk transaction" if caught else "transaction not caught in 5s"
            killed_after_start += 1
        else:
            before = probe.processed()
            wait_until("new committed rows", lambda b=before: probe.processed() > b, proc=proc)
            delay = rng.uniform(0.0, 0.06)
            time.sleep(delay)
            moment = f"{delay:.3f}s after a commit"
            killed_after_start += 1
        assert proc.poll() is None, f"the copy finished before kill #{attempt + 1}: {finish(proc)}"
        os.kill(proc.pid, signal.SIGKILL)
        rc, _, _ = finish(proc)
        assert rc == -signal.SIGKILL
        # the dead client's sessions (and with them the job's advisory lock) go away on their own
        wait_until("the killed process's sessions to end",
                   lambda pid=proc.pid: not probe.sessions_of(pid), timeout=10)
        done = assert_consistent_partial(dst, probe, ROWS)
        print(f"kill #{attempt + 1} ({moment}, chunk {chunk}): {done} rows committed")
        assert done < ROWS

    report = complete(src, dst, "--chunk-size", "2000")
    assert_exact_copy(src, dst)
    assert_totals(report, ROWS)
    assert report["last_checkpoint"]["processed_count"] == ROWS

    # runs the killed processes left "running" were closed as failed by the next run
    runs = dict(probe.conn.execute("SELECT status, count(*) FROM etl.runs WHERE job_id = %s "
                                   "GROUP BY status", (JOB,)).fetchall())
    assert "running" not in runs, runs
    assert runs.get("completed") == 1, runs
    assert runs.get("failed", 0) >= killed_after_start, runs
    assert scalar(dst, "SELECT count(*) FROM etl.runs WHERE job_id = %s AND status = 'failed' "
                       "AND report ->> 'stale_note' IS NULL", (JOB,)) == 0
    assert scalar(dst, "SELECT status FROM etl.runs WHERE run_id = %s",
                  (report["run_id"],)) == "completed"


# -- 2, 3. SIGTERM / SIGINT -------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_at_chunk_boundary_then_resumes(src: str, dst: str, probe: Probe, spawn,
                                                     rng: random.Random,
                                                     signum: signal.Signals) -> None:
    make_events(src)
    proc = spawn(*copy_args(src, dst, "--json", *SLOW))
    wait_until("committed rows", lambda: probe.processed() >= 1000, proc=proc)
    time.sleep(rng.uniform(0.0, 0.06))
    os.kill(proc.pid, signum)
    rc, out, err = finish(proc, timeout=15)
    assert rc == 4, err
    assert "Traceback" not in err
    assert signum.name in err  # "stopped at a chunk boundary (received SIGTERM); rerun to resume"
    report = json.loads(out)
    assert report["status"] == "stopped"
    done = assert_consistent_partial(dst, probe, ROWS)
    assert 0 < done < ROWS
    cp = report["last_checkpoint"]
    assert cp["processed_count"] == done == report["summary"]["succeeded"]
    assert cp["last_key"] == [scalar(dst, "SELECT max(id) FROM ev")]
    assert scalar(dst, "SELECT status FROM etl.runs WHERE run_id = %s",
                  (report["run_id"],)) == "stopped"

    resume_exactly(src, dst, done)


# -- 4. --max-runtime -----------------------------------------------------------------------

def test_max_runtime_stops_then_rerun_completes(src: str, dst: str, probe: Probe) -> None:
    make_events(src)
    t0 = time.monotonic()
    first = run_etl(*copy_args(src, dst, "--json", "--max-runtime", "1s", *SLOW))
    elapsed = time.monotonic() - t0
    assert first.returncode == 4, first.stderr
    assert "--max-runtime" in first.stderr and "Traceback" not in first.stderr
    assert elapsed < 10
    report = json.loads(first.stdout)
    assert report["status"] == "stopped"
    done = assert_consistent_partial(dst, probe, ROWS)
    assert 0 < done < ROWS
    assert report["last_checkpoint"]["processed_count"] == done

    resume_exactly(src, dst, done)


# -- 5. one active run per job ------------------------------------------------------------------

def test_second_run_of_same_job_exits_75_naming_the_holder(src: str, dst: str, probe: Probe,
                                                           spawn) -> None:
    make_events(src)
    # a job name no other etl process on this server uses
    job = f"faults-lock-{uuid.uuid4().hex[:8]}"
    args = copy_args(src, dst, "--json", "--job", job, *SLOW)
    first = spawn(*args)
    wait_until("committed rows", lambda: probe.processed(job) > 0, proc=first)

    t0 = time.monotonic()
    second = run_etl(*args, timeout=30)
    elapsed = time.monotonic() - t0
    assert second.returncode == 75, (second.returncode, second.stderr)
    assert elapsed < 5, f"the second run took {elapsed:.1f}s to give up"
    assert "Traceback" not in second.stderr
    assert f"host {HOST}, pid {first.pid}" in second.stderr, second.stderr
    assert first.poll() is None, "the first run should still be copying"
    # the refused run touched nothing: the first run is still the one running run
    assert scalar(dst, "SELECT array_agg(pid) FROM etl.runs WHERE job_id = %s "
                       "AND status = 'running'", (job,)) == [first.pid]

    rc, out, err = finish(first)
    assert rc == 0, err
    report = json.loads(out)
    assert_totals(report, ROWS)
    assert_exact_copy(src, dst)


def test_lock_holder_is_looked_up_in_the_job_database(src: str, dst: str) -> None:
    from etl.state.lock import lock_key

    make_events(src, 1_000)
    key = lock_key(JOB)
    # the same job name is running against another database (src) of the same server …
    with psycopg.connect(src, autocommit=True, application_name="etl:state:11111:elsewhere") as other, \
            psycopg.connect(dst, autocommit=True, application_name="etl:state:22222:holder") as real:
        other.execute("SELECT pg_advisory_lock(%s)", (key,))
        # … and really is running against this one
        real.execute("SELECT pg_advisory_lock(%s)", (key,))
        refused = run_etl(*copy_args(src, dst))
    assert refused.returncode == 75, refused.stderr
    assert "host holder, pid 22222" in refused.stderr, refused.stderr


# -- 6. the target connection dies ------------------------------------------------------------

def test_terminated_target_connection_without_retries_fails_cleanly_then_rerun_completes(
        src: str, dst: str, probe: Probe, spawn) -> None:
    """With --retries 0 a dropped connection ends the run (test_retries.py: with retries)."""
    make_events(src)
    proc = spawn(*copy_args(src, dst, "--json", "--retries", "0", *SLOW))
    wait_until("committed rows", lambda: probe.processed() > 0, proc=proc)
    targets = probe.sessions_of(proc.pid, "target")
    assert len(targets) == 1, targets
    assert probe.conn.execute("SELECT pg_terminate_backend(%s)", (targets[0],)).fetchone()[0]

    rc, out, err = finish(proc, timeout=30)
    assert rc == 1, err
    line = assert_one_line_error(err)
    assert "57P01" in line or "connection" in line.lower(), line
    report = json.loads(out)
    assert report["status"] == "failed"
    done = assert_consistent_partial(dst, probe, ROWS)
    assert 0 < done < ROWS
    # the state-store session survived and recorded the failure
    assert scalar(dst, "SELECT status FROM etl.runs WHERE run_id = %s",
                  (report["run_id"],)) == "failed"

    resume_exactly(src, dst, done)


# -- 7. --restart -----------------------------------------------------------------------------

def test_restart_with_replace_starts_over(src: str, dst: str, probe: Probe) -> None:
    make_events(src)
    partial = run_etl(*copy_args(src, dst, "--mode", "replace", "--max-runtime", "0.5s", *SLOW))
    assert partial.returncode == 4, partial.stderr
    done = assert_consistent_partial(dst, probe, ROWS)
    assert 0 < done < ROWS
    # a row only the target has: a resume would keep it, a replace restart must not
    execute(dst, "INSERT INTO ev (id, at) VALUES (-1, now())")

    report = complete(src, dst, "--mode", "replace", "--restart")
    assert report["metadata"]["rows_this_run"] == ROWS
    assert_totals(report, ROWS)
    assert_exact_copy(src, dst)


def test_restart_in_append_mode_onto_partial_target_fails_without_writing(
        src: str, dst: str, probe: Probe) -> None:
    make_events(src)
    partial = run_etl(*copy_args(src, dst, "--max-runtime", "0.5s", *SLOW))
    assert partial.returncode == 4, partial.stderr
    before = assert_consistent_partial(dst, probe, ROWS)
    assert 0 < before < ROWS
    fp_before = fingerprint(dst, "ev")

    restarted = run_etl(*copy_args(src, dst, "--json", "--restart", "--chunk-size", "5000"))
    assert restarted.returncode == 1, restarted.stderr
    line = assert_one_line_error(restarted.stderr)
    # every row is a duplicate: a data error per row, so the error-rate threshold stops it
    assert "--max-error-rate" in line and "duplicate key" in line and "ev_pkey" in line, line
    assert json.loads(restarted.stdout)["status"] == "failed"
    # nothing half-written: the failed chunk rolled back as a whole
    assert fingerprint(dst, "ev") == fp_before


def test_failed_restart_keeps_the_job_resumable(src: str, dst: str, probe: Probe) -> None:
    make_events(src, 5_000)
    partial = run_etl(*copy_args(src, dst, "--max-runtime", "0.3s", "--chunk-size", "200",
                                 "--sleep", "0.05"))
    assert partial.returncode == 4, partial.stderr
    assert run_etl(*copy_args(src, dst, "--restart")).returncode == 1
    resumed = run_etl(*copy_args(src, dst))
    assert resumed.returncode == 0, resumed.stderr
    assert_exact_copy(src, dst)


# -- 8. concurrent first runs on a fresh target ---------------------------------------------------

def test_concurrent_first_runs_create_the_state_store_once(src: str, make_db) -> None:
    make_events(src, 20_000, "ev")
    make_plain(src, 20_000, "items")
    versions = [v for v, _ in migrations()]
    for _ in range(3):  # a few fresh targets: the race is won by a different process each time
        dst = make_db("dst")
        procs = [subprocess.Popen(etl_cmd(*copy_args(src, dst, "--json", table=t)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=ROOT)
                 for t in ("ev", "items")]
        results = [p.communicate(timeout=60) for p in procs]
        for p, (_out, err) in zip(procs, results, strict=True):
            assert p.returncode == 0, err
            assert "Traceback" not in err
        assert scalar(dst, "SELECT array_agg(version ORDER BY version) FROM etl.schema_version") \
            == versions
        assert scalar(dst, "SELECT count(*) FROM etl.jobs") == 2
        assert_exact_copy(src, dst, "ev")
        assert_exact_copy(src, dst, "items")
        assert_totals(json.loads(results[0][0]), 20_000)
        assert_totals(json.loads(results[1][0]), 20_000)


def test_concurrent_first_runs_into_a_new_schema(make_db) -> None:
    src = make_db("src")
    execute(src, "CREATE SCHEMA app")
    make_events(src, 2_000, "app.a")
    make_events(src, 2_000, "app.b")
    for _ in range(3):  # without the DDL lock the race was lost most of the time
        dst = make_db("dst")
        procs = [subprocess.Popen(etl_cmd(*copy_args(src, dst, table=t)), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=ROOT)
                 for t in ("app.a", "app.b")]
        results = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
        assert_exact_copy(src, dst, "app.a")
        assert_exact_copy(src, dst, "app.b")


# -- write modes under kill -9 ------------------------------------------------------------------

def _kill_mid_run(src: str, dst: str, probe: Probe, spawn, *extra: str) -> int:
    proc = spawn(*copy_args(src, dst, *extra, *SLOW))
    wait_until("two committed chunks", lambda: probe.processed() >= 1_000, proc=proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    wait_until("the killed process's sessions to end", lambda: not probe.sessions_of(proc.pid))
    return probe.processed()


def test_replace_killed_then_resumed_does_not_empty_the_target_again(
        src: str, dst: str, probe: Probe, spawn) -> None:
    make_events(src)
    done = _kill_mid_run(src, dst, probe, spawn, "--mode", "replace")
    assert 0 < done < ROWS
    # a row only the target has, above every committed key: a second TRUNCATE would remove it
    execute(dst, "INSERT INTO ev (id, at) VALUES (-1, now())")
    before = scalar(dst, "SELECT md5(string_agg(xmin::text, ',' ORDER BY id)) FROM ev")
    again = run_etl(*copy_args(src, dst, "--mode", "replace", "--json"))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["metadata"]["rows_this_run"] == ROWS - done
    assert scalar(dst, "SELECT count(*) FROM ev WHERE id = -1") == 1
    assert scalar(dst, "SELECT md5(string_agg(xmin::text, ',' ORDER BY id)) FROM ev "
                       "WHERE id <= %s", (done * 3,)) == before
    execute(dst, "DELETE FROM ev WHERE id = -1")
    assert_exact_copy(src, dst)


def test_upsert_killed_then_resumed_is_exact(src: str, dst: str, probe: Probe, spawn) -> None:
    make_events(src)
    # half the rows already there, a third of those with stale values
    first = run_etl(*copy_args(src, dst, "--where", f"id <= {ROWS * 3 // 2}", "--job", "seed"))
    assert first.returncode == 0, first.stderr
    execute(dst, "UPDATE ev SET name = 'stale' WHERE id % 9 = 0")
    done = _kill_mid_run(src, dst, probe, spawn, "--mode", "upsert")
    assert 0 < done < ROWS
    again = run_etl(*copy_args(src, dst, "--mode", "upsert", "--json"))
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert_totals(report, ROWS)
    outcomes = report["metadata"]["outcomes"]
    assert outcomes["inserted"] == ROWS // 2
    assert outcomes["updated"] == scalar(src, "SELECT count(*) FROM ev WHERE id %% 9 = 0 "
                                              "AND id <= %s", (ROWS * 3 // 2,))
    assert sum(outcomes.values()) == ROWS
    assert_exact_copy(src, dst)
