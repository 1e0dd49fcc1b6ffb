#!/usr/bin/env python
"""Bench: `etl copy --mode upsert` into PostgreSQL against a hand-written psycopg upsert.

    python bench/copy_upsert.py [--rows 1000000] [--chunk-size 100000] [--repeat 1]
                                [--url URL] [--keep] [--no-check]

Two cases, each timed for etl and for the baseline (the ceiling), on the same chunks:

(a) rerun: every source row is already in the target, unchanged, so nothing is written;
(b) half the rows are in the target (every odd id; half of those, id % 4 = 1, with other
    values), the other half are new.

The baseline is this file run as ``--baseline SRC DST``: per chunk of ids ``(lo, hi]``,
``COPY (SELECT …) TO STDOUT (FORMAT binary)`` from the source streamed into ``COPY stage
FROM STDIN (FORMAT binary)`` (a TEMP table), ``INSERT INTO t SELECT * FROM stage ON
CONFLICT (id) DO UPDATE … WHERE (t.…) IS DISTINCT FROM (excluded.…)``, TRUNCATE, commit.
etl runs with the same fixed ``--chunk-size``; its report must show the same chunks.
Every timed run starts on a fresh target database cloned from the case's template (built
by SQL), after a CHECKPOINT; the result is checked by checksum and by the number of rows
written (xmin newer than the run). Exits 1 if etl is under 0.8x the baseline's rows/s in
either case, unless --no-check. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from copy_pg import (  # noqa: E402
    CHECKSUM_SQL,
    FILL_SQL,
    TABLE_DDL,
    Measure,
    checkpoint,
    create_source,
    execute,
    log,
    mask,
    print_table,
    scalar,
    server_url,
    wait_rusage,
    with_db,
)

TARGET_RATIO = 0.8
COLUMNS = ("id", "n", "label", "amount", "ts", "flag", "doc", "u", "x")
BLOCK_BYTES = 256 * 1024  # the baseline writes COPY data in blocks of this size
CASES = {"a": "(a) rerun, all unchanged", "b": "(b) half new, 1/4 changed"}


# -- the baseline (runs in its own process) ------------------------------------------------

def baseline(src: str, dst: str, chunk: int) -> None:
    import psycopg

    others = COLUMNS[1:]
    merge = ("INSERT INTO t AS t SELECT * FROM stage ON CONFLICT (id) DO UPDATE SET "
             + ", ".join(f"{c} = excluded.{c}" for c in others)
             + f" WHERE ({', '.join('t.' + c for c in others)}) IS DISTINCT FROM "
             f"({', '.join('excluded.' + c for c in others)})")
    with psycopg.connect(src, autocommit=True) as sconn, psycopg.connect(dst) as tconn:
        tconn.execute("CREATE TEMP TABLE stage (LIKE t INCLUDING DEFAULTS)")
        tconn.commit()
        row = sconn.execute("SELECT max(id) FROM t").fetchone()
        top = int(row[0]) if row and row[0] is not None else 0
        lo = 0
        while lo < top:
            hi = lo + chunk
            out_sql = (f"COPY (SELECT {', '.join(COLUMNS)} FROM t WHERE id > {lo} AND id <= {hi})"
                       " TO STDOUT (FORMAT binary)")
            with sconn.cursor() as scur, tconn.cursor() as tcur:
                with scur.copy(out_sql) as out, \
                        tcur.copy("COPY stage FROM STDIN (FORMAT binary)") as inp:
                    buf = bytearray()
                    for data in out:
                        buf += data
                        if len(buf) >= BLOCK_BYTES:
                            inp.write(bytes(buf))
                            buf.clear()
                    inp.write(bytes(buf))
            tconn.execute(merge)
            tconn.execute("TRUNCATE stage")
            tconn.commit()
            lo = hi


# -- setup and measurement -----------------------------------------------------------------

def build_template(url: str, case: str, rows: int) -> None:
    """The target's starting state, by SQL: (a) all rows; (b) odd ids, id % 4 = 1 changed."""
    execute(url, TABLE_DDL.format(name="t"))
    if case == "a":
        execute(url, FILL_SQL.format(name="t", rows=rows))
    else:
        execute(url, FILL_SQL.format(name="t", rows=rows) + " WHERE i % 2 = 1",
                "UPDATE t SET n = n + 1, label = upper(label), x = x + 1 WHERE id % 4 = 1",
                "VACUUM FULL t")  # compact again: no free space left behind by the UPDATE
    execute(url, "VACUUM (FREEZE, ANALYZE) t")


def expected(case: str, rows: int) -> dict[str, int]:
    """etl's outcomes for a case; the baseline must write inserted + updated rows too."""
    if case == "a":
        return {"inserted": 0, "updated": 0, "unchanged": rows}
    existing, changed = (rows + 1) // 2, (rows + 3) // 4
    return {"inserted": rows - existing, "updated": changed, "unchanged": existing - changed}


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd``: wall seconds, its own peak RSS (MB), its stdout; stops on failure."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ETL_SOURCE_URL", "ETL_TARGET_URL", "ETL_STATE_URL")}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        rc, rss = wait_rusage(subprocess.Popen(cmd, stdout=out, stderr=err, env=env))
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if rc != 0:
        raise SystemExit(f"bench: {' '.join(cmd[1:4])} exited {rc}\n{stdout[-2000:]}\n"
                         f"{stderr[-3000:]}")
    return seconds, rss, stdout


def measure(admin: str, src: str, template: str, dst_name: str, case: str, path: str,
            args: argparse.Namespace, heap: int, source_sum: tuple) -> Measure:
    """One timed run on a fresh clone of the case's template, verified afterwards."""
    dst = with_db(admin, dst_name)
    execute(admin, f"DROP DATABASE IF EXISTS {dst_name} WITH (FORCE)",
            f"CREATE DATABASE {dst_name} TEMPLATE {template} STRATEGY file_copy")
    try:
        xid0 = int(scalar(dst, "SELECT txid_current() % 4294967296")[0])
        checkpoint(admin)
        lsn0 = scalar(admin, "SELECT pg_current_wal_lsn()")[0]
        log(f"{CASES[case]}: {path}")
        if path == "etl":
            cmd = [sys.executable, "-m", "etl", "copy", "--source", src, "--target", dst,
                   "--table", "t", "--mode", "upsert", "--chunk-size", str(args.chunk_size),
                   "--no-progress", "--json"]
        else:
            cmd = [sys.executable, __file__, "--baseline", src, dst,
                   "--chunk-size", str(args.chunk_size)]
        seconds, rss, stdout = timed(cmd)
        wal = scalar(admin, f"SELECT pg_current_wal_lsn() - '{lsn0}'::pg_lsn")[0] / 2**20
        m = Measure(f"{CASES[case]}: {'etl upsert' if path == 'etl' else 'baseline'}",
                    args.rows, seconds, heap, rss)
        want = expected(case, args.rows)
        written = scalar(dst, f"SELECT count(*) FROM t WHERE xmin::text::bigint > {xid0}")[0]
        if written != want["inserted"] + want["updated"]:
            raise SystemExit(f"bench: {path} wrote {written:,} rows in case {case}, expected "
                             f"{want['inserted'] + want['updated']:,}")
        m.extra.update(written=written, wal=wal)
        if path == "etl":
            doc = json.loads(stdout)
            md = doc["metadata"]
            outcomes = {k: md.get("outcomes", {}).get(k, 0) for k in want}
            chunks = -(-args.rows // args.chunk_size)
            if doc["status"] != "completed" or outcomes != want or md["num_chunks"] != chunks \
                    or md["chunk_size"] != args.chunk_size:
                raise SystemExit(f"bench: etl reported {doc['status']}, outcomes {outcomes} "
                                 f"(expected {want}), {md['num_chunks']} chunks of "
                                 f"{md['chunk_size']} (expected {chunks} of {args.chunk_size})")
            m.extra["etl_seconds"] = doc["summary"]["duration_seconds"]
        if tuple(scalar(dst, CHECKSUM_SQL.format(name="t"))) != source_sum:
            raise SystemExit(f"bench: after {path} in case {case}, t differs from the source")
        m.extra["note"] = (f"{written:,} rows written, {wal:.1f} MiB of WAL (cluster-wide)"
                           + (f", {m.extra['etl_seconds']:.2f}s inside etl" if path == "etl" else ""))
        log(f"  {seconds:.2f}s, {m.rate:,.0f} rows/s, peak RSS {rss:.1f} MB, {m.extra['note']}")
        return m
    finally:
        if args.keep:
            log(f"kept: {dst_name}")
        else:
            execute(admin, f"DROP DATABASE IF EXISTS {dst_name} WITH (FORCE)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--chunk-size", type=int, default=100_000,
                    help="rows per chunk, for etl (--chunk-size) and the baseline alike")
    ap.add_argument("--repeat", type=int, default=1, help="runs per path; the fastest is kept")
    ap.add_argument("--url", help="server URL (default $ETL_BENCH_PG_URL or the local one)")
    ap.add_argument("--keep", action="store_true", help="keep the databases it created")
    ap.add_argument("--no-check", action="store_true", help="always exit 0 after printing")
    ap.add_argument("--baseline", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.baseline:
        baseline(args.baseline[0], args.baseline[1], args.chunk_size)
        return 0

    admin = server_url(args.url)
    version = scalar(admin, "SHOW server_version")[0]
    if int(scalar(admin, "SHOW server_version_num")[0]) < 150000:
        sys.exit("bench: needs PostgreSQL 15+ (CREATE DATABASE … STRATEGY file_copy)")
    tag = os.getpid()
    names = {"src": f"etl_benchup_src_{tag}", "a": f"etl_benchup_a_{tag}",
             "b": f"etl_benchup_b_{tag}"}
    log(f"server {mask(admin)} (PostgreSQL {version}); databases etl_benchup_*_{tag}")
    created: list[str] = []
    try:
        for name in names.values():
            execute(admin, f"CREATE DATABASE {name}")
            created.append(name)
        src = with_db(admin, names["src"])
        heap, source_sum = create_source(src, "t", args.rows)
        results: list[Measure] = []
        for case in CASES:
            log(f"template for {CASES[case]}")
            build_template(with_db(admin, names[case]), case, args.rows)
            best: dict[str, Measure] = {}
            for i in range(args.repeat):
                for path in ("baseline", "etl"):
                    m = measure(admin, src, names[case], f"etl_benchup_{case}{path}{i}_{tag}",
                                case, path, args, heap, tuple(source_sum))
                    if path not in best or m.seconds < best[path].seconds:
                        best[path] = m
            best["etl"].ceiling = best["baseline"]
            results += [best["baseline"], best["etl"]]

        print()
        print(f"PostgreSQL {version}, {os.cpu_count()} CPU(s), {args.rows:,} rows in chunks of "
              f"{args.chunk_size:,}; MB = MiB of source heap (pg_table_size) per second; "
              "peak RSS = the process's own ru_maxrss; × ceiling = etl ÷ baseline rows/s")
        print_table(results)
        for m in results:
            print(f"  {m.path}: {m.extra['note']}")
        print()
        failed = False
        for m in results[1::2]:
            ok = m.ratio is not None and m.ratio >= TARGET_RATIO
            failed |= not ok
            print(f"{'PASS' if ok else 'FAIL'}: {m.path} at {m.ratio:.2f}× the baseline "
                  f"(target ≥ {TARGET_RATIO:.2f}×)")
        return 1 if failed and not args.no_check else 0
    finally:
        if args.keep:
            log(f"kept: {', '.join(created)}")
        else:
            for name in created:
                execute(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    sys.exit(main())
