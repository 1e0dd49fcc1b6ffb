"""An export's chunks: rows of the source in key order into files, each file published
(temporary name, fsync, rename) and listed in the manifest before the job's checkpoint
moves past its rows.

A step writes one file — or, with ``--partition-by``, one file per partition value among
its rows — of one chunk (one Parquet row group), or of ``--rows-per-file`` rows in row
groups of the chunk size. Each chunk is read in its own read-only REPEATABLE READ
transaction, by keyset (``key > last ORDER BY key LIMIT n``). Names are fixed by the
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
from typing import TYPE_CHECKING, Any

from .. import catalog, lifecycle, pg
from ..errors import TargetError, UsageError
from ..model import Checkpoint, Status
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

log = logging.getLogger(__name__)

DIR_KEY = "export_dir"  # the checkpoint's watermark: the directory a walk writes into


class ExportStep:
    """One step: the next file(s) of the export."""

    def __init__(self, plan: ExportPlan, conn: psycopg.Connection, run: JobRun,
                 manifest: files.Manifest) -> None:
        self.plan = plan
        self.run = run
        self.manifest = manifest
        self.files_written = 0
        self._failed = False
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
        after = tuple(cp.last_key) if cp.last_key is not None else None
        outs: dict[tuple[str | None, ...], FileOut] = {}
        rows = 0
        bound = None
        try:
            while rows < goal:
                upto = self.source.next_bound(after, min(size, goal - rows))
                if upto is None:
                    break
                params = plan.query.params(after, upto.text)
                if plan.partition:
                    values = [tuple(r) for r in self.conn.execute(
                        plan.partitions_sql(after is not None), params)]
                else:
                    values = [()]
                for pv in values:
                    out = outs.get(pv)
                    if out is None:
                        out = outs[pv] = open_file(plan, self._final(walk, index, pv))
                    p = dict(params, **{f"pv{i}": v for i, v in enumerate(pv)})
                    # Parquet's spool is read by its header; a CSV file has one, on top
                    stmt = plan.copy_sql(after is not None, bool(pv), header=(
                        spec.format == "parquet" or spec.format == "csv" and not _has_rows(out)))
                    try:
                        rows += out.add(lambda write, stmt=stmt, p=p: copy_to(
                            self.conn, stmt, p, write))
                    except TargetError as exc:
                        raise self._located(exc, after, upto.text, pv) from exc
                self.conn.rollback()  # the chunk's snapshot ends here
                after, bound = upto.text, upto
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

    def _final(self, walk: int, index: int, pv: tuple[str | None, ...]) -> Any:
        name = files.chunk_file_name(self.manifest.prefix, walk, index, self.plan.spec.suffix)
        if pv:
            return self.manifest.dir / partition_dir(self.plan.partition, pv) / name
        return self.manifest.dir / name


def _has_rows(out: FileOut) -> bool:
    return bool(getattr(out, "rows", 0))


def _walk(cp: Checkpoint) -> int:
    walk = (cp.watermark or {}).get(files.WALK_KEY)
    assert isinstance(walk, int), "an export starts from a checkpoint with its walk"
    return walk


def _settings() -> dict[str, str]:
    from .plan import TEXT_SETTINGS

    return dict(TEXT_SETTINGS)


def connect_source(plan_source: Any) -> psycopg.Connection:
    """The source connection: exact, parseable text output of every type."""
    return pg.connect(plan_source, "source", settings=_settings())


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


def _start(plan: ExportPlan, run: JobRun, result: Result) -> tuple[Checkpoint, bool, files.Manifest]:
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
                      "schema": schema_doc(plan), "walk": _walk(cp), "complete": False}
    manifest.save()
    return cp, resuming, manifest


def count_remaining(conn: psycopg.Connection, plan: ExportPlan,
                    after: tuple[str, ...] | None) -> tuple[int, bool]:
    q = plan.query
    text = q.remaining_sql(after is not None).as_string(conn)
    n, exact = catalog.count_rows(conn, text, q.params(after), plan.estimated_rows)
    conn.rollback()
    return n, exact


def execute(plan: ExportPlan, run: JobRun, conn: psycopg.Connection, *, progress: Progress,
            stop: StopFlag | None = None, report_path: str | None = None) -> Result:
    """Run the planned export under ``run`` (lock held); failures end in the Result."""
    spec = plan.spec
    result = Result(job_id=spec.job_id, run_id=run.run_id, job_type="export",
                    started_at=utc_now())
    result.metadata.update({"source": spec.source.masked, "target": str(spec.to_dir),
                            "format": spec.format, "compression": spec.compression})
    result.artifacts["report"] = report_path
    holder: dict[str, files.Manifest] = {}

    def start() -> lifecycle.Start:
        cp, resuming, manifest = _start(plan, run, result)
        holder["manifest"] = manifest
        result.artifacts["manifest"] = str(manifest.path)
        remaining, exact = count_remaining(conn, plan,
                                           tuple(cp.last_key) if cp.last_key else None)
        return lifecycle.Start(ExportStep(plan, conn, run, manifest), cp, resuming,
                               f"export {spec.source_name}", remaining, exact)

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
                            describe=lambda exc: pg.describe_error(exc, spec.source),
                            verb="exported")
    if "manifest" in holder:
        out.artifacts["output_files"] = [
            str(spec.to_dir / e.file) for _, e in sorted(holder["manifest"].entries.items())]
    return out


def dry_run(plan: ExportPlan, conn: psycopg.Connection) -> Result:
    """The plan, the rows left (after the stored checkpoint, if any) and one chunk's COPY;
    reads the source and the state store (if it exists), writes nothing."""
    from ..errors import EtlError
    from .plan import describe_plan

    spec = plan.spec
    after = None
    if not spec.restart:
        try:
            with pg.connect(spec.state, "state", autocommit=True) as stconn:
                found = read_checkpoint(stconn, spec.job_id, spec.state_schema)
        except EtlError:
            found = None
        if found is not None and not found[1] and found[0].last_key is not None:
            after = tuple(found[0].last_key)
    remaining, exact = count_remaining(conn, plan, after)
    text = describe_plan(plan, remaining, exact)
    if after is not None:
        text = text.replace("\nrows:", f"\nresumes:      after key {list(after)}\nrows:", 1)
    now = utc_now()
    result = Result(job_id=spec.job_id, run_id="dry-run", job_type="export", started_at=now,
                    completed_at=now, status=Status.COMPLETED, total_items=remaining)
    result.metadata.update({"dry_run": True, "plan": text, "estimated_rows": remaining,
                            "columns": [c.name for c in plan.columns]})
    return result


__all__ = ["ExportStep", "check_directory", "connect_source", "count_remaining", "dry_run", "execute"]
