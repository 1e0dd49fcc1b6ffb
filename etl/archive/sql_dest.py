"""The archive in a MySQL/MariaDB table (``etl archive --to mysql://…``).

Each chunk's rows come from the source transaction's ``DELETE … RETURNING`` (or, with
--no-delete, its SELECT), decoded; they are inserted into the archive with ``INSERT
IGNORE`` in a MySQL transaction of their own (``etl.sinks.sql.SqlSink``, as `etl copy
--mode ignore` writes), and that transaction commits before the source commits the delete
with the checkpoint. A crash in between leaves the rows in both databases; the rerun
deletes them again, finds them in the archive, and — only if every column is the same
there — lets the delete commit. A different row under one of the keys stops the chunk.

The archive table is found, or created from the source's definition (types mapped as
`etl copy` maps them), with the copy path's plan (``etl.sql_copy``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..dialects import Kind, keys_in, qualified
from ..errors import TargetError
from ..model import Mode
from ..sql_copy import connections
from ..sql_copy import plan as sql_plan
from ..sql_copy_io import SqlaTarget, describe_error, recategorised

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from .plan import ArchiveSpec

log = logging.getLogger(__name__)

# Keys looked up per query when archived rows are compared (well under any driver's limit).
KEYS_PER_LOOKUP = 500


class SqlArchive:
    """The destination of one archive job in MySQL/MariaDB: its plan and its connection."""

    def __init__(self, spec: ArchiveSpec, *, dry_run: bool = False) -> None:
        import sqlalchemy as sa

        assert spec.dest_table is not None
        self.spec = spec
        self.copy_spec = sql_plan.SqlCopySpec(
            source=spec.source, target=spec.dest, state=spec.state,
            table=sql_plan.SqlName(spec.table.schema, spec.table.name),
            target_table=spec.dest_table, job_id=spec.job_id, key=spec.key, where=spec.where,
            mode=Mode.IGNORE, create=spec.create, lock_timeout=spec.lock_timeout)
        self.databases = connections.Databases(self.copy_spec, dry_run=dry_run)
        source = self.databases.source()
        try:
            self.conn: Connection = self.databases.target_sa()
            try:
                self.plan = sql_plan.make_plan(self.copy_spec, source, self.conn)
            except sa.exc.DBAPIError as exc:
                raise TargetError(f"cannot read the archive table {spec.dest_table} in "
                                  f"{spec.dest.masked}: {describe_error(exc, spec.dest)}") from exc
        finally:
            source.close()
        self.target: SqlaTarget | None = None

    @property
    def ddl(self) -> tuple[str, ...]:
        return self.plan.ddl

    @property
    def write_sql(self) -> str:
        return self.plan.write_sql

    @property
    def conflict_key(self) -> tuple[str, ...]:
        return self.plan.conflict_key

    def prepare(self) -> None:
        """Create the archive table when missing; open the writer."""
        table = sql_plan.prepare_target(self.plan, self.conn)
        self.target = SqlaTarget(self.conn, table, self.plan.write_names, mode=Mode.IGNORE,
                                 conflict_key=self.plan.conflict_key, key=self.plan.target_key)
        self._kinds = [table.column(n).type.kind for n in self.plan.write_names]

    def ensure_connected(self) -> None:
        if self.target is not None and not self.target.usable():
            log.info("reconnecting to the archive database")
            self.conn = self.databases.target_sa(reconnect=True)
            self.prepare()

    def close(self) -> None:
        self.conn.close()
        self.databases.dispose()

    def columns(self) -> tuple[str, ...]:
        """The archived columns, in the order ``write`` takes them (the source's names)."""
        return self.plan.names

    def write(self, rows: Sequence[tuple[Any, ...]]) -> tuple[int, int]:
        """Insert ``rows`` (in :meth:`columns` order) and commit; returns (inserted, already
        archived identically). A row whose key the archive holds with other values raises
        TargetError, and nothing of the chunk is committed there."""
        assert self.target is not None
        try:
            with self.target.transaction():
                stats = self.target.write(rows)
                already = stats.ignored + stats.superseded
                if already:
                    self._check_identical(rows)
        except TargetError:
            raise
        except Exception as exc:
            raise recategorised(exc) from None
        return stats.inserted, already

    def _check_identical(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Every row's key holds the same values in the archive (a replay), or raise."""
        assert self.target is not None
        sink, names = self.target.sink, self.plan.write_names
        key = self.plan.conflict_key
        at = [names.index(k) for k in key]
        wanted = {tuple(r[i] for i in at): r for r in map(sink.adapt, rows)}
        dialect = self.conn.dialect
        table = qualified(dialect, self.target.table.name, self.target.table.schema)
        cols = ", ".join(dialect.identifier_preparer.quote(n) for n in names)
        keys = list(wanted)
        for start in range(0, len(keys), KEYS_PER_LOOKUP):
            batch = keys[start:start + KEYS_PER_LOOKUP]
            found = self.conn.exec_driver_sql(
                f"SELECT {cols} FROM {table} WHERE {keys_in(dialect, key, len(batch))}",
                tuple(v for k in batch for v in k)).fetchall()
            for stored in found:
                mine = wanted.get(tuple(stored[i] for i in at))
                if mine is None:
                    continue
                for name, kind, a, b in zip(names, self._kinds, stored, mine, strict=True):
                    if not _same(kind, a, b):
                        raise TargetError(
                            f"the archive table {self.spec.dest_table} already holds key "
                            f"{dict(zip(key, (mine[i] for i in at), strict=True))} with other "
                            f"values (column {name}: {a!r} there, {b!r} in the source); the "
                            "chunk was rolled back and its rows stay in the source — move the "
                            "archive's row aside (or delete it) and rerun")


def _same(kind: Kind, stored: Any, mine: Any) -> bool:
    """Whether a value read back from the archive is the value written (as adapted)."""
    if stored is None or mine is None:
        return stored is None and mine is None
    if kind in (Kind.JSON, Kind.ARRAY):  # JSON text: compared as the values it holds
        try:
            return json.loads(stored) == json.loads(mine)
        except (TypeError, ValueError):
            return stored == mine
    if isinstance(stored, bytes) and isinstance(mine, str):
        return stored == mine.encode()
    return bool(stored == mine)
