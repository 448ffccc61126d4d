//! mlplane's own records in the tracking database (migration 0002): DataAsset
//! versions with their manifests, and the Pipeline step cache.
//!
//! Owns: the `data_manifests`, `data_versions` and `step_cache` tables. Must
//! not touch the MLflow tables. Writes go through the store's single writer,
//! like every other write.
use std::collections::BTreeMap;

use sqlx::{AssertSqlSafe, Row};

use super::{Result, Store, StoreError, now_millis};
use crate::storage::manifest::{Manifest, digest_of_text};

/// Longest namespace, DataAsset, pipeline or step name accepted.
const MAX_NAME: usize = 253;
/// Most cache keys in one lookup.
pub const MAX_LOOKUP: usize = 1000;

/// One version of a DataAsset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataVersionRecord {
    pub namespace: String,
    pub data_asset: String,
    pub version: i64,
    pub digest: String,
    pub files: i64,
    pub bytes: i64,
    pub source: String,
    /// Milliseconds since the epoch.
    pub created_at: i64,
}

/// The outputs of a succeeded step, by cache key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepCacheEntry {
    pub cache_key: String,
    pub pipeline: String,
    pub run: String,
    pub step: String,
    pub job: String,
    /// Output name -> location.
    pub outputs: BTreeMap<String, String>,
    /// Milliseconds since the epoch.
    pub created_at: i64,
}

fn check_name(field: &str, value: &str) -> Result<()> {
    if value.is_empty() || value.len() > MAX_NAME {
        return Err(StoreError::Invalid(format!(
            "{field} must be 1 to {MAX_NAME} characters, got {:?}",
            value
        )));
    }
    Ok(())
}

const VERSION_COLUMNS: &str =
    "v.namespace, v.data_asset, v.version, v.digest, m.files, m.bytes, v.source, v.created_at";

fn version_from_row(r: &sqlx::any::AnyRow) -> std::result::Result<DataVersionRecord, sqlx::Error> {
    Ok(DataVersionRecord {
        namespace: r.try_get(0)?,
        data_asset: r.try_get(1)?,
        version: r.try_get(2)?,
        digest: r.try_get(3)?,
        files: r.try_get(4)?,
        bytes: r.try_get(5)?,
        source: r.try_get(6)?,
        created_at: r.try_get(7)?,
    })
}

fn entry_from_row(r: &sqlx::any::AnyRow) -> Result<StepCacheEntry> {
    let outputs: String = r.try_get(5)?;
    Ok(StepCacheEntry {
        cache_key: r.try_get(0)?,
        pipeline: r.try_get(1)?,
        run: r.try_get(2)?,
        step: r.try_get(3)?,
        job: r.try_get(4)?,
        outputs: serde_json::from_str(&outputs)
            .map_err(|e| StoreError::Internal(format!("stored step outputs are not JSON: {e}")))?,
        created_at: r.try_get(6)?,
    })
}

impl Store {
    /// Records the listing `manifest` (canonical text) of `<namespace>/<data_asset>`
    /// read from `source`: a new version when `digest` differs from the latest
    /// version's, else the latest version. `digest` must be the manifest's.
    /// Returns the version and whether it was created.
    pub async fn record_data_version(
        &self,
        namespace: &str,
        data_asset: &str,
        source: &str,
        digest: &str,
        manifest: &str,
    ) -> Result<(DataVersionRecord, bool)> {
        check_name("namespace", namespace)?;
        check_name("data_asset", data_asset)?;
        let parsed = Manifest::parse(manifest).map_err(|e| StoreError::Invalid(format!("manifest: {e}")))?;
        let actual = digest_of_text(manifest);
        if actual != digest {
            return Err(StoreError::Invalid(format!(
                "digest {digest} does not match the manifest (its digest is {actual})"
            )));
        }
        let (files, bytes) = (parsed.files() as i64, parsed.bytes() as i64);
        drop(parsed);
        let (namespace, data_asset, source, digest, body) = (
            namespace.to_string(),
            data_asset.to_string(),
            source.to_string(),
            digest.to_string(),
            manifest.to_string(),
        );
        self.write(move |c, _| {
            Box::pin(async move {
                let latest = sqlx::query(AssertSqlSafe(format!(
                    "SELECT {VERSION_COLUMNS} FROM data_versions v JOIN data_manifests m ON m.digest = v.digest \
                     WHERE v.namespace = $1 AND v.data_asset = $2 ORDER BY v.version DESC LIMIT 1"
                )))
                .bind(namespace.clone())
                .bind(data_asset.clone())
                .fetch_optional(&mut *c)
                .await?
                .map(|r| version_from_row(&r))
                .transpose()?;
                if let Some(v) = latest.as_ref().filter(|v| v.digest == digest) {
                    return Ok((v.clone(), false));
                }
                sqlx::query(
                    "INSERT INTO data_manifests (digest, files, bytes, body) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(digest.clone())
                .bind(files)
                .bind(bytes)
                .bind(body)
                .execute(&mut *c)
                .await?;
                let record = DataVersionRecord {
                    namespace,
                    data_asset,
                    version: latest.map_or(1, |v| v.version + 1),
                    digest,
                    files,
                    bytes,
                    source,
                    created_at: now_millis(),
                };
                sqlx::query(
                    "INSERT INTO data_versions (namespace, data_asset, version, digest, source, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(record.namespace.clone())
                .bind(record.data_asset.clone())
                .bind(record.version)
                .bind(record.digest.clone())
                .bind(record.source.clone())
                .bind(record.created_at)
                .execute(&mut *c)
                .await?;
                Ok((record, true))
            })
        })
        .await
    }

    /// The newest `limit` versions of `<namespace>/<data_asset>`, newest first.
    pub async fn data_versions(&self, namespace: &str, data_asset: &str, limit: i64) -> Result<Vec<DataVersionRecord>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {VERSION_COLUMNS} FROM data_versions v JOIN data_manifests m ON m.digest = v.digest \
             WHERE v.namespace = $1 AND v.data_asset = $2 ORDER BY v.version DESC LIMIT $3"
        )))
        .bind(namespace.to_string())
        .bind(data_asset.to_string())
        .bind(limit.clamp(1, 10_000))
        .fetch_all(&self.inner.pool)
        .await?;
        Ok(rows
            .iter()
            .map(version_from_row)
            .collect::<std::result::Result<_, _>>()?)
    }

    /// Version `version` of `<namespace>/<data_asset>` and its manifest text.
    pub async fn data_version(
        &self,
        namespace: &str,
        data_asset: &str,
        version: i64,
    ) -> Result<(DataVersionRecord, String)> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {VERSION_COLUMNS}, m.body FROM data_versions v JOIN data_manifests m ON m.digest = v.digest \
             WHERE v.namespace = $1 AND v.data_asset = $2 AND v.version = $3"
        )))
        .bind(namespace.to_string())
        .bind(data_asset.to_string())
        .bind(version)
        .fetch_optional(&self.inner.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("DataAsset {namespace}/{data_asset} has no version {version}")))?;
        Ok((version_from_row(&row)?, row.try_get(8)?))
    }

    /// Records a succeeded step's outputs under its cache key in `namespace`;
    /// the first entry of a key is kept. Returns the stored entry.
    pub async fn put_step_cache(&self, namespace: &str, entry: StepCacheEntry) -> Result<StepCacheEntry> {
        check_name("namespace", namespace)?;
        check_name("cache_key", &entry.cache_key)?;
        for (f, v) in [
            ("pipeline", &entry.pipeline),
            ("step", &entry.step),
            ("job", &entry.job),
        ] {
            check_name(f, v)?;
        }
        let namespace = namespace.to_string();
        let outputs = serde_json::to_string(&entry.outputs).map_err(|e| StoreError::Internal(e.to_string()))?;
        self.write(move |c, _| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO step_cache (namespace, cache_key, pipeline, run, step, job, outputs, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                )
                .bind(namespace.clone())
                .bind(entry.cache_key.clone())
                .bind(entry.pipeline.clone())
                .bind(entry.run.clone())
                .bind(entry.step.clone())
                .bind(entry.job.clone())
                .bind(outputs)
                .bind(now_millis())
                .execute(&mut *c)
                .await?;
                let row = sqlx::query(
                    "SELECT cache_key, pipeline, run, step, job, outputs, created_at FROM step_cache \
                     WHERE namespace = $1 AND cache_key = $2",
                )
                .bind(namespace)
                .bind(entry.cache_key)
                .fetch_one(&mut *c)
                .await?;
                entry_from_row(&row)
            })
        })
        .await
    }

    /// The step cache entries of `keys` in `namespace` (missing keys are
    /// left out), at most [`MAX_LOOKUP`] keys.
    pub async fn lookup_step_cache(&self, namespace: &str, keys: &[String]) -> Result<Vec<StepCacheEntry>> {
        if keys.len() > MAX_LOOKUP {
            return Err(StoreError::Invalid(format!(
                "at most {MAX_LOOKUP} cache keys per lookup, got {}",
                keys.len()
            )));
        }
        if keys.is_empty() {
            return Ok(vec![]);
        }
        let marks: Vec<String> = (0..keys.len()).map(|i| format!("${}", i + 2)).collect();
        let sql = format!(
            "SELECT cache_key, pipeline, run, step, job, outputs, created_at FROM step_cache \
             WHERE namespace = $1 AND cache_key IN ({}) ORDER BY cache_key",
            marks.join(", ")
        );
        let mut q = sqlx::query(AssertSqlSafe(sql)).bind(namespace.to_string());
        for k in keys {
            q = q.bind(k.clone());
        }
        let rows = q.fetch_all(&self.inner.pool).await?;
        rows.iter().map(entry_from_row).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::manifest::Entry;

    async fn store() -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("mlplane-records-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = Store::connect(&format!("sqlite://{}", dir.join("t.db").display()))
            .await
            .unwrap();
        (s, dir)
    }

    fn manifest(keys: &[&str]) -> (String, String) {
        let m = Manifest::new(
            keys.iter()
                .map(|k| Entry {
                    key: k.to_string(),
                    size: 3,
                    tag: format!("\"{k}\""),
                })
                .collect(),
        );
        (m.text(), m.digest())
    }

    #[tokio::test]
    async fn versions_change_only_with_the_digest() {
        let (s, dir) = store().await;
        let (a, da) = manifest(&["a"]);
        let (ab, dab) = manifest(&["a", "b"]);
        let (v, created) = s
            .record_data_version("ns", "sales", "s3://b/x/", &da, &a)
            .await
            .unwrap();
        assert_eq!((v.version, created, v.files, v.bytes), (1, true, 1, 3));
        // Nothing changed: the same version.
        let (v, created) = s
            .record_data_version("ns", "sales", "s3://b/x/", &da, &a)
            .await
            .unwrap();
        assert_eq!((v.version, created), (1, false));
        let (v, created) = s
            .record_data_version("ns", "sales", "s3://b/x/", &dab, &ab)
            .await
            .unwrap();
        assert_eq!((v.version, created, v.files), (2, true, 2));
        // Back to the first content: a new version with the first's digest.
        let (v, _) = s
            .record_data_version("ns", "sales", "s3://b/x/", &da, &a)
            .await
            .unwrap();
        assert_eq!((v.version, v.digest.as_str()), (3, da.as_str()));
        // Other assets and namespaces number on their own.
        let (v, _) = s
            .record_data_version("ns2", "sales", "s3://b/y/", &da, &a)
            .await
            .unwrap();
        assert_eq!(v.version, 1);

        let listed = s.data_versions("ns", "sales", 2).await.unwrap();
        assert_eq!(listed.iter().map(|v| v.version).collect::<Vec<_>>(), [3, 2]);
        let (got, body) = s.data_version("ns", "sales", 2).await.unwrap();
        assert_eq!((got.digest, body), (dab, ab));
        assert!(matches!(
            s.data_version("ns", "sales", 9).await,
            Err(StoreError::NotFound(_))
        ));

        // A digest that is not the manifest's is refused, and nothing is written.
        let e = s
            .record_data_version("ns", "sales", "s3://b/x/", &da, "mlplane-manifest/v1\n")
            .await;
        assert!(matches!(e, Err(StoreError::Invalid(m)) if m.contains("does not match")));
        let e = s.record_data_version("ns", "sales", "s3://b/x/", &da, "garbage").await;
        assert!(matches!(e, Err(StoreError::Invalid(_))));
        assert_eq!(s.data_versions("ns", "sales", 10).await.unwrap().len(), 3);
        s.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn the_step_cache_keeps_the_first_entry_of_a_key() {
        let (s, dir) = store().await;
        let entry = |run: &str| StepCacheEntry {
            cache_key: "k1".into(),
            pipeline: "p".into(),
            run: run.into(),
            step: "prep".into(),
            job: format!("p-{run}-prep"),
            outputs: BTreeMap::from([("clean".into(), "s3://a/cache/k1/clean".into())]),
            created_at: 0,
        };
        let first = s.put_step_cache("ns", entry("1")).await.unwrap();
        assert_eq!(first.run, "1");
        let again = s.put_step_cache("ns", entry("2")).await.unwrap();
        assert_eq!(again.run, "1", "the first entry stays");
        let found = s
            .lookup_step_cache("ns", &["k1".into(), "missing".into()])
            .await
            .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].outputs["clean"], "s3://a/cache/k1/clean");
        assert!(s.lookup_step_cache("other", &["k1".into()]).await.unwrap().is_empty());
        assert!(s.lookup_step_cache("ns", &[]).await.unwrap().is_empty());
        let many: Vec<String> = (0..=MAX_LOOKUP).map(|i| i.to_string()).collect();
        assert!(s.lookup_step_cache("ns", &many).await.is_err());
        s.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
