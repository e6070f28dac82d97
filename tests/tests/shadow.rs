//! Shadow targets: real clients (curl, ab, a raw pipelining client) against a live origin in one
//! namespace, the agent beside it replaying what it sees to a recording shadow, and the shadow's
//! requests compared with the live ones byte for byte.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use mirror_tests::{
    Agent, Collector, Netns, Origin, agent_binary, require_root, wait_for, wait_for_state,
};

static NEXT: AtomicU32 = AtomicU32::new(0);

const LIVE: &str = "10.77.0.2:8080";
const SHADOW: &str = "127.0.0.1:9090";

/// A client namespace and a server namespace on one veth (`c0` ── `s0`); the live origin listens
/// in the server's, where the agent watches `s0` and the shadow listens on its loopback.
struct ShadowLab {
    id: String,
    client: Netns,
    server: Netns,
    /// Holds the agent's API socket.
    dir: tempfile::TempDir,
}

impl ShadowLab {
    fn new(test: &str) -> Self {
        require_root();
        let id = format!(
            "s{}-{}-{test}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let client = Netns::new(format!("{id}-cli"));
        let server = Netns::new(format!("{id}-srv"));
        client.veth_to("c0", "10.77.0.1/24", &server, "s0", "10.77.0.2/24");
        ShadowLab {
            id,
            client,
            server,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn agent(&self, shadow: &str, top: &str) -> Agent {
        self.agent_to(
            &format!("shadow = {{ url = \"http://{SHADOW}\", {shadow} }}"),
            top,
        )
    }

    /// The agent watching the live service, its session's target `target`.
    fn agent_to(&self, target: &str, top: &str) -> Agent {
        let api = self.api();
        let config = format!(
            "api_socket = \"{api}\"\n{top}\n[[session]]\nname = \"web\"\ninterfaces = [\"s0\"]\nfilter = \"tcp port 8080\"\ntarget = {{ {target} }}\n"
        );
        Agent::start(&self.server, &agent_binary(), &config)
    }

    /// A third namespace, the collector's node: `s1` (10.78.0.1) in the server's, `k0`
    /// (10.78.0.2) in it.
    fn collector_node(&self) -> Netns {
        let node = Netns::new(format!("{}-col", self.id));
        self.server
            .veth_to("s1", "10.78.0.1/24", &node, "k0", "10.78.0.2/24");
        node
    }

    /// A recording origin at `addr` in the server's namespace (see [`Origin::start`]).
    fn origin(&self, addr: &str, changed: bool, delay: Duration) -> Origin {
        Origin::start(&self.server, addr.parse().expect("addr"), changed, delay)
    }

    /// Writes `bytes` to a file and gives curl's `--data-binary` argument for it.
    fn upload(&self, bytes: &[u8]) -> String {
        format!("@{}", self.file("upload.bin", bytes))
    }

    /// Writes `bytes` to file `name` in the lab's directory; its path.
    fn file(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).expect("lab file");
        path.display().to_string()
    }

    fn api(&self) -> String {
        self.dir.path().join("agent.sock").display().to_string()
    }

    /// Runs a client program in the client namespace; its stdout.
    fn client(&self, program: &[&str]) -> String {
        self.client.exec(program)
    }
}

/// The session's shadow figures now, from the agent's API.
fn shadow_now(api: &str) -> serde_json::Value {
    let stats: serde_json::Value =
        serde_json::from_str(&mirror_tests::api_get(api, "/stats")).expect("stats");
    stats["sessions"][0]["shadow"].clone()
}

/// Exchanges compared so far, same or not.
fn compared(shadow: &serde_json::Value) -> u64 {
    ["same", "differ"]
        .iter()
        .filter_map(|k| shadow["compared"][k].as_u64())
        .sum()
}

/// Writes `count` requests at once on one connection and reads their answers.
fn pipeline(lab: &ShadowLab, count: usize) {
    let live: SocketAddr = LIVE.parse().expect("addr");
    lab.client.enter(move || {
        let mut stream = TcpStream::connect(live).expect("connect");
        let requests = (0..count)
            .map(|i| {
                [
                    "GET /pipelined/",
                    &i.to_string(),
                    " HTTP/1.1\r\nHost: live\r\n\r\n",
                ]
                .concat()
            })
            .collect::<String>();
        stream.write_all(requests.as_bytes()).expect("write");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut answers = Vec::new();
        let mut chunk = [0; 4096];
        while answers.windows(8).filter(|w| w == b"HTTP/1.1").count() < count {
            let n = stream.read(&mut chunk).expect("read");
            assert_ne!(n, 0, "the live origin closed early");
            answers.extend_from_slice(&chunk[..n]);
        }
    });
}

/// A wrk script: one connection's thread stops after its 100th answer, so that no request is
/// left unanswered when wrk closes the connection (at the end of its `-d`, which it waits out).
const WRK_STOP_AFTER_100: &str = "local answers = 0
function response()
  answers = answers + 1
  if answers == 100 then wrk.thread:stop() end
end
";

#[test]
fn the_shadow_receives_what_the_live_service_received() {
    let lab = ShadowLab::new("same");
    let live = lab.origin(LIVE, false, Duration::ZERO);
    let shadow = lab.origin(SHADOW, false, Duration::ZERO);
    // Two 8 MiB uploads cross the veth faster than a drain on a busy machine may read them: a
    // ring that holds both, so that nothing is lost here (losses are the tiny ring's test).
    let agent = lab.agent("compare = true", "copy_ring_bytes = 67108864");
    let bytes: Vec<u8> = (0..8 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let data = lab.upload(&bytes);
    let at = |path: &str| format!("http://{LIVE}{path}");
    // A keep-alive series, mixed methods and HEAD (curl reuses one connection for its URLs).
    lab.client(&[
        "curl",
        "-sf",
        "-o",
        "/dev/null",
        &at("/a"),
        &at("/b?x=1"),
        &at("/c"),
    ]);
    lab.client(&["curl", "-sf", "-I", &at("/head")]);
    lab.client(&["curl", "-sf", "-X", "DELETE", &at("/item/7")]);
    // 8 MiB with Expect: 100-continue (curl asks for it past 1 MiB), then chunked.
    lab.client(&[
        "curl",
        "-sf",
        "-o",
        "/dev/null",
        "--data-binary",
        &data,
        &at("/upload"),
    ]);
    lab.client(&[
        "curl",
        "-sf",
        "-o",
        "/dev/null",
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &data,
        &at("/chunked"),
    ]);
    // 204 and 304 end without a body (the 304 with the length a 200 would have had), and the
    // connection goes on.
    lab.client(&[
        "curl",
        "-sf",
        "-o",
        "/dev/null",
        &at("/status/204"),
        &at("/status/304"),
        &at("/after-304"),
    ]);
    // ab and wrk with keep-alive (wrk's script stops it after 100 answers), and a pipelining
    // client.
    lab.client(&["ab", "-q", "-k", "-n", "200", "-c", "4", &at("/ab")]);
    let stop = lab.file("stop.lua", WRK_STOP_AFTER_100.as_bytes());
    lab.client(&["wrk", "-t1", "-c1", "-d3s", "-s", &stop, &at("/wrk")]);
    pipeline(&lab, 10);
    let expected = live.received().len();
    assert_eq!(expected, 3 + 1 + 1 + 1 + 1 + 3 + 200 + 100 + 10);
    let api = lab.api();
    wait_for_state(
        "every request to be replayed and compared",
        || shadow_now(&api),
        |now| compared(now) == expected as u64,
    );
    let report = agent.stop();
    let stats = report.shadow("web");
    assert_eq!(stats["requests"], expected as u64, "{stats}");
    assert_eq!(stats["replayed"], expected as u64, "{stats}");
    assert_eq!(stats["compared"]["same"], expected as u64, "{stats}");
    shadow.assert_replayed_from(&live);
    let upload = shadow
        .received()
        .into_iter()
        .filter(|r| r.target == "/upload" || r.target == "/chunked")
        .map(|r| r.body)
        .collect::<Vec<_>>();
    assert_eq!(upload, [bytes.clone(), bytes]);
}

#[test]
fn compare_finds_exactly_the_paths_that_differ() {
    let lab = ShadowLab::new("cmp");
    let _live = lab.origin(LIVE, false, Duration::ZERO);
    let _shadow = lab.origin(SHADOW, true, Duration::ZERO);
    let agent = lab.agent("compare = true", "metrics_address = \"127.0.0.1:9464\"");
    let at = |path: &str| format!("http://{LIVE}{path}");
    lab.client(&[
        "curl",
        "-sf",
        "-o",
        "/dev/null",
        &at("/same/1"),
        &at("/changed/1"),
        &at("/same/2"),
        &at("/changed/2"),
        &at("/same/3"),
    ]);
    let api = lab.api();
    wait_for_state(
        "every exchange to be compared",
        || shadow_now(&api),
        |now| compared(now) == 5,
    );
    let metrics = lab
        .server
        .exec(&["curl", "-sf", "http://127.0.0.1:9464/metrics"]);
    for line in [
        "mirror_shadow_requests_total{session=\"web\",outcome=\"replayed\"} 5",
        "mirror_shadow_requests_total{session=\"web\",outcome=\"gap\"} 0",
        "mirror_shadow_compared_total{session=\"web\",result=\"same\"} 3",
        "mirror_shadow_compared_total{session=\"web\",result=\"differ\"} 2",
        "mirror_shadow_latency_seconds_count{session=\"web\",answer=\"live\"} 5",
        "mirror_shadow_latency_seconds_count{session=\"web\",answer=\"shadow\"} 5",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in:\n{metrics}"
        );
    }
    // Every answer in the histograms' last bucket, and the text a strict parser takes.
    let families = mirror_tests::check_openmetrics(&metrics, "mirror_");
    assert!(
        families
            .iter()
            .any(|f| f == "mirror_shadow_latency_seconds"),
        "{families:?}"
    );
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.starts_with("mirror_shadow_latency_seconds_bucket")
                && l.contains("le=\"+Inf\"")
                && l.ends_with(" 5"))
            .count(),
        2,
        "{metrics}"
    );
    let stats = agent.stop().shadow("web");
    assert_eq!(stats["compared"]["same"], 3, "{stats}");
    assert_eq!(stats["compared"]["differ"], 2, "{stats}");
    let paths: Vec<_> = stats["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .map(|d| d["path"].as_str().expect("path").to_owned())
        .collect();
    assert_eq!(paths, ["/changed/1", "/changed/2"]);
    assert!(
        stats["differences"][0]["differences"][0]
            .as_str()
            .is_some_and(|d| d.contains("/version")),
        "{stats}"
    );
}

#[test]
fn a_connection_open_before_the_agent_starts_is_joined_at_its_next_request() {
    let lab = ShadowLab::new("join");
    let _live = lab.origin(LIVE, false, Duration::ZERO);
    let shadow = lab.origin(SHADOW, false, Duration::ZERO);
    let live: SocketAddr = LIVE.parse().expect("addr");
    let (to_client, requests) = std::sync::mpsc::channel::<String>();
    let (answered, answers) = std::sync::mpsc::channel::<()>();
    let client = std::thread::spawn({
        let path = format!("/run/netns/{}", lab.client.name);
        move || {
            let file = std::fs::File::open(&path).expect("netns");
            // SAFETY: setns on this thread only.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0);
            let mut stream = TcpStream::connect(live).expect("connect");
            for path in requests {
                let request = format!("GET {path} HTTP/1.1\r\nHost: live\r\n\r\n");
                stream.write_all(request.as_bytes()).expect("write");
                let mut answer = [0; 4096];
                let n = stream.read(&mut answer).expect("read");
                assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
                answered.send(()).expect("answered");
            }
        }
    });
    to_client.send("/before".into()).expect("send");
    answers.recv().expect("answer");
    let agent = lab.agent("", "");
    for path in ["/after/1", "/after/2"] {
        to_client.send(path.into()).expect("send");
        answers.recv().expect("answer");
    }
    drop(to_client);
    client.join().expect("client");
    wait_for("the shadow to get both", || shadow.received().len() == 2);
    let stats = agent.stop().shadow("web");
    let paths: Vec<_> = shadow.received().into_iter().map(|r| r.target).collect();
    assert_eq!(paths, ["/after/1", "/after/2"]);
    assert_eq!(
        (
            stats["requests"].as_u64(),
            stats["joined_mid_stream"].as_u64()
        ),
        (Some(2), Some(1)),
        "{stats}"
    );
}

#[test]
fn a_reload_keeps_the_shadow_counts_of_an_unchanged_session() {
    let lab = ShadowLab::new("reload");
    let live = lab.origin(LIVE, false, Duration::ZERO);
    let shadow = lab.origin(SHADOW, false, Duration::ZERO);
    let agent = lab.agent("compare = true", "");
    let at = |path: &str| format!("http://{LIVE}{path}");
    let api = lab.api();
    lab.client(&["curl", "-sf", "-o", "/dev/null", &at("/1"), &at("/2")]);
    wait_for_state(
        "both to be compared",
        || shadow_now(&api),
        |now| compared(now) == 2,
    );
    agent.touch_config();
    let (code, stdout, stderr) =
        mirror_tests::agent_command(&lab.server, &["reload", "--api-socket", &api]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    lab.client(&[
        "curl",
        "-sf",
        "-o",
        "/dev/null",
        &at("/3"),
        &at("/4"),
        &at("/5"),
    ]);
    wait_for_state(
        "the counts to go on",
        || shadow_now(&api),
        |now| compared(now) == 5,
    );
    let stats = agent.stop().shadow("web");
    assert_eq!(live.received().len(), 5);
    for (field, count) in [
        (&stats["requests"], 5),
        (&stats["replayed"], 5),
        (&stats["compared"]["same"], 5),
        (&stats["connections"], 2),
        (&stats["live_latency"]["count"], 5),
    ] {
        assert_eq!(field.as_u64(), Some(count), "{stats}");
    }
    shadow.assert_replayed_from(&live);
}

#[test]
fn a_shadow_down_or_slow_costs_the_live_path_nothing_and_is_counted() {
    let lab = ShadowLab::new("down");
    let live = lab.origin(LIVE, false, Duration::ZERO);
    let at = |path: &str| format!("http://{LIVE}{path}");
    // No shadow listens: every request is a shadow error, and the live answers all come.
    let agent = lab.agent("timeout_ms = 300", "");
    lab.client(&["ab", "-q", "-k", "-n", "50", "-c", "2", &at("/down")]);
    assert_eq!(live.received().len(), 50);
    let api = lab.api();
    wait_for_state(
        "every request to be counted",
        || shadow_now(&api),
        |now| now["in_flight"] == 0 && now["requests"] == 50,
    );
    let stats = agent.stop().shadow("web");
    assert_eq!(stats["lost"]["shadow_error"], 50, "{stats}");
    // A shadow that answers after 2 s: each request times out at 300 ms, and the agent still
    // stops at once.
    let _slow = lab.origin(SHADOW, false, Duration::from_secs(2));
    let agent = lab.agent("timeout_ms = 300", "");
    lab.client(&[
        "curl",
        "-sf",
        "-o",
        "/dev/null",
        &at("/slow/1"),
        &at("/slow/2"),
    ]);
    assert_eq!(live.received().len(), 52);
    let api = lab.api();
    wait_for_state(
        "both to time out",
        || shadow_now(&api),
        |now| now["lost"]["timeout"] == 2,
    );
    let (report, _took) = agent.stop_within(libc::SIGTERM, Duration::from_secs(5));
    let stats = report.shadow("web");
    assert_eq!(stats["replayed"], 0, "{stats}");
}

#[test]
fn copies_the_ring_refuses_are_counted_as_lost_requests() {
    let lab = ShadowLab::new("ring");
    let live = lab.origin(LIVE, false, Duration::ZERO);
    let shadow = lab.origin(SHADOW, false, Duration::ZERO);
    // A ring of 16 KiB holds a frame or two of an upload's: most of each is refused.
    let agent = lab.agent("", "copy_ring_bytes = 16384");
    let data = lab.upload(&vec![7; 2 << 20]);
    for i in 0..4 {
        lab.client(&[
            "curl",
            "-sf",
            "-o",
            "/dev/null",
            "--data-binary",
            &data,
            &format!("http://{LIVE}/up/{i}"),
        ]);
    }
    assert_eq!(live.received().len(), 4);
    let report = agent.stop();
    let kernel = report.session("web");
    assert!(kernel.ring_full > 0, "{kernel:?}");
    let stats = report.shadow("web");
    // Whatever was replayed reached the shadow whole; the rest is lost to the ring, by name.
    assert_eq!(
        stats["replayed"].as_u64(),
        Some(shadow.received().len() as u64),
        "{stats}"
    );
    assert!(shadow.received().iter().all(|r| r.body.len() == 2 << 20));
    assert!(stats["lost"]["ring_full"].as_u64() >= Some(1), "{stats}");
    // The ring refused every byte that went missing: none is blamed on the network.
    assert_eq!(stats["lost"]["gap"], 0, "{stats}");
    // Each upload is counted: replayed, or lost to the ring.
    assert_eq!(stats["requests"], 4, "{stats}");
}

/// `collect --shadow`: the node's agent sends its copies in VXLAN to a collector on another
/// node, which replays the requests in them, comparing the answers it sees in them too.
#[test]
fn the_collector_replays_the_requests_that_arrive_in_tunnels() {
    let lab = ShadowLab::new("col");
    let node = lab.collector_node();
    let live = lab.origin(LIVE, false, Duration::ZERO);
    let shadow = Origin::start(&node, SHADOW.parse().expect("addr"), false, Duration::ZERO);
    let collector = Collector::start(
        &node,
        &agent_binary(),
        "10.78.0.2:4789",
        "copies.pcap",
        &["--shadow", &format!("http://{SHADOW}"), "--compare"],
    );
    let _agent = lab.agent_to(
        "vxlan = { remote = \"10.78.0.2\", vni = 7 }",
        "copy_ring_bytes = 67108864",
    );
    let at = |path: &str| format!("http://{LIVE}{path}");
    lab.client(&["curl", "-sf", "-o", "/dev/null", &at("/a"), &at("/b?x=1")]);
    lab.client(&["curl", "-sf", "-d", "name=value", &at("/form")]);
    lab.client(&["ab", "-q", "-k", "-n", "50", "-c", "2", &at("/ab")]);
    let expected = live.received().len();
    assert_eq!(expected, 2 + 1 + 50);
    wait_for("the shadow to get every request", || {
        shadow.received().len() >= expected
    });
    let summary = collector.stop();
    for (field, count) in [
        ("requests", expected),
        ("replayed", expected),
        ("lost", 0),
        ("same", expected),
    ] {
        assert_eq!(
            summary.shadow(field),
            count as u64,
            "{field}: {}",
            summary.text
        );
    }
    shadow.assert_replayed_from(&live);
}
