"""`etl load` into MySQL/MariaDB and SQLite: a file's rows as Python values, for
``etl.load_values`` to convert.

- CSV: each row's bytes (cut by ``etl.sources.csv_rows.CsvRows``) decoded with a Python
  codec and split into fields as PostgreSQL's CSV COPY splits them: the delimiter, the quote
  (a doubled quote inside quotes, or ``--escape`` before a quote or itself), quoted sections
  anywhere in a field; an **unquoted** field equal to the NULL marker is None, a quoted one
  never is (``""`` is an empty string). Rows without a quote take ``str.split``; the others
  a regular expression (both in C). The standard ``csv`` module cannot be used for the
  values: before Python 3.12 it cannot tell an unquoted empty field from ``""``.
- NDJSON: ``json.loads`` of each line, numbers with a fraction as exact ``Decimal``; the
  line must be an object (a missing key is None, other keys are ignored).
- Parquet: record batches (``iter_batches``; row groups before a resumed row skipped
  through the metadata) turned into rows with pyarrow's ``to_pylist``, nanosecond
  timestamps rounded (durations and times truncated) to microseconds.

Failures are ``ConversionError`` (named as PostgreSQL names them): the row is a dead letter.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError
from .load_formats import CsvOptions
from .load_values import ConversionError
from .sources.csv_rows import Position

if TYPE_CHECKING:
    import pyarrow as pa

    from .sources.parquet_rows import ParquetRows

# Rows decoded from Parquet at once: a few MB of Python values.
BATCH_ROWS = 16_384

# PostgreSQL's encoding names (what --encoding documents) → Python codecs.
_PG_CODECS = {"UTF8": "utf-8", "UNICODE": "utf-8", "LATIN1": "latin-1", "LATIN2": "iso8859-2",
              "LATIN3": "iso8859-3", "LATIN4": "iso8859-4", "LATIN5": "iso8859-9",
              "LATIN6": "iso8859-10", "LATIN7": "iso8859-13", "LATIN8": "iso8859-14",
              "LATIN9": "iso8859-15", "LATIN10": "iso8859-16", "WIN866": "cp866",
              "WIN874": "cp874", "KOI8R": "koi8-r", "KOI8U": "koi8-u", "EUCJP": "euc_jp",
              "EUCKR": "euc_kr", "EUCCN": "gb2312", "SJIS": "shift_jis", "UHC": "cp949",
              "SQLASCII": "ascii"}


def python_codec(name: str) -> str:
    """The Python codec of ``--encoding`` (PostgreSQL's names, or any Python codec name that
    writes ASCII as ASCII: rows are cut at newline bytes)."""
    key = re.sub(r"[-_ ]", "", name.upper())
    found = _PG_CODECS.get(key)
    if found is None:
        win = re.fullmatch(r"(?:WIN|WINDOWS|CP)(125[0-8])", key)
        iso = re.fullmatch(r"ISO8859(\d+)", key)
        found = f"cp{win.group(1)}" if win else f"iso8859-{iso.group(1)}" if iso else name
    try:
        info = codecs.lookup(found)
    except LookupError as exc:
        raise UsageError(f"--encoding {name!r}: not an encoding etl knows (PostgreSQL's names "
                         "such as UTF8, LATIN1, WIN1252, or a Python codec name)") from exc
    sample = ',;|\t"\'\\\r\n azAZ09'
    try:
        ascii_safe = sample.encode(info.name) == sample.encode("ascii")
    except UnicodeError:
        ascii_safe = False
    if not ascii_safe:
        raise UsageError(f"--encoding {name!r}: etl load reads encodings that write ASCII as "
                         "ASCII (UTF-8, LATIN1, WIN1252 …), not UTF-16 or UTF-32")
    return info.name


class CsvFields:
    """Splits one CSV row into fields (see the module)."""

    def __init__(self, options: CsvOptions) -> None:
        self.codec = python_codec(options.encoding)
        self.encoding = options.encoding
        self.delimiter, self.quote, self.null = options.delimiter, options.quote, options.null
        esc = options.escape or options.quote
        d, q, e = (re.escape(c) for c in (options.delimiter, options.quote, esc))
        if esc == options.quote:
            inner = f"(?:[^{q}]|{q}{q})*"
            pair = options.quote * 2
            self._unescape = lambda s: s.replace(pair, options.quote)
        else:  # the escape makes the next quote or escape literal; before others it is itself
            inner = f"(?:[^{q}{e}]|{e}[{q}{e}]|{e}(?![{q}{e}]))*"
            escaped = re.compile(f"{e}([{q}{e}])")
            self._unescape = lambda s: escaped.sub(lambda m: m.group(1), s)
        self._field = re.compile(f"(?:[^{d}{q}\\r\\n]+|{q}{inner}{q})*", re.DOTALL)
        self._section = re.compile(f"{q}({inner}){q}", re.DOTALL)

    def split(self, raw: bytes) -> list[str | None]:
        try:
            text = raw.decode(self.codec)
        except UnicodeDecodeError as exc:
            raise ConversionError(
                "CharacterNotInRepertoire", "22021",
                f"invalid byte sequence for encoding {self.encoding}: "
                f"{raw[exc.start:exc.start + 4].hex(' ')} at byte {exc.start} of the row"
            ) from exc
        text = text.removesuffix("\n").removesuffix("\r")
        q, null = self.quote, self.null
        if q not in text and "\r" not in text:
            return [None if f == null else f for f in text.split(self.delimiter)]
        out: list[str | None] = []
        pos, end = 0, len(text)
        while True:
            m = self._field.match(text, pos)
            assert m is not None  # the pattern matches the empty string
            field, pos = m.group(0), m.end()
            if q in field:  # quoted (in part): never NULL
                out.append(self._section.sub(lambda s: self._unescape(s.group(1)), field))
            else:
                out.append(None if field == null else field)
            if pos >= end:
                return out
            c = text[pos]
            if c == self.delimiter:
                pos += 1
                continue
            if c == q:
                raise ConversionError("BadCopyFileFormat", "22P04",
                                      "unterminated CSV quoted field")
            raise ConversionError("BadCopyFileFormat", "22P04",
                                  f"unquoted {'carriage return' if c == chr(13) else 'newline'} "
                                  "found in data (quote the field)")


def _no_constant(word: str) -> Any:
    raise ValueError(f"{word} is not JSON")


def ndjson_object(raw: bytes) -> dict[str, Any]:
    """One NDJSON line as an object; numbers with a fraction or exponent exact (Decimal)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConversionError("CharacterNotInRepertoire", "22021",
                              f"invalid byte sequence for encoding UTF8 at byte {exc.start}"
                              ) from exc
    try:
        found = json.loads(text, parse_float=Decimal, parse_constant=_no_constant)
    except ValueError as exc:
        raise ConversionError("InvalidTextRepresentation", "22P02",
                              f"invalid input syntax for type json: {exc}") from exc
    if not isinstance(found, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(found),
                                                                          "a scalar")
        raise ConversionError("InvalidParameterValue", "22023",
                              f"the line is {kind}, not a JSON object")
    return found


# -- Parquet -----------------------------------------------------------------------------

def check_parquet_types(path: Path, columns: Sequence[str]) -> None:
    """Refuse, before anything is written, a column whose values Python cannot hold: a
    nanosecond type inside a list or struct (top-level ones are rounded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)

    def nested_ns(t: pa.DataType) -> bool:
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
            return _is_ns(t.value_type) or nested_ns(t.value_type)
        if pa.types.is_struct(t):
            return any(_is_ns(f.type) or nested_ns(f.type) for f in t)
        return False

    for name in columns:
        field = schema.field(name)
        if nested_ns(field.type):
            raise UsageError(f"{path}: column {name!r} has type {field.type}, whose nanosecond "
                             "values etl load cannot read into Python; leave it out with "
                             "--columns")


def _is_ns(t: pa.DataType) -> bool:
    import pyarrow as pa

    return (pa.types.is_timestamp(t) or pa.types.is_duration(t) or pa.types.is_time64(t)) \
        and t.unit == "ns"


def _pylist(column: Any) -> list[Any]:
    import pyarrow as pa
    import pyarrow.compute as pc

    t = column.type
    if pa.types.is_dictionary(t):
        column, t = column.dictionary_decode(), t.value_type
    if _is_ns(t):
        if pa.types.is_timestamp(t):
            column = pc.cast(pc.round_temporal(column, unit="microsecond"),
                             pa.timestamp("us", t.tz))
        elif pa.types.is_duration(t):
            column = pc.cast(column, pa.duration("us"), safe=False)
        else:
            column = pc.cast(column, pa.time64("us"), safe=False)
    return list(column.to_pylist())


def parquet_values(path: Path, start: Position, columns: Sequence[str], *,
                   batch_rows: int = BATCH_ROWS) -> ParquetRows:
    """Rows of one Parquet file from row ``start.offset``, as tuples of Python values in
    ``columns`` order; ``next_row()`` hands them out with their 1-based row number."""
    from .sources.parquet_rows import ParquetRows

    return ParquetRows(path, start, columns, batch_rows=batch_rows, rows_of=_tuples)


def _tuples(batch: Any) -> list[tuple[Any, ...]]:
    return list(zip(*(_pylist(c) for c in batch.columns), strict=True))


__all__ = ["BATCH_ROWS", "CsvFields", "check_parquet_types", "ndjson_object", "parquet_values",
           "python_codec"]
