"""The pieces of `etl verify` that need no database: canonical values and key matching."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

from etl.portable import Kind, LogicalType, PortableColumn
from etl.verify.canonical import NULL, canon_for, row_hash, text_of
from etl.verify.parts import Keyed
from etl.verify.step import compare


def test_values_that_a_copy_carries_over_exactly_have_one_canonical_text() -> None:
    assert text_of(Decimal("1.50")) == text_of(Decimal("1.5")) == "1.5"
    assert text_of(Decimal("-0.00")) == "0" and text_of(Decimal("100")) == "100"
    assert text_of(3.0) == text_of(3) == text_of(Decimal("3.000")) == "3"
    assert text_of(0.1) == "0.1" and text_of(float("nan")) == "NaN"
    assert text_of(True) == "t" and text_of(False) == "f" and text_of(1) == "1"
    aware = dt.datetime(2024, 3, 10, 17, 30, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))
    assert text_of(aware) == text_of(dt.datetime(2024, 3, 10, 12, 0)) == "2024-03-10T12:00:00"
    assert text_of(b"\x00\xff") == text_of(memoryview(b"\x00\xff")) == "\\x00ff"
    u = uuid.uuid4()
    assert text_of(u) == str(u)
    assert text_of(None) == NULL and text_of("") != NULL and text_of("NULL") != NULL
    json_col = PortableColumn("j", LogicalType(Kind.JSON))
    assert canon_for(json_col)('{"b": 1,  "a": [1, 2]}') == canon_for(json_col)(
        {"a": [1, 2], "b": 1}) == '{"a":[1,2],"b":1}'
    char_col = PortableColumn("c", LogicalType(Kind.CHAR, length=5))
    assert canon_for(char_col)("ab   ") == canon_for(char_col)("ab")


def test_different_values_hash_differently() -> None:
    assert row_hash(["1", "a"]) != row_hash(["1", "b"])
    assert row_hash(["1", "ab"]) != row_hash(["1a", "b"])  # the separator counts
    assert row_hash([NULL]) != row_hash([""])


def test_compare_names_missing_extra_different_and_duplicate_keys() -> None:
    def k(ident: int, h: int) -> Keyed:
        return Keyed(f"[{ident}]", [ident], h)

    source = [k(1, 10), k(2, 20), k(3, 30), k(4, 40)]
    live, archive = [k(1, 10), k(3, 31)], [k(4, 40), k(1, 10), k(5, 50)]
    found = compare(source, [live, archive])
    assert [x.identity for x in found.missing] == ["[2]"]
    assert [(i, x.identity) for i, x in found.different] == [(0, "[3]")]
    assert [(i, x.identity) for i, x in found.extra] == [(1, "[5]")]
    assert [(i, x.identity) for i, x in found.duplicate] == [(1, "[1]")]
    assert found.matched == 2 and found.count == 4
