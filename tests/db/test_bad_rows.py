"""Rows the target refuses become dead letters; every other row is copied; totals add up."""

from __future__ import annotations

import json

import psycopg
import pytest

import etl
from tests.conftest import execute, run_etl, scalar

ROWS = 100_000
# (id, what is wrong with it in the target, expected SQLSTATE)
BAD = {
    1: "23514",        # check: amount > 0
    777: "23502",      # not null: note
    20_000: "23505",   # unique: code duplicates row 19_999's
    33_333: "23503",   # foreign key: account 999 has no parent
    50_001: "22001",   # value too long for varchar(12)
    64_000: "22P02",   # invalid enum label in the target's enum
    99_999: "23514",
    100_000: "23502",  # the very last row
}


# more of each kind, scattered over the rest of the table: a few dozen bad rows in all
MORE_BAD = {i: state for n, state in enumerate(["23514", "23502", "23505", "23503", "22001",
                                                "22P02"])
            for i in (21_017 + 11_111 * k + 97 * n for k in range(4))}
_MORE_SQL = {
    "23514": "amount = -1", "23502": "note = NULL", "23505": "code = 'c' || (id - 1)",
    "23503": "account = 999", "22001": "label = 'far too long for twelve'",
    "22P02": "mood = 'furious'",
}


def _tables(src: str, dst: str, *, more: bool = False) -> None:
    execute(src, f"""
        CREATE TABLE ev (id int PRIMARY KEY, account int, amount int, note text, code text,
                         label text, mood text);
        INSERT INTO ev SELECT g, 1 + g % 3, 1 + g % 50, 'n' || g, 'c' || g, 'l' || (g % 1000), 'ok'
        FROM generate_series(1, {ROWS}) g;
        UPDATE ev SET amount = -1 WHERE id IN (1, 99999);
        UPDATE ev SET note = NULL WHERE id IN (777, 100000);
        UPDATE ev SET code = 'c19999' WHERE id = 20000;
        UPDATE ev SET account = 999 WHERE id = 33333;
        UPDATE ev SET label = 'far too long for twelve' WHERE id = 50001;
        UPDATE ev SET mood = 'furious' WHERE id = 64000;
    """)
    if more:
        execute(src, "; ".join(f"UPDATE ev SET {_MORE_SQL[state]} WHERE id = {i}"
                               for i, state in MORE_BAD.items()))
    execute(dst, """
        CREATE TYPE mood AS ENUM ('ok', 'sad');
        CREATE TABLE accounts (id int PRIMARY KEY);
        INSERT INTO accounts VALUES (1), (2), (3);
        CREATE TABLE ev (id int PRIMARY KEY, account int REFERENCES accounts,
                         amount int CHECK (amount > 0), note text NOT NULL, code text UNIQUE,
                         label varchar(12), mood mood);
    """)


@pytest.mark.parametrize("mode", ["append", "upsert"])
def test_bad_rows_scattered_in_100k_become_dead_letters(src: str, dst: str, mode: str) -> None:
    """The COPY path and the upsert path (staging table + INSERT … ON CONFLICT) alike."""
    _tables(src, dst, more=True)
    bad = {**BAD, **MORE_BAD}
    assert len(bad) == len(BAD) + len(MORE_BAD) == 32
    result = etl.copy(source=src, target=dst, table="ev", max_error_rate=None, mode=mode)
    assert result.status is etl.Status.COMPLETED_WITH_ERRORS and result.exit_code == 3
    doc = result.to_dict()
    s = doc["summary"]
    assert s["failed"] == len(bad) and s["succeeded"] == ROWS - len(bad)
    assert s["succeeded"] + s["failed"] + s["skipped"] == s["total_items"] == ROWS
    assert scalar(dst, "SELECT count(*) FROM ev") == ROWS - len(bad)
    assert scalar(dst, "SELECT count(*) FROM ev WHERE id = ANY(%s)", (list(bad),)) == 0
    with psycopg.connect(dst) as conn:
        letters = {row[0][0]: row[1:] for row in conn.execute(
            "SELECT item_key, sqlstate, category, error_type, row_data, run_id::text "
            "FROM etl.dead_letters WHERE job_id = 'copy:public.ev'")}
    assert {k: v[0] for k, v in letters.items()} == bad
    assert all(v[1] == "data" and v[4] == result.run_id for v in letters.values())
    assert letters[1][2] == "CheckViolation"
    assert letters[33_333][3]["account"] == 999  # the original row, as JSON
    assert letters[64_000][3]["mood"] == "furious"
    assert len(doc["errors"]) == len(bad)
    assert sum(doc["error_categories"].values()) == len(bad)
    assert doc["error_categories"]["CheckViolation"] == 2 + 4


def test_cli_exit_3_and_report(src: str, dst: str) -> None:
    _tables(src, dst)
    proc = run_etl("copy", "--source", src, "--target", dst, "--table", "ev", "--json",
                   "--chunk-size", "25000", "--no-progress")
    assert proc.returncode == 3, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["status"] == "completed_with_errors" and doc["summary"]["failed"] == len(BAD)
    assert "dead letters" in proc.stderr and "etl dlq list --job copy:public.ev" in proc.stderr


def test_max_errors_stops_the_run_then_resume_after_fixing(src: str, dst: str) -> None:
    _tables(src, dst)
    result = etl.copy(source=src, target=dst, table="ev", chunk_size=10_000, max_errors=2)
    assert result.status is etl.Status.FAILED and result.exit_code == 1
    assert "--max-errors 2 exceeded" in (result.message or "")
    # it stopped in the chunk holding the third bad row (20,000): that chunk rolled back
    assert scalar(dst, "SELECT count(*) FROM ev") == 10_000 - 2
    assert scalar(dst, "SELECT max(processed) FROM etl.checkpoints") == 10_000
    execute(dst, "ALTER TABLE ev DROP CONSTRAINT ev_code_key; "
                 "ALTER TABLE ev DROP CONSTRAINT ev_account_fkey")
    again = etl.copy(source=src, target=dst, table="ev", chunk_size=10_000, max_errors=10)
    assert again.status is etl.Status.COMPLETED_WITH_ERRORS
    assert again.failed == len(BAD) - 2  # unique and foreign-key rows now go in
    assert again.succeeded + again.failed == ROWS


def test_max_error_rate_is_judged_after_1000_rows(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE t (id int PRIMARY KEY, v int); "
                 "INSERT INTO t SELECT g, CASE WHEN g % 10 = 0 THEN -1 ELSE g END "
                 "FROM generate_series(1, 5000) g")
    execute(dst, "CREATE TABLE t (id int PRIMARY KEY, v int CHECK (v > 0))")
    tolerant = etl.copy(source=src, target=dst, table="t", chunk_size=500, max_error_rate=0.2,
                        job="tolerant", to_table="t")
    assert tolerant.status is etl.Status.COMPLETED_WITH_ERRORS and tolerant.failed == 500
    doc = tolerant.to_dict()  # the report lists the first 100 errors and counts them all
    assert len(doc["errors"]) == 100 and doc["error_categories"] == {"CheckViolation": 500}
    assert [e["item_identifier"] for e in doc["errors"][:2]] == ["[10]", "[20]"]
    execute(dst, "TRUNCATE t; DELETE FROM etl.checkpoints")
    strict = etl.copy(source=src, target=dst, table="t", chunk_size=500, job="strict")
    assert strict.status is etl.Status.FAILED
    assert "--max-error-rate 0.05 exceeded" in (strict.message or "")
    # not judged before 1,000 rows: the first chunk (10 % bad) committed; the second,
    # which brought the count to 1,000 and crossed the rate, rolled back
    assert strict.processed == 500 and strict.failed == 50


def test_non_unique_key_groups_are_dead_lettered_together(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE t (day int NOT NULL, v int); "
                 "INSERT INTO t SELECT g / 10, g FROM generate_series(0, 199) g; "
                 "UPDATE t SET v = -v WHERE v = 55")
    execute(dst, "CREATE TABLE t (day int, v int CHECK (v >= 0))")
    result = etl.copy(source=src, target=dst, table="t", key="day", chunk_size=50)
    assert result.succeeded == 190 and result.failed == 10  # day 5's ten rows share the key


@pytest.mark.parametrize("threshold", [0, 1])
def test_max_errors_boundary(src: str, dst: str, threshold: int) -> None:
    execute(src, "CREATE TABLE t (id int PRIMARY KEY, v int); "
                 "INSERT INTO t SELECT g, CASE WHEN g = 50 THEN -1 ELSE g END FROM generate_series(1, 100) g")
    execute(dst, "CREATE TABLE t (id int PRIMARY KEY, v int CHECK (v > 0))")
    result = etl.copy(source=src, target=dst, table="t", max_errors=threshold)
    expected = etl.Status.FAILED if threshold == 0 else etl.Status.COMPLETED_WITH_ERRORS
    assert result.status is expected


def test_dlq_list_show_replay_purge(src: str, dst: str) -> None:
    _tables(src, dst)
    first = run_etl("copy", "--source", src, "--target", dst, "--table", "ev", "--no-progress")
    assert first.returncode == 3, first.stderr
    listed = run_etl("dlq", "list", "--job", "copy:public.ev", "--state", dst, "--json")
    letters = json.loads(listed.stdout)
    assert len(letters) == len(BAD)
    text = run_etl("dlq", "list", "--job", "copy:public.ev", "--state", dst,
                   "--error-type", "CheckViolation")
    assert text.stdout.count("CheckViolation") == 2
    shown = json.loads(run_etl("dlq", "show", str(letters[0]["id"]), "--state", dst).stdout)
    assert shown["row_data"]["id"] == letters[0]["item_key"][0]
    # fix the target for most causes; the NOT NULL rows still fail
    execute(dst, "ALTER TABLE ev DROP CONSTRAINT ev_amount_check; "
                 "ALTER TABLE ev DROP CONSTRAINT ev_code_key; "
                 "ALTER TABLE ev DROP CONSTRAINT ev_account_fkey; "
                 "ALTER TABLE ev ALTER COLUMN label TYPE text; "
                 "ALTER TYPE mood ADD VALUE 'furious'")
    replay = run_etl("dlq", "replay", "--job", "copy:public.ev", "--state", dst, "--json")
    assert replay.returncode == 3, replay.stderr
    assert json.loads(replay.stdout) == {"job_id": "copy:public.ev", "replayed": len(BAD) - 2,
                                         "still_failing": 2}
    assert scalar(dst, "SELECT count(*) FROM ev") == ROWS - 2
    left = json.loads(run_etl("dlq", "list", "--job", "copy:public.ev", "--state", dst,
                              "--json").stdout)
    assert sorted(d["item_key"][0] for d in left) == [777, 100_000]
    assert all(d["attempts"] == 2 and d["sqlstate"] == "23502" for d in left)
    assert scalar(dst, "SELECT failed FROM etl.checkpoints") == 2
    assert scalar(dst, "SELECT succeeded FROM etl.checkpoints") == ROWS - 2
    execute(dst, "ALTER TABLE ev ALTER COLUMN note DROP NOT NULL")
    from etl.state.lock import lock_key

    with psycopg.connect(dst, autocommit=True) as running:  # as if the job were running
        running.execute("SELECT pg_advisory_lock(%s)", (lock_key("copy:public.ev"),))
        busy = run_etl("dlq", "replay", "--job", "copy:public.ev", "--state", dst)
        assert busy.returncode == 75 and "already running" in busy.stderr
    assert etl.replay_dead_letters("copy:public.ev", state=dst).replayed == 2
    assert fingerprint_ids(dst) == fingerprint_ids(src)
    execute(dst, "INSERT INTO etl.dead_letters (job_id, error_type, category, error_message) "
                 "VALUES ('copy:public.ev', 'X', 'data', 'm')")
    purged = run_etl("dlq", "purge", "--job", "copy:public.ev", "--state", dst, "--yes")
    assert purged.returncode == 0 and "purged 1 " in purged.stdout
    assert etl.list_dead_letters("copy:public.ev", state=dst) == []


def fingerprint_ids(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM ev ORDER BY id")]


@pytest.mark.parametrize("copy_format", ["binary", "text"])
def test_bad_row_keys_read_from_the_row_itself(src: str, dst: str, copy_format: str) -> None:
    """After the first bad row, chunks go in pieces and each bad row's key is read from its
    own COPY bytes (binary values turned into text by the source): composite keys of text
    with tabs, backslashes and non-ASCII, and of timestamptz, in both COPY formats."""
    execute(src, """
        CREATE TABLE k (name text, at timestamptz, v int, note text, PRIMARY KEY (name, at));
        INSERT INTO k SELECT CASE g % 4 WHEN 0 THEN 'tab' || chr(9) || g WHEN 1 THEN 'b\\s' || g
                                        WHEN 2 THEN 'Zoë ✓ ' || g ELSE 'plain' || g END,
                             timestamptz '2024-02-29 23:59:59.123456+00' + g * interval '1 min',
                             g, 'n' || g
        FROM generate_series(1, 30000) g;
        UPDATE k SET v = -v WHERE v % 997 = 0;
    """)
    note_type = "text" if copy_format == "binary" else "varchar(40)"  # another type: text COPY
    execute(dst, f"CREATE TABLE k (name text, at timestamptz, v int CHECK (v > 0), "
                 f"note {note_type}, PRIMARY KEY (name, at))")
    result = etl.copy(source=src, target=dst, table="k", chunk_size=4000, max_error_rate=None)
    assert result.to_dict()["metadata"]["copy_format"] == copy_format
    expected = scalar(src, "SELECT count(*) FROM k WHERE v < 0")
    assert expected == 30 and result.failed == expected
    assert result.succeeded == 30000 - expected
    with psycopg.connect(src) as conn:
        bad_keys = sorted(conn.execute(
            "SELECT jsonb_build_array(name, at) FROM k WHERE v < 0").fetchall())
    with psycopg.connect(dst) as conn:
        letters = sorted(conn.execute("SELECT item_key FROM etl.dead_letters").fetchall())
        rows = conn.execute("SELECT row_data FROM etl.dead_letters").fetchall()
        good = conn.execute("SELECT count(*), min(v) FROM k").fetchone()
    assert letters == bad_keys
    assert all(r[0]["v"] < 0 and r[0]["v"] % 997 == 0 for r in rows)
    assert good == (30000 - expected, 1)
