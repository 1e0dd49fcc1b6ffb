"""`etl archive` for PostgreSQL: move (or purge, or copy) the rows matching --where, chunk
by chunk, from a live table into an archive table in the same or another database.

``plan`` reads the databases and decides (nothing is written; built on the copy path's
plan), ``step`` does one chunk in as few and as short transactions as it can, ``run``
drives the chunks (the shared :func:`etl.runner.run_loop`) and returns the Result, and
``command`` holds :func:`archive`, the function `etl archive` and scripts call.
"""

from __future__ import annotations

from .command import archive
from .plan import Action, ArchivePlan, ArchiveSpec

__all__ = ["Action", "ArchivePlan", "ArchiveSpec", "archive"]
