//! Frames built for the tests, and the tunnel headers read back.

use etherparse::{LaxSlicedPacket, TransportSlice};

use super::{Flow, SINK_V4, SINK_V6, SRC_V4, SRC_V6, VXLAN_PORT, is_sentinel};

/// MAC address text (`02:00:…`) as bytes.
pub fn mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("six bytes")
}

/// An untagged IPv4/UDP frame between two MACs.
pub fn udp_v4_frame(src_mac: &str, dst_mac: &str, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2(mac(src_mac), mac(dst_mac))
        .ipv4(SRC_V4.octets(), SINK_V4.octets(), 64)
        .udp(40_000, dst_port);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("build frame");
    frame
}

/// An untagged IPv6/UDP frame between two MACs.
pub fn udp_v6_frame(src_mac: &str, dst_mac: &str, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2(mac(src_mac), mac(dst_mac))
        .ipv6(SRC_V6.octets(), SINK_V6.octets(), 64)
        .udp(40_000, dst_port);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, payload).expect("build frame");
    frame
}

/// `frame` with VLAN tags `(tpid, vid)` inserted after the MAC addresses, outermost first.
pub fn tagged(frame: &[u8], tags: &[(u16, u16)]) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    for (tpid, vid) in tags {
        out.extend(tpid.to_be_bytes());
        out.extend(vid.to_be_bytes());
    }
    out.extend(&frame[12..]);
    out
}

/// A VXLAN datagram seen on the wire: its outer UDP source port, VNI and inner frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vxlan {
    pub outer_src_port: u16,
    /// The outer IPv4 header has DF set, or the outer header is IPv6.
    pub dont_fragment: bool,
    /// The outer packet is an IP fragment.
    pub fragment: bool,
    pub vni: u32,
    pub inner: Vec<u8>,
}

/// The VXLAN contents of a frame sent to [`VXLAN_PORT`], if it is one.
pub fn vxlan_of(frame: &[u8]) -> Option<Vxlan> {
    let packet = LaxSlicedPacket::from_ethernet(frame).ok()?;
    let (dont_fragment, fragment) = match &packet.net {
        Some(etherparse::LaxNetSlice::Ipv4(ip)) => (
            ip.header().dont_fragment(),
            ip.header().more_fragments() || ip.header().fragments_offset().value() != 0,
        ),
        Some(etherparse::LaxNetSlice::Ipv6(ip)) => (true, ip.payload().fragmented),
        _ => return None,
    };
    let Some(TransportSlice::Udp(udp)) = &packet.transport else {
        return None;
    };
    let payload = udp.payload();
    if udp.destination_port() != VXLAN_PORT || payload.len() < 8 || payload[0] & 0x08 == 0 {
        return None;
    }
    Some(Vxlan {
        outer_src_port: udp.source_port(),
        dont_fragment,
        fragment,
        vni: u32::from_be_bytes([0, payload[4], payload[5], payload[6]]),
        inner: payload[8..].to_vec(),
    })
}

/// A copy in any of the agent's tunnel formats, as seen on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnelled {
    /// `vxlan`, `geneve`, `gre` or `erspan`.
    pub format: &'static str,
    /// VNI, GRE key or ERSPAN session id.
    pub id: Option<u32>,
    /// The GRE sequence number (ERSPAN).
    pub sequence: Option<u32>,
    /// ERSPAN type III: the direction bit (true: egress).
    pub egress: Option<bool>,
    pub outer_dst_mac: [u8; 6],
    /// The outer IPv4 header has DF set, or the outer header is IPv6; and no fragment.
    pub whole: bool,
    pub inner: Vec<u8>,
}

/// The tunnel contents of a frame: VXLAN to [`VXLAN_PORT`], GENEVE to 6081, GRE (Ethernet) and
/// ERSPAN type II and III. An independent reading of RFC 7348, RFC 8926 and the ERSPAN draft,
/// not the agent's.
pub fn tunnelled(frame: &[u8]) -> Option<Tunnelled> {
    let packet = LaxSlicedPacket::from_ethernet(frame).ok()?;
    let (whole, protocol, payload) = match &packet.net {
        Some(etherparse::LaxNetSlice::Ipv4(ip)) => (
            ip.header().dont_fragment()
                && !ip.header().more_fragments()
                && ip.header().fragments_offset().value() == 0,
            ip.header().protocol().0,
            ip.payload().payload,
        ),
        Some(etherparse::LaxNetSlice::Ipv6(ip)) => (
            !ip.payload().fragmented,
            ip.payload().ip_number.0,
            ip.payload().payload,
        ),
        _ => return None,
    };
    let word = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(
            payload.get(at..at + 4)?.try_into().ok()?,
        ))
    };
    let mut found = Tunnelled {
        format: "",
        id: None,
        sequence: None,
        egress: None,
        outer_dst_mac: frame.get(..6)?.try_into().ok()?,
        whole,
        inner: Vec::new(),
    };
    let inner_at = match (
        protocol,
        u16::from_be_bytes(payload.get(2..4)?.try_into().ok()?),
    ) {
        (17, VXLAN_PORT) => {
            found.format = "vxlan";
            found.id = Some(word(12)? >> 8);
            16
        }
        (17, 6081) => {
            found.format = "geneve";
            found.id = Some(word(12)? >> 8);
            16 + usize::from(payload[8] & 0x3f) * 4
        }
        (47, gre_protocol) => {
            let flags = payload[0];
            let mut at = 4 + if flags & 0x80 != 0 { 4 } else { 0 };
            if flags & 0x20 != 0 {
                found.id = Some(word(at)?);
                at += 4;
            }
            if flags & 0x10 != 0 {
                found.sequence = Some(word(at)?);
                at += 4;
            }
            match gre_protocol {
                0x6558 => {
                    found.format = "gre";
                    at
                }
                0x88be | 0x22eb => {
                    found.format = "erspan";
                    found.id = Some(word(at)? & 0x03ff);
                    if gre_protocol == 0x22eb {
                        found.egress = Some(payload.get(at + 11)? & 0x08 != 0);
                        at + 12
                    } else {
                        at + 8
                    }
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    found.inner = payload.get(inner_at..)?.to_vec();
    Some(found)
}

/// Whether `frame` is a tunnelled copy of the sentinel.
pub fn is_tunnelled_sentinel(frame: &[u8]) -> bool {
    tunnelled(frame).is_some_and(|t| is_sentinel(&t.inner))
}

/// Whether `frame` is a VXLAN copy of the sentinel.
pub fn is_vxlan_sentinel(frame: &[u8]) -> bool {
    vxlan_of(frame).is_some_and(|v| is_sentinel(&v.inner))
}

/// The bytes a TCP client sent to `port`, reassembled from copies of its segments (the SYN
/// included): duplicates are taken once.
pub fn tcp_stream<'a>(frames: impl IntoIterator<Item = &'a Vec<u8>>, port: u16) -> Vec<u8> {
    let mut segments = std::collections::BTreeMap::new();
    let mut first_seq = None;
    for frame in frames {
        let packet = etherparse::SlicedPacket::from_ethernet(frame).expect("tcp copy");
        let Some(etherparse::TransportSlice::Tcp(tcp)) = packet.transport else {
            panic!("not TCP: {:?}", Flow::of(frame));
        };
        assert_eq!(tcp.destination_port(), port);
        if tcp.syn() {
            first_seq = Some(tcp.sequence_number().wrapping_add(1));
        }
        if !tcp.payload().is_empty() {
            segments.insert(tcp.sequence_number(), tcp.payload().to_vec());
        }
    }
    let mut next = first_seq.expect("the SYN was copied");
    let mut stream = Vec::new();
    while let Some(payload) = segments.get(&next) {
        stream.extend_from_slice(payload);
        next = next.wrapping_add(payload.len() as u32);
    }
    stream
}
