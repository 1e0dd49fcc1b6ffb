"""The run of a planned PostgreSQL → PostgreSQL copy: resume or start, the chunk loop,
the finish (sequences, the finished checkpoint) and the Result."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .. import catalog, incremental, lifecycle, pg
from ..model import Checkpoint, Mode
from ..report import Result, utc_now
from ..runner import StopFlag
from ..sinks.pg_copy import PgCopySink
from ..state.store import read_checkpoint, write_checkpoint
from .plan import CopyPlan, CopySpec, count_remaining, prepare_target
from .step import CopyStep

if TYPE_CHECKING:
    import psycopg

    from ..jobrun import JobRun
    from ..progress import Progress

log = logging.getLogger(__name__)


def execute(plan: CopyPlan, run: JobRun, sconn: psycopg.Connection, tconn: psycopg.Connection,
            *, progress: Progress, stop: StopFlag | None = None,
            report_path: str | None = None) -> Result:
    """Run the planned copy under ``run`` (lock held). Failures end in the Result, not raised."""
    spec = plan.spec
    result = Result(job_id=spec.job_id, run_id=run.run_id, job_type="copy", started_at=utc_now())
    result.metadata.update({"source": spec.source.masked, "target": spec.target.masked,
                            "state": spec.state.masked,
                            "chunk_size": spec.pacing.chunk_size or "auto",
                            "key": [k.name for k in plan.key],
                            "copy_format": "binary" if plan.binary else "text"})
    result.artifacts["dead_letters"] = f"{spec.state_schema}.dead_letters (job_id = {spec.job_id!r})"
    result.artifacts["report"] = report_path

    def start() -> lifecycle.Start:
        walk = plan
        prepare_target(tconn, walk)
        # --restart (and a replace after a finished run) start from nothing, but the old
        # checkpoint stays until the first chunk's transaction overwrites it: a restart
        # that fails before then leaves the job resumable as it was
        found = None if spec.restart else read_checkpoint(run.store.conn, spec.job_id,
                                                           spec.state_schema)
        if found is not None and found[1] and spec.mode is Mode.REPLACE:
            found = None  # the last replace finished: this run is a fresh one, and empties again
        watermark: dict[str, Any] | None = None
        if spec.since_column:
            if found is None or found[1] or found[0].watermark is None:
                # a new walk over the rows changed since the last finished one
                watermark = incremental.begin(sconn, walk, found[0].watermark if found else None)
                found = None
            else:
                watermark = found[0].watermark
            walk = incremental.restrict(walk, watermark)
            result.metadata["watermark"] = {k: watermark[k] for k in ("column", "from", "next")}
        resuming = found is not None
        cp = found[0] if found else Checkpoint(job_id=spec.job_id, chunk_index=0, last_key=None,
                                               run_id=run.run_id, watermark=watermark)
        if spec.mode is Mode.REPLACE and not resuming:
            with tconn.transaction():  # emptied once per fresh run, recorded with the checkpoint
                PgCopySink(tconn, spec.target_table, walk.columns).truncate()
                write_checkpoint(tconn if spec.state_in_target else run.store.conn, cp,
                                 schema=spec.state_schema)
        remaining, exact = count_remaining(sconn, walk, cp.last_key)
        step = CopyStep(walk, sconn, tconn, run,
                        replay_guard=resuming and not spec.state_in_target
                        and spec.mode in (Mode.APPEND, Mode.REPLACE))
        return lifecycle.Start(step, cp, resuming, f"copy {spec.source_name}", remaining, exact)

    def finish(begun: lifecycle.Start, cp: Checkpoint) -> None:
        target = begun.step.tconn  # type: ignore[attr-defined]  # reopened after a retry
        _advance_sequences(target, spec, result)
        _mark_finished(target if spec.state_in_target else run.store.conn, cp, spec)

    return lifecycle.execute(run, result, start=start, finish=finish, pacing=spec.pacing,
                             retry=spec.retry, progress=progress,
                             stop=stop if stop is not None else StopFlag(), state=spec.state,
                             describe=lambda exc: pg.describe_error(exc, spec.target))


def _mark_finished(conn: psycopg.Connection, cp: Checkpoint, spec: CopySpec) -> None:
    with conn.transaction():
        write_checkpoint(conn, cp, finished=True, schema=spec.state_schema)


def _advance_sequences(tconn: psycopg.Connection, spec: CopySpec, result: Result) -> None:
    with tconn.transaction():
        moved = catalog.advance_sequences(tconn, spec.target_table)
    if moved:
        log.info("sequences of %s set past the copied values: %s", spec.target_table, moved)
        result.metadata["sequences"] = moved
