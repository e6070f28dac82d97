//! The running agent's state, shared by its tasks: the configuration applied now (see
//! [`Applied`]), the last reading of its counters, the tasks that failed, and the way to ask the
//! run loop for a reload or an ad-hoc capture. The followers change it, the API reads it.
mod applied;
mod follow;
mod views;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use tokio::sync::watch;

pub use self::{
    applied::Applied,
    follow::Follow,
    views::{RuleStats, SelectedPod, SessionStats, SessionView, Stats, Status, direction_name},
};
use crate::targets::watch::Watchers;

/// How old a reading of the counters may be when it is served.
const READING_AGE: Duration = Duration::from_millis(100);

/// What the agent's tasks share: the configuration applied now, and a way to ask for a reload.
#[derive(Debug)]
pub struct Shared {
    applied: Mutex<Applied>,
    /// The last reading of the counters and when it was taken; readers wait here for the one
    /// reading under way instead of each asking the kernel.
    reading: tokio::sync::Mutex<Option<(Instant, Arc<Stats>)>>,
    /// The agent's tasks that ended with an error (by name): the agent is then not ready.
    pub(crate) failed: Mutex<BTreeMap<&'static str, String>>,
    /// The last reload tried: when, and whether it was applied.
    pub(crate) last_reload: Mutex<Option<(SystemTime, bool)>>,
    pub(crate) started: Instant,
    /// Turns true when the agent stops: streams end, so that the servers can.
    pub(crate) stop: watch::Receiver<bool>,
    /// Where `POST /reload` and ad-hoc captures ask the agent for a new configuration.
    pub(crate) requests: tokio::sync::mpsc::Sender<Request>,
    /// The live captures (`GET /capture`).
    pub(crate) watchers: Arc<Watchers>,
}

/// What the API asks of the agent, and where the outcome goes.
#[derive(Debug)]
pub enum Request {
    /// `POST /reload`: what the reload did, or why the file was rejected.
    Reload(tokio::sync::oneshot::Sender<Result<Reloaded, String>>),
    /// An ad-hoc capture: a session of this name on these interfaces or pods (with a filter
    /// expression, or of every packet), applied, or why not.
    StartCapture {
        session: String,
        watch: AdHoc,
        filter: Option<String>,
        answer: tokio::sync::oneshot::Sender<Result<(), String>>,
    },
    /// The ad-hoc capture's watcher went: its session goes too.
    EndCapture(String),
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reloaded {
    /// The configuration generation applied now.
    pub generation: u64,
    /// The file says what the applied configuration says, to the byte: nothing was reloaded.
    #[serde(default)]
    pub unchanged: bool,
}

/// What an ad-hoc capture watches.
#[derive(Debug, Clone)]
pub enum AdHoc {
    /// Interface names or globs.
    Interfaces(Vec<String>),
    /// The pods of this node a selector selects, through their host-side interfaces.
    Pods(crate::config::PodSelector),
}

impl Shared {
    pub fn new(
        applied: Applied,
        stop: watch::Receiver<bool>,
        requests: tokio::sync::mpsc::Sender<Request>,
        watchers: Arc<Watchers>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            applied: Mutex::new(applied),
            reading: tokio::sync::Mutex::new(None),
            failed: Mutex::new(BTreeMap::new()),
            last_reload: Mutex::new(None),
            started: Instant::now(),
            stop,
            requests,
            watchers,
        })
    }

    /// Marks in the kernel the sessions someone watches now (after a capture starts or ends,
    /// and after a reload).
    pub fn sync_watched(&self) {
        self.applied().sync_watched(&self.watchers);
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
        let mut stats = tokio::task::spawn_blocking(move || shared.stats())
            .await
            .context("reading the counters")??;
        let interfaces = self.applied().targets.sending_interfaces();
        stats.targets = crate::targets::tx_losses(interfaces).await;
        let stats = Arc::new(stats);
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

    pub(crate) fn failed_tasks(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, String>> {
        self.failed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn status(&self) -> Status {
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
            captures: self.watchers.views(),
            tunnels: applied.tunnels(),
        }
    }
}
