//! Header parsing, the same for TC and XDP packets (see [`Packet`]). Every read is bounds-checked
//! (directly against the packet's end, or by the kernel's load helper, which also reaches paged
//! data), so a short or malformed frame yields an error, never an out-of-bounds read. Parsing stops at the first error; the fields read so far still classify.
use core::mem::offset_of;

use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::packet::{Packet, VLAN_TAG_LEN};

/// An ethertype as `load_be16` reads it (network-types keeps them in network order).
const fn ethertype(value: EtherType) -> u16 {
    u16::from_be(value as u16)
}

pub const ETH_P_IPV4: u16 = ethertype(EtherType::Ipv4);
pub const ETH_P_IPV6: u16 = ethertype(EtherType::Ipv6);
const ETH_P_8021Q: u16 = ethertype(EtherType::Ieee8021q);
const ETH_P_8021AD: u16 = ethertype(EtherType::Ieee8021ad);
/// VLAN tags parsed, counting one the kernel already moved into skb metadata.
const MAX_VLAN_TAGS: u32 = 2;
/// IPv6 extension headers skipped before giving up on reaching the upper-layer header.
const MAX_IPV6_EXTENSIONS: usize = 8;

const IPPROTO_TCP: u8 = IpProto::Tcp as u8;
const IPPROTO_UDP: u8 = IpProto::Udp as u8;
const IPPROTO_SCTP: u8 = IpProto::Sctp as u8;
const IPV6_HOP_BY_HOP: u8 = IpProto::HopOpt as u8;
const IPV6_ROUTING: u8 = IpProto::Ipv6Route as u8;
const IPV6_FRAGMENT: u8 = IpProto::Ipv6Frag as u8;
const IPV6_AUTH: u8 = IpProto::Ah as u8;
const IPV6_DEST_OPTS: u8 = IpProto::Ipv6Opts as u8;

/// Marks a field the frame does not have (or that could not be read). Plain integers with a
/// sentinel, not `Option`s: LLVM may leave an `Option`'s payload undefined, which the verifier
/// rejects as a read of an uninitialised register.
pub const ABSENT: u32 = u32::MAX;
/// Marks a field the parser did not get to: the frame may well have it, but a header before it
/// could not be read. Classification lets it match any mirror rule (fail open: a monitor prefers
/// a copy to a blind spot), and never lets a skip rule that constrains it decide (see
/// `mirror_common::FIELD_UNKNOWN_MAP`).
pub const UNKNOWN: u32 = u32::MAX - 1;

/// Address family of [`Headers::src`] and [`Headers::dst`].
pub const FAMILY_NONE: u32 = 0;
pub const FAMILY_V4: u32 = 4;
pub const FAMILY_V6: u32 = 6;
/// The addresses were not reached (see [`UNKNOWN`]).
pub const FAMILY_UNKNOWN: u32 = 1;

/// The fields rules match on, each [`ABSENT`] when the frame has no such field.
pub struct Headers {
    pub ethertype: u32,
    pub vlan_id: u32,
    pub ip_proto: u32,
    /// [`FAMILY_NONE`], [`FAMILY_V4`] (address in the first word) or [`FAMILY_V6`].
    pub family: u32,
    /// The addresses as read from the packet: each word holds 4 bytes in network order (words,
    /// not bytes, so that the compiler keeps 4 values where it would otherwise keep 16).
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_port: u32,
    pub dst_port: u32,
    /// Offset of the TCP, UDP or SCTP header; [`ABSENT`] when there is none.
    pub l4_offset: u32,
    pub malformed: bool,
    /// The packet's length from its Ethernet header on (a GSO packet's whole length).
    pub frame_len: u32,
}

/// A header was truncated or invalid.
pub struct Malformed;

/// Parses what it can; never fails. Fields past the first unreadable header stay [`ABSENT`].
#[inline(always)]
pub fn parse<P: Packet>(ctx: &P) -> Headers {
    let mut headers = Headers {
        ethertype: ABSENT,
        vlan_id: ABSENT,
        ip_proto: ABSENT,
        family: FAMILY_NONE,
        src: [0; 4],
        dst: [0; 4],
        src_port: ABSENT,
        dst_port: ABSENT,
        l4_offset: ABSENT,
        malformed: false,
        frame_len: ctx.frame_len(),
    };
    if try_parse(ctx, &mut headers).is_err() {
        headers.malformed = true;
        // What was not read yet is unknown, not absent: every field is read in order, and one
        // that a frame lacks is only left absent once the parser is past it.
        for field in [
            &mut headers.ethertype,
            &mut headers.ip_proto,
            &mut headers.src_port,
            &mut headers.dst_port,
        ] {
            if *field == ABSENT {
                *field = UNKNOWN;
            }
        }
        if headers.family == FAMILY_NONE {
            headers.family = FAMILY_UNKNOWN;
        }
    }
    headers
}

#[inline(always)]
fn try_parse<P: Packet>(ctx: &P, headers: &mut Headers) -> Result<(), Malformed> {
    // At TC ingress the kernel has already moved the outer tag into skb metadata
    // (skb_vlan_untag).
    let mut tags = 0;
    if let Some([_, _, t0, t1]) = ctx.tag_in_metadata() {
        headers.vlan_id = u32::from(u16::from_be_bytes([t0, t1]) & 0x0fff);
        tags = 1;
    }
    let mut ethertype = load_be16(ctx, offset_of!(EthHdr, ether_type))?;
    let mut offset = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if tags >= MAX_VLAN_TAGS || !(ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD) {
            break;
        }
        let tci = load_be16(ctx, offset)?;
        if headers.vlan_id == ABSENT {
            headers.vlan_id = u32::from(tci & 0x0fff);
        }
        ethertype = load_be16(ctx, offset + offset_of!(VlanHdr, ether_type))?;
        offset += VlanHdr::LEN;
        tags += 1;
    }
    headers.ethertype = u32::from(ethertype);
    match ethertype {
        ETH_P_IPV4 => parse_ipv4(ctx, offset, headers),
        ETH_P_IPV6 => parse_ipv6(ctx, offset, headers),
        _ => Ok(()),
    }
}

#[inline(always)]
fn parse_ipv4<P: Packet>(ctx: &P, offset: usize, headers: &mut Headers) -> Result<(), Malformed> {
    let version_ihl = load_u8(ctx, offset)?;
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < Ipv4Hdr::LEN {
        return Err(Malformed);
    }
    let proto = load_u8(ctx, offset + offset_of!(Ipv4Hdr, proto))?;
    headers.ip_proto = u32::from(proto);
    let [src, dst]: [u32; 2] = load(ctx, offset + offset_of!(Ipv4Hdr, src_addr))?;
    headers.src[0] = src;
    headers.dst[0] = dst;
    headers.family = FAMILY_V4;
    let fragment_offset = load_be16(ctx, offset + offset_of!(Ipv4Hdr, frags))? & 0x1fff;
    if fragment_offset != 0 {
        // Only the first fragment carries the L4 header.
        return Ok(());
    }
    parse_ports(ctx, offset + header_len, proto, headers)
}

#[inline(always)]
fn parse_ipv6<P: Packet>(ctx: &P, offset: usize, headers: &mut Headers) -> Result<(), Malformed> {
    if load_u8(ctx, offset)? >> 4 != 6 {
        return Err(Malformed);
    }
    let mut next = load_u8(ctx, offset + offset_of!(Ipv6Hdr, next_hdr))?;
    headers.src = load(ctx, offset + offset_of!(Ipv6Hdr, src_addr))?;
    headers.dst = load(ctx, offset + offset_of!(Ipv6Hdr, dst_addr))?;
    headers.family = FAMILY_V6;
    let mut offset = offset + Ipv6Hdr::LEN;
    for _ in 0..MAX_IPV6_EXTENSIONS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let [following, len]: [u8; 2] = load(ctx, offset)?;
                next = following;
                offset += (usize::from(len) + 1) * 8;
            }
            IPV6_AUTH => {
                let [following, len]: [u8; 2] = load(ctx, offset)?;
                next = following;
                offset += (usize::from(len) + 2) * 4;
            }
            IPV6_FRAGMENT => {
                next = load_u8(ctx, offset)?;
                let fragment_offset = load_be16(ctx, offset + 2)? & 0xfff8;
                offset += 8;
                if fragment_offset != 0 {
                    headers.ip_proto = u32::from(next);
                    return Ok(());
                }
            }
            _ => {
                headers.ip_proto = u32::from(next);
                return parse_ports(ctx, offset, next, headers);
            }
        }
    }
    // A chain longer than we follow: the upper-layer protocol is unknown.
    Err(Malformed)
}

#[inline(always)]
fn parse_ports<P: Packet>(
    ctx: &P,
    offset: usize,
    proto: u8,
    headers: &mut Headers,
) -> Result<(), Malformed> {
    if matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        let [s0, s1, d0, d1]: [u8; 4] = load(ctx, offset)?;
        headers.src_port = u32::from(u16::from_be_bytes([s0, s1]));
        headers.dst_port = u32::from(u16::from_be_bytes([d0, d1]));
        headers.l4_offset = offset as u32;
    }
    Ok(())
}

/// The length of the largest frame a copy of this packet becomes on the wire: the whole frame, a
/// VLAN tag held in metadata included, or for a GSO packet its largest segment (headers plus
/// `gso_size`), which is what a tunnel or a veth carries after segmentation. `l4_offset` is
/// [`Headers::l4_offset`] as classification returned it (see `classify::Verdict`).
#[inline(always)]
pub fn copy_len<P: Packet>(ctx: &P, ip_proto: u32, l4_offset: u32) -> u32 {
    let whole = ctx.frame_len();
    let gso_size = ctx.gso_size();
    if gso_size == 0 || l4_offset == ABSENT {
        return whole;
    }
    let tag = if ctx.tag_in_metadata().is_some() {
        VLAN_TAG_LEN
    } else {
        0
    };
    let l4_header_len = match ip_proto as u8 {
        // The data offset is the top 4 bits of the byte after the acknowledgment number.
        IPPROTO_TCP => {
            match load::<P, u8>(ctx, l4_offset as usize + offset_of!(TcpHdr, _bitfield_1)) {
                Ok(data_offset) => u32::from(data_offset >> 4) * 4,
                Err(_) => return whole,
            }
        }
        IPPROTO_UDP => UdpHdr::LEN as u32,
        _ => return whole,
    };
    whole.min(l4_offset + l4_header_len + gso_size + tag)
}

/// Offsets up to this are read directly from the linear part of the skb when it holds them.
const MAX_DIRECT_OFFSET: usize = 512;

/// Reads a `T` at `offset`: directly from the packet when its linear part holds it (the common
/// case, and several times cheaper than a helper call), else through the kernel's load helper,
/// which also reaches paged data. Either way, past the end of the packet is an error.
#[inline(always)]
fn load<P: Packet, T: Copy>(ctx: &P, offset: usize) -> Result<T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    // At least 2 bytes: for a 1-byte read LLVM turns `p + 1 <= end` into `p < end`, from which
    // the verifier derives no readable range. Near the end of the packet the helper takes over.
    let checked = if size_of::<T>() < 2 {
        2
    } else {
        size_of::<T>()
    };
    if offset <= MAX_DIRECT_OFFSET && start + offset + checked <= end {
        // SAFETY: [start + offset, start + offset + checked) lies before data_end, checked just
        // above; packet data has no alignment guarantee, hence read_unaligned.
        return Ok(unsafe { ((start + offset) as *const T).read_unaligned() });
    }
    let mut value = core::mem::MaybeUninit::<T>::uninit();
    ctx.load_bytes(
        offset as u32,
        value.as_mut_ptr().cast(),
        size_of::<T>() as u32,
    )
    .map_err(|()| Malformed)?;
    // SAFETY: the helper filled all of `value` (it fails otherwise); T is plain bytes.
    Ok(unsafe { value.assume_init() })
}

#[inline(always)]
fn load_u8<P: Packet>(ctx: &P, offset: usize) -> Result<u8, Malformed> {
    load(ctx, offset)
}

#[inline(always)]
fn load_be16<P: Packet>(ctx: &P, offset: usize) -> Result<u16, Malformed> {
    load::<P, [u8; 2]>(ctx, offset).map(u16::from_be_bytes)
}
