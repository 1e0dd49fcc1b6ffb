"""Dead letters: list, show, replay and purge the rows a job could not write.

Replay holds the job's lock (a running job makes it exit 75) and writes each dead-lettered row (its original values, kept as JSON) into
the job's target table again, one savepoint per row: a row that now goes in
leaves the queue and moves from ``failed`` to ``succeeded`` in the job's
checkpoint, in the same transaction when the state store is in the target
database; a row that fails again stays, with its new error and one more attempt.

PostgreSQL targets are written with ``jsonb_populate_record``; MySQL/MariaDB and SQLite
targets (the job's own target URL, or ``--target`` when the stored, masked one had a
password) through ``etl.sinks.sql.SqlSink`` in the job's mode, one transaction per row,
the row's JSON turned back into values by ``etl.sql_copy_io.key_from_json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import catalog, naming, pg
from .errors import TargetError, UsageError, sqlstate_of
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
    job_target = _job_target(job, args, target, state_url)
    if job_target is not None and not job_target.is_postgres:
        return _replay_sqla(job, args, job_target, state_url, state_schema, category, error_type)
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


def _job_target(job: str, args: dict[str, Any], target: str | DbUrl | None,
                state_url: DbUrl) -> DbUrl | None:
    """The database to replay into when it is not PostgreSQL: ``--target``, else the job's
    own target URL from its arguments (kept masked: usable only when it had no password).
    None: a PostgreSQL target, found as before (``--target``, else the state store's)."""
    stored = parse(args["target"]) if args.get("target") else None
    given = parse(target) if target else None
    if given is not None:
        if stored is not None and _family(given) != _family(stored):
            raise UsageError(f"--target {given.masked} is a {_family(given)} database, but job "
                             f"{job} writes into {stored.masked}; pass that database's URL")
        return given
    if stored is None or stored.is_postgres:
        return None
    if stored.password == "***":
        raise UsageError(f"job {job} writes into {stored.masked}, and the state store "
                         f"{state_url.masked} keeps that URL without its password: pass "
                         "--target URL (the target's full URL, password included)")
    return stored


def _family(url: DbUrl) -> str:
    return "mysql" if url.backend in ("mysql", "mariadb") else url.backend


def _replay_sqla(job: str, args: dict[str, Any], target_url: DbUrl, state_url: DbUrl,
                 state_schema: str, category: str | None, error_type: str | None
                 ) -> ReplayResult:
    """Replay into a MySQL/MariaDB or SQLite target: each row (its JSON turned back into the
    target columns' values) through ``SqlSink`` in the job's mode, one target transaction
    per row, then its letter settled in the state store."""
    import sqlalchemy as sa

    from .dialects import family, make_engine, reflect_table
    from .model import Mode
    from .sinks.sql import SqlSink
    from .sql_copy import SqlName
    from .sql_copy_io import describe_error, error_name, key_from_json, recategorised

    if target_url.backend == "sqlite":
        _require_sqlite_file(target_url)
    mode = Mode(args.get("mode") or "append")
    where, params = _filters(job, category, error_type)
    result = ReplayResult(job)
    engine = make_engine(target_url.raw, pool_pre_ping=True)
    try:
        try:
            tconn = engine.connect()
        except sa.exc.DBAPIError as exc:
            raise TargetError(f"cannot connect to the target database {target_url.masked}: "
                              f"{describe_error(exc, target_url)} — check the URL, or pass "
                              "--target URL") from exc
        with tconn, pg.connect(state_url, "state", autocommit=True) as stconn:
            # the job's counts change with each replayed row: not while a run of the job writes
            lock.acquire(stconn, job)
            letters = stconn.execute(schema_sql(
                state_schema, f"SELECT id, row_data FROM {{s}}.dead_letters WHERE {where} "
                "ORDER BY id"), params).fetchall()
            name = SqlName.parse(args["target_table"], family(tconn.dialect))
            table = reflect_table(tconn, name.name, schema=name.schema, role="target")
            keys = _sqla_unique_keys(tconn, table)
            tconn.rollback()
            sinks: dict[tuple[str, ...], SqlSink] = {}
            for letter_id, source_row in letters:
                renamed = naming.rename_map(args.get("rename_columns"), list(source_row))
                row = {renamed[k]: v for k, v in source_row.items()}
                cols = tuple(c.name for c in table.columns if c.name in row)
                if cols not in sinks:
                    conflict = next((k for k in keys if set(k) <= set(cols)), None) \
                        if mode in (Mode.UPSERT, Mode.IGNORE) else None
                    sinks[cols] = SqlSink(tconn, table, mode=mode, key=conflict, columns=cols)
                    tconn.commit()  # the sink set the session up; each row has its own
                # the JSON's text forms (decimals, dates, timestamps, \x bytes) as objects
                values = key_from_json([row[c] for c in cols],
                                       [table.column(c) for c in cols], "mysql")
                try:
                    with tconn.begin():
                        sinks[cols].write([values])
                except Exception as exc:
                    fixed = recategorised(exc)
                    if fixed is not exc:
                        if not is_data_error(fixed):
                            raise fixed from exc
                    elif not is_data_error(exc):
                        raise
                    etype, sqlstate = error_name(exc)
                    stconn.execute(schema_sql(state_schema, _FAILED_AGAIN),
                                   (etype, sqlstate, describe_error(exc, target_url), letter_id))
                    result.still_failing += 1
                    continue
                with stconn.transaction():
                    _settle(stconn, state_schema, job, letter_id)
                result.replayed += 1
    finally:
        engine.dispose()
    return result


_FAILED_AGAIN = """
    UPDATE {s}.dead_letters SET attempts = attempts + 1, error_type = %s, sqlstate = %s,
        error_message = %s, created_at = now() WHERE id = %s"""


def _require_sqlite_file(url: DbUrl) -> None:
    from pathlib import Path

    from sqlalchemy.engine import make_url

    path = make_url(url.raw).database
    if path and path != ":memory:" and not path.startswith("file:") and not Path(path).exists():
        raise UsageError(f"the job's SQLite target {path} does not exist here (a relative path "
                         "is relative to where the copy ran): pass --target "
                         "sqlite:////absolute/path/to/the.db")


def _sqla_unique_keys(conn: Any, table: Any) -> list[tuple[str, ...]]:
    """The target's primary key, then its unique constraints and indexes: what an upsert or
    ignore matches rows on (as the copy chose, the first one among the written columns)."""
    import sqlalchemy as sa

    inspector = sa.inspect(conn)
    found = [tuple(table.primary_key)] if table.primary_key else []
    found += [tuple(u["column_names"]) for u in
              inspector.get_unique_constraints(table.name, schema=table.schema)]
    found += [tuple(c for c in i["column_names"] if c) for i in
              inspector.get_indexes(table.name, schema=table.schema) if i.get("unique")]
    return [k for k in found if k]


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
