"""Parsing and checking option values shared by the library and the CLI."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError
from .model import Mode

if TYPE_CHECKING:
    from .retry import RetryPolicy
    from .runner import Pacing

# A chunk waits this long for a lock on the target before the attempt fails and is retried
# (as pt-archiver does): long enough for ordinary row locks, short enough not to queue
# behind a migration's ACCESS EXCLUSIVE lock and block everyone else.
DEFAULT_LOCK_TIMEOUT_SECONDS = 5.0

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str | float | int | None, option: str) -> float | None:
    """'90', '90s', '5m', '1h30m', '2d' → seconds."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        text = value.strip().lower().replace(" ", "")
        pos, seconds = 0, 0.0
        while pos < len(text):
            m = _DURATION_PART.match(text, pos)
            if not m or m.end() == pos:
                raise UsageError(f"{option} {value!r} is not a duration: use e.g. 90, 90s, 5m, 1h30m")
            seconds += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
            pos = m.end()
        if not text:
            raise UsageError(f"{option} needs a value such as 90s, 5m or 1h")
    if seconds <= 0:
        raise UsageError(f"{option} must be greater than zero")
    return seconds


def parse_chunk_size(value: str | int | None) -> int | None:
    """An integer ≥ 1, or 'auto' (None)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--chunk-size {value!r}: use a positive integer or 'auto'") from None
    if n < 1:
        raise UsageError(f"--chunk-size {value!r}: use a positive integer or 'auto'")
    return n


def parse_mode(value: str | Mode) -> Mode:
    if isinstance(value, Mode):
        return value
    try:
        return Mode(value.strip().lower())
    except ValueError:
        valid = ", ".join(m.value for m in Mode)
        raise UsageError(f"--mode {value!r}: valid values are {valid}") from None


def parse_names(value: str | list[str] | tuple[str, ...] | None, option: str) -> tuple[str, ...] | None:
    """'a,b' or ['a', 'b'] → ('a', 'b'); None or empty → None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [
        part for item in value for part in item.split(",")]
    names = tuple(n.strip() for n in items if n.strip())
    if not names:
        return None
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise UsageError(f"{option} names {', '.join(sorted(dupes))} more than once")
    return names


def positive(value: float | None, option: str) -> float | None:
    if value is None:
        return None
    if value <= 0:
        raise UsageError(f"{option} must be greater than zero")
    return float(value)


def non_negative(value: float | None, option: str) -> float:
    if value is None:
        return 0.0
    if value < 0:
        raise UsageError(f"{option} must not be negative")
    return float(value)


def pacing(chunk_size: int | str | None, chunk_seconds: float | None, max_rate: float | None,
           sleep: float | None, max_runtime: str | float | None, *,
           min_chunk: int | None = None, max_chunk: int | None = None) -> Pacing:
    """--chunk-size, --chunk-seconds, --min-chunk, --max-chunk, --max-rate, --sleep and
    --max-runtime, checked."""
    from .runner import AUTO_MAX_CHUNK, AUTO_MIN_CHUNK, DEFAULT_CHUNK_SECONDS, Pacing

    lo = AUTO_MIN_CHUNK if min_chunk is None else int(min_chunk)
    hi = max(AUTO_MAX_CHUNK, lo) if max_chunk is None else int(max_chunk)
    if lo < 1:
        raise UsageError("--min-chunk must be 1 or more")
    if hi < lo:
        raise UsageError(f"--max-chunk {hi:,} is below --min-chunk {lo:,}")
    return Pacing(
        chunk_size=parse_chunk_size(chunk_size),
        chunk_seconds=positive(chunk_seconds, "--chunk-seconds") or DEFAULT_CHUNK_SECONDS,
        min_chunk=lo, max_chunk=hi,
        max_rate=positive(max_rate, "--max-rate"),
        sleep=non_negative(sleep, "--sleep"),
        max_runtime=parse_duration(max_runtime, "--max-runtime"),
    )


def retry_policy(retries: int, retry_max_wait: str | float | None) -> RetryPolicy:
    """--retries and --retry-max-wait, checked."""
    from .retry import DEFAULT_RETRY_MAX_WAIT_SECONDS, RetryPolicy

    if retries < 0:
        raise UsageError("--retries must be 0 or more")
    return RetryPolicy(retries=retries, max_wait=parse_duration(
        retry_max_wait, "--retry-max-wait") or DEFAULT_RETRY_MAX_WAIT_SECONDS)


def check_timezone(value: str | None) -> str:
    """--timezone: an IANA name (``Europe/Berlin``) or ``UTC``, the session time zone of
    every connection, so ``now()::date``, timestamp literals and ``date_trunc`` in --where
    mean the same on every run. Default UTC. Bare offsets are refused: PostgreSQL reads
    ``+02:00`` the POSIX way (two hours *west* of Greenwich)."""
    import zoneinfo

    tz = (value or "UTC").strip()
    if tz.upper() in ("UTC", "GMT", "Z"):
        return "UTC"
    known = zoneinfo.available_timezones()
    if tz in known or not known:  # no tz database here: the server judges
        return tz
    near = sorted(n for n in known if n.lower().endswith("/" + tz.lower().split("/")[-1]))
    hint = f" (did you mean {near[0]}?)" if near else ""
    raise UsageError(f"--timezone {tz!r} is not a time zone{hint}: give an IANA name such as "
                     "Europe/Berlin or America/New_York, or UTC (a fixed offset: Etc/GMT-2 is "
                     "two hours east)")


def check_report_path(path: str | Path) -> None:
    """Fail before the run, not after it, when --report cannot be written."""
    import os

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--report {path}: cannot create its directory ({exc.strerror})") from exc
    if path.is_dir() or not os.access(path.parent, os.W_OK):
        raise UsageError(f"--report {path}: not a writable file path")
