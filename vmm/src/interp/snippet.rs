//! Runs a snippet of unprivileged 32-bit code on the interpreter ([`run`]) or the binary
//! translator ([`run_bt`]) in a minimal flat machine, for differential tests against other
//! executors (the host CPU itself, in a 32-bit sandbox).
//!
//! The layout is fixed so that every executor can reproduce it: code at [`CODE_ADDR`], a data
//! buffer at [`DATA_ADDR`] that memory operands and the stack point into, flat 4 GiB segments at
//! CPL 0, paging off, no IDT (the first exception ends the run and is reported). The x87/SSE
//! state starts from a given FXSAVE image, with CR0 and CR4 as Linux gives user code (NE, MP,
//! OSFXSR, OSXMMEXCPT set; EM, TS clear).

use std::sync::Arc;

use vmdriver::kvm::InitialCpu;
use vmdriver::{GuestMemory, IoHandler, MemoryLayout, VmExit};

use super::{Interp, InterpError};
use crate::cpu::{FxImage, TableReg, cr0, cr4};
use crate::translated::{BtEngine, BtError};

/// Where the snippet's code is placed.
pub const CODE_ADDR: u32 = 0x0010_0000;
/// Where the data buffer is placed.
pub const DATA_ADDR: u32 = 0x0020_0000;
/// The largest data buffer.
pub const DATA_MAX: usize = 0x10_0000;
/// Where the flat GDT lives (below the code, out of the data buffer's way).
const GDT_ADDR: u32 = 0x1000;
/// Instructions after which a snippet is considered runaway.
const MAX_INSTRUCTIONS: u64 = 1_000_000;

/// How a snippet ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnippetEnd {
    /// It ran to its end.
    Completed,
    /// It raised this exception vector (the state is the one at the faulting instruction).
    Exception(u8),
    /// It ran more than a million instructions (a loop that does not end).
    Runaway,
}

/// The machine state after a snippet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnippetResult {
    /// EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI.
    pub gpr: [u32; 8],
    /// EFLAGS.
    pub eflags: u32,
    /// The data buffer's final contents.
    pub data: Vec<u8>,
    /// How the run ended.
    pub end: SnippetEnd,
    /// EIP at the end (of the faulting instruction after an exception).
    pub eip: u32,
    /// The x87/MMX/SSE state at the end (FXSAVE layout).
    pub fx: FxImage,
}

/// Ports do nothing and read all ones: snippets are unprivileged code.
struct NoDevices;
impl IoHandler for NoDevices {
    fn pio_read(&mut self, _: u16, data: &mut [u8]) {
        data.fill(0xFF);
    }
    fn pio_write(&mut self, _: u16, _: &[u8]) {}
    fn mmio_read(&mut self, _: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }
    fn mmio_write(&mut self, _: u64, _: &[u8]) {}
}

/// The engine a snippet runs on.
enum Runner {
    Interp(Box<Interp>),
    Bt(Box<BtEngine>),
}

impl Runner {
    fn interp(&mut self) -> &mut Interp {
        match self {
            Runner::Interp(i) => i,
            Runner::Bt(b) => b.interp_mut(),
        }
    }

    fn run(&mut self) -> Result<VmExit, BtError> {
        match self {
            Runner::Interp(i) => Ok(i.run(&mut NoDevices)?),
            Runner::Bt(b) => b.run(&mut NoDevices),
        }
    }

    fn instructions(&mut self) -> u64 {
        match self {
            Runner::Interp(i) => i.instructions,
            Runner::Bt(b) => b.guest_instructions(),
        }
    }
}

/// Runs `code` with general registers `gpr`, flags `eflags` and x87/SSE state `fx`, over a data
/// buffer initialised to `data` at [`DATA_ADDR`]. A HLT appended after the code marks its end.
pub fn run(
    code: &[u8],
    gpr: [u32; 8],
    eflags: u32,
    fx: &FxImage,
    data: &[u8],
) -> Result<SnippetResult, InterpError> {
    run_on(false, code, gpr, eflags, fx, data).map_err(|e| match e {
        BtError::Interp(e) => e,
        other => InterpError::Unsupported {
            what: other.to_string(),
            regs: Default::default(),
        },
    })
}

/// Like [`run`], on the binary translator (the interpreter executing its callouts).
pub fn run_bt(
    code: &[u8],
    gpr: [u32; 8],
    eflags: u32,
    fx: &FxImage,
    data: &[u8],
) -> Result<SnippetResult, BtError> {
    run_on(true, code, gpr, eflags, fx, data)
}

fn run_on(
    bt: bool,
    code: &[u8],
    gpr: [u32; 8],
    eflags: u32,
    fx: &FxImage,
    data: &[u8],
) -> Result<SnippetResult, BtError> {
    assert!(data.len() <= DATA_MAX, "data buffer too large");
    assert!(
        code.len() < (DATA_ADDR - CODE_ADDR) as usize,
        "code too large"
    );
    let mem = Arc::new(
        GuestMemory::new(MemoryLayout::new(4).expect("4 MiB is valid")).expect("guest memory"),
    );
    let gdt: [u64; 3] = [0, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF];
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    let write = |addr: u32, bytes: &[u8]| mem.write(u64::from(addr), bytes).expect("in RAM");
    write(GDT_ADDR, &gdt_bytes);
    let mut image = code.to_vec();
    image.push(0xF4); // HLT
    write(CODE_ADDR, &image);
    write(DATA_ADDR, data);
    let mut interp = Interp::new(
        mem.clone(),
        InitialCpu::Flat32 {
            eip: CODE_ADDR,
            eax: gpr[0],
            ebx: gpr[3],
            esi: gpr[6],
            gdt_base: GDT_ADDR,
            gdt_limit: (gdt_bytes.len() - 1) as u16,
            code_selector: 0x08,
            data_selector: 0x10,
        },
    );
    let cpu = interp.cpu_mut();
    cpu.gpr = gpr;
    cpu.eflags = eflags | crate::cpu::flags::FIXED;
    cpu.idtr = TableReg::default();
    cpu.cr0 |= cr0::NE | cr0::MP;
    cpu.cr4 |= cr4::OSFXSR | cr4::OSXMMEXCPT;
    cpu.fx = fx.clone();
    let mut runner = if bt {
        Runner::Bt(Box::new(BtEngine::new(interp, mem.clone())?))
    } else {
        Runner::Interp(Box::new(interp))
    };
    let end_eip = CODE_ADDR + code.len() as u32;
    let end = loop {
        match runner.run()? {
            VmExit::Io | VmExit::Interrupted => {}
            VmExit::Halt { .. } if runner.interp().cpu.eip == end_eip + 1 => {
                break SnippetEnd::Completed;
            }
            VmExit::Halt { .. } => {
                // A HLT inside the snippet: privileged for the user code snippets stand for,
                // so a #GP at the HLT itself (one byte back).
                let interp = runner.interp();
                interp.cpu.eip -= 1;
                interp.first_event.get_or_insert((13, interp.cpu.eip));
                break SnippetEnd::Exception(13);
            }
            VmExit::Shutdown => {
                break SnippetEnd::Exception(runner.interp().first_event().map_or(8, |(v, _)| v));
            }
        }
        if runner.instructions() > MAX_INSTRUCTIONS {
            break SnippetEnd::Runaway;
        }
    };
    let mut out = vec![0u8; data.len()];
    mem.read(u64::from(DATA_ADDR), &mut out).expect("in RAM");
    let interp = runner.interp();
    let cpu = interp.cpu();
    // After an exception, the EIP its handler would see: the faulting instruction for a fault,
    // the next one for a trap or INT n (what the host CPU reports too).
    let eip = match (end, interp.first_event()) {
        (SnippetEnd::Completed, _) => end_eip,
        (SnippetEnd::Exception(_), Some((_, eip))) => eip,
        _ => cpu.eip,
    };
    Ok(SnippetResult {
        gpr: cpu.gpr,
        eflags: cpu.eflags,
        data: out,
        end,
        eip,
        fx: cpu.fx.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;

    fn fninit() -> FxImage {
        let mut fx = crate::cpu::fx_reset();
        fx.0[0..2].copy_from_slice(&0x037Fu16.to_le_bytes());
        fx.0[4] = 0;
        fx
    }

    fn asm(f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>) -> Vec<u8> {
        let mut a = CodeAssembler::new(32).unwrap();
        f(&mut a).unwrap();
        a.assemble(u64::from(CODE_ADDR)).unwrap()
    }

    #[test]
    fn unmasked_overflow_in_cvtsd2ss_reports_pe_only_for_an_inexact_significand() {
        // 2^200 overflows a single exactly: #XM with OE alone; 2^200 (1 + 2^-40) loses bits
        // below the single's 24-bit significand: OE and PE (the host CPU agrees, seeds 2 and 3
        // of the native oracle).
        for (bits, flags) in [
            (0x4C70_0000_0000_0000u64, 0x08u32),
            (0x4C70_0000_0000_1000, 0x28),
        ] {
            let code = asm(|a| a.cvtsd2ss(xmm0, qword_ptr(DATA_ADDR)));
            let mut fx = fninit();
            // MXCSR: every exception masked but overflow.
            fx.0[24..28].copy_from_slice(&(0x1F80u32 & !(1 << 10)).to_le_bytes());
            let r = run(&code, [0; 8], 0, &fx, &bits.to_le_bytes()).unwrap();
            assert_eq!(r.end, SnippetEnd::Exception(19));
            let mxcsr = u32::from_le_bytes(r.fx.0[24..28].try_into().unwrap());
            assert_eq!(mxcsr & 0x3F, flags, "{bits:#x}");
        }
    }

    #[test]
    fn the_80287s_fnsetpm_is_ignored() {
        // FNSETPM (DB E4) is a no-op from the 387 on: the snippet completes, FP state untouched.
        let code = asm(|a| {
            a.db(&[0xDB, 0xE4])?;
            a.mov(eax, 7u32)
        });
        let r = run(&code, [0; 8], 0, &fninit(), &[0; 16]).unwrap();
        assert_eq!(r.end, SnippetEnd::Completed);
        assert_eq!(r.gpr[0], 7);
        assert_eq!(r.fx, fninit());
    }

    #[test]
    fn a_snippet_runs_to_its_end() {
        let code = asm(|a| {
            a.add(eax, ebx)?;
            a.mov(dword_ptr(DATA_ADDR + 4), eax)?;
            a.push(ecx)?;
            Ok(())
        });
        let mut gpr = [0u32; 8];
        gpr[0] = 0xFFFF_FFFF;
        gpr[1] = 0xCAFE;
        gpr[3] = 1;
        gpr[4] = DATA_ADDR + 0x100;
        let r = run(&code, gpr, 0, &fninit(), &[0; 0x100]).unwrap();
        assert_eq!(r.end, SnippetEnd::Completed);
        assert_eq!(r.gpr[0], 0);
        assert_ne!(r.eflags & crate::cpu::flags::CF, 0);
        assert_eq!(r.gpr[4], DATA_ADDR + 0xFC);
        assert_eq!(&r.data[0xFC..0x100], &0xCAFEu32.to_le_bytes());
        assert_eq!(r.eip, CODE_ADDR + code.len() as u32);
    }

    #[test]
    fn push_and_pop_sreg_move_esp_by_their_operand_size_on_both_engines() {
        // PUSH DS (a dword: the selector zero-extended), 66 PUSH ES (a word), 66 POP FS (a
        // word), then MOV to memory and to a 32-bit register (zero-extended).
        let code = asm(|a| {
            a.mov(dword_ptr(DATA_ADDR + 0xF0), 0xFFFF_FFFFu32)?;
            a.mov(dword_ptr(DATA_ADDR + 0xF4), 0xFFFF_FFFFu32)?;
            a.push(ds)?;
            a.db(&[0x66, 0x06])?;
            a.mov(word_ptr(DATA_ADDR + 0x10), ds)?;
            a.mov(ebx, 0xFFFF_FFFFu32)?;
            a.mov(ebx, ss)?;
            a.db(&[0x66, 0x0F, 0xA1])?;
            Ok(())
        });
        let mut gpr = [0u32; 8];
        gpr[4] = DATA_ADDR + 0xF8;
        let r = run(&code, gpr, 0, &fninit(), &[0; 0x100]).unwrap();
        assert_eq!(r.end, SnippetEnd::Completed);
        let b = run_bt(&code, gpr, 0, &fninit(), &[0; 0x100]).unwrap();
        assert_eq!((b.end, b.gpr, &b.data[..]), (r.end, r.gpr, &r.data[..]));
        // 4 + 2 pushed, 2 popped.
        assert_eq!(r.gpr[4], DATA_ADDR + 0xF8 - 4);
        let sel = u16::from_le_bytes([r.data[0x10], r.data[0x11]]);
        assert_eq!(&r.data[0xF4..0xF8], &u32::from(sel).to_le_bytes());
        // The word push of ES went just below, leaving the bytes under it alone (a dword
        // push would have overwritten them).
        assert_eq!(&r.data[0xF0..0xF2], &[0xFF, 0xFF]);
        let es_sel = u16::from_le_bytes([r.data[0xF2], r.data[0xF3]]);
        assert_eq!((es_sel, sel), (0x10, 0x10), "the snippet's data selector");
        assert_eq!(r.data[0x12], 0, "MOV m16, Sreg stores a word");
        assert_eq!(r.gpr[3] >> 16, 0, "MOV r32, Sreg zero-extends");
    }

    #[test]
    fn hlt_and_icebp_end_like_they_do_in_user_mode() {
        let hlt = asm(|a| {
            a.nop()?;
            a.hlt()
        });
        let r = run(&hlt, [0; 8], 0, &fninit(), &[]).unwrap();
        assert_eq!((r.end, r.eip), (SnippetEnd::Exception(13), CODE_ADDR + 1));
        let icebp = asm(|a| {
            a.nop()?;
            a.int1()
        });
        let r = run(&icebp, [0; 8], 0, &fninit(), &[]).unwrap();
        assert_eq!(
            (r.end, r.eip),
            (SnippetEnd::Exception(1), CODE_ADDR + 2),
            "a trap"
        );
    }

    #[test]
    fn the_translator_runs_snippets_like_the_interpreter() {
        let code = asm(|a| {
            a.add(eax, ebx)?;
            a.mov(dword_ptr(DATA_ADDR + 4), eax)?;
            a.push(ecx)?;
            a.call(u64::from(CODE_ADDR + 0x40))?;
            a.xor(ecx, ecx)?;
            a.div(ecx)?;
            for _ in 0..0x30 {
                a.nop()?;
            }
            a.inc(esi)?;
            a.ret()
        });
        let mut gpr = [0u32; 8];
        gpr[0] = 0xFFFF_FFFF;
        gpr[1] = 0xCAFE;
        gpr[3] = 1;
        gpr[4] = DATA_ADDR + 0x100;
        let i = run(&code, gpr, 0, &fninit(), &[0; 0x100]).unwrap();
        let b = run_bt(&code, gpr, 0, &fninit(), &[0; 0x100]).unwrap();
        assert_eq!(i.end, SnippetEnd::Exception(0));
        assert_eq!(b, i);
    }

    #[test]
    fn tzcnt_and_lzcnt_run_as_bsf_and_bsr_without_bmi1() {
        // F3 0F BC / F3 0F BD: the REP prefix is ignored on processors that do not report
        // BMI1/LZCNT (Intel SDM), which is this CPU's CPUID. Linux's __ffs is `rep; bsf`.
        let code = [0xF3, 0x0F, 0xBC, 0xC8, 0xF3, 0x0F, 0xBD, 0xD0]; // tzcnt ecx,eax; lzcnt edx,eax
        let mut gpr = [0u32; 8];
        gpr[0] = 0x0001_0100;
        let r = run(&code, gpr, 0, &fninit(), &[]).unwrap();
        assert_eq!(r.end, SnippetEnd::Completed);
        assert_eq!(r.gpr[1], 8, "index of the lowest set bit, as BSF");
        assert_eq!(
            r.gpr[2], 16,
            "index of the highest set bit, as BSR (LZCNT would give 15)"
        );
        assert_eq!(r.eflags & crate::cpu::flags::ZF, 0);
    }

    #[test]
    fn a_faulting_snippet_reports_the_vector_and_where() {
        let code = asm(|a| {
            a.inc(eax)?;
            a.div(ecx)?;
            Ok(())
        });
        let r = run(&code, [0; 8], 0, &fninit(), &[]).unwrap();
        assert_eq!(r.end, SnippetEnd::Exception(0));
        assert_eq!(r.gpr[0], 1, "state at the faulting instruction");
        assert_eq!(r.eip, CODE_ADDR + 1);
    }
}
