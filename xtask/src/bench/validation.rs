//! How long `mirror-agent check` takes to validate large rule sets: the rule-count limit, the
//! bounded hidden-rule analysis and the table compiler, from the file to the plan (release build).
use std::{fmt::Write as _, path::Path, time::Instant};

use mirror_tests::Lab;
use serde::Serialize;

/// Validating one rule set, the median of a few runs.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationRow {
    pub case: &'static str,
    pub rules: usize,
    pub median_seconds: f64,
    pub max_seconds: f64,
}

/// The target: any rule set up to the limit validated in under this.
const TARGET_SECONDS: f64 = 2.0;
const RUNS: usize = 3;

/// A file with `sessions` sessions of `per_session` rules each on src0 → mir0; `identical` makes
/// every rule the same (each hides all later ones), else each rule has its own port and source.
fn rule_set(sessions: usize, per_session: usize, identical: bool) -> String {
    let mut text = String::from("stats_interval_secs = 0\n");
    for session in 0..sessions {
        let _ = write!(
            text,
            "[[session]]\nname = \"s{session}\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\ntarget = {{ interface = \"mir0\" }}\n"
        );
        for number in 1..=per_session {
            let (src, port) = if identical {
                ("10.0.0.0/8".to_owned(), 80)
            } else {
                (
                    format!(
                        "10.{}.{}.{}/32",
                        number >> 16,
                        (number >> 8) & 255,
                        number & 255
                    ),
                    number % 60_000 + 1,
                )
            };
            let _ = write!(
                text,
                "[[session.rule]]\nnumber = {number}\naction = \"mirror\"\nproto = \"tcp\"\nsrc = \"{src}\"\ndst_port = {port}\n"
            );
        }
    }
    text
}

/// Times `check` on 1,000 identical rules, 2,000 distinct ones and 16,380 (the limit less the
/// four default rules) in four sessions.
pub fn validation_timing(lab: &Lab, agent: &Path) -> anyhow::Result<Vec<ValidationRow>> {
    let cases = [
        ("identical rules, one session", 1, 1000, true),
        ("distinct rules, one session", 1, 2000, false),
        ("distinct rules, four sessions (the limit)", 4, 4095, false),
    ];
    let dir = tempfile::tempdir()?;
    let mut rows = Vec::new();
    for (case, sessions, per_session, identical) in cases {
        let file = dir.path().join("rules.toml");
        std::fs::write(&file, rule_set(sessions, per_session, identical))?;
        let file_arg = file.to_str().unwrap_or_default().to_owned();
        let mut seconds = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let started = Instant::now();
            let output = std::process::Command::new("ip")
                .args(["netns", "exec", &lab.node.name])
                .arg(agent)
                .args(["check", "--config", &file_arg])
                .output()?;
            seconds.push(started.elapsed().as_secs_f64());
            anyhow::ensure!(
                output.status.success(),
                "check failed on {case}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        seconds.sort_by(f64::total_cmp);
        rows.push(ValidationRow {
            case,
            rules: sessions * per_session,
            median_seconds: seconds[RUNS / 2],
            max_seconds: seconds[RUNS - 1],
        });
    }
    Ok(rows)
}

/// The table of [`validation_timing`].
pub fn validation_table(md: &mut String, rows: &[ValidationRow]) -> std::fmt::Result {
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "## Validation\n\n`mirror-agent check` from the file to the compiled plan, {RUNS} runs each.\n\n| rule set | rules | median | max |\n|---|---:|---:|---:|"
    )?;
    for row in rows {
        writeln!(
            md,
            "| {} | {} | {:.2} s | {:.2} s |",
            row.case, row.rules, row.median_seconds, row.max_seconds
        )?;
    }
    writeln!(md)
}

/// Whether every rule set was validated in under [`TARGET_SECONDS`].
pub fn validation_targets(rows: &[ValidationRow]) -> String {
    let Some(slowest) = rows.iter().map(|r| r.max_seconds).max_by(f64::total_cmp) else {
        return String::new();
    };
    format!(
        "- any rule set up to 16,384 rules validated in < {TARGET_SECONDS} s: {slowest:.2} s at most — {}\n",
        if slowest < TARGET_SECONDS {
            "met"
        } else {
            "missed"
        }
    )
}
