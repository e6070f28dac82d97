//! A userspace model of the kernel's classifier, to check the compiled tables against.
use std::ops::RangeInclusive;

use super::*;

/// The rules `packet` matches, in global order: a userspace model of the kernel's classifier,
/// used to check the compiled tables against the rule semantics.
pub(super) fn decide(plan: &Plan, packet: &Packet) -> Vec<(usize, usize)> {
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

fn rule_matches(rule: &Rule, p: &Packet) -> bool {
    fields_match(&rule.fields, p)
}

/// Whether `p` has `fields`, an absent field matching only a rule that leaves it open.
pub(crate) fn fields_match(rule: &Fields, p: &Packet) -> bool {
    fn ok<W, H>(want: Option<W>, have: Option<H>, f: impl Fn(&W, &H) -> bool) -> bool {
        match (want, have) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(w), Some(h)) => f(&w, &h),
        }
    }
    ok(rule.ethertype, p.ethertype, |a, b| a == b)
        && ok(rule.vlan.clone(), p.vlan, RangeInclusive::contains)
        && ok(rule.proto, p.proto, |a, b| a == b)
        && ok(rule.src, p.src, |n, a| n.contains(a))
        && ok(rule.dst, p.dst, |n, a| n.contains(a))
        && ok(rule.src_port.clone(), p.src_port, RangeInclusive::contains)
        && ok(rule.dst_port.clone(), p.dst_port, RangeInclusive::contains)
}

/// Packet fields for the userspace model.
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
