"""What a cross-database copy will do: its options resolved (``SqlCopySpec``) and the plan
found by reading both databases (``SqlCopyPlan``: columns, key, target names and DDL)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import incremental, naming
from ..ddl import create_table_sql
from ..dialects import Family, PortableColumn, TableSchema, family, reflect_query, reflect_table
from ..errors import TargetError, UsageError
from ..model import Mode, TableName
from ..retry import RetryPolicy
from ..runner import Pacing
from ..sources.sqla import SqlaKeysetSource
from ..sql_copy_io import describe_error
from ..thresholds import ErrorLimits
from ..transforms import Transform
from ..urls import DbUrl

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

log = logging.getLogger(__name__)

# Serialises the creation of PostgreSQL target tables by concurrent etl processes (as etl.table_copy).
_TARGET_DDL_LOCK_ID = 0x6574_6C5F_6464_6C


@dataclass(frozen=True)
class SqlName:
    """A table of a MySQL/SQLite database (``schema`` None: the URL's database) or of
    PostgreSQL (``schema`` defaults to public)."""

    schema: str | None
    name: str

    @classmethod
    def parse(cls, text: str, fam: Family) -> SqlName:
        if fam == "postgresql":
            t = TableName.parse(text)
            return cls(t.schema, t.name)
        parts = [p.strip() for p in text.split(".")]
        if len(parts) == 1 and parts[0]:
            return cls(None, parts[0])
        if len(parts) == 2 and all(parts):
            return cls(parts[0], parts[1])
        raise UsageError(f"invalid table name {text!r}: use TABLE or SCHEMA.TABLE")

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name


@dataclass(frozen=True)
class SqlCopySpec:
    """Everything a cross-database copy was asked to do, checked and resolved."""

    source: DbUrl
    target: DbUrl
    state: DbUrl
    table: SqlName                # the source table (a query's: its target's name)
    target_table: SqlName
    job_id: str
    key: tuple[str, ...] | None = None
    columns: tuple[str, ...] | None = None
    where: str | None = None
    mode: Mode = Mode.APPEND
    create: bool = True
    restart: bool = False
    pacing: Pacing = Pacing()
    retry: RetryPolicy = RetryPolicy()
    limits: ErrorLimits = ErrorLimits()
    lock_timeout: float | None = None
    state_schema: str = "etl"
    query: str | None = None      # --query: copy this query's result
    transform: Transform | None = None  # --transform: reshape each chunk as a DataFrame
    transform_name: str | None = None
    since_column: str | None = None  # incremental: rows changed since the last finished run
    rename_columns: str | dict[str, str] | None = None  # target names: snake_case, lower, a map

    @property
    def source_name(self) -> str:
        return "query" if self.query else str(self.table)

    @property
    def state_in_target(self) -> bool:
        return self.target.is_postgres and self.state.same_database(self.target)

    def args(self) -> dict[str, Any]:
        return {"source": self.source.masked, "target": self.target.masked,
                "table": str(self.table), "target_table": str(self.target_table),
                "key": list(self.key or ()), "columns": list(self.columns or ()),
                "where": self.where, "mode": self.mode.value, "create": self.create,
                "pacing": dataclasses.asdict(self.pacing), "retry": dataclasses.asdict(self.retry),
                "limits": dataclasses.asdict(self.limits), "lock_timeout": self.lock_timeout,
                "query": self.query, "transform": self.transform_name,
                "since_column": self.since_column, "rename_columns": self.rename_columns}


@dataclass(frozen=True)
class SqlCopyPlan:
    """What the copy will do, found by reading both databases (writes nothing)."""

    spec: SqlCopySpec
    source: TableSchema               # as reflected (a query: its result columns)
    columns: tuple[PortableColumn, ...]  # the copied ones, in order, source names
    key: tuple[str, ...]
    target: TableSchema               # as it is, or as it will be created
    target_exists: bool
    ddl: tuple[str, ...]
    conflict_key: tuple[str, ...]     # upsert/ignore: the target's unique columns
    source_family: Family
    target_family: Family
    read_sql: str                     # for --dry-run
    write_sql: str
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)  # source → target name
    watermark: dict[str, Any] | None = None  # --since-column: the walk's bounds

    @property
    def key_columns(self) -> tuple[PortableColumn, ...]:
        return tuple(self.source.column(k) for k in self.key)

    @property
    def names(self) -> tuple[str, ...]:
        """The copied columns' source names, in order."""
        return tuple(c.name for c in self.columns)

    @property
    def write_names(self) -> tuple[str, ...]:
        """The copied columns' target names (--rename-columns), in the same order."""
        return tuple(self.renamed.get(n, n) for n in self.names)

    @property
    def target_key(self) -> tuple[str, ...]:
        return tuple(self.renamed.get(k, k) for k in self.key)

    def reader(self, conn: Connection) -> SqlaKeysetSource:
        """The keyset reader of the copied rows on ``conn`` (the walk's bound applied)."""
        condition = None
        if self.watermark is not None and self.spec.since_column:
            condition = incremental.portable_condition(
                self.watermark, self.source.column(self.spec.since_column), self.key_columns,
                self.source_family)
        return SqlaKeysetSource(conn, self.source, key=self.key, columns=self.names,
                                where=self.spec.where, query=self.spec.query,
                                condition=condition)


def make_plan(spec: SqlCopySpec, sconn: Connection, tconn: Connection) -> SqlCopyPlan:
    """Reflect the source, check the target, decide the DDL and the conflict key."""
    import sqlalchemy as sa

    sfam, tfam = family(sconn.dialect), family(tconn.dialect)
    source = _describe_source(spec, sconn)
    reader = SqlaKeysetSource(sconn, source, key=spec.key, columns=spec.columns, where=spec.where,
                              query=spec.query)
    reader.check_where(spec.source_name, spec.source)
    nulls = reader.count_null_keys()
    # a query's --key is checked as it is read (etl.sources.sqla); a table's by its indexes
    unique = [] if spec.query else _unique_keys(sconn, spec.table)
    sconn.rollback()
    if not spec.query and not any(k and set(k) <= set(reader.key)
                                  for k in [source.primary_key, *unique]):
        raise UsageError(
            f"--key {','.join(reader.key)} is not unique in {spec.table} (no primary key or "
            "unique index on those columns): rows sharing a key value could be split between "
            "chunks and missed. Across databases the key must be unique; add a unique index "
            "or choose unique column(s)")
    if nulls:
        raise UsageError(
            f"{nulls:,} row(s) of {spec.source_name} have a NULL in the key column(s) "
            f"{', '.join(reader.key)}; keyset chunks cannot reach them. Choose a --key of NOT "
            "NULL column(s), or exclude those rows with --where")
    columns = reader.columns
    if spec.since_column and spec.since_column not in {c.name for c in columns}:
        raise UsageError(f"--since-column {spec.since_column}: no such column among the copied "
                         f"ones ({', '.join(c.name for c in columns)})")
    renamed = naming.rename_map(spec.rename_columns, [c.name for c in columns])
    # a query's key becomes the created target's primary key: NOT NULL (none is NULL)
    written = tuple(dataclasses.replace(
        c, name=renamed[c.name],
        nullable=c.nullable and not (spec.query and c.name in reader.key)) for c in columns)
    names = {c.name for c in written}
    tname = spec.target_table
    exists = sa.inspect(tconn).has_table(tname.name, schema=tname.schema)
    ddl: tuple[str, ...] = ()
    if exists:
        target = reflect_table(tconn, tname.name, schema=tname.schema, role="target")
        missing = [c.name for c in written if c.name not in {t.name for t in target.columns}]
        if missing and spec.transform is None:  # a transform's columns are checked as it runs
            raise TargetError(
                f"target table {tname} has no column(s) {', '.join(missing)}; add them, drop the "
                "table so it is created from the source, or narrow the copy with --columns")
        candidates = ([target.primary_key] if target.primary_key else []) + \
            _unique_keys(tconn, tname)
    elif not spec.create:
        raise TargetError(f"target table {tname} does not exist and --no-create was given; "
                          "create it first, or drop --no-create to create it from the source")
    else:
        pk = tuple(renamed[k] for k in source.primary_key) \
            if set(source.primary_key) <= {c.name for c in columns} else ()
        target = TableSchema(tname.name, written, pk, tname.schema)
        stmts = create_table_sql(target, tconn.dialect, name=tname.name, schema=tname.schema)
        if tfam == "postgresql" and tname.schema:
            from ..dialects import quote

            stmts.insert(0, f"CREATE SCHEMA IF NOT EXISTS {quote(tconn.dialect, tname.schema)}")
        ddl = tuple(stmts)
        candidates = [pk] if pk else []
    tconn.rollback()
    conflict: tuple[str, ...] = ()
    if spec.mode in (Mode.UPSERT, Mode.IGNORE):
        usable = [c for c in candidates if c and set(c) <= names]
        if not usable:
            raise UsageError(
                f"--mode {spec.mode.value} matches rows on a primary key or unique index of the "
                f"target, and {tname} has none on the copied columns; add one, or use "
                "--mode append")
        conflict = tuple(usable[0])
    return SqlCopyPlan(spec, source, columns, reader.key, target, exists, ddl, conflict, sfam,
                       tfam, reader.statement_sql(after=True),
                       _write_sql(spec, tconn, [c.name for c in written], conflict),
                       renamed={k: v for k, v in renamed.items() if k != v})


def _describe_source(spec: SqlCopySpec, sconn: Connection) -> TableSchema:
    """The source table as reflected, or a query's result columns with --key as their key."""
    import sqlalchemy as sa

    if not spec.query:
        return reflect_table(sconn, spec.table.name, schema=spec.table.schema, role="source")
    if not spec.key:
        raise UsageError("--query needs --key COL[,COL…]: the column(s) of its result that "
                         "order the rows and cut the chunks")
    try:
        return reflect_query(sconn, spec.query, key=spec.key)
    except sa.exc.DBAPIError as exc:
        raise UsageError(f"--query does not run on the source: "
                         f"{describe_error(exc, spec.source)}") from exc


def _write_sql(spec: SqlCopySpec, tconn: Connection, names: list[str],
               conflict: tuple[str, ...]) -> str:
    """What each chunk runs on the target, for --dry-run."""
    from ..dialects import qualified, quote, write_sql

    name = spec.target_table
    if family(tconn.dialect) != "postgresql":
        return write_sql(tconn.dialect, name.name, names, mode=spec.mode, key=conflict,
                         schema=name.schema)
    ident = qualified(tconn.dialect, name.name, name.schema)
    copy = f"COPY {ident} ({', '.join(quote(tconn.dialect, n) for n in names)}) FROM STDIN"
    if spec.mode in (Mode.APPEND, Mode.REPLACE):
        return copy
    action = "DO UPDATE SET … WHERE (…) IS DISTINCT FROM (…)" if spec.mode is Mode.UPSERT \
        else "DO NOTHING"
    return (f"{copy.replace(ident, 'pg_temp.etl_sql_stage')}; INSERT INTO {ident} … SELECT … "
            f"FROM pg_temp.etl_sql_stage ON CONFLICT "
            f"({', '.join(quote(tconn.dialect, k) for k in conflict)}) {action}")


def _unique_keys(tconn: Connection, name: SqlName) -> list[tuple[str, ...]]:
    import sqlalchemy as sa

    inspector = sa.inspect(tconn)
    found = [tuple(u["column_names"]) for u in
             inspector.get_unique_constraints(name.name, schema=name.schema)]
    found += [tuple(c for c in i["column_names"] if c) for i in
              inspector.get_indexes(name.name, schema=name.schema) if i.get("unique")]
    return [k for k in found if k]


def prepare_target(plan: SqlCopyPlan, tconn: Connection) -> TableSchema:
    """Create the target table when it is missing; its description as the target has it."""
    import sqlalchemy as sa

    name = plan.spec.target_table
    if plan.ddl:
        log.info("creating target table %s from the source's definition", name)
        try:
            with tconn.begin():
                if plan.target_family == "postgresql":
                    tconn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_TARGET_DDL_LOCK_ID})")
                if not sa.inspect(tconn).has_table(name.name, schema=name.schema):
                    for stmt in plan.ddl:
                        tconn.exec_driver_sql(stmt)
        except sa.exc.DBAPIError as exc:
            tconn.rollback()
            if not sa.inspect(tconn).has_table(name.name, schema=name.schema):
                raise TargetError(f"could not create target table {name}: "
                                  f"{describe_error(exc, plan.spec.target)}") from exc
            log.info("target table %s was created by another process meanwhile", name)
    target = reflect_table(tconn, name.name, schema=name.schema, role="target")
    tconn.rollback()
    return target


def estimate(conn: Connection, plan: SqlCopyPlan) -> int:
    """The database's own row estimate of the source table (0 when it has none, or for a
    query)."""
    name = plan.spec.table
    found: Any = 0
    if plan.spec.query:
        pass
    elif plan.source_family == "mysql":
        found = conn.exec_driver_sql(
            "SELECT TABLE_ROWS FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = COALESCE(%s, DATABASE()) AND TABLE_NAME = %s",
            (name.schema, name.name)).scalar()
    elif plan.source_family == "postgresql":
        found = conn.exec_driver_sql("SELECT reltuples::bigint FROM pg_class WHERE oid = "
                                     "to_regclass(%s)", (f'"{name.schema}"."{name.name}"',)
                                     ).scalar()
    return max(int(found or 0), 0)


__all__ = ["SqlCopyPlan", "SqlCopySpec", "SqlName", "estimate", "make_plan", "prepare_target"]
