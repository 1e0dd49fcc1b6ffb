"""Rows as JSON objects into PostgreSQL: COPY them into a staging table, convert with SQL.

Each row is one JSON object on one line (an NDJSON line, or a Parquet row written as
JSON by ``etl.sources.parquet_rows``). A write COPYs its lines verbatim into a session
temporary table of one ``json`` column — CSV format with a delimiter and a quote that
no valid JSON line holds (``\\x02``, ``\\x01``), so nothing is escaped and a line that is
not valid JSON is refused by COPY with its line number — and then one statement moves
them into the target, every column converted by PostgreSQL from the object's key of
the same name:

    INSERT INTO target (a, b, j) SELECT r.a, r.b, r.j::jsonb
    FROM pg_temp.etl_stage_json AS s
    CROSS JOIN LATERAL json_to_record(s.doc) AS r(a int, b date[], j text)

``json_to_record`` parses each object once and reads each value with the type's own
input function, as COPY would: the text of a JSON string, the JSON text of a number,
boolean, object or array (``char(3)`` refuses a longer value instead of cutting it, as a
cast would); JSON arrays into array columns element by element; ``null`` or a missing
key is NULL; keys that are not columns are ignored; a line that is not an object is
refused. ``json``/``jsonb`` columns read the value's text as JSON: a string holding JSON
text is parsed (what a Parquet file's JSON-as-string column holds), an object or an
array is kept as its JSON text (``json`` keeps it exactly).

Modes: append inserts; upsert and ignore merge with ``ON CONFLICT`` on the key, the last
staged row of a key winning (``etl.sinks.pg_merge.merge_sql``). All of it runs in the
caller's transaction; the staging table is emptied after each write and created again
on a new connection.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .. import pg
from ..errors import TargetError
from ..model import Column, Mode, TableName
from .pg_copy import CopyStatement, WriteStats
from .pg_merge import merge_outcomes, merge_sql

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql as sqlmod

# The session's staging table (temporary tables are private to a session).
STAGE_TABLE = "etl_stage_json"
# Bytes no valid JSON line holds unescaped (control characters): COPY's CSV delimiter and
# quote, so that a line goes in verbatim (as escape-string literals: printable SQL).
_DELIMITER, _QUOTE = "E'\\x02'", "E'\\x01'"
_JSON_TYPES = frozenset({"json", "jsonb"})


class UnstagedLineError(TargetError):
    """COPY staged another number of rows than the lines sent: a line COPY reads as the end
    of the data (``\\.``) or that holds its quote byte is not a JSON value; a data error, so
    the row is isolated and dead-lettered."""


def json_sql(table: TableName, columns: tuple[Column, ...], mode: Mode = Mode.APPEND,
             key: tuple[str, ...] = ()) -> tuple[sqlmod.Composed, sqlmod.Composed]:
    """The staging COPY and the statement moving the staged rows into ``table`` (an
    INSERT … SELECT; for upsert and ignore one whose result row ``merge_outcomes`` reads)."""
    from psycopg import sql

    if mode not in (Mode.APPEND, Mode.REPLACE, Mode.UPSERT, Mode.IGNORE):
        raise ValueError(f"PgJsonSink cannot write mode {mode.value}")
    stage = sql.Identifier("pg_temp", STAGE_TABLE)
    copy = sql.SQL(
        "COPY {} (doc) FROM STDIN (FORMAT csv, DELIMITER {}, QUOTE {}, FORCE_NOT_NULL (doc), "
        "ENCODING 'UTF8')").format(stage, sql.SQL(_DELIMITER), sql.SQL(_QUOTE))
    # json and jsonb columns read the value's text (see the module), others their type
    record = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c.name),
                                sql.SQL("text" if c.type_sql in _JSON_TYPES else c.type_sql))
        for c in columns)
    source = sql.SQL("{} AS s CROSS JOIN LATERAL json_to_record(s.doc) AS r({})").format(
        stage, record)
    values: dict[str, sqlmod.Composable] = {
        c.name: sql.SQL("{}::{}").format(sql.Identifier("r", c.name), sql.SQL(c.type_sql))
        if c.type_sql in _JSON_TYPES else sql.Identifier("r", c.name) for c in columns}
    if mode in (Mode.UPSERT, Mode.IGNORE):
        return copy, merge_sql(table, columns, key, mode, source=source, values=values,
                               order=sql.SQL("s.ctid"))
    return copy, sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(
        sql.Identifier(table.schema, table.name),
        sql.SQL(", ").join(sql.Identifier(c.name) for c in columns),
        sql.SQL(", ").join(values[c.name] for c in columns), source)


class PgJsonSink:
    """Write JSON-object rows into ``table``'s ``columns`` (append, upsert or ignore on
    ``key``); the caller owns the transaction."""

    def __init__(self, conn: psycopg.Connection, table: TableName, columns: tuple[Column, ...],
                 mode: Mode = Mode.APPEND, key: tuple[str, ...] = ()) -> None:
        from psycopg import sql

        self.conn = conn
        self.table = table
        self.mode = mode
        self._copy_sql, self._move = json_sql(table, columns, mode, key)
        self._create = sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (doc json)").format(
            sql.Identifier(STAGE_TABLE))
        self._empty = sql.SQL("TRUNCATE {}").format(sql.Identifier("pg_temp", STAGE_TABLE))
        self.prepare()

    def prepare(self) -> None:
        """Create this session's staging table (again after a reconnect)."""
        with self.conn.transaction():
            self.conn.execute(self._create)

    def start(self) -> JsonStatement:
        """Open one staging COPY: write lines to it; ``finish()`` moves them into the table."""
        return JsonStatement(self, CopyStatement(self.conn, self._copy_sql))

    def write(self, blocks: Iterable[bytes]) -> WriteStats:
        statement = self.start()
        for block in blocks:
            statement.write(block)
        return statement.finish()

    def move(self, staged: WriteStats) -> WriteStats:
        """Convert what the staging COPY holds into the table, then empty it."""
        cur = self.conn.execute(self._move)
        if self.mode in (Mode.UPSERT, Mode.IGNORE):
            row = cur.fetchone()
            assert row is not None
            outcomes: dict[str, int] | None = merge_outcomes(self.mode, staged.rows, row, False)
            rows = staged.rows
        else:
            outcomes, rows = None, max(cur.rowcount, 0)
        self.conn.execute(self._empty)
        return WriteStats(rows=rows, bytes=staged.bytes, checksum=staged.checksum,
                          outcomes=outcomes)


def copy_error_line(exc: BaseException) -> int | None:
    """The line of a write that COPY refused (an invalid JSON value names it after the
    JSON parser's own context line); None for errors of the conversion."""
    return pg.copy_error_line(exc, any_line=True)


class JsonStatement:
    """A staging COPY whose ``finish()`` moves the rows into the table (see CopyStatement).

    It counts the lines sent: COPY must stage as many rows, else a line was read as the
    end of the data or merged with the next (a guard against lines no JSON value is)."""

    def __init__(self, sink: PgJsonSink, stage: CopyStatement) -> None:
        self._sink = sink
        self._stage = stage
        self._lines = 0

    def write(self, block: bytes) -> None:
        self._lines += block.count(b"\n")
        self._stage.write(block)

    def abort(self, exc: BaseException) -> None:
        self._stage.abort(exc)

    def finish(self) -> WriteStats:
        staged = self._stage.finish()
        if staged.rows != self._lines:
            raise UnstagedLineError(
                f"COPY staged {staged.rows} of {self._lines} line(s): a line that is only "
                "\\. or holds a \\x01 or \\x02 byte is not a JSON value", sqlstate="22P04")
        return self._sink.move(staged)
