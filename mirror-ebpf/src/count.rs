//! Per-CPU counters: plain increments are safe because each CPU owns its slot.
use mirror_common::{Counters, Direction, HookCounters};

use crate::maps::{HOOK_COUNTERS, RULE_COUNTERS, SESSION_COUNTERS, WATCH_TRAFFIC};

/// Changes a rule's and its session's counters alike.
#[inline(always)]
fn update(rule: u32, session: u32, change: impl Fn(&mut Counters)) {
    // Two lookups, each checked on its own: the verifier refuses code that merges the two
    // pointers' null checks (as a loop over both may compile to).
    if let Some(counters) = RULE_COUNTERS.get_ptr_mut(rule) {
        // SAFETY: a per-CPU array slot, written only from this CPU.
        change(unsafe { &mut *counters });
    }
    if let Some(counters) = SESSION_COUNTERS.get_ptr_mut(session) {
        // SAFETY: as above.
        change(unsafe { &mut *counters });
    }
}

/// Counts one into a rule's and its session's counters.
#[inline(always)]
pub fn bump(rule: u32, session: u32, field: impl Fn(&mut Counters) -> &mut u64) {
    update(rule, session, |c| *field(c) += 1);
}

/// Counts a packet of `len` bytes a rule decided.
#[inline(always)]
pub fn rule_matched(rule: u32, session: u32, len: u32) {
    update(rule, session, |c| {
        c.matched += 1;
        c.matched_bytes += u64::from(len);
    });
}

/// Counts a copy of `len` bytes handed to the target.
#[inline(always)]
pub fn mirrored(rule: u32, session: u32, len: u32) {
    update(rule, session, |c| {
        c.mirrored += 1;
        c.mirrored_bytes += u64::from(len);
    });
}

#[inline(always)]
pub fn clone_error(rule: u32, session: u32) {
    bump(rule, session, |c| &mut c.clone_errors);
}

#[inline(always)]
pub fn copy_limit(rule: u32, session: u32) {
    bump(rule, session, |c| &mut c.copy_limit);
}

#[inline(always)]
pub fn hook(direction: Direction, field: impl Fn(&mut HookCounters) -> &mut u64) {
    hook_at(direction as u32, field);
}

/// Counts into `HOOK_COUNTERS[index]` (a direction or `COPY_HOOK`).
#[inline(always)]
pub fn hook_at(index: u32, field: impl Fn(&mut HookCounters) -> &mut u64) {
    if let Some(counters) = HOOK_COUNTERS.get_ptr_mut(index) {
        // SAFETY: as above.
        *field(unsafe { &mut *counters }) += 1;
    }
}

/// Counts a packet of `len` bytes classified at an attachment of `group`.
#[inline(always)]
pub fn watched(group: u32, len: u32) {
    if let Some(traffic) = WATCH_TRAFFIC.get_ptr_mut(group) {
        // SAFETY: as above.
        let traffic = unsafe { &mut *traffic };
        traffic.packets += 1;
        traffic.bytes += u64::from(len);
    }
}
