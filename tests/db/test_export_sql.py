"""`etl export` from real SQLite and MariaDB databases: Parquet (exact types), CSV that
`etl load` reads back into PostgreSQL exactly, NDJSON; stop and resume, --query with --key,
--partition-by, --where and --columns, dry run."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import etl
from etl.runner import StopFlag
from tests.db.test_archive import StopAfter
from tests.db.test_export import data_files, manifest

pytestmark = pytest.mark.timeout(120)

COLUMNS = ("id", "big", "num", "dbl", "vc", "tx", "d", "ts", "b", "flag", "j", "part")
ROWS: list[tuple[Any, ...]] = [
    (1, 9007199254740993, Decimal("12345678.1234"), 1.5, "plain", "text", dt.date(2024, 1, 2),
     dt.datetime(2024, 1, 2, 3, 4, 5, 123456), b"\x00\x01\xff", True,
     '{"a": [1, 2.5], "s": "é"}', 1),
    (2, -1, Decimal("-0.0001"), -2.25e-10, 'ünï "quoted", comma', "", dt.date(1999, 12, 31),
     dt.datetime(1999, 12, 31, 23, 59, 59), b"", False, "[]", 2),
    (3, 0, Decimal("0.0000"), 0.0, "line1\nline2\r\nline3", None, None, None, None, None,
     None, None),
    (4, None, None, None, None, "NULL", dt.date(2000, 2, 29), dt.datetime(2000, 2, 29, 12, 0, 0, 1),
     b"\x00", True, '"str"', 1),
    (5, 2**62, Decimal("99999999.9999"), 1e300, "😀 emoji, tab\there", "\\.", dt.date(1, 1, 1),
     dt.datetime(9999, 12, 31, 23, 59, 59, 999999), b"\\x", False, '{"n": null}', 2),
    (6, 6, Decimal("6.5000"), 6.25, "", " spaced ", dt.date(2024, 6, 6),
     dt.datetime(2024, 6, 6, 6, 6, 6), b"six", True, "6", 1),
    (7, 7, Decimal("-7.0000"), -7.0, "seven", "x,y", dt.date(2024, 7, 7),
     dt.datetime(2024, 7, 7, 7, 7, 7), b"\x07" * 100, False, '{"k": "v\\nw"}', 2),
]
EXPECTED = {r[0]: dict(zip(COLUMNS, r, strict=True)) for r in ROWS}

MARIADB_DDL = """CREATE TABLE items (id INT PRIMARY KEY, big BIGINT, num DECIMAL(12,4),
    dbl DOUBLE, vc VARCHAR(100), tx TEXT, d DATE, ts DATETIME(6), b BLOB, flag BOOLEAN,
    j JSON, part INT)"""
SQLITE_DDL = """CREATE TABLE items (id INTEGER PRIMARY KEY, big BIGINT, num DECIMAL(12,4),
    dbl DOUBLE, vc VARCHAR(100), tx TEXT, d DATE, ts DATETIME, b BLOB, flag BOOLEAN,
    j JSON, part INTEGER)"""
PG_DDL = """CREATE TABLE items (id int PRIMARY KEY, big bigint, num numeric(12,4),
    dbl double precision, vc varchar(100), tx text, d date, ts timestamp(6), b bytea,
    flag boolean, j jsonb, part int)"""


@dataclass
class Source:
    kind: str
    url: str


def _sqlite_value(v: Any) -> Any:
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, dt.datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, dt.date):
        return v.isoformat()
    return v


@pytest.fixture(params=["sqlite", "mariadb"])
def source(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Source]:
    marks = ", ".join(["%s"] * len(COLUMNS))
    if request.param == "sqlite":
        path = tmp_path / "source.db"
        with sqlite3.connect(path) as conn:
            conn.execute(SQLITE_DDL)
            conn.executemany(f"INSERT INTO items VALUES ({marks.replace('%s', '?')})",
                             [tuple(_sqlite_value(v) for v in r) for r in ROWS])
        conn.close()
        yield Source("sqlite", f"sqlite:///{path}")
        return
    from etl.dialects import make_engine

    url = request.getfixturevalue("make_mariadb_db")("exp")  # skipped (CI: failed) if absent
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(MARIADB_DDL)
            conn.exec_driver_sql(f"INSERT INTO items VALUES ({marks})", ROWS)
    finally:
        engine.dispose()
    yield Source("mariadb", url)


@pytest.fixture
def state(make_db: Callable[[str], str]) -> str:
    return make_db("state")


def same_json(a: Any, b: Any) -> bool:
    return (a is None and b is None) or json.loads(a) == json.loads(b)


def check_row(got: dict[str, Any], names: tuple[str, ...] = COLUMNS) -> None:
    want = EXPECTED[got["id"]]
    for name in names:
        g, w = got[name], want[name]
        if name == "j":
            assert same_json(g, w) if isinstance(g, str) or g is None else g == json.loads(w), \
                (got["id"], name, g, w)
        else:
            assert g == w and type(g) is type(w), (got["id"], name, g, w)


def test_parquet_holds_the_values_exactly(source: Source, state: str, tmp_path: Path) -> None:
    out = tmp_path / "pq"
    result = etl.export(source=source.url, table="items", to=out, state=state, chunk_size=3,
                        compression="zstd")
    assert result.status is etl.Status.COMPLETED, result.message
    assert result.succeeded == len(ROWS)
    table = pq.read_table(out)
    s = table.schema
    assert s.field("id").type == (pa.int64() if source.kind == "sqlite" else pa.int32())
    assert not s.field("id").nullable and s.field("big").nullable
    assert s.field("big").type == pa.int64() and s.field("dbl").type == pa.float64()
    assert s.field("num").type == pa.decimal128(12, 4)
    assert s.field("d").type == pa.date32() and s.field("ts").type == pa.timestamp("us")
    assert s.field("b").type == pa.binary() and s.field("flag").type == pa.bool_()
    assert s.field("vc").type == pa.string() and s.field("j").type == pa.string()
    rows = table.to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(EXPECTED)
    for r in rows:
        check_row(r)
    files = data_files(out)
    assert [f.name for f in files] == [f"export-items.w0001.00000{i}.parquet" for i in (1, 2, 3)]
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [1, 1, 1]
    doc = manifest(out, "export-items")
    assert doc["complete"] and doc["rows"] == len(ROWS)
    num = next(c for c in doc["schema"] if c["name"] == "num")
    assert num["type"].upper().replace(" ", "") == "DECIMAL(12,4)" and num["file_type"] == "decimal128(12, 4)"
    assert [e["up_to_key"] for e in doc["files"]] == [[3], [6], [7]]


def test_csv_loads_back_into_postgresql_exactly(source: Source, state: str, tmp_path: Path,
                                                make_db: Callable[[str], str]) -> None:
    out = tmp_path / "csv"
    result = etl.export(source=source.url, table="items", to=out, state=state, format="csv",
                        chunk_size=2)
    assert result.ok, result.message
    files = data_files(out)
    assert len(files) == 4
    assert files[0].read_text(encoding="utf-8").splitlines()[0] == ",".join(COLUMNS)
    target = make_db("csvload")
    with psycopg.connect(target, autocommit=True) as conn:
        conn.execute(PG_DDL)
    loaded = etl.load([str(f) for f in files], table="items", target=target)
    assert loaded.ok and loaded.succeeded == len(ROWS), loaded.message
    with psycopg.connect(target, autocommit=True) as conn:
        cur = conn.execute(f"SELECT {', '.join(COLUMNS)}, j::text FROM items ORDER BY id")
        got = [dict(zip((*COLUMNS, "j_text"), r, strict=True)) for r in cur.fetchall()]
    assert [g["id"] for g in got] == sorted(EXPECTED)
    for g in got:
        g["j"] = g.pop("j_text")
        check_row(g)


def test_ndjson_has_exact_numbers_iso_dates_and_hex_bytes(source: Source, state: str,
                                                          tmp_path: Path) -> None:
    out = tmp_path / "nd"
    result = etl.export(source=source.url, table="items", to=out, state=state,
                        format="ndjson", compression="gzip", chunk_size=4)
    assert result.ok, result.message
    import gzip

    lines = [line for f in data_files(out)
             for line in gzip.decompress(f.read_bytes()).decode("utf-8").split("\n") if line]
    assert len(lines) == len(ROWS)
    for line in lines:
        row = json.loads(line, parse_float=Decimal)
        want = EXPECTED[row["id"]]
        assert list(row) == list(COLUMNS)
        if want["num"] is not None:
            assert isinstance(row["num"], Decimal) and str(row["num"]) == str(want["num"])
        assert row["dbl"] == (None if want["dbl"] is None else Decimal(repr(want["dbl"])))
        assert row["d"] == (want["d"].isoformat() if want["d"] else None)
        assert row["ts"] == (want["ts"].isoformat() if want["ts"] else None)
        assert row["b"] == (None if want["b"] is None else "\\x" + want["b"].hex())
        assert row["j"] == (None if want["j"] is None else json.loads(want["j"]))
        for name in ("big", "vc", "tx", "flag", "part"):
            assert row[name] == want[name], (row["id"], name)


def test_stop_then_resume_exports_every_row_once(source: Source, state: str,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "resume"
    args: dict[str, Any] = dict(source=source.url, table="items", to=out, state=state,
                                format="csv", compression="zstd", chunk_size=2,
                                rows_per_file=3)
    stop = StopFlag()
    first = etl.export(**args, progress=StopAfter(stop, 1), stop=stop)
    assert first.status is etl.Status.STOPPED, first.message
    before = [e["file"] for e in manifest(out, "export-items")["files"]]
    assert len(before) == 1
    again = etl.export(**args)
    assert again.status is etl.Status.COMPLETED, again.message
    doc = manifest(out, "export-items")
    assert doc["complete"] and [e["rows"] for e in doc["files"]] == [3, 3, 1]
    assert doc["files"][0]["file"] == before[0]  # resumed, not redone
    import pyarrow.csv as pcsv

    ids: list[int] = []
    for f in data_files(out):
        with pa.CompressedInputStream(pa.OSFile(str(f)), "zstd") as stream:
            ids += pcsv.read_csv(stream).column("id").to_pylist()
    assert ids == sorted(EXPECTED)


def test_query_with_key_where_and_columns(source: Source, state: str, tmp_path: Path) -> None:
    out = tmp_path / "q"
    result = etl.export(source=source.url, query="SELECT id, vc, num, d FROM items WHERE id > 1",
                        key="id", to=out, state=state, chunk_size=2, where="id <> 4",
                        columns="id,num,d")
    assert result.ok, result.message
    rows = sorted(pq.read_table(out).to_pylist(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == [2, 3, 5, 6, 7]
    assert list(rows[0]) == ["id", "num", "d"]
    for r in rows:
        check_row(r, ("num", "d"))
    with pytest.raises(etl.UsageError, match="--query needs --key"):
        etl.export(source=source.url, query="SELECT id FROM items", to=tmp_path / "x",
                   state=state)


def test_partition_by_writes_hive_directories(source: Source, state: str,
                                              tmp_path: Path) -> None:
    out = tmp_path / "parts"
    plan = etl.export(source=source.url, table="items", to=out, state=state,
                      partition_by="part", chunk_size=3, dry_run=True)
    assert "partitions:   part=…" in plan.metadata["plan"] and "per chunk:" in plan.metadata["plan"]
    assert plan.total_items == len(ROWS) and not out.exists()
    result = etl.export(source=source.url, table="items", to=out, state=state,
                        partition_by="part", chunk_size=3)
    assert result.ok, result.message
    dirs = sorted({f.parent.name for f in data_files(out)})
    assert dirs == ["part=1", "part=2", "part=__HIVE_DEFAULT_PARTITION__"]
    doc = manifest(out, "export-items")
    assert {e["partition"]["part"] for e in doc["files"]} == {"1", "2", None}
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    assert "part" in table.column_names
    got = {r["id"]: r["part"] for r in table.to_pylist()}
    assert got == {i: r["part"] for i, r in EXPECTED.items()}
    assert "part" not in pq.read_schema(data_files(out)[0]).names


def test_mariadb_timestamp_is_utc_aware_and_the_cli_exports(make_mariadb_db, state: str,
                                                             tmp_path: Path) -> None:
    from etl.dialects import make_engine

    url = make_mariadb_db("ts")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:  # the session is UTC (etl.dialects)
            conn.exec_driver_sql("CREATE TABLE ev (id BIGINT PRIMARY KEY, at TIMESTAMP(6) NULL, "
                                 "t TIME(6), f FLOAT, e ENUM('a','b'))")
            conn.exec_driver_sql("INSERT INTO ev VALUES (1, '2024-03-01 10:20:30.500000', "
                                 "'12:34:56.000001', 0.5, 'b'), (2, NULL, NULL, NULL, NULL)")
    finally:
        engine.dispose()
    out = tmp_path / "ev"
    from tests.conftest import run_etl

    done = run_etl("export", "--source", url, "--state", state, "--table", "ev", "--to",
                   str(out), "--no-progress", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["summary"]["succeeded"] == 2
    table = pq.read_table(out)
    assert table.schema.field("at").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("t").type == pa.time64("us")
    assert table.schema.field("f").type == pa.float32()
    assert table.schema.field("e").type == pa.string()
    first = sorted(table.to_pylist(), key=lambda r: r["id"])[0]
    assert first["at"] == dt.datetime(2024, 3, 1, 10, 20, 30, 500000, tzinfo=dt.UTC)
    assert first["t"] == dt.time(12, 34, 56, 1) and first["f"] == 0.5 and first["e"] == "b"
    helped = run_etl("export", "--help")
    assert "MySQL/MariaDB" in helped.stdout and "SQLite" in helped.stdout


def test_a_value_parquet_cannot_hold_fails_the_chunk_clearly(state: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER)")
        conn.execute("INSERT INTO t VALUES (1, 5), (2, 'not a number')")
    conn.close()
    out = tmp_path / "o"
    result = etl.export(source=f"sqlite:///{path}", table="t", to=out, state=state)
    assert result.status is etl.Status.FAILED
    assert result.message.startswith("column n (INTEGER) of t: a value Parquet's int64 cannot "
                                     "hold ('not a number')"), result.message
    assert data_files(out) == []
    again = etl.export(source=f"sqlite:///{path}", table="t", to=out, state=state, format="csv")
    assert again.ok, again.message
    assert data_files(out)[0].read_text() == "id,n\n1,5\n2,not a number\n"
