//! Serving HTTP with bounds, for listeners anyone on the network may reach: caps on open
//! connections, in all and per client address (more are closed at once, so that one client
//! cannot crowd out the probes and Prometheus), a bound on a request's header size and on the
//! time its header may take, and a stop that cuts what is still open after a grace period.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, serve::Listener};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::sync::{Semaphore, watch};

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; one more is closed as soon as it is accepted.
    pub connections: usize,
    /// Connections open at once from one client address.
    pub per_client: usize,
    /// The read buffer, and so the largest request header (hyper's minimum is 8 KiB).
    pub header_bytes: usize,
    /// How long a client may take to send a request's header, and how long a kept-alive
    /// connection may wait idle for its next request.
    pub header_time: Duration,
    /// How long a stop waits for the requests under way before it cuts them.
    pub grace: Duration,
}

impl Limits {
    /// Prometheus scrapes, probes and a few dashboards need no more.
    pub const NETWORK: Limits = Limits {
        connections: 256,
        per_client: 16,
        header_bytes: 16 * 1024,
        header_time: Duration::from_secs(5),
        grace: Duration::from_secs(3),
    };
}

/// The connections open per client address.
#[derive(Debug, Default)]
struct PerClient(Mutex<HashMap<IpAddr, usize>>);

impl PerClient {
    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a connection from `client` unless it has `limit` open already; the slot is
    /// given back when the returned guard is dropped.
    fn enter(self: &Arc<Self>, client: IpAddr, limit: usize) -> Option<ClientSlot> {
        let mut counts = self.counts();
        let open = counts.entry(client).or_default();
        if *open >= limit {
            return None;
        }
        *open += 1;
        Some(ClientSlot {
            clients: self.clone(),
            client,
        })
    }
}

/// One open connection of a client (see [`PerClient::enter`]).
#[derive(Debug)]
struct ClientSlot {
    clients: Arc<PerClient>,
    client: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.clients.counts();
        if let Some(open) = counts.get_mut(&self.client) {
            *open -= 1;
            if *open == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

/// A listener's client address, where it has one (a Unix socket's clients have none).
pub trait ClientAddress {
    fn client_ip(&self) -> Option<IpAddr>;
}

impl ClientAddress for std::net::SocketAddr {
    fn client_ip(&self) -> Option<IpAddr> {
        Some(self.ip().to_canonical())
    }
}

impl ClientAddress for tokio::net::unix::SocketAddr {
    fn client_ip(&self) -> Option<IpAddr> {
        None
    }
}

/// Serves `app` on `listener` within `limits` until `stop` turns true; then waits for the open
/// connections up to `limits.grace` and cuts the rest.
pub async fn serve<L>(mut listener: L, app: Router, limits: Limits, mut stop: watch::Receiver<bool>)
where
    L: Listener,
    L::Addr: ClientAddress,
{
    let open = Arc::new(Semaphore::new(limits.connections));
    let clients = Arc::<PerClient>::default();
    let graceful = GracefulShutdown::new();
    // Dropped at the end: whatever is still open after the grace period is cut.
    let mut connections = tokio::task::JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_time)
        .max_buf_size(limits.header_bytes.max(8192));
    loop {
        let (io, address) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        while connections.try_join_next().is_some() {}
        let Ok(permit) = open.clone().try_acquire_owned() else {
            tracing::debug!("{} connections open: closing a new one", limits.connections);
            continue;
        };
        let client = address.client_ip();
        let slot = client.map(|client| clients.enter(client, limits.per_client));
        if let (Some(client), Some(None)) = (client, &slot) {
            tracing::debug!(
                "{client} has {} connections open: closing a new one",
                limits.per_client
            );
            continue;
        }
        let connection =
            http.serve_connection(TokioIo::new(io), TowerToHyperService::new(app.clone()));
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            let _ = connection.await;
            drop((permit, slot));
        });
    }
    if tokio::time::timeout(limits.grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "an API connection was still open {:?} after the stop: cut off",
            limits.grace
        );
    }
}
