"""`etl verify` against real databases: equal copies pass, and every kind of difference —
a changed byte, a missing row, an extra row, a row twice — is found and named by its key,
after a copy, an archive (a snapshot against the table ∪ its archive), a load, and across
PostgreSQL, MariaDB and SQLite. No mocks: the differences are made with SQL."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import psycopg
import psycopg.types.json
import pymysql
import pytest
from sqlalchemy.engine import make_url

import etl
from etl.runner import StopFlag
from fixtures.seed import load_chinook, make_events
from tests.conftest import execute, run_etl

pytestmark = pytest.mark.timeout(240)

CHINOOK_KEYS = {"artist": "artist_id", "album": "album_id", "customer": "customer_id",
                "employee": "employee_id", "genre": "genre_id", "invoice": "invoice_id",
                "invoice_line": "invoice_line_id", "media_type": "media_type_id",
                "playlist": "playlist_id", "playlist_track": "playlist_id,track_id",
                "track": "track_id"}


def _named(doc: dict) -> set[tuple[str, str]]:
    return {(e["error_type"], e["item_identifier"]) for e in doc["errors"]}


def test_one_changed_byte_one_missing_and_one_extra_row_among_a_million(
        src: str, dst: str, tmp_path: Path) -> None:
    make_events(src, 1_000_000)
    assert etl.copy(source=src, target=dst, table="events").ok
    same = run_etl("verify", "--source", src, "--target", dst, "--table", "events", "--json",
                   "--no-progress")
    assert same.returncode == 0, same.stderr
    doc = json.loads(same.stdout)
    assert doc["status"] == "completed" and doc["job_type"] == "verify"
    assert doc["metadata"]["method"] == "database"
    assert doc["summary"]["succeeded"] == doc["summary"]["total_items"] == 1_000_000
    assert doc["summary"]["failed"] == 0 and doc["errors"] == []
    assert doc["metadata"]["differences"] == {"missing": 0, "extra": 0, "different": 0,
                                              "duplicate": 0}
    # one byte of one row ('login' → 'logim'), a row gone from the target, a row the
    # source no longer has (so the target's is extra), in different ranges
    execute(dst, "UPDATE events SET kind = 'logim' WHERE id = 424241;"
                 "DELETE FROM events WHERE id = 777777")
    execute(src, "DELETE FROM events WHERE id = 123456")
    report = tmp_path / "verify.json"
    diff = run_etl("verify", "--source", src, "--target", dst, "--table", "events", "--json",
                   "--no-progress", "--report", str(report))
    assert diff.returncode == 1, diff.stderr
    doc = json.loads(diff.stdout)
    assert doc["status"] == "failed"
    assert _named(doc) == {("different", "[424241]"), ("missing", "[777777]"),
                           ("extra", "[123456]")}
    assert doc["error_categories"] == {"missing": 1, "extra": 1, "different": 1}
    changed = next(d for d in doc["metadata"]["differing_keys"] if d["kind"] == "different")
    assert changed["columns"] == ["kind"]
    assert changed["source"] == {"kind": "login"} and changed["target"] == {"kind": "logim"}
    assert doc["summary"]["total_items"] == 1_000_000  # 999,999 source rows + 1 extra
    assert doc["summary"]["succeeded"] == 999_997 and doc["summary"]["failed"] == 3
    assert len(doc["metadata"]["differing_ranges"]) == 3
    assert "differs" in diff.stderr and "1 missing" in diff.stderr
    stored = json.loads(report.read_text())
    shown = run_etl("report", doc["run_id"], "--state", dst)
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["errors"] == stored["errors"] == doc["errors"]


def test_values_method_agrees_and_a_where_narrows_both_sides(src: str, dst: str) -> None:
    make_events(src, 20_000)
    assert etl.copy(source=src, target=dst, table="events").ok
    execute(dst, "UPDATE events SET amount = amount + 0.01 WHERE id = 15000;"
                 "UPDATE events SET payload = payload || '{\"x\": 1}' WHERE id = 3")
    for method in ("database", "values"):
        result = etl.verify(source=src, target=dst, table="events", method=method,
                            chunk_size=1000, job=f"v-{method}")
        assert result.status is etl.Status.FAILED, method
        assert result.metadata["method"] == method
        assert {(e.error_type, e.item_identifier) for e in result.errors} == \
            {("different", "[15000]"), ("different", "[3]")}, method
        columns = {d["key"][0]: d["columns"] for d in result.metadata["differing_keys"]}
        assert columns == {15000: ["amount"], 3: ["payload"]}, method
    # the text summary names the keys on the terminal
    text = run_etl("verify", "--source", src, "--target", dst, "--table", "events",
                   "--no-progress")
    assert text.returncode == 1
    assert "different  key [15000]: column(s) amount differ" in text.stdout, text.stdout
    assert "amount: source \"2142.86\", target \"2142.87\"" in text.stdout, text.stdout
    narrowed = etl.verify(source=src, target=dst, table="events", where="id > 15000")
    assert narrowed.status is etl.Status.COMPLETED and narrowed.succeeded == 5000
    left_out = etl.verify(source=src, target=dst, table="events",
                          exclude_columns="amount,payload")
    assert left_out.status is etl.Status.COMPLETED and left_out.succeeded == 20_000
    assert left_out.metadata["columns"] == ["id", "account_id", "kind", "created_at"]


def test_archive_is_verified_as_snapshot_against_table_and_archive(src: str, dst: str) -> None:
    make_events(src, 30_000)
    execute(src, "CREATE TABLE events_snapshot (LIKE events INCLUDING ALL);"
                 "INSERT INTO events_snapshot SELECT * FROM events")
    result = etl.archive(source=src, table="events", where="created_at < '2024-01-04'",
                         to=dst, to_table="events_archive", chunk_size=2000)
    assert result.ok and result.succeeded > 10_000
    both = ["--target", src, "--to-table", "events", "--target", dst,
            "--to-table", "events_archive"]
    ok = run_etl("verify", "--source", src, "--table", "events_snapshot", *both, "--json",
                 "--state", src, "--no-progress")
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["summary"]["succeeded"] == 30_000
    assert len(doc["metadata"]["target_tables"]) == 2
    # the archive holds a row the table still has, and lost another
    with psycopg.connect(src) as conn:
        row = conn.execute("SELECT * FROM events_snapshot WHERE id = 29000").fetchone()
    with psycopg.connect(dst) as conn:
        conn.execute("INSERT INTO events_archive VALUES (%s, %s, %s, %s, %s, %s)",
                     (*row[:4], psycopg.types.json.Jsonb(row[4]), row[5]))
    execute(dst, "DELETE FROM events_archive WHERE id = 5")
    bad = run_etl("verify", "--source", src, "--table", "events_snapshot", *both, "--json",
                  "--state", src, "--no-progress")
    assert bad.returncode == 1, bad.stderr
    doc = json.loads(bad.stdout)
    assert _named(doc) == {("duplicate", "[29000]"), ("missing", "[5]")}
    # the table alone is missing everything archived
    alone = etl.verify(source=src, table="events_snapshot", to_table="events",
                       max_keys=10)
    assert alone.status is etl.Status.FAILED
    assert alone.error_categories == {"missing": result.succeeded}
    assert len(alone.errors) == 10  # named up to max_keys; all counted


def test_a_load_is_verified_against_the_database_its_file_came_from(
        src: str, dst: str, tmp_path: Path) -> None:
    load_chinook(src)
    out = tmp_path / "out"
    assert etl.export(source=src, table="invoice", to=out, format="csv").ok
    execute(dst, "CREATE TABLE invoice (invoice_id int PRIMARY KEY, customer_id int, "
                 "invoice_date timestamp, billing_address text, billing_city text, "
                 "billing_state text, billing_country text, billing_postal_code text, "
                 "total numeric(10,2))")
    files = sorted(str(p) for p in out.glob("*.csv"))
    assert etl.load(files, table="invoice", target=dst).ok
    result = etl.verify(source=src, target=dst, table="invoice")
    assert result.status is etl.Status.COMPLETED, result.message
    assert result.succeeded == 412 and result.metadata["method"] == "values"  # types differ


def test_a_target_far_larger_than_the_source_is_cut_into_bounded_ranges(
        src: str, dst: str) -> None:
    execute(src, "CREATE TABLE t (id int PRIMARY KEY, v text);"
                 "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g")
    execute(dst, "CREATE TABLE t (id int PRIMARY KEY, v text);"
                 "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 5100) g")
    for method in ("database", "values"):
        result = etl.verify(source=src, target=dst, table="t", chunk_size=100, method=method,
                            job=f"big-{method}")
        assert result.error_categories == {"extra": 5000}, method
        assert result.succeeded == 100 and result.processed == 5100
        assert len(result.errors) == 100
        # no range held more than two chunks' rows of any table
        assert result.metadata["num_chunks"] >= 5000 // 200, method


def test_a_stopped_verification_resumes_and_still_reports_what_it_found(
        src: str, dst: str) -> None:
    make_events(src, 10_000)
    assert etl.copy(source=src, target=dst, table="events").ok
    execute(dst, "DELETE FROM events WHERE id IN (10, 9990)")
    stop = StopFlag()
    seen = []

    class StopAfterFirst:
        def on_start(self, *args: object) -> None:
            pass

        def on_finish(self, *args: object) -> None:
            pass

        def on_chunk(self, job: str, outcome: object) -> None:
            seen.append(outcome)
            stop.set("test")

    from etl.observe import observing

    with observing(StopAfterFirst()):
        first = etl.verify(source=src, target=dst, table="events", chunk_size=1000, stop=stop)
    assert first.status is etl.Status.STOPPED and first.exit_code == 4
    assert [(e.error_type, e.item_identifier) for e in first.errors] == [("missing", "[10]")]
    rest = etl.verify(source=src, target=dst, table="events", chunk_size=1000)
    assert rest.status is etl.Status.FAILED
    assert {(e.error_type, e.item_identifier) for e in rest.errors} == \
        {("missing", "[10]"), ("missing", "[9990]")}
    assert rest.error_categories == {"missing": 2}
    assert rest.succeeded == 9998 and rest.processed == 10_000


def test_composite_and_text_keys(src: str, dst: str) -> None:
    for url in (src, dst):
        execute(url, "CREATE TABLE pt (list text, pos int, note text, PRIMARY KEY (list, pos));"
                     "INSERT INTO pt SELECT 'l' || (g % 7), g, 'n' || g "
                     "FROM generate_series(1, 3000) g")
    execute(dst, "UPDATE pt SET note = 'N' WHERE list = 'l3' AND pos = 1011;"
                 "DELETE FROM pt WHERE list = 'l0' AND pos = 7")
    for method in ("database", "values"):
        result = etl.verify(source=src, target=dst, table="pt", chunk_size=250, method=method,
                            job=f"pt-{method}")
        assert {(e.error_type, e.item_identifier) for e in result.errors} == \
            {("different", '["l3", 1011]'), ("missing", '["l0", 7]')}, method


def test_usage_errors_name_what_to_fix(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE t (id int PRIMARY KEY, v text, w int); CREATE TABLE nk (v text)")
    execute(dst, "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE nk (v text)")
    cases = [
        (["--table", "t"], "no column(s) w", 2),
        (["--table", "t", "--columns", "id,v", "--where", "nonsense >"], "--where", 2),
        (["--table", "nk"], "no primary key", 2),
        (["--table", "t", "--target", dst, "--target", dst, "--to-table", "a",
          "--to-table", "b", "--to-table", "c"], "--target URLs", 2),
        (["--table", "t", "--method", "database", "--target", "sqlite:///x.db"], "PostgreSQL",
         2),
        (["--table", "t", "--to-table", "missing"], "missing does not exist in the target", 1),
    ]
    for args, words, code in cases:
        target = [] if "--target" in args else ["--target", dst]
        out = run_etl("verify", "--source", src, *target, *args, "--no-progress")
        assert out.returncode == code, (args, out.stdout, out.stderr)
        assert words in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    ok = run_etl("verify", "--source", src, "--target", dst, "--table", "t", "--columns",
                 "id,v", "--no-progress")
    assert ok.returncode == 0, ok.stderr
    dry = run_etl("verify", "--source", src, "--target", dst, "--table", "t",
                  "--exclude-columns", "w", "--dry-run")
    assert dry.returncode == 0 and "method:       database" in dry.stdout


def test_chinook_copied_to_mariadb_and_sqlite_verifies_and_differences_are_found(
        src: str, make_db: Callable[[str], str], make_mariadb_db: Callable[[str], str],
        tmp_path: Path) -> None:
    state = make_db("state")
    load_chinook(src)
    maria = make_mariadb_db("chinook")
    lite = f"sqlite:///{tmp_path / 'chinook.sqlite'}"
    for target in (maria, lite):
        for table in CHINOOK_KEYS:
            assert etl.copy(source=src, target=target, table=table, state=state).ok
    for target in (maria, lite):
        for table in CHINOOK_KEYS:
            result = etl.verify(source=src, target=target, table=table, state=state)
            assert result.status is etl.Status.COMPLETED, (target, table, result.message)
            assert result.metadata["method"] == "values"
            assert result.succeeded > 0 and result.failed == 0
    parsed = make_url(maria)
    with pymysql.connect(host=parsed.host, port=parsed.port or 3306, user=parsed.username,
                         password=parsed.password or "", database=parsed.database,
                         autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("UPDATE invoice SET total = total + 0.01 WHERE invoice_id = 100")
        cur.execute("UPDATE track SET name = CONCAT(name, ' ') WHERE track_id = 3435")
        cur.execute("DELETE FROM invoice_line WHERE invoice_line_id = 2000")
    with sqlite3.connect(tmp_path / "chinook.sqlite") as conn:
        conn.execute("UPDATE customer SET email = 'x' || email WHERE customer_id = 7")
        conn.execute("INSERT INTO genre VALUES (99, 'Polka')")
    found = {}
    for target, table in [(maria, "invoice"), (maria, "track"), (maria, "invoice_line"),
                          (lite, "customer"), (lite, "genre")]:
        result = etl.verify(source=src, target=target, table=table, state=state)
        assert result.status is etl.Status.FAILED, (target, table)
        found[table] = {(e.error_type, e.item_identifier) for e in result.errors}
    assert found == {"invoice": {("different", "[100]")}, "track": {("different", "[3435]")},
                     "invoice_line": {("missing", "[2000]")},
                     "customer": {("different", "[7]")}, "genre": {("extra", "[99]")}}


def test_mariadb_against_mariadb_is_summed_inside_mariadb(
        make_mariadb_db: Callable[[str], str], make_db: Callable[[str], str]) -> None:
    state = make_db("state")
    a, b = make_mariadb_db("a"), make_mariadb_db("b")

    def run(url: str, *statements: str) -> None:
        parsed = make_url(url)
        with pymysql.connect(host=parsed.host, port=parsed.port or 3306,
                             user=parsed.username, password=parsed.password or "",
                             database=parsed.database, autocommit=True) as conn, \
                conn.cursor() as cur:
            for statement in statements:
                cur.execute(statement)

    run(a, "CREATE TABLE orders (id INT PRIMARY KEY, customer VARCHAR(40), "
           "total DECIMAL(10,2), placed DATETIME(6), note TEXT) CHARACTER SET utf8mb4 "
           "COLLATE utf8mb4_unicode_ci",
        "INSERT INTO orders SELECT seq, CONCAT('customer ', seq), seq / 7, "
        "TIMESTAMP '2024-01-01 00:00:00' + INTERVAL seq MINUTE, "
        "IF(seq % 5 = 0, NULL, 'ünïcödé') FROM seq_1_to_5000")
    assert etl.copy(source=a, target=b, table="orders", state=state).ok
    same = etl.verify(source=a, target=b, table="orders", state=state, chunk_size=1000)
    assert same.status is etl.Status.COMPLETED and same.metadata["method"] == "database"
    assert same.succeeded == 5000
    # a trailing blank (equal for MariaDB's PAD SPACE collation, not the same bytes), a
    # NULL where a value was, a missing row
    run(b, "UPDATE orders SET customer = CONCAT(customer, ' ') WHERE id = 10",
        "UPDATE orders SET note = NULL WHERE id = 11", "DELETE FROM orders WHERE id = 4321")
    diff = etl.verify(source=a, target=b, table="orders", state=state, chunk_size=1000)
    assert diff.status is etl.Status.FAILED
    assert {(e.error_type, e.item_identifier) for e in diff.errors} == {
        ("different", "[10]"), ("different", "[11]"), ("missing", "[4321]")}
    notes = {d["key"][0]: d for d in diff.metadata["differing_keys"]}
    assert notes[11]["columns"] == ["note"] and notes[11]["target"] == {"note": None}
    by_values = etl.verify(source=a, target=b, table="orders", state=state, method="values")
    assert {(e.error_type, e.item_identifier) for e in by_values.errors} == {
        ("different", "[10]"), ("different", "[11]"), ("missing", "[4321]")}
