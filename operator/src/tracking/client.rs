//! The operator's client of the tracking server: maps an mlplane Experiment to
//! the MLflow experiment `<namespace>/<name>`, creates one MLflow run per
//! mlplane run, marks it FINISHED / FAILED / KILLED from the Job's outcome,
//! and reads the metrics sweeps and early termination decide on.
//!
//! It also records DataAsset versions and Pipeline step cache entries
//! (`/api/2.0/mlplane/...`, see [`super::records`]).
//!
//! It speaks the same REST API as the `mlflow` client, authenticated with the
//! operator's own bearer token (its ServiceAccount token, re-read from disk so
//! rotation is picked up), so it works against any replica of the server.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

/// Where the operator's bearer token comes from. `Debug` never shows a token.
#[derive(Clone)]
pub enum Token {
    /// No token (a tracking server with auth off).
    None,
    /// A fixed token.
    Static(String),
    /// A file re-read on every request (the projected ServiceAccount token).
    File(PathBuf),
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Token::None => f.write_str("None"),
            Token::Static(_) => f.write_str("Static(<redacted>)"),
            Token::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

/// Errors of the tracking client; `code` is MLflow's error code when the
/// server answered one.
#[derive(Debug, thiserror::Error)]
#[error("tracking {endpoint}: {message}")]
pub struct ClientError {
    pub endpoint: &'static str,
    pub code: Option<String>,
    pub message: String,
}

/// mlplane's own records, as the server answers them.
pub use super::records::{DataVersionJson, StepCacheJson};
/// An MLflow run status (the store's type: one definition of MLflow's enum).
pub use super::store::RunStatus;

/// A client of one tracking server.
#[derive(Clone, Debug)]
pub struct TrackingClient {
    base: String,
    run_url: String,
    token: Token,
    http: reqwest::Client,
}

impl TrackingClient {
    /// `base` is the server's root URL, e.g. `http://mlplane-tracking.mlplane-system.svc:5000`.
    pub fn new(base: impl Into<String>, token: Token) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("HTTP client");
        let base = base.into().trim_end_matches('/').to_string();
        Self {
            run_url: base.clone(),
            base,
            token,
            http,
        }
    }

    /// Sets the URL run pods use (MLFLOW_TRACKING_URI) when it differs from
    /// the operator's own (e.g. a Service DNS name vs. a port-forward).
    pub fn with_run_url(mut self, url: impl Into<String>) -> Self {
        self.run_url = url.into().trim_end_matches('/').to_string();
        self
    }

    /// The URL run pods get as MLFLOW_TRACKING_URI.
    pub fn run_url(&self) -> &str {
        &self.run_url
    }

    fn bearer(&self) -> Option<String> {
        match &self.token {
            Token::None => None,
            Token::Static(t) => Some(t.clone()),
            Token::File(p) => std::fs::read_to_string(p).ok().map(|t| t.trim().to_string()),
        }
    }

    async fn call(&self, endpoint: &'static str, get: bool, body: Value) -> Result<Value, ClientError> {
        self.call_at("mlflow", endpoint, get, body).await
    }

    /// A request to `/api/2.0/<api>/<endpoint>` (`mlflow` or `mlplane`).
    async fn call_at(&self, api: &str, endpoint: &'static str, get: bool, body: Value) -> Result<Value, ClientError> {
        let url = format!("{}/api/2.0/{api}/{endpoint}", self.base);
        let mut req = if get {
            self.http.get(&url).query(&query_pairs(&body))
        } else {
            self.http.post(&url).json(&body)
        };
        if let Some(t) = self.bearer() {
            req = req.bearer_auth(t);
        }
        let err = |code: Option<String>, message: String| ClientError {
            endpoint,
            code,
            message,
        };
        let resp = req.send().await.map_err(|e| err(None, e.to_string()))?;
        let status = resp.status();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success() {
            Ok(value)
        } else {
            Err(err(
                value["error_code"].as_str().map(str::to_string),
                format!("HTTP {status}: {}", value["message"].as_str().unwrap_or("")),
            ))
        }
    }

    /// The id of the MLflow experiment `name`, created if it does not exist
    /// (restored if it was deleted).
    pub async fn ensure_experiment(&self, name: &str) -> Result<String, ClientError> {
        match self
            .call("experiments/get-by-name", true, json!({"experiment_name": name}))
            .await
        {
            Ok(v) => {
                let exp = &v["experiment"];
                let id = exp["experiment_id"].as_str().unwrap_or_default().to_string();
                if exp["lifecycle_stage"] == "deleted" {
                    self.call("experiments/restore", false, json!({"experiment_id": id}))
                        .await?;
                }
                return Ok(id);
            }
            Err(e) if e.code.as_deref() == Some("RESOURCE_DOES_NOT_EXIST") => {}
            Err(e) => return Err(e),
        }
        match self.call("experiments/create", false, json!({"name": name})).await {
            Ok(v) => Ok(v["experiment_id"].as_str().unwrap_or_default().to_string()),
            // Another replica or a restarted operator created it meanwhile.
            Err(e) if e.code.as_deref() == Some("RESOURCE_ALREADY_EXISTS") => {
                let v = self
                    .call("experiments/get-by-name", true, json!({"experiment_name": name}))
                    .await?;
                Ok(v["experiment"]["experiment_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string())
            }
            Err(e) => Err(e),
        }
    }

    /// The run tagged `mlplane.run=<run_name>` in the experiment, if any, so
    /// a restarted operator finds the run it made instead of making another.
    pub async fn find_run(&self, experiment_id: &str, run_name: &str) -> Result<Option<String>, ClientError> {
        let filter = format!("tags.`mlplane.run` = '{}'", run_name.replace('\'', "\\'"));
        let v = self
            .call(
                "runs/search",
                false,
                json!({"experiment_ids": [experiment_id], "filter": filter, "max_results": 1, "run_view_type": "ALL"}),
            )
            .await?;
        Ok(v["runs"][0]["info"]["run_id"].as_str().map(str::to_string))
    }

    /// Creates the MLflow run of an mlplane run (idempotent by `run_name`),
    /// logging its params and tags. Returns the MLflow run id.
    pub async fn ensure_run(
        &self,
        experiment_id: &str,
        run_name: &str,
        start_time_ms: i64,
        params: &BTreeMap<String, String>,
        tags: &BTreeMap<String, String>,
    ) -> Result<String, ClientError> {
        if let Some(id) = self.find_run(experiment_id, run_name).await? {
            return Ok(id);
        }
        let mut all_tags: Vec<Value> = tags.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
        all_tags.push(json!({"key": "mlplane.run", "value": run_name}));
        let v = self
            .call(
                "runs/create",
                false,
                json!({"experiment_id": experiment_id, "run_name": run_name, "start_time": start_time_ms, "tags": all_tags}),
            )
            .await?;
        let run_id = v["run"]["info"]["run_id"].as_str().unwrap_or_default().to_string();
        if !params.is_empty() {
            let params: Vec<Value> = params.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
            self.call("runs/log-batch", false, json!({"run_id": run_id, "params": params}))
                .await?;
        }
        Ok(run_id)
    }

    /// Sets a run's status (and end time when terminal).
    pub async fn set_status(
        &self,
        run_id: &str,
        status: RunStatus,
        end_time_ms: Option<i64>,
    ) -> Result<(), ClientError> {
        let mut body = json!({"run_id": run_id, "status": status.as_str()});
        if let Some(t) = end_time_ms {
            body["end_time"] = json!(t);
        }
        self.call("runs/update", false, body).await.map(|_| ())
    }

    /// The latest value of every metric of a run.
    pub async fn latest_metrics(&self, run_id: &str) -> Result<BTreeMap<String, f64>, ClientError> {
        let v = self.call("runs/get", true, json!({"run_id": run_id})).await?;
        Ok(v["run"]["data"]["metrics"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| Some((m["key"].as_str()?.to_string(), number(&m["value"])?)))
            .collect())
    }

    /// `(step, value)` of every logged value of a metric, in step order.
    pub async fn metric_history(&self, run_id: &str, key: &str) -> Result<Vec<(i64, f64)>, ClientError> {
        let v = self
            .call(
                "metrics/get-history",
                true,
                json!({"run_id": run_id, "metric_key": key}),
            )
            .await?;
        let mut out: Vec<(i64, f64)> = v["metrics"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| {
                let step = m["step"]
                    .as_i64()
                    .or_else(|| m["step"].as_str()?.parse().ok())
                    .unwrap_or(0);
                Some((step, number(&m["value"])?))
            })
            .collect();
        out.sort_by_key(|(s, _)| *s);
        Ok(out)
    }
}

impl TrackingClient {
    fn decode<T: serde::de::DeserializeOwned>(endpoint: &'static str, v: Value) -> Result<T, ClientError> {
        serde_json::from_value(v).map_err(|e| ClientError {
            endpoint,
            code: None,
            message: format!("unexpected answer: {e}"),
        })
    }

    /// Records a DataAsset listing (manifest canonical text and its digest):
    /// the version it is (a new one when the digest differs from the
    /// latest's) and whether it was created.
    pub async fn record_data_version(
        &self,
        namespace: &str,
        data_asset: &str,
        source: &str,
        digest: &str,
        manifest: &str,
    ) -> Result<(DataVersionJson, bool), ClientError> {
        const EP: &str = "data-versions/record";
        let v = self
            .call_at(
                "mlplane",
                EP,
                false,
                json!({"namespace": namespace, "data_asset": data_asset, "source": source,
                       "digest": digest, "manifest": manifest}),
            )
            .await?;
        let created = v["created"].as_bool().unwrap_or(false);
        Ok((Self::decode(EP, v["version"].clone())?, created))
    }

    /// The newest `max` versions of a DataAsset, newest first.
    pub async fn data_versions(
        &self,
        namespace: &str,
        data_asset: &str,
        max: i64,
    ) -> Result<Vec<DataVersionJson>, ClientError> {
        const EP: &str = "data-versions/list";
        let v = self
            .call_at(
                "mlplane",
                EP,
                true,
                json!({"namespace": namespace, "data_asset": data_asset, "max_results": max}),
            )
            .await?;
        Self::decode(EP, v["versions"].clone())
    }

    /// One version of a DataAsset and its manifest text; `None` when there
    /// is no such version.
    pub async fn data_version(
        &self,
        namespace: &str,
        data_asset: &str,
        version: &str,
    ) -> Result<Option<(DataVersionJson, String)>, ClientError> {
        const EP: &str = "data-versions/get";
        match self
            .call_at(
                "mlplane",
                EP,
                true,
                json!({"namespace": namespace, "data_asset": data_asset, "version": version}),
            )
            .await
        {
            Ok(v) => Ok(Some((
                Self::decode(EP, v["version"].clone())?,
                v["manifest"].as_str().unwrap_or_default().to_string(),
            ))),
            Err(e)
                if matches!(
                    e.code.as_deref(),
                    Some("RESOURCE_DOES_NOT_EXIST" | "INVALID_PARAMETER_VALUE")
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Records a succeeded step's outputs in the workspace's step cache
    /// (idempotent: the first entry of a key stays and is returned).
    pub async fn put_step_cache(&self, namespace: &str, entry: &StepCacheJson) -> Result<StepCacheJson, ClientError> {
        const EP: &str = "step-cache/put";
        let v = self
            .call_at("mlplane", EP, false, json!({"namespace": namespace, "entry": entry}))
            .await?;
        Self::decode(EP, v["entry"].clone())
    }

    /// The step cache entries of `keys` in the workspace (missing ones left out).
    pub async fn lookup_step_cache(&self, namespace: &str, keys: &[String]) -> Result<Vec<StepCacheJson>, ClientError> {
        const EP: &str = "step-cache/lookup";
        let mut out = Vec::new();
        for chunk in keys.chunks(super::store::records::MAX_LOOKUP) {
            let v = self
                .call_at(
                    "mlplane",
                    EP,
                    false,
                    json!({"namespace": namespace, "cache_keys": chunk}),
                )
                .await?;
            out.extend(Self::decode::<Vec<StepCacheJson>>(EP, v["entries"].clone())?);
        }
        Ok(out)
    }
}

/// A JSON number, or MLflow's string forms of NaN and infinities.
fn number(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| match v.as_str()? {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        s => s.parse().ok(),
    })
}

fn query_pairs(body: &Value) -> Vec<(String, String)> {
    body.as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_query() {
        assert_eq!(number(&json!(0.5)), Some(0.5));
        assert!(number(&json!("NaN")).unwrap().is_nan());
        assert_eq!(number(&json!("-Infinity")), Some(f64::NEG_INFINITY));
        assert_eq!(
            query_pairs(&json!({"run_id": "abc", "max_results": 5})),
            vec![
                ("max_results".to_string(), "5".to_string()),
                ("run_id".to_string(), "abc".to_string())
            ]
        );
    }
}
