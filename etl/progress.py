"""Progress on stderr: a live rich bar on a TTY, milestone lines otherwise.

Milestones: 25/50/75/100 % of the (estimated) total, and at least every
``MILESTONE_EVERY_SECONDS`` while rows keep moving.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TextIO, TypeAlias

# SPEC.md: milestone lines at least every 30 s when not on a TTY.
MILESTONE_EVERY_SECONDS = 30.0
_MILESTONES = (25, 50, 75, 100)


class Progress(Protocol):
    def start(self, label: str, done: int, total: int, exact: bool) -> None: ...
    def advance(self, rows: int, nbytes: int) -> None: ...
    def finish(self, message: str) -> None: ...
    # optional: ``retotal(total)``, a better estimate of the total rows (an `etl load` of
    # text files refines it from the bytes a row measured so far and the bytes left)


class NoProgress:
    def start(self, label: str, done: int, total: int, exact: bool) -> None:
        pass

    def advance(self, rows: int, nbytes: int) -> None:
        pass

    def finish(self, message: str) -> None:
        pass


def _fmt_eta(seconds: float) -> str:
    if seconds <= 0 or seconds != seconds or seconds == float("inf"):
        return "--"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _Rates:
    """Rows and bytes done in this run, and the rates since it started."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.rows = 0
        self.bytes = 0

    def add(self, rows: int, nbytes: int) -> None:
        self.rows += rows
        self.bytes += nbytes

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.t0, 1e-9)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.elapsed

    @property
    def mb_per_s(self) -> float:
        return self.bytes / self.elapsed / 1e6


class LineProgress:
    """Milestone lines for logs and cron mail."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.label = ""
        self.done = 0
        self.total = 0
        self.exact = True
        self.rates = _Rates()
        self._next_milestone = 0
        self._last_line = time.monotonic()

    def start(self, label: str, done: int, total: int, exact: bool) -> None:
        self.label, self.done, self.total, self.exact = label, done, max(total, done), exact
        self.rates = _Rates()
        pct = self._pct()
        self._next_milestone = next((i for i, m in enumerate(_MILESTONES) if m > pct), len(_MILESTONES))
        about = "" if exact else "~"
        self._emit(f"{label}: starting, {done:,} of {about}{self.total:,} rows done")

    def _pct(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    def advance(self, rows: int, nbytes: int) -> None:
        self.done += rows
        self.total = max(self.total, self.done)
        self.rates.add(rows, nbytes)
        pct = self._pct()
        crossed = False
        while self._next_milestone < len(_MILESTONES) and pct >= _MILESTONES[self._next_milestone]:
            self._next_milestone += 1
            crossed = True
        if crossed or time.monotonic() - self._last_line >= MILESTONE_EVERY_SECONDS:
            self._emit(self._status_line(pct))

    def retotal(self, total: int) -> None:
        self.total = max(total, self.done)

    def _status_line(self, pct: float) -> str:
        left = max(self.total - self.done, 0)
        eta = left / self.rates.rows_per_s if self.rates.rows_per_s else float("inf")
        about = "" if self.exact else "~"
        return (f"{self.label}: {pct:5.1f}%  {self.done:,}/{about}{self.total:,} rows  "
                f"{self.rates.rows_per_s:,.0f} rows/s  {self.rates.mb_per_s:.1f} MB/s  "
                f"ETA {_fmt_eta(eta)}")

    def finish(self, message: str) -> None:
        self._emit(f"{self.label}: {message}")

    def _emit(self, line: str) -> None:
        self._last_line = time.monotonic()
        print(line, file=self.stream, flush=True)


class BarProgress:
    """A live bar: rows done / estimated total, rows/s, MB/s and ETA."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._progress: Any = None
        self._task: Any = None
        self.rates = _Rates()
        self.label = ""

    def start(self, label: str, done: int, total: int, exact: bool) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        self.label = label
        self.rates = _Rates()
        about = "" if exact else "~"
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.completed:,.0f}/" + about + "{task.total:,.0f} rows"),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=Console(file=self.stream),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(label, total=max(total, done), completed=done,
                                             rate="")

    def advance(self, rows: int, nbytes: int) -> None:
        if self._progress is None or self._task is None:
            return
        self.rates.add(rows, nbytes)
        task = self._progress.tasks[0]
        completed = task.completed + rows
        total = max(task.total or 0, completed)
        rate = f"{self.rates.rows_per_s:,.0f} rows/s {self.rates.mb_per_s:.1f} MB/s"
        self._progress.update(self._task, completed=completed, total=total, rate=rate)

    def retotal(self, total: int) -> None:
        if self._progress is not None and self._task is not None:
            task = self._progress.tasks[0]
            self._progress.update(self._task, total=max(total, int(task.completed)))

    def finish(self, message: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        print(f"{self.label}: {message}", file=self.stream, flush=True)


def make_progress(enabled: bool | None, stream: TextIO | None = None) -> Progress:
    """A bar on a TTY, milestone lines otherwise; ``False`` = silent (``True``/``None`` alike)."""
    stream = stream or sys.stderr
    if enabled is False:
        return NoProgress()
    return BarProgress(stream) if stream.isatty() else LineProgress(stream)


def progress_for(value: ProgressOption) -> Progress:
    """The library's ``progress=`` option: False (silent), True/None (bar or lines on
    stderr), any object with the Progress methods, or a function called with a
    ``ProgressEvent`` at the start, after each chunk and at the end."""
    if value is None or isinstance(value, bool):
        return make_progress(value)
    if not hasattr(value, "advance") and callable(value):
        return CallbackProgress(value)
    return value  # type: ignore[return-value]


@dataclass(frozen=True)
class ProgressEvent:
    """What a progress callback is told: ``kind`` is ``start``, ``chunk`` or ``finish``;
    ``done`` of ``total`` rows (``exact`` False: the total is an estimate), the chunk's
    ``rows`` and ``bytes``, and at the end the summary line in ``message``."""

    kind: str
    label: str
    done: int
    total: int
    exact: bool
    rows: int = 0
    bytes: int = 0
    message: str | None = None


# The library's ``progress=``: False, True/None, a Progress, or a function of ProgressEvent.
ProgressOption: TypeAlias = "bool | Progress | Callable[[ProgressEvent], Any] | None"


class CallbackProgress:
    """Progress handed to a function (a GUI, a log, a notebook widget)."""

    def __init__(self, fn: Callable[[ProgressEvent], Any]) -> None:
        self.fn = fn
        self.label, self.done, self.total, self.exact = "", 0, 0, True

    def start(self, label: str, done: int, total: int, exact: bool) -> None:
        self.label, self.done, self.total, self.exact = label, done, total, exact
        self.fn(ProgressEvent("start", label, done, total, exact))

    def advance(self, rows: int, nbytes: int) -> None:
        self.done += rows
        self.fn(ProgressEvent("chunk", self.label, self.done, max(self.total, self.done),
                              self.exact, rows, nbytes))

    def retotal(self, total: int) -> None:
        self.total = total

    def finish(self, message: str) -> None:
        self.fn(ProgressEvent("finish", self.label, self.done, max(self.total, self.done),
                              self.exact, message=message))


class OneOfMany:
    """The progress of one table among several: its lines say which, ``[2/11] copy …``."""

    def __init__(self, inner: Progress, index: int, count: int) -> None:
        self.inner = inner
        self.prefix = f"[{index}/{count}] "

    def start(self, label: str, done: int, total: int, exact: bool) -> None:
        self.inner.start(self.prefix + label, done, total, exact)

    def advance(self, rows: int, nbytes: int) -> None:
        self.inner.advance(rows, nbytes)

    def retotal(self, total: int) -> None:
        retotal = getattr(self.inner, "retotal", None)
        if retotal is not None:
            retotal(total)

    def finish(self, message: str) -> None:
        self.inner.finish(self.prefix + message)
