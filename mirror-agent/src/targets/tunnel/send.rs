//! Tunnels from userspace, for ring copies (XDP sessions): the same wire formats as the copy
//! program builds in the kernel (IPv4 with DF, no UDP checksum over IPv4; over IPv6 the kernel
//! fills in the UDP checksum), and the same source-port policy: the port follows the inner
//! flow's hash within the local port range, so a collector farm keeps a flow together. Raw
//! sockets, because a UDP socket has one source port and GRE has no socket of its own.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, OwnedFd},
};

use anyhow::Context as _;
use nix::{
    sys::socket::SockaddrStorage,
    time::{ClockId, clock_gettime},
};

use crate::{
    encap::{self, IPPROTO_UDP, TunnelFormat, TunnelTarget},
    sys::socket,
};

/// Offset of the UDP checksum, for the kernel to fill it in over IPv6.
const UDP_CHECKSUM_OFFSET: libc::c_int = 6;
/// In the GRE header of ERSPAN: the sequence number, then the ERSPAN header's word with the
/// truncation bit, and type III's timestamp.
const GRE_SEQUENCE: usize = 4;
const ERSPAN_FLAGS: usize = 8 + 2;
const ERSPAN_TRUNCATED: u8 = 0x04;
const ERSPAN3_TIMESTAMP: usize = 8 + 4;

/// Sends one tunnel's datagrams to its collector.
#[derive(Debug)]
pub struct TunnelSender {
    socket: OwnedFd,
    remote: IpAddr,
    local: IpAddr,
    format: TunnelFormat,
    /// What follows the IP header, per-copy fields zero.
    transport: Vec<u8>,
    /// The local port range source ports are picked from.
    ports: (u16, u16),
    /// The next ERSPAN sequence number.
    sequence: u32,
}

impl TunnelSender {
    pub fn new(target: &TunnelTarget) -> anyhow::Result<Self> {
        let protocol = target.format.ip_protocol();
        let local = match target.local {
            Some(local) => local,
            None => route_source(target.remote)?,
        };
        let socket = match target.remote {
            IpAddr::V4(_) => raw_socket(libc::AF_INET, libc::IPPROTO_RAW)?,
            IpAddr::V6(_) => {
                let socket = raw_socket(libc::AF_INET6, libc::c_int::from(protocol))?;
                if protocol == IPPROTO_UDP {
                    set_option(
                        &socket,
                        libc::IPPROTO_IPV6,
                        libc::IPV6_CHECKSUM,
                        UDP_CHECKSUM_OFFSET,
                    )?;
                }
                set_option(&socket, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)?;
                bind(&socket, SocketAddr::new(local, 0))?;
                socket
            }
        };
        Ok(TunnelSender {
            socket,
            remote: target.remote,
            local,
            format: target.format,
            transport: target.format.transport_header(),
            ports: encap::local_port_range(),
            sequence: 0,
        })
    }

    /// Writes into `datagram` (emptied first) what carries `frame` to the collector: the IPv4
    /// header (IPv6: the kernel adds its own), then UDP or GRE and the tunnel's header, with a
    /// UDP source port that follows `flow_hash`. `orig_len` tells a cut copy (ERSPAN's T bit).
    pub fn encapsulate(
        &mut self,
        frame: &[u8],
        flow_hash: u32,
        orig_len: u32,
        datagram: &mut Vec<u8>,
    ) {
        let transport_len = self.transport.len() + frame.len();
        datagram.clear();
        if let (IpAddr::V4(local), IpAddr::V4(remote)) = (self.local, self.remote) {
            let mut ip = encap::ip_header(local.into(), remote.into(), self.format.ip_protocol());
            let total = u16::try_from(ip.len() + transport_len).unwrap_or(u16::MAX);
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            // Identification and checksum are filled in by the kernel (IP_HDRINCL).
            datagram.extend_from_slice(&ip);
        }
        let at = datagram.len();
        datagram.extend_from_slice(&self.transport);
        let transport = &mut datagram[at..];
        match self.format {
            TunnelFormat::Vxlan { .. } | TunnelFormat::Geneve { .. } => {
                let port = encap::source_port(flow_hash, self.ports);
                transport[..2].copy_from_slice(&port.to_be_bytes());
                let len = u16::try_from(transport_len).unwrap_or(u16::MAX);
                transport[4..6].copy_from_slice(&len.to_be_bytes());
            }
            TunnelFormat::Gre { .. } => {}
            TunnelFormat::Erspan { version, .. } => {
                transport[GRE_SEQUENCE..GRE_SEQUENCE + 4]
                    .copy_from_slice(&self.sequence.to_be_bytes());
                self.sequence = self.sequence.wrapping_add(1);
                if (frame.len() as u32) < orig_len {
                    transport[ERSPAN_FLAGS] |= ERSPAN_TRUNCATED;
                }
                if version == 3 {
                    // Ring copies come from XDP: received, so the direction bit stays 0.
                    let ticks = (tai_now_ns() / 100) as u32;
                    transport[ERSPAN3_TIMESTAMP..ERSPAN3_TIMESTAMP + 4]
                        .copy_from_slice(&ticks.to_be_bytes());
                }
            }
        }
        datagram.extend_from_slice(frame);
    }

    /// The raw socket and the collector's address (raw sockets take no port: it is in the
    /// header built here).
    pub fn socket(&self) -> (&OwnedFd, SockaddrStorage) {
        (&self.socket, SocketAddr::new(self.remote, 0).into())
    }
}

/// The TAI clock (what the copy program's ERSPAN timestamps count), in nanoseconds.
fn tai_now_ns() -> u64 {
    // The clock always exists: a failure reads as zero.
    clock_gettime(ClockId::CLOCK_TAI).map_or(0, |now| {
        u64::try_from(now.tv_sec()).unwrap_or_default() * 1_000_000_000
            + u64::try_from(now.tv_nsec()).unwrap_or_default()
    })
}

/// The address the route to `remote` sends from (connecting a UDP socket sends nothing).
fn route_source(remote: IpAddr) -> anyhow::Result<IpAddr> {
    let any: SocketAddr = match remote {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let remote = SocketAddr::new(remote, 9);
    let socket = UdpSocket::bind(any).context("a socket to find the route's source")?;
    socket
        .connect(remote)
        .with_context(|| format!("no route to the collector {remote}"))?;
    Ok(socket.local_addr()?.ip())
}

fn raw_socket(family: libc::c_int, protocol: libc::c_int) -> anyhow::Result<OwnedFd> {
    socket::raw_socket(family, protocol, false).context("opening a raw socket for a tunnel")
}

fn set_option(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> anyhow::Result<()> {
    socket::set_int_option(fd, level, name, value).context("setting a tunnel socket option")
}

fn bind(fd: &OwnedFd, address: SocketAddr) -> anyhow::Result<()> {
    nix::sys::socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(address))
        .with_context(|| format!("binding the tunnel socket to {}", address.ip()))
}
