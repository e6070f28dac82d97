//! The configuration fuzzed: files made of valid and bad keys and values are planned or refused
//! with their place, never a panic (`cargo xtask test --fuzz-cases N` for a longer hunt).
use proptest::prelude::Strategy;

use super::tests::{interfaces, plan};
use crate::config::LoadedConfig;

/// Values for the keys of a session, a rule and the top level: the random files have one
/// value of each required key and maybe one of each other, and now and then a bad value, so
/// that most of them reach validation and some are refused there.
const SESSION_REQUIRED: &[&[&str]] = &[
    &["name = \"a\"", "name = \"b\"", "name = \"c\""],
    &[
        "interfaces = [\"eth0\"]",
        "interfaces = [\"veth*\", \"eth1\"]",
        "interfaces = [\"eth1\"]",
        "pods = { labels = { app = \"web\" } }",
    ],
    &[
        "target = { interface = \"mir0\" }",
        "target = { vxlan = { remote = \"192.0.2.9\", vni = 7 } }",
        "target = { erspan = { remote = \"fd00::9\", session_id = 20, version = 3 } }",
        "target = { gre = { remote = \"192.0.2.9\", key = 5 } }",
        "target = { geneve = { remote = \"fd00::9\", vni = 1 } }",
        "target = { file = \"/tmp/x.pcapng\", rotate_bytes = 1000000 }",
    ],
];
const SESSION_OPTIONAL: &[&[&str]] = &[
    &[
        "direction = \"both\"",
        "direction = \"egress\"",
        "direction = \"ingress\"",
    ],
    &["hook = \"xdp\"", "hook = \"tc\""],
    &["default = \"mirror\"", "default = \"skip\""],
    &["snaplen = 96", "snaplen = 1500", "snaplen = 65535"],
    &["unparsed = \"skip\"", "unparsed = \"mirror\""],
    &[
        "sample = { every = 3, by = \"flow\", seed = 1 }",
        "sample = { every = 1 }",
    ],
    &[
        "rate_limit = { packets_per_second = 1000 }",
        "rate_limit = { bytes_per_second = 1 }",
    ],
];
const SESSION_BAD: &[&str] = &[
    "interfaces = [\"mir0\"]",
    "interfaces = []",
    "interfaces = [\"[\"]",
    "target = { interface = \"eth0\" }",
    "target = { vxlan = { remote = \"127.0.0.1\", vni = 16777216 } }",
    "target = { gre = { remote = \"192.0.2.9\", local = \"fd00::1\" } }",
    "target = { interface = \"mir0\", file = \"x.pcap\" }",
    "direction = \"sideways\"",
    "snaplen = 95",
    "sample = { every = 0 }",
    "rate_limit = {}",
    "rate_limit = { packets_per_second = 18446744073709551615 }",
    "pods = { namespace = \"\" }",
];
const RULE_REQUIRED: &[&[&str]] = &[
    &[
        "number = 1",
        "number = 2",
        "number = 3",
        "number = 4294967295",
    ],
    &["action = \"mirror\"", "action = \"skip\""],
];
const RULE_OPTIONAL: &[&[&str]] = &[
    &[
        "proto = \"tcp\"",
        "proto = \"icmp\"",
        "proto = 17",
        "proto = \"udp\"",
    ],
    &[
        "ethertype = \"arp\"",
        "ethertype = \"ipv6\"",
        "ethertype = \"ipv4\"",
    ],
    &["vlan = 7", "vlan = 0", "vlan = 4095"],
    &[
        "src = \"10.0.0.0/8\"",
        "src = \"10.1.0.0/16\"",
        "src = \"fd00::1\"",
    ],
    &[
        "dst = \"fd00::/16\"",
        "dst = \"192.0.2.0/24\"",
        "dst = \"192.0.2.7\"",
    ],
    &[
        "src_port = \"1-1024\"",
        "src_port = \"1-65535\"",
        "src_port = 0",
    ],
    &["dst_port = 65535", "dst_port = 22", "dst_port = \"80\""],
];
const RULE_BAD: &[&str] = &[
    "colour = \"red\"",
    "proto = 300",
    "vlan = 4096",
    "dst = \"fd00::/200\"",
    "src = \"10.0.0.1/8\"",
    "src_port = \"9-1\"",
    "dst_port = 65536",
    "ethertype = 70000",
];
const TOP_OPTIONAL: &[&[&str]] = &[
    &["copy_ring_bytes = 3", "copy_ring_bytes = 8192"],
    &["node_rate_limit = { bytes_per_second = 1 }"],
    &["metrics_address = \"[::1]:9477\""],
    &["stats_interval_secs = 0"],
];

/// A table's lines: a value of each required key, maybe one of each optional key, and
/// rarely one bad line.
fn table(
    required: &'static [&'static [&'static str]],
    optional: &'static [&'static [&'static str]],
    bad: &'static [&'static str],
) -> impl Strategy<Value = String> {
    let required = required
        .iter()
        .map(|values| proptest::sample::select(*values))
        .collect::<Vec<_>>();
    let optional = optional
        .iter()
        .map(|values| proptest::option::of(proptest::sample::select(*values)))
        .collect::<Vec<_>>();
    let bad = proptest::option::weighted(0.1, proptest::sample::select(bad));
    (required, optional, bad).prop_map(|(required, optional, bad)| {
        let mut lines = String::new();
        for line in required
            .into_iter()
            .chain(optional.into_iter().flatten())
            .chain(bad)
        {
            lines.push_str(line);
            lines.push('\n');
        }
        lines
    })
}

/// A file: top-level keys, then one to three sessions of up to four rules.
fn config_file() -> impl Strategy<Value = String> {
    let rule = table(RULE_REQUIRED, RULE_OPTIONAL, RULE_BAD)
        .prop_map(|keys| format!("[[session.rule]]\n{keys}"));
    let session = (
        table(SESSION_REQUIRED, SESSION_OPTIONAL, SESSION_BAD),
        proptest::collection::vec(rule, 0..5),
    )
        .prop_map(|(keys, rules)| format!("[[session]]\n{keys}{}", rules.concat()));
    (
        table(&[], TOP_OPTIONAL, &["api_socket = 3"]),
        proptest::collection::vec(session, 1..4),
    )
        .prop_map(|(top, sessions)| format!("{top}{}", sessions.concat()))
}

proptest::proptest! {
    /// Any file made of these keys and values is planned or refused with its name and, where
    /// the error has one, a line: never a panic.
    #[test]
    fn any_file_is_planned_or_refused_with_a_place(text in config_file()) {
        let outcome = LoadedConfig::parse("t.toml".into(), text)
            .and_then(|loaded| plan(&loaded, &interfaces()));
        if let Err(e) = outcome {
            proptest::prop_assert!(e.to_string().starts_with("t.toml"), "{e}");
        }
    }
}
