"""Keyset reads from PostgreSQL: chunk bounds on the key, then COPY of the chunk.

A chunk is ``key > last_key AND (where) ORDER BY key LIMIT n`` — never OFFSET.
The upper bound of the chunk is found first with an index-only walk of the
key; the rows are then streamed with ``COPY (SELECT … WHERE key > lo AND
key <= hi) TO STDOUT`` so the bytes reach the target without being decoded
into Python objects. Composite keys are compared as row values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..model import Column, TableName
from .copy_out import COPY_BLOCK_BYTES, CopyOut, blocks_of, rows_of

if TYPE_CHECKING:
    import polars as pl
    import psycopg
    from psycopg import sql as sqlmod

# While a statement ends, rows are read ahead; whether it has ended is asked this often.
UNTIL_EVERY_ROWS = 256

# Binary COPY framing: an 11-byte signature, 32-bit flags and a 32-bit header extension
# length before the first row; a field count of -1 after the last.
BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
BINARY_HEADER = BINARY_SIGNATURE + bytes(8)
BINARY_TRAILER = b"\xff\xff"


@dataclass(frozen=True)
class Bound:
    """The last key of a chunk: text form for queries, JSON form for the report."""

    text: tuple[str, ...]
    json: list[Any]


@dataclass(frozen=True)
class KeysetQuery:
    """The SQL of one table's keyset walk, built once and reused for every chunk."""

    table: TableName
    columns: tuple[Column, ...]
    key: tuple[Column, ...]
    where: str | None = None
    source_sql: str | None = None  # --query: walk this query's result instead of the table

    # -- SQL pieces ----------------------------------------------------------
    def _ident(self) -> sqlmod.Composable:
        """What the rows come from: the table, or ``(query) AS q``."""
        from psycopg import sql

        if self.source_sql is not None:
            # operator-supplied SQL (documented as trusted), % doubled as in --where
            return sql.SQL("({}) AS q").format(sql.SQL(self.source_sql.replace("%", "%%")))  # type: ignore[arg-type]
        return sql.Identifier(self.table.schema, self.table.name)

    def _key_row(self) -> sqlmod.Composed:
        from psycopg import sql

        return sql.SQL("({})").format(sql.SQL(", ").join(sql.Identifier(k.name) for k in self.key))

    def _params_row(self, prefix: str) -> sqlmod.Composed:
        from psycopg import sql

        return sql.SQL("({})").format(sql.SQL(", ").join(
            sql.SQL("{}::{}").format(sql.Placeholder(f"{prefix}{i}"), sql.SQL(k.type_sql))
            for i, k in enumerate(self.key)))

    def _filter(self, lower: bool, upper: bool) -> sqlmod.Composed:
        from psycopg import sql

        conds: list[sqlmod.Composed] = []
        if lower:
            conds.append(sql.SQL("{} > {}").format(self._key_row(), self._params_row("lo")))
        if upper:
            conds.append(sql.SQL("{} <= {}").format(self._key_row(), self._params_row("hi")))
        if self.where:
            # operator-supplied SQL (documented as trusted); parenthesised so OR cannot leak,
            # and its % signs doubled: these statements also carry %(name)s parameters
            conds.append(sql.SQL("({})").format(sql.SQL(self.where.replace("%", "%%"))))  # type: ignore[arg-type]
        if not conds:
            return sql.Composed([])
        return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds)

    def bound_sql(self, has_lower: bool) -> sqlmod.Composed:
        """The last key among the next ``limit`` keys after the lower bound.

        The text and JSON forms are computed for that one key only, outside both
        LIMITs; the inner walk reads nothing but the key index.
        """
        from psycopg import sql

        keys = sql.SQL(", ").join(sql.Identifier(k.name) for k in self.key)
        # qualified with their subquery's alias, so ORDER BY cannot bind to an output column
        chunk = [sql.Identifier("chunk", k.name) for k in self.key]
        last = [sql.Identifier("last", k.name) for k in self.key]
        return sql.SQL(
            "SELECT {as_text}, jsonb_build_array({last}) FROM ("
            "SELECT {chunk} FROM (SELECT {keys} FROM {table}{filter} ORDER BY {keys} "
            "LIMIT %(limit)s) AS chunk ORDER BY {desc} LIMIT 1) AS last"
        ).format(
            as_text=sql.SQL(", ").join(sql.SQL("{}::text").format(k) for k in last),
            last=sql.SQL(", ").join(last), chunk=sql.SQL(", ").join(chunk), keys=keys,
            table=self._ident(), filter=self._filter(has_lower, False),
            desc=sql.SQL(", ").join(sql.SQL("{} DESC").format(k) for k in chunk))

    def select_sql(self, has_lower: bool, has_upper: bool = True) -> sqlmod.Composed:
        from psycopg import sql

        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in self.columns)
        return sql.SQL("SELECT {} FROM {}{}").format(cols, self._ident(),
                                                     self._filter(has_lower, has_upper))

    def select_frame_sql(self, has_lower: bool) -> sqlmod.Composed:
        """The chunk's rows in key order for a DataFrame: types polars holds exactly are
        selected as they are, every other type as its text form (the target parses it back)."""
        from psycopg import sql

        cols = sql.SQL(", ").join(
            sql.Identifier(c.name) if frame_type(c.type_sql) is not None
            else sql.SQL("{0}::text AS {0}").format(sql.Identifier(c.name))
            for c in self.columns)
        keys = sql.SQL(", ").join(sql.Identifier(k.name) for k in self.key)
        return sql.SQL("SELECT {} FROM {}{} ORDER BY {}").format(
            cols, self._ident(), self._filter(has_lower, True), keys)

    def copy_out_sql(self, has_lower: bool, binary: bool, ordered: bool = False) -> sqlmod.Composed:
        """COPY of one chunk; ``ordered`` sends its rows in key order (so that the n-th
        row of the stream is the n-th key of the chunk)."""
        from psycopg import sql

        fmt = sql.SQL("binary" if binary else "text")
        select = self.select_sql(has_lower)
        if ordered:
            select += sql.SQL(" ORDER BY {}").format(
                sql.SQL(", ").join(sql.Identifier(k.name) for k in self.key))
        return sql.SQL("COPY ({}) TO STDOUT (FORMAT {})").format(select, fmt)

    def delete_range_sql(self, has_lower: bool) -> sqlmod.Composed:
        """DELETE the rows of one chunk's key range (ignores --where: the range is what was written)."""
        from psycopg import sql

        bare = KeysetQuery(self.table, self.columns, self.key)
        return sql.SQL("DELETE FROM {}{}").format(self._ident(), bare._filter(has_lower, True))

    def update_sql(self, set_sql: str, has_lower: bool) -> sqlmod.Composed:
        """UPDATE the rows of one chunk's key range that --where selects (etl backfill);
        ``set_sql`` is trusted operator input, its % doubled like --where's."""
        from psycopg import sql

        return sql.SQL("UPDATE {} SET {}{}").format(
            self._ident(), sql.SQL(set_sql.replace("%", "%%")),  # type: ignore[arg-type]
            self._filter(has_lower, True))

    def count_range_sql(self, has_lower: bool) -> sqlmod.Composed:
        """Rows of the key range ``(lo, hi]`` that the copy takes (--where applied)."""
        from psycopg import sql

        return sql.SQL("SELECT count(*) FROM {}{}").format(self._ident(),
                                                           self._filter(has_lower, True))

    def rows_as_json_sql(self, has_lower: bool) -> sqlmod.Composed:
        """Each row of ``(lo, hi]`` as JSON (all its columns, original values) with its key."""
        from psycopg import sql

        keys = sql.SQL(", ").join(sql.Identifier("t", k.name) for k in self.key)
        return sql.SQL("SELECT to_jsonb(t), jsonb_build_array({}) FROM (SELECT * FROM {}{}) AS t"
                       ).format(keys, self._ident(), self._filter(has_lower, True))

    def remaining_sql(self, has_lower: bool) -> sqlmod.Composed:
        """Rows still to copy after the lower bound (for counts and estimates)."""
        from psycopg import sql

        return sql.SQL("SELECT 1 FROM {}{}").format(self._ident(), self._filter(has_lower, False))

    def delete_sql(self, has_lower: bool, returning: bool = False) -> sqlmod.Composed:
        """DELETE the rows of one chunk's key range that --where selects (etl archive);
        ``returning`` gives back the deleted rows' columns, for ``COPY (…) TO STDOUT`` or a
        ``WITH moved AS (…)`` that inserts them elsewhere in the same statement."""
        from psycopg import sql

        stmt = sql.SQL("DELETE FROM {}{}").format(self._ident(), self._filter(has_lower, True))
        if returning:
            stmt += sql.SQL(" RETURNING {}").format(
                sql.SQL(", ").join(sql.Identifier(c.name) for c in self.columns))
        return stmt

    def params(self, lower: tuple[str, ...] | None, upper: tuple[str, ...] | None = None,
               limit: int | None = None) -> dict[str, Any]:
        p: dict[str, Any] = {}
        for i, value in enumerate(lower or ()):
            p[f"lo{i}"] = value
        for i, value in enumerate(upper or ()):
            p[f"hi{i}"] = value
        if limit is not None:
            p["limit"] = limit
        return p


class PgKeysetSource:
    """Reads one table chunk by chunk on its own connection (read-only, repeatable read)."""

    def __init__(self, conn: psycopg.Connection, query: KeysetQuery, *, binary: bool = True,
                 ordered: bool = False) -> None:
        import psycopg as pg

        self.conn = conn
        self.query = query
        self.binary = binary
        self.ordered = ordered  # chunks streamed in key order (else in the scan's order)
        self._oids: list[int] | None = None
        conn.isolation_level = pg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True

    def next_bound(self, after: tuple[str, ...] | None, limit: int) -> Bound | None:
        """The last key of the next chunk of at most ``limit`` rows, or None at the end."""
        row = self.conn.execute(self.query.bound_sql(after is not None),
                                self.query.params(after, limit=limit)).fetchone()
        if row is None:
            return None
        return Bound(tuple(row[:-1]), list(row[-1]))

    def copy_out(self, after: tuple[str, ...] | None, upto: Bound) -> Iterator[bytes]:
        """The chunk's rows as COPY data, in blocks of about ``COPY_BLOCK_BYTES``."""
        return blocks_of(self.conn,
                         self.query.copy_out_sql(after is not None, self.binary, ordered=self.ordered),
                         self.query.params(after, upto.text))

    @contextmanager
    def row_stream(self, after: tuple[str, ...] | None, upto: Bound) -> Iterator[RowStream]:
        """The chunk's rows (in key order if ``ordered``), to be written in pieces (RowStream)."""
        with self._rows(after, upto) as out:
            yield RowStream(out, self.binary)

    def _rows(self, after: tuple[str, ...] | None, upto: Bound) -> AbstractContextManager[CopyOut]:
        return rows_of(self.conn,
                       self.query.copy_out_sql(after is not None, self.binary, ordered=self.ordered),
                       self.query.params(after, upto.text))

    def fetch_frame(self, after: Bound | None, upto: Bound) -> pl.DataFrame:
        """The chunk ``(after, upto]`` as a DataFrame (decoded: for transforms)."""
        import polars as pl

        lower = after.text if after else None
        cur = self.conn.execute(self.query.select_frame_sql(after is not None),
                                self.query.params(lower, upto.text))
        schema = {c.name: frame_type(c.type_sql) or pl.String() for c in self.query.columns}
        return pl.DataFrame(cur.fetchall(), schema=schema, orient="row")

    def rows_by_key(self, keys: list[tuple[Any, ...]]) -> list[dict | None]:
        """The source row (as JSON) of each key, in the order given; None where there is none.

        For dead letters of transformed rows, which are known by key, not by position.
        """
        from psycopg import sql

        if not keys:
            return []
        q = self.query
        names = [sql.Identifier(f"k{i}") for i in range(len(q.key))]
        values = sql.SQL(", ").join(
            sql.SQL("({}, {})").format(sql.Literal(n), sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Literal(str(v)), sql.SQL(k.type_sql))  # type: ignore[arg-type]
                for v, k in zip(kv, q.key, strict=True)))
            for n, kv in enumerate(keys))
        stmt = sql.SQL("SELECT v.n, to_jsonb(t) FROM (VALUES {}) AS v(n, {}) "
                       "JOIN (SELECT * FROM {}) AS t ON ({}) = ({})").format(
            values, sql.SQL(", ").join(names), q._ident(),
            sql.SQL(", ").join(sql.Identifier("t", k.name) for k in q.key),
            sql.SQL(", ").join(sql.SQL("v.{}").format(n) for n in names))
        found: list[dict | None] = [None] * len(keys)
        for n, row in self.conn.execute(stmt):
            found[n] = row
        return found

    def keys_of_rows(self, rows: list[bytes]) -> list[tuple[str, ...]]:
        """The key (text form of each key column) of each COPY row given, read from the row's
        own bytes; binary values are turned into text by the source server."""
        from ..copy_rows import binary_fields, text_fields

        names = [c.name for c in self.query.columns]
        wanted = [names.index(k.name) for k in self.query.key]
        if not self.binary:
            return [tuple(v or "" for v in text_fields(row, wanted)) for row in rows]
        oids = self._key_oids()
        select = ("SELECT " + ", ".join(f"${i + 1}::text" for i in range(len(oids)))).encode()
        out = []
        for row in rows:
            values = binary_fields(row, wanted)
            result = self.conn.pgconn.exec_params(select, values, oids, [1] * len(oids))
            if result.status != 2:  # TUPLES_OK
                message = (result.error_message or b"").decode(errors="replace").strip()
                raise RuntimeError(f"could not read the key of a refused row: {message}")
            out.append(tuple((result.get_value(0, i) or b"").decode() for i in range(len(oids))))
        return out

    def _key_oids(self) -> list[int]:
        if self._oids is None:
            self._oids = [int(self.conn.execute("SELECT %s::regtype::oid", (k.type_sql,)
                                                ).fetchone()[0])  # type: ignore[index]
                          for k in self.query.key]
        return self._oids

    def count_range(self, after: Bound | None, upto: Bound) -> int:
        lower = after.text if after else None
        row = self.conn.execute(self.query.count_range_sql(after is not None),
                                self.query.params(lower, upto.text)).fetchone()
        return int(row[0]) if row else 0

    def rows_as_json(self, after: Bound | None, upto: Bound) -> list[tuple[dict, list]]:
        lower = after.text if after else None
        return [(row[0], row[1]) for row in self.conn.execute(
            self.query.rows_as_json_sql(after is not None), self.query.params(lower, upto.text))]


class RowStream:
    """One chunk's COPY data cut into pieces of whole rows, each a complete COPY stream.

    The server sends each row in a message of its own, so rows are cut for free: the
    writer can end a COPY statement after any row, and keeps the piece's rows (their bytes
    and where each ends) to write parts of it again.
    """

    def __init__(self, out: CopyOut, binary: bool) -> None:
        self._out = out
        self.binary = binary
        self.done = False
        self._header = binary  # the binary header arrives before (or with) the first row

    def fill(self, kept: Piece, size: int, until: Callable[[], bool]) -> None:
        """Read rows into ``kept`` (nothing is written) until it holds ``size`` rows, the
        chunk ends, or ``until()`` is true (asked every ``UNTIL_EVERY_ROWS`` rows)."""
        if not self._start(kept, size):
            return
        data, binary, end = kept.data, self.binary, kept.ends.append
        get, more = self._out.get, self._out.more
        n, countdown = len(kept), UNTIL_EVERY_ROWS
        while n < size:
            nbytes, row = get(1)
            if nbytes <= 0 and not (row := more(nbytes)):
                self.done = True
                break
            if binary and len(row) == 2:  # the trailer: no binary row is this short
                continue
            data += row
            n += 1
            end(len(data))
            countdown -= 1
            if not countdown:
                countdown = UNTIL_EVERY_ROWS
                if until():
                    break

    def stream(self, kept: Piece, size: int, write: Callable[[Any], None]) -> None:
        """``write`` the rows ``kept`` holds, then read more into it up to ``size`` rows,
        writing them in blocks of about ``COPY_BLOCK_BYTES``: one whole COPY stream."""
        if self.binary:
            write(BINARY_HEADER)
        if kept.data:
            write(bytes(kept.data))
        sent = len(kept.data)
        if self._start(kept, size):
            data, binary, end = kept.data, self.binary, kept.ends.append
            get, more = self._out.get, self._out.more
            n, block_end = len(kept), sent + COPY_BLOCK_BYTES
            while n < size:
                nbytes, row = get(1)
                if nbytes <= 0 and not (row := more(nbytes)):
                    self.done = True
                    break
                if binary and len(row) == 2:  # the trailer: no binary row is this short
                    continue
                data += row
                n += 1
                at = len(data)
                end(at)
                if at >= block_end:
                    write(data[sent:])
                    sent, block_end = at, at + COPY_BLOCK_BYTES
        tail = kept.data[sent:]
        if self.binary:
            tail += BINARY_TRAILER
        write(tail)

    def _start(self, kept: Piece, size: int) -> bool:
        """False when there is nothing to read (the chunk ended, or the piece is full)."""
        if self.done or len(kept) >= size:
            return False
        if self._header:
            self._skip_header(kept)
        return not self.done

    def _skip_header(self, kept: Piece) -> None:
        self._header = False
        first = self._out.read()
        if not first:
            self.done = True
            return
        row = bytes(first)[len(BINARY_SIGNATURE) + 8 + int.from_bytes(first[15:19], "big"):]
        if row and row != BINARY_TRAILER:
            kept.data += row
            kept.ends.append(len(kept.data))


@dataclass
class Piece:
    """Rows cut from a COPY stream: their bytes back to back, and where each one ends."""

    data: bytearray = field(default_factory=bytearray)
    ends: list[int] = field(default_factory=list)  # a list: array.append parses its argument

    def __len__(self) -> int:
        return len(self.ends)

    def rows(self, a: int, b: int) -> bytes:
        """Rows ``a`` to ``b`` (0-based, ``b`` excluded) as one run of COPY row data."""
        start = self.ends[a - 1] if a > 0 else 0
        return bytes(self.data[start:self.ends[b - 1]]) if b > a else b""

    def without(self, i: int) -> Piece:
        """These rows but row ``i`` (0-based), in order."""
        out = Piece()
        out.data += self.rows(0, i)
        out.ends.extend(self.ends[:i])
        return out.followed_by(Piece(bytearray(self.rows(i + 1, len(self))),
                                     [e - self.ends[i] for e in self.ends[i + 1:]]))

    def followed_by(self, other: Piece) -> Piece:
        """These rows, then ``other``'s."""
        shift = len(self.data)
        self.data += other.data
        self.ends.extend(e + shift for e in other.ends)
        return self


_FRAME_TYPES = {
    "smallint": "Int16", "integer": "Int32", "bigint": "Int64", "real": "Float32",
    "double precision": "Float64", "boolean": "Boolean", "text": "String",
    "character varying": "String", "character": "String", "date": "Date",
    "timestamp without time zone": "Datetime", "timestamp with time zone": "DatetimeUTC",
    "time without time zone": "Time",
}
_TYPMOD = re.compile(r"\(([^)]*)\)")


def frame_type(type_sql: str) -> Any:
    """The polars type that holds a PostgreSQL type exactly, or None (then it travels as text)."""
    import polars as pl

    base = _TYPMOD.sub("", type_sql).strip()
    if base == "numeric":
        mod = _TYPMOD.search(type_sql)
        if mod:
            p, _, s = mod.group(1).partition(",")
            if int(p) <= 38:
                return pl.Decimal(int(p), int(s or 0))
        return None  # unconstrained or wider than polars' decimal: exact as text
    name = _FRAME_TYPES.get(base)
    if name is None:
        return None
    if name == "DatetimeUTC":
        return pl.Datetime("us", "UTC")
    if name == "Datetime":
        return pl.Datetime("us")
    return getattr(pl, name)()
