"""`etl db url|start|stop|status`: the embedded PostgreSQL."""

from __future__ import annotations

import json

import click


@click.group()
def db() -> None:
    """Manage the embedded PostgreSQL (data under $ETL_HOME, default ~/.local/share/etl).

    Commands that get no database URL use it, starting it on demand.
    """


@db.command()
def url() -> None:
    """Print its URL (psql and SQLAlchemy accept it); starts it if needed."""
    from .. import embedded

    click.echo(embedded.ensure_url())


@db.command()
def start() -> None:
    """Initialise (first time) and start it; prints the URL."""
    from .. import embedded

    click.echo(embedded.start())


@db.command()
def stop() -> None:
    """Stop it (the data stays)."""
    from .. import embedded

    click.echo("stopped" if embedded.stop() else "not running")


@db.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json: bool) -> None:
    """Show whether it runs, its port, pid, data directory and URL."""
    from .. import embedded

    info = embedded.status()
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    for k, v in info.items():
        click.echo(f"{k:<12} {v}")
    if not info.get("running"):
        raise SystemExit(1)
