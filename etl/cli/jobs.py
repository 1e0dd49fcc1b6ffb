"""`etl status`, `etl runs`, `etl report`: see jobs from any terminal."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from .. import api


def _state_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--state-schema", default="etl", show_default=True, metavar="SCHEMA",
                        help="Schema of the state store.")(func)
    func = click.option("--state", metavar="URL", envvar=["ETL_STATE_URL", "ETL_TARGET_URL"],
                        show_envvar=True,
                        help="PostgreSQL URL of the state store (default: $ETL_TARGET_URL, "
                             "else the embedded PostgreSQL).")(func)
    return func


@click.command()
@click.argument("job", required=False)
@_state_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--watch", is_flag=True, help="Show it again every 2 seconds (Ctrl-C ends).")
@click.option("--stale-after", default="15s", show_default=True, metavar="DURATION",
              help="A running run whose heartbeat is older than this is shown as stale "
                   "(its process died; the job's next run closes it).")
def status(job: str | None, state: str | None, state_schema: str, as_json: bool, watch: bool,
           stale_after: str) -> None:
    """Show jobs: status (running, stale, paused, stopped, failed, completed …), the running
    run's host and pid, rows done of total, rows/s, ETA, chunk, errors, retries, the last
    checkpoint and the heartbeat's age."""
    import time

    from ..options import parse_duration

    after = parse_duration(stale_after, "--stale-after")
    while True:
        jobs = api.status(job, state=state, state_schema=state_schema, stale_after=after)
        if as_json:
            click.echo(json.dumps(jobs, indent=2, default=str))
        else:
            _status_table(jobs, job)
        if not watch:
            return
        time.sleep(2)
        if not as_json:
            click.echo()


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _status_table(jobs: list[dict[str, Any]], job: str | None) -> None:
    if not jobs:
        click.echo(f"no job {job!r}" if job else "no jobs yet")
        return
    click.echo(f"{'JOB':<32} {'STATUS':<21} {'ROWS':>23} {'ROWS/S':>9} {'ETA':>8} "
               f"{'CHUNK':>6} {'ERRORS':>6} {'BEAT':>6}  LAST KEY / WHERE")
    for j in jobs:
        cp = j["checkpoint"] or {}
        run = j["last_run"] or {}
        live = run.get("progress") or {}
        active = j["status"] in ("running", "stale")
        done = live.get("processed") if active and live else cp.get("processed_count")
        rows = "-" if done is None else f"{done:,}"
        if active and live.get("total"):
            rows += f"/{'' if live.get('exact') else '~'}{live['total']:,}"
        rate = f"{live['rows_per_second']:,.0f}" if active and live else "-"
        eta = _eta(live.get("eta_seconds")) if active else "-"
        errors = live.get("failed") if active and live else cp.get("failed")
        beat = f"{run['heartbeat_age_seconds']:.0f}s" if active and run.get(
            "heartbeat_age_seconds") is not None else "-"
        where = f"host {run.get('host')} pid {run.get('pid')}" if active else ""
        key = live.get("last_key") if active and live else cp.get("last_key")
        click.echo(f"{j['job_id']:<32} {j['status']:<21} {rows:>23} {rate:>9} {eta:>8} "
                   f"{cp.get('chunk_index', '-'):>6} {errors if errors is not None else '-':>6} "
                   f"{beat:>6}  {key} {where}".rstrip())


@click.command()
@click.argument("job", required=False)
@_state_options
@click.option("--limit", type=int, default=20, show_default=True, help="How many runs to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def runs(job: str | None, state: str | None, state_schema: str, limit: int, as_json: bool) -> None:
    """List recent runs (newest first), of all jobs or of JOB."""
    rows = api.runs(job, state=state, state_schema=state_schema, limit=limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("no runs yet")
        return
    click.echo(f"{'RUN ID':<36}  {'JOB':<28} {'STATUS':<22} {'STARTED':<20} {'ROWS':>12}")
    for r in rows:
        summary = r["summary"] or {}
        done = summary.get("succeeded")
        click.echo(f"{r['run_id']:<36}  {r['job_id']:<28} {r['status']:<22} "
                   f"{r['started_at']:<20} {(f'{done:,}' if done is not None else '-'):>12}")


@click.command()
@click.argument("run_id")
@_state_options
def report(run_id: str, state: str | None, state_schema: str) -> None:
    """Print the result JSON of RUN_ID (the same document --json printed)."""
    click.echo(json.dumps(api.report(run_id, state=state, state_schema=state_schema),
                          indent=2, default=str))


@click.command()
@click.argument("job")
@_state_options
def pause(job: str, state: str | None, state_schema: str) -> None:
    """Pause JOB at its next chunk boundary (the chunk in flight commits or rolls back
    whole); the run ends with status paused, exit 4. The job stays paused — a later run
    stops at once — until `etl resume JOB`."""
    from ..control import pause as request_pause

    click.echo(request_pause(job, state=state, state_schema=state_schema).message, err=True)


@click.command()
@click.argument("job")
@_state_options
def cancel(job: str, state: str | None, state_schema: str) -> None:
    """Cancel JOB's running run at its next chunk boundary (status cancelled, exit 4). Its
    checkpoint stays: a rerun resumes, --restart starts over. A paused job is unpaused."""
    from ..control import cancel as request_cancel

    click.echo(request_cancel(job, state=state, state_schema=state_schema).message, err=True)


@click.command()
@click.argument("job")
@_state_options
def resume(job: str, state: str | None, state_schema: str) -> None:
    """Lift JOB's pause and run it again with the arguments it was started with (a job
    started from the command line; passwords are not stored — URLs from ETL_*_URL are
    read again from the environment). Exits with the run's exit code."""
    from ..control import resume as request_resume
    from . import main

    result = request_resume(job, state=state, state_schema=state_schema)
    click.echo(result.message, err=True)
    if result.argv:
        main(result.argv)


@click.command()
@_state_options
@click.option("--older-than", required=True, metavar="DURATION",
              help="Delete what is older than this (30d, 12h, …).")
@click.option("--dead-letters", is_flag=True,
              help="Also delete dead letters older than that (kept by default: they are the "
                   "record of rows that failed; replayed ones are deleted by the replay).")
@click.option("--dry-run", is_flag=True, help="Count what would go; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def prune(state: str | None, state_schema: str, older_than: str, dead_letters: bool,
          dry_run: bool, as_json: bool) -> None:
    """Delete old runs and their reports (each job's latest run is kept), handled control
    requests (each job's latest pause/resume is kept) and, with --dead-letters, old dead
    letters. Jobs and checkpoints are never deleted: every job resumes as before."""
    from ..prune import prune as run_prune

    result = run_prune(older_than=older_than, state=state, state_schema=state_schema,
                       dead_letters=dead_letters, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {result.runs:,} run(s), {result.control_requests:,} control "
               f"request(s), {result.dead_letters:,} dead letter(s) older than {older_than}")
