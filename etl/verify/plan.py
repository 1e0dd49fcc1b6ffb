"""What ``etl verify`` compares: the checked options, the tables on each side, the key,
the columns and the method — resolved by reading the databases' catalogs, writing nothing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..model import TableName
from ..retry import RetryPolicy
from ..runner import Pacing
from ..state.schema import DEFAULT_SCHEMA

if TYPE_CHECKING:
    from ..export.sql_source import SqlSource
    from ..portable import TableSchema
    from ..urls import DbUrl
    from .parts import DatabasePart, ValuesPart

log = logging.getLogger(__name__)

METHODS = ("auto", "database", "values")
# How many differing keys a run names (the rest are counted): each is looked up in both
# databases to say which columns differ.
DEFAULT_MAX_KEYS = 100
# A range's keys and hashes are held while it is drilled into (and, with --method values,
# its rows): ranges stay below this many rows unless --max-chunk says otherwise.
VERIFY_MAX_CHUNK = 100_000
# A table of the target may hold this many times a chunk's rows in one range (the source's
# rows decide where ranges end) before the range is narrowed at that table's own keys.
RANGE_SLACK = 2


@dataclass(frozen=True)
class TableRef:
    """One table of one side: its database and its name as given."""

    url: DbUrl
    table: str

    def label(self, multi_db: bool) -> str:
        return f"{self.table} ({self.url.masked})" if multi_db else self.table


@dataclass(frozen=True)
class VerifySpec:
    """Everything a verification was asked to do, checked."""

    source: TableRef
    targets: tuple[TableRef, ...]
    state: DbUrl
    job_id: str
    key: tuple[str, ...] | None = None
    columns: tuple[str, ...] | None = None
    exclude_columns: tuple[str, ...] = ()
    where: str | None = None
    method: str = "auto"
    max_keys: int = DEFAULT_MAX_KEYS
    restart: bool = False
    pacing: Pacing = field(default_factory=Pacing)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    state_schema: str = DEFAULT_SCHEMA

    @property
    def multi_db(self) -> bool:
        urls = {self.source.url.masked, *(t.url.masked for t in self.targets)}
        return len(urls) > 1

    def args(self) -> dict[str, Any]:
        """What the state store keeps about the job (URLs masked)."""
        return {"source": self.source.url.masked, "table": self.source.table,
                "targets": [{"target": t.url.masked, "table": t.table} for t in self.targets],
                "key": list(self.key or ()), "columns": list(self.columns or ()),
                "exclude_columns": list(self.exclude_columns), "where": self.where,
                "method": self.method, "max_keys": self.max_keys}


@dataclass
class VerifyPlan:
    """The parts opened for comparison and what they compare."""

    spec: VerifySpec
    method: str                     # database | values
    source: DatabasePart | ValuesPart
    targets: list[DatabasePart | ValuesPart]
    key: list[str]
    columns: list[str]
    estimated_rows: int
    exact: bool
    ignored: dict[str, list[str]] = field(default_factory=dict)  # label -> columns not compared
    engines: list[SqlSource] = field(default_factory=list)

    @property
    def parts(self) -> list[DatabasePart | ValuesPart]:
        return [self.source, *self.targets]

    def count(self) -> None:
        """The source's rows, for the progress total: exact for a small table, else the
        database's estimate (PostgreSQL) or a bounded count (others)."""
        from .parts import DatabasePart

        part = self.source
        if isinstance(part, DatabasePart):
            from ..catalog import count_rows

            q = part.query
            self.estimated_rows, self.exact = count_rows(
                part.conn, q.remaining_sql(False).as_string(part.conn), q.params(None),
                self.estimated_rows)
            part.conn.rollback()
            return
        from ..export.sql_source import EXACT_COUNT_ROWS

        try:
            n = part.reader.count(cap=EXACT_COUNT_ROWS + 1)
        finally:
            part.close()
        self.estimated_rows, self.exact = n, n <= EXACT_COUNT_ROWS

    def close(self) -> None:
        for part in self.parts:
            part.close()
        for db in self.engines:
            db.dispose()


def check_method(method: str) -> str:
    if method not in METHODS:
        raise UsageError(f"--method {method!r}: valid values are {', '.join(METHODS)}")
    return method


def _pick_columns(spec: VerifySpec, names: list[str], key: list[str], where: str) -> list[str]:
    """The compared columns, in the source's order: --columns, else all, less --exclude."""
    if spec.columns:
        missing = [c for c in spec.columns if c not in names]
        if missing:
            raise UsageError(f"--columns names {', '.join(missing)}, not found in {where}; its "
                             f"columns are: {', '.join(names)}")
        chosen = [c for c in names if c in spec.columns]
    else:
        chosen = list(names)
    unknown = [c for c in spec.exclude_columns if c not in names]
    if unknown:
        raise UsageError(f"--exclude-columns names {', '.join(unknown)}, not found in {where}; "
                         f"its columns are: {', '.join(names)}")
    chosen = [c for c in chosen if c not in spec.exclude_columns]
    absent = [k for k in key if k not in chosen]
    if absent:
        chosen = [*(k for k in key if k in absent), *chosen]
    return chosen


def _check_target(names: list[str], wanted: list[str], label: str) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise UsageError(
            f"the target table {label} has no column(s) {', '.join(missing)}; compare fewer "
            "columns with --columns or --exclude-columns")


def make_plan(spec: VerifySpec) -> VerifyPlan:
    """Open every table (a clear error for a missing table, key or column) and choose the
    method: ``database`` when every table is PostgreSQL's — or every one MySQL/MariaDB's —
    and the compared columns have the same types everywhere, else ``values``."""
    refs = [spec.source, *spec.targets]
    all_pg = all(r.url.is_postgres for r in refs)
    all_mysql = all(r.url.backend in ("mysql", "mariadb") for r in refs)
    if spec.method == "database" and not (all_pg or all_mysql):
        raise UsageError("--method database needs PostgreSQL on both sides, or MySQL/MariaDB "
                         "on both sides (it compares md5 sums the databases compute); use "
                         "--method values (or auto) across kinds of database")
    if all_pg and spec.method != "values":
        from .. import pg
        from ..catalog import describe

        infos = []
        for i, ref in enumerate(refs):
            role = "source" if i == 0 else "target"
            with pg.connect(ref.url, role) as conn:
                infos.append(describe(conn, TableName.parse(ref.table), role=role))
        key, columns = _key_and_columns(spec, [c.name for c in infos[0].columns],
                                        infos[0].primary_key)
        chosen = []
        for ref, info in zip(refs, infos, strict=True):
            _check_target([c.name for c in info.columns], columns, ref.table)
            chosen.append([info.column(c) for c in columns])
        from .parts import same_types

        if spec.method == "database" or same_types(chosen):
            return _database_plan(spec, infos, chosen, key, columns)
        log.info("the compared columns' types differ between the tables: comparing values")
    return _values_plan(spec)


def _key_and_columns(spec: VerifySpec, names: list[str], primary_key: tuple[str, ...]
                     ) -> tuple[list[str], list[str]]:
    """The key (--key, else the source's primary key) and the compared columns."""
    where = spec.source.table
    key = list(spec.key) if spec.key else list(primary_key)
    if not key:
        raise UsageError(f"table {where} has no primary key to compare rows by; pass --key "
                         "COL[,COL…] naming unique, non-null column(s)")
    missing = [k for k in key if k not in names]
    if missing:
        raise UsageError(f"--key column(s) {', '.join(missing)} not found in {where}; its "
                         f"columns are: {', '.join(names)}")
    return key, _pick_columns(spec, names, key, where)


def _database_plan(spec: VerifySpec, infos: list[Any], chosen: list[list[Any]],
                   key: list[str], columns: list[str]) -> VerifyPlan:
    from ..sources.pg import KeysetQuery
    from .parts import DatabasePart

    refs = [spec.source, *spec.targets]
    parts: list[DatabasePart | ValuesPart] = []
    try:
        for i, (ref, info, cols) in enumerate(zip(refs, infos, chosen, strict=True)):
            query = KeysetQuery(info.name, tuple(cols), tuple(info.column(k) for k in key),
                                spec.where)
            parts.append(DatabasePart(ref.url, query, "source" if i == 0 else "target",
                                      ref.label(spec.multi_db)))
    except BaseException:
        for p in parts:
            p.close()
        raise
    return VerifyPlan(spec, "database", parts[0], parts[1:], key, columns,
                      infos[0].estimated_rows, False, _ignored(spec, infos, columns))


def _ignored(spec: VerifySpec, infos: list[Any], columns: list[str]) -> dict[str, list[str]]:
    refs = [spec.source, *spec.targets]
    out = {}
    for ref, info in zip(refs, infos, strict=True):
        extra = [c.name for c in info.columns if c.name not in columns]
        if extra:
            out[ref.label(spec.multi_db)] = extra
    return out


_COLLATE = re.compile(r"\s+COLLATE\s+\S+", re.I)
_UTF8 = re.compile(r"\s+CHARACTER SET\s+utf8(mb3|mb4)?\b", re.I)
_TEXTS = re.compile(r"^(VARCHAR\(\d+\)|(TINY|MEDIUM|LONG)?TEXT)", re.I)


def mysql_text_type(native: str) -> str:
    """A MySQL column type as far as its values' text goes: collations and the UTF-8
    character sets do not change a value's bytes, nor does VARCHAR(n) against TEXT."""
    text = _UTF8.sub("", _COLLATE.sub("", native)).strip().upper()
    return _TEXTS.sub("TEXT", text)


def _values_plan(spec: VerifySpec) -> VerifyPlan:
    from ..dialects import reflect_table
    from ..export.sql_source import SqlSource
    from ..sql_copy.plan import SqlName
    from .parts import MysqlDatabasePart, ValuesPart

    refs = [spec.source, *spec.targets]
    engines: dict[str, SqlSource] = {}
    schemas: list[TableSchema] = []
    try:
        for i, ref in enumerate(refs):
            role = "source" if i == 0 else "target"
            db = engines.setdefault(f"{role}:{ref.url.raw}", SqlSource(ref.url, role))
            name = SqlName.parse(ref.table, db.family)
            with db.connect() as conn:
                schemas.append(reflect_table(conn, name.name, schema=name.schema, role=role))
        key, columns = _key_and_columns(spec, [c.name for c in schemas[0].columns],
                                        schemas[0].primary_key)
        parts: list[DatabasePart | ValuesPart] = []
        dbs = list(engines.values())
        for ref, schema in zip(refs, schemas, strict=True):
            _check_target([c.name for c in schema.columns], columns, ref.table)
        # MySQL/MariaDB on every side with the same column types: MySQL computes the sums
        in_database = spec.method != "values" and all(
            db.family == "mysql" for db in dbs) and (spec.method == "database" or all(
                [mysql_text_type(s.column(c).native) for c in columns] ==
                [mysql_text_type(schemas[0].column(c).native) for c in columns]
                for s in schemas))
        kind = MysqlDatabasePart if in_database else ValuesPart
        for i, (ref, schema) in enumerate(zip(refs, schemas, strict=True)):
            role = "source" if i == 0 else "target"
            parts.append(kind(engines[f"{role}:{ref.url.raw}"], schema, columns, key,
                              spec.where, ref.label(spec.multi_db)))
    except BaseException:
        for db in engines.values():
            db.dispose()
        raise
    return VerifyPlan(spec, "database" if in_database else "values", parts[0], parts[1:],
                      key, columns, 0, False, _ignored(spec, schemas, columns), dbs)


__all__ = ["DEFAULT_MAX_KEYS", "METHODS", "RANGE_SLACK", "VERIFY_MAX_CHUNK", "TableRef",
           "VerifyPlan", "VerifySpec", "check_method", "make_plan"]
