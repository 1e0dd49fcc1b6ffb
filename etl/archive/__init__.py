"""`etl archive` for PostgreSQL: move (or purge, or copy) the rows matching --where, chunk
by chunk, from a live table into an archive table in the same or another database.

``plan`` reads the databases and decides (nothing is written; built on the copy path's
plan), ``step`` does one chunk in as few and as short transactions as it can, ``run``
drives the chunks (the shared :func:`etl.runner.run_loop`) and returns the Result, and
``command`` holds :func:`archive`, the function `etl archive` and scripts call.
"""

from __future__ import annotations

from typing import Any

from .command import archive

__all__ = ["Action", "ArchivePlan", "ArchiveSpec", "archive"]


def __getattr__(name: str) -> Any:  # the plan's types load with the plan, when first used
    if name in ("Action", "ArchivePlan", "ArchiveSpec"):
        from . import plan

        return getattr(plan, name)
    raise AttributeError(f"module 'etl.archive' has no attribute {name!r}")
