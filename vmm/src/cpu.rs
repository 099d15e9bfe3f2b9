//! The architectural state of the guest CPU (a P6-class IA-32 processor), as the interpreter and
//! (later) the translator's callouts see it.

/// EFLAGS bits.
pub mod flags {
    /// Carry.
    pub const CF: u32 = 1 << 0;
    /// Reserved, always 1.
    pub const FIXED: u32 = 1 << 1;
    /// Parity (of the low byte of a result).
    pub const PF: u32 = 1 << 2;
    /// Auxiliary carry (out of bit 3).
    pub const AF: u32 = 1 << 4;
    /// Zero.
    pub const ZF: u32 = 1 << 6;
    /// Sign.
    pub const SF: u32 = 1 << 7;
    /// Trap (single step).
    pub const TF: u32 = 1 << 8;
    /// Interrupt enable.
    pub const IF: u32 = 1 << 9;
    /// Direction.
    pub const DF: u32 = 1 << 10;
    /// Overflow.
    pub const OF: u32 = 1 << 11;
    /// I/O privilege level (2 bits).
    pub const IOPL: u32 = 3 << 12;
    /// Nested task.
    pub const NT: u32 = 1 << 14;
    /// Resume.
    pub const RF: u32 = 1 << 16;
    /// Virtual-8086 mode.
    pub const VM: u32 = 1 << 17;
    /// Alignment check.
    pub const AC: u32 = 1 << 18;
    /// Virtual interrupt flag.
    pub const VIF: u32 = 1 << 19;
    /// Virtual interrupt pending.
    pub const VIP: u32 = 1 << 20;
    /// CPUID available (writable).
    pub const ID: u32 = 1 << 21;
    /// The arithmetic flags.
    pub const ARITH: u32 = CF | PF | AF | ZF | SF | OF;
    /// Bits software can change on a P6 (the rest read as fixed values).
    pub const WRITABLE: u32 = ARITH | TF | IF | DF | IOPL | NT | RF | VM | AC | VIF | VIP | ID;
}

/// CR0 bits.
pub mod cr0 {
    /// Protection enable.
    pub const PE: u32 = 1 << 0;
    /// Monitor coprocessor: WAIT/FWAIT honours TS.
    pub const MP: u32 = 1 << 1;
    /// Emulation: x87 instructions raise #NM, MMX and SSE ones #UD.
    pub const EM: u32 = 1 << 2;
    /// Numeric error: x87 errors are #MF (1) or the FERR# pin, IRQ 13 on a PC (0).
    pub const NE: u32 = 1 << 5;
    /// Extension type (hard-wired to 1 on a P6).
    pub const ET: u32 = 1 << 4;
    /// Task switched.
    pub const TS: u32 = 1 << 3;
    /// Write protect: supervisor writes honour read-only pages.
    pub const WP: u32 = 1 << 16;
    /// Alignment mask: with EFLAGS.AC, misaligned accesses at CPL 3 raise #AC.
    pub const AM: u32 = 1 << 18;
    /// Paging.
    pub const PG: u32 = 1 << 31;
}

/// CR4 bits.
pub mod cr4 {
    /// Time-stamp disable: RDTSC is privileged.
    pub const TSD: u32 = 1 << 2;
    /// Debugging extensions: I/O breakpoints, DR4/DR5 no longer alias DR6/DR7.
    pub const DE: u32 = 1 << 3;
    /// Page size extensions: 4 MiB pages.
    pub const PSE: u32 = 1 << 4;
    /// Physical address extension.
    pub const PAE: u32 = 1 << 5;
    /// Page global enable.
    pub const PGE: u32 = 1 << 7;
    /// Performance-monitoring counter enable: RDPMC works at every privilege level.
    pub const PCE: u32 = 1 << 8;
    /// The OS saves SSE state with FXSAVE: SSE instructions are allowed.
    pub const OSFXSR: u32 = 1 << 9;
    /// The OS handles #XM: unmasked SIMD floating-point exceptions are #XM, not #UD.
    pub const OSXMMEXCPT: u32 = 1 << 10;
    /// The bits this CPU model implements; setting any other is #GP.
    pub const SUPPORTED: u32 = TSD | DE | PSE | PAE | PGE | PCE | OSFXSR | OSXMMEXCPT;
}

/// Index of a segment register in [`CpuState::seg`], in encoding order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum SegReg {
    /// ES.
    Es = 0,
    /// CS.
    Cs = 1,
    /// SS.
    Ss = 2,
    /// DS.
    Ds = 3,
    /// FS.
    Fs = 4,
    /// GS.
    Gs = 5,
}

impl SegReg {
    /// Every segment register, in encoding order.
    pub const ALL: [SegReg; 6] = [
        SegReg::Es,
        SegReg::Cs,
        SegReg::Ss,
        SegReg::Ds,
        SegReg::Fs,
        SegReg::Gs,
    ];
}

/// A segment register: the visible selector and the hidden descriptor cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    /// Visible selector.
    pub selector: u16,
    /// Base address.
    pub base: u32,
    /// Limit in bytes (already scaled by G).
    pub limit: u32,
    /// Access byte: type (bits 0–3), S (4), DPL (5–6), P (7).
    pub access: u8,
    /// D/B: 32-bit default operand size (code) or stack pointer size (stack).
    pub big: bool,
}

impl Segment {
    /// A real-mode segment for `selector` (base = selector × 16, 64 KiB limit), as loaded by a
    /// real-mode segment load. `access` is kept from before, as on real hardware.
    pub fn real(selector: u16, access: u8) -> Self {
        Self {
            selector,
            base: u32::from(selector) << 4,
            limit: 0xFFFF,
            access,
            big: false,
        }
    }

    /// A flat 4 GiB, base-0, 32-bit segment with `access` (0x9B code, 0x93 data at DPL 0).
    pub fn flat(selector: u16, access: u8) -> Self {
        Self {
            selector,
            base: 0,
            limit: u32::MAX,
            access,
            big: true,
        }
    }

    /// Builds the cached form of an 8-byte descriptor loaded with `selector`.
    pub fn from_descriptor(selector: u16, d: u64) -> Self {
        let base = ((d >> 16) & 0xFF_FFFF) as u32 | (((d >> 56) & 0xFF) as u32) << 24;
        let raw_limit = (d & 0xFFFF) as u32 | (((d >> 48) & 0xF) as u32) << 16;
        let granular = d & (1 << 55) != 0;
        Self {
            selector,
            base,
            limit: if granular {
                (raw_limit << 12) | 0xFFF
            } else {
                raw_limit
            },
            access: ((d >> 40) & 0xFF) as u8,
            big: d & (1 << 54) != 0,
        }
    }

    /// Whether this is a code segment (S=1, type bit 3 set).
    pub fn is_code(&self) -> bool {
        self.access & 0x18 == 0x18
    }

    /// Descriptor privilege level.
    pub fn dpl(&self) -> u8 {
        (self.access >> 5) & 3
    }

    /// Whether the descriptor is present.
    pub fn present(&self) -> bool {
        self.access & 0x80 != 0
    }
}

pub use vmdriver::fpu::{FxImage, fx};

/// The MXCSR bits this CPU model implements (FXSAVE's MXCSR_MASK): flags, masks, rounding and
/// flush-to-zero. DAZ (bit 6) is not offered, as on the first SSE2 processors; setting it, or
/// any bit above 15, is #GP.
pub const MXCSR_MASK: u32 = 0xFFBF;

/// The x87/MMX/SSE state after RESET (Intel SDM vol. 3, table 9-1): FCW 0040H, FSW 0, every
/// register +0.0 with its tag "zero" (so the abridged tag byte says all are in use), MXCSR
/// 1F80H. FNINIT (and software after RESET) sets FCW 037FH and empties the stack.
pub fn fx_reset() -> FxImage {
    let mut img = FxImage::default();
    img.0[fx::FCW..fx::FCW + 2].copy_from_slice(&0x0040u16.to_le_bytes());
    img.0[fx::FTW] = 0xFF;
    img.0[fx::MXCSR..fx::MXCSR + 4].copy_from_slice(&0x1F80u32.to_le_bytes());
    img.0[fx::MXCSR_MASK..fx::MXCSR_MASK + 4].copy_from_slice(&MXCSR_MASK.to_le_bytes());
    img
}

/// A descriptor-table register (GDTR or IDTR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableReg {
    /// Linear base.
    pub base: u32,
    /// Limit (last valid byte offset).
    pub limit: u16,
}

/// The CPU's architectural state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuState {
    /// EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI.
    pub gpr: [u32; 8],
    /// Instruction pointer (offset in CS).
    pub eip: u32,
    /// EFLAGS.
    pub eflags: u32,
    /// ES, CS, SS, DS, FS, GS.
    pub seg: [Segment; 6],
    /// Global descriptor table register.
    pub gdtr: TableReg,
    /// Interrupt descriptor table register.
    pub idtr: TableReg,
    /// CR0.
    pub cr0: u32,
    /// CR2 (page-fault address).
    pub cr2: u32,
    /// CR3.
    pub cr3: u32,
    /// CR4.
    pub cr4: u32,
    /// LDTR: selector and cached LDT descriptor.
    pub ldtr: Segment,
    /// TR: selector and cached TSS descriptor.
    pub tr: Segment,
    /// DR0–DR7 (DR4/DR5 alias DR6/DR7).
    pub dr: [u32; 8],
    /// Model-specific registers the guest has written (see `interp::system` for which exist).
    pub msrs: std::collections::BTreeMap<u32, u64>,
    /// The x87, MMX and SSE/SSE2 registers, in FXSAVE layout (32-bit format). FIP/FCS, FDP/FDS
    /// and FOP always describe the last non-control x87 instruction as this CPU saw it.
    pub fx: FxImage,
}

impl CpuState {
    /// The state after RESET: real mode at F000:FFF0 with CS base FFFF0000, EDX = the P6 family
    /// signature, CR0 = CD|NW|ET, the
    /// x87/SSE state of [`fx_reset`].
    pub fn reset() -> Self {
        let data = Segment {
            access: 0x93,
            ..Segment::real(0, 0x93)
        };
        let mut seg = [data; 6];
        seg[SegReg::Cs as usize] = Segment {
            base: 0xFFFF_0000,
            access: 0x9B,
            ..Segment::real(0xF000, 0x9B)
        };
        let mut gpr = [0; 8];
        gpr[2] = 0x6D6; // the CPUID signature (family 6, model 13, stepping 6)
        Self {
            gpr,
            eip: 0xFFF0,
            eflags: flags::FIXED,
            seg,
            gdtr: TableReg::default(),
            idtr: TableReg {
                base: 0,
                limit: 0x3FF,
            },
            cr0: 0x6000_0010,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            ldtr: Segment {
                access: 0x82,
                limit: 0xFFFF,
                ..Segment::default()
            },
            tr: Segment {
                access: 0x8B,
                limit: 0xFFFF,
                ..Segment::default()
            },
            dr: [0, 0, 0, 0, 0, 0, 0xFFFF_0FF0, 0x400],
            msrs: std::collections::BTreeMap::new(),
            fx: fx_reset(),
        }
    }

    /// Whether the CPU is in protected mode.
    pub fn protected(&self) -> bool {
        self.cr0 & cr0::PE != 0
    }

    /// The current segment register `s`.
    pub fn seg(&self, s: SegReg) -> &Segment {
        &self.seg[s as usize]
    }

    /// EFLAGS.IOPL.
    pub fn iopl(&self) -> u8 {
        ((self.eflags & flags::IOPL) >> 12) as u8
    }

    /// Current privilege level (CS.RPL in protected mode).
    pub fn cpl(&self) -> u8 {
        if self.eflags & flags::VM != 0 {
            3
        } else if self.protected() {
            (self.seg(SegReg::Cs).selector & 3) as u8
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_descriptors_decode() {
        let code = Segment::from_descriptor(0x08, 0x00CF_9B00_0000_FFFF);
        assert_eq!(
            (code.base, code.limit, code.access, code.big),
            (0, 0xFFFF_FFFF, 0x9B, true)
        );
        let odd = Segment::from_descriptor(0x10, 0x12C0_9312_3456_0FFF);
        assert_eq!(odd.base, 0x1212_3456);
        assert_eq!(odd.limit, 0x00FF_FFFF);
        assert!(odd.present() && odd.big);
        let bytes = Segment::from_descriptor(0x18, 0x0000_9300_0000_1000);
        assert_eq!(bytes.limit, 0x1000, "byte granularity");
    }

    #[test]
    fn reset_state_is_the_p6_one() {
        let s = CpuState::reset();
        assert_eq!(s.seg(SegReg::Cs).base.wrapping_add(s.eip), 0xFFFF_FFF0);
        assert_eq!(s.gpr[2], 0x6D6);
        assert!(!s.protected());
        assert_eq!(s.cpl(), 0);
    }
}
