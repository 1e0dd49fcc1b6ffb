"""`etl export`: a table or query of PostgreSQL, MySQL/MariaDB or SQLite into Parquet, CSV
or NDJSON files, in resumable chunks, with a manifest (see ``etl.export.run``; the
MySQL/MariaDB and SQLite reads and files: ``etl.export.sql_source``, ``etl.export.values``)."""

from __future__ import annotations

from .command import export

__all__ = ["export"]
