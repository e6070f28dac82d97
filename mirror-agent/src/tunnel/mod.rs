//! What targets need at run time: the largest copy each carries whole and, for tunnels, where
//! their copies leave and the outer headers they get.
//!
//! A tunnel needs no device: the mirror program clones a copy to the underlay interface the
//! route to the collector leaves through, and the copy program there puts the session's outer
//! headers on it ([`header`]) and addresses it to the next hop's MAC address ([`path`]). Nothing
//! listens on the node for it, and nothing is decapsulated.
pub mod path;
pub mod send;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
};

use futures_util::TryStreamExt as _;
use mirror_common::{SessionMeta, TARGET_INTERFACE, TARGET_RING, TARGET_TUNNEL};
use rtnetlink::{
    Handle,
    packet_route::link::{LinkAttribute, LinkMessage},
};

use self::path::NoHop;
use crate::{
    datapath::Datapath,
    encap::{self, Hop, TunnelTarget},
    rules::{Controls, Session, Target},
};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("opening a netlink socket: {0}")]
    Connect(io::Error),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("collector {remote}: {source}")]
    Path { remote: IpAddr, source: io::Error },
    #[error("interface index {0} vanished")]
    Vanished(u32),
}

/// The interfaces' MTU allows this much more than the MTU as a frame: the Ethernet header and one
/// VLAN tag (what the kernel's veth and most drivers accept).
const ETHERNET_AND_TAG: u32 = 14 + 4;

/// What the programs need per session, and the targets the followers keep up to date.
#[derive(Debug)]
pub struct ResolvedTargets {
    pub sessions: Vec<SessionMeta>,
    pub targets: Targets,
}

/// One tunnel session whose copies the kernel encapsulates.
#[derive(Debug, Clone)]
struct TunnelSession {
    session: u32,
    name: String,
    target: TunnelTarget,
    /// The session's `SESSIONS` entry: its size limit follows the hop's MTU.
    meta: SessionMeta,
    /// The configured snaplen, cut to what the hop carries.
    snaplen: Option<u32>,
    hop: Result<Hop, NoHop>,
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

/// The targets of the applied configuration as they are now: the hops tunnel copies take, and
/// the indexes of target interfaces (an interface deleted and created again has a new one).
#[derive(Debug, Default)]
pub struct Targets {
    sessions: Vec<TunnelSession>,
    interfaces: Vec<InterfaceSession>,
    /// UDP source ports are picked from this range.
    ports: (u16, u16),
}

impl Targets {
    /// The interface `name` is at `ifindex` now: the sessions whose target it is send their
    /// copies there (the copy program attached first where they need it). Returns whether it is
    /// a target.
    pub fn interface_appeared(
        &mut self,
        datapath: &mut Datapath,
        name: &str,
        ifindex: u32,
    ) -> bool {
        self.point(datapath, |t| t.interface == name, Some(ifindex));
        self.interfaces.iter().any(|t| t.interface == name)
    }

    /// The interface at `ifindex` is gone: the sessions whose target it was count their copies
    /// as `no_route` until it is back.
    pub fn interface_vanished(&mut self, datapath: &mut Datapath, ifindex: u32) {
        self.point(datapath, |t| t.ifindex == Some(ifindex), None);
    }

    /// Points the interface sessions `which` selects at `ifindex`, where they are not already.
    fn point(
        &mut self,
        datapath: &mut Datapath,
        which: impl Fn(&InterfaceSession) -> bool,
        ifindex: Option<u32>,
    ) {
        for target in self
            .interfaces
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
                datapath.finish_copies_at(name)
            } else {
                Ok(())
            }
            .and_then(|()| datapath.set_session(target.session, &meta));
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

    /// Every interface copies leave by now: the target interfaces that are there and the
    /// tunnels' underlays, each once, by name.
    pub fn sending_interfaces(&self) -> Vec<(String, u32)> {
        let mut out: Vec<_> = self
            .interface_indexes()
            .into_iter()
            .filter_map(|(name, ifindex)| Some((name, ifindex?)))
            .chain(self.interfaces())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The target interfaces of the sessions, and their indexes now.
    pub fn interface_indexes(&self) -> Vec<(String, Option<u32>)> {
        self.interfaces
            .iter()
            .map(|t| (t.interface.clone(), t.ifindex))
            .collect()
    }

    /// What keeps sessions from sending copies now: target interfaces that are gone.
    pub fn missing(&self) -> Vec<String> {
        self.interfaces
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

    /// Each tunnel session and its target.
    pub fn targets(&self) -> Vec<(u32, TunnelTarget)> {
        self.sessions
            .iter()
            .map(|t| (t.session, t.target.clone()))
            .collect()
    }

    /// The `TUNNELS` entries of the sessions that have a hop.
    pub fn entries(&self) -> Vec<(u32, mirror_common::Tunnel)> {
        self.sessions
            .iter()
            .filter_map(|t| {
                let hop = t.hop.as_ref().ok()?;
                Some((t.session, encap::template(&t.target, hop, self.ports)))
            })
            .collect()
    }

    /// The interfaces tunnel copies leave through now, (name, ifindex).
    pub fn interfaces(&self) -> Vec<(String, u32)> {
        let mut out: Vec<_> = self
            .sessions
            .iter()
            .filter_map(|t| t.hop.as_ref().ok())
            .map(|hop| (hop.interface.clone(), hop.ifindex))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Per tunnel session: its name, target, and the hop or why there is none.
    pub fn report(&self) -> Vec<(String, String, Result<Hop, NoHop>)> {
        self.sessions
            .iter()
            .map(|t| (t.name.clone(), t.target.to_string(), t.hop.clone()))
            .collect()
    }

    /// Takes `session` to `hop` if it changed: the copy program goes to a new interface first,
    /// then the session's size limit and its `TUNNELS` entry are rewritten (or the entry removed:
    /// copies are then counted as `no_route`).
    pub fn apply(&mut self, datapath: &mut Datapath, session: u32, hop: Result<Hop, NoHop>) {
        let ports = self.ports;
        let Some(tunnel) = self.sessions.iter_mut().find(|t| t.session == session) else {
            return;
        };
        if tunnel.hop == hop {
            return;
        }
        let name = &tunnel.name;
        let written = match &hop {
            Ok(next) => datapath
                .finish_copies_at(&next.interface)
                .and_then(|()| {
                    tunnel.meta = sized(tunnel.meta, tunnel.snaplen, Some(next), &tunnel.target);
                    datapath.set_session(session, &tunnel.meta)
                })
                .and_then(|()| {
                    datapath.set_tunnel(session, &encap::template(&tunnel.target, next, ports))
                }),
            Err(_) => datapath.clear_tunnel(session),
        };
        match (&hop, written) {
            (Ok(next), Ok(())) => tracing::info!(
                "session `{name}`: copies to {} now leave {} for {}",
                tunnel.target.remote,
                next.interface,
                mac_text(next.next_hop_mac)
            ),
            (Err(why), Ok(())) => tracing::warn!(
                "session `{name}`: {why}: its copies are counted as no_route until the path is back"
            ),
            (_, Err(e)) => {
                tracing::warn!("session `{name}`: applying the new path: {e}");
                // Tried again at the next event or resync.
                return;
            }
        }
        tunnel.hop = hop;
    }
}

/// A MAC address as text.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// A netlink handle whose connection runs on the current tokio runtime.
pub fn netlink() -> Result<Handle, TunnelError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(TunnelError::Connect)?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Resolves every session's target: its size limit and, for a tunnel, the hop its copies take.
/// A tunnel without a route or next hop now does not fail the start: its copies are counted as
/// `no_route` until the path follower finds one.
pub async fn resolve(sessions: &[Session]) -> Result<ResolvedTargets, TunnelError> {
    let handle = netlink()?;
    let mut metas = Vec::with_capacity(sessions.len());
    let mut targets = Targets {
        sessions: Vec::new(),
        interfaces: Vec::new(),
        ports: encap::local_port_range(),
    };
    for (index, session) in sessions.iter().enumerate() {
        let meta = match &session.target {
            Target::Interface(interface) => SessionMeta {
                target_ifindex: interface.ifindex,
                target_kind: if session.through_ring {
                    TARGET_RING
                } else {
                    TARGET_INTERFACE
                },
                max_copy_len: mtu(&handle, interface.ifindex).await? + ETHERNET_AND_TAG,
                ..SessionMeta::default()
            },
            // The agent sends these itself, on a socket.
            Target::Tunnel(target) if session.through_ring => SessionMeta {
                target_kind: TARGET_RING,
                max_copy_len: max_tunnel_copy_len(target)?,
                ..SessionMeta::default()
            },
            Target::Tunnel(target) => {
                let hop = path::resolve_at_start(&handle, target).await;
                if let Err(why) = &hop {
                    tracing::warn!(
                        "session `{}`: {why}: its copies are counted as no_route until the path is back",
                        session.name
                    );
                }
                let meta = with_controls(
                    SessionMeta {
                        target_kind: TARGET_TUNNEL,
                        ..SessionMeta::default()
                    },
                    &session.controls,
                );
                let meta = sized(meta, session.controls.snaplen, hop.as_ref().ok(), target);
                targets.sessions.push(TunnelSession {
                    session: index as u32,
                    name: session.name.clone(),
                    target: target.clone(),
                    meta,
                    snaplen: session.controls.snaplen,
                    hop,
                });
                metas.push(meta);
                continue;
            }
            Target::File(_) | Target::Watch => SessionMeta {
                target_kind: TARGET_RING,
                ..SessionMeta::default()
            },
        };
        let meta = with_controls(meta, &session.controls);
        if let Target::Interface(interface) = &session.target {
            targets.interfaces.push(InterfaceSession {
                session: index as u32,
                name: session.name.clone(),
                interface: interface.name.clone(),
                ifindex: Some(interface.ifindex),
                meta,
            });
        }
        metas.push(meta);
    }
    Ok(ResolvedTargets {
        sessions: metas,
        targets,
    })
}

/// A tunnel session's entry with the size limit of `hop` (none while there is no hop: nothing is
/// sent then) and the snaplen cut to it.
fn sized(
    meta: SessionMeta,
    snaplen: Option<u32>,
    hop: Option<&Hop>,
    target: &TunnelTarget,
) -> SessionMeta {
    let max_copy_len = hop.map_or(0, |hop| hop.mtu.saturating_sub(encap::overhead(target)));
    SessionMeta {
        max_copy_len,
        snaplen: clamp_snaplen(snaplen, max_copy_len),
        ..meta
    }
}

/// The snaplen never exceeds what the target carries, so that a cut copy always fits.
fn clamp_snaplen(snaplen: Option<u32>, max_copy_len: u32) -> u32 {
    match (snaplen, max_copy_len) {
        (None, _) => 0,
        (Some(snaplen), 0) => snaplen,
        (Some(snaplen), max) => snaplen.min(max),
    }
}

/// Adds a session's controls to its target's entry.
fn with_controls(meta: SessionMeta, controls: &Controls) -> SessionMeta {
    let snaplen = clamp_snaplen(controls.snaplen, meta.max_copy_len);
    SessionMeta {
        snaplen,
        // Ring copies are cut as they are queued; clones that need a cut or outer headers are
        // finished by the copy program at the target.
        finish: u32::from(
            meta.target_kind != TARGET_RING
                && (snaplen != 0 || meta.target_kind != TARGET_INTERFACE),
        ),
        sample_mode: controls.sample_mode,
        sample_every: controls.sample_every,
        sample_seed: controls.sample_seed,
        skip_unparsed: u32::from(controls.skip_unparsed),
        rate: controls.rate,
        ..meta
    }
}

/// The largest inner frame a copy the agent sends itself may be: the path MTU the kernel's route
/// to the collector has (found by connecting a UDP socket, which sends nothing) minus the
/// encapsulation. Fails when there is no route, or `local` is not an address of this node.
pub fn max_tunnel_copy_len(target: &TunnelTarget) -> Result<u32, TunnelError> {
    let remote = SocketAddr::new(target.remote, target.format.udp_port().unwrap_or(9));
    let path_error = |source| TunnelError::Path {
        remote: target.remote,
        source,
    };
    let local = target.local.unwrap_or(match target.remote {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    });
    let socket = UdpSocket::bind((local, 0)).map_err(path_error)?;
    socket.connect(remote).map_err(path_error)?;
    let (level, name) = match target.remote {
        IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_MTU),
        IpAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_MTU),
    };
    let mtu = crate::sys::socket::int_option(&socket, level, name).map_err(path_error)?;
    Ok(mtu.cast_unsigned().saturating_sub(encap::overhead(target)))
}

/// The link with this index, if there is one.
async fn link_by_index(
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

async fn link(handle: &Handle, ifindex: u32) -> Result<LinkMessage, TunnelError> {
    link_by_index(handle, ifindex)
        .await
        .map_err(|source| TunnelError::Netlink {
            what: format!("looking up interface {ifindex}"),
            source,
        })?
        .ok_or(TunnelError::Vanished(ifindex))
}

/// An interface's MTU.
async fn mtu(handle: &Handle, ifindex: u32) -> Result<u32, TunnelError> {
    link(handle, ifindex)
        .await?
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
        .ok_or(TunnelError::Vanished(ifindex))
}

/// Copies the kernel lost after they left the programs, on an interface they leave by.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TxLosses {
    pub interface: String,
    pub tx_dropped: u64,
    pub tx_errors: u64,
}

/// The transmit drops and errors the kernel counted on each of `interfaces` (see
/// [`Targets::sending_interfaces`]); one that cannot be read is left out, with a warning.
pub async fn tx_losses(interfaces: Vec<(String, u32)>) -> Vec<TxLosses> {
    let handle = match netlink() {
        Ok(handle) => handle,
        Err(e) => {
            tracing::warn!("the targets' counters: {e}");
            return Vec::new();
        }
    };
    let mut out = Vec::with_capacity(interfaces.len());
    for (interface, ifindex) in interfaces {
        match link(&handle, ifindex).await {
            Ok(link) => {
                let (tx_dropped, tx_errors) = link
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        LinkAttribute::Stats64(s) => Some((s.tx_dropped, s.tx_errors)),
                        _ => None,
                    })
                    .unwrap_or_default();
                out.push(TxLosses {
                    interface,
                    tx_dropped,
                    tx_errors,
                });
            }
            Err(e) => tracing::warn!("the counters of target {interface}: {e}"),
        }
    }
    out
}
