//! The DataAsset controller's I/O driver: decide whether a refresh is due
//! ([`super::refresh::due`]), list the source with its credentials, record
//! the manifest with the tracking server (a new version only when the digest
//! changed), and write status only when it changed.
//!
//! Owns: DataAsset status, the versions in the tracking server. Touches no
//! other object; reads the Secret `spec.source.secretRef` names (a GET per
//! refresh, not a watch: the operator keeps no Secret in memory). Its values
//! are used for the listing only; they never reach status, events or logs
//! (store errors are scrubbed, see [`crate::storage::Credentials::redact`]).
//!
//! Failed listings are retried with a backoff held in memory (30 s
//! doubling to 10 min, never later than the interval), not written to
//! status: a source that stays down costs no writes. A refresh that just
//! ran is not repeated for a reconcile that saw the status from before it
//! (a watch event may lag the write).
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::{Predicate, WatchStreamExt, predicates};
use tokio_util::sync::CancellationToken;

use super::refresh::{Due, Outcome, Trigger, blocked_status, due, next_status, refresh_token};
use crate::api::{DataAsset, DataAssetPhase, DataAssetType, READY, SOURCE_REACHABLE, find_condition};
use crate::controllers::apply::patch_status_if_changed;
use crate::controllers::{Context, Result, guarded_error_policy, guarded_watch, readable, watch_config};
use crate::storage::manifest::{self, Shape};
use crate::storage::{self, Credentials};
use crate::tracking::client::TrackingClient;

const KIND: &str = "DataAsset";
/// Ready reason without a tracking server to keep versions in.
pub const TRACKING_NOT_CONFIGURED: &str = "TrackingNotConfigured";
/// Ready reason of a source URI that cannot be listed.
pub const INVALID_SOURCE: &str = "InvalidSource";
/// Longest a listing may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(300);
/// First retry of a failed listing; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_secs(30);
const RETRY_MAX: Duration = Duration::from_secs(600);
/// A refresh is not repeated within this long for the same spec and token.
const REPEAT_GAP: Duration = Duration::from_secs(10);

/// The last refresh attempt of one DataAsset.
#[derive(Clone, Debug)]
struct Attempt {
    at: Instant,
    generation: Option<i64>,
    token: String,
    failures: u32,
}

/// The DataAsset controller's context: the shared one plus attempts.
pub struct DataAssetContext {
    pub base: Arc<Context>,
    attempts: Mutex<HashMap<String, Attempt>>,
}

impl std::ops::Deref for DataAssetContext {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.base
    }
}

impl DataAssetContext {
    /// How long to wait before trying again, when the last attempt for the
    /// same generation and token was recent (or failed).
    fn wait(&self, uid: &str, generation: Option<i64>, token: &str) -> Option<Duration> {
        let attempts = self.attempts.lock().expect("attempts lock");
        let a = attempts
            .get(uid)
            .filter(|a| a.generation == generation && a.token == token)?;
        let gap = if a.failures == 0 {
            REPEAT_GAP
        } else {
            retry_delay(a.failures)
        };
        gap.checked_sub(a.at.elapsed()).filter(|d| !d.is_zero())
    }

    fn record(&self, uid: &str, generation: Option<i64>, token: &str, failed: bool) -> u32 {
        let mut attempts = self.attempts.lock().expect("attempts lock");
        let prev = attempts
            .get(uid)
            .filter(|a| a.generation == generation && a.token == token)
            .map_or(0, |a| a.failures);
        let failures = if failed { prev.saturating_add(1) } else { 0 };
        attempts.insert(
            uid.to_string(),
            Attempt {
                at: Instant::now(),
                generation,
                token: token.to_string(),
                failures,
            },
        );
        failures
    }
}

/// Delay before retry `n` (1-based) of a failed listing.
fn retry_delay(failures: u32) -> Duration {
    RETRY_MIN
        .saturating_mul(1u32 << failures.saturating_sub(1).min(5))
        .min(RETRY_MAX)
}

/// Runs the controller until `stop` is cancelled.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let client = ctx.client.clone();
    let (store, stream) = guarded_watch(Api::<DeserializeGuard<DataAsset>>::all(client), watch_config());
    // A new spec or a changed annotation (`mlplane.io/refresh`) is work; the
    // controller's own status writes are not (refreshes due later are
    // requeued).
    let stream = stream.predicate_filter(
        predicates::generation.combine(predicates::annotations),
        Default::default(),
    );
    let dctx = Arc::new(DataAssetContext {
        base: ctx,
        attempts: Mutex::default(),
    });
    Controller::for_stream(stream, store)
        .with_config(kube::runtime::controller::Config::default().concurrency(dctx.settings.concurrency))
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(
            |obj, ctx: Arc<DataAssetContext>| async move {
                match readable(&obj, &ctx.metrics) {
                    Some(da) => reconcile(da, &ctx).await,
                    None => Ok(Action::await_change()),
                }
            },
            guarded_error_policy,
            dctx,
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "data asset controller stream error");
            }
        })
        .await;
}

/// One reconcile of a DataAsset.
pub async fn reconcile(da: &DataAsset, ctx: &DataAssetContext) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_timer(KIND);
    if da.metadata.deletion_timestamp.is_some() {
        // Versions stay in the tracking server: a run can still say what it read.
        return Ok(Action::await_change());
    }
    let ns = da.namespace().unwrap_or_default();
    let name = da.name_any();
    let uid = da.uid().unwrap_or_default();
    let api: Api<DataAsset> = Api::namespaced(ctx.client.clone(), &ns);
    let now = Time(Timestamp::now());
    let uri = da.spec.source.uri.as_str();

    let blocked = |reason: &str, message: String, phase| (reason.to_string(), message, phase);
    let problem = match (&ctx.settings.tracking, storage::scheme_of(uri)) {
        (None, _) => Some(blocked(
            TRACKING_NOT_CONFIGURED,
            "no tracking server: versions and manifests are stored with the run history, so the operator needs \
             --tracking-url (the chart's tracking.enabled)"
                .into(),
            DataAssetPhase::Pending,
        )),
        (_, Err(e)) => Some(blocked(
            INVALID_SOURCE,
            format!("spec.source.uri: {e}"),
            DataAssetPhase::Failed,
        )),
        (_, Ok(s)) if !s.is_remote() => Some(blocked(
            INVALID_SOURCE,
            "spec.source.uri: local paths are not data sources (use s3://, gs://, az://, http:// or https://)".into(),
            DataAssetPhase::Failed,
        )),
        _ => None,
    };
    let due = match (&problem, due(da, now.0)) {
        (Some(_), _) => Due::OnChange,
        (None, Ok(d)) => d,
        (None, Err(e)) => {
            let p = blocked(
                "InvalidDuration",
                format!("spec.refresh.interval: {e}"),
                DataAssetPhase::Failed,
            );
            return write_blocked(da, ctx, &api, &p, &now).await;
        }
    };
    if let Some(p) = &problem {
        return write_blocked(da, ctx, &api, p, &now).await;
    }
    let tracking = ctx.settings.tracking.as_ref().expect("checked above");
    let token = refresh_token(da);
    let generation = da.metadata.generation;

    let mut requeue = ctx.settings.resync;
    let outcome = match due {
        Due::Now(trigger) => match ctx.wait(&uid, generation, &token) {
            Some(wait) => {
                requeue = wait;
                Outcome::Unchanged
            }
            None => {
                let started = Instant::now();
                let outcome = refresh(da, ctx, tracking, trigger).await?;
                ctx.metrics
                    .data_refresh_duration
                    .observe(started.elapsed().as_secs_f64());
                let failed = matches!(outcome, Outcome::Failed { .. });
                let failures = ctx.record(&uid, generation, &token, failed);
                if failed {
                    requeue = retry_delay(failures);
                    ctx.metrics.data_refreshes.with_label_values(&["failed"]).inc();
                } else if let Some(r) = &da.spec.refresh
                    && let Ok(i) = r.interval.to_std()
                {
                    requeue = i;
                }
                outcome
            }
        },
        Due::In(d) => {
            requeue = d;
            Outcome::Unchanged
        }
        Due::OnChange => Outcome::Unchanged,
    };
    if let Some(i) = da.spec.refresh.as_ref().and_then(|r| r.interval.to_std().ok()) {
        requeue = requeue.min(i);
    }

    let status = next_status(da, &outcome, &token, &now);
    let before = da
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, SOURCE_REACHABLE))
        .cloned();
    if patch_status_if_changed(&api, &name, da.status.as_ref(), &status).await? {
        let after = find_condition(&status.conditions, SOURCE_REACHABLE);
        match (before.as_ref().map(|c| c.status.as_str()), after) {
            (Some("True") | None, Some(c)) if c.status == "False" => {
                ctx.event(da, EventType::Warning, &c.reason, "Refresh", c.message.clone())
                    .await;
            }
            (Some("False"), Some(c)) if c.status == "True" => {
                ctx.event(
                    da,
                    EventType::Normal,
                    "SourceReachable",
                    "Refresh",
                    format!("the source answers again: {}", c.message),
                )
                .await;
            }
            _ => {}
        }
    }
    ctx.reset_failures(&uid);
    Ok(Action::requeue(requeue))
}

/// Writes the status of an asset that cannot be refreshed, with a Warning
/// event when the reason is new.
async fn write_blocked(
    da: &DataAsset,
    ctx: &DataAssetContext,
    api: &Api<DataAsset>,
    (reason, message, phase): &(String, String, DataAssetPhase),
    now: &Time,
) -> Result<Action> {
    let status = blocked_status(da, reason, message, *phase, now);
    let was = da
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, READY))
        .map(|c| c.reason.clone());
    if patch_status_if_changed(api, &da.name_any(), da.status.as_ref(), &status).await?
        && was.as_deref() != Some(reason.as_str())
    {
        ctx.event(da, EventType::Warning, reason, "Reconcile", message.clone())
            .await;
    }
    ctx.reset_failures(&da.uid().unwrap_or_default());
    Ok(Action::await_change())
}

/// The credentials `spec.source.secretRef` names, or the outcome that says
/// why they cannot be used.
async fn credentials(da: &DataAsset, ctx: &DataAssetContext) -> Result<std::result::Result<Credentials, Outcome>> {
    let Some(secret_ref) = &da.spec.source.secret_ref else {
        return Ok(Ok(Credentials::none()));
    };
    let ns = da.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(secret) = secrets.get_opt(&secret_ref.name).await? else {
        return Ok(Err(Outcome::Failed {
            reason: "SecretNotFound".into(),
            message: format!(
                "spec.source.secretRef: Secret {:?} not found in namespace {ns}",
                secret_ref.name
            ),
        }));
    };
    let origin = format!("Secret {:?}", secret_ref.name);
    let data = secret.data.unwrap_or_default();
    match Credentials::from_secret_data(&data, &origin) {
        Ok(c) if c.is_empty() => Ok(Err(Outcome::Failed {
            reason: "InvalidCredentials".into(),
            message: format!(
                "spec.source.secretRef: {origin} has none of the keys {} (nor any other AWS_*, AZURE_* or GOOGLE_* key)",
                storage::credentials::KEYS.join(", ")
            ),
        })),
        Ok(c) => Ok(Ok(c)),
        Err(e) => Ok(Err(Outcome::Failed {
            reason: "InvalidCredentials".into(),
            message: format!("spec.source.secretRef: {e}"),
        })),
    }
}

/// Lists the source and records its manifest: the outcome for status. A
/// tracking server that cannot be reached is an error (retried with the
/// reconcile backoff); a source that cannot be listed is an outcome.
async fn refresh(
    da: &DataAsset,
    ctx: &DataAssetContext,
    tracking: &TrackingClient,
    trigger: Trigger,
) -> Result<Outcome> {
    let ns = da.namespace().unwrap_or_default();
    let name = da.name_any();
    let uri = da.spec.source.uri.as_str();
    let creds = match credentials(da, ctx).await? {
        Ok(c) => c,
        Err(outcome) => return Ok(outcome),
    };
    let shape = match da.spec.type_ {
        DataAssetType::UriFile => Shape::File,
        DataAssetType::UriFolder => Shape::Folder,
    };
    let failed = |e: storage::StorageError| Outcome::Failed {
        reason: e.cause.reason().to_string(),
        message: e.message,
    };
    let loc = match storage::open(uri, &creds) {
        Ok(l) => l,
        Err(e) => return Ok(failed(e)),
    };
    let listed = match tokio::time::timeout(LIST_TIMEOUT, manifest::list(&loc, shape, uri, &creds)).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return Ok(failed(e)),
        Err(_) => {
            return Ok(Outcome::Failed {
                reason: storage::Cause::Unreachable.reason().into(),
                message: format!("listing {uri} took longer than {}s", LIST_TIMEOUT.as_secs()),
            });
        }
    };
    let digest = listed.digest();
    let (files, bytes) = (listed.files(), listed.bytes());
    let latest = da.status.as_ref().and_then(|s| s.versions.first());
    if latest.is_some_and(|v| v.digest == digest) {
        ctx.metrics.data_refreshes.with_label_values(&["unchanged"]).inc();
        tracing::debug!(namespace = %ns, name = %name, %digest, trigger = trigger.as_str(), "data unchanged");
        return Ok(Outcome::Listed {
            versions: None,
            files,
            bytes,
        });
    }
    let text = listed.text();
    drop(listed);
    let (version, created) = tracking.record_data_version(&ns, &name, uri, &digest, &text).await?;
    drop(text);
    if created {
        ctx.metrics.data_refreshes.with_label_values(&["new_version"]).inc();
        ctx.event(
            da,
            EventType::Normal,
            "VersionCreated",
            "Refresh",
            format!(
                "version {}: {files} file(s), {bytes} bytes, {digest} ({})",
                version.version,
                trigger.as_str()
            ),
        )
        .await;
    } else {
        ctx.metrics.data_refreshes.with_label_values(&["unchanged"]).inc();
    }
    let retain = i64::from(da.spec.retain_versions.max(1));
    let versions = tracking.data_versions(&ns, &name, retain).await?;
    Ok(Outcome::Listed {
        versions: Some(versions),
        files,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_ten_minutes() {
        assert_eq!(retry_delay(1), Duration::from_secs(30));
        assert_eq!(retry_delay(2), Duration::from_secs(60));
        assert_eq!(retry_delay(5), Duration::from_secs(480));
        assert_eq!(retry_delay(6), Duration::from_secs(600));
        assert_eq!(retry_delay(60), Duration::from_secs(600));
    }
}
