"""`etl verify`: compare a table with its copy (or a snapshot with a table and its archive)
by counts and checksums of key ranges, drilled down to the keys that differ."""

from .command import verify

__all__ = ["verify"]
