"""The answer to a COMMIT lost with its connection: the transaction committed, etl only saw
the connection drop. The retry must notice (the stored checkpoint is past the chunk) and not
write the chunk again — or, with the state store elsewhere, clear the chunk's keys first.
Caused for real by a proxy that hangs up right after the server committed."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.conftest import execute, fingerprint, release_once_waited_for, run_etl, scalar
from tests.faults.commit_proxy import CommitDropper

pytestmark = pytest.mark.timeout(120)

ROWS = 20_000


def _via_proxy(url: str, role: str, nth: int = 3) -> tuple[str, CommitDropper]:
    """``url`` through a proxy that loses the answer to the nth COMMIT of ``role``'s session."""
    parts = urlsplit(url)
    proxy = CommitDropper((parts.hostname or "127.0.0.1", parts.port or 5432), f"etl:{role}:", nth)
    port = proxy.start()
    user = f"{parts.username}@" if parts.username else ""
    return (f"postgresql://{user}127.0.0.1:{port}{parts.path}"
            "?sslmode=disable&gssencmode=disable"), proxy


def _tables(src: str, dst: str) -> None:
    execute(src, f"CREATE TABLE ev (id bigint PRIMARY KEY, body text); "
                 f"INSERT INTO ev SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g")
    execute(dst, "CREATE TABLE ev (id bigint PRIMARY KEY, body text)")


def _copied_exactly(src: str, dst: str, proc) -> dict:
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert fingerprint(dst, "ev") == fingerprint(src, "ev")
    s = doc["summary"]
    assert s["succeeded"] == s["total_items"] == ROWS and s["failed"] == 0
    assert doc["metadata"]["retry_attempts"] >= 1
    return doc


def test_copy_with_state_in_the_target_does_not_write_a_committed_chunk_again(
        src: str, dst: str) -> None:
    _tables(src, dst)
    target, proxy = _via_proxy(dst, "target")
    proc = run_etl("copy", "--source", src, "--target", target, "--table", "ev",
                   "--chunk-size", "2000", "--json", "--no-progress")
    assert proxy.dropped.is_set(), "the proxy never dropped a COMMIT's answer"
    _copied_exactly(src, dst, proc)
    assert "had committed before its connection was lost" in proc.stderr


def test_copy_with_state_elsewhere_clears_the_chunk_before_writing_it_again(
        src: str, dst: str, make_db) -> None:
    _tables(src, dst)
    state = make_db("state")
    target, proxy = _via_proxy(dst, "target")
    proc = run_etl("copy", "--source", src, "--target", target, "--state", state,
                   "--table", "ev", "--chunk-size", "2000", "--json", "--no-progress")
    assert proxy.dropped.is_set()
    _copied_exactly(src, dst, proc)
    assert "committed without its checkpoint" in proc.stderr or "removed" in proc.stderr


def test_backfill_does_not_apply_a_committed_chunk_twice(dst: str) -> None:
    execute(dst, f"CREATE TABLE ev (id bigint PRIMARY KEY, n bigint); "
                 f"INSERT INTO ev SELECT g, g FROM generate_series(1, {ROWS}) g")
    target, proxy = _via_proxy(dst, "target")
    proc = run_etl("backfill", "--target", target, "--table", "ev", "--set", "n = n + 1",
                   "--chunk-size", "2000", "--json", "--no-progress")
    assert proxy.dropped.is_set()
    assert proc.returncode == 0, proc.stderr
    assert scalar(dst, "SELECT count(*) FROM ev WHERE n <> id + 1") == 0
    assert json.loads(proc.stdout)["summary"]["succeeded"] == ROWS


def test_cross_database_copy_into_postgresql_does_not_write_a_committed_chunk_again(
        tmp_path, dst: str) -> None:
    import sqlite3

    path = tmp_path / "src.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE ev (id INTEGER PRIMARY KEY, body TEXT)")
        conn.executemany("INSERT INTO ev VALUES (?, ?)",
                         [(i, f"row {i}") for i in range(1, ROWS + 1)])
    execute(dst, "CREATE TABLE ev (id bigint PRIMARY KEY, body text)")
    target, proxy = _via_proxy(dst, "target")
    proc = run_etl("copy", "--source", f"sqlite:///{path}", "--target", target, "--table", "ev",
                   "--to-table", "public.ev", "--chunk-size", "2000", "--json", "--no-progress")
    assert proxy.dropped.is_set()
    assert proc.returncode == 0, proc.stderr
    with psycopg.connect(dst) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT id), sum(id) FROM ev"
                            ).fetchone() == (ROWS, ROWS, ROWS * (ROWS + 1) // 2)
    assert json.loads(proc.stdout)["summary"]["succeeded"] == ROWS


def test_a_retry_of_a_restarts_first_chunk_does_not_take_the_old_checkpoint(
        src: str, dst: str) -> None:
    """--restart keeps the old checkpoint until its first chunk commits; when that chunk is
    retried, the stored checkpoint is the old run's, not a sign that the chunk went in."""

    _tables(src, dst)
    first = run_etl("copy", "--source", src, "--target", dst, "--table", "ev", "--no-progress")
    assert first.returncode == 0, first.stderr
    execute(dst, "TRUNCATE ev")
    holder = psycopg.connect(dst)
    holder.execute("LOCK TABLE ev IN ACCESS EXCLUSIVE MODE")  # the first attempt times out
    release = release_once_waited_for(holder, dst)
    try:
        proc = run_etl("copy", "--source", src, "--target", dst, "--table", "ev", "--restart",
                       "--chunk-size", "5000", "--lock-timeout", "200ms", "--retries", "8",
                       "--retry-max-wait", "0.5s", "--json", "--no-progress")
    finally:
        release.join()
        holder.close()
    doc = _copied_exactly(src, dst, proc)
    assert doc["metadata"]["retries_by_reason"].get("55P03", 0) >= 1
