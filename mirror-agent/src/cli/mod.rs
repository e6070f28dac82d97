//! What the command line prints: `check`'s plan, and the running agent's status and counters
//! (`status`, `stats`, `stats --watch`) read through its API socket.
pub(crate) mod quick;
pub(crate) mod read;

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    api,
    config::{ActionConfig, LoadedConfig},
    rules::{Plan, plan_on_host},
    state,
    targets::{observe::ServiceView, tunnel::TunnelPath},
};

/// A mistake in the command line (exit code 2, as clap's own).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub(crate) struct UsageError(pub(crate) anyhow::Error);

/// `mirror-agent check`: the plan, and what each session's target allows now.
pub(crate) fn check(config: &std::path::Path, explain: bool) -> anyhow::Result<()> {
    let plan = plan_on_host(&LoadedConfig::read(config)?)?;
    check_plan(&plan, &config.display().to_string(), explain)
}

/// What `check` and `run --check` print of a plan made from `source`: its warnings, with
/// `explain` its kernel rules, what each target allows now, and a summary line.
pub(crate) fn check_plan(plan: &Plan, source: &str, explain: bool) -> anyhow::Result<()> {
    for warning in &plan.warnings {
        eprintln!("warning: {warning}");
    }
    if explain {
        print!("{}", self::explain(plan));
    }
    for session in &plan.sessions {
        if let Some(selector) = &session.pods {
            println!(
                "session `{}`: watches the {selector}: their interfaces are found when the agent runs",
                session.name
            );
        }
        if let Some(line) = session
            .target
            .check()
            .with_context(|| format!("session `{}`", session.name))?
        {
            println!("session `{}`: {line}", session.name);
        }
    }
    println!(
        "{source}: ok: {} session(s), {} rule(s), {} hook(s)",
        plan.sessions.len(),
        plan.rules.len() - plan.sessions.len(),
        plan.sessions
            .iter()
            .map(|s| s.attachments.len())
            .sum::<usize>(),
    );
    Ok(())
}

/// The kernel rules of each session in the order they are tried, one line each, in tcpdump's
/// words: `  filter-1  skip    src host 10.1.2.3`.
pub(crate) fn explain(plan: &Plan) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for (index, session) in plan.sessions.iter().enumerate() {
        let _ = writeln!(out, "session `{}`:", session.name);
        for rule in plan.rules.iter().filter(|r| r.session == index) {
            let action = match rule.action {
                ActionConfig::Mirror => "mirror",
                ActionConfig::Skip => "skip",
            };
            let matches = match &rule.program {
                // Such a rule's fields are all "any": the program decides.
                Some(program) => format!(
                    "what libpcap's program for the filter accepts ({} instructions, as \
                     `tcpdump -d` prints them)",
                    program.insns.len()
                ),
                None => crate::rules::InTcpdumpWords(&rule.fields).to_string(),
            };
            let _ = writeln!(out, "  {:<10} {action:<6} {matches}", rule.kind.to_string());
        }
    }
    out
}

/// Where the running agent's API socket is: named, or found in the configuration file it runs.
#[derive(Debug, clap::Args)]
pub(crate) struct AgentSocket {
    /// The running agent's API socket.
    #[arg(long, env = "MIRROR_API_SOCKET", default_value = api::DEFAULT_SOCKET)]
    api_socket: PathBuf,
    /// Or the configuration file the agent runs: its `api_socket` (the default when it names
    /// none).
    #[arg(long, value_name = "FILE", conflicts_with = "api_socket")]
    config: Option<PathBuf>,
}

impl AgentSocket {
    /// The socket's path.
    pub(crate) fn path(&self) -> anyhow::Result<PathBuf> {
        let Some(config) = &self.config else {
            return Ok(self.api_socket.clone());
        };
        let loaded = LoadedConfig::read(config)?;
        Ok(loaded
            .config
            .api_socket
            .unwrap_or_else(|| api::DEFAULT_SOCKET.into()))
    }
}

/// `mirror-agent capture`'s arguments.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").args(["session", "iface", "namespace", "label"]).required(true).multiple(true)))]
pub(crate) struct CaptureArgs {
    /// The session whose copies to watch (`mirror-agent status` lists them).
    #[arg(long)]
    session: Option<String>,
    /// Or an ad-hoc capture of these interfaces (names or globs; repeatable), both
    /// directions: the agent adds a session of its own while the capture runs.
    #[arg(short = 'i', long, conflicts_with_all = ["session", "namespace", "label"])]
    iface: Vec<String>,
    /// Or an ad-hoc capture of this node's pods in this namespace (with --label: only those
    /// with the labels), through their host-side interfaces, followed as they come and go.
    #[arg(short = 'n', long, conflicts_with = "session")]
    namespace: Option<String>,
    /// With an ad-hoc capture of pods: only those with this label, KEY=VALUE (repeatable).
    #[arg(
        short = 'l',
        long,
        value_name = "KEY=VALUE",
        conflicts_with = "session"
    )]
    label: Vec<String>,
    /// Only the packets this tcpdump filter expression selects, e.g. 'tcp port 443' (the
    /// words are joined). With --session, read by the agent in userspace from the session's
    /// copies (its target is unchanged); with -i or -n/-l, compiled into the capture's kernel
    /// rules (or, beyond them, libpcap's program).
    #[arg(value_name = "FILTER")]
    filter: Vec<String>,
    /// Where the pcapng stream goes: a new file, or `-` for standard output.
    #[arg(short = 'w', long = "write", value_name = "FILE", default_value = "-")]
    write: PathBuf,
    /// Stop after N copies.
    #[arg(short = 'c', long = "count", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: Option<u64>,
    #[command(flatten)]
    socket: AgentSocket,
}

/// `mirror-agent capture`: the live pcapng stream of a session or of an ad-hoc capture into its
/// file until the agent ends it (after `count` copies, or when it stops) or SIGINT/SIGTERM.
pub(crate) async fn capture(args: CaptureArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let CaptureArgs {
        session,
        iface,
        namespace,
        label,
        filter,
        write,
        count,
        socket,
    } = args;
    let socket = socket.path()?;
    let (socket, write, filter) = (socket.as_path(), write.as_path(), filter.join(" "));
    let mut query = form_urlencoded::Serializer::new(String::new());
    if let Some(session) = &session {
        query.append_pair("session", session);
    }
    for interface in &iface {
        query.append_pair("interface", interface);
    }
    if let Some(namespace) = &namespace {
        query.append_pair("namespace", namespace);
    }
    for label in &label {
        query.append_pair("label", label);
    }
    if !filter.is_empty() {
        query.append_pair("filter", &filter);
    }
    if let Some(count) = count {
        query.append_pair("count", &count.to_string());
    }
    let path = format!("/capture?{}", query.finish());
    // Created once the agent has said yes: a refused capture leaves no file behind.
    let mut out = None;
    let mut bytes = 0u64;
    // Whole blocks only: an interrupted capture still ends where a reader expects.
    let mut pending = Vec::new();
    let stream = api::bytes_from(socket, &path, |chunk| {
        let file = match &mut out {
            Some(file) => file,
            None => out.insert(crate::targets::file::create_output(write)?),
        };
        pending.extend_from_slice(chunk);
        let whole = whole_blocks(&pending);
        file.write_all(&pending[..whole])
            .with_context(|| format!("writing {}", write.display()))?;
        pending.drain(..whole);
        bytes += whole as u64;
        Ok(true)
    });
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        ended = stream => ended?,
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
    if let Some(file) = &mut out {
        file.flush()
            .with_context(|| format!("writing {}", write.display()))?;
    }
    eprintln!("mirror-agent capture: {bytes} bytes of pcapng");
    Ok(())
}

/// How many bytes at the start of `stream` (pcapng, from its section header on) are whole
/// blocks. The section header's byte-order magic tells how the lengths are written.
fn whole_blocks(stream: &[u8]) -> usize {
    const BYTE_ORDER_MAGIC: u32 = 0x1a2b_3c4d;
    let word = |at: usize, big: bool| {
        let bytes: [u8; 4] = stream.get(at..at + 4)?.try_into().ok()?;
        Some(if big {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        })
    };
    let Some(big) = word(8, true).map(|magic| magic == BYTE_ORDER_MAGIC) else {
        return 0;
    };
    let mut whole = 0;
    // A block's total length is its second word (at least 12 bytes: type, length, length).
    while let Some(len) = word(whole + 4, big).filter(|len| *len >= 12) {
        let end = whole + len as usize;
        if end > stream.len() {
            break;
        }
        whole = end;
    }
    whole
}

/// `mirror-agent status --all`: each socket in the default folder, and its agent's status (or
/// why it does not answer: a killed agent's socket stays until the next one on it).
pub(crate) async fn show_every_status(json: bool) -> anyhow::Result<()> {
    let sockets = api::sockets_in_default_dir()?;
    if sockets.is_empty() && !json {
        println!("no agent socket in {}", api::SOCKET_DIR);
    }
    for socket in sockets {
        let answer = api::get_from(&socket, "/status").await;
        if json {
            let line = match answer {
                Ok(body) => serde_json::json!({
                    "socket": socket,
                    "status": serde_json::from_str::<serde_json::Value>(&body)
                        .context("the agent's /status")?,
                }),
                Err(e) => serde_json::json!({ "socket": socket, "error": format!("{e:#}") }),
            };
            println!("{line}");
            continue;
        }
        println!("{}:", socket.display());
        match answer {
            Ok(body) => print_status(&body)?,
            Err(e) => println!("not answering: {e:#}"),
        }
    }
    Ok(())
}

/// `mirror-agent status`.
pub(crate) async fn show_status(socket: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let body = api::get_from(socket, "/status").await?;
    if json {
        println!("{body}");
        return Ok(());
    }
    print_status(&body)
}

/// A `/status` answer in lines.
fn print_status(body: &str) -> anyhow::Result<()> {
    let status: state::Status = serde_json::from_str(body).context("the agent's /status")?;
    println!(
        "mirror-agent {}: up {} s, configuration generation {}, {} hook(s) attached",
        status.version, status.uptime_seconds, status.generation, status.hooks_attached
    );
    let programs: Vec<String> = status
        .programs
        .iter()
        .map(|(name, id)| format!("{name}={id}"))
        .collect();
    println!("programs: {}", programs.join(" "));
    let attached: Vec<String> = status
        .attached
        .iter()
        .map(|(interface, direction)| format!("{interface}/{direction}"))
        .collect();
    println!("attached: {}", attached.join(" "));
    for session in &status.sessions {
        let hooks: Vec<String> = session
            .hooks
            .iter()
            .map(|(interface, direction)| format!("{interface}/{direction}"))
            .collect();
        println!(
            "session {:<16} -> {:<32} watching {}",
            session.name,
            session.target,
            hooks.join(" ")
        );
    }
    for pod in &status.pods {
        let ips: Vec<String> = pod.ips.iter().map(ToString::to_string).collect();
        let place = match (&pod.interface, &pod.problem) {
            (Some(interface), _) => format!("-> {interface}"),
            (None, problem) => format!("not watched: {}", problem.as_deref().unwrap_or("?")),
        };
        println!(
            "pod {:<32} {:<24} {place} (sessions {})",
            pod.pod,
            ips.join(","),
            pod.sessions.join(",")
        );
    }
    for tunnel in &status.tunnels {
        let path = match &tunnel.path {
            TunnelPath::Hop {
                interface,
                next_hop_mac,
            } => format!("leaves {interface} for {next_hop_mac}"),
            TunnelPath::None { problem } => format!("no path: {problem}"),
        };
        println!("tunnel {:<16} {} {path}", tunnel.session, tunnel.target);
    }
    Ok(())
}

/// `mirror-agent stats --watch --json`: the API's stream, one JSON line per reading.
pub(crate) async fn stream_stats(
    socket: &std::path::Path,
    interval: f64,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let path = format!(
        "/stats/stream?interval_ms={}",
        Duration::from_secs_f64(interval).as_millis()
    );
    let mut seen = 0;
    api::stream_from(socket, &path, |line| {
        println!("{line}");
        seen += 1;
        count.is_none_or(|n| seen < n)
    })
    .await
}

/// `--interval`: seconds, 0.1 to an hour (a period a `Duration` holds; NaN and infinities refused).
pub(crate) fn refresh_interval(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|seconds| (0.1..=3600.0).contains(seconds))
        .ok_or_else(|| format!("`{text}` is not a number of seconds from 0.1 to 3600"))
}

/// `mirror-agent stats`: one table, or with `watch` one every `interval` seconds with rates.
pub(crate) async fn show_stats(
    socket: &std::path::Path,
    json: bool,
    watch: bool,
    interval: f64,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let fetch = || async {
        let body = api::get_from(socket, "/stats").await?;
        serde_json::from_str::<state::Stats>(&body)
            .map(|stats| (body, stats))
            .context("the agent's /stats")
    };
    let (body, mut previous) = fetch().await?;
    if json {
        println!("{body}");
        return Ok(());
    }
    print!("{}", stats_table(&previous, None));
    if !watch {
        return Ok(());
    }
    let period = Duration::from_secs_f64(interval);
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut shown = 1;
    while count.is_none_or(|n| shown < n) {
        shown += 1;
        tokio::select! {
            _ = sigint.recv() => return Ok(()),
            () = tokio::time::sleep(period) => {}
        }
        let (_, stats) = fetch().await?;
        let table = stats_table(&stats, Some((&previous, period)));
        if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            // Clear the screen and redraw.
            print!("\x1b[2J\x1b[H{table}");
        } else {
            // Into a file or a pipe: one table after the other, no terminal codes.
            print!("\n{table}");
        }
        previous = stats;
    }
    Ok(())
}

/// The per-second rate of a counter that went from `then` to `now` over `period`, for a table
/// cell: `-` without an earlier reading.
#[expect(
    clippy::cast_precision_loss,
    reason = "a rate on screen needs no more than 52 bits"
)]
fn per_second(now: u64, then: Option<(u64, Duration)>) -> String {
    then.map_or_else(
        || "-".to_owned(),
        |(then, period)| {
            format!(
                "{:.0}",
                now.saturating_sub(then) as f64 / period.as_secs_f64()
            )
        },
    )
}

/// Sessions × seen (every packet the session decided) / skipped (by a skip rule or the default) /
/// mirrored / not sent (copies selected but not made, for any reason), with per-second rates
/// against `previous`.
fn stats_table(stats: &state::Stats, previous: Option<(&state::Stats, Duration)>) -> String {
    use std::fmt::Write as _;
    // As wide as the longest session name: columns stay aligned.
    let width = stats
        .sessions
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0)
        .max(16);
    let mut out = format!(
        "{:<width$} {:>14} {:>14} {:>14} {:>12} {:>12} {:>12} {:>12}\n",
        "session", "seen", "skipped", "mirrored", "not_sent", "seen/s", "mirrored/s", "not_sent/s"
    );
    for session in &stats.sessions {
        let c = &session.counters;
        let skipped: u64 = session
            .rules
            .iter()
            .filter(|r| r.action == ActionConfig::Skip)
            .map(|r| r.counters.matched)
            .sum();
        let before = previous
            .and_then(|(p, _)| p.sessions.iter().find(|s| s.name == session.name))
            .map(|s| s.counters);
        let rate = |now: u64, then: Option<u64>| per_second(now, then.zip(previous.map(|p| p.1)));
        let _ = writeln!(
            out,
            "{:<width$} {:>14} {:>14} {:>14} {:>12} {:>12} {:>12} {:>12}",
            session.name,
            c.matched,
            skipped,
            c.mirrored,
            c.not_sent(),
            rate(c.matched, before.map(|b| b.matched)),
            rate(c.mirrored, before.map(|b| b.mirrored)),
            rate(c.not_sent(), before.map(|b| b.not_sent())),
        );
    }
    out + &service_table(stats, previous)
}

/// Observed sessions × services: requests and errors (5xx or unanswered) with their rates, and
/// the median and 99th percentile of their durations (over the last period when watching).
fn service_table(stats: &state::Stats, previous: Option<(&state::Stats, Duration)>) -> String {
    use std::fmt::Write as _;
    let observed: Vec<_> = stats
        .sessions
        .iter()
        .filter_map(|s| Some((s, s.http.as_ref()?)))
        .collect();
    if observed.is_empty() {
        return String::new();
    }
    let width = observed
        .iter()
        .flat_map(|(s, http)| {
            std::iter::once(s.name.len()).chain(http.services.iter().map(|v| v.service.len()))
        })
        .max()
        .unwrap_or(0)
        .max(16);
    let mut out = format!(
        "\n{:<width$} {:<width$} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
        "session", "service", "requests", "errors", "req/s", "errors/s", "p50_ms", "p99_ms"
    );
    for (session, http) in observed {
        let earlier = previous.and_then(|(p, period)| {
            let then = p.sessions.iter().find(|s| s.name == session.name)?;
            Some((then.http.as_ref()?, period))
        });
        for service in &http.services {
            let before = earlier.map(|(then, period)| {
                let then = then.services.iter().find(|s| s.service == service.service);
                (then.cloned().unwrap_or_default(), period)
            });
            let rate = |now: u64, then: fn(&ServiceView) -> u64| {
                per_second(now, before.as_ref().map(|(b, period)| (then(b), *period)))
            };
            let latency = match &before {
                Some((b, _)) => service.duration.since(&b.duration),
                None => service.duration.clone(),
            };
            let ms = |q: f64| {
                latency
                    .quantile(q)
                    .map_or_else(|| "-".to_owned(), |s| format!("{:.2}", s * 1e3))
            };
            let _ = writeln!(
                out,
                "{:<width$} {:<width$} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10}",
                session.name,
                service.service,
                service.total(),
                service.errors(),
                rate(service.total(), ServiceView::total),
                rate(service.errors(), ServiceView::errors),
                ms(0.5),
                ms(0.99),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_capture_is_written_in_whole_blocks() {
        let mut pcapng = crate::targets::file::PcapNgStream::new(Vec::new()).expect("header");
        let header_len = pcapng.out().len();
        for frame in [[1u8; 60], [2; 60]] {
            pcapng
                .write(
                    1,
                    || "eth0 ingress".into(),
                    std::time::Duration::ZERO,
                    &frame,
                    60,
                )
                .expect("frame");
        }
        let stream = pcapng.out().clone();
        assert_eq!(super::whole_blocks(&stream), stream.len());
        // Cut anywhere, the whole blocks before the cut are kept and nothing after.
        let ends: Vec<usize> = (0..=stream.len())
            .map(|cut| super::whole_blocks(&stream[..cut]))
            .collect();
        assert_eq!(ends[header_len - 1], 0);
        assert_eq!(ends[header_len], header_len);
        assert!(ends.windows(2).all(|w| w[0] <= w[1]));
        assert!(ends.iter().enumerate().all(|(cut, end)| *end <= cut));
        let boundaries: std::collections::BTreeSet<usize> = ends.into_iter().collect();
        assert_eq!(boundaries.len(), 5, "header, interface, two packets, and 0");
    }

    #[test]
    fn the_stats_table_fits_long_session_names() {
        let session = |name: &str| crate::state::SessionStats {
            name: name.to_owned(),
            counters: mirror_common::Counters {
                matched: 12_345,
                ..mirror_common::Counters::default()
            },
            target: crate::targets::TargetCounters::default(),
            shadow: None,
            http: None,
            rules: Vec::new(),
        };
        let stats = crate::state::Stats {
            sessions: vec![session("a"), session("a-session-name-of-thirty-chars")],
            ..crate::state::Stats::default()
        };
        let table = super::stats_table(&stats, None);
        // What the skip rules (the default among them) decided reads as skipped, not lost.
        let mut dns = session("dns");
        dns.rules = vec![crate::state::RuleStats {
            rule: "default".into(),
            action: crate::config::ActionConfig::Skip,
            counters: mirror_common::Counters {
                matched: 19,
                ..mirror_common::Counters::default()
            },
        }];
        let skipping = super::stats_table(
            &crate::state::Stats {
                sessions: vec![dns],
                ..crate::state::Stats::default()
            },
            None,
        );
        let row: Vec<&str> = skipping
            .lines()
            .nth(1)
            .expect("a row")
            .split_whitespace()
            .collect();
        assert_eq!(row[..5], ["dns", "12345", "19", "0", "0"], "{skipping}");
        let ends: Vec<usize> = table
            .lines()
            .map(|line| {
                let (at, token) = ["seen", "12345"]
                    .iter()
                    .find_map(|t| Some((line.find(t)?, t)))
                    .expect("the column");
                at + token.len()
            })
            .collect();
        assert!(ends.windows(2).all(|w| w[0] == w[1]), "{table}");
    }

    /// Watching an observed session: per service, its rates and errors over the period, and its
    /// quantiles of the period's durations alone.
    #[test]
    fn the_stats_table_shows_each_observed_service() {
        use std::time::Duration;

        use crate::targets::observe::{HttpStats, RequestSeries, ServiceView};
        let reading = |ok: u64, failed: u64, slow: u64| {
            let mut duration = crate::targets::shadow::Latency::default();
            for _ in 0..ok + failed {
                duration.observe(Duration::from_micros(50));
            }
            for _ in 0..slow {
                duration.observe(Duration::from_millis(20));
            }
            let series = |class: &str, count| RequestSeries {
                method: "GET".into(),
                status_class: class.into(),
                route: None,
                grpc_method: None,
                grpc_code: None,
                count,
            };
            crate::state::Stats {
                sessions: vec![crate::state::SessionStats {
                    name: "web".into(),
                    counters: mirror_common::Counters::default(),
                    target: crate::targets::TargetCounters::default(),
                    shadow: None,
                    http: Some(HttpStats {
                        services: vec![ServiceView {
                            service: "10.0.0.2:8080".into(),
                            requests: vec![series("2xx", ok + slow), series("5xx", failed)],
                            duration,
                        }],
                        ..HttpStats::default()
                    }),
                    rules: Vec::new(),
                }],
                ..crate::state::Stats::default()
            }
        };
        let before = reading(100, 0, 0);
        let after = reading(100, 20, 100);
        let table = super::stats_table(&after, Some((&before, Duration::from_secs(2))));
        let row: Vec<&str> = table
            .lines()
            .find(|l| l.contains("10.0.0.2:8080"))
            .expect("the service's row")
            .split_whitespace()
            .collect();
        // 120 new requests in 2 s, 20 of them errors; 100 took 20 ms (in the 10-25 ms bucket).
        assert_eq!(
            row,
            [
                "web",
                "10.0.0.2:8080",
                "220",
                "20",
                "60",
                "10",
                "16.00",
                "24.82"
            ],
            "{table}"
        );
        let first = super::stats_table(&after, None);
        assert!(first.contains("p99_ms"), "{first}");
    }

    /// The completions and the manual come from the command line's own definition, every command
    /// in them.
    #[test]
    fn refresh_intervals_are_bounded() {
        assert_eq!(super::refresh_interval("0.2"), Ok(0.2));
        assert_eq!(super::refresh_interval("3600"), Ok(3600.0));
        for bad in ["1e300", "0.01", "-1", "NaN", "inf", "soon"] {
            assert!(super::refresh_interval(bad).is_err(), "{bad}");
        }
    }
}
