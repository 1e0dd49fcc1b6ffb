"""Writes chunks into PostgreSQL with COPY FROM STDIN, in the caller's transaction."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..model import Column, TableName
from ..sources.pg import BINARY_HEADER, BINARY_TRAILER

if TYPE_CHECKING:
    import psycopg


@dataclass
class WriteStats:
    rows: int
    bytes: int
    checksum: str
    outcomes: dict[str, int] | None = None  # upsert/ignore: inserted, updated, unchanged, …


class CopyStatement:
    """One open ``COPY … FROM STDIN``: ``write()`` blocks, then ``finish()``.

    A write that fails (the server may report a bad row before the statement ends) is
    kept and raised by ``finish()``, so the caller can go on reading its source to the
    end of the piece; ``finish()`` may run on another thread than the writes (it only
    waits for the server), as long as nothing else uses the connection meanwhile.
    """

    def __init__(self, conn: psycopg.Connection, copy_sql: Any) -> None:
        self._cursor = conn.cursor()
        self._context = self._cursor.copy(copy_sql)
        try:
            self._copy = self._context.__enter__()
        except BaseException:
            self._cursor.close()
            raise
        self._crc = 0  # CRC-32 of the bytes sent: blake2b cost a fifth of the client's CPU
        self.bytes = 0
        self.error: BaseException | None = None

    def write(self, block: bytes) -> None:
        if self.error is not None:
            return
        self._crc = zlib.crc32(block, self._crc)
        self.bytes += len(block)
        try:
            self._copy.write(block)
        except Exception as exc:
            self.error = exc

    def abort(self, exc: BaseException) -> None:
        """End the statement without its rows (the caller is raising ``exc``)."""
        try:
            self._context.__exit__(type(exc), exc, exc.__traceback__)
        except Exception:  # the connection may be gone; the caller's error is the one to report
            pass
        finally:
            self._cursor.close()

    def finish(self) -> WriteStats:
        """End the statement and wait for the server; raises what the server refused."""
        try:
            if self.error is not None:
                self._context.__exit__(type(self.error), self.error, self.error.__traceback__)
                raise self.error
            self._context.__exit__(None, None, None)
            rows = self._cursor.rowcount
        finally:
            self._cursor.close()
        return WriteStats(rows=max(rows, 0), bytes=self.bytes, checksum=f"{self._crc:08x}")


class PgCopySink:
    """COPY into ``table`` (append); the caller owns the transaction."""

    def __init__(self, conn: psycopg.Connection, table: TableName, columns: tuple[Column, ...],
                 *, binary: bool = True, csv: bool = False) -> None:
        from psycopg import sql

        self.conn = conn
        self.table = table
        self._columns = columns
        self.binary = binary and not csv
        self._copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT {})").format(
            sql.Identifier(table.schema, table.name),
            sql.SQL(", ").join(sql.Identifier(c.name) for c in columns),
            sql.SQL("csv" if csv else "binary" if binary else "text"),
        )

    def set_copy_options(self, options: str) -> None:
        """COPY with these options instead (``FORMAT csv, DELIMITER '|', …``: etl load)."""
        from psycopg import sql

        self.binary = False
        self._copy_sql = sql.SQL("COPY {} ({}) FROM STDIN ({})").format(
            sql.Identifier(self.table.schema, self.table.name),
            sql.SQL(", ").join(sql.Identifier(c.name) for c in self._columns),
            sql.SQL(options))  # type: ignore[arg-type]  # built from sql.Literal values

    def start(self) -> CopyStatement:
        """Open one COPY statement: write blocks to it, then ``finish()`` it."""
        return CopyStatement(self.conn, self._copy_sql)

    def write(self, blocks: Iterable[bytes]) -> WriteStats:
        """Stream COPY data blocks into the table; returns rows, bytes and a checksum of the bytes."""
        statement = self.start()
        for block in blocks:
            statement.write(block)
        return statement.finish()

    def write_rows(self, rows: bytes) -> WriteStats:
        """COPY rows cut from a source's COPY data (binary rows get the header and trailer)."""
        if self.binary:
            return self.write([BINARY_HEADER + rows + BINARY_TRAILER])
        return self.write([rows])

    def truncate(self) -> None:
        from psycopg import sql

        self.conn.execute(sql.SQL("TRUNCATE {}").format(
            sql.Identifier(self.table.schema, self.table.name)))
