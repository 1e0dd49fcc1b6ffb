"""`etl backfill`: a chunked UPDATE by key on a real PostgreSQL table; every row once."""

from __future__ import annotations

import json

import psycopg
import pytest

import etl
from tests.conftest import execute, release_once_waited_for, run_etl, scalar

ROWS = 20_000


def _table(url: str, rows: int = ROWS) -> None:
    execute(url, f"CREATE TABLE ev (id int PRIMARY KEY, n int NOT NULL, flag text); "
                 f"INSERT INTO ev SELECT g, g, NULL FROM generate_series(1, {rows}) g")


def _wrong(url: str, expected_sql: str) -> int:
    """Rows whose n is not what the backfill should have left."""
    return scalar(url, f"SELECT count(*) FROM ev WHERE n IS DISTINCT FROM ({expected_sql})")


def test_every_matching_row_updated_once_with_checkpoint_and_report(dst: str) -> None:
    _table(dst)
    proc = run_etl("backfill", "--target", dst, "--table", "ev", "--set", "n = n + 1",
                   "--where", "id % 3 = 0 OR id < 10", "--chunk-size", "1000", "--json",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    matching = scalar(dst, "SELECT count(*) FROM ev WHERE id % 3 = 0 OR id < 10")
    assert doc["job_id"] == "backfill:public.ev" and doc["job_type"] == "backfill"
    assert doc["summary"]["succeeded"] == doc["summary"]["total_items"] == matching
    assert _wrong(dst, "CASE WHEN id % 3 = 0 OR id < 10 THEN id + 1 ELSE id END") == 0
    assert doc["metadata"]["num_chunks"] == -(-matching // 1000)
    assert 0 < doc["metadata"]["longest_transaction_seconds"] < 10
    # a rerun of the finished job touches nothing it did (n = n + 1 is not idempotent) …
    again = etl.backfill(target=dst, table="ev", set="n = n + 1", where="id % 3 = 0 OR id < 10")
    assert again.status is etl.Status.COMPLETED and again.rows_this_run == 0
    # … but rows added past its last key are updated by the next run
    execute(dst, f"INSERT INTO ev VALUES ({ROWS + 3}, 0, NULL), ({ROWS + 4}, 0, NULL)")
    more = etl.backfill(target=dst, table="ev", set="n = n + 1", where="id % 3 = 0 OR id < 10")
    assert more.rows_this_run == 1  # ROWS + 4 matches (a multiple of 3), ROWS + 3 does not
    assert scalar(dst, f"SELECT array_agg(n ORDER BY id) FROM ev WHERE id > {ROWS}") == [0, 1]


def test_where_that_the_update_makes_false_and_composite_key(dst: str) -> None:
    execute(dst, "CREATE TABLE ev (day date, seq int, n int, flag text, PRIMARY KEY (day, seq)); "
                 "INSERT INTO ev SELECT date '2024-01-01' + g / 100, g % 100, g, NULL "
                 "FROM generate_series(0, 9999) g")
    result = etl.backfill(target=dst, table="ev", set="flag = 'done', n = -n",
                          where="flag IS NULL", chunk_size=700)
    assert result.succeeded == 10_000 and result.status is etl.Status.COMPLETED
    assert scalar(dst, "SELECT count(*) FROM ev WHERE flag = 'done' AND n <= 0") == 10_000
    assert result.to_dict()["metadata"]["key"] == ["day", "seq"]


def test_set_and_where_read_times_in_utc_unless_timezone_says(dst: str) -> None:
    # 22:00 UTC is the same day in UTC and the next day in Tokyo (UTC+9)
    execute(dst, "CREATE TABLE ev (id int PRIMARY KEY, at timestamptz NOT NULL, day date); "
                 "INSERT INTO ev VALUES (1, '2024-03-01 22:00+00', NULL), "
                 "(2, '2024-03-01 10:00+00', NULL)")
    assert etl.backfill(target=dst, table="ev", set="day = at::date").succeeded == 2
    assert scalar(dst, "SELECT array_agg(day::text ORDER BY id) FROM ev") == \
        ["2024-03-01", "2024-03-01"]
    tokyo = etl.backfill(target=dst, table="ev", set="day = at::date", job="tokyo",
                         where="at >= '2024-03-02 00:00'", timezone="Asia/Tokyo")
    assert tokyo.succeeded == 1  # only 22:00 UTC is on the 2nd in Tokyo
    assert scalar(dst, "SELECT array_agg(day::text ORDER BY id) FROM ev") == \
        ["2024-03-02", "2024-03-01"]


def test_dry_run_writes_nothing(dst: str) -> None:
    _table(dst, 5000)
    proc = run_etl("backfill", "--target", dst, "--table", "ev", "--set", "n = 0",
                   "--where", "id > 100", "--dry-run", "--chunk-size", "1000")
    assert proc.returncode == 0, proc.stderr
    assert "rows to update: 4,900 in 5 chunk(s)" in proc.stdout
    assert "UPDATE \"public\".\"ev\" SET n = 0 WHERE" in proc.stdout
    assert scalar(dst, "SELECT count(*) FROM ev WHERE n = 0") == 0
    assert scalar(dst, "SELECT count(*) FROM pg_namespace WHERE nspname = 'etl'") == 0


@pytest.mark.parametrize(("args", "says"), [
    (("--set", "id = id + 1"), "assigns the key column(s) id"),
    (("--set", "nope = 1"), "--set/--where are not valid on public.ev"),
    (("--set", "n = 1", "--where", "nope > 0"), "--set/--where are not valid"),
    (("--set", "n = 1", "--state", "postgresql://127.0.0.1:5432/elsewhere"),
     "keeps its checkpoint in the table's own database"),
    (("--set", "n = 1", "--target", "sqlite:///x.db"), "works on PostgreSQL tables"),
])
def test_mistakes_are_usage_errors(dst: str, args: tuple[str, ...], says: str) -> None:
    _table(dst, 10)
    cmd = ["backfill", "--table", "ev", *args]
    if "--target" not in args:
        cmd[1:1] = ["--target", dst]
    proc = run_etl(*cmd)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert scalar(dst, "SELECT sum(n) FROM ev") == 55


def test_row_lock_is_waited_out_then_retried(dst: str) -> None:
    _table(dst, 3000)
    holder = psycopg.connect(dst)
    holder.execute("SELECT * FROM ev WHERE id = 1500 FOR UPDATE")  # another session's row lock
    release = release_once_waited_for(holder, dst)
    try:
        proc = run_etl("backfill", "--target", dst, "--table", "ev", "--set", "n = n * 2",
                       "--chunk-size", "1000", "--lock-timeout", "200ms", "--retries", "8",
                       "--retry-max-wait", "0.5s", "--json", "--no-progress")
    finally:
        release.join()
        holder.close()
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["metadata"]["retries_by_reason"].get("55P03", 0) >= 1
    assert _wrong(dst, "id * 2") == 0  # the retried chunk did not half-commit


def test_max_runtime_stops_with_exit_4_and_the_next_run_finishes(dst: str) -> None:
    _table(dst)
    first = run_etl("backfill", "--target", dst, "--table", "ev", "--set", "n = n + 7",
                    "--chunk-size", "500", "--sleep", "0.1", "--max-runtime", "0.5s",
                    "--no-progress")
    assert first.returncode == 4, first.stderr
    done = scalar(dst, "SELECT processed FROM etl.checkpoints")
    assert 0 < done < ROWS and scalar(dst, "SELECT count(*) FROM ev WHERE n = id + 7") == done
    second = run_etl("backfill", "--target", dst, "--table", "ev", "--set", "n = n + 7",
                     "--chunk-size", "5000", "--no-progress")
    assert second.returncode == 0, second.stderr
    assert _wrong(dst, "id + 7") == 0


def test_second_run_of_the_job_exits_75(dst: str) -> None:
    _table(dst, 100)
    from etl.state.lock import lock_key

    etl.backfill(target=dst, table="ev", set="flag = 'x'")  # creates the state store
    with psycopg.connect(dst, autocommit=True) as running:
        running.execute("SELECT pg_advisory_lock(%s)", (lock_key("backfill:public.ev"),))
        busy = run_etl("backfill", "--target", dst, "--table", "ev", "--set", "flag = 'y'",
                       "--restart")
    assert busy.returncode == 75 and "already running" in busy.stderr
    assert scalar(dst, "SELECT count(*) FROM ev WHERE flag = 'x'") == 100
