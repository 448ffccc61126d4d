//! MLflow's input rules (names, lengths, batch limits) and their exact error
//! messages, as pure functions. The store applies them before touching the
//! database so the in-process API and the REST API refuse the same things.
use super::{KeyValue, Metric, StoreError};

pub const MAX_METRICS_PER_BATCH: usize = 1000;
pub const MAX_PARAMS_TAGS_PER_BATCH: usize = 100;
pub const MAX_ENTITIES_PER_BATCH: usize = 1000;
pub const MAX_PARAM_VAL_LENGTH: usize = 6000;
pub const MAX_TAG_VAL_LENGTH: usize = 8000;
pub const MAX_EXPERIMENT_NAME_LENGTH: usize = 500;
pub const MAX_EXPERIMENT_TAG_KEY_LENGTH: usize = 250;
pub const MAX_EXPERIMENT_TAG_VAL_LENGTH: usize = 20000;
pub const MAX_ENTITY_KEY_LENGTH: usize = 250;
pub const MAX_DATASET_NAME_SIZE: usize = 500;
pub const MAX_DATASET_DIGEST_SIZE: usize = 36;
pub const MAX_DATASET_SCHEMA_SIZE: usize = 1_048_575;
pub const MAX_DATASET_SOURCE_SIZE: usize = 65_535;
pub const MAX_DATASET_PROFILE_SIZE: usize = 16_777_215;
pub const MAX_INPUT_TAG_KEY_SIZE: usize = 255;
pub const MAX_INPUT_TAG_VALUE_SIZE: usize = 500;
/// Largest search page.
pub const SEARCH_MAX_RESULTS_THRESHOLD: usize = 50_000;

fn invalid(message: impl Into<String>) -> StoreError {
    StoreError::Invalid(message.into())
}

/// Python's `json.dumps` of a string (ASCII only, like MLflow prints values).
pub fn py_json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Python's `repr(str)`.
pub fn py_repr_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Python's `repr(float)` / `str(float)`.
pub fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Shortest round-trip digits and exponent, then Python's layout.
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let negative = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if negative { "-" } else { "" };
    if !(-4..16).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let mant = if rest.is_empty() {
            first.to_string()
        } else {
            format!("{first}.{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{mant}e{esign}{:02}", exp.abs());
    }
    let point = exp + 1; // digits before the decimal point
    let body = if point <= 0 {
        format!("0.{}{}", "0".repeat((-point) as usize), digits)
    } else if (point as usize) >= digits.len() {
        format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
    } else {
        let (a, b) = digits.split_at(point as usize);
        format!("{a}.{b}")
    };
    format!("{sign}{body}")
}

/// MLflow's `invalid_value` message (value already JSON-formatted).
pub fn invalid_value(path: &str, json_value: &str, message: Option<&str>) -> String {
    match message {
        Some(m) => format!("Invalid value {json_value} for parameter '{path}' supplied: {m}"),
        None => format!("Invalid value {json_value} for parameter '{path}' supplied."),
    }
}

/// MLflow's `missing_value` message.
pub fn missing_value(path: &str) -> String {
    format!("Missing value for required parameter '{path}'.")
}

/// MLflow's `exceeds_maximum_length` message.
pub fn exceeds_maximum_length(path: &str, limit: usize) -> String {
    format!("'{path}' exceeds the maximum length of {limit} characters")
}

fn join_path(path: &str, value: &str) -> String {
    if path.is_empty() {
        value.to_string()
    } else if value.starts_with('[') {
        format!("{path}{value}")
    } else {
        format!("{path}.{value}")
    }
}

/// Python's `posixpath.normpath`.
pub fn normpath(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let initial = if path.starts_with('/') {
        if path.starts_with("//") && !path.starts_with("///") {
            2
        } else {
            1
        }
    } else {
        0
    };
    let mut comps: Vec<&str> = vec![];
    for comp in path.split('/') {
        if comp.is_empty() || comp == "." {
            continue;
        }
        if comp != ".." || (initial == 0 && comps.is_empty()) || comps.last() == Some(&"..") {
            comps.push(comp);
        } else if !comps.is_empty() {
            comps.pop();
        }
    }
    let joined = comps.join("/");
    let out = format!("{}{}", "/".repeat(initial), joined);
    if out.is_empty() { ".".into() } else { out }
}

fn valid_name_chars(name: &str) -> bool {
    name.chars()
        .all(|c| c.is_alphanumeric() || matches!(c, '_' | '/' | '.' | '-' | ' ' | ':'))
}

fn path_not_unique(name: &str) -> bool {
    let norm = normpath(name);
    norm != name || norm == "." || norm.starts_with("..") || norm.starts_with('/')
}

const BAD_CHARACTERS: &str = "Names may only contain alphanumerics, underscores (_), dashes (-), periods (.), \
                              spaces ( ), colon(:) and slashes (/).";

fn bad_path_message(name: &str) -> String {
    format!(
        "Names may be treated as files in certain cases, and must not resolve to other names when treated as such. \
         This name would resolve to {}",
        py_repr_str(&normpath(name))
    )
}

/// Metric, param and tag names: MLflow's character and path rules.
fn check_name(name: &str, path: &str) -> Result<(), StoreError> {
    if !valid_name_chars(name) {
        return Err(invalid(invalid_value(path, &py_json_str(name), Some(BAD_CHARACTERS))));
    }
    if path_not_unique(name) {
        return Err(invalid(invalid_value(
            path,
            &py_json_str(name),
            Some(&bad_path_message(name)),
        )));
    }
    Ok(())
}

fn char_len(s: &str) -> usize {
    s.chars().count()
}

fn check_length(entity: &str, limit: usize, value: &str) -> Result<(), StoreError> {
    if char_len(value) > limit {
        return Err(invalid(exceeds_maximum_length(entity, limit)));
    }
    Ok(())
}

/// MLflow truncates over-long param and tag values (MLFLOW_TRUNCATE_LONG_VALUES defaults to true).
fn truncate(value: &str, limit: usize) -> String {
    match value.char_indices().nth(limit) {
        Some((i, _)) => value[..i].to_string(),
        None => value.to_string(),
    }
}

/// A metric as MLflow's `_validate_metric` checks it; `path` is `""` for a
/// single metric and `metrics[i]` inside a batch.
pub fn metric(m: &Metric, path: &str) -> Result<(), StoreError> {
    check_name(&m.key, &join_path(path, "name"))?;
    if m.timestamp < 0 {
        return Err(invalid(invalid_value(
            &join_path(path, "timestamp"),
            &m.timestamp.to_string(),
            Some(&format!(
                "metric '{}' (value={}). Timestamp must be a nonnegative long (64-bit integer) ",
                m.key,
                py_float(m.value)
            )),
        )));
    }
    check_length("Metric name", MAX_ENTITY_KEY_LENGTH, &m.key)
}

/// A param (`_validate_param`); returns it with its value truncated.
pub fn param(key: &str, value: &str, path: &str) -> Result<KeyValue, StoreError> {
    check_name(key, &join_path(path, "key"))?;
    check_length("Param key", MAX_ENTITY_KEY_LENGTH, key)?;
    Ok(KeyValue::new(key, truncate(value, MAX_PARAM_VAL_LENGTH)))
}

/// A run tag (`_validate_tag`); returns it with its value truncated.
pub fn tag(key: &str, value: &str, path: &str) -> Result<KeyValue, StoreError> {
    check_name(key, &join_path(path, "key"))?;
    check_length(&join_path(path, "key"), MAX_ENTITY_KEY_LENGTH, key)?;
    Ok(KeyValue::new(key, truncate(value, MAX_TAG_VAL_LENGTH)))
}

/// An experiment tag (`_validate_experiment_tag`).
pub fn experiment_tag(key: &str, value: &str) -> Result<(), StoreError> {
    check_name(key, "key")?;
    check_length("key", MAX_EXPERIMENT_TAG_KEY_LENGTH, key)?;
    check_length("value", MAX_EXPERIMENT_TAG_VAL_LENGTH, value)
}

/// An experiment name (`_validate_experiment_name`).
pub fn experiment_name(name: &str) -> Result<(), StoreError> {
    if name.is_empty() {
        return Err(invalid(format!("Invalid experiment name: '{name}'")));
    }
    check_length("name", MAX_EXPERIMENT_NAME_LENGTH, name)
}

/// A run id (`_validate_run_id`).
pub fn run_id(run_id: &str) -> Result<(), StoreError> {
    let mut chars = run_id.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && run_id.chars().count() <= 256
        && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(invalid(invalid_value("run_id", &py_json_str(run_id), None)))
    }
}

/// An experiment id: MLflow keeps them as integers.
pub fn parse_experiment_id(id: &str) -> Result<i64, StoreError> {
    id.trim().parse::<i64>().map_err(|_| {
        invalid(format!(
            "Invalid experiment ID '{id}'. Experiment ID must be a valid integer."
        ))
    })
}

fn batch_limit(entity: &str, limit: usize, length: usize) -> Result<(), StoreError> {
    if length > limit {
        return Err(invalid(format!(
            "A batch logging request can contain at most {limit} {entity}. Got {length} {entity}. \
             Please split up {entity} across multiple requests and try again."
        )));
    }
    Ok(())
}

/// A log-batch request: every entry, then the limits, then unique param keys
/// (MLflow's order). Returns the params and tags with values truncated.
pub fn batch(
    metrics: &[Metric],
    params: &[KeyValue],
    tags: &[KeyValue],
) -> Result<(Vec<KeyValue>, Vec<KeyValue>), StoreError> {
    for (i, m) in metrics.iter().enumerate() {
        metric(m, &format!("metrics[{i}]"))?;
    }
    let params = params
        .iter()
        .enumerate()
        .map(|(i, p)| param(&p.key, &p.value, &format!("params[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let tags = tags
        .iter()
        .enumerate()
        .map(|(i, t)| tag(&t.key, &t.value, &format!("tags[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    batch_limit("metrics", MAX_METRICS_PER_BATCH, metrics.len())?;
    batch_limit("params", MAX_PARAMS_TAGS_PER_BATCH, params.len())?;
    batch_limit("tags", MAX_PARAMS_TAGS_PER_BATCH, tags.len())?;
    batch_limit(
        "metrics, params, and tags",
        MAX_ENTITIES_PER_BATCH,
        metrics.len() + params.len() + tags.len(),
    )?;
    let mut seen = std::collections::HashSet::new();
    let dupes: Vec<String> = params
        .iter()
        .filter(|p| !seen.insert(p.key.as_str()))
        .map(|p| py_repr_str(&p.key))
        .collect();
    if !dupes.is_empty() {
        return Err(invalid(format!(
            "Duplicate parameter keys have been submitted: [{}]. Please ensure the request contains only one \
             param value per param key.",
            dupes.join(", ")
        )));
    }
    Ok((params, tags))
}

/// A search page size (`_validate_max_results_param`).
pub fn max_results(max_results: i64) -> Result<usize, StoreError> {
    if max_results < 1 {
        return Err(invalid(format!(
            "Invalid value {max_results} for parameter 'max_results' supplied. It must be a positive integer"
        )));
    }
    if max_results as usize > SEARCH_MAX_RESULTS_THRESHOLD {
        return Err(invalid(format!(
            "Invalid value {max_results} for parameter 'max_results' supplied. It must be at most \
             {SEARCH_MAX_RESULTS_THRESHOLD}"
        )));
    }
    Ok(max_results as usize)
}

/// A dataset and its input tags (`_validate_dataset_inputs`).
pub fn dataset_input(d: &super::DatasetInput) -> Result<(), StoreError> {
    let ds = &d.dataset;
    check_length("name", MAX_DATASET_NAME_SIZE, &ds.name)?;
    check_length("digest", MAX_DATASET_DIGEST_SIZE, &ds.digest)?;
    check_length("source", MAX_DATASET_SOURCE_SIZE, &ds.source)?;
    if let Some(s) = &ds.schema {
        check_length("schema", MAX_DATASET_SCHEMA_SIZE, s)?;
    }
    if let Some(p) = &ds.profile {
        check_length("profile", MAX_DATASET_PROFILE_SIZE, p)?;
    }
    for t in &d.tags {
        check_length("key", MAX_INPUT_TAG_KEY_SIZE, &t.key)?;
        check_length("value", MAX_INPUT_TAG_VALUE_SIZE, &t.value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_values_like_python() {
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(0.5), "0.5");
        assert_eq!(py_float(1e-5), "1e-05");
        assert_eq!(py_float(0.0001), "0.0001");
        assert_eq!(py_float(1e16), "1e+16");
        assert_eq!(py_float(123456789012345.0), "123456789012345.0");
        assert_eq!(py_float(-2.5e300), "-2.5e+300");
        assert_eq!(py_float(f64::NAN), "nan");
        assert_eq!(py_json_str("a/../b"), "\"a/../b\"");
        assert_eq!(py_json_str("é"), "\"\\u00e9\"");
        assert_eq!(py_repr_str("it's"), "\"it's\"");
        assert_eq!(py_repr_str("b"), "'b'");
    }

    #[test]
    fn normalises_paths_like_posixpath() {
        assert_eq!(normpath("a/../b"), "b");
        assert_eq!(normpath("./a"), "a");
        assert_eq!(normpath("/a//b/"), "/a/b");
        assert_eq!(normpath("//a"), "//a");
        assert_eq!(normpath("../a"), "../a");
        assert_eq!(normpath(""), ".");
        assert!(path_not_unique("a/"));
        assert!(!path_not_unique("a/b"));
        assert!(!path_not_unique("loss"));
    }

    #[test]
    fn refuses_what_mlflow_refuses() {
        let m = |key: &str, ts: i64| Metric {
            key: key.into(),
            value: 1.0,
            timestamp: ts,
            step: 0,
        };
        assert_eq!(
            metric(&m("a/../b", 1), "metrics[0]").unwrap_err().to_string(),
            "Invalid value \"a/../b\" for parameter 'metrics[0].name' supplied: Names may be treated as files in \
             certain cases, and must not resolve to other names when treated as such. This name would resolve to 'b'"
        );
        assert_eq!(
            metric(&m("a", -1), "metrics[0]").unwrap_err().to_string(),
            "Invalid value -1 for parameter 'metrics[0].timestamp' supplied: metric 'a' (value=1.0). Timestamp must \
             be a nonnegative long (64-bit integer) "
        );
        assert_eq!(
            tag("bad*key", "1", "tags[0]").unwrap_err().to_string(),
            "Invalid value \"bad*key\" for parameter 'tags[0].key' supplied: Names may only contain alphanumerics, \
             underscores (_), dashes (-), periods (.), spaces ( ), colon(:) and slashes (/)."
        );
        assert_eq!(
            tag(&"x".repeat(251), "v", "").unwrap_err().to_string(),
            "'key' exceeds the maximum length of 250 characters"
        );
        assert_eq!(param("p", &"x".repeat(6001), "").unwrap().value.len(), 6000);
        assert_eq!(tag("t", &"é".repeat(9000), "").unwrap().value.chars().count(), 8000);
        assert_eq!(
            run_id("bad id").unwrap_err().to_string(),
            "Invalid value \"bad id\" for parameter 'run_id' supplied."
        );
        assert!(run_id("0123abcd").is_ok());
    }

    #[test]
    fn enforces_batch_limits_in_mlflows_order() {
        let ms: Vec<Metric> = (0..1001)
            .map(|i| Metric {
                key: format!("k{i}"),
                value: 1.0,
                timestamp: 1,
                step: 0,
            })
            .collect();
        assert_eq!(
            batch(&ms, &[], &[]).unwrap_err().to_string(),
            "A batch logging request can contain at most 1000 metrics. Got 1001 metrics. Please split up metrics \
             across multiple requests and try again."
        );
        let ps: Vec<KeyValue> = (0..60).map(|i| KeyValue::new(format!("p{i}"), "1")).collect();
        assert_eq!(
            batch(&ms[..950], &ps, &[]).unwrap_err().to_string(),
            "A batch logging request can contain at most 1000 metrics, params, and tags. Got 1010 metrics, params, \
             and tags. Please split up metrics, params, and tags across multiple requests and try again."
        );
        let dup = [KeyValue::new("z", "3"), KeyValue::new("z", "4")];
        assert_eq!(
            batch(&[], &dup, &[]).unwrap_err().to_string(),
            "Duplicate parameter keys have been submitted: ['z']. Please ensure the request contains only one param \
             value per param key."
        );
    }
}
