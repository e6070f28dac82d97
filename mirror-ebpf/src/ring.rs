//! Copies through the ring buffer: the packet's first bytes and a header go into `COPY_RING`,
//! and the agent sends them on (XDP cannot clone; a pcap target needs userspace anyway).
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    helpers::bpf_ktime_get_ns,
};
use mirror_common::{
    MAX_RING_CHUNKS, MAX_RING_COPY, RING_AFTER_LOSS, RING_CHUNK_SHIFT, RingCopyHeader,
};

use crate::{
    classify::Copy,
    maps::{COPY_RING, RING_LOST},
    packet::{MACS_LEN, Packet, VLAN_TAG_LEN},
};

/// A ring record with room for `N` bytes of the frame. Records are reserved in the ring and the
/// frame is loaded straight into them: one copy, where a record built aside and handed to
/// `bpf_ringbuf_output` took two. The verifier wants a reservation's size constant, so a copy goes
/// into the smallest of a few sizes that holds it (see [`emit`]); the agent reads the header's
/// `cap_len` bytes of the rest.
#[repr(C)]
struct Record<const N: usize> {
    header: RingCopyHeader,
    data: [u8; N],
}

/// A mask above every ring copy length (see [`MAX_RING_COPY`]).
const LEN_MASK: u64 = 0x3fff;
const _: () = assert!(MAX_RING_COPY as u64 <= LEN_MASK);

/// The copy could not go into the ring (full, or the packet could not be read).
pub struct NotQueued;

/// Queues a copy of the first `len` bytes of the frame (at most [`MAX_RING_COPY`]), a VLAN tag
/// held in skb metadata put back in its place, with `flags` (`RingCopyHeader::flags`). Returns
/// how many bytes were queued.
#[inline(always)]
pub fn emit<P: Packet>(
    ctx: &P,
    copy: Copy,
    direction: u32,
    len: u32,
    flow_hash: u32,
    flags: u32,
) -> Result<u32, NotQueued> {
    let mut header = header(ctx, copy, direction, flow_hash, flags);
    header.cap_len = len.min(header.orig_len).min(MAX_RING_COPY);
    queue_fitted(ctx, &header)?;
    Ok(header.cap_len)
}

/// Queues the frame's first `header.cap_len` bytes (at most [`MAX_RING_COPY`]) in the smallest
/// record that holds them: minimum-size frames, headers cut to a snaplen, a standard MTU's
/// frames, and the rest. (A ring of 8 MiB holds about 900 records of the largest size, but
/// 100,000 of the smallest: an ACK never takes 9 KiB of it.)
#[inline(always)]
fn queue_fitted<P: Packet>(ctx: &P, header: &RingCopyHeader) -> Result<(), NotQueued> {
    if header.cap_len <= 64 {
        queue::<P, 64>(ctx, header, 0)
    } else if header.cap_len <= 256 {
        queue::<P, 256>(ctx, header, 0)
    } else if header.cap_len <= 1536 {
        queue::<P, 1536>(ctx, header, 0)
    } else {
        queue::<P, { MAX_RING_COPY as usize }>(ctx, header, 0)
    }
}

/// A record's header for a copy of this packet now, its `cap_len` still to be set.
#[inline(always)]
fn header<P: Packet>(
    ctx: &P,
    copy: Copy,
    direction: u32,
    flow_hash: u32,
    flags: u32,
) -> RingCopyHeader {
    RingCopyHeader {
        // SAFETY: reads the monotonic clock, no preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        ifindex: ctx.ifindex(),
        direction,
        session: copy.session,
        rule: copy.rule,
        orig_len: ctx.frame_len(),
        cap_len: 0,
        flow_hash,
        flags,
    }
}

/// Queues the frame's first `len` bytes whole, as chunks of up to [`MAX_RING_COPY`] (see
/// `mirror_common::RING_CHUNK_SHIFT`); `len` is at most `MAX_RING_CHUNKS * MAX_RING_COPY`. A
/// chunk the ring refuses ends the copy (the agent sees the rest missing) and marks the session's
/// next record with `RING_AFTER_LOSS`.
#[inline(always)]
pub fn emit_whole<P: Packet>(
    ctx: &P,
    copy: Copy,
    direction: u32,
    len: u32,
    flow_hash: u32,
) -> Result<(), NotQueued> {
    let lost = RING_LOST.get_ptr_mut(copy.session);
    // SAFETY: an element of an array map: valid, and a plain u32 (racy updates lose nothing but
    // a flag that a later loss sets again).
    let after_loss = lost.is_some_and(|lost| unsafe { *lost } != 0);
    let flags = if after_loss { RING_AFTER_LOSS } else { 0 };
    let queued = emit_chunks(ctx, copy, direction, len, flow_hash, flags);
    if let Some(lost) = lost {
        // SAFETY: as above.
        unsafe { *lost = u32::from(queued.is_err()) };
    }
    queued
}

/// The frame's first `len` bytes as chunks with one header (the agent joins a frame's chunks by
/// its timestamp, interface and session).
#[inline(always)]
fn emit_chunks<P: Packet>(
    ctx: &P,
    copy: Copy,
    direction: u32,
    len: u32,
    flow_hash: u32,
    flags: u32,
) -> Result<(), NotQueued> {
    let mut header = header(ctx, copy, direction, flow_hash, flags);
    // One chunk: a record that fits it.
    if len <= MAX_RING_COPY {
        header.cap_len = len;
        return queue_fitted(ctx, &header);
    }
    for chunk in 0..MAX_RING_CHUNKS {
        let start = chunk * MAX_RING_COPY;
        if start >= len {
            break;
        }
        header.cap_len = (len - start).min(MAX_RING_COPY);
        header.flags = flags | chunk << RING_CHUNK_SHIFT;
        queue::<P, { MAX_RING_COPY as usize }>(ctx, &header, start)?;
    }
    Ok(())
}

/// Reserves a record of `N` bytes of frame, loads the frame's `header.cap_len` bytes (at most
/// `N`) from `start` into it and submits it.
#[inline(always)]
fn queue<P: Packet, const N: usize>(
    ctx: &P,
    header: &RingCopyHeader,
    start: u32,
) -> Result<(), NotQueued> {
    let mut entry = COPY_RING.reserve::<Record<N>>(0).ok_or(NotQueued)?;
    let record = entry.as_mut_ptr();
    // SAFETY: the reservation is a `Record<N>`, valid for writes; its bytes are plain data.
    let data = unsafe { &mut (*record).data };
    if load_frame(ctx, data, start, header.cap_len).is_err() {
        entry.discard(u64::from(BPF_RB_NO_WAKEUP));
        return Err(NotQueued);
    }
    // SAFETY: as above.
    unsafe { (&raw mut (*record).header).write(*header) };
    entry.submit(wakeup_flags());
    Ok(())
}

/// Whether this record wakes the agent's drain thread. A wake-up per record (the helper's
/// default when the reader waits) costs microseconds of program time; instead the reader wakes
/// up on its own every few milliseconds, and a record wakes it only when the ring is half full.
#[inline(always)]
fn wakeup_flags() -> u64 {
    let queued = COPY_RING.query(u64::from(BPF_RB_AVAIL_DATA));
    let size = COPY_RING.query(u64::from(BPF_RB_RING_SIZE));
    if queued >= size / 2 {
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

/// Copies `len` bytes of the frame from `start` into `to`, with the tag held in metadata put
/// back (the frame's bytes after it are the packet's from 4 bytes earlier).
#[inline(always)]
fn load_frame<P: Packet, const N: usize>(
    ctx: &P,
    to: &mut [u8; N],
    start: u32,
    len: u32,
) -> Result<(), NotQueued> {
    let Some(tag) = ctx.tag_in_metadata() else {
        return load_into(ctx, start, to, 0, len);
    };
    if start != 0 {
        return load_into(ctx, start - VLAN_TAG_LEN, to, 0, len);
    }
    if len < MACS_LEN + VLAN_TAG_LEN {
        return load_into(ctx, 0, to, 0, len);
    }
    load_into(ctx, 0, to, 0, MACS_LEN)?;
    to[MACS_LEN as usize..(MACS_LEN + VLAN_TAG_LEN) as usize].copy_from_slice(&tag);
    load_into(
        ctx,
        MACS_LEN,
        to,
        MACS_LEN + VLAN_TAG_LEN,
        len - MACS_LEN - VLAN_TAG_LEN,
    )
}

/// `len` bytes of the packet from `offset` into `to[at..]`; nothing for a zero length.
#[inline(always)]
fn load_into<P: Packet, const N: usize>(
    ctx: &P,
    offset: u32,
    to: &mut [u8; N],
    at: u32,
    len: u32,
) -> Result<(), NotQueued> {
    if len == 0 {
        return Ok(());
    }
    // Bounds the verifier can follow on the register the helper gets: masked, then non-zero and
    // within the buffer from `at`. The opaque reload keeps LLVM from passing an earlier register
    // (say, `len - 16` before its checks) whose bounds the verifier does not know.
    let bounded = core::hint::black_box(u64::from(len)) & LEN_MASK;
    if bounded == 0 || bounded + u64::from(at) > N as u64 {
        return Err(NotQueued);
    }
    let dest = to.as_mut_ptr().wrapping_add(at as usize);
    ctx.load_bytes(offset, dest, bounded as u32)
        .map_err(|()| NotQueued)
}
