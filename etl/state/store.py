"""The state store: jobs, runs, checkpoints and reports in a PostgreSQL schema.

Checkpoints are written with :func:`write_checkpoint` on the *caller's*
connection, inside the caller's transaction, so a chunk's rows and its
checkpoint commit together. Everything else goes through :class:`StateStore`,
which owns an autocommit connection (the same one that holds the job lock).
"""

from __future__ import annotations

import json
import os
import socket
from typing import TYPE_CHECKING, Any

from ..model import Checkpoint, Status
from .schema import DEFAULT_SCHEMA, ensure_schema, installed_version

if TYPE_CHECKING:
    import psycopg

# Runs still marked running that the next run of the job finds are closed with this message.
STALE_RUN_MESSAGE = ("the process ended without closing this run (killed, crashed or lost its "
                     "connection); the next run resumed from the last checkpoint")


def schema_sql(schema: str, sql_text: str):
    """``sql_text`` with ``{s}`` as the quoted state schema."""
    from psycopg import sql

    return sql.SQL(sql_text).format(s=sql.Identifier(schema))


def write_checkpoint(conn: psycopg.Connection, cp: Checkpoint, *, finished: bool = False,
                     schema: str = DEFAULT_SCHEMA) -> None:
    """Upsert the job's checkpoint in ``conn``'s current transaction."""
    conn.execute(
        schema_sql(schema, """
        INSERT INTO {s}.checkpoints AS c (job_id, partition, run_id, chunk_index, last_key,
            processed, succeeded, failed, skipped, bytes, checksum, finished, updated_at, outcomes,
            watermark)
        VALUES (%(job_id)s, '', %(run_id)s, %(chunk_index)s, %(last_key)s::jsonb, %(processed)s,
            %(succeeded)s, %(failed)s, %(skipped)s, %(bytes)s, %(checksum)s, %(finished)s, now(),
            %(outcomes)s::jsonb, %(watermark)s::jsonb)
        ON CONFLICT (job_id, partition) DO UPDATE SET
            run_id = excluded.run_id, chunk_index = excluded.chunk_index,
            last_key = excluded.last_key, processed = excluded.processed,
            succeeded = excluded.succeeded, failed = excluded.failed, skipped = excluded.skipped,
            bytes = excluded.bytes, checksum = excluded.checksum, finished = excluded.finished,
            updated_at = excluded.updated_at, outcomes = excluded.outcomes,
            watermark = excluded.watermark
        """),
        {
            "job_id": cp.job_id, "run_id": cp.run_id, "chunk_index": cp.chunk_index,
            "last_key": json.dumps(cp.last_key_json) if cp.last_key is not None else None,
            "processed": cp.processed, "succeeded": cp.succeeded, "failed": cp.failed,
            "skipped": cp.skipped, "bytes": cp.bytes, "checksum": cp.checksum,
            "finished": finished, "outcomes": json.dumps(cp.outcomes),
            "watermark": json.dumps(cp.watermark) if cp.watermark is not None else None,
        },
    )


def insert_dead_letters(conn: psycopg.Connection, rows: list[dict[str, Any]],
                        schema: str = DEFAULT_SCHEMA) -> None:
    """Record failed rows in ``conn``'s current transaction (with the chunk's checkpoint)."""
    if not rows:
        return
    with conn.cursor() as cur:
        cur.executemany(
            schema_sql(schema, """
            INSERT INTO {s}.dead_letters (job_id, run_id, chunk_index, item_key, row_data,
                error_type, sqlstate, category, error_message, attempts)
            VALUES (%(job_id)s, %(run_id)s, %(chunk_index)s, %(item_key)s::jsonb,
                %(row_data)s::jsonb, %(error_type)s, %(sqlstate)s, %(category)s,
                %(error_message)s, %(attempts)s)
            """),
            [{**r, "item_key": json.dumps(r["item_key"], default=str),
              "row_data": json.dumps(r["row_data"], default=str)} for r in rows],
        )


def read_checkpoint(conn: psycopg.Connection, job_id: str,
                    schema: str = DEFAULT_SCHEMA) -> tuple[Checkpoint, bool] | None:
    """(checkpoint, finished) of ``job_id``, or None when it has none (or no store exists)."""
    if installed_version(conn, schema) == 0:
        return None
    row = conn.execute(
        schema_sql(schema, """
        SELECT chunk_index, last_key,
               CASE WHEN last_key IS NULL THEN NULL
                    ELSE array(SELECT jsonb_array_elements_text(last_key)) END,
               processed, succeeded, failed, skipped, bytes, checksum, run_id::text,
               to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'), finished,
               outcomes, watermark
        FROM {s}.checkpoints WHERE job_id = %s AND partition = ''
        """),
        (job_id,),
    ).fetchone()
    if row is None:
        return None
    (chunk_index, key_json, key_text, processed, succeeded, failed, skipped, nbytes,
     checksum, run_id, updated_at, finished, outcomes, watermark) = row
    cp = Checkpoint(
        job_id=job_id, chunk_index=chunk_index,
        last_key=tuple(key_text) if key_text is not None else None,
        last_key_json=list(key_json or []), processed=processed, succeeded=succeeded,
        failed=failed, skipped=skipped, bytes=nbytes, checksum=checksum, run_id=run_id,
        updated_at=updated_at, outcomes=dict(outcomes or {}), watermark=watermark,
    )
    return cp, bool(finished)


def committed_after_all(conn: psycopg.Connection, job_id: str, run_id: str, cp: Checkpoint,
                        schema: str = DEFAULT_SCHEMA) -> Checkpoint | None:
    """The stored checkpoint of ``job_id`` if run ``run_id`` wrote it past ``cp``: the
    attempt that failed after ``cp`` committed after all (its answer was lost with the
    connection). Another run's checkpoint never counts: a --restart or a new walk starts
    from a fresh ``cp`` while the old checkpoint is still stored."""
    found = read_checkpoint(conn, job_id, schema)
    if found is None or found[0].run_id != run_id or found[0].chunk_index <= cp.chunk_index:
        return None
    return found[0]


# `etl status` shows a run as stale once its heartbeat (about every second) is this old.
STALE_AFTER_SECONDS = 15.0


class StateStore:
    """Jobs, runs and reports, on an autocommit connection to the state database."""

    def __init__(self, conn: psycopg.Connection, schema: str = DEFAULT_SCHEMA) -> None:
        self.conn = conn
        self.schema = schema

    def ensure(self) -> None:
        ensure_schema(self.conn, self.schema)

    def exists(self) -> bool:
        return installed_version(self.conn, self.schema) > 0

    def _exec(self, sql_text: str, params: Any = None):
        return self.conn.execute(schema_sql(self.schema, sql_text), params)

    # -- jobs and runs -----------------------------------------------------
    def register_job(self, job_id: str, job_type: str, args: dict[str, Any]) -> None:
        self._exec(
            """INSERT INTO {s}.jobs (job_id, job_type, args) VALUES (%s, %s, %s::jsonb)
               ON CONFLICT (job_id) DO UPDATE SET job_type = excluded.job_type,
                   args = excluded.args, updated_at = now()""",
            (job_id, job_type, json.dumps(args, default=str)),
        )

    def start_run(self, job_id: str, run_id: str) -> int:
        """Insert a running run; close runs a dead process left open. Returns how many."""
        stale = self._exec(
            """UPDATE {s}.runs SET status = 'failed', completed_at = now(),
                   report = coalesce(report, '{{}}'::jsonb) || jsonb_build_object('stale_note', %s::text)
               WHERE job_id = %s AND status = 'running'""",
            (STALE_RUN_MESSAGE, job_id),
        ).rowcount
        self._exec(
            "INSERT INTO {s}.runs (run_id, job_id, status, host, pid) VALUES (%s, %s, 'running', %s, %s)",
            (run_id, job_id, socket.gethostname(), os.getpid()),
        )
        return stale

    def heartbeat(self, run_id: str, progress: dict[str, Any] | None = None) -> None:
        self._exec("UPDATE {s}.runs SET heartbeat_at = now(), progress = coalesce(%s::jsonb, "
                   "progress) WHERE run_id = %s AND status = 'running'",
                   (json.dumps(progress, default=str) if progress else None, run_id))

    def finish_run(self, run_id: str, status: Status, report: dict[str, Any]) -> None:
        self._exec(
            """UPDATE {s}.runs SET status = %s, completed_at = now(), heartbeat_at = now(),
                   report = %s::jsonb WHERE run_id = %s""",
            (status.value, json.dumps(report, default=str), run_id),
        )

    def running_run(self, job_id: str) -> tuple[str, int, str] | None:
        row = self._exec(
            """SELECT host, pid, to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS"Z"')
               FROM {s}.runs WHERE job_id = %s AND status = 'running'
               ORDER BY started_at DESC LIMIT 1""",
            (job_id,),
        ).fetchone()
        return (row[0], int(row[1]), row[2]) if row else None

    # -- control requests: `etl pause|resume|cancel JOB` from any process ---------------
    def request(self, job_id: str, action: str, *, handled_by: str | None = None) -> int:
        """Record a control request (``pause``, ``resume``, ``cancel``); a request that needs
        no run to act on it is recorded as handled (``handled_by``: the run, if any). A
        resume settles the pauses no run has acted on yet (made while the job was idle):
        the next run must not stop for them."""
        if action == "resume":
            self._exec(
                """UPDATE {s}.control_requests SET handled_at = now(), handled_by = %s
                   WHERE job_id = %s AND handled_at IS NULL AND action = 'pause'""",
                (handled_by, job_id))
        row = self._exec(
            """INSERT INTO {s}.control_requests (job_id, action, requested_by, handled_at,
                   handled_by)
               VALUES (%s, %s, %s, CASE WHEN %s THEN now() END, %s) RETURNING id""",
            (job_id, action, f"{socket.gethostname()}:{os.getpid()}",
             action == "resume", handled_by)).fetchone()
        assert row is not None
        return int(row[0])

    def pending_request(self, job_id: str) -> tuple[int, str] | None:
        """The oldest pause or cancel request not acted on yet."""
        row = self._exec(
            """SELECT id, action FROM {s}.control_requests
               WHERE job_id = %s AND handled_at IS NULL AND action IN ('pause', 'cancel')
               ORDER BY id LIMIT 1""", (job_id,)).fetchone()
        return (int(row[0]), str(row[1])) if row else None

    def handle_requests(self, job_id: str, run_id: str) -> None:
        """Mark the job's pending requests handled by ``run_id`` (it stopped for them)."""
        self._exec(
            """UPDATE {s}.control_requests SET handled_at = now(), handled_by = %s
               WHERE job_id = %s AND handled_at IS NULL""", (run_id, job_id))

    def paused_at(self, job_id: str) -> str | None:
        """When the job was paused, if its latest pause or resume request is a pause (acted
        on or not): a paused job stays paused — later runs too — until `etl resume`."""
        row = self._exec(
            """SELECT action, to_char(requested_at AT TIME ZONE 'UTC',
                   'YYYY-MM-DD"T"HH24:MI:SS"Z"')
               FROM {s}.control_requests WHERE job_id = %s AND action IN ('pause', 'resume')
               ORDER BY id DESC LIMIT 1""", (job_id,)).fetchone()
        return str(row[1]) if row and row[0] == "pause" else None

    # -- reading, for `etl runs`, `etl report`, `etl status` -------------------
    def report(self, run_id: str) -> dict[str, Any] | None:
        import uuid

        try:
            uuid.UUID(run_id)
        except ValueError:
            return None
        row = self._exec("SELECT report, status FROM {s}.runs WHERE run_id = %s", (run_id,)).fetchone()
        if row is None:
            return None
        report, status = row
        if report and "job_id" in report:
            return report
        # a run still going, or one a dead process left open: what is known of it
        return {"run_id": run_id, "status": status, **(report or {})}

    def runs(self, job_id: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        cur = self._exec(
            """SELECT run_id::text, job_id, status, host, pid,
                      to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                      to_char(completed_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                      report -> 'summary'
               FROM {s}.runs WHERE (%(job)s::text IS NULL OR job_id = %(job)s)
               ORDER BY started_at DESC LIMIT %(limit)s""",
            {"job": job_id, "limit": limit},
        )
        cols = ["run_id", "job_id", "status", "host", "pid", "started_at", "completed_at", "summary"]
        return [dict(zip(cols, r, strict=True)) for r in cur]

    def jobs(self, job_id: str | None = None,
             stale_after: float = STALE_AFTER_SECONDS) -> list[dict[str, Any]]:
        """Every job (or one): its status — ``stale`` for a run left ``running`` whose
        heartbeat is older than ``stale_after`` seconds (its process died; the job's next
        run closes it) —, its last run with its live progress, and its checkpoint."""
        cur = self._exec(
            """SELECT j.job_id, j.job_type, r.status, r.run_id::text, r.host, r.pid,
                      to_char(r.heartbeat_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
                      extract(epoch FROM now() - r.heartbeat_at)::float8, r.progress,
                      c.chunk_index, c.last_key, c.processed, c.succeeded, c.failed, c.skipped,
                      c.finished,
                      to_char(c.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
               FROM {s}.jobs j
               LEFT JOIN LATERAL (SELECT * FROM {s}.runs r WHERE r.job_id = j.job_id
                                  ORDER BY started_at DESC LIMIT 1) r ON true
               LEFT JOIN {s}.checkpoints c ON c.job_id = j.job_id AND c.partition = ''
               WHERE (%(job)s::text IS NULL OR j.job_id = %(job)s)
               ORDER BY j.job_id""",
            {"job": job_id},
        )
        out = []
        for (jid, jtype, status, run_id, host, pid, heartbeat, age, live, chunk_index, last_key,
             processed, succeeded, failed, skipped, finished, cp_time) in cur:
            if status == "running" and age is not None and age > stale_after:
                status = "stale"
            out.append({
                "job_id": jid, "job_type": jtype, "status": status or "never run",
                "last_run": {"run_id": run_id, "host": host, "pid": pid, "heartbeat_at": heartbeat,
                             "heartbeat_age_seconds": round(age, 1) if age is not None else None,
                             "progress": live}
                if run_id else None,
                "checkpoint": None if chunk_index is None else {
                    "chunk_index": chunk_index, "last_key": last_key, "processed_count": processed,
                    "succeeded": succeeded, "failed": failed, "skipped": skipped,
                    "finished": finished, "timestamp": cp_time},
            })
        for job in out:  # `etl pause` holds a job until `etl resume`, run or not
            job["paused_at"] = self.paused_at(job["job_id"])
            if job["paused_at"] and job["status"] != "running":
                job["status"] = "paused"
        return out

    def job_args(self, job_id: str) -> dict[str, Any] | None:
        row = self._exec("SELECT args FROM {s}.jobs WHERE job_id = %s", (job_id,)).fetchone()
        return dict(row[0] or {}) if row else None
