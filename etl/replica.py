"""``--replica URL --max-lag DURATION``: wait before a chunk while a streaming replica lags.

A retention job or a backfill can write faster than a replica replays, and an
application reading from that replica then sees stale data (or the replica falls
so far behind that it needs rebuilding). Before each chunk, the replica is asked
how far behind it is: 0 when it has replayed everything it received, else the age
of the last transaction it replayed. While that is more than ``--max-lag``, no
chunk starts; the wait is logged and counted in the report. SIGINT/SIGTERM and
``--max-runtime`` still stop the job during a wait (at the chunk boundary it is).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import pg
from .errors import UsageError

if TYPE_CHECKING:
    import psycopg

    from .urls import DbUrl

log = logging.getLogger(__name__)

# --max-lag: how far behind a --replica may be before chunks wait (pt-archiver's default is
# 1 s; 30 s lets a busy replica breathe without stalling the job at every small hiccup)
DEFAULT_MAX_LAG_SECONDS = 30.0
# How often a lagging replica is asked again (short: a caught-up replica frees the job
# at once; the query is a few catalog functions).
POLL_SECONDS = 0.25
# A wait is logged when it starts and then at most this often.
LOG_EVERY_SECONDS = 10.0

_LAG_SQL = """
SELECT pg_is_in_recovery(),
       CASE WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn()
            THEN 0
            ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 0)
       END
"""


class ReplicaGuard:
    """Asks a streaming replica for its replay lag; ``wait`` holds the next chunk back."""

    def __init__(self, url: DbUrl, max_lag: float) -> None:
        self.url = url
        self.max_lag = max_lag
        self.waited_seconds = 0.0
        self.waits = 0
        self._conn: psycopg.Connection | None = None

    def check(self) -> None:
        """Connect now and refuse a server that is not a replica (a usage error)."""
        in_recovery, _ = self._ask()
        if not in_recovery:
            raise UsageError(f"--replica {self.url.masked} is not a replica (it is not in "
                             "recovery): give the URL of a streaming standby of the database "
                             "being written")

    def lag(self) -> float:
        """Seconds the replica is behind (0 when it has replayed all it received). A replica
        that cannot be asked counts as lagging without end: no chunk goes until it answers."""
        from .errors import EtlError

        try:
            return float(self._ask()[1])
        except EtlError as exc:
            log.warning("cannot ask the replica for its lag (%s); waiting", exc)
            self._conn = None
            return float("inf")

    def wait(self, should_stop: Callable[[], bool]) -> None:
        """Return once the replica lags at most ``max_lag`` (or the job must stop)."""
        lag = self.lag()
        if lag <= self.max_lag:
            return
        self.waits += 1
        started = last_log = time.monotonic()
        log.warning("replica %s lags %s (more than --max-lag %gs): waiting before the next "
                    "chunk", self.url.masked, _seconds(lag), self.max_lag)
        while lag > self.max_lag and not should_stop():
            time.sleep(POLL_SECONDS)
            lag = self.lag()
            if time.monotonic() - last_log >= LOG_EVERY_SECONDS:
                last_log = time.monotonic()
                log.warning("replica still lags %s; waited %.0fs so far", _seconds(lag),
                            last_log - started)
        self.waited_seconds += time.monotonic() - started

    def metadata(self) -> dict[str, object]:
        return {"replica": self.url.masked, "max_lag_seconds": self.max_lag,
                "replica_waits": self.waits,
                "replica_wait_seconds": round(self.waited_seconds, 3)}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _ask(self) -> tuple[bool, float]:
        import psycopg

        if self._conn is None or not pg.is_usable(self._conn):
            self._conn = pg.connect(self.url, "replica", autocommit=True)
        try:
            row = self._conn.execute(_LAG_SQL).fetchone()
        except psycopg.OperationalError as exc:
            from .errors import ConnectionLostError

            raise ConnectionLostError(f"the replica {self.url.masked}: "
                                      f"{pg.describe_error(exc, self.url)}") from exc
        assert row is not None
        return bool(row[0]), float(row[1] or 0)


def _seconds(lag: float) -> str:
    return "(unknown)" if lag == float("inf") else f"{lag:.1f}s"


__all__ = ["ReplicaGuard"]
