//! Runs a snippet of unprivileged 32-bit code on the interpreter in a minimal flat machine, for
//! differential tests against other executors (the host CPU itself, in a 32-bit sandbox).
//!
//! The layout is fixed so that every executor can reproduce it: code at [`CODE_ADDR`], a data
//! buffer at [`DATA_ADDR`] that memory operands and the stack point into, flat 4 GiB segments at
//! CPL 0, paging off, no IDT (the first exception ends the run and is reported).

use std::sync::Arc;

use vmdriver::kvm::InitialCpu;
use vmdriver::{GuestMemory, IoHandler, MemoryLayout, VmExit};

use super::{Interp, InterpError};
use crate::cpu::TableReg;

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

/// Runs `code` with general registers `gpr` and flags `eflags`, over a data buffer initialised
/// to `data` at [`DATA_ADDR`]. A HLT appended after the code marks its end.
pub fn run(
    code: &[u8],
    gpr: [u32; 8],
    eflags: u32,
    data: &[u8],
) -> Result<SnippetResult, InterpError> {
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
    let end_eip = CODE_ADDR + code.len() as u32;
    let end = loop {
        match interp.run(&mut NoDevices)? {
            VmExit::Io | VmExit::Interrupted => {}
            VmExit::Halt { .. } if interp.cpu.eip == end_eip + 1 => break SnippetEnd::Completed,
            VmExit::Halt { .. } => {
                // A HLT inside the snippet: privileged for the user code snippets stand for,
                // so a #GP at the HLT itself (one byte back).
                interp.cpu.eip -= 1;
                interp.first_event.get_or_insert((13, interp.cpu.eip));
                break SnippetEnd::Exception(13);
            }
            VmExit::Shutdown => {
                break SnippetEnd::Exception(interp.first_event().map_or(8, |(v, _)| v));
            }
        }
        if interp.instructions > MAX_INSTRUCTIONS {
            break SnippetEnd::Runaway;
        }
    };
    let mut out = vec![0u8; data.len()];
    mem.read(u64::from(DATA_ADDR), &mut out).expect("in RAM");
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::code_asm::*;

    fn asm(f: impl FnOnce(&mut CodeAssembler) -> Result<(), iced_x86::IcedError>) -> Vec<u8> {
        let mut a = CodeAssembler::new(32).unwrap();
        f(&mut a).unwrap();
        a.assemble(u64::from(CODE_ADDR)).unwrap()
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
        let r = run(&code, gpr, 0, &[0; 0x100]).unwrap();
        assert_eq!(r.end, SnippetEnd::Completed);
        assert_eq!(r.gpr[0], 0);
        assert_ne!(r.eflags & crate::cpu::flags::CF, 0);
        assert_eq!(r.gpr[4], DATA_ADDR + 0xFC);
        assert_eq!(&r.data[0xFC..0x100], &0xCAFEu32.to_le_bytes());
        assert_eq!(r.eip, CODE_ADDR + code.len() as u32);
    }

    #[test]
    fn hlt_and_icebp_end_like_they_do_in_user_mode() {
        let hlt = asm(|a| {
            a.nop()?;
            a.hlt()
        });
        let r = run(&hlt, [0; 8], 0, &[]).unwrap();
        assert_eq!((r.end, r.eip), (SnippetEnd::Exception(13), CODE_ADDR + 1));
        let icebp = asm(|a| {
            a.nop()?;
            a.int1()
        });
        let r = run(&icebp, [0; 8], 0, &[]).unwrap();
        assert_eq!(
            (r.end, r.eip),
            (SnippetEnd::Exception(1), CODE_ADDR + 2),
            "a trap"
        );
    }

    #[test]
    fn tzcnt_and_lzcnt_run_as_bsf_and_bsr_without_bmi1() {
        // F3 0F BC / F3 0F BD: the REP prefix is ignored on processors that do not report
        // BMI1/LZCNT (Intel SDM), which is this CPU's CPUID. Linux's __ffs is `rep; bsf`.
        let code = [0xF3, 0x0F, 0xBC, 0xC8, 0xF3, 0x0F, 0xBD, 0xD0]; // tzcnt ecx,eax; lzcnt edx,eax
        let mut gpr = [0u32; 8];
        gpr[0] = 0x0001_0100;
        let r = run(&code, gpr, 0, &[]).unwrap();
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
        let r = run(&code, [0; 8], 0, &[]).unwrap();
        assert_eq!(r.end, SnippetEnd::Exception(0));
        assert_eq!(r.gpr[0], 1, "state at the faulting instruction");
        assert_eq!(r.eip, CODE_ADDR + 1);
    }
}
