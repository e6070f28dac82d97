//! What targets need at run time: the VXLAN devices copies leave through, and the largest copy
//! each target carries whole.
//!
//! One kernel VXLAN device in external (collect-metadata) mode per destination port serves every
//! session and collector on that port: the tunnel program gives each copy its remote and VNI. The
//! agent creates the device through rtnetlink, reuses one of its own left by an earlier run, and
//! removes it on exit.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
};

use futures_util::TryStreamExt as _;
use mirror_common::{SessionMeta, TARGET_INTERFACE, TARGET_RING, TARGET_VXLAN_V4, TARGET_VXLAN_V6};
use rtnetlink::{
    Handle, LinkUnspec, LinkVxlan,
    packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage},
};

use crate::{
    config::VxlanConfig,
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
    #[error(
        "`{name}` exists but is not a VXLAN device in external mode on port {port}; \
         remove or rename it (the agent names its VXLAN devices {DEVICE_PREFIX}<port>)"
    )]
    Foreign { name: String, port: u16 },
    #[error("vxlan remote {remote}: {source}")]
    Path {
        remote: SocketAddr,
        source: io::Error,
    },
    #[error("interface index {0} vanished")]
    Vanished(u32),
}

/// Names of the agent's VXLAN devices: this prefix and the destination port.
pub const DEVICE_PREFIX: &str = "mirror-vx";

/// Bytes a VXLAN copy gains outside its inner frame, counted against the path MTU (which excludes
/// the outer Ethernet header): outer IP header, UDP, VXLAN.
fn encapsulation_overhead(remote: IpAddr) -> u32 {
    let ip_header = if remote.is_ipv4() { 20 } else { 40 };
    ip_header + 8 + 8
}

/// The interfaces' MTU allows this much more than the MTU as a frame: the Ethernet header and one
/// VLAN tag (what the kernel's veth and most drivers accept).
const ETHERNET_AND_TAG: u32 = 14 + 4;

/// The agent's VXLAN devices.
#[derive(Debug)]
pub struct TunnelDevices {
    handle: Handle,
    /// (name, ifindex) of every device this run uses, removed by [`TunnelDevices::remove`].
    pub devices: Vec<(String, u32)>,
    /// The ifindexes of the devices this resolution created (not found in place).
    created: Vec<u32>,
}

/// What the programs need per session, and the devices the tunnel program attaches to.
#[derive(Debug)]
pub struct ResolvedTargets {
    pub sessions: Vec<SessionMeta>,
    pub devices: TunnelDevices,
}

/// A netlink handle whose connection runs on the current tokio runtime.
pub fn netlink() -> Result<Handle, TunnelError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(TunnelError::Connect)?;
    tokio::spawn(connection);
    Ok(handle)
}

fn netlink_error(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> TunnelError {
    let what = what.into();
    move |source| TunnelError::Netlink { what, source }
}

/// Resolves every session's target: creates or adopts the VXLAN devices and measures the path to
/// each collector. On error, the devices it created are removed again (those it found in place
/// may be serving the configuration that runs now).
pub async fn resolve(sessions: &[Session]) -> Result<ResolvedTargets, TunnelError> {
    let mut devices = TunnelDevices {
        handle: netlink()?,
        devices: Vec::new(),
        created: Vec::new(),
    };
    let mut metas = Vec::with_capacity(sessions.len());
    for session in sessions {
        match session_meta(&mut devices, session).await {
            Ok(meta) => metas.push(with_controls(meta, &session.controls)),
            Err(e) => {
                if let Err(cleanup) = devices.remove_created().await {
                    tracing::warn!("removing VXLAN devices after an error: {cleanup}");
                }
                return Err(e);
            }
        }
    }
    Ok(ResolvedTargets {
        sessions: metas,
        devices,
    })
}

async fn session_meta(
    devices: &mut TunnelDevices,
    session: &Session,
) -> Result<SessionMeta, TunnelError> {
    match &session.target {
        Target::Interface(interface) => Ok(SessionMeta {
            target_ifindex: interface.ifindex,
            target_kind: if session.through_ring {
                TARGET_RING
            } else {
                TARGET_INTERFACE
            },
            max_copy_len: devices.mtu(interface.ifindex).await? + ETHERNET_AND_TAG,
            ..SessionMeta::default()
        }),
        Target::Vxlan(vxlan) => {
            let max_copy_len = max_tunnel_copy_len(vxlan)?;
            let (target_ifindex, target_kind) = if session.through_ring {
                // The agent sends these itself, on a socket: no device.
                (0, TARGET_RING)
            } else if vxlan.remote.is_ipv4() {
                (devices.ensure(vxlan.port).await?, TARGET_VXLAN_V4)
            } else {
                (devices.ensure(vxlan.port).await?, TARGET_VXLAN_V6)
            };
            Ok(SessionMeta {
                target_ifindex,
                target_kind,
                max_copy_len,
                vni: vxlan.vni.0,
                remote: tunnel_key_address(Some(vxlan.remote)),
                local: tunnel_key_address(vxlan.local),
                ..SessionMeta::default()
            })
        }
        Target::File(_) => Ok(SessionMeta {
            target_kind: TARGET_RING,
            ..SessionMeta::default()
        }),
    }
}

/// Adds a session's controls to its target's entry; the snaplen never exceeds what the target
/// carries, so that a cut copy always fits.
fn with_controls(meta: SessionMeta, controls: &Controls) -> SessionMeta {
    let snaplen = match (controls.snaplen, meta.max_copy_len) {
        (None, _) => 0,
        (Some(snaplen), 0) => snaplen,
        (Some(snaplen), max) => snaplen.min(max),
    };
    SessionMeta {
        snaplen,
        // Ring copies are cut as they are queued; clones that need a cut or a tunnel key are
        // finished by the copy program at the target.
        finish: u32::from(
            meta.target_kind != TARGET_RING
                && (snaplen != 0 || meta.target_kind != TARGET_INTERFACE),
        ),
        sample_mode: controls.sample_mode,
        sample_every: controls.sample_every,
        sample_seed: controls.sample_seed,
        rate: controls.rate,
        ..meta
    }
}

/// An address in `bpf_tunnel_key` layout (see `SessionMeta::remote`).
fn tunnel_key_address(address: Option<IpAddr>) -> [u32; 4] {
    match address {
        None => [0; 4],
        Some(IpAddr::V4(v4)) => [u32::from(v4), 0, 0, 0],
        Some(IpAddr::V6(v6)) => {
            let bytes = v6.octets();
            core::array::from_fn(|i| {
                u32::from_ne_bytes([
                    bytes[4 * i],
                    bytes[4 * i + 1],
                    bytes[4 * i + 2],
                    bytes[4 * i + 3],
                ])
            })
        }
    }
}

/// The largest inner frame a copy to this collector may be: the path MTU the kernel's route to it
/// has (found by connecting a UDP socket, which sends nothing) minus the encapsulation. Fails when
/// there is no route, or `local` is not an address of this node.
pub fn max_tunnel_copy_len(vxlan: &VxlanConfig) -> Result<u32, TunnelError> {
    let remote = SocketAddr::new(vxlan.remote, vxlan.port);
    let path_error = |source| TunnelError::Path { remote, source };
    let local = vxlan.local.unwrap_or(match vxlan.remote {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    });
    let socket = UdpSocket::bind((local, 0)).map_err(path_error)?;
    socket.connect(remote).map_err(path_error)?;
    let (level, name) = match vxlan.remote {
        IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_MTU),
        IpAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_MTU),
    };
    let mut mtu: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `mtu`, a c_int.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw mut mtu).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(path_error(io::Error::last_os_error()));
    }
    Ok(mtu
        .cast_unsigned()
        .saturating_sub(encapsulation_overhead(vxlan.remote)))
}

fn is_our_device(link: &LinkMessage, port: u16) -> bool {
    let mut vxlan = false;
    let mut external = false;
    let mut on_port = false;
    for attribute in &link.attributes {
        let LinkAttribute::LinkInfo(infos) = attribute else {
            continue;
        };
        for info in infos {
            match info {
                LinkInfo::Kind(InfoKind::Vxlan) => vxlan = true,
                LinkInfo::Data(InfoData::Vxlan(data)) => {
                    for item in data {
                        match item {
                            InfoVxlan::CollectMetadata(on) => external = *on,
                            InfoVxlan::Port(p) => on_port = *p == port,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    vxlan && external && on_port
}

impl TunnelDevices {
    async fn link(&self, name: &str) -> Result<Option<LinkMessage>, TunnelError> {
        let found = self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await;
        match found {
            Ok(link) => Ok(link),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(netlink_error(format!("looking up {name}"))(e)),
        }
    }

    async fn link_by_index(&self, ifindex: u32) -> Result<LinkMessage, TunnelError> {
        self.handle
            .link()
            .get()
            .match_index(ifindex)
            .execute()
            .try_next()
            .await
            .map_err(netlink_error(format!("looking up interface {ifindex}")))?
            .ok_or(TunnelError::Vanished(ifindex))
    }

    /// An interface's MTU.
    pub async fn mtu(&self, ifindex: u32) -> Result<u32, TunnelError> {
        let link = self.link_by_index(ifindex).await?;
        link.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            })
            .ok_or(TunnelError::Vanished(ifindex))
    }

    /// The interface index of the device for `port`, created (down, IPv6 off, then up) if absent.
    async fn ensure(&mut self, port: u16) -> Result<u32, TunnelError> {
        let name = format!("{DEVICE_PREFIX}{port}");
        if let Some((_, ifindex)) = self.devices.iter().find(|(n, _)| *n == name) {
            return Ok(*ifindex);
        }
        let link = match self.link(&name).await? {
            Some(link) if is_our_device(&link, port) => {
                tracing::info!("using {name}, which is in place already");
                link
            }
            Some(_) => return Err(TunnelError::Foreign { name, port }),
            None => {
                let message = LinkVxlan::new(&name, 0)
                    .collect_metadata(true)
                    .port(port)
                    .learning(false)
                    .arp(false)
                    .build();
                self.handle
                    .link()
                    .add(message)
                    .execute()
                    .await
                    .map_err(netlink_error(format!("creating {name}")))?;
                let link = self
                    .link(&name)
                    .await?
                    .ok_or_else(|| TunnelError::Foreign {
                        name: name.clone(),
                        port,
                    })?;
                self.created.push(link.header.index);
                link
            }
        };
        let ifindex = link.header.index;
        self.devices.push((name.clone(), ifindex));
        // The device carries copies only: no addresses, no router or listener reports of its own.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        self.handle
            .link()
            .change(LinkUnspec::new_with_index(ifindex).up().build())
            .execute()
            .await
            .map_err(netlink_error(format!("setting {name} up")))?;
        Ok(ifindex)
    }

    /// Transmit drops and errors the kernel counted on an interface (a copy lost after it left the
    /// programs, e.g. no route or no neighbour for the collector).
    pub async fn tx_losses(&self, ifindex: u32) -> Result<(u64, u64), TunnelError> {
        let link = self.link_by_index(ifindex).await?;
        Ok(link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Stats64(s) => Some((s.tx_dropped, s.tx_errors)),
                _ => None,
            })
            .unwrap_or_default())
    }

    /// Removes the devices this resolution created (after a failure: the ones found in place may
    /// be serving the configuration that runs now).
    pub async fn remove_created(&mut self) -> Result<(), TunnelError> {
        let created = std::mem::take(&mut self.created);
        self.devices
            .retain(|(_, ifindex)| created.contains(ifindex));
        self.remove().await
    }

    /// Removes the devices of `self` that `next` does not use (after a reload).
    pub async fn remove_unused(&mut self, next: &TunnelDevices) -> Result<(), TunnelError> {
        self.devices.retain(|device| !next.devices.contains(device));
        self.remove().await
    }

    /// Removes every device of this run, reporting the first failure.
    pub async fn remove(&mut self) -> Result<(), TunnelError> {
        let mut first_error = None;
        for (name, ifindex) in std::mem::take(&mut self.devices) {
            if let Err(e) = self.handle.link().del(ifindex).execute().await {
                first_error.get_or_insert(netlink_error(format!("removing {name}"))(e));
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
