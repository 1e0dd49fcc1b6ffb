"""`etl export`."""

from __future__ import annotations

import click

from ..export import export as run_export
from .common import job_options, observed, render


@click.command()
@click.option("--source", metavar="URL", envvar="ETL_SOURCE_URL", show_envvar=True,
              help="Database to export from: PostgreSQL, MySQL/MariaDB (mysql+pymysql://…) or "
                   "SQLite (sqlite:///file.db) (default: the embedded PostgreSQL).")
@click.option("--table", metavar="[SCHEMA.]TABLE", help="The table to export.")
@click.option("--query", metavar="SQL",
              help="Export this query's rows instead (trusted SQL; needs --key).")
@click.option("--key", metavar="COL[,COL…]",
              help="Column(s) that order the rows and cut the chunks (default: the primary "
                   "key; required with --query).")
@click.option("--to", "to", required=True, metavar="DIR",
              help="Directory for the files and the manifest (created if missing).")
@click.option("--format", "format", type=click.Choice(["parquet", "csv", "ndjson"]),
              default="parquet", show_default=True, help="The files' format.")
@click.option("--rows-per-file", type=click.IntRange(min=1), metavar="N",
              help="Rows a file holds, in row groups of the chunk size (default: one chunk a "
                   "file).")
@click.option("--compression", metavar="CODEC",
              help="Parquet: snappy (default), zstd, gzip, lz4, brotli, none. CSV/NDJSON: "
                   "gzip, zstd or none (default), for the whole file.")
@click.option("--partition-by", metavar="COL[,COL…]",
              help="One directory per value, hive style (col=value/); those columns are in "
                   "the directory names, not in the files.")
@click.option("--json-as", type=click.Choice(["string", "struct"]), default="string",
              show_default=True,
              help="Parquet: json/jsonb as their text, or decoded into structs (one chunk a "
                   "file; PostgreSQL sources).")
@click.option("--where", metavar="SQL", help="Export only the rows this condition selects "
                                             "(trusted SQL).")
@click.option("--columns", metavar="COL[,COL…]", help="Export only these columns.")
@job_options(without=("state", "lock_timeout", "max_errors", "max_error_rate"))
@click.option("--state", metavar="URL", envvar="ETL_STATE_URL", show_envvar=True,
              help="PostgreSQL database of the job's checkpoint (default: the embedded "
                   "PostgreSQL).")
def export(**kw: object) -> None:
    """Export a table or query into Parquet, CSV or NDJSON files, in resumable chunks.

    The source is PostgreSQL (read by COPY), MySQL/MariaDB or SQLite (read through
    SQLAlchemy, key > last ORDER BY key LIMIT n, one short read transaction a chunk).
    Rows go in key order. Each file is written under a temporary name, fsynced, renamed and
    listed in DIR/_<job>.manifest.json (rows, bytes, sha256, key range and the schema)
    before the job's checkpoint moves past its rows: a rerun after a crash, --max-runtime
    or Ctrl-C resumes with no row missing or twice. Parquet keeps exact types: numeric(p,s)
    as decimal128, timestamptz (MySQL TIMESTAMP) as UTC timestamps, arrays as lists, bytea
    and blobs as binary. CSV is PostgreSQL's (etl load reads it back exactly). The
    checkpoint is kept in --state (PostgreSQL). A rerun of a finished export (or --restart)
    replaces its files.

    \b
    Examples:
      etl export --source postgresql://app@db/prod --table public.orders --to lake/orders
      etl export --table events --to out/events --partition-by day --compression zstd
      etl export --source mysql+pymysql://app@db/shop --table orders --to out/orders \\
                 --format csv
      etl export --source sqlite:///app.db --table events --to out/events
      etl export --query 'SELECT o.id, c.name FROM orders o JOIN customers c USING (cid)' \\
                 --key id --to out/orders --format csv --compression gzip
    """
    as_json = bool(kw.pop("as_json"))
    report = kw.pop("report_path")
    with observed(kw):
        result = run_export(report=report, **kw)  # type: ignore[arg-type]
    render(result, as_json)
