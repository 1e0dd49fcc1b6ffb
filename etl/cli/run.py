"""`etl run FILE.toml`."""

from __future__ import annotations

import json
import sys

import click

from .common import error


@click.command("run")
@click.argument("file", metavar="FILE.toml")
@click.option("--job", metavar="NAME",
              help="Run only this job of the file (the jobs it depends on are not run).")
@click.option("--check", is_flag=True,
              help="Check the file without connecting to anything — TOML, commands, option "
                   "names and values, ${VARIABLES}, depends_on — and list every mistake with "
                   "its line.")
@click.option("--dry-run", is_flag=True, help="Run each job as --dry-run: plans, no writes.")
@click.option("--report", "report_path", metavar="PATH",
              help="Also write the combined result JSON (every job's report) to this file.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the combined result JSON on stdout (progress and logs on stderr).")
@click.option("--progress/--no-progress", default=None,
              help="Progress of each job on stderr (default: a bar on a TTY, lines "
                   "otherwise).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="json: each log line a JSON object.")
def run(file: str, job: str | None, check: bool, dry_run: bool, report_path: str | None,
        as_json: bool, progress: bool | None, log_format: str) -> None:
    """Run the jobs a TOML file declares, in order; exit with the worst of their codes.

    Each [jobs.NAME] table is one job — command = "copy", "archive", "backfill", "load",
    "export" or "verify" — with that command's options (max-rate or max_rate; arrays for
    repeatable ones). [defaults] gives options to every job whose command has them.
    ${VAR} (or ${VAR:-default}) takes a value from the environment, so secrets stay out
    of the file. depends_on = ["other"] runs a job after another, and only if that one
    completed. The table's name is the job's name (its checkpoint, etl status NAME).

    \b
    Example (nightly.toml):
      [defaults]
      source = "${APP_DB}"
      target = "${WAREHOUSE_DB}"
      [jobs.copy-orders]
      command = "copy"
      table = "orders"
      mode = "upsert"
      [jobs.verify-orders]
      command = "verify"
      depends_on = ["copy-orders"]
      table = "orders"

    \b
      etl run nightly.toml --check     # mistakes with their lines, exit 2
      etl run nightly.toml             # both jobs; exit 0, 3, 4, 1, 2 or 75
      etl run nightly.toml --job copy-orders
    """
    from ..observe import use_json_logs
    from ..run_jobs import check_file, run_file

    if log_format == "json":
        use_json_logs()
    if check:
        jobs = check_file(file)
        click.echo(f"{file}: {len(jobs)} job(s), in the order they run:")
        for spec in jobs:
            after = f"  (after {', '.join(spec.depends_on)})" if spec.depends_on else ""
            click.echo(f"  {spec.name:<32} {spec.command}{after}")
        return
    result = run_file(file, job=job, dry_run=dry_run, progress=progress, report=report_path)
    doc = result.to_dict()
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
    else:
        for j in doc["metadata"]["jobs"]:
            s = j.get("summary")
            counts = (f"{s['succeeded']:>12,} ok {s['failed']:>8,} failed" if s else "")
            click.echo(f"  {j['job_id']:<32} {j['command']:<9} {j['status']:<22} {counts}")
            if j.get("message") and j["status"] not in ("completed",):
                click.echo(f"      {j['message']}")
        click.echo("  each job's report: etl runs NAME, etl report RUN_ID")
    if result.message:
        error(result.message)
    sys.stdout.flush()
    sys.exit(result.exit_code)
