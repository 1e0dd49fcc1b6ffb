"""`etl archive` of a MySQL/MariaDB table: into an archive table of the same database, or
deleted (--purge), in keyset chunks — pt-archiver's job, with etl's checkpoints, pacing,
retries and report.

Each chunk is ONE MySQL transaction, in REPEATABLE READ:

1. ``SELECT key … WHERE key > last AND (where) ORDER BY key LIMIT n FOR UPDATE`` — the
   chunk's keys. InnoDB locks every row it scans in key order up to the last of them, and
   the gaps between, so until the commit no row of the range can change, appear or go;
2. ``INSERT INTO archive (…) SELECT … WHERE key in the range AND (where)`` (not with
   --purge). If the archive already holds some of the keys (an earlier --no-delete, a
   chunk whose checkpoint was lost), the rows under them must be identical, column by
   column (``<=>``), and ``INSERT IGNORE`` keeps them; a different row stops the chunk;
3. ``DELETE … WHERE key in the range AND (where)`` (not with --no-delete); the counts of
   2 and 3 must both be the chunk's;
4. COMMIT; then the checkpoint is written in the state store (PostgreSQL). A crash between
   the two makes the rerun walk that range again: its rows are gone, or (--no-delete)
   archived identically. Never a row lost, never one archived twice.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import lifecycle
from ..dialects import TableSchema, qualified, quote, reflect_table
from ..errors import TargetError, UsageError
from ..model import Checkpoint
from ..report import Result, utc_now
from ..runner import AUTO_FIRST_CHUNK, StepOutcome, StopFlag
from ..sources.sqla import SqlaKeysetSource
from ..sql_copy import connections
from ..sql_copy import plan as sql_plan
from ..sql_copy_io import describe_error, key_from_json, key_to_json, recategorised
from ..state.store import read_checkpoint, write_checkpoint
from .plan import Action, ArchiveSpec
from .run import finish_in_store, verb_of

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from ..jobrun import JobRun
    from ..progress import Progress

log = logging.getLogger(__name__)

_DUPLICATE_KEY = 1062  # ER_DUP_ENTRY


@dataclass(frozen=True)
class MysqlArchivePlan:
    """What the job will do, read from the MySQL/MariaDB database (nothing written)."""

    spec: ArchiveSpec
    table: TableSchema
    key: tuple[str, ...]
    archive: sql_plan.SqlName | None  # None with --purge
    archive_exists: bool

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.table.columns)

    @property
    def key_columns(self) -> tuple[Any, ...]:
        return tuple(self.table.column(k) for k in self.key)

    def lower(self, cp: Checkpoint) -> tuple[Any, ...] | None:
        """The checkpoint's key as the source's values (None: from the first key)."""
        if cp.last_key is None or cp.last_key_json is None:
            return None
        return tuple(key_from_json(cp.last_key_json, self.key_columns, "mysql"))


class _Sql:
    """The statements of a chunk, in the connection's dialect (``%s`` parameters)."""

    def __init__(self, conn: Connection, plan: MysqlArchivePlan) -> None:
        d = conn.dialect
        self.q = lambda n: quote(d, n)
        self.table = qualified(d, plan.table.name, plan.table.schema)
        self.archive = qualified(d, plan.archive.name, plan.archive.schema) if plan.archive else ""
        self.key = plan.key
        self.cols = ", ".join(self.q(c) for c in plan.columns)
        self.keys = ", ".join(self.q(k) for k in plan.key)
        self.where = f"({plan.spec.where.replace('%', '%%')})"

    def after(self, prefix: str = "") -> str:
        """``key > (%s, …)`` in the index-friendly expanded form MySQL optimises."""
        return self._compare(">", prefix)

    def upto(self, prefix: str = "") -> str:
        return self._compare("<=", prefix)

    def _compare(self, op: str, prefix: str) -> str:
        strict = op.rstrip("=")
        parts = []
        for i, k in enumerate(self.key):
            eq = [f"{prefix}{self.q(e)} = %s" for e in self.key[:i]]
            last = f"{prefix}{self.q(k)} {op if i == len(self.key) - 1 else strict} %s"
            parts.append("(" + " AND ".join([*eq, last]) + ")")
        return "(" + " OR ".join(parts) + ")"

    @staticmethod
    def params(values: Sequence[Any]) -> list[Any]:
        """The parameters of ``after``/``upto``: the key prefix for each disjunct."""
        return [v for i in range(len(values)) for v in values[:i + 1]]

    def bound(self, has_lower: bool) -> str:
        cond = f"{self.after()} AND {self.where}" if has_lower else self.where
        return (f"SELECT {self.keys} FROM {self.table} WHERE {cond} ORDER BY {self.keys} "
                "LIMIT %s FOR UPDATE")

    def range(self, has_lower: bool) -> str:
        return (f"{self.after()} AND " if has_lower else "") + f"{self.upto()} AND {self.where}"

    def insert(self, has_lower: bool, ignore: bool = False) -> str:
        return (f"INSERT {'IGNORE ' if ignore else ''}INTO {self.archive} ({self.cols}) "
                f"SELECT {self.cols} FROM {self.table} WHERE {self.range(has_lower)}")

    def differing(self, has_lower: bool, columns: Sequence[str]) -> str:
        on = " AND ".join(f"a.{self.q(k)} = s.{self.q(k)}" for k in self.key)
        same = " AND ".join(f"a.{self.q(c)} <=> s.{self.q(c)}" for c in columns)
        return (f"SELECT count(*) FROM {self.archive} AS a JOIN (SELECT {self.cols} FROM "
                f"{self.table} WHERE {self.range(has_lower)}) AS s ON {on} WHERE NOT ({same})")

    def delete(self, has_lower: bool) -> str:
        return f"DELETE FROM {self.table} WHERE {self.range(has_lower)}"


def check_options(spec: ArchiveSpec, replica: object) -> None:
    """What a MySQL/MariaDB source supports: a table of the same database, or --purge."""
    if spec.to_dir is not None or not spec.same_database:
        raise UsageError("a MySQL/MariaDB table is archived into a table of the same database "
                         "(--to-table) or purged (--purge); --to and --to-dir need a "
                         "PostgreSQL source for now")
    if spec.drop_partitions:
        raise UsageError("--drop-partitions works on PostgreSQL tables")
    if replica:
        raise UsageError("--replica measures a PostgreSQL standby's lag; it does not apply to "
                         "a MySQL/MariaDB source")


def make_plan(spec: ArchiveSpec, dbs: connections.Databases) -> MysqlArchivePlan:
    """Reflect the table, check the key and --where, find (or plan) the archive table."""
    import sqlalchemy as sa

    archive = spec.dest_table if spec.action is not Action.PURGE else None
    with dbs.source() as conn:
        table = reflect_table(conn, spec.table.name, schema=spec.table.schema or None,
                              role="source")
        reader = SqlaKeysetSource(conn, table, key=spec.key, where=spec.where)
        try:
            reader.count(cap=0)  # --where runs once on no rows: a typo stops here
        except sa.exc.DBAPIError as exc:
            raise UsageError(f"--where {spec.where!r} is not valid on {spec.table.name}: "
                             f"{describe_error(exc, spec.source)}") from exc
        if not table.primary_key or not set(table.primary_key) <= set(reader.key):
            raise UsageError(f"--key {','.join(reader.key)} does not hold {table.name}'s primary "
                             "key; a MySQL/MariaDB table is archived in chunks of its primary "
                             "key (or of columns that include it)")
        exists = False
        if archive is not None:
            if archive.name == table.name and archive.schema == (spec.table.schema or None):
                raise UsageError(f"--to-table {archive} is the table being archived; name another "
                                 f"table (e.g. {table.name}_archive)")
            exists = sa.inspect(conn).has_table(archive.name, schema=archive.schema)
            if exists:
                have = {c.name for c in reflect_table(conn, archive.name, schema=archive.schema,
                                                      role="target").columns}
                missing = [c.name for c in table.columns if c.name not in have]
                if missing:
                    raise TargetError(f"archive table {archive} has no column(s) "
                                      f"{', '.join(missing)}; add them, or drop it to have it "
                                      f"created like {table.name}")
            elif not spec.create:
                raise TargetError(f"archive table {archive} does not exist and --no-create was "
                                  "given; create it first, or drop --no-create")
        conn.rollback()
    return MysqlArchivePlan(spec, table, reader.key, archive, exists)


class MysqlArchiveStep:
    """One chunk: one MySQL transaction (see the module), then the checkpoint."""

    def __init__(self, plan: MysqlArchivePlan, dbs: connections.Databases, run: JobRun) -> None:
        self.plan = plan
        self.dbs = dbs
        self.run = run
        self.longest_transaction = 0.0
        self.conn = self._connect(reconnect=False)
        self.sql = _Sql(self.conn, plan)

    def _connect(self, reconnect: bool) -> Connection:
        conn = self.dbs.source(reconnect=reconnect)
        conn.exec_driver_sql("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        wait = max(1, round(self.plan.spec.lock_timeout or 50))
        conn.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {wait}")
        if self.plan.spec.timezone != "UTC":
            conn.exec_driver_sql("SET time_zone = %s", (self.plan.spec.timezone,))
        conn.commit()
        return conn

    def ensure_connected(self) -> None:
        if self.conn.closed or self.conn.invalidated:
            log.info("reconnecting to the source database")
            self.conn = self._connect(reconnect=True)
        self.run.ensure_connected()

    def metadata(self) -> dict[str, Any]:
        return {"longest_transaction_seconds": round(self.longest_transaction, 3)}

    def close(self) -> None:
        self.conn.close()

    def __call__(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        spec, s = self.plan.spec, self.sql
        self.ensure_connected()
        lower = self.plan.lower(cp)
        has_lower = lower is not None
        before = s.params(lower) if lower is not None else []
        t0 = time.monotonic()
        try:
            with self.conn.begin():
                keys = self.conn.exec_driver_sql(s.bound(has_lower), (*before, size)).fetchall()
                if not keys:
                    return None
                last = tuple(keys[-1])
                params = (*before, *s.params(last))
                inserted = already = 0
                if spec.action is not Action.PURGE:
                    inserted, already = self._archive(has_lower, params, len(keys))
                if spec.action is not Action.NO_DELETE:
                    deleted = self.conn.exec_driver_sql(s.delete(has_lower), params).rowcount
                    if deleted != len(keys):  # pragma: no cover - the range is locked
                        raise TargetError(f"deleted {deleted} rows of a {len(keys)}-row chunk")
                self.run.assert_lock_held()
        except (TargetError, UsageError):
            raise
        except Exception as exc:
            err = recategorised(exc)
            if err is exc:
                raise
            raise err from exc
        finally:
            self.longest_transaction = max(self.longest_transaction, time.monotonic() - t0)
        new = self._checkpoint(cp, last, len(keys), inserted, already)  # committed: now its state
        with self.run.store.conn.transaction():
            write_checkpoint(self.run.store.conn, new, schema=spec.state_schema)
        return StepOutcome(new, len(keys), 0)

    def _archive(self, has_lower: bool, params: tuple[Any, ...], rows: int) -> tuple[int, int]:
        """Insert the range's rows into the archive; (inserted, already there identically)."""
        import sqlalchemy as sa

        s = self.sql
        try:
            with self.conn.begin_nested():
                inserted = self.conn.exec_driver_sql(s.insert(has_lower), params).rowcount
            already = 0
        except sa.exc.DBAPIError as exc:
            orig = getattr(exc, "orig", None)
            if not (orig is not None and orig.args and orig.args[0] == _DUPLICATE_KEY):
                raise
            differ = self.conn.exec_driver_sql(s.differing(has_lower, self.plan.columns),
                                               params).scalar_one()
            if differ:
                raise TargetError(
                    f"the archive table {self.plan.archive} already holds {differ} key(s) of "
                    f"this chunk with other values; the chunk was rolled back and its rows stay "
                    f"in {self.plan.table.name} — compare them, move the archive's rows aside, "
                    "and rerun: the job resumes at this chunk") from None
            inserted = self.conn.exec_driver_sql(s.insert(has_lower, ignore=True), params).rowcount
            already = rows - inserted
        if inserted + already != rows:  # pragma: no cover - the range is locked
            raise TargetError(f"archived {inserted + already} rows of a {rows}-row chunk")
        return inserted, already

    def _checkpoint(self, cp: Checkpoint, last: tuple[Any, ...], rows: int, inserted: int,
                    already: int) -> Checkpoint:
        action = self.plan.spec.action
        outcomes = {"deleted": rows} if action is Action.PURGE else \
            {"archived": inserted, "already_archived": already}
        succeeded = inserted if action is Action.NO_DELETE else rows
        key_json = key_to_json(last)
        return dataclasses.replace(
            cp, chunk_index=cp.chunk_index + 1,
            last_key=tuple("" if v is None else str(v) for v in key_json),
            last_key_json=key_json, processed=cp.processed + rows,
            succeeded=cp.succeeded + succeeded,
            skipped=cp.skipped + (already if action is Action.NO_DELETE else 0),
            outcomes={k: cp.outcomes.get(k, 0) + outcomes.get(k, 0)
                      for k in {**cp.outcomes, **outcomes}},
            run_id=self.run.run_id, updated_at=utc_now())


def _metadata(plan: MysqlArchivePlan) -> dict[str, Any]:
    spec = plan.spec
    return {"source": spec.source.masked,
            "target": None if spec.action is Action.PURGE else spec.source.masked,
            "archive_table": str(plan.archive) if plan.archive else None,
            "state": spec.state.masked, "action": spec.action.value, "where": spec.where,
            "chunk_size": spec.pacing.chunk_size or "auto", "key": list(plan.key),
            "source_database": "mysql"}


def _prepare_archive(plan: MysqlArchivePlan, conn: Connection) -> None:
    """``CREATE TABLE archive LIKE table`` when it is missing (columns, keys and indexes)."""
    if plan.archive is None or plan.archive_exists:
        return
    d = conn.dialect
    log.info("creating archive table %s like %s", plan.archive, plan.table.name)
    conn.exec_driver_sql(f"CREATE TABLE IF NOT EXISTS "
                         f"{qualified(d, plan.archive.name, plan.archive.schema)} LIKE "
                         f"{qualified(d, plan.table.name, plan.table.schema)}")
    conn.commit()


def execute(plan: MysqlArchivePlan, run: JobRun, dbs: connections.Databases, *,
            progress: Progress, stop: StopFlag | None = None,
            report_path: str | None = None) -> Result:
    """Run the planned job under ``run`` (lock held); failures end in the Result."""
    spec = plan.spec
    result = Result(job_id=spec.job_id, run_id=run.run_id, job_type="archive",
                    started_at=utc_now())
    result.metadata.update(_metadata(plan))
    result.artifacts["report"] = report_path

    def start() -> lifecycle.Start:
        step = MysqlArchiveStep(plan, dbs, run)
        _prepare_archive(plan, step.conn)
        found = None if spec.restart else read_checkpoint(run.store.conn, spec.job_id,
                                                           spec.state_schema)
        if found is not None and found[1] and spec.action is not Action.NO_DELETE:
            found = None  # a finished walk: a new one from the first key
        cp = found[0] if found else Checkpoint(job_id=spec.job_id, chunk_index=0, last_key=None,
                                               run_id=run.run_id)
        after = plan.lower(cp)
        reader = SqlaKeysetSource(step.conn, plan.table, key=plan.key, where=spec.where)
        remaining = reader.count(after)
        step.conn.rollback()
        return lifecycle.Start(step, cp, found is not None, f"archive {plan.table.name}",
                               remaining)

    return lifecycle.execute(run, result, start=start, finish=finish_in_store(run, spec),
                             pacing=spec.pacing, retry=spec.retry, progress=progress,
                             stop=stop if stop is not None else StopFlag(), state=spec.state,
                             describe=lambda exc: describe_error(exc, spec.source),
                             verb=verb_of(spec.action))


def dry_run(plan: MysqlArchivePlan, dbs: connections.Databases) -> Result:
    """How many rows match, the statements of a chunk and the EXPLAIN of its SELECT."""
    spec = plan.spec
    size = spec.pacing.chunk_size or AUTO_FIRST_CHUNK
    with dbs.source() as conn:
        reader = SqlaKeysetSource(conn, plan.table, key=plan.key, where=spec.where)
        remaining = reader.count()
        s = _Sql(conn, plan)
        explain = [" | ".join(str(v) for v in r) for r in conn.exec_driver_sql(
            "EXPLAIN " + s.bound(False).replace(" FOR UPDATE", "").replace("%%", "%"),
            (size,)).fetchall()]
        conn.rollback()
    statements = [f"  {s.bound(True)};"]
    if spec.action is not Action.PURGE:
        statements.append(f"  {s.insert(True)};")
    if spec.action is not Action.NO_DELETE:
        statements.append(f"  {s.delete(True)};")
    chunks = -(-remaining // size) if remaining else 0
    text = "\n".join([
        f"job:          {spec.job_id}",
        f"source:       {spec.source.masked}  table {plan.table.name}",
        "archive to:   " + ("nowhere (--purge: deleted only)" if plan.archive is None else
                             f"table {plan.archive}"
                             + ("" if plan.archive_exists else "  (missing: would be created "
                                f"LIKE {plan.table.name})")),
        f"action:       {spec.action.value}  (one transaction a chunk: lock, archive, delete; "
        "then the checkpoint)",
        f"where:        {spec.where}",
        f"key:          {', '.join(plan.key)}",
        f"state store:  {spec.state.masked}  schema {spec.state_schema}",
        f"rows matching: {remaining:,} in ~{chunks:,} chunk(s) of {size:,}",
        "chunk SQL (per chunk, one transaction):", *statements,
        "EXPLAIN of the first chunk's SELECT:", *(f"  {line}" for line in explain),
        "dry run: nothing was written"]).replace("%%", "%")
    return Result.dry_run(spec.job_id, "archive", text, remaining, **{
        **_metadata(plan), "estimated_rows": remaining, "chunk_size": size,
        "estimated_chunks": chunks})


def copy_spec(spec: ArchiveSpec) -> sql_plan.SqlCopySpec:
    """The cross-database copy's spec of the source (its engines and connections)."""
    name = sql_plan.SqlName(spec.table.schema or None, spec.table.name)
    return sql_plan.SqlCopySpec(source=spec.source, target=spec.source, state=spec.state,
                                table=name, target_table=name, job_id=spec.job_id, key=spec.key,
                                where=spec.where, lock_timeout=spec.lock_timeout)
