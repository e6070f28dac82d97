//! The Kubernetes deployment in deploy/: the Helm chart, rendered by Helm's own engine
//! (deploy/helm/render.py), and the plain manifests generated from it. The objects parse into the
//! API's own types (k8s-openapi), agree with the agent (configuration, ports, probe paths, mount
//! paths, RBAC) for default and changed values, and the capability set the `DaemonSet` grants is
//! enough for the agent to load, attach and mirror (run here with exactly those capabilities).
//! No Kubernetes API server runs on these machines: what a cluster would do with the objects
//! (scheduling, mounting, probing) is not exercised.
use std::{net::SocketAddr, path::Path};

use k8s_openapi::api::core::v1::PodSpec;
use mirror_tests::{
    Capture, FrameSender, Lab, NODE_SRC_MAC, SENTINEL_RULE, SRC_MAC, agent_binary, agent_command,
    chart::{
        DEPLOY, Objects, agent_and_config, granted_capabilities, objects, render, toml_string,
        try_render,
    },
};

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
    check_labels(objects);
    check_probes(objects);
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

/// Every object carries the standard labels; the `DaemonSet` selects its pods by the two that
/// never change between releases, which its pods carry.
fn check_labels(objects: &Objects) {
    let metadata = objects
        .service_accounts
        .iter()
        .map(|o| &o.metadata)
        .chain(objects.config_maps.iter().map(|o| &o.metadata))
        .chain(objects.daemon_sets.iter().map(|o| &o.metadata))
        .chain(objects.cluster_roles.iter().map(|o| &o.metadata))
        .chain(objects.cluster_role_bindings.iter().map(|o| &o.metadata))
        .chain(objects.services.iter().map(|o| &o.metadata))
        .chain(objects.deployments.iter().map(|o| &o.metadata));
    for metadata in metadata {
        let labels = metadata.labels.clone().unwrap_or_default();
        for key in [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/component",
            "helm.sh/chart",
        ] {
            assert!(labels.contains_key(key), "{key} on {:?}", metadata.name);
        }
    }
    let spec = objects.daemon_sets[0].spec.as_ref().expect("spec");
    let selector = spec.selector.match_labels.clone().expect("matchLabels");
    let mut keys: Vec<&str> = selector.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["app.kubernetes.io/instance", "app.kubernetes.io/name"]
    );
    let pod_labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .expect("pod labels");
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
}

/// A startup probe and a liveness probe on `/healthz` (the process serves, every hook attached
/// once), readiness on `/readyz` (targets there, tasks alive), all on the metrics port.
fn check_probes(objects: &Objects) {
    let (agent, _) = agent_and_config(objects);
    for (probe, path) in [
        (agent.startup_probe.as_ref(), "/healthz"),
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
    let startup = agent.startup_probe.as_ref().expect("a startup probe");
    let patience = startup.period_seconds.unwrap_or(10) * startup.failure_threshold.unwrap_or(3);
    assert!(patience >= 60, "{patience} s to attach");
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
        let name = objects.daemon_sets[0]
            .metadata
            .name
            .clone()
            .expect("a name");
        let service = objects
            .services
            .iter()
            .find(|s| s.metadata.name == Some(format!("{name}-metrics")))
            .expect("the metrics Service");
        let service_spec = service.spec.as_ref().expect("service spec");
        let selector = service_spec.selector.as_ref().expect("a selector");
        assert!(
            selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
            "{selector:?} selects {pod_labels:?}"
        );
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
        (r#"seccompProfile={"type":"Unconfinde"}"#, "seccompProfile"),
        (r#"collector={"port":"4789"}"#, "got string, want integer"),
        (r#"collector={"formats":["gre"]}"#, "formats"),
        (
            r#"sessions="[[session]]\nname = \"a\"\ninterfaces = [\"veth*\"]\ntarget = { vxlan = { remote = \"@collector\" } }\n""#,
            "collector.service.clusterIP",
        ),
        (
            r#"prometheusRule={"for":"ten minutes"}"#,
            "does not match pattern",
        ),
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
        "--set-json",
        r#"collector={"enabled":true}"#,
        "--set-json",
        r#"prometheusRule={"enabled":true}"#,
    ]));
    check_agreement(&objects, "observability");
    assert_eq!(
        (objects.deployments.len(), objects.prometheus_rules.len()),
        (1, 1)
    );
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
    // A privileged container may escalate; its root file system stays read-only.
    assert_eq!(
        (
            security.allow_privilege_escalation,
            security.read_only_root_filesystem
        ),
        (None, Some(true))
    );
}

/// The values a cluster's conventions need: pull secrets, placement, pod metadata, the update
/// strategy, extra arguments, environment and volumes, and no captures mount when it is off.
#[test]
fn the_chart_takes_the_usual_overrides() {
    let objects = objects(&render(&[
        "--set-json",
        r#"imagePullSecrets=[{"name":"regcred"}]"#,
        "--set-json",
        r#"affinity={"nodeAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":{"nodeSelectorTerms":[{"matchExpressions":[{"key":"mirror","operator":"Exists"}]}]}}}"#,
        "--set-json",
        r#"podAnnotations={"team":"net"}"#,
        "--set-json",
        r#"podLabels={"tier":"node"}"#,
        "--set-json",
        r#"updateStrategy={"type":"OnDelete"}"#,
        "--set-json",
        r#"extraArgs=["--skip-unparsed"]"#,
        "--set-json",
        r#"extraEnv=[{"name":"EXTRA","value":"1"}]"#,
        "--set-json",
        r#"extraVolumes=[{"name":"scratch","emptyDir":{}}]"#,
        "--set-json",
        r#"extraVolumeMounts=[{"name":"scratch","mountPath":"/scratch"}]"#,
        "--set-json",
        r#"captures={"hostPath":""}"#,
        "--set-json",
        r#"seccompProfile={"type":"Localhost","localhostProfile":"mirror-agent.json"}"#,
    ]));
    check_agreement(&objects, "mirror");
    let daemon_set = objects.daemon_sets[0].spec.as_ref().expect("spec");
    assert_eq!(
        daemon_set
            .update_strategy
            .as_ref()
            .and_then(|s| s.type_.as_deref()),
        Some("OnDelete")
    );
    let template = daemon_set.template.metadata.as_ref().expect("metadata");
    assert_eq!(
        template
            .labels
            .as_ref()
            .and_then(|l| l.get("tier"))
            .map(String::as_str),
        Some("node")
    );
    assert_eq!(
        template
            .annotations
            .as_ref()
            .and_then(|a| a.get("team"))
            .map(String::as_str),
        Some("net")
    );
    let pod = objects.agent_pod();
    assert_eq!(
        pod.image_pull_secrets.as_ref().map(|s| s[0].name.as_str()),
        Some("regcred")
    );
    assert!(
        pod.affinity
            .as_ref()
            .is_some_and(|a| a.node_affinity.is_some())
    );
    let (agent, _) = agent_and_config(&objects);
    assert_eq!(
        agent
            .args
            .as_ref()
            .and_then(|a| a.last())
            .map(String::as_str),
        Some("--skip-unparsed")
    );
    assert!(agent.env.iter().flatten().any(|e| e.name == "EXTRA"));
    let mounts: Vec<&str> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(mounts.contains(&"/scratch"), "{mounts:?}");
    assert!(!mounts.contains(&"/var/lib/mirror/captures"), "{mounts:?}");
    let seccomp = agent
        .security_context
        .as_ref()
        .and_then(|s| s.seccomp_profile.as_ref())
        .expect("a seccomp profile");
    assert_eq!(
        (seccomp.type_.as_str(), seccomp.localhost_profile.as_deref()),
        ("Localhost", Some("mirror-agent.json"))
    );
}

#[test]
fn the_default_configuration_is_valid_for_the_agent() {
    let objects = objects(&render(&[]));
    let (agent, config) = agent_and_config(&objects);
    // The image is the one `cargo xtask image` builds.
    assert_eq!(
        agent.image.as_deref(),
        Some(mirror_tests::chart::DEFAULT_IMAGE)
    );
    let stdout = checked_on_a_node("deploy", config);
    assert!(stdout.contains("ok: 1 session(s)"), "{stdout}");
}

/// What `check` says of `config` on a node whose underlay reaches the collector's subnet (the
/// lab's 192.0.2.0/24); it must pass.
fn checked_on_a_node(name: &str, config: &str) -> String {
    let lab = Lab::with_collector(name, 1500);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("config.toml");
    std::fs::write(&file, config).expect("write config");
    let (code, stdout, stderr) = agent_command(
        &lab.node,
        &["check", "--config", file.to_str().expect("utf-8")],
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    stdout
}

/// A session that names `"@collector"` gets the chart's collector's fixed address, the Service
/// has it, and the agent takes the result.
#[test]
fn the_chart_fills_its_collectors_address_into_the_sessions() {
    let objects = objects(&render(&[
        "--set-json",
        r#"collector={"enabled":true,"formats":["geneve"],"service":{"clusterIP":"192.0.2.2"}}"#,
        "--set-json",
        r#"sessions="[[session]]\nname = \"to-collector\"\ninterfaces = [\"src0\"]\ntarget = { geneve = { remote = \"@collector\", vni = 7 } }\n""#,
    ]));
    let (_, config) = agent_and_config(&objects);
    assert!(
        config.contains(r#"target = { geneve = { remote = "192.0.2.2", vni = 7 } }"#),
        "{config}"
    );
    let service = objects
        .services
        .iter()
        .find_map(|s| s.spec.as_ref().filter(|spec| spec.cluster_ip.is_some()))
        .expect("the collector's Service");
    assert_eq!(service.cluster_ip.as_deref(), Some("192.0.2.2"));
    let ports: Vec<(i32, Option<&str>)> = service
        .ports
        .iter()
        .flatten()
        .map(|p| (p.port, p.name.as_deref()))
        .collect();
    assert!(ports.contains(&(6081, Some("geneve"))), "{ports:?}");
    assert!(
        !ports.iter().any(|(_, name)| *name == Some("vxlan")),
        "{ports:?}"
    );
    checked_on_a_node("collector-ip", config);
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
    lab.expect_sink_sentinel_tunnelled(&wire);
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

/// The image (built and run by tests/tests/image.rs) runs what the `DaemonSet` expects: the entry
/// point is the binary the Dockerfile copies in, and its default command is the `DaemonSet`'s
/// arguments but the node's IP for metrics (an address the image cannot know).
#[test]
fn the_dockerfile_runs_the_agent_as_the_daemonset_expects() {
    let instructions = dockerfile();
    let stages: Vec<&String> = instructions
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(
        stages,
        ["${BASE}"],
        "one stage on the base given as a build argument"
    );
    let copy = instructions
        .iter()
        .find(|(k, _)| k == "COPY")
        .map(|(_, a)| a.split_whitespace().collect::<Vec<_>>())
        .expect("a COPY of the binary");
    // `cargo xtask image` puts the binary alone into the build context, by this name.
    assert_eq!(copy[0], "mirror-agent");
    let entrypoint: Vec<String> = instructions
        .iter()
        .find(|(k, _)| k == "ENTRYPOINT")
        .map(|(_, a)| serde_json::from_str(a).expect("exec form"))
        .expect("an entry point");
    assert_eq!(entrypoint, [copy[1]]);
    let objects = objects(&render(&[]));
    let (agent, _) = agent_and_config(&objects);
    assert_eq!(agent.command, None, "the image's entry point runs");
    let cmd: Vec<String> = instructions
        .iter()
        .find(|(k, _)| k == "CMD")
        .map(|(_, a)| serde_json::from_str(a).expect("exec form"))
        .expect("a default command");
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
/// It is not started with `systemd-run`: these machines' PID 1 is not systemd, so there is no
/// service manager to start it (the agent under the same capabilities is tested above).
#[test]
fn the_systemd_unit_is_valid_and_grants_what_the_daemonset_grants() {
    let unit = std::fs::read_to_string(format!("{DEPLOY}/systemd/mirror-agent.service"))
        .expect("the unit");
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("mirror-agent.service");
    std::fs::write(
        &copy,
        unit.replace(
            "ExecStart=mirror-agent ",
            &format!("ExecStart={} ", agent_binary().display()),
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
    assert!(value("ExecStart").starts_with("mirror-agent run --config /etc/mirror/config.toml"));
}
