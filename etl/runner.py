"""The chunk loop: size → step (read, write, checkpoint in one transaction) → pace.

The loop knows nothing about tables. A *step* does one chunk and commits it
with its checkpoint; the loop decides how big the next chunk is, when to stop
(end of data, SIGINT/SIGTERM, --max-runtime), how fast to go (--max-rate,
--sleep) and reports progress. Stopping always happens at a chunk boundary.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .model import Checkpoint, Status
from .progress import NoProgress, Progress
from .report import RowError
from .retry import RetryPolicy, RetryStats, is_transient
from .retry import call as retry_call

log = logging.getLogger(__name__)

# Adaptive chunk size (--chunk-size auto): start small, then aim at --chunk-seconds.
AUTO_FIRST_CHUNK = 20_000          # small enough to learn the rate in well under a second
AUTO_MIN_CHUNK = 1_000             # below this, per-chunk overhead dominates
AUTO_MAX_CHUNK = 1_000_000         # bounds memory held by one COPY transaction's WAL and locks
AUTO_MAX_GROWTH = 4.0              # grow at most ×4 per chunk: reach the target in a few chunks
                                   # without one fast chunk overshooting it
RATE_SMOOTHING = 0.3               # EWMA weight of the newest chunk's rows/s
DEFAULT_CHUNK_SECONDS = 2.0        # SPEC.md default for --chunk-seconds


@dataclass(frozen=True)
class Pacing:
    """How big chunks are and how fast and how long the loop may go."""

    chunk_size: int | None = None          # None = auto
    chunk_seconds: float = DEFAULT_CHUNK_SECONDS
    min_chunk: int = AUTO_MIN_CHUNK
    max_chunk: int = AUTO_MAX_CHUNK
    max_rate: float | None = None          # rows per second
    sleep: float = 0.0                     # seconds between chunks
    max_runtime: float | None = None       # seconds


class ChunkSizer:
    """Fixed size, or auto: an EWMA of rows/s times the target chunk duration."""

    def __init__(self, pacing: Pacing) -> None:
        self.fixed = pacing.chunk_size
        self.target = pacing.chunk_seconds
        self.lo, self.hi = pacing.min_chunk, pacing.max_chunk
        if pacing.max_rate:  # a chunk should not take longer than the target at the capped rate
            self.hi = max(self.lo, min(self.hi, int(pacing.max_rate * self.target)))
        self.size = self.fixed or max(self.lo, min(AUTO_FIRST_CHUNK, self.hi))
        self.rate: float | None = None

    def next_size(self) -> int:
        return self.size

    def observe(self, rows: int, seconds: float) -> None:
        if self.fixed or rows <= 0 or seconds <= 0:
            return
        if rows < self.size:  # a short last chunk says nothing about the rate
            return
        now = rows / seconds
        self.rate = now if self.rate is None else RATE_SMOOTHING * now + (1 - RATE_SMOOTHING) * self.rate
        wanted = int(self.rate * self.target)
        slow = seconds > 2 * self.target
        if slow:  # a slow chunk: shrink at once, without smoothing
            wanted = int(now * self.target)
        size = max(self.lo, min(self.hi, wanted, int(self.size * AUTO_MAX_GROWTH)))
        if size != self.size:
            log.info("chunk size %s to %d rows (last chunk: %d rows in %.2fs, %.0f rows/s%s; "
                     "target %.2fs)", "grows" if size > self.size else "shrinks", size, rows,
                     seconds, now, ", slow" if slow else "", self.target)
        self.size = size


class StopFlag:
    """Set by SIGINT/SIGTERM (or a caller); the loop stops at the next chunk boundary."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        self.reason = self.reason or reason
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()

    @property
    def event(self) -> threading.Event:
        """Set once stopping is asked for (for waits that watch it)."""
        return self._event


@contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the current chunk, then stop. Second SIGINT: abort now."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.set(f"received {name}")

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@dataclass
class StepOutcome:
    """What a step reports after committing one chunk."""

    checkpoint: Checkpoint
    rows: int
    bytes: int
    errors: list[RowError] = field(default_factory=list)  # rows that became dead letters
    total: int | None = None  # a better estimate of the job's total rows, for progress
    seconds: float | None = None  # how long the chunk took (set by the loop)


Step = Callable[[Checkpoint, int], StepOutcome | None]
# A step may also have ``committed(cp) -> Checkpoint | None``, called before each retry of
# the chunk after ``cp``: when the failed attempt's transaction committed after all (the
# connection was lost after the server committed, before the client heard so), it returns
# the stored checkpoint, and the chunk is not written a second time.


@dataclass
class LoopResult:
    status: Status
    checkpoint: Checkpoint
    chunks: int
    rows: int
    bytes: int
    last_chunk_size: int
    message: str | None = None


def run_loop(step: Step, start: Checkpoint, pacing: Pacing, *,
             stop: StopFlag | None = None, progress: Progress | None = None,
             on_chunk: Callable[[StepOutcome], None] | None = None,
             retry: RetryPolicy | None = None, retries: RetryStats | None = None,
             before_chunk: Callable[[Callable[[], bool]], None] | None = None,
             control: Callable[[], str | None] | None = None) -> LoopResult:
    """Run ``step`` until it returns None (no more rows) or the loop must stop.

    A step that fails transiently is retried (``retry``) from the same checkpoint:
    its transaction rolled back, so nothing of the failed attempt remains.
    ``before_chunk(should_stop)`` runs before each chunk and may wait (for a lagging
    replica, say) as long as ``should_stop()`` is false. ``control()`` is asked before each
    chunk for a request from another process: ``pause`` or ``cancel`` ends the loop there.
    """
    stop = stop if stop is not None else StopFlag()
    policy = retry or RetryPolicy()
    retries = retries if retries is not None else RetryStats()
    progress = progress or NoProgress()
    sizer = ChunkSizer(pacing)
    cp = start
    t0 = time.monotonic()
    rows = nbytes = chunks = 0
    def out_of_time() -> bool:
        return pacing.max_runtime is not None and time.monotonic() - t0 >= pacing.max_runtime

    waited = False
    while True:
        if stop:
            return LoopResult(Status.STOPPED, cp, chunks, rows, nbytes, sizer.size,
                              f"stopped at a chunk boundary ({stop.reason}); rerun to resume")
        if out_of_time():
            return LoopResult(Status.STOPPED, cp, chunks, rows, nbytes, sizer.size,
                              f"stopped after --max-runtime {pacing.max_runtime:g}s; rerun to resume")
        asked = control() if control is not None else None
        if asked == "pause":
            return LoopResult(Status.PAUSED, cp, chunks, rows, nbytes, sizer.size,
                              "paused at a chunk boundary (etl pause); `etl resume` goes on")
        if asked == "cancel":
            return LoopResult(Status.CANCELLED, cp, chunks, rows, nbytes, sizer.size,
                              "cancelled at a chunk boundary (etl cancel); the checkpoint "
                              "stays: a rerun resumes, --restart starts over")
        if before_chunk is not None and not waited:
            before_chunk(lambda: bool(stop) or out_of_time())
            waited = True
            continue  # the wait may have run out the time, or been asked to stop
        waited = False
        size = sizer.next_size()
        c0 = time.monotonic()
        try:
            outcome = retry_call(_attempts(step, cp, size), policy, retries,
                                 f"chunk {cp.chunk_index + 1}", should_stop=lambda: bool(stop))
        except Exception as exc:
            if stop and is_transient(exc):  # asked to stop while retrying: stop, resumable
                return LoopResult(Status.STOPPED, cp, chunks, rows, nbytes, sizer.size,
                                  f"stopped while retrying ({stop.reason}); rerun to resume")
            raise
        if outcome is None:
            return LoopResult(Status.COMPLETED, cp, chunks, rows, nbytes, sizer.size)
        seconds = time.monotonic() - c0
        outcome.seconds = seconds
        cp = outcome.checkpoint
        chunks += 1
        rows += outcome.rows
        nbytes += outcome.bytes
        sizer.observe(outcome.rows, seconds)
        progress.advance(outcome.rows, outcome.bytes)
        retotal = getattr(progress, "retotal", None)  # optional (see etl.progress)
        if outcome.total is not None and retotal is not None:
            retotal(outcome.total)
        if on_chunk is not None:
            on_chunk(outcome)
        # a short chunk was the last one: no --sleep before finding the end (--max-rate
        # still holds, so the run's average stays under it)
        _pace(pacing, t0, rows, stop, sleep=outcome.rows >= size)


def _attempts(step: Step, cp: Checkpoint, size: int) -> Callable[[], StepOutcome | None]:
    """One try of the chunk after ``cp`` per call; a retry first asks the step whether the
    failed try committed after all (see ``Step``)."""
    tries = 0

    def attempt() -> StepOutcome | None:
        nonlocal tries
        tries += 1
        committed = getattr(step, "committed", None)
        if tries > 1 and committed is not None:
            stored = committed(cp)
            if stored is not None and stored.chunk_index > cp.chunk_index:
                log.warning("chunk %d had committed before its connection was lost; it is not "
                            "written again", cp.chunk_index + 1)
                return StepOutcome(stored, stored.processed - cp.processed, stored.bytes - cp.bytes)
        return step(cp, size)

    return attempt


def _pace(pacing: Pacing, t0: float, rows: int, stop: StopFlag, *, sleep: bool = True) -> None:
    """Sleep for --sleep, and long enough that rows/elapsed stays under --max-rate."""
    wait = pacing.sleep if sleep else 0.0
    if pacing.max_rate:
        wait = max(wait, rows / pacing.max_rate - (time.monotonic() - t0))
    deadline = time.monotonic() + wait
    while not stop and time.monotonic() < deadline:
        time.sleep(min(0.1, deadline - time.monotonic()))
