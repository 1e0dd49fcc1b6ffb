"""``etl.run_chunks(...)``: any Python function over the rows of a keyed source, with the
checkpoints, retries, rate limit, dead letters, thresholds, progress and report of the
other jobs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import options as opt
from ..errors import UsageError
from ..model import Checkpoint
from ..report import Result, utc_now
from ..retry import DEFAULT_RETRIES, DEFAULT_RETRY_BASE_SECONDS, DEFAULT_RETRY_MAX_WAIT_SECONDS
from ..runner import DEFAULT_CHUNK_SECONDS, StopFlag, stop_on_signals
from ..state.schema import DEFAULT_SCHEMA
from ..thresholds import DEFAULT_MAX_ERROR_RATE, ErrorLimits
from ..urls import DbUrl, parse
from .source import Query

if TYPE_CHECKING:
    from ..progress import Progress, ProgressOption

# A generic job's default chunk: a service called item by item is slow next to a
# database, so a chunk (and what a kill -9 can make it call twice) stays small.
DEFAULT_ITEM_CHUNK = 100
# Progress totals count the source's rows up to this many (then "at least").
COUNT_CAP = 1_000_000


def run_chunks(*, source: Query, fn: Callable[[Any], Any], job: str,
               chunk_size: int | str | None = DEFAULT_ITEM_CHUNK, batch: bool = False,
               transient: type[BaseException] | tuple[type[BaseException], ...] = (),
               retries: int = DEFAULT_RETRIES, retry_base: float = DEFAULT_RETRY_BASE_SECONDS,
               retry_max_wait: str | float = DEFAULT_RETRY_MAX_WAIT_SECONDS,
               max_rate: float | None = None, sleep: float | None = None,
               max_runtime: str | float | None = None, max_errors: int | None = None,
               max_error_rate: float | None = DEFAULT_MAX_ERROR_RATE,
               results_to: str | DbUrl | None = None, results_table: str | None = None,
               state: str | DbUrl | None = None, state_schema: str = DEFAULT_SCHEMA,
               chunk_seconds: float = DEFAULT_CHUNK_SECONDS, min_chunk: int | None = None,
               max_chunk: int | None = None, restart: bool = False,
               report: str | Path | None = None, progress: ProgressOption = False,
               stop: StopFlag | None = None) -> Result:
    """Call ``fn`` for every row of ``source`` (an :class:`etl.Query`), in key order, in
    resumable chunks — the batch work that is not a table copy: call an HTTP API for each
    product, send notifications, recompute a value in Python::

        etl.run_chunks(source=etl.Query(url, "select id, payload from products", key="id"),
                       fn=push_to_api, job="sync-products", chunk_size=100,
                       max_rate=10, transient=(TimeoutError, RateLimited), retries=5)

    ``fn(row)`` gets each row as a dict; with ``batch=True`` ``fn(rows)`` gets a chunk's
    rows (a list) and returns None or one result per row. An exception of a ``transient``
    class is retried ``retries`` times with exponential backoff and jitter (``retry_base``
    seconds first, at most ``retry_max_wait``; an exception with a ``retry_after``
    attribute, seconds, waits at least that); any other exception fails that item only: it
    becomes a dead letter (``etl dlq list --job JOB``) and the chunk goes on (a failing
    batch is halved down to the items that fail alone). A transient failure that outlasts
    its retries stops the run (failed, exit 1) with the items before it committed.
    ``max_errors``/``max_error_rate`` stop the run when too many items fail; ``max_rate``
    (items a second, retries included) and ``sleep`` (between chunks) pace it.

    After each chunk its dead letters and the job's checkpoint commit in one transaction
    of the state store (``state``: default the source if it is PostgreSQL, else the
    embedded PostgreSQL): a rerun resumes after the last committed chunk and never calls
    ``fn`` again for its items; after a ``kill -9``, the items of the one chunk in flight
    are called again (at most ``chunk_size`` of them — keep the function idempotent or the
    chunk small). A stop (``stop``, SIGTERM, ``max_runtime``) commits the items done so far.
    With ``results_table`` (in ``results_to``, default the source database), what ``fn``
    returns for an item is upserted there on the item's key — a dict's entries as
    columns, any other value into a ``result`` column — before the checkpoint commits.
    The Result's report counts items (``succeeded``, ``failed``) and retries.
    """
    from .. import api
    from ..jobrun import JobRun
    from ..progress import progress_for

    if not isinstance(source, Query):
        raise UsageError("source= is an etl.Query(url, sql, key=…) or etl.Query(url, "
                         "table=…)")
    if not callable(fn):
        raise UsageError("fn= is the function to call for each row (or chunk)")
    if not job:
        raise UsageError("job= names the job: its checkpoint, dead letters and runs")
    kinds = transient if isinstance(transient, tuple) else (transient,)
    if not all(isinstance(k, type) and issubclass(k, BaseException) for k in kinds):
        raise UsageError("transient= is an exception class or a tuple of them")
    if retry_base <= 0:
        raise UsageError("retry_base must be greater than zero")
    src_url = parse(source.url)
    state_url = parse(state) if state else (src_url if src_url.is_postgres
                                            else api.resolve_url(None))
    if not state_url.is_postgres:
        raise UsageError(f"state {state_url.masked}: the state store is a PostgreSQL database")
    if results_to is not None and results_table is None:
        raise UsageError("results_to= needs results_table=: the table the results go to")
    pacing = opt.pacing(chunk_size, chunk_seconds, None, sleep, max_runtime,
                        min_chunk=min_chunk, max_chunk=max_chunk)
    if max_rate is not None:
        opt.positive(max_rate, "max_rate")
    policy = dataclasses.replace(opt.retry_policy(retries, retry_max_wait), base=retry_base)
    limits = ErrorLimits(max_errors, max_error_rate)
    if report:
        opt.check_report_path(report)
    prog = progress_for(progress)
    stop = stop if stop is not None else StopFlag()
    from .source import ItemSource

    with stop_on_signals(stop):
        items = ItemSource(source)
        try:
            items.check()
            results = None
            if results_table is not None:
                from .results import ResultsTable

                results = ResultsTable(results_to if results_to is not None else src_url,
                                       results_table, items.key)
            args = {"source": src_url.masked, "query": source.sql, "table": source.table,
                    "key": list(items.key), "where": source.where, "fn": _name(fn),
                    "batch": batch}
            with JobRun(state_url, job, "chunks", args, schema=state_schema) as run:
                result = _execute(run, items, fn, kinds, policy, limits, pacing, prog, stop,
                                  batch=batch, results=results, max_rate=max_rate,
                                  state_url=state_url, state_schema=state_schema,
                                  restart=restart, report_path=str(report) if report else None)
        finally:
            items.close()
    if report:
        result.write(report)
    return result


def _name(fn: Callable[..., Any]) -> str:
    from .step import describe_fn

    return describe_fn(fn)


def _execute(run: Any, items: Any, fn: Callable[[Any], Any],
             kinds: tuple[type[BaseException], ...], policy: Any, limits: ErrorLimits,
             pacing: Any, prog: Progress, stop: StopFlag, *, batch: bool, results: Any,
             max_rate: float | None, state_url: DbUrl, state_schema: str, restart: bool,
             report_path: str | None) -> Result:
    from .. import lifecycle
    from ..retry import RetryStats
    from ..sql_copy_io import describe_error
    from ..state.store import read_checkpoint, write_checkpoint
    from .calls import Caller, Pace
    from .step import ItemStep

    result = Result(job_id=run.job_id, run_id=run.run_id, job_type="chunks",
                    started_at=utc_now())
    result.metadata.update({"source": items.url.masked, "fn": _name(fn), "batch": batch,
                            "transient": [k.__name__ for k in kinds], "max_rate": max_rate})
    result.artifacts["report"] = report_path
    calls = RetryStats()
    caller = Caller(fn, kinds, policy, Pace(max_rate), calls, stop)
    step = ItemStep(items, caller, run, batch=batch, results=results, limits=limits,
                    state_schema=state_schema, stop=stop)

    def start() -> lifecycle.Start:
        store = run.store.conn
        found = None if restart else read_checkpoint(store, run.job_id, state_schema)
        resuming = found is not None and not found[1]
        if found is not None and resuming:
            cp = dataclasses.replace(found[0], run_id=run.run_id)
        else:
            cp = Checkpoint(job_id=run.job_id, chunk_index=0, last_key=None,
                            run_id=run.run_id)
            with store.transaction():
                write_checkpoint(store, cp, schema=state_schema)
        left, exact = items.count(COUNT_CAP)
        if cp.last_key is not None:
            left, exact = _left_after(items, cp)
        return lifecycle.Start(step, cp, resuming, f"{run.job_id}", left, exact)

    def finish(begun: lifecycle.Start, cp: Checkpoint) -> None:
        with run.store.conn.transaction():
            write_checkpoint(run.store.conn, cp, finished=True, schema=state_schema)

    return lifecycle.execute(run, result, start=start, finish=finish, pacing=pacing,
                             retry=policy, progress=prog, stop=stop, state=state_url,
                             describe=describe_error, verb="done")


def _left_after(items: Any, cp: Checkpoint) -> tuple[int, bool]:
    after = items.resume_key(cp)
    try:
        n = items.reader.count(after, cap=COUNT_CAP + 1)
    finally:
        items.end_read()
    return min(n, COUNT_CAP), n <= COUNT_CAP


__all__ = ["DEFAULT_ITEM_CHUNK", "run_chunks"]
