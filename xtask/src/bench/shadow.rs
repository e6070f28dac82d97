//! `--only shadow`: an HTTP service's primary path at rising request rates, with no shadowing,
//! with mirror's shadow target beside it (out of the path), and through nginx in the path, alone
//! and with its `mirror` module, interleaved in one run.
//!
//! Topology: a client namespace and a server namespace on one veth (`c0` ── `s0`). In the
//! server's namespace, one nginx is the live origin and the in-path proxy with and without
//! `mirror` (the module's documented setup, with keep-alive upstreams), another the shadow (on its
//! loopback, logging each request it gets). h2load in the client's namespace sends at a fixed rate
//! per connection (open loop) and logs each request's latency; the agent, when it runs, watches
//! `s0`. Each run is made in two CPU layouts ([`Layout`]), interleaved.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use mirror_tests::{Agent, Netns, Nginx};
use serde::Serialize;

use super::{Options, median, rss_kib};

const CLIENT_V4: &str = "10.77.0.1";
const SERVER_V4: &str = "10.77.0.2";
const LIVE_PORT: u16 = 8080;
const PROXY_PORT: u16 = 8081;
const MIRRORING_PROXY_PORT: u16 = 8082;
const SHADOW: &str = "127.0.0.1:9090";
/// h2load's connections: at least this many, each sending its share of the rate, and at most
/// [`PER_CLIENT_RPS`] each (one request at a time on an HTTP/1.1 connection: h2load falls short of
/// a connection's share well before a round trip's limit).
const MIN_CLIENTS: u64 = 20;
const PER_CLIENT_RPS: u64 = 250;
/// The live answer: a small JSON document, as an API would give.
const BODY: &str = r#"{"status":"ok","items":[1,2,3],"note":"the live service"}"#;
/// The agent's CPU time in /proc is in `USER_HZ` ticks, 100 a second on Linux.
const TICKS_PER_SECOND: f64 = 100.0;
/// The targets of the issue: p99 within this of no shadowing; every request replayed up to this
/// rate; at most this much CPU (agent and its kernel programs) per 1,000 requests a second.
const P99_RATIO_TARGET: f64 = 1.02;
const FULL_REPLAY_RATE: u64 = 20_000;
const VCPU_PER_1K_TARGET: f64 = 0.05;

/// Where the processes run on this machine's two CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Everything on both CPUs: the agent and the shadow take CPU from the client and the live
    /// service, as on a node whose pods and agent share its cores.
    Shared,
    /// The client and the live service (and nginx in the path) on CPU 0, the agent and the
    /// shadow on CPU 1: what is left between the ways is their cost on the path itself (the
    /// TC programs and their copies, run where the packets are), as on a node that gives the
    /// agent a core of its own and a shadow on other nodes.
    Split,
}

impl Layout {
    const ALL: [Layout; 2] = [Layout::Shared, Layout::Split];

    fn name(self) -> &'static str {
        match self {
            Layout::Shared => "shared CPUs",
            Layout::Split => "split CPUs",
        }
    }

    /// The CPUs of the client and live side, and of the agent and shadow side.
    fn cpus(self) -> (&'static str, &'static str) {
        match self {
            Layout::Shared => ("0,1", "0,1"),
            Layout::Split => ("0", "1"),
        }
    }
}

/// Sets the CPUs of `pid` (every thread of it) and of its child processes (nginx's workers).
fn pin(pid: u32, cpus: &str) -> anyhow::Result<()> {
    let mut pids = vec![pid];
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command name's closing parenthesis: state, then the parent's pid.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if parent == Some(pid)
            && let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok())
        {
            pids.push(child);
        }
    }
    for pid in pids {
        let status = Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &pid.to_string()])
            .stdout(Stdio::null())
            .status()
            .context("running taskset (util-linux)")?;
        ensure!(status.success(), "taskset -a -p -c {cpus} {pid} failed");
    }
    Ok(())
}

/// How the client's requests reach the live origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Direct,
    /// No shadowing again, last: its p99 against the first's is the measure's own noise.
    DirectAgain,
    Shadow,
    NginxProxy,
    NginxMirror,
}

impl Way {
    const ALL: [Way; 5] = [
        Way::Direct,
        Way::Shadow,
        Way::NginxProxy,
        Way::NginxMirror,
        Way::DirectAgain,
    ];

    fn name(self) -> &'static str {
        match self {
            Way::Direct => "no shadowing",
            Way::DirectAgain => "no shadowing, again (the noise)",
            Way::Shadow => "mirror shadow (beside the path)",
            Way::NginxProxy => "nginx in the path",
            Way::NginxMirror => "nginx in the path + mirror",
        }
    }

    fn port(self) -> u16 {
        match self {
            Way::Direct | Way::DirectAgain | Way::Shadow => LIVE_PORT,
            Way::NginxProxy => PROXY_PORT,
            Way::NginxMirror => MIRRORING_PROXY_PORT,
        }
    }

    /// Whether the shadow should get every request.
    fn shadows(self) -> bool {
        matches!(self, Way::Shadow | Way::NginxMirror)
    }
}

/// One h2load run.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowRun {
    pub succeeded: u64,
    pub achieved_rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Requests the shadow logged during the run.
    pub shadow_received: u64,
    /// The agent's figures, when it ran.
    pub agent: Option<AgentFigures>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentFigures {
    /// The session's shadow report: requests, replayed, lost by reason, compared.
    pub shadow: serde_json::Value,
    /// The agent's user and system time during the run, seconds.
    pub cpu_seconds: f64,
    /// Mirror's TC programs' run time on `s0` (both directions), seconds.
    pub kernel_seconds: f64,
    pub rss_kib: u64,
}

/// One way at one rate in one layout: the medians of its runs.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowRow {
    pub layout: &'static str,
    pub way: &'static str,
    pub offered_rps: u64,
    pub runs: Vec<ShadowRun>,
    pub achieved_rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// The median of each run's p99 over the no-shadowing run's just before it.
    pub p99_ratio: Option<f64>,
    /// Replayed (mirror: the agent's count; nginx: the shadow's log) over requests answered,
    /// the least of the runs.
    pub replayed_share: Option<f64>,
    /// Whether the agent counted every request it did not replay as lost, with a reason, in
    /// every run: requests seen == replayed + lost, and seen == answered.
    pub every_miss_counted: Option<bool>,
    /// Agent and kernel program CPU per 1,000 requests a second, vCPU.
    pub vcpu_per_1k_rps: Option<f64>,
    pub rss_kib: Option<u64>,
}

/// The namespaces and the two nginx every way uses; deleted and stopped on drop.
struct ShadowBed {
    /// First, so that nginx stops before its namespace and files go: the live origin and the
    /// proxies, and the shadow.
    front: Nginx,
    shadow: Nginx,
    client: Netns,
    server: Netns,
    dir: tempfile::TempDir,
}

impl ShadowBed {
    fn new() -> anyhow::Result<Self> {
        let client = Netns::new(format!("mb{}-cli", std::process::id()));
        let server = Netns::new(format!("mb{}-srv", std::process::id()));
        client.veth_to(
            "c0",
            &format!("{CLIENT_V4}/24"),
            &server,
            "s0",
            &format!("{SERVER_V4}/24"),
        );
        let dir = tempfile::tempdir()?;
        let front_ports = [LIVE_PORT, PROXY_PORT, MIRRORING_PROXY_PORT].map(|port| {
            SocketAddr::from((SERVER_V4.parse::<Ipv4Addr>().expect("an address"), port))
        });
        let front = Nginx::start(
            &server,
            dir.path(),
            "front",
            &front_config(dir.path()),
            &front_ports,
        )
        .context("starting nginx (cargo xtask bench installs nginx-light)")?;
        let shadow = Nginx::start(
            &server,
            dir.path(),
            "shadow",
            &shadow_config(dir.path()),
            &[SHADOW.parse().expect("an address")],
        )
        .context("starting the shadow's nginx")?;
        Ok(ShadowBed {
            front,
            shadow,
            client,
            server,
            dir,
        })
    }

    /// Pins the live side's nginx and the shadow's to the CPUs of `layout`.
    fn lay_out(&self, layout: Layout) -> anyhow::Result<()> {
        let (live, shadow) = layout.cpus();
        pin(self.front.pid(), live)?;
        pin(self.shadow.pid(), shadow)
    }

    /// Requests the shadow has logged so far.
    fn shadow_log_lines(&self) -> u64 {
        std::fs::read_to_string(self.dir.path().join("shadow.log"))
            .map_or(0, |log| log.lines().count() as u64)
    }

    /// The shadow's count once it stops growing (a replay may finish after its live answer).
    fn settled_shadow_log_lines(&self) -> u64 {
        let mut last = self.shadow_log_lines();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.shadow_log_lines();
            if now == last {
                break;
            }
            last = now;
        }
        last
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("h2load.log")
    }

    /// h2load for `seconds` at `rate` requests a second to `port`: requests answered, and each
    /// one's latency in microseconds.
    fn load(
        &self,
        port: u16,
        rate: u64,
        seconds: f64,
        layout: Layout,
    ) -> anyhow::Result<(u64, Vec<f64>)> {
        let log = self.log_file();
        let _ = std::fs::remove_file(&log);
        let clients = clients(rate);
        let output = Command::new("ip")
            .args(["netns", "exec", &self.client.name])
            .args(["taskset", "-c", layout.cpus().0, "h2load", "--h1"])
            .args(["-c", &clients.to_string(), "-t", "1"])
            .args(["--rps", &(rate / clients).to_string()])
            .args(["-D", &format!("{seconds}")])
            .arg("--log-file")
            .arg(&log)
            .arg(format!("http://{SERVER_V4}:{port}/api/items?page=1"))
            .output()
            .context("running h2load (cargo xtask bench installs nghttp2-client)")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        ensure!(output.status.success(), "h2load failed: {stdout}");
        let succeeded = stdout
            .lines()
            .find_map(|l| l.strip_prefix("requests: "))
            .and_then(|l| l.split(", ").find_map(|p| p.strip_suffix(" succeeded")))
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("no request count in h2load's output: {stdout}"))?;
        let latencies = std::fs::read_to_string(&log)?
            .lines()
            .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
            .collect();
        Ok((succeeded, latencies))
    }
}

/// h2load's connections at `rate` requests a second.
fn clients(rate: u64) -> u64 {
    rate.div_ceil(PER_CLIENT_RPS).max(MIN_CLIENTS)
}

/// The live origin and the two proxies in front of it, the mirroring one as nginx's
/// `ngx_http_mirror_module` documentation shows it, with the upstream keep-alive recipe of
/// `ngx_http_upstream_module` on both upstreams.
fn front_config(dir: &Path) -> String {
    let dir = dir.join("front");
    let dir = dir.display();
    format!(
        r#"http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream live {{ server {SERVER_V4}:{LIVE_PORT}; keepalive 64; }}
    upstream shadow {{ server {SHADOW}; keepalive 64; }}
    server {{
        listen {SERVER_V4}:{LIVE_PORT};
        location / {{ default_type application/json; return 200 '{BODY}'; }}
    }}
    server {{
        listen {SERVER_V4}:{PROXY_PORT};
        location / {{
            proxy_pass http://live;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
    server {{
        listen {SERVER_V4}:{MIRRORING_PROXY_PORT};
        location / {{
            mirror /mirror;
            proxy_pass http://live;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location = /mirror {{
            internal;
            proxy_pass http://shadow$request_uri;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
    )
}

/// The shadow: the live origin's answer, and a log line for each request it gets.
fn shadow_config(dir: &Path) -> String {
    let log = dir.join("shadow.log");
    let dir = dir.join("shadow");
    let (dir, log) = (dir.display(), log.display());
    format!(
        r#"http {{
    access_log off;
    client_body_temp_path {dir}/body;
    log_format count "$request_uri";
    server {{
        listen {SHADOW};
        access_log {log} count;
        location / {{ default_type application/json; return 200 '{BODY}'; }}
    }}
}}
"#
    )
}

/// The agent's user and system time so far, seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name's closing parenthesis: state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("/proc stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("/proc stat field")?.parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / TICKS_PER_SECOND)
}

/// Mirror's TC programs' total run time so far (run-time stats must be on), seconds.
fn kernel_seconds() -> anyhow::Result<f64> {
    let mut total = Duration::ZERO;
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if matches!(
            info.name_as_str(),
            Some("mirror_tc_ingre" | "mirror_tc_egres")
        ) {
            total += info.run_time();
        }
    }
    Ok(total.as_secs_f64())
}

/// The `p` quantile (0..1) of `values`, sorted in place.
fn quantile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = (p * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

fn agent_config(api: &Path) -> String {
    format!(
        "api_socket = \"{}\"\n[[session]]\nname = \"web\"\ninterfaces = [\"s0\"]\nfilter = \"tcp port {LIVE_PORT}\"\ntarget = {{ shadow = {{ url = \"http://{SHADOW}\" }} }}\n",
        api.display()
    )
}

/// One run of `way` at `rate`.
fn run_once(
    bed: &ShadowBed,
    agent_binary: &Path,
    (layout, way): (Layout, Way),
    rate: u64,
    seconds: f64,
) -> anyhow::Result<ShadowRun> {
    let agent = (way == Way::Shadow).then(|| {
        Agent::start(
            &bed.server,
            agent_binary,
            &agent_config(&bed.dir.path().join("agent.sock")),
        )
    });
    if let Some(agent) = &agent {
        pin(agent.pid(), layout.cpus().1)?;
    }
    let shadow_before = bed.shadow_log_lines();
    let cpu_before = agent.as_ref().map(|a| cpu_seconds(a.pid())).transpose()?;
    let started = Instant::now();
    let (succeeded, mut latencies) = bed.load(way.port(), rate, seconds, layout)?;
    let elapsed = started.elapsed().as_secs_f64();
    ensure!(!latencies.is_empty(), "h2load logged no request");
    let agent = match agent {
        Some(agent) => {
            let cpu_seconds = cpu_seconds(agent.pid())? - cpu_before.unwrap_or(0.0);
            let rss_kib = rss_kib(agent.pid())?;
            let kernel_seconds = kernel_seconds()?;
            let report = agent.stop();
            let shadow = report.json()["stats"]["sessions"][0]["shadow"].clone();
            Some(AgentFigures {
                shadow,
                cpu_seconds,
                kernel_seconds,
                rss_kib,
            })
        }
        None => None,
    };
    Ok(ShadowRun {
        succeeded,
        achieved_rps: succeeded as f64 / seconds,
        p50_us: quantile(&mut latencies, 0.50),
        p99_us: quantile(&mut latencies, 0.99),
        shadow_received: bed.settled_shadow_log_lines() - shadow_before,
        agent: agent.map(|mut a| {
            // CPU is the run's share; the kernel's, over the agent's life, is all under load.
            a.cpu_seconds /= elapsed;
            a.kernel_seconds /= elapsed;
            a
        }),
    })
}

/// Every way at every rate in `rates`, `options.reps` times, the ways interleaved in each.
pub fn shadow_bench(
    agent: &Path,
    rates: &[u64],
    options: &Options,
) -> anyhow::Result<Vec<ShadowRow>> {
    let bed = ShadowBed::new()?;
    let _stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).context("enabling BPF run-time stats")?;
    let seconds = options.seconds.max(2.0);
    // Warm nginx, the neighbour entries and h2load's first connections.
    bed.load(LIVE_PORT, 1000, 1.0, Layout::Shared)?;
    let ways: Vec<(Layout, Way)> = Layout::ALL
        .into_iter()
        .flat_map(|layout| Way::ALL.map(|way| (layout, way)))
        .collect();
    let mut rows = Vec::new();
    for &rate in rates {
        let mut runs: Vec<Vec<ShadowRun>> = vec![Vec::new(); ways.len()];
        for rep in 0..options.reps {
            for (i, &(layout, way)) in ways.iter().enumerate() {
                eprintln!(
                    "bench: shadow, {}, {} at {rate} rps, run {}",
                    layout.name(),
                    way.name(),
                    rep + 1
                );
                bed.lay_out(layout)?;
                runs[i].push(run_once(&bed, agent, (layout, way), rate, seconds)?);
            }
        }
        for (i, &(layout, way)) in ways.iter().enumerate() {
            // Each layout's runs are paired with its own no-shadowing runs.
            let direct = ways
                .iter()
                .position(|&w| w == (layout, Way::Direct))
                .unwrap_or(0);
            rows.push(row((layout, way), rate, &runs[i], &runs[direct]));
        }
    }
    bed.lay_out(Layout::Shared)?;
    Ok(rows)
}

fn row(
    (layout, way): (Layout, Way),
    rate: u64,
    runs: &[ShadowRun],
    direct: &[ShadowRun],
) -> ShadowRow {
    let med = |f: &dyn Fn(&ShadowRun) -> f64| median(&mut runs.iter().map(f).collect::<Vec<_>>());
    let agent: Vec<&AgentFigures> = runs.iter().filter_map(|r| r.agent.as_ref()).collect();
    let count = |a: &AgentFigures, key: &str| a.shadow[key].as_u64().unwrap_or(0);
    let replayed = |r: &ShadowRun| match &r.agent {
        Some(a) => count(a, "replayed"),
        None => r.shadow_received,
    };
    ShadowRow {
        layout: layout.name(),
        way: way.name(),
        offered_rps: rate,
        achieved_rps: med(&|r| r.achieved_rps),
        p50_us: med(&|r| r.p50_us),
        p99_us: med(&|r| r.p99_us),
        p99_ratio: (way != Way::Direct).then(|| {
            median(
                &mut runs
                    .iter()
                    .zip(direct)
                    .map(|(r, d)| r.p99_us / d.p99_us)
                    .collect::<Vec<_>>(),
            )
        }),
        replayed_share: way.shadows().then(|| {
            runs.iter()
                .map(|r| replayed(r) as f64 / r.succeeded.max(1) as f64)
                .fold(f64::INFINITY, f64::min)
        }),
        every_miss_counted: (!agent.is_empty()).then(|| {
            runs.iter().all(|r| {
                r.agent.as_ref().is_some_and(|a| {
                    let lost: u64 = a.shadow["lost"].as_object().map_or(0, |l| {
                        l.values().filter_map(serde_json::Value::as_u64).sum()
                    });
                    count(a, "requests") == count(a, "replayed") + lost
                        && count(a, "requests") >= r.succeeded
                })
            })
        }),
        vcpu_per_1k_rps: (!agent.is_empty()).then(|| {
            med(&|r| {
                r.agent.as_ref().map_or(0.0, |a| {
                    (a.cpu_seconds + a.kernel_seconds) / (r.achieved_rps / 1000.0)
                })
            })
        }),
        rss_kib: agent.iter().map(|a| a.rss_kib).max(),
        runs: runs.to_vec(),
    }
}

/// The table of [`shadow_bench`].
pub fn shadow_table(md: &mut String, rows: &[ShadowRow]) -> std::fmt::Result {
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "## Shadowing a service\n\nh2load (HTTP/1.1, keep-alive connections at up to {PER_CLIENT_RPS} requests a second each, {MIN_CLIENTS} at least) against nginx's `return 200` of {} bytes across a veth, per CPU layout, way and offered rate. Shared CPUs: every process on both cores, so the agent and the shadow take CPU from the client and the live service. Split CPUs: h2load, the live nginx and nginx in the path on CPU 0, the agent and the shadow's nginx on CPU 1, so what remains between the ways is their cost on the path itself (mirror: its TC programs and copies, which run where the packets are). Columns: requests answered a second, latency of the primary path (p50, p99; the ratio is each run's p99 over the no-shadowing run's beside it, median), the share of requests the shadow got (mirror: the agent's replayed count; nginx: the shadow's log), whether every request not replayed was counted lost, the agent's CPU (user, system and its TC programs' run time) per 1,000 requests a second, and its peak RSS.\n\n| offered rps | CPUs | way | answered rps | p50 | p99 | p99 vs none | replayed | every miss counted | vCPU per 1k rps | agent RSS |\n|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
        BODY.len()
    )?;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "–".into());
    for row in rows {
        writeln!(
            md,
            "| {} | {} | {} | {:.0} | {:.0} µs | {:.0} µs | {} | {} | {} | {} | {} |",
            row.offered_rps,
            row.layout,
            row.way,
            row.achieved_rps,
            row.p50_us,
            row.p99_us,
            opt(row.p99_ratio.map(|r| format!("{r:.2}x"))),
            opt(row.replayed_share.map(|s| format!("{:.2}%", s * 100.0))),
            opt(row
                .every_miss_counted
                .map(|c| if c { "yes" } else { "no" }.into())),
            opt(row.vcpu_per_1k_rps.map(|v| format!("{v:.3}"))),
            opt(row.rss_kib.map(|k| format!("{:.1} MB", k as f64 / 1024.0))),
        )?;
    }
    writeln!(md)
}

/// The issue's three targets for the shadow, met or missed.
pub fn shadow_targets(rows: &[ShadowRow]) -> String {
    let shadow: Vec<&ShadowRow> = rows
        .iter()
        .filter(|r| r.way == Way::Shadow.name())
        .collect();
    if shadow.is_empty() {
        return String::new();
    }
    let verdict = |met: bool| if met { "met" } else { "missed" };
    let worst_p99 = |layout: Layout, way: Way| {
        rows.iter()
            .filter(|r| r.layout == layout.name() && r.way == way.name())
            .filter_map(|r| r.p99_ratio)
            .fold(0.0, f64::max)
    };
    let full = |r: &&&ShadowRow| r.replayed_share.is_some_and(|s| s >= 1.0);
    let full_up_to = shadow
        .iter()
        .take_while(full)
        .map(|r| r.offered_rps)
        .last()
        .unwrap_or(0);
    let counted = shadow.iter().all(|r| r.every_miss_counted == Some(true));
    let worst_cpu = shadow
        .iter()
        .filter_map(|r| r.vcpu_per_1k_rps)
        .fold(0.0, f64::max);
    let mut text = String::new();
    for layout in Layout::ALL {
        let worst = worst_p99(layout, Way::Shadow);
        let _ = writeln!(
            text,
            "- shadow, {}: p99 of the primary path within {:.0}% of no shadowing at every rate: {worst:.3}x at worst (no shadowing against itself: {:.3}x at worst) — {}",
            layout.name(),
            (P99_RATIO_TARGET - 1.0) * 100.0,
            worst_p99(layout, Way::DirectAgain),
            verdict(worst <= P99_RATIO_TARGET)
        );
    }
    let _ = writeln!(
        text,
        "- shadow: every request replayed up to ≥ {FULL_REPLAY_RATE} rps, every miss counted above: 100% up to {full_up_to} rps offered, misses counted: {} — {}",
        if counted { "yes" } else { "no" },
        verdict(full_up_to >= FULL_REPLAY_RATE && counted)
    );
    let _ = writeln!(
        text,
        "- shadow: ≤ {VCPU_PER_1K_TARGET} vCPU per 1,000 rps (Istio's sidecar: 0.20): {worst_cpu:.3} at worst — {}",
        verdict(worst_cpu <= VCPU_PER_1K_TARGET)
    );
    text
}
