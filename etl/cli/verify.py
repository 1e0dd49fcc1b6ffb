"""`etl verify`."""

from __future__ import annotations

import sys

import click

from ..report import Result
from ..verify import verify as run_verify
from .common import error, job_options, observed, render

# Differing keys printed on the terminal (the report names up to --max-keys).
SHOWN_KEYS = 20


@click.command()
@click.option("--source", metavar="URL", envvar="ETL_SOURCE_URL", show_envvar=True,
              help="Database of the reference table: PostgreSQL, MySQL/MariaDB or SQLite "
                   "(default: the embedded PostgreSQL).")
@click.option("--table", required=True, metavar="[SCHEMA.]TABLE",
              help="The reference table (a source, or a snapshot taken before an archive).")
@click.option("--target", multiple=True, metavar="URL", envvar="ETL_TARGET_URL",
              show_envvar=True,
              help="Database of the compared table (default: the source's). Repeat it, "
                   "paired in order with --to-table, to compare with tables of several "
                   "databases together.")
@click.option("--to-table", multiple=True, metavar="[SCHEMA.]TABLE",
              help="The compared table (default: --table's name). Repeat it to compare "
                   "with the union of several tables, e.g. a table and its archive.")
@click.option("--key", metavar="COL[,COL…]",
              help="Column(s) that identify a row and cut the ranges (default: the source's "
                   "primary key).")
@click.option("--columns", metavar="COL[,COL…]",
              help="Compare only these columns (default: all of the source's).")
@click.option("--exclude-columns", metavar="COL[,COL…]",
              help="Leave these columns out of the comparison (e.g. a loaded_at the copy "
                   "set).")
@click.option("--where", metavar="SQL",
              help="Compare only the rows this condition selects, on both sides (trusted "
                   "SQL).")
@click.option("--method", type=click.Choice(["auto", "database", "values"]), default="auto",
              show_default=True,
              help="database: each database counts a range and sums each row's md5 "
                   "(PostgreSQL, or MySQL/MariaDB, on both sides); values: rows are read and "
                   "compared by canonical values (any databases); auto: database when both "
                   "sides are of one kind with the same column types.")
@click.option("--max-keys", type=click.IntRange(min=0), default=100, show_default=True,
              metavar="N", help="Name at most N differing keys (all are counted).")
@job_options(without=("state", "lock_timeout", "max_errors", "max_error_rate"))
@click.option("--state", metavar="URL", envvar="ETL_STATE_URL", show_envvar=True,
              help="PostgreSQL database of the job's checkpoint (default: the target if it "
                   "is PostgreSQL, else the embedded PostgreSQL).")
def verify(**kw: object) -> None:
    """Compare a table with its copy: counts and checksums per key range, then the keys.

    Both sides are cut into the same key ranges (the source's chunks); each database
    digests its range — with --method database PostgreSQL (or MySQL/MariaDB, on both
    sides) counts the rows and sums the md5 of each row, so only two numbers travel; with
    --method values the rows are read and their canonical values compared (PostgreSQL,
    MySQL/MariaDB and SQLite in any pairing). A range whose digests differ is drilled into down to the keys that are
    missing from the target, extra in it, different (the columns are named, with both
    values) or there twice. Exit 0 when the tables are equal, 1 when they differ; the
    report lists the keys. The verification is a job like the others: resumable, shown by
    etl status, paced by --max-rate and --sleep.

    \b
    Examples:
      etl verify --source postgresql://app@old/prod --target postgresql://app@new/prod \\
                 --table public.orders
      etl verify --source mysql+pymysql://app@db/shop --target postgresql://app@pg/shop \\
                 --table orders --exclude-columns synced_at
      etl verify --table events_snapshot --to-table events --to-table archive.events
      etl verify --source sqlite:///app.db --target postgresql:///app --table events \\
                 --where "created_at >= '2026-01-01'"
    """
    as_json = bool(kw.pop("as_json"))
    report = kw.pop("report_path")
    with observed(kw):
        result = run_verify(report=report, **kw)  # type: ignore[arg-type]
    if as_json or result.metadata.get("dry_run") or "differences" not in result.metadata:
        render(result, as_json)
    show(result)


def show(result: Result) -> None:
    """The comparison on the terminal: counts, the first differing keys, the verdict."""
    doc = result.to_dict()
    meta = doc["metadata"]
    found = {k: n for k, n in meta["differences"].items() if n}
    click.echo(f"job {doc['job_id']}  run {doc['run_id']}  status {doc['status']}")
    click.echo(f"  {meta['source_table']}  vs  {' ∪ '.join(meta['target_tables'])}  "
               f"(key {', '.join(meta['key'])}; method {meta['method']})")
    counts = ", ".join(f"{n:,} {k}" for k, n in found.items()) or "no differences"
    click.echo(f"  rows: {meta['matched']:,} equal; {counts}  "
               f"({doc['summary']['duration_seconds']}s)")
    for d in meta["differing_keys"][:SHOWN_KEYS]:
        from ..verify.step import message_of

        click.echo(f"  {d['kind']:<10} key {d['key']}: {message_of(d)}")
    more = len(meta["differing_keys"]) - SHOWN_KEYS
    if more > 0:
        click.echo(f"  … {more} more named in the report")
    if doc["artifacts"].get("report"):
        click.echo(f"  report: {doc['artifacts']['report']}")
    click.echo(f"  full report: etl report {doc['run_id']}")
    if result.message and result.exit_code == 1:
        error(result.message)
    elif result.message:
        click.echo(f"etl: {result.message}", err=True)
    sys.stdout.flush()
    sys.exit(result.exit_code)


__all__ = ["show", "verify"]
