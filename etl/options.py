"""Parsing and checking option values shared by the library and the CLI."""

from __future__ import annotations

import re

from .errors import UsageError
from .model import Mode

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
