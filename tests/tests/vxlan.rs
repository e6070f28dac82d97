//! VXLAN targets end to end: the copy program puts the outer headers on the copies at the
//! underlay's egress (no tunnel device), they cross the underlay link to a collector namespace, and `mirror-agent collect` writes their inner frames to
//! a file and sends them out of a tap. Each test checks the inner frames byte for byte against the
//! frames on the primary path, and lets tshark (an independent decoder) read both the wire and our
//! file.
//!
//! Synchronisation: the collector handles datagrams in order and sends each frame out of `tap0`,
//! so once the sentinel's copy arrives at `tap1`, every copy made before it has been handled.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use mirror_tests::{
    COL_V4, COL_V6, Capture, Collector, Counts, Flow, Frame, Lab, NODE_UL_V4, SENTINEL_PORT,
    SENTINEL_RULE, SINK_MAC, SINK_V4, SINK_V6, SRC_MAC, SRC_V4, SRC_V6, agent_binary,
    assert_same_frames, copied, is_mld_report, is_sentinel, pcap_frames, pin_to_first_cpu, select,
    send_tcp_stream, tcp_stream, tshark_fields, udp_socket, udp_v4_frame, vxlan_of, wait_for,
    write_pcap,
};

/// One session sending to a VXLAN collector; its first rule mirrors the sentinel.
fn vxlan_session(
    name: &str,
    interfaces: &str,
    direction: &str,
    remote: &str,
    vni: u32,
    rules: &str,
) -> String {
    format!(
        "[[session]]\nname = \"{name}\"\ninterfaces = {interfaces}\ndirection = \"{direction}\"\ntarget = {{ vxlan = {{ remote = \"{remote}\", vni = {vni} }} }}\n{SENTINEL_RULE}{rules}"
    )
}

const UDP_5555: &str =
    "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n";

/// Waits for `sentinels` copies of the sentinel at the collector's tap: every copy made before
/// them has then been written. Returns the frames the tap saw.
fn collected_through_tap(tap: &Capture, sentinels: usize) -> Vec<Frame> {
    tap.until_nth(sentinels, is_sentinel)
}

/// Sends five UDP datagrams of growing size over IPv4 and IPv6 to `port` at the sink.
fn send_udp(lab: &Lab, port: u16, sizes: &[usize]) {
    let senders = [
        udp_socket(&lab.src, SocketAddr::new(SRC_V4.into(), 0)),
        udp_socket(&lab.src, SocketAddr::new(SRC_V6.into(), 0)),
    ];
    pin_to_first_cpu();
    for (i, size) in sizes.iter().enumerate() {
        let payload = vec![i as u8; *size];
        senders[0].send_to(&payload, (SINK_V4, port)).expect("send");
        senders[1].send_to(&payload, (SINK_V6, port)).expect("send");
    }
}

#[test]
fn vxlan_copies_carry_the_original_frames() {
    let lab = Lab::with_collector("vxlan", 1600);
    let collector = lab.start_collector("0.0.0.0:4789", "copies.pcap");
    let wire = Capture::open(lab.col(), "eth0");
    let tap = Capture::open(lab.col(), "tap1");
    let agent = lab.start_agent(&vxlan_session(
        "t",
        "[\"src0\", \"sink0\"]",
        "both",
        "192.0.2.2",
        100,
        UDP_5555,
    ));
    let at_src = Capture::open(&lab.src, "eth0");
    let at_sink = Capture::open(&lab.sink, "eth0");
    let receiver = udp_socket(&lab.sink, SocketAddr::new(SINK_V4.into(), 5556));
    send_udp(&lab, 5555, &[60, 300, 700, 1100, 1400]);
    send_udp(&lab, 5556, &[80]);
    lab.send_sentinel();
    // The sentinel is copied at src0 ingress and at sink0 egress.
    let tapped = collected_through_tap(&tap, 2);
    let summary = collector.stop();
    let report = agent.stop();
    let mut buf = [0u8; 100];
    assert_eq!(receiver.recv(&mut buf).expect("primary path"), 80);

    // The copies on the wire: VNI 100, DF set, never fragmented; their inner frames are exactly
    // the frames that entered src0 and left sink0, sentinels included.
    // The kernel's own MLD reports on the underlay (retransmitted for a while after a link comes
    // up) are not copies.
    let wire: Vec<Vec<u8>> = wire
        .drain()
        .into_iter()
        .map(|f| f.bytes)
        .filter(|f| !is_mld_report(f))
        .collect();
    let tunnelled: Vec<_> = wire.iter().filter_map(|f| vxlan_of(f)).collect();
    assert_eq!(tunnelled.len(), wire.len(), "only VXLAN on the underlay");
    assert!(
        tunnelled
            .iter()
            .all(|v| v.vni == 100 && v.dont_fragment && !v.fragment)
    );
    let to = |port: u16| move |f: &Flow| f.proto == Some(17) && f.dst_port == Some(port);
    let mut expected = select(&at_src.drain(), |f, frame| {
        frame.outgoing && (to(5555)(f) || to(9)(f))
    });
    expected.extend(select(&at_sink.drain(), |f, frame| {
        !frame.outgoing && (to(5555)(f) || to(9)(f))
    }));
    assert_eq!(expected.len(), 22, "primary captures");
    let inner: Vec<Vec<u8>> = tunnelled.iter().map(|v| v.inner.clone()).collect();
    assert_same_frames("vxlan inner frames", inner.clone(), expected);

    // The collector wrote them in arrival order, and sent them out of its tap.
    let written: Vec<Vec<u8>> = summary.written().into_iter().map(|(_, f)| f).collect();
    assert_eq!(written, inner);
    assert_eq!(
        tapped.into_iter().map(|f| f.bytes).collect::<Vec<_>>(),
        inner
    );
    assert_eq!(summary.vni_frames(100), 22, "{}", summary.text);
    for field in [
        "short",
        "bad_flags",
        "filtered",
        "socket_drops",
        "tap_errors",
    ] {
        assert_eq!(summary.dropped(field), 0, "{field}: {}", summary.text);
    }

    // tshark agrees: 22 VXLAN datagrams with VNI 100 on the wire, 22 frames in our file with the
    // same inner destination ports.
    let dir = tempfile::tempdir().expect("temp dir");
    let wire_file = dir.path().join("wire.pcap");
    write_pcap(&wire_file, &wire);
    let vnis = tshark_fields(&wire_file, Some("udp.port==4789,vxlan"), &["vxlan.vni"]);
    assert_eq!(vnis, vec!["100"; 22]);
    let ports = |file: &std::path::Path, decode| {
        let mut ports = tshark_fields(file, decode, &["udp.dstport"]);
        ports.sort();
        ports
    };
    let inner_ports: Vec<String> = ports(&wire_file, Some("udp.port==4789,vxlan"))
        .iter()
        .map(|p| p.split(',').next_back().unwrap_or_default().to_owned())
        .collect();
    let mut written_ports = ports(&summary.file, None);
    written_ports.sort();
    assert_eq!(written_ports.len(), 22);
    assert_eq!(
        written_ports.iter().filter(|p| *p == "5555").count(),
        20,
        "{written_ports:?}"
    );
    let mut inner_ports = inner_ports;
    inner_ports.sort();
    assert_eq!(inner_ports, written_ports);

    assert_eq!(report.rule("t", "10"), copied(20, 20));
    assert_eq!(report.hook("copy", "packets"), 22);
    assert_eq!(report.hook("copy", "foreign"), 0);
    assert_eq!(report.target("ul0", "tx_dropped"), 0);
}

#[test]
fn two_sessions_two_vnis_over_an_ipv6_underlay_with_a_tcp_connection() {
    let lab = Lab::with_collector("vxlan6", 1600);
    let collector = lab.start_collector("[::]:4789", "copies.pcapng");
    let tap = Capture::open(lab.col(), "tap1");
    let wire = Capture::open(lab.col(), "eth0");
    let config = [
        vxlan_session(
            "tcp",
            "[\"src0\"]",
            "ingress",
            &COL_V6.to_string(),
            10,
            "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"tcp\"\ndst_port = 7000\n",
        ),
        vxlan_session("udp", "[\"src0\"]", "ingress", &COL_V6.to_string(), 20, UDP_5555),
    ]
    .concat();
    let agent = lab.start_agent(&config);

    // A TCP stream from src to sink (copied at src0 ingress: the client's segments).
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    send_tcp_stream(&lab, &data);
    send_udp(&lab, 5555, &[100, 200]);
    lab.send_sentinel();
    // Both sessions copy the sentinel.
    collected_through_tap(&tap, 2);
    let summary = collector.stop();
    let report = agent.stop();

    // IPv6 outer headers, and each session's copies under its own VNI.
    let wire = wire.drain();
    let vnis: BTreeSet<u32> = wire
        .iter()
        .filter_map(|f| vxlan_of(&f.bytes))
        .map(|v| v.vni)
        .collect();
    assert_eq!(vnis, BTreeSet::from([10, 20]));
    assert!(
        wire.iter()
            .all(|f| Flow::of(&f.bytes).dst == Some(COL_V6.into()))
    );
    let written = summary.written();
    let by_vni = |name: &str| -> Vec<Vec<u8>> {
        written
            .iter()
            .filter(|(n, _)| n.as_deref() == Some(name))
            .map(|(_, f)| f.clone())
            .collect()
    };
    let udp = by_vni("vni 20");
    assert_eq!(udp.len(), 5, "4 datagrams and the sentinel");
    assert!(udp.iter().all(|f| {
        let flow = Flow::of(f);
        flow.proto == Some(17) && matches!(flow.dst_port, Some(5555 | 9))
    }));
    // The TCP copies reassemble to the bytes the client sent.
    let tcp = by_vni("vni 10");
    let stream = tcp_stream(tcp.iter().filter(|f| !is_sentinel(f)), 7000);
    assert_eq!(stream.len(), data.len(), "copied TCP stream length");
    assert!(stream == data, "copied TCP stream bytes");

    assert_eq!(summary.vni_frames(10), tcp.len() as u64, "{}", summary.text);
    assert_eq!(summary.vni_frames(20), 5);
    assert_eq!(summary.dropped("socket_drops"), 0);
    let names = tshark_fields(&summary.file, None, &["frame.interface_name"]);
    assert_eq!(names.len(), written.len());
    assert_eq!(
        names.iter().filter(|n| *n == "vni 20").count(),
        5,
        "tshark reads the pcapng interfaces"
    );
    assert_eq!(report.rule("tcp", "10").too_big, 0, "nothing too big");
    assert_eq!(report.rule("udp", "10"), copied(4, 4));
}

#[test]
fn copies_too_big_for_the_underlay_are_counted_not_fragmented() {
    // Path MTU 1400: the largest inner frame is 1400 - 20 (IP) - 8 (UDP) - 8 (VXLAN) = 1364.
    let lab = Lab::with_collector("vxbig", 1400);
    let collector = lab.start_collector("0.0.0.0:4789", "copies.pcap");
    let tap = Capture::open(lab.col(), "tap1");
    let wire = Capture::open(lab.col(), "eth0");
    let tcp_rule =
        "[[session.rule]]\nnumber = 20\naction = \"mirror\"\nproto = \"tcp\"\ndst_port = 7000\n";
    let agent = lab.start_agent(&vxlan_session(
        "t",
        "[\"src0\"]",
        "ingress",
        "192.0.2.2",
        7,
        &format!("{UDP_5555}{tcp_rule}"),
    ));
    let receiver = udp_socket(&lab.sink, SocketAddr::new(SINK_V4.into(), 5555));
    let sender = udp_socket(&lab.src, SocketAddr::new(SRC_V4.into(), 0));
    pin_to_first_cpu();
    // Frame length = 14 (Ethernet) + 20 (IPv4) + 8 (UDP) + payload.
    let payloads = [1322, 1323, 1322, 1400, 1458];
    for size in payloads {
        sender
            .send_to(&vec![0x5a; size], (SINK_V4, 5555))
            .expect("send");
    }
    // A TCP stream: its full-size segments (GSO or not) make 1514-byte frames, too big.
    send_tcp_stream(&lab, &vec![7; 100_000]);
    lab.send_sentinel();
    let tapped = collected_through_tap(&tap, 1);
    let summary = collector.stop();
    let report = agent.stop();

    // The primary path is untouched: every datagram arrived.
    let mut buf = vec![0u8; 2000];
    for size in payloads {
        assert_eq!(receiver.recv(&mut buf).expect("primary path"), size);
    }
    let udp_lengths: Vec<usize> = tapped
        .iter()
        .filter(|f| Flow::of(&f.bytes).dst_port == Some(5555))
        .map(|f| f.bytes.len())
        .collect();
    assert_eq!(udp_lengths, [1364, 1364], "only the copies that fit arrive");
    assert!(tapped.iter().all(|f| f.bytes.len() <= 1364));
    let Counts {
        matched,
        mirrored,
        too_big,
        ..
    } = report.rule("t", "20");
    assert!(too_big > 0, "the TCP data segments are too big");
    assert_eq!(matched, mirrored + too_big);
    let tcp_copies = tapped
        .iter()
        .filter(|f| Flow::of(&f.bytes).dst_port == Some(7000))
        .count();
    assert_eq!(tcp_copies as u64, mirrored, "the small TCP segments arrive");
    assert!(
        wire.drain()
            .iter()
            .filter_map(|f| vxlan_of(&f.bytes))
            .all(|v| v.dont_fragment && !v.fragment)
    );
    assert_eq!(
        report.rule("t", "10"),
        Counts {
            matched: 5,
            mirrored: 2,
            too_big: 3,
            ..Counts::default()
        },
        "3 copies too big"
    );
    assert_eq!(summary.vni_frames(7), 3 + mirrored);
}

#[test]
fn the_outer_source_port_follows_the_inner_flow() {
    let lab = Lab::with_collector("vxport", 1600);
    let collector = lab.start_collector("0.0.0.0:4789", "copies.pcap");
    let tap = Capture::open(lab.col(), "tap1");
    let wire = Capture::open(lab.col(), "eth0");
    // Both directions of each conversation: requests in at src0, replies out of src0.
    let agent = lab.start_agent(&vxlan_session(
        "t",
        "[\"src0\"]",
        "both",
        "192.0.2.2",
        1,
        &format!(
            "{UDP_5555}[[session.rule]]\nnumber = 20\naction = \"mirror\"\nproto = \"udp\"\nsrc_port = 5555\n"
        ),
    ));
    let server = udp_socket(&lab.sink, SocketAddr::new(SINK_V4.into(), 5555));
    let flows: Vec<_> = (0..12)
        .map(|_| udp_socket(&lab.src, SocketAddr::new(SRC_V4.into(), 0)))
        .collect();
    pin_to_first_cpu();
    for round in 0..4u8 {
        for flow in &flows {
            flow.send_to(&[round; 64], (SINK_V4, 5555)).expect("send");
        }
    }
    let mut buffer = [0u8; 64];
    for _ in 0..flows.len() * 4 {
        let (len, client) = server.recv_from(&mut buffer).expect("request");
        server.send_to(&buffer[..len], client).expect("reply");
    }
    lab.send_sentinel();
    collected_through_tap(&tap, 1);
    collector.stop();
    agent.stop();

    // By the client's port: the outer source ports of the requests' and the replies' copies.
    let mut ports: BTreeMap<Option<u16>, (usize, BTreeSet<u16>)> = BTreeMap::new();
    for vxlan in wire.drain().iter().filter_map(|f| vxlan_of(&f.bytes)) {
        if !is_sentinel(&vxlan.inner) {
            let flow = Flow::of(&vxlan.inner);
            let client = if flow.src_port == Some(5555) {
                flow.dst_port
            } else {
                flow.src_port
            };
            let entry = ports.entry(client).or_default();
            entry.0 += 1;
            entry.1.insert(vxlan.outer_src_port);
        }
    }
    assert_eq!(ports.len(), flows.len(), "every flow was copied");
    for (flow, (copies, outer)) in &ports {
        assert_eq!(*copies, 8, "4 requests and 4 replies of {flow:?}");
        assert_eq!(
            outer.len(),
            1,
            "conversation of port {flow:?} used outer ports {outer:?}"
        );
    }
    let distinct: BTreeSet<u16> = ports.values().flat_map(|(_, p)| p).copied().collect();
    assert!(
        distinct.len() >= flows.len() / 2,
        "12 flows should spread over many outer ports, got {distinct:?}"
    );
}

#[test]
fn tunnel_packets_on_a_watched_underlay_are_not_mirrored_again() {
    let lab = Lab::with_collector("vxloop", 1600);
    let collector = lab.start_collector("0.0.0.0:4789", "copies.pcap");
    let tap = Capture::open(lab.col(), "tap1");
    // The session watches the underlay too, and mirrors everything by default: without the tunnel
    // guard, each copy leaving ul0 would be copied again, without end.
    let config = vxlan_session(
        "t",
        "[\"src0\", \"ul0\"]",
        "both",
        &COL_V4.to_string(),
        5,
        "",
    )
    .replace("[[session.rule]]", "default = \"mirror\"\n[[session.rule]]");
    let agent = lab.start_agent(&config);
    let _receiver = udp_socket(&lab.sink, SocketAddr::new(SINK_V4.into(), 5555));
    let sender = udp_socket(&lab.src, SocketAddr::new(SRC_V4.into(), 0));
    pin_to_first_cpu();
    for i in 0..10u8 {
        sender.send_to(&[i; 100], (SINK_V4, 5555)).expect("send");
    }
    lab.send_sentinel();
    let tapped = collected_through_tap(&tap, 1);
    let summary = collector.stop();
    let report = agent.stop();

    assert_eq!(
        tapped.len(),
        11,
        "each datagram copied once, then the sentinel"
    );
    assert_eq!(summary.vni_frames(5), 11);
    // Each of the 11 copies crossed ul0's egress once and was skipped there by the guard.
    assert_eq!(report.rule("t", "guard"), copied(11, 0));
    assert_eq!(report.session("t").mirrored, 11);
}

/// The collector's `/metrics` once it has taken the test below's 13 frames (12 of 1,000 bytes
/// and the 50-byte sentinel; published within 100 ms): valid `OpenMetrics` text with the counts
/// of its summary.
fn check_collector_metrics(lab: &Lab) {
    let address: SocketAddr = "127.0.0.1:9478".parse().expect("address");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let body = loop {
        let (line, body) = mirror_tests::http_get(lab.col(), address, "/metrics");
        assert!(line.contains(" 200 "), "{line}");
        if body.contains("mirror_collect_frames_total{stream=\"vxlan:5\"} 13") {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    for expected in [
        "mirror_collect_frame_bytes_total{stream=\"vxlan:5\"} 12050",
        "mirror_collect_dropped_total{reason=\"short\"} 1",
        "mirror_collect_dropped_total{reason=\"bad_flags\"} 1",
        "mirror_collect_dropped_total{reason=\"filtered\"} 1",
        "mirror_collect_dropped_total{reason=\"tap_errors\"} 0",
        "mirror_collect_build_info{version=\"0.1.0\"} 1",
    ] {
        assert!(body.contains(expected), "{expected} in:\n{body}");
    }
    mirror_tests::check_openmetrics(&body, "mirror_collect_");
}

#[test]
fn the_collector_counts_bad_datagrams_filters_vnis_and_rotates_files() {
    let lab = Lab::with_collector("vxcol", 1500);
    let collector = Collector::start(
        lab.col(),
        &agent_binary(),
        "0.0.0.0:4789",
        "copies.pcap",
        &[
            "--tap",
            "tap0",
            "--vni",
            "5",
            "--rotate-bytes",
            "4096",
            "--rotate-count",
            "2",
            "--metrics",
            "127.0.0.1:9478",
        ],
    );
    let tap = Capture::open(lab.col(), "tap1");
    let sender = udp_socket(&lab.node, SocketAddr::new(NODE_UL_V4.into(), 0));
    let datagram = |flags: u8, vni: u32, inner: &[u8]| {
        let mut d = vec![flags, 0, 0, 0];
        d.extend_from_slice(&(vni << 8).to_be_bytes());
        d.extend_from_slice(inner);
        d
    };
    let frame = |i: u8| udp_v4_frame(SRC_MAC, SINK_MAC, 6000, &[i; 958]);
    pin_to_first_cpu();
    let mut sent = Vec::new();
    for i in 0..12u8 {
        sender
            .send_to(&datagram(0x08, 5, &frame(i)), (COL_V4, 4789))
            .expect("send");
        sent.push(frame(i));
        if i == 3 {
            for bad in [
                vec![0x08, 0, 0],             // short
                datagram(0x00, 5, &frame(i)), // no I flag
                datagram(0x08, 6, &frame(i)), // another VNI
            ] {
                sender.send_to(&bad, (COL_V4, 4789)).expect("send");
            }
        }
    }
    let sentinel = udp_v4_frame(SRC_MAC, SINK_MAC, SENTINEL_PORT, b"sentinel");
    sender
        .send_to(&datagram(0x08, 5, &sentinel), (COL_V4, 4789))
        .expect("send");
    let tapped = tap.until_nth(1, is_sentinel);
    check_collector_metrics(&lab);
    let summary = collector.stop();

    sent.push(sentinel);
    assert_eq!(
        tapped.into_iter().map(|f| f.bytes).collect::<Vec<_>>(),
        sent,
        "the accepted frames, in order, out of the tap"
    );
    assert_eq!(summary.vni_frames(5), 13, "{}", summary.text);
    assert_eq!(summary.vni_frames(6), 0);
    for field in ["short", "bad_flags", "filtered"] {
        assert_eq!(summary.dropped(field), 1, "{field}: {}", summary.text);
    }
    // 1,000-byte frames (1,016 bytes with their pcap record header): a file takes a fifth frame
    // at 4,064 bytes and is full after it, so frames 0–4, 5–9 and 10–12 went to files 1, 2 and 3,
    // and only the newest two files are kept.
    let dir = summary.file.parent().expect("dir");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["copies-000002.pcap", "copies-000003.pcap"]);
    let kept: Vec<Vec<u8>> = names
        .iter()
        .flat_map(|name| pcap_frames(&dir.join(name)))
        .collect();
    assert_eq!(kept, sent[5..], "the newest files hold the last frames");
}

/// A small tmpfs, unmounted on drop.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(bytes: u64) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        mirror_tests::run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes}"),
                "tmpfs",
                dir.path().to_str().expect("utf-8"),
            ],
        );
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

/// The collector on a full disk and under a flood of VNIs: a full disk is counted, not fatal,
/// and the capture goes on in a new file once there is room; the streams it keeps apart are
/// bounded, and the datagrams past the bound counted; the summary comes at the end.
#[test]
fn the_collector_survives_a_full_disk_and_a_flood_of_vnis() {
    let lab = Lab::with_collector("vxfull", 1500);
    let disk = SmallDisk::mount(64 * 1024);
    let file = disk.0.path().join("copies.pcap");
    let collector = Collector::start_at(lab.col(), &agent_binary(), "0.0.0.0:4789", &file, &[]);
    let sender = udp_socket(&lab.node, SocketAddr::new(NODE_UL_V4.into(), 0));
    let datagram = |vni: u32, payload: u8| {
        let mut d = vec![0x08, 0, 0, 0];
        d.extend_from_slice(&(vni << 8).to_be_bytes());
        d.extend_from_slice(&udp_v4_frame(SRC_MAC, SINK_MAC, 6000, &[payload; 100]));
        d
    };
    // 5,000 VNIs of one 142-byte frame each: more streams than are kept apart, and more bytes
    // than the disk holds.
    let vnis = 5000;
    for vni in 1..=vnis {
        sender
            .send_to(&datagram(vni, 1), (COL_V4, 4789))
            .expect("send");
    }
    // Room again: the capture goes on in the next file.
    wait_for("the capture to go on in a new file", || {
        let _ = std::fs::remove_file(&file);
        sender
            .send_to(&datagram(1, 2), (COL_V4, 4789))
            .expect("send");
        disk.0.path().join("copies-000001.pcap").exists()
    });
    let summary = collector.stop();
    println!("{}", summary.text);
    assert!(summary.dropped("write_errors") > 0, "{}", summary.text);
    assert_eq!(
        summary.dropped("too_many_streams"),
        u64::from(vnis) - 4096,
        "{}",
        summary.text
    );
    assert_eq!(summary.dropped("socket_drops"), 0, "{}", summary.text);
    let resumed = mirror_tests::pcap_frames(&disk.0.path().join("copies-000001.pcap"));
    assert!(
        !resumed.is_empty()
            && resumed
                .iter()
                .all(|f| *f == udp_v4_frame(SRC_MAC, SINK_MAC, 6000, &[2; 100])),
        "the new file holds the frames sent after the disk had room"
    );
}

/// The collector's file gets the frames while it runs, in whole blocks, not only at its stop.
#[test]
fn the_collector_writes_its_file_while_it_runs() {
    let lab = Lab::with_collector("colflush", 1600);
    let collector = lab.start_collector("0.0.0.0:4789", "copies.pcap");
    let agent = lab.start_agent(&vxlan_session(
        "t",
        "[\"src0\"]",
        "ingress",
        "192.0.2.2",
        100,
        "",
    ));
    lab.send_sentinel();
    wait_for("the sentinel's copy in the collector's file", || {
        mirror_tests::frames_so_far(collector.file()) == 1
    });
    drop(agent.stop());
    let summary = collector.stop();
    assert_eq!(summary.vni_frames(100), 1);
}

/// A flood of made-up VNIs fills the collector's stream table (sent well within the idle time),
/// and the streams age out once idle: a stream that comes afterwards is taken again
/// (`--stream-idle`), and the forgotten streams are counted.
#[test]
fn idle_collector_streams_age_out_and_make_room() {
    let lab = Lab::with_collector("vxage", 1500);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("copies.pcap");
    let collector = Collector::start_at(
        lab.col(),
        &agent_binary(),
        "0.0.0.0:4789",
        &file,
        &["--stream-idle", "3"],
    );
    let sender = udp_socket(&lab.node, SocketAddr::new(NODE_UL_V4.into(), 0));
    let datagram = |vni: u32| {
        let mut d = vec![0x08, 0, 0, 0];
        d.extend_from_slice(&(vni << 8).to_be_bytes());
        d.extend_from_slice(&udp_v4_frame(SRC_MAC, SINK_MAC, 6000, &[7; 100]));
        d
    };
    let flood = 5000;
    for vni in 1..=flood {
        sender
            .send_to(&datagram(vni), (COL_V4, 4789))
            .expect("send");
    }
    wait_for("the flood's frames in the file", || {
        mirror_tests::frames_so_far(&file) == 4096
    });
    // The table is full: VNI 7777 is refused until the flood's streams are idle long enough.
    wait_for("a frame of VNI 7777 in the file", || {
        sender
            .send_to(&datagram(7777), (COL_V4, 4789))
            .expect("send");
        mirror_tests::frames_so_far(&file) > 4096
    });
    let summary = collector.stop();
    assert!(summary.stream_frames("vxlan:7777") >= 1, "{}", summary.text);
    // Forgotten in sweeps a second apart: some or all of the flood's by the stop.
    let aged_out = summary.dropped("aged_out");
    assert!((1..=4096).contains(&aged_out), "{}", summary.text);
    assert!(
        summary.dropped("too_many_streams") >= u64::from(flood) - 4096,
        "{}",
        summary.text
    );
}
