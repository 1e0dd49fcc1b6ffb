"""Bisect a chunk that failed with a data error until each bad row stands alone.

The chunk is a key range ``(lo, hi]``. Each attempt writes a sub-range inside
its own savepoint of the chunk's transaction: a range that writes cleanly is
kept; one that fails with a data error is halved (by key, found with the same
keyset walk as chunks) and each half tried again, down to single rows, which
become dead letters. Good rows then commit with the chunk's checkpoint.
Transient and fatal errors are not isolated: they end the attempt as a whole.

When the error says which row of the range failed (PostgreSQL's COPY names the
line of a CHECK, NOT NULL, type or unique violation), the range is cut there
instead of halved: the rows before it go in as one write, the named row is tried
alone, and the rest continues. A bad row then costs one failed attempt instead
of a bisection. The hint is only trusted once per range: a prefix that fails
again is bisected, so a wrong hint costs time, never correctness.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .errors import classify
from .model import Category

K = TypeVar("K")  # a key bound; None stands for "before the first key"


@dataclass
class BadRange(Generic[K]):
    """A range that fails on its own and cannot be split further (one row, or one key value)."""

    lo: K | None
    hi: K
    error: BaseException


@dataclass
class Isolation(Generic[K]):
    good_rows: int = 0
    attempts: int = 0
    bad: list[BadRange[K]] = field(default_factory=list)


def is_data_error(exc: BaseException) -> bool:
    return classify(exc) is Category.DATA


def isolate(lo: K | None, hi: K, rows: int, error: BaseException, *,
            write: Callable[[K | None, K], int],
            split: Callable[[K | None, int], K],
            count: Callable[[K | None, K], int] | None,
            give_up: Callable[[int, BaseException], None] = lambda bad, exc: None,
            locate: Callable[[BaseException], int | None] = lambda exc: None) -> Isolation[K]:
    """Write the good rows of ``(lo, hi]`` (``rows`` rows, whose write failed with ``error``).

    ``write(lo, hi)`` writes a range in a savepoint and returns its row count, or
    raises; ``split(lo, n)`` is the key after which ``n`` rows follow ``lo``;
    ``count(lo, hi)`` counts a range's rows (None when keys are unique, so that the
    first ``n`` rows after ``lo`` are exactly ``n``); ``give_up(bad, error)`` is called with
    the number of bad ranges found so far and may raise to end the isolation early
    (a threshold already crossed: no point in bisecting the rest); ``locate(error)`` is
    the 1-based position of the failing row within the range written, when the error
    says (only used when keys are unique).
    """
    result: Isolation[K] = Isolation()
    # depth-first, left to right, so rows are written in key order
    stack: list[tuple[K | None, K, int, BaseException | None, bool]] = [
        (lo, hi, rows, error, True)]
    while stack:
        a, b, n, failed, trust_hint = stack.pop()
        if n == 0:
            continue
        if failed is None:
            result.attempts += 1
            try:
                result.good_rows += write(a, b)
                continue
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                failed = exc
        if n == 1:
            result.bad.append(BadRange(a, b, failed))
            give_up(len(result.bad), failed)
            continue
        at = locate(failed) if trust_hint and count is None else None
        if at is not None and 1 <= at <= n:
            before = split(a, at - 1) if at > 1 else a
            after = split(before, 1)
            stack.append((after, b, n - at, None, True))
            stack.append((before, after, 1, None, False))
            if before is not None and at > 1:
                stack.append((a, before, at - 1, None, False))
            continue
        mid = split(a, n // 2)
        left = count(a, mid) if count is not None else n // 2
        if left == 0 or left == n:  # all n rows share one key value: it cannot be split
            result.bad.append(BadRange(a, b, failed))
            give_up(len(result.bad), failed)
            continue
        stack.append((mid, b, n - left, None, True))
        stack.append((a, mid, left, None, True))
    return result
