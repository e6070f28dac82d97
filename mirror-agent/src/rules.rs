//! Validation and compilation of a configuration into the kernel's lookup tables (the bit-vector
//! design is described in `mirror_common`). Pure: given the interfaces present, it either returns a
//! complete plan or an error, so nothing is applied from a configuration that fails here.
use std::{
    collections::{BTreeSet, HashMap},
    ops::RangeInclusive,
};

use ipnet::IpNet;
use mirror_common::{
    Action, AttachmentKey, BITMAP_WORDS, Direction, FIELD_COUNT, Field, MAX_RULES, MAX_SESSIONS,
    RuleBitmap, RuleMeta, SUMMARY_WORDS, SessionMeta,
};

use crate::config::{ActionConfig, ConfigError, DirectionConfig, LoadedConfig, Location};

/// A network interface present on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
}

/// One rule after validation; `None` fields match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub session: usize,
    /// The configured rule number; `None` for a session's implicit default rule.
    pub number: Option<u32>,
    pub action: ActionConfig,
    pub ethertype: Option<u16>,
    pub vlan: Option<u16>,
    pub proto: Option<u8>,
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    pub src_port: Option<RangeInclusive<u16>>,
    pub dst_port: Option<RangeInclusive<u16>>,
}

fn action_abi(action: ActionConfig) -> Action {
    match action {
        ActionConfig::Skip => Action::Skip,
        ActionConfig::Mirror => Action::Mirror,
    }
}

/// A session after validation.
#[derive(Debug, Clone)]
pub struct Session {
    pub name: String,
    pub target: Interface,
    /// Interfaces and directions watched, sorted.
    pub attachments: Vec<(Interface, Direction)>,
}

/// Everything the agent applies: sessions, rules in global order, and the kernel tables.
#[derive(Debug)]
pub struct Plan {
    pub sessions: Vec<Session>,
    pub rules: Vec<Rule>,
    pub tables: Tables,
    pub warnings: Vec<String>,
}

/// The contents of the kernel's lookup maps.
#[derive(Debug)]
pub struct Tables {
    pub bitmaps: Vec<RuleBitmap>,
    pub wildcard: [u32; FIELD_COUNT],
    pub attachments: Vec<(AttachmentKey, u32)>,
    pub ethertype: Vec<(u32, u32)>,
    pub vlan: Vec<(u32, u32)>,
    pub ip_proto: Vec<u32>,
    pub src_ip: Vec<(IpNet, u32)>,
    pub dst_ip: Vec<(IpNet, u32)>,
    pub src_port: Vec<u32>,
    pub dst_port: Vec<u32>,
    pub rules: Vec<RuleMeta>,
    pub sessions: Vec<SessionMeta>,
}

/// Validates `loaded` against the interfaces present and compiles it.
pub fn plan(loaded: &LoadedConfig, interfaces: &[Interface]) -> Result<Plan, ConfigError> {
    let mut warnings = Vec::new();
    let mut sessions = Vec::new();
    let mut rules = Vec::new();
    let config = &loaded.config;
    if config.sessions.is_empty() {
        return Err(ConfigError {
            location: Location {
                file: loaded.file.clone(),
                line_col: None,
            },
            message: "no [[session]] is configured".into(),
        });
    }
    if config.sessions.len() > MAX_SESSIONS as usize {
        return Err(loaded.error(
            config.sessions[MAX_SESSIONS as usize].span(),
            format!("more than {MAX_SESSIONS} sessions"),
        ));
    }
    let mut names = HashMap::new();
    for (index, spanned) in config.sessions.iter().enumerate() {
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
        let target_name = &session.target.get_ref().interface;
        let target = find(interfaces, target_name).ok_or_else(|| {
            loaded.error(
                session.target.span(),
                format!("target interface `{target_name}` does not exist"),
            )
        })?;
        let mut watched = BTreeSet::new();
        if session.interfaces.get_ref().is_empty() {
            return Err(loaded.error(session.interfaces.span(), "no interfaces to watch"));
        }
        for pattern in session.interfaces.get_ref() {
            let matched = resolve(pattern.get_ref(), interfaces)
                .map_err(|message| loaded.error(pattern.span(), message))?;
            if matched.is_empty() {
                warnings.push(format!(
                    "{}: `{}` matches no interface now",
                    loaded.location(pattern.span()),
                    pattern.get_ref()
                ));
            }
            if matched.iter().any(|i| i.ifindex == target.ifindex) {
                return Err(loaded.error(
                    pattern.span(),
                    format!(
                        "`{}` includes the target `{target_name}`: copies would be mirrored again (a loop)",
                        pattern.get_ref()
                    ),
                ));
            }
            watched.extend(matched.into_iter().map(|i| (i.ifindex, i.name)));
        }
        let directions: &[Direction] = match session.direction {
            DirectionConfig::Ingress => &[Direction::Ingress],
            DirectionConfig::Egress => &[Direction::Egress],
            DirectionConfig::Both => &[Direction::Ingress, Direction::Egress],
        };
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
        sessions.push(Session {
            name: name.clone(),
            target,
            attachments,
        });

        let mut ordered: Vec<_> = session.rules.iter().collect();
        ordered.sort_by_key(|r| r.get_ref().number);
        let first_rule = rules.len();
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
        for spanned_rule in ordered {
            let rule = validate_rule(index, spanned_rule.get_ref())
                .map_err(|message| loaded.error(spanned_rule.span(), message))?;
            for earlier in &rules[first_rule..] {
                if let Some(warning) = shadowing(earlier, &rule, name) {
                    warnings.push(format!(
                        "{}: {warning}",
                        loaded.location(spanned_rule.span())
                    ));
                }
            }
            rules.push(rule);
        }
        rules.push(Rule {
            session: index,
            action: session.default,
            ..Rule::default()
        });
    }
    // A target that another session watches would have copies mirrored again.
    for session in &sessions {
        for other in &sessions {
            if other
                .attachments
                .iter()
                .any(|(i, _)| i.ifindex == session.target.ifindex)
            {
                let span = config.sessions[sessions_index(&sessions, other)]
                    .get_ref()
                    .interfaces
                    .span();
                return Err(loaded.error(
                    span,
                    format!(
                        "session `{}` watches `{}`, the target of session `{}`: copies would be mirrored again (a loop)",
                        other.name, session.target.name, session.name
                    ),
                ));
            }
        }
    }
    if rules.len() > MAX_RULES as usize {
        return Err(ConfigError {
            location: Location {
                file: loaded.file.clone(),
                line_col: None,
            },
            message: format!(
                "{} rules (counting one default rule per session) exceed the limit of {MAX_RULES}",
                rules.len()
            ),
        });
    }
    let tables = compile(&sessions, &rules);
    Ok(Plan {
        sessions,
        rules,
        tables,
        warnings,
    })
}

fn sessions_index(sessions: &[Session], session: &Session) -> usize {
    sessions
        .iter()
        .position(|s| s.name == session.name)
        .unwrap_or_default()
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
        number: Some(rule.number),
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
    let earlier_no = earlier.number?;
    let later_no = later.number?;
    if covers(earlier, later) {
        Some(format!(
            "rule {later_no} of session `{session}` is unreachable: rule {earlier_no} matches every packet it matches"
        ))
    } else if earlier.action != later.action && overlaps(earlier, later) {
        Some(format!(
            "rule {later_no} of session `{session}` overlaps rule {earlier_no}, which has the other action and is tried first"
        ))
    } else {
        None
    }
}

fn field_covers<T>(a: &Option<T>, b: &Option<T>, covers: impl Fn(&T, &T) -> bool) -> bool {
    match (a, b) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => covers(a, b),
    }
}

fn field_overlaps<T>(a: &Option<T>, b: &Option<T>, overlap: impl Fn(&T, &T) -> bool) -> bool {
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
    field_covers(&a.ethertype, &b.ethertype, PartialEq::eq)
        && field_covers(&a.vlan, &b.vlan, PartialEq::eq)
        && field_covers(&a.proto, &b.proto, PartialEq::eq)
        && field_covers(&a.src, &b.src, net)
        && field_covers(&a.dst, &b.dst, net)
        && field_covers(&a.src_port, &b.src_port, range)
        && field_covers(&a.dst_port, &b.dst_port, range)
}

fn overlaps(a: &Rule, b: &Rule) -> bool {
    let net = |x: &IpNet, y: &IpNet| x.contains(y) || y.contains(x);
    let range = |x: &RangeInclusive<u16>, y: &RangeInclusive<u16>| {
        x.start() <= y.end() && y.start() <= x.end()
    };
    field_overlaps(&a.ethertype, &b.ethertype, PartialEq::eq)
        && field_overlaps(&a.vlan, &b.vlan, PartialEq::eq)
        && field_overlaps(&a.proto, &b.proto, PartialEq::eq)
        && field_overlaps(&a.src, &b.src, net)
        && field_overlaps(&a.dst, &b.dst, net)
        && field_overlaps(&a.src_port, &b.src_port, range)
        && field_overlaps(&a.dst_port, &b.dst_port, range)
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
    let wildcard_of = |f: &dyn Fn(&Rule) -> bool| Bits::of(rules, |r| f(r));
    let exact = |interner: &mut Interner, get: &dyn Fn(&Rule) -> Option<u32>| {
        let wildcard = Bits::of(rules, |r| get(r).is_none());
        let values: BTreeSet<u32> = rules.iter().filter_map(get).collect();
        let entries = values
            .into_iter()
            .map(|v| {
                let bits = Bits::of(rules, |r| get(r).is_none_or(|x| x == v));
                (v, interner.intern(&bits))
            })
            .collect::<Vec<_>>();
        (interner.intern(&wildcard), entries)
    };

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

    let (ethertype_wild, ethertype) = exact(&mut interner, &|r| r.ethertype.map(u32::from));
    let (vlan_wild, vlan) = exact(&mut interner, &|r| r.vlan.map(u32::from));
    let (proto_wild, proto_entries) = exact(&mut interner, &|r| r.proto.map(u32::from));
    let mut ip_proto = vec![proto_wild; 256];
    for (p, i) in proto_entries {
        ip_proto[p as usize] = i;
    }
    let (src_wild, src_ip) = prefixes(&mut interner, rules, |r| r.src);
    let (dst_wild, dst_ip) = prefixes(&mut interner, rules, |r| r.dst);
    let (src_port_wild, src_port) = ports(&mut interner, rules, |r| r.src_port.clone());
    let (dst_port_wild, dst_port) = ports(&mut interner, rules, |r| r.dst_port.clone());
    // No session watches an attachment that has no entry, so its wildcard is the empty set.
    let attachment_wild = interner.intern(&wildcard_of(&|_| false));

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
    let session_meta = sessions
        .iter()
        .map(|s| SessionMeta {
            target_ifindex: s.target.ifindex,
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
        sessions: session_meta,
    }
}

/// LPM entries: each prefix a rule names maps to the rules whose prefix contains it (its ancestors
/// and itself) plus the rules that do not constrain the field.
fn prefixes(
    interner: &mut Interner,
    rules: &[Rule],
    get: impl Fn(&Rule) -> Option<IpNet>,
) -> (u32, Vec<(IpNet, u32)>) {
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
                current.set(rule)
            } else {
                current.clear(rule)
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
    fn ok<T: PartialEq>(want: Option<T>, have: Option<T>, f: impl Fn(&T, &T) -> bool) -> bool {
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
        && ok(rule.src_port.clone(), p.src_port, |r, x| r.contains(x))
        && ok(rule.dst_port.clone(), p.dst_port, |r, x| r.contains(x))
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
