"""`etl copy` across databases: PostgreSQL, MySQL/MariaDB and SQLite in every direction.

The same job as ``etl.table_copy`` (PostgreSQL → PostgreSQL), on portable
pieces: the source (a table, or a ``--query``'s result) is read in keyset chunks
by ``SqlaKeysetSource`` (canonical Python values), optionally reshaped by a
``--transform`` (``etl.transforms``), and each chunk is written in one target
transaction by a target of ``etl.sql_copy_io`` (COPY into PostgreSQL,
executemany into MySQL/SQLite) under the target's column names
(``--rename-columns``, ``etl.naming``); bad rows are isolated by bisection in
savepoints of that transaction, and the checkpoint (the source's raw last key,
as exact JSON; with ``--since-column`` the walk's watermark, ``etl.incremental``)
is written:

- in the chunk's own transaction when the state store is in the target (a
  PostgreSQL target, the default): a crash leaves both or neither;
- right after the chunk commits otherwise (MySQL/SQLite targets keep their state
  in the embedded PostgreSQL or ``--state``): a crash in between leaves a chunk
  committed without its checkpoint. Upsert and ignore rewrite it harmlessly; a
  resumed append/replace run first deletes, chunk by chunk, the target rows whose
  keys it is about to write, until a chunk finds none (the crashed chunk ended).

Modules: ``plan`` (options resolved, both databases read), ``connections``,
``step`` (one chunk), ``run`` (the job's run and the dry run).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..model import Mode
from ..retry import RetryPolicy
from ..runner import Pacing, StopFlag, stop_on_signals
from ..thresholds import ErrorLimits
from ..urls import DbUrl, parse
from .connections import Databases, family_of
from .plan import SqlCopyPlan, SqlCopySpec, SqlName, make_plan
from .run import dry_run, execute

if TYPE_CHECKING:
    from ..report import Result
    from ..transforms import Transform


def copy(options: dict[str, Any], *, src: DbUrl, tgt: DbUrl, table: str | None, mode: Mode,
         pacing: Pacing, retry: RetryPolicy, transform: Transform | None = None,
         transform_name: str | None = None) -> Result:
    """`etl copy` when either database is not PostgreSQL (called by ``etl.api.copy`` with its
    options, already checked and parsed where ``api.copy`` does that for both paths)."""
    from .. import options as opt
    from ..api import resolve_url
    from ..jobrun import JobRun
    from ..progress import progress_for

    query = options.get("query") or None
    sfam, tfam = family_of(src), family_of(tgt)
    state_url = parse(options["state"]) if options.get("state") else \
        (tgt if tgt.is_postgres else resolve_url(None))
    if not state_url.is_postgres:
        raise UsageError(f"--state {state_url.masked}: the state store must be PostgreSQL")
    # the target's own default schema (public; the URL's database) unless --to-table says
    if table:
        src_table = SqlName.parse(table, sfam)
        dst_table = SqlName.parse(options["to_table"] or src_table.name, tfam)
    else:  # --query: its rows are named after the target table
        src_table = dst_table = SqlName.parse(options["to_table"], tfam)
    if not query and src.same_database(tgt) and src_table == dst_table:
        raise UsageError(f"source and target are the same table ({src_table} in {src.masked}); "
                         "pass another --target database or --to-table")
    spec = SqlCopySpec(
        source=src, target=tgt, state=state_url, table=src_table, target_table=dst_table,
        job_id=options["job"] or _default_job(tgt, dst_table),
        key=opt.parse_names(options["key"], "--key"),
        columns=opt.parse_names(options["columns"], "--columns"),
        where=options["where"] or None, mode=mode, create=options["create"],
        restart=options["restart"], pacing=pacing, retry=retry,
        limits=ErrorLimits(max_errors=options["max_errors"],
                           max_error_rate=options["max_error_rate"]),
        lock_timeout=opt.parse_duration(options["lock_timeout"], "--lock-timeout"),
        state_schema=options["state_schema"], query=query, transform=transform,
        transform_name=transform_name, since_column=options.get("since_column") or None,
        rename_columns=options.get("rename_columns") or None)
    report = options["report"]
    if report:
        opt.check_report_path(report)
    prog = progress_for(options["progress"])
    stop = options["stop"] if options["stop"] is not None else StopFlag()
    with stop_on_signals(stop):
        dbs = Databases(spec, dry_run=bool(options["dry_run"]))
        try:
            with dbs.source() as sconn, dbs.target_sa() as tconn:
                plan = make_plan(spec, sconn, tconn)
                if options["dry_run"]:
                    return dry_run(plan, sconn)
            with JobRun(state_url, spec.job_id, "copy", spec.args(),
                        schema=spec.state_schema) as run:
                result = execute(plan, run, dbs, progress=prog, stop=stop,
                                 report_path=str(report) if report else None)
        finally:
            dbs.dispose()
    if report:
        result.write(report)
    return result


def _default_job(tgt: DbUrl, table: SqlName) -> str:
    """``copy:SCHEMA.TABLE`` for a PostgreSQL target (as etl.table_copy names it); elsewhere the
    state store is shared by many targets, so the name says which: ``copy:TABLE@DATABASE``."""
    if tgt.is_postgres:
        return f"copy:{table}"
    from sqlalchemy.engine import make_url

    u = make_url(tgt.raw)
    if u.get_backend_name() == "sqlite":
        where = f"sqlite:///{os.path.abspath(u.database)}" if u.database else "sqlite://"
    else:
        where = f"{u.get_backend_name()}://{u.host or 'localhost'}:{u.port or 3306}/{u.database}"
    return f"copy:{table}@{where}"


__all__ = ["SqlCopyPlan", "SqlCopySpec", "SqlName", "copy", "execute", "make_plan"]
