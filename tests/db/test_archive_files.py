"""`etl archive --to-dir DIR --format parquet|csv` on a real PostgreSQL: the files read back
equal the archived rows exactly (numeric, timestamptz, non-ASCII text, NULL vs empty, bytea),
the manifest agrees with the files on disk, the source keeps every other row; --no-delete
twice, --dry-run, a second walk, usage errors. No mocks."""

from __future__ import annotations

import csv
import hashlib
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql

import etl
from tests.conftest import execute, run_etl, scalar

pytestmark = pytest.mark.timeout(180)

ROWS = 20_000
CUTOFF = f"timestamptz '2024-01-01 00:00:00+00' + interval '{ROWS // 2} minutes'"
WHERE = f"created_at < {CUTOFF}"
JOB = "archive:public.ev"
PREFIX = "archive-public.ev"
# the columns as exact Python values: json and arrays as PostgreSQL's text (the files keep it)
SELECT = ("SELECT id, created_at, kind, amount, flag, day, ratio, blob, doc::text, tags::text, "
          "note FROM {}")


def make_events(url: str, rows: int = ROWS, table: str = "ev") -> None:
    execute(url, f"""
        CREATE TABLE {table} (
            id         bigint PRIMARY KEY,
            created_at timestamptz NOT NULL,
            kind       text,
            amount     numeric(12, 2),
            flag       boolean,
            day        date,
            ratio      double precision,
            blob       bytea,
            doc        jsonb,
            tags       text[],
            note       text
        );
        INSERT INTO {table}
        SELECT g, timestamptz '2024-01-01 00:00:00+00' + ((g * 7919) % {rows}) * interval '1 minute'
                  + (g % 1000) * interval '1 microsecond',
               CASE g % 4 WHEN 0 THEN NULL WHEN 1 THEN '' WHEN 2 THEN 'Zürich — 東京 ✓'
                          ELSE 'a "quoted", comma' || chr(10) || 'new line' END,
               CASE WHEN g % 11 = 0 THEN NULL ELSE g * 1.25 + 9999999.99 * (g % 2) END,
               CASE WHEN g % 5 = 0 THEN NULL ELSE g % 2 = 0 END,
               date '2020-02-29' + g % 3000,
               CASE WHEN g % 13 = 0 THEN NULL ELSE g / 7.0::float8 END,
               CASE WHEN g % 6 = 0 THEN NULL ELSE decode(md5(g::text), 'hex') END,
               CASE WHEN g % 7 = 0 THEN NULL ELSE jsonb_build_object('g', g, 'ü', 'ß') END,
               ARRAY['t' || g % 5, NULL],
               CASE WHEN g % 9 = 0 THEN 'NULL' ELSE repeat('x', g % 40) END
        FROM generate_series(1, {rows}) AS g;
        ANALYZE {table};
    """)


def typed_rows(url: str, table: str = "ev", where: str = "true") -> dict[int, tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        q = sql.SQL(SELECT + " WHERE {}").format(sql.Identifier(*table.split(".")),
                                                 sql.SQL(where))  # type: ignore[arg-type]
        return {r[0]: tuple(r) for r in conn.execute(q)}


def manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / f"_{PREFIX}.manifest.json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_manifest_matches_disk(directory: Path) -> list[dict[str, Any]]:
    """Every file the manifest lists exists with its sha256, bytes and row count, and DIR
    holds nothing else (no temporary file, no file outside the manifest)."""
    doc = manifest(directory)
    assert doc["job_id"] == JOB
    entries = doc["files"]
    for e in entries:
        path = directory / e["file"]
        assert path.exists(), e
        assert sha256(path) == e["sha256"]
        assert path.stat().st_size == e["bytes"]
        assert file_rows(path) == e["rows"] > 0
    on_disk = sorted(p.name for p in directory.iterdir())
    assert on_disk == sorted([*(e["file"] for e in entries), f"_{PREFIX}.manifest.json"])
    positions = [(e["walk"], e["chunk_index"]) for e in entries]
    assert len(set(positions)) == len(positions)
    return entries


def file_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with open(path, newline="", encoding="utf-8") as fh:
        return sum(1 for _ in csv.reader(fh)) - 1  # quoted newlines stay in their row


def parquet_rows(directory: Path) -> list[tuple[Any, ...]]:
    """Every row of every Parquet file in DIR, as the Python values pyarrow reads."""
    out = []
    for path in sorted(directory.glob("*.parquet")):
        table = pq.read_table(path)
        for r in table.to_pylist():
            out.append((r["id"], r["created_at"], r["kind"], r["amount"], r["flag"], r["day"],
                        r["ratio"], r["blob"], r["doc"], r["tags"], r["note"]))
    return out


def archive_cli(src: str, *extra: str) -> list[str]:
    return ["archive", "--source", src, "--table", "ev", "--where", WHERE, "--no-progress",
            *extra]


# -- Parquet ----------------------------------------------------------------------------------

def test_parquet_files_hold_the_archived_rows_exactly(src: str, tmp_path: Path) -> None:
    make_events(src)
    matching = typed_rows(src, where=WHERE)
    others = typed_rows(src, where=f"NOT ({WHERE})")
    assert len(matching) == ROWS // 2
    out = tmp_path / "arch"
    result = etl.archive(source=src, table="ev", where=WHERE, to_dir=out, format="parquet",
                         chunk_size=3000)
    assert result.status.value == "completed", result.message
    doc = result.to_dict()
    assert doc["summary"]["succeeded"] == ROWS // 2
    entries = assert_manifest_matches_disk(out)
    assert doc["artifacts"]["manifest"] == str(out / f"_{PREFIX}.manifest.json")
    assert doc["artifacts"]["output_files"] == [str(out / e["file"]) for e in entries]
    assert sum(e["rows"] for e in entries) == ROWS // 2
    assert [e["chunk_index"] for e in entries] == list(range(1, len(entries) + 1))
    # exact values: numeric as decimal128(12,2), timestamptz as UTC microseconds, bytea …
    schema = pq.read_schema(out / entries[0]["file"])
    assert schema.field("amount").type == pa.decimal128(12, 2)
    assert schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("id").type == pa.int64() and not schema.field("id").nullable
    assert schema.field("day").type == pa.date32()
    assert schema.field("blob").type == pa.binary()
    rows = parquet_rows(out)
    assert len(rows) == len({r[0] for r in rows}) == ROWS // 2  # none twice
    assert {r[0]: r for r in rows} == matching
    assert any(isinstance(r[3], Decimal) and r[3] > Decimal("9999999") for r in rows)
    assert {r[2] for r in rows} >= {None, "", "Zürich — 東京 ✓"}
    # the source holds every other row, untouched, and none of the archived ones
    assert typed_rows(src) == others
    # key ranges: each file's keys lie in (after_key, up_to_key]
    for e in entries:
        ids = pq.read_table(out / e["file"], columns=["id"]).column("id").to_pylist()
        lo = e["after_key"][0] if e["after_key"] else 0
        assert all(lo < i <= e["up_to_key"][0] for i in ids)


def test_a_second_walk_never_rewrites_the_first_walks_files(src: str, tmp_path: Path) -> None:
    make_events(src, rows=2_000)
    out = tmp_path / "arch"
    where = "id <= 1000"
    r1 = etl.archive(source=src, table="ev", where=where, to_dir=out, chunk_size=400)
    assert r1.status.value == "completed"
    first = {e["file"]: e["sha256"] for e in manifest(out)["files"]}
    assert len(first) == 3 and all(".w0001." in f for f in first)
    r2 = etl.archive(source=src, table="ev", where="id <= 1500", to_dir=out, chunk_size=400)
    assert r2.status.value == "completed"
    entries = assert_manifest_matches_disk(out)
    assert {e["file"]: e["sha256"] for e in entries if e["walk"] == 1} == first
    assert sum(e["rows"] for e in entries if e["walk"] == 2) == 500
    assert sorted(r[0] for r in parquet_rows(out)) == list(range(1, 1501))
    assert scalar(src, "SELECT min(id) FROM ev") == 1501


# -- CSV --------------------------------------------------------------------------------------

def test_csv_files_are_postgresqls_csv_and_load_back_exactly(src: str, tmp_path: Path) -> None:
    make_events(src)
    matching = typed_rows(src, where=WHERE)
    out = tmp_path / "arch"
    proc = run_etl(*archive_cli(src, "--to-dir", str(out), "--format", "csv", "--chunk-size",
                                "2500", "--json"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    entries = assert_manifest_matches_disk(out)
    assert report["artifacts"]["output_files"] == [str(out / e["file"]) for e in entries]
    assert all(e["file"].endswith(".csv") for e in entries)
    assert sum(e["rows"] for e in entries) == ROWS // 2
    # PostgreSQL reads its own CSV back: NULL vs '' vs 'NULL', quotes, newlines, bytea …
    execute(src, "CREATE TABLE back (LIKE ev)")
    with psycopg.connect(src, autocommit=True) as conn:
        for e in entries:
            text = (out / e["file"]).read_bytes()
            assert text.splitlines()[0] == (b"id,created_at,kind,amount,flag,day,ratio,blob,"
                                            b"doc,tags,note")
            with conn.cursor() as cur:
                with cur.copy("COPY back FROM STDIN (FORMAT csv, HEADER)") as copy:
                    copy.write(text)
                assert cur.rowcount == e["rows"]
    assert typed_rows(src, "back") == matching
    assert scalar(src, f"SELECT count(*) FROM ev WHERE {WHERE}") == 0
    assert scalar(src, "SELECT count(*) FROM ev") == ROWS - ROWS // 2


# -- --no-delete, --dry-run, usage ------------------------------------------------------------

def test_no_delete_to_files_twice_writes_nothing_new(src: str, tmp_path: Path) -> None:
    make_events(src, rows=5_000)
    before = typed_rows(src)
    out = tmp_path / "arch"
    r1 = etl.archive(source=src, table="ev", where=WHERE.replace(str(ROWS // 2), "2500"),
                     to_dir=out, no_delete=True, chunk_size=1000)
    assert r1.status.value == "completed", r1.message
    entries = assert_manifest_matches_disk(out)
    assert sum(e["rows"] for e in entries) == 2500
    assert typed_rows(src) == before  # nothing deleted
    stamps = {p.name: (p.stat().st_mtime_ns, sha256(p)) for p in out.iterdir()}
    r2 = etl.archive(source=src, table="ev", where=WHERE.replace(str(ROWS // 2), "2500"),
                     to_dir=out, no_delete=True, chunk_size=1000)
    assert r2.status.value == "completed", r2.message
    assert r2.to_dict()["artifacts"]["output_files"] == []
    assert r2.to_dict()["metadata"]["rows_this_run"] == 0  # (the summary counts the walk)
    assert {p.name: (p.stat().st_mtime_ns, sha256(p)) for p in out.iterdir()} == stamps
    assert typed_rows(src) == before


def test_dry_run_creates_nothing(src: str, tmp_path: Path) -> None:
    make_events(src, rows=3_000)
    out = tmp_path / "arch"
    proc = run_etl(*archive_cli(src, "--to-dir", str(out), "--dry-run", "--chunk-size", "500"))
    assert proc.returncode == 0, proc.stderr
    assert "parquet files archive-public.ev.wNNNN" in proc.stdout + proc.stderr
    assert "COPY (DELETE FROM" in proc.stdout + proc.stderr
    assert not out.exists()
    assert scalar(src, "SELECT to_regnamespace('etl')") is None
    assert scalar(src, "SELECT count(*) FROM ev") == 3_000


@pytest.mark.parametrize("extra", [["--to-table", "ev_archive"], ["--to", "postgresql://x/y"],
                                   ["--purge"]])
def test_to_dir_refuses_another_destination(src: str, tmp_path: Path, extra: list[str]) -> None:
    proc = run_etl(*archive_cli(src, "--to-dir", str(tmp_path / "a"), *extra))
    assert proc.returncode == 2, proc.stderr
    assert "--to-dir" in proc.stderr
    assert not (tmp_path / "a").exists()


def test_format_needs_to_dir_and_a_known_value(src: str, tmp_path: Path) -> None:
    proc = run_etl(*archive_cli(src, "--to-table", "a", "--format", "csv"))
    assert proc.returncode == 2 and "--format" in proc.stderr
    proc = run_etl(*archive_cli(src, "--to-dir", str(tmp_path), "--format", "xlsx"))
    assert proc.returncode == 2 and "xlsx" in proc.stderr


def archived_rows(directory: Path, url: str) -> list[tuple[Any, ...]]:
    """Every row of every chunk file in DIR (Parquet through pyarrow; CSV loaded back by
    PostgreSQL into a temporary table), as exact Python values."""
    rows = parquet_rows(directory)
    csvs = sorted(directory.glob("*.csv"))
    if csvs:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TEMP TABLE back (LIKE ev)")
            for path in csvs:
                with conn.cursor() as cur, \
                        cur.copy("COPY back FROM STDIN (FORMAT csv, HEADER)") as copy:
                    copy.write(path.read_bytes())
            rows += [tuple(r) for r in conn.execute(sql.SQL(SELECT).format(
                sql.Identifier("pg_temp", "back")))]
    return rows


def test_a_value_parquet_cannot_hold_stops_the_run_and_keeps_its_rows(src: str,
                                                                      tmp_path: Path) -> None:
    """NaN in a numeric(12,2): the chunk holding it is rolled back (its rows stay, no file
    is left for it); the rerun with --format csv resumes at that chunk and finishes."""
    make_events(src, rows=1_000)
    execute(src, "UPDATE ev SET amount = 'NaN' WHERE id = 450")
    out = tmp_path / "arch"
    r1 = etl.archive(source=src, table="ev", where="id <= 800", to_dir=out, chunk_size=200)
    assert r1.status.value == "failed"
    assert "--format csv" in (r1.message or "")
    entries = assert_manifest_matches_disk(out)  # no temporary file left behind either
    assert [e["chunk_index"] for e in entries] == [1, 2]
    assert scalar(src, "SELECT min(id) FROM ev") == 401
    assert sorted(r[0] for r in parquet_rows(out)) == list(range(1, 401))
    r2 = etl.archive(source=src, table="ev", where="id <= 800", to_dir=out, chunk_size=200,
                     format="csv")
    assert r2.status.value == "completed", r2.message
    entries = assert_manifest_matches_disk(out)
    assert [(e["chunk_index"], e["format"]) for e in entries] == [
        (1, "parquet"), (2, "parquet"), (3, "csv"), (4, "csv")]
    assert sorted(r[0] for r in archived_rows(out, src)) == list(range(1, 801))
    assert scalar(src, "SELECT min(id) FROM ev") == 801


def test_leftovers_of_a_crash_are_removed_and_foreign_dirs_refused(src: str,
                                                                   tmp_path: Path) -> None:
    make_events(src, rows=1_000)
    out = tmp_path / "arch"
    r1 = etl.archive(source=src, table="ev", where="id <= 400", to_dir=out, chunk_size=200)
    assert r1.status.value == "completed"
    kept = {e["file"]: e["sha256"] for e in manifest(out)["files"]}
    # what a kill leaves: a temporary file, a spool, a renamed file never listed
    for stray in (f".{PREFIX}.w0002.000001.parquet.tmp", f".{PREFIX}.w0002.000001.parquet.csv.tmp",
                  f"{PREFIX}.w0002.000001.parquet", f"._{PREFIX}.manifest.json.tmp"):
        (out / stray).write_bytes(b"partial")
    (out / "someone-elses.parquet").write_bytes(b"not ours")
    r2 = etl.archive(source=src, table="ev", where="id <= 600", to_dir=out, chunk_size=200)
    assert r2.status.value == "completed", r2.message
    (out / "someone-elses.parquet").unlink()  # another name: left alone
    entries = assert_manifest_matches_disk(out)
    assert {e["file"]: e["sha256"] for e in entries if e["walk"] == 1} == kept
    assert sorted(r[0] for r in parquet_rows(out)) == list(range(1, 601))
    # a manifest of another job, or chunk files without their manifest: refused, untouched
    other = etl.archive(source=src, table="ev", where="id <= 700", to_dir=out, job="other:ev",
                        chunk_size=200)
    assert other.status.value == "completed"  # its own prefix: both jobs share DIR fine
    (out / f"_{PREFIX}.manifest.json").rename(tmp_path / "saved.json")
    res = run_etl(*archive_cli(src, "--to-dir", str(out)))
    assert res.returncode == 1 and "not its manifest" in res.stderr, res.stderr
    assert scalar(src, "SELECT min(id) FROM ev") == 701
