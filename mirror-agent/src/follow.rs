//! Interfaces that appear or go after the start: the agent follows the kernel's link events and
//! attaches to a new interface that a session's glob matches (`veth*`, `lxc*`, `cali*`), or
//! forgets one that is gone, without touching the others. A target interface that is deleted
//! and created again gets its sessions' copies again. When the kernel drops events (the socket's
//! buffer overran), every interface is looked at again.
use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
};

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
    api::{Applied, Shared},
    config::PodSelector,
    datapath::Datapath,
    rules::{self, Interface, Rule, Session},
};

/// What the follower needs of the applied plan.
#[derive(Debug)]
pub struct Follow {
    /// Per session: its globs and directions.
    sessions: Vec<(Vec<glob::Pattern>, Vec<Direction>)>,
    /// Per session: the pods it selects instead of interfaces.
    selectors: Vec<Option<PodSelector>>,
    /// The hooks of the plan's sessions that watch interfaces: (ifindex, direction, session).
    planned: Vec<(Interface, Direction, usize)>,
    /// The hooks pod-selector sessions watch now, and those sessions.
    pod_hooks: BTreeMap<(Interface, Direction), Vec<usize>>,
    rules: Vec<Rule>,
    /// Interfaces never to watch: every target (copies would be mirrored again).
    targets: Vec<u32>,
}

impl Follow {
    /// `None` when no session has a glob or a pod selector: there is nothing to follow.
    pub fn new(sessions: &[Session], rules: &[Rule], targets: Vec<u32>) -> Option<Self> {
        let mut planned = Vec::new();
        let mut pod_hooks = BTreeMap::<_, Vec<usize>>::new();
        for (index, session) in sessions.iter().enumerate() {
            for (interface, direction) in &session.attachments {
                if session.pods.is_some() {
                    pod_hooks
                        .entry((interface.clone(), *direction))
                        .or_default()
                        .push(index);
                } else {
                    planned.push((interface.clone(), *direction, index));
                }
            }
        }
        sessions
            .iter()
            .any(|s| !s.globs.is_empty() || s.pods.is_some())
            .then(|| Follow {
                sessions: sessions
                    .iter()
                    .map(|s| (s.globs.clone(), s.directions.clone()))
                    .collect(),
                selectors: sessions.iter().map(|s| s.pods.clone()).collect(),
                planned,
                pod_hooks,
                rules: rules.to_vec(),
                targets,
            })
    }

    /// Every session that watches the attached hook `(interface, direction)` now: by name, glob
    /// or pod.
    pub fn sessions_watching(&self, interface: &str, direction: Direction) -> Vec<usize> {
        let mut sessions = self.named_or_glob(|i| i.name == interface, interface, direction);
        sessions.extend(
            self.pod_hooks
                .iter()
                .filter(|((i, d), _)| i.name == interface && *d == direction)
                .flat_map(|(_, sessions)| sessions.iter().copied()),
        );
        sessions.sort_unstable();
        sessions.dedup();
        sessions
    }

    /// Sessions that watch `interface` in `direction` by name or glob.
    fn interface_sessions(&self, interface: &Interface, direction: Direction) -> Vec<usize> {
        let mut sessions = self.named_or_glob(
            |i| i.ifindex == interface.ifindex,
            &interface.name,
            direction,
        );
        sessions.sort_unstable();
        sessions.dedup();
        sessions
    }

    /// Sessions whose planned interface `is_it` accepts, or whose glob matches `name`, in
    /// `direction` (unsorted, maybe repeated).
    fn named_or_glob(
        &self,
        is_it: impl Fn(&Interface) -> bool,
        name: &str,
        direction: Direction,
    ) -> Vec<usize> {
        self.planned
            .iter()
            .filter(|(i, d, _)| is_it(i) && *d == direction)
            .map(|(_, _, session)| *session)
            .chain(
                self.sessions
                    .iter()
                    .enumerate()
                    .filter(|(_, (globs, directions))| {
                        directions.contains(&direction) && globs.iter().any(|g| g.matches(name))
                    })
                    .map(|(index, _)| index),
            )
            .collect()
    }

    /// Watches the interfaces of the pods the pod-selector sessions select now (`selected`
    /// gives them per selector), and stops watching those of pods no session selects any more.
    /// An interface some session watches by name or glob stays watched for that session.
    pub fn apply_pods(
        &mut self,
        datapath: &mut Datapath,
        selected: impl Fn(&PodSelector) -> Vec<Interface>,
    ) {
        let mut wanted = BTreeMap::<(Interface, Direction), Vec<usize>>::new();
        for (index, selector) in self.selectors.iter().enumerate() {
            let Some(selector) = selector else { continue };
            for interface in selected(selector) {
                if self.targets.contains(&interface.ifindex) {
                    continue;
                }
                for direction in &self.sessions[index].1 {
                    wanted
                        .entry((interface.clone(), *direction))
                        .or_default()
                        .push(index);
                }
            }
        }
        // Hooks let go first: a recreated interface of the same name is watched afresh after.
        let gone: Vec<_> = self
            .pod_hooks
            .keys()
            .filter(|hook| !wanted.contains_key(*hook))
            .cloned()
            .collect();
        for (interface, direction) in gone {
            let sessions = self.interface_sessions(&interface, direction);
            let name = &interface.name;
            if sessions.is_empty() {
                let _ = datapath.unwatch(name, interface.ifindex, direction);
                tracing::info!("{name} ({direction:?}): no selected pod's any more: let go");
            } else if let Err(e) = self.watch(datapath, &interface, direction, &sessions) {
                tracing::warn!(
                    "{name} ({direction:?}): no selected pod's any more, but its other sessions could not be kept: {e}"
                );
            }
            self.pod_hooks.remove(&(interface, direction));
        }
        for ((interface, direction), pod_sessions) in wanted {
            if self.pod_hooks.get(&(interface.clone(), direction)) == Some(&pod_sessions) {
                continue;
            }
            let mut sessions = self.interface_sessions(&interface, direction);
            sessions.extend(&pod_sessions);
            sessions.sort_unstable();
            sessions.dedup();
            let name = &interface.name;
            match self.watch(datapath, &interface, direction, &sessions) {
                Ok(()) => tracing::info!("{name} ({direction:?}): a selected pod's: watching it"),
                Err(e) => tracing::warn!(
                    "{name} ({direction:?}): a selected pod's, but it could not be watched: {e}"
                ),
            }
            self.pod_hooks.insert((interface, direction), pod_sessions);
        }
    }

    fn watch(
        &self,
        datapath: &mut Datapath,
        interface: &Interface,
        direction: Direction,
        sessions: &[usize],
    ) -> Result<(), crate::datapath::DatapathError> {
        let bitmap = || rules::sessions_bitmap(&self.rules, sessions);
        datapath.watch_later(
            &interface.name,
            interface.ifindex,
            direction,
            sessions.to_vec(),
            bitmap,
        )
    }

    /// Never watches `ifindex`: a target interface's new index.
    fn add_target(&mut self, ifindex: u32) {
        if !self.targets.contains(&ifindex) {
            self.targets.push(ifindex);
        }
    }

    /// Forgets the pod hooks of an interface that is gone.
    fn forget(&mut self, ifindex: u32) {
        self.pod_hooks
            .retain(|(interface, _), _| interface.ifindex != ifindex);
    }
}

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
                .interface_indexes()
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
    targets.interface_vanished(datapath, ifindex);
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
    if targets.interface_appeared(datapath, &name, ifindex)
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

/// A task ended when this is dropped.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn name_of(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}
