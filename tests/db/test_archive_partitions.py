"""`etl archive` on a partitioned table: rows archived through the parent, and
`--drop-partitions` — whole partitions archived and dropped in one transaction each (lock,
check, INSERT … SELECT, DETACH, DROP, checkpoint), the rest walked by chunks. Real
PostgreSQL, real locks, a real crash inside a partition's transaction. No mocks."""

from __future__ import annotations

import json
import signal

import psycopg
import pytest

import etl
from tests.conftest import execute, fingerprint, run_etl, scalar
from tests.db.test_archive import union_fingerprint
from tests.faults.test_archive_faults import checkpointed, wait_until

pytestmark = pytest.mark.timeout(120)

JOB = "archive:public.ev"
# January to April 2024 have ~2,000 rows each; May has one row that does not match; June
# is empty (created ahead); a DEFAULT partition holds rows from 2023.
CUTOFF = "created_at < '2024-05-20'"


def make_partitioned(url: str) -> None:
    months = ["2024-01", "2024-02", "2024-03", "2024-04", "2024-05", "2024-06"]
    parts = "\n".join(
        f"CREATE TABLE ev_{m.replace('-', '_')} PARTITION OF ev FOR VALUES FROM ('{m}-01') "
        f"TO (('{m}-01'::date + interval '1 month'));" for m in months)
    execute(url, f"""
        CREATE TABLE ev (id bigint, created_at timestamptz NOT NULL, v text,
                         PRIMARY KEY (created_at, id)) PARTITION BY RANGE (created_at);
        {parts}
        CREATE TABLE ev_default PARTITION OF ev DEFAULT;
        INSERT INTO ev SELECT g, timestamptz '2024-01-01' + g * interval '1 hour' / 1.5, 'x' || g
        FROM generate_series(1, 5000) g;
        INSERT INTO ev VALUES (900001, '2024-05-25', 'late May'), (900002, '2023-06-01', 'old'),
                              (900003, '2023-07-01', 'old');
    """)


def tables(url: str) -> set[str]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


def test_rows_are_archived_through_the_parent(src: str) -> None:
    make_partitioned(src)
    original = fingerprint(src, "ev")
    result = etl.archive(source=src, table="ev", where=CUTOFF, to_table="ev_archive",
                         chunk_size=700)
    assert result.ok and result.succeeded == scalar(src, "SELECT count(*) FROM ev_archive")
    assert union_fingerprint([(src, "ev"), (src, "ev_archive")]) == original
    assert scalar(src, f"SELECT count(*) FROM ev WHERE {CUTOFF}") == 0
    assert {"ev_2024_01", "ev_2024_05", "ev_default"} <= tables(src)  # none dropped


def test_drop_partitions_moves_whole_partitions_and_walks_the_rest(src: str) -> None:
    make_partitioned(src)
    original = fingerprint(src, "ev")
    matching = scalar(src, f"SELECT count(*) FROM ev WHERE {CUTOFF}")
    january = scalar(src, "SELECT count(*) FROM ev_2024_01")
    out = run_etl("archive", "--source", src, "--table", "ev", "--where", CUTOFF,
                  "--to-table", "ev_archive", "--drop-partitions", "--json", "--no-progress")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    dropped = doc["metadata"]["partitions_dropped"]
    assert dropped == ["public.ev_2024_01", "public.ev_2024_02", "public.ev_2024_03",
                       "public.ev_2024_04"]
    assert doc["metadata"]["outcomes"]["partitions_dropped"] == 4
    assert doc["summary"]["succeeded"] == doc["summary"]["total_items"] == matching
    left = tables(src)
    assert not {"ev_2024_01", "ev_2024_04"} & left
    # May (a row that does not match), June (empty) and DEFAULT stay; their matching rows
    # (May's others, DEFAULT's 2023 rows) went by chunks
    assert {"ev_2024_05", "ev_2024_06", "ev_default"} <= left
    assert scalar(src, "SELECT count(*) FROM ev") == scalar(src, "SELECT count(*) FROM ev_2024_05") == 1
    assert scalar(src, "SELECT count(*) FROM ev_default") == 0
    assert union_fingerprint([(src, "ev"), (src, "ev_archive")]) == original
    assert scalar(src, "SELECT count(*) FROM ev_archive WHERE created_at >= '2024-01-01' "
                       "AND created_at < '2024-02-01'") == january
    # a rerun finds nothing left to drop or move
    again = etl.archive(source=src, table="ev", where=CUTOFF, to_table="ev_archive",
                        drop_partitions=True)
    assert again.ok and again.rows_this_run == 0
    assert again.to_dict()["metadata"]["partitions_dropped"] == []


def test_purge_drops_partitions(src: str) -> None:
    make_partitioned(src)
    keep = scalar(src, f"SELECT count(*) FROM ev WHERE NOT ({CUTOFF})")
    result = etl.archive(source=src, table="ev", where=CUTOFF, purge=True, drop_partitions=True)
    assert result.ok and result.to_dict()["metadata"]["outcomes"]["partitions_dropped"] == 4
    assert scalar(src, "SELECT count(*) FROM ev") == keep == 1
    assert "ev_2024_03" not in tables(src)


def test_a_table_someone_is_writing_to_is_walked_and_dropped_by_a_later_run(src: str) -> None:
    make_partitioned(src)
    original = fingerprint(src, "ev")
    holder = psycopg.connect(src)  # an application's open transaction writing to March
    holder.execute("INSERT INTO ev VALUES (800001, '2024-03-15', 'in flight')")
    try:
        # DETACH needs the parent to itself: each partition waits --lock-timeout, is rolled
        # back whole and left to the chunk walk, which does not wait for the writer
        result = etl.archive(source=src, table="ev", where=CUTOFF, to_table="ev_archive",
                             drop_partitions=True, lock_timeout="1s")
        assert result.ok and result.to_dict()["metadata"]["partitions_dropped"] == []
        assert scalar(src, f"SELECT count(*) FROM ev WHERE {CUTOFF}") == 0
        assert union_fingerprint([(src, "ev"), (src, "ev_archive")]) == original
    finally:
        holder.commit()
        holder.close()
    # the next run takes the row committed meanwhile and drops March with it; January,
    # February and April were emptied by the walk and their whole ranges match: dropped too
    nxt = etl.archive(source=src, table="ev", where=CUTOFF, to_table="ev_archive",
                      drop_partitions=True)
    assert nxt.to_dict()["metadata"]["partitions_dropped"] == [
        "public.ev_2024_01", "public.ev_2024_02", "public.ev_2024_03", "public.ev_2024_04"]
    assert nxt.rows_this_run == 1
    assert scalar(src, "SELECT count(*) FROM ev_archive WHERE id = 800001") == 1
    assert {"ev_2024_05", "ev_2024_06", "ev_default"} <= tables(src)  # June: ahead, kept


def test_a_crash_inside_a_partitions_transaction_leaves_it_whole(src: str, spawn) -> None:
    make_partitioned(src)
    original = fingerprint(src, "ev")
    # a first run of the job, so that it has a checkpoint row to hold
    stop = etl.archive(source=src, table="ev", where="created_at < '2023-06-15'",
                       to_table="ev_archive", job=JOB)
    assert stop.ok
    holder = psycopg.connect(src)
    holder.execute("SELECT 1 FROM etl.checkpoints WHERE job_id = %s FOR UPDATE", (JOB,))
    proc = spawn("archive", "--source", src, "--table", "ev", "--where", CUTOFF,
                 "--to-table", "ev_archive", "--drop-partitions", "--lock-timeout", "60s",
                 "--no-progress")

    def waiting() -> bool:
        return bool(scalar(src, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                                "'Lock' AND application_name LIKE %s", (f"etl:source:{proc.pid}:%",)))

    # the first partition's rows are copied and it is detached and dropped, all uncommitted,
    # when its transaction waits for the checkpoint row: kill -9 there
    wait_until("the partition's transaction waiting for the checkpoint", waiting, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    holder.rollback()
    holder.close()
    assert "ev_2024_01" in tables(src)  # rolled back whole: still there, not archived
    assert scalar(src, "SELECT count(*) FROM ev_archive WHERE created_at >= '2024-01-01'") == 0
    assert union_fingerprint([(src, "ev"), (src, "ev_archive")]) == original
    assert checkpointed(src) == stop.succeeded
    out = run_etl("archive", "--source", src, "--table", "ev", "--where", CUTOFF,
                  "--to-table", "ev_archive", "--drop-partitions", "--json", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["metadata"]["partitions_dropped"]) == 4
    assert union_fingerprint([(src, "ev"), (src, "ev_archive")]) == original
    assert scalar(src, f"SELECT count(*) FROM ev WHERE {CUTOFF}") == 0


@pytest.mark.parametrize(("extra", "says"), [
    (("--to-table", "ev_archive", "--no-delete"), "give one of them"),
    (("--to-dir", "/tmp/etl-never"), "same database"),
])
def test_usage_errors(src: str, extra: tuple[str, ...], says: str) -> None:
    make_partitioned(src)
    out = run_etl("archive", "--source", src, "--table", "ev", "--where", CUTOFF,
                  "--drop-partitions", *extra)
    assert out.returncode == 2 and says in out.stderr, out.stderr


def test_a_plain_table_is_refused(src: str) -> None:
    execute(src, "CREATE TABLE ev (id int PRIMARY KEY); INSERT INTO ev VALUES (1)")
    out = run_etl("archive", "--source", src, "--table", "ev", "--where", "true", "--purge",
                  "--drop-partitions")
    assert out.returncode == 2 and "not a partitioned table" in out.stderr, out.stderr
    assert scalar(src, "SELECT count(*) FROM ev") == 1
