//! Observed sessions (`observe = "http"`): real clients (ab, curl, wrk) against nginx in one
//! namespace, the agent beside it counting the exchanges it sees by service. The counts are
//! checked against nginx's own access log, per method and status class; the durations against
//! wrk's own report; the labels against a flood of paths and services.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use mirror_tests::{
    Agent, Netns, Nginx, Origin, agent_binary, api_get, check_openmetrics, require_root,
    wait_for_state,
};

static NEXT: AtomicU32 = AtomicU32::new(0);

const SERVER: &str = "10.78.0.2";
const PORT: u16 = 8080;
const METRICS: &str = "127.0.0.1:9465";
/// An origin that answers after 20 ms, beside nginx.
const SLOW: &str = "10.78.0.2:8090";

/// A client namespace and a server namespace on one veth (`c0` ── `s0`); nginx listens in the
/// server's, on `ports`, where the agent watches `s0`.
struct ObserveLab {
    /// First, so that nginx stops before its namespace and files go (held for its drop).
    _nginx: Nginx,
    client: Netns,
    server: Netns,
    dir: tempfile::TempDir,
}

impl ObserveLab {
    fn new(test: &str, ports: &[u16]) -> Self {
        Self::serving(test, ports, "")
    }

    /// nginx speaking HTTP/2 with prior knowledge (h2c) on `ports`.
    fn http2(test: &str, ports: &[u16]) -> Self {
        Self::serving(test, ports, " http2")
    }

    /// nginx on `ports`, each `listen` with `options`.
    fn serving(test: &str, ports: &[u16], options: &str) -> Self {
        require_root();
        let id = format!(
            "o{}-{}-{test}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let client = Netns::new(format!("{id}-cli"));
        let server = Netns::new(format!("{id}-srv"));
        client.veth_to("c0", "10.78.0.1/24", &server, "s0", &format!("{SERVER}/24"));
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("access.log");
        let mut servers = String::new();
        for port in ports {
            let _ = write!(
                servers,
                "server {{
        listen {SERVER}:{port}{options};
        keepalive_requests 1000000;
        location /missing {{ return 404; }}
        location /fail {{ return 503; }}
        location /moved {{ return 301 /ok; }}
        location / {{ return 200 \"ok\\n\"; }}
    }}
    "
            );
        }
        let http = format!(
            "http {{
    client_body_temp_path {dir}/body;
    log_format exchange \"$request_method $status\";
    access_log {log} exchange;
    {servers}
}}
",
            dir = dir.path().display(),
            log = log.display(),
        );
        let listening: Vec<SocketAddr> = ports
            .iter()
            .map(|port| format!("{SERVER}:{port}").parse().expect("addr"))
            .collect();
        let nginx = Nginx::start(&server, dir.path(), "nginx", &http, &listening)
            .expect("nginx (nginx-light, from `cargo xtask setup`)");
        ObserveLab {
            _nginx: nginx,
            client,
            server,
            dir,
        }
    }

    fn api(&self) -> String {
        self.dir.path().join("agent.sock").display().to_string()
    }

    /// The agent watching `s0` with one session `web`: `session` its keys besides its name and
    /// interfaces.
    fn agent(&self, session: &str) -> Agent {
        let config = format!(
            "api_socket = \"{}\"\nmetrics_address = \"{METRICS}\"\n[[session]]\nname = \"web\"\ninterfaces = [\"s0\"]\n{session}\n",
            self.api()
        );
        Agent::start(&self.server, &agent_binary(), &config)
    }

    /// Runs a client program in the client namespace; its stdout.
    fn client(&self, program: &[&str]) -> String {
        self.client.exec(program)
    }

    /// nginx's log once it holds `n` requests (it writes a line after its answer went out).
    fn logged_all(&self, n: u64) -> BTreeMap<(String, String), u64> {
        wait_for_state(
            "nginx to log every request",
            || total(&self.logged()),
            |logged| *logged >= n,
        );
        let logged = self.logged();
        assert_eq!(total(&logged), n, "{logged:?}");
        logged
    }

    /// nginx's log: requests by (method, status class).
    fn logged(&self) -> BTreeMap<(String, String), u64> {
        let log = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        let mut by = BTreeMap::new();
        for line in log.lines() {
            let (method, status) = line.split_once(' ').expect("method status");
            *by.entry((method.to_owned(), format!("{}xx", &status[..1])))
                .or_default() += 1;
        }
        by
    }

    /// wrk's `answers` requests to `service` on one connection: the agent times every one, and
    /// its `quantiles` (q, wrk's name for it) of them are within a bucket of wrk's own.
    fn timed_as_wrk_reports(&self, service: &str, answers: u64, quantiles: &[(f64, &str)]) {
        let stop = self.dir.path().join("stop.lua");
        std::fs::write(&stop, wrk_script(answers)).expect("script");
        let before = histogram(&self.metrics(), service);
        let report = self.client(&[
            "wrk",
            "-t1",
            "-c1",
            "-d3s",
            "--latency",
            "-s",
            &stop.display().to_string(),
            &format!("http://{service}/wrk"),
        ]);
        let wrk = |percent: &str| {
            let line = report
                .lines()
                .find(|l| l.trim_start().starts_with(percent))
                .unwrap_or_else(|| panic!("{percent} in wrk's report:\n{report}"));
            wrk_seconds(line.split_whitespace().nth(1).expect("a latency"))
        };
        let during = wait_for_state(
            "wrk's requests to be timed",
            || Timed {
                buckets: since(&histogram(&self.metrics(), service), &before),
                stats: api_get(&self.api(), "/stats"),
                service,
                wrk: &report,
            },
            |timed| timed.count() >= answers,
        )
        .buckets;
        assert_eq!(during.last().expect("+Inf").1, answers, "{during:?}");
        for &(q, percent) in quantiles {
            let (ours, theirs) = (quantile(&during, q), wrk(percent));
            assert!(
                bucket(&during, ours).abs_diff(bucket(&during, theirs)) <= 1,
                "{service} p{percent}: ours {ours} s, wrk's {theirs} s: more than a bucket apart\n{during:?}\n{report}"
            );
        }
    }

    fn metrics(&self) -> String {
        self.server
            .exec(&["curl", "-sf", &format!("http://{METRICS}/metrics")])
    }
}

/// The session's service figures now, from the agent's API.
fn http_now(api: &str) -> serde_json::Value {
    let stats: serde_json::Value = serde_json::from_str(&api_get(api, "/stats")).expect("stats");
    stats["sessions"][0]["http"].clone()
}

/// Requests counted of every service, by (method, status class).
fn counted(http: &serde_json::Value) -> BTreeMap<(String, String), u64> {
    counted_where(http, |_| true)
}

/// Requests counted of `service`, by (method, status class).
fn counted_of(http: &serde_json::Value, service: &str) -> BTreeMap<(String, String), u64> {
    counted_where(http, |s| s == service)
}

fn counted_where(
    http: &serde_json::Value,
    service: impl Fn(&str) -> bool,
) -> BTreeMap<(String, String), u64> {
    let mut by = BTreeMap::new();
    for service in http["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| service(s["service"].as_str().unwrap_or_default()))
    {
        for series in service["requests"].as_array().expect("requests") {
            let key = (
                series["method"].as_str().expect("method").to_owned(),
                series["status_class"].as_str().expect("class").to_owned(),
            );
            *by.entry(key).or_default() += series["count"].as_u64().expect("count");
        }
    }
    by
}

fn total(by: &BTreeMap<(String, String), u64>) -> u64 {
    by.values().sum()
}

/// The requests wrk makes of nginx and of the slow origin.
const WRK_ANSWERS: u64 = 1000;
const SLOW_ANSWERS: u64 = 50;

/// A wrk script that stops its one connection's thread after `answers` answers, so that no
/// request is left unanswered when wrk closes the connection.
fn wrk_script(answers: u64) -> String {
    format!(
        "local answers = 0
function response()
  answers = answers + 1
  if answers == {answers} then wrk.thread:stop() end
end
"
    )
}

/// A latency of wrk's report (`123.45us`, `1.20ms`, `2.00s`) in seconds.
fn wrk_seconds(text: &str) -> f64 {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .expect("a unit");
    let (value, unit) = text.split_at(split);
    let value: f64 = value.parse().expect("a number");
    value
        * match unit {
            "us" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            other => panic!("unit {other}"),
        }
}

/// A service's duration histogram in the metrics: (upper bound, cumulative count) per bucket.
fn histogram(metrics: &str, service: &str) -> Vec<(f64, u64)> {
    let labels = format!("session=\"web\",service=\"{service}\"}}");
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix("mirror_http_request_duration_seconds_bucket{le=\""))
        .filter(|rest| rest.contains(&labels))
        .map(|rest| {
            let (le, rest) = rest.split_once('"').expect("le");
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().expect("a bound")
            };
            let count = rest.rsplit_once(' ').expect("a count").1;
            (bound, count.parse().expect("a count"))
        })
        .collect()
}

/// The observations between two readings of one histogram (`then` empty before the first).
fn since(now: &[(f64, u64)], then: &[(f64, u64)]) -> Vec<(f64, u64)> {
    now.iter()
        .enumerate()
        .map(|(i, &(bound, n))| (bound, n - then.get(i).map_or(0, |(_, n)| *n)))
        .collect()
}

/// The `q` quantile of cumulative buckets, as Prometheus's `histogram_quantile` estimates it.
#[expect(
    clippy::cast_precision_loss,
    reason = "counts far below 2^52 observations"
)]
fn quantile(buckets: &[(f64, u64)], q: f64) -> f64 {
    let count = buckets.last().expect("+Inf").1;
    let rank = q * count as f64;
    let (mut lower, mut below) = (0.0, 0);
    for &(bound, cumulative) in buckets {
        if cumulative as f64 >= rank && cumulative > below {
            if bound.is_infinite() {
                return lower;
            }
            return lower + (bound - lower) * ((rank - below as f64) / (cumulative - below) as f64);
        }
        (lower, below) = (bound, cumulative);
    }
    lower
}

/// A service's durations since wrk began, and wrk's report (for a failure's message).
struct Timed<'a> {
    buckets: Vec<(f64, u64)>,
    /// The session's whole `/stats` now.
    stats: String,
    service: &'a str,
    wrk: &'a str,
}

impl Timed<'_> {
    fn count(&self) -> u64 {
        self.buckets.last().map_or(0, |(_, n)| *n)
    }
}

impl std::fmt::Display for Timed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} timed {:?}\nwrk:\n{}\n/stats: {}",
            self.service,
            self.count(),
            self.buckets,
            self.wrk,
            self.stats
        )
    }
}

/// The bucket (its index) a duration falls in.
fn bucket(buckets: &[(f64, u64)], seconds: f64) -> usize {
    buckets
        .iter()
        .position(|(bound, _)| seconds <= *bound)
        .expect("+Inf holds all")
}

#[test]
fn observed_counts_are_what_the_origin_logged() {
    let lab = ObserveLab::new("log", &[PORT]);
    let agent = lab.agent("filter = \"tcp port 8080 or tcp port 8090\"\nobserve = \"http\"");
    let at = |path: &str| format!("http://{SERVER}:{PORT}{path}");
    // Keep-alive and not, methods with and without bodies, HEAD, every status class.
    lab.client(&["ab", "-q", "-k", "-n", "300", "-c", "4", &at("/ok")]);
    lab.client(&["ab", "-q", "-n", "40", "-c", "2", &at("/missing")]);
    let data = ["--data-binary", "an order"];
    lab.client(
        &[
            &["curl", "-s", "-o", "/dev/null", "-X", "POST"][..],
            &data,
            &[&at("/orders"), &at("/fail"), &at("/orders")],
        ]
        .concat(),
    );
    lab.client(&["curl", "-s", "-o", "/dev/null", "-X", "PUT", &at("/fail")]);
    lab.client(&["curl", "-s", "-I", &at("/ok")]);
    lab.client(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        &at("/moved"),
        &at("/missing"),
    ]);
    let api = lab.api();
    let logged = lab.logged_all(300 + 40 + 3 + 1 + 1 + 2);
    let http = wait_for_state(
        "every exchange nginx logged to be counted",
        || http_now(&api),
        |now| total(&counted(now)) >= total(&logged),
    );
    assert_eq!(counted(&http), logged, "{http}");
    let [service] = http["services"].as_array().expect("services").as_slice() else {
        panic!("one service: {http}");
    };
    assert_eq!(service["service"], format!("{SERVER}:{PORT}"));
    assert_eq!(service["duration"]["count"], total(&logged), "{service}");
    assert_eq!(http["over_cap"], 0);

    // wrk's own latency report against the durations the agent measured meanwhile, of nginx
    // (well under a millisecond) and of an origin that answers after 20 ms.
    let slow = Origin::start(
        &lab.server,
        SLOW.parse().expect("addr"),
        false,
        Duration::from_millis(20),
    );
    // nginx's tail is the client's own scheduling on a busy machine (wrk's p99 of 20 us answers
    // can be 3 ms), which no wire sees: its median alone is compared.
    lab.timed_as_wrk_reports(&format!("{SERVER}:{PORT}"), WRK_ANSWERS, &[(0.5, "50%")]);
    lab.timed_as_wrk_reports(SLOW, SLOW_ANSWERS, &[(0.5, "50%"), (0.99, "99%")]);
    assert_eq!(slow.received().len() as u64, SLOW_ANSWERS);
    let expected = total(&logged) + WRK_ANSWERS;
    let after = http_now(&api);
    assert_eq!(
        counted_of(&after, &format!("{SERVER}:{PORT}")),
        lab.logged_all(expected),
        "{after}"
    );

    // The metrics say the same, and a strict parser takes them.
    let metrics = lab.metrics();
    let service = format!("{SERVER}:{PORT}");
    for (method, class, n) in [
        ("GET", "2xx", 300 + WRK_ANSWERS),
        ("GET", "4xx", 40 + 1),
        ("POST", "2xx", 2),
        ("POST", "5xx", 1),
        ("PUT", "5xx", 1),
        ("HEAD", "2xx", 1),
        ("GET", "3xx", 1),
    ] {
        let line = format!(
            "mirror_http_requests_total{{session=\"web\",service=\"{service}\",method=\"{method}\",status_class=\"{class}\"}} {n}"
        );
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    let count_line = format!(
        "mirror_http_request_duration_seconds_count{{session=\"web\",service=\"{service}\"}} {expected}"
    );
    assert!(
        metrics.lines().any(|l| l == count_line),
        "{count_line} in:\n{metrics}"
    );
    let families = check_openmetrics(&metrics, "mirror_");
    assert!(
        metrics.lines().any(|l| l
            == format!(
                "mirror_http_requests_total{{session=\"web\",service=\"{SLOW}\",method=\"GET\",status_class=\"2xx\"}} {SLOW_ANSWERS}"
            )),
        "{metrics}"
    );
    assert!(
        families
            .iter()
            .any(|f| f == "mirror_http_request_duration_seconds"),
        "{families:?}"
    );
    // Nothing was sent anywhere, and the stop reports the services.
    let report = agent.stop();
    let session = &report.json()["stats"]["sessions"][0];
    assert_eq!(
        counted_of(&session["http"], &service),
        lab.logged_all(expected),
        "{session}"
    );
    assert!(session.get("shadow").is_none(), "{session}");
}

#[test]
fn a_flood_of_paths_and_services_stays_within_the_series_cap() {
    let ports: Vec<u16> = (PORT..PORT + 6).collect();
    let lab = ObserveLab::new("cap", &ports);
    let _agent = lab.agent(
        "filter = \"tcp portrange 8080-8085\"\nobserve = { protocol = \"http\", routes = [\"/users/{id}\"], max_series = 4 }",
    );
    // On each port: 30 users, 30 other paths, a path no route holds.
    for port in &ports {
        let urls: Vec<String> = (0..30)
            .flat_map(|i| {
                [
                    format!("http://{SERVER}:{port}/users/{i}"),
                    format!("http://{SERVER}:{port}/flood/{port}/{i}"),
                ]
            })
            .collect();
        let mut args = vec!["curl", "-s", "-o", "/dev/null"];
        args.extend(urls.iter().map(String::as_str));
        lab.client(&args);
    }
    let api = lab.api();
    let http = wait_for_state(
        "every exchange to be counted",
        || http_now(&api),
        |now| total(&counted(now)) >= 6 * 60,
    );
    assert_eq!(counted(&http), lab.logged_all(6 * 60), "{http}");
    // Two services (a series each for the route and for `other`) fill the cap; the other four
    // are counted as `other`.
    let services: Vec<&str> = http["services"]
        .as_array()
        .expect("services")
        .iter()
        .map(|s| s["service"].as_str().expect("name"))
        .collect();
    assert_eq!(services.len(), 3, "{http}");
    assert!(services.contains(&"other"), "{http}");
    assert_eq!(http["over_cap"], 4 * 60, "{http}");
    let metrics = lab.metrics();
    check_openmetrics(&metrics, "mirror_");
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("mirror_http_requests_total{"))
        .collect();
    assert_eq!(series.len(), 4 + 2, "{metrics}");
    for line in &series {
        assert!(
            line.contains("route=\"/users/{id}\"") || line.contains("route=\"other\""),
            "{line}"
        );
        assert!(!line.contains("flood"), "a path became a label: {line}");
    }
}

#[test]
fn a_shadow_session_counts_what_it_replays() {
    let lab = ObserveLab::new("shadow", &[PORT]);
    let shadow = Origin::start(
        &lab.server,
        "127.0.0.1:9090".parse().expect("addr"),
        false,
        Duration::ZERO,
    );
    let agent = lab.agent(
        "filter = \"tcp port 8080\"\nobserve = \"http\"\ntarget = { shadow = { url = \"http://127.0.0.1:9090\" } }",
    );
    lab.client(&[
        "ab",
        "-q",
        "-k",
        "-n",
        "100",
        "-c",
        "2",
        &format!("http://{SERVER}:{PORT}/cart"),
    ]);
    let api = lab.api();
    wait_for_state(
        "every request to be counted and replayed",
        || {
            let stats: serde_json::Value =
                serde_json::from_str(&api_get(&api, "/stats")).expect("stats");
            stats["sessions"][0].clone()
        },
        |session| total(&counted(&session["http"])) == 100 && session["shadow"]["replayed"] == 100,
    );
    assert_eq!(shadow.received().len(), 100);
    let report = agent.stop();
    assert_eq!(report.shadow("web")["replayed"], 100);
    assert_eq!(
        counted(&report.json()["stats"]["sessions"][0]["http"]),
        lab.logged_all(100)
    );
}

/// The quick form: `run --observe http FILTER` counts the services, `stats` shows them, and the
/// report on exit lists them.
#[test]
fn the_quick_form_observes_and_reports_its_services() {
    let lab = ObserveLab::new("quick", &[PORT]);
    let socket = lab.dir.path().join("quick.sock");
    let mut agent = mirror_tests::KilledOnDrop(
        std::process::Command::new("ip")
            .args(["netns", "exec", &lab.server.name])
            .arg(agent_binary())
            .args(["run", "-i", "s0", "--observe", "http", "--api-socket"])
            .arg(&socket)
            .args(["tcp", "port", "8080"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("agent"),
    );
    let socket = socket.to_str().expect("utf-8");
    mirror_tests::wait_for("the agent to attach", || {
        std::os::unix::net::UnixStream::connect(socket).is_ok()
            && !mirror_tests::attached(&lab.server, socket).is_empty()
    });
    let at = |path: &str| format!("http://{SERVER}:{PORT}{path}");
    lab.client(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        &at("/a"),
        &at("/missing"),
        &at("/b"),
    ]);
    wait_for_state(
        "the three exchanges to be counted",
        || http_now(socket),
        |now| total(&counted(now)) == 3,
    );
    let (code, table, stderr) =
        mirror_tests::agent_command(&lab.server, &["stats", "--api-socket", socket]);
    assert_eq!(code, 0, "{stderr}");
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.contains(&format!("{SERVER}:{PORT}")))
        .unwrap_or_else(|| panic!("the service's row:\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        row[..4],
        ["cli", &format!("{SERVER}:{PORT}"), "3", "0"],
        "{table}"
    );
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(agent.0.id().cast_signed(), libc::SIGINT) };
    let mut report = String::new();
    std::io::Read::read_to_string(&mut agent.0.stdout.take().expect("stdout"), &mut report)
        .expect("the report");
    assert!(agent.0.wait().expect("agent").success(), "{report}");
    let line = report
        .lines()
        .find(|l| l.starts_with("http "))
        .unwrap_or_else(|| panic!("an http line:\n{report}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        fields[..6],
        [
            "http",
            "cli",
            &format!("{SERVER}:{PORT}"),
            "requests=3",
            "2xx=2",
            "4xx=1"
        ],
        "{report}"
    );
    assert!(
        fields[6].starts_with("p50_ms=") && fields[7].starts_with("p99_ms="),
        "{line}"
    );
}

/// HTTP/2 with prior knowledge: h2load (nghttp2, Huffman and the dynamic table) and curl
/// against nginx; every stream counted as nginx logged it.
#[test]
fn http2_exchanges_are_counted_as_nginx_logged_them() {
    let lab = ObserveLab::http2("h2", &[PORT]);
    let _agent = lab.agent("filter = \"tcp port 8080\"\nobserve = \"http\"");
    let at = |path: &str| format!("http://{SERVER}:{PORT}{path}");
    // 3 connections, 10 streams at once on each, over three paths in turn.
    let report = lab.client(&[
        "h2load",
        "-n",
        "300",
        "-c",
        "3",
        "-m",
        "10",
        &at("/ok"),
        &at("/missing"),
        &at("/fail"),
    ]);
    assert!(report.contains("300 done"), "{report}");
    // POSTs with bodies (nginx answers before it reads them, then resets the stream, as
    // RFC 9113 lets it), a PUT and a HEAD.
    let order = lab.dir.path().join("order");
    std::fs::write(&order, vec![b'o'; 20_000]).expect("order");
    let posted = lab.client(&[
        "h2load",
        "-n",
        "20",
        "-c",
        "2",
        "-d",
        &order.display().to_string(),
        &at("/orders"),
    ]);
    assert!(posted.contains("20 done"), "{posted}");
    let h2c = ["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null"];
    lab.client(&[&h2c[..], &["-X", "PUT", &at("/fail")]].concat());
    lab.client(&[&h2c[..], &["-I", &at("/ok")]].concat());
    let logged = lab.logged_all(300 + 20 + 1 + 1);
    let api = lab.api();
    let http = wait_for_state(
        "every stream nginx logged to be counted",
        || http_now(&api),
        |now| total(&counted(now)) >= total(&logged),
    );
    assert_eq!(counted(&http), logged, "{http}");
    assert_eq!(http["services"][0]["duration"]["count"], total(&logged));
    assert_eq!(
        http["unread"],
        serde_json::json!({"ring_full": 0, "gap": 0, "unreadable": 0, "undecodable": 0})
    );
}

/// Python's gRPC server and client, in the two namespaces; stopped on drop.
struct GrpcPeer(std::process::Child);

const GRPC: &str = "10.78.0.2:50051";

impl GrpcPeer {
    fn peer() -> String {
        concat!(env!("CARGO_MANIFEST_DIR"), "/peers/grpc_peer.py").to_owned()
    }

    /// `grpc_peer.py MODE ARGS` in `ns`, its stdin and stdout piped; once it printed `first`,
    /// when given.
    fn start(
        ns: &Netns,
        args: &[&str],
        first: Option<&str>,
    ) -> (Self, std::io::BufReader<std::process::ChildStdout>) {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "/usr/bin/python3", &Self::peer()])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 (python3-grpcio, from `cargo xtask setup`)");
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        if let Some(first) = first {
            let mut line = String::new();
            out.read_line(&mut line).expect("its first line");
            assert_eq!(line.trim(), first, "grpc_peer.py {args:?}");
        }
        (GrpcPeer(child), out)
    }

    /// The client's tally of codes by method.
    fn tally(out: &mut impl std::io::Read) -> BTreeMap<(String, String), u64> {
        let mut text = String::new();
        out.read_to_string(&mut text).expect("its tally");
        let tally: BTreeMap<String, BTreeMap<String, u64>> =
            serde_json::from_str(&text).expect("JSON");
        tally
            .into_iter()
            .flat_map(|(method, codes)| {
                codes
                    .into_iter()
                    .map(move |(code, n)| ((method.clone(), code), n))
            })
            .collect()
    }
}

impl Drop for GrpcPeer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// gRPC calls by method and code, as the service's own series.
fn grpc_counted(http: &serde_json::Value) -> BTreeMap<(String, String), u64> {
    let mut by = BTreeMap::new();
    for series in http["services"][0]["requests"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let key = (
            series["grpc_method"].as_str().unwrap_or("none").to_owned(),
            series["grpc_code"].as_str().unwrap_or("none").to_owned(),
        );
        assert_eq!(
            (&series["method"], &series["status_class"]),
            (&serde_json::json!("POST"), &serde_json::json!("2xx")),
            "{series}"
        );
        *by.entry(key).or_default() += series["count"].as_u64().expect("count");
    }
    by
}

/// gRPC unary and server-streaming calls, succeeding and failing: counted by `grpc_method` and
/// `grpc_code` as the client saw them.
#[test]
fn grpc_calls_are_counted_by_method_and_code() {
    let lab = ObserveLab::new("grpc", &[PORT]);
    let _server = GrpcPeer::start(&lab.server, &["serve", GRPC], Some("serving"));
    let _agent = lab.agent("filter = \"tcp port 50051\"\nobserve = \"http\"");
    let (_client, mut out) = GrpcPeer::start(&lab.client, &["call", GRPC, "20"], None);
    let seen = GrpcPeer::tally(&mut out);
    assert_eq!(seen.values().sum::<u64>(), 60, "{seen:?}");
    let api = lab.api();
    let http = wait_for_state(
        "every call to be counted",
        || http_now(&api),
        |now| total(&counted(now)) >= 60,
    );
    assert_eq!(grpc_counted(&http), seen, "{http}");
    let metrics = lab.metrics();
    let line = format!(
        "mirror_http_requests_total{{session=\"web\",service=\"{GRPC}\",method=\"POST\",status_class=\"2xx\",grpc_method=\"/shop.Cart/Missing\",grpc_code=\"NOT_FOUND\"}} 20"
    );
    assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    check_openmetrics(&metrics, "mirror_");
}

/// A gRPC connection opened before the agent started: its HPACK state is unknown, so each of
/// its later calls is counted `undecodable` by its frames, and none is replayed or labelled.
#[test]
fn a_connection_older_than_the_agent_is_undecodable() {
    use std::io::Write as _;
    let lab = ObserveLab::new("old", &[PORT]);
    let _server = GrpcPeer::start(&lab.server, &["serve", GRPC], Some("serving"));
    let (mut client, mut out) = GrpcPeer::start(&lab.client, &["hold", GRPC, "5"], Some("ready"));
    let _shadow = Origin::start(
        &lab.server,
        "127.0.0.1:9090".parse().expect("addr"),
        false,
        Duration::ZERO,
    );
    let agent = lab.agent(
        "filter = \"tcp port 50051\"\nobserve = \"http\"\ntarget = { shadow = { url = \"http://127.0.0.1:9090\" } }",
    );
    client
        .0
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("go");
    let seen = GrpcPeer::tally(&mut out);
    assert_eq!(seen.values().sum::<u64>(), 5, "{seen:?}");
    let api = lab.api();
    let session = wait_for_state(
        "the calls to be counted",
        || {
            let stats: serde_json::Value =
                serde_json::from_str(&api_get(&api, "/stats")).expect("stats");
            stats["sessions"][0].clone()
        },
        |s| s["http"]["unread"]["undecodable"] == 5,
    );
    assert_eq!(
        session["http"]["services"],
        serde_json::json!([]),
        "{session}"
    );
    let shadow = &session["shadow"];
    assert_eq!(
        (
            &shadow["requests"],
            &shadow["replayed"],
            &shadow["lost"]["undecodable"]
        ),
        (
            &serde_json::json!(5),
            &serde_json::json!(0),
            &serde_json::json!(5)
        ),
        "{session}"
    );
    assert_eq!(shadow["joined_mid_stream"], 1, "{session}");
    let report = agent.stop();
    assert_eq!(report.shadow("web")["lost"]["undecodable"], 5);
}

/// What a peer printed until it was stopped, sorted by line.
fn printed(peer: GrpcPeer, mut out: impl std::io::Read) -> Vec<String> {
    drop(peer);
    let mut text = String::new();
    out.read_to_string(&mut text).expect("its lines");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort();
    lines
}

/// gRPC unary and server-streaming calls shadowed over HTTP/2 to a second server, whose
/// `Missing` succeeds: each call reaches it with the same message bytes, and compare finds the
/// calls whose `grpc-status` differs, and no other.
#[test]
fn grpc_calls_are_shadowed_and_compared() {
    let lab = ObserveLab::new("gshadow", &[PORT]);
    let (live, live_log) = GrpcPeer::start(&lab.server, &["serve", GRPC], Some("serving"));
    let shadow_at = "10.78.0.2:50052";
    let (shadow_peer, shadow_log) =
        GrpcPeer::start(&lab.server, &["serve", shadow_at, "v2"], Some("serving"));
    let agent = lab.agent(&format!(
        "filter = \"tcp port 50051\"\nobserve = \"http\"\ntarget = {{ shadow = {{ url = \"http://{shadow_at}\", compare = true }} }}"
    ));
    let (_client, mut out) = GrpcPeer::start(&lab.client, &["call", GRPC, "20"], None);
    assert_eq!(GrpcPeer::tally(&mut out).values().sum::<u64>(), 60);
    let api = lab.api();
    let shadow = wait_for_state(
        "every call to be replayed and compared",
        || {
            let stats: serde_json::Value =
                serde_json::from_str(&api_get(&api, "/stats")).expect("stats");
            stats["sessions"][0]["shadow"].clone()
        },
        |s| {
            let compared = &s["compared"];
            compared["same"].as_u64().unwrap_or(0)
                + compared["differ"].as_u64().unwrap_or(0)
                + compared["errors"].as_u64().unwrap_or(0)
                >= 60
        },
    );
    let calls = printed(live, live_log);
    assert_eq!(calls.len(), 60);
    assert_eq!(printed(shadow_peer, shadow_log), calls);
    assert_eq!(
        (&shadow["requests"], &shadow["replayed"]),
        (&serde_json::json!(60), &serde_json::json!(60)),
        "{shadow}"
    );
    assert_eq!(
        shadow["compared"],
        serde_json::json!({"same": 40, "differ": 20, "errors": 0}),
        "{shadow}"
    );
    let difference = shadow["differences"][0].to_string();
    assert!(
        difference.contains("/shop.Cart/Missing")
            && difference.contains("grpc-status: 5 (shadow 0)"),
        "{difference}"
    );
    let report = agent.stop();
    assert_eq!(report.shadow("web")["replayed"], 60);
}
