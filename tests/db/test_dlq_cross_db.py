"""`etl dlq replay` into MariaDB and SQLite targets, against real servers.

A copy from PostgreSQL dead-letters the rows the target's CHECK constraint refuses; the
constraint is then fixed in the target and the letters replayed through the CLI: the rows
arrive with exactly the values a copy writes (checked against a clean copy of the same
source), the queue empties and the job's checkpoint moves them from failed to succeeded.
A row that fails again stays, with its new error and one more attempt.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import run_etl

pytestmark = pytest.mark.timeout(120)

ROWS = 300
BAD = {17: "-1.50", 150: "-10.00", 299: "-0.01"}  # keys the target's CHECK refuses
SOURCE = f"""
CREATE TABLE people (id int PRIMARY KEY, name text NOT NULL, amount numeric(10,2),
                     at timestamptz NOT NULL, day date, raw bytea);
INSERT INTO people
SELECT i, 'person ' || i || ' ünï 😀',
       CASE i {' '.join(f"WHEN {k} THEN {v}" for k, v in BAD.items())} ELSE i / 4.0 END,
       timestamptz '2024-03-10 12:00:00+05:30' + i * interval '1 minute 0.000123 second',
       date '2024-01-01' + i, decode(md5(i::text), 'hex')
FROM generate_series(1, {ROWS}) AS g(i);
"""


def my_sql(url: str, *statements: str) -> list[tuple[Any, ...]]:
    u = make_url(url)
    with pymysql.connect(host=u.host or "127.0.0.1", port=u.port or 3306,
                         user=u.username or "root", password=u.password or "",
                         database=u.database, autocommit=True) as conn, conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)
        return list(cur.fetchall())


def lite_sql(url: str, *statements: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(make_url(url).database or "")
    try:
        cur = conn.cursor()
        for statement in statements:
            cur.execute(statement)
        rows = cur.fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def pg_rows(url: str, query: str, params: tuple = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return list(conn.execute(query, params).fetchall())


@pytest.fixture
def source(make_db: Callable[[str], str]) -> str:
    url = make_db("dlqsrc")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SOURCE)
    return url


@pytest.fixture
def state(make_db: Callable[[str], str]) -> str:
    return make_db("state")


def copy(src: str, tgt: str, state: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    proc = run_etl("copy", "--source", src, "--target", tgt, "--table", "people", "--state",
                   state, "--no-progress", "--json", "--chunk-size", "100", *extra)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}, proc.stderr


def replay(job: str, state: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    proc = run_etl("dlq", "replay", "--job", job, "--state", state, "--json", *extra)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {}, proc.stderr


def letters(state: str, job: str) -> list[tuple[Any, ...]]:
    return pg_rows(state, "SELECT item_key, error_type, sqlstate, attempts, error_message "
                          "FROM etl.dead_letters WHERE job_id = %s ORDER BY id", (job,))


def counts(state: str, job: str) -> tuple[int, int]:
    return pg_rows(state, "SELECT succeeded, failed FROM etl.checkpoints WHERE job_id = %s",
                   (job,))[0]


def test_replay_into_mariadb(source: str, state: str,
                             make_mariadb_db: Callable[[str], str]) -> None:
    tgt, clean = make_mariadb_db("dlq"), make_mariadb_db("clean")
    create = ("CREATE TABLE people (id INT PRIMARY KEY, name LONGTEXT NOT NULL, "
              "amount DECIMAL(10,2), at DATETIME(6) NOT NULL, day DATE, raw LONGBLOB{})")
    my_sql(tgt, create.format(", CONSTRAINT amount_ok CHECK (amount >= 0)"))
    code, doc, err = copy(source, tgt, state)
    assert code == 3, err
    job = doc["job_id"]
    assert [(k, e, s, a) for k, e, s, a, _ in letters(state, job)] == \
        [([k], "CheckViolation", "23514", 1) for k in BAD]
    assert counts(state, job) == (ROWS - 3, 3)
    # half a fix: -10.00 is still refused
    my_sql(tgt, "ALTER TABLE people DROP CONSTRAINT amount_ok",
           "ALTER TABLE people ADD CONSTRAINT amount_ok CHECK (amount >= -5)")
    code, out, err = replay(job, state)
    assert code == 3, err
    assert out == {"job_id": job, "replayed": 2, "still_failing": 1}
    (key, etype, sqlstate, attempts, message), = letters(state, job)
    assert (key, etype, sqlstate, attempts) == ([150], "CheckViolation", "23514", 2)
    assert message.startswith("[mysql 4025]"), message
    assert counts(state, job) == (ROWS - 1, 1)
    my_sql(tgt, "ALTER TABLE people DROP CONSTRAINT amount_ok")
    code, out, err = replay(job, state)
    assert code == 0, err
    assert out == {"job_id": job, "replayed": 1, "still_failing": 0}
    assert letters(state, job) == [] and counts(state, job) == (ROWS, 0)
    # the replayed rows are exactly what a copy writes
    my_sql(clean, create.format(""))
    assert copy(source, clean, state)[0] == 0
    everything = "SELECT * FROM people ORDER BY id"
    assert my_sql(tgt, everything) == my_sql(clean, everything)
    assert len(my_sql(tgt, everything)) == ROWS


def test_replay_into_sqlite_upserts_in_the_jobs_mode(source: str, state: str,
                                                     tmp_path: Path) -> None:
    tgt, clean = f"sqlite:///{tmp_path / 'dlq.db'}", f"sqlite:///{tmp_path / 'clean.db'}"
    create = ("CREATE TABLE {} (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
              "amount NUMERIC(10,2){}, at TIMESTAMPTZ NOT NULL, day DATE, raw BLOB)")
    lite_sql(tgt, create.format("people", " CHECK (amount >= 0)"))
    code, doc, err = copy(source, tgt, state, "--mode", "upsert")
    assert code == 3, err
    job = doc["job_id"]
    assert [k for k, *_ in letters(state, job)] == [[k] for k in BAD]
    # someone writes one of the keys meanwhile; the cause is fixed (SQLite cannot drop a CHECK)
    lite_sql(tgt, "INSERT INTO people VALUES (150, 'someone else', 1, "
                  "'2000-01-01 00:00:00+00:00', NULL, NULL)",
             create.format("fixed", ""), "INSERT INTO fixed SELECT * FROM people",
             "DROP TABLE people", "ALTER TABLE fixed RENAME TO people")
    code, out, err = replay(job, state)
    assert code == 0, err
    assert out == {"job_id": job, "replayed": 3, "still_failing": 0}
    assert letters(state, job) == [] and counts(state, job) == (ROWS, 0)
    lite_sql(clean, create.format("people", ""))
    assert copy(source, clean, state)[0] == 0
    everything = "SELECT id, name, amount, typeof(amount), at, day, raw FROM people ORDER BY id"
    assert lite_sql(tgt, everything) == lite_sql(clean, everything)  # 150 was upserted
    assert lite_sql(tgt, "SELECT amount, at FROM people WHERE id = 150") == \
        [(-10, "2024-03-10 09:00:00.018450+00:00")]


def test_a_masked_password_asks_for_target(source: str, state: str,
                                           make_mariadb_db: Callable[[str], str]) -> None:
    """The state store keeps the job's target URL masked; with a password in it, the replay
    cannot connect by itself and says to pass --target."""
    admin = make_mariadb_db("dlqpw")
    u = make_url(admin)
    user, password = f"etl_{uuid.uuid4().hex[:8]}", "s3cret-pw"
    my_sql(admin, f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'",
           f"GRANT ALL ON `{u.database}`.* TO '{user}'@'%'")
    try:
        tgt = u.set(username=user, password=password).render_as_string(hide_password=False)
        my_sql(admin, "CREATE TABLE people (id INT PRIMARY KEY, name LONGTEXT NOT NULL, "
                      "amount DECIMAL(10,2), at DATETIME(6) NOT NULL, day DATE, raw LONGBLOB, "
                      "CONSTRAINT amount_ok CHECK (amount >= 0))")
        code, doc, err = copy(source, tgt, state)
        assert code == 3, err
        job = doc["job_id"]
        code, out, err = replay(job, state)
        assert code == 2 and out == {}
        assert "--target URL" in err and password not in err and "***" in err, err
        code, out, err = replay(job, state, "--target", "sqlite:///elsewhere.db")
        assert code == 2 and "is a sqlite database" in err, err
        assert len(letters(state, job)) == 3  # nothing was touched
        my_sql(admin, "ALTER TABLE people DROP CONSTRAINT amount_ok")
        code, out, err = replay(job, state, "--target", tgt)
        assert code == 0, err
        assert out == {"job_id": job, "replayed": 3, "still_failing": 0}
        assert password not in err
        assert [r[0] for r in my_sql(admin, "SELECT id FROM people ORDER BY id")] == \
            list(range(1, ROWS + 1))
    finally:
        my_sql(admin, f"DROP USER '{user}'@'%'")
