"""`etl load` into SQLite and MariaDB killed with SIGKILL in the middle of a multi-file load —
once at a random moment, once in the worst one: the chunk committed in the target, its
checkpoint and dead letters not yet in the state store (held back by a lock on the state
store's checkpoint row). The rerun loads every row exactly once and loses no dead letter."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import psycopg
import pytest

from tests.conftest import run_etl, scalar

pytestmark = pytest.mark.timeout(120)

FILES, ROWS = 3, 8000  # rows a file; the 500th of every thousand is refused (not a number)
BAD = {i * ROWS + j for i in range(FILES) for j in range(ROWS) if j % 1000 == 500}


def wait_until(what: str, check: Callable[[], bool], proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"etl ended before {what}: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def kill(proc, state: str) -> None:
    """SIGKILL, then wait until its state-store sessions are gone (with them the job's lock)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 20
    while scalar(state, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s",
                 (f"etl:%:{proc.pid}:%",)):
        assert time.monotonic() < deadline, "the killed process's session lingers"
        time.sleep(0.01)


@pytest.fixture(params=["sqlite", "mariadb"])
def target(request: pytest.FixtureRequest, tmp_path: Path):
    """(URL, run a query and return its rows) of an empty target with table big."""
    from etl.dialects import make_engine

    if request.param == "sqlite":
        path = tmp_path / "target.db"
        sqlite3.connect(path).close()
        url = f"sqlite:///{path}"
    else:
        url = request.getfixturevalue("make_mariadb_db")("kill")
    engine = make_engine(url, connect_args={"timeout": 30} if request.param == "sqlite" else {})

    def rows(query: str) -> list[tuple]:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(query).fetchall()]

    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE big (id INT PRIMARY KEY, n INT NOT NULL, v TEXT)")
    yield url, rows
    engine.dispose()


def test_kill_9_twice_then_every_row_exactly_once(target, make_db, spawn,
                                                  tmp_path: Path) -> None:
    url, rows = target
    state = make_db("state")
    files = []
    for i in range(FILES):
        f = tmp_path / f"part{i}.csv"
        f.write_text("id,n,v\n" + "".join(
            f"{k},{'x' if k in BAD else k},v{k}\n" for k in range(i * ROWS, (i + 1) * ROWS)))
        files.append(str(f))
    job = "kill-load"
    cli = ["load", "--target", url, "--table", "big", "--state", state, "--job", job,
           "--max-error-rate", "1", "--rejects", str(tmp_path / "rejects.ndjson"),
           "--chunk-size", "1000", "--no-progress", *files]

    def count() -> int:
        return int(rows("SELECT count(*) FROM big")[0][0])

    def positions() -> tuple[int, int]:
        """(the target's chunk index, the state store's) of the job."""
        found = rows(f"SELECT chunk_index FROM etl_load_checkpoints WHERE job_id = '{job}'")
        stored = scalar(state, "SELECT chunk_index FROM etl.checkpoints WHERE job_id = %s",
                        (job,))
        return (int(found[0][0]) if found else 0), int(stored or 0)

    # 1. a random moment, in the second file
    proc = spawn(*cli, "--sleep", "0.02")
    wait_until("the second file", lambda: count() >= ROWS + 1000, proc)
    kill(proc, state)
    # 2. the worst moment: the target committed a chunk, the state store has not heard of it
    proc = spawn(*cli, "--sleep", "0.05")
    before = count()
    wait_until("progress", lambda: count() >= before + 2000, proc)
    holder = psycopg.connect(state)
    try:
        holder.execute("SELECT 1 FROM etl.checkpoints WHERE job_id = %s FOR UPDATE", (job,))
        wait_until("a chunk committed only in the target",
                   lambda: positions()[0] > positions()[1], proc)
        kill_at = positions()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        holder.rollback()
        holder.close()
    kill(proc, state)
    assert kill_at[0] == kill_at[1] + 1
    # that chunk's dead letter is kept in the target only
    assert rows(f"SELECT count(*) FROM etl_load_rejects WHERE job_id = '{job}'") == [(1,)]
    assert scalar(state, "SELECT count(*) FROM etl.dead_letters WHERE job_id = %s",
                  (job,)) == kill_at[1]
    # 3. the rerun
    out = run_etl(*cli, "--json")
    assert out.returncode == 3, out.stderr  # completed, with the refused rows dead-lettered
    doc = json.loads(out.stdout)
    good = [k for k in range(FILES * ROWS) if k not in BAD]
    assert rows("SELECT count(*), count(DISTINCT id), sum(id) FROM big") == [
        (len(good), len(good), sum(good))]
    assert doc["summary"] == {**doc["summary"], "total_items": FILES * ROWS,
                              "succeeded": len(good), "failed": len(BAD), "skipped": 0}
    with psycopg.connect(state, autocommit=True) as conn:
        keys = [tuple(r[0]) for r in conn.execute(
            "SELECT item_key FROM etl.dead_letters WHERE job_id = %s", (job,))]
    expected = {(files[k // ROWS], k % ROWS + 2) for k in BAD}  # the line: header is line 1
    assert len(keys) == len(BAD) and set(keys) == expected
    assert rows("SELECT count(*) FROM etl_load_rejects") == [(0,)]


def test_the_state_store_lost_after_the_target_commit(make_db, spawn, tmp_path: Path) -> None:
    """The state store's connection dies while the chunk the target committed waits to be
    recorded there: the retry finds the chunk in the target, records it (with its dead
    letter) and goes on — nothing written twice."""
    path = tmp_path / "t.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE big (id INT PRIMARY KEY, n INT NOT NULL, v TEXT)")
    state = make_db("state")
    f = tmp_path / "one.csv"
    f.write_text("id,n,v\n" + "".join(f"{k},{'x' if k in BAD else k},v{k}\n"
                                      for k in range(ROWS)))
    proc = spawn("load", "--target", f"sqlite:///{path}", "--table", "big", "--state", state,
                 "--job", "lost", "--max-error-rate", "1", "--chunk-size", "1000", "--sleep",
                 "0.05", "--json", "--no-progress", str(f))

    def positions() -> tuple[int, int]:
        with closing(sqlite3.connect(path, timeout=30)) as conn:
            try:
                found = conn.execute("SELECT chunk_index FROM etl_load_checkpoints").fetchone()
            except sqlite3.OperationalError:  # not created yet
                found = None
        try:
            stored = scalar(state, "SELECT chunk_index FROM etl.checkpoints "
                                   "WHERE job_id = 'lost'")
        except psycopg.errors.UndefinedTable:  # the state store's schema: not yet
            stored = None
        return (int(found[0]) if found else 0), int(stored or 0)

    wait_until("two chunks", lambda: positions()[1] >= 2, proc)
    holder = psycopg.connect(state)
    try:
        holder.execute("SELECT 1 FROM etl.checkpoints WHERE job_id = 'lost' FOR UPDATE")
        wait_until("a chunk committed only in the target",
                   lambda: positions()[0] > positions()[1], proc)
        with psycopg.connect(state, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                          "application_name LIKE %s", (f"etl:state:{proc.pid}:%",))
    finally:
        holder.rollback()
        holder.close()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 3, stderr
    assert "had committed before its connection was lost" in stderr
    doc = json.loads(stdout)
    assert doc["metadata"]["retry_attempts"] >= 1
    good = [k for k in range(ROWS) if k not in BAD]
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT id), sum(id) FROM big").fetchone() \
            == (len(good), len(good), sum(good))
    lines = scalar(state, "SELECT array_agg((item_key->>1)::int ORDER BY 1) FROM "
                          "etl.dead_letters WHERE job_id = 'lost'")
    assert sorted(lines) == sorted(k + 2 for k in BAD if k < ROWS)
