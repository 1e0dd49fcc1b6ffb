"""--transform: a polars function per chunk; rejects become `validation` dead letters."""

from __future__ import annotations

import json
import textwrap

import polars as pl
import psycopg

import etl
from tests.conftest import execute, fingerprint, run_etl, scalar

N = 5_000


def _source(src: str) -> None:
    execute(src, f"""
        CREATE TABLE people (id int PRIMARY KEY, name text, email text, score numeric(8, 2),
                             born date, seen timestamptz, tags text[], doc jsonb);
        INSERT INTO people SELECT g, '  Name ' || g || ' ü  ',
               CASE WHEN g % 500 = 0 THEN 'not-an-email' ELSE 'p' || g || '@example.com' END,
               g / 4.0, date '1970-01-01' + g, timestamptz '2024-05-01 10:00+02' + g * interval '1s',
               ARRAY['x' || g, NULL, 'a "b"'], jsonb_build_object('g', g, 'k', 'v\\w')
        FROM generate_series(1, {N}) g;
    """)


def clean(df: pl.DataFrame) -> pl.DataFrame:
    """Trim names, upper-case emails, reject rows without an @, drop odd ids above 4,900."""
    return (df.filter(~((pl.col("id") > 4_900) & (pl.col("id") % 2 == 1)))
              .with_columns(pl.col("name").str.strip_chars(),
                            pl.col("email").str.to_uppercase(),
                            pl.when(pl.col("email").str.contains("@")).then(None)
                              .otherwise(pl.lit("email has no @")).alias("_reject")))


def test_transform_rejects_drops_and_rewrites(src: str, dst: str) -> None:
    _source(src)
    result = etl.copy(source=src, target=dst, table="people", transform=clean, chunk_size=1_200)
    assert result.status is etl.Status.COMPLETED_WITH_ERRORS, result.message
    s = result.to_dict()["summary"]
    rejected = N // 500          # ids 500, 1000, … 5000 (5000 is even: not dropped)
    dropped = 50                 # odd ids 4901..4999
    assert (s["failed"], s["skipped"], s["succeeded"]) == (rejected, dropped,
                                                            N - rejected - dropped)
    assert s["succeeded"] + s["failed"] + s["skipped"] == s["total_items"] == N
    assert scalar(dst, "SELECT count(*) FROM people") == N - rejected - dropped
    assert scalar(dst, "SELECT count(*) FROM people WHERE name <> btrim(name) "
                       "OR email <> upper(email)") == 0
    # every other column arrived exactly (types that travel as text included)
    same = scalar(dst, "SELECT md5(string_agg(row(id, score, born, seen, tags, doc)::text, ',' "
                       "ORDER BY id)) FROM people")
    want = scalar(src, "SELECT md5(string_agg(row(id, score, born, seen, tags, doc)::text, ',' "
                       "ORDER BY id)) FROM people WHERE email LIKE '%@%' "
                       "AND NOT (id > 4900 AND id % 2 = 1)")
    assert same == want
    with psycopg.connect(dst) as conn:
        letters = conn.execute("SELECT item_key, category, error_type, error_message, row_data "
                               "FROM etl.dead_letters ORDER BY (item_key->>0)::int").fetchall()
    assert [k[0] for k, *_ in letters] == list(range(500, N + 1, 500))
    assert {(c, t, m) for _, c, t, m, _ in letters} == {("validation", "Rejected",
                                                          "email has no @")}
    # the dead letter holds the original row, not the transformed one
    assert letters[0][4]["name"] == "  Name 500 ü  " and letters[0][4]["email"] == "not-an-email"


def test_transform_that_raises_on_some_rows_isolates_them(src: str, dst: str) -> None:
    _source(src)

    def picky(df: pl.DataFrame) -> pl.DataFrame:
        if (df["id"] % 1_000 == 7).any():
            raise ValueError("cannot handle ids ending in 007")
        return df

    result = etl.copy(source=src, target=dst, table="people", transform=picky)
    s = result.to_dict()["summary"]
    assert s["failed"] == 5 and s["succeeded"] == N - 5
    with psycopg.connect(dst) as conn:
        keys, messages = zip(*conn.execute(
            "SELECT (item_key->>0)::int, error_message FROM etl.dead_letters ORDER BY 1"), strict=True)
    assert list(keys) == [7, 1007, 2007, 3007, 4007]
    assert all("ValueError: cannot handle ids ending in 007" in m for m in messages)


def test_transformed_rows_the_target_refuses_are_data_dead_letters(src: str, dst: str) -> None:
    _source(src)
    etl.copy(source=src, target=dst, table="people", where="false", job="create")
    execute(dst, "ALTER TABLE people ADD CHECK (score < 1000)")
    result = etl.copy(source=src, target=dst, table="people", max_error_rate=None,
                      transform=lambda df: df.with_columns(pl.col("score") * 1))
    assert result.status is etl.Status.COMPLETED_WITH_ERRORS, result.message
    s = result.to_dict()["summary"]
    too_big = scalar(src, "SELECT count(*) FROM people WHERE score >= 1000")
    assert s["failed"] == too_big and s["succeeded"] == N - too_big
    assert scalar(dst, "SELECT count(DISTINCT sqlstate) FROM etl.dead_letters "
                       "WHERE category = 'data' AND sqlstate = '23514'") == 1


def test_cli_transform_from_a_file_with_upsert(src: str, dst: str, tmp_path) -> None:
    _source(src)
    module = tmp_path / "fix.py"
    module.write_text(textwrap.dedent("""
        import polars as pl

        def shout(df: pl.DataFrame) -> pl.DataFrame:
            return df.with_columns(pl.col("name").str.to_uppercase())
    """))
    args = ["copy", "--source", src, "--target", dst, "--table", "people", "--mode", "upsert",
            "--transform", f"{module}:shout", "--json", "--no-progress"]
    first = run_etl(*args)
    assert first.returncode == 0, first.stderr
    again = run_etl(*args, "--restart")
    assert json.loads(again.stdout)["metadata"]["outcomes"]["unchanged"] == N
    assert scalar(dst, "SELECT count(*) FROM people WHERE name <> upper(name)") == 0
    assert fingerprint(dst, "people")[0] == N
    bad = run_etl("copy", "--source", src, "--target", dst, "--table", "people",
                  "--transform", f"{module}:nothing", "--no-progress")
    assert bad.returncode == 2 and "has no function nothing" in bad.stderr, bad.stderr


def test_nul_byte_in_text_is_a_data_dead_letter(src: str, dst: str) -> None:
    """PostgreSQL text cannot hold NUL: a row that reaches the target with one is refused
    (SQLSTATE 22021) and isolated, whatever path produced it."""
    _source(src)

    def with_nul(df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(pl.when(pl.col("id") % 1_000 == 3)
                                 .then(pl.col("name") + "\x00tail").otherwise(pl.col("name"))
                                 .alias("name"))

    result = etl.copy(source=src, target=dst, table="people", transform=with_nul)
    s = result.to_dict()["summary"]
    assert (s["failed"], s["succeeded"]) == (5, N - 5), result.message
    with psycopg.connect(dst) as conn:
        rows = conn.execute("SELECT (item_key->>0)::int, sqlstate, category FROM etl.dead_letters "
                            "ORDER BY 1").fetchall()
    assert rows == [(k, "22021", "data") for k in (3, 1003, 2003, 3003, 4003)]
    assert scalar(dst, "SELECT count(*) FROM people") == N - 5
