//! Filter programs (see `mirror_common::cbpf`): a rule that carries one matches only when its
//! program, run over the frame, accepts the packet. One instruction per `bpf_loop` step, with the
//! registers in a per-CPU scratch map, so the verifier checks one step whatever the program.
use core::ffi::c_void;

use aya_ebpf::{helpers::generated::bpf_loop, macros::map, maps::PerCpuArray};
use mirror_common::cbpf::{CBPF_MEMWORDS, CbpfMachine, MAX_PROGRAM_STEPS, Step};

use crate::{
    maps::FILTER_PROGRAMS,
    packet::{Carried, MACS_LEN, Packet, VLAN_TAG_LEN},
};

/// A program's run: its registers, which program, and its verdict once it returned.
#[repr(C)]
pub struct Run {
    machine: CbpfMachine,
    program: u32,
    accepted: u32,
}

/// Per CPU, the filter program running now.
#[map]
static PROGRAM_SCRATCH: PerCpuArray<Run> = PerCpuArray::with_max_entries(1, 0);

/// Whether program `index` (of `FILTER_PROGRAMS`) accepts the packet.
#[inline(always)]
pub fn accepts<P: Packet>(ctx: &P, index: u32) -> bool {
    let Some(run) = PROGRAM_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch slot, as in `classify`; the stores are volatile so that LLVM
    // does not make them a call to a byte-wise memset.
    unsafe {
        let machine = &raw mut (*run).machine;
        core::ptr::write_volatile(&raw mut (*machine).a, 0);
        core::ptr::write_volatile(&raw mut (*machine).x, 0);
        core::ptr::write_volatile(&raw mut (*machine).pc, 0);
        for word in 0..CBPF_MEMWORDS {
            core::ptr::write_volatile(&raw mut (*machine).mem[word], 0);
        }
        core::ptr::write_volatile(&raw mut (*run).program, index);
        core::ptr::write_volatile(&raw mut (*run).accepted, 0);
    }
    let mut carried = Carried { ctx: ctx.raw() };
    // SAFETY: `step` has the callback signature bpf_loop expects; `carried` outlives the call. A
    // run that has not returned within the budget leaves `accepted` at 0, as the agent's does.
    unsafe {
        bpf_loop(
            MAX_PROGRAM_STEPS,
            step::<P> as *const () as *mut c_void,
            (&raw mut carried).cast(),
            0,
        );
        (*run).accepted != 0
    }
}

/// Runs one instruction. Returns 1 to stop.
extern "C" fn step<P: Packet>(_step: u64, carried: *mut c_void) -> i64 {
    let Some(run) = PROGRAM_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: as in `accepts`.
    let run = unsafe { &mut *run };
    // SAFETY: `carried` is the `Carried` that `accepts` passed to bpf_loop, holding this
    // program's context pointer.
    let ctx = unsafe { P::from_raw((*carried.cast::<Carried>()).ctx) };
    let Some(program) = FILTER_PROGRAMS.get(run.program) else {
        return 1;
    };
    let pc = run.machine.pc;
    let insn = match program.insns.get(pc as usize) {
        Some(insn) if pc < program.len => *insn,
        _ => return 1,
    };
    match run.machine.step(insn, ctx.frame_len(), |offset, size| {
        load(&ctx, offset, size)
    }) {
        Step::Next => 0,
        Step::Done(accepted) => {
            run.accepted = u32::from(accepted);
            1
        }
    }
}

/// `size` bytes of the frame at `offset`, big-endian, with a tag the kernel holds aside back at
/// offset 12 (the frame as a capture file holds it).
#[inline(always)]
fn load<P: Packet>(ctx: &P, offset: u32, size: u32) -> Option<u32> {
    let end = offset.checked_add(size)?;
    let Some(tag) = ctx.tag_in_metadata() else {
        return read(ctx, offset, size);
    };
    let tag_end = MACS_LEN + VLAN_TAG_LEN;
    if end <= MACS_LEN {
        return read(ctx, offset, size);
    }
    if offset >= tag_end {
        return read(ctx, offset - VLAN_TAG_LEN, size);
    }
    // Across the tag: byte by byte.
    let tag_word = u32::from_be_bytes(tag);
    let mut value = 0;
    for i in 0..4 {
        if i >= size {
            break;
        }
        let at = offset + i;
        let byte = if at < MACS_LEN {
            read(ctx, at, 1)?
        } else if at < tag_end {
            // A shift, not an index: LLVM drops a mask on a stack index that its range checks
            // make redundant, and the verifier then refuses the variable offset.
            tag_word.wrapping_shr(24 - 8 * (at - MACS_LEN)) & 0xff
        } else {
            read(ctx, at - VLAN_TAG_LEN, 1)?
        };
        value = value << 8 | byte;
    }
    Some(value)
}

/// `size` (1, 2 or 4) bytes of the packet at `offset`, big-endian.
#[inline(always)]
fn read<P: Packet>(ctx: &P, offset: u32, size: u32) -> Option<u32> {
    let mut bytes = [0u8; 4];
    let len = match size {
        1 => 1,
        2 => 2,
        _ => 4,
    };
    ctx.load_bytes(offset, bytes.as_mut_ptr(), len).ok()?;
    Some(match len {
        1 => u32::from(bytes[0]),
        2 => u32::from(u16::from_be_bytes([bytes[0], bytes[1]])),
        _ => u32::from_be_bytes(bytes),
    })
}
