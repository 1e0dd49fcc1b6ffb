"""Filling a copy's Result from its checkpoint: shared by every copy path."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from .errors import classify
from .model import Checkpoint, Status
from .report import Result, RowError, utc_now

if TYPE_CHECKING:
    from .jobrun import JobRun
    from .progress import Progress
    from .retry import RetryStats
    from .urls import DbUrl

log = logging.getLogger(__name__)


def fail(result: Result, exc: BaseException, message: str) -> None:
    """The run failed with ``exc``: status, one-line message and the error entry."""
    result.status = Status.FAILED
    result.message = message
    result.add_error(RowError(item_identifier="", error_type=type(exc).__name__,
                              category=classify(exc).value, error_message=message))


def add_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Outcome counts added key by key (inserted, updated, …)."""
    return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}


def fill_counts(result: Result, cp: Checkpoint) -> None:
    """The job's totals, outcomes and last checkpoint, as the report shows them."""
    result.processed, result.succeeded = cp.processed, cp.succeeded
    result.failed, result.skipped = cp.failed, cp.skipped
    if cp.outcomes:
        result.metadata["outcomes"] = dict(sorted(cp.outcomes.items()))
    result.total_items = max(result.total_items, cp.processed)
    result.metadata["num_chunks"] = cp.chunk_index
    result.metadata["bytes"] = cp.bytes
    result.last_checkpoint = {"chunk_index": cp.chunk_index, "last_key": cp.last_key_json,
                              "processed_count": cp.processed, "checksum": cp.checksum,
                              "timestamp": cp.updated_at}


def summary_line(result: Result, verb: str | None = None) -> str:
    """The line progress ends with: ``completed: 1,000 rows copied in 2.0s (…)``."""
    verb = verb or {"copy": "copied", "backfill": "updated", "archive": "archived"}.get(
        result.job_type, "processed")
    text = (f"{result.status.value}: {result.succeeded:,} rows {verb} in "
            f"{result.duration_seconds:.1f}s ({result.rows_this_run:,} this run)")
    return f"{text} — {result.message}" if result.message else text


def close(result: Result, cp: Checkpoint | None, retries: RetryStats, started: float,
          run: JobRun, progress: Progress, state: DbUrl, verb: str | None = None) -> Result:
    """The end of every run: the job's counts, retries and timing in the Result, the
    report stored with the run (a state store that cannot be reached is logged, the Result
    still returns), the progress line."""
    from . import pg

    if cp is not None:
        fill_counts(result, cp)
    result.metadata["retry_attempts"] = retries.total
    result.metadata["retries_by_reason"] = dict(retries.by_reason)
    result.duration_seconds = time.monotonic() - started
    result.completed_at = utc_now()
    try:
        run.ensure_connected()
        run.finish(result)
    except Exception as exc:  # the state store may be unreachable; the report still returns
        log.warning("could not store the report of run %s: %s", run.run_id,
                    pg.describe_error(exc, state))
    progress.finish(summary_line(result, verb))
    return result
