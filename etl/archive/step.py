"""One chunk of an archive job, in as few and as short transactions as it can be.

Same database (or --purge): ONE source transaction finds the chunk's bound, deletes the
chunk's matching rows with RETURNING and inserts them into the archive table in the same
statement, and writes the checkpoint. A crash leaves all of it or none of it.

Another database: the source transaction deletes the chunk's matching rows with
``COPY (DELETE … RETURNING …) TO STDOUT``; those bytes are staged in the destination and
merged into the archive table (``ON CONFLICT DO NOTHING``), the destination commits, and
only then does the source transaction commit the delete with the checkpoint. The rows
copied are exactly the rows deleted (one statement), a foreign key refusing the delete
stops the chunk before anything is written elsewhere, and a crash between the two commits
leaves the rows in both databases: the rerun deletes them again, finds their identical
copies in the archive and keeps those — never a row lost, never one archived twice.

A MySQL/MariaDB database: the same order, with the rows themselves (``DELETE …
RETURNING`` decoded) inserted there with ``INSERT IGNORE`` and compared where a key was
there already (``etl.archive.sql_dest``).

Files (--to-dir): the source transaction deletes (or selects) the chunk's rows with
``COPY (…) TO STDOUT (FORMAT csv, HEADER)``; they are written to the chunk's file, which is
fsynced and renamed, its manifest entry written (``etl.sinks.files``), and only then does
the source transaction commit the delete with the checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import pg
from ..errors import SourceError, TargetError
from ..model import Checkpoint, TableName
from ..report import utc_now
from ..runner import StepOutcome
from ..sinks import files
from ..sinks.pg_copy import PgCopySink
from ..sources.copy_out import blocks_of, rows_of
from ..sources.pg import Bound, PgKeysetSource
from ..sql_copy_io import row_bytes
from ..state.store import committed_after_all, schema_sql, write_checkpoint
from .plan import STAGE_TABLE, Action, ArchivePlan

if TYPE_CHECKING:
    import psycopg

    from ..jobrun import JobRun

log = logging.getLogger(__name__)


@dataclass
class _Done:
    """What one chunk did: rows taken from the source, rows new in the archive, rows the
    archive held already (identical: a replay after a crash, or an earlier --no-delete)."""

    rows: int
    inserted: int = 0
    already: int = 0
    bytes: int = 0
    checksum: str | None = None
    file: str | None = None  # --to-dir: the chunk's file (None when no row matched)


@dataclass
class FilesOut:
    """Where a --to-dir job's chunks go: the manifest (loaded and reconciled when the run
    started) and the files this run's committed chunks wrote (the report's artifacts)."""

    manifest: files.Manifest
    written: list[str] = field(default_factory=list)


class ArchiveStep:
    """One chunk: bound → delete/archive → checkpoint (see the module's docstring).

    Connections the server or network dropped are opened again (and the job lock re-taken)
    before each attempt, so a retried chunk starts clean.
    """

    def __init__(self, plan: ArchivePlan, sconn: psycopg.Connection,
                 dconn: psycopg.Connection | None, run: JobRun,
                 files_out: FilesOut | None = None) -> None:
        self.plan = plan
        self.files_out = files_out
        self.run = run
        self.longest_transaction = 0.0  # seconds, of the longest source transaction
        self.partitions_dropped: list[str] = []  # --drop-partitions, this run
        self._plain_move = True  # same database: the plain statement until a key is met twice
        self._attempting: int | None = None  # the chunk (after index …) last attempted
        self._use_source(sconn)
        self._use_dest(dconn)

    def _use_source(self, conn: psycopg.Connection) -> None:
        import psycopg

        self.source = PgKeysetSource(conn, self.plan.query, binary=self.plan.copy.binary)
        # PgKeysetSource reads in read-only repeatable read; archiving writes, and READ
        # COMMITTED makes each DELETE re-check --where on a row updated meanwhile (it waits for
        # the row's lock, up to --lock-timeout): only rows matching at that moment move
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        conn.read_only = False
        self.sconn = conn

    def _use_dest(self, conn: psycopg.Connection | None) -> None:
        self.dconn = conn
        self.stage = None if conn is None else PgCopySink(
            conn, TableName("pg_temp", STAGE_TABLE), self.plan.columns,
            binary=self.plan.copy.binary)

    def ensure_connected(self) -> None:
        spec = self.plan.spec
        if not pg.is_usable(self.sconn):
            log.info("reconnecting to the source database")
            self._use_source(pg.connect(spec.source, "source", autocommit=True, reconnect=True,
                                        settings=spec.settings))
        if self.dconn is not None and not pg.is_usable(self.dconn):
            log.info("reconnecting to the archive database")
            self._use_dest(pg.connect(spec.dest, "target", autocommit=True, reconnect=True,
                                      settings=spec.settings))
        if self.plan.sql_dest is not None:
            self.plan.sql_dest.ensure_connected()
        self.run.ensure_connected()

    def committed(self, cp: Checkpoint) -> Checkpoint | None:
        """Before a retry (see :data:`etl.runner.Step`): the stored checkpoint when the failed
        attempt's source transaction committed after all (its answer was lost with the
        connection), so the chunk's counts are not lost. Its rows would be safe either way:
        they are gone from the source, or (--no-delete) already in the archive.

        Only a checkpoint this run wrote counts (``committed_after_all``)."""
        spec = self.plan.spec
        self.ensure_connected()
        conn = self.sconn if spec.state_in_source else self.run.store.conn
        stored = committed_after_all(conn, spec.job_id, self.run.run_id, cp, spec.state_schema)
        if stored is not None and self.files_out is not None:  # its file is archived: report it
            out = self.files_out
            entry = out.manifest.entry(self._walk(stored), stored.chunk_index)
            path = str(out.manifest.dir / entry.file) if entry is not None else None
            if path is not None and path not in out.written:
                out.written.append(path)
        return stored

    def metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {"longest_transaction_seconds": round(self.longest_transaction, 3)}
        if self.plan.spec.drop_partitions:
            out["partitions_dropped"] = self.partitions_dropped
        return out

    def close(self) -> None:
        self.sconn.close()
        if self.dconn is not None:
            self.dconn.close()
        if self.plan.sql_dest is not None:
            self.plan.sql_dest.close()

    def __call__(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        import psycopg

        spec = self.plan.spec
        self.ensure_connected()
        t0 = time.monotonic()
        retry, self._attempting = self._attempting == cp.chunk_index, cp.chunk_index
        try:
            with self.sconn.transaction():
                if self.files_out is not None:
                    if retry:
                        self._hold_checkpoint(cp)
                    # entries past the checkpoint are of attempts that did not commit
                    self.files_out.manifest.drop_after(self._walk(cp), cp.chunk_index)
                bound = self.source.next_bound(cp.last_key, size)
                if bound is None:
                    return None
                params = self.plan.query.params(cp.last_key, bound.text)
                has_lower = cp.last_key is not None
                if self.files_out is not None:
                    done = self._to_files(has_lower, params, cp, bound)
                elif self.plan.sql_dest is not None:
                    done = self._to_sql_destination(has_lower, params, cp)
                elif self.dconn is None:
                    done = self._in_source(has_lower, params)
                else:
                    done = self._to_destination(has_lower, params, cp, bound)
                new = self._checkpoint(cp, bound, done)
                self.run.assert_lock_held()
                if spec.state_in_source:
                    write_checkpoint(self.sconn, new, schema=spec.state_schema)
        except psycopg.errors.ForeignKeyViolation as exc:
            raise self._refused(exc, cp) from exc
        finally:
            self.longest_transaction = max(self.longest_transaction, time.monotonic() - t0)
        if self.files_out is not None and done.file is not None:
            path = str(self.files_out.manifest.dir / done.file)
            if path not in self.files_out.written:  # committed: the file is the archive now
                self.files_out.written.append(path)
        if not spec.state_in_source:
            # the chunk is committed; a crash before this leaves an older checkpoint, and the
            # rerun walks the chunk's range again: its rows are gone from the source (or, with
            # --no-delete, already in the archive: kept as they are)
            with self.run.store.conn.transaction():
                write_checkpoint(self.run.store.conn, new, schema=spec.state_schema)
        return StepOutcome(new, done.rows, done.bytes)

    def _in_source(self, has_lower: bool, params: dict[str, Any]) -> _Done:
        """Same database: one statement does the chunk (purge: the DELETE alone)."""
        import psycopg

        stmt = self.plan.chunk_sql(has_lower)
        if self.plan.spec.action is Action.PURGE:
            return _Done(rows=max(self.sconn.execute(stmt, params).rowcount, 0))
        if self.plan.spec.action is Action.MOVE and self._plain_move:
            try:
                with self.sconn.transaction():  # a savepoint: the fallback starts from before it
                    moved = max(self.sconn.execute(self.plan.move_sql(has_lower), params).rowcount, 0)
                return _Done(rows=moved, inserted=moved)
            except psycopg.errors.UniqueViolation:
                # the archive held some of these keys before the job: compare them (and stay
                # on the careful statement: such rows tend to come in runs)
                log.info("the archive already holds some keys of this chunk: moving rows with "
                         "the statement that keeps identical copies from now on")
                self._plain_move = False
        row = self.sconn.execute(stmt, params).fetchone()
        assert row is not None
        done = _Done(rows=int(row[0]), inserted=int(row[1]), already=int(row[2]))
        self._check_merge(done)
        return done

    def _to_destination(self, has_lower: bool, params: dict[str, Any], cp: Checkpoint,
                        bound: Bound) -> _Done:
        """Another database: stage the rows the source statement deletes (or, --no-delete,
        selects) and merge them into the archive; the destination commits here."""
        assert self.dconn is not None and self.stage is not None
        with self.dconn.transaction():
            self.dconn.execute(self.plan.stage_create_sql())
            statement = self.stage.start()
            try:
                for block in self._rows_out(self.plan.chunk_sql(has_lower), params):
                    statement.write(block)
            except BaseException as exc:  # the source refused (a foreign key) or went away
                statement.abort(exc)
                raise
            stats = statement.finish()
            row = self.dconn.execute(self.plan.stage_merge_sql()).fetchone()
            assert row is not None
            done = _Done(rows=int(row[0]), inserted=int(row[1]), already=int(row[2]),
                         bytes=stats.bytes, checksum=stats.checksum)
            if done.rows != stats.rows:  # pragma: no cover - the stage holds what COPY wrote
                raise TargetError(f"staged {stats.rows} rows but found {done.rows}")
            self._check_merge(done)
            self.run.assert_lock_held()
        log.debug("chunk %d: %d rows committed in the archive after key %s", cp.chunk_index + 1,
                  done.rows, cp.last_key_json)
        return done

    def _to_sql_destination(self, has_lower: bool, params: dict[str, Any],
                            cp: Checkpoint) -> _Done:
        """MySQL/MariaDB: the rows the source statement deletes (or selects), decoded, are
        inserted there and committed (etl.archive.sql_dest) before the source commits."""
        assert self.plan.sql_dest is not None
        rows = self.sconn.execute(self.plan.chunk_sql(has_lower), params).fetchall()
        if not rows:
            return _Done(rows=0)
        inserted, already = self.plan.sql_dest.write(rows)
        self.run.assert_lock_held()
        log.debug("chunk %d: %d rows committed in the archive after key %s", cp.chunk_index + 1,
                  len(rows), cp.last_key_json)
        return _Done(rows=len(rows), inserted=inserted, already=already, bytes=row_bytes(rows))

    def _hold_checkpoint(self, cp: Checkpoint) -> None:
        """Files, retrying a chunk: lock the job's checkpoint row and check it is still ``cp``
        before anything past it is removed. The lock waits for a transaction of an earlier attempt that may
        still be committing on the server (its connection lost): if it did commit, its file
        is the archive of rows now deleted and must stay — the chunk is retried, and the
        retry's ``committed()`` finds the checkpoint."""
        spec = self.plan.spec
        row = self.sconn.execute(schema_sql(spec.state_schema, """
            SELECT chunk_index FROM {s}.checkpoints WHERE job_id = %s AND partition = ''
            FOR UPDATE"""), (spec.job_id,)).fetchone()
        if row is None or int(row[0]) != cp.chunk_index:
            raise files.CheckpointMoved(
                f"the checkpoint of {spec.job_id} is at chunk {row[0] if row else None}, not "
                f"{cp.chunk_index}: an earlier attempt committed after all; retrying")

    @staticmethod
    def _walk(cp: Checkpoint) -> int:
        walk = (cp.watermark or {}).get(files.WALK_KEY)
        assert isinstance(walk, int), "a --to-dir run starts from a checkpoint with its walk"
        return walk

    def _to_files(self, has_lower: bool, params: dict[str, Any], cp: Checkpoint,
                  bound: Bound) -> _Done:
        """Files: the rows the source statement deletes (or selects) go to the chunk's file,
        fsynced and renamed, then to the manifest; the caller commits the source after."""
        assert self.files_out is not None
        spec, manifest = self.plan.spec, self.files_out.manifest
        walk, index = self._walk(cp), cp.chunk_index + 1
        final = manifest.dir / files.chunk_file_name(manifest.prefix, walk, index,
                                                     spec.file_format)
        for name, value in files.COPY_SETTINGS.items():  # exact, parseable text output
            self.sconn.execute("SELECT set_config(%s, %s, true)", (name, value))
        spool = files.temp_path(final, ".csv" if spec.file_format == "parquet" else "")
        try:
            with rows_of(self.sconn, self.plan.chunk_sql(has_lower), params) as out:
                size, sha = files.spool(spool, iter(lambda: bytes(out.read()), b""))
            rows = out.rowcount  # from the server's "COPY n", once the copy is over
            if rows < 0:  # pragma: no cover - psycopg sets it after COPY TO
                raise TargetError("the server did not say how many rows COPY sent")
            if rows == 0:
                return _Done(rows=0)
            if spec.file_format == "csv":
                files.publish(spool, final)
                written = files.Written(rows=rows, bytes=size, sha256=sha)
            else:
                written = files.csv_to_parquet(spool, final, self.plan.columns)
                if written.rows != rows:  # pragma: no cover - the CSV holds what COPY sent
                    raise TargetError(f"wrote {written.rows} rows to {final} but COPY sent {rows}")
        finally:
            spool.unlink(missing_ok=True)
        manifest.put(files.Entry(
            file=final.name, format=spec.file_format, walk=walk, chunk_index=index,
            after_key=cp.last_key_json if cp.last_key is not None else None,
            up_to_key=bound.json, rows=rows, bytes=written.bytes, sha256=written.sha256,
            written_at=utc_now(), run_id=self.run.run_id))
        log.debug("chunk %d: %d rows in %s", index, rows, final)
        return _Done(rows=rows, inserted=rows, bytes=written.bytes, checksum=written.sha256,
                     file=final.name)

    def _rows_out(self, copy_sql: Any, params: dict[str, Any]) -> Iterator[bytes]:
        """The source statement's rows as COPY data, in blocks of about COPY_BLOCK_BYTES."""
        return blocks_of(self.sconn, copy_sql, params)

    def _check_merge(self, done: _Done) -> None:
        """Every row of the chunk is now in the archive exactly once, or the chunk stops."""
        differ = done.rows - done.inserted - done.already
        if differ:
            plan = self.plan
            raise TargetError(
                f"{differ:,} row(s) of this chunk have a key that archive table {plan.archive} "
                f"already holds with different values (unique key "
                f"{', '.join(plan.conflict_key) or 'of the archive'}); the chunk was rolled "
                f"back and its rows stay in {plan.spec.table}. Compare those rows and remove "
                "or rename the archive's copies, then rerun: the job resumes at this chunk")

    def _checkpoint(self, cp: Checkpoint, bound: Bound, done: _Done) -> Checkpoint:
        action = self.plan.spec.action
        if action is Action.PURGE:
            outcomes = {"deleted": done.rows}
            succeeded, skipped = done.rows, 0
        elif action is Action.NO_DELETE:
            outcomes = {"archived": done.inserted, "already_archived": done.already}
            succeeded, skipped = done.inserted, done.already
        else:
            outcomes = {"archived": done.inserted, "already_archived": done.already}
            succeeded, skipped = done.rows, 0
        return dataclasses.replace(
            cp, chunk_index=cp.chunk_index + 1, last_key=bound.text, last_key_json=bound.json,
            processed=cp.processed + done.rows, succeeded=cp.succeeded + succeeded,
            skipped=cp.skipped + skipped,
            outcomes={k: cp.outcomes.get(k, 0) + outcomes.get(k, 0)
                      for k in {**cp.outcomes, **outcomes}},
            bytes=cp.bytes + done.bytes, checksum=done.checksum, run_id=self.run.run_id,
            updated_at=utc_now())

    def _refused(self, exc: BaseException, cp: Checkpoint) -> SourceError | TargetError:
        """A foreign key refused the chunk's delete: say which, and what to do."""
        diag = getattr(exc, "diag", None)
        constraint = getattr(diag, "constraint_name", None) or "?"
        schema, table = getattr(diag, "schema_name", None), getattr(diag, "table_name", None)
        other = f"{schema}.{table}" if schema and table else table or "?"
        detail = getattr(diag, "message_detail", None) or ""
        spec = self.plan.spec
        if spec.archive_table is not None and TableName(schema or "", table or "") \
                == spec.archive_table:  # the archive's own foreign key refused the insert
            return TargetError(
                f"archive table {other} refuses rows of {spec.table} after key "
                f"{cp.last_key_json or '(start)'}: {pg.describe_error(exc, spec.dest)} The chunk "
                "was rolled back and its rows stay in the source; fix or drop that constraint, "
                "then rerun: the job resumes at this chunk")
        return SourceError(
            f"foreign key constraint {constraint!r} of table {other} refuses the delete of "
            f"rows of {spec.table} after key {cp.last_key_json or '(start)'}"
            f"{': ' + detail if detail else ''} The chunk was rolled back and its rows stay "
            f"in {spec.table}. Archive or delete the rows of {other} that reference them first "
            "(or drop or change the constraint), then rerun: the job resumes at this chunk",
            sqlstate=None)
