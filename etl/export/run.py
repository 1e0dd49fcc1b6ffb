"""An export's chunks: rows of the source in key order into files, each file published
(temporary name, fsync, rename) and listed in the manifest before the job's checkpoint
moves past its rows.

A step writes one file — or, with ``--partition-by``, one file per partition value among
its rows — of one chunk (one Parquet row group), or of ``--rows-per-file`` rows in row
groups of the chunk size. Each chunk is read by keyset (``key > last ORDER BY key LIMIT
n``): from PostgreSQL by COPY in its own read-only REPEATABLE READ transaction
(``PgExportStep``), from MySQL/MariaDB or SQLite through SQLAlchemy in one short read
transaction, as Python values (``etl.export.sql_source.SqlExportStep``); the rest of a step
— names, the rows-per-file loop, partitions, manifest entries, checkpoint — is shared
(``ExportStep``). Names are fixed by the
job's walk and the step's index (``<prefix>.w0001.000042.parquet``), so a step replayed
after a crash writes the same names; at the start of a run, manifest entries past the
stored checkpoint, temporary files and unlisted chunk files are removed. A new walk (a
first run, a rerun of a finished export, ``--restart``) removes the previous export's
files first: DIR holds one export, whose manifest says when it is complete.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import catalog, lifecycle, pg
from ..errors import TargetError, UsageError
from ..model import Checkpoint
from ..report import Result, utc_now
from ..runner import StepOutcome, StopFlag
from ..sinks import files
from ..sources.copy_out import copy_to
from ..sources.pg import PgKeysetSource
from ..state.store import read_checkpoint, write_checkpoint
from .plan import ExportPlan, ExportSpec
from .writers import FileOut, open_file, partition_dir, schema_doc

if TYPE_CHECKING:
    import psycopg

    from ..jobrun import JobRun
    from ..progress import Progress
    from ..urls import DbUrl

log = logging.getLogger(__name__)

DIR_KEY = "export_dir"  # the checkpoint's watermark: the directory a walk writes into


class ExportStep:
    """One step: the next file(s) of the export. What every source shares — the walk's and
    the step's file names, the rows-per-file loop, one file per partition value, the
    manifest entries and the checkpoint after them; a subclass says how a chunk's rows
    reach the files (``_chunk``) and where a checkpoint's rows end (``_after``)."""

    def __init__(self, plan: Any, run: JobRun, manifest: files.Manifest) -> None:
        self.plan = plan
        self.run = run
        self.manifest = manifest
        self.files_written = 0
        self._failed = False

    # -- what a source says -----------------------------------------------------------------
    def ensure_connected(self) -> None:
        self.run.ensure_connected()

    def close(self) -> None:  # pragma: no cover - each source closes its own connection
        pass

    def _after(self, cp: Checkpoint) -> Any:
        """Where the rows after ``cp`` start, as ``_chunk`` takes it (None: the start)."""
        raise NotImplementedError

    def _open(self, final: Path) -> Any:
        """A file being written (a ``FileOut`` of this source's rows)."""
        raise NotImplementedError

    def _chunk(self, after: Any, limit: int, out_for: Callable[[tuple[str | None, ...]], Any]
               ) -> tuple[int, Any, Any] | None:
        """Up to ``limit`` rows after ``after`` into ``out_for(partition values)``'s files:
        (rows, the next ``after``, the bound: ``.text`` and ``.json`` of its last key), or
        None when no row is left."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def committed(self, cp: Checkpoint) -> Checkpoint | None:
        """The stored checkpoint, when a failed attempt's commit went through after all."""
        found = read_checkpoint(self.run.store.conn, cp.job_id, self.plan.spec.state_schema)
        return found[0] if found is not None else None

    def metadata(self) -> dict[str, Any]:
        return {"files_written": self.files_written}

    def __call__(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        spec, plan = self.plan.spec, self.plan
        self.ensure_connected()
        if self._failed:  # an attempt of this step failed: drop what it left behind
            self.manifest.clean()
            self._failed = False
        walk, index = _walk(cp), cp.chunk_index + 1
        goal = spec.rows_per_file or size
        after = self._after(cp)
        outs: dict[tuple[str | None, ...], Any] = {}

        def out_for(pv: tuple[str | None, ...]) -> Any:
            out = outs.get(pv)
            if out is None:
                out = outs[pv] = self._open(self._final(walk, index, pv))
            return out

        rows = 0
        bound = None
        try:
            while rows < goal:
                got = self._chunk(after, min(size, goal - rows), out_for)
                if got is None:
                    break
                n, after, bound = got
                rows += n
                if spec.json_as == "struct" and spec.format == "parquet":
                    break  # a struct type comes from one chunk's values: one a file
            if bound is None:
                return None
            written = {pv: out.close() for pv, out in outs.items()}
        except BaseException:
            self._failed = True
            for out in outs.values():
                out.abort()
            raise
        entries = [files.Entry(
            file=outs[pv].final.relative_to(self.manifest.dir).as_posix(), format=spec.format,
            walk=walk, chunk_index=index,
            after_key=cp.last_key_json if cp.last_key is not None else None,
            up_to_key=bound.json, rows=w.rows, bytes=w.bytes, sha256=w.sha256,
            written_at=utc_now(), run_id=self.run.run_id,
            partition=dict(zip([c.name for c in plan.partition], pv, strict=True)) or None)
            for pv, w in written.items()]
        self.manifest.put(*entries)
        nbytes = sum(w.bytes for w in written.values())
        new = dataclasses.replace(
            cp, chunk_index=index, last_key=bound.text, last_key_json=bound.json,
            processed=cp.processed + rows, succeeded=cp.succeeded + rows,
            bytes=cp.bytes + nbytes, checksum=entries[0].sha256 if len(entries) == 1 else None,
            outcomes={**cp.outcomes, "exported": cp.outcomes.get("exported", 0) + rows},
            run_id=self.run.run_id, updated_at=utc_now())
        store = self.run.store.conn
        with store.transaction():
            self.run.assert_lock_held()
            write_checkpoint(store, new, schema=spec.state_schema)
        self.files_written += len(entries)
        log.debug("step %d: %d rows in %d file(s)", index, rows, len(entries))
        return StepOutcome(new, rows, nbytes)

    def _final(self, walk: int, index: int, pv: tuple[str | None, ...]) -> Path:
        name = files.chunk_file_name(self.manifest.prefix, walk, index, self.plan.spec.suffix)
        if pv:
            return self.manifest.dir / partition_dir(self.plan.partition, pv) / name
        return self.manifest.dir / name


class PgExportStep(ExportStep):
    """PostgreSQL: each chunk's rows (per partition value) by COPY, in exact text forms."""

    plan: ExportPlan

    def __init__(self, plan: ExportPlan, conn: psycopg.Connection, run: JobRun,
                 manifest: files.Manifest) -> None:
        super().__init__(plan, run, manifest)
        self._use(conn)

    def _use(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.source = PgKeysetSource(conn, self.plan.query, binary=False)

    def ensure_connected(self) -> None:
        if not pg.is_usable(self.conn):
            log.info("reconnecting to the source database")
            self._use(pg.connect(self.plan.spec.source, "source", reconnect=True,
                                 settings=_settings()))
        self.run.ensure_connected()

    def close(self) -> None:
        self.conn.close()

    def _after(self, cp: Checkpoint) -> tuple[str, ...] | None:
        return tuple(cp.last_key) if cp.last_key is not None else None

    def _open(self, final: Path) -> FileOut:
        return open_file(self.plan, final)

    def _chunk(self, after: tuple[str, ...] | None, limit: int,
               out_for: Callable[[tuple[str | None, ...]], Any]
               ) -> tuple[int, tuple[str, ...], Any] | None:
        spec, plan = self.plan.spec, self.plan
        upto = self.source.next_bound(after, limit)
        if upto is None:
            return None
        params = plan.query.params(after, upto.text)
        if plan.partition:
            values = [tuple(r) for r in self.conn.execute(
                plan.partitions_sql(after is not None), params)]
        else:
            values = [()]
        rows = 0
        for pv in values:
            out = out_for(pv)
            p = dict(params, **{f"pv{i}": v for i, v in enumerate(pv)})
            # Parquet's spool is read by its header; a CSV file has one, on top
            stmt = plan.copy_sql(after is not None, bool(pv), header=(
                spec.format == "parquet" or spec.format == "csv" and not _has_rows(out)))
            try:
                rows += out.add(lambda write, stmt=stmt, p=p: copy_to(self.conn, stmt, p, write))
            except TargetError as exc:
                raise self._located(exc, after, upto.text, pv) from exc
        self.conn.rollback()  # the chunk's snapshot ends here
        return rows, upto.text, upto

    def _located(self, exc: TargetError, after: tuple[str, ...] | None, upto: tuple[str, ...],
                 pv: tuple[str | None, ...]) -> TargetError:
        """A value Parquet cannot hold: name its column, the row's key and the value (pyarrow
        says only "CSV column #i, row #n" of the chunk)."""
        from psycopg import sql

        found = re.search(r"column #(\d+): Row #(\d+): .*?(invalid value '[^']*')", str(exc))
        if not found:
            return exc
        plan = self.plan
        column = plan.columns[int(found.group(1))]
        offset = int(found.group(2)) - 2  # pyarrow counts the chunk's rows from 1, header first
        self.conn.rollback()
        q = plan.query
        stmt = sql.SQL("SELECT jsonb_build_array({}) FROM {}{}{} ORDER BY {} OFFSET %(n)s LIMIT 1").format(
            sql.SQL(", ").join(sql.Identifier(k.name) for k in plan.key), q._ident(),
            q._filter(after is not None, True),
            sql.SQL(" AND ({}) IS NOT DISTINCT FROM ({})").format(
                plan._partition_text(), sql.SQL(", ").join(
                    sql.Placeholder(f"pv{i}") for i in range(len(pv)))) if pv else sql.SQL(""),
            sql.SQL(", ").join(sql.Identifier(k.name) for k in plan.key))
        params = dict(q.params(after, upto), n=offset, **{f"pv{i}": v for i, v in enumerate(pv)})
        row = self.conn.execute(stmt, params).fetchone()
        self.conn.rollback()
        key = row[0] if row else "?"
        return TargetError(
            f"column {column.name} ({column.type_sql}) of {plan.spec.source_name}, the row with "
            f"key {key}: {found.group(3)}, which Parquet cannot hold (an infinite date or "
            "timestamp, NaN in a numeric(p,s), a year past 9999). Nothing of this chunk was "
            "written; export with --format csv or ndjson, or leave such rows out with --where, "
            "then rerun: the job resumes at this chunk")


def _has_rows(out: FileOut) -> bool:
    return bool(getattr(out, "rows", 0))


def _walk(cp: Checkpoint) -> int:
    walk = (cp.watermark or {}).get(files.WALK_KEY)
    assert isinstance(walk, int), "an export starts from a checkpoint with its walk"
    return walk


def _settings() -> dict[str, str]:
    """The archive's files' settings (exact, parseable text of every type); pg.connect
    sets UTC."""
    return dict(files.COPY_SETTINGS)


def connect_source(source: DbUrl) -> psycopg.Connection:
    """The source connection: exact, parseable text output of every type, in UTC."""
    return pg.connect(source, "source", settings=_settings())


def _check_same_dir(spec: ExportSpec, found: tuple[Checkpoint, bool] | None) -> None:
    mark = (found[0].watermark or {}) if found is not None else {}
    if found is not None and not found[1] and mark.get(DIR_KEY) not in (None, str(spec.to_dir)):
        raise UsageError(
            f"job {spec.job_id} is exporting into {mark.get(DIR_KEY)} and has not finished; "
            f"rerun with --to {mark.get(DIR_KEY)} to finish it, give this export its own "
            "--job, or --restart")


def check_directory(spec: ExportSpec) -> None:
    """Before the run (a usage error, exit 2): an unfinished job goes on in its own
    directory. Checked again under the job's lock when the run starts."""
    if spec.restart:
        return
    with pg.connect(spec.state, "state", autocommit=True) as conn:
        _check_same_dir(spec, read_checkpoint(conn, spec.job_id, spec.state_schema))


def _start(plan: Any, run: JobRun, result: Result) -> tuple[Checkpoint, bool, files.Manifest]:
    """Reconcile DIR with the stored checkpoint; where this run starts."""
    spec = plan.spec
    found = None if spec.restart else read_checkpoint(run.store.conn, spec.job_id,
                                                      spec.state_schema)
    stored = found[0] if found is not None else None
    mark = stored.watermark or {} if stored is not None else {}
    _check_same_dir(spec, found)
    files.ensure_dir(spec.to_dir)
    manifest = files.Manifest(spec.to_dir, spec.job_id, spec.source_name).load()
    resuming = found is not None and not found[1] and isinstance(mark.get(files.WALK_KEY), int)
    if resuming:
        assert stored is not None
        for e in manifest.drop_after(int(mark[files.WALK_KEY]), stored.chunk_index):
            log.info("removed %s: its checkpoint did not commit", e.file)
        cp = dataclasses.replace(stored, run_id=run.run_id)
    else:
        old = manifest.drop_after(0, 0)
        if old:
            log.info("removed the %d file(s) of the previous export of job %s", len(old),
                     spec.job_id)
        stored_walk = mark.get(files.WALK_KEY)
        walk = max(stored_walk if isinstance(stored_walk, int) else 0, manifest.last_walk) + 1
        cp = Checkpoint(job_id=spec.job_id, chunk_index=0, last_key=None, run_id=run.run_id,
                        watermark={files.WALK_KEY: walk, DIR_KEY: str(spec.to_dir)})
        with run.store.conn.transaction():
            write_checkpoint(run.store.conn, cp, schema=spec.state_schema)
    for name in manifest.clean():
        log.info("removed %s left by an interrupted run", name)
    manifest.extra = {"source": spec.source.masked, "query": spec.query,
                      "key": [k.name for k in plan.key], "where": spec.where,
                      "format": spec.format, "compression": spec.compression,
                      "partition_by": list(spec.partition_by), "json_as": spec.json_as,
                      "schema": _schema_doc(plan), "walk": _walk(cp), "complete": False}
    manifest.save()
    return cp, resuming, manifest


def _schema_doc(plan: Any) -> list[dict[str, Any]]:
    if isinstance(plan, ExportPlan):
        return schema_doc(plan)
    from .sql_source import schema_doc as sql_schema_doc

    return sql_schema_doc(plan)


def count_remaining(conn: psycopg.Connection, plan: ExportPlan,
                    after: tuple[str, ...] | None) -> tuple[int, bool]:
    q = plan.query
    text = q.remaining_sql(after is not None).as_string(conn)
    n, exact = catalog.count_rows(conn, text, q.params(after), plan.estimated_rows)
    conn.rollback()
    return n, exact


def execute(plan: Any, run: JobRun, conn: Any, *, progress: Progress,
            stop: StopFlag | None = None, report_path: str | None = None) -> Result:
    """Run the planned export under ``run`` (lock held); failures end in the Result.
    ``plan`` is an ``ExportPlan`` (PostgreSQL, ``conn`` its psycopg connection) or an
    ``etl.export.sql_source.SqlExportPlan`` (MySQL/MariaDB, SQLite: ``conn`` its
    ``SqlSource``)."""
    spec = plan.spec
    result = Result(job_id=spec.job_id, run_id=run.run_id, job_type="export",
                    started_at=utc_now())
    result.metadata.update({"source": spec.source.masked, "target": str(spec.to_dir),
                            "format": spec.format, "compression": spec.compression})
    result.artifacts["report"] = report_path
    holder: dict[str, files.Manifest] = {}
    make_step: Callable[[files.Manifest], ExportStep]
    remaining_after: Callable[[ExportStep, Checkpoint], tuple[int, bool]]
    describe: Callable[[BaseException], str]
    if isinstance(plan, ExportPlan):
        def make_step(manifest: files.Manifest) -> ExportStep:
            return PgExportStep(plan, conn, run, manifest)

        def remaining_after(step: ExportStep, cp: Checkpoint) -> tuple[int, bool]:
            return count_remaining(conn, plan, tuple(cp.last_key) if cp.last_key else None)

        def describe(exc: BaseException) -> str:
            return pg.describe_error(exc, spec.source)
    else:
        from ..sql_copy_io import describe_error
        from . import sql_source

        result.metadata["source_database"] = plan.family

        def make_step(manifest: files.Manifest) -> ExportStep:
            return sql_source.SqlExportStep(plan, conn, run, manifest)

        def remaining_after(step: ExportStep, cp: Checkpoint) -> tuple[int, bool]:
            assert isinstance(step, sql_source.SqlExportStep)
            return step.count_remaining(cp)

        def describe(exc: BaseException) -> str:
            return describe_error(exc, spec.source)

    def start() -> lifecycle.Start:
        cp, resuming, manifest = _start(plan, run, result)
        holder["manifest"] = manifest
        result.artifacts["manifest"] = str(manifest.path)
        step = make_step(manifest)
        try:
            remaining, exact = remaining_after(step, cp)
        except BaseException:
            step.close()
            raise
        return lifecycle.Start(step, cp, resuming, f"export {spec.source_name}", remaining,
                               exact)

    def finish(begun: lifecycle.Start, cp: Checkpoint) -> None:
        manifest = holder["manifest"]
        manifest.extra.update(complete=True, rows=sum(e.rows for e in manifest.entries.values()),
                              completed_at=utc_now())
        manifest.save()
        with run.store.conn.transaction():
            write_checkpoint(run.store.conn, cp, finished=True, schema=spec.state_schema)

    out = lifecycle.execute(run, result, start=start, finish=finish, pacing=spec.pacing,
                            retry=spec.retry, progress=progress,
                            stop=stop if stop is not None else StopFlag(), state=spec.state,
                            describe=describe, verb="exported")
    if "manifest" in holder:
        out.artifacts["output_files"] = [
            str(spec.to_dir / e.file) for _, e in sorted(holder["manifest"].entries.items())]
    return out


def stored_checkpoint(spec: ExportSpec) -> Checkpoint | None:
    """The unfinished checkpoint a dry run would resume from (None: a fresh start); reads the
    state store if it exists, writes nothing."""
    from ..errors import EtlError

    if spec.restart:
        return None
    try:
        with pg.connect(spec.state, "state", autocommit=True) as stconn:
            found = read_checkpoint(stconn, spec.job_id, spec.state_schema)
    except EtlError:
        found = None
    if found is not None and not found[1] and found[0].last_key is not None:
        return found[0]
    return None


def dry_run_result(spec: ExportSpec, text: str, remaining: int, after: Any,
                   columns: list[str]) -> Result:
    if after is not None:
        text = text.replace("\nrows:", f"\nresumes:      after key {list(after)}\nrows:", 1)
    return Result.dry_run(spec.job_id, "export", text, remaining, estimated_rows=remaining,
                          columns=columns)


def dry_run(plan: ExportPlan, conn: psycopg.Connection) -> Result:
    """The plan, the rows left (after the stored checkpoint, if any) and one chunk's COPY;
    reads the source and the state store (if it exists), writes nothing."""
    from .plan import describe_plan

    stored = stored_checkpoint(plan.spec)
    after = tuple(stored.last_key) if stored is not None and stored.last_key else None
    remaining, exact = count_remaining(conn, plan, after)
    return dry_run_result(plan.spec, describe_plan(plan, remaining, exact), remaining, after,
                          [c.name for c in plan.columns])


__all__ = ["ExportStep", "PgExportStep", "check_directory", "connect_source", "count_remaining",
           "dry_run", "dry_run_result", "execute", "stored_checkpoint"]
