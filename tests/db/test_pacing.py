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
    """Each chunk's rows and duration (the time between two chunks' ends); after chunk
    ``slow_after`` it makes the next chunk slow, through ``on_slow``."""

    def __init__(self, slow_after: int, on_slow) -> None:
        self.chunks: list[tuple[int, float]] = []
        self._last = 0.0
        self.slow_after, self.on_slow = slow_after, on_slow

    def start(self, label: str, done: int, total: int, exact: bool) -> None:
        self._last = time.monotonic()

    def advance(self, rows: int, nbytes: int) -> None:
        now = time.monotonic()
        self.chunks.append((rows, now - self._last))
        if len(self.chunks) == self.slow_after:
            self.on_slow(sum(r for r, _ in self.chunks) + 1)  # the next chunk's first row
        self._last = time.monotonic()


def test_auto_chunks_converge_on_the_target_duration_and_shrink_after_a_slow_chunk(
        src: str, dst: str, caplog) -> None:
    """A steady table (a row trigger on the target sets its pace, whatever the server's
    speed), then one chunk slowed for real by pg_sleep in that trigger: the size settles
    within 20% of --chunk-seconds, then shrinks at once, and each change is logged."""
    _rows(src, 200_000)
    execute(dst, """CREATE TABLE ev (id int PRIMARY KEY, v text);
        CREATE TABLE slow_at (id int);
        INSERT INTO slow_at VALUES (NULL);
        CREATE FUNCTION pace() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            FOR i IN 1..40 LOOP NEW.v := md5(NEW.v); END LOOP;
            IF NEW.id = (SELECT id FROM slow_at) THEN PERFORM pg_sleep(1.5); END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER pace BEFORE INSERT ON ev FOR EACH ROW EXECUTE FUNCTION pace()""")
    seen = Timed(6, lambda row: execute(dst, f"UPDATE slow_at SET id = {row}"))
    with caplog.at_level("INFO", logger="etl.runner"):
        result = etl.copy(source=src, target=dst, table="ev", chunk_seconds=0.2, progress=seen)
    assert result.ok and sum(r for r, _ in seen.chunks) == 200_000
    rows = [r for r, _ in seen.chunks]
    took = [t for _, t in seen.chunks]
    assert len(seen.chunks) >= 8, seen.chunks
    assert took[6] > 1.5  # the slowed chunk
    steady = sorted(took[3:6])  # after three chunks of learning the rate
    assert abs(steady[1] - 0.2) / 0.2 < 0.2, seen.chunks
    assert rows[7] < rows[6] / 2, seen.chunks  # shrunk at once after the slow one
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
