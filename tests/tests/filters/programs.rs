//! The rest of the pcap-filter language, which becomes a filter program by libpcap's compiler:
//! the pcap-filter man page's examples that name no host by name, and generated expressions with
//! byte accessors and arithmetic, each selecting exactly what `tcpdump -r` selects. The frames add
//! VLAN stacks (the kernel holds the outer tag aside; the program must see it in place), MPLS,
//! `PPPoE` and multicast to the replayed captures.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use mirror_tests::{Lab, assert_same_frames, pcap_frames, tagged, write_pcap};

use super::{agent_copies, read_selecting, replayed, tcpdump_selects};

/// The man page's examples, verbatim but for `localnet`, written as a network; and its
/// primitives that only libpcap's compiler takes.
const MAN_PAGE: &[&str] = &[
    "tcp[tcpflags] & (tcp-syn|tcp-fin) != 0 and not src and dst net 10.0.0.0/8",
    "tcp[tcpflags] & (tcp-rst|tcp-ack) == (tcp-rst|tcp-ack)",
    "tcp port 80 and (((ip[2:2] - ((ip[0]&0xf)<<2)) - ((tcp[12]&0xf0)>>2)) != 0)",
    "ip[2:2] > 576",
    "ether[0] & 1 = 0 and ip[16] >= 224",
    "icmp[icmptype] != icmp-echo and icmp[icmptype] != icmp-echoreply",
    "icmp6[icmp6type] != icmp6-echo and icmp6[icmp6type] != icmp6-echoreply",
    "ether[0] & 1 != 0",
    "ip[0] & 0xf != 5",
    "ip[6:2] & 0x1fff = 0",
    "vlan 100 && vlan 200",
    "vlan && vlan 300 && ip",
    "mpls 100000 && mpls 1024",
    "mpls && mpls 1024 && host 192.9.200.1",
    "pppoes 0x27 && ip",
    "pppoed",
    "ether broadcast",
    "ether multicast",
    "ip broadcast",
    "ip multicast",
    "ip6 multicast",
    "less 100",
    "greater 1000",
    "len <= 128",
    "ip protochain 6",
    "ip6 protochain 17",
    "protochain 1",
    "ether host 01:80:c2:00:00:0e",
    "ether src 02:00:00:00:00:01 and not ether dst ff:ff:ff:ff:ff:ff",
    "ether dst 0200.0000.0002",
    "ether proto 0x8100 and ether[14:2] & 0xfff = 100",
];

/// Frames of the kinds the captures lack: VLAN stacks, MPLS, `PPPoE`, IPv4 multicast.
fn more_frames() -> Vec<Vec<u8>> {
    use etherparse::PacketBuilder;
    let (a, b) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let ipv4_udp = |dst: [u8; 4], dst_mac: [u8; 6], payload: &[u8]| {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(a, dst_mac)
            .ipv4([10, 0, 0, 1], dst, 64)
            .udp(5000, 53)
            .write(&mut frame, payload)
            .expect("frame");
        frame
    };
    let ipv4_tcp = {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2(a, b)
            .ipv4([10, 0, 0, 1], [192, 0, 2, 7], 64)
            .tcp(40_000, 80, 7, 1000)
            .syn()
            .write(&mut frame, b"hello")
            .expect("frame");
        frame
    };
    let plain = ipv4_udp([192, 0, 2, 7], b, b"tagged");
    // MPLS: labels 100000 and 1024 (bottom of stack), then IPv4 to 192.9.200.1.
    let inner = ipv4_udp([192, 9, 200, 1], b, b"mpls");
    let mut mpls = inner[..12].to_vec();
    mpls.extend([0x88, 0x47]);
    mpls.extend((100_000u32 << 12 | 64).to_be_bytes());
    mpls.extend((1024u32 << 12 | 1 << 8 | 64).to_be_bytes());
    mpls.extend(&inner[14..]);
    // PPPoE session 0x27 carrying IPv4 (PPP protocol 0x0021).
    let ip = &plain[14..];
    let mut pppoe = plain[..12].to_vec();
    pppoe.extend([0x88, 0x64, 0x11, 0x00, 0x00, 0x27]);
    pppoe.extend(u16::try_from(ip.len() + 2).expect("short").to_be_bytes());
    pppoe.extend([0x00, 0x21]);
    pppoe.extend(ip);
    vec![
        tagged(&plain, &[(0x8100, 100)]),
        tagged(&ipv4_tcp, &[(0x8100, 100)]),
        tagged(&plain, &[(0x8100, 100), (0x8100, 200)]),
        tagged(&plain, &[(0x88a8, 100), (0x8100, 200)]),
        tagged(&plain, &[(0x8100, 5), (0x8100, 300)]),
        tagged(&plain, &[(0x8100, 0x2000 | 7)]),
        ipv4_tcp,
        mpls,
        pppoe,
        ipv4_udp([224, 0, 0, 251], [1, 0, 0x5e, 0, 0, 0xfb], b"mdns"),
        ipv4_udp([255, 255, 255, 255], [0xff; 6], b"broadcast"),
    ]
}

/// Random expressions with byte accessors, arithmetic, lengths and MAC addresses, alone or
/// combined with the rule tables' primitives: each holds at least one thing only libpcap's
/// compiler takes, so the whole expression is a program.
fn accessor_expressions(frames: &[Vec<u8>], count: usize) -> Vec<String> {
    let macs: Vec<String> = frames
        .iter()
        .flat_map(|f| [&f[..6], &f[6..12]])
        .map(|m| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut rng = fastrand::Rng::with_seed(33);
    (0..count)
        .map(|_| {
            let accessor = accessor(&mut rng, frames, &macs);
            match rng.u8(0..6) {
                0 | 1 => accessor,
                2 => format!("not ({accessor})"),
                3 => format!(
                    "({accessor}) and ({})",
                    accessor_or_table(&mut rng, frames, &macs)
                ),
                4 => format!(
                    "({accessor}) or ({})",
                    accessor_or_table(&mut rng, frames, &macs)
                ),
                _ => format!(
                    "{} and not ({accessor})",
                    ["tcp", "udp", "ip", "ip6", "port 53", "vlan", "not arp"][rng.usize(0..7)]
                ),
            }
        })
        .collect()
}

fn accessor_or_table(rng: &mut fastrand::Rng, frames: &[Vec<u8>], macs: &[String]) -> String {
    if rng.bool() {
        accessor(rng, frames, macs)
    } else {
        [
            "tcp",
            "udp port 53",
            "icmp",
            "ip6",
            "arp",
            "host 10.0.0.1",
            "vlan 100",
        ][rng.usize(0..7)]
        .to_owned()
    }
}

/// One primitive only libpcap's compiler takes, with values read off a random frame so that
/// most select some frames but not all.
fn accessor(rng: &mut fastrand::Rng, frames: &[Vec<u8>], macs: &[String]) -> String {
    let frame = &frames[rng.usize(0..frames.len())];
    let relation = ["=", "!=", "<", ">", "<=", ">="][rng.usize(0..6)];
    match rng.u8(0..10) {
        0..=3 => {
            // A load at an offset of a layer, sized 1, 2 or 4, maybe masked.
            let (layer, base) = [
                ("ether", 0),
                ("ip", 14),
                ("ip6", 14),
                ("tcp", 34),
                ("udp", 34),
            ][rng.usize(0..5)];
            let size = [1usize, 2, 4][rng.usize(0..3)];
            let offset = rng.usize(0..24);
            let value = frame
                .get(base + offset..base + offset + size)
                .map_or(0, |b| b.iter().fold(0u32, |v, &x| v << 8 | u32::from(x)));
            let access = if size == 1 {
                format!("{layer}[{offset}]")
            } else {
                format!("{layer}[{offset}:{size}]")
            };
            if rng.bool() {
                let mask = [0x0f, 0xf0, 0x1fff, 0xff00, 1, 0x80][rng.usize(0..6)];
                format!("{access} & {mask:#x} {relation} {}", value & mask)
            } else {
                format!("{access} {relation} {value}")
            }
        }
        4 => {
            // Arithmetic on loads.
            let operator = ["+", "-", "*", "/", "%", "&", "|", "^", "<<", ">>"][rng.usize(0..10)];
            let operand = rng.u32(1..9);
            let left = [
                "ip[0]",
                "ip[8]",
                "tcp[13]",
                "ether[12:2]",
                "len",
                "udp[4:2]",
            ][rng.usize(0..6)];
            format!("{left} {operator} {operand} {relation} {}", rng.u32(0..300))
        }
        5 => format!(
            "{} {}",
            ["less", "greater"][rng.usize(0..2)],
            frame.len() + rng.usize(0..3) - 1
        ),
        6 => format!(
            "ether {} {}",
            ["host", "src", "dst"][rng.usize(0..3)],
            macs[rng.usize(0..macs.len())]
        ),
        7 => [
            "ether broadcast",
            "ether multicast",
            "ip broadcast",
            "ip multicast",
            "ip6 multicast",
        ][rng.usize(0..5)]
        .to_owned(),
        8 => format!(
            "tcp[tcpflags] & ({}) != 0",
            [
                "tcp-syn",
                "tcp-ack",
                "tcp-fin|tcp-rst",
                "tcp-push",
                "tcp-syn|tcp-ack"
            ][rng.usize(0..5)]
        ),
        _ => {
            // An index computed from the packet: the byte after the IPv4 header's options.
            format!(
                "ip[(ip[0] & 0xf) * 4 + {}] {relation} {}",
                rng.usize(0..8),
                rng.u32(0..256)
            )
        }
    }
}

/// The replayed frames and [`more_frames`], written to `dir`/replayed.pcap (returned), and the
/// man page's expressions followed by `generated` accessor expressions.
fn frames_and_expressions(dir: &Path, generated: usize) -> (Vec<Vec<u8>>, PathBuf, Vec<String>) {
    let mut frames = replayed();
    frames.extend(more_frames());
    let all = dir.join("replayed.pcap");
    write_pcap(&all, &frames);
    let mut expressions: Vec<String> = MAN_PAGE.iter().map(ToString::to_string).collect();
    expressions.extend(accessor_expressions(&frames, generated));
    (frames, all, expressions)
}

#[test]
fn expressions_beyond_the_rule_tables_copy_what_tcpdump_selects() {
    let lab = Lab::new("programs");
    let dir = tempfile::tempdir().expect("temp dir");
    let (frames, all, expressions) = frames_and_expressions(dir.path(), 300);
    let copies = agent_copies(&lab, dir.path(), &expressions, &frames);
    let mut splitting = 0;
    for (index, (expression, copies)) in expressions.iter().zip(copies).enumerate() {
        let selected = tcpdump_selects(
            &all,
            expression,
            &dir.path().join(format!("tcpdump-{index}.pcap")),
        );
        splitting += usize::from(!selected.is_empty() && selected.len() < frames.len());
        assert_same_frames(&format!("`{expression}`"), copies, selected);
    }
    assert!(
        splitting > expressions.len() / 2,
        "only {splitting} of {} expressions select some frames but not all",
        expressions.len()
    );
}

/// `run -r` runs the same programs in the agent (the interpreter the kernel runs, over whole
/// frames whose tags are in place).
#[test]
fn reading_a_file_through_a_program_selects_what_tcpdump_selects() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_, all, expressions) = frames_and_expressions(dir.path(), 100);
    for (index, expression) in expressions.iter().enumerate() {
        let selected = tcpdump_selects(
            &all,
            expression,
            &dir.path().join(format!("tcpdump-{index}.pcap")),
        );
        let output = dir.path().join(format!("agent-{index}.pcap"));
        read_selecting(&all, &output, expression);
        assert_same_frames(
            &format!("`{expression}` from a file"),
            pcap_frames(&output),
            selected,
        );
    }
}
