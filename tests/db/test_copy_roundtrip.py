"""Copies between two real PostgreSQL databases round-trip every value exactly."""

from __future__ import annotations

import json

import psycopg
import pytest

import etl
from tests.conftest import execute, fingerprint, run_etl, scalar

ALL_TYPES = r"""
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE everything (
    id          bigint PRIMARY KEY,
    i4          integer NOT NULL,
    i2          smallint,
    num         numeric(14, 4),
    num_free    numeric,
    r4          real,
    r8          double precision,
    txt         text,
    vc          varchar(40),
    ch          char(5),
    raw         bytea,
    jb          jsonb,
    js          json,
    u           uuid,
    d           date,
    ts          timestamp,
    tstz        timestamptz,
    iv          interval,
    flag        boolean,
    ints        integer[],
    texts       text[],
    m           mood,
    p           posint
);
INSERT INTO everything VALUES
 (1, 1, 1, 1234567890.1234, 0.000000000000000000001, 1.5, 1e300, 'plain', 'vc', 'ab',
  '\x00ff10', '{"a": [1, 2, {"b": null}]}', '{ "keep" : "spacing" }',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29', '2024-02-29 23:59:59.999999',
  '2024-06-01 12:00:00+02', '1 year 2 mons 3 days 04:05:06.789', true, '{1,NULL,3}',
  '{"a b","c,d","e\"f",NULL}', 'happy', 7),
 (2, -2147483648, -32768, -0.0001, 'NaN', '-Infinity', 'NaN', E'tab\there\nnewline \\ backslash',
  '', '     ', '\x', '[]', 'null', '00000000-0000-0000-0000-000000000000', '0001-01-01',
  '1970-01-01 00:00:00', '1969-12-31 23:59:59.5+00', '-1 days', false, '{}', '{}', 'sad', 1),
 (3, 2147483647, 32767, NULL, NULL, NULL, NULL, '', NULL, NULL, NULL, NULL, NULL, NULL,
  'infinity', NULL, '-infinity', NULL, NULL, NULL, NULL, NULL, NULL),
 (4, 0, 0, 99999999.9999, 1e-20, 3.4e38, -1.7976931348623157e308,
  'ünïcødé ✓ 漢字 🎉 emoji', 'Ω', 'é', '\x5c6e', '{"emoji": "🎉", "esc": "\\n"}',
  '{"dup": 1, "dup": 2}', 'ffffffff-ffff-ffff-ffff-ffffffffffff', '9999-12-31',
  '2038-01-19 03:14:08', '2262-04-11 23:47:16.854775+00', '00:00:00.000001', true,
  '{-1,0,1}', '{"\\\\"}', 'ok', 2147483647);
"""


def test_all_types_round_trip_exactly(src: str, dst: str) -> None:
    execute(src, ALL_TYPES)
    result = etl.copy(source=src, target=dst, table="everything", chunk_size=2)
    assert result.status is etl.Status.COMPLETED, result.message
    assert fingerprint(dst, "everything") == fingerprint(src, "everything")
    # the created table has the same column types, NOT NULL and primary key
    q = ("SELECT string_agg(attname || ' ' || format_type(atttypid, atttypmod) || "
         "CASE WHEN attnotnull THEN ' NN' ELSE '' END, ', ' ORDER BY attnum) FROM pg_attribute "
         "WHERE attrelid = 'public.everything'::regclass AND attnum > 0 AND NOT attisdropped")
    assert scalar(dst, q) == scalar(src, q)
    pk = "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'public.everything'::regclass AND contype = 'p'"
    assert scalar(dst, pk) == "PRIMARY KEY (id)"
    # the domain keeps its check in the target
    with pytest.raises(psycopg.errors.CheckViolation):
        execute(dst, "INSERT INTO everything (id, i4, p) VALUES (99, 0, 0)")
    # json keeps its exact text; jsonb its value
    assert scalar(dst, "SELECT js::text FROM everything WHERE id = 1") == '{ "keep" : "spacing" }'


def test_text_with_special_characters_and_empty_vs_null(src: str, dst: str) -> None:
    execute(src, r"""
        CREATE TABLE notes (id int PRIMARY KEY, body text);
        INSERT INTO notes VALUES (1, ''), (2, NULL), (3, E'\\N'), (4, E'a\tb\nc\rd'),
                                 (5, E'back\\slash'), (6, 'NULL'), (7, E'\\.');
    """)
    assert etl.copy(source=src, target=dst, table="notes").status is etl.Status.COMPLETED
    assert fingerprint(dst, "notes") == fingerprint(src, "notes")
    assert scalar(dst, "SELECT count(*) FROM notes WHERE body IS NULL") == 1
    assert scalar(dst, "SELECT count(*) FROM notes WHERE body = ''") == 1


def test_key_gaps_and_many_chunks(src: str, dst: str) -> None:
    execute(src, """
        CREATE TABLE gappy (id bigint PRIMARY KEY, v text);
        INSERT INTO gappy SELECT g * g, md5(g::text) FROM generate_series(1, 3000) g;
        INSERT INTO gappy VALUES (-9223372036854775808, 'min'), (9223372036854775807, 'max');
    """)
    result = etl.copy(source=src, target=dst, table="gappy", chunk_size=250)
    assert result.status is etl.Status.COMPLETED
    assert fingerprint(dst, "gappy") == fingerprint(src, "gappy")
    assert result.to_dict()["metadata"]["num_chunks"] == 13  # 3002 rows / 250, rounded up
    assert result.to_dict()["last_checkpoint"]["last_key"] == [9223372036854775807]


def test_empty_table(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE nothing (id int PRIMARY KEY, v text)")
    result = etl.copy(source=src, target=dst, table="nothing")
    assert result.status is etl.Status.COMPLETED
    summary = result.to_dict()["summary"]
    assert summary["total_items"] == summary["succeeded"] == 0
    assert scalar(dst, "SELECT count(*) FROM nothing") == 0


def test_composite_key_compared_as_row_values(src: str, dst: str) -> None:
    execute(src, """
        CREATE TABLE pairs (a int, b text, v int, PRIMARY KEY (a, b));
        INSERT INTO pairs SELECT g % 7, 'k' || (g / 7), g FROM generate_series(1, 2000) g;
    """)
    result = etl.copy(source=src, target=dst, table="pairs", chunk_size=97)
    assert result.status is etl.Status.COMPLETED
    assert fingerprint(dst, "pairs") == fingerprint(src, "pairs")
    assert result.to_dict()["metadata"]["key"] == ["a", "b"]
    last = result.to_dict()["last_checkpoint"]["last_key"]
    assert last == list(scalar(src, "SELECT array[a::text, b] FROM pairs ORDER BY a DESC, b DESC LIMIT 1")) \
        or [str(x) for x in last] == list(scalar(src, "SELECT array[a::text, b] FROM pairs ORDER BY a DESC, b DESC LIMIT 1"))


@pytest.mark.parametrize("key_type,expr", [
    ("text", "'key-' || lpad(g::text, 5, '0') || CASE WHEN g % 2 = 0 THEN 'ä' ELSE 'Z' END"),
    ("uuid", "md5(g::text)::uuid"),
    ("timestamptz", "'2020-01-01'::timestamptz + g * interval '1 second 1 microsecond'"),
    ("numeric(10,3)", "g / 1000.0"),
])
def test_non_integer_keys(src: str, dst: str, key_type: str, expr: str) -> None:
    execute(src, f"""
        CREATE TABLE keyed (k {key_type} PRIMARY KEY, v int);
        INSERT INTO keyed SELECT {expr}, g FROM generate_series(1, 1500) g;
    """)
    result = etl.copy(source=src, target=dst, table="keyed", chunk_size=128)
    assert result.status is etl.Status.COMPLETED, result.message
    assert fingerprint(dst, "keyed") == fingerprint(src, "keyed")


def test_explicit_key_on_table_without_primary_key(src: str, dst: str) -> None:
    execute(src, """
        CREATE TABLE nopk (code text NOT NULL UNIQUE, v int);
        INSERT INTO nopk SELECT 'c' || g, g FROM generate_series(1, 500) g;
    """)
    result = etl.copy(source=src, target=dst, table="nopk", key="code", chunk_size=60)
    assert result.status is etl.Status.COMPLETED
    assert fingerprint(dst, "nopk") == fingerprint(src, "nopk")


def test_columns_and_where_narrow_the_copy(src: str, dst: str) -> None:
    execute(src, """
        CREATE TABLE orders (id int PRIMARY KEY, status text, total numeric(8,2), secret text);
        INSERT INTO orders SELECT g, CASE WHEN g % 3 = 0 THEN 'paid' ELSE 'open' END, g, 'x'
        FROM generate_series(1, 900) g;
    """)
    result = etl.copy(source=src, target=dst, table="orders", columns="id,status,total",
                      where="status = 'paid' OR total < 0", chunk_size=50)
    assert result.status is etl.Status.COMPLETED
    assert scalar(dst, "SELECT count(*) FROM orders") == 300
    assert scalar(dst, "SELECT count(*) FROM orders WHERE status <> 'paid'") == 0
    cols = scalar(dst, "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute "
                       "WHERE attrelid = 'orders'::regclass AND attnum > 0")
    assert cols == "id,status,total"


def test_existing_target_with_different_types_uses_text_copy(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE t (id int PRIMARY KEY, v int); "
                 "INSERT INTO t SELECT g, g FROM generate_series(1, 100) g")
    execute(dst, "CREATE TABLE t (id bigint PRIMARY KEY, v numeric, extra text DEFAULT 'd')")
    result = etl.copy(source=src, target=dst, table="t")
    assert result.status is etl.Status.COMPLETED
    assert result.to_dict()["metadata"]["copy_format"] == "text"
    assert scalar(dst, "SELECT sum(v) FROM t") == 5050
    assert scalar(dst, "SELECT count(*) FROM t WHERE extra = 'd'") == 100


def test_schema_qualified_tables_and_to_table(src: str, dst: str) -> None:
    execute(src, 'CREATE SCHEMA sales; CREATE TABLE sales."Order Lines" (id int PRIMARY KEY, v text); '
                 "INSERT INTO sales.\"Order Lines\" SELECT g, 'v' FROM generate_series(1, 10) g")
    result = etl.copy(source=src, target=dst, table='sales.Order Lines', to_table="archive.lines")
    assert result.status is etl.Status.COMPLETED
    assert result.job_id == "copy:archive.lines"
    assert scalar(dst, "SELECT count(*) FROM archive.lines") == 10


def test_rerun_of_finished_job_copies_only_new_rows(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE ev (id int PRIMARY KEY); INSERT INTO ev SELECT generate_series(1, 100)")
    assert etl.copy(source=src, target=dst, table="ev").status is etl.Status.COMPLETED
    execute(src, "INSERT INTO ev SELECT generate_series(101, 150)")
    again = etl.copy(source=src, target=dst, table="ev")
    assert again.status is etl.Status.COMPLETED
    assert again.rows_this_run == 50
    assert fingerprint(dst, "ev") == fingerprint(src, "ev")


def test_cli_json_report_and_state_store_views(src: str, dst: str, tmp_path) -> None:
    execute(src, "CREATE TABLE ev (id int PRIMARY KEY, v text); "
                 "INSERT INTO ev SELECT g, 'v' FROM generate_series(1, 1000) g")
    report_path = tmp_path / "r" / "report.json"
    proc = run_etl("copy", "--source", src, "--target", dst, "--table", "ev", "--chunk-size", "300",
                   "--json", "--report", str(report_path))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["status"] == "completed"
    assert doc["job_id"] == "copy:public.ev" and doc["job_type"] == "copy"
    s = doc["summary"]
    assert s["total_items"] == s["processed"] == s["succeeded"] == 1000
    assert s["failed"] == s["skipped"] == 0
    assert doc["last_checkpoint"]["chunk_index"] == 4
    assert doc["last_checkpoint"]["last_key"] == [1000]
    assert doc["metadata"]["chunk_size"] == 300 and doc["metadata"]["num_chunks"] == 4
    for key in ("started_at", "completed_at", "errors", "error_categories", "artifacts"):
        assert key in doc
    on_disk = json.loads(report_path.read_text())
    assert on_disk["run_id"] == doc["run_id"] and on_disk["summary"] == doc["summary"]
    # the same document from the state store
    stored = run_etl("report", doc["run_id"], "--state", dst)
    assert stored.returncode == 0, stored.stderr
    assert json.loads(stored.stdout)["summary"] == doc["summary"]
    assert json.loads(stored.stdout)["artifacts"]["report"] == str(report_path)
    unwritable = run_etl("copy", "--source", src, "--target", dst, "--table", "ev",
                         "--report", str(tmp_path))  # a directory
    assert unwritable.returncode == 2 and "--report" in unwritable.stderr
    runs = run_etl("runs", "--state", dst)
    assert doc["run_id"] in runs.stdout and "completed" in runs.stdout
    status = run_etl("status", "--state", dst, "--json")
    jobs = json.loads(status.stdout)
    assert jobs[0]["job_id"] == "copy:public.ev"
    assert jobs[0]["checkpoint"]["processed_count"] == 1000
    assert "progress" not in proc.stdout and "rows/s" in proc.stderr  # progress on stderr only
    missing = run_etl("report", "00000000-0000-0000-0000-000000000000", "--state", dst)
    assert missing.returncode == 2 and "etl runs" in missing.stderr


def test_dry_run_writes_nothing(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE ev (id int PRIMARY KEY, v text); "
                 "INSERT INTO ev SELECT g, 'v' FROM generate_series(1, 1000) g")
    proc = run_etl("copy", "--source", src, "--target", dst, "--table", "ev", "--dry-run",
                   "--chunk-size", "100")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "1,000 in 10 chunk(s)" in out
    assert "CREATE TABLE" in out and "COPY (SELECT" in out and "nothing was written" in out
    assert scalar(dst, "SELECT to_regclass('public.ev')") is None
    assert scalar(dst, "SELECT to_regnamespace('etl')") is None


def test_where_with_percent_signs_and_or(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE people (id int PRIMARY KEY, name text); "
                 "INSERT INTO people SELECT g, CASE WHEN g % 2 = 0 THEN 'ann' || g ELSE 'bob' || g END "
                 "FROM generate_series(1, 300) g")
    result = etl.copy(source=src, target=dst, table="people", chunk_size=40,
                      where="name LIKE 'ann%' OR id % 100 = 1")
    assert result.status is etl.Status.COMPLETED, result.message
    assert scalar(dst, "SELECT count(*) FROM people") == 150 + 3 == result.total_items
