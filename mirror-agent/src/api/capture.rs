//! `GET /capture?session=NAME[&filter=EXPR][&count=N]` (the socket only): a live pcapng stream of
//! a session's copies (those a tcpdump expression selects); or, with `interface=NAME` (repeated,
//! globs too) or `namespace=NS`/`label=KEY=VALUE` (pods of this node) instead of a session, of an
//! ad-hoc capture: a session of its own that the agent
//! applies for as long as the stream lasts, the filter compiled into its kernel rules; one interface block per interface and hook, until the client goes, the count is
//! reached or the agent stops. The session is marked watched in the kernel while anyone watches
//! it (see [`crate::targets::watch`]).
use std::sync::Arc;

use axum::{
    body::Body,
    extract::{RawQuery, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};

use crate::{
    config::PodSelector,
    state::{AdHoc, Request, Shared},
    targets::{
        file::PcapNgStream,
        watch::{Watched, Watcher},
    },
};

/// What a capture asks for.
#[derive(Debug, Default)]
struct CaptureQuery {
    session: Option<String>,
    interfaces: Vec<String>,
    /// Pods of this namespace, with these labels (`KEY=VALUE`).
    namespace: Option<String>,
    labels: Vec<String>,
    /// Only the copies this tcpdump expression selects.
    filter: Option<String>,
    /// Stop after this many copies.
    count: Option<u64>,
}

impl CaptureQuery {
    fn parse(query: &str) -> Result<Self, String> {
        let mut parsed = CaptureQuery::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "session" => parsed.session = Some(value.into_owned()),
                "interface" => parsed.interfaces.push(value.into_owned()),
                "namespace" => parsed.namespace = Some(value.into_owned()),
                "label" => parsed.labels.push(value.into_owned()),
                "filter" if !value.trim().is_empty() => parsed.filter = Some(value.into_owned()),
                "filter" => {}
                "count" => {
                    parsed.count = Some(value.parse().map_err(|_| format!("count `{value}`"))?);
                }
                other => return Err(format!("unknown parameter `{other}`")),
            }
        }
        let pods = parsed.namespace.is_some() || !parsed.labels.is_empty();
        match (
            parsed.session.is_some(),
            !parsed.interfaces.is_empty(),
            pods,
        ) {
            (true, false, false) | (false, true, false) | (false, false, true) => Ok(parsed),
            _ => Err(
                "give a session, or interfaces or pods (namespace, labels) for an ad-hoc capture"
                    .to_owned(),
            ),
        }
    }

    /// What an ad-hoc capture watches.
    fn ad_hoc(&self) -> Result<AdHoc, String> {
        if !self.interfaces.is_empty() {
            return Ok(AdHoc::Interfaces(self.interfaces.clone()));
        }
        let labels = self
            .labels
            .iter()
            .map(|label| {
                label
                    .split_once('=')
                    .map(|(key, value)| (key.to_owned(), value.to_owned()))
                    .ok_or_else(|| format!("label `{label}`: give KEY=VALUE"))
            })
            .collect::<Result<_, _>>()?;
        Ok(AdHoc::Pods(PodSelector {
            namespace: self.namespace.clone(),
            labels,
            expressions: Vec::new(),
        }))
    }
}

/// Removes its watcher (and an ad-hoc capture's session) when the stream ends or its client
/// goes.
struct Watching {
    shared: Arc<Shared>,
    watcher: Arc<Watcher>,
    ad_hoc: bool,
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.shared.watchers.remove(self.watcher.id);
        self.shared.sync_watched();
        if self.ad_hoc {
            let end = Request::EndCapture(self.watcher.session.clone());
            if let Err(e) = self.shared.requests.try_send(end) {
                tracing::warn!(
                    "ending the session of capture `{}`: {e}",
                    self.watcher.session
                );
            }
        }
        let (copies, lost) = self.watcher.counts();
        tracing::info!(
            "capture of session `{}` ended: {copies} copies, {lost} lost to a slow reader",
            self.watcher.session
        );
    }
}

pub(super) async fn capture(
    State(shared): State<Arc<Shared>>,
    RawQuery(query): RawQuery,
) -> Response {
    let refuse = |status, why: String| (status, why + "\n").into_response();
    let query = match CaptureQuery::parse(query.as_deref().unwrap_or("")) {
        Ok(query) => query,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, why),
    };
    let (watching, copies) = match start(&shared, &query).await {
        Ok(started) => started,
        Err((status, why)) => return refuse(status, why),
    };
    stream(&shared, watching, copies, query.count)
}

/// Registers the watcher: of the session asked for, or of an ad-hoc capture's new session.
async fn start(
    shared: &Arc<Shared>,
    query: &CaptureQuery,
) -> Result<(Watching, tokio::sync::mpsc::Receiver<Watched>), (StatusCode, String)> {
    let Some(session) = &query.session else {
        return start_ad_hoc(shared, query).await;
    };
    let sessions: Vec<String> = shared
        .applied()
        .view
        .sessions
        .iter()
        .map(|s| s.name.clone())
        .collect();
    if !sessions.contains(session) {
        return Err((
            StatusCode::NOT_FOUND,
            format!("no session `{session}` (sessions: {})", sessions.join(", ")),
        ));
    }
    let filter = match &query.filter {
        Some(text) => Some((
            text.clone(),
            crate::rules::filter::compile(text)
                .map_err(|e| (StatusCode::BAD_REQUEST, format!("filter `{text}`: {e}")))?
                .into_selector(),
        )),
        None => None,
    };
    let (watcher, copies) = shared
        .watchers
        .add(session, filter)
        .map_err(|too_many| (StatusCode::SERVICE_UNAVAILABLE, too_many.to_string()))?;
    tracing::info!("capture of session `{session}` started");
    let watching = Watching {
        shared: shared.clone(),
        watcher,
        ad_hoc: false,
    };
    shared.sync_watched();
    Ok((watching, copies))
}

/// An ad-hoc capture: the watcher first (so that there is room), then its session.
async fn start_ad_hoc(
    shared: &Arc<Shared>,
    query: &CaptureQuery,
) -> Result<(Watching, tokio::sync::mpsc::Receiver<Watched>), (StatusCode, String)> {
    let watch = query
        .ad_hoc()
        .map_err(|why| (StatusCode::BAD_REQUEST, why))?;
    let name = shared.watchers.ad_hoc_name();
    let (watcher, copies) = shared
        .watchers
        .add(&name, None)
        .map_err(|too_many| (StatusCode::SERVICE_UNAVAILABLE, too_many.to_string()))?;
    // From here on, a client that goes (the handler dropped) ends the capture: the watcher
    // goes, and the session goes after the agent has applied it (the requests are in order).
    let watching = Watching {
        shared: shared.clone(),
        watcher,
        ad_hoc: true,
    };
    let (answer, outcome) = tokio::sync::oneshot::channel();
    let request = Request::StartCapture {
        session: name.clone(),
        watch,
        filter: query.filter.clone(),
        answer,
    };
    let stopping = || {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is stopping".to_owned(),
        )
    };
    if shared.requests.send(request).await.is_err() {
        return Err(stopping());
    }
    match outcome.await {
        Ok(Ok(())) => {
            tracing::info!("ad-hoc capture `{name}` started");
            Ok((watching, copies))
        }
        Ok(Err(why)) => Err((StatusCode::UNPROCESSABLE_ENTITY, why)),
        Err(_) => Err(stopping()),
    }
}

/// The pcapng stream of a watcher's copies: a section header, then interface and packet
/// blocks, until `count` copies, the client's going or the agent's stop.
fn stream(
    shared: &Arc<Shared>,
    watching: Watching,
    copies: tokio::sync::mpsc::Receiver<Watched>,
    count: Option<u64>,
) -> Response {
    let mut pcapng = match PcapNgStream::new(Vec::new()) {
        Ok(stream) => stream,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
    };
    let header = std::mem::take(pcapng.out());
    let stop = shared.stop.clone();
    let state = (watching, copies, pcapng, count, stop);
    let blocks = futures_util::stream::unfold(
        state,
        |(watching, mut copies, mut pcapng, left, mut stop)| async move {
            if left == Some(0) || *stop.borrow() {
                return None;
            }
            let copy: Watched = tokio::select! {
                copy = copies.recv() => copy?,
                _ = stop.wait_for(|stop| *stop) => return None,
            };
            pcapng
                .write(
                    copy.interface,
                    || copy.interface_name.to_string(),
                    copy.timestamp,
                    &copy.frame,
                    copy.orig_len,
                )
                .ok()?;
            let bytes = std::mem::take(pcapng.out());
            let left = left.map(|n| n - 1);
            Some((
                Ok::<_, std::convert::Infallible>(bytes),
                (watching, copies, pcapng, left, stop),
            ))
        },
    );
    let header = futures_util::stream::once(async move { Ok(header) });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-pcapng")],
        Body::from_stream(futures_util::StreamExt::chain(header, blocks)),
    )
        .into_response()
}
