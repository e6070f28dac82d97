//! `cargo xtask bench`: what mirroring costs the primary path, measured side by side with the
//! tools users would use instead, in one invocation (see docs/benchmarks.md).
//!
//! Topology: the test lab (source → node → sink, monitor behind mir0). The generator sends one UDP
//! flow from the source namespace to an address the node routes to the sink, which drops it (it is
//! not the sink's address), so the measured path is: veth in → TC ingress on src0 (where every
//! mirroring scenario hooks) → forward → veth out. On veth that whole path runs in the sender's
//! context, so a max-rate run measures the per-packet cost on one core.
mod configs;
mod cost;
mod hotpath;
mod paired;
mod report;
mod shadow;
mod startup;
mod traffic;
mod tunnels;
mod validation;

use std::{
    fmt::Write as _,
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mirror_tests::{Agent, Lab, NODE_SRC_MAC, SINK_MAC, SRC_MAC, wait_for};
use serde::Serialize;

use self::{
    configs::{agent_config, rule_set},
    cost::program_cost,
    hotpath::{HotRow, hot_path, tap_path},
    shadow::{ShadowRow, shadow_bench},
    startup::{StartupRow, startup_timing},
    traffic::{Source, Spinner, counters, generate, wait_for_idle},
    tunnels::{PairedRow, TUNNELS, paired_tunnels},
    validation::{ValidationRow, validation_timing},
};

/// Where the generator sends: routed by the node to the sink, which is not this address.
const FLOW_DST: &str = "10.10.2.99";
const FLOW_DST_PORT: u16 = 5201;
/// The tunnel underlay between the node's mir0 and the monitor.
const VXLAN_LOCAL: &str = "10.10.3.1";
const VXLAN_REMOTE: &str = "10.10.3.2";
const MON_MAC: &str = "02:00:00:00:03:02";

#[derive(Debug, Clone)]
pub struct Options {
    pub reps: usize,
    pub seconds: f64,
    /// Offered rate of the CPU-cost runs, packets per second.
    pub fixed_rate: u64,
    /// Rule counts for the scaling scenarios.
    pub rule_counts: Vec<usize>,
    /// Interface counts for the attach-scaling runs.
    pub attach_counts: Vec<usize>,
    /// Pod counts for the pod-selector runs.
    pub pod_counts: Vec<usize>,
    pub frame_sizes: Vec<usize>,
    /// Offered request rates of the shadow runs, requests per second.
    pub shadow_rates: Vec<u64>,
    /// Run only the scenarios whose name contains one of these comma-separated parts (attach
    /// scaling only with the part "attach", pod scaling with "pods", validation timing with
    /// "validation", the time to capture with "startup", the shadow with "shadow"); ratios need
    /// their reference scenarios in the run.
    pub only: Option<String>,
}

/// One way of mirroring src0's ingress (or none).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scenario {
    Baseline,
    TcMirred,
    TcMirredVxlan,
    Daemonlogger,
    /// mirror with `rules` rules, the last one matching the flow, or, with `matching` false,
    /// none matching it.
    Mirror {
        rules: usize,
        matching: bool,
    },
    /// mirror, every packet (the session's default).
    MirrorAll,
    /// tc u32 filters carrying the same rules, each with action mirred.
    TcU32 {
        rules: usize,
    },
    /// mirror, one rule matching everything, into a tunnel to the same collector address as
    /// `TcMirredVxlan`: `vxlan`, `geneve`, `gre`, `erspan2` or `erspan3` (see [`TUNNELS`]).
    MirrorTunnel(&'static str),
    /// mirror at the XDP hook, one rule matching everything: copies through the ring buffer, sent
    /// by the agent out of mir0 (`AF_PACKET`) or, with `vxlan`, to the VXLAN collector.
    MirrorXdp {
        vxlan: bool,
    },
    /// mirror with the one matching rule of `Mirror { rules: 1, matching: true }` written as a
    /// filter expression.
    MirrorFilter,
    /// mirror with the same selection written with byte accessors, which the rule tables cannot
    /// hold: one rule that runs libpcap's program in the kernel's interpreter.
    MirrorAccessor,
    /// mirror, one match-all rule, with a session control (a TOML line) that makes few copies.
    MirrorControlled {
        name: &'static str,
        control: &'static str,
    },
}

impl Scenario {
    fn name(&self) -> String {
        match self {
            Scenario::Baseline => "baseline (no mirroring)".into(),
            Scenario::TcMirred => "tc u32 match-all + mirred".into(),
            Scenario::TcMirredVxlan => "tc mirred into vxlan".into(),
            Scenario::Daemonlogger => "daemonlogger".into(),
            Scenario::Mirror {
                rules: 1,
                matching: true,
            } => "mirror TC, 100% match".into(),
            Scenario::Mirror {
                rules: 1,
                matching: false,
            } => "mirror TC, no match".into(),
            Scenario::Mirror {
                rules,
                matching: false,
            } => format!("mirror TC, no match, {rules} rules"),
            Scenario::MirrorAll => "mirror TC, match-all".into(),
            Scenario::Mirror { rules, .. } => format!("mirror TC, {rules} rules"),
            Scenario::TcU32 { rules } => format!("tc u32 mirred, {rules} rules"),
            Scenario::MirrorTunnel(format) => format!("mirror TC into {format}"),
            Scenario::MirrorXdp { vxlan: false } => "mirror XDP to interface".into(),
            Scenario::MirrorXdp { vxlan: true } => "mirror XDP into vxlan".into(),
            Scenario::MirrorControlled { name, .. } => format!("mirror TC, {name}"),
            Scenario::MirrorFilter => "mirror TC, 100% match, filter expression".into(),
            Scenario::MirrorAccessor => "mirror TC, 100% match, accessor expression".into(),
        }
    }

    /// Whether every packet should produce one copy.
    fn copies_all(&self) -> bool {
        !matches!(
            self,
            Scenario::Baseline
                | Scenario::Mirror {
                    matching: false,
                    ..
                }
                | Scenario::MirrorControlled { .. }
        )
    }

    /// Whether the agent runs and copies no packet (its rule matches none).
    fn copies_nothing(&self) -> bool {
        matches!(
            self,
            Scenario::Mirror {
                matching: false,
                ..
            }
        )
    }
}

/// The lab a run measures on, and where its generator's frames come from.
pub struct Bed {
    pub lab: Lab,
    pub source: Source,
}

impl std::ops::Deref for Bed {
    type Target = Lab;

    fn deref(&self) -> &Lab {
        &self.lab
    }
}

impl Bed {
    /// The lab with frames from the source namespace's veth.
    fn veth() -> Bed {
        let lab = Lab::new("bench");
        prepare(&lab);
        Bed {
            lab,
            source: Source::Veth,
        }
    }

    /// The lab with the node's `src0` a tap (no source namespace behind it): the generator
    /// writes frames to its file descriptor, as a hypervisor's guest does.
    fn tap() -> Bed {
        let lab = Lab::new("benchtap");
        prepare(&lab);
        let node = &lab.node;
        node.ip(&["link", "del", "src0"]);
        node.ip(&["tuntap", "add", "dev", "src0", "mode", "tap"]);
        node.ip(&["link", "set", "src0", "address", NODE_SRC_MAC]);
        node.ip(&["addr", "add", "10.10.1.1/24", "dev", "src0"]);
        node.ip(&["link", "set", "src0", "up"]);
        Bed {
            lab,
            source: Source::Tap,
        }
    }
}

/// A scenario in place; undone on drop.
enum Active<'a> {
    Nothing,
    Tc(&'a Lab),
    Agent(Agent),
    Process(Child),
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        match self {
            Active::Tc(lab) => {
                let _ = Command::new("tc")
                    .args([
                        "-n",
                        &lab.node.name,
                        "qdisc",
                        "del",
                        "dev",
                        "src0",
                        "clsact",
                    ])
                    .status();
            }
            Active::Process(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Active::Nothing | Active::Agent(_) => {}
        }
    }
}

#[derive(Debug, Serialize, Clone)]
pub struct Sample {
    pub pps: f64,
    pub completeness: Option<f64>,
    pub busy_before: f64,
}

#[derive(Debug, Serialize, Clone)]
pub struct Row {
    pub scenario: String,
    pub frame_bytes: usize,
    pub samples: Vec<Sample>,
    pub median_pps: f64,
    pub min_pps: f64,
    pub max_pps: f64,
    pub completeness: Option<f64>,
    /// CPU time per packet at the fixed offered rate (ns), where measured.
    pub cpu_ns_per_packet: Option<f64>,
    /// Whether the fixed rate was forwarded in full (else the cost is of what got through).
    pub fixed_rate_sustained: Option<bool>,
    /// Mean run time of mirror's ingress program per packet (`kernel.bpf_stats_enabled`), ns.
    pub program_ns_per_packet: Option<f64>,
    pub agent_rss_kib: Option<u64>,
    /// Rule count for the scaling scenarios.
    pub rules: Option<usize>,
}

#[derive(Debug, Serialize, Clone)]
pub struct AttachRow {
    pub interfaces: usize,
    pub seconds: f64,
    pub agent_rss_kib: u64,
}

/// One pod-selector run: `pods` selected pods on the node.
#[derive(Debug, Serialize)]
pub struct PodRow {
    pub pods: usize,
    /// From the agent's start to every selected pod's veth attached: the first list, the
    /// placing (a route lookup per pod) and the attaching.
    pub start_seconds: f64,
    /// From the API reporting one more pod to its veth attached, with `pods` pods placed.
    pub new_pod_seconds: f64,
    pub agent_rss_kib: u64,
}

pub fn run(agent: &Path, options: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let lab = Bed::veth();
    let scenarios = scenarios(options);
    let mut rows = Vec::new();
    for &size in &options.frame_sizes {
        let frame = flow_frame(size);
        for scenario in &scenarios {
            eprintln!(
                "bench: {} with {size}-byte frames ({:.0?} so far)",
                scenario.name(),
                started.elapsed()
            );
            rows.push(measure(&lab, agent, scenario, &frame, options)?);
        }
    }
    let only_has = |part: &str| {
        options
            .only
            .as_ref()
            .is_none_or(|only| only.split(',').any(|p| p == part))
    };
    let attach = if only_has("attach") {
        attach_scaling(agent, &options.attach_counts)?
    } else {
        Vec::new()
    };
    let mut tunnels = Vec::new();
    if only_has("tunnels") {
        for &size in &options.frame_sizes {
            tunnels.extend(paired_tunnels(&lab, agent, &flow_frame(size), options)?);
        }
    }
    let mut hot = Vec::new();
    if only_has("hotpath") {
        for &size in &options.frame_sizes {
            hot.extend(hot_path(&lab, agent, &flow_frame(size), options)?);
        }
    }
    if only_has("tap") {
        let tap = Bed::tap();
        for &size in &options.frame_sizes {
            hot.extend(tap_path(&tap, agent, &flow_frame(size), options)?);
        }
    }
    let pods = if only_has("pods") {
        pod_scaling(agent, &options.pod_counts)?
    } else {
        Vec::new()
    };
    let validation: Vec<ValidationRow> = if only_has("validation") {
        validation_timing(&lab, agent)?
    } else {
        Vec::new()
    };
    let startup: Vec<StartupRow> = if only_has("startup") {
        startup_timing(&lab, agent)?
    } else {
        Vec::new()
    };
    drop(lab);
    let shadow: Vec<ShadowRow> = if only_has("shadow") {
        shadow_bench(agent, &options.shadow_rates, options)?
    } else {
        Vec::new()
    };
    let extra = report::Extra {
        shadow: &shadow,
        hot: &hot,
        attach: &attach,
        pods: &pods,
        tunnels: &tunnels,
        validation: &validation,
        startup: &startup,
    };
    report::write(&rows, &extra, options, started.elapsed())
}

/// The throughput scenarios `options` asks for.
fn scenarios(options: &Options) -> Vec<Scenario> {
    let mut scenarios = vec![
        Scenario::Baseline,
        Scenario::TcMirred,
        Scenario::TcMirredVxlan,
        Scenario::Daemonlogger,
        Scenario::Mirror {
            rules: 1,
            matching: true,
        },
        Scenario::Mirror {
            rules: 1,
            matching: false,
        },
        Scenario::MirrorTunnel("vxlan"),
        Scenario::MirrorXdp { vxlan: false },
        Scenario::MirrorXdp { vxlan: true },
        Scenario::MirrorControlled {
            name: "sampled 1/100",
            control: "sample = { every = 100 }",
        },
        Scenario::MirrorControlled {
            name: "rate-limited 1000 pps",
            control: "rate_limit = { packets_per_second = 1000 }",
        },
    ];
    for &rules in &options.rule_counts {
        if rules > 1 {
            scenarios.push(Scenario::Mirror {
                rules,
                matching: true,
            });
        }
        scenarios.push(Scenario::TcU32 { rules });
    }
    if let Some(only) = &options.only {
        scenarios.retain(|s| only.split(',').any(|part| s.name().contains(part)));
    }
    scenarios
}

/// Routes and devices every scenario may use.
fn prepare(lab: &Lab) {
    let node = &lab.node;
    node.ip(&[
        "neigh",
        "replace",
        FLOW_DST,
        "lladdr",
        SINK_MAC,
        "dev",
        "sink0",
        "nud",
        "permanent",
    ]);
    node.ip(&["addr", "add", &format!("{VXLAN_LOCAL}/24"), "dev", "mir0"]);
    node.ip(&[
        "neigh",
        "replace",
        VXLAN_REMOTE,
        "lladdr",
        MON_MAC,
        "dev",
        "mir0",
        "nud",
        "permanent",
    ]);
    node.ip(&[
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "42",
        "local",
        VXLAN_LOCAL,
        "remote",
        VXLAN_REMOTE,
        "dstport",
        "4789",
        "dev",
        "mir0",
    ]);
    node.ip(&["link", "set", "vx0", "up"]);
}

/// The generator's frame: UDP from the source to [`FLOW_DST`], `size` bytes without FCS.
fn flow_frame(size: usize) -> Vec<u8> {
    let dst: std::net::Ipv4Addr = FLOW_DST.parse().expect("address");
    let builder = etherparse::PacketBuilder::ethernet2(
        mirror_tests::mac(SRC_MAC),
        mirror_tests::mac(NODE_SRC_MAC),
    )
    .ipv4(mirror_tests::SRC_V4.octets(), dst.octets(), 64)
    .udp(1234, FLOW_DST_PORT);
    let payload = vec![0x5a; size.saturating_sub(14 + 20 + 8)];
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, &payload).expect("frame");
    frame
}

fn tc(lab: &Lab, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("tc")
        .args(["-n", &lab.node.name])
        .args(args)
        .status()
        .context("running tc")?;
    if !status.success() {
        bail!("tc {}: {status}", args.join(" "));
    }
    Ok(())
}

fn activate<'a>(lab: &'a Lab, agent: &Path, scenario: &Scenario) -> anyhow::Result<Active<'a>> {
    Ok(match scenario {
        Scenario::Baseline => Active::Nothing,
        Scenario::TcMirred | Scenario::TcMirredVxlan => {
            tc(lab, &["qdisc", "add", "dev", "src0", "clsact"])?;
            let active = Active::Tc(lab);
            let target = if *scenario == Scenario::TcMirred {
                "mir0"
            } else {
                "vx0"
            };
            tc(
                lab,
                &[
                    "filter", "add", "dev", "src0", "ingress", "protocol", "all", "u32", "match",
                    "u32", "0", "0", "action", "mirred", "egress", "mirror", "dev", target,
                ],
            )?;
            active
        }
        Scenario::TcU32 { rules } => {
            tc(lab, &["qdisc", "add", "dev", "src0", "clsact"])?;
            let active = Active::Tc(lab);
            let mut batch = String::new();
            for (net, port) in rule_set(*rules) {
                writeln!(
                    batch,
                    "filter add dev src0 ingress protocol ip prio 1 u32 match ip protocol 17 0xff match ip dst {net} match ip dport {port} 0xffff action mirred egress mirror dev mir0"
                )
                .expect("writing to a String");
            }
            let file =
                std::env::temp_dir().join(format!("mirror-bench-u32-{}.tc", std::process::id()));
            std::fs::write(&file, batch)?;
            let result = tc(lab, &["-batch", file.to_str().context("temp path")?]);
            let _ = std::fs::remove_file(&file);
            result?;
            active
        }
        Scenario::Daemonlogger => {
            let before = packet_sockets(lab);
            let child = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &lab.node.name,
                    "taskset",
                    "-c",
                    "1",
                    "daemonlogger",
                    "-i",
                    "src0",
                    "-o",
                    "mir0",
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting daemonlogger (cargo xtask setup installs it)")?;
            let active = Active::Process(child);
            wait_for("daemonlogger to open its packet sockets", || {
                packet_sockets(lab) > before
            });
            active
        }
        Scenario::Mirror { .. }
        | Scenario::MirrorAll
        | Scenario::MirrorFilter
        | Scenario::MirrorAccessor
        | Scenario::MirrorControlled { .. }
        | Scenario::MirrorTunnel(_)
        | Scenario::MirrorXdp { .. } => {
            Active::Agent(Agent::start(&lab.node, agent, &agent_config(scenario)?))
        }
    })
}

/// Packet sockets open in the node namespace.
fn packet_sockets(lab: &Lab) -> usize {
    lab.node
        .exec(&["cat", "/proc/net/packet"])
        .lines()
        .count()
        .saturating_sub(1)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn measure(
    lab: &Bed,
    agent: &Path,
    scenario: &Scenario,
    frame: &[u8],
    options: &Options,
) -> anyhow::Result<Row> {
    let active = activate(lab, agent, scenario)?;
    let duration = Duration::from_secs_f64(options.seconds);
    warm_up(lab, frame)?;
    let mut samples = Vec::new();
    for _ in 0..options.reps {
        samples.push(sample_once(lab, scenario, frame, duration)?);
    }
    // The kernel's per-program run time, in a separate run: measuring it reads the clock twice per
    // program run, which would slow the max-rate runs above.
    let program_ns_per_packet = {
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling BPF run-time stats")?;
        generate(lab, lab.source, frame, duration, None, 50_000_000)?;
        program_cost()?
    };
    let agent_rss_kib = match &active {
        Active::Agent(agent) => Some(rss_kib(agent.pid())?),
        _ => None,
    };
    let (cpu_ns_per_packet, fixed_rate_sustained) = if frame.len() == options.frame_sizes[0] {
        let (cost, sustained) = cpu_cost(lab, frame, options)?;
        (Some(cost), Some(sustained))
    } else {
        (None, None)
    };
    drop(active);
    let mut pps: Vec<f64> = samples.iter().map(|s| s.pps).collect();
    let mut completeness: Vec<f64> = samples.iter().filter_map(|s| s.completeness).collect();
    Ok(Row {
        scenario: scenario.name(),
        frame_bytes: frame.len(),
        median_pps: median(&mut pps),
        min_pps: pps[0],
        max_pps: pps[pps.len() - 1],
        completeness: (!completeness.is_empty()).then(|| median(&mut completeness)),
        samples,
        cpu_ns_per_packet,
        fixed_rate_sustained,
        program_ns_per_packet,
        agent_rss_kib,
        rules: match scenario {
            Scenario::Mirror {
                rules,
                matching: true,
            }
            | Scenario::TcU32 { rules } => Some(*rules),
            _ => None,
        },
    })
}

/// One max-rate run of `duration` with `scenario` active: forwarded pps and, where every packet
/// should be copied, the share of copies the monitor received.
fn sample_once(
    lab: &Bed,
    scenario: &Scenario,
    frame: &[u8],
    duration: Duration,
) -> anyhow::Result<Sample> {
    let busy_before = wait_for_idle()?;
    let (hook0, _) = counters(&lab.node, "src0")?;
    let (sink0, _) = counters(&lab.sink, "eth0")?;
    let (mon0, _) = counters(&lab.mon, "eth0")?;
    let sent = generate(lab, lab.source, frame, duration, None, 50_000_000)?;
    settle(lab)?;
    let (hook1, _) = counters(&lab.node, "src0")?;
    let (sink1, _) = counters(&lab.sink, "eth0")?;
    let (mon1, _) = counters(&lab.mon, "eth0")?;
    Ok(Sample {
        pps: (sink1 - sink0) as f64 / sent.elapsed.as_secs_f64(),
        completeness: scenario
            .copies_all()
            .then(|| (mon1 - mon0) as f64 / (hook1 - hook0).max(1) as f64),
        busy_before,
    })
}

/// Caches, neighbour entries, daemonlogger's buffers.
fn warm_up(lab: &Bed, frame: &[u8]) -> anyhow::Result<()> {
    generate(
        lab,
        lab.source,
        frame,
        Duration::from_millis(300),
        None,
        10_000_000,
    )?;
    settle(lab)
}

/// Waits until the monitor's receive counter stops moving (daemonlogger copies asynchronously).
fn settle(lab: &Lab) -> anyhow::Result<()> {
    let mut last = counters(&lab.mon, "eth0")?.0;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(50));
        let now = counters(&lab.mon, "eth0")?.0;
        if now == last {
            return Ok(());
        }
        last = now;
    }
    Ok(())
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")
}

/// CPU time per packet at the fixed rate: the node's receive path is steered to CPU 1 (RPS on
/// src0), and a nice-19 spinner there measures what the path leaves.
fn cpu_cost(lab: &Bed, frame: &[u8], options: &Options) -> anyhow::Result<(f64, bool)> {
    let rps = "/sys/class/net/src0/queues/rx-0/rps_cpus";
    lab.node.exec(&["sh", "-c", &format!("echo 2 > {rps}")]);
    let result = (|| {
        // Before the spinner starts: it keeps CPU 1 busy on purpose.
        wait_for_idle()?;
        let spinner = Spinner::start();
        let window = Duration::from_secs_f64(options.seconds);
        let idle = spinner.rate_over(|| {
            std::thread::sleep(window);
            Ok(window)
        })?;
        let (sink0, _) = counters(&lab.sink, "eth0")?;
        let mut sent = None;
        let loaded = spinner.rate_over(|| {
            let s = generate(
                lab,
                lab.source,
                frame,
                window,
                Some(options.fixed_rate),
                u64::MAX,
            )?;
            sent = Some(s);
            Ok(s.elapsed)
        })?;
        settle(lab)?;
        let (sink1, _) = counters(&lab.sink, "eth0")?;
        let sent = sent.context("generator result")?;
        let forwarded = sink1 - sink0;
        let busy = (1.0 - loaded / idle).clamp(0.0, 1.0);
        let pps = forwarded as f64 / sent.elapsed.as_secs_f64();
        Ok((
            busy * 1e9 / pps.max(1.0),
            forwarded as f64 >= 0.99 * sent.packets as f64,
        ))
    })();
    lab.node.exec(&["sh", "-c", &format!("echo 0 > {rps}")]);
    result
}

/// Time and agent memory to attach to `count` veth interfaces.
fn attach_scaling(agent: &Path, counts: &[usize]) -> anyhow::Result<Vec<AttachRow>> {
    let mut rows = Vec::new();
    for &count in counts {
        eprintln!("bench: attaching to {count} interfaces");
        let ns = mirror_tests::Netns::new(format!("m{}-attach-{count}", std::process::id()));
        let mut batch = String::from("link add tgt0 type veth peer name tgt1\n");
        for i in 0..count {
            writeln!(batch, "link add w{i} type veth peer name p{i}").expect("writing to a String");
        }
        let file =
            std::env::temp_dir().join(format!("mirror-bench-links-{}.ip", std::process::id()));
        std::fs::write(&file, batch)?;
        ns.ip(&["-batch", file.to_str().context("temp path")?]);
        let _ = std::fs::remove_file(&file);
        let config = "stats_interval_secs = 0\n[[session]]\nname = \"many\"\ninterfaces = [\"w*\"]\ntarget = { interface = \"tgt0\" }\n[[session.rule]]\nnumber = 1\naction = \"mirror\"\nproto = \"udp\"\n";
        let start = Instant::now();
        let running = Agent::start(&ns, agent, config);
        let seconds = start.elapsed().as_secs_f64();
        let agent_rss_kib = rss_kib(running.pid())?;
        running.stop();
        rows.push(AttachRow {
            interfaces: count,
            seconds,
            agent_rss_kib,
        });
    }
    Ok(rows)
}

/// Time for the agent to watch `count` pods selected by a session (each a veth and a /32 route in
/// one namespace, reported by the stand-in API server), and to follow one more.
fn pod_scaling(agent: &Path, counts: &[usize]) -> anyhow::Result<Vec<PodRow>> {
    use mirror_tests::kube_api::{FakeApi, NODE, pod};
    let mut rows = Vec::new();
    for &count in counts {
        eprintln!("bench: {count} selected pods");
        let ns = mirror_tests::Netns::new(format!("m{}-pods-{count}", std::process::id()));
        let api = FakeApi::start(&ns);
        let address = |i: usize| format!("10.244.{}.{}", i / 250, i % 250 + 1);
        let mut batch = String::from("link add tgt0 type veth peer name tgt1\nlink set tgt0 up\n");
        for i in 0..=count {
            writeln!(
                batch,
                "link add pod{i} type veth peer name ctr{i}\nlink set pod{i} up\nlink set ctr{i} up\nroute add {}/32 dev pod{i}",
                address(i)
            )
            .expect("writing to a String");
        }
        let file =
            std::env::temp_dir().join(format!("mirror-bench-pods-{}.ip", std::process::id()));
        std::fs::write(&file, batch)?;
        ns.ip(&["-batch", file.to_str().context("temp path")?]);
        let _ = std::fs::remove_file(&file);
        for i in 0..count {
            api.apply(pod(
                "shop",
                &format!("web-{i}"),
                "web",
                NODE,
                &[&address(i)],
            ));
        }
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig())?;
        let socket = dir.path().join("agent.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "stats_interval_secs = 0\napi_socket = \"{}\"\n[[session]]\nname = \"web\"\npods = {{ namespace = \"shop\", labels = {{ app = \"web\" }} }}\ntarget = {{ interface = \"tgt0\" }}\n[[session.rule]]\nnumber = 1\naction = \"mirror\"\nproto = \"udp\"\n",
                socket.display()
            ),
        )?;
        let kubeconfig = kubeconfig.to_str().context("temp path")?;
        let start = Instant::now();
        let running = Agent::start_file(
            &ns,
            agent,
            &config,
            &["--node-name", NODE, "--kubeconfig", kubeconfig],
        );
        let start_seconds = start.elapsed().as_secs_f64();
        let socket = socket.to_str().context("temp path")?;
        let attached = || {
            let status: serde_json::Value =
                serde_json::from_str(&mirror_tests::api_get(socket, "/status")).unwrap_or_default();
            serde_json::from_value::<Vec<(String, String)>>(status["attached"].clone())
                .unwrap_or_default()
        };
        anyhow::ensure!(
            attached().len() == count * 2,
            "{count} pods: {} hooks attached",
            attached().len()
        );
        let reported = Instant::now();
        api.apply(pod("shop", "web-new", "web", NODE, &[&address(count)]));
        let new_veth = (format!("pod{count}"), "ingress".to_owned());
        wait_for("the new pod's veth", || attached().contains(&new_veth));
        let new_pod_seconds = reported.elapsed().as_secs_f64();
        let agent_rss_kib = rss_kib(running.pid())?;
        running.stop();
        rows.push(PodRow {
            pods: count,
            start_seconds,
            new_pod_seconds,
            agent_rss_kib,
        });
    }
    Ok(rows)
}
