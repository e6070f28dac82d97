//! The four tunnel formats the copy program builds (VXLAN, GENEVE, GRE, ERSPAN II and III), end
//! to end: copies leave the node's underlay with the session's outer headers and no tunnel
//! device, cross to a collector namespace, and `mirror-agent collect` writes their inner frames.
//! Each format is checked against the frames of the primary path byte for byte, against a TCP
//! stream reassembled from its (GSO) copies, and by tshark, an independent decoder. The next hop
//! is followed: a gateway's new MAC address, a route moved to another interface and a route
//! removed and restored, under traffic.
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use mirror_tests::{
    COL_MAC, COL_V4, COL_V6, Capture, Collector, Flow, FrameSender, Lab, NODE_SINK_MAC,
    NODE_SRC_MAC, NODE_UL_V4, SENTINEL_RULE, SINK_V4, SINK_V6, SRC_MAC, SRC_V4, SRC_V6,
    TrafficLoop, agent_binary, assert_same_frames, is_mld_report, is_sentinel, mac,
    pin_to_first_cpu, select, send_tcp_stream, tagged, tcp_stream, tshark_fields, tunnelled,
    udp_datagrams_delivered, udp_socket, udp_v4_frame, write_pcap,
};

/// One tunnel format: the session's target, what the collector needs to receive it, and what
/// the copies must say.
struct Format {
    name: &'static str,
    /// What [`tunnelled`] reads the copies as.
    kind: &'static str,
    target: String,
    collector: Vec<String>,
    stream: &'static str,
    id: Option<u32>,
    /// tshark fields that must read `expected` on every copy on the wire.
    tshark: Vec<(&'static str, &'static str)>,
}

fn formats(remote: IpAddr) -> Vec<Format> {
    let any = if remote.is_ipv4() { "0.0.0.0" } else { "[::]" };
    let gre_listen = vec!["--gre".to_owned(), remote.to_string()];
    vec![
        Format {
            name: "vxlan",
            kind: "vxlan",
            target: format!("{{ vxlan = {{ remote = \"{remote}\", vni = 100 }} }}"),
            collector: vec![],
            stream: "vxlan:100",
            id: Some(100),
            tshark: vec![("vxlan.vni", "100")],
        },
        Format {
            name: "geneve",
            kind: "geneve",
            target: format!("{{ geneve = {{ remote = \"{remote}\", vni = 200 }} }}"),
            collector: vec!["--geneve".to_owned(), format!("{any}:6081")],
            stream: "geneve:200",
            id: Some(200),
            tshark: vec![("geneve.vni", "0x0000c8"), ("geneve.proto_type", "0x6558")],
        },
        Format {
            name: "gre",
            kind: "gre",
            target: format!("{{ gre = {{ remote = \"{remote}\", key = 300 }} }}"),
            collector: gre_listen.clone(),
            stream: "gre:300",
            id: Some(300),
            tshark: vec![("gre.key", "0x0000012c"), ("gre.proto", "0x6558")],
        },
        Format {
            name: "erspan2",
            kind: "erspan",
            target: format!("{{ erspan = {{ remote = \"{remote}\", session_id = 5 }} }}"),
            collector: gre_listen.clone(),
            stream: "erspan:5",
            id: Some(5),
            tshark: vec![("erspan.version", "1"), ("erspan.spanid", "5")],
        },
        Format {
            name: "erspan3",
            kind: "erspan",
            target: format!(
                "{{ erspan = {{ remote = \"{remote}\", session_id = 6, version = 3 }} }}"
            ),
            collector: gre_listen,
            stream: "erspan:6",
            id: Some(6),
            tshark: vec![("erspan.version", "2"), ("erspan.spanid", "6")],
        },
    ]
}

const RULES: &str = "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n\
                     [[session.rule]]\nnumber = 20\naction = \"mirror\"\nproto = \"tcp\"\ndst_port = 7000\n";

/// Copies src0's ingress and sink0's egress (UDP to 5555, TCP to 7000, the sentinel) to `format`
/// and checks everything the collector and the wire show.
fn carries_the_original_frames(format: &Format, remote: IpAddr) {
    let lab = Lab::with_collector(&format!("t{}", format.name), 1600);
    let listen = if remote.is_ipv4() {
        "0.0.0.0:4789"
    } else {
        "[::]:4789"
    };
    let mut extra: Vec<&str> = vec!["--tap", "tap0"];
    extra.extend(format.collector.iter().map(String::as_str));
    let collector = Collector::start(lab.col(), &agent_binary(), listen, "copies.pcapng", &extra);
    let wire = Capture::open(lab.col(), "eth0");
    let tap = Capture::open(lab.col(), "tap1");
    let agent = lab.start_agent(&format!(
        "[[session]]\nname = \"t\"\ninterfaces = [\"src0\", \"sink0\"]\ndirection = \"both\"\ntarget = {}\n{SENTINEL_RULE}{RULES}",
        format.target
    ));
    let at_src = Capture::open(&lab.src, "eth0");
    let at_sink = Capture::open(&lab.sink, "eth0");
    let (senders, receiver) = (
        [
            udp_socket(&lab.src, SocketAddr::new(SRC_V4.into(), 0)),
            udp_socket(&lab.src, SocketAddr::new(SRC_V6.into(), 0)),
        ],
        udp_socket(&lab.sink, SocketAddr::new(SINK_V4.into(), 5555)),
    );
    pin_to_first_cpu();
    for (i, size) in [60, 300, 1400].into_iter().enumerate() {
        let payload = vec![i as u8; size];
        senders[0].send_to(&payload, (SINK_V4, 5555)).expect("send");
        senders[1].send_to(&payload, (SINK_V6, 5555)).expect("send");
    }
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    send_tcp_stream(&lab, &data);
    lab.send_sentinel();
    // The sentinel is copied at src0 ingress and at sink0 egress: every copy made before is in.
    tap.until_nth(2, is_sentinel);
    let summary = collector.stop();
    let report = agent.stop();
    let mut buffer = [0u8; 1500];
    assert_eq!(receiver.recv(&mut buffer).expect("primary path"), 60);

    // What reached the collector (its own replies and the kernel's MLD reports are not copies).
    let wire: Vec<Vec<u8>> = wire
        .drain()
        .into_iter()
        .filter(|f| !f.outgoing)
        .map(|f| f.bytes)
        .filter(|f| !is_mld_report(f))
        .collect();
    let not_tcp = |f: &Flow| f.proto == Some(17) && matches!(f.dst_port, Some(5555 | 9));
    let mut expected = select(&at_src.drain(), |f, frame| frame.outgoing && not_tcp(f));
    expected.extend(select(&at_sink.drain(), |f, frame| {
        !frame.outgoing && not_tcp(f)
    }));
    check_copies(format, &wire, expected, &data);
    check_collector(format, &summary, &data);
    check_tshark(format, &wire, &["0", "1"]);
    // The agent's side: every copy counted, none lost, and nothing of a tunnel on the node: no
    // socket that listens, no tunnel device.
    let what = format.name;
    let session = report.session("t");
    assert_eq!(
        session.clone_errors + session.no_route + session.too_big,
        0,
        "{}",
        report.0
    );
    assert_eq!(report.hook("copy", "copy_errors"), 0);
    assert_eq!(report.target("ul0", "tx_dropped"), 0);
    assert_eq!(
        lab.node.exec(&["ss", "-Hulnw"]).trim(),
        "",
        "{what}: no listener"
    );
    assert_eq!(
        link_kinds(&lab.node),
        BTreeSet::from(["veth".to_owned()]),
        "{what}: no tunnel device"
    );
}

/// The TCP client's bytes (port 7000) out of frames.
fn client_stream(frames: &[Vec<u8>]) -> Vec<u8> {
    let client: Vec<Vec<u8>> = frames
        .iter()
        .filter(|f| Flow::of(f).dst_port == Some(7000))
        .cloned()
        .collect();
    tcp_stream(&client, 7000)
}

/// The copies on the wire: all of the format, whole, to the next hop; their inner frames are the
/// primary path's (`expected`, UDP and the sentinel) byte for byte and carry the TCP stream.
fn check_copies(format: &Format, wire: &[Vec<u8>], expected: Vec<Vec<u8>>, data: &[u8]) {
    let what = format.name;
    let copies: Vec<_> = wire.iter().filter_map(|f| tunnelled(f)).collect();
    assert_eq!(
        copies.len(),
        wire.len(),
        "{what}: only copies on the underlay"
    );
    for copy in &copies {
        assert_eq!(copy.format, format.kind);
        assert_eq!(copy.id, format.id, "{what}");
        assert!(copy.whole, "{what}: DF set, never fragmented");
        assert_eq!(
            copy.outer_dst_mac,
            mac(COL_MAC),
            "{what}: addressed to the next hop"
        );
    }
    assert_eq!(expected.len(), 14, "{what}: primary captures");
    let (tcp, other): (Vec<Vec<u8>>, Vec<Vec<u8>>) = copies
        .iter()
        .map(|c| c.inner.clone())
        .partition(|f| Flow::of(f).proto == Some(6));
    assert_same_frames(what, other, expected);
    assert!(client_stream(&tcp) == data, "{what}: TCP on the wire");
    // ERSPAN: one sequence number per copy, none skipped.
    if format.kind == "erspan" {
        let numbers: BTreeSet<u32> = copies.iter().filter_map(|c| c.sequence).collect();
        assert_eq!(numbers.len(), copies.len(), "{what}: one number per copy");
        assert_eq!(
            numbers.last().copied(),
            Some(numbers.len() as u32 - 1),
            "{what}: numbered from 0 without a gap"
        );
    }
    // ERSPAN type III: the direction bit tells src0's ingress (frames from the source's MAC) from
    // sink0's egress (frames from the node's MAC on sink0).
    if what == "erspan3" {
        for copy in &copies {
            let source = &copy.inner[6..12];
            let egress = if source == mac(SRC_MAC) {
                false
            } else {
                assert_eq!(source, mac(NODE_SINK_MAC), "{what}");
                true
            };
            assert_eq!(
                copy.egress,
                Some(egress),
                "{what}: {:?}",
                Flow::of(&copy.inner)
            );
        }
    }
}

/// The collector wrote the TCP stream whole and counted every frame of the stream, none lost.
fn check_collector(format: &Format, summary: &mirror_tests::CollectorSummary, data: &[u8]) {
    let what = format.name;
    let written: Vec<Vec<u8>> = summary.written().into_iter().map(|(_, f)| f).collect();
    assert!(client_stream(&written) == data, "{what}: TCP as written");
    assert_eq!(
        summary.stream_frames(format.stream),
        written.len() as u64,
        "{what}: {}",
        summary.text
    );
    assert_eq!(summary.stream_lost(format.stream), 0, "{}", summary.text);
    for field in ["short", "bad_flags", "filtered", "socket_drops"] {
        assert_eq!(
            summary.dropped(field),
            0,
            "{what} {field}: {}",
            summary.text
        );
    }
}

/// tshark reads the outer headers as the format says, and ERSPAN type III's direction bits as
/// `directions` (the distinct values seen).
fn check_tshark(format: &Format, wire: &[Vec<u8>], directions: &[&str]) {
    let what = format.name;
    let dir = tempfile::tempdir().expect("temp dir");
    let wire_file = dir.path().join("wire.pcap");
    write_pcap(&wire_file, wire);
    let decode = (what == "vxlan").then_some("udp.port==4789,vxlan");
    for (field, value) in &format.tshark {
        let values = tshark_fields(&wire_file, decode, &[field]);
        assert_eq!(values.len(), wire.len(), "{what}: {field}");
        assert!(
            values.iter().all(|v| v.split(',').next() == Some(*value)),
            "{what}: {field} = {values:?}"
        );
    }
    if what == "erspan3" {
        let seen: BTreeSet<String> = tshark_fields(&wire_file, None, &["erspan.direction"])
            .into_iter()
            .collect();
        let directions: BTreeSet<String> = directions.iter().map(|d| (*d).to_owned()).collect();
        assert_eq!(seen, directions, "tshark's ERSPAN direction bits");
    }
}

#[test]
fn every_format_carries_the_original_frames_over_ipv4() {
    for format in formats(COL_V4.into()) {
        carries_the_original_frames(&format, COL_V4.into());
    }
}

#[test]
fn vxlan_gre_and_erspan_carry_the_original_frames_over_ipv6() {
    for format in formats(COL_V6.into())
        .into_iter()
        .filter(|f| ["vxlan", "gre", "erspan3"].contains(&f.name))
    {
        carries_the_original_frames(&format, COL_V6.into());
    }
}

/// XDP sessions' copies go through the ring and the agent sends them itself (raw sockets): the
/// same formats, byte for byte, that tshark reads the same way.
#[test]
fn xdp_sessions_send_every_format_from_the_agent() {
    for format in formats(COL_V4.into())
        .into_iter()
        .filter(|f| f.name != "vxlan")
    {
        let what = format.name;
        let lab = Lab::with_collector(&format!("x{what}"), 1600);
        let wire = Capture::open(lab.col(), "eth0");
        let agent = lab.start_agent(&format!(
            "[[session]]\nname = \"t\"\ninterfaces = [\"src0\"]\nhook = \"xdp\"\ntarget = {}\n{SENTINEL_RULE}{RULES}",
            format.target
        ));
        let sent = Capture::open(&lab.src, "eth0");
        let _receiver = udp_socket(&lab.sink, SocketAddr::new(SINK_V4.into(), 5555));
        let socket = udp_socket(&lab.src, SocketAddr::new(SRC_V4.into(), 0));
        pin_to_first_cpu();
        for size in [20usize, 500, 1400] {
            socket
                .send_to(&vec![3; size], (SINK_V4, 5555))
                .expect("send");
        }
        lab.send_sentinel();
        let wire: Vec<Vec<u8>> = wire
            .until_nth(1, |f| tunnelled(f).is_some_and(|t| is_sentinel(&t.inner)))
            .into_iter()
            .filter(|f| !f.outgoing && !is_mld_report(&f.bytes))
            .map(|f| f.bytes)
            .collect();
        let report = agent.stop();
        let copies: Vec<_> = wire.iter().filter_map(|f| tunnelled(f)).collect();
        assert_eq!(
            copies.len(),
            wire.len(),
            "{what}: only copies on the underlay"
        );
        let expected = select(&sent.drain(), |f, frame| {
            frame.outgoing && matches!(f.dst_port, Some(5555 | 9))
        });
        let inner: Vec<Vec<u8>> = copies.iter().map(|c| c.inner.clone()).collect();
        assert_eq!(
            inner, expected,
            "{what}: inner frames, byte for byte, in order"
        );
        for copy in &copies {
            assert_eq!((copy.format, copy.id), (format.kind, format.id), "{what}");
            assert!(copy.whole, "{what}");
        }
        if format.kind == "erspan" {
            let numbers: Vec<u32> = copies.iter().filter_map(|c| c.sequence).collect();
            assert_eq!(numbers, [0, 1, 2, 3], "{what}: numbered in order");
        }
        if what == "erspan3" {
            assert!(
                copies.iter().all(|c| c.egress == Some(false)),
                "XDP sees received packets"
            );
        }
        check_tshark(&format, &wire, &["0"]);
        assert_eq!(report.ring("t", "failed"), 0, "{}", report.0);
        assert_eq!(report.ring("t", "sent"), 4, "{}", report.0);
    }
}

/// Frames the kernel took a VLAN tag out of (into metadata) keep it inside the tunnel, a second
/// tag too, and frames that are not IP (which grow at the head, not with the encapsulation
/// helper) are carried whole; ERSPAN II says which VLAN a copy came from.
#[test]
fn tags_and_non_ip_frames_stay_whole_inside_the_tunnel() {
    let lab = Lab::with_collector("ttags", 1600);
    let wire = Capture::open(lab.col(), "eth0");
    let agent = lab.start_agent(&format!(
        "[[session]]\nname = \"t\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\ntarget = {{ erspan = {{ remote = \"{COL_V4}\", session_id = 9 }} }}\n{SENTINEL_RULE}\
         [[session.rule]]\nnumber = 10\naction = \"mirror\"\nethertype = \"arp\"\n\
         [[session.rule]]\nnumber = 20\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n"
    ));
    let udp = udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 5555, &[5; 100]);
    // ARP request for 10.10.1.1 from the source (an ethertype rule matches it).
    let mut arp = mac("ff:ff:ff:ff:ff:ff").to_vec();
    arp.extend_from_slice(&mac(SRC_MAC));
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&mac(SRC_MAC));
    arp.extend_from_slice(&SRC_V4.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[10, 10, 1, 1]);
    arp.resize(60, 0);
    let frames = [
        tagged(&udp, &[(0x8100, 100)]),
        tagged(&udp, &[(0x88a8, 200), (0x8100, 300)]),
        arp,
        udp.clone(),
    ];
    let sender = FrameSender::open(&lab.src, "eth0");
    for frame in &frames {
        sender.send(frame);
    }
    sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
    let wire: Vec<Vec<u8>> = wire
        .until_nth(1, |f| tunnelled(f).is_some_and(|t| is_sentinel(&t.inner)))
        .into_iter()
        .filter(|f| !f.outgoing && !is_mld_report(&f.bytes))
        .map(|f| f.bytes)
        .collect();
    let report = agent.stop();
    let inner: Vec<Vec<u8>> = wire
        .iter()
        .filter_map(|f| tunnelled(f))
        .map(|t| t.inner)
        .filter(|f| !is_sentinel(f))
        .collect();
    assert_eq!(inner, frames, "tags and ARP, byte for byte, in order");
    assert_eq!(report.hook("copy", "copy_errors"), 0, "{}", report.0);
    // ERSPAN II: the VLAN of the tag the kernel held (the outer one), and "tag kept in the frame".
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("wire.pcap");
    write_pcap(&file, &wire);
    let fields = tshark_fields(&file, None, &["erspan.vlan", "erspan.encap"]);
    assert_eq!(
        fields[..4],
        ["100\t3", "200\t3", "0\t0", "0\t0"],
        "{fields:?}"
    );
}

/// Copies over IPv6 carry a zero UDP checksum (RFC 6935, RFC 6936): a stock Linux VXLAN device
/// that allows it (`udp6zerocsumrx`) takes them, and hands on the inner frames unchanged.
#[test]
fn a_stock_linux_vxlan_device_takes_the_ipv6_copies() {
    let lab = Lab::with_collector("tstock", 1600);
    let col = lab.col();
    col.ip(&[
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "100",
        "dstport",
        "4789",
        "local",
        &COL_V6.to_string(),
        "udp6zerocsumrx",
        "nolearning",
    ]);
    col.ip(&["link", "set", "vx0", "up"]);
    let decapsulated = Capture::open(col, "vx0");
    let agent = lab.start_agent(&format!(
        "[[session]]\nname = \"t\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\ntarget = {{ vxlan = {{ remote = \"{COL_V6}\", vni = 100 }} }}\n{SENTINEL_RULE}\
         [[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n"
    ));
    let at_src = Capture::open(&lab.src, "eth0");
    let sender = udp_socket(&lab.src, SocketAddr::new(SRC_V6.into(), 0));
    pin_to_first_cpu();
    for size in [10, 500, 1400] {
        sender
            .send_to(&vec![7; size], (SINK_V6, 5555))
            .expect("send");
    }
    lab.send_sentinel();
    let received: Vec<Vec<u8>> = decapsulated
        .until_nth(1, is_sentinel)
        .into_iter()
        .filter(|f| !f.outgoing)
        .map(|f| f.bytes)
        .collect();
    drop(agent);
    let sent = select(&at_src.drain(), |f, frame| {
        frame.outgoing && matches!(f.dst_port, Some(5555 | 9))
    });
    assert_same_frames("out of a kernel VXLAN device", received, sent);
}

/// What arrives at the node's VXLAN and GENEVE ports is not decapsulated: no device, no socket.
#[test]
fn a_datagram_injected_toward_the_node_reaches_nothing() {
    let lab = Lab::with_collector("tinject", 1500);
    let agent = lab.start_agent(&format!(
        "[[session]]\nname = \"v\"\ninterfaces = [\"src0\"]\ntarget = {{ vxlan = {{ remote = \"{COL_V4}\", vni = 1 }} }}\n{SENTINEL_RULE}\
         [[session]]\nname = \"g\"\ninterfaces = [\"src0\"]\ntarget = {{ geneve = {{ remote = \"{COL_V4}\", vni = 1 }} }}\n{SENTINEL_RULE}"
    ));
    // An IPv4/UDP packet to the broadcast MAC "from" 192.0.2.99 to the node's port 7777, where a
    // socket waits: it must never get it.
    let listener = udp_socket(&lab.node, SocketAddr::new([0, 0, 0, 0].into(), 7777));
    listener.set_nonblocking(true).expect("non-blocking");
    let builder = etherparse::PacketBuilder::ethernet2(mac(SRC_MAC), [0xff; 6])
        .ipv4([192, 0, 2, 99], NODE_UL_V4.octets(), 64)
        .udp(40_000, 7777);
    let mut inner = Vec::new();
    builder
        .write(&mut inner, b"let me in")
        .expect("build frame");
    let before = udp_datagrams_delivered(&lab.node);
    let attacker = udp_socket(lab.col(), SocketAddr::new(COL_V4.into(), 0));
    let mut vxlan = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
    vxlan.extend_from_slice(&inner);
    let mut geneve = vec![0, 0, 0x65, 0x58, 0, 0, 1, 0];
    geneve.extend_from_slice(&inner);
    // Answered by ICMP port unreachable: proof that it arrived and found nothing.
    let icmp = Capture::open(lab.col(), "eth0");
    for (datagram, port) in [(&vxlan, 4789), (&geneve, 6081)] {
        attacker
            .send_to(datagram, (NODE_UL_V4, port))
            .expect("send");
    }
    let unreachable = icmp.until_nth(2, |f| {
        let flow = Flow::of(f);
        flow.proto == Some(1) && f.get(34) == Some(&3)
    });
    assert!(unreachable.len() >= 2);
    let mut buffer = [0u8; 64];
    assert!(
        listener.recv(&mut buffer).is_err(),
        "the inner packet got in"
    );
    assert_eq!(udp_datagrams_delivered(&lab.node), before);
    let listening = lab
        .node
        .exec(&["ss", "-Hulnw", "sport = :4789 or sport = :6081"]);
    assert_eq!(listening.trim(), "", "nothing listens on the tunnel ports");
    assert_eq!(
        link_kinds(&lab.node),
        BTreeSet::from(["veth".to_owned()]),
        "no tunnel device"
    );
    drop(agent);
}

/// The kinds of the links in a namespace (`ip -d link`'s `info_kind`), loopback left out.
fn link_kinds(ns: &mirror_tests::Netns) -> BTreeSet<String> {
    let links: Vec<serde_json::Value> =
        serde_json::from_str(&ns.ip(&["-j", "-d", "link", "show"])).expect("ip -j");
    links
        .iter()
        .filter(|l| l["ifname"] != "lo")
        .map(|l| {
            l["linkinfo"]["info_kind"]
                .as_str()
                .unwrap_or("none")
                .to_owned()
        })
        .collect()
}

/// The collector counts the sequence numbers an ERSPAN session skipped as lost copies.
#[test]
fn the_collector_counts_erspan_sequence_gaps() {
    let lab = Lab::with_collector("tgaps", 1500);
    let collector = Collector::start(
        lab.col(),
        &agent_binary(),
        "0.0.0.0:4789",
        "copies.pcapng",
        &[
            "--gre",
            &COL_V4.to_string(),
            "--session-id",
            "7",
            "--tap",
            "tap0",
        ],
    );
    let tap = Capture::open(lab.col(), "tap1");
    let sender = lab.node.enter(raw_gre_socket);
    let frame = |i: u8| udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 6000, &[i; 100]);
    let erspan = |session: u16, sequence: u32, inner: &[u8]| {
        let mut packet = vec![0x10, 0, 0x88, 0xbe];
        packet.extend_from_slice(&sequence.to_be_bytes());
        packet.extend_from_slice(&[0x10, 0]);
        packet.extend_from_slice(&session.to_be_bytes());
        packet.extend_from_slice(&[0; 4]);
        packet.extend_from_slice(inner);
        packet
    };
    // 1, 2, 5 (3 and 4 lost), 5 again (a GSO copy's second segment), 6, 9 (7, 8 lost); another
    // session in between, filtered out.
    for (session, sequence) in [(7, 1), (7, 2), (8, 3), (7, 5), (7, 5), (7, 6), (7, 9)] {
        send_raw(&sender, &erspan(session, sequence, &frame(sequence as u8)));
    }
    send_raw(
        &sender,
        &erspan(7, 10, &udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 9, b"sentinel")),
    );
    tap.until_nth(1, is_sentinel);
    let summary = collector.stop();
    assert_eq!(summary.stream_frames("erspan:7"), 7, "{}", summary.text);
    assert_eq!(summary.stream_lost("erspan:7"), 4, "{}", summary.text);
    assert_eq!(summary.dropped("filtered"), 1, "{}", summary.text);
}

/// `collect --allow` takes copies only from the senders named: a datagram from anyone else is
/// counted and never reaches the file or the tap.
#[test]
fn the_collector_takes_copies_only_from_allowed_senders() {
    let lab = Lab::with_collector("tallow", 1500);
    let collector = Collector::start(
        lab.col(),
        &agent_binary(),
        "0.0.0.0:4789",
        "copies.pcap",
        &["--allow", &format!("{NODE_UL_V4}/32"), "--tap", "tap0"],
    );
    let tap = Capture::open(lab.col(), "tap1");
    let datagram = |port: u16| {
        let mut d = vec![0x08, 0, 0, 0, 0, 0, 7, 0];
        d.extend_from_slice(&udp_v4_frame(SRC_MAC, NODE_SRC_MAC, port, b"copy"));
        d
    };
    let stranger = udp_socket(lab.col(), SocketAddr::new(COL_V4.into(), 0));
    stranger
        .send_to(&datagram(6666), (COL_V4, 4789))
        .expect("send");
    let node = udp_socket(&lab.node, SocketAddr::new(NODE_UL_V4.into(), 0));
    node.send_to(&datagram(5555), (COL_V4, 4789)).expect("send");
    node.send_to(&datagram(9), (COL_V4, 4789)).expect("send");
    let tapped = tap.until_nth(1, is_sentinel);
    let summary = collector.stop();
    let ports: Vec<Option<u16>> = tapped.iter().map(|f| Flow::of(&f.bytes).dst_port).collect();
    assert_eq!(ports, [Some(5555), Some(9)], "only the node's copies");
    assert_eq!(summary.stream_frames("vxlan:7"), 2, "{}", summary.text);
    assert_eq!(summary.dropped("not_allowed"), 1, "{}", summary.text);
}

fn raw_gre_socket() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket(2), checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_GRE) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor owned by nothing else.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// Sends a GRE packet to the collector from the node.
fn send_raw(socket: &std::os::fd::OwnedFd, packet: &[u8]) {
    use std::os::fd::AsRawFd as _;
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(COL_V4.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sendto reads `packet` and one sockaddr_in.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const address).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(
        sent,
        packet.len().cast_signed(),
        "{}",
        std::io::Error::last_os_error()
    );
}

/// Copies follow the next hop under traffic: the gateway's MAC address changes, the route
/// moves to another interface (whose gateway is not resolved yet: the agent asks for it), the
/// route goes (copies are counted as `no_route`, none sent) and comes back.
#[test]
fn copies_follow_the_next_hop_and_the_route() {
    let lab = Lab::with_collector("thop", 1500);
    behind_two_gateways(&lab, REMOTE);
    let on_ul0 = Capture::open(lab.col(), "eth0");
    let on_ul1 = Capture::open(lab.col(), "eth1");
    let agent = lab.start_agent(&format!(
        "[[session]]\nname = \"t\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\ntarget = {{ vxlan = {{ remote = \"{REMOTE}\", vni = 3 }} }}\ndefault = \"mirror\"\n"
    ));
    let traffic = TrafficLoop::start(FrameSender::open(&lab.src, "eth0"), 100_000, |i| {
        udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 6000, &i.to_be_bytes())
    });
    // Copies reach the gateway's MAC address.
    let first = on_ul0.until_nth(20, |f| tunnelled(f).is_some());
    assert!(numbered(&first).iter().all(|(m, _)| *m == mac(COL_MAC)));
    follow_a_new_mac(&lab, &on_ul0);
    follow_a_moved_route(&lab, &on_ul0, &on_ul1);
    let (before, after) = no_route_for_a_while(&lab, &on_ul1);
    let sent = traffic.finish();
    let report = agent.stop();
    let session = report.session("t");
    println!("{sent} frames sent; no copy between {before} and {after}; {session:?}");
    // Every frame between the last copy before and the first after was matched and counted.
    assert!(
        session.no_route >= u64::from(after - before - 1),
        "{}",
        report.0
    );
    // A copy cloned while the agent rewrites or removes its session's tunnel entry can find the
    // entry gone at the underlay: it is dropped there and counted as a clone error (and a copy
    // error). The traffic comes from one CPU, so at most one per change of the four changes.
    assert!(session.clone_errors <= 4, "{}", report.0);
    assert_eq!(
        report.hook("copy", "copy_errors"),
        session.clone_errors,
        "{}",
        report.0
    );
    assert_eq!(
        session.matched,
        session.mirrored + session.no_route + session.clone_errors,
        "{}",
        report.0
    );
}

/// The collector's address in [`copies_follow_the_next_hop_and_the_route`].
const REMOTE: &str = "198.51.100.9";

/// The gateway's MAC address changes: copies go to the new one within a second, and none to the
/// old one once the new one is used.
fn follow_a_new_mac(lab: &Lab, on_ul0: &Capture) {
    const NEW_MAC: &str = "02:00:00:00:05:99";
    lab.col().ip(&["link", "set", "eth0", "address", NEW_MAC]);
    lab.node.ip(&[
        "neigh",
        "replace",
        &COL_V4.to_string(),
        "lladdr",
        NEW_MAC,
        "dev",
        "ul0",
        "nud",
        "permanent",
    ]);
    let changed = Instant::now();
    let seen = on_ul0.until_nth(1, |f| {
        tunnelled(f).is_some_and(|t| t.outer_dst_mac == mac(NEW_MAC))
    });
    let followed = changed.elapsed();
    println!("the new MAC address was followed after {followed:?}");
    assert!(followed < Duration::from_secs(1), "{followed:?}");
    let seen = numbered(&seen);
    let switch = seen
        .iter()
        .position(|(m, _)| *m == mac(NEW_MAC))
        .expect("a copy to the new MAC address");
    let later = on_ul0.until_nth(20, |f| tunnelled(f).is_some());
    assert!(
        seen[switch..]
            .iter()
            .chain(&numbered(&later))
            .all(|(m, _)| *m == mac(NEW_MAC)),
        "no copy to the old MAC address once the new one is used"
    );
}

/// The route moves to ul1, whose gateway nobody has resolved yet: copies follow within a second,
/// to that gateway's MAC address, and none leaves through ul0 after the first through ul1.
fn follow_a_moved_route(lab: &Lab, on_ul0: &Capture, on_ul1: &Capture) {
    lab.node.ip(&[
        "route",
        "replace",
        &format!("{REMOTE}/32"),
        "via",
        "192.0.3.2",
        "dev",
        "ul1",
    ]);
    let moved = Instant::now();
    let first = on_ul1.until_nth(1, |f| tunnelled(f).is_some());
    let followed = moved.elapsed();
    println!("the moved route was followed after {followed:?}");
    assert!(followed < Duration::from_secs(1), "{followed:?}");
    let first = numbered(&first)[0].1;
    let eth1: Vec<serde_json::Value> =
        serde_json::from_str(&lab.col().ip(&["-j", "link", "show", "eth1"])).expect("ip -j");
    let eth1_mac = mac(eth1[0]["address"].as_str().expect("eth1 address"));
    let on_new_link = on_ul1.until_nth(20, |f| tunnelled(f).is_some());
    assert!(numbered(&on_new_link).iter().all(|(m, _)| *m == eth1_mac));
    let old_link = numbered(&on_ul0.drain());
    assert!(
        old_link.iter().all(|(_, n)| *n < first),
        "no copy left through ul0 once the route moved: {old_link:?} against {first}"
    );
}

/// The route goes while the sink receives 500 more frames, then comes back: no copy leaves
/// meanwhile, and copies resume. Returns the numbers of the last copy before and the first after.
fn no_route_for_a_while(lab: &Lab, on_ul1: &Capture) -> (u32, u32) {
    lab.node.ip(&["route", "del", &format!("{REMOTE}/32")]);
    let received = || -> u64 {
        lab.sink
            .exec(&["cat", "/sys/class/net/eth0/statistics/rx_packets"])
            .trim()
            .parse()
            .expect("rx_packets")
    };
    let start = received();
    mirror_tests::wait_for("500 frames forwarded without a route", || {
        received() >= start + 500
    });
    let before = numbered(&on_ul1.drain()).last().map_or(0, |(_, n)| *n);
    lab.node.ip(&[
        "route",
        "add",
        &format!("{REMOTE}/32"),
        "via",
        "192.0.3.2",
        "dev",
        "ul1",
    ]);
    let resumed = numbered(&on_ul1.until_nth(5, |f| tunnelled(f).is_some()));
    let after = resumed[0].1;
    assert!(
        after > before + 400,
        "copies while there was no route: {before} then {after}"
    );
    (before, after)
}

/// The collector's address `remote` behind the gateway 192.0.2.2 (col's eth0, routed now), and
/// behind 192.0.3.2 on a second link (node ul1 ── col eth1, not routed yet).
fn behind_two_gateways(lab: &Lab, remote: &str) {
    let col = lab.col();
    col.ip(&["addr", "add", &format!("{remote}/32"), "dev", "lo"]);
    col.ip(&[
        "link",
        "add",
        "eth1",
        "type",
        "veth",
        "peer",
        "name",
        "ul1",
        "netns",
        &lab.node.name,
    ]);
    col.ip(&["addr", "add", "192.0.3.2/24", "dev", "eth1"]);
    col.ip(&["link", "set", "eth1", "up"]);
    lab.node.ip(&["addr", "add", "192.0.3.1/24", "dev", "ul1"]);
    lab.node.ip(&["link", "set", "ul1", "up"]);
    lab.node.ip(&[
        "route",
        "add",
        &format!("{remote}/32"),
        "via",
        &COL_V4.to_string(),
    ]);
}

/// (outer destination MAC, number in the payload) of the numbered copies among `frames`.
fn numbered(frames: &[mirror_tests::Frame]) -> Vec<([u8; 6], u32)> {
    frames
        .iter()
        .filter_map(|f| tunnelled(&f.bytes))
        .filter(|t| Flow::of(&t.inner).dst_port == Some(6000))
        .map(|t| {
            let n = t.inner.len();
            (
                t.outer_dst_mac,
                u32::from_be_bytes(t.inner[n - 4..].try_into().expect("number")),
            )
        })
        .collect()
}
