//! The README's five-minute start, as a newcomer follows it: its commands, word for word but for
//! the build (the binary under test is built already), run in a namespace of the test's own, and
//! what the README says you will see is checked.
use std::{path::Path, process::Command};

use mirror_tests::{Netns, agent_binary, pcap_frames, require_root};

/// The shell blocks of the README's "Five minutes": what to run first, and after the agent's
/// line.
fn five_minutes() -> (String, String) {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let section = readme
        .split("\n## Five minutes\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a Five minutes section");
    let blocks: Vec<String> = section
        .split("```sh\n")
        .skip(1)
        .map(|block| {
            block
                .split("```")
                .next()
                .expect("a closed block")
                .to_owned()
        })
        .collect();
    let [first, then] = <[String; 2]>::try_from(blocks).expect("two blocks");
    (first, then)
}

/// The namespace the README's commands make, deleted whatever happens.
struct DemoNamespace;

impl Drop for DemoNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", "demo"]).status();
    }
}

#[test]
fn the_readmes_five_minutes_work_as_written() {
    require_root();
    let (first, then) = five_minutes();
    let waited_for =
        "mirror-agent: attached to 2 hook(s) for 1 session(s) on demo0 (ingress, egress)";
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    assert!(readme.contains(&format!("Wait for `{waited_for}`")));
    let binary = agent_binary();
    let binary = binary.to_str().expect("utf-8");
    let first: Vec<String> = first
        .lines()
        .filter(|line| !line.starts_with("cargo xtask build"))
        .map(|line| {
            line.replace("target/release/mirror-agent", binary)
                // The agent's line goes where the test can wait for it.
                .replace(" icmp &", " icmp >agent.out &")
        })
        .collect();
    assert!(
        first.iter().any(|l| l.contains(">agent.out &")),
        "{first:?}"
    );
    // One shell, as a person's terminal: the agent it starts is the one `wait` waits for.
    let script = format!(
        "set -e\n{}\nfor i in $(seq 300); do grep -qF '{waited_for}' agent.out && break; sleep 0.1; done\n\
         grep -qF '{waited_for}' agent.out\n{then}",
        first.join("\n")
    );
    let outer = Netns::new(format!("m{}-first", std::process::id()));
    let _demo = DemoNamespace;
    let dir = tempfile::tempdir().expect("temp dir");
    let output = Command::new("timeout")
        .args([
            "60",
            "ip",
            "netns",
            "exec",
            &outer.name,
            "bash",
            "-c",
            &script,
        ])
        .current_dir(dir.path())
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    // What the README says: two echo requests out of demo0 and the two replies, as tcpdump reads
    // them from the file; the agent wrote 4 copies and stopped.
    let lines: Vec<&str> = stdout.lines().filter(|l| l.contains("ICMP echo")).collect();
    let requests = lines
        .iter()
        .filter(|l| l.contains("10.99.0.1 > 10.99.0.2: ICMP echo request"));
    let replies = lines
        .iter()
        .filter(|l| l.contains("10.99.0.2 > 10.99.0.1: ICMP echo reply"));
    assert_eq!(
        (lines.len(), requests.count(), replies.count()),
        (4, 2, 2),
        "{stdout}\n{stderr}"
    );
    assert_eq!(pcap_frames(&dir.path().join("demo.pcap")).len(), 4);
    let report = std::fs::read_to_string(dir.path().join("agent.out")).expect("agent.out");
    assert!(report.contains(waited_for), "{report}");
    assert!(
        !Path::new("/run/netns/demo").exists(),
        "the README's last line deleted it"
    );
}
