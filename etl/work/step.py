"""One chunk of a generic job: the next rows of the source, the function called for each
(or once for the chunk), the results written back, then the dead letters and the
checkpoint in one state-store transaction.

Per item: a permanent failure is that item's dead letter and the chunk goes on. Per
chunk (``batch=True``): a call that fails permanently is split in halves and called
again, down to the items that fail alone — those are the dead letters. Results (what
the function returned) are upserted into the results table before the checkpoint
commits: replaying a chunk after a crash writes the same rows again, harmlessly.

The side effects of the function (an HTTP call, say) are outside any transaction: after
a ``kill -9`` the items of the chunk in flight are called again on the rerun — at most one
chunk's worth (``chunk_size``); committed chunks never are. A stop (SIGTERM, Ctrl-C,
``--max-runtime`` at the next item) commits the items done so far.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..model import Category, Checkpoint
from ..report import RowError, utc_now
from ..runner import StepOutcome, StopFlag
from ..state.store import insert_dead_letters, write_checkpoint
from .calls import Caller, ItemRetriesExhausted, StoppedWhileRetrying

if TYPE_CHECKING:
    from ..jobrun import JobRun
    from ..thresholds import ErrorLimits
    from .results import ResultsTable
    from .source import ItemSource

log = logging.getLogger(__name__)

MESSAGE_CHARS = 1000  # of an exception's text kept with its dead letter


@dataclass
class Done:
    """The items of a chunk worked so far: results to write, dead letters to record."""

    results: list[tuple[tuple[Any, ...], Any]] = dataclasses.field(default_factory=list)
    letters: list[tuple[int, BaseException, int]] = dataclasses.field(default_factory=list)
    count: int = 0  # items done, in key order: the checkpoint moves past these


class ItemStep:
    """Called by the runner with the checkpoint and a chunk size."""

    def __init__(self, source: ItemSource, caller: Caller, run: JobRun, *, batch: bool,
                 results: ResultsTable | None, limits: ErrorLimits, state_schema: str,
                 stop: StopFlag) -> None:
        self.source, self.caller, self.run = source, caller, run
        self.batch, self.results, self.limits = batch, results, limits
        self.state_schema, self.stop = state_schema, stop

    def close(self) -> None:
        self.source.close()
        if self.results is not None:
            self.results.close()

    def metadata(self) -> dict[str, Any]:
        """The function's retries (by exception class), for the report."""
        stats = self.caller.stats
        return {"item_retries": stats.total, "item_retries_by_reason": dict(stats.by_reason)}

    def committed(self, cp: Checkpoint) -> Checkpoint | None:
        from ..state.store import committed_after_all

        return committed_after_all(self.run.store.conn, cp.job_id, self.run.run_id, cp,
                                   self.state_schema)

    def __call__(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        self.source.ensure_connected()
        self.run.ensure_connected()
        got = self.source.read(self.source.resume_key(cp), size)
        if got is None:
            return None
        rows, keys = got
        done = Done()
        index = cp.chunk_index + 1
        ended: BaseException | None = None
        try:
            if self.batch:
                self._batch(rows, keys, list(range(len(rows))), done, index)
                done.count = len(rows)
            else:
                for i, row in enumerate(rows):
                    if self.stop:
                        break
                    self._item(row, keys[i], i, done, index)
                    done.count = i + 1
        except StoppedWhileRetrying:
            pass  # the item waiting for its retry was not done: it is the next one
        except ItemRetriesExhausted as exc:
            ended = exc
        if done.count == 0:
            if ended is not None:
                raise ended
            return StepOutcome(cp, 0, 0)
        outcome = self._commit(cp, rows, keys, done, index)
        if ended is not None:
            raise ended
        return outcome

    # -- calls -----------------------------------------------------------------------------
    def _item(self, row: dict[str, Any], key: tuple[Any, ...], i: int, done: Done,
              index: int) -> None:
        called = self.caller(row, 1, f"item {_key_text(key)} (chunk {index})")
        if called.error is None:
            done.results.append((key, called.value))
        else:
            done.letters.append((i, called.error, called.attempts))

    def _batch(self, rows: list[dict[str, Any]], keys: list[tuple[Any, ...]],
               which: list[int], done: Done, index: int) -> None:
        """Call the function on the rows ``which``; halve a failing call down to single
        items."""
        if not which:
            return
        what = (f"chunk {index}, items {_key_text(keys[which[0]])}…{_key_text(keys[which[-1]])}"
                if len(which) > 1 else f"item {_key_text(keys[which[0]])} (chunk {index})")
        called = self.caller([rows[i] for i in which], len(which), what)
        if called.error is None:
            values = called.value
            if values is None:
                values = [None] * len(which)
            elif not isinstance(values, list) or len(values) != len(which):
                from ..errors import UsageError

                raise UsageError(f"the function returned {type(values).__name__} for a chunk "
                                 f"of {len(which)} rows; with batch=True it returns None or a "
                                 "list with one result per row")
            done.results.extend((keys[i], v) for i, v in zip(which, values, strict=True))
            return
        if len(which) == 1:
            done.letters.append((which[0], called.error, called.attempts))
            return
        half = len(which) // 2
        log.info("%s failed (%s): calling its halves", what, type(called.error).__name__)
        self._batch(rows, keys, which[:half], done, index)
        self._batch(rows, keys, which[half:], done, index)

    # -- the commit --------------------------------------------------------------------------
    def _commit(self, cp: Checkpoint, rows: list[dict[str, Any]], keys: list[tuple[Any, ...]],
                done: Done, index: int) -> StepOutcome:
        from ..sql_copy_io import key_to_json

        if self.results is not None:
            self.results.write([(k, v) for k, v in done.results if v is not None])
        last = key_to_json(keys[done.count - 1])
        failed = len(done.letters)
        letters: list[dict[str, Any]] = [{"job_id": cp.job_id, "run_id": self.run.run_id, "chunk_index": index,
                    "item_key": key_to_json(keys[i]), "row_data": _jsonable(rows[i]),
                    "error_type": type(exc).__name__, "sqlstate": None,
                    "category": Category.DATA.value,
                    "error_message": " ".join(str(exc).split())[:MESSAGE_CHARS] or
                    type(exc).__name__, "attempts": attempts}
                   for i, exc, attempts in done.letters]
        new = dataclasses.replace(
            cp, chunk_index=index, last_key=tuple("" if v is None else str(v) for v in last),
            last_key_json=last, processed=cp.processed + done.count,
            succeeded=cp.succeeded + done.count - failed, failed=cp.failed + failed,
            outcomes={**cp.outcomes, "done": cp.outcomes.get("done", 0) + done.count - failed},
            run_id=self.run.run_id, updated_at=utc_now())
        store = self.run.store.conn
        with store.transaction():
            self.run.assert_lock_held()
            insert_dead_letters(store, letters, self.state_schema)
            write_checkpoint(store, new, schema=self.state_schema)
        errors = [RowError(item_identifier=json.dumps(d["item_key"], default=str),
                           error_type=d["error_type"], category=d["category"],
                           error_message=d["error_message"], chunk_index=index,
                           retry_attempts=d["attempts"] - 1) for d in letters]
        if failed:
            # the chunk's side effects happened: it is committed, then the limits are judged
            self.limits.check(new.failed, new.processed, errors[-1].error_message)
        return StepOutcome(new, done.count, 0, errors=errors)


def _key_text(key: tuple[Any, ...]) -> str:
    return json.dumps(list(key), default=str)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    from ..sql_copy_io import jsonable

    return {k: jsonable(v) for k, v in row.items()}


def describe_fn(fn: Callable[..., Any]) -> str:
    """``module:qualname`` of the function, for the job's record."""
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


__all__ = ["ItemStep", "describe_fn"]
