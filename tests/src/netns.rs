//! Network namespaces behind guards, the lab topology, and a private bpffs.
use std::{
    ffi::CString,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    process::Command,
    sync::atomic::Ordering,
};

use super::{
    Agent, COL_MAC, COL_V4, COL_V6, Capture, Collector, FrameSender, NEXT_LAB, NODE_SINK_MAC,
    NODE_SRC_MAC, NODE_UL_MAC, NODE_UL_V4, NODE_UL_V6, SENTINEL_PORT, SINK_MAC, SINK_V4, SRC_MAC,
    agent_binary, pin_to_first_cpu, require_root, run, udp_socket, udp_v4_frame, vxlan_of,
    wait_for,
};

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

    /// A veth pair up between this namespace (`here`, address `here_addr`, with its prefix) and
    /// `peer` (`there`, `there_addr`).
    pub fn veth_to(
        &self,
        here: &str,
        here_addr: &str,
        peer: &Netns,
        there: &str,
        there_addr: &str,
    ) {
        self.ip(&[
            "link", "add", here, "type", "veth", "peer", "name", there, "netns", &peer.name,
        ]);
        self.ip(&["addr", "add", here_addr, "dev", here]);
        peer.ip(&["addr", "add", there_addr, "dev", there]);
        self.ip(&["link", "set", here, "up"]);
        peer.ip(&["link", "set", there, "up"]);
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

    /// Creates a veth `node_end` on the node (of interface index `ifindex` when given) whose peer
    /// `source_end` is in src, both up: frames sent into `source_end` meet `node_end`'s ingress.
    pub fn add_source_veth(&self, node_end: &str, source_end: &str, ifindex: Option<u32>) {
        let index = ifindex.map(|i| i.to_string());
        let mut args = vec!["link", "add", node_end];
        if let Some(index) = &index {
            args.extend(["index", index]);
        }
        args.extend([
            "type",
            "veth",
            "peer",
            "name",
            source_end,
            "netns",
            &self.src.name,
        ]);
        self.node.ip(&args);
        self.node.ip(&["link", "set", node_end, "up"]);
        self.src.ip(&["link", "set", source_end, "up"]);
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

    /// Sends a sentinel frame from the sink into the node's `sink0` and fails the test unless a
    /// VXLAN copy of it, byte for byte inside, reaches the collector's `wire` (a capture of the
    /// collector namespace's `eth0`).
    pub fn expect_sink_sentinel_tunnelled(&self, wire: &Capture) {
        let reply = udp_v4_frame(SINK_MAC, NODE_SINK_MAC, SENTINEL_PORT, b"sentinel");
        FrameSender::open(&self.sink, "eth0").send(&reply);
        let tunnelled = wire.until_nth(1, |f| vxlan_of(f).is_some_and(|v| v.inner == reply));
        assert!(
            !tunnelled.is_empty(),
            "the VXLAN copy of the sink's sentinel"
        );
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

/// The size in instructions' bytes, as the verifier left it, of each program attached with TCX
/// at the ingress of `interface`.
pub fn tcx_ingress_sizes(ns: &Netns, interface: &str) -> Vec<u32> {
    let interface = interface.to_owned();
    ns.enter(move || {
        let (_, programs) = aya::programs::SchedClassifier::query_tcx(
            &interface,
            aya::programs::TcAttachType::Ingress,
        )
        .expect("query tcx");
        programs
            .iter()
            .map(|p| p.size_translated().expect("a translated size"))
            .collect()
    })
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
