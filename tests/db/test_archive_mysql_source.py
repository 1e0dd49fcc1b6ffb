"""`etl archive --source mysql://…`: a real MariaDB table archived into a table of the same
database, or purged, one MySQL transaction a chunk (lock, INSERT … SELECT, DELETE), the
checkpoint in a PostgreSQL state store. Real servers, real locks, a real kill -9. No mocks."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter

import pymysql
import pytest
from sqlalchemy.engine import make_url

import etl
from etl.runner import StopFlag
from tests.conftest import run_etl, scalar
from tests.db.test_archive import StopAfter

pytestmark = pytest.mark.timeout(180)

ROWS = 6_000
WHERE = "created_at < '2024-01-03' OR kind = 'x'"  # an OR: must not leak out of the chunk


def maria(url: str) -> pymysql.Connection:
    u = make_url(url)
    return pymysql.connect(host=u.host, port=u.port or 3306, user=u.username,
                           password=u.password or "", database=u.database, autocommit=True)


def run_sql(url: str, *statements: str) -> list[tuple]:
    with maria(url) as conn, conn.cursor() as cur:
        for stmt in statements:
            cur.execute(stmt)
        return list(cur.fetchall())


def make_table(url: str, rows: int = ROWS) -> None:
    run_sql(url, """CREATE TABLE ev (id bigint PRIMARY KEY, created_at datetime(6) NOT NULL,
                                     kind varchar(10), amount decimal(12,2), doc json)""",
            f"""INSERT INTO ev SELECT seq, '2024-01-01' + INTERVAL ((seq * 7919) % {rows}) MINUTE,
                       ELT(seq % 4 + 1, 'a', 'b', 'c', 'x'), seq * 1.25,
                       IF(seq % 7 = 0, NULL, JSON_OBJECT('g', seq)) FROM seq_1_to_{rows}""")


def rows_of(url: str, table: str) -> list[tuple]:
    return run_sql(url, f"SELECT id, created_at, kind, amount, doc FROM `{table}`")


def archived(url: str) -> int:
    """Rows in the archive table (0 before it exists)."""
    try:
        return run_sql(url, "SELECT count(*) FROM ev_archive")[0][0]
    except pymysql.err.ProgrammingError:
        return 0


def assert_moved_exactly(url: str, original: list[tuple], where: str = WHERE) -> None:
    left, archived = rows_of(url, "ev"), rows_of(url, "ev_archive")
    assert Counter(left + archived) == Counter(original), "a row is lost, changed or twice"
    assert not {r[0] for r in left} & {r[0] for r in archived}
    assert run_sql(url, f"SELECT count(*) FROM ev WHERE {where}")[0][0] == 0
    assert run_sql(url, f"SELECT count(*) FROM ev_archive WHERE NOT ({where})")[0][0] == 0


def cli(url: str, state: str, *extra: str, where: str = WHERE) -> list[str]:
    return ["archive", "--source", url, "--table", "ev", "--where", where, "--state", state,
            "--no-progress", *extra]


def test_move_resumes_and_is_exact(make_mariadb_db, src: str) -> None:
    url = make_mariadb_db("msrc")
    make_table(url)
    original = rows_of(url, "ev")
    stop = StopFlag()
    first = etl.archive(source=url, table="ev", where=WHERE, to_table="ev_archive", state=src,
                        chunk_size=500, progress=StopAfter(stop, 2), stop=stop)
    assert first.status is etl.Status.STOPPED and first.succeeded == 1000
    out = run_etl(*cli(url, src, "--to-table", "ev_archive", "--chunk-size", "500", "--json"))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    matching = sum(1 for r in original if r[1].day < 3 or r[2] == "x")
    assert doc["summary"]["succeeded"] == doc["summary"]["total_items"] == matching
    assert doc["metadata"]["outcomes"] == {"archived": matching, "already_archived": 0}
    assert doc["job_id"] == "archive:ev"
    assert_moved_exactly(url, original)
    ddl = run_sql(url, "SHOW CREATE TABLE ev_archive")[0][1]
    assert "PRIMARY KEY (`id`)" in ddl  # created LIKE the source


def test_purge_and_composite_key(make_mariadb_db, src: str) -> None:
    url = make_mariadb_db("msrc")
    run_sql(url, "CREATE TABLE ev (day date, seq int, v int, PRIMARY KEY (day, seq))",
            "INSERT INTO ev SELECT '2024-01-01' + INTERVAL (seq DIV 100) DAY, seq % 100, seq "
            "FROM seq_0_to_4999")
    result = etl.archive(source=url, table="ev", where="v % 3 = 0", purge=True, state=src,
                         chunk_size=333)
    assert result.ok and result.succeeded == 1667
    assert result.to_dict()["metadata"]["outcomes"] == {"deleted": 1667}
    assert run_sql(url, "SELECT count(*), sum(v % 3 = 0) FROM ev")[0] == (3333, 0)


def test_no_delete_then_move_keeps_identical_rows_and_stops_on_different_ones(
        make_mariadb_db, src: str) -> None:
    url = make_mariadb_db("msrc")
    make_table(url, 1000)
    original = rows_of(url, "ev")
    copied = etl.archive(source=url, table="ev", where="id <= 300", to_table="ev_archive",
                         no_delete=True, state=src, job="copy-first")
    assert copied.ok and copied.succeeded == 300 and len(rows_of(url, "ev")) == 1000
    again = etl.archive(source=url, table="ev", where="id <= 300", to_table="ev_archive",
                        no_delete=True, state=src, job="copy-first", restart=True)
    assert again.to_dict()["metadata"]["outcomes"] == {"archived": 0, "already_archived": 300}
    moved = etl.archive(source=url, table="ev", where="id <= 500", to_table="ev_archive",
                        state=src, chunk_size=200)
    assert moved.ok and moved.to_dict()["metadata"]["outcomes"] == \
        {"archived": 200, "already_archived": 300}
    assert_moved_exactly(url, original, where="id <= 500")
    run_sql(url, "INSERT INTO ev_archive VALUES (600, '2020-01-01', 'zz', 1, NULL)")
    out = run_etl(*cli(url, src, "--to-table", "ev_archive", where="id <= 700"))
    assert out.returncode == 1 and "already holds 1 key(s) of this chunk with other values" \
        in out.stderr, out.stderr
    assert run_sql(url, "SELECT count(*) FROM ev WHERE id <= 700")[0][0] == 200  # 501 … 700 stay


def test_a_row_lock_is_waited_out_then_retried(make_mariadb_db, src: str) -> None:
    url = make_mariadb_db("msrc")
    make_table(url, 1000)
    holder = maria(url)
    holder.autocommit(False)
    holder.cursor().execute("SELECT * FROM ev WHERE id = 10 FOR UPDATE")

    def release() -> None:  # once etl has waited out one lock timeout and retried
        time.sleep(2.5)
        holder.rollback()

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    result = etl.archive(source=url, table="ev", where="id <= 100", to_table="ev_archive",
                         state=src, lock_timeout="1s")
    thread.join()
    holder.close()
    assert result.ok and result.succeeded == 100
    assert result.to_dict()["metadata"]["retries_by_reason"]  # the lock wait timeout, retried
    assert len(rows_of(url, "ev_archive")) == 100


def test_kill_9_at_a_random_moment_then_rerun(make_mariadb_db, src: str, spawn) -> None:
    url = make_mariadb_db("msrc")
    make_table(url)
    original = rows_of(url, "ev")
    seed = random.SystemRandom().randrange(2**32)
    print(f"fault seed: {seed}")
    rng = random.Random(seed)
    proc = spawn(*cli(url, src, "--to-table", "ev_archive", "--chunk-size", "150",
                      "--sleep", "0.01"))
    deadline = time.monotonic() + 30
    target = rng.randrange(2, 12) * 150
    while archived(url) < target:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert Counter(rows_of(url, "ev") + rows_of(url, "ev_archive")) == Counter(original)
    out = run_etl(*cli(url, src, "--to-table", "ev_archive", "--json"))
    assert out.returncode == 0, out.stderr
    assert_moved_exactly(url, original)
    assert scalar(src, "SELECT count(*) FROM etl.runs WHERE job_id = 'archive:ev' "
                       "AND status = 'failed'") == 1  # the killed run, closed


def test_dry_run_and_usage(make_mariadb_db, src: str) -> None:
    url = make_mariadb_db("msrc")
    make_table(url, 100)
    out = run_etl(*cli(url, src, "--to-table", "ev_archive", "--dry-run"))
    assert out.returncode == 0, out.stderr
    assert "FOR UPDATE" in out.stdout and "would be created LIKE ev" in out.stdout
    assert run_sql(url, "SHOW TABLES") == [("ev",)]
    for extra, says in [(("--to-dir", "/tmp/etl-never"), "same database"),
                        (("--purge", "--drop-partitions"), "PostgreSQL tables")]:
        out = run_etl(*cli(url, src, *extra))
        assert out.returncode == 2 and says in out.stderr, out.stderr
    assert len(rows_of(url, "ev")) == 100
