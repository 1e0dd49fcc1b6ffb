"""`etl run FILE.toml`: jobs declared in a file, run in order with their dependencies, values
from the environment, every mistake found by --check with its line."""

from __future__ import annotations

import json
from pathlib import Path

import etl
from fixtures.seed import make_events
from tests.conftest import execute, fingerprint, run_etl, scalar

JOBS = """\
# nightly: copy, export, then prove the copy
[defaults]
source = "${APP_DB}"
chunk-size = 2000

[jobs.copy-events]
command = "copy"
target = "${WAREHOUSE_DB}"
table = "events"
mode = "upsert"

[jobs.export-events]
command = "export"
table = "events"
to = "${OUT_DIR}"
format = "csv"
state = "${WAREHOUSE_DB}"

[jobs.verify-events]
command = "verify"
depends_on = ["copy-events"]
target = "${WAREHOUSE_DB}"
table = "events"
max-keys = 5
"""


def test_three_jobs_with_env_values_and_a_dependency(src: str, dst: str,
                                                     tmp_path: Path) -> None:
    make_events(src, 10_000)
    path = tmp_path / "nightly.toml"
    path.write_text(JOBS)
    env = {"APP_DB": src, "WAREHOUSE_DB": dst, "OUT_DIR": str(tmp_path / "out")}
    checked = run_etl("run", str(path), "--check", env=env)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.split()[8:] == ["copy-events", "copy", "export-events", "export",
                                          "verify-events", "verify", "(after", "copy-events)"]
    out = run_etl("run", str(path), "--json", "--no-progress", env=env)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["job_type"] == "run" and doc["status"] == "completed"
    assert [(j["job_id"], j["status"]) for j in doc["metadata"]["jobs"]] == [
        ("copy-events", "completed"), ("export-events", "completed"),
        ("verify-events", "completed")]
    assert fingerprint(src, "events") == fingerprint(dst, "events")
    assert doc["summary"]["succeeded"] == 30_000  # 10,000 copied, exported and verified
    files = list((tmp_path / "out").glob("*.csv"))
    assert files and sum(len(f.read_text().splitlines()) - 1 for f in files) == 10_000
    # the jobs are jobs like any other: named by their tables
    assert scalar(dst, "SELECT count(*) FROM etl.jobs WHERE job_id IN "
                       "('copy-events', 'export-events', 'verify-events')") == 3
    # a difference the verification finds makes the run fail, with the worst code
    execute(dst, "DELETE FROM events WHERE id = 77")
    again = run_etl("run", str(path), "--job", "verify-events", "--json", "--no-progress",
                    env=env)
    assert again.returncode == 1
    (only,) = json.loads(again.stdout)["metadata"]["jobs"]
    assert only["job_id"] == "verify-events" and only["errors"][0]["item_identifier"] == "[77]"


def test_a_failed_dependency_skips_its_dependants_and_sets_the_exit_code(
        src: str, dst: str, tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(JOBS)
    env = {"APP_DB": src, "WAREHOUSE_DB": dst, "OUT_DIR": str(tmp_path / "out")}
    execute(src, "CREATE TABLE other (id int PRIMARY KEY)")  # no events table: copy fails
    out = run_etl("run", str(path), "--json", "--no-progress", env=env)
    assert out.returncode == 1
    jobs = {j["job_id"]: j for j in json.loads(out.stdout)["metadata"]["jobs"]}
    assert jobs["copy-events"]["status"] == "failed"
    assert "does not exist" in jobs["copy-events"]["message"]
    assert jobs["verify-events"]["status"] == "skipped"
    assert "copy-events did not complete" in jobs["verify-events"]["message"]
    assert "did not complete" in out.stderr


MISTAKES = """\
[defaults]
source = "${APP_DB}"
chunk-sise = 100

[jobs.copy-a]
command = "copy"
table = "a"
mode = "merge"

[jobs.copy-b]
command = "cpy"

[jobs.verify-a]
command = "verify"
depends_on = ["copy-c"]
max-runtime = "soon"
where = "${NOT_SET}"

[jobs.export-a]
command = "export"
table = "a"
dry-run = "yes"
"""


def test_check_reports_every_mistake_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(MISTAKES)
    out = run_etl("run", str(path), "--check", env={"APP_DB": "postgresql://nowhere/x"})
    assert out.returncode == 2, out.stderr
    lines = [ln.strip() for ln in out.stderr.splitlines()[1:]]
    assert [ln.split(":")[1] for ln in lines] == ["3", "8", "11", "13", "15", "16", "17", "19",
                                                   "22"], out.stderr
    text = out.stderr
    assert "[defaults] 'chunk-sise' is an option of none" in text
    assert "--mode 'merge': valid values are append" in text
    assert "'cpy'" in text and "did you mean 'copy'" in text
    assert "verify needs table" in text
    assert "depends on 'copy-c', which the file does not declare" in text
    assert "max-runtime is not valid" in text
    assert "${NOT_SET}, which is not set" in text
    assert "export needs to" in text
    assert "dry-run is true or false" in text
    assert "Traceback" not in text
    broken = tmp_path / "broken.toml"
    broken.write_text('[jobs.a]\ncommand = "copy"\ntable = "a\n')
    bad = run_etl("run", str(broken), "--check")
    assert bad.returncode == 2 and "broken.toml:3: not valid TOML" in bad.stderr, bad.stderr
    cycle = tmp_path / "cycle.toml"
    cycle.write_text('[jobs.a]\ncommand = "copy"\ntable = "t"\ndepends_on = ["b"]\n'
                     '[jobs.b]\ncommand = "copy"\ntable = "t"\ndepends_on = ["a"]\n')
    looped = run_etl("run", str(cycle), "--check")
    assert looped.returncode == 2 and "cycle: a → b → a" in looped.stderr, looped.stderr


def test_the_library_runs_a_file_too(src: str, dst: str, tmp_path: Path) -> None:
    make_events(src, 500)
    path = tmp_path / "two.toml"
    path.write_text('[jobs.copy]\ncommand = "copy"\nsource = "${A}"\ntarget = "${B}"\n'
                    'table = "events"\n[jobs.check]\ncommand = "verify"\nsource = "${A}"\n'
                    'target = "${B}"\ntable = "events"\ndepends_on = ["copy"]\n')
    jobs = etl.check_file(path, env={"A": src, "B": dst})
    assert [(j.name, j.command) for j in jobs] == [("copy", "copy"), ("check", "verify")]
    result = etl.run_file(path, env={"A": src, "B": dst})
    assert result.ok and result.exit_code == 0 and result.succeeded == 1000
