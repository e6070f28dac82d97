//! Tunnel sessions' paths: route, neighbour and link events (and a periodic look, as events can
//! be lost) move each tunnel session of the applied configuration onto the hop the kernel's
//! tables give now, and ask the kernel to resolve a next hop that is not yet.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::watch;

use crate::{
    state::{Applied, Shared},
    targets::{
        self,
        tunnel::path::{NoHop, kick, resolve},
    },
    task::AbortOnDrop,
};

/// At most one resolution request per next hop in this time.
const KICK_PERIOD: Duration = Duration::from_secs(1);
/// How often every tunnel's hop is looked up again even without an event (events can be lost
/// when the socket overflows).
const RESYNC_PERIOD: Duration = Duration::from_secs(2);
/// Events that come in a burst are answered once, this long after the first.
const SETTLE: Duration = Duration::from_millis(5);

/// Follows route, neighbour and link events until `stop` turns true, and keeps every tunnel
/// session of the applied configuration on the hop the kernel's tables give now.
pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let (connection, _, mut events) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Neigh,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ])?;
    let connection = AbortOnDrop(tokio::spawn(connection));
    let handle = targets::netlink()?;
    let mut kicked: HashMap<(u32, IpAddr), Instant> = HashMap::new();
    let mut resync = tokio::time::interval(RESYNC_PERIOD);
    loop {
        let event = tokio::select! {
            event = events.next() => Some(event),
            _ = resync.tick() => None,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        if let Some(event) = event {
            if event.is_none() {
                anyhow::bail!("the kernel closed the route event socket");
            }
            // A burst (a route change brings several messages) is answered once.
            tokio::time::sleep(SETTLE).await;
            while events.try_recv().is_ok() {}
        }
        refresh(&shared, &handle, &mut kicked).await;
    }
    drop(connection);
    Ok(())
}

/// Looks every tunnel's hop up and applies those that changed.
async fn refresh(shared: &Shared, handle: &Handle, kicked: &mut HashMap<(u32, IpAddr), Instant>) {
    let (generation, targets) = {
        let applied = shared.applied();
        (
            applied.datapath.generation(),
            applied.targets.tunnels.targets(),
        )
    };
    let mut found = Vec::with_capacity(targets.len());
    for (session, target) in targets {
        let hop = resolve(handle, &target).await;
        if let Err(NoHop::Unresolved {
            next_hop, ifindex, ..
        }) = &hop
        {
            let key = (*ifindex, *next_hop);
            if kicked
                .get(&key)
                .is_none_or(|at| at.elapsed() >= KICK_PERIOD)
            {
                kicked.insert(key, Instant::now());
                kick(handle, *ifindex, *next_hop).await;
            }
        }
        found.push((session, hop));
    }
    let mut applied = shared.applied();
    // A reload meanwhile brought its own hops: the next event or resync looks at those.
    if applied.datapath.generation() != generation {
        return;
    }
    let Applied {
        datapath, targets, ..
    } = &mut *applied;
    for (session, hop) in found {
        targets.tunnels.apply(datapath, session, hop);
    }
}
