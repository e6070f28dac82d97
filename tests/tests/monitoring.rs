//! What the Helm chart adds for monitoring and receiving: the `PrometheusRule`'s alerts (checked
//! and unit-tested by Prometheus' own promtool, against metrics the agent exports) and the
//! collector's `Deployment` and `Service` (run here as they run it).
use std::net::SocketAddr;

use k8s_openapi::api::core::v1::Container;
use mirror_tests::{
    Lab, NODE_SRC_MAC, SENTINEL_RULE, SRC_MAC, agent_binary,
    chart::{Objects, objects, render},
    udp_v4_frame,
};

/// Alert unit tests for `promtool test rules`: each alert fires on the series it is meant for,
/// with the labels and summary it names, and not before its `for`. `DESCRIPTION(name)` stands
/// for that alert's description (no templates in it).
const ALERT_TESTS: &str = r#"rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'mirror_hook_table_error_packets_total{instance="n1",hook="ingress"}'
        values: '0 0 1 1 1'
      - series: 'mirror_hook_step_limit_packets_total{instance="n1",hook="ingress"}'
        values: '0x4'
      - series: 'mirror_hook_copy_errors_total{instance="n1",hook="ingress"}'
        values: '0x4'
      - series: 'mirror_config_last_reload_success{instance="n1"}'
        values: '1 1 0 0 0'
      - series: 'mirror_rule_copies_not_sent_total{instance="n1",session="web",rule="10",reason="no_route"}'
        values: '0+10x30'
      - series: 'mirror_rule_copies_not_sent_total{instance="n1",session="web",rule="10",reason="sampled_out"}'
        values: '0+10x30'
    alert_rule_test:
      - eval_time: 1m
        alertname: MirrorUnexpectedErrors
        exp_alerts: []
      - eval_time: 4m
        alertname: MirrorUnexpectedErrors
        exp_alerts:
          - exp_labels: {severity: critical, instance: n1, hook: ingress}
            exp_annotations:
              summary: 'mirror: errors that are never expected at the ingress hook on n1'
              description: 'DESCRIPTION(MirrorUnexpectedErrors)'
      - eval_time: 4m
        alertname: MirrorReloadRejected
        exp_alerts:
          - exp_labels: {severity: warning, instance: n1}
            exp_annotations:
              summary: 'mirror: the agent on n1 rejected its new configuration and runs the previous one'
              description: 'DESCRIPTION(MirrorReloadRejected)'
      - eval_time: 8m
        alertname: MirrorCopiesNotSent
        exp_alerts: []
      - eval_time: 20m
        alertname: MirrorCopiesNotSent
        exp_alerts:
          - exp_labels: {severity: warning, instance: n1, session: web, reason: no_route}
            exp_annotations:
              summary: 'mirror: session web on n1 loses copies (no_route)'
              description: 'DESCRIPTION(MirrorCopiesNotSent)'
  # Observed services: one steady and then flooded (10 a minute for 70 minutes, then 3,000),
  # one failing 1 in 11 at about 2 a second, one failing half of its few requests.
  - interval: 1m
    input_series:
      - series: 'mirror_http_requests_total{instance="n1",session="web",service="10.0.0.2:80",method="GET",status_class="2xx"}'
        values: '0+10x70 3700+3000x15'
      - series: 'mirror_http_requests_total{instance="n1",session="web",service="10.0.0.3:80",method="GET",status_class="2xx"}'
        values: '0+100x85'
      - series: 'mirror_http_requests_total{instance="n1",session="web",service="10.0.0.3:80",method="POST",status_class="5xx"}'
        values: '0+10x85'
      - series: 'mirror_http_requests_total{instance="n1",session="web",service="10.0.0.4:80",method="GET",status_class="2xx"}'
        values: '0+1x85'
      - series: 'mirror_http_requests_total{instance="n1",session="web",service="10.0.0.4:80",method="GET",status_class="unanswered"}'
        values: '0+1x85'
    alert_rule_test:
      - eval_time: 70m
        alertname: MirrorRequestSurge
        exp_alerts: []
      - eval_time: 74m
        alertname: MirrorRequestSurge
        exp_alerts: []
      - eval_time: 80m
        alertname: MirrorRequestSurge
        exp_alerts:
          - exp_labels: {severity: warning, instance: n1, session: web, service: '10.0.0.2:80'}
            exp_annotations:
              summary: 'mirror: 10.0.0.2:80 (session web, on n1) gets 50 requests a second, over 3 times its usual rate'
              description: 'DESCRIPTION(MirrorRequestSurge)'
      - eval_time: 4m
        alertname: MirrorServiceErrors
        exp_alerts: []
      - eval_time: 20m
        alertname: MirrorServiceErrors
        exp_alerts:
          - exp_labels: {severity: warning, instance: n1, session: web, service: '10.0.0.3:80'}
            exp_annotations:
              summary: 'mirror: 10.0.0.3:80 (session web, on n1) fails 9.091% of its requests'
              description: 'DESCRIPTION(MirrorServiceErrors)'
"#;

/// Families the agent exports only in some situations: pod-selector sessions
/// (tests/tests/pods.rs checks it), a task that ended with an error and observed sessions.
const SOMETIMES_EXPORTED: &[&str] = &[
    "mirror_selected_pods",
    "mirror_task_failed",
    // Observed sessions (tests/tests/observe.rs checks them).
    "mirror_http_requests",
];

/// The chart's `PrometheusRule`: Prometheus' own checker takes its rules, its unit tests fire
/// them as meant ([`ALERT_TESTS`]), and every metric they name is one the agent exports (scraped
/// from an agent with an interface target and a file target).
#[test]
fn the_alerts_are_valid_fire_as_meant_and_name_exported_metrics() {
    let objects = objects(&render(&[
        "--set-json",
        r#"prometheusRule={"enabled":true,"labels":{"release":"prom"}}"#,
    ]));
    let rule = &objects.prometheus_rules[0];
    assert_eq!(rule["metadata"]["labels"]["release"].as_str(), Some("prom"));
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_norway::to_string(&rule["spec"]).expect("YAML"),
    )
    .expect("rules");
    let mut tests = ALERT_TESTS.to_owned();
    for rule in rule["spec"]["groups"][0]["rules"]
        .as_sequence()
        .expect("rules")
    {
        let alert = rule["alert"].as_str().expect("an alert");
        let description = rule["annotations"]["description"]
            .as_str()
            .expect("a description");
        tests = tests.replace(
            &format!("DESCRIPTION({alert})"),
            &description.replace('\'', "''"),
        );
    }
    std::fs::write(dir.path().join("tests.yaml"), tests).expect("tests");
    promtool(dir.path(), &["check", "rules", "rules.yaml"]);
    promtool(dir.path(), &["test", "rules", "tests.yaml"]);

    let lab = Lab::new("alerts");
    let capture = dir.path().join("copies.pcap");
    let metrics: SocketAddr = "127.0.0.1:9477".parse().expect("address");
    let agent = lab.start_agent(&format!(
        "metrics_address = \"{metrics}\"\n{}[[session]]\nname = \"file\"\ninterfaces = [\"src0\"]\ntarget = {{ file = \"{}\" }}\n{SENTINEL_RULE}",
        mirror_tests::session_config("[\"src0\"]", "ingress", ""),
        capture.display()
    ));
    let (_, body) = mirror_tests::http_get(&lab.node, metrics, "/metrics");
    let families = mirror_tests::check_openmetrics(&body, "mirror_");
    drop(agent);
    let named: std::collections::BTreeSet<String> = rule["spec"]["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|group| group["rules"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|rule| rule["expr"].as_str().map(str::to_owned))
        .flat_map(|expr| {
            expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|word| word.starts_with("mirror_"))
                .map(|word| word.strip_suffix("_total").unwrap_or(word).to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(named.len() >= 8, "{named:?}");
    // The README's table of metrics names every family the agent exports.
    let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
    let table: Vec<&str> = readme
        .lines()
        .filter(|line| line.starts_with("| `mirror_"))
        .collect();
    for family in &families {
        assert!(
            table.iter().any(|row| {
                row.split('|').nth(1).is_some_and(|names| {
                    names.contains(&format!("`{family}`"))
                        || names.contains(&format!("`{family}_total`"))
                        || names.contains(&format!("`{family}_seconds`"))
                })
            }),
            "{family} is not in the README's table of metrics"
        );
    }
    for family in &named {
        assert!(
            families.contains(family) || SOMETIMES_EXPORTED.contains(&family.as_str()),
            "{family} is not among the agent's metrics: {families:?}"
        );
    }
}

/// The Grafana dashboard (deploy/grafana): every query is valid `PromQL` (promtool checks it as a
/// recording rule), and names only metrics of the README's table.
#[test]
fn the_grafana_dashboard_queries_are_valid_and_name_documented_metrics() {
    use std::fmt::Write as _;
    let dashboard: serde_json::Value = serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/mirror-services.json"
    )))
    .expect("the dashboard's JSON");
    let queries: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| {
            target["expr"]
                .as_str()
                .expect("an expression")
                .replace("$session", ".*")
        })
        .collect();
    assert!(queries.len() >= 4, "{queries:?}");
    let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
    let documented = |metric: &str| {
        readme
            .lines()
            .filter(|line| line.starts_with("| `mirror_"))
            .any(|row| row.contains(&format!("`{metric}`")))
    };
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in queries.iter().enumerate() {
        for metric in query
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("mirror_"))
        {
            let family = metric.strip_suffix("_bucket").unwrap_or(metric);
            assert!(documented(family), "{family} is not in the README's table");
        }
        let _ = writeln!(
            rules,
            "      - record: dashboard:query_{i}\n        expr: '{}'",
            query.replace('\'', "''")
        );
    }
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("dashboard.yaml"), &rules).expect("rules");
    promtool(dir.path(), &["check", "rules", "dashboard.yaml"]);
}

/// Runs Prometheus' promtool with `args` in `dir`; fails the test with its output unless it
/// succeeds.
fn promtool(dir: &std::path::Path, args: &[&str]) {
    let output = std::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian's prometheus, from `cargo xtask setup`)");
    assert!(
        output.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The collector's objects: the Service reaches the container's ports by name and selects its
/// pods; the container runs as nobody with no capabilities and a read-only root. Its container
/// and where its captures volume is mounted.
fn check_collector_objects(objects: &Objects) -> (&Container, String) {
    let deployment = objects.deployments[0].spec.as_ref().expect("spec");
    let pod = deployment.template.spec.as_ref().expect("pod spec");
    let collector = &pod.containers[0];
    let service = objects
        .services
        .iter()
        .find(|s| s.metadata.name == objects.deployments[0].metadata.name)
        .and_then(|s| s.spec.as_ref())
        .expect("the collector's Service");
    let pod_labels = deployment
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .expect("labels");
    let selector = service.selector.clone().expect("a selector");
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));
    assert_eq!(deployment.selector.match_labels.as_ref(), Some(&selector));
    for port in service.ports.iter().flatten() {
        let target = match port.target_port.as_ref() {
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name)) => name,
            other => panic!("a named target port: {other:?}"),
        };
        let container_port = collector
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_ref() == Some(target))
            .expect("the container's port");
        assert_eq!(
            (port.port, port.protocol.as_deref()),
            (
                container_port.container_port,
                container_port.protocol.as_deref()
            )
        );
    }
    let pod_security = pod.security_context.as_ref().expect("pod security context");
    assert_eq!(
        (pod_security.run_as_non_root, pod_security.run_as_user),
        (Some(true), Some(65534))
    );
    let security = collector
        .security_context
        .as_ref()
        .expect("security context");
    assert_eq!(
        (
            security.read_only_root_filesystem,
            security.allow_privilege_escalation
        ),
        (Some(true), Some(false))
    );
    assert_eq!(
        security.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );
    let captures = collector
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "captures")
        .map(|m| m.mount_path.clone())
        .expect("the captures mount");
    (collector, captures)
}

/// The collector's `Deployment` and `Service` ([`check_collector_objects`]), and the collector
/// run here as they run it (its arguments, its user, no capabilities): it takes VXLAN and GENEVE
/// copies from the node, writes them into its captures volume and counts them on its metrics
/// port, which its probes use.
#[test]
fn the_collector_deployment_receives_as_nobody_without_capabilities() {
    let objects = objects(&render(&[
        "--set-json",
        r#"collector={"enabled":true,"allow":["192.0.2.0/24"],"vni":[7],"formats":["vxlan","geneve"]}"#,
    ]));
    let (collector, captures) = check_collector_objects(&objects);

    // Its arguments, with the captures volume a directory nobody owns here.
    let lab = Lab::with_collector("collectdep", 1500);
    let dir = tempfile::tempdir().expect("temp dir");
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).expect("chown");
    let args: Vec<String> = collector
        .args
        .iter()
        .flatten()
        .map(|a| a.replace(&captures, &dir.path().display().to_string()))
        .collect();
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.col().name])
        .args([
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
        ])
        .args(["--bounding-set", "-all", "--inh-caps", "-all"])
        .arg(agent_binary())
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the collector under setpriv");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut line).expect("the collector's output");
    assert!(line.contains("listening on"), "{line:?}");
    let metrics_port = collector
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .map(|p| u16::try_from(p.container_port).expect("a port"))
        .expect("the metrics port");
    let metrics = SocketAddr::from((mirror_tests::COL_V4, metrics_port));
    let probe = collector
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .and_then(|g| g.path.clone())
        .expect("a readiness probe");
    assert!(
        mirror_tests::http_get(lab.col(), metrics, &probe)
            .0
            .contains(" 200 ")
    );

    let inner = udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 7000, &[7; 64]);
    // VNI 7 in VXLAN (RFC 7348) and in GENEVE (RFC 8926: no options, Ethernet inside).
    let datagrams = [
        (vec![0x08, 0, 0, 0, 0, 0, 7, 0], 4789),
        (vec![0, 0, 0x65, 0x58, 0, 0, 7, 0], 6081),
    ]
    .map(|(mut datagram, port)| {
        datagram.extend_from_slice(&inner);
        (datagram, port)
    });
    let sender = mirror_tests::udp_socket(
        &lab.node,
        SocketAddr::new(mirror_tests::NODE_UL_V4.into(), 0),
    );
    let deadline = std::time::Instant::now() + mirror_tests::DEADLINE;
    let body = loop {
        for (datagram, port) in &datagrams {
            sender
                .send_to(datagram, (mirror_tests::COL_V4, *port))
                .expect("send");
        }
        let (_, body) = mirror_tests::http_get(lab.col(), metrics, "/metrics");
        if ["vxlan:7", "geneve:7"].iter().all(|stream| {
            body.contains(&format!(
                "mirror_collect_frames_total{{stream=\"{stream}\"}}"
            ))
        }) {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    mirror_tests::check_openmetrics(&body, "mirror_collect_");
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(child.id().cast_signed(), libc::SIGTERM) };
    assert!(child.wait().expect("the collector").success());
    let written = mirror_tests::capture_file_frames(&dir.path().join("copies-000001.pcapng"));
    assert!(!written.is_empty() && written.iter().all(|(_, frame)| *frame == inner));
}
