"""Database URLs: parsing, masking and conversion to driver connection strings.

PostgreSQL URLs are parsed by libpq itself (through psycopg), so every libpq
URI feature works and no SQLAlchemy import is paid on the hot CLI path; other
databases' URLs are parsed by SQLAlchemy. Credentials never leave this module
unmasked except inside the connection string handed to the driver.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .errors import UsageError

_PG_PREFIX = re.compile(r"^(postgres|postgresql)(\+[a-z0-9_]+)?://", re.IGNORECASE)
_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*:)([^@\s]*)(@)")
_PASSWORD_IN_QUERY = re.compile(r"([?&]password=)([^&\s]*)", re.IGNORECASE)


def mask(text: str, *secrets: str | None) -> str:
    """Hide passwords in URLs found in ``text`` and any literal secret given."""
    out = _PASSWORD_IN_URL.sub(
        lambda m: f"{m.group(1)}***{m.group(3)}" if m.group(2) else m.group(0), text)
    out = _PASSWORD_IN_QUERY.sub(lambda m: f"{m.group(1)}***", out)
    for secret in secrets:
        if secret:
            out = out.replace(secret, "***")
    return out


@dataclass(frozen=True)
class DbUrl:
    """A parsed database URL. ``str()`` is always the masked form."""

    raw: str

    @property
    def is_postgres(self) -> bool:
        return bool(_PG_PREFIX.match(self.raw))

    @cached_property
    def _pg_params(self) -> dict[str, Any]:
        """libpq's own reading of the URL (host, port, user, password, dbname, options …)."""
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        uri = _PG_PREFIX.sub("postgresql://", self.raw, count=1)
        try:
            return dict(conninfo_to_dict(uri))
        except psycopg.ProgrammingError as exc:
            raise UsageError(
                f"invalid database URL {mask(self.raw)!r}: expected e.g. "
                "postgresql://user:password@host:5432/dbname"
            ) from exc

    @cached_property
    def _sa_url(self) -> Any:  # sqlalchemy.engine.URL, for the other databases
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            return make_url(self.raw)
        except ArgumentError as exc:
            raise UsageError(
                f"invalid database URL {mask(self.raw)!r}: expected e.g. "
                "postgresql://user:password@host:5432/dbname"
            ) from exc

    def validate(self) -> DbUrl:
        _ = self._pg_params if self.is_postgres else self._sa_url
        return self

    @property
    def backend(self) -> str:
        return "postgresql" if self.is_postgres else str(self._sa_url.get_backend_name())

    @property
    def masked(self) -> str:
        return mask(self.raw, self.password)

    @property
    def password(self) -> str | None:
        if self.is_postgres:
            value = self._pg_params.get("password")
        else:
            value = self._sa_url.password
        return str(value) if value else None

    def conninfo(self, **extra: str) -> str:
        """A libpq connection string for psycopg (PostgreSQL URLs only)."""
        from psycopg.conninfo import make_conninfo

        if not self.is_postgres:
            raise UsageError(
                f"{self.masked} is not a PostgreSQL URL; this command needs postgresql://…")
        return make_conninfo("", **{**self._pg_params, **extra})

    def _identity(self) -> tuple[str, str, str, str | None]:
        if self.is_postgres:
            p = self._pg_params
            return ("postgresql", str(p.get("host") or ""), str(p.get("port") or "5432"),
                    p.get("dbname") or p.get("user"))
        u = self._sa_url
        return (str(u.get_backend_name()), u.host or "", str(u.port or ""), u.database)

    def same_database(self, other: DbUrl) -> bool:
        return self._identity() == other._identity()

    def __str__(self) -> str:
        return self.masked


def parse(raw: str | DbUrl) -> DbUrl:
    """A validated DbUrl: a malformed URL is a usage error at the edge."""
    url = raw if isinstance(raw, DbUrl) else DbUrl(raw.strip())
    return url.validate()


__all__ = ["DbUrl", "mask", "parse"]
