"""PostgreSQL connections: one place that opens them and turns failures into EtlErrors."""

from __future__ import annotations

import os
import re
import socket
from typing import TYPE_CHECKING

from .errors import ConnectionLostError, EtlError, SourceError, StateStoreError, TargetError
from .urls import DbUrl, mask

if TYPE_CHECKING:
    import psycopg

# A server that does not answer in this time is reported as unreachable.
CONNECT_TIMEOUT_SECONDS = 10

_ROLE_ERRORS: dict[str, type[EtlError]] = {
    "source": SourceError,
    "target": TargetError,
    "state": StateStoreError,
}


def application_name(role: str) -> str:
    """Identifies an `etl` session in pg_stat_activity: ``etl:ROLE:PID:HOST``.

    PostgreSQL keeps 63 bytes; the pid comes before the host so a long host
    name can only lose its own tail.
    """
    return f"etl:{role}:{os.getpid()}:{socket.gethostname()}"[:63]


def connect(url: DbUrl, role: str, *, autocommit: bool = False,
            settings: dict[str, str] | None = None, reconnect: bool = False) -> psycopg.Connection:
    """Open a connection for ``role`` (source, target or state), in UTC.

    ``settings`` are session parameters (e.g. ``{"lock_timeout": "5000ms"}``).
    Connection failures become one clear line naming the masked URL; with
    ``reconnect`` (during a run) they are ConnectionLostError, which is retried.
    """
    import psycopg

    error_cls = ConnectionLostError if reconnect else _ROLE_ERRORS.get(role, EtlError)
    options = " ".join(f"-c {k}={_option_value(v)}"
                       for k, v in {"TimeZone": "UTC", **(settings or {})}.items())
    try:
        conn = psycopg.connect(
            url.conninfo(application_name=application_name(role),
                         connect_timeout=str(CONNECT_TIMEOUT_SECONDS)),
            autocommit=autocommit,
            options=options,
        )
    except psycopg.Error as exc:
        detail = " ".join(str(exc).split())
        raise error_cls(
            f"cannot connect to the {role} database {url.masked}: {mask(detail, url.password)} "
            "— check the host, port, user, password and database name in the URL"
        ) from exc
    return conn


def _option_value(value: str) -> str:
    """A value for libpq's ``options``: spaces and backslashes escaped with a backslash."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def lock_timeout_settings(seconds: float | None) -> dict[str, str]:
    """Session settings that bound each wait for a lock (``--lock-timeout``; None: none)."""
    if seconds is None:
        return {}
    return {"lock_timeout": f"{max(int(seconds * 1000), 1)}ms"}


def session_settings(lock_timeout: float | None, timezone: str = "UTC") -> dict[str, str]:
    """A job's session settings: ``--lock-timeout`` and ``--timezone`` (the default UTC)."""
    return {**lock_timeout_settings(lock_timeout), "TimeZone": timezone}


def describe_error(exc: BaseException, url: DbUrl | None = None) -> str:
    """One line for a driver error: SQLSTATE, message and the server's detail/hint, masked."""
    text = " ".join(str(exc).split())  # libpq's text already carries DETAIL, HINT and CONTEXT
    state = getattr(exc, "sqlstate", None)
    if state:
        text = f"[{state}] {text}"
    return mask(text, url.password if url else None)


def is_usable(conn: psycopg.Connection) -> bool:
    """False once the server or the network dropped the connection (or it was closed)."""
    return not (conn.closed or conn.broken)


# COPY's error context names the input line being processed: "COPY t, line 42[, column c]: …"
# (the word "line" is translated with lc_messages, so only the shape is matched).
_COPY_LINE = re.compile(r"^COPY .*?, \w+ (\d+)(?:[,:]|$)")


def copy_error_line(exc: BaseException, *, any_line: bool = False) -> int | None:
    """The 1-based row of a COPY FROM that a data error came from, when the server says.

    Used only to find a bad row faster; a missing or wrong hint falls back to bisection.
    Foreign-key violations are checked at the end of the statement and carry no line.
    ``any_line``: the COPY line may follow others in the context (an invalid JSON value:
    "JSON data, line 1: …" comes first).
    """
    diag = getattr(exc, "diag", None)
    context = getattr(diag, "context", None) if diag is not None else None
    if not context:
        return None
    for text in context.splitlines() if any_line else context.splitlines()[:1]:
        match = _COPY_LINE.match(text)
        if match:
            return int(match.group(1))
    return None
