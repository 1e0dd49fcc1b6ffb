"""The isolation algorithm over an in-memory table: every good row written once, every bad
row found alone, with and without the server's hint of which row failed (right or wrong)."""

from __future__ import annotations

import random

import psycopg.errors
import pytest

from etl.isolate import isolate


class Table:
    """Rows 1..n, keyed by their number; a write of (lo, hi] fails on the first bad row."""

    def __init__(self, n: int, bad: set[int], hint: str) -> None:
        self.n, self.bad, self.hint = n, bad, hint
        self.written: list[int] = []
        self.writes = 0

    def write(self, lo: int | None, hi: int) -> int:
        self.writes += 1
        rows = range((lo or 0) + 1, hi + 1)
        for pos, row in enumerate(rows, start=1):
            if row in self.bad:
                exc = psycopg.errors.CheckViolation(f"row {row}")
                exc.line = {"right": pos, "wrong": len(rows), "none": None}[self.hint]  # type: ignore[attr-defined]
                raise exc
        self.written.extend(rows)
        return len(rows)

    def split(self, lo: int | None, n: int) -> int:
        return (lo or 0) + n

    def first_error(self) -> BaseException:
        try:
            self.write(None, self.n)
        except Exception as exc:
            return exc
        raise AssertionError("no bad row")


@pytest.mark.parametrize("hint", ["right", "wrong", "none"])
@pytest.mark.parametrize("bad", [{1}, {5_000}, {10_000}, {2, 3, 4}, {17, 4_000, 4_001, 9_999},
                                 set(random.Random(7).sample(range(1, 10_001), 40))])
def test_every_good_row_once_every_bad_row_alone(hint: str, bad: set[int]) -> None:
    table = Table(10_000, bad, hint)
    found = isolate(None, table.n, table.n, table.first_error(), write=table.write,
                    split=table.split, count=None, locate=lambda exc: exc.line)  # type: ignore[attr-defined]
    assert sorted(table.written) == [r for r in range(1, table.n + 1) if r not in bad]
    assert len(table.written) == len(set(table.written))
    assert sorted(b.hi for b in found.bad) == sorted(bad)
    assert all(b.hi == (b.lo or 0) + 1 for b in found.bad)  # each bad range is one row
    assert found.good_rows == table.n - len(bad)


def test_a_right_hint_costs_three_writes_per_bad_row() -> None:
    hinted = Table(100_000, {31_337}, "right")
    isolate(None, hinted.n, hinted.n, hinted.first_error(), write=hinted.write,
            split=hinted.split, count=None, locate=lambda exc: exc.line)  # type: ignore[attr-defined]
    bisected = Table(100_000, {31_337}, "none")
    isolate(None, bisected.n, bisected.n, bisected.first_error(), write=bisected.write,
            split=bisected.split, count=None)
    assert hinted.writes - 1 == 3  # prefix, the row alone, the rest
    assert bisected.writes - 1 > 15  # halving down to one row
