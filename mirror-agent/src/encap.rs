//! The tunnel formats and their outer headers, as bytes: the template the copy program writes in
//! front of each kernel copy, and the headers the ring drain puts on the copies it sends itself.
//! Pure functions only, so every format is checked byte for byte without root.
use std::net::IpAddr;

use mirror_common::{
    MAX_TUNNEL_HEADER, TUNNEL_ERSPAN2, TUNNEL_ERSPAN3, TUNNEL_GENEVE, TUNNEL_GRE, TUNNEL_VXLAN,
    Tunnel,
};

/// A tunnel to a collector, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TunnelTarget {
    pub remote: IpAddr,
    /// Source address of the outer packets; by default the route's.
    pub local: Option<IpAddr>,
    pub format: TunnelFormat,
}

/// What a tunnel wraps copies in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelFormat {
    /// RFC 7348, over UDP.
    Vxlan { vni: u32, port: u16 },
    /// RFC 8926, over UDP, protocol 0x6558 (Ethernet), no options.
    Geneve { vni: u32, port: u16 },
    /// GRE with protocol 0x6558 (transparent Ethernet bridging), with the key when given.
    Gre { key: Option<u32> },
    /// ERSPAN type II (`version` 2) or III (3) over GRE, sequence numbered.
    Erspan { session_id: u16, version: u8 },
}

impl std::fmt::Display for TunnelTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let remote = self.remote;
        match self.format {
            TunnelFormat::Vxlan { vni, port } => {
                write!(
                    f,
                    "vxlan {} vni {vni}",
                    std::net::SocketAddr::new(remote, port)
                )
            }
            TunnelFormat::Geneve { vni, port } => {
                write!(
                    f,
                    "geneve {} vni {vni}",
                    std::net::SocketAddr::new(remote, port)
                )
            }
            TunnelFormat::Gre { key: None } => write!(f, "gre {remote}"),
            TunnelFormat::Gre { key: Some(key) } => write!(f, "gre {remote} key {key}"),
            TunnelFormat::Erspan {
                session_id,
                version,
            } => write!(f, "erspan {remote} type {version} session {session_id}"),
        }
    }
}

pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_GRE: u8 = 47;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
/// GRE and GENEVE protocol type of an Ethernet frame (transparent Ethernet bridging).
pub const PROTOCOL_ETHERNET: u16 = 0x6558;
pub const PROTOCOL_ERSPAN2: u16 = 0x88be;
pub const PROTOCOL_ERSPAN3: u16 = 0x22eb;
/// GRE flags: a key follows, a sequence number follows.
pub const GRE_KEY: u8 = 0x20;
pub const GRE_SEQUENCE: u8 = 0x10;
/// The VXLAN "I" flag: the VNI is valid.
pub const VXLAN_FLAG_VNI: u8 = 0x08;
/// Outer IP TTL / hop limit.
const OUTER_TTL: u8 = 64;
/// IPv4 flags: don't fragment (copies never are: too big ones are cut or counted).
const IPV4_DONT_FRAGMENT: u16 = 0x4000;
/// ERSPAN type III: timestamp granularity 01 (100 ns), in the low bits of the last word.
const ERSPAN3_GRANULARITY_100NS: u8 = 0x02;

impl TunnelFormat {
    /// The outer IP protocol: UDP or GRE.
    pub fn ip_protocol(self) -> u8 {
        match self {
            TunnelFormat::Vxlan { .. } | TunnelFormat::Geneve { .. } => IPPROTO_UDP,
            TunnelFormat::Gre { .. } | TunnelFormat::Erspan { .. } => IPPROTO_GRE,
        }
    }

    /// The destination UDP port, for UDP formats.
    pub fn udp_port(self) -> Option<u16> {
        match self {
            TunnelFormat::Vxlan { port, .. } | TunnelFormat::Geneve { port, .. } => Some(port),
            TunnelFormat::Gre { .. } | TunnelFormat::Erspan { .. } => None,
        }
    }

    /// `mirror_common::Tunnel::format`.
    pub fn abi(self) -> u32 {
        match self {
            TunnelFormat::Vxlan { .. } => TUNNEL_VXLAN,
            TunnelFormat::Geneve { .. } => TUNNEL_GENEVE,
            TunnelFormat::Gre { .. } => TUNNEL_GRE,
            TunnelFormat::Erspan { version: 3, .. } => TUNNEL_ERSPAN3,
            TunnelFormat::Erspan { .. } => TUNNEL_ERSPAN2,
        }
    }

    /// What follows the outer IP header: the UDP or GRE header and the tunnel's own, with the
    /// fields that differ per copy zero (UDP source port and length, sequence number, timestamp,
    /// direction, truncation).
    pub fn transport_header(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        match self {
            TunnelFormat::Vxlan { vni, port } => {
                udp_header(&mut out, port);
                out.extend_from_slice(&[VXLAN_FLAG_VNI, 0, 0, 0]);
                out.extend_from_slice(&(vni << 8).to_be_bytes());
            }
            TunnelFormat::Geneve { vni, port } => {
                udp_header(&mut out, port);
                // Version 0, no options, not OAM, no critical options.
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&PROTOCOL_ETHERNET.to_be_bytes());
                out.extend_from_slice(&(vni << 8).to_be_bytes());
            }
            TunnelFormat::Gre { key } => {
                out.extend_from_slice(&[if key.is_some() { GRE_KEY } else { 0 }, 0]);
                out.extend_from_slice(&PROTOCOL_ETHERNET.to_be_bytes());
                if let Some(key) = key {
                    out.extend_from_slice(&key.to_be_bytes());
                }
            }
            TunnelFormat::Erspan {
                session_id,
                version,
            } => {
                let protocol = if version == 3 {
                    PROTOCOL_ERSPAN3
                } else {
                    PROTOCOL_ERSPAN2
                };
                out.extend_from_slice(&[GRE_SEQUENCE, 0]);
                out.extend_from_slice(&protocol.to_be_bytes());
                out.extend_from_slice(&[0; 4]);
                // Version (1 for type II, 2 for type III) and VLAN; COS, En/BSO, T, session id.
                out.extend_from_slice(&[(version - 1) << 4, 0]);
                out.extend_from_slice(&(session_id & 0x03ff).to_be_bytes());
                if version == 3 {
                    // Timestamp, SGT, then P, FT (0: Ethernet), hardware id, D, granularity, O.
                    out.extend_from_slice(&[0; 4]);
                    out.extend_from_slice(&[0, 0, 0, ERSPAN3_GRANULARITY_100NS]);
                } else {
                    // Reserved and index.
                    out.extend_from_slice(&[0; 4]);
                }
            }
        }
        out
    }
}

/// A UDP header toward `port`: source port, length and checksum are filled per copy (the
/// checksum stays zero, see the README's checksum section).
fn udp_header(out: &mut Vec<u8>, port: u16) {
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&port.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
}

/// The outer IP header from `local` to `remote`, with length (and IPv4 checksum) zero.
pub fn ip_header(local: IpAddr, remote: IpAddr, protocol: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(40);
    match (local, remote) {
        (IpAddr::V4(local), IpAddr::V4(remote)) => {
            out.extend_from_slice(&[0x45, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&IPV4_DONT_FRAGMENT.to_be_bytes());
            out.extend_from_slice(&[OUTER_TTL, protocol, 0, 0]);
            out.extend_from_slice(&local.octets());
            out.extend_from_slice(&remote.octets());
        }
        (local, remote) => {
            let as_v6 = |a: IpAddr| match a {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, protocol, OUTER_TTL]);
            out.extend_from_slice(&as_v6(local).octets());
            out.extend_from_slice(&as_v6(remote).octets());
        }
    }
    out
}

/// The one's complement sum of `bytes` as 16-bit words, not folded.
pub fn ones_complement_sum(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum()
}

/// Where copies leave and whom they are addressed to on the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub ifindex: u32,
    pub interface: String,
    pub source_mac: [u8; 6],
    pub next_hop_mac: [u8; 6],
    /// The outer source address.
    pub local: IpAddr,
    /// The route's MTU toward the collector.
    pub mtu: u32,
}

/// The `TUNNELS` entry of a tunnel reached through `hop`, its UDP source ports picked from
/// `ports` (the local port range, as Linux's own UDP tunnels do).
pub fn template(target: &TunnelTarget, hop: &Hop, ports: (u16, u16)) -> Tunnel {
    let ip = ip_header(hop.local, target.remote, target.format.ip_protocol());
    let ethertype = if ip.len() == 20 {
        ETHERTYPE_IPV4
    } else {
        ETHERTYPE_IPV6
    };
    let mut bytes = Vec::with_capacity(MAX_TUNNEL_HEADER);
    bytes.extend_from_slice(&hop.next_hop_mac);
    bytes.extend_from_slice(&hop.source_mac);
    bytes.extend_from_slice(&ethertype.to_be_bytes());
    bytes.extend_from_slice(&ip);
    bytes.extend_from_slice(&target.format.transport_header());
    let header_len = bytes.len() as u32;
    let mut header = [0; MAX_TUNNEL_HEADER];
    header[..bytes.len()].copy_from_slice(&bytes);
    Tunnel {
        ifindex: hop.ifindex,
        header_len,
        format: target.format.abi(),
        ipv6: u32::from(ip.len() != 20),
        ipv4_sum: if ip.len() == 20 {
            ones_complement_sum(&ip)
        } else {
            0
        },
        source_port_low: u32::from(ports.0),
        source_port_span: u32::from(ports.1 - ports.0) + 1,
        reserved: 0,
        header,
    }
}

/// Bytes a copy gains outside its inner frame, counted against the path MTU (which excludes the
/// outer Ethernet header): the outer IP header and what follows it.
pub fn overhead(target: &TunnelTarget) -> u32 {
    let ip = if target.remote.is_ipv4() { 20 } else { 40 };
    ip + target.format.transport_header().len() as u32
}

/// A UDP source port from a flow hash, within `ports`: a flow's copies share one.
pub fn source_port(flow_hash: u32, (low, high): (u16, u16)) -> u16 {
    let span = u64::from(high - low) + 1;
    low + ((u64::from(flow_hash) * span) >> 32) as u16
}

/// `net.ipv4.ip_local_port_range`, as Linux's UDP tunnels use it.
pub fn local_port_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace().map(str::parse::<u16>);
            Some((parts.next()?.ok()?, parts.next()?.ok()?))
        })
        .filter(|(low, high)| low <= high)
        .unwrap_or((32_768, 60_999))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// The IPv4 header checksum of `header` (whose checksum field is zero), the slow way.
    fn ipv4_checksum(header: &[u8]) -> u16 {
        let mut sum = ones_complement_sum(header);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn hop(local: IpAddr) -> Hop {
        Hop {
            ifindex: 7,
            interface: "eth0".into(),
            source_mac: [2, 0, 0, 0, 0, 1],
            next_hop_mac: [2, 0, 0, 0, 0, 2],
            local,
            mtu: 1500,
        }
    }

    /// Each format's header after the outer IP header, byte for byte.
    #[test]
    fn transport_headers() {
        let cases: [(TunnelFormat, &[u8]); 6] = [
            (
                TunnelFormat::Vxlan {
                    vni: 0x12_3456,
                    port: 4789,
                },
                &[
                    0, 0, 0x12, 0xb5, 0, 0, 0, 0, 0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0,
                ],
            ),
            (
                TunnelFormat::Geneve { vni: 7, port: 6081 },
                &[0, 0, 0x17, 0xc1, 0, 0, 0, 0, 0, 0, 0x65, 0x58, 0, 0, 7, 0],
            ),
            (TunnelFormat::Gre { key: None }, &[0, 0, 0x65, 0x58]),
            (
                TunnelFormat::Gre {
                    key: Some(0x0102_0304),
                },
                &[0x20, 0, 0x65, 0x58, 1, 2, 3, 4],
            ),
            (
                TunnelFormat::Erspan {
                    session_id: 0x3ff,
                    version: 2,
                },
                &[
                    0x10, 0, 0x88, 0xbe, 0, 0, 0, 0, 0x10, 0, 0x03, 0xff, 0, 0, 0, 0,
                ],
            ),
            (
                TunnelFormat::Erspan {
                    session_id: 5,
                    version: 3,
                },
                &[
                    0x10, 0, 0x22, 0xeb, 0, 0, 0, 0, 0x20, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0x02,
                ],
            ),
        ];
        for (format, expected) in cases {
            assert_eq!(format.transport_header(), expected, "{format:?}");
        }
    }

    #[test]
    fn ipv4_template_has_a_checksum_base_that_completes_to_the_real_checksum() {
        let target = TunnelTarget {
            remote: Ipv4Addr::new(192, 0, 2, 2).into(),
            local: None,
            format: TunnelFormat::Vxlan { vni: 1, port: 4789 },
        };
        let tunnel = template(
            &target,
            &hop(Ipv4Addr::new(192, 0, 2, 1).into()),
            (1000, 1999),
        );
        assert_eq!(tunnel.header_len, 14 + 20 + 16);
        assert_eq!(&tunnel.header[..6], &[2, 0, 0, 0, 0, 2]);
        assert_eq!(&tunnel.header[6..12], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&tunnel.header[12..14], &[0x08, 0x00]);
        assert_eq!((tunnel.ipv6, tunnel.format), (0, TUNNEL_VXLAN));
        assert_eq!(
            (tunnel.source_port_low, tunnel.source_port_span),
            (1000, 1000)
        );
        // What the copy program does for a 100-byte outer packet, against a checksum computed
        // over the finished header.
        let total: u16 = 100;
        let mut sum = tunnel.ipv4_sum + u32::from(total);
        sum = (sum & 0xffff) + (sum >> 16);
        let fast = !(((sum & 0xffff) + (sum >> 16)) as u16);
        let mut ip = tunnel.header[14..34].to_vec();
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        assert_eq!(fast, ipv4_checksum(&ip));
        assert_eq!(overhead(&target), 36);
    }

    #[test]
    fn ipv6_template() {
        let target = TunnelTarget {
            remote: "fd00::2".parse::<Ipv6Addr>().expect("address").into(),
            local: None,
            format: TunnelFormat::Erspan {
                session_id: 1,
                version: 3,
            },
        };
        let tunnel = template(
            &target,
            &hop("fd00::1".parse::<Ipv6Addr>().expect("address").into()),
            (1, 1),
        );
        assert_eq!(tunnel.header_len, 14 + 40 + 20);
        assert!(tunnel.header_len as usize <= MAX_TUNNEL_HEADER);
        assert_eq!(&tunnel.header[12..14], &[0x86, 0xdd]);
        assert_eq!(tunnel.header[14 + 6], IPPROTO_GRE);
        assert_eq!(
            (tunnel.ipv6, tunnel.format, tunnel.ipv4_sum),
            (1, TUNNEL_ERSPAN3, 0)
        );
        assert_eq!(overhead(&target), 60);
    }

    #[test]
    fn source_ports_stay_in_the_range() {
        let range = (32_768, 60_999);
        assert_eq!(source_port(0, range), 32_768);
        assert_eq!(source_port(u32::MAX, range), 60_999);
        assert_eq!(source_port(12_345, (5, 5)), 5);
    }
}
