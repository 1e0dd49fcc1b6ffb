"""The rows of a CSV file as raw bytes, cut where rows end, for PostgreSQL's own CSV COPY.

PostgreSQL parses and converts the values itself (``COPY … FROM STDIN (FORMAT csv,
DELIMITER …, QUOTE …, NULL …)``): what ``\\copy`` does, and as exactly. This module only
finds where each row ends — a newline outside quotes: a quoted field may hold newlines,
so a line whose quotes are unbalanced goes on with the next — and which line each row
starts on, so that a row PostgreSQL refuses is reported by file and line, and a resumed
load starts at the byte after the last committed row. Blank lines are skipped.

With ``quote=None`` (NDJSON: one JSON value a line) no quotes are tracked: each line is
a row; a trailing carriage return is dropped (CRLF files) and so is a UTF-8 byte order
mark at the start of the file.

The file is read in blocks (gzip, bz2 and — through pyarrow — zstd by extension), never
whole. Rows are handed out through the interface of
``etl.sources.copy_out.CopyOut`` (``get(1)``, ``more(n)``), so the piecewise writer
(``etl.piecewise``) streams them as it streams a table's COPY rows.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# How much of a file is read at once, and how much of its head identifies it.
READ_BLOCK_BYTES = 1 << 20
HEAD_BYTES = 64 * 1024
_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark (NDJSON files only)
COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}


@dataclass(frozen=True)
class FileId:
    """What identifies a file between runs: a changed file is not resumed."""

    path: str
    size: int
    mtime_ns: int
    head_sha256: str

    @classmethod
    def of(cls, path: Path) -> FileId:
        st = path.stat()
        with path.open("rb") as fh:
            head = hashlib.sha256(fh.read(HEAD_BYTES)).hexdigest()
        return cls(str(path), st.st_size, st.st_mtime_ns, head)

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns,
                "head_sha256": self.head_sha256}


def compression_of(path: Path) -> str | None:
    return COMPRESSIONS.get(path.suffix.lower())


def open_bytes(path: Path) -> Any:
    """The file's (uncompressed) bytes as a stream with ``read(n)`` and ``close()``: the
    standard library for plain, gzip and bz2 files; pyarrow only for zstd (importing it
    costs ~50 MB of memory)."""
    kind = compression_of(path)
    if kind == "gzip":
        import gzip

        return gzip.open(path, "rb")
    if kind == "bz2":
        import bz2

        return bz2.open(path, "rb")
    if kind == "zstd":
        import pyarrow as pa

        return pa.input_stream(str(path), compression="zstd")
    return path.open("rb", buffering=0)


@dataclass
class Position:
    """Where reading goes on: the byte offset (of the uncompressed data) and its line."""

    offset: int = 0
    line: int = 1


class CsvRows:
    """Rows of one CSV file from ``start``; ``chunk(n)`` hands out the next ``n``."""

    def __init__(self, path: Path, start: Position, *, quote: bytes | None = b'"',
                 escape: bytes | None = None) -> None:
        """``quote=None``: no quotes, a line is a row (NDJSON)."""
        self.path = path
        self._quote = quote or b""
        self._escaped_quote = escape + quote if quote and escape and escape != quote else None
        self._stream = open_bytes(path)
        self._seekable = compression_of(path) is None
        self._rows = self._split(start) if quote else self._lines(start)
        self._offset, self._line = start.offset, start.line  # after the last row handed out
        self.done = False
        self._peeked: tuple[bytes, int, int, int] | None = None

    @property
    def position(self) -> Position:
        """Where the rows not handed out yet begin."""
        return Position(self._offset, self._line)

    def close(self) -> None:
        self._stream.close()

    def _blocks(self, skip: int) -> Iterator[bytes]:
        """The file's bytes from offset ``skip`` (a plain file seeks there, a compressed one
        is read up to it)."""
        if skip and self._seekable:
            self._stream.seek(skip)
            skip = 0
        while skip > 0:
            data = self._stream.read(min(skip, READ_BLOCK_BYTES))
            if not data:
                return
            skip -= len(data)
        while data := self._stream.read(READ_BLOCK_BYTES):
            yield data

    def _split(self, start: Position) -> Iterator[tuple[bytes, int, int, int]]:
        """(row, its first line, the offset and the line after it), blank lines left out."""
        q, esc = self._quote, self._escaped_quote
        offset, line = start.offset, start.line
        pending = b""        # an incomplete last line of the block read so far
        row: list[bytes] = []  # the lines of a row whose quote is still open
        row_line, parity = line, 0
        for block in self._blocks(start.offset):
            lines = (pending + block).split(b"\n")
            pending = lines.pop()
            for text in lines:
                offset += len(text) + 1
                if not row:
                    row_line = line
                    if not text.strip(b"\r"):  # a blank line: no row
                        line += 1
                        continue
                row.append(text)
                line += 1
                parity ^= (text.count(q) - (text.count(esc) if esc else 0)) & 1
                if not parity:  # every quote opened on the row's lines is closed
                    yield b"\n".join(row) + b"\n", row_line, offset, line
                    row = []
        if pending or row:  # the last line has no newline, or a quote never closed
            if not row:
                row_line = line
            row.append(pending)
            offset += len(pending)
            text = b"\n".join(row)
            if text.strip(b"\r\n"):
                yield text + b"\n", row_line, offset, line + 1

    def _lines(self, start: Position) -> Iterator[tuple[bytes, int, int, int]]:
        """(line, its number, the offset and the line after it): one row a line, blank
        lines left out, a CRLF's CR and the file's byte order mark dropped."""
        offset, line = start.offset, start.line
        pending = b""
        first = offset == 0  # the file's first line may begin with a byte order mark
        for block in self._blocks(start.offset):
            lines = (pending + block).split(b"\n")
            pending = lines.pop()
            for text in lines:
                offset += len(text) + 1
                line += 1
                if first:
                    text, first = text.removeprefix(_BOM), False
                if text.endswith(b"\r"):
                    text = text[:-1]
                if text.strip():
                    yield text + b"\n", line - 1, offset, line
        offset += len(pending)
        if first:
            pending = pending.removeprefix(_BOM)
        if pending.strip():  # the last line has no newline
            yield pending.removesuffix(b"\r") + b"\n", line, offset, line + 1

    def chunk(self, size: int) -> CsvChunk:
        return CsvChunk(self, size)

    def has_more(self) -> bool:
        """Whether a row is left (read ahead, not handed out)."""
        if self._peeked is None and not self.done:
            self._peeked = next(self._rows, None)
            self.done = self._peeked is None
        return self._peeked is not None

    def next_row(self) -> tuple[bytes, int] | None:
        """The next row and its line (None at the end of the file)."""
        found, self._peeked = self._peeked or next(self._rows, None), None
        if found is None:
            self.done = True
            return None
        row, line, self._offset, self._line = found
        return row, line


class NextRow(Protocol):
    def next_row(self) -> tuple[bytes, int] | None: ...


class CsvChunk:
    """The next ``size`` rows of a file, as ``CopyOut`` hands out COPY rows (of any reader
    with ``next_row()``: the row's bytes and its line or row number)."""

    def __init__(self, rows: NextRow, size: int) -> None:
        self._rows = rows
        self._left = size
        self.lines = array("q")        # the first line of each row handed out (8 bytes a row)

    def get(self, _async: int = 1) -> tuple[int, Any]:
        if self._left <= 0:
            return -1, b""
        found = self._rows.next_row()
        if found is None:
            self._left = 0
            return -1, b""
        self._left -= 1
        row, line = found
        self.lines.append(line)
        return len(row), row

    def more(self, nbytes: int) -> bytes:
        return b""  # get() never says "wait": the end it signals is the chunk's

    def read(self) -> bytes:
        n, row = self.get()
        return row if n > 0 else b""
