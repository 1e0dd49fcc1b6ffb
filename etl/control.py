"""`etl pause|resume|cancel JOB`: steer a job from another process, through the state store.

A request is a row of ``control_requests``; a running job asks for pending ones before
each chunk (``etl.jobrun.JobRun.control``), so a request takes effect at the next chunk
boundary — the chunk in flight commits or rolls back whole:

- ``pause``: the run stops (status ``paused``, exit 4) and the job stays paused — a later
  run (cron's, say) stops at once the same way — until ``resume``;
- ``resume``: the pause is lifted and, for a job started from the command line, the job
  is run again with the arguments it was started with (kept in the state store, with
  passwords masked: a job whose URLs carried one on the command line must be rerun by
  hand, or take its URLs from ``ETL_SOURCE_URL``/``ETL_TARGET_URL``/``ETL_STATE_URL``);
- ``cancel``: the run stops (status ``cancelled``, exit 4); its checkpoint stays, so a
  rerun resumes and ``--restart`` starts over. Cancelling a paused job lifts the pause.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .state.schema import DEFAULT_SCHEMA

if TYPE_CHECKING:
    from .state.store import StateStore
    from .urls import DbUrl


@dataclass(frozen=True)
class ControlResult:
    """What a control request found and did."""

    job_id: str
    action: str
    running: tuple[str, int, str] | None    # (host, pid, started) of the run it goes to
    message: str
    argv: list[str] | None = None           # resume: the command line to run the job again
    args: dict[str, Any] = field(default_factory=dict)


def _job(store: StateStore, job_id: str) -> dict[str, Any]:
    """The job's stored arguments; a usage error for a job the store does not know."""
    found = store.job_args(job_id)
    if found is None:
        raise UsageError(f"no job {job_id!r} in the state store; `etl status` lists the jobs "
                         "(give --state if they are kept elsewhere)")
    return found


def _with_store(state: str | DbUrl | None, schema: str, fn: Any) -> ControlResult:
    from . import api

    result = api._store_query(state, schema, fn)
    if result is None:
        raise UsageError("the state store holds no jobs yet (give --state if they are kept "
                         "elsewhere)")
    return result  # type: ignore[no-any-return]


def pause(job: str, *, state: str | DbUrl | None = None,
          state_schema: str = DEFAULT_SCHEMA) -> ControlResult:
    """Ask ``job`` to pause at its next chunk boundary; it stays paused until :func:`resume`."""
    def go(store: StateStore) -> ControlResult:
        _job(store, job)
        running = store.running_run(job)
        store.request(job, "pause")
        where = (f"its run on {running[0]} (pid {running[1]}) stops at the next chunk boundary"
                 if running else "it is not running; its next run will not start")
        return ControlResult(job, "pause", running,
                             f"pause requested for {job}: {where}; `etl resume {job}` goes on")
    return _with_store(state, state_schema, go)


def cancel(job: str, *, state: str | DbUrl | None = None,
           state_schema: str = DEFAULT_SCHEMA) -> ControlResult:
    """Ask ``job``'s running run to stop at its next chunk boundary (status cancelled); a
    paused job is unpaused. Refused when the job neither runs nor is paused."""
    def go(store: StateStore) -> ControlResult:
        _job(store, job)
        running = store.running_run(job)
        paused = store.paused_at(job)
        if running is None and paused is None:
            raise UsageError(f"job {job} is not running and not paused: nothing to cancel")
        if running is not None:
            store.request(job, "cancel")
            message = (f"cancel requested for {job}: its run on {running[0]} (pid "
                       f"{running[1]}) stops at the next chunk boundary")
        else:
            message = f"{job} was paused; it is not any more"
        if paused is not None:
            store.request(job, "resume")  # a cancelled job is not paused
        return ControlResult(job, "cancel", running, message + "; its checkpoint stays (a "
                             "rerun resumes, --restart starts over)")
    return _with_store(state, state_schema, go)


def resume(job: str, *, state: str | DbUrl | None = None,
           state_schema: str = DEFAULT_SCHEMA) -> ControlResult:
    """Lift ``job``'s pause; the result's ``argv`` is the command line to run it again with
    (None for a job started from Python: call it again; or when a password was on it)."""
    def go(store: StateStore) -> ControlResult:
        args = _job(store, job)
        running = store.running_run(job)
        if running is not None:
            raise UsageError(f"job {job} is running (on {running[0]}, pid {running[1]}); "
                             "nothing to resume")
        store.request(job, "resume")
        argv = args.get("argv")
        if argv and args.get("argv_had_secret"):
            return ControlResult(job, "resume", None,
                                 f"{job} is no longer paused, but it was started with a "
                                 "password on the command line, which is not stored: run it "
                                 f"again yourself (etl {' '.join(argv)})", None, args)
        if not argv:
            return ControlResult(job, "resume", None, f"{job} is no longer paused; it was "
                                 "started from Python: call it again to go on", None, args)
        return ControlResult(job, "resume", None, f"{job} is no longer paused; running it "
                             f"again: etl {' '.join(argv)}", list(argv), args)
    return _with_store(state, state_schema, go)


__all__ = ["ControlResult", "cancel", "pause", "resume"]
