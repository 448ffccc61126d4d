//! Support library for mlplane's integration tests against the local control
//! plane (`make cluster`): a client from the cluster's kubeconfig, a fresh
//! namespace per test, clients acting as ServiceAccounts, YAML apply, and
//! wait helpers whose timeout errors report what was last seen.
//!
//! It owns no cluster lifecycle: the control plane is started by
//! `tests/cluster/up.sh` (or `.ci/run`) before the tests run.

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{ApiCapabilities, ApiResource, Discovery, Scope};
use kube::runtime::watcher;
use kube::{Client, Config, Resource, ResourceExt};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Field manager used by test fixtures applied with server-side apply.
pub const FIELD_MANAGER: &str = "mlplane-tests";
/// Label put on every namespace a test creates, so leftovers can be found.
pub const TEST_NAMESPACE_LABEL: &str = "mlplane.io/test";

/// The repository root (this crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The kubeconfig of the local cluster: `$KUBECONFIG` if set, else `.cluster/kubeconfig`.
pub fn kubeconfig_path() -> PathBuf {
    match std::env::var_os("KUBECONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root().join(".cluster/kubeconfig"),
    }
}

/// Directory of the upstream binaries built by `tests/cluster/build.sh`.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("MLPLANE_BIN_CACHE") {
        Some(p) => PathBuf::from(p).join("current"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/mlplane/bin/current"),
    }
}

/// Path of a binary built by `tests/cluster/build.sh` (kubectl, helm, ...).
pub fn tool(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// The admin kube Config of the local cluster.
pub async fn admin_config() -> Result<Config> {
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path)
        .with_context(|| format!("reading kubeconfig {} (is the local cluster up? run `make cluster`)", path.display()))?;
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.read_timeout = Some(Duration::from_secs(60));
    Ok(config)
}

/// A client with the admin (system:masters) credentials of the local cluster.
pub async fn admin_client() -> Result<Client> {
    Ok(Client::try_from(admin_config().await?)?)
}

/// A client that authenticates as `system:serviceaccount:<namespace>:<name>`
/// with a fresh TokenRequest token and nothing else (no client certificate).
pub async fn service_account_client(admin: &Client, namespace: &str, name: &str) -> Result<Client> {
    let token = service_account_token(admin, namespace, name, 3600).await?;
    token_client(&token).await
}

/// A bound token for a ServiceAccount (TokenRequest API).
pub async fn service_account_token(admin: &Client, namespace: &str, name: &str, seconds: i64) -> Result<String> {
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(seconds),
            ..Default::default()
        }),
        ..Default::default()
    };
    let resp = sas
        .create_token_request(name, &PostParams::default(), &req)
        .await
        .with_context(|| format!("TokenRequest for {namespace}/{name}"))?;
    resp.status
        .and_then(|s| s.token)
        .context("TokenRequest returned no token")
}

/// A client that authenticates with the given bearer token only.
pub async fn token_client(token: &str) -> Result<Client> {
    let mut config = admin_config().await?;
    config.auth_info = kube::config::AuthInfo {
        token: Some(token.to_string().into()),
        ..Default::default()
    };
    Ok(Client::try_from(config)?)
}

/// A namespace created for one test, deleted (without waiting) when dropped
/// unless `MLPLANE_KEEP_NAMESPACES` is set, to look at what a failed test left.
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
}

impl TestNamespace {
    /// Creates `<prefix>-<random suffix>`, labelled `mlplane.io/test=true`.
    pub async fn create(client: &Client, prefix: &str) -> Result<Self> {
        let name = format!("{prefix}-{}", random_suffix());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([(TEST_NAMESPACE_LABEL.to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(Self {
            name,
            client: client.clone(),
        })
    }

    /// A typed Api in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var_os("MLPLANE_KEEP_NAMESPACES").is_some() {
            eprintln!("keeping namespace {}", self.name);
            return;
        }
        // Drop cannot await and the test's runtime may be shutting down, so the
        // delete runs on its own thread with its own runtime and client.
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    if let Ok(client) = admin_client().await {
                        let _ = Api::<Namespace>::all(client).delete(&name, &DeleteParams::background()).await;
                    }
                });
            }
        })
        .join();
    }
}

/// A short random lowercase suffix for unique names.
pub fn random_suffix() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    let v = h.finish();
    (0..6)
        .map(|i| {
            let d = ((v >> (i * 5)) & 31) as u8;
            (if d < 26 { b'a' + d } else { b'0' + (d - 26) }) as char
        })
        .collect()
}

/// Waits until `cond` holds for the named object, watching it. On timeout the
/// error names what was awaited and shows the object as last seen (or that it
/// was never seen).
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&K) -> bool,
) -> Result<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + serde::Serialize + Send + 'static,
{
    let mut last: Option<K> = None;
    let mut stream = std::pin::pin!(watcher::watch_object(api.clone(), name));
    let res = tokio::time::timeout(timeout, async {
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Some(obj)) => {
                    if cond(&obj) {
                        return Ok(obj);
                    }
                    last = Some(obj);
                }
                Ok(None) => last = None,
                Err(e) => tracing_free_log(&format!("watch error while waiting for {what}: {e}")),
            }
        }
        Err(anyhow!("watch ended"))
    })
    .await;
    match res {
        Ok(r) => r,
        Err(_) => {
            let seen = match &last {
                Some(o) => serde_json::to_string_pretty(o).unwrap_or_else(|_| format!("{o:?}")),
                None => "nothing (object never seen)".to_string(),
            };
            bail!("timed out after {timeout:?} waiting for {what} ({name}); last seen:\n{seen}")
        }
    }
}

/// Waits until the named object no longer exists.
pub async fn wait_deleted<K>(api: &Api<K>, name: &str, timeout: Duration) -> Result<()>
where
    K: Resource + Clone + Debug + DeserializeOwned + serde::Serialize + Send + 'static,
{
    let mut last: Option<K> = None;
    let mut stream = std::pin::pin!(watcher::watch_object(api.clone(), name));
    let res = tokio::time::timeout(timeout, async {
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(None) => return Ok(()),
                Ok(Some(o)) => last = Some(o),
                Err(e) => tracing_free_log(&format!("watch error while waiting for deletion of {name}: {e}")),
            }
        }
        Err(anyhow!("watch ended"))
    })
    .await;
    match res {
        Ok(r) => r,
        Err(_) => bail!(
            "timed out after {timeout:?} waiting for {name} to be deleted; last seen:\n{}",
            last.map(|o| serde_json::to_string_pretty(&o).unwrap_or_default()).unwrap_or_default()
        ),
    }
}

/// Polls `f` until it returns `Some`, reporting the last `Err`/state on timeout.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_err = String::from("condition never held");
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = format!("{e:#}"),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last_err}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn tracing_free_log(msg: &str) {
    eprintln!("[mlplane-test-support] {msg}");
}

/// Applies every document of a YAML stream with server-side apply (force),
/// resolving kinds through discovery. Namespaced objects without a namespace
/// go to `default_ns`. Returns the applied objects.
pub async fn apply_yaml(client: &Client, yaml: &str, default_ns: Option<&str>) -> Result<Vec<DynamicObject>> {
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut out = vec![];
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_yaml::from_value(value)?;
        out.push(apply_dynamic(client, &discovery, obj, default_ns).await?);
    }
    Ok(out)
}

/// Resolves the Api of a dynamic object through discovery.
pub fn dynamic_api(
    client: &Client,
    discovery: &Discovery,
    obj: &DynamicObject,
    default_ns: Option<&str>,
) -> Result<(Api<DynamicObject>, ApiResource, ApiCapabilities)> {
    let tm = obj.types.as_ref().context("object has no apiVersion/kind")?;
    let gvk = kube::core::GroupVersionKind::try_from(tm)?;
    let (ar, caps) = discovery
        .resolve_gvk(&gvk)
        .with_context(|| format!("kind {gvk:?} is not served by the API server"))?;
    let api = match caps.scope {
        Scope::Cluster => Api::all_with(client.clone(), &ar),
        Scope::Namespaced => {
            let ns = obj.namespace().or(default_ns.map(str::to_string)).unwrap_or_else(|| "default".into());
            Api::namespaced_with(client.clone(), &ns, &ar)
        }
    };
    Ok((api, ar, caps))
}

async fn apply_dynamic(
    client: &Client,
    discovery: &Discovery,
    obj: DynamicObject,
    default_ns: Option<&str>,
) -> Result<DynamicObject> {
    let (api, _, _) = dynamic_api(client, discovery, &obj, default_ns)?;
    let name = obj.name_any();
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&name, &pp, &Patch::Apply(&obj))
        .await
        .with_context(|| format!("applying {name}"))
}

/// Runs the kubectl built by `tests/cluster/build.sh` against the local cluster
/// and returns its stdout; fails with stderr when it exits non-zero.
pub fn kubectl(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(tool("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig_path())
        .args(args)
        .output()
        .context("running kubectl (run tests/cluster/build.sh first)")?;
    if !out.status.success() {
        bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Lists objects of a kind in a namespace and returns them (convenience for assertions).
pub async fn list<K>(api: &Api<K>, labels: Option<&str>) -> Result<Vec<K>>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    let mut lp = kube::api::ListParams::default();
    if let Some(l) = labels {
        lp = lp.labels(l);
    }
    Ok(api.list(&lp).await?.items)
}

/// Streams events of the namespace until `pred` matches one, for asserting on
/// recorded events (reason and involved object).
pub async fn wait_for_event(
    client: &Client,
    namespace: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&k8s_openapi::api::core::v1::Event) -> bool,
) -> Result<k8s_openapi::api::core::v1::Event> {
    let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), namespace);
    eventually(timeout, what, || async {
        let evs = api.list(&Default::default()).await?;
        Ok(evs.items.into_iter().find(|e| pred(e)))
    })
    .await
}
