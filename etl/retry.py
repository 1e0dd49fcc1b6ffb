"""Transient-only retries of one chunk: exponential backoff with jitter, each retry logged.

Only failures that classify as transient (SPEC.md "Errors": lost connections,
admin shutdown, serialization failures, deadlocks, lock timeouts, too many
connections, read-only after a failover) are retried; data and fatal errors
pass through at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .errors import classify, sqlstate_of
from .model import Category

log = logging.getLogger(__name__)

T = TypeVar("T")

# SPEC.md defaults: 5 attempts in all, 0.1 s base, 30 s cap.
DEFAULT_RETRIES = 4
DEFAULT_RETRY_BASE_SECONDS = 0.1
DEFAULT_RETRY_MAX_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a chunk is retried after a transient failure."""

    retries: int = DEFAULT_RETRIES            # tries after the first one
    base: float = DEFAULT_RETRY_BASE_SECONDS
    max_wait: float = DEFAULT_RETRY_MAX_WAIT_SECONDS


@dataclass
class RetryStats:
    """Retries made so far in a run, by SQLSTATE (or exception class)."""

    total: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str) -> None:
        self.total += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1


def is_transient(exc: BaseException) -> bool:
    return classify(exc) is Category.TRANSIENT


def call(fn: Callable[[], T], policy: RetryPolicy, stats: RetryStats, what: str,
         should_stop: Callable[[], bool] = lambda: False) -> T:
    """``fn()``, retried on transient failures; the last failure is raised as it is."""
    from tenacity import (
        RetryCallState,
        Retrying,
        retry_if_exception,
        stop_after_attempt,
        wait_exponential_jitter,
    )

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        assert exc is not None
        reason = sqlstate_of(exc) or type(exc).__name__
        stats.add(reason)
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s failed (transient, %s: %s); retry %d of %d in %.2fs", what, reason,
                    " ".join(str(exc).split())[:200], state.attempt_number, policy.retries, wait)

    def stop_now(state: RetryCallState) -> bool:
        return stop_after_attempt(policy.retries + 1)(state) or should_stop()

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_now,
        wait=wait_exponential_jitter(multiplier=policy.base, max=policy.max_wait, jitter=policy.base),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(fn)
