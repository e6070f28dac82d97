//! Warnings about rules that earlier rules of their session hide, within bounds.
use super::{Rule, RuleKind};
use crate::config::LoadedConfig;

/// Warnings about rules that earlier rules hide, within bounds: every rule is compared with the
/// earlier rules of its session until [`HiddenRules::PAIR_BUDGET`] comparisons are spent, and the
/// first [`HiddenRules::SHOWN`] warnings are kept, the rest counted.
#[derive(Debug, Default)]
pub(super) struct HiddenRules {
    shown: Vec<String>,
    more: usize,
    pairs: usize,
    /// Rules not compared once the budget was spent.
    unchecked: usize,
}

impl HiddenRules {
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
            let Some(warning) = hiding(earlier, rule, session) else {
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
fn hiding(earlier: &Rule, later: &Rule, session: &str) -> Option<String> {
    let (RuleKind::Numbered(earlier_no), RuleKind::Numbered(later_no)) = (earlier.kind, later.kind)
    else {
        return None;
    };
    // One rule's directions (`host`, `port`) are several rules that may overlap: that is fine.
    if earlier_no == later_no {
        return None;
    }
    let (earlier_fields, later_fields) = (&earlier.fields, &later.fields);
    if earlier_fields.covers(later_fields) {
        Some(format!(
            "rule {later_no} of session `{session}` is unreachable: rule {earlier_no} matches every packet it matches"
        ))
    } else if earlier.action != later.action
        && earlier_fields.overlaps(later_fields)
        && !later_fields.covers(earlier_fields)
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
