//! The copy program's work, at the egress of every target: a copy (recognised by its mark, which
//! names the rule that made it) is cut to its session's snaplen, a copy bound for one of the agent's
//! VXLAN devices (external mode) gets its session's tunnel key, and the mark is cleared. Packets
//! that are not copies pass unchanged. The VXLAN device picks the outer UDP source port from the
//! copy's flow hash, so a flow's copies share one.
use aya_ebpf::{
    bindings::{
        BPF_F_DONT_FRAGMENT, BPF_F_TUNINFO_IPV6, BPF_F_ZERO_CSUM_TX, bpf_tunnel_key,
        bpf_tunnel_key__bindgen_ty_1, bpf_tunnel_key__bindgen_ty_2, bpf_tunnel_key__bindgen_ty_3,
    },
    helpers::generated::{bpf_skb_change_tail, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use mirror_common::{
    COPY_GENERATION_BIT, COPY_HOOK, COPY_MARK, COPY_MARK_MASK, COPY_RULE_MASK, SessionMeta,
    TARGET_INTERFACE, TARGET_VXLAN_V6,
};

use crate::{
    count,
    maps::{RULES, SESSIONS, copy_generation},
};

/// What becomes of a packet at a target.
pub enum Outcome {
    /// Not a copy of ours: passed on unchanged.
    Foreign,
    /// A copy, finished.
    Finished,
    /// A copy that could not be cut or given its tunnel key: dropped and counted.
    Failed,
}

/// Outer IP TTL / hop limit of tunnel copies.
const OUTER_TTL: u8 = 64;
const VLAN_TAG_LEN: u32 = 4;

#[inline(always)]
pub fn finish(ctx: &TcContext) -> Outcome {
    count::hook_at(COPY_HOOK, |c| &mut c.packets);
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to this program.
    let skb = unsafe { &*ctx.skb.skb };
    let rule = skb.mark & COPY_RULE_MASK;
    // A copy of another generation's programs is theirs to finish (their copy program is
    // attached next to this one while a reload swaps them).
    let ours = skb.mark & (COPY_MARK_MASK | COPY_GENERATION_BIT) == COPY_MARK | copy_generation();
    let found = ours
        .then(|| RULES.get(rule))
        .flatten()
        .and_then(|meta| Some((meta.session, SESSIONS.get(meta.session)?)));
    let Some((session_index, session)) = found else {
        count::hook_at(COPY_HOOK, |c| &mut c.foreign);
        return Outcome::Foreign;
    };
    if cut(ctx, session).is_err() || tunnel_key(ctx, session).is_err() {
        count::hook_at(COPY_HOOK, |c| &mut c.copy_errors);
        count::clone_error(rule, session_index);
        return Outcome::Failed;
    }
    // The mark only named the rule: what follows (routing of a tunnel copy, the collector) must
    // not see it.
    ctx.set_mark(0);
    Outcome::Finished
}

/// Cuts the copy to the session's snaplen (a VLAN tag held in metadata counts: it is put back
/// into the frame on transmit).
#[inline(always)]
fn cut(ctx: &TcContext, session: &SessionMeta) -> Result<(), i64> {
    if session.snaplen == 0 {
        return Ok(());
    }
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to this program.
    let skb = unsafe { &*ctx.skb.skb };
    let tag = if skb.vlan_present != 0 {
        VLAN_TAG_LEN
    } else {
        0
    };
    let keep = session.snaplen.saturating_sub(tag);
    if skb.len <= keep {
        return Ok(());
    }
    // SAFETY: the helper trims the packet this program owns (a copy nobody else holds).
    match unsafe { bpf_skb_change_tail(ctx.skb.skb, keep, 0) } {
        0 => Ok(()),
        error => Err(error),
    }
}

#[inline(always)]
fn tunnel_key(ctx: &TcContext, session: &SessionMeta) -> Result<(), i64> {
    if session.target_kind == TARGET_INTERFACE {
        return Ok(());
    }
    let mut key = bpf_tunnel_key {
        tunnel_id: session.vni,
        __bindgen_anon_1: bpf_tunnel_key__bindgen_ty_1 {
            remote_ipv6: session.remote,
        },
        tunnel_tos: 0,
        tunnel_ttl: OUTER_TTL,
        __bindgen_anon_2: bpf_tunnel_key__bindgen_ty_2 { tunnel_ext: 0 },
        tunnel_label: 0,
        __bindgen_anon_3: bpf_tunnel_key__bindgen_ty_3 {
            local_ipv6: session.local,
        },
    };
    // Never fragmented: the mirror program already held back copies larger than the path allows.
    // The outer UDP checksum is zero over IPv4, as RFC 7348 recommends and Linux VXLAN devices do
    // by default; IPv6 requires one.
    let flags = u64::from(BPF_F_DONT_FRAGMENT)
        | if session.target_kind == TARGET_VXLAN_V6 {
            u64::from(BPF_F_TUNINFO_IPV6)
        } else {
            u64::from(BPF_F_ZERO_CSUM_TX)
        };
    // SAFETY: the helper reads `size_of::<bpf_tunnel_key>()` bytes of `key`, a stack value.
    match unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &raw mut key,
            size_of::<bpf_tunnel_key>() as u32,
            flags,
        )
    } {
        0 => Ok(()),
        error => Err(error),
    }
}
