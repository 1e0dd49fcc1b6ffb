"""Chunk files and their manifest: `etl archive --to-dir DIR` and `etl export --to DIR`.

For the archive, each chunk's rows (the rows its source transaction deletes, or selects with --no-delete)
arrive as PostgreSQL CSV COPY output. They are written under a temporary name in DIR, the
file is fsynced, renamed to its final name and the directory fsynced; then the chunk's
entry (file, rows, bytes, sha256, key range) replaces any earlier entry for that chunk in
the manifest, which is written the same way (temp, fsync, rename, fsync the directory).
Only then does the caller commit the source transaction with the checkpoint.

(`etl export` writes the same way, see ``etl.export``.)

Names: ``<prefix>.w<walk>.<chunk>.<ext>`` (in a ``col=value/`` directory when partitioned) with ``prefix`` derived from the job id, ``walk``
the number of the job's walk over the table (stored with the checkpoint, see
:data:`WALK_KEY`) and ``chunk`` the chunk's index in that walk: a chunk replayed after a
crash gets the same name, and a later walk never reuses an earlier walk's names.

A manifest entry whose (walk, chunk) lies past the stored checkpoint belongs to a chunk
whose source transaction did not commit (its rows are still in the source): the next run
drops it and deletes its file (:meth:`Manifest.drop_after`). Temporary files (``.<name>.tmp``
and ``.<name>.csv.tmp``, dot-prefixed) and files named like a chunk file of the job but not
in the manifest (a crash between the rename and the manifest write) are deleted when a run
starts, under the job's lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import EtlError, TargetError, UsageError
from ..model import Category, Column
from ..report import utc_now

if TYPE_CHECKING:
    import pyarrow as pa

FileFormat = Literal["parquet", "csv"]
FORMATS: tuple[str, ...] = ("parquet", "csv")
# Every file name a manifest may list (export also writes NDJSON and compressed text).
_FILE_SUFFIXES = r"(?:parquet|csv|ndjson)(?:\.gz|\.zst)?"
# The checkpoint's watermark key holding the walk number of a --to-dir job (written with the
# checkpoint, so the walk a file belongs to commits with the chunk's delete).
WALK_KEY = "files_walk"
MANIFEST_VERSION = 1
# pyarrow's CSV reader works in blocks of this size; one row must fit in a block (a row of a
# chunk larger than this fails the chunk, which is rolled back: its rows stay in the source).
CSV_BLOCK_BYTES = 16 << 20
HASH_BLOCK_BYTES = 1 << 20
TMP_SUFFIX = ".tmp"
# Session settings that make PostgreSQL's text output of every type the exact, parseable one
# (the server's defaults may differ): ISO dates, hex bytea, shortest-exact floats.
COPY_SETTINGS = {"DateStyle": "ISO, MDY", "IntervalStyle": "postgres", "bytea_output": "hex",
                 "extra_float_digits": "1"}

class CheckpointMoved(EtlError):
    """The stored checkpoint is past the chunk about to run: an attempt whose answer was
    lost committed after all. Transient: the retry finds that checkpoint and moves on."""

    category = Category.TRANSIENT


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def job_prefix(job_id: str) -> str:
    """The job's file-name prefix: ``archive:public.events`` → ``archive-public.events``."""
    return _UNSAFE.sub("-", job_id).strip(".-") or "archive"


def chunk_file_name(prefix: str, walk: int, chunk: int, fmt: str) -> str:
    return f"{prefix}.w{walk:04d}.{chunk:06d}.{fmt}"


def check_format(fmt: str | None) -> FileFormat:
    value = (fmt or "parquet").lower()
    if value not in FORMATS:
        raise UsageError(f"--format {fmt!r}: valid values are {', '.join(FORMATS)}")
    return value  # type: ignore[return-value]


# -- durable writes -------------------------------------------------------------------------

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(final: Path, extra: str = "") -> Path:
    return final.with_name(f".{final.name}{extra}{TMP_SUFFIX}")


def publish(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it to ``final`` and fsync the directory: durable under its name."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def ensure_dir(path: Path) -> None:
    """Create DIR (and parents) durably."""
    if path.is_dir():
        return
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent)


# -- the manifest ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One chunk file as the manifest records it."""

    file: str
    format: str
    walk: int
    chunk_index: int
    after_key: list[Any] | None   # the chunk's rows have key > after_key (None: from the start)
    up_to_key: list[Any]          # … and key <= up_to_key
    rows: int
    bytes: int
    sha256: str
    written_at: str
    run_id: str | None
    partition: dict[str, str | None] | None = None  # export --partition-by: column → value

    @property
    def position(self) -> tuple[int, int]:
        return (self.walk, self.chunk_index)


class Manifest:
    """``DIR/_<prefix>.manifest.json``: every chunk file of the job, rewritten atomically."""

    def __init__(self, directory: Path, job_id: str, table: str) -> None:
        self.dir = directory
        self.job_id = job_id
        self.table = table
        self.prefix = job_prefix(job_id)
        # "_" first: readers of the directory (pyarrow, Spark, polars) skip such files
        self.path = directory / f"_{self.prefix}.manifest.json"
        self.entries: dict[tuple[int, int, str], Entry] = {}  # by (walk, chunk, file)
        self.extra: dict[str, Any] = {}  # more of the document (export: format, schema, …)
        self._file_re = re.compile(
            rf"{re.escape(self.prefix)}\.w\d{{4,}}\.\d{{6,}}\.{_FILE_SUFFIXES}")

    def load(self) -> Manifest:
        if not self.path.exists():
            strays = [p.name for p in self.data_files()]
            if strays:
                raise TargetError(
                    f"{self.dir} holds chunk files of job {self.job_id} ({', '.join(strays[:3])}"
                    f"{' …' if len(strays) > 3 else ''}) but not its manifest {self.path.name}; "
                    "restore the manifest, or move those files away, then rerun")
            return self
        doc = json.loads(self.path.read_text(encoding="utf-8"))
        if doc.get("job_id") != self.job_id:
            raise UsageError(f"{self.path} is the manifest of job {doc.get('job_id')!r}, not "
                             f"{self.job_id!r}; give this job another --to-dir or --job")
        for raw in doc.get("files", []):
            self._add(Entry(**raw))
        known = {"version", "job_id", "table", "updated_at", "files"}
        self.extra = {k: v for k, v in doc.items() if k not in known}
        return self

    def _add(self, entry: Entry) -> None:
        self.entries[(*entry.position, entry.file)] = entry

    def entry(self, walk: int, chunk_index: int) -> Entry | None:
        """The (first) file of a chunk."""
        return next((e for e in self.entries.values() if e.position == (walk, chunk_index)), None)

    def save(self) -> None:
        doc = {"version": MANIFEST_VERSION, "job_id": self.job_id, "table": self.table,
               **self.extra, "updated_at": utc_now(),
               "files": [asdict(self.entries[p]) for p in sorted(self.entries)]}
        tmp = temp_path(self.path)
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
            fh.write("\n")
        publish(tmp, self.path)

    @property
    def last_walk(self) -> int:
        return max((w for w, _, _ in self.entries), default=0)

    def put(self, *entries: Entry) -> None:
        for entry in entries:
            self._add(entry)
        self.save()

    def drop_after(self, walk: int, chunk_index: int) -> list[Entry]:
        """Forget (and delete the files of) every entry past (walk, chunk_index): chunks whose
        source transaction did not commit. The manifest is saved before files go."""
        gone = [(k, e) for k, e in self.entries.items() if e.position > (walk, chunk_index)]
        if not gone:
            return []
        for k, _ in gone:
            del self.entries[k]
        self.save()
        for _, e in gone:
            with contextlib.suppress(FileNotFoundError):
                (self.dir / e.file).unlink()
        return [e for _, e in gone]

    def _walk_dir(self) -> Iterator[Path]:
        """Every file under DIR (partition directories included), in name order."""
        if not self.dir.is_dir():
            return
        for root, dirs, names in os.walk(self.dir):
            dirs.sort()
            for name in sorted(names):
                yield Path(root) / name

    def data_files(self) -> Iterator[Path]:
        for p in self._walk_dir():
            if self._file_re.fullmatch(p.name):
                yield p

    def clean(self) -> list[str]:
        """Delete this job's temporary files and its chunk files the manifest does not list
        (renamed just before a crash, their chunk never committed). Under the job's lock."""
        listed = {e.file for e in self.entries.values()}
        removed = []
        for p in list(self._walk_dir()):
            name = p.relative_to(self.dir).as_posix()
            tmp = p.name.startswith((f".{self.prefix}.", f"._{self.prefix}.")) \
                and p.name.endswith(TMP_SUFFIX)
            if tmp or (self._file_re.fullmatch(p.name) and name not in listed):
                p.unlink()
                fsync_dir(p.parent)
                removed.append(name)
        return removed


# -- chunk files ------------------------------------------------------------------------------

def arrow_type(type_sql: str) -> pa.DataType:
    """The Arrow type that holds a PostgreSQL column's values exactly (text otherwise)."""
    import pyarrow as pa

    t = re.sub(r"\s+", " ", type_sql.lower().strip())
    if t.endswith("]"):
        return pa.string()
    simple: dict[str, pa.DataType] = {
        "smallint": pa.int16(), "integer": pa.int32(), "bigint": pa.int64(),
        "real": pa.float32(), "double precision": pa.float64(), "boolean": pa.bool_(),
        "date": pa.date32(), "bytea": pa.binary()}
    if t in simple:
        return simple[t]
    m = re.fullmatch(r"numeric\((\d+), ?(\d+)\)", t)
    if m and int(m.group(1)) <= 38:
        return pa.decimal128(int(m.group(1)), int(m.group(2)))
    m = re.fullmatch(r"timestamp(?:\(\d\))? with(out)? time zone", t)
    if m:
        return pa.timestamp("us") if m.group(1) else pa.timestamp("us", tz="UTC")
    if re.fullmatch(r"time(?:\(\d\))? without time zone", t):
        return pa.time64("us")
    return pa.string()  # numeric without a scale, uuid, json, interval, enums, arrays …


@dataclass(frozen=True)
class Written:
    rows: int
    bytes: int
    sha256: str


def spool(tmp: Path, blocks: Iterable[bytes]) -> tuple[int, str]:
    """Write COPY output to ``tmp`` as it arrives; (bytes, sha256)."""
    digest = hashlib.sha256()
    size = 0
    with open(tmp, "wb") as fh:
        for block in blocks:
            fh.write(block)
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def csv_to_parquet(spool: Path, final: Path, columns: tuple[Column, ...]) -> Written:
    """Convert a chunk's CSV COPY output (``spool``) to Parquet with each column's exact
    type, batch by batch (memory: a few CSV blocks), and publish it as ``final``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {c.name: arrow_type(c.type_sql) for c in columns}
    schema = pa.schema([pa.field(c.name, types[c.name], nullable=not c.not_null)
                        for c in columns])
    tmp = temp_path(final)
    rows = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in csv_batches(spool, {n: (pa.string() if t == pa.binary() else t)
                                             for n, t in types.items()}):
                arrays = [_as(batch.column(i), types[c.name]) for i, c in enumerate(columns)]
                writer.write_batch(pa.record_batch(arrays, schema=schema))
                rows += batch.num_rows
    except TargetError:
        tmp.unlink(missing_ok=True)
        raise
    size, sha = tmp.stat().st_size, sha256_of(tmp)
    publish(tmp, final)
    return Written(rows=rows, bytes=size, sha256=sha)


def csv_batches(spool: Path | Any, read_as: dict[str, pa.DataType], *,
                block_size: int = CSV_BLOCK_BYTES) -> Iterator[pa.RecordBatch]:
    """The record batches of PostgreSQL's CSV COPY output (exact text forms: see
    COPY_SETTINGS) in a file or a readable stream, each column read as ``read_as`` says; a
    value Arrow cannot hold is a TargetError that says what to do."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    reader = _open_csv(
        spool, read_options=pcsv.ReadOptions(block_size=block_size, use_threads=False),
        parse_options=pcsv.ParseOptions(newlines_in_values=True),
        convert_options=pcsv.ConvertOptions(
            column_types=read_as, null_values=[""], strings_can_be_null=True,
            quoted_strings_can_be_null=False, true_values=["t"], false_values=["f"],
            timestamp_parsers=["%Y-%m-%d %H:%M:%S%z", pcsv.ISO8601]))
    try:
        yield from reader
    except (pa.ArrowInvalid, ValueError) as exc:
        raise _not_arrow(exc) from exc


def _not_arrow(exc: BaseException) -> TargetError:
    return TargetError(
        f"a row of this chunk cannot be converted to Parquet ({exc}); nothing of the chunk "
        "was kept (an archive's rows stay in the source). Values Arrow cannot hold (NaN in a "
        "numeric(p,s), an infinite date or timestamp, a year past 9999) need --format csv, "
        "or a --where that leaves those rows")


def _open_csv(spool: Path | Any, **options: Any) -> Any:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    try:
        return pcsv.open_csv(spool, **options)
    except pa.ArrowInvalid as exc:  # the first block is read (and converted) at once
        raise _not_arrow(exc) from exc


def _as(array: pa.Array, target: pa.DataType) -> pa.Array:
    """bytea arrives as PostgreSQL's hex text (``\\x0a1b…``): decode it."""
    import pyarrow as pa

    if target != pa.binary():
        return array
    return hex_to_binary(array)


def hex_to_binary(array: pa.Array) -> pa.Array:
    """PostgreSQL's hex text of bytea values (``\\x0a1b…``) as binary."""
    import polars as pl
    import pyarrow as pa

    decoded = pl.Series(array).str.strip_prefix("\\x").str.decode("hex")
    return decoded.to_arrow().cast(pa.binary())


__all__ = ["COPY_SETTINGS", "CheckpointMoved", "FORMATS", "WALK_KEY", "Entry", "FileFormat", "Manifest",
           "arrow_type", "check_format", "chunk_file_name", "csv_batches", "csv_to_parquet",
           "ensure_dir", "hex_to_binary",
           "job_prefix", "publish", "spool", "temp_path"]
