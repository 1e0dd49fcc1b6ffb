"""The life of one run of any job, around its chunk loop: the part every job shares.

    result = Result(job_id=…, run_id=run.run_id, job_type="copy", started_at=utc_now())
    return lifecycle.execute(run, result, start=start, finish=finish, …)

``start()`` does what is particular to the job before its first chunk (create the
target, read or reset the checkpoint, count the rows) and returns a ``Start``: the
step, the checkpoint to continue from, the progress label and the rows left. Then
the run is recorded, the chunks run (``etl.runner.run_loop``: retries, pacing,
stop at a chunk boundary), ``finish(cp)`` closes a completed job (sequences, the
finished checkpoint), and whatever happens — completion, a stop, a failure, an
interrupt — ends in the Result and in the stored report; nothing is raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import run_result
from .errors import EtlError
from .model import Checkpoint, Status
from .observe import notify
from .retry import RetryPolicy, RetryStats
from .runner import Pacing, Step, StepOutcome, StopFlag, run_loop

if TYPE_CHECKING:
    from .jobrun import JobRun
    from .progress import Progress
    from .replica import ReplicaGuard
    from .report import Result
    from .urls import DbUrl

log = logging.getLogger(__name__)


@dataclass
class Start:
    """A job ready for its first chunk."""

    step: Step                # also has close(); may have committed() and metadata()
    checkpoint: Checkpoint    # where to continue (a fresh one for a new run)
    resuming: bool            # the checkpoint is an earlier run's
    label: str                # for progress, e.g. "copy public.events"
    remaining: int            # rows left after the checkpoint
    exact: bool = True        # ``remaining`` is a count, not an estimate
    rows_before: int = 0      # rows this run did before the loop (in ``checkpoint`` already)


def execute(run: JobRun, result: Result, *, start: Callable[[], Start],
            finish: Callable[[Start, Checkpoint], None], pacing: Pacing, retry: RetryPolicy,
            progress: Progress, stop: StopFlag, state: DbUrl,
            describe: Callable[[BaseException], str], verb: str | None = None,
            replica: ReplicaGuard | None = None,
            verdict: Callable[[Result, Checkpoint], None] | None = None) -> Result:
    """Run a job under ``run`` (its lock held) to the end of its Result (see the module).
    ``replica`` holds each chunk back while a streaming replica lags (``etl.replica``).
    ``verdict`` judges a job that went through all its chunks (its status and message),
    instead of "completed, with errors when rows failed"."""
    t0 = time.monotonic()
    retries = RetryStats()
    begun: Start | None = None
    latest: Checkpoint | None = None
    first = 0
    try:
        run.begin()
        paused = run.paused_at()
        if paused is not None:  # paused by `etl pause`: no chunk until `etl resume`
            result.status = Status.PAUSED
            result.message = (f"job {run.job_id} is paused (etl pause, {paused}); `etl resume "
                              f"{run.job_id}` goes on")
            run.handled()
            return _closed(run_result.close(result, None, retries, t0, run, progress, state,
                                            verb))
        if run.stale_runs_closed:
            log.warning("closed %d run(s) of %s left open by a process that died",
                        run.stale_runs_closed, run.job_id)
        begun = start()
        cp = latest = begun.checkpoint
        notify("on_start", run.job_id, run.run_id, result.job_type, cp)
        first = cp.processed - begun.rows_before
        if begun.resuming and cp.last_key is not None:
            log.info("resuming %s after key %s (chunk %d, %d rows done)", run.job_id,
                     cp.last_key_json, cp.chunk_index, cp.processed)
        progress.start(begun.label, cp.processed, cp.processed + begun.remaining, begun.exact)
        result.total_items = cp.processed + begun.remaining
        total = result.total_items
        run.heartbeat(live(cp, total, begun.exact, first, t0, 0, retries.total))

        def after_chunk(outcome: StepOutcome) -> None:
            nonlocal latest, total
            for error in outcome.errors:
                result.add_error(error)
            if outcome.total is not None:
                total = outcome.total
            latest = outcome.checkpoint
            run.heartbeat(live(latest, total, begun.exact if begun else True, first, t0,
                               outcome.rows, retries.total))
            log.info("chunk %d: %d rows in %.2fs", latest.chunk_index, outcome.rows,
                     outcome.seconds or 0.0,
                     extra={"job": run.job_id, "run": run.run_id, "chunk": latest.chunk_index,
                            "rows": outcome.rows, "duration": round(outcome.seconds or 0.0, 4),
                            "retries": retries.total})
            notify("on_chunk", run.job_id, outcome)

        loop = run_loop(begun.step, cp, pacing, stop=stop, progress=progress,
                        on_chunk=after_chunk, retry=retry, retries=retries,
                        before_chunk=replica.wait if replica is not None else None,
                        control=run.control)
        latest = loop.checkpoint
        result.status, result.message = loop.status, loop.message
        result.rows_this_run = loop.rows + begun.rows_before
        result.metadata["chunk_size_last"] = loop.last_chunk_size
        if loop.status in (Status.PAUSED, Status.CANCELLED):
            run.handled()
        if loop.status is Status.COMPLETED:
            finish(begun, loop.checkpoint)
            result.total_items = loop.checkpoint.processed
            if verdict is not None:
                verdict(result, loop.checkpoint)
            elif loop.checkpoint.failed:
                result.status = Status.COMPLETED_WITH_ERRORS
                result.message = (f"{loop.checkpoint.failed:,} row(s) failed and are in the dead "
                                  f"letters: etl dlq list --job {run.job_id}")
    except KeyboardInterrupt:
        result.status = Status.STOPPED
        result.message = "interrupted; the chunk in flight was rolled back — rerun to resume"
    except EtlError as exc:
        run_result.fail(result, exc, str(exc))
    except Exception as exc:  # driver errors: one line, masked, with the SQLSTATE
        run_result.fail(result, exc, describe(exc))
    finally:
        if latest is not None:  # also when the run ended early: the chunks it committed
            result.rows_this_run = max(result.rows_this_run, latest.processed - first)
        if begun is not None:
            metadata: Callable[[], dict[str, Any]] | None = getattr(begun.step, "metadata", None)
            if metadata is not None:
                result.metadata.update(metadata())
            begun.step.close()  # type: ignore[attr-defined]
        if replica is not None:
            result.metadata.update(replica.metadata())
            replica.close()
    return _closed(run_result.close(result, latest, retries, t0, run, progress, state, verb))


def _closed(result: Result) -> Result:
    notify("on_finish", result)
    log.info("%s %s", result.job_id, result.status.value,
             extra={"job": result.job_id, "run": result.run_id, "status": result.status.value,
                    "rows": result.rows_this_run})
    return result


def live(cp: Checkpoint, total: int, exact: bool, first: int, t0: float, chunk_rows: int,
         retries: int) -> dict[str, Any]:
    """A running job's progress, as `etl status` shows it (written by the heartbeats)."""
    from .report import utc_now

    done = cp.processed
    total = max(total, done)
    rate = (done - first) / max(time.monotonic() - t0, 1e-9)
    return {"processed": done, "total": total, "exact": exact,
            "rows_per_second": round(rate, 1),
            "eta_seconds": round((total - done) / rate, 1) if rate > 0 else None,
            "chunk_index": cp.chunk_index, "chunk_rows": chunk_rows, "failed": cp.failed,
            "retries": retries, "last_key": cp.last_key_json, "checkpoint_at": utc_now()}


__all__ = ["Start", "execute", "live"]
