"""`etl load` of CSV files into a PostgreSQL table: PostgreSQL's own CSV COPY, in
resumable chunks, with the rows it refuses set aside.

Each chunk is the next ``n`` rows of the current file (``etl.sources.csv_rows``), written
in one target transaction as COPY statements of a few thousand rows (``etl.piecewise``)
with the chunk's dead letters and the job's checkpoint — the file, the byte after the last
row and its line — so a crash leaves the chunk loaded or not, and a rerun starts exactly
after the last committed row. PostgreSQL parses and converts every value (what ``\\copy``
does): a row it refuses (a bad date, a short row, a value too long, a NOT NULL, CHECK or
foreign key violation, invalid UTF-8, an unclosed quote) is isolated in its piece and
becomes a dead letter — file, line, the raw text, the error — and a line of ``--rejects``
(NDJSON); the good rows load. A file that changed since the run that began loading it
(size, mtime or its first 64 KiB) is refused unless ``--restart``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import catalog, lifecycle, pg
from .errors import UsageError, sqlstate_of
from .isolate import isolate
from .model import Category, Checkpoint, Column, Mode, Status, TableName
from .piecewise import PiecewiseWriter
from .report import Result, RowError, utc_now
from .retry import RetryPolicy
from .runner import Pacing, StepOutcome, StopFlag
from .sinks.pg_copy import PgCopySink, WriteStats
from .sinks.pg_merge import PgMergeSink
from .sources.csv_rows import HEAD_BYTES, CsvRows, FileId, Position
from .sources.pg import Piece, RowStream
from .state.store import insert_dead_letters, read_checkpoint, write_checkpoint
from .thresholds import ErrorLimits
from .urls import DbUrl

if TYPE_CHECKING:
    import psycopg

    from .jobrun import JobRun
    from .progress import Progress

log = logging.getLogger(__name__)

# Rows a COPY statement of a chunk holds: a refused one wastes at most this much work.
PIECE_ROWS = 10_000
FILES_KEY = "files"  # the checkpoint's watermark: the identity of each file of the job


@dataclass(frozen=True)
class CsvOptions:
    """How the files are written (PostgreSQL's COPY options of the same names)."""

    delimiter: str = ","
    quote: str = '"'
    escape: str | None = None      # default: the quote (a doubled quote)
    header: bool = True
    null: str = ""                 # unquoted empty field = NULL; quoted "" = empty string
    encoding: str = "UTF8"
    skip_lines: int = 0

    def __post_init__(self) -> None:
        for name in ("delimiter", "quote"):
            if len(getattr(self, name)) != 1:
                raise UsageError(f"--{name} must be one character, not {getattr(self, name)!r}")
        if self.escape is not None and len(self.escape) != 1:
            raise UsageError(f"--escape must be one character, not {self.escape!r}")
        if self.skip_lines < 0:
            raise UsageError("--skip-lines must be 0 or more")

    def copy_options(self) -> str:
        from psycopg import sql

        parts = [sql.SQL("FORMAT csv"), sql.SQL("DELIMITER {}").format(sql.Literal(self.delimiter)),
                 sql.SQL("QUOTE {}").format(sql.Literal(self.quote)),
                 sql.SQL("NULL {}").format(sql.Literal(self.null)),
                 sql.SQL("ENCODING {}").format(sql.Literal(self.encoding))]
        if self.escape is not None:
            parts.append(sql.SQL("ESCAPE {}").format(sql.Literal(self.escape)))
        return sql.SQL(", ").join(parts).as_string(None)

    def fields(self, row: bytes) -> list[str]:
        """One row's fields as text (for headers and dead letters; not for loading)."""
        text = row.decode("utf-8", errors="replace")
        reader = csv.reader(io.StringIO(text), delimiter=self.delimiter, quotechar=self.quote,
                            escapechar=self.escape if self.escape != self.quote else None,
                            doublequote=self.escape in (None, self.quote))
        return next(reader, [])


@dataclass(frozen=True)
class LoadSpec:
    """Everything `etl load` was asked to do, checked."""

    target: DbUrl
    table: TableName
    files: tuple[Path, ...]
    job_id: str
    mode: Mode = Mode.APPEND
    csv: CsvOptions = CsvOptions()
    columns: tuple[str, ...] | None = None  # the files' columns (else the header, else the table's)
    rejects: Path | None = None
    restart: bool = False
    pacing: Pacing = Pacing()
    retry: RetryPolicy = RetryPolicy()
    limits: ErrorLimits = ErrorLimits()
    lock_timeout: float | None = None
    state_schema: str = "etl"

    def args(self) -> dict[str, Any]:
        return {"target": self.target.masked, "table": str(self.table),
                "files": [str(f) for f in self.files], "mode": self.mode.value,
                "csv": dataclasses.asdict(self.csv), "columns": list(self.columns or ()),
                "rejects": str(self.rejects) if self.rejects else None,
                "pacing": dataclasses.asdict(self.pacing), "retry": dataclasses.asdict(self.retry),
                "limits": dataclasses.asdict(self.limits), "lock_timeout": self.lock_timeout}


@dataclass(frozen=True)
class LoadPlan:
    spec: LoadSpec
    columns: tuple[Column, ...]        # the target columns the files fill, in file order
    conflict_key: tuple[str, ...]      # upsert/ignore


def make_plan(spec: LoadSpec, conn: psycopg.Connection) -> LoadPlan:
    """Check the files and the target table; the columns come from --columns, the first
    file's header, or the table (in its order)."""
    for f in spec.files:
        if not f.is_file():
            raise UsageError(f"{f}: no such file")
    info = catalog.describe(conn, spec.table, role="target")
    by_name = {c.name: c for c in info.columns}
    names = spec.columns or (_header(spec.files[0], spec.csv) if spec.csv.header else None) \
        or tuple(by_name)
    if spec.csv.header and not spec.columns:  # every file's header must name the same columns
        for f in spec.files[1:]:
            other = _header(f, spec.csv)
            if other != names:
                raise UsageError(f"{f}: its header ({', '.join(other)}) differs from "
                                 f"{spec.files[0]}'s ({', '.join(names)}); load the files "
                                 "separately, or give --columns")
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UsageError(f"{spec.files[0]}: column(s) {', '.join(unknown)} are not in "
                         f"{spec.table} ({', '.join(by_name)}); rename them in the header or "
                         "give --columns")
    conflict: tuple[str, ...] = ()
    if spec.mode in (Mode.UPSERT, Mode.IGNORE):
        usable = [k for k in catalog.unique_keys(conn, spec.table) if set(k) <= set(names)]
        if not usable:
            raise UsageError(f"--mode {spec.mode.value} matches rows on a primary key or unique "
                             f"index of {spec.table} among the loaded columns; there is none")
        conflict = usable[0]
    conn.rollback()
    return LoadPlan(spec, tuple(by_name[n] for n in names), conflict)


def _header(path: Path, opts: CsvOptions) -> tuple[str, ...]:
    rows = CsvRows(path, Position(), quote=opts.quote.encode(),
                   escape=opts.escape.encode() if opts.escape else None)
    try:
        for _ in range(opts.skip_lines + 1):
            found = rows.next_row()
        if found is None:
            raise UsageError(f"{path}: no header line (give --no-header and --columns)")
        return tuple(n.strip() for n in opts.fields(found[0]))
    finally:
        rows.close()


class LoadStep:
    """One chunk: the next rows of the current file, in one target transaction."""

    def __init__(self, plan: LoadPlan, conn: psycopg.Connection, run: JobRun) -> None:
        self.plan = plan
        self.run = run
        self._rows: CsvRows | None = None
        self._bad_bytes: dict[int, bytes] = {}  # a chunk's refused rows, by index in the chunk
        self._use(conn)

    def _use(self, conn: psycopg.Connection) -> None:
        spec = self.plan.spec
        self.conn = conn
        options = spec.csv.copy_options()
        if spec.mode in (Mode.UPSERT, Mode.IGNORE):
            self.sink: PgCopySink | PgMergeSink = PgMergeSink(
                conn, spec.table, self.plan.columns, self.plan.conflict_key, spec.mode, csv=True)
        else:
            self.sink = PgCopySink(conn, spec.table, self.plan.columns, csv=True)
        self.sink.set_copy_options(options)
        self.writer = PiecewiseWriter(conn, self.sink.start, PIECE_ROWS)

    def ensure_connected(self) -> None:
        if not pg.is_usable(self.conn):
            log.info("reconnecting to the target database")
            self.writer.close()
            self._use(pg.connect(self.plan.spec.target, "target", autocommit=True,
                                 reconnect=True,
                                 settings=pg.lock_timeout_settings(self.plan.spec.lock_timeout)))
        self.run.ensure_connected()

    def close(self) -> None:
        self.writer.close()
        if self._rows is not None:
            self._rows.close()
        self.conn.close()

    def _reader(self, index: int, at: Position) -> CsvRows:
        """The rows of file ``index`` from ``at`` (kept open from chunk to chunk)."""
        spec = self.plan.spec
        r = self._rows
        if r is not None and r.path == spec.files[index] \
                and (r.position.offset, r.position.line) == (at.offset, at.line):
            return r
        if r is not None:
            r.close()
        r = CsvRows(spec.files[index], at, quote=spec.csv.quote.encode(),
                    escape=spec.csv.escape.encode() if spec.csv.escape else None)
        if at.offset == 0:  # the file's first chunk: skip lines, then the header
            for _ in range(spec.csv.skip_lines + (1 if spec.csv.header else 0)):
                if r.next_row() is None:
                    break
        self._rows = r
        return r

    def __call__(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        spec = self.plan.spec
        self.ensure_connected()
        index, at = _position(cp)
        while index < len(spec.files):
            rows = self._reader(index, at)
            if rows.has_more():
                break
            index, at = index + 1, Position()  # the file is done: the next one
        else:
            return None
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
        self._reject(letters)
        errors = [RowError(item_identifier=json.dumps(r["item_key"]), error_type=r["error_type"],
                           category=r["category"], error_message=r["error_message"],
                           chunk_index=r["chunk_index"]) for r in letters]
        return StepOutcome(new, n, 0, errors)

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
                        locate=pg.copy_error_line)
        for b in found.bad:  # pieces keep the stream's order: chunk index = offset + index
            bad.append((offset + b.hi - 1, b.error))
            self._bad_bytes[offset + b.hi - 1] = piece.rows(b.hi - 1, b.hi)
        return None  # nothing carried: the piece's good rows are written already

    def _letters(self, index: int, lines: Sequence[int], bad: list[tuple[int, BaseException]],
                 chunk_index: int) -> list[dict[str, Any]]:
        """The dead letters of a chunk's refused rows: file and line, the raw text, its
        fields as the CSV reader sees them, and PostgreSQL's error."""
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
                "row_data": {"file": name, "line": line, "raw": text.replace("\x00", "\\u0000"),
                             "fields": [f.replace("\x00", "\\u0000")
                                        for f in spec.csv.fields(raw)]},
                "error_type": type(error).__name__, "sqlstate": sqlstate_of(error),
                "category": Category.DATA.value, "error_message": message, "attempts": 1})
        return letters

    def _reject(self, letters: list[dict[str, Any]]) -> None:
        """Append the chunk's refused rows to --rejects (after the commit: the dead letters
        are the record; this file is the operator's copy)."""
        path = self.plan.spec.rejects
        if path is None or not letters:
            return
        with path.open("a", encoding="utf-8") as fh:
            for r in letters:
                fh.write(json.dumps({"file": r["row_data"]["file"], "line": r["row_data"]["line"],
                                     "raw": r["row_data"]["raw"], "error": r["error_message"],
                                     "sqlstate": r["sqlstate"]}, ensure_ascii=False) + "\n")


def _position(cp: Checkpoint) -> tuple[int, Position]:
    if cp.last_key is None or not cp.last_key_json:
        return 0, Position()
    index, offset, line = cp.last_key_json
    return int(index), Position(int(offset), int(line))


def _identities(spec: LoadSpec) -> list[dict[str, Any]]:
    return [FileId.of(f).as_json() for f in spec.files]


def _check_unchanged(spec: LoadSpec, cp: Checkpoint) -> None:
    """A resumed load must read the files the checkpoint counted in."""
    stored = (cp.watermark or {}).get(FILES_KEY)
    if stored is None:
        return
    now = _identities(spec)
    if [s["path"] for s in stored] != [n["path"] for n in now]:
        raise UsageError("the files of this load are not the ones its unfinished run was "
                         "loading; give the same files, or --restart to load from the start")
    for s, n in zip(stored, now, strict=True):
        if s != n:
            raise UsageError(f"{n['path']} changed since this load began (size, modification "
                             "time or first 64 KiB); rerun with --restart to load it from the "
                             "start, or restore the file")


def execute(plan: LoadPlan, run: JobRun, conn: psycopg.Connection, *, progress: Progress,
            stop: StopFlag | None = None, report_path: str | None = None) -> Result:
    """Run the planned load under ``run`` (lock held); failures end in the Result."""
    spec = plan.spec
    result = Result(job_id=spec.job_id, run_id=run.run_id, job_type="load", started_at=utc_now())
    result.metadata.update({"target": spec.target.masked, "table": str(spec.table),
                            "files": [str(f) for f in spec.files], "format": "csv",
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
                            watermark={FILES_KEY: _identities(spec)})
            with conn.transaction():
                if spec.mode is Mode.REPLACE:
                    PgCopySink(conn, spec.table, plan.columns).truncate()
                write_checkpoint(conn, cp, schema=spec.state_schema)
        return lifecycle.Start(LoadStep(plan, conn, run), cp, found is not None,
                               f"load {spec.table}", _estimate_rows(spec, cp), exact=False)

    def finish(begun: lifecycle.Start, cp: Checkpoint) -> None:
        target = begun.step.conn  # type: ignore[attr-defined]
        with target.transaction():
            write_checkpoint(target, cp, finished=True, schema=spec.state_schema)

    return lifecycle.execute(run, result, start=start, finish=finish, pacing=spec.pacing,
                             retry=spec.retry, progress=progress,
                             stop=stop if stop is not None else StopFlag(), state=spec.target,
                             describe=lambda exc: pg.describe_error(exc, spec.target))


def dry_run(plan: LoadPlan) -> Result:
    """The files, the columns they fill and the COPY statement; nothing is written."""
    from psycopg import sql

    spec = plan.spec
    start = Checkpoint(job_id=spec.job_id, chunk_index=0, last_key=None)
    rows = _estimate_rows(spec, start)
    copy = sql.SQL("COPY {} ({}) FROM STDIN ({})").format(
        sql.Identifier(spec.table.schema, spec.table.name),
        sql.SQL(", ").join(sql.Identifier(c.name) for c in plan.columns),
        sql.SQL(spec.csv.copy_options())).as_string(None)  # type: ignore[arg-type]
    lines = [f"job:          {spec.job_id}", f"target:       {spec.target.masked}  table {spec.table}",
             f"mode:         {spec.mode.value}", "files:"]
    lines += [f"  {f}  ({f.stat().st_size:,} bytes)" for f in spec.files]
    lines += [f"columns:      {', '.join(f'{c.name} {c.type_sql}' for c in plan.columns)}",
              f"rows:         ~{rows:,} (from the bytes per line of the first file's head)",
              f"per chunk:    {copy}  (in statements of {PIECE_ROWS:,} rows, one transaction "
              "with the checkpoint)", "dry run: nothing was written"]
    now = utc_now()
    result = Result(job_id=spec.job_id, run_id="dry-run", job_type="load", started_at=now,
                    completed_at=now, status=Status.COMPLETED, total_items=rows)
    result.metadata.update({"dry_run": True, "plan": "\n".join(lines), "estimated_rows": rows,
                            "columns": [c.name for c in plan.columns]})
    return result


def _estimate_rows(spec: LoadSpec, cp: Checkpoint) -> int:
    """Rows left, for progress: the bytes left at the first file's bytes per line (its head;
    a compressed file counts its compressed bytes)."""
    index, at = _position(cp)
    with spec.files[0].open("rb") as fh:
        head = fh.read(HEAD_BYTES)
    per_line = max(len(head) / max(head.count(b"\n"), 1), 1.0)
    left = sum(f.stat().st_size for f in spec.files[index:]) - at.offset
    return max(int(left / per_line), 0)
