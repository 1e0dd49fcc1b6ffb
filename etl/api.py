"""The command functions: check options, build the job, run it, return a Result.

The CLI calls exactly these functions; scripts can too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import options as opt
from .errors import UsageError
from .model import Mode, TableName
from .progress import progress_for
from .replica import DEFAULT_MAX_LAG_SECONDS
from .report import Result
from .retry import DEFAULT_RETRIES, DEFAULT_RETRY_MAX_WAIT_SECONDS
from .runner import DEFAULT_CHUNK_SECONDS, StopFlag, stop_on_signals
from .state.schema import DEFAULT_SCHEMA
from .table_copy import DEFAULT_LOCK_TIMEOUT_SECONDS
from .thresholds import DEFAULT_MAX_ERROR_RATE, ErrorLimits
from .urls import DbUrl, parse

if TYPE_CHECKING:
    import psycopg

    from . import table_copy
    from .progress import ProgressOption


def resolve_url(url: str | DbUrl | None) -> DbUrl:
    """A URL as given, or the embedded PostgreSQL's (started on demand) when none is."""
    if url:
        return parse(url)
    from . import embedded

    return parse(embedded.ensure_url())


def copy(*, table: str | list[str] | None = None, all_tables: bool = False,
         exclude: str | list[str] | None = None, source: str | DbUrl | None = None,
         target: str | DbUrl | None = None, to_table: str | None = None,
         query: str | None = None, since_column: str | None = None,
         rename_columns: str | dict[str, str] | None = None, transform: str | Callable[[Any], Any] | None = None, key: str | list[str] | None = None,
         columns: str | list[str] | None = None, where: str | None = None,
         mode: str | Mode = Mode.APPEND, create: bool = True, job: str | None = None,
         state: str | DbUrl | None = None, state_schema: str = DEFAULT_SCHEMA,
         chunk_size: int | str | None = "auto", chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
         min_chunk: int | None = None, max_chunk: int | None = None,
         max_rate: float | None = None, sleep: float | None = None,
         max_runtime: str | float | None = None, retries: int = DEFAULT_RETRIES,
         retry_max_wait: str | float = DEFAULT_RETRY_MAX_WAIT_SECONDS,
         lock_timeout: str | float | None = DEFAULT_LOCK_TIMEOUT_SECONDS,
         max_errors: int | None = None, max_error_rate: float | None = DEFAULT_MAX_ERROR_RATE,
         dry_run: bool = False, restart: bool = False,
         report: str | Path | None = None, progress: ProgressOption = False,
         stop: StopFlag | None = None) -> Result:
    """Copy ``table`` from ``source`` to ``target`` in keyset chunks; resumable.

    Each chunk is one target transaction that also writes the job's checkpoint
    (when the state store is in the target database, the default), so a
    crash at any instant leaves both or neither. Running the same job again
    resumes after the last committed chunk; ``restart=True`` starts over.

    Options mirror `etl copy`: ``source``/``target`` are URLs (None: the embedded
    PostgreSQL), ``table``/``to_table`` are ``[schema.]name``; several tables (a list,
    or ``all_tables=True`` minus the ``exclude`` glob patterns) are copied parents
    first, one job each, and the Result sums them (``metadata["tables"]`` holds each
    table's report); ``query`` (instead of
    ``table``, with ``to_table`` and ``key``) copies a query's result, resumable on
    its key; ``transform`` is ``"module:function"`` or a callable taking and returning a
    ``polars.DataFrame`` per chunk; ``rename_columns`` is ``"snake_case"``, ``"lower"``,
    ``"Old=new,…"`` or a dict (target column names); ``since_column`` makes the job incremental (each
    run copies the rows whose column is at or past the last finished run's maximum) (see :mod:`etl.transforms`: rows with a reason in
    ``_reject`` become dead letters of category ``validation``); ``key``/``columns``
    are ``"a,b"`` or lists, ``chunk_size`` an int or ``"auto"`` (which aims each chunk at
    ``chunk_seconds``, between ``min_chunk`` and ``max_chunk`` rows), ``max_runtime``
    seconds or a duration such as ``"5m"``. A chunk that fails transiently (lost
    connection, deadlock, lock timeout …) is retried up to ``retries`` times with
    exponential backoff and jitter capped at ``retry_max_wait``, reconnecting when
    needed; ``lock_timeout`` bounds each wait for a lock on the target (None: no
    limit). Rows that fail with a data error (a constraint, a value too long …) are
    isolated by bisecting their chunk and become dead letters while the other rows
    commit; ``max_errors`` / ``max_error_rate`` (over at least 1,000 rows) stop the
    run when crossed. ``progress`` is False (silent, the
    default), True (bar or lines on stderr), or any object with the
    :class:`etl.progress.Progress` methods. ``stop`` is a :class:`etl.runner.StopFlag`
    another thread may set to stop at the next chunk boundary.

    Raises :class:`etl.UsageError` (bad options) or another :class:`etl.EtlError`
    when the job cannot start (unreachable database, missing table, job locked).
    Once running, failures end in the returned Result (``status`` ``failed``).
    """
    options = dict(locals())  # first: the call's options, nothing else
    from .jobrun import JobRun

    tables = [table] if isinstance(table, str) else list(table or [])
    if all_tables or len(tables) > 1:
        return _copy_many(tables, options)
    table = tables[0] if tables else None
    parsed_mode = opt.parse_mode(mode)
    pacing = opt.pacing(chunk_size, chunk_seconds, max_rate, sleep, max_runtime,
                       min_chunk=min_chunk, max_chunk=max_chunk)
    retry = opt.retry_policy(retries, retry_max_wait)
    src = resolve_url(source)
    tgt = resolve_url(target)
    loaded: Callable[[Any], Any] | None = None
    transform_name: str | None = None
    if isinstance(transform, str):
        from . import transforms

        loaded, transform_name = transforms.load(transform), transform
    elif transform is not None:
        loaded = transform
        transform_name = f"{getattr(transform, '__module__', '?')}:" \
                         f"{getattr(transform, '__qualname__', repr(transform))}"
    if since_column and opt.parse_mode(mode) is Mode.REPLACE:
        raise UsageError("--since-column copies changed rows into the target; it cannot be "
                         "combined with --mode replace (use upsert)")
    if bool(table) == bool(query):
        raise UsageError("give either --table or --query (with --to-table and --key)")
    if query and not to_table:
        raise UsageError("--query needs --to-table: the name of the table to write its rows to")
    if not (src.is_postgres and tgt.is_postgres):
        # MySQL/MariaDB or SQLite on either side: the portable job (etl.sql_copy)
        from . import sql_copy

        return sql_copy.copy(options, src=src, tgt=tgt, table=table, mode=parsed_mode,
                             pacing=pacing, retry=retry, transform=loaded,
                             transform_name=transform_name)
    state_url = parse(state) if state else tgt
    if not state_url.is_postgres:
        raise UsageError(f"--state {state_url.masked}: the state store must be PostgreSQL")
    dst_table = TableName.parse(to_table) if to_table else TableName.parse(table or "")
    src_table = TableName.parse(table) if table else dst_table
    if not query and src.same_database(tgt) and src_table == dst_table:
        raise UsageError(f"source and target are the same table ({src_table} in {src.masked}); "
                         "pass another --target database or --to-table")
    from . import pg, table_copy

    spec = table_copy.CopySpec(
        source=src, target=tgt, state=state_url, table=src_table, target_table=dst_table,
        job_id=job or f"copy:{dst_table}", key=opt.parse_names(key, "--key"),
        columns=opt.parse_names(columns, "--columns"), where=where or None, mode=parsed_mode,
        create=create, restart=restart, pacing=pacing, retry=retry,
        limits=ErrorLimits(max_errors=max_errors, max_error_rate=max_error_rate),
        lock_timeout=opt.parse_duration(lock_timeout, "--lock-timeout"), state_schema=state_schema,
        query=query or None, since_column=since_column or None,
        rename_columns=rename_columns or None, transform=loaded, transform_name=transform_name,
    )
    if report:
        opt.check_report_path(report)
    prog = progress_for(progress)
    stop = stop if stop is not None else StopFlag()
    # SIGINT/SIGTERM from here on stop the run at a chunk boundary (exit 4), even when they
    # arrive while connecting or planning
    with stop_on_signals(stop):
        sconn = pg.connect(spec.source, "source", autocommit=True)
        try:
            tconn = pg.connect(spec.target, "target", autocommit=True,
                               settings=spec.target_settings)
            try:
                plan = table_copy.make_plan(spec, sconn, tconn)
                if dry_run:
                    return _dry_run(plan, sconn)
                with JobRun(state_url, spec.job_id, "copy", spec.args(),
                            schema=state_schema) as run:
                    result = table_copy.execute(plan, run, sconn, tconn, progress=prog, stop=stop,
                                                report_path=str(report) if report else None)
            finally:
                tconn.close()
        finally:
            sconn.close()
    if report:
        result.write(report)
    return result


def _copy_many(tables: list[str], options: dict[str, Any]) -> Result:
    """Several tables (``--table`` repeated or ``--all-tables``): parents first, one job each."""
    import time

    from . import multi, pg

    if options["all_tables"] and tables:
        raise UsageError("give --table(s) or --all-tables, not both")
    for name in ("to_table", "query", "job", "since_column"):
        if options[name]:
            raise UsageError(f"--{name.replace('_', '-')} names one table's copy; it cannot be "
                             "used with several tables (run one copy per table)")
    src = resolve_url(options["source"])
    excluded = opt.parse_names(options["exclude"], "--exclude") or ()
    if src.is_postgres:
        with pg.connect(src, "source", autocommit=True) as conn:
            names = (multi.all_tables(conn, options["state_schema"]) if options["all_tables"]
                     else [TableName.parse(t) for t in tables])
            names = multi.excluding(names, excluded)
            ordered = multi.parents_first(conn, names) if names else []
    else:  # MySQL/MariaDB, SQLite: tables and foreign keys by SQLAlchemy reflection
        _, ordered = multi.sqla_tables(src.raw, None if options["all_tables"] else tables)
        ordered = multi.excluding(ordered, excluded)
    if not ordered:
        raise UsageError("no table to copy: --all-tables found none (or --exclude "
                         "removed them all)")
    stop = options["stop"] if options["stop"] is not None else StopFlag()
    deadline = None
    if options["max_runtime"] is not None:
        deadline = time.monotonic() + (opt.parse_duration(options["max_runtime"], "--max-runtime")
                                       or 0)
    report = options["report"]
    if report:
        opt.check_report_path(report)

    position = {t: i for i, t in enumerate(ordered, start=1)}

    def copy_one(t: TableName) -> Result:
        from .progress import OneOfMany

        left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        name = str(t) if src.is_postgres else t.name  # the others: the URL's database
        shown = OneOfMany(progress_for(options["progress"]), position[t], len(ordered))
        return copy(**{**options, "table": name, "all_tables": False, "exclude": None,
                       "report": None, "stop": stop, "max_runtime": left,
                       "source": src, "progress": shown})

    with stop_on_signals(stop):
        result = multi.copy_tables(
            ordered, copy_one,
            stopped=lambda: bool(stop) or (deadline is not None and time.monotonic() >= deadline))
    if report:
        result.write(report)
    return result


def _dry_run(plan: table_copy.CopyPlan, sconn: psycopg.Connection) -> Result:
    """Plan, counts and SQL; reads both databases and the state store, writes nothing."""
    from . import pg, table_copy
    from .runner import AUTO_FIRST_CHUNK
    from .state.store import read_checkpoint

    spec = plan.spec
    cp = None
    if not spec.restart:
        with pg.connect(spec.state, "state", autocommit=True) as stconn:
            found = read_checkpoint(stconn, spec.job_id, spec.state_schema)
            cp = found[0] if found else None
    remaining, exact = table_copy.count_remaining(sconn, plan, cp.last_key if cp else None)
    size = spec.pacing.chunk_size or AUTO_FIRST_CHUNK
    text = table_copy.describe_plan(plan, cp, remaining, exact, size)
    return Result.dry_run(spec.job_id, "copy", text, remaining, estimated_rows=remaining,
                          estimate_exact=exact, chunk_size=size, source=spec.source.masked,
                          target=spec.target.masked)


def _store_query(state: str | DbUrl | None, schema: str, fn):
    from . import pg
    from .state.store import StateStore

    url = resolve_url(state)
    with pg.connect(url, "state", autocommit=True) as conn:
        store = StateStore(conn, schema)
        if not store.exists():
            return None
        return fn(store)


def status(job: str | None = None, *, state: str | DbUrl | None = None,
           state_schema: str = DEFAULT_SCHEMA, stale_after: float | None = None) -> list[dict]:
    """Every job (or one) with its status (``running``, ``stale`` — a running run whose
    heartbeat is older than ``stale_after`` seconds, default 15 —, ``paused``, ``completed``
    …), its last run with its live progress (rows done of total, rows/s, ETA, chunk,
    errors, retries, last key), heartbeat age and its checkpoint."""
    from .state.store import STALE_AFTER_SECONDS

    after = STALE_AFTER_SECONDS if stale_after is None else stale_after
    return _store_query(state, state_schema, lambda s: s.jobs(job, after)) or []


def runs(job: str | None = None, *, state: str | DbUrl | None = None,
         state_schema: str = DEFAULT_SCHEMA, limit: int = 20) -> list[dict]:
    """The most recent runs, newest first."""
    return _store_query(state, state_schema, lambda s: s.runs(job, limit)) or []


def report(run_id: str, *, state: str | DbUrl | None = None,
           state_schema: str = DEFAULT_SCHEMA) -> dict:
    """The stored report of one run (the same document as --json printed)."""
    from .errors import UsageError as _UsageError

    doc = _store_query(state, state_schema, lambda s: s.report(run_id))
    if doc is None:
        raise _UsageError(f"no run {run_id!r} in the state store; `etl runs` lists the runs")
    return doc


def backfill(*, table: str, set: str, target: str | DbUrl | None = None,  # noqa: A002
             where: str | None = None, key: str | list[str] | None = None,
             job: str | None = None, state: str | DbUrl | None = None,
             state_schema: str = DEFAULT_SCHEMA, chunk_size: int | str | None = "auto",
             chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
             min_chunk: int | None = None, max_chunk: int | None = None,
             max_rate: float | None = None, sleep: float | None = None,
             max_runtime: str | float | None = None, retries: int = DEFAULT_RETRIES,
             retry_max_wait: str | float = DEFAULT_RETRY_MAX_WAIT_SECONDS,
             lock_timeout: str | float | None = DEFAULT_LOCK_TIMEOUT_SECONDS,
             replica: str | DbUrl | None = None, max_lag: str | float = DEFAULT_MAX_LAG_SECONDS,
             timezone: str = "UTC",
             dry_run: bool = False, restart: bool = False, report: str | Path | None = None,
             progress: ProgressOption = False, stop: StopFlag | None = None) -> Result:
    """Update ``table`` in ``target`` (PostgreSQL) chunk by chunk: ``SET set`` on the rows
    ``where`` selects, in keyset chunks of the key (``key``, else the primary key).

    Each chunk's UPDATE and the job's checkpoint commit in one short transaction, so
    every row is updated exactly once across crashes and reruns, even when ``set`` is
    not idempotent; the state store is therefore the target database (``state`` may
    only name it). ``set`` and ``where`` are trusted SQL; ``set`` may not assign a key
    column. ``replica`` (a streaming standby's URL) holds each chunk back while it lags
    more than ``max_lag`` (seconds or a duration). ``timezone`` (default UTC) is the
    session's time zone, in which ``set`` and ``where`` read timestamps. Pacing, retries, ``lock_timeout``,
    ``dry_run``, ``restart``, ``report``, ``progress`` and ``stop`` are as for :func:`copy`.
    """
    from . import backfill_job, pg
    from .jobrun import JobRun

    pacing = opt.pacing(chunk_size, chunk_seconds, max_rate, sleep, max_runtime,
                       min_chunk=min_chunk, max_chunk=max_chunk)
    retry = opt.retry_policy(retries, retry_max_wait)
    tgt = resolve_url(target)
    if not tgt.is_postgres:
        raise UsageError(f"etl backfill works on PostgreSQL tables; {tgt.masked} is "
                         f"{tgt.backend}")
    if state and not parse(state).same_database(tgt):
        raise UsageError("--state: a backfill keeps its checkpoint in the table's own database "
                         "(in each chunk's transaction, so no row is updated twice); leave "
                         "--state out or name the target database")
    if not set or not set.strip():
        raise UsageError('--set is required: e.g. --set "status = \'archived\'"')
    name = TableName.parse(table)
    spec = backfill_job.BackfillSpec(
        target=tgt, table=name, job_id=job or f"backfill:{name}", set_sql=set,
        where=where or None, key=opt.parse_names(key, "--key"), restart=restart, pacing=pacing,
        retry=retry, lock_timeout=opt.parse_duration(lock_timeout, "--lock-timeout"),
        state_schema=state_schema, timezone=opt.check_timezone(timezone))
    if report:
        opt.check_report_path(report)
    prog = progress_for(progress)
    stop = stop if stop is not None else StopFlag()
    with stop_on_signals(stop):
        conn = pg.connect(tgt, "target", autocommit=True, settings=spec.settings)
        try:
            plan = backfill_job.make_plan(spec, conn)
            if dry_run:
                return _dry_run_backfill(plan, conn)
            guard = replica_guard(replica, max_lag)
            with JobRun(tgt, spec.job_id, "backfill", spec.args(), schema=state_schema) as run:
                result = backfill_job.execute(plan, run, conn, progress=prog, stop=stop,
                                              report_path=str(report) if report else None,
                                              replica=guard)
        finally:
            conn.close()
    if report:
        result.write(report)
    return result


def replica_guard(replica: str | DbUrl | None, max_lag: str | float | None) -> Any:
    """The ``--replica``/``--max-lag`` guard of a job (None without ``--replica``), checked:
    the URL must reach a server in recovery."""
    if not replica:
        return None
    from .replica import ReplicaGuard

    lag = opt.parse_duration(max_lag, "--max-lag")
    guard = ReplicaGuard(parse(replica), DEFAULT_MAX_LAG_SECONDS if lag is None else lag)
    guard.check()
    return guard


def _dry_run_backfill(plan: Any, conn: psycopg.Connection) -> Result:
    from . import backfill_job
    from .runner import AUTO_FIRST_CHUNK
    from .state.store import read_checkpoint

    spec = plan.spec
    found = None if spec.restart else read_checkpoint(conn, spec.job_id, spec.state_schema)
    cp = found[0] if found else None
    remaining, exact = backfill_job.count_remaining(conn, plan, cp.last_key if cp else None)
    size = spec.pacing.chunk_size or AUTO_FIRST_CHUNK
    return Result.dry_run(
        spec.job_id, "backfill", backfill_job.describe_plan(plan, cp, remaining, exact, size),
        remaining, estimated_rows=remaining, estimate_exact=exact, chunk_size=size,
        target=spec.target.masked)
