//! The filter language without root: what expressions become, that the ordered rules decide
//! every packet as the expression does, and the errors.
use std::net::IpAddr;

use fastrand::Rng;
use mirror_common::Direction;

use super::{Expr, MAX_FILTER_RULES, compile, compile_tables, decide::Decisions, parse};
use crate::{
    config::ActionConfig,
    rules::{Fields, Header, model::Packet},
};

/// The rules an expression becomes, as `check --explain` shows them, and the default.
fn explained(text: &str) -> (Vec<String>, ActionConfig) {
    let filter = compile(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    let rules = filter
        .rules
        .iter()
        .map(|(fields, action)| format!("{action:?} {fields}"))
        .collect();
    (rules, filter.default)
}

#[test]
fn expressions_become_ordered_rules() {
    use ActionConfig::{Mirror, Skip};
    let cases: &[(&str, &[&str], ActionConfig)] = &[
        ("tcp", &["Mirror proto 6"], Skip),
        (
            "port 53",
            &["Mirror src_port 53", "Mirror dst_port 53"],
            Skip,
        ),
        (
            "udp dst port 53 or 5353",
            &[
                "Mirror proto 17, dst_port 53",
                "Mirror proto 17, dst_port 5353",
            ],
            Skip,
        ),
        (
            "not host 10.1.2.3",
            &["Skip src 10.1.2.3/32", "Skip dst 10.1.2.3/32"],
            Mirror,
        ),
        (
            "tcp port 443 and not host 10.1.2.3",
            &[
                "Skip proto 6, src 10.1.2.3/32, src_port 443",
                "Skip proto 6, dst 10.1.2.3/32, src_port 443",
                "Mirror proto 6, src_port 443",
                "Skip proto 6, src 10.1.2.3/32, dst_port 443",
                "Skip proto 6, dst 10.1.2.3/32, dst_port 443",
                "Mirror proto 6, dst_port 443",
            ],
            Skip,
        ),
        (
            "src and dst net 10.0.0.0/8",
            &["Mirror src 10.0.0.0/8, dst 10.0.0.0/8"],
            Skip,
        ),
        (
            "net 192.168 mask 255.255.0.0",
            &["Mirror src 192.168.0.0/16", "Mirror dst 192.168.0.0/16"],
            Skip,
        ),
        (
            "ip6 and icmp6",
            &["Mirror ethertype 0x86dd, proto 58"],
            Skip,
        ),
        ("ether proto \\arp", &["Mirror ethertype 0x0806"], Skip),
        (
            "ip proto \\udp",
            &["Mirror ethertype 0x0800, proto 17"],
            Skip,
        ),
        ("vlan", &["Mirror vlan any"], Skip),
        (
            "vlan 100 && portrange 1-1023",
            &[
                "Mirror vlan 100, src_port 1-1023",
                "Mirror vlan 100, dst_port 1-1023",
            ],
            Skip,
        ),
        // Equal precedence, from the left: (tcp or udp) and port 53.
        (
            "tcp or udp and port 53",
            &[
                "Mirror proto 6, src_port 53",
                "Mirror proto 6, dst_port 53",
                "Mirror proto 17, src_port 53",
                "Mirror proto 17, dst_port 53",
            ],
            Skip,
        ),
        ("tcp and udp", &[], Skip),
        ("not (tcp or not tcp)", &[], Skip),
        ("host 10.0.0.1 or not host 10.0.0.1", &[], Mirror),
    ];
    for (text, rules, default) in cases {
        assert_eq!(
            explained(text),
            (rules.iter().map(ToString::to_string).collect(), *default),
            "{text}"
        );
    }
}

#[test]
fn what_the_rule_tables_cannot_hold_is_refused_where_it_stands() {
    let cases: &[(&str, usize, &str)] = &[
        ("tcp[13] & 2 != 0", 3, "packet data accessors"),
        ("less 100", 0, "`less` is not supported"),
        ("ether host 00:11:22:33:44:55", 11, "MAC addresses"),
        ("host example.com", 5, "not an IP address"),
        ("host 10.0.0.0/8", 5, "for a prefix write `net"),
        (
            "net 10.0.0.1/8",
            4,
            "non-network bits are set (did you mean 10.0.0.0/8?)",
        ),
        (
            "net 10.0.0.0 mask 255.0.255.0",
            18,
            "not a contiguous IPv4 netmask",
        ),
        ("port http", 5, "service names are not looked up"),
        ("port 70000", 5, "not a port number"),
        ("portrange 90-80", 10, "the range is empty"),
        ("tcp and", 7, "the expression ends"),
        ("(tcp or udp", 0, "a `(` without its `)`"),
        ("tcp)", 3, "a `)` without its `(`"),
        ("tcp udp", 4, "expected `and` or `or`"),
        ("and tcp", 0, "needs a primitive on each side"),
        ("ip proto 300", 9, "not an IP protocol"),
        ("ether proto \\ipx", 12, "not an ethertype"),
        ("ip6 host 10.0.0.1", 9, "can never match"),
        ("icmp and port 80", 9, ""),
        ("tcp host 10.0.0.1", 9, "does not qualify a host"),
        ("ether", 0, "`ether proto N`"),
        ("gateway 10.0.0.1", 0, "`gateway` is not supported"),
    ];
    for (text, offset, message) in cases {
        match compile_tables(text) {
            Ok(filter) if message.is_empty() => {
                assert!(
                    filter.rules.is_empty(),
                    "{text}: matches nothing, so no rule"
                );
            }
            Ok(filter) => panic!("{text}: accepted as {filter:?}"),
            Err(error) => {
                assert_eq!(error.offset, *offset, "{text}: {error}");
                assert!(error.message.contains(message), "{text}: {error}");
            }
        }
    }
    let error = compile_tables("less 100").expect_err("refused");
    assert!(error.to_string().starts_with("column 1: "), "{error}");
    assert!(error.message.contains("supported: host, net"), "{error}");
}

#[test]
fn deep_or_long_expressions_are_refused_before_they_recurse() {
    let nested = format!("{}tcp{}", "(".repeat(65), ")".repeat(65));
    let error = compile_tables(&nested).expect_err("65 deep");
    assert_eq!(error.offset, 64, "{error}");
    assert!(error.message.contains("nest more than 64"), "{error}");
    compile_tables(&format!("{}tcp{}", "(".repeat(64), ")".repeat(64))).expect("64 deep");
    let nots = format!("{}tcp", "not ".repeat(100_000));
    assert!(
        compile_tables(&nots)
            .expect_err("deep")
            .message
            .contains("more than 1024 words")
    );
    let long = vec!["tcp"; 600].join(" and ");
    assert!(
        compile_tables(&long)
            .expect_err("long")
            .message
            .contains("more than 1024 words")
    );
    compile_tables(&vec!["tcp"; 500].join(" and ")).expect("999 tokens");
}

#[test]
fn a_bare_value_takes_the_qualifiers_before_it() {
    for (short, long) in [
        (
            "host 10.0.0.1 or 10.0.0.2",
            "host 10.0.0.1 or host 10.0.0.2",
        ),
        (
            "tcp dst port 80 or 443",
            "tcp dst port 80 or tcp dst port 443",
        ),
        (
            "not src net 10.0.0.0/8 and 192.168.0.0/16",
            "not src net 10.0.0.0/8 and src net 192.168.0.0/16",
        ),
        ("10.0.0.1", "host 10.0.0.1"),
        (
            "src or dst port 1 and src and dst port 2",
            "port 1 and (src port 2 and dst port 2)",
        ),
    ] {
        assert_eq!(compile(short), compile(long), "{short}");
    }
}

#[test]
fn an_expression_past_the_limit_is_refused() {
    // One of N source ports and one of N destination ports: N * N rules.
    let choices = |n: u16| -> String {
        let list: Vec<String> = (1..=n).map(|p| p.to_string()).collect();
        let list = list.join(" or ");
        format!("(src port {list}) and (dst port {list})")
    };
    let error = compile_tables(&choices(17)).expect_err("289 rules");
    assert!(
        error
            .message
            .contains(&format!("more than {MAX_FILTER_RULES} rules")),
        "{error}"
    );
    assert_eq!(
        compile_tables(&choices(16))
            .expect("256 rules fit")
            .rules
            .len(),
        256
    );
}

/// Random expressions from the grammar, over a few values so that packets hit them.
fn random_expr(rng: &mut Rng, depth: u32) -> String {
    let primitives = [
        "tcp",
        "udp",
        "icmp",
        "ip",
        "ip6",
        "arp",
        "vlan",
        "vlan 7",
        "port 53",
        "src port 53",
        "dst port 80",
        "portrange 50-90",
        "host 10.0.0.1",
        "src host 10.0.0.2",
        "dst net 10.0.0.0/8",
        "net 2001:db8::/32",
        "host 2001:db8::1",
        "ip proto 17",
        "proto 6",
        "ether proto 0x88cc",
        "tcp src port 80",
        "src and dst net 10.0.0.0/24",
    ];
    if depth == 0 || rng.usize(0..3) == 0 {
        return primitives[rng.usize(0..primitives.len())].to_owned();
    }
    match rng.usize(0..3) {
        0 => format!("not {}", random_expr(rng, depth - 1)),
        1 => format!(
            "({} and {})",
            random_expr(rng, depth - 1),
            random_expr(rng, depth - 1)
        ),
        _ => format!(
            "({} or {})",
            random_expr(rng, depth - 1),
            random_expr(rng, depth - 1)
        ),
    }
}

fn random_packet(rng: &mut Rng) -> Packet {
    let pick = |rng: &mut Rng, values: &[u16]| -> Option<u16> {
        let i = rng.usize(0..=values.len());
        values.get(i).copied()
    };
    let addresses: [IpAddr; 6] = [
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.9",
        "192.0.2.1",
        "2001:db8::1",
        "2001:db8::2",
    ]
    .map(|a| a.parse().expect("address"));
    let ethertype = pick(rng, &[0x0800, 0x86dd, 0x0806, 0x88cc]);
    let ip = matches!(ethertype, Some(0x0800 | 0x86dd));
    let family = |a: &IpAddr| a.is_ipv4() == (ethertype == Some(0x0800));
    let address = |rng: &mut Rng| {
        let candidates: Vec<IpAddr> = addresses.iter().copied().filter(family).collect();
        candidates[rng.usize(0..candidates.len())]
    };
    let proto = if ip {
        pick(rng, &[6, 17, 1, 58]).map(|p| p as u8)
    } else {
        None
    };
    let ports = matches!(proto, Some(6 | 17));
    Packet {
        ifindex: 1,
        direction: Direction::Ingress,
        header: Header {
            ethertype,
            vlan: pick(rng, &[7, 8]),
            proto,
            src: ip.then(|| address(rng)),
            dst: ip.then(|| address(rng)),
            src_port: if ports {
                pick(rng, &[53, 80, 60, 1000])
            } else {
                None
            },
            dst_port: if ports {
                pick(rng, &[53, 80, 60, 1000])
            } else {
                None
            },
        },
    }
}

fn evaluate(expr: &Expr, packet: &Packet) -> bool {
    match expr {
        Expr::Fields(fields) => fields.matches(&packet.header),
        Expr::Not(inner) => !evaluate(inner, packet),
        Expr::And(left, right) => evaluate(left, packet) && evaluate(right, packet),
        Expr::Or(left, right) => evaluate(left, packet) || evaluate(right, packet),
    }
}

#[test]
fn the_rules_decide_every_packet_as_the_expression_does() {
    let mut rng = Rng::with_seed(18);
    let packets: Vec<Packet> = (0..400).map(|_| random_packet(&mut rng)).collect();
    let mut nontrivial = 0;
    for _ in 0..600 {
        let text = random_expr(&mut rng, 4);
        let expr = match parse(&text) {
            Ok(expr) => expr,
            // VLAN stacks are libpcap's.
            Err(e) if e.message.contains("a second `vlan`") => continue,
            Err(e) => panic!("{text}: {e}"),
        };
        let Ok(decisions) = Decisions::of(&expr, MAX_FILTER_RULES) else {
            continue;
        };
        let verdicts: Vec<bool> = packets.iter().map(|p| evaluate(&expr, p)).collect();
        nontrivial += usize::from(verdicts.contains(&true) && verdicts.contains(&false));
        for (packet, expected) in packets.iter().zip(verdicts) {
            let decided = decisions.decide(|fields: &Fields| fields.matches(&packet.header));
            assert_eq!(decided, expected, "{text}\n{packet:?}\n{decisions:#?}");
        }
    }
    assert!(
        nontrivial > 300,
        "only {nontrivial} expressions split the packets"
    );
}

/// Needs libpcap0.8 (which tcpdump depends on; `cargo xtask setup` installs it).
#[test]
fn the_rest_of_the_language_becomes_one_programs_rule() {
    let accepted = [
        "tcp[tcpflags] & (tcp-syn|tcp-fin) != 0",
        "less 100",
        "ether host 00:11:22:33:44:55",
        "vlan and vlan 300 and ip",
        "ip[6:2] & 0x1fff = 0",
    ];
    for text in accepted {
        let filter =
            compile(text).unwrap_or_else(|e| panic!("{text}: {e} (libpcap0.8 installed?)"));
        assert_eq!(
            filter.rules,
            vec![(Fields::default(), ActionConfig::Mirror)],
            "{text}"
        );
        assert_eq!(filter.default, ActionConfig::Skip);
        assert!(filter.program.is_some(), "{text}");
    }
    // A contradiction libpcap finds is no rule at all (and `check` warns about it).
    let never = compile("ip[0] = 1 and ip[0] = 2").expect("compiles");
    assert!(never.rules.is_empty() && never.program.is_none());
    // Both refuse: both say why, where the rule tables stopped.
    let error = compile("tcp[13] & ").expect_err("incomplete");
    assert_eq!(error.offset, 3, "{error}");
    assert!(
        error.message.starts_with("libpcap: ") && error.message.contains("syntax error"),
        "{error}"
    );
    let error = compile("host db1 or less 10").expect_err("a name");
    assert!(error.message.contains("`db1` is a name"), "{error}");
    // Past the rule tables' limit, a program.
    let list: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
    let list = list.join(" or ");
    assert!(
        compile(&format!("(src port {list}) and (dst port {list})"))
            .expect("a program")
            .program
            .is_some()
    );
}
