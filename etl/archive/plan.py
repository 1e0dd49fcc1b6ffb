"""What an archive job will do: the spec, the plan (read from the databases, nothing
written), the SQL of a chunk and the --dry-run text.

The plan is built on the copy path's: :func:`etl.table_copy.make_plan` describes the
source from pg_catalog, resolves and checks the key, checks --where, refuses NULL keys,
checks an existing archive table's columns and holds the DDL that creates a missing one.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import catalog, table_copy
from ..errors import UsageError
from ..model import Column, TableName
from ..retry import RetryPolicy
from ..runner import Pacing
from ..sources.pg import KeysetQuery
from ..sql_copy.plan import SqlName
from ..table_copy import DEFAULT_LOCK_TIMEOUT_SECONDS, CopyPlan, CopySpec
from ..urls import DbUrl

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql as sqlmod

    from .sql_dest import SqlArchive

# The archive side of a chunk that goes to another database is staged here first (a
# temporary table of the destination session, emptied by every commit and rollback).
STAGE_TABLE = "etl_archive_stage"


class Action(enum.StrEnum):
    """What happens to the matching rows."""

    MOVE = "move"            # archive, then delete from the source
    PURGE = "purge"          # delete only (--purge)
    NO_DELETE = "no-delete"  # archive only (--no-delete)


@dataclass(frozen=True)
class ArchiveSpec:
    """Everything `etl archive` was asked to do, checked and resolved."""

    source: DbUrl
    dest: DbUrl                    # the archive's database: the source's unless --to
    state: DbUrl
    table: TableName
    archive_table: TableName | None  # None with --purge
    job_id: str
    where: str
    action: Action = Action.MOVE
    key: tuple[str, ...] | None = None
    create: bool = True
    restart: bool = False
    pacing: Pacing = Pacing()
    retry: RetryPolicy = RetryPolicy()
    lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT_SECONDS
    state_schema: str = "etl"
    to_dir: Path | None = None       # --to-dir: chunk files instead of an archive table
    file_format: str = "parquet"     # --format, with --to-dir
    timezone: str = "UTC"            # --timezone: the sessions' TimeZone
    dest_table: SqlName | None = None  # the archive table in a MySQL/MariaDB --to
    drop_partitions: bool = False    # --drop-partitions: whole partitions first

    @property
    def archive_name(self) -> str | None:
        """The archive table as the user names it (None: --purge or --to-dir)."""
        if self.dest_table is not None:
            return str(self.dest_table)
        return str(self.archive_table) if self.archive_table else None

    @property
    def same_database(self) -> bool:
        """The archive table is in the source database (or there is none: --purge)."""
        return self.source.same_database(self.dest)

    @property
    def state_in_source(self) -> bool:
        return self.state.same_database(self.source)

    @property
    def settings(self) -> dict[str, str]:
        """Session settings of both connections: how long a chunk waits for a row lock, and
        the time zone --where's times are read in."""
        from ..pg import session_settings

        return session_settings(self.lock_timeout, self.timezone)

    def args(self) -> dict[str, Any]:
        """The job's arguments as stored in the state store (URLs masked)."""
        return {
            "source": self.source.masked, "to": self.dest.masked, "table": str(self.table),
            "to_table": self.archive_name,
            "where": self.where, "action": self.action.value, "key": list(self.key or ()),
            "create": self.create, "pacing": dataclasses.asdict(self.pacing),
            "retry": dataclasses.asdict(self.retry), "lock_timeout": self.lock_timeout,
            "timezone": self.timezone, "drop_partitions": self.drop_partitions,
            **({"to_dir": str(self.to_dir), "format": self.file_format}
               if self.to_dir is not None else {}),
        }


@dataclass(frozen=True)
class ArchivePlan:
    """The copy plan of source → archive table, plus what archiving adds to it."""

    spec: ArchiveSpec
    copy: CopyPlan
    conflict_key: tuple[str, ...]  # the archive's unique key (what a replayed row meets)
    sql_dest: SqlArchive | None = None  # the archive in MySQL/MariaDB (--to mysql://…)

    @property
    def query(self) -> KeysetQuery:
        return self.copy.query

    @property
    def columns(self) -> tuple[Column, ...]:
        return self.copy.columns

    @property
    def archive(self) -> TableName:
        assert self.spec.archive_table is not None
        return self.spec.archive_table

    def chunk_sql(self, has_lower: bool) -> sqlmod.Composed:
        """The statement that does a chunk's work in the source database (same database:
        all of it; another database: the ``COPY … TO STDOUT`` whose rows go there)."""
        q, action = self.query, self.spec.action
        if action is Action.PURGE:
            return q.delete_sql(has_lower)
        rows = q.select_sql(has_lower) if action is Action.NO_DELETE else \
            q.delete_sql(has_lower, returning=True)
        from psycopg import sql

        if self.spec.to_dir is not None:  # files: PostgreSQL's own CSV, parsed by type later
            return sql.SQL("COPY ({}) TO STDOUT (FORMAT csv, HEADER)").format(rows)
        if self.sql_dest is not None:  # MySQL/MariaDB: the rows themselves, decoded
            return rows
        if self.spec.same_database:
            return self.merge_sql(rows)

        return sql.SQL("COPY ({}) TO STDOUT (FORMAT {})").format(
            rows, sql.SQL("binary" if self.copy.binary else "text"))

    def move_sql(self, has_lower: bool) -> sqlmod.Composed:
        """Same database, the usual case: ``WITH moved AS (DELETE … RETURNING …) INSERT INTO
        archive SELECT … FROM moved`` — no conflict handling and no counts, which cost a third
        of the statement's time (bench/archive_pg.py). Delete, insert and checkpoint are one
        transaction, so the archive can hold one of these keys only if it did before the job
        (an earlier --no-delete, rows put there by hand): the insert then fails with a unique
        violation, and the chunk falls back to ``merge_sql``, which sorts that out."""
        from psycopg import sql

        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in self.columns)
        return sql.SQL("WITH moved AS ({rows}) INSERT INTO {arch} ({cols}) SELECT {cols} "
                       "FROM moved").format(rows=self.query.delete_sql(has_lower, returning=True),
                                            arch=self._archive_ident(), cols=cols)

    def merge_sql(self, rows: sqlmod.Composable) -> sqlmod.Composed:
        """Insert ``rows`` (a statement returning the columns) into the archive, keeping a
        row whose key it holds already; returns (rows, inserted, already there identical).

        Every part of the statement sees the archive as it was before it, so the third count
        finds the rows a replay meets again; ``inserted + identical < rows`` means the archive
        holds a *different* row under one of the keys, and the chunk must not go on.
        """
        from psycopg import sql

        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in self.columns)
        same: sqlmod.Composable = sql.SQL("0")
        if self.conflict_key:
            key_a = sql.SQL(", ").join(sql.Identifier("a", k) for k in self.conflict_key)
            key_m = sql.SQL(", ").join(sql.Identifier("m", k) for k in self.conflict_key)
            # compared as text: types without an equality operator (json, point …) too
            text_a = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("a", c.name))
                                        for c in self.columns)
            text_m = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier("m", c.name))
                                        for c in self.columns)
            # looked up only when some row was not inserted (an InitPlan runs when first used)
            same = sql.SQL(
                "CASE WHEN (SELECT count(*) FROM ins) = (SELECT count(*) FROM moved) THEN 0 "
                "ELSE (SELECT count(*) FROM moved AS m JOIN {arch} AS a ON ({ka}) = ({km}) "
                "WHERE ROW({ta}) IS NOT DISTINCT FROM ROW({tm})) END").format(
                arch=self._archive_ident(), ka=key_a, km=key_m, ta=text_a, tm=text_m)
        return sql.SQL(
            "WITH moved AS ({rows}), "
            "ins AS (INSERT INTO {arch} ({cols}) SELECT {cols} FROM moved "
            "ON CONFLICT DO NOTHING RETURNING 1) "
            "SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM ins), {same}").format(
            rows=rows, arch=self._archive_ident(), cols=cols, same=same)

    def stage_merge_sql(self) -> sqlmod.Composed:
        """:meth:`merge_sql` of the rows staged in the destination session."""
        from psycopg import sql

        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in self.columns)
        return self.merge_sql(sql.SQL("SELECT {} FROM {}").format(
            cols, sql.Identifier("pg_temp", STAGE_TABLE)))

    def stage_create_sql(self) -> sqlmod.Composed:
        """The destination session's staging table: the archive's types for the copied
        columns, emptied by each commit or rollback."""
        from psycopg import sql

        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in self.columns)
        return sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} ON COMMIT DELETE ROWS AS "
                       "SELECT {} FROM {} WITH NO DATA").format(
            sql.Identifier(STAGE_TABLE), cols, self._archive_ident())

    def _archive_ident(self) -> sqlmod.Identifier:
        from psycopg import sql

        return sql.Identifier(self.archive.schema, self.archive.name)


def make_plan(spec: ArchiveSpec, sconn: psycopg.Connection,
              dconn: psycopg.Connection | None, sql_dest: SqlArchive | None = None) -> ArchivePlan:
    """Describe the source and the archive table (through the copy path's plan; a MySQL/
    MariaDB archive through ``sql_dest``'s, the cross-database copy's)."""
    if spec.archive_table is not None and spec.same_database \
            and spec.archive_table == spec.table:
        raise UsageError(f"--to-table {spec.archive_table} is the table being archived; name "
                         f"another table (e.g. {spec.table.name}_archive) or another database (--to)")
    if sql_dest is not None:  # the source's side only: the table itself is its "target"
        cspec = CopySpec(source=spec.source, target=spec.source, state=spec.state,
                         table=spec.table, target_table=spec.table, job_id=spec.job_id,
                         key=spec.key, where=spec.where, create=False, restart=spec.restart,
                         pacing=spec.pacing, retry=spec.retry, lock_timeout=spec.lock_timeout,
                         state_schema=spec.state_schema)
        cplan = table_copy.make_plan(cspec, sconn, sconn)
        sconn.rollback()
        if [c.name for c in cplan.columns] != list(sql_dest.columns()):  # pragma: no cover
            raise UsageError(f"the columns of {spec.table} changed while the job started; rerun")
        return ArchivePlan(spec, cplan, sql_dest.conflict_key, sql_dest)
    cspec = CopySpec(source=spec.source, target=spec.dest, state=spec.state, table=spec.table,
                     target_table=spec.archive_table or spec.table, job_id=spec.job_id,
                     key=spec.key, where=spec.where, create=spec.create, restart=spec.restart,
                     pacing=spec.pacing, retry=spec.retry, lock_timeout=spec.lock_timeout,
                     state_schema=spec.state_schema)
    cplan = table_copy.make_plan(cspec, sconn, dconn or sconn)
    conflict_key: tuple[str, ...] = ()
    archive = spec.archive_table
    if archive is not None:  # not --purge
        copied = {c.name for c in cplan.columns}
        keys = (catalog.unique_keys(dconn or sconn, archive) if cplan.target_exists
                else [cplan.primary_key] if cplan.primary_key else [])
        usable = [k for k in keys if k and set(k) <= copied]
        conflict_key = usable[0] if usable else ()
        atomic = spec.same_database and (spec.action is Action.MOVE or spec.state_in_source)
        if not conflict_key and not atomic:
            fix = (f"add one (e.g. ALTER TABLE {archive} ADD PRIMARY KEY "
                   f"({', '.join(k.name for k in cplan.key)}))" if cplan.target_exists else
                   f"{spec.table} has no primary key to give the archive table it would create: "
                   "create the archive table first, with a primary key or unique index")
            raise UsageError(
                f"archive table {archive} has no primary key or unique index on the archived "
                f"columns, so a chunk written again after a crash could be duplicated there; "
                f"{fix}")
    sconn.rollback()
    return ArchivePlan(spec, cplan, conflict_key)


def describe_plan(plan: ArchivePlan, resume_after: list[Any] | None, remaining: int,
                  exact: bool, chunk_size: int, first: dict[str, Any] | None,
                  explain: list[str], partitions: list[str] | None = None) -> str:
    """The --dry-run text: what would happen, the SQL of one chunk and its EXPLAIN."""
    spec = plan.spec
    about = "" if exact else "~"
    creates = plan.sql_dest.ddl if plan.sql_dest is not None else \
        () if plan.copy.target_exists else plan.copy.ddl
    to = {Action.PURGE: "nowhere (--purge: deleted only)"}.get(
        spec.action, f"{spec.dest.masked}  table {spec.archive_name}"
        + ("  (missing: would be created)" if creates else ""))
    if spec.to_dir is not None:
        from ..sinks.files import job_prefix

        to = (f"{spec.to_dir}  {spec.file_format} files {job_prefix(spec.job_id)}.wNNNN.NNNNNN."
              f"{spec.file_format}, manifest {job_prefix(spec.job_id)}.manifest.json"
              + ("" if spec.to_dir.is_dir() else "  (directory missing: would be created)"))
    lines = [
        f"job:          {spec.job_id}",
        f"source:       {spec.source.masked}  table {spec.table}",
        f"archive to:   {to}",
        f"action:       {spec.action.value}"
        + ("" if spec.action is not Action.MOVE else
           "  (one source transaction: delete; file fsynced and renamed, manifest written; "
           "then the delete commits with the checkpoint)" if spec.to_dir is not None else
           "  (one source transaction: delete + archive + checkpoint)" if spec.same_database
           else "  (archive committed first, then delete + checkpoint in the source)"),
        f"where:        {spec.where}",
        f"key:          {', '.join(f'{k.name} {k.type_sql}' for k in plan.copy.key)}",
        f"state store:  {spec.state.masked}  schema {spec.state_schema}",
    ]
    if resume_after is not None:
        lines.append(f"resume:       after key {resume_after}")
    if partitions is not None:
        lines.append("partitions (--drop-partitions; judged again, under a lock, by the run):")
        lines.extend(partitions or ["  none"])
    if spec.pacing.chunk_size:
        chunks = -(-remaining // chunk_size) if remaining else 0
        lines.append(f"rows matching: {about}{remaining:,} in {about}{chunks:,} chunk(s) "
                     f"of up to {chunk_size:,}")
    else:
        chunks = -(-remaining // chunk_size) if remaining else 0
        lines.append(f"rows matching: {about}{remaining:,}; chunk size auto: starts at "
                     f"{chunk_size:,} rows ({about}{chunks:,} chunk(s) at that size) and adapts "
                     f"toward {spec.pacing.chunk_seconds:g} s a chunk")
    if creates and spec.action is not Action.PURGE and spec.to_dir is None:
        lines.append("archive DDL:")
        lines.extend(f"  {stmt};" for stmt in creates)
    has_lower = resume_after is not None
    lines.append("chunk bound SQL (per chunk):")
    lines.append(f"  {_shown(plan.query.bound_sql(has_lower))};")
    lines.append("chunk SQL (per chunk, in the source database):")
    lines.append(f"  {_shown(plan.chunk_sql(has_lower))};")
    if plan.sql_dest is not None:
        lines.append("then in the archive database (the rows, one transaction a chunk):")
        lines.append(f"  {plan.sql_dest.write_sql};")
    elif not spec.same_database and spec.action is not Action.PURGE:
        lines.append("then in the archive database (staged rows):")
        lines.append(f"  {_shown(plan.stage_merge_sql())};")
    if first is not None:
        lines.append(f"first chunk:  {first}")
        lines.append("EXPLAIN of the first chunk:")
        lines.extend(f"  {line}" for line in explain)
    else:
        lines.append("first chunk:  none — no row matches")
    lines.append("dry run: nothing was written")
    return "\n".join(lines)


def _shown(stmt: sqlmod.Composed) -> str:
    # as the server runs them: %(name)s are the chunk's parameters, %% a literal %
    return stmt.as_string(None).replace("%%", "%")
