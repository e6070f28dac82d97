//! Two scenarios measured in pairs, one right after the other (reference, scenario, reference,
//! scenario, ...): the machine's drift hits both sides of a pair alike, so the paired ratios are
//! steadier than ratios of medians taken minutes apart.
use std::{path::Path, time::Duration};

use anyhow::Context as _;

use super::{
    Bed, Options, Scenario, activate,
    cost::{isolated_program_cost, program_cost},
    generate, median, sample_once, warm_up,
};

/// Pairs at least, whatever `--reps` says.
const MIN_PAIRS: usize = 5;

/// What a paired comparison found.
pub struct Paired {
    /// Forwarded pps of the scenario over the reference's, per pair.
    pub ratios: Vec<f64>,
    pub median_ratio: f64,
    pub min_ratio: f64,
    pub max_ratio: f64,
    /// The reference's forwarded pps, median over the pairs.
    pub reference_pps: f64,
    /// Median share of copies received, where the scenario copies every packet.
    pub completeness: Option<f64>,
    /// The scenario's mirror program, mean run time per packet (kernel run-time stats), ns.
    pub program_ns_per_packet: Option<f64>,
    /// The same program alone, by a test run of the frame (scenarios that copy nothing), ns.
    pub isolated_ns_per_packet: Option<f64>,
}

/// `scenario` against `reference` in pairs of max-rate runs, then the scenario's program cost.
pub fn pair_up(
    lab: &Bed,
    agent: &Path,
    frame: &[u8],
    options: &Options,
    reference: &Scenario,
    scenario: &Scenario,
) -> anyhow::Result<Paired> {
    let duration = Duration::from_secs_f64(options.seconds);
    let pairs = options.reps.max(MIN_PAIRS);
    let mut ratios = Vec::with_capacity(pairs);
    let mut completeness = Vec::with_capacity(pairs);
    let mut reference_pps = Vec::with_capacity(pairs);
    for _ in 0..pairs {
        let theirs = {
            let _active = activate(lab, agent, reference)?;
            warm_up(lab, frame)?;
            sample_once(lab, reference, frame, duration)?
        };
        let ours = {
            let _active = activate(lab, agent, scenario)?;
            warm_up(lab, frame)?;
            sample_once(lab, scenario, frame, duration)?
        };
        ratios.push(ours.pps / theirs.pps);
        reference_pps.push(theirs.pps);
        completeness.extend(ours.completeness);
    }
    let program_ns_per_packet = {
        let _active = activate(lab, agent, scenario)?;
        let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
            .context("enabling BPF run-time stats")?;
        generate(lab, lab.source, frame, duration, None, 50_000_000)?;
        program_cost()?
    };
    let isolated_ns_per_packet = if scenario.copies_nothing() {
        let _active = activate(lab, agent, scenario)?;
        isolated_program_cost(lab, frame)?
    } else {
        None
    };
    let mut sorted = ratios.clone();
    Ok(Paired {
        median_ratio: median(&mut sorted),
        min_ratio: sorted[0],
        max_ratio: sorted[sorted.len() - 1],
        ratios,
        reference_pps: median(&mut reference_pps),
        completeness: (!completeness.is_empty()).then(|| median(&mut completeness)),
        program_ns_per_packet,
        isolated_ns_per_packet,
    })
}
