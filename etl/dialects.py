"""What differs per database: portable column types, reflection, sessions and write SQL.

A table is described portably (``TableSchema`` of ``PortableColumn``) from
SQLAlchemy reflection of PostgreSQL, MySQL/MariaDB or SQLite, so any of them can
be the source of a copy into any other. ``etl.ddl`` turns that description into
CREATE TABLE for a target (the mapping is documented in ``docs/type-mapping.md``);
this module also builds the per-dialect INSERT for append, upsert and ignore, and
opens sessions that behave the same everywhere (UTC, utf8mb4, strict).

Canonical Python values of each logical kind (what sources return, what sinks take)::

    smallint/integer/bigint → int     boolean → bool        numeric → Decimal
    real/double → float               text/varchar/char/enum/set → str
    bytes → bytes                     date/time → date/time
    timestamp → naive datetime        timestamptz → aware datetime in UTC
    json → str (the JSON text)        uuid → str            array → list
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from .errors import SourceError, UsageError
from .model import Mode
from .portable import Kind, LogicalType, PortableColumn, TableSchema

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Dialect, Engine
    from sqlalchemy.types import TypeEngine

Family = Literal["postgresql", "mysql", "sqlite"]

# MySQL sessions run in UTC so TIMESTAMP values read and written are UTC, whatever the server's zone.
MYSQL_SESSION_TIME_ZONE = "+00:00"
# MySQL sessions refuse (instead of truncating or zeroing) bad values in every table, not only
# transactional ones: a silent change would be a lost value.
MYSQL_STRICT_MODE = "STRICT_ALL_TABLES"
# An explicit 0 written into an AUTO_INCREMENT column is stored as 0 (as mysqldump does), not
# replaced by the next counter value: a copied key 0 must stay 0.
MYSQL_ZERO_KEY_MODE = "NO_AUTO_VALUE_ON_ZERO"
# utf8mb4 is the only MySQL charset that holds all of Unicode (4-byte UTF-8 such as emoji).
MYSQL_CHARSET = "utf8mb4"
# Driver used for each URL scheme that names no driver: the ones this toolkit installs.
_DEFAULT_DRIVERS = {"postgresql": "psycopg", "postgres": "psycopg", "mysql": "pymysql",
                    "mariadb": "pymysql"}


# -- connections -------------------------------------------------------------------------

def family(dialect: Dialect) -> Family:
    """``postgresql``, ``mysql`` (MySQL and MariaDB) or ``sqlite`` for a SQLAlchemy dialect."""
    name = dialect.name
    if name == "postgresql":
        return "postgresql"
    if name in ("mysql", "mariadb"):
        return "mysql"
    if name == "sqlite":
        return "sqlite"
    raise UsageError(f"unsupported database {name!r}: valid ones are PostgreSQL, MySQL/MariaDB "
                     "and SQLite")


def sqlalchemy_url(url: str) -> str:
    """``url`` with the driver this toolkit uses when it names none (psycopg, pymysql)."""
    scheme, sep, rest = url.partition("://")
    if sep and "+" not in scheme and scheme.lower() in _DEFAULT_DRIVERS:
        base = "postgresql" if scheme.lower() == "postgres" else scheme.lower()
        return f"{base}+{_DEFAULT_DRIVERS[scheme.lower()]}://{rest}"
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine whose sessions are set up by ``prepare_session`` on every new connection.

    MySQL/MariaDB connections use charset utf8mb4; SQLite uses Python's sqlite3.
    """
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    sa_url = make_url(sqlalchemy_url(url))
    if sa_url.get_backend_name() in ("mysql", "mariadb") and "charset" not in sa_url.query:
        sa_url = sa_url.update_query_dict({"charset": MYSQL_CHARSET})
    engine = sa.create_engine(sa_url, **kwargs)
    if family(engine.dialect) == "mysql":
        sa.event.listen(engine, "connect", _on_mysql_connect)
    return engine


def _mysql_session_sql() -> list[str]:
    return [f"SET time_zone = '{MYSQL_SESSION_TIME_ZONE}'",
            "SET SESSION sql_mode = CONCAT_WS(',', NULLIF(@@SESSION.sql_mode, ''), "
            f"'{MYSQL_STRICT_MODE}', '{MYSQL_ZERO_KEY_MODE}')"]


def _on_mysql_connect(dbapi_connection: Any, _record: Any) -> None:
    with dbapi_connection.cursor() as cur:
        for statement in _mysql_session_sql():
            cur.execute(statement)


def prepare_session(conn: Connection) -> None:
    """Make a session behave as the toolkit expects (idempotent, cheap, transaction-safe).

    MySQL/MariaDB: time zone UTC, strict mode, and an explicit 0 kept in AUTO_INCREMENT
    columns (``NO_AUTO_VALUE_ON_ZERO``). Others need nothing.
    """
    if family(conn.dialect) == "mysql":
        for statement in _mysql_session_sql():
            conn.exec_driver_sql(statement)


# -- reflection --------------------------------------------------------------------------

def reflect_table(conn: Connection, name: str, *, schema: str | None = None,
                  role: str = "source") -> TableSchema:
    """The portable description of table ``name`` (columns, NOT NULL, primary key, which
    columns the database numbers itself: ``etl.autonumber``)."""
    import sqlalchemy as sa
    from sqlalchemy.exc import NoSuchTableError

    fam = family(conn.dialect)
    inspector = sa.inspect(conn)
    try:
        raw = inspector.get_columns(name, schema=schema)
        pk = tuple(inspector.get_pk_constraint(name, schema=schema)["constrained_columns"] or ())
    except NoSuchTableError as exc:
        where = f"{schema}.{name}" if schema else name
        raise SourceError(f"table {where} does not exist in the {role} database — check the "
                          "name (and the schema or database)") from exc
    declared = _sqlite_declared_types(conn, name, schema) if fam == "sqlite" else {}
    json_cols = _mariadb_json_columns(conn, name, schema) if fam == "mysql" else set()
    from .autonumber import reflected_auto_columns

    auto = reflected_auto_columns(conn, name, schema, raw, pk)
    columns = []
    for col in raw:
        typ: TypeEngine[Any] = col["type"]
        native = declared.get(col["name"]) or _native_text(typ, conn.dialect)
        ltype, unsigned, as_text = portable_type(typ, fam, declared=declared.get(col["name"]))
        if col["name"] in json_cols:
            ltype, as_text = LogicalType(Kind.JSON), False
        nullable = bool(col["nullable"]) and col["name"] not in pk
        columns.append(PortableColumn(col["name"], ltype, nullable, unsigned, native, as_text,
                                      auto_increment=col["name"] in auto))
    return TableSchema(name, tuple(columns), pk, schema)


# The temporary view (PostgreSQL, SQLite) or table (MySQL) a query's result columns are
# reflected through; it never holds a row and is gone before the copy starts.
QUERY_SHAPE_NAME = "etl_query_shape"
_SQLITE_REPEAT = re.compile(r"^(.*):\d+$")


def query_text(query: str) -> str:
    """``query`` for ``sqlalchemy.text``: its colons escaped, so ``:name`` inside the operator's
    SQL is never taken for a bind parameter (``%`` is doubled by SQLAlchemy itself)."""
    return query.replace(":", "\\:")


def reflect_query(conn: Connection, query: str, *, key: Sequence[str] = (),
                  name: str = "query") -> TableSchema:
    """The portable description of ``query``'s result columns, ``key`` as its primary key.

    The result is given a temporary name on the source session and reflected like a table,
    so queries and tables share one type mapping with the declared types kept exactly
    (PostgreSQL type modifiers, SQLite declared types of the columns a view selects, the
    types MySQL derives for expressions). PostgreSQL and SQLite get a temporary view,
    created in a transaction that is rolled back; MySQL has no temporary views, so it gets
    an empty ``CREATE TEMPORARY TABLE … AS SELECT … LIMIT 0``, dropped at once. (A cursor's
    description would not do: sqlite3 reports no types at all, PyMySQL only wire types.)
    The source session must be allowed to create temporary objects. Driver errors (the
    query does not run) are raised as they are, for the caller to word.
    """
    import sqlalchemy as sa

    shape = quote(conn.dialect, QUERY_SHAPE_NAME)
    body = f"SELECT * FROM ({query_text(query)}) AS q"
    try:
        names = list(conn.execute(sa.text(f"{body} LIMIT 0")).keys())
        # SQLite names a repeated column of a subquery NAME:1, NAME:2 …
        repeated = [m.group(1) for n in names if (m := _SQLITE_REPEAT.match(n))
                    and m.group(1) in names]
        dupes = sorted({n for n in names if names.count(n) > 1} | set(repeated))
        if dupes:
            raise UsageError(f"--query returns more than one column named {', '.join(dupes)}; "
                             "give each column its own name (… AS name)")
        if family(conn.dialect) == "mysql":
            conn.execute(sa.text(f"CREATE TEMPORARY TABLE {shape} AS {body} LIMIT 0"))
            try:
                found = reflect_table(conn, QUERY_SHAPE_NAME, role="source")
            finally:
                conn.exec_driver_sql(f"DROP TEMPORARY TABLE IF EXISTS {shape}")
        else:
            conn.execute(sa.text(f"CREATE TEMPORARY VIEW {shape} AS {body}"))
            found = reflect_table(conn, QUERY_SHAPE_NAME, role="source")
    finally:
        conn.rollback()
    return TableSchema(name, found.columns, tuple(key))


def _native_text(typ: TypeEngine[Any], dialect: Dialect) -> str:
    try:
        return str(typ.compile(dialect=dialect))
    except Exception:  # some reflected types cannot be rendered back; the repr still informs
        return repr(typ)


def _sqlite_declared_types(conn: Connection, name: str, schema: str | None) -> dict[str, str]:
    prep = conn.dialect.identifier_preparer
    prefix = f"{prep.quote_identifier(schema)}." if schema else ""
    rows = conn.exec_driver_sql(
        f"PRAGMA {prefix}table_xinfo({prep.quote_identifier(name)})").fetchall()
    return {str(r[1]): str(r[2] or "") for r in rows}


_JSON_CHECK = re.compile(r"^json_valid\(`((?:[^`]|``)+)`\)$", re.IGNORECASE)


def _mariadb_json_columns(conn: Connection, name: str, schema: str | None) -> set[str]:
    """MariaDB's JSON is LONGTEXT with a ``json_valid`` CHECK, which reflection reports as text."""
    if not getattr(conn.dialect, "is_mariadb", False):
        return set()
    rows = conn.exec_driver_sql(
        "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS "
        "WHERE CONSTRAINT_SCHEMA = COALESCE(%s, DATABASE()) AND TABLE_NAME = %s",
        (schema, name)).fetchall()
    found = set()
    for (clause,) in rows:
        match = _JSON_CHECK.match(str(clause).strip())
        if match:
            found.add(match.group(1).replace("``", "`"))
    return found


_SQLITE_DECLARED = re.compile(r"^\s*([A-Za-z_]+)\s*(?:\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\))?\s*$")
# Declared SQLite type names SQLAlchemy resolves by affinity only; ``etl.ddl`` writes them.
_SQLITE_NAMES = {"TIMESTAMPTZ": Kind.TIMESTAMPTZ, "UUID": Kind.UUID, "JSON": Kind.JSON,
                 "JSONB": Kind.JSON, "JSON_TEXT": Kind.JSON, "DECIMAL_TEXT": Kind.NUMERIC,
                 "BOOLEAN": Kind.BOOLEAN, "BOOL": Kind.BOOLEAN}


def _from_sqlite_declared(declared: str) -> LogicalType | None:
    match = _SQLITE_DECLARED.match(declared)
    kind = _SQLITE_NAMES.get(match.group(1).upper()) if match else None
    if match is None or kind is None:
        return None
    if kind is Kind.NUMERIC:
        p, s = match.group(2), match.group(3)
        return LogicalType(kind, precision=int(p) if p else None, scale=int(s or 0) if p else None)
    return LogicalType(kind)


def portable_type(typ: TypeEngine[Any], fam: Family, *,
                  declared: str | None = None) -> tuple[LogicalType, bool, bool]:
    """(logical type, unsigned, read_as_text) of a reflected SQLAlchemy type.

    Integers take the narrowest signed kind that holds the column's whole range, so
    unsigned MySQL integers become the next wider kind (INT UNSIGNED → bigint,
    BIGINT UNSIGNED → numeric(20,0)); SQLite integers are 64-bit, hence bigint.
    """
    from sqlalchemy import types as t
    from sqlalchemy.dialects import mysql, postgresql

    if fam == "sqlite" and declared:
        found = _from_sqlite_declared(declared)
        if found is not None:
            return found, False, False
    unsigned = bool(getattr(typ, "unsigned", False))
    if isinstance(typ, postgresql.ARRAY):
        item, _, item_text = portable_type(typ.item_type, fam)
        return LogicalType(Kind.ARRAY, item=item), False, item_text
    if isinstance(typ, mysql.SET):
        return LogicalType(Kind.SET, labels=tuple(typ.values)), False, False
    if isinstance(typ, t.Enum):
        return LogicalType(Kind.ENUM, labels=tuple(typ.enums)), False, False
    if isinstance(typ, mysql.BIT):
        return LogicalType(Kind.BOOLEAN if (typ.length or 1) == 1 else Kind.BIGINT), False, False
    if isinstance(typ, mysql.YEAR):
        return LogicalType(Kind.SMALLINT), False, False
    if isinstance(typ, mysql.TINYINT) and typ.display_width == 1 and not unsigned:
        return LogicalType(Kind.BOOLEAN), False, False
    if isinstance(typ, t.Boolean):
        return LogicalType(Kind.BOOLEAN), False, False
    if isinstance(typ, t.Integer):
        return _integer_type(typ, fam, unsigned), unsigned, False
    if isinstance(typ, t.Float):
        return LogicalType(_float_kind(typ, fam)), False, False
    if isinstance(typ, t.Numeric):
        return LogicalType(Kind.NUMERIC, precision=typ.precision,
                           scale=typ.scale if typ.precision is not None else None), unsigned, False
    if isinstance(typ, t.DateTime):
        tz = bool(typ.timezone) or (fam == "mysql" and isinstance(typ, t.TIMESTAMP))
        return LogicalType(Kind.TIMESTAMPTZ if tz else Kind.TIMESTAMP), False, False
    if isinstance(typ, t.Date):
        return LogicalType(Kind.DATE), False, False
    if isinstance(typ, t.Time) and not typ.timezone:
        return LogicalType(Kind.TIME), False, False
    if isinstance(typ, t.JSON):
        return LogicalType(Kind.JSON), False, fam == "postgresql"  # keep PostgreSQL's JSON text
    if isinstance(typ, t.Uuid):
        return LogicalType(Kind.UUID), False, False
    if isinstance(typ, (t._Binary, t.LargeBinary)):
        return LogicalType(Kind.BYTES), False, False
    if isinstance(typ, t.String) and not isinstance(typ, t.Text):
        length = typ.length
        if isinstance(typ, t.CHAR) and length:
            return LogicalType(Kind.CHAR, length=length), False, False
        if length:
            return LogicalType(Kind.VARCHAR, length=length), False, False
        return LogicalType(Kind.TEXT), False, False
    if isinstance(typ, t.String) or (fam == "sqlite" and isinstance(typ, t.NullType)):
        return LogicalType(Kind.TEXT), False, False  # an untyped SQLite column holds anything
    return LogicalType(Kind.TEXT), False, True  # no portable type: carried as its text form


def _integer_type(typ: Any, fam: Family, unsigned: bool) -> LogicalType:
    from sqlalchemy import types as t
    from sqlalchemy.dialects import mysql

    if fam == "sqlite":
        return LogicalType(Kind.BIGINT)
    if isinstance(typ, mysql.TINYINT):
        nbytes = 1
    elif isinstance(typ, t.SmallInteger):
        nbytes = 2
    elif isinstance(typ, mysql.MEDIUMINT):
        nbytes = 3
    elif isinstance(typ, t.BigInteger):
        nbytes = 8
    else:
        nbytes = 4
    top = 2 ** (8 * nbytes) - 1 if unsigned else 2 ** (8 * nbytes - 1) - 1
    for kind, limit in ((Kind.SMALLINT, 2**15 - 1), (Kind.INTEGER, 2**31 - 1),
                        (Kind.BIGINT, 2**63 - 1)):
        if top <= limit:
            return LogicalType(kind)
    return LogicalType(Kind.NUMERIC, precision=20, scale=0)


def _float_kind(typ: Any, fam: Family) -> Kind:
    from sqlalchemy import types as t
    from sqlalchemy.dialects import mysql

    if fam == "sqlite":
        return Kind.DOUBLE  # SQLite's REAL is an 8-byte IEEE double
    if fam == "mysql":
        return Kind.REAL if isinstance(typ, mysql.FLOAT) else Kind.DOUBLE
    if isinstance(typ, t.REAL) or (isinstance(typ, t.Float) and typ.precision
                                    and typ.precision <= 24):
        return Kind.REAL
    return Kind.DOUBLE


# -- identifiers and write statements ----------------------------------------------------

def quote(dialect: Dialect, name: str) -> str:
    """``name`` always quoted for ``dialect`` (any name is safe, reserved or not); SQLAlchemy
    doubles ``%`` in it where the driver uses %s markers."""
    return str(dialect.identifier_preparer.quote_identifier(name))


def qualified(dialect: Dialect, name: str, schema: str | None = None) -> str:
    return f"{quote(dialect, schema)}.{quote(dialect, name)}" if schema else quote(dialect, name)


def placeholder(dialect: Dialect) -> str:
    """The driver's positional parameter marker (``?`` for sqlite3, ``%s`` otherwise)."""
    return "?" if dialect.paramstyle == "qmark" else "%s"


def keys_in(dialect: Dialect, columns: Sequence[str], count: int) -> str:
    """``key IN (…)`` for ``count`` keys of ``columns``, in the driver's paramstyle; a
    composite key as row values (SQLite compares row values only against VALUES)."""
    mark = placeholder(dialect)
    cols = [quote(dialect, c) for c in columns]
    if len(cols) == 1:
        return f"{cols[0]} IN ({', '.join([mark] * count)})"
    values = ", ".join([f"({', '.join([mark] * len(cols))})"] * count)
    rhs = f"(VALUES {values})" if family(dialect) == "sqlite" else f"({values})"
    return f"({', '.join(cols)}) IN {rhs}"


def write_sql(dialect: Dialect, table: str, columns: Sequence[str], *, mode: Mode,
              key: Sequence[str] = (), schema: str | None = None) -> str:
    """The INSERT for one row (used with executemany) in ``mode``, in the driver's paramstyle.

    - append/replace: a plain INSERT;
    - upsert, MySQL/MariaDB: ``ON DUPLICATE KEY UPDATE c = VALUES(c)`` (MySQL itself skips
      rows whose values did not change); SQLite: ``ON CONFLICT (key) DO UPDATE SET … WHERE``
      some column ``IS NOT`` its new value, so unchanged rows are not rewritten;
    - ignore, MySQL/MariaDB: ``ON DUPLICATE KEY UPDATE k = k`` — a no-op on an existing key.
      ``INSERT IGNORE`` is not used: it also turns errors into warnings (too-long values are
      truncated, NULLs replaced by defaults), which would change rows silently;
      SQLite: ``ON CONFLICT (key) DO NOTHING``.

    PostgreSQL gets the SQLite form with ``IS DISTINCT FROM`` (its COPY sinks are faster).
    """
    fam = family(dialect)
    mark = placeholder(dialect)
    cols = [quote(dialect, c) for c in columns]
    insert = (f"INSERT INTO {qualified(dialect, table, schema)} ({', '.join(cols)}) "
              f"VALUES ({', '.join([mark] * len(cols))})")
    if mode in (Mode.APPEND, Mode.REPLACE):
        return insert
    if not key:
        raise UsageError(f"mode {mode.value} needs a key: the table has no primary key; "
                         "pass --key COL[,COL…] naming unique column(s)")
    keys = [quote(dialect, k) for k in key]
    others = [quote(dialect, c) for c in columns if c not in set(key)]
    if fam == "mysql":
        if mode is Mode.UPSERT and others:
            sets = ", ".join(f"{c} = VALUES({c})" for c in others)
        else:
            sets = f"{keys[0]} = {keys[0]}"
        return f"{insert} ON DUPLICATE KEY UPDATE {sets}"
    conflict = f"{insert} ON CONFLICT ({', '.join(keys)})"
    if mode is Mode.IGNORE or not others:
        return f"{conflict} DO NOTHING"
    target = quote(dialect, table)
    differs = "IS DISTINCT FROM" if fam == "postgresql" else "IS NOT"  # NULL-safe inequality
    sets = ", ".join(f"{c} = excluded.{c}" for c in others)
    changed = " OR ".join(f"{target}.{c} {differs} excluded.{c}" for c in others)
    return f"{conflict} DO UPDATE SET {sets} WHERE {changed}"


__all__ = ["Family", "Kind", "LogicalType", "PortableColumn", "TableSchema", "family",
           "make_engine", "placeholder", "portable_type", "prepare_session", "qualified",
           "query_text", "quote", "reflect_query", "reflect_table", "sqlalchemy_url",
           "write_sql"]
