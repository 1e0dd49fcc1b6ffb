"""Vocabulary shared by every module: frozen dataclasses and closed enums."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Category(enum.StrEnum):
    """How a failure is handled (SPEC.md "Errors")."""

    TRANSIENT = "transient"
    DATA = "data"
    FATAL = "fatal"
    VALIDATION = "validation"


class Status(enum.StrEnum):
    """The status of a run, as the report prints it."""

    RUNNING = "running"
    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"
    STOPPED = "stopped"

    @property
    def exit_code(self) -> int:
        return _EXIT_CODES[self]


_EXIT_CODES = {
    Status.RUNNING: 1,
    Status.COMPLETED: 0,
    Status.COMPLETED_WITH_ERRORS: 3,
    Status.FAILED: 1,
    Status.CANCELLED: 4,
    Status.PAUSED: 4,
    Status.STOPPED: 4,
}


class Mode(enum.StrEnum):
    """How rows are written into the target."""

    APPEND = "append"
    REPLACE = "replace"
    UPSERT = "upsert"
    IGNORE = "ignore"


@dataclass(frozen=True)
class TableName:
    """A schema-qualified table name; always quoted by the driver when used."""

    schema: str
    name: str

    @classmethod
    def parse(cls, text: str, default_schema: str = "public") -> TableName:
        from .errors import UsageError

        parts = [p.strip() for p in text.split(".")]
        if len(parts) == 1 and parts[0]:
            return cls(default_schema, parts[0])
        if len(parts) == 2 and all(parts):
            return cls(parts[0], parts[1])
        raise UsageError(
            f"invalid table name {text!r}: use TABLE or SCHEMA.TABLE (quotes are not needed)"
        )

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class Column:
    """A column as the source database describes it."""

    name: str
    type_sql: str  # the exact type, e.g. "numeric(12,2)", "public.mood", "integer[]"
    not_null: bool = False
    auto_increment: bool = False  # serial or identity: a sequence numbers it


@dataclass(frozen=True)
class Checkpoint:
    """The last committed position of a job (one per job and partition)."""

    job_id: str
    chunk_index: int
    last_key: tuple[str, ...] | None  # text form of each key column; None before the first chunk
    last_key_json: list[Any] = field(default_factory=list)
    processed: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped: int = 0
    bytes: int = 0
    checksum: str | None = None
    run_id: str | None = None
    updated_at: str | None = None
    outcomes: dict[str, int] = field(default_factory=dict)  # inserted, updated, unchanged, …
    watermark: dict[str, Any] | None = None  # --since-column jobs (see sql/003)


@dataclass(frozen=True)
class ChunkResult:
    """What one committed chunk did."""

    index: int
    rows: int
    bytes: int
    seconds: float
    last_key: tuple[str, ...]
    last_key_json: list[Any]
    checksum: str
