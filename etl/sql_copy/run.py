"""Run a planned cross-database copy under its job (``execute``), or describe it (``dry_run``)."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from .. import incremental, lifecycle, pg
from ..autonumber import advance_auto_increment
from ..model import Checkpoint, Mode
from ..report import Result, utc_now
from ..runner import StopFlag
from ..sql_copy_io import describe_error, key_from_json
from ..state.store import read_checkpoint, write_checkpoint
from .plan import SqlCopyPlan, estimate, prepare_target
from .step import EXACT_COUNT_ROWS, SqlCopyStep

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from ..dialects import TableSchema
    from ..jobrun import JobRun
    from ..progress import Progress
    from .connections import Databases

log = logging.getLogger(__name__)

Found = tuple[Checkpoint, bool] | None


def walk_bounds(plan: SqlCopyPlan, found: Found, sconn: Connection
                ) -> tuple[SqlCopyPlan, Found]:
    """--since-column: the plan restricted to the walk's rows, and the checkpoint to resume
    (None when a new walk begins: after a finished one, or on the first run)."""
    if not plan.spec.since_column:
        return plan, found
    if found is None or found[1] or found[0].watermark is None:
        # a new walk over the rows changed since the last finished one
        column = plan.source.column(plan.spec.since_column)
        watermark = incremental.begin_portable(plan.reader(sconn), column,
                                               found[0].watermark if found else None)
        found = None
    else:
        watermark = found[0].watermark
    return dataclasses.replace(plan, watermark=watermark), found


def _resumable(plan: SqlCopyPlan, run_conn: Any) -> Found:
    spec = plan.spec
    found = None if spec.restart else read_checkpoint(run_conn, spec.job_id, spec.state_schema)
    if found is not None and found[1] and spec.mode is Mode.REPLACE:
        found = None  # the last replace finished: this run is a fresh one, and empties again
    return found


def execute(plan: SqlCopyPlan, run: JobRun, dbs: Databases, *, progress: Progress,
            stop: StopFlag | None = None, report_path: str | None = None) -> Result:
    """Run the planned copy under ``run`` (lock held). Failures end in the Result, not raised."""
    spec = plan.spec
    result = Result(job_id=spec.job_id, run_id=run.run_id, job_type="copy", started_at=utc_now())
    result.metadata.update({
        "source": spec.source.masked, "target": spec.target.masked, "state": spec.state.masked,
        "chunk_size": spec.pacing.chunk_size or "auto", "key": list(plan.key),
        "source_database": plan.source_family, "target_database": plan.target_family,
        "copy_format": "text COPY" if plan.target_family == "postgresql" else "executemany"})
    result.artifacts["dead_letters"] = f"{spec.state_schema}.dead_letters (job_id = {spec.job_id!r})"
    result.artifacts["report"] = report_path
    created: list[TableSchema] = []

    def start() -> lifecycle.Start:
        with dbs.target_sa() as tconn:
            created.append(prepare_target(plan, tconn))
        found = _resumable(plan, run.store.conn)
        with dbs.source() as sconn:
            walk, found = walk_bounds(plan, found, sconn)
        if walk.watermark is not None:
            result.metadata["watermark"] = {k: walk.watermark[k] for k in ("column", "from", "next")}
        cp = found[0] if found else Checkpoint(job_id=spec.job_id, chunk_index=0, last_key=None,
                                               run_id=run.run_id, watermark=walk.watermark)
        step = SqlCopyStep(walk, created[0], dbs, run,
                           guard=cp.last_key is not None and found is not None
                           and not spec.state_in_target
                           and spec.mode in (Mode.APPEND, Mode.REPLACE))
        if spec.mode is Mode.REPLACE and cp.last_key is None:
            step.empty_target(cp)  # never once a chunk is recorded: that is a resume
        remaining, exact = step.count_remaining(cp)
        return lifecycle.Start(step, cp, found is not None, f"copy {spec.source_name}",
                               remaining, exact)

    def finish(begun: lifecycle.Start, cp: Checkpoint) -> None:
        with dbs.target_sa() as tconn:  # serial/identity/AUTO_INCREMENT past the copied keys
            moved = advance_auto_increment(tconn, created[0])
        if moved:
            log.info("auto-numbering of %s set past the copied values: %s",
                     spec.target_table, moved)
            result.metadata["sequences"] = moved
        state_conn = begun.step.state_conn  # type: ignore[attr-defined]
        with state_conn.transaction():
            write_checkpoint(state_conn, cp, finished=True, schema=spec.state_schema)

    return lifecycle.execute(run, result, start=start, finish=finish, pacing=spec.pacing,
                             retry=spec.retry, progress=progress,
                             stop=stop if stop is not None else StopFlag(), state=spec.state,
                             describe=lambda exc: describe_error(exc, spec.target))


def dry_run(plan: SqlCopyPlan, sconn: Connection) -> Result:
    """Plan, counts and SQL; reads both databases and the state store, writes nothing."""
    from ..runner import AUTO_FIRST_CHUNK

    spec = plan.spec
    found: Found = None
    if not spec.restart:
        with pg.connect(spec.state, "state", autocommit=True) as stconn:
            found = _resumable(plan, stconn)
    plan, found = walk_bounds(plan, found, sconn)
    cp = found[0] if found else None
    reader = plan.reader(sconn)
    after = key_from_json(cp.last_key_json, plan.key_columns, plan.source_family) \
        if cp is not None and cp.last_key is not None else None
    remaining = reader.count(after, cap=EXACT_COUNT_ROWS + 1)
    exact = remaining <= EXACT_COUNT_ROWS
    if not exact:
        remaining = max(remaining, estimate(sconn, plan))
    sconn.rollback()
    size = spec.pacing.chunk_size or AUTO_FIRST_CHUNK
    about = "" if exact else "~"
    lines = [
        f"job:          {spec.job_id}",
        f"source:       {spec.source.masked}  "
        + (f"query {spec.query}" if spec.query else f"table {spec.table}"),
        f"target:       {spec.target.masked}  table {spec.target_table}"
        + ("" if plan.target_exists else "  (missing: would be created)"),
        f"state store:  {spec.state.masked}  schema {spec.state_schema}"
        + ("  (in the target: checkpoint in each chunk's transaction)" if spec.state_in_target
           else "  (elsewhere: checkpoint after each chunk commits)"),
        f"key:          {', '.join(f'{c.name} {c.type}' for c in plan.key_columns)}",
        f"columns:      {', '.join(f'{c.name} {c.type}' for c in plan.columns)}",
        *([f"renamed:      {', '.join(f'{a} → {b}' for a, b in plan.renamed.items())}"]
          if plan.renamed else []),
        *([f"transform:    {spec.transform_name}"] if spec.transform is not None else []),
        *([f"incremental:  {spec.since_column} from {plan.watermark.get('from')!r} "
           f"(next: {plan.watermark.get('next')!r})"] if plan.watermark is not None else []),
        f"mode:         {spec.mode.value}",
    ]
    if cp is not None and cp.last_key is not None:
        lines.append(f"resume:       after key {cp.last_key_json} (chunk {cp.chunk_index}, "
                     f"{cp.processed:,} rows done)")
    lines.append(f"rows to copy: {about}{remaining:,}; chunk size "
                 + (f"{size:,}" if spec.pacing.chunk_size else
                    f"auto: starts at {size:,} rows and adapts toward "
                    f"{spec.pacing.chunk_seconds:g} s a chunk"))
    if plan.ddl:
        lines.append("target DDL:")
        lines.extend(f"  {stmt};" for stmt in plan.ddl)
    lines += ["chunk read SQL (per chunk):", f"  {' '.join(reader.statement_sql().split())};",
              "chunk write SQL (per chunk" + (", COPY" if plan.target_family == "postgresql"
                                              else ", executemany") + "):",
              f"  {plan.write_sql};", "dry run: nothing was written"]
    return Result.dry_run(spec.job_id, "copy", "\n".join(lines), remaining,
                          estimated_rows=remaining, estimate_exact=exact, chunk_size=size,
                          source=spec.source.masked, target=spec.target.masked)


__all__ = ["dry_run", "execute", "walk_bounds"]
