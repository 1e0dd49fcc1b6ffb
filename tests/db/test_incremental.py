"""--since-column: each run copies the rows changed since the last finished run, exactly once."""

from __future__ import annotations

import pytest

import etl
from etl.runner import StopFlag
from tests.conftest import execute, fingerprint, scalar

T0 = "2024-01-01 00:00:00+00"


def _source(src: str) -> None:
    # 3,000 rows; the last 40 share the newest timestamp (the first run's boundary)
    execute(src, f"""
        CREATE TABLE acct (id int PRIMARY KEY, balance int NOT NULL, updated_at timestamptz);
        INSERT INTO acct SELECT g, g, timestamptz '{T0}' + least(g, 2961) * interval '1 second'
        FROM generate_series(1, 3000) g;
    """)


def _sync(src: str, dst: str, **kw) -> etl.Result:
    return etl.copy(source=src, target=dst, table="acct", since_column="updated_at",
                    mode="upsert", **kw)


def test_changed_rows_arrive_exactly_once_including_the_boundary_timestamp(
        src: str, dst: str) -> None:
    _source(src)
    boundary = scalar(src, "SELECT max(updated_at) FROM acct")
    first = _sync(src, dst)
    assert first.status is etl.Status.COMPLETED and first.succeeded == 3000
    wm = first.to_dict()["metadata"]["watermark"]
    assert wm["from"] is None and wm["next"] is not None

    # between runs: new rows, updated rows, and late rows stamped exactly at the boundary
    execute(src, f"""
        INSERT INTO acct SELECT g, g, now() FROM generate_series(3001, 3100) g;
        UPDATE acct SET balance = -balance, updated_at = now() WHERE id % 100 = 0 AND id <= 3000;
        INSERT INTO acct SELECT g, g, '{boundary.isoformat()}' FROM generate_series(5001, 5005) g;
    """)
    second = _sync(src, dst)
    doc = second.to_dict()
    assert doc["metadata"]["outcomes"] == {"inserted": 105, "updated": 30, "unchanged": 0,
                                           "superseded": 0}, doc["metadata"]
    assert doc["summary"]["processed"] == 135  # the 40 boundary rows of run 1 are not re-read
    assert fingerprint(dst, "acct") == fingerprint(src, "acct")

    third = _sync(src, dst)
    assert third.status is etl.Status.COMPLETED and third.to_dict()["summary"]["processed"] == 0


def test_interrupted_walk_resumes_with_the_same_bounds(src: str, dst: str) -> None:
    _source(src)
    _sync(src, dst)
    execute(src, "UPDATE acct SET balance = 0, updated_at = now() WHERE id % 3 = 0")
    flag = StopFlag()

    class StopAfterOne:
        def start(self, *a, **k): ...
        def advance(self, rows, nbytes):
            flag.set("test")
        def finish(self, *a, **k): ...

    partial = _sync(src, dst, chunk_size=200, progress=StopAfterOne(), stop=flag)
    assert partial.status is etl.Status.STOPPED and partial.succeeded == 200
    # a row changed while the walk is interrupted: taken by this walk or the next, never lost
    execute(src, "UPDATE acct SET balance = 42, updated_at = now() WHERE id = 1")
    resumed = _sync(src, dst, chunk_size=200)
    assert resumed.status is etl.Status.COMPLETED
    assert resumed.to_dict()["summary"]["processed"] == 1000
    assert resumed.to_dict()["metadata"]["outcomes"]["updated"] == 1000
    _sync(src, dst)
    assert fingerprint(dst, "acct") == fingerprint(src, "acct")


def test_since_column_usage_errors(src: str, dst: str) -> None:
    _source(src)
    with pytest.raises(etl.UsageError, match="--since-column nope"):
        etl.copy(source=src, target=dst, table="acct", since_column="nope", mode="upsert")
    with pytest.raises(etl.UsageError, match="replace"):
        etl.copy(source=src, target=dst, table="acct", since_column="updated_at", mode="replace")
