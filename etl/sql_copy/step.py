"""One chunk of a cross-database copy: read after the checkpoint → (transform) → write in one
target transaction, bad rows isolated by bisection in savepoints → dead letters and
checkpoint (in that transaction when the state store is in the target, else right after)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import run_result, transforms
from ..errors import TargetError
from ..isolate import is_data_error, isolate
from ..model import Category, Checkpoint, Mode, TableName
from ..report import RowError, utc_now
from ..runner import StepOutcome
from ..sql_copy_io import (
    STAGE_TABLE,
    PgTarget,
    SqlaTarget,
    Target,
    describe_error,
    error_name,
    jsonable,
    key_from_json,
    key_to_json,
    recategorising,
    row_bytes,
)
from ..state.store import committed_after_all, insert_dead_letters, write_checkpoint
from .plan import SqlCopyPlan, estimate

if TYPE_CHECKING:
    from ..dialects import TableSchema
    from ..jobrun import JobRun
    from .connections import Databases

log = logging.getLogger(__name__)

# Progress totals are exact counts up to this many rows, the database's estimate beyond.
EXACT_COUNT_ROWS = 500_000

# A failed row of a chunk: its position among the chunk's source rows, its category and the
# error (data) or the transform's reason (validation).
Failure = tuple[int, Category, BaseException | str]


@dataclass
class _Written:
    rows: int = 0
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)
    bad: list[tuple[int, BaseException]] = dataclasses.field(default_factory=list)

    @property
    def not_kept(self) -> int:
        return self.outcomes.get("ignored", 0) + self.outcomes.get("superseded", 0)


@dataclass
class _Transformed:
    """A chunk as the transform left it: the rows to write (in ``target``'s columns), where
    each came from among the source rows, and the rows it rejected or dropped."""

    target: Target
    rows: list[tuple[Any, ...]]
    origin: list[int]
    rejected: list[tuple[int, str]]
    dropped: int


class SqlCopyStep:
    """One chunk: read after the checkpoint → write in one target transaction → checkpoint."""

    def __init__(self, plan: SqlCopyPlan, target: TableSchema, dbs: Databases, run: JobRun,
                 *, guard: bool) -> None:
        self.plan = plan
        self.target_schema = target
        self.dbs = dbs
        self.run = run
        self.guard = guard  # delete rows a crashed run committed without their checkpoint
        self.names = plan.names
        self._key_index = [self.names.index(k) for k in plan.key]
        self._open_source(reconnect=False)
        self.target: Target = self._open_target(reconnect=False)
        self._frame_targets: dict[tuple[str, ...], Target] = {}
        self._dirty = False

    def _open_source(self, reconnect: bool) -> None:
        self.sconn = self.dbs.source(reconnect)
        self.source = self.plan.reader(self.sconn)
        self.sconn.rollback()

    def _open_target(self, reconnect: bool) -> Target:
        plan = self.plan
        if plan.target_family == "postgresql":
            return self._target(self.dbs.target_pg(reconnect), plan.write_names)
        return self._target(self.dbs.target_sa(reconnect), plan.write_names)

    def _target(self, conn: Any, names: tuple[str, ...], stage: str = STAGE_TABLE) -> Target:
        plan = self.plan
        args: dict[str, Any] = {"mode": plan.spec.mode, "conflict_key": plan.conflict_key,
                                "key": plan.target_key}
        if plan.target_family == "postgresql":
            name = plan.spec.target_table
            return PgTarget(conn, TableName(name.schema or "public", name.name), names,
                            stage=stage, **args)
        return SqlaTarget(conn, self.target_schema, names, **args)

    def _reconnect(self) -> None:
        """After a failed attempt: fresh connections (a dropped one cannot be reused)."""
        self.sconn.close()
        self._open_source(reconnect=True)
        if isinstance(self.target, SqlaTarget) or not self.target.usable():
            self.target.close()
            self.target = self._open_target(reconnect=True)
            self._frame_targets.clear()
        self.run.ensure_connected()

    def close(self) -> None:
        self.sconn.close()
        self.target.close()

    def metadata(self) -> dict[str, Any]:
        """What the run's report adds from this step: MySQL zero dates read as NULL."""
        return {"zero_dates": self.source.zero_dates}

    @property
    def state_conn(self) -> Any:
        """The psycopg connection the checkpoint goes through: the target's when it holds the
        state store, else the state store's own."""
        if self.plan.spec.state_in_target:
            assert isinstance(self.target, PgTarget)
            return self.target.conn
        return self.run.store.conn

    def empty_target(self, cp: Checkpoint) -> None:
        """``replace`` at the start of a fresh run. With the state store elsewhere the reset
        checkpoint goes first: a crash before the rows go leaves a checkpoint without a
        chunk, and such a run empties the target again, which loses nothing."""
        spec = self.plan.spec
        if not spec.state_in_target:
            with self.run.store.conn.transaction():
                write_checkpoint(self.run.store.conn, cp, schema=spec.state_schema)
        with self.target.transaction():
            self.target.truncate()
            if spec.state_in_target:
                write_checkpoint(self.state_conn, cp, schema=spec.state_schema)

    def after_key(self, cp: Checkpoint) -> tuple[Any, ...] | None:
        if cp.last_key is None:
            return None
        return key_from_json(cp.last_key_json, self.plan.key_columns, self.plan.source_family)

    def count_remaining(self, cp: Checkpoint) -> tuple[int, bool]:
        try:
            n = self.source.count(self.after_key(cp), cap=EXACT_COUNT_ROWS + 1)
            if n <= EXACT_COUNT_ROWS:
                return n, True
            return max(n, estimate(self.sconn, self.plan)), False
        finally:
            self.sconn.rollback()

    def committed(self, cp: Checkpoint) -> Checkpoint | None:
        """Before a retry: the stored checkpoint, past ``cp`` when the failed attempt committed
        after all. With the state store elsewhere the target may hold a chunk whose checkpoint
        was lost: the retry of an append/replace first deletes that chunk's keys."""
        spec = self.plan.spec
        try:
            if self._dirty:
                self._reconnect()
            stored = committed_after_all(self.state_conn, spec.job_id, self.run.run_id, cp,
                                         spec.state_schema)
        except BaseException:
            self._dirty = True
            raise
        self._dirty = False
        if stored is not None:
            return stored
        if not spec.state_in_target and spec.mode in (Mode.APPEND, Mode.REPLACE):
            self.guard = True
        return None

    def __call__(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        if self._dirty:
            self._reconnect()
        with recategorising(on_error=self._mark_dirty):
            return self._chunk(cp, size)

    def _mark_dirty(self) -> None:
        self._dirty = True  # the next attempt reconnects first

    def _chunk(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        spec = self.plan.spec
        try:
            chunk = self.source.read(self.after_key(cp), size)
        finally:
            self.sconn.rollback()  # end the read: the next chunk sees the source as it is then
        if chunk is None:
            return None
        rows = chunk.rows
        # the transform runs before the chunk's transaction: a target for its columns may
        # have to be set up first
        shaped = self._transform(rows) if spec.transform is not None else None
        removed = 0
        with self.target.transaction():
            if self.guard:
                removed = self.target.delete_keys(rows)
            failures: list[Failure]
            if shaped is None:
                written = self._write(self.target, rows, cp, len(rows), 0)
                failures = [(i, Category.DATA, e) for i, e in written.bad]
                dropped = 0
            else:
                written = self._write(shaped.target, shaped.rows, cp, len(rows),
                                      len(shaped.rejected))
                failures = [(shaped.origin[i], Category.DATA, e) for i, e in written.bad]
                failures += [(i, Category.VALIDATION, reason) for i, reason in shaped.rejected]
                dropped = shaped.dropped
            letters = self._letters(rows, sorted(failures, key=lambda f: f[0]),
                                    cp.chunk_index + 1)
            key_json = key_to_json(chunk.last_key)
            outcomes = written.outcomes if spec.mode in (Mode.UPSERT, Mode.IGNORE) else {}
            nbytes = row_bytes(rows)
            # the checksum covers the chunk's keys (which rows it holds): hashing every value
            # would cost a tenth of the copy's time in Python
            keys = repr([tuple(r[i] for i in self._key_index) for r in rows]).encode()
            new = dataclasses.replace(
                cp, chunk_index=cp.chunk_index + 1,
                last_key=tuple("" if v is None else str(v) for v in key_json),
                last_key_json=key_json, processed=cp.processed + len(rows),
                succeeded=cp.succeeded + written.rows - written.not_kept,
                failed=cp.failed + len(letters),
                skipped=cp.skipped + written.not_kept + dropped,
                outcomes=run_result.add_counts(cp.outcomes, outcomes), bytes=cp.bytes + nbytes,
                checksum=hashlib.blake2b(keys, digest_size=16).hexdigest(),
                run_id=self.run.run_id, updated_at=utc_now())
            last_error = letters[-1]["error_message"] if letters else None
            spec.limits.check(new.failed, new.processed, last_error)
            self.run.assert_lock_held()
            if spec.state_in_target:
                insert_dead_letters(self.state_conn, letters, schema=spec.state_schema)
                write_checkpoint(self.state_conn, new, schema=spec.state_schema)
        if not spec.state_in_target:
            with self.run.store.conn.transaction():
                insert_dead_letters(self.run.store.conn, letters, schema=spec.state_schema)
                write_checkpoint(self.run.store.conn, new, schema=spec.state_schema)
        if self.guard:
            if removed:
                log.warning("removed %d row(s) that a crashed run had committed without its "
                            "checkpoint; they were written again", removed)
            else:
                self.guard = False
        errors = [RowError(item_identifier=str(r["item_key"]), error_type=r["error_type"],
                           category=r["category"], error_message=r["error_message"],
                           chunk_index=r["chunk_index"]) for r in letters]
        return StepOutcome(new, len(rows), nbytes, errors)

    def _write(self, target: Target, rows: list[tuple[Any, ...]], cp: Checkpoint, total: int,
               failed_before: int) -> _Written:
        """Write the rows in a savepoint; on a data error, bisect until each bad row stands
        alone, so the good rows still commit with the chunk. ``total`` rows of the source
        are in the chunk, ``failed_before`` of them failed already (rejected by a transform)."""
        spec = self.plan.spec
        out = _Written()

        def write_slice(a: int | None, b: int) -> int:
            with recategorising(), target.savepoint():
                stats = target.write(rows[a or 0:b])
            out.rows += stats.rows
            for name, n in stats.outcomes().items():
                out.outcomes[name] = out.outcomes.get(name, 0) + n
            return stats.rows

        if not rows:
            return out
        try:
            write_slice(0, len(rows))
        except Exception as exc:
            if not is_data_error(exc):
                raise
            log.warning("rows after key %s: %s; isolating the bad rows among %d",
                        cp.last_key_json if cp.last_key is not None else "(start)",
                        describe_error(exc, spec.target)[:200], len(rows))

            def give_up(n_bad: int, error: BaseException) -> None:
                spec.limits.check(cp.failed + failed_before + n_bad, cp.processed + total,
                                  describe_error(error, spec.target))

            found = isolate(0, len(rows), len(rows), exc, write=write_slice,
                            split=lambda a, n: (a or 0) + n, count=None, give_up=give_up,
                            locate=target.locate)
            out.bad = [(b.hi - 1, b.error) for b in found.bad]
        return out

    def _transform(self, rows: list[tuple[Any, ...]]) -> _Transformed:
        """Run the transform on the chunk as a DataFrame (source names); its kept rows under
        their target names, with the target that writes their columns."""
        spec, plan = self.plan.spec, self.plan
        assert spec.transform is not None
        name = spec.transform_name or "transform"
        df = transforms.frame(rows, plan.columns)
        at = {k: i for i, k in enumerate(df.select(list(plan.key)).iter_rows())}
        applied = transforms.apply(spec.transform, df, plan.key, name)
        kept = applied.kept
        origin = [at[k] for k in kept.select(list(plan.key)).iter_rows()]
        rejected = []
        for keys, reason in applied.rejected:
            where = at.get(tuple(keys[k] for k in plan.key))
            if where is None:
                raise transforms.TransformError(
                    f"transform {name} rejected a row with key {list(keys.values())} that is "
                    "not in its input; it must leave key columns unchanged")
            rejected.append((where, reason))
        kept = kept.rename({k: v for k, v in plan.renamed.items() if k in kept.columns})
        return _Transformed(self._frame_target(tuple(kept.columns)), kept.rows(), origin,
                            rejected, applied.dropped)

    def _frame_target(self, names: tuple[str, ...]) -> Target:
        """The target writing a transform's result columns (checked against the table), on
        the connection of the chunk's transaction."""
        if names == self.plan.write_names:
            return self.target
        cached = self._frame_targets.get(names)
        if cached is not None:
            return cached
        spec = self.plan.spec
        known = {c.name for c in self.target_schema.columns}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise TargetError(
                f"the transform returns column(s) {', '.join(unknown)} that {spec.target_table} "
                "does not have; add them to the target table (create it first), or drop them "
                "in the transform")
        absent = [k for k in self.plan.conflict_key if k not in names]
        if absent:
            raise TargetError(
                f"the transform's result has no column(s) {', '.join(absent)}, which --mode "
                f"{spec.mode.value} matches rows of {spec.target_table} on; keep them")
        stage = f"{STAGE_TABLE}_{hashlib.blake2b(repr(names).encode(), digest_size=4).hexdigest()}"
        target = self._target(self.target.conn, names, stage)
        self._frame_targets[names] = target
        return target

    def _letters(self, rows: list[tuple[Any, ...]], failures: Sequence[Failure],
                 chunk_index: int) -> list[dict[str, Any]]:
        """Dead letters of the failed rows, each with its original source row."""
        spec = self.plan.spec
        out = []
        for i, category, error in failures:
            row = rows[i]
            if isinstance(error, BaseException):
                (etype, state), message = error_name(error), describe_error(error, spec.target)
            else:
                etype, state, message = "Rejected", None, error
            out.append({
                "job_id": spec.job_id, "run_id": self.run.run_id, "chunk_index": chunk_index,
                "item_key": [jsonable(row[k]) for k in self._key_index],
                "row_data": {n: jsonable(v) for n, v in zip(self.names, row, strict=True)},
                "error_type": etype, "sqlstate": state, "category": category.value,
                "error_message": message, "attempts": 1})
        return out


__all__ = ["EXACT_COUNT_ROWS", "SqlCopyStep"]
