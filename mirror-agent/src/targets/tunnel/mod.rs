//! Tunnel targets: copies to a remote collector in VXLAN, GENEVE, GRE or ERSPAN.
//!
//! A tunnel needs no device: the mirror program clones a copy to the underlay interface the
//! route to the collector leaves through, and the copy program there puts the session's outer
//! headers on it (`encap::template`) and addresses it to the next hop's MAC address ([`path`],
//! followed by `follow::routes`). Nothing listens on the node for it, and nothing is
//! decapsulated. XDP sessions' copies come through the ring and are sent from userspace
//! ([`send`]).
pub mod path;
pub mod send;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

use mirror_common::{SessionMeta, TARGET_TUNNEL};
use serde::{Deserialize, Serialize};

use self::{path::NoHop, send::TunnelSender};
use super::{
    KernelEntries, SessionTarget, Target, TargetError, clamp_snaplen, entry,
    ring::{Outbox, RingCopy, SessionCounters, Sink},
};
use crate::{
    encap::{self, Hop, TunnelFormat, TunnelTarget},
    values::{ErspanSessionId, Vni},
};

/// A VXLAN tunnel to a collector (Zeek, Suricata, Wireshark, a packet broker, `mirror-agent
/// collect`).
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VxlanConfig {
    /// The collector's IPv4 or IPv6 address.
    pub remote: IpAddr,
    /// VXLAN network identifier, 0..=16777215: tells the collector which session a copy is from.
    pub vni: Vni,
    /// Destination UDP port.
    #[serde(default = "default_vxlan_port")]
    pub port: u16,
    /// Source address of the outer packets (same family as `remote`); by default the route's.
    pub local: Option<IpAddr>,
}

/// The IANA VXLAN port.
pub const DEFAULT_VXLAN_PORT: u16 = 4789;

fn default_vxlan_port() -> u16 {
    DEFAULT_VXLAN_PORT
}

/// A GENEVE tunnel (RFC 8926) to a collector.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GeneveConfig {
    /// The collector's IPv4 or IPv6 address.
    pub remote: IpAddr,
    /// Virtual network identifier, 0..=16777215.
    pub vni: Vni,
    /// Destination UDP port.
    #[serde(default = "default_geneve_port")]
    pub port: u16,
    /// Source address of the outer packets (same family as `remote`); by default the route's.
    pub local: Option<IpAddr>,
}

/// The IANA GENEVE port.
pub const DEFAULT_GENEVE_PORT: u16 = 6081;

fn default_geneve_port() -> u16 {
    DEFAULT_GENEVE_PORT
}

/// A GRE tunnel carrying Ethernet frames (protocol 0x6558) to a collector.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GreConfig {
    /// The collector's IPv4 or IPv6 address.
    pub remote: IpAddr,
    /// The GRE key (32 bits), sent when given: tells the collector which session a copy is from.
    pub key: Option<u32>,
    /// Source address of the outer packets (same family as `remote`); by default the route's.
    pub local: Option<IpAddr>,
}

/// An ERSPAN session to a collector (a switch's ERSPAN destination, a packet broker, Wireshark).
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ErspanConfig {
    /// The collector's IPv4 or IPv6 address.
    pub remote: IpAddr,
    /// The ERSPAN session id, 0..=1023.
    pub session_id: ErspanSessionId,
    /// ERSPAN type: 2 (type II) or 3 (type III, with a timestamp and the direction).
    #[serde(default = "default_erspan_version")]
    pub version: u8,
    /// Source address of the outer packets (same family as `remote`); by default the route's.
    pub local: Option<IpAddr>,
}

fn default_erspan_version() -> u8 {
    2
}

impl VxlanConfig {
    pub(super) fn resolve(&self) -> Result<Target, String> {
        let format = TunnelFormat::Vxlan {
            vni: self.vni.0,
            port: self.port,
        };
        checked("vxlan", self.remote, self.local, format)
    }
}

impl GeneveConfig {
    pub(super) fn resolve(&self) -> Result<Target, String> {
        let format = TunnelFormat::Geneve {
            vni: self.vni.0,
            port: self.port,
        };
        checked("geneve", self.remote, self.local, format)
    }
}

impl GreConfig {
    pub(super) fn resolve(&self) -> Result<Target, String> {
        let format = TunnelFormat::Gre { key: self.key };
        checked("gre", self.remote, self.local, format)
    }
}

impl ErspanConfig {
    pub(super) fn resolve(&self) -> Result<Target, String> {
        let format = TunnelFormat::Erspan {
            session_id: self.session_id.0,
            version: self.version,
        };
        let target = checked("erspan", self.remote, self.local, format)?;
        if self.version != 2 && self.version != 3 {
            return Err("erspan `version` must be 2 (type II) or 3 (type III)".to_owned());
        }
        Ok(target)
    }
}

/// A tunnel to `remote` in `format` (written as `name`), its addresses and port checked.
fn checked(
    name: &str,
    remote: IpAddr,
    local: Option<IpAddr>,
    format: TunnelFormat,
) -> Result<Target, String> {
    if let Some(why) = not_a_collector(remote) {
        Err(format!(
            "{name} remote `{remote}` must be a unicast address of another host: {why}"
        ))
    } else if format.udp_port() == Some(0) {
        Err(format!("{name} port must not be 0"))
    } else if local.is_some_and(|l| l.is_ipv4() != remote.is_ipv4()) {
        Err(format!(
            "{name} `local` and `remote` are of different IP versions"
        ))
    } else {
        Ok(Target::Tunnel(TunnelTarget {
            remote,
            local,
            format,
        }))
    }
}

/// Why no collector can be at `remote`, whatever the host: an address that is not one host's.
fn not_a_collector(remote: IpAddr) -> Option<&'static str> {
    Some(match remote {
        _ if remote.is_unspecified() => "it is unspecified",
        _ if remote.is_loopback() => "it is a loopback address",
        _ if remote.is_multicast() => "it is a multicast address",
        IpAddr::V4(v4) if v4.is_broadcast() => "it is the broadcast address",
        // 240.0.0.0/4, reserved (RFC 1112).
        IpAddr::V4(v4) if v4.octets()[0] >= 240 => "it is a reserved address",
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            "it is an IPv4-mapped IPv6 address (give the IPv4 address)"
        }
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            "it is link-local, which needs an interface a target cannot name"
        }
        _ => return None,
    })
}

/// Why copies cannot reach a collector at `target` from this host, if they cannot: the remote is
/// one of the host's own addresses or a subnet's broadcast, or `local` is not the host's. No
/// route now is no reason (the copies are counted as `no_route` until there is one).
pub fn refused_on_host(target: &TunnelTarget) -> Option<String> {
    let remote = target.remote;
    match max_tunnel_copy_len(target) {
        Ok(_) => {
            let local = target.local.unwrap_or(match remote {
                IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
                IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
            });
            let own = UdpSocket::bind((local, 0))
                .and_then(|socket| {
                    socket.connect((remote, 9))?;
                    socket.local_addr()
                })
                .is_ok_and(|from| from.ip() == remote);
            own.then(|| format!("remote `{remote}` is an address of this host"))
        }
        Err(TargetError::Path { source, .. }) => match source.raw_os_error() {
            Some(libc::EACCES) => Some(format!(
                "remote `{remote}` is a broadcast address here (copies would go to every host)"
            )),
            Some(libc::EADDRNOTAVAIL) => Some(format!(
                "`local` {} is not an address of this host",
                target.local.map_or_else(String::new, |l| l.to_string())
            )),
            Some(libc::ENETUNREACH | libc::EHOSTUNREACH) | None => None,
            Some(_) => Some(format!("remote `{remote}`: {source}")),
        },
        Err(e) => Some(e.to_string()),
    }
}

/// What `check` says of a tunnel's path on this host now.
pub(super) fn check(target: &TunnelTarget) -> Result<String, TargetError> {
    match max_tunnel_copy_len(target) {
        Ok(len) => Ok(format!("{target}: copies up to {len} bytes fit the path")),
        Err(TargetError::Path { remote, source })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NetworkUnreachable | std::io::ErrorKind::HostUnreachable
            ) =>
        {
            Ok(format!(
                "{target}: no route to {remote} now: a run counts its copies as no_route until there is one"
            ))
        }
        Err(e) => Err(e),
    }
}

/// The largest inner frame a copy the agent sends itself may be: the path MTU the kernel's route
/// to the collector has (found by connecting a UDP socket, which sends nothing) minus the
/// encapsulation. Fails when there is no route, or `local` is not an address of this node.
pub fn max_tunnel_copy_len(target: &TunnelTarget) -> Result<u32, TargetError> {
    let remote = SocketAddr::new(target.remote, target.format.udp_port().unwrap_or(9));
    let path_error = |source| TargetError::Path {
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
    /// How often the hop changed since the start.
    changes: u64,
}

/// The tunnel sessions of the applied configuration and the hops their copies take now.
#[derive(Debug)]
pub struct Following {
    sessions: Vec<TunnelSession>,
    /// UDP source ports are picked from this range.
    ports: (u16, u16),
}

impl Default for Following {
    fn default() -> Self {
        Following {
            sessions: Vec::new(),
            ports: encap::local_port_range(),
        }
    }
}

/// A tunnel session's path now, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TunnelPath {
    /// The underlay its copies leave by and the next hop's MAC address.
    Hop {
        interface: String,
        next_hop_mac: String,
    },
    /// Why there is none: its copies are counted as `no_route` meanwhile.
    None { problem: String },
}

/// A tunnel session and its path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelView {
    pub session: String,
    pub target: TunnelTarget,
    #[serde(flatten)]
    pub path: TunnelPath,
}

impl Following {
    /// Adds a tunnel session at the hop the kernel's tables give now; its `SESSIONS` entry.
    pub(super) async fn add(
        &mut self,
        session: u32,
        planned: &SessionTarget<'_>,
        target: &TunnelTarget,
        handle: &rtnetlink::Handle,
    ) -> SessionMeta {
        let hop = path::resolve_at_start(handle, target).await;
        if let Err(why) = &hop {
            tracing::warn!(
                "session `{}`: {why}: its copies are counted as no_route until the path is back",
                planned.name
            );
        }
        let meta = sized(
            entry(TARGET_TUNNEL, 0, 0, planned),
            planned.snaplen,
            hop.as_ref().ok(),
            target,
        );
        self.sessions.push(TunnelSession {
            session,
            name: planned.name.to_owned(),
            target: target.clone(),
            meta,
            snaplen: planned.snaplen,
            hop,
            changes: 0,
        });
        meta
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
    pub fn underlays(&self) -> Vec<(String, u32)> {
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

    /// Per tunnel session: its target and its path now.
    pub fn views(&self) -> Vec<TunnelView> {
        self.sessions
            .iter()
            .map(|t| TunnelView {
                session: t.name.clone(),
                target: t.target.clone(),
                path: match &t.hop {
                    Ok(hop) => TunnelPath::Hop {
                        interface: hop.interface.clone(),
                        next_hop_mac: mac_text(hop.next_hop_mac),
                    },
                    Err(why) => TunnelPath::None {
                        problem: why.to_string(),
                    },
                },
            })
            .collect()
    }

    /// How often each tunnel session's hop changed, by session index.
    pub fn hop_changes(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.sessions.iter().map(|t| (t.session, t.changes))
    }

    /// Takes `session` to `hop` if it changed: the copy program goes to a new interface first,
    /// then the session's size limit and its `TUNNELS` entry are rewritten (or the entry removed:
    /// copies are then counted as `no_route`).
    pub fn apply(
        &mut self,
        kernel: &mut impl KernelEntries,
        session: u32,
        hop: Result<Hop, NoHop>,
    ) {
        let ports = self.ports;
        let Some(tunnel) = self.sessions.iter_mut().find(|t| t.session == session) else {
            return;
        };
        if tunnel.hop == hop {
            return;
        }
        let name = &tunnel.name;
        let written = match &hop {
            Ok(next) => kernel
                .finish_copies_at(&next.interface)
                .and_then(|()| {
                    tunnel.meta = sized(tunnel.meta, tunnel.snaplen, Some(next), &tunnel.target);
                    kernel.set_session(session, &tunnel.meta)
                })
                .and_then(|()| {
                    kernel.set_tunnel(session, &encap::template(&tunnel.target, next, ports))
                }),
            Err(_) => kernel.clear_tunnel(session),
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
        tunnel.changes += 1;
    }
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

/// A MAC address as text.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Ring copies (XDP sessions) encapsulated in userspace and sent on a raw socket, in batches.
pub(super) struct TunnelSink {
    sender: TunnelSender,
    outbox: Outbox,
}

impl TunnelSink {
    pub(super) fn open(target: &TunnelTarget) -> anyhow::Result<Self> {
        Ok(TunnelSink {
            sender: TunnelSender::new(target)?,
            outbox: Outbox::default(),
        })
    }
}

impl Sink for TunnelSink {
    fn push(&mut self, copy: &RingCopy<'_>, counters: &SessionCounters) {
        self.sender.encapsulate(
            copy.frame,
            copy.flow_hash,
            copy.orig_len,
            self.outbox.next(),
        );
        if self.outbox.is_full() {
            self.flush(counters);
        }
    }

    fn flush(&mut self, counters: &SessionCounters) {
        let (socket, destination) = self.sender.socket();
        self.outbox.send(socket, Some(&destination), counters);
    }
}
