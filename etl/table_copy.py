"""`etl copy` between PostgreSQL databases: plan, prepare the target, run the chunks.

Fast path: each keyset chunk moves as binary COPY data from the source
straight into COPY FROM STDIN on the target, without decoding values. The
chunk's checkpoint is written in the target transaction that holds its rows
when the state store lives in the target database (the default).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import catalog, incremental, naming, pg, run_result, transforms
from .errors import EtlError, TargetError, UsageError, sqlstate_of
from .isolate import BadRange, is_data_error, isolate
from .model import Category, Checkpoint, Column, Mode, Status, TableName
from .piecewise import PiecewiseWriter
from .report import Result, RowError, utc_now
from .retry import RetryPolicy, RetryStats
from .runner import Pacing, StepOutcome, StopFlag, run_loop
from .sinks.pg_copy import PgCopySink, WriteStats
from .sinks.pg_merge import PgMergeSink
from .sources.pg import Bound, KeysetQuery, PgKeysetSource, Piece
from .state.store import insert_dead_letters, read_checkpoint, write_checkpoint
from .thresholds import ErrorLimits
from .transforms import Transform
from .urls import DbUrl

log = logging.getLogger(__name__)

# A chunk waits this long for a lock on the target before the attempt fails and is retried
# (as pt-archiver does): long enough for ordinary row locks, short enough not to queue
# behind a migration's ACCESS EXCLUSIVE lock and block everyone else.
DEFAULT_LOCK_TIMEOUT_SECONDS = 5.0

# After a data error, chunks are written as COPY statements of this many rows, each in a
# savepoint of the chunk's transaction: a failed statement wastes at most this much work,
# and a statement boundary costs a round trip where a smaller chunk would cost a commit.
PIECE_ROWS_AFTER_DATA_ERRORS = 10_000

# Serialises the creation of target tables, schemas and types by concurrent etl processes.
_TARGET_DDL_LOCK_ID = 0x6574_6C5F_6464_6C  # "etl_ddl"

if TYPE_CHECKING:
    import psycopg

    from .jobrun import JobRun
    from .progress import Progress


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
        if self.lock_timeout is None:
            return {}
        return {"lock_timeout": f"{max(int(self.lock_timeout * 1000), 1)}ms"}

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


@dataclass
class _Written:
    """What went into the target for one chunk, and the ranges that would not."""

    rows: int
    bytes: int
    checksum: str
    bad: list[BadRange[Bound]] = dataclasses.field(default_factory=list)
    last_error: str | None = None
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)
    letters: list[dict] = dataclasses.field(default_factory=list)  # dead letters built already
    dropped: int = 0              # rows a transform left out

    @property
    def not_kept(self) -> int:
        """Rows written but not kept: their key existed (ignore) or a later row of the
        chunk had the same key."""
        return self.outcomes.get("ignored", 0) + self.outcomes.get("superseded", 0)


class CopyStep:
    """One chunk: bound → COPY out → COPY in → checkpoint, committed together.

    Before each attempt, connections the server or network dropped are opened
    again (and the job lock re-taken), so a retried chunk starts clean.
    """

    def __init__(self, plan: CopyPlan, sconn: psycopg.Connection, tconn: psycopg.Connection,
                 run: JobRun, *, replay_guard: bool) -> None:
        self.plan = plan
        self.run = run
        self.replay_guard = replay_guard
        self.piece_rows: int | None = None  # set once the run meets a data error
        self._piecewise: PiecewiseWriter | None = None
        self._frame_sinks: dict[tuple[str, ...], PgCopySink | PgMergeSink] = {}
        # upsert/ignore read each chunk in key order: of rows sharing a target key, the
        # last in key order wins
        self.ordered = plan.spec.mode in (Mode.UPSERT, Mode.IGNORE)
        self.source = PgKeysetSource(sconn, plan.query, binary=plan.binary, ordered=self.ordered)
        self._use_target(tconn)

    def _use_target(self, tconn: psycopg.Connection) -> None:
        self.tconn = tconn
        spec = self.plan.spec
        self.sink: PgCopySink | PgMergeSink
        if spec.mode in (Mode.UPSERT, Mode.IGNORE):
            self.sink = PgMergeSink(tconn, spec.target_table, self.plan.write_columns,
                                    self.plan.conflict_key, spec.mode, binary=self.plan.binary,
                                    unique_rows=self.plan.conflict_on_key)
        else:
            self.sink = PgCopySink(tconn, spec.target_table, self.plan.write_columns,
                                   binary=self.plan.binary)

    def ensure_connected(self) -> None:
        spec = self.plan.spec
        if not pg.is_usable(self.source.conn):
            log.info("reconnecting to the source database")
            self.source = PgKeysetSource(
                pg.connect(spec.source, "source", autocommit=True, reconnect=True),
                self.plan.query, binary=self.plan.binary, ordered=self.ordered)
        if not pg.is_usable(self.tconn):
            log.info("reconnecting to the target database")
            self._use_target(pg.connect(spec.target, "target", autocommit=True, reconnect=True,
                                        settings=spec.target_settings))
        self.run.ensure_connected()

    def close(self) -> None:
        if self._piecewise is not None:
            self._piecewise.close()
        for conn in (self.source.conn, self.tconn):
            conn.close()

    def __call__(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        spec = self.plan.spec
        self.ensure_connected()
        lower = Bound(cp.last_key, cp.last_key_json) if cp.last_key is not None else None
        with self.source.conn.transaction():
            bound = self.source.next_bound(cp.last_key, size)
            if bound is None:
                return None
            with self.tconn.transaction():
                replayed = self._delete_replayed(cp.last_key, bound.text) \
                    if self.replay_guard else 0
                written = self._write(lower, bound, cp)
                dead = self._dead_letters(written.bad, cp.chunk_index + 1)
                dead.append([{**r, "chunk_index": cp.chunk_index + 1} for r in written.letters])
                failed = sum(len(d) for d in dead)
                new = dataclasses.replace(
                    cp, chunk_index=cp.chunk_index + 1, last_key=bound.text,
                    last_key_json=bound.json,
                    processed=cp.processed + written.rows + failed + written.dropped,
                    succeeded=cp.succeeded + written.rows - written.not_kept,
                    failed=cp.failed + failed,
                    skipped=cp.skipped + written.not_kept + written.dropped,
                    outcomes=run_result.add_counts(cp.outcomes, written.outcomes),
                    bytes=cp.bytes + written.bytes, checksum=written.checksum,
                    run_id=self.run.run_id, updated_at=utc_now())
                spec.limits.check(new.failed, new.processed, written.last_error)
                records = [r for d in dead for r in d]
                self.run.assert_lock_held()
                if spec.state_in_target:
                    insert_dead_letters(self.tconn, records, schema=spec.state_schema)
                    write_checkpoint(self.tconn, new, schema=spec.state_schema)
        if not spec.state_in_target:
            with self.run.store.conn.transaction():
                insert_dead_letters(self.run.store.conn, records, schema=spec.state_schema)
                write_checkpoint(self.run.store.conn, new, schema=spec.state_schema)
        # the lost chunk may have been larger than this one: guard until a range held nothing
        self.replay_guard = self.replay_guard and replayed > 0
        errors = [RowError(item_identifier=json.dumps(r["item_key"], default=str),
                           error_type=r["error_type"], category=r["category"],
                           error_message=r["error_message"], chunk_index=r["chunk_index"])
                  for r in records]
        return StepOutcome(new, written.rows + failed, written.bytes, errors)

    def _write(self, lower: Bound | None, upper: Bound, cp: Checkpoint) -> _Written:
        """COPY the chunk; on a data error, isolate the bad rows so the good ones still go in.

        The chunk goes as one COPY statement until the run meets its first bad row.
        From then on (unique keys), chunks are written as statements of
        ``piece_rows`` rows cut from one source stream, each in a savepoint and kept
        in memory until it is written, so a bad row costs one failed statement of a
        piece and is isolated in memory. Other keys are bisected by key range.
        """
        if self.plan.spec.transform is not None:
            return self._write_transformed(lower, upper, cp)
        out = _Written(rows=0, bytes=0, checksum="")
        digest = hashlib.blake2b(digest_size=16)

        def write_range(lo: Bound | None, hi: Bound) -> int:
            return self._commit_piece(self.sink.write, self.source.copy_out(lo.text if lo else None, hi),
                                      out, digest)

        if self.piece_rows is None:
            try:
                out.rows = write_range(lower, upper)
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                if not self.plan.unique_key:
                    self._bisect_by_key(lower, upper, exc, write_range, cp, out)
                else:
                    log.info("bad rows found: from here on chunks are written as COPY "
                             "statements of %d rows, so the next bad row costs little",
                             PIECE_ROWS_AFTER_DATA_ERRORS)
                    self.piece_rows = PIECE_ROWS_AFTER_DATA_ERRORS
        if self.piece_rows is not None and not out.rows and not out.bad:
            self._write_pieces(lower, upper, cp, out, digest)
        if out.bad:
            out.last_error = pg.describe_error(out.bad[-1].error, self.plan.spec.target)
        out.checksum = digest.hexdigest()
        return out

    def _commit_piece(self, write: Callable[[Any], WriteStats], data: Any, out: _Written,
                      digest: Any) -> int:
        """Write in a savepoint: a failure undoes this piece only."""
        with self.tconn.transaction():
            stats = write(data)
        return self._count_piece(stats, out, digest)

    @staticmethod
    def _count_piece(stats: WriteStats, out: _Written, digest: Any) -> int:
        for name, n in (stats.outcomes or {}).items():
            out.outcomes[name] = out.outcomes.get(name, 0) + n
        out.bytes += stats.bytes
        digest.update(bytes.fromhex(stats.checksum))
        return stats.rows

    def _write_pieces(self, lower: Bound | None, upper: Bound, cp: Checkpoint, out: _Written,
                      digest: Any) -> None:
        """The chunk as COPY statements of ``piece_rows`` rows (etl.piecewise); a refused
        piece is isolated in memory, and each bad row's key is read from its own bytes."""
        spec = self.plan.spec
        bad: list[tuple[bytes, BaseException]] = []  # the row's COPY data, error

        def written(piece: Piece, stats: WriteStats) -> None:
            out.rows += self._count_piece(stats, out, digest)

        def refused(piece: Piece, offset: int, exc: BaseException) -> None:
            def give_up(n_bad: int, error: BaseException) -> None:
                spec.limits.check(cp.failed + len(bad) + n_bad, cp.processed + offset + len(piece),
                                  pg.describe_error(error, spec.target))

            def write_slice(a: int | None, b: int) -> int:
                return self._commit_piece(self.sink.write_rows, piece.rows(a or 0, b), out, digest)

            found = isolate(0, len(piece), len(piece), exc, write=write_slice,
                            split=lambda a, n: (a or 0) + n, count=None,
                            give_up=give_up, locate=pg.copy_error_line)
            out.rows += found.good_rows
            bad.extend((piece.rows(b.hi - 1, b.hi), b.error) for b in found.bad)

        with self.source.row_stream(lower.text if lower else None, upper) as stream:
            self._pieces().write(stream, on_written=written, on_refused=refused)
        # the source stream is finished: now its connection can look up the bad rows
        keys = self.source.keys_of_rows([row for row, _ in bad])
        originals = self.source.rows_by_key(keys)
        names = [k.name for k in self.plan.key]
        for (_, error), key, row in zip(bad, keys, originals, strict=True):
            out.letters.append({
                "job_id": spec.job_id, "run_id": self.run.run_id,
                "item_key": [(row or {}).get(n, v) for n, v in zip(names, key, strict=True)],
                "row_data": row, "error_type": type(error).__name__,
                "sqlstate": sqlstate_of(error), "category": Category.DATA.value,
                "error_message": pg.describe_error(error, spec.target), "attempts": 1})
            out.last_error = out.letters[-1]["error_message"]

    def _pieces(self) -> PiecewiseWriter:
        assert self.piece_rows is not None
        if self._piecewise is None or self._piecewise.conn is not self.tconn:
            if self._piecewise is not None:
                self._piecewise.close()
            self._piecewise = PiecewiseWriter(self.tconn, self.sink.start, self.piece_rows)
        return self._piecewise

    def _write_transformed(self, lower: Bound | None, upper: Bound, cp: Checkpoint) -> _Written:
        """Decode the chunk, run the transform, write its result as CSV COPY in a savepoint;
        rows the transform rejects and rows the target refuses become dead letters."""
        spec = self.plan.spec
        assert spec.transform is not None
        out = _Written(rows=0, bytes=0, checksum="")
        digest = hashlib.blake2b(digest_size=16)
        key = tuple(k.name for k in self.plan.key)
        applied = transforms.apply(spec.transform, self.source.fetch_frame(lower, upper), key,
                                   spec.transform_name or "transform")
        kept = applied.kept.rename({k: v for k, v in self.plan.renamed.items()
                                    if k in applied.kept.columns})
        sink = self._frame_sink(tuple(kept.columns))

        def write_slice(a: int | None, b: int) -> int:
            start = a or 0
            data = kept.slice(start, b - start).write_csv(include_header=False).encode()
            return self._commit_piece(sink.write, [data], out, digest)

        bad: list[tuple[int, BaseException]] = []
        if kept.height:
            try:
                out.rows = write_slice(0, kept.height)
            except Exception as exc:
                if not is_data_error(exc):
                    raise

                def give_up(n_bad: int, error: BaseException) -> None:
                    spec.limits.check(cp.failed + len(applied.rejected) + n_bad,
                                      cp.processed + kept.height, pg.describe_error(error))

                found = isolate(0, kept.height, kept.height, exc, write=write_slice,
                                split=lambda a, n: (a or 0) + n, count=None, give_up=give_up,
                                locate=pg.copy_error_line)
                out.rows = found.good_rows
                bad = [(b.hi - 1, b.error) for b in found.bad]
        failures = [(tuple(kept.select(list(key)).row(i)), Category.DATA, type(e).__name__,
                     sqlstate_of(e), pg.describe_error(e, spec.target)) for i, e in bad]
        failures += [(tuple(k[name] for name in key), Category.VALIDATION, "Rejected", None,
                      reason) for k, reason in applied.rejected]
        originals = self.source.rows_by_key([f[0] for f in failures])
        out.letters = [{
            "job_id": spec.job_id, "run_id": self.run.run_id,
            "item_key": [(row or {}).get(k, v) for k, v in zip(key, keyv, strict=True)],
            "row_data": row, "error_type": etype, "sqlstate": state, "category": cat.value,
            "error_message": message, "attempts": 1,
        } for (keyv, cat, etype, state, message), row in zip(failures, originals, strict=True)]
        out.dropped = applied.dropped
        if failures:
            out.last_error = failures[-1][4]
        out.checksum = digest.hexdigest()
        return out

    def _frame_sink(self, names: tuple[str, ...]) -> PgCopySink | PgMergeSink:
        """A CSV COPY sink for a transform's result columns (checked against the target)."""
        spec = self.plan.spec
        cached = self._frame_sinks.get(names)
        if cached is not None and cached.conn is self.tconn:
            return cached
        known = {c.name: c for c in self.plan.target_columns}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise TargetError(
                f"the transform returns column(s) {', '.join(unknown)} that {spec.target_table} "
                "does not have; add them to the target table (create it first), or drop them "
                "in the transform")
        cols = tuple(known[n] for n in names)
        sink: PgCopySink | PgMergeSink
        if spec.mode in (Mode.UPSERT, Mode.IGNORE):
            sink = PgMergeSink(self.tconn, spec.target_table, cols, self.plan.conflict_key,
                               spec.mode, csv=True, unique_rows=self.plan.conflict_on_key)
        else:
            sink = PgCopySink(self.tconn, spec.target_table, cols, csv=True)
        self._frame_sinks[names] = sink
        return sink

    def _bisect_by_key(self, lo: Bound | None, hi: Bound, exc: Exception,
                       write_range: Callable[[Bound | None, Bound], int], cp: Checkpoint,
                       out: _Written) -> None:
        """Keys that are not unique: halve the key range until each bad key stands alone."""
        spec = self.plan.spec
        rows = self.source.count_range(lo, hi)
        log.warning("rows after key %s: %s; isolating the bad rows among %d",
                    lo.json if lo else "(start)", pg.describe_error(exc)[:200], rows)

        def give_up(bad: int, error: BaseException) -> None:
            # already over a threshold even if every other row of the range is good
            spec.limits.check(cp.failed + bad, cp.processed + rows,
                              pg.describe_error(error, spec.target))

        found = isolate(lo, hi, rows, exc, write=write_range,
                        split=lambda a, n: self._split(a, n),
                        count=self.source.count_range, give_up=give_up)
        out.rows += found.good_rows
        out.bad.extend(found.bad)

    def _split(self, lower: Bound | None, n: int) -> Bound:
        bound = self.source.next_bound(lower.text if lower else None, n)
        assert bound is not None, "a non-empty range has a bound"
        return bound

    def _dead_letters(self, bad: list[BadRange[Bound]], chunk_index: int) -> list[list[dict]]:
        """The rows of each bad range, as dead-letter records (original source values)."""
        spec = self.plan.spec
        out = []
        for item in bad:
            message = pg.describe_error(item.error, spec.target)
            out.append([{
                "job_id": spec.job_id, "run_id": self.run.run_id, "chunk_index": chunk_index,
                "item_key": key, "row_data": row, "error_type": type(item.error).__name__,
                "sqlstate": sqlstate_of(item.error), "category": Category.DATA.value,
                "error_message": message, "attempts": 1,
            } for row, key in self.source.rows_as_json(item.lo, item.hi)])
        return out

    def _delete_replayed(self, lower: tuple[str, ...] | None, upper: tuple[str, ...]) -> int:
        """State elsewhere: rows of a chunk whose checkpoint was lost are removed, then
        rewritten; returns how many there were."""
        target_key = tuple(c for c in self.plan.write_columns
                           if c.name in {self.plan.renamed.get(k.name, k.name) for k in self.plan.key})
        q = dataclasses.replace(self.plan.query, table=self.plan.spec.target_table, key=target_key,
                                source_sql=None, where=None)
        return max(self.tconn.execute(q.delete_range_sql(lower is not None),
                                      q.params(lower, upper)).rowcount, 0)


def execute(plan: CopyPlan, run: JobRun, sconn: psycopg.Connection, tconn: psycopg.Connection,
            *, progress: Progress, stop: StopFlag | None = None,
            report_path: str | None = None) -> Result:
    """Run the planned copy under ``run`` (lock held). Failures end in the Result, not raised."""
    spec = plan.spec
    stop = stop if stop is not None else StopFlag()
    result = Result(job_id=spec.job_id, run_id=run.run_id, job_type="copy", started_at=utc_now())
    result.metadata.update({"source": spec.source.masked, "target": spec.target.masked,
                            "state": spec.state.masked,
                            "chunk_size": spec.pacing.chunk_size or "auto",
                            "key": [k.name for k in plan.key],
                            "copy_format": "binary" if plan.binary else "text"})
    result.artifacts["dead_letters"] = f"{spec.state_schema}.dead_letters (job_id = {spec.job_id!r})"
    result.artifacts["report"] = report_path
    t0 = time.monotonic()
    cp: Checkpoint | None = None
    retries = RetryStats()
    step: CopyStep | None = None
    try:
        prepare_target(tconn, plan)
        # --restart (and a replace after a finished run) start from nothing, but the old
        # checkpoint stays until the first chunk's transaction overwrites it: a restart
        # that fails before then leaves the job resumable as it was
        found = None if spec.restart else read_checkpoint(run.store.conn, spec.job_id,
                                                           spec.state_schema)
        if found is not None and found[1] and spec.mode is Mode.REPLACE:
            found = None  # the last replace finished: this run is a fresh one, and empties again
        watermark: dict[str, Any] | None = None
        if spec.since_column:
            if found is None or found[1] or found[0].watermark is None:
                # a new walk over the rows changed since the last finished one
                watermark = incremental.begin(sconn, plan, found[0].watermark if found else None)
                found = None
            else:
                watermark = found[0].watermark
            plan = incremental.restrict(plan, watermark)
            result.metadata["watermark"] = {k: watermark[k] for k in ("column", "from", "next")}
        resuming = found is not None
        cp = found[0] if found else Checkpoint(job_id=spec.job_id, chunk_index=0, last_key=None,
                                               run_id=run.run_id, watermark=watermark)
        run.begin()
        if run.stale_runs_closed:
            log.warning("closed %d run(s) of %s left open by a process that died",
                        run.stale_runs_closed, spec.job_id)
        if resuming and cp.last_key is not None:
            log.info("resuming %s after key %s (chunk %d, %d rows done)", spec.job_id,
                     cp.last_key_json, cp.chunk_index, cp.processed)
        if spec.mode is Mode.REPLACE and not resuming:
            with tconn.transaction():  # emptied once per fresh run, recorded with the checkpoint
                PgCopySink(tconn, spec.target_table, plan.columns).truncate()
                write_checkpoint(tconn if spec.state_in_target else run.store.conn, cp,
                                 schema=spec.state_schema)
        remaining, exact = count_remaining(sconn, plan, cp.last_key)
        progress.start(f"copy {spec.source_name}", cp.processed, cp.processed + remaining, exact)
        result.total_items = cp.processed + remaining
        latest = [cp]  # the last committed checkpoint, also when the loop raises

        def after_chunk(outcome: StepOutcome) -> None:
            latest[0] = _after_chunk(outcome, result, run)

        step = CopyStep(plan, sconn, tconn, run,
                        replay_guard=resuming and not spec.state_in_target
                        and spec.mode is Mode.APPEND)
        loop = run_loop(step, cp, spec.pacing, stop=stop, progress=progress,
                        on_chunk=after_chunk,
                        retry=spec.retry, retries=retries)
        cp = loop.checkpoint
        tconn = step.tconn
        result.status, result.message = loop.status, loop.message
        result.rows_this_run = loop.rows
        result.metadata["chunk_size_last"] = loop.last_chunk_size
        if loop.status is Status.COMPLETED:
            _advance_sequences(tconn, spec, result)
            _mark_finished(tconn if spec.state_in_target else run.store.conn, cp, spec)
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
    except Exception as exc:  # driver errors: one line, masked, with SQLSTATE
        run_result.fail(result, exc, pg.describe_error(exc, spec.target))
    finally:
        if step is not None:
            cp = latest[0]
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


def _after_chunk(outcome: StepOutcome, result: Result, run: JobRun) -> Checkpoint:
    for error in outcome.errors:
        result.add_error(error)
    run.heartbeat()
    return outcome.checkpoint


def _mark_finished(conn: psycopg.Connection, cp: Checkpoint, spec: CopySpec) -> None:
    with conn.transaction():
        write_checkpoint(conn, cp, finished=True, schema=spec.state_schema)


def _advance_sequences(tconn: psycopg.Connection, spec: CopySpec, result: Result) -> None:
    with tconn.transaction():
        moved = catalog.advance_sequences(tconn, spec.target_table)
    if moved:
        log.info("sequences of %s set past the copied values: %s", spec.target_table, moved)
        result.metadata["sequences"] = moved
