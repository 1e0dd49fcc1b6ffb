-- etl state store, version 1: jobs, runs, checkpoints, dead letters, control requests.
-- Applied by etl/state/schema.py inside one transaction under an advisory lock;
-- {schema} is replaced by the quoted state schema name (default "etl").

CREATE TABLE {schema}.jobs (
    job_id      text PRIMARY KEY,
    job_type    text NOT NULL,
    args        jsonb NOT NULL DEFAULT '{{}}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE {schema}.runs (
    run_id        uuid PRIMARY KEY,
    job_id        text NOT NULL REFERENCES {schema}.jobs (job_id) ON DELETE CASCADE,
    status        text NOT NULL,
    host          text NOT NULL,
    pid           integer NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz,
    report        jsonb
);
CREATE INDEX runs_job_started ON {schema}.runs (job_id, started_at DESC);

CREATE TABLE {schema}.checkpoints (
    job_id       text NOT NULL REFERENCES {schema}.jobs (job_id) ON DELETE CASCADE,
    partition    text NOT NULL DEFAULT '',
    run_id       uuid,
    chunk_index  integer NOT NULL,
    last_key     jsonb,
    processed    bigint NOT NULL DEFAULT 0,
    succeeded    bigint NOT NULL DEFAULT 0,
    failed       bigint NOT NULL DEFAULT 0,
    skipped      bigint NOT NULL DEFAULT 0,
    bytes        bigint NOT NULL DEFAULT 0,
    checksum     text,
    finished     boolean NOT NULL DEFAULT false,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, partition)
);

CREATE TABLE {schema}.dead_letters (
    id              bigserial PRIMARY KEY,
    job_id          text NOT NULL,
    run_id          uuid,
    chunk_index     integer,
    item_key        jsonb,
    row_data        jsonb,
    error_type      text NOT NULL,
    sqlstate        text,
    category        text NOT NULL,
    error_message   text NOT NULL,
    attempts        integer NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX dead_letters_job ON {schema}.dead_letters (job_id, id);

CREATE TABLE {schema}.control_requests (
    id            bigserial PRIMARY KEY,
    job_id        text NOT NULL,
    action        text NOT NULL CHECK (action IN ('pause', 'resume', 'cancel')),
    requested_at  timestamptz NOT NULL DEFAULT now(),
    requested_by  text,
    handled_at    timestamptz,
    handled_by    uuid
);
CREATE INDEX control_requests_pending ON {schema}.control_requests (job_id) WHERE handled_at IS NULL;
