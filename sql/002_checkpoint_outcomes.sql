-- etl state store, version 2: what each row's write did, per job, for the report
-- (upsert: inserted / updated / unchanged; ignore: inserted / ignored; rows sharing a key
-- inside one chunk: superseded by the last). Kept with the checkpoint, in the chunk's
-- transaction, so resumed runs add up exactly.

ALTER TABLE {schema}.checkpoints ADD COLUMN outcomes jsonb NOT NULL DEFAULT '{{}}';
