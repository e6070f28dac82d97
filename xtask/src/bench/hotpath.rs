//! The hot path's targets, each measured in pairs against its reference (see [`pair_up`]):
//! traffic no rule matches against no mirroring at all, with one rule and with 10,000; one
//! matching rule against `tc u32` matching the same fields; match-all against `tc u32
//! match-all`; that rule written as a filter expression, and with byte accessors (a filter
//! program in the kernel's interpreter), against the rule itself; and, on a tap (frames written
//! to its file descriptor, tun's native XDP), `tc mirred`, the TC path and the XDP path each
//! against no mirroring.
use std::path::Path;

use serde::Serialize;

use super::{Bed, Options, Scenario, paired::pair_up, traffic::Source};

/// A scenario against its reference, and what it should reach.
#[derive(Debug, Serialize, Clone)]
pub struct HotRow {
    pub scenario: String,
    pub reference: String,
    pub frame_bytes: usize,
    pub ratios: Vec<f64>,
    pub median_ratio: f64,
    pub min_ratio: f64,
    pub max_ratio: f64,
    pub completeness: Option<f64>,
    pub program_ns_per_packet: Option<f64>,
    /// The program alone, by a test run (scenarios that copy nothing; see
    /// `isolated_program_cost`).
    pub isolated_ns_per_packet: Option<f64>,
    /// Where the frames came from.
    pub source: Source,
    /// The reference's forwarded pps (median over the pairs).
    pub reference_pps: f64,
    /// The paired ratio to reach at least; none for a comparison shown for reference only.
    pub target_ratio: Option<f64>,
    /// The program time per packet (alone, by a test run) to stay within, where there is such a
    /// target.
    pub target_ns: Option<f64>,
}

impl HotRow {
    pub fn met(&self) -> bool {
        self.target_ratio
            .is_some_and(|target| self.median_ratio >= target)
            && self.completeness.is_none_or(|c| c >= 1.0)
            && self
                .target_ns
                .is_none_or(|ns| self.isolated_ns_per_packet.is_some_and(|p| p <= ns))
    }
}

/// (reference, scenario, target ratio, target program ns/packet).
type Comparison = (Scenario, Scenario, Option<f64>, Option<f64>);

/// The comparisons on the veth path.
fn comparisons() -> Vec<Comparison> {
    let no_match = |rules| Scenario::Mirror {
        rules,
        matching: false,
    };
    vec![
        (Scenario::Baseline, no_match(1), Some(0.95), Some(100.0)),
        (
            Scenario::Baseline,
            no_match(10_000),
            Some(0.95),
            Some(100.0),
        ),
        (
            Scenario::TcU32 { rules: 1 },
            Scenario::Mirror {
                rules: 1,
                matching: true,
            },
            Some(1.0),
            None,
        ),
        (Scenario::TcMirred, Scenario::MirrorAll, Some(1.0), None),
        // Shown, not a target: the expression compiles to the same kernel rule (a unit test
        // asserts the same tables), so the ratio is the noise of the pairing.
        (
            Scenario::Mirror {
                rules: 1,
                matching: true,
            },
            Scenario::MirrorFilter,
            None,
            None,
        ),
        // Shown, not a target: what running libpcap's program costs beside the rule tables.
        (
            Scenario::Mirror {
                rules: 1,
                matching: true,
            },
            Scenario::MirrorAccessor,
            None,
            None,
        ),
    ]
}

/// The comparisons on the tap: each way of mirroring every packet against none. The XDP path
/// should keep 90% of the forwarded pps with every copy (at 200k pps or more).
fn tap_comparisons() -> Vec<Comparison> {
    vec![
        (Scenario::Baseline, Scenario::TcMirred, None, None),
        (Scenario::Baseline, Scenario::MirrorAll, None, None),
        (
            Scenario::Baseline,
            Scenario::MirrorXdp { vxlan: false },
            Some(0.90),
            None,
        ),
    ]
}

/// Every comparison of [`comparisons`] with `frame`.
pub fn hot_path(
    bed: &Bed,
    agent: &Path,
    frame: &[u8],
    options: &Options,
) -> anyhow::Result<Vec<HotRow>> {
    compare(bed, agent, frame, options, comparisons())
}

/// Every comparison of [`tap_comparisons`] with `frame`, on a bed whose `src0` is a tap.
pub fn tap_path(
    bed: &Bed,
    agent: &Path,
    frame: &[u8],
    options: &Options,
) -> anyhow::Result<Vec<HotRow>> {
    compare(bed, agent, frame, options, tap_comparisons())
}

fn compare(
    bed: &Bed,
    agent: &Path,
    frame: &[u8],
    options: &Options,
    comparisons: Vec<Comparison>,
) -> anyhow::Result<Vec<HotRow>> {
    let mut rows = Vec::new();
    for (reference, scenario, target_ratio, target_ns) in comparisons {
        eprintln!(
            "bench: {} paired with {}, {}-byte frames from the {:?}",
            scenario.name(),
            reference.name(),
            frame.len(),
            bed.source
        );
        let paired = pair_up(bed, agent, frame, options, &reference, &scenario)?;
        rows.push(HotRow {
            scenario: scenario.name(),
            reference: reference.name(),
            frame_bytes: frame.len(),
            median_ratio: paired.median_ratio,
            min_ratio: paired.min_ratio,
            max_ratio: paired.max_ratio,
            ratios: paired.ratios,
            completeness: paired.completeness,
            program_ns_per_packet: paired.program_ns_per_packet,
            isolated_ns_per_packet: paired.isolated_ns_per_packet,
            source: bed.source,
            reference_pps: paired.reference_pps,
            target_ratio,
            target_ns,
        });
    }
    Ok(rows)
}
