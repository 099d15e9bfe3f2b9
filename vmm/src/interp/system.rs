//! System instructions: descriptor-table and task registers, segment inspection, CR0's low word,
//! cache and TLB maintenance, CPUID, model-specific registers and the time-stamp counter.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};
use vmdriver::IoHandler;

use super::{Fault, Interp, Step, gp0, vector};
use crate::cpu::{SegReg, Segment, cr0, cr4, flags};

/// The time-stamp counter's rate: the guest's TSC counts the VM clock's nanoseconds (1 GHz).
pub const TSC_HZ: u64 = 1_000_000_000;

/// CPUID leaf 1 identity: a Pentium M (family 6, model 13 "Dothan", stepping 6). SSE2 arrived in
/// family 6 with the Pentium M, so this is the P6-family signature that goes with the SSE2 we
/// offer; guests that key errata or code paths on family 6 still see a P6.
const SIGNATURE: u32 = 0x0000_06D6;
/// CPUID.1:EDX bits for what this interpreter really implements: FPU, DE, PSE, TSC, MSR, PAE,
/// CX8, SEP, PGE, CMOV, CLFSH, MMX, FXSR, SSE, SSE2.
const FEATURES_EDX: u32 = 1
    | (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 8)
    | (1 << 11)
    | (1 << 13)
    | (1 << 15)
    | (1 << 19)
    | (1 << 23)
    | (1 << 24)
    | (1 << 25)
    | (1 << 26);
/// CPUID.1:EBX: CLFLUSH line size 8 × 8 = 64 bytes (bits 15-8), initial APIC ID 0 (bits 31-24).
const FEATURES_EBX: u32 = 8 << 8;
/// The highest basic leaf.
const MAX_LEAF: u32 = 2;

/// MSRs a P6 has, with their reset values. Reading or writing any other MSR is #GP(0), as on
/// the processor.
const MSRS: &[(u32, u64)] = &[
    (0x10, 0),           // IA32_TIME_STAMP_COUNTER (read through the TSC)
    (0x17, 0),           // IA32_PLATFORM_ID
    (0x1B, 0xFEE0_0900), // IA32_APIC_BASE: BSP, enabled, default base
    (0x2A, 0),           // EBL_CR_POWERON
    (0x79, 0),           // BIOS_UPDT_TRIG
    (0x8B, 0),           // BIOS_SIGN_ID
    (0xC1, 0),           // PERFCTR0
    (0xC2, 0),           // PERFCTR1
    (0xFE, 0x508),       // MTRRcap: 8 variable ranges, fixed ranges, write-combining
    (0x174, 0),          // SYSENTER_CS
    (0x175, 0),          // SYSENTER_ESP
    (0x176, 0),          // SYSENTER_EIP
    (0x179, 0),          // MCG_CAP
    (0x17A, 0),          // MCG_STATUS
    (0x186, 0),          // PERFEVTSEL0
    (0x187, 0),          // PERFEVTSEL1
    // IA32_MISC_ENABLE: fast strings on (bit 0, which Linux checks on a Dothan), branch trace
    // store and PEBS unavailable (bits 11, 12), performance monitoring not available (bit 7
    // clear: the counters above do not count). SDM vol. 4, the Pentium M's MSR table.
    (0x1A0, 0x1801),
    (0x1D9, 0),                     // DEBUGCTL
    (0x277, 0x0007_0406_0007_0406), // PAT
    (0x2FF, 0),                     // MTRRdefType
];

/// The width of the P6 performance counters PerfCtr0/1: 40 bits.
const PERFCTR_MASK: u64 = (1 << 40) - 1;

fn msr_exists(index: u32) -> bool {
    MSRS.iter().any(|(i, _)| *i == index)
        || (0x200..=0x20F).contains(&index) // variable-range MTRRs
        || matches!(index, 0x250 | 0x258 | 0x259)
        || (0x268..=0x26F).contains(&index) // fixed-range MTRRs
}

impl Interp {
    /// The guest's TSC now.
    pub(super) fn tsc(&self) -> u64 {
        let elapsed = self.clock.now_ns();
        let now = elapsed
            .wrapping_mul(TSC_HZ / 1_000_000_000)
            .wrapping_add(self.tsc_offset);
        let Some((replay, tape)) = &self.tsc_tape else {
            return now;
        };
        let mut tape = tape.lock().unwrap_or_else(|e| e.into_inner());
        if *replay {
            tape.pop_front().unwrap_or(now)
        } else {
            tape.push_back(now);
            now
        }
    }

    /// Loads a system segment register (LDTR or TR) from the GDT.
    fn load_system_segment(&mut self, ldt: bool, selector: u16, io: &mut dyn IoHandler) -> Step {
        if !self.cpu.protected() || self.cpu.eflags & flags::VM != 0 {
            return Err(Fault::Exception(vector::UD, None));
        }
        self.require_cpl0()?;
        let err = Some(u32::from(selector & !3));
        if selector & !3 == 0 {
            if ldt {
                self.cpu.ldtr = Segment {
                    selector,
                    ..self.cpu.ldtr
                };
                self.cpu.ldtr.access &= !0x80;
                return Ok(());
            }
            return gp0();
        }
        if selector & 4 != 0 {
            return Err(Fault::Exception(vector::GP, err));
        }
        let raw = self.descriptor(selector, io)?;
        let seg = Segment::from_descriptor(selector, raw);
        let ty = seg.access & 0x1F;
        let ok = if ldt {
            ty == 0x02
        } else {
            ty == 0x09 || ty == 0x01
        };
        if !ok {
            return Err(Fault::Exception(vector::GP, err));
        }
        if !seg.present() {
            return Err(Fault::Exception(vector::NP, err));
        }
        if ldt {
            self.cpu.ldtr = seg;
        } else {
            // LTR marks the TSS busy, in the descriptor and in the cache.
            let busy = raw | (1 << 41);
            let addr = self.cpu.gdtr.base.wrapping_add(u32::from(selector & !7));
            self.write_lin(
                addr.wrapping_add(4),
                &((busy >> 32) as u32).to_le_bytes(),
                false,
                io,
            )?;
            self.cpu.tr = Segment {
                access: seg.access | 0x02,
                ..seg
            };
        }
        Ok(())
    }

    /// LAR, LSL, VERR, VERW: inspect a selector's descriptor without faulting on it; ZF says
    /// whether it is valid and visible at the current privilege.
    fn inspect_segment(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        if !self.cpu.protected() || self.cpu.eflags & flags::VM != 0 {
            return Err(Fault::Exception(vector::UD, None));
        }
        let m = ins.mnemonic();
        let src = if matches!(m, Mnemonic::Verr | Mnemonic::Verw) {
            0
        } else {
            1
        };
        let selector = self.read_op(ins, src, io)? as u16;
        let found = if selector & !3 == 0 {
            None
        } else {
            match self.descriptor(selector, io) {
                Ok(d) => Some(d),
                Err(Fault::Exception(..)) => None,
                Err(f) => return Err(f),
            }
        };
        let verdict = found.and_then(|d| {
            let seg = Segment::from_descriptor(selector, d);
            let conforming_code = seg.is_code() && seg.access & 0x04 != 0;
            let rpl = (selector & 3) as u8;
            let visible = conforming_code || (seg.dpl() >= self.cpu.cpl() && seg.dpl() >= rpl);
            let system_type = seg.access & 0x1F;
            let ok = match m {
                Mnemonic::Lar => {
                    seg.access & 0x10 != 0
                        || matches!(system_type, 1 | 2 | 3 | 4 | 5 | 9 | 0xB | 0xC)
                }
                Mnemonic::Lsl => {
                    seg.access & 0x10 != 0 || matches!(system_type, 1 | 2 | 3 | 9 | 0xB)
                }
                Mnemonic::Verr => seg.access & 0x10 != 0 && (!seg.is_code() || seg.access & 2 != 0),
                _ => seg.access & 0x10 != 0 && !seg.is_code() && seg.access & 2 != 0,
            };
            (ok && (visible || (conforming_code && matches!(m, Mnemonic::Verr))))
                .then_some((d, seg))
        });
        match verdict {
            Some((d, seg)) => {
                self.cpu.eflags |= flags::ZF;
                match m {
                    Mnemonic::Lar => {
                        let mask = if ins.op0_register().is_gpr16() {
                            0xFF00
                        } else {
                            0x00F0_FF00
                        };
                        self.write_op(ins, 0, ((d >> 32) as u32) & mask, io)?;
                    }
                    Mnemonic::Lsl => self.write_op(ins, 0, seg.limit, io)?,
                    _ => {}
                }
            }
            None => self.cpu.eflags &= !flags::ZF,
        }
        Ok(())
    }

    /// Executes a system instruction, or returns false if `ins` is not one of this group.
    pub(super) fn system(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step<bool> {
        use Mnemonic as M;
        match ins.mnemonic() {
            M::Sgdt | M::Sidt => {
                if ins.op0_kind() != OpKind::Memory {
                    return Err(Fault::Exception(vector::UD, None));
                }
                let t = if ins.mnemonic() == M::Sgdt {
                    self.cpu.gdtr
                } else {
                    self.cpu.idtr
                };
                let (seg, off) = self.address(ins);
                self.linear(seg, off, 6)?;
                self.write_mem(seg, off, 2, u32::from(t.limit), io)?;
                // With a 16-bit operand size the P6 stores the base's top byte as zero.
                let base =
                    if self.cpu.seg(SegReg::Cs).big || ins.code().op_code().operand_size() == 32 {
                        t.base
                    } else {
                        t.base & 0x00FF_FFFF
                    };
                self.write_mem(seg, off.wrapping_add(2), 4, base, io)?;
            }
            M::Sldt | M::Str => {
                if !self.cpu.protected() || self.cpu.eflags & flags::VM != 0 {
                    return Err(Fault::Exception(vector::UD, None));
                }
                let sel = if ins.mnemonic() == M::Sldt {
                    self.cpu.ldtr.selector
                } else {
                    self.cpu.tr.selector
                };
                // To a 32-bit register the upper half is zeroed; to memory, 16 bits.
                self.write_op(ins, 0, u32::from(sel), io)?;
            }
            M::Lldt | M::Ltr => {
                let sel = self.read_op(ins, 0, io)? as u16;
                self.load_system_segment(ins.mnemonic() == M::Lldt, sel, io)?;
            }
            M::Smsw => {
                let v = if ins.op0_kind() == OpKind::Register && !ins.op0_register().is_gpr16() {
                    self.cpu.cr0
                } else {
                    self.cpu.cr0 & 0xFFFF
                };
                self.write_op(ins, 0, v, io)?;
            }
            M::Lmsw => {
                self.require_cpl0()?;
                let v = self.read_op(ins, 0, io)? & 0xF;
                // LMSW sets PE but never clears it, and touches only PE, MP, EM, TS.
                let pe = (self.cpu.cr0 | v) & cr0::PE;
                self.cpu.cr0 = (self.cpu.cr0 & !0xF) | (v & 0xE) | pe;
            }
            M::Clts => {
                self.require_cpl0()?;
                self.cpu.cr0 &= !cr0::TS;
            }
            M::Invd | M::Wbinvd => {
                // There are no caches to write back or discard.
                self.require_cpl0()?;
            }
            M::Invlpg => {
                self.require_cpl0()?;
                let (seg, off) = self.address(ins);
                self.invalidate_page(self.cpu.seg(seg).base.wrapping_add(off));
            }
            M::Lar | M::Lsl | M::Verr | M::Verw => self.inspect_segment(ins, io)?,
            M::Cpuid => {
                let leaf = self.cpu.gpr[0].min(MAX_LEAF);
                let (a, b, c, d) = match leaf {
                    0 => (MAX_LEAF, 0x756E_6547, 0x6C65_746E, 0x4965_6E69), // "GenuineIntel"
                    // EDX.APIC (bit 9) follows IA32_APIC_BASE's global enable, as on the CPU.
                    1 => {
                        let apic = io.msr_read(0x1B).is_some_and(|b| b & (1 << 11) != 0);
                        (
                            SIGNATURE,
                            FEATURES_EBX,
                            0,
                            FEATURES_EDX | (u32::from(apic) << 9),
                        )
                    }
                    _ => (0x0302_0101, 0, 0, 0x0C04_0843), // P6 cache descriptors
                };
                self.cpu.gpr[0] = a;
                self.cpu.gpr[3] = b;
                self.cpu.gpr[1] = c;
                self.cpu.gpr[2] = d;
            }
            M::Rdtsc => {
                if self.cpu.cr4 & (1 << 2) != 0 && self.cpu.cpl() != 0 {
                    return gp0();
                }
                let t = self.tsc();
                self.cpu.gpr[0] = t as u32;
                self.cpu.gpr[2] = (t >> 32) as u32;
            }
            M::Rdpmc => {
                // P6 family (SDM vol. 2, RDPMC): ECX selects PERFCTR0/1 (ECX[0]); other values
                // are #GP, and so is CPL > 0 without CR4.PCE. The counter is 40 bits wide. The
                // counters hold what the guest wrote (they do not count events).
                let index = self.cpu.gpr[1];
                if index > 1 || (self.cpu.cr4 & (1 << 8) == 0 && self.cpu.cpl() != 0) {
                    return gp0();
                }
                let v = self.msr(0xC1 + index) & 0xFF_FFFF_FFFF;
                self.cpu.gpr[0] = v as u32;
                self.cpu.gpr[2] = (v >> 32) as u32;
            }
            M::Rdmsr | M::Wrmsr => {
                self.require_cpl0()?;
                let index = self.cpu.gpr[1];
                // The platform's MSRs first (IA32_APIC_BASE belongs to the local APIC).
                if ins.mnemonic() == M::Rdmsr {
                    if let Some(v) = io.msr_read(index) {
                        self.cpu.gpr[0] = v as u32;
                        self.cpu.gpr[2] = (v >> 32) as u32;
                        return Ok(true);
                    }
                } else {
                    let v = (u64::from(self.cpu.gpr[2]) << 32) | u64::from(self.cpu.gpr[0]);
                    match io.msr_write(index, v) {
                        Some(true) => return Ok(true),
                        Some(false) => return gp0(),
                        None => {}
                    }
                }
                if !msr_exists(index) {
                    return gp0();
                }
                if ins.mnemonic() == M::Rdmsr {
                    let v = if index == 0x10 {
                        self.tsc()
                    } else {
                        self.cpu.msrs.get(&index).copied().unwrap_or_else(|| {
                            MSRS.iter()
                                .find(|(i, _)| *i == index)
                                .map_or(0, |(_, v)| *v)
                        })
                    };
                    self.cpu.gpr[0] = v as u32;
                    self.cpu.gpr[2] = (v >> 32) as u32;
                } else {
                    let v = (u64::from(self.cpu.gpr[2]) << 32) | u64::from(self.cpu.gpr[0]);
                    if index == 0x10 {
                        // Writes set the counter; P6 writes only the low 32 bits, zeroing the rest.
                        let now = self.tsc().wrapping_sub(self.tsc_offset);
                        self.tsc_offset = (v & 0xFFFF_FFFF).wrapping_sub(now);
                    } else if matches!(index, 0xC1 | 0xC2) {
                        // P6 performance counters take the low 32 bits, sign-extended to 40.
                        let v = i64::from(self.cpu.gpr[0] as i32) as u64 & PERFCTR_MASK;
                        self.cpu.msrs.insert(index, v);
                    } else {
                        self.cpu.msrs.insert(index, v);
                    }
                }
            }
            M::Mov if ins.op0_register().is_dr() || ins.op1_register().is_dr() => {
                self.require_cpl0()?;
                // General detect: the first MOV DR after DR7.GD is set is a #DB fault.
                if self.cpu.dr[7] & (1 << 13) != 0 {
                    self.cpu.dr[7] &= !(1 << 13);
                    self.cpu.dr[6] |= 1 << 13;
                    return Err(Fault::Exception(vector::DB, None));
                }
                let (dst, src) = (ins.op0_register(), ins.op1_register());
                let de = self.cpu.cr4 & cr4::DE != 0;
                let dr = if src.is_dr() { src } else { dst };
                if de && matches!(dr.number(), 4 | 5) {
                    return Err(Fault::Exception(vector::UD, None));
                }
                // DR4 and DR5 alias DR6 and DR7 while CR4.DE is clear.
                let index = |r: Register| {
                    let n = r.number();
                    if n == 4 || n == 5 { n + 2 } else { n }
                };
                if src.is_dr() {
                    let v = self.cpu.dr[index(src)];
                    self.set_reg(dst, v);
                } else {
                    let v = self.reg(src);
                    let n = index(dst);
                    self.cpu.dr[n] = match n {
                        6 => v | 0xFFFF_0FF0,
                        7 => (v | 0x400) & !0x2000,
                        _ => v,
                    };
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }
}
