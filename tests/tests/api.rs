//! The running agent's API: the Unix socket (root-only) with `status` and `stats` through the CLI,
//! and Prometheus `/metrics`, `/healthz` on a TCP address, all agreeing with the final report.
use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
};

use mirror_tests::{
    Capture, Lab, SINK_V4, SRC_V4, agent_command, check_openmetrics, copied, pin_to_first_cpu,
    session_config, udp_socket,
};

/// `GET path` on the metrics address from inside the node's namespace.
fn http_get(lab: &Lab, address: SocketAddr, path: &str) -> (String, String) {
    mirror_tests::http_get(&lab.node, address, path)
}

/// `stats --watch --json`: three readings of the stream, every counter of the session, rates
/// from the second reading on, at the interval asked for.
fn check_stream(lab: &Lab, socket_arg: &str) {
    let (code, stream, stderr) = agent_command(
        &lab.node,
        &[
            "stats",
            "--watch",
            "--json",
            "--interval",
            "0.2",
            "--count",
            "3",
            "--api-socket",
            socket_arg,
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<serde_json::Value> = stream
        .lines()
        .map(|l| serde_json::from_str(l).expect("an NDJSON line"))
        .collect();
    assert_eq!(lines.len(), 3, "{stream}");
    let mut last_ms = 0;
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            line["stats"]["sessions"][0]["counters"]["mirrored"], 8,
            "{line}"
        );
        let ms = line["unix_ms"].as_u64().expect("unix_ms");
        assert!(ms >= last_ms + if i == 0 { 0 } else { 150 }, "{stream}");
        last_ms = ms;
        let rates = line["rates"].as_array().expect("rates");
        assert_eq!(rates.len(), usize::from(i != 0), "{line}");
    }
    assert_eq!(lines[2]["rates"][0]["mirrored_per_second"], 0.0);
}

/// With `metrics_json_routes`, the read-only JSON routes are on the metrics address too; reloads
/// are only on the socket.
fn check_tcp_json_routes(lab: &Lab, metrics: SocketAddr) {
    let (line, body) = http_get(lab, metrics, "/status");
    assert!(line.contains(" 200 "), "{line}");
    let shown: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    assert_eq!(shown["generation"], 1);
    // Only the programs the hooks use are loaded: the session watches ingress alone.
    let programs: Vec<&str> = shown["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|program| program[0].as_str())
        .collect();
    assert_eq!(programs, ["mirror_tc_ingress", "mirror_tc_copy"], "{body}");
    assert!(
        shown["programs"][0][1].as_u64().is_some_and(|id| id > 0),
        "{body}"
    );
    let (line, _) = http_get(lab, metrics, "/reload");
    assert!(line.contains(" 404 "), "{line}");
}

/// `/metrics` of the test below: its counters, and valid `OpenMetrics` text with a family for
/// every counter the kernel keeps (rules' and hooks'; or a reason of the copies not sent).
fn check_metrics(lab: &Lab, metrics: SocketAddr) {
    let (line, body) = http_get(lab, metrics, "/metrics");
    assert!(line.contains(" 200 "), "{line}");
    for expected in [
        "mirror_rule_copies_total{session=\"t\",rule=\"10\"} 7",
        "mirror_rule_matched_packets_total{session=\"t\",rule=\"10\"} 7",
        "mirror_rule_copied_bytes_total{session=\"t\",rule=\"10\"} 504",
        "mirror_rule_matched_bytes_total{session=\"t\",rule=\"10\"} 504",
        "mirror_rule_copies_not_sent_total{session=\"t\",rule=\"10\",reason=\"too_big\"} 0",
        "mirror_attached_hooks{session=\"t\",interface=\"src0\",direction=\"ingress\"} 1",
        "mirror_hook_step_limit_packets_total{hook=\"ingress\"} 0",
        "mirror_build_info{version=\"0.1.0\"} 1",
        "mirror_config_generation 1",
        "mirror_config_last_reload_success 1",
        "mirror_config_last_reload_timestamp_seconds 0",
        "mirror_target_tx_dropped_packets_total{interface=\"mir0\"} 0",
        "# EOF",
    ] {
        assert!(body.contains(expected), "{expected} in:\n{body}");
    }
    let families = check_openmetrics(&body, "mirror_");
    for field in mirror_common::Counters::FIELDS
        .iter()
        .chain(mirror_common::HookCounters::FIELDS)
    {
        if let mirror_common::Metric::Own(name) = field.metric {
            assert!(
                families.iter().any(|f| f == &format!("mirror_{name}")),
                "{name}"
            );
        }
    }
}

#[test]
fn the_api_socket_and_metrics_agree_with_the_final_report() {
    let lab = Lab::new("api");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let socket_arg = socket.to_str().expect("utf-8");
    let metrics: SocketAddr = "127.0.0.1:9477".parse().expect("address");
    let config = format!(
        "api_socket = \"{socket_arg}\"\nmetrics_address = \"{metrics}\"\nmetrics_json_routes = true\n{}",
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
    // Ethernet, IPv4 and UDP headers around 30 bytes of payload, seven times.
    assert_eq!(rule_10["counters"]["matched_bytes"], 7 * 72);
    assert_eq!(rule_10["counters"]["mirrored_bytes"], 7 * 72);

    let (code, table, stderr) = agent_command(&lab.node, &["stats", "--api-socket", socket_arg]);
    assert_eq!(code, 0, "{stderr}");
    assert!(table.lines().any(|l| l.starts_with("t ")), "{table}");

    let (code, shown, stderr) = agent_command(&lab.node, &["status", "--api-socket", socket_arg]);
    assert_eq!(code, 0, "{stderr}");
    assert!(shown.contains("1 hook(s) attached"), "{shown}");
    assert!(shown.contains("src0/ingress"), "{shown}");
    assert!(shown.contains("interface mir0"), "{shown}");
    assert!(shown.contains("programs: mirror_tc_ingress="), "{shown}");

    let (line, body) = http_get(&lab, metrics, "/healthz");
    assert!(line.contains(" 200 "), "{line}");
    assert_eq!(body, "ok\n");
    check_tcp_json_routes(&lab, metrics);
    check_metrics(&lab, metrics);
    check_stream(&lab, socket_arg);

    // A stream still open does not hold the agent up when it stops; the stream then ends.
    let mut open_stream = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.node.name])
        .arg(mirror_tests::agent_binary())
        .args(["stats", "--watch", "--json", "--api-socket", socket_arg])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("stream client");
    let mut stream_out = std::io::BufReader::new(open_stream.stdout.take().expect("stdout"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stream_out, &mut first).expect("the stream's first line");
    assert!(first.contains("\"unix_ms\""), "{first}");
    let report = agent.stop();
    let mut rest = String::new();
    stream_out
        .read_to_string(&mut rest)
        .expect("the stream ends");
    let ended = open_stream.wait().expect("the stream client ends");
    assert!(ended.success(), "{ended:?}");
    assert_eq!(report.rule("t", "10"), copied(7, 7));
    assert!(!socket.exists(), "the socket is removed on exit");
    let (code, _, stderr) = agent_command(&lab.node, &["status", "--api-socket", socket_arg]);
    assert_ne!(code, 0);
    assert!(stderr.contains("is the agent running?"), "{stderr}");
}

/// A client that sends half a request and waits does not hold the agent up: SIGTERM ends it
/// within seconds (the connection is cut after the grace period), with its report.
#[test]
fn a_half_sent_request_does_not_hold_up_a_stop() {
    let lab = Lab::new("apihalf");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let metrics: SocketAddr = "127.0.0.1:9477".parse().expect("address");
    let agent = lab.start_agent(&format!(
        "api_socket = \"{}\"\nmetrics_address = \"{metrics}\"\n{}",
        socket.to_str().expect("utf-8"),
        session_config("[\"src0\"]", "ingress", "")
    ));
    let half = b"GET /status HTTP/1.1\r\nHost: x\r\n";
    let mut on_socket = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
    on_socket.write_all(half).expect("half a request");
    let mut on_tcp = lab
        .node
        .enter(move || TcpStream::connect(metrics).expect("connect to the metrics address"));
    on_tcp.write_all(half).expect("half a request");
    let (report, took) = agent.stop_within(libc::SIGTERM, std::time::Duration::from_secs(5));
    println!("stopped {took:?} after SIGTERM");
    assert!(
        report.json()["stats"]["sessions"].is_array(),
        "{}",
        report.0
    );
    assert!(!socket.exists(), "the socket is removed");
}

/// Something at the API socket's path that is not a socket (a file someone left or planted) is
/// refused and left as it was: only a stale socket is replaced.
#[test]
fn a_file_at_the_socket_path_is_left_alone() {
    let lab = Lab::new("apifile");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("agent.sock");
    std::fs::write(&path, b"not a socket").expect("write");
    let path_arg = path.to_str().expect("utf-8");
    let (code, _, stderr) = agent_command(
        &lab.node,
        &[
            "run",
            "--iface",
            "src0",
            "--to",
            "mir0",
            "--api-socket",
            path_arg,
        ],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("exists and is not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&path).expect("still there"), b"not a socket");
    assert_eq!(
        mirror_tests::tcx_programs(&lab.node, "src0"),
        [Vec::<String>::new(), Vec::new()],
        "nothing attached"
    );
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .expect("VmRSS")
}

/// `GET /healthz` as kubelet asks it: one second to answer.
fn probe(lab: &Lab, address: SocketAddr) -> String {
    lab.node.enter(move || {
        let mut stream = TcpStream::connect_timeout(&address, std::time::Duration::from_secs(1))
            .expect("connect for the probe");
        let limit = Some(std::time::Duration::from_secs(1));
        stream.set_read_timeout(limit).expect("timeout");
        stream
            .write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
            .expect("probe");
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .expect("the probe's answer within 1 s");
        response
    })
}

/// What was found on the metrics port when it was attacked: a client that opens hundreds of
/// connections each sending a huge unfinished header, and ten clients that read the counters of
/// 8,000 rules as fast as the API lets them. The agent's memory stays bounded, the liveness probe
/// (from another address) answers within its second, and the JSON routes are not served unless
/// asked for.
#[test]
fn the_metrics_listener_holds_out_against_floods_of_connections_headers_and_readers() {
    let lab = Lab::new("apiflood");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let socket_arg = socket.to_str().expect("utf-8").to_owned();
    let mut rules = String::new();
    for number in 2..=8000 {
        write!(
            rules,
            "[[session.rule]]\nnumber = {number}\naction = \"mirror\"\nproto = \"udp\"\ndst_port = {number}\n"
        )
        .expect("to a String");
    }
    let agent = lab.start_agent(&format!(
        "api_socket = \"{socket_arg}\"\nmetrics_address = \"0.0.0.0:9477\"\n{}",
        session_config("[\"src0\"]", "ingress", &rules)
    ));
    let probed: SocketAddr = "127.0.0.1:9477".parse().expect("address");
    let (line, _) = http_get(&lab, probed, "/status");
    assert!(
        line.contains(" 404 "),
        "JSON routes are off by default: {line}"
    );
    let before = rss_kib(agent.pid());

    // The readers, on the socket.
    let stop_readers = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..10)
        .map(|_| {
            let mut stream = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
            stream
                .write_all(b"GET /stats/stream?interval_ms=0 HTTP/1.0\r\n\r\n")
                .expect("request");
            let stop = stop_readers.clone();
            std::thread::spawn(move || {
                let mut buffer = vec![0; 1 << 16];
                let mut total = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match stream.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n,
                    }
                }
                total
            })
        })
        .collect();
    // The attacker, from the source host's address.
    let target: SocketAddr = (std::net::Ipv4Addr::new(10, 10, 1, 1), 9477).into();
    let attack = lab.src.enter(move || {
        let header = format!("GET / HTTP/1.1\r\nX-Padding: {}", "a".repeat(380 * 1024));
        let mut open = Vec::new();
        for _ in 0..300 {
            let Ok(mut stream) = TcpStream::connect(target) else {
                continue;
            };
            stream.set_nonblocking(true).expect("nonblocking");
            let _ = stream.write(header.as_bytes());
            open.push(stream);
        }
        open
    });
    println!("{} attacking connections open", attack.len());
    for _ in 0..5 {
        let answer = probe(&lab, probed);
        assert!(answer.starts_with("HTTP/1.0 200 "), "{answer}");
    }
    let grown = rss_kib(agent.pid()).saturating_sub(before);
    println!("agent RSS {before} KiB, grown by {grown} KiB");
    // The readers' documents in flight (8,000 rules' counters each) and the allocator's arenas
    // took 25 to 37 MiB in runs on this VM; buffering the attackers' headers would take 300 ×
    // 380 KiB, over 100 MiB.
    assert!(grown < 64 * 1024, "the agent grew by {grown} KiB");
    stop_readers.store(true, std::sync::atomic::Ordering::Relaxed);
    let (_, took) = agent.stop_within(libc::SIGTERM, std::time::Duration::from_secs(5));
    println!("stopped {took:?} after SIGTERM");
    for reader in readers {
        let read = reader.join().expect("reader");
        assert!(read > 0, "a reader got counters");
    }
    drop(attack);
}
