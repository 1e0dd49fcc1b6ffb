"""Keyset reads from MySQL/MariaDB and SQLite (and PostgreSQL) through SQLAlchemy Core.

A chunk is ``key > last_key AND (where) ORDER BY key LIMIT n`` — never OFFSET — of a
table or of a query's result (``FROM (query) AS q``).
Composite keys are compared as row values where the database optimises them
(SQLite, PostgreSQL); MySQL/MariaDB get the expanded, index-friendly form
``a >= x AND (a > x OR (a = x AND b > y))``. MySQL chunks are streamed with a
server-side cursor (pymysql's SSCursor), so the rows are held once, in the chunk.

Each chunk is a list of plain tuples in the canonical Python values listed in
``etl.dialects`` (measured on 200k rows × 5 columns from MariaDB: buffered and
streamed reads both run at ~50–60k rows/s, bound by pymysql's decoding; building
a polars DataFrame from a 50k-row chunk adds ~0.3 s, so chunks stay tuples).
Values round-trip exactly: SQLite's REAL-stored money becomes the Decimal its
declared NUMERIC(p,s) means, ISO date text becomes dates. A value that cannot be
converted is handed on unchanged, so the target refuses it and it is
dead-lettered with its original value — except MySQL's zero dates
(``0000-00-00``), which mean "no date": they become NULL and are counted.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from decimal import MAX_PREC, Context, Decimal
from typing import TYPE_CHECKING, Any

from ..dialects import (
    Family,
    Kind,
    PortableColumn,
    TableSchema,
    family,
    prepare_session,
    query_text,
)
from ..errors import NoKeyError, UsageError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.sql import Select

    from ..urls import DbUrl

log = logging.getLogger(__name__)

Converter = Callable[[Any], Any]
# A further filter of a read, built on its columns (e.g. an incremental walk's lower bound).
Condition = Callable[[Any], Any]
_DAY = dt.timedelta(days=1)
# Decimal arithmetic wide enough for any database's numeric (the default context has 28 digits).
_EXACT = Context(prec=MAX_PREC)


@dataclass(frozen=True)
class SqlChunk:
    """The rows of one chunk (column order of the source) and the key of its last row.

    ``last_key`` holds the source's own values (what the next chunk is cut after).
    """

    rows: list[tuple[Any, ...]]
    last_key: tuple[Any, ...]
    zero_dates: int = 0  # MySQL zero or invalid dates read as NULL in this chunk


class SqlaKeysetSource:
    """Reads ``table`` in key order, one chunk at a time, on the caller's connection."""

    def __init__(self, conn: Connection, table: TableSchema, *,
                 key: Sequence[str] | None = None, columns: Sequence[str] | None = None,
                 where: str | None = None, row_values: bool | None = None,
                 query: str | None = None, condition: Condition | None = None) -> None:
        """``query``: read that query's result (``table`` describes its columns) as
        ``(query) AS q``, and check as it goes that the key is unique in it (a query has no
        index that says so); ``condition``: a further filter built on the read's columns."""
        self.conn = conn
        self.table = table
        self.query = query
        self.where = where
        self.family: Family = family(conn.dialect)
        self.key = _resolve_key(table, key)
        self.columns = _resolve_columns(table, columns, self.key)
        names = [c.name for c in self.columns]
        self._key_index = [names.index(k) for k in self.key]
        self.row_values = self.family != "mysql" if row_values is None else row_values
        self.zero_dates = 0  # over the source's life
        self._zero_now = 0
        self._converters = [(i, fn) for i, c in enumerate(self.columns)
                            if (fn := self._converter(c)) is not None]
        self._first, self._next = self._statements(where, condition)
        self._ranges: dict[tuple[bool, bool], Select[Any]] = {}
        prepare_session(conn)

    # -- SQL -------------------------------------------------------------------------
    def _statements(self, where: str | None, condition: Condition | None
                    ) -> tuple[Select[Any], Select[Any]]:
        import sqlalchemy as sa

        tbl: Any
        if self.query is not None:  # operator-supplied SQL (documented as trusted)
            tbl = sa.text(query_text(self.query)).columns(
                *(sa.column(c.name) for c in self.table.columns)).subquery("q")
        else:
            tbl = sa.table(self.table.name, *(sa.column(c.name) for c in self.table.columns),
                           schema=self.table.schema)
        cols = [sa.cast(tbl.c[c.name], sa.Text).label(c.name)
                if c.read_as_text and self.family == "postgresql" else tbl.c[c.name]
                for c in self.columns]
        keys = [tbl.c[k] for k in self.key]
        filters: list[Any] = [sa.literal_column(f"({where})")] if where else []
        extra = condition(tbl.c) if condition is not None else None
        if extra is not None:
            filters.append(extra)
        base = sa.select(*cols).select_from(tbl)
        if filters:  # --where is operator-supplied SQL (documented as trusted), parenthesised
            base = base.where(*filters)
        base = base.order_by(*keys).limit(sa.bindparam("etl_limit", type_=sa.Integer))
        binds = [sa.bindparam(f"etl_k{i}", type_=sa.types.NullType())
                 for i in range(len(keys))]
        if len(keys) == 1:
            after = keys[0] > binds[0]
        elif self.row_values:
            after = sa.tuple_(*keys) > sa.tuple_(*binds)
        else:
            after = _expanded_after(keys, binds)
        self._tbl, self._after, self._filters = tbl, after, filters
        return base, base.where(after)

    def statement_sql(self, after: bool = True) -> str:
        """The SQL of a chunk's read as the driver gets it (for --dry-run)."""
        stmt = self._next if after else self._first
        return str(stmt.compile(dialect=self.conn.dialect))

    def count(self, after: tuple[Any, ...] | None = None, cap: int | None = None) -> int:
        """Rows after key ``after`` (all when None) that the walk reads, counting at most
        ``cap`` of them (a bounded, index-only count for a progress total)."""
        import sqlalchemy as sa

        conds = list(self._filters) + ([self._after] if after is not None else [])
        inner: Select[Any] = sa.select(sa.literal_column("1").label("one")).select_from(self._tbl)
        if conds:
            inner = inner.where(*conds)
        if cap is not None:
            inner = inner.limit(cap)
        stmt = sa.select(sa.func.count()).select_from(inner.subquery())
        params = {f"etl_k{i}": v for i, v in enumerate(after or ())}
        return int(self.conn.execute(stmt, params).scalar_one())

    def check_where(self, name: str, url: DbUrl) -> None:
        """Run the read once on no rows: a --where (or query) that does not run there is a
        usage error now, not a failed run."""
        import sqlalchemy as sa

        from ..sql_copy_io import describe_error

        try:
            self.count(cap=0)
        except sa.exc.DBAPIError as exc:
            what = f"--where {self.where!r} is not valid" if self.where else "cannot be read"
            raise UsageError(f"{what} on {name}: {describe_error(exc, url)}") from exc

    def count_null_keys(self) -> int:
        """Rows (--where applied) with a NULL in a nullable key column: keyset chunks can
        never reach them."""
        import sqlalchemy as sa

        nullable = [self._tbl.c[k] for k in self.key if self.table.column(k).nullable]
        if not nullable:
            return 0
        stmt = sa.select(sa.func.count()).select_from(self._tbl).where(
            sa.or_(*(c.is_(None) for c in nullable)), *self._filters)
        return int(self.conn.execute(stmt).scalar_one())

    def top(self, column: str, keys: int) -> tuple[Any, list[tuple[Any, ...]]]:
        """The largest value of ``column`` among the rows the walk reads (None when there are
        none) and the keys of up to ``keys`` rows holding exactly that value, as the source
        returns them."""
        import sqlalchemy as sa

        col = self._tbl.c[column]
        stmt = sa.select(sa.func.max(col)).select_from(self._tbl)
        if self._filters:
            stmt = stmt.where(*self._filters)
        value = self.conn.execute(stmt).scalar()
        if value is None:
            return None, []
        at = sa.select(*(self._tbl.c[k] for k in self.key)).select_from(self._tbl).where(
            *self._filters, col == sa.bindparam("etl_top", value, type_=sa.types.NullType())
        ).limit(keys)
        return value, [tuple(r) for r in self.conn.execute(at)]

    def read(self, after: tuple[Any, ...] | None, limit: int) -> SqlChunk | None:
        """The chunk of up to ``limit`` rows after key ``after`` (None: from the start)."""
        if limit < 1:
            raise UsageError(f"chunk size must be at least 1, not {limit}")
        # a query's key is the operator's word: one row more shows a key value that a chunk
        # boundary would split (rows sharing it after the boundary would be skipped)
        peek = self.query is not None
        params: dict[str, Any] = {"etl_limit": limit + 1 if peek else limit}
        if after is not None:
            if len(after) != len(self.key):
                raise UsageError(f"a key of {self.table.name} has {len(self.key)} value(s) "
                                 f"({', '.join(self.key)}), not {len(after)}")
            params.update({f"etl_k{i}": v for i, v in enumerate(after)})
        stmt = self._first if after is None else self._next
        options = {"stream_results": True} if self.family == "mysql" else {}
        result = self.conn.execute(stmt, params, execution_options=options)
        raw = result.fetchall()
        if not raw:
            return None
        if peek:
            self._check_unique(raw)
            raw = raw[:limit]
        last = raw[-1]
        last_key = tuple(last[i] for i in self._key_index)
        self._zero_now = 0
        rows = [self._convert(r) for r in raw] if self._converters else [tuple(r) for r in raw]
        if self._zero_now:
            self.zero_dates += self._zero_now
            log.warning("%s: %d zero or invalid date(s) read as NULL in the chunk ending at %r",
                        self.table.name, self._zero_now, last_key)
        return SqlChunk(rows, last_key, self._zero_now)

    def read_range(self, after: tuple[Any, ...] | None, upto: tuple[Any, ...] | None,
                   limit: int) -> list[tuple[Any, ...]]:
        """Up to ``limit`` rows (converted, in key order) with ``after < key <= upto``;
        either end open when None (``etl verify`` reads each side's rows of one range)."""
        shape = (after is not None, upto is not None)
        stmt = self._ranges.get(shape)
        if stmt is None:
            stmt = self._first if after is None else self._next
            if upto is not None:
                stmt = stmt.where(self._upto())
            self._ranges[shape] = stmt
        params = {"etl_limit": limit, **self.range_params(after, upto)}
        options = {"stream_results": True} if self.family == "mysql" else {}
        raw = self.conn.execute(stmt, params, execution_options=options).fetchall()
        return [self._convert(r) for r in raw] if self._converters else [tuple(r) for r in raw]

    def _upto(self) -> Any:
        """``key <= upto`` (binds ``etl_u0…``)."""
        import sqlalchemy as sa

        keys = [self._tbl.c[k] for k in self.key]
        binds = [sa.bindparam(f"etl_u{i}", type_=sa.types.NullType()) for i in range(len(keys))]
        if len(keys) == 1:
            return keys[0] <= binds[0]
        if self.row_values:
            return sa.tuple_(*keys) <= sa.tuple_(*binds)
        return sa.not_(_expanded_after(keys, binds))

    def range_where(self, after: bool, upto: bool) -> list[Any]:
        """The conditions of a range read (--where, ``key > after``, ``key <= upto``), for a
        statement of the caller's own columns over ``self.source_table``."""
        return [*self._filters, *([self._after] if after else []),
                *([self._upto()] if upto else [])]

    @staticmethod
    def range_params(after: tuple[Any, ...] | None, upto: tuple[Any, ...] | None
                     ) -> dict[str, Any]:
        return {**{f"etl_k{i}": v for i, v in enumerate(after or ())},
                **{f"etl_u{i}": v for i, v in enumerate(upto or ())}}

    @property
    def source_table(self) -> Any:
        """What the reads select from (the table, or the query as a subquery)."""
        return self._tbl

    def convert(self, row: Any) -> tuple[Any, ...]:
        """A row of this source's columns as the reads hand it over (canonical values)."""
        return self._convert(row) if self._converters else tuple(row)

    def key_of(self, row: Sequence[Any]) -> tuple[Any, ...]:
        """The key values of a row this source read."""
        return tuple(row[i] for i in self._key_index)

    def chunks(self, limit: int, after: tuple[Any, ...] | None = None) -> Iterator[SqlChunk]:
        """Every chunk after ``after``, in key order."""
        while (chunk := self.read(after, limit)) is not None:
            yield chunk
            after = chunk.last_key

    def _check_unique(self, raw: Sequence[Any]) -> None:
        keys = [tuple(r[i] for i in self._key_index) for r in raw]
        for a, b in zip(keys, keys[1:], strict=False):
            if a == b:
                raise UsageError(
                    f"--key {','.join(self.key)} is not unique in the --query result: several "
                    f"rows have the key ({', '.join(map(str, a))}), and keyset chunks could "
                    "split them and miss some. Choose --key column(s) whose values are "
                    "unique in the result")

    # -- values ----------------------------------------------------------------------
    def _convert(self, row: Any) -> tuple[Any, ...]:
        values = list(row)
        for i, fn in self._converters:
            if values[i] is not None:
                values[i] = fn(values[i])
        return tuple(values)

    def _converter(self, column: PortableColumn) -> Converter | None:
        kind = column.type.kind
        if self.family == "mysql":
            return self._mysql_converter(column, kind)
        if self.family == "sqlite":
            return _SQLITE_CONVERTERS.get(kind) if kind is not Kind.NUMERIC else \
                _decimal_from_sqlite(column.type.scale)
        return _PG_CONVERTERS.get(kind)

    def _mysql_converter(self, column: PortableColumn, kind: Kind) -> Converter | None:
        if kind is Kind.BOOLEAN:
            return _mysql_bool
        if kind is Kind.BIGINT and column.native.upper().startswith("BIT"):
            return _bits_to_int
        if kind is Kind.NUMERIC:
            return _to_decimal
        if kind is Kind.TIME:
            return _timedelta_to_time
        if kind in (Kind.DATE, Kind.TIMESTAMP, Kind.TIMESTAMPTZ):
            utc = kind is Kind.TIMESTAMPTZ

            def date_value(v: Any) -> Any:
                if isinstance(v, str):  # pymysql hands over dates it cannot parse as text
                    self._zero_now += 1
                    return None
                return v.replace(tzinfo=dt.UTC) if utc else v

            return date_value
        return None


def _resolve_key(table: TableSchema, key: Sequence[str] | None) -> tuple[str, ...]:
    names = [c.name for c in table.columns]
    if key:
        missing = [k for k in key if k not in names]
        if missing:
            raise UsageError(f"--key column(s) {', '.join(missing)} not found in {table.name}; "
                             f"its columns are: {', '.join(names)}")
        return tuple(key)
    if table.primary_key:
        return table.primary_key
    raise NoKeyError(
        f"table {table.name} has no primary key, so there is no column to cut chunks on. "
        "Pass --key COL[,COL…] naming unique, non-null column(s) (a unique index makes it "
        "fast), or add a primary key to the table.")


def _resolve_columns(table: TableSchema, columns: Sequence[str] | None,
                     key: tuple[str, ...]) -> tuple[PortableColumn, ...]:
    if not columns:
        return table.columns
    names = {c.name for c in table.columns}
    missing = [c for c in columns if c not in names]
    if missing:
        raise UsageError(f"--columns names {', '.join(missing)}, not found in {table.name}; "
                         f"its columns are: {', '.join(c.name for c in table.columns)}")
    absent = [k for k in key if k not in columns]
    if absent:
        raise UsageError(f"--columns must include the key column(s) {', '.join(absent)} "
                         "so the copy can resume where it stopped")
    wanted = set(columns)
    return tuple(c for c in table.columns if c.name in wanted)


def _expanded_after(keys: list[Any], binds: list[Any]) -> Any:
    """``(a, b, c) > (x, y, z)`` without row values, led by ``a >= x`` for an index range."""
    import sqlalchemy as sa

    cond = keys[-1] > binds[-1]
    for col, bind in reversed(list(zip(keys[:-1], binds[:-1], strict=True))):
        cond = sa.or_(col > bind, sa.and_(col == bind, cond))
    return sa.and_(keys[0] >= binds[0], cond)


# -- converters: driver value → canonical value ---------------------------------------------

def _lenient(fn: Converter) -> Converter:
    """``fn`` on text; the value unchanged when it does not parse (the target will say why)."""
    def convert(v: Any) -> Any:
        if not isinstance(v, str):
            return v
        try:
            return fn(v)
        except ValueError:
            return v
    return convert


def _mysql_bool(v: Any) -> Any:
    if isinstance(v, bytes):  # BIT(1)
        return v != b"\x00"
    return {0: False, 1: True}.get(v, v)  # any other TINYINT(1) value is kept for the target


def _bits_to_int(v: Any) -> Any:
    return int.from_bytes(v, "big") if isinstance(v, bytes) else v


def _to_decimal(v: Any) -> Any:
    if isinstance(v, Decimal):
        return v
    if isinstance(v, float):
        return Decimal(repr(v))
    return Decimal(v) if isinstance(v, int) else v


def _decimal_from_sqlite(scale: int | None) -> Converter:
    """SQLite stores NUMERIC(p,s) values of up to 15 digits as doubles (Chinook's money):
    the shortest text that reads back as the same double is the decimal that was meant."""
    exponent = Decimal(1).scaleb(-scale) if scale is not None else None

    def convert(v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            d = Decimal(repr(v)) if isinstance(v, float) else Decimal(v)
        elif isinstance(v, str):
            try:
                d = Decimal(v)
            except ArithmeticError:
                return v
        else:
            return v
        if exponent is not None and d.is_finite():
            fitted = d.quantize(exponent, context=_EXACT)
            return fitted if fitted == d else d
        return d
    return convert


def _timedelta_to_time(v: Any) -> Any:
    """MySQL TIME arrives as a timedelta; one outside a day (-838:59:59…) is kept as is."""
    if isinstance(v, dt.timedelta) and dt.timedelta(0) <= v < _DAY:
        return (dt.datetime.min + v).time()
    return v


def _aware_utc(v: dt.datetime) -> dt.datetime:
    return v.replace(tzinfo=dt.UTC) if v.tzinfo is None else v.astimezone(dt.UTC)


def _json_text(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


_SQLITE_CONVERTERS: dict[Kind, Converter] = {
    Kind.BOOLEAN: lambda v: {0: False, 1: True}.get(v, v) if isinstance(v, int) else v,
    Kind.DATE: _lenient(dt.date.fromisoformat),
    Kind.TIME: _lenient(dt.time.fromisoformat),
    Kind.TIMESTAMP: _lenient(dt.datetime.fromisoformat),
    Kind.TIMESTAMPTZ: _lenient(lambda v: _aware_utc(dt.datetime.fromisoformat(v))),
    Kind.JSON: _json_text,
    Kind.ARRAY: _json_text,
}
_PG_CONVERTERS: dict[Kind, Converter] = {
    Kind.TIMESTAMPTZ: lambda v: _aware_utc(v) if isinstance(v, dt.datetime) else v,
    Kind.UUID: str,
}

__all__ = ["SqlChunk", "SqlaKeysetSource"]
