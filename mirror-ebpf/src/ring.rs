//! Copies through the ring buffer: the packet's first bytes and a header go into `COPY_RING`,
//! and the agent sends them on (XDP cannot clone; a pcap target needs userspace anyway).
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::PerCpuArray,
};
use mirror_common::{MAX_RING_COPY, RingCopyHeader};

use crate::{
    classify::Copy,
    maps::COPY_RING,
    packet::{Packet, VLAN_TAG_LEN},
};

/// A ring record being built, in per-CPU map memory (too big for the stack).
#[repr(C)]
pub struct RingRecord {
    header: RingCopyHeader,
    data: [u8; MAX_RING_COPY as usize],
}

/// Per CPU, the ring record being built.
#[map]
static RING_SCRATCH: PerCpuArray<RingRecord> = PerCpuArray::with_max_entries(1, 0);

/// A mask above every ring copy length (see [`MAX_RING_COPY`]).
const LEN_MASK: u64 = 0x3fff;
const _: () = assert!(MAX_RING_COPY as u64 <= LEN_MASK);

/// Bytes of a frame before its first VLAN tag.
const MACS_LEN: u32 = 12;

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
    let record = RING_SCRATCH.get_ptr_mut(0).ok_or(NotQueued)?;
    // SAFETY: this CPU's slot; the ring write below ends before anything else runs here.
    let record = unsafe { &mut *record };
    let orig_len = ctx.frame_len();
    let cap_len = len.min(orig_len).min(MAX_RING_COPY);
    load_frame(ctx, &mut record.data, cap_len)?;
    record.header = RingCopyHeader {
        // SAFETY: reads the monotonic clock, no preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        ifindex: ctx.ifindex(),
        direction,
        session: copy.session,
        rule: copy.rule,
        orig_len,
        cap_len,
        flow_hash,
        flags,
    };
    let total = size_of::<RingCopyHeader>() + cap_len as usize;
    // SAFETY: the record is plain bytes; `total` is at most its size (cap_len <= MAX_RING_COPY).
    let bytes = unsafe {
        core::slice::from_raw_parts(
            core::ptr::from_ref::<RingRecord>(record).cast::<u8>(),
            total.min(size_of::<RingRecord>()),
        )
    };
    COPY_RING
        .output::<[u8]>(bytes, wakeup_flags())
        .map(|()| cap_len)
        .map_err(|_| NotQueued)
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

/// Copies the frame's first `len` bytes into `to`, with the tag held in metadata put back.
#[inline(always)]
fn load_frame<P: Packet>(
    ctx: &P,
    to: &mut [u8; MAX_RING_COPY as usize],
    len: u32,
) -> Result<(), NotQueued> {
    let Some(tag) = ctx.tag_in_metadata() else {
        return load_into(ctx, 0, to, 0, len);
    };
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
fn load_into<P: Packet>(
    ctx: &P,
    offset: u32,
    to: &mut [u8; MAX_RING_COPY as usize],
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
    if bounded == 0 || bounded + u64::from(at) > u64::from(MAX_RING_COPY) {
        return Err(NotQueued);
    }
    let dest = to.as_mut_ptr().wrapping_add(at as usize);
    ctx.load_bytes(offset, dest, bounded as u32)
        .map_err(|()| NotQueued)
}
