"""`etl dlq list|show|replay|purge`: the rows a job could not write."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from .. import dlq as lib
from .jobs import _state_options


def _filter_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--error-type", metavar="CLASS",
                        help="Only dead letters of this error class (e.g. CheckViolation).")(func)
    func = click.option("--category", metavar="CATEGORY",
                        help="Only dead letters of this category (data, validation).")(func)
    func = click.option("--job", required=True, metavar="NAME", help="The job (see `etl status`).")(func)
    return func


@click.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters: rows a job could not write."""


@dlq.command("list")
@_filter_options
@_state_options
@click.option("--limit", type=int, default=100, show_default=True, help="How many to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with each row's data).")
def list_(job: str, category: str | None, error_type: str | None, state: str | None,
          state_schema: str, limit: int, as_json: bool) -> None:
    """List a job's dead letters, oldest first."""
    letters = lib.list_dead_letters(job, state=state, state_schema=state_schema,
                                    category=category, error_type=error_type, limit=limit)
    if as_json:
        click.echo(json.dumps(letters, indent=2, default=str))
        return
    if not letters:
        click.echo(f"no dead letters for job {job!r}")
        return
    click.echo(f"{'ID':>8}  {'KEY':<20} {'ERROR':<24} {'SQLSTATE':<8} {'TRIES':>5}  MESSAGE")
    for d in letters:
        message = " ".join(str(d["error_message"]).split())
        click.echo(f"{d['id']:>8}  {json.dumps(d['item_key'])[:20]:<20} {d['error_type'][:24]:<24} "
                   f"{d['sqlstate'] or '-':<8} {d['attempts']:>5}  {message[:90]}")


@dlq.command()
@click.argument("letter_id", type=int)
@_state_options
def show(letter_id: int, state: str | None, state_schema: str) -> None:
    """Print one dead letter in full (the row as JSON, the error)."""
    click.echo(json.dumps(lib.show_dead_letter(letter_id, state=state, state_schema=state_schema),
                          indent=2, default=str))


@dlq.command()
@_filter_options
@_state_options
@click.option("--target", metavar="URL", envvar="ETL_TARGET_URL", show_envvar=True,
              help="The job's target database, password included (default: the job's own "
                   "MySQL/SQLite target when its URL had no password, else the state store's "
                   "database).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def replay(job: str, category: str | None, error_type: str | None, state: str | None,
           state_schema: str, target: str | None, as_json: bool) -> None:
    """Write the dead-lettered rows into the job's target again, after fixing the cause.

    Rows that now go in leave the queue (and count as succeeded); the others stay
    with their new error. Exit 0 when the queue is empty afterwards, 3 otherwise.
    """
    result = lib.replay_dead_letters(job, target=target, state=state, state_schema=state_schema,
                                     category=category, error_type=error_type)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(f"replayed {result.replayed:,} row(s); {result.still_failing:,} still failing")
    raise SystemExit(3 if result.still_failing else 0)


@dlq.command()
@_filter_options
@_state_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(job: str, category: str | None, error_type: str | None, state: str | None,
          state_schema: str, yes: bool) -> None:
    """Delete a job's dead letters (the rows stay counted as failed)."""
    if not yes:
        click.confirm(f"delete the dead letters of job {job!r}?", abort=True)
    n = lib.purge_dead_letters(job, state=state, state_schema=state_schema, category=category,
                               error_type=error_type)
    click.echo(f"purged {n:,} dead letter(s)")
