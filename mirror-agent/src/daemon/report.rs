//! The report a stop prints: every counter, hook, ring, tunnel and target, as a table or (with
//! `run --json`) as one JSON document.
use mirror_common::CounterField;
use serde::Serialize;

use crate::{
    state::{Applied, SessionStats, Stats},
    targets::{TargetCounters, TunnelView, TxLosses, tunnel::TunnelPath},
};

/// `run --json`'s report.
#[derive(Debug, Serialize)]
struct JsonReport {
    /// The final counters, as `GET /stats` gives them (with the targets' losses).
    stats: Stats,
    /// Per session, what the agent counted of its target: the ring copies it sent on and those
    /// it failed to, and the rest of [`TargetCounters`].
    ring: Vec<SessionTargetCounters>,
    tunnels: Vec<TunnelView>,
    /// In pinned mode, the directory whose programs go on mirroring.
    pinned: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct SessionTargetCounters {
    session: String,
    #[serde(flatten)]
    counters: TargetCounters,
}

/// The final counters as one line of JSON (see [`JsonReport`]).
pub(super) fn json_report(
    applied: &Applied,
    losses: Vec<TxLosses>,
    pinned: Option<&std::path::Path>,
) -> anyhow::Result<String> {
    let mut stats = applied.stats()?;
    stats.targets = losses;
    let ring = stats
        .sessions
        .iter()
        .map(|session| SessionTargetCounters {
            session: session.name.clone(),
            counters: session.target,
        })
        .collect();
    let report = JsonReport {
        stats,
        ring,
        tunnels: applied.tunnels(),
        pinned: pinned.map(std::path::Path::to_path_buf),
    };
    Ok(serde_json::to_string(&report)? + "\n")
}

/// The final counters as a table: one line per rule, then one per session, per hook, per
/// session's target counters, per tunnel (the hop its copies took last) and per target interface
/// and underlay (copies the kernel lost after they left the programs).
pub(super) fn report(applied: &Applied, losses: &[TxLosses]) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let stats = applied.stats()?;
    let tunnels = applied.tunnels();
    let mut out = String::new();
    // Names as wide as the longest (16 at least), so that the columns stay aligned.
    let names = stats
        .sessions
        .iter()
        .map(|s| s.name.len())
        .chain(losses.iter().map(|l| l.interface.len()))
        .chain(tunnels.iter().map(|t| t.session.len()))
        .max()
        .unwrap_or(0)
        .max(16);
    counter_rows(&mut out, &stats.sessions, names);
    for (name, hook) in [
        ("ingress", &stats.ingress),
        ("egress", &stats.egress),
        ("xdp", &stats.xdp),
        ("copy", &stats.copy),
    ] {
        named_row(&mut out, "hook", name, names, hook.named());
    }
    for session in &stats.sessions {
        named_row(
            &mut out,
            "agent",
            &session.name,
            names,
            session.target.named(),
        );
    }
    for session in &stats.sessions {
        if let Some(unread) = session.http.as_ref().map(|http| http.unread)
            && unread.total() > 0
        {
            let _ = writeln!(
                out,
                "http     {:<names$} unread requests={} ring_full={} gap={} unreadable={}",
                session.name,
                unread.total(),
                unread.ring_full,
                unread.gap,
                unread.unreadable
            );
        }
        for service in session.http.iter().flat_map(|http| &http.services) {
            let _ = writeln!(
                out,
                "http     {:<names$} {}",
                session.name,
                service.summary()
            );
        }
    }
    for tunnel in &tunnels {
        let (session, target) = (&tunnel.session, &tunnel.target);
        let _ = match &tunnel.path {
            TunnelPath::Hop {
                interface,
                next_hop_mac,
            } => writeln!(
                out,
                "tunnel   {session:<names$} {target} via {interface} to {next_hop_mac}"
            ),
            TunnelPath::None { problem } => {
                writeln!(out, "tunnel   {session:<names$} {target}: {problem}")
            }
        };
    }
    for loss in losses {
        let _ = writeln!(
            out,
            "target   {:<names$} tx_dropped={} tx_errors={}",
            loss.interface, loss.tx_dropped, loss.tx_errors
        );
    }
    Ok(out)
}

/// The kernel's counters in columns: a header, a line per rule, then one per session.
fn counter_rows(out: &mut String, sessions: &[SessionStats], names: usize) {
    use std::fmt::Write as _;
    let rules = sessions
        .iter()
        .flat_map(|s| &s.rules)
        .map(|r| r.rule.len())
        .max()
        .unwrap_or(0)
        .max(8);
    // One column per counter, as wide as its name.
    let width = |field: &CounterField| field.name.len().max(9);
    let row =
        |out: &mut String, kind: &str, name: &str, rule: &str, c: &mirror_common::Counters| {
            let _ = write!(out, "{kind:<8} {name:<names$} {rule:<rules$}");
            for (field, value) in c.named() {
                let _ = write!(out, " {value:>width$}", width = width(field));
            }
            out.push('\n');
        };
    let _ = write!(
        out,
        "{:<8} {:<names$} {:<rules$}",
        "counter", "session", "rule"
    );
    for field in mirror_common::Counters::FIELDS {
        let _ = write!(out, " {:>width$}", field.name, width = width(field));
    }
    out.push('\n');
    for session in sessions {
        for rule in &session.rules {
            row(out, "rule", &session.name, &rule.rule, &rule.counters);
        }
    }
    for session in sessions {
        row(out, "session", &session.name, "-", &session.counters);
    }
}

/// `kind name field=value …`.
fn named_row<'a>(
    out: &mut String,
    kind: &str,
    name: &str,
    names: usize,
    counters: impl Iterator<Item = (&'a CounterField, u64)>,
) {
    use std::fmt::Write as _;
    let _ = write!(out, "{kind:<8} {name:<names$}");
    for (field, value) in counters {
        let _ = write!(out, " {}={value}", field.name);
    }
    out.push('\n');
}
