"""Database URLs: parsing, masking and conversion to driver connection strings.

Credentials never leave this module unmasked except inside the connection
string handed to the driver.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import UsageError

_PASSWORD_IN_URL = re.compile(r"(://[^:/@\s]*:)([^@\s]*)(@)")


@dataclass(frozen=True)
class DbUrl:
    """A parsed database URL. ``str()`` is always the masked form."""

    raw: str

    @property
    def _url(self):  # sqlalchemy.engine.URL; imported lazily to keep `import etl` light
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        text = self.raw
        if text.startswith("postgres://"):
            text = "postgresql://" + text[len("postgres://"):]
        try:
            return make_url(text)
        except ArgumentError as exc:
            raise UsageError(
                f"invalid database URL {mask(self.raw)!r}: expected e.g. "
                "postgresql://user:password@host:5432/dbname"
            ) from exc

    @property
    def backend(self) -> str:
        return self._url.get_backend_name()

    @property
    def is_postgres(self) -> bool:
        return self.backend == "postgresql"

    @property
    def masked(self) -> str:
        return self._url.render_as_string(hide_password=True)

    @property
    def password(self) -> str | None:
        return self._url.password

    def conninfo(self, **extra: str) -> str:
        """A libpq connection string for psycopg (PostgreSQL URLs only)."""
        from psycopg.conninfo import make_conninfo

        if not self.is_postgres:
            raise UsageError(
                f"{self.masked} is not a PostgreSQL URL; this command needs postgresql://…"
            )
        u = self._url
        params: dict[str, str] = {}
        if u.host:
            params["host"] = u.host
        if u.port:
            params["port"] = str(u.port)
        if u.username:
            params["user"] = u.username
        if u.password is not None:
            params["password"] = str(u.password)
        if u.database:
            params["dbname"] = u.database
        for key, value in u.query.items():
            params[key] = value if isinstance(value, str) else value[-1]
        params.update(extra)
        return make_conninfo("", **params)

    def same_database(self, other: DbUrl) -> bool:
        a, b = self._url, other._url
        return (a.get_backend_name(), a.host or "", a.port or 5432, a.database) == (
            b.get_backend_name(), b.host or "", b.port or 5432, b.database)

    def __str__(self) -> str:
        return self.masked


def mask(text: str, *secrets: str | None) -> str:
    """Hide passwords in URLs found in ``text`` and any literal secret given."""
    out = _PASSWORD_IN_URL.sub(lambda m: f"{m.group(1)}***{m.group(3)}" if m.group(2) else m.group(0), text)
    for secret in secrets:
        if secret:
            out = out.replace(secret, "***")
    return out


def parse(raw: str | DbUrl) -> DbUrl:
    url = raw if isinstance(raw, DbUrl) else DbUrl(raw)
    _ = url._url  # validate now, so a bad URL is a usage error at the edge
    return url


__all__ = ["DbUrl", "mask", "parse"]
