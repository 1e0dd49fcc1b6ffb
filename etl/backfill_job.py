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

from . import catalog, pg, run_result
from .errors import EtlError, UsageError
from .model import Checkpoint, Column, Status, TableName
from .report import Result, utc_now
from .retry import RetryPolicy, RetryStats
from .runner import Pacing, StepOutcome, StopFlag, run_loop
from .sources.pg import Bound, KeysetQuery
from .state.store import read_checkpoint, write_checkpoint
from .urls import DbUrl

if TYPE_CHECKING:
    import psycopg

    from .jobrun import JobRun
    from .progress import Progress

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

    @property
    def settings(self) -> dict[str, str]:
        if self.lock_timeout is None:
            return {}
        return {"lock_timeout": f"{max(int(self.lock_timeout * 1000), 1)}ms"}

    def args(self) -> dict[str, Any]:
        return {"target": self.target.masked, "table": str(self.table), "set": self.set_sql,
                "where": self.where, "key": list(self.key or ()),
                "pacing": dataclasses.asdict(self.pacing),
                "retry": dataclasses.asdict(self.retry), "lock_timeout": self.lock_timeout}


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
        found = read_checkpoint(self.conn, self.plan.spec.job_id, self.plan.spec.state_schema)
        return found[0] if found is not None and found[0].chunk_index > cp.chunk_index else None

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
            stop: StopFlag | None = None, report_path: str | None = None) -> Result:
    """Run the planned backfill under ``run`` (lock held). Failures end in the Result."""
    spec = plan.spec
    stop = stop if stop is not None else StopFlag()
    result = Result(job_id=spec.job_id, run_id=run.run_id, job_type="backfill",
                    started_at=utc_now())
    result.metadata.update({"target": spec.target.masked, "key": [k.name for k in plan.key],
                            "set": spec.set_sql, "where": spec.where,
                            "chunk_size": spec.pacing.chunk_size or "auto"})
    result.artifacts["report"] = report_path
    t0 = time.monotonic()
    retries = RetryStats()
    found = None if spec.restart else read_checkpoint(run.store.conn, spec.job_id,
                                                       spec.state_schema)
    # a rerun after a finished backfill continues after its last key (rows added since),
    # never applies --set twice to a row; --restart walks the whole table again
    cp = found[0] if found else Checkpoint(job_id=spec.job_id, chunk_index=0, last_key=None,
                                           run_id=run.run_id)
    step = BackfillStep(plan, conn, run)
    latest = [cp]
    try:
        run.begin()
        if found is not None and cp.last_key is not None:
            log.info("resuming %s after key %s (chunk %d, %d rows updated)", spec.job_id,
                     cp.last_key_json, cp.chunk_index, cp.processed)
        remaining, exact = count_remaining(conn, plan, cp.last_key)
        progress.start(f"backfill {spec.table}", cp.processed, cp.processed + remaining, exact)
        result.total_items = cp.processed + remaining

        def after_chunk(outcome: StepOutcome) -> None:
            run.heartbeat()
            latest[0] = outcome.checkpoint

        loop = run_loop(step, cp, spec.pacing, stop=stop, progress=progress,
                        on_chunk=after_chunk, retry=spec.retry, retries=retries)
        cp = loop.checkpoint
        result.status, result.message = loop.status, loop.message
        result.rows_this_run = loop.rows
        if loop.status is Status.COMPLETED:
            with step.conn.transaction():
                write_checkpoint(step.conn, cp, finished=True, schema=spec.state_schema)
            result.total_items = cp.processed
    except KeyboardInterrupt:
        result.status = Status.STOPPED
        result.message = "interrupted; the chunk in flight was rolled back — rerun to resume"
    except EtlError as exc:
        run_result.fail(result, exc, str(exc))
    except Exception as exc:  # driver errors: one line, masked, with SQLSTATE
        run_result.fail(result, exc, pg.describe_error(exc, spec.target))
    finally:
        cp = latest[0]
        result.rows_this_run = max(result.rows_this_run, cp.processed - (found[0].processed
                                                                          if found else 0))
        result.metadata["longest_transaction_seconds"] = round(step.longest, 3)
        step.close()
    return run_result.close(result, cp, retries, t0, run, progress, spec.target)


__all__ = ["BackfillPlan", "BackfillSpec", "BackfillStep", "assigned_columns", "describe_plan",
           "execute", "make_plan"]
