use std::{fmt::Write as _, net::IpAddr};

use mirror_common::{BITMAP_WORDS, Field, MAX_RULES, SAMPLE_FLOWS, SUMMARY_WORDS, UNCONSTRAINED};

use super::{
    hidden::HiddenRules,
    model::{Packet, decide},
    *,
};
use crate::config::{ConfigError, DEFAULT_COPY_RING_BYTES, LoadedConfig};

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

/// A session's first lines, for the configurations the tests write.
const HEAD: &str = "[[session]]\nname = \"a\"\n";

/// What the kernel computes from the tables, step for step (lookups, AND, summary walk).
fn simulate(tables: &Tables, rules: &[Rule], p: &Packet) -> Vec<(usize, usize)> {
    let Some(attachment) = tables
        .attachments
        .iter()
        .find(|a| (a.ifindex, a.direction) == (p.ifindex, p.direction))
        .map(|a| a.bitmap)
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
            // The default rules that skip are the agent's to count (see `counted_by_agent`).
            let decided: Vec<_> = decide(&plan, &packet)
                .into_iter()
                .filter(|&(_, rule)| !plan.rules[rule].counted_by_agent())
                .collect();
            assert_eq!(
                simulate(&plan.tables, &plan.rules, &packet),
                decided,
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

mod refusals;
