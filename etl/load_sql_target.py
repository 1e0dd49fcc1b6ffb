"""What `etl load` keeps in a MySQL/MariaDB or SQLite target: its connections, and two small
tables that make a load exactly-once although the state store is another database.

``etl_load_checkpoints`` — one row per load job (``job_id``): where the load is (the file's
index among the job's files, the byte offset after the last committed row and its line; a
Parquet file's row index), the chunk index and counts, the files' identities (size, mtime,
head hash), the id of this load (``load_id``: one per fresh start, kept by resumed runs) and
whether it finished. It is upserted **in each chunk's own transaction**, so it always says
exactly which rows are in the table; a rerun resumes from it, whatever the state store
says.

``etl_load_rejects`` — the dead letters of a chunk, written in the same transaction, and
deleted once the state store holds them (by the next chunk's transaction, or at the end).
A crash between the target's commit and the state store's write loses neither the
position nor the dead letters: the next run moves what the state store lacks.

Both are created on first use (``CREATE TABLE IF NOT EXISTS``, before the first chunk —
MySQL commits DDL on its own) in the URL's database, and may be dropped whenever no load
job into that database is unfinished.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import pg
from .dialects import Family, family, make_engine, placeholder, qualified, quote, write_sql
from .errors import ConnectionLostError, TargetError, UsageError
from .model import Checkpoint, Mode
from .report import utc_now
from .sql_copy_io import describe_error
from .urls import DbUrl

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

POSITIONS_TABLE = "etl_load_checkpoints"
REJECTS_TABLE = "etl_load_rejects"
FILES_KEY = "files"        # the checkpoint's watermark: the identity of each file of the job
LOAD_ID_KEY = "load_id"    # and the load (one per fresh start) its chunks belong to
# How long a SQLite writer waits for another one's lock before the chunk fails (and is retried).
SQLITE_BUSY_SECONDS = 5.0

_COLUMNS = ("job_id", "load_id", "run_id", "file_index", "file_offset", "line", "chunk_index",
            "processed", "succeeded", "failed", "skipped", "finished", "files", "updated_at")
_DDL = {
    "mysql": [
        f"CREATE TABLE IF NOT EXISTS `{POSITIONS_TABLE}` (job_id VARCHAR(255) NOT NULL "
        "PRIMARY KEY, load_id CHAR(36) NOT NULL, run_id CHAR(36), file_index INT NOT NULL, "
        "file_offset BIGINT NOT NULL, line BIGINT NOT NULL, chunk_index BIGINT NOT NULL, "
        "processed BIGINT NOT NULL, succeeded BIGINT NOT NULL, failed BIGINT NOT NULL, "
        "skipped BIGINT NOT NULL, finished SMALLINT NOT NULL, files LONGTEXT NOT NULL, "
        "updated_at VARCHAR(40) NOT NULL) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        f"CREATE TABLE IF NOT EXISTS `{REJECTS_TABLE}` (job_id VARCHAR(255) NOT NULL, "
        "load_id CHAR(36) NOT NULL, chunk_index BIGINT NOT NULL, seq INT NOT NULL, "
        "letter LONGTEXT NOT NULL, PRIMARY KEY (job_id, load_id, chunk_index, seq)) "
        "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"],
    "sqlite": [
        f'CREATE TABLE IF NOT EXISTS "{POSITIONS_TABLE}" (job_id TEXT NOT NULL PRIMARY KEY, '
        "load_id TEXT NOT NULL, run_id TEXT, file_index INTEGER NOT NULL, "
        "file_offset INTEGER NOT NULL, line INTEGER NOT NULL, chunk_index INTEGER NOT NULL, "
        "processed INTEGER NOT NULL, succeeded INTEGER NOT NULL, failed INTEGER NOT NULL, "
        "skipped INTEGER NOT NULL, finished INTEGER NOT NULL, files TEXT NOT NULL, "
        "updated_at TEXT NOT NULL)",
        f'CREATE TABLE IF NOT EXISTS "{REJECTS_TABLE}" (job_id TEXT NOT NULL, '
        "load_id TEXT NOT NULL, chunk_index INTEGER NOT NULL, seq INTEGER NOT NULL, "
        "letter TEXT NOT NULL, PRIMARY KEY (job_id, load_id, chunk_index, seq))"],
}


def sqlite_path(url: DbUrl) -> str | None:
    from sqlalchemy.engine import make_url

    return make_url(url.raw).database


def _sqlite_foreign_keys(dbapi_connection: Any, _record: Any) -> None:
    """SQLite checks the foreign keys a table declares only when asked, per connection: a
    load is (a row whose parent is missing is refused, as every other database does)."""
    dbapi_connection.execute("PRAGMA foreign_keys = ON")


class TargetDb:
    """The target's engine; connections whose failures are EtlErrors."""

    def __init__(self, url: DbUrl, lock_timeout: float | None) -> None:
        self.url = url
        self.lock_timeout = lock_timeout
        backend = url.backend
        if backend not in ("mysql", "mariadb", "sqlite"):
            raise UsageError(f"--target {url.masked}: etl load writes into PostgreSQL, "
                             f"MySQL/MariaDB and SQLite, not {backend}")
        self.family: Family = "sqlite" if backend == "sqlite" else "mysql"
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if self.family == "sqlite":
            path = sqlite_path(url)
            if not path or path == ":memory:":
                raise UsageError(f"--target {url.masked}: a load needs a SQLite database file "
                                 "(sqlite:///path.db), not an in-memory one")
            if not path.startswith("file:") and not Path(path).is_file():
                raise UsageError(f"--target {url.masked}: no SQLite database file {path} — "
                                 "etl load writes into an existing table (sqlite:///relative "
                                 "or sqlite:////absolute/path)")
            kwargs["connect_args"] = {"timeout": lock_timeout or SQLITE_BUSY_SECONDS}
        else:
            kwargs["connect_args"] = {"connect_timeout": pg.CONNECT_TIMEOUT_SECONDS}
        self.engine: Engine = make_engine(url.raw, **kwargs)
        if self.family == "sqlite":
            import sqlalchemy as sa

            from .sql_copy.connections import _sqlite_real_transactions

            _sqlite_real_transactions(self.engine)
            sa.event.listen(self.engine, "connect", _sqlite_foreign_keys)

    def connect(self, reconnect: bool = False) -> Connection:
        import sqlalchemy as sa

        try:
            conn = self.engine.connect()
            if self.lock_timeout and self.family == "mysql":
                wait = max(1, round(self.lock_timeout))
                conn.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {wait}, "
                                     f"lock_wait_timeout = {wait}")
                conn.commit()
            return conn
        except sa.exc.DBAPIError as exc:
            cls = ConnectionLostError if reconnect else TargetError
            raise cls(f"cannot connect to the target database {self.url.masked}: "
                      f"{describe_error(exc, self.url)} — check the host, port, user, "
                      "password and database name in the URL") from exc

    def dispose(self) -> None:
        self.engine.dispose()


@dataclass(frozen=True)
class Stored:
    """A job's row of etl_load_checkpoints."""

    checkpoint: Checkpoint
    load_id: str
    finished: bool

    @property
    def files(self) -> list[dict[str, Any]]:
        return list((self.checkpoint.watermark or {}).get(FILES_KEY) or [])


def ensure_tables(conn: Connection) -> None:
    """Create the two tables if they are missing (each DDL commits on MySQL)."""
    fam = family(conn.dialect)
    with conn.begin():
        for statement in _DDL[fam]:
            conn.exec_driver_sql(statement)


def has_tables(conn: Connection) -> bool:
    import sqlalchemy as sa

    found = sa.inspect(conn).has_table(POSITIONS_TABLE)
    conn.rollback()
    return found


def read_position(conn: Connection, job_id: str) -> Stored | None:
    """The job's position as the target has it (in the caller's transaction, if any)."""
    d = conn.dialect
    cols = ", ".join(quote(d, c) for c in _COLUMNS)
    row = conn.exec_driver_sql(
        f"SELECT {cols} FROM {quote(d, POSITIONS_TABLE)} WHERE job_id = {placeholder(d)}",
        (job_id,)).fetchone()
    if row is None:
        return None
    r = dict(zip(_COLUMNS, row, strict=True))
    chunk = int(r["chunk_index"])
    cp = Checkpoint(
        job_id=job_id, chunk_index=chunk,
        last_key=(str(r["file_index"]), str(r["file_offset"])) if chunk else None,
        last_key_json=[int(r["file_index"]), int(r["file_offset"]), int(r["line"])] if chunk
        else [],
        processed=int(r["processed"]), succeeded=int(r["succeeded"]), failed=int(r["failed"]),
        skipped=int(r["skipped"]), run_id=r["run_id"], updated_at=r["updated_at"],
        watermark={FILES_KEY: json.loads(r["files"]), LOAD_ID_KEY: r["load_id"]})
    return Stored(cp, str(r["load_id"]), bool(r["finished"]))


def save_position(conn: Connection, cp: Checkpoint, *, finished: bool = False) -> None:
    """Upsert the job's row in the caller's transaction (the chunk's)."""
    d = conn.dialect
    index, offset, line = cp.last_key_json if cp.last_key is not None else (0, 0, 1)
    watermark = cp.watermark or {}
    values = (cp.job_id, watermark[LOAD_ID_KEY], cp.run_id, index, offset, line,
              cp.chunk_index, cp.processed, cp.succeeded, cp.failed, cp.skipped,
              1 if finished else 0, json.dumps(watermark.get(FILES_KEY) or []), utc_now())
    conn.exec_driver_sql(write_sql(d, POSITIONS_TABLE, _COLUMNS, mode=Mode.UPSERT,
                                   key=("job_id",)), values)


def add_rejects(conn: Connection, job_id: str, load_id: str,
                letters: Sequence[dict[str, Any]]) -> None:
    """Keep a chunk's dead letters in the target, in the chunk's transaction."""
    if not letters:
        return
    d = conn.dialect
    sql = write_sql(d, REJECTS_TABLE, ("job_id", "load_id", "chunk_index", "seq", "letter"),
                    mode=Mode.APPEND)
    conn.exec_driver_sql(sql, [(job_id, load_id, r["chunk_index"], i,  # type: ignore[arg-type]
                                json.dumps(r, default=str, ensure_ascii=False))
                               for i, r in enumerate(letters)])


def pending_rejects(conn: Connection, job_id: str, load_id: str,
                    after_chunk: int) -> list[dict[str, Any]]:
    """The dead letters kept in the target for chunks after ``after_chunk``, in order."""
    d = conn.dialect
    mark = placeholder(d)
    rows = conn.exec_driver_sql(
        f"SELECT letter FROM {quote(d, REJECTS_TABLE)} WHERE job_id = {mark} AND "
        f"load_id = {mark} AND chunk_index > {mark} ORDER BY chunk_index, seq",
        (job_id, load_id, after_chunk)).fetchall()
    return [json.loads(r[0]) for r in rows]


def drop_rejects(conn: Connection, job_id: str, upto_chunk: int | None = None) -> None:
    """Delete the dead letters the state store holds now (all of the job's: None)."""
    d = conn.dialect
    mark = placeholder(d)
    if upto_chunk is None:
        conn.exec_driver_sql(f"DELETE FROM {quote(d, REJECTS_TABLE)} WHERE job_id = {mark}",
                             (job_id,))
    else:
        conn.exec_driver_sql(f"DELETE FROM {quote(d, REJECTS_TABLE)} WHERE job_id = {mark} "
                             f"AND chunk_index <= {mark}", (job_id, upto_chunk))


def check_transactional(conn: Connection, name: str, schema: str | None) -> None:
    """MySQL: refuse a table whose engine cannot roll back (MyISAM …): a chunk could not be
    undone, bad rows not isolated, and a crash would leave half a chunk."""
    if family(conn.dialect) != "mysql":
        return
    engine = conn.exec_driver_sql(
        "SELECT ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = "
        "COALESCE(%s, DATABASE()) AND TABLE_NAME = %s", (schema, name)).scalar()
    conn.rollback()
    if engine is not None and str(engine).upper() != "INNODB":
        raise UsageError(f"table {qualified(conn.dialect, name, schema)} uses the {engine} "
                         "engine, which cannot roll back a chunk; etl load needs InnoDB "
                         "(ALTER TABLE … ENGINE=InnoDB)")


__all__ = ["FILES_KEY", "LOAD_ID_KEY", "POSITIONS_TABLE", "REJECTS_TABLE", "Stored", "TargetDb",
           "add_rejects", "check_transactional", "drop_rejects", "ensure_tables",
           "has_tables", "pending_rejects", "read_position", "save_position"]
