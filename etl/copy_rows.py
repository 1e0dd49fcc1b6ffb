"""The fields of one row of PostgreSQL COPY data (binary or text format), without decoding it.

A piece of a chunk is kept in memory as the COPY bytes of its rows. When the target
refuses one of them, the row's key is read from those bytes — so the source need
not send its rows in key order, nor be asked where the n-th row of a chunk is.
"""

from __future__ import annotations

# text format escapes (COPY … FORMAT text): backslash + one character
_TEXT_ESCAPES = {ord("b"): b"\b", ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r",
                 ord("t"): b"\t", ord("v"): b"\v", ord("\\"): b"\\"}
_OCTAL = b"01234567"
_HEX = b"0123456789abcdefABCDEF"


def binary_fields(row: bytes | bytearray | memoryview, wanted: list[int]) -> list[bytes | None]:
    """The raw values of fields ``wanted`` (0-based) of a binary COPY row: a 16-bit field
    count, then per field a 32-bit length (-1: NULL) and that many bytes."""
    data = bytes(row)
    count = int.from_bytes(data[0:2], "big", signed=True)
    found: dict[int, bytes | None] = {}
    last = max(wanted)
    pos = 2
    for i in range(min(count, last + 1)):
        length = int.from_bytes(data[pos:pos + 4], "big", signed=True)
        pos += 4
        if i in wanted:
            found[i] = None if length < 0 else data[pos:pos + length]
        pos += max(length, 0)
    return [found.get(i) for i in wanted]


def text_fields(row: bytes | bytearray | memoryview, wanted: list[int]) -> list[str | None]:
    """The values of fields ``wanted`` of a text COPY row (tab-separated, backslash
    escapes, ``\\N`` for NULL), unescaped, as text."""
    fields = bytes(row).rstrip(b"\n").split(b"\t")
    out: list[str | None] = []
    for i in wanted:
        raw = fields[i]
        out.append(None if raw == b"\\N" else unescape_text(raw).decode())
    return out


def unescape_text(raw: bytes) -> bytes:
    """Undo COPY text format escaping: ``\\t``, ``\\n``, ``\\\\``, ``\\123`` (octal), ``\\x4f``."""
    if b"\\" not in raw:
        return raw
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c != 0x5C or i + 1 == n:  # not a backslash (or a trailing one)
            out.append(c)
            i += 1
            continue
        nxt = raw[i + 1]
        if nxt in _TEXT_ESCAPES:
            out += _TEXT_ESCAPES[nxt]
            i += 2
        elif nxt in _OCTAL:
            j = i + 1
            while j < n and j < i + 4 and raw[j] in _OCTAL:
                j += 1
            out.append(int(raw[i + 1:j], 8) & 0xFF)
            i = j
        elif nxt == ord("x") and i + 2 < n and raw[i + 2] in _HEX:
            j = i + 2
            while j < n and j < i + 4 and raw[j] in _HEX:
                j += 1
            out.append(int(raw[i + 2:j], 16))
            i = j
        else:  # any other escaped character stands for itself
            out.append(nxt)
            i += 2
    return bytes(out)
