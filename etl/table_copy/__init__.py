"""`etl copy` between PostgreSQL databases: plan, prepare the target, run the chunks.

Fast path: each keyset chunk moves as binary COPY data from the source
straight into COPY FROM STDIN on the target, without decoding values. The
chunk's checkpoint is written in the target transaction that holds its rows
when the state store lives in the target database (the default).

``plan`` reads both databases and decides (nothing is written), ``step`` does one
chunk, ``run`` drives the chunks and returns the Result.
"""

from __future__ import annotations

from .plan import (
    DEFAULT_LOCK_TIMEOUT_SECONDS,
    CopyPlan,
    CopySpec,
    count_remaining,
    describe_plan,
    make_plan,
    prepare_target,
)
from .run import execute
from .step import PIECE_ROWS_AFTER_DATA_ERRORS, CopyStep

__all__ = ["DEFAULT_LOCK_TIMEOUT_SECONDS", "PIECE_ROWS_AFTER_DATA_ERRORS", "CopyPlan", "CopySpec",
           "CopyStep", "count_remaining", "describe_plan", "execute", "make_plan",
           "prepare_target"]
