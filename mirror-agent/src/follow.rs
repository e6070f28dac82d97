//! Interfaces that appear or go after the start: the agent follows the kernel's link events and
//! attaches to a new interface that a session's glob matches (`veth*`, `lxc*`, `cali*`), or
//! forgets one that is gone, without touching the others.
use std::sync::Arc;

use futures_util::StreamExt as _;
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
    rules::{self, Rule, Session},
    tunnel::DEVICE_PREFIX,
};

/// What the follower needs of the applied plan.
#[derive(Debug)]
pub struct Follow {
    /// Per session: its globs and directions.
    sessions: Vec<(Vec<glob::Pattern>, Vec<Direction>)>,
    rules: Vec<Rule>,
    /// Interfaces never to watch: every target (copies would be mirrored again).
    targets: Vec<u32>,
}

impl Follow {
    /// `None` when no session has a glob: there is nothing to follow.
    pub fn new(sessions: &[Session], rules: &[Rule], targets: Vec<u32>) -> Option<Self> {
        sessions
            .iter()
            .any(|s| !s.globs.is_empty())
            .then(|| Follow {
                sessions: sessions
                    .iter()
                    .map(|s| (s.globs.clone(), s.directions.clone()))
                    .collect(),
                rules: rules.to_vec(),
                targets,
            })
    }
}

/// Follows link events until `stop` turns true, for whatever configuration is applied when an
/// event comes.
pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let (connection, _, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
    // Ended with this task: it would only complain that nobody reads its events any more.
    let connection = AbortOnDrop(tokio::spawn(connection));
    let _ = &connection;
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
                if let Some(name) = name_of(&link)
                    && shared.applied().datapath.forget(&name, link.header.index)
                {
                    tracing::info!("{name} is gone: forgotten");
                }
            }
            _ => {}
        }
    }
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
        datapath, follow, ..
    } = &mut *applied;
    let Some(follow) = follow else {
        return;
    };
    if follow.targets.contains(&ifindex) || name.starts_with(DEVICE_PREFIX) {
        return;
    }
    let attached = datapath.attached();
    for direction in [Direction::Ingress, Direction::Egress, Direction::XdpIngress] {
        if attached.iter().any(|(n, d)| *n == name && *d == direction) {
            continue;
        }
        let sessions: Vec<usize> = follow
            .sessions
            .iter()
            .enumerate()
            .filter(|(_, (globs, directions))| {
                directions.contains(&direction) && globs.iter().any(|g| g.matches(&name))
            })
            .map(|(index, _)| index)
            .collect();
        if sessions.is_empty() {
            continue;
        }
        let result = datapath.watch_later(&name, ifindex, direction, sessions.clone(), || {
            rules::sessions_bitmap(&follow.rules, &sessions)
        });
        match result {
            Ok(()) => tracing::info!("{name} appeared: watching it ({direction:?})"),
            Err(e) => tracing::warn!("{name} appeared but could not be watched: {e}"),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

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
