"""``etl.verify(...)``: check the options, open both sides and compare them range by range
under the job's lock (the CLI's `etl verify` calls exactly this)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import options as opt
from ..errors import EtlError, UsageError
from ..model import Checkpoint, Status
from ..report import Result, utc_now
from ..retry import DEFAULT_RETRIES, DEFAULT_RETRY_MAX_WAIT_SECONDS
from ..runner import DEFAULT_CHUNK_SECONDS, StopFlag, stop_on_signals
from ..state.schema import DEFAULT_SCHEMA
from ..urls import DbUrl, parse
from .plan import DEFAULT_MAX_KEYS, VERIFY_MAX_CHUNK, TableRef, VerifyPlan, VerifySpec

if TYPE_CHECKING:
    from ..jobrun import JobRun
    from ..progress import Progress, ProgressOption


def verify(*, table: str, source: str | DbUrl | None = None,
           target: str | DbUrl | Sequence[str | DbUrl] | None = None,
           to_table: str | Sequence[str] | None = None, key: str | list[str] | None = None,
           columns: str | list[str] | None = None,
           exclude_columns: str | list[str] | None = None, where: str | None = None,
           method: str = "auto", max_keys: int = DEFAULT_MAX_KEYS, job: str | None = None,
           state: str | DbUrl | None = None, state_schema: str = DEFAULT_SCHEMA,
           chunk_size: int | str | None = "auto", chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
           min_chunk: int | None = None, max_chunk: int | None = None,
           max_rate: float | None = None, sleep: float | None = None,
           max_runtime: str | float | None = None, retries: int = DEFAULT_RETRIES,
           retry_max_wait: str | float = DEFAULT_RETRY_MAX_WAIT_SECONDS,
           dry_run: bool = False, restart: bool = False, report: str | Path | None = None,
           progress: ProgressOption = False, stop: StopFlag | None = None) -> Result:
    """Compare ``table`` of ``source`` with ``to_table`` (default: the same name) of
    ``target``, key range by key range; the Result's status is ``completed`` when they hold
    the same rows and ``failed`` (exit 1) when they do not, with each differing key named.

    ``target`` (default: the source database) and ``to_table`` may each be a list: the
    target side is then the union of those tables — one URL for several tables, one table
    name in several databases, or URL and table paired in order — e.g. a live table and its
    archive, compared with a snapshot taken before ``etl archive`` ran. ``key`` (default:
    the source's primary key) orders the rows and cuts the ranges; ``columns`` /
    ``exclude_columns`` choose what is compared (default: all of the source's columns; the
    target may have more); ``where`` (trusted SQL) narrows both sides alike.

    ``method``: ``database`` has the databases count each range and sum the md5 of every
    row's text — PostgreSQL, or MySQL/MariaDB, on both sides (only two numbers a range
    travel); ``values`` reads the rows of each side and
    compares their canonical values in Python (any databases: PostgreSQL, MySQL/MariaDB,
    SQLite — ``1.50`` equals ``1.5``, a timestamptz the UTC DATETIME it was copied into);
    ``auto`` (default) picks ``database`` when every table is PostgreSQL's (or every one
    MySQL/MariaDB's) with the same column types. A range that differs is drilled into down to its keys: ``missing`` (in
    the source only), ``extra`` (in the target only), ``different`` (the columns that
    differ are named, with both values) and ``duplicate`` (in the target twice). The first
    ``max_keys`` are named in the report (``errors``, ``metadata["differing_keys"]``), all are
    counted (``error_categories``). The job is resumable like any other (its checkpoint and
    named differences are kept in ``state``); pacing, retries, ``report``, ``progress``
    and ``stop`` are as for :func:`etl.copy`. ``dry_run`` prints what would be compared.
    """
    from .. import api
    from ..jobrun import JobRun
    from ..progress import progress_for
    from . import plan as verify_plan

    if not table:
        raise UsageError("give --table: the source table to compare")
    if max_keys < 0:
        raise UsageError("--max-keys must be 0 or more")
    src = api.resolve_url(source)
    targets = _target_refs(src, target, to_table, table)
    state_url = parse(state) if state else (
        targets[0].url if targets[0].url.is_postgres else api.resolve_url(None))
    if not state_url.is_postgres:
        raise UsageError(f"--state {state_url.masked}: the state store is a PostgreSQL database")
    spec = VerifySpec(
        source=TableRef(src, table), targets=tuple(targets), state=state_url,
        job_id=job or f"verify:{table}", key=opt.parse_names(key, "--key"),
        columns=opt.parse_names(columns, "--columns"),
        exclude_columns=opt.parse_names(exclude_columns, "--exclude-columns") or (),
        where=where, method=verify_plan.check_method(method), max_keys=max_keys,
        restart=restart,
        pacing=opt.pacing(chunk_size, chunk_seconds, max_rate, sleep, max_runtime,
                          min_chunk=min_chunk, max_chunk=max_chunk if max_chunk is not None
                          else max(VERIFY_MAX_CHUNK, min_chunk or 0)),
        retry=opt.retry_policy(retries, retry_max_wait), state_schema=state_schema)
    if report:
        opt.check_report_path(report)
    prog = progress_for(progress)
    stop = stop if stop is not None else StopFlag()
    with stop_on_signals(stop):
        plan = verify_plan.make_plan(spec)
        try:
            _check_where(plan)
            plan.count()
            if dry_run:
                result = _dry_run(plan)
            else:
                with JobRun(state_url, spec.job_id, "verify", spec.args(),
                            schema=state_schema) as run:
                    result = execute(plan, run, progress=prog, stop=stop,
                                     report_path=str(report) if report else None)
        finally:
            plan.close()
    if report:
        result.write(report)
    return result


def _target_refs(src: DbUrl, target: str | DbUrl | Sequence[str | DbUrl] | None,
                 to_table: str | Sequence[str] | None, table: str) -> list[TableRef]:
    """The target side's tables: URLs and names paired (one of either goes with all)."""
    urls = [parse(t) for t in _listed(target)] or [src]
    names = [n for n in _listed(to_table) if isinstance(n, str)] or [table]
    if len(urls) == 1:
        return [TableRef(urls[0], n) for n in names]
    if len(names) == 1:
        return [TableRef(u, names[0]) for u in urls]
    if len(urls) != len(names):
        raise UsageError(
            f"{len(urls)} --target URLs and {len(names)} --to-table names: give one of "
            "either, or as many of both (each --target goes with the --to-table in the "
            "same position)")
    return [TableRef(u, n) for u, n in zip(urls, names, strict=True)]


def _listed(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, DbUrl)):
        return [value]
    return list(value)


def _check_where(plan: VerifyPlan) -> None:
    """Run each table's range statement once on no rows: a --where that does not run there
    (a typo, a column one side lacks) is a usage error before anything starts."""
    for part in plan.parts:
        try:
            part.digest(None, None, 0)
        except EtlError:
            raise
        except Exception as exc:
            from ..sql_copy_io import describe_error

            what = f"--where {plan.spec.where!r}" if plan.spec.where else "the comparison"
            raise UsageError(f"{what} does not run on {part.label}: "
                             f"{describe_error(exc)}") from exc


def execute(plan: VerifyPlan, run: JobRun, *, progress: Progress, stop: StopFlag | None = None,
            report_path: str | None = None) -> Result:
    """Run the planned verification under ``run`` (lock held); failures end in the Result."""
    from .. import lifecycle
    from ..sql_copy_io import describe_error
    from ..state.store import read_checkpoint, write_checkpoint
    from .step import KINDS, VerifyStep, listed_errors

    spec = plan.spec
    result = Result(job_id=spec.job_id, run_id=run.run_id, job_type="verify",
                    started_at=utc_now())
    result.metadata.update(_describe(plan))
    result.artifacts["report"] = report_path
    step = VerifyStep(plan, run)

    def start() -> lifecycle.Start:
        store = run.store.conn
        found = None if spec.restart else read_checkpoint(store, spec.job_id, spec.state_schema)
        resuming = found is not None and not found[1]
        if found is not None and resuming:
            cp = dataclasses.replace(found[0], run_id=run.run_id)
            for error in listed_errors(cp):
                result.add_error(error)
        else:
            cp = Checkpoint(job_id=spec.job_id, chunk_index=0, last_key=None,
                            run_id=run.run_id, watermark={})
            with store.transaction():
                write_checkpoint(store, cp, schema=spec.state_schema)
        step.latest = cp
        remaining = max(plan.estimated_rows - cp.processed, 0)
        return lifecycle.Start(step, cp, resuming, f"verify {spec.source.table}", remaining,
                               plan.exact)

    def finish(begun: lifecycle.Start, cp: Checkpoint) -> None:
        with run.store.conn.transaction():
            write_checkpoint(run.store.conn, cp, finished=True, schema=spec.state_schema)

    def verdict(res: Result, cp: Checkpoint) -> None:
        counts = {k: cp.outcomes[k] for k in KINDS if cp.outcomes.get(k)}
        res.error_categories = counts
        if counts:
            res.status = Status.FAILED
            res.message = (f"the target differs from the source: "
                           f"{', '.join(f'{n:,} {k}' for k, n in counts.items())} — the keys "
                           f"are listed in the report (etl report {run.run_id})")
        else:
            res.status, res.message = Status.COMPLETED, None

    return lifecycle.execute(run, result, start=start, finish=finish, pacing=spec.pacing,
                             retry=spec.retry, progress=progress,
                             stop=stop if stop is not None else StopFlag(), state=spec.state,
                             describe=describe_error, verb="matched",
                             verdict=verdict)


def _describe(plan: VerifyPlan) -> dict[str, Any]:
    spec = plan.spec
    return {"source": spec.source.url.masked, "target": spec.targets[0].url.masked,
            "source_table": plan.source.label, "target_tables": [t.label for t in plan.targets],
            "method": plan.method, "key": plan.key, "columns": plan.columns,
            "columns_not_compared": plan.ignored, "where": spec.where}


def _dry_run(plan: VerifyPlan) -> Result:
    spec = plan.spec
    lines = [f"verify:       {plan.source.label}",
             f"against:      {' ∪ '.join(t.label for t in plan.targets)}",
             f"key:          {', '.join(plan.key)}",
             f"columns:      {', '.join(plan.columns)}",
             f"method:       {plan.method} — " + (
                 "each database counts a range and sums the md5 of each row"
                 if plan.method == "database" else
                 "rows are read and their canonical values compared in Python"),
             f"rows:         {'' if plan.exact else '~'}{plan.estimated_rows:,} in the source"]
    if spec.where:
        lines.append(f"where:        {spec.where}")
    for label, cols in plan.ignored.items():
        lines.append(f"not compared: {label}: {', '.join(cols)}")
    return Result.dry_run(spec.job_id, "verify", "\n".join(lines), plan.estimated_rows,
                          **_describe(plan))


__all__ = ["execute", "verify"]
