use std::{fmt::Write as _, net::IpAddr};

use mirror_common::{BITMAP_WORDS, Field, MAX_RULES, SAMPLE_FLOWS, SUMMARY_WORDS, UNCONSTRAINED};

use crate::config::{ConfigError, DEFAULT_COPY_RING_BYTES, LoadedConfig};

use super::{
    model::{Packet, decide},
    shadow::Shadows,
    *,
};

/// A plan with no pods selected.
pub(super) fn plan(loaded: &LoadedConfig, interfaces: &[Interface]) -> Result<Plan, ConfigError> {
    super::plan(loaded, interfaces, &|_| Vec::new())
}

fn iface(name: &str, ifindex: u32) -> Interface {
    Interface {
        name: name.into(),
        ifindex,
    }
}

pub(super) fn interfaces() -> Vec<Interface> {
    vec![
        iface("eth0", 2),
        iface("eth1", 3),
        iface("veth1", 4),
        iface("veth2", 5),
        iface("mir0", 9),
    ]
}

fn load(text: &str) -> LoadedConfig {
    LoadedConfig::parse("t.toml".into(), text.into()).expect("parses")
}

/// What the kernel computes from the tables, step for step (lookups, AND, summary walk).
fn simulate(tables: &Tables, rules: &[Rule], p: &Packet) -> Vec<(usize, usize)> {
    let key = (p.ifindex, p.direction as u32);
    let Some(&(_, attachment)) = tables
        .attachments
        .iter()
        .find(|(k, _)| (k.ifindex, k.direction) == key)
    else {
        return Vec::new();
    };
    let direct = |field: Field, table: &[u32], v: Option<u16>| {
        let wildcard = tables.wildcard[field as usize];
        match v {
            Some(v) if wildcard != UNCONSTRAINED => table[usize::from(v)],
            _ => wildcard,
        }
    };
    let lpm = |field: Field, entries: &[(IpNet, u32)], a: Option<IpAddr>| {
        let wildcard = tables.wildcard[field as usize];
        a.filter(|_| wildcard != UNCONSTRAINED)
            .and_then(|a| {
                entries
                    .iter()
                    .filter(|(n, _)| n.contains(&a))
                    .max_by_key(|(n, _)| n.prefix_len())
            })
            .map_or(wildcard, |e| e.1)
    };
    let indices: Vec<u32> = [
        attachment,
        direct(Field::Ethertype, &tables.ethertype, p.header.ethertype),
        direct(Field::VlanId, &tables.vlan, p.header.vlan),
        direct(
            Field::IpProto,
            &tables.ip_proto,
            p.header.proto.map(u16::from),
        ),
        lpm(Field::SrcIp, &tables.src_ip, p.header.src),
        lpm(Field::DstIp, &tables.dst_ip, p.header.dst),
        direct(Field::SrcPort, &tables.src_port, p.header.src_port),
        direct(Field::DstPort, &tables.dst_port, p.header.dst_port),
    ]
    .into_iter()
    .filter(|&i| i != UNCONSTRAINED)
    .collect();
    let mut summary = [!0u64; SUMMARY_WORDS];
    for &i in &indices {
        for (s, w) in summary.iter_mut().zip(tables.bitmaps[i as usize].summary) {
            *s &= w;
        }
    }
    let mut decided = Vec::new();
    let mut min_rule = 0;
    for w in 0..BITMAP_WORDS {
        if summary[w / 64] & (1 << (w % 64)) == 0 {
            continue;
        }
        let word = indices
            .iter()
            .fold(!0u64, |acc, &i| acc & tables.bitmaps[i as usize].words[w]);
        for bit in 0..64 {
            let rule = w * 64 + bit;
            if word & (1 << bit) != 0 && rule >= min_rule {
                let meta = tables.rules[rule];
                decided.push((meta.session as usize, rule));
                min_rule = meta.next_session_rule as usize;
            }
        }
    }
    assert!(decided.iter().all(|(s, r)| rules[*r].session == *s));
    decided
}

/// Deterministic test randomness: `Rng::with_seed` gives the same sequence on every run.
use fastrand::Rng;

fn below(rng: &mut Rng, n: u64) -> u64 {
    rng.u64(..n)
}

/// `Some(f(rng))` in `percent` out of 100 cases.
fn maybe<T>(rng: &mut Rng, percent: u64, f: impl FnOnce(&mut Rng) -> T) -> Option<T> {
    (below(rng, 100) < percent).then(|| f(rng))
}

fn random_v4(rng: &mut Rng) -> IpAddr {
    // A small space so that prefixes and packets meet often.
    IpAddr::from([
        10,
        below(rng, 4) as u8,
        below(rng, 4) as u8,
        below(rng, 8) as u8,
    ])
}

fn random_rule_text(rng: &mut Rng, number: u32) -> String {
    let mut text = format!(
        "[[session.rule]]\nnumber = {number}\naction = \"{}\"\n",
        if below(rng, 3) == 0 { "skip" } else { "mirror" }
    );
    if let Some(v) = maybe(rng, 20, |r| below(r, 3) + 100) {
        writeln!(text, "vlan = {v}").expect("writing to a String");
    }
    let proto = maybe(rng, 60, |r| [6u8, 17, 1][below(r, 3) as usize]);
    if let Some(p) = proto {
        writeln!(text, "proto = {p}").expect("writing to a String");
    }
    for field in ["src", "dst"] {
        if let Some(len) = maybe(rng, 50, |r| [8u8, 16, 24, 32][below(r, 4) as usize]) {
            let net = IpNet::new(random_v4(rng), len).expect("valid").trunc();
            writeln!(text, "{field} = \"{net}\"").expect("writing to a String");
        }
    }
    if proto.is_some_and(|p| p != 1) {
        for field in ["src_port", "dst_port"] {
            if let Some(lo) = maybe(rng, 50, |r| below(r, 40) as u16) {
                let hi = lo + below(rng, 10) as u16;
                writeln!(text, "{field} = \"{lo}-{hi}\"").expect("writing to a String");
            }
        }
    }
    text
}

#[test]
fn compiled_tables_agree_with_first_match_semantics() {
    let mut rng = Rng::with_seed(7);
    for round in 0..30 {
        let mut text = String::new();
        for (s, ifaces) in ["[\"eth0\"]", "[\"eth0\", \"veth*\"]", "[\"eth1\"]"]
            .iter()
            .enumerate()
        {
            let direction = ["ingress", "egress", "both"][s];
            write!(
                text,
                "[[session]]\nname = \"s{s}\"\ninterfaces = {ifaces}\ndirection = \"{direction}\"\ntarget = {{ interface = \"mir0\" }}\ndefault = \"{}\"\n",
                if round % 2 == 0 { "skip" } else { "mirror" }
            ).expect("writing to a String");
            for n in 0..(below(&mut rng, 40) as u32 + round * 3) {
                text += &random_rule_text(&mut rng, n);
            }
        }
        let plan = plan(&load(&text), &interfaces()).expect("valid plan");
        for _ in 0..400 {
            let ipv4 = below(&mut rng, 10) != 0;
            let proto = maybe(&mut rng, 90, |r| [6u8, 17, 1, 132][below(r, 4) as usize]);
            let has_ports = ipv4 && proto.is_some_and(|p| p != 1);
            let packet = Packet {
                ifindex: [2, 3, 4, 5][below(&mut rng, 4) as usize],
                direction: if below(&mut rng, 2) == 0 {
                    Direction::Ingress
                } else {
                    Direction::Egress
                },
                header: Header {
                    ethertype: Some(if ipv4 { 0x0800 } else { 0x0806 }),
                    vlan: maybe(&mut rng, 30, |r| below(r, 4) as u16 + 100),
                    proto: proto.filter(|_| ipv4),
                    src: ipv4.then(|| random_v4(&mut rng)),
                    dst: ipv4.then(|| random_v4(&mut rng)),
                    src_port: has_ports.then(|| below(&mut rng, 60) as u16),
                    dst_port: has_ports.then(|| below(&mut rng, 60) as u16),
                },
            };
            assert_eq!(
                simulate(&plan.tables, &plan.rules, &packet),
                decide(&plan, &packet),
                "round {round}, {packet:?}"
            );
        }
    }
}

#[test]
fn fields_no_rule_constrains_get_no_table() {
    let text = format!(
        "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n\
         [[session.rule]]\nnumber = 1\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 53\n"
    );
    let tables = plan(&load(&text), &interfaces()).expect("valid").tables;
    for field in [
        Field::Ethertype,
        Field::VlanId,
        Field::SrcIp,
        Field::DstIp,
        Field::SrcPort,
    ] {
        assert_eq!(tables.wildcard[field as usize], UNCONSTRAINED, "{field:?}");
    }
    assert!(tables.ethertype.is_empty() && tables.vlan.is_empty() && tables.src_port.is_empty());
    assert!(tables.src_ip.is_empty() && tables.dst_ip.is_empty());
    assert_eq!(
        (tables.ip_proto.len(), tables.dst_port.len()),
        (256, 65_536)
    );
    assert_ne!(tables.wildcard[Field::IpProto as usize], UNCONSTRAINED);
}

#[test]
fn ten_thousand_rules_compile_with_shared_bitmaps() {
    let mut rng = Rng::with_seed(11);
    let mut text =
        "[[session]]\nname = \"big\"\ninterfaces = [\"eth0\"]\ntarget = { interface = \"mir0\" }\n"
            .to_owned();
    for n in 0..10_000u32 {
        let net = IpNet::new(
            IpAddr::from(
                rng.u64(..).to_be_bytes()[..4]
                    .try_into()
                    .map(|b: [u8; 4]| b)
                    .expect("4"),
            ),
            24 + below(&mut rng, 9) as u8,
        )
        .expect("valid")
        .trunc();
        write!(
                text,
            "[[session.rule]]\nnumber = {n}\naction = \"mirror\"\nproto = \"udp\"\ndst = \"{net}\"\ndst_port = {}\n",
            below(&mut rng, 65_536)
        ).expect("writing to a String");
    }
    let plan = plan(&load(&text), &interfaces()).expect("valid plan");
    assert_eq!(plan.rules.len(), 10_001);
    assert!(
        plan.tables.bitmaps.len() < 40_000,
        "{}",
        plan.tables.bitmaps.len()
    );
}

#[test]
fn a_pod_session_watches_the_interfaces_its_selector_is_given() {
    let text = format!(
        "{HEAD}pods = {{ namespace = \"shop\", labels = {{ app = \"web\" }} }}\ntarget = {{ interface = \"mir0\" }}\n"
    );
    let none = plan(&load(&text), &interfaces()).expect("valid without pods");
    assert!(none.sessions[0].attachments.is_empty());
    let pods = |selector: &PodSelector| {
        assert_eq!(selector.namespace.as_deref(), Some("shop"));
        // The target is never watched, even when a pod's route names it.
        vec![iface("veth1", 4), iface("mir0", 9)]
    };
    let plan = super::plan(&load(&text), &interfaces(), &pods).expect("valid");
    let hooks: Vec<(&str, Direction)> = plan.sessions[0]
        .attachments
        .iter()
        .map(|(i, d)| (i.name.as_str(), *d))
        .collect();
    assert_eq!(
        hooks,
        [("veth1", Direction::Ingress), ("veth1", Direction::Egress)]
    );
    // The pods found are not part of what the session is: its counters go on across them.
    assert_eq!(fingerprints(&none), fingerprints(&plan));
}

fn plan_error(text: &str) -> String {
    plan(&load(text), &interfaces())
        .expect_err("invalid")
        .to_string()
}

const HEAD: &str = "[[session]]\nname = \"a\"\n";

#[test]
fn refuses_loops_unknown_interfaces_and_contradictions() {
    let cases = [
        (
            format!(
                "{HEAD}interfaces = [\"eth0\", \"mir0\"]\ntarget = {{ interface = \"mir0\" }}\n"
            ),
            "t.toml:3:",
            "includes the target `mir0`",
        ),
        (
            format!("{HEAD}interfaces = [\"*\"]\ntarget = {{ interface = \"mir0\" }}\n"),
            "t.toml:3:",
            "a loop",
        ),
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"veth1\" }}\n[[session]]\nname = \"b\"\ninterfaces = [\"veth*\"]\ntarget = {{ interface = \"mir0\" }}\n"
            ),
            "t.toml:7:",
            "the target of session `a`",
        ),
        (
            format!("{HEAD}interfaces = [\"nope0\"]\ntarget = {{ interface = \"mir0\" }}\n"),
            "t.toml:3:",
            "interface `nope0` does not exist",
        ),
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\npods = {{ labels = {{ app = \"web\" }} }}\ntarget = {{ interface = \"mir0\" }}\n"
            ),
            "t.toml:4:",
            "either `interfaces` or `pods`, not both",
        ),
        (
            format!("{HEAD}target = {{ interface = \"mir0\" }}\n"),
            "t.toml:2:",
            "the session watches nothing",
        ),
        (
            format!(
                "{HEAD}pods = {{ expressions = [{{ key = \"tier\", operator = \"In\" }}] }}\ntarget = {{ interface = \"mir0\" }}\n"
            ),
            "t.toml:3:",
            "`In` on label `tier` needs at least one value",
        ),
        (
            format!(
                "{HEAD}pods = {{ expressions = [{{ key = \"tier\", operator = \"Exists\", values = [\"x\"] }}] }}\ntarget = {{ interface = \"mir0\" }}\n"
            ),
            "t.toml:3:",
            "`Exists` on label `tier` takes no values",
        ),
        (
            format!("{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"nope1\" }}\n"),
            "t.toml:4:",
            "target interface `nope1` does not exist",
        ),
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n{HEAD}interfaces = [\"eth1\"]\ntarget = {{ interface = \"mir0\" }}\n"
            ),
            "t.toml:6:",
            "session name `a` is already used at t.toml:2:",
        ),
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n[[session.rule]]\nnumber = 5\naction = \"mirror\"\n[[session.rule]]\nnumber = 5\naction = \"skip\"\n"
            ),
            "t.toml:8:",
            "rule number 5 is used twice",
        ),
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n[[session.rule]]\nnumber = 1\naction = \"mirror\"\nsrc = \"10.0.0.0/8\"\ndst = \"fd00::/8\"\n"
            ),
            "t.toml:5:",
            "different IP versions",
        ),
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n[[session.rule]]\nnumber = 1\naction = \"mirror\"\nethertype = \"arp\"\nproto = \"udp\"\n"
            ),
            "t.toml:5:",
            "not ipv4 or ipv6",
        ),
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n[[session.rule]]\nnumber = 1\naction = \"mirror\"\nproto = \"icmp\"\ndst_port = 80\n"
            ),
            "t.toml:5:",
            "ports are set",
        ),
        (
            "stats_interval_secs = 5\n".to_owned(),
            "t.toml",
            "no [[session]]",
        ),
    ];
    assert_refused(&cases);
}

#[test]
fn refuses_contradictory_xdp_and_file_settings() {
    let cases = [
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\nhook = \"xdp\"\ndirection = \"egress\"\ntarget = {{ interface = \"mir0\" }}\n"
            ),
            "t.toml:5:",
            "XDP sees received packets only",
        ),
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\", rotate_bytes = 1000 }}\n"
            ),
            "t.toml:4:",
            "go with a `file` target",
        ),
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ file = \"/nonexistent-dir/x.pcap\" }}\n"
            ),
            "t.toml:4:",
            "does not exist",
        ),
        (
            format!(
                "copy_ring_bytes = 5000\n{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n"
            ),
            "t.toml:1:",
            "power of two",
        ),
    ];
    assert_refused(&cases);
    let xdp = plan(
        &load(&format!(
            "{HEAD}interfaces = [\"eth0\"]\nhook = \"xdp\"\ntarget = {{ file = \"/tmp/x.pcapng\" }}\n"
        )),
        &interfaces(),
    )
    .expect("valid");
    assert_eq!(xdp.sessions[0].directions, [Direction::XdpIngress]);
    assert!(xdp.sessions[0].through_ring);
    assert_eq!(xdp.copy_ring_bytes, DEFAULT_COPY_RING_BYTES);
}

#[test]
fn refuses_bad_vxlan_targets() {
    let cases = [
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\", vxlan = {{ remote = \"192.0.2.9\", vni = 1 }} }}\n"
            ),
            "t.toml:4:",
            "exactly one of `interface`, `vxlan`, `geneve`, `gre`, `erspan` or `file`",
        ),
        (
            format!("{HEAD}interfaces = [\"eth0\"]\ntarget = {{}}\n"),
            "t.toml:4:",
            "exactly one of `interface`, `vxlan`, `geneve`, `gre`, `erspan` or `file`",
        ),
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ vxlan = {{ remote = \"239.1.1.1\", vni = 1 }} }}\n"
            ),
            "t.toml:4:",
            "must be a unicast address",
        ),
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ vxlan = {{ remote = \"192.0.2.9\", vni = 1, local = \"fd00::1\" }} }}\n"
            ),
            "t.toml:4:",
            "different IP versions",
        ),
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ vxlan = {{ remote = \"192.0.2.9\", vni = 1, port = 0 }} }}\n"
            ),
            "t.toml:4:",
            "port must not be 0",
        ),
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ gre = {{ remote = \"192.0.2.9\" }}, erspan = {{ remote = \"192.0.2.9\", session_id = 1 }} }}\n"
            ),
            "t.toml:4:",
            "exactly one of",
        ),
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ erspan = {{ remote = \"192.0.2.9\", session_id = 1, version = 1 }} }}\n"
            ),
            "t.toml:4:",
            "must be 2 (type II) or 3 (type III)",
        ),
        (
            format!(
                "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ geneve = {{ remote = \"127.0.0.1\", vni = 1 }} }}\n"
            ),
            "t.toml:4:",
            "geneve remote `127.0.0.1` must be a unicast address of another host",
        ),
    ];
    assert_refused(&cases);
}

#[test]
fn refuses_out_of_range_tunnel_ids_where_they_are_written() {
    for (target, message) in [
        (
            "erspan = { remote = \"192.0.2.9\", session_id = 1024 }",
            "`1024` is not an ERSPAN session id (0..1023)",
        ),
        ("gre = { remote = \"192.0.2.9\", key = -1 }", "u32"),
    ] {
        let text = format!("{HEAD}interfaces = [\"eth0\"]\ntarget = {{ {target} }}\n");
        let error = LoadedConfig::parse("t.toml".into(), text)
            .expect_err("refused")
            .to_string();
        assert!(
            error.starts_with("t.toml:4:") && error.contains(message),
            "{error}"
        );
    }
}

#[test]
fn refuses_bad_controls() {
    let session = |controls: &str| {
        format!("{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n{controls}\n")
    };
    let cases = [
        (
            session("snaplen = 95"),
            "t.toml:5:",
            "snaplen must be 96..65535",
        ),
        (session("snaplen = 70000"), "t.toml:5:", "snaplen must be"),
        (
            session("sample = { every = 0 }"),
            "t.toml:5:",
            "sample.every must be at least 1",
        ),
        (
            session("rate_limit = { burst_packets = 5 }"),
            "t.toml:5:",
            "needs packets_per_second, bytes_per_second or both",
        ),
        (
            session("rate_limit = { bytes_per_second = 1000, burst_packets = 5 }"),
            "t.toml:5:",
            "burst_packets needs packets_per_second",
        ),
        (
            session("rate_limit = { packets_per_second = 0 }"),
            "t.toml:5:",
            "packets_per_second must be",
        ),
        (
            format!(
                "node_rate_limit = {{ bytes_per_second = 100, burst_bytes = 10 }}\n{}",
                session("")
            ),
            "t.toml:1:",
            "burst_bytes must hold",
        ),
    ];
    assert_refused(&cases);
}

#[test]
fn controls_in_kernel_terms() {
    let plan = plan(
        &load(&format!(
            "node_rate_limit = {{ packets_per_second = 50 }}\n{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n\
             snaplen = 128\nsample = {{ every = 8, by = \"flow\", seed = 7 }}\n\
             rate_limit = {{ packets_per_second = 1000, bytes_per_second = 1000000, burst_bytes = 3000 }}\n"
        )),
        &interfaces(),
    )
    .expect("valid");
    let controls = &plan.sessions[0].controls;
    assert_eq!(controls.snaplen, Some(128));
    assert_eq!(
        (
            controls.sample_mode,
            controls.sample_every,
            controls.sample_seed
        ),
        (SAMPLE_FLOWS, 8, 7)
    );
    assert_eq!(
        controls.rate,
        RateLimit {
            packet_cost_ns: 1_000_000,
            // Default burst: a tenth of a second's worth.
            packet_burst_ns: 100 * 1_000_000,
            byte_cost_ns_x1024: 1_024_000,
            byte_burst_ns: 3000 * 1000,
        }
    );
    assert_eq!(plan.node_rate.packet_cost_ns, 20_000_000);
    assert_eq!(plan.node_rate.packet_burst_ns, 5 * 20_000_000);
}

/// Each (configuration, expected place, expected message) is refused as expected.
fn assert_refused(cases: &[(String, &str, &str)]) {
    for (text, at, message) in cases {
        let error = plan_error(text);
        assert!(
            error.starts_with(at) && error.contains(message),
            "{error}\n--- for:\n{text}"
        );
    }
}

#[test]
fn vxlan_targets_put_a_tunnel_guard_first_in_every_session() {
    let plan = plan(
        &load(&format!(
            "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ vxlan = {{ remote = \"fd00::9\", vni = 3, port = 8472 }} }}\ndefault = \"mirror\"\n\
             [[session]]\nname = \"b\"\ninterfaces = [\"eth1\"]\ntarget = {{ interface = \"mir0\" }}\n"
        )),
        &interfaces(),
    )
    .expect("valid");
    let kinds: Vec<(usize, RuleKind)> = plan.rules.iter().map(|r| (r.session, r.kind)).collect();
    assert_eq!(
        kinds,
        [
            (0, RuleKind::TunnelGuard),
            (0, RuleKind::Default),
            (1, RuleKind::TunnelGuard),
            (1, RuleKind::Default)
        ]
    );
    let guard = &plan.rules[0];
    assert_eq!(guard.action, ActionConfig::Skip);
    assert_eq!(guard.fields.proto, Some(17));
    assert_eq!(guard.fields.dst, Some("fd00::9/128".parse().expect("net")));
    assert_eq!(guard.fields.dst_port, Some(8472..=8472));
    // The outer packet of a copy is skipped; an ordinary packet reaches the default rule.
    let outer = Packet {
        ifindex: 2,
        direction: Direction::Ingress,
        header: Header {
            ethertype: Some(0x86dd),
            vlan: None,
            proto: Some(17),
            src: Some("fd00::1".parse().expect("ip")),
            dst: Some("fd00::9".parse().expect("ip")),
            src_port: Some(40_000),
            dst_port: Some(8472),
        },
    };
    assert_eq!(decide(&plan, &outer), [(0, 0)]);
    let other = Packet {
        header: Header {
            dst_port: Some(8473),
            ..outer.header
        },
        ..outer
    };
    assert_eq!(decide(&plan, &other), [(0, 1)]);
}

#[test]
fn gre_family_targets_guard_every_gre_packet_to_the_collector() {
    let plan = plan(
        &load(&format!(
            "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ erspan = {{ remote = \"192.0.2.9\", session_id = 3, version = 3 }} }}\ndefault = \"mirror\"\n"
        )),
        &interfaces(),
    )
    .expect("valid");
    let guard = &plan.rules[0];
    assert_eq!(guard.kind, RuleKind::TunnelGuard);
    assert_eq!(guard.fields.proto, Some(47));
    assert_eq!(guard.fields.dst, Some("192.0.2.9/32".parse().expect("net")));
    assert_eq!(guard.fields.dst_port, None);
    assert_eq!(
        plan.sessions[0].target.to_string(),
        "erspan 192.0.2.9 type 3 session 3"
    );
}

#[test]
fn warns_about_unreachable_and_overlapping_rules() {
    let text = format!(
        "{HEAD}interfaces = [\"eth0\", \"lxc*\"]\ntarget = {{ interface = \"mir0\" }}\n\
         [[session.rule]]\nnumber = 1\naction = \"mirror\"\nproto = \"tcp\"\n\
         [[session.rule]]\nnumber = 2\naction = \"skip\"\nproto = \"tcp\"\ndst_port = 22\n\
         [[session.rule]]\nnumber = 3\naction = \"skip\"\ndst = \"10.0.0.0/8\"\n"
    );
    let plan = plan(&load(&text), &interfaces()).expect("valid");
    assert_eq!(plan.warnings.len(), 3, "{:#?}", plan.warnings);
    assert!(plan.warnings[0].contains("`lxc*` matches no interface now"));
    assert!(
        plan.warnings[1].starts_with("t.toml:9:")
            && plan.warnings[1].contains("rule 2 of session `a` is unreachable: rule 1")
    );
    assert!(
        plan.warnings[2].starts_with("t.toml:14:")
            && plan.warnings[2].contains("rule 3 of session `a` partly overlaps rule 1")
    );
}

fn numbered_rules(count: usize, rule: &str) -> String {
    let mut text = format!("{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n");
    for number in 1..=count {
        write!(text, "[[session.rule]]\nnumber = {number}\n{rule}").expect("to a String");
    }
    text
}

#[test]
fn hidden_rule_warnings_are_capped_and_summarised() {
    let text = numbered_rules(1000, "action = \"mirror\"\nproto = \"tcp\"\n");
    let plan = plan(&load(&text), &interfaces()).expect("valid");
    // Each of the 999 later rules is hidden by every earlier one: 499,500 pairs.
    assert_eq!(
        plan.warnings.len(),
        Shadows::SHOWN + 1,
        "{:#?}",
        plan.warnings
    );
    assert_eq!(
        plan.warnings[Shadows::SHOWN],
        format!(
            "{} more warning(s) about unreachable or partly hidden rules (the first {} are shown above)",
            499_500 - Shadows::SHOWN,
            Shadows::SHOWN
        )
    );
}

#[test]
fn hidden_rule_checks_stop_at_their_budget() {
    // Distinct rules: nothing hidden, but every pair compared until the budget is spent.
    let mut text = format!("{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n");
    let count = 3000;
    for number in 1..=count {
        write!(text, "[[session.rule]]\nnumber = {number}\naction = \"mirror\"\nproto = \"udp\"\ndst_port = {number}\n")
            .expect("to a String");
    }
    let plan = plan(&load(&text), &interfaces()).expect("valid");
    // Rule n is compared with n - 1 earlier ones: the budget lasts while n(n-1)/2 fits.
    let checked = (1..=count)
        .take_while(|n| n * (n - 1) / 2 <= Shadows::PAIR_BUDGET)
        .count();
    assert_eq!(
        plan.warnings,
        [format!(
            "{} rule(s) were not checked for rules that hide them (the check stops after {} comparisons)",
            count - checked,
            Shadows::PAIR_BUDGET
        )]
    );
}

#[test]
fn the_rule_count_is_checked_before_any_rule() {
    // Too many rules, the last of them invalid: the count is what is reported.
    let mut text = numbered_rules(MAX_RULES as usize, "action = \"mirror\"\n");
    text.push_str("[[session.rule]]\nnumber = 0\naction = \"mirror\"\nsrc_port = 1\n");
    let error = plan(&load(&text), &interfaces())
        .expect_err("too many")
        .to_string();
    assert!(
        error.contains(&format!("{} rules", MAX_RULES + 2))
            && error.contains(&format!("exceed the limit of {MAX_RULES}")),
        "{error}"
    );
}

#[test]
fn an_expression_and_the_same_rules_compile_to_the_same_tables() {
    let session =
        "[[session]]\nname = \"s\"\ninterfaces = [\"eth0\"]\ntarget = { interface = \"mir0\" }\n";
    let tables = |body: &str| {
        let planned = plan(&load(&format!("{session}{body}")), &interfaces()).expect("plans");
        format!("{:?}", planned.tables)
    };
    assert_eq!(
        tables("filter = \"udp and dst net 10.0.0.0/8 and port 53\"\n"),
        tables(
            "[[session.rule]]\nnumber = 1\naction = \"mirror\"\nproto = \"udp\"\ndst = \"10.0.0.0/8\"\nport = 53\n"
        )
    );
    assert_eq!(
        tables("filter = \"tcp and not src host 10.0.0.1\"\n"),
        tables(
            "[[session.rule]]\nnumber = 1\naction = \"skip\"\nproto = \"tcp\"\nsrc = \"10.0.0.1\"\n\
             [[session.rule]]\nnumber = 2\naction = \"mirror\"\nproto = \"tcp\"\n"
        )
    );
}

#[test]
fn filter_sessions_refuse_rules_and_a_default_with_the_place() {
    let session = "[[session]]\nname = \"s\"\ninterfaces = [\"eth0\"]\ntarget = { interface = \"mir0\" }\nfilter = \"tcp\"\n";
    for (extra, line, message) in [
        ("default = \"mirror\"\n", 6, "takes no `default`"),
        (
            "[[session.rule]]\nnumber = 1\naction = \"mirror\"\n",
            6,
            "takes no [[session.rule]]",
        ),
    ] {
        let error = plan(&load(&format!("{session}{extra}")), &interfaces()).expect_err(extra);
        let text = error.to_string();
        assert!(
            text.starts_with(&format!("t.toml:{line}:")) && text.contains(message),
            "{text}"
        );
    }
    let error = plan(
        &load(&session.replace("\"tcp\"", "\"tcp[13] & 2 != 0\"")),
        &interfaces(),
    )
    .expect_err("bytes");
    assert!(
        error.to_string().starts_with("t.toml:5:") && error.to_string().contains("column 4:"),
        "{error}"
    );
}
