"""Transforms: a plain function that reshapes each chunk as a ``polars.DataFrame``.

The contract, for ``--transform module:function`` and ``etl.copy(transform=fn)``:

- the function takes a DataFrame (the chunk's rows, in key order, with the
  source's column names) and returns a DataFrame;
- to **reject** rows, return them with a reason (a string) in the column
  ``_reject``; rows whose ``_reject`` is not null become dead letters with
  category ``validation`` and are not written;
- rows left out of the result altogether are counted as ``skipped`` (dropped by
  the transform), never lost silently;
- the key columns must come back unchanged (they tie each row to its source row
  and its checkpoint); the result's columns are written to the target's columns
  of the same names.

A transform that raises on a chunk is called again on halves of it, down to
single rows: rows on which it raises on their own are rejected with the
exception as the reason, so one odd row does not stop the run (and a transform
that fails on everything is stopped by the error thresholds).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EtlError, UsageError
from .model import Category
from .portable import Kind, PortableColumn

if TYPE_CHECKING:
    import polars as pl

REJECT_COLUMN = "_reject"

Transform = Callable[["pl.DataFrame"], "pl.DataFrame"]


class TransformError(EtlError):
    """The transform broke its contract (wrong return type, changed or missing keys)."""

    exit_code = 1
    category = Category.FATAL


def load(spec: str) -> Transform:
    """The function named by ``module:function`` (``module`` importable, or a ``.py`` path)."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise UsageError(f"--transform {spec!r}: expected module:function "
                         "(e.g. mytransforms:clean_orders or ./fix.py:clean)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            spec_obj = importlib.util.spec_from_file_location(path.stem, path)
            if spec_obj is None or spec_obj.loader is None or not path.is_file():
                raise FileNotFoundError(str(path))
            module = importlib.util.module_from_spec(spec_obj)
            spec_obj.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except (ImportError, FileNotFoundError, SyntaxError) as exc:
        raise UsageError(f"--transform {spec!r}: cannot load {module_name}: {exc}") from exc
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise UsageError(f"--transform {spec!r}: {module_name} has no function {func_name}")
    return fn  # type: ignore[no-any-return]


@dataclass
class Applied:
    """What a transform made of one chunk."""

    kept: pl.DataFrame                   # rows to write (without the _reject column)
    rejected: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # (key, reason)
    dropped: int = 0                     # rows neither kept nor rejected


def apply(fn: Transform, df: pl.DataFrame, key: tuple[str, ...], name: str) -> Applied:
    """Run ``fn`` on ``df``; isolate rows it raises on; check the result's contract."""
    import polars as pl

    outputs: list[pl.DataFrame] = []
    rejected: list[tuple[dict[str, Any], str]] = []
    _run_isolating(fn, df, key, name, outputs, rejected)
    if outputs:
        out = pl.concat(outputs, how="diagonal_relaxed")
    else:
        out = df.clear()
    if REJECT_COLUMN in out.columns:
        bad = out.filter(pl.col(REJECT_COLUMN).is_not_null())
        rejected.extend((dict(zip(key, k, strict=True)), str(reason)) for *k, reason in
                        bad.select([*key, REJECT_COLUMN]).iter_rows())
        out = out.filter(pl.col(REJECT_COLUMN).is_null()).drop(REJECT_COLUMN)
    _check_keys(df, out, rejected, key, name)
    return Applied(out, rejected, df.height - out.height - len(rejected))


def frame(rows: Sequence[tuple[Any, ...]], columns: Sequence[PortableColumn]) -> pl.DataFrame:
    """Rows of canonical values (``etl.dialects``) as a DataFrame with the columns' names.

    A column gets the polars type of its kind (numbers, text, bytes, dates, times and
    timestamps) when that type holds every value of the rows exactly; otherwise (a value
    polars would round, an unbounded decimal, an array, a MySQL TIME beyond one day …) it is
    a column of the Python values themselves (``pl.Object``), so nothing changes on the way
    through a transform that leaves it alone.
    """
    import polars as pl

    series = []
    for i, col in enumerate(columns):
        values = [r[i] for r in rows]
        dtype = _polars_type(col)
        try:
            s = pl.Series(col.name, values, dtype=dtype, strict=True)
            exact = s.dtype == dtype and s.to_list() == values
        except (TypeError, ValueError, OverflowError, pl.exceptions.PolarsError):
            exact = False
        series.append(s if exact else pl.Series(col.name, values, dtype=pl.Object))
    return pl.DataFrame(series)


def _polars_type(col: PortableColumn) -> Any:
    import polars as pl

    t = col.type
    if t.kind is Kind.NUMERIC:
        # polars decimals hold at most 38 digits, with a fixed scale; Python floats are doubles
        if t.precision is not None and t.precision <= 38:
            return pl.Decimal(t.precision, t.scale or 0)
        return pl.Object
    simple = {Kind.SMALLINT: pl.Int16, Kind.INTEGER: pl.Int32, Kind.BIGINT: pl.Int64,
              Kind.BOOLEAN: pl.Boolean, Kind.REAL: pl.Float64, Kind.DOUBLE: pl.Float64,
              Kind.BYTES: pl.Binary, Kind.DATE: pl.Date, Kind.TIME: pl.Time,
              Kind.TIMESTAMP: pl.Datetime("us"), Kind.TIMESTAMPTZ: pl.Datetime("us", "UTC")}
    if t.kind in simple:
        return simple[t.kind]
    if t.kind in (Kind.TEXT, Kind.VARCHAR, Kind.CHAR, Kind.ENUM, Kind.SET, Kind.JSON, Kind.UUID):
        return pl.String
    return pl.Object


def _run_isolating(fn: Transform, df: pl.DataFrame, key: tuple[str, ...], name: str,
                   outputs: list[pl.DataFrame], rejected: list[tuple[dict[str, Any], str]]) -> None:
    import polars as pl

    try:
        out = fn(df)
    except Exception as exc:  # the user's code: isolate the rows it fails on
        if df.height <= 1:
            for row in df.select(list(key)).iter_rows(named=True):
                rejected.append((row, f"transform {name} raised {type(exc).__name__}: {exc}"))
            return
        half = df.height // 2
        _run_isolating(fn, df.slice(0, half), key, name, outputs, rejected)
        _run_isolating(fn, df.slice(half), key, name, outputs, rejected)
        return
    if not isinstance(out, pl.DataFrame):
        raise TransformError(f"transform {name} returned {type(out).__name__}; it must return "
                             "a polars.DataFrame")
    outputs.append(out)


def _check_keys(df: pl.DataFrame, out: pl.DataFrame, rejected: list[tuple[dict[str, Any], str]],
                key: tuple[str, ...], name: str) -> None:
    missing = [k for k in key if k not in out.columns]
    if missing:
        raise TransformError(f"transform {name} dropped the key column(s) {', '.join(missing)}; "
                             "it must return them unchanged")
    if out.height == 0:
        return
    known = set(df.select(list(key)).iter_rows())
    returned = list(out.select(list(key)).iter_rows())
    strange = [r for r in returned if r not in known]
    if strange:
        raise TransformError(f"transform {name} returned key(s) not in its input, e.g. "
                             f"{list(strange[0])}; it must leave key columns unchanged")
    if len(set(returned)) != len(returned):
        raise TransformError(f"transform {name} returned a key more than once; it may drop or "
                             "reject rows, not duplicate them")
