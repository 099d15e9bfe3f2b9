//! Executes one guest x87, MMX, SSE or SSE2 instruction on the host's FPU, on the guest's FXSAVE
//! image: the interpreter's floating-point engine.
//!
//! The guest instruction is re-encoded for 64-bit mode (iced-x86) into a small *stub* that
//!
//! 1. saves the host's own x87/SSE state (`FXSAVE64`; Rust code uses SSE, so it must survive),
//! 2. loads the guest image (`FXRSTOR`, 32-bit format),
//! 3. loads the guest's general registers and arithmetic flags into host registers,
//! 4. runs the instruction, its memory operand (if any) redirected to a scratch buffer,
//! 5. stores the general registers and RFLAGS back, saves the guest image (`FXSAVE`) and restores
//!    the host's state (`FXRSTOR64`).
//!
//! The caller (the interpreter) does every guest memory access itself: it fills the scratch
//! buffer before and copies it out after, with the guest's segment, paging and alignment rules.
//! Guest general-register operands run in the host register of the same number, except ESP,
//! which runs in R10 (the host's RSP is the host's stack); R11 points at the [`StubContext`].
//!
//! The host never traps on the guest's behalf: FXSAVE/FXRSTOR do not check for pending x87
//! exceptions, so an unmasked x87 exception only leaves FSW.ES set in the saved image (the
//! caller never runs a waiting instruction while ES is set), and the caller runs SSE
//! instructions with every MXCSR exception masked and judges the flags they raise itself.
//!
//! Stubs are cached by instruction (one per distinct re-encoded instruction) in an executable
//! arena that is writable only while a stub is copied in (W^X).

use std::collections::HashMap;
use std::io;
use std::ptr;

use iced_x86::code_asm::*;
use iced_x86::{IcedError, Instruction, OpKind, Register};

/// A 512-byte FXSAVE area (the 32-bit format of the Intel SDM, vol. 1, table 10-2), 16-byte
/// aligned as FXSAVE/FXRSTOR require.
#[repr(C, align(16))]
#[derive(Clone, PartialEq, Eq)]
pub struct FxImage(pub [u8; 512]);

impl Default for FxImage {
    fn default() -> Self {
        Self([0; 512])
    }
}

impl std::fmt::Debug for FxImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = |o: usize| u16::from_le_bytes([self.0[o], self.0[o + 1]]);
        let d = |o: usize| u32::from_le_bytes(self.0[o..o + 4].try_into().expect("4 bytes"));
        write!(
            f,
            "FxImage {{ fcw: {:#06x}, fsw: {:#06x}, ftw: {:#04x}, fop: {:#06x}, fip: {:#010x}, \
             fdp: {:#010x}, mxcsr: {:#010x}, .. }}",
            w(0),
            w(2),
            self.0[4],
            w(6),
            d(8),
            d(16),
            d(24)
        )
    }
}

/// Offsets of the fields of an [`FxImage`].
pub mod fx {
    /// x87 control word (16 bits).
    pub const FCW: usize = 0;
    /// x87 status word (16 bits).
    pub const FSW: usize = 2;
    /// Abridged tag word: one bit per physical register, 1 = not empty (8 bits).
    pub const FTW: usize = 4;
    /// Last x87 opcode (11 bits).
    pub const FOP: usize = 6;
    /// Last x87 instruction pointer (offset, 32 bits).
    pub const FIP: usize = 8;
    /// Last x87 instruction's CS selector (16 bits).
    pub const FCS: usize = 12;
    /// Last x87 data pointer (offset, 32 bits).
    pub const FDP: usize = 16;
    /// Last x87 data pointer's segment selector (16 bits).
    pub const FDS: usize = 20;
    /// MXCSR (32 bits).
    pub const MXCSR: usize = 24;
    /// MXCSR_MASK: the MXCSR bits this CPU supports (32 bits).
    pub const MXCSR_MASK: usize = 28;
    /// ST0/MM0 (then ST1..ST7 every 16 bytes, in stack order).
    pub const ST0: usize = 32;
    /// XMM0 (then XMM1..XMM7 every 16 bytes).
    pub const XMM0: usize = 160;
    /// End of what a 32-bit FXSAVE defines (XMM8-15 and the rest are reserved in 32-bit mode).
    pub const DEFINED_END: usize = 288;
}

/// The general registers, flags and memory operand an instruction runs with (and leaves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostOperands {
    /// EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI.
    pub gpr: [u32; 8],
    /// EFLAGS: only the arithmetic flags go in (FCMOVcc reads them); all of RFLAGS comes out
    /// (FCOMI and COMISS write ZF, PF, CF).
    pub eflags: u32,
    /// The memory operand, at its start.
    pub mem: [u8; MEM_LEN],
}

impl Default for HostOperands {
    fn default() -> Self {
        Self {
            gpr: [0; 8],
            eflags: 0,
            mem: [0; MEM_LEN],
        }
    }
}

/// The largest memory operand a stub can take (an m128, or an m80 with room).
pub const MEM_LEN: usize = 64;

/// Why an instruction could not be run on the host FPU.
#[derive(Debug, thiserror::Error)]
pub enum FpuError {
    /// Mapping or protecting the stub arena failed.
    #[error("the host refused {what} for the FPU stub arena: {source}")]
    Host {
        /// Which call.
        what: &'static str,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// iced-x86 could not encode the instruction for 64-bit mode.
    #[error("cannot re-encode {instruction} for the host: {source}")]
    Encode {
        /// The instruction.
        instruction: String,
        /// iced-x86's reason.
        #[source]
        source: IcedError,
    },
    /// An operand the stubs cannot carry (e.g. an 8-bit register or a wider memory operand).
    #[error("the host FPU stubs cannot take the operands of {0}")]
    Operand(String),
    /// The image has an unmasked x87 exception pending and the instruction would signal it
    /// (the caller must deliver #MF or FERR first).
    #[error("{0} would signal the x87 exception pending in the image")]
    Pending(String),
}

/// MXCSR exception mask bits (IM, DM, ZM, OM, UM, PM).
const MXCSR_MASKS: u32 = 0x1F80;
/// MXCSR bits every SSE2 host accepts (DAZ, bit 6, is not on every one).
const MXCSR_SAFE: u32 = 0xFFBF;

/// Whether `ins` is an x87 instruction (opcodes D8-DF, or WAIT).
pub fn is_x87(ins: &Instruction) -> bool {
    let op = ins.code().op_code();
    // Two-byte forms (D9 E8 = FLD1) keep the first byte in the high half.
    let first = op.op_code() >> (8 * (op.op_code_len().max(1) - 1));
    ins.code() == iced_x86::Code::Wait
        || (op.encoding() == iced_x86::EncodingKind::Legacy
            && op.table() == iced_x86::OpCodeTableKind::Normal
            && (0xD8..=0xDF).contains(&first))
}

/// Whether `ins` reads or writes an MMX register (or is EMMS).
pub fn touches_mmx(ins: &Instruction) -> bool {
    ins.mnemonic() == iced_x86::Mnemonic::Emms
        || (0..ins.op_count()).any(|i| {
            ins.op_kind(i) == OpKind::Register
                && (Register::MM0..=Register::MM7).contains(&ins.op_register(i))
        })
}

/// Whether the x87 status in `image` has an unmasked exception pending (FSW.ES, or a flag
/// whose mask bit in FCW is clear).
pub fn x87_pending(image: &FxImage) -> bool {
    let fcw = u16::from_le_bytes([image.0[fx::FCW], image.0[fx::FCW + 1]]);
    let fsw = u16::from_le_bytes([image.0[fx::FSW], image.0[fx::FSW + 1]]);
    fsw & 0x80 != 0 || fsw & !fcw & 0x3F != 0
}

/// The no-wait x87 control instructions, which never signal a pending exception.
fn no_wait(ins: &Instruction) -> bool {
    use iced_x86::Mnemonic as M;
    matches!(
        ins.mnemonic(),
        M::Fninit | M::Fnclex | M::Fnstsw | M::Fnstcw | M::Fnstenv | M::Fnsave
    )
}

/// What a stub reads and writes, in the layout the stubs are assembled for.
#[repr(C, align(64))]
struct StubContext {
    guest: FxImage,
    host: FxImage,
    gpr: [u64; 8],
    rflags: u64,
    _pad: [u64; 7],
    mem: [u8; MEM_LEN],
}

const OFF_GUEST: i32 = 0;
const OFF_HOST: i32 = 512;
const OFF_GPR: i32 = 1024;
const OFF_RFLAGS: i32 = 1088;
const OFF_MEM: i32 = 1152;

const _: () = {
    assert!(std::mem::offset_of!(StubContext, guest) == OFF_GUEST as usize);
    assert!(std::mem::offset_of!(StubContext, host) == OFF_HOST as usize);
    assert!(std::mem::offset_of!(StubContext, gpr) == OFF_GPR as usize);
    assert!(std::mem::offset_of!(StubContext, rflags) == OFF_RFLAGS as usize);
    assert!(std::mem::offset_of!(StubContext, mem) == OFF_MEM as usize);
};

/// Bytes per stub slot in the arena.
const SLOT: usize = 256;
/// The arena's size: 4096 stubs; when it is full the cache starts over.
const ARENA: usize = 1 << 20;
const PAGE: usize = 4096;

/// The host FPU executor: the stub cache and its arena. One per interpreter (not shared between
/// threads: a page of the arena is briefly not executable while a stub is added).
pub struct HostFpu {
    arena: *mut u8,
    used: usize,
    stubs: HashMap<Instruction, usize>,
    ctx: Box<StubContext>,
}

impl std::fmt::Debug for HostFpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostFpu")
            .field("stubs", &self.stubs.len())
            .finish()
    }
}

impl HostFpu {
    /// Maps the stub arena.
    pub fn new() -> Result<Self, FpuError> {
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks; it aliases
        // no Rust object.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                ARENA,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(FpuError::Host {
                what: "mmap",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            arena: p.cast(),
            used: 0,
            stubs: HashMap::new(),
            ctx: Box::new(StubContext {
                guest: FxImage::default(),
                host: FxImage::default(),
                gpr: [0; 8],
                rflags: 0,
                _pad: [0; 7],
                mem: [0; MEM_LEN],
            }),
        })
    }

    /// Stubs cached so far.
    pub fn cached(&self) -> usize {
        self.stubs.len()
    }

    /// Runs `guest` (a decoded 32- or 16-bit instruction) on `image` with `ops`. Its memory
    /// operand, if any, is `ops.mem`; general-register operands are `ops.gpr`.
    pub fn execute(
        &mut self,
        guest: &Instruction,
        image: &mut FxImage,
        ops: &mut HostOperands,
    ) -> Result<(), FpuError> {
        if (is_x87(guest) || touches_mmx(guest)) && !no_wait(guest) && x87_pending(image) {
            return Err(FpuError::Pending(guest.to_string()));
        }
        let host = host_instruction(guest)?;
        let at = match self.stubs.get(&host) {
            Some(&at) => at,
            None => self.add_stub(&host, guest)?,
        };
        let ctx = &mut *self.ctx;
        ctx.guest.0.copy_from_slice(&image.0);
        // Every SIMD exception masked (the caller judges the raised flags against the guest's
        // masks) and only MXCSR bits any host takes: the stub can neither trap nor #GP.
        let mxcsr = read32(image, fx::MXCSR);
        write32(
            &mut ctx.guest,
            fx::MXCSR,
            (mxcsr & MXCSR_SAFE) | MXCSR_MASKS,
        );
        for (d, s) in ctx.gpr.iter_mut().zip(ops.gpr) {
            *d = u64::from(s);
        }
        // Arithmetic flags only: DF stays 0 (the C ABI), TF/AC stay 0; bit 1 and IF are fixed.
        ctx.rflags = u64::from(ops.eflags & 0x8D5) | 0x202;
        ctx.mem = ops.mem;
        // SAFETY: `at` is the start of a stub in the arena that `add_stub` assembled and made
        // executable (slots are never reused while cached). The stub follows the C ABI for
        // `extern "C" fn(*mut StubContext)`: it saves and restores RBX and RBP (the only
        // callee-saved registers it changes), leaves RSP balanced and DF clear, and restores
        // the host's x87/SSE state (control words included) from the FXSAVE64 it makes on
        // entry. It touches memory only inside `*ctx` (the memory operand is redirected to
        // `ctx.mem`, and the guest image/host save areas are 16-byte aligned fields of it),
        // and every exception its guest instruction can raise is masked: x87 exceptions are
        // deferred (FXSAVE does not check them, and an instruction that would signal one
        // pending in the image was refused above), every MXCSR exception is masked, and MXCSR
        // holds only bits every host accepts, so it can neither trap nor make FXRSTOR fault.
        unsafe {
            let f: extern "C" fn(*mut StubContext) =
                std::mem::transmute::<*mut u8, extern "C" fn(*mut StubContext)>(self.arena.add(at));
            f(ctx);
        }
        // What a 32-bit FXSAVE defines comes back; the rest (XMM8-15 in 64-bit mode, reserved
        // bytes) stays the caller's. MXCSR keeps the guest's masks and DAZ bit.
        image.0[..fx::DEFINED_END].copy_from_slice(&ctx.guest.0[..fx::DEFINED_END]);
        let after = read32(image, fx::MXCSR);
        let keep = MXCSR_MASKS | !MXCSR_SAFE;
        write32(image, fx::MXCSR, (after & !keep) | (mxcsr & keep));
        for (d, s) in ops.gpr.iter_mut().zip(ctx.gpr) {
            *d = s as u32;
        }
        ops.eflags = ctx.rflags as u32;
        ops.mem = ctx.mem;
        Ok(())
    }

    fn add_stub(&mut self, host: &Instruction, guest: &Instruction) -> Result<usize, FpuError> {
        let encode_err = |source| FpuError::Encode {
            instruction: guest.to_string(),
            source,
        };
        if self.used + SLOT > ARENA {
            self.stubs.clear();
            self.used = 0;
        }
        let at = self.used;
        let code = stub(host, self.arena as u64 + at as u64).map_err(encode_err)?;
        if code.len() > SLOT {
            return Err(FpuError::Operand(guest.to_string()));
        }
        let page = at & !(PAGE - 1);
        // SAFETY: `page` is a page of the arena this struct mapped; making it writable (and not
        // executable) for the copy affects no Rust object, and no stub runs meanwhile (this
        // struct is not shared between threads and `execute` is not running).
        let rw = unsafe {
            libc::mprotect(
                self.arena.add(page).cast(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if rw != 0 {
            return Err(FpuError::Host {
                what: "mprotect (writable)",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: the slot lies inside the page just made writable (slots do not straddle pages:
        // SLOT divides PAGE) and `code` is at most SLOT bytes.
        unsafe { ptr::copy_nonoverlapping(code.as_ptr(), self.arena.add(at), code.len()) };
        // SAFETY: as above; back to read+execute.
        let rx = unsafe {
            libc::mprotect(
                self.arena.add(page).cast(),
                PAGE,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        };
        if rx != 0 {
            return Err(FpuError::Host {
                what: "mprotect (executable)",
                source: io::Error::last_os_error(),
            });
        }
        self.used += SLOT;
        self.stubs.insert(*host, at);
        Ok(at)
    }
}

impl Drop for HostFpu {
    fn drop(&mut self) {
        // SAFETY: the arena is a mapping this struct created; nothing refers to it any more.
        unsafe { libc::munmap(self.arena.cast(), ARENA) };
    }
}

fn read32(img: &FxImage, o: usize) -> u32 {
    u32::from_le_bytes([img.0[o], img.0[o + 1], img.0[o + 2], img.0[o + 3]])
}

fn write32(img: &mut FxImage, o: usize, v: u32) {
    img.0[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

/// The host register standing for guest general register `r` (ESP runs in R10).
fn host_gpr(r: Register) -> Result<Register, ()> {
    if r.is_gpr32() {
        Ok(if r == Register::ESP {
            Register::R10D
        } else {
            r
        })
    } else if r.is_gpr16() {
        Ok(if r == Register::SP { Register::R10W } else { r })
    } else {
        Err(())
    }
}

/// The guest instruction with its memory operand moved to `[r11 + OFF_MEM]` and its general
/// registers mapped to the stub's host registers, as a 64-bit instruction.
fn host_instruction(guest: &Instruction) -> Result<Instruction, FpuError> {
    let mut ins = *guest;
    ins.set_code_size(iced_x86::CodeSize::Code64);
    ins.set_ip(0);
    for i in 0..ins.op_count() {
        match ins.op_kind(i) {
            OpKind::Register => {
                let r = ins.op_register(i);
                if r.is_gpr() {
                    let h = host_gpr(r).map_err(|()| FpuError::Operand(guest.to_string()))?;
                    ins.set_op_register(i, h);
                }
            }
            OpKind::Memory => {
                if ins.memory_size().size() > MEM_LEN {
                    return Err(FpuError::Operand(guest.to_string()));
                }
                ins.set_memory_base(Register::R11);
                ins.set_memory_index(Register::None);
                ins.set_memory_index_scale(1);
                ins.set_memory_displacement64(OFF_MEM as u64);
                ins.set_memory_displ_size(8);
                ins.set_segment_prefix(Register::None);
            }
            OpKind::Immediate8 | OpKind::Immediate8_2nd => {}
            _ => return Err(FpuError::Operand(guest.to_string())),
        }
    }
    Ok(ins)
}

/// Assembles the stub around `ins` for address `at`.
fn stub(ins: &Instruction, at: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let gprs = [eax, ecx, edx, ebx, r10d, ebp, esi, edi];
    a.push(rbx)?;
    a.push(rbp)?;
    a.mov(r11, rdi)?;
    a.fxsave64(ptr(r11 + OFF_HOST))?;
    a.fxrstor(ptr(r11 + OFF_GUEST))?;
    for (i, r) in gprs.into_iter().enumerate() {
        a.mov(r, dword_ptr(r11 + OFF_GPR + 8 * i as i32))?;
    }
    a.push(qword_ptr(r11 + OFF_RFLAGS))?;
    a.popfq()?;
    a.add_instruction(*ins)?;
    a.pushfq()?;
    a.pop(qword_ptr(r11 + OFF_RFLAGS))?;
    for (i, r) in gprs.into_iter().enumerate() {
        a.mov(dword_ptr(r11 + OFF_GPR + 8 * i as i32), r)?;
    }
    a.fxsave(ptr(r11 + OFF_GUEST))?;
    a.fxrstor64(ptr(r11 + OFF_HOST))?;
    a.pop(rbp)?;
    a.pop(rbx)?;
    a.ret()?;
    a.assemble(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn decode(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(32, bytes, 0x1000, DecoderOptions::NONE).decode()
    }

    fn word(img: &FxImage, o: usize) -> u16 {
        u16::from_le_bytes([img.0[o], img.0[o + 1]])
    }

    fn init_image() -> FxImage {
        let mut img = FxImage::default();
        img.0[fx::FCW..fx::FCW + 2].copy_from_slice(&0x037Fu16.to_le_bytes());
        img.0[fx::MXCSR..fx::MXCSR + 4].copy_from_slice(&0x1F80u32.to_le_bytes());
        img
    }

    #[test]
    fn an_x87_load_and_add_run_on_the_guest_image() {
        let mut f = HostFpu::new().unwrap();
        let mut img = init_image();
        let mut ops = HostOperands::default();
        // fld dword [eax]; fadd st0, st0; fistp dword [ebx]
        ops.mem[..4].copy_from_slice(&1.5f32.to_le_bytes());
        f.execute(&decode(&[0xD9, 0x00]), &mut img, &mut ops)
            .unwrap();
        f.execute(&decode(&[0xD8, 0xC0]), &mut img, &mut ops)
            .unwrap();
        assert_eq!(word(&img, fx::FSW) >> 11 & 7, 7, "TOP after one push");
        assert_eq!(img.0[fx::FTW], 0x80, "physical register 7 in use");
        f.execute(&decode(&[0xDB, 0x1B]), &mut img, &mut ops)
            .unwrap();
        assert_eq!(&ops.mem[..4], &3u32.to_le_bytes());
        assert_eq!(img.0[fx::FTW], 0, "popped");
        assert_eq!(f.cached(), 3);
    }

    #[test]
    fn gpr_operands_and_flags_come_back() {
        let mut f = HostFpu::new().unwrap();
        let mut img = init_image();
        let mut ops = HostOperands::default();
        ops.gpr[4] = 0x4000_0000; // ESP, as a source: cvtsi2sd xmm1, esp
        f.execute(&decode(&[0xF2, 0x0F, 0x2A, 0xCC]), &mut img, &mut ops)
            .unwrap();
        // comisd xmm1, xmm1: equal -> ZF=1, PF=0, CF=0
        f.execute(&decode(&[0x66, 0x0F, 0x2F, 0xC9]), &mut img, &mut ops)
            .unwrap();
        assert_eq!(ops.eflags & 0x45, 0x40);
        // cvttsd2si edi, xmm1
        f.execute(&decode(&[0xF2, 0x0F, 0x2C, 0xF9]), &mut img, &mut ops)
            .unwrap();
        assert_eq!(ops.gpr[7], 0x4000_0000);
        // fnstsw ax keeps the upper half of EAX
        ops.gpr[0] = 0xDEAD_0000;
        f.execute(&decode(&[0xDF, 0xE0]), &mut img, &mut ops)
            .unwrap();
        assert_eq!(ops.gpr[0], 0xDEAD_0000);
    }

    #[test]
    fn unmasked_exceptions_never_trap_the_host() {
        let mut f = HostFpu::new().unwrap();
        let mut img = init_image();
        // FCW with ZE unmasked; 1/0 sets ZE and ES in the image and nothing traps.
        img.0[fx::FCW..fx::FCW + 2].copy_from_slice(&0x037Bu16.to_le_bytes());
        let mut ops = HostOperands::default();
        f.execute(&decode(&[0xD9, 0xE8]), &mut img, &mut ops)
            .unwrap(); // fld1
        f.execute(&decode(&[0xD9, 0xEE]), &mut img, &mut ops)
            .unwrap(); // fldz
        f.execute(&decode(&[0xDE, 0xF9]), &mut img, &mut ops)
            .unwrap(); // fdivp
        let fsw = word(&img, fx::FSW);
        assert_eq!(fsw & 0x84, 0x84, "ZE and ES set: {fsw:#x}");
        // Now pending: a waiting instruction is refused, FNSTSW runs.
        let r = f.execute(&decode(&[0xD9, 0xE8]), &mut img, &mut ops);
        assert!(matches!(r, Err(FpuError::Pending(_))), "{r:?}");
        f.execute(&decode(&[0xDF, 0xE0]), &mut img, &mut ops)
            .unwrap();
        assert_eq!(ops.gpr[0] as u16, fsw);
        // SSE with every exception unmasked in the image: masked on the host, flags reported.
        write32(&mut img, fx::MXCSR, 0);
        f.execute(&decode(&[0x0F, 0x5E, 0xC1]), &mut img, &mut ops) // divps xmm0, xmm1 (0/0)
            .unwrap();
        assert_eq!(
            read32(&img, fx::MXCSR),
            0x01,
            "IE raised, masks as the guest had them"
        );
    }
}
