"""``etl.export(...)``: check the options, plan and run the export under the job's lock (the
CLI's `etl export` calls exactly this)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import options as opt
from ..errors import UsageError
from ..model import TableName
from ..report import Result
from ..retry import DEFAULT_RETRIES, DEFAULT_RETRY_MAX_WAIT_SECONDS
from ..runner import DEFAULT_CHUNK_SECONDS, StopFlag, stop_on_signals
from ..state.schema import DEFAULT_SCHEMA
from ..urls import DbUrl, parse

if TYPE_CHECKING:
    from ..progress import ProgressOption
    from .plan import ExportSpec


def export(*, to: str | Path, source: str | DbUrl | None = None, table: str | None = None,
           query: str | None = None, key: str | list[str] | None = None,
           columns: str | list[str] | None = None, where: str | None = None,
           format: str | None = None,  # noqa: A002
           rows_per_file: int | None = None, compression: str | None = None,
           partition_by: str | list[str] | None = None, json_as: str = "string",
           job: str | None = None, state: str | DbUrl | None = None,
           state_schema: str = DEFAULT_SCHEMA, chunk_size: int | str | None = "auto",
           chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
           min_chunk: int | None = None, max_chunk: int | None = None,
           max_rate: float | None = None,
           sleep: float | None = None, max_runtime: str | float | None = None,
           retries: int = DEFAULT_RETRIES,
           retry_max_wait: str | float = DEFAULT_RETRY_MAX_WAIT_SECONDS,
           dry_run: bool = False, restart: bool = False, report: str | Path | None = None,
           progress: ProgressOption = False, stop: StopFlag | None = None) -> Result:
    """Export ``table`` (or the rows of ``query``, walked by ``key``) of ``source``
    (PostgreSQL, MySQL/MariaDB or SQLite) into files in directory ``to``, in key order, in
    resumable chunks.

    ``format`` is ``parquet`` (default; each chunk one row group, exact types: numeric(p,s)
    as decimal128, timestamptz as UTC timestamps, arrays as lists, bytea as binary, json as
    text or — ``json_as="struct"`` — structs), ``csv`` (PostgreSQL's CSV with a header) or
    ``ndjson`` (one JSON object a line). Each step writes one file: one chunk's rows, or
    ``rows_per_file`` rows in row groups of the chunk size; ``partition_by`` (columns)
    writes one file per value under hive-style ``col=value/`` directories. ``compression``:
    a Parquet codec (snappy by default, zstd, gzip, lz4, brotli, none), or gzip/zstd for a
    whole CSV/NDJSON file. Every file is written under a temporary name, fsynced, renamed and
    listed in ``_<job>.manifest.json`` (rows, bytes, sha256, key range, the schema) before
    the checkpoint moves past its rows, so a rerun after any crash resumes without a row
    twice or missing. The checkpoint is kept in ``state`` (default: the embedded
    PostgreSQL). ``where`` and ``columns`` narrow the rows and columns. ``dry_run`` prints
    the plan and one chunk's COPY (or read), writing nothing. Pacing, retries, ``report``,
    ``progress`` and ``stop`` are as for :func:`etl.copy`.

    PostgreSQL is read by COPY in exact text forms. MySQL/MariaDB and SQLite are read
    through SQLAlchemy as ``etl copy`` reads them (``key > last ORDER BY key LIMIT n``, one
    short read transaction a chunk) and written from the Python values: Parquet types from
    the columns' portable kinds (decimal128(p,s), timestamps — UTC-aware for MySQL
    TIMESTAMP —, binary, json as text), PostgreSQL-compatible CSV (so ``etl load`` reads it
    back exactly) and NDJSON (decimals as exact JSON numbers, bytes as ``\\x`` hex);
    ``json_as="struct"`` is PostgreSQL's only.
    """
    from .. import api
    from ..jobrun import JobRun
    from ..progress import progress_for
    from . import plan as export_plan
    from . import run as export_run
    from .plan import JSON_AS, PARQUET_MAX_CHUNK, ExportSpec, check_compression, check_format

    if (table is None) == (query is None):
        raise UsageError("give --table T or --query SQL (with --key) to say what to export")
    to_dir = Path(to)
    fmt = check_format(format, to_dir)
    codec = check_compression(compression, fmt)
    if json_as not in JSON_AS:
        raise UsageError(f"--json-as {json_as!r}: valid values are {', '.join(JSON_AS)}")
    if json_as == "struct" and fmt != "parquet":
        raise UsageError("--json-as struct is for Parquet files (CSV and NDJSON hold json as "
                         "it is)")
    if json_as == "struct" and rows_per_file:
        raise UsageError("--json-as struct writes one chunk a file (a struct type comes from "
                         "one chunk's values); leave out --rows-per-file")
    if rows_per_file is not None and rows_per_file < 1:
        raise UsageError("--rows-per-file must be 1 or more")
    src = api.resolve_url(source)
    sql_table = None
    if not src.is_postgres:
        from ..sql_copy.connections import family_of
        from ..sql_copy.plan import SqlName

        fam = family_of(src)  # MySQL/MariaDB or SQLite, else a usage error
        if json_as == "struct":
            raise UsageError("--json-as struct is for PostgreSQL sources; from "
                             f"{'SQLite' if fam == 'sqlite' else 'MySQL/MariaDB'} json columns "
                             "are written as their text")
        sql_table = SqlName.parse(table, fam) if table else None
    state_url = parse(state) if state else api.resolve_url(None)
    if not state_url.is_postgres:
        raise UsageError(f"--state {state_url.masked}: the state store is a PostgreSQL database")
    name = TableName.parse(table) if table and sql_table is None else TableName("", "query")
    shown = sql_table or name
    spec = ExportSpec(
        source=src, state=state_url, table=name, to_dir=to_dir.resolve(),
        job_id=job or (f"export:{shown}" if table else f"export:query:{to_dir.resolve().name}"),
        format=fmt, query=query, key=opt.parse_names(key, "--key"),
        columns=opt.parse_names(columns, "--columns"), where=where,
        rows_per_file=rows_per_file, compression=codec,
        partition_by=opt.parse_names(partition_by, "--partition-by") or (),
        json_as=json_as, restart=restart,
        pacing=opt.pacing(chunk_size, chunk_seconds, max_rate, sleep, max_runtime,
                          min_chunk=min_chunk, max_chunk=max_chunk if max_chunk is not None
                          # a Parquet chunk is held as Arrow while it is written
                          else max(PARQUET_MAX_CHUNK, min_chunk or 0) if fmt == "parquet"
                          else None),
        retry=opt.retry_policy(retries, retry_max_wait), state_schema=state_schema,
        sql_table=sql_table)
    if report:
        opt.check_report_path(report)
    prog = progress_for(progress)
    stop = stop if stop is not None else StopFlag()
    with stop_on_signals(stop):
        # the source's reader (a psycopg connection, or MySQL/SQLite's SQLAlchemy source),
        # how it plans and dry-runs, and how it closes
        reader: Any
        planner: Callable[[ExportSpec, Any], Any]
        dry: Callable[[Any, Any], Result]
        if src.is_postgres:
            reader = export_run.connect_source(src)
            planner, dry, close = export_plan.make_plan, export_run.dry_run, reader.close
        else:
            from . import sql_source

            reader = sql_source.SqlSource(src)
            planner, dry, close = sql_source.make_plan, sql_source.dry_run, reader.dispose
        try:
            plan: Any = planner(spec, reader)
            if dry_run:
                result = dry(plan, reader)
            else:
                export_run.check_directory(spec)
                with JobRun(state_url, spec.job_id, "export", spec.args(),
                            schema=state_schema) as run:
                    result = export_run.execute(plan, run, reader, progress=prog, stop=stop,
                                                report_path=str(report) if report else None)
        finally:
            close()
    if report:
        result.write(report)
    return result

