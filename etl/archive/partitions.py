"""``etl archive --drop-partitions``: whole partitions archived and dropped, not deleted row
by row (no dead tuples, no vacuum debt, a fraction of the WAL).

Before the chunk walk, each leaf partition of the table is judged in a transaction of its
own. It is locked in SHARE mode — reads go on, nobody can write to it meanwhile — and
qualifies when every row it holds matches --where at that moment — and, when it holds
none, when its whole range does: for a range partition on one column, --where is true of a
row whose partition column is the range's upper bound and whose other columns are NULL (so
``created_at < now() - interval '90 days'`` qualifies a month that ended more than 90 days
ago, even after earlier runs emptied it by chunks, but never a partition made ahead for
future rows, and never one by a predicate on other columns). Its rows
are then copied into the archive table with one ``INSERT … SELECT`` (none with --purge), the
partition is detached from its parent and dropped, and the job's counts are checkpointed:
all of it commits together, or none of it. A partition that does not qualify (a row that
does not match, an archive already holding some of its keys, a lock not granted within
--lock-timeout, a view or foreign key that depends on it) is left as it is: its matching
rows go with the chunk walk that follows, through the parent, like any others.

A DEFAULT partition is never dropped (it has no range), nor an empty list or hash
partition.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import run_result
from ..errors import UsageError
from ..model import Checkpoint
from ..report import utc_now
from ..state.store import write_checkpoint
from .plan import Action, ArchivePlan

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

_LEAVES_SQL = """
    SELECT pn.nspname, pc.relname, n.nspname, c.relname, pg_get_expr(c.relpartbound, c.oid)
    FROM pg_partition_tree(%s) AS t
    JOIN pg_class c ON c.oid = t.relid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    JOIN pg_class pc ON pc.oid = t.parentrelid
    JOIN pg_namespace pn ON pn.oid = pc.relnamespace
    WHERE t.isleaf AND c.relkind = 'r'
    ORDER BY t.level, c.relname"""
# A range partition's upper bound as PostgreSQL prints it: FOR VALUES FROM (…) TO (…)
_UPPER = re.compile(r"\bTO \((.+)\)\s*$", re.S)
_RANGE_KEY_SQL = """
    SELECT a.attname, format_type(a.atttypid, a.atttypmod)
    FROM pg_partitioned_table pt
    JOIN pg_class pc ON pc.oid = pt.partrelid
    JOIN pg_namespace pn ON pn.oid = pc.relnamespace
    JOIN pg_attribute a ON a.attrelid = pt.partrelid AND a.attnum = pt.partattrs[0]
    WHERE pn.nspname = %s AND pc.relname = %s AND pt.partstrat = 'r' AND pt.partnatts = 1"""


@dataclass(frozen=True)
class Partition:
    """A leaf partition and its immediate parent."""

    parent_schema: str
    parent: str
    schema: str
    name: str
    bound: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def is_default(self) -> bool:
        return self.bound.strip().upper() == "DEFAULT"


@dataclass(frozen=True)
class Judged:
    """A partition, its rows and how many of them do not match --where."""

    partition: Partition
    rows: int
    not_matching: int
    range_matches: bool = False  # empty: --where holds for its whole range

    @property
    def qualifies(self) -> bool:
        if self.partition.is_default or self.not_matching:
            return False
        return self.rows > 0 or self.range_matches


def check_options(plan: ArchivePlan) -> None:
    """--drop-partitions archives into a table of the same database, or purges."""
    spec = plan.spec
    if spec.action is Action.NO_DELETE:
        raise UsageError("--drop-partitions drops partitions, --no-delete keeps the rows: give "
                         "one of them")
    if spec.to_dir is not None or not spec.same_database or plan.sql_dest is not None:
        raise UsageError("--drop-partitions archives a partition into a table of the same "
                         "database in the transaction that drops it: use --to-table without "
                         "--to/--to-dir, or --purge")
    if not spec.state_in_source:
        raise UsageError("--drop-partitions keeps the job's checkpoint in the source database "
                         "(it commits with each drop): drop --state")


def leaves(conn: psycopg.Connection, plan: ArchivePlan) -> list[Partition]:
    """The table's leaf partitions (sub-partitions included), refusing a plain table."""
    table = plan.spec.table
    row = conn.execute("SELECT c.oid, c.relkind FROM pg_class c JOIN pg_namespace n ON "
                       "n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
                       (table.schema, table.name)).fetchone()
    if row is None or row[1] != "p":
        raise UsageError(f"--drop-partitions: {table} is not a partitioned table; drop the "
                         "option to archive it row by row")
    return [Partition(*r) for r in conn.execute(_LEAVES_SQL, (row[0],)).fetchall()]


def judge(conn: psycopg.Connection, plan: ArchivePlan, part: Partition) -> Judged:
    """Count the partition's rows and those --where does not take (NULL counts as not)."""
    from psycopg import sql

    found = conn.execute(sql.SQL(
        "SELECT count(*), count(*) FILTER (WHERE NOT coalesce(({}), false)) FROM {}").format(
        sql.SQL(plan.spec.where), sql.Identifier(part.schema, part.name))).fetchone()
    assert found is not None
    rows, not_matching = int(found[0]), int(found[1])
    return Judged(part, rows, not_matching, not rows and _range_matches(conn, plan, part))


def _range_matches(conn: psycopg.Connection, plan: ArchivePlan, part: Partition) -> bool:
    """Whether --where is true of a row at the upper bound of a one-column range partition
    (its other columns NULL): then, for a predicate that takes older values (``col < x``),
    of every row the range can hold. Anything else — list, hash, several columns, an
    expression key, MAXVALUE, a predicate on other columns — is not."""
    import psycopg
    from psycopg import sql

    upper = _UPPER.search(part.bound)
    key = conn.execute(_RANGE_KEY_SQL, (part.parent_schema, part.parent)).fetchone()
    if upper is None or key is None or "MAXVALUE" in upper.group(1).upper():
        return False
    name, type_sql = key
    values = sql.SQL(", ").join(
        sql.SQL("({})::{} AS {}").format(
            sql.SQL(upper.group(1)) if c.name == name else sql.SQL("NULL"),
            sql.SQL(type_sql if c.name == name else c.type_sql), sql.Identifier(c.name))
        for c in plan.columns)
    try:
        with conn.transaction():  # a savepoint: a --where that cannot judge it is a no
            found = conn.execute(sql.SQL("SELECT coalesce(({}), false) FROM (SELECT {}) AS {}").format(
                sql.SQL(plan.spec.where), values, sql.Identifier(plan.spec.table.name))).fetchone()
    except psycopg.Error:
        return False
    return bool(found and found[0])


def drop_qualifying(conn: psycopg.Connection, plan: ArchivePlan, cp: Checkpoint,
                    run_id: str) -> tuple[Checkpoint, list[str], float]:
    """Archive and drop every qualifying partition (each in its own transaction, with the
    checkpoint); returns the checkpoint after them, the partitions dropped and the longest
    transaction's seconds. Judging and dropping are logged; nothing here raises for a
    partition that cannot go — it is left to the chunk walk."""
    import psycopg

    dropped: list[str] = []
    longest = 0.0
    for part in leaves(conn, plan):
        if part.is_default:
            continue
        t0 = time.monotonic()
        try:
            with conn.transaction():
                moved = _drop_one(conn, plan, part)
                if moved is None:
                    continue
                cp = _counted(cp, plan, moved, run_id)
                write_checkpoint(conn, cp, schema=plan.spec.state_schema)
        except psycopg.errors.LockNotAvailable:
            log.warning("partition %s: its lock (or its parent's) was not granted within "
                        "--lock-timeout; its rows are left to the chunk walk", part)
            continue
        except (psycopg.errors.DependentObjectsStillExist, psycopg.errors.ObjectInUse,
                psycopg.errors.FeatureNotSupported, psycopg.errors.ForeignKeyViolation) as exc:
            log.warning("partition %s cannot be dropped (%s); its rows are left to the chunk "
                        "walk", part, " ".join(str(exc).split()))
            continue
        finally:
            longest = max(longest, time.monotonic() - t0)
        dropped.append(str(part))
        log.info("partition %s: %d rows %s, partition dropped", part, moved,
                 "deleted" if plan.spec.action is Action.PURGE else "archived")
    return cp, dropped, longest


def _drop_one(conn: psycopg.Connection, plan: ArchivePlan, part: Partition) -> int | None:
    """In the caller's transaction: lock, judge, archive, detach, drop; the rows moved, or
    None (the transaction then holds nothing done) when the partition does not qualify."""
    import psycopg
    from psycopg import sql

    ident = sql.Identifier(part.schema, part.name)
    conn.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(ident))
    judged = judge(conn, plan, part)
    if not judged.qualifies:
        if judged.not_matching:
            log.info("partition %s: %d of its %d rows do not match --where; left to the chunk "
                     "walk", part, judged.not_matching, judged.rows)
        return None
    if plan.spec.action is Action.MOVE:
        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in plan.columns)
        archive = sql.Identifier(plan.archive.schema, plan.archive.name)
        try:
            with conn.transaction():  # a savepoint: a key the archive holds leaves it be
                copied = conn.execute(sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {}").format(
                    archive, cols, cols, ident)).rowcount
        except psycopg.errors.UniqueViolation:
            log.info("partition %s: the archive already holds some of its keys; left to the "
                     "chunk walk, which keeps identical copies", part)
            return None
        if copied != judged.rows:  # pragma: no cover - SHARE mode holds the rows still
            raise RuntimeError(f"partition {part}: copied {copied} rows of {judged.rows}")
    conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(
        sql.Identifier(part.parent_schema, part.parent), ident))
    conn.execute(sql.SQL("DROP TABLE {}").format(ident))
    return judged.rows


def _counted(cp: Checkpoint, plan: ArchivePlan, rows: int, run_id: str) -> Checkpoint:
    outcome = {"deleted": rows} if plan.spec.action is Action.PURGE else {"archived": rows}
    return dataclasses.replace(
        cp, processed=cp.processed + rows, succeeded=cp.succeeded + rows,
        outcomes=run_result.add_counts(cp.outcomes, {**outcome, "partitions_dropped": 1}),
        run_id=run_id, updated_at=utc_now())


def describe(conn: psycopg.Connection, plan: ArchivePlan) -> list[str]:
    """--dry-run: what each partition would do (judged now, without a lock)."""
    lines = []
    for part in leaves(conn, plan):
        if part.is_default:
            lines.append(f"  {part}  DEFAULT: never dropped; its matching rows go by chunks")
            continue
        j = judge(conn, plan, part)
        what = ("would be archived and dropped" if plan.spec.action is Action.MOVE and j.rows
                else "would be dropped") if j.qualifies else \
            "empty, its range not all matching: kept" if not j.rows else \
            f"{j.not_matching:,} row(s) do not match: kept, its matching rows go by chunks"
        lines.append(f"  {part}  {part.bound}: {j.rows:,} rows — {what}")
    conn.rollback()
    return lines
