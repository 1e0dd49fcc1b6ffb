-- etl state store, version 3: the watermark of incremental jobs (--since-column).
-- A JSON object with column, from, from_keys, next, next_keys: the walk in
-- progress copies rows changed since "from" (inclusive, minus the keys already copied at
-- exactly that value); when it finishes, "next" (the column's maximum when the walk began)
-- and its keys become the next walk's "from". Written with the checkpoint, in the chunk's
-- transaction.

ALTER TABLE {schema}.checkpoints ADD COLUMN watermark jsonb;
