"""`etl load`."""

from __future__ import annotations

import click

from ..load_command import load as run_load
from .common import job_options, observed, render


@click.command()
@click.argument("files", nargs=-1, required=True, metavar="FILE…")
@click.option("--target", metavar="URL", envvar="ETL_TARGET_URL", show_envvar=True,
              help="Database to load into: PostgreSQL, MySQL/MariaDB (mysql+pymysql://…) or "
                   "SQLite (sqlite:///path.db) (default: the embedded PostgreSQL).")
@click.option("--table", required=True, metavar="[SCHEMA.]TABLE",
              help="The table to load (it must exist).")
@click.option("--format", "format",
              type=click.Choice(["csv", "ndjson", "jsonl", "parquet"], case_sensitive=False),
              help="The files' format (default: from their extension: .csv/.tsv/.txt, "
                   ".ndjson/.jsonl/.json, .parquet/.pq; a text file's .gz/.zst/.bz2 is read "
                   "as it is). jsonl is ndjson.")
@click.option("--mode", type=click.Choice(["append", "replace", "upsert", "ignore"]),
              default="append", show_default=True,
              help="append; replace (empty the table once, at the start); upsert or ignore "
                   "(on a primary key or unique index among the loaded columns).")
@click.option("--delimiter", default=",", show_default=True,
              help="CSV: field separator (one character).")
@click.option("--quote", default='"', show_default=True, help="CSV: quote character.")
@click.option("--escape", help="CSV: character that escapes a quote inside a quoted field "
                               "(default: the quote itself, doubled).")
@click.option("--header/--no-header", default=True, show_default=True,
              help="CSV: the first line (after --skip-lines) names the columns.")
@click.option("--null", default="", metavar="TEXT",
              help="CSV: unquoted text that means NULL (default: an empty unquoted field; a "
                   "quoted \"\" stays an empty string).")
@click.option("--encoding", default="UTF8", show_default=True,
              help="CSV: the files' encoding (PostgreSQL's names: UTF8, LATIN1, WIN1252, …; "
                   "into MySQL/SQLite also a Python codec name); NDJSON and Parquet are "
                   "UTF-8.")
@click.option("--skip-lines", type=click.IntRange(min=0), default=0, show_default=True,
              help="CSV: lines to skip at the top of each file, before the header.")
@click.option("--date-format", type=click.Choice(["DMY", "MDY", "YMD"], case_sensitive=False),
              help="The order of a date's fields: 05/01/2024 is 5 January with DMY, 1 May "
                   "with MDY (the default). ISO dates and month names read the same either "
                   "way; 05.01.2024, 5-Jan-2024 and 20240105 load too (into MySQL/SQLite: "
                   "numeric dates, no month names).")
@click.option("--columns", metavar="COL[,COL…]",
              help="The columns to load: a CSV file's, in order (default: the header's "
                   "names, else the table's columns); the NDJSON keys or Parquet columns to "
                   "load (default: a Parquet file's columns; NDJSON: the table's).")
@click.option("--rejects", metavar="PATH",
              help="Append each refused row here as NDJSON: file, line (Parquet: row), raw "
                   "text, error (they are dead letters too).")
@job_options(without=("state",))
@click.option("--state", metavar="URL", envvar="ETL_STATE_URL", show_envvar=True,
              help="PostgreSQL target: only the target database (the checkpoint commits "
                   "with each chunk). MySQL/SQLite target: the PostgreSQL state store "
                   "(default: the embedded one).")
def load(**kw: object) -> None:
    """Load CSV, NDJSON or Parquet files into a PostgreSQL, MySQL/MariaDB or SQLite table,
    in resumable chunks.

    Into PostgreSQL, the server parses and converts every value: CSV with its own CSV
    COPY; NDJSON (one JSON object a line) and Parquet (streamed in record batches, a row =
    a JSON object) are COPYed as JSON lines into a staging table and converted by
    PostgreSQL, each column from the key of its name (a JSON string's text, a number, a
    boolean; an array into an array column; a nested object as its JSON text; into
    json/jsonb a string holding JSON text is parsed). A missing key loads NULL; keys that
    are not columns are ignored.

    Each chunk (the next rows of the current file) is one transaction with its checkpoint:
    the file, the byte after the last row and its line (Parquet: the row). A rerun resumes
    exactly there; a file that changed since is refused unless --restart. Rows the database
    refuses (bad dates, short rows, invalid JSON, values too long, constraint violations,
    invalid UTF-8) are isolated: the good rows load, each refused one becomes a dead letter
    (`etl dlq list --job JOB`) and, with --rejects, a line of that NDJSON file.

    Into MySQL/MariaDB or SQLite, etl splits the CSV fields as PostgreSQL would and converts
    every value in Python to its column's type (integers in range, decimals to the scale,
    booleans, ISO 8601 dates and timestamps with offsets converted to UTC, text within
    varchar(n), \\x hex bytes, valid json): a value that does not convert is a dead letter
    naming the column; rows the database refuses are isolated. The position is kept in the
    target's table etl_load_checkpoints, in each chunk's transaction; the state store
    (--state, else the embedded PostgreSQL) gets the checkpoint and dead letters after each
    commit.

    \b
    Examples:
      etl load --target postgresql://app@db/prod --table public.orders orders.csv
      etl load --table staging.events --delimiter '|' --null '\\N' --rejects bad.ndjson \\
               'dumps/events-*.csv.gz'
      etl load --table staging.events --mode upsert 'exports/events-*.parquet'
      etl load --table staging.clicks --rejects bad.ndjson clicks.ndjson.gz
      etl load --target sqlite:///app.db --table events --mode upsert events.csv
    """
    as_json = bool(kw.pop("as_json"))
    report = kw.pop("report_path")
    files = kw.pop("files")
    assert isinstance(files, tuple)
    with observed(kw):
        result = run_load(list(files), report=report, **kw)  # type: ignore[arg-type]
    render(result, as_json)
