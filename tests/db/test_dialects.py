"""MariaDB/MySQL and SQLite as sources and targets, against real servers.

The Chinook sample is loaded into a MariaDB database (one per module) and its
SQLite file copied to a temporary directory; every table is read with the
keyset source, written with the SQL sink into fresh SQLite and MariaDB
databases, and compared value by value with the original, read independently
with the raw sqlite3 driver. No mocks.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pymysql
import pytest
from pymysql.constants import CLIENT
from sqlalchemy.engine import Connection, Engine, make_url

from etl.ddl import create_table_sql
from etl.dialects import Kind, LogicalType, PortableColumn, TableSchema, make_engine, reflect_table
from etl.errors import NoKeyError, UsageError, classify
from etl.model import Category, Mode
from etl.sinks.sql import SqlSink, SqlWriteStats
from etl.sources.sqla import SqlaKeysetSource
from tests.conftest import ROOT

CHINOOK = ROOT / "fixtures" / "chinook"
ROWS = {"Album": 347, "Artist": 275, "Customer": 59, "Employee": 8, "Genre": 25,
        "Invoice": 412, "InvoiceLine": 2240, "MediaType": 5, "Playlist": 18,
        "PlaylistTrack": 8715, "Track": 3503}
CHUNK = 500  # several chunks for the large tables, one for the small ones


# -- fixtures ------------------------------------------------------------------------------

def _server(url: str) -> pymysql.Connection:
    u = make_url(url)
    return pymysql.connect(host=u.host or "127.0.0.1", port=u.port or 3306,
                           user=u.username or "root", password=u.password or "",
                           autocommit=True, charset="utf8mb4",
                           client_flag=CLIENT.MULTI_STATEMENTS)


@pytest.fixture(scope="module")
def chinook_mariadb(mariadb_url: str) -> Iterator[str]:
    """Chinook_MySql.sql loaded as its README says (utf8mb4, NO_BACKSLASH_ESCAPES)."""
    name = f"etl_chinook_{uuid.uuid4().hex[:10]}"
    script = (CHINOOK / "Chinook_MySql.sql").read_text(encoding="utf-8")
    script = re.sub(r"^(DROP DATABASE|CREATE DATABASE|USE) .*?;\s*$", "", script, flags=re.M)
    with _server(mariadb_url) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        cur.execute(f"USE `{name}`")
        cur.execute("SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_BACKSLASH_ESCAPES')")
        cur.execute(script)
        while cur.nextset():
            pass
    yield make_url(mariadb_url).set(database=name).render_as_string(hide_password=False)
    with _server(mariadb_url) as conn, conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
def chinook_sqlite(tmp_path: Path) -> str:
    path = tmp_path / "chinook.sqlite"
    shutil.copy(CHINOOK / "Chinook_Sqlite.sqlite", path)
    path.chmod(0o644)
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def truth() -> dict[str, list[tuple[Any, ...]]]:
    """The fixture's values read with the raw sqlite3 driver, independently of etl."""
    conn = sqlite3.connect(CHINOOK / "Chinook_Sqlite.sqlite")
    try:
        return {
            "Track": conn.execute("SELECT TrackId, Name, Composer, UnitPrice FROM Track "
                                  "ORDER BY TrackId").fetchall(),
            "Employee": conn.execute("SELECT EmployeeId, ReportsTo, BirthDate FROM Employee "
                                     "ORDER BY EmployeeId").fetchall(),
            "PlaylistTrack": conn.execute("SELECT PlaylistId, TrackId FROM PlaylistTrack "
                                          "ORDER BY 1, 2").fetchall(),
            "Invoice": conn.execute("SELECT InvoiceId, Total FROM Invoice "
                                    "ORDER BY InvoiceId").fetchall(),
        }
    finally:
        conn.close()


@pytest.fixture
def engines() -> Iterator[Callable[[str], Engine]]:
    made: list[Engine] = []

    def make(url: str) -> Engine:
        made.append(make_engine(url))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()


@pytest.fixture
def target_url(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], str]:
    """Factory: a fresh, empty target database of the kind named ``sqlite`` or ``mariadb``
    (MariaDB is asked for only when used, so SQLite cases run without it)."""
    def make(kind: str) -> str:
        if kind == "sqlite":
            return f"sqlite:///{tmp_path / f'out_{uuid.uuid4().hex[:8]}.sqlite'}"
        make_mariadb_db: Callable[[str], str] = request.getfixturevalue("make_mariadb_db")
        return make_mariadb_db("out")
    return make


# -- helpers -------------------------------------------------------------------------------

def read_all(conn: Connection, table: str, chunk: int = CHUNK) -> list[tuple[Any, ...]]:
    source = SqlaKeysetSource(conn, reflect_table(conn, table))
    return [row for c in source.chunks(chunk) for row in c.rows]


def create_like(src: TableSchema, dst: Connection) -> TableSchema:
    for statement in create_table_sql(src, dst.dialect):
        dst.exec_driver_sql(statement)
    dst.commit()
    return reflect_table(dst, src.name, role="target")


def copy_table(src: Connection, dst: Connection, table: str, *, mode: Mode = Mode.APPEND,
               chunk: int = CHUNK) -> list[SqlWriteStats]:
    schema = reflect_table(src, table)
    target = create_like(schema, dst) if mode is Mode.APPEND else \
        reflect_table(dst, table, role="target")
    sink = SqlSink(dst, target, mode=mode)
    stats = []
    for c in SqlaKeysetSource(src, schema).chunks(chunk):
        stats.append(sink.write(c.rows))
        dst.commit()
    return stats


def typed(rows: list[tuple[Any, ...]]) -> list[tuple[tuple[str, Any], ...]]:
    """Rows with each value's type, so 1 ≠ True and Decimal('1.5') ≠ 1.5 in comparisons."""
    return [tuple((type(v).__name__, v) for v in row) for row in rows]


def total(stats: list[SqlWriteStats]) -> dict[str, int]:
    out = {"rows": sum(s.rows for s in stats)}
    for s in stats:
        for name, value in s.outcomes().items():
            out[name] = out.get(name, 0) + value
    return out


def check_against_truth(conn: Connection, truth: dict[str, list[tuple[Any, ...]]]) -> None:
    tracks = {r[0]: r for r in read_all(conn, "Track")}
    for track_id, name, composer, price in truth["Track"]:
        row = tracks[track_id]
        assert row[1] == name and row[5] == composer, track_id
        assert type(row[8]) is Decimal and row[8] == Decimal(repr(price)), (track_id, row[8])
    assert sum("\\" in r[1] for r in tracks.values()) == 4
    assert sum(r[5] is None for r in tracks.values()) == 977
    assert sum(not r[1].isascii() for r in tracks.values()) == \
        sum(not r[1].isascii() for r in truth["Track"]) > 0
    employees = [(r[0], r[4], r[5]) for r in read_all(conn, "Employee")]
    assert employees == [(i, boss, dt.datetime.fromisoformat(born))
                         for i, boss, born in truth["Employee"]]
    assert read_all(conn, "PlaylistTrack") == truth["PlaylistTrack"]
    invoices = [(r[0], r[8]) for r in read_all(conn, "Invoice")]
    assert invoices == [(i, Decimal(repr(t))) for i, t in truth["Invoice"]]
    assert all(type(t) is Decimal for _, t in invoices)
    assert sum(t for _, t in invoices) == Decimal("2328.60")


# -- Chinook across databases --------------------------------------------------------------

def test_mariadb_and_sqlite_chinook_read_the_same(chinook_mariadb: str, chinook_sqlite: str,
                                                  engines: Callable[[str], Engine],
                                                  truth: dict[str, list[tuple[Any, ...]]]
                                                  ) -> None:
    with engines(chinook_mariadb).connect() as maria, engines(chinook_sqlite).connect() as lite:
        for table, count in ROWS.items():
            rows = read_all(maria, table)
            assert len(rows) == count, table
            assert typed(rows) == typed(read_all(lite, table)), table
        check_against_truth(maria, truth)
        check_against_truth(lite, truth)


@pytest.mark.parametrize("source_kind", ["mariadb", "sqlite"])
@pytest.mark.parametrize("target_kind", ["sqlite", "mariadb"])
def test_chinook_copies_exactly(source_kind: str, target_kind: str, chinook_mariadb: str,
                                chinook_sqlite: str, target_url: Callable[[str], str],
                                engines: Callable[[str], Engine],
                                truth: dict[str, list[tuple[Any, ...]]]) -> None:
    src_url = chinook_mariadb if source_kind == "mariadb" else chinook_sqlite
    with engines(src_url).connect() as src, engines(target_url(target_kind)).connect() as dst:
        for table, count in ROWS.items():
            stats = copy_table(src, dst, table)
            assert total(stats)["inserted"] == count, table
            assert typed(read_all(dst, table)) == typed(read_all(src, table)), table
        target = reflect_table(dst, "PlaylistTrack", role="target")
        assert target.primary_key == ("PlaylistId", "TrackId")
        assert [c.nullable for c in reflect_table(dst, "Track").columns][:3] == \
            [False, False, True]
        check_against_truth(dst, truth)


def test_reflected_chinook_types(chinook_mariadb: str, chinook_sqlite: str,
                                 engines: Callable[[str], Engine]) -> None:
    with engines(chinook_mariadb).connect() as maria, engines(chinook_sqlite).connect() as lite:
        m, s = reflect_table(maria, "Track"), reflect_table(lite, "Track")
    assert [str(c.type) for c in m.columns] == [
        "integer", "varchar(200)", "integer", "integer", "integer", "varchar(220)", "integer",
        "integer", "numeric(10,2)"]
    # SQLite integers are 64-bit whatever their declared name; REAL-stored money is declared
    # NUMERIC(10,2) in the fixture and described so
    assert [str(c.type) for c in s.columns] == [
        "bigint", "varchar(200)", "bigint", "bigint", "bigint", "varchar(220)", "bigint",
        "bigint", "numeric(10,2)"]
    assert m.primary_key == s.primary_key == ("TrackId",)
    assert [c.nullable for c in m.columns] == [c.nullable for c in s.columns] == [
        False, False, True, False, True, True, False, True, False]


# -- upsert and ignore ---------------------------------------------------------------------

@pytest.mark.parametrize("target_kind", ["sqlite", "mariadb"])
def test_upsert_twice_changes_nothing_the_second_time(target_kind: str, chinook_sqlite: str,
                                                      target_url: Callable[[str], str],
                                                      engines: Callable[[str], Engine]) -> None:
    with engines(chinook_sqlite).connect() as src, \
            engines(target_url(target_kind)).connect() as dst:
        create_like(reflect_table(src, "Track"), dst)
        create_like(reflect_table(src, "PlaylistTrack"), dst)
        first = total(copy_table(src, dst, "Track", mode=Mode.UPSERT))
        assert first == {"rows": 3503, "inserted": 3503, "updated": 0, "unchanged": 0,
                         "ignored": 0, "superseded": 0}
        second = total(copy_table(src, dst, "Track", mode=Mode.UPSERT))
        assert second == {"rows": 3503, "inserted": 0, "updated": 0, "unchanged": 3503,
                          "ignored": 0, "superseded": 0}
        # a table that is all key: nothing to update, existing rows are unchanged
        copy_table(src, dst, "PlaylistTrack", mode=Mode.UPSERT, chunk=5000)
        again = total(copy_table(src, dst, "PlaylistTrack", mode=Mode.UPSERT, chunk=5000))
        assert (again["inserted"], again["unchanged"]) == (0, 8715)
        assert typed(read_all(dst, "Track")) == typed(read_all(src, "Track"))


def _people(dst: Connection) -> TableSchema:
    schema = TableSchema("people", (
        PortableColumn("id", LogicalType(Kind.INTEGER), nullable=False),
        PortableColumn("name", LogicalType(Kind.VARCHAR, length=10), nullable=False),
        PortableColumn("score", LogicalType(Kind.NUMERIC, precision=6, scale=2)),
    ), ("id",))
    return create_like(schema, dst)


@pytest.mark.parametrize("target_kind", ["sqlite", "mariadb"])
def test_upsert_counts_new_changed_and_unchanged_rows_exactly(
        target_kind: str, target_url: Callable[[str], str],
        engines: Callable[[str], Engine]) -> None:
    with engines(target_url(target_kind)).connect() as dst:
        sink = SqlSink(dst, _people(dst), mode=Mode.UPSERT)
        old = [(i, f"p{i}", Decimal(f"{i}.50")) for i in range(1, 11)]
        assert sink.write(old) == SqlWriteStats(rows=10, inserted=10)
        # half changed (1–10), half new (11–20)
        rows = [(i, f"q{i}", Decimal(f"{i}.50")) for i in range(1, 21)]
        assert sink.write(rows) == SqlWriteStats(rows=20, inserted=10, updated=10)
        # a mix: 3 changed (a NULL among them), 2 identical, 5 new
        mixed = [(1, "q1", None), (2, "x2", Decimal("2.50")), (3, "q3", Decimal("3.51")),
                 (4, "q4", Decimal("4.50")), (5, "q5", Decimal("5.5"))] + \
                [(i, f"n{i}", None) for i in range(21, 26)]
        assert sink.write(mixed) == SqlWriteStats(rows=10, inserted=5, updated=3, unchanged=2)
        dst.commit()
        got = {r[0]: r for r in read_all(dst, "people")}
        assert len(got) == 25
        assert got[1] == (1, "q1", None) and got[3] == (3, "q3", Decimal("3.51"))
        assert got[5] == (5, "q5", Decimal("5.50")) and got[20] == (20, "q20", Decimal("20.50"))
        # replace empties the table inside the caller's transaction: a rollback undoes it
        SqlSink(dst, reflect_table(dst, "people"), mode=Mode.REPLACE).truncate()
        assert read_all(dst, "people") == []
        dst.rollback()
        assert len(read_all(dst, "people")) == 25


def test_counts_without_found_rows(target_url: Callable[[str], str]) -> None:
    """A MySQL connection without CLIENT.FOUND_ROWS counts unchanged rows as 0, not 1."""
    import sqlalchemy as sa

    engine = make_engine(target_url("mariadb"))

    @sa.event.listens_for(engine, "do_connect")
    def without_found_rows(_dialect: Any, _record: Any, _cargs: Any, cparams: Any) -> None:
        cparams["client_flag"] = cparams.get("client_flag", 0) & ~CLIENT.FOUND_ROWS

    try:
        with engine.connect() as dst:
            driver: Any = dst.connection.driver_connection
            assert not driver.client_flag & CLIENT.FOUND_ROWS
            table = _people(dst)
            upsert = SqlSink(dst, table, mode=Mode.UPSERT)
            assert upsert.write([(i, f"p{i}", None) for i in range(6)]) == \
                SqlWriteStats(rows=6, inserted=6)
            assert upsert.write([(i, f"q{i}" if i < 2 else f"p{i}", None) for i in range(8)]) \
                == SqlWriteStats(rows=8, inserted=2, updated=2, unchanged=4)
            ignore = SqlSink(dst, table, mode=Mode.IGNORE)
            assert ignore.write([(i, "x", None) for i in range(6, 10)]) == \
                SqlWriteStats(rows=4, inserted=2, ignored=2)
    finally:
        engine.dispose()


@pytest.mark.parametrize("target_kind", ["sqlite", "mariadb"])
def test_duplicate_keys_in_one_write_last_wins(target_kind: str,
                                               target_url: Callable[[str], str],
                                               engines: Callable[[str], Engine]) -> None:
    with engines(target_url(target_kind)).connect() as dst:
        table = _people(dst)
        upsert = SqlSink(dst, table, mode=Mode.UPSERT)
        assert upsert.write([(3, "x", None)]) == SqlWriteStats(rows=1, inserted=1)
        stats = upsert.write([(1, "a", None), (2, "b", None), (1, "c", None),
                              (3, "y", None), (3, "z", Decimal("1"))])
        assert stats == SqlWriteStats(rows=5, inserted=2, updated=1, superseded=2)
        ignore = SqlSink(dst, table, mode=Mode.IGNORE)
        stats = ignore.write([(4, "p", None), (4, "q", None), (1, "kept?", None)])
        assert stats == SqlWriteStats(rows=3, inserted=1, ignored=1, superseded=1)
        dst.commit()
        assert read_all(dst, "people") == [(1, "c", None), (2, "b", None),
                                           (3, "z", Decimal("1.00")), (4, "q", None)]


def test_ignore_keeps_rows_and_refuses_bad_values_unlike_insert_ignore(
        target_url: Callable[[str], str], engines: Callable[[str], Engine]) -> None:
    with engines(target_url("mariadb")).connect() as dst:
        sink = SqlSink(dst, _people(dst), mode=Mode.IGNORE)
        assert sink.write([(1, "one", None)]) == SqlWriteStats(rows=1, inserted=1)
        dst.commit()
        with pytest.raises(Exception) as caught:  # 11 characters into VARCHAR(10)
            sink.write([(2, "elevenchars", None)])
        assert classify(caught.value) is Category.DATA
        dst.rollback()
        # what INSERT IGNORE would have done: keep the row, truncated, with only a warning
        dst.exec_driver_sql("INSERT IGNORE INTO people VALUES (2, 'elevenchars', NULL)")
        assert dst.exec_driver_sql("SELECT name FROM people WHERE id = 2").scalar() == \
            "elevenchar"


def test_sqlite_errors_are_classified(target_url: Callable[[str], str],
                                      engines: Callable[[str], Engine]) -> None:
    with engines(target_url("sqlite")).connect() as dst:
        sink = SqlSink(dst, _people(dst), mode=Mode.UPSERT)
        with pytest.raises(Exception) as caught:
            sink.write([(1, None, None)])  # NOT NULL
        assert classify(caught.value) is Category.DATA


# -- keyset walks --------------------------------------------------------------------------

@pytest.mark.parametrize("row_values", [True, False])
@pytest.mark.parametrize("source_kind", ["mariadb", "sqlite"])
def test_composite_key_walk_never_skips_or_repeats(source_kind: str, row_values: bool,
                                                   chinook_mariadb: str, chinook_sqlite: str,
                                                   engines: Callable[[str], Engine],
                                                   truth: dict[str, list[tuple[Any, ...]]]
                                                   ) -> None:
    url = chinook_mariadb if source_kind == "mariadb" else chinook_sqlite
    with engines(url).connect() as conn:
        source = SqlaKeysetSource(conn, reflect_table(conn, "PlaylistTrack"),
                                  row_values=row_values)
        chunks = list(source.chunks(97))
    keys = [row for c in chunks for row in c.rows]
    assert keys == truth["PlaylistTrack"]  # in order, none skipped, none repeated
    assert all(c.last_key == c.rows[-1] for c in chunks)
    # most boundaries fall inside a playlist, where only the second column moves on
    inside = sum(a.last_key[0] == b.rows[0][0] for a, b in zip(chunks, chunks[1:], strict=False))
    assert inside > len(chunks) // 2


@pytest.mark.parametrize("target_kind", ["sqlite", "mariadb"])
def test_three_column_key_walk_with_ties(target_kind: str, target_url: Callable[[str], str],
                                         engines: Callable[[str], Engine]) -> None:
    schema = TableSchema("grid", (
        PortableColumn("a", LogicalType(Kind.VARCHAR, length=5), nullable=False),
        PortableColumn("b", LogicalType(Kind.INTEGER), nullable=False),
        PortableColumn("c", LogicalType(Kind.DATE), nullable=False),
        PortableColumn("v", LogicalType(Kind.TEXT)),
    ), ("a", "b", "c"))
    rows = [(a, b, dt.date(2024, 1, c), f"{a}{b}{c}") for a in ("A", "a", "b") for b in (-1, 0, 2)
            for c in range(1, 6)]
    with engines(target_url(target_kind)).connect() as conn:
        SqlSink(conn, create_like(schema, conn)).write(rows)
        conn.commit()
        table = reflect_table(conn, "grid")
        for size in (1, 4, 7, 45):
            for row_values in (True, False):
                source = SqlaKeysetSource(conn, table, row_values=row_values)
                walked = [r for c in source.chunks(size) for r in c.rows]
                assert walked == sorted(rows), (size, row_values)


def test_where_and_columns_narrow_the_walk(chinook_mariadb: str,
                                           engines: Callable[[str], Engine]) -> None:
    with engines(chinook_mariadb).connect() as conn:
        table = reflect_table(conn, "Track")
        source = SqlaKeysetSource(conn, table, columns=["TrackId", "Name"],
                                  where="INSTR(Name, CHAR(92)) > 0 OR Name LIKE 'zz%'")
        rows = [r for c in source.chunks(2) for r in c.rows]
        assert len(rows) == 4 and all("\\" in name for _, name in rows)
        with pytest.raises(UsageError):
            SqlaKeysetSource(conn, table, columns=["Name"])
        conn.exec_driver_sql("CREATE TABLE nokey (a INT)")
        with pytest.raises(NoKeyError):
            SqlaKeysetSource(conn, reflect_table(conn, "nokey"))
        conn.exec_driver_sql("DROP TABLE nokey")


# -- text that breaks naive copies ---------------------------------------------------------

TRICKY = ["😀 grin", "𝄞 clef", "a\\b", "\\", "\\n is not a newline", "it's", "100%", "%s",
          "tab\tnew\nline", "nul\x00byte", "ünïcödé Ωμέγα 漢字", "  padded  ", ""]


@pytest.mark.parametrize("first", ["sqlite", "mariadb"])
def test_four_byte_utf8_and_backslashes_survive(first: str, target_url: Callable[[str], str],
                                                engines: Callable[[str], Engine]) -> None:
    schema = TableSchema("texts", (
        PortableColumn("id", LogicalType(Kind.INTEGER), nullable=False),
        PortableColumn("t", LogicalType(Kind.TEXT)),
        PortableColumn("v", LogicalType(Kind.VARCHAR, length=40)),
        PortableColumn("b", LogicalType(Kind.BYTES)),
    ), ("id",))
    rows = [(i, s, s, s.encode()) for i, s in enumerate(TRICKY)]
    second = "mariadb" if first == "sqlite" else "sqlite"
    with engines(target_url(first)).connect() as one, \
            engines(target_url(second)).connect() as two:
        SqlSink(one, create_like(schema, one)).write(rows)
        one.commit()
        copy_table(one, two, "texts", chunk=3)
        for conn in (one, two):
            assert typed(read_all(conn, "texts")) == typed(rows)
        maria = one if first == "mariadb" else two
        assert maria.exec_driver_sql("SELECT LENGTH(t), CHAR_LENGTH(t) FROM texts "
                                     "WHERE id = 0").one() == (9, 6)


# -- types across the three databases ------------------------------------------------------

MARIADB_TYPES = """
CREATE TABLE odd (
  id INT UNSIGNED NOT NULL PRIMARY KEY, flag TINYINT(1), tiny TINYINT UNSIGNED,
  small SMALLINT UNSIGNED, medium MEDIUMINT UNSIGNED, big BIGINT UNSIGNED,
  price DECIMAL(12,4) NOT NULL, f FLOAT, d DOUBLE, name VARCHAR(30), code CHAR(3), body TEXT,
  blob_ BLOB, vb VARBINARY(8), born DATE, seen DATETIME(6), stamp TIMESTAMP NULL,
  clock TIME, yr YEAR, doc JSON, mood ENUM('sad','ok','it''s'), tags SET('x','y'),
  bit1 BIT(1), bits BIT(12), uid UUID
) CHARACTER SET utf8mb4
"""
ODD_TYPES = ["bigint", "boolean", "smallint", "integer", "integer", "numeric(20,0)",
             "numeric(12,4)", "real", "double", "varchar(30)", "char(3)", "text", "bytes",
             "bytes", "date", "timestamp", "timestamptz", "time", "smallint", "json",
             "enum('sad', 'ok', \"it's\")", "set('x', 'y')", "boolean", "bigint", "uuid"]
ODD_PG_DDL = [
    '"id" bigint NOT NULL', '"flag" boolean', '"tiny" smallint', '"small" integer',
    '"medium" integer', '"big" numeric(20,0)', '"price" numeric(12,4) NOT NULL', '"f" real',
    '"d" double precision', '"name" varchar(30)', '"code" char(3)', '"body" text',
    '"blob_" bytea', '"vb" bytea', '"born" date', '"seen" timestamp', '"stamp" timestamptz',
    '"clock" time', '"yr" smallint', '"doc" jsonb',
    '"mood" text CHECK ("mood" IN (\'sad\', \'ok\', \'it\'\'s\'))', '"tags" text',
    '"bit1" boolean', '"bits" bigint', '"uid" uuid', 'PRIMARY KEY ("id")']


def test_mariadb_types_map_read_and_copy(target_url: Callable[[str], str],
                                         engines: Callable[[str], Engine],
                                         make_db: Callable[[str], str]) -> None:
    with engines(target_url("mariadb")).connect() as maria, \
            engines(target_url("sqlite")).connect() as lite, \
            engines(make_db("pg")).connect() as pg:
        maria.exec_driver_sql(MARIADB_TYPES)
        maria.exec_driver_sql(
            "INSERT INTO odd VALUES (4294967295, 1, 255, 65535, 16777215, 18446744073709551615,"
            " 12345678.1234, 1.5, 2.25, 'a\\\\b', 'abc', 'long', x'00ff', x'01', '2024-02-29',"
            " '2024-01-02 03:04:05.123456', '2024-06-30 23:59:59', '12:34:56', 2024,"
            " '{\"a\": 1.0, \"b\": [1, 2]}', 'it''s', 'x,y', b'1', b'101', "
            " 'f47ac10b-58cc-4372-a567-0e02b2c3d479'),"
            " (1, 0, 0, 0, 0, 0, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL, '0000-00-00',"
            " '0000-00-00 00:00:00', NULL, NULL, NULL, NULL, NULL, '', b'0', b'0', NULL)")
        maria.commit()
        odd = reflect_table(maria, "odd")
        assert [str(c.type) for c in odd.columns] == ODD_TYPES
        assert [c.name for c in odd.columns if c.unsigned] == ["id", "tiny", "small", "medium",
                                                              "big"]
        (pg_ddl,) = create_table_sql(odd, pg.dialect)
        assert pg_ddl.splitlines()[1:-1] == [f"  {d}," for d in ODD_PG_DDL[:-1]] + \
            [f"  {ODD_PG_DDL[-1]}"]
        for statement in create_table_sql(odd, pg.dialect):
            pg.exec_driver_sql(statement)
        pg.commit()
        assert [str(c.type) for c in reflect_table(pg, "odd").columns] == [
            t if not t.startswith(("enum", "set")) else "text" for t in ODD_TYPES]

        source = SqlaKeysetSource(maria, odd)
        (chunk,) = list(source.chunks(10))
        zero, full = chunk.rows
        assert (chunk.zero_dates, source.zero_dates) == (2, 2)
        assert zero[14] is None and zero[15] is None and zero[1] is False and zero[22] is False
        assert full[:7] == (4294967295, True, 255, 65535, 16777215,
                            Decimal(18446744073709551615), Decimal("12345678.1234"))
        assert type(full[5]) is Decimal and full[9] == "a\\b" and full[12] == b"\x00\xff"
        assert full[15] == dt.datetime(2024, 1, 2, 3, 4, 5, 123456)
        assert full[16] == dt.datetime(2024, 6, 30, 23, 59, 59, tzinfo=dt.UTC)
        assert full[17] == dt.time(12, 34, 56) and full[18] == 2024
        assert full[19] == '{"a": 1.0, "b": [1, 2]}' and full[20:24] == ("it's", "x,y", True,
                                                                          5)
        assert full[24] == "f47ac10b-58cc-4372-a567-0e02b2c3d479"

        # MariaDB → SQLite → MariaDB keeps every value; MySQL has no zone-aware type, so
        # the timestamptz column comes back as a DATETIME holding UTC
        copy_table(maria, lite, "odd")
        assert typed(read_all(lite, "odd")) == typed(chunk.rows)
        back = TableSchema("odd2", reflect_table(lite, "odd").columns, ("id",))
        SqlSink(maria, create_like(back, maria)).write(read_all(lite, "odd"))
        maria.commit()
        expected = [r[:16] + (r[16] and r[16].replace(tzinfo=None),) + r[17:] for r in chunk.rows]
        assert typed(read_all(maria, "odd2")) == typed(expected)


PG_TYPES = """
CREATE TYPE mood AS ENUM ('sad', 'ok');
CREATE TABLE pgt (
  id bigint PRIMARY KEY, doc jsonb, nums integer[], uid uuid, at timestamptz NOT NULL,
  amount numeric(30,10), plain numeric, label text, mood mood, raw bytea, ip inet,
  k varchar(12), flag boolean);
INSERT INTO pgt VALUES
  (1, '{"b": [1, 2.5], "a": "\\\\ 😀"}', '{1,2,3}', 'f47ac10b-58cc-4372-a567-0e02b2c3d479',
   '2024-03-10 12:00:00+05:30', 12345678901234567890.0123456789, 0.1, 'x\\y', 'ok',
   '\\x00ff', '10.0.0.1/8', 'key', true),
  (2, NULL, '{}', NULL, '1999-12-31 23:59:59.999999+00', -1, NULL, NULL, NULL, NULL, NULL,
   NULL, NULL);
"""


@pytest.mark.parametrize("target_kind", ["sqlite", "mariadb"])
def test_postgresql_source_to_mariadb_and_sqlite(target_kind: str, make_db: Callable[[str], str],
                                                 target_url: Callable[[str], str],
                                                 engines: Callable[[str], Engine]) -> None:
    with engines(make_db("pgsrc")).connect() as pg, \
            engines(target_url(target_kind)).connect() as dst:
        pg.exec_driver_sql(PG_TYPES)
        pg.commit()
        table = reflect_table(pg, "pgt")
        assert [str(c.type) for c in table.columns] == [
            "bigint", "json", "array(integer)", "uuid", "timestamptz", "numeric(30,10)",
            "numeric", "text", "enum('sad', 'ok')", "bytes", "text", "varchar(12)", "boolean"]
        assert [c.read_as_text for c in table.columns][9:11] == [False, True]
        rows = read_all(pg, "pgt")
        assert rows[0][1] == '{"a": "\\\\ 😀", "b": [1, 2.5]}'  # jsonb's own text
        assert rows[0][4] == dt.datetime(2024, 3, 10, 6, 30, tzinfo=dt.UTC)
        assert rows[0][3] == "f47ac10b-58cc-4372-a567-0e02b2c3d479" and rows[0][10] == \
            "10.0.0.1/8"
        copy_table(pg, dst, "pgt", chunk=1)
        got = read_all(dst, "pgt")
        # arrays travel as JSON text
        expected: list[tuple[Any, ...]] = [
            tuple(json.dumps(v) if isinstance(v, list) else v for v in r) for r in rows]
        if target_kind == "mariadb":  # DATETIME(6) holds the UTC time, without a zone
            expected = [r[:4] + (r[4].replace(tzinfo=None),) + r[5:] for r in expected]
        assert typed(got) == typed(expected)
        assert got[0][5] == Decimal("12345678901234567890.0123456789")
        types = [str(c.type) for c in reflect_table(dst, "pgt").columns]
        assert types[1:6] == ["json", "json", "uuid" if target_kind == "sqlite" else "char(36)",
                              "timestamptz" if target_kind == "sqlite" else "timestamp",
                              "numeric(30,10)"]


def test_mysql_target_ddl(target_url: Callable[[str], str],
                          engines: Callable[[str], Engine]) -> None:
    schema = TableSchema("order", (  # a reserved word
        PortableColumn("k", LogicalType(Kind.TEXT), nullable=False),
        PortableColumn("b", LogicalType(Kind.BYTES)),
        PortableColumn("n", LogicalType(Kind.NUMERIC)),
        PortableColumn("w", LogicalType(Kind.NUMERIC, precision=80, scale=40)),
        PortableColumn("e%", LogicalType(Kind.ENUM, labels=("a\\b", "50%"))),
        PortableColumn("a", LogicalType(Kind.ARRAY, item=LogicalType(Kind.INTEGER))),
        PortableColumn("u", LogicalType(Kind.UUID)),
        PortableColumn("z", LogicalType(Kind.TIMESTAMPTZ)),
    ), ("k",))
    with engines(target_url("mariadb")).connect() as maria:
        (ddl,) = create_table_sql(schema, maria.dialect)
        assert ddl.splitlines()[1:9] == [
            "  `k` VARCHAR(768) NOT NULL,", "  `b` LONGBLOB,", "  `n` DECIMAL(65,30),",
            "  `w` DECIMAL(65,30),", "  `e%%` ENUM('a\\\\b', '50%%'),", "  `a` JSON,",
            "  `u` CHAR(36),", "  `z` DATETIME(6),"]
        assert ddl.endswith("COLLATE=utf8mb4_nopad_bin")
        maria.exec_driver_sql(ddl)
        sink = SqlSink(maria, reflect_table(maria, "order"), mode=Mode.UPSERT)
        at = dt.datetime(2024, 1, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2)))
        # keys differing only in case or trailing spaces stay distinct (binary, no-pad)
        assert sink.write([("a", None, None, None, "a\\b", [1], None, at),
                           ("A", None, None, None, "50%", None, None, None),
                           ("a ", None, None, None, None, None, None, None)]) == \
            SqlWriteStats(rows=3, inserted=3)
        assert maria.exec_driver_sql("SELECT z, a, `e%%` FROM `order` WHERE k = 'a'").one() == \
            (dt.datetime(2024, 1, 1, 10), "[1]", "a\\b")


def test_modes_need_a_key() -> None:
    from sqlalchemy.dialects import sqlite

    from etl.dialects import write_sql

    with pytest.raises(UsageError):
        write_sql(sqlite.dialect(), "t", ["a"], mode=Mode.UPSERT)
    assert write_sql(sqlite.dialect(), "t", ["a", "b"], mode=Mode.UPSERT, key=["a"]) == (
        'INSERT INTO "t" ("a", "b") VALUES (?, ?) ON CONFLICT ("a") DO UPDATE SET '
        '"b" = excluded."b" WHERE "t"."b" IS NOT excluded."b"')
