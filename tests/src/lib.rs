//! Harness for mirror's privileged integration tests: network namespaces behind guards, the agent as
//! a child process, `AF_PACKET` captures and senders, and a sentinel packet that tells a test when
//! every copy made before it has arrived.
//!
//! Topology of a [`Lab`] (every name is per test; interfaces are created inside the namespaces):
//!
//! ```text
//!  src ns            node ns (agent runs here)            sink ns
//!  eth0 10.10.1.2 ── src0 10.10.1.1 │ sink0 10.10.2.1 ── eth0 10.10.2.2
//!       fd00:1::2         fd00:1::1 │       fd00:2::1         fd00:2::2
//!                           mir0, mir1 (targets) ── eth0, eth1 in the mon ns
//! ```
//!
//! Namespaces and links are made with iproute2's `ip`: the tests exercise the agent's netlink use,
//! not their own, and `ip` keeps the topology readable.
//!
//! Ordering: copies are made synchronously in the context of the packet that triggers them, and a
//! veth delivers on the CPU it was handed the packet on. [`pin_to_first_cpu`] keeps a test's
//! senders on one CPU, so a sentinel sent last arrives after every copy made before it.
use std::{
    ffi::CString,
    io::{BufRead, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    process::{Child, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use etherparse::{LaxSlicedPacket, TransportSlice};

pub mod cases;
pub mod kube_api;

pub const SRC_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
pub const SINK_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 2);
pub const SRC_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);
pub const SINK_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 2);
pub const SRC_MAC: &str = "02:00:00:00:01:02";
pub const NODE_SRC_MAC: &str = "02:00:00:00:01:01";
pub const SINK_MAC: &str = "02:00:00:00:02:02";
pub const NODE_SINK_MAC: &str = "02:00:00:00:02:01";
/// The node's end of the underlay link to the collector ([`Lab::with_collector`]).
pub const NODE_UL_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const NODE_UL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xc, 0, 0, 0, 0, 0, 1);
pub const NODE_UL_MAC: &str = "02:00:00:00:05:01";
/// The collector's address on the underlay link.
pub const COL_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const COL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xc, 0, 0, 0, 0, 0, 2);
pub const COL_MAC: &str = "02:00:00:00:05:02";
/// The VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// UDP port of the sentinel datagram that closes every test's traffic.
pub const SENTINEL_PORT: u16 = 9;
/// A configuration with one session `t` targeting `mir0`, whose first rule mirrors the sentinel.
pub fn session_config(interfaces: &str, direction: &str, rules: &str) -> String {
    format!(
        "[[session]]\nname = \"t\"\ninterfaces = {interfaces}\ndirection = \"{direction}\"\ntarget = {{ interface = \"mir0\" }}\n{SENTINEL_RULE}{rules}"
    )
}

/// A rule every test configuration includes first: it mirrors the sentinel.
pub const SENTINEL_RULE: &str =
    "[[session.rule]]\nnumber = 1\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 9\n";
/// How long a test waits for a condition before it fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Fails the test unless it runs as root: a privileged test that cannot run must not pass.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests need root (network namespaces, BPF); run `sudo cargo xtask test`"
    );
}

/// Runs a command, failing the test with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {}: {}\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A network namespace, deleted (with every interface in it) on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // Quiet IPv6 on the interfaces made here later: no link-local address, no router
        // solicitations, and MLD reports sent at once when an address is added (while the lab is
        // built), not repeated up to a second later, when a test is running.
        for (key, value) in [
            ("addr_gen_mode", "1"),
            ("router_solicitations", "0"),
            ("accept_ra", "0"),
            ("mldv2_unsolicited_report_interval", "1"),
            ("mldv1_unsolicited_report_interval", "1"),
        ] {
            ns.sysctl(&format!("net.ipv6.conf.default.{key}"), value);
        }
        ns
    }

    /// `ip -n <ns> …`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// Runs `f` on a thread that has joined this namespace: sockets it creates belong here.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on this thread only, with a namespace file descriptor.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread")
    }

    /// Interface index of `name` in this namespace.
    pub fn ifindex(&self, name: &str) -> u32 {
        let name = CString::new(name).expect("no NUL");
        // SAFETY: if_nametoindex reads a C string.
        let index = self.enter(move || unsafe { libc::if_nametoindex(name.as_ptr()) });
        assert_ne!(index, 0, "no interface in {}", self.name);
        index
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veths (and their peers elsewhere).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// The four namespaces of a test; see the module docs.
#[derive(Debug)]
pub struct Lab {
    pub src: Netns,
    pub node: Netns,
    pub sink: Netns,
    pub mon: Netns,
    /// Receives the sentinel at the sink, so that it draws no ICMP port-unreachable back.
    sentinel_sink: Option<UdpSocket>,
    /// The collector's namespace, behind the node's `ul0` (see [`Lab::with_collector`]).
    pub col: Option<Netns>,
}

impl Lab {
    pub fn new(test: &str) -> Self {
        require_root();
        let id = format!(
            "m{}-{}-{test}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            src: Netns::new(format!("{id}-src")),
            node: Netns::new(format!("{id}-node")),
            sink: Netns::new(format!("{id}-sink")),
            mon: Netns::new(format!("{id}-mon")),
            sentinel_sink: None,
            col: None,
        };
        lab.wire();
        lab.address();
        lab.bring_up();
        lab.route();
        lab.sentinel_sink = Some(udp_socket(
            &lab.sink,
            SocketAddr::new(SINK_V4.into(), SENTINEL_PORT),
        ));
        lab
    }

    /// A lab plus a collector namespace reached over an underlay link with this MTU:
    /// node `ul0` ([`NODE_UL_V4`], [`NODE_UL_V6`]) ── `eth0` in `col` ([`COL_V4`], [`COL_V6`]).
    /// `col` also has a veth pair `tap0` ── `tap1` for the collector's `--tap` output.
    pub fn with_collector(test: &str, underlay_mtu: u32) -> Self {
        let mut lab = Lab::new(test);
        let col = Netns::new(format!("{}-col", lab.node.name.trim_end_matches("-node")));
        col.ip(&[
            "link",
            "add",
            "eth0",
            "address",
            COL_MAC,
            "mtu",
            &underlay_mtu.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            "ul0",
            "address",
            NODE_UL_MAC,
            "netns",
            &lab.node.name,
        ]);
        lab.node
            .ip(&["link", "set", "ul0", "mtu", &underlay_mtu.to_string()]);
        for (ns, dev, v4, v6, peer_v4, peer_v6, peer_mac) in [
            (
                &lab.node, "ul0", NODE_UL_V4, NODE_UL_V6, COL_V4, COL_V6, COL_MAC,
            ),
            (
                &col,
                "eth0",
                COL_V4,
                COL_V6,
                NODE_UL_V4,
                NODE_UL_V6,
                NODE_UL_MAC,
            ),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev]);
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            for peer in [peer_v4.to_string(), peer_v6.to_string()] {
                ns.ip(&[
                    "neigh",
                    "replace",
                    &peer,
                    "lladdr",
                    peer_mac,
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ]);
            }
            ns.ip(&["link", "set", dev, "up"]);
        }
        // The collector's --tap output: frames it sends out of tap0 arrive at tap1.
        col.ip(&[
            "link", "add", "tap0", "type", "veth", "peer", "name", "tap1",
        ]);
        col.ip(&["link", "set", "tap0", "up"]);
        col.ip(&["link", "set", "tap1", "up"]);
        for (ns, dev) in [
            (&lab.node, "ul0"),
            (&col, "eth0"),
            (&col, "tap0"),
            (&col, "tap1"),
        ] {
            wait_for(&format!("{dev} in {} to be up", ns.name), || {
                ns.ip(&["-j", "link", "show", "dev", dev])
                    .contains("\"operstate\":\"UP\"")
            });
        }
        lab.col = Some(col);
        lab
    }

    /// The collector's namespace; only in a lab made by [`Lab::with_collector`].
    pub fn col(&self) -> &Netns {
        self.col.as_ref().expect("a lab with a collector")
    }

    /// Creates the veth pairs, with fixed MAC addresses.
    fn wire(&self) {
        let node = self.node.name.as_str();
        for (ns, dev, mac, peer, peer_mac) in [
            (&self.src, "eth0", SRC_MAC, "src0", NODE_SRC_MAC),
            (&self.sink, "eth0", SINK_MAC, "sink0", NODE_SINK_MAC),
            (
                &self.mon,
                "eth0",
                "02:00:00:00:03:02",
                "mir0",
                "02:00:00:00:03:01",
            ),
            (
                &self.mon,
                "eth1",
                "02:00:00:00:04:02",
                "mir1",
                "02:00:00:00:04:01",
            ),
        ] {
            ns.ip(&[
                "link", "add", dev, "address", mac, "type", "veth", "peer", "name", peer,
                "address", peer_mac, "netns", node,
            ]);
        }
    }

    /// Addresses, forwarding, and no IPv6 on the mirror side.
    fn address(&self) {
        // No IPv6 on the mirror side: the only frames there are copies.
        self.mon.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        self.mon.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
        for target in ["mir0", "mir1"] {
            self.node
                .sysctl(&format!("net.ipv6.conf.{target}.disable_ipv6"), "1");
        }
        self.node.sysctl("net.ipv4.ip_forward", "1");
        self.node.sysctl("net.ipv6.conf.all.forwarding", "1");
        let addresses = [
            (&self.src, "eth0", "10.10.1.2/24", "fd00:1::2/64"),
            (&self.node, "src0", "10.10.1.1/24", "fd00:1::1/64"),
            (&self.node, "sink0", "10.10.2.1/24", "fd00:2::1/64"),
            (&self.sink, "eth0", "10.10.2.2/24", "fd00:2::2/64"),
        ];
        for (ns, dev, v4, v6) in addresses {
            ns.ip(&["addr", "add", v4, "dev", dev]);
            ns.ip(&["-6", "addr", "add", v6, "dev", dev, "nodad"]);
        }
    }

    /// Sets every link up and waits until the kernel has acted on it.
    fn bring_up(&self) {
        let links = [
            (&self.src, "eth0"),
            (&self.sink, "eth0"),
            (&self.mon, "eth0"),
            (&self.mon, "eth1"),
            (&self.node, "src0"),
            (&self.node, "sink0"),
            (&self.node, "mir0"),
            (&self.node, "mir1"),
        ];
        for (ns, dev) in links {
            ns.ip(&["link", "set", dev, "up"]);
        }
        // The kernel acts on carrier changes up to a second later (linkwatch) and only then sends
        // its MLD reports: wait for that here, or they would land in the middle of a test.
        for (ns, dev) in links {
            wait_for(
                &format!("{dev} in {} to be operationally up", ns.name),
                || {
                    ns.ip(&["-j", "link", "show", "dev", dev])
                        .contains("\"operstate\":\"UP\"")
                },
            );
        }
    }

    /// Static neighbours and default routes.
    fn route(&self) {
        // Static neighbours: no ARP or ND, whose resolution would reorder packets and add frames.
        for (ns, dev, v4, v6, mac) in [
            (&self.src, "eth0", "10.10.1.1", "fd00:1::1", NODE_SRC_MAC),
            (&self.node, "src0", "10.10.1.2", "fd00:1::2", SRC_MAC),
            (&self.node, "sink0", "10.10.2.2", "fd00:2::2", SINK_MAC),
            (&self.sink, "eth0", "10.10.2.1", "fd00:2::1", NODE_SINK_MAC),
        ] {
            for addr in [v4, v6] {
                ns.ip(&[
                    "neigh",
                    "replace",
                    addr,
                    "lladdr",
                    mac,
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ]);
            }
        }
        self.src
            .ip(&["route", "add", "default", "via", "10.10.1.1"]);
        self.src
            .ip(&["-6", "route", "add", "default", "via", "fd00:1::1"]);
        self.sink
            .ip(&["route", "add", "default", "via", "10.10.2.1"]);
        self.sink
            .ip(&["-6", "route", "add", "default", "via", "fd00:2::1"]);
    }

    /// Sends the sentinel datagram from src to sink (through src0 ingress and sink0 egress).
    pub fn send_sentinel(&self) {
        let socket = self
            .src
            .enter(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
        pin_to_first_cpu();
        socket
            .send_to(b"sentinel", (SINK_V4, SENTINEL_PORT))
            .expect("send sentinel");
    }

    /// Starts the agent in the node namespace with this configuration.
    pub fn start_agent(&self, config: &str) -> Agent {
        Agent::start(&self.node, &agent_binary(), config)
    }

    /// Starts `mirror-agent collect` in the collector namespace with its `--tap` on `tap0`.
    pub fn start_collector(&self, listen: &str, file_name: &str) -> Collector {
        Collector::start(
            self.col(),
            &agent_binary(),
            listen,
            file_name,
            &["--tap", "tap0"],
        )
    }
}

/// Polls `condition` every 10 ms until it holds, failing the test after [`DEADLINE`].
pub fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Keeps the calling thread on CPU 0, so the packets it sends are processed there in order.
pub fn pin_to_first_cpu() {
    pin_to_cpu(0);
}

/// Keeps the calling thread on one CPU.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one CPU set, applied to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
        assert_eq!(rc, 0, "sched_setaffinity");
    }
}

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
}

impl Agent {
    /// Runs `binary` with `config` in `node` and waits until it has attached.
    pub fn start(node: &Netns, binary: &std::path::Path, config: &str) -> Self {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(&mut file, config.as_bytes()).expect("write config");
        let mut agent = Agent::start_file(node, binary, file.path(), &[]);
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
        let config = std::fs::read_to_string(path).expect("read config");
        // Agents of tests running at once each need their own API socket.
        let api_dir = tempfile::tempdir().expect("temp dir");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &node.name])
            .arg(binary)
            .args(["run", "--stats-interval", "0", "--config"])
            .arg(path)
            .args(extra);
        if !config.contains("api_socket") {
            command
                .arg("--api-socket")
                .arg(api_dir.path().join("agent.sock"));
        }
        let mut child = command.stdout(Stdio::piped()).spawn().expect("spawn agent");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        // The agent prints this line once every hook is attached; EOF means it failed to start.
        await_first_line(&mut child, &mut stdout, "attached to", "agent");
        Agent {
            child,
            stdout,
            config_file: None,
            _api_dir: api_dir,
        }
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

/// A rule's or session's counters, as the agent reports them.
pub type Counts = mirror_common::Counters;

/// `matched` packets of which `mirrored` were copied, nothing else counted.
pub fn copied(matched: u64, mirrored: u64) -> Counts {
    Counts {
        matched,
        mirrored,
        ..Counts::default()
    }
}

/// Reads `child`'s first line from `output` and fails the test unless it contains `ready`.
fn await_first_line(child: &mut Child, output: &mut impl BufRead, ready: &str, what: &str) {
    let mut line = String::new();
    output.read_line(&mut line).expect("child output");
    assert!(
        line.contains(ready),
        "{what} did not start: {line:?} (status {:?})",
        child.wait()
    );
}

/// The counter table the agent prints on exit.
#[derive(Debug)]
pub struct Report(pub String);

impl Report {
    /// The counters of a rule (`"default"` for the default rule, `"guard"` for the tunnel guard).
    pub fn rule(&self, session: &str, rule: &str) -> Counts {
        self.row("rule", session, rule)
    }

    /// Counters of a whole session.
    pub fn session(&self, session: &str) -> Counts {
        self.row("session", session, "-")
    }

    fn row(&self, kind: &str, session: &str, rule: &str) -> Counts {
        let line = self
            .0
            .lines()
            .find(|l| {
                let mut words = l.split_whitespace();
                words.next() == Some(kind)
                    && words.next() == Some(session)
                    && words.next() == Some(rule)
            })
            .unwrap_or_else(|| panic!("no {kind} {session} {rule} in report:\n{}", self.0));
        // The header line names the counters' columns.
        let header = self
            .0
            .lines()
            .find(|l| l.starts_with("counter "))
            .unwrap_or_else(|| panic!("no counter header in report:\n{}", self.0));
        let mut counts = Counts::default();
        for (name, value) in header
            .split_whitespace()
            .zip(line.split_whitespace())
            .skip(3)
        {
            assert!(
                counts.set(name, value.parse().expect("number")),
                "unknown counter {name}"
            );
        }
        counts
    }

    /// A hook line's `name=value` field.
    pub fn hook(&self, hook: &str, field: &str) -> u64 {
        self.field("hook", hook, field)
    }

    /// A ring line's `name=value` field (copies the agent sent on, or failed to, per session).
    pub fn ring(&self, session: &str, field: &str) -> u64 {
        self.field("ring", session, field)
    }

    /// A target line's `name=value` field.
    pub fn target(&self, target: &str, field: &str) -> u64 {
        self.field("target", target, field)
    }

    fn field(&self, kind: &str, name: &str, field: &str) -> u64 {
        let line = self
            .0
            .lines()
            .find(|l| l.starts_with(kind) && l.split_whitespace().nth(1) == Some(name));
        let line = line.unwrap_or_else(|| panic!("no {kind} {name} in report:\n{}", self.0));
        line.split_whitespace()
            .find_map(|w| {
                w.strip_prefix(&format!("{field}="))
                    .map(|v| v.parse().expect("number"))
            })
            .unwrap_or_else(|| panic!("no {field} in {line}"))
    }
}

/// A frame captured by a packet socket, with any VLAN tag the kernel held in metadata put back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Frame {
    pub bytes: Vec<u8>,
    /// Sent by this host (`PACKET_OUTGOING`) rather than received.
    pub outgoing: bool,
}

/// An `AF_PACKET` socket on one interface of a namespace, seeing every frame in both directions.
#[derive(Debug)]
pub struct Capture {
    fd: OwnedFd,
}

const ETH_P_ALL: u16 = 0x0003;

fn packet_socket(ns: &Netns, interface: &str) -> OwnedFd {
    let ifindex = ns.ifindex(interface);
    ns.enter(move || {
        // SAFETY: plain socket syscalls on a descriptor we own.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                i32::from(ETH_P_ALL.to_be()),
            );
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = ETH_P_ALL.to_be();
            addr.sll_ifindex = i32::try_from(ifindex).expect("ifindex");
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(
                rc,
                0,
                "bind packet socket: {}",
                std::io::Error::last_os_error()
            );
            fd
        }
    })
}

impl Capture {
    pub fn open(ns: &Netns, interface: &str) -> Self {
        let fd = packet_socket(ns, interface);
        let one: i32 = 1;
        // SAFETY: setsockopt with an int option.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_AUXDATA,
                (&raw const one).cast(),
                4,
            )
        };
        assert_eq!(rc, 0, "PACKET_AUXDATA");
        // Room for every frame of a test, read only after the traffic: a full socket buffer drops.
        let bytes: i32 = 64 << 20;
        // SAFETY: as above.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const bytes).cast(),
                4,
            )
        };
        assert_eq!(rc, 0, "SO_RCVBUFFORCE");
        Capture { fd }
    }

    /// Next frame, waiting until `deadline`.
    fn next(&self, deadline: Instant) -> Option<Frame> {
        loop {
            if let Some(frame) = self.try_recv() {
                return Some(frame);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            let mut poll = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd.
            unsafe { libc::poll(&raw mut poll, 1, left.as_millis().min(1000) as i32) };
        }
    }

    fn try_recv(&self) -> Option<Frame> {
        let mut buf = vec![0u8; 65_600];
        let mut control = [0u64; 16];
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr points at live buffers for the duration of recvmsg.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&raw mut addr).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_ll>() as u32;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of_val(&control);
        // SAFETY: as above.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &raw mut msg, libc::MSG_TRUNC) };
        buf.truncate(usize::try_from(n).ok()?);
        // SAFETY: walking the control messages the kernel wrote into `control`.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_PACKET
                    && (*cmsg).cmsg_type == libc::PACKET_AUXDATA
                {
                    let aux = libc::CMSG_DATA(cmsg)
                        .cast::<libc::tpacket_auxdata>()
                        .read_unaligned();
                    if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                        let tpid = if aux.tp_status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                            aux.tp_vlan_tpid
                        } else {
                            0x8100
                        };
                        let tag = [tpid.to_be_bytes(), aux.tp_vlan_tci.to_be_bytes()].concat();
                        buf.splice(12..12, tag);
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
            }
        }
        Some(Frame {
            bytes: buf,
            outgoing: addr.sll_pkttype == libc::PACKET_OUTGOING,
        })
    }

    /// Every frame that arrives before the sentinel (which is consumed), in order.
    pub fn until_sentinel(&self) -> Vec<Frame> {
        let mut frames = self.until_nth(1, is_sentinel);
        frames.pop();
        frames
    }

    /// Every frame up to and including the `n`th one that satisfies `last`, in order.
    pub fn until_nth(&self, n: usize, last: impl Fn(&[u8]) -> bool) -> Vec<Frame> {
        let deadline = Instant::now() + DEADLINE;
        let mut frames = Vec::new();
        let mut seen = 0;
        while seen < n {
            let frame = self.next(deadline).unwrap_or_else(|| {
                panic!(
                    "only {seen} of {n} closing frame(s) within {DEADLINE:?}; got {} frame(s): {:?}",
                    frames.len(),
                    summarize(&frames)
                )
            });
            if last(&frame.bytes) {
                seen += 1;
            }
            frames.push(frame);
        }
        frames
    }

    /// The bytes of every frame received (not sent by the capture's own namespace) before the
    /// sentinel.
    pub fn received_until_sentinel(&self) -> Vec<Vec<u8>> {
        self.until_sentinel()
            .into_iter()
            .filter(|f| !f.outgoing)
            .map(|f| f.bytes)
            .collect()
    }

    /// The bytes of every frame that arrives before the sentinel.
    pub fn bytes_until_sentinel(&self) -> Vec<Vec<u8>> {
        self.until_sentinel().into_iter().map(|f| f.bytes).collect()
    }

    /// Every frame queued now, without waiting.
    pub fn drain(&self) -> Vec<Frame> {
        std::iter::from_fn(|| self.try_recv()).collect()
    }
}

/// Sends raw Ethernet frames out of an interface of a namespace (bypassing nothing: they traverse
/// the interface's TC egress hook).
#[derive(Debug)]
pub struct FrameSender {
    fd: OwnedFd,
}

impl FrameSender {
    pub fn open(ns: &Netns, interface: &str) -> Self {
        FrameSender {
            fd: packet_socket(ns, interface),
        }
    }

    /// Sends the sentinel as a raw UDP frame between these MAC addresses.
    pub fn send_sentinel(&self, src_mac: &str, dst_mac: &str) {
        self.send(&udp_v4_frame(src_mac, dst_mac, SENTINEL_PORT, b"sentinel"));
    }

    pub fn send(&self, frame: &[u8]) {
        pin_to_first_cpu();
        // SAFETY: send on a bound packet socket.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            isize::try_from(frame.len()).expect("frame length"),
            "send frame: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The L3/L4 summary of a frame, for test oracles and failure messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub proto: Option<u8>,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
}

impl Flow {
    pub fn of(frame: &[u8]) -> Flow {
        let mut flow = Flow {
            src: None,
            dst: None,
            proto: None,
            src_port: None,
            dst_port: None,
        };
        let Ok(packet) = LaxSlicedPacket::from_ethernet(frame) else {
            return flow;
        };
        match &packet.net {
            Some(etherparse::LaxNetSlice::Ipv4(ip)) => {
                flow.src = Some(ip.header().source_addr().into());
                flow.dst = Some(ip.header().destination_addr().into());
                flow.proto = Some(ip.header().protocol().0);
            }
            Some(etherparse::LaxNetSlice::Ipv6(ip)) => {
                flow.src = Some(ip.header().source_addr().into());
                flow.dst = Some(ip.header().destination_addr().into());
                flow.proto = Some(ip.payload().ip_number.0);
            }
            _ => {}
        }
        match &packet.transport {
            Some(TransportSlice::Udp(udp)) => {
                flow.src_port = Some(udp.source_port());
                flow.dst_port = Some(udp.destination_port());
            }
            Some(TransportSlice::Tcp(tcp)) => {
                flow.src_port = Some(tcp.source_port());
                flow.dst_port = Some(tcp.destination_port());
            }
            _ => {}
        }
        flow
    }
}

/// Whether a frame is one of the kernel's own `MLDv2` reports (to `ff02::16`), which a link sends
/// for a while after it comes up: never a copy.
pub fn is_mld_report(frame: &[u8]) -> bool {
    frame.starts_with(&[0x33, 0x33, 0, 0, 0, 0x16])
}

/// Whether `frame` is the sentinel datagram.
pub fn is_sentinel(frame: &[u8]) -> bool {
    let flow = Flow::of(frame);
    flow.proto == Some(17) && flow.dst_port == Some(SENTINEL_PORT)
}

fn summarize(frames: &[Frame]) -> Vec<Flow> {
    frames.iter().map(|f| Flow::of(&f.bytes)).collect()
}

/// Asserts two frame multisets are equal, with a readable diff on failure.
pub fn assert_same_frames(what: &str, mut copies: Vec<Vec<u8>>, mut expected: Vec<Vec<u8>>) {
    copies.sort();
    expected.sort();
    if copies != expected {
        let missing: Vec<_> = expected
            .iter()
            .filter(|f| !copies.contains(f))
            .map(|f| Flow::of(f))
            .collect();
        let extra: Vec<_> = copies
            .iter()
            .filter(|f| !expected.contains(f))
            .map(|f| Flow::of(f))
            .collect();
        panic!(
            "{what}: {} copies, {} expected\nmissing: {missing:?}\nextra: {extra:?}",
            copies.len(),
            expected.len()
        );
    }
}

/// A UDP socket bound in a namespace.
pub fn udp_socket(ns: &Netns, bind: SocketAddr) -> UdpSocket {
    ns.enter(move || {
        let socket = UdpSocket::bind(bind).expect("bind udp");
        socket.set_read_timeout(Some(DEADLINE)).expect("timeout");
        socket
    })
}

/// Keeps only the frames whose flow satisfies `keep`.
pub fn select(frames: &[Frame], keep: impl Fn(&Flow, &Frame) -> bool) -> Vec<Vec<u8>> {
    frames
        .iter()
        .filter(|f| keep(&Flow::of(&f.bytes), f))
        .map(|f| f.bytes.clone())
        .collect()
}

/// MAC address text (`02:00:…`) as bytes.
pub fn mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("six bytes")
}

/// An untagged IPv4/UDP frame between two MACs.
pub fn udp_v4_frame(src_mac: &str, dst_mac: &str, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2(mac(src_mac), mac(dst_mac))
        .ipv4(SRC_V4.octets(), SINK_V4.octets(), 64)
        .udp(40_000, dst_port);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("build frame");
    frame
}

/// An untagged IPv6/UDP frame between two MACs.
pub fn udp_v6_frame(src_mac: &str, dst_mac: &str, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2(mac(src_mac), mac(dst_mac))
        .ipv6(SRC_V6.octets(), SINK_V6.octets(), 64)
        .udp(40_000, dst_port);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("build frame");
    frame
}

/// `frame` with VLAN tags `(tpid, vid)` inserted after the MAC addresses, outermost first.
pub fn tagged(frame: &[u8], tags: &[(u16, u16)]) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    for (tpid, vid) in tags {
        out.extend(tpid.to_be_bytes());
        out.extend(vid.to_be_bytes());
    }
    out.extend(&frame[12..]);
    out
}

/// Names of the TCX programs attached to an interface of a namespace, ingress then egress.
pub fn tcx_programs(ns: &Netns, interface: &str) -> [Vec<String>; 2] {
    let interface = interface.to_owned();
    ns.enter(move || {
        [
            aya::programs::TcAttachType::Ingress,
            aya::programs::TcAttachType::Egress,
        ]
        .map(|hook| {
            let (_, programs) =
                aya::programs::SchedClassifier::query_tcx(&interface, hook).expect("query tcx");
            programs
                .iter()
                .map(|p| p.name_as_str().unwrap_or("?").to_owned())
                .collect()
        })
    })
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

/// A VXLAN datagram seen on the wire: its outer UDP source port, VNI and inner frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vxlan {
    pub outer_src_port: u16,
    /// The outer IPv4 header has DF set, or the outer header is IPv6.
    pub dont_fragment: bool,
    /// The outer packet is an IP fragment.
    pub fragment: bool,
    pub vni: u32,
    pub inner: Vec<u8>,
}

/// The VXLAN contents of a frame sent to [`VXLAN_PORT`], if it is one.
pub fn vxlan_of(frame: &[u8]) -> Option<Vxlan> {
    let packet = LaxSlicedPacket::from_ethernet(frame).ok()?;
    let (dont_fragment, fragment) = match &packet.net {
        Some(etherparse::LaxNetSlice::Ipv4(ip)) => (
            ip.header().dont_fragment(),
            ip.header().more_fragments() || ip.header().fragments_offset().value() != 0,
        ),
        Some(etherparse::LaxNetSlice::Ipv6(ip)) => (true, ip.payload().fragmented),
        _ => return None,
    };
    let Some(TransportSlice::Udp(udp)) = &packet.transport else {
        return None;
    };
    let payload = udp.payload();
    if udp.destination_port() != VXLAN_PORT || payload.len() < 8 || payload[0] & 0x08 == 0 {
        return None;
    }
    Some(Vxlan {
        outer_src_port: udp.source_port(),
        dont_fragment,
        fragment,
        vni: u32::from_be_bytes([0, payload[4], payload[5], payload[6]]),
        inner: payload[8..].to_vec(),
    })
}

/// A copy in any of the agent's tunnel formats, as seen on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnelled {
    /// `vxlan`, `geneve`, `gre` or `erspan`.
    pub format: &'static str,
    /// VNI, GRE key or ERSPAN session id.
    pub id: Option<u32>,
    /// The GRE sequence number (ERSPAN).
    pub sequence: Option<u32>,
    /// ERSPAN type III: the direction bit (true: egress).
    pub egress: Option<bool>,
    pub outer_dst_mac: [u8; 6],
    /// The outer IPv4 header has DF set, or the outer header is IPv6; and no fragment.
    pub whole: bool,
    pub inner: Vec<u8>,
}

/// The tunnel contents of a frame: VXLAN to [`VXLAN_PORT`], GENEVE to 6081, GRE (Ethernet) and
/// ERSPAN type II and III. An independent reading of RFC 7348, RFC 8926 and the ERSPAN draft,
/// not the agent's.
pub fn tunnelled(frame: &[u8]) -> Option<Tunnelled> {
    let packet = LaxSlicedPacket::from_ethernet(frame).ok()?;
    let (whole, protocol, payload) = match &packet.net {
        Some(etherparse::LaxNetSlice::Ipv4(ip)) => (
            ip.header().dont_fragment()
                && !ip.header().more_fragments()
                && ip.header().fragments_offset().value() == 0,
            ip.header().protocol().0,
            ip.payload().payload,
        ),
        Some(etherparse::LaxNetSlice::Ipv6(ip)) => (
            !ip.payload().fragmented,
            ip.payload().ip_number.0,
            ip.payload().payload,
        ),
        _ => return None,
    };
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(
            payload.get(at..at + 4)?.try_into().ok()?,
        ))
    };
    let mut found = Tunnelled {
        format: "",
        id: None,
        sequence: None,
        egress: None,
        outer_dst_mac: frame.get(..6)?.try_into().ok()?,
        whole,
        inner: Vec::new(),
    };
    let inner_at = match (
        protocol,
        u16::from_be_bytes(payload.get(2..4)?.try_into().ok()?),
    ) {
        (17, VXLAN_PORT) => {
            found.format = "vxlan";
            found.id = Some(word(12)? >> 8);
            16
        }
        (17, 6081) => {
            found.format = "geneve";
            found.id = Some(word(12)? >> 8);
            16 + usize::from(payload[8] & 0x3f) * 4
        }
        (47, gre_protocol) => {
            let flags = payload[0];
            let mut at = 4 + if flags & 0x80 != 0 { 4 } else { 0 };
            if flags & 0x20 != 0 {
                found.id = Some(word(at)?);
                at += 4;
            }
            if flags & 0x10 != 0 {
                found.sequence = Some(word(at)?);
                at += 4;
            }
            match gre_protocol {
                0x6558 => {
                    found.format = "gre";
                    at
                }
                0x88be | 0x22eb => {
                    found.format = "erspan";
                    found.id = Some(word(at)? & 0x03ff);
                    if gre_protocol == 0x22eb {
                        found.egress = Some(payload.get(at + 11)? & 0x08 != 0);
                        at + 12
                    } else {
                        at + 8
                    }
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    found.inner = payload.get(inner_at..)?.to_vec();
    Some(found)
}

/// Whether `frame` is a tunnelled copy of the sentinel.
pub fn is_tunnelled_sentinel(frame: &[u8]) -> bool {
    tunnelled(frame).is_some_and(|t| is_sentinel(&t.inner))
}

/// Whether `frame` is a VXLAN copy of the sentinel.
pub fn is_vxlan_sentinel(frame: &[u8]) -> bool {
    vxlan_of(frame).is_some_and(|v| is_sentinel(&v.inner))
}

/// UDP datagrams the namespace's stack has delivered to sockets (`Udp: InDatagrams`, both IP
/// versions).
pub fn udp_datagrams_delivered(ns: &Netns) -> u64 {
    let v4 = ns.exec(&["cat", "/proc/net/snmp"]);
    let mut lines = v4.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (
        lines.next().expect("Udp names"),
        lines.next().expect("Udp values"),
    );
    let column = names
        .split_whitespace()
        .position(|n| n == "InDatagrams")
        .expect("InDatagrams");
    let v4_count: u64 = values
        .split_whitespace()
        .nth(column)
        .and_then(|v| v.parse().ok())
        .expect("InDatagrams value");
    let v6 = ns.exec(&["cat", "/proc/net/snmp6"]);
    let v6_count: u64 = v6
        .lines()
        .find_map(|l| l.strip_prefix("Udp6InDatagrams"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    v4_count + v6_count
}

/// `mirror-agent collect` running in a namespace, stopped with SIGINT.
#[derive(Debug)]
pub struct Collector {
    child: Child,
    file: std::path::PathBuf,
    /// The fresh directory of the file, when this made it.
    dir: Option<tempfile::TempDir>,
}

impl Collector {
    /// Starts the collector listening on `listen`, writing `file_name` in a fresh directory, and
    /// waits until it listens.
    pub fn start(
        ns: &Netns,
        binary: &std::path::Path,
        listen: &str,
        file_name: &str,
        extra: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut collector =
            Collector::start_at(ns, binary, listen, &dir.path().join(file_name), extra);
        collector.dir = Some(dir);
        collector
    }

    /// Starts the collector listening on `listen`, writing `file`, and waits until it listens.
    pub fn start_at(
        ns: &Netns,
        binary: &std::path::Path,
        listen: &str,
        file: &std::path::Path,
        extra: &[&str],
    ) -> Self {
        let file = file.to_path_buf();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(binary)
            .args([
                "collect",
                "--stats-interval",
                "0",
                "--listen",
                listen,
                "--write",
            ])
            .arg(&file)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn collector");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        await_first_line(&mut child, &mut stderr, "listening on", "collector");
        Collector {
            child,
            file,
            dir: None,
        }
    }

    /// SIGINT, wait for a clean exit, and return its summary.
    pub fn stop(mut self) -> CollectorSummary {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(i32::try_from(self.child.id()).expect("pid"), libc::SIGINT) };
        let mut out = String::new();
        std::io::Read::read_to_string(self.child.stdout.as_mut().expect("stdout"), &mut out)
            .expect("collector summary");
        let status = self.child.wait().expect("wait collector");
        assert!(status.success(), "collector exited with {status}: {out}");
        CollectorSummary {
            text: out,
            file: self.file.clone(),
            _dir: self.dir.take(),
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `mirror-agent collect` printed on exit, and the file it wrote.
#[derive(Debug)]
pub struct CollectorSummary {
    pub text: String,
    pub file: std::path::PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl CollectorSummary {
    /// The frames of the capture file (pcap or pcapng), in order, with the pcapng interface name.
    pub fn written(&self) -> Vec<(Option<String>, Vec<u8>)> {
        capture_file_frames(&self.file)
    }

    /// Frames received with this VXLAN VNI.
    pub fn vni_frames(&self, vni: u32) -> u64 {
        self.stream(&format!("vxlan:{vni}"), 1)
    }

    /// Frames received in a stream (`vxlan:7`, `geneve:7`, `gre`, `gre:5`, `erspan:3`).
    pub fn stream_frames(&self, stream: &str) -> u64 {
        self.stream(stream, 1)
    }

    /// Copies an ERSPAN stream lost, by its sequence numbers.
    pub fn stream_lost(&self, stream: &str) -> u64 {
        self.stream(stream, 3)
    }

    /// Column `column` of a stream's summary line (0 if the stream never came).
    fn stream(&self, stream: &str, column: usize) -> u64 {
        self.text
            .lines()
            .find_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                (words.first() == Some(&stream)).then(|| words.get(column)?.parse().ok())?
            })
            .unwrap_or(0)
    }

    /// A `dropped` line's `name=value` field.
    pub fn dropped(&self, field: &str) -> u64 {
        self.text
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{field}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in {}", self.text))
    }
}

/// The frames of a pcap file, in order.
pub fn pcap_frames(file: &std::path::Path) -> Vec<Vec<u8>> {
    let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut reader = pcap_file::pcap::PcapReader::new(data.as_slice()).expect("pcap");
    let mut frames = Vec::new();
    while let Some(packet) = reader.next_packet() {
        frames.push(packet.expect("pcap packet").data.to_vec());
    }
    frames
}

/// The frames of a pcap or pcapng file, in order, with their pcapng interface names.
pub fn capture_file_frames(file: &std::path::Path) -> Vec<(Option<String>, Vec<u8>)> {
    let data = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    if file.extension().is_some_and(|e| e == "pcapng") {
        let mut reader = pcap_file::pcapng::PcapNgReader::new(data.as_slice()).expect("pcapng");
        let mut names = Vec::new();
        let mut frames = Vec::new();
        while let Some(block) = reader.next_block() {
            match block.expect("pcapng block") {
                pcap_file::pcapng::Block::InterfaceDescription(idb) => {
                    names.push(idb.options.iter().find_map(|o| match o {
                        pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionOption::IfName(n) => Some(n.to_string()),
                        _ => None,
                    }));
                }
                pcap_file::pcapng::Block::EnhancedPacket(epb) => {
                    frames.push((names[epb.interface_id as usize].clone(), epb.data.to_vec()));
                }
                _ => {}
            }
        }
        frames
    } else {
        pcap_frames(file).into_iter().map(|f| (None, f)).collect()
    }
}

/// Writes frames to a pcap file (for tshark).
pub fn write_pcap(path: &std::path::Path, frames: &[Vec<u8>]) {
    let file = std::fs::File::create(path).expect("create pcap");
    let mut writer = pcap_file::pcap::PcapWriter::new(file).expect("pcap writer");
    for frame in frames {
        writer
            .write_packet(&pcap_file::pcap::PcapPacket::new(
                Duration::ZERO,
                frame.len() as u32,
                frame,
            ))
            .expect("write pcap");
    }
}

/// One line per packet of `tshark -r FILE [-d …] -T fields -e FIELD…`, fields tab-separated.
pub fn tshark_fields(
    file: &std::path::Path,
    decode_as: Option<&str>,
    fields: &[&str],
) -> Vec<String> {
    let mut command = Command::new("tshark");
    command.arg("-r").arg(file);
    if let Some(rule) = decode_as {
        command.args(["-d", rule]);
    }
    command.args(["-T", "fields"]);
    for field in fields {
        command.args(["-e", field]);
    }
    let output = command
        .output()
        .expect("tshark (installed by cargo xtask setup)");
    assert!(
        output.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Frames sent one after another from a thread until stopped (or a bound is reached): frame `n`
/// is `frame(n)`. Sends at most `max` frames, in bursts of 8 with a millisecond between them (about
/// 8,000 frames per second), so that the captures of a test keep every frame.
#[derive(Debug)]
pub struct TrafficLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u32>>,
}

impl TrafficLoop {
    pub fn start(
        sender: FrameSender,
        max: u32,
        frame: impl Fn(u32) -> Vec<u8> + Send + 'static,
    ) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_mins(1);
            let mut sent = 0;
            while sent < max && Instant::now() < deadline && !stopping.load(Ordering::Relaxed) {
                sender.send(&frame(sent));
                sent += 1;
                if sent % 8 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            sent
        });
        TrafficLoop {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the loop and returns how many frames it sent.
    pub fn finish(mut self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("traffic thread")
    }
}

impl Drop for TrafficLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A bpffs mounted on a temporary directory for a test's pinned mode (the host's /sys/fs/bpf is
/// not visible inside `ip netns exec`, which mounts a sysfs of its own); unmounted on drop.
#[derive(Debug)]
pub struct BpfFs {
    dir: tempfile::TempDir,
}

impl BpfFs {
    pub fn mount() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        run(
            "mount",
            &["-t", "bpf", "bpf", dir.path().to_str().expect("utf-8")],
        );
        BpfFs { dir }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Sends `data` over a TCP connection from src to sink port 7000 and checks it arrived whole.
pub fn send_tcp_stream(lab: &Lab, data: &[u8]) {
    let listener = lab
        .sink
        .enter(|| TcpListener::bind((SINK_V4, 7000)).expect("listen"));
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut received = Vec::new();
        std::io::Read::read_to_end(&mut stream, &mut received).expect("read");
        received
    });
    let to_send = data.to_vec();
    lab.src.enter(move || {
        pin_to_first_cpu();
        let mut stream = TcpStream::connect((SINK_V4, 7000)).expect("connect");
        stream.write_all(&to_send).expect("write");
    });
    assert!(
        server.join().expect("server") == data,
        "the primary path carried the stream"
    );
}

/// The bytes a TCP client sent to `port`, reassembled from copies of its segments (the SYN
/// included): duplicates are taken once.
pub fn tcp_stream<'a>(frames: impl IntoIterator<Item = &'a Vec<u8>>, port: u16) -> Vec<u8> {
    let mut segments = std::collections::BTreeMap::new();
    let mut first_seq = None;
    for frame in frames {
        let packet = etherparse::SlicedPacket::from_ethernet(frame).expect("tcp copy");
        let Some(etherparse::TransportSlice::Tcp(tcp)) = packet.transport else {
            panic!("not TCP: {:?}", Flow::of(frame));
        };
        assert_eq!(tcp.destination_port(), port);
        if tcp.syn() {
            first_seq = Some(tcp.sequence_number().wrapping_add(1));
        }
        if !tcp.payload().is_empty() {
            segments.insert(tcp.sequence_number(), tcp.payload().to_vec());
        }
    }
    let mut next = first_seq.expect("the SYN was copied");
    let mut stream = Vec::new();
    while let Some(payload) = segments.get(&next) {
        stream.extend_from_slice(payload);
        next = next.wrapping_add(payload.len() as u32);
    }
    stream
}
