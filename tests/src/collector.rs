//! The collector as a child process, and its summary.
use std::{
    io::BufReader,
    process::{Child, Command, Stdio},
};

use super::{Netns, await_first_line, capture_file_frames};

/// `mirror-agent collect` running in a namespace, stopped with SIGINT.
#[derive(Debug)]
pub struct Collector {
    child: Child,
    file: std::path::PathBuf,
    /// The fresh directory of the file, when this made it.
    dir: Option<tempfile::TempDir>,
}

impl Collector {
    /// Starts the collector listening on `listen`, writing `file_name` in a fresh directory, and
    /// waits until it listens.
    pub fn start(
        ns: &Netns,
        binary: &std::path::Path,
        listen: &str,
        file_name: &str,
        extra: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut collector =
            Collector::start_at(ns, binary, listen, &dir.path().join(file_name), extra);
        collector.dir = Some(dir);
        collector
    }

    /// Starts the collector listening on `listen`, writing `file`, and waits until it listens.
    pub fn start_at(
        ns: &Netns,
        binary: &std::path::Path,
        listen: &str,
        file: &std::path::Path,
        extra: &[&str],
    ) -> Self {
        let file = file.to_path_buf();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(binary)
            .args([
                "collect",
                "--stats-interval",
                "0",
                "--listen",
                listen,
                "--write",
            ])
            .arg(&file)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn collector");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        await_first_line(&mut child, &mut stderr, "listening on", "collector");
        Collector {
            child,
            file,
            dir: None,
        }
    }

    /// The file it writes.
    pub fn file(&self) -> &std::path::Path {
        &self.file
    }

    /// SIGINT, wait for a clean exit, and return its summary.
    pub fn stop(mut self) -> CollectorSummary {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(i32::try_from(self.child.id()).expect("pid"), libc::SIGINT) };
        let mut out = String::new();
        std::io::Read::read_to_string(self.child.stdout.as_mut().expect("stdout"), &mut out)
            .expect("collector summary");
        let status = self.child.wait().expect("wait collector");
        assert!(status.success(), "collector exited with {status}: {out}");
        CollectorSummary {
            text: out,
            file: self.file.clone(),
            _dir: self.dir.take(),
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `mirror-agent collect` printed on exit, and the file it wrote.
#[derive(Debug)]
pub struct CollectorSummary {
    pub text: String,
    pub file: std::path::PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl CollectorSummary {
    /// The frames of the capture file (pcap or pcapng), in order, with the pcapng interface name.
    pub fn written(&self) -> Vec<(Option<String>, Vec<u8>)> {
        capture_file_frames(&self.file)
    }

    /// Frames received with this VXLAN VNI.
    pub fn vni_frames(&self, vni: u32) -> u64 {
        self.stream(&format!("vxlan:{vni}"), 1)
    }

    /// Frames received in a stream (`vxlan:7`, `geneve:7`, `gre`, `gre:5`, `erspan:3`).
    pub fn stream_frames(&self, stream: &str) -> u64 {
        self.stream(stream, 1)
    }

    /// Copies an ERSPAN stream lost, by its sequence numbers.
    pub fn stream_lost(&self, stream: &str) -> u64 {
        self.stream(stream, 3)
    }

    /// Column `column` of a stream's summary line (0 if the stream never came).
    fn stream(&self, stream: &str, column: usize) -> u64 {
        self.text
            .lines()
            .find_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                (words.first() == Some(&stream)).then(|| words.get(column)?.parse().ok())?
            })
            .unwrap_or(0)
    }

    /// A `name=value` field of the `streams` or the `dropped` line.
    pub fn dropped(&self, field: &str) -> u64 {
        ["streams ", "dropped "]
            .iter()
            .find_map(|line| self.field(line, field))
            .unwrap_or_else(|| panic!("no {field} in {}", self.text))
    }

    /// A `shadow` line's `name=value` field (`requests`, `replayed`, a reason lost, `same`…).
    pub fn shadow(&self, field: &str) -> u64 {
        self.field("shadow ", field)
            .unwrap_or_else(|| panic!("no shadow {field} in {}", self.text))
    }

    /// The `name=value` field of the line starting with `line`.
    fn field(&self, line: &str, field: &str) -> Option<u64> {
        self.text
            .lines()
            .filter(|l| l.starts_with(line))
            .flat_map(str::split_whitespace)
            .find_map(|w| w.strip_prefix(&format!("{field}=")))
            .and_then(|v| v.parse().ok())
    }
}
