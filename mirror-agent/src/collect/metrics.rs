//! `collect --metrics ADDRESS`: the receiver's counts as Prometheus metrics (`/metrics`, and
//! `/healthz`; with `--shadow`, its requests' outcomes as the agent's shadow sessions count them),
//! served with the agent's bounds on connections, header size and time.
use std::sync::{Arc, Mutex, PoisonError};

use axum::{Router, extract::State, response::IntoResponse, routing::get};
use prometheus_client::{
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::watch;

use super::Counts;
use crate::api::{Labels, Limits, counter_family, register_shadows, serve_bounded};

/// The counts as the receive loop last published them (every 100 ms at most, and at the end).
pub(super) type Published = Arc<Mutex<Counts>>;

/// Serves the published counts on `listener` until `stop` turns true.
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    published: Published,
    stop: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(published);
    serve_bounded(listener, app, Limits::NETWORK, stop).await;
}

async fn metrics(State(published): State<Published>) -> impl IntoResponse {
    let counts = published
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        encode(&counts),
    )
}

/// The counts in `OpenMetrics` text.
fn encode(counts: &Counts) -> String {
    let mut registry = Registry::with_prefix("mirror_collect");
    let mut family = |name: &str, help: &str| counter_family(&mut registry, name, help);
    let frames = family("frames", "Inner frames taken, by stream");
    let bytes = family("frame_bytes", "Bytes of the inner frames taken, by stream");
    let lost = family(
        "lost_copies",
        "Copies that never arrived, by the gaps in an ERSPAN stream's sequence numbers",
    );
    // The reasons are named once, by `Counts::dropped`.
    let reasons: Vec<&str> = counts.dropped().iter().map(|(reason, _)| *reason).collect();
    let dropped = family(
        "dropped",
        &format!(
            "Datagrams not taken and frames not passed on, by reason ({})",
            reasons.join(", ")
        ),
    );
    for (stream, tracked) in &counts.streams {
        let labels = vec![("stream", stream.label())];
        frames.get_or_create(&labels).inc_by(tracked.frames);
        bytes.get_or_create(&labels).inc_by(tracked.bytes);
        lost.get_or_create(&labels).inc_by(tracked.gaps.lost);
    }
    for (reason, count) in counts.dropped() {
        dropped
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc_by(count);
    }
    register_shadows(
        &mut registry,
        counts
            .shadow
            .iter()
            .map(|shadow| (vec![("shadow", shadow.url.clone())], shadow)),
    );
    let build = Family::<Labels, Gauge>::default();
    registry.register(
        "build_info",
        "The collector's version (always 1)",
        build.clone(),
    );
    build
        .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_owned())])
        .set(1);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    crate::api::in_stable_order(&out)
}
