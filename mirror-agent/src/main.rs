//! mirror-agent: mirrors the packets that match a session's rules to a target interface, a tunnel
//! to a collector (VXLAN, GENEVE, GRE, ERSPAN) or a capture file, using TC and XDP eBPF programs.
//! `run` applies a configuration until SIGINT/SIGTERM; `check` only validates one; `collect`
//! receives tunnelled copies into a pcap file or an interface.
#![deny(unsafe_code)]
mod api;
mod cli;
mod collect;
mod config;
mod daemon;
mod datapath;
mod encap;
mod follow;
mod rules;
mod state;
#[expect(unsafe_code, reason = "the agent's unsafe code is here, and only here")]
mod sys;
mod targets;
mod task;
mod values;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum as _};

use crate::{
    config::{
        ActionConfig, Cidr, Config, DirectionConfig, Ethertype, HookConfig, IpProto, LoadedConfig,
        PortRange, RateLimitConfig, RuleConfig, SampleBy, SampleConfig, SessionConfig, Vlan,
    },
    datapath::KernelLog,
    targets::{
        TargetConfig,
        file::FileConfig,
        shadow::ShadowConfig,
        tunnel::{
            DEFAULT_GENEVE_PORT, DEFAULT_VXLAN_PORT, ErspanConfig, GeneveConfig, GreConfig,
            VxlanConfig,
        },
    },
    values::{ErspanSessionId, Vni},
};

/// Port mirroring for Linux nodes with eBPF: copies the packets that match a session's rules from
/// the watched interfaces to a target interface, a collector (VXLAN, GENEVE, GRE or ERSPAN) or a
/// capture file, without touching the original packets.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Attach and mirror until SIGINT or SIGTERM, then detach everything and print the counters.
    ///
    /// Sessions with `pods = { namespace, labels }` watch the pods of this node (`--node-name`)
    /// through their host-side interfaces, followed as pods come, are relabelled and go.
    ///
    /// With `--config FILE`, the agent applies the file again on SIGHUP, on `mirror-agent reload`
    /// and when the file changes (checked every second, symlink swaps included): an invalid file
    /// is rejected with the reason and the running configuration stays; a valid one replaces it
    /// atomically per hook. Or the quick form for one session:
    /// `mirror-agent run --iface eth0 --to mirror0 --proto tcp --dst-port 443`, or
    /// `mirror-agent run --iface eth0 --to-vxlan 192.0.2.10 --vni 7` (also `--to-geneve`,
    /// `--to-gre`, `--to-erspan`).
    Run(Box<RunArgs>),
    /// Validate a configuration against this host's interfaces and routes; exit 1 with
    /// <file:line> on errors.
    Check {
        /// The configuration file (TOML; see examples/).
        #[arg(long)]
        config: PathBuf,
        /// Print the kernel rules each session became, in the order they are tried (filter
        /// expressions, and rules with `host` or `port`, become several).
        #[arg(long)]
        explain: bool,
    },
    /// Receive tunnelled copies (VXLAN, GENEVE, GRE, ERSPAN; from this agent or any other
    /// source): write the inner frames to a pcap/pcapng file and/or send them out of an
    /// interface, count them per stream and ERSPAN's lost copies.
    Collect(Box<collect::CollectArgs>),
    /// Watch a session of the running agent live, or interfaces (-i) or pods (-n/-l) with an
    /// ad-hoc filter: the copies as pcapng, through the agent's API socket, until interrupted (or
    /// -c copies):
    /// `mirror-agent capture --session web -w - | wireshark -k -i -`, `mirror-agent capture -i
    /// eth0 -w - 'port 443'`. In Kubernetes: `kubectl exec ds/mirror-agent -- mirror-agent capture
    /// --session web -w - | wireshark -k -i -`. Nothing is added to the datapath while no one
    /// watches; a reader that falls behind loses copies (counted in `status`), never the agent
    /// or the session's target.
    Capture(cli::CaptureArgs),
    /// Show what the running agent watches: sessions, targets, hooks (through its API socket).
    Status {
        #[command(flatten)]
        socket: cli::AgentSocket,
        /// Every agent answering in /run/mirror: the one on the default socket and each
        /// quick-form run (`run -i …`), which has a socket of its own.
        #[arg(long, conflicts_with_all = ["api_socket", "config"])]
        all: bool,
        /// Print the API's JSON (with --all: one object per socket, `socket` and `status` or
        /// `error`).
        #[arg(long)]
        json: bool,
    },
    /// Print shell completions (e.g. `mirror-agent completions bash >
    /// /etc/bash_completion.d/mirror-agent`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page, in roff (e.g. `mirror-agent man >
    /// /usr/local/share/man/man8/mirror-agent.8`), or a command's (`mirror-agent man run`, the
    /// page mirror-agent-run(8)).
    Man {
        /// The command whose page to print; none: the page of mirror-agent itself.
        command: Option<String>,
        /// List the commands that have a page of their own, one a line.
        #[arg(long, conflicts_with = "command")]
        list: bool,
    },
    /// Make the running agent apply its configuration file again; prints the new generation, or
    /// why the file was rejected (exit 1; the running configuration stays).
    Reload {
        #[command(flatten)]
        socket: cli::AgentSocket,
    },
    /// Show the running agent's counters per session: seen, skipped, mirrored, not sent (with --watch:
    /// a refreshing table with rates).
    Stats {
        #[command(flatten)]
        socket: cli::AgentSocket,
        /// Print the API's JSON (every counter, per rule too); with --watch, one line per
        /// interval with per-session rates (NDJSON).
        #[arg(long)]
        json: bool,
        /// Refresh every --interval seconds until interrupted (or --count readings).
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes with --watch, 0.1 to 3600.
        #[arg(long, default_value_t = 1.0, value_parser = cli::refresh_interval)]
        interval: f64,
        /// With --watch: stop after this many readings.
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
}

#[derive(Debug, Args)]
#[expect(clippy::struct_excessive_bools, reason = "command-line switches")]
struct RunArgs {
    /// The configuration file (TOML; see examples/).
    #[arg(
        long,
        conflicts_with_all = ["iface", "target"],
        required_unless_present_any = ["target", "iface", "list_interfaces", "read"]
    )]
    config: Option<PathBuf>,
    /// List the interfaces the agent could watch, as `tcpdump -D` does, and exit.
    #[arg(short = 'D', long, conflicts_with_all = ["config", "iface", "target"])]
    list_interfaces: bool,
    #[command(flatten)]
    quick: QuickSession,
    /// Print the kernel rules each session became (on stderr) before attaching.
    #[arg(long)]
    explain: bool,
    /// Check the sessions and print their kernel rules, as `mirror-agent check --explain`
    /// does, then exit without attaching anything: a dry run of a filter, e.g. `run --check
    /// -i eth0 -w x.pcap 'tcp port 443 and not net 10.0.0.0/8'`.
    #[arg(long, conflicts_with = "explain")]
    check: bool,
    /// Seconds between counter log lines; 0 disables them (overrides the file's value).
    #[arg(long)]
    stats_interval: Option<u64>,
    /// The API's Unix socket (overrides the file's `api_socket`; default /run/mirror/agent.sock
    /// with --config, and a socket of the run's own, /run/mirror/run-PID.sock, for the quick
    /// form, so that several run at once: `mirror-agent status --all` lists them).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Serve Prometheus /metrics, /healthz and /readyz here, e.g. 10.0.0.5:9477 (overrides the
    /// file's `metrics_address`). Nothing there asks for credentials: bind it where only the node
    /// and Prometheus reach it.
    #[arg(long)]
    metrics_address: Option<std::net::SocketAddr>,
    /// Serve metrics on this IP address, with the port of --metrics-address or of the file's
    /// `metrics_address` (the Helm chart passes the node's IP here).
    #[arg(long, value_name = "IP")]
    metrics_ip: Option<std::net::IpAddr>,
    /// Serve the read-only JSON routes (/status, /stats, /stats/stream) on the metrics address
    /// too. They show pods, addresses and collectors to anyone who can connect.
    #[arg(long)]
    metrics_json_routes: bool,
    /// Pinned mode: keep the programs and links in this bpffs directory (e.g. /sys/fs/bpf/mirror)
    /// so that they go on mirroring after the agent exits or crashes, and take over what an
    /// earlier agent left there (overrides the file's `pin_dir`). Without it, everything is
    /// detached on exit.
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// The node this agent runs on (Kubernetes): sessions with `pods = {…}` watch the pods
    /// scheduled here. The `DaemonSet` sets `NODE_NAME` from the downward API. The agent talks to
    /// the API (in-cluster, or the KUBECONFIG file) only when a session selects pods.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The kubeconfig file to reach the Kubernetes API with (default: the pod's service account
    /// in a cluster, else KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Log lines from the kernel programs, at this level and above, in the agent's log (target
    /// `kernel`): rule table misses, walks cut at the step limit and failed copies (warn), and
    /// each failed clone (debug). Every such event is counted whatever the level. The level is
    /// fixed when the programs are loaded; `off` removes the log calls from the programs
    /// entirely.
    #[arg(long, value_enum, default_value_t = KernelLog::Off, value_name = "LEVEL")]
    kernel_log: KernelLog,
    /// Print the report at the stop as one JSON document instead of the table: `stats` (as `GET
    /// /stats`, with the targets' transmit losses), `ring` (per session, copies sent on from the
    /// ring and failed), `tunnels` (each tunnel's last hop or problem) and `pinned` (the pin
    /// directory left mirroring, in pinned mode).
    #[arg(long)]
    json: bool,
}

/// The quick form: one session with one mirror rule built from these flags (default: skip).
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("udp_tunnel").args(["to_vxlan", "to_geneve"])))]
#[command(group(clap::ArgGroup::new("tunnel").args(["to_vxlan", "to_geneve", "to_gre", "to_erspan"])))]
// One-flag groups for the flags that go with one target: clap's `requires` of a flag of the
// `target` group is met by any target, that of a group only by its own.
#[command(group(clap::ArgGroup::new("shadow_target").args(["shadow"])))]
#[command(group(clap::ArgGroup::new("gre_target").args(["to_gre"])))]
#[command(group(clap::ArgGroup::new("erspan_target").args(["to_erspan"])))]
#[expect(clippy::struct_excessive_bools, reason = "each is a flag of its own")]
struct QuickSession {
    /// Interface name or glob to watch (repeatable); `any`: every interface but the target (and
    /// those that come later).
    #[arg(short = 'i', long, requires = "target")]
    iface: Vec<String>,
    /// A tcpdump filter expression, e.g. 'tcp port 443 and not host 10.1.2.3' (the words are
    /// joined, as tcpdump does): compiled into ordered rules (see --explain). Without it, the
    /// field flags below make one rule.
    #[arg(value_name = "FILTER", conflicts_with_all = ["ethertype", "vlan", "proto", "src", "dst", "src_port", "dst_port"])]
    filter: Vec<String>,
    /// Target interface the copies are sent out of, or `file:PATH` to write them to a pcap
    /// (`.pcap`) or pcapng (`.pcapng`) file.
    #[arg(long, group = "target", requires = "iface")]
    to: Option<String>,
    /// Write the copies to this pcap file (pcapng if it ends in .pcapng), as `tcpdump -w`; `-`
    /// writes pcap to standard output, with every log line and the final counters on stderr:
    /// `mirror-agent run -i eth0 -w - 'udp port 53' | tshark -r -`.
    #[arg(
        short = 'w',
        long = "write",
        value_name = "FILE",
        group = "target",
        requires = "iface"
    )]
    write: Option<PathBuf>,
    /// With -w: write each copy to the file at once, as `tcpdump -U` (else at least every
    /// 100 ms).
    #[arg(short = 'U', long)]
    packet_buffered: bool,
    #[command(flatten)]
    _habits: TcpdumpHabits,
    /// Read the frames of this capture file (pcap or pcapng) instead of watching interfaces, and
    /// write those the FILTER selects to -w, as `tcpdump -r IN -w OUT FILTER`; nothing is
    /// attached.
    #[arg(short = 'r', long = "read", value_name = "FILE", conflicts_with_all = [
        "iface", "to", "shadow", "to_vxlan", "to_geneve", "to_gre", "to_erspan", "ethertype",
        "vlan", "proto", "src", "dst", "src_port", "dst_port", "direction", "hook",
    ])]
    read: Option<PathBuf>,
    /// With -w: start a new file once this one holds `FILE_SIZE` million bytes (1,000,000), as
    /// `tcpdump -C`: FILE-000001.pcap, FILE-000002.pcap, …
    #[arg(short = 'C', value_name = "FILE_SIZE", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rotate_millions: Option<u64>,
    /// With -w: start a new file with the first copy SECONDS after this one was started, as
    /// `tcpdump -G` (the files are numbered as with -C; no strftime names).
    #[arg(short = 'G', value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    rotate_seconds: Option<u64>,
    /// With -C or -G: keep only the newest N files, as `tcpdump -W N`.
    #[arg(short = 'W', value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    rotate_count: Option<u64>,
    /// With -w: stop after writing N copies, as `tcpdump -c N`.
    #[arg(short = 'c', long = "count", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    /// Shadow a service: the HTTP/1.x requests in the copies are replayed to this
    /// `http://HOST:PORT` and its answers dropped (the filter then defaults to `tcp`; give the
    /// live service's, e.g. 'tcp port 8080').
    #[arg(long, group = "target", requires = "iface", value_name = "URL")]
    shadow: Option<String>,
    /// With --shadow: compare each shadow answer with the live one (see `status`).
    #[arg(long, requires = "shadow_target")]
    compare: bool,
    /// Target collector: copies are sent in VXLAN (RFC 7348) to this IPv4 or IPv6 address.
    #[arg(long, group = "target", requires = "iface")]
    to_vxlan: Option<std::net::IpAddr>,
    /// Target collector: copies are sent in GENEVE (RFC 8926) to this address.
    #[arg(long, group = "target", requires = "iface")]
    to_geneve: Option<std::net::IpAddr>,
    /// Target collector: copies are sent in GRE (Ethernet inside, protocol 0x6558) to this
    /// address.
    #[arg(long, group = "target", requires = "iface")]
    to_gre: Option<std::net::IpAddr>,
    /// Target collector: copies are sent in ERSPAN (type II by default) to this address.
    #[arg(long, group = "target", requires = "iface")]
    to_erspan: Option<std::net::IpAddr>,
    /// VNI of the VXLAN or GENEVE copies (0..16777215).
    #[arg(long, requires = "udp_tunnel", default_value = "0")]
    vni: Vni,
    /// Destination UDP port of the VXLAN or GENEVE copies (default: 4789 for VXLAN, 6081 for
    /// GENEVE).
    #[arg(long, alias = "vxlan-port", requires = "udp_tunnel")]
    tunnel_port: Option<u16>,
    /// Source address of the tunnel's outer packets (default: the route's).
    #[arg(long, alias = "vxlan-local", requires = "tunnel")]
    tunnel_local: Option<std::net::IpAddr>,
    /// GRE key of the GRE copies (none by default).
    #[arg(long, requires = "gre_target")]
    gre_key: Option<u32>,
    /// ERSPAN session id of the ERSPAN copies (0..1023).
    #[arg(long, requires = "erspan_target", default_value = "0")]
    erspan_session: ErspanSessionId,
    /// ERSPAN type: 2 (type II) or 3 (type III: with a timestamp and the direction).
    #[arg(long, requires = "erspan_target", default_value_t = 2)]
    erspan_version: u8,
    /// Which side of the interfaces to watch (default: both for TC, ingress for XDP); as
    /// tcpdump's `-Q`, also `in`, `out` or `inout`.
    #[arg(short = 'Q', long, value_enum)]
    direction: Option<DirectionConfig>,
    /// Where packets are examined: tc, or xdp (received packets, before the kernel's stack;
    /// copies go through a ring buffer and the agent sends them on).
    #[arg(long, value_enum)]
    hook: Option<HookConfig>,
    /// Ethertype: number (0x88cc) or ipv4, ipv6, arp, lldp, vlan.
    #[arg(long)]
    ethertype: Option<Ethertype>,
    /// Outer VLAN id.
    #[arg(long)]
    vlan: Option<Vlan>,
    /// IP protocol: number or tcp, udp, sctp, icmp, icmpv6.
    #[arg(long)]
    proto: Option<IpProto>,
    /// Source prefix (IPv4 or IPv6).
    #[arg(long)]
    src: Option<Cidr>,
    /// Destination prefix (IPv4 or IPv6).
    #[arg(long)]
    dst: Option<Cidr>,
    /// Source port or range (1024-65535).
    #[arg(long)]
    src_port: Option<PortRange>,
    /// Destination port or range.
    #[arg(long)]
    dst_port: Option<PortRange>,
    /// Cut copies to this many bytes, at least 96 (the originals are untouched); 0: whole frames,
    /// as with tcpdump's -s 0.
    #[arg(short = 's', long)]
    snaplen: Option<u32>,
    /// Never copy packets the parser cannot finish (a truncated header, a very long IPv6
    /// extension chain). By default they are copied when the rule might match them.
    #[arg(long)]
    skip_unparsed: bool,
    /// Copy 1 in N of the packets the rule selects (at random).
    #[arg(long, value_name = "N")]
    sample: Option<u32>,
    /// With --sample: pick whole flows (both directions), not single packets.
    #[arg(long, requires = "sample")]
    sample_flows: bool,
    /// At most this many copies per second.
    #[arg(long)]
    max_pps: Option<u64>,
    /// At most this many bytes of copies per second.
    #[arg(long)]
    max_bps: Option<u64>,
}

/// tcpdump's flags that change nothing here, taken so that its habits work.
#[derive(Debug, Args)]
struct TcpdumpHabits {
    /// Accepted for tcpdump's habits, and without effect: the agent prints no packets, so it
    /// resolves no names (`-n`, `-nn`); it never puts an interface in promiscuous mode (`-p`);
    /// its lines are not buffered (`-l`).
    #[arg(short = 'n', action = clap::ArgAction::Count, hide_short_help = true)]
    no_names: u8,
    #[arg(short = 'p', hide = true)]
    no_promiscuous: bool,
    #[arg(short = 'l', hide = true)]
    line_buffered: bool,
}

impl QuickSession {
    /// The file flags without `-w`, or `-W` without `-C`: usage errors, with the reason (clap's
    /// `requires` does not hold across the flattened flags).
    fn check_file_flags(&self) -> anyhow::Result<()> {
        if self.rotate_count.is_some()
            && self.rotate_millions.is_none()
            && self.rotate_seconds.is_none()
        {
            return Err(UsageError(anyhow::anyhow!(
                "-W needs -C FILE_SIZE or -G SECONDS: it is how many of the rotated files to keep"
            ))
            .into());
        }
        if self.write.is_none() {
            for (given, flag, why) in [
                (
                    self.count.is_some(),
                    "-c",
                    "it counts the copies written to a file (copies sent out of an interface \
                     or a tunnel are not counted one by one)",
                ),
                (
                    self.packet_buffered,
                    "-U",
                    "it flushes the file after each copy",
                ),
                (self.rotate_millions.is_some(), "-C", "it rotates the file"),
                (self.rotate_seconds.is_some(), "-G", "it rotates the file"),
            ] {
                if given {
                    return Err(UsageError(anyhow::anyhow!("{flag} needs -w FILE: {why}")).into());
                }
            }
        }
        Ok(())
    }

    /// The target its flags name (clap lets exactly one through).
    fn target(&self) -> TargetConfig {
        let file = |path: PathBuf| {
            TargetConfig::File(FileConfig {
                path,
                rotate_bytes: self.rotate_millions.map(|millions| millions * 1_000_000),
                rotate_seconds: self.rotate_seconds,
                rotate_count: self.rotate_count,
                packet_buffered: self.packet_buffered,
            })
        };
        let local = self.tunnel_local;
        if let Some(path) = &self.write {
            file(path.clone())
        } else if let Some(to) = &self.to {
            match to.strip_prefix("file:") {
                Some(path) => file(path.into()),
                None => TargetConfig::Interface(to.clone()),
            }
        } else if let Some(url) = &self.shadow {
            TargetConfig::Shadow(ShadowConfig {
                compare: self.compare,
                ..ShadowConfig::of_url(url)
            })
        } else if let Some(remote) = self.to_vxlan {
            TargetConfig::Vxlan(VxlanConfig {
                remote,
                vni: self.vni,
                port: self.tunnel_port.unwrap_or(DEFAULT_VXLAN_PORT),
                local,
            })
        } else if let Some(remote) = self.to_geneve {
            TargetConfig::Geneve(GeneveConfig {
                remote,
                vni: self.vni,
                port: self.tunnel_port.unwrap_or(DEFAULT_GENEVE_PORT),
                local,
            })
        } else if let Some(remote) = self.to_gre {
            TargetConfig::Gre(GreConfig {
                remote,
                key: self.gre_key,
                local,
            })
        } else if let Some(remote) = self.to_erspan {
            TargetConfig::Erspan(ErspanConfig {
                remote,
                session_id: self.erspan_session,
                version: self.erspan_version,
                local,
            })
        } else {
            // `target` is required with `iface`, and `iface` without a file.
            TargetConfig::Watch
        }
    }

    fn into_config(self) -> Config {
        fn spanned<T>(value: T) -> toml::Spanned<T> {
            toml::Spanned::new(0..0, value)
        }
        let target = spanned(self.target());
        let filter = (!self.filter.is_empty()).then(|| spanned(self.filter.join(" ")));
        let rules = if filter.is_some() {
            Vec::new()
        } else {
            vec![spanned(RuleConfig {
                number: 1,
                action: ActionConfig::Mirror,
                ethertype: self.ethertype,
                vlan: self.vlan,
                // A shadow reads TCP alone.
                proto: self.proto.or(self
                    .shadow
                    .as_ref()
                    .map(|_| IpProto(libc::IPPROTO_TCP as u8))),
                src: self.src,
                dst: self.dst,
                src_port: self.src_port,
                dst_port: self.dst_port,
                ..RuleConfig::default()
            })]
        };
        let session = SessionConfig {
            name: spanned("cli".to_owned()),
            interfaces: Some(spanned(self.iface.into_iter().map(spanned).collect())),
            pods: None,
            direction: self.direction.map(spanned),
            hook: self.hook.map(spanned),
            target,
            default: None,
            snaplen: self.snaplen.filter(|len| *len != 0).map(spanned),
            unparsed: self.skip_unparsed.then_some(ActionConfig::Skip),
            sample: self.sample.map(|every| {
                spanned(SampleConfig {
                    every,
                    by: if self.sample_flows {
                        SampleBy::Flow
                    } else {
                        SampleBy::Packet
                    },
                    seed: None,
                })
            }),
            rate_limit: (self.max_pps.is_some() || self.max_bps.is_some()).then(|| {
                spanned(RateLimitConfig {
                    packets_per_second: self.max_pps,
                    bytes_per_second: self.max_bps,
                    ..RateLimitConfig::default()
                })
            }),
            filter,
            rules,
        };
        Config {
            sessions: vec![spanned(session)],
            stats_interval_secs: 10,
            node_rate_limit: None,
            api_socket: None,
            metrics_address: None,
            metrics_json_routes: false,
            pin_dir: None,
            copy_ring_bytes: None,
        }
    }
}

/// A mistake in the command line (exit code 2, as clap's own).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct UsageError(anyhow::Error);

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            if let Some(advice) = tcpdump_advice(&error) {
                eprintln!("error: {advice}");
                return std::process::ExitCode::from(2);
            }
            error.exit()
        }
    };
    match run_command(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("Error: {error:?}");
            std::process::ExitCode::from(if error.is::<UsageError>() { 2 } else { 1 })
        }
    }
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    let mut filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if let Command::Run(args) = &cli.command
        && let Some(level) = args.kernel_log.to_possible_value()
        && args.kernel_log != KernelLog::Off
    {
        // The programs' lines at the level asked for, whatever RUST_LOG says of the rest.
        filter = filter.add_directive(format!("kernel={}", level.get_name()).parse()?);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        // Colours only for a person at a terminal: not into a container's log or a journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // The daemons handle a closed pipe themselves: `run -w -` counts its copies as refused,
    // and their log goes on. Every other command ends quietly when its reader goes.
    if !matches!(cli.command, Command::Run(_) | Command::Collect(_)) {
        sys::die_on_closed_pipe();
    }
    match cli.command {
        Command::Check { config, explain } => cli::check(&config, explain),
        Command::Completions { shell } => {
            write_completions(shell, &mut std::io::stdout());
            Ok(())
        }
        Command::Man { list: true, .. } => {
            for command in Cli::command().get_subcommands() {
                println!("{}", command.get_name());
            }
            Ok(())
        }
        Command::Man { command, .. } => write_manual(command.as_deref(), &mut std::io::stdout()),
        Command::Run(args) => run(*args),
        Command::Collect(args) => runtime()?.block_on(collect::run(*args)),
        Command::Reload { socket } => runtime()?.block_on(async {
            let answer = api::post_to(&socket.path()?, "/reload").await?;
            let reloaded: state::Reloaded =
                serde_json::from_str(&answer).context("the agent's answer to /reload")?;
            if reloaded.unchanged {
                println!(
                    "unchanged: the file is the applied configuration, generation {}",
                    reloaded.generation
                );
            } else {
                println!("reloaded: configuration generation {}", reloaded.generation);
            }
            Ok(())
        }),
        Command::Capture(args) => runtime()?.block_on(cli::capture(args)),
        Command::Status {
            all: true, json, ..
        } => runtime()?.block_on(cli::show_every_status(json)),
        Command::Status { socket, json, .. } => {
            runtime()?.block_on(cli::show_status(&socket.path()?, json))
        }
        Command::Stats {
            socket,
            json,
            watch,
            interval,
            count,
        } => {
            let runtime = runtime()?;
            let api_socket = socket.path()?;
            if watch && json {
                runtime.block_on(cli::stream_stats(&api_socket, interval, count))
            } else {
                runtime.block_on(cli::show_stats(&api_socket, json, watch, interval, count))
            }
        }
    }
}

/// `mirror-agent run`: the file's configuration or the quick form's, until a stop.
fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.list_interfaces {
        for interface in targets::interface::present().context("listing the interfaces")? {
            println!("{}.{}", interface.ifindex, interface.name);
        }
        return Ok(());
    }
    if let Some(input) = &args.quick.read {
        return select_from_file(input, &args.quick);
    }
    let stop_after = args.quick.count;
    let quick_form = args.config.is_none();
    args.quick.check_file_flags()?;
    let mut loaded = match &args.config {
        Some(path) => LoadedConfig::read(path)?,
        None => LoadedConfig::from_config(args.quick.into_config(), "command line"),
    };
    if let Some(secs) = args.stats_interval {
        loaded.config.stats_interval_secs = secs;
    }
    let metrics = metrics_address(
        args.metrics_address.or(loaded.config.metrics_address),
        args.metrics_ip,
    )?;
    let plan = rules::plan_on_host(&loaded).map_err(|e| {
        // The quick form's mistakes are the command line's.
        let error = anyhow::Error::from(e);
        if args.config.is_none() {
            UsageError(error).into()
        } else {
            error
        }
    })?;
    if args.check {
        let source = args
            .config
            .as_deref()
            .map_or_else(|| "command line".to_owned(), |c| c.display().to_string());
        return cli::check_plan(&plan, &source, true);
    }
    for warning in &plan.warnings {
        tracing::warn!("{warning}");
    }
    if args.explain {
        eprint!("{}", cli::explain(&plan));
    }
    let options = daemon::Options {
        config: args.config,
        stats_interval_secs: loaded.config.stats_interval_secs,
        socket: args
            .api_socket
            .or_else(|| loaded.config.api_socket.clone())
            .unwrap_or_else(|| {
                if quick_form {
                    api::run_socket(std::process::id())
                } else {
                    api::DEFAULT_SOCKET.into()
                }
            }),
        metrics,
        metrics_json: args.metrics_json_routes || loaded.config.metrics_json_routes,
        pin_dir: args.pin_dir.or_else(|| loaded.config.pin_dir.clone()),
        node_name: args.node_name,
        kubeconfig: args.kubeconfig,
        stop_after,
        kernel_log: args.kernel_log,
        json_report: args.json,
        copies_on_stdout: plan.sessions.iter().any(|s| {
            s.target
                .file()
                .is_some_and(targets::file::FileConfig::is_stdout)
        }),
    };
    runtime()?.block_on(daemon::run(&loaded, plan, options))
}

/// `run -r IN -w OUT [FILTER]`: the frames of IN that FILTER selects, into OUT.
fn select_from_file(input: &std::path::Path, quick: &QuickSession) -> anyhow::Result<()> {
    quick.check_file_flags()?;
    if quick.write.is_none() {
        return Err(UsageError(anyhow::anyhow!(
            "-r needs -w FILE: it writes the frames the filter selects"
        ))
        .into());
    }
    let filter = quick.filter.join(" ");
    let selector = (!filter.trim().is_empty())
        .then(|| rules::filter::compile(&filter).map(rules::filter::Filter::into_selector))
        .transpose()
        .map_err(|e| UsageError(anyhow::anyhow!("filter `{filter}`: {e}")))?;
    let TargetConfig::File(file) = quick.target() else {
        unreachable!("-w is a file target");
    };
    let mut out = targets::file::PcapFile::open(&file.path, file.rotation())?;
    out.packet_buffered = file.packet_buffered;
    let selection = cli::read::select(input, selector.as_ref(), out, quick.count)?;
    eprintln!(
        "mirror-agent: {} of {} frame(s) of {} selected",
        selection.selected,
        selection.read,
        input.display()
    );
    Ok(())
}

/// What to do instead, for a tcpdump flag the agent does not take (clap would advise `-- -v`,
/// which makes it filter text).
fn tcpdump_advice(error: &clap::Error) -> Option<String> {
    if error.kind() != clap::error::ErrorKind::UnknownArgument {
        return None;
    }
    let clap::error::ContextValue::String(flag) =
        error.get(clap::error::ContextKind::InvalidArg)?
    else {
        return None;
    };
    let printing = [
        "-v", "-vv", "-vvv", "-e", "-x", "-xx", "-X", "-XX", "-A", "-t", "-tt", "-q", "-S",
    ];
    Some(match flag.as_str() {
        flag if printing.contains(&flag) => format!(
            "`{flag}` changes how tcpdump prints packets, and mirror-agent prints none: it writes \
             them (`-w FILE`); to read them decoded, `-w - | tshark -r - -V`"
        ),
        _ => return None,
    })
}

/// The shell completions of every command and flag.
fn write_completions(shell: clap_complete::Shell, out: &mut impl std::io::Write) {
    clap_complete::generate(shell, &mut Cli::command(), "mirror-agent", out);
}

/// The manual page (section 8: a system administration command) of mirror-agent, or of one of
/// its commands (`mirror-agent-run`), in roff.
fn write_manual(command: Option<&str>, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let mut cli = Cli::command();
    cli.build();
    let page = match command {
        None => cli,
        Some(name) => {
            let Some(sub) = cli.find_subcommand(name) else {
                let names: Vec<&str> = cli.get_subcommands().map(clap::Command::get_name).collect();
                return Err(UsageError(anyhow::anyhow!(
                    "no command `{name}` (commands: {})",
                    names.join(", ")
                ))
                .into());
            };
            // Named as the main page's SEE ALSO names it.
            sub.clone().name(format!("mirror-agent-{name}"))
        }
    };
    clap_mangen::Man::new(page)
        .section("8")
        .render(out)
        .context("writing the manual page")
}

/// Standard error for the log, whose failures are ignored: the agent and the collector must not
/// stop because whatever read their log went away (`| head`, a restarted log collector).
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The metrics address of the command line or the file, with --metrics-ip's address.
fn metrics_address(
    address: Option<std::net::SocketAddr>,
    ip: Option<std::net::IpAddr>,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    match (address, ip) {
        (Some(address), Some(ip)) => Ok(Some(std::net::SocketAddr::new(ip, address.port()))),
        (None, Some(_)) => anyhow::bail!(
            "--metrics-ip needs a port: give --metrics-address or the file's metrics_address"
        ),
        (address, None) => Ok(address),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

#[cfg(test)]
mod tests {
    /// The agent's top-level modules in the order the data flows: each may use only those
    /// before it (and `main` all of them).
    const LAYERS: &[&str] = &[
        "sys", "task", "values", "encap", "targets", "config", "rules", "datapath", "state",
        "follow", "api", "daemon", "cli", "collect",
    ];

    /// The top-level modules a source file names through `crate::…`, `use crate::{a, b::…}`
    /// included.
    fn crate_paths(source: &str) -> Vec<String> {
        let code: String = source
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut named = Vec::new();
        for (at, _) in code.match_indices("crate::") {
            let rest = code[at + "crate::".len()..].trim_start();
            if let Some(group) = rest.strip_prefix('{') {
                // The first name of each item at the group's own depth.
                let mut depth = 0;
                let mut item_start = true;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if depth == 0 && item_start && (c.is_alphanumeric() || c == '_') => {
                            let name: String = group[i..]
                                .chars()
                                .take_while(|c| c.is_alphanumeric() || *c == '_')
                                .collect();
                            named.push(name);
                            item_start = false;
                        }
                        _ => {}
                    }
                }
            } else {
                named.push(
                    rest.chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect(),
                );
            }
        }
        named
    }

    /// Every module uses only those above it in [`LAYERS`]: the tree reads as the data flow,
    /// with no cycles.
    #[test]
    fn modules_import_only_those_above_them() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![root.clone()];
        let mut checked = 0;
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(
                    std::fs::read_dir(&path)
                        .expect("a source folder")
                        .map(|e| e.expect("an entry").path()),
                );
                continue;
            }
            let relative = path.strip_prefix(&root).expect("under src");
            let module = relative
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .map(|name| name.trim_end_matches(".rs"))
                .expect("a module");
            if module == "main" || path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let layer = LAYERS
                .iter()
                .position(|m| *m == module)
                .unwrap_or_else(|| panic!("{module} is in no layer"));
            let source = std::fs::read_to_string(&path).expect("a source file");
            for used in crate_paths(&source) {
                let Some(used_layer) = LAYERS.iter().position(|m| *m == used) else {
                    continue;
                };
                assert!(
                    used_layer <= layer,
                    "{} uses `{used}`, which comes after `{module}` in the data flow",
                    relative.display()
                );
            }
            checked += 1;
        }
        assert!(checked > 40, "{checked} files");
        assert_eq!(
            crate_paths("use crate::{a::{b, c}, d, e::f};\nx(crate::g::h);"),
            ["a", "d", "e", "g"]
        );
    }

    /// A session name longer than the usual column keeps the columns aligned.
    #[test]
    fn completions_and_the_manual_cover_every_command() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
        let mut bash = Vec::new();
        super::write_completions(clap_complete::Shell::Bash, &mut bash);
        let bash = String::from_utf8(bash).expect("UTF-8");
        let mut manual = Vec::new();
        super::write_manual(None, &mut manual).expect("rendered");
        let manual = String::from_utf8(manual).expect("UTF-8");
        assert!(
            manual.starts_with(".ie") && manual.contains(".TH mirror-agent 8"),
            "{manual}"
        );
        for command in [
            "run",
            "check",
            "collect",
            "status",
            "reload",
            "stats",
            "completions",
            "man",
        ] {
            assert!(
                bash.contains(&format!("mirror__agent__subcmd__{command}")),
                "{command}"
            );
            assert!(
                manual.contains(&format!("mirror\\-agent\\-{command}(8)")),
                "{command} in {manual}"
            );
            // And the page it names exists.
            let mut page = Vec::new();
            super::write_manual(Some(command), &mut page).expect("rendered");
            let page = String::from_utf8(page).expect("UTF-8");
            assert!(
                page.contains(&format!(".TH mirror-agent-{command} 8")),
                "{command}: {page}"
            );
        }
    }
}
