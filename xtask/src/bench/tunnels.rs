//! The tunnel formats against `tc mirred` into a vxlan device, measured in pairs.
use std::{path::Path, time::Duration};

use anyhow::Context as _;
use mirror_tests::Lab;
use serde::Serialize;

use super::{Options, Scenario, activate, generate, median, program_cost, sample_once, warm_up};

/// The tunnel formats measured, as `MirrorTunnel` names them, and their targets.
pub const TUNNELS: [(&str, &str); 5] = [
    ("vxlan", "vxlan = { remote = \"10.10.3.2\", vni = 42 }"),
    ("geneve", "geneve = { remote = \"10.10.3.2\", vni = 42 }"),
    ("gre", "gre = { remote = \"10.10.3.2\", key = 42 }"),
    (
        "erspan2",
        "erspan = { remote = \"10.10.3.2\", session_id = 42 }",
    ),
    (
        "erspan3",
        "erspan = { remote = \"10.10.3.2\", session_id = 42, version = 3 }",
    ),
];

/// Pairs of the paired tunnel comparison, at least.
const MIN_PAIRS: usize = 5;

/// One tunnel format against `tc mirred` into a vxlan device, in pairs taken one after the
/// other (reference, format, reference, format, ...): the machine's drift hits both sides of a
/// pair alike, so the paired ratios are steadier than ratios of medians.
#[derive(Debug, Serialize, Clone)]
pub struct PairedRow {
    pub format: String,
    pub frame_bytes: usize,
    /// Forwarded pps of the format over tc mirred's, per pair.
    pub ratios: Vec<f64>,
    pub median_ratio: f64,
    pub min_ratio: f64,
    pub max_ratio: f64,
    /// Median share of copies received, per format.
    pub completeness: f64,
    /// Mean run time per packet of the mirror program at src0, the clone and the nested copy
    /// program at the underlay included (kernel run-time stats), ns.
    pub program_ns_per_packet: Option<f64>,
}

/// Every tunnel format, interleaved with `tc mirred` into vxlan (see [`PairedRow`]).
pub fn paired_tunnels(
    lab: &Lab,
    agent: &Path,
    frame: &[u8],
    options: &Options,
) -> anyhow::Result<Vec<PairedRow>> {
    let duration = Duration::from_secs_f64(options.seconds);
    let pairs = options.reps.max(MIN_PAIRS);
    let reference = Scenario::TcMirredVxlan;
    let mut rows: Vec<PairedRow> = Vec::new();
    for (format, _) in TUNNELS {
        eprintln!(
            "bench: {format} paired with tc mirred into vxlan, {}-byte frames",
            frame.len()
        );
        let scenario = Scenario::MirrorTunnel(format);
        let mut ratios = Vec::with_capacity(pairs);
        let mut completeness = Vec::with_capacity(pairs);
        for _ in 0..pairs {
            let tc = {
                let _active = activate(lab, agent, &reference)?;
                warm_up(lab, frame)?;
                sample_once(lab, &reference, frame, duration)?
            };
            let ours = {
                let _active = activate(lab, agent, &scenario)?;
                warm_up(lab, frame)?;
                sample_once(lab, &scenario, frame, duration)?
            };
            ratios.push(ours.pps / tc.pps);
            completeness.push(ours.completeness.unwrap_or(0.0));
        }
        let program_ns_per_packet = {
            let _active = activate(lab, agent, &scenario)?;
            let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
                .context("enabling BPF run-time stats")?;
            generate(&lab.src, "eth0", frame, duration, None, 50_000_000)?;
            program_cost()?
        };
        let mut sorted = ratios.clone();
        rows.push(PairedRow {
            format: format.to_owned(),
            frame_bytes: frame.len(),
            median_ratio: median(&mut sorted),
            min_ratio: sorted[0],
            max_ratio: sorted[sorted.len() - 1],
            ratios,
            completeness: median(&mut completeness),
            program_ns_per_packet,
        });
    }
    Ok(rows)
}
