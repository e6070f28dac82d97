//! The copy program's work, at the egress of every target interface and every tunnel underlay: a
//! copy (recognised by its mark, which names the rule that made it) is cut to its session's
//! snaplen, a tunnel copy gets its session's outer headers (see [`encapsulate`]), and the mark is
//! cleared. Packets that are not copies pass unchanged.

use core::mem::{MaybeUninit, offset_of};

use aya_ebpf::{
    bindings::{
        BPF_ADJ_ROOM_ENCAP_L2_SHIFT, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_GRE, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::generated::{
        bpf_ktime_get_tai_ns, bpf_skb_adjust_room, bpf_skb_change_head, bpf_skb_change_tail,
        bpf_skb_store_bytes, bpf_skb_vlan_pop,
    },
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use mirror_common::{
    COPY_COOKIE, COPY_COOKIE_CB, COPY_EGRESS_BIT, COPY_GENERATION_BIT, COPY_HOOK, COPY_MARK,
    COPY_MARK_MASK, COPY_RULE_MASK, FLOW_HASH_CB, MAX_TUNNEL_HEADER, SessionMeta, TARGET_TUNNEL,
    TUNNEL_ERSPAN2, TUNNEL_ERSPAN3, TUNNEL_GENEVE, TUNNEL_VXLAN, Tunnel,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

use crate::{
    count,
    maps::{RULES, SESSIONS, TUNNEL_SEQUENCE, TUNNELS, copy_generation},
    packet::{Packet, VLAN_TAG_LEN},
};

/// What becomes of a packet at a target.
pub enum Outcome {
    /// Not a copy of ours: passed on unchanged.
    Foreign,
    /// A copy, finished.
    Finished,
    /// A copy that could not be cut or given its outer headers: dropped and counted.
    Failed,
}

const ETHERNET_HEADER_LEN: u32 = EthHdr::LEN as u32;
/// The outer header is built here.
pub const SCRATCH_LEN: usize = MAX_TUNNEL_HEADER;
/// Covers every valid header length (see `encapsulate`).
const HEADER_LEN_MASK: u32 = 0x7f;
const _: () = assert!(MAX_TUNNEL_HEADER as u32 <= HEADER_LEN_MASK);
/// Ethertypes, as `__sk_buff::protocol` holds them (network order in the low 16 bits).
const ETH_P_IP: u32 = EtherType::Ipv4 as u16 as u32;
const ETH_P_IPV6: u32 = EtherType::Ipv6 as u16 as u32;

/// Whether the packet is a copy (of any generation): its mark says so, and the cookie in its
/// control block confirms it (see `mirror_common::COPY_COOKIE_CB`).
#[inline(always)]
pub fn is_copy(ctx: &TcContext) -> bool {
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to this program.
    let skb = unsafe { &*ctx.skb.skb };
    skb.mark & COPY_MARK_MASK == COPY_MARK && skb.cb[COPY_COOKIE_CB] == COPY_COOKIE
}

#[inline(always)]
pub fn finish(ctx: &TcContext) -> Outcome {
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to this program.
    let mark = unsafe { (*ctx.skb.skb).mark };
    // Most packets at an underlay are the node's own traffic: leave them before any map access.
    if !is_copy(ctx) {
        return Outcome::Foreign;
    }
    count::hook_at(COPY_HOOK, |c| &mut c.packets);
    let rule = mark & COPY_RULE_MASK;
    // A copy of another generation's programs is theirs to finish (their copy program is
    // attached next to this one while a reload swaps them).
    let ours = mark & COPY_GENERATION_BIT == copy_generation();
    let found = ours
        .then(|| RULES.get(rule))
        .flatten()
        .and_then(|meta| Some((meta.session, SESSIONS.get(meta.session)?)));
    let Some((session_index, session)) = found else {
        count::hook_at(COPY_HOOK, |c| &mut c.foreign);
        return Outcome::Foreign;
    };
    let finished = cut(ctx, session).and_then(|truncated| {
        if session.target_kind == TARGET_TUNNEL {
            encapsulate(ctx, session_index, mark & COPY_EGRESS_BIT != 0, truncated)
        } else {
            Ok(())
        }
    });
    if finished.is_err() {
        // The rule's and session's count is the mirror program's: a copy dropped here makes its
        // `bpf_clone_redirect` fail, which it counts as a clone error (once).
        count::hook_at(COPY_HOOK, |c| &mut c.copy_errors);
        aya_log_ebpf::warn!(
            ctx,
            "session {}: a copy could not be cut or encapsulated, and was dropped",
            session_index
        );
        return Outcome::Failed;
    }
    // The mark only named the rule: the underlay and the collector must not see it.
    ctx.set_mark(0);
    Outcome::Finished
}

/// Cuts the copy to the session's snaplen (a VLAN tag held in metadata counts: it is put back
/// into the frame on transmit). Returns whether it cut.
#[inline(always)]
fn cut(ctx: &TcContext, session: &SessionMeta) -> Result<bool, i64> {
    if session.snaplen == 0 {
        return Ok(false);
    }
    let tag = if ctx.tag_in_metadata().is_some() {
        VLAN_TAG_LEN
    } else {
        0
    };
    let keep = session.snaplen.saturating_sub(tag);
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to this program.
    if unsafe { (*ctx.skb.skb).len } <= keep {
        return Ok(false);
    }
    // SAFETY: the helper trims the packet this program owns (a copy nobody else holds).
    match unsafe { bpf_skb_change_tail(ctx.skb.skb, keep, 0) } {
        0 => Ok(true),
        error => Err(error),
    }
}

/// Puts the session's outer headers in front of the copy, which becomes the inner frame whole (a
/// VLAN tag held in metadata goes back into it, or the device would put it on the outer frame).
///
/// IP packets grow with `bpf_skb_adjust_room` and its encapsulation flags, so that the kernel
/// segments a GSO copy into outer packets of their own (lengths, IP ids and checksums per
/// segment), each carrying one of the original's segments unchanged (fixed GSO size). Other
/// packets (ARP, LLDP, ...), which that helper refuses and which are never GSO, grow at the head.
#[inline(always)]
fn encapsulate(ctx: &TcContext, session: u32, egress: bool, truncated: bool) -> Result<(), i64> {
    // SAFETY: a read of the entry; the agent replaces entries whole, never in place.
    let tunnel = unsafe { TUNNELS.get(session) }.ok_or(-1)?;
    // Masked where it is read, so that every copy of the value the verifier sees is bounded.
    let header_len = tunnel.header_len & HEADER_LEN_MASK;
    if header_len as usize > MAX_TUNNEL_HEADER || header_len < ETHERNET_HEADER_LEN {
        return Err(-1);
    }
    // Written by the helper before it is read. (No zeroed arrays here: zeroing a stack array
    // compiles to a call of a byte-wise memset in BPF.)
    let mut original = MaybeUninit::<[u8; ETHERNET_HEADER_LEN as usize]>::uninit();
    Packet::load_bytes(ctx, 0, original.as_mut_ptr().cast(), ETHERNET_HEADER_LEN)
        .map_err(|()| -1)?;
    // SAFETY: the helper filled all of it, or this returned.
    let original = unsafe { original.assume_init() };
    let skb = ctx.skb.skb;
    // The tags the kernel holds in metadata go back into the inner frame.
    let tags = take_tags(ctx)?;
    let tag_len = match tags {
        Tags::None => 0,
        Tags::One(_) => VLAN_TAG_LEN,
        Tags::Two(..) => 2 * VLAN_TAG_LEN,
    };
    // With tags taken out, the ethertype after them is at the end of the frame's header now.
    let ethertype = if matches!(tags, Tags::None) {
        [original[12], original[13]]
    } else {
        let mut ethertype = MaybeUninit::<[u8; 2]>::uninit();
        Packet::load_bytes(ctx, 12, ethertype.as_mut_ptr().cast(), 2).map_err(|()| -1)?;
        // SAFETY: the helper filled it, or this returned.
        unsafe { ethertype.assume_init() }
    };
    let room = header_len + tag_len;
    // The flow hash the mirror program put in the control block (see `FLOW_HASH_CB`).
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to this program.
    let hash = unsafe { (*skb).cb[FLOW_HASH_CB] };
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to this program.
    let protocol = unsafe { (*skb).protocol };
    let grown = if protocol == ETH_P_IP || protocol == ETH_P_IPV6 {
        let flags = adjust_room_flags(tunnel)
            | u64::from(ETHERNET_HEADER_LEN + tag_len) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT;
        // SAFETY: grows the packet this program owns.
        unsafe { bpf_skb_adjust_room(skb, room.cast_signed(), BPF_ADJ_ROOM_MAC, flags) }
    } else {
        // SAFETY: as above.
        unsafe { bpf_skb_change_head(skb, room, 0) }
    };
    if grown != 0 {
        return Err(grown);
    }
    let scratch = HEADER_SCRATCH.get_ptr_mut(0).ok_or(-1)?;
    // SAFETY: this CPU's scratch, used by nobody else until the program ends.
    let scratch = unsafe { &mut *scratch };
    scratch.copy_from(&tunnel.header);
    // SAFETY: as above.
    let len = unsafe { (*skb).len };
    let outer_tag = match tags {
        Tags::None => None,
        Tags::One(tag) | Tags::Two(tag, _) => Some(tag),
    };
    fill_in(
        &mut scratch.0,
        tunnel,
        hash,
        session,
        len,
        egress,
        truncated,
        outer_tag,
    );
    store(ctx, 0, scratch.0.as_ptr(), header_len)?;
    // The inner Ethernet header: addresses, the tags, the ethertype after them (what follows the
    // tags in the frame now; without tags, the header as it was).
    match tags {
        Tags::Two(outer, inner) => {
            let header = tagged_header::<22>(&original, outer, Some(inner), ethertype);
            store(ctx, header_len, header.as_ptr(), 22)
        }
        Tags::One(outer) => {
            let header = tagged_header::<18>(&original, outer, None, ethertype);
            store(ctx, header_len, header.as_ptr(), 18)
        }
        Tags::None => store(ctx, header_len, original.as_ptr(), ETHERNET_HEADER_LEN),
    }
}

/// An Ethernet header of `N` bytes: the addresses of `original`, the tags, the ethertype. Built
/// from uninitialised memory (a zeroed array costs a byte-wise memset in BPF): every byte is
/// written.
#[inline(always)]
fn tagged_header<const N: usize>(
    original: &[u8; ETHERNET_HEADER_LEN as usize],
    outer: [u8; 4],
    inner: Option<[u8; 4]>,
    ethertype: [u8; 2],
) -> [u8; N] {
    let mut header = MaybeUninit::<[u8; N]>::uninit();
    let to = header.as_mut_ptr().cast::<u8>();
    let mut at = 0;
    let mut push = |bytes: &[u8]| {
        for byte in bytes {
            if at < N {
                // SAFETY: `at` < N, inside `header`.
                unsafe { to.add(at).write(*byte) };
                at += 1;
            }
        }
    };
    push(&original[..12]);
    push(&outer);
    if let Some(inner) = inner {
        push(&inner);
    }
    push(&ethertype);
    // SAFETY: 12 + 4 (+ 4) + 2 bytes were written: all N of the callers' sizes.
    unsafe { header.assume_init() }
}

/// The outer header being built (see `maps::HEADER_SCRATCH`), aligned for word copies.
#[repr(C, align(8))]
pub struct Scratch(pub [u8; SCRATCH_LEN]);

/// Per CPU, the outer header being built for a tunnel copy (see `encapsulate`).
#[map]
static HEADER_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

impl Scratch {
    /// Copies a template in, eight bytes at a time (a plain array copy compiles to a call of a
    /// byte-wise memmove in BPF).
    #[inline(always)]
    #[expect(
        clippy::cast_ptr_alignment,
        reason = "both are 8-aligned: Scratch by its repr, the template at byte 32 of Tunnel (align 8)"
    )]
    fn copy_from(&mut self, template: &[u8; MAX_TUNNEL_HEADER]) {
        let to = self.0.as_mut_ptr().cast::<u64>();
        let from = template.as_ptr().cast::<u64>();
        for word in 0..MAX_TUNNEL_HEADER / 8 {
            // SAFETY: both hold MAX_TUNNEL_HEADER bytes (a multiple of 8) and are 8-aligned:
            // `Scratch` by its repr, the template as a field at byte 32 of the 8-aligned `Tunnel`.
            unsafe { to.add(word).write(from.add(word).read()) };
        }
    }
}

/// The VLAN tags taken out of a copy's metadata (TPID and TCI as on the wire), outer first.
#[derive(Clone, Copy)]
enum Tags {
    None,
    One([u8; 4]),
    Two([u8; 4], [u8; 4]),
}

/// Takes the tags the kernel holds in metadata off the copy, so that the device does not put
/// them on the outer frame. Popping the tag in metadata moves the next in-band tag (802.1ad
/// double tagging) into metadata: that one is taken too. More than two tags: an error.
#[inline(always)]
fn take_tags(ctx: &TcContext) -> Result<Tags, i64> {
    let Some(outer) = ctx.tag_in_metadata() else {
        return Ok(Tags::None);
    };
    pop_tag(ctx)?;
    let Some(inner) = ctx.tag_in_metadata() else {
        return Ok(Tags::One(outer));
    };
    pop_tag(ctx)?;
    if ctx.tag_in_metadata().is_some() {
        return Err(-1);
    }
    Ok(Tags::Two(outer, inner))
}

#[inline(always)]
fn pop_tag(ctx: &TcContext) -> Result<(), i64> {
    // SAFETY: the helper takes the tag out of the metadata of the copy this program owns.
    match unsafe { bpf_skb_vlan_pop(ctx.skb.skb) } {
        0 => Ok(()),
        error => Err(error),
    }
}

/// Writes `len` bytes from `from` into the packet at `offset`.
#[inline(always)]
fn store(ctx: &TcContext, offset: u32, from: *const u8, len: u32) -> Result<(), i64> {
    // SAFETY: the helper reads `len` bytes of `from` (the caller's buffer holds them) and checks
    // the packet's bounds itself.
    match unsafe { bpf_skb_store_bytes(ctx.skb.skb.cast(), offset, from.cast(), len, 0) } {
        0 => Ok(()),
        error => Err(error),
    }
}

#[inline(always)]
fn adjust_room_flags(tunnel: &Tunnel) -> u64 {
    let l3 = if tunnel.ipv6 != 0 {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6
    } else {
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    };
    let l4 = if tunnel.format == TUNNEL_VXLAN || tunnel.format == TUNNEL_GENEVE {
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP
    } else {
        BPF_F_ADJ_ROOM_ENCAP_L4_GRE
    };
    u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L2_ETH | l3 | l4)
}

/// Byte offsets in the outer header.
const IPV4_TOTAL_LEN: usize = EthHdr::LEN + offset_of!(Ipv4Hdr, tot_len);
const IPV4_CHECKSUM: usize = EthHdr::LEN + offset_of!(Ipv4Hdr, check);
const IPV6_PAYLOAD_LEN: usize = EthHdr::LEN + offset_of!(Ipv6Hdr, payload_len);
const UDP_LEN: usize = offset_of!(UdpHdr, len);
/// After the GRE base header: the sequence number, then the ERSPAN header.
const GRE_SEQUENCE: usize = 4;
const ERSPAN: usize = 8;
/// ERSPAN header bits (in its first 16-bit words): the VLAN id, "the tag was kept in the frame"
/// (type II `En` = 3), truncated (`T`), and type III's timestamp and direction (`D`, egress).
const ERSPAN_VLAN_MASK: u16 = 0x0fff;
const ERSPAN2_TAG_KEPT: u8 = 0x18;
const ERSPAN_TRUNCATED: u8 = 0x04;
const ERSPAN3_TIMESTAMP: usize = 4;
const ERSPAN3_FLAGS_LOW: usize = 11;
const ERSPAN3_EGRESS: u8 = 0x08;
/// ERSPAN type III timestamps count 100 ns (granularity 01 in the template).
const ERSPAN3_TICK_NS: u64 = 100;

/// Fills in what differs per copy, for a packet of `len` bytes after the growth.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; each is a plain value"
)]
#[inline(always)]
fn fill_in(
    scratch: &mut [u8; SCRATCH_LEN],
    tunnel: &Tunnel,
    hash: u32,
    session: u32,
    len: u32,
    egress: bool,
    truncated: bool,
    tag: Option<[u8; 4]>,
) {
    let l4 = if tunnel.ipv6 != 0 {
        put_u16(
            scratch,
            IPV6_PAYLOAD_LEN,
            (len - ETHERNET_HEADER_LEN - Ipv6Hdr::LEN as u32) as u16,
        );
        EthHdr::LEN + Ipv6Hdr::LEN
    } else {
        let total = (len - ETHERNET_HEADER_LEN) as u16;
        put_u16(scratch, IPV4_TOTAL_LEN, total);
        put_u16(
            scratch,
            IPV4_CHECKSUM,
            !fold(tunnel.ipv4_sum + u32::from(total)),
        );
        EthHdr::LEN + Ipv4Hdr::LEN
    };
    match tunnel.format {
        TUNNEL_VXLAN | TUNNEL_GENEVE => {
            let port = tunnel.source_port_low
                + ((u64::from(hash) * u64::from(tunnel.source_port_span)) >> 32) as u32;
            put_u16(scratch, l4, port as u16);
            put_u16(scratch, l4 + UDP_LEN, (len - l4 as u32) as u16);
        }
        TUNNEL_ERSPAN2 | TUNNEL_ERSPAN3 => {
            let sequence = TUNNEL_SEQUENCE
                .get_ptr_mut(session)
                .map_or(0, next_sequence);
            put_u32(scratch, l4 + GRE_SEQUENCE, sequence as u32);
            let erspan = l4 + ERSPAN;
            if let Some([_, _, high, low]) = tag {
                let vlan = u16::from_be_bytes([high, low]) & ERSPAN_VLAN_MASK;
                or_u16(scratch, erspan, vlan);
                if tunnel.format == TUNNEL_ERSPAN2 {
                    or_u8(scratch, erspan + 2, ERSPAN2_TAG_KEPT);
                }
            }
            if truncated {
                or_u8(scratch, erspan + 2, ERSPAN_TRUNCATED);
            }
            if tunnel.format == TUNNEL_ERSPAN3 {
                // SAFETY: reads the clock.
                let now = unsafe { bpf_ktime_get_tai_ns() } / ERSPAN3_TICK_NS;
                put_u32(scratch, erspan + ERSPAN3_TIMESTAMP, now as u32);
                if egress {
                    or_u8(scratch, erspan + ERSPAN3_FLAGS_LOW, ERSPAN3_EGRESS);
                }
            }
        }
        _ => {}
    }
}

/// Takes the next number from `slot`, a map value all CPUs share: one atomic fetch-and-add.
///
/// Written as the instruction itself: the Rust target has no `fetch_add` for BPF (its spec leaves
/// out compare-and-swap), and LLVM refuses the fetching form below CPU v3, which bpf-linker is
/// not given. The kernel's verifier accepts it on every kernel with BPF atomics (5.12+).
#[inline(always)]
fn next_sequence(slot: *mut u64) -> u64 {
    let mut value: u64 = 1;
    // SAFETY: `slot` points into a map value that lives as long as the program; the instruction
    // adds `value` to it atomically and returns the old contents in `value`.
    unsafe {
        core::arch::asm!(
            "{value} = atomic_fetch_add((u64 *)({slot} + 0), {value})",
            slot = in(reg) slot,
            value = inout(reg) value,
            options(nostack),
        );
    }
    value
}

/// Folds a one's complement sum to 16 bits.
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    ((sum & 0xffff) + (sum >> 16)) as u16
}

#[inline(always)]
fn put(scratch: &mut [u8; SCRATCH_LEN], at: usize, bytes: &[u8]) {
    if let Some(to) = scratch.get_mut(at..at + bytes.len()) {
        to.copy_from_slice(bytes);
    }
}

#[inline(always)]
fn put_u16(scratch: &mut [u8; SCRATCH_LEN], at: usize, value: u16) {
    put(scratch, at, &value.to_be_bytes());
}

#[inline(always)]
fn put_u32(scratch: &mut [u8; SCRATCH_LEN], at: usize, value: u32) {
    put(scratch, at, &value.to_be_bytes());
}

#[inline(always)]
fn or_u8(scratch: &mut [u8; SCRATCH_LEN], at: usize, bits: u8) {
    if let Some(byte) = scratch.get_mut(at) {
        *byte |= bits;
    }
}

#[inline(always)]
fn or_u16(scratch: &mut [u8; SCRATCH_LEN], at: usize, bits: u16) {
    let [high, low] = bits.to_be_bytes();
    or_u8(scratch, at, high);
    or_u8(scratch, at + 1, low);
}
