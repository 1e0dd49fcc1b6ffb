"""`etl load` of CSV, NDJSON and Parquet files into a MySQL/MariaDB or SQLite table, in
resumable chunks, exactly once, with the rows that cannot be loaded set aside.

The PostgreSQL path (``etl.load_job``) lets PostgreSQL parse and convert; here Python does
(``etl.load_parse``, ``etl.load_values``: every value converted to its column's type, a
value that does not convert makes its row a dead letter), and the rows are written with
executemany, one target transaction a chunk, refused rows isolated by bisection in
savepoints (``etl.load_sql_step``).

The state store (``--state``, else the embedded PostgreSQL) is another database, so the
checkpoint cannot commit with the chunk there. The target keeps the job's position itself
(``etl_load_checkpoints``, with the chunk's dead letters in ``etl_load_rejects``:
``etl.load_sql_target``), upserted in each chunk's transaction; it is authoritative for
where a rerun resumes, and the state store gets the checkpoint, the dead letters and the
report right after each commit. A run first brings the state store up to the target's
row (``sync_state``), so a crash between the two commits neither duplicates nor loses a
row or a dead letter.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import lifecycle
from .dialects import Family, PortableColumn, TableSchema, reflect_table, write_sql
from .errors import TargetError, UsageError
from .load_formats import (
    CsvOptions,
    FileFormat,
    LoadOptions,
    check_unchanged,
    errors_of,
    file_format,
    file_identities,
    position_of,
)
from .load_sql_step import PIECE_ROWS, SqlLoadStep, sync_state
from .load_sql_target import (
    FILES_KEY,
    LOAD_ID_KEY,
    POSITIONS_TABLE,
    REJECTS_TABLE,
    TargetDb,
    check_transactional,
    ensure_tables,
    has_tables,
    read_position,
)
from .model import Checkpoint, Mode
from .report import Result, utc_now
from .retry import RetryPolicy
from .runner import Pacing, StopFlag, stop_on_signals
from .sql_copy.plan import SqlName
from .sql_copy_io import describe_error
from .state.store import read_checkpoint
from .thresholds import ErrorLimits
from .urls import DbUrl, parse

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from .jobrun import JobRun
    from .progress import Progress, ProgressOption

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SqlLoadSpec(LoadOptions):
    """Everything `etl load` into MySQL/SQLite was asked to do, checked."""

    table: SqlName


@dataclass(frozen=True)
class SqlLoadPlan:
    spec: SqlLoadSpec
    table: TableSchema                    # the target table, reflected
    columns: tuple[PortableColumn, ...]   # the columns the files fill, in file order
    conflict_key: tuple[str, ...]         # upsert/ignore
    format: FileFormat
    family: Family
    write_sql: str                        # for --dry-run


def default_job(tgt: DbUrl, table: SqlName) -> str:
    """``load:TABLE@DATABASE``: the state store is shared by many targets, so the name says
    which (as `etl copy` names its jobs into MySQL/SQLite)."""
    from sqlalchemy.engine import make_url

    u = make_url(tgt.raw)
    if u.get_backend_name() == "sqlite":
        where = f"sqlite:///{os.path.abspath(u.database)}" if u.database else "sqlite://"
    else:
        where = f"{u.get_backend_name()}://{u.host or 'localhost'}:{u.port or 3306}/{u.database}"
    return f"load:{table}@{where}"


def make_plan(spec: SqlLoadSpec, conn: Connection, fam: Family) -> SqlLoadPlan:
    """Check the files and the target table; the columns come from --columns, the files
    (a CSV header, a Parquet schema), or the table (in its order)."""
    import sqlalchemy as sa

    from .load_parse import check_parquet_types, python_codec
    from .sql_copy.plan import _unique_keys

    for f in spec.files:
        if not f.is_file():
            raise UsageError(f"{f}: no such file")
    fmt = file_format(spec.format, spec.csv)
    if fmt.name == "csv":
        python_codec(spec.csv.encoding)
    name = spec.table
    if not sa.inspect(conn).has_table(name.name, schema=name.schema):
        conn.rollback()
        raise UsageError(f"--table {name}: no such table in {spec.target.masked}; etl load "
                         "writes into an existing table — create it first")
    table = reflect_table(conn, name.name, schema=name.schema, role="target")
    check_transactional(conn, name.name, name.schema)
    by_name = {c.name: c for c in table.columns}
    names = fmt.file_columns(spec.files, spec.columns) or tuple(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UsageError(f"{spec.files[0]}: column(s) {', '.join(unknown)} are not in "
                         f"{name} ({', '.join(by_name)}); {fmt.rename_hint}")
    if fmt.name == "parquet":
        for f in spec.files:
            check_parquet_types(f, names)
    conflict: tuple[str, ...] = ()
    if spec.mode in (Mode.UPSERT, Mode.IGNORE):
        candidates = ([table.primary_key] if table.primary_key else []) + \
            _unique_keys(conn, name)
        usable = [k for k in candidates if set(k) <= set(names)]
        if not usable:
            conn.rollback()
            raise UsageError(f"--mode {spec.mode.value} matches rows on a primary key or unique "
                             f"index of {name} among the loaded columns; there is none")
        conflict = tuple(usable[0])
    sql = write_sql(conn.dialect, name.name, names, mode=spec.mode, key=conflict,
                    schema=name.schema)
    conn.rollback()
    return SqlLoadPlan(spec, table, tuple(by_name[n] for n in names), conflict, fmt, fam, sql)


def execute(plan: SqlLoadPlan, run: JobRun, db: TargetDb, state: DbUrl, *,
            progress: Progress, stop: StopFlag | None = None,
            report_path: str | None = None) -> Result:
    """Run the planned load under ``run`` (lock held); failures end in the Result."""
    spec = plan.spec
    result = Result(job_id=spec.job_id, run_id=run.run_id, job_type="load", started_at=utc_now())
    result.metadata.update({"target": spec.target.masked, "state": state.masked,
                            "table": str(spec.table), "files": [str(f) for f in spec.files],
                            "format": spec.format, "mode": spec.mode.value,
                            "columns": [c.name for c in plan.columns],
                            "chunk_size": spec.pacing.chunk_size or "auto",
                            "positions": f"{POSITIONS_TABLE} (job_id = {spec.job_id!r}) in "
                                         "the target"})
    result.artifacts["dead_letters"] = f"{spec.state_schema}.dead_letters (job_id = {spec.job_id!r})"
    result.artifacts["rejects"] = str(spec.rejects) if spec.rejects else None
    result.artifacts["report"] = report_path

    def start() -> lifecycle.Start:
        conn = db.connect()
        try:
            ensure_tables(conn)
            stored = read_position(conn, spec.job_id)
            conn.rollback()
            if stored is not None:
                for error in errors_of(sync_state(conn, run, stored, plan)):
                    result.add_error(error)  # a crashed run's, recorded only now
            elif not spec.restart:
                _refuse_lost_position(run, spec)
            resume = stored if stored is not None and not stored.finished \
                and not spec.restart else None
            if resume is not None:
                check_unchanged(spec.files, resume.files)
                cp = resume.checkpoint
                step = SqlLoadStep(plan, db, run, conn, resume.load_id)
            else:  # a fresh load: a new load id, the first row (replace: the table emptied)
                load_id = str(uuid.uuid4())
                cp = Checkpoint(job_id=spec.job_id, chunk_index=0, last_key=None,
                                run_id=run.run_id,
                                watermark={FILES_KEY: file_identities(spec.files),
                                           LOAD_ID_KEY: load_id})
                step = SqlLoadStep(plan, db, run, conn, load_id)
                step.begin(cp)
        except BaseException:
            conn.close()
            raise
        index, at = position_of(cp)
        left, exact = plan.format.rows_left(spec.files, index, at)
        return lifecycle.Start(step, cp, resume is not None, f"load {spec.table}", left,
                               exact=exact)

    def finish(begun: lifecycle.Start, cp: Checkpoint) -> None:
        step = begun.step
        assert isinstance(step, SqlLoadStep)
        step.finish(cp)

    return lifecycle.execute(run, result, start=start, finish=finish, pacing=spec.pacing,
                             retry=spec.retry, progress=progress,
                             stop=stop if stop is not None else StopFlag(), state=state,
                             describe=lambda exc: describe_error(exc, spec.target))


def _refuse_lost_position(run: JobRun, spec: SqlLoadSpec) -> None:
    """The state store has an unfinished load of the job but the target has no row for it:
    the table was dropped (or this is another database) — which rows are loaded is unknown."""
    found = read_checkpoint(run.store.conn, spec.job_id, spec.state_schema)
    if found is not None and not found[1] and found[0].chunk_index > 0:
        raise TargetError(
            f"job {spec.job_id} has an unfinished load in the state store (chunk "
            f"{found[0].chunk_index}, {found[0].processed:,} rows) but {spec.target.masked} "
            f"has no row for it in {POSITIONS_TABLE} (was the table dropped?), so which rows "
            "are in the table is unknown. Rerun with --restart to load every file from the "
            "start (empty the table first, or use --mode replace or upsert), or give another "
            "--job")


def plan_result(plan: SqlLoadPlan, conn: Connection) -> Result:
    """The files, the columns they fill, where a rerun would resume and the SQL of each
    statement; nothing is written (not even the position table)."""
    spec = plan.spec
    stored = None
    if has_tables(conn):
        stored = read_position(conn, spec.job_id)
        conn.rollback()
    start = Checkpoint(job_id=spec.job_id, chunk_index=0, last_key=None)
    resuming = stored is not None and not stored.finished and not spec.restart
    if resuming:
        assert stored is not None
        start = stored.checkpoint
    index, at = position_of(start)
    rows, exact = plan.format.rows_left(spec.files, index, at)
    lines = [f"job:          {spec.job_id}", f"target:       {spec.target.masked}  table {spec.table}",
             f"mode:         {spec.mode.value}", f"format:       {plan.format.name}", "files:"]
    lines += [f"  {f}  ({f.stat().st_size:,} bytes)" for f in spec.files]
    lines += [f"columns:      {', '.join(f'{c.name} {c.type}' for c in plan.columns)}"]
    if resuming:
        lines.append(f"resume:       {spec.files[index]} at {plan.format.where} {at.line:,} "
                     f"(chunk {start.chunk_index}, {start.processed:,} rows done)")
    lines += [f"rows:         {'' if exact else '~'}{rows:,} ({plan.format.rows_note()})",
              "values:       parsed and converted in Python to each column's type; a value "
              "that does not convert is a dead letter",
              f"per chunk:    {plan.write_sql}  (executemany, in statements of {PIECE_ROWS:,} "
              f"rows), with the job's row of {POSITIONS_TABLE} and its dead letters in "
              f"{REJECTS_TABLE}, in one transaction",
              "dry run: nothing was written"]
    return Result.dry_run(spec.job_id, "load", "\n".join(lines), rows, estimated_rows=rows,
                          columns=[c.name for c in plan.columns])


def load(files: tuple[Path, ...], fmt: str, target: DbUrl, *, table: str, csv: CsvOptions,
         mode: Mode, columns: tuple[str, ...] | None, rejects: Path | None, job: str | None,
         state: str | DbUrl | None, state_schema: str, pacing: Pacing, retry: RetryPolicy,
         limits: ErrorLimits, lock_timeout: float | None, date_order: str | None = None,
         dry_run: bool = False, restart: bool = False, report: str | Path | None = None,
         progress: ProgressOption = False, stop: StopFlag | None = None) -> Result:
    """`etl load` into MySQL/MariaDB or SQLite (``etl.load`` checks the options and calls
    this for a target that is not PostgreSQL)."""
    from . import api
    from . import options as opt
    from .jobrun import JobRun
    from .progress import progress_for

    state_url = parse(state) if state else None
    if state_url is not None and not state_url.is_postgres:
        raise UsageError(f"--state {state_url.masked}: the state store must be PostgreSQL")
    db = TargetDb(target, lock_timeout)
    name = SqlName.parse(table, db.family)
    spec = SqlLoadSpec(target=target, table=name, files=files,
                       job_id=job or default_job(target, name), mode=mode, format=fmt,
                       csv=csv, columns=columns, rejects=rejects, restart=restart,
                       pacing=pacing, retry=retry, limits=limits, lock_timeout=lock_timeout,
                       state_schema=state_schema, date_order=date_order)
    if report:
        opt.check_report_path(report)
    prog = progress_for(progress)
    stop = stop if stop is not None else StopFlag()
    try:
        with stop_on_signals(stop):
            with db.connect() as conn:
                plan = make_plan(spec, conn, db.family)
                if dry_run:
                    return plan_result(plan, conn)
            state_url = state_url or api.resolve_url(None)
            if rejects:
                rejects.parent.mkdir(parents=True, exist_ok=True)
            with JobRun(state_url, spec.job_id, "load", spec.args(), schema=state_schema) as run:
                result = execute(plan, run, db, state_url, progress=prog, stop=stop,
                                 report_path=str(report) if report else None)
    finally:
        db.dispose()
    if report:
        result.write(report)
    return result


__all__ = ["SqlLoadPlan", "SqlLoadSpec", "default_job", "execute", "load", "make_plan",
           "plan_result"]
