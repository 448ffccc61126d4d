//! Who may call the tracking API, and on which experiments.
//!
//! Every request carries a Kubernetes bearer token, checked with TokenReview
//! (missing or invalid: 401). An MLflow experiment named `<namespace>/<name>`
//! belongs to the workspace of that namespace:
//! - the operator itself may do everything;
//! - a run pod's ServiceAccount (`system:serviceaccount:<ns>:mlplane-run`) may
//!   read and write only experiments of its own namespace;
//! - anyone else gets what RBAC grants on the Experiment: a SubjectAccessReview
//!   of `get` (read) or `update` (write) on `experiments.mlplane.io/<name>` in
//!   the namespace;
//! - an experiment outside any workspace (no `/` in its name) is the
//!   operator's alone.
//!
//! mlplane's own records (`/api/2.0/mlplane/...`: DataAsset versions, the
//! Pipeline step cache) follow the same rules on the DataAsset or Pipeline
//! they belong to ([`Auth::authorize_in`]), except that only the operator
//! writes them ([`Auth::require_operator`]).
//!
//! Decisions are cached briefly (TokenReview 60 s, SubjectAccessReview 10 s)
//! so a run logging thousands of metrics costs the API server two requests.
//! `AuthMode::Disabled` (standalone local use only) allows everything.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::Client;
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// ServiceAccount name of run pods in a workspace namespace.
pub const RUN_SERVICE_ACCOUNT: &str = "mlplane-run";
const TOKEN_TTL: Duration = Duration::from_secs(60);
const ACCESS_TTL: Duration = Duration::from_secs(10);
const CACHE_LIMIT: usize = 10_000;

/// Read or write access to an experiment and its runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub username: String,
    pub groups: Vec<String>,
    pub uid: String,
}

impl Identity {
    /// The anonymous identity of an auth-disabled server.
    pub fn anonymous() -> Self {
        Self {
            username: "anonymous".into(),
            groups: vec![],
            uid: String::new(),
        }
    }

    /// `(namespace, name)` when the caller is a ServiceAccount.
    pub fn service_account(&self) -> Option<(&str, &str)> {
        let rest = self.username.strip_prefix("system:serviceaccount:")?;
        rest.split_once(':')
    }
}

/// The workspace namespace an experiment name belongs to (`<ns>/<name>`).
pub fn experiment_namespace(experiment_name: &str) -> Option<(&str, &str)> {
    experiment_name
        .split_once('/')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
}

/// How requests are authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// Standalone local use: no token needed, everything allowed.
    Disabled,
    /// TokenReview and SubjectAccessReview against the API server.
    Kubernetes {
        /// Username of the operator (always allowed).
        operator_user: String,
    },
}

/// Cache key of an access decision: (username, namespace, `<resource>/<name>`, access).
type AccessKey = (String, String, String, Access);

/// Authentication and authorization of tracking requests.
pub struct Auth {
    mode: AuthMode,
    client: Option<Client>,
    tokens: Mutex<HashMap<[u8; 32], (Identity, Instant)>>,
    access: Mutex<HashMap<AccessKey, (bool, Instant)>>,
}

impl Auth {
    pub fn new(mode: AuthMode, client: Option<Client>) -> Self {
        Self {
            mode,
            client,
            tokens: Mutex::default(),
            access: Mutex::default(),
        }
    }

    /// Whether requests need a token.
    pub fn enabled(&self) -> bool {
        self.mode != AuthMode::Disabled
    }

    /// The caller of a request (401 without a valid bearer token).
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Identity, ApiError> {
        if self.mode == AuthMode::Disabled {
            return Ok(Identity::anonymous());
        }
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthenticated("a Kubernetes bearer token is required (Authorization: Bearer)")
            })?;
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some((id, at)) = self.tokens.lock().expect("token cache").get(&key)
            && at.elapsed() < TOKEN_TTL
        {
            return Ok(id.clone());
        }
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| ApiError::internal("auth enabled without a client"))?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                ..Default::default()
            },
            ..Default::default()
        };
        let resp = Api::<TokenReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(ApiError::internal)?;
        let status = resp.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(ApiError::unauthenticated(
                status.error.unwrap_or_else(|| "the bearer token is not valid".into()),
            ));
        }
        let user = status.user.unwrap_or_default();
        let id = Identity {
            username: user.username.unwrap_or_default(),
            groups: user.groups.unwrap_or_default(),
            uid: user.uid.unwrap_or_default(),
        };
        let mut cache = self.tokens.lock().expect("token cache");
        if cache.len() >= CACHE_LIMIT {
            cache.retain(|_, (_, at)| at.elapsed() < TOKEN_TTL);
        }
        cache.insert(key, (id.clone(), Instant::now()));
        Ok(id)
    }

    /// Whether `who` may read or write the experiment `experiment_name`
    /// (403 with the reason otherwise).
    pub async fn authorize(&self, who: &Identity, experiment_name: &str, access: Access) -> Result<(), ApiError> {
        let AuthMode::Kubernetes { operator_user } = &self.mode else {
            return Ok(());
        };
        if &who.username == operator_user {
            return Ok(());
        }
        let Some((ns, name)) = experiment_namespace(experiment_name) else {
            return Err(ApiError::permission_denied(format!(
                "experiment {experiment_name:?} belongs to no workspace; only the operator may use it"
            )));
        };
        self.authorize_in(who, ns, "experiments", Some(name), access).await
    }

    /// Whether `who` may read or write what the mlplane object `resource`
    /// (`name`, or any when `None`) in workspace namespace `ns` guards: the
    /// operator may; a run pod's ServiceAccount may within its own namespace;
    /// anyone else as RBAC grants `get` (read) or `update` (write) on it.
    pub async fn authorize_in(
        &self,
        who: &Identity,
        ns: &str,
        resource: &'static str,
        name: Option<&str>,
        access: Access,
    ) -> Result<(), ApiError> {
        let AuthMode::Kubernetes { operator_user } = &self.mode else {
            return Ok(());
        };
        if &who.username == operator_user {
            return Ok(());
        }
        if let Some((sa_ns, sa_name)) = who.service_account()
            && sa_name == RUN_SERVICE_ACCOUNT
        {
            return if sa_ns == ns {
                Ok(())
            } else {
                Err(ApiError::permission_denied(format!(
                    "{} may only use {resource} of workspace namespace {sa_ns:?}, not {ns:?}",
                    who.username
                )))
            };
        }
        let verb = match access {
            Access::Read => "get",
            Access::Write => "update",
        };
        let object = format!("{resource}/{}", name.unwrap_or_default());
        let key = (who.username.clone(), ns.to_string(), object, access);
        let cached = self.access.lock().expect("access cache").get(&key).copied();
        let allowed = match cached {
            Some((allowed, at)) if at.elapsed() < ACCESS_TTL => allowed,
            _ => {
                let allowed = self.subject_access_review(who, ns, resource, name, verb).await?;
                let mut cache = self.access.lock().expect("access cache");
                if cache.len() >= CACHE_LIMIT {
                    cache.retain(|_, (_, at)| at.elapsed() < ACCESS_TTL);
                }
                cache.insert(key, (allowed, Instant::now()));
                allowed
            }
        };
        if allowed {
            Ok(())
        } else {
            let what = match name {
                Some(n) => format!("{resource}.mlplane.io {n:?}"),
                None => format!("{resource}.mlplane.io"),
            };
            Err(ApiError::permission_denied(format!(
                "{} may not {verb} {what} in namespace {ns:?}",
                who.username
            )))
        }
    }

    /// Writes of mlplane's own records (DataAsset versions, the step cache):
    /// the operator only.
    pub fn require_operator(&self, who: &Identity) -> Result<(), ApiError> {
        match &self.mode {
            AuthMode::Disabled => Ok(()),
            AuthMode::Kubernetes { operator_user } if &who.username == operator_user => Ok(()),
            AuthMode::Kubernetes { .. } => Err(ApiError::permission_denied(format!(
                "{} may not write mlplane records; only the operator may",
                who.username
            ))),
        }
    }

    async fn subject_access_review(
        &self,
        who: &Identity,
        ns: &str,
        resource: &str,
        name: Option<&str>,
        verb: &str,
    ) -> Result<bool, ApiError> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| ApiError::internal("auth enabled without a client"))?;
        let sar = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(who.username.clone()),
                groups: Some(who.groups.clone()),
                uid: Some(who.uid.clone()).filter(|u| !u.is_empty()),
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(ns.to_string()),
                    verb: Some(verb.to_string()),
                    group: Some("mlplane.io".into()),
                    resource: Some(resource.to_string()),
                    name: name.map(str::to_string),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let resp = Api::<SubjectAccessReview>::all(client.clone())
            .create(&PostParams::default(), &sar)
            .await
            .map_err(ApiError::internal)?;
        Ok(resp.status.is_some_and(|s| s.allowed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> Identity {
        Identity {
            username: name.into(),
            groups: vec![],
            uid: String::new(),
        }
    }

    #[test]
    fn experiment_names_map_to_namespaces() {
        assert_eq!(experiment_namespace("vision/resnet"), Some(("vision", "resnet")));
        assert_eq!(experiment_namespace("Default"), None);
        assert_eq!(experiment_namespace("/x"), None);
        assert_eq!(
            id("system:serviceaccount:vision:mlplane-run").service_account(),
            Some(("vision", "mlplane-run"))
        );
        assert_eq!(id("alice").service_account(), None);
    }

    #[tokio::test]
    async fn run_service_accounts_are_confined_to_their_namespace() {
        // No client: these decisions must not need the API server.
        let auth = Auth::new(
            AuthMode::Kubernetes {
                operator_user: "system:serviceaccount:mlplane-system:mlplane".into(),
            },
            None,
        );
        let run = id("system:serviceaccount:vision:mlplane-run");
        assert!(auth.authorize(&run, "vision/resnet", Access::Write).await.is_ok());
        let e = auth.authorize(&run, "nlp/bert", Access::Read).await.unwrap_err();
        assert_eq!(e.code, "PERMISSION_DENIED");
        let op = id("system:serviceaccount:mlplane-system:mlplane");
        assert!(auth.authorize(&op, "Default", Access::Write).await.is_ok());
        // mlplane's own records: runs read their namespace's, only the operator writes.
        assert!(
            auth.authorize_in(&run, "vision", "dataassets", Some("imagenet"), Access::Read)
                .await
                .is_ok()
        );
        let e = auth
            .authorize_in(&run, "nlp", "pipelines", None, Access::Read)
            .await
            .unwrap_err();
        assert_eq!(e.code, "PERMISSION_DENIED");
        assert!(auth.require_operator(&op).is_ok());
        assert_eq!(auth.require_operator(&run).unwrap_err().code, "PERMISSION_DENIED");
        let e = auth.authorize(&run, "Default", Access::Read).await.unwrap_err();
        assert_eq!(e.status, axum::http::StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn disabled_allows_everything_without_a_token() {
        let auth = Auth::new(AuthMode::Disabled, None);
        let who = auth.authenticate(&HeaderMap::new()).await.unwrap();
        assert_eq!(who, Identity::anonymous());
        assert!(auth.authorize(&who, "Default", Access::Write).await.is_ok());
        assert!(auth.require_operator(&who).is_ok());
    }

    #[tokio::test]
    async fn a_missing_token_is_unauthenticated() {
        let auth = Auth::new(
            AuthMode::Kubernetes {
                operator_user: "op".into(),
            },
            None,
        );
        let e = auth.authenticate(&HeaderMap::new()).await.unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (401, "UNAUTHENTICATED"));
    }
}
