"""`etl prune`: old runs, handled requests (and, when asked, dead letters) go; every job's
latest run, its pause state and its checkpoint stay."""

from __future__ import annotations

import json

import etl
from tests.conftest import execute, run_etl, scalar


def test_prune_keeps_the_last_checkpoint_of_every_job(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE a (id int PRIMARY KEY, n int CHECK (n >= 0));"
                 "INSERT INTO a SELECT g, g FROM generate_series(1, 50) g;"
                 "CREATE TABLE b (id int PRIMARY KEY); INSERT INTO b SELECT generate_series(1, 5)")
    execute(dst, "CREATE TABLE a (id int PRIMARY KEY, n int CHECK (n > 1))")  # 1 dead letter
    for _ in range(3):  # three runs of each job (upsert: reruns change nothing)
        etl.copy(source=src, target=dst, table="a", mode="upsert")
        etl.copy(source=src, target=dst, table="b", mode="upsert")
    etl.pause("copy:public.b", state=dst)
    assert etl.copy(source=src, target=dst, table="b").status is etl.Status.PAUSED
    before = {r[0]: r[1:] for r in _checkpoints(dst)}
    letters = scalar(dst, "SELECT count(*) FROM etl.dead_letters")
    assert letters >= 1
    # everything is 40 days old
    execute(dst, "UPDATE etl.runs SET started_at = started_at - interval '40 days';"
                 "UPDATE etl.control_requests SET requested_at = requested_at - interval '40 days';"
                 "UPDATE etl.dead_letters SET created_at = created_at - interval '40 days'")
    dry = run_etl("prune", "--older-than", "30d", "--state", dst, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["runs"] == 5  # 3 of a, 4 of b: all but the latest of each
    assert scalar(dst, "SELECT count(*) FROM etl.runs") == 7
    out = run_etl("prune", "--older-than", "30d", "--state", dst)
    assert out.returncode == 0 and "deleted 5 run(s)" in out.stdout, out.stdout
    assert scalar(dst, "SELECT count(*) FROM etl.runs") == 2
    assert {r[0]: r[1:] for r in _checkpoints(dst)} == before  # checkpoints untouched
    assert scalar(dst, "SELECT count(*) FROM etl.dead_letters") == letters  # kept by default
    # b is still paused (its latest pause request stays), a still resumes as before
    assert etl.copy(source=src, target=dst, table="b").status is etl.Status.PAUSED
    etl.resume("copy:public.b", state=dst)
    assert etl.copy(source=src, target=dst, table="b", mode="upsert").ok
    got = etl.prune(older_than="30d", state=dst, dead_letters=True)
    assert got.dead_letters == letters
    assert scalar(dst, "SELECT count(*) FROM etl.dead_letters") == 0
    bad = run_etl("prune", "--older-than", "soon", "--state", dst)
    assert bad.returncode == 2 and "--older-than" in bad.stderr


def _checkpoints(url: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT job_id, chunk_index, last_key::text, processed, finished "
                            "FROM etl.checkpoints ORDER BY job_id").fetchall()
