//! `mirror-agent run`: applies a configuration, serves the API, follows interfaces, reloads the
//! configuration on SIGHUP, `POST /reload` or a change of the file, and on SIGINT/SIGTERM detaches
//! everything (or, in pinned mode, leaves it running for the next agent) and prints the counters.
mod pod_sessions;
mod report;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

use self::pod_sessions::{plan_with_pods, pods_changed, selects_pods};
use crate::{
    api,
    config::{ActionConfig, LoadedConfig, SessionConfig},
    datapath::{Datapath, KernelLog},
    follow,
    follow::pods::{Placement, PodWatch},
    rules::{self, Plan, plan_on_host},
    state::{AdHoc, Applied, Follow, Reloaded, Request, Shared},
    targets::{
        self, TargetConfig, Targets,
        file::OpenFiles,
        ring::{RingDrain, RingSession},
        watch::Watchers,
    },
};

/// How the agent runs, from the command line and the configuration file.
#[derive(Debug)]
pub struct Options {
    /// The file a reload reads again; `None` for the command line's quick form.
    pub config: Option<PathBuf>,
    pub stats_interval_secs: u64,
    /// The API's Unix socket.
    pub socket: PathBuf,
    /// Where Prometheus `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics: Option<std::net::SocketAddr>,
    /// Whether the metrics address serves the read-only JSON routes too.
    pub metrics_json: bool,
    /// Pinned mode: programs and links stay in this bpffs directory after the agent exits, and a
    /// new agent takes them over.
    pub pin_dir: Option<PathBuf>,
    /// The node the agent runs on: pod-selector sessions watch its pods.
    pub node_name: Option<String>,
    /// How to reach the Kubernetes API (default: in-cluster, or `KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    /// Copies are written to standard output (`-w -`): what people read goes to stderr.
    pub copies_on_stdout: bool,
    /// Stop once this many copies went through the ring (`run -c`).
    pub stop_after: Option<u64>,
    /// The programs' log lines to read into the agent's log.
    pub kernel_log: KernelLog,
    /// The stop's report as JSON rather than a table.
    pub json_report: bool,
}

impl Options {
    /// Prints `text` for the person running the agent: on stdout, unless copies go there.
    fn say(&self, text: &str) {
        use std::io::Write as _;
        let written = if self.copies_on_stdout {
            std::io::stderr().write_all(text.as_bytes())
        } else {
            std::io::stdout().write_all(text.as_bytes())
        };
        // Nobody reads it any more (a closed pipe): nothing to tell them.
        drop(written);
    }
}

/// How often the configuration file is checked for a change.
const FILE_CHECK_PERIOD: Duration = Duration::from_secs(1);
/// How often `run -c` looks at the copies sent.
const COUNT_CHECK_PERIOD: Duration = Duration::from_millis(20);
/// How often pods that are selected but have no interface yet are placed again.
const POD_RETRY_PERIOD: Duration = Duration::from_secs(2);

/// Runs `loaded`, whose `plan` was made before (without pods).
pub async fn run(loaded: &LoadedConfig, plan: Plan, options: Options) -> anyhow::Result<()> {
    // Bound before anything is attached: a busy socket or port fails the start cleanly.
    let socket = api::bind_socket(&options.socket)?;
    tracing::info!(
        "API on {} (`mirror-agent status --api-socket {0}`)",
        options.socket.display()
    );
    let result = serve(loaded, plan, &options, socket).await;
    // Removed by the server when it ran; here when the start failed before it did.
    let _ = std::fs::remove_file(&options.socket);
    result
}

/// Waits for the agent's tasks to end after a stop: the servers cut the connections still open
/// after their grace period (see [`api::Limits`]), so this waits a little longer and then
/// aborts whatever is left, so that a stop never waits on a client.
async fn stop_tasks(tasks: Vec<tokio::task::JoinHandle<()>>) {
    let deadline =
        tokio::time::Instant::now() + api::Limits::NETWORK.grace + Duration::from_secs(1);
    for mut task in tasks {
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            task.abort();
            tracing::warn!("a task was still running after the stop's deadline: aborted");
        }
    }
}

/// Starts the agent's tasks: the API servers and the followers of links and tunnel paths.
fn spawn_tasks(
    shared: &Arc<Shared>,
    options: &Options,
    socket: tokio::net::UnixListener,
    metrics: Option<tokio::net::TcpListener>,
    stopped: &tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let link_events = follow::links::subscribe().context("subscribing to link events")?;
    let mut tasks = vec![
        tokio::spawn(api::serve_socket(
            socket,
            options.socket.clone(),
            shared.clone(),
            stopped.clone(),
        )),
        spawn_task(
            "the link follower",
            shared,
            follow::links::run(shared.clone(), link_events, stopped.clone()),
        ),
        spawn_task(
            "the tunnel path follower",
            shared,
            follow::routes::run(shared.clone(), stopped.clone()),
        ),
    ];
    if let Some(listener) = metrics {
        tasks.push(tokio::spawn(api::serve_metrics(
            listener,
            shared.clone(),
            options.metrics_json,
            stopped.clone(),
        )));
    }
    Ok(tasks)
}

/// Runs the task `name`; if it ends with an error, the agent is not ready any more (see
/// [`Shared::task_failed`]).
fn spawn_task(
    name: &'static str,
    shared: &Arc<Shared>,
    task: impl Future<Output = anyhow::Result<()>> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let shared = shared.clone();
    tokio::spawn(async move {
        if let Err(e) = task.await {
            shared.task_failed(name, &e);
        }
    })
}

/// Where ring copies go besides interfaces and tunnels, kept across reloads: the files of file
/// targets, and the watchers of live captures.
#[derive(Debug, Default)]
struct Outputs {
    files: OpenFiles,
    watchers: Arc<Watchers>,
}

/// What the agent applies now, next to what the API shares.
struct Daemon<'a> {
    options: &'a Options,
    shared: Arc<Shared>,
    /// The applied plan (without its compiled tables).
    plan: Plan,
    /// The capture files of file targets and the live captures' watchers, across reloads.
    outputs: Arc<Outputs>,
    /// The node's pods, once a configuration has a pod-selector session.
    pods: Option<PodWatch>,
    /// Where each pod a session selects was found last (reported when it changes).
    placements: BTreeMap<String, Placement>,
    /// The configuration applied (the file's, or the command line's), without the sessions of
    /// ad-hoc captures.
    loaded: LoadedConfig,
    /// The sessions of the ad-hoc captures running, by name.
    captures: BTreeMap<String, SessionConfig>,
}

/// A plan made ready: its targets resolved and its datapath loaded and attached.
struct Prepared {
    plan: Plan,
    targets: Targets,
    datapath: Datapath,
    drain: Option<RingDrain>,
    follow: Option<Follow>,
}

async fn serve(
    loaded: &LoadedConfig,
    plan: Plan,
    options: &Options,
    socket: tokio::net::UnixListener,
) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let metrics = match options.metrics {
        Some(address) => Some(api::bind_metrics(address).await?),
        None => None,
    };
    let outputs = Arc::new(Outputs::default());
    let mut pods = None;
    let plan = if selects_pods(loaded) {
        plan_with_pods(loaded, &mut pods, options).await?
    } else {
        plan
    };
    let prepared = start(plan, options, &outputs).await?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    // Room for every capture's end besides a few reloads: a capture's end is sent without
    // waiting (from a drop).
    let (api_requests, mut requests) = tokio::sync::mpsc::channel(targets::watch::MAX_WATCHERS + 4);
    let shared = Shared::new(
        Applied::new(
            prepared.datapath,
            prepared.drain,
            &prepared.plan,
            prepared.follow,
            prepared.targets,
        ),
        stopped.clone(),
        api_requests,
        outputs.watchers.clone(),
    );
    let mut daemon = Daemon {
        options,
        shared: shared.clone(),
        plan: prepared.plan,
        outputs,
        pods,
        placements: BTreeMap::new(),
        loaded: loaded.clone(),
        captures: BTreeMap::new(),
    };
    let tasks = spawn_tasks(&shared, options, socket, metrics, &stopped)?;
    drop(shared);
    // The selected pods (attached with the plan) are reported before the start is.
    daemon.apply_pods().await;
    let watched = watched_in_words(&daemon.shared.applied().datapath.attached());
    options.say(&format!(
        "mirror-agent: attached to {} hook(s) for {} session(s){watched}; mirroring until \
         SIGINT/SIGTERM\n",
        daemon.shared.applied().datapath.hook_count(),
        daemon.plan.sessions.len()
    ));
    let mut ticker = (options.stats_interval_secs > 0)
        .then(|| tokio::time::interval(Duration::from_secs(options.stats_interval_secs)));
    let mut file_check = tokio::time::interval(FILE_CHECK_PERIOD);
    let mut pod_retry = tokio::time::interval(POD_RETRY_PERIOD);
    let mut count_check = tokio::time::interval(COUNT_CHECK_PERIOD);
    let mut file_seen = options.config.as_deref().and_then(file_identity);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => {
                let _ = daemon.reload("SIGHUP").await;
            }
            Some(request) = requests.recv() => daemon.answer(request).await,
            _ = file_check.tick(), if options.config.is_some() => {
                let now = options.config.as_deref().and_then(file_identity);
                if now.is_some() && now != file_seen {
                    file_seen = now;
                    let _ = daemon.reload("a change of the file").await;
                }
            }
            () = tick(ticker.as_mut()) => daemon.log_counters(),
            () = pods_changed(daemon.pods.as_mut()) => daemon.apply_pods().await,
            _ = pod_retry.tick(), if daemon.waits_for_pods() => daemon.apply_pods().await,
            _ = count_check.tick(), if options.stop_after.is_some() => {
                let done = daemon.shared.applied().drain.as_ref().map_or(0, RingDrain::taken);
                if options.stop_after.is_some_and(|count| done >= count) {
                    break;
                }
            }
        }
    }
    let _ = stop.send(true);
    stop_tasks(tasks).await;
    daemon.finish().await
}

/// What the start line says is watched, as tcpdump's "listening on" does: ` on src0 (ingress,
/// egress), lo (ingress)`, the first few interfaces and how many more.
fn watched_in_words(hooks: &[(String, mirror_common::Direction)]) -> String {
    const NAMED: usize = 4;
    let mut by_interface: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (interface, direction) in hooks {
        by_interface
            .entry(interface)
            .or_default()
            .push(crate::state::direction_name(*direction));
    }
    if by_interface.is_empty() {
        return String::new();
    }
    let named: Vec<String> = by_interface
        .iter()
        .take(NAMED)
        .map(|(interface, directions)| format!("{interface} ({})", directions.join(", ")))
        .collect();
    let more = by_interface.len().saturating_sub(NAMED);
    let more = if more > 0 {
        format!(" and {more} more interface(s)")
    } else {
        String::new()
    };
    format!(" on {}{more}", named.join(", "))
}

/// The first configuration: attached afresh, or in pinned mode taking over what an earlier agent
/// left in the pin directory.
async fn start(plan: Plan, options: &Options, outputs: &Outputs) -> anyhow::Result<Prepared> {
    refuse_foreign_pins(&plan, options.pin_dir.as_deref())?;
    let (generation, previous) = match &options.pin_dir {
        Some(dir) => Datapath::adopt_pins(dir).context("taking over the pinned programs")?,
        None => (0, Vec::new()),
    };
    if !previous.is_empty() {
        tracing::info!(
            "taking over {} pinned link(s) of generation {generation} in {}",
            previous.len(),
            options
                .pin_dir
                .as_deref()
                .unwrap_or(Path::new(""))
                .display()
        );
    }
    prepare(
        plan,
        generation + 1,
        options,
        outputs,
        |datapath, plan, finishing| {
            datapath
                .attach(plan, finishing, previous)
                .map_err(|failed| failed.error)
        },
    )
    .await
    .context("starting the datapath")
}

/// Refuses to start where another mirror agent's pinned links still copy the hooks `plan`
/// watches (an earlier agent in pinned mode, whose pins stayed): every packet would be copied
/// twice.
fn refuse_foreign_pins(plan: &Plan, own: Option<&Path>) -> anyhow::Result<()> {
    let watched: Vec<(String, mirror_common::Direction)> = plan
        .sessions
        .iter()
        .flat_map(|s| &s.attachments)
        .map(|(interface, direction)| (interface.name.clone(), *direction))
        .collect();
    let Some((dir, pins)) = crate::datapath::foreign_pins(own, &watched)
        .into_iter()
        .next()
    else {
        return Ok(());
    };
    anyhow::bail!(
        "{} holds the pinned links of another mirror agent on hooks this configuration watches \
         ({}), and they still copy: run with --pin-dir {} to take them over, or remove the \
         directory to detach them",
        dir.display(),
        pins.join(", "),
        dir.display()
    )
}

/// Resolves `plan`'s targets and loads its datapath for `generation`, then lets `attach` attach
/// it.
async fn prepare(
    mut plan: Plan,
    generation: u64,
    options: &Options,
    outputs: &Outputs,
    attach: impl FnOnce(
        &mut Datapath,
        &Plan,
        &[(String, u32)],
    ) -> Result<(), crate::datapath::DatapathError>,
) -> anyhow::Result<Prepared> {
    let inputs: Vec<_> = plan
        .sessions
        .iter()
        .map(rules::Session::target_input)
        .collect();
    let targets = targets::resolve(&inputs)
        .await
        .context("preparing the targets")?;
    // The copy program goes where copies need finishing (outer headers or a cut): the target
    // interfaces of such sessions and the tunnels' underlays.
    let finishing: Vec<(String, u32)> = target_interfaces(&plan)
        .into_iter()
        .filter(|(_, ifindex)| {
            targets
                .sessions
                .iter()
                .any(|m| m.target_ifindex == *ifindex && m.finish != 0)
        })
        .chain(targets.targets.tunnels.underlays())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut datapath = Datapath::load(
        &plan,
        &targets.sessions,
        &targets.targets.tunnels.entries(),
        generation,
        options.pin_dir.as_deref(),
        options.kernel_log,
    )?;
    let drain = Some(start_drain(&mut datapath, &plan, options, outputs)?);
    attach(&mut datapath, &plan, &finishing)?;
    // The kernel has its copy of the tables (tens of MB for 10,000 rules): free ours.
    plan.tables = rules::Tables::default();
    crate::sys::release_freed_memory();
    log_targets(&plan, &targets.sessions, &outputs.files);
    let follow = Follow::new(
        &plan.sessions,
        &plan.rules,
        target_interfaces(&plan)
            .iter()
            .map(|(_, ifindex)| *ifindex)
            .collect(),
    );
    Ok(Prepared {
        plan,
        targets: targets.targets,
        datapath,
        drain,
        follow,
    })
}

/// Says where each session's copies go, and what it watches when it selects pods.
fn log_targets(plan: &Plan, metas: &[mirror_common::SessionMeta], files: &OpenFiles) {
    for (session, meta) in plan.sessions.iter().zip(metas) {
        // A ring record holds at most MAX_RING_COPY bytes, a whole frame (a shadow's) up to
        // MAX_RING_CHUNKS of them; a file takes any length.
        let ring_most = if meta.whole_frames == 0 {
            mirror_common::MAX_RING_COPY
        } else {
            mirror_common::MAX_RING_COPY * mirror_common::MAX_RING_CHUNKS
        };
        let largest = match (session.through_ring, meta.max_copy_len) {
            (true, 0) => ring_most,
            (true, len) => len.min(ring_most),
            (false, len) => len,
        };
        let writing = session
            .target
            .file()
            .and_then(|file| files.writing(file))
            .map(|now| format!(" (writing {})", now.display()))
            .unwrap_or_default();
        tracing::info!(
            "session `{}` -> {}{writing}{} (copies up to {largest} bytes)",
            session.name,
            session.target,
            if session.through_ring {
                " through the ring"
            } else {
                ""
            },
        );
        if let Some(selector) = &session.pods {
            tracing::info!("session `{}` watches the {selector}", session.name);
        }
    }
}

impl Daemon<'_> {
    /// Does what the API asks.
    async fn answer(&mut self, request: Request) {
        match request {
            Request::Reload(answer) => {
                let outcome = self.reload("the API").await.map_err(|e| format!("{e:#}"));
                let _ = answer.send(outcome);
            }
            Request::StartCapture {
                session,
                watch,
                filter,
                answer,
            } => {
                let outcome = self.start_capture(&session, watch, filter).await;
                if let Err(why) = &outcome {
                    tracing::warn!("capture `{session}` refused: {why}");
                }
                let _ = answer.send(outcome);
            }
            Request::EndCapture(session) => {
                if self.captures.remove(&session).is_some()
                    && let Err(e) = self
                        .apply(&with_captures(&self.loaded, &self.captures))
                        .await
                {
                    tracing::error!("removing the session of capture `{session}`: {e:#}");
                }
            }
        }
    }

    /// Adds the session of an ad-hoc capture: checked alone first (so that its errors name the
    /// request), then applied with the rest.
    async fn start_capture(
        &mut self,
        name: &str,
        watch: AdHoc,
        filter: Option<String>,
    ) -> Result<(), String> {
        let session = capture_session(name, watch, filter);
        let alone = LoadedConfig::from_config(
            crate::config::Config {
                sessions: vec![toml::Spanned::new(0..0, session.clone())],
                ..self.loaded.config.clone()
            },
            "the capture",
        );
        plan_on_host(&alone).map_err(|e| format!("{e:#}"))?;
        self.captures.insert(name.to_owned(), session);
        let applied = self
            .apply(&with_captures(&self.loaded, &self.captures))
            .await;
        match applied {
            Ok(generation) => {
                tracing::info!("capture `{name}` watches its interfaces: generation {generation}");
                Ok(())
            }
            Err(e) => {
                self.captures.remove(name);
                Err(format!("{e:#}"))
            }
        }
    }

    /// Applies the configuration file again, or keeps the running one and says why not.
    async fn reload(&mut self, why: &str) -> anyhow::Result<Reloaded> {
        let result = self.try_reload().await;
        self.shared.reload_tried(result.is_ok());
        match &result {
            Ok(Reloaded {
                generation,
                unchanged: true,
            }) => tracing::info!(
                "reload on {why}: the file is unchanged: generation {generation} stays"
            ),
            Ok(Reloaded { generation, .. }) => {
                tracing::info!("reloaded on {why}: generation {generation}");
            }
            Err(e) => {
                tracing::error!("reload on {why} rejected, the running configuration stays: {e:#}");
            }
        }
        result
    }

    async fn try_reload(&mut self) -> anyhow::Result<Reloaded> {
        let Some(path) = &self.options.config else {
            anyhow::bail!(
                "the agent runs a session from the command line: there is no file to reload"
            );
        };
        let loaded = LoadedConfig::read(path)?;
        if loaded.same_text(&self.loaded) {
            return Ok(Reloaded {
                generation: self.shared.applied().datapath.generation(),
                unchanged: true,
            });
        }
        if loaded
            .config
            .api_socket
            .as_ref()
            .is_some_and(|s| *s != self.options.socket)
            || loaded
                .config
                .metrics_address
                .is_some_and(|m| Some(m) != self.options.metrics)
        {
            tracing::warn!("api_socket and metrics_address take effect at the next start");
        }
        let generation = self.apply(&with_captures(&loaded, &self.captures)).await?;
        self.loaded = loaded;
        Ok(Reloaded {
            generation,
            unchanged: false,
        })
    }

    /// Applies `loaded` (with the captures' sessions) as the next generation, or keeps the
    /// running one and says why not.
    async fn apply(&mut self, loaded: &LoadedConfig) -> anyhow::Result<u64> {
        let plan = plan_with_pods(loaded, &mut self.pods, self.options).await?;
        let generation = self.shared.applied().datapath.generation() + 1;
        let shared = self.shared.clone();
        let prepared = prepare(
            plan,
            generation,
            self.options,
            &self.outputs,
            |datapath, plan, finishing| {
                let mut applied = shared.applied();
                let previous = applied.datapath.take_links();
                datapath
                    .attach(plan, finishing, previous)
                    .map_err(|failed| {
                        applied.datapath.restore_links(failed.previous);
                        failed.error
                    })
            },
        )
        .await?;
        let replaced = {
            let mut applied = self.shared.applied();
            let next = applied.succeed(Applied::new(
                prepared.datapath,
                prepared.drain,
                &prepared.plan,
                prepared.follow,
                prepared.targets,
            ));
            std::mem::replace(&mut *applied, next)
        };
        // The old object (programs, maps) is freed outside the lock, once its drain has sent
        // what its ring still held.
        drop(replaced);
        // Watched sessions have new entries (and maybe other indices) now.
        self.shared.sync_watched();
        let used = prepared.plan.sessions.iter().map(|s| &s.target);
        if let Err(e) = self.outputs.files.close_unused(used) {
            tracing::warn!("closing capture files no longer written: {e:#}");
        }
        self.plan = prepared.plan;
        // The sessions may select other pods now; and pods may have changed meanwhile.
        self.apply_pods().await;
        Ok(generation)
    }

    fn log_counters(&self) {
        match self.shared.stats() {
            Ok(stats) => {
                for session in &stats.sessions {
                    let counters: Vec<String> = session
                        .counters
                        .named()
                        .map(|(field, value)| format!("{}={value}", field.name))
                        .collect();
                    tracing::info!(
                        session = session.name,
                        counters = counters.join(" "),
                        "counters"
                    );
                }
            }
            Err(e) => tracing::warn!("reading counters: {e:#}"),
        }
    }

    /// Detaches (or in pinned mode leaves) everything and prints the final counters.
    async fn finish(self) -> anyhow::Result<()> {
        let Daemon {
            options,
            shared,
            plan: _,
            outputs,
            pods,
            placements: _,
            loaded: _,
            captures: _,
        } = self;
        // No pod changes are followed any more.
        drop(pods);
        // Detached first (or left pinned), then the drain sends what the ring still holds: the
        // counters in the report are final. (A client cut off at the stop may still hold the
        // shared state for a moment: it is used through its lock, not taken.)
        let interfaces = {
            let mut applied = shared.applied();
            applied.datapath.stop();
            if let Some(drain) = &mut applied.drain {
                drain.finish();
            }
            // Where the targets are now (an interface created again has another index; one
            // that is gone has no counters to show).
            applied.targets.sending_interfaces()
        };
        let closed = outputs
            .files
            .close_unused(std::iter::empty())
            .context("closing capture files");
        let losses = targets::tx_losses(interfaces).await;
        if options.json_report {
            let report = report::json_report(&shared.applied(), losses, options.pin_dir.as_deref());
            closed?;
            options.say(&report?);
            return Ok(());
        }
        let report = report::report(&shared.applied(), &losses);
        closed?;
        if let Some(dir) = &options.pin_dir {
            options.say(&format!(
                "mirror-agent: pinned mode: the programs keep mirroring from {} until a new agent takes them over (remove the directory to detach them)\n",
                dir.display()
            ));
        }
        options.say(&report?);
        Ok(())
    }
}

/// Starts the drain of `datapath`'s ring for `plan`: ring-fed sessions' copies to their targets,
/// watched sessions' to their watchers. It runs before anything is attached: no copy waits in a
/// full ring.
fn start_drain(
    datapath: &mut Datapath,
    plan: &Plan,
    options: &Options,
    outputs: &Outputs,
) -> anyhow::Result<RingDrain> {
    let sessions: Vec<RingSession<'_>> = plan
        .sessions
        .iter()
        .map(|s| RingSession {
            name: &s.name,
            target: s.through_ring.then_some(&s.target),
        })
        .collect();
    let names = plan
        .sessions
        .iter()
        .flat_map(|s| &s.attachments)
        .map(|(i, _)| (i.ifindex, i.name.clone()))
        .collect();
    RingDrain::start(
        (datapath.take_ring()?, datapath.take_ring_lost()?),
        &sessions,
        names,
        &outputs.files,
        outputs.watchers.clone(),
        options.stop_after,
    )
}

/// `loaded` with the sessions of the ad-hoc captures after its own.
fn with_captures(
    loaded: &LoadedConfig,
    captures: &BTreeMap<String, SessionConfig>,
) -> LoadedConfig {
    let mut with = loaded.clone();
    with.config.sessions.extend(
        captures
            .values()
            .map(|session| toml::Spanned::new(0..0, session.clone())),
    );
    with
}

/// The session of an ad-hoc capture: what it watches, in both directions, at TC, the packets
/// `filter` selects (every packet without one), to its watchers.
fn capture_session(name: &str, watch: AdHoc, filter: Option<String>) -> SessionConfig {
    let spanned = |value| toml::Spanned::new(0..0, value);
    let (interfaces, pods) = match watch {
        AdHoc::Interfaces(interfaces) => (
            Some(toml::Spanned::new(
                0..0,
                interfaces
                    .into_iter()
                    .map(|i| toml::Spanned::new(0..0, i))
                    .collect(),
            )),
            None,
        ),
        AdHoc::Pods(selector) => (None, Some(toml::Spanned::new(0..0, selector))),
    };
    SessionConfig {
        name: spanned(name.to_owned()),
        interfaces,
        pods,
        direction: None,
        hook: None,
        target: toml::Spanned::new(0..0, TargetConfig::Watch),
        observe: None,
        default: filter
            .is_none()
            .then(|| toml::Spanned::new(0..0, ActionConfig::Mirror)),
        filter: filter.map(|f| toml::Spanned::new(0..0, f)),
        snaplen: None,
        sample: None,
        rate_limit: None,
        unparsed: None,
        rules: Vec::new(),
    }
}

/// What tells a changed file: device, inode, size and modification time of what the path
/// resolves to (a Kubernetes `ConfigMap` update swaps a symlink: a new inode).
fn file_identity(path: &Path) -> Option<(u64, u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino(), meta.len(), meta.modified().ok()?))
}

async fn tick(ticker: Option<&mut tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The interface targets of `plan`'s sessions.
fn target_interfaces(plan: &Plan) -> Vec<(String, u32)> {
    let mut interfaces: Vec<(String, u32)> = plan
        .sessions
        .iter()
        .filter_map(|s| s.target.interface())
        .map(|i| (i.name.clone(), i.ifindex))
        .collect();
    interfaces.sort();
    interfaces.dedup();
    interfaces
}
