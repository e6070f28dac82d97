//! The Kubernetes deployment in deploy/: the Helm chart, rendered by Helm's own engine
//! (deploy/helm/render.py), and the plain manifests generated from it. The objects parse into the
//! API's own types (k8s-openapi), agree with the agent (configuration, ports, probe paths, mount
//! paths, RBAC) for default and changed values, and the capability set the `DaemonSet` grants is
//! enough for the agent to load, attach and mirror (run here with exactly those capabilities).
//! No Kubernetes API server runs on these machines: what a cluster would do with the objects
//! (scheduling, mounting, probing) is not exercised.
use std::{net::SocketAddr, path::Path, process::Command};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, Namespace, PodSpec, Service, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use mirror_tests::{
    Capture, FrameSender, Lab, NODE_SRC_MAC, SENTINEL_RULE, SRC_MAC, agent_binary, agent_command,
    udp_v4_frame,
};
use serde::Deserialize as _;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

/// The chart rendered by `deploy/helm/render.py` with `args`.
fn render(args: &[&str]) -> String {
    let (ok, stdout, stderr) = try_render(args);
    assert!(
        ok,
        "rendering the chart (helm-python-sdk comes with `cargo xtask setup`): {stderr}"
    );
    stdout
}

/// `deploy/helm/render.py` with `args`: (success, stdout, stderr).
fn try_render(args: &[&str]) -> (bool, String, String) {
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
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    services: Vec<Service>,
    /// Prometheus Operator objects (no k8s-openapi type).
    service_monitors: Vec<serde_norway::Value>,
}

fn parse<T: serde::de::DeserializeOwned>(value: &serde_norway::Value, kind: &str) -> T {
    serde_norway::from_value(value.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

fn objects(text: &str) -> Objects {
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
            "ServiceMonitor" => objects.service_monitors.push(value),
            other => panic!("unexpected kind {other}"),
        }
    }
    objects
}

/// The agent's container and the configuration file its `ConfigMap` carries.
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

/// The value of a `key = "value"` line of a TOML text.
fn toml_string<'a>(config: &'a str, key: &str) -> Option<&'a str> {
    config
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
        .and_then(|rest| rest.strip_suffix('"'))
}

/// Every check of the objects against each other and the agent.
fn check_agreement(objects: &Objects, namespace: &str) {
    assert_eq!(objects.service_accounts.len(), 1);
    assert_eq!(objects.daemon_sets.len(), 1);
    assert_eq!(objects.config_maps.len(), 1);
    let daemon_set = &objects.daemon_sets[0];
    for object_namespace in [
        objects.service_accounts[0].metadata.namespace.as_deref(),
        objects.config_maps[0].metadata.namespace.as_deref(),
        daemon_set.metadata.namespace.as_deref(),
    ] {
        assert_eq!(object_namespace, Some(namespace));
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
    check_rbac(objects, namespace);
    check_mounts(objects, pod);
    check_metrics(objects);
    let (agent, _) = agent_and_config(objects);
    let node_name = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(node_name, Some("spec.nodeName"), "pod-selector sessions");
}

/// Pod-selector sessions list and watch pods, with the agent's service account.
fn check_rbac(objects: &Objects, namespace: &str) {
    let role = &objects.cluster_roles[0];
    let rules = role.rules.clone().unwrap_or_default();
    assert_eq!(rules.len(), 1);
    assert_eq!(
        rules[0].resources.as_deref(),
        Some(&["pods".to_owned()][..])
    );
    let mut verbs = rules[0].verbs.clone();
    verbs.sort();
    assert_eq!(verbs, ["get", "list", "watch"]);
    let binding = &objects.cluster_role_bindings[0];
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!(
        (Some(&subject.name), subject.namespace.as_deref()),
        (
            objects.service_accounts[0].metadata.name.as_ref(),
            Some(namespace)
        )
    );
}

/// The agent reads the `ConfigMap` where the container mounts it; pinned mode keeps links on the
/// host's bpffs; the API socket is on a host directory.
fn check_mounts(objects: &Objects, pod: &PodSpec) {
    let (agent, config) = agent_and_config(objects);
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
    let bpffs =
        mounted_at(&|v| v.host_path.as_ref().map(|h| h.path.as_str()) == Some("/sys/fs/bpf"));
    if let Some(pin_dir) = toml_string(config, "pin_dir") {
        assert!(Path::new(pin_dir).starts_with(&bpffs));
    }
    let run = mounted_at(&|v| v.host_path.as_ref().map(|h| h.path.as_str()) == Some("/run/mirror"));
    assert!(Path::new(toml_string(config, "api_socket").expect("api_socket")).starts_with(&run));
}

/// Metrics, probes, scrape annotations and the `ServiceMonitor` on the port the agent serves.
fn check_metrics(objects: &Objects) {
    let (agent, config) = agent_and_config(objects);
    let metrics: SocketAddr = toml_string(config, "metrics_address")
        .expect("metrics_address")
        .parse()
        .expect("address");
    let port = agent
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("the metrics port");
    assert_eq!(port.container_port, i32::from(metrics.port()));
    // On the node's IP only, by default; the JSON routes are not served there.
    let args = agent.args.clone().unwrap_or_default();
    assert!(
        args.windows(2).any(|w| w == ["--metrics-ip", "$(NODE_IP)"]),
        "{args:?}"
    );
    let node_ip = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_IP")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(node_ip, Some("status.hostIP"));
    assert!(!config.contains("metrics_json_routes"), "{config}");
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
    let template = &objects.daemon_sets[0].spec.as_ref().expect("spec").template;
    let annotations = template
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
    let pod_labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .expect("labels");
    for monitor in &objects.service_monitors {
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert_eq!(endpoint["port"].as_str(), Some("metrics"));
        assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
        let service = &objects.services[0];
        let service_spec = service.spec.as_ref().expect("service spec");
        assert_eq!(service_spec.selector.as_ref(), Some(&pod_labels));
        let service_port = &service_spec.ports.as_ref().expect("ports")[0];
        assert_eq!(service_port.name.as_deref(), Some("metrics"));
        assert_eq!(service_port.port, i32::from(metrics.port()));
        let selected: std::collections::BTreeMap<String, String> =
            serde_norway::from_value(monitor["spec"]["selector"]["matchLabels"].clone())
                .expect("matchLabels");
        let service_labels = service.metadata.labels.clone().expect("service labels");
        assert!(
            selected
                .iter()
                .all(|(k, v)| service_labels.get(k) == Some(v))
        );
    }
}

#[test]
fn the_plain_manifests_are_the_chart_rendered_with_its_defaults() {
    let committed =
        std::fs::read_to_string(format!("{DEPLOY}/manifests/mirror.yaml")).expect("manifests");
    assert!(
        committed == render(&["--manifests"]),
        "deploy/manifests/mirror.yaml is stale: run deploy/helm/render.py --manifests > deploy/manifests/mirror.yaml"
    );
    let objects = objects(&committed);
    assert_eq!(
        objects.namespaces[0].metadata.name.as_deref(),
        Some("mirror")
    );
    check_agreement(&objects, "mirror");
    assert!(objects.service_monitors.is_empty(), "off by default");
}

#[test]
fn the_chart_passes_helm_lint_strict() {
    // `render` fails on a non-zero exit: a warning or an error.
    let report = render(&["--lint"]);
    assert!(!report.contains("severity 3"), "{report}");
}

#[test]
fn the_chart_refuses_values_its_schema_does_not_allow() {
    for (value, says) in [
        (
            r#"metrics={"prot":9477}"#,
            "additional properties 'prot' not allowed",
        ),
        (r#"metrics={"port":"9477"}"#, "got string, want integer"),
        (r#"metrics={"port":70000}"#, "maximum"),
        (r#"image={"pullPolicy":"Sometimes"}"#, "pullPolicy"),
        ("sessions=\"\"", "sessions"),
        ("pined=true", "additional properties 'pined' not allowed"),
    ] {
        let (ok, _, stderr) = try_render(&["--set-json", value]);
        assert!(!ok, "{value} was accepted");
        assert!(stderr.contains(says), "{value}: {stderr}");
    }
}

#[test]
fn the_chart_agrees_with_the_agent_for_other_values() {
    let objects = objects(&render(&[
        "--namespace",
        "observability",
        "--release",
        "tap",
        "--set-json",
        r#"metrics={"port":9500,"annotations":true}"#,
        "--set-json",
        r#"serviceMonitor={"enabled":true,"interval":"15s","labels":{"release":"prom"}}"#,
        "--set-json",
        "pinned=false",
        "--set-json",
        "privileged=true",
    ]));
    check_agreement(&objects, "observability");
    assert_eq!(objects.service_monitors.len(), 1);
    assert_eq!(
        objects.service_monitors[0]["metadata"]["labels"]["release"].as_str(),
        Some("prom")
    );
    let (agent, config) = agent_and_config(&objects);
    assert_eq!(toml_string(config, "pin_dir"), None);
    let security = agent.security_context.as_ref().expect("security context");
    assert_eq!(
        (security.privileged, security.capabilities.as_ref()),
        (Some(true), None)
    );
}

#[test]
fn the_default_configuration_is_valid_for_the_agent() {
    let objects = objects(&render(&[]));
    let (_, config) = agent_and_config(&objects);
    // `check` on a node whose underlay reaches the collector's subnet (the lab's 192.0.2.0/24).
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

/// The capabilities the `DaemonSet` adds, as `setpriv` spells them.
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
    let objects = objects(&render(&[]));
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

/// The instructions of deploy/Dockerfile: (keyword, arguments), continuation lines joined.
fn dockerfile() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(format!("{DEPLOY}/Dockerfile")).expect("Dockerfile");
    let joined = text.replace("\\\n", " ");
    joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (keyword, arguments) = l.split_once(' ').unwrap_or((l, ""));
            (keyword.to_uppercase(), arguments.trim().to_owned())
        })
        .collect()
}

/// No Docker engine runs on these machines, so the image is not built here; what can be checked
/// without one is that the Dockerfile builds what the project's own commands build, and runs it
/// the way the `DaemonSet` expects.
#[test]
fn the_dockerfile_builds_with_the_project_commands_and_runs_as_the_daemonset_expects() {
    let instructions = dockerfile();
    let stages: Vec<&String> = instructions
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(
        stages.len(),
        2,
        "a build stage and a runtime stage: {stages:?}"
    );
    let build_stage = stages[0].split(" AS ").nth(1).expect("a named build stage");
    let runs: Vec<&String> = instructions
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, a)| a)
        .collect();
    assert!(
        runs.iter().any(
            |r| r.contains("cargo xtask setup --build-only") && r.contains("cargo xtask build")
        ),
        "{runs:?}"
    );
    // The binary `cargo xtask build` makes is the one copied, and the one the entry point runs.
    let copy = instructions
        .iter()
        .find(|(k, a)| k == "COPY" && a.starts_with(&format!("--from={build_stage} ")))
        .map(|(_, a)| a.split_whitespace().collect::<Vec<_>>())
        .expect("a COPY from the build stage");
    assert_eq!(copy[1], "/src/target/release/mirror-agent");
    let entrypoint: Vec<String> = instructions
        .iter()
        .find(|(k, _)| k == "ENTRYPOINT")
        .map(|(_, a)| serde_json::from_str(a).expect("exec form"))
        .expect("an entry point");
    assert_eq!(entrypoint, [copy[2]]);
    // The DaemonSet gives only arguments, to that entry point.
    let objects = objects(&render(&[]));
    let (agent, _) = agent_and_config(&objects);
    assert_eq!(agent.command, None, "the image's entry point runs");
    let cmd: Vec<String> = instructions
        .iter()
        .find(|(k, _)| k == "CMD")
        .map(|(_, a)| serde_json::from_str(a).expect("exec form"))
        .expect("a default command");
    // The image's default is the DaemonSet's, which adds only the node's IP for metrics (an
    // address the image cannot know).
    let args = agent.args.clone().unwrap_or_default();
    assert_eq!(
        args[..cmd.len()],
        cmd[..],
        "the image's default is the DaemonSet's"
    );
    assert_eq!(args[cmd.len()..], ["--metrics-ip", "$(NODE_IP)"]);
}

/// The host install's systemd unit: systemd's own checker accepts it (with the unit run from the
/// binary under test), it grants exactly the `DaemonSet`'s capabilities, and a reload is SIGHUP.
#[test]
fn the_systemd_unit_is_valid_and_grants_what_the_daemonset_grants() {
    let unit = std::fs::read_to_string(format!("{DEPLOY}/systemd/mirror-agent.service"))
        .expect("the unit");
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("mirror-agent.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/mirror-agent",
            agent_binary().to_str().expect("utf-8"),
        ),
    )
    .expect("write the unit");
    let verified = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .expect("systemd-analyze (Debian's systemd)");
    let said = String::from_utf8_lossy(&verified.stderr);
    assert!(
        verified.status.success() && said.trim().is_empty(),
        "{said}"
    );
    let value = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} in the unit"))
    };
    let objects = objects(&render(&[]));
    let (agent, _) = agent_and_config(&objects);
    let mut daemonset: Vec<String> = granted_capabilities(agent)
        .iter()
        .map(|c| format!("CAP_{}", c.trim_start_matches('+').to_uppercase()))
        .collect();
    let mut unit_caps: Vec<String> = value("CapabilityBoundingSet")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    daemonset.sort();
    unit_caps.sort();
    assert_eq!(unit_caps, daemonset);
    assert_eq!(value("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert!(value("ExecStart").contains("run --config /etc/mirror/config.toml"));
}
