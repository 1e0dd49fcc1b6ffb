"""--query, --rename-columns, --since-column and --transform across databases (etl.sql_copy).

The same semantics as PostgreSQL → PostgreSQL (tests/db/test_query_copy.py,
test_rename_columns.py, test_incremental.py, test_transforms.py), checked here between
real PostgreSQL, MariaDB and SQLite databases in several directions. Every check reads
the databases with their own drivers; interruptions are real (a `kill -9` of the `etl`
process, a stop at a chunk boundary, a checkpoint that lags behind committed chunks).
MariaDB tests are skipped with a reason where no MariaDB answers. No mocks.
"""

from __future__ import annotations

import datetime as dt
import json
import textwrap
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import sqlalchemy as sa

import etl
from etl.dialects import make_engine
from tests.conftest import run_etl
from tests.db.test_cross_db import (
    _db,
    _kind,
    assert_counts_add_up,
    dead_letters,
    kill_after_chunks,
    sql,
    stop_after,
    value,
)

pytestmark = pytest.mark.timeout(180)

UTC = dt.UTC
T0 = dt.datetime(2024, 1, 1, 0, 0, 0, 250_000)  # microseconds: watermarks must be exact
# directions each option is checked in: MariaDB and SQLite to and from PostgreSQL
THREE_WAYS = [("mariadb", "postgresql"), ("postgresql", "mariadb"), ("postgresql", "sqlite")]
FOUR_WAYS = [*THREE_WAYS, ("sqlite", "postgresql")]


@pytest.fixture
def state(make_db: Callable[[str], str]) -> str:
    """A PostgreSQL state store for copies into MariaDB and SQLite."""
    return make_db("state")


def _pair(request: pytest.FixtureRequest, source_kind: str, target_kind: str,
          name: str) -> tuple[str, str]:
    """A fresh source and target database of those kinds."""
    return _db(source_kind, f"{name}src", request), _db(target_kind, f"{name}tgt", request)


def _state_for(target: str, state: str) -> str | None:
    """The state store a copy into ``target`` uses: its own database when PostgreSQL."""
    return None if _kind(target) == "pg" else state


def _state_db(target: str, state: str) -> str:
    return target if _kind(target) == "pg" else state


def _naive_utc(v: Any) -> Any:
    """A timestamp from any of the three databases as a naive UTC datetime."""
    if isinstance(v, str):
        v = dt.datetime.fromisoformat(v)
    if isinstance(v, dt.datetime) and v.tzinfo is not None:
        v = v.astimezone(UTC).replace(tzinfo=None)
    return v


def _number(v: Any) -> Decimal | None:
    """A numeric value from any database (SQLite: REAL or text) as a Decimal."""
    return None if v is None else Decimal(repr(v) if isinstance(v, float) else str(v))


def _timestamp_type(kind: str) -> str:
    return {"pg": "timestamptz", "my": "DATETIME(6)", "lite": "DATETIME"}[kind]


def _ts_param(kind: str, v: dt.datetime) -> Any:
    """``v`` (naive UTC) as each database's column takes it."""
    return v.replace(tzinfo=UTC) if kind == "pg" else v


def _pk(url: str, table: str) -> list[str]:
    engine = make_engine(url)
    try:
        return list(sa.inspect(engine).get_pk_constraint(table)["constrained_columns"])
    finally:
        engine.dispose()


def _columns(url: str, table: str) -> list[str]:
    engine = make_engine(url)
    try:
        return [c["name"] for c in sa.inspect(engine).get_columns(table)]
    finally:
        engine.dispose()


# -- --query ----------------------------------------------------------------------------------

# portable SQL with a % and a colon in its literals (neither may be taken for a parameter)
QUERY = ("SELECT o.id AS order_id, c.name AS customer, o.total * 2 AS doubled, "
         "o.placed AS placed FROM orders o JOIN customers c ON c.id = o.customer "
         "WHERE c.name LIKE 'c%' AND c.name <> 'x:y'")
N_ORDERS = 3_000


def _orders(url: str) -> list[tuple[Any, ...]]:
    """Customers and orders in any database; the query's expected result, in key order."""
    kind = _kind(url)
    sql(url, "CREATE TABLE customers (id INT PRIMARY KEY, name VARCHAR(40) NOT NULL)")
    sql(url, f"CREATE TABLE orders (id BIGINT PRIMARY KEY, customer INT NOT NULL, "
             f"total DECIMAL(12,2), placed {_timestamp_type(kind)})")
    sql(url, "INSERT INTO customers VALUES (%s, %s)",
        [(i, ("x" if i % 4 == 0 else "c") + str(i)) for i in range(1, 101)], many=True)
    rows = [(i, 1 + i % 100, Decimal(i) / 4, T0 + dt.timedelta(hours=i, microseconds=i))
            for i in range(1, N_ORDERS + 1)]
    sql(url, "INSERT INTO orders VALUES (%s, %s, %s, %s)",
        [(i, c, t, _ts_param(kind, p)) for i, c, t, p in rows], many=True)
    names = {i: ("x" if i % 4 == 0 else "c") + str(i) for i in range(1, 101)}
    return [(i, names[c], t * 2, p) for i, c, t, p in rows if names[c].startswith("c")]


def _normalised(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [(int(i), name, _number(d), _naive_utc(p)) for i, name, d, p in rows]


@pytest.mark.parametrize(("source_kind", "target_kind"), FOUR_WAYS)
def test_query_result_copied_resumed_after_kill_9_and_keyed_on_its_key(
        source_kind: str, target_kind: str, request: pytest.FixtureRequest, state: str,
        spawn: Callable[..., Any]) -> None:
    src, tgt = _pair(request, source_kind, target_kind, "q")
    want = _orders(src)
    args = ["copy", "--source", src, "--target", tgt, "--query", QUERY, "--to-table",
            "big_orders", "--key", "order_id", "--job", "q", "--no-progress", "--json"]
    st = _state_for(tgt, state)
    if st:
        args += ["--state", st]
    proc = spawn(*args, "--chunk-size", "100", "--sleep", "0.05")
    kill_after_chunks(proc, _state_db(tgt, state), "q", 3)
    landed = value(tgt, "SELECT count(*) FROM big_orders")
    assert 300 <= landed < len(want)
    again = run_etl(*args, "--chunk-size", "250")
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert doc["summary"]["succeeded"] == doc["summary"]["total_items"] == len(want)
    assert doc["summary"]["failed"] == doc["summary"]["skipped"] == 0
    got = sql(tgt, "SELECT order_id, customer, doubled, placed FROM big_orders ORDER BY order_id")
    assert _normalised(got) == _normalised(want)  # each row once, value by value
    # the created target's primary key is --key, so an upsert rerun matches every row
    assert _pk(tgt, "big_orders") == ["order_id"]
    rerun = etl.copy(source=src, target=tgt, query=QUERY, to_table="big_orders",
                     key="order_id", mode="upsert", state=st, restart=True, chunk_size=500)
    assert rerun.status.value == "completed", rerun.message
    assert rerun.to_dict()["metadata"]["outcomes"]["unchanged"] == len(want)
    if source_kind == "mariadb":  # MySQL derives DECIMAL(13,2) for total * 2: kept exactly
        assert value(tgt, "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE "
                          "attrelid = 'big_orders'::regclass AND attname = 'doubled'") == \
            "numeric(13,2)"


def test_query_key_that_is_not_unique_stops_the_run_instead_of_losing_rows(
        make_db: Callable[[str], str], tmp_path: Path, state: str) -> None:
    src, tgt = make_db("qdup"), f"sqlite:///{tmp_path / 'qdup.sqlite'}"
    sql(src, "CREATE TABLE t (id int PRIMARY KEY, grp int NOT NULL)")
    sql(src, "INSERT INTO t SELECT g, g / 10 FROM generate_series(1, 200) g")
    result = etl.copy(source=src, target=tgt, query="SELECT grp, id FROM t", to_table="grps",
                      key="grp", state=state, chunk_size=25)
    assert result.status.value == "failed"
    assert "--key grp is not unique in the --query result" in result.message
    # a unique key of the same query copies every row
    ok = etl.copy(source=src, target=tgt, query="SELECT grp, id FROM t", to_table="grps2",
                  key="grp,id", state=state, chunk_size=25, mode="upsert")
    assert ok.status.value == "completed" and value(tgt, "SELECT count(*) FROM grps2") == 200


def test_query_usage_errors_across_databases(make_db: Callable[[str], str], tmp_path: Path,
                                             state: str) -> None:
    src, tgt = f"sqlite:///{tmp_path / 'q.sqlite'}", make_db("qerr")
    _orders(src)
    base = ["copy", "--source", src, "--target", tgt, "--no-progress", "--to-table", "t"]
    for extra, message in (
            (["--query", "SELECT nope FROM orders", "--key", "nope"],
             "--query does not run on the source"),
            (["--query", "SELECT id, id FROM orders", "--key", "id"],
             "more than one column named id"),
            (["--query", "SELECT id FROM orders"], "--query needs --key"),
            (["--query", "SELECT id FROM orders", "--key", "other"],
             "--key column(s) other not found")):
        proc = run_etl(*base, *extra)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# -- --rename-columns -------------------------------------------------------------------------

def _invoice_lines(url: str, n: int = 3_000) -> None:
    create = ("CREATE TABLE InvoiceLine (InvoiceLineId INT PRIMARY KEY, "
              "UnitPrice DECIMAL(10,2), TrackName VARCHAR(60))")
    if _kind(url) == "pg":  # PostgreSQL folds unquoted names to lower case
        for name in ("InvoiceLineId", "InvoiceLine", "UnitPrice", "TrackName"):
            create = create.replace(f"{name} ", f'"{name}" ')
    sql(url, create)
    table = '"InvoiceLine"' if _kind(url) == "pg" else "InvoiceLine"
    sql(url, f"INSERT INTO {table} VALUES (%s, %s, %s)",
        [(i, Decimal(i) * Decimal("0.99"), f"Track \\ {i}") for i in range(1, n + 1)], many=True)


@pytest.mark.parametrize(("source_kind", "target_kind"), THREE_WAYS)
def test_rename_columns_names_the_target_its_key_and_upserts(
        source_kind: str, target_kind: str, request: pytest.FixtureRequest,
        state: str) -> None:
    src, tgt = _pair(request, source_kind, target_kind, "rn")
    _invoice_lines(src)
    kw: dict[str, Any] = dict(source=src, target=tgt, table="InvoiceLine",
                              to_table="invoice_line", rename_columns="snake_case",
                              chunk_size=700, mode="upsert", state=_state_for(tgt, state))
    first = etl.copy(**kw, **stop_after(2))
    assert first.status.value == "stopped" and first.succeeded == 1400
    done = etl.copy(**kw)
    assert done.status.value == "completed" and done.rows_this_run == 1600, done.message
    assert _columns(tgt, "invoice_line") == ["invoice_line_id", "unit_price", "track_name"]
    assert _pk(tgt, "invoice_line") == ["invoice_line_id"]
    got = sql(tgt, "SELECT invoice_line_id, unit_price, track_name FROM invoice_line "
                   "ORDER BY invoice_line_id")
    assert [(i, _number(p), t) for i, p, t in got] == \
        [(i, Decimal(i) * Decimal("0.99"), f"Track \\ {i}") for i in range(1, 3001)]
    # upsert matches rows on the renamed key: unchanged rows stay, changed ones update
    table = '"InvoiceLine"' if source_kind == "postgresql" else "InvoiceLine"
    column = '"TrackName"' if source_kind == "postgresql" else "TrackName"
    key = '"InvoiceLineId"' if source_kind == "postgresql" else "InvoiceLineId"
    sql(src, f"UPDATE {table} SET {column} = 'changed' WHERE {key} <= 10")
    again = etl.copy(**{**kw, "restart": True})
    assert again.to_dict()["metadata"]["outcomes"]["updated"] == 10
    assert again.to_dict()["metadata"]["outcomes"]["unchanged"] == 2990
    assert value(tgt, "SELECT count(*) FROM invoice_line WHERE track_name = 'changed'") == 10


def test_rename_columns_map_and_replay_guard_on_the_new_key_names(
        make_db: Callable[[str], str], make_mariadb_db: Callable[[str], str],
        state: str) -> None:
    """State elsewhere (a MariaDB target): a checkpoint that lags behind committed chunks makes
    the resumed append run delete the rows it is about to write again, on the renamed key."""
    src, tgt = make_db("rgsrc"), make_mariadb_db("rgtgt")
    _invoice_lines(src, 1_000)
    kw: dict[str, Any] = dict(source=src, target=tgt, table="InvoiceLine", to_table="line_copy",
                              rename_columns="InvoiceLineId=line_id,UnitPrice=price",
                              state=state)
    first = etl.copy(**kw, chunk_size=100, **stop_after(6))
    assert first.succeeded == 600
    assert _columns(tgt, "line_copy") == ["line_id", "price", "TrackName"]
    sql(state, "UPDATE etl.checkpoints SET chunk_index = 3, last_key = '[300]', "
               "processed = 300, succeeded = 300 WHERE job_id = %s", (first.job_id,))
    again = etl.copy(**kw, chunk_size=150)
    assert again.status.value == "completed", again.message
    assert_counts_add_up(again.to_dict(), 1000)
    assert sql(tgt, "SELECT line_id FROM line_copy ORDER BY line_id") == \
        [(i,) for i in range(1, 1001)]  # the 300 replayed rows are there once


def test_rename_columns_that_collide_are_refused(make_db: Callable[[str], str],
                                                 tmp_path: Path, state: str) -> None:
    src = make_db("rncol")
    sql(src, 'CREATE TABLE t ("Id" int PRIMARY KEY, "ID" int)')
    proc = run_etl("copy", "--source", src, "--target", f"sqlite:///{tmp_path / 'c.sqlite'}",
                   "--table", "t", "--rename-columns", "lower", "--state", state,
                   "--no-progress")
    assert proc.returncode == 2 and "same name 'id'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# -- --since-column ---------------------------------------------------------------------------

BOUNDARY = T0 + dt.timedelta(seconds=2_961)


def _accounts(url: str) -> None:
    """3,000 rows; the last 40 share the newest timestamp (the first run's boundary)."""
    kind = _kind(url)
    sql(url, f"CREATE TABLE acct (id INT PRIMARY KEY, balance INT NOT NULL, "
             f"updated_at {_timestamp_type(kind)})")
    sql(url, "INSERT INTO acct VALUES (%s, %s, %s)",
        [(i, i, _ts_param(kind, T0 + dt.timedelta(seconds=min(i, 2_961))))
         for i in range(1, 3001)], many=True)


def _acct_rows(url: str) -> list[tuple[int, int, Any]]:
    return [(int(i), int(b), _naive_utc(u))
            for i, b, u in sql(url, "SELECT id, balance, updated_at FROM acct ORDER BY id")]


def _sync(src: str, tgt: str, state: str, **kw: Any) -> etl.Result:
    return etl.copy(source=src, target=tgt, table="acct", since_column="updated_at",
                    mode="upsert", state=_state_for(tgt, state), **kw)


@pytest.mark.parametrize(("source_kind", "target_kind"), FOUR_WAYS)
def test_changed_rows_arrive_exactly_once_including_the_boundary_timestamp(
        source_kind: str, target_kind: str, request: pytest.FixtureRequest,
        state: str) -> None:
    src, tgt = _pair(request, source_kind, target_kind, "inc")
    kind = _kind(src)
    _accounts(src)
    first = _sync(src, tgt, state)
    assert first.status.value == "completed" and first.succeeded == 3000, first.message
    wm = first.to_dict()["metadata"]["watermark"]
    assert wm["from"] is None and _naive_utc(wm["next"]) == BOUNDARY  # exact, microseconds too

    # between runs: new rows, updated rows, and late rows stamped exactly at the boundary
    later = BOUNDARY + dt.timedelta(hours=1)
    sql(src, "INSERT INTO acct VALUES (%s, %s, %s)",
        [(i, i, _ts_param(kind, later)) for i in range(3001, 3101)], many=True)
    sql(src, "UPDATE acct SET balance = -balance, updated_at = %s "
             "WHERE id %% 100 = 0 AND id <= 3000".replace("%%", "%" if kind == "lite" else "%%"),
        (_ts_param(kind, later + dt.timedelta(microseconds=1)),))
    sql(src, "INSERT INTO acct VALUES (%s, %s, %s)",
        [(i, i, _ts_param(kind, BOUNDARY)) for i in range(5001, 5006)], many=True)
    second = _sync(src, tgt, state)
    doc = second.to_dict()
    assert doc["metadata"]["outcomes"] == {"inserted": 105, "updated": 30, "unchanged": 0,
                                           "ignored": 0, "superseded": 0}, doc["metadata"]
    assert doc["summary"]["processed"] == 135  # the 40 boundary rows of run 1 are not re-read
    assert _acct_rows(tgt) == _acct_rows(src)

    third = _sync(src, tgt, state)
    assert third.status.value == "completed" and third.to_dict()["summary"]["processed"] == 0


@pytest.mark.parametrize(("source_kind", "target_kind"), [
    ("mariadb", "sqlite"), ("sqlite", "mariadb")])
def test_interrupted_walk_resumes_with_the_same_bounds(
        source_kind: str, target_kind: str, request: pytest.FixtureRequest,
        state: str) -> None:
    src, tgt = _pair(request, source_kind, target_kind, "iw")
    kind = _kind(src)
    _accounts(src)
    _sync(src, tgt, state)
    later = BOUNDARY + dt.timedelta(minutes=5)
    sql(src, "UPDATE acct SET balance = 0, updated_at = %s WHERE id %% 3 = 0".replace(
        "%%", "%" if kind == "lite" else "%%"), (_ts_param(kind, later),))
    partial = _sync(src, tgt, state, chunk_size=200, **stop_after(1))
    assert partial.status.value == "stopped" and partial.succeeded == 200
    # a row changed while the walk is interrupted: taken by this walk or the next, never lost
    sql(src, "UPDATE acct SET balance = 42, updated_at = %s WHERE id = 1",
        (_ts_param(kind, later + dt.timedelta(minutes=1)),))
    resumed = _sync(src, tgt, state, chunk_size=200)
    assert resumed.status.value == "completed", resumed.message
    assert resumed.to_dict()["summary"]["processed"] == 1000  # the same walk, the same rows
    assert resumed.to_dict()["metadata"]["outcomes"]["updated"] == 1000
    assert resumed.to_dict()["metadata"]["watermark"] == partial.to_dict()["metadata"]["watermark"]
    last = _sync(src, tgt, state)
    assert last.to_dict()["summary"]["processed"] == 1  # id 1, changed meanwhile
    assert _acct_rows(tgt) == _acct_rows(src)


def test_since_column_refusals_across_databases(make_db: Callable[[str], str],
                                                tmp_path: Path, state: str) -> None:
    src, tgt = make_db("increfuse"), f"sqlite:///{tmp_path / 'r.sqlite'}"
    _accounts(src)
    for kw, message in (({"since_column": "nope", "mode": "upsert"}, "--since-column nope"),
                        ({"since_column": "updated_at", "mode": "replace"}, "replace")):
        with pytest.raises(etl.UsageError, match=message):
            etl.copy(source=src, target=tgt, table="acct", state=state, **kw)


# -- --transform ------------------------------------------------------------------------------

N_PEOPLE = 2_000


def _people(url: str) -> None:
    kind = _kind(url)
    sql(url, f"CREATE TABLE people (id INT PRIMARY KEY, name VARCHAR(60), email VARCHAR(60), "
             f"score DECIMAL(8,2), born DATE, seen {_timestamp_type(kind)})")
    sql(url, "INSERT INTO people VALUES (%s, %s, %s, %s, %s, %s)", [
        (i, f"  Name {i} ü  ", "not-an-email" if i % 250 == 0 else f"p{i}@example.com",
         Decimal(i) / 4, dt.date(1970, 1, 1) + dt.timedelta(days=i),
         _ts_param(kind, T0 + dt.timedelta(seconds=i, microseconds=i)))
        for i in range(1, N_PEOPLE + 1)], many=True)


def clean(df: pl.DataFrame) -> pl.DataFrame:
    """Trim names, upper-case emails, reject rows without an @, drop odd ids above 1,900;
    raise on id 777 (the rows it raises on alone are rejected with the exception)."""
    if 777 in df["id"].to_list():
        raise ValueError("777 is cursed")
    return (df.filter(~((pl.col("id") > 1_900) & (pl.col("id") % 2 == 1)))
              .with_columns(pl.col("name").str.strip_chars(),
                            pl.col("email").str.to_uppercase(),
                            pl.when(pl.col("email").str.contains("@")).then(None)
                              .otherwise(pl.lit("email has no @")).alias("_reject")))


def _people_rows(url: str) -> list[tuple[Any, ...]]:
    return [(int(i), n, e, _number(s), b if isinstance(b, dt.date) else dt.date.fromisoformat(b),
             _naive_utc(t)) for i, n, e, s, b, t in
            sql(url, "SELECT id, name, email, score, born, seen FROM people ORDER BY id")]


@pytest.mark.parametrize(("source_kind", "target_kind"), THREE_WAYS)
def test_transform_rejects_drops_raises_and_rewrites(
        source_kind: str, target_kind: str, request: pytest.FixtureRequest,
        state: str) -> None:
    src, tgt = _pair(request, source_kind, target_kind, "tr")
    _people(src)
    result = etl.copy(source=src, target=tgt, table="people", transform=clean, chunk_size=300,
                      state=_state_for(tgt, state))
    assert result.status.value == "completed_with_errors", result.message
    s = result.to_dict()["summary"]
    rejected = N_PEOPLE // 250 + 1  # ids 250, 500, … 2000 (even: not dropped), and 777
    dropped = 50                    # odd ids 1901..1999
    assert (s["failed"], s["skipped"], s["succeeded"]) == \
        (rejected, dropped, N_PEOPLE - rejected - dropped), s
    assert_counts_add_up(result.to_dict(), N_PEOPLE)
    source = {r[0]: r for r in _people_rows(src)}
    want = [(i, n.strip(), e.upper(), sc, b, t) for i, n, e, sc, b, t in source.values()
            if "@" in e and i != 777 and not (i > 1900 and i % 2 == 1)]
    assert _people_rows(tgt) == want  # the other columns arrived exactly
    letters = dead_letters(_state_db(tgt, state), result.job_id)
    assert len(letters) == rejected
    by_id = {k[0]: (row, etype, state_, cat, msg) for k, row, etype, state_, cat, msg in letters}
    assert {cat for _, _, _, cat, _ in by_id.values()} == {"validation"}
    row, etype, _, _, msg = by_id[500]
    assert etype == "Rejected" and msg == "email has no @"
    assert row["name"] == "  Name 500 ü  " and row["email"] == "not-an-email"  # the original
    assert Decimal(row["score"]) == Decimal("125.00")
    assert "ValueError: 777 is cursed" in by_id[777][4] and by_id[777][0]["id"] == 777


def test_transform_result_columns_upsert_and_target_refusals(
        make_db: Callable[[str], str], make_mariadb_db: Callable[[str], str],
        state: str) -> None:
    """A transform returning fewer columns upserts only those; rows the target refuses are
    data dead letters holding the original source row (MariaDB → PostgreSQL)."""
    src, tgt = make_mariadb_db("trusrc"), make_db("trutgt")
    _people(src)
    sql(tgt, "CREATE TABLE people (id int PRIMARY KEY, name text, email text, "
             "score numeric(8,2) CHECK (score < 490), born date, seen timestamptz)")

    def shout(df: pl.DataFrame) -> pl.DataFrame:
        return df.select("id", pl.col("name").str.to_uppercase(), "score")

    first = etl.copy(source=src, target=tgt, table="people", transform=shout, mode="upsert",
                     chunk_size=400)
    assert first.status.value == "completed_with_errors", first.message
    refused = [i for i in range(1, N_PEOPLE + 1) if Decimal(i) / 4 >= 490]
    s = first.to_dict()["summary"]
    assert (s["failed"], s["succeeded"]) == (len(refused), N_PEOPLE - len(refused))
    letters = dead_letters(tgt, first.job_id)
    assert [k[0] for k, *_ in letters] == refused
    key, row, etype, sqlstate, category, _ = letters[0]
    assert (etype, sqlstate, category) == ("CheckViolation", "23514", "data")
    assert row["name"] == f"  Name {refused[0]} ü  " and row["email"] == f"p{refused[0]}@example.com"
    assert value(tgt, "SELECT count(*) FROM people WHERE email IS NULL AND name = upper(name)") \
        == N_PEOPLE - len(refused)  # only the returned columns were written
    # a rerun that changes one column updates the rows, leaving the others as they are
    sql(tgt, "UPDATE people SET email = 'kept'")
    second = etl.copy(source=src, target=tgt, table="people", transform=shout, mode="upsert",
                      chunk_size=400, restart=True)
    assert second.to_dict()["metadata"]["outcomes"]["unchanged"] == N_PEOPLE - len(refused)
    assert value(tgt, "SELECT count(*) FROM people WHERE email = 'kept'") == \
        N_PEOPLE - len(refused)


def test_transform_file_from_the_cli_into_sqlite(make_db: Callable[[str], str], tmp_path: Path,
                                                 state: str) -> None:
    src, tgt = make_db("trcli"), f"sqlite:///{tmp_path / 'people.sqlite'}"
    _people(src)
    script = tmp_path / "fix.py"
    script.write_text(textwrap.dedent("""
        import polars as pl

        def only_even(df: pl.DataFrame) -> pl.DataFrame:
            return df.filter(pl.col("id") % 2 == 0).with_columns(
                pl.when(pl.col("id") == 10).then(pl.lit("ten")).otherwise(None).alias("_reject"))
    """))
    proc = run_etl("copy", "--source", src, "--target", tgt, "--table", "people",
                   "--transform", f"{script}:only_even", "--state", state, "--chunk-size", "500",
                   "--rename-columns", "name=full_name", "--no-progress", "--json")
    assert proc.returncode == 3, proc.stderr  # completed with dead-lettered rows
    doc = json.loads(proc.stdout)
    assert (doc["summary"]["succeeded"], doc["summary"]["failed"], doc["summary"]["skipped"]) \
        == (N_PEOPLE // 2 - 1, 1, N_PEOPLE // 2)
    assert value(tgt, "SELECT count(*) FROM people WHERE id % 2 = 1 OR id = 10") == 0
    assert _columns(tgt, "people")[:2] == ["id", "full_name"]  # the transform's name, renamed
    assert value(tgt, "SELECT full_name FROM people WHERE id = 2") == "  Name 2 ü  "
    (_, row, _, _, category, message), = dead_letters(state, doc["job_id"])
    assert (category, message, row["name"]) == ("validation", "ten", "  Name 10 ü  ")
    bad = run_etl("copy", "--source", src, "--target", tgt, "--table", "people",
                  "--transform", f"{tmp_path / 'missing.py'}:f", "--state", state,
                  "--no-progress")
    assert bad.returncode == 2 and "--transform" in bad.stderr and "Traceback" not in bad.stderr
