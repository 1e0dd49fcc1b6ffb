"""Incremental sync (``--since-column``): each run copies the rows changed since the last
finished one.

A *walk* is one pass over the source in key order, restricted to rows whose
since-column is at or past the watermark. When a walk begins, it records the
column's current maximum and the keys of the rows holding exactly that value
(``next`` / ``next_keys``); when it finishes, those become the next walk's lower
bound. The bound is inclusive, minus the keys already copied at exactly that value,
so rows sharing the boundary timestamp are neither lost (a row written at the same
instant after the walk began is taken next time) nor copied twice. An interrupted
walk resumes after its checkpoint with the same bounds (they are stored with it).

Both copy paths share the walk (``_walk``): PostgreSQL → PostgreSQL through psycopg
(``begin``, ``restrict``: values as PostgreSQL's text, cast back to the column's type),
every other direction through SQLAlchemy (``begin_portable``, ``portable_condition``:
the source's own values as exact JSON, turned back by ``etl.sql_copy_io.key_from_json``).

Rows whose since-column is NULL are copied by the first walk only; a row committed
late with a timestamp older than the watermark (a long transaction) is missed, as
in every timestamp-based sync: set the column at commit time or sync with a margin.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    import psycopg

    from .dialects import Family, PortableColumn
    from .sources.sqla import Condition, SqlaKeysetSource
    from .table_copy import CopyPlan

log = logging.getLogger(__name__)

# Keys remembered at the boundary value; beyond this (a bulk update that stamped many
# rows with one value), the next walk re-reads them all (upsert finds them unchanged).
MAX_BOUNDARY_KEYS = 10_000


def begin(sconn: psycopg.Connection, plan: CopyPlan, previous: dict[str, Any] | None
          ) -> dict[str, Any]:
    """The bounds of a new walk: from the last finished walk's ``next``, up to now's maximum."""
    from psycopg import sql

    spec = plan.spec
    column = _column(plan)
    src = plan.query._ident()
    where = sql.SQL(" WHERE ({})").format(sql.SQL(spec.where)) if spec.where else sql.SQL("")  # type: ignore[arg-type]
    row = sconn.execute(sql.SQL("SELECT max({})::text FROM {}{}").format(
        sql.Identifier(column.name), src, where)).fetchone()
    top = row[0] if row else None
    keys: list[list[str]] = []
    if top is not None:
        found = sconn.execute(sql.SQL("SELECT {} FROM {} WHERE {} = {}::{}{} LIMIT {}").format(
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k.name))
                               for k in plan.key),
            src, sql.Identifier(column.name), sql.Literal(top), sql.SQL(column.type_sql),  # type: ignore[arg-type]
            sql.SQL(" AND ({})").format(sql.SQL(spec.where)) if spec.where else sql.SQL(""),  # type: ignore[arg-type]
            sql.Literal(MAX_BOUNDARY_KEYS + 1))).fetchall()
        keys = [list(r) for r in found]
    sconn.rollback()
    return _walk(column.name, top, keys, previous)


def _walk(column: str, top: Any, keys: list[list[Any]], previous: dict[str, Any] | None
          ) -> dict[str, Any]:
    """A new walk's bounds: from where the last finished walk ended (its ``next``) up to
    ``top``, the column's maximum now, held by the rows of ``keys`` (at most one more than
    ``MAX_BOUNDARY_KEYS``: then none are kept and the next walk reads them all again)."""
    if len(keys) > MAX_BOUNDARY_KEYS:
        log.warning("%s rows share the watermark value %s; the next run reads them again",
                    f"more than {MAX_BOUNDARY_KEYS:,}", top)
        keys = []
    prev = previous or {}
    return {"column": column, "from": prev.get("next"), "from_keys": prev.get("next_keys", []),
            "next": top, "next_keys": keys}


# -- the same on any database, through SQLAlchemy (etl.sql_copy) ---------------------------
# Values are the source's own as exact JSON (``etl.sql_copy_io.jsonable``: timestamps and
# decimals as ISO/plain text) and are turned back into what the source compares exactly.

def begin_portable(source: SqlaKeysetSource, column: PortableColumn,
                   previous: dict[str, Any] | None) -> dict[str, Any]:
    """``begin`` for a SQLAlchemy keyset source (its --where applied, no walk bound yet)."""
    from .sql_copy_io import jsonable, key_to_json

    try:
        top, keys = source.top(column.name, MAX_BOUNDARY_KEYS + 1)
    finally:
        source.conn.rollback()
    return _walk(column.name, jsonable(top), [key_to_json(k) for k in keys], previous)


def portable_condition(watermark: dict[str, Any], column: PortableColumn,
                       key: Sequence[PortableColumn], fam: Family) -> Condition | None:
    """The walk's lower bound as a filter of a SQLAlchemy keyset read (None on a first
    walk): ``col >= from``, minus the keys already copied at exactly ``from``."""
    if watermark.get("from") is None:
        return None
    from .sql_copy_io import key_from_json

    value = key_from_json([watermark["from"]], [column], fam)[0]
    seen = [key_from_json(k, key, fam) for k in watermark.get("from_keys") or []]

    def condition(cols: Any) -> Any:
        import sqlalchemy as sa

        col = cols[column.name]
        bound = sa.literal(value, sa.types.NullType())
        if not seen:
            return col >= bound
        keys = [cols[k.name] for k in key]
        unseen = keys[0].not_in([k[0] for k in seen]) if len(keys) == 1 else \
            sa.tuple_(*keys).not_in(seen)
        return sa.or_(col > bound, sa.and_(col == bound, unseen))

    return condition


def restrict(plan: CopyPlan, watermark: dict[str, Any]) -> CopyPlan:
    """The plan with the walk's lower bound added to its --where."""
    from psycopg import sql

    if watermark.get("from") is None:
        return plan
    column = _column(plan)
    col = sql.Identifier(column.name)
    value = sql.SQL("{}::{}").format(sql.Literal(watermark["from"]), sql.SQL(column.type_sql))  # type: ignore[arg-type]
    cond: sql.Composable = sql.SQL("{} >= {}").format(col, value)
    if watermark.get("from_keys"):
        keys = sql.SQL(", ").join(sql.Identifier(k.name) for k in plan.key)
        seen = sql.SQL(", ").join(
            sql.SQL("({})").format(sql.SQL(", ").join(
                sql.SQL("{}::{}").format(sql.Literal(v), sql.SQL(k.type_sql))  # type: ignore[arg-type]
                for v, k in zip(kv, plan.key, strict=True)))
            for kv in watermark["from_keys"])
        cond = sql.SQL("({col} > {v} OR ({col} = {v} AND ({keys}) NOT IN (VALUES {seen})))").format(
            col=col, v=value, keys=keys, seen=seen)
    text = cond.as_string(None)
    where = f"({plan.spec.where}) AND {text}" if plan.spec.where else text
    return dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, where=where))


def _column(plan: CopyPlan) -> Any:
    name = plan.spec.since_column
    for col in plan.columns:
        if col.name == name:
            return col
    raise UsageError(f"--since-column {name}: no such column among the copied ones "
                     f"({', '.join(c.name for c in plan.columns)})")
