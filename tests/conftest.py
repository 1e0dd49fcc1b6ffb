"""Shared fixtures: a real PostgreSQL server and fresh databases per test.

The server is $ETL_TEST_PG_URL when set (the word ``embedded`` forces the
embedded one), else the PostgreSQL listening on 127.0.0.1:5432 (user postgres,
trust) when there is one, else the embedded PostgreSQL started in a temporary
$ETL_HOME — what a fresh machine gets. No mocks anywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
LOCAL_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the maintenance database of a real PostgreSQL server."""
    url = os.environ.get("ETL_TEST_PG_URL")
    if url and url != "embedded":
        yield url
        return
    if not url and _reachable(LOCAL_PG):
        yield LOCAL_PG
        return
    from etl import embedded

    home = tmp_path_factory.mktemp("etl_home")
    yield embedded.start(home)
    embedded.stop(home)


def db_url(server: str, name: str) -> str:
    base, _, tail = server.partition("?")
    base = base.rsplit("/", 1)[0] + "/" + name
    return f"{base}?{tail}" if tail else base


@pytest.fixture
def make_db(pg_server: str) -> Iterator[Callable[[str], str]]:
    """Factory: a fresh, empty database; dropped after the test."""
    created: list[str] = []

    def make(prefix: str = "t") -> str:
        name = f"etl_{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        created.append(name)
        return db_url(pg_server, name)

    yield make
    with psycopg.connect(pg_server, autocommit=True) as conn:
        for name in created:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def src(make_db: Callable[[str], str]) -> str:
    return make_db("src")


@pytest.fixture
def dst(make_db: Callable[[str], str]) -> str:
    return make_db("dst")


def execute(url: str, statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statements)


def scalar(url: str, query: str, params: tuple | None = None):
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
        return row[0] if row else None


def fingerprint(url: str, table: str) -> tuple[int, str | None, int]:
    """(rows, order-independent checksum of every row's text, distinct rows)."""
    ident = sql.Identifier(*table.split("."))
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql.SQL(
            "SELECT count(*), md5(string_agg(h, '' ORDER BY h)), count(DISTINCT h) "
            "FROM (SELECT md5(t::text) AS h FROM {} AS t) AS s").format(ident)).fetchone()
        assert row is not None
        return int(row[0]), row[1], int(row[2])


def etl_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "etl", *args]


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `python -m etl …` in the background; anything still alive at teardown is killed."""
    started: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(etl_cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=ROOT)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def run_etl(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `etl` CLI in a subprocess; stdout and stderr captured separately."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(etl_cmd(*args), capture_output=True, text=True, env=full_env,
                          timeout=timeout, input=input, cwd=ROOT)


# -- MariaDB/MySQL ------------------------------------------------------------------------

LOCAL_MARIADB = "mysql+pymysql://root@127.0.0.1:3306/"


@pytest.fixture(scope="session")
def mariadb_url() -> str:
    """URL of a real MariaDB/MySQL server ($ETL_TEST_MYSQL_URL, else root@127.0.0.1:3306).

    Skipped when none answers — except under ETL_REQUIRE_SERVICES=1 (CI), where the
    absence of the server fails the test instead of hiding it.
    """
    import pymysql
    from sqlalchemy.engine import make_url

    url = os.environ.get("ETL_TEST_MYSQL_URL") or LOCAL_MARIADB
    parsed = make_url(url)
    try:
        pymysql.connect(host=parsed.host or "127.0.0.1", port=parsed.port or 3306,
                        user=parsed.username or "root", password=parsed.password or "",
                        connect_timeout=3).close()
    except pymysql.Error as exc:
        reason = f"MariaDB/MySQL not reachable at {parsed.render_as_string(hide_password=True)}: {exc}"
        if os.environ.get("ETL_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{reason} (ETL_REQUIRE_SERVICES=1: start it, or unset the variable)")
        pytest.skip(f"{reason}; set ETL_TEST_MYSQL_URL or start MariaDB to run these tests")
    return url


@pytest.fixture
def make_mariadb_db(mariadb_url: str) -> Iterator[Callable[[str], str]]:
    """Factory: a fresh, empty MariaDB database (utf8mb4); dropped after the test."""
    import pymysql
    from sqlalchemy.engine import make_url

    server = make_url(mariadb_url)
    created: list[str] = []

    def connect() -> pymysql.Connection:
        return pymysql.connect(host=server.host or "127.0.0.1", port=server.port or 3306,
                               user=server.username or "root", password=server.password or "",
                               autocommit=True)

    def make(prefix: str = "t") -> str:
        name = f"etl_{prefix}_{uuid.uuid4().hex[:10]}"
        with connect() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        created.append(name)
        return server.set(database=name).render_as_string(hide_password=False)

    yield make
    with connect() as conn, conn.cursor() as cur:
        for name in created:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


def release_once_waited_for(holder: psycopg.Connection, url: str, *,
                            after: float = 0.5, timeout: float = 30) -> threading.Thread:
    """End ``holder``'s transaction (its locks) once an etl session has been seen waiting for
    a lock in ``url``'s server, ``after`` seconds later — not after a fixed time, which a slow
    start of the etl process could outlast. Started already; join it."""
    def release() -> None:
        deadline = time.monotonic() + timeout
        with psycopg.connect(url, autocommit=True) as watcher:
            while time.monotonic() < deadline:
                row = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'etl:%' "
                    "AND wait_event_type = 'Lock'").fetchone()
                if row and row[0]:
                    break
                time.sleep(0.01)
        time.sleep(after)
        holder.rollback()

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    return thread
