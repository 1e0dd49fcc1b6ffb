"""Fault injection for `etl archive --to-dir`: real processes, real signals, real PostgreSQL.

A `kill -9` of the running CLI at a random moment after some chunks, and a kill exactly
after a chunk's file and manifest entry are durable but before its delete commits (caused
for real: a test session holds the lock on the job's checkpoint row, which the chunk's
source transaction writes last). After the rerun: the files ∪ the source are the original
row for row, no row is in two files (or in a file and the source), and the manifest and
DIR agree — every listed file exists with its sha256 and row count, nothing else is there.

Random kill moments come from ``random.Random(seed)``; the seed is printed and can be
replayed with ``ETL_FAULT_SEED=<seed>``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import psycopg
import pytest

from tests.conftest import run_etl, scalar
from tests.db.test_archive_files import (
    JOB,
    PREFIX,
    ROWS,
    WHERE,
    archive_cli,
    archived_rows,
    assert_manifest_matches_disk,
    make_events,
    manifest,
    typed_rows,
)
from tests.faults.test_archive_faults import _via_proxy, checkpointed, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def rng() -> random.Random:
    env = os.environ.get("ETL_FAULT_SEED")
    seed = int(env) if env else random.SystemRandom().randrange(2**32)
    print(f"fault seed: ETL_FAULT_SEED={seed}")
    return random.Random(seed)


def assert_archived_exactly(src: str, out: Path, original: dict[int, tuple]) -> None:
    """Files ∪ source is the original, row for row; no row twice anywhere."""
    in_files = archived_rows(out, src)
    ids = [r[0] for r in in_files]
    assert len(ids) == len(set(ids)), "a row is in two files"
    left = typed_rows(src)
    assert not set(ids) & set(left), "a row is in a file and still in the source"
    assert {r[0]: r for r in in_files} | left == original
    assert set(ids) == {i for i, r in original.items() if i in set(ids)}
    assert len(in_files) == ROWS // 2  # every matching row, none of the others


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_kill_9_at_a_random_moment_then_rerun(src: str, tmp_path: Path, spawn,
                                              rng: random.Random, fmt: str) -> None:
    make_events(src)
    original = typed_rows(src)
    out = tmp_path / "arch"
    cli = archive_cli(src, "--to-dir", str(out), "--format", fmt)
    proc = spawn(*cli, "--chunk-size", "400", "--sleep", "0.01")
    after_rows = rng.randrange(2, 18) * 400
    wait_until(f"{after_rows} rows checkpointed", lambda: checkpointed(src) >= after_rows, proc)
    time.sleep(rng.uniform(0, 0.05))  # anywhere in the next chunk(s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    done = checkpointed(src)
    assert 0 < done < ROWS // 2
    # before the rerun: no row lost (a chunk in flight may be in a file and the source)
    in_files = {r[0]: r for r in archived_rows(out, src)}
    assert in_files | typed_rows(src) == original
    assert len(in_files) >= done
    res = run_etl(*cli, "--chunk-size", "700", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["summary"]["succeeded"] == ROWS // 2
    entries = assert_manifest_matches_disk(out)
    assert sum(e["rows"] for e in entries) == ROWS // 2
    assert_archived_exactly(src, out, original)
    assert report["artifacts"]["output_files"] == [str(out / e["file"]) for e in entries
                                                   if str(out / e["file"]) in
                                                   report["artifacts"]["output_files"]]
    assert scalar(src, "SELECT count(*) FROM etl.runs WHERE job_id = %s "
                       "AND status = 'failed'", (JOB,)) == 1  # the killed run, closed


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_kill_after_the_file_is_durable_before_the_delete_commits(src: str, tmp_path: Path,
                                                                  spawn, fmt: str) -> None:
    """The worst moment: the chunk's file is renamed and in the manifest, its rows not yet
    deleted. The rerun writes the SAME file again for those rows (never a second file) and
    replaces its manifest entry."""
    make_events(src)
    original = typed_rows(src)
    out = tmp_path / "arch"
    cli = archive_cli(src, "--to-dir", str(out), "--format", fmt, "--chunk-size", "1000")
    proc = spawn(*cli, "--sleep", "0.3", "--lock-timeout", "60s")
    wait_until("the first chunk", lambda: checkpointed(src) >= 1000, proc)
    holder = psycopg.connect(src)
    try:
        holder.execute("SELECT 1 FROM etl.checkpoints WHERE job_id = %s FOR UPDATE", (JOB,))
        done = checkpointed(src) // 1000

        def pending() -> bool:
            path = out / f"_{PREFIX}.manifest.json"
            return path.exists() and len(manifest(out)["files"]) > done

        wait_until("a chunk's file in the manifest, its delete not committed", pending, proc)
        wait_until("the source transaction waiting for the checkpoint row", lambda: bool(
            scalar(src, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND application_name LIKE %s", (f"etl:source:{proc.pid}:%",))), proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        holder.close()
    entries = manifest(out)["files"]
    assert len(entries) == done + 1
    in_flight = entries[-1]
    assert in_flight["chunk_index"] == done + 1
    flight_path = out / in_flight["file"]
    assert flight_path.exists()
    # its rows are in that file AND still in the source: nothing lost, not yet moved
    left, in_files = typed_rows(src), {r[0]: r for r in archived_rows(out, src)}
    assert len(set(in_files) & set(left)) == in_flight["rows"] > 0
    assert in_files | left == original
    res = run_etl(*cli, "--json")
    assert res.returncode == 0, res.stderr
    entries = assert_manifest_matches_disk(out)
    redo = [e for e in entries if e["chunk_index"] == done + 1 and e["walk"] == 1]
    assert [e["file"] for e in redo] == [in_flight["file"]]  # the same name, written again
    assert redo[0]["run_id"] != in_flight["run_id"]
    assert_archived_exactly(src, out, original)


def test_lost_answer_to_the_source_commit(src: str, tmp_path: Path) -> None:
    """Chunk 2's delete commits but its answer is lost with the connection: the retry finds
    the stored checkpoint, keeps chunk 2's file as it is and goes on (no second file)."""
    make_events(src)
    original = typed_rows(src)
    proxied, proxy = _via_proxy(src, "source", nth=2)  # source commits: chunk 1, chunk 2
    out = tmp_path / "arch"
    res = run_etl("archive", "--source", proxied, "--table", "ev", "--where", WHERE,
                  "--to-dir", str(out), "--chunk-size", "2500", "--json", "--no-progress")
    assert proxy.dropped.is_set(), "the proxy never dropped a COMMIT's answer"
    assert res.returncode == 0, res.stderr
    assert "chunk 2 had committed before its connection was lost" in res.stderr
    report = json.loads(res.stdout)
    assert report["summary"]["succeeded"] == report["summary"]["processed"] == ROWS // 2
    entries = assert_manifest_matches_disk(out)
    assert [e["chunk_index"] for e in entries] == [1, 2, 3, 4]
    assert report["artifacts"]["output_files"] == [str(out / e["file"]) for e in entries]
    assert_archived_exactly(src, out, original)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_source_connection_terminated_inside_a_chunk(src: str, tmp_path: Path, spawn,
                                                     fmt: str) -> None:
    """The source backend is terminated inside a chunk's transaction (its file may be
    written and listed already): the chunk is rolled back and retried after reconnecting,
    and the retry rewrites that chunk's file — nothing lost, nothing twice."""
    make_events(src)
    original = typed_rows(src)
    out = tmp_path / "arch"
    proc = spawn(*archive_cli(src, "--to-dir", str(out), "--format", fmt, "--chunk-size",
                              "1500", "--json"))
    wait_until("the first chunk", lambda: checkpointed(src) >= 1500, proc)
    killed = 0
    deadline = time.monotonic() + 20
    while not killed and time.monotonic() < deadline and proc.poll() is None:
        killed = scalar(src, "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                             "WHERE application_name LIKE %s AND xact_start IS NOT NULL",
                        (f"etl:source:{proc.pid}:%",))
    assert killed == 1, "never caught the source session inside a chunk"
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["metadata"]["retry_attempts"] >= 1
    assert report["summary"]["succeeded"] == ROWS // 2
    entries = assert_manifest_matches_disk(out)
    assert report["artifacts"]["output_files"] == [str(out / e["file"]) for e in entries]
    assert_archived_exactly(src, out, original)
