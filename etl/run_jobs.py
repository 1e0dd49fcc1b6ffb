"""``etl.run_file(path)``: run the jobs a TOML file declares (``etl.jobfile``), in order,
each through its library function; one combined Result, whose exit code is the worst of
the jobs'."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EtlError, UsageError
from .model import Status
from .report import Result, utc_now

if TYPE_CHECKING:
    from .jobfile import JobSpec
    from .progress import ProgressOption
    from .runner import StopFlag

# From best to worst: completed, with dead letters, stopped, locked, failed, usage.
SEVERITY = (0, 3, 4, 75, 1, 2)
_STATUS_OF_CODE = {0: Status.COMPLETED, 3: Status.COMPLETED_WITH_ERRORS, 4: Status.STOPPED}


def worst(codes: list[int]) -> int:
    return max(codes, key=lambda c: SEVERITY.index(c) if c in SEVERITY else len(SEVERITY),
               default=0)


def check_file(path: str | Path, *, env: Mapping[str, str] | None = None) -> list[JobSpec]:
    """The file's jobs in the order they run; ``etl.jobfile.JobFileError`` (a UsageError)
    lists every mistake with its line. Connects to nothing."""
    from . import jobfile

    return jobfile.load(path, env)


def run_file(path: str | Path, *, job: str | None = None, dry_run: bool = False,
             env: Mapping[str, str] | None = None, progress: ProgressOption = False,
             stop: StopFlag | None = None, report: str | Path | None = None) -> Result:
    """Run the jobs of the TOML file ``path`` in order (each after the jobs it
    ``depends_on``; a job whose dependency did not complete is skipped), or only ``job``.
    ``${VAR}`` in values come from ``env`` (default: the environment). The Result sums the
    jobs (``metadata["jobs"]`` holds each one's report); its exit code is the worst of
    theirs (usage 2 > failed 1 > locked 75 > stopped 4 > dead letters 3 > completed 0).
    A stop (``stop``, SIGTERM) ends the current job at a chunk boundary and runs no more."""
    from . import options as opt
    from .runner import StopFlag as Flag
    from .runner import stop_on_signals

    jobs = check_file(path, env=env)
    if job is not None:
        names = [j.name for j in jobs]
        if job not in names:
            raise UsageError(f"{path} declares no job {job!r}; its jobs are: "
                             f"{', '.join(names)}")
        jobs = [j for j in jobs if j.name == job]
    if report:
        opt.check_report_path(report)
    stop = stop if stop is not None else Flag()
    combined = Result(job_id=f"run:{Path(path).name}", run_id=str(uuid.uuid4()),
                      job_type="run", started_at=utc_now())
    docs: list[dict[str, Any]] = []
    codes: list[int] = []
    ended: dict[str, bool] = {}  # job -> it completed (with or without dead letters)
    with stop_on_signals(stop):
        for spec in jobs:
            blocked = [d for d in spec.depends_on if d in ended and not ended[d]]
            if stop or blocked:
                why = (f"not run: {', '.join(blocked)} did not complete" if blocked
                       else "not run: stopped before it")
                docs.append({"job_id": spec.name, "command": spec.command,
                             "status": "skipped", "message": why})
                ended[spec.name] = False
                continue
            code, doc = _run_one(spec, dry_run=dry_run, progress=progress, stop=stop)
            codes.append(code)
            docs.append(doc)
            ended[spec.name] = code in (0, 3)
            _add(combined, doc)
    code = worst(codes)
    combined.status = _STATUS_OF_CODE.get(code, Status.FAILED)
    combined.exit_code_override = code
    combined.completed_at = utc_now()
    combined.metadata["jobs"] = docs
    combined.metadata["file"] = str(path)
    failed = [d["job_id"] for d in docs if d["status"] not in ("completed",
                                                                "completed_with_errors")]
    if failed:
        combined.message = f"{len(failed)} of {len(docs)} job(s) did not complete: " + \
            ", ".join(f"{d['job_id']} ({d['status']})" for d in docs
                      if d["job_id"] in failed)
    if report:
        combined.write(report)
    return combined


def _run_one(spec: JobSpec, *, dry_run: bool, progress: ProgressOption,
             stop: StopFlag) -> tuple[int, dict[str, Any]]:
    """One job through its library function: (exit code, its report)."""
    from .jobfile import functions

    fn = functions()[spec.command]
    kwargs = dict(spec.options)
    if dry_run:
        kwargs["dry_run"] = True
    try:
        if spec.command == "load":
            files = kwargs.pop("files")
            result = fn(files, job=spec.name, progress=progress, stop=stop, **kwargs)
        else:
            result = fn(job=spec.name, progress=progress, stop=stop, **kwargs)
    except EtlError as exc:
        return exc.exit_code, {"job_id": spec.name, "command": spec.command,
                               "status": "failed", "message": str(exc),
                               "exit_code": exc.exit_code}
    doc = result.to_dict()
    doc["command"] = spec.command
    doc["exit_code"] = result.exit_code
    return result.exit_code, doc


def _add(combined: Result, doc: dict[str, Any]) -> None:
    s = doc.get("summary")
    if not s:
        return
    combined.total_items += s["total_items"]
    combined.processed += s["processed"]
    combined.succeeded += s["succeeded"]
    combined.failed += s["failed"]
    combined.skipped += s["skipped"]
    combined.rows_this_run += doc["metadata"].get("rows_this_run", 0)
    combined.duration_seconds += s["duration_seconds"]
    for k, n in doc.get("error_categories", {}).items():
        combined.error_categories[k] = combined.error_categories.get(k, 0) + n


__all__ = ["SEVERITY", "check_file", "run_file", "worst"]
