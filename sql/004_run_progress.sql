-- etl state store, version 4: a running run's live progress, for `etl status`.
-- A JSON object written with each heartbeat (about every second, from a thread of the
-- running process, also while a long chunk runs): rows done and the total, rows/s, the
-- ETA, the chunk size, errors, retries and the last committed key.

ALTER TABLE {schema}.runs ADD COLUMN progress jsonb;
