//! Interfaces that appear or go after the start: the agent follows the kernel's link events and
//! attaches to a new interface that a session's glob matches (`veth*`, `lxc*`, `cali*`), or
//! forgets one that is gone, without touching the others. A target interface that is deleted
//! and created again gets its sessions' copies again. When the kernel drops events (the socket's
//! buffer overran), every interface is looked at again.
use std::{collections::HashSet, sync::Arc};

use futures_util::{StreamExt as _, TryStreamExt as _};
use mirror_common::Direction;
use rtnetlink::{
    MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkMessage},
    },
};
use tokio::sync::watch;

use crate::{
    rules::Interface,
    state::{Applied, Shared},
    task::AbortOnDrop,
};

/// The kernel's link events, from the moment this is made.
pub struct LinkEvents {
    connection: rtnetlink::proto::Connection<RouteNetlinkMessage>,
    handle: rtnetlink::Handle,
    messages: futures_channel::mpsc::UnboundedReceiver<(
        rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
}

impl std::fmt::Debug for LinkEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkEvents")
    }
}

/// Subscribes to link events; done before the start is reported, so that no interface that
/// appears after it goes unseen.
pub fn subscribe() -> std::io::Result<LinkEvents> {
    let (connection, handle, messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
    Ok(LinkEvents {
        connection,
        handle,
        messages,
    })
}

/// Follows link `events` until `stop` turns true, for whatever configuration is applied when an
/// event comes. It first looks at every interface once: one may have come or gone between the
/// plan's look and the subscription.
pub async fn run(
    shared: Arc<Shared>,
    events: LinkEvents,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let LinkEvents {
        connection,
        handle,
        mut messages,
    } = events;
    // Ended with this task: it would only complain that nobody reads its events any more.
    let connection = AbortOnDrop(tokio::spawn(connection));
    let _ = &connection;
    resync(&shared, &handle).await?;
    loop {
        let message = tokio::select! {
            message = messages.next() => message,
            _ = stop.wait_for(|stop| *stop) => return Ok(()),
        };
        let Some((message, _)) = message else {
            anyhow::bail!("the kernel closed the link event socket");
        };
        match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                appeared(&shared, &link);
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                if let Some(name) = name_of(&link) {
                    vanished(&shared, &name, link.header.index);
                }
            }
            NetlinkPayload::Overrun(_) => {
                tracing::warn!(
                    "link events were lost (the event socket's buffer overran): looking at every interface again"
                );
                resync(&shared, &handle).await?;
            }
            _ => {}
        }
    }
}

/// Looks at every interface as if it had just appeared, and forgets those that are gone (or
/// were created again under their name: they have another index).
async fn resync(shared: &Shared, handle: &rtnetlink::Handle) -> anyhow::Result<()> {
    let links: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
    let present: HashSet<(String, u32)> = links
        .iter()
        .filter_map(|link| Some((name_of(link)?, link.header.index)))
        .collect();
    let known = {
        let applied = shared.applied();
        let mut known = applied.datapath.attached_interfaces();
        known.extend(
            applied
                .targets
                .interfaces
                .indexes()
                .into_iter()
                .filter_map(|(name, ifindex)| Some((name, ifindex?))),
        );
        known
    };
    for (name, ifindex) in known {
        if !present.contains(&(name.clone(), ifindex)) {
            vanished(shared, &name, ifindex);
        }
    }
    for link in &links {
        appeared(shared, link);
    }
    Ok(())
}

/// Forgets the interface `name` at `ifindex`, which is gone: its hooks, and as a target its
/// sessions' copies (counted as `no_route` until it is back).
fn vanished(shared: &Shared, name: &str, ifindex: u32) {
    let mut applied = shared.applied();
    let Applied {
        datapath,
        follow,
        targets,
        ..
    } = &mut *applied;
    if let Some(follow) = follow {
        follow.forget(ifindex);
    }
    if datapath.forget(name, ifindex) {
        tracing::info!("{name} is gone: forgotten");
    }
    targets.interfaces.vanished(datapath, ifindex);
}

/// Attaches to `link` in each direction some session's glob asks for, unless it is watched
/// already (a link event also comes for every change of an existing interface).
fn appeared(shared: &Shared, link: &LinkMessage) {
    let Some(name) = name_of(link) else {
        return;
    };
    let ifindex = link.header.index;
    let mut applied = shared.applied();
    let Applied {
        datapath,
        follow,
        targets,
        ..
    } = &mut *applied;
    if targets.interfaces.appeared(datapath, &name, ifindex)
        && let Some(follow) = follow
    {
        follow.add_target(ifindex);
    }
    let Some(follow) = follow else {
        return;
    };
    if follow.targets.contains(&ifindex) {
        return;
    }
    let attached = datapath.attached();
    let interface = Interface { name, ifindex };
    for direction in [Direction::Ingress, Direction::Egress, Direction::XdpIngress] {
        if attached
            .iter()
            .any(|(n, d)| *n == interface.name && *d == direction)
        {
            continue;
        }
        let sessions = follow.interface_sessions(&interface, direction);
        if sessions.is_empty() {
            continue;
        }
        let name = &interface.name;
        match follow.watch(datapath, &interface, direction, &sessions) {
            Ok(()) => tracing::info!("{name} appeared: watching it ({direction:?})"),
            Err(e) => tracing::warn!("{name} appeared but could not be watched: {e}"),
        }
    }
}

fn name_of(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}
