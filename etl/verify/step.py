"""One step of ``etl verify``: compare the next key range of the source with the target.

The range is the source's next ``size`` keys after the checkpoint (``after < key <=
upto``); after the source's last key, one open range takes whatever the target holds
beyond it. Each table digests the range (its count and checksum). A target table holding
more than ``RANGE_SLACK`` chunks' rows there narrows the range at its own ``size``-th key,
so no range outgrows a chunk anywhere. When the source's digest and the sum of the
target's differ, the range is drilled into: every row's key and hash on both sides, which
names each key that is **missing** from the target, **extra** in it, **different**
(the row's values differ: the columns are named) or a **duplicate** (in the target
more than once, in one table or in two). The first ``max_keys`` differences are named and
kept in the checkpoint (so a resumed verification still reports them); all are counted.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..model import Category, Checkpoint
from ..report import RowError, utc_now
from ..run_result import add_counts
from ..runner import StepOutcome
from ..state.store import read_checkpoint, write_checkpoint
from .canonical import HASH_MODULUS
from .parts import Keyed, RangeEnd
from .plan import RANGE_SLACK, VerifyPlan

if TYPE_CHECKING:
    from ..jobrun import JobRun
    from .parts import DatabasePart, Digest, Key, ValuesPart

    Part = DatabasePart | ValuesPart

T = TypeVar("T")
KINDS = ("missing", "extra", "different", "duplicate")
ENDED = "ended"          # the watermark's mark: the open range after the source's end is done
LISTED = "differences"   # the watermark's named differences
RANGES = "ranges"        # ... and the ranges they were found in
VALUE_CHARS = 200        # a differing value is shown up to this many characters
MAX_NARROWINGS = 16      # a range is narrowed at most this often
UNCAPPED = 2**62         # "no cap": a digest that counts every row of its range


@dataclass
class Found:
    """The differences of one range."""

    missing: list[Keyed]
    extra: list[tuple[int, Keyed]]
    different: list[tuple[int, Keyed]]
    duplicate: list[tuple[int, Keyed]]
    matched: int

    @property
    def count(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.different) + len(self.duplicate)


def compare(source: Sequence[Keyed], targets: Sequence[Sequence[Keyed]]) -> Found:
    """Which keys of a range are missing, extra, different or duplicated in the target."""
    mine = {k.identity: k for k in source}
    seen: set[str] = set()
    found = Found([], [], [], [], 0)
    for i, rows in enumerate(targets):
        for k in rows:
            if k.identity in seen:
                found.duplicate.append((i, k))
                continue
            seen.add(k.identity)
            theirs = mine.get(k.identity)
            if theirs is None:
                found.extra.append((i, k))
            elif theirs.hash != k.hash:
                found.different.append((i, k))
            else:
                found.matched += 1
    found.missing = [k for ident, k in mine.items() if ident not in seen]
    return found


class VerifyStep:
    """Called by the runner with the checkpoint and a chunk size; returns what it compared."""

    def __init__(self, plan: VerifyPlan, run: JobRun) -> None:
        self.plan = plan
        self.run = run
        self.ranges_drilled = 0
        self.latest: Checkpoint | None = None  # the last checkpoint written (or started from)
        # each table digests its range in a thread of its own: the databases work at once
        self._pool = ThreadPoolExecutor(max_workers=len(plan.parts),
                                        thread_name_prefix="etl-verify")

    def _each(self, fn: Callable[[int, Part], T]) -> list[T]:
        """``fn(i, part)`` for every table (the source first), all at once; the first
        failure is raised once every call has ended (no connection is left mid-statement)."""
        futures = [self._pool.submit(fn, i, p) for i, p in enumerate(self.plan.parts)]
        wait(futures)
        return [f.result() for f in futures]

    def ensure_connected(self) -> None:
        for part in self.plan.parts:
            part.ensure_connected()
        self.run.ensure_connected()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.plan.close()

    def committed(self, cp: Checkpoint) -> Checkpoint | None:
        found = read_checkpoint(self.run.store.conn, cp.job_id, self.plan.spec.state_schema)
        if found is None or found[0].run_id != self.run.run_id or \
                found[0].chunk_index <= cp.chunk_index:
            return None
        return found[0]

    def metadata(self) -> dict[str, Any]:
        """What the report shows of the comparison so far: counts, named keys, ranges."""
        cp = self.latest
        mark = (cp.watermark or {}) if cp is not None else {}
        outcomes = cp.outcomes if cp is not None else {}
        return {"differences": {k: outcomes.get(k, 0) for k in KINDS},
                "matched": outcomes.get("matched", 0),
                "differing_keys": list(mark.get(LISTED, [])),
                "differing_ranges": list(mark.get(RANGES, [])),
                "ranges_drilled": self.ranges_drilled}

    # -- one range ---------------------------------------------------------------------
    def __call__(self, cp: Checkpoint, size: int) -> StepOutcome | None:
        if (cp.watermark or {}).get(ENDED):
            return None
        self.ensure_connected()
        plan = self.plan
        after = plan.source.resume_key(cp)
        cap = size * RANGE_SLACK
        end = plan.source.first_bound(after, size)
        upto, src, theirs = self._digests(after, end, size, cap)
        if end is None and src.rows == 0 and not any(d.rows for d in theirs):
            return None  # nothing after the checkpoint anywhere
        total = sum(d.checksum for d in theirs)
        if src.rows == sum(d.rows for d in theirs) and (total - src.checksum) % HASH_MODULUS == 0:
            found = Found([], [], [], [], src.rows)
        else:
            found = self._drill(after, upto)
        return self._commit(cp, after, upto, found, src.rows, sum(d.rows for d in theirs))

    def _digests(self, after: Key | None, end: RangeEnd | None, size: int, cap: int
                 ) -> tuple[RangeEnd | None, Digest, list[Digest]]:
        """Each table's digest of the range, narrowed until none holds more than ``cap``."""
        plan = self.plan
        reuse = True  # ValuesPart: the source's rows first_bound read are the range's
        for narrowed in range(MAX_NARROWINGS + 1):
            upto = end.key if end is not None else None
            # databases that order a key differently could keep narrowing each other: the
            # last try takes the range as it is, whole (larger than a chunk, still bounded)
            last = narrowed == MAX_NARROWINGS
            limit = UNCAPPED if last else cap

            def digest(i: int, p: Part, upto: Key | None = upto, first: bool = reuse,
                       limit: int = limit) -> Digest:
                return p.digest(after, upto, limit, reuse=first and i == 0)

            src, *theirs = self._each(digest)
            over = [p for p, d in zip(plan.parts, [src, *theirs], strict=True) if d.over]
            if not over or last:
                break
            end = over[0].bound(after, size)
            reuse = False
        return end, src, theirs

    def _drill(self, after: Key | None, end: RangeEnd | None) -> Found:
        upto = end.key if end is not None else None
        self.ranges_drilled += 1
        mine, *theirs = self._each(lambda i, p: p.keyed(after, upto))
        return compare(mine, theirs)

    # -- the checkpoint ----------------------------------------------------------------
    def _commit(self, cp: Checkpoint, after: Key | None, end: RangeEnd | None, found: Found,
                source_rows: int, target_rows: int) -> StepOutcome:
        spec = self.plan.spec
        mark = dict(cp.watermark or {})
        listed: list[dict[str, Any]] = list(mark.get(LISTED, []))
        ranges: list[dict[str, Any]] = list(mark.get(RANGES, []))
        index = cp.chunk_index + 1
        errors: list[RowError] = []
        if found.count:
            room = max(spec.max_keys - len(listed), 0)
            new = self._describe(after, end, found, room)
            listed.extend(new)
            errors = [_row_error(d, index) for d in new]
            if len(ranges) < spec.max_keys:
                ranges.append({"after": cp.last_key_json if cp.last_key is not None else None,
                               "upto": end.json if end is not None else None,
                               "source_rows": source_rows, "target_rows": target_rows,
                               **{k: len(getattr(found, k)) for k in KINDS
                                  if getattr(found, k)}})
        mark.update({LISTED: listed, RANGES: ranges})
        if end is None:
            mark[ENDED] = True
        rows = found.matched + found.count
        counts = {"matched": found.matched, **{k: len(getattr(found, k)) for k in KINDS}}
        new_cp = dataclasses.replace(
            cp, chunk_index=index,
            last_key=end.text if end is not None else cp.last_key,
            last_key_json=end.json if end is not None else cp.last_key_json,
            processed=cp.processed + rows, succeeded=cp.succeeded + found.matched,
            failed=cp.failed + found.count,
            outcomes={k: v for k, v in add_counts(cp.outcomes, counts).items() if v},
            watermark=mark, run_id=self.run.run_id, updated_at=utc_now())
        store = self.run.store.conn
        with store.transaction():
            self.run.assert_lock_held()
            write_checkpoint(store, new_cp, schema=spec.state_schema)
        self.latest = new_cp
        return StepOutcome(new_cp, rows, 0, errors=errors)

    def _describe(self, after: Key | None, end: RangeEnd | None, found: Found,
                  room: int) -> list[dict[str, Any]]:
        """Up to ``room`` of the range's differences, as the report names them."""
        plan = self.plan
        out: list[dict[str, Any]] = []
        src_label = plan.source.label
        for k in found.missing[:room]:
            out.append({"kind": "missing", "key": k.key_json, "table": src_label})
        for i, k in found.extra[:max(room - len(out), 0)]:
            out.append({"kind": "extra", "key": k.key_json, "table": plan.targets[i].label})
        for i, k in found.duplicate[:max(room - len(out), 0)]:
            out.append({"kind": "duplicate", "key": k.key_json, "table": plan.targets[i].label})
        shown = found.different[:max(room - len(out), 0)]
        if shown:
            upto = end.key if end is not None else None
            mine = plan.source.details(after, upto, [k.identity for _, k in shown])
            theirs: dict[int, dict[str, list[str]]] = {}
            for i in sorted({i for i, _ in shown}):
                theirs[i] = plan.targets[i].details(after, upto,
                                                    [k.identity for j, k in shown if j == i])
            for i, k in shown:
                a, b = mine.get(k.identity), theirs[i].get(k.identity)
                cols = ([c for c, x, y in zip(plan.columns, a, b, strict=True) if x != y]
                        if a is not None and b is not None else [])
                out.append({"kind": "different", "key": k.key_json,
                            "table": plan.targets[i].label, "columns": cols,
                            "source": {c: _short(a[plan.columns.index(c)]) for c in cols}
                            if a is not None else {},
                            "target": {c: _short(b[plan.columns.index(c)]) for c in cols}
                            if b is not None else {}})
        return out


def _short(text: str) -> str | None:
    from .canonical import NULL

    if text == NULL:
        return None
    return text if len(text) <= VALUE_CHARS else text[:VALUE_CHARS] + "…"


def message_of(d: dict[str, Any]) -> str:
    """One line for a difference (the report's error message)."""
    kind = d["kind"]
    if kind == "missing":
        return f"in the source ({d['table']}), not in the target"
    if kind == "extra":
        return f"in the target ({d['table']}), not in the source"
    if kind == "duplicate":
        return f"in the target more than once (again in {d['table']})"
    cols = d.get("columns") or []
    if not cols:
        return f"the row differs in {d['table']}"
    shown = "; ".join(f"{c}: source {json.dumps(d['source'].get(c), ensure_ascii=False)}, "
                      f"target {json.dumps(d['target'].get(c), ensure_ascii=False)}"
                      for c in cols[:5])
    more = f" (and {len(cols) - 5} more)" if len(cols) > 5 else ""
    return f"column(s) {', '.join(cols)} differ in {d['table']} — {shown}{more}"


def _row_error(d: dict[str, Any], chunk_index: int) -> RowError:
    return RowError(item_identifier=json.dumps(d["key"], ensure_ascii=False, default=str),
                    error_type=d["kind"], category=Category.DATA.value,
                    error_message=message_of(d), chunk_index=chunk_index)


def listed_errors(cp: Checkpoint) -> list[RowError]:
    """The differences an earlier run of this verification named (it is resuming)."""
    return [_row_error(d, 0) for d in (cp.watermark or {}).get(LISTED, [])]


__all__ = ["ENDED", "KINDS", "Found", "VerifyStep", "compare", "listed_errors", "message_of"]
