//! The agent's lifecycle on a host: what it leaves behind after a signal, and how it refuses bad
//! input (exit code, <file:line>, nothing attached).
use mirror_tests::{Lab, SENTINEL_RULE, agent_command, tcx_programs};

const CONFIG: &str = "[[session]]\nname = \"t\"\ninterfaces = [\"src0\", \"sink0\"]\ntarget = { interface = \"mir0\" }\n";

#[test]
fn signals_detach_every_program_and_print_counters() {
    let lab = Lab::new("signals");
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let agent = lab.start_agent(&format!("{CONFIG}{SENTINEL_RULE}"));
        for interface in ["src0", "sink0"] {
            assert_eq!(
                tcx_programs(&lab.node, interface),
                [
                    vec!["mirror_tc_ingre".to_owned()],
                    vec!["mirror_tc_egres".to_owned()]
                ],
                "attached to {interface} (names are cut to 15 bytes by the kernel)"
            );
        }
        let report = agent.stop_with(signal);
        assert!(
            report.json()["stats"]["sessions"][0]["name"] == "t",
            "final counters printed: {}",
            report.0
        );
        for interface in ["src0", "sink0", "mir0"] {
            assert_eq!(
                tcx_programs(&lab.node, interface),
                [Vec::<String>::new(), Vec::new()],
                "{interface} after signal {signal}"
            );
            let qdiscs = lab.node.exec(&["tc", "qdisc", "show", "dev", interface]);
            assert!(
                !qdiscs.contains("clsact"),
                "no qdisc left on {interface}: {qdiscs}"
            );
        }
    }
}

#[test]
fn check_points_at_file_and_line() {
    let lab = Lab::new("check");
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = [
        (
            "rule number twice",
            format!("{CONFIG}{SENTINEL_RULE}{SENTINEL_RULE}"),
            10,
            "rule number 1 is used twice",
        ),
        (
            "unknown key",
            format!("{CONFIG}colour = \"blue\"\n"),
            5,
            "unknown field `colour`",
        ),
        (
            "bad prefix",
            format!(
                "{CONFIG}[[session.rule]]\nnumber = 2\naction = \"mirror\"\ndst = \"10.1.2.3/8\"\n"
            ),
            8,
            "did you mean `10.0.0.0/8`",
        ),
        (
            "missing target",
            CONFIG.replace("mir0", "nothere0"),
            4,
            "target interface `nothere0` does not exist",
        ),
    ];
    for (name, text, line, message) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).expect("write");
        let path = path.to_str().expect("utf-8");
        let (code, _, stderr) = agent_command(&lab.node, &["check", "--config", path]);
        assert_eq!(code, 1, "{name}: {stderr}");
        assert!(
            stderr.contains(&format!("{path}:{line}:")) && stderr.contains(message),
            "{name}: {stderr}"
        );
    }
    let good = dir.path().join("good.toml");
    std::fs::write(&good, format!("{CONFIG}{SENTINEL_RULE}")).expect("write");
    let (code, stdout, stderr) = agent_command(
        &lab.node,
        &["check", "--config", good.to_str().expect("utf-8")],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("ok: 1 session(s), 1 rule(s), 4 hook(s)"),
        "{stdout}"
    );
}

#[test]
fn run_refuses_loops_and_unknown_interfaces_and_attaches_nothing() {
    let lab = Lab::new("refuse");
    let cases: [(&[&str], &str); 3] = [
        (
            &["run", "--iface", "src0", "--iface", "mir*", "--to", "mir0"],
            "includes the target `mir0`",
        ),
        (
            &["run", "--iface", "nope0", "--to", "mir0"],
            "interface `nope0` does not exist",
        ),
        (
            &[
                "run",
                "--iface",
                "src0",
                "--to",
                "mir0",
                "--dst-port",
                "70000",
            ],
            "not a port",
        ),
    ];
    for (args, message) in cases {
        let (code, _, stderr) = agent_command(&lab.node, args);
        assert_ne!(code, 0, "{args:?}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert_eq!(
            tcx_programs(&lab.node, "src0"),
            [Vec::<String>::new(), Vec::new()]
        );
    }
}

#[test]
fn vxlan_targets_are_checked_and_an_unreachable_collector_is_counted() {
    let lab = Lab::with_collector("vxrefuse", 1500);
    // A bad control on the command line: refused before anything is made.
    let (code, _, stderr) = agent_command(
        &lab.node,
        &[
            "run",
            "--iface",
            "src0",
            "--to-vxlan",
            "192.0.2.2",
            "--snaplen",
            "5",
        ],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("snaplen must be 96..65535"), "{stderr}");
    // A tunnel flag without its tunnel: a usage error (2), before anything is made.
    for flags in [
        ["--to-gre", "192.0.2.2", "--vni", "5"],
        ["--to", "mir0", "--tunnel-local", "192.0.2.1"],
        ["--to-erspan", "192.0.2.2", "--tunnel-port", "9"],
    ] {
        let (code, _, stderr) = agent_command(
            &lab.node,
            &[&["run", "--iface", "src0"][..], &flags].concat(),
        );
        assert_eq!(code, 2, "{flags:?}: {stderr}");
        assert!(stderr.contains("--to-vxlan"), "{flags:?}: {stderr}");
    }
    // check reports the largest copy the path carries: 1500 - 36 bytes of encapsulation.
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("vx.toml");
    std::fs::write(
        &config,
        "[[session]]\nname = \"t\"\ninterfaces = [\"src0\"]\ntarget = { vxlan = { remote = \"192.0.2.2\", vni = 5 } }\n",
    )
    .expect("write config");
    let config = config.to_str().expect("utf-8");
    let (code, stdout, stderr) = agent_command(&lab.node, &["check", "--config", config]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("copies up to 1464 bytes fit the path"),
        "{stdout}"
    );
    // Unreachable now: check says so, and a run starts all the same (the path follower finds the
    // route when it comes), counting its copies as no_route; it made no device.
    let (code, stdout, stderr) =
        agent_command(&lab.node, &["check", "--config", &unreachable_config(&dir)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("no route to 203.0.113.9"), "{stdout}");
    let agent = lab.start_agent(
        "[[session]]\nname = \"t\"\ninterfaces = [\"src0\"]\ntarget = { vxlan = { remote = \"203.0.113.9\", vni = 1 } }\ndefault = \"mirror\"\n",
    );
    lab.send_sentinel();
    let report = agent.stop();
    assert!(report.session("t").no_route >= 1, "{}", report.0);
    assert_eq!(report.session("t").mirrored, 0, "{}", report.0);
    assert_eq!(report.tunnel("t")["problem"], "no route to 203.0.113.9");
    assert!(!lab.node.ip(&["-d", "link", "show"]).contains("vxlan"));
    assert_eq!(
        tcx_programs(&lab.node, "src0"),
        [Vec::<String>::new(), Vec::new()]
    );
}

/// Collector addresses are checked once, at validation, with `file:line:col`: the node's own
/// address, a subnet's broadcast, a `local` that is not the node's, and addresses that are no
/// host's anywhere (the broadcast, 240/4, IPv4-mapped, link-local) are refused by `check` and by
/// `run`, which then attaches nothing.
#[test]
fn collector_addresses_are_refused_at_validation_where_they_are_written() {
    let lab = Lab::with_collector("vxaddr", 1500);
    let dir = tempfile::tempdir().expect("temp dir");
    let cases = [
        ("remote = \"192.0.2.1\"", "is an address of this host"),
        ("remote = \"192.0.2.255\"", "is a broadcast address here"),
        (
            "remote = \"192.0.2.2\", local = \"192.0.2.77\"",
            "`local` 192.0.2.77 is not an address of this host",
        ),
        ("remote = \"255.255.255.255\"", "the broadcast address"),
        ("remote = \"240.0.0.1\"", "a reserved address"),
        ("remote = \"::ffff:10.77.3.2\"", "IPv4-mapped"),
        ("remote = \"fe80::1\"", "link-local"),
    ];
    for (addresses, message) in cases {
        let path = dir.path().join("collector.toml");
        std::fs::write(
            &path,
            format!(
                "[[session]]\nname = \"t\"\ninterfaces = [\"src0\"]\n\
                 target = {{ vxlan = {{ {addresses}, vni = 5 }} }}\n"
            ),
        )
        .expect("write config");
        let path = path.to_str().expect("utf-8");
        for command in [&["check", "--config", path][..], &["run", "--config", path]] {
            let (code, _, stderr) = agent_command(&lab.node, command);
            assert_eq!(code, 1, "{command:?} {addresses}: {stderr}");
            assert!(
                stderr.contains(&format!("{path}:4:")) && stderr.contains(message),
                "{command:?} {addresses}: {stderr}"
            );
        }
        assert_eq!(
            tcx_programs(&lab.node, "src0"),
            [Vec::<String>::new(), Vec::new()]
        );
    }
}

/// A configuration file is read up to 16 MiB, and one larger is refused; a `pin_dir` that is not
/// on a BPF file system is refused before anything is made, the directory included.
#[test]
fn oversized_files_and_pin_dirs_off_bpffs_are_refused() {
    let lab = Lab::new("bounds");
    let dir = tempfile::tempdir().expect("temp dir");
    let big = dir.path().join("big.toml");
    let comment = format!("# {}\n", "x".repeat(1021));
    std::fs::write(
        &big,
        format!("{CONFIG}{SENTINEL_RULE}{}", comment.repeat(17 * 1024)),
    )
    .expect("write");
    let big = big.to_str().expect("utf-8");
    let (code, _, stderr) = agent_command(&lab.node, &["check", "--config", big]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("more than 16 MiB"), "{stderr}");

    let good = dir.path().join("good.toml");
    std::fs::write(&good, format!("{CONFIG}{SENTINEL_RULE}")).expect("write");
    let pins = dir.path().join("not-bpffs").join("pins");
    let (code, _, stderr) = agent_command(
        &lab.node,
        &[
            "run",
            "--config",
            good.to_str().expect("utf-8"),
            "--pin-dir",
            pins.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("not on a BPF file system"), "{stderr}");
    assert!(!dir.path().join("not-bpffs").exists(), "nothing made");
    assert_eq!(
        tcx_programs(&lab.node, "src0"),
        [Vec::<String>::new(), Vec::new()]
    );
}

/// A configuration whose collector has no route from the lab's node.
fn unreachable_config(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("unreachable.toml");
    std::fs::write(
        &path,
        "[[session]]\nname = \"t\"\ninterfaces = [\"src0\"]\ntarget = { vxlan = { remote = \"203.0.113.9\", vni = 1 } }\n",
    )
    .expect("write config");
    path.to_str().expect("utf-8").to_owned()
}

/// Every command that prints ends quietly when its reader goes (`| head -c1`, `| true`), as
/// coreutils and tcpdump do: no panic, no error message; killed by SIGPIPE or done.
#[test]
fn commands_end_quietly_when_their_reader_goes() {
    let lab = Lab::new("pipes");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let socket = socket.to_str().expect("utf-8");
    let text = format!("api_socket = \"{socket}\"\n{CONFIG}{SENTINEL_RULE}");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, &text).expect("config");
    let config = config.to_str().expect("utf-8");
    let agent = lab.start_agent(&text);
    let binary = mirror_tests::agent_binary();
    let binary = binary.to_str().expect("utf-8");
    let commands: [&[&str]; 9] = [
        &["status", "--api-socket", socket],
        &["status", "--json", "--api-socket", socket],
        &["stats", "--api-socket", socket],
        &["stats", "--json", "--api-socket", socket],
        &[
            "stats",
            "--watch",
            "--count",
            "3",
            "--interval",
            "0.1",
            "--api-socket",
            socket,
        ],
        &["check", "--config", config, "--explain"],
        &["completions", "bash"],
        &["man"],
        &["--help"],
    ];
    for args in commands {
        for reader in ["head -c1 >/dev/null", "true"] {
            // The agent's exit status, not the reader's.
            let script = format!(
                "\"$0\" \"$@\" 2>\"{}/stderr\" | {reader}; echo ${{PIPESTATUS[0]}}",
                dir.path().display()
            );
            let status = lab
                .node
                .exec(&[&["bash", "-c", &script, binary][..], args].concat());
            let stderr =
                std::fs::read_to_string(dir.path().join("stderr")).expect("the command's stderr");
            let status: i32 = status.trim().parse().expect("an exit status");
            // 141: ended by SIGPIPE; 0: it had written everything before the reader went.
            assert!(
                [0, 141].contains(&status) && stderr.is_empty(),
                "{args:?} | {reader}: exit {status}, stderr {stderr:?}"
            );
        }
    }
    drop(agent.stop());
}

/// The quick form takes tcpdump's habits: `-D` lists the interfaces; `-n`/`-nn`, `-p` and `-l`
/// are taken without effect; `-Q in` is the direction; `-U` writes each copy at once; `-i any`
/// watches every interface; tcpdump's printing flags are refused with what to do instead; its
/// mistakes are usage errors (exit 2), and a missing target is named as such.
#[test]
fn the_quick_form_takes_tcpdumps_habits() {
    let lab = Lab::new("habits");
    let (code, stdout, stderr) = agent_command(&lab.node, &["run", "-D"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        ["src0", "lo"].iter().all(|name| stdout
            .lines()
            .any(|l| l.split_once('.').is_some_and(|(_, n)| n == *name))),
        "{stdout}"
    );
    for (args, advice) in [
        (&["-vv"][..], "changes how tcpdump prints packets"),
        (&["-X"], "changes how tcpdump prints packets"),
    ] {
        let (code, _, stderr) = agent_command(
            &lab.node,
            &[&["run", "-i", "src0", "-w", "/tmp/never.pcap"][..], args].concat(),
        );
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(
            stderr.contains(advice) && !stderr.contains("-- "),
            "{args:?}: {stderr}"
        );
    }
    for (args, message) in [
        (&["-i", "src0", "--to", "mir0", "-s", "64"][..], "snaplen"),
        (&["-i", "eth9", "--to", "mir0"], "`eth9` does not exist"),
        (&["-i", "src0", "tcp", "port", "80"], "--write"),
        (
            &["-i", "src0", "--to", "mir0", "-c", "3"],
            "-c needs -w FILE",
        ),
        (&["-i", "src0", "--to", "mir0", "-U"], "-U needs -w FILE"),
        (&["-r", "in.pcap", "udp"], "-r needs -w FILE"),
        // A flag of one target with another target.
        (
            &["-i", "src0", "--to", "mir0", "--compare"],
            "--shadow <URL>",
        ),
        (
            &["-i", "src0", "--to", "mir0", "--gre-key", "3"],
            "--to-gre",
        ),
        (
            &["-i", "src0", "--to", "mir0", "--erspan-version", "3"],
            "--to-erspan",
        ),
    ] {
        let (code, _, stderr) = agent_command(&lab.node, &[&["run"][..], args].concat());
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(
            stderr.contains(message) && !stderr.contains("--config"),
            "{args:?}: {stderr}"
        );
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let file = dir.path().join("habits.pcap");
    let mut agent = mirror_tests::KilledOnDrop(
        std::process::Command::new("ip")
            .args(["netns", "exec", &lab.node.name])
            .arg(mirror_tests::agent_binary())
            .args([
                "run", "-i", "any", "-nn", "-p", "-l", "-Q", "in", "-U", "-w",
            ])
            .arg(&file)
            .arg("--api-socket")
            .arg(&socket)
            .args(["udp", "port", "5000"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("agent"),
    );
    let socket = socket.to_str().expect("utf-8");
    mirror_tests::wait_for("the agent's API", || {
        std::os::unix::net::UnixStream::connect(socket).is_ok()
    });
    let hooks = mirror_tests::attached(&lab.node, socket);
    for interface in ["src0", "sink0", "mir0", "lo"] {
        assert!(
            hooks.contains(&(interface.to_owned(), "ingress".to_owned())),
            "{interface} in {hooks:?}"
        );
    }
    assert!(hooks.iter().all(|(_, d)| d == "ingress"), "{hooks:?}");
    let frame = mirror_tests::udp_v4_frame(
        mirror_tests::SRC_MAC,
        mirror_tests::NODE_SRC_MAC,
        5000,
        b"habits",
    );
    mirror_tests::FrameSender::open(&lab.src, "eth0").send(&frame);
    mirror_tests::wait_for("the copy in the file", || {
        mirror_tests::frames_so_far(&file) == 1
    });
    assert_eq!(mirror_tests::pcap_frames(&file), [frame]);
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(agent.0.id().cast_signed(), libc::SIGINT) };
    assert!(agent.0.wait().expect("agent").success());
}

/// `run --check`: a dry run of the quick form's filter, in tcpdump's words; nothing attached or
/// written, and its mistakes usage errors.
#[test]
fn run_check_is_a_dry_run() {
    let lab = Lab::new("dry-run");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("never.pcap");
    let dry_run = |filter: &str| {
        agent_command(
            &lab.node,
            &[
                "run",
                "--check",
                "-i",
                "src0",
                "-w",
                file.to_str().expect("utf-8"),
                filter,
            ],
        )
    };
    let (code, stdout, stderr) = dry_run("tcp port 443");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("mirror tcp and dst port 443")
            && stdout.contains("command line: ok: 1 session(s), 2 rule(s), 2 hook(s)"),
        "{stdout}"
    );
    let (code, _, stderr) = dry_run("tcp port 443 and");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("column 17"), "{stderr}");
    assert!(!file.exists());
}
