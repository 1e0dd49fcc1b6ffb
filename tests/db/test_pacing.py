"""--max-rate, --sleep and auto chunk sizes, observed on real copies (lower bounds only)."""

from __future__ import annotations

import time

import etl
from etl.progress import NoProgress
from tests.conftest import execute, fingerprint


class Chunks(NoProgress):
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def advance(self, rows: int, nbytes: int) -> None:
        self.sizes.append(rows)


def _rows(url: str, n: int) -> None:
    execute(url, f"CREATE TABLE ev (id int PRIMARY KEY, v text); "
                 f"INSERT INTO ev SELECT g, md5(g::text) FROM generate_series(1, {n}) g")


def test_max_rate_caps_rows_per_second(src: str, dst: str) -> None:
    _rows(src, 3000)
    t0 = time.monotonic()
    result = etl.copy(source=src, target=dst, table="ev", max_rate=4000)
    elapsed = time.monotonic() - t0
    assert result.succeeded == 3000
    assert elapsed >= 0.7  # 3,000 rows at 4,000 rows/s: the last chunk may end the run early
    assert result.to_dict()["summary"]["items_per_second"] <= 4000 * 1.05


def test_sleep_between_chunks(src: str, dst: str) -> None:
    _rows(src, 500)
    t0 = time.monotonic()
    result = etl.copy(source=src, target=dst, table="ev", chunk_size=100, sleep=0.2)
    assert result.succeeded == 500 and result.to_dict()["metadata"]["num_chunks"] == 5
    assert time.monotonic() - t0 >= 5 * 0.2


def test_auto_chunks_grow_from_the_first_size(src: str, dst: str) -> None:
    _rows(src, 200_000)
    seen = Chunks()
    result = etl.copy(source=src, target=dst, table="ev", progress=seen)
    assert result.status is etl.Status.COMPLETED
    assert seen.sizes[0] == 20_000 and max(seen.sizes) > 20_000
    assert sum(seen.sizes) == 200_000
    assert fingerprint(dst, "ev") == fingerprint(src, "ev")


def test_no_sleep_after_the_last_short_chunk(src: str, dst: str) -> None:
    _rows(src, 250)
    t0 = time.monotonic()
    result = etl.copy(source=src, target=dst, table="ev", chunk_size=100, sleep=1.0)
    assert result.succeeded == 250
    assert 2.0 <= time.monotonic() - t0 < 2.9  # after chunks 1 and 2, not after chunk 3
