"""Pure functions: option parsing, URL masking, classification, chunk sizing, the report shape."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest

import etl
from etl import options
from etl.errors import UsageError, classify
from etl.model import Category, Status, TableName
from etl.report import MAX_ERRORS_IN_REPORT, Result, RowError
from etl.runner import AUTO_FIRST_CHUNK, ChunkSizer, Pacing
from etl.urls import mask, parse


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("5m", 300), ("1h30m", 5400),
                                          ("2d", 172800), ("250ms", 0.25), (1.5, 1.5)])
def test_durations(text, seconds) -> None:
    assert options.parse_duration(text, "--max-runtime") == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["soon", "5x", "", "-1s", 0])
def test_bad_durations(bad) -> None:
    with pytest.raises(UsageError, match="--max-runtime"):
        options.parse_duration(bad, "--max-runtime")


def test_chunk_size_and_mode() -> None:
    assert options.parse_chunk_size("auto") is None
    assert options.parse_chunk_size("5000") == 5000
    for bad in ("0", "-3", "many"):
        with pytest.raises(UsageError, match="--chunk-size"):
            options.parse_chunk_size(bad)
    with pytest.raises(UsageError, match="valid values are append, replace, upsert, ignore"):
        options.parse_mode("merge")
    assert options.parse_names("a, b", "--key") == ("a", "b")
    with pytest.raises(UsageError, match="more than once"):
        options.parse_names("a,a", "--key")


def test_table_names() -> None:
    assert TableName.parse("events") == TableName("public", "events")
    assert str(TableName.parse("sales.Order Lines")) == "sales.Order Lines"
    with pytest.raises(UsageError):
        TableName.parse("a.b.c")


def test_urls_are_masked_everywhere() -> None:
    url = parse("postgresql://bob:s3cr3t@db.example:5433/app?sslmode=require")
    assert str(url) == "postgresql://bob:***@db.example:5433/app?sslmode=require"
    assert "s3cr3t" in url.conninfo() and "s3cr3t" not in repr(url.masked)
    assert mask("failed for postgresql://bob:s3cr3t@h/x and s3cr3t", "s3cr3t") == \
        "failed for postgresql://bob:***@h/x and ***"
    assert parse("postgres://u@h/d").is_postgres
    with pytest.raises(UsageError):
        parse("not a url at all")


def test_classification_by_sqlstate() -> None:
    def err(cls):
        return cls("x")

    assert classify(err(psycopg.errors.SerializationFailure)) is Category.TRANSIENT
    assert classify(err(psycopg.errors.DeadlockDetected)) is Category.TRANSIENT
    assert classify(err(psycopg.errors.AdminShutdown)) is Category.TRANSIENT
    assert classify(err(psycopg.errors.LockNotAvailable)) is Category.TRANSIENT
    assert classify(err(psycopg.errors.CheckViolation)) is Category.DATA
    assert classify(err(psycopg.errors.InvalidTextRepresentation)) is Category.DATA
    assert classify(err(psycopg.errors.UndefinedTable)) is Category.FATAL
    assert classify(err(psycopg.errors.InsufficientPrivilege)) is Category.FATAL
    assert classify(psycopg.OperationalError("server closed the connection")) is Category.TRANSIENT
    assert classify(UsageError("x")) is Category.FATAL


@pytest.mark.parametrize("errno,sqlstate,category", [
    (1205, "HY000", Category.TRANSIENT),   # lock wait timeout: HY000 says nothing
    (1290, "HY000", Category.TRANSIENT),   # read-only server after a failover
    (1927, "70100", Category.TRANSIENT),   # connection killed (MariaDB)
    (1213, "40001", Category.TRANSIENT),   # deadlock
    (1366, "22007", Category.DATA),        # incorrect value
    (1265, "01000", Category.DATA),        # data truncated (an invalid enum label in strict mode)
    (1062, "23000", Category.DATA),        # duplicate entry
    (1146, "42S02", Category.FATAL),       # no such table
    (1045, "28000", Category.FATAL),       # access denied
])
def test_mysql_errors_by_number_before_sqlstate(errno: int, sqlstate: str,
                                                category: Category) -> None:
    """pymysql passes the server's SQLSTATE along; MySQL's numbers still decide."""
    import pymysql.err
    import sqlalchemy.exc

    exc = pymysql.err.OperationalError(errno, "message", sqlstate=sqlstate)  # type: ignore[call-arg]
    assert classify(exc) is category
    wrapped = sqlalchemy.exc.OperationalError("stmt", {}, exc)
    assert classify(wrapped) is category


def test_auto_chunk_size_adapts_toward_target_seconds() -> None:
    sizer = ChunkSizer(Pacing(chunk_seconds=2.0))
    assert sizer.next_size() == AUTO_FIRST_CHUNK
    for _ in range(10):  # 100k rows/s → 200k rows per 2 s, reached by growing at most ×4 a chunk
        size = sizer.next_size()
        sizer.observe(size, size / 100_000)
    assert sizer.next_size() == 200_000
    sizer.observe(200_000, 20.0)  # a slow chunk shrinks at once
    assert sizer.next_size() == 20_000
    fixed = ChunkSizer(Pacing(chunk_size=777))
    fixed.observe(777, 100.0)
    assert fixed.next_size() == 777
    capped = ChunkSizer(Pacing(max_rate=1000, chunk_seconds=2.0))
    assert capped.next_size() == 2000


def test_report_shape_and_error_cap() -> None:
    r = Result(job_id="copy:public.t", run_id="r", job_type="copy", started_at="t0",
               status=Status.COMPLETED_WITH_ERRORS)
    for i in range(MAX_ERRORS_IN_REPORT + 5):
        r.add_error(RowError(item_identifier=str(i), error_type="CheckViolation", category="data",
                             error_message="m"))
    doc = r.to_dict()
    assert set(doc) >= {"job_id", "run_id", "job_type", "started_at", "completed_at", "status",
                        "summary", "errors", "error_categories", "artifacts", "last_checkpoint",
                        "metadata"}
    assert set(doc["summary"]) == {"total_items", "processed", "succeeded", "failed", "skipped",
                                   "duration_seconds", "items_per_second"}
    assert len(doc["errors"]) == MAX_ERRORS_IN_REPORT
    assert doc["error_categories"] == {"CheckViolation": MAX_ERRORS_IN_REPORT + 5}
    assert r.exit_code == 3


def test_exit_codes_by_status_and_error() -> None:
    assert [s.exit_code for s in (Status.COMPLETED, Status.FAILED, Status.STOPPED)] == [0, 1, 4]
    assert etl.UsageError("x").exit_code == 2 and etl.NoKeyError("x").exit_code == 2
    assert etl.JobLockedError("x").exit_code == 75 and etl.SourceError("x").exit_code == 1


def test_public_surface_is_curated_and_import_is_light() -> None:
    assert sorted(etl.__all__) == sorted([
        "Category", "EtlError", "JobLockedError", "Mode", "NoKeyError", "Result", "SourceError",
        "StateStoreError", "Status", "TargetError", "UsageError", "__version__", "archive", "backfill",
        "copy", "export", "load", "pause", "resume", "cancel", "prune", "verify",
        "list_dead_letters", "purge_dead_letters", "replay_dead_letters", "show_dead_letter",
        "Query", "run_chunks", "run_file", "check_file"])
    for name in etl.__all__:
        assert getattr(etl, name) is not None
    code = ("import sys, etl; heavy = [m for m in ('psycopg', 'sqlalchemy', 'polars', 'pyarrow', "
            "'rich') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_classification_of_mysql_and_sqlite_driver_errors() -> None:
    import sqlite3

    import pymysql
    from sqlalchemy.exc import DBAPIError

    assert classify(pymysql.err.OperationalError(1213, "Deadlock found")) is Category.TRANSIENT
    assert classify(pymysql.err.OperationalError(2013, "Lost connection")) is Category.TRANSIENT
    assert classify(pymysql.err.IntegrityError(1062, "Duplicate entry")) is Category.DATA
    assert classify(pymysql.err.DataError(1406, "Data too long")) is Category.DATA
    assert classify(pymysql.err.ProgrammingError(1146, "Table doesn't exist")) is Category.FATAL
    wrapped = DBAPIError.instance("INSERT …", {}, pymysql.err.OperationalError(1205, "Lock wait"),
                                  pymysql.err.Error)
    assert classify(wrapped) is Category.TRANSIENT
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v NOT NULL)")
    try:
        conn.execute("INSERT INTO t VALUES (1, NULL)")
    except sqlite3.IntegrityError as exc:  # a real driver error, not a constructed one
        assert classify(exc) is Category.DATA
    try:
        conn.execute("SELECT * FROM nosuch")
    except sqlite3.OperationalError as exc:
        assert classify(exc) is Category.FATAL
