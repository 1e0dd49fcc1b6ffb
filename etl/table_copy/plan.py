"""What a PostgreSQL → PostgreSQL copy will do: the spec, the plan (read from both
databases, nothing written), the --dry-run text and the target's creation."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import catalog, naming, pg
from ..errors import TargetError, UsageError
from ..model import Checkpoint, Column, Mode, TableName
from ..options import DEFAULT_LOCK_TIMEOUT_SECONDS
from ..retry import RetryPolicy
from ..runner import Pacing
from ..sources.pg import KeysetQuery
from ..thresholds import ErrorLimits
from ..transforms import Transform
from ..urls import DbUrl

if TYPE_CHECKING:
    import psycopg


log = logging.getLogger(__name__)

# Serialises the creation of target tables, schemas and types by concurrent etl processes.
_TARGET_DDL_LOCK_ID = 0x6574_6C5F_6464_6C  # "etl_ddl"


@dataclass(frozen=True)
class CopySpec:
    """Everything `etl copy` was asked to do, checked and resolved."""

    source: DbUrl
    target: DbUrl
    state: DbUrl
    table: TableName
    target_table: TableName
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
    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT_SECONDS
    state_schema: str = "etl"
    query: str | None = None      # --query: copy this query's result (then ``table`` names it)
    transform: Transform | None = None  # --transform: reshape each chunk as a DataFrame
    transform_name: str | None = None
    since_column: str | None = None  # incremental: rows changed since the last finished run
    rename_columns: str | dict[str, str] | None = None  # target names: snake_case, lower, a map

    @property
    def source_name(self) -> str:
        return "query" if self.query else str(self.table)

    @property
    def state_in_target(self) -> bool:
        return self.state.same_database(self.target)

    @property
    def target_settings(self) -> dict[str, str]:
        """Session settings of the target connection: how long a chunk waits for a lock."""
        return pg.lock_timeout_settings(self.lock_timeout)

    def args(self) -> dict[str, Any]:
        """The job's arguments as stored in the state store (URLs masked)."""
        return {
            "source": self.source.masked, "target": self.target.masked,
            "table": str(self.table), "target_table": str(self.target_table),
            "key": list(self.key or ()), "columns": list(self.columns or ()),
            "where": self.where, "mode": self.mode.value, "create": self.create,
            "pacing": dataclasses.asdict(self.pacing), "retry": dataclasses.asdict(self.retry),
            "limits": dataclasses.asdict(self.limits),
            "lock_timeout": self.lock_timeout, "query": self.query,
            "transform": self.transform_name, "since_column": self.since_column,
            "rename_columns": self.rename_columns,
        }


@dataclass(frozen=True)
class CopyPlan:
    """What the copy will do, found by reading both databases (writes nothing)."""

    spec: CopySpec
    columns: tuple[Column, ...]
    key: tuple[Column, ...]
    primary_key: tuple[str, ...]
    target_exists: bool
    binary: bool
    estimated_rows: int
    ddl: tuple[str, ...]          # statements that create the target when it is missing
    unique_key: bool = True       # the key is the primary key: one row per key value
    conflict_key: tuple[str, ...] = ()  # upsert/ignore: the target's unique columns to match on
    target_columns: tuple[Column, ...] = ()  # as the target has them (or will, once created)
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)  # source → target name

    @property
    def conflict_on_key(self) -> bool:
        """Upsert/ignore match on the source's unique key: no two rows of a chunk collide."""
        names = {self.renamed.get(k.name, k.name) for k in self.key}
        return self.unique_key and set(self.conflict_key) == names

    @property
    def write_columns(self) -> tuple[Column, ...]:
        """The copied columns under their target names (--rename-columns)."""
        return tuple(dataclasses.replace(c, name=self.renamed.get(c.name, c.name))
                     for c in self.columns)

    @property
    def query(self) -> KeysetQuery:
        return KeysetQuery(self.spec.table, self.columns, self.key, self.spec.where,
                           source_sql=self.spec.query)


def make_plan(spec: CopySpec, sconn: psycopg.Connection, tconn: psycopg.Connection) -> CopyPlan:
    """Describe the source, check the target, decide the COPY format and the DDL."""
    if spec.query:
        if not spec.key:
            raise UsageError("--query needs --key COL[,COL…]: the column(s) of its result that "
                             "order the rows and cut the chunks")
        info = catalog.describe_query(sconn, spec.query, spec.table)
        # a query has no primary key: its declared --key becomes the created target's
        info = dataclasses.replace(info, primary_key=spec.key)
    else:
        info = catalog.describe(sconn, spec.table, role="source")
    key_names = catalog.resolve_key(info, spec.key)
    columns = catalog.resolve_columns(info, spec.columns, key_names)
    key = tuple(info.column(k) for k in key_names)
    if spec.where:
        _check_where(sconn, spec)
    if spec.since_column and spec.since_column not in {c.name for c in columns}:
        raise UsageError(f"--since-column {spec.since_column}: no such column among the copied "
                         f"ones ({', '.join(c.name for c in columns)})")
    _refuse_null_keys(sconn, spec, key)
    renamed = naming.rename_map(spec.rename_columns, [c.name for c in columns])
    source_columns = columns
    columns = tuple(dataclasses.replace(c, name=renamed[c.name]) for c in columns)
    target_pk = tuple(renamed.get(k, k) for k in info.primary_key)
    ddl: tuple[str, ...] = ()
    binary = True
    target_columns = columns
    target_exists = catalog.table_oid(tconn, spec.target_table) is not None
    if target_exists:
        tinfo = catalog.describe(tconn, spec.target_table, role="target")
        target_columns = tinfo.columns
        tcols = {c.name: c for c in tinfo.columns}
        missing = [c.name for c in columns if c.name not in tcols]
        if missing and spec.transform is None:  # a transform's columns are checked as it runs
            raise TargetError(
                f"target table {spec.target_table} has no column(s) {', '.join(missing)}; "
                "add them, drop the table so it is created from the source, or narrow the copy "
                "with --columns"
            )
        # binary COPY needs identical types; any difference falls back to the text format
        binary = all(c.name in tcols and tcols[c.name].type_sql == c.type_sql for c in columns)
    elif not spec.create:
        raise TargetError(
            f"target table {spec.target_table} does not exist and --no-create was given; "
            "create it first, or drop --no-create to create it from the source"
        )
    else:
        ddl = _target_ddl(spec, sconn, tconn, columns, target_pk)
    conflict_key: tuple[str, ...] = ()
    if spec.mode in (Mode.UPSERT, Mode.IGNORE):
        conflict_key = _conflict_key(spec, tconn, target_exists, target_pk,
                                     tuple(renamed[k] for k in key_names),
                                     {c.name for c in target_columns})
    sconn.rollback()
    tconn.rollback()
    return CopyPlan(spec, source_columns, key, info.primary_key, target_exists, binary,
                    info.estimated_rows, ddl,
                    # a query's --key is the user's word, not a constraint: keep the safe paths
                    unique_key=key_names == info.primary_key and not spec.query,
                    conflict_key=conflict_key, target_columns=target_columns,
                    renamed={k: v for k, v in renamed.items() if k != v})


def _conflict_key(spec: CopySpec, tconn: psycopg.Connection, target_exists: bool,
                  source_pk: tuple[str, ...], key: tuple[str, ...],
                  copied: set[str]) -> tuple[str, ...]:
    """The target columns that upsert/ignore match rows on: its primary key, else the
    first unique index on copied columns."""
    if not target_exists:  # created from the source: its primary key
        candidates = [source_pk] if source_pk and set(source_pk) <= copied else []
    else:
        candidates = catalog.unique_keys(tconn, spec.target_table)
    usable = [c for c in candidates if set(c) <= copied]
    if usable:  # the primary key comes first
        return usable[0]
    raise UsageError(
        f"--mode {spec.mode.value} matches rows on a primary key or unique index of the "
        f"target, and {spec.target_table} has none on the copied columns; add one (e.g. "
        f"ALTER TABLE {spec.target_table} ADD PRIMARY KEY ({', '.join(key)})), or use "
        "--mode append")


def _check_where(sconn: psycopg.Connection, spec: CopySpec) -> None:
    """Run the filter once on no rows, so a typo is a clear usage error before any write."""
    import psycopg
    from psycopg import sql

    try:
        sconn.execute(sql.SQL("SELECT 1 FROM {} WHERE ({}) LIMIT 0").format(
            _source_from(spec), sql.SQL(spec.where)))  # type: ignore[arg-type]
    except psycopg.Error as exc:
        sconn.rollback()
        raise UsageError(f"--where {spec.where!r} is not valid on {spec.source_name}: "
                         f"{pg.describe_error(exc)}") from exc


def _refuse_null_keys(sconn: psycopg.Connection, spec: CopySpec, key: tuple[Column, ...]) -> None:
    """Rows whose key is NULL can never be reached by keyset chunks: refuse rather than skip them."""
    from psycopg import sql

    nullable = [k for k in key if not k.not_null]
    if not nullable:
        return
    cond = sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(sql.Identifier(k.name)) for k in nullable)
    where = sql.SQL(" AND ({})").format(sql.SQL(spec.where)) if spec.where else sql.SQL("")  # type: ignore[arg-type]
    row = sconn.execute(sql.SQL("SELECT count(*) FROM {} WHERE ({}){}").format(
        _source_from(spec), cond, where)).fetchone()
    if row and row[0]:
        raise UsageError(
            f"{row[0]:,} row(s) of {spec.source_name} have a NULL in the key column(s) "
            f"{', '.join(k.name for k in nullable)}; keyset chunks cannot reach them. Choose a "
            "--key of NOT NULL column(s), or exclude those rows with --where")


def _source_from(spec: CopySpec) -> Any:
    """The table, or ``(query) AS q``, for statements sent without parameters (% as is)."""
    from psycopg import sql

    if spec.query:
        return sql.SQL("({}) AS q").format(sql.SQL(spec.query))  # type: ignore[arg-type]
    return sql.Identifier(spec.table.schema, spec.table.name)


def _target_ddl(spec: CopySpec, sconn: psycopg.Connection, tconn: psycopg.Connection,
                columns: tuple[Column, ...], primary_key: tuple[str, ...]) -> tuple[str, ...]:
    from psycopg import sql

    stmts = [sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
        sql.Identifier(spec.target_table.schema)).as_string(None)]
    for schema, name, create in catalog.user_types_ddl(sconn, [c.type_sql for c in columns]):
        exists = tconn.execute("SELECT to_regtype(%s)", (f'"{schema}"."{name}"',)).fetchone()
        if exists and exists[0] is None:
            stmts.append(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                sql.Identifier(schema)).as_string(None))
            stmts.append(create)
    stmts.append(catalog.create_table_sql(spec.target_table, columns, primary_key))
    return tuple(dict.fromkeys(stmts))


def describe_plan(plan: CopyPlan, checkpoint: Checkpoint | None, remaining: int, exact: bool,
                  chunk_size: int) -> str:
    """The --dry-run text: what would happen, with the SQL; nothing is written."""
    spec = plan.spec
    q = plan.query
    lines = [
        f"job:          {spec.job_id}",
        f"source:       {spec.source.masked}  "
        + (f"query {spec.query}" if spec.query else f"table {spec.table}"),
        f"target:       {spec.target.masked}  table {spec.target_table}"
        + ("" if plan.target_exists else "  (missing: would be created)"),
        f"state store:  {spec.state.masked}  schema {spec.state_schema}"
        + ("  (in the target: checkpoint in each chunk's transaction)" if spec.state_in_target else ""),
        f"key:          {', '.join(f'{k.name} {k.type_sql}' for k in plan.key)}",
        f"columns:      {', '.join(c.name for c in plan.columns)}",
        *([f"renamed:      {', '.join(f'{a} → {b}' for a, b in plan.renamed.items())}"]
          if plan.renamed else []),
        f"mode:         {spec.mode.value}   COPY format: {'binary' if plan.binary else 'text'}",
    ]
    if checkpoint is not None and checkpoint.last_key is not None and not spec.restart:
        lines.append(f"resume:       after key {list(checkpoint.last_key)} "
                     f"(chunk {checkpoint.chunk_index}, {checkpoint.processed:,} rows done)")
    about = "" if exact else "~"
    if spec.pacing.chunk_size:
        chunks = -(-remaining // chunk_size) if remaining else 0
        lines.append(f"rows to copy: {about}{remaining:,} in {about}{chunks:,} chunk(s) "
                     f"of up to {chunk_size:,}")
    else:
        lines.append(f"rows to copy: {about}{remaining:,}; chunk size auto: starts at "
                     f"{chunk_size:,} rows and adapts toward {spec.pacing.chunk_seconds:g} s a chunk")
    if plan.ddl:
        lines.append("target DDL:")
        lines.extend(f"  {stmt};" for stmt in plan.ddl)
    # shown as the server runs them: %(name)s are the chunk's parameters, %% a literal %
    lines.append("chunk bound SQL (per chunk):")
    lines.append(f"  {q.bound_sql(True).as_string(None).replace('%%', '%')};")
    lines.append("chunk COPY SQL (per chunk):")
    lines.append(f"  {q.copy_out_sql(True, plan.binary).as_string(None).replace('%%', '%')};")
    lines.append("dry run: nothing was written")
    return "\n".join(lines)


def count_remaining(sconn: psycopg.Connection, plan: CopyPlan,
                    after: tuple[str, ...] | None) -> tuple[int, bool]:
    q = plan.query
    sql_text = q.remaining_sql(after is not None).as_string(sconn)
    n, exact = catalog.count_rows(sconn, sql_text, q.params(after), plan.estimated_rows)
    sconn.rollback()
    return n, exact


def prepare_target(tconn: psycopg.Connection, plan: CopyPlan) -> None:
    """Create the target table (and its schema and user types) in one transaction.

    Several copies may start at once into the same new schema: the DDL runs
    under a transaction-level advisory lock, and an object another process has
    just created is taken as it is.
    """
    import psycopg
    from psycopg import errors

    if not plan.ddl:
        return
    log.info("creating target table %s from the source's definition", plan.spec.target_table)
    try:
        with tconn.transaction():
            tconn.execute("SELECT pg_advisory_xact_lock(%s)", (_TARGET_DDL_LOCK_ID,))
            for stmt in plan.ddl:
                try:
                    with tconn.transaction():  # a savepoint per statement
                        tconn.execute(stmt.encode())
                except (errors.DuplicateObject, errors.DuplicateTable, errors.DuplicateSchema):
                    log.info("already created by another process: %s", stmt.split("(")[0])
    except psycopg.Error as exc:
        raise TargetError(f"could not create target table {plan.spec.target_table}: "
                          f"{pg.describe_error(exc, plan.spec.target)}") from exc
