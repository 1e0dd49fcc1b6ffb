"""Fault injection for `etl archive`: real processes, real signals, real PostgreSQL.

A `kill -9` of the running CLI at a random moment, and — for an archive in another
database — a crash exactly between the destination's commit and the source's delete,
caused for real: a test session holds the lock on the job's checkpoint row, so the chunk's
source transaction (which writes the checkpoint after the destination committed) waits
there; the process is then killed, or its source connection terminated. After the rerun,
source ∪ archive is the original row for row: nothing lost, nothing in both, nothing twice.

Random kill moments come from ``random.Random(seed)``; the seed is printed and can be
replayed with ``ETL_FAULT_SEED=<seed>``.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from collections.abc import Callable

import psycopg
import pytest

from tests.conftest import fingerprint, run_etl, scalar
from tests.db.test_archive import WHERE as WHERE_CLAUSE
from tests.db.test_archive import (
    archive_cli,
    assert_moved_exactly,
    keys,
    make_events,
    row_hashes,
    union_fingerprint,
)

pytestmark = pytest.mark.timeout(120)

JOB = "archive:public.ev"


@pytest.fixture
def rng() -> random.Random:
    env = os.environ.get("ETL_FAULT_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(2**32)
    print(f"fault seed: ETL_FAULT_SEED={seed}")
    return random.Random(seed)


def wait_until(what: str, predicate: Callable[[], bool], proc, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"etl exited ({proc.returncode}) before {what}\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def checkpointed(url: str) -> int:
    """Rows the job's checkpoint says are done (-1 before there is one)."""
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('etl.checkpoints')").fetchone()[0] is None:
            return -1
        row = conn.execute("SELECT processed FROM etl.checkpoints WHERE job_id = %s",
                           (JOB,)).fetchone()
        return int(row[0]) if row else -1


def archived(url: str, table: str = "ev_archive") -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is None:
            return 0
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


@pytest.mark.parametrize(("where_to", "state_apart"),
                         [("same", False), ("other", False), ("same", True), ("other", True)])
def test_kill_9_at_a_random_moment_then_rerun(src: str, dst: str, make_db, spawn,
                                              rng: random.Random, where_to: str,
                                              state_apart: bool) -> None:
    """``state_apart``: the checkpoint is in a third database, written after each chunk
    commits — a kill between the two makes the rerun walk a range whose rows are gone."""
    make_events(src)
    original = fingerprint(src, "ev")
    row_hashes_before = row_hashes(src, "ev")
    arch = src if where_to == "same" else dst
    state = make_db("state") if state_apart else src
    extra = ["--to-table", "ev_archive", "--state", state] + \
        ([] if where_to == "same" else ["--to", dst])
    proc = spawn(*archive_cli(src, *extra, "--chunk-size", "400", "--sleep", "0.01"))
    after_rows = rng.randrange(2, 18) * 400
    wait_until(f"{after_rows} rows checkpointed", lambda: checkpointed(state) >= after_rows,
               proc)
    time.sleep(rng.uniform(0, 0.05))  # anywhere in the next chunk(s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert 0 < checkpointed(state) < 10_000
    # whatever the moment, no row is lost even before the rerun; in one database none is in
    # both places either (another database: at most the chunk in flight, until the rerun)
    hashes = row_hashes(src, "ev") + row_hashes(arch, "ev_archive")
    assert set(hashes) == set(row_hashes_before)
    if where_to == "same":
        assert union_fingerprint([(src, "ev"), (arch, "ev_archive")]) == original
    out = run_etl(*archive_cli(src, *extra, "--json"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    if not state_apart:  # (apart, a chunk committed without its checkpoint is not counted)
        assert report["summary"]["succeeded"] == 10_000
        assert report["summary"]["total_items"] == report["summary"]["processed"] == 10_000
    assert_moved_exactly(src, arch, original)
    assert scalar(state, "SELECT count(*) FROM etl.runs WHERE job_id = %s "
                         "AND status = 'failed'", (JOB,)) == 1  # the killed run, closed
    if state_apart:
        assert scalar(src, "SELECT to_regnamespace('etl')") is None


def _block_between_commits(src: str, dst: str, spawn):
    """Start a cross-database archive and stop it exactly after a chunk's destination commit:
    the test holds the checkpoint row's lock, which the chunk's source transaction needs
    next. Returns (process, the holding connection, the process's source backend pid)."""
    proc = spawn(*archive_cli(src, "--to", dst, "--to-table", "ev_archive", "--chunk-size",
                              "1000", "--sleep", "0.3", "--lock-timeout", "60s"))
    wait_until("the first chunk", lambda: checkpointed(src) >= 1000, proc)
    holder = psycopg.connect(src)
    holder.execute("SELECT 1 FROM etl.checkpoints WHERE job_id = %s FOR UPDATE", (JOB,))
    wait_until("a chunk committed in the archive but not in the source",
               lambda: archived(dst) > checkpointed(src), proc)
    backend: list[int] = []

    def waiting() -> bool:
        row = scalar(src, "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                          "AND application_name LIKE %s", (f"etl:source:{proc.pid}:%",))
        backend[:] = [row] if row else []
        return bool(row)

    wait_until("the source transaction waiting for the checkpoint row", waiting, proc)
    return proc, holder, backend[0]


def test_crash_between_destination_commit_and_source_delete(src: str, dst: str, spawn) -> None:
    make_events(src)
    original = fingerprint(src, "ev")
    proc, holder, backend = _block_between_commits(src, dst, spawn)
    done = checkpointed(src)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    scalar(src, "SELECT pg_terminate_backend(%s)", (backend,))  # its open transaction ends
    holder.rollback()
    holder.close()
    wait_until_gone = time.monotonic() + 10
    while scalar(src, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (backend,)):
        assert time.monotonic() < wait_until_gone
        time.sleep(0.01)
    # the crash left the chunk in both databases: committed there, rolled back here
    in_both = set(keys(src, "ev")) & set(keys(dst, "ev_archive"))
    assert len(in_both) == archived(dst) - done == 1000
    assert union_fingerprint([(src, "ev"), (dst, "ev_archive")])[0] == original[0] + 1000
    out = run_etl(*archive_cli(src, "--to", dst, "--to-table", "ev_archive", "--json"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    # the rerun met the chunk's identical copies in the archive, kept them, deleted the rows
    assert report["metadata"]["outcomes"]["already_archived"] == 1000
    assert report["summary"]["succeeded"] == 10_000
    assert_moved_exactly(src, dst, original)


def test_source_connection_terminated_after_destination_commit(src: str, dst: str,
                                                               spawn) -> None:
    make_events(src)
    original = fingerprint(src, "ev")
    proc, holder, backend = _block_between_commits(src, dst, spawn)
    scalar(src, "SELECT pg_terminate_backend(%s)", (backend,))
    holder.rollback()
    holder.close()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # the chunk's source transaction died: logged as a transient failure and retried
    assert re.search(r"chunk \d+ failed \(transient, (57P01|08\d\d\d|OperationalError)", err), err
    assert_moved_exactly(src, dst, original)
    row = scalar(src, "SELECT report FROM etl.runs WHERE job_id = %s AND status = 'completed'",
                 (JOB,))
    assert row["metadata"]["retry_attempts"] >= 1
    assert row["metadata"]["outcomes"]["already_archived"] == 1000
    assert row["summary"]["succeeded"] == 10_000


def test_destination_connection_terminated_mid_run(src: str, dst: str, spawn) -> None:
    make_events(src)
    original = fingerprint(src, "ev")
    proc = spawn(*archive_cli(src, "--to", dst, "--to-table", "ev_archive", "--chunk-size",
                              "500", "--sleep", "0.05", "--json"))
    wait_until("some chunks", lambda: checkpointed(src) >= 2000, proc)
    killed = scalar(dst, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                         "WHERE application_name LIKE %s", (f"etl:target:{proc.pid}:%",))
    assert killed == 1
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["metadata"]["retry_attempts"] >= 1, err
    assert report["summary"]["succeeded"] == 10_000
    assert_moved_exactly(src, dst, original)


def _via_proxy(url: str, role: str, nth: int = 3):
    """``url`` through a proxy that loses the answer to the nth COMMIT of ``role``'s session
    (tests/faults/commit_proxy.py): committed on the server, a dropped connection here."""
    from urllib.parse import urlsplit

    from tests.faults.commit_proxy import CommitDropper

    parts = urlsplit(url)
    proxy = CommitDropper((parts.hostname or "127.0.0.1", parts.port or 5432), f"etl:{role}:",
                          nth)
    port = proxy.start()
    user = f"{parts.username}@" if parts.username else ""
    return (f"postgresql://{user}127.0.0.1:{port}{parts.path}"
            "?sslmode=disable&gssencmode=disable"), proxy


def test_lost_answer_to_the_source_commit(src: str) -> None:
    # commits of the source session: the archive table's creation, chunk 1, chunk 2 (lost)
    make_events(src)
    original = fingerprint(src, "ev")
    proxied, proxy = _via_proxy(src, "source")
    out = run_etl("archive", "--source", proxied, "--table", "ev", "--where", WHERE_CLAUSE,
                  "--to-table", "ev_archive", "--chunk-size", "2500", "--json", "--no-progress")
    assert proxy.dropped.is_set(), "the proxy never dropped a COMMIT's answer"
    assert out.returncode == 0, out.stderr
    assert "chunk 2 had committed before its connection was lost" in out.stderr
    report = json.loads(out.stdout)
    # the committed chunk is counted once, not lost from the counts nor taken twice
    assert report["summary"]["succeeded"] == report["summary"]["processed"] == 10_000
    assert report["metadata"]["num_chunks"] == 4 and report["metadata"]["retry_attempts"] == 1
    assert_moved_exactly(src, src, original)


def test_lost_answer_to_the_destination_commit(src: str, dst: str) -> None:
    # commits of the destination session: the archive table's creation, chunk 1, chunk 2
    # (lost: committed there, so the source rolled its delete back and the retry meets copies)
    make_events(src)
    original = fingerprint(src, "ev")
    proxied, proxy = _via_proxy(dst, "target")
    out = run_etl(*archive_cli(src, "--to", proxied, "--to-table", "ev_archive",
                               "--chunk-size", "2500", "--json"))
    assert proxy.dropped.is_set(), "the proxy never dropped a COMMIT's answer"
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["metadata"]["outcomes"] == {"archived": 7_500, "already_archived": 2_500}
    assert report["summary"]["succeeded"] == 10_000
    assert_moved_exactly(src, dst, original)
