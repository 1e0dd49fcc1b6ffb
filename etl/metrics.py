"""Prometheus metrics of etl's runs (prometheus-client), for the monitoring people run.

``JobMetrics`` is an observer (``etl.observe``) that counts, per job: rows by outcome,
chunks, retries by reason, dead letters, a histogram of chunk durations and the time of
the last successful run. ``--metrics-port N`` serves them over HTTP while the command runs
(``/metrics``); ``--metrics-file PATH`` writes them when it ends, atomically, in the
text format node_exporter's textfile collector reads (for cron jobs). Series:

- ``etl_rows_total{job, outcome}`` — rows by outcome: succeeded, failed, skipped
- ``etl_chunks_total{job}`` — chunks committed
- ``etl_retries_total{job, reason}`` — retried attempts (transient failures) by reason
- ``etl_dead_letters_total{job}`` — rows that became dead letters
- ``etl_chunk_duration_seconds{job}`` — histogram of chunk durations
- ``etl_last_success_timestamp_seconds{job}`` — when a run of the job last completed
- ``etl_run_status{job, status}`` — 1 for the status the job's last run ended with
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import Result
    from .runner import StepOutcome

CHUNK_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
STATUSES = ("completed", "completed_with_errors", "failed", "cancelled", "paused", "stopped")


class JobMetrics:
    """The metrics of the runs of this process, in a registry of their own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.rows = Counter("etl_rows", "Rows by outcome.", ["job", "outcome"],
                            registry=self.registry)
        self.chunks = Counter("etl_chunks", "Chunks committed.", ["job"], registry=self.registry)
        self.retries = Counter("etl_retries", "Retried attempts after transient failures.",
                               ["job", "reason"], registry=self.registry)
        self.dead_letters = Counter("etl_dead_letters", "Rows that became dead letters.",
                                    ["job"], registry=self.registry)
        self.chunk_seconds = Histogram("etl_chunk_duration_seconds", "Duration of a chunk.",
                                       ["job"], buckets=CHUNK_SECONDS_BUCKETS,
                                       registry=self.registry)
        self.last_success = Gauge("etl_last_success_timestamp_seconds",
                                  "When a run of the job last completed (Unix time).", ["job"],
                                  registry=self.registry)
        self.status = Gauge("etl_run_status", "1 for the status the job's last run ended with.",
                            ["job", "status"], registry=self.registry)
        self._last: dict[str, Any] = {}  # job → its latest checkpoint seen

    # -- the observer (etl.observe) ---------------------------------------------------------
    def on_start(self, job_id: str, run_id: str, job_type: str, checkpoint: Any) -> None:
        self._last[job_id] = checkpoint  # counts go on from where the run starts
        for outcome in ("succeeded", "failed", "skipped"):
            self.rows.labels(job_id, outcome)  # present from the start, at 0
        self.chunks.labels(job_id)
        self.dead_letters.labels(job_id)

    def on_chunk(self, job_id: str, outcome: StepOutcome) -> None:
        cp, before = outcome.checkpoint, self._last.get(job_id)
        for name in ("succeeded", "failed", "skipped"):
            delta = getattr(cp, name) - (getattr(before, name) if before is not None else 0)
            if delta > 0:
                self.rows.labels(job_id, name).inc(delta)
        self._last[job_id] = cp
        self.chunks.labels(job_id).inc()
        self.dead_letters.labels(job_id).inc(len(outcome.errors))
        if outcome.seconds is not None:
            self.chunk_seconds.labels(job_id).observe(outcome.seconds)

    def on_finish(self, result: Result) -> None:
        job = result.job_id
        for reason, n in (result.metadata.get("retries_by_reason") or {}).items():
            self.retries.labels(job, str(reason)).inc(n)
        for status in STATUSES:
            self.status.labels(job, status).set(1 if result.status.value == status else 0)
        if result.status.value in ("completed", "completed_with_errors"):
            self.last_success.labels(job).set(time.time())

    # -- where they go ----------------------------------------------------------------------
    def serve(self, port: int) -> Any:
        """Serve ``/metrics`` on ``port`` (all interfaces) from a daemon thread."""
        from prometheus_client import start_http_server

        return start_http_server(port, registry=self.registry)

    def write(self, path: str) -> None:
        """Write the text format to ``path`` atomically (a temporary file, then rename)."""
        from prometheus_client import write_to_textfile

        write_to_textfile(path, self.registry)


__all__ = ["JobMetrics"]
