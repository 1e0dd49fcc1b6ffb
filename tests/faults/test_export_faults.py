"""`kill -9` of a running `etl export`, then a rerun: every row in exactly one listed file."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import signal
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tests.conftest import execute, run_etl
from tests.db.test_export import data_files

ROWS = 30_000


def listed(out: Path) -> list[dict]:
    path = out / "_export-public.big.manifest.json"
    return json.loads(path.read_text())["files"] if path.exists() else []


@pytest.mark.parametrize("args", [
    ["--format", "parquet", "--rows-per-file", "2000"],
    ["--format", "csv", "--compression", "gzip", "--partition-by", "part"],
], ids=["parquet-rows-per-file", "csv-gzip-partitioned"])
def test_kill_9_during_an_export_then_resume_exactly(src: str, tmp_path: Path, spawn,
                                                     args: list[str]) -> None:
    execute(src, f"""CREATE TABLE big (id int PRIMARY KEY, part int, v text);
        INSERT INTO big SELECT g, g % 3, repeat('x', g % 50) FROM generate_series(1, {ROWS}) g""")
    out = tmp_path / "out"
    common = ["export", "--source", src, "--state", src, "--table", "big", "--to", str(out),
              "--chunk-size", "500", "--no-progress", *args]
    proc = spawn(*common, "--sleep", "0.05")
    deadline = time.monotonic() + 60
    while len(listed(out)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.4))  # anywhere in a step: reading, writing, renaming
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL, "the export ended before the kill"
    before = listed(out)
    again = run_etl(*common, "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["summary"]["succeeded"] == ROWS
    entries = listed(out)
    assert {e["file"] for e in before} < {e["file"] for e in entries}  # resumed, not redone
    on_disk = sorted(p.relative_to(out).as_posix() for p in data_files(out))
    assert on_disk == sorted(e["file"] for e in entries)  # nothing unlisted, no temp file
    assert not [p for p in out.rglob(".*")]
    ids: list[int] = []
    for e in entries:
        body = (out / e["file"]).read_bytes()
        assert hashlib.sha256(body).hexdigest() == e["sha256"]
        if e["format"] == "csv":
            lines = gzip.decompress(body).decode().splitlines()[1:]
            assert len(lines) == e["rows"]
            ids += [int(line.split(",")[0]) for line in lines]
    if "parquet" in args:
        ids = ds.dataset(out, format="parquet").to_table().column("id").to_pylist()
    assert sorted(ids) == list(range(1, ROWS + 1))


def test_kill_9_during_a_sqlite_export_then_resume_exactly(src: str, tmp_path: Path,
                                                           spawn) -> None:
    import sqlite3

    db = tmp_path / "big.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, part INTEGER, v TEXT)")
        conn.executemany("INSERT INTO big VALUES (?, ?, ?)",
                         ((g, g % 3, "x" * (g % 50)) for g in range(1, ROWS + 1)))
    conn.close()
    out = tmp_path / "out"
    common = ["export", "--source", f"sqlite:///{db}", "--state", src, "--table", "big",
              "--to", str(out), "--chunk-size", "500", "--no-progress", "--format", "csv",
              "--compression", "gzip", "--partition-by", "part"]
    proc = spawn(*common, "--sleep", "0.05")
    path = out / "_export-big.manifest.json"
    deadline = time.monotonic() + 60

    def entries() -> list[dict]:
        return json.loads(path.read_text())["files"] if path.exists() else []

    while len(entries()) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL, "the export ended before the kill"
    before = entries()
    again = run_etl(*common, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["summary"]["succeeded"] == ROWS
    after = entries()
    assert {e["file"] for e in before} < {e["file"] for e in after}
    on_disk = sorted(p.relative_to(out).as_posix() for p in data_files(out))
    assert on_disk == sorted(e["file"] for e in after) and not list(out.rglob(".*"))
    ids: list[int] = []
    for e in after:
        body = (out / e["file"]).read_bytes()
        assert hashlib.sha256(body).hexdigest() == e["sha256"]
        lines = gzip.decompress(body).decode().splitlines()[1:]
        assert len(lines) == e["rows"]
        ids += [int(line.split(",")[0]) for line in lines]
    assert sorted(ids) == list(range(1, ROWS + 1))
