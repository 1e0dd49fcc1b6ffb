"""The run of a planned PostgreSQL → PostgreSQL copy: resume or start, the chunk loop,
the finish (sequences, the finished checkpoint) and the Result."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .. import catalog, incremental, pg, run_result
from ..errors import EtlError
from ..model import Checkpoint, Mode, Status
from ..report import Result, utc_now
from ..retry import RetryStats
from ..runner import StepOutcome, StopFlag, run_loop
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
    stop = stop if stop is not None else StopFlag()
    result = Result(job_id=spec.job_id, run_id=run.run_id, job_type="copy", started_at=utc_now())
    result.metadata.update({"source": spec.source.masked, "target": spec.target.masked,
                            "state": spec.state.masked,
                            "chunk_size": spec.pacing.chunk_size or "auto",
                            "key": [k.name for k in plan.key],
                            "copy_format": "binary" if plan.binary else "text"})
    result.artifacts["dead_letters"] = f"{spec.state_schema}.dead_letters (job_id = {spec.job_id!r})"
    result.artifacts["report"] = report_path
    t0 = time.monotonic()
    cp: Checkpoint | None = None
    retries = RetryStats()
    step: CopyStep | None = None
    try:
        prepare_target(tconn, plan)
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
                watermark = incremental.begin(sconn, plan, found[0].watermark if found else None)
                found = None
            else:
                watermark = found[0].watermark
            plan = incremental.restrict(plan, watermark)
            result.metadata["watermark"] = {k: watermark[k] for k in ("column", "from", "next")}
        resuming = found is not None
        cp = found[0] if found else Checkpoint(job_id=spec.job_id, chunk_index=0, last_key=None,
                                               run_id=run.run_id, watermark=watermark)
        run.begin()
        if run.stale_runs_closed:
            log.warning("closed %d run(s) of %s left open by a process that died",
                        run.stale_runs_closed, spec.job_id)
        if resuming and cp.last_key is not None:
            log.info("resuming %s after key %s (chunk %d, %d rows done)", spec.job_id,
                     cp.last_key_json, cp.chunk_index, cp.processed)
        if spec.mode is Mode.REPLACE and not resuming:
            with tconn.transaction():  # emptied once per fresh run, recorded with the checkpoint
                PgCopySink(tconn, spec.target_table, plan.columns).truncate()
                write_checkpoint(tconn if spec.state_in_target else run.store.conn, cp,
                                 schema=spec.state_schema)
        remaining, exact = count_remaining(sconn, plan, cp.last_key)
        progress.start(f"copy {spec.source_name}", cp.processed, cp.processed + remaining, exact)
        result.total_items = cp.processed + remaining
        latest = [cp]  # the last committed checkpoint, also when the loop raises

        def after_chunk(outcome: StepOutcome) -> None:
            latest[0] = _after_chunk(outcome, result, run)

        step = CopyStep(plan, sconn, tconn, run,
                        replay_guard=resuming and not spec.state_in_target
                        and spec.mode in (Mode.APPEND, Mode.REPLACE))
        loop = run_loop(step, cp, spec.pacing, stop=stop, progress=progress,
                        on_chunk=after_chunk,
                        retry=spec.retry, retries=retries)
        cp = loop.checkpoint
        tconn = step.tconn
        result.status, result.message = loop.status, loop.message
        result.rows_this_run = loop.rows
        result.metadata["chunk_size_last"] = loop.last_chunk_size
        if loop.status is Status.COMPLETED:
            _advance_sequences(tconn, spec, result)
            _mark_finished(tconn if spec.state_in_target else run.store.conn, cp, spec)
            result.total_items = cp.processed
            if cp.failed:
                result.status = Status.COMPLETED_WITH_ERRORS
                result.message = (f"{cp.failed:,} row(s) failed and are in the dead letters: "
                                  f"etl dlq list --job {spec.job_id}")
    except KeyboardInterrupt:
        result.status = Status.STOPPED
        result.message = "interrupted; the chunk in flight was rolled back — rerun to resume"
    except EtlError as exc:
        run_result.fail(result, exc, str(exc))
    except Exception as exc:  # driver errors: one line, masked, with SQLSTATE
        run_result.fail(result, exc, pg.describe_error(exc, spec.target))
    finally:
        if step is not None:
            cp = latest[0]
            step.close()
    return run_result.close(result, cp, retries, t0, run, progress, spec.state)


def _after_chunk(outcome: StepOutcome, result: Result, run: JobRun) -> Checkpoint:
    for error in outcome.errors:
        result.add_error(error)
    run.heartbeat()
    return outcome.checkpoint


def _mark_finished(conn: psycopg.Connection, cp: Checkpoint, spec: CopySpec) -> None:
    with conn.transaction():
        write_checkpoint(conn, cp, finished=True, schema=spec.state_schema)


def _advance_sequences(tconn: psycopg.Connection, spec: CopySpec, result: Result) -> None:
    with tconn.transaction():
        moved = catalog.advance_sequences(tconn, spec.target_table)
    if moved:
        log.info("sequences of %s set past the copied values: %s", spec.target_table, moved)
        result.metadata["sequences"] = moved
