//! The DataAsset controller against the local control plane, a real
//! S3-compatible server (MinIO, hack/minio.sh) and a plain HTTP server
//! (Python's http.server): versions by content, refresh on request, an
//! unreachable source and bad credentials as conditions, manifests kept by
//! the tracking server (on SQLite and on PostgreSQL, with its access rules),
//! `mlplane fetch` copying a pinned version, and Experiment runs pinning
//! `latest`. The operator runs out of cluster with exactly the chart's RBAC.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use mlplane::api::{DataAsset, Experiment};
use mlplane_test_support::*;
use serde_json::{Value, json};

struct Fixture {
    op: TrackedOperator,
    s3: S3Server,
}

/// The operator with tracking and one S3 server with the bucket `datasets`,
/// shared by this binary's tests (each test uses prefixes of its own).
fn fixture() -> &'static Fixture {
    static FIX: OnceLock<Fixture> = OnceLock::new();
    FIX.get_or_init(|| {
        block_on_thread(async {
            let s3 = S3Server::start(&["datasets"])?;
            let op = TrackedOperator::start("data").await?;
            Ok(Fixture { op, s3 })
        })
        .expect("the data asset fixture starts")
    })
}

fn asset(name: &str, spec: Value) -> Result<DataAsset> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "DataAsset",
        "metadata": {"name": name}, "spec": spec,
    }))?)
}

fn status(d: &DataAsset) -> Value {
    serde_json::to_value(&d.status).unwrap_or_default()
}

fn latest(d: &DataAsset) -> Option<String> {
    d.status.as_ref()?.latest_version.clone()
}

fn cond(d: &DataAsset, ty: &str) -> (String, String, String) {
    let s = status(d);
    let c = condition(&s, ty).cloned().unwrap_or_default();
    let f = |k: &str| c[k].as_str().unwrap_or_default().to_string();
    (f("status"), f("reason"), f("message"))
}

async fn wait_asset(api: &Api<DataAsset>, name: &str, what: &str, f: impl Fn(&DataAsset) -> bool) -> Result<DataAsset> {
    wait_for(api, name, Duration::from_secs(90), what, f).await
}

/// Asks for a refresh (`mlplane.io/refresh=<token>`) and waits until it was acted on.
async fn refresh(api: &Api<DataAsset>, name: &str, token: &str) -> Result<DataAsset> {
    annotate(api, name, token).await?;
    wait_asset(api, name, &format!("refresh {token} handled"), |d| {
        d.status.as_ref().and_then(|s| s.last_handled_refresh.as_deref()) == Some(token)
    })
    .await
}

async fn annotate(api: &Api<DataAsset>, name: &str, token: &str) -> Result<()> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"mlplane.io/refresh": token}}})),
    )
    .await?;
    Ok(())
}

async fn events_of(client: &Client, ns: &str, name: &str) -> Result<Vec<k8s_openapi::api::core::v1::Event>> {
    let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    Ok(api
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(name))
        .collect())
}

#[tokio::test]
async fn versions_follow_content_not_refreshes() -> Result<()> {
    let f = fixture();
    let admin = admin_client().await?;
    let ns = TestNamespace::create(&admin, "da-versions").await?;
    let uri = format!("s3://datasets/{}/sales/", ns.name);
    f.s3.put(&uri, "2026/01.csv", b"a,b\n1,2\n").await?;
    f.s3.put(&uri, "2026/02.csv", b"a,b\n3,4\n").await?;
    ns.api::<Secret>()
        .create(&PostParams::default(), &f.s3.secret("s3", S3_SECRET_KEY))
        .await?;
    let api: Api<DataAsset> = ns.api();
    api.create(
        &PostParams::default(),
        &asset(
            "sales",
            json!({"type": "UriFolder", "source": {"uri": uri, "secretRef": {"name": "s3"}}}),
        )?,
    )
    .await?;

    // Objects uploaded: version 1.
    let d = wait_asset(&api, "sales", "version 1", |d| latest(d).as_deref() == Some("1")).await?;
    let s = status(&d);
    assert_eq!(s["versions"].as_array().map(Vec::len), Some(1), "{s}");
    assert_eq!(
        (s["versions"][0]["files"].clone(), s["versions"][0]["bytes"].clone()),
        (json!(2), json!(16))
    );
    let v1_digest = s["versions"][0]["digest"].as_str().context("digest")?.to_string();
    assert!(v1_digest.starts_with("sha256:"), "{s}");
    assert!(
        s["versions"][0]["observedAt"].is_string() && s["lastRefreshTime"].is_string(),
        "{s}"
    );
    assert_eq!(cond(&d, "SourceReachable").0, "True");
    assert_eq!(
        (cond(&d, "Ready").0, cond(&d, "Ready").1),
        ("True".into(), "VersionAvailable".into())
    );
    assert_eq!(s["phase"], "Ready");

    // One object added: a refresh makes version 2.
    f.s3.put(&uri, "2026/03.csv", b"a,b\n5,6\n").await?;
    let d = refresh(&api, "sales", "1").await?;
    assert_eq!(latest(&d).as_deref(), Some("2"), "{}", status(&d));
    let s = status(&d);
    assert_eq!(s["versions"][0]["files"], 3);
    assert_eq!(s["versions"][1]["digest"], v1_digest.as_str(), "newest first");

    // Nothing changed: no new version.
    let d = refresh(&api, "sales", "2").await?;
    assert_eq!(latest(&d).as_deref(), Some("2"));
    assert_eq!(status(&d)["versions"].as_array().map(Vec::len), Some(2));

    // Each version's manifest is kept by the tracking server.
    let client = f.op.tracking_client();
    let (v2, manifest) = client
        .data_version(&ns.name, "sales", "2")
        .await?
        .context("version 2 stored")?;
    assert_eq!(v2.digest, s["versions"][0]["digest"].as_str().unwrap_or_default());
    let keys: Vec<String> = mlplane::storage::manifest::Manifest::parse(&manifest)
        .map_err(anyhow::Error::msg)?
        .entries()
        .iter()
        .map(|e| e.key.clone())
        .collect();
    assert_eq!(keys, ["2026/01.csv", "2026/02.csv", "2026/03.csv"]);

    // Events tell the story (repeats of a reason form one Kubernetes event
    // series); the Secret's values appear nowhere.
    wait_for_event(&admin, &ns.name, Duration::from_secs(30), "VersionCreated", |e| {
        e.reason.as_deref() == Some("VersionCreated") && e.involved_object.name.as_deref() == Some("sales")
    })
    .await?;
    let evs = events_of(&admin, &ns.name, "sales").await?;
    let everything = format!("{s}{evs:?}");
    assert!(!everything.contains(S3_SECRET_KEY), "the secret key leaked");
    let refreshes =
        f.op.metric("mlplane_data_refreshes_total", &[("result", "new_version")]);
    assert!(refreshes.unwrap_or(0.0) >= 2.0, "{refreshes:?}");
    Ok(())
}

#[tokio::test]
async fn an_unreachable_source_is_a_condition_and_versions_are_kept() -> Result<()> {
    let _ = fixture();
    let admin = admin_client().await?;
    let ns = TestNamespace::create(&admin, "da-outage").await?;
    // A server of its own, to stop.
    let s3 = S3Server::start(&["data"])?;
    let uri = "s3://data/set/";
    s3.put(uri, "x.bin", b"0123456789").await?;
    ns.api::<Secret>()
        .create(&PostParams::default(), &s3.secret("s3", S3_SECRET_KEY))
        .await?;
    let api: Api<DataAsset> = ns.api();
    api.create(
        &PostParams::default(),
        &asset(
            "set",
            json!({"type": "UriFolder", "source": {"uri": uri, "secretRef": {"name": "s3"}}}),
        )?,
    )
    .await?;
    wait_asset(&api, "set", "version 1", |d| latest(d).as_deref() == Some("1")).await?;

    s3.stop()?;
    annotate(&api, "set", "outage").await?;
    let d = wait_asset(&api, "set", "SourceReachable=False", |d| {
        cond(d, "SourceReachable").0 == "False"
    })
    .await?;
    let (_, reason, message) = cond(&d, "SourceReachable");
    assert_eq!(reason, "SourceUnreachable", "{message}");
    assert!(message.contains(uri), "{message}");
    assert_eq!(latest(&d).as_deref(), Some("1"), "versions are kept");
    assert_eq!(status(&d)["versions"].as_array().map(Vec::len), Some(1));
    assert_eq!(status(&d)["phase"], "Failed");
    let (ready, ready_reason, ready_message) = cond(&d, "Ready");
    assert_eq!((ready.as_str(), ready_reason.as_str()), ("False", "SourceUnreachable"));
    assert!(ready_message.contains("1 version(s) kept"), "{ready_message}");
    wait_for_event(
        &admin,
        &ns.name,
        Duration::from_secs(30),
        "SourceUnreachable event",
        |e| e.reason.as_deref() == Some("SourceUnreachable") && e.involved_object.name.as_deref() == Some("set"),
    )
    .await?;

    // Back: the next refresh lists it again, same content, same version.
    s3.resume()?;
    let d = refresh(&api, "set", "back").await?;
    assert_eq!(cond(&d, "SourceReachable").0, "True");
    assert_eq!(latest(&d).as_deref(), Some("1"));
    assert_eq!(status(&d)["phase"], "Ready");
    Ok(())
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_clear_conditions() -> Result<()> {
    let f = fixture();
    let admin = admin_client().await?;
    let ns = TestNamespace::create(&admin, "da-creds").await?;
    let uri = format!("s3://datasets/{}/private/", ns.name);
    f.s3.put(&uri, "a.txt", b"private").await?;
    let wrong = "not-the-secret-key-42";
    ns.api::<Secret>()
        .create(&PostParams::default(), &f.s3.secret("wrong", wrong))
        .await?;
    let api: Api<DataAsset> = ns.api();
    api.create(
        &PostParams::default(),
        &asset(
            "private",
            json!({"type": "UriFolder", "source": {"uri": uri, "secretRef": {"name": "wrong"}}}),
        )?,
    )
    .await?;
    let d = wait_asset(&api, "private", "access denied", |d| {
        cond(d, "SourceReachable").0 == "False"
    })
    .await?;
    let (_, reason, message) = cond(&d, "SourceReachable");
    assert_eq!(reason, "AccessDenied", "{message}");
    assert!(!message.contains(wrong), "the secret leaked: {message}");
    assert_eq!(latest(&d), None);
    assert_eq!(status(&d)["phase"], "Failed");
    assert_eq!(cond(&d, "Ready").1, "AccessDenied");

    api.create(
        &PostParams::default(),
        &asset(
            "nosecret",
            json!({"type": "UriFolder", "source": {"uri": uri, "secretRef": {"name": "missing"}}}),
        )?,
    )
    .await?;
    let d = wait_asset(&api, "nosecret", "secret not found", |d| {
        cond(d, "SourceReachable").0 == "False"
    })
    .await?;
    let (_, reason, message) = cond(&d, "SourceReachable");
    assert_eq!(reason, "SecretNotFound");
    assert!(
        message.contains("spec.source.secretRef") && message.contains("missing"),
        "{message}"
    );

    // A Secret without any store key says which keys it needs.
    let empty = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("empty".into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([("password".to_string(), "x".to_string())])),
        ..Default::default()
    };
    ns.api::<Secret>().create(&PostParams::default(), &empty).await?;
    api.create(
        &PostParams::default(),
        &asset(
            "emptysecret",
            json!({"type": "UriFolder", "source": {"uri": uri, "secretRef": {"name": "empty"}}}),
        )?,
    )
    .await?;
    let d = wait_asset(&api, "emptysecret", "invalid credentials", |d| {
        cond(d, "SourceReachable").1 == "InvalidCredentials"
    })
    .await?;
    assert!(cond(&d, "SourceReachable").2.contains("AWS_ACCESS_KEY_ID"));
    Ok(())
}

#[tokio::test]
async fn an_http_file_is_versioned_by_its_headers() -> Result<()> {
    let _ = fixture();
    let admin = admin_client().await?;
    let ns = TestNamespace::create(&admin, "da-http").await?;
    let http = HttpFileServer::start().await?;
    std::fs::write(http.dir.join("iris.csv"), "sepal,petal\n1,2\n")?;
    let api: Api<DataAsset> = ns.api();
    api.create(
        &PostParams::default(),
        &asset(
            "iris",
            json!({"type": "UriFile", "source": {"uri": http.url("iris.csv")}}),
        )?,
    )
    .await?;
    let d = wait_asset(&api, "iris", "version 1", |d| latest(d).as_deref() == Some("1")).await?;
    assert_eq!(status(&d)["versions"][0]["files"], 1);
    assert_eq!(status(&d)["versions"][0]["bytes"], 16);
    std::fs::write(http.dir.join("iris.csv"), "sepal,petal\n1,2\n3,4\n")?;
    let d = refresh(&api, "iris", "1").await?;
    assert_eq!(latest(&d).as_deref(), Some("2"), "{}", status(&d));

    // A missing file is SourceNotFound.
    api.create(
        &PostParams::default(),
        &asset(
            "gone",
            json!({"type": "UriFile", "source": {"uri": http.url("nope.csv")}}),
        )?,
    )
    .await?;
    let d = wait_asset(&api, "gone", "not found", |d| cond(d, "SourceReachable").0 == "False").await?;
    assert_eq!(
        cond(&d, "SourceReachable").1,
        "SourceNotFound",
        "{}",
        cond(&d, "SourceReachable").2
    );
    Ok(())
}

#[tokio::test]
async fn fetch_copies_a_pinned_version_and_refuses_changed_data() -> Result<()> {
    let f = fixture();
    let prefix = format!("s3://datasets/fetch-{}/", random_suffix());
    f.s3.put(&prefix, "a/1.txt", b"one").await?;
    f.s3.put(&prefix, "b.txt", b"two!").await?;
    let loc = f.s3.open(&prefix)?;
    let creds = mlplane::storage::Credentials::none();
    let digest = mlplane::storage::manifest::list(&loc, mlplane::storage::manifest::Shape::Folder, &prefix, &creds)
        .await?
        .digest();
    let dest = repo_root().join(format!(".cluster/fetch-{}", random_suffix()));
    let fetch = |digest: &str, dest: &std::path::Path| {
        let mut cmd = std::process::Command::new(operator_binary());
        cmd.args(["fetch", "--source", &prefix, "--dest"])
            .arg(dest)
            .args(["--digest", digest])
            .env_clear()
            .envs(f.s3.credentials(S3_SECRET_KEY));
        cmd.output()
    };
    let out = fetch(&digest, &dest)?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("fetched 2 object(s), 7 bytes"));
    assert_eq!(std::fs::read(dest.join("a/1.txt"))?, b"one");
    assert_eq!(std::fs::read(dest.join("b.txt"))?, b"two!");
    let copied = mlplane::storage::fetch::local_manifest(&dest).await?;
    assert_eq!(copied.files(), 2);

    // The data changed after the version was pinned: refused, naming it.
    f.s3.put(&prefix, "b.txt", b"TWO!").await?;
    let again = dest.with_extension("again");
    let out = fetch(&digest, &again)?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("changed since the pinned version"), "{err}");
    let _ = std::fs::remove_dir_all(dest);
    let _ = std::fs::remove_dir_all(again);
    Ok(())
}

/// The records API answers the same on SQLite and PostgreSQL.
#[tokio::test]
async fn records_are_the_same_on_sqlite_and_postgresql() -> Result<()> {
    let pg_dir = repo_root().join(format!(".cluster/pg-{}", random_suffix()));
    let pg_url = run_cmd(
        std::process::Command::new(repo_root().join("hack/postgres.sh"))
            .arg("start")
            .arg(&pg_dir),
    )?;
    struct Stop(std::path::PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = std::process::Command::new(repo_root().join("hack/postgres.sh"))
                .arg("stop")
                .arg(&self.0)
                .output();
        }
    }
    let _stop = Stop(pg_dir.clone());
    let sqlite_dir = repo_root().join(format!(".cluster/records-{}", random_suffix()));
    std::fs::create_dir_all(&sqlite_dir)?;
    let mut answers = vec![];
    for url in [
        format!("sqlite://{}?mode=rwc", sqlite_dir.join("t.db").display()),
        pg_url.trim().to_string(),
    ] {
        let server = TrackingServer::start(&url, &sqlite_dir.join("artifacts"), None).await?;
        let c = mlplane::tracking::client::TrackingClient::new(server.url(), mlplane::tracking::client::Token::None);
        let m = |keys: &[&str]| {
            mlplane::storage::manifest::Manifest::new(
                keys.iter()
                    .map(|k| mlplane::storage::manifest::Entry {
                        key: k.to_string(),
                        size: 1,
                        tag: "\"t\"".into(),
                    })
                    .collect(),
            )
        };
        let mut got = vec![];
        for keys in [&["a"][..], &["a"], &["a", "b"], &["a"]] {
            let man = m(keys);
            let (v, created) = c
                .record_data_version("ns", "d", "s3://b/", &man.digest(), &man.text())
                .await?;
            got.push(json!([v.version, created, v.files, v.digest]));
        }
        let listed: Vec<i64> = c
            .data_versions("ns", "d", 10)
            .await?
            .iter()
            .map(|v| v.version)
            .collect();
        got.push(json!(listed));
        got.push(json!(c.data_version("ns", "d", "9").await?.is_none()));
        let entry = mlplane::tracking::client::StepCacheJson {
            cache_key: "k".into(),
            pipeline: "p".into(),
            run: "1".into(),
            step: "s".into(),
            job: "p-1-s".into(),
            outputs: BTreeMap::from([("o".to_string(), "s3://x/cache/k/o".to_string())]),
            created_at: 0,
        };
        c.put_step_cache("ns", &entry).await?;
        c.put_step_cache(
            "ns",
            &mlplane::tracking::client::StepCacheJson {
                run: "2".into(),
                ..entry.clone()
            },
        )
        .await?;
        let found = c.lookup_step_cache("ns", &["k".into(), "missing".into()]).await?;
        got.push(json!(
            found
                .iter()
                .map(|e| (e.run.clone(), e.outputs.clone()))
                .collect::<Vec<_>>()
        ));
        answers.push(got);
    }
    assert_eq!(answers[0], answers[1], "SQLite and PostgreSQL differ");
    assert_eq!(answers[0][3][0], 3, "back to old content is a new version");
    assert_eq!(answers[0][4], json!([3, 2, 1]));
    let _ = std::fs::remove_dir_all(sqlite_dir);
    Ok(())
}

/// Only the operator writes records; a workspace's run pods and members read
/// their namespace's, others are refused.
#[tokio::test]
async fn records_are_written_by_the_operator_and_read_by_the_workspace() -> Result<()> {
    let f = fixture();
    let admin = admin_client().await?;
    let guard = s3_workspace(&admin, &f.s3, "datasets", "da-auth").await?;
    let ws = guard.0.clone();
    let uri = format!("s3://datasets/{ws}/d/");
    f.s3.put(&uri, "x", b"x").await?;
    let api: Api<DataAsset> = Api::namespaced(admin.clone(), &ws);
    api.create(
        &PostParams::default(),
        &asset(
            "d",
            json!({"type": "UriFolder", "source": {"uri": uri, "secretRef": {"name": "s3"}}}),
        )?,
    )
    .await?;
    wait_asset(&api, "d", "version 1", |d| latest(d).as_deref() == Some("1")).await?;

    let url = f.op.tracking.url();
    let as_token = |t: String| {
        mlplane::tracking::client::TrackingClient::new(url.clone(), mlplane::tracking::client::Token::Static(t))
    };
    let run_token = service_account_token(&admin, &ws, "mlplane-run", 600).await?;
    let run = as_token(run_token);
    assert_eq!(
        run.data_versions(&ws, "d", 10).await?.len(),
        1,
        "run pods read their namespace's versions"
    );
    let m = mlplane::storage::manifest::Manifest::default();
    let e = run
        .record_data_version(&ws, "d", &uri, &m.digest(), &m.text())
        .await
        .unwrap_err();
    assert_eq!(e.code.as_deref(), Some("PERMISSION_DENIED"), "{e}");
    assert!(
        run.data_versions("default", "d", 10).await.is_err(),
        "other namespaces are refused"
    );

    // A ServiceAccount with no role in the workspace is refused.
    let stranger_ns = TestNamespace::create(&admin, "da-stranger").await?;
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), &stranger_ns.name)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "x"}}))?,
        )
        .await?;
    let stranger = as_token(service_account_token(&admin, &stranger_ns.name, "x", 600).await?);
    let e = stranger.data_versions(&ws, "d", 10).await.unwrap_err();
    assert_eq!(e.code.as_deref(), Some("PERMISSION_DENIED"), "{e}");
    let e = stranger.lookup_step_cache(&ws, &["k".into()]).await.unwrap_err();
    assert_eq!(e.code.as_deref(), Some("PERMISSION_DENIED"), "{e}");
    Ok(())
}

fn pod_spec(job: &Job) -> &k8s_openapi::api::core::v1::PodSpec {
    job.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

#[tokio::test]
async fn experiment_runs_pin_the_latest_version_when_they_start() -> Result<()> {
    let f = fixture();
    let admin = admin_client().await?;
    let ws = s3_workspace(&admin, &f.s3, "datasets", "da-exp").await?;
    let ns = ws.0.as_str();
    let uri = format!("s3://datasets/{ns}/train/");
    f.s3.put(&uri, "part-0.csv", b"x,y\n1,2\n").await?;
    let assets: Api<DataAsset> = Api::namespaced(admin.clone(), ns);
    assets
        .create(
            &PostParams::default(),
            &asset(
                "train",
                json!({"type": "UriFolder", "source": {"uri": uri, "secretRef": {"name": "s3"}}}),
            )?,
        )
        .await?;
    let d = wait_asset(&assets, "train", "version 1", |d| latest(d).as_deref() == Some("1")).await?;
    let v1 = status(&d)["versions"][0]["digest"]
        .as_str()
        .context("digest")?
        .to_string();

    let exps: Api<Experiment> = Api::namespaced(admin.clone(), ns);
    let jobs: Api<Job> = Api::namespaced(admin.clone(), ns);
    let exp: Experiment = serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "Experiment", "metadata": {"name": "fit"},
        "spec": {
            "environment": {"image": "python:3.12"},
            "command": ["python", "train.py", "${{inputs.data}}", "${{inputs.extra}}", "${{outputs.model}}"],
            "inputs": {"data": {"dataAsset": "train", "version": "latest", "mode": "Download"},
                       "extra": {"uri": "s3://public/extra/"}},
            "outputs": {"model": {}},
            "resources": {"cpu": "100m", "memory": "128Mi"},
            "podMetadata": {"annotations": {"sim.mlplane.io/duration": "1s"}},
        },
    }))?;
    exps.create(&PostParams::default(), &exp).await?;
    let job = wait_for(&jobs, "fit-1", Duration::from_secs(60), "Job fit-1", |_| true).await?;

    // The Job carries the pin: name, version and digest.
    let pins: Value = serde_json::from_str(
        job.annotations()
            .get("mlplane.io/inputs")
            .context("inputs annotation")?,
    )?;
    assert_eq!(
        pins["data"],
        json!({"dataAsset": "train", "version": "1", "digest": v1, "uri": uri})
    );
    assert_eq!(pins["extra"], json!({"uri": "s3://public/extra/"}));
    // Download: the operator image's fetch into an emptyDir, with the digest and the asset's Secret.
    let pod = pod_spec(&job);
    let init = &pod.init_containers.as_ref().context("init containers")?[0];
    assert_eq!(
        init.command.as_ref().unwrap(),
        &[
            "mlplane",
            "fetch",
            "--source",
            uri.as_str(),
            "--dest",
            "/mnt/inputs/data",
            "--digest",
            v1.as_str()
        ]
    );
    assert_eq!(
        init.env_from.as_ref().unwrap()[0].secret_ref.as_ref().unwrap().name,
        "s3"
    );
    let model = format!("s3://datasets/{ns}/artifacts/experiments/fit/fit-1/model");
    assert_eq!(
        pod.containers[0].command.as_ref().unwrap(),
        &[
            "python",
            "train.py",
            "/mnt/inputs/data",
            "s3://public/extra/",
            model.as_str()
        ]
    );
    // Outputs in the workspace's store, its credentials as envFrom.
    assert_eq!(
        pod.containers[0].env_from.as_ref().unwrap()[0]
            .secret_ref
            .as_ref()
            .unwrap()
            .name,
        "s3"
    );

    let e = wait_for(&exps, "fit", Duration::from_secs(60), "run 1 succeeded", |e| {
        e.status.as_ref().is_some_and(|s| {
            s.runs
                .first()
                .is_some_and(|r| r.phase == mlplane::api::RunPhase::Succeeded)
        })
    })
    .await?;
    let run = &e.status.as_ref().unwrap().runs[0];
    assert_eq!(run.inputs["data"].version.as_deref(), Some("1"));
    assert_eq!(run.inputs["data"].digest.as_deref(), Some(v1.as_str()));

    // New data: version 2; the next run pins it, the first keeps version 1.
    f.s3.put(&uri, "part-1.csv", b"x,y\n3,4\n").await?;
    let d = refresh(&assets, "train", "1").await?;
    assert_eq!(latest(&d).as_deref(), Some("2"));
    exps.patch(
        "fit",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"mlplane.io/rerun": "again"}}})),
    )
    .await?;
    let e = wait_for(&exps, "fit", Duration::from_secs(60), "run 2 recorded", |e| {
        e.status.as_ref().is_some_and(|s| s.runs.len() == 2)
    })
    .await?;
    let runs = &e.status.as_ref().unwrap().runs;
    assert_eq!(
        (runs[0].name.as_str(), runs[0].inputs["data"].version.as_deref()),
        ("fit-2", Some("2"))
    );
    assert_eq!(
        (runs[1].name.as_str(), runs[1].inputs["data"].version.as_deref()),
        ("fit-1", Some("1"))
    );

    // An input naming a missing DataAsset: Pending with a reason, no Job.
    let mut missing = exp.clone();
    missing.metadata.name = Some("nodata".into());
    missing.spec.inputs.get_mut("data").unwrap().data_asset = Some("absent".into());
    exps.create(&PostParams::default(), &missing).await?;
    let e = wait_for(&exps, "nodata", Duration::from_secs(60), "DataAssetNotFound", |e| {
        e.status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.reason == "DataAssetNotFound")
    })
    .await?;
    assert_eq!(e.status.as_ref().unwrap().phase, Some(mlplane::api::RunPhase::Pending));
    assert!(jobs.get_opt("nodata-1").await?.is_none());
    Ok(())
}
