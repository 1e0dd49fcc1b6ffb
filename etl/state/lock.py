"""One active run per job: a session-level PostgreSQL advisory lock.

The lock lives as long as the state-store connection, so a process that dies
(even by ``kill -9``) releases it with its connection: no stale lock files.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from ..errors import JobLockedError

if TYPE_CHECKING:
    import psycopg


def lock_key(job_id: str) -> int:
    """A stable signed 64-bit lock id for ``job_id``."""
    digest = hashlib.blake2b(f"etl.job:{job_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def acquire(conn: psycopg.Connection, job_id: str) -> None:
    """Take the job's lock on ``conn`` (autocommit) or raise JobLockedError naming the holder."""
    key = lock_key(job_id)
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
    if row and row[0]:
        return
    holder = holder_of(conn, key)
    raise JobLockedError(
        f"job {job_id!r} is already running ({holder}); wait for it to finish, "
        f"or stop it first (SIGTERM to that process stops it at the next chunk boundary)",
        holder=holder,
    )


def release(conn: psycopg.Connection, job_id: str) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key(job_id),))


def holder_of(conn: psycopg.Connection, key: int) -> str:
    """'host H, pid P' of the session holding advisory lock ``key``, from pg_stat_activity."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    row = conn.execute(
        """SELECT a.application_name, a.client_addr::text, a.pid
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
             AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid
           LIMIT 1""",
        (unsigned >> 32, unsigned & 0xFFFF_FFFF),
    ).fetchone()
    if row is None:
        return "holder unknown"
    app, client, backend = row
    parts = (app or "").split(":", 3)  # etl:ROLE:PID:HOST (see pg.application_name)
    if len(parts) == 4 and parts[0] == "etl" and parts[2].isdigit():
        return f"held by host {parts[3]}, pid {parts[2]}"
    return f"held by database session {backend} from {client or 'local socket'} ({app or 'no application_name'})"
