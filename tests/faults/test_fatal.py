"""Fatal errors stop the run at once: one clear line, exit 1, the checkpoint intact."""

from __future__ import annotations

import json
import subprocess
import time
import uuid

import psycopg
from psycopg import sql

from tests.conftest import etl_cmd, execute, fingerprint, run_etl, scalar


def _source(url: str, rows: int = 20_000) -> None:
    execute(url, f"CREATE TABLE ev (id int PRIMARY KEY, v text); "
                 f"INSERT INTO ev SELECT g, md5(g::text) FROM generate_series(1, {rows}) g")


def _error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("etl: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_target_table_dropped_mid_run(src: str, dst: str) -> None:
    _source(src)
    proc = subprocess.Popen(etl_cmd("copy", "--source", src, "--target", dst, "--table", "ev",
                                    "--chunk-size", "500", "--sleep", "0.05", "--json",
                                    "--no-progress"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if scalar(dst, "SELECT processed FROM etl.checkpoints") >= 2000:
                break
        except (psycopg.errors.UndefinedTable, TypeError):
            pass
        time.sleep(0.02)
    execute(dst, "DROP TABLE ev")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    line = _error_line(err)
    assert "42P01" in line and "ev" in line
    assert "retry" not in err  # fatal: not retried
    report = json.loads(out)
    assert report["status"] == "failed" and report["errors"][0]["category"] == "fatal"
    done = report["summary"]["succeeded"]
    assert done >= 2000
    assert scalar(dst, "SELECT processed FROM etl.checkpoints") == done  # checkpoint intact


def test_role_without_insert_privilege(src: str, dst: str, make_db, pg_server: str) -> None:
    _source(src, 100)
    state = make_db("state")
    role = f"etl_ro_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    try:
        execute(dst, f"CREATE TABLE ev (id int PRIMARY KEY, v text); "
                     f'GRANT SELECT ON ev TO "{role}"')
        as_role = dst.replace("postgres@", f"{role}@", 1)
        proc = run_etl("copy", "--source", src, "--target", as_role, "--table", "ev",
                       "--state", state, "--no-progress")
        assert proc.returncode == 1, proc.stderr
        line = _error_line(proc.stderr)
        assert "42501" in line and "permission denied" in line
        assert scalar(dst, "SELECT count(*) FROM ev") == 0
        assert scalar(state, "SELECT count(*) FROM etl.runs WHERE status = 'failed'") == 1
        # granted, the same job resumes and finishes
        execute(dst, f'GRANT INSERT ON ev TO "{role}"')
        again = run_etl("copy", "--source", src, "--target", as_role, "--table", "ev",
                        "--state", state, "--no-progress")
        assert again.returncode == 0, again.stderr
        assert fingerprint(dst, "ev") == fingerprint(src, "ev")
    finally:
        with psycopg.connect(dst, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_debug_shows_the_traceback(src: str, dst: str) -> None:
    proc = run_etl("--debug", "copy", "--source", src, "--target", dst, "--table", "nosuch")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "SourceError" in proc.stderr
    usage = run_etl("--debug", "copy", "--source", src, "--target", dst, "--table", "a.b.c")
    assert usage.returncode == 2 and "Traceback" in usage.stderr
