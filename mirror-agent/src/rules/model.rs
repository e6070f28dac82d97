//! A userspace model of the kernel's classifier, to check the compiled tables against.
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
    rule.fields.matches(&p.header)
}

/// A packet for the userspace model: where it was seen and its fields.
#[derive(Debug, Clone)]
pub(crate) struct Packet {
    pub ifindex: u32,
    pub direction: Direction,
    pub header: Header,
}
