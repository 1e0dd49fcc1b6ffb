"""``etl.archive(...)``: check the options, build the spec and the plan, run it under the
job's lock and return the Result (the CLI's `etl archive` calls exactly this)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import options as opt
from ..errors import UsageError
from ..model import TableName
from ..options import DEFAULT_LOCK_TIMEOUT_SECONDS
from ..replica import DEFAULT_MAX_LAG_SECONDS
from ..report import Result
from ..retry import DEFAULT_RETRIES, DEFAULT_RETRY_MAX_WAIT_SECONDS
from ..runner import DEFAULT_CHUNK_SECONDS, StopFlag, stop_on_signals
from ..state.schema import DEFAULT_SCHEMA
from ..urls import DbUrl, parse

if TYPE_CHECKING:
    from ..progress import Progress, ProgressOption
    from .plan import ArchiveSpec


def archive(*, table: str, where: str, source: str | DbUrl | None = None,
            to: str | DbUrl | None = None, to_table: str | None = None,
            to_dir: str | Path | None = None, format: str | None = None, purge: bool = False,
            no_delete: bool = False, key: str | list[str] | None = None, create: bool = True,
            job: str | None = None, state: str | DbUrl | None = None,
            state_schema: str = DEFAULT_SCHEMA, chunk_size: int | str | None = "auto",
            chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
            min_chunk: int | None = None, max_chunk: int | None = None,
            max_rate: float | None = None,
            sleep: float | None = None, max_runtime: str | float | None = None,
            retries: int = DEFAULT_RETRIES,
            retry_max_wait: str | float = DEFAULT_RETRY_MAX_WAIT_SECONDS,
            lock_timeout: str | float | None = DEFAULT_LOCK_TIMEOUT_SECONDS,
            replica: str | DbUrl | None = None,
            max_lag: str | float = DEFAULT_MAX_LAG_SECONDS, timezone: str = "UTC",
            drop_partitions: bool = False,
            dry_run: bool = False, restart: bool = False, report: str | Path | None = None,
            progress: ProgressOption = False, stop: StopFlag | None = None) -> Result:
    """Move the rows of ``table`` matching ``where`` into an archive table, in keyset chunks.

    ``to_table`` names the archive table: in the source database (each chunk is ONE source
    transaction: ``WITH moved AS (DELETE … RETURNING …) INSERT …`` and the checkpoint), or
    with ``to`` in another PostgreSQL or a MySQL/MariaDB database (each chunk is written
    there idempotently and committed, then deleted from the source with the checkpoint: a
    crash in between leaves the rows in both, and the rerun keeps the archive's identical
    copies and deletes them). A MySQL/MariaDB ``source`` is archived into a table of its own
    database (or purged), one MySQL transaction a chunk; its state store is ``state`` or the
    embedded PostgreSQL.
    ``to_dir`` writes each chunk to a file in that directory instead (``format`` ``parquet``,
    the default, or ``csv``): fsynced and renamed, listed in the directory's manifest with its
    rows and sha256, and only then deleted from the source with the checkpoint.
    ``purge=True`` deletes without archiving; ``no_delete=True`` archives without deleting.
    ``drop_partitions=True`` (a partitioned table, into a table of the same database or
    purged) first archives and drops each partition all of whose rows match ``where``, in
    one transaction per partition, and walks the rest by chunks.
    A missing archive table is created from the source's definition (``create=False``
    refuses instead).

    The table is walked by its primary key (or ``key``, ``"a,b"``; composite keys as row
    values); ``where`` (trusted SQL) is applied, parenthesised, inside every chunk, so only
    rows matching when their chunk runs move. ``lock_timeout`` bounds each wait for a row
    lock (a timeout rolls the chunk back and retries it); ``timezone`` (default UTC) is the
    sessions' time zone, in which ``where``'s timestamps and ``now()::date`` are read;
    ``chunk_size``, ``chunk_seconds``, ``sleep``, ``max_rate`` and ``max_runtime`` pace the
    job as for :func:`etl.copy`. The
    state store is the source database unless ``state`` names another PostgreSQL; the job
    is ``archive:SCHEMA.TABLE`` unless ``job`` is given. A rerun of an unfinished job
    resumes after its checkpoint; a run after a finished one starts a new walk.

    Raises :class:`etl.UsageError` (bad options) or another :class:`etl.EtlError` when the
    job cannot start (unreachable database, missing table, job locked: exit 75). Once
    running, failures end in the returned Result (``status`` ``failed``).
    """
    from .. import api, pg
    from ..jobrun import JobRun
    from ..progress import progress_for
    from .plan import make_plan
    from .run import dry_run as plan_only
    from .run import execute

    if not where or not where.strip():
        raise UsageError("--where is required: archive takes the rows matching it "
                         "(e.g. --where \"created_at < now() - interval '90 days'\"; "
                         "--where true takes every row)")
    if purge and no_delete:
        raise UsageError("--purge deletes without archiving and --no-delete archives without "
                         "deleting: give one of them")
    if purge and (to or to_table or to_dir):
        raise UsageError("--purge deletes the rows without archiving them: drop --to/--to-table/"
                         "--to-dir, or drop --purge to archive them")
    if to_dir and (to or to_table):
        raise UsageError("--to-dir writes the rows to files: drop --to/--to-table, or drop "
                         "--to-dir to archive into a table")
    if format and not to_dir:
        raise UsageError("--format is the format of --to-dir files: add --to-dir DIR, or drop "
                         "--format")
    if not purge and not to and not to_table and not to_dir:
        raise UsageError("say where the rows go: --to-table T (a table in the same database), "
                         "--to URL [--to-table T] (another PostgreSQL or a MySQL/MariaDB "
                         "database), --to-dir DIR "
                         "[--format parquet|csv] (files), or --purge (delete them)")
    from ..sinks.files import check_format
    from .plan import Action, ArchiveSpec

    file_format = check_format(format) if to_dir else "parquet"

    action = Action.PURGE if purge else Action.NO_DELETE if no_delete else Action.MOVE
    pacing = opt.pacing(chunk_size, chunk_seconds, max_rate, sleep, max_runtime,
                       min_chunk=min_chunk, max_chunk=max_chunk)
    retry = opt.retry_policy(retries, retry_max_wait)
    src = api.resolve_url(source)
    dest = parse(to) if to else src
    from_mysql = src.backend in ("mysql", "mariadb")
    # the state store: the source when it is PostgreSQL, else the embedded PostgreSQL
    state_url = parse(state) if state else api.resolve_url(None) if from_mysql else src
    if not src.is_postgres and not from_mysql:
        raise UsageError(f"--source {src.masked}: etl archive reads PostgreSQL and "
                         f"MySQL/MariaDB tables, not {src.backend}")
    if not state_url.is_postgres:
        raise UsageError(f"--state {state_url.masked}: the state store is a PostgreSQL database")
    to_sql = not dest.is_postgres
    if to_sql and dest.backend not in ("mysql", "mariadb"):
        raise UsageError(f"--to {dest.masked}: an archive goes to PostgreSQL or MySQL/MariaDB "
                         f"(or to files with --to-dir), not {dest.backend}")
    if to_dir and not from_mysql and not state_url.same_database(src):
        raise UsageError(f"--to-dir needs the state store in the source database (drop --state "
                         f"{state_url.masked}): each chunk's checkpoint must commit with its "
                         "delete, or a crash in between could not tell which files are archived")
    src_table = TableName.parse(table, "" if from_mysql else "public")
    archive_table = None if purge or to_dir else TableName.parse(to_table) if to_table else src_table
    dest_table = None
    if to_sql:
        from ..sql_copy.plan import SqlName

        dest_table = SqlName.parse(to_table or src_table.name, "mysql")
    spec = ArchiveSpec(
        source=src, dest=dest, state=state_url, table=src_table, archive_table=archive_table,
        job_id=job or f"archive:{src_table if src_table.schema else src_table.name}",
        where=where, action=action,
        key=opt.parse_names(key, "--key"), create=create, restart=restart, pacing=pacing,
        retry=retry, lock_timeout=opt.parse_duration(lock_timeout, "--lock-timeout"),
        state_schema=state_schema, to_dir=Path(to_dir) if to_dir else None,
        file_format=file_format, timezone=opt.check_timezone(timezone), dest_table=dest_table,
        drop_partitions=drop_partitions)
    if report:
        opt.check_report_path(report)
    prog = progress_for(progress)
    stop = stop if stop is not None else StopFlag()
    if from_mysql:
        result = _archive_mysql(spec, replica, dry_run=dry_run, progress=prog, stop=stop,
                                report=report)
        if report:
            result.write(report)
        return result
    with stop_on_signals(stop):  # SIGINT/SIGTERM: stop at a chunk boundary (exit 4)
        sconn = pg.connect(src, "source", autocommit=True, settings=spec.settings)
        dconn = None
        sql_dest = None
        try:
            if to_sql:
                from .sql_dest import SqlArchive

                sql_dest = SqlArchive(spec, dry_run=dry_run)
            elif not spec.same_database:
                dconn = pg.connect(dest, "target", autocommit=True, settings=spec.settings)
            plan = make_plan(spec, sconn, dconn, sql_dest)
            if drop_partitions:
                from .partitions import check_options, leaves

                check_options(plan)
                leaves(sconn, plan)  # refuses a table that is not partitioned
                sconn.rollback()
            if dry_run:
                return plan_only(plan, sconn)
            guard = api.replica_guard(replica, max_lag)  # --replica: chunks wait while it lags
            with JobRun(state_url, spec.job_id, "archive", spec.args(),
                        schema=state_schema) as run:
                result = execute(plan, run, sconn, dconn, progress=prog, stop=stop,
                                 report_path=str(report) if report else None, replica=guard)
        finally:
            sconn.close()
            if dconn is not None:
                dconn.close()
            if sql_dest is not None:
                sql_dest.close()
    if report:
        result.write(report)
    return result


def _archive_mysql(spec: ArchiveSpec, replica: object, *, dry_run: bool, progress: Progress,
                   stop: StopFlag, report: str | Path | None) -> Result:
    """A MySQL/MariaDB source (etl.archive.mysql_source): same-database table or --purge."""
    from ..jobrun import JobRun
    from ..sql_copy.connections import Databases
    from . import mysql_source

    mysql_source.check_options(spec, replica)
    dbs = Databases(mysql_source.copy_spec(spec), dry_run=dry_run)
    try:
        plan = mysql_source.make_plan(spec, dbs)
        if dry_run:
            return mysql_source.dry_run(plan, dbs)
        with stop_on_signals(stop), JobRun(spec.state, spec.job_id, "archive", spec.args(),
                                           schema=spec.state_schema) as run:
            return mysql_source.execute(plan, run, dbs, progress=progress, stop=stop,
                                        report_path=str(report) if report else None)
    finally:
        dbs.dispose()
