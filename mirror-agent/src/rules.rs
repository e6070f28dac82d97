//! Validation and compilation of a configuration into the kernel's lookup tables (the bit-vector
//! design is described in `mirror_common`). Pure: given the interfaces present, it either returns a
//! complete plan or an error, so nothing is applied from a configuration that fails here.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    ops::RangeInclusive,
};

use ipnet::IpNet;
use mirror_common::{
    Action, AttachmentKey, BITMAP_WORDS, Direction, FIELD_COUNT, Field, MAX_RULES, MAX_SESSIONS,
    RateLimit, RuleBitmap, RuleMeta, SAMPLE_ALL, SAMPLE_FLOWS, SAMPLE_PACKETS, SUMMARY_WORDS,
    UNCONSTRAINED,
};

use crate::config::{
    ActionConfig, ConfigError, DEFAULT_COPY_RING_BYTES, DirectionConfig, HookConfig, LoadedConfig,
    PodSelector, RateLimitConfig, SampleBy, SessionConfig, TargetConfig,
};
use crate::tunnel::header::{TunnelFormat, TunnelTarget};

/// A network interface present on the node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
}

/// One rule after validation; `None` fields match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub session: usize,
    pub kind: RuleKind,
    pub action: ActionConfig,
    pub ethertype: Option<u16>,
    pub vlan: Option<u16>,
    pub proto: Option<u8>,
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    pub src_port: Option<RangeInclusive<u16>>,
    pub dst_port: Option<RangeInclusive<u16>>,
}

/// Where a rule comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RuleKind {
    /// A configured rule with its number.
    Numbered(u32),
    /// Put first in every session when any session has a tunnel target: skips the outer packets
    /// of the agent's own tunnels, so copies are never mirrored again.
    TunnelGuard,
    /// The session's implicit last rule, with its default action.
    #[default]
    Default,
}

impl std::fmt::Display for RuleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuleKind::Numbered(n) => write!(f, "{n}"),
            RuleKind::TunnelGuard => f.write_str("guard"),
            RuleKind::Default => f.write_str("default"),
        }
    }
}

fn action_abi(action: ActionConfig) -> Action {
    match action {
        ActionConfig::Skip => Action::Skip,
        ActionConfig::Mirror => Action::Mirror,
    }
}

/// Where a session's copies go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Interface(Interface),
    Tunnel(TunnelTarget),
    File(FileTarget),
}

/// A pcap or pcapng file the agent writes copies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileTarget {
    pub path: std::path::PathBuf,
    pub rotate_bytes: Option<u64>,
    pub rotate_count: Option<u64>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Interface(i) => write!(f, "interface {}", i.name),
            Target::Tunnel(t) => t.fmt(f),
            Target::File(file) => write!(f, "file {}", file.path.display()),
        }
    }
}

/// What a session does to the copies its rules select: sampling, then size, then rate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Controls {
    /// Copies are cut to this many bytes.
    pub snaplen: Option<u32>,
    /// `SAMPLE_ALL`, `SAMPLE_PACKETS` or `SAMPLE_FLOWS`, 1 in `every`, and the flow hash seed.
    pub sample_mode: u32,
    pub sample_every: u32,
    pub sample_seed: u32,
    pub rate: RateLimit,
    /// No copy of a packet the parser could not finish (see `SessionConfig::unparsed`).
    pub skip_unparsed: bool,
}

/// A session after validation.
#[derive(Debug, Clone)]
pub struct Session {
    pub name: String,
    pub target: Target,
    pub controls: Controls,
    /// Interfaces and directions watched, sorted.
    pub attachments: Vec<(Interface, Direction)>,
    /// The session's interface globs, which interfaces created later may match.
    pub globs: Vec<glob::Pattern>,
    /// The pods the session watches instead of named interfaces; its attachments are their
    /// host-side interfaces when the plan was made.
    pub pods: Option<PodSelector>,
    /// The directions watched ([`Direction::XdpIngress`] alone for an XDP session).
    pub directions: Vec<Direction>,
    /// Copies go through the ring buffer and the agent sends them on: an XDP session, or a file
    /// target.
    pub through_ring: bool,
}

/// Everything the agent applies: sessions, rules in global order, and the kernel tables.
#[derive(Debug)]
pub struct Plan {
    pub sessions: Vec<Session>,
    /// The budget all sessions share.
    pub node_rate: RateLimit,
    /// Size of the ring buffer of copies the agent sends on.
    pub copy_ring_bytes: u32,
    pub rules: Vec<Rule>,
    pub tables: Tables,
    pub warnings: Vec<String>,
}

/// The contents of the kernel's lookup maps. A field no rule constrains has an empty table and
/// [`UNCONSTRAINED`] as its wildcard.
#[derive(Debug, Default)]
pub struct Tables {
    pub bitmaps: Vec<RuleBitmap>,
    pub wildcard: [u32; FIELD_COUNT],
    pub attachments: Vec<(AttachmentKey, u32)>,
    /// Direct arrays by value; empty when no rule constrains the field.
    pub ethertype: Vec<u32>,
    pub vlan: Vec<u32>,
    pub ip_proto: Vec<u32>,
    pub src_ip: Vec<(IpNet, u32)>,
    pub dst_ip: Vec<(IpNet, u32)>,
    pub src_port: Vec<u32>,
    pub dst_port: Vec<u32>,
    pub rules: Vec<RuleMeta>,
}

/// Validates `loaded` against the interfaces present and compiles it.
/// A pod-selector session watches the interfaces `pods` gives for its selector.
pub fn plan(
    loaded: &LoadedConfig,
    interfaces: &[Interface],
    pods: &dyn Fn(&PodSelector) -> Vec<Interface>,
) -> Result<Plan, ConfigError> {
    let config = &loaded.config;
    if config.sessions.is_empty() {
        return Err(loaded.file_error("no [[session]] is configured"));
    }
    if let Some(extra) = config.sessions.get(MAX_SESSIONS as usize) {
        return Err(loaded.error(extra.span(), format!("more than {MAX_SESSIONS} sessions")));
    }
    let mut warnings = Vec::new();
    let mut sessions = Vec::new();
    let mut names = HashMap::new();
    for spanned in &config.sessions {
        let session = spanned.get_ref();
        let name = session.name.get_ref();
        if name.is_empty() {
            return Err(loaded.error(session.name.span(), "a session name must not be empty"));
        }
        if let Some(first) = names.insert(name.clone(), session.name.span()) {
            let at = loaded.location(first);
            return Err(loaded.error(
                session.name.span(),
                format!("session name `{name}` is already used at {at}"),
            ));
        }
        sessions.push(resolve_session(
            loaded,
            session,
            interfaces,
            pods,
            &mut warnings,
        )?);
    }
    let guards = tunnel_guards(&sessions);
    // Counted before any rule is looked at: an oversized file is refused at once.
    let count = config
        .sessions
        .iter()
        .map(|s| s.get_ref().rules.len() + 1 + guards.len())
        .sum::<usize>();
    if count > MAX_RULES as usize {
        return Err(loaded.file_error(format!(
            "{count} rules (counting one default rule per session and the tunnel guards) exceed the limit of {MAX_RULES}"
        )));
    }
    let mut rules = Vec::new();
    let mut shadows = Shadows::default();
    for (index, spanned) in config.sessions.iter().enumerate() {
        rules.extend(guards.iter().map(|guard| Rule {
            session: index,
            ..guard.clone()
        }));
        rules.extend(session_rules(
            loaded,
            index,
            spanned.get_ref(),
            &mut shadows,
        )?);
    }
    warnings.extend(shadows.into_warnings());
    refuse_watched_targets(loaded, &sessions)?;
    let tables = compile(&sessions, &rules);
    let node_rate = match &config.node_rate_limit {
        Some(limit) => rate_limit(loaded, limit)?,
        None => RateLimit::default(),
    };
    let copy_ring_bytes = match &config.copy_ring_bytes {
        Some(bytes) if !bytes.get_ref().is_power_of_two() || *bytes.get_ref() < 4096 => {
            return Err(loaded.error(
                bytes.span(),
                "copy_ring_bytes must be a power of two of at least 4096",
            ));
        }
        Some(bytes) => *bytes.get_ref(),
        None => DEFAULT_COPY_RING_BYTES,
    };
    Ok(Plan {
        sessions,
        node_rate,
        copy_ring_bytes,
        rules,
        tables,
        warnings,
    })
}

/// The rules that keep the outer packets of every tunnel target (UDP to the collector's address
/// and port, or GRE to its address; from this node or any other) out of every session.
fn tunnel_guards(sessions: &[Session]) -> Vec<Rule> {
    let endpoints: BTreeSet<(IpAddr, u8, Option<u16>)> = sessions
        .iter()
        .filter_map(|s| match &s.target {
            Target::Tunnel(t) => Some((t.remote, t.format.ip_protocol(), t.format.udp_port())),
            Target::Interface(_) | Target::File(_) => None,
        })
        .collect();
    endpoints
        .into_iter()
        .map(|(remote, proto, port)| Rule {
            kind: RuleKind::TunnelGuard,
            action: ActionConfig::Skip,
            proto: Some(proto),
            dst: Some(IpNet::from(remote)),
            dst_port: port.map(|port| port..=port),
            ..Rule::default()
        })
        .collect()
}

/// A tunnel target's format and addresses, checked.
fn tunnel_target(target: &TargetConfig) -> Option<Result<TunnelTarget, String>> {
    let (remote, local, format) = match target {
        TargetConfig { vxlan: Some(v), .. } => (
            v.remote,
            v.local,
            TunnelFormat::Vxlan {
                vni: v.vni.0,
                port: v.port,
            },
        ),
        TargetConfig {
            geneve: Some(g), ..
        } => (
            g.remote,
            g.local,
            TunnelFormat::Geneve {
                vni: g.vni.0,
                port: g.port,
            },
        ),
        TargetConfig { gre: Some(g), .. } => (g.remote, g.local, TunnelFormat::Gre { key: g.key }),
        TargetConfig {
            erspan: Some(e), ..
        } => (
            e.remote,
            e.local,
            TunnelFormat::Erspan {
                session_id: e.session_id.0,
                version: e.version,
            },
        ),
        _ => return None,
    };
    let name = match format {
        TunnelFormat::Vxlan { .. } => "vxlan",
        TunnelFormat::Geneve { .. } => "geneve",
        TunnelFormat::Gre { .. } => "gre",
        TunnelFormat::Erspan { .. } => "erspan",
    };
    let problem = if remote.is_unspecified() || remote.is_multicast() || remote.is_loopback() {
        Some(format!(
            "{name} remote `{remote}` must be a unicast address of another host"
        ))
    } else if format.udp_port() == Some(0) {
        Some(format!("{name} port must not be 0"))
    } else if local.is_some_and(|l| l.is_ipv4() != remote.is_ipv4()) {
        Some(format!(
            "{name} `local` and `remote` are of different IP versions"
        ))
    } else if matches!(format, TunnelFormat::Erspan { version, .. } if version != 2 && version != 3)
    {
        Some("erspan `version` must be 2 (type II) or 3 (type III)".to_owned())
    } else {
        None
    };
    Some(match problem {
        Some(message) => Err(message),
        None => Ok(TunnelTarget {
            remote,
            local,
            format,
        }),
    })
}

/// A session's target, checked.
fn resolve_target(
    loaded: &LoadedConfig,
    session: &SessionConfig,
    interfaces: &[Interface],
) -> Result<Target, ConfigError> {
    let span = session.target.span();
    let target = session.target.get_ref();
    if target.file.is_none() && (target.rotate_bytes.is_some() || target.rotate_count.is_some()) {
        return Err(loaded.error(
            span,
            "`rotate_bytes` and `rotate_count` go with a `file` target",
        ));
    }
    if target.rotate_count.is_some() && target.rotate_bytes.is_none() {
        return Err(loaded.error(span, "`rotate_count` needs `rotate_bytes`"));
    }
    let tunnels = [
        target.vxlan.is_some(),
        target.geneve.is_some(),
        target.gre.is_some(),
        target.erspan.is_some(),
    ];
    if target.interface.is_none()
        && target.file.is_none()
        && tunnels.into_iter().filter(|given| *given).count() == 1
        && let Some(tunnel) = tunnel_target(target)
    {
        return tunnel
            .map(Target::Tunnel)
            .map_err(|message| loaded.error(span, message));
    }
    match target {
        TargetConfig {
            interface: Some(name),
            vxlan: None,
            geneve: None,
            gre: None,
            erspan: None,
            file: None,
            ..
        } => find(interfaces, name)
            .map(Target::Interface)
            .ok_or_else(|| loaded.error(span, format!("target interface `{name}` does not exist"))),
        TargetConfig {
            interface: None,
            vxlan: None,
            geneve: None,
            gre: None,
            erspan: None,
            file: Some(path),
            rotate_bytes,
            rotate_count,
        } => {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            if parent.is_some_and(|p| !p.is_dir()) {
                return Err(loaded.error(
                    span,
                    format!("the directory of `{}` does not exist", path.display()),
                ));
            }
            Ok(Target::File(FileTarget {
                path: path.clone(),
                rotate_bytes: *rotate_bytes,
                rotate_count: *rotate_count,
            }))
        }
        _ => Err(loaded.error(
            span,
            "a target needs exactly one of `interface`, `vxlan`, `geneve`, `gre`, `erspan` or `file`",
        )),
    }
}

/// The hooks a session's direction and hook stand for.
fn directions(
    loaded: &LoadedConfig,
    session: &SessionConfig,
) -> Result<&'static [Direction], ConfigError> {
    let direction = session.direction.as_ref().map(|d| *d.get_ref());
    match session.hook.as_ref().map(|h| *h.get_ref()) {
        None | Some(HookConfig::Tc) => Ok(match direction {
            Some(DirectionConfig::Ingress) => &[Direction::Ingress],
            Some(DirectionConfig::Egress) => &[Direction::Egress],
            None | Some(DirectionConfig::Both) => &[Direction::Ingress, Direction::Egress],
        }),
        Some(HookConfig::Xdp) => match &session.direction {
            Some(spanned) if *spanned.get_ref() != DirectionConfig::Ingress => Err(loaded.error(
                spanned.span(),
                "XDP sees received packets only: with hook = \"xdp\", direction must be \"ingress\" (or left out)",
            )),
            _ => Ok(&[Direction::XdpIngress]),
        },
    }
}

/// The session's target and the (interface, direction) pairs it watches.
fn resolve_session(
    loaded: &LoadedConfig,
    session: &SessionConfig,
    interfaces: &[Interface],
    pods: &dyn Fn(&PodSelector) -> Vec<Interface>,
    warnings: &mut Vec<String>,
) -> Result<Session, ConfigError> {
    let target = resolve_target(loaded, session, interfaces)?;
    let target_ifindex = match &target {
        Target::Interface(i) => Some(i.ifindex),
        Target::Tunnel(_) | Target::File(_) => None,
    };
    let patterns = match (&session.interfaces, &session.pods) {
        (Some(_), Some(pods)) => {
            return Err(loaded.error(
                pods.span(),
                "a session watches either `interfaces` or `pods`, not both",
            ));
        }
        (None, None) => {
            return Err(loaded.error(
                session.name.span(),
                "the session watches nothing: give `interfaces` or `pods`",
            ));
        }
        (None, Some(_)) => &[][..],
        (Some(interfaces), None) if interfaces.get_ref().is_empty() => {
            return Err(loaded.error(interfaces.span(), "no interfaces to watch"));
        }
        (Some(interfaces), None) => interfaces.get_ref().as_slice(),
    };
    let selector = session.pods.as_ref().map(|p| p.get_ref().clone());
    if let Some(problem) = selector
        .iter()
        .flat_map(|s| &s.expressions)
        .find_map(crate::config::LabelExpression::problem)
    {
        let span = session
            .pods
            .as_ref()
            .map_or(session.name.span(), toml::Spanned::span);
        return Err(loaded.error(span, problem));
    }
    let mut watched = BTreeSet::new();
    if let Some(selector) = &selector {
        watched.extend(
            pods(selector)
                .into_iter()
                .filter(|i| Some(i.ifindex) != target_ifindex)
                .map(|i| (i.ifindex, i.name)),
        );
    }
    for pattern in patterns {
        let matched = resolve(pattern.get_ref(), interfaces)
            .map_err(|message| loaded.error(pattern.span(), message))?;
        if matched.is_empty() {
            warnings.push(format!(
                "{}: `{}` matches no interface now",
                loaded.location(pattern.span()),
                pattern.get_ref()
            ));
        }
        if let Some(target) = matched.iter().find(|i| Some(i.ifindex) == target_ifindex) {
            return Err(loaded.error(
                pattern.span(),
                format!(
                    "`{}` includes the target `{}`: copies would be mirrored again (a loop)",
                    pattern.get_ref(),
                    target.name
                ),
            ));
        }
        watched.extend(matched.into_iter().map(|i| (i.ifindex, i.name)));
    }
    let directions = directions(loaded, session)?;
    let through_ring = directions == [Direction::XdpIngress] || matches!(target, Target::File(_));
    let attachments = watched
        .into_iter()
        .flat_map(|(ifindex, name)| {
            directions.iter().map(move |d| {
                (
                    Interface {
                        name: name.clone(),
                        ifindex,
                    },
                    *d,
                )
            })
        })
        .collect();
    Ok(Session {
        name: session.name.get_ref().clone(),
        target,
        controls: controls(loaded, session)?,
        attachments,
        globs: patterns
            .iter()
            .filter(|p| is_glob(p.get_ref()))
            .filter_map(|p| glob::Pattern::new(p.get_ref()).ok())
            .collect(),
        pods: selector,
        directions: directions.to_vec(),
        through_ring,
    })
}

/// Largest snaplen: a VXLAN or Ethernet frame is at most this long.
const MAX_SNAPLEN: u32 = 65_535;
/// Smallest snaplen: the kernel cuts a copy no shorter than its headers up to the transport
/// header (`bpf_skb_change_tail`), which is 54 bytes for IPv6 and up to 74 for IPv4 with options;
/// 96 leaves room for VLAN tags and short IPv6 extension headers. A packet whose headers are
/// longer still is not copied, and counted once as a clone error.
const MIN_SNAPLEN: u32 = 96;

/// A session's snaplen, sampling and rate limit, checked.
fn controls(loaded: &LoadedConfig, session: &SessionConfig) -> Result<Controls, ConfigError> {
    let mut controls = Controls {
        sample_every: 1,
        ..Controls::default()
    };
    if let Some(snaplen) = &session.snaplen {
        if !(MIN_SNAPLEN..=MAX_SNAPLEN).contains(snaplen.get_ref()) {
            return Err(loaded.error(
                snaplen.span(),
                format!("snaplen must be {MIN_SNAPLEN}..{MAX_SNAPLEN} bytes (the kernel cannot cut a copy inside its IP headers)"),
            ));
        }
        controls.snaplen = Some(*snaplen.get_ref());
    }
    if let Some(sample) = &session.sample {
        let config = sample.get_ref();
        if config.every == 0 {
            return Err(loaded.error(sample.span(), "sample.every must be at least 1"));
        }
        controls.sample_every = config.every;
        controls.sample_mode = match (config.every, config.by) {
            (1, _) => SAMPLE_ALL,
            (_, SampleBy::Packet) => SAMPLE_PACKETS,
            (_, SampleBy::Flow) => SAMPLE_FLOWS,
        };
        controls.sample_seed = config.seed.unwrap_or_else(random_seed);
    }
    if let Some(limit) = &session.rate_limit {
        controls.rate = rate_limit(loaded, limit)?;
    }
    controls.skip_unparsed = session.unparsed == Some(ActionConfig::Skip);
    Ok(controls)
}

/// A seed nobody can predict (the standard library's per-process hash keys).
fn random_seed() -> u32 {
    use std::hash::{BuildHasher as _, Hasher as _};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish() as u32
}

/// A rate limit in the kernel's terms (see `mirror_common::RateLimit`).
fn rate_limit(
    loaded: &LoadedConfig,
    limit: &toml::Spanned<RateLimitConfig>,
) -> Result<RateLimit, ConfigError> {
    const NS_PER_SECOND: u64 = 1_000_000_000;
    let config = limit.get_ref();
    let refuse = |message: &str| Err(loaded.error(limit.span(), message));
    if config.packets_per_second.is_none() && config.bytes_per_second.is_none() {
        return refuse("a rate limit needs packets_per_second, bytes_per_second or both");
    }
    let mut out = RateLimit::default();
    if let Some(pps) = config.packets_per_second {
        if pps == 0 || pps > NS_PER_SECOND {
            return refuse("packets_per_second must be 1..1000000000");
        }
        let burst = config.burst_packets.unwrap_or((pps / 10).max(1));
        if burst == 0 {
            return refuse("burst_packets must be at least 1");
        }
        out.packet_cost_ns = NS_PER_SECOND / pps;
        out.packet_burst_ns = burst.saturating_mul(out.packet_cost_ns);
    } else if config.burst_packets.is_some() {
        return refuse("burst_packets needs packets_per_second");
    }
    if let Some(bps) = config.bytes_per_second {
        if bps == 0 || bps > NS_PER_SECOND * 1024 {
            return refuse("bytes_per_second must be 1..1024000000000");
        }
        let burst = config.burst_bytes.unwrap_or((bps / 10).max(65_536));
        if burst < u64::from(MIN_SNAPLEN) {
            return refuse("burst_bytes must hold at least one frame header (14 bytes)");
        }
        out.byte_cost_ns_x1024 = NS_PER_SECOND * 1024 / bps;
        out.byte_burst_ns = burst.saturating_mul(out.byte_cost_ns_x1024) >> 10;
    } else if config.burst_bytes.is_some() {
        return refuse("burst_bytes needs bytes_per_second");
    }
    Ok(out)
}

/// Warnings about rules that earlier rules hide, within bounds: every rule is compared with the
/// earlier rules of its session until [`Shadows::PAIR_BUDGET`] comparisons are spent, and the
/// first [`Shadows::SHOWN`] warnings are kept, the rest counted.
#[derive(Debug, Default)]
struct Shadows {
    shown: Vec<String>,
    more: usize,
    pairs: usize,
    /// Rules not compared once the budget was spent.
    unchecked: usize,
}

impl Shadows {
    /// Comparisons for all sessions together: about 2,800 rules in one session compared pairwise,
    /// a few tens of milliseconds.
    const PAIR_BUDGET: usize = 4_000_000;
    const SHOWN: usize = 20;

    /// Compares `rule` with the `earlier` rules of its session.
    fn check(
        &mut self,
        loaded: &LoadedConfig,
        span: std::ops::Range<usize>,
        earlier: &[Rule],
        rule: &Rule,
        session: &str,
    ) {
        if self.pairs + earlier.len() > Self::PAIR_BUDGET {
            self.unchecked += 1;
            return;
        }
        self.pairs += earlier.len();
        for earlier in earlier {
            let Some(warning) = shadowing(earlier, rule, session) else {
                continue;
            };
            if self.shown.len() < Self::SHOWN {
                self.shown
                    .push(format!("{}: {warning}", loaded.location(span.clone())));
            } else {
                self.more += 1;
            }
        }
    }

    fn into_warnings(mut self) -> Vec<String> {
        if self.more > 0 {
            self.shown.push(format!(
                "{} more warning(s) about unreachable or partly hidden rules (the first {} are shown above)",
                self.more,
                Self::SHOWN
            ));
        }
        if self.unchecked > 0 {
            self.shown.push(format!(
                "{} rule(s) were not checked for rules that hide them (the check stops after {} comparisons)",
                self.unchecked,
                Self::PAIR_BUDGET
            ));
        }
        self.shown
    }
}

/// The session's rules in number order, then its default rule; warns about hidden rules.
fn session_rules(
    loaded: &LoadedConfig,
    index: usize,
    session: &SessionConfig,
    shadows: &mut Shadows,
) -> Result<Vec<Rule>, ConfigError> {
    let name = session.name.get_ref();
    let mut ordered: Vec<_> = session.rules.iter().collect();
    ordered.sort_by_key(|r| r.get_ref().number);
    for pair in ordered.windows(2) {
        if pair[0].get_ref().number == pair[1].get_ref().number {
            return Err(loaded.error(
                pair[1].span(),
                format!(
                    "rule number {} is used twice in session `{name}` (also at {})",
                    pair[1].get_ref().number,
                    loaded.location(pair[0].span())
                ),
            ));
        }
    }
    let mut rules: Vec<Rule> = Vec::with_capacity(ordered.len() + 1);
    for spanned_rule in ordered {
        let rule = validate_rule(index, spanned_rule.get_ref())
            .map_err(|message| loaded.error(spanned_rule.span(), message))?;
        shadows.check(loaded, spanned_rule.span(), &rules, &rule, name);
        rules.push(rule);
    }
    rules.push(Rule {
        session: index,
        action: session.default,
        ..Rule::default()
    });
    Ok(rules)
}

/// A target interface that a session watches would have copies mirrored again. (VXLAN targets
/// are covered by the tunnel guard rules instead.)
fn refuse_watched_targets(loaded: &LoadedConfig, sessions: &[Session]) -> Result<(), ConfigError> {
    for session in sessions {
        let Target::Interface(target) = &session.target else {
            continue;
        };
        for (index, other) in sessions.iter().enumerate() {
            if other
                .attachments
                .iter()
                .any(|(i, _)| i.ifindex == target.ifindex)
            {
                return Err(loaded.error(
                    loaded.config.sessions[index].get_ref().watch_span(),
                    format!(
                        "session `{}` watches `{}`, the target of session `{}`: copies would be mirrored again (a loop)",
                        other.name, target.name, session.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn find(interfaces: &[Interface], name: &str) -> Option<Interface> {
    interfaces.iter().find(|i| i.name == name).cloned()
}

fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// Interfaces a name or glob stands for; a plain name must exist.
fn resolve(pattern: &str, interfaces: &[Interface]) -> Result<Vec<Interface>, String> {
    if !is_glob(pattern) {
        return find(interfaces, pattern)
            .map(|i| vec![i])
            .ok_or_else(|| format!("interface `{pattern}` does not exist"));
    }
    let glob = glob::Pattern::new(pattern).map_err(|e| format!("bad glob `{pattern}`: {e}"))?;
    Ok(interfaces
        .iter()
        .filter(|i| glob.matches(&i.name))
        .cloned()
        .collect())
}

fn validate_rule(session: usize, rule: &crate::config::RuleConfig) -> Result<Rule, String> {
    let out = Rule {
        session,
        kind: RuleKind::Numbered(rule.number),
        action: rule.action,
        ethertype: rule.ethertype.map(|e| e.0),
        vlan: rule.vlan.map(|v| v.0),
        proto: rule.proto.map(|p| p.0),
        src: rule.src.map(|c| c.0),
        dst: rule.dst.map(|c| c.0),
        src_port: rule.src_port.as_ref().map(|p| p.0.clone()),
        dst_port: rule.dst_port.as_ref().map(|p| p.0.clone()),
    };
    let never = |why: &str| Err(format!("rule {} can never match: {why}", rule.number));
    let family = |net: &IpNet| match net {
        IpNet::V4(_) => 0x0800,
        IpNet::V6(_) => 0x86dd,
    };
    if let (Some(src), Some(dst)) = (&out.src, &out.dst)
        && family(src) != family(dst)
    {
        return never("`src` and `dst` are of different IP versions");
    }
    let ip_family = out.src.as_ref().or(out.dst.as_ref()).map(family);
    let needs_ip = ip_family.is_some()
        || out.proto.is_some()
        || out.src_port.is_some()
        || out.dst_port.is_some();
    if let Some(ethertype) = out.ethertype {
        if needs_ip && ethertype != 0x0800 && ethertype != 0x86dd {
            return never("IP fields are set but `ethertype` is not ipv4 or ipv6");
        }
        if ip_family.is_some_and(|f| f != ethertype) {
            return never("`ethertype` and the address family differ");
        }
    }
    if let Some(proto) = rule.proto
        && !proto.has_ports()
        && (out.src_port.is_some() || out.dst_port.is_some())
    {
        return never("ports are set but `proto` is not tcp, udp or sctp");
    }
    Ok(out)
}

/// A warning when `earlier` (same session, tried first) hides all or part of `later`.
fn shadowing(earlier: &Rule, later: &Rule, session: &str) -> Option<String> {
    let (RuleKind::Numbered(earlier_no), RuleKind::Numbered(later_no)) = (earlier.kind, later.kind)
    else {
        return None;
    };
    if covers(earlier, later) {
        Some(format!(
            "rule {later_no} of session `{session}` is unreachable: rule {earlier_no} matches every packet it matches"
        ))
    } else if earlier.action != later.action && overlaps(earlier, later) && !covers(later, earlier)
    {
        // A later rule that contains an earlier one with the other action is the usual
        // "exception first" pattern; only a partial overlap is likely a mistake.
        Some(format!(
            "rule {later_no} of session `{session}` partly overlaps rule {earlier_no}, which has the other action and is tried first"
        ))
    } else {
        None
    }
}

fn field_covers<T>(a: Option<&T>, b: Option<&T>, covers: impl Fn(&T, &T) -> bool) -> bool {
    match (a, b) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => covers(a, b),
    }
}

fn field_overlaps<T>(a: Option<&T>, b: Option<&T>, overlap: impl Fn(&T, &T) -> bool) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => overlap(a, b),
        _ => true,
    }
}

fn covers(a: &Rule, b: &Rule) -> bool {
    let net = |x: &IpNet, y: &IpNet| x.contains(y);
    let range = |x: &RangeInclusive<u16>, y: &RangeInclusive<u16>| {
        x.start() <= y.start() && y.end() <= x.end()
    };
    field_covers(a.ethertype.as_ref(), b.ethertype.as_ref(), PartialEq::eq)
        && field_covers(a.vlan.as_ref(), b.vlan.as_ref(), PartialEq::eq)
        && field_covers(a.proto.as_ref(), b.proto.as_ref(), PartialEq::eq)
        && field_covers(a.src.as_ref(), b.src.as_ref(), net)
        && field_covers(a.dst.as_ref(), b.dst.as_ref(), net)
        && field_covers(a.src_port.as_ref(), b.src_port.as_ref(), range)
        && field_covers(a.dst_port.as_ref(), b.dst_port.as_ref(), range)
}

fn overlaps(a: &Rule, b: &Rule) -> bool {
    let net = |x: &IpNet, y: &IpNet| x.contains(y) || y.contains(x);
    let range = |x: &RangeInclusive<u16>, y: &RangeInclusive<u16>| {
        x.start() <= y.end() && y.start() <= x.end()
    };
    field_overlaps(a.ethertype.as_ref(), b.ethertype.as_ref(), PartialEq::eq)
        && field_overlaps(a.vlan.as_ref(), b.vlan.as_ref(), PartialEq::eq)
        && field_overlaps(a.proto.as_ref(), b.proto.as_ref(), PartialEq::eq)
        && field_overlaps(a.src.as_ref(), b.src.as_ref(), net)
        && field_overlaps(a.dst.as_ref(), b.dst.as_ref(), net)
        && field_overlaps(a.src_port.as_ref(), b.src_port.as_ref(), range)
        && field_overlaps(a.dst_port.as_ref(), b.dst_port.as_ref(), range)
}

/// Per session, a text of everything that decides what it copies and where: its name, target,
/// controls, interfaces and rules. A reload keeps the counters of a session whose fingerprint
/// did not change.
pub fn fingerprints(plan: &Plan) -> Vec<String> {
    plan.sessions
        .iter()
        .enumerate()
        .map(|(index, s)| {
            let rules: Vec<Rule> = plan
                .rules
                .iter()
                .filter(|r| r.session == index)
                .map(|r| Rule {
                    session: 0,
                    ..r.clone()
                })
                .collect();
            let globs: Vec<&str> = s.globs.iter().map(glob::Pattern::as_str).collect();
            // Interfaces named, not those a glob or a pod selector found: they come and go.
            let named: Vec<&(Interface, Direction)> = s
                .attachments
                .iter()
                .filter(|(i, _)| s.pods.is_none() && !s.globs.iter().any(|g| g.matches(&i.name)))
                .collect();
            format!(
                "{:?}",
                (
                    &s.name,
                    &s.target,
                    &s.controls,
                    named,
                    globs,
                    &s.pods,
                    &s.directions,
                    rules
                )
            )
        })
        .collect()
}

/// The bitmap of every rule of `sessions`: what an interface these sessions watch is classified
/// against.
pub fn sessions_bitmap(rules: &[Rule], sessions: &[usize]) -> RuleBitmap {
    Bits::of(rules, |r| sessions.contains(&r.session)).to_abi()
}

/// A set of rules by global index.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn empty(rules: usize) -> Self {
        Bits(vec![0; rules.div_ceil(64)])
    }
    fn of(rules: &[Rule], keep: impl Fn(&Rule) -> bool) -> Self {
        let mut bits = Self::empty(rules.len());
        for (i, _) in rules.iter().enumerate().filter(|(_, r)| keep(r)) {
            bits.set(i);
        }
        bits
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
    fn or(&mut self, other: &Bits) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }
    fn to_abi(&self) -> RuleBitmap {
        let mut bitmap = RuleBitmap {
            summary: [0; SUMMARY_WORDS],
            words: [0; BITMAP_WORDS],
        };
        for (w, &word) in self.0.iter().enumerate() {
            bitmap.words[w] = word;
            if word != 0 {
                bitmap.summary[w / 64] |= 1 << (w % 64);
            }
        }
        bitmap
    }
}

/// Deduplicates bitmaps and hands out their indices.
#[derive(Default)]
struct Interner {
    index: HashMap<Bits, u32>,
    bitmaps: Vec<RuleBitmap>,
}

impl Interner {
    fn intern(&mut self, bits: &Bits) -> u32 {
        if let Some(&i) = self.index.get(bits) {
            return i;
        }
        let i = self.bitmaps.len() as u32;
        self.bitmaps.push(bits.to_abi());
        self.index.insert(bits.clone(), i);
        i
    }
}

fn compile(sessions: &[Session], rules: &[Rule]) -> Tables {
    let mut interner = Interner::default();
    let mut attachments = Vec::new();
    for (s, session) in sessions.iter().enumerate() {
        for (interface, direction) in &session.attachments {
            let key = AttachmentKey {
                ifindex: interface.ifindex,
                direction: *direction as u32,
            };
            attachments.push((key, s));
        }
    }
    let mut attachment_bits: HashMap<(u32, u32), Bits> = HashMap::new();
    for (key, s) in &attachments {
        let entry = attachment_bits
            .entry((key.ifindex, key.direction))
            .or_insert_with(|| Bits::empty(rules.len()));
        entry.or(&Bits::of(rules, |r| r.session == *s));
    }
    let mut attachment_entries: Vec<_> = attachment_bits
        .into_iter()
        .map(|((ifindex, direction), bits)| {
            (AttachmentKey { ifindex, direction }, interner.intern(&bits))
        })
        .collect();
    attachment_entries.sort_by_key(|(k, _)| (k.ifindex, k.direction));

    let (ethertype_wild, ethertype) = direct(&mut interner, rules, 65_536, |r| {
        r.ethertype.map(usize::from)
    });
    let (vlan_wild, vlan) = direct(&mut interner, rules, 4096, |r| r.vlan.map(usize::from));
    let (proto_wild, ip_proto) = direct(&mut interner, rules, 256, |r| r.proto.map(usize::from));
    let (src_wild, src_ip) = prefixes(&mut interner, rules, |r| r.src);
    let (dst_wild, dst_ip) = prefixes(&mut interner, rules, |r| r.dst);
    let (src_port_wild, src_port) = ports(&mut interner, rules, |r| r.src_port.clone());
    let (dst_port_wild, dst_port) = ports(&mut interner, rules, |r| r.dst_port.clone());
    // No session watches an attachment that has no entry, so its wildcard is the empty set.
    let attachment_wild = interner.intern(&Bits::empty(rules.len()));

    let mut wildcard = [0; FIELD_COUNT];
    for (field, index) in [
        (Field::Attachment, attachment_wild),
        (Field::Ethertype, ethertype_wild),
        (Field::VlanId, vlan_wild),
        (Field::IpProto, proto_wild),
        (Field::SrcIp, src_wild),
        (Field::DstIp, dst_wild),
        (Field::SrcPort, src_port_wild),
        (Field::DstPort, dst_port_wild),
    ] {
        wildcard[field as usize] = index;
    }
    let rule_meta = rules
        .iter()
        .map(|r| RuleMeta {
            session: r.session as u32,
            action: action_abi(r.action) as u32,
            next_session_rule: rules
                .iter()
                .position(|x| x.session > r.session)
                .unwrap_or(rules.len()) as u32,
            reserved: 0,
        })
        .collect();
    Tables {
        bitmaps: interner.bitmaps,
        wildcard,
        attachments: attachment_entries,
        ethertype,
        vlan,
        ip_proto,
        src_ip,
        dst_ip,
        src_port,
        dst_port,
        rules: rule_meta,
    }
}

/// A direct array over every value of a field that rules match exactly (ethertype, VLAN id, IP
/// protocol): each value's entry is the bitmap of the rules naming it plus those that do not
/// constrain the field. No table at all (and [`UNCONSTRAINED`]) when no rule constrains it.
fn direct(
    interner: &mut Interner,
    rules: &[Rule],
    values: usize,
    get: impl Fn(&Rule) -> Option<usize>,
) -> (u32, Vec<u32>) {
    let named: BTreeSet<usize> = rules.iter().filter_map(&get).collect();
    if named.is_empty() {
        return (UNCONSTRAINED, Vec::new());
    }
    let wildcard = interner.intern(&Bits::of(rules, |r| get(r).is_none()));
    let mut table = vec![wildcard; values];
    for value in named {
        table[value] = interner.intern(&Bits::of(rules, |r| get(r).is_none_or(|v| v == value)));
    }
    (wildcard, table)
}

/// LPM entries: each prefix a rule names maps to the rules whose prefix contains it (its ancestors
/// and itself) plus the rules that do not constrain the field.
fn prefixes(
    interner: &mut Interner,
    rules: &[Rule],
    get: impl Fn(&Rule) -> Option<IpNet>,
) -> (u32, Vec<(IpNet, u32)>) {
    if rules.iter().all(|r| get(r).is_none()) {
        return (UNCONSTRAINED, Vec::new());
    }
    let wildcard = Bits::of(rules, |r| get(r).is_none());
    let mut by_prefix: HashMap<IpNet, Vec<usize>> = HashMap::new();
    for (i, r) in rules.iter().enumerate() {
        if let Some(net) = get(r) {
            by_prefix.entry(net).or_default().push(i);
        }
    }
    let mut nets: Vec<IpNet> = by_prefix.keys().copied().collect();
    nets.sort();
    let entries = nets
        .into_iter()
        .map(|net| {
            let mut bits = wildcard.clone();
            for len in 0..=net.prefix_len() {
                let ancestor = IpNet::new(net.addr(), len).map(|n| n.trunc());
                if let Some(members) = ancestor.ok().and_then(|a| by_prefix.get(&a)) {
                    for &m in members {
                        bits.set(m);
                    }
                }
            }
            (net, interner.intern(&bits))
        })
        .collect();
    (interner.intern(&wildcard), entries)
}

/// A direct array over all 65,536 ports, built by sweeping the range boundaries.
fn ports(
    interner: &mut Interner,
    rules: &[Rule],
    get: impl Fn(&Rule) -> Option<RangeInclusive<u16>>,
) -> (u32, Vec<u32>) {
    if rules.iter().all(|r| get(r).is_none()) {
        return (UNCONSTRAINED, Vec::new());
    }
    let wildcard = Bits::of(rules, |r| get(r).is_none());
    // (port, rule, starts): a range [a, b] starts at a and ends after b.
    let mut events: Vec<(u32, usize, bool)> = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        if let Some(range) = get(r) {
            events.push((u32::from(*range.start()), i, true));
            events.push((u32::from(*range.end()) + 1, i, false));
        }
    }
    events.sort_unstable();
    let mut table = vec![0; 65_536];
    let mut current = wildcard.clone();
    let mut next_event = 0;
    let mut port = 0u32;
    while port < 65_536 {
        while next_event < events.len() && events[next_event].0 == port {
            let (_, rule, starts) = events[next_event];
            if starts {
                current.set(rule);
            } else {
                current.clear(rule);
            }
            next_event += 1;
        }
        let until = events.get(next_event).map_or(65_536, |e| e.0.min(65_536));
        let index = interner.intern(&current);
        table[port as usize..until as usize].fill(index);
        port = until;
    }
    (interner.intern(&wildcard), table)
}

/// The rules `packet` matches, in global order: a userspace model of the kernel's classifier,
/// used to check the compiled tables against the rule semantics.
#[cfg(test)]
pub(crate) fn decide(plan: &Plan, packet: &Packet) -> Vec<(usize, usize)> {
    let mut decided = Vec::new();
    for (i, rule) in plan.rules.iter().enumerate() {
        if decided.iter().any(|(s, _)| *s == rule.session) {
            continue;
        }
        let watched = plan.sessions[rule.session]
            .attachments
            .iter()
            .any(|(iface, d)| iface.ifindex == packet.ifindex && *d == packet.direction);
        if watched && rule_matches(rule, packet) {
            decided.push((rule.session, i));
        }
    }
    decided
}

#[cfg(test)]
fn rule_matches(rule: &Rule, p: &Packet) -> bool {
    fn ok<W, H>(want: Option<W>, have: Option<H>, f: impl Fn(&W, &H) -> bool) -> bool {
        match (want, have) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(w), Some(h)) => f(&w, &h),
        }
    }
    ok(rule.ethertype, p.ethertype, |a, b| a == b)
        && ok(rule.vlan, p.vlan, |a, b| a == b)
        && ok(rule.proto, p.proto, |a, b| a == b)
        && ok(rule.src, p.src, |n, a| n.contains(a))
        && ok(rule.dst, p.dst, |n, a| n.contains(a))
        && ok(
            rule.src_port.clone(),
            p.src_port,
            std::ops::RangeInclusive::contains,
        )
        && ok(
            rule.dst_port.clone(),
            p.dst_port,
            std::ops::RangeInclusive::contains,
        )
}

/// Packet fields for the userspace model.
#[cfg(test)]
#[derive(Debug, Clone)]
pub(crate) struct Packet {
    pub ifindex: u32,
    pub direction: Direction,
    pub ethertype: Option<u16>,
    pub vlan: Option<u16>,
    pub proto: Option<u8>,
    pub src: Option<std::net::IpAddr>,
    pub dst: Option<std::net::IpAddr>,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
}

#[cfg(test)]
mod tests {
    use std::{fmt::Write as _, net::IpAddr};

    use proptest::prelude::Strategy;

    use super::*;

    /// A plan with no pods selected.
    fn plan(loaded: &LoadedConfig, interfaces: &[Interface]) -> Result<Plan, ConfigError> {
        super::plan(loaded, interfaces, &|_| Vec::new())
    }

    fn iface(name: &str, ifindex: u32) -> Interface {
        Interface {
            name: name.into(),
            ifindex,
        }
    }

    fn interfaces() -> Vec<Interface> {
        vec![
            iface("eth0", 2),
            iface("eth1", 3),
            iface("veth1", 4),
            iface("veth2", 5),
            iface("mir0", 9),
        ]
    }

    fn load(text: &str) -> LoadedConfig {
        LoadedConfig::parse("t.toml".into(), text.into()).expect("parses")
    }

    /// What the kernel computes from the tables, step for step (lookups, AND, summary walk).
    fn simulate(tables: &Tables, rules: &[Rule], p: &Packet) -> Vec<(usize, usize)> {
        let key = (p.ifindex, p.direction as u32);
        let Some(&(_, attachment)) = tables
            .attachments
            .iter()
            .find(|(k, _)| (k.ifindex, k.direction) == key)
        else {
            return Vec::new();
        };
        let direct = |field: Field, table: &[u32], v: Option<u16>| {
            let wildcard = tables.wildcard[field as usize];
            match v {
                Some(v) if wildcard != UNCONSTRAINED => table[usize::from(v)],
                _ => wildcard,
            }
        };
        let lpm = |field: Field, entries: &[(IpNet, u32)], a: Option<IpAddr>| {
            let wildcard = tables.wildcard[field as usize];
            a.filter(|_| wildcard != UNCONSTRAINED)
                .and_then(|a| {
                    entries
                        .iter()
                        .filter(|(n, _)| n.contains(&a))
                        .max_by_key(|(n, _)| n.prefix_len())
                })
                .map_or(wildcard, |e| e.1)
        };
        let indices: Vec<u32> = [
            attachment,
            direct(Field::Ethertype, &tables.ethertype, p.ethertype),
            direct(Field::VlanId, &tables.vlan, p.vlan),
            direct(Field::IpProto, &tables.ip_proto, p.proto.map(u16::from)),
            lpm(Field::SrcIp, &tables.src_ip, p.src),
            lpm(Field::DstIp, &tables.dst_ip, p.dst),
            direct(Field::SrcPort, &tables.src_port, p.src_port),
            direct(Field::DstPort, &tables.dst_port, p.dst_port),
        ]
        .into_iter()
        .filter(|&i| i != UNCONSTRAINED)
        .collect();
        let mut summary = [!0u64; SUMMARY_WORDS];
        for &i in &indices {
            for (s, w) in summary.iter_mut().zip(tables.bitmaps[i as usize].summary) {
                *s &= w;
            }
        }
        let mut decided = Vec::new();
        let mut min_rule = 0;
        for w in 0..BITMAP_WORDS {
            if summary[w / 64] & (1 << (w % 64)) == 0 {
                continue;
            }
            let word = indices
                .iter()
                .fold(!0u64, |acc, &i| acc & tables.bitmaps[i as usize].words[w]);
            for bit in 0..64 {
                let rule = w * 64 + bit;
                if word & (1 << bit) != 0 && rule >= min_rule {
                    let meta = tables.rules[rule];
                    decided.push((meta.session as usize, rule));
                    min_rule = meta.next_session_rule as usize;
                }
            }
        }
        assert!(decided.iter().all(|(s, r)| rules[*r].session == *s));
        decided
    }

    /// Deterministic test randomness: `Rng::with_seed` gives the same sequence on every run.
    use fastrand::Rng;

    fn below(rng: &mut Rng, n: u64) -> u64 {
        rng.u64(..n)
    }

    /// `Some(f(rng))` in `percent` out of 100 cases.
    fn maybe<T>(rng: &mut Rng, percent: u64, f: impl FnOnce(&mut Rng) -> T) -> Option<T> {
        (below(rng, 100) < percent).then(|| f(rng))
    }

    fn random_v4(rng: &mut Rng) -> IpAddr {
        // A small space so that prefixes and packets meet often.
        IpAddr::from([
            10,
            below(rng, 4) as u8,
            below(rng, 4) as u8,
            below(rng, 8) as u8,
        ])
    }

    fn random_rule_text(rng: &mut Rng, number: u32) -> String {
        let mut text = format!(
            "[[session.rule]]\nnumber = {number}\naction = \"{}\"\n",
            if below(rng, 3) == 0 { "skip" } else { "mirror" }
        );
        if let Some(v) = maybe(rng, 20, |r| below(r, 3) + 100) {
            writeln!(text, "vlan = {v}").expect("writing to a String");
        }
        let proto = maybe(rng, 60, |r| [6u8, 17, 1][below(r, 3) as usize]);
        if let Some(p) = proto {
            writeln!(text, "proto = {p}").expect("writing to a String");
        }
        for field in ["src", "dst"] {
            if let Some(len) = maybe(rng, 50, |r| [8u8, 16, 24, 32][below(r, 4) as usize]) {
                let net = IpNet::new(random_v4(rng), len).expect("valid").trunc();
                writeln!(text, "{field} = \"{net}\"").expect("writing to a String");
            }
        }
        if proto.is_some_and(|p| p != 1) {
            for field in ["src_port", "dst_port"] {
                if let Some(lo) = maybe(rng, 50, |r| below(r, 40) as u16) {
                    let hi = lo + below(rng, 10) as u16;
                    writeln!(text, "{field} = \"{lo}-{hi}\"").expect("writing to a String");
                }
            }
        }
        text
    }

    #[test]
    fn compiled_tables_agree_with_first_match_semantics() {
        let mut rng = Rng::with_seed(7);
        for round in 0..30 {
            let mut text = String::new();
            for (s, ifaces) in ["[\"eth0\"]", "[\"eth0\", \"veth*\"]", "[\"eth1\"]"]
                .iter()
                .enumerate()
            {
                let direction = ["ingress", "egress", "both"][s];
                write!(
                    text,
                    "[[session]]\nname = \"s{s}\"\ninterfaces = {ifaces}\ndirection = \"{direction}\"\ntarget = {{ interface = \"mir0\" }}\ndefault = \"{}\"\n",
                    if round % 2 == 0 { "skip" } else { "mirror" }
                ).expect("writing to a String");
                for n in 0..(below(&mut rng, 40) as u32 + round * 3) {
                    text += &random_rule_text(&mut rng, n);
                }
            }
            let plan = plan(&load(&text), &interfaces()).expect("valid plan");
            for _ in 0..400 {
                let ipv4 = below(&mut rng, 10) != 0;
                let proto = maybe(&mut rng, 90, |r| [6u8, 17, 1, 132][below(r, 4) as usize]);
                let has_ports = ipv4 && proto.is_some_and(|p| p != 1);
                let packet = Packet {
                    ifindex: [2, 3, 4, 5][below(&mut rng, 4) as usize],
                    direction: if below(&mut rng, 2) == 0 {
                        Direction::Ingress
                    } else {
                        Direction::Egress
                    },
                    ethertype: Some(if ipv4 { 0x0800 } else { 0x0806 }),
                    vlan: maybe(&mut rng, 30, |r| below(r, 4) as u16 + 100),
                    proto: proto.filter(|_| ipv4),
                    src: ipv4.then(|| random_v4(&mut rng)),
                    dst: ipv4.then(|| random_v4(&mut rng)),
                    src_port: has_ports.then(|| below(&mut rng, 60) as u16),
                    dst_port: has_ports.then(|| below(&mut rng, 60) as u16),
                };
                assert_eq!(
                    simulate(&plan.tables, &plan.rules, &packet),
                    decide(&plan, &packet),
                    "round {round}, {packet:?}"
                );
            }
        }
    }

    #[test]
    fn fields_no_rule_constrains_get_no_table() {
        let text = format!(
            "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n\
             [[session.rule]]\nnumber = 1\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 53\n"
        );
        let tables = plan(&load(&text), &interfaces()).expect("valid").tables;
        for field in [
            Field::Ethertype,
            Field::VlanId,
            Field::SrcIp,
            Field::DstIp,
            Field::SrcPort,
        ] {
            assert_eq!(tables.wildcard[field as usize], UNCONSTRAINED, "{field:?}");
        }
        assert!(
            tables.ethertype.is_empty() && tables.vlan.is_empty() && tables.src_port.is_empty()
        );
        assert!(tables.src_ip.is_empty() && tables.dst_ip.is_empty());
        assert_eq!(
            (tables.ip_proto.len(), tables.dst_port.len()),
            (256, 65_536)
        );
        assert_ne!(tables.wildcard[Field::IpProto as usize], UNCONSTRAINED);
    }

    #[test]
    fn ten_thousand_rules_compile_with_shared_bitmaps() {
        let mut rng = Rng::with_seed(11);
        let mut text = "[[session]]\nname = \"big\"\ninterfaces = [\"eth0\"]\ntarget = { interface = \"mir0\" }\n".to_owned();
        for n in 0..10_000u32 {
            let net = IpNet::new(
                IpAddr::from(
                    rng.u64(..).to_be_bytes()[..4]
                        .try_into()
                        .map(|b: [u8; 4]| b)
                        .expect("4"),
                ),
                24 + below(&mut rng, 9) as u8,
            )
            .expect("valid")
            .trunc();
            write!(
                    text,
                "[[session.rule]]\nnumber = {n}\naction = \"mirror\"\nproto = \"udp\"\ndst = \"{net}\"\ndst_port = {}\n",
                below(&mut rng, 65_536)
            ).expect("writing to a String");
        }
        let plan = plan(&load(&text), &interfaces()).expect("valid plan");
        assert_eq!(plan.rules.len(), 10_001);
        assert!(
            plan.tables.bitmaps.len() < 40_000,
            "{}",
            plan.tables.bitmaps.len()
        );
    }

    #[test]
    fn a_pod_session_watches_the_interfaces_its_selector_is_given() {
        let text = format!(
            "{HEAD}pods = {{ namespace = \"shop\", labels = {{ app = \"web\" }} }}\ntarget = {{ interface = \"mir0\" }}\n"
        );
        let none = plan(&load(&text), &interfaces()).expect("valid without pods");
        assert!(none.sessions[0].attachments.is_empty());
        let pods = |selector: &PodSelector| {
            assert_eq!(selector.namespace.as_deref(), Some("shop"));
            // The target is never watched, even when a pod's route names it.
            vec![iface("veth1", 4), iface("mir0", 9)]
        };
        let plan = super::plan(&load(&text), &interfaces(), &pods).expect("valid");
        let hooks: Vec<(&str, Direction)> = plan.sessions[0]
            .attachments
            .iter()
            .map(|(i, d)| (i.name.as_str(), *d))
            .collect();
        assert_eq!(
            hooks,
            [("veth1", Direction::Ingress), ("veth1", Direction::Egress)]
        );
        // The pods found are not part of what the session is: its counters go on across them.
        assert_eq!(fingerprints(&none), fingerprints(&plan));
    }

    fn plan_error(text: &str) -> String {
        plan(&load(text), &interfaces())
            .expect_err("invalid")
            .to_string()
    }

    const HEAD: &str = "[[session]]\nname = \"a\"\n";

    #[test]
    fn refuses_loops_unknown_interfaces_and_contradictions() {
        let cases = [
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\", \"mir0\"]\ntarget = {{ interface = \"mir0\" }}\n"
                ),
                "t.toml:3:",
                "includes the target `mir0`",
            ),
            (
                format!("{HEAD}interfaces = [\"*\"]\ntarget = {{ interface = \"mir0\" }}\n"),
                "t.toml:3:",
                "a loop",
            ),
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"veth1\" }}\n[[session]]\nname = \"b\"\ninterfaces = [\"veth*\"]\ntarget = {{ interface = \"mir0\" }}\n"
                ),
                "t.toml:7:",
                "the target of session `a`",
            ),
            (
                format!("{HEAD}interfaces = [\"nope0\"]\ntarget = {{ interface = \"mir0\" }}\n"),
                "t.toml:3:",
                "interface `nope0` does not exist",
            ),
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\npods = {{ labels = {{ app = \"web\" }} }}\ntarget = {{ interface = \"mir0\" }}\n"
                ),
                "t.toml:4:",
                "either `interfaces` or `pods`, not both",
            ),
            (
                format!("{HEAD}target = {{ interface = \"mir0\" }}\n"),
                "t.toml:2:",
                "the session watches nothing",
            ),
            (
                format!(
                    "{HEAD}pods = {{ expressions = [{{ key = \"tier\", operator = \"In\" }}] }}\ntarget = {{ interface = \"mir0\" }}\n"
                ),
                "t.toml:3:",
                "`In` on label `tier` needs at least one value",
            ),
            (
                format!(
                    "{HEAD}pods = {{ expressions = [{{ key = \"tier\", operator = \"Exists\", values = [\"x\"] }}] }}\ntarget = {{ interface = \"mir0\" }}\n"
                ),
                "t.toml:3:",
                "`Exists` on label `tier` takes no values",
            ),
            (
                format!("{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"nope1\" }}\n"),
                "t.toml:4:",
                "target interface `nope1` does not exist",
            ),
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n{HEAD}interfaces = [\"eth1\"]\ntarget = {{ interface = \"mir0\" }}\n"
                ),
                "t.toml:6:",
                "session name `a` is already used at t.toml:2:",
            ),
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n[[session.rule]]\nnumber = 5\naction = \"mirror\"\n[[session.rule]]\nnumber = 5\naction = \"skip\"\n"
                ),
                "t.toml:8:",
                "rule number 5 is used twice",
            ),
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n[[session.rule]]\nnumber = 1\naction = \"mirror\"\nsrc = \"10.0.0.0/8\"\ndst = \"fd00::/8\"\n"
                ),
                "t.toml:5:",
                "different IP versions",
            ),
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n[[session.rule]]\nnumber = 1\naction = \"mirror\"\nethertype = \"arp\"\nproto = \"udp\"\n"
                ),
                "t.toml:5:",
                "not ipv4 or ipv6",
            ),
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n[[session.rule]]\nnumber = 1\naction = \"mirror\"\nproto = \"icmp\"\ndst_port = 80\n"
                ),
                "t.toml:5:",
                "ports are set",
            ),
            (
                "stats_interval_secs = 5\n".to_owned(),
                "t.toml",
                "no [[session]]",
            ),
        ];
        assert_refused(&cases);
    }

    #[test]
    fn refuses_contradictory_xdp_and_file_settings() {
        let cases = [
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\nhook = \"xdp\"\ndirection = \"egress\"\ntarget = {{ interface = \"mir0\" }}\n"
                ),
                "t.toml:5:",
                "XDP sees received packets only",
            ),
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\", rotate_bytes = 1000 }}\n"
                ),
                "t.toml:4:",
                "go with a `file` target",
            ),
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ file = \"/nonexistent-dir/x.pcap\" }}\n"
                ),
                "t.toml:4:",
                "does not exist",
            ),
            (
                format!(
                    "copy_ring_bytes = 5000\n{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n"
                ),
                "t.toml:1:",
                "power of two",
            ),
        ];
        assert_refused(&cases);
        let xdp = plan(
            &load(&format!(
                "{HEAD}interfaces = [\"eth0\"]\nhook = \"xdp\"\ntarget = {{ file = \"/tmp/x.pcapng\" }}\n"
            )),
            &interfaces(),
        )
        .expect("valid");
        assert_eq!(xdp.sessions[0].directions, [Direction::XdpIngress]);
        assert!(xdp.sessions[0].through_ring);
        assert_eq!(xdp.copy_ring_bytes, DEFAULT_COPY_RING_BYTES);
    }

    #[test]
    fn refuses_bad_vxlan_targets() {
        let cases = [
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\", vxlan = {{ remote = \"192.0.2.9\", vni = 1 }} }}\n"
                ),
                "t.toml:4:",
                "exactly one of `interface`, `vxlan`, `geneve`, `gre`, `erspan` or `file`",
            ),
            (
                format!("{HEAD}interfaces = [\"eth0\"]\ntarget = {{}}\n"),
                "t.toml:4:",
                "exactly one of `interface`, `vxlan`, `geneve`, `gre`, `erspan` or `file`",
            ),
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ vxlan = {{ remote = \"239.1.1.1\", vni = 1 }} }}\n"
                ),
                "t.toml:4:",
                "must be a unicast address",
            ),
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ vxlan = {{ remote = \"192.0.2.9\", vni = 1, local = \"fd00::1\" }} }}\n"
                ),
                "t.toml:4:",
                "different IP versions",
            ),
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ vxlan = {{ remote = \"192.0.2.9\", vni = 1, port = 0 }} }}\n"
                ),
                "t.toml:4:",
                "port must not be 0",
            ),
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ gre = {{ remote = \"192.0.2.9\" }}, erspan = {{ remote = \"192.0.2.9\", session_id = 1 }} }}\n"
                ),
                "t.toml:4:",
                "exactly one of",
            ),
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ erspan = {{ remote = \"192.0.2.9\", session_id = 1, version = 1 }} }}\n"
                ),
                "t.toml:4:",
                "must be 2 (type II) or 3 (type III)",
            ),
            (
                format!(
                    "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ geneve = {{ remote = \"127.0.0.1\", vni = 1 }} }}\n"
                ),
                "t.toml:4:",
                "geneve remote `127.0.0.1` must be a unicast address of another host",
            ),
        ];
        assert_refused(&cases);
    }

    #[test]
    fn refuses_out_of_range_tunnel_ids_where_they_are_written() {
        for (target, message) in [
            (
                "erspan = { remote = \"192.0.2.9\", session_id = 1024 }",
                "`1024` is not an ERSPAN session id (0..1023)",
            ),
            ("gre = { remote = \"192.0.2.9\", key = -1 }", "u32"),
        ] {
            let text = format!("{HEAD}interfaces = [\"eth0\"]\ntarget = {{ {target} }}\n");
            let error = LoadedConfig::parse("t.toml".into(), text)
                .expect_err("refused")
                .to_string();
            assert!(
                error.starts_with("t.toml:4:") && error.contains(message),
                "{error}"
            );
        }
    }

    #[test]
    fn refuses_bad_controls() {
        let session = |controls: &str| {
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n{controls}\n"
            )
        };
        let cases = [
            (
                session("snaplen = 95"),
                "t.toml:5:",
                "snaplen must be 96..65535",
            ),
            (session("snaplen = 70000"), "t.toml:5:", "snaplen must be"),
            (
                session("sample = { every = 0 }"),
                "t.toml:5:",
                "sample.every must be at least 1",
            ),
            (
                session("rate_limit = { burst_packets = 5 }"),
                "t.toml:5:",
                "needs packets_per_second, bytes_per_second or both",
            ),
            (
                session("rate_limit = { bytes_per_second = 1000, burst_packets = 5 }"),
                "t.toml:5:",
                "burst_packets needs packets_per_second",
            ),
            (
                session("rate_limit = { packets_per_second = 0 }"),
                "t.toml:5:",
                "packets_per_second must be",
            ),
            (
                format!(
                    "node_rate_limit = {{ bytes_per_second = 100, burst_bytes = 10 }}\n{}",
                    session("")
                ),
                "t.toml:1:",
                "burst_bytes must hold",
            ),
        ];
        assert_refused(&cases);
    }

    #[test]
    fn controls_in_kernel_terms() {
        let plan = plan(
            &load(&format!(
                "node_rate_limit = {{ packets_per_second = 50 }}\n{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n\
                 snaplen = 128\nsample = {{ every = 8, by = \"flow\", seed = 7 }}\n\
                 rate_limit = {{ packets_per_second = 1000, bytes_per_second = 1000000, burst_bytes = 3000 }}\n"
            )),
            &interfaces(),
        )
        .expect("valid");
        let controls = &plan.sessions[0].controls;
        assert_eq!(controls.snaplen, Some(128));
        assert_eq!(
            (
                controls.sample_mode,
                controls.sample_every,
                controls.sample_seed
            ),
            (SAMPLE_FLOWS, 8, 7)
        );
        assert_eq!(
            controls.rate,
            RateLimit {
                packet_cost_ns: 1_000_000,
                // Default burst: a tenth of a second's worth.
                packet_burst_ns: 100 * 1_000_000,
                byte_cost_ns_x1024: 1_024_000,
                byte_burst_ns: 3000 * 1000,
            }
        );
        assert_eq!(plan.node_rate.packet_cost_ns, 20_000_000);
        assert_eq!(plan.node_rate.packet_burst_ns, 5 * 20_000_000);
    }

    /// Each (configuration, expected place, expected message) is refused as expected.
    fn assert_refused(cases: &[(String, &str, &str)]) {
        for (text, at, message) in cases {
            let error = plan_error(text);
            assert!(
                error.starts_with(at) && error.contains(message),
                "{error}\n--- for:\n{text}"
            );
        }
    }

    #[test]
    fn vxlan_targets_put_a_tunnel_guard_first_in_every_session() {
        let plan = plan(
            &load(&format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ vxlan = {{ remote = \"fd00::9\", vni = 3, port = 8472 }} }}\ndefault = \"mirror\"\n\
                 [[session]]\nname = \"b\"\ninterfaces = [\"eth1\"]\ntarget = {{ interface = \"mir0\" }}\n"
            )),
            &interfaces(),
        )
        .expect("valid");
        let kinds: Vec<(usize, RuleKind)> =
            plan.rules.iter().map(|r| (r.session, r.kind)).collect();
        assert_eq!(
            kinds,
            [
                (0, RuleKind::TunnelGuard),
                (0, RuleKind::Default),
                (1, RuleKind::TunnelGuard),
                (1, RuleKind::Default)
            ]
        );
        let guard = &plan.rules[0];
        assert_eq!(guard.action, ActionConfig::Skip);
        assert_eq!(guard.proto, Some(17));
        assert_eq!(guard.dst, Some("fd00::9/128".parse().expect("net")));
        assert_eq!(guard.dst_port, Some(8472..=8472));
        // The outer packet of a copy is skipped; an ordinary packet reaches the default rule.
        let outer = Packet {
            ifindex: 2,
            direction: Direction::Ingress,
            ethertype: Some(0x86dd),
            vlan: None,
            proto: Some(17),
            src: Some("fd00::1".parse().expect("ip")),
            dst: Some("fd00::9".parse().expect("ip")),
            src_port: Some(40_000),
            dst_port: Some(8472),
        };
        assert_eq!(decide(&plan, &outer), [(0, 0)]);
        let other = Packet {
            dst_port: Some(8473),
            ..outer
        };
        assert_eq!(decide(&plan, &other), [(0, 1)]);
    }

    #[test]
    fn gre_family_targets_guard_every_gre_packet_to_the_collector() {
        let plan = plan(
            &load(&format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ erspan = {{ remote = \"192.0.2.9\", session_id = 3, version = 3 }} }}\ndefault = \"mirror\"\n"
            )),
            &interfaces(),
        )
        .expect("valid");
        let guard = &plan.rules[0];
        assert_eq!(guard.kind, RuleKind::TunnelGuard);
        assert_eq!(guard.proto, Some(47));
        assert_eq!(guard.dst, Some("192.0.2.9/32".parse().expect("net")));
        assert_eq!(guard.dst_port, None);
        assert_eq!(
            plan.sessions[0].target.to_string(),
            "erspan 192.0.2.9 type 3 session 3"
        );
    }

    #[test]
    fn warns_about_unreachable_and_overlapping_rules() {
        let text = format!(
            "{HEAD}interfaces = [\"eth0\", \"lxc*\"]\ntarget = {{ interface = \"mir0\" }}\n\
             [[session.rule]]\nnumber = 1\naction = \"mirror\"\nproto = \"tcp\"\n\
             [[session.rule]]\nnumber = 2\naction = \"skip\"\nproto = \"tcp\"\ndst_port = 22\n\
             [[session.rule]]\nnumber = 3\naction = \"skip\"\ndst = \"10.0.0.0/8\"\n"
        );
        let plan = plan(&load(&text), &interfaces()).expect("valid");
        assert_eq!(plan.warnings.len(), 3, "{:#?}", plan.warnings);
        assert!(plan.warnings[0].contains("`lxc*` matches no interface now"));
        assert!(
            plan.warnings[1].starts_with("t.toml:9:")
                && plan.warnings[1].contains("rule 2 of session `a` is unreachable: rule 1")
        );
        assert!(
            plan.warnings[2].starts_with("t.toml:14:")
                && plan.warnings[2].contains("rule 3 of session `a` partly overlaps rule 1")
        );
    }

    fn numbered_rules(count: usize, rule: &str) -> String {
        let mut text =
            format!("{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n");
        for number in 1..=count {
            write!(text, "[[session.rule]]\nnumber = {number}\n{rule}").expect("to a String");
        }
        text
    }

    #[test]
    fn hidden_rule_warnings_are_capped_and_summarised() {
        let text = numbered_rules(1000, "action = \"mirror\"\nproto = \"tcp\"\n");
        let plan = plan(&load(&text), &interfaces()).expect("valid");
        // Each of the 999 later rules is hidden by every earlier one: 499,500 pairs.
        assert_eq!(
            plan.warnings.len(),
            Shadows::SHOWN + 1,
            "{:#?}",
            plan.warnings
        );
        assert_eq!(
            plan.warnings[Shadows::SHOWN],
            format!(
                "{} more warning(s) about unreachable or partly hidden rules (the first {} are shown above)",
                499_500 - Shadows::SHOWN,
                Shadows::SHOWN
            )
        );
    }

    #[test]
    fn hidden_rule_checks_stop_at_their_budget() {
        // Distinct rules: nothing hidden, but every pair compared until the budget is spent.
        let mut text =
            format!("{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n");
        let count = 3000;
        for number in 1..=count {
            write!(text, "[[session.rule]]\nnumber = {number}\naction = \"mirror\"\nproto = \"udp\"\ndst_port = {number}\n")
                .expect("to a String");
        }
        let plan = plan(&load(&text), &interfaces()).expect("valid");
        // Rule n is compared with n - 1 earlier ones: the budget lasts while n(n-1)/2 fits.
        let checked = (1..=count)
            .take_while(|n| n * (n - 1) / 2 <= Shadows::PAIR_BUDGET)
            .count();
        assert_eq!(
            plan.warnings,
            [format!(
                "{} rule(s) were not checked for rules that hide them (the check stops after {} comparisons)",
                count - checked,
                Shadows::PAIR_BUDGET
            )]
        );
    }

    #[test]
    fn the_rule_count_is_checked_before_any_rule() {
        // Too many rules, the last of them invalid: the count is what is reported.
        let mut text = numbered_rules(MAX_RULES as usize, "action = \"mirror\"\n");
        text.push_str("[[session.rule]]\nnumber = 0\naction = \"mirror\"\nsrc_port = 1\n");
        let error = plan(&load(&text), &interfaces())
            .expect_err("too many")
            .to_string();
        assert!(
            error.contains(&format!("{} rules", MAX_RULES + 2))
                && error.contains(&format!("exceed the limit of {MAX_RULES}")),
            "{error}"
        );
    }

    /// Values for the keys of a session, a rule and the top level: the random files have one
    /// value of each required key and maybe one of each other, and now and then a bad value, so
    /// that most of them reach validation and some are refused there.
    const SESSION_REQUIRED: &[&[&str]] = &[
        &["name = \"a\"", "name = \"b\"", "name = \"c\""],
        &[
            "interfaces = [\"eth0\"]",
            "interfaces = [\"veth*\", \"eth1\"]",
            "interfaces = [\"eth1\"]",
            "pods = { labels = { app = \"web\" } }",
        ],
        &[
            "target = { interface = \"mir0\" }",
            "target = { vxlan = { remote = \"192.0.2.9\", vni = 7 } }",
            "target = { erspan = { remote = \"fd00::9\", session_id = 20, version = 3 } }",
            "target = { gre = { remote = \"192.0.2.9\", key = 5 } }",
            "target = { geneve = { remote = \"fd00::9\", vni = 1 } }",
            "target = { file = \"/tmp/x.pcapng\", rotate_bytes = 1000000 }",
        ],
    ];
    const SESSION_OPTIONAL: &[&[&str]] = &[
        &[
            "direction = \"both\"",
            "direction = \"egress\"",
            "direction = \"ingress\"",
        ],
        &["hook = \"xdp\"", "hook = \"tc\""],
        &["default = \"mirror\"", "default = \"skip\""],
        &["snaplen = 96", "snaplen = 1500", "snaplen = 65535"],
        &["unparsed = \"skip\"", "unparsed = \"mirror\""],
        &[
            "sample = { every = 3, by = \"flow\", seed = 1 }",
            "sample = { every = 1 }",
        ],
        &[
            "rate_limit = { packets_per_second = 1000 }",
            "rate_limit = { bytes_per_second = 1 }",
        ],
    ];
    const SESSION_BAD: &[&str] = &[
        "interfaces = [\"mir0\"]",
        "interfaces = []",
        "interfaces = [\"[\"]",
        "target = { interface = \"eth0\" }",
        "target = { vxlan = { remote = \"127.0.0.1\", vni = 16777216 } }",
        "target = { gre = { remote = \"192.0.2.9\", local = \"fd00::1\" } }",
        "target = { interface = \"mir0\", file = \"x.pcap\" }",
        "direction = \"sideways\"",
        "snaplen = 95",
        "sample = { every = 0 }",
        "rate_limit = {}",
        "rate_limit = { packets_per_second = 18446744073709551615 }",
        "pods = { namespace = \"\" }",
    ];
    const RULE_REQUIRED: &[&[&str]] = &[
        &[
            "number = 1",
            "number = 2",
            "number = 3",
            "number = 4294967295",
        ],
        &["action = \"mirror\"", "action = \"skip\""],
    ];
    const RULE_OPTIONAL: &[&[&str]] = &[
        &[
            "proto = \"tcp\"",
            "proto = \"icmp\"",
            "proto = 17",
            "proto = \"udp\"",
        ],
        &[
            "ethertype = \"arp\"",
            "ethertype = \"ipv6\"",
            "ethertype = \"ipv4\"",
        ],
        &["vlan = 7", "vlan = 0", "vlan = 4095"],
        &[
            "src = \"10.0.0.0/8\"",
            "src = \"10.1.0.0/16\"",
            "src = \"fd00::1\"",
        ],
        &[
            "dst = \"fd00::/16\"",
            "dst = \"192.0.2.0/24\"",
            "dst = \"192.0.2.7\"",
        ],
        &[
            "src_port = \"1-1024\"",
            "src_port = \"1-65535\"",
            "src_port = 0",
        ],
        &["dst_port = 65535", "dst_port = 22", "dst_port = \"80\""],
    ];
    const RULE_BAD: &[&str] = &[
        "colour = \"red\"",
        "proto = 300",
        "vlan = 4096",
        "dst = \"fd00::/200\"",
        "src = \"10.0.0.1/8\"",
        "src_port = \"9-1\"",
        "dst_port = 65536",
        "ethertype = 70000",
    ];
    const TOP_OPTIONAL: &[&[&str]] = &[
        &["copy_ring_bytes = 3", "copy_ring_bytes = 8192"],
        &["node_rate_limit = { bytes_per_second = 1 }"],
        &["metrics_address = \"[::1]:9464\""],
        &["stats_interval_secs = 0"],
    ];

    /// A table's lines: a value of each required key, maybe one of each optional key, and
    /// rarely one bad line.
    fn table(
        required: &'static [&'static [&'static str]],
        optional: &'static [&'static [&'static str]],
        bad: &'static [&'static str],
    ) -> impl Strategy<Value = String> {
        let required = required
            .iter()
            .map(|values| proptest::sample::select(*values))
            .collect::<Vec<_>>();
        let optional = optional
            .iter()
            .map(|values| proptest::option::of(proptest::sample::select(*values)))
            .collect::<Vec<_>>();
        let bad = proptest::option::weighted(0.1, proptest::sample::select(bad));
        (required, optional, bad).prop_map(|(required, optional, bad)| {
            let mut lines = String::new();
            for line in required
                .into_iter()
                .chain(optional.into_iter().flatten())
                .chain(bad)
            {
                lines.push_str(line);
                lines.push('\n');
            }
            lines
        })
    }

    /// A file: top-level keys, then one to three sessions of up to four rules.
    fn config_file() -> impl Strategy<Value = String> {
        let rule = table(RULE_REQUIRED, RULE_OPTIONAL, RULE_BAD)
            .prop_map(|keys| format!("[[session.rule]]\n{keys}"));
        let session = (
            table(SESSION_REQUIRED, SESSION_OPTIONAL, SESSION_BAD),
            proptest::collection::vec(rule, 0..5),
        )
            .prop_map(|(keys, rules)| format!("[[session]]\n{keys}{}", rules.concat()));
        (
            table(&[], TOP_OPTIONAL, &["api_socket = 3"]),
            proptest::collection::vec(session, 1..4),
        )
            .prop_map(|(top, sessions)| format!("{top}{}", sessions.concat()))
    }

    proptest::proptest! {
        /// Any file made of these keys and values is planned or refused with its name and, where
        /// the error has one, a line: never a panic.
        #[test]
        fn any_file_is_planned_or_refused_with_a_place(text in config_file()) {
            let outcome = LoadedConfig::parse("t.toml".into(), text)
                .and_then(|loaded| plan(&loaded, &interfaces()));
            if let Err(e) = outcome {
                proptest::prop_assert!(e.to_string().starts_with("t.toml"), "{e}");
            }
        }
    }
}
