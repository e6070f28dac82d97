//! The tunnel program's work: a copy arriving at one of the agent's VXLAN devices (external mode)
//! gets its session's tunnel key, which the device needs to encapsulate it. The device then picks
//! the outer UDP source port from the copy's flow hash, so a flow's copies share one.
use aya_ebpf::{
    bindings::{
        BPF_F_DONT_FRAGMENT, BPF_F_TUNINFO_IPV6, BPF_F_ZERO_CSUM_TX, bpf_tunnel_key,
        bpf_tunnel_key__bindgen_ty_1, bpf_tunnel_key__bindgen_ty_2, bpf_tunnel_key__bindgen_ty_3,
    },
    helpers::generated::bpf_skb_set_tunnel_key,
    programs::TcContext,
};
use mirror_common::{COPY_MARK, COPY_MARK_MASK, TARGET_VXLAN_V6, TUNNEL_HOOK};

use crate::{count, maps::SESSIONS};

/// The packet is dropped at the device: not a copy of ours, or its key could not be set.
pub struct NotSent;

/// Outer IP TTL / hop limit of the copies.
const OUTER_TTL: u8 = 64;

#[inline(always)]
pub fn set_key(ctx: &TcContext) -> Result<(), NotSent> {
    count::hook_at(TUNNEL_HOOK, |c| &mut c.packets);
    // SAFETY: ctx.skb.skb is the context pointer the kernel passed to this program.
    let mark = unsafe { (*ctx.skb.skb).mark };
    let index = mark & !COPY_MARK_MASK;
    let Some(session) = SESSIONS
        .get(index)
        .filter(|_| mark & COPY_MARK_MASK == COPY_MARK)
    else {
        count::hook_at(TUNNEL_HOOK, |c| &mut c.foreign);
        return Err(NotSent);
    };
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
    let result = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &raw mut key,
            size_of::<bpf_tunnel_key>() as u32,
            flags,
        )
    };
    if result != 0 {
        count::hook_at(TUNNEL_HOOK, |c| &mut c.tunnel_errors);
        count::session(index, |c| &mut c.clone_errors);
        return Err(NotSent);
    }
    // The mark only told us the session: routing of the encapsulated copy must not see it.
    ctx.set_mark(0);
    Ok(())
}
