"""Resuming, stopping and the state store, through the library with real databases."""

from __future__ import annotations

import psycopg
import pytest

import etl
from etl.progress import NoProgress
from etl.runner import StopFlag
from etl.state import schema
from tests.conftest import execute, fingerprint, scalar


class StopAfter(NoProgress):
    """A progress sink that asks the run to stop after ``n`` chunks (a chunk boundary)."""

    def __init__(self, flag: StopFlag, n: int) -> None:
        self.flag, self.n, self.seen = flag, n, 0

    def advance(self, rows: int, nbytes: int) -> None:
        self.seen += 1
        if self.seen >= self.n:
            self.flag.set("test asked to stop")


def _events(url: str, n: int = 1000) -> None:
    execute(url, f"CREATE TABLE ev (id int PRIMARY KEY, v text); "
                 f"INSERT INTO ev SELECT g, md5(g::text) FROM generate_series(1, {n}) g")


def test_stop_at_chunk_boundary_then_resume(src: str, dst: str) -> None:
    _events(src)
    flag = StopFlag()
    first = etl.copy(source=src, target=dst, table="ev", chunk_size=100, stop=flag,
                     progress=StopAfter(flag, 3))
    assert first.status is etl.Status.STOPPED and first.exit_code == 4
    assert first.succeeded == 300 and scalar(dst, "SELECT count(*) FROM ev") == 300
    assert first.to_dict()["last_checkpoint"]["last_key"] == [300]
    second = etl.copy(source=src, target=dst, table="ev", chunk_size=100)
    assert second.status is etl.Status.COMPLETED
    assert second.rows_this_run == 700
    s = second.to_dict()["summary"]
    assert s["succeeded"] + s["failed"] + s["skipped"] == s["total_items"] == 1000
    assert fingerprint(dst, "ev") == fingerprint(src, "ev")


def test_max_runtime_stops_and_resumes(src: str, dst: str) -> None:
    _events(src, 3000)
    first = etl.copy(source=src, target=dst, table="ev", chunk_size=100, sleep=0.2,
                     max_runtime="0.5s")
    assert first.status is etl.Status.STOPPED and "--max-runtime" in (first.message or "")
    assert 0 < first.succeeded < 3000
    second = etl.copy(source=src, target=dst, table="ev", chunk_size=1000)
    assert second.status is etl.Status.COMPLETED
    assert fingerprint(dst, "ev") == fingerprint(src, "ev")


def test_restart_with_replace_starts_over(src: str, dst: str) -> None:
    _events(src)
    flag = StopFlag()
    etl.copy(source=src, target=dst, table="ev", chunk_size=100, mode="replace", stop=flag,
             progress=StopAfter(flag, 2))
    # resuming a replace run does not empty the target again
    execute(dst, "INSERT INTO etl.jobs (job_id, job_type) VALUES ('marker', 'x')")
    resumed = etl.copy(source=src, target=dst, table="ev", chunk_size=100, mode="replace")
    assert resumed.status is etl.Status.COMPLETED and resumed.rows_this_run == 800
    again = etl.copy(source=src, target=dst, table="ev", mode="replace", restart=True)
    assert again.status is etl.Status.COMPLETED and again.rows_this_run == 1000
    assert again.succeeded == 1000
    assert fingerprint(dst, "ev") == fingerprint(src, "ev")


def test_state_store_elsewhere(src: str, dst: str, make_db) -> None:
    state = make_db("state")
    _events(src)
    result = etl.copy(source=src, target=dst, table="ev", state=state, chunk_size=250)
    assert result.status is etl.Status.COMPLETED
    assert scalar(dst, "SELECT to_regnamespace('etl')") is None
    assert scalar(state, "SELECT processed FROM etl.checkpoints WHERE job_id = 'copy:public.ev'") == 1000


def test_lost_checkpoint_with_state_elsewhere_does_not_duplicate(src: str, dst: str, make_db) -> None:
    """A crash between the target's commit and the state store's write replays one chunk."""
    state = make_db("state")
    _events(src)
    execute(dst, "CREATE TABLE ev (id int, v text)")  # no key: duplicates would be visible
    flag = StopFlag()
    etl.copy(source=src, target=dst, table="ev", state=state, chunk_size=100, stop=flag,
             progress=StopAfter(flag, 3))
    assert scalar(dst, "SELECT count(*) FROM ev") == 300
    # forget the third chunk's checkpoint, as if the process died right after the target commit
    execute(state, """UPDATE etl.checkpoints SET last_key = '[200]', chunk_index = 2,
                      processed = 200, succeeded = 200""")
    result = etl.copy(source=src, target=dst, table="ev", state=state, chunk_size=100)
    assert result.status is etl.Status.COMPLETED
    assert fingerprint(dst, "ev") == fingerprint(src, "ev")
    assert result.succeeded == 1000


def test_lost_checkpoint_of_a_chunk_larger_than_the_resumed_ones(src: str, dst: str,
                                                                  make_db) -> None:
    """The lost chunk was 300 rows; the resumed run cuts chunks of 70: every range it
    covers is cleared before it is rewritten, not only the first."""
    state = make_db("state")
    _events(src)
    execute(dst, "CREATE TABLE ev (id int, v text)")  # no key: duplicates would be visible
    flag = StopFlag()
    etl.copy(source=src, target=dst, table="ev", state=state, chunk_size=300, stop=flag,
             progress=StopAfter(flag, 2))
    assert scalar(dst, "SELECT count(*) FROM ev") == 600
    execute(state, """UPDATE etl.checkpoints SET last_key = '[300]', chunk_index = 1,
                      processed = 300, succeeded = 300""")
    result = etl.copy(source=src, target=dst, table="ev", state=state, chunk_size=70)
    assert result.status is etl.Status.COMPLETED
    assert fingerprint(dst, "ev") == fingerprint(src, "ev")


def test_second_run_of_same_job_is_locked(src: str, dst: str) -> None:
    _events(src, 10)
    from etl.state import lock

    etl.copy(source=src, target=dst, table="ev", dry_run=False)
    with psycopg.connect(dst, autocommit=True, application_name="etl:state:4242:otherhost") as holder:
        lock.acquire(holder, "copy:public.ev")
        with pytest.raises(etl.JobLockedError) as info:
            etl.copy(source=src, target=dst, table="ev")
        assert info.value.exit_code == 75
        assert "host otherhost, pid 4242" in str(info.value)


def test_schema_applied_once_and_versioned(dst: str) -> None:
    with psycopg.connect(dst, autocommit=True) as conn:
        assert schema.installed_version(conn) == 0
        assert schema.ensure_schema(conn) == schema.latest_version()
        assert schema.ensure_schema(conn) == schema.latest_version()
    assert scalar(dst, "SELECT count(*) FROM etl.schema_version") == schema.latest_version()
    for table in ("jobs", "runs", "checkpoints", "dead_letters", "control_requests"):
        assert scalar(dst, f"SELECT to_regclass('etl.{table}')::text") == f"etl.{table}"


def test_replace_after_a_finished_run_starts_fresh(src: str, dst: str) -> None:
    _events(src, 100)
    assert etl.copy(source=src, target=dst, table="ev", mode="replace").succeeded == 100
    execute(src, "DELETE FROM ev WHERE id <= 10")
    again = etl.copy(source=src, target=dst, table="ev", mode="replace")
    assert again.status is etl.Status.COMPLETED and again.succeeded == 90
    assert fingerprint(dst, "ev") == fingerprint(src, "ev")


def test_nullable_key_with_nulls_is_refused(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE t (code text UNIQUE, v int); "
                 "INSERT INTO t VALUES ('a', 1), (NULL, 2), ('b', 3)")
    with pytest.raises(etl.UsageError, match="NULL in the key"):
        etl.copy(source=src, target=dst, table="t", key="code")
    ok = etl.copy(source=src, target=dst, table="t", key="code", where="code IS NOT NULL")
    assert ok.succeeded == 2


def test_non_unique_key_never_splits_equal_keys(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE t (day int NOT NULL, v int); "
                 "INSERT INTO t SELECT g / 37, g FROM generate_series(1, 1000) g")
    result = etl.copy(source=src, target=dst, table="t", key="day", chunk_size=10)
    assert result.status is etl.Status.COMPLETED and result.succeeded == 1000
    assert fingerprint(dst, "t") == fingerprint(src, "t")
