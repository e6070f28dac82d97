//! `cargo xtask <task>`: everything needed to go from a fresh clone to a running, tested mirror.
#[expect(
    clippy::cast_precision_loss,
    clippy::cast_sign_loss,
    reason = "packet counts, rates and durations, far below 2^52 and never negative"
)]
mod bench;
mod image;
mod lab;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "mirror's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (idempotent): nightly rust-src, rustfmt and clippy,
    /// bpf-linker built against nightly's LLVM, cargo-deb, and the Debian tools (podman,
    /// debootstrap, promtool, …) and Helm engine the tests and the lab use.
    Setup {
        /// Only what building the agent needs (nightly rust-src, bpf-linker): what
        /// deploy/Dockerfile runs.
        #[arg(long)]
        build_only: bool,
    },
    /// Build the agent (release), which builds and embeds the eBPF object.
    Build,
    /// Build the agent's container image from deploy/Dockerfile (podman or docker, whichever is
    /// present), with the release binary alone in the build context.
    Image {
        /// The image's name.
        #[arg(long, default_value = mirror_tests::chart::DEFAULT_IMAGE)]
        tag: String,
        /// The base image (a build argument; the Dockerfile's default is a registry's
        /// debian:bookworm-slim). `bootstrap`: a Debian bookworm base made with debootstrap
        /// and kept as localhost/mirror-base:bookworm-libpcap, for machines without a registry.
        #[arg(long)]
        base: Option<String>,
    },
    /// Build the Debian package (cargo-deb) of the host install: the release binary, the systemd
    /// unit, shell completions and the manual page, in target/debian/.
    Deb,
    /// rustfmt check, and clippy with warnings as errors on the host crates and the eBPF crate.
    Lint,
    /// Setup, lint, the image and the .deb (on a bootstrapped Debian base), then every test: unit
    /// tests and the privileged integration tests (root).
    Test {
        /// Skip the lint step.
        #[arg(long)]
        no_lint: bool,
        /// Cases each property test (the fuzzing of the configuration, the collector's datagrams
        /// and the API's queries) tries; more for a longer hunt, e.g. 1000000.
        #[arg(long, default_value_t = 2000)]
        fuzz_cases: u32,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// A demo in network namespaces: start the agent on examples/lab.toml, send real traffic,
    /// show the copies as tcpdump sees them on the mirror side, then the agent's counters (root).
    /// Installs only what it needs (the toolchain, iproute2, tcpdump, tshark).
    Lab {
        /// Print the agent's final report in full (`run --json`) instead of the summary table.
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks: the cost of mirroring to the primary path, beside tc mirred and daemonlogger;
    /// rule and attach scaling. Writes bench/results/ (root; takes about 10 minutes).
    Bench {
        /// Repetitions per scenario and frame size.
        #[arg(long, default_value_t = 5)]
        reps: usize,
        /// Seconds per repetition.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Offered rate of the CPU-cost runs (packets per second).
        #[arg(long, default_value_t = 100_000)]
        fixed_rate: u64,
        /// A short run: 2 repetitions of 0.5 s, fewer rule and interface counts.
        #[arg(long)]
        quick: bool,
        /// Only the scenarios whose name contains one of these comma-separated texts (e.g.
        /// `baseline,match,vxlan`); `attach` for attach scaling, `pods` for pod-selector sessions,
        /// `tunnels` for every tunnel format paired with tc mirred into vxlan, `hotpath` for the
        /// hot path's targets in pairs (no match against no mirroring, with 1 and 10,000 rules;
        /// one rule against tc u32 with the same match; match-all against tc u32 match-all),
        /// `tap` for tc mirred, the TC path and the XDP path against no mirroring on a tap
        /// (frames written to its file descriptor meet native XDP), `validation` for how long
        /// large rule sets take to validate, `startup` for the quick form's time to attach beside
        /// tcpdump's time to listen, `shadow` for the primary path of an HTTP service with
        /// no shadowing, mirror's shadow and nginx's `mirror` in the path, at rising rates.
        #[arg(long)]
        only: Option<String>,
        /// Offered request rates of the shadow runs, comma-separated (default 1000 to 30000
        /// rps; 1000 and 10000 with --quick).
        #[arg(long, value_delimiter = ',')]
        shadow_rates: Option<Vec<u64>>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup { build_only } => setup::run(build_only),
        Task::Build => build(true).map(drop),
        Task::Image { tag, base } => image::build(&build(true)?, &tag, base.as_deref()),
        Task::Deb => deb(&build(true)?).map(drop),
        Task::Lint => lint(),
        Task::Test {
            no_lint,
            fuzz_cases,
            cargo_args,
        } => test(no_lint, fuzz_cases, &cargo_args),
        Task::Bench {
            reps,
            seconds,
            fixed_rate,
            quick,
            only,
            shadow_rates,
        } => {
            require_root("the benchmarks")?;
            setup::run(false)?;
            setup::bench_tools()?;
            let mut options = if quick {
                bench::Options {
                    reps: 2,
                    seconds: 0.5,
                    fixed_rate,
                    rule_counts: vec![1, 1000],
                    attach_counts: vec![1, 50],
                    pod_counts: vec![10],
                    frame_sizes: vec![60],
                    shadow_rates: vec![1000, 10_000],
                    only,
                }
            } else {
                bench::Options {
                    reps,
                    seconds,
                    fixed_rate,
                    rule_counts: vec![1, 100, 1000, 10_000],
                    attach_counts: vec![1, 100, 500],
                    pod_counts: vec![10, 100, 250],
                    frame_sizes: vec![60, 1400],
                    shadow_rates: vec![1000, 5000, 10_000, 20_000, 30_000],
                    only,
                }
            };
            if let Some(rates) = shadow_rates {
                options.shadow_rates = rates;
            }
            bench::run(&build(true)?, &options)
        }
        Task::Lab { json } => {
            require_root("the lab")?;
            setup::for_lab()?;
            lab::run(&build_quietly()?, json)
        }
    }
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_owned()
}

/// Runs a command in the workspace root, echoing it, failing on a non-zero exit.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("cargo").args(args))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    command.current_dir(root());
    eprintln!("xtask: {command:?}");
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Builds the agent and returns the binary's path.
fn build(release: bool) -> anyhow::Result<PathBuf> {
    let mut args = vec!["build", "--package", "mirror-agent"];
    if release {
        args.push("--release");
    }
    cargo(&args)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("mirror-agent"))
}

/// Builds the release agent with cargo's output kept back unless the build fails: the lab shows
/// the demo, not the replayed build-script lines of a build that had nothing to do.
fn build_quietly() -> anyhow::Result<PathBuf> {
    eprintln!("xtask: building the agent (the first build takes a few minutes)");
    let output = Command::new("cargo")
        .args(["build", "--quiet", "--package", "mirror-agent", "--release"])
        .current_dir(root())
        .output()
        .context("starting cargo")?;
    if !output.status.success() {
        std::io::Write::write_all(&mut std::io::stderr(), &output.stderr)?;
        bail!("building the agent failed: {}", output.status);
    }
    Ok(root().join("target/release/mirror-agent"))
}

fn lint() -> anyhow::Result<()> {
    // rustfmt.toml's import options need the nightly rustfmt.
    cargo(&["+nightly", "fmt", "--all", "--check"])?;
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&[
        "+nightly",
        "clippy",
        "--package",
        "mirror-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ])
}

fn test(no_lint: bool, fuzz_cases: u32, cargo_args: &[String]) -> anyhow::Result<()> {
    require_root("the integration tests")?;
    setup::run(false)?;
    if !no_lint {
        lint()?;
    }
    let agent = build(false)?;
    // The image and the package carry the release binary, as users get them.
    let release = build(true)?;
    image::build(&release, TEST_IMAGE, Some("bootstrap"))?;
    let package = deb(&release)?;
    let mut command = Command::new("cargo");
    command
        .args(["test", "--workspace"])
        .args(cargo_args)
        .env("MIRROR_AGENT_BIN", agent)
        .env("MIRROR_IMAGE", TEST_IMAGE)
        .env("MIRROR_BASE_IMAGE", image::BOOTSTRAPPED_BASE)
        .env("MIRROR_DEB", package)
        .env("PROPTEST_CASES", fuzz_cases.to_string());
    run(&mut command)
}

/// The image the tests run (tests/tests/image.rs).
const TEST_IMAGE: &str = "localhost/mirror-agent:test";

/// Builds the Debian package of `binary` (the release build) and returns its path: shell
/// completions and the manual page generated by the binary, then cargo-deb.
fn deb(binary: &Path) -> anyhow::Result<PathBuf> {
    let assets = root().join("target/release/deb-assets");
    std::fs::create_dir_all(&assets).with_context(|| format!("creating {}", assets.display()))?;
    let generated = |args: &[&str]| -> anyhow::Result<Vec<u8>> {
        let output = Command::new(binary)
            .args(args)
            .output()
            .with_context(|| format!("{} {args:?}", binary.display()))?;
        if !output.status.success() {
            bail!("{} {args:?}: {}", binary.display(), output.status);
        }
        Ok(output.stdout)
    };
    for (shell, file) in [
        ("bash", "mirror-agent.bash"),
        ("zsh", "_mirror-agent"),
        ("fish", "mirror-agent.fish"),
    ] {
        std::fs::write(assets.join(file), generated(&["completions", shell])?)?;
    }
    // mirror-agent(8) and a page per command, mirror-agent-run(8) and on, as the first names them.
    let commands = String::from_utf8(generated(&["man", "--list"])?)?;
    let pages = std::iter::once(None).chain(commands.lines().map(Some));
    for command in pages {
        let (name, args) = match command {
            None => ("mirror-agent".to_owned(), vec!["man"]),
            Some(command) => (format!("mirror-agent-{command}"), vec!["man", command]),
        };
        let manual = assets.join(format!("{name}.8"));
        std::fs::write(&manual, generated(&args)?)?;
        // Debian keeps manual pages compressed; -n leaves out the time, so the package is the
        // same for the same binary.
        run(Command::new("gzip").args(["-9nf"]).arg(&manual))?;
    }
    let out_dir = root().join("target/debian");
    run(Command::new("cargo")
        .args(["deb", "--package", "mirror-agent", "--no-build", "--output"])
        .arg(&out_dir))?;
    let version = env!("CARGO_PKG_VERSION");
    let package = std::fs::read_dir(&out_dir)
        .with_context(|| format!("reading {}", out_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("mirror-agent_{version}-")))
        })
        .with_context(|| format!("no mirror-agent_{version}-*.deb in {}", out_dir.display()))?;
    eprintln!("xtask: built {}", package.display());
    Ok(package)
}

fn require_root(what: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} need root (network namespaces and BPF): run `sudo -E cargo xtask …`");
    }
    Ok(())
}
