//! The ring-buffer path: sessions at the XDP hook (copies queued in the ring buffer, sent on by the
//! agent to an interface, a VXLAN collector or a pcap file) and pcap file targets of TC sessions.
use std::net::SocketAddr;

use mirror_tests::{
    COL_V4, Capture, Counts, FrameSender, Lab, NODE_SINK_MAC, NODE_SRC_MAC, SENTINEL_RULE,
    SINK_MAC, SINK_V4, SRC_MAC, SRC_V4, agent_command, assert_same_frames, capture_file_frames,
    cases, copied, is_mld_report, is_sentinel, pin_to_first_cpu, tshark_fields, udp_socket,
    udp_v4_frame, vxlan_of,
};

/// One session `t` at the XDP hook of `interfaces`, to `target`, with the sentinel rule and
/// `rules`.
fn xdp_session(interfaces: &str, target: &str, rules: &str) -> String {
    format!(
        "[[session]]\nname = \"t\"\ninterfaces = {interfaces}\nhook = \"xdp\"\ntarget = {target}\n{SENTINEL_RULE}{rules}"
    )
}

#[test]
fn the_frame_table_through_xdp_is_copied_by_the_agent_and_passed_unchanged() {
    let lab = Lab::new("xdp-table");
    let agent = lab.start_agent(&xdp_session(
        "[\"sink0\"]",
        "{ interface = \"mir0\" }",
        cases::MALFORMED_RULES,
    ));
    let copies = Capture::open(&lab.mon, "eth0");
    // What XDP passed on: the node's own capture of sink0 sees frames after the XDP program.
    let passed = Capture::open(&lab.node, "sink0");
    let sender = FrameSender::open(&lab.sink, "eth0");
    let cases = cases::malformed();
    for case in &cases {
        sender.send(&case.frame);
    }
    sender.send_sentinel(SINK_MAC, NODE_SINK_MAC);
    let passed = passed.received_until_sentinel();
    let copies = copies.bytes_until_sentinel();
    for (i, case) in cases.iter().enumerate() {
        assert_eq!(
            passed.get(i),
            Some(&case.frame),
            "{}: the original continues unchanged",
            case.name
        );
    }
    assert_eq!(passed.len(), cases.len());
    let expected = cases
        .iter()
        .filter(|c| c.copied_failing_open())
        .map(|c| c.frame.clone())
        .collect();
    assert_same_frames("the table at XDP", copies, expected);
    let report = agent.stop();
    let malformed = cases.iter().filter(|c| c.malformed).count() as u64;
    assert_eq!(report.hook("xdp", "malformed"), malformed);
    assert_eq!(report.hook("xdp", "table_errors"), 0);
    let expected_copies = cases.iter().filter(|c| c.copied_failing_open()).count() as u64;
    // The sentinel's rule comes first: every unparsed frame might be UDP to port 9.
    assert_eq!(
        report.rule("t", "1"),
        Counts {
            unparsed: malformed,
            ..copied(1 + malformed, 1 + malformed)
        },
        "the sentinel and the unparsed frames"
    );
    assert_eq!(
        report.session("t").mirrored,
        expected_copies + 1,
        "every copy through the ring"
    );
    assert_eq!(report.session("t").ring_full, 0);
    assert_eq!(
        report.ring("t", "sent"),
        expected_copies + 1,
        "{}",
        report.0
    );
    assert_eq!(report.ring("t", "failed"), 0);
}

#[test]
fn xdp_copies_reach_a_vxlan_collector_as_the_tc_path_sends_them() {
    let lab = Lab::with_collector("xdp-vxlan", 1600);
    let collector = lab.start_collector("0.0.0.0:4789", "copies.pcap");
    let wire = Capture::open(lab.col(), "eth0");
    let agent = lab.start_agent(&xdp_session(
        "[\"src0\"]",
        &format!("{{ vxlan = {{ remote = \"{COL_V4}\", vni = 77 }} }}"),
        "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n",
    ));
    let sent = Capture::open(&lab.src, "eth0");
    let _receiver = udp_socket(&lab.sink, SocketAddr::new(SINK_V4.into(), 5555));
    pin_to_first_cpu();
    // Three flows (source ports), three datagrams each, of growing size.
    for port in 0..3u16 {
        let socket = udp_socket(&lab.src, SocketAddr::new(SRC_V4.into(), 41_000 + port));
        for size in [20usize, 500, 1400] {
            socket
                .send_to(&vec![port as u8; size], (SINK_V4, 5555))
                .expect("send");
        }
    }
    lab.send_sentinel();
    // The kernel's own MLD reports on the underlay are not copies.
    let wire: Vec<_> = wire
        .until_nth(1, |f| vxlan_of(f).is_some_and(|v| is_sentinel(&v.inner)))
        .into_iter()
        .filter(|f| !is_mld_report(&f.bytes))
        .collect();
    let summary = collector.stop();
    let report = agent.stop();

    let tunnelled: Vec<_> = wire.iter().filter_map(|f| vxlan_of(&f.bytes)).collect();
    let expected: Vec<Vec<u8>> = sent
        .drain()
        .into_iter()
        .filter(|f| f.outgoing)
        .map(|f| f.bytes)
        .collect();
    assert_eq!(expected.len(), 10, "nine datagrams and the sentinel");
    let inner: Vec<Vec<u8>> = tunnelled.iter().map(|v| v.inner.clone()).collect();
    assert_eq!(inner, expected, "inner frames, byte for byte, in order");
    assert!(
        tunnelled
            .iter()
            .all(|v| v.vni == 77 && v.dont_fragment && !v.fragment)
    );
    // One outer source port per inner flow, different across these flows.
    let ports: Vec<u16> = tunnelled.iter().map(|v| v.outer_src_port).collect();
    for flow in ports[..9].chunks(3) {
        assert!(flow.iter().all(|p| *p == flow[0]), "{ports:?}");
    }
    assert!(
        ports[0] != ports[3] || ports[3] != ports[6],
        "flows spread: {ports:?}"
    );
    let written: Vec<Vec<u8>> = summary.written().into_iter().map(|(_, f)| f).collect();
    assert_eq!(written, inner, "our collector");
    assert_eq!(summary.vni_frames(77), 10, "{}", summary.text);

    // tshark decodes the wire the same way.
    let dir = tempfile::tempdir().expect("temp dir");
    let wire_file = dir.path().join("wire.pcap");
    mirror_tests::write_pcap(
        &wire_file,
        &wire.iter().map(|f| f.bytes.clone()).collect::<Vec<_>>(),
    );
    let vnis = tshark_fields(&wire_file, None, &["vxlan.vni"]);
    assert_eq!(vnis, vec!["77"; 10]);
    assert_eq!(report.session("t").mirrored, 10);
}

#[test]
fn a_pcap_target_is_a_filtered_always_on_capture_for_tc_and_xdp() {
    let lab = Lab::new("pcap");
    let dir = tempfile::tempdir().expect("temp dir");
    for (hook, file) in [("tc", "tc.pcapng"), ("xdp", "xdp.pcap")] {
        let path = dir.path().join(file);
        let path_arg = format!("file:{}", path.display());
        let api = dir.path().join(format!("{hook}.sock"));
        // The quick form: `run --iface … --to file:… --proto udp`.
        let mut agent = std::process::Command::new("ip")
            .args(["netns", "exec", &lab.node.name])
            .arg(mirror_tests::agent_binary())
            .args([
                "run",
                "--iface",
                "src0",
                "--hook",
                hook,
                "--direction",
                "ingress",
                "--to",
                &path_arg,
                "--proto",
                "udp",
                "--stats-interval",
                "0",
                "--api-socket",
            ])
            .arg(&api)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("agent");
        let mut stdout = std::io::BufReader::new(agent.stdout.take().expect("stdout"));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut line).expect("agent output");
        assert!(line.contains("attached to"), "{hook}: {line}");
        let sender = FrameSender::open(&lab.src, "eth0");
        let frames: Vec<Vec<u8>> = (0..20u8)
            .map(|i| udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 6000 + u16::from(i), &[i; 50]))
            .collect();
        for frame in &frames {
            sender.send(frame);
        }
        // Not UDP (the protocol byte says TCP): not written.
        let mut tcp = udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 6000, b"x");
        tcp[14 + 9] = 6;
        sender.send(&tcp);
        let (code, _, stderr) = agent_command(
            &lab.node,
            &[
                "stats",
                "--json",
                "--api-socket",
                api.to_str().expect("utf-8"),
            ],
        );
        assert_eq!(code, 0, "{stderr}");
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(agent.id().cast_signed(), libc::SIGTERM) };
        let mut report = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut report).expect("report");
        assert!(agent.wait().expect("agent").success(), "{report}");
        // The agent sends what the ring holds before it exits: every frame is in the file.
        let written: Vec<Vec<u8>> = capture_file_frames(&path)
            .into_iter()
            .map(|(_, f)| f)
            .collect();
        assert_eq!(written, frames, "{hook}: the file, byte for byte");
        let ports = tshark_fields(&path, None, &["udp.dstport"]);
        assert_eq!(ports.len(), 20, "{hook}: tshark reads the file");
        assert_eq!(ports[19], "6019");
    }
}

/// The ring takes records in a few sizes (the copy goes into the smallest that holds it): frames
/// on both sides of each size, up to a jumbo frame, reach the file whole and in order.
#[test]
fn ring_records_of_every_size_hold_their_frames_whole() {
    let lab = Lab::new("ringsizes");
    lab.src.ip(&["link", "set", "eth0", "mtu", "9100"]);
    lab.node.ip(&["link", "set", "src0", "mtu", "9100"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("sizes.pcap");
    let agent = lab.start_agent(&format!(
        "[[session]]\nname = \"t\"\ninterfaces = [\"src0\"]\nhook = \"xdp\"\ntarget = {{ file = \"{}\" }}\n[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\n",
        path.display()
    ));
    let sender = FrameSender::open(&lab.src, "eth0");
    // Frame lengths: 42 bytes of headers and the payload.
    let frames: Vec<Vec<u8>> = [60, 64, 65, 256, 257, 1514, 1536, 1537, 9000]
        .iter()
        .zip(0u8..)
        .map(|(len, i)| udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 6000, &vec![i; len - 42]))
        .collect();
    for frame in &frames {
        sender.send(frame);
    }
    let report = agent.stop();
    let written: Vec<Vec<u8>> = capture_file_frames(&path)
        .into_iter()
        .map(|(_, f)| f)
        .collect();
    assert_eq!(written, frames, "the file, byte for byte");
    assert_eq!(report.rule("t", "10"), copied(9, 9));
}

/// A capture file gets its copies while the agent runs, in whole blocks, not only at the stop:
/// a reader of a growing file (or of `-w -`) sees a few copies at once.
#[test]
fn capture_files_get_their_copies_while_the_agent_runs() {
    let lab = Lab::new("fileflush");
    let dir = tempfile::tempdir().expect("temp dir");
    let sender = FrameSender::open(&lab.src, "eth0");
    for name in ["live.pcap", "live.pcapng"] {
        let path = dir.path().join(name);
        let agent = lab.start_agent(&xdp_session(
            "[\"src0\"]",
            &format!("{{ file = \"{}\" }}", path.display()),
            "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5000\n",
        ));
        let frames: Vec<Vec<u8>> = (0..3u8)
            .map(|i| udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 5000, &[i; 40]))
            .collect();
        for frame in &frames {
            sender.send(frame);
        }
        mirror_tests::wait_for("the three copies in the file", || {
            mirror_tests::frames_so_far(&path) == frames.len()
        });
        let written: Vec<Vec<u8>> = capture_file_frames(&path)
            .into_iter()
            .map(|(_, f)| f)
            .collect();
        assert_eq!(written, frames, "{name}, byte for byte, before the stop");
        drop(agent.stop());
    }
}

/// Whether every thread of process `pid` is in the stopped state (`T` in /proc).
fn all_threads_stopped(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the agent's threads")
        .flatten()
        .all(|task| {
            std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|stat| {
                    // The state follows the command name, which is in parentheses.
                    let after = stat.rsplit_once(')')?.1;
                    after.split_whitespace().next().map(|state| state == "T")
                })
                .unwrap_or(false)
        })
}

#[test]
fn a_full_ring_drops_copies_and_counts_them_never_the_originals() {
    let lab = Lab::new("ring-full");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("copies.pcap");
    let agent = lab.start_agent(&format!(
        "copy_ring_bytes = 4096\n{}",
        xdp_session(
            "[\"src0\"]",
            &format!("{{ file = \"{}\" }}", path.display()),
            "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5555\n",
        )
    ));
    let passed = Capture::open(&lab.node, "src0");
    let sender = FrameSender::open(&lab.src, "eth0");
    let frames: Vec<Vec<u8>> = (0..300u16)
        .map(|i| udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 5555, &i.to_be_bytes().repeat(16)))
        .collect();
    // Nobody drains the ring while the agent is stopped: it holds what fits, the rest is dropped.
    let pid = agent.pid().cast_signed();
    // SAFETY: signals to our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    mirror_tests::wait_for("every thread of the agent to be stopped", || {
        all_threads_stopped(pid)
    });
    for frame in &frames {
        sender.send(frame);
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
    let passed = passed.received_until_sentinel();
    assert_eq!(passed, frames, "every original passed, in order");
    let report = agent.stop();
    let counts = report.rule("t", "10");
    println!("{counts:?}");
    assert_eq!(counts.matched, 300);
    assert!(counts.ring_full > 0, "{counts:?}");
    assert_eq!(counts.mirrored + counts.ring_full, 300, "{counts:?}");
    // A 4 KiB ring holds at most 4096 / (8 + 32 + 74) records of these frames.
    assert!(counts.mirrored <= 4096 / (8 + 32 + 74), "{counts:?}");
    let written: Vec<Vec<u8>> = capture_file_frames(&path)
        .into_iter()
        .map(|(_, f)| f)
        .collect();
    let kept = counts.mirrored as usize;
    assert_eq!(
        written.len(),
        kept + 1,
        "the copies the ring held, then the sentinel"
    );
    assert_eq!(written[..kept], frames[..kept], "the first ones, in order");
    assert!(is_sentinel(&written[kept]));
}

#[test]
fn a_reload_switches_the_xdp_link_to_the_new_rules() {
    let lab = Lab::new("xdp-reload");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let config = dir.path().join("config.toml");
    let write = |port: u16| {
        let rule = format!(
            "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = {port}\n"
        );
        std::fs::write(
            &config,
            format!(
                "api_socket = \"{}\"\n{}",
                socket.display(),
                xdp_session("[\"src0\"]", "{ interface = \"mir0\" }", &rule)
            ),
        )
        .expect("write config");
    };
    write(5001);
    let agent =
        mirror_tests::Agent::start_file(&lab.node, &mirror_tests::agent_binary(), &config, &[]);
    let copies = Capture::open(&lab.mon, "eth0");
    let sender = FrameSender::open(&lab.src, "eth0");
    let frame = |port: u16| udp_v4_frame(SRC_MAC, NODE_SRC_MAC, port, b"xdp reload");
    let send_both = || {
        sender.send(&frame(5001));
        sender.send(&frame(5002));
        sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
    };
    send_both();
    assert_eq!(copies.bytes_until_sentinel(), [frame(5001)]);
    // The id of the XDP program on src0, if any.
    let xdp_program = || {
        let shown = lab.node.ip(&["-j", "-d", "link", "show", "dev", "src0"]);
        let link: serde_json::Value = serde_json::from_str(&shown).expect("ip -j");
        link[0]["xdp"]["prog"]["id"].as_u64()
    };
    let before = xdp_program().expect("an XDP program on src0");
    write(5002);
    let (code, stdout, stderr) = agent_command(
        &lab.node,
        &["reload", "--api-socket", socket.to_str().expect("utf-8")],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("generation 2"), "{stdout}");
    send_both();
    assert_eq!(
        copies.bytes_until_sentinel(),
        [frame(5002)],
        "the new rules"
    );
    // The link was switched to the new generation's program, not attached a second time.
    let after = xdp_program().expect("an XDP program on src0");
    assert_ne!(before, after);
    agent.stop();
    assert_eq!(xdp_program(), None, "detached on exit");
}

#[test]
fn a_pinned_xdp_link_is_taken_over_by_the_next_agent() {
    let lab = Lab::new("xdp-pinned");
    let bpffs = mirror_tests::BpfFs::mount();
    let pins = bpffs.path().join("mirror");
    let pins_arg = pins.to_str().expect("utf-8");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        xdp_session(
            "[\"src0\"]",
            "{ interface = \"mir0\" }",
            "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5001\n",
        ),
    )
    .expect("write config");
    let start = || {
        mirror_tests::Agent::start_file(
            &lab.node,
            &mirror_tests::agent_binary(),
            &config,
            &["--pin-dir", pins_arg],
        )
    };
    let copies = Capture::open(&lab.mon, "eth0");
    let sender = FrameSender::open(&lab.src, "eth0");
    let frame = |n: u8| udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 5001, &[n; 20]);
    let first = start();
    sender.send(&frame(1));
    sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
    assert_eq!(copies.bytes_until_sentinel(), [frame(1)]);
    // A stop in pinned mode leaves the XDP program attached; the next agent takes it over.
    let report = first.stop();
    assert!(report.json()["pinned"].is_string(), "{}", report.0);
    assert!(pins.join("xdp-src0").exists());
    let second = start();
    sender.send(&frame(2));
    sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
    assert_eq!(
        copies.bytes_until_sentinel(),
        [frame(2)],
        "sent on by the second agent's drain"
    );
    assert_eq!(second.stop().rule("t", "10"), copied(1, 1));
    std::fs::remove_dir_all(&pins).expect("remove the pins");
    wait_for_no_xdp(&lab);
}

/// Waits until src0 of the node has no XDP program.
fn wait_for_no_xdp(lab: &Lab) {
    mirror_tests::wait_for("the XDP program to be detached", || {
        let shown = lab.node.ip(&["-j", "-d", "link", "show", "dev", "src0"]);
        let link: serde_json::Value = serde_json::from_str(&shown).expect("ip -j");
        link[0]["xdp"].is_null()
    });
}

/// The counters the agent keeps in userspace (ring copies sent) and the hooks' go on across a
/// reload, as the rules' do: the report at the stop counts every copy the file got.
#[test]
fn ring_and_hook_counters_go_on_across_reloads() {
    let lab = Lab::new("xdp-carry");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let config = dir.path().join("config.toml");
    let path = dir.path().join("copies.pcap");
    let text = format!(
        "api_socket = \"{}\"\n{}",
        socket.display(),
        xdp_session(
            "[\"src0\"]",
            &format!("{{ file = \"{}\" }}", path.display()),
            "[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = 5000\n",
        )
    );
    std::fs::write(&config, &text).expect("write config");
    let agent =
        mirror_tests::Agent::start_file(&lab.node, &mirror_tests::agent_binary(), &config, &[]);
    let sender = FrameSender::open(&lab.src, "eth0");
    let send = |n: u8| {
        for i in 0..n {
            sender.send(&udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 5000, &[i; 40]));
        }
    };
    send(3);
    mirror_tests::wait_for("three copies in the file", || {
        mirror_tests::frames_so_far(&path) == 3
    });
    // The same session in a changed file: a new generation, the session's counters going on.
    std::fs::write(&config, format!("{text}# changed\n")).expect("write config");
    let (code, stdout, stderr) = mirror_tests::agent_command(
        &lab.node,
        &["reload", "--api-socket", socket.to_str().expect("utf-8")],
    );
    assert!(
        code == 0 && stdout.contains("generation 2"),
        "{stdout}{stderr}"
    );
    send(2);
    mirror_tests::wait_for("five copies in the file", || {
        mirror_tests::frames_so_far(&path) == 5
    });
    let report = agent.stop();
    assert_eq!(report.ring("t", "sent"), 5, "{}", report.0);
    assert_eq!(report.session("t").mirrored, 5, "{}", report.0);
    assert!(report.hook("xdp", "packets") >= 5, "{}", report.0);
}
