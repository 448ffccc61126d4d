//! Reading MLflow requests the way MLflow's server does: query parameters for
//! GET, a JSON body for POST (Content-Type application/json), proto3 JSON
//! field types (int64 as number or string, doubles as number or
//! "NaN"/"Infinity"), camelCase aliases, and MLflow's per-endpoint schema
//! checks with their messages ("Missing value for required parameter ...").
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{Method, header};
use serde_json::{Map, Value};

use super::super::error::ApiError;
use super::super::store::validate::{invalid_value, missing_value};

/// Largest JSON body accepted (MLflow has no effective limit; this only
/// bounds memory). A maximal valid log-batch is about 2 MB.
pub const MAX_BODY: usize = 16 * 1024 * 1024;

const API_DOCS: &str = " See the API docs for more information about request parameters.";

/// A proto field type, for deciding whether MLflow's proto parsing succeeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    Str,
    Int,
    Double,
    Enum,
    StrList,
    /// A repeated message whose fields are listed.
    MsgList(&'static [(&'static str, Ty)]),
    /// A message whose fields are listed.
    Msg(&'static [(&'static str, Ty)]),
}

/// One of MLflow's schema checks (`_assert_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Required,
    String,
    IntLike,
    FloatLike,
    Array,
    /// Every item of an array is a string.
    ItemsString,
    /// Items of `metrics` have key, value and timestamp.
    MetricFields,
    /// Items have a key.
    KeyFields(&'static str),
    /// At most this many (as an integer).
    AtMost(i64),
}

/// A parsed MLflow request: its fields as JSON, whatever the transport.
#[derive(Debug, Default)]
pub struct MlflowRequest {
    pub fields: Map<String, Value>,
    /// Whether the request was a GET (query parameters, all strings).
    pub is_get: bool,
}

impl<S: Send + Sync> FromRequest<S> for MlflowRequest {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let method = req.method().clone();
        if method == Method::GET
            && let Some(q) = req.uri().query().filter(|q| !q.is_empty())
        {
            let mut fields = Map::new();
            for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
                let k = k.into_owned();
                let v = Value::String(v.into_owned());
                match fields.get_mut(&k) {
                    Some(Value::Array(a)) => a.push(v),
                    Some(prev) => {
                        let first = prev.take();
                        *prev = Value::Array(vec![first, v]);
                    }
                    None => {
                        fields.insert(k, v);
                    }
                }
            }
            return Ok(Self { fields, is_get: true });
        }
        let is_get = method == Method::GET;
        let JsonBody(body) = JsonBody::from_request(req, state).await?;
        Ok(Self::from_json(&body, is_get))
    }
}

impl MlflowRequest {
    /// A request from a JSON body.
    pub fn from_json(body: &[u8], is_get: bool) -> Self {
        Self {
            fields: parse_body(body),
            is_get,
        }
    }
}

/// The raw body of a request, with MLflow's Content-Type check for POST/PUT.
pub struct JsonBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if req.method() == Method::POST || req.method() == Method::PUT {
            let ct = req
                .headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap_or("").to_string());
            match ct {
                None => return Err(ApiError::invalid("Bad Request. Content-Type header is missing.")),
                Some(ct) if ct.split(';').next().unwrap_or("").trim() != "application/json" => {
                    return Err(ApiError::invalid(
                        "Bad Request. Content-Type must be one of ['application/json'].",
                    ));
                }
                _ => {}
            }
        }
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
        Ok(Self(body))
    }
}

/// Flask's `get_json(silent=True)`: invalid JSON is an empty request; a
/// double-encoded JSON string is decoded again.
fn parse_body(body: &[u8]) -> Map<String, Value> {
    let value: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let value = match value {
        Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::Null),
        v => v,
    };
    match value {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// `runId` -> `run_id`.
fn snake_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Python's type name of a JSON value.
fn py_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// `json.dumps(value, sort_keys=True, separators=(",", ":"))`.
fn py_dumps(v: &Value) -> String {
    match v {
        Value::String(s) => super::super::store::validate::py_json_str(s),
        Value::Array(a) => format!("[{}]", a.iter().map(py_dumps).collect::<Vec<_>>().join(",")),
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            let items: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", super::super::store::validate::py_json_str(k), py_dumps(&o[k])))
                .collect();
            format!("{{{}}}", items.join(","))
        }
        Value::Number(n) if n.is_f64() => super::super::store::validate::py_float(n.as_f64().unwrap_or(0.0)),
        other => other.to_string(),
    }
}

fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.2e18)
                .map(|f| f as i64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn double_of(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            s => s.trim().parse().ok().filter(|f: &f64| f.is_finite()),
        },
        _ => None,
    }
}

/// Whether protobuf's JSON parser accepts `v` for a field of type `ty`.
fn proto_accepts(ty: Ty, v: &Value) -> bool {
    if v.is_null() {
        return true;
    }
    match ty {
        Ty::Str => v.is_string(),
        Ty::Int => int_of(v).is_some() && !v.is_boolean(),
        Ty::Double => double_of(v).is_some(),
        Ty::Enum => v.is_string() || v.as_i64().is_some(),
        Ty::StrList => v.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
        Ty::MsgList(fields) => v
            .as_array()
            .is_some_and(|a| a.iter().all(|m| proto_accepts(Ty::Msg(fields), m))),
        Ty::Msg(fields) => v.as_object().is_some_and(|o| {
            fields
                .iter()
                .all(|(name, ty)| o.get(*name).is_none_or(|fv| proto_accepts(*ty, fv)))
        }),
    }
}

/// The reason an item of a list lacks a required field, MLflow's message.
fn missing_in_items(v: &Value, list: &str, fields: &[&str]) -> Option<String> {
    let items = v.as_array()?;
    for (i, item) in items.iter().enumerate() {
        for f in fields {
            let present = item.get(*f).is_some_and(|x| !x.is_null() && x.as_str() != Some(""));
            if !present {
                return Some(missing_value(&format!("{list}[{i}].{f}")));
            }
        }
    }
    None
}

impl MlflowRequest {
    /// Normalises camelCase aliases and applies MLflow's schema checks.
    /// `proto` lists the message's fields and types; `schema` the checks.
    pub fn validate(&mut self, proto: &[(&str, Ty)], schema: &[(&str, &[Check])]) -> Result<(), ApiError> {
        for (name, _) in proto {
            let camel: String = {
                let mut out = String::new();
                let mut up = false;
                for c in name.chars() {
                    if c == '_' {
                        up = true;
                    } else if up {
                        out.push(c.to_ascii_uppercase());
                        up = false;
                    } else {
                        out.push(c);
                    }
                }
                out
            };
            if camel != *name && self.fields.contains_key(&camel) {
                if self.fields.contains_key(*name) {
                    return Err(ApiError::invalid(format!(
                        "Request specifies both '{name}' and '{camel}'; provide only one of them."
                    )));
                }
                let v = self.fields.remove(&camel).expect("present");
                self.fields.insert(snake_case(&camel), v);
            }
        }
        // GET parameters of repeated fields are lists even when given once.
        if self.is_get {
            for (name, ty) in proto {
                if matches!(ty, Ty::StrList)
                    && let Some(v) = self.fields.get_mut(*name)
                    && v.is_string()
                {
                    let s = v.take();
                    *v = Value::Array(vec![s]);
                }
            }
        }
        let proto_ok = proto
            .iter()
            .all(|(name, ty)| self.fields.get(*name).is_none_or(|v| proto_accepts(*ty, v)));
        for (name, checks) in schema {
            let present = self.fields.contains_key(*name);
            if !present && !checks.contains(&Check::Required) {
                continue;
            }
            let mut value = self.fields.get(*name).cloned().unwrap_or(Value::Null);
            if *name == "run_id" && value.is_null() {
                value = self.fields.get("run_uuid").cloned().unwrap_or(Value::Null);
            }
            for check in *checks {
                let type_check = matches!(check, Check::String | Check::IntLike | Check::FloatLike);
                if type_check && proto_ok {
                    continue;
                }
                let ok = match check {
                    Check::Required => !value.is_null() && value.as_str() != Some(""),
                    Check::String => value.is_string(),
                    Check::IntLike => {
                        value.is_i64() || value.is_u64() || value.is_boolean() || int_of(&value).is_some()
                    }
                    Check::FloatLike => value.is_number() || double_of(&value).is_some(),
                    Check::Array => value.is_array(),
                    Check::ItemsString => value.as_array().is_some_and(|a| a.iter().all(Value::is_string)),
                    Check::MetricFields => {
                        if let Some(m) = missing_in_items(&value, "metrics", &["key", "value", "timestamp"]) {
                            return Err(ApiError::invalid(format!("{m}{API_DOCS}")));
                        }
                        true
                    }
                    Check::KeyFields(list) => {
                        if let Some(m) = missing_in_items(&value, list, &["key"]) {
                            return Err(ApiError::invalid(format!("{m}{API_DOCS}")));
                        }
                        true
                    }
                    Check::AtMost(max) => int_of(&value).is_none_or(|n| n <= *max),
                };
                if !ok {
                    let message = if *check == Check::Required {
                        missing_value(name)
                    } else {
                        invalid_value(
                            name,
                            &py_dumps(&value),
                            Some(&format!(" Hint: Value was of type '{}'.", py_type(&value))),
                        )
                    };
                    return Err(ApiError::invalid(format!("{message}{API_DOCS}")));
                }
            }
        }
        Ok(())
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.fields.get(name).filter(|v| !v.is_null())
    }

    /// A string field, `""` when absent.
    pub fn str(&self, name: &str) -> String {
        self.opt_str(name).unwrap_or_default()
    }

    /// A string field when given.
    pub fn opt_str(&self, name: &str) -> Option<String> {
        match self.get(name)? {
            Value::String(s) => Some(s.clone()),
            Value::Array(a) => a.last().and_then(|v| v.as_str()).map(str::to_string),
            other => Some(other.to_string()),
        }
    }

    /// `run_id`, or the legacy `run_uuid`.
    pub fn run_id(&self) -> String {
        self.opt_str("run_id")
            .filter(|s| !s.is_empty())
            .or_else(|| self.opt_str("run_uuid"))
            .unwrap_or_default()
    }

    /// An integer field when given.
    pub fn int(&self, name: &str) -> Option<i64> {
        self.get(name).and_then(int_of)
    }

    /// A double field when given (`"NaN"`, `"Infinity"` accepted).
    pub fn double(&self, name: &str) -> Option<f64> {
        self.get(name).and_then(double_of)
    }

    /// A repeated string field (a single value counts as one item).
    pub fn strings(&self, name: &str) -> Vec<String> {
        match self.get(name) {
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            Some(Value::String(s)) => vec![s.clone()],
            _ => vec![],
        }
    }

    /// A repeated message field.
    pub fn objects(&self, name: &str) -> Vec<Map<String, Value>> {
        match self.get(name) {
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_object().cloned()).collect(),
            _ => vec![],
        }
    }
}

/// A string field of a nested message, `""` when absent.
pub fn obj_str(o: &Map<String, Value>, name: &str) -> String {
    match o.get(name) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// An optional string field of a nested message.
pub fn obj_opt_str(o: &Map<String, Value>, name: &str) -> Option<String> {
    match o.get(name) {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    }
}

/// An integer field of a nested message.
pub fn obj_int(o: &Map<String, Value>, name: &str) -> Option<i64> {
    o.get(name).and_then(int_of)
}

/// A double field of a nested message.
pub fn obj_double(o: &Map<String, Value>, name: &str) -> Option<f64> {
    o.get(name).and_then(double_of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(v: Value) -> MlflowRequest {
        MlflowRequest {
            fields: v.as_object().cloned().unwrap(),
            is_get: false,
        }
    }

    const LOG_METRIC: &[(&str, Ty)] = &[
        ("run_id", Ty::Str),
        ("key", Ty::Str),
        ("value", Ty::Double),
        ("timestamp", Ty::Int),
        ("step", Ty::Int),
    ];
    const LOG_METRIC_SCHEMA: &[(&str, &[Check])] = &[
        ("run_id", &[Check::Required, Check::String]),
        ("key", &[Check::Required, Check::String]),
        ("value", &[Check::Required, Check::FloatLike]),
        ("timestamp", &[Check::IntLike, Check::Required]),
    ];

    #[test]
    fn answers_mlflows_schema_messages() {
        let mut r = req(json!({"run_id": "r", "key": "m", "value": 1.5}));
        assert_eq!(
            r.validate(LOG_METRIC, LOG_METRIC_SCHEMA).unwrap_err().message,
            "Missing value for required parameter 'timestamp'. See the API docs for more information about request \
             parameters."
        );
        let mut r = req(json!({"run_id": "r", "key": "m", "value": "abc", "timestamp": 1}));
        assert_eq!(
            r.validate(LOG_METRIC, LOG_METRIC_SCHEMA).unwrap_err().message,
            "Invalid value \"abc\" for parameter 'value' supplied:  Hint: Value was of type 'str'. See the API docs \
             for more information about request parameters."
        );
        let mut r = req(json!({"runId": "r", "key": "m", "value": "NaN", "timestamp": "12"}));
        r.validate(LOG_METRIC, LOG_METRIC_SCHEMA).unwrap();
        assert_eq!(r.run_id(), "r");
        assert!(r.double("value").unwrap().is_nan());
        assert_eq!(r.int("timestamp"), Some(12));
        let mut r = req(json!({"run_id": "r", "runId": "s"}));
        assert!(
            r.validate(LOG_METRIC, &[])
                .unwrap_err()
                .message
                .starts_with("Request specifies both")
        );
    }

    #[test]
    fn reads_bodies_like_flask() {
        assert!(parse_body(b"garbage").is_empty());
        assert_eq!(parse_body(br#""{\"a\": 1}""#)["a"], json!(1));
        assert_eq!(parse_body(br#"{"a": "b"}"#)["a"], json!("b"));
    }
}
