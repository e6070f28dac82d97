//! The Kubernetes manifests in deploy/: they parse into the API's own types, agree with the agent
//! (configuration, ports, probe paths, mount paths), and the capability set the DaemonSet grants
//! is enough for the agent to load, attach and mirror (run here with exactly those capabilities).
//! No Kubernetes API server runs on these machines: what the cluster would do with the objects
//! (scheduling, mounting, probing) is not exercised.
use std::{net::SocketAddr, path::Path};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, Namespace, ServiceAccount},
};
use mirror_tests::{
    Capture, FrameSender, Lab, NODE_SRC_MAC, SENTINEL_RULE, SRC_MAC, agent_binary, agent_command,
    udp_v4_frame,
};
use serde::Deserialize as _;

const MANIFESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/manifests/mirror.yaml"
);

/// The objects of deploy/manifests/mirror.yaml, each parsed by its kind.
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
}

fn objects() -> Objects {
    let text = std::fs::read_to_string(MANIFESTS).expect("the manifests");
    let mut objects = Objects::default();
    for document in serde_norway::Deserializer::from_str(&text) {
        let value = serde_norway::Value::deserialize(document).expect("YAML");
        let kind = value["kind"].as_str().expect("a kind").to_owned();
        let parse = || value.clone();
        match kind.as_str() {
            "Namespace" => objects
                .namespaces
                .push(serde_norway::from_value(parse()).expect(&kind)),
            "ServiceAccount" => objects
                .service_accounts
                .push(serde_norway::from_value(parse()).expect(&kind)),
            "ConfigMap" => objects
                .config_maps
                .push(serde_norway::from_value(parse()).expect(&kind)),
            "DaemonSet" => objects
                .daemon_sets
                .push(serde_norway::from_value(parse()).expect(&kind)),
            other => panic!("unexpected kind {other}"),
        }
    }
    objects
}

/// The agent's container and the configuration file its ConfigMap carries.
fn agent_and_config(objects: &Objects) -> (&Container, &str) {
    let daemon_set = &objects.daemon_sets[0];
    let pod = daemon_set
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("a pod spec");
    let config = objects.config_maps[0]
        .data
        .as_ref()
        .and_then(|d| d.get("config.toml"))
        .expect("config.toml in the ConfigMap");
    (&pod.containers[0], config)
}

/// A `key = "value"` line of a TOML text.
fn toml_string<'a>(config: &'a str, key: &str) -> &'a str {
    config
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_else(|| panic!("{key} in the configuration"))
}

#[test]
fn the_manifests_parse_and_agree_with_the_agent() {
    let objects = objects();
    assert_eq!(objects.namespaces.len(), 1);
    assert_eq!(objects.service_accounts.len(), 1);
    let daemon_set = &objects.daemon_sets[0];
    let namespace = objects.namespaces[0].metadata.name.as_deref();
    for object_namespace in [
        objects.service_accounts[0].metadata.namespace.as_deref(),
        objects.config_maps[0].metadata.namespace.as_deref(),
        daemon_set.metadata.namespace.as_deref(),
    ] {
        assert_eq!(object_namespace, namespace);
    }
    let spec = daemon_set.spec.as_ref().expect("spec");
    let pod = spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(pod.host_network, Some(true), "the node's interfaces");
    assert_eq!(
        pod.service_account_name,
        objects.service_accounts[0].metadata.name
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "every node"
    );
    let (agent, config) = agent_and_config(&objects);

    // The agent reads the ConfigMap where the container mounts it.
    let args = agent.args.clone().unwrap_or_default();
    let config_path = args
        .iter()
        .skip_while(|a| *a != "--config")
        .nth(1)
        .expect("--config");
    let mounts = agent.volume_mounts.clone().unwrap_or_default();
    let mounted_at = |volume_source: &dyn Fn(&k8s_openapi::api::core::v1::Volume) -> bool| {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| volume_source(v))
            .expect("a volume");
        mounts
            .iter()
            .find(|m| m.name == volume.name)
            .map(|m| m.mount_path.clone())
            .expect("mounted")
    };
    let config_dir = mounted_at(&|v| {
        v.config_map.as_ref().map(|c| c.name.as_str())
            == objects.config_maps[0].metadata.name.as_deref()
    });
    assert_eq!(
        Path::new(config_path),
        Path::new(&config_dir).join("config.toml")
    );

    // Pinned mode keeps links on the host's bpffs; the API socket is on a host directory.
    let bpffs =
        mounted_at(&|v| v.host_path.as_ref().map(|h| h.path.as_str()) == Some("/sys/fs/bpf"));
    assert!(Path::new(toml_string(config, "pin_dir")).starts_with(&bpffs));
    let run = mounted_at(&|v| v.host_path.as_ref().map(|h| h.path.as_str()) == Some("/run/mirror"));
    assert!(Path::new(toml_string(config, "api_socket")).starts_with(&run));

    // Metrics and probes on the port the agent serves them on.
    let metrics: SocketAddr = toml_string(config, "metrics_address")
        .parse()
        .expect("address");
    let port = agent
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("the metrics port");
    assert_eq!(port.container_port, i32::from(metrics.port()));
    for (probe, path) in [
        (agent.liveness_probe.as_ref(), "/healthz"),
        (agent.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("metrics".into())
        );
    }
    let annotations = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .expect("annotations");
    assert_eq!(
        annotations.get("prometheus.io/port"),
        Some(&metrics.port().to_string())
    );
    assert_eq!(
        annotations.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );
    let node_name = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(node_name, Some("spec.nodeName"));

    // The configuration is valid for the agent: `check` on a node whose underlay reaches the
    // collector's subnet (the lab's 192.0.2.0/24).
    let lab = Lab::with_collector("deploy", 1500);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("config.toml");
    std::fs::write(&file, config).expect("write config");
    let (code, stdout, stderr) = agent_command(
        &lab.node,
        &["check", "--config", file.to_str().expect("utf-8")],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("ok: 1 session(s)"), "{stdout}");
}

/// The capabilities the DaemonSet adds, as `setpriv` spells them.
fn granted_capabilities(agent: &Container) -> Vec<String> {
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

#[test]
fn the_daemonset_capabilities_are_enough_for_tc_xdp_and_vxlan() {
    let objects = objects();
    let (agent, _) = agent_and_config(&objects);
    let granted = granted_capabilities(agent);
    let lab = Lab::with_collector("caps", 1500);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    // A TC session to an interface, and an XDP session to a VXLAN collector (raw sockets).
    std::fs::write(
        &config,
        format!(
            "api_socket = \"{}\"\n[[session]]\nname = \"tc\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\ntarget = {{ interface = \"mir0\" }}\n{SENTINEL_RULE}\
             [[session]]\nname = \"xdp\"\ninterfaces = [\"sink0\"]\nhook = \"xdp\"\ntarget = {{ vxlan = {{ remote = \"192.0.2.2\", vni = 5 }} }}\n{SENTINEL_RULE}",
            dir.path().join("agent.sock").display()
        ),
    )
    .expect("write config");
    let bounding = format!("-all,{}", granted.join(","));
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.node.name])
        .args(["setpriv", "--bounding-set", &bounding, "--inh-caps", "-all"])
        .arg(agent_binary())
        .args(["run", "--stats-interval", "0", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("agent under setpriv");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("agent output");
    assert!(
        line.contains("attached to"),
        "with {bounding}: {line:?} ({:?})",
        child.wait()
    );
    // Only the granted capabilities are in effect.
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).expect("agent status");
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
        .expect("CapEff");
    assert_eq!(effective.count_ones() as usize, granted.len(), "{status}");

    let copies = Capture::open(&lab.mon, "eth0");
    let wire = Capture::open(lab.col(), "eth0");
    FrameSender::open(&lab.src, "eth0").send_sentinel(SRC_MAC, NODE_SRC_MAC);
    assert_eq!(copies.until_sentinel().len(), 0, "the TC session copied");
    let reply = udp_v4_frame(
        mirror_tests::SINK_MAC,
        mirror_tests::NODE_SINK_MAC,
        mirror_tests::SENTINEL_PORT,
        b"sentinel",
    );
    FrameSender::open(&lab.sink, "eth0").send(&reply);
    let tunnelled = wire.until_nth(1, |f| {
        mirror_tests::vxlan_of(f).is_some_and(|v| v.inner == reply)
    });
    assert!(!tunnelled.is_empty(), "the XDP session's VXLAN copy");
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(child.id().cast_signed(), libc::SIGTERM) };
    let mut report = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut report).expect("report");
    assert!(child.wait().expect("agent").success(), "{report}");
    assert!(!agent_command(&lab.node, &["status"]).1.contains("attached"));
}
