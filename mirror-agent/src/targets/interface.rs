//! Interface targets: copies sent out of an interface as they are, cloned there by the TC
//! programs, or sent by the ring drain on a packet socket (XDP sessions). The interface is
//! followed by name: one deleted and created again has a new index, and meanwhile its sessions'
//! copies are counted as `no_route`. Also the node's interfaces, which sessions watch and targets
//! name.
use std::{
    io,
    os::fd::{AsFd, AsRawFd as _, OwnedFd},
};

use anyhow::{Context as _, bail};
use futures_util::TryStreamExt as _;
use mirror_common::SessionMeta;
use nix::sys::socket::MsgFlags;
use rtnetlink::{
    Handle,
    packet_route::link::{LinkAttribute, LinkMessage},
};

use super::{
    KernelEntries, Target, TargetError,
    ring::{Outbox, RingCopy, SessionCounters, Sink},
};

/// A network interface present on the node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
}

/// The interfaces of this network namespace. One whose name is not UTF-8 is left out (with a
/// warning): no configuration can name it, and a lossy name would match globs it does not.
pub fn present() -> io::Result<Vec<Interface>> {
    let list = nix::net::if_::if_nameindex()?;
    let mut out = Vec::new();
    for entry in &list {
        let ifindex = entry.index();
        if let Ok(name) = entry.name().to_str() {
            out.push(Interface {
                name: name.to_owned(),
                ifindex,
            });
        } else {
            tracing::warn!("interface {ifindex} has a name that is not UTF-8: it is never watched");
        }
    }
    Ok(out)
}

/// `interface = "NAME"`, which must be there.
pub(super) fn resolve(name: &str, interfaces: &[Interface]) -> Result<Target, String> {
    interfaces
        .iter()
        .find(|i| i.name == name)
        .cloned()
        .map(Target::Interface)
        .ok_or_else(|| format!("target interface `{name}` does not exist"))
}

/// The interfaces' MTU allows this much more than the MTU as a frame: the Ethernet header and one
/// VLAN tag (what the kernel's veth and most drivers accept).
const ETHERNET_AND_TAG: u32 = 14 + 4;

/// The largest copy `interface` carries whole.
pub(super) async fn max_copy_len(
    handle: &Handle,
    interface: &Interface,
) -> Result<u32, TargetError> {
    let ifindex = interface.ifindex;
    let mtu = link(handle, ifindex)
        .await?
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
        .ok_or(TargetError::Vanished(ifindex))?;
    Ok(mtu + ETHERNET_AND_TAG)
}

/// The link with this index, if there is one.
pub(super) async fn link_by_index(
    handle: &Handle,
    ifindex: u32,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    handle
        .link()
        .get()
        .match_index(ifindex)
        .execute()
        .try_next()
        .await
}

pub(super) async fn link(handle: &Handle, ifindex: u32) -> Result<LinkMessage, TargetError> {
    link_by_index(handle, ifindex)
        .await
        .map_err(|source| TargetError::Netlink {
            what: format!("looking up interface {ifindex}"),
            source,
        })?
        .ok_or(TargetError::Vanished(ifindex))
}

/// A session whose target is an interface, and the index that interface has now.
#[derive(Debug, Clone)]
struct InterfaceSession {
    session: u32,
    name: String,
    interface: String,
    /// `None` while the interface is gone (its copies are then counted as `no_route`).
    ifindex: Option<u32>,
    /// The session's `SESSIONS` entry, whose target index follows the interface.
    meta: SessionMeta,
}

/// The interface targets of the applied configuration, followed by name.
#[derive(Debug, Default)]
pub struct Following {
    sessions: Vec<InterfaceSession>,
}

impl Following {
    pub(super) fn add(
        &mut self,
        session: u32,
        name: &str,
        interface: &Interface,
        meta: SessionMeta,
    ) {
        self.sessions.push(InterfaceSession {
            session,
            name: name.to_owned(),
            interface: interface.name.clone(),
            ifindex: Some(interface.ifindex),
            meta,
        });
    }

    /// The interface `name` is at `ifindex` now: the sessions whose target it is send their
    /// copies there (the copy program attached first where they need it). Returns whether it is
    /// a target.
    pub fn appeared(&mut self, kernel: &mut impl KernelEntries, name: &str, ifindex: u32) -> bool {
        self.point(kernel, |t| t.interface == name, Some(ifindex));
        self.sessions.iter().any(|t| t.interface == name)
    }

    /// The interface at `ifindex` is gone: the sessions whose target it was count their copies
    /// as `no_route` until it is back.
    pub fn vanished(&mut self, kernel: &mut impl KernelEntries, ifindex: u32) {
        self.point(kernel, |t| t.ifindex == Some(ifindex), None);
    }

    /// Points the sessions `which` selects at `ifindex`, where they are not already.
    fn point(
        &mut self,
        kernel: &mut impl KernelEntries,
        which: impl Fn(&InterfaceSession) -> bool,
        ifindex: Option<u32>,
    ) {
        for target in self
            .sessions
            .iter_mut()
            .filter(|t| which(t) && t.ifindex != ifindex)
        {
            let name = &target.interface;
            let meta = SessionMeta {
                target_ifindex: ifindex.unwrap_or(0),
                ..target.meta
            };
            let finish = ifindex.is_some() && meta.finish != 0;
            let written = if finish {
                kernel.finish_copies_at(name)
            } else {
                Ok(())
            }
            .and_then(|()| kernel.set_session(target.session, &meta));
            let session = &target.name;
            match (written, ifindex) {
                (Ok(()), Some(_)) => {
                    tracing::info!("session `{session}`: target {name} is back: copies resume");
                }
                (Ok(()), None) => tracing::warn!(
                    "session `{session}`: target {name} is gone: its copies are counted as no_route until it is back"
                ),
                (Err(e), _) => {
                    tracing::warn!("session `{session}`: following target {name}: {e}");
                    continue;
                }
            }
            target.meta = meta;
            target.ifindex = ifindex;
        }
    }

    /// The target interfaces of the sessions, and their indexes now.
    pub fn indexes(&self) -> Vec<(String, Option<u32>)> {
        self.sessions
            .iter()
            .map(|t| (t.interface.clone(), t.ifindex))
            .collect()
    }

    /// What keeps sessions from sending copies now: target interfaces that are gone.
    pub fn missing(&self) -> Vec<String> {
        self.sessions
            .iter()
            .filter(|t| t.ifindex.is_none())
            .map(|t| {
                format!(
                    "session `{}`: target interface {} is gone",
                    t.name, t.interface
                )
            })
            .collect()
    }
}

/// A packet socket that sends frames out of `interface` as they are.
pub fn open_tap(interface: &str) -> anyhow::Result<OwnedFd> {
    let Ok(ifindex) = nix::net::if_::if_nametoindex(interface) else {
        bail!("--tap: interface `{interface}` does not exist");
    };
    crate::sys::socket::packet_socket(ifindex)
        .with_context(|| format!("opening a packet socket on {interface}"))
}

pub fn send_frame(socket: impl AsFd, frame: &[u8]) -> io::Result<()> {
    nix::sys::socket::send(socket.as_fd().as_raw_fd(), frame, MsgFlags::empty())?;
    Ok(())
}

/// Ring copies sent out of the target interface on a packet socket, in batches.
pub(super) struct PacketSink {
    socket: OwnedFd,
    outbox: Outbox,
}

impl PacketSink {
    pub(super) fn open(interface: &Interface) -> anyhow::Result<Self> {
        Ok(PacketSink {
            socket: open_tap(&interface.name)?,
            outbox: Outbox::default(),
        })
    }
}

impl Sink for PacketSink {
    fn push(&mut self, copy: &RingCopy<'_>, counters: &SessionCounters) {
        self.outbox.next().extend_from_slice(copy.frame);
        if self.outbox.is_full() {
            self.flush(counters);
        }
    }

    fn flush(&mut self, counters: &SessionCounters) {
        self.outbox.send(&self.socket, None, counters);
    }
}
