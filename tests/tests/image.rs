//! The agent's container image (`cargo xtask image`, built by `cargo xtask test` on a Debian base
//! made by debootstrap and named in `MIRROR_IMAGE`), run with podman as the Helm chart's
//! `DaemonSet` runs it: the node's network (the lab's node namespace stands in for the host's),
//! exactly the chart's capabilities and container security context (read-only root, no privilege
//! escalation), its seccomp profile, its configuration, and its bpffs, `/run/mirror` and captures
//! mounts. Inside, the agent mirrors real traffic to an interface, a VXLAN tunnel and a capture
//! file, byte for byte, answers the probes, streams a session's copies live to `podman exec …
//! mirror-agent capture` (as `kubectl exec` would), and stops cleanly. The package the host install uses
//! (`cargo xtask deb`, in `MIRROR_DEB`) installs into the same Debian base and runs there.
use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    time::Instant,
};

use k8s_openapi::api::core::v1::Container as PodContainer;
use mirror_tests::{
    BpfFs, COL_V4, Capture, FrameSender, Lab, NODE_SRC_MAC, NODE_UL_V4, SENTINEL_RULE, SRC_MAC,
    api_get, capture_file_frames,
    chart::{Objects, agent_and_config, granted_capabilities, objects, render},
    http_get, is_sentinel, pcap_frames, udp_v4_frame, wait_for,
};

/// The image under test.
fn image() -> String {
    std::env::var("MIRROR_IMAGE").expect(
        "MIRROR_IMAGE names the image: run the tests with `cargo xtask test`, which builds it",
    )
}

/// podman as `cargo xtask image` runs it here: with runc (crun fails on these machines' hybrid
/// cgroups).
fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--runtime", "runc"]);
    command
}

/// `podman run --rm`, with open-file and process limits within the machine's hard limits (the
/// engine's defaults exceed them).
fn podman_run() -> Command {
    let mut command = podman();
    command.args([
        "run",
        "--rm",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
    ]);
    command
}

/// The sessions of the test: copies of UDP at the node's `src0` ingress to an interface and to a
/// capture file (by a filter only libpcap compiles: the image must hold it), and at `sink0` (XDP)
/// to a VXLAN collector.
fn sessions() -> String {
    format!(
        "[[session]]\nname = \"tc\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\ntarget = {{ interface = \"mir0\" }}\n{SENTINEL_RULE}\
         [[session.rule]]\nnumber = 10\naction = \"mirror\"\nproto = \"udp\"\n\
         [[session]]\nname = \"file\"\ninterfaces = [\"src0\"]\ndirection = \"ingress\"\ntarget = {{ file = \"/var/lib/mirror/captures/copies.pcap\" }}\n\
         filter = \"udp dst port 9 or (udp and ip[2:2] > 100)\"\n\
         [[session]]\nname = \"xdp\"\ninterfaces = [\"sink0\"]\nhook = \"xdp\"\ntarget = {{ vxlan = {{ remote = \"{COL_V4}\", vni = 5 }} }}\n{SENTINEL_RULE}"
    )
}

/// The host directories a test gives the container for the chart's host paths and `ConfigMap`.
struct Mounts {
    config: tempfile::TempDir,
    run: tempfile::TempDir,
    captures: tempfile::TempDir,
    bpffs: BpfFs,
}

impl Mounts {
    /// Writes the `ConfigMap`'s file into the configuration directory.
    fn new(config: &str) -> Self {
        let dir = || tempfile::tempdir().expect("temp dir");
        let mounts = Mounts {
            config: dir(),
            run: dir(),
            captures: dir(),
            bpffs: BpfFs::mount(),
        };
        std::fs::write(mounts.config.path().join("config.toml"), config).expect("config");
        mounts
    }

    /// Where the host path `path` of a volume is in this test.
    fn host_path(&self, path: &str) -> &Path {
        match path {
            "/sys/fs/bpf" => self.bpffs.path(),
            "/run/mirror" => self.run.path(),
            "/var/lib/mirror/captures" => self.captures.path(),
            other => panic!("a host path the test does not provide: {other}"),
        }
    }
}

/// `podman run` options, image and arguments for the agent's container as the chart describes it, in `node`'s
/// network, with `seccomp` (None: the engine's default profile, which is what `RuntimeDefault`
/// means to it).
fn run_arguments(
    objects: &Objects,
    lab: &Lab,
    mounts: &Mounts,
    seccomp: Option<&Path>,
) -> Vec<String> {
    let pod = objects.agent_pod();
    assert_eq!(pod.host_network, Some(true));
    let (agent, _) = agent_and_config(objects);
    let security = agent.security_context.as_ref().expect("a security context");
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.seccomp_profile.as_ref().map(|p| p.type_.as_str()),
        Some("RuntimeDefault")
    );
    let capabilities: Vec<String> = granted_capabilities(agent)
        .iter()
        .map(|c| c.trim_start_matches('+').to_uppercase())
        .collect();
    let mut args: Vec<String> = [
        "--read-only",
        "--security-opt",
        "no-new-privileges",
        "--cap-drop",
        "all",
        "--cap-add",
        &capabilities.join(","),
        "--network",
        &format!("ns:/run/netns/{}", lab.node.name),
    ]
    .map(str::to_owned)
    .to_vec();
    if let Some(profile) = seccomp {
        args.extend([
            "--security-opt".into(),
            format!("seccomp={}", profile.display()),
        ]);
    }
    for mount in agent.volume_mounts.iter().flatten() {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .expect("the mount's volume");
        let source = if volume.config_map.is_some() {
            mounts.config.path()
        } else {
            let host = volume.host_path.as_ref().expect("a host path");
            mounts.host_path(&host.path)
        };
        let read_only = if mount.read_only == Some(true) {
            ":ro"
        } else {
            ""
        };
        args.extend([
            "--volume".into(),
            format!("{}:{}{read_only}", source.display(), mount.mount_path),
        ]);
    }
    args.extend(
        environment(agent)
            .into_iter()
            .flat_map(|e| ["--env".into(), e]),
    );
    args.push(image());
    // The kubelet expands $(NODE_IP) from status.hostIP: the node's underlay address here.
    args.extend(
        agent
            .args
            .iter()
            .flatten()
            .map(|a| a.replace("$(NODE_IP)", &NODE_UL_V4.to_string())),
    );
    args
}

/// The container's environment as the kubelet would give it (the downward API's fields
/// resolved to the lab's node).
fn environment(agent: &PodContainer) -> Vec<String> {
    agent
        .env
        .iter()
        .flatten()
        .map(|variable| {
            let field = variable
                .value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str());
            let value = match field {
                Some("status.hostIP") => NODE_UL_V4.to_string(),
                Some("spec.nodeName") => "lab-node".to_owned(),
                Some(other) => panic!("a field the test does not provide: {other}"),
                None => variable.value.clone().unwrap_or_default(),
            };
            format!("{}={value}", variable.name)
        })
        .collect()
}

/// A container of the image, in the foreground of `podman run`; removed on drop.
struct Container {
    name: String,
    child: Child,
    stdout: BufReader<ChildStdout>,
    stderr: std::process::ChildStderr,
}

impl Container {
    /// `podman run` with `args`, as a container named after `lab` (one per test).
    fn run(lab: &Lab, args: &[String]) -> Self {
        let name = format!("mirror-test-{}", lab.node.name);
        let mut child = podman_run()
            .args(["--name", &name])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("podman (from `cargo xtask setup`)");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let stderr = child.stderr.take().expect("stderr");
        Container {
            name,
            child,
            stdout,
            stderr,
        }
    }

    /// The agent's first line on stdout ("attached to …"), or "" when it exited first.
    fn first_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("the agent's output");
        line
    }

    /// Waits for the container's end: (success, stdout's rest, stderr).
    fn finish(mut self) -> (bool, String, String) {
        let mut out = String::new();
        let mut err = String::new();
        self.stdout.read_to_string(&mut out).expect("stdout");
        self.stderr.read_to_string(&mut err).expect("stderr");
        let status = self.child.wait().expect("podman run");
        (status.success(), out, err)
    }

    /// SIGTERM, as the kubelet stops a pod, with the chart's grace period as podman's timeout.
    fn stop(self) -> (bool, String, String) {
        let stopped = podman()
            .args(["stop", "--time", "30", &self.name])
            .output()
            .expect("podman stop");
        assert!(stopped.status.success(), "{stopped:?}");
        self.finish()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time", "0", &self.name])
            .output();
    }
}

/// The engine's own default profile, changed as containerd 1.7+ and Docker 23+ have theirs:
/// `bpf` and `perf_event_open` allowed with `CAP_BPF` and `CAP_PERFMON` (and still with
/// `CAP_SYS_ADMIN`), nothing else changed. That is what `RuntimeDefault` is on those runtimes.
fn runtime_default_with_cap_bpf(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string("/usr/share/containers/seccomp.json")
        .expect("podman's default seccomp profile (containers-common)");
    let mut profile: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let gated = [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")];
    let rules = profile["syscalls"].as_array_mut().expect("syscalls");
    for rule in rules.iter_mut() {
        let names = rule["names"].as_array_mut().expect("names");
        names.retain(|n| !gated.iter().any(|(syscall, _)| n == syscall));
    }
    rules.retain(|rule| !rule["names"].as_array().is_some_and(Vec::is_empty));
    for (syscall, capability) in gated {
        for allowed_with in [capability, "CAP_SYS_ADMIN"] {
            rules.push(serde_json::json!({
                "names": [syscall],
                "action": "SCMP_ACT_ALLOW",
                "includes": { "caps": [allowed_with] },
            }));
        }
    }
    let path = dir.join("runtime-default-cap-bpf.json");
    std::fs::write(&path, profile.to_string()).expect("write the profile");
    path
}

/// The chart's objects with the test's sessions.
fn chart_objects() -> Objects {
    let sessions = serde_json::to_string(&sessions()).expect("JSON string");
    objects(&render(&["--set-json", &format!("sessions={sessions}")]))
}

#[test]
fn the_image_mirrors_with_the_chart_security_context_and_a_runtime_default_profile() {
    let lab = Lab::with_collector("image", 1500);
    let objects = chart_objects();
    let (_, config) = agent_and_config(&objects);
    let mounts = Mounts::new(config);
    let profiles = tempfile::tempdir().expect("temp dir");
    let profile = runtime_default_with_cap_bpf(profiles.path());
    let started = Instant::now();
    let mut container = Container::run(
        &lab,
        &run_arguments(&objects, &lab, &mounts, Some(&profile)),
    );
    let line = container.first_line();
    assert!(
        line.contains("attached to"),
        "{line:?}: {:?}",
        container.finish()
    );
    eprintln!(
        "the container attached {:.2} s after `podman run`",
        started.elapsed().as_secs_f64()
    );
    // The kubelet's probes, on the node's IP.
    let metrics: SocketAddr = (NODE_UL_V4, 9477).into();
    for path in ["/healthz", "/readyz"] {
        let (status, body) = http_get(&lab.node, metrics, path);
        assert!(status.contains(" 200 "), "{path}: {status} {body}");
    }

    // `kubectl exec ds/mirror-agent -- mirror-agent capture …`: the chart's environment names
    // the API socket. Three copies of session `tc`, as pcapng on standard output.
    let watcher = podman()
        .args(["exec", &container.name])
        .args([
            "mirror-agent",
            "capture",
            "--session",
            "tc",
            "-c",
            "3",
            "-w",
            "-",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("podman exec");
    let socket = mounts.host_path("/run/mirror").join("agent.sock");
    wait_for("the capture in the container", || {
        api_get(socket.to_str().expect("path"), "/status").contains("\"captures\":[{")
    });

    let copies = Capture::open(&lab.mon, "eth0");
    let wire = Capture::open(lab.col(), "eth0");
    let frames: Vec<Vec<u8>> = (0..3u8)
        .map(|i| udp_v4_frame(SRC_MAC, NODE_SRC_MAC, 7000, &[i; 100]))
        .collect();
    let src = FrameSender::open(&lab.src, "eth0");
    for frame in &frames {
        src.send(frame);
    }
    src.send_sentinel(SRC_MAC, NODE_SRC_MAC);
    let at_interface: Vec<Vec<u8>> = copies
        .until_sentinel()
        .into_iter()
        .map(|f| f.bytes)
        .collect();
    assert_eq!(at_interface, frames, "the interface's copies");
    lab.expect_sink_sentinel_tunnelled(&wire);
    let captured = watcher.wait_with_output().expect("podman exec");
    assert!(
        captured.status.success(),
        "{}",
        String::from_utf8_lossy(&captured.stderr)
    );
    let streamed = mounts.captures.path().join("live.pcapng");
    std::fs::write(&streamed, &captured.stdout).expect("the stream");
    let streamed: Vec<Vec<u8>> = capture_file_frames(&streamed)
        .into_iter()
        .map(|(_, frame)| frame)
        .collect();
    assert_eq!(streamed, frames, "the live capture's copies");

    let (stopped, report, stderr) = container.stop();
    assert!(stopped, "{report}{stderr}");
    assert!(report.contains("session  file"), "{report}");
    let mut written = pcap_frames(&mounts.captures.path().join("copies.pcap"));
    assert!(
        written.pop().is_some_and(|f| is_sentinel(&f)),
        "the sentinel last"
    );
    assert_eq!(written, frames, "the capture file's copies");
}

/// Under the engine's own default profile (podman's and CRI-O's: bpf(2) only with
/// `CAP_SYS_ADMIN`) the agent cannot load its programs; it says that seccomp is why, and what the
/// profile must allow, and exits with nothing attached.
#[test]
fn under_a_profile_that_refuses_bpf_the_agent_names_seccomp() {
    let lab = Lab::with_collector("imgsec", 1500);
    let objects = chart_objects();
    let (_, config) = agent_and_config(&objects);
    let mounts = Mounts::new(config);
    let mut container = Container::run(&lab, &run_arguments(&objects, &lab, &mounts, None));
    let line = container.first_line();
    assert_eq!(line, "", "attached under a profile that refuses bpf");
    let (ok, _, stderr) = container.finish();
    assert!(!ok);
    for said in [
        "bpf(2) was refused while this process runs under a seccomp filter",
        "CAP_BPF and CAP_PERFMON",
        "seccompProfile",
    ] {
        assert!(stderr.contains(said), "{said} in {stderr}");
    }
}

/// The image is small: the base and the binary, nothing else.
#[test]
fn the_image_holds_the_base_and_the_binary_only() {
    let size = |name: &str| -> u64 {
        let output = podman()
            .args(["image", "inspect", "--format", "{{.Size}}", name])
            .output()
            .expect("podman image inspect");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("a size")
    };
    let base =
        std::env::var("MIRROR_BASE_IMAGE").expect("MIRROR_BASE_IMAGE, from `cargo xtask test`");
    let added = size(&image()) - size(&base);
    let output = podman_run()
        .args([
            "--entrypoint",
            "stat",
            &image(),
            "-c",
            "%s",
            "/usr/local/bin/mirror-agent",
        ])
        .output()
        .expect("podman run");
    let binary: u64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{output:?}"));
    eprintln!(
        "image: {} MB = base {} MB + {} MB (binary {} MB)",
        size(&image()) / 1_000_000,
        size(&base) / 1_000_000,
        added / 1_000_000,
        binary / 1_000_000
    );
    // One layer of the binary (and its directory entries).
    assert!(
        added.abs_diff(binary) < 64 * 1024,
        "{added} added for a {binary}-byte binary"
    );
}

/// The host install's package installs into a bare Debian (the bootstrapped base) and runs
/// there: the binary, the systemd unit, completions and the manual pages (one per command too)
/// in their places, and libpcap found for a filter beyond the rule tables.
#[test]
fn the_debian_package_installs_and_runs_in_a_bare_debian() {
    let package =
        PathBuf::from(std::env::var("MIRROR_DEB").expect("MIRROR_DEB, from `cargo xtask test`"));
    let base =
        std::env::var("MIRROR_BASE_IMAGE").expect("MIRROR_BASE_IMAGE, from `cargo xtask test`");
    let name = package
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a name");
    let script = format!(
        "dpkg -i /deb/{name} >/dev/null && mirror-agent --version && \
         for f in /usr/bin/mirror-agent /lib/systemd/system/mirror-agent.service \
           /usr/share/bash-completion/completions/mirror-agent \
           /usr/share/zsh/vendor-completions/_mirror-agent \
           /usr/share/fish/vendor_completions.d/mirror-agent.fish \
           /usr/share/man/man8/mirror-agent.8.gz /usr/share/man/man8/mirror-agent-run.8.gz \
           /usr/share/man/man8/mirror-agent-capture.8.gz; do test -s $f || echo missing $f; done && \
         zcat /usr/share/man/man8/mirror-agent.8.gz | head -c 200 && \
         printf '[[session]]\\nname = \"f\"\\ninterfaces = [\"lo\"]\\nfilter = \"less 100\"\\n\
           target = {{ file = \"/tmp/f.pcap\" }}\\n' > /tmp/f.toml && \
         mirror-agent check --config /tmp/f.toml"
    );
    let output = podman_run()
        .arg("--volume")
        .arg(format!(
            "{}:/deb:ro",
            package.parent().expect("a directory").display()
        ))
        .args([&base, "sh", "-c", &script])
        .output()
        .expect("podman run");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.starts_with(&format!("mirror-agent {}\n", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    assert!(!stdout.contains("missing"), "{stdout}");
    assert!(stdout.contains(".TH mirror-agent 8"), "{stdout}");
    // A filter only libpcap compiles: the package's recommended libpcap is found.
    assert!(stdout.contains("/tmp/f.toml: ok: 1 session(s)"), "{stdout}");
}
