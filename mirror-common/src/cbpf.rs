//! Filter programs: the expressions the rule tables cannot hold (byte accessors, arithmetic,
//! `less`/`greater`, `ether host`, …), as the classic BPF that libpcap's compiler makes of them,
//! and one interpreter of that code that both sides run: the kernel programs one instruction per
//! `bpf_loop` step, the agent over a whole frame (live captures, `run -r`).
//!
//! The frame a program reads is the frame as a capture file holds it: a VLAN tag the kernel holds
//! aside is back at offset 12, as in the copies the agent writes. Semantics follow libpcap's own
//! interpreter (`bpf_filter`): a load past the frame's end, a division by zero or a shift of 32 or
//! more bits rejects the packet or gives zero the way it does.
#![expect(
    clippy::inline_always,
    reason = "the kernel programs run the interpreter inside a bpf_loop step: one function"
)]

/// One classic BPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CbpfInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// Longest filter program (libpcap's programs for long expressions stay well below).
pub const MAX_PROGRAM_INSNS: usize = 1024;
/// Largest number of distinct filter programs across all sessions.
pub const MAX_PROGRAMS: u32 = 32;
/// Most steps one run takes; a run that has not returned by then rejects the packet. Jumps go
/// backwards only in libpcap's `protochain` loop (12 steps a header), so this walks chains of
/// over 1,300 headers, more than a 9,216-byte frame holds, and bounds the cost of a chain that
/// loops on itself (an AH header pointing at its own offset, on which tcpdump itself spins).
pub const MAX_PROGRAM_STEPS: u32 = 1 << 14;
/// Words of a program's scratch memory (`M[]`).
pub const CBPF_MEMWORDS: usize = 16;

/// `FILTER_PROGRAMS`: `Array<FilterProgram>` of [`MAX_PROGRAMS`], by program index
/// ([`crate::RuleMeta::program`] minus one).
pub const FILTER_PROGRAMS_MAP: &str = "FILTER_PROGRAMS";

/// Value of `FILTER_PROGRAMS`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FilterProgram {
    /// Instructions in use.
    pub len: u32,
    /// Reserved, zero.
    pub reserved: u32,
    pub insns: [CbpfInsn; MAX_PROGRAM_INSNS],
}

impl Default for FilterProgram {
    fn default() -> Self {
        FilterProgram {
            len: 0,
            reserved: 0,
            insns: [CbpfInsn::default(); MAX_PROGRAM_INSNS],
        }
    }
}

// The instruction classes and fields of classic BPF (linux/filter.h, pcap/bpf.h).
pub const BPF_LD: u16 = 0x00;
pub const BPF_LDX: u16 = 0x01;
pub const BPF_ST: u16 = 0x02;
pub const BPF_STX: u16 = 0x03;
pub const BPF_ALU: u16 = 0x04;
pub const BPF_JMP: u16 = 0x05;
pub const BPF_RET: u16 = 0x06;
pub const BPF_MISC: u16 = 0x07;
pub const BPF_W: u16 = 0x00;
pub const BPF_H: u16 = 0x08;
pub const BPF_B: u16 = 0x10;
pub const BPF_IMM: u16 = 0x00;
pub const BPF_ABS: u16 = 0x20;
pub const BPF_IND: u16 = 0x40;
pub const BPF_MEM: u16 = 0x60;
pub const BPF_LEN: u16 = 0x80;
pub const BPF_MSH: u16 = 0xa0;
pub const BPF_K: u16 = 0x00;
pub const BPF_X: u16 = 0x08;
pub const BPF_A: u16 = 0x10;
pub const BPF_ADD: u16 = 0x00;
pub const BPF_SUB: u16 = 0x10;
pub const BPF_MUL: u16 = 0x20;
pub const BPF_DIV: u16 = 0x30;
pub const BPF_OR: u16 = 0x40;
pub const BPF_AND: u16 = 0x50;
pub const BPF_LSH: u16 = 0x60;
pub const BPF_RSH: u16 = 0x70;
pub const BPF_NEG: u16 = 0x80;
pub const BPF_MOD: u16 = 0x90;
pub const BPF_XOR: u16 = 0xa0;
pub const BPF_JA: u16 = 0x00;
pub const BPF_JEQ: u16 = 0x10;
pub const BPF_JGT: u16 = 0x20;
pub const BPF_JGE: u16 = 0x30;
pub const BPF_JSET: u16 = 0x40;
pub const BPF_TAX: u16 = 0x00;
pub const BPF_TXA: u16 = 0x80;

/// The registers of a running program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CbpfMachine {
    pub a: u32,
    pub x: u32,
    /// The next instruction.
    pub pc: u32,
    /// Reserved, zero.
    pub reserved: u32,
    pub mem: [u32; CBPF_MEMWORDS],
}

/// What one instruction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Go on at [`CbpfMachine::pc`].
    Next,
    /// The program ended: whether it accepts the packet.
    Done(bool),
}

impl CbpfMachine {
    /// Runs `insn`. `load(offset, size)` reads `size` (1, 2 or 4) bytes of the frame at `offset`,
    /// big-endian, none past its end; `frame_len` is the frame's length.
    #[inline(always)]
    pub fn step(
        &mut self,
        insn: CbpfInsn,
        frame_len: u32,
        load: impl FnOnce(u32, u32) -> Option<u32>,
    ) -> Step {
        let k = insn.k;
        self.pc += 1;
        match insn.code & 0x07 {
            BPF_LD | BPF_LDX => self.load(insn, frame_len, load),
            BPF_ST => self.store(k, self.a),
            BPF_STX => self.store(k, self.x),
            BPF_ALU => self.alu(insn),
            BPF_JMP => {
                let operand = if insn.code & BPF_X == 0 { k } else { self.x };
                let taken = match insn.code & 0xf0 {
                    BPF_JA => {
                        // Signed, as libpcap's interpreter takes it: `protochain` jumps back.
                        self.pc = self.pc.wrapping_add_signed(k.cast_signed());
                        return Step::Next;
                    }
                    BPF_JEQ => self.a == operand,
                    BPF_JGT => self.a > operand,
                    BPF_JGE => self.a >= operand,
                    BPF_JSET => self.a & operand != 0,
                    _ => return Step::Done(false),
                };
                self.pc += u32::from(if taken { insn.jt } else { insn.jf });
                Step::Next
            }
            BPF_RET => Step::Done(match insn.code & 0x18 {
                BPF_K => k != 0,
                BPF_A => self.a != 0,
                _ => false,
            }),
            _ => {
                match insn.code & 0xf8 {
                    BPF_TAX => self.x = self.a,
                    BPF_TXA => self.a = self.x,
                    _ => return Step::Done(false),
                }
                Step::Next
            }
        }
    }

    #[inline(always)]
    fn load(
        &mut self,
        insn: CbpfInsn,
        frame_len: u32,
        load: impl FnOnce(u32, u32) -> Option<u32>,
    ) -> Step {
        let size = match insn.code & 0x18 {
            BPF_W => 4,
            BPF_H => 2,
            _ => 1,
        };
        let to_x = insn.code & 0x07 == BPF_LDX;
        let value = match insn.code & 0xe0 {
            BPF_IMM => Some(insn.k),
            BPF_LEN => Some(frame_len),
            // Masked as well as checked: the verifier follows a mask (checked programs name
            // words below 16 only).
            BPF_MEM => self.mem.get(insn.k as usize & (CBPF_MEMWORDS - 1)).copied(),
            BPF_ABS if !to_x => load(insn.k, size),
            BPF_IND if !to_x => self.x.checked_add(insn.k).and_then(|at| load(at, size)),
            BPF_MSH if to_x => load(insn.k, 1).map(|byte| (byte & 0x0f) << 2),
            _ => None,
        };
        let Some(value) = value else {
            return Step::Done(false);
        };
        if to_x {
            self.x = value;
        } else {
            self.a = value;
        }
        Step::Next
    }

    #[inline(always)]
    fn store(&mut self, k: u32, value: u32) -> Step {
        match self.mem.get_mut(k as usize & (CBPF_MEMWORDS - 1)) {
            Some(word) => {
                *word = value;
                Step::Next
            }
            None => Step::Done(false),
        }
    }

    #[inline(always)]
    fn alu(&mut self, insn: CbpfInsn) -> Step {
        let operand = if insn.code & BPF_X == 0 {
            insn.k
        } else {
            self.x
        };
        let a = self.a;
        self.a = match insn.code & 0xf0 {
            BPF_ADD => a.wrapping_add(operand),
            BPF_SUB => a.wrapping_sub(operand),
            BPF_MUL => a.wrapping_mul(operand),
            BPF_DIV | BPF_MOD if operand == 0 => return Step::Done(false),
            BPF_DIV => a / operand,
            BPF_MOD => a % operand,
            BPF_OR => a | operand,
            BPF_AND => a & operand,
            BPF_XOR => a ^ operand,
            BPF_LSH if operand < 32 => a << operand,
            BPF_RSH if operand < 32 => a >> operand,
            BPF_LSH | BPF_RSH => 0,
            BPF_NEG => a.wrapping_neg(),
            _ => return Step::Done(false),
        };
        Step::Next
    }
}

/// Why a program is not one the interpreter runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramError {
    Empty,
    TooLong,
    /// An instruction at this index the interpreter does not know.
    Unknown(usize),
    /// A jump at this index that leaves the program (or, for a conditional one, goes back).
    Jump(usize),
    /// A memory word out of range at this index.
    Memory(usize),
    /// A division by a constant zero at this index.
    DivisionByZero(usize),
    /// The last instruction is not a return.
    NoReturn,
}

/// Checks a program as the kernel checks classic BPF: known instructions only, jumps that stay
/// inside, memory words in range, a return at the end. Unlike the kernel, an unconditional jump
/// may go back, as libpcap's own interpreter allows for `protochain`; [`MAX_PROGRAM_STEPS`]
/// bounds every run.
pub fn check_program(insns: &[CbpfInsn]) -> Result<(), ProgramError> {
    if insns.is_empty() {
        return Err(ProgramError::Empty);
    }
    if insns.len() > MAX_PROGRAM_INSNS {
        return Err(ProgramError::TooLong);
    }
    let len = insns.len();
    for (at, insn) in insns.iter().enumerate() {
        let lands = |offset: u32| at + 1 + (offset as usize) < len;
        let code = insn.code;
        let valid = match code & 0x07 {
            // Sizes are a word, a half-word or a byte (0x18 is eBPF's double word).
            BPF_LD => {
                matches!(code & 0xe0, BPF_IMM | BPF_LEN | BPF_MEM | BPF_ABS | BPF_IND)
                    && code & 0x18 != 0x18
            }
            BPF_LDX => matches!(code & 0xe0, BPF_IMM | BPF_LEN | BPF_MEM | BPF_MSH),
            BPF_ST | BPF_STX => true,
            BPF_ALU => {
                let op = code & 0xf0;
                if matches!(op, BPF_DIV | BPF_MOD) && code & BPF_X == 0 && insn.k == 0 {
                    return Err(ProgramError::DivisionByZero(at));
                }
                op <= BPF_XOR
            }
            BPF_JMP => {
                let op = code & 0xf0;
                if op == BPF_JA {
                    let target = (at + 1).checked_add_signed(insn.k.cast_signed() as isize);
                    if target.is_none_or(|target| target >= len) {
                        return Err(ProgramError::Jump(at));
                    }
                } else if !lands(u32::from(insn.jt)) || !lands(u32::from(insn.jf)) {
                    return Err(ProgramError::Jump(at));
                }
                op <= BPF_JSET
            }
            BPF_RET => code & 0x18 != BPF_X,
            _ => matches!(code & 0xf8, BPF_TAX | BPF_TXA),
        };
        if !valid {
            return Err(ProgramError::Unknown(at));
        }
        let uses_memory = matches!(code & 0x07, BPF_ST | BPF_STX)
            || (matches!(code & 0x07, BPF_LD | BPF_LDX) && code & 0xe0 == BPF_MEM);
        if uses_memory && insn.k as usize >= CBPF_MEMWORDS {
            return Err(ProgramError::Memory(at));
        }
    }
    if insns[len - 1].code & 0x07 != BPF_RET {
        return Err(ProgramError::NoReturn);
    }
    Ok(())
}

/// Runs a checked program over a whole frame (userspace), as the kernel does.
pub fn run_program(insns: &[CbpfInsn], frame: &[u8]) -> bool {
    let mut machine = CbpfMachine::default();
    let frame_len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
    for _ in 0..MAX_PROGRAM_STEPS {
        let Some(&insn) = insns.get(machine.pc as usize) else {
            return false;
        };
        let load = |offset: u32, size: u32| {
            let start = offset as usize;
            let bytes = frame.get(start..start.checked_add(size as usize)?)?;
            Some(
                bytes
                    .iter()
                    .fold(0u32, |value, &b| value << 8 | u32::from(b)),
            )
        };
        if let Step::Done(accepts) = machine.step(insn, frame_len, load) {
            return accepts;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn insn(code: u16, jt: u8, jf: u8, k: u32) -> CbpfInsn {
        CbpfInsn { code, jt, jf, k }
    }

    /// `tcpdump -d 'ip[6:2] & 0x1fff = 0'` on Ethernet.
    const FIRST_FRAGMENT: [CbpfInsn; 6] = [
        insn(BPF_LD | BPF_H | BPF_ABS, 0, 0, 12),
        insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 3, 0x0800),
        insn(BPF_LD | BPF_H | BPF_ABS, 0, 0, 20),
        insn(BPF_JMP | BPF_JSET | BPF_K, 1, 0, 0x1fff),
        insn(BPF_RET | BPF_K, 0, 0, 262_144),
        insn(BPF_RET | BPF_K, 0, 0, 0),
    ];

    fn ipv4_frame(fragment: u16) -> [u8; 34] {
        let mut frame = [0u8; 34];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        frame[20..22].copy_from_slice(&fragment.to_be_bytes());
        frame
    }

    #[test]
    fn runs_a_program_as_libpcap_does() {
        assert_eq!(check_program(&FIRST_FRAGMENT), Ok(()));
        assert!(run_program(&FIRST_FRAGMENT, &ipv4_frame(0x4000)));
        assert!(!run_program(&FIRST_FRAGMENT, &ipv4_frame(185)));
        // Cut short before the fragment field: the load rejects the packet.
        assert!(!run_program(&FIRST_FRAGMENT, &ipv4_frame(0)[..21]));
        assert!(!run_program(&FIRST_FRAGMENT, &[]));
    }

    #[test]
    fn arithmetic_follows_libpcap() {
        let program = |op: u16, k: u32| {
            [
                insn(BPF_LD | BPF_IMM, 0, 0, 7),
                insn(BPF_LDX | BPF_IMM, 0, 0, k),
                insn(BPF_ALU | op | BPF_X, 0, 0, 0),
                insn(BPF_RET | BPF_A, 0, 0, 0),
            ]
        };
        let accepts = |op, k| run_program(&program(op, k), &[]);
        // A division by a zero register rejects; a shift past the word leaves zero.
        assert!(!accepts(BPF_DIV, 0));
        assert!(!accepts(BPF_MOD, 0));
        assert!(accepts(BPF_DIV, 7));
        assert!(!accepts(BPF_DIV, 8));
        assert!(!accepts(BPF_LSH, 32));
        assert!(accepts(BPF_LSH, 31) == (7u32 << 31 != 0));
        assert!(!accepts(BPF_RSH, 3));
        assert!(accepts(BPF_SUB, 8));
    }

    #[test]
    fn the_header_length_load_and_memory_work() {
        // X = 4 * (frame[14] & 0xf); M[3] = X; A = M[3]; accept when A == 20.
        let program = [
            insn(BPF_LDX | BPF_B | BPF_MSH, 0, 0, 14),
            insn(BPF_STX, 0, 0, 3),
            insn(BPF_LD | BPF_MEM, 0, 0, 3),
            insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 20),
            insn(BPF_RET | BPF_K, 0, 0, 1),
            insn(BPF_RET | BPF_K, 0, 0, 0),
        ];
        let mut frame = [0u8; 15];
        frame[14] = 0x45;
        assert!(run_program(&program, &frame));
        frame[14] = 0x46;
        assert!(!run_program(&program, &frame));
    }

    #[test]
    fn programs_the_interpreter_cannot_run_are_refused() {
        let ret = insn(BPF_RET | BPF_K, 0, 0, 0);
        let cases: &[(&[CbpfInsn], ProgramError)] = &[
            (&[], ProgramError::Empty),
            (&[insn(BPF_LD | BPF_IMM, 0, 0, 0)], ProgramError::NoReturn),
            (
                &[insn(BPF_JMP | BPF_JA, 0, 0, 1), ret],
                ProgramError::Jump(0),
            ),
            (
                &[insn(BPF_JMP | BPF_JA, 0, 0, (-2i32).cast_unsigned()), ret],
                ProgramError::Jump(0),
            ),
            (
                &[insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, 0), ret],
                ProgramError::Jump(0),
            ),
            (&[insn(BPF_ST, 0, 0, 16), ret], ProgramError::Memory(0)),
            (
                &[insn(BPF_ALU | BPF_DIV | BPF_K, 0, 0, 0), ret],
                ProgramError::DivisionByZero(0),
            ),
            (&[insn(0xff, 0, 0, 0), ret], ProgramError::Unknown(0)),
            (
                &[insn(BPF_LDX | BPF_ABS, 0, 0, 0), ret],
                ProgramError::Unknown(0),
            ),
        ];
        for (program, error) in cases {
            assert_eq!(check_program(program), Err(*error), "{program:?}");
        }
        let too_long = [ret; MAX_PROGRAM_INSNS + 1];
        assert_eq!(check_program(&too_long), Err(ProgramError::TooLong));
    }

    #[test]
    fn backward_jumps_walk_protochain_and_a_loop_ends_within_the_budget() {
        extern crate std;
        use std::{vec, vec::Vec};
        // `tcpdump -dd 'ip6 protochain 17'`.
        let program: Vec<CbpfInsn> = [
            (0x28, 0, 0, 12),
            (0x15, 0, 33, 0x86dd),
            (0x30, 0, 0, 20),
            (0x01, 0, 0, 40),
            (0x15, 27, 0, 0x11),
            (0x15, 26, 0, 0x3b),
            (0x15, 3, 0, 0),
            (0x15, 2, 0, 0x3c),
            (0x15, 1, 0, 0x2b),
            (0x15, 0, 9, 0x2c),
            (0x50, 0, 0, 14),
            (0x02, 0, 0, 0),
            (0x50, 0, 0, 15),
            (0x04, 0, 0, 1),
            (0x24, 0, 0, 8),
            (0x0c, 0, 0, 0),
            (0x07, 0, 0, 0),
            (0x60, 0, 0, 0),
            (0x05, 0, 0, (-15i32).cast_unsigned()),
            (0x15, 0, 12, 0x33),
            (0x87, 0, 0, 0),
            (0x50, 0, 0, 14),
            (0x02, 0, 0, 0),
            (0x87, 0, 0, 0),
            (0x04, 0, 0, 1),
            (0x07, 0, 0, 0),
            (0x50, 0, 0, 14),
            (0x04, 0, 0, 2),
            (0x24, 0, 0, 4),
            (0x07, 0, 0, 0),
            (0x60, 0, 0, 0),
            (0x05, 0, 0, (-28i32).cast_unsigned()),
            (0x04, 0, 0, 0),
            (0x15, 0, 1, 0x11),
            (0x06, 0, 0, 0x40000),
            (0x06, 0, 0, 0),
        ]
        .iter()
        .map(|&(code, jt, jf, k)| insn(code, jt, jf, k))
        .collect();
        assert_eq!(check_program(&program), Ok(()));
        // IPv6 (next header 0), then `headers` hop-by-hop options of 8 bytes, the last one's
        // next header UDP.
        let frame = |headers: usize| {
            let mut frame = vec![0u8; 14 + 40 + 8 * headers + 8];
            frame[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
            for header in 0..headers {
                frame[54 + 8 * header] = if header + 1 == headers { 17 } else { 0 };
            }
            frame
        };
        assert!(run_program(&program, &frame(1)));
        assert!(run_program(&program, &frame(3)));
        let mut tcp = frame(3);
        tcp[54 + 16] = 6;
        assert!(!run_program(&program, &tcp));
        // Past the budget: rejected rather than walked on.
        assert!(!run_program(&program, &frame(1400)));
        let spins = [
            insn(BPF_JMP | BPF_JA, 0, 0, (-1i32).cast_unsigned()),
            insn(BPF_RET | BPF_K, 0, 0, 1),
        ];
        assert_eq!(check_program(&spins), Ok(()));
        assert!(!run_program(&spins, &[]));
    }
}
