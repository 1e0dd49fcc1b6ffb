"""Options shared by every job command, and rendering of results."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from ..report import Result

F = Callable[..., Any]


def error(message: str) -> None:
    click.echo(f"etl: error: {message}", err=True)


def job_options(func: F | None = None, *, without: tuple[str, ...] = ()) -> Any:
    """--job, --state, chunking, pacing, reporting and control options (SPEC.md "Commands").

    ``@job_options`` adds them all; ``@job_options(without=("state", …))`` leaves out the
    named ones (by parameter name), for a command that defines them its own way or has no use
    for them.
    """
    if func is None:
        return lambda f: job_options(f, without=without)
    decorators = [
        click.option("--job", metavar="NAME",
                     help="Job name (default derived from the command and target, e.g. "
                          "copy:public.events). The same name resumes the same job."),
        click.option("--state", metavar="URL", envvar="ETL_STATE_URL", show_envvar=True,
                     help="PostgreSQL URL of the state store (default: the target database)."),
        click.option("--state-schema", default="etl", show_default=True, metavar="SCHEMA",
                     help="Schema of the state store."),
        click.option("--chunk-size", default="auto", show_default=True, metavar="N|auto",
                     help="Rows per chunk; auto adapts toward --chunk-seconds."),
        click.option("--chunk-seconds", type=float, default=2.0, show_default=True,
                     metavar="S", help="Target duration of one chunk when --chunk-size is auto."),
        click.option("--min-chunk", type=click.IntRange(min=1), metavar="N",
                     help="Smallest chunk --chunk-size auto may choose (default 1,000)."),
        click.option("--max-chunk", type=click.IntRange(min=1), metavar="N",
                     help="Largest chunk --chunk-size auto may choose (default 1,000,000; "
                          "a Parquet export's 100,000)."),
        click.option("--max-rate", type=float, metavar="ROWS/S",
                     help="Never go faster than this many rows per second."),
        click.option("--sleep", type=float, default=0.0, metavar="SECONDS",
                     help="Pause between chunks (to spare a busy server)."),
        click.option("--max-runtime", metavar="DURATION",
                     help="Stop cleanly at a chunk boundary after this long (90s, 5m, 1h); exit 4, "
                          "the next run resumes."),
        click.option("--retries", type=click.IntRange(min=0), default=4, show_default=True,
                     help="Retries of a chunk after a transient failure (lost connection, "
                          "deadlock, lock timeout, failover), with exponential backoff and jitter."),
        click.option("--retry-max-wait", default="30s", show_default=True, metavar="DURATION",
                     help="Longest wait between two retries."),
        click.option("--lock-timeout", default="5s", show_default=True, metavar="DURATION",
                     help="How long a chunk waits for a lock on the target before it is "
                          "rolled back and retried."),
        click.option("--max-errors", type=click.IntRange(min=0), metavar="N",
                     help="Stop (failed, exit 1) once more than N rows have failed."),
        click.option("--max-error-rate", type=click.FloatRange(0, 1), default=0.05,
                     show_default=True, metavar="F",
                     help="Stop once more than this share of rows has failed (judged after "
                          "1,000 rows)."),
        click.option("--dry-run", is_flag=True,
                     help="Print the plan, estimated rows and chunks and the SQL; write nothing."),
        click.option("--restart", is_flag=True,
                     help="Discard the job's checkpoint and start from the beginning."),
        click.option("--report", "report_path", metavar="PATH",
                     help="Also write the result JSON to this file."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print the result JSON on stdout (progress and logs go to stderr)."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress on stderr (default: a live bar on a TTY, milestone lines otherwise)."),
        click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
                     show_default=True,
                     help="json: each log line a JSON object (job, run, chunk, rows, duration, "
                          "retries), chunk lines included."),
        click.option("--metrics-port", type=click.IntRange(1, 65535), metavar="N",
                     help="Serve Prometheus metrics on this port (/metrics) while the job runs."),
        click.option("--metrics-file", metavar="PATH",
                     help="Write Prometheus metrics to this file when the job ends (for "
                          "node_exporter's textfile collector), atomically."),
    ]
    for decorator in reversed(decorators):
        probe = decorator(lambda: None)  # click keeps the option it declares on the function
        declared = getattr(probe, "__click_params__", [None])[-1]
        if declared is not None and declared.name in without:
            continue
        func = decorator(func)
    return func


def replica_options(func: F) -> F:
    """--replica and --max-lag (archive, backfill): chunks wait while a standby lags."""
    func = click.option("--max-lag", default="30s", show_default=True, metavar="DURATION",
                        help="With --replica: the replay lag beyond which chunks wait.")(func)
    return click.option("--replica", metavar="URL",
                        help="A streaming replica of the database written: before each chunk, "
                             "wait while it lags more than --max-lag.")(func)


def timezone_option(func: F) -> F:
    """--timezone (archive, backfill): the sessions' time zone, UTC unless given."""
    return click.option("--timezone", default="UTC", show_default=True, metavar="ZONE",
                        help="Session time zone of the database connections, in which "
                             "timestamps, dates and now()::date in --where/--set are read "
                             "(an IANA name such as Europe/Berlin). UTC by default, "
                             "so a job means the same wherever and whenever it runs.")(func)


@contextmanager
def observed(kw: dict[str, Any]) -> Iterator[None]:
    """--log-format, --metrics-port and --metrics-file around a command's run (taken out of
    ``kw``, which then holds the library function's options)."""
    from ..observe import observing, use_json_logs

    log_format = kw.pop("log_format", "text")
    port = kw.pop("metrics_port", None)
    path = kw.pop("metrics_file", None)
    if log_format == "json":
        use_json_logs()
    if port is None and path is None:
        yield
        return
    from ..metrics import JobMetrics

    metrics = JobMetrics()
    if port is not None:
        try:
            metrics.serve(int(port))
        except OSError as exc:
            raise click.UsageError(f"--metrics-port {port}: {exc.strerror or exc}") from exc
    try:
        with observing(metrics):
            yield
    finally:
        if path is not None:
            metrics.write(str(path))


def render(result: Result, as_json: bool) -> None:
    """Print the result (JSON or a short summary) and exit with its code."""
    doc = result.to_dict()
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
    elif doc["metadata"].get("dry_run"):
        click.echo(doc["metadata"]["plan"])
    else:
        s = doc["summary"]
        click.echo(f"job {doc['job_id']}  run {doc['run_id']}  status {doc['status']}")
        click.echo(f"  rows: {s['succeeded']:,} succeeded, {s['failed']:,} failed, "
                   f"{s['skipped']:,} skipped of {s['total_items']:,}"
                   f"  ({doc['metadata']['rows_this_run']:,} this run, "
                   f"{s['duration_seconds']}s, {s['items_per_second']:,.0f} rows/s)")
        for table in doc["metadata"].get("tables", []):
            if "summary" in table:
                ts = table["summary"]
                click.echo(f"  {table['job_id']:<40} {table['status']:<22} "
                           f"{ts['succeeded']:>12,} ok {ts['failed']:>8,} failed")
            else:
                click.echo(f"  {table['table']:<40} failed: {table['message']}")
        cp = doc["last_checkpoint"]
        if cp:
            click.echo(f"  checkpoint: chunk {cp.get('chunk_index')}, last key {cp.get('last_key')}")
        if doc["artifacts"].get("report"):
            click.echo(f"  report: {doc['artifacts']['report']}")
        click.echo(f"  full report: etl report {doc['run_id']}")
    if result.message and result.status.exit_code == 1:
        error(result.message)
    elif result.message and result.status.exit_code != 0:
        click.echo(f"etl: {result.message}", err=True)
    sys.stdout.flush()
    sys.exit(result.exit_code)
