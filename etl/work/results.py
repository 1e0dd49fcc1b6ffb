"""Per-item results written back to a table, idempotently: each result is upserted on the
item's key, so a chunk replayed after a crash writes the same rows again."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..model import Mode

if TYPE_CHECKING:
    from ..export.sql_source import SqlSource

# A result that is not a dict goes into this column.
RESULT_COLUMN = "result"


class ResultsTable:
    """``table`` of ``url`` (it must exist, with a unique key on the item's key columns):
    each item's result upserted — a dict's entries as columns, any other value into
    ``result``."""

    def __init__(self, url: Any, table: str, key: tuple[str, ...]) -> None:
        from ..dialects import reflect_table
        from ..export.sql_source import SqlSource
        from ..sql_copy.plan import SqlName
        from ..urls import parse

        self.url = parse(url)
        self.db: SqlSource = SqlSource(self.url, "target")
        self.name = SqlName.parse(table, self.db.family)
        self.key = key
        with self.db.connect() as conn:
            shape = reflect_table(conn, self.name.name, schema=self.name.schema,
                                  role="target")
        self.columns = {c.name for c in shape.columns}
        missing = [k for k in key if k not in self.columns]
        if missing:
            raise UsageError(f"the results table {self.name} has no column(s) "
                             f"{', '.join(missing)} for the items' key; add them (with a "
                             "unique index on them)")

    def write(self, results: list[tuple[tuple[Any, ...], Any]]) -> None:
        """Upsert one row per result, in one transaction."""
        if not results:
            return
        from ..dialects import write_sql

        rows = [{**dict(zip(self.key, key, strict=True)),
                 **(value if isinstance(value, dict) else {RESULT_COLUMN: value})}
                for key, value in results]
        names = list(dict.fromkeys(n for r in rows for n in r))
        unknown = [n for n in names if n not in self.columns]
        if unknown:
            raise UsageError(f"the function returned {', '.join(unknown)}, which the results "
                             f"table {self.name} has no column for")
        with self.db.connect() as conn:
            stmt = write_sql(conn.dialect, self.name.name, names, mode=Mode.UPSERT,
                             key=self.key, schema=self.name.schema)
            params = [tuple(_value(r.get(n)) for n in names) for r in rows]
            conn.exec_driver_sql(stmt, params)  # type: ignore[arg-type]
            conn.commit()

    def close(self) -> None:
        self.db.dispose()


def _value(v: Any) -> Any:
    return json.dumps(v, default=str) if isinstance(v, (dict, list)) else v


__all__ = ["RESULT_COLUMN", "ResultsTable"]
