//! From a ModelDeployment and what the watch caches show, everything one
//! reconcile writes: the children, the status and the events to record.
//!
//! Owns: the order of decisions (runtime, model, placement, split, status).
//! Must not touch the API server: the reconcile driver ([`super::reconcile`])
//! gathers [`Observed`] from its caches, calls [`plan`], and applies the
//! result.
//!
//! A deployment whose runtime cannot be chosen, or that has no model to
//! serve yet, is not built; if it was built before, its live children are
//! *held* (left as they are, not deleted), so a bad edit or a missing run
//! never tears down a serving deployment.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::build::route::{RouteInput, RouteSettings};
use super::build::{autoscaler, child_name, deployment, route, service};
use super::gateway::HTTPRoute;
use super::resolve::{MODEL_ANNOTATION, RESOLVE_ANNOTATION, resolve};
use super::runtime::{RuntimeCatalog, ceil_seconds};
use super::status::{
    COMPUTE_CLUSTER_NOT_FOUND, NAME_CONFLICT, PROGRESSING, Problem, REPLICAS_UNAVAILABLE, ROLLOUT_STALLED, Severity,
    TRAFFIC_SPLIT_UNSUPPORTED, UNKNOWN_MODEL_FORMAT, summarize,
};
use super::traffic::{
    Availability, Split, availability, describe, desired_mirror, desired_split, effective_mirror, effective_split,
    needs_gateway, primary,
};
use crate::api::experiment::Experiment;
use crate::api::model_deployment::{DeploymentStatus, ModelDeployment, ModelDeploymentStatus, PinnedModel};
use crate::api::shared::{NewCondition, READY, set_condition};
use crate::api::workspace::WorkspaceStorage;

/// Settings of the controller that shape what is built.
#[derive(Clone, Debug)]
pub struct Config<'a> {
    /// Runtimes by model format.
    pub runtimes: &'a RuntimeCatalog,
    /// The operator's image (the fetch init container).
    pub fetch_image: &'a str,
    /// Where routes attach; `None` when Gateway API is not served (or
    /// turned off).
    pub routes: Option<&'a RouteSettings>,
    /// `progressDeadlineSeconds` of serving Deployments.
    pub progress_deadline_seconds: i32,
}

/// What the caches show.
#[derive(Clone, Debug, Default)]
pub struct Observed<'a> {
    /// Live serving Deployments, by deployment name.
    pub deployments: BTreeMap<String, &'a Deployment>,
    /// The Experiments the models name that exist, by name.
    pub experiments: BTreeMap<String, &'a Experiment>,
    /// The namespace Workspace's storage, if it has any.
    pub storage: Option<&'a WorkspaceStorage>,
    /// Its artifact store's Secret.
    pub credentials: Option<&'a str>,
    /// ComputeClusters the spec names that do not exist.
    pub missing_clusters: BTreeSet<String>,
    /// Child names (`Kind/name`) held by another owner, with who it is.
    pub foreign: BTreeMap<String, String>,
    /// Names of this ModelDeployment's Services that do not exist yet
    /// (their writes are queued: see `super::services`).
    pub creating_services: BTreeSet<String>,
    /// Whether this ModelDeployment's HTTPRoute exists (it is kept once made).
    pub route_exists: bool,
}

/// The children to apply.
#[derive(Clone, Debug, Default)]
pub struct Children {
    /// Serving Deployments (applied first: they take longest).
    pub deployments: Vec<Deployment>,
    /// Per-deployment Services and the endpoint Service.
    pub services: Vec<Service>,
    /// Autoscalers.
    pub autoscalers: Vec<HorizontalPodAutoscaler>,
    /// The HTTPRoute (with Gateway API).
    pub route: Option<HTTPRoute>,
}

/// An Event to record on the ModelDeployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    /// Warning (else Normal).
    pub warning: bool,
    /// Reason.
    pub reason: &'static str,
    /// Note.
    pub message: String,
}

/// What one reconcile writes.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Children to apply.
    pub children: Children,
    /// Deployments whose live children stay as they are (not built now).
    pub held: BTreeSet<String>,
    /// The status.
    pub status: ModelDeploymentStatus,
    /// The effective split changed (from, to).
    pub shifted: Option<(Split, Split)>,
    /// Something the spec names is missing (worth polling for: not every
    /// such object triggers a reconcile when it appears).
    pub waiting: bool,
    /// Events.
    pub events: Vec<PlannedEvent>,
}

/// `Kind/name` of every child `md` may have.
pub fn child_keys(md: &ModelDeployment) -> Vec<String> {
    let name = md.name_any();
    let mut keys = vec![format!("Service/{name}"), format!("HTTPRoute/{name}")];
    for d in &md.spec.deployments {
        let c = child_name(&name, &d.name);
        keys.extend(["Deployment", "Service", "HorizontalPodAutoscaler"].map(|k| format!("{k}/{c}")));
    }
    keys
}

fn previous_pin(status: Option<&DeploymentStatus>, live: Option<&&Deployment>) -> Option<PinnedModel> {
    status.and_then(|s| s.model.clone()).or_else(|| {
        live.and_then(|d| d.annotations().get(MODEL_ANNOTATION))
            .and_then(|a| serde_json::from_str(a).ok())
    })
}

/// Plans one reconcile of `md` at `now`.
pub fn plan(md: &ModelDeployment, observed: &Observed<'_>, config: &Config<'_>, now: &Time) -> Plan {
    let name = md.name_any();
    let spec = &md.spec;
    let previous = md.status.clone().unwrap_or_default();
    let prev_by_name: BTreeMap<&str, &DeploymentStatus> =
        previous.deployments.iter().map(|d| (d.name.as_str(), d)).collect();
    let token = md.annotations().get(RESOLVE_ANNOTATION).cloned().unwrap_or_default();
    let foreign = |kind: &str, n: &str| observed.foreign.get(&format!("{kind}/{n}"));

    let mut children = Children::default();
    let mut held = BTreeSet::new();
    let mut problems: Vec<Problem> = vec![];
    let mut events = vec![];
    let mut pins: BTreeMap<String, PinnedModel> = BTreeMap::new();
    // Availability of the deployments that serve (built or held).
    let mut available: BTreeMap<String, Availability> = BTreeMap::new();
    for (index, d) in spec.deployments.iter().enumerate() {
        let field = format!("spec.deployments[{index}]");
        let live = observed.deployments.get(&d.name);
        let resolution = resolve(
            &d.model,
            &format!("{field}.model"),
            &token,
            previous_pin(prev_by_name.get(d.name.as_str()).copied(), live).as_ref(),
            d.model
                .experiment
                .as_ref()
                .and_then(|e| observed.experiments.get(e).copied()),
            observed.storage,
        );
        if let Some(e) = &resolution.error {
            problems.push(Problem::new(Severity::Missing, e.reason(), e.to_string()));
        }
        if let Some(cc) = d.compute.as_ref().filter(|cc| observed.missing_clusters.contains(*cc)) {
            problems.push(Problem::new(
                Severity::Missing,
                COMPUTE_CLUSTER_NOT_FOUND,
                format!("{field}.compute: ComputeCluster {cc:?} does not exist"),
            ));
        }
        let runtime = match config.runtimes.resolve(d, index) {
            Ok(r) => Some(r),
            Err(e) => {
                problems.push(Problem::new(Severity::Invalid, UNKNOWN_MODEL_FORMAT, e.to_string()));
                None
            }
        };
        let c = child_name(&name, &d.name);
        let conflicts: Vec<&str> = ["Deployment", "Service", "HorizontalPodAutoscaler"]
            .into_iter()
            .filter(|k| foreign(k, &c).is_some())
            .collect();
        for k in &conflicts {
            problems.push(Problem::new(
                Severity::Invalid,
                NAME_CONFLICT,
                format!(
                    "{field}.name: {k} {c} already exists and belongs to {}",
                    foreign(k, &c).unwrap()
                ),
            ));
        }
        if let Some(pin) = &resolution.pin {
            pins.insert(d.name.clone(), pin.clone());
            if resolution.resolved_now
                && let (Some(exp), Some(run)) = (&pin.experiment, &pin.run)
            {
                events.push(PlannedEvent {
                    warning: false,
                    reason: "ModelResolved",
                    message: format!(
                        "deployment {} serves output {} of run {run} of Experiment {exp} ({}): {}",
                        d.name,
                        pin.output.as_deref().unwrap_or_default(),
                        d.model.run.as_deref().unwrap_or("best"),
                        pin.uri
                    ),
                });
            }
        }
        match (&runtime, &resolution.pin) {
            (Some(runtime), Some(pin)) if conflicts.is_empty() => {
                let autoscaled = autoscaler::autoscaled(d.scale.as_ref());
                children.deployments.push(deployment::build(&deployment::ServingInput {
                    md,
                    deployment: d,
                    runtime,
                    model: pin,
                    credentials: observed.credentials,
                    fetch_image: config.fetch_image,
                    progress_deadline_seconds: config.progress_deadline_seconds,
                    autoscaled,
                }));
                children.services.push(service::deployment_service(md, &d.name));
                children.autoscalers.extend(autoscaler::build(md, d));
                available.insert(d.name.clone(), availability(live.copied()));
            }
            _ => {
                if let Some(live) = live {
                    held.insert(d.name.clone());
                    available.insert(d.name.clone(), availability(Some(live)));
                }
            }
        }
    }

    // The split.
    let desired = desired_split(spec);
    let desired_mirror = desired_mirror(spec);
    let prev_effective: Split = previous
        .deployments
        .iter()
        .filter(|d| d.effective_traffic > 0)
        .map(|d| (d.name.clone(), d.effective_traffic))
        .collect();
    let prev_mirror: Split = previous
        .deployments
        .iter()
        .filter(|d| d.mirror_traffic > 0)
        .map(|d| (d.name.clone(), d.mirror_traffic))
        .collect();
    let routable = config.routes.is_some() || !needs_gateway(&desired, &desired_mirror);
    if !routable {
        let mut asked = describe(&desired);
        if !desired_mirror.is_empty() {
            asked.push_str(&format!("; mirror {}", describe(&desired_mirror)));
        }
        problems.push(Problem::new(
            Severity::Invalid,
            TRAFFIC_SPLIT_UNSUPPORTED,
            format!(
                "spec.traffic/spec.mirrorTraffic: splitting or mirroring traffic ({asked}) needs Gateway API \
                 (gateway.networking.k8s.io/v1 HTTPRoute), which this cluster does not serve; send all traffic \
                 to one deployment, or install Gateway API and restart the operator. Live traffic stays as it was"
            ),
        ));
    }
    // Refused: the previous split stays (re-checked against availability).
    let target = if routable { &desired } else { &prev_effective };
    let effective = effective_split(target, &prev_effective, &available);
    let mirror = if config.routes.is_some() {
        effective_mirror(&desired_mirror, &prev_mirror, &effective, &available)
    } else {
        Split::new()
    };
    let order: Vec<String> = spec.deployments.iter().map(|d| d.name.clone()).collect();
    if let Some(p) = primary(&effective, &desired, &order) {
        if let Some(owner) = foreign("Service", &name) {
            problems.push(Problem::new(
                Severity::Invalid,
                NAME_CONFLICT,
                format!("metadata.name: Service {name} already exists and belongs to {owner}"),
            ));
        } else {
            children.services.push(service::endpoint_service(md, &p));
        }
    }
    // No route until a deployment can take traffic: a route whose weights
    // are all 0 serves nothing, and under a burst of new ModelDeployments
    // writing it early would stand in the API server's queue ahead of
    // other Deployments. Once made, the route stays, whatever becomes of
    // its backends.
    let serving = observed.route_exists || !(effective.is_empty() && prev_effective.is_empty() && mirror.is_empty());
    if let Some(settings) = config.routes.filter(|_| serving) {
        if let Some(owner) = foreign("HTTPRoute", &name) {
            problems.push(Problem::new(
                Severity::Invalid,
                NAME_CONFLICT,
                format!("metadata.name: HTTPRoute {name} already exists and belongs to {owner}"),
            ));
        } else {
            let built: BTreeSet<&str> = children
                .deployments
                .iter()
                .filter_map(|d| d.labels().get(super::build::DEPLOYMENT_LABEL).map(String::as_str))
                .collect();
            let timeout_seconds = spec
                .deployments
                .iter()
                .filter(|d| effective.contains_key(&d.name))
                .filter_map(|d| d.request_settings.as_ref()?.timeout.as_ref()?.to_std().ok())
                .map(ceil_seconds)
                .max();
            let input = RouteInput {
                backends: order
                    .iter()
                    .filter(|d| built.contains(d.as_str()) || held.contains(*d))
                    .map(|d| (d.clone(), effective.get(d).copied().unwrap_or(0)))
                    .collect(),
                mirror: mirror.clone(),
                timeout_seconds,
            };
            children.route = Some(route::build(md, settings, &input));
        }
    }

    // Rollout state.
    for d in &spec.deployments {
        let Some(a) = available.get(&d.name) else { continue };
        let c = child_name(&name, &d.name);
        if !observed.deployments.contains_key(&d.name) {
            problems.push(Problem::new(
                Severity::Progressing,
                PROGRESSING,
                format!("deployment {}: creating Deployment {c}", d.name),
            ));
        } else if a.stalled {
            problems.push(Problem::new(
                Severity::Stalled,
                ROLLOUT_STALLED,
                format!(
                    "deployment {}: the rollout of Deployment {c} exceeded its progress deadline \
                     ({}/{} replicas ready); the previous version keeps serving",
                    d.name, a.ready, a.replicas
                ),
            ));
        } else if a.rolling_out {
            problems.push(Problem::new(
                Severity::Progressing,
                PROGRESSING,
                format!(
                    "deployment {}: rolling out ({}/{} replicas ready)",
                    d.name, a.ready, a.replicas
                ),
            ));
        } else if a.available < a.replicas {
            problems.push(Problem::new(
                Severity::Degraded,
                REPLICAS_UNAVAILABLE,
                format!(
                    "deployment {}: {}/{} replicas available",
                    d.name, a.available, a.replicas
                ),
            ));
        }
    }
    for svc in &children.services {
        let n = svc.name_any();
        if observed.creating_services.contains(&n) {
            problems.push(Problem::new(
                Severity::Progressing,
                PROGRESSING,
                format!("Service {n}: being created"),
            ));
        }
    }
    let waiting: Vec<String> = target
        .keys()
        .chain(desired_mirror.keys())
        .filter(|d| !effective.contains_key(*d) && !mirror.contains_key(*d))
        .map(|d| {
            let a = available.get(d).copied().unwrap_or_default();
            format!("{d} ({}/{} ready)", a.ready, a.replicas)
        })
        .collect();
    if routable && (effective != desired || mirror != desired_mirror) {
        problems.push(Problem::new(
            Severity::Progressing,
            PROGRESSING,
            format!(
                "waiting for {} to become Available; effective traffic: {} (desired: {})",
                if waiting.is_empty() {
                    "the split".to_string()
                } else {
                    waiting.join(", ")
                },
                describe(&effective),
                describe(&desired)
            ),
        ));
    }

    // Status.
    let mut ready_message = if desired.is_empty() {
        "no deployment takes live traffic (spec.traffic is all 0)".to_string()
    } else {
        format!("effective traffic: {}", describe(&effective))
    };
    if !mirror.is_empty() {
        ready_message.push_str(&format!("; mirrored: {}", describe(&mirror)));
    }
    let waiting = problems.iter().any(|p| p.severity == Severity::Missing);
    let (ready, reason, message, phase) = summarize(&problems, !effective.is_empty(), ready_message);
    let mut status = ModelDeploymentStatus {
        phase: Some(phase),
        observed_generation: md.metadata.generation,
        endpoint: Some(service::endpoint_url(md)),
        deployments: spec
            .deployments
            .iter()
            .map(|d| {
                let a = available.get(&d.name).copied().unwrap_or_default();
                DeploymentStatus {
                    name: d.name.clone(),
                    replicas: a.replicas,
                    ready_replicas: a.ready,
                    traffic: desired.get(&d.name).copied().unwrap_or(0),
                    effective_traffic: effective.get(&d.name).copied().unwrap_or(0),
                    mirror_traffic: mirror.get(&d.name).copied().unwrap_or(0),
                    model: pins.get(&d.name).cloned(),
                }
            })
            .collect(),
        conditions: previous.conditions.clone(),
    };
    set_condition(
        &mut status.conditions,
        NewCondition::new(READY, ready, reason, message.clone()).observed_generation(md.metadata.generation),
        now,
    );

    // Events: a shift of the effective split, and a newly reported problem.
    let shifted =
        (effective != prev_effective || mirror != prev_mirror).then(|| (prev_effective.clone(), effective.clone()));
    if shifted.is_some() {
        let mut m = format!(
            "effective traffic: {} (was {})",
            describe(&effective),
            describe(&prev_effective)
        );
        if mirror != prev_mirror {
            m.push_str(&format!(
                "; mirrored: {} (was {})",
                describe(&mirror),
                describe(&prev_mirror)
            ));
        }
        events.push(PlannedEvent {
            warning: false,
            reason: "TrafficShifted",
            message: m,
        });
    }
    let prev_reason = previous
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| c.reason.as_str());
    if !ready && prev_reason != Some(reason) && reason != PROGRESSING {
        events.push(PlannedEvent {
            warning: true,
            reason,
            message,
        });
    }
    Plan {
        children,
        held,
        status,
        shifted,
        waiting,
        events,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model_deployment::ModelDeploymentPhase;
    use crate::controllers::model_deployment::build::test_support::md;
    use serde_json::{Value, json};

    fn at(s: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap())
    }

    fn live(name: &str, ready: bool) -> Deployment {
        let (avail, cond) = if ready { (2, "True") } else { (0, "False") };
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "vision", "generation": 1},
            "spec": {"replicas": 2, "selector": {}, "template": {}},
            "status": {"observedGeneration": 1, "replicas": 2, "updatedReplicas": 2, "readyReplicas": avail,
                       "availableReplicas": avail, "conditions": [{"type": "Available", "status": cond}]},
        }))
        .unwrap()
    }

    fn two(traffic: Value) -> ModelDeployment {
        md(json!({
            "deployments": [{"name": "blue", "model": {"uri": "s3://m/1", "format": "ONNX"},
                             "requestSettings": {"timeout": "5s"}},
                            {"name": "green", "model": {"uri": "s3://m/2", "format": "ONNX"},
                             "requestSettings": {"timeout": "30s"}}],
            "traffic": traffic,
        }))
    }

    fn with_effective(mut md: ModelDeployment, split: &[(&str, i32)]) -> ModelDeployment {
        let status = md.status.get_or_insert_default();
        for (d, v) in split {
            status.deployments.push(DeploymentStatus {
                name: d.to_string(),
                effective_traffic: *v,
                ..Default::default()
            });
        }
        md
    }

    fn config<'a>(runtimes: &'a RuntimeCatalog, routes: Option<&'a RouteSettings>) -> Config<'a> {
        Config {
            runtimes,
            fetch_image: "mlplane:dev",
            routes,
            progress_deadline_seconds: 600,
        }
    }

    fn effective(p: &Plan) -> Vec<(String, i32, i32)> {
        p.status
            .deployments
            .iter()
            .map(|d| (d.name.clone(), d.traffic, d.effective_traffic))
            .collect()
    }

    fn ready(p: &Plan) -> (String, String, String) {
        let c = p.status.conditions.iter().find(|c| c.type_ == READY).unwrap();
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    fn route_json(p: &Plan) -> Value {
        serde_json::to_value(p.children.route.as_ref().unwrap()).unwrap()
    }

    #[test]
    fn a_90_10_split_of_available_deployments_is_routed_by_weight() {
        let runtimes = RuntimeCatalog::builtin();
        let routes = RouteSettings::default();
        let md = with_effective(two(json!({"blue": 90, "green": 10})), &[("blue", 100)]);
        let (b, g) = (live("resnet-blue", true), live("resnet-green", true));
        let observed = Observed {
            deployments: BTreeMap::from([("blue".to_string(), &b), ("green".to_string(), &g)]),
            ..Default::default()
        };
        let p = plan(&md, &observed, &config(&runtimes, Some(&routes)), &at(10));
        assert_eq!(p.children.deployments.len(), 2);
        assert_eq!(p.children.services.len(), 3);
        let rule = &route_json(&p)["spec"]["rules"][0];
        let weights: Vec<(String, i64)> = rule["backendRefs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (b["name"].as_str().unwrap().to_string(), b["weight"].as_i64().unwrap()))
            .collect();
        assert_eq!(
            weights,
            [("resnet-blue".to_string(), 90), ("resnet-green".to_string(), 10)]
        );
        // The longest timeout of the deployments taking traffic.
        assert_eq!(rule["timeouts"]["request"], "30s");
        assert_eq!(effective(&p), [("blue".into(), 90, 90), ("green".into(), 10, 10)]);
        assert_eq!(
            ready(&p),
            (
                "True".into(),
                "Ready".into(),
                "effective traffic: blue 90, green 10".into()
            )
        );
        assert_eq!(p.status.phase, Some(ModelDeploymentPhase::Ready));
        assert_eq!(p.status.endpoint.as_deref(), Some("http://resnet.vision.svc"));
        assert_eq!(
            p.shifted,
            Some((
                Split::from([("blue".into(), 100)]),
                Split::from([("blue".into(), 90), ("green".into(), 10)])
            ))
        );
        assert!(p.events.iter().any(
            |e| e.reason == "TrafficShifted" && e.message == "effective traffic: blue 90, green 10 (was blue 100)"
        ));
        // The endpoint Service selects the primary.
        let endpoint = p.children.services.iter().find(|s| s.name_any() == "resnet").unwrap();
        assert_eq!(
            endpoint.spec.as_ref().unwrap().selector.as_ref().unwrap()["mlplane.io/deployment"],
            "blue"
        );
    }

    #[test]
    fn no_route_until_a_deployment_can_take_traffic_and_then_it_stays() {
        let runtimes = RuntimeCatalog::builtin();
        let routes = RouteSettings::default();
        let cfg = config(&runtimes, Some(&routes));
        // New: nothing available, nothing ever effective.
        let md = two(json!({"blue": 90, "green": 10}));
        let (b, g) = (live("resnet-blue", false), live("resnet-green", false));
        let observed = Observed {
            deployments: BTreeMap::from([("blue".to_string(), &b), ("green".to_string(), &g)]),
            ..Default::default()
        };
        let p = plan(&md, &observed, &cfg, &at(10));
        assert_eq!(p.children.deployments.len(), 2);
        assert!(p.children.route.is_none());
        // Blue available: routed.
        let b = live("resnet-blue", true);
        let observed = Observed {
            deployments: BTreeMap::from([("blue".to_string(), &b), ("green".to_string(), &g)]),
            ..Default::default()
        };
        assert!(plan(&md, &observed, &cfg, &at(10)).children.route.is_some());
        // Blue served before and is gone unready: the route stays.
        let served = with_effective(md.clone(), &[("blue", 100)]);
        let b = live("resnet-blue", false);
        let observed = Observed {
            deployments: BTreeMap::from([("blue".to_string(), &b), ("green".to_string(), &g)]),
            ..Default::default()
        };
        assert!(plan(&served, &observed, &cfg, &at(10)).children.route.is_some());
        // Both Deployments gone and no traffic effective any more (a status
        // written since): the route that exists is still kept, not deleted.
        let observed = Observed {
            route_exists: true,
            ..Default::default()
        };
        assert!(plan(&md, &observed, &cfg, &at(10)).children.route.is_some());
    }

    #[test]
    fn moving_traffic_to_a_deployment_that_is_not_ready_keeps_the_split_and_says_why() {
        let runtimes = RuntimeCatalog::builtin();
        let routes = RouteSettings::default();
        let md = with_effective(two(json!({"blue": 0, "green": 100})), &[("blue", 100)]);
        let (b, g) = (live("resnet-blue", true), live("resnet-green", false));
        let observed = Observed {
            deployments: BTreeMap::from([("blue".to_string(), &b), ("green".to_string(), &g)]),
            ..Default::default()
        };
        let p = plan(&md, &observed, &config(&runtimes, Some(&routes)), &at(10));
        assert_eq!(effective(&p), [("blue".into(), 0, 100), ("green".into(), 100, 0)]);
        let rule = &route_json(&p)["spec"]["rules"][0];
        assert_eq!(rule["backendRefs"][0]["weight"], 100);
        assert_eq!(rule["backendRefs"][1]["weight"], 0);
        let (status, reason, message) = ready(&p);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Progressing"));
        assert!(
            message.contains(
                "waiting for green (0/2 ready) to become Available; effective traffic: blue 100 (desired: green 100)"
            ),
            "{message}"
        );
        assert_eq!(p.status.phase, Some(ModelDeploymentPhase::Updating));
        assert!(p.shifted.is_none());
    }

    #[test]
    fn without_gateway_api_a_split_is_refused_and_the_previous_one_kept() {
        let runtimes = RuntimeCatalog::builtin();
        let md = with_effective(two(json!({"blue": 90, "green": 10})), &[("blue", 100)]);
        let (b, g) = (live("resnet-blue", true), live("resnet-green", true));
        let observed = Observed {
            deployments: BTreeMap::from([("blue".to_string(), &b), ("green".to_string(), &g)]),
            ..Default::default()
        };
        let p = plan(&md, &observed, &config(&runtimes, None), &at(10));
        assert!(p.children.route.is_none());
        assert_eq!(effective(&p), [("blue".into(), 90, 100), ("green".into(), 10, 0)]);
        let (status, reason, message) = ready(&p);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "TrafficSplitUnsupported"));
        assert!(message.contains("(blue 90, green 10) needs Gateway API"), "{message}");
        assert_eq!(p.status.phase, Some(ModelDeploymentPhase::Failed));
        assert!(
            p.events
                .iter()
                .any(|e| e.warning && e.reason == "TrafficSplitUnsupported")
        );
        // All-to-one works without Gateway API: the endpoint Service switches.
        let md = with_effective(two(json!({"blue": 0, "green": 100})), &[("blue", 100)]);
        let p = plan(&md, &observed, &config(&runtimes, None), &at(10));
        assert_eq!(ready(&p).1, "Ready");
        let endpoint = p.children.services.iter().find(|s| s.name_any() == "resnet").unwrap();
        assert_eq!(
            endpoint.spec.as_ref().unwrap().selector.as_ref().unwrap()["mlplane.io/deployment"],
            "green"
        );
    }

    #[test]
    fn a_mirror_becomes_a_request_mirror_filter_once_its_target_is_available() {
        let runtimes = RuntimeCatalog::builtin();
        let routes = RouteSettings::default();
        let mut m = two(json!({"blue": 100}));
        m.spec.mirror_traffic = BTreeMap::from([("green".to_string(), 20)]);
        let m = with_effective(m, &[("blue", 100)]);
        let (b, g) = (live("resnet-blue", true), live("resnet-green", true));
        let observed = Observed {
            deployments: BTreeMap::from([("blue".to_string(), &b), ("green".to_string(), &g)]),
            ..Default::default()
        };
        let p = plan(&m, &observed, &config(&runtimes, Some(&routes)), &at(10));
        let filter = &route_json(&p)["spec"]["rules"][0]["filters"][0];
        assert_eq!(filter["type"], "RequestMirror");
        assert_eq!(filter["requestMirror"]["backendRef"]["name"], "resnet-green");
        assert_eq!(filter["requestMirror"]["percent"], 20);
        assert_eq!(p.status.deployments[1].mirror_traffic, 20);
        assert_eq!(ready(&p).2, "effective traffic: blue 100; mirrored: green 20");
    }

    #[test]
    fn services_being_created_keep_it_from_ready() {
        let runtimes = RuntimeCatalog::builtin();
        let routes = RouteSettings::default();
        let m = with_effective(two(json!({"blue": 100})), &[("blue", 100)]);
        let (b, g) = (live("resnet-blue", true), live("resnet-green", true));
        let mut observed = Observed {
            deployments: BTreeMap::from([("blue".to_string(), &b), ("green".to_string(), &g)]),
            ..Default::default()
        };
        let p = plan(&m, &observed, &config(&runtimes, Some(&routes)), &at(10));
        assert_eq!(ready(&p).0, "True");
        // The endpoint Service is still queued: not Ready, and it says why;
        // the traffic and the other children are planned as before.
        observed.creating_services = BTreeSet::from(["resnet".to_string(), "unrelated".to_string()]);
        let q = plan(&m, &observed, &config(&runtimes, Some(&routes)), &at(10));
        let (status, reason, message) = ready(&q);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Progressing"));
        assert!(message.contains("Service resnet: being created"), "{message}");
        assert!(!message.contains("unrelated"), "{message}");
        assert_eq!(effective(&q), effective(&p));
        assert_eq!(q.children.services.len(), p.children.services.len());
    }

    #[test]
    fn a_stalled_rollout_is_reported_and_the_old_version_keeps_serving() {
        let runtimes = RuntimeCatalog::builtin();
        let routes = RouteSettings::default();
        let md = with_effective(two(json!({"blue": 100})), &[("blue", 100)]);
        let mut b = live("resnet-blue", true);
        let st = b.status.as_mut().unwrap();
        st.updated_replicas = Some(1);
        st.conditions.as_mut().unwrap().push(
            serde_json::from_value(json!(
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}))
            .unwrap(),
        );
        let g = live("resnet-green", true);
        let observed = Observed {
            deployments: BTreeMap::from([("blue".to_string(), &b), ("green".to_string(), &g)]),
            ..Default::default()
        };
        let p = plan(&md, &observed, &config(&runtimes, Some(&routes)), &at(10));
        let (status, reason, message) = ready(&p);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "RolloutStalled"));
        assert!(
            message.contains("Deployment resnet-blue exceeded its progress deadline"),
            "{message}"
        );
        assert_eq!(p.status.phase, Some(ModelDeploymentPhase::Degraded));
        assert_eq!(effective(&p)[0], ("blue".into(), 100, 100));
        assert!(p.events.iter().any(|e| e.reason == "RolloutStalled"));
    }

    fn experiment(best: Option<&str>) -> Experiment {
        let mut status = json!({"phase": "Succeeded", "runs": [{"name": "resnet-1-t1", "generation": 1, "phase": "Succeeded"},
                                         {"name": "resnet-1-t0", "generation": 1, "phase": "Succeeded"}]});
        if let Some(b) = best {
            status["bestRun"] = json!({"name": b, "metric": "accuracy", "value": 0.9});
        }
        serde_json::from_value(json!({
            "apiVersion": "mlplane.io/v1alpha1", "kind": "Experiment",
            "metadata": {"name": "resnet", "namespace": "vision"},
            "spec": {"environment": {"image": "python:3.12"}, "command": ["python"], "outputs": {"model": {}},
                     "sweep": {"algorithm": "Grid", "searchSpace": {"lr": {"choice": [0.1, 0.2]}},
                               "objective": {"metric": "accuracy", "goal": "Maximize"}}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn a_model_from_the_best_run_is_pinned_and_missing_runs_hold_the_deployment() {
        let runtimes = RuntimeCatalog::builtin();
        let m = md(
            json!({"deployments": [{"name": "blue", "model": {"experiment": "resnet", "run": "best", "format": "ONNX"}}]}),
        );
        let storage: WorkspaceStorage =
            serde_json::from_value(json!({"artifacts": {"uri": "s3://ml/vision", "secretRef": {"name": "s3"}}}))
                .unwrap();
        let exp = experiment(Some("resnet-1-t0"));
        let observed = Observed {
            experiments: BTreeMap::from([("resnet".to_string(), &exp)]),
            storage: Some(&storage),
            credentials: Some("s3"),
            ..Default::default()
        };
        let p = plan(&m, &observed, &config(&runtimes, None), &at(10));
        let pin = p.status.deployments[0].model.clone().unwrap();
        assert_eq!(pin.uri, "s3://ml/vision/experiments/resnet/resnet-1-t0/model");
        let fetch = &p.children.deployments[0]
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .init_containers
            .as_ref()
            .unwrap()[0];
        assert_eq!(fetch.args.as_ref().unwrap()[2], pin.uri);
        assert_eq!(
            fetch.env_from.as_ref().unwrap()[0].secret_ref.as_ref().unwrap().name,
            "s3"
        );
        assert!(
            p.events
                .iter()
                .any(|e| e.reason == "ModelResolved"
                    && e.message.contains("run resnet-1-t0 of Experiment resnet (best)"))
        );
        assert_eq!(ready(&p).1, "Progressing");

        // Later: a better run does not move the pinned model.
        let mut later = m.clone();
        later.status = Some(p.status.clone());
        let exp2 = experiment(Some("resnet-1-t1"));
        let observed2 = Observed {
            experiments: BTreeMap::from([("resnet".to_string(), &exp2)]),
            ..observed.clone()
        };
        let p2 = plan(&later, &observed2, &config(&runtimes, None), &at(20));
        assert_eq!(p2.status.deployments[0].model.as_ref(), Some(&pin));
        assert!(!p2.events.iter().any(|e| e.reason == "ModelResolved"));

        // No best run yet and nothing pinned: RunNotFound, nothing built.
        let exp3 = experiment(None);
        let observed3 = Observed {
            experiments: BTreeMap::from([("resnet".to_string(), &exp3)]),
            ..observed.clone()
        };
        let p3 = plan(&m, &observed3, &config(&runtimes, None), &at(10));
        assert!(p3.children.deployments.is_empty());
        let (status, reason, message) = ready(&p3);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "RunNotFound"));
        assert!(
            message.starts_with("spec.deployments[0].model.run: Experiment \"resnet\" has no best run"),
            "{message}"
        );
        assert_eq!(p3.status.phase, Some(ModelDeploymentPhase::Pending));
        assert!(p3.waiting);
        // The Experiment gone, with a live Deployment: held, still serving.
        let b = live("resnet-blue", true);
        let observed4 = Observed {
            deployments: BTreeMap::from([("blue".to_string(), &b)]),
            storage: Some(&storage),
            ..Default::default()
        };
        let m4 = with_effective(m.clone(), &[("blue", 100)]);
        let p4 = plan(&m4, &observed4, &config(&runtimes, None), &at(10));
        assert!(p4.children.deployments.is_empty());
        assert_eq!(p4.held, BTreeSet::from(["blue".to_string()]));
        assert_eq!(ready(&p4).1, "ExperimentNotFound");
        assert_eq!(effective(&p4), [("blue".into(), 100, 100)]);
        assert_eq!(p4.status.phase, Some(ModelDeploymentPhase::Degraded));
    }

    #[test]
    fn unknown_formats_missing_clusters_and_taken_names_are_named() {
        let runtimes = RuntimeCatalog::builtin();
        let m = md(json!({"deployments": [
            {"name": "blue", "model": {"uri": "s3://m/1", "format": "TorchScript"}},
            {"name": "green", "model": {"uri": "s3://m/2", "format": "ONNX"}, "compute": "gpu"},
        ], "traffic": {"green": 100}}));
        let observed = Observed {
            missing_clusters: BTreeSet::from(["gpu".to_string()]),
            foreign: BTreeMap::from([("Service/resnet-green".to_string(), "no ModelDeployment".to_string())]),
            ..Default::default()
        };
        let p = plan(&m, &observed, &config(&runtimes, None), &at(10));
        let (_, reason, message) = ready(&p);
        assert_eq!(reason, "UnknownModelFormat");
        assert!(
            message.contains("spec.deployments[0].model.format: model format \"TorchScript\""),
            "{message}"
        );
        assert!(
            message.contains(
                "spec.deployments[1].name: Service resnet-green already exists and belongs to no ModelDeployment"
            ),
            "{message}"
        );
        assert_eq!(p.status.phase, Some(ModelDeploymentPhase::Failed));
        assert!(
            p.children.deployments.is_empty(),
            "blue has no runtime, green's name is taken"
        );
        let m = md(
            json!({"deployments": [{"name": "green", "model": {"uri": "s3://m/2", "format": "ONNX"}, "compute": "gpu"}]}),
        );
        let p = plan(
            &m,
            &Observed {
                missing_clusters: BTreeSet::from(["gpu".to_string()]),
                ..Default::default()
            },
            &config(&runtimes, None),
            &at(10),
        );
        assert_eq!(ready(&p).1, "ComputeClusterNotFound");
        assert_eq!(
            p.children.deployments.len(),
            1,
            "built anyway: its pods wait for the nodes"
        );
    }

    #[test]
    fn a_converged_plan_changes_nothing() {
        let runtimes = RuntimeCatalog::builtin();
        let routes = RouteSettings::default();
        let m = two(json!({"blue": 90, "green": 10}));
        let (b, g) = (live("resnet-blue", true), live("resnet-green", true));
        let observed = Observed {
            deployments: BTreeMap::from([("blue".to_string(), &b), ("green".to_string(), &g)]),
            ..Default::default()
        };
        let first = plan(&m, &observed, &config(&runtimes, Some(&routes)), &at(10));
        let mut again = m.clone();
        again.status = Some(first.status.clone());
        let second = plan(&again, &observed, &config(&runtimes, Some(&routes)), &at(20));
        assert_eq!(
            second.status, first.status,
            "status (and its condition times) unchanged"
        );
        assert!(second.shifted.is_none() && second.events.is_empty());
        assert_eq!(
            serde_json::to_value(&second.children.route).unwrap(),
            serde_json::to_value(&first.children.route).unwrap()
        );
        assert_eq!(second.children.deployments, first.children.deployments);
    }

    #[test]
    fn child_keys_cover_every_child() {
        let keys = child_keys(&two(json!({})));
        assert!(keys.contains(&"Service/resnet".to_string()));
        assert!(keys.contains(&"HorizontalPodAutoscaler/resnet-green".to_string()));
        assert_eq!(keys.len(), 2 + 2 * 3);
    }
}
