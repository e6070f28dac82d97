//! How long a capture takes to start: the quick form (`mirror-agent run -i src0 -w FILE udp`) until
//! it says it is attached, beside tcpdump (`tcpdump -i src0 -w FILE udp`) until it says it is
//! listening. A packet sent before that is not captured by either. Runs interleaved.
use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use mirror_tests::Lab;
use serde::Serialize;

/// Starting one capture, the median of a few runs.
#[derive(Debug, Clone, Serialize)]
pub struct StartupRow {
    pub command: String,
    pub median_seconds: f64,
    pub max_seconds: f64,
}

/// The target: the quick form attached within this.
const TARGET_SECONDS: f64 = 0.3;
const RUNS: usize = 5;

/// A capture command, and the line (on stdout or stderr) that says it captures.
struct Starter {
    command: Vec<String>,
    ready: &'static str,
    on_stdout: bool,
}

/// The time to attach of the quick form, both directions and one, and of tcpdump.
pub fn startup_timing(lab: &Lab, agent: &Path) -> anyhow::Result<Vec<StartupRow>> {
    let dir = tempfile::tempdir()?;
    let file = |name: &str| dir.path().join(name).display().to_string();
    let agent = agent.display().to_string();
    let starters = [
        Starter {
            command: vec![
                agent.clone(),
                "run".into(),
                "-i".into(),
                "src0".into(),
                "-w".into(),
                file("agent.pcap"),
                "udp".into(),
            ],
            ready: "attached to",
            on_stdout: true,
        },
        Starter {
            command: vec![
                agent,
                "run".into(),
                "-i".into(),
                "src0".into(),
                "-Q".into(),
                "in".into(),
                "-w".into(),
                file("agent-in.pcap"),
                "udp".into(),
            ],
            ready: "attached to",
            on_stdout: true,
        },
        Starter {
            command: vec![
                "tcpdump".into(),
                "-i".into(),
                "src0".into(),
                "-w".into(),
                file("tcpdump.pcap"),
                "udp".into(),
            ],
            ready: "listening on",
            on_stdout: false,
        },
    ];
    let mut seconds = vec![Vec::with_capacity(RUNS); starters.len()];
    for _ in 0..RUNS {
        for (starter, times) in starters.iter().zip(&mut seconds) {
            times.push(time_to_ready(lab, starter)?);
            // Each run writes a new file: none is left for the next to number past.
            for entry in std::fs::read_dir(dir.path())? {
                std::fs::remove_file(entry?.path())?;
            }
        }
    }
    Ok(starters
        .iter()
        .zip(seconds)
        .map(|(starter, mut times)| {
            times.sort_by(f64::total_cmp);
            let shown: Vec<&str> = starter
                .command
                .iter()
                .map(|word| {
                    if word.starts_with('/') {
                        word.rsplit('/').next().unwrap_or(word)
                    } else {
                        word
                    }
                })
                .collect();
            StartupRow {
                command: shown.join(" "),
                median_seconds: times[RUNS / 2],
                max_seconds: times[RUNS - 1],
            }
        })
        .collect())
}

/// Starts `capture` in the lab's node and times it until its ready line; then stops it.
fn time_to_ready(lab: &Lab, capture: &Starter) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.node.name])
        .args(&capture.command)
        .stdout(if capture.on_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(if capture.on_stdout {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .spawn()?;
    let output: Box<dyn std::io::Read> = if capture.on_stdout {
        Box::new(child.stdout.take().expect("piped"))
    } else {
        Box::new(child.stderr.take().expect("piped"))
    };
    let ready = BufReader::new(output)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.contains(capture.ready));
    let elapsed = started.elapsed().as_secs_f64();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id().cast_signed(), libc::SIGINT) };
    let status = child.wait()?;
    anyhow::ensure!(
        ready && status.success(),
        "{:?} never said `{}` ({status})",
        capture.command,
        capture.ready
    );
    Ok(elapsed)
}

/// The table of [`startup_timing`].
pub fn startup_table(md: &mut String, rows: &[StartupRow]) -> std::fmt::Result {
    if rows.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "## Time to capture\n\nFrom the command's start to its \"attached\" (mirror-agent) or \"listening\" (tcpdump) line, {RUNS} runs each, interleaved.\n\n| command | median | max |\n|---|---:|---:|"
    )?;
    for row in rows {
        writeln!(
            md,
            "| `{}` | {:.3} s | {:.3} s |",
            row.command, row.median_seconds, row.max_seconds
        )?;
    }
    writeln!(md)
}

/// Whether the quick form attached within [`TARGET_SECONDS`].
pub fn startup_targets(rows: &[StartupRow]) -> String {
    let Some(quick) = rows.first() else {
        return String::new();
    };
    let tcpdump = rows.last().map_or(0.0, |row| row.median_seconds);
    format!(
        "- the quick form attached in ≤ {TARGET_SECONDS} s: {:.3} s (tcpdump listening after {tcpdump:.3} s) — {}\n",
        quick.median_seconds,
        if quick.median_seconds <= TARGET_SECONDS {
            "met"
        } else {
            "missed"
        }
    )
}
