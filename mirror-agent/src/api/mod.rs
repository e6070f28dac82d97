//! The running agent's API. On a Unix socket (root only, mode 0600): `GET /status` and
//! `GET /stats` (JSON), `GET /stats/stream?interval_ms=N` (one JSON line per interval, with
//! per-session rates, until the agent stops), `GET /capture?session=NAME` (a live pcapng stream
//! of the session's copies), `GET /metrics` and `POST /reload`. On an optional
//! TCP address, for Prometheus and probes: `/metrics` (`OpenMetrics` text), `/healthz`, `/readyz`,
//! and the read-only JSON routes only when asked for (they name pods, addresses and collectors).
//! The CLI's `status`, `stats`, `reload` and `capture` use the socket.
//!
//! Counters are read from the kernel at most once per [`READING_AGE`] for all readers together,
//! off the runtime's thread, so that no number of readers can hold up a probe.
mod capture;
mod client;
mod listen;
mod metrics;

use std::{
    fmt::Write as _,
    net::SocketAddr,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
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
use nix::sys::stat::{Mode, umask};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub(crate) use self::metrics::{counter_family, in_stable_order, register_shadows};
pub use self::{
    client::{bytes_from, get_from, post_to, stream_from},
    listen::{Limits, serve as serve_bounded},
};
use crate::state::{Request, Shared, Stats};

/// Label pairs of a metric.
pub(crate) type Labels = Vec<(&'static str, String)>;

/// Where the API socket is unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/mirror/agent.sock";
/// The folder of the default socket and of the quick-form runs' sockets.
pub const SOCKET_DIR: &str = "/run/mirror";

/// A quick-form run's own socket, so that several run at once (`status --all` finds them).
pub fn run_socket(pid: u32) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("run-{pid}.sock"))
}

/// The sockets in [`SOCKET_DIR`], sorted: the default one and the quick-form runs'.
pub fn sockets_in_default_dir() -> anyhow::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(SOCKET_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {SOCKET_DIR}")),
    };
    let mut sockets: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_type()
                .is_ok_and(|kind| std::os::unix::fs::FileTypeExt::is_socket(&kind))
        })
        .map(|entry| entry.path())
        .collect();
    sockets.sort();
    Ok(sockets)
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

/// `POST /reload`: the generation applied (the same when the file is unchanged), or why the
/// configuration was rejected (the old one keeps running).
async fn reload(State(shared): State<Arc<Shared>>) -> axum::response::Response {
    let (answer, outcome) = tokio::sync::oneshot::channel();
    if shared.requests.send(Request::Reload(answer)).await.is_err() {
        return (StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping\n").into_response();
    }
    match outcome.await {
        Ok(Ok(reloaded)) => Json(reloaded).into_response(),
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
    for missing in shared.applied().targets.interfaces.missing() {
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
    // The default folder (/run/mirror) is made when missing, root-only; one that exists is
    // used as it is.
    if let Some(dir) = path.parent()
        && dir == Path::new(SOCKET_DIR)
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    // Created root-only: at no moment can another user connect before the mode is set. (The
    // mask is the process's: no other thread creates files yet.)
    let previous = umask(Mode::from_bits_truncate(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    umask(previous);
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
        .route("/capture", get(capture::capture))
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
