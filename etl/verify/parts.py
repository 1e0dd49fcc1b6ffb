"""The tables ``etl verify`` compares, each read one key range at a time.

A side of the comparison is one table (the source) or the union of several (the target:
a live table and its archive, in one database or two). Each table is a ``Part`` that
answers, for a key range ``after < key <= upto`` (either end open):

- ``digest``: its row count and checksum there, and whether it holds more than ``cap``
  rows (the range is then narrowed at ``bound``, so no range outgrows a chunk anywhere);
- ``keyed``: each row's key identity, its key as JSON for the report, and its hash;
- ``details``: the columns' texts of a few rows, to say which columns differ.

``DatabasePart`` (PostgreSQL, ``--method database``) has the database do the work: the
count and the sum of the first 64 bits of each row's md5 (of ``ROW(columns)::text`` in the
exact text settings every connection gets), so only two numbers a range cross the
network, and only the key and md5 of each row of a range that differs.
``ValuesPart`` (any database, ``--method values``) reads the rows as ``etl copy`` reads
them and hashes their canonical values (``etl.verify.canonical``) in Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import pg
from ..sinks.files import COPY_SETTINGS
from ..sources.pg import KeysetQuery, PgKeysetSource
from . import canonical

if TYPE_CHECKING:
    import psycopg
    from sqlalchemy.engine import Connection

    from ..export.sql_source import SqlSource
    from ..model import Checkpoint, Column
    from ..portable import PortableColumn, TableSchema
    from ..sources.sqla import SqlaKeysetSource
    from ..urls import DbUrl

# A key the range functions take: text forms (DatabasePart) or the database's own values.
Key = tuple[Any, ...]


@dataclass(frozen=True)
class Digest:
    """A part's rows in one range: how many (at most cap + 1 are looked at) and their sum."""

    rows: int
    checksum: int
    over: bool  # more than ``cap`` rows: narrow the range


@dataclass(frozen=True)
class RangeEnd:
    """The last key of a range: as the parts take it, as JSON and as text (the
    checkpoint's ``last_key_json`` and ``last_key``)."""

    key: Key
    json: list[Any]
    text: tuple[str, ...]


@dataclass(frozen=True)
class Keyed:
    """One row of a range that differs: its key's identity, its key for the report, its hash."""

    identity: str
    key_json: list[Any]
    hash: int | str


class DatabasePart:
    """A PostgreSQL table whose counts and md5 sums PostgreSQL computes."""

    def __init__(self, url: DbUrl, query: KeysetQuery, role: str, label: str) -> None:
        self.url, self.query, self.role, self.label = url, query, role, label
        self.columns = [c.name for c in query.columns]
        self._connect(reconnect=False)

    def _connect(self, reconnect: bool) -> None:
        self.conn: psycopg.Connection = pg.connect(self.url, self.role, reconnect=reconnect,
                                                   settings=dict(COPY_SETTINGS))
        self.source = PgKeysetSource(self.conn, self.query, binary=False)

    def ensure_connected(self) -> None:
        if not pg.is_usable(self.conn):
            self._connect(reconnect=True)

    def close(self) -> None:
        self.conn.close()

    # -- SQL -------------------------------------------------------------------------------
    def _sql(self, select: str, after: Key | None, upto: Key | None, tail: str = "") -> Any:
        from psycopg import sql

        q = self.query
        return sql.SQL("SELECT " + select + " FROM {source}{filter}" + tail).format(
            row=self._row(), keys=sql.SQL(", ").join(sql.Identifier(k.name) for k in q.key),
            texts=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c))
                                     for c in self.columns),
            source=q._ident(), filter=q._filter(after is not None, upto is not None))

    def _row(self) -> Any:
        from psycopg import sql

        return sql.SQL("ROW({})").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in self.columns))

    def _run(self, stmt: Any, after: Key | None, upto: Key | None, **extra: Any) -> list[Any]:
        rows = self.conn.execute(stmt, {**self.query.params(after, upto), **extra}).fetchall()
        self.conn.rollback()  # each statement its own snapshot; no transaction left open
        return rows

    # -- the range -------------------------------------------------------------------------
    def first_bound(self, after: Key | None, size: int) -> RangeEnd | None:
        """The last key of the next ``size`` rows (None: no row is left)."""
        bound = self.source.next_bound(after, size)
        self.conn.rollback()
        return RangeEnd(bound.text, bound.json, bound.text) if bound is not None else None

    def bound(self, after: Key | None, size: int) -> RangeEnd:
        found = self.first_bound(after, size)
        assert found is not None, "a part over its cap has rows to bound"
        return found

    def resume_key(self, cp: Checkpoint) -> Key | None:
        return tuple(cp.last_key) if cp.last_key is not None else None

    def digest(self, after: Key | None, upto: Key | None, cap: int, *,
               reuse: bool = False) -> Digest:
        """The range's count and md5 sum (``reuse`` is ValuesPart's: nothing is kept here)."""
        (n, total), = self._run(self._digest_sql(after, upto), after, upto, cap=cap + 1)
        return Digest(int(n), int(total), int(n) > cap)

    def _digest_sql(self, after: Key | None, upto: Key | None) -> Any:
        from psycopg import sql

        q = self.query
        inner = sql.SQL("SELECT {} FROM {}{} LIMIT %(cap)s").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in self.columns), q._ident(),
            q._filter(after is not None, upto is not None))
        return sql.SQL(
            "SELECT count(*), coalesce(sum(('x' || left(md5({}::text), 16))::bit(64)::bigint), "
            "0)::text FROM ({}) AS r").format(
            sql.SQL("ROW({})").format(sql.SQL(", ").join(
                sql.Identifier("r", c) for c in self.columns)), inner)

    def keyed(self, after: Key | None, upto: Key | None) -> list[Keyed]:
        stmt = self._sql("jsonb_build_array({keys})::text, md5({row}::text)", after, upto)
        return [Keyed(ident, json.loads(ident), digest)
                for ident, digest in self._run(stmt, after, upto)]

    def details(self, after: Key | None, upto: Key | None,
                identities: list[str]) -> dict[str, list[str]]:
        stmt = self._sql("jsonb_build_array({keys})::text, {texts}", after, upto,
                         tail=" AND jsonb_build_array({keys})::text = ANY(%(ids)s)"
                         if after is not None or upto is not None or self.query.where
                         else " WHERE jsonb_build_array({keys})::text = ANY(%(ids)s)")
        return {r[0]: [canonical.NULL if v is None else v for v in r[1:]]
                for r in self._run(stmt, after, upto, ids=identities)}


class ValuesPart:
    """A table of any database, read as Python values and hashed canonically."""

    def __init__(self, db: SqlSource, table: TableSchema, columns: list[str], key: list[str],
                 where: str | None, label: str) -> None:
        self.db, self.table, self.label = db, table, label
        self.columns, self.key, self.where = columns, key, where
        self.canons = [canonical.canon_for(table.column(c)) for c in columns]
        self._key_at = [columns.index(k) for k in key]
        self._rows: list[tuple[Any, ...]] = []
        self._hashes: list[int] = []
        self._conn: Connection | None = None
        self._reader: SqlaKeysetSource | None = None

    @property
    def reader(self) -> SqlaKeysetSource:
        if self._reader is None:
            from ..sources.sqla import SqlaKeysetSource

            self._conn = self.db.connect(reconnect=True)
            self._reader = SqlaKeysetSource(self._conn, self.table, key=self.key,
                                            columns=self.columns, where=self.where)
        return self._reader

    @property
    def key_columns(self) -> list[PortableColumn]:
        return [self.table.column(k) for k in self.key]

    def ensure_connected(self) -> None:
        if self._conn is not None and self._conn.invalidated:
            self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._reader = None

    def _read(self, after: Key | None, upto: Key | None, limit: int) -> list[tuple[Any, ...]]:
        reader = self.reader
        try:
            return reader.read_range(after, upto, limit)
        finally:
            assert self._conn is not None
            self._conn.rollback()  # each read its own snapshot; no transaction left open

    def first_bound(self, after: Key | None, size: int) -> RangeEnd | None:
        """The last key of the next ``size`` rows (None: no row is left); those rows are
        kept: they are the range's, unless it is narrowed."""
        rows = self._read(after, None, size)
        self._remember(rows)
        if not rows:
            return None
        return self._end(rows[-1])

    def bound(self, after: Key | None, size: int) -> RangeEnd:
        """The ``size``-th key after ``after`` among the rows the last digest read."""
        return self._end(self._rows[size - 1])

    def _end(self, row: tuple[Any, ...]) -> RangeEnd:
        key = self.reader.key_of(row)
        as_json = self._key_json(key)
        return RangeEnd(key, as_json, tuple("" if v is None else str(v) for v in as_json))

    def resume_key(self, cp: Checkpoint) -> Key | None:
        from ..sql_copy_io import key_from_json

        if cp.last_key is None:
            return None
        return key_from_json(cp.last_key_json, self.key_columns, self.reader.family)

    @staticmethod
    def _key_json(key: Key) -> list[Any]:
        from ..sql_copy_io import key_to_json

        return key_to_json(key)

    def _remember(self, rows: list[tuple[Any, ...]]) -> None:
        """The range's rows and their hashes (keys and JSON only when it is drilled into)."""
        self._rows = rows
        canons, row_hash = self.canons, canonical.row_hash
        self._hashes = [row_hash([c(v) for c, v in zip(canons, row, strict=True)])
                        for row in rows]

    def digest(self, after: Key | None, upto: Key | None, cap: int, *,
               reuse: bool = False) -> Digest:
        """``reuse``: the rows ``first_bound`` just read are this range's."""
        if not reuse:
            self._remember(self._read(after, upto, cap + 1))
        total = sum(self._hashes) % canonical.HASH_MODULUS
        return Digest(len(self._rows), total, len(self._rows) > cap)

    def keyed(self, after: Key | None, upto: Key | None) -> list[Keyed]:
        out = []
        for row, h in zip(self._rows, self._hashes, strict=True):
            key = self.reader.key_of(row)
            out.append(Keyed(self._identity(row), self._key_json(key), h))
        return out

    def _identity(self, row: tuple[Any, ...]) -> str:
        return canonical.key_text([self.canons[i](row[i]) for i in self._key_at])

    def details(self, after: Key | None, upto: Key | None,
                identities: list[str]) -> dict[str, list[str]]:
        wanted = set(identities)
        out = {}
        for row in self._rows:
            ident = self._identity(row)
            if ident in wanted:
                out[ident] = canonical.row_texts(row, self.canons)
        return out


class MysqlDatabasePart(ValuesPart):
    """A MySQL/MariaDB table whose counts and md5 sums MySQL computes (pt-table-checksum's
    way): the first 64 bits of ``MD5(CONCAT_WS(sep, columns…, NULL markers))`` summed as
    DECIMAL, in a UTC session. Keys, bounds and the differing rows' details as ValuesPart."""

    SEPARATOR = "\x1f"

    def _select(self, exprs: list[Any], after: Key | None, upto: Key | None) -> Any:
        import sqlalchemy as sa

        reader = self.reader
        return sa.select(*exprs).select_from(reader.source_table).where(
            *reader.range_where(after is not None, upto is not None))

    def _md5(self, cols: list[Any]) -> Any:
        """md5 of the row's bytes: each value's text as bytes (columns of different
        collations cannot be concatenated as text), a NULL marker for each."""
        import sqlalchemy as sa

        nulls = sa.func.concat(*(sa.func.isnull(c) for c in cols))
        return sa.func.md5(sa.func.concat_ws(
            sa.cast(sa.literal(self.SEPARATOR), sa.LargeBinary),
            *(sa.cast(c, sa.LargeBinary) for c in cols), sa.cast(nulls, sa.LargeBinary)))

    def _run(self, stmt: Any, after: Key | None, upto: Key | None) -> list[Any]:
        reader = self.reader
        try:
            assert self._conn is not None
            return list(self._conn.execute(stmt, reader.range_params(after, upto)))
        finally:
            self.end_read()

    def end_read(self) -> None:
        if self._conn is not None and not self._conn.invalidated:
            self._conn.rollback()

    def first_bound(self, after: Key | None, size: int) -> RangeEnd | None:
        reader = self.reader
        t = reader.source_table
        keys = [t.c[k] for k in self.key]
        inner = self._select(keys, after, None).order_by(*keys).limit(size).subquery()
        stmt = sa_select_last(inner, self.key)
        rows = self._run(stmt, after, None)
        return self._end_of_key(tuple(rows[0])) if rows else None

    def bound(self, after: Key | None, size: int) -> RangeEnd:
        found = self.first_bound(after, size)
        assert found is not None, "a part over its cap has rows to bound"
        return found

    def _end_of_key(self, key: tuple[Any, ...]) -> RangeEnd:
        as_json = self._key_json(key)
        return RangeEnd(key, as_json, tuple("" if v is None else str(v) for v in as_json))

    def digest(self, after: Key | None, upto: Key | None, cap: int, *,
               reuse: bool = False) -> Digest:
        import sqlalchemy as sa

        t = self.reader.source_table
        inner = self._select([t.c[c] for c in self.columns], after, upto).limit(
            cap + 1).subquery()
        first64 = sa.cast(sa.func.conv(sa.func.substring(
            self._md5([inner.c[c] for c in self.columns]), 1, 16), 16, 10), sa.Numeric(20, 0))
        stmt = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(first64), 0)
                         ).select_from(inner)
        (n, total), = self._run(stmt, after, upto)
        return Digest(int(n), int(total), int(n) > cap)

    def keyed(self, after: Key | None, upto: Key | None) -> list[Keyed]:
        t = self.reader.source_table
        keys = [t.c[k] for k in self.key]
        stmt = self._select([*keys, self._md5([t.c[c] for c in self.columns])], after, upto)
        canons = [self.canons[i] for i in self._key_at]
        out = []
        self._raw_keys: dict[str, tuple[Any, ...]] = {}
        for r in self._run(stmt, after, upto):
            key = tuple(r[:-1])
            ident = canonical.key_text([c(v) for c, v in zip(canons, key, strict=True)])
            self._raw_keys[ident] = key
            out.append(Keyed(ident, self._key_json(key), r[-1]))
        return out

    def details(self, after: Key | None, upto: Key | None,
                identities: list[str]) -> dict[str, list[str]]:
        """The named rows only (by their keys, as the last ``keyed`` read them)."""
        import sqlalchemy as sa

        t = self.reader.source_table
        wanted = [self._raw_keys[i] for i in identities if i in self._raw_keys]
        if not wanted:
            return {}
        keys = sa.tuple_(*(t.c[k] for k in self.key)) if len(self.key) > 1 else t.c[self.key[0]]
        values = wanted if len(self.key) > 1 else [k[0] for k in wanted]
        stmt = self._select([t.c[c] for c in self.columns], after, upto).where(
            keys.in_(values))
        convert = self.reader.convert
        self._rows = [convert(r) for r in self._run(stmt, after, upto)]
        return super().details(after, upto, identities)


def sa_select_last(inner: Any, key: list[str]) -> Any:
    """The last row (by ``key``) of a subquery that holds one chunk's keys."""
    import sqlalchemy as sa

    cols = [inner.c[k] for k in key]
    return sa.select(*cols).order_by(*(c.desc() for c in cols)).limit(1)


def same_types(parts: list[list[Column]]) -> bool:
    """Every part's compared columns have the same PostgreSQL types (so their text forms
    can be compared as they are)."""
    first = [c.type_sql for c in parts[0]]
    return all([c.type_sql for c in cols] == first for cols in parts[1:])


__all__ = ["DatabasePart", "Digest", "Key", "Keyed", "MysqlDatabasePart", "RangeEnd",
           "ValuesPart", "same_types"]
