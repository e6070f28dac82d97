//! What mirror's programs cost per packet, as the kernel measures it: run-time stats under the
//! bench's traffic, and a test run of one frame through the program alone.
use anyhow::Context as _;

use super::Bed;

/// Mean run time per packet of mirror's ingress program (TC or XDP, whichever ran), if one is
/// loaded. A copy is sent before the program returns, so this includes the clone and the copy
/// program at the target or underlay (cuts, tunnel headers), which runs nested inside it; the
/// copy program's own share is logged.
pub(super) fn program_cost() -> anyhow::Result<Option<f64>> {
    let mut ingress = None;
    let mut copy = None;
    for info in aya::programs::loaded_programs() {
        let info = info?;
        let per_run = |info: &aya::programs::ProgramInfo| {
            (info.run_count() > 0)
                .then(|| info.run_time().as_nanos() as f64 / info.run_count() as f64)
        };
        match info.name_as_str() {
            Some("mirror_tc_ingre" | "mirror_xdp") => ingress = ingress.or(per_run(&info)),
            Some("mirror_tc_copy") => copy = copy.or(per_run(&info)),
            _ => {}
        }
    }
    if let (Some(ingress), Some(copy)) = (ingress, copy) {
        eprintln!(
            "bench: {ingress:.0} ns per packet in the mirror program, of which {copy:.0} in the copy program"
        );
    }
    Ok(ingress)
}

/// `struct __sk_buff` as a test run takes it: its size, and where the interface index is.
const SK_BUFF_LEN: usize = 192;
const SK_BUFF_IFINDEX: usize = 40;

/// Mean time per packet of mirror's TC ingress program alone: the kernel's test run
/// (`BPF_PROG_TEST_RUN`, through bpftool) of `frame` a million times as if received by `src0`,
/// the least of [`TEST_RUNS`] such runs after one to warm up: on this VM a run that lands on a
/// busy moment (the agent just started) measures up to half again as much, and interference only
/// adds time.
/// Unlike the run-time stats it leaves out their own clock reads (about 87 ns a run on this VM),
/// though not the test loop's. Only for scenarios that copy nothing: a test run's copies would
/// leave as packets.
pub(super) fn isolated_program_cost(lab: &Bed, frame: &[u8]) -> anyhow::Result<Option<f64>> {
    let mut id = None;
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if info.name_as_str() == Some("mirror_tc_ingre") {
            id = Some(info.id());
        }
    }
    let Some(id) = id else {
        return Ok(None);
    };
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("frame");
    std::fs::write(&data, frame)?;
    let mut sk_buff = [0u8; SK_BUFF_LEN];
    sk_buff[SK_BUFF_IFINDEX..SK_BUFF_IFINDEX + 4]
        .copy_from_slice(&lab.node.ifindex("src0").to_ne_bytes());
    let ctx = dir.path().join("ctx");
    std::fs::write(&ctx, sk_buff)?;
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let mut least = f64::INFINITY;
    for run in 0..=TEST_RUNS {
        let output = lab.node.exec(&[
            "bpftool",
            "prog",
            "run",
            "id",
            &id.to_string(),
            "data_in",
            &path(&data),
            "ctx_in",
            &path(&ctx),
            "repeat",
            "1000000",
        ]);
        let ns: f64 = output
            .split("average): ")
            .nth(1)
            .and_then(|rest| rest.split("ns").next())
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("bpftool prog run said: {output}"))?;
        if run > 0 {
            least = least.min(ns);
        }
    }
    Ok(Some(least))
}

/// Test runs per measurement of a program alone (see [`isolated_program_cost`]).
const TEST_RUNS: usize = 5;
