//! The tunnel formats against `tc mirred` into a vxlan device, measured in pairs.
use std::path::Path;

use serde::Serialize;

use super::{Bed, Options, Scenario, paired::pair_up};

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

/// One tunnel format against `tc mirred` into a vxlan device, measured in pairs (see
/// [`pair_up`]).
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
    lab: &Bed,
    agent: &Path,
    frame: &[u8],
    options: &Options,
) -> anyhow::Result<Vec<PairedRow>> {
    let mut rows: Vec<PairedRow> = Vec::new();
    for (format, _) in TUNNELS {
        eprintln!(
            "bench: {format} paired with tc mirred into vxlan, {}-byte frames",
            frame.len()
        );
        let paired = pair_up(
            lab,
            agent,
            frame,
            options,
            &Scenario::TcMirredVxlan,
            &Scenario::MirrorTunnel(format),
        )?;
        rows.push(PairedRow {
            format: format.to_owned(),
            frame_bytes: frame.len(),
            median_ratio: paired.median_ratio,
            min_ratio: paired.min_ratio,
            max_ratio: paired.max_ratio,
            ratios: paired.ratios,
            completeness: paired.completeness.unwrap_or(0.0),
            program_ns_per_packet: paired.program_ns_per_packet,
        });
    }
    Ok(rows)
}
