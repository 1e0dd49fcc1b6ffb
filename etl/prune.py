"""`etl prune --older-than 30d`: keep the state store's own tables from growing without bound.

Deletes, when older than the cutoff: runs (and their reports) — except each job's latest
run and any run still marked running —, handled control requests — except each job's
latest pause or resume, which says whether the job is paused — and, only when asked
(``dead_letters=True``), dead letters (replayed ones are deleted by the replay already;
the others are the record of rows that failed, kept by default). Jobs and their
checkpoints are never deleted: a job resumes after a prune as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .options import parse_duration
from .state.schema import DEFAULT_SCHEMA
from .state.store import schema_sql

if TYPE_CHECKING:
    from .state.store import StateStore
    from .urls import DbUrl

_RUNS = """
DELETE FROM {s}.runs r
WHERE r.started_at < now() - %(age)s * interval '1 second' AND r.status <> 'running'
  AND r.run_id NOT IN (SELECT DISTINCT ON (job_id) run_id FROM {s}.runs
                       ORDER BY job_id, started_at DESC)"""
_REQUESTS = """
DELETE FROM {s}.control_requests c
WHERE c.requested_at < now() - %(age)s * interval '1 second' AND c.handled_at IS NOT NULL
  AND c.id NOT IN (SELECT DISTINCT ON (job_id) id FROM {s}.control_requests
                   WHERE action IN ('pause', 'resume') ORDER BY job_id, id DESC)"""
_DEAD_LETTERS = """
DELETE FROM {s}.dead_letters WHERE created_at < now() - %(age)s * interval '1 second'"""


@dataclass(frozen=True)
class PruneResult:
    older_than_seconds: float
    runs: int
    control_requests: int
    dead_letters: int
    dry_run: bool

    def to_dict(self) -> dict[str, Any]:
        return {"older_than_seconds": self.older_than_seconds, "runs": self.runs,
                "control_requests": self.control_requests, "dead_letters": self.dead_letters,
                "dry_run": self.dry_run}


def prune(*, older_than: str | float, state: str | DbUrl | None = None,
          state_schema: str = DEFAULT_SCHEMA, dead_letters: bool = False,
          dry_run: bool = False) -> PruneResult:
    """Delete what the module says, older than ``older_than`` (``30d``, ``12h``, seconds),
    in one transaction; ``dry_run`` counts and rolls back."""
    from . import api

    age = parse_duration(older_than, "--older-than")
    assert age is not None

    def go(store: StateStore) -> PruneResult:
        from psycopg import Rollback

        conn = store.conn
        with conn.transaction():
            counts = [conn.execute(schema_sql(state_schema, q), {"age": age}).rowcount
                      for q in (_RUNS, _REQUESTS)]
            letters = conn.execute(schema_sql(state_schema, _DEAD_LETTERS),
                                   {"age": age}).rowcount if dead_letters else 0
            if dry_run:
                raise Rollback()  # counted, not deleted: the transaction rolls back
        return PruneResult(age, counts[0], counts[1], letters, dry_run)

    found = api._store_query(state, state_schema, go)
    return found if found is not None else PruneResult(age, 0, 0, 0, dry_run)


__all__ = ["PruneResult", "prune"]
