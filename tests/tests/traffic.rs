//! Real traffic through the node: UDP (IPv4 and IPv6), a TCP connection in both directions, ICMP
//! and `ICMPv6`. Every copy on the mirror side must equal, byte for byte, a frame seen on the primary
//! path at the mirrored hook, and exactly the frames the rules select must be copied.
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
};

use mirror_tests::{
    Capture, Lab, SINK_V4, SINK_V6, SRC_V4, SRC_V6, assert_same_frames, copied, pin_to_first_cpu,
    select, session_config, udp_socket,
};

#[test]
fn udp_ipv4_and_ipv6_copied_at_ingress_and_egress() {
    let lab = Lab::new("udp");
    let agent = lab.start_agent(&session_config(
        "[\"src0\", \"sink0\"]",
        "both",
        "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n",
    ));
    let copies = Capture::open(&lab.mon, "eth0");
    let at_src = Capture::open(&lab.src, "eth0");
    let at_sink = Capture::open(&lab.sink, "eth0");
    let receivers = [
        udp_socket(&lab.sink, SocketAddr::new(SINK_V4.into(), 5555)),
        udp_socket(&lab.sink, SocketAddr::new(SINK_V6.into(), 5555)),
        udp_socket(&lab.sink, SocketAddr::new(SINK_V4.into(), 5556)),
    ];
    let senders = [
        udp_socket(&lab.src, SocketAddr::new(SRC_V4.into(), 0)),
        udp_socket(&lab.src, SocketAddr::new(SRC_V6.into(), 0)),
    ];
    pin_to_first_cpu();
    let mut sent = 0;
    for i in 0..5u8 {
        let payload = vec![i; 100 + usize::from(i) * 300];
        senders[0].send_to(&payload, (SINK_V4, 5555)).expect("send");
        senders[1].send_to(&payload, (SINK_V6, 5555)).expect("send");
        senders[0].send_to(&payload, (SINK_V4, 5556)).expect("send");
        sent += 1;
    }
    lab.send_sentinel();
    let copies = copies.until_sentinel();

    // Primary path unchanged: every datagram arrived, whole.
    let mut buf = [0u8; 2000];
    for receiver in &receivers {
        for i in 0..sent {
            let n = receiver
                .recv(&mut buf)
                .expect("datagram on the primary path");
            assert_eq!(&buf[..n], vec![i; 100 + usize::from(i) * 300].as_slice());
        }
    }
    // Copies: each 5555 datagram once as it entered src0 and once as it left sink0.
    let to_5555 = |f: &mirror_tests::Flow| f.proto == Some(17) && f.dst_port == Some(5555);
    let mut expected = select(&at_src.drain(), |f, frame| frame.outgoing && to_5555(f));
    expected.extend(select(&at_sink.drain(), |f, frame| {
        !frame.outgoing && to_5555(f)
    }));
    assert_eq!(expected.len(), 20, "primary captures");
    assert!(
        expected
            .iter()
            .any(|f| mirror_tests::Flow::of(f).dst == Some(IpAddr::V6(SINK_V6)))
    );
    assert_same_frames(
        "udp",
        copies.iter().map(|f| f.bytes.clone()).collect(),
        expected,
    );

    let report = agent.stop();
    assert_eq!(report.rule("t", "10"), copied(20, 20));
    assert_eq!(
        report.rule("t", "1"),
        copied(2, 2),
        "the sentinel, at src0 ingress and sink0 egress"
    );
}

#[test]
fn tcp_connection_copied_in_both_directions() {
    let lab = Lab::new("tcp");
    let agent = lab.start_agent(&session_config(
        "[\"src0\"]",
        "both",
        "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"tcp\"\ndst_port = 7000\n\
         [[session.rule]]\nnumber = 20\naction = \"mirror\"\nproto = \"tcp\"\nsrc_port = 7000\n",
    ));
    let copies = Capture::open(&lab.mon, "eth0");
    let at_src = Capture::open(&lab.src, "eth0");
    let listener = lab
        .sink
        .enter(|| TcpListener::bind((SINK_V4, 7000)).expect("listen"));
    let server = std::thread::spawn(move || {
        pin_to_first_cpu();
        let (mut conn, _) = listener.accept().expect("accept");
        let mut request = Vec::new();
        conn.read_to_end(&mut request).expect("read request");
        conn.write_all(&request[..1000]).expect("reply");
        request.len()
    });
    let mut client = lab
        .src
        .enter(|| TcpStream::connect((SINK_V4, 7000)).expect("connect"));
    pin_to_first_cpu();
    let request: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    client.write_all(&request).expect("send");
    client
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).expect("reply");
    assert_eq!(
        server.join().expect("server"),
        request.len(),
        "primary path delivered the stream"
    );
    assert_eq!(reply, request[..1000]);
    drop(client);
    lab.send_sentinel();
    let copies = copies.until_sentinel();

    let tcp_7000 = |f: &mirror_tests::Flow| {
        f.proto == Some(6) && (f.dst_port == Some(7000) || f.src_port == Some(7000))
    };
    let expected = select(&at_src.drain(), |f, _| tcp_7000(f));
    let from_client = expected
        .iter()
        .filter(|f| mirror_tests::Flow::of(f).dst_port == Some(7000))
        .count();
    assert!(
        from_client > 3 && expected.len() > from_client,
        "both directions seen: {from_client} of {}",
        expected.len()
    );
    assert_same_frames(
        "tcp",
        copies.iter().map(|f| f.bytes.clone()).collect(),
        expected,
    );
    let report = agent.stop();
    assert_eq!(
        report.hook("ingress", "table_errors") + report.hook("egress", "table_errors"),
        0
    );
}

/// An ICMP echo request through a raw socket; the kernel of the sink answers it.
fn ping(lab: &Lab, to: IpAddr, id: u16) {
    let (domain, proto, kind) = match to {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128u8),
    };
    let socket = lab.src.enter(move || {
        // SAFETY: a raw socket; std takes ownership of the descriptor.
        let fd = unsafe { libc::socket(domain, libc::SOCK_RAW, proto) };
        assert!(fd >= 0, "raw socket");
        // SAFETY: `fd` is a socket just opened, owned by nothing else.
        unsafe { <std::net::UdpSocket as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    });
    let mut echo = vec![kind, 0, 0, 0];
    echo.extend(id.to_be_bytes());
    echo.extend(1u16.to_be_bytes());
    echo.extend(b"mirror-ping");
    if kind == 8 {
        let sum = echo
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum::<u32>();
        let folded = (sum & 0xffff) + (sum >> 16);
        echo[2..4].copy_from_slice(&(!(((folded & 0xffff) + (folded >> 16)) as u16)).to_be_bytes());
    }
    pin_to_first_cpu();
    socket
        .send_to(&echo, SocketAddr::new(to, 0))
        .expect("send echo");
    // The reply comes back through the node; the raw socket receives it (and maybe other ICMP).
    socket
        .set_read_timeout(Some(mirror_tests::DEADLINE))
        .expect("timeout");
    let mut buf = [0u8; 1500];
    loop {
        let n = socket
            .recv(&mut buf)
            .expect("echo reply on the primary path");
        let icmp = if kind == 8 {
            &buf[usize::from(buf[0] & 0x0f) * 4..n]
        } else {
            &buf[..n]
        };
        if icmp[0] == if kind == 8 { 0 } else { 129 } && icmp[4..6] == id.to_be_bytes() {
            return;
        }
    }
}

#[test]
fn icmp_and_icmpv6_echo_copied() {
    let lab = Lab::new("icmp");
    let agent = lab.start_agent(&session_config(
        "[\"src0\"]",
        "both",
        "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"icmp\"\n\
         [[session.rule]]\nnumber = 20\naction = \"mirror\"\nproto = \"icmpv6\"\nsrc = \"fd00::/16\"\ndst = \"fd00::/16\"\n",
    ));
    let copies = Capture::open(&lab.mon, "eth0");
    let at_src = Capture::open(&lab.src, "eth0");
    ping(&lab, SINK_V4.into(), 0x4d31);
    ping(&lab, SINK_V6.into(), 0x4d32);
    lab.send_sentinel();
    let copies = copies.until_sentinel();
    let fd00 = |a: Option<IpAddr>| matches!(a, Some(IpAddr::V6(v6)) if v6.segments()[0] == 0xfd00);
    // ICMP port-unreachable answers to the sentinel come after it and are not counted here.
    let expected = select(&at_src.drain(), |f, _| {
        f.proto == Some(1) || (f.proto == Some(58) && fd00(f.src) && fd00(f.dst))
    });
    assert!(
        expected.len() >= 4,
        "echo request and reply for both families: {}",
        expected.len()
    );
    let copies: Vec<_> = copies.into_iter().map(|f| f.bytes).collect();
    assert_same_frames("icmp", copies, expected);
    agent.stop();
}
