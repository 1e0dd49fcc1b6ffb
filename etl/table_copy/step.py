"""One chunk of a PostgreSQL → PostgreSQL copy: bound → COPY out → COPY in → checkpoint,
committed together; bad rows isolated so the good ones still go in."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import pg, run_result, transforms
from ..errors import TargetError, sqlstate_of
from ..isolate import BadRange, is_data_error, isolate
from ..model import Category, Checkpoint, Mode
from ..piecewise import PiecewiseWriter
from ..report import RowError, utc_now
from ..runner import StepOutcome
from ..sinks.pg_copy import PgCopySink, WriteStats
from ..sinks.pg_merge import PgMergeSink
from ..sources.pg import Bound, PgKeysetSource, Piece
from ..state.store import committed_after_all, insert_dead_letters, write_checkpoint
from .plan import CopyPlan

if TYPE_CHECKING:
    import psycopg

    from ..jobrun import JobRun

log = logging.getLogger(__name__)


# After a data error, chunks are written as COPY statements of this many rows, each in a
# savepoint of the chunk's transaction: a failed statement wastes at most this much work,
# and a statement boundary costs a round trip where a smaller chunk would cost a commit.
PIECE_ROWS_AFTER_DATA_ERRORS = 10_000
# After this many pieces refused in a row, a refused piece is halved instead of cut at the
# row the server names: cutting costs a statement of the rest per bad row, halving log n.
DENSE_REFUSALS = 3


@dataclass
class _Written:
    """What went into the target for one chunk, and the ranges that would not."""

    rows: int
    bytes: int
    checksum: str
    bad: list[BadRange[Bound]] = dataclasses.field(default_factory=list)
    last_error: str | None = None
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)
    letters: list[dict] = dataclasses.field(default_factory=list)  # dead letters built already
    dropped: int = 0              # rows a transform left out

    @property
    def not_kept(self) -> int:
        """Rows written but not kept: their key existed (ignore) or a later row of the
        chunk had the same key."""
        return self.outcomes.get("ignored", 0) + self.outcomes.get("superseded", 0)


class CopyStep:
    """One chunk: bound → COPY out → COPY in → checkpoint, committed together.

    Before each attempt, connections the server or network dropped are opened
    again (and the job lock re-taken), so a retried chunk starts clean.
    """

    def __init__(self, plan: CopyPlan, sconn: psycopg.Connection, tconn: psycopg.Connection,
                 run: JobRun, *, replay_guard: bool) -> None:
        self.plan = plan
        self.run = run
        self.replay_guard = replay_guard
        self.piece_rows: int | None = None  # set once the run meets a data error
        # rows of a refused piece may go on with the next one, out of their order, unless rows
        # sharing a target key must be written in key order (the last one wins)
        self._carry = plan.spec.mode in (Mode.APPEND, Mode.REPLACE) or plan.conflict_on_key
        self._piecewise: PiecewiseWriter | None = None
        self._frame_sinks: dict[tuple[str, ...], PgCopySink | PgMergeSink] = {}
        # upsert/ignore read each chunk in key order: of rows sharing a target key, the
        # last in key order wins
        self.ordered = plan.spec.mode in (Mode.UPSERT, Mode.IGNORE)
        self.source = PgKeysetSource(sconn, plan.query, binary=plan.binary, ordered=self.ordered)
        self._use_target(tconn)

    def _use_target(self, tconn: psycopg.Connection) -> None:
        self.tconn = tconn
        spec = self.plan.spec
        self.sink: PgCopySink | PgMergeSink
        if spec.mode in (Mode.UPSERT, Mode.IGNORE):
            self.sink = PgMergeSink(tconn, spec.target_table, self.plan.write_columns,
                                    self.plan.conflict_key, spec.mode, binary=self.plan.binary,
                                    unique_rows=self.plan.conflict_on_key)
        else:
            self.sink = PgCopySink(tconn, spec.target_table, self.plan.write_columns,
                                   binary=self.plan.binary)

    def ensure_connected(self) -> None:
        spec = self.plan.spec
        if not pg.is_usable(self.source.conn):
            log.info("reconnecting to the source database")
            self.source = PgKeysetSource(
                pg.connect(spec.source, "source", autocommit=True, reconnect=True),
                self.plan.query, binary=self.plan.binary, ordered=self.ordered)
        if not pg.is_usable(self.tconn):
            log.info("reconnecting to the target database")
            self._use_target(pg.connect(spec.target, "target", autocommit=True, reconnect=True,
                                        settings=spec.target_settings))
        self.run.ensure_connected()

    def committed(self, cp: Checkpoint) -> Checkpoint | None:
        """Before a retry: the stored checkpoint, which is past ``cp`` when the failed attempt
        committed after all. With the state store elsewhere the target may hold a chunk
        whose checkpoint was lost: the retry of an append first deletes its key range."""
        spec = self.plan.spec
        self.ensure_connected()
        conn = self.tconn if spec.state_in_target else self.run.store.conn
        stored = committed_after_all(conn, spec.job_id, self.run.run_id, cp, spec.state_schema)
        if stored is not None:
            return stored
        if not spec.state_in_target and spec.mode in (Mode.APPEND, Mode.REPLACE):
            self.replay_guard = True
        return None

    def close(self) -> None:
        if self._piecewise is not None:
            self._piecewise.close()
        for conn in (self.source.conn, self.tconn):
            conn.close()

    def __call__(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        spec = self.plan.spec
        self.ensure_connected()
        lower = Bound(cp.last_key, cp.last_key_json) if cp.last_key is not None else None
        with self.source.conn.transaction():
            bound = self.source.next_bound(cp.last_key, size)
            if bound is None:
                return None
            with self.tconn.transaction():
                replayed = self._delete_replayed(cp.last_key, bound.text) \
                    if self.replay_guard else 0
                written = self._write(lower, bound, cp)
                dead = self._dead_letters(written.bad, cp.chunk_index + 1)
                dead.append([{**r, "chunk_index": cp.chunk_index + 1} for r in written.letters])
                failed = sum(len(d) for d in dead)
                new = dataclasses.replace(
                    cp, chunk_index=cp.chunk_index + 1, last_key=bound.text,
                    last_key_json=bound.json,
                    processed=cp.processed + written.rows + failed + written.dropped,
                    succeeded=cp.succeeded + written.rows - written.not_kept,
                    failed=cp.failed + failed,
                    skipped=cp.skipped + written.not_kept + written.dropped,
                    outcomes=run_result.add_counts(cp.outcomes, written.outcomes),
                    bytes=cp.bytes + written.bytes, checksum=written.checksum,
                    run_id=self.run.run_id, updated_at=utc_now())
                spec.limits.check(new.failed, new.processed, written.last_error)
                records = [r for d in dead for r in d]
                self.run.assert_lock_held()
                if spec.state_in_target:
                    insert_dead_letters(self.tconn, records, schema=spec.state_schema)
                    write_checkpoint(self.tconn, new, schema=spec.state_schema)
        if not spec.state_in_target:
            with self.run.store.conn.transaction():
                insert_dead_letters(self.run.store.conn, records, schema=spec.state_schema)
                write_checkpoint(self.run.store.conn, new, schema=spec.state_schema)
        if replayed:
            log.warning("removed %d row(s) that an earlier attempt had committed without its "
                        "checkpoint; they were written again", replayed)
        # the lost chunk may have been larger than this one: guard until a range held nothing
        self.replay_guard = self.replay_guard and replayed > 0
        errors = [RowError(item_identifier=json.dumps(r["item_key"], default=str),
                           error_type=r["error_type"], category=r["category"],
                           error_message=r["error_message"], chunk_index=r["chunk_index"])
                  for r in records]
        return StepOutcome(new, written.rows + failed, written.bytes, errors)

    def _write(self, lower: Bound | None, upper: Bound, cp: Checkpoint) -> _Written:
        """COPY the chunk; on a data error, isolate the bad rows so the good ones still go in.

        The chunk goes as one COPY statement until the run meets its first bad row.
        From then on (unique keys), chunks are written as statements of
        ``piece_rows`` rows cut from one source stream, each in a savepoint and kept
        in memory until it is written, so a bad row costs one failed statement of a
        piece and is isolated in memory. Other keys are bisected by key range.
        """
        if self.plan.spec.transform is not None:
            return self._write_transformed(lower, upper, cp)
        out = _Written(rows=0, bytes=0, checksum="")
        digest = hashlib.blake2b(digest_size=16)

        def write_range(lo: Bound | None, hi: Bound) -> int:
            return self._commit_piece(self.sink.write, self.source.copy_out(lo.text if lo else None, hi),
                                      out, digest)

        if self.piece_rows is None:
            try:
                out.rows = write_range(lower, upper)
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                if not self.plan.unique_key:
                    self._bisect_by_key(lower, upper, exc, write_range, cp, out)
                else:
                    log.info("bad rows found: from here on chunks are written as COPY "
                             "statements of %d rows, so the next bad row costs little",
                             PIECE_ROWS_AFTER_DATA_ERRORS)
                    self.piece_rows = PIECE_ROWS_AFTER_DATA_ERRORS
        if self.piece_rows is not None and not out.rows and not out.bad:
            self._write_pieces(lower, upper, cp, out, digest)
        if out.bad:
            out.last_error = pg.describe_error(out.bad[-1].error, self.plan.spec.target)
        out.checksum = digest.hexdigest()
        return out

    def _commit_piece(self, write: Callable[[Any], WriteStats], data: Any, out: _Written,
                      digest: Any) -> int:
        """Write in a savepoint: a failure undoes this piece only."""
        with self.tconn.transaction():
            stats = write(data)
        return self._count_piece(stats, out, digest)

    @staticmethod
    def _count_piece(stats: WriteStats, out: _Written, digest: Any) -> int:
        for name, n in (stats.outcomes or {}).items():
            out.outcomes[name] = out.outcomes.get(name, 0) + n
        out.bytes += stats.bytes
        digest.update(bytes.fromhex(stats.checksum))
        return stats.rows

    def _write_pieces(self, lower: Bound | None, upper: Bound, cp: Checkpoint, out: _Written,
                      digest: Any) -> None:
        """The chunk as COPY statements of ``piece_rows`` rows (etl.piecewise); a refused
        piece is isolated in memory, and each bad row's key is read from its own bytes."""
        spec = self.plan.spec
        bad: list[tuple[bytes, BaseException]] = []  # the row's COPY data, error

        refusals = [0]  # pieces refused in a row: bad rows come densely

        def written(piece: Piece, stats: WriteStats) -> None:
            refusals[0] = 0
            out.rows += self._count_piece(stats, out, digest)

        def refused(piece: Piece, offset: int, exc: BaseException) -> Piece | None:
            def give_up(n_bad: int, error: BaseException) -> None:
                spec.limits.check(cp.failed + len(bad) + n_bad, cp.processed + offset + len(piece),
                                  pg.describe_error(error, spec.target))

            def write_slice(a: int | None, b: int) -> int:
                return self._commit_piece(self.sink.write_rows, piece.rows(a or 0, b), out, digest)

            refusals[0] += 1
            at = pg.copy_error_line(exc)
            if refusals[0] > DENSE_REFUSALS:
                # one bad row after another (a restart onto rows already there, say): cutting
                # at each named row would write the rest again per bad row; halving writes
                # each row O(log n) times, and a threshold stops it early
                found = isolate(0, len(piece), len(piece), exc, write=write_slice,
                                split=lambda a, n: (a or 0) + n, count=None, give_up=give_up)
                out.rows += found.good_rows
                bad.extend((piece.rows(b.hi - 1, b.hi), b.error) for b in found.bad)
                return None
            if self._carry and at is not None and 1 <= at <= len(piece):
                # the server named the row: if it fails alone too, it is bad whatever comes
                # before it, and the others go on with the next piece
                error = self._fails_alone(piece.rows(at - 1, at))
                if error is not None:
                    bad.append((piece.rows(at - 1, at), error))
                    give_up(0, error)
                    return piece.without(at - 1)
                # it failed only after the rows before it (a duplicate of one of them): in order
            found = isolate(0, len(piece), len(piece), exc, write=write_slice,
                            split=lambda a, n: (a or 0) + n, count=None,
                            give_up=give_up, locate=pg.copy_error_line)
            out.rows += found.good_rows
            bad.extend((piece.rows(b.hi - 1, b.hi), b.error) for b in found.bad)
            return None

        with self.source.row_stream(lower.text if lower else None, upper) as stream:
            self._pieces().write(stream, on_written=written, on_refused=refused)
        # the source stream is finished: now its connection can look up the bad rows
        keys = self.source.keys_of_rows([row for row, _ in bad])
        originals = self.source.rows_by_key(keys)
        names = [k.name for k in self.plan.key]
        for (_, error), key, row in zip(bad, keys, originals, strict=True):
            out.letters.append({
                "job_id": spec.job_id, "run_id": self.run.run_id,
                "item_key": [(row or {}).get(n, v) for n, v in zip(names, key, strict=True)],
                "row_data": row, "error_type": type(error).__name__,
                "sqlstate": sqlstate_of(error), "category": Category.DATA.value,
                "error_message": pg.describe_error(error, spec.target), "attempts": 1})
            out.last_error = out.letters[-1]["error_message"]

    def _fails_alone(self, row: bytes) -> BaseException | None:
        """The data error of writing ``row`` on its own, or None; nothing is kept either way."""
        try:
            with self.tconn.transaction(force_rollback=True):
                self.sink.write_rows(row)
        except Exception as exc:
            if not is_data_error(exc):
                raise
            return exc
        return None

    def _pieces(self) -> PiecewiseWriter:
        assert self.piece_rows is not None
        if self._piecewise is None or self._piecewise.conn is not self.tconn:
            if self._piecewise is not None:
                self._piecewise.close()
            self._piecewise = PiecewiseWriter(self.tconn, self.sink.start, self.piece_rows)
        return self._piecewise

    def _write_transformed(self, lower: Bound | None, upper: Bound, cp: Checkpoint) -> _Written:
        """Decode the chunk, run the transform, write its result as CSV COPY in a savepoint;
        rows the transform rejects and rows the target refuses become dead letters."""
        spec = self.plan.spec
        assert spec.transform is not None
        out = _Written(rows=0, bytes=0, checksum="")
        digest = hashlib.blake2b(digest_size=16)
        key = tuple(k.name for k in self.plan.key)
        applied = transforms.apply(spec.transform, self.source.fetch_frame(lower, upper), key,
                                   spec.transform_name or "transform")
        kept = applied.kept.rename({k: v for k, v in self.plan.renamed.items()
                                    if k in applied.kept.columns})
        sink = self._frame_sink(tuple(kept.columns))

        def write_slice(a: int | None, b: int) -> int:
            start = a or 0
            data = kept.slice(start, b - start).write_csv(include_header=False).encode()
            return self._commit_piece(sink.write, [data], out, digest)

        bad: list[tuple[int, BaseException]] = []
        if kept.height:
            try:
                out.rows = write_slice(0, kept.height)
            except Exception as exc:
                if not is_data_error(exc):
                    raise

                def give_up(n_bad: int, error: BaseException) -> None:
                    spec.limits.check(cp.failed + len(applied.rejected) + n_bad,
                                      cp.processed + kept.height, pg.describe_error(error))

                found = isolate(0, kept.height, kept.height, exc, write=write_slice,
                                split=lambda a, n: (a or 0) + n, count=None, give_up=give_up,
                                locate=pg.copy_error_line)
                out.rows = found.good_rows
                bad = [(b.hi - 1, b.error) for b in found.bad]
        failures = [(tuple(kept.select(list(key)).row(i)), Category.DATA, type(e).__name__,
                     sqlstate_of(e), pg.describe_error(e, spec.target)) for i, e in bad]
        failures += [(tuple(k[name] for name in key), Category.VALIDATION, "Rejected", None,
                      reason) for k, reason in applied.rejected]
        originals = self.source.rows_by_key([f[0] for f in failures])
        out.letters = [{
            "job_id": spec.job_id, "run_id": self.run.run_id,
            "item_key": [(row or {}).get(k, v) for k, v in zip(key, keyv, strict=True)],
            "row_data": row, "error_type": etype, "sqlstate": state, "category": cat.value,
            "error_message": message, "attempts": 1,
        } for (keyv, cat, etype, state, message), row in zip(failures, originals, strict=True)]
        out.dropped = applied.dropped
        if failures:
            out.last_error = failures[-1][4]
        out.checksum = digest.hexdigest()
        return out

    def _frame_sink(self, names: tuple[str, ...]) -> PgCopySink | PgMergeSink:
        """A CSV COPY sink for a transform's result columns (checked against the target)."""
        spec = self.plan.spec
        cached = self._frame_sinks.get(names)
        if cached is not None and cached.conn is self.tconn:
            return cached
        known = {c.name: c for c in self.plan.target_columns}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise TargetError(
                f"the transform returns column(s) {', '.join(unknown)} that {spec.target_table} "
                "does not have; add them to the target table (create it first), or drop them "
                "in the transform")
        cols = tuple(known[n] for n in names)
        sink: PgCopySink | PgMergeSink
        if spec.mode in (Mode.UPSERT, Mode.IGNORE):
            sink = PgMergeSink(self.tconn, spec.target_table, cols, self.plan.conflict_key,
                               spec.mode, csv=True, unique_rows=self.plan.conflict_on_key)
        else:
            sink = PgCopySink(self.tconn, spec.target_table, cols, csv=True)
        self._frame_sinks[names] = sink
        return sink

    def _bisect_by_key(self, lo: Bound | None, hi: Bound, exc: Exception,
                       write_range: Callable[[Bound | None, Bound], int], cp: Checkpoint,
                       out: _Written) -> None:
        """Keys that are not unique: halve the key range until each bad key stands alone."""
        spec = self.plan.spec
        rows = self.source.count_range(lo, hi)
        log.warning("rows after key %s: %s; isolating the bad rows among %d",
                    lo.json if lo else "(start)", pg.describe_error(exc)[:200], rows)

        def give_up(bad: int, error: BaseException) -> None:
            # already over a threshold even if every other row of the range is good
            spec.limits.check(cp.failed + bad, cp.processed + rows,
                              pg.describe_error(error, spec.target))

        found = isolate(lo, hi, rows, exc, write=write_range,
                        split=lambda a, n: self._split(a, n),
                        count=self.source.count_range, give_up=give_up)
        out.rows += found.good_rows
        out.bad.extend(found.bad)

    def _split(self, lower: Bound | None, n: int) -> Bound:
        bound = self.source.next_bound(lower.text if lower else None, n)
        assert bound is not None, "a non-empty range has a bound"
        return bound

    def _dead_letters(self, bad: list[BadRange[Bound]], chunk_index: int) -> list[list[dict]]:
        """The rows of each bad range, as dead-letter records (original source values)."""
        spec = self.plan.spec
        out = []
        for item in bad:
            message = pg.describe_error(item.error, spec.target)
            out.append([{
                "job_id": spec.job_id, "run_id": self.run.run_id, "chunk_index": chunk_index,
                "item_key": key, "row_data": row, "error_type": type(item.error).__name__,
                "sqlstate": sqlstate_of(item.error), "category": Category.DATA.value,
                "error_message": message, "attempts": 1,
            } for row, key in self.source.rows_as_json(item.lo, item.hi)])
        return out

    def _delete_replayed(self, lower: tuple[str, ...] | None, upper: tuple[str, ...]) -> int:
        """State elsewhere: rows of a chunk whose checkpoint was lost are removed, then
        rewritten; returns how many there were."""
        target_key = tuple(c for c in self.plan.write_columns
                           if c.name in {self.plan.renamed.get(k.name, k.name) for k in self.plan.key})
        q = dataclasses.replace(self.plan.query, table=self.plan.spec.target_table, key=target_key,
                                source_sql=None, where=None)
        return max(self.tconn.execute(q.delete_range_sql(lower is not None),
                                      q.params(lower, upper)).rowcount, 0)
