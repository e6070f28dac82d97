//! The running agent's API. On a Unix socket (root only, mode 0600): `GET /status` and
//! `GET /stats` (JSON), `GET /stats/stream?interval_ms=N` (one JSON line per interval, with
//! per-session rates, until the agent stops), `GET /metrics` and `POST /reload`. On an optional
//! TCP address, for Prometheus and probes: `/metrics` (`OpenMetrics` text), `/healthz`, `/readyz`,
//! and the read-only JSON routes only when asked for (they name pods, addresses and collectors).
//! The CLI's `status`, `stats` and `reload` use the socket.
//!
//! Counters are read from the kernel at most once per [`READING_AGE`] for all readers together,
//! off the runtime's thread, so that no number of readers can hold up a probe.
mod client;
mod listen;

pub use client::{get_from, post_to, stream_from};
pub use listen::Limits;
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use axum::{
    Json, Router,
    body::Body,
    extract::{Query, State},
    http::StatusCode,
    response::IntoResponse,
    routing::get,
};
use mirror_common::{CounterField, Counters, Direction, HookCounters, Metric};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    datapath::Datapath,
    follow::Follow,
    rules::{self, Plan},
};

/// Label pairs of a metric.
type Labels = Vec<(&'static str, String)>;

/// Where the API socket is unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/mirror-agent.sock";

/// What the API serves from: the configuration applied now, and a way to ask for a reload.
#[derive(Debug)]
pub struct Shared {
    applied: Mutex<Applied>,
    /// The last reading of the counters and when it was taken; readers wait here for the one
    /// reading under way instead of each asking the kernel.
    reading: tokio::sync::Mutex<Option<(Instant, Arc<Stats>)>>,
    /// The agent's tasks that ended with an error (by name): the agent is then not ready.
    failed: Mutex<BTreeMap<&'static str, String>>,
    /// The last reload tried: when, and whether it was applied.
    last_reload: Mutex<Option<(SystemTime, bool)>>,
    started: Instant,
    /// Turns true when the agent stops: streams end, so that the servers can.
    stop: watch::Receiver<bool>,
    /// Where `POST /reload` asks the agent to reload; the answer is the new generation.
    reload: tokio::sync::mpsc::Sender<ReloadRequest>,
}

/// A reload asked for on the API, and where its outcome goes.
pub type ReloadRequest = tokio::sync::oneshot::Sender<Result<u64, String>>;

/// One applied configuration: its datapath, what the API reports of it, and the counters its
/// unchanged sessions carried over from the configurations before it.
#[derive(Debug)]
pub struct Applied {
    pub datapath: Datapath,
    /// Sends the ring copies on (XDP sessions, file targets); stops once it has sent what is
    /// queued when dropped.
    pub drain: Option<crate::emit::Drain>,
    view: PlanView,
    carried: Carried,
    /// What the follower needs to watch interfaces that appear later.
    pub follow: Option<Follow>,
    /// The targets as they are now: tunnels' hops (kept current by `tunnel::path::run`) and
    /// target interfaces' indexes (by `follow::run`).
    pub targets: crate::tunnel::Targets,
    /// The pods pod-selector sessions select now, and where they were found.
    pub pods: Vec<SelectedPod>,
}

/// A pod that pod-selector sessions select, and the interface watched for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectedPod {
    /// `namespace/name`.
    pub pod: String,
    pub ips: Vec<std::net::IpAddr>,
    /// Its host-side interface, watched for these sessions.
    pub interface: Option<String>,
    /// Why no interface is watched for it.
    pub problem: Option<String>,
    pub sessions: Vec<String>,
}

/// Counters carried over from earlier generations, added to the live ones.
#[derive(Debug, Default)]
struct Carried {
    sessions: Vec<Counters>,
    rules: Vec<Counters>,
}

/// The parts of a plan the API reports (the compiled tables are gone by then).
#[derive(Debug)]
struct PlanView {
    sessions: Vec<SessionView>,
    /// (session index, rule label) by global rule index.
    rules: Vec<(usize, String)>,
    /// Per session: what it is made of; equal fingerprints across a reload mean an unchanged
    /// session, whose counters go on.
    fingerprints: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionView {
    pub name: String,
    pub target: String,
    /// The session watches pods (`pods = {…}`), not named interfaces.
    #[serde(default)]
    pub selects_pods: bool,
    /// (interface, direction) pairs watched.
    pub hooks: Vec<(String, String)>,
}

impl PlanView {
    fn of(plan: &Plan) -> Self {
        PlanView {
            sessions: plan
                .sessions
                .iter()
                .map(|s| SessionView {
                    name: s.name.clone(),
                    target: s.target.to_string(),
                    selects_pods: s.pods.is_some(),
                    hooks: s
                        .attachments
                        .iter()
                        .map(|(i, d)| (i.name.clone(), direction_name(*d)))
                        .collect(),
                })
                .collect(),
            rules: plan
                .rules
                .iter()
                .map(|r| (r.session, r.kind.to_string()))
                .collect(),
            fingerprints: rules::fingerprints(plan),
        }
    }
}

fn direction_name(direction: Direction) -> String {
    match direction {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
        Direction::XdpIngress => "xdp",
    }
    .to_owned()
}

impl Applied {
    /// The first configuration.
    pub fn new(
        datapath: Datapath,
        drain: Option<crate::emit::Drain>,
        plan: &Plan,
        follow: Option<Follow>,
        targets: crate::tunnel::Targets,
    ) -> Self {
        Applied {
            datapath,
            drain,
            view: PlanView::of(plan),
            carried: Carried::default(),
            follow,
            targets,
            pods: Vec::new(),
        }
    }

    /// The configuration that replaces `self`, whose datapath `datapath` has taken over: the
    /// counters of `self` (final: its programs are detached) go on in the sessions that did not
    /// change.
    pub fn succeed(
        &self,
        datapath: Datapath,
        drain: Option<crate::emit::Drain>,
        plan: &Plan,
        follow: Option<Follow>,
        targets: crate::tunnel::Targets,
    ) -> Self {
        let before = self.stats().unwrap_or_else(|e| {
            tracing::warn!("reading the replaced configuration's counters: {e:#}");
            Stats::default()
        });
        let view = PlanView::of(plan);
        let mut carried = Carried {
            sessions: vec![Counters::default(); view.sessions.len()],
            rules: vec![Counters::default(); view.rules.len()],
        };
        for (index, fingerprint) in view.fingerprints.iter().enumerate() {
            let Some(old) = self.view.fingerprints.iter().position(|f| f == fingerprint) else {
                continue;
            };
            let Some(old_stats) = before.sessions.get(old) else {
                continue;
            };
            carried.sessions[index] = old_stats.counters;
            // An unchanged session has the same rules in the same order.
            let rules = view
                .rules
                .iter()
                .enumerate()
                .filter(|(_, (s, _))| *s == index);
            for ((rule, _), old_rule) in rules.zip(&old_stats.rules) {
                carried.rules[rule] = old_rule.counters;
            }
        }
        Applied {
            datapath,
            drain,
            view,
            carried,
            follow,
            targets,
            pods: self.pods.clone(),
        }
    }

    /// Per session, the (interface, direction) hooks it watches now: those of the plan, and those
    /// of interfaces that appeared or pods selected since.
    fn session_hooks(&self) -> Vec<Vec<(String, String)>> {
        let Some(follow) = &self.follow else {
            return self.view.sessions.iter().map(|s| s.hooks.clone()).collect();
        };
        let mut hooks = vec![Vec::new(); self.view.sessions.len()];
        for (interface, direction) in self.datapath.attached() {
            for session in follow.sessions_watching(&interface, direction) {
                if let Some(list) = hooks.get_mut(session) {
                    list.push((interface.clone(), direction_name(direction)));
                }
            }
        }
        hooks
    }

    /// The gauges of what is watched now: hooks by session, and the pods sessions select.
    fn register_watching(&self, registry: &mut Registry) {
        let attached = Family::<Labels, Gauge>::default();
        registry.register(
            "attached_hooks",
            "Watched (interface, direction) hooks, by session",
            attached.clone(),
        );
        for (session, hooks) in self.view.sessions.iter().zip(self.session_hooks()) {
            for (interface, direction) in hooks {
                attached
                    .get_or_create(&vec![
                        ("session", session.name.clone()),
                        ("interface", interface),
                        ("direction", direction),
                    ])
                    .set(1);
            }
        }
        let pods = Family::<Labels, Gauge>::default();
        registry.register(
            "selected_pods",
            "Pods a pod-selector session selects, by whether their interface is watched",
            pods.clone(),
        );
        for session in self.view.sessions.iter().filter(|s| s.selects_pods) {
            for watched in ["true", "false"] {
                let count = self
                    .pods
                    .iter()
                    .filter(|p| p.sessions.contains(&session.name))
                    .filter(|p| p.interface.is_some() == (watched == "true"))
                    .count();
                pods.get_or_create(&vec![
                    ("session", session.name.clone()),
                    ("watched", watched.to_owned()),
                ])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
            }
        }
    }

    /// Every counter, summed over CPUs, plus what earlier generations carried over.
    pub fn stats(&self) -> anyhow::Result<Stats> {
        let sessions = self.datapath.session_counters(self.view.sessions.len())?;
        let rules = self.datapath.rule_counters(self.view.rules.len())?;
        let hooks = self.datapath.hook_counters()?;
        let hook = |i: usize| hooks.get(i).copied().unwrap_or_default();
        let carried = |list: &[Counters], i: usize| list.get(i).copied().unwrap_or_default();
        Ok(Stats {
            generation: self.datapath.generation(),
            sessions: self
                .view
                .sessions
                .iter()
                .zip(&sessions)
                .enumerate()
                .map(|(index, (view, counters))| SessionStats {
                    name: view.name.clone(),
                    counters: *counters + carried(&self.carried.sessions, index),
                    rules: self
                        .view
                        .rules
                        .iter()
                        .zip(&rules)
                        .enumerate()
                        .filter(|(_, ((session, _), _))| *session == index)
                        .map(|(rule, ((_, label), counters))| RuleStats {
                            rule: label.clone(),
                            counters: *counters + carried(&self.carried.rules, rule),
                        })
                        .collect(),
                })
                .collect(),
            ingress: hook(Direction::Ingress as usize),
            egress: hook(Direction::Egress as usize),
            xdp: hook(Direction::XdpIngress as usize),
            copy: hook(mirror_common::COPY_HOOK as usize),
        })
    }
}

impl Shared {
    pub fn new(
        applied: Applied,
        stop: watch::Receiver<bool>,
        reload: tokio::sync::mpsc::Sender<ReloadRequest>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            applied: Mutex::new(applied),
            reading: tokio::sync::Mutex::new(None),
            failed: Mutex::new(BTreeMap::new()),
            last_reload: Mutex::new(None),
            started: Instant::now(),
            stop,
            reload,
        })
    }

    /// The applied configuration, locked (reloads and the follower change it).
    pub fn applied(&self) -> std::sync::MutexGuard<'_, Applied> {
        self.applied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every counter: see [`Applied::stats`].
    pub fn stats(&self) -> anyhow::Result<Stats> {
        self.applied().stats()
    }

    /// The counters as read at most [`READING_AGE`] ago: read again (on a blocking thread) only
    /// when the last reading is older, once for every reader waiting.
    pub async fn reading(self: &Arc<Self>) -> anyhow::Result<Arc<Stats>> {
        let mut last = self.reading.lock().await;
        if let Some((at, stats)) = &*last
            && at.elapsed() < READING_AGE
        {
            return Ok(stats.clone());
        }
        let shared = self.clone();
        let stats = Arc::new(
            tokio::task::spawn_blocking(move || shared.stats())
                .await
                .context("reading the counters")??,
        );
        *last = Some((Instant::now(), stats.clone()));
        Ok(stats)
    }

    /// Records that the task `name` ended with `error`: `/readyz` answers 503 from then on, and
    /// the metrics say so.
    pub fn task_failed(&self, name: &'static str, error: &anyhow::Error) {
        tracing::error!("{name} ended: {error:#}");
        self.failed_tasks().insert(name, format!("{error:#}"));
    }

    /// Records a reload's outcome for the metrics.
    pub fn reload_tried(&self, applied: bool) {
        *self
            .last_reload
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((SystemTime::now(), applied));
    }

    /// The agent's own metrics: its build, its configuration's generation and last reload, its
    /// tasks, and the copies its ring drain sent on.
    fn register_agent(&self, registry: &mut Registry, stats: &Stats) {
        let gauge = |registry: &mut Registry, name: &str, help: &str, value: i64| {
            let gauge = Gauge::<i64>::default();
            gauge.set(value);
            registry.register(name, help, gauge);
        };
        let build = Family::<Labels, Gauge>::default();
        registry.register(
            "build_info",
            "The agent's version (always 1)",
            build.clone(),
        );
        build
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())])
            .set(1);
        gauge(
            registry,
            "config_generation",
            "The configuration applied: 1 at the start, one more with every reload",
            i64::try_from(stats.generation).unwrap_or(i64::MAX),
        );
        let last = *self
            .last_reload
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        gauge(
            registry,
            "config_last_reload_success",
            "1 when the last reload was applied (or there was none), 0 when it was rejected",
            i64::from(last.is_none_or(|(_, applied)| applied)),
        );
        gauge(
            registry,
            "config_last_reload_timestamp_seconds",
            "When the last reload was tried, seconds since the Unix epoch (0: none yet)",
            last.and_then(|(at, _)| at.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        );
        let failed = Family::<Labels, Gauge>::default();
        registry.register(
            "task_failed",
            "1 for each of the agent's tasks that ended with an error (the agent is then not ready)",
            failed.clone(),
        );
        for task in self.failed_tasks().keys() {
            failed
                .get_or_create(&vec![("task", (*task).to_owned())])
                .set(1);
        }
        let ring = self
            .applied()
            .drain
            .as_ref()
            .map(crate::emit::Drain::counts);
        let (sent, refused) = (
            Family::<Labels, Counter>::default(),
            Family::<Labels, Counter>::default(),
        );
        registry.register(
            "ring_sent_copies",
            "Ring copies (XDP sessions, file targets) the agent sent on, by session, in this configuration",
            sent.clone(),
        );
        registry.register(
            "ring_refused_copies",
            "Ring copies the target refused (a full socket buffer, a write error), by session, in this configuration",
            refused.clone(),
        );
        for (session, (s, r)) in stats.sessions.iter().zip(ring.unwrap_or_default()) {
            let labels = vec![("session", session.name.clone())];
            sent.get_or_create(&labels).inc_by(s);
            refused.get_or_create(&labels).inc_by(r);
        }
    }

    fn failed_tasks(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, String>> {
        self.failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn status(&self) -> Status {
        let applied = self.applied();
        let attached = applied.datapath.attached();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            generation: applied.datapath.generation(),
            uptime_seconds: self.started.elapsed().as_secs(),
            hooks_attached: attached.len(),
            programs: applied
                .datapath
                .program_ids()
                .into_iter()
                .map(|(name, id)| (name.to_owned(), id))
                .collect(),
            attached: attached
                .into_iter()
                .map(|(i, d)| (i, direction_name(d)))
                .collect(),
            sessions: applied
                .view
                .sessions
                .iter()
                .zip(applied.session_hooks())
                .map(|(session, hooks)| SessionView {
                    hooks,
                    ..session.clone()
                })
                .collect(),
            pods: applied.pods.clone(),
            tunnels: applied
                .targets
                .report()
                .into_iter()
                .map(|(session, target, hop)| TunnelView {
                    session,
                    target,
                    interface: hop.as_ref().ok().map(|h| h.interface.clone()),
                    next_hop_mac: hop
                        .as_ref()
                        .ok()
                        .map(|h| crate::tunnel::mac_text(h.next_hop_mac)),
                    problem: hop.err().map(|e| e.to_string()),
                })
                .collect(),
        }
    }

    /// The counters of `stats` and the state of the agent in `OpenMetrics` text.
    fn metrics(&self, stats: &Stats) -> anyhow::Result<String> {
        let mut registry = Registry::with_prefix("mirror");
        let rules = CounterFamilies::register(&mut registry, Counters::FIELDS);
        for session in &stats.sessions {
            for rule in &session.rules {
                let labels = vec![
                    ("session", session.name.clone()),
                    ("rule", rule.rule.clone()),
                ];
                rules.record(&labels, rule.counters.named());
            }
        }
        let hooks = CounterFamilies::register(&mut registry, HookCounters::FIELDS);
        for (name, hook) in [
            ("ingress", &stats.ingress),
            ("egress", &stats.egress),
            ("xdp", &stats.xdp),
            ("copy", &stats.copy),
        ] {
            hooks.record(&vec![("hook", name.to_owned())], hook.named());
        }
        self.applied().register_watching(&mut registry);
        self.register_agent(&mut registry, stats);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleStats {
    pub rule: String,
    pub counters: Counters,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionStats {
    pub name: String,
    pub counters: Counters,
    pub rules: Vec<RuleStats>,
}

/// `GET /stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    /// The configuration generation the counters are of.
    pub generation: u64,
    pub sessions: Vec<SessionStats>,
    pub ingress: HookCounters,
    pub egress: HookCounters,
    pub xdp: HookCounters,
    pub copy: HookCounters,
}

/// `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// Which configuration is applied: 1 at the start (in pinned mode, one more than the agent
    /// before), one more with every reload.
    pub generation: u64,
    pub uptime_seconds: u64,
    pub hooks_attached: usize,
    /// The (interface, direction) hooks attached now, including interfaces that appeared later.
    pub attached: Vec<(String, String)>,
    /// (name, kernel program id) of the programs of this generation.
    pub programs: Vec<(String, u32)>,
    pub sessions: Vec<SessionView>,
    /// The pods pod-selector sessions select.
    #[serde(default)]
    pub pods: Vec<SelectedPod>,
    /// Where each tunnel session's copies leave now.
    #[serde(default)]
    pub tunnels: Vec<TunnelView>,
}

/// A tunnel session's path now: the underlay and next hop, or why there is none (its copies are
/// then counted as `no_route`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TunnelView {
    pub session: String,
    pub target: String,
    pub interface: Option<String>,
    pub next_hop_mac: Option<String>,
    pub problem: Option<String>,
}

/// The metric families of a counters struct (see `mirror_common::Metric`): one per counter with a
/// family of its own, and `rule_copies_not_sent` with a `reason` label for the others.
struct CounterFamilies {
    own: Vec<Option<Family<Labels, Counter>>>,
    not_sent: Option<Family<Labels, Counter>>,
}

impl CounterFamilies {
    fn register(registry: &mut Registry, fields: &[CounterField]) -> Self {
        let mut family = |name: &str, help: &str| {
            let family = Family::<Labels, Counter>::default();
            registry.register(name, help.trim(), family.clone());
            family
        };
        let own = fields
            .iter()
            .map(|field| match field.metric {
                Metric::Own(name) => Some(family(name, field.help)),
                Metric::NotSent => None,
            })
            .collect();
        let not_sent = fields
            .iter()
            .any(|field| field.metric == Metric::NotSent)
            .then(|| family("rule_copies_not_sent", "Copies not made, by reason"));
        CounterFamilies { own, not_sent }
    }

    /// Records one struct's counters under `labels`.
    fn record<'a>(&self, labels: &Labels, counters: impl Iterator<Item = (&'a CounterField, u64)>) {
        for ((field, value), own) in counters.zip(&self.own) {
            if let Some(family) = own {
                family.get_or_create(labels).inc_by(value);
            } else if let Some(family) = &self.not_sent {
                let mut labels = labels.clone();
                labels.push(("reason", field.name.to_owned()));
                family.get_or_create(&labels).inc_by(value);
            }
        }
    }
}

fn internal(error: &anyhow::Error) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, format!("{error:#}\n"))
}

async fn stats(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    shared
        .reading()
        .await
        .map(|stats| Json(Stats::clone(&stats)))
        .map_err(|e| internal(&e))
}

/// How old a reading of the counters may be when it is served.
const READING_AGE: Duration = Duration::from_millis(100);

/// One line of `GET /stats/stream`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamLine {
    /// Wall-clock time of the reading, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    pub stats: Stats,
    /// Per session, since the previous line (absent on the first).
    pub rates: Vec<SessionRates>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRates {
    pub name: String,
    pub matched_per_second: f64,
    pub mirrored_per_second: f64,
    pub not_sent_per_second: f64,
}

#[derive(Debug, Deserialize)]
struct StreamQuery {
    interval_ms: Option<u64>,
}

impl StreamQuery {
    /// The interval asked for (1 s when none), within [`MIN_STREAM_INTERVAL`] and
    /// [`MAX_STREAM_INTERVAL`].
    fn period(&self) -> Duration {
        self.interval_ms
            .map_or(Duration::from_secs(1), Duration::from_millis)
            .clamp(MIN_STREAM_INTERVAL, MAX_STREAM_INTERVAL)
    }
}

/// Shortest interval a stream accepts.
const MIN_STREAM_INTERVAL: Duration = Duration::from_millis(100);
/// Longest interval a stream accepts (as `stats --interval`).
const MAX_STREAM_INTERVAL: Duration = Duration::from_hours(1);

#[expect(
    clippy::cast_precision_loss,
    reason = "a rate needs no more than 52 bits"
)]
fn rates(stats: &Stats, previous: &Stats, elapsed: Duration) -> Vec<SessionRates> {
    let seconds = elapsed.as_secs_f64().max(f64::EPSILON);
    let per_second = |now: u64, then: u64| now.saturating_sub(then) as f64 / seconds;
    stats
        .sessions
        .iter()
        .zip(&previous.sessions)
        .map(|(now, then)| SessionRates {
            name: now.name.clone(),
            matched_per_second: per_second(now.counters.matched, then.counters.matched),
            mirrored_per_second: per_second(now.counters.mirrored, then.counters.mirrored),
            not_sent_per_second: per_second(now.counters.not_sent(), then.counters.not_sent()),
        })
        .collect()
}

async fn stream(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<StreamQuery>,
) -> impl IntoResponse {
    let period = query.period();
    let stop = shared.stop.clone();
    let lines = futures_util::stream::unfold(
        (shared, None::<(Stats, Instant)>),
        move |(shared, previous)| {
            let mut stop = stop.clone();
            async move {
                if previous.is_some() {
                    tokio::select! {
                        () = tokio::time::sleep(period) => {}
                        _ = stop.wait_for(|stop| *stop) => return None,
                    }
                }
                if *stop.borrow() {
                    return None;
                }
                let stats = Stats::clone(&*shared.reading().await.ok()?);
                let now = Instant::now();
                let line = StreamLine {
                    unix_ms: SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                    rates: previous
                        .as_ref()
                        .map(|(then, at)| rates(&stats, then, now - *at))
                        .unwrap_or_default(),
                    stats,
                };
                let text = serde_json::to_string(&line).ok()? + "\n";
                Some((
                    Ok::<_, std::convert::Infallible>(text),
                    (shared, Some((line.stats, now))),
                ))
            }
        },
    );
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
}

/// `POST /reload`: the new generation, or why the configuration was rejected (the old one keeps
/// running).
async fn reload(State(shared): State<Arc<Shared>>) -> axum::response::Response {
    let (answer, outcome) = tokio::sync::oneshot::channel();
    if shared.reload.send(answer).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping\n").into_response();
    }
    match outcome.await {
        Ok(Ok(generation)) => Json(serde_json::json!({ "generation": generation })).into_response(),
        Ok(Err(reason)) => (StatusCode::UNPROCESSABLE_ENTITY, reason + "\n").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping\n").into_response(),
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    Json(shared.status())
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let text = async {
        let stats = shared.reading().await?;
        // Thousands of rules make a long text: written off the runtime's thread.
        tokio::task::spawn_blocking(move || shared.metrics(&stats))
            .await
            .context("writing the metrics")?
    };
    text.await
        .map(|text| {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )],
                text,
            )
        })
        .map_err(|e| internal(&e))
}

/// The agent is alive (it serves only once its programs are attached).
async fn alive() -> &'static str {
    "ok\n"
}

/// The agent mirrors as configured: all its tasks run and every target interface is there. 503
/// with the reasons otherwise.
async fn ready(State(shared): State<Arc<Shared>>) -> axum::response::Response {
    let mut reasons = String::new();
    for (task, error) in shared.failed_tasks().iter() {
        let _ = writeln!(reasons, "{task} ended: {error}");
    }
    for missing in shared.applied().targets.missing() {
        let _ = writeln!(reasons, "{missing}");
    }
    if reasons.is_empty() {
        return "ok\n".into_response();
    }
    (StatusCode::SERVICE_UNAVAILABLE, reasons).into_response()
}

/// Binds the API socket: refuses one another agent answers on, replaces a stale one, and makes it
/// root-only (0600).
pub fn bind_socket(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("{} is in use: is another agent running?", path.display());
    }
    // Only a stale socket (an agent that was killed) is removed; anything else at the path (a
    // file, a directory, a link someone planted) is left alone and refused.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket: not replacing it (remove it, or choose another --api-socket)",
            path.display()
        ),
        Err(_) => {}
    }
    // Created root-only: at no moment can another user connect before the mode is set.
    // SAFETY: umask only swaps the process's file mode mask; no other thread creates files yet.
    let previous = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above, restoring it.
    unsafe { libc::umask(previous) };
    let listener = bound.with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(listener)
}

/// Serves the API on the socket bound at `path` until `stop` turns true, then removes the file.
pub async fn serve_socket(
    listener: tokio::net::UnixListener,
    path: PathBuf,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/status", get(status))
        .route("/stats", get(stats))
        .route("/stats/stream", get(stream))
        .route("/metrics", get(metrics))
        .route("/reload", axum::routing::post(reload))
        .with_state(shared);
    listen::serve(listener, app, Limits::NETWORK, stop).await;
    let _ = std::fs::remove_file(&path);
}

/// Serves `/metrics`, `/healthz` and `/readyz` on a TCP address until `stop` turns true, and
/// with `json_routes` the API's read-only routes (`/status`, `/stats`, `/stats/stream`). Reloads
/// are only taken on the root-only socket.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    json_routes: bool,
    stop: watch::Receiver<bool>,
) {
    let mut app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(alive))
        .route("/readyz", get(ready));
    if json_routes {
        app = app
            .route("/status", get(status))
            .route("/stats", get(stats))
            .route("/stats/stream", get(stream));
    }
    listen::serve(listener, app.with_state(shared), Limits::NETWORK, stop).await;
}

/// Binds the metrics address (before anything is attached, so a busy port fails the start).
pub async fn bind_metrics(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address} for metrics"))
}

#[cfg(test)]
mod tests {
    use axum::{extract::Query, http::Uri};
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever query a client sends to `/stats/stream`, it is refused or gives an interval
        /// within bounds: never a panic, never a stream that spins or never ticks.
        #[test]
        fn any_stream_query_is_refused_or_bounded(query in ".{0,64}", number in any::<u64>()) {
            for query in [query, format!("interval_ms={number}")] {
                let Ok(uri) = format!("/stats/stream?{query}").parse::<Uri>() else {
                    continue;
                };
                if let Ok(Query(parsed)) = Query::<StreamQuery>::try_from_uri(&uri) {
                    let period = parsed.period();
                    prop_assert!((MIN_STREAM_INTERVAL..=MAX_STREAM_INTERVAL).contains(&period));
                }
            }
        }
    }
}
