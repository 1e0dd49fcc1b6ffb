"""Bench: `etl copy` of a table with 10 bad rows in 1M against the same copy with none.

    python bench/copy_bad_rows.py [--rows 1000000] [--bad 10] [--url URL] [--keep]

The target refuses the bad rows with a CHECK constraint, so the copy must isolate
them (bisecting their chunks) and dead-letter them while every other row commits.
Target (issue 3): the run with bad rows takes at most 1.3x the clean run.
Prints seconds, rows/s and the ratio; exits 1 above the target unless --no-check.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from copy_pg import TABLE_DDL, checkpoint, create_source, execute, scalar, server_url, with_db  # noqa: E402

TARGET_RATIO = 1.3


def timed_copy(src: str, dst: str) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "etl", "copy", "--source", src, "--target", dst, "--table", "t",
           "--no-progress", "--max-error-rate", "1"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 3):
        raise SystemExit(f"bench: etl copy exited {proc.returncode}\n{proc.stderr[-3000:]}")
    return seconds, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--bad", type=int, default=10, help="rows the target refuses")
    ap.add_argument("--url")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    admin = server_url(args.url)
    tag = os.getpid()
    names = [f"etl_benchbad_src_{tag}", f"etl_benchbad_clean_{tag}", f"etl_benchbad_bad_{tag}"]
    for name in names:
        execute(admin, f"CREATE DATABASE {name}")
    src, clean, bad = (with_db(admin, n) for n in names)
    try:
        create_source(src, "t", args.rows)
        spacing = args.rows // args.bad
        execute(clean, TABLE_DDL.format(name="t"))
        execute(bad, TABLE_DDL.format(name="t"),
                f"ALTER TABLE t ADD CHECK (id % {spacing} <> {spacing // 2})")
        checkpoint(admin)
        t_clean, rc_clean = timed_copy(src, clean)
        checkpoint(admin)
        t_bad, rc_bad = timed_copy(src, bad)
        failed = scalar(bad, "SELECT failed FROM etl.checkpoints")[0]
        ratio = t_bad / t_clean
        print("| run        |      rows | seconds |  rows/s |")
        print("|------------|-----------|---------|---------|")
        print(f"| clean      | {args.rows:>9,} | {t_clean:7.2f} | {args.rows / t_clean:7,.0f} |")
        print(f"| {args.bad} bad rows | {args.rows:>9,} | {t_bad:7.2f} | {args.rows / t_bad:7,.0f} |")
        print(f"dead letters: {failed} (exit {rc_bad}); time with bad rows / clean: {ratio:.2f}x")
        ok = failed == args.bad and rc_clean == 0 and rc_bad == 3 and ratio <= TARGET_RATIO
        print(("PASS" if ok else "FAIL") + f": {ratio:.2f}x (target <= {TARGET_RATIO}x)")
        return 0 if ok or args.no_check else 1
    finally:
        if not args.keep:
            for name in names:
                execute(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


if __name__ == "__main__":
    sys.exit(main())
