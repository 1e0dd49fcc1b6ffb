"""`etl archive` on real PostgreSQL databases: same-database and cross-database moves,
--purge, --no-delete, --dry-run, --where with OR, composite and (timestamp, id) keys,
concurrent writers, row locks, --max-runtime, foreign keys and the job lock. No mocks."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

import etl
from etl.runner import StopFlag
from tests.conftest import execute, fingerprint, run_etl, scalar

pytestmark = pytest.mark.timeout(180)

ROWS = 20_000
# half the rows match, spread over the whole key order (created_at is scrambled by key)
WHERE = f"created_at < timestamptz '2024-01-01 00:00:00+00' + interval '{ROWS // 2} minutes'"


# -- data and checks ------------------------------------------------------------------------

def make_events(url: str, rows: int = ROWS, table: str = "ev") -> None:
    execute(url, f"""
        CREATE TABLE {table} (
            id         bigint PRIMARY KEY,
            created_at timestamptz NOT NULL,
            kind       text,
            amount     numeric(12, 2),
            doc        jsonb,
            tags       text[]
        );
        INSERT INTO {table}
        SELECT g, timestamptz '2024-01-01 00:00:00+00' + ((g * 7919) % {rows}) * interval '1 minute',
               (ARRAY['a', 'b', 'c'])[g % 3 + 1], g * 1.25,
               CASE WHEN g % 7 = 0 THEN NULL ELSE jsonb_build_object('g', g) END,
               ARRAY['t' || g % 5, NULL]
        FROM generate_series(1, {rows}) AS g;
        ANALYZE {table};
    """)


def row_hashes(url: str, table: str) -> list[str]:
    ident = sql.Identifier(*table.split("."))
    with psycopg.connect(url, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            sql.SQL("SELECT md5(t::text) FROM {} AS t").format(ident))]


def union_fingerprint(parts: list[tuple[str, str]]) -> tuple[int, str | None, int]:
    """conftest.fingerprint of the union (with repeats) of several tables' rows."""
    hashes = sorted(h for url, table in parts for h in row_hashes(url, table))
    digest = hashlib.md5("".join(hashes).encode()).hexdigest() if hashes else None
    return len(hashes), digest, len(set(hashes))


def keys(url: str, table: str, key: str = "id") -> list[Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [r[0] for r in conn.execute(sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(key), sql.Identifier(*table.split("."))))]


def assert_moved_exactly(src: str, arch_url: str, original: tuple, *, table: str = "ev",
                         archive: str = "ev_archive", where: str = WHERE,
                         key: str = "id") -> None:
    """Source ∪ archive is the original, row for row; no row in both, none twice in the
    archive, every archived row matches --where and none left in the source does."""
    assert union_fingerprint([(src, table), (arch_url, archive)]) == original
    src_keys, arch_keys = keys(src, table, key), keys(arch_url, archive, key)
    assert len(arch_keys) == len(set(arch_keys)), "a row is twice in the archive"
    assert not set(src_keys) & set(arch_keys), "a row is in both the source and the archive"
    assert scalar(src, f"SELECT count(*) FROM {table} WHERE {where}") == 0
    assert scalar(arch_url, f"SELECT count(*) FROM {archive} WHERE NOT ({where})") == 0


class StopAfter:
    """A progress object that stops the run after ``n`` chunks (at a chunk boundary)."""

    def __init__(self, stop: StopFlag, n: int = 1) -> None:
        self.stop, self.left = stop, n

    def start(self, label: str, done: int, total: int, exact: bool) -> None:
        pass

    def advance(self, rows: int, nbytes: int) -> None:
        self.left -= 1
        if self.left <= 0:
            self.stop.set("test: enough chunks")

    def finish(self, message: str) -> None:
        pass


def snapshot(url: str) -> tuple:
    """Schemas, tables and every table's fingerprint: what a dry run must leave alone."""
    with psycopg.connect(url, autocommit=True) as conn:
        schemas = [r[0] for r in conn.execute(
            "SELECT nspname FROM pg_namespace ORDER BY 1")]
        tables = [f"{s}.{t}" for s, t in conn.execute(
            "SELECT schemaname, tablename FROM pg_tables WHERE schemaname NOT IN "
            "('pg_catalog', 'information_schema') ORDER BY 1, 2")]
    return schemas, tables, [fingerprint(url, t) for t in tables]


def archive_cli(src: str, *extra: str, where: str = WHERE,
                table: str = "ev") -> list[str]:
    return ["archive", "--source", src, "--table", table, "--where", where, "--no-progress",
            *extra]


# -- the two destinations -----------------------------------------------------------------------

def test_same_database_move_cli(src: str) -> None:
    make_events(src)
    original = fingerprint(src, "ev")
    matching = scalar(src, f"SELECT count(*) FROM ev WHERE {WHERE}")
    out = run_etl(*archive_cli(src, "--to-table", "ev_archive", "--chunk-size", "3000",
                               "--json"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["job_id"] == "archive:public.ev" and report["job_type"] == "archive"
    assert report["status"] == "completed"
    assert report["summary"]["succeeded"] == report["summary"]["total_items"] == matching
    assert report["metadata"]["outcomes"] == {"archived": matching, "already_archived": 0}
    assert report["metadata"]["num_chunks"] == -(-matching // 3000)
    assert 0 < report["metadata"]["longest_transaction_seconds"] < 30
    assert_moved_exactly(src, src, original)
    # the archive table was created from the source's definition, primary key included
    assert scalar(src, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE "
                       "attrelid = 'ev_archive'::regclass AND attname = 'amount'") == "numeric(12,2)"
    assert scalar(src, "SELECT count(*) FROM pg_index WHERE indrelid = 'ev_archive'::regclass "
                       "AND indisprimary") == 1
    # the checkpoint lives in the source database; a new run finds nothing more to move
    again = run_etl(*archive_cli(src, "--to-table", "ev_archive", "--json"))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["summary"]["succeeded"] == 0
    assert_moved_exactly(src, src, original)


def test_cross_database_move(src: str, dst: str) -> None:
    make_events(src)
    original = fingerprint(src, "ev")
    result = etl.archive(source=src, to=dst, to_table="cold.ev", table="ev", where=WHERE,
                         chunk_size=2500)
    assert result.status is etl.Status.COMPLETED, result.message
    doc = result.to_dict()
    assert doc["job_type"] == "archive" and doc["metadata"]["target"].endswith(dst.rsplit("/")[-1])
    assert doc["summary"]["succeeded"] == ROWS // 2
    assert doc["metadata"]["longest_transaction_seconds"] > 0
    assert_moved_exactly(src, dst, original, archive="cold.ev")
    # state store in the source (the database being deleted from), none in the archive's
    assert scalar(src, "SELECT count(*) FROM etl.checkpoints WHERE job_id = 'archive:public.ev'") == 1
    assert scalar(dst, "SELECT to_regclass('etl.checkpoints')") is None


def test_rows_that_begin_to_match_are_taken_by_the_next_run(src: str) -> None:
    make_events(src, 5_000)
    original = fingerprint(src, "ev")
    where = "kind = 'a'"
    assert etl.archive(source=src, table="ev", where=where, to_table="ev_archive").ok
    with psycopg.connect(src, autocommit=True) as conn:
        flipped = conn.execute("UPDATE ev SET kind = 'a' WHERE id % 10 = 0 AND kind <> 'a'"
                               ).rowcount
    assert flipped > 0
    changed = union_fingerprint([(src, "ev"), (src, "ev_archive")])
    result = etl.archive(source=src, table="ev", where=where, to_table="ev_archive")
    assert result.ok and result.succeeded == flipped  # a new walk from the first key
    assert scalar(src, "SELECT count(*) FROM ev WHERE kind = 'a'") == 0
    assert union_fingerprint([(src, "ev"), (src, "ev_archive")]) == changed
    assert changed[0] == original[0]


def test_sessions_run_in_utc(src: str) -> None:
    # the database's own default time zone is far from UTC: a literal without a zone in
    # --where must still mean UTC (as the README promises)
    execute(src, f"""ALTER DATABASE "{src.rsplit('/', 1)[1]}" SET timezone TO 'Pacific/Auckland';
        CREATE TABLE ev (id int PRIMARY KEY, created_at timestamptz NOT NULL);
        INSERT INTO ev SELECT g, timestamptz '2024-01-07 00:00+00' + g * interval '1 hour'
        FROM generate_series(1, 48) AS g;""")
    assert scalar(src, "SHOW timezone") == "Pacific/Auckland"
    result = etl.archive(source=src, table="ev", where="created_at < '2024-01-08 00:00'",
                         to_table="ev_archive")
    assert result.ok and result.succeeded == 23  # 01:00 … 23:00 UTC on the 7th
    assert scalar(src, "SELECT min(id) FROM ev") == 24
    # --timezone reads the same literal in New York (05:00 UTC on the 8th, winter time): the
    # next five hours go too; the archive table's job keeps its own sessions in that zone
    out = run_etl("archive", "--source", src, "--table", "ev", "--where",
                  "created_at < '2024-01-08 00:00'", "--to-table", "ev_archive",
                  "--timezone", "America/New_York", "--no-progress", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["summary"]["succeeded"] == 5  # 00:00 … 04:00 UTC
    assert scalar(src, "SELECT min(id) FROM ev") == 29
    assert scalar(src, "SELECT args->>'timezone' FROM etl.jobs WHERE job_id = 'archive:public.ev'") \
        == "America/New_York"


# -- --purge, --no-delete, --dry-run -------------------------------------------------------------

def test_purge_deletes_only_the_matching_rows(src: str) -> None:
    make_events(src)
    keep = fingerprint(src, "ev")
    expected = scalar(src, f"SELECT md5(string_agg(md5(t::text), '' ORDER BY md5(t::text))) "
                           f"FROM ev AS t WHERE NOT ({WHERE})")
    out = run_etl(*archive_cli(src, "--purge", "--chunk-size", "4000", "--json"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["summary"]["succeeded"] == ROWS // 2
    assert report["metadata"]["outcomes"] == {"deleted": ROWS // 2}
    assert report["metadata"]["target"] is None
    assert fingerprint(src, "ev")[0] == keep[0] - ROWS // 2
    assert fingerprint(src, "ev")[1] == expected
    assert scalar(src, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'ev%'") == 1


@pytest.mark.parametrize("where_to", ["same", "other"])
def test_no_delete_archives_once_and_reruns_do_not_duplicate(src: str, dst: str,
                                                             where_to: str) -> None:
    make_events(src)
    original = fingerprint(src, "ev")
    arch = src if where_to == "same" else dst
    kw: dict[str, Any] = {"to": None if where_to == "same" else dst}
    first = etl.archive(source=src, table="ev", where=WHERE, to_table="ev_copy",
                        no_delete=True, chunk_size=3000, **kw)
    assert first.ok and first.succeeded == ROWS // 2
    assert fingerprint(src, "ev") == original  # nothing deleted
    archived = fingerprint(arch, "ev_copy")
    assert archived[0] == archived[2] == ROWS // 2
    # a rerun goes on after the last key: nothing new; --restart walks again, keeps the copies
    again = etl.archive(source=src, table="ev", where=WHERE, to_table="ev_copy",
                        no_delete=True, **kw)
    assert again.ok and again.rows_this_run == 0
    restarted = etl.archive(source=src, table="ev", where=WHERE, to_table="ev_copy",
                            no_delete=True, restart=True, **kw)
    assert restarted.ok and restarted.succeeded == 0 and restarted.skipped == ROWS // 2
    assert restarted.to_dict()["metadata"]["outcomes"]["already_archived"] == ROWS // 2
    assert fingerprint(arch, "ev_copy") == archived
    # a later real move finds its rows already archived (identical) and just deletes them
    moved = etl.archive(source=src, table="ev", where=WHERE, to_table="ev_copy",
                        job="move-after-copy", **kw)
    assert moved.ok and moved.succeeded == ROWS // 2
    assert moved.to_dict()["metadata"]["outcomes"]["already_archived"] == ROWS // 2
    assert_moved_exactly(src, arch, original, archive="ev_copy")


def test_a_different_row_under_an_archived_key_stops_the_chunk(src: str) -> None:
    make_events(src, 3_000)
    execute(src, "CREATE TABLE ev_archive (LIKE ev INCLUDING ALL); "
                 "INSERT INTO ev_archive SELECT * FROM ev WHERE id = 4; "
                 "UPDATE ev_archive SET kind = 'changed'")
    before = fingerprint(src, "ev")
    result = etl.archive(source=src, table="ev", where="id <= 10", to_table="ev_archive")
    assert result.status is etl.Status.FAILED
    assert "already holds with different values" in (result.message or "")
    assert fingerprint(src, "ev") == before  # rolled back: nothing deleted
    assert scalar(src, "SELECT count(*) FROM ev_archive") == 1


@pytest.mark.parametrize("where_to", ["same", "other"])
def test_dry_run_writes_nothing(src: str, dst: str, where_to: str) -> None:
    make_events(src)
    before_src, before_dst = snapshot(src), snapshot(dst)
    extra = ["--to-table", "ev_archive"] + ([] if where_to == "same" else ["--to", dst])
    out = run_etl(*archive_cli(src, *extra, "--chunk-size", "3000", "--dry-run"))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"rows matching: {ROWS // 2:,} in {-(-(ROWS // 2) // 3000)} chunk(s)" in text
    assert "DELETE FROM \"public\".\"ev\"" in text and "RETURNING" in text
    assert "EXPLAIN of the first chunk:" in text and "Delete on ev" in text
    assert "CREATE TABLE \"public\".\"ev_archive\"" in text
    assert text.rstrip().endswith("dry run: nothing was written")
    assert snapshot(src) == before_src and snapshot(dst) == before_dst
    purge = run_etl(*archive_cli(src, "--purge", "--dry-run", "--json"))
    assert purge.returncode == 0, purge.stderr
    doc = json.loads(purge.stdout)["metadata"]
    assert doc["dry_run"] and doc["estimated_rows"] == ROWS // 2 and doc["explain"]
    assert snapshot(src) == before_src


# -- --where, keys --------------------------------------------------------------------------------

def test_where_with_or_cannot_leak_out_of_the_chunk(src: str) -> None:
    make_events(src, 6_000)
    where = "kind = 'a' OR kind LIKE 'b%'"  # (a % in --where is taken as it is)
    first_keys = sorted(scalar(src, f"SELECT array_agg(id) FROM ev WHERE {where}"))[:500]
    stop = StopFlag()
    result = etl.archive(source=src, table="ev", where=where, to_table="ev_archive",
                         chunk_size=500, stop=stop, progress=StopAfter(stop))
    assert result.status is etl.Status.STOPPED and result.exit_code == 4
    # exactly the first chunk's 500 matching rows moved: an OR outside parentheses would have
    # taken every 'b' row of the table in the first chunk's DELETE
    assert sorted(keys(src, "ev_archive")) == first_keys
    assert scalar(src, "SELECT count(*) FROM ev_archive WHERE kind NOT IN ('a', 'b')") == 0
    assert scalar(src, "SELECT count(*) FROM ev") == 6_000 - 500
    rest = etl.archive(source=src, table="ev", where=where, to_table="ev_archive")
    assert rest.ok
    assert scalar(src, "SELECT count(*) FROM ev WHERE kind IN ('a', 'b')") == 0
    assert scalar(src, "SELECT count(*) FROM ev") == 2_000


@pytest.mark.parametrize("where_to", ["same", "other"])
def test_composite_key(src: str, dst: str, where_to: str) -> None:
    execute(src, """
        CREATE TABLE orders (tenant int, id int, placed date NOT NULL, total numeric(10, 2),
                             PRIMARY KEY (tenant, id));
        INSERT INTO orders SELECT t, i, date '2023-01-01' + (t * 31 + i) % 700, i * 0.5
        FROM generate_series(1, 40) AS t, generate_series(1, 500) AS i;
    """)
    where = "placed < date '2024-01-01'"
    original = fingerprint(src, "orders")
    arch = src if where_to == "same" else dst
    result = etl.archive(source=src, table="orders", where=where, to_table="orders_archive",
                         to=None if where_to == "same" else dst, chunk_size=777)
    assert result.ok and result.to_dict()["metadata"]["key"] == ["tenant", "id"]
    assert result.succeeded == scalar(arch, "SELECT count(*) FROM orders_archive")
    assert_moved_exactly(src, arch, original, table="orders", archive="orders_archive",
                         where=where, key="(tenant, id)")


def test_timestamp_and_id_key(src: str) -> None:
    # many rows share each timestamp: chunks must cut between rows of one timestamp
    execute(src, """
        CREATE TABLE log (at timestamptz, id int, msg text, PRIMARY KEY (at, id));
        INSERT INTO log SELECT timestamptz '2024-03-01 00:00+00' + (g / 37) * interval '1 hour',
                               g, 'm' || g
        FROM generate_series(1, 20000) AS g;
    """)
    where = "at < timestamptz '2024-03-10 00:00+00'"
    original = fingerprint(src, "log")
    matching = scalar(src, f"SELECT count(*) FROM log WHERE {where}")
    result = etl.archive(source=src, table="log", where=where, to_table="log_archive",
                         chunk_size=1000)
    assert result.ok and result.succeeded == matching
    assert result.to_dict()["metadata"]["key"] == ["at", "id"]
    assert result.to_dict()["last_checkpoint"]["last_key"][1] == \
        scalar(src, "SELECT max(id) FROM log_archive WHERE at = (SELECT max(at) FROM log_archive)")
    assert_moved_exactly(src, src, original, table="log", archive="log_archive", where=where,
                         key="(at, id)")


# -- live tables ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("where_to", ["same", "other"])
def test_concurrent_inserts_and_updates(src: str, dst: str, where_to: str) -> None:
    """Writers insert matching and non-matching rows and flip rows into and out of the
    predicate while the job runs. Every row ends in exactly one place with its last
    written version, and every archived row matched when it moved."""
    execute(src, """
        CREATE TABLE jobs (id bigint PRIMARY KEY, status text NOT NULL, v int NOT NULL);
        INSERT INTO jobs SELECT g, CASE WHEN g % 2 = 0 THEN 'expired' ELSE 'live' END, 0
        FROM generate_series(1, 20000) AS g;
    """)
    where = "status = 'expired'"
    arch = src if where_to == "same" else dst
    final: dict[int, tuple[str, int]] = {g: ("expired" if g % 2 == 0 else "live", 0)
                                         for g in range(1, 20_001)}
    done = threading.Event()
    errors: list[BaseException] = []
    hits = [0]  # updates that found their row

    def writer() -> None:
        rng = random.Random(7)
        next_id, version = 20_001, 0
        try:
            with psycopg.connect(src, autocommit=True) as conn:
                while not done.is_set():
                    version += 1
                    status = rng.choice(["expired", "live"])
                    if rng.random() < 0.4:  # a new row, anywhere in the key order
                        new_id = next_id if rng.random() < 0.5 else -next_id
                        next_id += 1
                        conn.execute("INSERT INTO jobs VALUES (%s, %s, %s)",
                                     (new_id, status, version))
                        final[new_id] = (status, version)
                    else:  # flip a row into or out of the predicate (if it is still there)
                        rid = rng.randrange(1, 20_001)
                        cur = conn.execute("UPDATE jobs SET status = %s, v = %s WHERE id = %s",
                                           (status, version, rid))
                        if cur.rowcount == 1:
                            final[rid] = (status, version)
                            hits[0] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        result = etl.archive(source=src, table="jobs", where=where, to_table="jobs_archive",
                             to=None if where_to == "same" else dst, chunk_size=500,
                             sleep=0.01, lock_timeout=5)
    finally:
        done.set()
        thread.join()
    assert not errors, errors
    assert result.ok, result.message
    assert result.succeeded > 5_000
    assert hits[0] > 100 and len(final) > 20_100  # the writer really ran alongside
    with psycopg.connect(src, autocommit=True) as s, psycopg.connect(arch, autocommit=True) as a:
        in_src = {r[0]: (r[1], r[2]) for r in s.execute("SELECT id, status, v FROM jobs")}
        in_arch = {r[0]: (r[1], r[2]) for r in a.execute("SELECT id, status, v FROM jobs_archive")}
        assert a.execute("SELECT count(*) FROM jobs_archive").fetchone()[0] == len(in_arch)
    assert not set(in_src) & set(in_arch), "a row is in both"
    assert set(in_src) | set(in_arch) == set(final), "a row was lost"
    assert all(status == "expired" for status, _ in in_arch.values())
    # the archive holds each moved row's last version: no update was lost in the move
    assert {**in_src, **in_arch} == final


def test_row_lock_waits_at_most_the_lock_timeout_and_retries(src: str, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="etl.retry")
    make_events(src, 5_000)
    original = fingerprint(src, "ev")
    locked = scalar(src, f"SELECT min(id) FROM ev WHERE {WHERE}")
    holder = psycopg.connect(src)
    holder.execute("SELECT * FROM ev WHERE id = %s FOR UPDATE", (locked,))
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.update(result=etl.archive(
        source=src, table="ev", where=WHERE, to_table="ev_archive", chunk_size=1000,
        lock_timeout="200ms", retries=30, retry_max_wait=0.3)))
    t0 = time.monotonic()
    thread.start()
    try:
        # the archive table appears, then the first chunk keeps failing on the lock
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and scalar(
                src, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'") == 0:
            time.sleep(0.02)
        time.sleep(1.5)
        # never a half-committed chunk: nothing moved while one of its rows is locked
        assert scalar(src, "SELECT count(*) FROM ev") == 5_000
        assert scalar(src, "SELECT count(*) FROM ev_archive") == 0
        waits = scalar(src, "SELECT max(now() - state_change) FROM pg_stat_activity "
                            "WHERE wait_event_type = 'Lock'")
        assert waits is None or waits.total_seconds() < 1.0  # at most the lock timeout, each
    finally:
        holder.rollback()
        holder.close()
    thread.join(60)
    result = box["result"]
    assert result.ok, result.message
    meta = result.to_dict()["metadata"]
    assert meta["retry_attempts"] >= 2 and meta["retries_by_reason"].get("55P03", 0) >= 2
    logged = [r.getMessage() for r in caplog.records if "55P03" in r.getMessage()]
    assert len(logged) == meta["retries_by_reason"]["55P03"]  # each retry is logged
    assert "chunk 1 failed (transient, 55P03" in logged[0]
    assert time.monotonic() - t0 > 1.5
    assert_moved_exactly(src, src, original)


def test_max_runtime_stops_with_exit_4_and_the_next_run_finishes(src: str) -> None:
    make_events(src)
    original = fingerprint(src, "ev")
    out = run_etl(*archive_cli(src, "--to-table", "ev_archive", "--chunk-size", "500",
                               "--sleep", "0.05", "--max-runtime", "0.5s", "--json"))
    assert out.returncode == 4, out.stderr
    report = json.loads(out.stdout)
    assert report["status"] == "stopped" and "--max-runtime" in report["message"]
    moved = report["summary"]["succeeded"]
    assert 0 < moved < ROWS // 2
    assert scalar(src, "SELECT count(*) FROM ev_archive") == moved
    rest = run_etl(*archive_cli(src, "--to-table", "ev_archive", "--chunk-size", "5000",
                                "--json"))
    assert rest.returncode == 0, rest.stderr
    doc = json.loads(rest.stdout)
    assert doc["summary"]["succeeded"] == ROWS // 2 and doc["metadata"]["rows_this_run"] == \
        ROWS // 2 - moved
    assert_moved_exactly(src, src, original)


@pytest.mark.parametrize("where_to", ["same", "other"])
def test_foreign_key_refuses_the_delete(src: str, dst: str, where_to: str) -> None:
    make_events(src, 6_000)
    original = fingerprint(src, "ev")
    # a referenced row in the second chunk: the first chunk moves, the second is refused
    ref = scalar(src, f"SELECT id FROM ev WHERE {WHERE} ORDER BY id OFFSET 1500 LIMIT 1")
    execute(src, f"""CREATE TABLE child (id int PRIMARY KEY, ev_id bigint
                         CONSTRAINT child_ev_fk REFERENCES ev (id));
                     INSERT INTO child VALUES (1, {ref})""")
    # and a row trigger on the table: it fires for each deleted row, in the chunk's
    # transaction, so a refused chunk leaves no trace of it either
    execute(src, """CREATE TABLE ev_deleted (id bigint PRIMARY KEY);
        CREATE FUNCTION ev_log() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN INSERT INTO ev_deleted VALUES (OLD.id); RETURN OLD; END $$;
        CREATE TRIGGER ev_log AFTER DELETE ON ev FOR EACH ROW EXECUTE FUNCTION ev_log();""")
    arch = src if where_to == "same" else dst
    extra = ["--to-table", "ev_archive"] + ([] if where_to == "same" else ["--to", dst])
    out = run_etl(*archive_cli(src, *extra, "--chunk-size", "1000", "--json"))
    assert out.returncode == 1, out.stderr
    line = [x for x in out.stderr.splitlines() if x.startswith("etl: error:")]
    assert len(line) == 1 and "child_ev_fk" in line[0] and "public.child" in line[0], out.stderr
    assert "rows stay in public.ev" in line[0] and "retry" not in out.stderr
    report = json.loads(out.stdout)
    assert report["status"] == "failed" and report["errors"][0]["category"] == "fatal"
    assert report["summary"]["succeeded"] == 1000
    assert scalar(arch, "SELECT count(*) FROM ev_archive") == 1000  # the refused chunk: none
    assert scalar(src, "SELECT count(*) FROM ev") == 5000
    assert scalar(src, "SELECT count(*) FROM ev_deleted") == 1000  # the trigger's too
    execute(src, "DROP TABLE child")
    rerun = run_etl(*archive_cli(src, *extra, "--chunk-size", "1000", "--json"))
    assert rerun.returncode == 0, rerun.stderr
    doc = json.loads(rerun.stdout)  # (every row matches: 6,000 rows span 6,000 minutes)
    assert doc["summary"]["succeeded"] == 6000 and doc["metadata"]["rows_this_run"] == 5000
    assert_moved_exactly(src, arch, original)
    assert scalar(src, "SELECT count(*) FROM ev_deleted") == 6000  # once per row moved


def test_second_concurrent_run_exits_75(src: str, spawn) -> None:
    make_events(src)
    first = spawn(*archive_cli(src, "--to-table", "ev_archive", "--chunk-size", "200",
                               "--sleep", "0.1"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if scalar(src, "SELECT to_regclass('etl.runs')") and scalar(
                src, "SELECT count(*) FROM etl.runs WHERE status = 'running'"):
            break
        assert first.poll() is None, first.communicate()
        time.sleep(0.02)
    second = run_etl(*archive_cli(src, "--to-table", "ev_archive"))
    assert second.returncode == 75, second.stderr
    assert "already running" in second.stderr and "archive:public.ev" in second.stderr
    assert second.stdout == ""
    first.terminate()  # SIGTERM: stops at a chunk boundary, resumable
    assert first.wait(30) == 4


def test_usage_errors_exit_2(src: str) -> None:
    make_events(src, 10)
    for args, words in [
        (["archive", "--source", src, "--table", "ev", "--where", "true"], "--to-table"),
        (["archive", "--source", src, "--table", "ev", "--where", "true", "--purge",
          "--no-delete"], "give one of them"),
        (["archive", "--source", src, "--table", "ev", "--where", "nope(", "--purge"],
         "--where"),
        (["archive", "--source", src, "--table", "ev", "--where", "true", "--to-table", "ev"],
         "the table being archived"),
        (["archive", "--source", src, "--table", "ev", "--where", "true", "--purge",
          "--timezone", "Berlin"], "did you mean Europe/Berlin"),
        (["archive", "--source", src, "--table", "ev", "--where", "true", "--purge",
          "--timezone", "+02:00"], "IANA name"),
    ]:
        out = run_etl(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert words in out.stderr, out.stderr
    assert scalar(src, "SELECT count(*) FROM ev") == 10


def test_library_surface() -> None:
    import etl.archive.run  # noqa: F401 - importing the package must not shadow the function

    assert callable(etl.archive) and etl.archive.__name__ == "archive"
    assert "archive" in etl.__all__
    with pytest.raises(etl.UsageError):
        etl.archive(source="postgresql://x@127.0.0.1:1/none", table="t", where=" ", purge=True)


def test_another_database_needs_a_unique_key_on_the_archive(src: str, dst: str) -> None:
    make_events(src, 100)
    execute(dst, "CREATE TABLE ev_archive (id bigint, created_at timestamptz, kind text, "
                 "amount numeric(12, 2), doc jsonb, tags text[])")
    out = run_etl(*archive_cli(src, "--to", dst, "--to-table", "ev_archive"))
    assert out.returncode == 2, out.stderr
    assert "no primary key or unique index" in out.stderr and "ADD PRIMARY KEY (id)" in out.stderr
    missing = run_etl(*archive_cli(src, "--to", dst, "--to-table", "other", "--no-create"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr, missing.stderr
    assert scalar(src, "SELECT count(*) FROM ev") == 100
    assert scalar(dst, "SELECT count(*) FROM ev_archive") == 0
    assert scalar(dst, "SELECT to_regclass('other')") is None
