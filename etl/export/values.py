"""The files of an export from MySQL/MariaDB or SQLite: chunks of Python values (the
canonical values of ``etl.dialects``, as ``etl.sources.sqla`` reads them) written as
Parquet, CSV or NDJSON, under a temporary name, fsynced and renamed like the PostgreSQL
export's files (``etl.export.writers``).

- Parquet: one row group a chunk, an explicit schema from the columns' portable kinds
  (``arrow_type``): int16/32/64, decimal128(p,s) (precision and scale known, p ≤ 38),
  float32/64, bool, date32, timestamp[us] (UTC-aware for timezone-aware source types such
  as MySQL's TIMESTAMP), time64[us], binary; text, json and every other kind as string.
- CSV: PostgreSQL's CSV (a header; NULL an unquoted empty field, the empty string ``""``;
  ISO dates and timestamps; bytes as ``\\x`` hex; booleans ``t``/``f``), so ``etl load``
  (PostgreSQL's COPY) reads the values back exactly.
- NDJSON: one JSON object a line; decimals as JSON numbers with their exact digits, dates
  and times as ISO text, bytes as ``\\x`` hex text, json columns as JSON values.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dialects import Kind, PortableColumn
from ..errors import TargetError
from ..sinks import files
from ..sql_copy_io import _time_text
from .writers import ParquetFile, TextOut

if TYPE_CHECKING:
    import pyarrow as pa

    from .sql_source import SqlExportPlan

_CSV_QUOTE = re.compile(r'[,"\r\n]')


def arrow_type(column: PortableColumn) -> pa.DataType:
    """The Arrow type that holds a column's values exactly, from its portable kind."""
    import pyarrow as pa

    t = column.type
    simple: dict[Kind, pa.DataType] = {
        Kind.SMALLINT: pa.int16(), Kind.INTEGER: pa.int32(), Kind.BIGINT: pa.int64(),
        Kind.BOOLEAN: pa.bool_(), Kind.REAL: pa.float32(), Kind.DOUBLE: pa.float64(),
        Kind.DATE: pa.date32(), Kind.TIME: pa.time64("us"), Kind.TIMESTAMP: pa.timestamp("us"),
        Kind.TIMESTAMPTZ: pa.timestamp("us", tz="UTC"), Kind.BYTES: pa.binary()}
    if t.kind in simple:
        return simple[t.kind]
    if t.kind is Kind.NUMERIC and t.precision is not None and t.scale is not None \
            and 0 < t.precision <= 38 and 0 <= t.scale <= t.precision:
        return pa.decimal128(t.precision, t.scale)
    return pa.string()  # text, json, uuid, enum, set, numeric without a (small) precision


def text_of(v: Any) -> str:
    """A (non-NULL) value as PostgreSQL's text form writes it: ``t``/``f``, ISO dates and
    timestamps (a space before the time), ``\\x`` hex bytes, shortest exact floats."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "t" if v else "f"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return repr(v)
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, dt.datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, (dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(v).hex()
    if isinstance(v, dt.timedelta):
        return _time_text(v)
    if isinstance(v, (set, frozenset)):
        return ",".join(sorted(map(str, v)))
    return str(v)


def partition_text(v: Any) -> str | None:
    """A partition value as its directory names it (None: NULL): the value's text, ISO for
    dates and timestamps, ``true``/``false`` for booleans (as PostgreSQL's ``::text``)."""
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    return text_of(v)


def csv_field(v: Any) -> str:
    if v is None:
        return ""
    s = text_of(v)
    if not s or _CSV_QUOTE.search(s) or s == "\\.":
        return '"' + s.replace('"', '""') + '"'
    return s


def _json_text(v: str) -> str:
    """A json column's text as a JSON value on one line; text that is not JSON as a string."""
    def refuse(name: str) -> Any:
        raise ValueError(name)

    try:
        json.loads(v, parse_constant=refuse)
    except ValueError:
        return json.dumps(v, ensure_ascii=False)
    # raw line breaks can only be whitespace between a valid JSON text's tokens
    return v.replace("\r", " ").replace("\n", " ") if "\n" in v or "\r" in v else v


def json_field(v: Any, kind: Kind) -> str:
    if v is None:
        return "null"
    if isinstance(v, str):
        return _json_text(v) if kind is Kind.JSON else json.dumps(v, ensure_ascii=False)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else json.dumps(text_of(v))
    if isinstance(v, Decimal):
        return str(v) if v.is_finite() else json.dumps(str(v))
    if isinstance(v, (dt.date, dt.time)):  # datetimes too: ISO with a T, as row_to_json
        return '"' + v.isoformat() + '"'
    if isinstance(v, (bytes, bytearray, memoryview)):
        return '"\\\\x' + bytes(v).hex() + '"'
    return json.dumps(text_of(v), ensure_ascii=False)


class ValuesTextOut:
    """CSV or NDJSON of Python values (gzip/zstd compressed when asked)."""

    def __init__(self, final: Path, plan: SqlExportPlan) -> None:
        self.final = final
        self._out = TextOut(final, plan.spec.compression)
        self._csv = plan.spec.format == "csv"
        self._header = ",".join(csv_field(c.name) for c in plan.columns) + "\n"
        self._keys = [json.dumps(c.name, ensure_ascii=False) + ":" for c in plan.columns]
        self._kinds = [c.type.kind for c in plan.columns]

    @property
    def rows(self) -> int:
        return self._out.rows

    def add_rows(self, rows: list[tuple[Any, ...]]) -> int:
        if self._csv:
            lines = [self._header] if self._out.rows == 0 else []
            lines += [",".join(map(csv_field, r)) + "\n" for r in rows]
        else:
            keys, kinds = self._keys, self._kinds
            lines = ["{" + ",".join(k + json_field(v, kind)
                                    for k, v, kind in zip(keys, r, kinds, strict=True)) + "}\n"
                     for r in rows]
        data = "".join(lines).encode("utf-8")

        def copy(write: Any) -> int:
            write(data)
            return len(rows)

        return self._out.add(copy)

    def close(self) -> files.Written:
        return self._out.close()

    def abort(self) -> None:
        self._out.abort()


class ValuesParquetOut(ParquetFile):
    """Parquet of Python values: each chunk one row group, in the columns' exact types."""

    def __init__(self, final: Path, plan: SqlExportPlan) -> None:
        import pyarrow as pa

        super().__init__(final)
        self.plan = plan
        self.schema = pa.schema([pa.field(c.name, arrow_type(c), nullable=c.nullable)
                                 for c in plan.columns])
        self._as_text = [pa.types.is_string(f.type) for f in self.schema]

    def add_rows(self, rows: list[tuple[Any, ...]]) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays = []
        for i, (c, field) in enumerate(zip(self.plan.columns, self.schema, strict=True)):
            values = [r[i] for r in rows]
            if self._as_text[i]:
                values = [v if v is None or isinstance(v, str) else text_of(v) for v in values]
            try:
                arrays.append(pa.array(values, type=field.type))
            except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
                bad = next((v for v in values if _refused(v, field.type)), None)
                raise TargetError(
                    f"column {c.name} ({c.native or c.type}) of {self.plan.spec.source_name}: "
                    f"a value Parquet's {field.type} cannot hold"
                    f"{f' ({bad!r})' if bad is not None else ''}: {exc}. Nothing of this "
                    "chunk was written; export with --format csv or ndjson, or leave such "
                    "rows out with --where, then rerun: the job resumes at this chunk") from exc
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        if self._writer is None:
            codec = self.plan.spec.compression
            self._writer = pq.ParquetWriter(self.tmp, self.schema,
                                            compression=None if codec == "none" else codec)
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.rows += table.num_rows
        return table.num_rows


def _refused(v: Any, typ: pa.DataType) -> bool:
    import pyarrow as pa

    if v is None:
        return False
    try:
        pa.array([v], type=typ)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return True
    return False


def open_values_file(plan: SqlExportPlan, final: Path) -> ValuesParquetOut | ValuesTextOut:
    final.parent.mkdir(parents=True, exist_ok=True)
    if plan.spec.format == "parquet":
        return ValuesParquetOut(final, plan)
    return ValuesTextOut(final, plan)


def schema_doc(plan: SqlExportPlan) -> list[dict[str, Any]]:
    """The manifest's schema: each column's source type, its portable kind and its type in
    the files."""
    return [{"name": c.name, "type": c.native or str(c.type), "portable_type": str(c.type),
             "file_type": str(arrow_type(c)) if plan.spec.format == "parquet" else "text",
             "nullable": c.nullable} for c in plan.columns]


__all__ = ["ValuesParquetOut", "ValuesTextOut", "arrow_type", "csv_field", "json_field",
           "open_values_file", "partition_text", "schema_doc", "text_of"]
