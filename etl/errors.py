"""One error tree for the whole toolkit.

    EtlError                     exit 1, category fatal
    ├── UsageError               exit 2  bad options or configuration
    │   └── NoKeyError           exit 2  a table without a usable key
    ├── JobLockedError           exit 75 another run holds the job
    ├── SourceError              exit 1  reading failed (missing table, connection, auth …)
    ├── TargetError              exit 1  writing failed
    ├── StateStoreError          exit 1  the state store could not be read or written
    ├── ThresholdExceededError   exit 1  --max-errors / --max-error-rate crossed
    └── ConnectionLostError      exit 1  a reconnect during a run failed (transient: retried)

Every message says what to do next. Driver exceptions are wrapped at the
boundary (``raise … from exc``) and classified by SQLSTATE, never by text.
"""

from __future__ import annotations

from .model import Category

# SQLSTATE classes and codes that a retry can cure (see SPEC.md "Errors").
_TRANSIENT_CLASSES = ("08",)
_TRANSIENT_CODES = frozenset(
    {"57P01", "57P02", "57P03", "40001", "40P01", "55P03", "53300", "25006"}
)
_DATA_CLASSES = ("22", "23")


class EtlError(Exception):
    """Base class of every error `etl` raises on purpose."""

    exit_code: int = 1
    category: Category = Category.FATAL

    def __init__(self, message: str, *, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate

    def __str__(self) -> str:
        return self.message


class UsageError(EtlError):
    """Bad options, arguments or configuration: fix the command line."""

    exit_code = 2


class NoKeyError(UsageError):
    """The table has no primary key and no --key was given."""


class JobLockedError(EtlError):
    """Another run holds the job's advisory lock."""

    exit_code = 75

    def __init__(self, message: str, *, holder: str | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class SourceError(EtlError):
    """Reading from the source failed."""


class TargetError(EtlError):
    """Writing to the target failed."""


class StateStoreError(EtlError):
    """The state store could not be created, read or written."""


class ThresholdExceededError(EtlError):
    """--max-errors or --max-error-rate was crossed; the chunk that crossed it rolled back."""


class ConnectionLostError(EtlError):
    """A connection dropped during a run could not be opened again (yet); retried as transient."""

    category = Category.TRANSIENT


def sqlstate_of(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver exception (psycopg or SQLAlchemy-wrapped), if any."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        state = getattr(cur, "sqlstate", None)
        if isinstance(state, str) and state:
            return state
        orig = getattr(cur, "orig", None)
        if isinstance(orig, BaseException):
            cur = orig
            continue
        cur = cur.__cause__
    return None


# MySQL/MariaDB error numbers (pymysql, mysqlclient). They decide before the SQLSTATE
# the server may also send: MySQL reports many distinct conditions as HY000 (a lock wait
# timeout, a read-only server, a killed connection), which says nothing about retrying.
_MYSQL_TRANSIENT = frozenset({
    1040,  # too many connections
    1205,  # lock wait timeout exceeded
    1213,  # deadlock found
    1290, 1792,  # read-only server / transaction (after a failover)
    1927,  # connection was killed (MariaDB)
    2003, 2006, 2013,  # can't connect / server has gone away / lost connection
    4031,  # disconnected by the server (MySQL 8)
})
_MYSQL_DATA = frozenset({
    1048,  # column cannot be null
    1062,  # duplicate entry
    1264, 1265, 1292, 1366, 1406,  # out of range / truncated / bad datetime / bad value / too long
    1451, 1452,  # foreign key
    3819, 4025,  # check constraint (MySQL / MariaDB)
})
# SQLite primary result codes (sqlite3 exceptions' sqlite_errorcode & 0xff).
_SQLITE_TRANSIENT = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
_SQLITE_DATA = frozenset({18, 19, 20, 25})  # TOOBIG, CONSTRAINT, MISMATCH, RANGE


def _driver_error(exc: BaseException) -> BaseException:
    """The DB-API exception under SQLAlchemy's wrapper, if any."""
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def _by_error_number(exc: BaseException) -> Category | None:
    err = _driver_error(exc)
    module = type(err).__module__
    if module.startswith(("pymysql", "MySQLdb", "mysql")):
        code = err.args[0] if err.args and isinstance(err.args[0], int) else None
        if code in _MYSQL_TRANSIENT:
            return Category.TRANSIENT
        if code in _MYSQL_DATA:
            return Category.DATA
        return Category.FATAL if code is not None else None
    code = getattr(err, "sqlite_errorcode", None)
    if module == "sqlite3" and isinstance(code, int):
        primary = code & 0xFF
        if primary in _SQLITE_TRANSIENT:
            return Category.TRANSIENT
        if primary in _SQLITE_DATA:
            return Category.DATA
        return Category.FATAL
    return None


def classify(exc: BaseException) -> Category:
    """Transient, data or fatal — by SQLSTATE, driver error number and exception type,
    never by message text."""
    if isinstance(exc, EtlError) and not exc.sqlstate:
        return exc.category
    by_number = _by_error_number(exc)
    if by_number in (Category.TRANSIENT, Category.DATA):
        return by_number
    state = sqlstate_of(exc) or (exc.sqlstate if isinstance(exc, EtlError) else None)
    if state:
        if state.startswith(_TRANSIENT_CLASSES) or state in _TRANSIENT_CODES:
            return Category.TRANSIENT
        if state.startswith(_DATA_CLASSES):
            return Category.DATA
        return Category.FATAL
    if by_number is not None:
        return by_number
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a hard dependency
        return Category.FATAL
    if isinstance(exc, psycopg.OperationalError):
        return Category.TRANSIENT
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return Category.TRANSIENT
    return Category.FATAL
