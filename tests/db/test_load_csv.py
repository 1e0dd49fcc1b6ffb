"""`etl load` of CSV files into real PostgreSQL: PostgreSQL's own CSV COPY in resumable
chunks, refused rows isolated and reported by file and line. Real files, a real kill -9."""

from __future__ import annotations

import gzip
import json
import signal
import time
from pathlib import Path

import psycopg
import pytest

import etl
from etl.runner import StopFlag
from tests.conftest import execute, run_etl, scalar
from tests.db.test_archive import StopAfter

pytestmark = pytest.mark.timeout(120)


def rejects_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


NASTY = (
    "id|code|born|n|note|at\n"                                  # 1: header
    "1|a|2024-01-02|10|plain|2024-01-02 10:00:00 Europe/Paris\n"  # 2
    "2|b|31/31/2024|11|bad date|2024-01-02 10:00:00.1\n"       # 3: bad date
    "\n"                                                       # 4: blank: skipped
    "3|c|2024-01-04|12\n"                                      # 5: short row
    "4|d|2024-01-05|13|x|2024-01-05 00:00:00|extra\n"          # 6: extra column
    "5|toolong|2024-01-06|14|char(3) overflow|2024-01-06 00:00:00.123456+02\n"  # 7
    "6|é|2024-01-07|99999999999|int too big|2024-01-07 00:00:00.12\n"  # 8
    "7|f|2024-01-08|15||2024-01-08 00:00:00.12345 America/New_York\n"  # 9: empty note = NULL
    '8|g|2024-01-09|16|""|2024-01-09 00:00:00.1234\n'          # 10: "" = empty string
    "9|h|2024-01-10|17|\\N|2024-01-10 00:00:00.123\n"          # 11: \\N is text here
    "10|i|2024-01-11||no n (NOT NULL)|2024-01-11 00:00:00\n"   # 12: NULL into NOT NULL
    "11|j|2024-01-\x0012|18|NUL in a date|2024-01-12 00:00:00\n"  # 13: NUL byte
    "12|k|2024-01-13|19|fk|2024-01-13 00:00:00\n"              # 14: no parent row 999
    '13|l|2024-01-14|20|"multi\nline"|2024-01-14 00:00:00\n'   # 15-16: quoted newline
    '14|m|2024-01-15|21|"never closed|2024-01-15 00:00:00\n'   # 17: unclosed final quote
)


def make_target(url: str) -> None:
    execute(url, """
        CREATE TABLE parent (id int PRIMARY KEY);
        INSERT INTO parent SELECT g FROM generate_series(1, 11) g;
        CREATE TABLE t (id int PRIMARY KEY, code char(3), born date, n int NOT NULL,
                        note text, at timestamptz,
                        CONSTRAINT t_parent_fk FOREIGN KEY (id) REFERENCES parent (id)
                            DEFERRABLE INITIALLY IMMEDIATE);
        INSERT INTO parent VALUES (13), (14);""")


def test_a_nasty_csv_loads_exactly_the_good_lines(dst: str, tmp_path: Path) -> None:
    make_target(dst)
    f = tmp_path / "nasty.csv"
    f.write_bytes(NASTY.encode())
    rejects = tmp_path / "rejects.ndjson"
    out = run_etl("load", "--target", dst, "--table", "t", "--delimiter", "|", "--rejects",
                  str(rejects), "--max-error-rate", "1", "--json", "--no-progress", str(f))
    assert out.returncode == 3, out.stderr  # completed with dead-lettered rows
    doc = json.loads(out.stdout)
    loaded = [r[0] for r in psycopg.connect(dst, autocommit=True).execute(
        "SELECT id FROM t ORDER BY id").fetchall()]
    assert loaded == [1, 7, 8, 9, 13]
    got = {r["line"]: r["sqlstate"] for r in rejects_of(rejects)}
    assert got == {3: "22008", 5: "22P04", 6: "22P04", 7: "22001", 8: "22003", 12: "23502",
                   13: "22021", 14: "23503", 17: "22P04"}, got
    assert doc["summary"] == {**doc["summary"], "total_items": 14, "succeeded": 5, "failed": 9,
                              "skipped": 0}
    # the values: NULL vs "" vs the text \N; fractional seconds; named time zones
    rows = {r[0]: r[1:] for r in psycopg.connect(dst, autocommit=True).execute(
        "SELECT id, note, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') FROM t")}
    assert rows[7] == (None, "2024-01-08 05:00:00.123450")
    assert rows[8] == ("", "2024-01-09 00:00:00.123400")
    assert rows[9] == ("\\N", "2024-01-10 00:00:00.123000")
    assert rows[13][0] == "multi\nline"
    assert rows[1][1] == "2024-01-02 09:00:00.000000"
    # every refused row is a dead letter too, with its file, line and raw text
    letters = scalar(dst, "SELECT count(*) FROM etl.dead_letters WHERE job_id = 'load:public.t'")
    assert letters == 9
    raw = scalar(dst, "SELECT row_data->>'raw' FROM etl.dead_letters "
                      "WHERE item_key = %s::jsonb", (json.dumps([str(f), 5]),))
    assert raw == "3|c|2024-01-04|12"


def test_null_marker_header_mapping_gzip_and_modes(dst: str, tmp_path: Path) -> None:
    execute(dst, "CREATE TABLE p (id int PRIMARY KEY, name text, score numeric(6,2))")
    f = tmp_path / "p.csv.gz"
    f.write_bytes(gzip.compress(b"score;id;name\n1.5;1;ann\nNULL;2;bob\n3;3;NULL\n"))
    result = etl.load([str(tmp_path / "*.csv.gz")], table="p", target=dst, delimiter=";",
                      null="NULL")
    assert result.ok and result.succeeded == 3
    assert scalar(dst, "SELECT array_agg(coalesce(name, '-') || ':' || coalesce(score::text, '-') "
                       "ORDER BY id) FROM p") == ["ann:1.50", "bob:-", "-:3.00"]
    g = tmp_path / "q.csv"
    g.write_text("id,name,score\n1,ANN,9\n4,dan,4\n")
    up = etl.load(str(g), table="p", target=dst, mode="upsert", job="up")
    assert up.ok and scalar(dst, "SELECT name FROM p WHERE id = 1") == "ANN"
    assert scalar(dst, "SELECT count(*) FROM p") == 4
    ign = etl.load(str(g), table="p", target=dst, mode="ignore", job="up", restart=True)
    assert ign.ok and ign.succeeded == 0 and ign.skipped == 2
    rep = etl.load(str(g), table="p", target=dst, mode="replace", job="rep")
    assert rep.ok and scalar(dst, "SELECT count(*) FROM p") == 2
    import pyarrow as pa  # a zstd-compressed file, read through pyarrow

    z = tmp_path / "z.csv.zst"
    with pa.output_stream(str(z), compression="zstd") as out:
        out.write(b"id,name,score\n7,zed,7\n8,\"z,z\",8\n")
    assert etl.load(str(z), table="p", target=dst, job="zst").succeeded == 2
    assert scalar(dst, "SELECT name FROM p WHERE id = 8") == "z,z"


def test_kill_9_in_a_multi_file_load_then_resume_exactly(dst: str, tmp_path: Path,
                                                         spawn) -> None:
    execute(dst, "CREATE TABLE big (id int PRIMARY KEY, v text)")
    files = []
    for i in range(3):
        f = tmp_path / f"part{i}.csv"
        f.write_text("id,v\n" + "".join(f"{i * 20000 + j},v{j}\n" for j in range(20000)))
        files.append(str(f))
    proc = spawn("load", "--target", dst, "--table", "big", "--chunk-size", "1500",
                 "--sleep", "0.02", "--no-progress", *files)
    deadline = time.monotonic() + 60
    while scalar(dst, "SELECT count(*) FROM big") < 25000:  # into the second file
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # the rerun starts after the last committed row of the file it was in
    out = run_etl("load", "--target", dst, "--table", "big", "--json", "--no-progress", *files)
    assert out.returncode == 0, out.stderr
    assert scalar(dst, "SELECT count(*), count(DISTINCT id) FROM big") == 60000
    assert scalar(dst, "SELECT sum(id::bigint) FROM big") == sum(range(60000))


def test_a_changed_file_is_refused_unless_restart(dst: str, tmp_path: Path) -> None:
    execute(dst, "CREATE TABLE c (id int PRIMARY KEY)")
    f = tmp_path / "c.csv"
    f.write_text("id\n" + "".join(f"{i}\n" for i in range(5000)))
    stop = StopFlag()
    first = etl.load(str(f), table="c", target=dst, chunk_size=1000, progress=StopAfter(stop, 2),
                     stop=stop)
    assert first.status is etl.Status.STOPPED and first.succeeded == 2000
    f.write_text(f.read_text() + "5000\n")
    out = run_etl("load", "--target", dst, "--table", "c", str(f))
    assert out.returncode == 1 and "changed since this load began" in out.stderr, out.stderr
    assert scalar(dst, "SELECT count(*) FROM c") == 2000
    execute(dst, "TRUNCATE c")
    again = etl.load(str(f), table="c", target=dst, restart=True)
    assert again.ok and scalar(dst, "SELECT count(*) FROM c") == 5001


def test_dry_run_and_usage_errors(dst: str, tmp_path: Path) -> None:
    execute(dst, "CREATE TABLE d (id int PRIMARY KEY, v text)")
    f = tmp_path / "d.csv"
    f.write_text("id,nope\n1,x\n")
    out = run_etl("load", "--target", dst, "--table", "d", str(f))
    assert out.returncode == 2 and "nope" in out.stderr and "--columns" in out.stderr
    out = run_etl("load", "--target", dst, "--table", "d", "--columns", "id,v", "--no-header",
                  "--skip-lines", "1", "--dry-run", str(f))
    assert out.returncode == 0 and "COPY" in out.stdout, out.stderr
    assert scalar(dst, "SELECT count(*) FROM d") == 0
    assert scalar(dst, "SELECT to_regnamespace('etl')") is None
    out = run_etl("load", "--target", dst, "--table", "d", str(tmp_path / "x.parquet"))
    assert out.returncode == 2
    out = run_etl("load", "--target", dst, "--table", "d", str(tmp_path / "missing-*.csv"))
    assert out.returncode == 2 and "no file matches" in out.stderr


def test_a_gzip_file_resumes_exactly_and_headers_must_agree(dst: str, tmp_path: Path) -> None:
    execute(dst, "CREATE TABLE z (id int PRIMARY KEY, v text)")
    f = tmp_path / "z.csv.gz"  # a resumed compressed file is read up to the stored offset
    f.write_bytes(gzip.compress(("id,v\n" + "".join(f'{i},"v\n{i}"\n' for i in range(3000)))
                                .encode()))
    stop = StopFlag()
    first = etl.load(str(f), table="z", target=dst, chunk_size=700, progress=StopAfter(stop, 2),
                     stop=stop)
    assert first.status is etl.Status.STOPPED and first.succeeded == 1400
    rest = etl.load(str(f), table="z", target=dst)
    assert rest.ok and rest.rows_this_run == 1600
    with psycopg.connect(dst, autocommit=True) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT id), sum(id) FROM z").fetchone() \
            == (3000, 3000, sum(range(3000)))
        assert conn.execute("SELECT count(*) FROM z WHERE v <> 'v' || chr(10) || id").fetchone() \
            == (0,)
    g = tmp_path / "other.csv"
    g.write_text("v,id\nx,5000\n")
    out = run_etl("load", "--target", dst, "--table", "z", str(f), str(g))
    assert out.returncode == 2 and "differs from" in out.stderr, out.stderr


class Recorder:
    """A progress object that keeps what the load reports."""

    def __init__(self) -> None:
        self.started: tuple[int, int, bool] | None = None
        self.totals: list[int] = []
        self.bytes = 0
        self.rows = 0

    def start(self, label: str, done: int, total: int, exact: bool) -> None:
        self.started = (done, total, exact)

    def advance(self, rows: int, nbytes: int) -> None:
        self.rows += rows
        self.bytes += nbytes

    def retotal(self, total: int) -> None:
        self.totals.append(total)

    def finish(self, message: str) -> None:
        pass


def test_progress_follows_the_bytes_read(dst: str, tmp_path: Path) -> None:
    """The first estimate comes from the head's lines; each chunk corrects it from the bytes
    a row measured so far and the bytes left, so the ETA follows the file."""
    execute(dst, "CREATE TABLE p (id int PRIMARY KEY, v text)")
    f = tmp_path / "p.csv"
    short = "".join(f"{i},a\n" for i in range(20000))              # the head: ~8 bytes a row
    long = "".join(f"{i},{'x' * 200}\n" for i in range(20000, 30000))  # then ~207
    f.write_text("id,v\n" + short + long)
    rec = Recorder()
    result = etl.load(str(f), table="p", target=dst, chunk_size=3000, progress=rec)
    assert result.ok and result.succeeded == 30000
    assert rec.started is not None and rec.started[1] > 100_000  # the head misleads at first
    assert rec.bytes == f.stat().st_size  # every byte of the file, once
    # once the long rows are read (the last chunks), the estimate knows better
    assert rec.totals[0] > 100_000
    assert all(abs(t - 30000) / 30000 < 0.25 for t in rec.totals[-3:]), rec.totals
    assert rec.totals[-1] == 30000


def test_date_format_orders_the_fields_of_a_date(dst: str, tmp_path: Path) -> None:
    execute(dst, "CREATE TABLE d (id int PRIMARY KEY, day date, at timestamptz)")
    f = tmp_path / "d.csv"
    f.write_text("id,day,at\n1,05/01/2024,05/01/2024 13:45:10.5+02\n2,05.01.2024,2024-01-05 10:00Z\n"
                 "3,5-Jan-2024,20240105 08:00 UTC\n4,2024-01-05,January 5 2024 12:00 Europe/Paris\n"
                 "5,31/02/2024,\n")
    result = etl.load(str(f), table="d", target=dst, date_format="dmy")
    assert result.status is etl.Status.COMPLETED_WITH_ERRORS and result.failed == 1
    assert scalar(dst, "SELECT string_agg(DISTINCT day::text, ',') FROM d") == "2024-01-05"
    assert scalar(dst, "SELECT string_agg(at::text, ',' ORDER BY id) FROM d") == (
        "2024-01-05 11:45:10.5+00,2024-01-05 10:00:00+00,2024-01-05 08:00:00+00,"
        "2024-01-05 11:00:00+00")
    (letter,) = etl.list_dead_letters(job="load:public.d", state=dst)
    assert letter["item_key"] == [str(f), 6] and "31/02/2024" in letter["error_message"]
    # MDY (the default) reads the first field as the month: 05/01 is 1 May, 31/02 no date
    execute(dst, "TRUNCATE d")
    again = etl.load(str(f), table="d", target=dst, restart=True)
    assert scalar(dst, "SELECT day::text FROM d WHERE id = 1") == "2024-05-01"
    assert again.failed == 1 and scalar(dst, "SELECT count(*) FROM d WHERE id = 5") == 0
    bad = run_etl("load", "--target", dst, "--table", "d", "--date-format", "DDMMYYYY", str(f))
    assert bad.returncode == 2 and "--date-format" in bad.stderr
