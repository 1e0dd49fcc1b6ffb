#!/usr/bin/env python
"""Bench: `etl archive` / `--purge` / `etl backfill` in one PostgreSQL database against a
hand-written psycopg loop of the same statement per chunk, one transaction each.

    python bench/archive_pg.py [--rows 2000000] [--repeat 1] [--cases abc]
                               [--url URL] [--keep] [--no-check]

The source ``t`` is copy_pg.py's table (bigint PK ``id``, ``ts`` = 2020-01-01 + id
seconds, so time is correlated with the key), frozen and analysed, with an empty
``archive_t`` of the same definition beside it. The condition selects the older half by
time: ``ts < <cutoff>``, i.e. ids 1 .. rows/2 (a retention job's "older than N days").

(a) archive: ``etl archive --table t --where … --to-table archive_t`` (defaults: auto
    chunks, 2 s) against, per chunk, ``WITH moved AS (DELETE FROM t WHERE id range AND
    (where) RETURNING *) INSERT INTO archive_t SELECT * FROM moved``;
(b) purge: the same with ``--purge`` against the plain ``DELETE``;
(c) backfill: ``etl backfill --set "n = n + 1" --where …`` against ``UPDATE t SET n = n + 1
    WHERE id range AND (where)``.

The baseline (this file run as ``--baseline CASE URL WHERE CHUNK``) finds each chunk's
upper key with ``SELECT max(id) FROM (SELECT id FROM t WHERE id > lo AND (where) ORDER BY
id LIMIT chunk)``, runs the statement, commits; its chunk size is a fixed one, the size
etl's adaptive sizer settled at in the same case (``metadata.chunk_size_last`` of the etl
run just before), so the baseline has no small start-up chunks and no state store to write.
Every timed run is on a fresh clone of the source database (CREATE DATABASE … TEMPLATE …
STRATEGY file_copy) after a CHECKPOINT, and is verified afterwards (counts and
order-independent checksums). Exits 1 if etl is under 0.8x the baseline's rows/s in any
case, or if etl's longest transaction is over 2 x --chunk-seconds, unless --no-check.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from copy_pg import (  # noqa: E402
    FILL_SQL,
    TABLE_DDL,
    Measure,
    checkpoint,
    execute,
    log,
    mask,
    scalar,
    server_url,
    wait_rusage,
    with_db,
)

TARGET_RATIO = 0.8          # etl's rows/s ÷ the baseline's
CHUNK_SECONDS = 2.0         # etl's default --chunk-seconds
TXN_LIMIT = 2 * CHUNK_SECONDS
COLUMNS = ("id", "n", "label", "amount", "ts", "flag", "doc", "u", "x")
CASES = {"a": "(a) archive 50%", "b": "(b) purge 50%", "c": "(c) backfill 50%"}


def checksum_sql(source: str, n_expr: str = "n", where: str | None = None) -> str:
    """(count, order-independent md5) of ``source``'s rows; ``n_expr`` stands for n."""
    cols = ", ".join(n_expr if c == "n" else c for c in COLUMNS)
    cond = f" WHERE {where}" if where else ""
    return (f"SELECT count(*), md5(string_agg(h, '' ORDER BY h)) FROM "
            f"(SELECT md5(ROW({cols})::text) AS h FROM {source}{cond}) AS s")


# -- the baseline (runs in its own process) ------------------------------------------------

def baseline(case: str, url: str, where: str, chunk: int) -> None:
    """The hand-written loop; prints {"rows", "chunks", "longest_transaction_seconds"}."""
    import psycopg

    stmt = {
        "a": ("WITH moved AS (DELETE FROM t WHERE id > %(lo)s AND id <= %(hi)s AND ({w}) "
              "RETURNING *) INSERT INTO archive_t SELECT * FROM moved"),
        "b": "DELETE FROM t WHERE id > %(lo)s AND id <= %(hi)s AND ({w})",
        "c": "UPDATE t SET n = n + 1 WHERE id > %(lo)s AND id <= %(hi)s AND ({w})",
    }[case].format(w=where)
    first = stmt.replace("id > %(lo)s AND ", "")
    bound = "SELECT max(id) FROM (SELECT id FROM t WHERE id > %(lo)s AND ({w}) ORDER BY id " \
            "LIMIT %(n)s) AS c"
    rows = chunks = 0
    longest = 0.0
    lo: int | None = None
    with psycopg.connect(url) as conn:
        while True:
            t0 = time.monotonic()
            with conn.transaction():
                if lo is None:
                    hi = conn.execute(bound.replace("id > %(lo)s AND ", "").format(w=where),
                                      {"n": chunk}).fetchone()[0]
                else:
                    hi = conn.execute(bound.format(w=where), {"lo": lo, "n": chunk}).fetchone()[0]
                if hi is not None:
                    cur = conn.execute(first if lo is None else stmt, {"lo": lo, "hi": hi})
                    rows += cur.rowcount
                    chunks += 1
            longest = max(longest, time.monotonic() - t0)
            if hi is None:
                break
            lo = hi
    print(json.dumps({"rows": rows, "chunks": chunks,
                      "longest_transaction_seconds": round(longest, 3)}))


# -- setup and measurement -----------------------------------------------------------------

def timed(cmd: list[str]) -> tuple[float, float, dict]:
    """Run ``cmd``: wall seconds, its own peak RSS (MB), its stdout as JSON."""
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
    try:
        return seconds, rss, json.loads(stdout)
    except ValueError as exc:
        raise SystemExit(f"bench: {' '.join(cmd[1:4])} printed no JSON: {stdout[-2000:]}") from exc


class Bench:
    def __init__(self, args: argparse.Namespace, admin: str, template: str, tag: int) -> None:
        self.args, self.admin, self.template, self.tag = args, admin, template, tag
        half = args.rows // 2
        cutoff = datetime(2020, 1, 1, tzinfo=UTC) + timedelta(seconds=half + 1)
        self.where = f"ts < '{cutoff.isoformat()}'"  # ids 1 .. rows/2
        self.half = half
        src = with_db(admin, template)
        self.total = tuple(scalar(src, checksum_sql("t")))
        self.kept = tuple(scalar(src, checksum_sql("t", where=f"NOT ({self.where})")))
        self.heap = scalar(src, "SELECT pg_table_size('t')")[0]

    def command(self, case: str, path: str, url: str, chunk: int | None) -> list[str]:
        if path == "baseline":
            return [sys.executable, __file__, "--baseline", case, url, self.where, str(chunk)]
        if case == "c":
            cmd = [sys.executable, "-m", "etl", "backfill", "--target", url, "--table", "t",
                   "--set", "n = n + 1", "--where", self.where]
        else:
            cmd = [sys.executable, "-m", "etl", "archive", "--source", url, "--table", "t",
                   "--where", self.where]
            cmd += ["--purge"] if case == "b" else ["--to-table", "archive_t"]
        return cmd + ["--no-progress", "--json"]

    def verify(self, case: str, path: str, url: str) -> None:
        def fail(what: str) -> None:
            raise SystemExit(f"bench: after {path} in {CASES[case]}: {what}")

        left = scalar(url, f"SELECT count(*) FROM t WHERE {self.where}")[0]
        if case in "ab" and left:
            fail(f"{left:,} matching rows remain in t")
        if case == "a":
            moved = scalar(url, "SELECT count(*) FROM archive_t")[0]
            if moved != self.half:
                fail(f"archive_t holds {moved:,} rows, expected {self.half:,}")
            both = tuple(scalar(url, checksum_sql(
                "(SELECT * FROM t UNION ALL SELECT * FROM archive_t) AS u")))
            if both != self.total:
                fail(f"t + archive_t {both} differ from the original {self.total}")
        elif case == "b":
            if tuple(scalar(url, checksum_sql("t"))) != self.kept:
                fail("t differs from the original's non-matching rows")
        else:
            if left != self.half:
                fail(f"{left:,} rows match, expected {self.half:,}")
            # every matching row has n + 1, every other row is unchanged
            undone = f"n - (CASE WHEN {self.where} THEN 1 ELSE 0 END)"
            if tuple(scalar(url, checksum_sql("t", undone))) != self.total:
                fail("t is not the original with n + 1 on exactly the matching rows")

    def measure(self, case: str, path: str, i: int, chunk: int | None) -> Measure:
        name = f"etl_bencharc_{case}{path[0]}{i}_{self.tag}"
        url = with_db(self.admin, name)
        execute(self.admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)",
                f"CREATE DATABASE {name} TEMPLATE {self.template} STRATEGY file_copy")
        try:
            checkpoint(self.admin)
            lsn0 = scalar(self.admin, "SELECT pg_current_wal_lsn()")[0]
            log(f"{CASES[case]}: {path}" + (f" (chunks of {chunk:,})" if chunk else ""))
            seconds, rss, doc = timed(self.command(case, path, url, chunk))
            wal = scalar(self.admin, f"SELECT pg_current_wal_lsn() - '{lsn0}'::pg_lsn")[0]
            if path == "etl":
                md = doc["metadata"]
                rows = doc["summary"]["succeeded"]
                if doc["status"] != "completed" or rows != self.half:
                    raise SystemExit(f"bench: etl reported {doc['status']} with {rows} rows, "
                                     f"expected completed with {self.half}")
                extra = {"chunks": md["num_chunks"], "chunk_last": md["chunk_size_last"],
                         "longest": md["longest_transaction_seconds"],
                         "inside": doc["summary"]["duration_seconds"]}
                label = {"a": "etl archive", "b": "etl archive --purge",
                         "c": "etl backfill"}[case]
            else:
                rows = doc["rows"]
                if rows != self.half:
                    raise SystemExit(f"bench: the baseline did {rows} rows, expected {self.half}")
                extra = {"chunks": doc["chunks"], "chunk_last": chunk,
                         "longest": doc["longest_transaction_seconds"]}
                label = "hand-written loop"
            self.verify(case, path, url)
            m = Measure(f"{CASES[case]}: {label}", rows, seconds, self.heap, rss, extra=extra)
            extra["wal"] = wal / 2**20
            log(f"  {seconds:.2f}s, {m.rate:,.0f} rows/s, peak RSS {rss:.1f} MB, "
                f"{extra['chunks']} chunks, longest transaction {extra['longest']:.2f}s, "
                f"{extra['wal']:.0f} MiB WAL" +
                (f", {extra['inside']:.2f}s inside etl" if "inside" in extra else "") +
                "; verified")
            return m
        finally:
            if self.args.keep:
                log(f"kept: {name}")
            else:
                execute(self.admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def print_table(results: list[Measure]) -> None:
    head = ("path", "rows moved", "seconds", "rows/s", "peak RSS MB", "× baseline")
    rows = [head]
    for m in results:
        rows.append((m.path, f"{m.rows:,}", f"{m.seconds:.2f}", f"{m.rate:,.0f}",
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
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeat", type=int, default=1, help="runs per path; the fastest is kept")
    ap.add_argument("--cases", default="abc", help="which cases to run (default abc)")
    ap.add_argument("--url", help="server URL (default $ETL_BENCH_PG_URL or the local one)")
    ap.add_argument("--keep", action="store_true", help="keep the databases it created")
    ap.add_argument("--no-check", action="store_true", help="always exit 0 after printing")
    ap.add_argument("--baseline", nargs=4, metavar=("CASE", "URL", "WHERE", "CHUNK"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.baseline:
        case, url, where, chunk = args.baseline
        baseline(case, url, where, int(chunk))
        return 0
    cases = [c for c in CASES if c in args.cases]

    admin = server_url(args.url)
    version = scalar(admin, "SHOW server_version")[0]
    if int(scalar(admin, "SHOW server_version_num")[0]) < 150000:
        sys.exit("bench: needs PostgreSQL 15+ (CREATE DATABASE … STRATEGY file_copy)")
    tag = os.getpid()
    template = f"etl_bencharc_src_{tag}"
    log(f"server {mask(admin)} (PostgreSQL {version}); databases etl_bencharc_*_{tag}")
    execute(admin, f"CREATE DATABASE {template}")
    try:
        src = with_db(admin, template)
        log(f"generating t: {args.rows:,} rows, and an empty archive_t")
        t0 = time.perf_counter()
        execute(src, TABLE_DDL.format(name="t"), FILL_SQL.format(name="t", rows=args.rows),
                TABLE_DDL.format(name="archive_t"), "VACUUM (FREEZE, ANALYZE) t",
                "VACUUM (FREEZE, ANALYZE) archive_t")
        bench = Bench(args, admin, template, tag)
        log(f"  {time.perf_counter() - t0:.1f}s; heap {bench.heap / 2**20:.0f} MiB; "
            f"--where \"{bench.where}\" selects {bench.half:,} rows")
        results: list[Measure] = []
        for case in cases:
            best: dict[str, Measure] = {}
            for i in range(args.repeat):
                e = bench.measure(case, "etl", i, None)
                b = bench.measure(case, "baseline", i, e.extra["chunk_last"])
                for path, m in (("etl", e), ("baseline", b)):
                    if path not in best or m.seconds < best[path].seconds:
                        best[path] = m
            best["etl"].ceiling = best["baseline"]
            results += [best["baseline"], best["etl"]]

        print()
        print(f"PostgreSQL {version}, {os.cpu_count()} CPU(s); t has {args.rows:,} rows "
              f"({bench.heap / 2**20:.0f} MiB heap); --where \"{bench.where}\" (the older half by "
              f"time, ids 1..{bench.half:,}); × baseline = etl ÷ hand-written loop rows/s; "
              f"fastest of {args.repeat} per path")
        print_table(results)
        for m in results:
            e = m.extra
            print(f"  {m.path}: {e['chunks']} chunks (last size {e['chunk_last']:,}), longest "
                  f"transaction {e['longest']:.2f}s, {e['wal']:.0f} MiB WAL (cluster-wide)"
                  + (f", {e['inside']:.2f}s inside etl" if "inside" in e else ""))
        print()
        failed = False
        for m in results[1::2]:
            ok = m.ratio is not None and m.ratio >= TARGET_RATIO
            failed |= not ok
            print(f"{'PASS' if ok else 'FAIL'}: {m.path} at {m.ratio:.2f}× the hand-written loop "
                  f"(target ≥ {TARGET_RATIO:.2f}×)")
            ok = m.extra["longest"] <= TXN_LIMIT
            failed |= not ok
            print(f"{'PASS' if ok else 'FAIL'}: {m.path}: longest transaction "
                  f"{m.extra['longest']:.2f}s (metadata.longest_transaction_seconds; target ≤ "
                  f"2 × --chunk-seconds = {TXN_LIMIT:g}s; the loop's: "
                  f"{m.ceiling.extra['longest'] if m.ceiling else float('nan'):.2f}s)")
        return 1 if failed and not args.no_check else 0
    finally:
        if args.keep:
            log(f"kept: {template}")
        else:
            execute(admin, f"DROP DATABASE IF EXISTS {template} WITH (FORCE)")


if __name__ == "__main__":
    sys.exit(main())
