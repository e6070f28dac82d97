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
    COL_MAC, COL_V4, COL_V6, Capture, Collector, Flow, FrameSender, Lab, NODE_SRC_MAC, NODE_UL_V4,
    SENTINEL_RULE, SINK_V4, SINK_V6, SRC_MAC, SRC_V4, SRC_V6, TrafficLoop, agent_binary,
    assert_same_frames, is_mld_report, is_sentinel, mac, pin_to_first_cpu, select, send_tcp_stream,
    tcp_stream, tshark_fields, tunnelled, udp_datagrams_delivered, udp_socket, udp_v4_frame,
    write_pcap,
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

    let what = format.name;
    // What reached the collector (its own replies and the kernel's MLD reports are not copies).
    let wire: Vec<Vec<u8>> = wire
        .drain()
        .into_iter()
        .filter(|f| !f.outgoing)
        .map(|f| f.bytes)
        .filter(|f| !is_mld_report(f))
        .collect();
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
    // UDP and the sentinel, byte for byte.
    let not_tcp = |f: &Flow| f.proto == Some(17) && matches!(f.dst_port, Some(5555 | 9));
    let mut expected = select(&at_src.drain(), |f, frame| frame.outgoing && not_tcp(f));
    expected.extend(select(&at_sink.drain(), |f, frame| {
        !frame.outgoing && not_tcp(f)
    }));
    assert_eq!(expected.len(), 14, "{what}: primary captures");
    let inner: Vec<Vec<u8>> = copies.iter().map(|c| c.inner.clone()).collect();
    let (tcp, other): (Vec<Vec<u8>>, Vec<Vec<u8>>) = inner
        .into_iter()
        .partition(|f| Flow::of(f).proto == Some(6));
    assert_same_frames(what, other, expected);
    // The TCP stream, from the copies of src0's ingress (the client's segments), on the wire and
    // as the collector wrote them.
    let client = |frames: &[Vec<u8>]| -> Vec<Vec<u8>> {
        frames
            .iter()
            .filter(|f| Flow::of(f).dst_port == Some(7000))
            .cloned()
            .collect()
    };
    assert!(
        tcp_stream(&client(&tcp), 7000) == data,
        "{what}: TCP on the wire"
    );
    let written: Vec<Vec<u8>> = summary.written().into_iter().map(|(_, f)| f).collect();
    assert!(
        tcp_stream(&client(&written), 7000) == data,
        "{what}: TCP as written"
    );
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
    // ERSPAN: one sequence number per copy, none skipped.
    if what.starts_with("erspan") {
        let numbers: BTreeSet<u32> = copies.iter().filter_map(|c| c.sequence).collect();
        assert_eq!(numbers.len(), copies.len(), "{what}: one number per copy");
        assert_eq!(
            numbers.last().copied(),
            Some(numbers.len() as u32 - 1),
            "{what}: numbered from 0 without a gap"
        );
    }
    // ERSPAN type III: the direction bit tells src0's ingress from sink0's egress.
    if what == "erspan3" {
        for copy in &copies {
            let flow = Flow::of(&copy.inner);
            let from_src0 = flow.src == Some(SRC_V4.into()) || flow.src == Some(SRC_V6.into());
            let client_side = flow.dst_port == Some(7000) || flow.dst_port == Some(5555);
            if client_side || is_sentinel(&copy.inner) {
                // Seen at both: ingress copies at src0 and egress copies at sink0.
                continue;
            }
            assert_eq!(copy.egress, Some(!from_src0), "{what}: {flow:?}");
        }
        let directions: BTreeSet<bool> = copies.iter().filter_map(|c| c.egress).collect();
        assert_eq!(directions, BTreeSet::from([false, true]));
    }
    // tshark reads the outer headers the same way.
    let dir = tempfile::tempdir().expect("temp dir");
    let wire_file = dir.path().join("wire.pcap");
    write_pcap(&wire_file, &wire);
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
        let directions: BTreeSet<String> = tshark_fields(&wire_file, None, &["erspan.direction"])
            .into_iter()
            .collect();
        assert_eq!(
            directions.len(),
            2,
            "tshark sees both directions: {directions:?}"
        );
    }
    // The agent's side: every copy counted, none lost, and nothing of a tunnel on the node: no
    // socket that listens, no tunnel device.
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
    let sender = lab.node.enter(|| raw_gre_socket());
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
        packet.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

/// Copies follow the next hop under traffic: the gateway's MAC address changes, the route
/// moves to another interface (whose gateway is not resolved yet: the agent asks for it), the
/// route goes (copies are counted as no_route, none sent) and comes back.
#[test]
fn copies_follow_the_next_hop_and_the_route() {
    const REMOTE: &str = "198.51.100.9";
    const NEW_MAC: &str = "02:00:00:00:05:99";
    let lab = Lab::with_collector("thop", 1500);
    let col = lab.col();
    // The collector's address sits behind the gateway 192.0.2.2 (col's eth0), and, later, behind
    // 192.0.3.2 on a second link.
    col.ip(&["addr", "add", &format!("{REMOTE}/32"), "dev", "lo"]);
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
        &format!("{REMOTE}/32"),
        "via",
        &COL_V4.to_string(),
    ]);
    let on_ul0 = Capture::open(col, "eth0");
    let on_ul1 = Capture::open(col, "eth1");
    let agent = lab.start_agent(&format!(
        "[[session]]\nname = \"t\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\ntarget = {{ vxlan = {{ remote = \"{REMOTE}\", vni = 3 }} }}\ndefault = \"mirror\"\n"
    ));
    let traffic = TrafficLoop::start(FrameSender::open(&lab.src, "eth0"), 100_000, |i| {
        udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 6000, &i.to_be_bytes())
    });
    let numbered = |frames: &[mirror_tests::Frame]| -> Vec<([u8; 6], u32)> {
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
    };
    // 1. Copies reach the gateway's MAC address.
    let first = on_ul0.until_nth(20, |f| tunnelled(f).is_some());
    assert!(numbered(&first).iter().all(|(m, _)| *m == mac(COL_MAC)));

    // 2. The gateway's MAC address changes.
    col.ip(&["link", "set", "eth0", "address", NEW_MAC]);
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
    let after: Vec<_> = numbered(&seen);
    let switch = after
        .iter()
        .position(|(m, _)| *m == mac(NEW_MAC))
        .expect("a copy to the new MAC address");
    let later = on_ul0.until_nth(20, |f| tunnelled(f).is_some());
    assert!(
        after[switch..]
            .iter()
            .chain(&numbered(&later))
            .all(|(m, _)| *m == mac(NEW_MAC)),
        "no copy to the old MAC address once the new one is used"
    );

    // 3. The route moves to ul1, whose gateway nobody has resolved yet.
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
    on_ul1.until_nth(1, |f| tunnelled(f).is_some());
    let followed = moved.elapsed();
    println!("the moved route was followed after {followed:?}");
    assert!(followed < Duration::from_secs(1), "{followed:?}");
    let col_eth1 = col.ip(&["-j", "link", "show", "eth1"]);
    let eth1_mac = col_eth1
        .split("\"address\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("eth1 address")
        .to_owned();
    let on_new_link = on_ul1.until_nth(20, |f| tunnelled(f).is_some());
    assert!(
        numbered(&on_new_link)
            .iter()
            .all(|(m, _)| *m == mac(&eth1_mac))
    );
    let _ = on_ul0.drain();
    let stray = on_ul0.drain();
    assert!(
        stray.iter().all(|f| tunnelled(&f.bytes).is_none()),
        "no copy left through ul0 once the route moved"
    );

    // 4. No route: nothing is sent anywhere, the copies are counted; then it is back.
    lab.node.ip(&["route", "del", &format!("{REMOTE}/32")]);
    std::thread::sleep(Duration::from_millis(300));
    let _ = on_ul1.drain();
    std::thread::sleep(Duration::from_millis(200));
    let during = on_ul1.drain();
    assert!(
        during.iter().all(|f| tunnelled(&f.bytes).is_none()),
        "sent without a route"
    );
    lab.node.ip(&[
        "route",
        "add",
        &format!("{REMOTE}/32"),
        "via",
        "192.0.3.2",
        "dev",
        "ul1",
    ]);
    on_ul1.until_nth(5, |f| tunnelled(f).is_some());
    let sent = traffic.finish();
    let report = agent.stop();
    let session = report.session("t");
    println!("{sent} frames sent, {session:?}");
    assert!(session.no_route > 0, "{}", report.0);
    assert_eq!(session.clone_errors, 0, "{}", report.0);
    assert_eq!(
        session.matched,
        session.mirrored + session.no_route,
        "{}",
        report.0
    );
}
