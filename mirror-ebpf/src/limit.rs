//! Sampling and rate limits, decided per copy before it is made.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use mirror_common::{
    NODE_RATE_INDEX, RateLimit, RateState, SAMPLE_FLOWS, SAMPLE_PACKETS, SessionMeta,
};

use crate::{
    maps::{NODE_RATE_LIMIT, RATE_STATE},
    parse::Headers,
};

/// A hash of the packet's flow that is the same in both directions: the two endpoints (address,
/// port) are hashed apart and added, so swapping them changes nothing.
#[inline(always)]
pub fn flow_hash(headers: &Headers) -> u32 {
    let endpoint = |addr: &[u32; 4], port: u32| {
        let mut folded = port;
        for word in addr {
            folded = mix(folded ^ word);
        }
        mix(folded)
    };
    let ports = |port: u32| {
        if port == crate::parse::ABSENT {
            0
        } else {
            port
        }
    };
    endpoint(&headers.src, ports(headers.src_port))
        .wrapping_add(endpoint(&headers.dst, ports(headers.dst_port)))
        ^ headers.ip_proto
}

/// The 32-bit finaliser of `MurmurHash3`: every input bit affects every output bit.
#[inline(always)]
fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Whether sampling keeps this copy.
#[inline(always)]
pub fn sampled_in(session: &SessionMeta, flow_hash: u32) -> bool {
    let every = session.sample_every.max(1);
    match session.sample_mode {
        // SAFETY: a random number, no preconditions.
        SAMPLE_PACKETS => (unsafe { bpf_get_prandom_u32() }).is_multiple_of(every),
        SAMPLE_FLOWS => mix(flow_hash ^ session.sample_seed).is_multiple_of(every),
        _ => true,
    }
}

/// Whether the session's limit and the node's budget both admit a copy of `len` bytes; if so,
/// both are charged.
#[inline(always)]
pub fn admit(session_index: u32, session: &SessionMeta, len: u32) -> bool {
    let Some(node) = NODE_RATE_LIMIT.get(0) else {
        return false;
    };
    if is_unlimited(&session.rate) && is_unlimited(node) {
        return true;
    }
    let (Some(session_state), Some(node_state)) = (
        RATE_STATE.get_ptr_mut(session_index),
        RATE_STATE.get_ptr_mut(NODE_RATE_INDEX),
    ) else {
        return false;
    };
    // SAFETY: BPF time, no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: map values of this array, valid for reads and writes; concurrent CPUs may interleave
    // (see `RateState`).
    let (session_state, node_state) = unsafe { (&mut *session_state, &mut *node_state) };
    let (Some(session_next), Some(node_next)) = (
        charge(&session.rate, session_state, now, len),
        charge(node, node_state, now, len),
    ) else {
        return false;
    };
    *session_state = session_next;
    *node_state = node_next;
    true
}

#[inline(always)]
fn is_unlimited(limit: &RateLimit) -> bool {
    limit.packet_cost_ns == 0 && limit.byte_cost_ns_x1024 == 0
}

/// The bucket state after admitting a copy, or `None` when it would exceed the burst allowance.
#[inline(always)]
fn charge(limit: &RateLimit, state: &RateState, now: u64, len: u32) -> Option<RateState> {
    let advance = |tat: u64, cost: u64, burst: u64| {
        let next = tat.max(now) + cost;
        (next - now <= burst).then_some(next)
    };
    let mut next = *state;
    if limit.packet_cost_ns != 0 {
        next.packet_tat_ns = advance(
            state.packet_tat_ns,
            limit.packet_cost_ns,
            limit.packet_burst_ns,
        )?;
    }
    if limit.byte_cost_ns_x1024 != 0 {
        let cost = (u64::from(len) * limit.byte_cost_ns_x1024) >> 10;
        next.byte_tat_ns = advance(state.byte_tat_ns, cost, limit.byte_burst_ns)?;
    }
    Some(next)
}
