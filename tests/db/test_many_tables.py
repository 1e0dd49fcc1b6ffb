"""Several tables in one `etl copy`: parents first, one job each, one summary; sequences."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import etl
from tests.conftest import execute, fingerprint, run_etl, scalar

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures"))
import seed  # noqa: E402

TABLES = ["artist", "album", "genre", "media_type", "track", "playlist", "playlist_track",
          "employee", "customer", "invoice", "invoice_line"]


def test_all_tables_parents_first_into_a_target_with_foreign_keys(src: str, dst: str) -> None:
    seed.load_chinook(src)
    seed.load_chinook(dst)  # the same schema with its foreign keys, emptied
    execute(dst, "TRUNCATE " + ", ".join(TABLES))
    proc = run_etl("copy", "--source", src, "--target", dst, "--all-tables", "--mode", "append",
                   "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    order = [t["job_id"].removeprefix("copy:public.") for t in doc["metadata"]["tables"]]
    assert sorted(order) == sorted(TABLES)
    for child, parent in [("album", "artist"), ("track", "album"), ("track", "genre"),
                          ("invoice_line", "invoice"), ("invoice", "customer"),
                          ("customer", "employee"), ("playlist_track", "track")]:
        assert order.index(parent) < order.index(child), (parent, child, order)
    assert doc["summary"]["failed"] == 0
    assert doc["summary"]["succeeded"] == sum(scalar(src, f"SELECT count(*) FROM {t}")
                                              for t in TABLES)
    for table in TABLES:
        assert fingerprint(dst, table) == fingerprint(src, table), table


def test_tables_given_child_first_are_reordered_and_excludes_apply(src: str, dst: str) -> None:
    seed.load_chinook(src)
    result = etl.copy(source=src, target=dst, table=["track", "album", "artist", "genre"],
                      exclude="gen*")
    names = [t["job_id"] for t in result.to_dict()["metadata"]["tables"]]
    assert names == ["copy:public.artist", "copy:public.album", "copy:public.track"]
    assert scalar(dst, "SELECT to_regclass('public.genre')") is None
    assert result.status is etl.Status.COMPLETED


def test_interrupted_many_table_copy_resumes_table_by_table(src: str, dst: str) -> None:
    seed.load_chinook(src)
    args = ["copy", "--source", src, "--target", dst, "--all-tables", "--chunk-size", "200",
            "--sleep", "0.02", "--json", "--no-progress"]
    first = run_etl(*args, "--max-runtime", "1s")
    assert first.returncode == 4, first.stderr
    assert json.loads(first.stdout)["status"] == "stopped"
    again = run_etl(*args)
    assert again.returncode == 0, again.stderr
    for table in TABLES:
        assert fingerprint(dst, table) == fingerprint(src, table), table


def test_missing_table_is_reported_and_the_others_copied(src: str, dst: str) -> None:
    seed.load_chinook(src)
    proc = run_etl("copy", "--source", src, "--target", dst, "--table", "artist",
                   "--table", "nope", "--json", "--no-progress")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["status"] == "failed" and "nope" in doc["metadata"]["tables"][-1]["table"]
    assert fingerprint(dst, "artist") == fingerprint(src, "artist")


def test_sequences_are_set_past_the_copied_keys(src: str, dst: str) -> None:
    execute(src, """
        CREATE TABLE notes (id serial PRIMARY KEY, body text);
        INSERT INTO notes (body) SELECT 'n' || g FROM generate_series(1, 500) g;
        CREATE TABLE tags (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text);
        INSERT INTO tags (name) SELECT 't' || g FROM generate_series(1, 70) g;
    """)
    execute(dst, "CREATE TABLE tags (id bigserial PRIMARY KEY, name text)")  # exists: serial
    result = etl.copy(source=src, target=dst, table=["notes", "tags"])
    assert result.status is etl.Status.COMPLETED, result.message
    # notes was created with an identity; tags kept its own sequence; both now go on after
    assert scalar(dst, "INSERT INTO notes (body) VALUES ('new') RETURNING id") == 501
    assert scalar(dst, "INSERT INTO tags (name) VALUES ('new') RETURNING id") == 71


def test_all_tables_of_a_sqlite_source_parents_first(dst: str, tmp_path) -> None:
    import shutil
    import sqlite3

    db = tmp_path / "chinook.sqlite"
    shutil.copy(Path(__file__).resolve().parents[2] / "fixtures" / "chinook" /
                "Chinook_Sqlite.sqlite", db)
    result = etl.copy(source=f"sqlite:///{db}", target=dst, all_tables=True,
                      exclude=["Playlist*", "Invoice*", "Customer", "Employee"])
    assert result.status is etl.Status.COMPLETED, result.message
    order = [t["job_id"].split(".")[-1] for t in result.to_dict()["metadata"]["tables"]]
    assert sorted(order) == ["Album", "Artist", "Genre", "MediaType", "Track"]
    assert order.index("Artist") < order.index("Album") < order.index("Track")
    assert order.index("Genre") < order.index("Track") > order.index("MediaType")
    with sqlite3.connect(db) as conn:
        expected = conn.execute('SELECT count(*) FROM "Track"').fetchone()[0]
    assert scalar(dst, 'SELECT count(*) FROM "Track"') == expected


def test_progress_says_which_table_of_how_many(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE a (id int PRIMARY KEY); INSERT INTO a SELECT generate_series(1, 10);"
                 "CREATE TABLE b (id int PRIMARY KEY, a int REFERENCES a);"
                 "INSERT INTO b SELECT g, g FROM generate_series(1, 10) g")
    proc = run_etl("copy", "--source", src, "--target", dst, "--all-tables", "--progress")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert any(line.startswith("[1/2] copy public.a") for line in lines), proc.stderr
    assert any(line.startswith("[2/2] copy public.b") for line in lines), proc.stderr
