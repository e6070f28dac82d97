//! What a session is made of, to tell the sessions a reload left unchanged.
use mirror_common::Direction;

use super::{Interface, Plan, Rule};

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
