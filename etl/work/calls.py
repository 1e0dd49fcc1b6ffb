"""One call of the user's function: paced under ``max_rate``, retried with backoff and
jitter — only for the exceptions declared transient — and then either a result or a
permanent failure. A transient failure that outlasts its retries ends the run (the items
before it stay committed; a rerun resumes with that item)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import EtlError
from ..model import Category
from ..retry import RetryPolicy, RetryStats
from ..runner import StopFlag

log = logging.getLogger(__name__)

# How long a sleep (a retry's wait, the rate limit's) looks at the stop flag.
STOP_POLL_SECONDS = 0.1


class ItemRetriesExhausted(EtlError):
    """A transient failure of the function outlasted its retries: the run stops (failed),
    the items before it committed; a rerun resumes with this item."""

    category = Category.FATAL


class StoppedWhileRetrying(Exception):
    """Asked to stop while an item waited for its retry: it was not done."""


class Pace:
    """At most ``rate`` items a second, evenly: each call waits its turn (no bursts after a
    pause, retries included — they are calls to the same service)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._next = 0.0

    def wait(self, items: int, stop: StopFlag) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        start = max(now, self._next)
        _sleep_until(start, stop)
        self._next = start + items / self.rate


def _sleep_until(deadline: float, stop: StopFlag) -> None:
    while not stop and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(STOP_POLL_SECONDS, left))


@dataclass
class Called:
    """What one call came to: its value, or the permanent failure, and its attempts."""

    value: Any = None
    error: BaseException | None = None
    attempts: int = 1


class Caller:
    """Calls ``fn`` with the pace and the retry policy of the job."""

    def __init__(self, fn: Callable[[Any], Any], transient: tuple[type[BaseException], ...],
                 policy: RetryPolicy, pace: Pace, stats: RetryStats, stop: StopFlag) -> None:
        self.fn, self.transient, self.policy = fn, transient, policy
        self.pace, self.stats, self.stop = pace, stats, stop

    def __call__(self, arg: Any, items: int, what: str) -> Called:
        from tenacity import (
            RetryError,
            Retrying,
            retry_if_exception_type,
            stop_after_attempt,
            stop_when_event_set,
        )
        from tenacity import wait_exponential_jitter as jittered

        expo = jittered(multiplier=self.policy.base, max=self.policy.max_wait,
                        jitter=self.policy.base)
        attempts = 0

        def once() -> Any:
            nonlocal attempts
            self.pace.wait(items, self.stop)
            attempts += 1
            return self.fn(arg)

        def wait(state: Any) -> float:
            exc = state.outcome.exception() if state.outcome else None
            asked = getattr(exc, "retry_after", None)  # e.g. an HTTP 429's Retry-After
            try:
                floor = float(asked) if asked is not None else 0.0
            except (TypeError, ValueError):
                floor = 0.0
            return min(max(expo(state), floor), max(self.policy.max_wait, floor))

        def before_sleep(state: Any) -> None:
            exc = state.outcome.exception() if state.outcome else None
            reason = type(exc).__name__
            self.stats.add(reason)
            log.warning("%s failed (transient, %s: %s); retry %d of %d in %.2fs", what, reason,
                        " ".join(str(exc).split())[:200], state.attempt_number,
                        self.policy.retries, state.next_action.sleep if state.next_action
                        else 0.0)

        retrying = Retrying(
            retry=retry_if_exception_type(self.transient) if self.transient
            else retry_if_exception_type(()),
            stop=stop_after_attempt(self.policy.retries + 1) | stop_when_event_set(
                self.stop.event),
            wait=wait, before_sleep=before_sleep, reraise=True,
            sleep=lambda seconds: _sleep_until(time.monotonic() + seconds, self.stop))
        try:
            return Called(retrying(once), None, attempts)
        except (KeyboardInterrupt, SystemExit):
            raise
        except RetryError as exc:  # pragma: no cover - reraise=True hands over the error
            raise ItemRetriesExhausted(f"{what}: {exc}") from exc
        except BaseException as exc:
            if self.transient and isinstance(exc, self.transient) and self.stop:
                raise StoppedWhileRetrying(what) from exc
            if self.transient and isinstance(exc, self.transient):
                raise ItemRetriesExhausted(
                    f"{what} still failed after {attempts} attempt(s) ({type(exc).__name__}: "
                    f"{' '.join(str(exc).split())[:300]}); the items before it are committed "
                    "— rerun when the service is back to resume with this one") from exc
            return Called(None, exc, attempts)


__all__ = ["Called", "Caller", "ItemRetriesExhausted", "Pace", "StoppedWhileRetrying"]
