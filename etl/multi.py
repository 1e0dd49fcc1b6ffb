"""Many tables in one `etl copy`: which tables, in which order, and one summary report.

Each table is its own job (``copy:SCHEMA.TABLE``, its own lock and checkpoint),
so an interrupted multi-table copy resumes table by table: finished tables have
nothing left to copy, the interrupted one continues after its checkpoint. Tables
are copied parents first, following the foreign keys among them, so that a target
with the same constraints accepts every child row.
"""

from __future__ import annotations

import fnmatch
import graphlib
import logging
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .errors import EtlError, UsageError
from .model import Status, TableName
from .report import MAX_ERRORS_IN_REPORT, Result, utc_now

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

_TABLES_SQL = """
SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%%' AND n.nspname NOT LIKE 'pg\\_temp%%'
  AND n.nspname <> %(state)s
ORDER BY 1, 2
"""

_FOREIGN_KEYS_SQL = """
SELECT cn.nspname, c.relname, pn.nspname, p.relname
FROM pg_constraint k
JOIN pg_class c ON c.oid = k.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_class p ON p.oid = k.confrelid JOIN pg_namespace pn ON pn.oid = p.relnamespace
WHERE k.contype = 'f' AND k.conrelid <> k.confrelid
"""

# Worst first: the combined status is the worst of the tables'.
_SEVERITY = [Status.FAILED, Status.CANCELLED, Status.PAUSED, Status.STOPPED,
             Status.COMPLETED_WITH_ERRORS, Status.COMPLETED]


def all_tables(conn: psycopg.Connection, state_schema: str) -> list[TableName]:
    """Every ordinary and partitioned table outside the system schemas and the state store."""
    return [TableName(s, t) for s, t in conn.execute(_TABLES_SQL, {"state": state_schema})]


def excluding(tables: Iterable[TableName], patterns: Iterable[str]) -> list[TableName]:
    """Tables matching none of the glob ``patterns`` (tried on ``schema.table`` and ``table``)."""
    pats = list(patterns)
    return [t for t in tables
            if not any(fnmatch.fnmatchcase(str(t), p) or fnmatch.fnmatchcase(t.name, p)
                       for p in pats)]


def parents_first(conn: psycopg.Connection, tables: list[TableName]) -> list[TableName]:
    """``tables`` ordered so that each comes after the tables its foreign keys point to."""
    edges = [(TableName(cs, ct), TableName(ps, pt))
             for cs, ct, ps, pt in conn.execute(_FOREIGN_KEYS_SQL)]
    conn.rollback()
    return _ordered(tables, edges)


def sqla_tables(url: str, names: list[str] | None) -> tuple[list[TableName], list[TableName]]:
    """(tables, parents-first order) of a MySQL/MariaDB or SQLite source, by reflection:
    ``names`` or, when None, every table of the URL's database."""
    import sqlalchemy as sa

    from .dialects import make_engine

    engine = make_engine(url)
    try:
        insp = sa.inspect(engine)
        schema = insp.default_schema_name or "main"
        existing = insp.get_table_names()
        chosen = [TableName(schema, n) for n in (existing if names is None else names)]
        edges = [(TableName(schema, t.name), TableName(schema, fk["referred_table"]))
                 for t in chosen if t.name in existing
                 for fk in insp.get_foreign_keys(t.name)]
    finally:
        engine.dispose()
    return chosen, _ordered(chosen, edges)


def _ordered(tables: list[TableName], edges: list[tuple[TableName, TableName]]
             ) -> list[TableName]:
    """Parents before children (``edges`` are child → parent), else the given order."""
    chosen = set(tables)
    graph: dict[TableName, set[TableName]] = {t: set() for t in tables}
    for child, parent in edges:
        if child in chosen and parent in chosen and child != parent:
            graph[child].add(parent)
    sorter = graphlib.TopologicalSorter(graph)
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError as exc:
        log.warning("foreign keys form a cycle (%s); copying in the given order",
                    " -> ".join(str(t) for t in exc.args[1]))
        return tables
    rank = {t: i for i, t in enumerate(tables)}
    # static_order is one valid order; keep the given order wherever the keys allow
    ready: list[TableName] = []
    placed: set[TableName] = set()
    pending = sorted(order, key=rank.__getitem__)
    while pending:
        for t in pending:
            if graph[t] <= placed:
                ready.append(t)
                placed.add(t)
                pending.remove(t)
                break
    return ready


def copy_tables(tables: list[TableName], copy_one: Callable[[TableName], Result],
                stopped: Callable[[], bool]) -> Result:
    """Copy each table with ``copy_one``; a table that cannot start is reported and skipped.

    Stops before the next table once a table stopped (signal, --max-runtime).
    """
    started = utc_now()
    results: list[tuple[TableName, Result | None, str | None]] = []
    for i, table in enumerate(tables, start=1):
        if stopped():
            break
        log.info("table %d/%d: %s", i, len(tables), table)
        try:
            result = copy_one(table)
        except UsageError:
            raise
        except EtlError as exc:  # missing table, job locked …: the others still go
            log.error("table %s: %s", table, exc)
            results.append((table, None, str(exc)))
            continue
        results.append((table, result, None))
        if result.status in (Status.STOPPED, Status.PAUSED, Status.CANCELLED):
            break
    return combine(tables, results, started)


def combine(tables: list[TableName], results: list[tuple[TableName, Result | None, str | None]],
            started: str) -> Result:
    """One report for the whole copy: sums, the worst status, each table's own report."""
    done = [r for _, r, _ in results if r is not None]
    names = ",".join(str(t) for t in tables)
    summary = Result(job_id=f"copy:{names}" if len(names) <= 200 else f"copy:{len(tables)} tables",
                     run_id=str(uuid.uuid4()), job_type="copy", started_at=started)
    statuses = [r.status for r in done] + [Status.FAILED for _, r, _ in results if r is None]
    if len(results) < len(tables) and Status.FAILED not in statuses:
        statuses.append(Status.STOPPED)  # tables not reached
    summary.status = min(statuses, key=_SEVERITY.index) if statuses else Status.COMPLETED
    for r in done:
        summary.total_items += r.total_items
        summary.processed += r.processed
        summary.succeeded += r.succeeded
        summary.failed += r.failed
        summary.skipped += r.skipped
        summary.rows_this_run += r.rows_this_run
        summary.duration_seconds += r.duration_seconds
        summary.errors.extend(r.errors[:max(MAX_ERRORS_IN_REPORT - len(summary.errors), 0)])
        for k, n in r.error_categories.items():
            summary.error_categories[k] = summary.error_categories.get(k, 0) + n
    tables_doc: list[dict[str, Any]] = []
    for table, one, message in results:
        tables_doc.append(one.to_dict() if one is not None else
                          {"table": str(table), "status": Status.FAILED.value, "message": message})
    not_reached = [str(t) for t in tables[len(results):]]
    summary.metadata.update({"tables": tables_doc, "tables_not_reached": not_reached,
                             "num_tables": len(tables)})
    problems = [f"{t}: {m}" for t, _, m in results if m] + [
        f"{r.job_id}: {r.message}" for r in done if r.message and r.status is not Status.COMPLETED]
    if not_reached:
        problems.append(f"not reached: {', '.join(not_reached)} (rerun to continue)")
    summary.message = "; ".join(problems) or None
    summary.completed_at = utc_now()
    return summary
