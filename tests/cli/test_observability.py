"""--metrics-file, --metrics-port and --log-format json on a real run, parsed the way
Prometheus and log shippers parse them."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import execute, run_etl, scalar


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_file_and_json_logs(src: str, dst: str, tmp_path: Path) -> None:
    execute(src, "CREATE TABLE ev (id int PRIMARY KEY, n int); "
                 "INSERT INTO ev SELECT g, g FROM generate_series(1, 5000) g")
    execute(dst, "CREATE TABLE ev (id int PRIMARY KEY, n int CHECK (n <> 77))")  # one bad row
    prom = tmp_path / "etl.prom"
    out = run_etl("copy", "--source", src, "--target", dst, "--table", "ev", "--chunk-size",
                  "1000", "--json", "--no-progress", "--metrics-file", str(prom),
                  "--log-format", "json")
    assert out.returncode == 3, out.stderr
    report = json.loads(out.stdout)
    got = samples(prom.read_text())
    job = (("job", "copy:public.ev"),)
    assert got[("etl_rows_total", (*job, ("outcome", "succeeded")))] == 4999
    assert got[("etl_rows_total", (*job, ("outcome", "failed")))] == 1
    assert got[("etl_chunks_total", job)] == report["metadata"]["num_chunks"] == 5
    assert got[("etl_dead_letters_total", job)] == 1
    assert got[("etl_chunk_duration_seconds_count", job)] == 5
    assert got[("etl_run_status", (*job, ("status", "completed_with_errors")))] == 1
    assert got[("etl_last_success_timestamp_seconds", job)] > time.time() - 60
    lines = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    chunks = [d for d in lines if "chunk" in d and d.get("message", "").startswith("chunk")]
    assert len(chunks) == 5, out.stderr
    assert {d["job"] for d in chunks} == {"copy:public.ev"}
    assert {d["run"] for d in chunks} == {report["run_id"]}
    assert sum(d["rows"] for d in chunks) == 5000 and all("duration" in d for d in chunks)
    assert scalar(dst, "SELECT count(*) FROM ev") == 4999


def test_metrics_port_serves_while_the_job_runs(src: str, dst: str, spawn) -> None:
    execute(src, "CREATE TABLE ev (id int PRIMARY KEY); "
                 "INSERT INTO ev SELECT generate_series(1, 20000)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = spawn("copy", "--source", src, "--target", dst, "--table", "ev", "--chunk-size",
                 "1000", "--sleep", "0.1", "--no-progress", "--metrics-port", str(port))
    deadline = time.monotonic() + 30
    seen = 0.0
    while seen == 0 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
            seen = samples(body.decode()).get(
                ("etl_rows_total", (("job", "copy:public.ev"), ("outcome", "succeeded"))), 0.0)
        except OSError:
            pass
        time.sleep(0.1)
    assert 0 < seen < 20000  # counted while it runs
    proc.communicate(timeout=60)
    assert proc.returncode == 0
