//! The quick form of `mirror-agent run`: one session from tcpdump-like flags (`-i`, a filter,
//! `-w`, `-c`, `-C`/`-G`/`-W`, `-Q`, `-r`, …), its usage errors, and tcpdump's habits.
use std::path::PathBuf;

use clap::Args;

use super::UsageError;
use crate::{
    config::{
        ActionConfig, Cidr, Config, DirectionConfig, Ethertype, HookConfig, IpProto, PortRange,
        RateLimitConfig, RuleConfig, SampleBy, SampleConfig, SessionConfig, Vlan,
    },
    targets::{
        self, TargetConfig,
        file::FileConfig,
        observe::{ObserveConfig, Protocol},
        shadow::ShadowConfig,
        tunnel::{
            DEFAULT_GENEVE_PORT, DEFAULT_VXLAN_PORT, ErspanConfig, GeneveConfig, GreConfig,
            VxlanConfig,
        },
    },
    values::{ErspanSessionId, Vni},
};

/// The quick form: one session with one mirror rule built from these flags (default: skip).
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("udp_tunnel").args(["to_vxlan", "to_geneve"])))]
#[command(group(clap::ArgGroup::new("tunnel").args(["to_vxlan", "to_geneve", "to_gre", "to_erspan"])))]
// One-flag groups for the flags that go with one target: clap's `requires` of a flag of the
// `target` group is met by any target, that of a group only by its own.
#[command(group(clap::ArgGroup::new("shadow_target").args(["shadow"])))]
// What may follow the copies: one target, or observe (alone or with a shadow).
#[command(group(clap::ArgGroup::new("output").multiple(true).args([
    "to", "write", "shadow", "to_vxlan", "to_geneve", "to_gre", "to_erspan", "observe",
])))]
#[command(group(clap::ArgGroup::new("gre_target").args(["to_gre"])))]
#[command(group(clap::ArgGroup::new("erspan_target").args(["to_erspan"])))]
#[expect(clippy::struct_excessive_bools, reason = "each is a flag of its own")]
pub(crate) struct QuickSession {
    /// Interface name or glob to watch (repeatable); `any`: every interface but the target (and
    /// those that come later).
    #[arg(short = 'i', long, requires = "output")]
    iface: Vec<String>,
    /// A tcpdump filter expression, e.g. 'tcp port 443 and not host 10.1.2.3' (the words are
    /// joined, as tcpdump does): compiled into ordered rules, or what the rules cannot hold
    /// (`tcp[13] & 2 != 0`, `less 100`, …) by libpcap into one rule that runs its program (see
    /// --explain). Without it, the field flags below make one rule.
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
    pub(crate) read: Option<PathBuf>,
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
    pub(crate) count: Option<u64>,
    /// Shadow a service: the HTTP/1.x requests in the copies are replayed to this
    /// `http://HOST:PORT` and its answers dropped (the filter then defaults to `tcp`; give the
    /// live service's, e.g. 'tcp port 8080').
    #[arg(long, group = "target", requires = "iface", value_name = "URL")]
    shadow: Option<String>,
    /// With --shadow: compare each shadow answer with the live one (see `status`).
    #[arg(long, requires = "shadow_target")]
    compare: bool,
    /// Count the HTTP/1.x exchanges in the copies of both directions by service (requests by
    /// method and status class, durations: `stats --watch`, the metrics), alone or with
    /// --shadow (the filter then defaults to `tcp`).
    #[arg(long, value_enum, value_name = "PROTOCOL", requires = "iface", conflicts_with_all = [
        "to", "write", "to_vxlan", "to_geneve", "to_gre", "to_erspan",
    ])]
    observe: Option<Protocol>,
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
    pub(crate) fn check_file_flags(&self) -> anyhow::Result<()> {
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
        } else if self.observe.is_some() {
            TargetConfig::Observe
        } else {
            // `target` is required with `iface`, and `iface` without a file.
            TargetConfig::Watch
        }
    }

    pub(crate) fn into_config(self) -> Config {
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
                // A shadow and an observer read TCP alone.
                proto: self
                    .proto
                    .or((self.shadow.is_some() || self.observe.is_some())
                        .then_some(IpProto(libc::IPPROTO_TCP as u8))),
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
            observe: self.observe.map(|p| spanned(ObserveConfig::of(p))),
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

/// `run -r IN -w OUT [FILTER]`: the frames of IN that FILTER selects, into OUT.
pub(crate) fn select_from_file(
    input: &std::path::Path,
    quick: &QuickSession,
) -> anyhow::Result<()> {
    quick.check_file_flags()?;
    if quick.write.is_none() {
        return Err(UsageError(anyhow::anyhow!(
            "-r needs -w FILE: it writes the frames the filter selects"
        ))
        .into());
    }
    let filter = quick.filter.join(" ");
    let selector = (!filter.trim().is_empty())
        .then(|| {
            crate::rules::filter::compile(&filter).map(crate::rules::filter::Filter::into_selector)
        })
        .transpose()
        .map_err(|e| UsageError(anyhow::anyhow!("filter `{filter}`: {e}")))?;
    let TargetConfig::File(file) = quick.target() else {
        unreachable!("-w is a file target");
    };
    let mut out = targets::file::PcapFile::open(&file.path, file.rotation())?;
    out.packet_buffered = file.packet_buffered;
    let selection = super::read::select(input, selector.as_ref(), out, quick.count)?;
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
pub(crate) fn tcpdump_advice(error: &clap::Error) -> Option<String> {
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
