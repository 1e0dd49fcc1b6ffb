"""The rows a generic chunked job walks: ``etl.Query`` — a query's result (or a table) of any
supported database, read in key order by keyset chunks, each row a dict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from ..export.sql_source import SqlSource
    from ..model import Checkpoint
    from ..portable import TableSchema
    from ..sources.sqla import SqlaKeysetSource
    from ..urls import DbUrl


@dataclass(frozen=True)
class Query:
    """Rows for :func:`etl.run_chunks`: ``sql``'s result (trusted SQL) walked by ``key``, or
    ``table`` (its primary key unless ``key`` says otherwise), in ``url``'s database —
    PostgreSQL, MySQL/MariaDB or SQLite. ``where`` (trusted SQL) narrows the rows::

        etl.Query("postgresql://app@db/shop", "select id, payload from products", key="id")
        etl.Query("sqlite:///app.db", table="users", where="active")
    """

    url: str | DbUrl
    sql: str | None = None
    key: str | Sequence[str] | None = None
    table: str | None = None
    where: str | None = None

    def __post_init__(self) -> None:
        if (self.sql is None) == (self.table is None):
            raise UsageError("etl.Query needs a query (sql=…, with key=…) or a table=…")
        if self.sql is not None and not self.key:
            raise UsageError("etl.Query(sql=…) needs key=: the column(s) of its result that "
                             "order the rows and say where a rerun resumes")

    @property
    def key_names(self) -> tuple[str, ...] | None:
        from .. import options as opt

        names = self.key
        return opt.parse_names(list(names) if names is not None and not isinstance(names, str)
                               else names, "key")

    def describe(self) -> str:
        return self.table if self.table is not None else f"query on {self.key_names}"


class ItemSource:
    """An open ``Query``: its engine, its shape and a keyset reader on one connection."""

    def __init__(self, query: Query) -> None:
        from ..export.sql_source import SqlSource
        from ..urls import parse

        self.query = query
        self.url = parse(query.url)
        self.db: SqlSource = SqlSource(self.url)
        self.family = self.db.family
        self._conn: Connection | None = None
        self._reader: SqlaKeysetSource | None = None
        self.shape: TableSchema = self._reflect()

    def _reflect(self) -> TableSchema:
        import sqlalchemy as sa

        from ..dialects import reflect_query, reflect_table
        from ..sql_copy.plan import SqlName
        from ..sql_copy_io import describe_error

        q = self.query
        with self.db.connect() as conn:
            if q.sql is not None:
                try:
                    return reflect_query(conn, q.sql, key=q.key_names or ())
                except sa.exc.DBAPIError as exc:
                    raise UsageError(f"the query does not run on {self.url.masked}: "
                                     f"{describe_error(exc, self.url)}") from exc
            assert q.table is not None
            name = SqlName.parse(q.table, self.family)
            return reflect_table(conn, name.name, schema=name.schema)

    @property
    def reader(self) -> SqlaKeysetSource:
        if self._reader is None:
            from ..sources.sqla import SqlaKeysetSource

            self._conn = self.db.connect(reconnect=True)
            self._reader = SqlaKeysetSource(self._conn, self.shape, key=self.query.key_names,
                                            where=self.query.where, query=self.query.sql)
        return self._reader

    @property
    def columns(self) -> list[str]:
        return [c.name for c in self.reader.columns]

    @property
    def key(self) -> tuple[str, ...]:
        return self.reader.key

    def check(self) -> None:
        """Run the read once on no rows: a --where or key that does not work is a usage
        error now, not a failed run."""
        try:
            self.reader.check_where(self.query.describe(), self.url)
        finally:
            self.end_read()

    def count(self, cap: int) -> tuple[int, bool]:
        try:
            n = self.reader.count(cap=cap + 1)
        finally:
            self.end_read()
        return min(n, cap), n <= cap

    def read(self, after: tuple[Any, ...] | None, limit: int
             ) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]]] | None:
        """The next ``limit`` rows after key ``after`` as dicts, with their keys."""
        try:
            chunk = self.reader.read(after, limit)
        finally:
            self.end_read()
        if chunk is None:
            return None
        names = self.columns
        rows = [dict(zip(names, r, strict=True)) for r in chunk.rows]
        reader = self.reader
        return rows, [reader.key_of(r) for r in chunk.rows]

    def end_read(self) -> None:
        if self._conn is not None and not self._conn.invalidated:
            self._conn.rollback()  # no transaction stays open while the items are worked

    def resume_key(self, cp: Checkpoint) -> tuple[Any, ...] | None:
        from ..sql_copy_io import key_from_json

        if cp.last_key is None:
            return None
        cols = [self.shape.column(k) for k in self.key]
        return key_from_json(cp.last_key_json, cols, self.family)

    def ensure_connected(self) -> None:
        if self._conn is not None and self._conn.invalidated:
            self.close_reader()

    def close_reader(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._reader = None

    def close(self) -> None:
        self.close_reader()
        self.db.dispose()


__all__ = ["ItemSource", "Query"]
