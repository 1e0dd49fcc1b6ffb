"""The target side of `etl copy` across databases (``etl.sql_copy``), and its value codecs.

A *target* writes chunks of canonical rows (``etl.dialects``) in the caller's
transaction and savepoints: PostgreSQL through psycopg (text COPY; upsert/ignore
COPY into a temporary stage and merge with one ``INSERT … ON CONFLICT``), so a
checkpoint can commit in the chunk's own transaction; MySQL/MariaDB and SQLite
through SQLAlchemy and ``etl.sinks.sql.SqlSink`` (executemany).

Checkpoint keys are the source's raw key values as JSON (``key_to_json``) and
are turned back into exactly those values for the next chunk's ``key > last``
bound (``key_from_json``). Errors of any driver are named as PostgreSQL names
them (``error_name``), so dead letters read the same whatever the target.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from . import pg
from .dialects import (
    Family,
    Kind,
    PortableColumn,
    TableSchema,
    keys_in,
    qualified,
)
from .errors import EtlError, sqlstate_of
from .model import Category, Mode, TableName
from .sinks.sql import SqlSink, SqlWriteStats
from .urls import DbUrl, mask

if TYPE_CHECKING:
    import psycopg
    from sqlalchemy.engine import Connection

# Keys per DELETE statement of the replay guard (under SQLite's oldest 999-parameter limit).
KEYS_PER_DELETE = 900
# The temporary table upsert/ignore into PostgreSQL stage rows in (one per session).
STAGE_TABLE = "etl_sql_stage"

# MySQL/MariaDB error numbers and SQLite extended result names → the PostgreSQL condition
# name and SQLSTATE of the same failure.
_MYSQL_NAMES = {
    1048: ("NotNullViolation", "23502"), 1062: ("UniqueViolation", "23505"),
    1451: ("ForeignKeyViolation", "23503"), 1452: ("ForeignKeyViolation", "23503"),
    3819: ("CheckViolation", "23514"), 4025: ("CheckViolation", "23514"),
    1406: ("StringDataRightTruncation", "22001"), 1264: ("NumericValueOutOfRange", "22003"),
    1292: ("InvalidDatetimeFormat", "22007"), 1366: ("InvalidTextRepresentation", "22P02"),
    1265: ("InvalidTextRepresentation", "22P02"),
}
_SQLITE_NAMES = {
    "SQLITE_CONSTRAINT_CHECK": ("CheckViolation", "23514"),
    "SQLITE_CONSTRAINT_NOTNULL": ("NotNullViolation", "23502"),
    "SQLITE_CONSTRAINT_UNIQUE": ("UniqueViolation", "23505"),
    "SQLITE_CONSTRAINT_PRIMARYKEY": ("UniqueViolation", "23505"),
    "SQLITE_CONSTRAINT_FOREIGNKEY": ("ForeignKeyViolation", "23503"),
    "SQLITE_TOOBIG": ("StringDataRightTruncation", "22001"),
    "SQLITE_MISMATCH": ("DatatypeMismatch", "22000"),
}


# -- values ------------------------------------------------------------------------------

def jsonable(v: Any) -> Any:
    """A value as JSON can hold it exactly: Decimal, dates and times as their ISO text, bytes
    as ``\\x`` + hex (PostgreSQL's bytea text). NUL characters, which jsonb cannot store,
    are written as the six characters ``\\u0000``."""
    if v is None or isinstance(v, (bool, int)):
        return v
    if isinstance(v, str):
        return v.replace("\x00", "\\u0000") if "\x00" in v else v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return _time_text(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(v).hex()
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    return str(v)  # uuid.UUID and anything else: its text form


def _time_text(v: dt.timedelta) -> str:
    """A MySQL TIME (a timedelta, possibly outside one day) as ``[-]HH:MM:SS.ffffff``."""
    micros = v // dt.timedelta(microseconds=1)
    sign, micros = ("-", -micros) if micros < 0 else ("", micros)
    seconds, frac = divmod(micros, 1_000_000)
    return f"{sign}{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}.{frac:06d}"


def key_to_json(values: Sequence[Any]) -> list[Any]:
    """The source's raw key values, JSON-able and exact (see ``key_from_json``)."""
    return [jsonable(v) for v in values]


def key_from_json(values: Sequence[Any], columns: Sequence[PortableColumn],
                  family: Family) -> tuple[Any, ...]:
    """The raw key values ``key_to_json`` wrote, as the source compares them.

    PostgreSQL takes text forms as ``unknown`` literals and casts them to the column's
    type (exact for numeric, timestamptz, uuid …); MySQL gets Decimal, dates and
    datetimes back as objects (a DECIMAL compared with text would go through a double);
    bytes come back from their hex form everywhere; other values are JSON's own.
    """
    out: list[Any] = []
    for v, col in zip(values, columns, strict=True):
        kind = col.type.kind
        if isinstance(v, str):
            bits = family == "mysql" and col.native.upper().startswith("BIT")
            if v.startswith("\\x") and (kind is Kind.BYTES or bits):
                v = bytes.fromhex(v[2:])
            elif family == "mysql" and kind is Kind.NUMERIC:
                v = Decimal(v)
            elif family == "mysql" and kind is Kind.DATE:
                v = dt.date.fromisoformat(v)
            elif family == "mysql" and kind in (Kind.TIMESTAMP, Kind.TIMESTAMPTZ):
                v = dt.datetime.fromisoformat(v)
        out.append(v)
    return tuple(out)


def row_bytes(rows: Sequence[tuple[Any, ...]]) -> int:
    """About how many bytes ``rows`` hold (text and binary values by length, others 8),
    from an even sample of at most 256 rows: for the progress line's MB/s, not exact."""
    if not rows:
        return 0
    sample = rows[::max(1, len(rows) // 256)]
    total = sum(len(v) if isinstance(v, (str, bytes)) else 8 for row in sample for v in row)
    return total * len(rows) // len(sample)


# -- errors ------------------------------------------------------------------------------

def _driver_error(exc: BaseException) -> BaseException:
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def _mysql_errno(err: BaseException) -> int | None:
    if type(err).__module__.startswith("pymysql") and err.args and isinstance(err.args[0], int):
        return err.args[0]
    return None


class DriverError(EtlError):
    """A MySQL error put in the category its error number says.

    PyMySQL ≥ 1.2 hands over the server's SQLSTATE, which ``etl.errors.classify`` trusts
    before the error number, and MySQL gives many errors the catch-all ``HY000``: a lock
    wait timeout (1205), a read-only server (1290) or a killed connection (1927) would end
    the run instead of being retried, an invalid value (1366, 1265) would end it instead of
    being dead-lettered. ``orig`` keeps the driver's exception for naming and messages.
    """

    def __init__(self, exc: BaseException, category: Category) -> None:
        super().__init__(describe_error(exc))
        self.category = category
        self.orig = _driver_error(exc)


def recategorised(exc: BaseException) -> BaseException:
    """``exc``, or a DriverError when its MySQL error number is a known transient or data
    error that its SQLSTATE would have classified otherwise."""
    from .errors import _by_error_number, classify

    if not isinstance(exc, Exception) or isinstance(exc, EtlError):
        return exc
    by_number = _by_error_number(exc)
    if by_number in (Category.TRANSIENT, Category.DATA) and classify(exc) is not by_number:
        assert by_number is not None
        return DriverError(exc, by_number)
    return exc


@contextmanager
def recategorising(on_error: Callable[[], None] | None = None) -> Iterator[None]:
    """Raise what fails inside as ``recategorised`` says (a DriverError where MySQL's error
    number knows better than its SQLSTATE), after ``on_error()`` (e.g. "reconnect first")."""
    try:
        yield
    except BaseException as exc:
        if on_error is not None:
            on_error()
        fixed = recategorised(exc)
        if fixed is not exc:
            raise fixed from exc
        raise


def error_name(exc: BaseException) -> tuple[str, str | None]:
    """(error class, SQLSTATE) of a failure, named as PostgreSQL names it: psycopg's class
    and SQLSTATE; for MySQL/MariaDB and SQLite the PostgreSQL condition of the same failure
    (a CHECK violation is ``CheckViolation``/23514 on every target)."""
    err = _driver_error(exc)
    errno = _mysql_errno(err)
    if errno is not None:
        return _MYSQL_NAMES.get(errno, (type(err).__name__, sqlstate_of(err)))
    name = getattr(err, "sqlite_errorname", None)
    if type(err).__module__ == "sqlite3" and isinstance(name, str):
        return _SQLITE_NAMES.get(name, (type(err).__name__, None))
    return type(err).__name__, sqlstate_of(exc)


def describe_error(exc: BaseException, url: DbUrl | None = None) -> str:
    """One line: the native code and the driver's message (never SQLAlchemy's statement and
    parameters, which could hold a whole chunk), masked."""
    err = _driver_error(exc)
    errno = _mysql_errno(err)
    if errno is not None:
        text = f"[mysql {errno}] {err.args[1] if len(err.args) > 1 else ''}"
    elif type(err).__module__ == "sqlite3":
        text = f"[sqlite {getattr(err, 'sqlite_errorname', '?')}] {err}"
    elif getattr(err, "sqlstate", None):
        return pg.describe_error(err, url)
    else:
        text = str(err)
    return mask(" ".join(text.split()), url.password if url else None)


# -- targets -----------------------------------------------------------------------------

class PgTarget:
    """Writes into a PostgreSQL table through psycopg (the connection is autocommit: each
    ``transaction()`` is one transaction, nested ones are savepoints)."""

    family: Family = "postgresql"

    def __init__(self, conn: psycopg.Connection, table: TableName, columns: Sequence[str],
                 *, mode: Mode, conflict_key: Sequence[str], key: Sequence[str],
                 stage: str = STAGE_TABLE) -> None:
        """``stage``: the temporary table upsert/ignore stage rows in; one per column set
        written on the connection (a transform's result may have other columns)."""
        from psycopg import sql

        self.conn = conn
        self.table = table
        self.mode = mode
        self.columns = tuple(columns)
        self.conflict_key = tuple(conflict_key)
        self._key_index = [self.columns.index(k) for k in key]
        self._conflict_index = [self.columns.index(k) for k in self.conflict_key]
        ident = sql.Identifier(table.schema, table.name)
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in self.columns)
        self._keyed = mode in (Mode.UPSERT, Mode.IGNORE)
        dest = sql.Identifier("pg_temp", stage) if self._keyed else ident
        self._copy = sql.SQL("COPY {} ({}) FROM STDIN").format(dest, cols)
        self._truncate = sql.SQL("TRUNCATE {}").format(ident)
        self._stage_empty = sql.SQL("TRUNCATE {}").format(dest)
        self._stage_create = sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {} AS SELECT {} FROM {} WITH NO DATA").format(
            sql.Identifier(stage), cols, ident)
        keys = sql.SQL(", ").join(sql.Identifier(k) for k in key)
        self._delete = sql.SQL(
            "DELETE FROM {t} WHERE ({keys}) IN (SELECT {keys} FROM "
            "jsonb_populate_recordset(NULL::{t}, %s::jsonb))").format(t=ident, keys=keys)
        self._merge = self._merge_sql(ident, cols, dest) if self._keyed else None
        if self._keyed:
            with conn.transaction():
                conn.execute(self._stage_create)

    def _merge_sql(self, ident: Any, cols: Any, stage: Any) -> Any:
        from psycopg import sql

        keys = sql.SQL(", ").join(sql.Identifier(k) for k in self.conflict_key)
        others = [c for c in self.columns if c not in self.conflict_key]
        action: Any
        if self.mode is Mode.UPSERT and others:
            sets = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
                                      for c in others)
            changed = sql.SQL("({}) IS DISTINCT FROM ({})").format(
                sql.SQL(", ").join(sql.Identifier("t", c) for c in others),
                sql.SQL(", ").join(sql.Identifier("excluded", c) for c in others))
            action = sql.SQL("DO UPDATE SET {} WHERE {}").format(sets, changed)
        else:
            action = sql.SQL("DO NOTHING")
        return sql.SQL(
            "WITH merged AS (INSERT INTO {t} AS t ({cols}) SELECT {cols} FROM {stage} "
            "ON CONFLICT ({keys}) {action} RETURNING (xmax = 0) AS inserted) "
            "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) "
            "FROM merged").format(t=ident, cols=cols, stage=stage,
                                  keys=keys, action=action)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    savepoint = transaction

    def usable(self) -> bool:
        return pg.is_usable(self.conn)

    def close(self) -> None:
        self.conn.close()

    def write(self, rows: Sequence[tuple[Any, ...]]) -> SqlWriteStats:
        superseded = 0
        if self._keyed:
            latest = {tuple(r[i] for i in self._conflict_index): r for r in rows}
            superseded = len(rows) - len(latest)
            rows = list(latest.values())
        with self.conn.cursor() as cur:
            with cur.copy(self._copy) as copy:
                for row in rows:
                    copy.write_row(row)
            if self._merge is None:
                return SqlWriteStats(rows=len(rows), inserted=len(rows))
            found = cur.execute(self._merge).fetchone()
            cur.execute(self._stage_empty)
        assert found is not None
        inserted, updated = int(found[0]), int(found[1])
        n = len(rows)
        if self.mode is Mode.IGNORE:
            return SqlWriteStats(rows=n + superseded, inserted=inserted, ignored=n - inserted,
                                 superseded=superseded)
        return SqlWriteStats(rows=n + superseded, inserted=inserted, updated=updated,
                             unchanged=n - inserted - updated, superseded=superseded)

    def truncate(self) -> None:
        self.conn.execute(self._truncate)

    def delete_keys(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """Delete the target rows whose key is one of ``rows``' keys; how many went."""
        import json

        names = [self.columns[i] for i in self._key_index]
        keys = [{n: jsonable(r[i]) for n, i in zip(names, self._key_index, strict=True)}
                for r in rows]
        return self.conn.execute(self._delete, (json.dumps(keys),)).rowcount

    def locate(self, exc: BaseException) -> int | None:
        """The failing row of an append COPY, when PostgreSQL says (staged rows were reduced,
        so their line numbers are not the chunk's)."""
        return None if self._keyed else pg.copy_error_line(exc)


class SqlaTarget:
    """Writes into a MySQL/MariaDB or SQLite table with ``SqlSink`` on a SQLAlchemy
    connection (``transaction()`` begins one, nested ones are savepoints)."""

    def __init__(self, conn: Connection, table: TableSchema, columns: Sequence[str], *,
                 mode: Mode, conflict_key: Sequence[str], key: Sequence[str]) -> None:
        self.conn = conn
        self.table = table
        self.columns = tuple(columns)
        self.sink = SqlSink(conn, table, mode=mode, key=conflict_key or None, columns=columns)
        self.family: Family = self.sink.family
        self.key = tuple(key)
        self._key_index = [self.columns.index(k) for k in key]
        conn.commit()  # the sink set the session up; chunks begin their own transactions

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.begin():
            yield

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        with self.conn.begin_nested():
            yield

    def usable(self) -> bool:
        return not (self.conn.closed or self.conn.invalidated)

    def close(self) -> None:
        self.conn.close()

    def write(self, rows: Sequence[tuple[Any, ...]]) -> SqlWriteStats:
        return self.sink.write(rows)

    def truncate(self) -> None:
        self.sink.truncate()

    def delete_keys(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """Delete the target rows whose key is one of ``rows``' keys; how many went."""
        dialect = self.conn.dialect
        target = qualified(dialect, self.table.name, self.table.schema)
        keys = [tuple(a[i] for i in self._key_index) for a in map(self.sink.adapt, rows)]
        per = max(1, KEYS_PER_DELETE // len(self.key))
        deleted = 0
        for start in range(0, len(keys), per):
            batch = keys[start:start + per]
            cond = keys_in(dialect, self.key, len(batch))
            params = tuple(v for k in batch for v in k)
            deleted += self.conn.exec_driver_sql(f"DELETE FROM {target} WHERE {cond}",
                                                 params).rowcount
        return deleted

    def locate(self, exc: BaseException) -> int | None:
        return None  # neither driver says which row of an executemany failed


Target = PgTarget | SqlaTarget


__all__ = ["DriverError", "PgTarget", "SqlaTarget", "Target", "describe_error", "error_name", "jsonable",
           "key_from_json", "key_to_json", "recategorised", "recategorising", "row_bytes"]
