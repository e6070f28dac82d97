//! VXLAN from userspace, for ring copies (XDP sessions): the same wire format as the kernel's
//! VXLAN device on the TC path (RFC 7348 header, IPv4 with DF and a zero UDP checksum, IPv6 with
//! one), and the same source-port policy: the port follows the inner flow's hash within the local
//! port range, so a collector farm keeps a flow together. Raw sockets, because a UDP socket has one
//! source port.
use std::{
    io,
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::Context as _;

use crate::config::VxlanConfig;

const IPV4_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
const VXLAN_HEADER_LEN: usize = 8;
/// The VXLAN "I" flag: the VNI is valid.
const VXLAN_FLAG_VNI: u8 = 0x08;
const OUTER_TTL: u8 = 64;
/// IPv4 flags and fragment offset: don't fragment.
const IPV4_DONT_FRAGMENT: u16 = 0x4000;
/// Offset of the UDP checksum, for the kernel to fill it in over IPv6.
const UDP_CHECKSUM_OFFSET: libc::c_int = 6;

/// Sends VXLAN datagrams to one collector.
#[derive(Debug)]
pub struct VxlanSender {
    socket: OwnedFd,
    remote: SocketAddr,
    local: IpAddr,
    vni: u32,
    /// The local port range source ports are picked from.
    ports: (u16, u16),
}

impl VxlanSender {
    pub fn new(vxlan: &VxlanConfig) -> anyhow::Result<Self> {
        let remote = SocketAddr::new(vxlan.remote, vxlan.port);
        let local = match vxlan.local {
            Some(local) => local,
            None => route_source(remote)?,
        };
        let socket = match remote {
            SocketAddr::V4(_) => raw_socket(libc::AF_INET, libc::IPPROTO_RAW)?,
            SocketAddr::V6(_) => {
                let socket = raw_socket(libc::AF_INET6, libc::IPPROTO_UDP)?;
                set_option(
                    &socket,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_CHECKSUM,
                    UDP_CHECKSUM_OFFSET,
                )?;
                set_option(&socket, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)?;
                bind(&socket, SocketAddr::new(local, 0))?;
                socket
            }
        };
        Ok(VxlanSender {
            socket,
            remote,
            local,
            vni: vxlan.vni.0,
            ports: local_port_range(),
        })
    }

    /// Writes into `datagram` (emptied first) what carries `frame` to the collector, with a
    /// source port that follows `flow_hash`: the IPv4 header (IPv6: the kernel adds its own), UDP,
    /// VXLAN.
    pub fn encapsulate(&self, frame: &[u8], flow_hash: u32, datagram: &mut Vec<u8>) {
        let (low, high) = self.ports;
        let span = u64::from(high - low) + 1;
        let source_port = low + ((u64::from(flow_hash) * span) >> 32) as u16;
        let udp_len = UDP_HEADER_LEN + VXLAN_HEADER_LEN + frame.len();
        datagram.clear();
        if let (IpAddr::V4(local), SocketAddr::V4(remote)) = (self.local, self.remote) {
            ipv4_header(datagram, local, *remote.ip(), udp_len);
        }
        datagram.extend_from_slice(&source_port.to_be_bytes());
        datagram.extend_from_slice(&self.remote.port().to_be_bytes());
        datagram.extend_from_slice(&u16::try_from(udp_len).unwrap_or(u16::MAX).to_be_bytes());
        // Zero: none over IPv4 (RFC 7348); over IPv6 the kernel fills it in.
        datagram.extend_from_slice(&[0, 0]);
        datagram.extend_from_slice(&[VXLAN_FLAG_VNI, 0, 0, 0]);
        datagram.extend_from_slice(&(self.vni << 8).to_be_bytes());
        datagram.extend_from_slice(frame);
    }

    /// The raw socket and the collector's address in the kernel's layout.
    pub fn socket(&self) -> (&OwnedFd, (libc::sockaddr_storage, libc::socklen_t)) {
        (&self.socket, sockaddr(self.remote))
    }
}

fn ipv4_header(out: &mut Vec<u8>, local: Ipv4Addr, remote: Ipv4Addr, udp_len: usize) {
    let total = u16::try_from(IPV4_HEADER_LEN + udp_len).unwrap_or(u16::MAX);
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&total.to_be_bytes());
    // Identification and checksum are filled in by the kernel (IP_HDRINCL).
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&IPV4_DONT_FRAGMENT.to_be_bytes());
    out.extend_from_slice(&[OUTER_TTL, libc::IPPROTO_UDP as u8, 0, 0]);
    out.extend_from_slice(&local.octets());
    out.extend_from_slice(&remote.octets());
}

/// The address the route to `remote` sends from (connecting a UDP socket sends nothing).
fn route_source(remote: SocketAddr) -> anyhow::Result<IpAddr> {
    let any: SocketAddr = match remote {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(any).context("a socket to find the route's source")?;
    socket
        .connect(remote)
        .with_context(|| format!("no route to the collector {remote}"))?;
    Ok(socket.local_addr()?.ip())
}

/// `net.ipv4.ip_local_port_range`, as the kernel's VXLAN device uses it.
fn local_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(str::parse::<u16>);
            Some((parts.next()?.ok()?, parts.next()?.ok()?))
        })
        .filter(|(low, high)| low <= high)
        .unwrap_or((32_768, 60_999))
}

fn raw_socket(family: libc::c_int, protocol: libc::c_int) -> anyhow::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("opening a raw socket for VXLAN");
    }
    // SAFETY: a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_option(
    socket: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> anyhow::Result<()> {
    // SAFETY: setsockopt reads one c_int.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("setting a VXLAN socket option");
    }
    Ok(())
}

/// A socket address in the kernel's layout, and its length.
pub fn sockaddr(address: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; the fields set below make it one address.
    let mut storage: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
    let len = match address {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            let sin = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            // Raw IPv4 sockets take no port: it is in the header we build.
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for a sockaddr_in6.
            let sin6 = unsafe { &mut *(&raw mut storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            sin6.sin6_scope_id = v6.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn bind(socket: &OwnedFd, address: SocketAddr) -> anyhow::Result<()> {
    let (storage, len) = sockaddr(address);
    // SAFETY: bind reads `len` bytes of `storage`.
    let rc = unsafe { libc::bind(socket.as_raw_fd(), (&raw const storage).cast(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("binding the VXLAN socket to {}", address.ip()));
    }
    Ok(())
}
