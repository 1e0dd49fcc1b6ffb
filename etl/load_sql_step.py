"""One chunk of `etl load` into MySQL/MariaDB or SQLite (``etl.load_sql``).

The next ``n`` rows of the current file are parsed (``etl.load_parse``) and converted
(``etl.load_values``) in Python; a row that does not parse or convert is a dead letter at
once. The others are written in **one target transaction** with executemany
(``etl.sinks.sql.SqlSink``), in statements of ``PIECE_ROWS``; a statement the database
refuses is bisected in savepoints (``etl.isolate``) until each refused row (NOT NULL,
CHECK, foreign key, a duplicate key in append, a value too long) stands alone. The same
transaction upserts the job's row of ``etl_load_checkpoints`` and keeps the chunk's dead
letters in ``etl_load_rejects`` (``etl.load_sql_target``); right after it commits, the
dead letters and the checkpoint go to the state store (one transaction there), and the
next chunk's transaction deletes the dead letters the state store now holds.
``sync_state`` brings the state store up to the target after a crash or a failed write.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .isolate import is_data_error, isolate
from .load_formats import BytesProgress, append_rejects, errors_of, next_file
from .load_parse import CsvFields, ndjson_object, parquet_values
from .load_sql_target import (
    LOAD_ID_KEY,
    REJECTS_TABLE,
    Stored,
    add_rejects,
    drop_rejects,
    pending_rejects,
    read_position,
    save_position,
)
from .load_values import ConversionError, converter
from .model import Category, Checkpoint, Mode
from .report import utc_now
from .runner import StepOutcome
from .sources.csv_rows import CsvRows, Position
from .sql_copy_io import SqlaTarget, describe_error, error_name, jsonable, recategorising, row_bytes
from .state.store import insert_dead_letters, read_checkpoint, write_checkpoint

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from .jobrun import JobRun
    from .load_sql import SqlLoadPlan
    from .load_sql_target import TargetDb

log = logging.getLogger(__name__)

# Rows an executemany statement of a chunk holds: a refused row is isolated among these.
PIECE_ROWS = 5_000




@dataclass
class _Written:
    kept: int = 0        # rows written that count as succeeded
    not_kept: int = 0    # ignored (existing key) or superseded (a later row of the key)
    bad: list[tuple[int, BaseException]] = dataclasses.field(default_factory=list)


def sync_state(conn: Connection, run: JobRun, stored: Stored,
               plan: SqlLoadPlan) -> list[dict[str, Any]]:
    """Bring the state store up to the target's row of the job: the dead letters it lacks
    (kept in ``etl_load_rejects``) and the checkpoint, in one state-store transaction; then
    delete the target's copies. Returns the dead letters moved (also appended to
    --rejects). Idempotent: after a crash anywhere in here, the next call finishes it."""
    spec = plan.spec
    store = run.store.conn
    found = read_checkpoint(store, spec.job_id, spec.state_schema)
    # the chunks of this load the state store holds (with their dead letters): its
    # checkpoint's, when that checkpoint is of this load at all
    synced = found[0].chunk_index if found is not None and \
        (found[0].watermark or {}).get(LOAD_ID_KEY) == stored.load_id else None
    moved: list[dict[str, Any]] = []
    if synced != stored.checkpoint.chunk_index or found is None \
            or found[1] != stored.finished:
        if synced is not None and synced > stored.checkpoint.chunk_index:
            log.warning("the state store's checkpoint of %s (chunk %d) is past the target's "
                        "(chunk %d): the target's is kept", spec.job_id, synced,
                        stored.checkpoint.chunk_index)
        moved = pending_rejects(conn, spec.job_id, stored.load_id, synced or 0)
        conn.rollback()
        with store.transaction():
            insert_dead_letters(store, moved, schema=spec.state_schema)
            write_checkpoint(store, stored.checkpoint, finished=stored.finished,
                             schema=spec.state_schema)
        if moved:
            log.warning("%d dead letter(s) of chunks the state store had not recorded were "
                        "moved there from the target's %s", len(moved), REJECTS_TABLE)
    with conn.begin():
        drop_rejects(conn, spec.job_id)
    append_rejects(plan.spec.rejects, plan.format.where, moved)
    return moved






class SqlLoadStep:
    """One chunk: the next rows of the current file, in one target transaction."""

    def __init__(self, plan: SqlLoadPlan, db: TargetDb, run: JobRun, conn: Connection,
                 load_id: str) -> None:
        self.plan = plan
        self.db = db
        self.run = run
        self.load_id = load_id
        self.names = tuple(c.name for c in plan.columns)
        self._convert = [converter(c, db.family, plan.spec.date_order) for c in plan.columns]
        self._bytes = BytesProgress(plan.format, plan.spec.files)
        self._csv = CsvFields(plan.spec.csv) if plan.format.name == "csv" else None
        self._rows: Any = None
        self._dirty = False
        self._drop_upto: int | None = None  # dead letters the state store holds: delete them
        self._use(conn)

    def _use(self, conn: Connection) -> None:
        spec = self.plan.spec
        self.conn = conn
        self.target = SqlaTarget(conn, self.plan.table, self.names, mode=spec.mode,
                                 conflict_key=self.plan.conflict_key, key=())

    def _reconnect(self) -> None:
        try:
            self.conn.close()
        except Exception:  # a dead connection may fail to close; it is dropped either way
            pass
        self._use(self.db.connect(reconnect=True))
        self.run.ensure_connected()
        self._dirty = False

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()
            self._rows = None
        self.conn.close()

    # -- the start and the end of a load -------------------------------------------------
    def begin(self, cp: Checkpoint) -> None:
        """A fresh load: ``replace`` empties the table in the transaction that writes the
        job's first row of etl_load_checkpoints; then the state store's checkpoint."""
        spec = self.plan.spec
        with self.target.transaction():
            if spec.mode is Mode.REPLACE:
                self.target.truncate()
            self.run.assert_lock_held()
            save_position(self.conn, cp)
        store = self.run.store.conn
        with store.transaction():
            write_checkpoint(store, cp, schema=spec.state_schema)

    def finish(self, cp: Checkpoint) -> None:
        spec = self.plan.spec
        if self._dirty:
            self._reconnect()
        with self.target.transaction():
            save_position(self.conn, cp, finished=True)
            drop_rejects(self.conn, spec.job_id)
        store = self.run.store.conn
        with store.transaction():
            write_checkpoint(store, cp, finished=True, schema=spec.state_schema)

    def committed(self, cp: Checkpoint) -> Checkpoint | None:
        """Before a retry: the target's row, past ``cp`` when the failed attempt committed
        there after all (the state store is then brought up to it)."""
        try:
            if self._dirty:
                self._reconnect()
            stored = read_position(self.conn, self.plan.spec.job_id)
            self.conn.rollback()
            if stored is None or stored.load_id != self.load_id \
                    or stored.checkpoint.chunk_index <= cp.chunk_index:
                return None
            sync_state(self.conn, self.run, stored, self.plan)
        except BaseException:
            self._dirty = True
            raise
        self._drop_upto = None
        return stored.checkpoint

    # -- a chunk -------------------------------------------------------------------------
    def __call__(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        if self._dirty:
            self._reconnect()
        with recategorising(on_error=self._mark_dirty):
            return self._chunk(cp, size)

    def _mark_dirty(self) -> None:
        self._dirty = True  # the next attempt reconnects first

    def _reader(self, index: int, at: Position) -> Any:
        """The rows of file ``index`` from ``at`` (kept open from chunk to chunk)."""
        path = self.plan.spec.files[index]
        r = self._rows
        if r is not None and r.path == path \
                and (r.position.offset, r.position.line) == (at.offset, at.line):
            return r
        if r is not None:
            r.close()
            self._rows = None
        fmt = self.plan.format.name
        if fmt == "parquet":
            r = parquet_values(path, at, self.names)
        elif fmt == "ndjson":
            r = CsvRows(path, at, quote=None)
        else:
            opts = self.plan.spec.csv
            r = CsvRows(path, at, quote=opts.quote.encode(),
                        escape=opts.escape.encode() if opts.escape else None)
            if at.offset == 0:  # the file's first chunk: skip lines, then the header
                for _ in range(opts.skip_lines + (1 if opts.header else 0)):
                    if r.next_row() is None:
                        break
        self._rows = r
        return r

    def _values(self, raw: Any) -> tuple[Any, ...]:
        """A row's values converted for its columns (raises ConversionError)."""
        if self._csv is not None:
            fields: Sequence[Any] = self._csv.split(raw)
            if len(fields) < len(self.names):
                raise ConversionError("BadCopyFileFormat", "22P04",
                                      f"missing data for column {self.names[len(fields)]} "
                                      f"({len(fields)} of {len(self.names)} fields)")
            if len(fields) > len(self.names):
                raise ConversionError("BadCopyFileFormat", "22P04",
                                      f"extra data after last expected column ({len(fields)} "
                                      f"fields, {len(self.names)} columns)")
        elif isinstance(raw, bytes):
            obj = ndjson_object(raw)
            fields = [obj.get(n) for n in self.names]
        else:
            fields = raw
        try:
            return tuple([None if v is None else f(v) for f, v in
                          zip(self._convert, fields, strict=True)])
        except ConversionError:
            pass
        for name, f, v in zip(self.names, self._convert, fields, strict=True):
            try:
                if v is not None:
                    f(v)
            except ConversionError as exc:  # the first failing column names the reason
                raise ConversionError(exc.error_type, exc.sqlstate,
                                      f"column {name}: {exc.message}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _chunk(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        spec = self.plan.spec
        found = next_file(cp, len(spec.files), self._reader)
        if found is None:
            return None
        index, at, rows = found
        lines = array("q")
        raws: list[Any] = []
        good: list[tuple[Any, ...]] = []
        origin: list[int] = []
        failures: list[tuple[int, BaseException]] = []
        for _ in range(size):
            found = rows.next_row()
            if found is None:
                break
            raw, line = found
            lines.append(line)
            raws.append(raw)
            try:
                good.append(self._values(raw))
                origin.append(len(raws) - 1)
            except ConversionError as exc:
                failures.append((len(raws) - 1, exc))
        n = len(raws)
        at_end = rows.position
        nbytes, total = self._progress(index, at, at_end, raws, cp.processed + n)
        with self.target.transaction():
            if self._drop_upto is not None:
                drop_rejects(self.conn, spec.job_id, self._drop_upto)
            written = self._write(good, cp, index, n, len(failures))
            failures += [(origin[i], e) for i, e in written.bad]
            failures.sort(key=lambda f: f[0])
            letters = self._letters(index, lines, raws, failures, cp.chunk_index + 1)
            new = dataclasses.replace(
                cp, chunk_index=cp.chunk_index + 1,
                last_key=(str(index), str(at_end.offset)),
                last_key_json=[index, at_end.offset, at_end.line],
                processed=cp.processed + n, succeeded=cp.succeeded + written.kept,
                failed=cp.failed + len(letters), skipped=cp.skipped + written.not_kept,
                bytes=cp.bytes + nbytes, run_id=self.run.run_id, updated_at=utc_now())
            spec.limits.check(new.failed, new.processed,
                              letters[-1]["error_message"] if letters else None)
            self.run.assert_lock_held()
            save_position(self.conn, new)
            add_rejects(self.conn, spec.job_id, self.load_id, letters)
        self._drop_upto = None
        store = self.run.store.conn
        with store.transaction():
            insert_dead_letters(store, letters, schema=spec.state_schema)
            write_checkpoint(store, new, schema=spec.state_schema)
        if letters:
            self._drop_upto = new.chunk_index
        append_rejects(self.plan.spec.rejects, self.plan.format.where, letters)
        return StepOutcome(new, n, nbytes, errors_of(letters), total=total)

    def _progress(self, index: int, at: Position, after: Position, raws: list[Any],
                  processed: int) -> tuple[int, int | None]:
        """The chunk's bytes and the job's total rows (``etl.load_formats.BytesProgress``;
        a Parquet chunk's bytes are its values' size)."""
        if self.plan.format.name == "parquet":
            return row_bytes(raws), None
        return self._bytes.after_chunk(index, at, after, len(raws), processed)

    def _write(self, rows: list[tuple[Any, ...]], cp: Checkpoint, index: int, total: int,
               failed_before: int) -> _Written:
        """Write ``rows`` in pieces, each in a savepoint; a piece the database refuses is
        bisected until each refused row stands alone (the good ones are written)."""
        spec = self.plan.spec
        out = _Written()

        def write_slice(piece: list[tuple[Any, ...]], a: int | None, b: int) -> int:
            with recategorising(), self.target.savepoint():
                stats = self.target.write(piece[a or 0:b])
            skipped = stats.ignored + stats.superseded
            out.kept += stats.rows - skipped
            out.not_kept += skipped
            return stats.rows

        for start in range(0, len(rows), PIECE_ROWS):
            piece = rows[start:start + PIECE_ROWS]
            try:
                write_slice(piece, 0, len(piece))
                continue
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                first = exc
            log.warning("%s: %s; isolating the refused rows among %d", spec.files[index],
                        describe_error(first, spec.target)[:200], len(piece))

            def give_up(n_bad: int, error: BaseException) -> None:
                spec.limits.check(cp.failed + failed_before + len(out.bad) + n_bad,
                                  cp.processed + total, describe_error(error, spec.target))

            found = isolate(0, len(piece), len(piece), first,
                            write=lambda a, b, p=piece: write_slice(p, a, b),  # type: ignore[misc]
                            split=lambda a, k: (a or 0) + k, count=None, give_up=give_up)
            out.bad += [(start + b.hi - 1, b.error) for b in found.bad]
        return out

    def _letters(self, index: int, lines: Sequence[int], raws: Sequence[Any],
                 failures: Sequence[tuple[int, BaseException]],
                 chunk_index: int) -> list[dict[str, Any]]:
        """Dead letters: file and line (a Parquet file's row), the raw text (a CSV row's
        fields as the CSV reader sees them too), and the reason."""
        spec = self.plan.spec
        fmt = self.plan.format
        name = str(spec.files[index])
        codec = self._csv.codec if self._csv is not None else "utf-8"
        out = []
        for i, error in failures:
            raw = raws[i]
            if not isinstance(raw, bytes):  # a Parquet row: its values as a JSON object
                raw = json.dumps({n: jsonable(v) for n, v in zip(self.names, raw, strict=True)},
                                 ensure_ascii=False).encode()
            text = raw.decode(codec, errors="replace").rstrip("\n").rstrip("\r")
            state: str | None
            if isinstance(error, ConversionError):
                etype, state, message = error.error_type, error.sqlstate, error.message
            else:
                (etype, state), message = error_name(error), describe_error(error, spec.target)
            out.append({
                "job_id": spec.job_id, "run_id": self.run.run_id, "chunk_index": chunk_index,
                "item_key": [name, lines[i]],
                "row_data": {"file": name, fmt.where: lines[i],
                             "raw": text.replace("\x00", "\\u0000"), **fmt.row_data(raw)},
                "error_type": etype, "sqlstate": state, "category": Category.DATA.value,
                "error_message": message.replace("\x00", "\\u0000"), "attempts": 1})
        return out


__all__ = ["PIECE_ROWS", "SqlLoadStep",
           "sync_state"]
