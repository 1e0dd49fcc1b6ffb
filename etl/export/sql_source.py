"""`etl export` from MySQL/MariaDB and SQLite, through SQLAlchemy.

The source is described as ``etl copy`` describes it (``etl.dialects``: portable kinds, a
--query's result columns through a temporary view or table) and read by the same keyset
reader (``etl.sources.sqla``): each chunk is ``key > last ORDER BY key LIMIT n`` in one
short read transaction, its rows Python values. They are written by ``etl.export.values``;
everything else — file names, walks, the manifest, the checkpoint in the PostgreSQL state
store after each file is published, partitions, --rows-per-file — is the PostgreSQL
export's (``etl.export.run.ExportStep``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import pg
from ..dialects import (
    Family,
    PortableColumn,
    TableSchema,
    make_engine,
    reflect_query,
    reflect_table,
)
from ..errors import ConnectionLostError, SourceError, TargetError, UsageError
from ..report import Result
from ..sources.sqla import SqlaKeysetSource
from ..sql_copy.connections import _require_sqlite_file, _sqlite_real_transactions, family_of
from ..sql_copy_io import describe_error, key_from_json, key_to_json, recategorising
from ..urls import DbUrl
from .plan import ExportSpec
from .run import ExportStep, dry_run_result, stored_checkpoint
from .values import open_values_file, partition_text
from .values import schema_doc as schema_doc

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from ..jobrun import JobRun
    from ..model import Checkpoint
    from ..runner import StepOutcome
    from ..sinks import files

log = logging.getLogger(__name__)

# Progress totals are exact counts up to this many rows, the database's estimate beyond.
EXACT_COUNT_ROWS = 500_000


class SqlSource:
    """The source database's engine and the connections it opens, failures made EtlErrors."""

    def __init__(self, url: DbUrl, role: str = "source") -> None:
        self.url = url
        self.role = role  # how errors name the database
        self.family: Family = family_of(url)
        self._engine: Engine | None = None

    def engine(self) -> Engine:
        if self._engine is None:
            kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if self.family == "sqlite":
                _require_sqlite_file(self.url)
                kwargs["connect_args"] = {"timeout": 5.0}
            else:
                kwargs["connect_args"] = {"connect_timeout": pg.CONNECT_TIMEOUT_SECONDS}
            engine = make_engine(self.url.raw, **kwargs)
            if self.family == "sqlite":
                _sqlite_real_transactions(engine)
            self._engine = engine
        return self._engine

    def connect(self, reconnect: bool = False) -> Connection:
        import sqlalchemy as sa

        try:
            return self.engine().connect()
        except sa.exc.DBAPIError as exc:
            cls = ConnectionLostError if reconnect else (
                TargetError if self.role == "target" else SourceError)
            raise cls(f"cannot connect to the {self.role} database {self.url.masked}: "
                      f"{describe_error(exc, self.url)} — check the host, port, user, password "
                      "and database name in the URL") from exc

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


@dataclass(frozen=True)
class SqlExportPlan:
    """What an export from MySQL/MariaDB or SQLite will do (read from the source)."""

    spec: ExportSpec
    source: TableSchema                   # the table as reflected, or the query's columns
    columns: tuple[PortableColumn, ...]   # written to the files (partition columns left out)
    key: tuple[PortableColumn, ...]
    partition: tuple[PortableColumn, ...]
    read: tuple[str, ...]                 # the columns each chunk reads (files' + partitions)
    family: Family
    estimated_rows: int
    read_sql: str

    def reader(self, conn: Connection) -> SqlaKeysetSource:
        return SqlaKeysetSource(conn, self.source, key=[k.name for k in self.key],
                                columns=self.read, where=self.spec.where, query=self.spec.query)


def make_plan(spec: ExportSpec, db: SqlSource) -> SqlExportPlan:
    """Describe the source (a table or --query), resolve the key, the columns and the
    partition columns, check --where and the key; writes nothing."""
    import sqlalchemy as sa

    from ..sql_copy.plan import _unique_keys

    with db.connect() as conn:
        if spec.query:
            if not spec.key:
                raise UsageError("--query needs --key COL[,COL…]: the column(s) of its result "
                                 "that order the rows and cut the chunks")
            try:
                source = reflect_query(conn, spec.query, key=spec.key)
            except sa.exc.DBAPIError as exc:
                raise UsageError(f"--query does not run on the source: "
                                 f"{describe_error(exc, spec.source)}") from exc
        else:
            assert spec.sql_table is not None
            source = reflect_table(conn, spec.sql_table.name, schema=spec.sql_table.schema,
                                   role="source")
        names = [c.name for c in source.columns]
        unknown = [p for p in spec.partition_by if p not in names]
        if unknown:
            raise UsageError(f"--partition-by {', '.join(unknown)}: no such column in "
                             f"{spec.source_name} ({', '.join(names)})")
        read = None
        if spec.columns:
            read = [*spec.columns, *(p for p in spec.partition_by if p not in spec.columns)]
        reader = SqlaKeysetSource(conn, source, key=spec.key, columns=read, where=spec.where,
                                  query=spec.query)
        reader.check_where(spec.source_name, spec.source)
        nulls = reader.count_null_keys()
        unique = [] if spec.query else _unique_keys(conn, spec.sql_table)  # type: ignore[arg-type]
        estimated = _estimate(conn, spec, db.family)
        conn.rollback()
    if not spec.query and not any(k and set(k) <= set(reader.key)
                                  for k in [source.primary_key, *unique]):
        raise UsageError(
            f"--key {','.join(reader.key)} is not unique in {spec.source_name} (no primary key "
            "or unique index on those columns): rows sharing a key value could be split "
            "between chunks and missed. Add a unique index or choose unique column(s)")
    if nulls:
        raise UsageError(
            f"{nulls:,} row(s) of {spec.source_name} have a NULL in the key column(s) "
            f"{', '.join(reader.key)}; keyset chunks cannot reach them. Choose a --key of NOT "
            "NULL column(s), or exclude those rows with --where")
    columns = tuple(c for c in reader.columns if c.name not in spec.partition_by)
    if not columns:
        raise UsageError("--partition-by leaves no column to write in the files")
    return SqlExportPlan(
        spec, source, columns, tuple(source.column(k) for k in reader.key),
        tuple(source.column(p) for p in spec.partition_by),
        tuple(c.name for c in reader.columns), db.family, estimated,
        " ".join(reader.statement_sql(after=True).split()))


def _estimate(conn: Connection, spec: ExportSpec, fam: Family) -> int:
    if spec.query or fam != "mysql" or spec.sql_table is None:
        return 0
    found = conn.exec_driver_sql(
        "SELECT TABLE_ROWS FROM information_schema.TABLES "
        "WHERE TABLE_SCHEMA = COALESCE(%s, DATABASE()) AND TABLE_NAME = %s",
        (spec.sql_table.schema, spec.sql_table.name)).scalar()
    return max(int(found or 0), 0)


@dataclass(frozen=True)
class Bound:
    """The last key of a chunk: its text (the checkpoint's ``last_key``) and exact JSON."""

    text: tuple[str, ...]
    json: list[Any]


class SqlExportStep(ExportStep):
    """MySQL/MariaDB, SQLite: each chunk's rows as Python values, into the files."""

    plan: SqlExportPlan

    def __init__(self, plan: SqlExportPlan, db: SqlSource, run: JobRun,
                 manifest: files.Manifest) -> None:
        super().__init__(plan, run, manifest)
        self.db = db
        self._zero_dates = 0
        self._open_source(reconnect=False)
        names = list(plan.read)
        self._parts = [names.index(c.name) for c in plan.partition]
        self._cols = [names.index(c.name) for c in plan.columns]
        self._project = self._cols != list(range(len(names)))

    def _open_source(self, reconnect: bool) -> None:
        self.conn = self.db.connect(reconnect)
        self.source = self.plan.reader(self.conn)
        self.conn.rollback()

    def ensure_connected(self) -> None:
        if self._failed:  # a failed attempt's connection may be gone: a fresh one
            self._zero_dates += self.source.zero_dates
            self.conn.close()
            self._open_source(reconnect=True)
        self.run.ensure_connected()

    def close(self) -> None:
        self.conn.close()

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "zero_dates": self._zero_dates + self.source.zero_dates}

    def __call__(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        with recategorising(on_error=self._mark_failed):
            return super().__call__(cp, size)

    def _mark_failed(self) -> None:
        self._failed = True  # the next attempt drops what this one left

    def _after(self, cp: Checkpoint) -> tuple[Any, ...] | None:
        if cp.last_key is None:
            return None
        return key_from_json(cp.last_key_json, self.plan.key, self.plan.family)

    def _open(self, final: Path) -> Any:
        return open_values_file(self.plan, final)

    def _chunk(self, after: tuple[Any, ...] | None, limit: int,
               out_for: Callable[[tuple[str | None, ...]], Any]
               ) -> tuple[int, tuple[Any, ...], Bound] | None:
        try:
            chunk = self.source.read(after, limit)
        finally:
            self.conn.rollback()  # the chunk's read transaction ends here
        if chunk is None:
            return None
        rows = chunk.rows
        if self._parts:
            groups: dict[tuple[str | None, ...], list[tuple[Any, ...]]] = {}
            parts, cols = self._parts, self._cols
            for r in rows:
                pv = tuple(partition_text(r[i]) for i in parts)
                groups.setdefault(pv, []).append(tuple(r[i] for i in cols))
            for pv, group in groups.items():
                out_for(pv).add_rows(group)
        else:
            if self._project:
                rows = [tuple(r[i] for i in self._cols) for r in rows]
            out_for(()).add_rows(rows)
        key_json = key_to_json(chunk.last_key)
        text = tuple("" if v is None else str(v) for v in key_json)
        return len(chunk.rows), chunk.last_key, Bound(text, key_json)

    def count_remaining(self, cp: Checkpoint) -> tuple[int, bool]:
        try:
            n = self.source.count(self._after(cp), cap=EXACT_COUNT_ROWS + 1)
        finally:
            self.conn.rollback()
        if n <= EXACT_COUNT_ROWS:
            return n, True
        return max(n, self.plan.estimated_rows), False


def describe_plan(plan: SqlExportPlan, remaining: int, exact: bool) -> str:
    """The --dry-run text: what would be written where, and one chunk's read."""
    from .plan import plan_text, spec_source

    return plan_text(plan.spec, source=f"{spec_source(plan.spec)}  ({plan.family})",
                     key=plan.key, columns=[f"{c.name} {c.native or c.type}" for c in plan.columns],
                     partition=plan.partition, remaining=remaining, exact=exact,
                     per_chunk=str(plan.read_sql))


def dry_run(plan: SqlExportPlan, db: SqlSource) -> Result:
    """The plan, the rows left (after the stored checkpoint, if any) and one chunk's read;
    reads the source and the state store (if it exists), writes nothing."""
    stored = stored_checkpoint(plan.spec)
    after = key_from_json(stored.last_key_json, plan.key, plan.family) \
        if stored is not None else None
    with db.connect() as conn:
        reader = plan.reader(conn)
        try:
            n = reader.count(after, cap=EXACT_COUNT_ROWS + 1)
        finally:
            conn.rollback()
    exact = n <= EXACT_COUNT_ROWS
    remaining = n if exact else max(n, plan.estimated_rows)
    shown = stored.last_key_json if stored is not None else None
    return dry_run_result(plan.spec, describe_plan(plan, remaining, exact), remaining, shown,
                          [c.name for c in plan.columns])


__all__ = ["SqlExportPlan", "SqlExportStep", "SqlSource", "describe_plan", "dry_run",
           "make_plan", "schema_doc"]
