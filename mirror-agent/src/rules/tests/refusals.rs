//! The configurations validation refuses, with the place and the message, and the warnings it
//! gives about rules that other rules hide.
use super::*;

/// The error of `text`, at parsing (a target's shape) or at validation.
fn plan_error(text: &str) -> String {
    LoadedConfig::parse("t.toml".into(), text.into())
        .and_then(|loaded| plan(&loaded, &interfaces()))
        .expect_err("invalid")
        .to_string()
}

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
            "exactly one of `interface`, `vxlan`, `geneve`, `gre`, `erspan`, `file` or `shadow`",
        ),
        (
            format!("{HEAD}interfaces = [\"eth0\"]\ntarget = {{}}\n"),
            "t.toml:4:",
            "exactly one of `interface`, `vxlan`, `geneve`, `gre`, `erspan`, `file` or `shadow`",
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

/// `observe` goes with a shadow or with no target; a session with neither a target nor
/// `observe` is refused at its name.
#[test]
fn observe_goes_with_a_shadow_or_no_target() {
    let session = |rest: &str| format!("{HEAD}interfaces = [\"eth0\"]\n{rest}");
    assert_refused(&[
        (
            session("default = \"mirror\"\n"),
            "t.toml:2:",
            "no target: a target needs exactly one of",
        ),
        (
            session("observe = \"http\"\ntarget = { interface = \"mir0\" }\n"),
            "t.toml:4:",
            "not yet beside interface mir0",
        ),
        (
            session("observe = { protocol = \"http\", routes = [\"x\"] }\n"),
            "t.toml:4:",
            "must start with /",
        ),
    ]);
    for (rest, view) in [
        ("observe = \"http\"\n", "observed only"),
        (
            "observe = \"http\"\ntarget = { shadow = { url = \"http://127.0.0.1:9\" } }\n",
            "shadow http://127.0.0.1:9",
        ),
    ] {
        let loaded = LoadedConfig::parse("t.toml".into(), session(rest)).expect("parses");
        let plan = plan(&loaded, &interfaces()).expect("valid");
        let target = &plan.sessions[0].target;
        assert_eq!(target.to_string(), view);
        assert!(target.observes().is_some(), "{rest}");
        assert!(plan.sessions[0].through_ring);
    }
}

#[test]
fn refuses_out_of_range_tunnel_ids_where_they_are_written() {
    for (target, message) in [
        (
            "erspan = { remote = \"192.0.2.9\", session_id = 1024 }",
            "`1024` is not an ERSPAN session id (0..1023)",
        ),
        (
            "gre = { remote = \"192.0.2.9\", key = -1 }",
            "`key`: invalid value: integer `-1`, expected a whole number from 0 to 4294967295",
        ),
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
        HiddenRules::SHOWN + 1,
        "{:#?}",
        plan.warnings
    );
    assert_eq!(
        plan.warnings[HiddenRules::SHOWN],
        format!(
            "{} more warning(s) about unreachable or partly hidden rules (the first {} are shown above)",
            499_500 - HiddenRules::SHOWN,
            HiddenRules::SHOWN
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
        .take_while(|n| n * (n - 1) / 2 <= HiddenRules::PAIR_BUDGET)
        .count();
    assert_eq!(
        plan.warnings,
        [format!(
            "{} rule(s) were not checked for rules that hide them (the check stops after {} comparisons)",
            count - checked,
            HiddenRules::PAIR_BUDGET
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
        &load(&session.replace("\"tcp\"", "\"tcp[13] & \"")),
        &interfaces(),
    )
    .expect_err("incomplete");
    assert!(
        error.to_string().starts_with("t.toml:5:") && error.to_string().contains("column 4:"),
        "{error}"
    );
}

/// A filter no packet can match is taken (the session copies nothing), with a warning at its
/// place.
#[test]
fn warns_about_filters_that_select_nothing() {
    let text = format!(
        "{HEAD}interfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\nfilter = \"port 1 and port 2 and port 3\"\n"
    );
    let planned = plan(&load(&text), &interfaces()).expect("valid");
    assert_eq!(
        planned.warnings,
        [
            "t.toml:5:10: filter `port 1 and port 2 and port 3` selects no packet: session `a` copies nothing"
        ]
    );
    let fine = text.replace("port 1 and port 2 and port 3", "port 1 or port 2");
    assert!(
        plan(&load(&fine), &interfaces())
            .expect("valid")
            .warnings
            .is_empty()
    );
}

/// `check` gives every error of a file in one pass, in the file's order, each at its place and
/// naming its key; types in words.
#[test]
fn every_error_of_a_file_comes_in_one_pass() {
    // Errors serde finds: one per session and one per rule, not only the first of the file.
    let parse_errors = plan_error(
        "[[session]]\nname = \"a\"\ninterfaces = [\"eth0\"]\ntarget = { interface = \"mir0\" }\n\
         snaplen = \"big\"\n[[session.rule]]\nnumber = 1\naction = \"mirror\"\ndst_port = 70000\n\
         [[session.rule]]\nnumber = -1\naction = \"mirror\"\n\
         [[session]]\ninterfaces = [\"eth0\"]\ntarget = { interface = \"mir0\" }\n",
    );
    let lines: Vec<&str> = parse_errors.lines().collect();
    assert_eq!(
        lines,
        [
            "t.toml:5:11: `snaplen`: invalid type: string \"big\", expected a whole number from 0 to 4294967295",
            "t.toml:9:12: `dst_port`: `70000` is not a port or port range (0..65535, `low-high` with low <= high)",
            "t.toml:11:10: `number`: invalid value: integer `-1`, expected a whole number from 0 to 4294967295",
            "t.toml:13:1: missing field `name`",
        ],
        "{parse_errors}"
    );
    assert_eq!(
        plan_error("[[session]]\nname = \"a\"\nname = \"b\"\n"),
        "t.toml:3:1: duplicate key `name`"
    );
    // Errors validation finds: every session and rule is checked.
    let plan_errors = plan_error(&format!(
        "{HEAD}interfaces = [\"eth9\"]\ntarget = {{ interface = \"mir0\" }}\n\
         [[session]]\nname = \"b\"\ninterfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n\
         [[session.rule]]\nnumber = 1\naction = \"mirror\"\n\
         [[session.rule]]\nnumber = 1\naction = \"skip\"\n\
         [[session]]\nname = \"b\"\ninterfaces = [\"eth0\"]\ntarget = {{ interface = \"mir0\" }}\n"
    ));
    let lines: Vec<&str> = plan_errors.lines().collect();
    assert_eq!(lines.len(), 3, "{plan_errors}");
    assert!(
        lines[0].starts_with("t.toml:3:") && lines[0].contains("`eth9`"),
        "{plan_errors}"
    );
    assert!(
        lines[1].starts_with("t.toml:12:") && lines[1].contains("used twice"),
        "{plan_errors}"
    );
    assert!(
        lines[2].starts_with("t.toml:16:") && lines[2].contains("already used"),
        "{plan_errors}"
    );
}
