"""`etl export`: a table or query of PostgreSQL into Parquet, CSV or NDJSON files, in
resumable chunks, with a manifest (see ``etl.export.run``)."""

from __future__ import annotations

from .command import export

__all__ = ["export"]
