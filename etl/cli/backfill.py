"""`etl backfill`."""

from __future__ import annotations

import click

from .. import api
from .common import job_options, observed, render, replica_options, timezone_option


@click.command()
@click.option("--target", metavar="URL", envvar="ETL_TARGET_URL", show_envvar=True,
              help="PostgreSQL database holding the table (default: the embedded PostgreSQL).")
@click.option("--table", required=True, metavar="[SCHEMA.]TABLE", help="Table to update.")
@click.option("--set", "set_", required=True, metavar='"COL = EXPR[, …]"',
              help="The assignments of the UPDATE (trusted operator input); may not assign a "
                   "key column.")
@click.option("--where", metavar="SQL",
              help="Update only rows matching this condition, e.g. the rows that still need "
                   "it (trusted operator input).")
@click.option("--key", metavar="COL[,COL…]",
              help="Ordered column(s) to cut chunks on (default: the primary key).")
@replica_options
@timezone_option
@job_options(without=("max_errors", "max_error_rate"))  # a backfill has no dead letters
def backfill(**kw: object) -> None:
    """Update a live PostgreSQL table in short, resumable chunks (a chunked UPDATE).

    Each chunk is one transaction: the next keys after the checkpoint among the rows
    --where selects, the UPDATE of those rows, and the job's checkpoint, committed
    together. So a crash, kill -9 or --max-runtime never leaves a row updated twice
    or skipped: run the same command again to resume. --lock-timeout bounds each
    wait for a row lock (the chunk is rolled back and retried); --chunk-seconds,
    --max-rate and --sleep keep transactions short. A rerun after a finished backfill
    only updates rows added past its last key; --restart walks the table again.

    \b
    Example:
      etl backfill --target postgresql://app@db/prod --table public.orders \\
                   --set "total_cents = round(total * 100)" --where "total_cents IS NULL" \\
                   --chunk-seconds 0.5 --sleep 0.1
    """
    as_json = bool(kw.pop("as_json"))
    report = kw.pop("report_path")
    kw["set"] = kw.pop("set_")
    with observed(kw):
        result = api.backfill(report=report, **kw)  # type: ignore[arg-type]
    render(result, as_json)
