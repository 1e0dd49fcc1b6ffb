"""`etl archive --to mysql://…`: PostgreSQL rows moved into a real MariaDB table, chunk by
chunk — the archive committed there before the source commits the delete. No mocks.

"Moved exactly" is checked value by value: every original row is either still in the
source or in the archive (compared column by column, after the documented type mapping:
timestamptz as UTC DATETIME(6), jsonb and arrays as JSON), never both, never twice."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import psycopg
import pymysql
import pytest
from sqlalchemy.engine import make_url

import etl
from etl.runner import StopFlag
from tests.conftest import run_etl, scalar
from tests.db.test_archive import WHERE, archive_cli, make_events

pytestmark = pytest.mark.timeout(180)


def pg_rows(url: str, table: str = "ev") -> dict[int, tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        return {r[0]: r for r in conn.execute(
            f"SELECT id, created_at, kind, amount, doc, tags FROM {table}")}


def maria(url: str) -> pymysql.Connection:
    u = make_url(url)
    return pymysql.connect(host=u.host, port=u.port or 3306, user=u.username,
                           password=u.password or "", database=u.database, autocommit=True)


def maria_rows(url: str, table: str = "ev_archive") -> list[tuple]:
    with maria(url) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT id, created_at, kind, amount, doc, tags FROM `{table}`")
        return list(cur.fetchall())


def as_source(row: tuple) -> tuple:
    """A MariaDB archive row in the source's Python values (the mapping undone)."""
    id_, created, kind, amount, doc, tags = row
    return (id_, created.replace(tzinfo=dt.UTC), kind, amount,
            None if doc is None else json.loads(doc), None if tags is None else json.loads(tags))


def assert_moved_exactly(src: str, arch: str, original: dict[int, tuple],
                         where: str = WHERE) -> None:
    left = pg_rows(src)
    archived = [as_source(r) for r in maria_rows(arch)]
    keys = [r[0] for r in archived]
    assert len(keys) == len(set(keys)), "a row is twice in the archive"
    assert not set(keys) & set(left), "a row is in both the source and the archive"
    assert set(keys) | set(left) == set(original), "a row is lost"
    for r in archived:
        assert r == original[r[0]], (r, original[r[0]])
    assert all(left[k] == original[k] for k in left)
    assert scalar(src, f"SELECT count(*) FROM ev WHERE {where}") == 0
    assert len(keys) == sum(1 for _ in original) - len(left)


def test_move_into_mariadb_creates_the_table_and_resumes(src: str, make_mariadb_db) -> None:
    arch = make_mariadb_db("arch")
    make_events(src)
    original = pg_rows(src)
    stop = StopFlag()

    class StopAfterTwo:  # stop at a chunk boundary after two chunks: the rerun resumes
        n = 0

        def start(self, *a: Any) -> None: ...
        def finish(self, *a: Any) -> None: ...

        def advance(self, rows: int, nbytes: int) -> None:
            self.n += 1
            if self.n == 2:
                stop.set("test")

    first = etl.archive(source=src, table="ev", where=WHERE, to=arch, to_table="ev_archive",
                        chunk_size=1500, progress=StopAfterTwo(), stop=stop)
    assert first.status is etl.Status.STOPPED and first.succeeded > 0
    out = run_etl(*archive_cli(src, "--to", arch, "--to-table", "ev_archive",
                               "--chunk-size", "1500", "--json"))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["metadata"]["archive_table"] == "ev_archive"
    assert doc["summary"]["succeeded"] == 10_000  # the walk's count, across both runs
    assert_moved_exactly(src, arch, original)
    with maria(arch) as conn, conn.cursor() as cur:  # created from the source's definition
        cur.execute("SHOW CREATE TABLE ev_archive")
        ddl = cur.fetchone()[1]
    assert "PRIMARY KEY (`id`)" in ddl and "decimal(12,2)" in ddl.lower()


def test_rows_already_archived_identically_are_kept_and_different_ones_stop_the_chunk(
        src: str, make_mariadb_db) -> None:
    arch = make_mariadb_db("arch")
    make_events(src, 200)
    original = pg_rows(src)
    where = "id <= 100"
    # an earlier --no-delete run put rows 1..50 there: the move finds them identical
    assert etl.archive(source=src, table="ev", where="id <= 50", to=arch, to_table="ev_archive",
                       no_delete=True, job="first").succeeded == 50
    moved = etl.archive(source=src, table="ev", where=where, to=arch, to_table="ev_archive")
    assert moved.ok and moved.succeeded == 100
    assert moved.to_dict()["metadata"]["outcomes"] == {"archived": 50, "already_archived": 50}
    assert_moved_exactly(src, arch, original, where=where)
    # a different row under key 150 in the archive: the chunk stops, its rows stay
    with maria(arch) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO ev_archive (id, created_at, kind, amount) "
                    "VALUES (150, '2020-01-01', 'zz', 1)")
    out = run_etl(*archive_cli(src, "--to", arch, "--to-table", "ev_archive",
                               where="id <= 160"))
    assert out.returncode == 1
    assert "already holds key {'id': 150} with other values" in out.stderr, out.stderr
    assert scalar(src, "SELECT count(*) FROM ev WHERE id <= 160") == 60
    assert len(maria_rows(arch)) == 101


def test_dry_run_and_usage(src: str, make_mariadb_db) -> None:
    arch = make_mariadb_db("arch")
    make_events(src, 100)
    out = run_etl(*archive_cli(src, "--to", arch, "--to-table", "ev_archive", "--dry-run"))
    assert out.returncode == 0, out.stderr
    assert "INSERT INTO `ev_archive`" in out.stdout and "CREATE TABLE" in out.stdout
    with maria(arch) as conn, conn.cursor() as cur:
        cur.execute("SHOW TABLES")
        assert cur.fetchall() == ()  # nothing created
    assert scalar(src, "SELECT count(*) FROM ev") == 100
    out = run_etl(*archive_cli(src, "--to", "sqlite:///x.db"))
    assert out.returncode == 2 and "PostgreSQL or MySQL/MariaDB" in out.stderr


def test_no_delete_reruns_do_not_duplicate(src: str, make_mariadb_db) -> None:
    arch = make_mariadb_db("arch")
    make_events(src, 3000)
    for run in range(2):  # the second walks again (--restart) and finds every row there
        result = etl.archive(source=src, table="ev", where="id % 2 = 0", to=arch,
                             to_table="ev_archive", no_delete=True, chunk_size=700,
                             restart=True)
        assert result.ok and result.processed == 1500
        assert result.to_dict()["metadata"]["outcomes"] == \
            ({"archived": 1500, "already_archived": 0} if run == 0 else
             {"archived": 0, "already_archived": 1500})
    keys = [r[0] for r in maria_rows(arch)]
    assert sorted(keys) == list(range(2, 3001, 2))
    assert scalar(src, "SELECT count(*) FROM ev") == 3000
    assert isinstance(maria_rows(arch)[0][3], Decimal)
