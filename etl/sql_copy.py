"""`etl copy` across databases: PostgreSQL, MySQL/MariaDB and SQLite in every direction.

The same job as ``etl.table_copy`` (PostgreSQL → PostgreSQL), on portable
pieces: the source is read in keyset chunks by ``SqlaKeysetSource`` (canonical
Python values), each chunk is written in one target transaction by a target of
``etl.sql_copy_io`` (COPY into PostgreSQL, executemany into MySQL/SQLite), bad
rows are isolated by bisection in savepoints of that transaction, and the
checkpoint (the source's raw last key, as exact JSON) is written:

- in the chunk's own transaction when the state store is in the target (a
  PostgreSQL target, the default): a crash leaves both or neither;
- right after the chunk commits otherwise (MySQL/SQLite targets keep their state
  in the embedded PostgreSQL or ``--state``): a crash in between leaves a chunk
  committed without its checkpoint. Upsert and ignore rewrite it harmlessly; a
  resumed append/replace run first deletes, chunk by chunk, the target rows whose
  keys it is about to write, until a chunk finds none (the crashed chunk ended).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import pg, run_result
from .ddl import create_table_sql
from .dialects import Family, PortableColumn, TableSchema, family, make_engine, reflect_table
from .errors import ConnectionLostError, EtlError, SourceError, TargetError, UsageError
from .isolate import is_data_error, isolate
from .model import Category, Checkpoint, Mode, Status, TableName
from .report import Result, RowError, utc_now
from .retry import RetryPolicy, RetryStats
from .runner import Pacing, StepOutcome, StopFlag, run_loop, stop_on_signals
from .sources.sqla import SqlaKeysetSource
from .sql_copy_io import (
    PgTarget,
    SqlaTarget,
    Target,
    describe_error,
    error_name,
    jsonable,
    key_from_json,
    key_to_json,
    recategorised,
    row_bytes,
)
from .state.store import insert_dead_letters, read_checkpoint, write_checkpoint
from .thresholds import ErrorLimits
from .urls import DbUrl, parse

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from .jobrun import JobRun
    from .progress import Progress

log = logging.getLogger(__name__)

# Progress totals are exact counts up to this many rows, the database's estimate beyond.
EXACT_COUNT_ROWS = 500_000
# Serialises the creation of PostgreSQL target tables by concurrent etl processes (as etl.table_copy).
_TARGET_DDL_LOCK_ID = 0x6574_6C5F_6464_6C
# Options of `etl copy` this path does not take yet, and how to say so.
_UNSUPPORTED = {"query": "--query", "transform": "--transform", "since_column": "--since-column",
                "rename_columns": "--rename-columns"}


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
    table: SqlName
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

    @property
    def state_in_target(self) -> bool:
        return self.target.is_postgres and self.state.same_database(self.target)

    def args(self) -> dict[str, Any]:
        return {"source": self.source.masked, "target": self.target.masked,
                "table": str(self.table), "target_table": str(self.target_table),
                "key": list(self.key or ()), "columns": list(self.columns or ()),
                "where": self.where, "mode": self.mode.value, "create": self.create,
                "pacing": dataclasses.asdict(self.pacing), "retry": dataclasses.asdict(self.retry),
                "limits": dataclasses.asdict(self.limits), "lock_timeout": self.lock_timeout}


@dataclass(frozen=True)
class SqlCopyPlan:
    """What the copy will do, found by reading both databases (writes nothing)."""

    spec: SqlCopySpec
    source: TableSchema               # as reflected
    columns: tuple[PortableColumn, ...]  # the copied ones, in order
    key: tuple[str, ...]
    target: TableSchema               # as it is, or as it will be created
    target_exists: bool
    ddl: tuple[str, ...]
    conflict_key: tuple[str, ...]     # upsert/ignore: the target's unique columns
    source_family: Family
    target_family: Family
    read_sql: str                     # for --dry-run
    write_sql: str

    @property
    def key_columns(self) -> tuple[PortableColumn, ...]:
        return tuple(self.source.column(k) for k in self.key)


# -- entry point ---------------------------------------------------------------------------

def copy(options: dict[str, Any], *, src: DbUrl, tgt: DbUrl, table: str | None, mode: Mode,
         pacing: Pacing, retry: RetryPolicy) -> Result:
    """`etl copy` when either database is not PostgreSQL (called by ``etl.api.copy`` with its
    options, already parsed where ``api.copy`` parses them)."""
    from . import options as opt
    from .api import _check_writable, _progress, resolve_url
    from .jobrun import JobRun

    for name, flag in _UNSUPPORTED.items():
        if options.get(name):
            raise UsageError(f"{flag} works only between PostgreSQL databases so far, and this "
                             f"copy goes from {src.backend} to {tgt.backend}; leave it out (or "
                             "copy into PostgreSQL first and use it there)")
    if not table:
        raise UsageError("give --table: the table to copy")
    sfam, tfam = _family_of(src), _family_of(tgt)
    state_url = parse(options["state"]) if options.get("state") else \
        (tgt if tgt.is_postgres else resolve_url(None))
    if not state_url.is_postgres:
        raise UsageError(f"--state {state_url.masked}: the state store must be PostgreSQL")
    src_table = SqlName.parse(table, sfam)
    # the target's own default schema (public; the URL's database) unless --to-table says
    dst_table = SqlName.parse(options["to_table"] or src_table.name, tfam)
    if src.same_database(tgt) and src_table == dst_table:
        raise UsageError(f"source and target are the same table ({src_table} in {src.masked}); "
                         "pass another --target database or --to-table")
    spec = SqlCopySpec(
        source=src, target=tgt, state=state_url, table=src_table, target_table=dst_table,
        job_id=options["job"] or _default_job(tgt, dst_table),
        key=opt.parse_names(options["key"], "--key"),
        columns=opt.parse_names(options["columns"], "--columns"),
        where=options["where"] or None, mode=mode, create=options["create"],
        restart=options["restart"], pacing=pacing, retry=retry,
        limits=ErrorLimits(max_errors=options["max_errors"],
                           max_error_rate=options["max_error_rate"]),
        lock_timeout=opt.parse_duration(options["lock_timeout"], "--lock-timeout"),
        state_schema=options["state_schema"])
    report = options["report"]
    if report:
        _check_writable(Path(report))
    prog = _progress(options["progress"])
    stop = options["stop"] if options["stop"] is not None else StopFlag()
    with stop_on_signals(stop):
        dbs = Databases(spec, dry_run=bool(options["dry_run"]))
        try:
            with dbs.source() as sconn, dbs.target_sa() as tconn:
                plan = make_plan(spec, sconn, tconn)
                if options["dry_run"]:
                    return _dry_run(plan, sconn)
            with JobRun(state_url, spec.job_id, "copy", spec.args(),
                        schema=spec.state_schema) as run:
                result = execute(plan, run, dbs, progress=prog, stop=stop,
                                 report_path=str(report) if report else None)
        finally:
            dbs.dispose()
    if report:
        result.write(report)
    return result


def _family_of(url: DbUrl) -> Family:
    backend = url.backend
    if backend in ("mysql", "mariadb"):
        return "mysql"
    if backend in ("postgresql", "sqlite"):
        return backend  # type: ignore[return-value]
    raise UsageError(f"{url.masked}: etl copy supports PostgreSQL, MySQL/MariaDB and SQLite "
                     f"URLs, not {backend}")


def _default_job(tgt: DbUrl, table: SqlName) -> str:
    """``copy:SCHEMA.TABLE`` for a PostgreSQL target (as etl.table_copy names it); elsewhere the
    state store is shared by many targets, so the name says which: ``copy:TABLE@DATABASE``."""
    if tgt.is_postgres:
        return f"copy:{table}"
    from sqlalchemy.engine import make_url

    u = make_url(tgt.raw)
    if u.get_backend_name() == "sqlite":
        where = f"sqlite:///{os.path.abspath(u.database)}" if u.database else "sqlite://"
    else:
        where = f"{u.get_backend_name()}://{u.host or 'localhost'}:{u.port or 3306}/{u.database}"
    return f"copy:{table}@{where}"


# -- connections ---------------------------------------------------------------------------

class Databases:
    """The engines of one copy and the connections they open, failures made EtlErrors."""

    def __init__(self, spec: SqlCopySpec, *, dry_run: bool = False) -> None:
        self.spec = spec
        self.dry_run = dry_run
        self._engines: dict[str, Engine] = {}

    def _engine(self, url: DbUrl, role: str) -> Engine:
        if role not in self._engines:
            fam = _family_of(url)
            kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if fam == "sqlite":
                kwargs["connect_args"] = {"timeout": self.spec.lock_timeout or 5.0}
                if role == "source":
                    _require_sqlite_file(url)
            elif fam == "mysql":
                kwargs["connect_args"] = {"connect_timeout": pg.CONNECT_TIMEOUT_SECONDS}
            raw = url.raw
            if fam == "sqlite" and self.dry_run and not _sqlite_file_exists(url):
                raw = "sqlite://"  # sqlite3 would create the file: a dry run writes nothing
            engine = make_engine(raw, **kwargs)
            if fam == "sqlite":
                _sqlite_real_transactions(engine)
            self._engines[role] = engine
        return self._engines[role]

    def _connect(self, url: DbUrl, role: str, reconnect: bool) -> Connection:
        import sqlalchemy as sa

        try:
            conn = self._engine(url, role).connect()
            if role == "target" and self.spec.lock_timeout and _family_of(url) == "mysql":
                wait = max(1, round(self.spec.lock_timeout))
                conn.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {wait}, "
                                     f"lock_wait_timeout = {wait}")
                conn.commit()
            return conn
        except sa.exc.DBAPIError as exc:
            cls = ConnectionLostError if reconnect else \
                (SourceError if role == "source" else TargetError)
            raise cls(f"cannot connect to the {role} database {url.masked}: "
                      f"{describe_error(exc, url)} — check the host, port, user, password and "
                      "database name in the URL") from exc

    def source(self, reconnect: bool = False) -> Connection:
        return self._connect(self.spec.source, "source", reconnect)

    def target_sa(self, reconnect: bool = False) -> Connection:
        return self._connect(self.spec.target, "target", reconnect)

    def target_pg(self, reconnect: bool = False) -> Any:
        settings = {} if self.spec.lock_timeout is None else \
            {"lock_timeout": f"{max(int(self.spec.lock_timeout * 1000), 1)}ms"}
        return pg.connect(self.spec.target, "target", autocommit=True, settings=settings,
                          reconnect=reconnect)

    def dispose(self) -> None:
        for engine in self._engines.values():
            engine.dispose()


def _sqlite_file_exists(url: DbUrl) -> bool:
    from sqlalchemy.engine import make_url

    path = make_url(url.raw).database
    return not path or path == ":memory:" or path.startswith("file:") or Path(path).exists()


def _require_sqlite_file(url: DbUrl) -> None:
    from sqlalchemy.engine import make_url

    path = make_url(url.raw).database
    if not _sqlite_file_exists(url):
        raise SourceError(f"the source SQLite database {path} does not exist — check the path "
                          "(sqlite:///relative/path or sqlite:////absolute/path)")


def _sqlite_real_transactions(engine: Engine) -> None:
    """Let SQLAlchemy issue BEGIN itself: Python's sqlite3 otherwise starts transactions only
    before DML, so a chunk's leading SAVEPOINT would commit on its own when released."""
    import sqlalchemy as sa

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    def on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    sa.event.listen(engine, "connect", on_connect)
    sa.event.listen(engine, "begin", on_begin)


# -- plan ----------------------------------------------------------------------------------

def make_plan(spec: SqlCopySpec, sconn: Connection, tconn: Connection) -> SqlCopyPlan:
    """Reflect the source, check the target, decide the DDL and the conflict key."""
    import sqlalchemy as sa

    sfam, tfam = family(sconn.dialect), family(tconn.dialect)
    source = reflect_table(sconn, spec.table.name, schema=spec.table.schema, role="source")
    reader = SqlaKeysetSource(sconn, source, key=spec.key, columns=spec.columns, where=spec.where)
    try:
        reader.count(cap=0)  # runs --where once on no rows: a typo is a usage error, now
    except sa.exc.DBAPIError as exc:
        raise UsageError(f"--where {spec.where!r} is not valid on {spec.table}: "
                         f"{describe_error(exc, spec.source)}") from exc
    nulls = reader.count_null_keys()
    unique = _unique_keys(sconn, spec.table)
    sconn.rollback()
    if not any(k and set(k) <= set(reader.key) for k in [source.primary_key, *unique]):
        raise UsageError(
            f"--key {','.join(reader.key)} is not unique in {spec.table} (no primary key or "
            "unique index on those columns): rows sharing a key value could be split between "
            "chunks and missed. Across databases the key must be unique; add a unique index "
            "or choose unique column(s)")
    if nulls:
        raise UsageError(
            f"{nulls:,} row(s) of {spec.table} have a NULL in the key column(s) "
            f"{', '.join(reader.key)}; keyset chunks cannot reach them. Choose a --key of NOT "
            "NULL column(s), or exclude those rows with --where")
    columns = reader.columns
    names = {c.name for c in columns}
    tname = spec.target_table
    exists = sa.inspect(tconn).has_table(tname.name, schema=tname.schema)
    ddl: tuple[str, ...] = ()
    if exists:
        target = reflect_table(tconn, tname.name, schema=tname.schema, role="target")
        missing = [c.name for c in columns if c.name not in {t.name for t in target.columns}]
        if missing:
            raise TargetError(
                f"target table {tname} has no column(s) {', '.join(missing)}; add them, drop the "
                "table so it is created from the source, or narrow the copy with --columns")
        candidates = ([target.primary_key] if target.primary_key else []) + \
            _unique_keys(tconn, tname)
    elif not spec.create:
        raise TargetError(f"target table {tname} does not exist and --no-create was given; "
                          "create it first, or drop --no-create to create it from the source")
    else:
        pk = source.primary_key if set(source.primary_key) <= names else ()
        target = TableSchema(tname.name, columns, pk, tname.schema)
        stmts = create_table_sql(target, tconn.dialect, name=tname.name, schema=tname.schema)
        if tfam == "postgresql" and tname.schema:
            from .dialects import quote

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
                       _write_sql(spec, tconn, [c.name for c in columns], conflict))


def _write_sql(spec: SqlCopySpec, tconn: Connection, names: list[str],
               conflict: tuple[str, ...]) -> str:
    """What each chunk runs on the target, for --dry-run."""
    from .dialects import qualified, quote, write_sql

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


# -- the chunk step ------------------------------------------------------------------------

@dataclass
class _Written:
    rows: int = 0
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)
    bad: list[tuple[int, BaseException]] = dataclasses.field(default_factory=list)

    @property
    def not_kept(self) -> int:
        return self.outcomes.get("ignored", 0) + self.outcomes.get("superseded", 0)


class SqlCopyStep:
    """One chunk: read after the checkpoint → write in one target transaction → checkpoint."""

    def __init__(self, plan: SqlCopyPlan, target: TableSchema, dbs: Databases, run: JobRun,
                 *, guard: bool) -> None:
        self.plan = plan
        self.target_schema = target
        self.dbs = dbs
        self.run = run
        self.guard = guard  # delete rows a crashed run committed without their checkpoint
        self.names = tuple(c.name for c in plan.columns)
        self._key_index = [self.names.index(k) for k in plan.key]
        self._open_source(reconnect=False)
        self.target: Target = self._open_target(reconnect=False)
        self._dirty = False

    def _open_source(self, reconnect: bool) -> None:
        self.sconn = self.dbs.source(reconnect)
        self.source = SqlaKeysetSource(self.sconn, self.plan.source, key=self.plan.key,
                                       columns=self.names, where=self.plan.spec.where)
        self.sconn.rollback()

    def _open_target(self, reconnect: bool) -> Target:
        plan = self.plan
        args: dict[str, Any] = {"mode": plan.spec.mode, "conflict_key": plan.conflict_key,
                                "key": plan.key}
        if plan.target_family == "postgresql":
            name = plan.spec.target_table
            return PgTarget(self.dbs.target_pg(reconnect), TableName(name.schema or "public",
                                                                     name.name),
                            self.names, **args)
        return SqlaTarget(self.dbs.target_sa(reconnect), self.target_schema, self.names, **args)

    def _reconnect(self) -> None:
        """After a failed attempt: fresh connections (a dropped one cannot be reused)."""
        self.sconn.close()
        self._open_source(reconnect=True)
        if isinstance(self.target, SqlaTarget) or not self.target.usable():
            self.target.close()
            self.target = self._open_target(reconnect=True)
        self.run.ensure_connected()

    def close(self) -> None:
        self.sconn.close()
        self.target.close()

    @property
    def state_conn(self) -> Any:
        """The psycopg connection the checkpoint goes through: the target's when it holds the
        state store, else the state store's own."""
        if self.plan.spec.state_in_target:
            assert isinstance(self.target, PgTarget)
            return self.target.conn
        return self.run.store.conn

    def empty_target(self, cp: Checkpoint) -> None:
        """``replace`` at the start of a fresh run. With the state store elsewhere the reset
        checkpoint goes first: a crash before the rows go leaves a checkpoint without a
        chunk, and such a run empties the target again, which loses nothing."""
        spec = self.plan.spec
        if not spec.state_in_target:
            with self.run.store.conn.transaction():
                write_checkpoint(self.run.store.conn, cp, schema=spec.state_schema)
        with self.target.transaction():
            self.target.truncate()
            if spec.state_in_target:
                write_checkpoint(self.state_conn, cp, schema=spec.state_schema)

    def after_key(self, cp: Checkpoint) -> tuple[Any, ...] | None:
        if cp.last_key is None:
            return None
        return key_from_json(cp.last_key_json, self.plan.key_columns, self.plan.source_family)

    def count_remaining(self, cp: Checkpoint) -> tuple[int, bool]:
        try:
            n = self.source.count(self.after_key(cp), cap=EXACT_COUNT_ROWS + 1)
            if n <= EXACT_COUNT_ROWS:
                return n, True
            return max(n, _estimate(self.sconn, self.plan)), False
        finally:
            self.sconn.rollback()

    def __call__(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        if self._dirty:
            self._reconnect()
        try:
            return self._chunk(cp, size)
        except BaseException as exc:
            self._dirty = True
            fixed = recategorised(exc)
            if fixed is not exc:
                raise fixed from exc
            raise

    def _chunk(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        spec = self.plan.spec
        try:
            chunk = self.source.read(self.after_key(cp), size)
        finally:
            self.sconn.rollback()  # end the read: the next chunk sees the source as it is then
        if chunk is None:
            return None
        rows = chunk.rows
        removed = 0
        with self.target.transaction():
            if self.guard:
                removed = self.target.delete_keys(rows)
            written = self._write(rows, cp)
            letters = self._letters(rows, written.bad, cp.chunk_index + 1)
            key_json = key_to_json(chunk.last_key)
            outcomes = written.outcomes if spec.mode in (Mode.UPSERT, Mode.IGNORE) else {}
            nbytes = row_bytes(rows)
            # the checksum covers the chunk's keys (which rows it holds): hashing every value
            # would cost a tenth of the copy's time in Python
            keys = repr([tuple(r[i] for i in self._key_index) for r in rows]).encode()
            new = dataclasses.replace(
                cp, chunk_index=cp.chunk_index + 1,
                last_key=tuple("" if v is None else str(v) for v in key_json),
                last_key_json=key_json, processed=cp.processed + len(rows),
                succeeded=cp.succeeded + written.rows - written.not_kept,
                failed=cp.failed + len(letters), skipped=cp.skipped + written.not_kept,
                outcomes=run_result.add_counts(cp.outcomes, outcomes), bytes=cp.bytes + nbytes,
                checksum=hashlib.blake2b(keys, digest_size=16).hexdigest(),
                run_id=self.run.run_id, updated_at=utc_now())
            last_error = letters[-1]["error_message"] if letters else None
            spec.limits.check(new.failed, new.processed, last_error)
            self.run.assert_lock_held()
            if spec.state_in_target:
                insert_dead_letters(self.state_conn, letters, schema=spec.state_schema)
                write_checkpoint(self.state_conn, new, schema=spec.state_schema)
        if not spec.state_in_target:
            with self.run.store.conn.transaction():
                insert_dead_letters(self.run.store.conn, letters, schema=spec.state_schema)
                write_checkpoint(self.run.store.conn, new, schema=spec.state_schema)
        if self.guard:
            if removed:
                log.warning("removed %d row(s) that a crashed run had committed without its "
                            "checkpoint; they were written again", removed)
            else:
                self.guard = False
        errors = [RowError(item_identifier=str(r["item_key"]), error_type=r["error_type"],
                           category=r["category"], error_message=r["error_message"],
                           chunk_index=r["chunk_index"]) for r in letters]
        return StepOutcome(new, len(rows), nbytes, errors)

    def _write(self, rows: list[tuple[Any, ...]], cp: Checkpoint) -> _Written:
        """Write the chunk in a savepoint; on a data error, bisect until each bad row stands
        alone, so the good rows still commit with the chunk."""
        spec = self.plan.spec
        out = _Written()

        def write_slice(a: int | None, b: int) -> int:
            try:
                with self.target.savepoint():
                    stats = self.target.write(rows[a or 0:b])
            except Exception as exc:
                fixed = recategorised(exc)
                if fixed is not exc:
                    raise fixed from exc
                raise
            out.rows += stats.rows
            for name, n in stats.outcomes().items():
                out.outcomes[name] = out.outcomes.get(name, 0) + n
            return stats.rows

        try:
            write_slice(0, len(rows))
        except Exception as exc:
            if not is_data_error(exc):
                raise
            log.warning("rows after key %s: %s; isolating the bad rows among %d",
                        key_to_json([rows[0][i] for i in self._key_index]),
                        describe_error(exc, spec.target)[:200], len(rows))

            def give_up(n_bad: int, error: BaseException) -> None:
                spec.limits.check(cp.failed + n_bad, cp.processed + len(rows),
                                  describe_error(error, spec.target))

            found = isolate(0, len(rows), len(rows), exc, write=write_slice,
                            split=lambda a, n: (a or 0) + n, count=None, give_up=give_up,
                            locate=self.target.locate)
            out.bad = [(b.hi - 1, b.error) for b in found.bad]
        return out

    def _letters(self, rows: list[tuple[Any, ...]], bad: list[tuple[int, BaseException]],
                 chunk_index: int) -> list[dict[str, Any]]:
        spec = self.plan.spec
        out = []
        for i, error in bad:
            row = rows[i]
            etype, state = error_name(error)
            out.append({
                "job_id": spec.job_id, "run_id": self.run.run_id, "chunk_index": chunk_index,
                "item_key": [jsonable(row[k]) for k in self._key_index],
                "row_data": {n: jsonable(v) for n, v in zip(self.names, row, strict=True)},
                "error_type": etype, "sqlstate": state, "category": Category.DATA.value,
                "error_message": describe_error(error, spec.target), "attempts": 1})
        return out


def _estimate(conn: Connection, plan: SqlCopyPlan) -> int:
    """The database's own row estimate of the source table (0 when it has none)."""
    name = plan.spec.table
    if plan.source_family == "mysql":
        found = conn.exec_driver_sql(
            "SELECT TABLE_ROWS FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = COALESCE(%s, DATABASE()) AND TABLE_NAME = %s",
            (name.schema, name.name)).scalar()
    elif plan.source_family == "postgresql":
        found = conn.exec_driver_sql("SELECT reltuples::bigint FROM pg_class WHERE oid = "
                                     "to_regclass(%s)", (f'"{name.schema}"."{name.name}"',)
                                     ).scalar()
    else:
        found = 0
    return max(int(found or 0), 0)


# -- the run -------------------------------------------------------------------------------

def execute(plan: SqlCopyPlan, run: JobRun, dbs: Databases, *, progress: Progress,
            stop: StopFlag | None = None, report_path: str | None = None) -> Result:
    """Run the planned copy under ``run`` (lock held). Failures end in the Result, not raised."""
    spec = plan.spec
    stop = stop if stop is not None else StopFlag()
    result = Result(job_id=spec.job_id, run_id=run.run_id, job_type="copy", started_at=utc_now())
    result.metadata.update({
        "source": spec.source.masked, "target": spec.target.masked, "state": spec.state.masked,
        "chunk_size": spec.pacing.chunk_size or "auto", "key": list(plan.key),
        "source_database": plan.source_family, "target_database": plan.target_family,
        "copy_format": "text COPY" if plan.target_family == "postgresql" else "executemany"})
    result.artifacts["dead_letters"] = f"{spec.state_schema}.dead_letters (job_id = {spec.job_id!r})"
    result.artifacts["report"] = report_path
    t0 = time.monotonic()
    cp: Checkpoint | None = None
    retries = RetryStats()
    step: SqlCopyStep | None = None
    latest: list[Checkpoint] = []
    try:
        with dbs.target_sa() as tconn:
            target = prepare_target(plan, tconn)
        found = None if spec.restart else read_checkpoint(run.store.conn, spec.job_id,
                                                           spec.state_schema)
        if found is not None and found[1] and spec.mode is Mode.REPLACE:
            found = None  # the last replace finished: this run is a fresh one, and empties again
        cp = found[0] if found else Checkpoint(job_id=spec.job_id, chunk_index=0, last_key=None,
                                               run_id=run.run_id)
        run.begin()
        if run.stale_runs_closed:
            log.warning("closed %d run(s) of %s left open by a process that died",
                        run.stale_runs_closed, spec.job_id)
        if found is not None and cp.last_key is not None:
            log.info("resuming %s after key %s (chunk %d, %d rows done)", spec.job_id,
                     cp.last_key_json, cp.chunk_index, cp.processed)
        step = SqlCopyStep(plan, target, dbs, run,
                           guard=cp.last_key is not None and found is not None
                           and not spec.state_in_target
                           and spec.mode in (Mode.APPEND, Mode.REPLACE))
        if spec.mode is Mode.REPLACE and cp.last_key is None:
            step.empty_target(cp)  # never once a chunk is recorded: that is a resume
        remaining, exact = step.count_remaining(cp)
        progress.start(f"copy {spec.table}", cp.processed, cp.processed + remaining, exact)
        result.total_items = cp.processed + remaining
        started_at = cp.processed
        latest.append(cp)

        def after_chunk(outcome: StepOutcome) -> None:
            for error in outcome.errors:
                result.add_error(error)
            run.heartbeat()
            latest[0] = outcome.checkpoint

        loop = run_loop(step, cp, spec.pacing, stop=stop, progress=progress,
                        on_chunk=after_chunk, retry=spec.retry, retries=retries)
        cp = loop.checkpoint
        result.status, result.message = loop.status, loop.message
        result.rows_this_run = loop.rows
        result.metadata["chunk_size_last"] = loop.last_chunk_size
        if loop.status is Status.COMPLETED:
            with step.state_conn.transaction():
                write_checkpoint(step.state_conn, cp, finished=True, schema=spec.state_schema)
            result.total_items = cp.processed
            if cp.failed:
                result.status = Status.COMPLETED_WITH_ERRORS
                result.message = (f"{cp.failed:,} row(s) failed and are in the dead letters: "
                                  f"etl dlq list --job {spec.job_id}")
    except KeyboardInterrupt:
        result.status = Status.STOPPED
        result.message = "interrupted; the chunk in flight was rolled back — rerun to resume"
    except EtlError as exc:
        run_result.fail(result, exc, str(exc))
    except Exception as exc:  # driver errors: one line, masked
        run_result.fail(result, exc, describe_error(exc, spec.target))
    finally:
        if latest:
            cp = latest[0]
            # also when the run ended early: the rows of the chunks it committed
            result.rows_this_run = max(result.rows_this_run, cp.processed - started_at)
        if step is not None:
            result.metadata["zero_dates"] = step.source.zero_dates
            step.close()
    if cp is not None:
        run_result.fill_counts(result, cp)
    result.metadata["retry_attempts"] = retries.total
    result.metadata["retries_by_reason"] = dict(retries.by_reason)
    result.duration_seconds = time.monotonic() - t0
    result.completed_at = utc_now()
    try:
        run.ensure_connected()
        run.finish(result)
    except Exception as exc:  # the state store may be unreachable; the report still returns
        log.warning("could not store the report of run %s: %s", run.run_id,
                    pg.describe_error(exc, spec.state))
    progress.finish(run_result.summary_line(result))
    return result


# -- dry run -------------------------------------------------------------------------------

def _dry_run(plan: SqlCopyPlan, sconn: Connection) -> Result:
    """Plan, counts and SQL; reads both databases and the state store, writes nothing."""
    from .runner import AUTO_FIRST_CHUNK

    spec = plan.spec
    cp = None
    if not spec.restart:
        with pg.connect(spec.state, "state", autocommit=True) as stconn:
            found = read_checkpoint(stconn, spec.job_id, spec.state_schema)
            cp = found[0] if found and not (found[1] and spec.mode is Mode.REPLACE) else None
    reader = SqlaKeysetSource(sconn, plan.source, key=plan.key,
                              columns=[c.name for c in plan.columns], where=spec.where)
    after = key_from_json(cp.last_key_json, plan.key_columns, plan.source_family) \
        if cp is not None and cp.last_key is not None else None
    remaining = reader.count(after, cap=EXACT_COUNT_ROWS + 1)
    exact = remaining <= EXACT_COUNT_ROWS
    if not exact:
        remaining = max(remaining, _estimate(sconn, plan))
    sconn.rollback()
    size = spec.pacing.chunk_size or AUTO_FIRST_CHUNK
    write = plan.write_sql
    about = "" if exact else "~"
    lines = [
        f"job:          {spec.job_id}",
        f"source:       {spec.source.masked}  table {spec.table}",
        f"target:       {spec.target.masked}  table {spec.target_table}"
        + ("" if plan.target_exists else "  (missing: would be created)"),
        f"state store:  {spec.state.masked}  schema {spec.state_schema}"
        + ("  (in the target: checkpoint in each chunk's transaction)" if spec.state_in_target
           else "  (elsewhere: checkpoint after each chunk commits)"),
        f"key:          {', '.join(f'{c.name} {c.type}' for c in plan.key_columns)}",
        f"columns:      {', '.join(f'{c.name} {c.type}' for c in plan.columns)}",
        f"mode:         {spec.mode.value}",
    ]
    if cp is not None and cp.last_key is not None:
        lines.append(f"resume:       after key {cp.last_key_json} (chunk {cp.chunk_index}, "
                     f"{cp.processed:,} rows done)")
    lines.append(f"rows to copy: {about}{remaining:,}; chunk size "
                 + (f"{size:,}" if spec.pacing.chunk_size else
                    f"auto: starts at {size:,} rows and adapts toward "
                    f"{spec.pacing.chunk_seconds:g} s a chunk"))
    if plan.ddl:
        lines.append("target DDL:")
        lines.extend(f"  {stmt};" for stmt in plan.ddl)
    lines += ["chunk read SQL (per chunk):", f"  {' '.join(plan.read_sql.split())};",
              "chunk write SQL (per chunk" + (", COPY" if plan.target_family == "postgresql"
                                              else ", executemany") + "):",
              f"  {write};", "dry run: nothing was written"]
    now = utc_now()
    result = Result(job_id=spec.job_id, run_id="dry-run", job_type="copy", started_at=now,
                    completed_at=now, status=Status.COMPLETED, total_items=remaining)
    result.metadata.update({"dry_run": True, "plan": "\n".join(lines),
                            "estimated_rows": remaining, "estimate_exact": exact,
                            "chunk_size": size, "source": spec.source.masked,
                            "target": spec.target.masked})
    return result


__all__ = ["SqlCopyPlan", "SqlCopySpec", "SqlName", "copy", "execute", "make_plan"]
