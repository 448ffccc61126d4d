//! The traffic split: what the spec asks for (desired), what is actually
//! routed (effective), and which deployment the endpoint Service selects.
//!
//! Owns: the safe-rollout rules below and a Deployment's availability as they
//! see it. Must not touch the API server.
//!
//! Availability of a serving Deployment:
//! - it may *join* the split (get traffic it did not have, or a mirror) once
//!   its rollout is complete: the Deployment controller has seen its current
//!   spec, every desired replica is updated and available (`Available=True`),
//!   and it has at least one replica;
//! - it may *stay* in the split while it has at least one available replica
//!   (a lost pod or an autoscaler scale-up does not move traffic away).
//!
//! Effective split, from the desired one and the previous effective one:
//! 1. every deployment the desired split sends traffic to may join or stay:
//!    the desired split;
//! 2. otherwise the previous split stays, less the deployments gone from the
//!    spec or with no available replica, their share given to the rest of it
//!    in proportion;
//! 3. if nothing of it remains (first rollout), the desired split restricted
//!    to the deployments that may join, in proportion; possibly nothing.
//!
//! So moving traffic to a deployment whose pods are not ready changes nothing
//! until they are, and traffic is never sent to a deployment that cannot
//! serve while another can. A mirror follows the same join/stay rule and is
//! dropped while its target takes live traffic.
use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;

use crate::api::model_deployment::ModelDeploymentSpec;

/// Deployment name -> percent (entries > 0 only).
pub type Split = BTreeMap<String, i32>;

/// Reason of the Deployment condition `Progressing=False` after its
/// progress deadline.
pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";

/// What the split rules need to know about one serving Deployment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Availability {
    /// Replicas asked for (by the spec or its autoscaler).
    pub replicas: i32,
    /// Ready replicas.
    pub ready: i32,
    /// Available replicas (ready for at least `minReadySeconds`).
    pub available: i32,
    /// The rollout of its current spec is complete.
    pub complete: bool,
    /// The rollout exceeded its progress deadline.
    pub stalled: bool,
    /// A new spec is rolling out (not yet seen by the Deployment controller,
    /// or not every replica updated).
    pub rolling_out: bool,
}

impl Availability {
    /// May get traffic (or a mirror) it does not have yet.
    pub fn may_join(&self) -> bool {
        self.complete && self.available >= 1
    }

    /// May keep the traffic it has.
    pub fn may_stay(&self) -> bool {
        self.available >= 1
    }
}

/// Availability of a live Deployment (`None`: not created yet).
pub fn availability(d: Option<&Deployment>) -> Availability {
    let Some(d) = d else { return Availability::default() };
    let status = d.status.clone().unwrap_or_default();
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let conditions = status.conditions.unwrap_or_default();
    let condition = |t: &str| conditions.iter().find(|c| c.type_ == t);
    let seen = status.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    let rolling_out = !seen || status.updated_replicas.unwrap_or(0) < replicas;
    let complete = !rolling_out && condition("Available").is_some_and(|c| c.status == "True") && available >= replicas;
    let stalled = condition("Progressing")
        .is_some_and(|c| c.status == "False" && c.reason.as_deref() == Some(PROGRESS_DEADLINE_EXCEEDED));
    Availability {
        replicas,
        ready: status.ready_replicas.unwrap_or(0),
        available,
        complete,
        stalled,
        rolling_out,
    }
}

/// The split the spec asks for: `spec.traffic` (entries > 0), or all of it
/// to the only deployment when `traffic` is omitted.
pub fn desired_split(spec: &ModelDeploymentSpec) -> Split {
    if spec.traffic.is_empty() && spec.deployments.len() == 1 {
        return Split::from([(spec.deployments[0].name.clone(), 100)]);
    }
    spec.traffic
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// The mirror the spec asks for (entries > 0).
pub fn desired_mirror(spec: &ModelDeploymentSpec) -> Split {
    spec.mirror_traffic
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// Whether routing `split` and `mirror` takes more than one Service: a
/// weighted split or a mirror needs Gateway API.
pub fn needs_gateway(split: &Split, mirror: &Split) -> bool {
    split.len() > 1 || !mirror.is_empty()
}

/// `split` scaled to sum to 100 (largest remainder; ties to the name that
/// sorts first). Empty stays empty.
pub fn normalize(split: &Split) -> Split {
    let total: i64 = split.values().map(|v| i64::from(*v)).sum();
    if total <= 0 {
        return Split::new();
    }
    if total == 100 {
        return split.clone();
    }
    let mut out: Split = split
        .iter()
        .map(|(k, v)| (k.clone(), (i64::from(*v) * 100 / total) as i32))
        .collect();
    let mut rest = 100 - out.values().sum::<i32>();
    let mut by_remainder: Vec<(i64, &String)> =
        split.iter().map(|(k, v)| (-(i64::from(*v) * 100 % total), k)).collect();
    by_remainder.sort();
    for (_, k) in by_remainder.iter().cycle() {
        if rest == 0 {
            break;
        }
        *out.get_mut(*k).expect("same keys") += 1;
        rest -= 1;
    }
    out.retain(|_, v| *v > 0);
    out
}

/// The effective split (see the module doc). `available` has an entry for
/// every deployment of the spec; deployments without one are gone.
pub fn effective_split(desired: &Split, previous: &Split, available: &BTreeMap<String, Availability>) -> Split {
    let may_stay = |d: &str| available.get(d).is_some_and(Availability::may_stay);
    let may_join = |d: &str| available.get(d).is_some_and(Availability::may_join);
    let fits = |d: &str| {
        if previous.get(d).is_some_and(|v| *v > 0) {
            may_stay(d)
        } else {
            may_join(d)
        }
    };
    if desired.keys().all(|d| fits(d)) {
        return desired.clone();
    }
    let kept: Split = previous
        .iter()
        .filter(|(d, v)| **v > 0 && may_stay(d))
        .map(|(d, v)| (d.clone(), *v))
        .collect();
    if !kept.is_empty() {
        return normalize(&kept);
    }
    let joining: Split = desired
        .iter()
        .filter(|(d, _)| may_join(d))
        .map(|(d, v)| (d.clone(), *v))
        .collect();
    normalize(&joining)
}

/// The effective mirror: the desired one when its target may join (or was
/// mirrored to before and may stay) and takes no effective live traffic.
pub fn effective_mirror(
    desired: &Split,
    previous: &Split,
    effective: &Split,
    available: &BTreeMap<String, Availability>,
) -> Split {
    desired
        .iter()
        .filter(|(d, _)| !effective.contains_key(*d))
        .filter(|(d, _)| {
            available.get(*d).is_some_and(|a| {
                if previous.contains_key(*d) {
                    a.may_stay()
                } else {
                    a.may_join()
                }
            })
        })
        .map(|(d, v)| (d.clone(), *v))
        .collect()
}

/// The deployment the endpoint Service selects: the one with the largest
/// effective share (before any: the largest desired share), ties and
/// defaults to the first in `order` (the spec's order).
pub fn primary(effective: &Split, desired: &Split, order: &[String]) -> Option<String> {
    let pick = |split: &Split| {
        order
            .iter()
            .filter(|d| split.contains_key(*d))
            .max_by_key(|d| (split[*d], std::cmp::Reverse(order.iter().position(|o| o == *d))))
            .cloned()
    };
    pick(effective)
        .or_else(|| pick(desired))
        .or_else(|| order.first().cloned())
}

/// `blue 90, green 10`, or `none`.
pub fn describe(split: &Split) -> String {
    if split.is_empty() {
        return "none".into();
    }
    split
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn split(pairs: &[(&str, i32)]) -> Split {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    const READY: Availability = Availability {
        replicas: 2,
        ready: 2,
        available: 2,
        complete: true,
        stalled: false,
        rolling_out: false,
    };
    const STARTING: Availability = Availability {
        replicas: 2,
        ready: 0,
        available: 0,
        complete: false,
        stalled: false,
        rolling_out: true,
    };
    const PARTIAL: Availability = Availability {
        replicas: 3,
        ready: 1,
        available: 1,
        complete: false,
        stalled: false,
        rolling_out: true,
    };

    fn avail(pairs: &[(&str, Availability)]) -> BTreeMap<String, Availability> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn desired_split_defaults_to_the_only_deployment() {
        let spec: ModelDeploymentSpec = serde_json::from_value(json!({
            "deployments": [{"name": "blue", "model": {"uri": "s3://m/1", "format": "ONNX"}}]
        }))
        .unwrap();
        assert_eq!(desired_split(&spec), split(&[("blue", 100)]));
        let spec: ModelDeploymentSpec = serde_json::from_value(json!({
            "deployments": [{"name": "blue", "model": {"uri": "s3://m/1", "format": "ONNX"}},
                            {"name": "green", "model": {"uri": "s3://m/2", "format": "ONNX"}}],
            "traffic": {"blue": 100, "green": 0}, "mirrorTraffic": {"green": 10}
        }))
        .unwrap();
        assert_eq!(desired_split(&spec), split(&[("blue", 100)]));
        assert_eq!(desired_mirror(&spec), split(&[("green", 10)]));
        assert!(needs_gateway(&desired_split(&spec), &desired_mirror(&spec)));
        assert!(!needs_gateway(&split(&[("blue", 100)]), &Split::new()));
        assert!(needs_gateway(&split(&[("blue", 90), ("green", 10)]), &Split::new()));
    }

    #[test]
    fn all_available_gives_the_desired_split() {
        let a = avail(&[("blue", READY), ("green", READY)]);
        let want = split(&[("blue", 90), ("green", 10)]);
        assert_eq!(effective_split(&want, &split(&[("blue", 100)]), &a), want);
    }

    #[test]
    fn traffic_moved_to_a_deployment_that_is_not_ready_keeps_the_previous_split() {
        let prev = split(&[("blue", 100)]);
        let a = avail(&[("blue", READY), ("green", STARTING)]);
        assert_eq!(effective_split(&split(&[("green", 100)]), &prev, &a), prev);
        assert_eq!(effective_split(&split(&[("blue", 90), ("green", 10)]), &prev, &a), prev);
        // Partly ready is not enough to join.
        let a = avail(&[("blue", READY), ("green", PARTIAL)]);
        assert_eq!(effective_split(&split(&[("green", 100)]), &prev, &a), prev);
        // Once green's rollout completes, the desired split applies.
        let a = avail(&[("blue", READY), ("green", READY)]);
        assert_eq!(
            effective_split(&split(&[("green", 100)]), &prev, &a),
            split(&[("green", 100)])
        );
    }

    #[test]
    fn a_deployment_in_the_split_stays_while_it_has_an_available_replica() {
        let prev = split(&[("blue", 90), ("green", 10)]);
        let a = avail(&[("blue", PARTIAL), ("green", READY)]);
        assert_eq!(effective_split(&prev, &prev, &a), prev);
        // Green lost every pod: its share goes to blue.
        let a = avail(&[("blue", READY), ("green", STARTING)]);
        assert_eq!(effective_split(&prev, &prev, &a), split(&[("blue", 100)]));
        // A deployment removed from the spec leaves the split.
        let a = avail(&[("green", READY), ("canary", STARTING)]);
        assert_eq!(
            effective_split(&split(&[("green", 50), ("canary", 50)]), &prev, &a),
            split(&[("green", 100)])
        );
    }

    #[test]
    fn first_rollout_routes_to_what_can_serve_or_nothing() {
        let a = avail(&[("blue", STARTING), ("green", STARTING)]);
        let want = split(&[("blue", 90), ("green", 10)]);
        assert_eq!(effective_split(&want, &Split::new(), &a), Split::new());
        let a = avail(&[("blue", READY), ("green", STARTING)]);
        assert_eq!(effective_split(&want, &Split::new(), &a), split(&[("blue", 100)]));
        // No traffic asked for: none given.
        assert_eq!(
            effective_split(&Split::new(), &split(&[("blue", 100)]), &a),
            Split::new()
        );
    }

    #[test]
    fn normalize_uses_largest_remainders_and_sums_to_100() {
        assert_eq!(
            normalize(&split(&[("a", 1), ("b", 1), ("c", 1)])),
            split(&[("a", 34), ("b", 33), ("c", 33)])
        );
        assert_eq!(
            normalize(&split(&[("a", 45), ("b", 45)])),
            split(&[("a", 50), ("b", 50)])
        );
        assert_eq!(
            normalize(&split(&[("a", 70), ("b", 20)])),
            split(&[("a", 78), ("b", 22)])
        );
        assert_eq!(normalize(&Split::new()), Split::new());
        for s in [
            split(&[("a", 3), ("b", 3), ("c", 1)]),
            split(&[("a", 99), ("b", 1), ("c", 1)]),
        ] {
            assert_eq!(normalize(&s).values().sum::<i32>(), 100, "{s:?}");
        }
    }

    #[test]
    fn mirror_waits_for_its_target_and_never_doubles_live_traffic() {
        let want = split(&[("green", 10)]);
        let eff = split(&[("blue", 100)]);
        let a = avail(&[("blue", READY), ("green", STARTING)]);
        assert!(effective_mirror(&want, &Split::new(), &eff, &a).is_empty());
        let a = avail(&[("blue", READY), ("green", READY)]);
        assert_eq!(effective_mirror(&want, &Split::new(), &eff, &a), want);
        let a = avail(&[("blue", READY), ("green", PARTIAL)]);
        assert_eq!(effective_mirror(&want, &want, &eff, &a), want);
        // Green still takes live traffic (held split): no mirror to it.
        let eff = split(&[("green", 100)]);
        assert!(effective_mirror(&want, &want, &eff, &a).is_empty());
    }

    #[test]
    fn primary_is_the_largest_effective_share_in_spec_order() {
        let order: Vec<String> = ["blue", "green"].map(String::from).to_vec();
        assert_eq!(
            primary(&split(&[("blue", 90), ("green", 10)]), &Split::new(), &order).as_deref(),
            Some("blue")
        );
        assert_eq!(
            primary(&split(&[("blue", 50), ("green", 50)]), &Split::new(), &order).as_deref(),
            Some("blue")
        );
        assert_eq!(
            primary(&Split::new(), &split(&[("green", 100)]), &order).as_deref(),
            Some("green")
        );
        assert_eq!(primary(&Split::new(), &Split::new(), &order).as_deref(), Some("blue"));
    }

    fn deployment(generation: i64, status: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "md-blue", "generation": generation},
            "spec": {"replicas": 2, "selector": {}, "template": {}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn availability_follows_the_deployment_controller() {
        assert_eq!(availability(None), Availability::default());
        let done = deployment(
            2,
            json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2,
                   "conditions": [{"type": "Available", "status": "True"}, {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}),
        );
        let a = availability(Some(&done));
        assert!(a.complete && a.may_join() && !a.stalled);
        assert_eq!((a.replicas, a.ready, a.available), (2, 2, 2));
        // A spec the controller has not seen yet is not a complete rollout.
        let unseen = deployment(
            3,
            json!({"observedGeneration": 2, "updatedReplicas": 2, "availableReplicas": 2,
                   "conditions": [{"type": "Available", "status": "True"}]}),
        );
        let a = availability(Some(&unseen));
        assert!(!a.complete && a.may_stay() && a.rolling_out);
        let stalled = deployment(
            2,
            json!({"observedGeneration": 2, "updatedReplicas": 1, "availableReplicas": 2,
                   "conditions": [{"type": "Available", "status": "True"},
                                  {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}),
        );
        let a = availability(Some(&stalled));
        assert!(a.stalled && !a.complete && a.may_stay());
    }

    #[test]
    fn describe_lists_the_split() {
        assert_eq!(describe(&split(&[("blue", 90), ("green", 10)])), "blue 90, green 10");
        assert_eq!(describe(&Split::new()), "none");
    }
}
