//! x87, MMX, SSE and SSE2: the checks a P6 makes before a floating-point instruction (CR0.EM,
//! MP, TS, NE, CR4.OSFXSR, OSXMMEXCPT, pending x87 errors), the instructions that only move
//! state (FNINIT, FNSTENV/FLDENV, FNSAVE/FRSTOR, FXSAVE/FXRSTOR, LDMXCSR, ...) done here on the
//! guest's FXSAVE image, and everything else executed by the host FPU on that image
//! ([`vmdriver::fpu`]), with the guest's memory operand read before and written after by the
//! interpreter under the guest's segmentation, paging and alignment rules.
//!
//! Error reporting: x87 errors are deferred to the next waiting x87 or MMX instruction, which
//! raises #MF when CR0.NE = 1. With NE = 0 the CPU asserts FERR# (IRQ 13 through the PC's
//! chipset, [`Interp::ferr`]) and freezes at that instruction until the handler asserts IGNNE#
//! (a write to port 0xF0, [`Interp::set_ignne`]) or clears the error. SSE instructions run with
//! every exception masked on the host; an unmasked one raised for the guest discards the result
//! and raises #XM (CR4.OSXMMEXCPT = 1) or #UD.

use iced_x86::{CpuidFeature, Instruction, InstructionInfoFactory, MemorySize, Mnemonic, OpKind};
use vmdriver::IoHandler;
use vmdriver::fpu::{HostFpu, HostOperands, fx, is_x87, touches_mmx, x87_pending};

use super::{Fault, Interp, Step, gp0, vector};
use crate::cpu::{FxImage, MXCSR_MASK, SegReg, cr0, cr4, flags};

/// #NM, #MF, #XM.
const NM: u8 = 7;
const MF: u8 = 16;
const XM: u8 = 19;

/// FSW bits.
const FSW_FLAGS: u16 = 0x3F;
const FSW_SF: u16 = 1 << 6;
const FSW_ES: u16 = 1 << 7;
const FSW_B: u16 = 1 << 15;
/// MXCSR exception flags and masks.
const MX_FLAGS: u32 = 0x3F;
/// MXCSR pre-computation exceptions: invalid, denormal, divide by zero.
const MX_PRE: u32 = 0x07;
/// MXCSR underflow flag.
const MX_UE: u32 = 0x10;
/// MXCSR precision (inexact) flag.
const MX_PE: u32 = 0x20;
/// MXCSR.UM and MXCSR.FZ.
const MX_UM: u32 = 1 << 11;
const MX_FZ: u32 = 1 << 15;

/// The floating-point unit's engine-side state.
pub(super) struct FpuUnit {
    /// The host FPU executor, created at the first instruction that needs it.
    host: Option<HostFpu>,
    info: InstructionInfoFactory,
    /// FERR# is asserted (an x87 error met a waiting instruction with CR0.NE = 0).
    ferr: bool,
    /// IGNNE# is asserted: waiting instructions go on despite a pending error.
    ignne: bool,
    /// Instructions run on the host FPU.
    pub(super) executed: u64,
}

impl Default for FpuUnit {
    fn default() -> Self {
        Self {
            host: None,
            info: InstructionInfoFactory::new(),
            ferr: false,
            ignne: false,
            executed: 0,
        }
    }
}

/// What a floating-point instruction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FpStep {
    /// It ran (or raised an exception through the `Err` path).
    Done,
    /// It stopped on a pending x87 error with CR0.NE = 0: the CPU waits, FERR# asserted, for
    /// an interrupt (EIP stays on the instruction).
    Freeze,
}

/// Which architectural rules an instruction follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// x87 (D8-DF, WAIT).
    X87,
    /// MMX registers only (MMX and the SSE additions on MMX registers).
    Mmx,
    /// XMM registers or MXCSR (possibly MMX registers too: CVTPI2PS, MOVQ2DQ, ...).
    Sse,
    /// FXSAVE, FXRSTOR.
    Fxsr,
    /// Cache and ordering hints: PREFETCHh, SFENCE, LFENCE, MFENCE, CLFLUSH, MOVNTI.
    Hint,
}

fn classify(ins: &Instruction) -> Option<Class> {
    use CpuidFeature as F;
    use Mnemonic as M;
    if ins.mnemonic() == M::Wait {
        return Some(Class::X87);
    }
    let ours = ins.cpuid_features().iter().all(|f| {
        matches!(
            f,
            F::FPU
                | F::FPU287
                | F::FPU387
                | F::CMOV
                | F::MMX
                | F::SSE
                | F::SSE2
                | F::FXSR
                | F::CLFSH
        )
    });
    if !ours {
        return None;
    }
    if is_x87(ins) {
        return Some(Class::X87);
    }
    match ins.mnemonic() {
        M::Fxsave | M::Fxrstor => return Some(Class::Fxsr),
        M::Prefetchnta
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Sfence
        | M::Lfence
        | M::Mfence
        | M::Clflush
        | M::Movnti => return Some(Class::Hint),
        // SIMD floating-point conversions to and from MMX registers follow the SSE rules
        // (and raise SIMD exceptions) even when no XMM register is named.
        M::Ldmxcsr | M::Stmxcsr | M::Cvtps2pi | M::Cvttps2pi | M::Cvtpd2pi | M::Cvttpd2pi => {
            return Some(Class::Sse);
        }
        _ => {}
    }
    let xmm = (0..ins.op_count())
        .any(|i| ins.op_kind(i) == OpKind::Register && ins.op_register(i).is_xmm());
    let sse = ins
        .cpuid_features()
        .iter()
        .any(|f| matches!(f, F::SSE | F::SSE2));
    if xmm || (sse && !touches_mmx(ins)) {
        Some(Class::Sse)
    } else if touches_mmx(ins) {
        Some(Class::Mmx)
    } else {
        None
    }
}

fn rd16(img: &FxImage, o: usize) -> u16 {
    u16::from_le_bytes([img.0[o], img.0[o + 1]])
}

fn wr16(img: &mut FxImage, o: usize, v: u16) {
    img.0[o..o + 2].copy_from_slice(&v.to_le_bytes());
}

fn rd32(img: &FxImage, o: usize) -> u32 {
    u32::from_le_bytes([img.0[o], img.0[o + 1], img.0[o + 2], img.0[o + 3]])
}

fn wr32(img: &mut FxImage, o: usize, v: u32) {
    img.0[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

/// Loads FSW. The FXSAVE image keeps the registers in stack order, so a new TOP rotates them:
/// the physical registers stay where they are.
fn set_fsw(img: &mut FxImage, fsw: u16) {
    let old_top = usize::from(rd16(img, fx::FSW) >> 11) & 7;
    let new_top = usize::from(fsw >> 11) & 7;
    if old_top != new_top {
        let old = img.0;
        for phys in 0..8 {
            let from = fx::ST0 + 16 * ((phys + 8 - old_top) & 7);
            let to = fx::ST0 + 16 * ((phys + 8 - new_top) & 7);
            img.0[to..to + 16].copy_from_slice(&old[from..from + 16]);
        }
    }
    wr16(img, fx::FSW, fsw);
}

/// The control word as loaded by FLDCW, FLDENV and FRSTOR: reserved bits 7 and 13-15 read as
/// 0, bit 6 as 1.
fn load_fcw(v: u16) -> u16 {
    (v & 0x1F3F) | 0x40
}

/// Sets FSW.ES and FSW.B from the flags and masks: ES summarises the unmasked exception flags
/// (Intel SDM vol. 1, 8.1.3.1), B mirrors ES on processors since the 487.
fn summarise(img: &mut FxImage) {
    let fcw = rd16(img, fx::FCW);
    let mut fsw = rd16(img, fx::FSW) & !(FSW_ES | FSW_B);
    if fsw & !fcw & FSW_FLAGS != 0 {
        fsw |= FSW_ES | FSW_B;
    }
    wr16(img, fx::FSW, fsw);
}

/// The full two-bit tag of physical register `phys` (valid 0, zero 1, special 2, empty 3).
fn full_tag(img: &FxImage, phys: usize) -> u16 {
    if img.0[fx::FTW] & (1 << phys) == 0 {
        return 3;
    }
    let top = usize::from(rd16(img, fx::FSW) >> 11) & 7;
    let slot = fx::ST0 + 16 * ((phys + 8 - top) & 7);
    let r = &img.0[slot..slot + 10];
    let mantissa = u64::from_le_bytes(r[..8].try_into().expect("8 bytes"));
    let exponent = u16::from_le_bytes([r[8], r[9]]) & 0x7FFF;
    match exponent {
        0x7FFF => 2,
        0 if mantissa == 0 => 1,
        0 => 2,
        _ if mantissa >> 63 == 0 => 2,
        _ => 0,
    }
}

fn full_tag_word(img: &FxImage) -> u16 {
    (0..8).fold(0, |w, i| w | (full_tag(img, i) << (2 * i)))
}

fn abridged(tag_word: u16) -> u8 {
    (0..8).fold(0, |a, i| {
        if (tag_word >> (2 * i)) & 3 != 3 {
            a | (1 << i)
        } else {
            a
        }
    })
}

/// FNINIT's effect on the image (registers and SSE state untouched).
fn init_x87(img: &mut FxImage) {
    wr16(img, fx::FCW, 0x037F);
    set_fsw(img, 0);
    img.0[fx::FTW] = 0;
    img.0[fx::FOP..fx::MXCSR].fill(0);
}

/// Converts iced's RFLAGS bits to EFLAGS bits (the arithmetic flags).
fn eflags_of(iced: u32) -> u32 {
    use iced_x86::RflagsBits as R;
    [
        (R::CF, flags::CF),
        (R::PF, flags::PF),
        (R::AF, flags::AF),
        (R::ZF, flags::ZF),
        (R::SF, flags::SF),
        (R::OF, flags::OF),
    ]
    .iter()
    .fold(0, |e, (r, f)| if iced & r != 0 { e | f } else { e })
}

impl Interp {
    /// FERR#: an x87 error is pending and a waiting instruction met it with CR0.NE = 0. A PC
    /// routes it to IRQ 13.
    pub fn ferr(&self) -> bool {
        self.fpu.ferr
    }

    /// Drives IGNNE# (a PC asserts it on a write to port 0xF0 and drops it when FERR# goes
    /// away): while asserted, waiting x87 instructions ignore a pending error.
    pub fn set_ignne(&mut self, asserted: bool) {
        self.fpu.ignne = asserted;
    }

    /// Instructions run on the host FPU so far.
    pub fn host_fpu_instructions(&self) -> u64 {
        self.fpu.executed
    }

    /// Executes `ins` if it is an x87, MMX, SSE or SSE2 instruction this CPU offers; None if it
    /// is not one.
    pub(super) fn fp(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step<Option<FpStep>> {
        let Some(class) = classify(ins) else {
            return Ok(None);
        };
        if ins.has_lock_prefix() {
            return Err(Fault::Exception(vector::UD, None));
        }
        let c0 = self.cpu.cr0;
        let (em, ts) = (c0 & cr0::EM != 0, c0 & cr0::TS != 0);
        match class {
            Class::X87 if ins.mnemonic() == Mnemonic::Wait => {
                if ts && c0 & cr0::MP != 0 {
                    return Err(Fault::Exception(NM, None));
                }
            }
            Class::X87 | Class::Fxsr => {
                if em || ts {
                    return Err(Fault::Exception(NM, None));
                }
            }
            Class::Mmx => {
                if em {
                    return Err(Fault::Exception(vector::UD, None));
                }
                if ts {
                    return Err(Fault::Exception(NM, None));
                }
            }
            Class::Sse => {
                if em || self.cpu.cr4 & cr4::OSFXSR == 0 {
                    return Err(Fault::Exception(vector::UD, None));
                }
                if ts {
                    return Err(Fault::Exception(NM, None));
                }
            }
            Class::Hint => return self.hint(ins, io).map(|()| Some(FpStep::Done)),
        }
        let waiting = match class {
            Class::X87 => !matches!(
                ins.mnemonic(),
                Mnemonic::Fneni
                    | Mnemonic::Fndisi
                    | Mnemonic::Fnsetpm
                    | Mnemonic::Fninit
                    | Mnemonic::Fnclex
                    | Mnemonic::Fnstsw
                    | Mnemonic::Fnstcw
                    | Mnemonic::Fnstenv
                    | Mnemonic::Fnsave
            ),
            _ => touches_mmx(ins),
        };
        let mut ignore_pending = false;
        if waiting && x87_pending(&self.cpu.fx) {
            if self.cpu.cr0 & cr0::NE != 0 {
                return Err(Fault::Exception(MF, None));
            }
            if !self.fpu.ignne {
                // The P6 asserts FERR# at the next waiting instruction and waits there.
                self.fpu.ferr = true;
                return Ok(Some(FpStep::Freeze));
            }
            ignore_pending = true;
        }
        self.fp_execute(ins, class, ignore_pending, io)?;
        if !x87_pending(&self.cpu.fx) {
            self.fpu.ferr = false;
        }
        Ok(Some(FpStep::Done))
    }

    fn fp_execute(
        &mut self,
        ins: &Instruction,
        class: Class,
        ignore_pending: bool,
        io: &mut dyn IoHandler,
    ) -> Step {
        use Mnemonic as M;
        match ins.mnemonic() {
            // FNENI and FNDISI (8087 interrupt control) do nothing on later FPUs, not even
            // record themselves as the last instruction (as the host CPU shows); FNSETPM (the
            // 80287's protected-mode switch) is ignored from the 387 on (SDM vol. 1, 8.3.11 and
            // appendix "x87 FPU compatibility").
            M::Wait | M::Fneni | M::Fndisi | M::Fnsetpm => {}
            M::Fninit | M::Finit => init_x87(&mut self.cpu.fx),
            M::Fnclex | M::Fclex => {
                let fsw = rd16(&self.cpu.fx, fx::FSW) & !(FSW_FLAGS | FSW_SF | FSW_ES | FSW_B);
                wr16(&mut self.cpu.fx, fx::FSW, fsw);
            }
            M::Fnstsw | M::Fstsw => {
                let fsw = rd16(&self.cpu.fx, fx::FSW);
                self.write_op(ins, 0, u32::from(fsw), io)?;
            }
            M::Fnstcw | M::Fstcw => {
                let fcw = rd16(&self.cpu.fx, fx::FCW);
                self.write_op(ins, 0, u32::from(fcw), io)?;
            }
            M::Fldcw => {
                let v = self.read_op(ins, 0, io)? as u16;
                wr16(&mut self.cpu.fx, fx::FCW, load_fcw(v));
                summarise(&mut self.cpu.fx);
            }
            M::Fnstenv | M::Fstenv | M::Fnsave | M::Fsave => self.store_env(ins, io)?,
            M::Fldenv | M::Frstor => self.load_env(ins, io)?,
            M::Fxsave => self.fxsave(ins, io)?,
            M::Fxrstor => self.fxrstor(ins, io)?,
            M::Stmxcsr => {
                let v = rd32(&self.cpu.fx, fx::MXCSR);
                self.write_fp_mem(ins, &v.to_le_bytes(), io)?;
            }
            M::Ldmxcsr => {
                let mut b = [0u8; 4];
                self.read_fp_mem(ins, &mut b, io)?;
                let v = u32::from_le_bytes(b);
                if v & !MXCSR_MASK != 0 {
                    return gp0();
                }
                wr32(&mut self.cpu.fx, fx::MXCSR, v);
            }
            M::Maskmovq | M::Maskmovdqu => self.mask_move(ins, io)?,
            _ => self.host_execute(ins, class, ignore_pending, io)?,
        }
        Ok(())
    }

    /// PREFETCHh, the fences, CLFLUSH and MOVNTI: ordering and cache hints that only need their
    /// memory checks (the interpreter's memory is always coherent and ordered).
    fn hint(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        match ins.mnemonic() {
            Mnemonic::Clflush => {
                let (s, off) = self.address(ins);
                let lin = self.linear(s, off, 1)?;
                self.translate(lin, false, self.user_access())?;
            }
            Mnemonic::Movnti => {
                let v = self.read_op(ins, 1, io)?;
                self.write_op(ins, 0, v, io)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The linear address of the memory operand for an access of `len` bytes, after the segment
    /// check and, for `align`, the alignment check (#GP(0) when misaligned).
    fn fp_linear(&self, ins: &Instruction, len: usize, align: u32) -> Step<u32> {
        let (s, off) = self.address(ins);
        let lin = self.linear(s, off, len as u32)?;
        if align > 1 && lin % align != 0 {
            return gp0();
        }
        Ok(lin)
    }

    fn read_fp_mem(&self, ins: &Instruction, buf: &mut [u8], io: &mut dyn IoHandler) -> Step {
        let lin = self.fp_linear(ins, buf.len(), 1)?;
        self.read_lin(lin, buf, self.user_access(), io)
    }

    fn write_fp_mem(&self, ins: &Instruction, data: &[u8], io: &mut dyn IoHandler) -> Step {
        let lin = self.fp_linear(ins, data.len(), 1)?;
        self.write_lin(lin, data, self.user_access(), io)
    }

    /// Whether the environment formats are the real-mode ones (real and virtual-8086 mode).
    fn real_format(&self) -> bool {
        !self.cpu.protected() || self.cpu.eflags & flags::VM != 0
    }

    /// FNSTENV/FSTENV (14 or 28 bytes, then every exception masked) and FNSAVE/FSAVE (94 or 108
    /// bytes, then FNINIT), in the protected- or real-mode layout (Intel SDM vol. 1, 8.1.10).
    fn store_env(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        let img = &self.cpu.fx;
        let wide = matches!(
            ins.memory_size(),
            MemorySize::FpuEnv28 | MemorySize::FpuState108
        );
        let save = matches!(ins.mnemonic(), Mnemonic::Fnsave | Mnemonic::Fsave);
        let (fcw, fsw, ftw) = (rd16(img, fx::FCW), rd16(img, fx::FSW), full_tag_word(img));
        let fop = u32::from(rd16(img, fx::FOP) & 0x7FF);
        let (fip, fcs) = (rd32(img, fx::FIP), u32::from(rd16(img, fx::FCS)));
        let (fdp, fds) = (rd32(img, fx::FDP), u32::from(rd16(img, fx::FDS)));
        let mut out = Vec::with_capacity(108);
        if self.real_format() {
            let ip = (fcs << 4).wrapping_add(fip);
            let dp = (fds << 4).wrapping_add(fdp);
            if wide {
                for v in [
                    u32::from(fcw) | 0xFFFF_0000,
                    u32::from(fsw) | 0xFFFF_0000,
                    u32::from(ftw) | 0xFFFF_0000,
                    (ip & 0xFFFF) | 0xFFFF_0000,
                    ((ip >> 16) << 12) | fop,
                    (dp & 0xFFFF) | 0xFFFF_0000,
                    (dp >> 16) << 12,
                ] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            } else {
                for v in [
                    fcw,
                    fsw,
                    ftw,
                    ip as u16,
                    (((ip >> 16) << 12) | fop) as u16,
                    dp as u16,
                    ((dp >> 16) << 12) as u16,
                ] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        } else if wide {
            for v in [
                u32::from(fcw) | 0xFFFF_0000,
                u32::from(fsw) | 0xFFFF_0000,
                u32::from(ftw) | 0xFFFF_0000,
                fip,
                fcs | (fop << 16),
                fdp,
                fds | 0xFFFF_0000,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        } else {
            for v in [
                fcw, fsw, ftw, fip as u16, fcs as u16, fdp as u16, fds as u16,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        if save {
            for i in 0..8 {
                let slot = fx::ST0 + 16 * i;
                out.extend_from_slice(&img.0[slot..slot + 10]);
            }
        }
        self.write_fp_mem(ins, &out, io)?;
        if save {
            init_x87(&mut self.cpu.fx);
        } else {
            let fcw = rd16(&self.cpu.fx, fx::FCW) | 0x3F;
            wr16(&mut self.cpu.fx, fx::FCW, fcw);
            summarise(&mut self.cpu.fx);
        }
        Ok(())
    }

    /// FLDENV and FRSTOR: the inverse of [`Interp::store_env`]. Tags are recomputed from the
    /// registers (only "empty" is kept from the stored tag word).
    fn load_env(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        let wide = matches!(
            ins.memory_size(),
            MemorySize::FpuEnv28 | MemorySize::FpuState108
        );
        let restore = ins.mnemonic() == Mnemonic::Frstor;
        let env = if wide { 28 } else { 14 };
        let mut buf = vec![0u8; env + if restore { 80 } else { 0 }];
        self.read_fp_mem(ins, &mut buf, io)?;
        let field = |i: usize| -> u32 {
            if wide {
                u32::from_le_bytes(buf[4 * i..4 * i + 4].try_into().expect("4 bytes"))
            } else {
                u32::from(u16::from_le_bytes([buf[2 * i], buf[2 * i + 1]]))
            }
        };
        let mut img = self.cpu.fx.clone();
        wr16(&mut img, fx::FCW, load_fcw(field(0) as u16));
        set_fsw(&mut img, field(1) as u16);
        let (fip, fcs, fop, fdp, fds);
        if self.real_format() {
            // Linear pointers: offset 15..0 in one field, 31..16 at bit 12 of the next.
            fip = (field(3) & 0xFFFF) | ((field(4) >> 12) << 16);
            fop = field(4) & 0x7FF;
            fdp = (field(5) & 0xFFFF) | ((field(6) >> 12) << 16);
            (fcs, fds) = (0, 0);
        } else if wide {
            fip = field(3);
            fcs = field(4) & 0xFFFF;
            fop = (field(4) >> 16) & 0x7FF;
            fdp = field(5);
            fds = field(6) & 0xFFFF;
        } else {
            (fip, fcs, fdp, fds, fop) = (field(3), field(4), field(5), field(6), 0);
        }
        wr16(&mut img, fx::FOP, fop as u16);
        wr32(&mut img, fx::FIP, fip);
        wr32(&mut img, fx::FCS, fcs);
        wr32(&mut img, fx::FDP, fdp);
        wr32(&mut img, fx::FDS, fds);
        if restore {
            for i in 0..8 {
                let slot = fx::ST0 + 16 * i;
                img.0[slot..slot + 10].copy_from_slice(&buf[env + 10 * i..env + 10 * i + 10]);
                img.0[slot + 10..slot + 16].fill(0);
            }
        }
        img.0[fx::FTW] = abridged(field(2) as u16);
        summarise(&mut img);
        self.cpu.fx = img;
        Ok(())
    }

    /// FXSAVE: the image as a 32-bit FXSAVE stores it (the bytes this format defines; the
    /// reserved rest of the 512-byte area is checked for access but left alone).
    fn fxsave(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        let lin = self.fp_linear(ins, 512, 16)?;
        let user = self.user_access();
        for (l, _) in Self::page_pieces(lin, 512) {
            self.translate(l, true, user)?;
        }
        let mut img = self.cpu.fx.clone();
        wr32(&mut img, fx::MXCSR_MASK, MXCSR_MASK);
        self.write_lin(lin, &img.0[..fx::DEFINED_END], user, io)
    }

    /// FXRSTOR: #GP(0) if the stored MXCSR sets a bit this CPU does not support.
    fn fxrstor(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        let lin = self.fp_linear(ins, 512, 16)?;
        let mut buf = [0u8; 512];
        self.read_lin(lin, &mut buf, self.user_access(), io)?;
        let mut img = FxImage::default();
        img.0[..fx::DEFINED_END].copy_from_slice(&buf[..fx::DEFINED_END]);
        if rd32(&img, fx::MXCSR) & !MXCSR_MASK != 0 {
            return gp0();
        }
        let fcw = load_fcw(rd16(&img, fx::FCW));
        wr16(&mut img, fx::FCW, fcw);
        wr32(&mut img, fx::MXCSR_MASK, MXCSR_MASK);
        img.0[5] = 0;
        let fop = rd16(&img, fx::FOP) & 0x7FF;
        wr16(&mut img, fx::FOP, fop);
        wr16(&mut img, fx::FCS + 2, 0);
        wr16(&mut img, fx::FDS + 2, 0);
        for i in 0..8 {
            let slot = fx::ST0 + 16 * i;
            img.0[slot + 10..slot + 16].fill(0);
        }
        summarise(&mut img);
        self.cpu.fx = img;
        Ok(())
    }

    /// The MMX state change every MMX instruction but EMMS makes: TOP = 0 (the FXSAVE slots,
    /// which are in stack order, rotate with it) and every tag valid.
    fn enter_mmx(img: &mut FxImage) {
        let fsw = rd16(img, fx::FSW);
        set_fsw(img, fsw & !(7 << 11));
        img.0[fx::FTW] = 0xFF;
    }

    /// MASKMOVQ and MASKMOVDQU: the bytes of the first register whose mask byte (in the second)
    /// has its top bit set go to DS:EDI (segment overridable).
    fn mask_move(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        let mut img = self.cpu.fx.clone();
        let regs: Vec<usize> = (0..ins.op_count())
            .filter(|&i| ins.op_kind(i) == OpKind::Register)
            .map(|i| ins.op_register(i).number())
            .collect();
        let [src, sel] = regs[..] else {
            return Err(Fault::Unsupported(format!("the operands of '{ins}'")));
        };
        let (data, mask): (Vec<u8>, Vec<u8>) = if ins.mnemonic() == Mnemonic::Maskmovq {
            Self::enter_mmx(&mut img);
            // With TOP = 0, MMn is in slot n.
            let reg = |n: usize| img.0[fx::ST0 + 16 * n..fx::ST0 + 16 * n + 8].to_vec();
            (reg(src), reg(sel))
        } else {
            let reg = |n: usize| img.0[fx::XMM0 + 16 * n..fx::XMM0 + 16 * n + 16].to_vec();
            (reg(src), reg(sel))
        };
        let seg = super::seg_of(ins.memory_segment());
        let mut di = self.cpu.gpr[7];
        if ins.op0_kind() == OpKind::MemorySegDI || ins.memory_base().is_gpr16() {
            di &= 0xFFFF;
        }
        let lin = self.linear(seg, di, data.len() as u32)?;
        let user = self.user_access();
        for (l, _) in Self::page_pieces(lin, data.len()) {
            self.translate(l, true, user)?;
        }
        for (i, (b, m)) in data.iter().zip(&mask).enumerate() {
            if m & 0x80 != 0 {
                self.write_lin(lin.wrapping_add(i as u32), &[*b], user, io)?;
            }
        }
        self.cpu.fx = img;
        Ok(())
    }

    /// Runs `ins` on the host FPU: reads its memory operand, executes on a copy of the image,
    /// judges SIMD exceptions, writes the memory operand, and only then commits the new state.
    fn host_execute(
        &mut self,
        ins: &Instruction,
        class: Class,
        ignore_pending: bool,
        io: &mut dyn IoHandler,
    ) -> Step {
        let mut ops = HostOperands {
            gpr: self.cpu.gpr,
            eflags: self.cpu.eflags,
            ..HostOperands::default()
        };
        let has_mem = (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory);
        let mut store = None;
        if has_mem {
            let size = ins.memory_size().size();
            if size == 0 || size > ops.mem.len() {
                return Err(Fault::Unsupported(format!("the memory operand of '{ins}'")));
            }
            let unaligned_ok = matches!(
                ins.mnemonic(),
                Mnemonic::Movups | Mnemonic::Movupd | Mnemonic::Movdqu
            );
            let align = if size == 16 && class == Class::Sse && !unaligned_ok {
                16
            } else {
                1
            };
            let lin = self.fp_linear(ins, size, align)?;
            let access = self
                .fpu
                .info
                .info(ins)
                .used_memory()
                .first()
                .map(|m| m.access());
            use iced_x86::OpAccess as A;
            if matches!(access, Some(A::Read | A::ReadWrite | A::CondRead)) {
                self.read_lin(lin, &mut ops.mem[..size], self.user_access(), io)?;
            }
            if matches!(access, Some(A::Write | A::ReadWrite | A::CondWrite)) {
                store = Some((lin, size));
            }
        }
        let before = self.cpu.fx.clone();
        let mut img = before.clone();
        let inputs = ops.clone();
        let old_fsw = rd16(&img, fx::FSW);
        if ignore_pending {
            // IGNNE#: run as if nothing were pending; the old flags stay (they are sticky).
            wr16(
                &mut img,
                fx::FSW,
                old_fsw & !(FSW_FLAGS | FSW_SF | FSW_ES | FSW_B),
            );
        }
        let guest_mxcsr = rd32(&img, fx::MXCSR);
        if class == Class::Sse {
            wr32(&mut img, fx::MXCSR, guest_mxcsr & !MX_FLAGS);
        }
        let host = match self.fpu.host.as_mut() {
            Some(h) => h,
            None => {
                let h = HostFpu::new().map_err(|e| Fault::Unsupported(e.to_string()))?;
                self.fpu.host.insert(h)
            }
        };
        host.execute(ins, &mut img, &mut ops)
            .map_err(|e| Fault::Unsupported(e.to_string()))?;
        self.fpu.executed += 1;
        if ignore_pending {
            let fsw = rd16(&img, fx::FSW) | (old_fsw & (FSW_FLAGS | FSW_SF));
            wr16(&mut img, fx::FSW, fsw);
            summarise(&mut img);
        }
        if class == Class::Sse {
            let mut raised = rd32(&img, fx::MXCSR) & MX_FLAGS;
            let masks = guest_mxcsr >> 7;
            if guest_mxcsr & MX_UM == 0 && raised & MX_UE == 0 && raised & !masks & MX_PRE == 0 {
                // Masked underflow is reported only for a tiny *and* inexact result, unmasked
                // underflow for any tiny one. Flush-to-zero reports every tiny result, so a
                // second run with FZ tells whether an exact result was tiny.
                let mut probe = before.clone();
                wr32(&mut probe, fx::MXCSR, (guest_mxcsr & !MX_FLAGS) | MX_FZ);
                let mut probe_ops = inputs.clone();
                let host = self.fpu.host.as_mut().expect("created above");
                host.execute(ins, &mut probe, &mut probe_ops)
                    .map_err(|e| Fault::Unsupported(e.to_string()))?;
                raised |= rd32(&probe, fx::MXCSR) & MX_UE;
            }
            let unmasked = raised & !masks & MX_FLAGS;
            if unmasked != 0 {
                // An unmasked pre-computation exception stops the computation before the
                // post-computation ones are looked for. Nothing but the flags changes.
                //
                // With overflow or underflow unmasked the CPU sets PE only if the result,
                // rounded with an unbounded exponent, is inexact; the masked run reports PE
                // for its overflowed or denormalized result instead. For the double-to-single
                // conversions that inexactness is exact arithmetic on the source's bits; for
                // other operations PE can still be one too many (documented approximation).
                let mut set = if unmasked & MX_PRE != 0 {
                    raised & MX_PRE
                } else {
                    raised
                };
                if unmasked & MX_PRE == 0
                    && let Some(inexact) = narrowing_inexact(ins, &before, &inputs)
                {
                    set = (set & !MX_PE) | if inexact { MX_PE } else { 0 };
                }
                wr32(&mut self.cpu.fx, fx::MXCSR, guest_mxcsr | set);
                if touches_mmx(ins) {
                    // The switch to MMX state has already happened (as on the host CPU).
                    Self::enter_mmx(&mut self.cpu.fx);
                }
                return Err(Fault::Exception(
                    if self.cpu.cr4 & cr4::OSXMMEXCPT != 0 {
                        XM
                    } else {
                        vector::UD
                    },
                    None,
                ));
            }
            wr32(&mut img, fx::MXCSR, guest_mxcsr | raised);
        }
        wr32(&mut img, fx::MXCSR_MASK, MXCSR_MASK);
        if class == Class::X87 {
            self.x87_pointers(ins, &mut img, &before, io)?;
        } else {
            img.0[fx::FOP..fx::MXCSR].copy_from_slice(&before.0[fx::FOP..fx::MXCSR]);
        }
        if let Some((lin, size)) = store {
            // An x87 store that raised an unmasked invalid, denormal, zero-divide, overflow or
            // underflow exception does not write its destination (precision does).
            let fcw = rd16(&img, fx::FCW);
            let suppressed =
                class == Class::X87 && rd16(&img, fx::FSW) & !fcw & 0x1F & !old_fsw != 0;
            if !suppressed {
                self.write_lin(lin, &ops.mem[..size], self.user_access(), io)?;
            }
        }
        self.cpu.fx = img;
        self.cpu.gpr = ops.gpr;
        let modified = eflags_of(ins.rflags_modified());
        if modified != 0 {
            self.cpu.eflags = (self.cpu.eflags & !modified) | (ops.eflags & modified);
        }
        Ok(())
    }

    /// Records `ins` as the last x87 instruction: FIP/FCS (the instruction, prefixes included),
    /// FOP (the low three bits of the opcode byte and the ModR/M byte) and, for a memory operand,
    /// FDP/FDS.
    fn x87_pointers(
        &self,
        ins: &Instruction,
        img: &mut FxImage,
        before: &FxImage,
        io: &mut dyn IoHandler,
    ) -> Step {
        let cs = self.cpu.seg(SegReg::Cs);
        let mut bytes = [0u8; 15];
        let len = ins.len().min(15);
        self.read_lin_unwatched(
            cs.base.wrapping_add(ins.ip32()),
            &mut bytes[..len],
            self.user_access(),
            io,
        )?;
        let at = bytes[..len]
            .iter()
            .position(|b| (0xD8..=0xDF).contains(b))
            .unwrap_or(0);
        let fop = (u16::from(bytes[at] & 7) << 8) | u16::from(bytes[(at + 1).min(14)]);
        wr16(img, fx::FOP, fop);
        wr32(img, fx::FIP, ins.ip32());
        wr32(img, fx::FCS, u32::from(cs.selector));
        if (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory) {
            let (s, off) = self.address(ins);
            wr32(img, fx::FDP, off);
            wr32(img, fx::FDS, u32::from(self.cpu.seg(s).selector));
        } else {
            // The data pointer keeps the last memory operand's address.
            img.0[fx::FDP..fx::MXCSR].copy_from_slice(&before.0[fx::FDP..fx::MXCSR]);
        }
        Ok(())
    }
}

/// For CVTSD2SS and CVTPD2PS: whether rounding the source doubles to a single's 24-bit
/// significand with an unbounded exponent is inexact (any lane), which is when the CPU reports
/// PE alongside an unmasked overflow or underflow. None for other instructions.
fn narrowing_inexact(ins: &Instruction, before: &FxImage, inputs: &HostOperands) -> Option<bool> {
    let lanes = match ins.code() {
        iced_x86::Code::Cvtsd2ss_xmm_xmmm64 => 1,
        iced_x86::Code::Cvtpd2ps_xmm_xmmm128 => 2,
        _ => return None,
    };
    let source: Vec<u8> = if ins.op1_kind() == OpKind::Memory {
        inputs.mem[..8 * lanes].to_vec()
    } else {
        let n = ins.op1_register().number();
        before.0[fx::XMM0 + 16 * n..fx::XMM0 + 16 * n + 8 * lanes].to_vec()
    };
    Some(source.chunks_exact(8).any(|lane| {
        let bits = u64::from_le_bytes(lane.try_into().expect("8 bytes"));
        let exponent = (bits >> 52) & 0x7FF;
        let fraction = bits & ((1 << 52) - 1);
        let significand = match exponent {
            0x7FF => return false,
            0 => fraction,
            _ => fraction | (1 << 52),
        };
        if significand == 0 {
            return false;
        }
        // Keep the 24 bits from the leading one; anything below them is lost.
        let top = 63 - significand.leading_zeros();
        top >= 24 && significand & ((1u64 << (top - 23)) - 1) != 0
    }))
}
