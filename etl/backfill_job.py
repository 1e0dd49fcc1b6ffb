"""`etl backfill`: a chunked UPDATE of a live PostgreSQL table, by key, resumable.

Each chunk is one short transaction on the table's own database: find the chunk's
last key among the rows ``--where`` still selects (``key > last ORDER BY key LIMIT
n``, never OFFSET), ``UPDATE … SET <--set> WHERE key in (last, bound] AND
(--where)``, and write the job's checkpoint — all committed together. A crash
at any instant leaves both or neither, so every row is updated exactly once even
when ``--set`` is not idempotent (``n = n + 1``); that is why the state store of a
backfill is always the table's database. ``--lock-timeout`` bounds each wait for a
row lock (retried as transient), ``--chunk-seconds``/``--max-rate``/``--sleep`` keep
transactions short and the server breathing.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import catalog, lifecycle, pg
from .errors import UsageError
from .model import Checkpoint, Column, TableName
from .report import Result, utc_now
from .retry import RetryPolicy
from .runner import Pacing, StepOutcome, StopFlag
from .sources.pg import Bound, KeysetQuery
from .state.store import committed_after_all, read_checkpoint, write_checkpoint
from .urls import DbUrl

if TYPE_CHECKING:
    import psycopg

    from .jobrun import JobRun
    from .progress import Progress
    from .replica import ReplicaGuard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackfillSpec:
    """Everything `etl backfill` was asked to do, checked."""

    target: DbUrl
    table: TableName
    job_id: str
    set_sql: str                  # "col = expr[, col2 = expr2]": trusted operator input
    where: str | None = None      # only rows that need it
    key: tuple[str, ...] | None = None
    restart: bool = False
    pacing: Pacing = Pacing()
    retry: RetryPolicy = RetryPolicy()
    lock_timeout: float | None = None
    state_schema: str = "etl"
    timezone: str = "UTC"         # --timezone: the session's TimeZone

    @property
    def settings(self) -> dict[str, str]:
        return pg.session_settings(self.lock_timeout, self.timezone)

    def args(self) -> dict[str, Any]:
        return {"target": self.target.masked, "table": str(self.table), "set": self.set_sql,
                "where": self.where, "key": list(self.key or ()),
                "pacing": dataclasses.asdict(self.pacing),
                "retry": dataclasses.asdict(self.retry), "lock_timeout": self.lock_timeout,
                "timezone": self.timezone}


@dataclass(frozen=True)
class BackfillPlan:
    spec: BackfillSpec
    key: tuple[Column, ...]
    estimated_rows: int

    @property
    def query(self) -> KeysetQuery:
        return KeysetQuery(self.spec.table, self.key, self.key, self.spec.where)


def assigned_columns(set_sql: str) -> list[str]:
    """The columns a ``--set`` assigns: the name before each top-level ``=`` (commas and
    ``=`` inside parentheses or quotes belong to the expressions)."""
    names: list[str] = []
    depth, quote, start, seen_eq = 0, "", 0, False
    for i, ch in enumerate(set_sql + ","):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and ch == "=" and not seen_eq:
            names.append(set_sql[start:i].strip().strip('"'))
            seen_eq = True
        elif depth == 0 and ch == ",":
            start, seen_eq = i + 1, False
    return names


def make_plan(spec: BackfillSpec, conn: psycopg.Connection) -> BackfillPlan:
    """Check the table, the key, --set and --where (run once on no rows); writes nothing."""
    import psycopg
    from psycopg import sql

    info = catalog.describe(conn, spec.table, role="target")
    key_names = catalog.resolve_key(info, spec.key)
    assigned = assigned_columns(spec.set_sql)
    if not assigned:
        raise UsageError(f"--set {spec.set_sql!r}: give assignments such as \"col = expr\"")
    moved = [k for k in key_names if k in assigned]
    if moved:
        raise UsageError(
            f"--set assigns the key column(s) {', '.join(moved)}: chunks are cut on the key, "
            "so rows would move past the walk and be updated twice. Backfill on another "
            "--key, or change the key with a one-off UPDATE")
    plan = BackfillPlan(spec, tuple(info.column(k) for k in key_names), info.estimated_rows)
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(sql.SQL("UPDATE {} SET {} WHERE false{}").format(
                sql.Identifier(spec.table.schema, spec.table.name),
                sql.SQL(spec.set_sql),  # type: ignore[arg-type]
                sql.SQL(" AND ({})").format(sql.SQL(spec.where)) if spec.where  # type: ignore[arg-type]
                else sql.SQL("")))
    except psycopg.Error as exc:
        raise UsageError(f"--set/--where are not valid on {spec.table}: "
                         f"{pg.describe_error(exc)}") from exc
    return plan


def count_remaining(conn: psycopg.Connection, plan: BackfillPlan,
                    after: tuple[str, ...] | None) -> tuple[int, bool]:
    q = plan.query
    n, exact = catalog.count_rows(conn, q.remaining_sql(after is not None).as_string(conn),
                                  q.params(after), plan.estimated_rows)
    return n, exact


class BackfillStep:
    """One chunk: bound → UPDATE → checkpoint, one transaction on the table's database."""

    def __init__(self, plan: BackfillPlan, conn: psycopg.Connection, run: JobRun) -> None:
        self.plan = plan
        self.conn = conn
        self.run = run
        self.longest = 0.0  # seconds of the longest chunk transaction
        self._update = plan.query.update_sql(plan.spec.set_sql, True)
        self._update_first = plan.query.update_sql(plan.spec.set_sql, False)

    def ensure_connected(self) -> None:
        spec = self.plan.spec
        if not pg.is_usable(self.conn):
            log.info("reconnecting to the target database")
            self.conn = pg.connect(spec.target, "target", autocommit=True, reconnect=True,
                                   settings=spec.settings)
        self.run.ensure_connected()

    def committed(self, cp: Checkpoint) -> Checkpoint | None:
        """Before a retry: the stored checkpoint, past ``cp`` when the failed attempt committed
        after all (so its UPDATE is not applied twice)."""
        self.ensure_connected()
        spec = self.plan.spec
        return committed_after_all(self.conn, spec.job_id, self.run.run_id, cp, spec.state_schema)

    def __call__(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        self.ensure_connected()
        q = self.plan.query
        t0 = time.monotonic()
        with self.conn.transaction():
            row = self.conn.execute(q.bound_sql(cp.last_key is not None),
                                    q.params(cp.last_key, limit=size)).fetchone()
            if row is None:
                return None
            bound = Bound(tuple(row[:-1]), list(row[-1]))
            stmt = self._update if cp.last_key is not None else self._update_first
            updated = max(self.conn.execute(stmt, q.params(cp.last_key, bound.text)).rowcount, 0)
            new = dataclasses.replace(
                cp, chunk_index=cp.chunk_index + 1, last_key=bound.text, last_key_json=bound.json,
                processed=cp.processed + updated, succeeded=cp.succeeded + updated,
                run_id=self.run.run_id, updated_at=utc_now())
            self.run.assert_lock_held()
            write_checkpoint(self.conn, new, schema=self.plan.spec.state_schema)
        self.longest = max(self.longest, time.monotonic() - t0)
        return StepOutcome(new, updated, 0)

    def close(self) -> None:
        self.conn.close()

    def metadata(self) -> dict[str, Any]:
        return {"longest_transaction_seconds": round(self.longest, 3)}


def describe_plan(plan: BackfillPlan, cp: Checkpoint | None, remaining: int, exact: bool,
                  chunk_size: int) -> str:
    """The --dry-run text: what would be updated, with the SQL; nothing is written."""
    spec = plan.spec
    q = plan.query
    about = "" if exact else "~"
    lines = [
        f"job:          {spec.job_id}",
        f"target:       {spec.target.masked}  table {spec.table}",
        f"key:          {', '.join(f'{k.name} {k.type_sql}' for k in plan.key)}",
        f"set:          {spec.set_sql}",
        f"where:        {spec.where or '(every row)'}",
    ]
    if cp is not None and cp.last_key is not None:
        lines.append(f"resume:       after key {cp.last_key_json} (chunk {cp.chunk_index}, "
                     f"{cp.processed:,} rows updated)")
    if spec.pacing.chunk_size:
        chunks = -(-remaining // chunk_size) if remaining else 0
        lines.append(f"rows to update: {about}{remaining:,} in {about}{chunks:,} chunk(s) of up "
                     f"to {chunk_size:,}")
    else:
        lines.append(f"rows to update: {about}{remaining:,}; chunk size auto: starts at "
                     f"{chunk_size:,} rows and adapts toward {spec.pacing.chunk_seconds:g} s a chunk")
    lines += ["chunk bound SQL (per chunk):",
              f"  {q.bound_sql(True).as_string(None).replace('%%', '%')};",
              "chunk UPDATE SQL (per chunk, with the checkpoint in the same transaction):",
              f"  {q.update_sql(spec.set_sql, True).as_string(None).replace('%%', '%')};",
              "dry run: nothing was written"]
    return "\n".join(lines)


def execute(plan: BackfillPlan, run: JobRun, conn: psycopg.Connection, *, progress: Progress,
            stop: StopFlag | None = None, report_path: str | None = None,
            replica: ReplicaGuard | None = None) -> Result:
    """Run the planned backfill under ``run`` (lock held). Failures end in the Result."""
    spec = plan.spec
    result = Result(job_id=spec.job_id, run_id=run.run_id, job_type="backfill",
                    started_at=utc_now())
    result.metadata.update({"target": spec.target.masked, "key": [k.name for k in plan.key],
                            "set": spec.set_sql, "where": spec.where,
                            "chunk_size": spec.pacing.chunk_size or "auto"})
    result.artifacts["report"] = report_path

    def start() -> lifecycle.Start:
        # a rerun after a finished backfill continues after its last key (rows added since),
        # never applies --set twice to a row; --restart walks the whole table again
        found = None if spec.restart else read_checkpoint(run.store.conn, spec.job_id,
                                                           spec.state_schema)
        cp = found[0] if found else Checkpoint(job_id=spec.job_id, chunk_index=0,
                                               last_key=None, run_id=run.run_id)
        remaining, exact = count_remaining(conn, plan, cp.last_key)
        return lifecycle.Start(BackfillStep(plan, conn, run), cp, found is not None,
                               f"backfill {spec.table}", remaining, exact)

    def finish(begun: lifecycle.Start, cp: Checkpoint) -> None:
        target = begun.step.conn  # type: ignore[attr-defined]  # reopened after a retry
        with target.transaction():
            write_checkpoint(target, cp, finished=True, schema=spec.state_schema)

    return lifecycle.execute(run, result, start=start, finish=finish, pacing=spec.pacing,
                             retry=spec.retry, progress=progress,
                             stop=stop if stop is not None else StopFlag(), state=spec.target,
                             describe=lambda exc: pg.describe_error(exc, spec.target),
                             replica=replica)


__all__ = ["BackfillPlan", "BackfillSpec", "BackfillStep", "assigned_columns", "describe_plan",
           "execute", "make_plan"]
