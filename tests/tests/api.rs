//! The running agent's API: the Unix socket (root-only) with `status` and `stats` through the CLI,
//! and Prometheus `/metrics`, `/healthz` on a TCP address, all agreeing with the final report.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
};

use mirror_tests::{
    Capture, Counts, Lab, SINK_V4, SRC_V4, agent_command, pin_to_first_cpu, session_config,
    udp_socket,
};

/// `GET path` over HTTP/1.0 from inside the node's namespace: the status line and the body.
fn http_get(lab: &Lab, address: SocketAddr, path: &str) -> (String, String) {
    let request = format!("GET {path} HTTP/1.0\r\n\r\n");
    let response = lab.node.enter(move || {
        let mut stream = TcpStream::connect(address).expect("connect to the metrics address");
        stream.write_all(request.as_bytes()).expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        response
    });
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

#[test]
fn the_api_socket_and_metrics_agree_with_the_final_report() {
    let lab = Lab::new("api");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let socket_arg = socket.to_str().expect("utf-8");
    let metrics: SocketAddr = "127.0.0.1:9464".parse().expect("address");
    let config = format!(
        "api_socket = \"{socket_arg}\"\nmetrics_address = \"{metrics}\"\n{}",
        session_config(
            "[\"src0\"]",
            "ingress",
            "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n"
        )
    );
    let agent = lab.start_agent(&config);
    let copies = Capture::open(&lab.mon, "eth0");
    let _receiver = udp_socket(&lab.sink, SocketAddr::new(SINK_V4.into(), 5555));
    let sender = udp_socket(&lab.src, SocketAddr::new(SRC_V4.into(), 0));
    pin_to_first_cpu();
    for i in 0..7u8 {
        sender.send_to(&[i; 30], (SINK_V4, 5555)).expect("send");
    }
    lab.send_sentinel();
    assert_eq!(copies.until_sentinel().len(), 7);

    // The socket is root-only.
    let meta = std::fs::metadata(&socket).expect("the API socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let (code, stdout, stderr) =
        agent_command(&lab.node, &["stats", "--json", "--api-socket", socket_arg]);
    assert_eq!(code, 0, "{stderr}");
    let stats: serde_json::Value = serde_json::from_str(&stdout).expect("stats JSON");
    let session = &stats["sessions"][0];
    assert_eq!(session["name"], "t");
    let rule_10 = session["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| r["rule"] == "10")
        .expect("rule 10");
    assert_eq!(rule_10["counters"]["matched"], 7);
    assert_eq!(rule_10["counters"]["mirrored"], 7);

    let (code, table, stderr) = agent_command(&lab.node, &["stats", "--api-socket", socket_arg]);
    assert_eq!(code, 0, "{stderr}");
    assert!(table.lines().any(|l| l.starts_with("t ")), "{table}");

    let (code, shown, stderr) = agent_command(&lab.node, &["status", "--api-socket", socket_arg]);
    assert_eq!(code, 0, "{stderr}");
    assert!(shown.contains("1 hook(s) attached"), "{shown}");
    assert!(shown.contains("src0/ingress"), "{shown}");
    assert!(shown.contains("interface mir0"), "{shown}");

    let (line, body) = http_get(&lab, metrics, "/healthz");
    assert!(line.contains(" 200 "), "{line}");
    assert_eq!(body, "ok\n");
    let (line, body) = http_get(&lab, metrics, "/metrics");
    assert!(line.contains(" 200 "), "{line}");
    for expected in [
        "mirror_rule_copies_total{session=\"t\",rule=\"10\"} 7",
        "mirror_rule_matched_packets_total{session=\"t\",rule=\"10\"} 7",
        "mirror_rule_copies_not_sent_total{session=\"t\",rule=\"10\",reason=\"too_big\"} 0",
        "mirror_attached_hooks{session=\"t\",interface=\"src0\",direction=\"ingress\"} 1",
        "# EOF",
    ] {
        assert!(body.contains(expected), "{expected} in:\n{body}");
    }

    let report = agent.stop();
    assert_eq!(report.rule("t", "10"), Counts::copied(7, 7));
    assert!(!socket.exists(), "the socket is removed on exit");
    let (code, _, stderr) = agent_command(&lab.node, &["status", "--api-socket", socket_arg]);
    assert_ne!(code, 0);
    assert!(stderr.contains("is the agent running?"), "{stderr}");
}
