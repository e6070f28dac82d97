//! mirror's TC and XDP programs: for every packet at a watched hook, find each session's first
//! matching rule and clone the packet to the targets of the sessions that mirror it (or, for XDP
//! and pcap targets, queue a copy in the ring buffer for the agent). The original packet
//! always continues unchanged to the next program or the stack (`TC_ACT_UNSPEC`, i.e. `TCX_NEXT`),
//! whatever happens here: parse errors, map misses and clone failures are only counted.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The atomic fetch-and-add of ERSPAN sequence numbers (see `copy::next_sequence`).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]
#![cfg_attr(
    target_arch = "bpf",
    expect(
        clippy::inline_always,
        reason = "BPF helpers are inlined into the programs on purpose: fewer BPF-to-BPF calls, \
                  and the verifier sees each bound where it is used"
    )
)]

#[cfg(target_arch = "bpf")]
mod act;
#[cfg(target_arch = "bpf")]
mod classify;
#[cfg(target_arch = "bpf")]
mod copy;
#[cfg(target_arch = "bpf")]
mod count;
#[cfg(target_arch = "bpf")]
mod limit;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod program;
#[cfg(target_arch = "bpf")]
mod ring;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, xdp_action::XDP_PASS},
        macros::{classifier, xdp},
        programs::{TcContext, XdpContext},
    };
    use aya_log_ebpf::warn;
    use mirror_common::{AttachmentKey, Direction};

    use crate::{act, classify, copy, count, limit, maps, parse};

    #[classifier]
    #[expect(clippy::needless_pass_by_value, reason = "the #[classifier] signature")]
    pub fn mirror_tc_ingress(ctx: TcContext) -> i32 {
        mirror(&ctx, Direction::Ingress);
        TC_ACT_UNSPEC
    }

    #[classifier]
    #[expect(clippy::needless_pass_by_value, reason = "the #[classifier] signature")]
    pub fn mirror_tc_egress(ctx: TcContext) -> i32 {
        // A tunnel copy on its way out of a watched underlay, before the copy program has put
        // its outer headers on: never a packet of its own.
        if !copy::is_copy(&ctx) {
            mirror(&ctx, Direction::Egress);
        }
        TC_ACT_UNSPEC
    }

    /// Received packets, before the kernel's stack: copies go through the ring buffer, the packet
    /// always passes.
    #[xdp]
    #[expect(clippy::needless_pass_by_value, reason = "the #[xdp] signature")]
    pub fn mirror_xdp(ctx: XdpContext) -> u32 {
        mirror(&ctx, Direction::XdpIngress);
        XDP_PASS
    }

    /// At the egress of every target: finishes copies, passes everything else on.
    #[classifier]
    #[expect(clippy::needless_pass_by_value, reason = "the #[classifier] signature")]
    pub fn mirror_tc_copy(ctx: TcContext) -> i32 {
        match copy::finish(&ctx) {
            copy::Outcome::Foreign | copy::Outcome::Finished => TC_ACT_UNSPEC,
            copy::Outcome::Failed => TC_ACT_SHOT,
        }
    }

    #[inline(always)]
    fn mirror<P: act::Sender>(ctx: &P, direction: Direction) {
        if try_mirror(ctx, direction).is_err() {
            count::hook(direction, |c| &mut c.table_errors);
            warn!(
                ctx,
                "ifindex {} hook {}: a rule table lacks an entry the classifier needed",
                ctx.ifindex(),
                direction as u32
            );
        }
    }

    #[inline(always)]
    fn try_mirror<P: act::Sender>(
        ctx: &P,
        direction: Direction,
    ) -> Result<(), classify::TableError> {
        // A hook no session watches (any more) parses nothing.
        let Some((rules, group)) = classify::watched(&AttachmentKey {
            ifindex: ctx.ifindex(),
            direction: direction as u32,
        }) else {
            return Ok(());
        };
        let headers = parse::parse(ctx);
        count::watched(group, headers.frame_len);
        if headers.malformed {
            count::hook(direction, |c| &mut c.malformed);
        }
        let Some(verdict) = classify::classify(ctx, rules, &headers)? else {
            return Ok(());
        };
        if verdict.step_limit_hit {
            count::hook(direction, |c| &mut c.step_limit);
            warn!(
                ctx,
                "ifindex {} hook {}: the rule walk hit its step limit; later sessions not tried",
                ctx.ifindex(),
                direction as u32
            );
        }
        if verdict.copy_count == 0 {
            return Ok(());
        }
        let copy_len = parse::copy_len(ctx, headers.ip_proto, verdict.l4_offset);
        let flow_hash = if maps::flow_hash_used() {
            limit::flow_hash(&headers)
        } else {
            0
        };
        act::send(ctx, direction as u32, &verdict, copy_len, flow_hash)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // SAFETY: the programs contain no panicking paths; bounds are checked with `get`.
        unsafe { core::hint::unreachable_unchecked() }
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Built for the host only so that the workspace resolves; the real object targets BPF.
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
#[cfg(target_arch = "bpf")]
static LICENSE: [u8; 4] = *b"GPL\0";
