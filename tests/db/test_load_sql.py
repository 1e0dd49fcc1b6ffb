"""`etl load` into real SQLite and MariaDB: values parsed and converted in Python, rows the
database refuses isolated in savepoints, the position kept in the target
(etl_load_checkpoints), dead letters and checkpoint in a PostgreSQL state store."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import etl
from etl.runner import StopFlag
from tests.conftest import run_etl
from tests.db.test_archive import StopAfter

pytestmark = pytest.mark.timeout(120)


@dataclass
class Db:
    """A target database: ``kind`` sqlite or mariadb, its URL, and SQL run through SQLAlchemy."""

    kind: str
    url: str
    engine: Any

    def run(self, statements: str) -> None:
        with self.engine.begin() as conn:
            for statement in statements.split(";"):
                if statement.strip():
                    conn.exec_driver_sql(statement)

    def rows(self, query: str) -> list[tuple]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(query).fetchall()]

    def ddl(self, *, mariadb: str, sqlite: str) -> None:
        self.run(mariadb if self.kind == "mariadb" else sqlite)


@pytest.fixture(params=["sqlite", "mariadb"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Db]:
    from etl.dialects import make_engine

    if request.param == "sqlite":
        path = tmp_path / "target.db"
        sqlite3.connect(path).close()
        url = f"sqlite:///{path}"
    else:  # skipped with the reason when no MariaDB answers (a failure under CI)
        url = request.getfixturevalue("make_mariadb_db")("load")
    engine = make_engine(url)
    yield Db(request.param, url, engine)
    engine.dispose()


@pytest.fixture
def state(make_db) -> str:
    return make_db("state")


def rejects_of(path: Path) -> dict[int, str]:
    if not path.exists():
        return {}
    return {(r.get("line") or r["row"]): r["sqlstate"]
            for r in map(json.loads, path.read_text().splitlines())}


def letters_of(state: str, job: str) -> list[tuple]:
    with psycopg.connect(state, autocommit=True) as conn:
        return conn.execute("SELECT item_key, row_data, error_type, sqlstate, error_message "
                            "FROM etl.dead_letters WHERE job_id = %s ORDER BY id",
                            (job,)).fetchall()


def same(got: Any, want: Any) -> bool:
    """A value read back equals the expected one, whatever the database's Python type."""
    if want is None or got is None:
        return got is want
    if isinstance(want, bool):
        return int(got) == int(want)
    if isinstance(want, Decimal):
        return Decimal(str(got)) == want
    if isinstance(want, dt.datetime):
        got = dt.datetime.fromisoformat(got) if isinstance(got, str) else got
        if got.tzinfo is not None:
            got = got.astimezone(dt.UTC).replace(tzinfo=None)
        return got == want
    if isinstance(want, dt.date):
        return (dt.date.fromisoformat(got) if isinstance(got, str) else got) == want
    if isinstance(want, (dict, list)):
        return json.loads(got) == want
    return got == want


def assert_rows(db: Db, query: str, expected: dict[int, dict[str, Any]]) -> None:
    names = list(next(iter(expected.values())))
    got = {r[0]: dict(zip(names, r[1:], strict=True)) for r in db.rows(query)}
    assert set(got) == set(expected), got
    for key, want in expected.items():
        bad = {n: (got[key][n], w) for n, w in want.items() if not same(got[key][n], w)}
        assert not bad, (key, bad)


CSV = (
    "id|code|born|n|note|at\n"                                          # 1: header
    "1|a|2024-01-02|10|plain|2024-01-02 10:00:00+01\n"                  # 2
    "2|b|31/31/2024|11|bad date|2024-01-02 10:00:00.1\n"                # 3: not a date
    "\n"                                                                # 4: blank: skipped
    "3|c|2024-01-04|12\n"                                               # 5: short row
    "4|d|2024-01-05|1x3|not a number|2024-01-05 00:00:00\n"             # 6
    "5|toolong|2024-01-06|14|varchar(3)|2024-01-06\n"                   # 7: too long (etl)
    "6|e|2024-01-07|99999999999999999999|int too big|2024-01-07\n"      # 8: out of range
    "7|f|2024-01-08|15||2024-01-08T00:00:00.5\n"                        # 9: empty note = NULL
    '8|g|2024-01-09|16|""|2024-01-09\n'                                 # 10: "" = empty string
    f"9|h|2024-01-10|17|{'x' * 300}|2024-01-10\n"                       # 11: > TINYTEXT
    "10|i|2024-01-11||no n (NOT NULL)|2024-01-11\n"                     # 12: NULL into NOT NULL
    "1|j|2024-01-12|18|duplicate key|2024-01-12\n"                      # 13: id 1 again
    "12|k|2024-01-13|19|no parent|2024-01-13\n"                         # 14: foreign key
    '13|l|2024-01-14|20|"multi\nline"|2024-01-14\n'                     # 15-16: quoted newline
    "14|m|2024-02-30|21|no such day|2024-01-15\n"                       # 17
    '15|n|2024-01-16|22|"never closed|2024-01-16\n'                     # 18: unclosed quote
)


def test_a_csv_loads_exactly_the_good_lines(db: Db, state: str, tmp_path: Path) -> None:
    parents = ", ".join(f"({i})" for i in [*range(1, 12), 13, 14, 15])
    db.ddl(mariadb=f"CREATE TABLE parent (id INT PRIMARY KEY); INSERT INTO parent VALUES "
                   f"{parents}; CREATE TABLE t (id INT PRIMARY KEY, code VARCHAR(3), born DATE, "
                   "n INT NOT NULL, note TINYTEXT, at DATETIME(6), "
                   "CONSTRAINT t_fk FOREIGN KEY (id) REFERENCES parent (id))",
           sqlite=f"CREATE TABLE parent (id INTEGER PRIMARY KEY); INSERT INTO parent VALUES "
                  f"{parents}; CREATE TABLE t (id INTEGER PRIMARY KEY REFERENCES parent (id), "
                  "code VARCHAR(3), born DATE, n INT NOT NULL, note TEXT, at TIMESTAMP)")
    f = tmp_path / "t.csv"
    f.write_text(CSV)
    rejects = tmp_path / "rejects.ndjson"
    out = run_etl("load", "--target", db.url, "--table", "t", "--delimiter", "|", "--state",
                  state, "--rejects", str(rejects), "--max-error-rate", "1", "--json",
                  "--no-progress", str(f))
    assert out.returncode == 3, out.stderr  # completed with dead-lettered rows
    doc = json.loads(out.stdout)
    expected = {3: "22007", 5: "22P04", 6: "22P02", 7: "22001", 8: "22003", 12: "23502",
                13: "23505", 14: "23503", 17: "22008", 18: "22P04"}
    loaded = {1, 7, 8, 13}
    if db.kind == "mariadb":  # MariaDB (strict mode) refuses 300 characters in a TINYTEXT
        expected[11] = "22001"
    else:  # SQLite's TEXT takes them
        loaded.add(9)
    assert {r[0] for r in db.rows("SELECT id FROM t")} == loaded
    assert rejects_of(rejects) == expected
    assert doc["summary"] == {**doc["summary"], "total_items": 15, "succeeded": len(loaded),
                              "failed": len(expected), "skipped": 0}
    assert_rows(db, "SELECT id, note, at FROM t WHERE id IN (1, 7, 8, 13)", {
        1: {"note": "plain", "at": dt.datetime(2024, 1, 2, 9)},      # +01 → UTC
        7: {"note": None, "at": dt.datetime(2024, 1, 8, 0, 0, 0, 500000)},
        8: {"note": "", "at": dt.datetime(2024, 1, 9)},
        13: {"note": "multi\nline", "at": dt.datetime(2024, 1, 14)}})
    # every refused row is a dead letter in the state store: file, line, raw text, reason
    letters = letters_of(state, doc["job_id"])
    assert sorted(k[1] for k, *_ in letters) == sorted(expected)
    by_line = {k[1]: (data, etype, message) for k, data, etype, _, message in letters}
    assert by_line[5][0]["raw"] == "3|c|2024-01-04|12"
    assert by_line[3][1] == "InvalidDatetimeFormat" and "born" in by_line[3][2] \
        and "31/31/2024" in by_line[3][2]
    assert "column n" in by_line[8][2] and by_line[14][1] == "ForeignKeyViolation"
    # the target's own position row says finished; no dead letter is left in it
    assert db.rows("SELECT finished, succeeded, failed FROM etl_load_checkpoints") == [
        (1, len(loaded), len(expected))]
    assert db.rows("SELECT count(*) FROM etl_load_rejects") == [(0,)]


NDJSON = "\n".join([
    '{"id": 1, "big": 9007199254740993, "amount": "12.3456", "f": 0.1, "flag": true, '
    '"d": "2024-02-29", "ts": "2024-01-02T03:04:05.123456", "tz": "2024-01-02 03:04:05+02:00", '
    '"s": "é✓", "j": {"a": [1, 2.5]}, "bin": "\\\\x00ff"}',            # 1
    '{"id": 2, "amount": 1e3, "flag": "no", "extra": 1}',             # 2: missing keys: NULL
    '{"id": 3, "flag": 2}',                                           # 3: not a boolean
    "[1, 2]",                                                         # 4: not an object
    '{"id": 4, ',                                                     # 5: not JSON
    '{"id": 5, "d": "2024-13-01"}',                                   # 6: no month 13
    '{"id": 6, "amount": 12345678.9}',                                # 7: > decimal(10,3)
    '{"id": 7, "s": "' + "x" * 21 + '"}',                             # 8: > varchar(20)
    '{"id": 8, "j": "not json"}',                                     # 9
    '{"id": 9, "f": "NaN"}',                                          # 10: neither stores NaN
    "",                                                               # 11: blank: skipped
    '{"id": 10, "big": "12", "f": "1e2", "flag": "T", "j": "[1, 2]"}',  # 12
])
V_MARIADB = ("CREATE TABLE v (id INT PRIMARY KEY, big BIGINT, amount DECIMAL(10,3), f DOUBLE, "
             "flag BOOLEAN, d DATE, ts DATETIME(6), tz TIMESTAMP(6) NULL, s VARCHAR(20), j JSON, "
             "bin VARBINARY(8))")
V_SQLITE = ("CREATE TABLE v (id INTEGER PRIMARY KEY, big BIGINT, amount DECIMAL(10,3), f DOUBLE, "
            "flag BOOLEAN, d DATE, ts DATETIME, tz TIMESTAMPTZ, s VARCHAR(20), j JSON, bin BLOB)")
V_COLUMNS = "id, big, amount, f, flag, d, ts, tz, s, j, bin"
NULLS = dict.fromkeys(["big", "amount", "f", "flag", "d", "ts", "tz", "s", "j", "bin"])


def test_ndjson_and_parquet_load_exactly(db: Db, state: str, tmp_path: Path) -> None:
    db.ddl(mariadb=V_MARIADB, sqlite=V_SQLITE)
    f = tmp_path / "v.ndjson"
    f.write_text(NDJSON + "\n")
    rejects = tmp_path / "rejects.ndjson"
    first = etl.load(str(f), table="v", target=db.url, state=state, rejects=rejects,
                     max_error_rate=1)
    assert first.status is etl.Status.COMPLETED_WITH_ERRORS, first.message
    assert (first.succeeded, first.failed) == (3, 8)
    assert rejects_of(rejects) == {3: "22P02", 4: "22023", 5: "22P02", 6: "22008",
                                   7: "22003", 8: "22001", 9: "22P02", 10: "22003"}
    assert_rows(db, f"SELECT {V_COLUMNS} FROM v", {
        1: dict(big=9007199254740993, amount=Decimal("12.346"), f=0.1, flag=True,
                d=dt.date(2024, 2, 29), ts=dt.datetime(2024, 1, 2, 3, 4, 5, 123456),
                tz=dt.datetime(2024, 1, 2, 1, 4, 5), s="é✓", j={"a": [1, 2.5]},
                bin=b"\x00\xff"),
        2: {**NULLS, "amount": Decimal(1000), "flag": False},
        10: {**NULLS, "big": 12, "f": 100.0, "flag": True, "j": [1, 2]}})

    # Parquet: pyarrow's values; nanoseconds round to microseconds, decimals to the scale
    schema = pa.schema([("id", pa.int32()), ("big", pa.int64()), ("amount", pa.decimal128(12, 4)),
                        ("f", pa.float64()), ("flag", pa.bool_()), ("d", pa.date32()),
                        ("ts", pa.timestamp("us")), ("tz", pa.timestamp("ns", "UTC")),
                        ("s", pa.string()), ("j", pa.string()), ("bin", pa.binary())])
    rows = [
        dict(id=100, big=2**63 - 1, amount=Decimal("0.0005"), f=1.5, flag=False,
             d=dt.date(1999, 12, 31), ts=dt.datetime(2024, 1, 2, 3, 4, 5, 500000),
             tz=1_700_000_000_123_456_789, s="", j='{"k": null}', bin=b""),
        dict(id=101, amount=Decimal("-9999999.9995")),   # row 2: rounds to 8 integer digits
        dict(id=102),                                     # row 3: NULLs
        dict(id=103, s="abcdefghijklmnopqrstuvwxyz"),     # row 4: > varchar(20)
    ]
    table = pa.table({n: pa.array([r.get(n) for r in rows], schema.field(n).type)
                      for n in schema.names})
    p = tmp_path / "v.parquet"
    pq.write_table(table, p, row_group_size=2)
    second = etl.load(str(p), table="v", target=db.url, state=state, rejects=rejects,
                      max_error_rate=1, job="parquet")
    assert (second.succeeded, second.failed) == (2, 2), second.to_dict()
    assert [(r[0][1], r[3]) for r in letters_of(state, "parquet")] == [(2, "22003"),
                                                                       (4, "22001")]
    assert_rows(db, f"SELECT {V_COLUMNS} FROM v WHERE id >= 100", {
        100: dict(big=2**63 - 1, amount=Decimal("0.001"), f=1.5, flag=False,
                  d=dt.date(1999, 12, 31), ts=dt.datetime(2024, 1, 2, 3, 4, 5, 500000),
                  tz=dt.datetime(2023, 11, 14, 22, 13, 20, 123457), s="", j={"k": None},
                  bin=b""),
        102: NULLS})


def test_upsert_ignore_and_replace(db: Db, state: str, tmp_path: Path) -> None:
    db.ddl(mariadb="CREATE TABLE p (id INT PRIMARY KEY, name VARCHAR(20), score DECIMAL(6,2))",
           sqlite="CREATE TABLE p (id INTEGER PRIMARY KEY, name VARCHAR(20), "
                  "score DECIMAL(6,2))")
    first = tmp_path / "p.csv"
    first.write_text("# exported today\nscore;id;name\n1.5;1;ann\nNULL;2;bob\n3;3;NULL\n"
                     "x;5;bad score\n")
    kw: dict[str, Any] = {"table": "p", "target": db.url, "state": state}
    csv = {"null": "NULL", "delimiter": ";", "skip_lines": 1}
    over = etl.load(str(first), max_errors=0, **csv, **kw)  # the chunk that crossed: undone
    assert over.status is etl.Status.FAILED and "--max-errors 0" in str(over.message)
    assert db.rows("SELECT count(*) FROM p") == [(0,)]
    done = etl.load(str(first), **csv, **kw)  # resumes where the failed run stopped
    assert (done.succeeded, done.failed) == (3, 1) and db.rows("SELECT count(*) FROM p") == [(3,)]
    q = tmp_path / "q.csv"  # id 1 twice: the last one wins; id 3 as it is
    q.write_text("id,name,score\n1,x,1\n4,dan,4\n1,ANN,9\n3,,3\n")

    def table() -> list[tuple]:
        return [(i, n, None if s is None else Decimal(str(s)))
                for i, n, s in db.rows("SELECT id, name, score FROM p ORDER BY id")]

    up = etl.load(str(q), mode="upsert", job="up", **kw)
    assert (up.succeeded, up.skipped) == (3, 1), up.to_dict()  # one superseded
    assert table() == [(1, "ANN", Decimal(9)), (2, "bob", None), (3, None, Decimal(3)),
                       (4, "dan", Decimal(4))]
    again = etl.load(str(q), mode="upsert", job="up", **kw)  # unchanged rows: no harm
    assert again.ok and again.succeeded == 3 and table()[0] == (1, "ANN", Decimal(9))
    ign = etl.load(str(q), mode="ignore", job="ign", **kw)
    assert ign.ok and (ign.succeeded, ign.skipped) == (0, 4)
    # replace: emptied once; append then refuses the second id 1 (a dead letter)
    rep = etl.load(str(q), mode="replace", job="rep", columns="id,name,score", **kw)
    assert rep.status is etl.Status.COMPLETED_WITH_ERRORS and rep.failed == 1
    assert table() == [(1, "x", Decimal(1)), (3, None, Decimal(3)), (4, "dan", Decimal(4))]
    assert [r[0] for r in letters_of(state, "rep")] == [[str(q), 4]]


def test_resume_changed_files_encoding_and_usage_errors(db: Db, state: str,
                                                        tmp_path: Path) -> None:
    db.run("CREATE TABLE c (id INT PRIMARY KEY, v VARCHAR(10))")
    f = tmp_path / "c.csv"
    f.write_bytes(b"id,v\n" + b"".join(b"%d,\xe9%d\n" % (i, i % 100) for i in range(3000)))
    kw: dict[str, Any] = {"table": "c", "target": db.url, "state": state, "encoding": "LATIN1"}
    stop = StopFlag()
    first = etl.load(str(f), chunk_size=700, progress=StopAfter(stop, 2), stop=stop, **kw)
    assert first.status is etl.Status.STOPPED and first.succeeded == 1400
    rest = etl.load(str(f), **kw)  # resumes at the exact row
    assert rest.ok and rest.rows_this_run == 1600
    assert db.rows("SELECT count(*), count(DISTINCT id), sum(id) FROM c") == [
        (3000, 3000, sum(range(3000)))]
    assert db.rows("SELECT v FROM c WHERE id = 42") == [("é42",)]
    # a file changed since its load began is refused unless --restart
    g = tmp_path / "g.csv"
    g.write_text("".join(f"{i},x\n" for i in range(5000, 7000)))
    stop = StopFlag()
    part = etl.load(str(g), table="c", target=db.url, state=state, header=False, chunk_size=500,
                    progress=StopAfter(stop, 1), stop=stop, job="g")
    assert part.status is etl.Status.STOPPED
    g.write_text(g.read_text() + "7000,x\n")
    changed = etl.load(str(g), table="c", target=db.url, state=state, header=False, job="g")
    assert changed.status is etl.Status.FAILED and "changed since this load began" in \
        str(changed.message)
    db.run("DELETE FROM c WHERE id >= 5000")
    again = etl.load(str(g), table="c", target=db.url, state=state, header=False, job="g",
                     restart=True)
    assert again.ok and db.rows("SELECT count(*) FROM c WHERE id >= 5000") == [(2001,)]
    # usage errors, before anything is written: exit 2 and what to fix
    out = run_etl("load", "--target", db.url, "--table", "nope", "--state", state, str(f))
    assert out.returncode == 2 and "--table nope: no such table" in out.stderr, out.stderr
    h = tmp_path / "h.csv"
    h.write_text("id,colour\n1,red\n")
    out = run_etl("load", "--target", db.url, "--table", "c", "--state", state, str(h))
    assert out.returncode == 2 and "colour" in out.stderr and "--columns" in out.stderr
    with pytest.raises(etl.UsageError, match="upsert"):
        etl.load(str(h), table="c", target=db.url, state=state, columns="v", header=False,
                 mode="upsert")


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE d (id INTEGER PRIMARY KEY, v TEXT)")
    f = tmp_path / "d.csv"
    f.write_text("id,v\n1,x\n")
    out = run_etl("load", "--target", f"sqlite:///{path}", "--table", "d", "--dry-run", str(f))
    assert out.returncode == 0 and 'INSERT INTO "d"' in out.stdout, out.stderr
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("d",)]
    out = run_etl("load", "--target", f"sqlite:///{tmp_path / 'missing.db'}", "--table", "d",
                  "--dry-run", str(f))
    assert out.returncode == 2 and "no SQLite database file" in out.stderr
    assert not (tmp_path / "missing.db").exists()


class Recorder:
    """A progress object that keeps what the load reports."""

    def __init__(self) -> None:
        self.bytes = self.rows = 0
        self.totals: list[int] = []

    def start(self, label: str, done: int, total: int, exact: bool) -> None:
        pass

    def advance(self, rows: int, nbytes: int) -> None:
        self.rows, self.bytes = self.rows + rows, self.bytes + nbytes

    def retotal(self, total: int) -> None:
        self.totals.append(total)

    def finish(self, message: str) -> None:
        pass


def test_date_format_and_progress_by_bytes(make_db, tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE d (id INTEGER PRIMARY KEY, day DATE, at TIMESTAMPTZ)")
    f = tmp_path / "d.csv"
    f.write_text("id,day,at\n1,05/01/2024,05/01/2024 13:45:10.5+02\n2,05.01.24,2024-01-05\n"
                 "3,31/02/2024,\n" + "".join(f"{i},2024-01-05,\n" for i in range(4, 3000)))
    rec = Recorder()
    result = etl.load(str(f), table="d", target=f"sqlite:///{path}", state=make_db("state"),
                      date_format="dmy", chunk_size=500, progress=rec)
    assert result.status is etl.Status.COMPLETED_WITH_ERRORS and result.failed == 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT day, at FROM d WHERE id < 3 ORDER BY id").fetchall() == [
            ("2024-01-05", "2024-01-05 11:45:10.500000+00:00"),
            ("2024-01-05", "2024-01-05 00:00:00+00:00")]
    assert "31/02/2024" in result.errors[0].error_message
    assert rec.bytes == f.stat().st_size and rec.totals[-1] == 2999  # every byte, once
