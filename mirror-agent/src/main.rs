//! mirror-agent: mirrors the packets that match a session's rules to a target interface, a tunnel
//! to a collector (VXLAN, GENEVE, GRE, ERSPAN) or a capture file, using TC and XDP eBPF programs.
//! `run` applies a configuration until SIGINT/SIGTERM; `check` only validates one; `collect`
//! receives tunnelled copies into a pcap file or an interface.
#![deny(unsafe_code)]
mod api;
mod cli;
mod collect;
mod config;
mod daemon;
mod datapath;
mod encap;
mod follow;
mod rules;
mod state;
#[expect(unsafe_code, reason = "the agent's unsafe code is here, and only here")]
mod sys;
mod targets;
mod task;
mod values;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum as _};

use crate::{
    cli::{
        UsageError,
        quick::{QuickSession, select_from_file, tcpdump_advice},
    },
    config::LoadedConfig,
    datapath::KernelLog,
};

/// Port mirroring for Linux nodes with eBPF: copies the packets that match a session's rules from
/// the watched interfaces to a target interface, a collector (VXLAN, GENEVE, GRE or ERSPAN) or a
/// capture file, without touching the original packets.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Attach and mirror until SIGINT or SIGTERM, then detach everything and print the counters.
    ///
    /// Sessions with `pods = { namespace, labels }` watch the pods of this node (`--node-name`)
    /// through their host-side interfaces, followed as pods come, are relabelled and go.
    ///
    /// With `--config FILE`, the agent applies the file again on SIGHUP, on `mirror-agent reload`
    /// and when the file changes (checked every second, symlink swaps included): an invalid file
    /// is rejected with the reason and the running configuration stays; a valid one replaces it
    /// atomically per hook. Or the quick form for one session:
    /// `mirror-agent run --iface eth0 --to mirror0 --proto tcp --dst-port 443`, or
    /// `mirror-agent run --iface eth0 --to-vxlan 192.0.2.10 --vni 7` (also `--to-geneve`,
    /// `--to-gre`, `--to-erspan`).
    Run(Box<RunArgs>),
    /// Validate a configuration against this host's interfaces and routes; exit 1 with
    /// <file:line> on errors.
    Check {
        /// The configuration file (TOML; see examples/).
        #[arg(long)]
        config: PathBuf,
        /// Print the kernel rules each session became, in the order they are tried (filter
        /// expressions, and rules with `host` or `port`, become several).
        #[arg(long)]
        explain: bool,
    },
    /// Receive tunnelled copies (VXLAN, GENEVE, GRE, ERSPAN; from this agent or any other
    /// source): write the inner frames to a pcap/pcapng file and/or send them out of an
    /// interface, count them per stream and ERSPAN's lost copies.
    Collect(Box<collect::CollectArgs>),
    /// Watch a session of the running agent live, or interfaces (-i) or pods (-n/-l) with an
    /// ad-hoc filter: the copies as pcapng, through the agent's API socket, until interrupted (or
    /// -c copies):
    /// `mirror-agent capture --session web -w - | wireshark -k -i -`, `mirror-agent capture -i
    /// eth0 -w - 'port 443'`. In Kubernetes: `kubectl exec ds/mirror-agent -- mirror-agent capture
    /// --session web -w - | wireshark -k -i -`. Nothing is added to the datapath while no one
    /// watches; a reader that falls behind loses copies (counted in `status`), never the agent
    /// or the session's target.
    Capture(cli::CaptureArgs),
    /// Show what the running agent watches: sessions, targets, hooks (through its API socket).
    Status {
        #[command(flatten)]
        socket: cli::AgentSocket,
        /// Every agent answering in /run/mirror: the one on the default socket and each
        /// quick-form run (`run -i …`), which has a socket of its own.
        #[arg(long, conflicts_with_all = ["api_socket", "config"])]
        all: bool,
        /// Print the API's JSON (with --all: one object per socket, `socket` and `status` or
        /// `error`).
        #[arg(long)]
        json: bool,
    },
    /// Print shell completions (e.g. `mirror-agent completions bash >
    /// /etc/bash_completion.d/mirror-agent`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page, in roff (e.g. `mirror-agent man >
    /// /usr/local/share/man/man8/mirror-agent.8`), or a command's (`mirror-agent man run`, the
    /// page mirror-agent-run(8)).
    Man {
        /// The command whose page to print; none: the page of mirror-agent itself.
        command: Option<String>,
        /// List the commands that have a page of their own, one a line.
        #[arg(long, conflicts_with = "command")]
        list: bool,
    },
    /// Make the running agent apply its configuration file again; prints the new generation, or
    /// why the file was rejected (exit 1; the running configuration stays).
    Reload {
        #[command(flatten)]
        socket: cli::AgentSocket,
    },
    /// Show the running agent's counters per session: seen, skipped, mirrored, not sent (with --watch:
    /// a refreshing table with rates).
    Stats {
        #[command(flatten)]
        socket: cli::AgentSocket,
        /// Print the API's JSON (every counter, per rule too); with --watch, one line per
        /// interval with per-session rates (NDJSON).
        #[arg(long)]
        json: bool,
        /// Refresh every --interval seconds until interrupted (or --count readings).
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes with --watch, 0.1 to 3600.
        #[arg(long, default_value_t = 1.0, value_parser = cli::refresh_interval)]
        interval: f64,
        /// With --watch: stop after this many readings.
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
}

#[derive(Debug, Args)]
#[expect(clippy::struct_excessive_bools, reason = "command-line switches")]
struct RunArgs {
    /// The configuration file (TOML; see examples/).
    #[arg(
        long,
        conflicts_with_all = ["iface", "target"],
        required_unless_present_any = ["target", "iface", "list_interfaces", "read"]
    )]
    config: Option<PathBuf>,
    /// List the interfaces the agent could watch, as `tcpdump -D` does, and exit.
    #[arg(short = 'D', long, conflicts_with_all = ["config", "iface", "target"])]
    list_interfaces: bool,
    #[command(flatten)]
    quick: QuickSession,
    /// Print the kernel rules each session became (on stderr) before attaching.
    #[arg(long)]
    explain: bool,
    /// Check the sessions and print their kernel rules, as `mirror-agent check --explain`
    /// does, then exit without attaching anything: a dry run of a filter, e.g. `run --check
    /// -i eth0 -w x.pcap 'tcp port 443 and not net 10.0.0.0/8'`.
    #[arg(long, conflicts_with = "explain")]
    check: bool,
    /// Seconds between counter log lines; 0 disables them (overrides the file's value).
    #[arg(long)]
    stats_interval: Option<u64>,
    /// The API's Unix socket (overrides the file's `api_socket`; default /run/mirror/agent.sock
    /// with --config, and a socket of the run's own, /run/mirror/run-PID.sock, for the quick
    /// form, so that several run at once: `mirror-agent status --all` lists them).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Serve Prometheus /metrics, /healthz and /readyz here, e.g. 10.0.0.5:9477 (overrides the
    /// file's `metrics_address`). Nothing there asks for credentials: bind it where only the node
    /// and Prometheus reach it.
    #[arg(long)]
    metrics_address: Option<std::net::SocketAddr>,
    /// Serve metrics on this IP address, with the port of --metrics-address or of the file's
    /// `metrics_address` (the Helm chart passes the node's IP here).
    #[arg(long, value_name = "IP")]
    metrics_ip: Option<std::net::IpAddr>,
    /// Serve the read-only JSON routes (/status, /stats, /stats/stream) on the metrics address
    /// too. They show pods, addresses and collectors to anyone who can connect.
    #[arg(long)]
    metrics_json_routes: bool,
    /// Pinned mode: keep the programs and links in this bpffs directory (e.g. /sys/fs/bpf/mirror)
    /// so that they go on mirroring after the agent exits or crashes, and take over what an
    /// earlier agent left there (overrides the file's `pin_dir`). Without it, everything is
    /// detached on exit.
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// The node this agent runs on (Kubernetes): sessions with `pods = {…}` watch the pods
    /// scheduled here. The `DaemonSet` sets `NODE_NAME` from the downward API. The agent talks to
    /// the API (in-cluster, or the KUBECONFIG file) only when a session selects pods.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The kubeconfig file to reach the Kubernetes API with (default: the pod's service account
    /// in a cluster, else KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Log lines from the kernel programs, at this level and above, in the agent's log (target
    /// `kernel`): rule table misses, walks cut at the step limit and failed copies (warn), and
    /// each failed clone (debug). Every such event is counted whatever the level. The level is
    /// fixed when the programs are loaded; `off` removes the log calls from the programs
    /// entirely.
    #[arg(long, value_enum, default_value_t = KernelLog::Off, value_name = "LEVEL")]
    kernel_log: KernelLog,
    /// Print the report at the stop as one JSON document instead of the table: `stats` (as `GET
    /// /stats`, with the targets' transmit losses), `ring` (per session, copies sent on from the
    /// ring and failed), `tunnels` (each tunnel's last hop or problem) and `pinned` (the pin
    /// directory left mirroring, in pinned mode).
    #[arg(long)]
    json: bool,
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            if let Some(advice) = tcpdump_advice(&error) {
                eprintln!("error: {advice}");
                return std::process::ExitCode::from(2);
            }
            error.exit()
        }
    };
    match run_command(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("Error: {error:?}");
            std::process::ExitCode::from(if error.is::<UsageError>() { 2 } else { 1 })
        }
    }
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    let mut filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if let Command::Run(args) = &cli.command
        && let Some(level) = args.kernel_log.to_possible_value()
        && args.kernel_log != KernelLog::Off
    {
        // The programs' lines at the level asked for, whatever RUST_LOG says of the rest.
        filter = filter.add_directive(format!("kernel={}", level.get_name()).parse()?);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        // Colours only for a person at a terminal: not into a container's log or a journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // The daemons handle a closed pipe themselves: `run -w -` counts its copies as refused,
    // and their log goes on. Every other command ends quietly when its reader goes.
    if !matches!(cli.command, Command::Run(_) | Command::Collect(_)) {
        sys::die_on_closed_pipe();
    }
    match cli.command {
        Command::Check { config, explain } => cli::check(&config, explain),
        Command::Completions { shell } => {
            write_completions(shell, &mut std::io::stdout());
            Ok(())
        }
        Command::Man { list: true, .. } => {
            for command in Cli::command().get_subcommands() {
                println!("{}", command.get_name());
            }
            Ok(())
        }
        Command::Man { command, .. } => write_manual(command.as_deref(), &mut std::io::stdout()),
        Command::Run(args) => run(*args),
        Command::Collect(args) => runtime()?.block_on(collect::run(*args)),
        Command::Reload { socket } => runtime()?.block_on(async {
            let answer = api::post_to(&socket.path()?, "/reload").await?;
            let reloaded: state::Reloaded =
                serde_json::from_str(&answer).context("the agent's answer to /reload")?;
            if reloaded.unchanged {
                println!(
                    "unchanged: the file is the applied configuration, generation {}",
                    reloaded.generation
                );
            } else {
                println!("reloaded: configuration generation {}", reloaded.generation);
            }
            Ok(())
        }),
        Command::Capture(args) => runtime()?.block_on(cli::capture(args)),
        Command::Status {
            all: true, json, ..
        } => runtime()?.block_on(cli::show_every_status(json)),
        Command::Status { socket, json, .. } => {
            runtime()?.block_on(cli::show_status(&socket.path()?, json))
        }
        Command::Stats {
            socket,
            json,
            watch,
            interval,
            count,
        } => {
            let runtime = runtime()?;
            let api_socket = socket.path()?;
            if watch && json {
                runtime.block_on(cli::stream_stats(&api_socket, interval, count))
            } else {
                runtime.block_on(cli::show_stats(&api_socket, json, watch, interval, count))
            }
        }
    }
}

/// `mirror-agent run`: the file's configuration or the quick form's, until a stop.
fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.list_interfaces {
        for interface in targets::interface::present().context("listing the interfaces")? {
            println!("{}.{}", interface.ifindex, interface.name);
        }
        return Ok(());
    }
    if let Some(input) = &args.quick.read {
        return select_from_file(input, &args.quick);
    }
    let stop_after = args.quick.count;
    let quick_form = args.config.is_none();
    args.quick.check_file_flags()?;
    let mut loaded = match &args.config {
        Some(path) => LoadedConfig::read(path)?,
        None => LoadedConfig::from_config(args.quick.into_config(), "command line"),
    };
    if let Some(secs) = args.stats_interval {
        loaded.config.stats_interval_secs = secs;
    }
    let metrics = metrics_address(
        args.metrics_address.or(loaded.config.metrics_address),
        args.metrics_ip,
    )?;
    let plan = rules::plan_on_host(&loaded).map_err(|e| {
        // The quick form's mistakes are the command line's.
        let error = anyhow::Error::from(e);
        if args.config.is_none() {
            UsageError(error).into()
        } else {
            error
        }
    })?;
    if args.check {
        let source = args
            .config
            .as_deref()
            .map_or_else(|| "command line".to_owned(), |c| c.display().to_string());
        return cli::check_plan(&plan, &source, true);
    }
    for warning in &plan.warnings {
        tracing::warn!("{warning}");
    }
    if args.explain {
        eprint!("{}", cli::explain(&plan));
    }
    let options = daemon::Options {
        config: args.config,
        stats_interval_secs: loaded.config.stats_interval_secs,
        socket: args
            .api_socket
            .or_else(|| loaded.config.api_socket.clone())
            .unwrap_or_else(|| {
                if quick_form {
                    api::run_socket(std::process::id())
                } else {
                    api::DEFAULT_SOCKET.into()
                }
            }),
        metrics,
        metrics_json: args.metrics_json_routes || loaded.config.metrics_json_routes,
        pin_dir: args.pin_dir.or_else(|| loaded.config.pin_dir.clone()),
        node_name: args.node_name,
        kubeconfig: args.kubeconfig,
        stop_after,
        kernel_log: args.kernel_log,
        json_report: args.json,
        copies_on_stdout: plan.sessions.iter().any(|s| {
            s.target
                .file()
                .is_some_and(targets::file::FileConfig::is_stdout)
        }),
    };
    runtime()?.block_on(daemon::run(&loaded, plan, options))
}

/// The shell completions of every command and flag.
fn write_completions(shell: clap_complete::Shell, out: &mut impl std::io::Write) {
    clap_complete::generate(shell, &mut Cli::command(), "mirror-agent", out);
}

/// The manual page (section 8: a system administration command) of mirror-agent, or of one of
/// its commands (`mirror-agent-run`), in roff.
fn write_manual(command: Option<&str>, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let mut cli = Cli::command();
    cli.build();
    let page = match command {
        None => cli,
        Some(name) => {
            let Some(sub) = cli.find_subcommand(name) else {
                let names: Vec<&str> = cli.get_subcommands().map(clap::Command::get_name).collect();
                return Err(UsageError(anyhow::anyhow!(
                    "no command `{name}` (commands: {})",
                    names.join(", ")
                ))
                .into());
            };
            // Named as the main page's SEE ALSO names it.
            sub.clone().name(format!("mirror-agent-{name}"))
        }
    };
    clap_mangen::Man::new(page)
        .section("8")
        .render(out)
        .context("writing the manual page")
}

/// Standard error for the log, whose failures are ignored: the agent and the collector must not
/// stop because whatever read their log went away (`| head`, a restarted log collector).
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The metrics address of the command line or the file, with --metrics-ip's address.
fn metrics_address(
    address: Option<std::net::SocketAddr>,
    ip: Option<std::net::IpAddr>,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    match (address, ip) {
        (Some(address), Some(ip)) => Ok(Some(std::net::SocketAddr::new(ip, address.port()))),
        (None, Some(_)) => anyhow::bail!(
            "--metrics-ip needs a port: give --metrics-address or the file's metrics_address"
        ),
        (address, None) => Ok(address),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

#[cfg(test)]
mod tests {
    /// The agent's top-level modules in the order the data flows: each may use only those
    /// before it (and `main` all of them).
    const LAYERS: &[&str] = &[
        "sys", "task", "values", "encap", "targets", "config", "rules", "datapath", "state",
        "follow", "api", "daemon", "cli", "collect",
    ];

    /// The top-level modules a source file names through `crate::…`, `use crate::{a, b::…}`
    /// included.
    fn crate_paths(source: &str) -> Vec<String> {
        let code: String = source
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut named = Vec::new();
        for (at, _) in code.match_indices("crate::") {
            let rest = code[at + "crate::".len()..].trim_start();
            if let Some(group) = rest.strip_prefix('{') {
                // The first name of each item at the group's own depth.
                let mut depth = 0;
                let mut item_start = true;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if depth == 0 && item_start && (c.is_alphanumeric() || c == '_') => {
                            let name: String = group[i..]
                                .chars()
                                .take_while(|c| c.is_alphanumeric() || *c == '_')
                                .collect();
                            named.push(name);
                            item_start = false;
                        }
                        _ => {}
                    }
                }
            } else {
                named.push(
                    rest.chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect(),
                );
            }
        }
        named
    }

    /// Every module uses only those above it in [`LAYERS`]: the tree reads as the data flow,
    /// with no cycles.
    #[test]
    fn modules_import_only_those_above_them() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![root.clone()];
        let mut checked = 0;
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(
                    std::fs::read_dir(&path)
                        .expect("a source folder")
                        .map(|e| e.expect("an entry").path()),
                );
                continue;
            }
            let relative = path.strip_prefix(&root).expect("under src");
            let module = relative
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .map(|name| name.trim_end_matches(".rs"))
                .expect("a module");
            if module == "main" || path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let layer = LAYERS
                .iter()
                .position(|m| *m == module)
                .unwrap_or_else(|| panic!("{module} is in no layer"));
            let source = std::fs::read_to_string(&path).expect("a source file");
            for used in crate_paths(&source) {
                let Some(used_layer) = LAYERS.iter().position(|m| *m == used) else {
                    continue;
                };
                assert!(
                    used_layer <= layer,
                    "{} uses `{used}`, which comes after `{module}` in the data flow",
                    relative.display()
                );
            }
            checked += 1;
        }
        assert!(checked > 40, "{checked} files");
        assert_eq!(
            crate_paths("use crate::{a::{b, c}, d, e::f};\nx(crate::g::h);"),
            ["a", "d", "e", "g"]
        );
    }

    /// A session name longer than the usual column keeps the columns aligned.
    #[test]
    fn completions_and_the_manual_cover_every_command() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
        let mut bash = Vec::new();
        super::write_completions(clap_complete::Shell::Bash, &mut bash);
        let bash = String::from_utf8(bash).expect("UTF-8");
        let mut manual = Vec::new();
        super::write_manual(None, &mut manual).expect("rendered");
        let manual = String::from_utf8(manual).expect("UTF-8");
        assert!(
            manual.starts_with(".ie") && manual.contains(".TH mirror-agent 8"),
            "{manual}"
        );
        for command in [
            "run",
            "check",
            "collect",
            "status",
            "reload",
            "stats",
            "completions",
            "man",
        ] {
            assert!(
                bash.contains(&format!("mirror__agent__subcmd__{command}")),
                "{command}"
            );
            assert!(
                manual.contains(&format!("mirror\\-agent\\-{command}(8)")),
                "{command} in {manual}"
            );
            // And the page it names exists.
            let mut page = Vec::new();
            super::write_manual(Some(command), &mut page).expect("rendered");
            let page = String::from_utf8(page).expect("UTF-8");
            assert!(
                page.contains(&format!(".TH mirror-agent-{command} 8")),
                "{command}: {page}"
            );
        }
    }
}
