"""etl — resumable, transactional bulk ETL for PostgreSQL and friends.

    import etl
    result = etl.copy(source="postgresql://…/src", target="postgresql://…/dst", table="events")
    print(result.status, result.to_dict()["summary"])

Importing this package is cheap: database drivers, polars, pyarrow and rich
load only when a function needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Not lazy like the others: these functions share their names with the packages etl.archive,
# etl.export and etl.verify, and importing a package (the CLI does) would bind the module
# here instead of the function. None of the packages imports anything heavy.
from .archive import archive
from .errors import (
    EtlError,
    JobLockedError,
    NoKeyError,
    SourceError,
    StateStoreError,
    TargetError,
    UsageError,
)
from .export import export
from .model import Category, Mode, Status
from .verify import verify

if TYPE_CHECKING:
    from .api import backfill, copy
    from .control import cancel, pause, resume
    from .dlq import list_dead_letters, purge_dead_letters, replay_dead_letters, show_dead_letter
    from .load_command import load
    from .prune import prune
    from .report import Result
    from .run_jobs import check_file, run_file
    from .work.command import run_chunks
    from .work.source import Query

__version__ = "0.1.0"

__all__ = [
    "Category",
    "EtlError",
    "JobLockedError",
    "Mode",
    "NoKeyError",
    "Query",
    "Result",
    "SourceError",
    "StateStoreError",
    "Status",
    "TargetError",
    "UsageError",
    "__version__",
    "archive",
    "backfill",
    "cancel",
    "check_file",
    "copy",
    "export",
    "list_dead_letters",
    "load",
    "pause",
    "prune",
    "purge_dead_letters",
    "replay_dead_letters",
    "resume",
    "run_chunks",
    "run_file",
    "show_dead_letter",
    "verify",
]

_LAZY = {
    "copy": ("etl.api", "copy"),
    "backfill": ("etl.api", "backfill"),
    "load": ("etl.load_command", "load"),
    "pause": ("etl.control", "pause"),
    "prune": ("etl.prune", "prune"),
    "resume": ("etl.control", "resume"),
    "cancel": ("etl.control", "cancel"),
    "Result": ("etl.report", "Result"),
    "Query": ("etl.work.source", "Query"),
    "run_chunks": ("etl.work.command", "run_chunks"),
    "run_file": ("etl.run_jobs", "run_file"),
    "check_file": ("etl.run_jobs", "check_file"),
    "list_dead_letters": ("etl.dlq", "list_dead_letters"),
    "show_dead_letter": ("etl.dlq", "show_dead_letter"),
    "replay_dead_letters": ("etl.dlq", "replay_dead_letters"),
    "purge_dead_letters": ("etl.dlq", "purge_dead_letters"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'etl' has no attribute {name!r}")
