//! The nanobenchmark kernels of `bt86 bench --suite nano`: each times one operation with the
//! guest's TSC over many iterations, after a warm-up pass, the set Adams & Agesen measured
//! (ASPLOS 2006) for a 32-bit guest.
//!
//! Every kernel runs the same frame: a GDT with ring-0 and ring-3 flat segments and a TSS, an IDT,
//! paging on (identity-mapped, user-accessible first 4 MiB, as a guest OS would run), the 8259s
//! masked. It then runs its operation `iterations / 10` times to warm up and `iterations` times
//! between two RDTSCs (in ring 3 for the operations a user process performs), and prints one line
//!
//! ```text
//! nano <name> ops=<hex> cycles=<hex 64-bit>
//! ```
//!
//! before exiting through isa-debug-exit with [`EXIT_VALUE`]. An unexpected exception prints
//! `nano <name> unexpected exception vector=<hex> frame=<hex words>` and exits with
//! [`FAIL_VALUE`].

use iced_x86::code_asm::*;

use crate::kit::{AsmResult, Kit, STACK_TOP};

/// isa-debug-exit value of a kernel that measured its operation (process status 33).
pub const EXIT_VALUE: u8 = 0x10;
/// isa-debug-exit value of a kernel that took an exception it did not expect.
pub const FAIL_VALUE: u8 = 0x11;

/// Page directory and the page table of the identity-mapped first 4 MiB.
const PD: u32 = 0x20_0000;
const PT0: u32 = 0x20_1000;
/// The page the pgfault and ptemod operations use; its PTE starts not present.
const PROBE: u32 = 0x30_0000;
const PROBE_PTE: u32 = PT0 + 4 * (PROBE >> 12);

/// Flat segments: ring-0 code and data, ring-3 code and data (the SYSENTER/SYSEXIT layout), TSS.
const GDT: [u64; 6] = [
    0,
    0x00CF_9B00_0000_FFFF,
    0x00CF_9300_0000_FFFF,
    0x00CF_FB00_0000_FFFF,
    0x00CF_F300_0000_FFFF,
    0,
];
const TSS_SELECTOR: u32 = 0x28;
const USER_CS: u32 = 0x1B;
const USER_SS: u32 = 0x23;

/// Where the timed loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// In the guest kernel.
    Kernel,
    /// In a ring-3 process.
    User,
}

/// One nanobenchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Its name in reports and on the command line.
    pub name: &'static str,
    /// What one operation is.
    pub operation: &'static str,
    /// Where the timed loop runs.
    pub ring: Ring,
    /// Iterations of the timed loop by default.
    pub iterations: u32,
}

/// Every nanobenchmark, in report order.
pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "syscall-int",
        operation: "ring 3 -> ring 0 -> ring 3 through an INT 0x80 interrupt gate and IRET",
        ring: Ring::User,
        iterations: 20_000,
    },
    Workload {
        name: "syscall-sysenter",
        operation: "ring 3 -> ring 0 -> ring 3 through SYSENTER and SYSEXIT",
        ring: Ring::User,
        iterations: 20_000,
    },
    Workload {
        name: "in",
        operation: "a port read from a device (the COM1 line status register)",
        ring: Ring::Kernel,
        iterations: 20_000,
    },
    Workload {
        name: "rdtsc",
        operation: "a time-stamp counter read (RDTSC), as clock reads and sched_clock do",
        ring: Ring::Kernel,
        iterations: 100_000,
    },
    Workload {
        name: "cli-sti",
        operation: "a CLI/STI pair",
        ring: Ring::Kernel,
        iterations: 100_000,
    },
    Workload {
        name: "call-ret",
        operation: "a near CALL to a RET",
        ring: Ring::Kernel,
        iterations: 200_000,
    },
    Workload {
        name: "pgfault",
        operation: "a ring-3 #PF handled by the guest kernel (skips the access)",
        ring: Ring::User,
        iterations: 10_000,
    },
    Workload {
        name: "divzero",
        operation: "a #DE handled by the guest kernel (skips the DIV)",
        ring: Ring::Kernel,
        iterations: 10_000,
    },
    Workload {
        name: "ptemod",
        operation: "a PTE write followed by INVLPG",
        ring: Ring::Kernel,
        iterations: 20_000,
    },
    Workload {
        name: "compute",
        operation: "one iteration of a 4-instruction register-only loop body",
        ring: Ring::Kernel,
        iterations: 1_000_000,
    },
    Workload {
        name: "call-heavy",
        operation: "two nested calls with stack frames and an argument",
        ring: Ring::Kernel,
        iterations: 200_000,
    },
];

/// The workload called `name`.
pub fn find(name: &str) -> Option<&'static Workload> {
    WORKLOADS.iter().find(|w| w.name == name)
}

/// Whether `workload`'s operation is unprivileged, so the same loop can run natively on the host
/// (in a 32-bit compatibility-mode sandbox) as the physical limit to compare engines with.
pub fn runs_natively(workload: &Workload) -> bool {
    matches!(workload.name, "compute" | "call-ret" | "call-heavy")
}

/// Bytes of the data buffer a native snippet needs: the two TSC readings, then its stack.
pub const NATIVE_DATA: usize = 0x1000;

/// `workload`'s timed loop as a standalone 32-bit snippet for the native sandbox (None for a
/// privileged operation): placed at `code_addr`, with its data buffer (ESP = `data_addr +`
/// [`NATIVE_DATA`]) at `data_addr`. It warms up like the kernel, then stores the TSC before and
/// after `iterations` operations at `data_addr` and `data_addr + 8`, and runs off its end.
pub fn native_snippet(
    workload: &Workload,
    iterations: u32,
    code_addr: u32,
    data_addr: u32,
) -> AsmResult<Option<Vec<u8>>> {
    if !runs_natively(workload) {
        return Ok(None);
    }
    let iterations = iterations.max(1);
    let mut a = CodeAssembler::new(32)?;
    let mut timed_loop = a.create_label();
    let mut end = a.create_label();
    a.mov(ebx, (iterations / 10).max(1))?;
    a.call(timed_loop)?;
    a.rdtsc()?;
    a.mov(dword_ptr(data_addr), eax)?;
    a.mov(dword_ptr(data_addr + 4), edx)?;
    a.mov(ebx, iterations)?;
    a.call(timed_loop)?;
    a.rdtsc()?;
    a.mov(dword_ptr(data_addr + 8), eax)?;
    a.mov(dword_ptr(data_addr + 12), edx)?;
    a.jmp(end)?;
    a.set_label(&mut timed_loop)?;
    let mut functions = Functions::new(&mut a);
    operation(&mut a, workload.name, 0, &functions)?;
    a.dec(ebx)?;
    a.jnz(timed_loop)?;
    a.ret()?;
    functions.emit(&mut a)?;
    a.set_label(&mut end)?;
    a.nop()?;
    Ok(Some(a.assemble(u64::from(code_addr))?))
}

/// One kernel's result line, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Operations timed.
    pub ops: u64,
    /// Guest TSC cycles they took.
    pub cycles: u64,
}

/// Finds `workload`'s result line in a kernel's serial output.
pub fn parse_output(workload: &str, output: &str) -> Option<Measurement> {
    let prefix = format!("nano {workload} ");
    output.lines().find_map(|line| {
        let rest = line.trim_end_matches('\r').strip_prefix(&prefix)?;
        let mut ops = None;
        let mut cycles = None;
        for field in rest.split_whitespace() {
            if let Some(v) = field.strip_prefix("ops=") {
                ops = u64::from_str_radix(v, 16).ok();
            } else if let Some(v) = field.strip_prefix("cycles=") {
                cycles = u64::from_str_radix(v, 16).ok();
            }
        }
        Some(Measurement {
            ops: ops?,
            cycles: cycles?,
        })
    })
}

/// Builds `workload`'s kernel timing `iterations` operations (at least 1).
pub fn build(workload: &Workload, iterations: u32) -> AsmResult<Vec<u8>> {
    let iterations = iterations.max(1);
    let mut k = Kit::new()?;

    let (gdt, gdtr) = k.descriptor_table(&GDT.map(u64::to_le_bytes).concat());
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let tss = tss(&mut k);
    let t0 = k.data(&[0; 8]);
    let t1 = k.data(&[0; 8]);
    let user_stack = k.data(&[0u8; 4096]) + 4096;

    let mut report = k.asm().create_label();
    let mut unexpected = k.asm().create_label();
    let mut body = k.asm().create_label();
    let mut timed_loop = k.asm().create_label();
    let mut resume = k.asm().create_label();
    let mut sysenter_entry = k.asm().create_label();
    let mut syscall_entry = k.asm().create_label();
    let mut fault_entry = k.asm().create_label();
    let report_slot = k.address_slot();
    let body_slot = k.address_slot();
    let resume_slot = k.address_slot();
    let sysenter_slot = k.address_slot();
    let syscall_slot = k.address_slot();
    let fault_slot = k.address_slot();

    // Mask both 8259s: nothing but the operation itself may interrupt the loop.
    k.asm().mov(al, 0xFFu32)?;
    k.asm().out(0x21, al)?;
    k.asm().out(0xA1, al)?;

    // Descriptor tables and the TSS.
    let tss_limit = 103;
    let low = (tss << 16) | tss_limit;
    let high = (tss & 0xFF00_0000) | ((tss >> 16) & 0xFF) | 0x8900;
    k.asm().mov(dword_ptr(gdt + TSS_SELECTOR), low)?;
    k.asm().mov(dword_ptr(gdt + TSS_SELECTOR + 4), high)?;
    // Every exception vector gets a stub (emitted below) that reports it as unexpected.
    let mut stubs = Vec::new();
    for v in 0..32 {
        let slot = k.address_slot();
        set_gate(&mut k, idt, v, slot, 0x8E)?;
        stubs.push(slot);
    }
    set_gate(&mut k, idt, 0, fault_slot, 0x8E)?;
    set_gate(&mut k, idt, 14, fault_slot, 0x8E)?;
    set_gate(&mut k, idt, 0x80, syscall_slot, 0xEE)?;
    set_gate(&mut k, idt, 0x81, report_slot, 0xEE)?;
    k.asm().lgdt(ptr(gdtr))?;
    k.asm().lidt(ptr(idtr))?;
    k.asm().mov(eax, TSS_SELECTOR)?;
    k.asm().ltr(ax)?;

    // SYSENTER: CS 0x08 (SS 0x10, SYSEXIT to 0x1B/0x23), the kernel stack, the entry point.
    k.asm().xor(edx, edx)?;
    k.asm().mov(ecx, 0x174u32)?;
    k.asm().mov(eax, 0x08u32)?;
    k.asm().wrmsr()?;
    k.asm().mov(ecx, 0x175u32)?;
    k.asm().mov(eax, STACK_TOP)?;
    k.asm().wrmsr()?;
    k.asm().mov(ecx, 0x176u32)?;
    k.asm().mov(eax, dword_ptr(sysenter_slot))?;
    k.asm().wrmsr()?;

    // Paging: the first 4 MiB identity-mapped, user-accessible, writable; PROBE not present.
    k.identity_map_4mib(PD)?;
    k.asm().mov(dword_ptr(PROBE_PTE), 0u32)?;
    k.asm().mov(eax, PD)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 0x8001_0000u32)?;
    k.asm().mov(cr0, eax)?;

    // Into the body: directly in ring 0, or through IRET into ring 3.
    match workload.ring {
        Ring::Kernel => k.asm().jmp(body)?,
        Ring::User => {
            k.asm().push(USER_SS)?;
            k.asm().push(user_stack)?;
            k.asm().push(0x2u32)?;
            k.asm().push(USER_CS)?;
            k.asm().push(dword_ptr(body_slot))?;
            k.asm().iretd()?;
        }
    }

    // The body: warm up, then time the loop between two RDTSCs, then report through INT 0x81.
    k.set_label_at(&mut body, body_slot)?;
    if workload.ring == Ring::User {
        k.asm().mov(eax, USER_SS)?;
        k.asm().mov(ds, eax)?;
        k.asm().mov(es, eax)?;
    }
    k.asm().mov(ebx, (iterations / 10).max(1))?;
    k.asm().call(timed_loop)?;
    k.asm().rdtsc()?;
    k.asm().mov(dword_ptr(t0), eax)?;
    k.asm().mov(dword_ptr(t0 + 4), edx)?;
    k.asm().mov(ebx, iterations)?;
    k.asm().call(timed_loop)?;
    k.asm().rdtsc()?;
    k.asm().mov(dword_ptr(t1), eax)?;
    k.asm().mov(dword_ptr(t1 + 4), edx)?;
    k.asm().int(0x81)?;
    k.halt_forever()?;

    // The loop: EBX operations.
    k.asm().set_label(&mut timed_loop)?;
    let mut functions = Functions::new(k.asm());
    operation(k.asm(), workload.name, resume_slot, &functions)?;
    k.set_label_at(&mut resume, resume_slot)?;
    k.asm().dec(ebx)?;
    k.asm().jnz(timed_loop)?;
    k.asm().ret()?;
    functions.emit(k.asm())?;

    // Handlers.
    k.set_label_at(&mut syscall_entry, syscall_slot)?;
    k.asm().iretd()?;
    k.set_label_at(&mut sysenter_entry, sysenter_slot)?;
    k.asm().sysexit()?;
    // #DE and #PF: resume after the faulting instruction (EIP is under #PF's error code).
    k.set_label_at(&mut fault_entry, fault_slot)?;
    if workload.name == "pgfault" {
        k.asm().add(esp, 4u32)?;
    }
    k.asm().push(eax)?;
    k.asm().mov(eax, dword_ptr(resume_slot))?;
    k.asm().mov(dword_ptr(esp + 4), eax)?;
    k.asm().pop(eax)?;
    k.asm().iretd()?;

    for (v, slot) in stubs.into_iter().enumerate() {
        let mut stub = k.asm().create_label();
        k.set_label_at(&mut stub, slot)?;
        k.asm().push(v as u32)?;
        k.asm().jmp(unexpected)?;
    }
    // [esp] vector, then the exception's frame (with an error code for 8, 10-14, 17).
    k.asm().set_label(&mut unexpected)?;
    k.print(&format!(
        "nano {} unexpected exception vector=",
        workload.name
    ))?;
    k.asm().pop(eax)?;
    k.print_hex(eax)?;
    k.print(" frame=")?;
    for i in 0..3 {
        k.asm().mov(eax, dword_ptr(esp + 4 * i))?;
        k.print_hex(eax)?;
        k.print(" ")?;
    }
    k.print("\n")?;
    k.exit(FAIL_VALUE)?;

    k.set_label_at(&mut report, report_slot)?;
    k.print(&format!("nano {} ops=", workload.name))?;
    k.asm().mov(eax, iterations)?;
    k.print_hex(eax)?;
    k.print(" cycles=")?;
    k.asm().mov(eax, dword_ptr(t1))?;
    k.asm().mov(edx, dword_ptr(t1 + 4))?;
    k.asm().sub(eax, dword_ptr(t0))?;
    k.asm().sbb(edx, dword_ptr(t0 + 4))?;
    k.print_hex(edx)?;
    k.print_hex(eax)?;
    k.print("\n")?;
    k.exit(EXIT_VALUE)?;
    k.build()
}

/// Emits one operation of `name`. It may use EAX, ECX, EDX, ESI, EDI but keeps EBX.
/// `resume_slot` holds the address right after the operation (where the fault handlers and
/// SYSEXIT return).
fn operation(a: &mut CodeAssembler, name: &str, resume_slot: u32, f: &Functions) -> AsmResult {
    match name {
        "syscall-int" => a.int(0x80)?,
        "syscall-sysenter" => {
            a.mov(ecx, esp)?;
            a.mov(edx, dword_ptr(resume_slot))?;
            a.sysenter()?;
        }
        "in" => {
            a.mov(edx, 0x3FDu32)?;
            a.in_(al, dx)?;
        }
        "rdtsc" => a.rdtsc()?,
        "cli-sti" => {
            a.cli()?;
            a.sti()?;
        }
        "call-ret" => a.call(f.leaf)?,
        "pgfault" => a.mov(eax, dword_ptr(PROBE))?,
        "divzero" => {
            a.xor(ecx, ecx)?;
            a.xor(edx, edx)?;
            a.div(ecx)?;
        }
        "ptemod" => {
            a.mov(dword_ptr(PROBE_PTE), PROBE | 3)?;
            a.invlpg(byte_ptr(PROBE))?;
        }
        "compute" => {
            a.add(eax, ebx)?;
            a.xor(eax, 0x5A5A_5A5Au32)?;
            a.rol(eax, 3u32)?;
            a.lea(ecx, dword_ptr(eax + ecx * 2))?;
        }
        "call-heavy" => {
            a.push(ebx)?;
            a.call(f.outer)?;
            a.add(esp, 4u32)?;
        }
        other => unreachable!("nano workload {other} has no operation"),
    }
    Ok(())
}

/// The functions the call workloads call.
struct Functions {
    /// `ret`.
    leaf: CodeLabel,
    /// Builds a frame, passes its argument on to `inner`, returns.
    outer: CodeLabel,
    /// Builds a frame, reads its argument, returns.
    inner: CodeLabel,
}

impl Functions {
    fn new(a: &mut CodeAssembler) -> Self {
        Functions {
            leaf: a.create_label(),
            outer: a.create_label(),
            inner: a.create_label(),
        }
    }

    fn emit(&mut self, a: &mut CodeAssembler) -> AsmResult {
        a.set_label(&mut self.leaf)?;
        a.ret()?;
        a.set_label(&mut self.outer)?;
        a.push(ebp)?;
        a.mov(ebp, esp)?;
        a.push(dword_ptr(ebp + 8))?;
        a.call(self.inner)?;
        a.add(esp, 4u32)?;
        a.pop(ebp)?;
        a.ret()?;
        a.set_label(&mut self.inner)?;
        a.push(ebp)?;
        a.mov(ebp, esp)?;
        a.mov(eax, dword_ptr(ebp + 8))?;
        a.add(eax, 1u32)?;
        a.pop(ebp)?;
        a.ret()?;
        Ok(())
    }
}

/// A 32-bit TSS whose ring-0 stack is the kit's stack; no I/O bitmap (ring 3 has no ports).
fn tss(k: &mut Kit) -> u32 {
    let mut tss = [0u8; 104];
    tss[4..8].copy_from_slice(&STACK_TOP.to_le_bytes());
    tss[8..10].copy_from_slice(&0x10u16.to_le_bytes());
    tss[0x66..0x68].copy_from_slice(&104u16.to_le_bytes());
    k.data(&tss)
}

/// Emits code storing a 32-bit gate for vector `v` at `idt` to the handler whose address is in
/// the data word `slot`, through selector 0x08, with `access` (0x8E interrupt gate DPL 0, 0xEE
/// DPL 3).
fn set_gate(k: &mut Kit, idt: u32, v: u32, slot: u32, access: u32) -> AsmResult {
    let a = k.asm();
    a.mov(eax, dword_ptr(slot))?;
    a.mov(edx, eax)?;
    a.and(edx, 0xFFFF_0000u32)?;
    a.or(edx, access << 8)?;
    a.mov(dword_ptr(idt + v * 8 + 4), edx)?;
    a.and(eax, 0xFFFFu32)?;
    a.or(eax, 0x0008_0000u32)?;
    a.mov(dword_ptr(idt + v * 8), eax)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workload_builds_and_has_a_distinct_name() {
        for w in WORKLOADS {
            let image = build(w, 10).unwrap();
            assert_eq!(&image[..4], b"\x7FELF", "{}", w.name);
            assert_eq!(find(w.name), Some(w));
        }
    }

    #[test]
    fn result_lines_parse_and_other_lines_do_not() {
        let out = "booting\nnano pgfault ops=00002710 cycles=00000000000f4240\r\n";
        assert_eq!(
            parse_output("pgfault", out),
            Some(Measurement {
                ops: 10_000,
                cycles: 1_000_000
            })
        );
        assert_eq!(parse_output("ptemod", out), None);
        assert_eq!(
            parse_output("pgfault", "nano pgfault ops=zz cycles=1"),
            None
        );
        assert_eq!(
            parse_output("pgfault", "nano pgfault unexpected exception"),
            None
        );
    }
}
