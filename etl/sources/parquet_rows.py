"""The rows of a Parquet file as JSON lines, for ``etl.sinks.pg_json`` (PostgreSQL converts them).

The file is streamed in record batches (pyarrow's ``ParquetFile.iter_batches``, never
whole); a resumed read skips the row groups before its row through the file's metadata,
and only decodes the one it starts in. Each batch becomes JSON lines with polars'
``write_ndjson``, after the columns whose JSON form would not be exact for PostgreSQL
are turned into the text PostgreSQL reads:

- binary → ``"\\x…"`` (bytea's hex form); floats → their shortest exact text, with NaN,
  Infinity and -Infinity spelled as PostgreSQL spells them; decimals → their exact text;
- timestamps (any unit) → ``YYYY-MM-DD HH:MM:SS[.ffffff]``, UTC with ``+00`` when the
  column has a time zone (nanoseconds are rounded to microseconds by PostgreSQL); dates
  and times → ISO; durations → microseconds (an ``interval``);
- lists stay JSON arrays and structs JSON objects (their values converted the same way);
  strings, integers and booleans are written as they are.

A row's position is its index in the file (its line: the index + 1).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from .csv_rows import CsvChunk, Position

if TYPE_CHECKING:
    import polars as pl
    import pyarrow as pa

# Rows decoded and turned into JSON at once: a few MB of lines, and polars' per-call cost
# spread over many rows.
BATCH_ROWS = 65_536

_TIMESTAMP = "%Y-%m-%d %H:%M:%S%.f"


def schema_names(path: Path) -> tuple[str, ...]:
    """The file's column names (from its footer), with a clear error for what is not Parquet."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and OSError for a bad footer
        raise UsageError(f"{path}: not a readable Parquet file ({exc})") from exc
    check_readable(path, schema)
    return tuple(schema.names)


def row_count(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.read_metadata(path).num_rows)


def check_readable(path: Path, schema: pa.Schema) -> None:
    """Refuse, before anything is written, a column whose type cannot become JSON."""
    import pyarrow as pa

    for field in schema:
        try:
            json_lines(pa.RecordBatch.from_pylist([], schema=pa.schema([field])))
        except Exception as exc:
            raise UsageError(f"{path}: column {field.name!r} has type {field.type}, which "
                             f"etl load cannot read ({exc}); leave it out with --columns"
                             ) from exc


class ParquetRows:
    """Rows of one Parquet file from row ``start.offset``, as JSON lines."""

    def __init__(self, path: Path, start: Position, columns: Sequence[str], *,
                 batch_rows: int = BATCH_ROWS,
                 rows_of: Callable[[pa.RecordBatch], Sequence[Any]] | None = None) -> None:
        """``rows_of`` turns a record batch into its rows (default: JSON lines)."""
        import pyarrow.parquet as pq

        self.path = path
        self._rows_of = rows_of or _json_rows
        self._file = pq.ParquetFile(path)
        meta = self._file.metadata
        skip, group = start.offset, 0
        while group < meta.num_row_groups and skip >= meta.row_group(group).num_rows:
            skip -= meta.row_group(group).num_rows
            group += 1
        self._batches = self._read(range(group, meta.num_row_groups), list(columns), skip,
                                   batch_rows)
        self._row = start.offset          # rows before the next one handed out
        self._lines: Sequence[Any] = []
        self._next = 0
        self.done = False

    @property
    def position(self) -> Position:
        """Where the rows not handed out yet begin (offset = row index, line = index + 1)."""
        return Position(self._row, self._row + 1)

    def close(self) -> None:
        self._file.close()

    def _read(self, groups: range, columns: list[str], skip: int,
              batch_rows: int) -> Iterator[Sequence[Any]]:
        if not groups:
            return
        for batch in self._file.iter_batches(batch_size=batch_rows, row_groups=groups,
                                             columns=columns):
            if skip:
                cut = min(skip, batch.num_rows)
                skip -= cut
                batch = batch.slice(cut)
            if batch.num_rows:
                yield self._rows_of(batch)

    def has_more(self) -> bool:
        while self._next >= len(self._lines):
            data = next(self._batches, None)
            if data is None:
                self.done = True
                return False
            self._lines, self._next = data, 0
        return True

    def next_row(self) -> tuple[Any, int] | None:
        """The next row (a JSON line, by default) and its row number (1-based); None at the
        end."""
        if not self.has_more():
            return None
        line = self._lines[self._next]
        self._next += 1
        self._row += 1
        return line, self._row

    def chunk(self, size: int) -> CsvChunk:
        return CsvChunk(self, size)


def _json_rows(batch: pa.RecordBatch) -> list[bytes]:
    return json_lines(batch).splitlines(keepends=True)


def json_lines(batch: pa.RecordBatch) -> bytes:
    """The batch's rows as JSON lines (one object a row, keys = column names)."""
    import polars as pl

    frame = pl.from_arrow(_arrow_ready(batch))
    assert isinstance(frame, pl.DataFrame)
    exprs = []
    for name, dtype in frame.schema.items():
        converted = _exact(pl.col(name), dtype)
        exprs.append(pl.col(name) if converted is None else converted.alias(name))
    out = io.BytesIO()
    frame.select(exprs).write_ndjson(out)
    return out.getvalue()


def _arrow_ready(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Types polars does not take as they are: dictionaries decoded, half floats widened,
    decimals beyond 38 digits as their text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arrays: list[Any] = []
    changed = False
    for column in batch.columns:
        kind = column.type
        if pa.types.is_dictionary(kind):
            column, kind, changed = column.dictionary_decode(), kind.value_type, True
        if pa.types.is_float16(kind):
            column, changed = pc.cast(column, pa.float32()), True
        elif pa.types.is_decimal256(kind):
            column, changed = pc.cast(column, pa.string()), True
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names) if changed else batch


def _exact(expr: pl.Expr, dtype: Any) -> pl.Expr | None:
    """``expr`` turned into what PostgreSQL reads exactly, or None when its JSON already is."""
    import polars as pl

    if dtype in (pl.Float32, pl.Float64):
        return (pl.when(expr.is_infinite())
                .then(pl.when(expr > 0).then(pl.lit("Infinity")).otherwise(pl.lit("-Infinity")))
                .otherwise(expr.cast(pl.String)))  # NaN is "NaN" already
    if isinstance(dtype, pl.Decimal) or isinstance(dtype, (pl.Categorical, pl.Enum)):
        return expr.cast(pl.String)
    if isinstance(dtype, pl.Binary):
        return pl.lit("\\x") + expr.bin.encode("hex")
    if isinstance(dtype, pl.Date):
        return expr.dt.to_string("%Y-%m-%d")
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone:
            utc = expr.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
            return utc.dt.to_string(_TIMESTAMP) + pl.lit("+00")
        return expr.dt.to_string(_TIMESTAMP)
    if isinstance(dtype, pl.Time):
        return expr.dt.to_string("%H:%M:%S%.f")
    if isinstance(dtype, pl.Duration):
        return expr.dt.total_microseconds().cast(pl.String) + pl.lit(" microseconds")
    if isinstance(dtype, pl.Array):
        inner = _exact(pl.element(), dtype.inner)
        listed = expr.arr.to_list()
        return listed if inner is None else listed.list.eval(inner)
    if isinstance(dtype, pl.List):
        inner = _exact(pl.element(), dtype.inner)
        return None if inner is None else expr.list.eval(inner)
    if isinstance(dtype, pl.Struct):
        fields = [(f.name, _exact(pl.field(f.name), f.dtype)) for f in dtype.fields]
        changed = [e.alias(n) for n, e in fields if e is not None]
        return expr.struct.with_fields(changed) if changed else None
    return None
