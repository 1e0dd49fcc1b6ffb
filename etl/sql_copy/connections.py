"""The engines and connections of one cross-database copy, failures made EtlErrors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import pg
from ..dialects import Family, make_engine
from ..errors import ConnectionLostError, SourceError, TargetError, UsageError
from ..sql_copy_io import describe_error
from ..urls import DbUrl

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from .plan import SqlCopySpec


def family_of(url: DbUrl) -> Family:
    backend = url.backend
    if backend in ("mysql", "mariadb"):
        return "mysql"
    if backend in ("postgresql", "sqlite"):
        return backend  # type: ignore[return-value]
    raise UsageError(f"{url.masked}: etl copy supports PostgreSQL, MySQL/MariaDB and SQLite "
                     f"URLs, not {backend}")


class Databases:
    """The engines of one copy and the connections they open, failures made EtlErrors."""

    def __init__(self, spec: SqlCopySpec, *, dry_run: bool = False) -> None:
        self.spec = spec
        self.dry_run = dry_run
        self._engines: dict[str, Engine] = {}

    def _engine(self, url: DbUrl, role: str) -> Engine:
        if role not in self._engines:
            fam = family_of(url)
            kwargs: dict[str, Any] = {"pool_pre_ping": True}
            if fam == "sqlite":
                kwargs["connect_args"] = {"timeout": self.spec.lock_timeout or 5.0}
                if role == "source":
                    _require_sqlite_file(url)
            elif fam == "mysql":
                kwargs["connect_args"] = {"connect_timeout": pg.CONNECT_TIMEOUT_SECONDS}
            raw = url.raw
            if fam == "sqlite" and self.dry_run and not _sqlite_file_exists(url):
                raw = "sqlite://"  # sqlite3 would create the file: a dry run writes nothing
            engine = make_engine(raw, **kwargs)
            if fam == "sqlite":
                _sqlite_real_transactions(engine)
            self._engines[role] = engine
        return self._engines[role]

    def _connect(self, url: DbUrl, role: str, reconnect: bool) -> Connection:
        import sqlalchemy as sa

        try:
            conn = self._engine(url, role).connect()
            if role == "target" and self.spec.lock_timeout and family_of(url) == "mysql":
                wait = max(1, round(self.spec.lock_timeout))
                conn.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {wait}, "
                                     f"lock_wait_timeout = {wait}")
                conn.commit()
            return conn
        except sa.exc.DBAPIError as exc:
            cls = ConnectionLostError if reconnect else \
                (SourceError if role == "source" else TargetError)
            raise cls(f"cannot connect to the {role} database {url.masked}: "
                      f"{describe_error(exc, url)} — check the host, port, user, password and "
                      "database name in the URL") from exc

    def source(self, reconnect: bool = False) -> Connection:
        return self._connect(self.spec.source, "source", reconnect)

    def target_sa(self, reconnect: bool = False) -> Connection:
        return self._connect(self.spec.target, "target", reconnect)

    def target_pg(self, reconnect: bool = False) -> Any:
        return pg.connect(self.spec.target, "target", autocommit=True,
                          settings=pg.lock_timeout_settings(self.spec.lock_timeout),
                          reconnect=reconnect)

    def dispose(self) -> None:
        for engine in self._engines.values():
            engine.dispose()


def _sqlite_file_exists(url: DbUrl) -> bool:
    from sqlalchemy.engine import make_url

    path = make_url(url.raw).database
    return not path or path == ":memory:" or path.startswith("file:") or Path(path).exists()


def _require_sqlite_file(url: DbUrl) -> None:
    from sqlalchemy.engine import make_url

    path = make_url(url.raw).database
    if not _sqlite_file_exists(url):
        raise SourceError(f"the source SQLite database {path} does not exist — check the path "
                          "(sqlite:///relative/path or sqlite:////absolute/path)")


def _sqlite_real_transactions(engine: Engine) -> None:
    """Let SQLAlchemy issue BEGIN itself: Python's sqlite3 otherwise starts transactions only
    before DML, so a chunk's leading SAVEPOINT would commit on its own when released."""
    import sqlalchemy as sa

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    def on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    sa.event.listen(engine, "connect", on_connect)
    sa.event.listen(engine, "begin", on_begin)


__all__ = ["Databases", "family_of"]
