//! The agent as a long-running daemon: interfaces that come and go after the start.
use std::{fmt::Write as _, time::Instant};

use mirror_tests::{
    Agent, BpfFs, Capture, Counts, Lab, NODE_SRC_MAC, SENTINEL_RULE, SRC_MAC, TrafficLoop,
    agent_binary, agent_command, attached, copied, session_config, session_hooks, tcx_programs,
    udp_v4_frame, wait_for,
};

#[test]
fn an_interface_matching_a_glob_is_followed_as_it_comes_and_goes() {
    let lab = Lab::new("follow");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let socket = socket.to_str().expect("utf-8");
    let config = format!(
        "api_socket = \"{socket}\"\n{}",
        session_config(
            "[\"src0\", \"dyn*\"]",
            "ingress",
            "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n",
        )
    );
    let agent = lab.start_agent(&config);
    let copies = Capture::open(&lab.mon, "eth0");
    let src = lab.src.name.as_str();

    for round in 0..2 {
        // A veth created after the start: dyn0 on the node, its peer dyn1 in src.
        let created = Instant::now();
        lab.node.ip(&[
            "link", "add", "dyn0", "type", "veth", "peer", "name", "dyn1", "netns", src,
        ]);
        lab.node.ip(&["link", "set", "dyn0", "up"]);
        lab.src.ip(&["link", "set", "dyn1", "up"]);
        wait_for("the mirror program on dyn0", || {
            tcx_programs(&lab.node, "dyn0")[0] == ["mirror_tc_ingre"]
        });
        println!(
            "round {round}: dyn0 watched {} ms after it was created",
            created.elapsed().as_millis()
        );
        assert!(
            attached(&lab.node, socket).contains(&("dyn0".to_owned(), "ingress".to_owned())),
            "status lists dyn0"
        );
        assert_eq!(
            session_hooks(&lab.node, socket, 0),
            ["dyn0/ingress", "src0/ingress"],
            "and as the session's"
        );

        let sender = mirror_tests::FrameSender::open(&lab.src, "dyn1");
        let frame = udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 5555, &[round; 40]);
        let unmatched = udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 5556, &[round; 40]);
        sender.send(&unmatched);
        sender.send(&frame);
        sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
        let got = copies.bytes_until_sentinel();
        assert_eq!(got, [frame], "round {round}: one copy, byte for byte");

        // src0 keeps being mirrored while dyn0 comes and goes.
        lab.send_sentinel();
        assert!(copies.bytes_until_sentinel().is_empty());

        lab.node.ip(&["link", "del", "dyn0"]);
        wait_for("dyn0 forgotten", || {
            !attached(&lab.node, socket).iter().any(|(i, _)| i == "dyn0")
        });
        assert_eq!(
            attached(&lab.node, socket),
            [("src0".to_owned(), "ingress".to_owned())]
        );
    }
    let report = agent.stop();
    assert_eq!(report.rule("t", "10"), copied(2, 2));
    assert_eq!(report.rule("t", "1"), copied(4, 4));
}

/// A frame of the traffic loops: UDP to `port`, its sequence number in the payload.
fn numbered(port: u16, seq: u32) -> Vec<u8> {
    let mut payload = seq.to_be_bytes().to_vec();
    payload.resize(32, 0xab);
    udp_v4_frame(SRC_MAC, NODE_SRC_MAC, port, &payload)
}

/// The destination port and sequence number of a frame of [`numbered`].
fn port_and_seq(frame: &[u8]) -> (u16, u32) {
    let port = u16::from_be_bytes([frame[36], frame[37]]);
    let seq = u32::from_be_bytes([frame[42], frame[43], frame[44], frame[45]]);
    (port, seq)
}

/// [`numbered`] frames to `port` from src, until stopped.
fn numbered_traffic(lab: &Lab, port: u16) -> TrafficLoop {
    TrafficLoop::start(
        mirror_tests::FrameSender::open(&lab.src, "eth0"),
        40_000,
        move |seq| numbered(port, seq),
    )
}

/// The sequence numbers of the [`numbered`] frames to port 5001 a capture received (the sink's
/// own ICMP answers are outgoing).
fn received_seqs(frames: Vec<mirror_tests::Frame>) -> Vec<u32> {
    frames
        .into_iter()
        .filter(|f| !f.outgoing)
        .map(|f| port_and_seq(&f.bytes))
        .filter(|(port, _)| *port == 5001)
        .map(|(_, seq)| seq)
        .collect()
}

/// Two sessions: `t` (src0 ingress to mir0) mirrors UDP to `mirrored` and skips the rest; `u`
/// (sink0 egress to mir1, cut to 1000 bytes) mirrors UDP 5003 and never changes.
fn reload_config(socket: &str, mirrored: u16) -> String {
    format!(
        "api_socket = \"{socket}\"\n{}\n[[session]]\nname = \"u\"\ninterfaces = [\"sink0\"]\ndirection = \"egress\"\ntarget = {{ interface = \"mir1\" }}\nsnaplen = 1000\n{SENTINEL_RULE}[[session.rule]]\nnumber = 2\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5003\n",
        session_config(
            "[\"src0\"]",
            "ingress",
            &format!(
                "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = {mirrored}\n"
            ),
        )
    )
}

/// `status --json`'s configuration generation.
fn generation(lab: &Lab, socket: &str) -> u64 {
    let (code, stdout, stderr) =
        agent_command(&lab.node, &["status", "--json", "--api-socket", socket]);
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("status JSON");
    status["generation"].as_u64().expect("generation")
}

/// Replaces the file `link` points at the way a Kubernetes `ConfigMap` update does: a new file,
/// and the symlink swapped to it in one rename.
fn swap_config(dir: &std::path::Path, link: &std::path::Path, name: &str, text: &str) {
    let target = dir.join(name);
    std::fs::write(&target, text).expect("write config");
    let staged = dir.join("staged.toml");
    std::os::unix::fs::symlink(&target, &staged).expect("symlink");
    std::fs::rename(&staged, link).expect("swap symlink");
}

#[test]
fn a_reload_under_traffic_switches_each_packet_from_the_old_rules_to_the_new() {
    let lab = Lab::new("reload");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let socket = socket.to_str().expect("utf-8");
    let config = dir.path().join("config.toml");
    swap_config(dir.path(), &config, "a.toml", &reload_config(socket, 5001));
    let agent = Agent::start_file(&lab.node, &agent_binary(), &config, &[]);
    assert_eq!(generation(&lab, socket), 1);
    let copies = Capture::open(&lab.mon, "eth0");
    let unchanged = Capture::open(&lab.mon, "eth1");
    let sender = mirror_tests::FrameSender::open(&lab.src, "eth0");

    // Session u sees 5 packets under the first configuration.
    let u_sender = mirror_tests::FrameSender::open(&lab.src, "eth0");
    for seq in 0..5 {
        u_sender.send(&numbered(5003, seq));
    }

    // A stats stream open across the reload.
    let stream = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.node.name])
        .arg(agent_binary())
        .args([
            "stats",
            "--watch",
            "--json",
            "--interval",
            "0.1",
            "--api-socket",
            socket,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("stream client");

    // Alternating 5001 and 5002 while the file is swapped: the agent notices the change by itself.
    let traffic = TrafficLoop::start(sender, 40_000, |seq| {
        numbered(if seq % 2 == 0 { 5001 } else { 5002 }, seq)
    });
    let mut frames = Vec::new();
    wait_for("copies under the first configuration", || {
        frames.extend(copies.drain().into_iter().map(|f| f.bytes));
        frames.len() > 200
    });
    swap_config(dir.path(), &config, "b.toml", &reload_config(socket, 5002));
    wait_for("the agent to apply the new file", || {
        generation(&lab, socket) == 2
    });
    let generation_two = generation(&lab, socket);
    // Some traffic under the new configuration too: wait until copies of 5002 are flowing.
    wait_for("copies under the new configuration", || {
        frames.extend(copies.drain().into_iter().map(|f| f.bytes));
        frames.iter().any(|f| port_and_seq(f).0 == 5002)
    });
    let sent = traffic.finish();
    lab.send_sentinel();
    frames.extend(copies.bytes_until_sentinel());

    let copied_by_new = assert_one_switch(&frames, sent);

    // An invalid file is rejected with its reason; the running rules stay.
    std::fs::write(
        dir.path().join("b.toml"),
        reload_config(socket, 5002) + "colour = \"blue\"\n",
    )
    .expect("write config");
    let (code, _, stderr) = agent_command(&lab.node, &["reload", "--api-socket", socket]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("b.toml") || stderr.contains("config.toml"),
        "{stderr}"
    );
    assert!(stderr.contains("unknown field `colour`"), "{stderr}");
    assert_eq!(generation(&lab, socket), generation_two);
    // And the metrics say so: the last reload failed, the generation is the one before.
    let metrics = mirror_tests::api_get(socket, "/metrics");
    for line in [
        "mirror_config_last_reload_success 0".to_owned(),
        format!("mirror_config_generation {generation_two}"),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    let u_sender = mirror_tests::FrameSender::open(&lab.src, "eth0");
    u_sender.send(&numbered(5001, 1_000_000));
    u_sender.send(&numbered(5002, 1_000_001));
    for seq in 5..10 {
        u_sender.send(&numbered(5003, seq));
    }
    lab.send_sentinel();
    assert_eq!(
        copies.bytes_until_sentinel(),
        [numbered(5002, 1_000_001)],
        "the rules of the running configuration"
    );
    // Session u did not change: its counters went on across the reload.
    lab.send_sentinel();
    let u_copies: Vec<u32> = unchanged
        .until_nth(3, mirror_tests::is_sentinel)
        .iter()
        .filter(|f| !mirror_tests::is_sentinel(&f.bytes))
        .map(|f| port_and_seq(&f.bytes).1)
        .collect();
    assert_eq!(u_copies, (0..10).collect::<Vec<_>>());
    let report = agent.stop();
    assert_eq!(report.rule("u", "2"), copied(10, 10));
    assert_stream_across_reload(stream);
    assert_eq!(
        report.rule("t", "10").mirrored,
        copied_by_new + 1,
        "counters start again for a changed session"
    );
}

/// Checks that the copies of the alternating 5001/5002 traffic of `sent` packets split at one
/// packet: before it, the packets were judged by the old rules (5001 copied), from it on by the
/// new ones (5002 copied); nothing lost or copied twice across the switch, every copy byte for
/// byte. Returns how many copies the new rules made.
fn assert_one_switch(frames: &[Vec<u8>], sent: u32) -> u64 {
    // Every packet was judged wholly by one configuration, in send order: before some cut, the
    // even (5001) packets were copied and no odd one; from the cut on, the odd (5002) ones and
    // no even one. Nothing was lost and nothing copied twice across the switch.
    let seqs: Vec<(u16, u32)> = frames.iter().map(|f| port_and_seq(f)).collect();
    let judged = |switch: u32| -> Vec<(u16, u32)> {
        (0..sent)
            .filter(|seq| (seq % 2 == 0) == (*seq < switch))
            .map(|seq| (if seq % 2 == 0 { 5001 } else { 5002 }, seq))
            .collect()
    };
    // The first packet judged by the new rules lies after the last 5001 copy, at or before the
    // first 5002 copy.
    let last_old = seqs
        .iter()
        .rev()
        .find(|(port, _)| *port == 5001)
        .expect("copies of 5001")
        .1;
    let first_new = seqs
        .iter()
        .find(|(port, _)| *port == 5002)
        .expect("copies of 5002")
        .1;
    println!("{sent} packets sent, switched after packet {last_old}");
    assert!(
        last_old > 100 && first_new + 100 < sent,
        "the switch happened under traffic"
    );
    assert!(
        (last_old + 1..=first_new).any(|switch| seqs == judged(switch)),
        "{} copies of {sent} packets do not split into old and new rules at one packet: {:?}",
        seqs.len(),
        seqs.iter()
            .filter(|(_, seq)| seq.abs_diff(first_new) < 10)
            .collect::<Vec<_>>()
    );
    for frame in frames {
        let (port, seq) = port_and_seq(frame);
        assert_eq!(*frame, numbered(port, seq), "byte for byte");
    }

    seqs.iter().filter(|(port, _)| *port == 5002).count() as u64
}

/// Reads a `stats --watch --json` stream to its end (the agent stopped).
fn assert_stream_across_reload(stream: std::process::Child) {
    // The stream ended with the agent: every line parses, the generation goes from 1 to 2, and
    // the unchanged session's counters never go back.
    let output = stream.wait_with_output().expect("stream client");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("an NDJSON line"))
        .collect();
    let readings: Vec<(u64, u64)> = lines
        .iter()
        .map(|l| {
            let u = &l["stats"]["sessions"][1];
            assert_eq!(u["name"], "u");
            (
                l["stats"]["generation"].as_u64().expect("generation"),
                u["counters"]["matched"].as_u64().expect("matched"),
            )
        })
        .collect();
    assert!(readings.windows(2).all(|w| w[0] <= w[1]), "{readings:?}");
    assert_eq!(readings.first().map(|r| r.0), Some(1), "{readings:?}");
    assert_eq!(readings.last().map(|r| r.0), Some(2), "{readings:?}");
}

/// A pinned-mode configuration in a bpffs of its own: a session on `interfaces` (ingress) to mir0
/// with a snaplen (so copies go through the copy program), mirroring the sentinel and UDP to
/// `port`.
struct Pinned {
    pins: std::path::PathBuf,
    socket: String,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
    _bpffs: BpfFs,
}

impl Pinned {
    fn new(interfaces: &str, port: u16) -> Self {
        let bpffs = BpfFs::mount();
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir
            .path()
            .join("agent.sock")
            .to_str()
            .expect("utf-8")
            .to_owned();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "api_socket = \"{socket}\"\n{}snaplen = 1000\n{SENTINEL_RULE}[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = {port}\n",
                session_config(interfaces, "ingress", "").replace(SENTINEL_RULE, ""),
            ),
        )
        .expect("write config");
        Pinned {
            pins: bpffs.path().join("mirror"),
            socket,
            config,
            _dir: dir,
            _bpffs: bpffs,
        }
    }

    fn start(&self, lab: &Lab) -> Agent {
        Agent::start_file(
            &lab.node,
            &agent_binary(),
            &self.config,
            &["--pin-dir", self.pins.to_str().expect("utf-8")],
        )
    }
}

#[test]
fn in_pinned_mode_mirroring_survives_kill_9_and_a_new_agent_takes_over_without_a_gap() {
    let lab = Lab::new("pinned");
    // A snaplen sends every copy through the copy program at mir0, whose old and new versions
    // hand over too.
    let pinned = Pinned::new("[\"src0\"]", 5001);
    let socket = pinned.socket.as_str();
    let pins = &pinned.pins;
    let start = || pinned.start(&lab);
    let first = start();
    let copies = Capture::open(&lab.mon, "eth0");
    let delivered = Capture::open(&lab.sink, "eth0");
    let traffic = numbered_traffic(&lab, 5001);
    let mut frames = Vec::new();
    let copies_past = |n: usize, frames: &mut Vec<Vec<u8>>| {
        let target = frames.len() + n;
        wait_for(&format!("{target} copies"), || {
            frames.extend(copies.drain().into_iter().map(|f| f.bytes));
            frames.len() >= target
        });
    };
    copies_past(200, &mut frames);
    first.kill();
    // Nobody runs the agent now: the pinned programs go on.
    copies_past(200, &mut frames);
    let second = start();
    assert_eq!(generation(&lab, socket), 2, "the second agent took over");
    copies_past(200, &mut frames);
    let sent = traffic.finish();
    lab.send_sentinel();
    frames.extend(copies.bytes_until_sentinel());
    println!("{sent} packets sent, {} copies", frames.len());
    assert_eq!(
        frames,
        (0..sent).map(|seq| numbered(5001, seq)).collect::<Vec<_>>(),
        "every packet copied once, in order, byte for byte"
    );
    let reached_sink = received_seqs(delivered.until_sentinel());
    assert_eq!(
        reached_sink,
        (0..sent).collect::<Vec<_>>(),
        "the primary path"
    );

    // A stop in pinned mode leaves everything running; removing the pins detaches it.
    let report = second.stop();
    assert_eq!(
        report.rule("t", "10").mirrored,
        report.rule("t", "10").matched
    );
    assert_eq!(tcx_programs(&lab.node, "src0")[0], ["mirror_tc_ingre"]);
    assert_eq!(tcx_programs(&lab.node, "mir0")[1], ["mirror_tc_copy"]);
    std::fs::remove_dir_all(pins).expect("remove the pins");
    wait_for("the programs to be detached", || {
        tcx_programs(&lab.node, "src0") == [Vec::<String>::new(), Vec::new()]
            && tcx_programs(&lab.node, "mir0") == [Vec::<String>::new(), Vec::new()]
    });
}

#[test]
fn kill_9_in_the_default_mode_detaches_everything_and_never_disturbs_the_primary_path() {
    let lab = Lab::new("kill9");
    let agent = lab.start_agent(&session_config(
        "[\"src0\"]",
        "ingress",
        "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5001\n",
    ));
    let copies = Capture::open(&lab.mon, "eth0");
    let delivered = Capture::open(&lab.sink, "eth0");
    let traffic = numbered_traffic(&lab, 5001);
    let mut frames = Vec::new();
    wait_for("copies before the kill", || {
        frames.extend(copies.drain().into_iter().map(|f| f.bytes));
        frames.len() > 200
    });
    agent.kill();
    // The kernel closed the agent's links: nothing stays attached.
    wait_for("the programs to be detached", || {
        tcx_programs(&lab.node, "src0") == [Vec::<String>::new(), Vec::new()]
    });
    let last_copied = frames.iter().map(|f| port_and_seq(f).1).max().unwrap_or(0);
    let mut reached = Vec::new();
    wait_for("traffic well after the kill", || {
        reached.extend(received_seqs(delivered.drain()));
        reached.last().is_some_and(|seq| *seq > last_copied + 200)
    });
    let sent = traffic.finish();
    lab.send_sentinel();
    // Every packet reached the sink, in order, before, during and after the kill.
    reached.extend(received_seqs(delivered.until_sentinel()));
    // Nothing copies the sentinel any more; the copies made before the kill are all in by now.
    let copies_made = frames.len() + copies.drain().len();
    println!("{sent} packets sent, {copies_made} copied before the kill");
    assert!(
        copies_made < sent as usize,
        "mirroring stopped with the agent"
    );
    assert_eq!(reached, (0..sent).collect::<Vec<_>>(), "the primary path");
}

/// Creates the target `mir0` again (its peer `eth0` in the mirror namespace), as the lab made it.
fn recreate_mir0(lab: &Lab) {
    lab.node.ip(&[
        "link",
        "add",
        "mir0",
        "address",
        "02:00:00:00:03:01",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "address",
        "02:00:00:00:03:02",
        "netns",
        &lab.mon.name,
    ]);
    lab.node.sysctl("net.ipv6.conf.mir0.disable_ipv6", "1");
    lab.node.ip(&["link", "set", "mir0", "up"]);
    lab.mon.ip(&["link", "set", "eth0", "up"]);
    for (ns, dev) in [(&lab.node, "mir0"), (&lab.mon, "eth0")] {
        wait_for(&format!("{dev} up"), || {
            ns.ip(&["-j", "link", "show", "dev", dev])
                .contains("\"operstate\":\"UP\"")
        });
    }
}

/// A target interface deleted and created again (a new index) gets its session's copies again,
/// through the copy program attached anew; while it is gone, copies are counted as `no_route`
/// and `/readyz` says why the agent is not ready.
#[test]
fn a_target_deleted_and_created_again_gets_copies_again() {
    let lab = Lab::new("retarget");
    let metrics: std::net::SocketAddr = "127.0.0.1:9477".parse().expect("address");
    let agent = lab.start_agent(&format!(
        "metrics_address = \"{metrics}\"\n{}snaplen = 1000\n[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n",
        session_config("[\"src0\"]", "ingress", "").replace(SENTINEL_RULE, ""),
    ).replace("[[session.rule]]\nnumber = 10", &format!("{SENTINEL_RULE}[[session.rule]]\nnumber = 10")));
    let sender = mirror_tests::FrameSender::open(&lab.src, "eth0");
    let frame = |i: u8| udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 5555, &[i; 40]);
    let ready = || mirror_tests::http_get(&lab.node, metrics, "/readyz");

    lab.node.ip(&["link", "del", "mir0"]);
    wait_for("/readyz to say the target is gone", || {
        let (line, body) = ready();
        line.contains(" 503 ") && body == "session `t`: target interface mir0 is gone\n"
    });
    for i in 0..3 {
        sender.send(&frame(i));
    }
    recreate_mir0(&lab);
    wait_for("/readyz to be ok again", || ready().0.contains(" 200 "));
    assert_eq!(tcx_programs(&lab.node, "mir0")[1], ["mirror_tc_copy"]);
    let copies = Capture::open(&lab.mon, "eth0");
    let sent: Vec<_> = (3..5).map(frame).collect();
    for f in &sent {
        sender.send(f);
    }
    sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
    assert_eq!(
        copies.bytes_until_sentinel(),
        sent,
        "copies again, byte for byte"
    );
    let report = agent.stop();
    assert_eq!(
        report.rule("t", "10"),
        Counts {
            no_route: 3,
            ..copied(5, 2)
        }
    );
}

/// When the kernel drops link events (the agent's event socket overran while it was stopped),
/// the agent looks at every interface again: an interface that matches a glob is watched, and a
/// target created again is found, though their events were lost.
#[test]
fn lost_link_events_are_answered_with_a_full_look() {
    let lab = Lab::new("overrun");
    let agent = lab.start_agent(&session_config(
        "[\"src0\", \"dyn*\"]",
        "ingress",
        "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n",
    ));
    // The follower runs: it has seen an interface come.
    lab.node.ip(&[
        "link",
        "add",
        "dyn9",
        "type",
        "veth",
        "peer",
        "name",
        "dyn8",
        "netns",
        &lab.src.name,
    ]);
    wait_for("the mirror program on dyn9", || {
        tcx_programs(&lab.node, "dyn9")[0] == ["mirror_tc_ingre"]
    });
    let pid = i32::try_from(agent.pid()).expect("pid");
    // SAFETY: signals to our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // Far more events than the socket holds, then the ones that matter.
    let batch = tempfile::NamedTempFile::new().expect("temp file");
    let mut lines = String::new();
    for i in 0..600 {
        writeln!(lines, "link add flood{i} type veth peer name floodp{i}").expect("to a String");
    }
    std::fs::write(batch.path(), lines).expect("write the batch");
    lab.node
        .ip(&["-batch", batch.path().to_str().expect("utf-8")]);
    lab.node.ip(&["link", "del", "mir0"]);
    recreate_mir0(&lab);
    lab.add_source_veth("dyn0", "dyn1", None);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    wait_for("the mirror program on dyn0", || {
        tcx_programs(&lab.node, "dyn0")[0] == ["mirror_tc_ingre"]
    });
    let copies = Capture::open(&lab.mon, "eth0");
    let sender = mirror_tests::FrameSender::open(&lab.src, "dyn1");
    let frame = udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 5555, &[7; 40]);
    // The new target may be found a moment after dyn0: the copy comes once it is.
    wait_for("a copy through the new mir0", || {
        sender.send(&frame);
        sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
        copies.bytes_until_sentinel().contains(&frame)
    });
    drop(agent);
}

/// What an agent in pinned mode may leave half done is repaired by the next one: an agent that
/// died between pinning its copy links and recording its generation (the mark still names the
/// one before), and a watched interface deleted and created again while no agent ran (its pin
/// holds a link the kernel detached). The next agent starts, goes on from the highest
/// generation, watches the new interface and finishes copies with one copy program.
#[test]
fn a_pinned_takeover_repairs_what_an_agent_left_half_done() {
    let lab = Lab::new("pinfix");
    let pinned = Pinned::new("[\"src0\", \"dyn*\"]", 5555);
    let socket = pinned.socket.as_str();
    let pins = &pinned.pins;
    let start = || pinned.start(&lab);
    lab.add_source_veth("dyn0", "dyn1", None);
    start().stop();
    start().stop();
    // The second agent's copy link is pinned as copy2-mir0; make its mark say 1 again, as if it
    // had died before writing it.
    std::fs::remove_dir(pins.join("generation-2")).expect("the second agent's mark");
    std::fs::create_dir(pins.join("generation-1")).expect("an older mark");
    assert!(pins.join("copy2-mir0").exists());
    lab.node.ip(&["link", "del", "dyn0"]);
    lab.add_source_veth("dyn0", "dyn1", None);

    let third = start();
    assert_eq!(
        generation(&lab, socket),
        3,
        "on from the highest generation"
    );
    assert_eq!(tcx_programs(&lab.node, "dyn0")[0], ["mirror_tc_ingre"]);
    assert_eq!(tcx_programs(&lab.node, "mir0")[1], ["mirror_tc_copy"]);
    let copies = Capture::open(&lab.mon, "eth0");
    let sender = mirror_tests::FrameSender::open(&lab.src, "dyn1");
    let frame = udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 5555, &[3; 40]);
    sender.send(&frame);
    sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
    assert_eq!(copies.bytes_until_sentinel(), [frame]);
    third.stop();
    std::fs::remove_dir_all(pins).expect("remove the pins");
}

/// An interface whose name is not UTF-8 (the kernel allows any bytes but `/`, `:` and blanks)
/// neither stops the start nor is watched, though a lossy reading of its name would match the
/// session's glob; the interfaces the glob does match are watched.
#[test]
fn an_interface_named_in_bytes_that_are_not_utf8_is_passed_over() {
    use std::os::unix::ffi::OsStrExt as _;
    let lab = Lab::new("badname");
    let name = std::ffi::OsStr::from_bytes(b"dyn\xff");
    let status = std::process::Command::new("ip")
        .args(["-n", &lab.node.name, "link", "add"])
        .arg(name)
        .args(["type", "veth", "peer", "name", "dynp"])
        .status()
        .expect("ip");
    assert!(status.success());
    lab.add_source_veth("dyn0", "dyn1", None);
    let agent = lab.start_agent(&session_config("[\"src0\", \"dyn*\"]", "ingress", ""));
    assert_eq!(tcx_programs(&lab.node, "dyn0")[0], ["mirror_tc_ingre"]);
    agent.stop();
}

/// A reload of a file whose text did not change applies nothing (the generation stays, and the
/// CLI says so); a changed one is applied. Reloads go through while SIGHUPs keep arriving: a
/// signal that interrupts the verifier (`EAGAIN`) makes the agent load again, not reject a
/// valid file.
#[test]
fn reloads_skip_an_unchanged_file_and_survive_a_storm_of_sighups() {
    let lab = Lab::new("sighups");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let socket = socket.to_str().expect("utf-8");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, reload_config(socket, 5001)).expect("config");
    let agent = Agent::start_file(&lab.node, &agent_binary(), &config, &[]);
    let reload = || agent_command(&lab.node, &["reload", "--api-socket", socket]);
    let (code, stdout, stderr) = reload();
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("unchanged"), "{stdout}");
    assert_eq!(generation(&lab, socket), 1);

    let pid = agent.pid().cast_signed();
    let storm = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sighups = std::thread::spawn({
        let storm = storm.clone();
        move || {
            let mut sent = 0u32;
            // Bounded: a minute of signals at the most.
            while storm.load(std::sync::atomic::Ordering::Relaxed) && sent < 12_000 {
                // SAFETY: a signal to our own child.
                unsafe { libc::kill(pid, libc::SIGHUP) };
                sent += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            sent
        }
    });
    for round in 0..5u16 {
        std::fs::write(&config, reload_config(socket, 5010 + round)).expect("config");
        let (code, stdout, stderr) = reload();
        assert!(
            code == 0 && (stdout.starts_with("reloaded") || stdout.starts_with("unchanged")),
            "round {round}: {stdout}{stderr}"
        );
    }
    storm.store(false, std::sync::atomic::Ordering::Relaxed);
    let sent = sighups.join().expect("the signal thread");
    println!("{sent} SIGHUPs during the reloads");
    // Every file was applied (by the API or by a SIGHUP before it), none rejected.
    let metrics = mirror_tests::api_get(socket, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l == "mirror_config_last_reload_success 1"),
        "{metrics}"
    );
    assert!(generation(&lab, socket) >= 6);
    drop(agent.stop());
}

/// An agent that is not pinned, or pinned elsewhere, refuses to start where a pinned agent's
/// links still copy the hooks it would watch (every packet would be copied twice), and says
/// how to take them over; with that pin directory it does.
#[test]
fn an_agent_refuses_hooks_that_another_agents_pins_still_copy() {
    let lab = Lab::new("orphans");
    let pinned = Pinned::new("[\"src0\"]", 5001);
    let pins = pinned.pins.to_str().expect("utf-8");
    drop(pinned.start(&lab).stop());
    assert_eq!(tcx_programs(&lab.node, "src0")[0], ["mirror_tc_ingre"]);
    let config = pinned.config.to_str().expect("utf-8");
    let elsewhere = tempfile::tempdir().expect("temp dir");
    let elsewhere = elsewhere.path().join("pins");
    for extra in [&[][..], &["--pin-dir", elsewhere.to_str().expect("utf-8")]] {
        let (code, _, stderr) = agent_command(
            &lab.node,
            &[&["run", "--config", config][..], extra].concat(),
        );
        assert_eq!(code, 1, "{extra:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "{pins} holds the pinned links of another mirror agent"
            )) && stderr.contains("ingress-src0")
                && stderr.contains(&format!("--pin-dir {pins}")),
            "{extra:?}: {stderr}"
        );
        // Nothing attached beside the pinned program.
        assert_eq!(tcx_programs(&lab.node, "src0")[0], ["mirror_tc_ingre"]);
    }
    let report = pinned.start(&lab).stop();
    assert_eq!(report.json()["stats"]["generation"], 2, "taken over");
    std::fs::remove_dir_all(&pinned.pins).expect("remove the pins");
    wait_for("the programs to be detached", || {
        tcx_programs(&lab.node, "src0") == [Vec::<String>::new(), Vec::new()]
    });
}
