"""The result document of SPEC.md ("The result report") and the Result object behind it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .model import Status

# SPEC.md: "errors holds at most the first 100 errors; error_categories counts all."
MAX_ERRORS_IN_REPORT = 100


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class RowError:
    """One failure as the report lists it."""

    item_identifier: str
    error_type: str
    category: str
    error_message: str
    timestamp: str = field(default_factory=utc_now)
    chunk_index: int | None = None
    retry_attempts: int = 0


@dataclass
class Result:
    """What a run did. ``to_dict()`` is the report; the CLI only renders it."""

    job_id: str
    run_id: str
    job_type: str
    started_at: str
    completed_at: str | None = None
    status: Status = Status.RUNNING
    total_items: int = 0
    processed: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    duration_seconds: float = 0.0
    rows_this_run: int = 0
    errors: list[RowError] = field(default_factory=list)
    error_categories: dict[str, int] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)
    last_checkpoint: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    message: str | None = None  # one line saying why the run did not complete
    exit_code_override: int | None = None  # `etl run`: the worst of its jobs' exit codes

    @property
    def exit_code(self) -> int:
        if self.exit_code_override is not None:
            return self.exit_code_override
        return self.status.exit_code

    @property
    def ok(self) -> bool:
        return self.status in (Status.COMPLETED, Status.COMPLETED_WITH_ERRORS)

    def add_error(self, error: RowError) -> None:
        self.error_categories[error.error_type] = self.error_categories.get(error.error_type, 0) + 1
        if len(self.errors) < MAX_ERRORS_IN_REPORT:
            self.errors.append(error)

    @classmethod
    def dry_run(cls, job_id: str, job_type: str, plan: str, rows: int,
                **metadata: Any) -> Result:
        """The Result of a ``--dry-run``: the plan's text and the rows it would handle
        (``metadata`` adds what the command tells of its plan); nothing ran."""
        now = utc_now()
        result = cls(job_id=job_id, run_id="dry-run", job_type=job_type, started_at=now,
                     completed_at=now, status=Status.COMPLETED, total_items=rows)
        result.metadata.update({"dry_run": True, "plan": plan, **metadata})
        return result

    def to_dict(self) -> dict[str, Any]:
        rate = self.rows_this_run / self.duration_seconds if self.duration_seconds > 0 else 0.0
        doc: dict[str, Any] = {
            "job_id": self.job_id,
            "run_id": self.run_id,
            "job_type": self.job_type,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "status": self.status.value,
            "summary": {
                "total_items": self.total_items,
                "processed": self.processed,
                "succeeded": self.succeeded,
                "failed": self.failed,
                "skipped": self.skipped,
                "duration_seconds": round(self.duration_seconds, 3),
                "items_per_second": round(rate, 1),
            },
            "errors": [vars(e) for e in self.errors],
            "error_categories": dict(self.error_categories),
            "artifacts": {"dead_letters": None, "output_files": [], "report": None,
                          **self.artifacts},
            "last_checkpoint": dict(self.last_checkpoint),
            "metadata": {"max_workers": 1, "retry_attempts": 0, **self.metadata,
                         "rows_this_run": self.rows_this_run},
        }
        if self.message:
            doc["message"] = self.message
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def write(self, path: str | Path) -> Path:
        """Write the report atomically (temp file + rename) to ``path``."""
        import os
        import tempfile

        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.artifacts["report"] = str(target)
        fd, tmp = tempfile.mkstemp(prefix=".report-", dir=target.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(self.to_json() + "\n")
        os.replace(tmp, target)
        return target
