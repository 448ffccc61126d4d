//! Test helpers: evaluate a CRD's CEL rules (`x-kubernetes-validations`)
//! client-side with kube's `cel` feature, the way the API server would.
//! Only the CEL rules are evaluated here; OpenAPI value validations (enum,
//! pattern, minimum, ...) are checked against a real API server by the
//! fixtures in tests/fixtures.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel::Validator;
use serde_json::Value;

/// The openAPIV3Schema of the CRD's first version, as JSON.
pub fn schema_of(crd: &CustomResourceDefinition) -> Value {
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("CRD has a schema"),
    )
    .expect("schema serializes")
}

/// Evaluate the CEL rules; errors rendered as "<fieldPath>: <message>".
pub fn validate(crd: &CustomResourceDefinition, obj: &Value, old: Option<&Value>) -> Result<(), Vec<String>> {
    let schema = schema_of(crd);
    Validator::new()
        .validate(&schema, obj, old)
        .map_err(|errs| errs.iter().map(|e| format!("{e} [{:?}]", e.kind)).collect())
}

/// Assert that every rule passes on create.
#[track_caller]
pub fn assert_valid(crd: &CustomResourceDefinition, obj: &Value) {
    if let Err(errs) = validate(crd, obj, None) {
        panic!("expected valid, got {errs:#?}\nobject: {obj:#}");
    }
}

/// Assert that every rule passes on update from `old`.
#[track_caller]
pub fn assert_valid_update(crd: &CustomResourceDefinition, obj: &Value, old: &Value) {
    if let Err(errs) = validate(crd, obj, Some(old)) {
        panic!("expected valid update, got {errs:#?}\nobject: {obj:#}");
    }
}

/// Assert that exactly the rule whose message contains `expect` fails (other
/// rules must pass, so each invalid case tests one rule), and that it failed
/// by evaluating to false, not by an evaluation error.
#[track_caller]
pub fn assert_invalid(crd: &CustomResourceDefinition, obj: &Value, expect: &str) {
    match validate(crd, obj, None) {
        Ok(()) => panic!("expected an error containing {expect:?}, object was accepted:\n{obj:#}"),
        Err(errs) => {
            assert!(
                errs.iter()
                    .all(|e| e.contains(expect) && e.ends_with("[ValidationFailure]")),
                "expected only failures containing {expect:?}, got {errs:#?}\nobject: {obj:#}"
            );
        }
    }
}

/// Return `v` with the value at JSON pointer `ptr` replaced (or inserted;
/// parent objects are created as needed, `-` appends to an array).
pub fn set(mut v: Value, ptr: &str, new: Value) -> Value {
    let (parent, last) = ptr.rsplit_once('/').expect("pointer starts with /");
    let mut cur = &mut v;
    for part in parent.split('/').skip(1) {
        cur = match cur {
            Value::Array(a) => &mut a[part.parse::<usize>().expect("array index")],
            Value::Object(o) => o
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Default::default())),
            other => panic!("cannot descend into {other}"),
        };
    }
    match cur {
        Value::Array(a) if last == "-" => a.push(new),
        Value::Array(a) => a[last.parse::<usize>().expect("array index")] = new,
        Value::Object(o) => {
            o.insert(last.to_string(), new);
        }
        other => panic!("cannot set in {other}"),
    }
    v
}

/// Return `v` with the key at JSON pointer `ptr` removed.
pub fn unset(mut v: Value, ptr: &str) -> Value {
    let (parent, last) = ptr.rsplit_once('/').expect("pointer starts with /");
    let target = if parent.is_empty() {
        Some(&mut v)
    } else {
        v.pointer_mut(parent)
    };
    match target {
        Some(Value::Object(o)) => {
            o.remove(last);
        }
        Some(Value::Array(a)) => {
            a.remove(last.parse::<usize>().expect("array index"));
        }
        _ => panic!("nothing at {ptr}"),
    }
    v
}
