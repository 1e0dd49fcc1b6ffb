"""Writes chunks into PostgreSQL with COPY FROM STDIN, in the caller's transaction."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

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


class PgCopySink:
    """COPY into ``table`` (append); the caller owns the transaction."""

    def __init__(self, conn: psycopg.Connection, table: TableName, columns: tuple[Column, ...],
                 *, binary: bool = True, csv: bool = False) -> None:
        from psycopg import sql

        self.conn = conn
        self.table = table
        self.binary = binary and not csv
        self._copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT {})").format(
            sql.Identifier(table.schema, table.name),
            sql.SQL(", ").join(sql.Identifier(c.name) for c in columns),
            sql.SQL("csv" if csv else "binary" if binary else "text"),
        )

    def write(self, blocks: Iterable[bytes]) -> WriteStats:
        """Stream COPY data blocks into the table; returns rows, bytes and a checksum of the bytes."""
        digest = hashlib.blake2b(digest_size=16)
        nbytes = 0
        with self.conn.cursor() as cur:
            with cur.copy(self._copy_sql) as copy:
                for block in blocks:
                    digest.update(block)
                    nbytes += len(block)
                    copy.write(block)
            rows = cur.rowcount
        return WriteStats(rows=max(rows, 0), bytes=nbytes, checksum=digest.hexdigest())

    def write_rows(self, rows: bytes) -> WriteStats:
        """COPY rows cut from a source's COPY data (binary rows get the header and trailer)."""
        if self.binary:
            return self.write([BINARY_HEADER + rows + BINARY_TRAILER])
        return self.write([rows])

    def truncate(self) -> None:
        from psycopg import sql

        self.conn.execute(sql.SQL("TRUNCATE {}").format(
            sql.Identifier(self.table.schema, self.table.name)))
