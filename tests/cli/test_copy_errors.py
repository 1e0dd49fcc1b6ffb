"""User mistakes and unreachable databases: one clear line, the right exit code, no secrets."""

from __future__ import annotations

import socket

from tests.conftest import db_url, execute, run_etl, scalar


def _one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("etl: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_table_without_primary_key_is_refused_naming_the_options(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE heap (a int, b text); INSERT INTO heap VALUES (1, 'x')")
    proc = run_etl("copy", "--source", src, "--target", dst, "--table", "heap")
    assert proc.returncode == 2
    line = _one_line_error(proc.stderr)
    assert "no primary key" in line and "--key" in line and "public.heap" in line
    assert scalar(dst, "SELECT to_regclass('public.heap')") is None


def test_unknown_key_column(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE t (id int PRIMARY KEY)")
    proc = run_etl("copy", "--source", src, "--target", dst, "--table", "t", "--key", "nope")
    assert proc.returncode == 2
    assert "nope" in _one_line_error(proc.stderr)


def test_missing_table(src: str, dst: str) -> None:
    proc = run_etl("copy", "--source", src, "--target", dst, "--table", "public.nosuch")
    assert proc.returncode == 1
    line = _one_line_error(proc.stderr)
    assert "public.nosuch does not exist" in line


def test_unreachable_host_one_line_with_password_masked(dst: str) -> None:
    url = f"postgresql://someone:hunter2secret@127.0.0.1:{_free_port()}/db"
    proc = run_etl("copy", "--source", url, "--target", dst, "--table", "t")
    assert proc.returncode == 1
    line = _one_line_error(proc.stderr)
    assert "cannot connect to the source database" in line
    assert "hunter2secret" not in proc.stderr + proc.stdout
    assert "someone:***@" in line


def test_bad_credentials_one_line_with_password_masked(src: str, pg_server: str) -> None:
    bad = db_url(pg_server, "postgres").replace("postgres@", "no_such_role_x:pa55word@", 1)
    proc = run_etl("copy", "--source", src, "--target", bad, "--table", "t")
    assert proc.returncode == 1
    line = _one_line_error(proc.stderr)
    assert "cannot connect to the target database" in line and "no_such_role_x" in line
    assert "pa55word" not in proc.stderr + proc.stdout


def test_bad_options_are_usage_errors(src: str, dst: str) -> None:
    cases = [
        (["--chunk-size", "zero"], "--chunk-size"),
        (["--chunk-size", "0"], "--chunk-size"),
        (["--max-runtime", "soon"], "--max-runtime"),
        (["--max-rate", "-5"], "--max-rate"),
        (["--mode", "merge"], "merge"),
        (["--table", "a.b.c"], "invalid table name"),
    ]
    for extra, expected in cases:
        args = ["copy", "--source", src, "--target", dst, "--table", "t", *extra]
        proc = run_etl(*args)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_invalid_where_is_a_usage_error(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE t (id int PRIMARY KEY)")
    proc = run_etl("copy", "--source", src, "--target", dst, "--table", "t", "--where", "nosuchcol = 1")
    assert proc.returncode == 2
    assert "--where" in _one_line_error(proc.stderr)


def test_copy_onto_itself_is_refused(src: str) -> None:
    execute(src, "CREATE TABLE t (id int PRIMARY KEY)")
    proc = run_etl("copy", "--source", src, "--target", src, "--table", "t")
    assert proc.returncode == 2
    assert "same table" in _one_line_error(proc.stderr)


def test_no_create_with_missing_target(src: str, dst: str) -> None:
    execute(src, "CREATE TABLE t (id int PRIMARY KEY)")
    proc = run_etl("copy", "--source", src, "--target", dst, "--table", "t", "--no-create")
    assert proc.returncode == 1
    assert "--no-create" in _one_line_error(proc.stderr)


def test_every_command_has_help() -> None:
    for args in (["--help"], ["copy", "--help"], ["status", "--help"], ["runs", "--help"],
                 ["report", "--help"], ["db", "--help"], ["db", "url", "--help"]):
        proc = run_etl(*args)
        assert proc.returncode == 0, args
        assert "Usage:" in proc.stdout


def test_password_never_reaches_output_reports_or_state(src: str, dst: str, tmp_path) -> None:
    """Trust auth accepts any password, so a real run can carry one end to end."""
    secret = "Top$ecret-91"
    with_pw = [u.replace("postgres@", f"postgres:{secret}@", 1) for u in (src, dst)]
    assert all(secret in u for u in with_pw)
    execute(src, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 50)")
    report = tmp_path / "report.json"
    proc = run_etl("-v", "copy", "--source", with_pw[0], "--target", with_pw[1], "--table", "t",
                   "--json", "--report", str(report), "--progress")
    assert proc.returncode == 0, proc.stderr
    dry = run_etl("copy", "--source", with_pw[0], "--target", with_pw[1], "--table", "t", "--dry-run")
    stored = scalar(dst, "SELECT string_agg(args::text, ' ') FROM etl.jobs") + \
        scalar(dst, "SELECT string_agg(report::text, ' ') FROM etl.runs")
    for text in (proc.stdout, proc.stderr, report.read_text(), dry.stdout, dry.stderr, stored):
        assert secret not in text
    assert "postgres:***@" in proc.stdout
