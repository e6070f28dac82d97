//! Per-CPU counters: plain increments are safe because each CPU owns its slot.
use mirror_common::{Counters, Direction, HookCounters};

use crate::maps::{HOOK_COUNTERS, RULE_COUNTERS, SESSION_COUNTERS};

/// Counts into a rule's and its session's counters.
#[inline(always)]
pub fn bump(rule: u32, session: u32, field: impl Fn(&mut Counters) -> &mut u64) {
    for counters in [
        RULE_COUNTERS.get_ptr_mut(rule),
        SESSION_COUNTERS.get_ptr_mut(session),
    ]
    .into_iter()
    .flatten()
    {
        // SAFETY: a per-CPU array slot, written only from this CPU.
        *field(unsafe { &mut *counters }) += 1;
    }
}

#[inline(always)]
pub fn rule_matched(rule: u32, session: u32) {
    bump(rule, session, |c| &mut c.matched);
}

#[inline(always)]
pub fn mirrored(rule: u32, session: u32) {
    bump(rule, session, |c| &mut c.mirrored);
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
