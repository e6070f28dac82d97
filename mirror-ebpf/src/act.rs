//! Sending the copies a classification decided, one `bpf_loop` step per copy (a plain call for a
//! single copy): the verifier checks one step instead of every combination of outcomes (sampled
//! out, too big, rate limited, clone failure) across [`MAX_COPIES_PER_PACKET`] copies, which took
//! it tens of seconds when unrolled. Each copy goes through sampling, then the size check (cut to
//! snaplen, or too big), then the rate limits, and only then is it cloned.
use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::bpf_loop,
    macros::map,
    maps::PerCpuArray,
    programs::{TcContext, XdpContext},
};
use mirror_common::{
    COPY_COOKIE, COPY_COOKIE_CB, COPY_EGRESS_BIT, COPY_MARK, Direction, FLOW_HASH_CB,
    MAX_COPIES_PER_PACKET, MAX_NESTING, MAX_RING_CHUNKS, MAX_RING_COPY, RING_WATCH_ONLY,
    SessionMeta, TARGET_RING, TARGET_TUNNEL,
};

use crate::{
    classify::{Copy, TableError, Verdict},
    count, limit,
    maps::{NESTING, SESSIONS, TUNNELS, copy_generation},
    packet::Packet,
    ring,
};

/// A copy the target did not take.
pub enum NotSent {
    /// The kernel failed to clone or redirect it.
    Clone,
    /// The ring buffer was full.
    RingFull,
    /// The tunnel's collector has no route or next hop now.
    NoRoute,
}

/// How a hook hands a copy of `len` bytes (at most) to its session's target.
pub trait Sender: Packet + Sized {
    /// Copies are clones made in the kernel, which a watcher only sees through the ring.
    const CLONES: bool;

    fn deliver(
        &self,
        copy: Copy,
        session: &SessionMeta,
        direction: u32,
        len: u32,
        flow_hash: u32,
    ) -> Result<(), NotSent>;
}

impl Sender for TcContext {
    const CLONES: bool = true;

    #[inline(always)]
    fn deliver(
        &self,
        copy: Copy,
        session: &SessionMeta,
        direction: u32,
        len: u32,
        flow_hash: u32,
    ) -> Result<(), NotSent> {
        if session.target_kind == TARGET_RING {
            return ring::emit(self, copy, direction, len, flow_hash, 0)
                .map(|_| ())
                .map_err(|ring::NotQueued| NotSent::RingFull);
        }
        let sent = if session.target_kind == TARGET_TUNNEL {
            // SAFETY: a read of the entry; the agent replaces entries whole, never in place.
            let tunnel = unsafe { TUNNELS.get(copy.session) };
            let Some(ifindex) = tunnel.map(|t| t.ifindex).filter(|i| *i != 0) else {
                return Err(NotSent::NoRoute);
            };
            let egress = if direction == Direction::Egress as u32 {
                COPY_EGRESS_BIT
            } else {
                0
            };
            // The flow hash travels to the copy program in the control block, like the rule in
            // the mark: the copy program then needs no flow dissector of its own for the UDP
            // source port. The original's word is back right after.
            // SAFETY: ctx.skb.skb is the context pointer the kernel passed to this program; `cb`
            // is the programs' scratch space.
            let skb = unsafe { &mut *self.skb.skb };
            let saved = skb.cb[FLOW_HASH_CB];
            skb.cb[FLOW_HASH_CB] = flow_hash;
            let sent = send_marked_copy(self, ifindex, copy.rule | egress);
            skb.cb[FLOW_HASH_CB] = saved;
            sent
        } else if session.target_ifindex == 0 {
            // The target interface is gone (the agent points the session at it again when it
            // is back).
            return Err(NotSent::NoRoute);
        } else if session.finish == 0 {
            self.clone_redirect(session.target_ifindex, 0)
        } else {
            send_marked_copy(self, session.target_ifindex, copy.rule)
        };
        sent.map_err(|_| NotSent::Clone)
    }
}

impl Sender for XdpContext {
    const CLONES: bool = false;

    /// XDP cannot clone: every copy goes through the ring.
    #[inline(always)]
    fn deliver(
        &self,
        copy: Copy,
        _session: &SessionMeta,
        direction: u32,
        len: u32,
        flow_hash: u32,
    ) -> Result<(), NotSent> {
        ring::emit(self, copy, direction, len, flow_hash, 0)
            .map(|_| ())
            .map_err(|ring::NotQueued| NotSent::RingFull)
    }
}

/// A packet's copies while they are sent, in per-CPU map memory (the programs' stack is nearly
/// full). The copies are read out of the walk scratch first: a copy is sent synchronously to its
/// target or underlay interface, whose own egress hook may run the mirror program again
/// and reuse the scratch. That nested run takes the next batch (see [`BATCHES`]).
#[repr(C)]
pub struct Batch {
    /// [`crate::parse::copy_len`] of the packet.
    copy_len: u32,
    /// [`limit::flow_hash`] of the packet.
    flow_hash: u32,
    /// A table inconsistency was met (counted by the caller).
    table_error: u32,
    /// 1 when the parser could not finish the packet (see `classify::Verdict::unparsed`).
    unparsed: u32,
    copies: [Copy; MAX_COPIES_PER_PACKET],
}

/// Per CPU, one batch of copies per nesting level; deeper runs copy nothing.
#[map]
static BATCHES: PerCpuArray<Batch> = PerCpuArray::with_max_entries(MAX_NESTING, 0);

/// What `bpf_loop` hands each step, on the stack (a context pointer cannot go into a map).
#[repr(C)]
struct Sending {
    ctx: *mut c_void,
    depth: u32,
    direction: u32,
}

/// Sends the verdict's copies to their sessions' targets, counting each outcome.
#[inline(always)]
pub fn send<P: Sender>(
    ctx: &P,
    direction: u32,
    verdict: &Verdict,
    copy_len: u32,
    flow_hash: u32,
) -> Result<(), TableError> {
    let depth_slot = NESTING.get_ptr_mut(0).ok_or(TableError)?;
    // SAFETY: this CPU's slot; programs on one CPU nest but never interleave.
    let depth = unsafe { *depth_slot };
    let Some(batch) = BATCHES.get_ptr_mut(depth) else {
        // Nested deeper than any real path goes (copies of copies): make no more.
        for copy in verdict.copies.iter().take(verdict.copy_count) {
            count::copy_limit(copy.rule, copy.session);
        }
        return Ok(());
    };
    // SAFETY: this CPU's batch at this depth, used by nobody else until `send` returns.
    let batch = unsafe { &mut *batch };
    batch.copy_len = copy_len;
    batch.flow_hash = flow_hash;
    batch.table_error = 0;
    batch.unparsed = u32::from(verdict.unparsed);
    for (to, from) in batch.copies.iter_mut().zip(verdict.copies.iter()) {
        // SAFETY: a valid reference into the walk scratch; volatile so that the copy is made now.
        *to = unsafe { core::ptr::read_volatile(from) };
    }
    let mut sending = Sending {
        ctx: ctx.raw(),
        depth,
        direction,
    };
    // SAFETY: `send_step` has the callback signature bpf_loop expects; `sending` outlives the
    // call; the depth slot is this CPU's.
    unsafe {
        *depth_slot = depth + 1;
        if verdict.copy_count == 1 {
            // Most verdicts make one copy: a plain call, without the loop helper's cost.
            send_step::<P>(0, (&raw mut sending).cast());
        } else {
            bpf_loop(
                verdict.copy_count as u32,
                send_step::<P> as *const () as *mut c_void,
                (&raw mut sending).cast(),
                0,
            );
        }
        *depth_slot = depth;
    }
    if batch.table_error == 0 {
        Ok(())
    } else {
        Err(TableError)
    }
}

extern "C" fn send_step<P: Sender>(index: u64, context: *mut c_void) -> i64 {
    // SAFETY: `context` is the `Sending` that `send` passed to bpf_loop.
    let sending = unsafe { &*context.cast::<Sending>() };
    let Some(batch) = BATCHES.get_ptr_mut(sending.depth) else {
        return 1;
    };
    // SAFETY: as in `send`.
    let batch = unsafe { &mut *batch };
    let Some(copy) = batch.copies.get(index as usize).copied() else {
        return 1;
    };
    let Some(session) = SESSIONS.get(copy.session) else {
        batch.table_error = 1;
        return 1;
    };
    if batch.unparsed != 0 {
        count::bump(copy.rule, copy.session, |c| &mut c.unparsed);
        if session.skip_unparsed != 0 {
            return 0;
        }
    }
    if !limit::sampled_in(session, batch.flow_hash) {
        count::bump(copy.rule, copy.session, |c| &mut c.sampled_out);
        return 0;
    }
    // SAFETY: `sending.ctx` is this program's context pointer, stored by `send`.
    let ctx = unsafe { P::from_raw(sending.ctx) };
    if session.whole_frames != 0 {
        return send_whole(&ctx, copy, session, sending.direction, batch.flow_hash);
    }
    // A ring record holds MAX_RING_COPY bytes; the snaplen may cut a copy shorter.
    let ring_cut = if session.snaplen != 0 {
        session.snaplen.min(MAX_RING_COPY)
    } else {
        MAX_RING_COPY
    };
    let truncated = session.snaplen != 0 && batch.copy_len > session.snaplen
        || session.target_kind == TARGET_RING && batch.copy_len > MAX_RING_COPY;
    let len = if truncated {
        if session.target_kind == TARGET_RING {
            ring_cut
        } else {
            session.snaplen
        }
    } else {
        if session.max_copy_len != 0 && batch.copy_len > session.max_copy_len {
            count::bump(copy.rule, copy.session, |c| &mut c.too_big);
            return 0;
        }
        batch.copy_len
    };
    if !limit::admit(copy.session, session, len) {
        count::bump(copy.rule, copy.session, |c| &mut c.rate_limited);
        return 0;
    }
    match ctx.deliver(copy, session, sending.direction, len, batch.flow_hash) {
        Ok(()) => {
            count::mirrored(copy.rule, copy.session, len);
            if truncated {
                count::bump(copy.rule, copy.session, |c| &mut c.truncated);
            }
            // A clone's watchers get theirs through the ring; a ring copy is there already.
            if P::CLONES
                && session.watched != 0
                && session.target_kind != TARGET_RING
                && ring::emit(
                    &ctx,
                    copy,
                    sending.direction,
                    len,
                    batch.flow_hash,
                    RING_WATCH_ONLY,
                )
                .is_err()
            {
                count::bump(copy.rule, copy.session, |c| &mut c.watch_lost);
            }
        }
        Err(NotSent::Clone) => {
            count::clone_error(copy.rule, copy.session);
            aya_log_ebpf::debug!(
                &ctx,
                "session {} rule {}: the copy could not be cloned to its target",
                copy.session,
                copy.rule
            );
        }
        Err(NotSent::RingFull) => count::bump(copy.rule, copy.session, |c| &mut c.ring_full),
        Err(NotSent::NoRoute) => count::bump(copy.rule, copy.session, |c| &mut c.no_route),
    }
    0
}

/// A whole-frame session's copy (a shadow's): the whole frame, a GSO packet's payload included,
/// into the ring in chunks; longer than the chunks hold, it is cut (`truncated`). The snaplen and
/// the target's size do not apply. Returns `bpf_loop`'s "go on".
#[inline(always)]
fn send_whole<P: Sender>(
    ctx: &P,
    copy: Copy,
    session: &SessionMeta,
    direction: u32,
    flow_hash: u32,
) -> i64 {
    let frame_len = ctx.frame_len();
    let len = frame_len.min(MAX_RING_COPY * MAX_RING_CHUNKS);
    if !limit::admit(copy.session, session, len) {
        count::bump(copy.rule, copy.session, |c| &mut c.rate_limited);
        return 0;
    }
    match ring::emit_whole(ctx, copy, direction, len, flow_hash) {
        Ok(()) => {
            count::mirrored(copy.rule, copy.session, len);
            if len < frame_len {
                count::bump(copy.rule, copy.session, |c| &mut c.truncated);
            }
        }
        Err(ring::NotQueued) => count::bump(copy.rule, copy.session, |c| &mut c.ring_full),
    }
    0
}

/// Clones the packet to the target. The copy carries its rule (and for tunnels its direction) in
/// its mark for the copy program at the target (see `mirror_common::COPY_MARK`); the original's
/// mark is back before this returns.
#[inline(always)]
fn send_marked_copy(ctx: &TcContext, target_ifindex: u32, rule: u32) -> Result<(), i64> {
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to this program; `cb` is the
    // programs' scratch space.
    let skb = unsafe { &mut *ctx.skb.skb };
    let mark = skb.mark;
    let cookie = skb.cb[COPY_COOKIE_CB];
    skb.cb[COPY_COOKIE_CB] = COPY_COOKIE;
    ctx.set_mark(COPY_MARK | copy_generation() | rule);
    let sent = ctx.clone_redirect(target_ifindex, 0);
    ctx.set_mark(mark);
    // SAFETY: as above.
    unsafe { (*ctx.skb.skb).cb[COPY_COOKIE_CB] = cookie };
    sent
}
