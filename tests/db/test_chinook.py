"""The real Chinook sample data copies exactly, table by table."""

from __future__ import annotations

import sys
from pathlib import Path

import etl
from tests.conftest import fingerprint, scalar

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fixtures"))
import seed  # noqa: E402

TABLES = ["artist", "album", "genre", "media_type", "track", "playlist", "playlist_track",
          "employee", "customer", "invoice", "invoice_line"]


def test_chinook_copies_exactly(src: str, dst: str) -> None:
    seed.load_chinook(src)
    for table in TABLES:
        result = etl.copy(source=src, target=dst, table=table, chunk_size=1000)
        assert result.status is etl.Status.COMPLETED, (table, result.message)
        assert fingerprint(dst, table) == fingerprint(src, table), table
    # the fixture's traps survive: backslashes and non-ASCII names
    assert scalar(dst, r"SELECT count(*) FROM track WHERE name LIKE '%\\%'") == 4
    assert scalar(dst, "SELECT count(*) FROM track WHERE name ~ '[^\\x01-\\x7f]'") == \
        scalar(src, "SELECT count(*) FROM track WHERE name ~ '[^\\x01-\\x7f]'") > 0
    # playlist_track has a composite primary key
    assert scalar(dst, "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                       "WHERE conrelid = 'playlist_track'::regclass AND contype = 'p'") == \
        "PRIMARY KEY (playlist_id, track_id)"
