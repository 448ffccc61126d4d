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

/// Selects ring as the process-wide rustls provider (both ring and aws-lc-rs
/// are linked, so rustls cannot pick one by itself).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The admin kube Config of the local cluster.
pub async fn admin_config() -> Result<Config> {
    install_crypto_provider();
    let path = kubeconfig_path();
    let kubeconfig = Kubeconfig::read_from(&path).with_context(|| {
        format!(
            "reading kubeconfig {} (is the local cluster up? run `make cluster`)",
            path.display()
        )
    })?;
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    config.read_timeout = Some(Duration::from_secs(60));
    Ok(config)
}

/// A client with the admin (system:masters) credentials of the local cluster.
pub async fn admin_client() -> Result<Client> {
    Ok(Client::try_from(admin_config().await?)?)
}

/// A benchmark's start: the admin client of the local cluster, with the
/// chart installed (its CRDs, ServiceAccount and RBAC).
pub async fn bench_cluster() -> Result<Client> {
    let admin = admin_client()
        .await
        .context("the local cluster must be up (make cluster)")?;
    install_chart()?;
    Ok(admin)
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
                        let _ = Api::<Namespace>::all(client)
                            .delete(&name, &DeleteParams::background())
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

impl TestNamespace {
    /// Deletes the namespace and waits until it is gone (its objects with
    /// it), so that what comes next starts on a control plane that is done
    /// with them. Benchmarks run their baseline and their measured run this
    /// way, from the same quiet cluster.
    pub async fn delete_and_wait(self, client: &Client, timeout: Duration) -> Result<f64> {
        let start = std::time::Instant::now();
        let api = Api::<Namespace>::all(client.clone());
        let name = self.name.clone();
        // Dropping deletes it.
        drop(self);
        wait_deleted(&api, &name, timeout).await?;
        Ok(start.elapsed().as_secs_f64())
    }
}

/// The environment variable `name` parsed, or `default` when unset or not
/// a `T` (benchmarks' size and duration overrides).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// A short random lowercase suffix for unique names.
pub fn random_suffix() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
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
            last.map(|o| serde_json::to_string_pretty(&o).unwrap_or_default())
                .unwrap_or_default()
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
            let ns = obj
                .namespace()
                .or(default_ns.map(str::to_string))
                .unwrap_or_else(|| "default".into());
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
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
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

// ---------------------------------------------------------------------------
// The operator under test: installed by the chart, run out of cluster with
// exactly the chart's RBAC (a TokenRequest token of its ServiceAccount).
// ---------------------------------------------------------------------------

/// Namespace and release name of the chart install the tests use.
pub const OPERATOR_NAMESPACE: &str = "mlplane-system";
pub const RELEASE: &str = "mlplane";
/// The chart's ServiceAccount the operator authenticates as.
pub const OPERATOR_SERVICE_ACCOUNT: &str = "mlplane";

/// Runs a command to completion, failing with its output when it fails.
pub fn run_cmd(cmd: &mut std::process::Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies the generated CRDs (server-side), once per test process. Helm
/// never upgrades a chart's CRDs, so tests apply them from crds/ first.
pub fn install_crds() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| apply_crds(&repo_root().join("crds")).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Applies the CRDs in `dir` (server-side) and waits until they are established.
pub fn apply_crds(dir: &Path) -> Result<()> {
    let dir = dir.to_string_lossy();
    kubectl(&["apply", "--server-side", "--force-conflicts", "-f", &dir])?;
    kubectl(&["wait", "--for=condition=Established", "--timeout=60s", "-f", &dir])?;
    Ok(())
}

/// Installs (or upgrades) the Helm chart into the local cluster, once per
/// test process, after the CRDs.
pub fn install_chart() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        install_crds().map_err(|e| format!("{e:#}"))?;
        run_cmd(
            std::process::Command::new(tool("helm"))
                .env("KUBECONFIG", kubeconfig_path())
                .args(["upgrade", "--install", RELEASE])
                .arg(repo_root().join("charts/mlplane"))
                // The tracking server is on so its ServiceAccount and RBAC exist
                // for the tests that run it out of cluster. No --wait: its PVC
                // has no provisioner in the local cluster; tests wait for what
                // they use.
                .args(["--namespace", OPERATOR_NAMESPACE, "--create-namespace"])
                .args(["--set", "tracking.enabled=true"]),
        )
        .map(|_| ())
        .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Writes a kubeconfig that authenticates only with a fresh TokenRequest
/// token of the chart's operator ServiceAccount, and returns its path.
pub async fn operator_kubeconfig(admin: &Client) -> Result<PathBuf> {
    service_account_kubeconfig(admin, OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT).await
}

/// Writes a kubeconfig that authenticates only with a fresh TokenRequest
/// token of `namespace/name`, and returns its path.
pub async fn service_account_kubeconfig(admin: &Client, namespace: &str, name: &str) -> Result<PathBuf> {
    let token = service_account_token(admin, namespace, name, 24 * 3600).await?;
    let admin_kc = Kubeconfig::read_from(kubeconfig_path())?;
    let cluster = admin_kc
        .clusters
        .first()
        .and_then(|c| c.cluster.clone())
        .context("admin kubeconfig has no cluster")?;
    let kc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": name, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": name}}],
        "current-context": "sa",
    });
    let path = repo_root().join(format!(".cluster/kubeconfig-{namespace}-{name}-{}", random_suffix()));
    std::fs::write(&path, serde_yaml::to_string(&kc)?)?;
    Ok(path)
}

/// Path of the operator binary: `$MLPLANE_BIN`, else target/debug/mlplane
/// (`cargo build -p mlplane` makes it; `make test` does).
pub fn operator_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MLPLANE_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("debug/mlplane")
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// CPU seconds (user and system) and peak RSS (KiB) of process `pid`, from
/// `/proc` (zeros if it is gone).
pub fn proc_stat(pid: u32) -> (f64, u64) {
    let ticks = 100.0; // CLK_TCK on Linux
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let cpu = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (cpu / ticks, hwm_kib)
}

/// An operator process. It is killed when this handle drops, and also when
/// the test process exits (PR_SET_PDEATHSIG), so none outlives its tests.
pub struct Operator {
    pub child: std::process::Child,
    pub metrics_port: u16,
    pub identity: String,
    log: PathBuf,
}

impl Operator {
    /// Starts `mlplane run` as the chart's ServiceAccount with `extra` flags.
    pub async fn start(admin: &Client, extra: &[&str]) -> Result<Self> {
        install_chart()?;
        let bin = operator_binary();
        if !bin.exists() {
            bail!(
                "{} not found: run `cargo build -p mlplane` (make test does)",
                bin.display()
            );
        }
        let kubeconfig = operator_kubeconfig(admin).await?;
        let port = free_port();
        let identity = format!("test-operator-{}", random_suffix());
        let log = repo_root().join(format!(".cluster/{identity}.log"));
        let mut cmd = std::process::Command::new(bin);
        cmd.env("KUBECONFIG", &kubeconfig)
            .args(["run", "--namespace", OPERATOR_NAMESPACE, "--identity", &identity])
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{port}"))
            .args(extra);
        let child = spawn_logged(cmd, &log)?;
        let op = Self {
            child,
            metrics_port: port,
            identity,
            log,
        };
        eventually(Duration::from_secs(30), "operator /healthz", || async {
            Ok(op.get("/healthz").ok().filter(|b| b.contains("ok")))
        })
        .await
        .map_err(|e| anyhow!("{e:#}\noperator log:\n{}", op.log_tail()))?;
        Ok(op)
    }

    /// GETs a path of the operator's HTTP endpoint (fails unless 200).
    pub fn get(&self, path: &str) -> Result<String> {
        let (code, body) = http_get(&format!("http://127.0.0.1:{}{path}", self.metrics_port))?;
        if code != 200 {
            bail!("GET {path}: HTTP {code}");
        }
        Ok(body)
    }

    /// Sum of a metric's samples whose labels contain every `labels` pair.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(sum_metric(&self.get("/metrics")?, name, labels))
    }

    /// Write requests sent by this operator so far, Lease renewals excluded.
    pub fn writes_excluding_leases(&self) -> Result<f64> {
        let text = self.get("/metrics")?;
        let mut n = 0.0;
        for verb in ["create", "update", "patch", "delete", "deletecollection"] {
            n += sum_metric(&text, "mlplane_kube_api_requests_total", &[("verb", verb)]);
            n -= sum_metric(
                &text,
                "mlplane_kube_api_requests_total",
                &[("verb", verb), ("resource", "leases")],
            );
        }
        Ok(n)
    }

    /// The operator's API requests as "verb resource: count", largest
    /// first (Lease renewals aside), at most `top` of them.
    pub fn requests_by_resource(&self, top: usize) -> Result<String> {
        let text = self.get("/metrics")?;
        let mut by_resource: Vec<(String, f64)> = text
            .lines()
            .filter(|l| l.starts_with("mlplane_kube_api_requests_total{"))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let label = |k: &str| {
                    series
                        .split(&format!("{k}=\""))
                        .nth(1)
                        .and_then(|r| r.split('"').next())
                        .unwrap_or_default()
                        .to_string()
                };
                Some((format!("{} {}", label("verb"), label("resource")), value.parse().ok()?))
            })
            .filter(|(k, _)| !k.ends_with(" leases"))
            .collect();
        by_resource.sort_by(|a, b| b.1.total_cmp(&a.1));
        let top: Vec<String> = by_resource.iter().take(top).map(|(k, v)| format!("{k}: {v}")).collect();
        Ok(top.join(", "))
    }

    /// Whether this replica reports holding the leader Lease.
    pub fn is_leader(&self) -> bool {
        self.metric("mlplane_leader", &[]).map(|v| v == 1.0).unwrap_or(false)
    }

    /// The last lines of the operator's log.
    pub fn log_tail(&self) -> String {
        tail(&self.log)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a graceful exit; returns the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        // SAFETY: sending a signal to our own child process.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        Ok(self.child.wait()?)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Spawns `cmd` with stdout and stderr to `log` and RUST_LOG from
/// MLPLANE_TEST_LOG, killed (PR_SET_PDEATHSIG) when the test process exits.
pub fn spawn_logged(mut cmd: std::process::Command, log: &Path) -> Result<std::process::Child> {
    let logfile = std::fs::File::create(log)?;
    cmd.env(
        "RUST_LOG",
        std::env::var("MLPLANE_TEST_LOG").unwrap_or_else(|_| "info,mlplane=debug".into()),
    )
    .stdout(logfile.try_clone()?)
    .stderr(logfile);
    // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    // The parent "thread" of PR_SET_PDEATHSIG is the spawning thread: spawn
    // from a thread that lives as long as the process.
    spawner().spawn(cmd)
}

/// The last 40 lines of a log file.
pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A `mlplane tracking` server process, killed when dropped.
pub struct TrackingServer {
    pub child: std::process::Child,
    pub port: u16,
    pub log: PathBuf,
}

impl TrackingServer {
    /// Starts `mlplane tracking` on a free port with `database_url` and
    /// `artifact_root`. `kubeconfig`: Some to turn authentication on (the
    /// server then authenticates callers with TokenReview as that identity).
    pub async fn start(database_url: &str, artifact_root: &Path, kubeconfig: Option<&Path>) -> Result<Self> {
        let bin = operator_binary();
        if !bin.exists() {
            bail!(
                "{} not found: run `cargo build -p mlplane` (make test does)",
                bin.display()
            );
        }
        let port = free_port();
        let log = repo_root().join(format!(".cluster/tracking-{port}.log"));
        std::fs::create_dir_all(repo_root().join(".cluster"))?;
        let mut cmd = std::process::Command::new(bin);
        cmd.args([
            "tracking",
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--database-url",
            database_url,
        ])
        .arg("--artifact-root")
        .arg(artifact_root);
        match kubeconfig {
            Some(kc) => {
                cmd.env("KUBECONFIG", kc)
                    .args(["--auth=true", "--operator-user"])
                    .arg(format!(
                        "system:serviceaccount:{OPERATOR_NAMESPACE}:{OPERATOR_SERVICE_ACCOUNT}"
                    ));
            }
            None => {
                cmd.arg("--auth=false");
            }
        }
        let child = spawn_logged(cmd, &log)?;
        let server = Self { child, port, log };
        let url = format!("{}/health", server.url());
        eventually(Duration::from_secs(30), "tracking server /health", || {
            let url = url.clone();
            async move { Ok(http_get(&url).ok().filter(|(code, _)| *code == 200)) }
        })
        .await
        .map_err(|e| anyhow!("{e:#}\ntracking log:\n{}", tail(&server.log)))?;
        Ok(server)
    }

    /// Base URL, e.g. `http://127.0.0.1:5000`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TrackingServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal blocking HTTP/1.0 GET of `http://host:port/path`: (status, body).
pub fn http_get(url: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").context("http:// URL")?;
    let (hostport, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let mut s = std::net::TcpStream::connect(hostport)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("HTTP status")?;
    Ok((code, body.to_string()))
}

/// Sums the samples of metric `name` (Prometheus text) whose labels include `labels`.
pub fn sum_metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, label_str) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| label_str.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A thread that lives for the whole test process and spawns children for it.
struct Spawner(
    std::sync::Mutex<
        std::sync::mpsc::Sender<(
            std::process::Command,
            std::sync::mpsc::Sender<std::io::Result<std::process::Child>>,
        )>,
    >,
);

impl Spawner {
    fn spawn(&self, cmd: std::process::Command) -> Result<std::process::Child> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.0.lock().expect("spawner lock").send((cmd, tx))?;
        Ok(rx.recv()??)
    }
}

fn spawner() -> &'static Spawner {
    static S: std::sync::OnceLock<Spawner> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<(std::process::Command, std::sync::mpsc::Sender<_>)>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        });
        Spawner(std::sync::Mutex::new(tx))
    })
}

/// Write requests by `user` recorded in the API server's audit log after
/// `since`, by "verb resource", Lease writes excluded. The audit policy of the
/// local cluster logs every write at Metadata level.
pub fn audited_writes(user: &str, since: k8s_openapi::jiff::Timestamp) -> Result<Vec<String>> {
    audit_log_writes(user, None, since)
}

fn audit_log_writes(user: &str, namespace: Option<&str>, since: k8s_openapi::jiff::Timestamp) -> Result<Vec<String>> {
    let path = repo_root().join(".cluster/kwok/clusters/mlplane/logs/audit.log");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = vec![];
    for line in text.lines() {
        let Ok(ev) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if ev["user"]["username"] != user || ev["stage"] != "ResponseComplete" {
            continue;
        }
        if namespace.is_some_and(|ns| ev["objectRef"]["namespace"] != ns) {
            continue;
        }
        let ts: k8s_openapi::jiff::Timestamp = match ev["requestReceivedTimestamp"].as_str().map(str::parse) {
            Some(Ok(t)) => t,
            _ => continue,
        };
        let resource = ev["objectRef"]["resource"].as_str().unwrap_or("");
        if ts > since && resource != "leases" {
            let sub = ev["objectRef"]["subresource"]
                .as_str()
                .map(|s| format!("/{s}"))
                .unwrap_or_default();
            out.push(format!(
                "{} {resource}{sub} {}",
                ev["verb"].as_str().unwrap_or(""),
                ev["objectRef"]["name"].as_str().unwrap_or("")
            ));
        }
    }
    Ok(out)
}

/// The operator shared by the tests of one test binary: started on first use
/// as the chart's ServiceAccount, killed when the test process exits.
pub fn shared_operator() -> &'static Operator {
    static OP: std::sync::OnceLock<Operator> = std::sync::OnceLock::new();
    OP.get_or_init(|| {
        std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let admin = admin_client().await?;
                Operator::start(&admin, &[]).await
            })
        })
        .join()
        .expect("operator start thread")
        .expect("the operator starts")
    })
}

/// A client that impersonates `user` (and `groups`) through the admin
/// credentials, for testing what RBAC grants a person.
pub async fn user_client(user: &str, groups: &[&str]) -> Result<Client> {
    let mut config = admin_config().await?;
    config.auth_info.impersonate = Some(user.to_string());
    if !groups.is_empty() {
        config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
    }
    Ok(Client::try_from(config)?)
}

/// Status of a `Ready`-style condition in a JSON status.
pub fn condition<'a>(status: &'a serde_json::Value, ty: &str) -> Option<&'a serde_json::Value> {
    status["conditions"].as_array()?.iter().find(|c| c["type"] == ty)
}

/// The API error code of a failed request (0 for non-API errors).
pub fn api_code<T>(r: &std::result::Result<T, kube::Error>) -> u16 {
    match r {
        Err(kube::Error::Api(s)) => s.code,
        _ => 0,
    }
}

/// A minimal MLflow REST client for tests (plays the training script or a
/// user): `POST`/`GET` `/api/2.0/mlflow/<endpoint>` with a bearer token.
#[derive(Clone, Debug)]
pub struct Mlflow {
    pub base: String,
    http: reqwest::Client,
}

impl Mlflow {
    /// `base` is the server's root URL, e.g. `http://127.0.0.1:5000`.
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("HTTP client"),
        }
    }

    /// POSTs `body` to `endpoint`; fails unless 200.
    pub async fn post(&self, token: &str, endpoint: &str, body: serde_json::Value) -> Result<serde_json::Value> {
        let resp = self
            .http
            .post(format!("{}/api/2.0/mlflow/{endpoint}", self.base))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await?;
        let code = resp.status().as_u16();
        let v: serde_json::Value = resp.json().await.unwrap_or_default();
        if code != 200 {
            bail!("POST {endpoint}: HTTP {code}: {v}");
        }
        Ok(v)
    }

    /// GETs `endpoint` with `query`; fails unless 200.
    pub async fn get(&self, token: &str, endpoint: &str, query: &[(&str, &str)]) -> Result<serde_json::Value> {
        let resp = self
            .http
            .get(format!("{}/api/2.0/mlflow/{endpoint}", self.base))
            .bearer_auth(token)
            .query(query)
            .send()
            .await?;
        let code = resp.status().as_u16();
        let v: serde_json::Value = resp.json().await.unwrap_or_default();
        if code != 200 {
            bail!("GET {endpoint}: HTTP {code}: {v}");
        }
        Ok(v)
    }

    /// Logs `value` of metric `key` at `step` to a run.
    pub async fn log_metric(&self, token: &str, run_id: &str, key: &str, value: f64, step: i64) -> Result<()> {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as i64;
        self.post(
            token,
            "runs/log-metric",
            serde_json::json!({"run_id": run_id, "key": key, "value": value, "timestamp": ts, "step": step}),
        )
        .await
        .map(|_| ())
    }
}

/// Whether a Workspace reports Ready=True for its current generation.
pub fn workspace_ready(ws: &mlplane::api::Workspace) -> bool {
    ws.status
        .as_ref()
        .is_some_and(|s| mlplane::api::is_ready(&s.conditions) && s.observed_generation == ws.metadata.generation)
}

/// Creates the Workspace `name` with `spec` and waits until it is Ready.
pub async fn create_ready_workspace(
    client: &Client,
    name: &str,
    spec: serde_json::Value,
) -> Result<mlplane::api::Workspace> {
    let api: Api<mlplane::api::Workspace> = Api::all(client.clone());
    let ws: mlplane::api::Workspace = serde_json::from_value(serde_json::json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "Workspace", "metadata": {"name": name}, "spec": spec,
    }))?;
    api.create(&PostParams::default(), &ws).await?;
    wait_for(&api, name, Duration::from_secs(60), "Workspace Ready", workspace_ready).await
}

/// The directory of the pinned Cluster API CRDs (MachineDeployment and
/// Machine from the published sigs.k8s.io/cluster-api module), fetched once
/// into the cache by `tests/cluster/cluster-api-crds.sh`.
pub fn cluster_api_crds() -> Result<PathBuf> {
    let out = run_cmd(&mut std::process::Command::new(
        repo_root().join("tests/cluster/cluster-api-crds.sh"),
    ))?;
    Ok(PathBuf::from(out.trim()))
}

/// Peak resident set size (VmHWM) of a process, in KiB (0 if unknown).
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Object stores for the DataAsset and Pipeline tests: a real S3-compatible
// server (MinIO, built by tests/cluster/build.sh, run by hack/minio.sh) and a
// plain HTTP file server (Python's http.server).
// ---------------------------------------------------------------------------

/// Access key of the test MinIO servers (hack/minio.sh's default).
pub const S3_ACCESS_KEY: &str = "mlplane-test";
/// Secret key of the test MinIO servers (hack/minio.sh's default).
pub const S3_SECRET_KEY: &str = "mlplane-test-secret";

/// A MinIO server on 127.0.0.1 with its data in a directory of its own,
/// removed when dropped. `stop` and `resume` (same port, same data) play an
/// outage.
pub struct S3Server {
    pub dir: PathBuf,
    pub endpoint: String,
    pub port: u16,
    /// Keep the data directory when dropped (only stop the server).
    keep: bool,
}

impl S3Server {
    /// Starts a server with the given buckets.
    pub fn start(buckets: &[&str]) -> Result<Self> {
        Self::start_at(
            repo_root().join(format!(".cluster/minio-{}", random_suffix())),
            buckets,
            false,
        )
    }

    /// Starts a server on the data in `dir` (created if missing), kept after
    /// the server stops when `keep` (e.g. a benchmark's seeded objects).
    pub fn start_at(dir: PathBuf, buckets: &[&str], keep: bool) -> Result<Self> {
        let mut cmd = std::process::Command::new(repo_root().join("hack/minio.sh"));
        cmd.arg("start").arg(&dir).arg("").args(buckets);
        let endpoint = run_cmd(&mut cmd)?.trim().to_string();
        let port = endpoint
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .context("minio port")?;
        Ok(Self {
            dir,
            endpoint,
            port,
            keep,
        })
    }

    /// Stops the server (data kept).
    pub fn stop(&self) -> Result<()> {
        run_cmd(
            std::process::Command::new(repo_root().join("hack/minio.sh"))
                .arg("stop")
                .arg(&self.dir),
        )?;
        Ok(())
    }

    /// Starts it again on the same port with the same data.
    pub fn resume(&self) -> Result<()> {
        run_cmd(
            std::process::Command::new(repo_root().join("hack/minio.sh"))
                .arg("start")
                .arg(&self.dir)
                .arg(self.port.to_string()),
        )?;
        Ok(())
    }

    /// The keys of a Secret (and of a process environment) that reach this
    /// server, with `secret_key` as the secret access key.
    pub fn credentials(&self, secret_key: &str) -> std::collections::BTreeMap<String, String> {
        std::collections::BTreeMap::from([
            ("AWS_ACCESS_KEY_ID".to_string(), S3_ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY".to_string(), secret_key.to_string()),
            ("AWS_ENDPOINT_URL".to_string(), self.endpoint.clone()),
            ("AWS_REGION".to_string(), "us-east-1".to_string()),
        ])
    }

    /// A store of `uri` (`s3://bucket/prefix`) on this server, as the root user.
    pub fn open(&self, uri: &str) -> Result<mlplane::storage::Location> {
        let creds = mlplane::storage::Credentials::from_pairs(self.credentials(S3_SECRET_KEY), "test");
        Ok(mlplane::storage::open(uri, &creds)?)
    }

    /// Writes `body` as `key` under `uri` (`s3://bucket/prefix/`).
    pub async fn put(&self, uri: &str, key: &str, body: &[u8]) -> Result<()> {
        use object_store::ObjectStoreExt;
        let loc = self.open(uri)?;
        let path = key.split('/').fold(loc.prefix.clone(), |p, s| p.join(s));
        loc.store
            .put(&path, object_store::PutPayload::from(body.to_vec()))
            .await
            .with_context(|| format!("putting {key} under {uri}"))?;
        Ok(())
    }

    /// A Secret named `name` with this server's credentials.
    pub fn secret(&self, name: &str, secret_key: &str) -> k8s_openapi::api::core::v1::Secret {
        k8s_openapi::api::core::v1::Secret {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            string_data: Some(self.credentials(secret_key)),
            ..Default::default()
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = std::process::Command::new(repo_root().join("hack/minio.sh"))
            .arg(if self.keep { "stop" } else { "remove" })
            .arg(&self.dir)
            .output();
    }
}

/// Python's `http.server` serving a directory on 127.0.0.1, killed when dropped.
pub struct HttpFileServer {
    pub child: std::process::Child,
    pub dir: PathBuf,
    pub port: u16,
}

impl HttpFileServer {
    /// Serves a fresh directory.
    pub async fn start() -> Result<Self> {
        let dir = repo_root().join(format!(".cluster/http-{}", random_suffix()));
        std::fs::create_dir_all(&dir)?;
        let port = free_port();
        let mut cmd = std::process::Command::new("python3");
        cmd.args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
            "--directory",
        ])
        .arg(&dir);
        let child = spawn_logged(cmd, &dir.with_extension("log"))?;
        let server = Self { child, dir, port };
        eventually(Duration::from_secs(30), "http.server up", || async {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()))
        })
        .await?;
        Ok(server)
    }

    /// URL of a file in the served directory.
    pub fn url(&self, file: &str) -> String {
        format!("http://127.0.0.1:{}/{file}", self.port)
    }
}

impl Drop for HttpFileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(self.dir.with_extension("log"));
    }
}

/// Installs the Gateway API CRDs (standard channel, at the version pinned in
/// tests/cluster/versions.env, fetched by tests/cluster/gateway-api.sh), once
/// per test process. The cluster is shared by every test binary: they are
/// never uninstalled.
pub fn install_gateway_api_crds() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let dir = run_cmd(&mut std::process::Command::new(
            repo_root().join("tests/cluster/gateway-api.sh"),
        ))
        .map_err(|e| format!("{e:#}"))?;
        let dir = dir.trim();
        kubectl(&["apply", "--server-side", "--force-conflicts", "-f", dir])
            .and_then(|_| kubectl(&["wait", "--for=condition=Established", "--timeout=60s", "-f", dir]))
            .map(|_| ())
            .map_err(|e| format!("{e:#}"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// A tracking server with authentication on, itself authenticating as the
/// chart's `mlplane-tracking` ServiceAccount, with a fresh SQLite database
/// and artifact directory under .cluster/ (`prefix` names them).
pub async fn authenticated_tracking_server(admin: &Client, prefix: &str) -> Result<TrackingServer> {
    install_chart()?;
    let kc = service_account_kubeconfig(admin, OPERATOR_NAMESPACE, "mlplane-tracking").await?;
    let dir = repo_root().join(format!(".cluster/{prefix}-tracking-{}", random_suffix()));
    std::fs::create_dir_all(&dir)?;
    TrackingServer::start(
        &format!("sqlite://{}?mode=rwc", dir.join("t.db").display()),
        &dir.join("artifacts"),
        Some(&kc),
    )
    .await
}

/// The token of a Workspace's run ServiceAccount (`mlplane-run-token`), once
/// Kubernetes has filled it: what run pods send to the tracking server.
pub async fn workspace_run_token(admin: &Client, ns: &str) -> Result<String> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin.clone(), ns);
    let secret = wait_for(
        &secrets,
        "mlplane-run-token",
        Duration::from_secs(30),
        "run token filled",
        |s| s.data.as_ref().is_some_and(|d| d.contains_key("token")),
    )
    .await?;
    Ok(String::from_utf8(secret.data.unwrap_or_default()["token"].0.clone())?)
}

/// Like [`audited_writes`], only of objects in `namespace`.
pub fn audited_writes_in(user: &str, namespace: &str, since: k8s_openapi::jiff::Timestamp) -> Result<Vec<String>> {
    audit_log_writes(user, Some(namespace), since)
}

/// Runs `f` to completion on a runtime of its own, on a thread of its own
/// (for fixtures built once in a `OnceLock`, whatever runtime asked first).
pub fn block_on_thread<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(f)
    })
    .join()
    .map_err(|_| anyhow!("fixture thread panicked"))?
}

/// An operator with a tracking server: the server authenticates callers
/// (as the chart's `mlplane-tracking` ServiceAccount, SQLite in `.cluster/`),
/// the operator runs with `--tracking-url` and a Lease of its own, and
/// `operator_token` reads everything the operator wrote. The operator can be
/// killed and restarted (crash tests).
pub struct TrackedOperator {
    pub tracking: TrackingServer,
    pub operator: std::sync::Mutex<Option<Operator>>,
    pub operator_token: String,
    lease: String,
}

impl TrackedOperator {
    /// Starts both; `name` tells this fixture's files and Lease apart.
    pub async fn start(name: &str) -> Result<Self> {
        let admin = admin_client().await?;
        let tracking = authenticated_tracking_server(&admin, name).await?;
        let lease = format!("mlplane-{name}-test-{}", random_suffix());
        let operator = Self::operator(&admin, &tracking.url(), &lease).await?;
        let operator_token = service_account_token(&admin, OPERATOR_NAMESPACE, OPERATOR_SERVICE_ACCOUNT, 7200).await?;
        Ok(Self {
            tracking,
            operator: std::sync::Mutex::new(Some(operator)),
            operator_token,
            lease,
        })
    }

    async fn operator(admin: &Client, tracking_url: &str, lease: &str) -> Result<Operator> {
        Operator::start(
            admin,
            &[
                "--tracking-url",
                tracking_url,
                "--lease-name",
                lease,
                "--resync-seconds",
                "30",
            ],
        )
        .await
    }

    /// SIGKILLs the operator, as a crash would.
    pub fn kill_operator(&self) {
        let mut op = self.operator.lock().expect("operator lock");
        if let Some(o) = op.as_mut() {
            o.kill();
        }
        *op = None;
    }

    /// Starts the operator again (same tracking server and Lease).
    pub async fn restart_operator(&self) -> Result<()> {
        let admin = admin_client().await?;
        let op = Self::operator(&admin, &self.tracking.url(), &self.lease).await?;
        *self.operator.lock().expect("operator lock") = Some(op);
        Ok(())
    }

    /// Sum of a metric of the running operator (`None` while it restarts).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let op = self.operator.lock().expect("operator lock");
        op.as_ref().and_then(|o| o.metric(name, labels).ok())
    }

    /// A tracking client acting as the operator.
    pub fn tracking_client(&self) -> mlplane::tracking::client::TrackingClient {
        mlplane::tracking::client::TrackingClient::new(
            self.tracking.url(),
            mlplane::tracking::client::Token::Static(self.operator_token.clone()),
        )
    }
}

/// A Workspace deleted (without waiting) when dropped.
pub struct WorkspaceGuard(pub String);

impl Drop for WorkspaceGuard {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "workspace", &self.0, "--wait=false"]);
    }
}

/// A ready Workspace `<prefix>-<suffix>` whose artifact store is
/// `s3://<bucket>/<name>/artifacts` on `s3`, with the Secret `s3` (that
/// server's credentials) in its namespace.
pub async fn s3_workspace(admin: &Client, s3: &S3Server, bucket: &str, prefix: &str) -> Result<WorkspaceGuard> {
    let name = format!("{prefix}-{}", random_suffix());
    create_ready_workspace(
        admin,
        &name,
        serde_json::json!({"deletionPolicy": "Delete",
               "storage": {"artifacts": {"uri": format!("s3://{bucket}/{name}/artifacts"), "secretRef": {"name": "s3"}}}}),
    )
    .await?;
    let guard = WorkspaceGuard(name.clone());
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(admin.clone(), &name)
        .create(&PostParams::default(), &s3.secret("s3", S3_SECRET_KEY))
        .await?;
    Ok(guard)
}
impl Operator {
    /// Waits until this operator's writes (Lease renewals aside) have not
    /// changed for `quiet`, or `max` has passed; returns whether they settled.
    pub async fn wait_writes_settle(&self, quiet: Duration, max: Duration) -> Result<bool> {
        let start = tokio::time::Instant::now();
        let mut last = self.writes_excluding_leases()?;
        let mut stable_since = tokio::time::Instant::now();
        while stable_since.elapsed() < quiet {
            if start.elapsed() > max {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let w = self.writes_excluding_leases()?;
            if w != last {
                last = w;
                stable_since = tokio::time::Instant::now();
            }
        }
        Ok(true)
    }
}

/// The names of the `K` that one watch of `api` (objects with `labels`) has
/// seen, kept up to date by a background task until the handle is aborted.
/// Benchmarks count objects this way instead of polling lists: a list of
/// 1,000 Jobs every 100 ms cost the API server about 5% of its CPU. With
/// an `Api<PartialObjectMeta<K>>` the watch is metadata-only (the serving
/// benchmark's: decoding whole Deployments took its process 0.02-0.12 of a
/// core while the operator ran, CPU its direct half did not compete with).
pub fn watch_names<K>(
    api: Api<K>,
    labels: &str,
) -> (
    std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    tokio::task::JoinHandle<()>,
)
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
{
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let names = seen.clone();
    let cfg = watcher::Config::default().labels(labels);
    let task = tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(api, cfg));
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                    names.lock().expect("names").insert(o.name_any());
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("[mlplane-test-support] watch of {}: {e}", std::any::type_name::<K>());
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    (seen, task)
}

/// Creates `make(0..n)` through `api` with `concurrency` requests in flight;
/// seconds taken. Benchmarks time their baselines and bursts with it.
pub async fn create_all<K>(api: &Api<K>, n: usize, concurrency: usize, make: impl Fn(usize) -> K) -> Result<f64>
where
    K: Resource + Clone + Debug + serde::Serialize + DeserializeOwned,
{
    let start = std::time::Instant::now();
    let results: Vec<Result<K, kube::Error>> = futures::stream::iter((0..n).map(make))
        .map(|obj| {
            let api = api.clone();
            async move { api.create(&PostParams::default(), &obj).await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(start.elapsed().as_secs_f64())
}
