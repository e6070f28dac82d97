//! Pod-selector sessions against a stand-in for the Kubernetes API (`mirror_tests::kube_api`:
//! no real API server can run on these machines), with real pods: a namespace each, with a veth
//! whose host side is in the lab's node and either a /32 route to the pod's IP, as Calico or
//! Cilium set them up, or a port on a bridge, as flannel does. Not covered: authentication, TLS,
//! paging (kube-rs's, against a real server).
use mirror_tests::{
    Agent, BpfFs, Capture, FrameSender, KilledOnDrop, Lab, Netns, Origin, SENTINEL_RULE,
    TrafficLoop, agent_binary, agent_command, api_get, attached, capture_file_frames,
    kube_api::{FakeApi, NODE, pod},
    session_hooks, tcx_programs, udp_v4_frame, wait_for,
};

const PORT: u16 = 7000;

/// A pod's network namespace, its veth (host side `host_name` in the node) and the node's route
/// to its IP.
struct PodNet {
    ns: Netns,
}

impl PodNet {
    /// As Calico or Cilium set a pod up: the node routes the pod's /32 to its veth.
    fn new(lab: &Lab, host_name: &str, ip: &str) -> Self {
        let host_route = format!("{ip}/{}", if ip.contains(':') { 128 } else { 32 });
        let pod = Self::veth(lab, host_name, &host_route);
        lab.node
            .ip(&["route", "add", &host_route, "dev", host_name]);
        pod
    }

    /// As flannel or the `bridge` plugin set a pod up: its veth is a port of `bridge`, whose
    /// subnet the pod's address `ip_prefix` is in.
    fn on_bridge(lab: &Lab, host_name: &str, ip_prefix: &str, bridge: &str) -> Self {
        let pod = Self::veth(lab, host_name, ip_prefix);
        lab.node.ip(&["link", "set", host_name, "master", bridge]);
        pod
    }

    /// [`PodNet::new`] with the pod's own route too: everything on its link, which the host side
    /// answers for by proxy ARP (for every address the node routes elsewhere), so the pod can
    /// talk to other pods through the node.
    fn reachable(lab: &Lab, host_name: &str, ip: &str) -> Self {
        let pod = Self::new(lab, host_name, ip);
        lab.node
            .sysctl(&format!("net.ipv4.conf.{host_name}.proxy_arp"), "1");
        pod.ns.ip(&["route", "add", "default", "dev", "eth0"]);
        pod
    }

    fn veth(lab: &Lab, host_name: &str, ip_prefix: &str) -> Self {
        let ns = Netns::new(format!("{}-{host_name}", lab.node.name));
        lab.node.ip(&[
            "link", "add", host_name, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        lab.node.ip(&["link", "set", host_name, "up"]);
        ns.ip(&["addr", "add", ip_prefix, "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        PodNet { ns }
    }

    /// A UDP frame out of the pod to [`PORT`], told apart by `payload`.
    fn send(&self, payload: &[u8]) -> Vec<u8> {
        let frame = pod_frame(payload);
        FrameSender::open(&self.ns, "eth0").send(&frame);
        frame
    }

    fn send_sentinel(&self) {
        FrameSender::open(&self.ns, "eth0").send_sentinel(POD_MAC, HOST_MAC);
    }
}

/// A UDP frame out of a pod to [`PORT`], told apart by `payload`.
fn pod_frame(payload: &[u8]) -> Vec<u8> {
    udp_v4_frame(POD_MAC, HOST_MAC, PORT, payload)
}

const POD_MAC: &str = "02:00:00:00:0a:02";
const HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";

/// Where an agent of these tests keeps its configuration, kubeconfig and API socket.
struct AgentFiles {
    dir: tempfile::TempDir,
    socket: String,
}

impl AgentFiles {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("agent.sock");
        let socket = socket.to_str().expect("utf-8").to_owned();
        AgentFiles { dir, socket }
    }

    /// Changes the configuration file's text, not what it says.
    fn touch_config(&self) {
        use std::io::Write as _;
        std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("config.toml"))
            .and_then(|mut file| file.write_all(b"# touched\n"))
            .expect("config");
    }

    /// Runs the agent in the lab's node with a session selecting the pods of namespace `shop`
    /// labelled `app=web`, against `api`.
    fn start(&self, lab: &Lab, api: &FakeApi, extra: &[&str]) -> Agent {
        self.start_with(lab, api, "", extra)
    }

    /// [`AgentFiles::start`] with `session_keys` added to the session.
    fn start_with(&self, lab: &Lab, api: &FakeApi, session_keys: &str, extra: &[&str]) -> Agent {
        self.start_session(
            lab,
            api,
            &format!(
                "{session_keys}target = {{ interface = \"mir0\" }}\n[[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\ndst_port = {PORT}\n{SENTINEL_RULE}"
            ),
            extra,
        )
    }

    /// The agent with a session selecting the pods of namespace `shop` labelled `app=web`, the
    /// rest of the session (target, rules) `session`.
    fn start_session(&self, lab: &Lab, api: &FakeApi, session: &str, extra: &[&str]) -> Agent {
        let kubeconfig = self.dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig()).expect("kubeconfig");
        let config = self.dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "api_socket = \"{}\"\n[[session]]\nname = \"web\"\npods = {{ namespace = \"shop\", labels = {{ app = \"web\" }} }}\n{session}",
                self.socket
            ),
        )
        .expect("config");
        Agent::start_file(
            &lab.node,
            &agent_binary(),
            &config,
            &[
                &[
                    "--node-name",
                    NODE,
                    "--kubeconfig",
                    kubeconfig.to_str().expect("utf-8"),
                ],
                extra,
            ]
            .concat(),
        )
    }
}

/// The directions in which `interface` is attached, sorted.
fn hooks_of(lab: &Lab, socket: &str, interface: &str) -> Vec<String> {
    let mut hooks: Vec<String> = attached(&lab.node, socket)
        .into_iter()
        .filter(|(i, _)| i == interface)
        .map(|(_, d)| d)
        .collect();
    hooks.sort();
    hooks
}

/// The pods `status --json` lists: (pod, interface or why none, sessions as JSON).
fn selected_pods(lab: &Lab, socket: &str) -> Vec<(String, String, String)> {
    let (code, stdout, stderr) =
        agent_command(&lab.node, &["status", "--json", "--api-socket", socket]);
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("status JSON");
    status["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .map(|p| {
            (
                p["pod"].as_str().unwrap_or_default().to_owned(),
                p["interface"]
                    .as_str()
                    .or(p["problem"].as_str())
                    .unwrap_or_default()
                    .to_owned(),
                p["sessions"].to_string(),
            )
        })
        .collect()
}

/// The pods known before the agent starts: web-1 (selected), db-1 and web-x (not selected), with
/// their networks; and two selected pods that get no interface: one on another node, one on the
/// host network.
fn first_pods(lab: &Lab, api: &FakeApi) -> [PodNet; 3] {
    let web1 = PodNet::new(lab, "vethweb1", "10.244.0.10");
    let db1 = PodNet::new(lab, "vethdb1", "10.244.0.11");
    let other = PodNet::new(lab, "vethother", "10.244.0.12");
    api.apply(pod("shop", "web-1", "web", NODE, &["10.244.0.10"]));
    api.apply(pod("shop", "db-1", "db", NODE, &["10.244.0.11"]));
    // Same labels, another namespace: not selected.
    api.apply(pod("lab", "web-x", "web", NODE, &["10.244.0.12"]));
    // Selected, but on another node: the agent never hears of it.
    api.apply(pod("shop", "web-far", "web", "node-b", &["10.244.9.9"]));
    // Selected, but on the host network: no interface of its own.
    let mut host = pod("shop", "web-host", "web", NODE, &["10.10.1.1"]);
    host.spec.as_mut().expect("spec").host_network = Some(true);
    api.apply(host);
    // Selected, but its /32 route is missing and its address is in a subnet the node has on src0:
    // src0 is not its interface.
    api.apply(pod("shop", "web-lost", "web", NODE, &["10.10.1.7"]));
    [web1, db1, other]
}

/// After the first list of [`first_pods`]: only web-1's interface is watched, in both directions,
/// and `status` says where each selected pod is watched, or why not.
fn assert_only_web1_watched(lab: &Lab, socket: &str) {
    // And the metrics count them: one watched, one (on the host network) not.
    let metrics = api_get(socket, "/metrics");
    for line in [
        r#"mirror_selected_pods{session="web",watched="true"} 1"#,
        r#"mirror_selected_pods{session="web",watched="false"} 2"#,
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
    // Only web-1's interface, in both directions, from the first list.
    assert_eq!(
        session_hooks(&lab.node, socket, 0),
        ["vethweb1/egress", "vethweb1/ingress"]
    );
    assert_eq!(
        attached(&lab.node, socket).len(),
        2,
        "nothing else attached"
    );
    // What `status` says of the selected pods: where each is watched, or why not.
    let shown = selected_pods(lab, socket);
    assert_eq!(
        shown,
        [
            (
                "shop/web-1".to_owned(),
                "vethweb1".to_owned(),
                r#"["web"]"#.to_owned()
            ),
            (
                "shop/web-host".to_owned(),
                "on the host network: no interface of its own".to_owned(),
                r#"["web"]"#.to_owned()
            ),
            (
                "shop/web-lost".to_owned(),
                "10.10.1.7 is routed to src0 by a subnet's route, not a host route: not a pod interface".to_owned(),
                r#"["web"]"#.to_owned()
            ),
        ]
    );
}

#[test]
fn pods_selected_by_namespace_and_labels_are_followed_as_they_come_change_and_go() {
    let lab = Lab::new("pods");
    let api = FakeApi::start(&lab.node);
    let [web1, db1, other] = first_pods(&lab, &api);

    let files = AgentFiles::new();
    let socket = files.socket.as_str();
    let agent = files.start(&lab, &api, &[]);
    let hooks = |interface: &str| hooks_of(&lab, socket, interface);
    let both = vec!["egress".to_owned(), "ingress".to_owned()];
    assert_only_web1_watched(&lab, socket);
    let copies = Capture::open(&lab.mon, "eth0");
    let expect_copies = |sent: Vec<Vec<u8>>, sentinel_from: &PodNet, what: &str| {
        sentinel_from.send_sentinel();
        let got: Vec<Vec<u8>> = copies
            .until_sentinel()
            .into_iter()
            .map(|f| f.bytes)
            .collect();
        assert_eq!(got, sent, "{what}");
    };
    let kept = web1.send(b"web-1 selected");
    db1.send(b"db-1 not selected");
    other.send(b"web-x in another namespace");
    expect_copies(vec![kept], &web1, "the first list");

    // db-1 relabelled app=web: selected from now on.
    api.relabel("db-1", "web");
    wait_for("db-1's interface watched", || hooks("vethdb1") == both);
    assert_eq!(
        session_hooks(&lab.node, socket, 0),
        [
            "vethdb1/egress",
            "vethdb1/ingress",
            "vethweb1/egress",
            "vethweb1/ingress"
        ],
        "the session's hooks in status follow the pods"
    );
    let kept = db1.send(b"db-1 relabelled web");
    expect_copies(vec![kept], &db1, "after db-1 is relabelled");

    // web-1 relabelled away: its interface is let go, programs detached.
    api.relabel("web-1", "web-old");
    wait_for("web-1's interface let go", || hooks("vethweb1").is_empty());
    assert_eq!(
        tcx_programs(&lab.node, "vethweb1"),
        [Vec::<String>::new(), Vec::new()]
    );
    web1.send(b"web-1 not selected any more");
    let kept = db1.send(b"db-1 still selected");
    expect_copies(vec![kept], &db1, "after web-1 is relabelled away");

    // A new pod: its veth and route first (the CNI), then the API reports it with its IPs. It is
    // dual-stack, and only its IPv6 address is routed here: that one places it.
    let web2 = PodNet::new(&lab, "vethweb2", "fd00:244::13");
    let reported = std::time::Instant::now();
    api.apply(pod(
        "shop",
        "web-2",
        "web",
        NODE,
        &["10.244.99.13", "fd00:244::13"],
    ));
    wait_for("web-2's interface watched", || hooks("vethweb2") == both);
    println!(
        "web-2 watched {} ms after the API reported it",
        reported.elapsed().as_millis()
    );
    let kept = web2.send(b"web-2 new");
    expect_copies(vec![kept], &web2, "after web-2 came");

    // A reload plans the pods selected now into the new generation: nothing is let go. (The
    // file changes, or the reload would have nothing to apply.)
    files.touch_config();
    let (code, stdout, stderr) = agent_command(&lab.node, &["reload", "--api-socket", socket]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.starts_with("reloaded"), "{stdout}");
    assert_eq!(
        (hooks("vethweb2"), hooks("vethdb1")),
        (both.clone(), both.clone())
    );
    let kept = web2.send(b"web-2 after the reload");
    expect_copies(vec![kept], &web2, "after a reload");

    // db-1 deleted: the new generation lets its interface go.
    api.delete("db-1");
    wait_for("db-1's interface let go", || hooks("vethdb1").is_empty());
    db1.send(b"db-1 deleted");
    let kept = web2.send(b"web-2 still there");
    expect_copies(vec![kept], &web2, "after db-1 went");

    let report = agent.stop();
    // 6 copies and 6 sentinels, all by the one session (counted on across the reload).
    assert_eq!(report.session("web").mirrored, 12, "{}", report.0);
    api.assert_asked_for_this_node_only();
}

#[test]
fn a_pod_session_without_the_node_name_is_refused_before_anything_is_attached() {
    let lab = Lab::new("podsnode");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[[session]]\nname = \"web\"\npods = { labels = { app = \"web\" } }\ntarget = { interface = \"mir0\" }\n",
    )
    .expect("config");
    let (code, stdout, stderr) = agent_command(
        &lab.node,
        &["run", "--config", config.to_str().expect("utf-8")],
    );
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("a session selects pods: the agent needs its node's name"),
        "{stderr}"
    );
    assert_eq!(
        tcx_programs(&lab.node, "mir0"),
        [Vec::<String>::new(), Vec::new()]
    );
}

#[test]
fn changes_missed_while_the_watch_had_expired_are_applied_from_the_new_list() {
    let lab = Lab::new("podsrelist");
    let api = FakeApi::start(&lab.node);
    let [web1, db1, _other] = first_pods(&lab, &api);
    let files = AgentFiles::new();
    let socket = files.socket.as_str();
    let agent = files.start(&lab, &api, &[]);
    let watched = || {
        let mut interfaces: Vec<String> = attached(&lab.node, socket)
            .into_iter()
            .map(|(i, _)| i)
            .collect();
        interfaces.dedup();
        interfaces
    };
    assert_eq!(watched(), ["vethweb1"]);
    // The watches end and the next one is told its resource version is too old (410), while
    // web-1 is relabelled away and db-1 into the selector: no event carries either change.
    let lists_before = api.lists();
    api.expire_watches_with(|state| {
        let web1 = state.relabelled("web-1", "web-old");
        state.put(web1);
        let db1 = state.relabelled("db-1", "web");
        state.put(db1);
    });
    wait_for("the relisted pods applied", || watched() == ["vethdb1"]);
    assert!(api.lists() > lists_before, "the agent listed again");
    let copies = Capture::open(&lab.mon, "eth0");
    web1.send(b"web-1 relabelled away unseen");
    let kept = db1.send(b"db-1 relabelled in unseen");
    db1.send_sentinel();
    let got: Vec<Vec<u8>> = copies
        .until_sentinel()
        .into_iter()
        .map(|f| f.bytes)
        .collect();
    assert_eq!(got, [kept]);
    agent.stop();
}

#[test]
fn in_pinned_mode_the_next_agent_takes_over_the_pods_interfaces_without_a_gap() {
    let lab = Lab::new("podspinned");
    let bpffs = BpfFs::mount();
    let pins = bpffs.path().join("mirror");
    let pins_arg = pins.to_str().expect("utf-8");
    let api = FakeApi::start(&lab.node);
    let [web1, _db1, _other] = first_pods(&lab, &api);
    let files = AgentFiles::new();
    let start = || files.start(&lab, &api, &["--pin-dir", pins_arg]);
    let first = start();
    let copies = Capture::open(&lab.mon, "eth0");
    let numbered = |seq: u32| pod_frame(&seq.to_be_bytes());
    let traffic = TrafficLoop::start(FrameSender::open(&web1.ns, "eth0"), 40_000, numbered);
    let mut frames = Vec::new();
    let mut copies_past = |n: usize| {
        let target = frames.len() + n;
        wait_for(&format!("{target} copies"), || {
            frames.extend(copies.drain().into_iter().map(|f| f.bytes));
            frames.len() >= target
        });
    };
    copies_past(200);
    first.kill();
    // Nobody runs the agent: the pinned programs on the pod's veth go on.
    copies_past(200);
    // The second agent's first generation already has the pod's veth (it waited for the list):
    // the pinned link is switched in place, never let go.
    let second = start();
    copies_past(200);
    let sent = traffic.finish();
    web1.send_sentinel();
    frames.extend(copies.bytes_until_sentinel());
    println!("{sent} packets sent, {} copies", frames.len());
    assert!(
        frames == (0..sent).map(numbered).collect::<Vec<_>>(),
        "every packet copied once, in order, byte for byte ({sent} sent, {} copies)",
        frames.len()
    );
    second.stop();
    std::fs::remove_dir_all(&pins).expect("remove the pins");
    wait_for("the pod's veth let go", || {
        tcx_programs(&lab.node, "vethweb1") == [Vec::<String>::new(), Vec::new()]
    });
}

#[test]
fn behind_a_bridge_cni_the_selected_pods_port_is_watched_not_the_bridge() {
    let lab = Lab::new("podsbridge");
    let api = FakeApi::start(&lab.node);
    lab.node.ip(&[
        "link",
        "add",
        "cni0",
        "type",
        "bridge",
        "mcast_snooping",
        "0",
    ]);
    // The pods' frames go to the bridge itself (the pods' gateway), so it floods none of them
    // out of the other pods' ports.
    lab.node.ip(&["link", "set", "cni0", "address", HOST_MAC]);
    lab.node
        .ip(&["addr", "add", "10.244.1.1/24", "dev", "cni0"]);
    lab.node.ip(&["link", "set", "cni0", "up"]);
    let web = PodNet::on_bridge(&lab, "vethbra", "10.244.1.10/24", "cni0");
    let db = PodNet::on_bridge(&lab, "vethbrb", "10.244.1.11/24", "cni0");
    api.apply(pod("shop", "web-1", "web", NODE, &["10.244.1.10"]));
    api.apply(pod("shop", "db-1", "db", NODE, &["10.244.1.11"]));
    let files = AgentFiles::new();
    let socket = files.socket.as_str();
    let agent = files.start(&lab, &api, &[]);
    assert_eq!(
        session_hooks(&lab.node, socket, 0),
        ["vethbra/egress", "vethbra/ingress"],
        "web-1's port of the bridge, not the bridge, not db-1's port"
    );
    let copies = Capture::open(&lab.mon, "eth0");
    let kept = web.send(b"web-1 behind the bridge");
    db.send(b"db-1 behind the bridge");
    web.send_sentinel();
    assert_eq!(copies.bytes_until_sentinel(), [kept]);
    // Relabelled: db-1's port, found the same way.
    api.relabel("db-1", "web");
    wait_for("db-1's port watched", || {
        hooks_of(&lab, socket, "vethbrb") == ["egress", "ingress"]
    });
    let kept = db.send(b"db-1 relabelled");
    db.send_sentinel();
    assert_eq!(copies.bytes_until_sentinel(), [kept]);
    agent.stop();
}

#[test]
fn a_pod_session_at_the_xdp_hook_copies_what_the_pod_sends() {
    let lab = Lab::new("podsxdp");
    let api = FakeApi::start(&lab.node);
    let [web1, db1, _other] = first_pods(&lab, &api);
    let files = AgentFiles::new();
    let agent = files.start_with(&lab, &api, "hook = \"xdp\"\n", &[]);
    assert_eq!(session_hooks(&lab.node, &files.socket, 0), ["vethweb1/xdp"]);
    let has_xdp = || {
        lab.node
            .ip(&["-d", "link", "show", "dev", "vethweb1"])
            .contains("prog/xdp")
    };
    assert!(has_xdp(), "an XDP program on web-1's veth");
    let copies = Capture::open(&lab.mon, "eth0");
    let kept = web1.send(b"web-1 through XDP");
    db1.send(b"db-1 not selected");
    web1.send_sentinel();
    assert_eq!(copies.bytes_until_sentinel(), [kept]);
    agent.stop();
    assert!(!has_xdp(), "detached on exit");
}

#[test]
fn an_ad_hoc_capture_of_pods_watches_them_while_it_runs() {
    let lab = Lab::new("podcap");
    let api = FakeApi::start(&lab.node);
    let [web1, db1, _other] = first_pods(&lab, &api);
    let files = AgentFiles::new();
    let agent = files.start(&lab, &api, &[]);
    wait_for("web-1 watched", || {
        hooks_of(&lab, &files.socket, "vethweb1").len() == 2
    });
    assert!(hooks_of(&lab, &files.socket, "vethdb1").is_empty());
    let file = files.dir.path().join("db.pcapng");
    let mut capture = KilledOnDrop(
        std::process::Command::new(agent_binary())
            .args(["capture", "-n", "shop", "-l", "app=db", "--api-socket"])
            .arg(&files.socket)
            .arg("-w")
            .arg(&file)
            .arg("udp")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("capture"),
    );
    wait_for("db-1 watched by the capture", || {
        hooks_of(&lab, &files.socket, "vethdb1") == ["egress", "ingress"]
    });
    let frames: Vec<Vec<u8>> = (0..3u8).map(|i| db1.send(&[i; 20])).collect();
    web1.send(b"not db");
    wait_for("db-1's frames in the file", || {
        file.exists() && capture_file_frames(&file).len() == frames.len()
    });
    let (status, stderr) = capture.interrupt();
    assert!(status.success(), "{stderr}");
    let captured = capture_file_frames(&file);
    assert!(
        captured
            .iter()
            .all(|(name, _)| name.as_deref() == Some("vethdb1 ingress")),
        "{captured:?}"
    );
    let captured: Vec<Vec<u8>> = captured.into_iter().map(|(_, frame)| frame).collect();
    assert_eq!(captured, frames);
    wait_for("db-1 no longer watched", || {
        hooks_of(&lab, &files.socket, "vethdb1").is_empty()
    });
    agent.stop();
}

/// A pod selected by labels shadowed to a Service's address: what a client pod sends the live
/// pod is copied at the live pod's veth, in both directions, and replayed to the shadow, whose
/// requests equal the live pod's. (No kube-proxy here to DNAT a cluster IP: the Service's
/// address is the node's own.)
#[test]
fn a_pod_selected_by_labels_is_shadowed_to_a_service_address() {
    let lab = Lab::new("podshadow");
    let api = FakeApi::start(&lab.node);
    let web1 = PodNet::reachable(&lab, "vethweb1", "10.244.0.10");
    let client = PodNet::reachable(&lab, "vethcli1", "10.244.0.11");
    api.apply(pod("shop", "web-1", "web", NODE, &["10.244.0.10"]));
    api.apply(pod("shop", "client-1", "client", NODE, &["10.244.0.11"]));
    let zero = std::time::Duration::ZERO;
    let live = Origin::start(
        &web1.ns,
        "10.244.0.10:8080".parse().expect("addr"),
        false,
        zero,
    );
    lab.node.ip(&["addr", "add", "10.96.0.20/32", "dev", "lo"]);
    let shadow = Origin::start(
        &lab.node,
        "10.96.0.20:80".parse().expect("addr"),
        false,
        zero,
    );
    let files = AgentFiles::new();
    let agent = files.start_session(
        &lab,
        &api,
        "filter = \"tcp port 8080\"\ntarget = { shadow = { url = \"http://10.96.0.20:80\", compare = true } }\n",
        &[],
    );
    wait_for("web-1's interface watched", || {
        hooks_of(&lab, &files.socket, "vethweb1") == ["egress", "ingress"]
    });
    let at = |path: &str| format!("http://10.244.0.10:8080{path}");
    client.ns.exec(&[
        "curl",
        "-sf",
        "-o",
        "/dev/null",
        &at("/cart"),
        &at("/cart?item=7"),
    ]);
    client.ns.exec(&[
        "curl",
        "-sf",
        "-o",
        "/dev/null",
        "-d",
        "qty=2",
        &at("/order"),
    ]);
    client
        .ns
        .exec(&["ab", "-q", "-k", "-n", "40", "-c", "2", &at("/ab")]);
    let expected = live.received().len();
    assert_eq!(expected, 2 + 1 + 40);
    wait_for("the shadow to get every request", || {
        shadow.received().len() >= expected
    });
    let stats = agent.stop().shadow("web");
    for (field, count) in [
        (&stats["requests"], expected),
        (&stats["replayed"], expected),
        (&stats["compared"]["same"], expected),
    ] {
        assert_eq!(field.as_u64(), Some(count as u64), "{stats}");
    }
    shadow.assert_replayed_from(&live);
}
