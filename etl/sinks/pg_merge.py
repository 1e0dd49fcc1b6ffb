"""Upsert and ignore into PostgreSQL: COPY into a staging table, then one INSERT … ON CONFLICT.

Each write stages the rows with COPY in a temporary table shaped like the target,
keeps the last row of each key (rows sharing a key inside one write would make
PostgreSQL refuse the statement with "cannot affect row a second time"), and
merges them with a single statement:

- ``upsert``: ``ON CONFLICT (key) DO UPDATE … WHERE (target) IS DISTINCT FROM
  (excluded)``, so rows whose values did not change are not rewritten: a rerun on
  unchanged data writes nothing and leaves no dead tuples behind;
- ``ignore``: ``ON CONFLICT (key) DO NOTHING``.

``RETURNING (xmax = 0)`` tells inserted rows from updated ones; the rest of the
staged rows were unchanged (upsert) or ignored (ignore). All of it runs in the
caller's transaction; the staging table is emptied after each write.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..model import Column, Mode, TableName
from ..sources.pg import BINARY_HEADER, BINARY_TRAILER
from .pg_copy import CopyStatement, PgCopySink, WriteStats

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql as sqlmod

# One staging table per target connection (temporary tables are private to a session).
STAGE_TABLE = "etl_stage"


class PgMergeSink:
    """Write rows into ``table`` by ``key`` in mode upsert or ignore; the caller owns the transaction."""

    def __init__(self, conn: psycopg.Connection, table: TableName, columns: tuple[Column, ...],
                 key: tuple[str, ...], mode: Mode, *, binary: bool = True,
                 csv: bool = False, unique_rows: bool = False) -> None:
        """``unique_rows``: the rows written never share ``key`` (it is the source's unique
        key): the merge then skips resolving duplicates, a sort of every staged row."""
        from psycopg import sql

        if mode not in (Mode.UPSERT, Mode.IGNORE):
            raise ValueError(f"PgMergeSink writes upsert or ignore, not {mode.value}")
        self.conn = conn
        self.table = table
        self.mode = mode
        self.binary = binary
        stage = TableName("pg_temp", STAGE_TABLE)
        self._stage_copy = PgCopySink(conn, stage, columns, binary=binary, csv=csv)
        ident = sql.Identifier(table.schema, table.name)
        self._create = sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS)").format(
            sql.Identifier(STAGE_TABLE), ident)
        self._empty = sql.SQL("TRUNCATE {}").format(sql.Identifier("pg_temp", STAGE_TABLE))
        self.unique_rows = unique_rows
        self._merge = merge_sql(table, columns, key, mode,
                                source=sql.Identifier("pg_temp", STAGE_TABLE),
                                unique_rows=unique_rows)
        self.prepare()

    def prepare(self) -> None:
        """Create this session's staging table (again after a reconnect)."""
        with self.conn.transaction():
            self.conn.execute(self._create)

    def set_copy_options(self, options: str) -> None:
        """Stage with these COPY options (``FORMAT csv, DELIMITER '|', …``: etl load)."""
        self._stage_copy.set_copy_options(options)

    def start(self) -> MergeStatement:
        """Open one staging COPY: write blocks to it; ``finish()`` merges them."""
        return MergeStatement(self, self._stage_copy.start())

    def write(self, blocks: Iterable[bytes]) -> WriteStats:
        """Stage COPY data blocks and merge them; the stats carry what each row did."""
        statement = self.start()
        for block in blocks:
            statement.write(block)
        return statement.finish()

    def merge(self, stats: WriteStats) -> WriteStats:
        """Merge what the staging COPY (``stats``) holds into the target, then empty it."""
        row = self.conn.execute(self._merge).fetchone()
        self.conn.execute(self._empty)
        assert row is not None
        return WriteStats(rows=stats.rows, bytes=stats.bytes, checksum=stats.checksum,
                          outcomes=merge_outcomes(self.mode, stats.rows, row, self.unique_rows))

    def write_rows(self, rows: bytes) -> WriteStats:
        """Rows cut from a source's COPY data: staged with their framing, then merged."""
        framed = BINARY_HEADER + rows + BINARY_TRAILER if self.binary else rows
        return self.write([framed])


def merge_sql(table: TableName, columns: tuple[Column, ...], key: tuple[str, ...], mode: Mode,
              *, source: sqlmod.Composable, values: dict[str, sqlmod.Composable] | None = None,
              order: sqlmod.Composable | None = None,
              unique_rows: bool = False) -> sqlmod.Composed:
    """The statement merging the rows of ``source`` (a FROM item: the staging table, or a
    join that converts it) into ``table`` by ``key`` in mode upsert or ignore; its one row
    is what ``merge_outcomes`` reads.

    ``values``: each column's expression over ``source`` (default: the column of that
    name); ``order``: the expression ordering the staged rows, the last of a key winning
    (default ``ctid``: it grows with insertion order in a table that is only appended to
    between two TRUNCATEs). ``unique_rows``: no two rows share ``key``.
    """
    from psycopg import sql

    ident = sql.Identifier(table.schema, table.name)
    cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in columns)
    exprs = {c.name: (values or {}).get(c.name, sql.Identifier(c.name)) for c in columns}
    select = sql.SQL(", ").join(exprs[c.name] for c in columns)
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in key)
    key_exprs = sql.SQL(", ").join(exprs[k] for k in key)
    action: sqlmod.Composable = sql.SQL("DO NOTHING")
    others = [c for c in columns if c.name not in key]
    if mode is Mode.UPSERT and others:  # else an existing row already is what is loaded
        sets = sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c.name)) for c in others)
        changed = sql.SQL("({}) IS DISTINCT FROM ({})").format(
            sql.SQL(", ").join(_comparable("t", c) for c in others),
            sql.SQL(", ").join(_comparable("excluded", c) for c in others))
        action = sql.SQL("DO UPDATE SET {} WHERE {}").format(sets, changed)
    if unique_rows:
        return sql.SQL(
            "WITH merged AS (INSERT INTO {target} AS t ({cols}) SELECT {select} FROM {source} "
            "ON CONFLICT ({keys}) {action} RETURNING (xmax = 0) AS inserted) "
            "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) "
            "FROM merged"
        ).format(target=ident, cols=cols, select=select, source=source, keys=keys,
                 action=action)
    latest = sql.SQL("SELECT DISTINCT ON ({keys}) {select} FROM {source} "
                     "ORDER BY {keys}, {order} DESC").format(
        keys=key_exprs, select=select, source=source,
        order=order if order is not None else sql.SQL("ctid"))
    return sql.SQL(
        "WITH latest AS MATERIALIZED ({latest}), "
        "merged AS (INSERT INTO {target} AS t ({cols}) SELECT * FROM latest "
        "ON CONFLICT ({keys}) {action} RETURNING (xmax = 0) AS inserted) "
        "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted), "
        "(SELECT count(*) FROM latest) FROM merged"
    ).format(target=ident, cols=cols, latest=latest, keys=keys, action=action)


# Types without an equality operator: their rows are compared by their text.
_NO_EQUALITY = frozenset({"json", "json[]", "xml", "xml[]", "point", "point[]"})


def _comparable(alias: str, column: Column) -> sqlmod.Composable:
    from psycopg import sql

    ref = sql.Identifier(alias, column.name)
    return sql.SQL("{}::text").format(ref) if column.type_sql in _NO_EQUALITY else ref


def merge_outcomes(mode: Mode, staged: int, row: Sequence[Any], unique_rows: bool
                   ) -> dict[str, int]:
    """What the staged rows did, from the row of ``merge_sql``'s statement."""
    inserted, updated = int(row[0]), int(row[1])
    distinct = staged if unique_rows else int(row[2])
    outcomes = {"inserted": inserted, "superseded": staged - distinct}
    if mode is Mode.UPSERT:
        outcomes.update(updated=updated, unchanged=distinct - inserted - updated)
    else:
        outcomes["ignored"] = distinct - inserted
    return outcomes


class MergeStatement:
    """A staging COPY whose ``finish()`` also merges the staged rows (see CopyStatement)."""

    def __init__(self, sink: PgMergeSink, stage: CopyStatement) -> None:
        self._sink = sink
        self._stage = stage

    def write(self, block: bytes) -> None:
        self._stage.write(block)

    def abort(self, exc: BaseException) -> None:
        self._stage.abort(exc)

    def finish(self) -> WriteStats:
        return self._sink.merge(self._stage.finish())
