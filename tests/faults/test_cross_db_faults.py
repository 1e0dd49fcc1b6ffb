"""Transient failures during `etl copy` across databases: caused for real, then survived.

A MariaDB target connection killed with ``KILL``, a row lock held by another MariaDB
session until ``innodb_lock_wait_timeout`` fires (error 1205, SQLSTATE HY000), a
PostgreSQL source session ended with ``pg_terminate_backend``: each time the chunk
rolls back, the job reconnects and retries, and the target ends exact. The fault is
injected at a chunk boundary by the progress hook, so it always lands. No mocks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

import etl
from tests.db.test_cross_db import _assert_exact_events, _connect, _events, sql

pytestmark = pytest.mark.timeout(120)


class AtChunk:
    """A progress sink that runs ``action`` once, after chunk ``n`` committed."""

    def __init__(self, n: int, action: Callable[[], None]) -> None:
        self.left, self.action = n, action

    def start(self, label: str, done: int, total: int, exact: bool) -> None:
        pass

    def advance(self, rows: int, nbytes: int) -> None:
        self.left -= 1
        if self.left == 0:
            self.action()

    def finish(self, message: str) -> None:
        pass


def _database(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?")[0]


def test_killed_mariadb_target_connection_is_reopened_and_the_chunk_retried(
        make_db: Callable[[str], str], make_mariadb_db: Callable[[str], str]) -> None:
    src, tgt, state = make_db("ev"), make_mariadb_db("ev"), make_db("state")
    data = _events(src, 3_000, "timestamp")
    killed: list[int] = []

    def kill_etl_sessions() -> None:
        conn = _connect(tgt)
        with conn.cursor() as cur:
            cur.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s "
                        "AND ID <> CONNECTION_ID()", (_database(tgt),))
            for (pid,) in cur.fetchall():
                cur.execute(f"KILL {int(pid)}")
                killed.append(pid)
        conn.close()

    result = etl.copy(source=src, target=tgt, table="ev", state=state, chunk_size=200,
                      progress=AtChunk(3, kill_etl_sessions))
    assert killed, "no etl session to kill"
    doc = result.to_dict()
    assert result.status.value == "completed", result.message
    assert doc["metadata"]["retry_attempts"] >= 1
    assert doc["summary"]["succeeded"] == len(data)
    _assert_exact_events(tgt, data)


def test_mariadb_lock_wait_timeout_is_retried_not_fatal(
        make_db: Callable[[str], str], make_mariadb_db: Callable[[str], str]) -> None:
    src, tgt, state = make_db("ev"), make_mariadb_db("ev"), make_db("state")
    data = _events(src, 1_000, "timestamp")
    sql(tgt, "CREATE TABLE ev (id BIGINT PRIMARY KEY, name VARCHAR(60), amount DECIMAL(12,2), "
             "at DATETIME(6)) CHARACTER SET utf8mb4")
    blocker = _connect(tgt)
    cur = blocker.cursor()
    cur.execute("BEGIN")
    cur.execute("INSERT INTO ev VALUES (1500, 'held', 0, NULL)")  # a key of the 3rd chunk

    def release() -> None:
        blocker.rollback()
        blocker.close()

    timer = threading.Timer(2.5, release)
    timer.start()
    try:
        result = etl.copy(source=src, target=tgt, table="ev", state=state, chunk_size=200,
                          lock_timeout=1)
    finally:
        timer.cancel()
        if blocker.open:
            release()
    doc: dict[str, Any] = result.to_dict()
    assert result.status.value == "completed", result.message
    assert doc["metadata"]["retries_by_reason"].get("HY000", 0) >= 1  # errno 1205
    _assert_exact_events(tgt, data)


def test_terminated_postgresql_source_session_is_reopened(
        make_db: Callable[[str], str], tmp_path: Any) -> None:
    src, state = make_db("ev"), make_db("state")
    tgt = f"sqlite:///{tmp_path / 'ev.sqlite'}"
    data = _events(src, 3_000, "timestamp")
    ended: list[Any] = []

    def terminate() -> None:
        ended.extend(sql(src, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = %s AND pid <> pg_backend_pid()",
                         (_database(src),)))

    result = etl.copy(source=src, target=tgt, table="ev", state=state, chunk_size=200,
                      progress=AtChunk(4, terminate))
    assert ended, "no source session to end"
    doc = result.to_dict()
    assert result.status.value == "completed", result.message
    assert doc["metadata"]["retry_attempts"] >= 1
    _assert_exact_events(tgt, data)
