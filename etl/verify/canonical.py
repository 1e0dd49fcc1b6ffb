"""The canonical text of a value, a row and a key, the same whichever database read it.

``etl verify`` compares two databases of different kinds (PostgreSQL and MariaDB, say)
value by value in Python: each side's rows are read as the Python values ``etl copy``
reads (``etl.sources.sqla``: Decimal, aware UTC datetimes, bytes …) and each value is
written in one canonical text, so that what a copy carried over exactly compares equal:

- numbers by value: ``1.50`` and ``1.5`` are the same decimal, ``-0`` is ``0``; floats by
  their shortest exact ``repr``; booleans as ``t``/``f`` (MySQL's TINYINT(1) 0/1 were
  turned into booleans when the column says BOOLEAN);
- datetimes with a zone at UTC, without it (so a PostgreSQL timestamptz equals the UTC
  DATETIME it was copied into); dates and times in ISO form;
- bytes as ``\\x`` hex; json (and arrays) as compact JSON with sorted keys, from the
  value or from its text; CHAR(n) without its trailing blanks (MySQL strips them);
- NULL as a marker no text can equal.

A row's hash is 64 bits of BLAKE2b over its values' canonical texts; a range's checksum
is the sum of its rows' hashes modulo 2**64, so it does not depend on the order rows
arrive in and the ranges of several tables (a source and its archive) simply add up.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal
from hashlib import blake2b
from typing import Any

from ..portable import Kind, PortableColumn

NULL = "\x00NULL"  # no database text holds a NUL byte, so no value reads as this
FIELD_SEPARATOR = "\x1f"  # between a row's values, before hashing
HASH_BYTES = 8
HASH_MODULUS = 1 << (8 * HASH_BYTES)

Canon = Callable[[Any], str]


def text_of(v: Any) -> str:
    """The canonical text of one value read from any database."""
    fast = _BY_TYPE.get(type(v))
    if fast is not None:
        return fast(v)
    if v is None:
        return NULL
    if isinstance(v, bool):
        return "t" if v else "f"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return v
    if isinstance(v, Decimal):
        return _decimal(v)
    if isinstance(v, float):
        return _float(v)
    if isinstance(v, dt.datetime):
        return _aware_or_naive(v)
    if isinstance(v, (dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return repr(v.total_seconds())
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(v).hex()
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, (dict, list, tuple)):
        return _json(v)
    if isinstance(v, (set, frozenset)):  # MySQL SET
        return ",".join(sorted(str(x) for x in v))
    return str(v)


def _same(v: str) -> str:
    return v


def _decimal(v: Decimal) -> str:
    if not v.is_finite():
        return "NaN" if v.is_nan() else ("Infinity" if v > 0 else "-Infinity")
    if v.is_zero():
        return "0"
    text = str(v)
    if "E" not in text:  # plain digits: only trailing fraction zeros to drop
        return text.rstrip("0").rstrip(".") if "." in text else text
    return format(v.normalize(), "f")


def _float(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "Infinity" if v > 0 else "-Infinity"
    if v == int(v) and abs(v) < 2**53:
        return str(int(v))  # 3.0 as a double and 3 as a numeric are one value
    return repr(v)


def _aware_or_naive(v: dt.datetime) -> str:
    tz = v.tzinfo
    if tz is None:
        return v.isoformat()
    if tz is dt.UTC:  # what the drivers hand over in a UTC session: "…+00:00"
        return v.isoformat()[:-6]
    return v.astimezone(dt.UTC).replace(tzinfo=None).isoformat()


def _json(v: Any) -> str:
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=text_of)


# the common exact types, looked up before the isinstance chain (bool is not int here)
_BY_TYPE: dict[type, Callable[[Any], str]] = {
    str: _same, int: str, bool: lambda v: "t" if v else "f", Decimal: _decimal,
    float: _float, dt.datetime: _aware_or_naive, dt.date: dt.date.isoformat,
    type(None): lambda v: NULL,
}


def _json_from_text(v: Any) -> str:
    if isinstance(v, (str, bytes)):
        try:
            return _json(json.loads(v))
        except ValueError:
            return text_of(v)
    return text_of(v)


def _char(v: Any) -> str:
    return v.rstrip(" ") if isinstance(v, str) else text_of(v)


def canon_for(column: PortableColumn) -> Canon:
    """How this column's values are written canonically (its kind decides a few)."""
    kind = column.type.kind
    if kind in (Kind.JSON, Kind.ARRAY):
        return _json_from_text
    if kind is Kind.CHAR:
        return _char
    return text_of


def row_texts(row: Sequence[Any], canons: Sequence[Canon]) -> list[str]:
    return [c(v) for c, v in zip(canons, row, strict=True)]


def row_hash(texts: Sequence[str]) -> int:
    """64 bits of the row's canonical texts."""
    data = FIELD_SEPARATOR.join(texts).encode("utf-8", "surrogatepass")
    return int.from_bytes(blake2b(data, digest_size=HASH_BYTES).digest(), "big")


def key_text(texts: Sequence[str]) -> str:
    """A key's identity across databases: its canonical values as a JSON array."""
    return json.dumps(list(texts), ensure_ascii=False)


__all__ = ["NULL", "Canon", "canon_for", "key_text", "row_hash", "row_texts", "text_of"]
