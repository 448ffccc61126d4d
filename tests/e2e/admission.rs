//! Admission: every invalid manifest under tests/fixtures/invalid is refused
//! by the API server (OpenAPI schema and CEL from the generated CRDs) with a
//! message naming the field; every manifest under tests/fixtures/valid and
//! manifests/examples is accepted; spec.namespace of a Workspace is immutable.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::Discovery;
use mlplane::api::Workspace;
use mlplane_test_support::*;
use serde::Deserialize;
use serde_json::json;

fn docs(path: &Path) -> Result<Vec<DynamicObject>> {
    let text = std::fs::read_to_string(path)?;
    let mut out = vec![];
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc)?;
        if !v.is_null() {
            out.push(serde_yaml::from_value(v)?);
        }
    }
    Ok(out)
}

fn yaml_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Creates with dryRun=All: admission runs in full, nothing is stored.
async fn dry_run_create(
    client: &kube::Client,
    discovery: &Discovery,
    obj: &DynamicObject,
    ns: &str,
    unique: bool,
) -> Result<(), kube::Error> {
    // Namespaced objects go to the test's namespace whatever their manifest
    // says; with `unique`, cluster-scoped ones get a unique name, so an object
    // of the same name already in the cluster (e.g. from `make demo`) cannot
    // interfere (not for invalid fixtures: a name may be what is invalid).
    let mut obj = obj.clone();
    obj.metadata.namespace = None;
    let (api, _, caps) = dynamic_api(client, discovery, &obj, Some(ns)).expect("kind is served");
    if unique
        && caps.scope == kube::discovery::Scope::Cluster
        && let Some(name) = obj.metadata.name.as_mut()
    {
        name.push_str(&format!("-{}", random_suffix()));
    }
    api.create(
        &PostParams {
            dry_run: true,
            ..Default::default()
        },
        &obj,
    )
    .await
    .map(|_| ())
}

#[tokio::test]
async fn invalid_manifests_are_refused_naming_the_field() -> Result<()> {
    install_crds()?;
    let client = admin_client().await?;
    let discovery = Discovery::new(client.clone()).run().await?;
    let ns = TestNamespace::create(&client, "admission").await?;
    let files = yaml_files(&repo_root().join("tests/fixtures/invalid"))?;
    assert!(
        files.len() >= 15,
        "at least 15 invalid manifests, found {}",
        files.len()
    );
    let mut failures = vec![];
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        let expect = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect:"))
            .with_context(|| format!("{} has no '# expect:' line", file.display()))?
            .trim()
            .to_string();
        for obj in docs(file)? {
            match dry_run_create(&client, &discovery, &obj, &ns.name, false).await {
                Ok(()) => failures.push(format!("{}: accepted", file.display())),
                Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => {
                    if !s.message.contains(&expect) {
                        failures.push(format!(
                            "{}: message {:?} lacks {:?}",
                            file.display(),
                            s.message,
                            expect
                        ));
                    }
                }
                Err(e) => failures.push(format!("{}: unexpected error {e}", file.display())),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} invalid manifests misbehaved:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    eprintln!(
        "{} invalid manifests refused with the expected field in the message",
        files.len()
    );
    Ok(())
}

#[tokio::test]
async fn valid_fixtures_and_examples_are_accepted() -> Result<()> {
    install_crds()?;
    let client = admin_client().await?;
    let discovery = Discovery::new(client.clone()).run().await?;
    let ns = TestNamespace::create(&client, "admission-ok").await?;
    let mut files = yaml_files(&repo_root().join("tests/fixtures/valid"))?;
    files.extend(yaml_files(&repo_root().join("manifests/examples"))?);
    let mut failures = vec![];
    let mut count = 0;
    for file in &files {
        for obj in docs(file)? {
            if obj
                .types
                .as_ref()
                .is_none_or(|t| !t.api_version.starts_with("mlplane.io/"))
            {
                continue;
            }
            count += 1;
            if let Err(e) = dry_run_create(&client, &discovery, &obj, &ns.name, true).await {
                failures.push(format!("{} ({}): {e}", file.display(), obj.name_any()));
            }
        }
    }
    assert!(count >= 6, "one valid manifest per kind at least, found {count}");
    assert!(failures.is_empty(), "valid manifests refused:\n{}", failures.join("\n"));
    Ok(())
}

#[tokio::test]
async fn workspace_namespace_is_immutable() -> Result<()> {
    install_crds()?;
    let client = admin_client().await?;
    let api: Api<Workspace> = Api::all(client.clone());
    let name = format!("ws-immutable-{}", random_suffix());
    let ws: Workspace = serde_json::from_value(json!({
        "apiVersion": "mlplane.io/v1alpha1", "kind": "Workspace",
        "metadata": {"name": name}, "spec": {"namespace": format!("{name}-a")},
    }))?;
    api.create(&PostParams::default(), &ws).await?;
    let r = api
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"namespace": format!("{name}-b")}})),
        )
        .await;
    let _ = api.delete(&name, &DeleteParams::default()).await;
    match r {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(s.message.contains("spec.namespace is immutable"), "{}", s.message);
        }
        other => panic!("changing spec.namespace must be refused, got {other:?}"),
    }
    // Clean up the namespace the operator may have made, if one runs.
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(())
}
