//! `cargo xtask setup`: idempotent; each step checks before it installs.
use std::process::Command;

use anyhow::{Context as _, bail};

/// The bpf-linker release known to work with nightly's LLVM 22 and aya 0.14.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-deb, which packages the host install (`cargo xtask deb`).
const CARGO_DEB_VERSION: &str = "3.8.0";
/// Debian packages the tests and the lab use: ip and tc (iproute2), tcpdump (the lab's view),
/// python3-dpkt for the real captures it ships, which the tests replay, tshark, the
/// independent decoder the VXLAN tests check our output with, systemd, whose
/// `systemd-analyze verify` checks the host install's unit, and the Python Prometheus client,
/// whose strict `OpenMetrics` parser checks the metrics, Prometheus (its `promtool` checks and
/// unit-tests the chart's alerts), and podman, runc and debootstrap, which build the image on a
/// bootstrapped base and run it (tests/tests/image.rs), and ping, which the README's five-minute
/// start uses (`tests/tests/first_use.rs`), and curl, ab (apache2-utils) and wrk, the real clients
/// of the shadow tests (`tests/tests/shadow.rs`).
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "curl",
    "apache2-utils",
    "wrk",
    "tcpdump",
    "python3-dpkt",
    "tshark",
    "systemd",
    "python3-prometheus-client",
    "prometheus",
    "podman",
    "runc",
    "debootstrap",
];
/// What the lab needs besides the toolchain: its namespaces, tcpdump on the mirror side and tshark
/// for the files.
const LAB_PACKAGES: &[&str] = &["iproute2", "tcpdump", "tshark"];
/// Helm's own Go engine in a Python wheel (no helm binary is packaged for these machines): the
/// deploy tests render the chart with it (deploy/helm/render.py). Pinned: an alpha project.
const HELM_PYTHON: &str = "helm-python-sdk==0.2.2";

pub fn run(build_only: bool) -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    if !build_only {
        nightly_lint_tools()?;
        debian_packages(DEBIAN_PACKAGES)?;
        origin_servers()?;
        helm_engine()?;
        cargo_deb()?;
    }
    eprintln!("xtask: setup complete");
    Ok(())
}

/// The lab's setup: the toolchain that builds the agent, and [`LAB_PACKAGES`].
pub fn for_lab() -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages(LAB_PACKAGES)
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn step(what: &str, command: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask setup: {what}: {command:?}");
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status}): {command:?}");
    }
    Ok(())
}

fn nightly_sysroot() -> Option<String> {
    output("rustc", &["+nightly", "--print", "sysroot"])
}

fn nightly_rust_src() -> anyhow::Result<()> {
    if nightly_sysroot().is_none() {
        step(
            "installing the nightly toolchain",
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
        )?;
    }
    let sysroot = nightly_sysroot().context("nightly rustc is not usable")?;
    if std::path::Path::new(&sysroot)
        .join("lib/rustlib/src/rust/library/core")
        .exists()
    {
        eprintln!("xtask setup: nightly rust-src present");
    } else {
        step(
            "adding rust-src to nightly",
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        )?;
    }
    Ok(())
}

/// What `cargo xtask lint` runs with nightly: rustfmt (rustfmt.toml's import options are
/// nightly-only) and the eBPF crate's clippy.
fn nightly_lint_tools() -> anyhow::Result<()> {
    if output("cargo", &["+nightly", "fmt", "--version"]).is_some()
        && output("cargo", &["+nightly", "clippy", "--version"]).is_some()
    {
        eprintln!("xtask setup: nightly rustfmt and clippy present");
        return Ok(());
    }
    step(
        "adding rustfmt and clippy to nightly",
        Command::new("rustup").args([
            "component",
            "add",
            "rustfmt",
            "clippy",
            "--toolchain",
            "nightly",
        ]),
    )
}

fn bpf_linker() -> anyhow::Result<()> {
    if output("bpf-linker", &["--version"]).is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        eprintln!("xtask setup: bpf-linker {BPF_LINKER_VERSION} present");
        return Ok(());
    }
    // bpf-linker links against an LLVM; nightly ships one (libLLVM.so.<ver>-rust-…) but without the
    // plain libLLVM.so name the build looks for, so add that link inside nightly's sysroot.
    let sysroot = nightly_sysroot().context("nightly rustc is not usable")?;
    let lib = std::path::Path::new(&sysroot).join("lib");
    let llvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let link = lib.join("libLLVM.so");
    if link.symlink_metadata().is_err() {
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    step(
        "building bpf-linker against nightly's LLVM",
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
            ])
            .args(["--features", "llvm-22"])
            .env("LLVM_PREFIX", &sysroot),
    )
}

fn cargo_deb() -> anyhow::Result<()> {
    if output("cargo", &["deb", "--version"]).is_some_and(|v| v.contains(CARGO_DEB_VERSION)) {
        eprintln!("xtask setup: cargo-deb {CARGO_DEB_VERSION} present");
        return Ok(());
    }
    step(
        "installing cargo-deb",
        Command::new("cargo").args([
            "install",
            "cargo-deb",
            "--locked",
            "--version",
            CARGO_DEB_VERSION,
        ]),
    )
}

fn helm_engine() -> anyhow::Result<()> {
    let version = HELM_PYTHON.split("==").nth(1).unwrap_or_default();
    let installed = output(
        "python3",
        &[
            "-c",
            "import importlib.metadata as m; print(m.version('helm-python-sdk'))",
        ],
    );
    if installed.as_deref() == Some(version) {
        eprintln!("xtask setup: {HELM_PYTHON} present");
        return Ok(());
    }
    step(
        "installing Helm's engine for Python (the chart tests)",
        Command::new("python3").args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--root-user-action=ignore",
            HELM_PYTHON,
        ]),
    )
}

/// The real servers and clients of the observe tests (`tests/tests/observe.rs`, `h2.rs`),
/// installed without starting any service: nginx, whose own log the counts are checked against;
/// nghttpd and h2load for HTTP/2; and Python's gRPC for gRPC calls both ways.
fn origin_servers() -> anyhow::Result<()> {
    let _no_service_starts = NoServiceStarts::new()?;
    debian_packages(&[
        "nginx-light",
        "nghttp2-client",
        "nghttp2-server",
        "python3-grpcio",
    ])
}

/// What `cargo xtask bench` adds: the userspace peer, the chart's font, bpftool (the program's
/// time alone, by a test run), and for the shadow runs nginx (the origin, and its `mirror` module
/// as the in-path peer) and h2load (nghttp2-client), installed without starting nginx's service.
pub fn bench_tools() -> anyhow::Result<()> {
    let _no_service_starts = NoServiceStarts::new()?;
    debian_packages(&[
        "daemonlogger",
        "fonts-dejavu-core",
        "util-linux",
        "bpftool",
        "nginx-light",
        "nghttp2-client",
    ])
}

/// Debian's policy-rc.d hook saying no to every service start while it lives (installing nginx
/// would otherwise start it on port 80 of the host); one already there is left as it is.
struct NoServiceStarts(Option<&'static str>);

impl NoServiceStarts {
    const PATH: &'static str = "/usr/sbin/policy-rc.d";

    fn new() -> anyhow::Result<Self> {
        use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(Self::PATH);
        match created {
            Ok(mut file) => {
                file.write_all(b"#!/bin/sh\n# cargo xtask setup: no service starts\nexit 101\n")
                    .with_context(|| Self::PATH)?;
                Ok(NoServiceStarts(Some(Self::PATH)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(NoServiceStarts(None)),
            Err(e) => Err(e).with_context(|| format!("creating {}", Self::PATH)),
        }
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            output("dpkg-query", &["-W", "-f=${Status}", p])
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!(
            "xtask setup: Debian packages present: {}",
            packages.join(" ")
        );
        return Ok(());
    }
    step(
        "updating apt",
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    step(
        "installing Debian packages",
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
