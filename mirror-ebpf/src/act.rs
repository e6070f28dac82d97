//! Sending the copies a classification decided, one `bpf_loop` step per copy: the verifier checks
//! one step instead of every combination of outcomes (target kind, too big, clone failure) across
//! [`MAX_COPIES_PER_PACKET`] copies, which took it tens of seconds when unrolled.
use core::ffi::c_void;

use aya_ebpf::{bindings::__sk_buff, helpers::generated::bpf_loop, programs::TcContext};
use mirror_common::{COPY_MARK, MAX_COPIES_PER_PACKET, SessionMeta, TARGET_INTERFACE};

use crate::{
    classify::{Copy, TableError, Verdict},
    count,
    maps::SESSIONS,
};

/// What the loop steps share, on this program's stack. The copies are read out of the walk
/// scratch first: a copy to a VXLAN device is sent synchronously down to the underlay interface,
/// whose own hook may run the mirror program again and reuse the scratch.
#[repr(C)]
struct Batch {
    skb: *mut __sk_buff,
    /// [`crate::parse::copy_len`] of the packet.
    copy_len: u32,
    /// A table inconsistency was met (counted by the caller).
    table_error: u32,
    copies: [Copy; MAX_COPIES_PER_PACKET],
}

/// Sends the verdict's copies to their sessions' targets, counting each outcome.
#[inline(always)]
pub fn send(ctx: &TcContext, verdict: &Verdict, copy_len: u32) -> Result<(), TableError> {
    let mut batch = Batch {
        skb: ctx.skb.skb,
        copy_len,
        table_error: 0,
        copies: [Copy {
            rule: 0,
            session: 0,
        }; MAX_COPIES_PER_PACKET],
    };
    for (to, from) in batch.copies.iter_mut().zip(verdict.copies.iter()) {
        // SAFETY: a valid reference into the walk scratch; volatile so that the copy is made now.
        *to = unsafe { core::ptr::read_volatile(from) };
    }
    // SAFETY: `send_step` has the callback signature bpf_loop expects; `batch` outlives the call.
    unsafe {
        bpf_loop(
            verdict.copy_count as u32,
            send_step as *const () as *mut c_void,
            (&raw mut batch).cast(),
            0,
        );
    }
    if batch.table_error == 0 {
        Ok(())
    } else {
        Err(TableError)
    }
}

extern "C" fn send_step(index: u64, context: *mut c_void) -> i64 {
    // SAFETY: `context` is the `Batch` that `send` passed to bpf_loop.
    let batch = unsafe { &mut *context.cast::<Batch>() };
    let Some(copy) = batch.copies.get(index as usize).copied() else {
        return 1;
    };
    let Some(session) = SESSIONS.get(copy.session) else {
        batch.table_error = 1;
        return 1;
    };
    if session.max_copy_len != 0 && batch.copy_len > session.max_copy_len {
        count::too_big(copy.rule, copy.session);
        return 0;
    }
    let ctx = TcContext::new(batch.skb);
    match send_copy(&ctx, session, copy.session) {
        Ok(()) => count::mirrored(copy.rule, copy.session),
        Err(_) => count::clone_error(copy.rule, copy.session),
    }
    0
}

/// Clones the packet to the session's target. A tunnel copy carries its session in its mark
/// (see `mirror_common::COPY_MARK`); the original's mark is back before this returns.
#[inline(always)]
fn send_copy(ctx: &TcContext, session: &SessionMeta, index: u32) -> Result<(), i64> {
    if session.target_kind == TARGET_INTERFACE {
        return ctx.clone_redirect(session.target_ifindex, 0);
    }
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to this program.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(COPY_MARK | index);
    let sent = ctx.clone_redirect(session.target_ifindex, 0);
    ctx.set_mark(mark);
    sent
}
