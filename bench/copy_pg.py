#!/usr/bin/env python
"""Benchmark `etl copy` (PostgreSQL → PostgreSQL) against the `psql | psql` binary COPY ceiling.

    python bench/copy_pg.py [--rows 1000000] [--rows2 4000000]
                            [--url postgresql://postgres@127.0.0.1:5432/postgres]
                            [--repeat 1] [--keep] [--no-check]

What it does (see bench/README.md for what each number means):

1. creates a source database with table ``t`` (``--rows`` rows) and ``t2``
   (``--rows2`` rows), ~200 bytes a row of mixed types, generated server-side in
   one INSERT each, then VACUUM (FREEZE, ANALYZE) so no timed run pays for hint bits;
2. the ceiling: ``psql SRC -c "COPY t TO STDOUT (FORMAT binary)" | psql DST -c
   "COPY t FROM STDIN (FORMAT binary)"`` into an empty, identical, pre-created table;
3. ``python -m etl copy --source SRC --target DST2 --table t --no-progress --json``
   with default settings: wall time, and the etl process's own peak RSS (from
   ``os.wait4`` on that pid, so psql and earlier children never count); the target is
   verified by row count and an order-independent checksum;
4. prints the table: path, rows, seconds, rows/s, MB/s, peak RSS, × ceiling;
5. memory flatness: the same for ``--rows2`` rows; PASS/FAIL lines; exits 1 when
   etl is under 0.8× its ceiling or its peak RSS grows more than 10% (unless --no-check);
6. drops the databases it created (unless --keep).

The server: --url, else $ETL_BENCH_PG_URL, else postgresql://postgres@127.0.0.1:5432/postgres.
When that default is unreachable, the embedded PostgreSQL is started (etl.embedded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET_RATIO = 0.8          # etl must reach this fraction of the psql | psql rate
RSS_TOLERANCE = 0.10        # peak RSS may grow at most this much from --rows to --rows2
CONNECT_TIMEOUT = 5         # seconds; a server that does not answer is "unreachable"

TABLE_DDL = """
CREATE TABLE {name} (
    id      bigint PRIMARY KEY,
    n       integer NOT NULL,
    label   text NOT NULL,
    amount  numeric(12,2) NOT NULL,
    ts      timestamptz NOT NULL,
    flag    boolean NOT NULL,
    doc     jsonb NOT NULL,
    u       uuid NOT NULL,
    x       double precision NOT NULL
)"""

# ~200 bytes a row on disk (tuple header included); deterministic, so runs are comparable.
FILL_SQL = """
INSERT INTO {name}
SELECT i,
       ((i * 7919) % 2147483647)::integer,
       md5(i::text) || substr(md5((i + 1)::text), 1, 28),          -- 60 chars
       ((i * 7907) % 100000000) / 100.0,
       timestamptz '2020-01-01 00:00:00+00' + i * interval '1 second',
       i % 3 = 0,
       jsonb_build_object('i', i, 'tag', 'k' || (i % 100), 'ok', i % 2 = 0),
       md5(i::text || 'u')::uuid,
       sqrt(i::double precision) * 1.5
FROM generate_series(1::bigint, {rows}) AS g(i)"""

CHECKSUM_SQL = ("SELECT count(*), md5(string_agg(md5(t::text), '' ORDER BY md5(t::text))) "
                "FROM {name} AS t")


# -- small helpers -------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def with_db(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


def connect(url: str):
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)


def scalar(url: str, sql: str):
    with connect(url) as conn:
        return conn.execute(sql).fetchone()


def execute(url: str, *stmts: str) -> None:
    with connect(url) as conn:
        for stmt in stmts:
            conn.execute(stmt)


def reachable(url: str) -> bool:
    try:
        scalar(url, "SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        log(f"cannot connect to {mask(url)}: {' '.join(str(exc).split())[:200]}")
        return False
    return True


def mask(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def server_url(explicit: str | None) -> str:
    """The URL to benchmark on; the embedded PostgreSQL when the default is unreachable."""
    url = explicit or os.environ.get("ETL_BENCH_PG_URL") or DEFAULT_URL
    if reachable(url):
        return url
    if explicit or os.environ.get("ETL_BENCH_PG_URL"):
        sys.exit(f"bench: the server {mask(url)} given is unreachable; start it, or omit --url "
                 "and $ETL_BENCH_PG_URL to use the embedded PostgreSQL")
    log("no server at the default URL; starting the embedded PostgreSQL (etl.embedded)")
    try:
        from etl import embedded

        url = embedded.start()
    except Exception as exc:  # noqa: BLE001 - the module may be missing or unfinished
        sys.exit(f"bench: no PostgreSQL reachable at {DEFAULT_URL} and the embedded one could not "
                 f"start ({type(exc).__name__}: {exc}); pass --url")
    if not reachable(url):
        sys.exit(f"bench: the embedded PostgreSQL at {mask(url)} is not reachable")
    return url


def wait_rusage(proc: subprocess.Popen) -> tuple[int, float]:
    """Reap ``proc`` with wait4: its exit code and its own peak RSS in MB (Linux: KiB)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024.0


def psql_cmd(url: str, sql: str) -> list[str]:
    return ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql]


# -- measurements --------------------------------------------------------------------------

@dataclass
class Measure:
    path: str
    rows: int
    seconds: float
    nbytes: int
    rss_mb: float | None
    ceiling: Measure | None = None
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds

    @property
    def ratio(self) -> float | None:
        return self.rate / self.ceiling.rate if self.ceiling else None


def checkpoint(admin_url: str) -> None:
    """Start each timed run with no dirty buffers from the previous one."""
    execute(admin_url, "CHECKPOINT")


def psql_pipe(src: str, dst: str, table: str) -> tuple[float, float]:
    """``psql SRC COPY TO | psql DST COPY FROM``: seconds and the larger psql's peak RSS (MB)."""
    out = subprocess.Popen(psql_cmd(src, f"COPY {table} TO STDOUT (FORMAT binary)"),
                           stdout=subprocess.PIPE)
    inp = subprocess.Popen(psql_cmd(dst, f"COPY {table} FROM STDIN (FORMAT binary)"),
                           stdin=out.stdout)
    t0 = time.perf_counter()
    assert out.stdout is not None
    out.stdout.close()  # only the consumer holds the read end now
    rc_in, rss_in = wait_rusage(inp)
    rc_out, rss_out = wait_rusage(out)
    seconds = time.perf_counter() - t0
    if rc_out or rc_in:
        raise SystemExit(f"bench: psql | psql failed (exit {rc_out} | {rc_in})")
    return seconds, max(rss_in, rss_out)


def measure_ceiling(admin: str, src: str, dst: str, table: str, rows: int, nbytes: int,
                    repeat: int) -> Measure:
    best: Measure | None = None
    for i in range(repeat):
        execute(dst, f"TRUNCATE {table}")
        checkpoint(admin)
        log(f"ceiling: psql | psql binary COPY of {table} ({rows:,} rows), run {i + 1}/{repeat}")
        seconds, rss = psql_pipe(src, dst, table)
        m = Measure("psql | psql (ceiling)", rows, seconds, nbytes, rss)
        log(f"  {seconds:.2f}s  {m.rate:,.0f} rows/s")
        if best is None or m.seconds < best.seconds:
            best = m
    (count,) = scalar(dst, f"SELECT count(*) FROM {table}")
    if count != rows:
        raise SystemExit(f"bench: ceiling target has {count:,} rows, expected {rows:,}")
    assert best is not None
    return best


def run_etl(src: str, dst: str, table: str) -> tuple[float, float, dict, str]:
    """One `python -m etl copy` as a subprocess: seconds, its peak RSS (MB), its JSON, stderr."""
    cmd = [sys.executable, "-m", "etl", "copy", "--source", src, "--target", dst,
           "--table", table, "--restart", "--no-progress", "--json"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("ETL_SOURCE_URL", "ETL_TARGET_URL", "ETL_STATE_URL")}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        rc, rss = wait_rusage(proc)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if rc != 0:
        raise SystemExit(f"bench: etl copy exited {rc}\n--- stdout\n{stdout[-3000:]}\n"
                         f"--- stderr\n{stderr[-3000:]}")
    try:
        doc = json.loads(stdout)
    except ValueError as exc:
        raise SystemExit(f"bench: etl copy printed no JSON ({exc}):\n{stdout[-2000:]}") from exc
    return seconds, rss, doc, stderr


def measure_etl(admin: str, src: str, dst: str, table: str, rows: int, nbytes: int,
                source_sum: tuple, ceiling: Measure, repeat: int) -> Measure:
    best: Measure | None = None
    for i in range(repeat):
        execute(dst, f"DROP TABLE IF EXISTS {table}")  # etl creates it, as a user's first run would
        checkpoint(admin)
        log(f"etl copy of {table} ({rows:,} rows), run {i + 1}/{repeat}")
        seconds, rss, doc, _ = run_etl(src, dst, table)
        md = doc.get("metadata", {})
        m = Measure("etl copy (defaults)", rows, seconds, nbytes, rss, ceiling, extra={
            "etl_seconds": doc.get("summary", {}).get("duration_seconds"),
            "copy_bytes": md.get("bytes"), "chunks": md.get("num_chunks"),
            "chunk_size_last": md.get("chunk_size_last"), "format": md.get("copy_format"),
            "status": doc.get("status"), "succeeded": doc.get("summary", {}).get("succeeded"),
        })
        log(f"  {seconds:.2f}s wall ({m.extra['etl_seconds']}s inside etl), {m.rate:,.0f} rows/s, "
            f"peak RSS {rss:.1f} MB, {m.extra['chunks']} chunks, last size {m.extra['chunk_size_last']}")
        if m.extra["status"] != "completed" or m.extra["succeeded"] != rows:
            raise SystemExit(f"bench: etl copy reported {m.extra['status']} with "
                             f"{m.extra['succeeded']} rows, expected completed with {rows}")
        if best is None or m.seconds < best.seconds:
            best = m
    log(f"verifying {table}: count + order-independent checksum")
    target_sum = scalar(dst, CHECKSUM_SQL.format(name=table))
    if tuple(target_sum) != tuple(source_sum):
        raise SystemExit(f"bench: target {table} differs from the source: "
                         f"{tuple(target_sum)} != {tuple(source_sum)}")
    assert best is not None
    best.extra["verified"] = True
    return best


# -- setup ---------------------------------------------------------------------------------

def create_source(src: str, table: str, rows: int) -> tuple[int, tuple]:
    """Fill ``table`` server-side; its heap size in bytes and its (count, checksum)."""
    log(f"generating {table}: {rows:,} rows")
    t0 = time.perf_counter()
    execute(src, TABLE_DDL.format(name=table), FILL_SQL.format(name=table, rows=rows),
            f"VACUUM (FREEZE, ANALYZE) {table}")
    heap = scalar(src, f"SELECT pg_table_size('{table}')")[0]
    log(f"  {time.perf_counter() - t0:.1f}s; heap {heap / 2**20:.1f} MB "
        f"({heap / rows:.0f} B/row); checksumming")
    source_sum = tuple(scalar(src, CHECKSUM_SQL.format(name=table)))
    return heap, source_sum


def print_table(results: list[Measure]) -> None:
    head = ("path", "rows", "seconds", "rows/s", "MB/s", "peak RSS MB", "× ceiling")
    rows = [head]
    for m in results:
        rows.append((m.path, f"{m.rows:,}", f"{m.seconds:.2f}", f"{m.rate:,.0f}",
                     f"{m.nbytes / 2**20 / m.seconds:.1f}",
                     "-" if m.rss_mb is None else f"{m.rss_mb:.1f}",
                     "1.00" if m.ratio is None else f"{m.ratio:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(widths[i]) for i, c in enumerate(r) if i]
        print("| " + " | ".join(cells) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the main run")
    ap.add_argument("--rows2", type=int, default=4_000_000,
                    help="rows of the memory-flatness run (0: skip it)")
    ap.add_argument("--url", help=f"server URL (default $ETL_BENCH_PG_URL or {DEFAULT_URL})")
    ap.add_argument("--repeat", type=int, default=1, help="runs per path; the fastest is kept")
    ap.add_argument("--keep", action="store_true", help="keep the databases it created")
    ap.add_argument("--no-check", action="store_true", help="always exit 0 after printing")
    args = ap.parse_args(argv)
    if shutil.which("psql") is None:
        sys.exit("bench: psql is not on PATH (needed for the ceiling)")

    admin = server_url(args.url)
    tag = f"{os.getpid()}"
    names = {"src": f"etl_bench_src_{tag}", "ceil": f"etl_bench_ceil_{tag}",
             "dst": f"etl_bench_dst_{tag}"}
    urls = {k: with_db(admin, v) for k, v in names.items()}
    version = scalar(admin, "SHOW server_version")[0]
    log(f"server {mask(admin)} (PostgreSQL {version}); databases {', '.join(names.values())}")
    created: list[str] = []
    try:
        for name in names.values():
            execute(admin, f"CREATE DATABASE {name}")
            created.append(name)
        sizes = [("t", args.rows)] + ([("t2", args.rows2)] if args.rows2 else [])
        results: list[Measure] = []
        runs: dict[str, Measure] = {}
        for table, rows in sizes:
            heap, source_sum = create_source(urls["src"], table, rows)
            execute(urls["ceil"], TABLE_DDL.format(name=table))
            ceiling = measure_ceiling(admin, urls["src"], urls["ceil"], table, rows, heap,
                                      args.repeat)
            etl_m = measure_etl(admin, urls["src"], urls["dst"], table, rows, heap, source_sum,
                                ceiling, args.repeat)
            results += [ceiling, etl_m]
            runs[table] = etl_m
            execute(urls["ceil"], f"DROP TABLE {table}")  # keep the disk footprint down

        print()
        print(f"PostgreSQL {version}, {os.cpu_count()} CPU(s); MB = MiB of source heap "
              f"(pg_table_size) moved per second; peak RSS = the process's own ru_maxrss")
        print_table(results)
        for table, m in runs.items():
            e = m.extra
            print(f"  {table}: {e['chunks']} chunks (last size {e['chunk_size_last']:,}), "
                  f"{e['copy_bytes'] / 2**20:.1f} MiB of binary COPY data, "
                  f"{e['etl_seconds']}s inside etl vs {m.seconds:.2f}s wall (start-up included)")
        print()

        failed = False
        for m in runs.values():
            ok = m.ratio is not None and m.ratio >= TARGET_RATIO
            failed |= not ok
            print(f"{'PASS' if ok else 'FAIL'}: etl copy of {m.rows:,} rows at {m.ratio:.2f}× the "
                  f"psql | psql ceiling (target ≥ {TARGET_RATIO:.2f}×)")
        if "t2" in runs:
            r1, r2 = runs["t"].rss_mb, runs["t2"].rss_mb
            assert r1 is not None and r2 is not None
            growth = r2 / r1 - 1
            ok = growth <= RSS_TOLERANCE
            failed |= not ok
            print(f"{'PASS' if ok else 'FAIL'}: peak RSS {r1:.1f} MB at {runs['t'].rows:,} rows, "
                  f"{r2:.1f} MB at {runs['t2'].rows:,} rows ({growth:+.1%}; flat within "
                  f"{RSS_TOLERANCE:.0%})")
        return 1 if failed and not args.no_check else 0
    finally:
        if args.keep:
            log(f"kept: {', '.join(urls[k] for k in names if names[k] in created)}")
        else:
            for name in created:
                try:
                    execute(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                except Exception as exc:  # noqa: BLE001 - report, keep dropping the others
                    log(f"could not drop {name}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
