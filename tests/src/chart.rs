//! The Kubernetes deployment in deploy/: the Helm chart rendered by Helm's own engine
//! (deploy/helm/render.py), its objects parsed into the API's own types (k8s-openapi).
use std::process::Command;

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::{ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize as _;

pub const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

/// The chart rendered by `deploy/helm/render.py` with `args`.
pub fn render(args: &[&str]) -> String {
    let (ok, stdout, stderr) = try_render(args);
    assert!(
        ok,
        "rendering the chart (helm-python-sdk comes with `cargo xtask setup`): {stderr}"
    );
    stdout
}

/// `deploy/helm/render.py` with `args`: (success, stdout, stderr).
pub fn try_render(args: &[&str]) -> (bool, String, String) {
    let output = Command::new("python3")
        .arg(format!("{DEPLOY}/helm/render.py"))
        .args(args)
        .output()
        .expect("python3");
    (
        output.status.success(),
        String::from_utf8(output.stdout).expect("UTF-8"),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The objects of a YAML stream, each parsed by its kind.
#[derive(Debug, Default)]
pub struct Objects {
    pub namespaces: Vec<Namespace>,
    pub service_accounts: Vec<ServiceAccount>,
    pub config_maps: Vec<ConfigMap>,
    pub daemon_sets: Vec<DaemonSet>,
    pub cluster_roles: Vec<ClusterRole>,
    pub cluster_role_bindings: Vec<ClusterRoleBinding>,
    pub services: Vec<Service>,
    /// The collector's.
    pub deployments: Vec<Deployment>,
    /// Prometheus Operator objects (no k8s-openapi type).
    pub service_monitors: Vec<serde_norway::Value>,
    pub prometheus_rules: Vec<serde_norway::Value>,
}

fn parse<T: serde::de::DeserializeOwned>(value: &serde_norway::Value, kind: &str) -> T {
    serde_norway::from_value(value.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

pub fn objects(text: &str) -> Objects {
    let mut objects = Objects::default();
    for document in serde_norway::Deserializer::from_str(text) {
        let value = serde_norway::Value::deserialize(document).expect("YAML");
        let kind = value["kind"].as_str().expect("a kind").to_owned();
        match kind.as_str() {
            "Namespace" => objects.namespaces.push(parse(&value, &kind)),
            "ServiceAccount" => objects.service_accounts.push(parse(&value, &kind)),
            "ConfigMap" => objects.config_maps.push(parse(&value, &kind)),
            "DaemonSet" => objects.daemon_sets.push(parse(&value, &kind)),
            "ClusterRole" => objects.cluster_roles.push(parse(&value, &kind)),
            "ClusterRoleBinding" => objects.cluster_role_bindings.push(parse(&value, &kind)),
            "Service" => objects.services.push(parse(&value, &kind)),
            "Deployment" => objects.deployments.push(parse(&value, &kind)),
            "ServiceMonitor" => objects.service_monitors.push(value),
            "PrometheusRule" => objects.prometheus_rules.push(value),
            other => panic!("unexpected kind {other}"),
        }
    }
    objects
}

impl Objects {
    /// The agent's pod.
    pub fn agent_pod(&self) -> &PodSpec {
        self.daemon_sets[0]
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("a pod spec")
    }
}

/// The agent's container and the configuration file its `ConfigMap` carries.
pub fn agent_and_config(objects: &Objects) -> (&Container, &str) {
    let pod = objects.agent_pod();
    let config = objects.config_maps[0]
        .data
        .as_ref()
        .and_then(|d| d.get("config.toml"))
        .expect("config.toml in the ConfigMap");
    (&pod.containers[0], config)
}

/// The image `cargo xtask image` builds by default, and the chart's default image.
pub const DEFAULT_IMAGE: &str = concat!(
    "ghcr.io/mirror-project/mirror-agent:",
    env!("CARGO_PKG_VERSION")
);

/// The value of a `key = "value"` line of a TOML text.
pub fn toml_string<'a>(config: &'a str, key: &str) -> Option<&'a str> {
    config
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
        .and_then(|rest| rest.strip_suffix('"'))
}

/// The capabilities the `DaemonSet` adds, as `setpriv` spells them.
pub fn granted_capabilities(agent: &Container) -> Vec<String> {
    let capabilities = agent
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    capabilities
        .add
        .iter()
        .flatten()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect()
}
