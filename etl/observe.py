"""Watching runs from the outside: observers of every run, and JSON log lines.

``etl.lifecycle.execute`` tells each registered observer when a run starts, after each
committed chunk and when it ends (``etl.metrics.JobMetrics`` is one); an observer that
fails is logged and never stops the job. ``JsonLogFormatter`` writes each log record as
one JSON object (``--log-format json``) with the job's fields when the record has them:
job, run, chunk, rows, duration, retries.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .report import Result
    from .runner import StepOutcome

log = logging.getLogger(__name__)

# Fields a log record of a job may carry (``extra=``), copied into its JSON line.
JOB_FIELDS = ("job", "run", "chunk", "rows", "duration", "retries", "status")


class Observer(Protocol):
    def on_start(self, job_id: str, run_id: str, job_type: str, checkpoint: Any) -> None: ...
    def on_chunk(self, job_id: str, outcome: StepOutcome) -> None: ...
    def on_finish(self, result: Result) -> None: ...


OBSERVERS: list[Observer] = []


@contextmanager
def observing(observer: Observer) -> Iterator[Observer]:
    """Register ``observer`` for the runs started inside the block."""
    OBSERVERS.append(observer)
    try:
        yield observer
    finally:
        OBSERVERS.remove(observer)


def notify(event: str, *args: Any) -> None:
    for observer in list(OBSERVERS):
        try:
            getattr(observer, event)(*args)
        except Exception:  # noqa: BLE001 - watching a job never stops it
            log.exception("observer %r failed on %s", observer, event)


class JsonLogFormatter(logging.Formatter):
    """One JSON object a record: time (UTC, ISO), level, logger, message, the job's fields."""

    def format(self, record: logging.LogRecord) -> str:
        from datetime import UTC, datetime

        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage()}
        for name in JOB_FIELDS:
            if hasattr(record, name):
                doc[name] = getattr(record, name)
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def use_json_logs() -> None:
    """Every handler of the root logger writes JSON lines; etl's chunk lines (INFO) shown."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    for handler in root.handlers:
        handler.setFormatter(JsonLogFormatter())
    etl_log = logging.getLogger("etl")
    if etl_log.getEffectiveLevel() > logging.INFO:
        etl_log.setLevel(logging.INFO)


__all__ = ["JOB_FIELDS", "OBSERVERS", "JsonLogFormatter", "Observer", "notify", "observing",
           "use_json_logs"]
