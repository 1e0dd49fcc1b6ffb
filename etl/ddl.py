"""CREATE TABLE for a target database from a portable table description.

The mapping of each logical kind to each target is the table in
``docs/type-mapping.md``; keep the two in step. Columns keep their order,
NOT NULL and the primary key (composite too); identifiers are quoted by the
target's SQLAlchemy dialect. Foreign keys, indexes, defaults and comments are
not carried over: a copy target is filled by the copy, not by an application.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .dialects import family, qualified, quote
from .portable import Kind, LogicalType, PortableColumn, TableSchema

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

# SQLite's NUMERIC affinity stores numbers as 8-byte doubles: up to 15 significant digits
# survive the trip exactly; wider numerics are stored as text (DECIMAL_TEXT) instead.
SQLITE_EXACT_DIGITS = 15
# MySQL DECIMAL holds at most 65 digits, 30 of them after the point.
MYSQL_MAX_PRECISION = 65
MYSQL_MAX_SCALE = 30
# InnoDB index entries are at most 3072 bytes: 768 utf8mb4 characters, for text key columns.
MYSQL_KEY_CHARS = 768
MYSQL_KEY_BYTES = 3072
# Longest VARCHAR a utf8mb4 row can hold (65,535 bytes / 4); longer ones become LONGTEXT.
MYSQL_MAX_VARCHAR = 16383
# CHAR(n) is limited to 255 characters in MySQL; longer ones become VARCHAR(n).
MYSQL_MAX_CHAR = 255
# MySQL SET holds at most 64 members; larger ones are carried as text.
MYSQL_MAX_SET_MEMBERS = 64

_PG = {Kind.SMALLINT: "smallint", Kind.INTEGER: "integer", Kind.BIGINT: "bigint",
       Kind.BOOLEAN: "boolean", Kind.REAL: "real", Kind.DOUBLE: "double precision",
       Kind.TEXT: "text", Kind.BYTES: "bytea", Kind.DATE: "date", Kind.TIME: "time",
       Kind.TIMESTAMP: "timestamp", Kind.TIMESTAMPTZ: "timestamptz", Kind.JSON: "jsonb",
       Kind.UUID: "uuid", Kind.ENUM: "text", Kind.SET: "text"}
_MYSQL = {Kind.SMALLINT: "SMALLINT", Kind.INTEGER: "INT", Kind.BIGINT: "BIGINT",
          Kind.BOOLEAN: "TINYINT(1)", Kind.REAL: "FLOAT", Kind.DOUBLE: "DOUBLE",
          Kind.TEXT: "LONGTEXT", Kind.BYTES: "LONGBLOB", Kind.DATE: "DATE",
          Kind.TIME: "TIME(6)", Kind.TIMESTAMP: "DATETIME(6)", Kind.TIMESTAMPTZ: "DATETIME(6)",
          Kind.JSON: "JSON", Kind.UUID: "CHAR(36)", Kind.ARRAY: "JSON"}
_SQLITE = {Kind.SMALLINT: "INTEGER", Kind.INTEGER: "INTEGER", Kind.BIGINT: "INTEGER",
           Kind.BOOLEAN: "BOOLEAN", Kind.REAL: "REAL", Kind.DOUBLE: "REAL", Kind.TEXT: "TEXT",
           Kind.BYTES: "BLOB", Kind.DATE: "DATE", Kind.TIME: "TIME", Kind.TIMESTAMP: "DATETIME",
           Kind.TIMESTAMPTZ: "TIMESTAMPTZ", Kind.JSON: "JSON_TEXT", Kind.UUID: "UUID",
           Kind.ENUM: "TEXT", Kind.SET: "TEXT", Kind.ARRAY: "JSON_TEXT"}


def column_type_sql(column: PortableColumn, dialect: Dialect, *, in_key: bool = False) -> str:
    """The target type of ``column`` in ``dialect``'s DDL (see docs/type-mapping.md)."""
    fam = family(dialect)
    if fam == "postgresql":
        return _pg_type(column.type)
    if fam == "mysql":
        return _mysql_type(column, dialect, in_key)
    return _sqlite_type(column.type)


def _pg_type(t: LogicalType) -> str:
    if t.kind is Kind.NUMERIC:
        return f"numeric({t.precision},{t.scale or 0})" if t.precision is not None else "numeric"
    if t.kind in (Kind.VARCHAR, Kind.CHAR):
        return f"{t.kind}({t.length})" if t.length else "text"
    if t.kind is Kind.ARRAY:
        item = t.item or LogicalType(Kind.TEXT)
        while item.kind is Kind.ARRAY:  # PostgreSQL arrays are n-dimensional under one type
            item = item.item or LogicalType(Kind.TEXT)
        return f"{_pg_type(item)}[]"
    return _PG[t.kind]


def _mysql_type(column: PortableColumn, dialect: Dialect, in_key: bool) -> str:
    t = column.type
    if column.unsigned and t.kind in (Kind.SMALLINT, Kind.INTEGER, Kind.BIGINT, Kind.NUMERIC):
        # back to the narrowest unsigned type that holds the range the kind was widened for
        if t.kind is not Kind.NUMERIC or (t.precision == 20 and not t.scale):
            return {Kind.SMALLINT: "TINYINT UNSIGNED", Kind.INTEGER: "MEDIUMINT UNSIGNED",
                    Kind.BIGINT: "INT UNSIGNED"}.get(t.kind, "BIGINT UNSIGNED")
    if t.kind is Kind.NUMERIC:
        if t.precision is None:
            return f"DECIMAL({MYSQL_MAX_PRECISION},{MYSQL_MAX_SCALE})"
        return (f"DECIMAL({min(t.precision, MYSQL_MAX_PRECISION)},"
                f"{min(t.scale or 0, MYSQL_MAX_SCALE)})")
    if t.kind in (Kind.TEXT, Kind.VARCHAR, Kind.CHAR):
        length = t.length
        if in_key:
            return f"VARCHAR({min(length or MYSQL_KEY_CHARS, MYSQL_KEY_CHARS)})"
        if t.kind is Kind.CHAR and length and length <= MYSQL_MAX_CHAR:
            return f"CHAR({length})"
        return f"VARCHAR({length})" if length and length <= MYSQL_MAX_VARCHAR else "LONGTEXT"
    if t.kind is Kind.BYTES and in_key:
        return f"VARBINARY({MYSQL_KEY_BYTES})"
    if t.kind is Kind.ENUM and t.labels:
        return f"ENUM({_literals(dialect, t.labels)})"
    if t.kind is Kind.SET and t.labels and len(t.labels) <= MYSQL_MAX_SET_MEMBERS:
        return f"SET({_literals(dialect, t.labels)})"
    if t.kind in (Kind.ENUM, Kind.SET):
        return f"VARCHAR({MYSQL_KEY_CHARS})" if in_key else "LONGTEXT"
    return _MYSQL[t.kind]


def _sqlite_type(t: LogicalType) -> str:
    if t.kind is Kind.NUMERIC:
        if t.precision is not None and t.precision <= SQLITE_EXACT_DIGITS:
            return f"NUMERIC({t.precision},{t.scale or 0})"
        return f"DECIMAL_TEXT({t.precision},{t.scale or 0})" if t.precision else "DECIMAL_TEXT"
    if t.kind in (Kind.VARCHAR, Kind.CHAR):
        return f"{t.kind.upper()}({t.length})" if t.length else "TEXT"
    return _SQLITE[t.kind]


def _literals(dialect: Dialect, values: tuple[str, ...]) -> str:
    """String literals for DDL: quotes doubled, backslashes too where MySQL reads them as
    escapes, ``%`` doubled where the driver uses %s markers."""
    backslashes = family(dialect) == "mysql" and getattr(dialect, "_backslash_escapes", True)
    out = []
    for value in values:
        text = value.replace("'", "''")
        if backslashes:
            text = text.replace("\\", "\\\\")
        if dialect.paramstyle != "qmark":
            text = text.replace("%", "%%")
        out.append(f"'{text}'")
    return ", ".join(out)


def create_table_sql(table: TableSchema, dialect: Dialect, *, name: str | None = None,
                     schema: str | None = None) -> list[str]:
    """The statements that create ``table`` in ``dialect`` (as ``schema.name`` if given),
    to run with ``Connection.exec_driver_sql`` (``%`` is doubled where the driver uses %s)."""
    fam = family(dialect)
    key = set(table.primary_key)
    defs = []
    for col in table.columns:
        ident = quote(dialect, col.name)
        parts = [ident, column_type_sql(col, dialect, in_key=col.name in key)]
        if not col.nullable or col.name in key:
            parts.append("NOT NULL")
        if col.type.kind is Kind.ENUM and col.type.labels and fam != "mysql":
            parts.append(f"CHECK ({ident} IN ({_literals(dialect, col.type.labels)}))")
        defs.append(" ".join(parts))
    if table.primary_key:
        keys = ", ".join(quote(dialect, k) for k in table.primary_key)
        defs.append(f"PRIMARY KEY ({keys})")
    target = qualified(dialect, name or table.name, schema)
    sql = f"CREATE TABLE {target} (\n  " + ",\n  ".join(defs) + "\n)"
    if fam == "mysql":
        sql += f" ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={mysql_collation(dialect)}"
    return [sql]


def mysql_collation(dialect: Dialect) -> str:
    """A binary, no-pad utf8mb4 collation: keys that differ in case, accents or trailing
    spaces stay distinct, as they are in PostgreSQL and SQLite."""
    version = tuple(getattr(dialect, "server_version_info", None) or ())
    if getattr(dialect, "is_mariadb", False):
        return "utf8mb4_nopad_bin" if version >= (10, 2) else "utf8mb4_bin"
    return "utf8mb4_0900_bin" if version >= (8, 0, 17) else "utf8mb4_bin"


__all__ = ["column_type_sql", "create_table_sql", "mysql_collation"]
