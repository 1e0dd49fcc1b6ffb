"""--max-errors and --max-error-rate: when too many rows fail, stop instead of going on."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ThresholdExceededError, UsageError

# SPEC.md: --max-error-rate defaults to 0.05, judged after at least 1,000 rows.
DEFAULT_MAX_ERROR_RATE = 0.05
MIN_ROWS_FOR_RATE = 1_000


@dataclass(frozen=True)
class ErrorLimits:
    """How many failed (dead-lettered) rows a job tolerates, counted over the whole job."""

    max_errors: int | None = None
    max_error_rate: float | None = DEFAULT_MAX_ERROR_RATE

    def __post_init__(self) -> None:
        if self.max_errors is not None and self.max_errors < 0:
            raise UsageError("--max-errors must be 0 or more")
        if self.max_error_rate is not None and not 0 <= self.max_error_rate <= 1:
            raise UsageError("--max-error-rate must be between 0 and 1 (0.05 = 5 %)")

    def check(self, failed: int, processed: int, last_error: str | None = None) -> None:
        """Raise ThresholdExceededError when ``failed`` of ``processed`` rows is too many."""
        crossed = None
        if self.max_errors is not None and failed > self.max_errors:
            crossed = f"--max-errors {self.max_errors} exceeded: {failed:,} failed rows"
        elif (self.max_error_rate is not None and processed >= MIN_ROWS_FOR_RATE
                and failed > self.max_error_rate * processed):
            crossed = (f"--max-error-rate {self.max_error_rate:g} exceeded: {failed:,} failed "
                       f"rows of {processed:,} ({failed / processed:.1%})")
        if crossed:
            cause = f"; last error: {last_error}" if last_error else ""
            raise ThresholdExceededError(
                f"{crossed}; the chunk that crossed it was rolled back{cause}. Fix the cause "
                "(see the report's errors or `etl dlq list`), then rerun to resume")
