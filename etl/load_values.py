"""`etl load` into MySQL/MariaDB and SQLite: each file value converted, in Python, to what its
target column holds.

PostgreSQL targets parse and convert values themselves (``etl.load_job``); these targets
cannot be trusted to (SQLite stores a bad date as text, MySQL outside strict mode truncates
and zeroes), so every value is converted here, per column, from the reflected type
(``etl.dialects``). A value that does not convert raises ``ConversionError`` — named as
PostgreSQL names the same failure (``InvalidDatetimeFormat``/22007 …) so dead letters read
alike on every target — and its row becomes a dead letter before it reaches the database.

What a value may be: the text of a CSV field; a JSON value of an NDJSON line (str, int,
Decimal, bool, list, dict); a Parquet value as pyarrow gives it (int, float, Decimal,
str, bytes, bool, date, datetime, time, timedelta, list, dict). The accepted forms:

- integers: ``[+-]digits`` (surrounding blanks ignored), an integral float or Decimal;
  range-checked against the column (MySQL TINYINT … BIGINT, UNSIGNED, BIT(n); SQLite 64 bits);
- exact decimals: ``[+-]digits[.digits][e±n]`` as ``Decimal``, rounded half away from zero to
  the column's scale, then checked against its precision (MySQL DECIMAL(p,s));
- floats: the same, and NaN / Infinity / -Infinity (refused where the target cannot store
  them: MySQL stores neither, SQLite turns NaN into NULL); FLOAT (4 bytes) range-checked;
- booleans: t/f, true/false, y/n, yes/no, on/off, 1/0 (any case), a JSON boolean, 0/1;
- dates ``YYYY-MM-DD`` (a datetime at midnight too: a time of day is refused rather than
  dropped); timestamps ``YYYY-MM-DD[ T]HH:MM[:SS[.ffffff]][±HH[:MM]|Z]`` (ISO 8601; a date
  alone is midnight); with --date-format DMY|MDY|YMD also ``05/01/2024`` (``.`` or ``-``
  between the fields, two-digit years as PostgreSQL reads them) in that order. An aware value is converted to UTC (a naive ``timestamp`` column gets
  UTC wall time, as SqlSink writes MySQL); a naive value into a time-zone column is UTC;
- times ``HH:MM[:SS[.ffffff]]`` (an offset is refused); text length-checked against
  varchar(n)/char(n) (trailing blanks beyond n are cut, as PostgreSQL does); bytes from
  PostgreSQL's ``\\x`` hex or its escape form; json kept as its (validated) JSON text;
  uuid in its canonical text. An untyped SQLite column takes the value as it is.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import uuid
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation
from typing import Any

from .dialects import Family, Kind, PortableColumn

Converter = Callable[[Any], Any]

_INT = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_FLOAT_WORDS = {"nan": math.nan, "infinity": math.inf, "+infinity": math.inf,
                "-infinity": -math.inf, "inf": math.inf, "+inf": math.inf, "-inf": -math.inf}
_ISO_DATE = re.compile(r"[0-9]{4}-?[0-9]{2}-?[0-9]{2}")
_TRUE = frozenset({"t", "true", "y", "yes", "on", "1"})
_FALSE = frozenset({"f", "false", "n", "no", "off", "0"})
# Digits a value may have before its int() is not even tried (Python refuses > 4300).
_MAX_INT_DIGITS = 40
# MySQL FLOAT is an IEEE single: the largest finite value it holds.
_FLOAT32_MAX = 3.4028234663852886e38
# MySQL integer types by their first word: bytes of storage.
_MYSQL_INT_BYTES = {"TINYINT": 1, "SMALLINT": 2, "MEDIUMINT": 3, "INT": 4, "INTEGER": 4,
                    "BIGINT": 8}
_KIND_RANGE = {Kind.SMALLINT: 2, Kind.INTEGER: 4, Kind.BIGINT: 8}


class ConversionError(ValueError):
    """A value its column cannot hold: named as PostgreSQL names the failure."""

    def __init__(self, error_type: str, sqlstate: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.sqlstate = sqlstate
        self.message = message

    def __str__(self) -> str:
        return self.message


def _shown(v: Any) -> str:
    text = v if isinstance(v, str) else repr(v)
    return json.dumps(text[:200] + ("…" if len(text) > 200 else ""), ensure_ascii=False)


def _syntax(type_name: str, v: Any) -> ConversionError:
    return ConversionError("InvalidTextRepresentation", "22P02",
                           f"invalid input syntax for type {type_name}: {_shown(v)}")


def _range(type_name: str, v: Any) -> ConversionError:
    return ConversionError("NumericValueOutOfRange", "22003",
                           f"value {_shown(v)} is out of range for type {type_name}")


# -- integers ----------------------------------------------------------------------------

def integer_range(col: PortableColumn, fam: Family) -> tuple[int, int, str] | None:
    """(lowest, highest, type name) the column holds when it is an integer column, from the
    dialect's own type where it says (MySQL's TINYINT … BIGINT, UNSIGNED, BIT(n))."""
    native = col.native.upper()
    word = re.match(r"[A-Z]+", native)
    first = word.group(0) if word else ""
    if fam == "mysql" and first == "BIT":
        bits = re.match(r"BIT\s*\(\s*(\d+)", native)
        n = int(bits.group(1)) if bits else 1
        return 0, 2 ** n - 1, f"bit({n})"
    if fam == "mysql" and first == "YEAR":
        return 0, 2155, "year"
    nbytes = _MYSQL_INT_BYTES.get(first) if fam == "mysql" else None
    if nbytes is None:
        if col.type.kind not in _KIND_RANGE:
            return None
        nbytes = 8 if fam == "sqlite" else _KIND_RANGE[col.type.kind]
        first = "INTEGER" if fam == "sqlite" else str(col.type.kind).upper()
    name = first.lower() + (" unsigned" if col.unsigned else "")
    if col.unsigned:
        return 0, 2 ** (8 * nbytes) - 1, name
    return -(2 ** (8 * nbytes - 1)), 2 ** (8 * nbytes - 1) - 1, name


def _integer(lo: int, hi: int, name: str) -> Converter:
    def convert(v: Any) -> Any:
        if type(v) is int:
            n = v
        elif isinstance(v, str):
            s = v.strip()
            if not _INT.fullmatch(s):
                raise _syntax(name, v)
            if len(s) > _MAX_INT_DIGITS:
                raise _range(name, v)
            n = int(s)
        elif isinstance(v, float) and v.is_integer():
            n = int(v)
        elif isinstance(v, Decimal) and v.is_finite() and v == v.to_integral_value():
            n = int(v)
        else:
            raise _syntax(name, v)
        if not lo <= n <= hi:
            raise _range(name, v)
        return n
    return convert


# -- numbers -----------------------------------------------------------------------------

def _decimal(col: PortableColumn, fam: Family) -> Converter:
    p, s = col.type.precision, col.type.scale
    name = f"numeric({p},{s or 0})" if p is not None else "numeric"
    step = Decimal(1).scaleb(-(s or 0))
    context = Context(prec=(p or 0) + 2, rounding=ROUND_HALF_UP)

    def overflow(v: Any) -> ConversionError:
        return ConversionError("NumericValueOutOfRange", "22003",
                               f"numeric field overflow: {_shown(v)} does not fit {name}")

    def convert(v: Any) -> Any:
        if isinstance(v, Decimal):
            d = v
        elif isinstance(v, str):
            text = v.strip()
            if not _DECIMAL.fullmatch(text):
                raise _syntax(name, v)
            d = Decimal(text)
        elif type(v) is int:
            d = Decimal(v)
        elif isinstance(v, float):
            d = Decimal(repr(v)) if math.isfinite(v) else Decimal("NaN")
        else:
            raise _syntax(name, v)
        if not d.is_finite():
            raise ConversionError("NumericValueOutOfRange", "22003",
                                  f"{_shown(v)}: a {fam} decimal column holds no NaN or "
                                  "infinity")
        if col.unsigned and d < 0:
            raise _range(name + " unsigned", v)
        if p is None:
            return d
        if d and d.adjusted() >= p - (s or 0):
            raise overflow(v)
        try:
            d = d.quantize(step, context=context)
        except InvalidOperation as exc:
            raise overflow(v) from exc
        if d and d.adjusted() >= p - (s or 0):  # rounding carried a digit: 9.995 → 10.00
            raise overflow(v)
        return d
    return convert


def _float(col: PortableColumn, fam: Family) -> Converter:
    single = col.type.kind is Kind.REAL and fam == "mysql"
    name = "real" if col.type.kind is Kind.REAL else "double precision"

    def convert(v: Any) -> Any:
        if isinstance(v, float):
            f = v
        elif isinstance(v, str):
            text = v.strip()
            word = _FLOAT_WORDS.get(text.lower())
            if word is not None:
                f = word
            elif _DECIMAL.fullmatch(text):
                f = float(text)
                if math.isinf(f):
                    raise _range(name, v)
            else:
                raise _syntax(name, v)
        elif type(v) is int or isinstance(v, Decimal):
            f = float(v)
        else:
            raise _syntax(name, v)
        if math.isnan(f) and fam in ("mysql", "sqlite"):
            raise ConversionError("NumericValueOutOfRange", "22003",
                                  f"{_shown(v)}: {'MySQL' if fam == 'mysql' else 'SQLite'} "
                                  "cannot store NaN" + (" (it reads back as NULL)"
                                                        if fam == "sqlite" else ""))
        if math.isinf(f) and fam == "mysql":
            raise ConversionError("NumericValueOutOfRange", "22003",
                                  f"{_shown(v)}: MySQL cannot store infinity")
        if single and abs(f) > _FLOAT32_MAX:
            raise _range("real", v)
        return f
    return convert


def _boolean(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    if isinstance(v, str):
        word = v.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    elif type(v) is int and v in (0, 1):
        return bool(v)
    raise _syntax("boolean", v)


# -- dates and times ---------------------------------------------------------------------

_ORDERED = re.compile(r"([0-9]{1,4})([/.-])([0-9]{1,2})\2([0-9]{1,4})(?=$|[ T])")


def _in_order(text: str, order: str | None) -> str:
    """``text`` with a leading ``05/01/2024`` (or ``05.01.24``, ``05-01-2024``) rewritten as
    an ISO date, its fields read in ``order`` (DMY, MDY or YMD; a four-digit first field is
    a year whatever the order, as PostgreSQL reads it); ``text`` itself without an order."""
    m = _ORDERED.match(text) if order else None
    if m is None:
        return text
    first, second, third = m.group(1), int(m.group(3)), m.group(4)
    if len(first) == 4 or order == "YMD":
        year_text, month, day = first, second, int(third)
    elif order == "DMY":
        year_text, month, day = third, second, int(first)
    else:
        year_text, month, day = third, int(first), second
    year = int(year_text)
    if len(year_text) <= 2:  # PostgreSQL's rule: 70-99 are 19xx, 00-69 are 20xx
        year += 1900 if year >= 70 else 2000
    try:
        found = dt.date(year, month, day)
    except ValueError as exc:
        raise ConversionError("DatetimeFieldOverflow", "22008",
                              f"date/time field value out of range: {_shown(text)} (read as "
                              f"{order}: {exc})") from exc
    return found.isoformat() + text[m.end():]


def _datetime_of(v: str, type_name: str, order: str | None = None) -> dt.datetime:
    text = _in_order(v.strip(), order)
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError as exc:
        if _ISO_DATE.match(text):  # the shape is right, a field is not: 2024-02-30
            raise ConversionError("DatetimeFieldOverflow", "22008",
                                  f"date/time field value out of range: {_shown(v)} "
                                  f"({exc})") from exc
        raise ConversionError("InvalidDatetimeFormat", "22007",
                              f"invalid input syntax for type {type_name}: {_shown(v)} "
                              "(expected ISO 8601: YYYY-MM-DD[ HH:MM:SS[.ffffff][±HH:MM]]"
                              + (f", or the date's fields in {order} order)" if order else
                                 "; --date-format DMY|MDY|YMD reads 05/01/2024)")) from exc


def _date(order: str | None) -> Converter:
    def convert(v: Any) -> Any:
        if isinstance(v, dt.datetime):
            found = v
        elif isinstance(v, dt.date):
            return v
        elif isinstance(v, str):
            found = _datetime_of(v, "date", order)
        else:
            raise _syntax("date", v)
        if found.tzinfo is not None or found.time() != dt.time():
            raise ConversionError("InvalidDatetimeFormat", "22007",
                                  f"{_shown(v)} has a time of day (or a time zone): a date "
                                  "column would drop it; load it into a datetime column")
        return found.date()
    return convert


def _timestamp(aware: bool, order: str | None) -> Converter:
    name = "timestamp with time zone" if aware else "timestamp"

    def convert(v: Any) -> Any:
        if isinstance(v, dt.datetime):
            found = v
        elif isinstance(v, dt.date):
            found = dt.datetime(v.year, v.month, v.day)
        elif isinstance(v, str):
            found = _datetime_of(v, name, order)
        else:
            raise _syntax(name, v)
        if found.tzinfo is not None:
            try:
                found = found.astimezone(dt.UTC)
            except OverflowError as exc:
                raise ConversionError("DatetimeFieldOverflow", "22008",
                                      f"{_shown(v)} is out of range in UTC") from exc
            return found if aware else found.replace(tzinfo=None)
        return found.replace(tzinfo=dt.UTC) if aware else found
    return convert


def _time(v: Any) -> Any:
    if isinstance(v, dt.timedelta):
        return v
    if isinstance(v, dt.time) and v.tzinfo is None:
        return v
    if isinstance(v, str):
        try:
            found = dt.time.fromisoformat(v.strip())
        except ValueError as exc:
            raise ConversionError("InvalidDatetimeFormat", "22007",
                                  f"invalid input syntax for type time: {_shown(v)} "
                                  "(expected HH:MM[:SS[.ffffff]])") from exc
        if found.tzinfo is None:
            return found
    raise ConversionError("InvalidDatetimeFormat", "22007",
                          f"{_shown(v)}: a time column holds no time zone")


# -- text, bytes, json, uuid ---------------------------------------------------------------

def text_of(v: Any) -> str:
    """A non-text value's text (a JSON number, a boolean, a Parquet date …)."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return json_text(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(v).hex()
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    return str(v)


def _text(col: PortableColumn) -> Converter:
    n = col.type.length if col.type.kind in (Kind.VARCHAR, Kind.CHAR) else None
    name = f"{'character varying' if col.type.kind is Kind.VARCHAR else 'character'}({n})"

    def convert(v: Any) -> Any:
        s = v if isinstance(v, str) else text_of(v)
        if n is not None and len(s) > n:
            if s[n:].strip(" "):
                raise ConversionError("StringDataRightTruncation", "22001",
                                      f"value too long for type {name}: {len(s)} characters, "
                                      f"{_shown(s)}")
            s = s[:n]
        return s
    return convert


def _bytes(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if not isinstance(v, str):
        raise _syntax("bytea", v)
    if v.startswith("\\x"):
        try:
            return bytes.fromhex(v[2:])
        except ValueError as exc:
            raise _syntax("bytea", v) from exc
    if "\\" not in v:
        return v.encode("utf-8")
    out = bytearray()
    i = 0
    while i < len(v):  # PostgreSQL's escape form: \\ and \ooo, other bytes as they are
        c = v[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
        elif v[i + 1:i + 2] == "\\":
            out.append(0x5C)
            i += 2
        elif re.fullmatch(r"[0-3][0-7]{2}", v[i + 1:i + 4]):
            out.append(int(v[i + 1:i + 4], 8))
            i += 4
        else:
            raise _syntax("bytea", v)
    return bytes(out)


def _json_default(v: Any) -> Any:
    if isinstance(v, Decimal):  # a JSON number parsed exactly: written back as a number
        return int(v) if v.as_tuple().exponent == 0 else float(v)
    from .sql_copy_io import jsonable

    return jsonable(v)


def json_text(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, default=_json_default)


def _json(v: Any) -> Any:
    if isinstance(v, str):
        try:
            json.loads(v)
        except ValueError as exc:
            raise ConversionError("InvalidTextRepresentation", "22P02",
                                  f"invalid input syntax for type json: {_shown(v)} ({exc})"
                                  ) from exc
        return v
    return json_text(v)


def _uuid(v: Any) -> Any:
    if isinstance(v, uuid.UUID):
        return str(v)
    try:
        return str(uuid.UUID(str(v).strip()))
    except ValueError as exc:
        raise _syntax("uuid", v) from exc


def _as_is(v: Any) -> Any:
    return json_text(v) if isinstance(v, (dict, list)) else v


def converter(col: PortableColumn, fam: Family, date_order: str | None = None) -> Converter:
    """The conversion of a file value (never None) into what ``col`` holds; raises
    ``ConversionError``. ``date_order`` (--date-format DMY, MDY or YMD) also reads dates
    written ``05/01/2024``."""
    kind = col.type.kind
    if fam == "sqlite" and col.native in ("", "NullType()"):
        return _as_is  # an untyped SQLite column holds any value
    if kind is not Kind.BOOLEAN:
        bounds = integer_range(col, fam)
        if bounds is not None and (kind in _KIND_RANGE or fam == "mysql"):
            return _integer(*bounds)
    if kind is Kind.BOOLEAN:
        return _boolean
    if kind is Kind.NUMERIC:
        return _decimal(col, fam)
    if kind in (Kind.REAL, Kind.DOUBLE):
        return _float(col, fam)
    if kind is Kind.DATE:
        return _date(date_order)
    if kind in (Kind.TIMESTAMP, Kind.TIMESTAMPTZ):
        return _timestamp(kind is Kind.TIMESTAMPTZ, date_order)
    if kind is Kind.TIME:
        return _time
    if kind is Kind.BYTES:
        return _bytes
    if kind is Kind.JSON:
        return _json
    if kind is Kind.UUID:
        return _uuid
    return _text(col)  # text, varchar, char, enum, set (the database checks the labels)


__all__ = ["ConversionError", "Converter", "converter", "integer_range", "json_text",
           "text_of"]
