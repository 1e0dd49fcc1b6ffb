"""Fields of COPY rows read from their bytes (binary and text format), without a database."""

from __future__ import annotations

import struct

import pytest

from etl.copy_rows import binary_fields, text_fields, unescape_text


def _binary_row(*fields: bytes | None) -> bytes:
    out = struct.pack("!h", len(fields))
    for f in fields:
        out += struct.pack("!i", -1) if f is None else struct.pack("!i", len(f)) + f
    return out


def test_binary_fields_picks_the_wanted_ones_across_nulls_and_empty_values() -> None:
    row = _binary_row(struct.pack("!q", 42), None, b"", "Zoë\t✓".encode(), b"\x00\x01")
    assert binary_fields(row, [0]) == [struct.pack("!q", 42)]
    assert binary_fields(row, [3, 0]) == ["Zoë\t✓".encode(), struct.pack("!q", 42)]
    assert binary_fields(row, [1, 2, 4]) == [None, b"", b"\x00\x01"]
    assert binary_fields(bytearray(row), [4]) == [b"\x00\x01"]


def test_text_fields_split_on_tabs_and_unescape() -> None:
    row = b"1\tab\\tc\\\\d\t\\N\tZo\xc3\xab\n"
    assert text_fields(row, [0, 1, 2, 3]) == ["1", "ab\tc\\d", None, "Zoë"]


@pytest.mark.parametrize(("raw", "plain"), [
    (b"plain", b"plain"),
    (b"a\\nb\\rc\\td\\be\\ff\\vg", b"a\nb\rc\td\be\ff\vg"),
    (b"back\\\\slash", b"back\\slash"),
    (b"\\101\\0102", b"A\x082"),        # octal: up to three digits
    (b"\\x41\\x4a4", b"AJ4"),           # hex: up to two digits
    (b"\\.", b"."),                     # any other escaped character stands for itself
    (b"end\\", b"end\\"),
])
def test_unescape_text(raw: bytes, plain: bytes) -> None:
    assert unescape_text(raw) == plain
