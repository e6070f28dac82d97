//! The rules as the kernel's lookup tables: a bitmap of rules per field value.
use std::{
    collections::{BTreeSet, HashMap},
    ops::RangeInclusive,
};

use ipnet::IpNet;
use mirror_common::{
    BITMAP_WORDS, Direction, FIELD_COUNT, Field, RuleBitmap, RuleMeta, SUMMARY_WORDS, UNCONSTRAINED,
};

use super::{AttachmentTable, Fields, Rule, Session, Tables, action_abi};
use crate::config::ActionConfig;

/// The bitmap of the rules of `sessions` the kernel decides: what an interface these sessions
/// watch is classified against.
pub fn sessions_bitmap(rules: &[Rule], sessions: &[usize]) -> RuleBitmap {
    sessions_bits(rules, sessions).to_abi()
}

fn sessions_bits(rules: &[Rule], sessions: &[usize]) -> Bits {
    Bits::of(rules, |r| {
        sessions.contains(&r.session) && !r.counted_by_agent()
    })
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
    fn remove(&mut self, other: &Bits) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a &= !b;
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
struct Interner {
    index: HashMap<Bits, u32>,
    bitmaps: Vec<RuleBitmap>,
    /// The rules the agent counts (see [`Rule::counted_by_agent`]): in no bitmap, so that no
    /// field's bitmap keeps a summary word alive for them alone.
    counted_by_agent: Bits,
}

impl Interner {
    fn new(rules: &[Rule]) -> Self {
        Interner {
            index: HashMap::new(),
            bitmaps: Vec::new(),
            counted_by_agent: Bits::of(rules, Rule::counted_by_agent),
        }
    }

    fn intern(&mut self, bits: &Bits) -> u32 {
        let mut bits = bits.clone();
        bits.remove(&self.counted_by_agent);
        if let Some(&i) = self.index.get(&bits) {
            return i;
        }
        let i = self.bitmaps.len() as u32;
        self.bitmaps.push(bits.to_abi());
        self.index.insert(bits, i);
        i
    }
}

pub(super) fn compile(sessions: &[Session], rules: &[Rule]) -> Tables {
    let mut interner = Interner::new(rules);
    // By (interface index, direction), the sessions watching it, in order.
    let mut watching: HashMap<(u32, Direction), Vec<usize>> = HashMap::new();
    for (s, session) in sessions.iter().enumerate() {
        for (interface, direction) in &session.attachments {
            watching
                .entry((interface.ifindex, *direction))
                .or_default()
                .push(s);
        }
    }
    let mut attachment_entries: Vec<_> = watching
        .into_iter()
        .map(|((ifindex, direction), sessions)| AttachmentTable {
            ifindex,
            direction,
            bitmap: interner.intern(&sessions_bits(rules, &sessions)),
            sessions,
        })
        .collect();
    attachment_entries.sort_by_key(|a| (a.ifindex, a.direction as u32));

    let (ethertype_wild, ethertype) = direct(&mut interner, rules, 65_536, |r| {
        r.fields.ethertype.map(usize::from)
    });
    let (vlan_wild, vlan) = ranges(&mut interner, rules, 4096, |r| r.fields.vlan.clone());
    let (proto_wild, ip_proto) = direct(&mut interner, rules, 256, |r| {
        r.fields.proto.map(usize::from)
    });
    let (src_wild, src_ip) = prefixes(&mut interner, rules, |r| r.fields.src);
    let (dst_wild, dst_ip) = prefixes(&mut interner, rules, |r| r.fields.dst);
    let (src_port_wild, src_port) =
        ranges(&mut interner, rules, 65_536, |r| r.fields.src_port.clone());
    let (dst_port_wild, dst_port) =
        ranges(&mut interner, rules, 65_536, |r| r.fields.dst_port.clone());
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
    let unknown = unknown_fields(&mut interner, rules);
    let mut programs: Vec<std::sync::Arc<super::filter::Program>> = Vec::new();
    let rule_meta = rules
        .iter()
        .map(|r| RuleMeta {
            session: r.session as u32,
            action: action_abi(r.action) as u32,
            next_session_rule: rules
                .iter()
                .position(|x| x.session > r.session)
                .unwrap_or(rules.len()) as u32,
            program: r.program.as_ref().map_or(0, |program| {
                let index = programs
                    .iter()
                    .position(|p| p == program)
                    .unwrap_or_else(|| {
                        programs.push(program.clone());
                        programs.len() - 1
                    });
                index as u32 + 1
            }),
        })
        .collect();
    Tables {
        bitmaps: interner.bitmaps,
        wildcard,
        unknown,
        attachments: attachment_entries,
        ethertype,
        vlan,
        ip_proto,
        src_ip,
        dst_ip,
        src_port,
        dst_port,
        rules: rule_meta,
        programs,
    }
}

/// Per field, the rules that may decide a packet whose field the parser did not reach: mirror
/// rules (it might match) and rules that accept any value; [`UNCONSTRAINED`] where no skip rule
/// constrains the field. The attachment is always known.
fn unknown_fields(interner: &mut Interner, rules: &[Rule]) -> [u32; FIELD_COUNT] {
    /// Whether a rule's fields constrain one field.
    type Constrains = fn(&Fields) -> bool;
    let constrains: [(Field, Constrains); 7] = [
        (Field::Ethertype, |f| f.ethertype.is_some()),
        (Field::VlanId, |f| f.vlan.is_some()),
        (Field::IpProto, |f| f.proto.is_some()),
        (Field::SrcIp, |f| f.src.is_some()),
        (Field::DstIp, |f| f.dst.is_some()),
        (Field::SrcPort, |f| f.src_port.is_some()),
        (Field::DstPort, |f| f.dst_port.is_some()),
    ];
    let mut unknown = [UNCONSTRAINED; FIELD_COUNT];
    for (field, constrains) in constrains {
        let skips = |r: &Rule| r.action == ActionConfig::Skip && constrains(&r.fields);
        if rules.iter().any(|r| skips(r) && !r.counted_by_agent()) {
            unknown[field as usize] = interner.intern(&Bits::of(rules, |r| !skips(r)));
        }
    }
    unknown
}

/// A direct array over every value of a field that rules match exactly (ethertype, IP protocol): each value's entry is the bitmap of the rules naming it plus those that do not
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

/// A direct array over all `values` of a field that rules match by range (ports, VLAN ids),
/// built by sweeping the range boundaries.
fn ranges(
    interner: &mut Interner,
    rules: &[Rule],
    values: u32,
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
    let mut table = vec![0; values as usize];
    let mut current = wildcard.clone();
    let mut next_event = 0;
    let mut value = 0u32;
    while value < values {
        while next_event < events.len() && events[next_event].0 == value {
            let (_, rule, starts) = events[next_event];
            if starts {
                current.set(rule);
            } else {
                current.clear(rule);
            }
            next_event += 1;
        }
        let until = events.get(next_event).map_or(values, |e| e.0.min(values));
        let index = interner.intern(&current);
        table[value as usize..until as usize].fill(index);
        value = until;
    }
    (interner.intern(&wildcard), table)
}
