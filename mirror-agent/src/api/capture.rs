//! `GET /capture?session=NAME[&filter=EXPR][&count=N]` (the socket only): a live pcapng stream of
//! a session's copies (those a tcpdump expression selects), one interface block per interface and hook, until the client goes, the count is
//! reached or the agent stops. The session is marked watched in the kernel while anyone watches
//! it (see [`crate::watch`]).
use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;

use super::Shared;
use crate::{
    capture::PcapNgStream,
    watch::{Watched, Watcher},
};

#[derive(Debug, Deserialize)]
pub(super) struct CaptureQuery {
    session: String,
    /// Only the copies this tcpdump expression selects.
    filter: Option<String>,
    /// Stop after this many copies.
    count: Option<u64>,
}

/// Removes its watcher when the stream ends or its client goes.
struct Watching {
    shared: Arc<Shared>,
    watcher: Arc<Watcher>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.shared.watchers.remove(self.watcher.id);
        self.shared.sync_watched();
        let (copies, lost) = self.watcher.counts();
        tracing::info!(
            "capture of session `{}` ended: {copies} copies, {lost} lost (the reader was slow)",
            self.watcher.session
        );
    }
}

pub(super) async fn capture(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<CaptureQuery>,
) -> Response {
    let sessions: Vec<String> = shared
        .applied()
        .view
        .sessions
        .iter()
        .map(|s| s.name.clone())
        .collect();
    if !sessions.contains(&query.session) {
        return (
            StatusCode::NOT_FOUND,
            format!(
                "no session `{}` (sessions: {})\n",
                query.session,
                sessions.join(", ")
            ),
        )
            .into_response();
    }
    let filter = match query.filter.filter(|text| !text.trim().is_empty()) {
        Some(text) => match crate::filter::compile(&text) {
            Ok(filter) => Some((text, filter)),
            Err(e) => {
                return (StatusCode::BAD_REQUEST, format!("filter `{text}`: {e}\n"))
                    .into_response();
            }
        },
        None => None,
    };
    let (watcher, copies) = match shared.watchers.add(&query.session, filter) {
        Ok(added) => added,
        Err(too_many) => {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{too_many}\n")).into_response();
        }
    };
    tracing::info!("capture of session `{}` started", query.session);
    let watching = Watching {
        shared: shared.clone(),
        watcher,
    };
    shared.sync_watched();
    let mut pcapng = match PcapNgStream::new(Vec::new()) {
        Ok(stream) => stream,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response(),
    };
    let header = std::mem::take(pcapng.out());
    let stop = shared.stop.clone();
    let state = (watching, copies, pcapng, query.count, stop);
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
