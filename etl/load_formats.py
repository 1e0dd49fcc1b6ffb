"""What `etl load` does differently per file format: CSV, NDJSON and Parquet.

A ``FileFormat`` says which columns the files name, opens a file's rows at a position
(``offset`` and ``line``: the byte after the last committed row and its line for text
files, the row index and the index + 1 for Parquet), makes the sink that writes them,
finds the refused row of a failed write, and describes a refused row for its dead
letter. ``etl.load_job.LoadStep`` runs every format the same way through it.

- CSV: PostgreSQL's own CSV COPY, straight into the table (staged for upsert/ignore).
- NDJSON: one JSON object a line; Parquet: each row written as one. Both are COPYed as
  JSON lines into a staging table and converted by PostgreSQL (``etl.sinks.pg_json``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from . import pg
from .errors import UsageError
from .model import Mode
from .retry import RetryPolicy
from .runner import Pacing
from .sinks.pg_copy import PgCopySink, WriteStats
from .sinks.pg_json import PgJsonSink, json_sql
from .sinks.pg_merge import PgMergeSink
from .sources.csv_rows import HEAD_BYTES, CsvChunk, CsvRows, Position, compression_of
from .thresholds import ErrorLimits

if TYPE_CHECKING:
    import psycopg

    from .load_job import LoadPlan
    from .piecewise import Statement
    from .report import RowError
    from .urls import DbUrl

FORMATS = ("csv", "ndjson", "parquet")


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

    def given(self) -> list[str]:
        """The options set to other than their defaults (they apply to CSV files only)."""
        default = CsvOptions()
        names = [f"--{n.replace('_', '-')}" for n in ("delimiter", "quote", "escape", "null",
                                                      "skip_lines")
                 if getattr(self, n) != getattr(default, n)]
        if not self.header:
            names.append("--no-header")
        if self.encoding.upper().replace("-", "") != "UTF8":
            names.append("--encoding")
        return names

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


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    """What every `etl load` was asked to do, whatever the target: the files, how they are
    written, the mode and the job's pacing. ``LoadSpec`` (PostgreSQL) and ``SqlLoadSpec``
    (MySQL/SQLite) add the target table in their database's terms."""

    target: DbUrl
    table: Any                      # the target table (a TableName or an SqlName)
    files: tuple[Path, ...]
    job_id: str
    mode: Mode = Mode.APPEND
    format: str = "csv"             # csv, ndjson or parquet
    csv: CsvOptions = CsvOptions()
    columns: tuple[str, ...] | None = None  # the files' columns (else their own, else the table's)
    rejects: Path | None = None
    restart: bool = False
    pacing: Pacing = Pacing()
    retry: RetryPolicy = RetryPolicy()
    limits: ErrorLimits = ErrorLimits()
    lock_timeout: float | None = None
    state_schema: str = "etl"
    date_order: str | None = None   # --date-format DMY|MDY|YMD: how 05/01/2024 reads

    def args(self) -> dict[str, Any]:
        """The job's arguments as the state store keeps them (URLs masked)."""
        return {"target": self.target.masked, "table": str(self.table),
                "files": [str(f) for f in self.files], "mode": self.mode.value,
                "format": self.format, "csv": dataclasses.asdict(self.csv),
                "columns": list(self.columns or ()),
                "rejects": str(self.rejects) if self.rejects else None,
                "pacing": dataclasses.asdict(self.pacing), "retry": dataclasses.asdict(self.retry),
                "limits": dataclasses.asdict(self.limits), "lock_timeout": self.lock_timeout,
                "date_format": self.date_order}


class Rows(Protocol):
    """A file's rows from a position (``etl.sources.csv_rows.CsvRows`` and its like)."""

    path: Path

    @property
    def position(self) -> Position: ...
    def has_more(self) -> bool: ...
    def chunk(self, size: int) -> CsvChunk: ...
    def close(self) -> None: ...


class LoadSink(Protocol):
    def start(self) -> Statement: ...
    def write(self, blocks: Iterable[bytes]) -> WriteStats: ...


class FileFormat:
    """The format-specific part of a load (see the module); subclasses fill it in."""

    name: ClassVar[str]
    where: ClassVar[str] = "line"   # what a refused row's position is called
    # what to do about a name the table lacks (the end of that error's message)
    rename_hint: ClassVar[str] = "give --columns with the ones to load"

    def file_columns(self, files: Sequence[Path], given: tuple[str, ...] | None
                     ) -> tuple[str, ...] | None:
        """The files' columns (``given``: --columns), checked in every file; None when
        the files do not name them (then they are the table's)."""
        return given

    def open(self, path: Path, at: Position, plan: LoadPlan) -> Rows:
        raise NotImplementedError

    def sink(self, conn: psycopg.Connection, plan: LoadPlan) -> LoadSink:
        key = plan.conflict_key if plan.spec.mode in (Mode.UPSERT, Mode.IGNORE) else ()
        return PgJsonSink(conn, plan.spec.table, plan.columns, plan.spec.mode, key)

    def locate(self, exc: BaseException) -> int | None:
        """The 1-based row of a write that ``exc`` names, if it does."""
        return pg.copy_error_line(exc, any_line=True)

    def row_data(self, raw: bytes) -> dict[str, Any]:
        """The dead letter's fields besides file, position and raw text."""
        return {}

    def statement(self, plan: LoadPlan) -> str:
        """What each piece of a chunk runs (for a dry run)."""
        key = plan.conflict_key if plan.spec.mode in (Mode.UPSERT, Mode.IGNORE) else ()
        copy, move = json_sql(plan.spec.table, plan.columns, plan.spec.mode, key)
        return f"{copy.as_string(None)}; then {move.as_string(None)}"

    def rows_left(self, files: Sequence[Path], index: int, at: Position,
                  per_row: float | None = None) -> tuple[int, bool]:
        """Rows left from file ``index`` at ``at``, and whether that is a count (not an
        estimate): the bytes left over the bytes a row — ``per_row`` as measured by the
        run so far, else the first file's head's bytes per line. A plain file's bytes left
        are exact (``at.offset`` is its byte); a compressed file counts its compressed size,
        whole (its read position is of the uncompressed bytes)."""
        if per_row is None:
            with files[0].open("rb") as fh:
                head = fh.read(HEAD_BYTES)
            per_row = len(head) / max(head.count(b"\n"), 1)
        left = 0
        for i, f in enumerate(files[index:], start=index):
            size = f.stat().st_size
            if i == index and compression_of(f) is None:
                size -= at.offset
            left += max(size, 0)
        return max(int(left / max(per_row, 1.0)), 0), False

    def rows_note(self) -> str:
        return "from the bytes per line of the first file's head"


class CsvFormat(FileFormat):
    name = "csv"
    rename_hint = "rename them in the header or give --columns"

    def __init__(self, options: CsvOptions) -> None:
        self.options = options

    def file_columns(self, files: Sequence[Path], given: tuple[str, ...] | None
                     ) -> tuple[str, ...] | None:
        if given or not self.options.header:
            return given
        names = self._header(files[0])
        for f in files[1:]:  # every file's header must name the same columns
            other = self._header(f)
            if other != names:
                raise UsageError(f"{f}: its header ({', '.join(other)}) differs from "
                                 f"{files[0]}'s ({', '.join(names)}); load the files "
                                 "separately, or give --columns")
        return names

    def _header(self, path: Path) -> tuple[str, ...]:
        opts = self.options
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

    def open(self, path: Path, at: Position, plan: LoadPlan) -> Rows:
        opts = self.options
        rows = CsvRows(path, at, quote=opts.quote.encode(),
                       escape=opts.escape.encode() if opts.escape else None)
        if at.offset == 0:  # the file's first chunk: skip lines, then the header
            for _ in range(opts.skip_lines + (1 if opts.header else 0)):
                if rows.next_row() is None:
                    break
        return rows

    def sink(self, conn: psycopg.Connection, plan: LoadPlan) -> LoadSink:
        spec = plan.spec
        sink: PgCopySink | PgMergeSink
        if spec.mode in (Mode.UPSERT, Mode.IGNORE):
            sink = PgMergeSink(conn, spec.table, plan.columns, plan.conflict_key, spec.mode,
                               csv=True)
        else:
            sink = PgCopySink(conn, spec.table, plan.columns, csv=True)
        sink.set_copy_options(self.options.copy_options())
        return sink

    def locate(self, exc: BaseException) -> int | None:
        return pg.copy_error_line(exc)

    def row_data(self, raw: bytes) -> dict[str, Any]:
        return {"fields": [f.replace("\x00", "\\u0000") for f in self.options.fields(raw)]}

    def statement(self, plan: LoadPlan) -> str:
        from psycopg import sql

        return sql.SQL("COPY {} ({}) FROM STDIN ({})").format(
            sql.Identifier(plan.spec.table.schema, plan.spec.table.name),
            sql.SQL(", ").join(sql.Identifier(c.name) for c in plan.columns),
            sql.SQL(self.options.copy_options())).as_string(None)  # type: ignore[arg-type]


class NdjsonFormat(FileFormat):
    """One JSON object a line (blank lines skipped); keys name the columns."""

    name = "ndjson"

    def open(self, path: Path, at: Position, plan: LoadPlan) -> Rows:
        return CsvRows(path, at, quote=None)


class ParquetFormat(FileFormat):
    """Row groups streamed in batches, each row written as a JSON object."""

    name = "parquet"
    where = "row"

    def file_columns(self, files: Sequence[Path], given: tuple[str, ...] | None
                     ) -> tuple[str, ...] | None:
        from .sources.parquet_rows import schema_names

        first = schema_names(files[0])
        for f in files:
            names = first if f == files[0] else schema_names(f)
            if given:
                missing = [n for n in given if n not in names]
                if missing:
                    raise UsageError(f"{f}: no column(s) {', '.join(missing)} in this Parquet "
                                     f"file ({', '.join(names)}); fix --columns")
            elif set(names) != set(first):
                raise UsageError(f"{f}: its columns ({', '.join(names)}) differ from "
                                 f"{files[0]}'s ({', '.join(first)}); load the files "
                                 "separately, or give --columns")
        return given or first

    def open(self, path: Path, at: Position, plan: LoadPlan) -> Rows:
        from .sources.parquet_rows import ParquetRows

        return ParquetRows(path, at, [c.name for c in plan.columns])

    def rows_left(self, files: Sequence[Path], index: int, at: Position,
                  per_row: float | None = None) -> tuple[int, bool]:
        from .sources.parquet_rows import row_count

        return max(sum(row_count(f) for f in files[index:]) - at.offset, 0), True

    def rows_note(self) -> str:
        return "from the files' metadata"


def file_format(name: str, options: CsvOptions) -> FileFormat:
    if name == "csv":
        return CsvFormat(options)
    if options.given():
        raise UsageError(f"{', '.join(options.given())} apply to CSV files only; these files "
                         f"are {name}")
    if name == "ndjson":
        return NdjsonFormat()
    if name == "parquet":
        return ParquetFormat()
    raise UsageError(f"--format {name!r}: valid formats are {', '.join(FORMATS)}")


# -- what every load does with a checkpoint and with refused rows -------------------------

def position_of(cp: Any) -> tuple[int, Position]:
    """(file index, position in it) after checkpoint ``cp`` (its ``last_key_json`` is
    ``[file index, offset, line]``)."""
    if cp.last_key is None or not cp.last_key_json:
        return 0, Position()
    index, offset, line = cp.last_key_json
    return int(index), Position(int(offset), int(line))


def next_file(cp: Any, count: int, open_at: Callable[[int, Position], Any]
              ) -> tuple[int, Position, Any] | None:
    """The first of the ``count`` files, from checkpoint ``cp`` on, that has rows left:
    (its index, where its rows start, its rows as ``open_at(index, position)`` opened
    them); None when every file is done."""
    index, at = position_of(cp)
    while index < count:
        rows = open_at(index, at)
        if rows.has_more():
            return index, at, rows
        index, at = index + 1, Position()  # the file is done: the next one
    return None


def errors_of(letters: Sequence[dict[str, Any]]) -> list[RowError]:
    """The report's errors of a chunk's dead letters."""
    from .report import RowError

    return [RowError(item_identifier=json.dumps(r["item_key"]), error_type=r["error_type"],
                     category=r["category"], error_message=r["error_message"],
                     chunk_index=r["chunk_index"]) for r in letters]


def append_rejects(path: Path | None, where: str, letters: Sequence[dict[str, Any]]) -> None:
    """Append refused rows to --rejects as NDJSON (file, ``where`` — line or row —, raw text,
    error, SQLSTATE); called once the dead letters are stored: they are the record, this
    file is the operator's copy."""
    if path is None or not letters:
        return
    with path.open("a", encoding="utf-8") as fh:
        for r in letters:
            fh.write(json.dumps({"file": r["row_data"]["file"], where: r["row_data"][where],
                                 "raw": r["row_data"]["raw"], "error": r["error_message"],
                                 "sqlstate": r["sqlstate"]}, ensure_ascii=False) + "\n")


# Weight of the newest chunk in the bytes-a-row estimate behind the progress of a load.
BYTES_PER_ROW_SMOOTHING = 0.5


class BytesProgress:
    """A load's progress by the bytes of its files: after each chunk, the bytes it read
    (for MB/s) and the job's total rows estimated again from the bytes a row — smoothed,
    quick to follow a file whose rows grow or shrink — and the bytes left, so percentage
    and ETA follow the bytes read. A Parquet file's rows are counted exactly already."""

    def __init__(self, fmt: FileFormat, files: Sequence[Path]) -> None:
        self.format = fmt
        self.files = files
        self.per_row: float | None = None

    def after_chunk(self, index: int, at: Position, after: Position, rows: int,
                    processed: int) -> tuple[int, int | None]:
        """(bytes read, total rows) after a chunk of ``rows`` rows from ``at`` to
        ``after`` of file ``index``; (0, None) for Parquet."""
        if self.format.name == "parquet":
            return 0, None
        nbytes = max(after.offset - at.offset, 0)
        if rows:
            now = nbytes / rows
            self.per_row = now if self.per_row is None else (
                BYTES_PER_ROW_SMOOTHING * now + (1 - BYTES_PER_ROW_SMOOTHING) * self.per_row)
        left, _ = self.format.rows_left(self.files, index, after, self.per_row)
        return nbytes, processed + left


def file_identities(files: Sequence[Path]) -> list[dict[str, Any]]:
    """What identifies each file between runs (size, mtime, sha256 of its head)."""
    from .sources.csv_rows import FileId

    return [FileId.of(f).as_json() for f in files]


def check_unchanged(files: Sequence[Path], stored: list[dict[str, Any]]) -> None:
    """A resumed load must read the files its checkpoint counted in, unchanged."""
    now = file_identities(files)
    if [s["path"] for s in stored] != [n["path"] for n in now]:
        raise UsageError("the files of this load are not the ones its unfinished run was "
                         "loading; give the same files, or --restart to load from the start")
    for s, n in zip(stored, now, strict=True):
        if s != n:
            raise UsageError(f"{n['path']} changed since this load began (size, modification "
                             "time or first 64 KiB); rerun with --restart to load it from the "
                             "start, or restore the file")


__all__ = ["BYTES_PER_ROW_SMOOTHING", "FORMATS", "BytesProgress", "check_unchanged",
           "file_identities", "append_rejects", "errors_of", "position_of", "CsvFormat", "CsvOptions", "FileFormat", "LoadOptions", "NdjsonFormat",
           "ParquetFormat", "file_format"]
