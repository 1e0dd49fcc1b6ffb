#!/usr/bin/env python
"""Bench: `etl load` of a CSV file into PostgreSQL against `psql \\copy` of the same file.

    python bench/load_csv.py [--rows 1000000] [--repeat 2] [--url URL] [--keep] [--no-check]

copy_pg.py's generated table (~200 bytes a row, mixed types) is written once to a CSV file
with a header (``COPY … TO STDOUT (FORMAT csv, HEADER)``, ~1M rows, ~180 MB). Then, each
into an empty copy of the table after a CHECKPOINT, alternating ``--repeat`` times:

- the ceiling: ``psql -c "\\copy t FROM 'file' (FORMAT csv, HEADER)"``;
- ``python -m etl load --target DST --table t --no-progress --json FILE`` (defaults);

each verified by row count and an order-independent checksum against the source. Prints
seconds, rows/s, MB/s of the file and each process's own peak RSS (``os.wait4``), the
fastest run of each and the ratio. Target (issue 6): etl at least 0.7x the ceiling's rows/s;
exits 1 below it unless --no-check.
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
    TABLE_DDL,
    checkpoint,
    create_source,
    execute,
    log,
    psql_cmd,
    scalar,
    server_url,
    wait_rusage,
    with_db,
)

TARGET_RATIO = 0.7


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``cmd``: seconds, its own peak RSS (MB), its stdout (output goes to temporary
    files, so a large one cannot block the process while it is timed)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        rc, rss = wait_rusage(proc)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if rc != 0:
        raise SystemExit(f"bench: {' '.join(cmd[:4])} … exited {rc}\n{stderr[-3000:]}")
    return seconds, rss, stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--url")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    admin = server_url(args.url)
    tag = os.getpid()
    names = [f"etl_benchload_src_{tag}", f"etl_benchload_dst_{tag}"]
    execute(admin, f"CREATE DATABASE {names[0]}")
    src, dst = (with_db(admin, n) for n in names)
    tmp = Path(tempfile.mkdtemp(prefix="etl-bench-load-"))
    csv_file = tmp / "t.csv"
    try:
        create_source(src, "t", args.rows)
        expected = tuple(scalar(src, CHECKSUM_SQL.format(name="t")))
        with csv_file.open("wb") as fh:
            subprocess.run(psql_cmd(src, "COPY t TO STDOUT (FORMAT csv, HEADER)"), stdout=fh,
                           check=True)
        size = csv_file.stat().st_size
        log(f"{csv_file}: {size / 2**20:.1f} MiB")
        runs: dict[str, list[tuple[float, float]]] = {"psql \\copy (ceiling)": [], "etl load": []}
        for _ in range(args.repeat):
            for path in runs:
                execute(admin, f"DROP DATABASE IF EXISTS {names[1]} WITH (FORCE)",
                        f"CREATE DATABASE {names[1]}")
                execute(dst, TABLE_DDL.format(name="t"))
                checkpoint(admin)
                if path.startswith("psql"):
                    cmd = psql_cmd(dst, f"\\copy t FROM '{csv_file}' (FORMAT csv, HEADER)")
                else:
                    cmd = [sys.executable, "-m", "etl", "load", "--target", dst, "--table", "t",
                           "--no-progress", "--json", str(csv_file)]
                seconds, rss, out = timed(cmd)
                got = tuple(scalar(dst, CHECKSUM_SQL.format(name="t")))
                if got != expected:
                    raise SystemExit(f"bench: {path} loaded {got}, expected {expected}")
                if out:
                    doc = json.loads(out)
                    assert doc["summary"]["succeeded"] == args.rows, doc["summary"]
                runs[path].append((seconds, rss))
                log(f"  {path}: {seconds:.2f}s, {args.rows / seconds:,.0f} rows/s, "
                    f"peak RSS {rss:.1f} MB; verified")
        print("| path                  |      rows | seconds |  rows/s | MB/s | peak RSS MB | × ceiling |")
        print("|-----------------------|-----------|---------|---------|------|-------------|-----------|")
        best = {p: min(r) for p, r in runs.items()}
        ceiling = best["psql \\copy (ceiling)"][0]
        for path, (seconds, rss) in best.items():
            print(f"| {path:<21} | {args.rows:>9,} | {seconds:7.2f} | {args.rows / seconds:7,.0f} | "
                  f"{size / 2**20 / seconds:4.0f} | {rss:11.1f} | {ceiling / seconds:9.2f} |")
        ratio = ceiling / best["etl load"][0]
        ok = ratio >= TARGET_RATIO
        print(("PASS" if ok else "FAIL") + f": etl load at {ratio:.2f}x psql \\copy "
              f"(target >= {TARGET_RATIO}x; fastest of {args.repeat})")
        return 0 if ok or args.no_check else 1
    finally:
        csv_file.unlink(missing_ok=True)
        tmp.rmdir()
        if not args.keep:
            for name in names:
                execute(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    sys.exit(main())
