//! Warnings about rules that earlier rules of their session hide, within bounds.
use std::ops::RangeInclusive;

use ipnet::IpNet;

use super::{Rule, RuleKind};
use crate::config::LoadedConfig;

/// Warnings about rules that earlier rules hide, within bounds: every rule is compared with the
/// earlier rules of its session until [`Shadows::PAIR_BUDGET`] comparisons are spent, and the
/// first [`Shadows::SHOWN`] warnings are kept, the rest counted.
#[derive(Debug, Default)]
pub(super) struct Shadows {
    shown: Vec<String>,
    more: usize,
    pairs: usize,
    /// Rules not compared once the budget was spent.
    unchecked: usize,
}

impl Shadows {
    /// Comparisons for all sessions together: about 2,800 rules in one session compared pairwise,
    /// a few tens of milliseconds.
    pub(super) const PAIR_BUDGET: usize = 4_000_000;
    pub(super) const SHOWN: usize = 20;

    /// Compares `rule` with the `earlier` rules of its session.
    pub(super) fn check(
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

    pub(super) fn into_warnings(mut self) -> Vec<String> {
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
