//! The sequence generator: random but reproducible (seeded) sequences of unprivileged 32-bit
//! integer instructions, assembled with iced-x86's `CodeAssembler`, with an initial state whose
//! pointers land in the data buffer.
//!
//! A sequence is a list of *groups*. A group is the instruction being tested, preceded by the
//! fix-ups it needs to be well defined: a `MOV` that puts a pointer register back into the
//! buffer, a small `MOV ECX` before a `REP` prefix, a `CMP` that defines the arithmetic flags
//! before an instruction that reads one the previous writer left undefined, a `PUSH imm` before
//! `POPFD`. Forward branches only ever target the start of a group, so a fix-up always runs
//! together with its instruction. The generator tracks, with the data-flow state of
//! [`super::analysis`], what each register may hold and which flags are undefined, joining the
//! states of every path into a group.

use std::collections::BTreeMap;
use std::ops::Range;

use iced_x86::code_asm::*;
use iced_x86::{Code, Decoder, DecoderOptions, IcedError, Instruction, InstructionInfoFactory};

mod fp;

use super::analysis::{self, EBP, ECX, EDI, ESI, ESP, State, eflags::*};
use super::{CODE_ADDR, DATA_ADDR, DATA_LEN};

/// A xorshift64* generator: small, fast and reproducible on every platform.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Self {
        // One splitmix64 step spreads similar seeds apart and never yields 0.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self(if z == 0 { 1 } else { z })
    }

    /// The generator for case `index` of a run with `seed`: every case can be regenerated alone.
    pub fn for_case(seed: u64, index: u64) -> Self {
        Self::new(seed ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A number in `lo..=hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        if hi <= lo {
            lo
        } else {
            lo + self.below((hi - lo + 1) as u64) as i64
        }
    }

    /// One of `items` (which must not be empty).
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// A 32-bit value from a mix of edge cases and random bits.
    pub fn value(&mut self) -> u32 {
        match self.below(10) {
            0 => self.below(17) as u32,
            1 => self.pick(&[
                0,
                1,
                0x7F,
                0x80,
                0xFF,
                0x7FFF,
                0x8000,
                0xFFFF,
                0x7FFF_FFFF,
                0x8000_0000,
                0xFFFF_FFFF,
                0xFFFF_FF80,
            ]),
            2 => (self.below(0x100) as u32) << (8 * self.below(4)),
            3 => 0u32.wrapping_sub(self.below(17) as u32),
            4 => self.pick(&[0x0909_0909, 0x9999_9999, 0x0F0F_0F0F, 0x1234_5678]),
            _ => self.next_u64() as u32,
        }
    }
}

/// Why a case could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// iced-x86 refused an instruction the generator built (a generator bug).
    #[error("the generator built an instruction iced-x86 refuses: {0}")]
    Asm(#[from] IcedError),
    /// The generator combined operands no instruction form takes (a generator bug).
    #[error("the generator combined operands no form of {0} takes")]
    Operands(&'static str),
    /// The assembled code does not decode back to the same instruction list (a branch was
    /// lengthened into several instructions); the caller draws a new case.
    #[error("the assembled sequence does not decode back to its instructions")]
    Relayout,
}

/// A generated case, before analysis.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The code, assembled at [`CODE_ADDR`].
    pub code: Vec<u8>,
    /// EAX..EDI.
    pub gpr: [u32; 8],
    /// Initial EFLAGS (arithmetic flags and DF; IF and bit 1 set).
    pub eflags: u32,
    /// Initial x87/MMX/SSE state.
    pub fx: vmdriver::fpu::FxImage,
    /// The data buffer.
    pub data: Vec<u8>,
    /// The groups, as ranges of instruction indices.
    pub groups: Vec<Range<usize>>,
    /// How many instructions each group has.
    pub count: usize,
}

/// An operand of a generated instruction.
#[derive(Clone, Copy)]
enum Op {
    R8(AsmRegister8),
    R16(AsmRegister16),
    R32(AsmRegister32),
    M(AsmMemoryOperand),
    I(i32),
}

const R32: [AsmRegister32; 8] = [eax, ecx, edx, ebx, esp, ebp, esi, edi];
const R16: [AsmRegister16; 8] = [ax, cx, dx, bx, sp, bp, si, di];
const R8: [AsmRegister8; 8] = [al, cl, dl, bl, ah, ch, dh, bh];

/// How far from the buffer's edges generated accesses stay.
const MARGIN: i64 = 16;
/// How far from the buffer's edges ESP, ESI and EDI must be to be used as a stack or string
/// pointer (a group moves them by at most a few dozen bytes).
const POINTER_MARGIN: i64 = 0x200;

/// Calls `$a.$f(x, y)` for each register/memory/immediate combination that form takes.
macro_rules! rm_r_imm {
    ($a:expr, $f:ident, $x:expr, $y:expr, $name:literal) => {
        match ($x, $y) {
            (Op::R8(d), Op::R8(s)) => $a.$f(d, s)?,
            (Op::R16(d), Op::R16(s)) => $a.$f(d, s)?,
            (Op::R32(d), Op::R32(s)) => $a.$f(d, s)?,
            (Op::M(d), Op::R8(s)) => $a.$f(d, s)?,
            (Op::M(d), Op::R16(s)) => $a.$f(d, s)?,
            (Op::M(d), Op::R32(s)) => $a.$f(d, s)?,
            (Op::R8(d), Op::M(s)) => $a.$f(d, s)?,
            (Op::R16(d), Op::M(s)) => $a.$f(d, s)?,
            (Op::R32(d), Op::M(s)) => $a.$f(d, s)?,
            (Op::R8(d), Op::I(i)) => $a.$f(d, i)?,
            (Op::R16(d), Op::I(i)) => $a.$f(d, i)?,
            (Op::R32(d), Op::I(i)) => $a.$f(d, i)?,
            (Op::M(d), Op::I(i)) => $a.$f(d, i)?,
            _ => return Err(GenError::Operands($name)),
        }
    };
}

/// `$a.$f(x, y)` for r/m, r forms (XADD, CMPXCHG, TEST and XCHG with registers).
macro_rules! rm_r {
    ($a:expr, $f:ident, $x:expr, $y:expr, $name:literal) => {
        match ($x, $y) {
            (Op::R8(d), Op::R8(s)) => $a.$f(d, s)?,
            (Op::R16(d), Op::R16(s)) => $a.$f(d, s)?,
            (Op::R32(d), Op::R32(s)) => $a.$f(d, s)?,
            (Op::M(d), Op::R8(s)) => $a.$f(d, s)?,
            (Op::M(d), Op::R16(s)) => $a.$f(d, s)?,
            (Op::M(d), Op::R32(s)) => $a.$f(d, s)?,
            _ => return Err(GenError::Operands($name)),
        }
    };
}

/// `$a.$f(x)` for r/m forms.
macro_rules! rm {
    ($a:expr, $f:ident, $x:expr, $name:literal) => {
        match $x {
            Op::R8(d) => $a.$f(d)?,
            Op::R16(d) => $a.$f(d)?,
            Op::R32(d) => $a.$f(d)?,
            Op::M(d) => $a.$f(d)?,
            _ => return Err(GenError::Operands($name)),
        }
    };
}

/// `$a.$f(x, count)` for shifts and rotates: count is an immediate or CL.
macro_rules! shift_op {
    ($a:expr, $f:ident, $x:expr, $c:expr, $name:literal) => {
        match ($x, $c) {
            (Op::R8(d), Op::I(i)) => $a.$f(d, i)?,
            (Op::R16(d), Op::I(i)) => $a.$f(d, i)?,
            (Op::R32(d), Op::I(i)) => $a.$f(d, i)?,
            (Op::M(d), Op::I(i)) => $a.$f(d, i)?,
            (Op::R8(d), Op::R8(c)) => $a.$f(d, c)?,
            (Op::R16(d), Op::R8(c)) => $a.$f(d, c)?,
            (Op::R32(d), Op::R8(c)) => $a.$f(d, c)?,
            (Op::M(d), Op::R8(c)) => $a.$f(d, c)?,
            _ => return Err(GenError::Operands($name)),
        }
    };
}

/// `$a.$f(x, y)` for r16/r32, r/m forms (BSF, BSR, IMUL r, r/m, CMOVcc).
macro_rules! r_rm {
    ($a:expr, $f:ident, $x:expr, $y:expr, $name:literal) => {
        match ($x, $y) {
            (Op::R16(d), Op::R16(s)) => $a.$f(d, s)?,
            (Op::R32(d), Op::R32(s)) => $a.$f(d, s)?,
            (Op::R16(d), Op::M(s)) => $a.$f(d, s)?,
            (Op::R32(d), Op::M(s)) => $a.$f(d, s)?,
            _ => return Err(GenError::Operands($name)),
        }
    };
}

/// `$a.$f(x, y)` for BT-family forms: r/m16/32 with r16/32 or imm8.
macro_rules! bt_op {
    ($a:expr, $f:ident, $x:expr, $y:expr, $name:literal) => {
        match ($x, $y) {
            (Op::R16(d), Op::R16(s)) => $a.$f(d, s)?,
            (Op::R32(d), Op::R32(s)) => $a.$f(d, s)?,
            (Op::M(d), Op::R16(s)) => $a.$f(d, s)?,
            (Op::M(d), Op::R32(s)) => $a.$f(d, s)?,
            (Op::R16(d), Op::I(i)) => $a.$f(d, i)?,
            (Op::R32(d), Op::I(i)) => $a.$f(d, i)?,
            (Op::M(d), Op::I(i)) => $a.$f(d, i)?,
            _ => return Err(GenError::Operands($name)),
        }
    };
}

/// `$a.$f(x, y, count)` for SHLD/SHRD.
macro_rules! double_shift {
    ($a:expr, $f:ident, $x:expr, $y:expr, $c:expr, $name:literal) => {
        match ($x, $y, $c) {
            (Op::R16(d), Op::R16(s), Op::I(i)) => $a.$f(d, s, i)?,
            (Op::R32(d), Op::R32(s), Op::I(i)) => $a.$f(d, s, i)?,
            (Op::M(d), Op::R16(s), Op::I(i)) => $a.$f(d, s, i)?,
            (Op::M(d), Op::R32(s), Op::I(i)) => $a.$f(d, s, i)?,
            (Op::R16(d), Op::R16(s), Op::R8(c)) => $a.$f(d, s, c)?,
            (Op::R32(d), Op::R32(s), Op::R8(c)) => $a.$f(d, s, c)?,
            (Op::M(d), Op::R16(s), Op::R8(c)) => $a.$f(d, s, c)?,
            (Op::M(d), Op::R32(s), Op::R8(c)) => $a.$f(d, s, c)?,
            _ => return Err(GenError::Operands($name)),
        }
    };
}

type Emit<'f> = &'f dyn Fn(&mut CodeAssembler) -> Result<(), GenError>;

/// Builds one case.
struct Builder<'r> {
    rng: &'r mut Rng,
    a: CodeAssembler,
    info: InstructionInfoFactory,
    state: State,
    /// States flowing into later groups along branches.
    pending: BTreeMap<usize, State>,
    labels: BTreeMap<usize, CodeLabel>,
    groups: Vec<Range<usize>>,
    group: usize,
    n: usize,
    /// A floating-point case: most groups are x87/MMX/SSE/SSE2 instructions.
    fp_case: bool,
}

/// Generates one case from `rng`.
pub fn generate(rng: &mut Rng) -> Result<Generated, GenError> {
    let mut last = GenError::Relayout;
    for _ in 0..16 {
        match try_generate(rng) {
            Err(GenError::Relayout) => last = GenError::Relayout,
            other => return other,
        }
    }
    Err(last)
}

fn try_generate(rng: &mut Rng) -> Result<Generated, GenError> {
    let mut gpr = [0u32; 8];
    for (i, g) in gpr.iter_mut().enumerate() {
        let pointer = match i {
            ESP => true,
            3 | EBP | ESI | EDI => rng.chance(80),
            _ => rng.chance(5),
        };
        *g = if pointer {
            let (lo, hi) = if i == ESP {
                (0x1800, 0x2800)
            } else {
                (POINTER_MARGIN, DATA_LEN as i64 - POINTER_MARGIN)
            };
            let mut off = rng.range(lo, hi);
            if rng.chance(75) {
                off &= !3;
            }
            DATA_ADDR + off as u32
        } else {
            rng.value()
        };
    }
    let eflags = (rng.next_u64() as u32 & (ARITH | DF)) | 0x202;
    let mut data = vec![0u8; DATA_LEN];
    for chunk in data.chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let fx = fp::image(rng);
    let fp_case = rng.chance(40);
    if fp_case {
        for chunk in data.chunks_mut(16) {
            if rng.chance(50) {
                let v = fp::vector(rng);
                chunk.copy_from_slice(&v[..chunk.len()]);
            }
        }
    }
    let n = rng.range(1, 8) as usize;
    let mut b = Builder {
        rng,
        a: CodeAssembler::new(32)?,
        info: InstructionInfoFactory::new(),
        state: State::exact(gpr),
        pending: BTreeMap::new(),
        labels: BTreeMap::new(),
        groups: Vec::new(),
        group: 0,
        n,
        fp_case,
    };
    for g in 0..n {
        b.start_group(g)?;
        let first = b.a.instructions().len();
        b.body()?;
        b.groups.push(first..b.a.instructions().len());
    }
    if let Some(mut end) = b.labels.remove(&n) {
        // A branch targets the end: give it an instruction to land on.
        b.a.set_label(&mut end)?;
        let first = b.a.instructions().len();
        b.a.nop()?;
        b.groups.push(first..first + 1);
    }
    let count = b.a.instructions().len();
    let code = b.a.assemble(u64::from(CODE_ADDR))?;
    let decoded = Decoder::with_ip(32, &code, u64::from(CODE_ADDR), DecoderOptions::NONE)
        .into_iter()
        .count();
    if decoded != count {
        return Err(GenError::Relayout);
    }
    Ok(Generated {
        code,
        gpr,
        eflags,
        fx,
        data,
        groups: b.groups,
        count,
    })
}

impl Builder<'_> {
    fn start_group(&mut self, g: usize) -> Result<(), GenError> {
        self.group = g;
        if let Some(p) = self.pending.remove(&g) {
            self.state = self.state.join(&p);
        }
        if let Some(mut l) = self.labels.remove(&g) {
            self.a.set_label(&mut l)?;
        }
        Ok(())
    }

    /// Adds the instruction(s) `f` assembles, first defining the arithmetic flags if they read
    /// one that may be undefined, and updates the state.
    fn emit(&mut self, f: Emit) -> Result<(), GenError> {
        let mut probe = CodeAssembler::new(32)?;
        f(&mut probe)?;
        let reads = probe
            .instructions()
            .iter()
            .fold(0, |r, i| r | analysis::flags_read(i));
        if reads & self.state.undef != 0 {
            let r = self.rng.below(8) as usize;
            let imm = self.rng.value() as i32;
            self.raw(&|a| Ok(a.cmp(R32[r], imm)?))?;
        }
        self.raw(f)
    }

    /// Adds the instruction(s) `f` assembles and updates the state.
    fn raw(&mut self, f: Emit) -> Result<(), GenError> {
        let before = self.a.instructions().len();
        f(&mut self.a)?;
        let new: Vec<Instruction> = self.a.instructions()[before..].to_vec();
        for ins in &new {
            self.state = analysis::transfer(ins, &self.state, &mut self.info);
        }
        Ok(())
    }

    /// `MOV r32, imm32`.
    fn set(&mut self, r: usize, v: u32) -> Result<(), GenError> {
        self.raw(&|a| Ok(a.mov(R32[r], v)?))
    }

    /// The known range of register `r` as offsets into the buffer, if it is inside it.
    fn pointer(&self, r: usize, margin: i64) -> Option<(i64, i64)> {
        let (lo, hi) = self.state.regs[r]?;
        let base = i64::from(DATA_ADDR);
        let (lo, hi) = (lo - base, hi - base);
        (lo >= margin && hi <= DATA_LEN as i64 - margin).then_some((lo, hi))
    }

    /// Makes register `r` a pointer at least `margin` bytes inside the buffer.
    fn ensure_pointer(&mut self, r: usize, margin: i64) -> Result<(), GenError> {
        if self.pointer(r, margin).is_none() {
            let (lo, hi) = if r == ESP {
                (0x1800, 0x2800)
            } else {
                (
                    margin.max(POINTER_MARGIN),
                    DATA_LEN as i64 - margin.max(POINTER_MARGIN),
                )
            };
            let off = self.rng.range(lo, hi) as u32;
            self.set(r, DATA_ADDR + off)?;
        }
        Ok(())
    }

    /// Makes ECX a small count.
    fn ensure_small_ecx(&mut self, max: i64) -> Result<(), GenError> {
        let small = matches!(self.state.regs[ECX], Some((lo, hi)) if lo >= 0 && hi <= max);
        if !small {
            let v = self.rng.range(0, max) as u32;
            self.set(ECX, v)?;
        }
        Ok(())
    }

    /// A memory operand (unsized) for a `size`-byte access inside the buffer.
    fn mem(&mut self, size: i64) -> AsmMemoryOperand {
        let len = DATA_LEN as i64;
        let ptrs: Vec<(usize, (i64, i64))> = (0..8)
            .filter_map(|r| self.pointer(r, 0).map(|p| (r, p)))
            .collect();
        let form = self.rng.below(10);
        let mut m = None;
        if form >= 2 && !ptrs.is_empty() {
            let (b, (lb, hb)) = self.rng.pick(&ptrs);
            if form < 7 {
                // [base + disp]
                let (dlo, dhi) = (MARGIN - lb, len - MARGIN - size - hb);
                if dlo <= dhi {
                    let d = if self.rng.chance(70) && dlo <= 127 && dhi >= -128 {
                        self.rng.range(dlo.max(-128), dhi.min(127))
                    } else {
                        self.rng.range(dlo, dhi)
                    };
                    m = Some(AsmMemoryOperand::from(R32[b]) + d as i32);
                }
            } else {
                // [base + index*scale + disp] or [index*scale + disp], the index a pointer too:
                // the displacement takes the index's share of DATA_ADDR away again.
                let idx: Vec<(usize, (i64, i64))> =
                    ptrs.iter().copied().filter(|(r, _)| *r != ESP).collect();
                if !idx.is_empty() {
                    let (x, (lx, hx)) = self.rng.pick(&idx);
                    let s = self.rng.pick(&[1i64, 2, 4, 8]);
                    let with_base = form < 9;
                    let (base_lo, base_hi) = if with_base { (lb, hb) } else { (0, 0) };
                    let (dlo, dhi) = (
                        MARGIN - base_lo - s * lx,
                        len - MARGIN - size - base_hi - s * hx,
                    );
                    if dlo <= dhi {
                        let d = self.rng.range(dlo, dhi);
                        let base_share = if with_base { 0 } else { 1 };
                        let disp = d - s * i64::from(DATA_ADDR) + base_share * i64::from(DATA_ADDR);
                        let scaled = R32[x] * (s as u32);
                        let op = if with_base { R32[b] + scaled } else { scaled };
                        m = Some(op + disp as i32);
                    }
                }
            }
        }
        let m = m.unwrap_or_else(|| {
            let off = self.rng.range(MARGIN, len - MARGIN - size);
            AsmMemoryOperand::from(DATA_ADDR + off as u32)
        });
        match self.rng.below(14) {
            0 => m.ds(),
            1 => m.ss(),
            2 => m.es(),
            _ => m,
        }
    }

    /// A sized memory operand.
    fn mem_op(&mut self, size: i64) -> Op {
        let m = self.mem(size);
        Op::M(match size {
            1 => byte_ptr(m),
            2 => word_ptr(m),
            8 => qword_ptr(m),
            _ => dword_ptr(m),
        })
    }

    /// A register to write: rarely ESP.
    fn dst(&mut self) -> usize {
        if self.rng.chance(3) {
            ESP
        } else {
            self.rng.pick(&[0, 1, 2, 3, 5, 6, 7])
        }
    }

    /// A register operand of `size` bytes (`dst`: one that may be written).
    fn reg(&mut self, size: i64, dst: bool) -> Op {
        let r = if dst && size != 1 {
            self.dst()
        } else {
            self.rng.below(8) as usize
        };
        match size {
            1 => Op::R8(R8[r]),
            2 => Op::R16(R16[r]),
            _ => Op::R32(R32[r]),
        }
    }

    /// A register or (with probability `mem_percent`) a memory operand.
    fn rm(&mut self, size: i64, dst: bool, mem_percent: u64) -> Op {
        if self.rng.chance(mem_percent) {
            self.mem_op(size)
        } else {
            self.reg(size, dst)
        }
    }

    fn imm(&mut self, size: i64) -> Op {
        let v = self.rng.value();
        Op::I(match size {
            1 => (v as u8) as i8 as i32,
            2 => (v as u16) as i16 as i32,
            _ => v as i32,
        })
    }

    fn size(&mut self) -> i64 {
        self.rng.pick(&[1, 2, 4, 4])
    }

    fn size16_32(&mut self) -> i64 {
        self.rng.pick(&[2, 4, 4])
    }

    fn lock(&mut self, op: Op) -> bool {
        matches!(op, Op::M(_)) && self.rng.chance(15)
    }

    /// One group: the fix-ups and the instruction under test.
    fn body(&mut self) -> Result<(), GenError> {
        if self.fp_case && self.rng.chance(85) {
            return self.fp();
        }
        let pick = self.rng.below(116);
        match pick {
            0..18 => self.alu(),
            18..21 => self.test_mov(),
            21..27 => self.unary(),
            27..37 => self.shift(),
            37..40 => self.shld(),
            40..46 => self.mul_div(),
            46..49 => self.imul(),
            49..53 => self.bit_test(),
            53..55 => self.bit_scan(),
            55..60 => self.exchange(),
            60..61 => self.cmpxchg8b(),
            61..64 => self.extend(),
            64..66 => self.convert(),
            66..69 => self.lea(),
            69..74 => self.push_pop(),
            74..76 => self.flags_stack(),
            76..80 => self.conditional(),
            80..83 => self.flag_ops(),
            83..89 => self.string(),
            89..92 => self.decimal(),
            92..93 => self.xlat(),
            93..95 => self.frame(),
            95..96 => self.push_pop_all(),
            96..97 => self.bound(),
            97..99 => self.software_exception(),
            110..116 => self.stack_run(),
            _ => self.branch(),
        }
    }

    fn alu(&mut self) -> Result<(), GenError> {
        let size = self.size();
        let (x, y) = match self.rng.below(5) {
            0 => (self.reg(size, true), self.reg(size, false)),
            1 => (self.mem_op(size), self.reg(size, false)),
            2 => (self.reg(size, true), self.mem_op(size)),
            3 => (self.reg(size, true), self.imm(size)),
            _ => (self.mem_op(size), self.imm(size)),
        };
        let op = self.rng.below(8);
        // LOCK CMP is not a lockable instruction (#UD).
        let lock = op != 4 && self.lock(x);
        self.emit(&move |a| {
            if lock {
                let _ = a.lock(); // sets the prefix for the next instruction
            }
            match op {
                0 => rm_r_imm!(a, add, x, y, "add"),
                1 => rm_r_imm!(a, adc, x, y, "adc"),
                2 => rm_r_imm!(a, sub, x, y, "sub"),
                3 => rm_r_imm!(a, sbb, x, y, "sbb"),
                4 => rm_r_imm!(a, cmp, x, y, "cmp"),
                5 => rm_r_imm!(a, and, x, y, "and"),
                6 => rm_r_imm!(a, or, x, y, "or"),
                _ => rm_r_imm!(a, xor, x, y, "xor"),
            }
            Ok(())
        })
    }

    fn test_mov(&mut self) -> Result<(), GenError> {
        let size = self.size();
        if self.rng.chance(50) {
            let x = self.rm(size, false, 40);
            let y = if self.rng.chance(50) {
                self.reg(size, false)
            } else {
                self.imm(size)
            };
            self.emit(&move |a| {
                match y {
                    Op::I(i) => match x {
                        Op::R8(d) => a.test(d, i)?,
                        Op::R16(d) => a.test(d, i)?,
                        Op::R32(d) => a.test(d, i)?,
                        Op::M(d) => a.test(d, i)?,
                        Op::I(_) => return Err(GenError::Operands("test")),
                    },
                    _ => rm_r!(a, test, x, y, "test"),
                }
                Ok(())
            })
        } else {
            let (x, y) = match self.rng.below(4) {
                0 => (self.reg(size, true), self.reg(size, false)),
                1 => (self.mem_op(size), self.reg(size, false)),
                2 => (self.reg(size, true), self.mem_op(size)),
                _ => (self.rm(size, true, 30), self.imm(size)),
            };
            self.emit(&move |a| {
                rm_r_imm!(a, mov, x, y, "mov");
                Ok(())
            })
        }
    }

    fn unary(&mut self) -> Result<(), GenError> {
        let size = self.size();
        let x = self.rm(size, true, 40);
        let lock = self.lock(x);
        let op = self.rng.below(4);
        self.emit(&move |a| {
            if lock {
                let _ = a.lock(); // sets the prefix for the next instruction
            }
            match op {
                0 => rm!(a, inc, x, "inc"),
                1 => rm!(a, dec, x, "dec"),
                2 => rm!(a, neg, x, "neg"),
                _ => rm!(a, not, x, "not"),
            }
            Ok(())
        })
    }

    fn count(&mut self) -> Op {
        match self.rng.below(10) {
            0..3 => Op::I(1),
            3..6 => Op::I(self.rng.range(0, 8) as i32),
            6..8 => Op::I(self.rng.range(0, 31) as i32),
            8 => Op::I(self.rng.range(32, 255) as i32),
            _ => Op::R8(cl),
        }
    }

    fn shift(&mut self) -> Result<(), GenError> {
        let size = self.size();
        let x = self.rm(size, true, 30);
        let c = self.count();
        let op = self.rng.below(8);
        self.emit(&move |a| {
            match op {
                0 => shift_op!(a, rol, x, c, "rol"),
                1 => shift_op!(a, ror, x, c, "ror"),
                2 => shift_op!(a, rcl, x, c, "rcl"),
                3 => shift_op!(a, rcr, x, c, "rcr"),
                4 => shift_op!(a, shl, x, c, "shl"),
                5 => shift_op!(a, shr, x, c, "shr"),
                6 => shift_op!(a, sal, x, c, "sal"),
                _ => shift_op!(a, sar, x, c, "sar"),
            }
            Ok(())
        })
    }

    fn shld(&mut self) -> Result<(), GenError> {
        let size = self.size16_32();
        // A 16-bit double shift by more than 16 leaves its destination undefined: keep counts
        // to 0..=16 there. (The count's fix-up comes before the operands are picked.)
        let c = if self.rng.chance(25) {
            if size == 2 {
                self.ensure_small_ecx(16)?;
            }
            Op::R8(cl)
        } else if size == 2 {
            Op::I(self.rng.range(0, 16) as i32)
        } else {
            Op::I(self.rng.range(0, 40) as i32)
        };
        let x = self.rm(size, true, 30);
        let y = self.reg(size, false);
        let left = self.rng.chance(50);
        self.emit(&move |a| {
            if left {
                double_shift!(a, shld, x, y, c, "shld");
            } else {
                double_shift!(a, shrd, x, y, c, "shrd");
            }
            Ok(())
        })
    }

    fn mul_div(&mut self) -> Result<(), GenError> {
        let size = self.size();
        let op = self.rng.below(4);
        if op >= 2 && self.rng.chance(60) {
            // Make most divisions fit: a zero or sign-extended upper half.
            let signed = op == 3;
            self.raw(&move |a| {
                match (size, signed) {
                    (1, false) => a.mov(ah, 0)?,
                    (2, false) => a.mov(dx, 0)?,
                    (_, false) => a.mov(edx, 0u32)?,
                    (1, true) => a.cbw()?,
                    (2, true) => a.cwd()?,
                    (_, true) => a.cdq()?,
                }
                Ok(())
            })?;
        }
        // The operand after the fix-up: a memory operand must not be based on EDX it zeroed.
        let x = self.rm(size, false, 30);
        self.emit(&move |a| {
            match op {
                0 => rm!(a, mul, x, "mul"),
                1 => rm!(a, imul, x, "imul"),
                2 => rm!(a, div, x, "div"),
                _ => rm!(a, idiv, x, "idiv"),
            }
            Ok(())
        })
    }

    fn imul(&mut self) -> Result<(), GenError> {
        let size = self.size16_32();
        let x = self.reg(size, true);
        let y = self.rm(size, false, 40);
        if self.rng.chance(50) {
            self.emit(&move |a| {
                r_rm!(a, imul_2, x, y, "imul");
                Ok(())
            })
        } else {
            let Op::I(i) = self.imm(size) else {
                return Err(GenError::Operands("imul"));
            };
            self.emit(&move |a| {
                match (x, y) {
                    (Op::R16(d), Op::R16(s)) => a.imul_3(d, s, i)?,
                    (Op::R32(d), Op::R32(s)) => a.imul_3(d, s, i)?,
                    (Op::R16(d), Op::M(s)) => a.imul_3(d, s, i)?,
                    (Op::R32(d), Op::M(s)) => a.imul_3(d, s, i)?,
                    _ => return Err(GenError::Operands("imul")),
                }
                Ok(())
            })
        }
    }

    fn bit_test(&mut self) -> Result<(), GenError> {
        let size = self.size16_32();
        let op = self.rng.below(4);
        let (x, y) = match self.rng.below(4) {
            0 => (self.reg(size, true), self.reg(size, false)),
            1 => {
                // A register bit offset reaches (offset >> 3) bytes away from the operand, signed:
                // keep it small (and the operand 32 bytes clear of the buffer's end).
                let r = self.rng.pick(&[0usize, 1, 2]);
                let v = self.rng.range(-64, 200) as i32 as u32;
                self.set(r, v)?;
                let y = if size == 2 {
                    Op::R16(R16[r])
                } else {
                    Op::R32(R32[r])
                };
                let m = self.mem(size + 32);
                (Op::M(if size == 2 { word_ptr(m) } else { dword_ptr(m) }), y)
            }
            2 => (self.reg(size, true), Op::I(self.rng.range(0, 255) as i32)),
            _ => (self.mem_op(size), Op::I(self.rng.range(0, 255) as i32)),
        };
        let lock = op != 0 && self.lock(x);
        self.emit(&move |a| {
            if lock {
                let _ = a.lock(); // sets the prefix for the next instruction
            }
            match op {
                0 => bt_op!(a, bt, x, y, "bt"),
                1 => bt_op!(a, bts, x, y, "bts"),
                2 => bt_op!(a, btr, x, y, "btr"),
                _ => bt_op!(a, btc, x, y, "btc"),
            }
            Ok(())
        })
    }

    fn bit_scan(&mut self) -> Result<(), GenError> {
        let size = self.size16_32();
        let x = self.reg(size, true);
        let y = self.rm(size, false, 40);
        let forward = self.rng.chance(50);
        self.emit(&move |a| {
            if forward {
                r_rm!(a, bsf, x, y, "bsf");
            } else {
                r_rm!(a, bsr, x, y, "bsr");
            }
            Ok(())
        })
    }

    fn exchange(&mut self) -> Result<(), GenError> {
        let size = self.size();
        let op = self.rng.below(4);
        if op == 3 {
            let r = self.dst();
            return self.emit(&move |a| Ok(a.bswap(R32[r])?));
        }
        let x = self.rm(size, true, 40);
        let y = self.reg(size, true);
        let lock = op != 0 && self.lock(x);
        self.emit(&move |a| {
            if lock {
                let _ = a.lock(); // sets the prefix for the next instruction
            }
            match op {
                0 => rm_r!(a, xchg, x, y, "xchg"),
                1 => rm_r!(a, xadd, x, y, "xadd"),
                _ => rm_r!(a, cmpxchg, x, y, "cmpxchg"),
            }
            Ok(())
        })
    }

    fn cmpxchg8b(&mut self) -> Result<(), GenError> {
        let m = self.mem(8);
        let lock = self.rng.chance(20);
        self.emit(&move |a| {
            if lock {
                let _ = a.lock(); // sets the prefix for the next instruction
            }
            Ok(a.cmpxchg8b(qword_ptr(m))?)
        })
    }

    fn extend(&mut self) -> Result<(), GenError> {
        let (dsize, ssize) = self.rng.pick(&[(2, 1), (4, 1), (4, 2)]);
        let x = self.reg(dsize, true);
        let y = self.rm(ssize, false, 40);
        let signed = self.rng.chance(50);
        self.emit(&move |a| {
            match (x, y, signed) {
                (Op::R16(d), Op::R8(s), false) => a.movzx(d, s)?,
                (Op::R32(d), Op::R8(s), false) => a.movzx(d, s)?,
                (Op::R32(d), Op::R16(s), false) => a.movzx(d, s)?,
                (Op::R16(d), Op::M(s), false) => a.movzx(d, s)?,
                (Op::R32(d), Op::M(s), false) => a.movzx(d, s)?,
                (Op::R16(d), Op::R8(s), true) => a.movsx(d, s)?,
                (Op::R32(d), Op::R8(s), true) => a.movsx(d, s)?,
                (Op::R32(d), Op::R16(s), true) => a.movsx(d, s)?,
                (Op::R16(d), Op::M(s), true) => a.movsx(d, s)?,
                (Op::R32(d), Op::M(s), true) => a.movsx(d, s)?,
                _ => return Err(GenError::Operands("movzx/movsx")),
            }
            Ok(())
        })
    }

    fn convert(&mut self) -> Result<(), GenError> {
        let op = self.rng.below(4);
        self.emit(&move |a| {
            match op {
                0 => a.cbw()?,
                1 => a.cwde()?,
                2 => a.cwd()?,
                _ => a.cdq()?,
            }
            Ok(())
        })
    }

    fn lea(&mut self) -> Result<(), GenError> {
        // LEA touches no memory: any registers, any scale, any displacement, and 16-bit
        // addressing too ([BX/BP + SI/DI + disp16], wrapping at 64 KiB).
        if self.rng.chance(20) {
            let base = self.rng.below(3);
            let index = self.rng.below(3);
            let disp = self.rng.value() as u16 as i16 as i32;
            let b = [Some(bx), Some(bp), None][base as usize];
            let i = [Some(si), Some(di), None][index as usize];
            let m = match (b, i) {
                (Some(b), Some(i)) => b + i,
                (Some(r), None) | (None, Some(r)) => AsmMemoryOperand::from(r),
                (None, None) => AsmMemoryOperand::from(0u16),
            } + disp;
            let size = self.size16_32();
            let x = self.reg(size, true);
            return self.emit(&move |a| {
                match x {
                    Op::R16(d) => a.lea(d, word_ptr(m))?,
                    Op::R32(d) => a.lea(d, word_ptr(m))?,
                    _ => return Err(GenError::Operands("lea")),
                }
                Ok(())
            });
        }
        let base = self.rng.below(9) as usize;
        let index = self.rng.below(9) as usize;
        let scale = self.rng.pick(&[1u32, 2, 4, 8]);
        let disp = self.rng.value() as i32;
        let mut m = AsmMemoryOperand::from(disp);
        if base < 8 {
            m = m + R32[base];
        }
        if index < 8 && index != ESP {
            m = m + R32[index] * scale;
        }
        let size = self.size16_32();
        let x = self.reg(size, true);
        self.emit(&move |a| {
            match x {
                Op::R16(d) => a.lea(d, m)?,
                Op::R32(d) => a.lea(d, m)?,
                _ => return Err(GenError::Operands("lea")),
            }
            Ok(())
        })
    }

    fn push_pop(&mut self) -> Result<(), GenError> {
        self.ensure_pointer(ESP, POINTER_MARGIN)?;
        let size = self.size16_32();
        if self.rng.chance(55) {
            let x = match self.rng.below(4) {
                0 | 1 => self.reg(size, false),
                2 => self.mem_op(size),
                _ => self.imm(size),
            };
            self.emit(&move |a| {
                match x {
                    Op::R16(r) => a.push(r)?,
                    Op::R32(r) => a.push(r)?,
                    Op::M(m) => a.push(m)?,
                    Op::I(i) if size == 2 => {
                        a.add_instruction(Instruction::with1(Code::Push_imm16, i)?)?
                    }
                    Op::I(i) => a.push(i)?,
                    Op::R8(_) => return Err(GenError::Operands("push")),
                }
                Ok(())
            })
        } else {
            let x = if self.rng.chance(25) {
                self.mem_op(size)
            } else {
                let r = self.rng.pick(&[0usize, 1, 2, 3, 5, 6, 7]);
                if size == 2 {
                    Op::R16(R16[r])
                } else {
                    Op::R32(R32[r])
                }
            };
            self.emit(&move |a| {
                match x {
                    Op::R16(r) => a.pop(r)?,
                    Op::R32(r) => a.pop(r)?,
                    Op::M(m) => a.pop(m)?,
                    _ => return Err(GenError::Operands("pop")),
                }
                Ok(())
            })
        }
    }

    fn flags_stack(&mut self) -> Result<(), GenError> {
        self.ensure_pointer(ESP, POINTER_MARGIN)?;
        let wide = self.rng.chance(70);
        if self.rng.chance(40) {
            return self.emit(&move |a| {
                if wide {
                    a.pushfd()?;
                } else {
                    a.pushf()?;
                }
                Ok(())
            });
        }
        // POPF(D) of a value that keeps IF = 1, IOPL = 0, TF = 0 and AC = 0: at CPL 3 (native)
        // IF and IOPL cannot change and TF/AC would trap, while the interpreter runs at CPL 0.
        // Reserved and ignored bits (1, 3, 5, 15, 16, 17, 19, 20, 22-31) get noise.
        let noise = 0xFFDB_802A_u32;
        let mut v = (self.rng.next_u64() as u32 & (ARITH | DF | NT | ID | noise)) | 0x202;
        if !wide {
            v &= 0xFFFF;
        }
        let v = v as i32;
        self.raw(&move |a| {
            if wide {
                a.push(v)?;
            } else {
                a.add_instruction(Instruction::with1(
                    Code::Push_imm16,
                    v as u16 as i16 as i32,
                )?)?;
            }
            Ok(())
        })?;
        self.emit(&move |a| {
            if wide {
                a.popfd()?;
            } else {
                a.popf()?;
            }
            Ok(())
        })
    }

    fn conditional(&mut self) -> Result<(), GenError> {
        let cc = self.rng.below(16);
        if self.rng.chance(50) {
            let x = self.rm(1, true, 30);
            self.emit(&move |a| {
                macro_rules! go {
                    ($x:expr) => {
                        match cc {
                            0 => a.seto($x)?,
                            1 => a.setno($x)?,
                            2 => a.setb($x)?,
                            3 => a.setae($x)?,
                            4 => a.sete($x)?,
                            5 => a.setne($x)?,
                            6 => a.setbe($x)?,
                            7 => a.seta($x)?,
                            8 => a.sets($x)?,
                            9 => a.setns($x)?,
                            10 => a.setp($x)?,
                            11 => a.setnp($x)?,
                            12 => a.setl($x)?,
                            13 => a.setge($x)?,
                            14 => a.setle($x)?,
                            _ => a.setg($x)?,
                        }
                    };
                }
                match x {
                    Op::R8(r) => go!(r),
                    Op::M(m) => go!(m),
                    _ => return Err(GenError::Operands("setcc")),
                }
                Ok(())
            })
        } else {
            let size = self.size16_32();
            let x = self.reg(size, true);
            let y = self.rm(size, false, 40);
            self.emit(&move |a| {
                macro_rules! go {
                    ($x:expr, $y:expr) => {
                        match cc {
                            0 => a.cmovo($x, $y)?,
                            1 => a.cmovno($x, $y)?,
                            2 => a.cmovb($x, $y)?,
                            3 => a.cmovae($x, $y)?,
                            4 => a.cmove($x, $y)?,
                            5 => a.cmovne($x, $y)?,
                            6 => a.cmovbe($x, $y)?,
                            7 => a.cmova($x, $y)?,
                            8 => a.cmovs($x, $y)?,
                            9 => a.cmovns($x, $y)?,
                            10 => a.cmovp($x, $y)?,
                            11 => a.cmovnp($x, $y)?,
                            12 => a.cmovl($x, $y)?,
                            13 => a.cmovge($x, $y)?,
                            14 => a.cmovle($x, $y)?,
                            _ => a.cmovg($x, $y)?,
                        }
                    };
                }
                match (x, y) {
                    (Op::R16(d), Op::R16(s)) => go!(d, s),
                    (Op::R32(d), Op::R32(s)) => go!(d, s),
                    (Op::R16(d), Op::M(s)) => go!(d, s),
                    (Op::R32(d), Op::M(s)) => go!(d, s),
                    _ => return Err(GenError::Operands("cmovcc")),
                }
                Ok(())
            })
        }
    }

    fn flag_ops(&mut self) -> Result<(), GenError> {
        let op = self.rng.below(8);
        self.emit(&move |a| {
            match op {
                0 => a.lahf()?,
                1 => a.sahf()?,
                2 => a.clc()?,
                3 => a.stc()?,
                4 => a.cmc()?,
                5 => a.cld()?,
                6 => a.std()?,
                _ => a.salc()?,
            }
            Ok(())
        })
    }

    fn string(&mut self) -> Result<(), GenError> {
        let op = self.rng.below(5);
        let size = self.rng.pick(&[1u32, 2, 4]);
        // Which of ESI and EDI it walks: MOVS and CMPS both, STOS and SCAS EDI, LODS ESI.
        let (walks_esi, walks_edi) = match op {
            0 | 3 => (true, true),
            1 | 4 => (false, true),
            _ => (true, false),
        };
        if walks_esi {
            self.ensure_pointer(ESI, POINTER_MARGIN)?;
        }
        if walks_edi {
            self.ensure_pointer(EDI, POINTER_MARGIN)?;
        }
        // 0: no prefix, 1: REP/REPE, 2: REPNE (the last only on CMPS/SCAS).
        let prefix = if op >= 3 {
            self.rng.below(3)
        } else {
            self.rng.below(2)
        };
        if prefix != 0 {
            self.ensure_small_ecx(8)?;
        }
        self.emit(&move |a| {
            match prefix {
                1 if op >= 3 => {
                    let _ = a.repe();
                }
                1 => {
                    let _ = a.rep();
                }
                2 => {
                    let _ = a.repne();
                }
                _ => {}
            }
            match (op, size) {
                (0, 1) => a.movsb()?,
                (0, 2) => a.movsw()?,
                (0, _) => a.movsd()?,
                (1, 1) => a.stosb()?,
                (1, 2) => a.stosw()?,
                (1, _) => a.stosd()?,
                (2, 1) => a.lodsb()?,
                (2, 2) => a.lodsw()?,
                (2, _) => a.lodsd()?,
                (3, 1) => a.cmpsb()?,
                (3, 2) => a.cmpsw()?,
                (3, _) => a.cmpsd()?,
                (_, 1) => a.scasb()?,
                (_, 2) => a.scasw()?,
                _ => a.scasd()?,
            }
            Ok(())
        })
    }

    fn decimal(&mut self) -> Result<(), GenError> {
        let op = self.rng.below(6);
        let base = if self.rng.chance(70) {
            10
        } else {
            self.rng.range(0, 255) as i32
        };
        self.emit(&move |a| {
            match op {
                0 => a.daa()?,
                1 => a.das()?,
                2 => a.aaa()?,
                3 => a.aas()?,
                4 => a.aam(base)?,
                _ => a.aad(base)?,
            }
            Ok(())
        })
    }

    fn xlat(&mut self) -> Result<(), GenError> {
        // XLAT reads [EBX + AL]: EBX needs 256 bytes of room.
        if !matches!(self.pointer(3, MARGIN), Some((_, hi)) if hi + 256 + MARGIN <= DATA_LEN as i64)
        {
            let off = self.rng.range(MARGIN, DATA_LEN as i64 - 256 - MARGIN) as u32;
            self.set(3, DATA_ADDR + off)?;
        }
        self.emit(&|a| Ok(a.xlatb()?))
    }

    fn frame(&mut self) -> Result<(), GenError> {
        self.ensure_pointer(ESP, POINTER_MARGIN)?;
        if self.rng.chance(55) {
            let size = self.rng.range(0, 0x40) as i32;
            let level = self.rng.pick(&[0, 0, 1, 2, 3]);
            if level > 1 {
                // ENTER with a nesting level copies frame pointers from below EBP.
                self.ensure_pointer(EBP, POINTER_MARGIN)?;
            }
            self.emit(&move |a| Ok(a.enter(size, level)?))
        } else {
            self.ensure_pointer(EBP, POINTER_MARGIN)?;
            self.emit(&|a| Ok(a.leave()?))
        }
    }

    /// A run of stack operations mixed with ESP read as a value and ESP-based operands, the
    /// shape of function prologues and epilogues: the translator folds the run's ESP moves
    /// into one pending delta, which every such operand must see.
    fn stack_run(&mut self) -> Result<(), GenError> {
        let n = self.rng.range(2, 6);
        for _ in 0..n {
            if self.rng.chance(60) {
                self.push_pop()?;
                continue;
            }
            self.ensure_pointer(ESP, POINTER_MARGIN)?;
            let r = R32[self.rng.pick(&[0usize, 1, 2, 3, 5, 6, 7])];
            let k = self.rng.range(0, 16) as i32 & !self.rng.pick(&[0, 3]);
            let op = self.rng.below(6);
            self.emit(&move |a| {
                match op {
                    0 => a.mov(r, dword_ptr(esp + k))?,
                    1 => a.mov(dword_ptr(esp + k), r)?,
                    2 => a.lea(r, dword_ptr(esp + k))?,
                    3 => a.mov(r, esp)?,
                    4 => a.add(dword_ptr(esp + k), r)?,
                    _ => a.push(esp)?,
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    fn push_pop_all(&mut self) -> Result<(), GenError> {
        self.ensure_pointer(ESP, POINTER_MARGIN)?;
        let op = self.rng.below(4);
        self.emit(&move |a| {
            match op {
                0 => a.pushad()?,
                1 => a.popad()?,
                2 => a.pusha()?,
                _ => a.popa()?,
            }
            Ok(())
        })
    }

    fn bound(&mut self) -> Result<(), GenError> {
        let size = self.size16_32();
        let x = self.reg(size, false);
        let m = self.mem(size * 2);
        self.emit(&move |a| {
            match x {
                Op::R16(r) => a.bound(r, dword_ptr(m))?,
                Op::R32(r) => a.bound(r, qword_ptr(m))?,
                _ => return Err(GenError::Operands("bound")),
            }
            Ok(())
        })
    }

    /// INTO (a #OF trap when OF = 1) and, rarely, INT3 (a #BP trap, EIP after it) and UD2
    /// (#UD, EIP on it).
    fn software_exception(&mut self) -> Result<(), GenError> {
        match self.rng.below(10) {
            0..8 => self.emit(&|a| Ok(a.into()?)),
            8 => self.emit(&|a| Ok(a.int3()?)),
            _ => self.emit(&|a| Ok(a.ud2()?)),
        }
    }

    fn branch(&mut self) -> Result<(), GenError> {
        let g = self.group;
        let kind = self.rng.below(10);
        // LOOPcc and JECXZ only have 8-bit displacements: keep them close.
        let reach = if kind >= 6 { 2 } else { 4 };
        let target = (g + 1 + self.rng.below(reach) as usize).min(self.n);
        let label = *self
            .labels
            .entry(target)
            .or_insert_with(|| self.a.create_label());
        let cc = self.rng.below(16);
        let f = move |a: &mut CodeAssembler, l: CodeLabel| -> Result<(), GenError> {
            match kind {
                0..=5 => match cc {
                    0 => a.jo(l)?,
                    1 => a.jno(l)?,
                    2 => a.jb(l)?,
                    3 => a.jae(l)?,
                    4 => a.je(l)?,
                    5 => a.jne(l)?,
                    6 => a.jbe(l)?,
                    7 => a.ja(l)?,
                    8 => a.js(l)?,
                    9 => a.jns(l)?,
                    10 => a.jp(l)?,
                    11 => a.jnp(l)?,
                    12 => a.jl(l)?,
                    13 => a.jge(l)?,
                    14 => a.jle(l)?,
                    _ => a.jg(l)?,
                },
                6 => a.jmp(l)?,
                7 => a.loop_(l)?,
                8 => match cc % 3 {
                    0 => a.loope(l)?,
                    1 => a.loopne(l)?,
                    _ => a.jecxz(l)?,
                },
                // (Not JCXZ: iced's CodeAssembler emits it with an operand-size prefix, which
                // truncates the target to 16 bits, far outside the code.)
                _ => a.jecxz(l)?,
            }
            Ok(())
        };
        // Probe with a label of the probe's own, then emit for real.
        let mut probe = CodeAssembler::new(32)?;
        let pl = probe.create_label();
        f(&mut probe, pl)?;
        let reads = probe
            .instructions()
            .iter()
            .fold(0, |r, i| r | analysis::flags_read(i));
        if reads & self.state.undef != 0 {
            let r = self.rng.below(8) as usize;
            let imm = self.rng.value() as i32;
            self.raw(&|a| Ok(a.cmp(R32[r], imm)?))?;
        }
        let before = self.a.instructions().len();
        f(&mut self.a, label)?;
        let new: Vec<Instruction> = self.a.instructions()[before..].to_vec();
        for ins in &new {
            self.state = analysis::transfer(ins, &self.state, &mut self.info);
        }
        let flowing = match self.pending.remove(&target) {
            Some(p) => p.join(&self.state),
            None => self.state.clone(),
        };
        self.pending.insert(target, flowing);
        Ok(())
    }
}
