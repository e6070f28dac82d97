//! `cargo xtask lab`: the demo. Builds the test topology (see the mirror-tests crate) with a
//! collector namespace, runs the agent on examples/lab.toml, sends real traffic, and shows what
//! arrived on the mirror interface (tcpdump), at the VXLAN collector (`mirror-agent collect`, its
//! file decoded by tshark) and in the XDP session's pcapng file (tshark).
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use mirror_tests::{
    Agent, Capture, Collector, Lab, SINK_V4, SINK_V6, SRC_V4, SRC_V6, is_sentinel, udp_socket,
};

pub fn run(agent_binary: &Path, json: bool) -> anyhow::Result<()> {
    let config_path = crate::root().join("examples/lab.toml");
    let config = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    println!("== mirror lab ==");
    let lab = Lab::with_collector("lab", 1600);
    println!(
        "namespaces: {} → {} → {}; copies go out of mir0 to {}/eth0, and in VXLAN over ul0 to {}",
        lab.src.name,
        lab.node.name,
        lab.sink.name,
        lab.mon.name,
        lab.col().name
    );
    println!("config: {}\n", config_path.display());
    let collector = Collector::start(
        lab.col(),
        agent_binary,
        "0.0.0.0:4789",
        "lab.pcapng",
        &["--tap", "tap0"],
    );
    let collected = Capture::open(lab.col(), "tap1");
    println!(
        "collector listening on 192.0.2.2:4789 in {}",
        lab.col().name
    );
    let agent = Agent::start(&lab.node, agent_binary, &config);
    println!("agent running in {}", lab.node.name);

    let (mut tcpdump, lines) = start_tcpdump(&lab)?;

    println!(
        "\nsending: UDP to ports 5552, 5553 (skipped by a skip rule), 5554 over IPv4 and IPv6, 5600 (no rule); a TCP exchange on port 8443"
    );
    send_traffic(&lab)?;
    println!(
        "\ncopies seen by tcpdump on the mirror side ({}/eth0):",
        lab.mon.name
    );
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(10))
            .context("tcpdump went quiet before the end-of-demo marker")?;
        println!("  {line}");
        if line.contains(".9: UDP") {
            break;
        }
    }
    let _ = tcpdump.kill();
    let _ = tcpdump.wait();
    // The collector handles datagrams in order: once the marker is out of its tap, it has all.
    collected.until_nth(1, is_sentinel);
    let summary = collector.stop();
    println!("\nthe VXLAN collector's summary:\n{}", summary.text);
    println!("its file, decoded by tshark:");
    print_decoded(&summary.file)?;
    let report = agent.stop().json();
    if json {
        println!(
            "\nagent stopped; its final counters (`run --json`):\n{}",
            serde_json::to_string_pretty(&report)?
        );
    } else {
        println!(
            "\nagent stopped; its counters per session (`cargo xtask lab --json`: all of them):\n{}",
            session_table(&report)
        );
    }
    // The XDP session's file, complete once the agent has stopped.
    let xdp_file = "/tmp/mirror-lab-xdp.pcapng";
    println!("the XDP session's file ({xdp_file}, what sink0 received), decoded by tshark:");
    print_decoded(Path::new(xdp_file))?;
    let _ = std::fs::remove_file(xdp_file);
    println!("namespaces removed. Run `mirror-agent run --help` for the quick CLI form.");
    Ok(())
}

/// tcpdump on the mirror side, listening once this returns; its lines as they come.
fn start_tcpdump(lab: &Lab) -> anyhow::Result<(std::process::Child, mpsc::Receiver<String>)> {
    let mut tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.mon.name,
            "tcpdump",
            "-l",
            "-nn",
            "-e",
            "-i",
            "eth0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tcpdump (cargo xtask setup installs it)")?;
    let mut stderr = BufReader::new(tcpdump.stderr.take().context("tcpdump stderr")?);
    // Wait for tcpdump to say it is listening, so that no copy is sent before it captures.
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        if stderr.read_line(&mut line)? == 0 {
            bail!("tcpdump exited before it started listening");
        }
    }
    let (lines_tx, lines) = mpsc::channel();
    let stdout = tcpdump.stdout.take().context("tcpdump stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    Ok((tcpdump, lines))
}

/// The report's sessions as `mirror-agent stats` shows them: packets seen (decided), skipped (by
/// a skip rule or the default), mirrored, and copies not sent.
fn session_table(report: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "  {:<12} {:>6} {:>8} {:>9} {:>9}\n",
        "session", "seen", "skipped", "mirrored", "not_sent"
    );
    let count = |value: &serde_json::Value| value.as_u64().unwrap_or(0);
    for session in report["stats"]["sessions"].as_array().into_iter().flatten() {
        let counters = &session["counters"];
        let skipped: u64 = session["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|rule| rule["action"] == "skip")
            .map(|rule| count(&rule["counters"]["matched"]))
            .sum();
        let not_sent: u64 = mirror_common::Counters::FIELDS
            .iter()
            .filter(|field| field.metric == mirror_common::Metric::NotSent)
            .map(|field| count(&counters[field.name]))
            .sum();
        let _ = writeln!(
            out,
            "  {:<12} {:>6} {:>8} {:>9} {:>9}",
            session["name"].as_str().unwrap_or("?"),
            count(&counters["matched"]),
            skipped,
            count(&counters["mirrored"]),
            not_sent
        );
    }
    out
}

/// Prints a capture file as tshark decodes it, one packet a line.
fn print_decoded(file: &Path) -> anyhow::Result<()> {
    let decoded = Command::new("tshark")
        .arg("-r")
        .arg(file)
        .output()
        .context("running tshark (cargo xtask setup installs it)")?;
    for line in String::from_utf8_lossy(&decoded.stdout).lines() {
        println!("  {line}");
    }
    Ok(())
}

fn send_traffic(lab: &Lab) -> anyhow::Result<()> {
    mirror_tests::pin_to_first_cpu();
    let v4 = udp_socket(&lab.src, SocketAddr::new(SRC_V4.into(), 0));
    let v6 = udp_socket(&lab.src, SocketAddr::new(SRC_V6.into(), 0));
    for port in [5552, 5553, 5554, 5600] {
        v4.send_to(format!("hello on {port}").as_bytes(), (SINK_V4, port))?;
        v6.send_to(format!("hello on {port}").as_bytes(), (SINK_V6, port))?;
    }
    let listener = lab.sink.enter(|| TcpListener::bind((SINK_V4, 8443)));
    let listener = listener?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        mirror_tests::pin_to_first_cpu();
        let (mut conn, _) = listener.accept()?;
        let mut request = [0u8; 5];
        conn.read_exact(&mut request)?;
        conn.write_all(b"world")
    });
    let mut client = lab.src.enter(|| TcpStream::connect((SINK_V4, 8443)))?;
    client.write_all(b"hello")?;
    let mut reply = [0u8; 5];
    client.read_exact(&mut reply)?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    drop(client);
    lab.send_sentinel();
    Ok(())
}
