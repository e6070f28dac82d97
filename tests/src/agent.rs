//! The agent as a child process: starting it, stopping it, its report, its API and CLI.
use std::{
    io::{BufRead, BufReader, Write as _},
    net::SocketAddr,
    process::{Child, ChildStdout, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{Counts, Netns};

/// Path of the agent binary: `MIRROR_AGENT_BIN`, else next to this test's target directory.
pub fn agent_binary() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("MIRROR_AGENT_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let candidate = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("mirror-agent"));
    match candidate {
        Some(path) if path.exists() => path,
        _ => panic!("mirror-agent is not built: run `cargo xtask test` (it builds it first)"),
    }
}

/// The agent as a child process; killed on drop if a test fails before stopping it.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    stdout: BufReader<ChildStdout>,
    /// The configuration file [`Agent::start`] wrote, removed with the agent.
    config_file: Option<tempfile::NamedTempFile>,
    /// Holds the agent's API socket unless the configuration names one.
    _api_dir: tempfile::TempDir,
    /// The agent's log so far, when [`Agent::start_logging`] keeps it.
    log: Option<Arc<Mutex<String>>>,
}

impl Agent {
    /// Runs `binary` with `config` in `node` and waits until it has attached.
    pub fn start(node: &Netns, binary: &std::path::Path, config: &str) -> Self {
        Agent::start_with(node, binary, config, &[], Stdio::inherit())
    }

    /// [`Agent::start`] with `extra` arguments, keeping the agent's log (see [`Agent::log`]).
    pub fn start_logging(node: &Netns, config: &str, extra: &[&str]) -> Self {
        Agent::start_with(node, &agent_binary(), config, extra, Stdio::piped())
    }

    fn start_with(
        node: &Netns,
        binary: &std::path::Path,
        config: &str,
        extra: &[&str],
        log: Stdio,
    ) -> Self {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(&mut file, config.as_bytes()).expect("write config");
        let mut agent = Agent::spawn(node, binary, file.path(), extra, log);
        agent.config_file = Some(file);
        agent
    }

    /// Runs `binary` with the configuration file at `path` (which names its `api_socket`, or gets
    /// one of its own) and `extra` arguments in `node`, and waits until it has attached.
    pub fn start_file(
        node: &Netns,
        binary: &std::path::Path,
        path: &std::path::Path,
        extra: &[&str],
    ) -> Self {
        Agent::spawn(node, binary, path, extra, Stdio::inherit())
    }

    fn spawn(
        node: &Netns,
        binary: &std::path::Path,
        path: &std::path::Path,
        extra: &[&str],
        log: Stdio,
    ) -> Self {
        let config = std::fs::read_to_string(path).expect("read config");
        // Agents of tests running at once each need their own API socket.
        let api_dir = tempfile::tempdir().expect("temp dir");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &node.name])
            .arg(binary)
            .args(["run", "--json", "--stats-interval", "0", "--config"])
            .arg(path)
            .args(extra);
        if !config.contains("api_socket") {
            command
                .arg("--api-socket")
                .arg(api_dir.path().join("agent.sock"));
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        // Read as it comes, so that the agent never waits on a full pipe.
        let log = child.stderr.take().map(|stderr| {
            let log = Arc::new(Mutex::new(String::new()));
            let kept = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let mut kept = kept.lock().expect("log");
                    kept.push_str(&line);
                    kept.push('\n');
                }
            });
            log
        });
        // The agent prints this line once every hook is attached; EOF means it failed to start.
        await_first_line(&mut child, &mut stdout, "attached to", "agent");
        Agent {
            child,
            stdout,
            config_file: None,
            _api_dir: api_dir,
            log,
        }
    }

    /// Changes the text of the configuration file [`Agent::start`] wrote, not what it says (a
    /// reload applies a file that changed).
    pub fn touch_config(&self) {
        let file = self
            .config_file
            .as_ref()
            .expect("a configuration Agent::start wrote");
        std::fs::OpenOptions::new()
            .append(true)
            .open(file.path())
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"# touched\n"))
            .expect("config");
    }

    /// SIGKILL: the agent dies without a chance to clean up.
    pub fn kill(mut self) {
        self.child.kill().expect("kill agent");
        self.child.wait().expect("wait agent");
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, wait for exit, and return the counter report it printed.
    pub fn stop(self) -> Report {
        self.stop_with(libc::SIGTERM)
    }

    /// Sends `signal`, waits for a clean exit, and returns the counter report it printed.
    /// Sends `signal` and waits at most `limit` for the agent to exit (killing it and failing the
    /// test past that); the report and how long the exit took.
    pub fn stop_within(mut self, signal: i32, limit: Duration) -> (Report, Duration) {
        let started = Instant::now();
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(i32::try_from(self.child.id()).expect("pid"), signal) };
        // The report is read as it comes: a long one would fill the pipe and hold the agent up.
        let fd = std::os::fd::AsRawFd::as_raw_fd(self.stdout.get_ref());
        // SAFETY: F_SETFL on a pipe this process owns.
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        let mut report = Vec::new();
        let mut chunk = vec![0; 1 << 16];
        loop {
            while let Ok(n @ 1..) = std::io::Read::read(&mut self.stdout, &mut chunk) {
                report.extend_from_slice(&chunk[..n]);
            }
            if let Some(status) = self.child.try_wait().expect("wait agent") {
                let took = started.elapsed();
                // SAFETY: as above, blocking again to read the rest.
                unsafe { libc::fcntl(fd, libc::F_SETFL, 0) };
                std::io::Read::read_to_end(&mut self.stdout, &mut report).expect("report");
                let report = String::from_utf8(report).expect("a UTF-8 report");
                assert!(status.success(), "agent exited with {status}: {report}");
                return (Report(report), took);
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                panic!("the agent did not exit within {limit:?} of signal {signal}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the agent has logged so far (started by [`Agent::start_logging`]).
    pub fn log(&self) -> String {
        let log = self
            .log
            .as_ref()
            .expect("an agent started with start_logging");
        log.lock().expect("log").clone()
    }

    pub fn stop_with(mut self, signal: i32) -> Report {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(i32::try_from(self.child.id()).expect("pid"), signal) };
        let mut report = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut report).expect("agent report");
        let status = self.child.wait().expect("wait agent");
        assert!(status.success(), "agent exited with {status}: {report}");
        Report(report)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `matched` packets of which `mirrored` were copied, nothing else counted.
pub fn copied(matched: u64, mirrored: u64) -> Counts {
    Counts {
        matched,
        mirrored,
        ..Counts::default()
    }
}

/// Reads `child`'s first line from `output` and fails the test unless it contains `ready`.
pub(crate) fn await_first_line(
    child: &mut Child,
    output: &mut impl BufRead,
    ready: &str,
    what: &str,
) {
    let mut line = String::new();
    output.read_line(&mut line).expect("child output");
    assert!(
        line.contains(ready),
        "{what} did not start: {line:?} (status {:?})",
        child.wait()
    );
}

/// A child process killed on drop, so that a failing test leaves none behind.
#[derive(Debug)]
pub struct KilledOnDrop(pub Child);

impl KilledOnDrop {
    /// SIGINT, then waits (at most [`crate::DEADLINE`]) for the exit: its status and what the
    /// process wrote to stderr (when that was piped).
    pub fn interrupt(&mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(i32::try_from(self.0.id()).expect("pid"), libc::SIGINT) };
        let mut status = None;
        crate::wait_for("the process to end on SIGINT", || {
            status = self.0.try_wait().expect("child status");
            status.is_some()
        });
        let mut stderr = String::new();
        if let Some(mut pipe) = self.0.stderr.take() {
            std::io::Read::read_to_string(&mut pipe, &mut stderr).expect("stderr");
        }
        (status.expect("an exit status"), stderr)
    }
}

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The report the agent prints on exit (`run --json`: one JSON document).
#[derive(Debug)]
pub struct Report(pub String);

impl Report {
    /// The report's document.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.0.trim())
            .unwrap_or_else(|e| panic!("the report is not JSON ({e}):\n{}", self.0))
    }

    /// The counters of a rule (`"default"` for the default rule, `"guard"` for the tunnel guard).
    pub fn rule(&self, session: &str, rule: &str) -> Counts {
        let session = self.session_json(session);
        let found = session["rules"]
            .as_array()
            .and_then(|rules| rules.iter().find(|r| r["rule"] == rule))
            .unwrap_or_else(|| panic!("no rule {rule} in {session}"));
        packet_counts(&found["counters"])
    }

    /// Counters of a whole session.
    pub fn session(&self, session: &str) -> Counts {
        packet_counts(&self.session_json(session)["counters"])
    }

    /// A shadow session's figures, with the invariant every shadow test checks: each request
    /// seen was replayed or lost with a reason.
    pub fn shadow(&self, session: &str) -> serde_json::Value {
        let shadow = self.session_json(session)["shadow"].clone();
        let lost: u64 = shadow["lost"]
            .as_object()
            .unwrap_or_else(|| panic!("no shadow figures: {shadow}"))
            .values()
            .map(|v| v.as_u64().expect("count"))
            .sum();
        assert_eq!(
            shadow["requests"].as_u64(),
            Some(shadow["replayed"].as_u64().expect("replayed") + lost),
            "requests == replayed + lost: {shadow}"
        );
        shadow
    }

    fn session_json(&self, session: &str) -> serde_json::Value {
        self.entry(&["stats", "sessions"], "name", session)
    }

    /// A hook's counter (`ingress`, `egress`, `xdp`, `copy`).
    pub fn hook(&self, hook: &str, field: &str) -> u64 {
        let json = self.json();
        json["stats"][hook][field]
            .as_u64()
            .unwrap_or_else(|| panic!("no {field} of hook {hook} in {json}"))
    }

    /// A session's ring figure: copies the agent sent on (`sent`), or failed to (`failed`).
    pub fn ring(&self, session: &str, field: &str) -> u64 {
        number(&self.entry(&["ring"], "session", session), field)
    }

    /// A target interface's transmit losses (`tx_dropped`, `tx_errors`).
    pub fn target(&self, target: &str, field: &str) -> u64 {
        number(
            &self.entry(&["stats", "targets"], "interface", target),
            field,
        )
    }

    /// A tunnel session's last hop (`interface`, `next_hop_mac`) or `problem`.
    pub fn tunnel(&self, session: &str) -> serde_json::Value {
        self.entry(&["tunnels"], "session", session)
    }

    /// The entry of the list at `path` whose `key` is `value`.
    fn entry(&self, path: &[&str], key: &str, value: &str) -> serde_json::Value {
        let json = self.json();
        let list = path.iter().fold(&json, |node, step| &node[step]);
        list.as_array()
            .and_then(|entries| entries.iter().find(|e| e[key] == value))
            .cloned()
            .unwrap_or_else(|| panic!("no {key} {value} in {path:?} of {json}"))
    }
}

fn number(entry: &serde_json::Value, field: &str) -> u64 {
    entry[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {entry}"))
}

/// Packet counters only: the tests compare them exactly, and bytes where they check bytes.
fn packet_counts(counters: &serde_json::Value) -> Counts {
    let mut counts: Counts =
        serde_json::from_value(counters.clone()).unwrap_or_else(|e| panic!("{e}: {counters}"));
    for field in Counts::FIELDS.iter().filter(|f| f.counts_bytes()) {
        counts.set(field.name, 0);
    }
    counts
}

/// The (interface, direction) pairs `status --json` of the agent at `socket` lists as attached.
pub fn attached(ns: &Netns, socket: &str) -> Vec<(String, String)> {
    let (code, stdout, stderr) = agent_command(ns, &["status", "--json", "--api-socket", socket]);
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("status JSON");
    serde_json::from_value(status["attached"].clone()).expect("attached pairs")
}

/// `GET path` over HTTP/1.0 to `address` from inside `ns`: the status line and the body.
pub fn http_get(ns: &Netns, address: SocketAddr, path: &str) -> (String, String) {
    let request = format!("GET {path} HTTP/1.0\r\n\r\n");
    let response = ns.enter(move || {
        let mut stream =
            std::net::TcpStream::connect(address).expect("connect to the metrics address");
        std::io::Write::write_all(&mut stream, request.as_bytes()).expect("request");
        let mut response = String::new();
        std::io::Read::read_to_string(&mut stream, &mut response).expect("response");
        response
    });
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// The `OpenMetrics` checker: the Python client's strict parser (Debian's
/// `python3-prometheus-client`, for Debian's own Python) reads every family, and each must
/// carry the prefix and a help text. It prints the families' names.
const OPENMETRICS_CHECK: &str = r#"
import sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    if not family.name.startswith(sys.argv[1]) or not family.documentation:
        sys.exit(f"{family.name}: the prefix {sys.argv[1]} and a help text")
    print(family.name)
"#;

/// Fails the test unless `metrics` is valid `OpenMetrics` text whose every family starts with
/// `prefix` and has a help text (see [`OPENMETRICS_CHECK`]); the families' names.
pub fn check_openmetrics(metrics: &str, prefix: &str) -> Vec<String> {
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", OPENMETRICS_CHECK, prefix])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("Debian's python3 (python3-prometheus-client, from `cargo xtask setup`)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("metrics to the checker");
    let output = child.wait_with_output().expect("the checker");
    assert!(
        output.status.success(),
        "OpenMetrics: {}\n{metrics}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The body of `GET path` from the agent's API socket (a file: reachable from any namespace).
pub fn api_get(socket: &str, path: &str) -> String {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("the API socket");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n"
    )
    .expect("request");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (_, body) = answer.split_once("\r\n\r\n").expect("headers end");
    body.to_owned()
}

/// The hooks `status --json` lists for the session at `index`, as `interface/direction`, sorted.
pub fn session_hooks(ns: &Netns, socket: &str, index: usize) -> Vec<String> {
    let (code, stdout, stderr) = agent_command(ns, &["status", "--json", "--api-socket", socket]);
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("status JSON");
    let hooks: Vec<(String, String)> =
        serde_json::from_value(status["sessions"][index]["hooks"].clone()).expect("hooks");
    let mut hooks: Vec<String> = hooks.into_iter().map(|(i, d)| format!("{i}/{d}")).collect();
    hooks.sort();
    hooks
}

/// Runs the agent with `args` in a namespace and returns (exit code, stdout, stderr). A `run`
/// gets an API socket of its own, so that tests running at once do not meet on the default one.
pub fn agent_command(ns: &Netns, args: &[&str]) -> (i32, String, String) {
    let api_dir = tempfile::tempdir().expect("temp dir");
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &ns.name])
        .arg(agent_binary())
        .args(args);
    if args.first() == Some(&"run") && !args.contains(&"--api-socket") {
        command
            .arg("--api-socket")
            .arg(api_dir.path().join("agent.sock"));
    }
    let output = command.output().expect("run agent");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
