//! The report a stop prints: every counter, hook, ring, tunnel and target, as a table or (with
//! `run --json`) as one JSON document.
use serde::Serialize;

use crate::{
    state::{Applied, Stats, TunnelView},
    tunnel,
};

/// `run --json`'s report.
#[derive(Debug, Serialize)]
struct JsonReport {
    /// The final counters, as `GET /stats` gives them (with the targets' losses).
    stats: Stats,
    /// Per session, the copies the agent sent on from the ring, and those it failed to.
    ring: Vec<RingSent>,
    tunnels: Vec<TunnelView>,
    /// In pinned mode, the directory whose programs go on mirroring.
    pinned: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct RingSent {
    session: String,
    sent: u64,
    failed: u64,
}

/// The final counters as one line of JSON (see [`JsonReport`]).
pub(super) fn json_report(
    applied: &Applied,
    emitted: Option<&[(u64, u64)]>,
    losses: Vec<tunnel::TxLosses>,
    pinned: Option<&std::path::Path>,
) -> anyhow::Result<String> {
    let mut stats = applied.stats()?;
    stats.targets = losses;
    let ring = stats
        .sessions
        .iter()
        .zip(emitted.unwrap_or_default())
        .map(|(session, &(sent, failed))| RingSent {
            session: session.name.clone(),
            sent,
            failed,
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

/// The final counters as a table: one line per rule, then one per session, per hook, per tunnel
/// (the hop its copies took last) and per target interface and underlay (copies the kernel lost
/// after they left the programs).
pub(super) fn report(
    applied: &Applied,
    emitted: Option<&[(u64, u64)]>,
    losses: &[tunnel::TxLosses],
) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let stats = applied.stats()?;
    let mut out = String::new();
    // Names as wide as the longest (16 at least), so that the columns stay aligned.
    let names = stats
        .sessions
        .iter()
        .map(|s| s.name.len())
        .chain(losses.iter().map(|l| l.interface.len()))
        .chain(
            applied
                .targets
                .report()
                .iter()
                .map(|(session, _, _)| session.len()),
        )
        .max()
        .unwrap_or(0)
        .max(16);
    let rules = stats
        .sessions
        .iter()
        .flat_map(|s| &s.rules)
        .map(|r| r.rule.len())
        .max()
        .unwrap_or(0)
        .max(8);
    // One column per counter, as wide as its name.
    let width = |field: &mirror_common::CounterField| field.name.len().max(9);
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
    for session in &stats.sessions {
        for rule in &session.rules {
            row(&mut out, "rule", &session.name, &rule.rule, &rule.counters);
        }
    }
    for session in &stats.sessions {
        row(&mut out, "session", &session.name, "-", &session.counters);
    }
    for (name, hook) in [
        ("ingress", &stats.ingress),
        ("egress", &stats.egress),
        ("xdp", &stats.xdp),
        ("copy", &stats.copy),
    ] {
        let _ = write!(out, "hook     {name:<names$}");
        for (field, value) in hook.named() {
            let _ = write!(out, " {}={value}", field.name);
        }
        out.push('\n');
    }
    for (session, (sent, failed)) in stats.sessions.iter().zip(emitted.unwrap_or_default()) {
        let _ = writeln!(
            out,
            "ring     {:<names$} sent={sent} failed={failed}",
            session.name
        );
    }
    for (session, target, hop) in applied.targets.report() {
        let _ = match hop {
            Ok(hop) => writeln!(
                out,
                "tunnel   {session:<names$} {target} via {} to {}",
                hop.interface,
                tunnel::mac_text(hop.next_hop_mac)
            ),
            Err(why) => writeln!(out, "tunnel   {session:<names$} {target}: {why}"),
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
