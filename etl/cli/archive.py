"""`etl archive`."""

from __future__ import annotations

import click

from ..archive import archive as run_archive
from .common import job_options, observed, render, replica_options, timezone_option


@click.command()
@click.option("--source", metavar="URL", envvar="ETL_SOURCE_URL", show_envvar=True,
              help="PostgreSQL database holding the table to archive (default: the embedded "
                   "PostgreSQL), or a MySQL/MariaDB one (archived into a table of the same "
                   "database, or purged).")
@click.option("--table", required=True, metavar="[SCHEMA.]TABLE",
              help="The table to archive rows from.")
@click.option("--where", required=True, metavar="SQL",
              help="Which rows to take (trusted operator input), e.g. \"created_at < now() - "
                   "interval '90 days'\"; applied, parenthesised, inside every chunk, so only "
                   "rows matching when their chunk runs move. Read in --timezone (UTC).")
@click.option("--to", metavar="URL",
              help="Another PostgreSQL database, or a MySQL/MariaDB one (mysql+pymysql://…), to "
                   "archive into (default: the source database). Each chunk is committed there "
                   "first, then deleted from the source.")
@click.option("--to-table", metavar="[SCHEMA.]TABLE",
              help="The archive table (default with --to: the same name as --table). Created "
                   "from the source's definition when missing.")
@click.option("--to-dir", metavar="DIR",
              help="Archive into files in DIR instead of a table: one file a chunk "
                   "(<job>.wNNNN.NNNNNN.parquet|csv), fsynced and renamed, listed in "
                   "DIR/<job>.manifest.json with rows and sha256, before its rows are deleted.")
@click.option("--format", "format", type=click.Choice(["parquet", "csv"]), default=None,
              help="Format of the --to-dir files (default parquet: exact column types; csv: "
                   "PostgreSQL's CSV with a header).")
@click.option("--purge", is_flag=True, help="Delete the matching rows without archiving them.")
@click.option("--no-delete", is_flag=True,
              help="Archive the matching rows without deleting them (checkpointed: a rerun "
                   "goes on after the last archived key and never archives a row twice).")
@click.option("--drop-partitions", is_flag=True,
              help="Partitioned table: first archive and DROP each partition all of whose rows "
                   "match --where (one transaction a partition: lock, check, INSERT … SELECT, "
                   "DETACH, DROP), then walk the rest by chunks. Never an empty or DEFAULT "
                   "partition. With --to-table (same database) or --purge.")
@click.option("--key", metavar="COL[,COL…]",
              help="Unique, ordered column(s) to walk the table by (default: the primary key).")
@replica_options
@timezone_option
@click.option("--create/--no-create", default=True, show_default=True,
              help="Create a missing archive table from the source's definition.")
@click.option("--state", metavar="URL", envvar="ETL_STATE_URL", show_envvar=True,
              help="PostgreSQL URL of the state store (default: the source database, so each "
                   "chunk's checkpoint commits with its delete; for a MySQL/MariaDB source, the "
                   "embedded PostgreSQL).")
@click.option("--lock-timeout", default="5s", show_default=True, metavar="DURATION",
              help="How long a chunk waits for a row lock (a row an application holds) before "
                   "it is rolled back and retried.")
@job_options(without=("state", "lock_timeout", "max_errors", "max_error_rate"))
def archive(**kw: object) -> None:
    """Move rows matching --where out of a live PostgreSQL (or MySQL/MariaDB) table, chunk by chunk.

    The table is walked in keyset chunks on its key. Into a table of the same database,
    each chunk is ONE transaction: DELETE … RETURNING feeds the INSERT into the archive,
    and the checkpoint commits with it. Into another database (--to), each chunk is written
    there idempotently and committed, then deleted from the source with the checkpoint; a
    crash in between leaves the rows in both and the rerun finishes the move — no row is
    lost or archived twice. Into files (--to-dir), each chunk's file is fsynced, renamed and
    listed in the manifest before its delete commits; a rerun rewrites a chunk that did not
    commit under the same name. Short transactions (--chunk-seconds, --lock-timeout, --sleep,
    --max-rate) keep the table usable while the job runs; a second run of the same job
    exits 75, so cron runs never overlap.

    \b
    Examples:
      etl archive --source postgresql://app@db1/prod --table public.events \\
                  --where "created_at < now() - interval '90 days'" \\
                  --to-table archive.events --max-runtime 30m
      etl archive --source postgresql://app@db1/prod --table public.events \\
                  --where "created_at < now() - interval '1 year'" \\
                  --to postgresql://app@db9/cold --to-table public.events
      etl archive --source postgresql://app@db1/prod --table public.events \\
                  --where "created_at < now() - interval '1 year'" \\
                  --to mysql+pymysql://archiver@db9/cold --to-table events
      etl archive --source postgresql://app@db1/prod --table public.events \\
                  --where "created_at < now() - interval '1 year'" \\
                  --to-dir /srv/archive/events --format parquet
      etl archive --table public.sessions --where "expires_at < now()" --purge

    \b
    Exit codes: 0 done · 4 stopped (--max-runtime, SIGTERM), the next run resumes ·
    1 failed (e.g. a foreign key refuses the delete; fix it and rerun) · 2 bad options ·
    75 another run of the job holds it.
    """
    as_json = bool(kw.pop("as_json"))
    report = kw.pop("report_path")
    with observed(kw):
        result = run_archive(report=report, **kw)  # type: ignore[arg-type]
    render(result, as_json)
