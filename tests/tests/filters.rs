//! Filter expressions with tcpdump itself as the oracle: real captures (and a few frames of the
//! kinds they lack: IPv6, SCTP, fragments, LLDP) are replayed into the node, each expression's
//! session writes its copies to a pcap file, and every file must hold exactly the frames that
//! `tcpdump -r replayed.pcap -w - EXPR` selects, byte for byte.
//!
//! One difference is by design and stated in the README: tcpdump's `host` and `net` also match
//! the addresses inside ARP, ours match IP packets only. Expressions that name an address are
//! compared without the ARP frames, on both sides.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

#[path = "filters/programs.rs"]
mod programs;

use mirror_tests::{
    Capture, Flow, FrameSender, KilledOnDrop, Lab, NODE_SRC_MAC, SRC_MAC, assert_same_frames,
    is_sentinel, pcap_frames, shipped_capture, write_pcap,
};

/// Expression sessions per agent run: with the sentinel's session, the most copies one packet
/// may have (`MAX_COPIES_PER_PACKET`).
const SESSIONS_PER_RUN: usize = 7;
const ETHERTYPE_ARP: u16 = 0x0806;

/// The frames replayed: the captures python3-dpkt ships (but `truncated_dns_2.pcap`, whose
/// record claims more bytes than its snap length, which pcap-file refuses), then frames of the
/// kinds they lack.
fn replayed() -> Vec<Vec<u8>> {
    let mut frames: Vec<Vec<u8>> = [
        "http.pcap",
        "dns_icmp.pcap",
        "nb6-http.pcap",
        "truncated_dns.pcap",
    ]
    .iter()
    .flat_map(|name| shipped_capture(name))
    .collect();
    frames.extend(made_frames());
    frames
}

/// IPv6 TCP, UDP and `ICMPv6`, SCTP, a later IPv4 fragment, and LLDP.
fn made_frames() -> Vec<Vec<u8>> {
    use etherparse::PacketBuilder;
    let (a, b) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let v6 = |last: u8| {
        let mut address = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        address[15] = last;
        address
    };
    // Each step of the builder is its own type: a macro rather than a closure.
    macro_rules! build {
        ($builder:expr, $payload:expr $(,)?) => {{
            let mut frame = Vec::new();
            $builder.write(&mut frame, $payload).expect("frame");
            frame
        }};
    }
    let mut frames = vec![
        build!(
            PacketBuilder::ethernet2(a, b)
                .ipv6(v6(1), v6(2), 64)
                .tcp(40_000, 80, 1, 1000),
            b"GET /",
        ),
        build!(
            PacketBuilder::ethernet2(b, a)
                .ipv6(v6(2), v6(1), 64)
                .udp(53, 5353),
            b"answer",
        ),
        build!(
            PacketBuilder::ethernet2(a, b)
                .ipv6(v6(1), v6(2), 64)
                .icmpv6_echo_request(1, 1),
            b"ping",
        ),
        build!(
            PacketBuilder::ethernet2(a, b)
                .ipv4([10, 1, 2, 3], [192, 0, 2, 7], 64)
                .udp(53, 4000),
            b"dns",
        ),
    ];
    // SCTP (common header: ports, tag, checksum) and a later fragment of a UDP datagram, by hand:
    // etherparse builds neither.
    let ipv4 = |proto: u8, fragment_offset: u16, payload: &[u8]| {
        let mut header = etherparse::Ipv4Header::new(
            u16::try_from(payload.len()).expect("short"),
            64,
            etherparse::IpNumber(proto),
            [10, 0, 0, 1],
            [192, 0, 2, 7],
        )
        .expect("header");
        header.fragment_offset =
            etherparse::IpFragOffset::try_new(fragment_offset).expect("offset");
        let mut frame = Vec::new();
        etherparse::Ethernet2Header {
            source: a,
            destination: b,
            ether_type: etherparse::EtherType::IPV4,
        }
        .write(&mut frame)
        .expect("ethernet");
        header.write(&mut frame).expect("ipv4");
        frame.extend_from_slice(payload);
        frame
    };
    frames.push(ipv4(132, 0, &[0, 80, 0x13, 0x88, 0, 0, 0, 1, 0, 0, 0, 0]));
    // IGMP (a v2 report), IGRP, PIM and VRRP: protocols with tcpdump keywords of their own.
    frames.push(ipv4(2, 0, &[0x16, 0, 0, 0, 239, 1, 2, 3]));
    frames.push(ipv4(9, 0, &[0x11, 0, 0, 0]));
    frames.push(ipv4(103, 0, &[0x20, 0, 0, 0]));
    frames.push(ipv4(112, 0, &[0x21, 1, 100, 0]));
    frames.push(ipv4(17, 185, &[0, 53, 0, 53, 0, 8, 0, 0]));
    let mut lldp = vec![0x01, 0x80, 0xc2, 0, 0, 0x0e, 2, 0, 0, 0, 0, 1, 0x88, 0xcc];
    lldp.extend_from_slice(&[2, 7, 4, 2, 0, 0, 0, 0, 1, 0, 0]);
    frames.push(lldp);
    frames
}

/// What tcpdump selects from `file` with `expression`.
fn tcpdump_selects(file: &Path, expression: &str, out: &Path) -> Vec<Vec<u8>> {
    let output = Command::new("tcpdump")
        .args(["-r"])
        .arg(file)
        .arg("-w")
        .arg(out)
        .arg(expression)
        .output()
        .expect("tcpdump (Debian's tcpdump package: run `cargo xtask setup`)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // tcpdump refuses to run an expression that can match nothing: it selects nothing.
    if stderr.contains("expression rejects all packets") {
        return Vec::new();
    }
    assert!(
        output.status.success(),
        "tcpdump refused `{expression}`: {stderr}"
    );
    pcap_frames(out)
}

/// The copies each expression's session wrote, one agent run per [`SESSIONS_PER_RUN`].
fn agent_copies(
    lab: &Lab,
    dir: &Path,
    expressions: &[String],
    frames: &[Vec<u8>],
) -> Vec<Vec<Vec<u8>>> {
    let mut copies = Vec::new();
    for (run, batch) in expressions.chunks(SESSIONS_PER_RUN).enumerate() {
        let files: Vec<PathBuf> = (0..batch.len())
            .map(|i| dir.join(format!("run{run}-{i}.pcap")))
            .collect();
        let mut config = format!(
            "[[session]]\nname = \"sentinel\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\n\
             target = {{ interface = \"mir0\" }}\n{}",
            mirror_tests::SENTINEL_RULE
        );
        for (i, (expression, file)) in batch.iter().zip(&files).enumerate() {
            let _ = write!(
                config,
                "[[session]]\nname = \"e{i}\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\n\
                 target = {{ file = \"{}\" }}\nfilter = \"{}\"\n",
                file.display(),
                expression.replace('\\', "\\\\")
            );
        }
        let agent = lab.start_agent(&config);
        let sentinel = Capture::open(&lab.mon, "eth0");
        let sender = FrameSender::open(&lab.src, "eth0");
        for frame in frames {
            sender.send(frame);
        }
        sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
        sentinel.bytes_until_sentinel();
        // Stopping drains the ring: every copy made before the sentinel is in its file.
        agent.stop();
        copies.extend(files.iter().map(|file| {
            pcap_frames(file)
                .into_iter()
                .filter(|frame| !is_sentinel(frame))
                .collect()
        }));
    }
    copies
}

/// Expressions that cover every construct of the subset, with values the frames have.
const WRITTEN: &[&str] = &[
    "tcp",
    "udp",
    "sctp",
    "igmp",
    "icmp or igmp",
    "igrp",
    "pim",
    "vrrp",
    "not igmp and not pim",
    "ip proto \\igmp",
    "icmp",
    "icmp6",
    "ip",
    "ip6",
    "arp",
    "not ip",
    "vlan",
    "not vlan 5",
    "port 80",
    "port 53 or 80",
    "tcp port 80",
    "udp port 53",
    "tcp src port 80",
    "udp dst port 53",
    "src or dst port 53",
    "src and dst port 53",
    "portrange 50-90",
    "tcp dst portrange 1-1023",
    "host 10.0.0.1",
    "src host 192.0.2.7",
    "host 2001:db8::1",
    "ip6 dst host 2001:db8::2",
    "net 10.0.0.0/8",
    "net 192.168",
    "net 10.0.0.0 mask 255.0.0.0",
    "src net 2001:db8::/32",
    "ip proto 17",
    "ip proto \\tcp",
    "ip6 proto 58",
    "proto 6",
    "ether proto 0x8864",
    "ether proto \\arp",
    "ether proto 0x88cc",
    "tcp port 80 and not host 10.0.0.1",
    "udp and not port 53",
    "not (tcp or udp)",
    "!tcp && !udp || icmp",
    "tcp or udp and port 53",
    "(tcp or udp) and not (port 80 or port 53)",
    "not src and dst net 10.0.0.0/8",
    "icmp or arp or ether proto 0x88cc",
];

/// Random expressions from the grammar, over the addresses and ports the frames carry.
fn random_expressions(frames: &[Vec<u8>], count: usize) -> Vec<String> {
    let flows: Vec<Flow> = frames.iter().map(|f| Flow::of(f)).collect();
    let addresses: Vec<IpAddr> = flows
        .iter()
        .flat_map(|f| [f.src, f.dst])
        .flatten()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let ports: Vec<u16> = flows
        .iter()
        .flat_map(|f| [f.src_port, f.dst_port])
        .flatten()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut rng = fastrand::Rng::with_seed(18);
    (0..count)
        .map(|_| expression(&mut rng, &addresses, &ports, 3))
        .collect()
}

fn expression(rng: &mut fastrand::Rng, addresses: &[IpAddr], ports: &[u16], depth: u32) -> String {
    if depth == 0 || rng.u8(0..3) == 0 {
        return primitive(rng, addresses, ports);
    }
    let left = expression(rng, addresses, ports, depth - 1);
    let right = expression(rng, addresses, ports, depth - 1);
    match rng.u8(0..5) {
        0 => format!("not {left}"),
        1 => format!("! ({left})"),
        2 => format!("({left}) and ({right})"),
        3 => format!("({left}) or ({right})"),
        _ => format!("{left} and not {right}"),
    }
}

fn primitive(rng: &mut fastrand::Rng, addresses: &[IpAddr], ports: &[u16]) -> String {
    let direction = ["", "src ", "dst ", "src or dst ", "src and dst "][rng.usize(0..5)];
    let address = addresses[rng.usize(0..addresses.len())];
    let port = ports[rng.usize(0..ports.len())];
    match rng.u8(0..9) {
        0 => {
            ["tcp", "udp", "icmp", "icmp6", "ip", "ip6", "arp", "sctp"][rng.usize(0..8)].to_owned()
        }
        1 => format!("{direction}host {address}"),
        2 => {
            let length = match address {
                IpAddr::V4(_) => [8, 16, 24][rng.usize(0..3)],
                IpAddr::V6(_) => [32, 64][rng.usize(0..2)],
            };
            let net = ipnet_of(address, length);
            format!("{direction}net {net}")
        }
        3 => format!("{direction}port {port}"),
        4 => {
            let proto = ["tcp", "udp"][rng.usize(0..2)];
            format!("{proto} {direction}port {port}")
        }
        5 => format!(
            "{direction}portrange {}-{}",
            port.saturating_sub(100),
            port.saturating_add(100)
        ),
        6 => format!("ip proto {}", [1, 6, 17, 132][rng.usize(0..4)]),
        7 => format!(
            "{direction}port {port} or {}",
            ports[rng.usize(0..ports.len())]
        ),
        _ => format!(
            "ether proto {:#06x}",
            [0x0800, 0x86dd, 0x0806, 0x8864][rng.usize(0..4)]
        ),
    }
}

/// `address/length` with the host bits cleared.
fn ipnet_of(address: IpAddr, length: u8) -> String {
    match address {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(length)).unwrap_or(0);
            format!(
                "{}/{length}",
                std::net::Ipv4Addr::from(u32::from(v4) & mask)
            )
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(length)).unwrap_or(0);
            format!(
                "{}/{length}",
                std::net::Ipv6Addr::from(u128::from(v6) & mask)
            )
        }
    }
}

/// Whether an expression names an address (tcpdump's `host` and `net` look inside ARP too).
fn names_address(expression: &str) -> bool {
    expression.contains("host") || expression.contains("net")
}

fn is_arp(frame: &[u8]) -> bool {
    frame.get(12..14) == Some(&ETHERTYPE_ARP.to_be_bytes())
}

#[test]
fn expressions_copy_what_tcpdump_selects() {
    let lab = Lab::new("filters");
    let dir = tempfile::tempdir().expect("temp dir");
    let frames = replayed();
    let all = dir.path().join("replayed.pcap");
    write_pcap(&all, &frames);
    let mut expressions: Vec<String> = WRITTEN.iter().map(ToString::to_string).collect();
    expressions.extend(random_expressions(&frames, 250));
    let copies = agent_copies(&lab, dir.path(), &expressions, &frames);
    let mut splitting = 0;
    for (index, (expression, copies)) in expressions.iter().zip(copies).enumerate() {
        let selected = tcpdump_selects(
            &all,
            expression,
            &dir.path().join(format!("tcpdump-{index}.pcap")),
        );
        let (copies, selected) = if names_address(expression) {
            let without_arp =
                |frames: Vec<Vec<u8>>| frames.into_iter().filter(|f| !is_arp(f)).collect();
            (without_arp(copies), without_arp(selected))
        } else {
            (copies, selected)
        };
        splitting += usize::from(!selected.is_empty() && selected.len() < frames.len());
        assert_same_frames(&format!("`{expression}`"), copies, selected);
    }
    assert!(
        splitting > expressions.len() / 2,
        "only {splitting} of {} expressions select some frames but not all",
        expressions.len()
    );
}

/// The quick form in the lab's node with `args` after its interface, hook and API socket.
fn quick_form(lab: &Lab, dir: &Path, args: &[&std::ffi::OsStr], stderr: Stdio) -> KilledOnDrop {
    KilledOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &lab.node.name])
            .arg(mirror_tests::agent_binary())
            .args([
                "run",
                "-i",
                "src0",
                "--direction",
                "ingress",
                "--api-socket",
            ])
            .arg(dir.join("agent.sock"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("agent"),
    )
}

/// The quick form's standard output, once it said it is attached (kept open: the agent writes
/// its report there at the end).
fn attached_output(agent: &mut KilledOnDrop) -> std::io::BufReader<std::process::ChildStdout> {
    let mut stdout = std::io::BufReader::new(agent.0.stdout.take().expect("agent stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).expect("agent output");
    assert!(line.contains("attached to"), "{line:?}");
    stdout
}

/// The agent's stderr lines, read on a thread (the agent must never block on a full pipe).
fn collect_lines(
    stderr: std::process::ChildStderr,
) -> (
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<()>,
) {
    let (lines, received) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    (received, reader)
}

#[test]
fn the_quick_form_pipes_pcap_into_tshark_and_logs_to_stderr() {
    let lab = Lab::new("pipe");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let received = dir.path().join("tshark.pcap");
    let expression = "udp port 53 or icmp";
    let mut agent = quick_form(
        &lab,
        dir.path(),
        &["--json", "-w", "-", expression].map(std::ffi::OsStr::new),
        Stdio::piped(),
    );
    let mut tshark = KilledOnDrop(
        Command::new("tshark")
            .args(["-r", "-", "-F", "pcap", "-w"])
            .arg(&received)
            .stdin(agent.0.stdout.take().expect("agent stdout"))
            .stderr(Stdio::piped())
            .spawn()
            .expect("tshark (Debian's tshark package: run `cargo xtask setup`)"),
    );
    let (lines, reader) = collect_lines(agent.0.stderr.take().expect("agent stderr"));
    let mut log = Vec::new();
    while !log.iter().any(|l: &String| l.contains("attached to")) {
        let line = lines
            .recv_timeout(mirror_tests::DEADLINE)
            .unwrap_or_else(|e| panic!("the agent did not attach ({e}): {log:#?}"));
        log.push(line);
    }

    let frames: Vec<Vec<u8>> = ["http.pcap", "dns_icmp.pcap"]
        .iter()
        .flat_map(|name| shipped_capture(name))
        .collect();
    let sender = FrameSender::open(&lab.src, "eth0");
    for frame in &frames {
        sender.send(frame);
    }
    let all = dir.path().join("sent.pcap");
    write_pcap(&all, &frames);
    let expected = tcpdump_selects(&all, expression, &dir.path().join("tcpdump.pcap"));
    assert!(!expected.is_empty() && expected.len() < frames.len());
    // Every copy is in the ring once the session counts it; stopping drains the ring.
    mirror_tests::wait_for("the copies", || {
        let stats: serde_json::Value = serde_json::from_str(&mirror_tests::api_get(
            socket.to_str().expect("path"),
            "/stats",
        ))
        .expect("stats JSON");
        stats["sessions"][0]["counters"]["mirrored"] == expected.len()
    });
    // SAFETY: kill on our own child's pid.
    unsafe { libc::kill(i32::try_from(agent.0.id()).expect("pid"), libc::SIGINT) };
    let status = agent.0.wait().expect("agent exit");
    reader.join().expect("stderr reader");
    log.extend(lines.try_iter());
    assert!(status.success(), "agent: {status}: {log:#?}");
    // The final counters go to stderr too, among the log lines.
    let report = mirror_tests::Report(
        log.iter()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON report in {log:#?}"))
            .clone(),
    );
    assert_eq!(report.session("cli").mirrored, expected.len() as u64);
    let mut tshark_errors = String::new();
    std::io::Read::read_to_string(
        tshark.0.stderr.as_mut().expect("tshark stderr"),
        &mut tshark_errors,
    )
    .expect("tshark stderr");
    let tshark_status = tshark.0.wait().expect("tshark exit");
    assert!(
        tshark_status.success(),
        "tshark read the stream: {tshark_errors}"
    );
    // In order, byte for byte: a stray log line on stdout would have broken the stream.
    assert_eq!(pcap_frames(&received), expected);
}

#[test]
fn count_stops_the_quick_form_after_that_many_copies() {
    let lab = Lab::new("count");
    let dir = tempfile::tempdir().expect("temp dir");
    let written = dir.path().join("five.pcap");
    let mut agent = quick_form(
        &lab,
        dir.path(),
        &[
            "--json".as_ref(),
            "-c".as_ref(),
            "5".as_ref(),
            "-w".as_ref(),
            written.as_os_str(),
            "udp".as_ref(),
        ],
        Stdio::null(),
    );
    let mut stdout = attached_output(&mut agent);
    let frames = shipped_capture("dns_icmp.pcap");
    let sender = FrameSender::open(&lab.src, "eth0");
    for frame in &frames {
        sender.send(frame);
    }
    // The agent stops by itself, with its report.
    let mut status = None;
    mirror_tests::wait_for("the agent to stop after 5 copies", || {
        status = agent.0.try_wait().expect("agent status");
        status.is_some()
    });
    let mut report = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut report).expect("report");
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {report}");
    let all = dir.path().join("sent.pcap");
    write_pcap(&all, &frames);
    let udp = tcpdump_selects(&all, "udp", &dir.path().join("tcpdump.pcap"));
    assert!(udp.len() > 5, "{} UDP frames", udp.len());
    assert_eq!(pcap_frames(&written), udp[..5]);
    // What the file holds is what was mirrored; the copies the ring held past the count are
    // counted as such.
    let report = mirror_tests::Report(
        report
            .lines()
            .find(|l| l.starts_with('{'))
            .unwrap_or_else(|| panic!("no JSON report in {report}"))
            .to_owned(),
    );
    assert_eq!(report.session("cli").mirrored, 5, "{}", report.0);
    assert_eq!(report.rule("cli", "filter-1").mirrored, 5, "{}", report.0);
    assert_eq!(report.ring("cli", "sent"), 5);
    let past = report.ring("cli", "past_count");
    assert!(past <= (udp.len() - 5) as u64, "{past}");
}

#[test]
fn a_taken_file_is_left_alone_and_the_log_names_the_file_written() {
    let lab = Lab::new("taken");
    let dir = tempfile::tempdir().expect("temp dir");
    let named = dir.path().join("web.pcap");
    std::fs::write(&named, b"someone else's").expect("the taken file");
    let mut agent = quick_form(
        &lab,
        dir.path(),
        &[
            "-c".as_ref(),
            "1".as_ref(),
            "-w".as_ref(),
            named.as_os_str(),
            "udp".as_ref(),
        ],
        Stdio::piped(),
    );
    let (lines, reader) = collect_lines(agent.0.stderr.take().expect("agent stderr"));
    let _stdout = attached_output(&mut agent);
    let sender = FrameSender::open(&lab.src, "eth0");
    for frame in shipped_capture("dns_icmp.pcap") {
        sender.send(&frame);
    }
    mirror_tests::wait_for("the agent to stop after 1 copy", || {
        agent.0.try_wait().expect("agent status").is_some()
    });
    reader.join().expect("stderr reader");
    let log: Vec<String> = lines.try_iter().collect();
    let written = dir.path().join("web-000001.pcap");
    assert_eq!(
        std::fs::read(&named).expect("the taken file"),
        b"someone else's"
    );
    assert_eq!(mirror_tests::pcap_frames(&written).len(), 1);
    let says = format!("writing {}", written.display());
    assert!(log.iter().any(|l| l.contains(&says)), "{says} in {log:#?}");
}

/// Two quick-form runs at once, as two tcpdumps would be: each answers on a socket of its own,
/// and `status --all` lists both.
#[test]
fn quick_form_runs_get_sockets_of_their_own_and_status_all_lists_them() {
    let labs = [Lab::new("sock-a"), Lab::new("sock-b")];
    let dir = tempfile::tempdir().expect("temp dir");
    let agents: Vec<KilledOnDrop> = labs
        .iter()
        .map(|lab| {
            let mut agent = KilledOnDrop(
                Command::new("ip")
                    .args(["netns", "exec", &lab.node.name])
                    .arg(mirror_tests::agent_binary())
                    .args(["run", "-i", "src0", "-w"])
                    .arg(dir.path().join(format!("{}.pcap", lab.node.name)))
                    .arg("udp")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("agent"),
            );
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(agent.0.stdout.as_mut().expect("stdout")),
                &mut line,
            )
            .expect("agent output");
            assert!(line.contains("attached to"), "{line:?}");
            agent
        })
        .collect();
    let output = Command::new(mirror_tests::agent_binary())
        .args(["status", "--all", "--json"])
        .output()
        .expect("status --all");
    assert!(output.status.success(), "{output:?}");
    let listed: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    for agent in &agents {
        let socket = format!("/run/mirror/run-{}.sock", agent.0.id());
        let entry = listed
            .iter()
            .find(|entry| entry["socket"] == socket.as_str())
            .unwrap_or_else(|| panic!("{socket} in {listed:#?}"));
        assert_eq!(entry["status"]["hooks_attached"], 2, "{entry}");
    }
    // A run that stops takes its socket with it.
    for mut agent in agents {
        let socket = format!("/run/mirror/run-{}.sock", agent.0.id());
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(i32::try_from(agent.0.id()).expect("pid"), libc::SIGINT) };
        let status = agent.0.wait().expect("agent exit");
        assert!(status.success(), "{status}");
        assert!(!std::path::Path::new(&socket).exists(), "{socket} is left");
    }
}

/// `-C 1 -W 2`, as tcpdump's: a new file after each million bytes, the newest two kept.
#[test]
fn the_quick_form_rotates_by_size_and_keeps_the_newest_files() {
    let lab = Lab::new("rotate");
    let dir = tempfile::tempdir().expect("temp dir");
    let named = dir.path().join("r.pcap");
    let payload = [0x5a; 1000];
    let frame = mirror_tests::udp_v4_frame(
        mirror_tests::SRC_MAC,
        mirror_tests::NODE_SRC_MAC,
        5000,
        &payload,
    );
    // Four files' worth: a pcap record is the frame and 16 bytes.
    let per_file = 1_000_000usize.div_ceil(frame.len() + 16);
    let count = 4 * per_file - 10;
    let mut agent = quick_form(
        &lab,
        dir.path(),
        &[
            "-C".as_ref(),
            "1".as_ref(),
            "-W".as_ref(),
            "2".as_ref(),
            "-c".as_ref(),
            count.to_string().as_ref(),
            "-w".as_ref(),
            named.as_os_str(),
            "udp port 5000".as_ref(),
        ],
        Stdio::null(),
    );
    let _stdout = attached_output(&mut agent);
    let sender = FrameSender::open(&lab.src, "eth0");
    for _ in 0..count {
        sender.send(&frame);
    }
    mirror_tests::wait_for("the agent to stop after its count", || {
        agent.0.try_wait().expect("agent status").is_some()
    });
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .expect("the folder")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("r-"))
        .collect();
    files.sort();
    assert_eq!(files, ["r-000003.pcap", "r-000004.pcap"]);
    let newest = mirror_tests::pcap_frames(&dir.path().join(&files[1]));
    let full = mirror_tests::pcap_frames(&dir.path().join(&files[0]));
    assert_eq!(
        full.len(),
        per_file,
        "a file ends at its first record past a million bytes"
    );
    assert_eq!(newest.len(), count - 3 * per_file);
    assert!(full.iter().chain(&newest).all(|copy| *copy == frame));
}

/// `run -r INPUT -w OUTPUT EXPRESSION`: the frames of a file the expression selects.
fn read_selecting(input: &Path, output: &Path, expression: &str) {
    let output = Command::new(mirror_tests::agent_binary())
        .arg("run")
        .arg("-r")
        .arg(input)
        .arg("-w")
        .arg(output)
        .arg(expression)
        .output()
        .expect("the agent");
    assert!(output.status.success(), "`{expression}`: {output:?}");
}

/// `run -r IN -w OUT FILTER` selects from a file what tcpdump selects from it, from pcap and from
/// pcapng, with nothing attached.
#[test]
fn reading_a_file_selects_what_tcpdump_selects() {
    let dir = tempfile::tempdir().expect("temp dir");
    let frames = replayed();
    let all = dir.path().join("replayed.pcap");
    write_pcap(&all, &frames);
    // The same frames as pcapng, written by `-r` itself: every frame, with no filter.
    let as_pcapng = dir.path().join("replayed.pcapng");
    read_selecting(&all, &as_pcapng, "");
    let read_back: Vec<Vec<u8>> = mirror_tests::capture_file_frames(&as_pcapng)
        .into_iter()
        .map(|(_, frame)| frame)
        .collect();
    assert_eq!(read_back, frames);
    let mut expressions: Vec<String> = WRITTEN.iter().map(ToString::to_string).collect();
    expressions.extend(random_expressions(&frames, 100));
    for (index, expression) in expressions.iter().enumerate() {
        let selected = tcpdump_selects(
            &all,
            expression,
            &dir.path().join(format!("tcpdump-{index}.pcap")),
        );
        for (input, kind) in [(&all, "pcap"), (&as_pcapng, "pcapng")] {
            let output = dir.path().join(format!("agent-{index}-{kind}.pcap"));
            read_selecting(input, &output, expression);
            let (ours, theirs) = if names_address(expression) {
                let without_arp =
                    |frames: Vec<Vec<u8>>| frames.into_iter().filter(|f| !is_arp(f)).collect();
                (
                    without_arp(pcap_frames(&output)),
                    without_arp(selected.clone()),
                )
            } else {
                (pcap_frames(&output), selected.clone())
            };
            assert_same_frames(&format!("`{expression}` from {kind}"), ours, theirs);
        }
    }
}

/// `-G 1`, as tcpdump's: the first copy a second after a file was started begins the next one.
#[test]
fn the_quick_form_rotates_by_time() {
    let lab = Lab::new("rotate-time");
    let dir = tempfile::tempdir().expect("temp dir");
    let named = dir.path().join("t.pcap");
    let mut agent = quick_form(
        &lab,
        dir.path(),
        &[
            "-G".as_ref(),
            "1".as_ref(),
            "-U".as_ref(),
            "-c".as_ref(),
            "3".as_ref(),
            "-w".as_ref(),
            named.as_os_str(),
            "udp port 5000".as_ref(),
        ],
        Stdio::null(),
    );
    let _stdout = attached_output(&mut agent);
    let frames: Vec<Vec<u8>> = [b"first", b"later", b"again"]
        .iter()
        .map(|payload| {
            mirror_tests::udp_v4_frame(
                mirror_tests::SRC_MAC,
                mirror_tests::NODE_SRC_MAC,
                5000,
                *payload,
            )
        })
        .collect();
    let sender = FrameSender::open(&lab.src, "eth0");
    let first_file = dir.path().join("t-000001.pcap");
    sender.send(&frames[0]);
    mirror_tests::wait_for("the first copy", || {
        mirror_tests::frames_so_far(&first_file) == 1
    });
    // The period itself: a clock, not a condition to poll.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    sender.send(&frames[1]);
    sender.send(&frames[2]);
    mirror_tests::wait_for("the agent to stop after its count", || {
        agent.0.try_wait().expect("agent status").is_some()
    });
    assert_eq!(pcap_frames(&first_file), frames[..1]);
    assert_eq!(pcap_frames(&dir.path().join("t-000002.pcap")), frames[1..]);
}
