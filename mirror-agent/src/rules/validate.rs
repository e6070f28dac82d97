//! From a configuration to a plan: every check, with the place in the file.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;
use mirror_common::{
    Direction, MAX_PROGRAMS, MAX_RULES, MAX_SESSIONS, RateLimit, SAMPLE_ALL, SAMPLE_FLOWS,
    SAMPLE_PACKETS,
};

use super::{
    Controls, Fields, Interface, Plan, Rule, RuleKind, Session, compile::compile, filter::Expr,
    hidden::HiddenRules,
};
use crate::{
    config::{
        ActionConfig, ConfigError, DEFAULT_COPY_RING_BYTES, DirectionConfig, HookConfig,
        LoadedConfig, PodSelector, RateLimitConfig, SampleBy, SessionConfig,
    },
    targets::Target,
};

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
    // Every error of the file in one pass: each session and rule is checked even after one
    // failed.
    let mut errors = Vec::new();
    let sessions = resolve_sessions(loaded, interfaces, pods, &mut warnings, &mut errors);
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
    let mut hidden = HiddenRules::default();
    for (index, spanned) in config.sessions.iter().enumerate() {
        rules.extend(guards.iter().map(|guard| Rule {
            session: index,
            ..guard.clone()
        }));
        let session = spanned.get_ref();
        let own = match session_rules(loaded, index, session, &mut hidden) {
            Ok(own) => own,
            Err(error) => {
                errors.push(error);
                continue;
            }
        };
        if let Some(filter) = &session.filter
            && own.iter().all(|r| r.action == ActionConfig::Skip)
        {
            warnings.push(format!(
                "{}: filter `{}` selects no packet: session `{}` copies nothing",
                loaded.location(filter.span()),
                filter.get_ref(),
                session.name.get_ref()
            ));
        }
        rules.extend(own);
    }
    if rules.len() > MAX_RULES as usize {
        return Err(loaded.file_error(format!(
            "the rules become {} kernel rules (a `host` or `port` rule is one per direction, a \
             filter several), over the limit of {MAX_RULES}",
            rules.len()
        )));
    }
    let programs: std::collections::HashSet<_> =
        rules.iter().filter_map(|r| r.program.as_deref()).collect();
    if programs.len() > MAX_PROGRAMS as usize {
        return Err(loaded.file_error(format!(
            "{} filters need libpcap's compiler (beyond the rule tables), over the limit of              {MAX_PROGRAMS} distinct ones",
            programs.len()
        )));
    }
    warnings.extend(hidden.into_warnings());
    // The loop check reads every session's place: only when all of them resolved.
    if sessions.len() == config.sessions.len()
        && let Err(error) = refuse_watched_targets(loaded, &sessions)
    {
        errors.push(error);
    }
    let node_rate = match &config.node_rate_limit {
        Some(limit) => rate_limit(loaded, limit).unwrap_or_else(|error| {
            errors.push(error);
            RateLimit::default()
        }),
        None => RateLimit::default(),
    };
    let copy_ring_bytes = match &config.copy_ring_bytes {
        Some(bytes) if !bytes.get_ref().is_power_of_two() || *bytes.get_ref() < 4096 => {
            errors.push(loaded.error(
                bytes.span(),
                "copy_ring_bytes must be a power of two of at least 4096",
            ));
            DEFAULT_COPY_RING_BYTES
        }
        Some(bytes) => *bytes.get_ref(),
        None => DEFAULT_COPY_RING_BYTES,
    };
    // In the file's order.
    errors.sort_by_key(|error| error.location.line_col);
    ConfigError::gather(errors)?;
    let tables = compile(&sessions, &rules);
    Ok(Plan {
        sessions,
        node_rate,
        copy_ring_bytes,
        rules,
        tables,
        warnings,
    })
}

/// Every session, its name unique, its target and what it watches checked: those that pass,
/// and the errors of the others.
fn resolve_sessions(
    loaded: &LoadedConfig,
    interfaces: &[Interface],
    pods: &dyn Fn(&PodSelector) -> Vec<Interface>,
    warnings: &mut Vec<String>,
    errors: &mut Vec<ConfigError>,
) -> Vec<Session> {
    let mut sessions = Vec::new();
    let mut names = HashMap::new();
    for spanned in &loaded.config.sessions {
        let session = spanned.get_ref();
        let name = session.name.get_ref();
        if name.is_empty() {
            errors.push(loaded.error(session.name.span(), "a session name must not be empty"));
            continue;
        }
        if let Some(first) = names.insert(name.clone(), session.name.span()) {
            let at = loaded.location(first);
            errors.push(loaded.error(
                session.name.span(),
                format!("session name `{name}` is already used at {at}"),
            ));
            continue;
        }
        match resolve_session(loaded, session, interfaces, pods, warnings) {
            Ok(resolved) => sessions.push(resolved),
            Err(error) => errors.push(error),
        }
    }
    sessions
}

/// The rules that keep the outer packets of every tunnel target (UDP to the collector's address
/// and port, or GRE to its address; from this node or any other) out of every session.
fn tunnel_guards(sessions: &[Session]) -> Vec<Rule> {
    let endpoints: BTreeSet<(IpAddr, u8, Option<u16>)> = sessions
        .iter()
        .filter_map(|s| s.target.tunnel())
        .map(|t| (t.remote, t.format.ip_protocol(), t.format.udp_port()))
        .collect();
    endpoints
        .into_iter()
        .map(|(remote, proto, port)| Rule {
            kind: RuleKind::TunnelGuard,
            action: ActionConfig::Skip,
            fields: Fields {
                proto: Some(proto),
                dst: Some(IpNet::from(remote)),
                dst_port: port.map(|port| port..=port),
                ..Fields::default()
            },
            ..Rule::default()
        })
        .collect()
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
    let observe = session.observe.as_ref();
    let target = session
        .target
        .get_ref()
        .resolve_observed(observe.map(toml::Spanned::get_ref), interfaces)
        .map_err(|(of_target, message)| {
            let span = match observe {
                Some(observe) if !of_target => observe.span(),
                // A session without a target: its name's place.
                _ if session.target.span().is_empty() => session.name.span(),
                _ => session.target.span(),
            };
            loaded.error(span, message)
        })?;
    let watched = watched_interfaces(loaded, session, &target, interfaces, pods, warnings)?;
    let directions = directions(loaded, session)?;
    let through_ring = target.through_ring(directions == [Direction::XdpIngress]);
    let attachments = watched
        .interfaces
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
        globs: watched.globs,
        pods: watched.selector,
        directions: directions.to_vec(),
        through_ring,
    })
}

/// As in tcpdump, every interface (but the session's target interface, and the interfaces that
/// come later too).
const ANY_INTERFACE: &str = "any";

/// What a session watches: interfaces by name or glob, or pods.
struct Watched {
    /// (ifindex, name), present now.
    interfaces: BTreeSet<(u32, String)>,
    globs: Vec<glob::Pattern>,
    selector: Option<PodSelector>,
}

/// What a session names to watch: interface names and globs, or a pod selector, checked.
fn what_is_watched<'a>(
    loaded: &LoadedConfig,
    session: &'a SessionConfig,
) -> Result<(&'a [toml::Spanned<String>], Option<PodSelector>), ConfigError> {
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
    Ok((patterns, selector))
}

/// The interfaces a session watches now (never its `target`), and the globs and pod selector
/// that may bring more.
fn watched_interfaces(
    loaded: &LoadedConfig,
    session: &SessionConfig,
    target: &Target,
    interfaces: &[Interface],
    pods: &dyn Fn(&PodSelector) -> Vec<Interface>,
    warnings: &mut Vec<String>,
) -> Result<Watched, ConfigError> {
    let target_ifindex = target.interface().map(|i| i.ifindex);
    let (patterns, selector) = what_is_watched(loaded, session)?;
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
        if pattern.get_ref() == ANY_INTERFACE {
            watched.extend(
                interfaces
                    .iter()
                    .filter(|i| Some(i.ifindex) != target_ifindex)
                    .map(|i| (i.ifindex, i.name.clone())),
            );
            continue;
        }
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
    Ok(Watched {
        interfaces: watched,
        globs: patterns
            .iter()
            .map(|p| match p.get_ref().as_str() {
                // Interfaces that come later too (never the target: it is never watched).
                ANY_INTERFACE => "*",
                pattern => pattern,
            })
            .filter(|p| is_glob(p))
            .filter_map(|p| glob::Pattern::new(p).ok())
            .collect(),
        selector,
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

/// The session's rules in number order, then its default rule; warns about hidden rules.
fn session_rules(
    loaded: &LoadedConfig,
    index: usize,
    session: &SessionConfig,
    hidden: &mut HiddenRules,
) -> Result<Vec<Rule>, ConfigError> {
    let name = session.name.get_ref();
    if let Some(filter) = &session.filter {
        return filter_rules(loaded, index, session, filter);
    }
    let mut ordered: Vec<_> = session.rules.iter().collect();
    ordered.sort_by_key(|r| r.get_ref().number);
    let mut errors = Vec::new();
    for pair in ordered.windows(2) {
        if pair[0].get_ref().number == pair[1].get_ref().number {
            errors.push(loaded.error(
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
        let expanded = match validate_rule(index, spanned_rule.get_ref()) {
            Ok(expanded) => expanded,
            Err(message) => {
                errors.push(loaded.error(spanned_rule.span(), message));
                continue;
            }
        };
        for rule in expanded {
            hidden.check(loaded, spanned_rule.span(), &rules, &rule, name);
            rules.push(rule);
        }
    }
    ConfigError::gather(errors)?;
    rules.push(Rule {
        session: index,
        action: session
            .default
            .as_ref()
            .map_or(ActionConfig::Skip, |d| *d.get_ref()),
        ..Rule::default()
    });
    Ok(rules)
}

/// The rules a session's `filter` expression becomes, then its default rule.
fn filter_rules(
    loaded: &LoadedConfig,
    index: usize,
    session: &SessionConfig,
    filter: &toml::Spanned<String>,
) -> Result<Vec<Rule>, ConfigError> {
    let name = session.name.get_ref();
    if let Some(rule) = session.rules.first() {
        return Err(loaded.error(
            rule.span(),
            format!("session `{name}` has a `filter`, which gives all its rules: it takes no [[session.rule]]"),
        ));
    }
    if let Some(default) = &session.default {
        return Err(loaded.error(
            default.span(),
            format!(
                "session `{name}` has a `filter`, which decides every packet: it takes no `default`"
            ),
        ));
    }
    let compiled = crate::rules::filter::compile(filter.get_ref())
        .map_err(|e| loaded.error(filter.span(), format!("filter `{}`: {e}", filter.get_ref())))?;
    let mut rules: Vec<Rule> = compiled
        .rules
        .into_iter()
        .zip(1..)
        .map(|((fields, action), number)| Rule {
            session: index,
            kind: RuleKind::Filter(number),
            action,
            fields,
            program: compiled.program.clone(),
        })
        .collect();
    rules.push(Rule {
        session: index,
        action: compiled.default,
        ..Rule::default()
    });
    Ok(rules)
}

/// A target interface that a session watches would have copies mirrored again. (VXLAN targets
/// are covered by the tunnel guard rules instead.)
fn refuse_watched_targets(loaded: &LoadedConfig, sessions: &[Session]) -> Result<(), ConfigError> {
    for session in sessions {
        let Some(target) = session.target.interface() else {
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

/// A configured rule as the kernel's rules: one, or one per direction of its `host` and `port`.
fn validate_rule(session: usize, rule: &crate::config::RuleConfig) -> Result<Vec<Rule>, String> {
    let never = |why: &str| Err(format!("rule {} can never match: {why}", rule.number));
    let fields = Fields {
        ethertype: rule.ethertype.map(|e| e.0),
        vlan: rule.vlan.map(|v| v.0..=v.0),
        proto: rule.proto.map(|p| p.0),
        src: rule.src.map(|c| c.0),
        dst: rule.dst.map(|c| c.0),
        src_port: rule.src_port.as_ref().map(|p| p.0.clone()),
        dst_port: rule.dst_port.as_ref().map(|p| p.0.clone()),
    };
    if let Some(why) = fields.contradiction() {
        return never(why);
    }
    // `expr` and (`source` or `destination`).
    let either_way = |expr: Expr, source: Fields, destination: Fields| {
        let directions = Expr::Or(
            Box::new(Expr::Fields(source)),
            Box::new(Expr::Fields(destination)),
        );
        Expr::And(Box::new(expr), Box::new(directions))
    };
    let mut expr = Expr::Fields(fields);
    if let Some(host) = rule.host {
        let (src, dst) = (Some(host.0), Some(host.0));
        let (source, destination) = (
            Fields {
                src,
                ..Fields::default()
            },
            Fields {
                dst,
                ..Fields::default()
            },
        );
        expr = either_way(expr, source, destination);
    }
    if let Some(port) = &rule.port {
        let (src_port, dst_port) = (Some(port.0.clone()), Some(port.0.clone()));
        let source = Fields {
            src_port,
            ..Fields::default()
        };
        let destination = Fields {
            dst_port,
            ..Fields::default()
        };
        expr = either_way(expr, source, destination);
    }
    // Two either-direction fields make at most four rules.
    let expanded = crate::rules::filter::expand(&expr, 4).unwrap_or_default();
    if expanded.is_empty() {
        return never("`host` or `port` contradicts the rule's other fields");
    }
    Ok(expanded
        .into_iter()
        .map(|fields| Rule {
            session,
            kind: RuleKind::Numbered(rule.number),
            action: rule.action,
            fields,
            program: None,
        })
        .collect())
}
