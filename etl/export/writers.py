"""The files of an export: each written under a temporary name, row group by row group
(Parquet) or block by block (CSV, NDJSON), then fsynced and renamed (``publish``).

Parquet values keep their exact types (``arrow_schema``): numeric(p,s) as decimal128,
timestamptz as UTC-aware timestamps, arrays as lists, bytea as binary, json/jsonb as their
text (or, with ``--json-as struct``, decoded into structs); what Arrow has no exact type
for (numeric without a scale, uuid, interval, enums …) as PostgreSQL's text form. The
rows arrive as PostgreSQL's CSV COPY output in exact text forms (``etl.sinks.files.COPY_SETTINGS``) and
are converted by pyarrow's CSV reader and, for lists, binary and structs, by polars.
"""

from __future__ import annotations

import hashlib
import os
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import TargetError
from ..model import Column
from ..sinks import files
from .plan import ExportPlan, list_item_kind

if TYPE_CHECKING:
    import pyarrow as pa

NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"  # a NULL partition value, as Hive writes it
# pyarrow converts the CSV of a chunk as it arrives through a pipe, block by block.
PIPE_BLOCK_BYTES = 4 << 20


@contextmanager
def piped(copy: Any) -> Iterator[tuple[Any, list[int]]]:
    """Run ``copy(write)`` (a chunk's COPY) on a thread writing into a pipe, and yield the
    pipe's reading end (for pyarrow) with the rows sent (filled in once the COPY ended), so
    the rows are converted while the server is still sending them — measured 0.2 s instead of
    0.3–0.4 s for 100k rows written to a file first. The GIL is released both while the
    thread waits on the socket and while pyarrow converts. An error of the COPY is raised
    here once the reading is done; if the reading stops first, the pipe is closed, the
    thread's next write fails and the COPY is abandoned (the chunk's transaction is rolled
    back by the caller)."""
    import pyarrow as pa

    r, w = os.pipe()
    sent = [0]
    failed: list[BaseException] = []

    def feed() -> None:
        try:
            with os.fdopen(w, "wb", buffering=0) as out:
                sent[0] = int(copy(out.write))
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            failed.append(exc)

    thread = threading.Thread(target=feed, name="etl-export-copy", daemon=True)
    reader = os.fdopen(r, "rb")  # buffered: read(n) waits for n bytes, so blocks are whole
    thread.start()
    try:
        yield pa.PythonFile(reader, mode="r"), sent
    finally:
        reader.close()  # a writer still sending gets EPIPE and stops
        thread.join()
        # the COPY's own failure (a lost connection, say) is the one to report, also when
        # it cut the CSV short and the reading failed for that
        if failed and not isinstance(failed[0], BrokenPipeError):
            raise failed[0]


def partition_dir(columns: tuple[Column, ...], values: tuple[str | None, ...]) -> str:
    """``col=value/…`` (values URI-escaped, as pyarrow, Spark and DuckDB read them)."""
    return "/".join(f"{c.name}={NULL_PARTITION if v is None else urllib.parse.quote(v, safe='')}"
                    for c, v in zip(columns, values, strict=True))


def _item_type(type_sql: str) -> pa.DataType:
    import pyarrow as pa

    kind = list_item_kind(type_sql)
    return pa.string() if kind == "text" else pa.type_for_alias(kind)


def arrow_types(columns: tuple[Column, ...], json_as: str) -> dict[str, pa.DataType | None]:
    """Each column's Parquet type; None for a json column decoded into a struct (its type
    comes from its values)."""
    import pyarrow as pa

    out: dict[str, pa.DataType | None] = {}
    for c in columns:
        if c.type_sql.endswith("]"):
            out[c.name] = pa.list_(_item_type(c.type_sql[:-2]))
        elif c.type_sql in ("json", "jsonb"):
            out[c.name] = None if json_as == "struct" else pa.string()
        else:
            out[c.name] = files.arrow_type(c.type_sql)
    return out


class FileOut(Protocol):
    """One file being written: groups of rows go in, ``close()`` publishes it."""

    final: Path

    def add(self, copy: Any) -> int: ...      # ``copy(write) -> rows``: one chunk's rows
    def close(self) -> files.Written: ...
    def abort(self) -> None: ...


class TextOut:
    """CSV or NDJSON: the COPY output as it comes (gzip/zstd compressed when asked)."""

    def __init__(self, final: Path, compression: str) -> None:
        self.final = final
        self.tmp = files.temp_path(final)
        self.rows = 0
        self._raw = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._digest: Any = hashlib.sha256() if compression == "none" else None
        self._out: Any = self._raw
        if compression == "gzip":
            import gzip

            self._out = gzip.GzipFile(fileobj=self._raw, mode="wb", compresslevel=6, mtime=0)
        elif compression == "zstd":
            import pyarrow as pa

            self._out = pa.CompressedOutputStream(pa.PythonFile(self._raw, mode="w"), "zstd")

    def _write(self, block: bytes) -> None:
        self._out.write(block)
        if self._digest is not None:
            self._digest.update(block)

    def add(self, copy: Any) -> int:
        n = int(copy(self._write))
        self.rows += n
        return n

    def close(self) -> files.Written:
        if self._out is not self._raw:
            self._out.close()
        if not self._raw.closed:
            self._raw.close()
        size = self.tmp.stat().st_size
        sha = self._digest.hexdigest() if self._digest is not None else files.sha256_of(self.tmp)
        files.publish(self.tmp, self.final)
        return files.Written(rows=self.rows, bytes=size, sha256=sha)

    def abort(self) -> None:
        try:
            if self._out is not self._raw:
                self._out.close()
        finally:
            self._raw.close()
            self.tmp.unlink(missing_ok=True)


class ParquetFile:
    """A Parquet file being written (``_writer``: a ``pyarrow.parquet.ParquetWriter``,
    opened by the first chunk); ``close`` publishes it, ``abort`` deletes it."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = files.temp_path(final)
        self.rows = 0
        self._writer: Any = None

    def close(self) -> files.Written:
        assert self._writer is not None, "a Parquet file is opened by its first rows"
        self._writer.close()
        size, sha = self.tmp.stat().st_size, files.sha256_of(self.tmp)
        files.publish(self.tmp, self.final)
        return files.Written(rows=self.rows, bytes=size, sha256=sha)

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the file is deleted anyway
                pass
        self.tmp.unlink(missing_ok=True)


class ParquetOut(ParquetFile):
    """Parquet: each chunk one row group, its values in their exact Arrow types."""

    def __init__(self, final: Path, plan: ExportPlan) -> None:
        super().__init__(final)
        self.plan = plan
        self.types = arrow_types(plan.columns, plan.spec.json_as)

    def add(self, copy: Any) -> int:
        import pyarrow as pa

        read_as = {n: (t if t is not None and not pa.types.is_list(t) and t != pa.binary()
                       else pa.string()) for n, t in self.types.items()}
        with piped(copy) as (stream, sent):
            table = pa.Table.from_batches(list(files.csv_batches(stream, read_as,
                                                                 block_size=PIPE_BLOCK_BYTES)))
        if not sent[0]:
            return 0
        table = self._convert(table)
        if self._writer is None:
            import pyarrow.parquet as pq

            codec = self.plan.spec.compression
            self._writer = pq.ParquetWriter(self.tmp, table.schema,
                                            compression=None if codec == "none" else codec)
        elif table.schema != self._writer.schema:
            raise TargetError(
                f"{self.final.name}: this chunk's json values decode into another struct type "
                f"than the file's first chunk ({table.schema} vs {self._writer.schema}); "
                "use --json-as string, or one chunk a file (no --rows-per-file)")
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.rows += table.num_rows
        if table.num_rows != sent[0]:  # pragma: no cover - the CSV holds what COPY sent
            raise TargetError(f"{self.final.name}: COPY sent {sent[0]} rows, {table.num_rows} read")
        return sent[0]

    def _convert(self, table: pa.Table) -> pa.Table:
        """Lists from their JSON text, binary from hex, structs from json; nullability."""
        import polars as pl
        import pyarrow as pa

        arrays, fields = [], []
        for c in self.plan.columns:
            arr = table.column(c.name)  # chunked; made contiguous only to be converted
            want = self.types[c.name]
            try:
                if want is None or pa.types.is_list(want) or want == pa.binary():
                    arr = arr.combine_chunks()
                if want is None:  # --json-as struct
                    arr = pl.Series(arr).str.json_decode(infer_schema_length=None).to_arrow()
                elif pa.types.is_list(want):
                    inner = pl.from_arrow(pa.array([], want.value_type)).dtype  # type: ignore[union-attr]
                    arr = pl.Series(arr).str.json_decode(pl.List(inner)).to_arrow().cast(want)
                elif want == pa.binary():
                    arr = files.hex_to_binary(arr)
            except (pl.exceptions.PolarsError, pa.ArrowInvalid) as exc:
                hint = (" (--json-as struct needs json values that are objects of one shape; "
                        "use --json-as string)" if want is None else "")
                raise TargetError(f"column {c.name} ({c.type_sql}) cannot be written as "
                                  f"Parquet: {exc}{hint}") from exc
            arrays.append(arr)
            fields.append(pa.field(c.name, arr.type, nullable=not c.not_null))
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

def open_file(plan: ExportPlan, final: Path) -> FileOut:
    final.parent.mkdir(parents=True, exist_ok=True)
    if plan.spec.format == "parquet":
        return ParquetOut(final, plan)
    return TextOut(final, plan.spec.compression)


def schema_doc(plan: ExportPlan) -> list[dict[str, Any]]:
    """The manifest's schema: each column's PostgreSQL type and its type in the files."""
    types = arrow_types(plan.columns, plan.spec.json_as)
    out = []
    for c in plan.columns:
        t = types[c.name]
        in_files = (("struct (from its values)" if t is None else str(t))
                    if plan.spec.format == "parquet" else "text")
        out.append({"name": c.name, "type": c.type_sql, "file_type": in_files,
                    "nullable": not c.not_null})
    return out


__all__ = ["NULL_PARTITION", "FileOut", "ParquetFile", "ParquetOut", "TextOut", "arrow_types", "open_file",
           "partition_dir", "schema_doc"]
