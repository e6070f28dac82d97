//! Session controls with real traffic: snaplen (copies cut, originals whole), sampling by packet
//! and by flow, rate limits per session and for the node. The sentinel travels in a session of its
//! own with no controls, so that sampling or a limit never holds it back.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use mirror_tests::{
    Agent, COL_V4, Capture, Counts, Flow, FrameSender, Lab, NODE_SRC_MAC, Report, SENTINEL_RULE,
    SINK_V4, SINK_V6, SRC_MAC, SRC_V4, SRC_V6, copied, is_sentinel, pin_to_first_cpu, select,
    tcx_ingress_sizes, udp_socket, udp_v6_frame, wait_for,
};

/// Session `ctl` on src0 ingress with `controls` (session keys) and one rule mirroring UDP to
/// port 5555, to `target`; then session `end`, which mirrors the sentinel to mir0.
fn controlled(target: &str, controls: &str) -> String {
    format!(
        "[[session]]\nname = \"ctl\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\ntarget = {target}\n{controls}\n\
         [[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n\
         [[session]]\nname = \"end\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\ntarget = {{ interface = \"mir0\" }}\n{SENTINEL_RULE}"
    )
}

const TO_MIR0: &str = "{ interface = \"mir0\" }";

/// Sends `count` datagrams of `size` bytes to sink port 5555 from one socket; returns how long
/// the sending took.
fn send_burst(lab: &Lab, count: usize, size: usize) -> Duration {
    let sender = udp_socket(&lab.src, SocketAddr::new(SRC_V4.into(), 0));
    pin_to_first_cpu();
    let started = Instant::now();
    for i in 0..count {
        sender
            .send_to(&vec![i as u8; size], (SINK_V4, 5555))
            .expect("send");
    }
    started.elapsed()
}

/// The most copies a bucket of `burst` refilled at `per_second` admits while traffic lasts `took`
/// (the last refill rounded up, plus one for a refill at the very end).
fn admitted_at_most(burst: u64, per_second: u64, took: Duration) -> u64 {
    let refills = (took.as_nanos() * u128::from(per_second)).div_ceil(1_000_000_000);
    burst + u64::try_from(refills).expect("a short test") + 1
}

/// The copies at the monitor's eth0 before the sentinel, and the agent's report.
fn copies_and_report(
    lab: &Lab,
    copies: &Capture,
    agent: mirror_tests::Agent,
) -> (Vec<Vec<u8>>, Report) {
    lab.send_sentinel();
    let frames = copies
        .until_sentinel()
        .into_iter()
        .map(|f| f.bytes)
        .collect();
    (frames, agent.stop())
}

#[test]
fn snaplen_cuts_copies_and_leaves_originals_whole() {
    let lab = Lab::new("snap");
    let agent = lab.start_agent(&controlled(TO_MIR0, "snaplen = 100"));
    let copies = Capture::open(&lab.mon, "eth0");
    let at_src = Capture::open(&lab.src, "eth0");
    let receivers = [
        udp_socket(&lab.sink, SocketAddr::new(SINK_V4.into(), 5555)),
        udp_socket(&lab.sink, SocketAddr::new(SINK_V6.into(), 5555)),
    ];
    let senders = [
        udp_socket(&lab.src, SocketAddr::new(SRC_V4.into(), 0)),
        udp_socket(&lab.src, SocketAddr::new(SRC_V6.into(), 0)),
    ];
    pin_to_first_cpu();
    // IPv4 frames of 60, 100, 101, 1000 and 1442 bytes (42 bytes of headers); IPv6 20 more.
    let sizes = [18, 58, 59, 958, 1400];
    for size in sizes {
        senders[0]
            .send_to(&vec![1; size], (SINK_V4, 5555))
            .expect("send");
        senders[1]
            .send_to(&vec![2; size], (SINK_V6, 5555))
            .expect("send");
    }
    let (copies, report) = copies_and_report(&lab, &copies, agent);

    let mut buf = [0u8; 2000];
    for receiver in &receivers {
        for size in sizes {
            assert_eq!(receiver.recv(&mut buf).expect("primary path"), size);
        }
    }
    let originals = select(&at_src.drain(), |f, frame| {
        frame.outgoing && f.dst_port == Some(5555)
    });
    assert_eq!(originals.len(), 10);
    let expected: Vec<Vec<u8>> = originals
        .iter()
        .map(|f| f[..f.len().min(100)].to_vec())
        .collect();
    assert_eq!(
        copies, expected,
        "each copy is the original's first 100 bytes"
    );
    let cut = originals.iter().filter(|f| f.len() > 100).count() as u64;
    assert_eq!(cut, 7);
    assert_eq!(
        report.rule("ctl", "10"),
        Counts {
            truncated: cut,
            ..copied(10, 10)
        }
    );
}

#[test]
fn snaplen_over_vxlan_cuts_inner_frames_and_gso_copies() {
    let lab = Lab::with_collector("snapvx", 1500);
    let collector = lab.start_collector("0.0.0.0:4789", "copies.pcap");
    let tap = Capture::open(lab.col(), "tap1");
    let agent = lab.start_agent(&format!(
        "[[session]]\nname = \"ctl\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\n\
         target = {{ vxlan = {{ remote = \"{COL_V4}\", vni = 9 }} }}\nsnaplen = 128\n\
         [[session.rule]]\nnumber = 1\naction = \"mirror\"\nproto = \"udp\"\n\
         [[session.rule]]\nnumber = 2\naction = \"mirror\"\nproto = \"tcp\"\n"
    ));
    send_burst(&lab, 5, 1400);
    let listener = lab
        .sink
        .enter(|| std::net::TcpListener::bind((SINK_V4, 7000)).expect("listen"));
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        std::io::copy(&mut stream, &mut std::io::sink()).expect("read")
    });
    lab.src.enter(|| {
        pin_to_first_cpu();
        let mut stream = std::net::TcpStream::connect((SINK_V4, 7000)).expect("connect");
        std::io::Write::write_all(&mut stream, &vec![3; 300_000]).expect("write");
    });
    assert_eq!(server.join().expect("server"), 300_000, "primary path");
    lab.send_sentinel();
    let tapped = tap.until_nth(1, is_sentinel);
    collector.stop();
    let report = agent.stop();

    assert!(
        tapped.iter().all(|f| f.bytes.len() <= 128),
        "every copy cut"
    );
    let udp: Vec<_> = tapped
        .iter()
        .filter(|f| Flow::of(&f.bytes).dst_port == Some(5555))
        .collect();
    assert_eq!(udp.len(), 5);
    assert!(udp.iter().all(|f| f.bytes.len() == 128));
    let tcp = report.rule("ctl", "2");
    assert!(tcp.truncated > 0, "{tcp:?}");
    assert_eq!(tcp.too_big, 0, "cut instead of refused: {tcp:?}");
    assert_eq!(tcp.mirrored, tcp.matched);
}

#[test]
fn packet_sampling_keeps_about_one_in_n() {
    let lab = Lab::new("sample");
    let agent = lab.start_agent(&controlled(TO_MIR0, "sample = { every = 10 }"));
    let copies = Capture::open(&lab.mon, "eth0");
    send_burst(&lab, 3000, 20);
    let (copies, report) = copies_and_report(&lab, &copies, agent);

    let counts = report.rule("ctl", "10");
    assert_eq!(counts.matched, 3000);
    assert_eq!(counts.mirrored + counts.sampled_out, 3000, "{counts:?}");
    assert_eq!(copies.len() as u64, counts.mirrored);
    // Binomial(3000, 0.1): mean 300, standard deviation 16.4; 200..400 is six deviations.
    assert!(
        (200..=400).contains(&counts.mirrored),
        "kept {} of 3000",
        counts.mirrored
    );
}

#[test]
fn flow_sampling_keeps_whole_conversations() {
    let lab = Lab::new("flows");
    let config = controlled(TO_MIR0, "sample = { every = 4, by = \"flow\" }").replacen(
        "direction = \"ingress\"",
        "direction = \"both\"",
        1,
    );
    let agent = lab.start_agent(&config.replace(
        "proto = \"udp\"\ndst_port = 5555\n",
        "proto = \"udp\"\ndst_port = 5555\n[[session.rule]]\nnumber = 11\naction = \"mirror\"\nproto = \"udp\"\nsrc_port = 5555\n",
    ));
    let copies = Capture::open(&lab.mon, "eth0");
    let server = udp_socket(&lab.sink, SocketAddr::new(SINK_V4.into(), 5555));
    let clients: Vec<_> = (0..80)
        .map(|_| udp_socket(&lab.src, SocketAddr::new(SRC_V4.into(), 0)))
        .collect();
    pin_to_first_cpu();
    let mut buf = [0u8; 100];
    for round in 0..3u8 {
        for client in &clients {
            client.send_to(&[round; 20], (SINK_V4, 5555)).expect("send");
            let (n, from) = server.recv_from(&mut buf).expect("request");
            server.send_to(&buf[..n], from).expect("reply");
            client.recv(&mut buf).expect("reply on the primary path");
        }
    }
    let (copies, report) = copies_and_report(&lab, &copies, agent);

    // Per conversation (the client's port), the copies seen: 6 (3 requests, 3 replies) or none.
    let mut per_flow: BTreeMap<u16, usize> = BTreeMap::new();
    for copy in &copies {
        let flow = Flow::of(copy);
        let client_port = if flow.dst_port == Some(5555) {
            flow.src_port
        } else {
            flow.dst_port
        };
        *per_flow
            .entry(client_port.expect("a UDP copy"))
            .or_default() += 1;
    }
    assert!(
        per_flow.values().all(|n| *n == 6),
        "conversations copied in part: {per_flow:?}"
    );
    // About a quarter of 80 conversations; 5..=45 is far outside any plausible draw.
    assert!(
        (5..=45).contains(&per_flow.len()),
        "{} of 80 conversations sampled",
        per_flow.len()
    );
    let requests = report.rule("ctl", "10");
    let replies = report.rule("ctl", "11");
    assert_eq!(requests.mirrored + requests.sampled_out, 240);
    assert_eq!(replies.mirrored + replies.sampled_out, 240);
    assert_eq!(requests.mirrored, replies.mirrored);
}

#[test]
fn a_packet_rate_limit_admits_the_burst_then_the_rate() {
    let lab = Lab::new("pps");
    let agent = lab.start_agent(&controlled(
        TO_MIR0,
        "rate_limit = { packets_per_second = 100, burst_packets = 10 }",
    ));
    let copies = Capture::open(&lab.mon, "eth0");
    let at_sink = Capture::open(&lab.sink, "eth0");
    let took = send_burst(&lab, 1000, 20);
    let (copies, report) = copies_and_report(&lab, &copies, agent);

    let arrived = select(&at_sink.drain(), |f, frame| {
        !frame.outgoing && f.dst_port == Some(5555)
    });
    assert_eq!(arrived.len(), 1000, "every original arrives");
    let counts = report.rule("ctl", "10");
    assert_eq!(counts.mirrored + counts.rate_limited, 1000, "{counts:?}");
    assert_eq!(copies.len() as u64, counts.mirrored);
    // The burst of 10 at once, then one every 10 ms while the sending lasted.
    let bound = admitted_at_most(10, 100, took);
    assert!(
        (10..=bound).contains(&counts.mirrored),
        "{} copies in {took:?} (bound {bound})",
        counts.mirrored
    );
}

#[test]
fn a_byte_limit_and_the_node_budget_hold_across_sessions() {
    let lab = Lab::new("bps");
    // ctl: 100 kB/s with a 5,000-byte burst; a second session copies the same datagrams to mir1;
    // the node allows 50 copies per second (burst 20) across both.
    let config = format!(
        "node_rate_limit = {{ packets_per_second = 50, burst_packets = 20 }}\n{}\
         [[session]]\nname = \"other\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\ntarget = {{ interface = \"mir1\" }}\n\
         [[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n",
        controlled(
            TO_MIR0,
            "rate_limit = { bytes_per_second = 100000, burst_bytes = 5000 }"
        )
    );
    let agent = lab.start_agent(&config);
    let copies = Capture::open(&lab.mon, "eth0");
    let other_copies = Capture::open(&lab.mon, "eth1");
    // 1,000-byte frames (958 bytes of payload).
    let took = send_burst(&lab, 200, 958);
    // The sentinel's session draws on the node budget too: send it again every 50 ms until the
    // budget admits one.
    let mut ctl_copies = Vec::new();
    let mut last_sent: Option<Instant> = None;
    wait_for("a copy of the sentinel", || {
        if last_sent.is_none_or(|t| t.elapsed() > Duration::from_millis(50)) {
            lab.send_sentinel();
            last_sent = Some(Instant::now());
        }
        ctl_copies.extend(copies.drain());
        ctl_copies.iter().any(|f| is_sentinel(&f.bytes))
    });
    ctl_copies.retain(|f| !is_sentinel(&f.bytes));
    let report = agent.stop();
    let other = other_copies.drain();

    let ctl = report.rule("ctl", "10");
    let other_counts = report.rule("other", "10");
    assert_eq!(ctl.mirrored + ctl.rate_limited, 200, "{ctl:?}");
    assert_eq!(other_counts.mirrored + other_counts.rate_limited, 200);
    assert_eq!(ctl_copies.len() as u64, ctl.mirrored);
    assert_eq!(other.len() as u64, other_counts.mirrored);
    // Bytes: 5 frames of burst, then one per 10 ms.
    let byte_bound = admitted_at_most(5, 100, took);
    assert!(ctl.mirrored <= byte_bound, "ctl {ctl:?} in {took:?}");
    // The node budget: 20 at once, then 50 per second, for both sessions together.
    let node_bound = admitted_at_most(20, 50, took);
    assert!(
        ctl.mirrored + other_counts.mirrored <= node_bound,
        "{} copies in {took:?} (bound {node_bound})",
        ctl.mirrored + other_counts.mirrored
    );
    assert!(
        ctl.mirrored + other_counts.mirrored >= 5,
        "at least a burst"
    );
}

/// A copy the kernel cannot cut to the snaplen (inside its headers: an IPv6 packet whose 64-byte
/// destination options put its UDP header at byte 118, cut to the smallest snaplen, 96) is
/// dropped, counted once as a clone error of its rule and session (and once at the copy hook),
/// never as sent. A snaplen below 96 is refused (`rules` unit tests).
#[test]
fn a_copy_that_cannot_be_cut_is_counted_once() {
    let lab = Lab::new("snapfail");
    let copies = Capture::open(&lab.mon, "eth0");
    let agent = lab.start_agent(&controlled(TO_MIR0, "snaplen = 96"));
    FrameSender::open(&lab.src, "eth0").send(&uncuttable_frame());
    let (frames, report) = copies_and_report(&lab, &copies, agent);
    assert!(frames.is_empty(), "{} copies", frames.len());
    assert_eq!(
        report.rule("ctl", "10"),
        Counts {
            matched: 1,
            clone_errors: 1,
            ..Counts::default()
        },
        "{}",
        report.0
    );
    assert_eq!(report.hook("copy", "copy_errors"), 1);
}

/// An IPv6 UDP frame whose 64-byte destination options put its UDP header at byte 118: a copy
/// of it cannot be cut to a snaplen of 96.
fn uncuttable_frame() -> Vec<u8> {
    let mut frame = udp_v6_frame(SRC_MAC, NODE_SRC_MAC, 5555, &[1; 100]);
    let options: Vec<u8> = [17, 7, 1, 60].into_iter().chain([0; 60]).collect();
    frame.splice(14 + 40..14 + 40, options);
    frame[14 + 6] = 60;
    let payload_len = u16::from_be_bytes([frame[18], frame[19]]) + 64;
    frame[18..20].copy_from_slice(&payload_len.to_be_bytes());
    frame
}

/// The programs' own log lines (`--kernel-log`): at `debug`, a copy that cannot be cut logs the
/// failed copy (warn, by session) and the failed clone (debug, by session and rule) in the
/// agent's log. At `off`, the default, the same event is only counted, and the verifier has
/// removed the log calls: the loaded mirror program is smaller.
#[test]
fn kernel_log_lines_come_only_when_asked_for() {
    let lab = Lab::new("kernlog");
    let copies = Capture::open(&lab.mon, "eth0");
    let config = controlled(TO_MIR0, "snaplen = 96");
    let mut sizes = Vec::new();
    for level in ["off", "debug"] {
        let agent = Agent::start_logging(&lab.node, &config, &["--kernel-log", level]);
        sizes.push(tcx_ingress_sizes(&lab.node, "src0"));
        FrameSender::open(&lab.src, "eth0").send(&uncuttable_frame());
        lab.send_sentinel();
        copies.until_sentinel();
        let expected = [
            "WARN kernel: session 0: a copy could not be cut or encapsulated, and was dropped",
            "DEBUG kernel: session 0 rule 0: the copy could not be cloned to its target",
        ];
        if level == "off" {
            let log = agent.log();
            assert!(!log.contains("kernel:"), "{log}");
        } else {
            wait_for("the kernel's log lines", || {
                let log = agent.log();
                expected.iter().all(|line| log.contains(line))
            });
        }
        let report = agent.stop();
        assert_eq!(report.hook("copy", "copy_errors"), 1, "{}", report.0);
        assert_eq!(report.rule("ctl", "10").clone_errors, 1, "{}", report.0);
    }
    assert!(
        sizes[0].len() == 1 && sizes[1].len() == 1 && sizes[0][0] < sizes[1][0],
        "the program without logging is smaller: {sizes:?}"
    );
}

/// A packet of the node's own whose mark merely looks like a copy's (the mark's upper half is
/// shared with others: Calico's default mark mask is 0xffff0000) leaves a target untouched: the
/// copy program there does not cut it.
#[test]
fn a_packet_whose_mark_looks_like_a_copys_is_left_alone() {
    let lab = Lab::new("markalike");
    let copies = Capture::open(&lab.mon, "eth0");
    let agent = lab.start_agent(&controlled(TO_MIR0, "snaplen = 100"));
    // The node sends to an address behind mir0, marked as the first generation's copy of rule 0
    // (session `ctl`, whose copies are cut to 100 bytes).
    lab.node
        .ip(&["route", "add", "10.99.0.1/32", "dev", "mir0"]);
    lab.node.ip(&[
        "neigh",
        "replace",
        "10.99.0.1",
        "lladdr",
        "02:00:00:00:03:02",
        "dev",
        "mir0",
        "nud",
        "permanent",
    ]);
    let socket = udp_socket(
        &lab.node,
        SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), 0),
    );
    let mark: libc::c_uint = 0x6d69_8000;
    // SAFETY: SO_MARK takes a c_uint of the size given, on a socket we own.
    let set = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&raw const mark).cast(),
            size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "SO_MARK");
    socket
        .send_to(&[7; 500], ("10.99.0.1", 7777))
        .expect("send");
    let (frames, report) = copies_and_report(&lab, &copies, agent);
    let lengths: Vec<usize> = frames.iter().map(Vec::len).collect();
    assert_eq!(lengths, [14 + 20 + 8 + 500], "the node's packet, whole");
    assert_eq!(report.hook("copy", "packets"), 0, "{}", report.0);
}
