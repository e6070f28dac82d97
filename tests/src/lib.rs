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
    net::{Ipv4Addr, Ipv6Addr},
    process::Command,
    sync::atomic::AtomicU32,
    time::{Duration, Instant},
};

mod agent;
mod capture;
pub mod cases;
pub mod chart;
mod collector;
mod files;
mod frames;
pub mod kube_api;
mod netns;
mod traffic;
mod web;

pub use self::{
    agent::*, capture::*, collector::*, files::*, frames::*, netns::*, traffic::*, web::*,
};

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

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Polls `condition` every 10 ms until it holds, failing the test after [`DEADLINE`].
pub fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `sample` every 10 ms until `done` holds for what it gives, and returns that; fails the
/// test after [`DEADLINE`], showing the last sample.
pub fn wait_for_state<T: std::fmt::Display>(
    what: &str,
    mut sample: impl FnMut() -> T,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let state = sample();
        if done(&state) {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {state}"
        );
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

/// A rule's or session's counters, as the agent reports them.
pub type Counts = mirror_common::Counters;
