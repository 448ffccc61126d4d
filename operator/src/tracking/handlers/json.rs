//! Response bodies in the shape MLflow's server gives them (proto JSON with
//! snake_case names, int64 as numbers, unset fields left out, NaN as "NaN").
use serde_json::{Map, Value, json};

use super::super::store::{DatasetInput, Experiment, KeyValue, Metric, Run, RunInfo, RunMetric};

/// The workspace MLflow 3 reports for every experiment of a server without workspaces.
const WORKSPACE: &str = "default";

fn key_values(items: &[KeyValue]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|kv| json!({"key": kv.key, "value": kv.value}))
            .collect(),
    )
}

/// A double as proto JSON writes it.
pub fn double(v: f64) -> Value {
    if v.is_nan() {
        json!("NaN")
    } else if v.is_infinite() {
        json!(if v > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        json!(v)
    }
}

pub fn experiment(e: &Experiment) -> Value {
    let mut o = Map::new();
    o.insert("experiment_id".into(), json!(e.experiment_id));
    o.insert("name".into(), json!(e.name));
    o.insert("artifact_location".into(), json!(e.artifact_location));
    o.insert("lifecycle_stage".into(), json!(e.lifecycle_stage));
    if e.last_update_time != 0 {
        o.insert("last_update_time".into(), json!(e.last_update_time));
    }
    if e.creation_time != 0 {
        o.insert("creation_time".into(), json!(e.creation_time));
    }
    if !e.tags.is_empty() {
        o.insert("tags".into(), key_values(&e.tags));
    }
    o.insert("workspace".into(), json!(WORKSPACE));
    Value::Object(o)
}

pub fn run_info(i: &RunInfo) -> Value {
    let mut o = Map::new();
    o.insert("run_uuid".into(), json!(i.run_id));
    o.insert("experiment_id".into(), json!(i.experiment_id));
    o.insert("run_name".into(), json!(i.run_name));
    o.insert("user_id".into(), json!(i.user_id));
    o.insert("status".into(), json!(i.status.as_str()));
    o.insert("start_time".into(), json!(i.start_time));
    if let Some(end) = i.end_time.filter(|t| *t != 0) {
        o.insert("end_time".into(), json!(end));
    }
    if !i.artifact_uri.is_empty() {
        o.insert("artifact_uri".into(), json!(i.artifact_uri));
    }
    o.insert("lifecycle_stage".into(), json!(i.lifecycle_stage));
    o.insert("run_id".into(), json!(i.run_id));
    Value::Object(o)
}

pub fn metric(m: &Metric) -> Value {
    json!({"key": m.key, "value": double(m.value), "timestamp": m.timestamp, "step": m.step})
}

pub fn run_metric(m: &RunMetric) -> Value {
    json!({
        "key": m.metric.key,
        "value": double(m.metric.value),
        "timestamp": m.metric.timestamp,
        "step": m.metric.step,
        "run_id": m.run_id,
    })
}

fn dataset_input(d: &DatasetInput) -> Value {
    let mut ds = Map::new();
    ds.insert("name".into(), json!(d.dataset.name));
    ds.insert("digest".into(), json!(d.dataset.digest));
    ds.insert("source_type".into(), json!(d.dataset.source_type));
    ds.insert("source".into(), json!(d.dataset.source));
    if let Some(s) = d.dataset.schema.as_ref().filter(|s| !s.is_empty()) {
        ds.insert("schema".into(), json!(s));
    }
    if let Some(p) = d.dataset.profile.as_ref().filter(|p| !p.is_empty()) {
        ds.insert("profile".into(), json!(p));
    }
    let mut o = Map::new();
    if !d.tags.is_empty() {
        o.insert("tags".into(), key_values(&d.tags));
    }
    o.insert("dataset".into(), Value::Object(ds));
    Value::Object(o)
}

/// A run; `outputs` adds the (always empty) `outputs` object that runs/get
/// and runs/search carry and runs/create does not.
pub fn run(r: &Run, outputs: bool) -> Value {
    let mut data = Map::new();
    if !r.metrics.is_empty() {
        data.insert("metrics".into(), Value::Array(r.metrics.iter().map(metric).collect()));
    }
    if !r.params.is_empty() {
        data.insert("params".into(), key_values(&r.params));
    }
    if !r.tags.is_empty() {
        data.insert("tags".into(), key_values(&r.tags));
    }
    let mut inputs = Map::new();
    if !r.inputs.is_empty() {
        inputs.insert(
            "dataset_inputs".into(),
            Value::Array(r.inputs.iter().map(dataset_input).collect()),
        );
    }
    let mut o = Map::new();
    o.insert("info".into(), run_info(&r.info));
    o.insert("data".into(), Value::Object(data));
    o.insert("inputs".into(), Value::Object(inputs));
    if outputs {
        o.insert("outputs".into(), json!({}));
    }
    Value::Object(o)
}

/// `{"<field>": [...], "next_page_token": ...}` with empty parts left out.
pub fn page(field: &str, items: Vec<Value>, next_page_token: Option<String>) -> Value {
    let mut o = Map::new();
    if !items.is_empty() {
        o.insert(field.into(), Value::Array(items));
    }
    if let Some(t) = next_page_token {
        o.insert("next_page_token".into(), json!(t));
    }
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::super::super::store::RunStatus;
    use super::*;

    #[test]
    fn run_info_leaves_out_unset_fields() {
        let info = RunInfo {
            run_id: "abc".into(),
            experiment_id: "1".into(),
            run_name: "r".into(),
            user_id: String::new(),
            status: RunStatus::Running,
            start_time: 1000,
            end_time: None,
            artifact_uri: "mlflow-artifacts:/1/abc/artifacts".into(),
            lifecycle_stage: "active".into(),
        };
        assert_eq!(
            run_info(&info),
            json!({
                "run_uuid": "abc", "experiment_id": "1", "run_name": "r", "user_id": "", "status": "RUNNING",
                "start_time": 1000, "artifact_uri": "mlflow-artifacts:/1/abc/artifacts", "lifecycle_stage": "active",
                "run_id": "abc"
            })
        );
        assert_eq!(double(f64::NAN), json!("NaN"));
        assert_eq!(double(f64::MAX), json!(1.7976931348623157e308));
        assert_eq!(page("runs", vec![], None), json!({}));
    }
}
