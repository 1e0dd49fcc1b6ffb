"""What an export will do: the spec, the plan (read from the source, nothing written), the
SQL of a chunk and the --dry-run text."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .. import catalog
from ..errors import UsageError
from ..model import Column, TableName
from ..retry import RetryPolicy
from ..runner import Pacing
from ..sources.pg import KeysetQuery
from ..urls import DbUrl

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql as sqlmod

    from ..sql_copy.plan import SqlName

ExportFormat = Literal["parquet", "csv", "ndjson"]
FORMATS: tuple[str, ...] = ("parquet", "csv", "ndjson")
# --compression: Parquet's codecs (inside the file), or a whole-file codec for CSV/NDJSON.
PARQUET_CODECS = ("snappy", "zstd", "gzip", "lz4", "brotli", "none")
TEXT_CODECS = {"none": "", "gzip": ".gz", "zstd": ".zst"}
DEFAULT_PARQUET_CODEC = "snappy"
JSON_AS = ("string", "struct")
# The largest adaptive chunk of a Parquet export (one row group, held in memory as Arrow
# while it is written: ~4x its CSV size). Measured on bench/export_pg.py's ~200-byte rows:
# 50k, 100k, 200k and 500k-row groups ran within noise of each other (3.3–3.7 s for 1M
# rows) while peak RSS went 206 → 212 → 271 → 320 MB.
PARQUET_MAX_CHUNK = 100_000


@dataclass(frozen=True)
class ExportSpec:
    """Everything `etl export` was asked to do, checked."""

    source: DbUrl
    state: DbUrl
    table: TableName                # the table, or the name a --query's rows go by
    to_dir: Path
    job_id: str
    format: ExportFormat = "parquet"
    query: str | None = None
    key: tuple[str, ...] | None = None
    columns: tuple[str, ...] | None = None
    where: str | None = None
    rows_per_file: int | None = None   # None: one chunk (row group) per file
    compression: str = DEFAULT_PARQUET_CODEC
    partition_by: tuple[str, ...] = ()
    json_as: str = "string"
    restart: bool = False
    pacing: Pacing = Pacing()
    retry: RetryPolicy = RetryPolicy()
    state_schema: str = "etl"
    # a MySQL/MariaDB or SQLite source's table (``table`` is then unused)
    sql_table: SqlName | None = None

    @property
    def source_name(self) -> str:
        return "query" if self.query else str(self.sql_table or self.table)

    @property
    def suffix(self) -> str:
        """The files' extension: ``parquet``, ``csv``, ``ndjson.gz`` …"""
        if self.format == "parquet":
            return "parquet"
        return self.format + TEXT_CODECS[self.compression]

    def args(self) -> dict[str, Any]:
        return {"source": self.source.masked, "table": str(self.sql_table or self.table),
                "query": self.query,
                "key": list(self.key or ()), "columns": list(self.columns or ()),
                "where": self.where, "to": str(self.to_dir), "format": self.format,
                "rows_per_file": self.rows_per_file, "compression": self.compression,
                "partition_by": list(self.partition_by), "json_as": self.json_as,
                "pacing": dataclasses.asdict(self.pacing), "retry": dataclasses.asdict(self.retry)}


def check_format(fmt: str | None, to_dir: Path) -> ExportFormat:
    value = (fmt or "parquet").lower()
    if value in ("jsonl", "json"):
        value = "ndjson"
    if value not in FORMATS:
        raise UsageError(f"--format {fmt!r}: valid formats are {', '.join(FORMATS)}")
    if to_dir.suffix.lower() in (".parquet", ".csv", ".ndjson", ".jsonl") and not to_dir.is_dir():
        raise UsageError(f"--to {to_dir}: give a directory; the export writes its files (one a "
                         "chunk, or --rows-per-file rows each) and a manifest there. For one "
                         "file, give --rows-per-file larger than the table")
    return value  # type: ignore[return-value]


def check_compression(value: str | None, fmt: ExportFormat) -> str:
    if fmt == "parquet":
        codec = (value or DEFAULT_PARQUET_CODEC).lower()
        if codec not in PARQUET_CODECS:
            raise UsageError(f"--compression {value!r}: Parquet codecs are "
                             f"{', '.join(PARQUET_CODECS)}")
        return codec
    codec = (value or "none").lower()
    if codec not in TEXT_CODECS:
        raise UsageError(f"--compression {value!r}: {fmt} files are compressed whole with "
                         f"{', '.join(TEXT_CODECS)}")
    return codec


@dataclass(frozen=True)
class ExportPlan:
    spec: ExportSpec
    columns: tuple[Column, ...]       # written to the files (partition columns left out)
    key: tuple[Column, ...]
    partition: tuple[Column, ...]     # --partition-by columns
    estimated_rows: int

    @property
    def query(self) -> KeysetQuery:
        return KeysetQuery(self.spec.table, self.columns, self.key, self.spec.where,
                           source_sql=self.spec.query)

    # -- the SQL of a chunk ---------------------------------------------------------------
    def _select(self, has_lower: bool, partitioned: bool) -> sqlmod.Composed:
        """The chunk's rows ``(lo, hi]`` (one partition's when ``partitioned``), in key order,
        as the format wants each column."""
        from psycopg import sql

        q = self.query
        exprs = sql.SQL(", ").join(self._expr(c) for c in self.columns)
        stmt = sql.SQL("SELECT {} FROM {}{}").format(exprs, q._ident(), q._filter(has_lower, True))
        if partitioned:
            stmt += sql.SQL(" AND ({}) IS NOT DISTINCT FROM ({})").format(
                self._partition_text(), sql.SQL(", ").join(
                    sql.Placeholder(f"pv{i}") for i in range(len(self.partition))))
        return stmt + sql.SQL(" ORDER BY {}").format(
            sql.SQL(", ").join(sql.Identifier(k.name) for k in self.key))

    def _partition_text(self) -> sqlmod.Composed:
        from psycopg import sql

        return sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c.name))
                                  for c in self.partition)

    def _expr(self, c: Column) -> sqlmod.Composable:
        """A column as the chunk's COPY sends it: as it is, except for Parquet's arrays
        (JSON, decoded into lists) and NDJSON's multi-line json (see ``copy_sql``)."""
        from psycopg import sql

        ident = sql.Identifier(c.name)
        if self.spec.format == "parquet" and c.type_sql.endswith("]"):
            inner = c.type_sql[:-2]
            if list_item_kind(inner) == "text":  # lists of text forms: exact for every type
                return sql.SQL("to_json({}::text[]) AS {}").format(ident, ident)
            return sql.SQL("to_json({}) AS {}").format(ident, ident)
        if self.spec.format == "ndjson" and c.type_sql == "json":
            # json keeps its exact text, unless it spans lines (an NDJSON row is one line)
            return sql.SQL("CASE WHEN {0}::text ~ '[\\r\\n]' THEN {0}::jsonb::json ELSE {0} END "
                           "AS {0}").format(ident)
        return ident

    def copy_sql(self, has_lower: bool, partitioned: bool, header: bool) -> sqlmod.Composed:
        from psycopg import sql

        select = self._select(has_lower, partitioned)
        if self.spec.format == "ndjson":
            # one JSON object a line, sent verbatim: CSV with a quote and a delimiter JSON
            # text never holds raw (it escapes control characters)
            return sql.SQL("COPY (SELECT row_to_json(r) FROM ({}) AS r) TO STDOUT "
                           "(FORMAT csv, DELIMITER E'\\x02', QUOTE E'\\x01')").format(select)
        return sql.SQL("COPY ({}) TO STDOUT (FORMAT csv{})").format(
            select, sql.SQL(", HEADER" if header else ""))

    def partitions_sql(self, has_lower: bool) -> sqlmod.Composed:
        """The partition values (as text) of the rows ``(lo, hi]``, sorted."""
        from psycopg import sql

        q = self.query
        return sql.SQL("SELECT DISTINCT {0} FROM {1}{2} ORDER BY {0}").format(
            self._partition_text(), q._ident(), q._filter(has_lower, True))


def list_item_kind(type_sql: str) -> str:
    """How a Parquet list holds an array's items: as numbers/booleans, or as text forms."""
    t = re.sub(r"\s+", " ", type_sql.lower().strip())
    return {"smallint": "int16", "integer": "int32", "bigint": "int64", "real": "float32",
            "double precision": "float64", "boolean": "bool", "text": "string"}.get(t, "text")


def make_plan(spec: ExportSpec, conn: psycopg.Connection) -> ExportPlan:
    """Describe the source (a table or --query), resolve the key, the columns and the
    partition columns, and check --where; writes nothing."""
    from ..table_copy import CopySpec
    from ..table_copy.plan import _check_where, _refuse_null_keys

    if spec.query:
        if not spec.key:
            raise UsageError("--query needs --key COL[,COL…]: the column(s) of its result that "
                             "order the rows and cut the chunks")
        info = catalog.describe_query(conn, spec.query, spec.table)
        info = dataclasses.replace(info, primary_key=spec.key)
    else:
        info = catalog.describe(conn, spec.table, role="source")
    key_names = catalog.resolve_key(info, spec.key)
    names = {c.name for c in info.columns}
    unknown = [p for p in spec.partition_by if p not in names]
    if unknown:
        raise UsageError(f"--partition-by {', '.join(unknown)}: no such column in "
                         f"{spec.source_name} ({', '.join(c.name for c in info.columns)})")
    columns = catalog.resolve_columns(info, spec.columns, key_names)
    partition = tuple(info.column(p) for p in spec.partition_by)
    # hive style: a partition's value is in its directory's name, not in its files
    columns = tuple(c for c in columns if c.name not in spec.partition_by)
    if not columns:
        raise UsageError("--partition-by leaves no column to write in the files")
    key = tuple(info.column(k) for k in key_names)
    probe = CopySpec(source=spec.source, target=spec.source, state=spec.state, table=spec.table,
                     target_table=spec.table, job_id=spec.job_id, where=spec.where,
                     query=spec.query)
    if spec.where:
        _check_where(conn, probe)
    _refuse_null_keys(conn, probe, key)
    conn.rollback()
    return ExportPlan(spec, columns, key, partition, info.estimated_rows)


def describe_plan(plan: ExportPlan, remaining: int, exact: bool) -> str:
    """The --dry-run text: what would be written where, and one chunk's COPY."""
    return plan_text(plan.spec, source=spec_source(plan.spec), key=plan.key,
                     columns=[f"{c.name} {c.type_sql}" for c in plan.columns],
                     partition=plan.partition, remaining=remaining, exact=exact,
                     per_chunk=plan.copy_sql(True, bool(plan.partition), False).as_string(None))


def spec_source(spec: ExportSpec) -> str:
    return f"{spec.source.masked}  {spec.source_name}"


def plan_text(spec: ExportSpec, *, source: str, key: Sequence[Any], columns: Sequence[str],
              partition: Sequence[Any], remaining: int, exact: bool, per_chunk: str) -> str:
    """The --dry-run text of an export from any source (``key``/``partition``: columns
    with a ``name``)."""
    about = "" if exact else "~"
    per_file = (f"{spec.rows_per_file:,} rows a file, in row groups of the chunk size"
                if spec.rows_per_file else "one file a chunk")
    lines = [f"job:          {spec.job_id}",
             f"source:       {source}",
             f"key:          {', '.join(k.name for k in key)}",
             f"to:           {spec.to_dir}  ({spec.format}, compression {spec.compression}; "
             f"{per_file})",
             f"columns:      {', '.join(columns)}"]
    if partition:
        lines.append(f"partitions:   {'/'.join(c.name + '=…' for c in partition)} "
                     "(hive style; those columns are in the directory names)")
    if spec.where:
        lines.append(f"where:        {spec.where}")
    lines += [f"rows:         {about}{remaining:,}", f"per chunk:    {per_chunk}",
              "dry run: nothing was written"]
    return "\n".join(lines)


__all__ = ["FORMATS", "JSON_AS", "ExportFormat", "ExportPlan", "ExportSpec",
           "check_compression", "check_format", "describe_plan", "list_item_kind", "make_plan",
           "plan_text", "spec_source"]
