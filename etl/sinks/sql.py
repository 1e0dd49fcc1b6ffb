"""Write chunks of tuples into MySQL/MariaDB or SQLite with executemany, in the caller's transaction.

Modes (the statements are ``etl.dialects.write_sql``): ``append`` (and ``replace``,
whose emptying is ``truncate()``) inserts; ``upsert`` updates existing rows whose
values changed; ``ignore`` keeps existing rows. In upsert and ignore, rows that
repeat a key inside one write are reduced to the last of them (``superseded``),
as one statement may not touch a row twice without ambiguity.

What each row did is counted exactly (when no one else writes the same keys at
the same time):

- MySQL/MariaDB report affected rows per statement: 1 for an insert, 2 for an
  update, 0 for an unchanged row (1 when the connection has CLIENT.FOUND_ROWS,
  which SQLAlchemy always sets). The sum alone cannot tell 1 insert from half an
  update, so the write first counts which of its keys exist already.
- SQLite reports rows changed: an insert or an update counts 1, an unchanged
  row (the upsert's ``WHERE`` skips it) or an ignored one 0. It cannot tell an
  insert from an update either, so upserts count existing keys first too;
  ``ignore`` needs no count (changed rows are the inserted ones).

Errors are the driver's (wrapped by SQLAlchemy) and are classified by
``etl.errors.classify``: a bad row is a data error, to be isolated by the caller.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from ..dialects import (
    Family,
    Kind,
    TableSchema,
    family,
    keys_in,
    prepare_session,
    qualified,
    write_sql,
)
from ..errors import UsageError
from ..model import Mode

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

Adapter = Callable[[Any], Any]

# pymysql's CLIENT.FOUND_ROWS capability bit: affected rows then count unchanged rows as 1.
_CLIENT_FOUND_ROWS = 2
# Keys looked up per existence query; under SQLite's oldest limit of 999 parameters.
EXISTING_KEYS_PER_QUERY = 900


@dataclass(frozen=True)
class SqlWriteStats:
    """What one write did to its rows."""

    rows: int  # rows handed to write()
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    ignored: int = 0
    superseded: int = 0  # earlier rows of a key repeated later in the same write

    def outcomes(self) -> dict[str, int]:
        """The counts by outcome, named as the PostgreSQL sinks name them."""
        return {"inserted": self.inserted, "updated": self.updated, "unchanged": self.unchanged,
                "ignored": self.ignored, "superseded": self.superseded}


class SqlSink:
    """Writes rows (tuples in ``columns`` order) into ``table``; the caller owns the transaction."""

    def __init__(self, conn: Connection, table: TableSchema, *, mode: Mode = Mode.APPEND,
                 key: Sequence[str] | None = None, columns: Sequence[str] | None = None) -> None:
        self.conn = conn
        self.table = table
        self.mode = Mode(mode)
        self.family: Family = family(conn.dialect)
        if self.family == "postgresql":
            raise UsageError("SqlSink writes MySQL/MariaDB and SQLite; PostgreSQL targets use "
                             "the COPY sinks")
        self.columns = tuple(columns) if columns else tuple(c.name for c in table.columns)
        unknown = [c for c in self.columns if c not in {t.name for t in table.columns}]
        if unknown:
            raise UsageError(f"column(s) {', '.join(unknown)} not found in target table "
                             f"{table.name}")
        self.key = tuple(key) if key else table.primary_key
        self._keyed = self.mode in (Mode.UPSERT, Mode.IGNORE)
        self._key_index = [self.columns.index(k) for k in self.key if k in self.columns]
        if self._keyed and (not self.key or len(self._key_index) != len(self.key)):
            raise UsageError(f"mode {self.mode.value} needs the key column(s) of "
                             f"{table.name} among the written columns")
        self._sql = write_sql(conn.dialect, table.name, self.columns, mode=self.mode,
                              key=self.key, schema=table.schema)
        kinds = [table.column(c).type.kind for c in self.columns]
        make = _sqlite_adapter if self.family == "sqlite" else _mysql_adapter
        self._adapters = [make(k) for k in kinds]
        prepare_session(conn)

    def write(self, rows: Sequence[tuple[Any, ...]]) -> SqlWriteStats:
        """Write ``rows`` with executemany; the counts say what each row did."""
        adapted = [self._adapt(r) for r in rows]
        superseded = 0
        if self._keyed:
            latest = {tuple(r[i] for i in self._key_index): r for r in adapted}
            superseded = len(adapted) - len(latest)
            adapted = list(latest.values())
        if not adapted:
            return SqlWriteStats(rows=len(rows), superseded=superseded)
        found_rows = self._found_rows()
        needs_existing = self.mode is Mode.UPSERT or (self.mode is Mode.IGNORE and found_rows)
        existing = self._count_existing(adapted) if needs_existing else 0
        affected = self.conn.exec_driver_sql(self._sql, adapted).rowcount  # type: ignore[arg-type]
        n = len(adapted)
        if not self._keyed:
            return SqlWriteStats(rows=len(rows), inserted=n)
        if self.mode is Mode.IGNORE:
            inserted = n - existing if needs_existing else affected
            return SqlWriteStats(rows=len(rows), inserted=inserted, ignored=n - inserted,
                                 superseded=superseded)
        inserted = n - existing
        if self.family == "sqlite":
            updated = affected - inserted
        elif found_rows:
            updated = affected - inserted - existing
        else:
            updated = (affected - inserted) // 2
        updated = min(max(updated, 0), existing)
        return SqlWriteStats(rows=len(rows), inserted=inserted, updated=updated,
                             unchanged=existing - updated, superseded=superseded)

    def truncate(self) -> None:
        """Empty the table inside the caller's transaction (``DELETE``: MySQL's TRUNCATE
        would commit on its own)."""
        self.conn.exec_driver_sql(
            f"DELETE FROM {qualified(self.conn.dialect, self.table.name, self.table.schema)}")

    def adapt(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        """``row`` (in ``columns`` order) as this sink hands it to the driver: the values
        its column holds, e.g. to look rows up by key."""
        return self._adapt(row)

    # -- helpers ---------------------------------------------------------------------
    def _adapt(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(v if v is None or type(v) in _PASS else self._adapters[i](v)
                     for i, v in enumerate(row))

    def _found_rows(self) -> bool:
        if self.family != "mysql":
            return False
        driver = self.conn.connection.driver_connection
        return bool(getattr(driver, "client_flag", 0) & _CLIENT_FOUND_ROWS)

    def _count_existing(self, rows: list[tuple[Any, ...]]) -> int:
        dialect = self.conn.dialect
        target = qualified(dialect, self.table.name, self.table.schema)
        per_query = max(1, EXISTING_KEYS_PER_QUERY // len(self.key))
        total = 0
        for start in range(0, len(rows), per_query):
            batch = rows[start:start + per_query]
            cond = keys_in(dialect, self.key, len(batch))
            params = tuple(r[i] for r in batch for i in self._key_index)
            result = self.conn.exec_driver_sql(f"SELECT count(*) FROM {target} WHERE {cond}",
                                               params)
            total += int(result.scalar_one())
        return total


# -- adapters: canonical (or any source's) value → what the target driver stores exactly ----

# Types both drivers store as they are, whatever the column.
_PASS = frozenset({str, int, bytes})


def _json_dumps(v: Any) -> Any:
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, ensure_ascii=False, default=str)
    return v


def _utc_naive(v: Any) -> Any:
    if isinstance(v, dt.datetime) and v.tzinfo is not None:
        return v.astimezone(dt.UTC).replace(tzinfo=None)
    return v


def _mysql_time_text(v: dt.timedelta) -> str:
    """A MySQL TIME outside one day (a timedelta), in MySQL's own ``[-]HHH:MM:SS`` form."""
    total = int(v.total_seconds())
    sign, total = ("-", -total) if total < 0 else ("", total)
    return f"{sign}{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def _mysql_adapter(kind: Kind) -> Adapter:
    """pymysql escapes Decimal, date/time, timedelta, bool and float itself."""
    def adapt(v: Any) -> Any:
        if isinstance(v, dt.datetime):
            return _utc_naive(v)  # timestamptz is stored in UTC (the session's zone)
        return _portable(v)
    return adapt


def _portable(v: Any) -> Any:
    """What both drivers store the same way: UUIDs as text, JSON values as JSON text,
    byte views as bytes; anything else as it is."""
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, (dict, list, tuple)):
        return _json_dumps(v)
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    return v


def _sqlite_text(v: Any, kind: Kind) -> Any:
    if isinstance(v, Decimal):
        return format(v, "f")  # plain digits: SQLite's NUMERIC affinity reads them exactly
    if isinstance(v, float) and kind is Kind.NUMERIC:
        return repr(v)
    if isinstance(v, dt.datetime):
        if kind is Kind.TIMESTAMPTZ:
            aware = v if v.tzinfo is not None else v.replace(tzinfo=dt.UTC)
            return aware.astimezone(dt.UTC).isoformat(sep=" ")
        return v.isoformat(sep=" ")
    if isinstance(v, (dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return _mysql_time_text(v)
    return _portable(v)  # bool and float are stored by sqlite3 as they are


def _sqlite_adapter(kind: Kind) -> Adapter:
    return lambda v: _sqlite_text(v, kind)


__all__ = ["SqlSink", "SqlWriteStats"]
