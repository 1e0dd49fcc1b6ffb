#!/usr/bin/env python
"""Bench: `etl copy` PostgreSQL → MariaDB/MySQL against `LOAD DATA LOCAL INFILE` of the same rows.

    python bench/copy_mariadb.py [--rows 500000] [--repeat 1]
                                 [--url postgresql://postgres@127.0.0.1:5432/postgres]
                                 [--mysql-url mysql://root@127.0.0.1:3306/]
                                 [--ceiling load|insert] [--keep]

Three paths, one run each (the fastest of --repeat), in one table (see bench/README.md):

(a) the ceiling: ``LOAD DATA LOCAL INFILE`` of the source's rows from a tab-separated file
    (written beforehand by ``COPY … TO STDOUT``, not timed) into an empty table defined as
    etl defines it, by the ``mariadb`` (or ``mysql``) client binary — or, when the server
    refuses LOCAL INFILE (or with ``--ceiling insert``), that client running a file of
    multi-row INSERTs of 1,000 rows each;
(b) ``python -m etl copy --source PG --target MARIADB --table t --state PG`` (append, default
    chunking) into a missing table, which etl creates;
(c) the same with ``--mode upsert --restart`` into the table (b) filled: every row exists,
    unchanged.

After every run the MariaDB table is checked against the source by count and an
order-independent checksum computed by each server (md5 of each row's text, summed), and
etl's report must say completed with every row (and all of them unchanged in (c)).
Before every timed run, InnoDB's dirty pages are flushed (the analogue of copy_pg.py's
CHECKPOINT). It prints rows, seconds, rows/s, MB/s, peak RSS (os.wait4 of the process:
the client binary, or etl) and × ceiling; it checks correctness only (exit 1 on a
mismatch), not a ratio: on this path etl is far below the ceiling (see the README).

Servers: PostgreSQL as in copy_pg.py (--url, $ETL_BENCH_PG_URL, the local default, else the
embedded one); MariaDB --mysql-url, else $ETL_BENCH_MYSQL_URL, else mysql://root@127.0.0.1:3306/
(never started for you). It creates ``etl_benchmy_{src,state}_<pid>`` in PostgreSQL and
``etl_benchmy_{ceil,dst}_<pid>`` in MariaDB, and drops them unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from copy_pg import (  # noqa: E402
    Measure,
    execute,
    log,
    mask,
    print_table,
    scalar,
    server_url,
    wait_rusage,
    with_db,
)

DEFAULT_MYSQL_URL = "mysql://root@127.0.0.1:3306/"
CONNECT_TIMEOUT = 5          # seconds; a server that does not answer is "unreachable"
INSERT_ROWS = 1_000          # rows per INSERT statement of the fallback ceiling
FLUSH_WAIT_SECONDS = 120     # at most this long waiting for InnoDB to flush before a run

# A row type MariaDB holds exactly (no float: its text form differs between the servers, so
# the cross-server checksum could not compare it). ~190 bytes a row on disk in PostgreSQL.
COLUMNS = ("id", "n", "label", "amount", "ts", "flag", "doc", "u")
TABLE_DDL = """
CREATE TABLE t (
    id      bigint PRIMARY KEY,
    n       integer NOT NULL,
    label   text NOT NULL,
    amount  numeric(12,2) NOT NULL,
    ts      timestamptz NOT NULL,
    flag    boolean NOT NULL,
    doc     jsonb NOT NULL,
    u       uuid NOT NULL
)"""
FILL_SQL = """
INSERT INTO t
SELECT i,
       ((i * 7919) % 2147483647)::integer,
       md5(i::text) || substr(md5((i + 1)::text), 1, 28),          -- 60 chars
       ((i * 7907) % 100000000) / 100.0,
       timestamptz '2020-01-01 00:00:00+00' + i * interval '1 second',
       i % 3 = 0,
       jsonb_build_object('i', i, 'tag', 'k' || (i % 100), 'ok', i % 2 = 0),
       md5(i::text || 'u')::uuid
FROM generate_series(1::bigint, {rows}) AS g(i)"""
# Each row as the same text in both servers: timestamps in UTC with microseconds, booleans
# as 1/0, JSON as PostgreSQL's jsonb text (which etl writes, and MariaDB keeps as it is).
PG_ROW_TEXT = ("concat_ws('|', id, n, label, amount, to_char(ts AT TIME ZONE 'UTC', "
               "'YYYY-MM-DD HH24:MI:SS.US'), flag::int, doc::text, u::text)")
PG_CHECKSUM = (f"SELECT count(*), sum(('x' || substr(md5({PG_ROW_TEXT}), 1, 15))::bit(60)"
               "::bigint)::text FROM t")
MY_ROW_TEXT = ("CONCAT_WS('|', id, n, CAST(label AS BINARY), amount, "
               "DATE_FORMAT(ts, '%Y-%m-%d %H:%i:%s.%f'), flag, CAST(doc AS BINARY), "
               "CAST(u AS BINARY))")
MY_CHECKSUM = (f"SELECT COUNT(*), CAST(SUM(CAST(CONV(SUBSTRING(MD5({MY_ROW_TEXT}), 1, 15), 16, 10)"
               " AS UNSIGNED)) AS CHAR) FROM t")
# The export the ceiling loads: PostgreSQL's text COPY is MySQL's default LOAD DATA format
# (tab-separated, backslash escapes, \N for NULL) once values are in MySQL's forms.
EXPORT_SQL = ("COPY (SELECT id, n, label, amount, to_char(ts AT TIME ZONE 'UTC', "
              "'YYYY-MM-DD HH24:MI:SS.US'), flag::int, doc::text, u::text FROM t ORDER BY id) "
              "TO STDOUT")


# -- MariaDB -------------------------------------------------------------------------------

class MySql:
    """A MariaDB/MySQL server: its URL's parts, a PyMySQL connection per call, the client."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 3306
        self.user = unquote(parts.username or "root")
        self.password = unquote(parts.password or "")
        self.client = shutil.which("mariadb") or shutil.which("mysql")

    def connect(self, db: str | None = None, **kw):
        import pymysql

        return pymysql.connect(host=self.host, port=self.port, user=self.user,
                               password=self.password, database=db, charset="utf8mb4",
                               autocommit=True, connect_timeout=CONNECT_TIMEOUT, **kw)

    def query(self, sql: str, db: str | None = None) -> list[tuple]:
        with self.connect(db) as conn, conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())

    def db_url(self, db: str) -> str:
        parts = urlsplit(self.url)
        return parts._replace(scheme="mysql", path="/" + db).geturl()

    def client_cmd(self, db: str, *extra: str) -> tuple[list[str], dict[str, str]]:
        assert self.client is not None
        env = {**os.environ, "MYSQL_PWD": self.password}  # not on the command line
        return [self.client, "-h", self.host, "-P", str(self.port), "-u", self.user,
                "--batch", *extra, db], env


def mysql_server(explicit: str | None) -> MySql:
    url = explicit or os.environ.get("ETL_BENCH_MYSQL_URL") or DEFAULT_MYSQL_URL
    server = MySql(url)
    try:
        server.query("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        sys.exit(f"bench: MariaDB/MySQL at {mask(url)} is unreachable ({exc}); start it, or "
                 "pass --mysql-url / $ETL_BENCH_MYSQL_URL")
    return server


def flush_innodb(my: MySql) -> None:
    """Let no timed run pay for the previous one's dirty pages: flush them all first
    (``innodb_max_dirty_pages_pct = 0`` for a moment, then back to its value)."""
    with my.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT @@GLOBAL.innodb_max_dirty_pages_pct")
        (before,) = cur.fetchone()
        try:
            cur.execute("SET GLOBAL innodb_max_dirty_pages_pct = 0")
        except Exception as exc:  # noqa: BLE001 - no privilege: wait for the idle flush
            log(f"  cannot set innodb_max_dirty_pages_pct ({exc}); waiting for the idle flush")
            before = None
        try:
            deadline = time.monotonic() + FLUSH_WAIT_SECONDS
            while True:
                cur.execute("SHOW GLOBAL STATUS LIKE 'Innodb_buffer_pool_pages_dirty'")
                dirty = int(cur.fetchone()[1])
                if dirty == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.25)
            if dirty:
                log(f"  {dirty} dirty InnoDB pages left after {FLUSH_WAIT_SECONDS}s")
        finally:
            if before is not None:
                cur.execute(f"SET GLOBAL innodb_max_dirty_pages_pct = {float(before)}")


def local_infile_allowed(my: MySql) -> bool:
    """Whether the server takes LOAD DATA LOCAL INFILE (turning it on if it may)."""
    if my.query("SELECT @@GLOBAL.local_infile")[0][0]:
        return True
    try:
        my.query("SET GLOBAL local_infile = 1")
    except Exception as exc:  # noqa: BLE001 - no privilege: the INSERT ceiling instead
        log(f"the server refuses LOCAL INFILE and cannot be changed ({exc})")
        return False
    log("turned on the server's local_infile (SET GLOBAL local_infile = 1)")
    return True


def my_checksum(my: MySql, db: str) -> tuple[int, str]:
    with my.connect(db) as conn, conn.cursor() as cur:
        cur.execute("SET NAMES utf8mb4")
        cur.execute(MY_CHECKSUM)
        count, total = cur.fetchone()
    return int(count), str(total)


def timed(cmd: list[str], env: dict[str, str], stdin_path: Path | None = None
          ) -> tuple[float, float, str]:
    """Run ``cmd``: wall seconds, its own peak RSS (MB), its stdout; stops on failure."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=stdin, stdout=out, stderr=err, env=env)
            rc, rss = wait_rusage(proc)
            seconds = time.perf_counter() - t0
        finally:
            if stdin_path:
                stdin.close()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if rc != 0:
        raise SystemExit(f"bench: {Path(cmd[0]).name} {' '.join(cmd[1:3])} … exited {rc}\n"
                         f"--- stdout\n{stdout[-2000:]}\n--- stderr\n{stderr[-3000:]}")
    return seconds, rss, stdout


# -- the three paths ---------------------------------------------------------------------

_UNESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "b": "\b", "f": "\f", "v": "\v"}


def insert_file(tsv: Path, out: Path) -> None:
    """The fallback ceiling's input: the TSV as multi-row INSERTs (mysqldump style)."""
    def literal(field: str, i: int) -> str:
        if field == r"\N":
            return "NULL"
        if i in (0, 1, 3, 5):  # id, n, amount, flag: numbers
            return field
        text = _UNESCAPE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(1)), field)
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

    with open(tsv, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        batch: list[str] = []
        for line in src:
            fields = line.rstrip("\n").split("\t")
            batch.append("(" + ",".join(literal(f, i) for i, f in enumerate(fields)) + ")")
            if len(batch) == INSERT_ROWS:
                dst.write(f"INSERT INTO t VALUES {','.join(batch)};\n")
                batch.clear()
        if batch:
            dst.write(f"INSERT INTO t VALUES {','.join(batch)};\n")


def measure_ceiling(my: MySql, db: str, how: str, data: Path, ddl: str, rows: int,
                    heap: int, source_sum: tuple, repeat: int) -> Measure:
    best: Measure | None = None
    for i in range(repeat):
        my.query("DROP TABLE IF EXISTS t", db)
        my.query(ddl, db)  # etl's own definition of the table, empty
        flush_innodb(my)
        if how == "load":
            label = "LOAD DATA LOCAL INFILE (ceiling)"
            sql = (f"SET time_zone = '+00:00'; LOAD DATA LOCAL INFILE '{data}' INTO TABLE t "
                   f"CHARACTER SET utf8mb4 ({', '.join(COLUMNS)})")
            cmd, env = my.client_cmd(db, "--local-infile=1", "-e", sql)
            log(f"ceiling: {label} of {rows:,} rows, run {i + 1}/{repeat}")
            seconds, rss, _ = timed(cmd, env)
        else:
            label = "multi-row INSERT (ceiling)"
            cmd, env = my.client_cmd(db, "--init-command=SET time_zone = '+00:00'")
            log(f"ceiling: {label}, {INSERT_ROWS:,} rows a statement, of {rows:,} rows, "
                f"run {i + 1}/{repeat}")
            seconds, rss, _ = timed(cmd, env, stdin_path=data)
        m = Measure(label, rows, seconds, heap, rss)
        log(f"  {seconds:.2f}s  {m.rate:,.0f} rows/s, peak RSS {rss:.1f} MB")
        if best is None or m.seconds < best.seconds:
            best = m
    verify(my, db, source_sum, "the ceiling")
    assert best is not None
    return best


def run_etl(src: str, dst: str, state: str, *extra: str) -> tuple[float, float, dict]:
    cmd = [sys.executable, "-m", "etl", "copy", "--source", src, "--target", dst, "--table", "t",
           "--state", state, "--restart", "--no-progress", "--json", *extra]
    env = {k: v for k, v in os.environ.items()
           if k not in ("ETL_SOURCE_URL", "ETL_TARGET_URL", "ETL_STATE_URL")}
    seconds, rss, stdout = timed(cmd, env)
    try:
        return seconds, rss, json.loads(stdout)
    except ValueError as exc:
        raise SystemExit(f"bench: etl copy printed no JSON ({exc}):\n{stdout[-2000:]}") from exc


def measure_etl(my: MySql, db: str, src: str, state: str, mode: str, rows: int, heap: int,
                source_sum: tuple, ceiling: Measure | None, repeat: int) -> Measure:
    best: Measure | None = None
    label = "etl copy (append, defaults)" if mode == "append" else \
        "etl copy --mode upsert (rerun, all unchanged)"
    for i in range(repeat):
        if mode == "append":
            my.query("DROP TABLE IF EXISTS t", db)  # etl creates it, as a first run would
        flush_innodb(my)
        log(f"{label} of {rows:,} rows, run {i + 1}/{repeat}")
        extra = () if mode == "append" else ("--mode", "upsert")
        seconds, rss, doc = run_etl(src, my.db_url(db), state, *extra)
        md, summary = doc.get("metadata", {}), doc.get("summary", {})
        m = Measure(label, rows, seconds, heap, rss, ceiling, extra={
            "etl_seconds": summary.get("duration_seconds"), "chunks": md.get("num_chunks"),
            "chunk_size_last": md.get("chunk_size_last"), "outcomes": md.get("outcomes")})
        log(f"  {seconds:.2f}s wall ({m.extra['etl_seconds']:.2f}s inside etl), "
            f"{m.rate:,.0f} rows/s, peak RSS {rss:.1f} MB, {m.extra['chunks']} chunks, "
            f"last size {m.extra['chunk_size_last']}")
        if doc.get("status") != "completed" or summary.get("succeeded") != rows:
            raise SystemExit(f"bench: etl copy reported {doc.get('status')} with "
                             f"{summary.get('succeeded')} rows, expected completed with {rows}")
        if mode == "upsert" and (md.get("outcomes") or {}).get("unchanged") != rows:
            raise SystemExit(f"bench: the upsert rerun's outcomes are {md.get('outcomes')}, "
                             f"expected {rows:,} unchanged")
        if best is None or m.seconds < best.seconds:
            best = m
        verify(my, db, source_sum, label)
    assert best is not None
    return best


def verify(my: MySql, db: str, source_sum: tuple, what: str) -> None:
    got = my_checksum(my, db)
    if got != source_sum:
        raise SystemExit(f"bench: after {what}, MariaDB's t differs from the source: (count, "
                         f"checksum) {got} != {source_sum}")
    log(f"  verified: {got[0]:,} rows, checksum equal to the source's")


# -- main ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--repeat", type=int, default=1, help="runs per path; the fastest is kept")
    ap.add_argument("--url", help="PostgreSQL URL (default $ETL_BENCH_PG_URL or the local one)")
    ap.add_argument("--mysql-url", help="MariaDB/MySQL URL (default $ETL_BENCH_MYSQL_URL or "
                                        f"{DEFAULT_MYSQL_URL})")
    ap.add_argument("--ceiling", choices=("load", "insert"), default="load",
                    help="load: LOAD DATA LOCAL INFILE (multi-row INSERT if the server refuses); "
                         "insert: multi-row INSERT")
    ap.add_argument("--keep", action="store_true", help="keep the databases it created")
    args = ap.parse_args(argv)
    if shutil.which("psql") is None:
        sys.exit("bench: psql is not on PATH (it writes the ceiling's input file)")
    admin = server_url(args.url)
    my = mysql_server(args.mysql_url)
    if my.client is None:
        sys.exit("bench: neither the mariadb nor the mysql client is on PATH (the ceiling "
                 "runs in it); install mariadb-client")
    how = args.ceiling
    if how == "load" and not local_infile_allowed(my):
        log("falling back to the multi-row INSERT ceiling")
        how = "insert"

    tag = os.getpid()
    pg_names = {k: f"etl_benchmy_{k}_{tag}" for k in ("src", "state")}
    my_names = {k: f"etl_benchmy_{k}_{tag}" for k in ("ceil", "dst")}
    pg_version = scalar(admin, "SHOW server_version")[0]
    my_version = my.query("SELECT VERSION()")[0][0]
    log(f"PostgreSQL {pg_version} at {mask(admin)}, MariaDB/MySQL {my_version} at "
        f"{mask(my.url)}; databases etl_benchmy_*_{tag}")
    pg_made: list[str] = []
    my_made: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="etl_benchmy_"))
    try:
        for name in pg_names.values():
            execute(admin, f"CREATE DATABASE {name}")
            pg_made.append(name)
        for name in my_names.values():
            my.query(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
            my_made.append(name)
        src, state = with_db(admin, pg_names["src"]), with_db(admin, pg_names["state"])

        log(f"generating t: {args.rows:,} rows")
        t0 = time.perf_counter()
        execute(src, TABLE_DDL, FILL_SQL.format(rows=args.rows), "VACUUM (FREEZE, ANALYZE) t")
        heap = scalar(src, "SELECT pg_table_size('t')")[0]
        source_sum = tuple(scalar(src, PG_CHECKSUM))
        source_sum = (int(source_sum[0]), str(source_sum[1]))
        log(f"  {time.perf_counter() - t0:.1f}s; heap {heap / 2**20:.1f} MB "
            f"({heap / args.rows:.0f} B/row)")
        tsv = workdir / "t.tsv"
        with open(tsv, "wb") as out:
            subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", src, "-c",
                            EXPORT_SQL], stdout=out, check=True)
        data = tsv
        if how == "insert":
            data = workdir / "t.sql"
            insert_file(tsv, data)
        log(f"ceiling input: {data} ({data.stat().st_size / 2**20:.1f} MiB)")

        dst = my_names["dst"]
        append = measure_etl(my, dst, src, state, "append", args.rows, heap, source_sum,
                             None, args.repeat)
        ddl = my.query("SHOW CREATE TABLE t", dst)[0][1]  # the table exactly as etl made it
        ceiling = measure_ceiling(my, my_names["ceil"], how, data, ddl, args.rows, heap,
                                  source_sum, args.repeat)
        append.ceiling = ceiling
        my.query("DROP TABLE t", my_names["ceil"])
        upsert = measure_etl(my, dst, src, state, "upsert", args.rows, heap, source_sum,
                             ceiling, args.repeat)

        print()
        print(f"PostgreSQL {pg_version} → MariaDB/MySQL {my_version}, {os.cpu_count()} CPU(s), "
              f"{args.rows:,} rows × {len(COLUMNS)} columns; MB = MiB of source heap "
              "(pg_table_size) per second; peak RSS = the process's own ru_maxrss")
        print_table([ceiling, append, upsert])
        for m in (append, upsert):
            e = m.extra
            print(f"  {m.path}: {e['chunks']} chunks (last size {e['chunk_size_last']:,}), "
                  f"{e['etl_seconds']:.2f}s inside etl vs {m.seconds:.2f}s wall")
        print(f"  ceiling input: {data.stat().st_size / 2**20:.1f} MiB "
              f"({'tab-separated text' if how == 'load' else 'multi-row INSERTs'}); "
              "every run verified by count and checksum against the source")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if args.keep:
            log(f"kept: PostgreSQL {', '.join(pg_made)}; MariaDB {', '.join(my_made)}")
        else:
            for name in pg_made:
                try:
                    execute(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                except Exception as exc:  # noqa: BLE001 - report, keep dropping the others
                    log(f"could not drop {name}: {exc}")
            for name in my_made:
                try:
                    my.query(f"DROP DATABASE IF EXISTS `{name}`")
                except Exception as exc:  # noqa: BLE001
                    log(f"could not drop {name}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
