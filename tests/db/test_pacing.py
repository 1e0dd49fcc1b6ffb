"""--max-rate, --sleep and auto chunk sizes, observed on real copies (lower bounds only)."""

from __future__ import annotations

import time

import etl
from etl.progress import NoProgress
from tests.conftest import execute, fingerprint, run_etl


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


class Timed(NoProgress):
    """Each chunk's rows and duration (the time between two chunks' ends)."""

    def __init__(self) -> None:
        self.chunks: list[tuple[int, float]] = []
        self._last = 0.0

    def start(self, label: str, done: int, total: int, exact: bool) -> None:
        self._last = time.monotonic()

    def advance(self, rows: int, nbytes: int) -> None:
        now = time.monotonic()
        self.chunks.append((rows, now - self._last))
        self._last = now


def test_auto_chunks_converge_on_the_target_duration_and_shrink_after_a_slow_chunk(
        src: str, dst: str, caplog) -> None:
    """A steady table (a row trigger on the target sets its pace), then one chunk slowed
    for real by pg_sleep in that trigger: the size settles within 20% of --chunk-seconds,
    then shrinks at once, and each change is logged."""
    _rows(src, 150_000)
    execute(dst, """CREATE TABLE ev (id int PRIMARY KEY, v text);
        CREATE FUNCTION pace() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            FOR i IN 1..25 LOOP NEW.v := md5(NEW.v); END LOOP;
            IF NEW.id = 120000 THEN PERFORM pg_sleep(1.5); END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER pace BEFORE INSERT ON ev FOR EACH ROW EXECUTE FUNCTION pace()""")
    seen = Timed()
    with caplog.at_level("INFO", logger="etl.runner"):
        result = etl.copy(source=src, target=dst, table="ev", chunk_seconds=0.25, progress=seen)
    assert result.ok and sum(r for r, _ in seen.chunks) == 150_000
    ends = []
    total = 0
    for rows, seconds in seen.chunks:
        total += rows
        ends.append((total, rows, seconds))
    slow = next(i for i, (end, _, _) in enumerate(ends) if end >= 120_000)
    assert ends[slow][2] > 1.5  # the slowed chunk
    steady = [s for _, _, s in ends[3:slow]]  # after a few chunks of learning the rate
    assert len(steady) >= 3, ends
    median = sorted(steady)[len(steady) // 2]
    assert abs(median - 0.25) / 0.25 < 0.2, ends
    assert ends[slow + 1][1] < ends[slow][1] / 2, ends  # shrunk at once after the slow one
    assert any("chunk size shrinks" in r.getMessage() and "slow" in r.getMessage()
               for r in caplog.records)


def test_min_and_max_chunk_bound_the_auto_size(src: str, dst: str) -> None:
    _rows(src, 30_000)
    seen = Chunks()
    result = etl.copy(source=src, target=dst, table="ev", min_chunk=500, max_chunk=4000,
                      progress=seen)
    assert result.ok and sum(seen.sizes) == 30_000
    assert seen.sizes[0] == 4000 and max(seen.sizes) == 4000  # the first size is capped too
    out = run_etl("copy", "--source", src, "--target", dst, "--table", "ev", "--restart",
                  "--mode", "upsert", "--min-chunk", "5000", "--max-chunk", "100")
    assert out.returncode == 2 and "--max-chunk 100 is below --min-chunk 5,000" in out.stderr


def test_max_rate_keeps_the_measured_rate_within_10_percent(src: str, dst: str) -> None:
    _rows(src, 8000)
    result = etl.copy(source=src, target=dst, table="ev", chunk_size=500, max_rate=4000)
    rate = result.to_dict()["summary"]["items_per_second"]
    assert result.succeeded == 8000
    assert 0.9 * 4000 <= rate <= 1.1 * 4000, rate
