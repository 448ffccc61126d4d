//! Packaging: the Helm chart installs with helm and its operator Deployment
//! becomes Available; the rendered manifests/install.yaml is accepted by the
//! API server; the operator refuses to start without its CRDs.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use mlplane::controllers::run::environment::Catalog;
use mlplane_test_support::*;

#[tokio::test]
async fn chart_installs_and_the_operator_deployment_is_available() -> Result<()> {
    install_chart()?;
    let client = admin_client().await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let d = wait_for(
        &deployments,
        RELEASE,
        Duration::from_secs(60),
        "operator Deployment Available",
        |d| {
            d.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Available" && c.status == "True"))
        },
    )
    .await?;
    let spec = d.spec.unwrap().template.spec.unwrap();
    let sc = spec.containers[0]
        .security_context
        .clone()
        .expect("container securityContext");
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.and_then(|c| c.drop), Some(vec!["ALL".to_string()]));
    let out = run_cmd(
        std::process::Command::new(tool("helm"))
            .args(["lint", "--strict"])
            .arg(repo_root().join("charts/mlplane")),
    )?;
    assert!(out.contains("0 chart(s) failed"), "{out}");
    Ok(())
}

#[tokio::test]
async fn installed_environment_catalog_is_the_one_the_operator_reads() -> Result<()> {
    install_chart()?;
    let client = admin_client().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), OPERATOR_NAMESPACE);
    let cm = cms.get(&format!("{RELEASE}-catalogs")).await?;
    let text = cm
        .data
        .unwrap_or_default()
        .remove("environments.yaml")
        .unwrap_or_default();
    // The operator parses the file with this same function at start.
    let catalog = Catalog::from_yaml(&text)?;
    assert_eq!(
        catalog.environments["pytorch-2-5-cuda12"],
        "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
    );
    assert_eq!(
        catalog,
        Catalog::builtin(),
        "the chart ships the built-in catalog by default"
    );
    // The operator Deployment points MLPLANE_ENVIRONMENT_CATALOG at the mounted file.
    let deployments: Api<Deployment> = Api::namespaced(client, OPERATOR_NAMESPACE);
    let spec = deployments.get(RELEASE).await?.spec.unwrap().template.spec.unwrap();
    let c = &spec.containers[0];
    let env = c.env.clone().unwrap_or_default();
    let path = env
        .iter()
        .find(|e| e.name == "MLPLANE_ENVIRONMENT_CATALOG")
        .and_then(|e| e.value.clone())
        .expect("MLPLANE_ENVIRONMENT_CATALOG");
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| path.starts_with(&m.mount_path))
        .expect("the catalog file is on a mounted volume");
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("volume");
    assert_eq!(
        volume.config_map.as_ref().map(|c| c.name.as_str()),
        Some(cm.metadata.name.as_deref().unwrap())
    );
    assert!(path.ends_with("/environments.yaml"));
    Ok(())
}

#[tokio::test]
async fn rendered_install_manifest_is_accepted() -> Result<()> {
    // A server-side dry run creates nothing, so the namespace the manifest's
    // objects go to must exist: the chart install makes it.
    install_chart()?;
    let path = repo_root().join("manifests/install.yaml");
    let out = kubectl(&[
        "apply",
        "--server-side",
        "--dry-run=server",
        "--force-conflicts",
        "-f",
        &path.to_string_lossy(),
    ])?;
    assert!(out.contains("deployment.apps/mlplane"), "{out}");
    Ok(())
}

#[tokio::test]
async fn operator_exits_with_a_hint_when_crds_are_missing() -> Result<()> {
    // The CRDs of the shared cluster cannot be removed mid-run, so the
    // operator is pointed at a server URL prefix where discovery serves no
    // mlplane.io group: what it sees on a cluster without the CRDs.
    // (The admin's credentials, so the unknown path is a 404, not a 403.)
    let text = std::fs::read_to_string(kubeconfig_path())?;
    let broken = repo_root().join(format!(".cluster/kubeconfig-nocrds-{}", random_suffix()));
    let server = server_url(&text);
    std::fs::write(&broken, text.replace(&server, &format!("{server}/no-such-prefix")))?;
    let out = std::process::Command::new(operator_binary())
        .env("KUBECONFIG", &broken)
        .args(["run", "--leader-elect=false", "--metrics-addr", "127.0.0.1:0"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("CRDs are not installed") && stderr.contains("crds/"),
        "{stderr}"
    );
    Ok(())
}

fn server_url(kubeconfig: &str) -> String {
    kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server:"))
        .map(|s| s.trim().trim_matches('\'').trim_matches('"').to_string())
        .expect("kubeconfig has a server")
}
