//! The floating-point part of the generator: random x87/MMX/SSE state images, and instructions
//! drawn from every legacy-encoded x87, MMX, SSE and SSE2 form iced-x86 knows (its `Code` table
//! filtered by CPUID feature), with random register operands and memory operands inside the
//! data buffer.

use std::sync::OnceLock;

use iced_x86::{
    Code, CpuidFeature, EncodingKind, Instruction, MemoryOperand, Mnemonic, OpCodeOperandKind,
    Register,
};
use vmdriver::fpu::{FxImage, fx};

use super::{Builder, DATA_ADDR, DATA_LEN, GenError, MARGIN, Rng};
use crate::oracle::analysis::EDI;

/// Every x87, MMX, SSE and SSE2 instruction form that 32-bit code can encode.
fn forms() -> &'static [Code] {
    static FORMS: OnceLock<Vec<Code>> = OnceLock::new();
    FORMS.get_or_init(|| {
        use CpuidFeature as F;
        Code::values()
            .filter(|c| {
                let op = c.op_code();
                let features = c.cpuid_features();
                op.mode32()
                    && op.encoding() == EncodingKind::Legacy
                    && !features.is_empty()
                    && features.iter().all(|f| {
                        matches!(
                            f,
                            F::FPU | F::FPU387 | F::CMOV | F::MMX | F::SSE | F::SSE2 | F::FXSR
                        )
                    })
                    && features.iter().any(|f| !matches!(f, F::CMOV))
                    && !matches!(
                        c.mnemonic(),
                        // Hints: nothing to compare.
                        Mnemonic::Prefetchnta
                            | Mnemonic::Prefetcht0
                            | Mnemonic::Prefetcht1
                            | Mnemonic::Prefetcht2
                    )
            })
            .collect()
    })
}

/// An 80-bit extended value with a bias towards the special classes.
fn ext80(rng: &mut Rng) -> [u8; 10] {
    let sign = if rng.chance(50) { 0x8000u16 } else { 0 };
    let (exp, mant): (u16, u64) = match rng.below(12) {
        0 => (0, 0),                                             // zero
        1 => (0, rng.next_u64() >> 1),                           // denormal
        2 => (0x7FFF, 1 << 63),                                  // infinity
        3 => (0x7FFF, (3 << 62) | (rng.next_u64() >> 3)),        // QNaN
        4 => (0x7FFF, (1 << 63) | (rng.next_u64() >> 3) | 1),    // SNaN
        5 => (rng.range(1, 0x7FFE) as u16, rng.next_u64() >> 1), // unnormal
        6 => (0x3FFF, 1 << 63),                                  // 1.0
        7 => (
            rng.range(0x3FF0, 0x4020) as u16,
            (1 << 63) | (rng.next_u64() >> 40 << 40),
        ),
        _ => (
            rng.range(0x3F00, 0x40FF) as u16,
            (1 << 63) | (rng.next_u64() >> 1),
        ),
    };
    let mut b = [0u8; 10];
    b[..8].copy_from_slice(&mant.to_le_bytes());
    b[8..].copy_from_slice(&(exp | sign).to_le_bytes());
    b
}

/// A 32-bit float pattern with a bias towards the special classes.
fn f32_bits(rng: &mut Rng) -> u32 {
    let sign = if rng.chance(50) { 0x8000_0000 } else { 0 };
    sign | match rng.below(10) {
        0 => 0,
        1 => rng.next_u64() as u32 & 0x7F_FFFF,
        2 => 0x7F80_0000,
        3 => 0x7FC0_0000 | (rng.next_u64() as u32 & 0x3F_FFFF),
        4 => 0x7F80_0001 | (rng.next_u64() as u32 & 0x3F_FFFF),
        5 => 0x3F80_0000,
        6 => (rng.range(100, 150) as u32) << 23 | (rng.next_u64() as u32 & 0x7F_0000),
        _ => rng.next_u64() as u32 & 0x7FFF_FFFF,
    }
}

/// A 64-bit float pattern with a bias towards the special classes.
fn f64_bits(rng: &mut Rng) -> u64 {
    let sign = if rng.chance(50) { 1 << 63 } else { 0 };
    sign | match rng.below(10) {
        0 => 0,
        1 => rng.next_u64() & 0xF_FFFF_FFFF_FFFF,
        2 => 0x7FF0_0000_0000_0000,
        3 => 0x7FF8_0000_0000_0000 | (rng.next_u64() & 0x7_FFFF_FFFF_FFFF),
        4 => 0x7FF0_0000_0000_0001 | (rng.next_u64() & 0x7_FFFF_FFFF_FFFF),
        5 => 0x3FF0_0000_0000_0000,
        6 => (rng.range(1000, 1060) as u64) << 52 | (rng.next_u64() & 0xF_0000_0000_0000),
        _ => rng.next_u64() & 0x7FFF_FFFF_FFFF_FFFF,
    }
}

/// 16 bytes for an XMM register or a memory operand: float lanes, double lanes or integers.
pub(super) fn vector(rng: &mut Rng) -> [u8; 16] {
    let mut b = [0u8; 16];
    match rng.below(3) {
        0 => {
            for i in 0..4 {
                b[4 * i..4 * i + 4].copy_from_slice(&f32_bits(rng).to_le_bytes());
            }
        }
        1 => {
            for i in 0..2 {
                b[8 * i..8 * i + 8].copy_from_slice(&f64_bits(rng).to_le_bytes());
            }
        }
        _ => {
            b[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
            b[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
        }
    }
    b
}

/// A random, valid x87/MMX/SSE state: sane control words with masked and (sometimes) unmasked
/// exceptions, random stack contents with NaNs, denormals and infinities, consistent ES/B.
pub(super) fn image(rng: &mut Rng) -> FxImage {
    let mut img = FxImage::default();
    let masks = if rng.chance(70) {
        0x3F
    } else {
        rng.below(64) as u16
    };
    let pc = rng.pick(&[0u16, 2, 3, 3, 3]);
    let fcw = 0x40 | masks | (pc << 8) | ((rng.below(4) as u16) << 10);
    let mut flags = rng.below(64) as u16 & masks;
    if rng.chance(4) {
        flags |= rng.below(64) as u16; // an unmasked exception pending
    }
    let mut fsw = flags | ((rng.below(8) as u16) << 11) | (rng.next_u64() as u16 & 0x4700);
    if flags & !fcw & 0x3F != 0 {
        fsw |= 0x8080;
    }
    img.0[fx::FCW..fx::FCW + 2].copy_from_slice(&fcw.to_le_bytes());
    img.0[fx::FSW..fx::FSW + 2].copy_from_slice(&fsw.to_le_bytes());
    img.0[fx::FTW] = rng.next_u64() as u8;
    let fop = rng.below(0x800) as u16;
    img.0[fx::FOP..fx::FOP + 2].copy_from_slice(&fop.to_le_bytes());
    img.0[fx::FIP..fx::FIP + 4].copy_from_slice(&(rng.next_u64() as u32).to_le_bytes());
    img.0[fx::FDP..fx::FDP + 4].copy_from_slice(&(rng.next_u64() as u32).to_le_bytes());
    if fsw & 0x80 == 0 {
        // An AMD host restores the pointers only with an exception pending (the oracle's
        // comparison notes why): without one, start both sides from zero.
        img.0[fx::FOP..fx::MXCSR].fill(0);
    }
    let mx_masks = if rng.chance(70) {
        0x3F
    } else {
        rng.below(64) as u32
    };
    let mxcsr = (mx_masks << 7)
        | (rng.below(64) as u32 & 0x3F)
        | ((rng.below(4) as u32) << 13)
        | if rng.chance(20) { 1 << 15 } else { 0 };
    img.0[fx::MXCSR..fx::MXCSR + 4].copy_from_slice(&mxcsr.to_le_bytes());
    img.0[fx::MXCSR_MASK..fx::MXCSR_MASK + 4].copy_from_slice(&0xFFBFu32.to_le_bytes());
    for i in 0..8 {
        let slot = fx::ST0 + 16 * i;
        if rng.chance(30) {
            img.0[slot..slot + 8].copy_from_slice(&rng.next_u64().to_le_bytes());
            img.0[slot + 8..slot + 10].copy_from_slice(&0xFFFFu16.to_le_bytes());
        } else {
            img.0[slot..slot + 10].copy_from_slice(&ext80(rng));
        }
        let x = fx::XMM0 + 16 * i;
        img.0[x..x + 16].copy_from_slice(&vector(rng));
    }
    img
}

/// A generated operand.
#[derive(Clone, Copy)]
enum Operand {
    R(Register),
    M(MemoryOperand),
    I(u32),
}

impl Builder<'_> {
    /// One floating-point instruction (with the fix-ups it needs).
    pub(super) fn fp(&mut self) -> Result<(), GenError> {
        let code = self.rng.pick(forms());
        match code.mnemonic() {
            Mnemonic::Maskmovq | Mnemonic::Maskmovdqu => {
                self.ensure_pointer(EDI, 64)?;
                let (a, b) = if code.mnemonic() == Mnemonic::Maskmovq {
                    (self.mm(), self.mm())
                } else {
                    (self.xmm(), self.xmm())
                };
                let ins = if code.mnemonic() == Mnemonic::Maskmovq {
                    Instruction::with_maskmovq(32, a, b, Register::None)?
                } else {
                    Instruction::with_maskmovdqu(32, a, b, Register::None)?
                };
                return self.emit(&|asm| Ok(asm.add_instruction(ins)?));
            }
            _ => {}
        }
        let op = code.op_code();
        let mut ops = Vec::new();
        for i in 0..op.op_count() {
            use OpCodeOperandKind as K;
            let o = match op.op_kind(i) {
                K::st0 => Operand::R(Register::ST0),
                K::sti_opcode => Operand::R(self.st()),
                K::mm_reg | K::mm_rm => Operand::R(self.mm()),
                K::xmm_reg | K::xmm_rm => Operand::R(self.xmm()),
                K::r32_reg | K::r32_rm => Operand::R(self.gpr32()),
                K::ax => Operand::R(Register::AX),
                K::imm8 => Operand::I(self.rng.below(256) as u32),
                K::mem => Operand::M(self.fp_mem(code)),
                // State stores go to absolute addresses, so the comparison can find the
                // fields that differ between hosts by construction.
                K::mm_or_mem | K::xmm_or_mem | K::r32_or_mem | K::r16_or_mem => {
                    if self.rng.chance(50) {
                        Operand::M(self.fp_mem(code))
                    } else {
                        Operand::R(match op.op_kind(i) {
                            K::mm_or_mem => self.mm(),
                            K::xmm_or_mem => self.xmm(),
                            _ => self.gpr32(),
                        })
                    }
                }
                _ => return self.fp(),
            };
            ops.push(o);
        }
        use Operand::*;
        let ins = match ops.as_slice() {
            [] if op.op_count() == 0 => Instruction::with(code),
            [R(a)] => Instruction::with1(code, *a)?,
            [M(a)] => Instruction::with1(code, *a)?,
            [R(a), R(b)] => Instruction::with2(code, *a, *b)?,
            [R(a), M(b)] => Instruction::with2(code, *a, *b)?,
            [M(a), R(b)] => Instruction::with2(code, *a, *b)?,
            [R(a), I(b)] => Instruction::with2(code, *a, *b)?,
            [R(a), R(b), I(c)] => Instruction::with3(code, *a, *b, *c)?,
            [R(a), M(b), I(c)] => Instruction::with3(code, *a, *b, *c)?,
            _ => return Err(GenError::Operands("a floating-point form")),
        };
        self.emit(&|asm| Ok(asm.add_instruction(ins)?))
    }

    fn st(&mut self) -> Register {
        self.rng.pick(&[
            Register::ST0,
            Register::ST1,
            Register::ST2,
            Register::ST3,
            Register::ST4,
            Register::ST5,
            Register::ST6,
            Register::ST7,
        ])
    }

    fn mm(&mut self) -> Register {
        self.rng.pick(&[
            Register::MM0,
            Register::MM1,
            Register::MM2,
            Register::MM3,
            Register::MM4,
            Register::MM5,
            Register::MM6,
            Register::MM7,
        ])
    }

    fn xmm(&mut self) -> Register {
        self.rng.pick(&[
            Register::XMM0,
            Register::XMM1,
            Register::XMM2,
            Register::XMM3,
            Register::XMM4,
            Register::XMM5,
            Register::XMM6,
            Register::XMM7,
        ])
    }

    fn gpr32(&mut self) -> Register {
        let r = self.dst();
        [
            Register::EAX,
            Register::ECX,
            Register::EDX,
            Register::EBX,
            Register::ESP,
            Register::EBP,
            Register::ESI,
            Register::EDI,
        ][r]
    }

    /// A memory operand for `code` inside the buffer: usually aligned to its size (16-byte
    /// operands must be, for most SSE forms), sometimes not.
    fn fp_mem(&mut self, code: Code) -> MemoryOperand {
        let size = (code.op_code().memory_size().size() as i64).clamp(1, 512);
        let align = if self.rng.chance(92) {
            size.clamp(1, 16)
        } else {
            1
        };
        let len = DATA_LEN as i64;
        // [base + disp] when a register holds a known exact pointer, else [disp32].
        let exact: Vec<(usize, i64)> = (0..8)
            .filter_map(|r| match self.state.regs[r] {
                Some((lo, hi)) if lo == hi && r != 4 => {
                    let off = lo - i64::from(DATA_ADDR);
                    (MARGIN..len - MARGIN).contains(&off).then_some((r, off))
                }
                _ => None,
            })
            .collect();
        let mut target = self.rng.range(MARGIN, len - MARGIN - size);
        target -= target % align;
        if target < MARGIN {
            target += align;
        }
        let state_store = matches!(
            code.mnemonic(),
            Mnemonic::Fxsave
                | Mnemonic::Fnsave
                | Mnemonic::Fsave
                | Mnemonic::Fnstenv
                | Mnemonic::Fstenv
        );
        if !exact.is_empty() && !state_store && self.rng.chance(50) {
            let (r, off) = self.rng.pick(&exact);
            let reg = [
                Register::EAX,
                Register::ECX,
                Register::EDX,
                Register::EBX,
                Register::ESP,
                Register::EBP,
                Register::ESI,
                Register::EDI,
            ][r];
            return MemoryOperand::with_base_displ(reg, target - off);
        }
        MemoryOperand::with_displ(u64::from(DATA_ADDR) + target as u64, 4)
    }
}
