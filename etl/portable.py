"""The portable description of a table: logical kinds, columns and key.

Built by ``etl.dialects.reflect_table`` from any supported database and turned
into a target's DDL by ``etl.ddl``; see docs/type-mapping.md. Re-exported by
``etl.dialects``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.StrEnum):
    """The canonical logical types a column is described by, whatever its database."""

    SMALLINT = "smallint"
    INTEGER = "integer"
    BIGINT = "bigint"
    BOOLEAN = "boolean"
    NUMERIC = "numeric"
    REAL = "real"
    DOUBLE = "double"
    TEXT = "text"
    VARCHAR = "varchar"
    CHAR = "char"
    BYTES = "bytes"
    DATE = "date"
    TIME = "time"
    TIMESTAMP = "timestamp"
    TIMESTAMPTZ = "timestamptz"
    JSON = "json"
    UUID = "uuid"
    ENUM = "enum"
    SET = "set"
    ARRAY = "array"


@dataclass(frozen=True)
class LogicalType:
    """A canonical type: its kind and parameters (length, precision/scale, labels, item)."""

    kind: Kind
    length: int | None = None  # varchar(n), char(n)
    precision: int | None = None  # numeric(p,s); None: unbounded
    scale: int | None = None
    labels: tuple[str, ...] = ()  # enum, set
    item: LogicalType | None = None  # array of

    def __str__(self) -> str:
        if self.kind in (Kind.VARCHAR, Kind.CHAR) and self.length is not None:
            return f"{self.kind}({self.length})"
        if self.kind is Kind.NUMERIC and self.precision is not None:
            return f"numeric({self.precision},{self.scale or 0})"
        if self.kind in (Kind.ENUM, Kind.SET):
            return f"{self.kind}({', '.join(repr(label) for label in self.labels)})"
        if self.kind is Kind.ARRAY:
            return f"array({self.item})"
        return str(self.kind)


@dataclass(frozen=True)
class PortableColumn:
    """A column described portably; ``native`` is the source database's own type text."""

    name: str
    type: LogicalType
    nullable: bool = True
    unsigned: bool = False  # MySQL UNSIGNED: ``type`` already holds the whole unsigned range
    native: str = ""
    read_as_text: bool = False  # no portable mapping: values are read as their text form
    # numbered by the database when an insert leaves it out: MySQL AUTO_INCREMENT, PostgreSQL
    # serial/identity, SQLite INTEGER PRIMARY KEY (the rowid), with or without AUTOINCREMENT
    auto_increment: bool = False


@dataclass(frozen=True)
class TableSchema:
    """A table's columns in order and its primary key, as reflected."""

    name: str
    columns: tuple[PortableColumn, ...]
    primary_key: tuple[str, ...]
    schema: str | None = None

    def column(self, name: str) -> PortableColumn:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)


__all__ = ["Kind", "LogicalType", "PortableColumn", "TableSchema"]
