//! `${{params.x}}`, `${{inputs.x}}` and `${{outputs.x}}` placeholders in a
//! run's command and arguments (the placeholders of the hosted service's
//! YAML).
//!
//! Owns: parsing and substituting placeholders. Must not touch the API server
//! or decide where inputs and outputs live: the caller passes their locations.
//!
//! Rules:
//! - A placeholder is `${{` + `<namespace>.<name>` + `}}`; spaces just inside
//!   the braces are allowed (`${{ params.lr }}`). Text around placeholders is
//!   kept, and one string may hold several.
//! - Namespaces are `params`, `inputs` and `outputs`. Any other namespace, a
//!   missing name or an unterminated `${{` is an error naming the field and
//!   the placeholder, e.g. `spec.command[3]: unknown placeholder
//!   ${{params.lrr}}`.
//! - Parameters are rendered with [`ParamValue::render`] (strings verbatim,
//!   numbers and booleans as JSON writes them).
//! - `$${{` is an escape: it yields a literal `${{` and starts no placeholder.
use std::collections::BTreeMap;
use std::fmt;

use crate::api::shared::Params;

/// The namespace of a placeholder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Namespace {
    /// `${{params.x}}`.
    Params,
    /// `${{inputs.x}}`.
    Inputs,
    /// `${{outputs.x}}`.
    Outputs,
}

impl Namespace {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "params" => Some(Self::Params),
            "inputs" => Some(Self::Inputs),
            "outputs" => Some(Self::Outputs),
            _ => None,
        }
    }

    /// As written in a placeholder.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Params => "params",
            Self::Inputs => "inputs",
            Self::Outputs => "outputs",
        }
    }
}

/// A placeholder found in a string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// Its namespace.
    pub namespace: Namespace,
    /// The name after the namespace.
    pub name: String,
}

/// What went wrong with one placeholder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// A known namespace but a name with no value.
    Unknown,
    /// Not `params.`, `inputs.` or `outputs.`.
    UnknownNamespace,
    /// `${{` without `}}`.
    Unterminated,
}

/// An unusable placeholder, located by field (`spec.command[3]`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct SubstituteError {
    /// Where, e.g. `spec.command[3]`.
    pub field: String,
    /// The placeholder as written, e.g. `${{params.lrr}}`.
    pub placeholder: String,
    /// What is wrong with it.
    pub kind: ProblemKind,
}

impl fmt::Display for SubstituteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ProblemKind::Unknown => write!(f, "{}: unknown placeholder {}", self.field, self.placeholder),
            ProblemKind::UnknownNamespace => write!(
                f,
                "{}: unknown placeholder {} (expected ${{{{params.<name>}}}}, ${{{{inputs.<name>}}}} or \
                 ${{{{outputs.<name>}}}})",
                self.field, self.placeholder
            ),
            ProblemKind::Unterminated => write!(
                f,
                "{}: unterminated placeholder {} (missing }}}})",
                self.field, self.placeholder
            ),
        }
    }
}

/// The values placeholders are replaced with.
#[derive(Clone, Copy, Debug)]
pub struct Values<'a> {
    /// Parameters (after sweep sampling).
    pub params: &'a Params,
    /// Input name -> location in the pod (path or URI).
    pub inputs: &'a BTreeMap<String, String>,
    /// Output name -> location in the pod (path or URI).
    pub outputs: &'a BTreeMap<String, String>,
}

impl Values<'_> {
    fn lookup(&self, ns: Namespace, name: &str) -> Option<String> {
        match ns {
            Namespace::Params => self.params.get(name).map(|v| v.render()),
            Namespace::Inputs => self.inputs.get(name).cloned(),
            Namespace::Outputs => self.outputs.get(name).cloned(),
        }
    }
}

/// One piece of a parsed string.
enum Piece<'s> {
    Text(&'s str),
    Placeholder { raw: &'s str, inner: &'s str },
}

/// Splits `s` into literal text and placeholders. Errors carry the raw text
/// of the unterminated placeholder.
fn parse(s: &str) -> Result<Vec<Piece<'_>>, &str> {
    let mut pieces = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find("${{") {
        // `$${{` escapes: emit text up to and including one `$`, then `{{`.
        if at > 0 && rest.as_bytes()[at - 1] == b'$' {
            pieces.push(Piece::Text(&rest[..at - 1]));
            pieces.push(Piece::Text(&rest[at..at + 3]));
            rest = &rest[at + 3..];
            continue;
        }
        pieces.push(Piece::Text(&rest[..at]));
        let after = &rest[at + 3..];
        let Some(end) = after.find("}}") else {
            return Err(&rest[at..]);
        };
        pieces.push(Piece::Placeholder {
            raw: &rest[at..at + 3 + end + 2],
            inner: &after[..end],
        });
        rest = &after[end + 2..];
    }
    pieces.push(Piece::Text(rest));
    Ok(pieces)
}

fn reference(inner: &str) -> Option<Reference> {
    let (ns, name) = inner.trim().split_once('.')?;
    let namespace = Namespace::parse(ns)?;
    (!name.is_empty()).then(|| Reference {
        namespace,
        name: name.to_string(),
    })
}

/// Substitutes every placeholder of `s`. `field` names where `s` came from
/// and is only used in errors.
pub fn substitute(field: &str, s: &str, values: &Values<'_>) -> Result<String, SubstituteError> {
    let err = |placeholder: &str, kind| SubstituteError {
        field: field.to_string(),
        placeholder: placeholder.to_string(),
        kind,
    };
    let pieces = parse(s).map_err(|raw| err(raw, ProblemKind::Unterminated))?;
    let mut out = String::with_capacity(s.len());
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Placeholder { raw, inner } => {
                let r = reference(inner).ok_or_else(|| err(raw, ProblemKind::UnknownNamespace))?;
                let v = values
                    .lookup(r.namespace, &r.name)
                    .ok_or_else(|| err(raw, ProblemKind::Unknown))?;
                out.push_str(&v);
            }
        }
    }
    Ok(out)
}

/// Substitutes every element of a list; errors name `<field>[<index>]`.
pub fn substitute_all(field: &str, items: &[String], values: &Values<'_>) -> Result<Vec<String>, SubstituteError> {
    items
        .iter()
        .enumerate()
        .map(|(i, s)| substitute(&format!("{field}[{i}]"), s, values))
        .collect()
}

/// Every well-formed placeholder of `s`, in order (for validation and for
/// finding which inputs a command uses). Errors as [`substitute`] does for
/// malformed ones; unknown names are not checked here.
pub fn references(field: &str, s: &str) -> Result<Vec<Reference>, SubstituteError> {
    let err = |placeholder: &str, kind| SubstituteError {
        field: field.to_string(),
        placeholder: placeholder.to_string(),
        kind,
    };
    let pieces = parse(s).map_err(|raw| err(raw, ProblemKind::Unterminated))?;
    pieces
        .into_iter()
        .filter_map(|p| match p {
            Piece::Text(_) => None,
            Piece::Placeholder { raw, inner } => {
                Some(reference(inner).ok_or_else(|| err(raw, ProblemKind::UnknownNamespace)))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::shared::ParamValue;
    use serde_json::json;

    fn params() -> Params {
        Params::from([
            ("lr".to_string(), ParamValue(json!(0.01))),
            ("epochs".to_string(), ParamValue(json!(10))),
            ("opt".to_string(), ParamValue(json!("adam"))),
            ("amp".to_string(), ParamValue(json!(true))),
        ])
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn with<T>(f: impl FnOnce(&Values<'_>) -> T) -> T {
        let p = params();
        let i = map(&[("train", "/mnt/inputs/train")]);
        let o = map(&[("model", "/mnt/outputs/model")]);
        f(&Values {
            params: &p,
            inputs: &i,
            outputs: &o,
        })
    }

    #[test]
    fn substitutes_each_namespace_and_keeps_literal_text() {
        with(|v| {
            let cmd: Vec<String> = [
                "python",
                "train.py",
                "--lr",
                "${{params.lr}}",
                "--data=${{inputs.train}}/shard",
                "${{outputs.model}}",
                "${{params.epochs}}x${{params.opt}}-${{params.amp}}",
                "${{ params.lr }}",
                "no placeholders {{here}} $x ${not}",
            ]
            .map(String::from)
            .to_vec();
            let out = substitute_all("spec.command", &cmd, v).unwrap();
            assert_eq!(
                out,
                [
                    "python",
                    "train.py",
                    "--lr",
                    "0.01",
                    "--data=/mnt/inputs/train/shard",
                    "/mnt/outputs/model",
                    "10xadam-true",
                    "0.01",
                    "no placeholders {{here}} $x ${not}",
                ]
            );
        });
    }

    #[test]
    fn unknown_name_is_an_error_naming_field_and_placeholder() {
        with(|v| {
            let cmd = ["python", "t.py", "--lr", "${{params.lrr}}"].map(String::from).to_vec();
            let e = substitute_all("spec.command", &cmd, v).unwrap_err();
            assert_eq!(e.to_string(), "spec.command[3]: unknown placeholder ${{params.lrr}}");
            assert_eq!(e.kind, ProblemKind::Unknown);
            let e = substitute("spec.steps[0].args[1]", "${{outputs.clean}}", v).unwrap_err();
            assert_eq!(
                e.to_string(),
                "spec.steps[0].args[1]: unknown placeholder ${{outputs.clean}}"
            );
            // An input name is not looked up among outputs.
            assert!(substitute("f", "${{outputs.train}}", v).is_err());
        });
    }

    #[test]
    fn unknown_namespace_and_malformed_placeholders() {
        with(|v| {
            let e = substitute("spec.command[1]", "--x=${{foo.x}}", v).unwrap_err();
            assert_eq!(e.kind, ProblemKind::UnknownNamespace);
            assert!(
                e.to_string()
                    .starts_with("spec.command[1]: unknown placeholder ${{foo.x}} (expected ${{params.<name>}}"),
                "{e}"
            );
            for bad in ["${{params}}", "${{params.}}", "${{}}", "${{steps.prep.outputs.clean}}"] {
                let e = substitute("f", bad, v).unwrap_err();
                assert_eq!((e.kind, e.placeholder.as_str()), (ProblemKind::UnknownNamespace, bad));
            }
            let e = substitute("spec.command[0]", "a ${{params.lr", v).unwrap_err();
            assert_eq!(e.kind, ProblemKind::Unterminated);
            assert_eq!(
                e.to_string(),
                "spec.command[0]: unterminated placeholder ${{params.lr (missing }})"
            );
        });
    }

    #[test]
    fn dollar_escape_yields_literal_placeholder() {
        with(|v| {
            assert_eq!(substitute("f", "$${{params.lr}}", v).unwrap(), "${{params.lr}}");
            assert_eq!(
                substitute("f", "$${{x}} and ${{params.lr}}", v).unwrap(),
                "${{x}} and 0.01"
            );
            assert!(references("f", "$${{foo.x}}").unwrap().is_empty());
        });
    }

    #[test]
    fn references_lists_placeholders() {
        let r = references("f", "${{inputs.a}}:${{outputs.b}}:${{params.c}}").unwrap();
        assert_eq!(
            r.iter().map(|r| (r.namespace, r.name.as_str())).collect::<Vec<_>>(),
            [
                (Namespace::Inputs, "a"),
                (Namespace::Outputs, "b"),
                (Namespace::Params, "c")
            ]
        );
        assert_eq!(Namespace::Inputs.as_str(), "inputs");
        assert!(references("f", "${{nope.a}}").is_err());
    }

    #[test]
    fn values_are_not_rescanned() {
        // A value that itself looks like a placeholder is inserted verbatim.
        let p = Params::from([("x".to_string(), ParamValue(json!("${{params.y}}")))]);
        let empty = BTreeMap::new();
        let v = Values {
            params: &p,
            inputs: &empty,
            outputs: &empty,
        };
        assert_eq!(substitute("f", "${{params.x}}", &v).unwrap(), "${{params.y}}");
    }
}
