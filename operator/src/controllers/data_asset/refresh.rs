//! The pure half of the DataAsset controller: when a refresh is due, and
//! the status a refresh's outcome gives.
//!
//! Owns: the refresh schedule and the mapping outcome -> conditions, phase,
//! versions. Must not touch the API server, the source or the tracking
//! server.
//!
//! A refresh is due when the asset has never been listed, when its spec
//! changed (a new generation), when the annotation `mlplane.io/refresh`
//! differs from `status.lastHandledRefresh`, or `refresh.interval` after the
//! last successful listing. A failed listing is retried by the driver with
//! a backoff (it is not recorded in status, so a source that stays down
//! causes no writes).
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::api::{
    DataAsset, DataAssetPhase, DataAssetStatus, DataVersion, DurationError, NewCondition, READY, REFRESH_ANNOTATION,
    SOURCE_REACHABLE, find_condition, set_condition,
};
use crate::tracking::client::DataVersionJson;

/// Why a refresh runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// Never listed.
    Created,
    /// A new generation.
    SpecChanged,
    /// The refresh annotation changed.
    Requested,
    /// `refresh.interval` elapsed.
    Interval,
}

impl Trigger {
    /// As said in events and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Created => "first listing",
            Trigger::SpecChanged => "spec changed",
            Trigger::Requested => "mlplane.io/refresh changed",
            Trigger::Interval => "refresh interval",
        }
    }
}

/// When the next refresh is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Now, for this reason.
    Now(Trigger),
    /// After this long (the interval has not elapsed).
    In(Duration),
    /// Only on a spec change or the annotation.
    OnChange,
}

/// The refresh annotation's current value (empty when absent).
pub fn refresh_token(asset: &DataAsset) -> String {
    asset.annotations().get(REFRESH_ANNOTATION).cloned().unwrap_or_default()
}

/// When `asset` is next refreshed, as of `now`.
pub fn due(asset: &DataAsset, now: Timestamp) -> Result<Due, DurationError> {
    let status = asset.status.clone().unwrap_or_default();
    let Some(last) = status.last_refresh_time.as_ref() else {
        return Ok(Due::Now(Trigger::Created));
    };
    if status.observed_generation != asset.metadata.generation {
        return Ok(Due::Now(Trigger::SpecChanged));
    }
    if status.last_handled_refresh.clone().unwrap_or_default() != refresh_token(asset) {
        return Ok(Due::Now(Trigger::Requested));
    }
    let Some(refresh) = &asset.spec.refresh else {
        return Ok(Due::OnChange);
    };
    let interval = refresh.interval.to_std()?;
    let elapsed = now.duration_since(last.0).unsigned_abs();
    Ok(if elapsed >= interval {
        Due::Now(Trigger::Interval)
    } else {
        Due::In(interval - elapsed)
    })
}

/// What the last refresh attempt found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Listed: the newest versions (from the tracking server, newest
    /// first), or `None` when the digest is the latest version's (the
    /// versions in status stand).
    Listed {
        versions: Option<Vec<DataVersionJson>>,
        files: u64,
        bytes: u64,
    },
    /// Listing failed (versions are kept).
    Failed { reason: String, message: String },
    /// No refresh ran this time.
    Unchanged,
}

/// A version as `status.versions` shows it.
pub fn status_version(v: &DataVersionJson) -> DataVersion {
    DataVersion {
        version: v.version.to_string(),
        digest: v.digest.clone(),
        files: v.files,
        bytes: v.bytes,
        observed_at: Timestamp::from_millisecond(v.created_at).ok().map(Time),
    }
}

/// The status after `outcome`, from the current one. `token` is the refresh
/// annotation acted on; `now` stamps `lastRefreshTime` and transitions.
pub fn next_status(asset: &DataAsset, outcome: &Outcome, token: &str, now: &Time) -> DataAssetStatus {
    let mut status = asset.status.clone().unwrap_or_default();
    let generation = asset.metadata.generation;
    let retain = asset.spec.retain_versions.max(1) as usize;
    match outcome {
        Outcome::Listed { versions, files, bytes } => {
            if let Some(versions) = versions {
                status.versions = versions.iter().take(retain).map(status_version).collect();
            }
            status.latest_version = status.versions.first().map(|v| v.version.clone());
            status.last_refresh_time = Some(Time(Timestamp::from_second(now.0.as_second()).unwrap_or(now.0)));
            status.last_handled_refresh = Some(token.to_string()).filter(|t| !t.is_empty());
            status.observed_generation = generation;
            set_condition(
                &mut status.conditions,
                NewCondition::new(
                    SOURCE_REACHABLE,
                    true,
                    "Listed",
                    format!("listed {files} object(s), {bytes} bytes"),
                )
                .observed_generation(generation),
                now,
            );
        }
        Outcome::Failed { reason, message } => {
            set_condition(
                &mut status.conditions,
                NewCondition::new(SOURCE_REACHABLE, false, reason, message.clone()).observed_generation(generation),
                now,
            );
        }
        Outcome::Unchanged => {}
    }
    status.versions.truncate(retain);
    let reachable = find_condition(&status.conditions, SOURCE_REACHABLE).map(|c| c.status == "True");
    let (ready, phase, reason, message) = match (status.versions.first(), reachable) {
        (Some(v), Some(true)) => (
            true,
            DataAssetPhase::Ready,
            "VersionAvailable".to_string(),
            format!(
                "latest version {} ({}: {} file(s), {} bytes)",
                v.version, v.digest, v.files, v.bytes
            ),
        ),
        (latest, Some(false)) => {
            let (reason, message) = find_condition(&status.conditions, SOURCE_REACHABLE)
                .map(|c| (c.reason.clone(), c.message.clone()))
                .unwrap_or_default();
            let kept = match latest {
                Some(v) => format!(
                    "; {} version(s) kept, runs still pin the latest, {}",
                    status.versions.len(),
                    v.version
                ),
                None => String::new(),
            };
            (false, DataAssetPhase::Failed, reason, format!("{message}{kept}"))
        }
        _ => (
            false,
            DataAssetPhase::Pending,
            "Pending".to_string(),
            "the source has not been listed yet".to_string(),
        ),
    };
    status.phase = Some(phase);
    set_condition(
        &mut status.conditions,
        NewCondition::new(READY, ready, reason, message).observed_generation(generation),
        now,
    );
    status
}

/// The status of an asset that cannot be refreshed at all (no tracking
/// server, an unusable source URI): `Ready=False` with `reason`, versions
/// kept.
pub fn blocked_status(
    asset: &DataAsset,
    reason: &str,
    message: &str,
    phase: DataAssetPhase,
    now: &Time,
) -> DataAssetStatus {
    let mut status = asset.status.clone().unwrap_or_default();
    status.observed_generation = asset.metadata.generation;
    status.phase = Some(phase);
    set_condition(
        &mut status.conditions,
        NewCondition::new(READY, false, reason, message).observed_generation(asset.metadata.generation),
        now,
    );
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn asset(status: serde_json::Value, annotations: serde_json::Value, refresh: Option<&str>) -> DataAsset {
        let mut spec = json!({"type": "UriFolder", "source": {"uri": "s3://b/x/"}, "retainVersions": 2});
        if let Some(i) = refresh {
            spec["refresh"] = json!({"interval": i});
        }
        serde_json::from_value(json!({
            "apiVersion": "mlplane.io/v1alpha1", "kind": "DataAsset",
            "metadata": {"name": "d", "namespace": "n", "generation": 1, "annotations": annotations},
            "spec": spec, "status": status,
        }))
        .unwrap()
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn listed(at_s: i64) -> serde_json::Value {
        json!({"observedGeneration": 1, "lastRefreshTime": at(at_s).to_string()})
    }

    #[test]
    fn refreshes_are_due_on_creation_spec_change_annotation_and_interval() {
        assert_eq!(
            due(&asset(json!(null), json!({}), None), at(0)).unwrap(),
            Due::Now(Trigger::Created)
        );
        let mut a = asset(listed(100), json!({}), None);
        assert_eq!(due(&a, at(200)).unwrap(), Due::OnChange);
        a.metadata.generation = Some(2);
        assert_eq!(due(&a, at(200)).unwrap(), Due::Now(Trigger::SpecChanged));
        let a = asset(listed(100), json!({"mlplane.io/refresh": "1"}), None);
        assert_eq!(due(&a, at(200)).unwrap(), Due::Now(Trigger::Requested));
        let mut handled = listed(100);
        handled["lastHandledRefresh"] = json!("1");
        assert_eq!(
            due(&asset(handled, json!({"mlplane.io/refresh": "1"}), None), at(200)).unwrap(),
            Due::OnChange
        );
        let a = asset(listed(100), json!({}), Some("1m"));
        assert_eq!(due(&a, at(130)).unwrap(), Due::In(Duration::from_secs(30)));
        assert_eq!(due(&a, at(160)).unwrap(), Due::Now(Trigger::Interval));
    }

    fn version(n: i64, digest: &str) -> DataVersionJson {
        DataVersionJson {
            namespace: "n".into(),
            data_asset: "d".into(),
            version: n,
            digest: digest.into(),
            files: n,
            bytes: 10 * n,
            source: "s3://b/x/".into(),
            created_at: 1_700_000_000_000,
        }
    }

    #[test]
    fn listing_sets_versions_ready_and_failures_keep_them() {
        let now = Time(at(1000));
        let a = asset(json!(null), json!({"mlplane.io/refresh": "t1"}), None);
        let outcome = Outcome::Listed {
            versions: Some(vec![
                version(3, "sha256:c"),
                version(2, "sha256:b"),
                version(1, "sha256:a"),
            ]),
            files: 3,
            bytes: 30,
        };
        let s = next_status(&a, &outcome, "t1", &now);
        assert_eq!(s.latest_version.as_deref(), Some("3"));
        assert_eq!(s.versions.len(), 2, "retainVersions");
        assert_eq!(s.phase, Some(DataAssetPhase::Ready));
        assert_eq!(s.last_handled_refresh.as_deref(), Some("t1"));
        let ready = find_condition(&s.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "VersionAvailable")
        );
        assert!(ready.message.contains("latest version 3"), "{}", ready.message);

        let mut a = a;
        a.status = Some(s);
        let failed = Outcome::Failed {
            reason: "SourceUnreachable".into(),
            message: "listing s3://b/x/: connection refused".into(),
        };
        let s = next_status(&a, &failed, "t1", &Time(at(2000)));
        assert_eq!(s.versions.len(), 2, "versions are kept");
        assert_eq!(s.latest_version.as_deref(), Some("3"));
        assert_eq!(s.phase, Some(DataAssetPhase::Failed));
        let reach = find_condition(&s.conditions, SOURCE_REACHABLE).unwrap();
        assert_eq!(
            (reach.status.as_str(), reach.reason.as_str()),
            ("False", "SourceUnreachable")
        );
        let ready = find_condition(&s.conditions, READY).unwrap();
        assert_eq!(ready.reason, "SourceUnreachable");
        assert!(ready.message.contains("2 version(s) kept"), "{}", ready.message);
        assert_eq!(s.last_refresh_time, Some(Time(at(1000))), "only successful listings");

        // The same failure again changes nothing (no status write).
        a.status = Some(s.clone());
        assert_eq!(next_status(&a, &failed, "t1", &Time(at(3000))), s);

        // Reachable again, same digest: versions stand, the time moves.
        let same = Outcome::Listed {
            versions: None,
            files: 3,
            bytes: 30,
        };
        let s = next_status(&a, &same, "t1", &Time(at(4000)));
        assert_eq!((s.versions.len(), s.phase), (2, Some(DataAssetPhase::Ready)));
        assert_eq!(s.last_refresh_time, Some(Time(at(4000))));
    }

    #[test]
    fn blocked_assets_say_why() {
        let a = asset(json!(null), json!({}), None);
        let s = blocked_status(
            &a,
            "TrackingNotConfigured",
            "no tracking",
            DataAssetPhase::Pending,
            &Time(at(1)),
        );
        let ready = find_condition(&s.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "TrackingNotConfigured")
        );
        assert_eq!(s.observed_generation, Some(1));
    }
}
