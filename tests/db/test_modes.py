"""Write modes on a PostgreSQL target: upsert and ignore (staging + INSERT … ON CONFLICT)."""

from __future__ import annotations

import json

import pytest

import etl
from tests.conftest import execute, fingerprint, run_etl, scalar

N = 10_000


def _source(src: str) -> None:
    execute(src, f"""
        CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric(10, 2),
                            tags text[], doc jsonb);
        INSERT INTO items SELECT g, 'item ' || g || ' \\ ü', g * 1.5, ARRAY['a', 'b' || g],
                                 jsonb_build_object('g', g)
        FROM generate_series(1, {N}) g;
    """)


def _target_with_half(src: str, dst: str) -> None:
    """Rows 1..N/2 in the target: the first half of them identical, the second half changed."""
    _source(src)
    etl.copy(source=src, target=dst, table="items", where=f"id <= {N // 2}", job="seed")
    execute(dst, f"UPDATE items SET price = price + 1 WHERE id > {N // 4}")


def _xmins(url: str) -> dict[int, str]:
    import psycopg

    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT id, xmin::text FROM items"))


def test_upsert_twice_writes_nothing_the_second_time(src: str, dst: str) -> None:
    _source(src)
    first = etl.copy(source=src, target=dst, table="items", mode="upsert")
    assert first.status is etl.Status.COMPLETED
    assert first.to_dict()["metadata"]["outcomes"] == {
        "inserted": N, "superseded": 0, "unchanged": 0, "updated": 0}
    before = _xmins(dst)
    second = etl.copy(source=src, target=dst, table="items", mode="upsert", restart=True)
    doc = second.to_dict()
    assert doc["metadata"]["outcomes"] == {"inserted": 0, "superseded": 0, "unchanged": N,
                                           "updated": 0}
    assert doc["summary"]["succeeded"] == N and doc["summary"]["skipped"] == 0
    assert _xmins(dst) == before  # no row version was written: no bloat
    assert fingerprint(dst, "items") == fingerprint(src, "items")


def test_upsert_half_new_half_changed_counts_exactly(src: str, dst: str) -> None:
    _target_with_half(src, dst)
    unchanged_before = {k: v for k, v in _xmins(dst).items() if k <= N // 4}
    result = etl.copy(source=src, target=dst, table="items", mode="upsert", chunk_size=1_500)
    doc = result.to_dict()
    assert doc["metadata"]["outcomes"] == {"inserted": N // 2, "updated": N // 4,
                                           "unchanged": N // 4, "superseded": 0}
    s = doc["summary"]
    assert s["succeeded"] == N and s["succeeded"] + s["failed"] + s["skipped"] == s["total_items"]
    assert fingerprint(dst, "items") == fingerprint(src, "items")
    after = _xmins(dst)
    assert {k: after[k] for k in unchanged_before} == unchanged_before


def test_ignore_keeps_existing_rows_and_counts_them_skipped(src: str, dst: str) -> None:
    _target_with_half(src, dst)
    result = etl.copy(source=src, target=dst, table="items", mode="ignore")
    doc = result.to_dict()
    assert doc["metadata"]["outcomes"] == {"inserted": N // 2, "ignored": N // 2, "superseded": 0}
    s = doc["summary"]
    assert (s["succeeded"], s["skipped"], s["failed"]) == (N // 2, N // 2, 0)
    assert s["succeeded"] + s["failed"] + s["skipped"] == s["total_items"] == N
    # the changed rows kept the target's values; the new rows came from the source
    assert scalar(dst, "SELECT count(*) FROM items WHERE price = id * 1.5 + 1") == N // 4
    assert scalar(dst, "SELECT count(*) FROM items") == N


def test_rows_sharing_a_target_key_inside_a_chunk_last_wins(src: str, dst: str) -> None:
    """The source key is unique, the target matches on another unique column: rows of one
    chunk share a target key, and PostgreSQL's "cannot affect row a second time" must not
    reach the user."""
    execute(src, """
        CREATE TABLE prices (id int PRIMARY KEY, sku text NOT NULL, price int);
        INSERT INTO prices SELECT g, 'sku' || (g % 100), g FROM generate_series(1, 1000) g;
    """)
    execute(dst, "CREATE TABLE prices (id int, sku text UNIQUE NOT NULL, price int)")
    result = etl.copy(source=src, target=dst, table="prices", mode="upsert", chunk_size=5_000)
    assert result.status is etl.Status.COMPLETED, result.message
    doc = result.to_dict()
    # the last row of each sku in key order wins: ids 901..1000
    assert scalar(dst, "SELECT count(*) FROM prices") == 100
    assert scalar(dst, "SELECT min(id) FROM prices") == 901
    assert scalar(dst, "SELECT count(*) FROM prices WHERE price <> id") == 0
    s = doc["summary"]
    assert s["succeeded"] + s["skipped"] == 1000 == s["total_items"]
    assert doc["metadata"]["outcomes"]["superseded"] == s["skipped"]


def test_upsert_without_a_unique_key_on_the_target_is_refused(src: str, dst: str) -> None:
    _source(src)
    execute(dst, "CREATE TABLE items (id int, name text, price numeric(10,2), tags text[], "
                 "doc jsonb)")
    proc = run_etl("copy", "--source", src, "--target", dst, "--table", "items",
                   "--mode", "upsert", "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert "primary key or unique index" in proc.stderr and "Traceback" not in proc.stderr
    assert scalar(dst, "SELECT count(*) FROM items") == 0


@pytest.mark.parametrize("mode", ["upsert", "ignore"])
def test_cli_modes_report_outcomes(src: str, dst: str, mode: str) -> None:
    _target_with_half(src, dst)
    proc = run_etl("copy", "--source", src, "--target", dst, "--table", "items",
                   "--mode", mode, "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["metadata"]["outcomes"]["inserted"] == N // 2
    if mode == "upsert":
        assert fingerprint(dst, "items") == fingerprint(src, "items")
    else:
        assert doc["summary"]["skipped"] == N // 2


def test_dlq_replay_follows_the_jobs_mode_and_column_names(src: str, dst: str) -> None:
    execute(src, """
        CREATE TABLE "Acct" ("AcctId" int PRIMARY KEY, "Balance" int);
        INSERT INTO "Acct" SELECT g, g FROM generate_series(1, 100) g;
        UPDATE "Acct" SET "Balance" = -1 WHERE "AcctId" IN (10, 20);
    """)
    execute(dst, "CREATE TABLE acct (acct_id int PRIMARY KEY, balance int CHECK (balance >= 0))")
    kw = dict(source=src, target=dst, table="Acct", to_table="acct", mode="upsert",
              rename_columns="snake_case")
    first = etl.copy(**kw)
    assert first.failed == 2
    # someone writes one of the keys meanwhile; the cause is fixed
    execute(dst, "INSERT INTO acct VALUES (10, 999); "
                 "ALTER TABLE acct DROP CONSTRAINT acct_balance_check")
    replay = etl.replay_dead_letters("copy:public.acct", state=dst)
    assert (replay.replayed, replay.still_failing) == (2, 0)
    assert scalar(dst, "SELECT count(*) FROM acct WHERE balance = -1") == 2  # upserted
    with_transform = etl.copy(source=src, target=dst, table="Acct", to_table="acct2",
                              rename_columns="snake_case", transform=lambda df: df,
                              job="tx")
    assert with_transform.ok
    with pytest.raises(etl.UsageError, match="skip the transform"):
        etl.replay_dead_letters("tx", state=dst)
