//! Hand-made frames sent with `AF_PACKET`: VLAN tags (single, double, 802.1ad), ARP by ethertype,
//! and a table of malformed frames. For each frame: what reached the far side of the primary path
//! (it must be the frame, unchanged) and whether exactly that frame was copied.
use std::fmt::Write as _;

use mirror_tests::{
    Capture, FrameSender, Lab, NODE_SINK_MAC, NODE_SRC_MAC, SENTINEL_RULE, SINK_MAC, SINK_V4,
    SRC_MAC, assert_same_frames, cases, copied, mac, session_config, tagged, udp_v4_frame,
};

#[test]
fn vlan_rules_match_the_outer_tag_single_double_and_802_1ad() {
    let lab = Lab::new("vlan");
    let agent = lab.start_agent(&session_config(
        "[\"src0\"]",
        "ingress",
        "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nvlan = 100\n",
    ));
    let copies = Capture::open(&lab.mon, "eth0");
    let sender = FrameSender::open(&lab.src, "eth0");
    let inner = udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 6000, b"tagged payload");
    // (frame, copied?)
    let cases = [
        (tagged(&inner, &[(0x8100, 100)]), true),
        (tagged(&inner, &[(0x8100, 101)]), false),
        (tagged(&inner, &[(0x88a8, 100), (0x8100, 300)]), true),
        (tagged(&inner, &[(0x88a8, 300), (0x8100, 100)]), false),
        (tagged(&inner, &[(0x8100, 100), (0x8100, 200)]), true),
        (tagged(&inner, &[(0x8100, 0x2064)]), true), // priority 1 in the PCP bits, VID 100
        (inner.clone(), false),
    ];
    for (frame, _) in &cases {
        sender.send(frame);
    }
    sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
    let copies: Vec<_> = copies.bytes_until_sentinel();
    let expected = cases
        .iter()
        .filter(|(_, copied)| *copied)
        .map(|(f, _)| f.clone())
        .collect();
    assert_same_frames("vlan", copies, expected);
    let report = agent.stop();
    assert_eq!(report.rule("t", "10"), copied(4, 4));
    assert_eq!(report.rule("t", "default"), copied(3, 0));
}

fn arp_request(sender_mac: &str, sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut frame = [0xffu8; 6].to_vec();
    frame.extend(mac(sender_mac));
    frame.extend([0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    frame.extend(mac(sender_mac));
    frame.extend(sender_ip);
    frame.extend([0; 6]);
    frame.extend(target_ip);
    frame.resize(60, 0);
    frame
}

#[test]
fn arp_is_matched_by_ethertype() {
    let lab = Lab::new("arp");
    let agent = lab.start_agent(&session_config(
        "[\"src0\"]",
        "ingress",
        "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nethertype = \"arp\"\n",
    ));
    let copies = Capture::open(&lab.mon, "eth0");
    let sender = FrameSender::open(&lab.src, "eth0");
    let arp = arp_request(SRC_MAC, [10, 10, 1, 2], [10, 10, 1, 1]);
    sender.send(&arp);
    sender.send(&udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 6000, b"not arp"));
    sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
    let copies: Vec<_> = copies.bytes_until_sentinel();
    assert_same_frames("arp", copies, vec![arp]);
    agent.stop();
}

#[test]
fn malformed_and_edge_frames_pass_unchanged_and_copy_only_what_matches() {
    let lab = Lab::new("malformed");
    // Session `t` copies what it cannot parse to mir0, session `skip` does not, to mir1.
    let agent = lab.start_agent(&format!(
        "{}[[session]]\nname = \"skip\"\ninterfaces = [\"sink0\"]\ndirection = \"egress\"\ntarget = {{ interface = \"mir1\" }}\nunparsed = \"skip\"\n{SENTINEL_RULE}{}",
        session_config("[\"sink0\"]", "egress", cases::MALFORMED_RULES),
        cases::MALFORMED_RULES
    ));
    let copies = Capture::open(&lab.mon, "eth0");
    let skipping = Capture::open(&lab.mon, "eth1");
    let delivered = Capture::open(&lab.sink, "eth0");
    let sender = FrameSender::open(&lab.node, "sink0");
    let cases = cases::malformed();
    for case in &cases {
        sender.send(&case.frame);
    }
    sender.send_sentinel(NODE_SINK_MAC, SINK_MAC);
    // Received frames only: the sink's own answers (ICMP errors) are outgoing.
    let delivered = delivered.received_until_sentinel();
    let copies: Vec<_> = copies.bytes_until_sentinel();
    for (i, case) in cases.iter().enumerate() {
        assert_eq!(
            delivered.get(i),
            Some(&case.frame),
            "{}: the original must continue unchanged",
            case.name
        );
        assert_eq!(
            copies.contains(&case.frame),
            case.copied_failing_open(),
            "{}: copy",
            case.name
        );
    }
    assert_eq!(delivered.len(), cases.len());
    assert_same_frames(
        "malformed table, failing open",
        copies,
        cases::frames_of(&cases, cases::Case::copied_failing_open),
    );
    assert_same_frames(
        "malformed table, skipping unparsed frames",
        skipping.bytes_until_sentinel(),
        cases::frames_of(&cases, |c| c.copied),
    );
    let report = agent.stop();
    let malformed = cases.iter().filter(|c| c.malformed).count() as u64;
    // Once per packet at the hook, once per session at the rule that decided it (the first: every
    // unparsed frame might be UDP to port 9).
    assert_eq!(report.hook("egress", "malformed"), malformed);
    assert_eq!(report.hook("egress", "table_errors"), 0);
    for session in ["t", "skip"] {
        assert_eq!(report.rule(session, "1").unparsed, malformed, "{session}");
    }
    assert_eq!(
        report.session("skip").mirrored,
        1 + cases.iter().filter(|c| c.copied).count() as u64
    );
}

/// Skip rules never decide on fields the parser did not reach: a `not port 53` session copies
/// every frame of the malformed table (none is port 53 read whole, and those the parser cannot
/// finish might not be), counting those as unparsed; with `unparsed = "skip"`, only the frames it
/// read whole. A DNS frame, the control, is skipped by both.
#[test]
fn skip_rules_never_decide_on_fields_the_parser_did_not_reach() {
    let lab = Lab::new("notport");
    let session = |name: &str, target: &str, unparsed: &str| {
        format!(
            "[[session]]\nname = \"{name}\"\ninterfaces = [\"sink0\"]\ndirection = \"egress\"\n\
             target = {{ interface = \"{target}\" }}\n{unparsed}filter = \"not port 53\"\n"
        )
    };
    let agent = lab.start_agent(&format!(
        "{}{}",
        session("t", "mir0", ""),
        session("skip", "mir1", "unparsed = \"skip\"\n")
    ));
    let copies = Capture::open(&lab.mon, "eth0");
    let skipping = Capture::open(&lab.mon, "eth1");
    let sender = FrameSender::open(&lab.node, "sink0");
    let cases = cases::malformed();
    for case in &cases {
        sender.send(&case.frame);
    }
    sender.send(&udp_v4_frame(NODE_SINK_MAC, SINK_MAC, 53, b"a dns query"));
    sender.send_sentinel(NODE_SINK_MAC, SINK_MAC);
    assert_same_frames(
        "not port 53",
        copies.bytes_until_sentinel(),
        cases::frames_of(&cases, |_| true),
    );
    assert_same_frames(
        "not port 53, skipping unparsed frames",
        skipping.bytes_until_sentinel(),
        cases::frames_of(&cases, |c| !c.malformed),
    );
    let report = agent.stop();
    let malformed = cases.iter().filter(|c| c.malformed).count() as u64;
    for session in ["t", "skip"] {
        assert_eq!(
            report.rule(session, "default").unparsed,
            malformed,
            "{session}: decided by the default, as unparsed"
        );
        assert_eq!(report.session(session).unparsed, malformed, "{session}");
        // The DNS frame, by the rule for its destination port.
        assert_eq!(report.rule(session, "filter-2").matched, 1, "{session}");
    }
}

#[test]
fn sessions_sharing_an_interface_each_get_one_copy() {
    let lab = Lab::new("sessions");
    let agent = lab.start_agent(&format!(
        "[[session]]\nname = \"web\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\ntarget = {{ interface = \"mir0\" }}\n{SENTINEL_RULE}\
         [[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n\
         [[session]]\nname = \"all-udp\"\ninterfaces = [\"src*\"]\ndirection = \"ingress\"\ntarget = {{ interface = \"mir1\" }}\ndefault = \"mirror\"\n\
         [[session.rule]]\nnumber = 10\naction = \"skip\"\nproto = \"udp\"\ndst_port = 5556\n"
    ));
    let web = Capture::open(&lab.mon, "eth0");
    let all = Capture::open(&lab.mon, "eth1");
    let sender = FrameSender::open(&lab.src, "eth0");
    let frames: Vec<_> = [5555, 5556, 5557]
        .iter()
        .map(|p| udp_v4_frame(SRC_MAC, NODE_SRC_MAC, *p, b"x"))
        .collect();
    for frame in &frames {
        sender.send(frame);
    }
    sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
    assert_same_frames("web", web.bytes_until_sentinel(), vec![frames[0].clone()]);
    assert_same_frames(
        "all-udp",
        all.bytes_until_sentinel(),
        vec![frames[0].clone(), frames[2].clone()],
    );
    let report = agent.stop();
    assert_eq!(
        report.session("web"),
        copied(4, 2),
        "sentinel and 5555 mirrored; 5556, 5557 by default skip"
    );
    assert_eq!(report.rule("all-udp", "10"), copied(1, 0));
    assert_eq!(report.rule("all-udp", "default"), copied(3, 3));
}

#[test]
fn rules_past_the_first_bitmap_word_decide_and_the_agent_counts_the_default() {
    // The egress session's 70 rules come first, so the ingress session's start in the second
    // 64-rule word of every bitmap: the word the classifier narrows on exactly.
    let mut wide = String::new();
    for n in 0..70 {
        write!(
            wide,
            "[[session.rule]]\nnumber = {}\naction = \"mirror\"\nproto = \"udp\"\ndst_port = {}\n",
            n + 10,
            7000 + n
        )
        .expect("to a String");
    }
    let lab = Lab::new("wordtwo");
    let agent = lab.start_agent(&format!(
        "[[session]]\nname = \"wide\"\ninterfaces = [\"src0\"]\ndirection = \"egress\"\ntarget = {{ interface = \"mir1\" }}\n{wide}\
         [[session]]\nname = \"t\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\ntarget = {{ interface = \"mir0\" }}\n{SENTINEL_RULE}\
         [[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n"
    ));
    let copies = Capture::open(&lab.mon, "eth0");
    let sender = FrameSender::open(&lab.src, "eth0");
    // 7000 is a port of the egress session's rules only; 5556 no rule's.
    send_ports_expect_copies(
        &sender,
        &copies,
        "second word",
        &[5555, 5556, 7000, 5555],
        &[0, 3],
    );
    let report = agent.stop();
    assert_eq!(report.rule("t", "10"), copied(2, 2));
    assert_eq!(report.rule("t", "default"), copied(2, 0));
    assert_eq!(
        report.session("t"),
        copied(5, 3),
        "the sentinel is rule 1's"
    );
    assert_eq!(report.rule("wide", "10"), copied(0, 0));
    // What the session saw is what was classified at the hook: one watch group's traffic.
    assert_eq!(report.hook("ingress", "packets"), 5);
}

#[test]
fn an_interface_of_a_large_index_is_watched_and_addresses_looked_up_on_demand() {
    // Indices from DIRECT_IFINDEXES on are found in the hash map, not the direct array.
    let ifindex = mirror_common::DIRECT_IFINDEXES + 23_000;
    let lab = Lab::new("bigindex");
    lab.add_source_veth("big0", "big1", Some(ifindex));
    assert_eq!(lab.node.ifindex("big0"), ifindex);
    // Rule 20's address is looked up only for the frame whose port it names.
    let agent = lab.start_agent(&session_config(
        "[\"big0\"]",
        "ingress",
        &format!(
            "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst = \"{SINK_V4}\"\ndst_port = 6000\n\
             [[session.rule]]\nnumber = 20\naction = \"mirror\"\nproto = \"udp\"\ndst = \"192.0.2.1\"\ndst_port = 6001\n"
        ),
    ));
    let copies = Capture::open(&lab.mon, "eth0");
    let sender = FrameSender::open(&lab.src, "big1");
    send_ports_expect_copies(&sender, &copies, "large index", &[6000, 6001, 6002], &[0]);
    let report = agent.stop();
    assert_eq!(report.rule("t", "10"), copied(1, 1));
    assert_eq!(report.rule("t", "20"), copied(0, 0));
    assert_eq!(report.rule("t", "default"), copied(2, 0));
}

/// Sends a UDP frame to each of `ports` (`name` its payload), then the sentinel, and checks that
/// exactly the frames at the indices `mirrored` were copied, byte for byte.
fn send_ports_expect_copies(
    sender: &FrameSender,
    copies: &Capture,
    name: &str,
    ports: &[u16],
    mirrored: &[usize],
) {
    let frames: Vec<_> = ports
        .iter()
        .map(|&port| udp_v4_frame(SRC_MAC, NODE_SRC_MAC, port, name.as_bytes()))
        .collect();
    for frame in &frames {
        sender.send(frame);
    }
    sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
    let expected = mirrored.iter().map(|&i| frames[i].clone()).collect();
    assert_same_frames(name, copies.bytes_until_sentinel(), expected);
}
