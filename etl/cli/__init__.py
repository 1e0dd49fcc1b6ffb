"""The `etl` command line: a thin click layer over the library.

Commands parse options, call the function a script would call, and render
the Result. Library errors become one line on stderr and the exit code of
their class; a traceback appears only with --debug.
"""

from __future__ import annotations

import logging
import sys
import traceback

import click

from ..errors import EtlError
from ..urls import mask
from . import common


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors (and debug logs).")
@click.option("-v", "--verbose", is_flag=True, help="Log what etl does (on stderr).")
@click.version_option(package_name="etl", prog_name="etl")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Resumable, transactional bulk ETL: copy, archive, load and export tables in chunks.

    Every command works in keyset chunks, one transaction each, with a checkpoint
    so a rerun resumes where the last run stopped. Where no database URL is given,
    the embedded PostgreSQL is used (see `etl db`).

    \b
    Exit codes: 0 completed · 3 completed with dead-lettered rows · 4 stopped,
    resumable · 1 failed · 2 usage or configuration error · 75 job already running.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register() -> None:
    from . import archive as archive_cmd
    from . import backfill as backfill_cmd
    from . import copy as copy_cmd
    from . import db as db_cmd
    from . import dlq as dlq_cmd
    from . import export as export_cmd
    from . import jobs as jobs_cmd
    from . import load as load_cmd
    from . import run as run_cmd
    from . import verify as verify_cmd

    cli.add_command(copy_cmd.copy)
    cli.add_command(archive_cmd.archive)
    cli.add_command(backfill_cmd.backfill)
    cli.add_command(load_cmd.load)
    cli.add_command(export_cmd.export)
    cli.add_command(verify_cmd.verify)
    cli.add_command(run_cmd.run)
    cli.add_command(db_cmd.db)
    cli.add_command(dlq_cmd.dlq)
    for command in (jobs_cmd.status, jobs_cmd.runs, jobs_cmd.report, jobs_cmd.pause,
                    jobs_cmd.resume, jobs_cmd.cancel, jobs_cmd.prune):
        cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    from .. import jobrun

    args = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in args
    jobrun.INVOKED_AS = args  # kept with the job: `etl resume JOB` runs it again
    try:
        cli.main(args=argv, prog_name="etl", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        common.error("aborted")
        sys.exit(4)
    except click.ClickException as exc:
        exc.show()
        sys.exit(2 if isinstance(exc, click.UsageError) else exc.exit_code)
    except EtlError as exc:
        if debug:
            traceback.print_exc()
        common.error(mask(str(exc)))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        common.error("interrupted")
        sys.exit(4)
    except Exception as exc:  # a bug or an unexpected driver error: one line, masked
        if debug:
            raise
        common.error(f"{type(exc).__name__}: {mask(' '.join(str(exc).split()))} "
                     "(run with --debug for the traceback)")
        sys.exit(1)
