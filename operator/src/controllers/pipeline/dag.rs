//! A Pipeline's steps as a DAG: what each step input refers to, the
//! dependencies that follow, a topological order, and the checks that make
//! a bad spec `Ready=False` naming the field.
//!
//! Owns: reference resolution and cycle detection. Pure.
//!
//! - A step input `${{inputs.<x>}}` is the pipeline input `x`;
//!   `${{steps.<s>.outputs.<o>}}` is output `o` of step `s` and makes the step
//!   depend on `s`; anything else is a URI read as is.
//! - In a step's command and args, `${{inputs.<x>}}` is the step input `x`,
//!   or, when the step has none of that name, the pipeline input `x` (an
//!   implicit input); `${{outputs.<o>}}` one of its outputs; `${{params.<p>}}`
//!   one of its params.
//! - Unknown steps, outputs, pipeline inputs or placeholders are
//!   `InvalidReference`/`InvalidPlaceholder`; a cycle is `DependencyCycle`,
//!   naming its steps in order (`a -> b -> a`).
//! - The order is Kahn's algorithm taking ready steps in spec order, so it
//!   is stable for a given spec.
use std::collections::{BTreeMap, BTreeSet};

use crate::api::PipelineSpec;
use crate::controllers::run::substitute::{Namespace, Values, references, substitute_all};

/// What a step input is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// The pipeline input of this name.
    Pipeline(String),
    /// Output `output` of the step at index `step`.
    Step { step: usize, output: String },
    /// A URI, read as is.
    Uri(String),
}

/// A spec that cannot run: a Ready reason and a message naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DagError {
    /// `InvalidReference`, `InvalidPlaceholder` or `DependencyCycle`.
    pub reason: &'static str,
    /// Names the field (or the steps of the cycle).
    pub message: String,
}

impl DagError {
    fn reference(message: String) -> Self {
        Self {
            reason: "InvalidReference",
            message,
        }
    }
}

/// The resolved DAG of a pipeline's steps (indices into `spec.steps`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dag {
    /// Step name -> index.
    pub index: BTreeMap<String, usize>,
    /// Per step: its inputs (named ones and implicit pipeline inputs).
    pub inputs: Vec<BTreeMap<String, Source>>,
    /// Per step: the steps it depends on.
    pub upstream: Vec<BTreeSet<usize>>,
    /// Per step: the steps that depend on it.
    pub downstream: Vec<BTreeSet<usize>>,
    /// A topological order of all steps.
    pub order: Vec<usize>,
}

impl Dag {
    /// Number of steps.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether there are no steps.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Every step downstream of `step` (transitively), not `step` itself.
    pub fn descendants(&self, step: usize) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        let mut todo: Vec<usize> = self.downstream[step].iter().copied().collect();
        while let Some(s) = todo.pop() {
            if out.insert(s) {
                todo.extend(self.downstream[s].iter().copied());
            }
        }
        out
    }
}

/// A step input value that is a reference.
enum Reference {
    /// `${{inputs.<name>}}`.
    Input(String),
    /// `${{steps.<step>.outputs.<output>}}`.
    Output(String, String),
    /// `${{...}}` of neither form.
    Malformed,
}

/// Parses one step input value (`None`: not a reference, a URI).
fn parse_source(value: &str) -> Option<Reference> {
    let inner = value.strip_prefix("${{")?.strip_suffix("}}")?.trim();
    if let Some(name) = inner.strip_prefix("inputs.") {
        return Some(Reference::Input(name.to_string()));
    }
    Some(
        match inner.strip_prefix("steps.").and_then(|r| r.split_once(".outputs.")) {
            Some((s, o)) => Reference::Output(s.to_string(), o.to_string()),
            None => Reference::Malformed,
        },
    )
}

fn known(names: impl Iterator<Item = impl AsRef<str>>) -> String {
    let v: Vec<String> = names.map(|n| n.as_ref().to_string()).collect();
    if v.is_empty() { "none".into() } else { v.join(", ") }
}

/// Resolves every reference of `spec` and orders the steps.
pub fn build(spec: &PipelineSpec) -> Result<Dag, DagError> {
    let index: BTreeMap<String, usize> = spec
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    let n = spec.steps.len();
    let mut inputs = vec![BTreeMap::new(); n];
    let mut upstream = vec![BTreeSet::new(); n];
    for (i, step) in spec.steps.iter().enumerate() {
        for (k, v) in &step.inputs {
            let field = format!("spec.steps[{i}].inputs.{k}");
            let source = match parse_source(v) {
                None => Source::Uri(v.clone()),
                Some(Reference::Malformed) => {
                    return Err(DagError::reference(format!(
                        "{field}: {v:?} is neither ${{{{inputs.<name>}}}}, ${{{{steps.<step>.outputs.<output>}}}} nor a URI"
                    )));
                }
                Some(Reference::Input(input)) => {
                    if !spec.inputs.contains_key(&input) {
                        return Err(DagError::reference(format!(
                            "{field}: unknown pipeline input {input:?} (spec.inputs has {})",
                            known(spec.inputs.keys())
                        )));
                    }
                    Source::Pipeline(input)
                }
                Some(Reference::Output(s, o)) => {
                    let Some(&j) = index.get(&s) else {
                        return Err(DagError::reference(format!(
                            "{field}: unknown step {s:?} (steps are {})",
                            known(spec.steps.iter().map(|s| &s.name))
                        )));
                    };
                    if !spec.steps[j].outputs.contains_key(&o) {
                        return Err(DagError::reference(format!(
                            "{field}: step {s:?} has no output {o:?} (its outputs are {})",
                            known(spec.steps[j].outputs.keys())
                        )));
                    }
                    upstream[i].insert(j);
                    Source::Step { step: j, output: o }
                }
            };
            inputs[i].insert(k.clone(), source);
        }
        // Implicit pipeline inputs, and every placeholder known.
        for (field, items) in [("command", &step.command), ("args", &step.args)] {
            for (j, item) in items.iter().enumerate() {
                let field = format!("spec.steps[{i}].{field}[{j}]");
                let refs = references(&field, item).map_err(|e| DagError {
                    reason: "InvalidPlaceholder",
                    message: e.to_string(),
                })?;
                for r in refs {
                    if r.namespace == Namespace::Inputs
                        && !step.inputs.contains_key(&r.name)
                        && spec.inputs.contains_key(&r.name)
                    {
                        inputs[i].insert(r.name.clone(), Source::Pipeline(r.name));
                    }
                }
            }
        }
        let fake_inputs: BTreeMap<String, String> = inputs[i].keys().map(|k| (k.clone(), String::new())).collect();
        let fake_outputs: BTreeMap<String, String> = step.outputs.keys().map(|k| (k.clone(), String::new())).collect();
        let values = Values {
            params: &step.params,
            inputs: &fake_inputs,
            outputs: &fake_outputs,
        };
        for (field, items) in [("command", &step.command), ("args", &step.args)] {
            substitute_all(&format!("spec.steps[{i}].{field}"), items, &values).map_err(|e| DagError {
                reason: "InvalidPlaceholder",
                message: e.to_string(),
            })?;
        }
    }
    let mut downstream = vec![BTreeSet::new(); n];
    for (i, ups) in upstream.iter().enumerate() {
        for &u in ups {
            downstream[u].insert(i);
        }
    }
    let order = topological_order(&upstream, &downstream).map_err(|left| DagError {
        reason: "DependencyCycle",
        message: format!(
            "spec.steps: the steps depend on each other in a cycle: {}",
            describe_cycle(&find_cycle(&upstream, &left), spec)
        ),
    })?;
    Ok(Dag {
        index,
        inputs,
        upstream,
        downstream,
        order,
    })
}

/// Kahn's algorithm, ready steps in index order; on a cycle the steps left.
pub fn topological_order(
    upstream: &[BTreeSet<usize>],
    downstream: &[BTreeSet<usize>],
) -> Result<Vec<usize>, BTreeSet<usize>> {
    let n = upstream.len();
    let mut waiting: Vec<usize> = upstream.iter().map(BTreeSet::len).collect();
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &d in &downstream[i] {
            waiting[d] -= 1;
            if waiting[d] == 0 {
                ready.insert(d);
            }
        }
    }
    if order.len() == n {
        Ok(order)
    } else {
        let done: BTreeSet<usize> = order.into_iter().collect();
        Err((0..n).filter(|i| !done.contains(i)).collect())
    }
}

/// One cycle among `left` (steps Kahn's algorithm could not order): walk
/// upstream from the smallest until a step repeats.
fn find_cycle(upstream: &[BTreeSet<usize>], left: &BTreeSet<usize>) -> Vec<usize> {
    let Some(&start) = left.first() else { return vec![] };
    let mut path = vec![start];
    let mut seen = BTreeMap::from([(start, 0usize)]);
    let mut at = start;
    loop {
        // Every step left has an upstream step left (else it would be ordered).
        let Some(&next) = upstream[at].iter().find(|u| left.contains(u)) else {
            return path;
        };
        if let Some(&pos) = seen.get(&next) {
            let mut cycle: Vec<usize> = path[pos..].to_vec();
            // As dependencies flow (upstream first), from the first in spec order.
            cycle.reverse();
            if let Some(min) = cycle.iter().enumerate().min_by_key(|(_, s)| **s).map(|(i, _)| i) {
                cycle.rotate_left(min);
            }
            return cycle;
        }
        seen.insert(next, path.len());
        path.push(next);
        at = next;
    }
}

fn describe_cycle(cycle: &[usize], spec: &PipelineSpec) -> String {
    let mut names: Vec<&str> = cycle.iter().map(|&i| spec.steps[i].name.as_str()).collect();
    if let Some(first) = names.first().copied() {
        names.push(first);
    }
    names.join(" -> ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn spec(steps: serde_json::Value) -> PipelineSpec {
        serde_json::from_value(json!({
            "environment": {"image": "python:3.12"},
            "inputs": {"raw": {"dataAsset": "sales"}},
            "steps": steps,
        }))
        .unwrap()
    }

    fn three() -> serde_json::Value {
        json!([
            {"name": "prep", "command": ["prep", "${{inputs.raw}}", "${{outputs.clean}}"], "outputs": {"clean": {}}},
            {"name": "train", "inputs": {"data": "${{steps.prep.outputs.clean}}"},
             "command": ["train", "${{inputs.data}}", "${{outputs.model}}", "${{params.lr}}"],
             "params": {"lr": 0.1}, "outputs": {"model": {}}},
            {"name": "eval", "inputs": {"m": "${{steps.train.outputs.model}}", "d": "${{steps.prep.outputs.clean}}",
                                        "extra": "s3://b/extra/"},
             "command": ["eval", "${{inputs.m}}", "${{inputs.d}}"]}
        ])
    }

    #[test]
    fn references_become_dependencies_and_an_order() {
        let dag = build(&spec(three())).unwrap();
        assert_eq!(dag.order, [0, 1, 2]);
        assert_eq!(dag.upstream[2], BTreeSet::from([0, 1]));
        assert_eq!(
            dag.inputs[0]["raw"],
            Source::Pipeline("raw".into()),
            "implicit pipeline input"
        );
        assert_eq!(
            dag.inputs[1]["data"],
            Source::Step {
                step: 0,
                output: "clean".into()
            }
        );
        assert_eq!(dag.inputs[2]["extra"], Source::Uri("s3://b/extra/".into()));
        assert_eq!(dag.descendants(0), BTreeSet::from([1, 2]));
        assert_eq!(dag.descendants(2), BTreeSet::new());
        // Spec order does not matter.
        let mut steps = three();
        steps.as_array_mut().unwrap().reverse();
        let dag = build(&spec(steps)).unwrap();
        assert_eq!(dag.order, [2, 1, 0]);
    }

    #[test]
    fn unknown_references_name_the_field() {
        let mut s = three();
        s[1]["inputs"]["data"] = json!("${{steps.prepp.outputs.clean}}");
        let e = build(&spec(s)).unwrap_err();
        assert_eq!(e.reason, "InvalidReference");
        assert_eq!(
            e.message,
            "spec.steps[1].inputs.data: unknown step \"prepp\" (steps are prep, train, eval)"
        );
        let mut s = three();
        s[1]["inputs"]["data"] = json!("${{steps.prep.outputs.dirty}}");
        let e = build(&spec(s)).unwrap_err();
        assert_eq!(
            e.message,
            "spec.steps[1].inputs.data: step \"prep\" has no output \"dirty\" (its outputs are clean)"
        );
        let mut s = three();
        s[1]["inputs"]["data"] = json!("${{inputs.nope}}");
        let e = build(&spec(s)).unwrap_err();
        assert!(
            e.message
                .contains("unknown pipeline input \"nope\" (spec.inputs has raw)"),
            "{e}"
        );
        let mut s = three();
        s[2]["command"] = json!(["eval", "${{inputs.missing}}"]);
        let e = build(&spec(s)).unwrap_err();
        assert_eq!(e.reason, "InvalidPlaceholder");
        assert!(
            e.message.starts_with("spec.steps[2].command[1]: unknown placeholder"),
            "{e}"
        );
        let mut s = three();
        s[0]["command"] = json!(["prep", "${{outputs.other}}"]);
        assert_eq!(build(&spec(s)).unwrap_err().reason, "InvalidPlaceholder");
    }

    #[test]
    fn cycles_are_refused_naming_their_steps() {
        let s = json!([
            {"name": "a", "inputs": {"x": "${{steps.c.outputs.o}}"}, "command": ["a"], "outputs": {"o": {}}},
            {"name": "b", "inputs": {"x": "${{steps.a.outputs.o}}"}, "command": ["b"], "outputs": {"o": {}}},
            {"name": "c", "inputs": {"x": "${{steps.b.outputs.o}}"}, "command": ["c"], "outputs": {"o": {}}},
            {"name": "free", "command": ["f"]}
        ]);
        let e = build(&spec(s)).unwrap_err();
        assert_eq!(e.reason, "DependencyCycle");
        assert_eq!(
            e.message,
            "spec.steps: the steps depend on each other in a cycle: a -> b -> c -> a"
        );
        let s = json!([{"name": "self", "inputs": {"x": "${{steps.self.outputs.o}}"}, "command": ["s"], "outputs": {"o": {}}}]);
        let e = build(&spec(s)).unwrap_err();
        assert_eq!(
            e.message,
            "spec.steps: the steps depend on each other in a cycle: self -> self"
        );
    }
}
