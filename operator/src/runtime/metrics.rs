//! The operator's Prometheus registry (prefix `mlplane_`). Metric labels use
//! small fixed sets (kind, error category, phase, HTTP verb), never object
//! names or free text.
use std::time::Instant;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Every metric the operator exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Reconciles run, by kind.
    pub reconciles: IntCounterVec,
    /// Reconcile errors, by kind and error category.
    pub reconcile_errors: IntCounterVec,
    /// Reconcile duration, by kind.
    pub reconcile_duration: HistogramVec,
    /// Objects of each kind by phase.
    pub objects: IntGaugeVec,
    /// Requests this process sent to the Kubernetes API, by verb (get, list,
    /// watch, create, update, patch, delete) and resource (plural name).
    pub kube_requests: IntCounterVec,
    /// Latency of those requests until the response headers, by verb.
    pub kube_request_duration: HistogramVec,
    /// 1 while this replica holds the leader Lease.
    pub leader: IntGauge,
    /// Events recorded on mlplane objects, by kind and reason.
    pub events: IntCounterVec,
    /// Tracking API requests, by route and HTTP status code.
    pub tracking_requests: IntCounterVec,
    /// Tracking API request duration, by route.
    pub tracking_duration: HistogramVec,
    /// Runs that reached an end state, by kind (Experiment, Pipeline) and
    /// phase (Succeeded, Failed, Cancelled).
    pub runs: IntCounterVec,
    /// Wall-clock duration of finished runs (start of the Job to its end), by kind.
    pub run_duration: HistogramVec,
    /// Nodes of every ComputeCluster pool, by provider (kwok, clusterAPI,
    /// static) and tier (Dedicated, Spot).
    pub compute_nodes: IntGaugeVec,
    /// Nodes the autoscaler wants, by provider and tier.
    pub compute_desired_nodes: IntGaugeVec,
    /// Pods waiting for a ComputeCluster (all clusters).
    pub compute_pending_pods: IntGauge,
    /// Runs waiting in admission queues, by reason.
    pub compute_queue: IntGaugeVec,
    /// Runs admitted by the queues.
    pub compute_admissions: IntCounter,
    /// From asking a provider for a node to the node being Ready, by provider.
    pub compute_scale_up_duration: HistogramVec,
    /// DataAsset refreshes, by result (`new_version`, `unchanged`, `failed`).
    pub data_refreshes: IntCounterVec,
    /// Duration of DataAsset refreshes (listing, digest, recording).
    pub data_refresh_duration: Histogram,
    /// Pipeline steps by outcome: `started` (a Job was created), `reused`
    /// (a cache hit skipped the Job), `succeeded`, `failed`, `skipped`
    /// (never run: an upstream step failed or the run stopped).
    pub pipeline_steps: IntCounterVec,
    /// Changes of a ModelDeployment's effective traffic split (or mirror).
    pub traffic_shifts: IntCounter,
    /// Serving rollouts that exceeded their progress deadline.
    pub rollouts_stalled: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("mlplane_reconcile_total", "Reconciles run, by kind"),
            &["kind"],
        )
        .unwrap();
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "mlplane_reconcile_errors_total",
                "Reconcile errors, by kind and category",
            ),
            &["kind", "category"],
        )
        .unwrap();
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new("mlplane_reconcile_duration_seconds", "Reconcile duration, by kind").buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["kind"],
        )
        .unwrap();
        let objects = IntGaugeVec::new(
            Opts::new("mlplane_objects", "mlplane objects by kind and phase"),
            &["kind", "phase"],
        )
        .unwrap();
        let kube_requests = IntCounterVec::new(
            Opts::new(
                "mlplane_kube_api_requests_total",
                "Requests sent to the Kubernetes API, by verb and resource",
            ),
            &["verb", "resource"],
        )
        .unwrap();
        let kube_request_duration = HistogramVec::new(
            HistogramOpts::new(
                "mlplane_kube_api_request_duration_seconds",
                "Latency of requests to the Kubernetes API (until response headers), by verb",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["verb"],
        )
        .unwrap();
        let leader = IntGauge::new("mlplane_leader", "1 while this replica holds the leader Lease").unwrap();
        let events = IntCounterVec::new(
            Opts::new("mlplane_events_total", "Kubernetes Events recorded, by kind and reason"),
            &["kind", "reason"],
        )
        .unwrap();
        let tracking_requests = IntCounterVec::new(
            Opts::new(
                "mlplane_tracking_requests_total",
                "Tracking API requests, by route and status code",
            ),
            &["route", "code"],
        )
        .unwrap();
        let tracking_duration = HistogramVec::new(
            HistogramOpts::new(
                "mlplane_tracking_request_duration_seconds",
                "Tracking API request duration, by route",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["route"],
        )
        .unwrap();
        let runs = IntCounterVec::new(
            Opts::new(
                "mlplane_runs_total",
                "Runs that reached an end state, by kind and phase",
            ),
            &["kind", "phase"],
        )
        .unwrap();
        let run_duration = HistogramVec::new(
            HistogramOpts::new("mlplane_run_duration_seconds", "Duration of finished runs, by kind").buckets(vec![
                1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
            ]),
            &["kind"],
        )
        .unwrap();
        let compute_nodes = IntGaugeVec::new(
            Opts::new(
                "mlplane_compute_nodes",
                "Nodes of ComputeCluster pools, by provider and tier",
            ),
            &["provider", "tier"],
        )
        .unwrap();
        let compute_desired_nodes = IntGaugeVec::new(
            Opts::new(
                "mlplane_compute_desired_nodes",
                "Nodes the autoscaler wants in ComputeCluster pools, by provider and tier",
            ),
            &["provider", "tier"],
        )
        .unwrap();
        let compute_pending_pods =
            IntGauge::new("mlplane_compute_pending_pods", "Pods waiting for a ComputeCluster").unwrap();
        let compute_queue = IntGaugeVec::new(
            Opts::new(
                "mlplane_compute_queue_length",
                "Runs waiting in admission queues, by reason",
            ),
            &["reason"],
        )
        .unwrap();
        let compute_admissions =
            IntCounter::new("mlplane_compute_admissions_total", "Runs admitted by admission queues").unwrap();
        let compute_scale_up_duration = HistogramVec::new(
            HistogramOpts::new(
                "mlplane_compute_scale_up_duration_seconds",
                "From asking a provider for a node to the node being Ready, by provider",
            )
            .buckets(vec![
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
            ]),
            &["provider"],
        )
        .unwrap();
        let data_refreshes = IntCounterVec::new(
            Opts::new("mlplane_data_refreshes_total", "DataAsset refreshes, by result"),
            &["result"],
        )
        .unwrap();
        let data_refresh_duration = Histogram::with_opts(
            HistogramOpts::new(
                "mlplane_data_refresh_duration_seconds",
                "Duration of DataAsset refreshes (listing, digest, recording)",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]),
        )
        .unwrap();
        let pipeline_steps = IntCounterVec::new(
            Opts::new("mlplane_pipeline_steps_total", "Pipeline steps, by outcome"),
            &["outcome"],
        )
        .unwrap();
        let traffic_shifts = IntCounter::new(
            "mlplane_model_traffic_shifts_total",
            "Changes of a ModelDeployment's effective traffic split or mirror",
        )
        .unwrap();
        let rollouts_stalled = IntCounter::new(
            "mlplane_model_rollouts_stalled_total",
            "Serving rollouts that exceeded their progress deadline",
        )
        .unwrap();
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_errors.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(objects.clone()),
            Box::new(kube_requests.clone()),
            Box::new(kube_request_duration.clone()),
            Box::new(leader.clone()),
            Box::new(events.clone()),
            Box::new(tracking_requests.clone()),
            Box::new(tracking_duration.clone()),
            Box::new(runs.clone()),
            Box::new(run_duration.clone()),
            Box::new(compute_nodes.clone()),
            Box::new(compute_desired_nodes.clone()),
            Box::new(compute_pending_pods.clone()),
            Box::new(compute_queue.clone()),
            Box::new(compute_admissions.clone()),
            Box::new(compute_scale_up_duration.clone()),
            Box::new(data_refreshes.clone()),
            Box::new(data_refresh_duration.clone()),
            Box::new(pipeline_steps.clone()),
            Box::new(traffic_shifts.clone()),
            Box::new(rollouts_stalled.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            objects,
            kube_requests,
            kube_request_duration,
            leader,
            events,
            tracking_requests,
            tracking_duration,
            runs,
            run_duration,
            compute_nodes,
            compute_desired_nodes,
            compute_pending_pods,
            compute_queue,
            compute_admissions,
            compute_scale_up_duration,
            data_refreshes,
            data_refresh_duration,
            pipeline_steps,
            traffic_shifts,
            rollouts_stalled,
        }
    }

    /// Starts timing a reconcile of `kind`; the duration is recorded when the
    /// returned guard drops, so no early return skips it.
    pub fn reconcile_timer(&self, kind: &'static str) -> ReconcileTimer {
        self.reconciles.with_label_values(&[kind]).inc();
        ReconcileTimer {
            hist: self.reconcile_duration.with_label_values(&[kind]),
            start: Instant::now(),
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = vec![];
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }

    /// Write requests (create, update, patch, delete) sent so far, leaving
    /// out Lease renewals of leader election (which must keep writing).
    pub fn kube_writes_excluding_leases(&self) -> u64 {
        let mut n = 0;
        for family in self.kube_requests.collect() {
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_string())
                        .unwrap_or_default()
                };
                let verb = label("verb");
                let write = matches!(
                    verb.as_str(),
                    "create" | "update" | "patch" | "delete" | "deletecollection"
                );
                if write && label("resource") != "leases" {
                    n += m.get_counter().get_value() as u64;
                }
            }
        }
        n
    }
}

/// Records a reconcile's duration on drop.
pub struct ReconcileTimer {
    hist: prometheus::Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.hist.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics_and_counts_writes() {
        let m = Metrics::new();
        m.kube_requests.with_label_values(&["patch", "workspaces/status"]).inc();
        m.kube_requests.with_label_values(&["get", "namespaces"]).inc_by(5);
        m.kube_requests.with_label_values(&["create", "rolebindings"]).inc();
        m.kube_requests.with_label_values(&["update", "leases"]).inc_by(3);
        {
            let _t = m.reconcile_timer("Workspace");
        }
        assert_eq!(m.kube_writes_excluding_leases(), 2);
        let text = m.render();
        assert!(text.contains("mlplane_kube_api_requests_total{resource=\"workspaces/status\",verb=\"patch\"} 1"));
        assert!(text.contains("mlplane_reconcile_total{kind=\"Workspace\"} 1"));
        assert!(text.contains("mlplane_reconcile_duration_seconds_count{kind=\"Workspace\"} 1"));
    }
}
