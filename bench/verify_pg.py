#!/usr/bin/env python
"""Bench: `etl verify` of a table against its copy, against the `psql | psql` COPY of the table.

    python bench/verify_pg.py [--rows 1000000] [--repeat 2] [--url URL] [--keep]

copy_pg.py's generated table (~200 bytes a row, mixed types) is created in a source database
and copied once, untimed, into a target database by ``psql SRC -c "COPY t TO STDOUT (FORMAT
binary)" | psql DST -c "COPY t FROM STDIN (FORMAT binary)"`` (then frozen and analysed like
the source; both are checked equal by count and an order-independent checksum). Then, each
after a CHECKPOINT, alternating ``--repeat`` times:

- the ceiling: the same ``psql | psql`` binary COPY of the source table into an empty
  scratch table of a third database (as copy_pg.py's ceiling): one read of the table;
- ``etl verify --method database`` (each side's PostgreSQL counts every key range and sums
  the md5 of each row's text; the two sides in parallel threads);
- ``etl verify --method values`` (the rows of both sides read into Python through
  SQLAlchemy and compared by canonical values);

each etl run with ``--state DST --restart --json --no-progress``, checked: exit 0, status
``completed``, ``summary.succeeded`` = rows, the method asked for. Then one correctness run:
one row's ``label`` changed and another row deleted in the target, ``etl verify --method
database`` must exit 1 naming exactly those two keys (``different``, ``missing``).

Prints seconds, rows/s (rows of ONE table per second: etl verify reads both tables, the
ceiling reads one and writes one), MB/s (MiB of the source table's ``pg_table_size``, heap +
TOAST, counted once, ÷ seconds; etl reads twice that), each process's own peak RSS
(``os.wait4``; the larger psql's for the ceiling), the fastest run of each and its ratio to
the ceiling. No target: exits 0 unless a run is wrong (then 1, with the reason).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from copy_pg import (  # noqa: E402
    CHECKSUM_SQL,
    TABLE_DDL,
    checkpoint,
    create_source,
    execute,
    log,
    psql_pipe,
    scalar,
    server_url,
    with_db,
)
from load_csv import timed  # noqa: E402

CEILING = "psql \\| psql (ceiling)"
METHODS = {"etl verify --method database": "database", "etl verify --method values": "values"}


def verify_cmd(src: str, dst: str, method: str) -> list[str]:
    return [sys.executable, "-m", "etl", "verify", "--source", src, "--target", dst,
            "--table", "t", "--method", method, "--state", dst, "--restart", "--json",
            "--no-progress"]


def report_of(stdout: str, what: str) -> dict:
    try:
        return json.loads(stdout)
    except ValueError as exc:
        raise SystemExit(f"bench: {what} printed no JSON ({exc}):\n{stdout[-2000:]}") from exc


def check_equal(doc: dict, what: str, method: str, rows: int) -> None:
    """A verification of two equal tables: completed, every row matched, the method asked."""
    got = (doc.get("status"), doc.get("summary", {}).get("succeeded"),
           doc.get("metadata", {}).get("method"))
    if got != ("completed", rows, method):
        raise SystemExit(f"bench: {what} reported status {got[0]}, {got[1]} rows succeeded, "
                         f"method {got[2]}; expected completed, {rows}, {method}\n"
                         f"errors: {doc.get('errors', [])[:5]}")


def check_differences(src: str, dst: str, rows: int) -> str:
    """Change one row's label and delete another row in the target: `etl verify --method
    database` must exit 1 naming exactly those two keys. A line saying what was found."""
    changed, deleted = max(1, rows // 3), max(2, 2 * rows // 3)
    execute(dst, f"UPDATE t SET label = label || 'x' WHERE id = {changed}",
            f"DELETE FROM t WHERE id = {deleted}")
    log(f"correctness: id {changed} changed, id {deleted} deleted in the target")
    done = subprocess.run(verify_cmd(src, dst, "database"), capture_output=True, text=True)
    if done.returncode != 1:
        raise SystemExit(f"bench: etl verify of a changed target exited {done.returncode}, "
                         f"expected 1\n{done.stderr[-3000:]}")
    doc = report_of(done.stdout, "etl verify of a changed target")
    named = sorted((e.get("error_type"), e.get("item_identifier")) for e in doc.get("errors", []))
    expected = sorted([("different", f"[{changed}]"), ("missing", f"[{deleted}]")])
    if named != expected or doc.get("status") != "failed":
        raise SystemExit(f"bench: etl verify of a changed target reported status "
                         f"{doc.get('status')} and named {named}; expected failed and {expected}")
    return (f"correctness: etl verify --method database exited 1 and named exactly "
            f"[{changed}] different, [{deleted}] missing")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--url")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if args.rows < 3:
        ap.error("--rows must be at least 3 (the correctness run changes one row, deletes another)")
    if shutil.which("psql") is None:
        sys.exit("bench: psql is not on PATH (needed for the copy and the ceiling)")
    admin = server_url(args.url)
    tag = os.getpid()
    names = [f"etl_benchverify_src_{tag}", f"etl_benchverify_dst_{tag}",
             f"etl_benchverify_ceil_{tag}"]
    created: list[str] = []
    try:
        for name in names:
            execute(admin, f"CREATE DATABASE {name}")
            created.append(name)
        src, dst, ceil = (with_db(admin, n) for n in names)
        size, expected = create_source(src, "t", args.rows)
        execute(dst, TABLE_DDL.format(name="t"))
        seconds, _ = psql_pipe(src, dst, "t")
        execute(dst, "VACUUM (FREEZE, ANALYZE) t")
        got = tuple(scalar(dst, CHECKSUM_SQL.format(name="t")))
        if got != expected:
            raise SystemExit(f"bench: the copy in the target is {got}, expected {expected}")
        log(f"copied t into the target ({seconds:.2f}s); equal by count and checksum")
        execute(ceil, TABLE_DDL.format(name="t"))
        runs: dict[str, list[tuple[float, float]]] = {CEILING: [], **{p: [] for p in METHODS}}
        for _ in range(args.repeat):
            for path in runs:
                if path == CEILING:
                    execute(ceil, "TRUNCATE t")
                    checkpoint(admin)
                    seconds, rss = psql_pipe(src, ceil, "t")
                    (n,) = scalar(ceil, "SELECT count(*) FROM t")
                    if n != args.rows:
                        raise SystemExit(f"bench: the ceiling copied {n:,} rows, "
                                         f"expected {args.rows:,}")
                    inside = ""
                else:
                    checkpoint(admin)
                    seconds, rss, stdout = timed(verify_cmd(src, dst, METHODS[path]))
                    doc = report_of(stdout, path)
                    check_equal(doc, path, METHODS[path], args.rows)
                    inside = f" ({doc['summary'].get('duration_seconds')}s inside etl)"
                runs[path].append((seconds, rss))
                log(f"  {path}: {seconds:.2f}s{inside}, {args.rows / seconds:,.0f} rows/s, "
                    f"{size / 2**20 / seconds:.1f} MB/s, peak RSS {rss:.1f} MB; verified")
        correct = check_differences(src, dst, args.rows)
        print(f"rows/s = rows of one table per second; MB/s = MiB of the source table "
              f"(pg_table_size, {size / 2**20:.1f} MiB) per second, counted once though etl "
              f"verify reads both tables; fastest of {args.repeat}")
        print("| path                         |      rows | seconds |  rows/s |  MB/s | peak RSS MB | × ceiling |")
        print("|------------------------------|-----------|---------|---------|-------|-------------|-----------|")
        best = {p: min(r) for p, r in runs.items()}
        ceiling = best[CEILING][0]
        for path, (seconds, rss) in best.items():
            print(f"| {path:<28} | {args.rows:>9,} | {seconds:7.2f} | {args.rows / seconds:7,.0f} | "
                  f"{size / 2**20 / seconds:5.1f} | {rss:11.1f} | {ceiling / seconds:9.2f} |")
        for path in METHODS:
            print(f"{path} at {ceiling / best[path][0]:.2f}x the psql | psql COPY "
                  f"(fastest of {args.repeat}; reported, no target)")
        print(correct)
        return 0
    finally:
        if args.keep:
            log(f"kept: {', '.join(created)}")
        else:
            for name in created:
                execute(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    sys.exit(main())
