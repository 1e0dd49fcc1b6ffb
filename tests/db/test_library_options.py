"""Library options the other tests leave alone: a state store in a schema of its own, used
by every function that reads or writes it; ``create=False``; and the pacing, limits and
report options of ``etl.run_chunks``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import etl
from fixtures.seed import make_events
from tests.conftest import execute, scalar

SCHEMA = "ops_etl"


def _tables(url: str, schema: str) -> int:
    return scalar(url, "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s",
                  (schema,))


def test_every_function_keeps_its_state_in_the_schema_it_is_given(
        src: str, dst: str, tmp_path: Path) -> None:
    make_events(src, 3000)
    execute(dst, "CREATE TABLE events (id bigint PRIMARY KEY, account_id int, kind text "
                 "CHECK (kind <> 'refund'), amount numeric(12,2), payload jsonb, "
                 "created_at timestamptz)")
    st = dict(state=dst, state_schema=SCHEMA)
    copied = etl.copy(source=src, target=dst, table="events", max_error_rate=None, **st)
    assert copied.status is etl.Status.COMPLETED_WITH_ERRORS and copied.failed == 750
    assert _tables(dst, SCHEMA) > 0 and _tables(dst, "etl") == 0
    job = "copy:public.events"
    letters = etl.list_dead_letters(job, **st, limit=1000)
    assert len(letters) == 750
    one = etl.show_dead_letter(letters[0]["id"], **st)
    assert one["error_type"] == "CheckViolation"
    execute(dst, "ALTER TABLE events DROP CONSTRAINT events_kind_check")
    replayed = etl.replay_dead_letters(job, target=dst, error_type="CheckViolation", **st)
    assert replayed.replayed == 750
    assert etl.purge_dead_letters(job, **st) == 0
    assert etl.verify(source=src, target=dst, table="events", **st).ok
    etl.pause(job, **st)
    assert etl.copy(source=src, target=dst, table="events", **st).status is etl.Status.PAUSED
    etl.resume(job, **st)
    with pytest.raises(etl.UsageError):
        etl.cancel(job, **st)  # neither running nor paused any more
    assert etl.backfill(target=dst, table="events", set="kind = upper(kind)",
                        where="kind = 'refund'", **st).succeeded == 750
    out = tmp_path / "out"
    assert etl.export(source=dst, table="events", to=out, format="csv", **st).ok
    execute(dst, "CREATE TABLE events_back (LIKE events INCLUDING ALL)")
    assert etl.load(sorted(out.glob("*.csv")), target=dst, table="events_back", **st).ok
    moved = etl.archive(source=dst, table="events_back", where="kind = 'REFUND'",
                        to_table="events_refunds", **st)
    assert moved.succeeded == 750
    with pytest.raises(etl.EtlError, match="does not exist"):
        etl.archive(source=dst, table="events_back", where="true", to_table="nowhere",
                    create=False, **st)
    done = etl.run_chunks(source=etl.Query(dst, table="events_refunds"), fn=lambda r: None,
                          job="noop", **st)
    assert done.succeeded == 750
    assert etl.prune(older_than="1s", dry_run=True, **st).runs >= 0
    assert _tables(dst, "etl") == 0  # nothing went to the default schema
    runs = scalar(dst, f"SELECT count(*) FROM {SCHEMA}.runs")
    assert runs == 8  # copy ×2, verify, backfill, export, load, archive, run_chunks


def test_run_chunks_limits_pacing_and_report(src: str, tmp_path: Path) -> None:
    execute(src, "CREATE TABLE items (id int PRIMARY KEY);"
                 "INSERT INTO items SELECT generate_series(1, 3000)")
    bad = etl.run_chunks(source=etl.Query(src, table="items"), job="picky",
                         fn=lambda row: 1 / 0 if row["id"] % 10 == 0 else None,
                         max_errors=50, max_error_rate=None, chunk_size=100)
    assert bad.status is etl.Status.FAILED and "--max-errors 50 exceeded" in bad.message
    rated = etl.run_chunks(source=etl.Query(src, table="items"), job="rated",
                           fn=lambda row: 1 / 0 if row["id"] % 10 == 0 else None,
                           max_error_rate=0.05, chunk_size=100)
    assert rated.status is etl.Status.FAILED and "--max-error-rate" in rated.message
    t0 = time.monotonic()
    slept = etl.run_chunks(source=etl.Query(src, table="items", where="id <= 300"),
                           job="sleepy", fn=lambda row: None, chunk_size=100, sleep=0.3)
    assert slept.ok and time.monotonic() - t0 >= 0.6  # two sleeps between three chunks
    report = tmp_path / "report.json"
    timed = etl.run_chunks(source=etl.Query(src, table="items"), job="timed",
                           fn=lambda row: time.sleep(0.001), chunk_size="auto",
                           chunk_seconds=0.1, min_chunk=10, max_chunk=50,
                           max_runtime=0.5, report=report, retry_max_wait=1)
    assert timed.status is etl.Status.STOPPED and 0 < timed.succeeded < 3000
    doc = json.loads(report.read_text())
    assert doc["status"] == "stopped" and doc["metadata"]["chunk_size_last"] <= 50
    rest = etl.run_chunks(source=etl.Query(src, table="items"), job="timed",
                          fn=lambda row: None, chunk_size=500)
    assert rest.ok and rest.processed == 3000  # resumed where the stop left it
