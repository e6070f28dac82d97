//! Where a tunnel's copies leave: the kernel's route to the collector (its interface, gateway and
//! preferred source), the next hop's MAC address from the neighbour table, and the interface's
//! own MAC address and MTU. `follow::routes` looks again when they change.
use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        link::LinkAttribute,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteType},
    },
};

use crate::encap::{Hop, TunnelTarget};

/// Why a tunnel has no hop now: its copies are counted as `no_route` meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoHop {
    #[error("no route to {0}")]
    NoRoute(IpAddr),
    #[error("the route to {remote} is of type {kind} (not a unicast route through an interface)")]
    NotUnicast { remote: IpAddr, kind: String },
    #[error("{interface} has no Ethernet address: copies cannot leave through it")]
    NotEthernet { interface: String },
    #[error("the next hop {next_hop} on {interface} has no known MAC address yet (resolving)")]
    Unresolved {
        next_hop: IpAddr,
        interface: String,
        ifindex: u32,
    },
    #[error("asking the kernel: {0}")]
    Netlink(String),
}

fn netlink(error: &rtnetlink::Error) -> NoHop {
    NoHop::Netlink(error.to_string())
}

/// The hop the kernel's tables give for `target` now.
pub async fn resolve(handle: &Handle, target: &TunnelTarget) -> Result<Hop, NoHop> {
    let remote = target.remote;
    let prefix = if remote.is_ipv4() { 32 } else { 128 };
    let query = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(remote, prefix)
        .map_err(|e| NoHop::Netlink(e.to_string()))?
        .build();
    let route = match handle.route().get(query).execute().try_next().await {
        Ok(Some(route)) => route,
        Ok(None) => return Err(NoHop::NoRoute(remote)),
        Err(rtnetlink::Error::NetlinkError(e))
            if [libc::ENETUNREACH, libc::EHOSTUNREACH, libc::EINVAL].contains(&-e.raw_code()) =>
        {
            return Err(NoHop::NoRoute(remote));
        }
        Err(e) => return Err(netlink(&e)),
    };
    if route.header.kind != RouteType::Unicast {
        return Err(NoHop::NotUnicast {
            remote,
            kind: format!("{:?}", route.header.kind).to_lowercase(),
        });
    }
    let mut ifindex = None;
    let mut gateway = None;
    let mut source = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Oif(index) => ifindex = Some(*index),
            RouteAttribute::Gateway(address) => gateway = ip_of(address),
            RouteAttribute::PrefSource(address) => source = ip_of(address),
            _ => {}
        }
    }
    let ifindex = ifindex.ok_or(NoHop::NoRoute(remote))?;
    let link = crate::targets::interface::link_by_index(handle, ifindex)
        .await
        .map_err(|e| netlink(&e))?
        .ok_or(NoHop::NoRoute(remote))?;
    let mut interface = String::new();
    let mut source_mac = None;
    let mut mtu = 1500;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::IfName(name) => interface.clone_from(name),
            LinkAttribute::Address(mac) => source_mac = <[u8; 6]>::try_from(mac.as_slice()).ok(),
            LinkAttribute::Mtu(value) => mtu = *value,
            _ => {}
        }
    }
    let source_mac = source_mac.ok_or_else(|| NoHop::NotEthernet {
        interface: interface.clone(),
    })?;
    let next_hop = gateway.unwrap_or(remote);
    let next_hop_mac = neighbour_mac(handle, ifindex, next_hop)
        .await?
        .ok_or_else(|| NoHop::Unresolved {
            next_hop,
            interface: interface.clone(),
            ifindex,
        })?;
    Ok(Hop {
        ifindex,
        interface,
        source_mac,
        next_hop_mac,
        local: target.local.or(source).ok_or(NoHop::NoRoute(remote))?,
        mtu,
    })
}

fn ip_of(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some((*v4).into()),
        RouteAddress::Inet6(v6) => Some((*v6).into()),
        _ => None,
    }
}

/// The MAC address the neighbour table holds for `next_hop` on `ifindex`, when the entry is
/// usable: reachable, stale (still the last address that answered), being confirmed, or static.
async fn neighbour_mac(
    handle: &Handle,
    ifindex: u32,
    next_hop: IpAddr,
) -> Result<Option<[u8; 6]>, NoHop> {
    let wanted = match next_hop {
        IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
        IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
    };
    let mut entries = handle.neighbours().get().execute();
    while let Some(entry) = entries.try_next().await.map_err(|e| netlink(&e))? {
        if entry.header.ifindex != ifindex
            || !entry
                .attributes
                .iter()
                .any(|a| *a == NeighbourAttribute::Destination(wanted.clone()))
        {
            continue;
        }
        let usable = matches!(
            entry.header.state,
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
                | NeighbourState::Noarp
        );
        return Ok(usable
            .then(|| {
                entry.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(mac) => {
                        <[u8; 6]>::try_from(mac.as_slice()).ok()
                    }
                    _ => None,
                })
            })
            .flatten());
    }
    Ok(None)
}

/// Asks the kernel to resolve `next_hop` on `ifindex` (ARP or neighbour discovery), as sending
/// a packet to it would, without sending anything to the collector (`NTF_USE`).
pub async fn kick(handle: &Handle, ifindex: u32, next_hop: IpAddr) {
    if let Err(e) = handle
        .neighbours()
        .add(ifindex, next_hop)
        .flags(NeighbourFlags::Use)
        .replace()
        .execute()
        .await
    {
        tracing::debug!("resolving {next_hop}: {e}");
    }
}

/// How long the start waits for a next hop's MAC address to be resolved.
const START_RESOLUTION: Duration = Duration::from_secs(1);
/// The hop for `target` at the start: an unresolved next hop is asked for and waited for briefly,
/// so that the first copies are not counted as `no_route` only because the neighbour table was
/// cold.
pub async fn resolve_at_start(handle: &Handle, target: &TunnelTarget) -> Result<Hop, NoHop> {
    let deadline = Instant::now() + START_RESOLUTION;
    let mut kicked = false;
    loop {
        match resolve(handle, target).await {
            Err(NoHop::Unresolved {
                next_hop, ifindex, ..
            }) if Instant::now() < deadline => {
                if !kicked {
                    kick(handle, ifindex, next_hop).await;
                    kicked = true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            result => return result,
        }
    }
}
