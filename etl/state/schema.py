"""Creates and migrates the state store from the versioned DDL in ``sql/``.

Safe when several processes start at once: every migration runs in one
transaction under a transaction-level advisory lock, and each version is
applied only if ``schema_version`` does not have it yet.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import StateStoreError

if TYPE_CHECKING:
    import psycopg

DEFAULT_SCHEMA = "etl"
# Any fixed number works; it only has to be the same in every etl process.
_MIGRATION_LOCK_ID = 0x6574_6C5F_7363_6D  # "etl_scm"
_FILE_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


def sql_dir() -> Path:
    """The DDL shipped inside the wheel (etl/_sql), or the repository's sql/ in a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_sql", here.parent / "sql"):
        if candidate.is_dir():
            return candidate
    raise StateStoreError("the state-store DDL (sql/) is missing from the installation; reinstall etl")


def migrations() -> list[tuple[int, Path]]:
    found = []
    for path in sql_dir().iterdir():
        m = _FILE_NAME.match(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_version() -> int:
    return migrations()[-1][0]


def installed_version(conn: psycopg.Connection, schema: str = DEFAULT_SCHEMA) -> int:
    """The applied version, 0 when the state store does not exist yet. Reads only."""
    row = conn.execute("SELECT to_regclass(%s)", (f'"{schema}".schema_version',)).fetchone()
    if not row or row[0] is None:
        return 0
    from psycopg import sql

    v = conn.execute(sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_version")
                     .format(sql.Identifier(schema))).fetchone()
    return int(v[0]) if v else 0


def ensure_schema(conn: psycopg.Connection, schema: str = DEFAULT_SCHEMA) -> int:
    """Apply every missing migration; returns the version now installed.

    ``conn`` must be idle; this commits its own transaction.
    """
    from psycopg import sql

    wanted = latest_version()
    current = installed_version(conn, schema)
    conn.rollback()
    if current == wanted:
        return wanted
    ident = sql.Identifier(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_ID,))
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.schema_version ("
            "version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        ).format(ident))
        current = installed_version(conn, schema)
        if current > wanted:
            raise StateStoreError(
                f"the state store {schema!r} is at version {current}, newer than this etl "
                f"understands ({wanted}); upgrade etl"
            )
        quoted = ident.as_string(conn)
        for version, path in migrations():
            if version <= current:
                continue
            ddl = path.read_text(encoding="utf-8").format(schema=quoted)
            conn.execute(ddl.encode("utf-8"))
            conn.execute(sql.SQL("INSERT INTO {}.schema_version (version) VALUES (%s)").format(ident),
                         (version,))
    return wanted
