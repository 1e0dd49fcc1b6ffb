"""The life of one run in the state store: schema, lock, job row, run row, report.

    with JobRun(state_url, job_id, "copy", args) as run:   # lock taken, or JobLockedError
        ...                                                # run.run_id, run.store
        run.finish(result)                                 # report stored
"""

from __future__ import annotations

import threading
import time
import uuid
from types import TracebackType
from typing import Any

from . import pg
from .errors import EtlError
from .report import Result
from .state import lock
from .state.schema import DEFAULT_SCHEMA
from .state.store import StateStore
from .urls import DbUrl

# A running job marks itself alive (with its progress) this often, from a thread.
HEARTBEAT_SECONDS = 1.0
# ... and asks the state store for `etl pause`/`etl cancel` requests at most this often.
CONTROL_SECONDS = 0.2
# The command line of this process's `etl` command (set by the CLI), kept with the job so
# that `etl resume JOB` can run it again; None for a job started from Python.
INVOKED_AS: list[str] | None = None


def _invocation() -> dict[str, Any]:
    """The command line this job was started with, passwords masked (and whether one was)."""
    if INVOKED_AS is None:
        return {}
    from .urls import mask

    masked = [mask(a) for a in INVOKED_AS]
    return {"argv": masked, "argv_had_secret": masked != list(INVOKED_AS)}


class JobRun:
    """Holds the job's advisory lock on an autocommit state-store connection."""

    def __init__(self, state_url: DbUrl, job_id: str, job_type: str, args: dict[str, Any],
                 *, schema: str = DEFAULT_SCHEMA) -> None:
        self.state_url = state_url
        self.job_id = job_id
        self.job_type = job_type
        self.args = args
        self.schema = schema
        self.run_id = str(uuid.uuid4())
        self.stale_runs_closed = 0
        self._store: StateStore | None = None
        self._last_control = 0.0
        self.progress: dict[str, Any] = {}  # the latest snapshot, written by the heartbeats
        self._beats: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def store(self) -> StateStore:
        assert self._store is not None, "JobRun used outside its with-block"
        return self._store

    def __enter__(self) -> JobRun:
        conn = pg.connect(self.state_url, "state", autocommit=True)
        try:
            store = StateStore(conn, self.schema)
            store.ensure()
            lock.acquire(conn, self.job_id)
            store.register_job(self.job_id, self.job_type, {**self.args, **_invocation()})
        except BaseException:
            conn.close()
            raise
        self._store = store
        return self

    def ensure_connected(self) -> None:
        """Reopen the state-store connection if it dropped, and take the job's lock again.

        The lock went with the old session; if another run took it meanwhile,
        this run must not write another chunk (JobLockedError).
        """
        if pg.is_usable(self.store.conn):
            return
        conn = pg.connect(self.state_url, "state", autocommit=True, reconnect=True)
        try:
            lock.acquire(conn, self.job_id)
        except BaseException:
            conn.close()
            raise
        self.store.conn = conn

    def assert_lock_held(self) -> None:
        """Fail (transiently) unless the session holding the job's lock is still alive.

        Called just before a chunk commits: a session-level advisory lock lasts as long
        as its session, so a live session means the lock is still ours. A dead one
        raises, the chunk rolls back, and the retry reconnects and re-takes the lock —
        so two runs of one job never commit chunks at the same time.
        """
        self.store.conn.execute("SELECT 1")

    def heartbeat(self, progress: dict[str, Any] | None = None) -> None:
        """Note the run's progress after a chunk; the heartbeat thread writes it (with the
        run's heartbeat) about every HEARTBEAT_SECONDS, also while a long chunk runs."""
        if progress is not None:
            self.progress = progress

    def start_heartbeats(self) -> None:
        """Mark the run alive from a thread of its own, on a connection of its own (the
        job's state connection may be inside a chunk's transaction): `etl status` shows a
        run whose heartbeat stopped as stale. A state store out of reach is tried again
        at the next beat."""
        if self._beats is not None:
            return
        self._beats = threading.Thread(target=self._beat, name="etl-heartbeat", daemon=True)
        self._beats.start()

    def _beat(self) -> None:
        import psycopg

        conn: psycopg.Connection | None = None
        while not self._stopping.wait(HEARTBEAT_SECONDS):
            try:
                if conn is None or conn.closed:
                    conn = pg.connect(self.state_url, "state", autocommit=True)
                StateStore(conn, self.schema).heartbeat(self.run_id, self.progress)
            except (psycopg.Error, EtlError):
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def control(self) -> str | None:
        """A pending ``pause`` or ``cancel`` request for this job (asked at most every
        CONTROL_SECONDS; a state store that cannot be reached is asked again later)."""
        import psycopg

        now = time.monotonic()
        if now - self._last_control < CONTROL_SECONDS:
            return None
        self._last_control = now
        try:
            found = self.store.pending_request(self.job_id)
        except psycopg.OperationalError:
            return None
        return found[1] if found else None

    def handled(self) -> None:
        """The run stopped for the job's pending requests: mark them handled."""
        self.store.handle_requests(self.job_id, self.run_id)

    def paused_at(self) -> str | None:
        return self.store.paused_at(self.job_id)

    def begin(self) -> None:
        """Record the run as running (closing runs a dead process left open), and start
        its heartbeats."""
        self.stale_runs_closed = self.store.start_run(self.job_id, self.run_id)
        self.start_heartbeats()

    def finish(self, result: Result) -> None:
        self.store.finish_run(self.run_id, result.status, result.to_dict())

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stopping.set()
        if self._beats is not None:
            self._beats.join(timeout=10)
            self._beats = None
        if self._store is not None:
            self._store.conn.close()  # releases the advisory lock with the session
            self._store = None
