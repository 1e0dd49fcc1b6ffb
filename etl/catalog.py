"""What a PostgreSQL database says about a table: columns, exact types, key, size, DDL."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import NoKeyError, SourceError, UsageError
from .model import Column, TableName

if TYPE_CHECKING:
    import psycopg

# Above this many rows (pg_class.reltuples), the total is estimated instead of counted:
# a count(*) of more would cost a noticeable share of the copy itself.
EXACT_COUNT_LIMIT = 500_000


@dataclass(frozen=True)
class TableInfo:
    """A table's columns in order, its primary key and the user types it uses."""

    name: TableName
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    estimated_rows: int

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)


_COLUMNS_SQL = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       a.attidentity <> '' OR EXISTS (
           SELECT 1 FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
           WHERE d.refobjid = a.attrelid AND d.refobjsubid = a.attnum AND d.deptype IN ('a', 'i'))
FROM pg_attribute a
WHERE a.attrelid = %(oid)s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_PK_SQL = """
SELECT a.attname
FROM pg_index i
JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %(oid)s AND i.indisprimary
ORDER BY k.ord
"""


def table_oid(conn: psycopg.Connection, table: TableName) -> int | None:
    row = conn.execute(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
        (table.schema, table.name),
    ).fetchone()
    return int(row[0]) if row else None


def describe(conn: psycopg.Connection, table: TableName, *, role: str = "source") -> TableInfo:
    """Columns, key and size of ``table``; a clear error when it does not exist."""
    oid = table_oid(conn, table)
    if oid is None:
        raise SourceError(
            f"table {table} does not exist in the {role} database — check the name "
            "(use SCHEMA.TABLE for a schema other than public)"
        )
    cols = tuple(
        Column(name, type_sql, bool(not_null), auto_increment=bool(auto))
        for name, type_sql, not_null, auto in conn.execute(_COLUMNS_SQL, {"oid": oid})
    )
    pk = tuple(r[0] for r in conn.execute(_PK_SQL, {"oid": oid}))
    reltuples = conn.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s", (oid,)).fetchone()
    estimated = max(int(reltuples[0]) if reltuples else 0, 0)
    return TableInfo(table, cols, pk, estimated)


_UNIQUE_SQL = """
SELECT array_agg(a.attname::text ORDER BY k.ord)
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %(oid)s AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
GROUP BY i.indexrelid, i.indisprimary
ORDER BY i.indisprimary DESC, i.indexrelid
"""


def unique_keys(conn: psycopg.Connection, table: TableName) -> list[tuple[str, ...]]:
    """Column sets with a unique index on ``table`` (the primary key first): what
    ``ON CONFLICT`` can name."""
    oid = table_oid(conn, table)
    if oid is None:
        return []
    return [tuple(r[0]) for r in conn.execute(_UNIQUE_SQL, {"oid": oid})]


def describe_query(conn: psycopg.Connection, query: str, name: TableName) -> TableInfo:
    """The result columns of ``query`` (exact types, from its result's type oids and
    modifiers) and the planner's row estimate; a clear error when it does not run."""
    import json

    import psycopg
    from psycopg import sql

    try:
        # sent without parameters: a % in the query is taken as it is
        cur = conn.execute(sql.SQL("SELECT * FROM ({}) AS q LIMIT 0").format(
            sql.SQL(query)))  # type: ignore[arg-type]
        res = cur.pgresult
        assert res is not None
        fields = [(cur.description[i].name, res.ftype(i), res.fmod(i))  # type: ignore[index]
                  for i in range(res.nfields)]
        types = [conn.execute("SELECT format_type(%s, %s)", (oid, mod)).fetchone()
                 for _, oid, mod in fields]
        plan = conn.execute(sql.SQL("EXPLAIN (FORMAT JSON) {}").format(
            sql.SQL(query))).fetchone()  # type: ignore[arg-type]
    except psycopg.Error as exc:
        conn.rollback()
        from .pg import describe_error

        raise UsageError(f"--query does not run on the source: {describe_error(exc)}") from exc
    names = [f[0] for f in fields]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"--query returns more than one column named {', '.join(dupes)}; "
                         "give each column its own name (… AS name)")
    doc = plan[0] if plan else None
    if isinstance(doc, str):
        doc = json.loads(doc)
    estimated = int(doc[0]["Plan"]["Plan Rows"]) if doc else 0
    cols = tuple(Column(n, t[0] if t else "text", False) for n, t in zip(names, types, strict=True))
    return TableInfo(name, cols, (), estimated)


def resolve_key(info: TableInfo, key: tuple[str, ...] | None) -> tuple[str, ...]:
    """The chunking key: ``--key`` when given (checked), else the primary key."""
    names = {c.name for c in info.columns}
    if key:
        missing = [k for k in key if k not in names]
        if missing:
            raise UsageError(
                f"--key column(s) {', '.join(missing)} not found in {info.name}; "
                f"its columns are: {', '.join(sorted(names))}"
            )
        return key
    if info.primary_key:
        return info.primary_key
    raise NoKeyError(
        f"table {info.name} has no primary key, so there is no column to cut chunks on. "
        "Pass --key COL[,COL…] naming unique, non-null column(s) (a unique index makes it fast), "
        "or add a primary key to the table."
    )


def resolve_columns(info: TableInfo, columns: tuple[str, ...] | None,
                    key: tuple[str, ...]) -> tuple[Column, ...]:
    """The copied columns in source order; ``--columns`` must include the key."""
    if not columns:
        return info.columns
    names = {c.name for c in info.columns}
    missing = [c for c in columns if c not in names]
    if missing:
        raise UsageError(
            f"--columns names {', '.join(missing)}, not found in {info.name}; "
            f"its columns are: {', '.join(c.name for c in info.columns)}"
        )
    absent_key = [k for k in key if k not in columns]
    if absent_key:
        raise UsageError(
            f"--columns must include the key column(s) {', '.join(absent_key)} "
            "so the copy can resume where it stopped"
        )
    wanted = set(columns)
    return tuple(c for c in info.columns if c.name in wanted)


def user_types_ddl(conn: psycopg.Connection, type_names: list[str]) -> list[tuple[str, str, str]]:
    """(schema, name, CREATE statement) for each enum or domain among ``type_names``.

    ``type_names`` are the ``format_type`` texts of the copied columns; array
    suffixes are ignored. Base types are skipped.
    """
    rows = conn.execute(
        """
        SELECT n.nspname, t.typname, t.typtype,
               CASE t.typtype
                 WHEN 'e' THEN (SELECT array_agg(e.enumlabel ORDER BY e.enumsortorder)
                                FROM pg_enum e WHERE e.enumtypid = t.oid)
               END AS labels,
               CASE t.typtype WHEN 'd' THEN format_type(t.typbasetype, t.typtypmod) END,
               t.typnotnull,
               (SELECT array_agg(pg_get_constraintdef(c.oid) ORDER BY c.conname)
                FROM pg_constraint c WHERE c.contypid = t.oid) AS checks
        FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
        WHERE t.typtype IN ('e', 'd')
          AND n.nspname NOT IN ('pg_catalog', 'information_schema')
          AND t.oid = ANY (SELECT to_regtype(x)::oid FROM unnest(%s::text[]) AS x
                           WHERE to_regtype(x) IS NOT NULL)
        """,
        ([t.removesuffix("[]") for t in type_names],),
    ).fetchall()
    return [(schema, name, _create_type_sql(schema, name, kind, labels, base, notnull, checks))
            for schema, name, kind, labels, base, notnull, checks in rows]


def _create_type_sql(schema: str, name: str, kind: str, labels: list[str] | None,
                     base: str | None, notnull: bool, checks: list[str] | None) -> str:
    from psycopg import sql

    ident = sql.Identifier(schema, name)
    if kind == "e":
        return sql.SQL("CREATE TYPE {} AS ENUM ({})").format(
            ident, sql.SQL(", ").join(sql.Literal(label) for label in labels or [])).as_string(None)
    parts: list[sql.Composable] = [
        sql.SQL("CREATE DOMAIN {} AS {}").format(ident, sql.SQL(base or "text"))]
    if notnull:
        parts.append(sql.SQL("NOT NULL"))
    parts.extend(sql.SQL(check) for check in checks or [])
    return sql.SQL(" ").join(parts).as_string(None)


def create_table_sql(target: TableName, columns: tuple[Column, ...],
                     primary_key: tuple[str, ...]) -> str:
    """CREATE TABLE for the target: columns, exact types, NOT NULL and the primary key."""
    from psycopg import sql

    defs = [
        sql.SQL("{} {}{}{}").format(
            sql.Identifier(c.name), sql.SQL(c.type_sql),
            sql.SQL(" NOT NULL" if c.not_null else ""),
            # serial and identity columns become identities BY DEFAULT, so that COPY can
            # write the source's values and the counter is set past them at the end
            sql.SQL(" GENERATED BY DEFAULT AS IDENTITY"
                    if c.auto_increment and c.type_sql in _INTEGER_TYPES else ""))
        for c in columns
    ]
    copied = {c.name for c in columns}
    pk = primary_key if primary_key and all(k in copied for k in primary_key) else ()
    if pk:
        defs.append(sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, pk))))
    return sql.SQL("CREATE TABLE {} ({})").format(
        sql.Identifier(target.schema, target.name), sql.SQL(", ").join(defs)).as_string(None)


_INTEGER_TYPES = ("smallint", "integer", "bigint")


def advance_sequences(conn: psycopg.Connection, table: TableName) -> dict[str, int]:
    """Set the sequences behind ``table``'s serial/identity columns past their largest
    value, so the application's next insert does not collide with a copied row."""
    from psycopg import sql

    oid = table_oid(conn, table)
    if oid is None:
        return {}
    regname = sql.Identifier(table.schema, table.name).as_string(conn)
    found = conn.execute(
        "SELECT a.attname, pg_get_serial_sequence(%s, a.attname) FROM pg_attribute a "
        "WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped "
        "AND pg_get_serial_sequence(%s, a.attname) IS NOT NULL", (regname, oid, regname)).fetchall()
    done: dict[str, int] = {}
    for column, seq in found:
        row = conn.execute(sql.SQL(
            "SELECT setval(%s, greatest(max({col}), (SELECT last_value FROM {seq}))) FROM {t} "
            "HAVING max({col}) IS NOT NULL").format(
            col=sql.Identifier(column), seq=sql.SQL(seq), t=sql.Identifier(table.schema, table.name)),  # type: ignore[arg-type]
            (seq,)).fetchone()
        if row:
            done[column] = int(row[0])
    return done


def count_rows(conn: psycopg.Connection, query: str, params: dict | list | tuple | None,
               estimated_rows: int) -> tuple[int, bool]:
    """(rows, exact): an exact count for small tables, the planner's estimate for big ones."""
    import json

    if estimated_rows <= EXACT_COUNT_LIMIT:
        row = conn.execute(f"SELECT count(*) FROM ({query}) AS q", params).fetchone()
        return int(row[0]) if row else 0, True
    plan = conn.execute(f"EXPLAIN (FORMAT JSON) {query}", params).fetchone()
    doc = plan[0] if plan else None
    if isinstance(doc, str):
        doc = json.loads(doc)
    try:
        return int(doc[0]["Plan"]["Plan Rows"]), False  # type: ignore[index]
    except (TypeError, KeyError, IndexError) as exc:  # pragma: no cover - planner format is stable
        raise SourceError("could not estimate the number of rows") from exc
