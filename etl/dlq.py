"""Dead letters: list, show, replay and purge the rows a job could not write.

Replay holds the job's lock (a running job makes it exit 75) and writes each dead-lettered row (its original values, kept as JSON) into
the job's target table again, one savepoint per row: a row that now goes in
leaves the queue and moves from ``failed`` to ``succeeded`` in the job's
checkpoint, in the same transaction when the state store is in the target
database; a row that fails again stays, with its new error and one more attempt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import catalog, naming, pg
from .errors import UsageError, sqlstate_of
from .isolate import is_data_error
from .model import TableName
from .state import lock
from .state.schema import DEFAULT_SCHEMA
from .state.store import StateStore, schema_sql
from .urls import DbUrl, parse

_COLUMNS = ("id", "job_id", "run_id", "chunk_index", "item_key", "row_data", "error_type",
            "sqlstate", "category", "error_message", "attempts", "created_at")


@dataclass
class ReplayResult:
    """What a replay did: rows now in the target, rows still failing."""

    job_id: str
    replayed: int = 0
    still_failing: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "replayed": self.replayed,
                "still_failing": self.still_failing}


def _state(state: str | DbUrl | None) -> DbUrl:
    from .api import resolve_url

    return resolve_url(state)


def _filters(job: str, category: str | None, error_type: str | None) -> tuple[str, dict]:
    where = "job_id = %(job)s"
    params: dict[str, Any] = {"job": job}
    if category:
        where += " AND category = %(category)s"
        params["category"] = category
    if error_type:
        where += " AND error_type = %(error_type)s"
        params["error_type"] = error_type
    return where, params


def list_dead_letters(job: str, *, state: str | DbUrl | None = None,
                      state_schema: str = DEFAULT_SCHEMA, category: str | None = None,
                      error_type: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The job's dead letters, oldest first (optionally of one category or error class)."""
    where, params = _filters(job, category, error_type)
    with pg.connect(_state(state), "state", autocommit=True) as conn:
        if not StateStore(conn, state_schema).exists():
            return []
        cur = conn.execute(schema_sql(state_schema, f"""
            SELECT {", ".join(_COLUMNS)} FROM {{s}}.dead_letters WHERE {where}
            ORDER BY id LIMIT %(limit)s"""), {**params, "limit": limit})
        return [dict(zip(_COLUMNS, row, strict=True)) for row in cur]


def show_dead_letter(letter_id: int, *, state: str | DbUrl | None = None,
                     state_schema: str = DEFAULT_SCHEMA) -> dict[str, Any]:
    with pg.connect(_state(state), "state", autocommit=True) as conn:
        row = conn.execute(schema_sql(state_schema, f"SELECT {', '.join(_COLUMNS)} FROM {{s}}.dead_letters "
                                            "WHERE id = %s"), (letter_id,)).fetchone()
    if row is None:
        raise UsageError(f"no dead letter {letter_id}; `etl dlq list --job JOB` lists them")
    return dict(zip(_COLUMNS, row, strict=True))


def purge_dead_letters(job: str, *, state: str | DbUrl | None = None,
                       state_schema: str = DEFAULT_SCHEMA, category: str | None = None,
                       error_type: str | None = None) -> int:
    """Delete the job's dead letters (the rows stay counted as failed); returns how many."""
    where, params = _filters(job, category, error_type)
    with pg.connect(_state(state), "state", autocommit=True) as conn:
        if not StateStore(conn, state_schema).exists():
            return 0
        return conn.execute(schema_sql(state_schema, f"DELETE FROM {{s}}.dead_letters WHERE {where}"),
                            params).rowcount


def replay_dead_letters(job: str, *, target: str | DbUrl | None = None,
                        state: str | DbUrl | None = None, state_schema: str = DEFAULT_SCHEMA,
                        category: str | None = None, error_type: str | None = None
                        ) -> ReplayResult:
    """Write the job's dead-lettered rows into its target table again (see module docs)."""
    from psycopg import sql
    from psycopg.types.json import Jsonb

    state_url = _state(state)
    target_url = parse(target) if target else state_url
    with pg.connect(state_url, "state", autocommit=True) as sconn:
        job_row = sconn.execute(schema_sql(state_schema, "SELECT job_type, args FROM {s}.jobs "
                                                 "WHERE job_id = %s"), (job,)).fetchone()
    if job_row is None:
        raise UsageError(f"no job {job!r} in the state store {state_url.masked}; `etl status` "
                         "lists the jobs")
    job_type, args = job_row
    if job_type != "copy" or "target_table" not in args:
        raise UsageError(f"replay is not available for {job_type} jobs yet")
    if args.get("transform"):
        raise UsageError(f"job {job} transforms its rows ({args['transform']}) and the dead "
                         "letters hold the original rows: replaying them would skip the "
                         "transform. Fix the cause, then rerun the copy with --restart (or "
                         "copy the keys again with --where)")
    table = TableName.parse(args["target_table"])
    same_db = state_url.same_database(target_url)
    where, params = _filters(job, category, error_type)
    result = ReplayResult(job)
    with pg.connect(target_url, "target", autocommit=True) as tconn, \
            pg.connect(state_url, "state", autocommit=True) as stconn:
        # the job's counts change with each replayed row: not while a run of the job writes them
        lock.acquire(stconn, job)
        letters = stconn.execute(schema_sql(state_schema, f"SELECT id, row_data FROM {{s}}.dead_letters "
                                                  f"WHERE {where} ORDER BY id"), params).fetchall()
        target_cols = {r[0] for r in tconn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
            "AND NOT attisdropped", (f'"{table.schema}"."{table.name}"',))}
        ident = sql.Identifier(table.schema, table.name)
        on_conflict = _on_conflict(tconn, table, args.get("mode", "append"))
        for letter_id, source_row in letters:
            renamed = naming.rename_map(args.get("rename_columns"), list(source_row))
            row = {renamed[k]: v for k, v in source_row.items()}
            cols = [c for c in row if c in target_cols]
            insert = sql.SQL("INSERT INTO {t} ({c}) SELECT {c} FROM jsonb_populate_record("
                             "NULL::{t}, %s){conflict}").format(
                t=ident, c=sql.SQL(", ").join(map(sql.Identifier, cols)),
                conflict=on_conflict(cols))
            state_conn = tconn if same_db else stconn
            try:
                with tconn.transaction():
                    tconn.execute(insert, (Jsonb(row),))
                    if same_db:
                        _settle(state_conn, state_schema, job, letter_id)
                if not same_db:
                    with stconn.transaction():
                        _settle(stconn, state_schema, job, letter_id)
                result.replayed += 1
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                stconn.execute(schema_sql(state_schema, """
                    UPDATE {s}.dead_letters SET attempts = attempts + 1, error_type = %s,
                        sqlstate = %s, error_message = %s, created_at = now() WHERE id = %s"""),
                    (type(exc).__name__, sqlstate_of(exc), pg.describe_error(exc, target_url),
                     letter_id))
                result.still_failing += 1
    return result


def _on_conflict(tconn: Any, table: TableName, mode: str) -> Any:
    """The job's mode for a replayed row: upsert updates an existing key, ignore keeps it."""
    from psycopg import sql

    keys = catalog.unique_keys(tconn, table)
    if mode not in ("upsert", "ignore") or not keys:
        return lambda cols: sql.SQL("")
    key = keys[0]

    def clause(cols: list[str]) -> Any:
        others = [c for c in cols if c not in key]
        target = sql.SQL(", ").join(map(sql.Identifier, key))
        if mode == "ignore" or not others:
            return sql.SQL(" ON CONFLICT ({}) DO NOTHING").format(target)
        return sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {}").format(target, sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in others))
    return clause


def _settle(conn: Any, schema: str, job: str, letter_id: int) -> None:
    """The row is in the target: drop its letter, move it from failed to succeeded."""
    conn.execute(schema_sql(schema, "DELETE FROM {s}.dead_letters WHERE id = %s"), (letter_id,))
    conn.execute(schema_sql(schema, """UPDATE {s}.checkpoints SET failed = failed - 1,
                               succeeded = succeeded + 1, updated_at = now()
                               WHERE job_id = %s AND partition = '' AND failed > 0"""), (job,))
