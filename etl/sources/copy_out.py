"""Rows of one ``COPY … TO STDOUT``, taken from libpq's buffer without psycopg's per-row cost.

psycopg's ``Copy.read()`` returns one row per call through a chain of generators and
its wait loop: about 1 µs of CPU a row, as much as the rest of a PostgreSQL →
PostgreSQL copy's client work, on a machine whose cores the two servers need too.
One network read brings libpq dozens of rows, so the hot loops take them straight from
libpq's buffer (``PQgetCopyData`` without blocking, ``get``), and only when it is empty
hand over to psycopg (``more``), which waits for the socket the way it always does
(interruptible, with the GIL released) and handles the end of the COPY.

Use::

    with rows_of(conn, statement, params) as out:
        get, more = out.get, out.more
        while True:
            nbytes, row = get(1)
            if nbytes <= 0 and not (row := more(nbytes)):
                break          # the COPY ended (its result checked)
            ...
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

# Rows are handed to the target in blocks of about this size (fewer, larger writes).
COPY_BLOCK_BYTES = 256 * 1024


class CopyOut:
    """One open COPY TO: ``get(1)`` the next buffered row, else ``more(nbytes)``."""

    def __init__(self, conn: psycopg.Connection, cursor: psycopg.Cursor, copy: psycopg.Copy) -> None:
        self._conn = conn
        self._cursor = cursor
        self._copy = copy
        self._rows: int | None = None
        self._pgconn = conn.pgconn
        self.get = conn.pgconn.get_copy_data
        self.ended = False

    def more(self, nbytes: int) -> Any:
        """The next row after ``get(1)`` returned ``nbytes`` <= 0; empty once the COPY ended.

        0: nothing buffered, so psycopg waits for the next row (or the end). -1: the end,
        which libpq has just handed to us, not to psycopg: its result is fetched here, and
        an error the server ended the COPY with is raised as psycopg would raise it.
        -2 (a broken connection): psycopg reads again, and raises the error."""
        if self.ended:
            return b""
        if nbytes != -1:
            row = self._copy.read()
            self.ended = not row
            return row
        from psycopg import errors, generators, pq

        self.ended = True
        results = self._conn.wait(generators.fetch_many(self._pgconn))
        for result in results:
            if result.status != pq.ExecStatus.COMMAND_OK:
                raise errors.error_from_result(result, encoding=self._conn.info.encoding)
            self._rows = result.command_tuples
        return b""

    @property
    def rowcount(self) -> int:
        """Rows the server says it sent ("COPY n"), once the COPY ended; else -1."""
        return self._rows if self._rows is not None else self._cursor.rowcount

    def read(self) -> Any:
        """The next row (empty at the end) — one call a row: for loops that are not hot."""
        nbytes, row = self.get(1)
        return row if nbytes > 0 else self.more(nbytes)


@contextmanager
def rows_of(conn: psycopg.Connection, statement: Any, params: Any = None) -> Iterator[CopyOut]:
    """Run ``statement`` (a COPY … TO STDOUT) and yield its reader."""
    with conn.cursor() as cur, cur.copy(statement, params) as copy:
        yield CopyOut(conn, cur, copy)


def blocks_of(conn: psycopg.Connection, statement: Any, params: Any = None) -> Iterator[bytes]:
    """The COPY data of ``statement`` in blocks of about ``COPY_BLOCK_BYTES``: the server
    sends one message per row; gathered into blocks, the writer's per-call cost (and
    the checksum's) is per block, not per row."""
    with rows_of(conn, statement, params) as out:
        yield from _gathered(out)


def copy_to(conn: psycopg.Connection, statement: Any, params: Any, write: Any) -> int:
    """Send the COPY data of ``statement`` to ``write(block)`` in blocks of about
    ``COPY_BLOCK_BYTES``; the rows the server sent ("COPY n")."""
    with rows_of(conn, statement, params) as out:
        for block in _gathered(out):
            write(block)
    return out.rowcount


def _gathered(out: CopyOut) -> Iterator[bytes]:
    buf = bytearray()
    get, more = out.get, out.more
    while True:
        nbytes, row = get(1)
        if nbytes <= 0 and not (row := more(nbytes)):
            break
        buf += row
        if len(buf) >= COPY_BLOCK_BYTES:
            yield bytes(buf)
            buf.clear()
    if buf:
        yield bytes(buf)
