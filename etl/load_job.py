"""`etl load` of CSV, NDJSON and Parquet files into a PostgreSQL table, in resumable chunks,
with the rows PostgreSQL refuses set aside.

Each chunk is the next ``n`` rows of the current file, written in one target transaction
as statements of a few thousand rows (``etl.piecewise``) with the chunk's dead letters
and the job's checkpoint — the file, the position after the last row (the byte and its
line; a Parquet file's row) — so a crash leaves the chunk loaded or not, and a rerun
starts exactly after the last committed row. PostgreSQL parses and converts every value:
CSV with its own CSV COPY (what ``\\copy`` does), NDJSON and Parquet rows as JSON objects
(``etl.sinks.pg_json``; ``etl.load_formats`` holds what differs per format). A row it
refuses (a bad date, a short row, invalid JSON, a value too long, a NOT NULL, CHECK or
foreign key violation, invalid UTF-8, an unclosed quote) is isolated in its piece and
becomes a dead letter — file, line or row, the raw text, the error — and a line of
``--rejects`` (NDJSON); the good rows load. A file that changed since the run that began
loading it (size, mtime or its first 64 KiB) is refused unless ``--restart``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import catalog, lifecycle, pg
from .errors import UsageError, sqlstate_of
from .isolate import isolate
from .load_formats import (
    BytesProgress,
    FileFormat,
    LoadOptions,
    Rows,
    append_rejects,
    check_unchanged,
    errors_of,
    file_format,
    file_identities,
    next_file,
    position_of,
)
from .model import Category, Checkpoint, Column, Mode, TableName
from .piecewise import PiecewiseWriter
from .report import Result, utc_now
from .runner import StepOutcome, StopFlag
from .sinks.pg_copy import PgCopySink, WriteStats
from .sources.csv_rows import Position
from .sources.pg import Piece, RowStream
from .state.store import insert_dead_letters, read_checkpoint, write_checkpoint

if TYPE_CHECKING:
    import psycopg

    from .jobrun import JobRun
    from .progress import Progress

log = logging.getLogger(__name__)

# Rows a COPY statement of a chunk holds: a refused one wastes at most this much work.
PIECE_ROWS = 10_000
FILES_KEY = "files"  # the checkpoint's watermark: the identity of each file of the job


@dataclass(frozen=True, kw_only=True)
class LoadSpec(LoadOptions):
    """Everything `etl load` into PostgreSQL was asked to do, checked."""

    table: TableName

    @property
    def session_settings(self) -> dict[str, str]:
        """The target session's settings: the lock timeout, and the order of a date's
        fields (PostgreSQL's DateStyle) when --date-format gives one."""
        settings = pg.lock_timeout_settings(self.lock_timeout)
        if self.date_order:
            settings["DateStyle"] = f"ISO, {self.date_order}"
        return settings


@dataclass(frozen=True)
class LoadPlan:
    spec: LoadSpec
    columns: tuple[Column, ...]        # the target columns the files fill, in file order
    conflict_key: tuple[str, ...]      # upsert/ignore
    format: FileFormat                 # what differs per file format


def make_plan(spec: LoadSpec, conn: psycopg.Connection) -> LoadPlan:
    """Check the files and the target table; the columns come from --columns, the files
    (a CSV header, a Parquet schema), or the table (in its order)."""
    for f in spec.files:
        if not f.is_file():
            raise UsageError(f"{f}: no such file")
    fmt = file_format(spec.format, spec.csv)
    info = catalog.describe(conn, spec.table, role="target")
    by_name = {c.name: c for c in info.columns}
    names = fmt.file_columns(spec.files, spec.columns) or tuple(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UsageError(f"{spec.files[0]}: column(s) {', '.join(unknown)} are not in "
                         f"{spec.table} ({', '.join(by_name)}); {fmt.rename_hint}")
    conflict: tuple[str, ...] = ()
    if spec.mode in (Mode.UPSERT, Mode.IGNORE):
        usable = [k for k in catalog.unique_keys(conn, spec.table) if set(k) <= set(names)]
        if not usable:
            raise UsageError(f"--mode {spec.mode.value} matches rows on a primary key or unique "
                             f"index of {spec.table} among the loaded columns; there is none")
        conflict = usable[0]
    conn.rollback()
    return LoadPlan(spec, tuple(by_name[n] for n in names), conflict, fmt)


class LoadStep:
    """One chunk: the next rows of the current file, in one target transaction."""

    def __init__(self, plan: LoadPlan, conn: psycopg.Connection, run: JobRun) -> None:
        self.plan = plan
        self.format = plan.format
        self.run = run
        self._rows: Rows | None = None
        self._bytes = BytesProgress(plan.format, plan.spec.files)
        self._bad_bytes: dict[int, bytes] = {}  # a chunk's refused rows, by index in the chunk
        self._use(conn)

    def _use(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.sink = self.format.sink(conn, self.plan)
        self.writer = PiecewiseWriter(conn, self.sink.start, PIECE_ROWS)

    def ensure_connected(self) -> None:
        if not pg.is_usable(self.conn):
            log.info("reconnecting to the target database")
            self.writer.close()
            self._use(pg.connect(self.plan.spec.target, "target", autocommit=True,
                                 reconnect=True,
                                 settings=self.plan.spec.session_settings))
        self.run.ensure_connected()

    def close(self) -> None:
        self.writer.close()
        if self._rows is not None:
            self._rows.close()
        self.conn.close()

    def _reader(self, index: int, at: Position) -> Rows:
        """The rows of file ``index`` from ``at`` (kept open from chunk to chunk)."""
        spec = self.plan.spec
        r = self._rows
        if r is not None and r.path == spec.files[index] \
                and (r.position.offset, r.position.line) == (at.offset, at.line):
            return r
        if r is not None:
            r.close()
            self._rows = None
        r = self._rows = self.format.open(spec.files[index], at, self.plan)
        return r

    def __call__(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        spec = self.plan.spec
        self.ensure_connected()
        found = next_file(cp, len(spec.files), self._reader)
        if found is None:
            return None
        index, at, rows = found
        chunk = rows.chunk(size)
        bad: list[tuple[int, BaseException]] = []  # (row index in the chunk, error)
        written = [0]
        self._bad_bytes = {}
        with self.conn.transaction():
            stream = RowStream(chunk, binary=False)  # type: ignore[arg-type]
            self.writer.write(stream, on_written=lambda p, st: self._count(st, written),
                              on_refused=lambda p, off, exc: self._isolate(
                                  p, off, exc, bad, written, cp))
            n = len(chunk.lines)
            failed = len(bad)
            letters = self._letters(index, chunk.lines, bad, cp.chunk_index + 1)
            new = dataclasses.replace(
                cp, chunk_index=cp.chunk_index + 1,
                last_key=(str(index), str(rows.position.offset)),
                last_key_json=[index, rows.position.offset, rows.position.line],
                processed=cp.processed + n, succeeded=cp.succeeded + written[0],
                failed=cp.failed + failed, skipped=cp.skipped + (n - written[0] - failed),
                run_id=self.run.run_id, updated_at=utc_now())
            spec.limits.check(new.failed, new.processed,
                              letters[-1]["error_message"] if letters else None)
            self.run.assert_lock_held()
            insert_dead_letters(self.conn, letters, schema=spec.state_schema)
            write_checkpoint(self.conn, new, schema=spec.state_schema)
        append_rejects(spec.rejects, self.format.where, letters)
        errors = errors_of(letters)
        nbytes, total = self._bytes.after_chunk(index, at, rows.position, n, new.processed)
        return StepOutcome(new, n, nbytes, errors, total=total)

    @staticmethod
    def _count(stats: WriteStats, written: list[int]) -> None:
        kept = stats.rows - sum((stats.outcomes or {}).get(k, 0) for k in ("ignored", "superseded"))
        written[0] += kept

    def _isolate(self, piece: Piece, offset: int, exc: BaseException,
                 bad: list[tuple[int, BaseException]], written: list[int],
                 cp: Checkpoint) -> Piece | None:
        """A refused piece: cut at the line PostgreSQL names (or halve) until each bad row
        stands alone; the good rows are written in savepoints of the chunk's transaction."""
        spec = self.plan.spec

        def write_slice(a: int | None, b: int) -> int:
            with self.conn.transaction():
                stats = self.sink.write([piece.rows(a or 0, b)])
            self._count(stats, written)
            return stats.rows

        def give_up(n_bad: int, error: BaseException) -> None:
            spec.limits.check(cp.failed + len(bad) + n_bad, cp.processed + offset + len(piece),
                              pg.describe_error(error, spec.target))

        found = isolate(0, len(piece), len(piece), exc, write=write_slice,
                        split=lambda a, n: (a or 0) + n, count=None, give_up=give_up,
                        locate=self.format.locate)
        for b in found.bad:  # pieces keep the stream's order: chunk index = offset + index
            bad.append((offset + b.hi - 1, b.error))
            self._bad_bytes[offset + b.hi - 1] = piece.rows(b.hi - 1, b.hi)
        return None  # nothing carried: the piece's good rows are written already

    def _letters(self, index: int, lines: Sequence[int], bad: list[tuple[int, BaseException]],
                 chunk_index: int) -> list[dict[str, Any]]:
        """The dead letters of a chunk's refused rows: file and line (a Parquet file's row),
        the raw text (a CSV row's fields as the CSV reader sees them too), and PostgreSQL's
        error."""
        spec = self.plan.spec
        name = str(spec.files[index])
        letters = []
        for i, error in bad:
            raw = self._bad_bytes.get(i, b"")
            line = lines[i] if i < len(lines) else None
            text = raw.decode("utf-8", errors="replace").rstrip("\n")
            message = pg.describe_error(error, spec.target)
            letters.append({
                "job_id": spec.job_id, "run_id": self.run.run_id, "chunk_index": chunk_index,
                "item_key": [name, line],
                "row_data": {"file": name, self.format.where: line,
                             "raw": text.replace("\x00", "\\u0000"),
                             **self.format.row_data(raw)},
                "error_type": type(error).__name__, "sqlstate": sqlstate_of(error),
                "category": Category.DATA.value, "error_message": message, "attempts": 1})
        return letters





def _check_unchanged(spec: LoadSpec, cp: Checkpoint) -> None:
    stored = (cp.watermark or {}).get(FILES_KEY)
    if stored is not None:
        check_unchanged(spec.files, stored)


def execute(plan: LoadPlan, run: JobRun, conn: psycopg.Connection, *, progress: Progress,
            stop: StopFlag | None = None, report_path: str | None = None) -> Result:
    """Run the planned load under ``run`` (lock held); failures end in the Result."""
    spec = plan.spec
    result = Result(job_id=spec.job_id, run_id=run.run_id, job_type="load", started_at=utc_now())
    result.metadata.update({"target": spec.target.masked, "table": str(spec.table),
                            "files": [str(f) for f in spec.files], "format": spec.format,
                            "mode": spec.mode.value, "columns": [c.name for c in plan.columns],
                            "chunk_size": spec.pacing.chunk_size or "auto"})
    result.artifacts["dead_letters"] = f"{spec.state_schema}.dead_letters (job_id = {spec.job_id!r})"
    result.artifacts["rejects"] = str(spec.rejects) if spec.rejects else None
    result.artifacts["report"] = report_path

    def start() -> lifecycle.Start:
        found = None if spec.restart else read_checkpoint(run.store.conn, spec.job_id,
                                                           spec.state_schema)
        if found is not None and found[1]:
            found = None  # a finished load: load the files again (the mode says how)
        if found is not None:
            _check_unchanged(spec, found[0])
            cp = found[0]
        else:
            cp = Checkpoint(job_id=spec.job_id, chunk_index=0, last_key=None, run_id=run.run_id,
                            watermark={FILES_KEY: file_identities(spec.files)})
            with conn.transaction():
                if spec.mode is Mode.REPLACE:
                    PgCopySink(conn, spec.table, plan.columns).truncate()
                write_checkpoint(conn, cp, schema=spec.state_schema)
        left, exact = _rows_left(plan, cp)
        return lifecycle.Start(LoadStep(plan, conn, run), cp, found is not None,
                               f"load {spec.table}", left, exact=exact)

    def finish(begun: lifecycle.Start, cp: Checkpoint) -> None:
        target = begun.step.conn  # type: ignore[attr-defined]
        with target.transaction():
            write_checkpoint(target, cp, finished=True, schema=spec.state_schema)

    return lifecycle.execute(run, result, start=start, finish=finish, pacing=spec.pacing,
                             retry=spec.retry, progress=progress,
                             stop=stop if stop is not None else StopFlag(), state=spec.target,
                             describe=lambda exc: pg.describe_error(exc, spec.target))


def dry_run(plan: LoadPlan) -> Result:
    """The files, the columns they fill and the SQL of each piece; nothing is written."""
    spec = plan.spec
    start = Checkpoint(job_id=spec.job_id, chunk_index=0, last_key=None)
    rows, exact = _rows_left(plan, start)
    lines = [f"job:          {spec.job_id}", f"target:       {spec.target.masked}  table {spec.table}",
             f"mode:         {spec.mode.value}", f"format:       {plan.format.name}", "files:"]
    lines += [f"  {f}  ({f.stat().st_size:,} bytes)" for f in spec.files]
    lines += [f"columns:      {', '.join(f'{c.name} {c.type_sql}' for c in plan.columns)}",
              f"rows:         {'' if exact else '~'}{rows:,} ({plan.format.rows_note()})",
              f"per chunk:    {plan.format.statement(plan)}  (in statements of "
              f"{PIECE_ROWS:,} rows, one transaction with the checkpoint)",
              "dry run: nothing was written"]
    return Result.dry_run(spec.job_id, "load", "\n".join(lines), rows, estimated_rows=rows,
                          columns=[c.name for c in plan.columns])


def _rows_left(plan: LoadPlan, cp: Checkpoint) -> tuple[int, bool]:
    """Rows left after ``cp``, for progress, and whether that is a count (not an estimate)."""
    index, at = position_of(cp)
    return plan.format.rows_left(plan.spec.files, index, at)
