//! The MLflow artifact proxy (`/api/2.0/mlflow-artifacts/artifacts`):
//! upload (PUT), download (GET), list (GET `?path=`) and delete, stored
//! through the `object_store` crate under the configured artifact root
//! (local directory, S3-compatible, GCS, Azure Blob). Runs' artifact URIs are
//! `mlflow-artifacts:/<experiment_id>/<run_id>/artifacts`, so the first path
//! segment names the experiment whose access rules apply.
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Deserialize;

use super::auth::Access;
use super::error::{ApiError, ApiResult};
use super::{AppState, Caller};
use crate::storage;

/// The artifact root.
pub struct Artifacts {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
}

impl Artifacts {
    /// Opens `file:///dir` or a plain path (created if missing),
    /// `s3://bucket/prefix`, `gs://...`, `az://...` or `https://...` through
    /// [`crate::storage::open`]. Credentials are this server's own: the
    /// `AWS_*`, `GOOGLE_*` and `AZURE_*` variables of its environment, else
    /// its ambient cloud identity.
    pub fn from_uri(uri: &str) -> anyhow::Result<Self> {
        if storage::scheme_of(uri)? == storage::Scheme::Local {
            let dir = match url::Url::parse(uri) {
                Ok(u) if u.scheme() == "file" => u.path().to_string(),
                _ => uri.to_string(),
            };
            std::fs::create_dir_all(&dir)?;
        }
        let loc = storage::open(uri, &storage::Credentials::from_env())?;
        Ok(Self {
            store: loc.store,
            prefix: loc.prefix,
        })
    }

    /// The object path of a relative artifact path, refusing traversal.
    pub fn resolve(&self, rel: &str) -> ApiResult<Path> {
        let rel = rel.trim_matches('/');
        let mut path = self.prefix.clone();
        for seg in rel.split('/') {
            if seg.is_empty() || seg == "." {
                continue;
            }
            if seg == ".." || seg.contains('\\') {
                return Err(ApiError::invalid(format!("Invalid path: {rel:?} (no '..' segments)")));
            }
            path = path.join(seg);
        }
        Ok(path)
    }

    pub async fn put(&self, rel: &str, data: Bytes) -> ApiResult<()> {
        let path = self.resolve(rel)?;
        self.store
            .put(&path, PutPayload::from_bytes(data))
            .await
            .map_err(ApiError::internal)?;
        Ok(())
    }

    /// `(name, is_dir, size)` of the direct children of `rel`.
    pub async fn list(&self, rel: &str) -> ApiResult<Vec<(String, bool, Option<u64>)>> {
        let dir = self.resolve(rel)?;
        let listing = self
            .store
            .list_with_delimiter(Some(&dir).filter(|p| !p.as_ref().is_empty()))
            .await
            .map_err(ApiError::internal)?;
        let mut out = vec![];
        for p in listing.common_prefixes {
            if let Some(name) = p.filename() {
                out.push((name.to_string(), true, None));
            }
        }
        for o in listing.objects {
            if let Some(name) = o.location.filename() {
                out.push((name.to_string(), false, Some(o.size)));
            }
        }
        out.sort();
        Ok(out)
    }

    pub async fn get(&self, rel: &str) -> ApiResult<Response> {
        let path = self.resolve(rel)?;
        let result = match self.store.get(&path).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ApiError::not_found(format!(
                    "No such artifact: '{}'",
                    rel.trim_matches('/')
                )));
            }
            Err(e) => return Err(ApiError::internal(e)),
        };
        let size = result.meta.size;
        let stream = result.into_stream().map_err(std::io::Error::other);
        let mut resp = Body::from_stream(stream).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        if let Ok(v) = HeaderValue::from_str(&size.to_string()) {
            h.insert(header::CONTENT_LENGTH, v);
        }
        if let Some(name) = path.filename()
            && let Ok(v) = HeaderValue::from_str(&format!("attachment; filename={name}"))
        {
            h.insert(header::CONTENT_DISPOSITION, v);
        }
        Ok(resp)
    }

    pub async fn delete(&self, rel: &str) -> ApiResult<()> {
        let path = self.resolve(rel)?;
        // A directory: delete everything under it.
        let objects: Vec<Path> = self
            .store
            .list(Some(&path))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(ApiError::internal)?;
        if objects.is_empty() {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(ApiError::internal(e)),
            }
        }
        for o in objects {
            self.store.delete(&o).await.map_err(ApiError::internal)?;
        }
        Ok(())
    }
}

/// Checks the caller's access to the experiment the path starts with.
async fn authorize_path(state: &AppState, caller: &Caller, rel: &str, access: Access) -> ApiResult<()> {
    if !state.auth.enabled() {
        return Ok(());
    }
    let exp_id = rel.trim_matches('/').split('/').next().unwrap_or_default();
    let name = state
        .store
        .experiment_name(exp_id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::permission_denied(format!("artifact path {rel:?} names no experiment")))?;
    state.auth.authorize(&caller.0, &name, access).await
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    path: String,
}

async fn list(State(state): State<AppState>, caller: Caller, Query(q): Query<ListQuery>) -> ApiResult<Response> {
    authorize_path(&state, &caller, &q.path, Access::Read).await?;
    let files = state.artifacts.list(&q.path).await?;
    if files.is_empty() {
        return Ok(Json(serde_json::json!({})).into_response());
    }
    let files: Vec<serde_json::Value> = files
        .into_iter()
        .map(|(name, is_dir, size)| match size {
            // proto3 JSON: a zero size is omitted, as MLflow answers.
            Some(0) if !is_dir => serde_json::json!({"path": name, "is_dir": false}),
            Some(s) if !is_dir => serde_json::json!({"path": name, "is_dir": false, "file_size": s}),
            _ => serde_json::json!({"path": name, "is_dir": true}),
        })
        .collect();
    Ok(Json(serde_json::json!({ "files": files })).into_response())
}

async fn download(State(state): State<AppState>, caller: Caller, UrlPath(rel): UrlPath<String>) -> ApiResult<Response> {
    authorize_path(&state, &caller, &rel, Access::Read).await?;
    state.artifacts.get(&rel).await
}

async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    UrlPath(rel): UrlPath<String>,
    body: Body,
) -> ApiResult<()> {
    authorize_path(&state, &caller, &rel, Access::Write).await?;
    let data = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the upload: {e}")))?;
    // MLflow answers an upload with 200 and an empty body.
    state.artifacts.put(&rel, data).await
}

async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    UrlPath(rel): UrlPath<String>,
) -> ApiResult<Json<serde_json::Value>> {
    authorize_path(&state, &caller, &rel, Access::Write).await?;
    state.artifacts.delete(&rel).await?;
    Ok(Json(serde_json::json!({})))
}

/// The artifact proxy routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/2.0/mlflow-artifacts/artifacts", get(list))
        .route(
            "/api/2.0/mlflow-artifacts/artifacts/{*path}",
            get(download).put(upload).delete(delete),
        )
        .layer(axum::extract::DefaultBodyLimit::disable())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_list_get_delete_on_a_local_root() {
        let dir = std::env::temp_dir().join(format!("mlplane-artifacts-{}", uuid::Uuid::new_v4()));
        let a = Artifacts::from_uri(dir.to_str().unwrap()).unwrap();
        a.put("1/abc/artifacts/model/weights.bin", Bytes::from_static(b"0123"))
            .await
            .unwrap();
        a.put("1/abc/artifacts/notes.txt", Bytes::from_static(b"hi"))
            .await
            .unwrap();
        let top = a.list("1/abc/artifacts").await.unwrap();
        assert_eq!(
            top,
            vec![("model".into(), true, None), ("notes.txt".into(), false, Some(2))]
        );
        let resp = a.get("1/abc/artifacts/model/weights.bin").await.unwrap();
        let body = axum::body::to_bytes(resp.into_body(), 100).await.unwrap();
        assert_eq!(&body[..], b"0123");
        assert_eq!(
            a.get("1/abc/artifacts/missing").await.unwrap_err().code,
            "RESOURCE_DOES_NOT_EXIST"
        );
        assert_eq!(
            a.resolve("1/../../etc/passwd").unwrap_err().code,
            "INVALID_PARAMETER_VALUE"
        );
        a.delete("1/abc/artifacts/model").await.unwrap();
        assert_eq!(a.list("1/abc/artifacts").await.unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(dir);
    }
}
