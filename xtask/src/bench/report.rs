//! Bench output: a markdown table, the raw JSON, and a PNG chart, in bench/results/.
use std::{fmt::Write as _, time::Duration};

use anyhow::Context as _;
use plotters::prelude::*;
use serde::Serialize;

use super::{AttachRow, HotRow, Options, PairedRow, PodRow, Row, Scenario};

/// The font the chart's text is drawn with (Debian's fonts-dejavu-core).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

#[derive(Debug, Serialize)]
struct Machine {
    date: String,
    kernel: String,
    cpu: String,
    cpus: usize,
    memory: String,
    commit: String,
}

#[derive(Debug, Serialize)]
struct Results<'a> {
    machine: Machine,
    reps: usize,
    seconds_per_rep: f64,
    fixed_rate_pps: u64,
    rows: &'a [Row],
    #[serde(flatten)]
    extra: &'a Extra<'a>,
}

/// The measurements beside the throughput rows.
#[derive(Debug, Serialize)]
pub struct Extra<'a> {
    pub attach: &'a [AttachRow],
    pub pods: &'a [PodRow],
    pub tunnels: &'a [PairedRow],
    pub hot: &'a [HotRow],
    pub validation: &'a [super::ValidationRow],
    pub startup: &'a [super::StartupRow],
    pub shadow: &'a [super::ShadowRow],
}

fn command(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Machine {
        date: command("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        kernel: command("uname", &["-r"]),
        cpu: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default(),
        cpus: cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count(),
        memory: meminfo
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("MemTotal:")
            .trim()
            .to_owned(),
        commit: command("git", &["rev-parse", "--short", "HEAD"]),
    }
}

fn find<'a>(rows: &'a [Row], size: usize, name: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.frame_bytes == size && r.scenario == name)
}

fn ratio(row: &Row, reference: Option<&Row>) -> String {
    reference.map_or("-".into(), |r| {
        format!("{:.3}x", row.median_pps / r.median_pps)
    })
}

fn opt(value: Option<f64>, format: impl Fn(f64) -> String) -> String {
    value.map_or("-".into(), format)
}

/// The attach-scaling and pod-selector tables.
fn scaling_tables(md: &mut String, attach: &[AttachRow], pods: &[PodRow]) -> std::fmt::Result {
    if !attach.is_empty() {
        writeln!(
            md,
            "## Attach scaling\n\n| interfaces | hooks | time to attach | agent RSS |\n|---:|---:|---:|---:|"
        )?;
        for row in attach {
            writeln!(
                md,
                "| {} | {} | {:.2} s | {:.1} MB |",
                row.interfaces,
                row.interfaces * 2,
                row.seconds,
                row.agent_rss_kib as f64 / 1024.0
            )?;
        }
        writeln!(md)?;
    }
    if pods.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "## Pod-selector sessions\n\nPods selected by labels, each a veth with a /32 route, listed by the stand-in API server: time from the agent's start until every pod's veth is attached (list, placing, attaching), and from the API reporting one more pod until its veth is attached.\n\n| pods | hooks | start | one more pod | agent RSS |\n|---:|---:|---:|---:|---:|"
    )?;
    for row in pods {
        writeln!(
            md,
            "| {} | {} | {:.2} s | {:.0} ms | {:.1} MB |",
            row.pods,
            row.pods * 2,
            row.start_seconds,
            row.new_pod_seconds * 1000.0,
            row.agent_rss_kib as f64 / 1024.0
        )?;
    }
    Ok(())
}

/// Per frame size, the throughput of every scenario measured.
fn throughput_tables(md: &mut String, rows: &[Row], options: &Options) -> std::fmt::Result {
    // A partial run (`--only`) shows only what it measured.
    for &size in options
        .frame_sizes
        .iter()
        .filter(|&&size| rows.iter().any(|r| r.frame_bytes == size))
    {
        let baseline = find(rows, size, "baseline (no mirroring)");
        let mirred = find(rows, size, "tc u32 match-all + mirred");
        writeln!(md, "## {size}-byte frames\n")?;
        writeln!(
            md,
            "| scenario | forwarded pps (median) | min–max | vs baseline | vs tc mirred | copies received | CPU ns/pkt | program ns/pkt | agent RSS |"
        )?;
        writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        for row in rows.iter().filter(|r| r.frame_bytes == size) {
            let cpu = match (row.cpu_ns_per_packet, row.fixed_rate_sustained) {
                (Some(ns), Some(true)) => format!("{ns:.0}"),
                (Some(ns), _) => format!("{ns:.0} (rate not sustained)"),
                _ => "-".into(),
            };
            writeln!(
                md,
                "| {} | {:.0} | {:.0}–{:.0} | {} | {} | {} | {} | {} | {} |",
                row.scenario,
                row.median_pps,
                row.min_pps,
                row.max_pps,
                ratio(row, baseline),
                ratio(row, mirred),
                opt(row.completeness, |c| format!("{:.2}%", c * 100.0)),
                cpu,
                opt(row.program_ns_per_packet, |n| format!("{n:.0}")),
                row.agent_rss_kib
                    .map_or("-".into(), |k| format!("{:.1} MB", k as f64 / 1024.0)),
            )?;
        }
        writeln!(md)?;
    }
    Ok(())
}

pub fn write(
    rows: &[Row],
    extra: &Extra<'_>,
    options: &Options,
    took: Duration,
) -> anyhow::Result<()> {
    let Extra {
        attach,
        pods,
        tunnels,
        hot,
        validation,
        startup,
        shadow,
    } = *extra;
    let machine = machine();
    let dir = crate::root().join("bench/results");
    std::fs::create_dir_all(&dir)?;
    let stem = machine.date.replace(':', "");
    let mut md = String::new();
    writeln!(md, "# mirror benchmark, {}\n", machine.date)?;
    writeln!(
        md,
        "Machine: {} CPU(s), {}, {} memory, Linux {}; commit {}. {} repetitions of {} s per scenario \
         and frame size (median, min–max); CPU cost at {} pps offered; the run took {:.0} s.\n",
        machine.cpus,
        machine.cpu,
        machine.memory,
        machine.kernel,
        machine.commit,
        options.reps,
        options.seconds,
        options.fixed_rate,
        took.as_secs_f64()
    )?;
    throughput_tables(&mut md, rows, options)?;
    scaling_tables(&mut md, attach, pods)?;
    tunnel_table(&mut md, tunnels)?;
    hot_table(&mut md, hot)?;
    super::validation::validation_table(&mut md, validation)?;
    super::startup::startup_table(&mut md, startup)?;
    super::shadow::shadow_table(&mut md, shadow)?;
    writeln!(
        md,
        "\n## Targets\n\n{}{}{}{}{}{}{}",
        targets(rows, attach, pods, options),
        hot_targets(hot),
        tap_targets(hot),
        tunnel_targets(tunnels),
        super::validation::validation_targets(validation),
        super::startup::startup_targets(startup),
        super::shadow::shadow_targets(shadow)
    )?;
    if !rows.is_empty() {
        writeln!(
            md,
            "\n## The XDP path against the TC path\n\n{}",
            xdp_against_tc(rows, options)
        )?;
        writeln!(
            md,
            "![throughput per scenario and rule scaling]({stem}.png)"
        )?;
    }
    std::fs::write(dir.join(format!("{stem}.md")), &md)?;
    let results = Results {
        machine,
        reps: options.reps,
        seconds_per_rep: options.seconds,
        fixed_rate_pps: options.fixed_rate,
        rows,
        extra,
    };
    std::fs::write(
        dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&results)?,
    )?;
    if rows.is_empty() {
        println!("{md}");
        println!("written: bench/results/{stem}.{{md,json}}");
        return Ok(());
    }
    chart(rows, options, &dir.join(format!("{stem}.png")))?;
    println!("{md}");
    println!("written: bench/results/{stem}.{{md,json,png}}");
    Ok(())
}

/// The paired tunnel comparison: each format against `tc mirred` into a vxlan device.
fn tunnel_table(md: &mut String, tunnels: &[PairedRow]) -> std::fmt::Result {
    if tunnels.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "## Tunnels against tc mirred into a vxlan device (paired)\n\nEach pair is a run of `tc mirred` into a vxlan device and then a run of mirror into the format, one after the other; the ratio is of their forwarded pps.\n\n| format | frame | pairs | paired ratio (median) | min–max | copies received | program ns/pkt (clone and copy program included) |\n|---|---:|---:|---:|---:|---:|---:|"
    )?;
    for row in tunnels {
        writeln!(
            md,
            "| {} | {} B | {} | {:.3}x | {:.3}–{:.3} | {:.2}% | {} |",
            row.format,
            row.frame_bytes,
            row.ratios.len(),
            row.median_ratio,
            row.min_ratio,
            row.max_ratio,
            row.completeness * 100.0,
            opt(row.program_ns_per_packet, |n| format!("{n:.0}")),
        )?;
    }
    writeln!(md)
}

/// The hot path's comparisons (see `hotpath`).
fn hot_table(md: &mut String, hot: &[HotRow]) -> std::fmt::Result {
    if hot.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "## The hot path (paired)\n\nEach pair is a run of the reference and then a run of the scenario, one after the other; the ratio is of their forwarded pps. Frames come from the source namespace's veth, or are written to the node's tap `src0` (tun's native XDP). Program ns/pkt is the kernel's run-time stats of mirror's program under the traffic (on this VM a program that returns at once measures about 87 ns: the accounting itself); alone is the kernel's test run of the same frame at `src0` (`bpftool prog run`, a million repetitions, the least of five runs), which leaves the accounting out, for the scenarios that copy nothing.\n\n| scenario | reference | frames from | frame | pairs | reference pps | paired ratio (median) | min–max | copies received | program ns/pkt | alone ns/pkt |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for row in hot {
        writeln!(
            md,
            "| {} | {} | {:?} | {} B | {} | {:.0} | {:.3}x | {:.3}–{:.3} | {} | {} | {} |",
            row.scenario,
            row.reference,
            row.source,
            row.frame_bytes,
            row.ratios.len(),
            row.reference_pps,
            row.median_ratio,
            row.min_ratio,
            row.max_ratio,
            opt(row.completeness, |c| format!("{:.2}%", c * 100.0)),
            opt(row.program_ns_per_packet, |n| format!("{n:.0}")),
            opt(row.isolated_ns_per_packet, |n| format!("{n:.0}")),
        )?;
    }
    writeln!(md)
}

/// Each hot-path comparison's target, met or missed.
fn hot_targets(hot: &[HotRow]) -> String {
    let mut out = String::new();
    for row in hot {
        let Some(target_ratio) = row.target_ratio else {
            continue;
        };
        let _ = writeln!(
            out,
            "- {} B from the {:?}: {} ≥ {:.2}x {}{}: {:.3}x (paired median, {:.3}–{:.3}){}{} — {}",
            row.frame_bytes,
            row.source,
            row.scenario,
            target_ratio,
            row.reference,
            row.target_ns
                .map(|ns| format!(", program alone ≤ {ns:.0} ns/pkt"))
                .unwrap_or_default(),
            row.median_ratio,
            row.min_ratio,
            row.max_ratio,
            match (row.program_ns_per_packet, row.isolated_ns_per_packet) {
                (Some(n), Some(alone)) => format!(", {n:.0} ns/pkt ({alone:.0} alone)"),
                (Some(n), None) => format!(", {n:.0} ns/pkt"),
                _ => String::new(),
            },
            row.completeness
                .map(|c| format!(", {:.2}% copies", c * 100.0))
                .unwrap_or_default(),
            if row.met() { "met" } else { "missed" }
        );
    }
    out
}

/// On the tap: the XDP path ahead of the TC path (their paired ratios against no mirroring),
/// and the reference rate the XDP target asks for.
fn tap_targets(hot: &[HotRow]) -> String {
    let mut out = String::new();
    let on_tap = |name: &str, size: usize| {
        hot.iter().find(|r| {
            r.source == super::traffic::Source::Tap && r.scenario == name && r.frame_bytes == size
        })
    };
    let sizes: std::collections::BTreeSet<usize> = hot.iter().map(|r| r.frame_bytes).collect();
    for size in sizes {
        let (Some(xdp), Some(tc)) = (
            on_tap(&Scenario::MirrorXdp { vxlan: false }.name(), size),
            on_tap(&Scenario::MirrorAll.name(), size),
        ) else {
            continue;
        };
        let _ = writeln!(
            out,
            "- {size} B from the Tap: the XDP path ahead of the TC path: {:.3}x against {:.3}x of no mirroring — {}",
            xdp.median_ratio,
            tc.median_ratio,
            if xdp.median_ratio > tc.median_ratio {
                "met"
            } else {
                "missed"
            }
        );
        let _ = writeln!(
            out,
            "- {size} B from the Tap: no mirroring at 200k pps or more (the XDP target's rate): {:.0} pps — {}",
            xdp.reference_pps,
            if xdp.reference_pps >= 200_000.0 {
                "met"
            } else {
                "missed"
            }
        );
    }
    out
}

/// The tunnel target: at least 1.2x tc mirred into vxlan, with every copy received.
fn tunnel_targets(tunnels: &[PairedRow]) -> String {
    let mut out = String::new();
    for row in tunnels {
        let met = row.median_ratio >= 1.2 && row.completeness >= 1.0;
        let _ = writeln!(
            out,
            "- {} B: mirror into {} ≥ 1.2x tc mirred into vxlan, 100% copies: {:.3}x (paired median, {:.3}–{:.3}), {:.2}% copies — {}",
            row.frame_bytes,
            row.format,
            row.median_ratio,
            row.min_ratio,
            row.max_ratio,
            row.completeness * 100.0,
            if met { "met" } else { "missed" }
        );
    }
    out
}

/// Where XDP sessions (copies through the ring, sent by the agent) beat or lose to TC sessions
/// (clones in the kernel), on forwarded pps and on copies made.
fn xdp_against_tc(rows: &[Row], options: &Options) -> String {
    let mut out = String::new();
    for &size in &options.frame_sizes {
        let get = |name: &str| find(rows, size, name);
        for (xdp, tc) in [
            ("mirror XDP to interface", "mirror TC, 100% match"),
            ("mirror XDP into vxlan", "mirror TC into vxlan"),
        ] {
            let (Some(xdp_row), Some(tc_row)) = (get(xdp), get(tc)) else {
                continue;
            };
            let r = xdp_row.median_pps / tc_row.median_pps;
            let copies = |row: &Row| row.completeness.unwrap_or(0.0) * 100.0;
            let _ = writeln!(
                out,
                "- {size} B: {xdp}: {r:.3}x the forwarded pps of {tc} ({}), copies {:.2}% against {:.2}%",
                if r >= 1.0 { "beats it" } else { "loses" },
                copies(xdp_row),
                copies(tc_row)
            );
        }
    }
    out
}

fn targets(rows: &[Row], attach: &[AttachRow], pods: &[PodRow], options: &Options) -> String {
    let mut out = String::new();
    let mut line = |what: &str, value: String, met: bool| {
        let _ = writeln!(
            out,
            "- {what}: {value} — {}",
            if met { "met" } else { "missed" }
        );
    };
    for &size in &options.frame_sizes {
        let get = |name: &str| find(rows, size, name);
        if let (Some(mirror), Some(mirred)) = (
            get("mirror TC, 100% match"),
            get("tc u32 match-all + mirred"),
        ) {
            let r = mirror.median_pps / mirred.median_pps;
            let complete = mirror.completeness.unwrap_or(0.0);
            line(
                &format!("{size} B: mirror ≥ 1.0x tc mirred with 100% copies"),
                format!("{r:.3}x, {:.2}% copies", complete * 100.0),
                r >= 1.0 && complete >= 1.0,
            );
        }
        if let Some(full) = get("mirror TC, 100% match") {
            for name in [
                "mirror TC, sampled 1/100",
                "mirror TC, rate-limited 1000 pps",
            ] {
                if let Some(controlled) = get(name) {
                    let r = controlled.median_pps / full.median_pps;
                    line(
                        &format!("{size} B: {name} ≥ 0.98x the unlimited mirror's forwarded pps"),
                        format!("{r:.3}x"),
                        r >= 0.98,
                    );
                }
            }
        }
        if let (Some(nomatch), Some(baseline)) =
            (get("mirror TC, no match"), get("baseline (no mirroring)"))
        {
            let overhead = 1.0 - nomatch.median_pps / baseline.median_pps;
            line(
                &format!("{size} B: non-matching overhead ≤ 5% of baseline"),
                format!("{:.1}%", overhead * 100.0),
                overhead <= 0.05,
            );
        }
        let most = options.rule_counts.iter().max().copied().unwrap_or(1);
        if let (Some(many), Some(one)) = (
            get(&format!("mirror TC, {most} rules")),
            get("mirror TC, 100% match"),
        ) {
            let r = many.median_pps / one.median_pps;
            line(
                &format!("{size} B: {most} rules ≥ 0.95x the 1-rule throughput"),
                format!("{r:.3}x"),
                r >= 0.95,
            );
        }
    }
    if let Some(row) = attach.iter().max_by_key(|r| r.interfaces) {
        line(
            &format!("{} interfaces attached in < 5 s", row.interfaces),
            format!("{:.2} s", row.seconds),
            row.seconds < 5.0,
        );
    }
    let rss = rows
        .iter()
        .filter_map(|r| r.agent_rss_kib)
        .chain(attach.iter().map(|r| r.agent_rss_kib))
        .chain(pods.iter().map(|r| r.agent_rss_kib))
        .max();
    if let Some(rss) = rss {
        line(
            "agent RSS < 50 MB (largest seen)",
            format!("{:.1} MB", rss as f64 / 1024.0),
            rss < 50 * 1024,
        );
    }
    out
}

fn chart(rows: &[Row], options: &Options, path: &std::path::Path) -> anyhow::Result<()> {
    let font = std::fs::read(FONT).with_context(|| format!("{FONT} (fonts-dejavu-core)"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("bad font {FONT}"))?;
    let root = BitMapBackend::new(path, (1400, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let (left, right) = root.split_horizontally(800);
    let size = options.frame_sizes[0];
    throughput_panel(&left, rows, size)?;
    scaling_panel(&right, rows, options, size)?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {error}")
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "plotters' label formatter signature"
)]
fn thousands(v: &f64) -> String {
    format!("{:.0}k", v / 1000.0)
}

/// Forwarded pps per scenario (one rule where rules count), as horizontal bars.
fn throughput_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    rows: &[Row],
    size: usize,
) -> anyhow::Result<()> {
    let bars: Vec<&Row> = rows
        .iter()
        .filter(|r| r.frame_bytes == size && r.rules.is_none_or(|n| n == 1))
        .collect();
    let top = bars.iter().map(|r| r.max_pps).fold(1.0, f64::max) * 1.1;
    // Horizontal bars: the scenario names read on the left, one per bar.
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("forwarded pps, {size}-byte frames (median; line: min-max)"),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(220)
        .build_cartesian_2d(0.0..top, (0..bars.len()).into_segmented())
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_label_formatter(&thousands)
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => {
                bars.get(*i).map(|r| r.scenario.clone()).unwrap_or_default()
            }
            _ => String::new(),
        })
        .y_label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, r)| {
            let mut bar = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (r.median_pps, SegmentValue::Exact(i + 1)),
                ],
                BLUE.mix(0.6).filled(),
            );
            bar.set_margin(6, 6, 0, 0);
            bar
        }))
        .map_err(plot_error)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, r)| {
            PathElement::new(
                vec![
                    (r.min_pps, SegmentValue::CenterOf(i)),
                    (r.max_pps, SegmentValue::CenterOf(i)),
                ],
                BLACK.stroke_width(2),
            )
        }))
        .map_err(plot_error)?;

    Ok(())
}

/// Forwarded pps against the number of rules, for mirror and tc u32.
fn scaling_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    rows: &[Row],
    options: &Options,
    size: usize,
) -> anyhow::Result<()> {
    let max_rules = options
        .rule_counts
        .iter()
        .max()
        .copied()
        .unwrap_or(1)
        .max(2) as f64;
    let scaling_top = rows
        .iter()
        .filter(|r| r.frame_bytes == size && r.rules.is_some())
        .map(|r| r.max_pps)
        .fold(1.0, f64::max)
        * 1.1;
    let mut scaling = ChartBuilder::on(area)
        .caption(
            format!("rule scaling, {size}-byte frames"),
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1.0..max_rules * 1.5).log_scale(), 0.0..scaling_top)
        .map_err(plot_error)?;
    scaling
        .configure_mesh()
        .x_desc("rules")
        .y_desc("forwarded pps")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&thousands)
        .draw()
        .map_err(plot_error)?;
    for (prefix, color) in [("mirror TC", RED), ("tc u32", BLUE)] {
        let points: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.frame_bytes == size && r.scenario.starts_with(prefix))
            .filter_map(|r| Some((r.rules? as f64, r.median_pps)))
            .collect();
        scaling
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(plot_error)?
            .label(prefix)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    scaling
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}
