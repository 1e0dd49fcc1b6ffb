"""Auto-numbered keys across databases: a created target numbers new rows past the copied ones.

MySQL AUTO_INCREMENT, PostgreSQL serial/identity and SQLite INTEGER PRIMARY KEY are found by
reflection, created on the target as the target's own kind, and when the copy completes the
target's counter is past the largest copied value (``metadata.sequences`` says where), so
an application's INSERT without the key gets max + 1. Real servers; every check reads the
target with its own driver.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
from sqlalchemy.engine import make_url

import etl
from etl.autonumber import advance_auto_increment
from etl.ddl import create_table_sql
from etl.dialects import make_engine, reflect_table

pytestmark = pytest.mark.timeout(120)


def _my(url: str) -> pymysql.Connection:
    u = make_url(url)
    return pymysql.connect(host=u.host or "127.0.0.1", port=u.port or 3306,
                           user=u.username or "root", password=u.password or "",
                           database=u.database, autocommit=True)


def my_sql(url: str, *statements: str) -> list[tuple[Any, ...]]:
    with _my(url) as conn, conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)
        return list(cur.fetchall())


def pg_sql(url: str, *statements: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = None
        for statement in statements:
            cur = conn.execute(statement)
        return list(cur.fetchall()) if cur is not None and cur.description else []


def lite_sql(url: str, *statements: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(make_url(url).database or "")
    try:
        cur = conn.cursor()
        for statement in statements:
            cur.execute(statement)
        rows = cur.fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


@pytest.fixture
def state(make_db: Callable[[str], str]) -> str:
    return make_db("state")


@pytest.fixture
def lite(tmp_path: Path) -> Callable[[str], str]:
    return lambda name: f"sqlite:///{tmp_path / f'{name}.sqlite'}"


# gaps, a largest value far past the row count, and 0 (MySQL would number an explicit 0
# unless the session says NO_AUTO_VALUE_ON_ZERO)
IDS = [0, 1, 2, 3, 7, 40, 41, 120]
KEEP_ZERO = "SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_AUTO_VALUE_ON_ZERO')"


def _copied(result: etl.Result, top: int) -> None:
    assert result.status.value == "completed", result.message
    assert result.succeeded == len(IDS)
    assert result.to_dict()["metadata"]["sequences"] == {"id": top}


def test_mariadb_auto_increment_to_postgresql_identity(make_mariadb_db: Callable[[str], str],
                                                       make_db: Callable[[str], str]) -> None:
    src, tgt = make_mariadb_db("aisrc"), make_db("aitgt")
    my_sql(src, "CREATE TABLE orders (id INT AUTO_INCREMENT PRIMARY KEY, item VARCHAR(20))",
           KEEP_ZERO, "INSERT INTO orders VALUES " + ", ".join(f"({i}, 'item {i}')" for i in IDS))
    _copied(etl.copy(source=src, target=tgt, table="orders", chunk_size=3), 120)
    assert pg_sql(tgt, "SELECT attidentity FROM pg_attribute WHERE attrelid = 'orders'::regclass "
                       "AND attname = 'id'") == [("d",)]  # BY DEFAULT
    assert pg_sql(tgt, "INSERT INTO orders (item) VALUES ('new') RETURNING id") == [(121,)]


def test_postgresql_serial_and_identity_to_mariadb_auto_increment(
        make_db: Callable[[str], str], make_mariadb_db: Callable[[str], str],
        state: str) -> None:
    src, tgt = make_db("aisrc"), make_mariadb_db("aitgt")
    pg_sql(src, "CREATE TABLE orders (id bigserial PRIMARY KEY, item text)",
           "INSERT INTO orders VALUES " + ", ".join(f"({i}, 'item {i}')" for i in IDS),
           "CREATE TABLE events (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, at date)",
           "INSERT INTO events OVERRIDING SYSTEM VALUE VALUES (5, '2024-01-01'), "
           "(9, '2024-01-02')")
    _copied(etl.copy(source=src, target=tgt, table="orders", state=state, chunk_size=3), 120)
    ddl = my_sql(tgt, "SHOW CREATE TABLE orders")[0][1]
    assert "`id` bigint(20) NOT NULL AUTO_INCREMENT" in ddl, ddl
    my_sql(tgt, "INSERT INTO orders (item) VALUES ('new')")
    assert my_sql(tgt, "SELECT id FROM orders WHERE item = 'new'") == [(121,)]
    result = etl.copy(source=src, target=tgt, table="events", state=state)
    assert result.to_dict()["metadata"]["sequences"] == {"id": 9}
    my_sql(tgt, "INSERT INTO events (at) VALUES ('2024-01-03')")
    assert my_sql(tgt, "SELECT max(id) FROM events") == [(10,)]


def test_sqlite_integer_primary_key_to_mariadb_auto_increment(
        make_mariadb_db: Callable[[str], str], lite: Callable[[str], str], state: str) -> None:
    src, tgt = lite("aisrc"), make_mariadb_db("aitgt")
    lite_sql(src, "CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)",
             "INSERT INTO orders VALUES " + ", ".join(f"({i}, 'item {i}')" for i in IDS))
    _copied(etl.copy(source=src, target=tgt, table="orders", state=state, chunk_size=3), 120)
    assert "AUTO_INCREMENT" in my_sql(tgt, "SHOW CREATE TABLE orders")[0][1]
    assert my_sql(tgt, "SELECT id FROM orders ORDER BY id") == [(i,) for i in IDS]  # 0 kept
    my_sql(tgt, "INSERT INTO orders (item) VALUES ('new')")
    assert my_sql(tgt, "SELECT id FROM orders WHERE item = 'new'") == [(121,)]


def test_mariadb_auto_increment_to_sqlite_rowid(make_mariadb_db: Callable[[str], str],
                                                lite: Callable[[str], str], state: str) -> None:
    src, tgt = make_mariadb_db("aisrc"), lite("aitgt")
    my_sql(src, "CREATE TABLE orders (id INT UNSIGNED AUTO_INCREMENT PRIMARY KEY, item TEXT)",
           KEEP_ZERO, "INSERT INTO orders VALUES " + ", ".join(f"({i}, 'item {i}')" for i in IDS))
    _copied(etl.copy(source=src, target=tgt, table="orders", state=state, chunk_size=3), 120)
    assert lite_sql(tgt, "SELECT sql FROM sqlite_master WHERE name = 'orders'")[0][0] == (
        'CREATE TABLE "orders" (\n  "id" INTEGER PRIMARY KEY NOT NULL,\n  "item" TEXT\n)')
    lite_sql(tgt, "INSERT INTO orders (item) VALUES ('new')")
    assert lite_sql(tgt, "SELECT id FROM orders WHERE item = 'new'") == [(121,)]


def test_a_counter_that_cannot_lead_the_key_is_left_out(make_db: Callable[[str], str],
                                                        make_mariadb_db: Callable[[str], str],
                                                        state: str) -> None:
    """InnoDB numbers only a column that leads an index: a serial second in a composite
    primary key is copied as a plain column (and the copy works)."""
    src, tgt = make_db("aisrc"), make_mariadb_db("aitgt")
    pg_sql(src, "CREATE TABLE parts (k int, id bigserial, PRIMARY KEY (k, id))",
           "INSERT INTO parts VALUES (1, 1), (1, 2), (2, 3)")
    result = etl.copy(source=src, target=tgt, table="parts", state=state)
    assert result.status.value == "completed" and result.succeeded == 3, result.message
    assert "AUTO_INCREMENT" not in my_sql(tgt, "SHOW CREATE TABLE parts")[0][1]
    assert not result.to_dict()["metadata"].get("sequences")


# -- reflection, DDL and the advance, per database ------------------------------------------

def test_reflection_says_which_columns_are_auto_numbered(
        make_db: Callable[[str], str], make_mariadb_db: Callable[[str], str],
        lite: Callable[[str], str]) -> None:
    pg, my, sq = make_db("refl"), make_mariadb_db("refl"), lite("refl")
    pg_sql(pg, "CREATE TABLE a (id serial PRIMARY KEY, n int)",
           "CREATE TABLE b (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, n int)",
           "CREATE TABLE c (id int PRIMARY KEY, n serial)")
    my_sql(my, "CREATE TABLE a (id INT AUTO_INCREMENT PRIMARY KEY, n INT)",
           "CREATE TABLE c (id INT PRIMARY KEY, n INT)")
    lite_sql(sq, "CREATE TABLE a (id INTEGER PRIMARY KEY, n INT)",
             "CREATE TABLE b (id INTEGER PRIMARY KEY AUTOINCREMENT, n INT)",
             "CREATE TABLE c (id BIGINT PRIMARY KEY, n INT)",
             "CREATE TABLE d (id INTEGER PRIMARY KEY DESC, n INT)",
             "CREATE TABLE e (id INTEGER PRIMARY KEY, n INT) WITHOUT ROWID",
             "CREATE TABLE f (id INTEGER, n INTEGER, PRIMARY KEY (id, n))")

    def auto(url: str, table: str) -> list[str]:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                return [c.name for c in reflect_table(conn, table).columns if c.auto_increment]
        finally:
            engine.dispose()

    assert [auto(pg, t) for t in "abc"] == [["id"], ["id"], ["n"]]
    assert [auto(my, t) for t in "ac"] == [["id"], []]
    assert [auto(sq, t) for t in "abcdef"] == [["id"], ["id"], [], [], [], []]


def test_advance_raises_counters_and_never_lowers_them(
        make_db: Callable[[str], str], make_mariadb_db: Callable[[str], str],
        lite: Callable[[str], str]) -> None:
    pg, my, sq = make_db("adv"), make_mariadb_db("adv"), lite("adv")
    pg_sql(pg, "CREATE TABLE t (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY)",
           "INSERT INTO t VALUES (10), (30)")
    my_sql(my, "CREATE TABLE t (id INT AUTO_INCREMENT PRIMARY KEY)",
           "INSERT INTO t VALUES (10), (30)", "ALTER TABLE t AUTO_INCREMENT = 500")
    lite_sql(sq, "CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT)",
             "INSERT INTO t VALUES (10), (30)", "UPDATE sqlite_sequence SET seq = 3")

    def advance(url: str) -> dict[str, int]:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                return advance_auto_increment(conn, reflect_table(conn, "t"))
        finally:
            engine.dispose()

    assert advance(pg) == advance(my) == advance(sq) == {"id": 30}
    assert pg_sql(pg, "INSERT INTO t DEFAULT VALUES RETURNING id") == [(31,)]
    my_sql(my, "INSERT INTO t VALUES ()")
    assert my_sql(my, "SELECT max(id) FROM t") == [(500,)]  # the higher counter stayed
    assert lite_sql(sq, "SELECT seq FROM sqlite_sequence WHERE name = 't'") == [(30,)]
    lite_sql(sq, "INSERT INTO t DEFAULT VALUES")
    assert lite_sql(sq, "SELECT max(id) FROM t") == [(31,)]
    lite_sql(sq, "DELETE FROM t")  # an empty table: nothing to advance
    assert advance(sq) == {}


@pytest.mark.parametrize(("target", "expected"), [
    ("postgresql", '"id" bigint NOT NULL GENERATED BY DEFAULT AS IDENTITY'),
    ("mysql", "`id` BIGINT NOT NULL AUTO_INCREMENT"),
    ("sqlite", '"id" INTEGER PRIMARY KEY NOT NULL')])
def test_create_table_sql_numbers_the_auto_column(target: str, expected: str) -> None:
    from sqlalchemy.dialects import mysql, postgresql, sqlite

    from etl.portable import Kind, LogicalType, PortableColumn, TableSchema

    table = TableSchema("t", (PortableColumn("id", LogicalType(Kind.BIGINT), False,
                                             auto_increment=True),
                              PortableColumn("v", LogicalType(Kind.TEXT))), ("id",))
    dialect = {"postgresql": postgresql.dialect(), "mysql": mysql.dialect(),
               "sqlite": sqlite.dialect()}[target]
    ddl = create_table_sql(table, dialect)[0]
    assert expected in ddl, ddl
    assert ("PRIMARY KEY (" in ddl) == (target != "sqlite"), ddl
