//! Live captures from a running agent (`mirror-agent capture`): two watchers of a TC session get
//! its copies byte for byte as pcapng while the target still gets every copy; a watcher that
//! stops reading loses copies (counted) and holds up neither the target nor the agent.
use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use mirror_tests::{
    Capture, FrameSender, KilledOnDrop, Lab, NODE_SRC_MAC, SENTINEL_RULE, SRC_MAC, api_get,
    assert_same_frames, capture_file_frames, is_sentinel, shipped_capture, wait_for,
};

/// An agent config: session `t` on src0's ingress, copying DNS (and the sentinel) to mir0, its
/// API on `socket`.
fn config(socket: &Path) -> String {
    format!(
        "api_socket = \"{}\"\n[[session]]\nname = \"t\"\ninterfaces = [\"src0\"]\n\
         direction = \"ingress\"\ntarget = {{ interface = \"mir0\" }}\n{SENTINEL_RULE}\
         [[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\nport = 53\n",
        socket.display()
    )
}

/// The agent's `/status`.
fn status(socket: &Path) -> serde_json::Value {
    serde_json::from_str(&api_get(socket.to_str().expect("path"), "/status")).expect("JSON")
}

/// The live captures `/status` lists: (session, copies, lost) each.
fn captures(socket: &Path) -> Vec<(String, u64, u64)> {
    status(socket)["captures"]
        .as_array()
        .expect("captures")
        .iter()
        .map(|c| {
            (
                c["session"].as_str().expect("session").to_owned(),
                c["copies"].as_u64().expect("copies"),
                c["lost"].as_u64().expect("lost"),
            )
        })
        .collect()
}

/// `mirror-agent capture` of session `t` into `file`, with the words of a filter.
fn capture_command(socket: &Path, file: &Path, filter: &[&str]) -> Command {
    capture_of(socket, &["--session", "t"], file, filter)
}

/// `mirror-agent capture` of `what` (`--session NAME`, `-i INTERFACE`) into `file`, with the
/// words of a filter.
fn capture_of(socket: &Path, what: &[&str], file: &Path, filter: &[&str]) -> Command {
    let mut command = Command::new(mirror_tests::agent_binary());
    command
        .arg("capture")
        .args(what)
        .arg("--api-socket")
        .arg(socket)
        .arg("-w")
        .arg(file)
        .args(filter);
    command
}

fn watch(socket: &Path, file: &Path, filter: &[&str]) -> KilledOnDrop {
    KilledOnDrop(
        capture_command(socket, file, filter)
            .stderr(Stdio::piped())
            .spawn()
            .expect("mirror-agent capture"),
    )
}

/// Replays `dns_icmp.pcap` into src0 and the sentinel: the frames, and session `t`'s copies at
/// its target (every one made before the sentinel's).
fn replay(lab: &Lab) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let copies = Capture::open(&lab.mon, "eth0");
    let sender = FrameSender::open(&lab.src, "eth0");
    let frames = shipped_capture("dns_icmp.pcap");
    for frame in &frames {
        sender.send(frame);
    }
    sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
    let at_target = copies.bytes_until_sentinel();
    (frames, at_target)
}

/// SIGINT to each capture, which must end cleanly.
fn interrupt(watchers: &mut [KilledOnDrop]) {
    for watcher in watchers {
        let (status, stderr) = watcher.interrupt();
        assert!(status.success(), "{stderr}");
    }
}

#[test]
fn two_watchers_get_a_sessions_copies_while_its_target_does() {
    let lab = Lab::new("live");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let agent = lab.start_agent(&config(&socket));
    let files = [dir.path().join("one.pcapng"), dir.path().join("two.pcapng")];
    let mut watchers: Vec<KilledOnDrop> = files.iter().map(|f| watch(&socket, f, &[])).collect();
    // A third watches the answers only: its filter is read in userspace.
    let answers_file = dir.path().join("answers.pcapng");
    watchers.push(watch(&socket, &answers_file, &["udp", "src", "port", "53"]));
    wait_for("three captures", || captures(&socket).len() == 3);
    // An expression neither the rule tables nor libpcap take is refused with its column, and no
    // file is made.
    let refused_file = dir.path().join("refused.pcapng");
    let refused = capture_command(&socket, &refused_file, &["tcp[13]", "&"])
        .output()
        .expect("refused capture");
    assert!(!refused.status.success() && !refused_file.exists());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("column 4"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    let (frames, at_target) = replay(&lab);
    let dns: Vec<Vec<u8>> = frames
        .iter()
        .filter(|f| {
            let flow = mirror_tests::Flow::of(f);
            flow.proto == Some(17) && (flow.src_port == Some(53) || flow.dst_port == Some(53))
        })
        .cloned()
        .collect();
    assert!(dns.len() >= 5, "{} DNS frames", dns.len());
    assert_same_frames("at the target", at_target, dns.clone());
    let answers: Vec<Vec<u8>> = dns
        .iter()
        .filter(|f| mirror_tests::Flow::of(f).src_port == Some(53))
        .cloned()
        .collect();
    assert!(!answers.is_empty() && answers.len() < dns.len());
    // Every copy and the sentinel's reach the first two watchers, the answers the third.
    wait_for("the watchers' copies", || {
        let mut counts: Vec<u64> = captures(&socket).iter().map(|c| c.1).collect();
        counts.sort_unstable();
        counts
            == [
                answers.len() as u64,
                dns.len() as u64 + 1,
                dns.len() as u64 + 1,
            ]
    });
    wait_for("the copies in the files", || {
        files
            .iter()
            .all(|f| f.exists() && capture_file_frames(f).len() == dns.len() + 1)
    });
    interrupt(&mut watchers);
    let answered: Vec<Vec<u8>> = capture_file_frames(&answers_file)
        .into_iter()
        .map(|(_, f)| f)
        .collect();
    assert_eq!(answered, answers);
    for file in &files {
        let frames = capture_file_frames(file);
        assert!(
            frames
                .iter()
                .all(|(name, _)| name.as_deref() == Some("src0 ingress")),
            "{frames:?}"
        );
        let copies: Vec<Vec<u8>> = frames
            .into_iter()
            .map(|(_, f)| f)
            .filter(|f| !is_sentinel(f))
            .collect();
        assert_eq!(copies, dns, "in order, byte for byte");
        // tshark reads what an interrupted capture wrote.
        mirror_tests::run("tshark", &["-r", file.to_str().expect("path"), "-c", "1"]);
    }
    wait_for("the captures to be gone", || captures(&socket).is_empty());
    let report = agent.stop();
    assert_eq!(report.session("t").mirrored, dns.len() as u64 + 1);
    assert_eq!(report.rule("t", "10").watch_lost, 0);
}

#[test]
fn a_watcher_that_stops_reading_loses_copies_and_holds_nothing_up() {
    let lab = Lab::new("stuck");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let agent = lab.start_agent(&config(&socket));
    // A client that asks for the stream and never reads it.
    let mut stuck = std::os::unix::net::UnixStream::connect(&socket).expect("the API socket");
    write!(
        stuck,
        "GET /capture?session=t HTTP/1.1\r\nhost: agent\r\n\r\n"
    )
    .expect("request");
    wait_for("the capture", || captures(&socket).len() == 1);

    let copies = Capture::open(&lab.mon, "eth0");
    let sender = FrameSender::open(&lab.src, "eth0");
    let dns = shipped_capture("dns_icmp.pcap")
        .into_iter()
        .find(|f| mirror_tests::Flow::of(f).dst_port == Some(53))
        .expect("a DNS query");
    let sent = 12_000;
    for _ in 0..sent {
        sender.send(&dns);
    }
    sender.send_sentinel(SRC_MAC, NODE_SRC_MAC);
    // The target got every copy, whatever the watcher did.
    let at_target = copies.bytes_until_sentinel();
    assert_eq!(at_target.len(), sent);
    wait_for("the copies offered to the watcher", || {
        captures(&socket)
            .first()
            .is_some_and(|(_, copies, lost)| copies + lost == sent as u64 + 1)
    });
    let (_, queued, lost) = captures(&socket)[0].clone();
    assert!(lost > 0 && queued > 0, "queued {queued}, lost {lost}");
    // The API still answers, and a stop is not held up by the stuck client.
    assert!(api_get(socket.to_str().expect("path"), "/stats").contains("\"t\""));
    let (report, took) = agent.stop_within(libc::SIGTERM, Duration::from_secs(5));
    assert_eq!(report.session("t").mirrored, sent as u64 + 1);
    assert!(took < Duration::from_secs(5), "{took:?}");
    drop(stuck);
}

/// The names of the sessions the agent runs now.
fn sessions(socket: &Path) -> Vec<String> {
    status(socket)["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| s["name"].as_str().expect("name").to_owned())
        .collect()
}

/// `mirror-agent capture -i INTERFACE` into `file` with the words of a filter.
fn ad_hoc(socket: &Path, interface: &str, file: &Path, filter: &[&str]) -> Command {
    capture_of(socket, &["-i", interface], file, filter)
}

#[test]
fn an_ad_hoc_capture_is_a_session_while_it_runs() {
    let lab = Lab::new("adhoc");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let agent = lab.start_agent(&config(&socket));
    // An interface that is not there: refused with the reason, no file, nothing applied.
    let missing = dir.path().join("missing.pcapng");
    let refused = ad_hoc(&socket, "nope0", &missing, &[])
        .output()
        .expect("capture");
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && why.contains("nope0"), "{why}");
    assert!(!missing.exists());
    assert_eq!(sessions(&socket), ["t"]);

    let file = dir.path().join("icmp.pcapng");
    let mut watcher = [KilledOnDrop(
        ad_hoc(&socket, "src0", &file, &["icmp"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("capture"),
    )];
    wait_for("the capture's session", || sessions(&socket).len() == 2);
    let (frames, at_target) = replay(&lab);
    let icmp: Vec<Vec<u8>> = frames
        .iter()
        .filter(|f| mirror_tests::Flow::of(f).proto == Some(1))
        .cloned()
        .collect();
    assert!(!icmp.is_empty());
    wait_for("the ICMP frames in the file", || {
        file.exists() && capture_file_frames(&file).len() == icmp.len()
    });
    interrupt(&mut watcher);
    let captured = capture_file_frames(&file);
    assert!(
        captured
            .iter()
            .all(|(name, _)| name.as_deref() == Some("src0 ingress"))
    );
    let captured: Vec<Vec<u8>> = captured.into_iter().map(|(_, f)| f).collect();
    assert_eq!(captured, icmp, "in order, byte for byte");
    wait_for("the capture's session to go", || sessions(&socket) == ["t"]);
    // The session of the file went on as it was, its counters too (the sentinel's copy besides).
    let report = agent.stop();
    assert_eq!(report.session("t").mirrored, at_target.len() as u64 + 1);
}

/// A client that goes while its ad-hoc capture's session is being applied frees it all the same:
/// the session comes and goes, and its watcher's place is free again. After more such clients
/// than there are places, a capture still starts.
#[test]
fn a_client_that_goes_while_its_capture_starts_frees_it() {
    let lab = Lab::new("adhocgone");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("agent.sock");
    let agent = lab.start_agent(&config(&socket));
    let generation = || status(&socket)["generation"].as_u64().expect("generation");
    for round in 0..9 {
        let before = generation();
        let mut client = std::os::unix::net::UnixStream::connect(&socket).expect("the API");
        write!(
            client,
            "GET /capture?interface=src0&filter=udp HTTP/1.1\r\nhost: agent\r\n\r\n"
        )
        .expect("request");
        // Its watcher is there as soon as the agent starts applying the capture's session,
        // which takes a while (a new generation is loaded): the client goes meanwhile.
        wait_for("the capture's watcher", || !captures(&socket).is_empty());
        drop(client);
        wait_for("the capture's session to come and go", || {
            generation() == before + 2 && sessions(&socket) == ["t"] && captures(&socket).is_empty()
        });
        println!("round {round}: freed");
    }
    let file = dir.path().join("udp.pcapng");
    let mut watcher = [KilledOnDrop(
        ad_hoc(&socket, "src0", &file, &["udp"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("capture"),
    )];
    wait_for("a capture's session", || sessions(&socket).len() == 2);
    interrupt(&mut watcher);
    wait_for("it to go", || sessions(&socket) == ["t"]);
    drop(agent.stop());
}
