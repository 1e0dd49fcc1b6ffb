"""`etl load` into MySQL/SQLite: CSV fields split as PostgreSQL splits them, and each value
converted to its column's type or refused with PostgreSQL's name for the failure."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from etl.dialects import Kind, LogicalType, PortableColumn
from etl.load_formats import CsvOptions
from etl.load_parse import CsvFields, ndjson_object, python_codec
from etl.load_values import ConversionError, converter


def split(raw: bytes, **options) -> list:
    return CsvFields(CsvOptions(**options)).split(raw)


def test_csv_fields_null_quotes_and_escapes() -> None:
    assert split(b'1,,"",x\r\n') == ["1", None, "", "x"]            # NULL vs empty string
    assert split(b'"a,b","q""uo",ab"c,d"e\n') == ["a,b", 'q"uo', "abc,de"]
    assert split(b'\\N,"\\N"\n', null="\\N") == [None, "\\N"]        # quoted: never NULL
    assert split(b'"a\\"b","c\\d"\n', escape="\\") == ['a"b', "c\\d"]
    assert split(b'"multi\nline"|2\n', delimiter="|") == ["multi\nline", "2"]
    assert split("é;x\n".encode("latin-1"), delimiter=";", encoding="LATIN1") == ["é", "x"]
    for raw, state in [(b'1,"open\n', "22P04"), (b"a\rb\n", "22P04"), (b"\xff\n", "22021")]:
        with pytest.raises(ConversionError) as err:
            split(raw)
        assert err.value.sqlstate == state
    with pytest.raises(Exception, match="ASCII"):
        python_codec("UTF-16")
    assert python_codec("WIN1252") == "cp1252"


def col(kind: Kind, native: str = "X", **kw) -> PortableColumn:
    return PortableColumn("c", LogicalType(kind, **{k: v for k, v in kw.items()
                                                    if k != "unsigned"}),
                          native=native, unsigned=kw.get("unsigned", False))


@pytest.mark.parametrize(("column", "fam", "value", "expected"), [
    (col(Kind.SMALLINT, "TINYINT(4)"), "mysql", " -128 ", -128),
    (col(Kind.SMALLINT, "TINYINT(3) UNSIGNED", unsigned=True), "mysql", "255", 255),
    (col(Kind.NUMERIC, "BIGINT(20) UNSIGNED", precision=20, scale=0, unsigned=True), "mysql",
     str(2**64 - 1), 2**64 - 1),
    (col(Kind.BIGINT, "INTEGER"), "sqlite", 2.0, 2),
    (col(Kind.NUMERIC, precision=6, scale=2), "mysql", "1.005", Decimal("1.01")),
    (col(Kind.NUMERIC, precision=6, scale=2), "sqlite", Decimal("-9999.994"), Decimal("-9999.99")),
    (col(Kind.DOUBLE), "sqlite", "-Infinity", float("-inf")),
    (col(Kind.BOOLEAN), "mysql", "Yes", True),
    (col(Kind.BOOLEAN), "mysql", 0, False),
    (col(Kind.DATE), "mysql", "2024-02-29 00:00:00", dt.date(2024, 2, 29)),
    (col(Kind.TIMESTAMP), "mysql", "2024-01-02T10:00:00.5-02:30",
     dt.datetime(2024, 1, 2, 12, 30, 0, 500000)),
    (col(Kind.TIMESTAMPTZ), "sqlite", "2024-01-02 10:00",
     dt.datetime(2024, 1, 2, 10, tzinfo=dt.UTC)),
    (col(Kind.TIME), "mysql", "23:59:59.25", dt.time(23, 59, 59, 250000)),
    (col(Kind.CHAR, length=3), "mysql", "ab    ", "ab "),
    (col(Kind.TEXT), "sqlite", Decimal("2.50"), "2.50"),
    (col(Kind.BYTES), "mysql", "\\x00ff", b"\x00\xff"),
    (col(Kind.BYTES), "mysql", "a\\\\b\\001", b"a\\b\x01"),
    (col(Kind.JSON), "mysql", {"a": [1, Decimal("2.5")]}, '{"a": [1, 2.5]}'),
    (col(Kind.TEXT, ""), "sqlite", 7, 7),  # an untyped SQLite column: as it is
])
def test_values_convert_exactly(column, fam, value, expected) -> None:
    got = converter(column, fam)(value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(("column", "fam", "value", "state"), [
    (col(Kind.INTEGER, "INT(11)"), "mysql", "1x", "22P02"),
    (col(Kind.INTEGER, "INT(11)"), "mysql", "2147483648", "22003"),
    (col(Kind.INTEGER, "INT(11)"), "mysql", "١٢", "22P02"),  # not ASCII digits
    (col(Kind.BIGINT, "INTEGER"), "sqlite", "9" * 5000, "22003"),
    (col(Kind.BIGINT, "INTEGER"), "sqlite", True, "22P02"),
    (col(Kind.NUMERIC, precision=4, scale=2), "mysql", "99.995", "22003"),  # rounds to 100.00
    (col(Kind.NUMERIC, precision=4, scale=2), "mysql", "1_0", "22P02"),
    (col(Kind.DOUBLE), "mysql", "NaN", "22003"),
    (col(Kind.DOUBLE), "sqlite", "nan", "22003"),
    (col(Kind.REAL), "mysql", "1e39", "22003"),
    (col(Kind.BOOLEAN), "sqlite", "2", "22P02"),
    (col(Kind.DATE), "sqlite", "31/31/2024", "22007"),
    (col(Kind.DATE), "sqlite", "2024-02-30", "22008"),
    (col(Kind.DATE), "sqlite", "2024-01-02 10:00", "22007"),  # a time of day is not dropped
    (col(Kind.TIME), "mysql", "10:00+02", "22007"),
    (col(Kind.VARCHAR, length=3), "sqlite", "abcd", "22001"),
    (col(Kind.JSON), "sqlite", "not json", "22P02"),
    (col(Kind.UUID), "sqlite", "nope", "22P02"),
    (col(Kind.BYTES), "sqlite", "\\xzz", "22P02"),
])
def test_values_that_do_not_convert_are_refused(column, fam, value, state) -> None:
    with pytest.raises(ConversionError) as err:
        converter(column, fam)(value)
    assert err.value.sqlstate == state


def test_ndjson_lines() -> None:
    assert ndjson_object(b'{"n": 0.10, "big": 12345678901234567890}\n') == {
        "n": Decimal("0.10"), "big": 12345678901234567890}
    for raw, state in [(b"[1]", "22023"), (b'{"a": NaN}', "22P02"), (b"{", "22P02")]:
        with pytest.raises(ConversionError) as err:
            ndjson_object(raw)
        assert err.value.sqlstate == state
