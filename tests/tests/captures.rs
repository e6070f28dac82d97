//! Real traffic: the captures Debian's python3-dpkt ships (HTTP over TCP, DNS and ICMP, `PPPoE`),
//! replayed frame by frame into the node. Which frames must be copied is decided by an independent
//! decoder (etherparse), and every copy must equal its captured frame byte for byte.
use mirror_tests::{
    Capture, FrameSender, Lab, NODE_SRC_MAC, SRC_MAC, assert_same_frames, copied, session_config,
    shipped_capture,
};

const ETHERTYPE_PPPOE_SESSION: u16 = 0x8864;

/// The oracle: the session's rules, evaluated with etherparse.
fn selected(frame: &[u8]) -> bool {
    let flow = mirror_tests::Flow::of(frame);
    let port = |p| flow.src_port == Some(p) || flow.dst_port == Some(p);
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    (flow.proto == Some(6) && port(80))
        || (flow.proto == Some(17) && port(53))
        || flow.proto == Some(1)
        || ethertype == ETHERTYPE_PPPOE_SESSION
}

#[test]
fn real_captures_replayed_are_copied_as_the_rules_say() {
    let lab = Lab::new("captures");
    let agent = lab.start_agent(&session_config(
        "[\"src0\"]",
        "ingress",
        &format!(
            "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"tcp\"\ndst_port = 80\n\
         [[session.rule]]\nnumber = 11\naction = \"mirror\"\nproto = \"tcp\"\nsrc_port = 80\n\
         [[session.rule]]\nnumber = 20\naction = \"mirror\"\nproto = \"udp\"\nport = 53\n\
         [[session.rule]]\nnumber = 30\naction = \"mirror\"\nproto = \"icmp\"\n\
         [[session.rule]]\nnumber = 40\naction = \"mirror\"\nethertype = {ETHERTYPE_PPPOE_SESSION}\n"
        ),
    ));
    let copies = Capture::open(&lab.mon, "eth0");
    let sender = FrameSender::open(&lab.src, "eth0");
    let replayed: Vec<Vec<u8>> = ["http.pcap", "dns_icmp.pcap", "nb6-http.pcap"]
        .iter()
        .flat_map(|name| shipped_capture(name))
        .collect();
    for frame in &replayed {
        sender.send(frame);
    }
    sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
    let expected: Vec<_> = replayed.iter().filter(|f| selected(f)).cloned().collect();
    let skipped = replayed.len() - expected.len();
    assert!(
        expected.len() > 100 && skipped > 0,
        "{} selected, {skipped} not",
        expected.len()
    );
    let copies: Vec<_> = copies.bytes_until_sentinel();
    assert_same_frames("replayed captures", copies, expected.clone());
    let report = agent.stop();
    assert_eq!(report.rule("t", "default"), copied(skipped as u64, 0));
    // `port = 53` is two kernel rules, one per direction, counted as one rule.
    let dns = replayed
        .iter()
        .filter(|f| {
            let flow = mirror_tests::Flow::of(f);
            flow.proto == Some(17) && (flow.src_port == Some(53) || flow.dst_port == Some(53))
        })
        .count() as u64;
    assert!(dns > 10, "{dns} DNS frames");
    assert_eq!(report.rule("t", "20"), copied(dns, dns));
    assert_eq!(
        report.hook("ingress", "malformed"),
        0,
        "real traffic is well formed"
    );
}
