-- Run history of the MLflow-compatible tracking API.
--
-- One schema for SQLite and PostgreSQL: portable types only (BIGINT,
-- DOUBLE PRECISION, TEXT), no AUTOINCREMENT/SERIAL (the application generates
-- every id), booleans stored as BIGINT 0/1. `seq` columns keep the order in
-- which keys were first logged, which is the order MLflow answers them in.

CREATE TABLE experiments (
    experiment_id     BIGINT NOT NULL PRIMARY KEY,
    name              TEXT NOT NULL,
    artifact_location TEXT NOT NULL,
    lifecycle_stage   TEXT NOT NULL,
    creation_time     BIGINT NOT NULL,
    last_update_time  BIGINT NOT NULL,
    CONSTRAINT experiments_name_key UNIQUE (name)
);

CREATE TABLE experiment_tags (
    experiment_id BIGINT NOT NULL REFERENCES experiments (experiment_id),
    key           TEXT NOT NULL,
    value         TEXT NOT NULL,
    seq           BIGINT NOT NULL,
    PRIMARY KEY (experiment_id, key)
);

CREATE TABLE runs (
    run_id          TEXT NOT NULL PRIMARY KEY,
    experiment_id   BIGINT NOT NULL REFERENCES experiments (experiment_id),
    name            TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    status          TEXT NOT NULL,
    start_time      BIGINT NOT NULL,
    end_time        BIGINT,
    deleted_time    BIGINT,
    artifact_uri    TEXT NOT NULL,
    lifecycle_stage TEXT NOT NULL
);

-- Search: runs of an experiment in MLflow's default order (start_time DESC, run_id).
CREATE INDEX runs_experiment_start ON runs (experiment_id, start_time, run_id);

CREATE TABLE run_tags (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    seq    BIGINT NOT NULL,
    PRIMARY KEY (run_id, key)
);

CREATE TABLE params (
    run_id TEXT NOT NULL REFERENCES runs (run_id),
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    seq    BIGINT NOT NULL,
    PRIMARY KEY (run_id, key)
);

-- Every logged metric value. The primary key makes re-logging an identical
-- point a no-op (as in MLflow) and serves metric history in MLflow's order
-- (timestamp, step, value) for one run and key.
CREATE TABLE metrics (
    run_id    TEXT NOT NULL REFERENCES runs (run_id),
    key       TEXT NOT NULL,
    timestamp BIGINT NOT NULL,
    step      BIGINT NOT NULL,
    value     DOUBLE PRECISION NOT NULL,
    is_nan    BIGINT NOT NULL,
    PRIMARY KEY (run_id, key, timestamp, step, value, is_nan)
);

-- The latest value of each metric of a run (largest (step, timestamp, value)):
-- what runs/get and runs/search show and what metric filters compare.
CREATE TABLE latest_metrics (
    run_id    TEXT NOT NULL REFERENCES runs (run_id),
    key       TEXT NOT NULL,
    timestamp BIGINT NOT NULL,
    step      BIGINT NOT NULL,
    value     DOUBLE PRECISION NOT NULL,
    is_nan    BIGINT NOT NULL,
    seq       BIGINT NOT NULL,
    PRIMARY KEY (run_id, key)
);

-- Metric filters and ORDER BY across the runs of an experiment.
CREATE INDEX latest_metrics_key_value ON latest_metrics (key, value);

CREATE TABLE datasets (
    dataset_id    TEXT NOT NULL PRIMARY KEY,
    experiment_id BIGINT NOT NULL REFERENCES experiments (experiment_id),
    name          TEXT NOT NULL,
    digest        TEXT NOT NULL,
    source_type   TEXT NOT NULL,
    source        TEXT NOT NULL,
    schema        TEXT,
    profile       TEXT,
    CONSTRAINT datasets_experiment_name_digest_key UNIQUE (experiment_id, name, digest)
);

CREATE TABLE run_inputs (
    input_id   TEXT NOT NULL PRIMARY KEY,
    run_id     TEXT NOT NULL REFERENCES runs (run_id),
    dataset_id TEXT NOT NULL REFERENCES datasets (dataset_id),
    seq        BIGINT NOT NULL,
    CONSTRAINT run_inputs_run_dataset_key UNIQUE (run_id, dataset_id)
);

CREATE TABLE input_tags (
    input_id TEXT NOT NULL REFERENCES run_inputs (input_id),
    key      TEXT NOT NULL,
    value    TEXT NOT NULL,
    seq      BIGINT NOT NULL,
    PRIMARY KEY (input_id, key)
);
