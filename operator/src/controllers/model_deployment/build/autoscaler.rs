//! The autoscaling/v2 HorizontalPodAutoscaler of an autoscaled deployment
//! (`scale: {minInstances, maxInstances, targetUtilization}`): between
//! `minInstances` (default 1) and `maxInstances` replicas, on average CPU
//! utilization `targetUtilization` percent (default 70) of the pods' CPU
//! requests (so the deployment should set `resources.cpu`; workspace
//! namespaces default it through their LimitRange).
//!
//! Owns: the autoscaler builder. Must not touch the API server.
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec, MetricTarget,
    ResourceMetricSource,
};

use super::{child_name, deployment_labels, metadata, with_spec_hash};
use crate::api::model_deployment::{ModelDeployment, Scale, ServingDeployment};

/// Replicas of an autoscaler without `minInstances`.
pub const DEFAULT_MIN_INSTANCES: i32 = 1;
/// CPU utilization target without `targetUtilization`.
pub const DEFAULT_TARGET_UTILIZATION: i32 = 70;

/// Whether `scale` asks for an autoscaler.
pub fn autoscaled(scale: Option<&Scale>) -> bool {
    scale.is_some_and(|s| s.instance_count.is_none() && s.max_instances.is_some())
}

/// The autoscaler of deployment `d`, if it is autoscaled.
pub fn build(md: &ModelDeployment, d: &ServingDeployment) -> Option<HorizontalPodAutoscaler> {
    let scale = d.scale.as_ref().filter(|s| autoscaled(Some(s)))?;
    let name = child_name(&md.metadata.name.clone().unwrap_or_default(), &d.name);
    let max = scale.max_instances.unwrap_or(DEFAULT_MIN_INSTANCES);
    let min = scale
        .min_instances
        .unwrap_or(DEFAULT_MIN_INSTANCES)
        .clamp(1, max.max(1));
    Some(with_spec_hash(HorizontalPodAutoscaler {
        metadata: metadata(md, &name, deployment_labels(md, &d.name)),
        spec: HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: name.clone(),
            },
            min_replicas: Some(min),
            max_replicas: max.max(min),
            metrics: Some(vec![MetricSpec {
                type_: "Resource".into(),
                resource: Some(ResourceMetricSource {
                    name: "cpu".into(),
                    target: MetricTarget {
                        type_: "Utilization".into(),
                        average_utilization: Some(scale.target_utilization.unwrap_or(DEFAULT_TARGET_UTILIZATION)),
                        ..Default::default()
                    },
                }),
                ..Default::default()
            }]),
            behavior: None,
        },
        status: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::model_deployment::build::test_support::md;
    use serde_json::json;

    #[test]
    fn scale_settings_give_a_cpu_autoscaler_of_the_deployment() {
        let md = md(json!({"deployments": [
            {"name": "blue", "model": {"uri": "s3://m/1", "format": "ONNX"},
             "scale": {"minInstances": 2, "maxInstances": 5, "targetUtilization": 60}},
            {"name": "green", "model": {"uri": "s3://m/2", "format": "ONNX"}, "scale": {"maxInstances": 3}},
            {"name": "fixed", "model": {"uri": "s3://m/3", "format": "ONNX"}, "scale": {"instanceCount": 2}},
            {"name": "plain", "model": {"uri": "s3://m/4", "format": "ONNX"}},
        ]}));
        let hpa = build(&md, &md.spec.deployments[0]).unwrap();
        assert_eq!(hpa.metadata.name.as_deref(), Some("resnet-blue"));
        let spec = hpa.spec;
        assert_eq!(spec.scale_target_ref.kind, "Deployment");
        assert_eq!(spec.scale_target_ref.name, "resnet-blue");
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(2), 5));
        let metric = &spec.metrics.unwrap()[0];
        let target = &metric.resource.as_ref().unwrap().target;
        assert_eq!(
            (
                metric.resource.as_ref().unwrap().name.as_str(),
                target.average_utilization
            ),
            ("cpu", Some(60))
        );
        let spec = build(&md, &md.spec.deployments[1]).unwrap().spec;
        assert_eq!((spec.min_replicas, spec.max_replicas), (Some(1), 3));
        assert_eq!(
            spec.metrics.unwrap()[0]
                .resource
                .as_ref()
                .unwrap()
                .target
                .average_utilization,
            Some(70)
        );
        assert!(build(&md, &md.spec.deployments[2]).is_none());
        assert!(build(&md, &md.spec.deployments[3]).is_none());
    }
}
