-- mlplane's own records beside the run history: DataAsset versions with
-- their manifests, and the Pipeline step cache. Same portable types as 0001.

-- A manifest (canonical text, see operator/src/storage/manifest.rs) by its
-- digest: stored once however many versions (of however many DataAssets)
-- have the same content.
CREATE TABLE data_manifests (
    digest TEXT NOT NULL PRIMARY KEY,
    files  BIGINT NOT NULL,
    bytes  BIGINT NOT NULL,
    body   TEXT NOT NULL
);

-- Version N of the DataAsset <namespace>/<data_asset>: numbered from 1 per
-- name, a new one only when the digest differs from the latest's. Versions
-- outlive the DataAsset object (a re-created asset continues the numbering),
-- so a run's pinned <name>:<version> always means one manifest.
CREATE TABLE data_versions (
    namespace  TEXT NOT NULL,
    data_asset TEXT NOT NULL,
    version    BIGINT NOT NULL,
    digest     TEXT NOT NULL REFERENCES data_manifests (digest),
    source     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, data_asset, version)
);

-- The outputs of a succeeded Pipeline step by cache key, per workspace
-- namespace: any later run of any pipeline there with the same key reuses
-- them. The first entry of a key stays (outputs live under the key anyway).
CREATE TABLE step_cache (
    namespace  TEXT NOT NULL,
    cache_key  TEXT NOT NULL,
    pipeline   TEXT NOT NULL,
    run        TEXT NOT NULL,
    step       TEXT NOT NULL,
    job        TEXT NOT NULL,
    outputs    TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (namespace, cache_key)
);
