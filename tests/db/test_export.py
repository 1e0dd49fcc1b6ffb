"""`etl export`: PostgreSQL into Parquet, CSV and NDJSON files — exact types, manifest,
partitions, files per chunk or per N rows, resume — and the round trips back through
`etl load`."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import etl
from etl.runner import StopFlag
from tests.conftest import execute, fingerprint, run_etl, scalar
from tests.db.test_archive import StopAfter
from tests.db.test_copy_roundtrip import ALL_TYPES

PREFIX = "export-public.everything"
# The values each Parquet column must hold, as PostgreSQL computes them (text where the
# file holds the text form).
EXPECTED_SQL = """
SELECT id, i4, i2, num, num_free::text, r4, r8, txt, vc, ch, raw, jb::text, js::text, u::text,
       d, ts, tstz, iv::text, flag, ints, texts, m::text, p::text
FROM everything WHERE id <> 3 ORDER BY id"""


def manifest(directory: Path, prefix: str = PREFIX) -> dict:
    return json.loads((directory / f"_{prefix}.manifest.json").read_text())


def data_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(("_", ".")))


def rows_of(url: str, query: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        return conn.execute(query).fetchall()


def same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


def test_parquet_holds_every_type_exactly(src: str, tmp_path: Path) -> None:
    execute(src, ALL_TYPES)
    out = tmp_path / "out"
    result = etl.export(source=src, table="everything", to=out, state=src, chunk_size=2,
                        where="id <> 3")
    assert result.status is etl.Status.COMPLETED, result.message
    assert result.succeeded == 3
    table = pq.read_table(out)  # the manifest ("_" first) is skipped by readers of DIR
    s = table.schema
    assert s.field("num").type == pa.decimal128(14, 4)
    assert s.field("tstz").type == pa.timestamp("us", tz="UTC")
    assert s.field("ts").type == pa.timestamp("us")
    assert s.field("d").type == pa.date32()
    assert s.field("raw").type == pa.binary()
    assert s.field("ints").type == pa.list_(pa.int32())
    assert s.field("texts").type == pa.list_(pa.string())
    assert s.field("jb").type == pa.string() and s.field("num_free").type == pa.string()
    assert s.field("r4").type == pa.float32() and s.field("i2").type == pa.int16()
    assert not s.field("i4").nullable and s.field("i2").nullable
    got = sorted(table.to_pylist(), key=lambda r: r["id"])
    names = table.column_names
    want = rows_of(src, EXPECTED_SQL)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want, strict=True):
        for name, expected in zip(names, w, strict=True):
            if name == "r4" and expected is not None:  # a real is a float32 in the file
                expected = pa.array([expected], pa.float32()).to_pylist()[0]
            assert same(g[name], expected), (g["id"], name, g[name], expected)
    # one file a chunk, one row group a file
    files = data_files(out)
    assert [f.name for f in files] == [f"{PREFIX}.w0001.00000{i}.parquet" for i in (1, 2)]
    assert [pq.ParquetFile(f).metadata.num_row_groups for f in files] == [1, 1]


def test_values_parquet_cannot_hold_fail_the_export_clearly(src: str, tmp_path: Path) -> None:
    execute(src, ALL_TYPES)
    result = etl.export(source=src, table="everything", to=tmp_path / "o", state=src)
    assert result.status is etl.Status.FAILED
    assert "infinite date or timestamp" in result.message and "--format csv" in result.message
    # the column, the row's key and the value
    assert result.message.startswith("column d (date) of public.everything, the row with key "
                                     "[3]: invalid value 'infinity'"), result.message
    assert data_files(tmp_path / "o") == []  # nothing half-written is left


def test_manifest_lists_files_rows_sha256_and_schema(src: str, tmp_path: Path) -> None:
    execute(src, "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL);"
                 "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 2500) g")
    out = tmp_path / "o"
    result = etl.export(source=src, table="t", to=out, state=src, format="csv",
                        compression="gzip", chunk_size=1000)
    assert result.ok, result.message
    doc = manifest(out, "export-public.t")
    assert doc["complete"] is True and doc["rows"] == 2500 and doc["format"] == "csv"
    assert doc["schema"] == [
        {"name": "id", "type": "integer", "file_type": "text", "nullable": False},
        {"name": "v", "type": "text", "file_type": "text", "nullable": False}]
    assert [e["rows"] for e in doc["files"]] == [1000, 1000, 500]
    assert [e["up_to_key"] for e in doc["files"]] == [[1000], [2000], [2500]]
    for e in doc["files"]:
        body = (out / e["file"]).read_bytes()
        assert hashlib.sha256(body).hexdigest() == e["sha256"] and len(body) == e["bytes"]
        lines = gzip.decompress(body).decode().splitlines()
        assert lines[0] == "id,v" and len(lines) == e["rows"] + 1  # a header in each file
    assert result.artifacts["output_files"] == [str(out / e["file"]) for e in doc["files"]]


def test_rows_per_file_holds_row_groups_of_the_chunk_size(src: str, tmp_path: Path) -> None:
    execute(src, "CREATE TABLE t (id int PRIMARY KEY, n numeric(10,2));"
                 "INSERT INTO t SELECT g, g / 100.0 FROM generate_series(1, 2500) g")
    out = tmp_path / "o"
    result = etl.export(source=src, table="t", to=out, state=src, rows_per_file=1000,
                        chunk_size=300, compression="zstd")
    assert result.ok, result.message
    files = data_files(out)
    meta = [pq.ParquetFile(f).metadata for f in files]
    assert [m.num_rows for m in meta] == [1000, 1000, 500]
    assert [[m.row_group(i).num_rows for i in range(m.num_row_groups)] for m in meta] == [
        [300, 300, 300, 100], [300, 300, 300, 100], [300, 200]]
    assert meta[0].row_group(0).column(0).compression == "ZSTD"
    values = pq.read_table(out).column("n").to_pylist()
    assert sorted(values) == [v[0] for v in rows_of(src, "SELECT n FROM t ORDER BY n")]


def test_partition_by_writes_hive_directories(src: str, tmp_path: Path) -> None:
    execute(src, """CREATE TABLE ev (id int PRIMARY KEY, day date, region text, v int);
        INSERT INTO ev SELECT g, date '2024-01-01' + (g % 3),
            CASE WHEN g % 5 = 0 THEN NULL WHEN g % 2 = 0 THEN 'eu/west' ELSE 'us' END, g
        FROM generate_series(1, 600) g""")
    out = tmp_path / "o"
    result = etl.export(source=src, table="ev", to=out, state=src, partition_by="day,region",
                        chunk_size=250)
    assert result.ok and result.succeeded == 600, result.message
    dirs = sorted({f.parent.relative_to(out).as_posix() for f in data_files(out)})
    assert dirs == [f"day=2024-01-0{d}/region={r}" for d in (1, 2, 3)
                    for r in ("__HIVE_DEFAULT_PARTITION__", "eu%2Fwest", "us")]
    dataset = ds.dataset(out, format="parquet", partitioning="hive")
    table = dataset.to_table()
    assert table.num_rows == 600 and sorted(table.column("id").to_pylist()) == list(range(1, 601))
    assert "region" not in pq.read_schema(data_files(out)[0]).names  # in the path only
    doc = manifest(out, "export-public.ev")
    assert sum(e["rows"] for e in doc["files"]) == 600
    some = next(e for e in doc["files"] if e["partition"]["region"] is None)
    assert some["partition"]["day"].startswith("2024-01-0")
    by_part = {(r[0], r[1]): r[2] for r in rows_of(
        src, "SELECT day::text, region, count(*) FROM ev GROUP BY 1, 2")}
    for (day, region), n in by_part.items():
        assert sum(e["rows"] for e in doc["files"] if e["partition"] == {
            "day": day, "region": region}) == n


def test_query_export_with_key_and_where(src: str, tmp_path: Path) -> None:
    execute(src, """CREATE TABLE a (id int PRIMARY KEY, name text);
        CREATE TABLE b (id int PRIMARY KEY, a_id int, amount numeric(8,2));
        INSERT INTO a SELECT g, 'n' || g FROM generate_series(1, 50) g;
        INSERT INTO b SELECT g, g % 50 + 1, g * 1.25 FROM generate_series(1, 400) g""")
    out = tmp_path / "o"
    result = etl.export(source=src, query="SELECT b.id, a.name, b.amount FROM b JOIN a "
                        "ON a.id = b.a_id", key="id", where="amount > 100", to=out, state=src,
                        format="ndjson", chunk_size=100)
    assert result.ok, result.message
    rows = [json.loads(line) for f in data_files(out) for line in f.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(81, 401))
    assert rows[0] == {"id": 81, "name": "n32", "amount": 101.25}


def test_stop_then_resume_and_rerun_replaces_the_files(src: str, tmp_path: Path) -> None:
    execute(src, "CREATE TABLE t (id int PRIMARY KEY);"
                 "INSERT INTO t SELECT generate_series(1, 1000)")
    out = tmp_path / "o"
    stop = StopFlag()
    first = etl.export(source=src, table="t", to=out, state=src, chunk_size=100,
                       progress=StopAfter(stop, 3), stop=stop)
    assert first.status is etl.Status.STOPPED and first.succeeded == 300
    assert manifest(out, "export-public.t")["complete"] is False
    second = etl.export(source=src, table="t", to=out, state=src, chunk_size=100)
    assert second.ok and second.succeeded == 1000 and second.rows_this_run == 700
    ids = pq.read_table(out).column("id").to_pylist()
    assert sorted(ids) == list(range(1, 1001))
    # another directory while the job is unfinished is refused; a finished one is replaced
    execute(src, "INSERT INTO t SELECT generate_series(1001, 1100)")
    third = etl.export(source=src, table="t", to=out, state=src, chunk_size=500)
    assert third.ok and third.succeeded == 1100
    names = [f.name for f in data_files(out)]
    assert names == [f"export-public.t.w0002.00000{i}.parquet" for i in (1, 2, 3)]
    assert sorted(pq.read_table(out).column("id").to_pylist()) == list(range(1, 1101))


def test_an_unfinished_job_refuses_another_directory(src: str, tmp_path: Path) -> None:
    execute(src, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 300)")
    stop = StopFlag()
    etl.export(source=src, table="t", to=tmp_path / "a", state=src, chunk_size=100,
               progress=StopAfter(stop, 1), stop=stop)
    out = run_etl("export", "--source", src, "--state", src, "--table", "t",
                  "--to", str(tmp_path / "b"))
    assert out.returncode == 2, out.stderr
    assert f"is exporting into {tmp_path / 'a'}" in out.stderr and "--job" in out.stderr


def test_csv_and_ndjson_keep_special_values(src: str, tmp_path: Path) -> None:
    """Infinite dates and timestamps, NaN, ±Infinity: text formats hold them all."""
    execute(src, ALL_TYPES)
    for fmt in ("csv", "ndjson"):
        result = etl.export(source=src, table="everything", to=tmp_path / fmt, state=src,
                            format=fmt, job=f"e-{fmt}")
        assert result.ok and result.succeeded == 4, result.message
    (csv_file,) = data_files(tmp_path / "csv")
    assert "infinity" in csv_file.read_text()
    (nd,) = data_files(tmp_path / "ndjson")
    row3 = json.loads(nd.read_text().splitlines()[2])
    assert row3["d"] == "infinity" and row3["tstz"] == "-infinity"
    # json keeps its text; a multi-line json value is folded to stay on its NDJSON line
    execute(src, "INSERT INTO everything (id, i4, js) VALUES (5, 5, E'{\"a\":\\n 1}')")
    etl.export(source=src, table="everything", to=tmp_path / "nd2", state=src,
               format="ndjson", job="e-nd2")
    lines = data_files(tmp_path / "nd2")[0].read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[4])["js"] == {"a": 1}


def test_dry_run_and_usage_errors(src: str, tmp_path: Path) -> None:
    execute(src, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    out = run_etl("export", "--source", src, "--state", src, "--table", "t", "--to",
                  str(tmp_path / "o"), "--dry-run", "--partition-by", "v")
    assert out.returncode == 0, out.stderr
    assert "COPY (SELECT" in out.stdout and "v=…" in out.stdout
    assert not (tmp_path / "o").exists()
    cases = [
        (["--table", "t", "--query", "SELECT 1"], "give --table T or --query"),
        (["--query", "SELECT id FROM t"], "--query needs --key"),
        (["--table", "t", "--partition-by", "nope"], "--partition-by nope: no such column"),
        (["--table", "t", "--format", "csv", "--compression", "snappy"], "--compression"),
        (["--table", "t", "--format", "csv", "--json-as", "struct"], "--json-as struct"),
        (["--table", "t", "--where", "nope >"], "--where"),
        (["--table", "missing"], "public.missing does not exist"),
    ]
    for args, message in cases:
        got = run_etl("export", "--source", src, "--state", src, "--to", str(tmp_path / "o"),
                      *args)
        assert got.returncode == (1 if "missing" in args else 2), (args, got.stderr)
        assert message in got.stderr and "Traceback" not in got.stderr, (args, got.stderr)
    got = run_etl("export", "--source", src, "--state", src, "--table", "t", "--to",
                  str(tmp_path / "x.parquet"))
    assert got.returncode == 2 and "give a directory" in got.stderr, got.stderr


def test_json_as_struct(src: str, tmp_path: Path) -> None:
    execute(src, """CREATE TABLE d (id int PRIMARY KEY, doc jsonb);
        INSERT INTO d VALUES (1, '{"a": 1, "b": {"c": "x"}}'), (2, '{"a": 2, "b": null}'),
                             (3, NULL)""")
    out = tmp_path / "o"
    result = etl.export(source=src, table="d", to=out, state=src, json_as="struct")
    assert result.ok, result.message
    table = pq.read_table(out)
    assert pa.types.is_struct(table.schema.field("doc").type)
    assert table.column("doc").to_pylist() == [{"a": 1, "b": {"c": "x"}}, {"a": 2, "b": None},
                                               None]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "ndjson"])
def test_round_trip_through_files_is_exact(src: str, dst: str, tmp_path: Path, fmt: str) -> None:
    """PostgreSQL → files → PostgreSQL: every type of the copy tests identical after the trip
    (Parquet has no infinite dates or timestamps: that row stays out of its trip; NDJSON
    writes a json column's JSON null and SQL NULL alike)."""
    execute(src, ALL_TYPES)
    execute(dst, ALL_TYPES + "; TRUNCATE everything")
    if fmt == "parquet":
        execute(src, "DELETE FROM everything WHERE id = 3")
    out = tmp_path / fmt
    result = etl.export(source=src, table="everything", to=out, state=src, format=fmt,
                        chunk_size=2)
    assert result.ok, result.message
    loaded = etl.load([str(f) for f in data_files(out)], table="everything", target=dst,
                      format=fmt)
    assert loaded.ok and loaded.succeeded == result.succeeded, loaded.message
    if fmt == "ndjson":  # the one thing NDJSON cannot tell apart: JSON null and SQL NULL
        assert scalar(dst, "SELECT js IS NULL FROM everything WHERE id = 2") is True
        execute(src, "UPDATE everything SET js = NULL WHERE js::text = 'null'")
    assert fingerprint(dst, "everything") == fingerprint(src, "everything")
    assert scalar(dst, "SELECT js::text FROM everything WHERE id = 1") == '{ "keep" : "spacing" }'
