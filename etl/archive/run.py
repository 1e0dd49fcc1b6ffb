"""The run of a planned archive job: resume or start, the chunk loop, the Result; and the
--dry-run, which reads and EXPLAINs but writes nothing (not even the state store)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import lifecycle, pg, table_copy
from ..errors import EtlError
from ..model import Checkpoint
from ..report import Result, utc_now
from ..runner import AUTO_FIRST_CHUNK, StopFlag
from ..sinks import files
from ..sources.pg import PgKeysetSource
from ..state.store import read_checkpoint, write_checkpoint
from . import partitions
from .plan import Action, ArchivePlan, ArchiveSpec, describe_plan
from .step import ArchiveStep, FilesOut

if TYPE_CHECKING:
    import psycopg

    from ..jobrun import JobRun
    from ..progress import Progress
    from ..replica import ReplicaGuard

log = logging.getLogger(__name__)


def _metadata(plan: ArchivePlan) -> dict[str, Any]:
    spec = plan.spec
    if spec.to_dir is not None:
        return {"source": spec.source.masked, "target": str(spec.to_dir),
                "format": spec.file_format, "archive_table": None, "state": spec.state.masked,
                "action": spec.action.value, "where": spec.where,
                "chunk_size": spec.pacing.chunk_size or "auto",
                "key": [k.name for k in plan.copy.key]}
    return {"source": spec.source.masked,
            "target": None if spec.action is Action.PURGE else spec.dest.masked,
            "archive_table": spec.archive_name,
            "state": spec.state.masked, "action": spec.action.value, "where": spec.where,
            "chunk_size": spec.pacing.chunk_size or "auto",
            "key": [k.name for k in plan.copy.key]}


def _start(plan: ArchivePlan, run: JobRun) -> tuple[Checkpoint, bool]:
    """Where this run starts: after the checkpoint of an unfinished run; from the first key
    after a finished one (rows that began to match since lie anywhere in the key order),
    except for --no-delete, which goes on after its last key (an incremental catch-up)."""
    spec = plan.spec
    found = None if spec.restart else read_checkpoint(run.store.conn, spec.job_id,
                                                       spec.state_schema)
    if found is not None and found[1] and spec.action is not Action.NO_DELETE:
        found = None
    if found is not None:
        return found[0], True
    return Checkpoint(job_id=spec.job_id, chunk_index=0, last_key=None, run_id=run.run_id), False


def _start_files(plan: ArchivePlan, run: JobRun) -> tuple[Checkpoint, bool, files.Manifest]:
    """--to-dir: reconcile DIR with the stored checkpoint, then where this run starts.

    The stored checkpoint (walk, chunk) is the last chunk whose delete committed: manifest
    entries past it are of chunks that did not commit (their rows are still in the source)
    and go, with their files; so do temporary files and chunk files the manifest does not
    list. A new walk (a first run, a run after a finished one, --restart) gets the next walk
    number, committed in the checkpoint before its first file is written, so its files never
    take an earlier walk's names and a crash before its first commit is reconciled too."""
    spec = plan.spec
    assert spec.to_dir is not None
    found = read_checkpoint(run.store.conn, spec.job_id, spec.state_schema)
    stored = found[0] if found is not None else None
    stored_walk = (stored.watermark or {}).get(files.WALK_KEY) if stored is not None else None
    files.ensure_dir(spec.to_dir)
    manifest = files.Manifest(spec.to_dir, spec.job_id, str(spec.table)).load()
    if stored is not None and isinstance(stored_walk, int):
        for e in manifest.drop_after(stored_walk, stored.chunk_index):
            log.info("removed %s: its chunk did not commit (its rows are still in %s)",
                     e.file, spec.table)
    elif manifest.entries:
        # no walk stored (the state was reset): remove nothing, start a walk of its own
        log.warning("%s lists files but job %s has no stored checkpoint with its walk; they are "
                    "kept as they are", manifest.path, spec.job_id)
    for name in manifest.clean():
        log.info("removed %s left by an interrupted run", name)
    cp, resuming = _start(plan, run)
    if resuming and isinstance((cp.watermark or {}).get(files.WALK_KEY), int):
        return cp, resuming, manifest
    walk = max(stored_walk if isinstance(stored_walk, int) else 0, manifest.last_walk) + 1
    cp = dataclasses.replace(cp, watermark={files.WALK_KEY: walk}, run_id=run.run_id)
    with run.store.conn.transaction():
        write_checkpoint(run.store.conn, cp, schema=spec.state_schema)
    return cp, resuming, manifest


def verb_of(action: Action) -> str:
    """The report's word for what the job did to its rows."""
    return {Action.PURGE: "deleted", Action.NO_DELETE: "archived"}.get(action,
                                                                       "archived and deleted")


def finish_in_store(run: JobRun, spec: ArchiveSpec) -> Callable[[lifecycle.Start, Checkpoint], None]:
    """What ends a completed archive run: its checkpoint marked finished in the state store
    (the next run starts a new walk)."""
    def finish(begun: lifecycle.Start, cp: Checkpoint) -> None:
        with run.store.conn.transaction():
            write_checkpoint(run.store.conn, cp, finished=True, schema=spec.state_schema)
    return finish


def execute(plan: ArchivePlan, run: JobRun, sconn: psycopg.Connection,
            dconn: psycopg.Connection | None, *, progress: Progress,
            stop: StopFlag | None = None, report_path: str | None = None,
            replica: ReplicaGuard | None = None) -> Result:
    """Run the planned job under ``run`` (lock held). Failures end in the Result, not raised;
    ``replica`` holds each chunk back while a streaming standby lags (``etl.replica``)."""
    spec = plan.spec
    result = Result(job_id=spec.job_id, run_id=run.run_id, job_type="archive",
                    started_at=utc_now())
    result.metadata.update(_metadata(plan))
    result.artifacts["report"] = report_path

    def start() -> lifecycle.Start:
        out = None
        if spec.to_dir is not None:
            cp, resuming, manifest = _start_files(plan, run)
            out = FilesOut(manifest)
            result.artifacts["manifest"] = str(manifest.path)
            result.artifacts["output_files"] = out.written  # filled as chunks commit
        else:
            if plan.sql_dest is not None:
                plan.sql_dest.prepare()
            elif spec.action is not Action.PURGE:
                table_copy.prepare_target(dconn or sconn, plan.copy)
            cp, resuming = _start(plan, run)
        step = ArchiveStep(plan, sconn, dconn, run, out)
        before = cp.processed
        if spec.drop_partitions:  # whole partitions first; the walk takes what is left
            cp, step.partitions_dropped, longest = partitions.drop_qualifying(
                step.sconn, plan, cp, run.run_id)
            step.longest_transaction = max(step.longest_transaction, longest)
        remaining, exact = table_copy.count_remaining(sconn, plan.copy, cp.last_key)
        return lifecycle.Start(step, cp, resuming, f"archive {spec.table}", remaining, exact,
                               rows_before=cp.processed - before)

    return lifecycle.execute(run, result, start=start, finish=finish_in_store(run, spec),
                             pacing=spec.pacing, retry=spec.retry, progress=progress,
                             stop=stop if stop is not None else StopFlag(), state=spec.state,
                             describe=lambda exc: pg.describe_error(exc, spec.source),
                             verb=verb_of(spec.action),
                             replica=replica)


def dry_run(plan: ArchivePlan, sconn: psycopg.Connection) -> Result:
    """Counts, the SQL of one chunk and its EXPLAIN; reads the source and the state store
    (if it exists), writes nothing. The source session is read-only meanwhile, so even a
    mistake here could not write."""
    spec = plan.spec
    resume_after = None
    cp = None
    if not spec.restart:
        try:
            with pg.connect(spec.state, "state", autocommit=True) as stconn:
                found = read_checkpoint(stconn, spec.job_id, spec.state_schema)
        except EtlError:
            found = None
        if found is not None and (not found[1] or spec.action is Action.NO_DELETE) \
                and found[0].last_key is not None:
            cp = found[0]
            resume_after = cp.last_key_json
    after = cp.last_key if cp else None
    size = spec.pacing.chunk_size or AUTO_FIRST_CHUNK
    # a keyset reader makes the session read-only (repeatable read): this cannot write
    reader = PgKeysetSource(sconn, plan.query, binary=plan.copy.binary)
    remaining, exact = table_copy.count_remaining(sconn, plan.copy, after)
    first, explain = _explain_first(plan, reader, after, resume_after, size)
    parts = partitions.describe(sconn, plan) if spec.drop_partitions else None
    text = describe_plan(plan, resume_after, remaining, exact, size, first, explain, parts)
    return Result.dry_run(spec.job_id, "archive", text, remaining, **{
        **_metadata(plan), "estimated_rows": remaining, "estimate_exact": exact,
        "chunk_size": size, "estimated_chunks": -(-remaining // size) if remaining else 0,
        "first_chunk": first, "explain": explain})


def _explain_first(plan: ArchivePlan, reader: PgKeysetSource, after: tuple[str, ...] | None,
                   after_json: list[Any] | None, size: int) -> tuple[dict[str, Any] | None, list[str]]:
    """The first chunk's key range and the EXPLAIN (not ANALYZE: nothing runs) of its
    statement in the source database."""
    from psycopg import sql

    q, spec = plan.query, plan.spec
    with reader.conn.transaction(force_rollback=True):
        bound = reader.next_bound(after, size)
        if bound is None:
            return None, []
        stmt = plan.chunk_sql(after is not None)
        if spec.action is not Action.PURGE and (not spec.same_database or plan.copy.ddl
                                                or spec.to_dir is not None):
            # the COPY wraps the DELETE (or SELECT), and an archive table yet to be created
            # cannot be planned: EXPLAIN the source's part of the chunk
            stmt = (q.select_sql(after is not None) if spec.action is Action.NO_DELETE
                    else q.delete_sql(after is not None, returning=True))
        rows = reader.conn.execute(sql.SQL("EXPLAIN ") + stmt,
                                   q.params(after, bound.text)).fetchall()
    first = {"after": after_json, "up_to": bound.json}
    return first, [r[0] for r in rows]
