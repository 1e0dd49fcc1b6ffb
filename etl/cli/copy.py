"""`etl copy`."""

from __future__ import annotations

import click

from .. import api
from .common import job_options, observed, render


@click.command()
@click.option("--source", metavar="URL", envvar="ETL_SOURCE_URL", show_envvar=True,
              help="Source database URL (default: the embedded PostgreSQL).")
@click.option("--target", metavar="URL", envvar="ETL_TARGET_URL", show_envvar=True,
              help="Target database URL (default: the embedded PostgreSQL).")
@click.option("--table", "table", multiple=True, metavar="[SCHEMA.]TABLE",
              help="Table to copy; repeat for several (copied parents first, following their "
                   "foreign keys, one job each).")
@click.option("--all-tables", is_flag=True,
              help="Copy every table of the source (outside system schemas and the state store).")
@click.option("--exclude", multiple=True, metavar="PATTERN",
              help="With several tables: leave out tables matching this glob (SCHEMA.TABLE or "
                   "TABLE); repeatable.")
@click.option("--query", metavar="SQL",
              help="Copy the result of this query instead of a table (trusted operator input); "
                   "needs --to-table and --key, and is resumable on that key.")
@click.option("--rename-columns", metavar="snake_case|lower|OLD=new,…",
              help="Name the target's columns differently: snake_case (InvoiceLineId -> "
                   "invoice_line_id), lower, or an explicit list OLD=new[,OLD2=new2…].")
@click.option("--since-column", metavar="COL",
              help="Incremental sync: each run copies only rows whose COL (e.g. updated_at) is at "
                   "or past the maximum the last finished run saw; use with --mode upsert so "
                   "changed rows are updated.")
@click.option("--transform", metavar="MODULE:FUNCTION",
              help="Reshape each chunk with this function (polars.DataFrame in, DataFrame out); "
                   "rows it returns with a reason in column _reject become dead letters "
                   "(category validation). MODULE may be a path to a .py file.")
@click.option("--to-table", metavar="[SCHEMA.]TABLE",
              help="Name of the table in the target (default: the same as --table).")
@click.option("--key", metavar="COL[,COL…]",
              help="Unique, ordered column(s) to cut chunks on (default: the primary key).")
@click.option("--columns", metavar="COL[,COL…]", help="Copy only these columns (must include the key).")
@click.option("--where", metavar="SQL",
              help="Copy only rows matching this SQL condition (trusted operator input).")
@click.option("--mode", type=click.Choice(["append", "replace", "upsert", "ignore"]),
              default="append", show_default=True,
              help="append: insert the rows; replace: empty the target once at the start of a "
                   "fresh run, then insert; upsert: insert new keys and update rows whose values "
                   "changed (unchanged rows are not rewritten); ignore: insert new keys, keep "
                   "existing rows. upsert/ignore match on the target's primary key or a unique "
                   "index.")
@click.option("--create/--no-create", default=True, show_default=True,
              help="Create a missing target table from the source's definition.")
@job_options
def copy(**kw: object) -> None:
    """Copy tables (or a query's result) between PostgreSQL, MariaDB/MySQL and SQLite
    in resumable keyset chunks.

    One chunk per target transaction; on a PostgreSQL target the job's checkpoint
    is written in that same transaction (PostgreSQL to PostgreSQL moves binary
    COPY data without decoding it). Run the same command again to resume after a
    crash, SIGTERM or --max-runtime. Modes make reruns safe: upsert updates
    changed rows, ignore keeps existing ones.

    \b
    Examples:
      etl copy --source postgresql://app@db1/prod --target postgresql://app@db2/copy \\
               --table public.events --chunk-size 50000
      etl copy --source mysql://root@127.0.0.1/shop --target postgresql://127.0.0.1/dw \\
               --all-tables --rename-columns snake_case --mode upsert
    """
    as_json = bool(kw.pop("as_json"))
    report = kw.pop("report_path")
    kw["table"] = list(kw["table"]) or None  # type: ignore[call-overload]
    kw["exclude"] = list(kw["exclude"]) or None  # type: ignore[call-overload]
    with observed(kw):
        result = api.copy(report=report, **kw)  # type: ignore[arg-type]
    render(result, as_json)
