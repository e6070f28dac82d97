//! An expression as an ordered list of rules with first-match semantics: what the kernel's
//! classifier runs. `not` flips actions (so it puts skip rules ahead of mirror rules), `and` and
//! `or` send the packets one side leaves undecided through the other side's rules.

use super::parse::Expr;
use crate::rules::Fields;

/// Ordered rules (`true`: mirror) and the action for packets none of them matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decisions {
    pub rules: Vec<(Fields, bool)>,
    pub default: bool,
}

/// How many more rules than the limit a list may have before the pass that removes rules.
const INTERMEDIATE_FACTOR: usize = 4;

/// `rules` without those that give the default's verdict to packets no later rule would decide
/// otherwise: removing them changes no packet's verdict. A later rule of the other verdict only
/// counts for the packets it shares with the rule that no single earlier rule already decides.
fn without_defaults(rules: &[(Fields, bool)], default: bool) -> Vec<(Fields, bool)> {
    let mut kept: Vec<(Fields, bool)> = Vec::with_capacity(rules.len());
    for (index, (fields, action)) in rules.iter().enumerate().rev() {
        let needed = *action != default
            || kept.iter().any(|(later, later_action)| {
                *later_action != default
                    && fields.intersect(later).is_some_and(|shared| {
                        !rules[..index]
                            .iter()
                            .any(|(earlier, _)| earlier.covers(&shared))
                    })
            });
        if needed {
            kept.push((fields.clone(), *action));
        }
    }
    kept.reverse();
    kept
}

/// The expression needs more rules than `limit` (after simplification).
#[derive(Debug)]
pub struct TooLarge;

impl Decisions {
    /// The rules that give `expr`'s verdict for every packet, at most `limit` of them.
    pub fn of(expr: &Expr, limit: usize) -> Result<Decisions, TooLarge> {
        match expr {
            Expr::Fields(fields) => Ok(Decisions {
                rules: vec![(fields.clone(), true)],
                default: false,
            }),
            Expr::Not(inner) => {
                let mut decisions = Decisions::of(inner, limit)?;
                for (_, action) in &mut decisions.rules {
                    *action = !*action;
                }
                decisions.default = !decisions.default;
                Ok(decisions)
            }
            Expr::And(left, right) => {
                Decisions::of(left, limit)?.then(&Decisions::of(right, limit)?, true, limit)
            }
            Expr::Or(left, right) => {
                Decisions::of(left, limit)?.then(&Decisions::of(right, limit)?, false, limit)
            }
        }
    }

    /// `self`, where its verdict `defer` is replaced by `next`'s: for `and`, a packet the left
    /// side mirrors is decided by the right side; for `or`, a packet it skips is.
    fn then(self, next: &Decisions, defer: bool, limit: usize) -> Result<Decisions, TooLarge> {
        let mut rules = Vec::new();
        let mut push = |rule: (Fields, bool)| {
            if rules
                .iter()
                .any(|(earlier, _): &(Fields, bool)| earlier.covers(&rule.0))
            {
                return Ok(());
            }
            // Rules the final pass may remove count too, up to a bound on the work.
            if rules.len() >= limit * INTERMEDIATE_FACTOR {
                return Err(TooLarge);
            }
            rules.push(rule);
            Ok(())
        };
        for (fields, action) in self.rules {
            if action == defer {
                for (next_fields, next_action) in &next.rules {
                    if let Some(both) = fields.intersect(next_fields) {
                        push((both, *next_action))?;
                    }
                }
                push((fields, next.default))?;
            } else {
                push((fields, action))?;
            }
        }
        let default = if self.default == defer {
            for rule in &next.rules {
                push(rule.clone())?;
            }
            next.default
        } else {
            self.default
        };
        let rules = without_defaults(&rules, default);
        if rules.len() > limit {
            return Err(TooLarge);
        }
        Ok(Decisions { rules, default })
    }

    /// The verdict for a packet, given which rules' fields it matches.
    #[cfg(test)]
    pub fn decide(&self, matches: impl Fn(&Fields) -> bool) -> bool {
        self.rules
            .iter()
            .find(|(fields, _)| matches(fields))
            .map_or(self.default, |(_, action)| *action)
    }
}
