"""Fault injection for `etl archive --to mysql://…` (PostgreSQL → a real MariaDB): a
`kill -9` of the CLI at a random moment, and a crash exactly between the archive's commit
in MariaDB and the source's delete (a test session holds the job's checkpoint row, which
the chunk's source transaction writes next). After the rerun every original row is in
the source or in the archive, value for value, never both, never twice.

The seed of the random moment is printed; replay it with ``ETL_FAULT_SEED=<seed>``.
"""

from __future__ import annotations

import json
import random
import signal
import time

import psycopg
import pytest

from tests.conftest import run_etl, scalar
from tests.db.test_archive import archive_cli, make_events
from tests.db.test_archive_mariadb import assert_moved_exactly, maria_rows, pg_rows
from tests.faults.test_archive_faults import JOB, checkpointed, rng, wait_until  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def test_kill_9_at_a_random_moment_then_rerun(src: str, make_mariadb_db, spawn,
                                              rng: random.Random) -> None:  # noqa: F811
    arch = make_mariadb_db("arch")
    make_events(src)
    original = pg_rows(src)
    extra = ["--to", arch, "--to-table", "ev_archive"]
    proc = spawn(*archive_cli(src, *extra, "--chunk-size", "400", "--sleep", "0.01"))
    after_rows = rng.randrange(2, 18) * 400
    wait_until(f"{after_rows} rows checkpointed", lambda: checkpointed(src) >= after_rows, proc)
    time.sleep(rng.uniform(0, 0.05))  # anywhere in the next chunk(s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert 0 < checkpointed(src) < 10_000
    # no row lost even before the rerun (one chunk may be in both places until then)
    assert {r[0] for r in maria_rows(arch)} | set(pg_rows(src)) == set(original)
    out = run_etl(*archive_cli(src, *extra, "--json"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["summary"]["succeeded"] == report["summary"]["total_items"] == 10_000
    assert_moved_exactly(src, arch, original)
    assert scalar(src, "SELECT count(*) FROM etl.runs WHERE job_id = %s AND status = 'failed'",
                  (JOB,)) == 1  # the killed run, closed


def test_crash_between_the_archive_commit_and_the_source_delete(src: str, make_mariadb_db,
                                                                spawn) -> None:
    arch = make_mariadb_db("arch")
    make_events(src)
    original = pg_rows(src)
    extra = ["--to", arch, "--to-table", "ev_archive"]
    proc = spawn(*archive_cli(src, *extra, "--chunk-size", "1000", "--sleep", "0.3",
                              "--lock-timeout", "60s"))
    wait_until("the first chunk", lambda: checkpointed(src) >= 1000, proc)
    holder = psycopg.connect(src)
    holder.execute("SELECT 1 FROM etl.checkpoints WHERE job_id = %s FOR UPDATE", (JOB,))
    wait_until("a chunk committed in the archive but not in the source",
               lambda: len(maria_rows(arch)) > checkpointed(src), proc)
    done = checkpointed(src)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    holder.rollback()
    holder.close()
    deadline = time.monotonic() + 10  # the killed process's source transaction ends
    while scalar(src, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE "
                      "'etl:source:%' AND state <> 'idle'"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    in_both = {r[0] for r in maria_rows(arch)} & set(pg_rows(src))
    assert len(in_both) == len(maria_rows(arch)) - done == 1000
    out = run_etl(*archive_cli(src, *extra, "--json"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    # the rerun met the chunk's identical copies in MariaDB, kept them, deleted the rows
    assert report["metadata"]["outcomes"]["already_archived"] == 1000
    assert report["summary"]["succeeded"] == 10_000
    assert_moved_exactly(src, arch, original)
