"""`etl copy` between PostgreSQL, MariaDB and SQLite, in every direction, against real servers.

Every check reads the databases with their own drivers (psycopg, pymysql, sqlite3),
independently of etl. Interruptions are real: a `kill -9` of the `etl` process, a
stop at a chunk boundary, a checkpoint that lags behind committed chunks. MariaDB
tests take the ``mariadb_url``/``make_mariadb_db`` fixtures, so they are skipped with a
reason where no MariaDB answers (and fail under ETL_REQUIRE_SERVICES=1). No mocks.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pymysql
import pytest
from sqlalchemy.engine import make_url

import etl
from etl.errors import TargetError, UsageError
from etl.runner import StopFlag
from fixtures.seed import load_chinook
from tests.conftest import run_etl

pytestmark = pytest.mark.timeout(120)

UTC = dt.UTC


# -- native access to the three databases ------------------------------------------------------

def _kind(url: str) -> str:
    return "pg" if url.startswith("postgresql") else "my" if url.startswith("mysql") else "lite"


def _connect(url: str) -> Any:
    kind = _kind(url)
    if kind == "pg":
        return psycopg.connect(url, autocommit=True)
    if kind == "my":
        u = make_url(url)
        return pymysql.connect(host=u.host or "127.0.0.1", port=u.port or 3306,
                               user=u.username or "root", password=u.password or "",
                               database=u.database, charset="utf8mb4", autocommit=True)
    return sqlite3.connect(make_url(url).database or "")  # one transaction per sql() call


def sql(url: str, statement: str, params: Any = None, *, many: bool = False) -> list[tuple]:
    """Run one statement (``%s`` markers everywhere) with the database's own driver."""
    if _kind(url) == "lite":  # sqlite3 binds neither Decimal nor (from 3.12) datetime
        statement = statement.replace("%s", "?")
        if params is not None:
            params = [_lite_params(p) for p in params] if many else _lite_params(params)
    conn = _connect(url)
    try:
        cur = conn.cursor()
        if many:
            cur.executemany(statement, params)
        else:
            cur.execute(statement, params or ())
        rows = cur.fetchall() if cur.description else []
        conn.commit()
        return [tuple(r) for r in rows]
    finally:
        conn.close()


def _lite_params(params: Any) -> Any:
    return tuple(str(v) if isinstance(v, Decimal) else
                 v.isoformat(sep=" ") if isinstance(v, dt.datetime) else v for v in params)


def value(url: str, statement: str, params: Any = None) -> Any:
    rows = sql(url, statement, params)
    return rows[0][0] if rows else None


def dead_letters(state: str, job: str) -> list[tuple]:
    return sql(state, "SELECT item_key, row_data, error_type, sqlstate, category, error_message "
                      "FROM etl.dead_letters WHERE job_id = %s ORDER BY item_key", (job,))


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
def state(make_db: Callable[[str], str]) -> str:
    """A PostgreSQL state store for copies into MariaDB and SQLite (never the embedded one)."""
    return make_db("state")


@pytest.fixture
def lite(tmp_path: Path) -> Callable[[str], str]:
    return lambda name: f"sqlite:///{tmp_path / f'{name}.sqlite'}"


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("ETL_FAULT_SEED") or random.SystemRandom().randrange(2**32))
    print(f"fault seed: ETL_FAULT_SEED={seed}")
    return random.Random(seed)


def checkpoint(state: str, job: str) -> tuple[int, bool, list | None] | None:
    """(chunk_index, finished, last_key) of the job's checkpoint, None before there is one."""
    if value(state, "SELECT to_regclass('etl.checkpoints')::text") is None:
        return None
    rows = sql(state, "SELECT chunk_index, finished, last_key FROM etl.checkpoints "
                      "WHERE job_id = %s", (job,))
    return rows[0] if rows else None


def kill_after_chunks(proc: subprocess.Popen[str], state: str, job: str, chunks: int) -> None:
    """SIGKILL ``proc`` once its (unfinished) checkpoint passed ``chunks`` chunks."""
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"etl exited ({proc.returncode}) before chunk {chunks}\n{out}\n{err}")
        cp = checkpoint(state, job)
        if cp is not None and not cp[1] and cp[0] >= chunks:
            break
        assert time.monotonic() < deadline, "the copy never got that far"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def cli_copy(src: str, tgt: str, table: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    proc = run_etl("copy", "--source", src, "--target", tgt, "--table", table, "--no-progress",
                   "--json", *extra)
    doc = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return proc.returncode, doc, proc.stderr


def assert_counts_add_up(doc: dict[str, Any], total: int) -> None:
    s = doc["summary"]
    assert s["succeeded"] + s["failed"] + s["skipped"] == s["total_items"] == total, s


class StopAfter:
    """A progress sink that asks the run to stop at the boundary after ``chunks`` chunks."""

    def __init__(self, chunks: int, flag: StopFlag) -> None:
        self.left, self.flag = chunks, flag

    def start(self, label: str, done: int, total: int, exact: bool) -> None:
        pass

    def advance(self, rows: int, nbytes: int) -> None:
        self.left -= 1
        if self.left <= 0:
            self.flag.set("test")

    def finish(self, message: str) -> None:
        pass


def stop_after(chunks: int) -> dict[str, Any]:
    flag = StopFlag()
    return {"stop": flag, "progress": StopAfter(chunks, flag)}


# -- Chinook: PostgreSQL → MariaDB → SQLite → PostgreSQL -----------------------------------------

CHINOOK_KEYS = {"artist": "artist_id", "album": "album_id", "customer": "customer_id",
                "employee": "employee_id", "genre": "genre_id", "invoice": "invoice_id",
                "invoice_line": "invoice_line_id", "media_type": "media_type_id",
                "playlist": "playlist_id", "playlist_track": "playlist_id, track_id",
                "track": "track_id"}


def _like(v: Any, original: Any) -> Any:
    """A value read from SQLite, typed like the original (SQLite keeps money as REAL or
    INTEGER and timestamps as ISO text) — exactly, or the comparison fails."""
    if v is None or original is None:
        return v
    if isinstance(original, Decimal):
        d = Decimal(repr(v)) if isinstance(v, float) else Decimal(v)
        return d.quantize(original)
    if isinstance(original, dt.datetime) and isinstance(v, str):
        return dt.datetime.fromisoformat(v)
    return v


def test_chinook_travels_pg_mariadb_sqlite_pg_exactly(
        make_db: Callable[[str], str], make_mariadb_db: Callable[[str], str],
        state: str, lite: Callable[[str], str]) -> None:
    src, back = make_db("chinook"), make_db("back")
    load_chinook(src)
    maria, sqlite_url = make_mariadb_db("chinook"), lite("chinook")
    originals = {t: sql(src, f"SELECT * FROM {t} ORDER BY {k}") for t, k in CHINOOK_KEYS.items()}
    hops = [(src, maria, state), (maria, sqlite_url, state), (sqlite_url, back, None)]
    for i, (a, b, st) in enumerate(hops):
        for table, key in CHINOOK_KEYS.items():
            result = etl.copy(source=a, target=b, table=table, state=st, chunk_size=1000)
            assert result.status.value == "completed", (i, table, result.message)
            assert result.succeeded == len(originals[table]) and result.failed == 0
            got = sql(b, f"SELECT * FROM {table} ORDER BY {key}")
            want = originals[table]
            if _kind(b) == "lite":
                got = [tuple(_like(v, o) for v, o in zip(r, w, strict=True))
                       for r, w in zip(got, want, strict=True)]
            assert got == want, (i, table)
        tracks = {r[0]: r for r in sql(b, "SELECT track_id, name, composer FROM track")}
        assert sum("\\" in r[1] for r in tracks.values()) == 4
        assert tracks[3435][1] == "Cavalleria Rusticana \\ Act \\ Intermezzo Sinfonico"
        assert sum(r[2] is None for r in tracks.values()) == 977
        assert sum(not r[1].isascii() for r in tracks.values()) == 274
        bosses = sql(b, "SELECT employee_id, reports_to FROM employee ORDER BY employee_id")
        assert bosses[0] == (1, None) and dict(bosses)[2] == 1
    # the last hop is PostgreSQL again: money is numeric(10,2) with its scale, not a float
    assert value(back, "SELECT sum(total)::text FROM invoice") == "2328.60"
    assert sql(back, "SELECT unit_price::text FROM track WHERE track_id IN (1, 2820) "
                     "ORDER BY 1") == [("0.99",), ("1.99",)]
    assert value(back, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                       "WHERE attrelid = 'invoice'::regclass AND attname = 'total'") == \
        "numeric(10,2)"
    assert sql(back, "SELECT playlist_id, track_id FROM playlist_track ORDER BY 1, 2") == \
        originals["playlist_track"]
    # the MariaDB hop kept its state elsewhere, the last one in its PostgreSQL target
    assert value(back, "SELECT count(*) FROM etl.checkpoints WHERE finished") == 11
    assert value(state, "SELECT count(*) FROM etl.checkpoints WHERE job_id LIKE "
                        "'copy:track@mysql://%%' AND finished") == 1


# -- text and time, every direction ----------------------------------------------------------------

TRICKY = ["😀 grin", "𝄞 clef", "a\\b", "\\", "\\n is not a newline", "it's", "100%", "%s",
          "tab\tnew\nline", "ünïcödé Ωμέγα 漢字", "  padded  ", "", '"quoted", comma']
AT = [dt.datetime(2024, 3, 10, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
      dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
      dt.datetime(2037, 12, 31, 16, 0, 0, 1, tzinfo=dt.timezone(dt.timedelta(hours=-8)))]


def _check_texts(url: str, *, aware: bool) -> None:
    rows = sql(url, "SELECT id, t, v, at, ts FROM texts ORDER BY id")
    assert [r[1] for r in rows] == TRICKY and [r[2] for r in rows] == TRICKY
    for i, (_, _, _, at, ts) in enumerate(rows):
        instant = AT[i % len(AT)]
        if isinstance(at, str):  # SQLite: ISO text
            at = dt.datetime.fromisoformat(at)
            ts = dt.datetime.fromisoformat(ts)
        if at.tzinfo is None:  # MySQL has no zone-aware type: DATETIME(6) holding UTC
            assert not aware
            at = at.replace(tzinfo=UTC)
        assert at == instant, (url, i)
        assert ts == dt.datetime(2024, 2, 29, 23, 59, 59, 123456), (url, i)


def test_text_and_timestamps_survive_every_direction(
        make_db: Callable[[str], str], make_mariadb_db: Callable[[str], str],
        state: str, lite: Callable[[str], str]) -> None:
    pg_src, pg_back = make_db("txt"), make_db("txtback")
    name = pg_src.rsplit("/", 1)[1]
    # a session zone far from UTC on the PostgreSQL source: nothing may shift
    sql(pg_src, f'ALTER DATABASE "{name}" SET TimeZone = \'Asia/Kolkata\'')
    sql(pg_src, "CREATE TABLE texts (id int PRIMARY KEY, t text, v varchar(40), "
                "at timestamptz NOT NULL, ts timestamp(6))")
    rows = [(i, s, s, AT[i % len(AT)], dt.datetime(2024, 2, 29, 23, 59, 59, 123456))
            for i, s in enumerate(TRICKY)]
    sql(pg_src, "INSERT INTO texts VALUES (%s, %s, %s, %s, %s)", rows, many=True)
    # PostgreSQL → MariaDB → SQLite → PostgreSQL
    maria, sqlite_url = make_mariadb_db("txt"), lite("txt")
    for a, b, st in ((pg_src, maria, state), (maria, sqlite_url, state), (sqlite_url, pg_back, None)):
        assert etl.copy(source=a, target=b, table="texts", state=st, chunk_size=4).ok
        _check_texts(b, aware=False)
    assert value(maria, "SELECT LENGTH(t), CHAR_LENGTH(t) FROM texts WHERE id = 0") == 9
    # MariaDB (a TIMESTAMP written from a +05:30 session) → PostgreSQL → SQLite → MariaDB
    maria_src, maria_back, pg_mid, lite2 = (make_mariadb_db("txt2"), make_mariadb_db("txt2b"),
                                            make_db("txtmid"), lite("txt2"))
    conn = _connect(maria_src)
    with conn.cursor() as cur:
        cur.execute("SET time_zone = '+05:30'")
        cur.execute("CREATE TABLE texts (id INT PRIMARY KEY, t TEXT, v VARCHAR(40), "
                    "at TIMESTAMP(6) NULL, ts DATETIME(6)) CHARACTER SET utf8mb4")
        cur.executemany("INSERT INTO texts VALUES (%s, %s, %s, %s, %s)",
                        [(i, s, v, a.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30)))
                          .replace(tzinfo=None), ts) for i, s, v, a, ts in rows])
    conn.close()
    for a, b, st in ((maria_src, pg_mid, None), (pg_mid, lite2, state), (lite2, maria_back, state)):
        assert etl.copy(source=a, target=b, table="texts", state=st, chunk_size=5).ok
        _check_texts(b, aware=_kind(b) != "my")
    assert value(pg_mid, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                         "WHERE attrelid = 'texts'::regclass AND attname = 'at'") == \
        "timestamp with time zone"


# -- checkpoints: exact keys, composite keys, text keys ---------------------------------------------

KEY_TEXTS = ["a", "B", "b", "é", "😀", "a\\b", "z z", "%"]


def _db(kind: str, name: str, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return f"sqlite:///{request.getfixturevalue('tmp_path') / f'{name}.sqlite'}"
    if kind == "mariadb":
        return request.getfixturevalue("make_mariadb_db")(name)
    return request.getfixturevalue("make_db")(name)


@pytest.mark.parametrize(("source_kind", "target_kind"), [
    ("mariadb", "sqlite"), ("sqlite", "postgresql"), ("postgresql", "mariadb"),
    ("mariadb", "mariadb"), ("sqlite", "sqlite")])
def test_resume_after_a_stop_on_composite_and_text_keys(
        source_kind: str, target_kind: str, request: pytest.FixtureRequest, state: str) -> None:
    """A run stopped at a chunk boundary resumes exactly after its last key: text (non-ASCII,
    case, backslash), a DATETIME(6) with microseconds and a DECIMAL, compared as one key."""
    rows = [(k, dt.datetime(2024, 1, 1, 0, 0, 0, n % 3), Decimal(f"{n % 2}.{n:04d}"), n)
            for n, k in enumerate(KEY_TEXTS * 12)]
    create = ("CREATE TABLE keyed (k VARCHAR(10) NOT NULL, at {dt} NOT NULL, "
              "n DECIMAL(12,4) NOT NULL, payload INT, PRIMARY KEY (k, at, n)){suffix}")
    src = _db(source_kind, "keysrc", request)
    if source_kind == "mariadb":
        sql(src, create.format(dt="DATETIME(6)", suffix=" CHARACTER SET utf8mb4 COLLATE "
                                                        "utf8mb4_bin"))
    elif source_kind == "sqlite":
        sql(src, create.format(dt="DATETIME", suffix=""))
    else:
        sql(src, create.format(dt="timestamp(6)", suffix="").replace("VARCHAR(10)",
                                                                     'varchar(10) COLLATE "C"'))
    tgt = _db(target_kind, "keys", request)
    sql(src, "INSERT INTO keyed VALUES (%s, %s, %s, %s)", rows, many=True)
    first = etl.copy(source=src, target=tgt, table="keyed", state=state, chunk_size=7,
                     **stop_after(5))
    assert first.status.value == "stopped" and first.succeeded == 35
    last = first.to_dict()["last_checkpoint"]["last_key"]
    assert len(last) == 3 and isinstance(last[0], str)
    json.dumps(last)  # JSON as it is, no repr of Python objects
    again = etl.copy(source=src, target=tgt, table="keyed", state=state, chunk_size=11)
    assert again.status.value == "completed" and again.rows_this_run == len(rows) - 35
    assert_counts_add_up(again.to_dict(), len(rows))
    got = sql(tgt, "SELECT payload FROM keyed ORDER BY payload")
    assert got == [(n,) for n in range(len(rows))]  # each row once, none skipped


# -- upsert ---------------------------------------------------------------------------------------

ACCT = ("CREATE TABLE acct (id INT PRIMARY KEY, name VARCHAR(40) NOT NULL, "
        "balance DECIMAL(12,2), seen DATETIME)")


@pytest.mark.parametrize(("source_kind", "target_kind"), [("sqlite", "mariadb"),
                                                          ("mariadb", "sqlite")])
def test_upsert_is_idempotent_and_counts_new_and_changed_rows(
        source_kind: str, target_kind: str, request: pytest.FixtureRequest, state: str,
        lite: Callable[[str], str]) -> None:
    def db(kind: str, name: str) -> str:
        return lite(name) if kind == "sqlite" else \
            request.getfixturevalue("make_mariadb_db")(name)

    src, tgt = db(source_kind, "upsrc"), db(target_kind, "uptgt")
    sql(src, ACCT)
    seen = "2024-05-01 10:00:00"
    sql(src, "INSERT INTO acct VALUES (%s, %s, %s, %s)",
        [(i, f"name {i}", Decimal(i) / 4, seen) for i in range(1, 2001)], many=True)

    def upsert() -> dict[str, Any]:
        result = etl.copy(source=src, target=tgt, table="acct", state=state, mode="upsert",
                          restart=True, chunk_size=300)
        assert result.status.value == "completed", result.message
        return result.to_dict()

    first = upsert()
    assert first["metadata"]["outcomes"] == {"inserted": 2000, "updated": 0, "unchanged": 0,
                                             "ignored": 0, "superseded": 0}
    second = upsert()  # nothing changed: nothing is written
    assert second["metadata"]["outcomes"] == {"inserted": 0, "updated": 0, "unchanged": 2000,
                                              "ignored": 0, "superseded": 0}
    assert second["summary"]["succeeded"] == 2000
    # 50 % new rows and 50 % changed ones
    sql(src, "DELETE FROM acct WHERE id <= 1000")
    sql(src, "UPDATE acct SET name = CONCAT('renamed ', id)" if source_kind == "mariadb"
        else "UPDATE acct SET name = 'renamed ' || id")
    sql(src, "INSERT INTO acct VALUES (%s, %s, %s, %s)",
        [(i, f"new {i}", Decimal("-0.01"), None) for i in range(2001, 3001)], many=True)
    third = upsert()
    assert third["metadata"]["outcomes"] == {"inserted": 1000, "updated": 1000, "unchanged": 0,
                                             "ignored": 0, "superseded": 0}
    assert_counts_add_up(third, 2000)
    got = sql(tgt, "SELECT id, name, balance FROM acct ORDER BY id")
    want = [(i, f"name {i}", Decimal(i) / 4) for i in range(1, 1001)] + \
        [(i, f"renamed {i}", Decimal(i) / 4) for i in range(1001, 2001)] + \
        [(i, f"new {i}", Decimal("-0.01")) for i in range(2001, 3001)]
    if target_kind == "sqlite":
        got = [(i, n, Decimal(repr(b)).quantize(Decimal("0.01"))) for i, n, b in got]
    assert got == [(i, n, b.quantize(Decimal("0.01"))) for i, n, b in want]


@pytest.mark.parametrize("target_kind", ["postgresql", "sqlite"])
def test_upsert_and_ignore_into_postgresql_and_sqlite(target_kind: str,
                                                      request: pytest.FixtureRequest,
                                                      state: str) -> None:
    """PostgreSQL targets merge through a temporary stage and one INSERT … ON CONFLICT."""
    src = _db("mariadb" if target_kind == "sqlite" else "sqlite", "mergesrc", request)
    tgt = _db(target_kind, "merge", request)
    sql(src, ACCT)
    sql(src, "INSERT INTO acct VALUES (%s, %s, %s, %s)",
        [(i, f"name {i}", Decimal(i) / 4, "2024-05-01 10:00:00") for i in range(1, 501)],
        many=True)

    def run(mode: str) -> dict[str, Any]:
        result = etl.copy(source=src, target=tgt, table="acct", state=state, mode=mode,
                          restart=True, chunk_size=120)
        assert result.status.value == "completed", result.message
        return result.to_dict()

    assert run("upsert")["metadata"]["outcomes"]["inserted"] == 500
    assert run("upsert")["metadata"]["outcomes"]["unchanged"] == 500
    sql(src, "UPDATE acct SET name = 'changed' WHERE id <= 100")
    sql(src, "INSERT INTO acct VALUES (%s, %s, %s, %s)",
        [(i, f"name {i}", None, None) for i in range(501, 551)], many=True)
    doc = run("ignore")  # existing rows stay as they are, new keys go in
    assert doc["metadata"]["outcomes"] == {"inserted": 50, "ignored": 500, "superseded": 0,
                                           "updated": 0, "unchanged": 0}
    assert (doc["summary"]["succeeded"], doc["summary"]["skipped"]) == (50, 500)
    assert value(tgt, "SELECT count(*) FROM acct WHERE name = 'changed'") == 0
    doc = run("upsert")
    assert doc["metadata"]["outcomes"] == {"inserted": 0, "updated": 100, "unchanged": 450,
                                           "ignored": 0, "superseded": 0}
    assert value(tgt, "SELECT count(*) FROM acct WHERE name = 'changed'") == 100
    assert value(tgt, "SELECT count(*) FROM acct") == 550


# -- bad rows ---------------------------------------------------------------------------------------

PEOPLE = ("CREATE TABLE people (id INT PRIMARY KEY, name VARCHAR(40) NOT NULL, "
          "email VARCHAR(60) UNIQUE, amount DECIMAL(10,2) CHECK (amount >= 0))")
BAD = {100: "CheckViolation", 500: "CheckViolation", 250: "NotNullViolation",
       750: "NotNullViolation", 900: "UniqueViolation"}
SQLSTATES = {"CheckViolation": "23514", "NotNullViolation": "23502", "UniqueViolation": "23505"}


@pytest.mark.parametrize("target_kind", ["mariadb", "sqlite", "postgresql"])
def test_bad_rows_become_dead_letters_and_the_rest_lands(
        target_kind: str, request: pytest.FixtureRequest, state: str) -> None:
    rows = [(i, None if BAD.get(i) == "NotNullViolation" else f"person {i}",
             "p10@example.com" if i == 900 else f"p{i}@example.com",
             Decimal("-5.25") if BAD.get(i) == "CheckViolation" else Decimal(i) / 100)
            for i in range(1, 1001)]
    src = _db("sqlite" if target_kind == "postgresql" else "postgresql", "people", request)
    sql(src, "CREATE TABLE people (id int PRIMARY KEY, name text, email text, amount numeric)")
    sql(src, "INSERT INTO people VALUES (%s, %s, %s, %s)", rows, many=True)
    tgt = _db(target_kind, "people", request)
    sql(tgt, PEOPLE)
    # a PostgreSQL target holds the state store itself: letters commit with their chunk
    st = tgt if target_kind == "postgresql" else state
    extra = () if target_kind == "postgresql" else ("--state", state)
    code, doc, err = cli_copy(src, tgt, "people", "--chunk-size", "300", *extra)
    assert code == 3, err
    assert doc["status"] == "completed_with_errors"
    assert_counts_add_up(doc, 1000)
    assert doc["summary"]["failed"] == 5 and doc["summary"]["succeeded"] == 995
    assert doc["error_categories"] == {"CheckViolation": 2, "NotNullViolation": 2,
                                       "UniqueViolation": 1}
    letters = dead_letters(st, doc["job_id"])
    assert {r[0][0]: r[2] for r in letters} == BAD
    prefix = {"mariadb": "[mysql ", "sqlite": "[sqlite ", "postgresql": "[23"}[target_kind]
    for key, row, etype, sqlstate, category, message in letters:
        assert (sqlstate, category) == (SQLSTATES[etype], "data")
        i = key[0]
        assert row == {"id": i, "name": rows[i - 1][1], "email": rows[i - 1][2],
                       "amount": str(rows[i - 1][3])}  # the original values, exactly
        assert message.startswith(prefix), message
    landed = sql(tgt, "SELECT id FROM people ORDER BY id")
    assert [r[0] for r in landed] == [i for i in range(1, 1001) if i not in BAD]


# -- interruptions -----------------------------------------------------------------------------------

EVENTS = "CREATE TABLE ev (id BIGINT PRIMARY KEY, name VARCHAR(60), amount DECIMAL(12,2), at {ts})"
SLOW = ("--chunk-size", "300", "--sleep", "0.03")


def _events(url: str, rows: int, ts: str) -> list[tuple]:
    sql(url, EVENTS.format(ts=ts))
    data = [(i * 3, None if i % 11 == 0 else f"évent {i} 😀 \\", Decimal(i) / 4,
             dt.datetime(2024, 1, 1) + dt.timedelta(minutes=i)) for i in range(1, rows + 1)]
    sql(url, "INSERT INTO ev VALUES (%s, %s, %s, %s)", data, many=True)
    return data


def _assert_exact_events(url: str, data: list[tuple]) -> None:
    got = sql(url, "SELECT id, name, amount, at FROM ev ORDER BY id")
    if _kind(url) == "lite":
        got = [(i, n, Decimal(repr(a) if isinstance(a, float) else str(a)).quantize(Decimal("0.01")),
                dt.datetime.fromisoformat(t)) for i, n, a, t in got]
    assert len(got) == len({r[0] for r in got}), "duplicated rows"
    assert got == [(i, n, a.quantize(Decimal("0.01")), t) for i, n, a, t in data]


@pytest.mark.parametrize("direction", ["mariadb->pg", "pg->sqlite"])
def test_kill_9_then_rerun_is_exact(direction: str, make_db: Callable[[str], str],
                                    request: pytest.FixtureRequest, state: str,
                                    lite: Callable[[str], str], rng: random.Random,
                                    spawn: Callable[..., subprocess.Popen[str]]) -> None:
    if direction == "mariadb->pg":  # the state store is the target: checkpoint in each chunk
        src, tgt = request.getfixturevalue("make_mariadb_db")("ev"), make_db("ev")
        data, st, extra = _events(src, 10_000, "DATETIME(6)"), tgt, ()
        job = "copy:public.ev"
    else:  # the state store is elsewhere: a replayed chunk must not duplicate
        src, tgt = make_db("ev"), lite("ev")
        data, st, extra = _events(src, 10_000, "timestamp"), state, ("--state", state)
        job = f"copy:ev@sqlite:///{make_url(tgt).database}"
    proc = spawn("copy", "--source", src, "--target", tgt, "--table", "ev", "--no-progress",
                 *SLOW, *extra)
    kill_after_chunks(proc, st, job, rng.randrange(2, 25))
    assert 0 < value(tgt, "SELECT count(*) FROM ev") < len(data)
    code, doc, err = cli_copy(src, tgt, "ev", *extra)
    assert code == 0, err
    assert doc["job_id"] == job
    assert_counts_add_up(doc, len(data))
    assert doc["summary"]["succeeded"] == len(data)
    _assert_exact_events(tgt, data)


def test_replace_into_mariadb_killed_and_resumed_empties_the_target_once(
        make_db: Callable[[str], str], make_mariadb_db: Callable[[str], str], state: str,
        rng: random.Random, spawn: Callable[..., subprocess.Popen[str]]) -> None:
    src, tgt = make_db("ev"), make_mariadb_db("ev")
    data = _events(src, 10_000, "timestamp")
    args = ("--mode", "replace", "--state", state)
    code, doc, err = cli_copy(src, tgt, "ev", *args)
    assert code == 0, err
    job = doc["job_id"]
    sql(tgt, "INSERT INTO ev VALUES (-5, 'stale', 0, NULL)")
    # a fresh replace (the last one finished), killed mid-run
    proc = spawn("copy", "--source", src, "--target", tgt, "--table", "ev", "--no-progress",
                 *SLOW, *args)
    kill_after_chunks(proc, state, job, rng.randrange(2, 25))
    assert value(tgt, "SELECT count(*) FROM ev WHERE id = -5") == 0  # emptied by that run
    assert 0 < value(tgt, "SELECT count(*) FROM ev") < len(data)
    sql(tgt, "INSERT INTO ev VALUES (-7, 'sentinel', 0, NULL)")
    code, doc, err = cli_copy(src, tgt, "ev", *args)
    assert code == 0, err
    assert_counts_add_up(doc, len(data))
    # the resumed run did not empty the target again: the sentinel is still there
    assert value(tgt, "SELECT name FROM ev WHERE id = -7") == "sentinel"
    sql(tgt, "DELETE FROM ev WHERE id = -7")
    _assert_exact_events(tgt, data)


@pytest.mark.parametrize("target_kind", ["sqlite", "mariadb", "postgresql"])
def test_chunks_committed_without_their_checkpoint_are_replayed_once(
        target_kind: str, request: pytest.FixtureRequest,
        state: str, caplog: pytest.LogCaptureFixture) -> None:
    """State store elsewhere: a crash between a chunk's commit and its checkpoint leaves rows
    the checkpoint does not know. Made deterministic here by moving the checkpoint back three
    chunks; the resumed run, with smaller chunks, must neither duplicate nor lose a row."""
    # (PostgreSQL → PostgreSQL is etl.table_copy's job: the PostgreSQL target reads SQLite)
    src = _db("sqlite" if target_kind == "postgresql" else "postgresql", "evsrc", request)
    tgt = _db(target_kind, "ev", request)
    data = _events(src, 2_000, "DATETIME" if target_kind == "postgresql" else "timestamp")
    first = etl.copy(source=src, target=tgt, table="ev", state=state, chunk_size=100,
                     **stop_after(8))
    assert first.succeeded == 800 and value(tgt, "SELECT count(*) FROM ev") == 800
    sql(state, "UPDATE etl.checkpoints SET chunk_index = 5, last_key = '[1500]', "
               "processed = 500, succeeded = 500 WHERE job_id = %s", (first.job_id,))
    with caplog.at_level("WARNING", logger="etl.sql_copy"):
        again = etl.copy(source=src, target=tgt, table="ev", state=state, chunk_size=70)
    assert again.status.value == "completed"
    assert_counts_add_up(again.to_dict(), 2000)
    removed = [r.getMessage() for r in caplog.records if "without its checkpoint" in r.getMessage()]
    assert [m.split()[1] for m in removed] == ["70", "70", "70", "70", "20"]  # 300 rows replayed
    _assert_exact_events(tgt, data)


# -- options and refusals ---------------------------------------------------------------------------

def test_dry_run_writes_nothing_and_shows_the_plan(make_db: Callable[[str], str], state: str,
                                                   lite: Callable[[str], str]) -> None:
    src, tgt = make_db("ev"), lite("ev")
    _events(src, 50, "timestamp")
    code, doc, err = cli_copy(src, tgt, "ev", "--state", state, "--dry-run", "--mode", "upsert")
    assert code == 0, err
    plan = doc["metadata"]["plan"]
    assert "(missing: would be created)" in plan and 'CREATE TABLE "ev"' in plan
    assert 'ON CONFLICT ("id") DO UPDATE' in plan and "rows to copy: 50" in plan
    assert not Path(make_url(tgt).database or "").exists()  # not even an empty SQLite file
    assert value(state, "SELECT to_regclass('etl.checkpoints')::text") is None


def test_refusals_are_usage_errors(make_db: Callable[[str], str], state: str,
                                   lite: Callable[[str], str]) -> None:
    src, tgt = make_db("ev"), lite("ev")
    _events(src, 10, "timestamp")
    # the options PostgreSQL → PostgreSQL takes work here too (tests/db/test_cross_db_options.py),
    # with the same refusals
    for bad, message in (({"query": "SELECT 1 AS id", "to_table": "q"}, "--query needs --key"),
                         ({"query": "SELECT 1 AS id", "key": "id"}, "--query needs --to-table"),
                         ({"since_column": "at", "mode": "replace"}, "--mode replace"),
                         ({"since_column": "nope"}, "--since-column nope"),
                         ({"rename_columns": "lower", "columns": "id,name",
                           "to_table": "x"}, None),
                         ({"rename_columns": "id=name"}, "same name"),
                         ({"transform": "json"}, "module:function")):
        if message is None:  # a valid combination, for contrast: it runs
            assert etl.copy(source=src, target=tgt, table="ev", state=state, **bad).ok
            continue
        with pytest.raises(UsageError, match=message):
            etl.copy(source=src, target=tgt, table=None if "query" in bad else "ev",
                     state=state, **bad)
    with pytest.raises(UsageError, match="where"):
        etl.copy(source=src, target=tgt, table="ev", state=state, where="no_such_column > 1")
    with pytest.raises(TargetError, match="--no-create"):
        etl.copy(source=src, target=tgt, table="ev", state=state, create=False)
    with pytest.raises(UsageError, match="--mode upsert"):
        sql(tgt, "CREATE TABLE ev (id INT, name TEXT, amount NUMERIC, at DATETIME)")
        etl.copy(source=src, target=tgt, table="ev", state=state, mode="upsert")
    with pytest.raises(UsageError, match="not unique"):
        etl.copy(source=src, target=lite("other"), table="ev", state=state, key="amount")
    code, _, err = cli_copy(tgt, src, "ev", "--state", "sqlite:///nowhere.sqlite")
    assert code == 2 and "state store must be PostgreSQL" in err
