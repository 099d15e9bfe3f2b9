//! Kit kernels aimed at the binary translator: self-modifying code, faults inside translated
//! code, isolation, interrupts while translated code spins, and the two benchmark loops. They
//! are ordinary guests (QEMU runs them the same way); their catalog entries are in
//! [`crate::kernels::CATALOG`].

use iced_x86::code_asm::*;

use crate::kernels::{
    RING_GDT, com1_tss, count_pit_ticks, enter_ring3, handler_address, load_tables, set_gate,
};
use crate::kit::{AsmResult, KERNEL_BASE, Kit};

/// Rewrites code the guest already ran: the next instruction of the running unit, a function
/// that has been called (so translated) before, and a function overwritten by `rep movsd`.
/// Exits with value 0x21.
pub fn smc() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    // 1. The next instruction: `call here; here: pop ebx` gives ebx = here. Then
    //    `mov byte [ebx+6], 0x42` (C6 43 06 42) patches the low immediate byte of the
    //    `mov eax, 0x11` that follows it (B8 11 00 00 00 at here+5).
    let mut here = k.asm().create_label();
    k.asm().call(here)?;
    k.asm().set_label(&mut here)?;
    k.asm().pop(ebx)?;
    k.asm().db(&[0xC6, 0x43, 0x06, 0x42])?;
    k.asm().db(&[0xB8, 0x11, 0x00, 0x00, 0x00])?;
    k.print_field("next_instruction", eax)?;

    // 2. A function already translated: `mov eax, imm32; ret`, its address in EDI.
    handler_address(&mut k, |k| {
        k.asm().mov(eax, 0x1111_1111u32)?;
        Ok(k.asm().ret()?)
    })?;
    k.asm().mov(edi, eax)?;
    for round in 0..3u32 {
        k.asm().call(edi)?;
        k.print_field("function", eax)?;
        // Patch the immediate (one byte past the opcode) for the next round.
        k.asm()
            .mov(dword_ptr(edi + 1), 0x2222_2222u32 * (round + 2))?;
    }

    // 3. A buffer of code run, then overwritten by `rep movsd` (the interpreter's write), run
    //    again.
    const BUF: u32 = 0x0030_0000;
    let template_a = k.data(&[0xB8, 0x33, 0x33, 0x33, 0x33, 0xC3, 0x90, 0x90]);
    let template_b = k.data(&[0xB8, 0x44, 0x44, 0x44, 0x44, 0xC3, 0x90, 0x90]);
    for template in [template_a, template_b] {
        k.asm().mov(esi, template)?;
        k.asm().mov(edi, BUF)?;
        k.asm().mov(ecx, 2u32)?;
        k.asm().cld()?;
        k.asm().rep().movsd()?;
        k.asm().mov(eax, BUF)?;
        k.asm().call(eax)?;
        k.print_field("copied", eax)?;
    }

    // 4. A loop that rewrites its own loop body's immediate on every pass.
    k.asm().xor(edx, edx)?;
    k.asm().mov(ecx, 5u32)?;
    let mut top = k.asm().create_label();
    let mut body = k.asm().create_label();
    k.asm().set_label(&mut top)?;
    k.asm().call(body)?;
    k.asm().set_label(&mut body)?;
    k.asm().pop(ebx)?; // ebx = body
    // body+1: mov [ebx+6], ecx (89 4B 06) patches the immediate of the `add edx, 1`
    // (81 C2 imm32) at body+4, so each pass adds ECX: 5+4+3+2+1.
    k.asm().db(&[0x89, 0x4B, 0x06])?;
    k.asm().db(&[0x81, 0xC2, 0x01, 0x00, 0x00, 0x00])?;
    k.asm().dec(ecx)?;
    k.asm().jnz(top)?;
    k.print_field("loop_sum", edx)?;
    k.exit(0x21)?;
    k.build()
}

/// Faults raised inside translated code, delivered precisely through the guest's IDT: the
/// handler prints the vector, the faulting EIP and the registers as the faulting instruction
/// saw them, then skips the instruction. Then a jump into the middle of an instruction. Exits
/// with value 0x22. (Device memory from translated code is the `mmio-nowhere` kernel's.)
pub fn precise_faults() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let skip = k.data(&[0; 4]);
    for v in [0u32, 6, 13] {
        handler_address(&mut k, |k| {
            k.print(&format!("vector={v:02x}"))?;
            if v == 13 {
                k.asm().add(esp, 4u32)?; // the error code
            }
            k.asm().mov(eax, dword_ptr(esp))?;
            k.asm().sub(eax, KERNEL_BASE)?;
            k.print(" eip=+")?;
            k.print_hex(eax)?;
            k.print(" esi=")?;
            k.print_hex(esi)?;
            k.print(" edi=")?;
            k.print_hex(edi)?;
            k.asm().lea(eax, dword_ptr(esp + 12))?; // ESP before the exception frame
            k.print(" esp=")?;
            k.print_hex(eax)?;
            k.print("\n")?;
            k.asm().mov(eax, dword_ptr(skip))?;
            k.asm().add(dword_ptr(esp), eax)?;
            Ok(k.asm().iretd()?)
        })?;
        set_gate(&mut k, idt, v, 0x8E)?;
    }
    k.asm().lidt(ptr(idtr))?;

    // #DE in the middle of a unit, after stack and register updates in the same unit.
    k.asm().mov(dword_ptr(skip), 2u32)?;
    k.asm().mov(esi, 0x1111_1111u32)?;
    k.asm().push(0xABu32)?;
    k.asm().mov(edi, 0x2222_2222u32)?;
    k.asm().inc(esi)?;
    k.asm().xor(ecx, ecx)?;
    k.asm().div(ecx)?;
    k.asm().pop(eax)?;
    k.print_field("after_div", eax)?;
    // #DE from a quotient overflow.
    k.asm().mov(edx, 5u32)?;
    k.asm().mov(eax, 0u32)?;
    k.asm().mov(ecx, 2u32)?;
    k.asm().mov(esi, 0x3333_3333u32)?;
    k.asm().div(ecx)?;
    // #UD.
    k.asm().mov(edi, 0x4444_4444u32)?;
    k.asm().ud2()?;
    // #GP: a far jump to a null code selector (EA ptr16:32, 7 bytes), amid translated code.
    k.asm().mov(dword_ptr(skip), 7u32)?;
    k.asm().mov(esi, 0x5555_5555u32)?;
    k.asm().db(&[0xEA, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00])?;

    // Into the middle of an instruction: `mov eax, 0x90909090` (B8 90 90 90 90) entered at its
    // second byte runs four NOPs.
    let mut mid = k.asm().create_label();
    let mut over = k.asm().create_label();
    k.asm().mov(eax, 7u32)?;
    k.asm().call(over)?;
    k.asm().set_label(&mut mid)?;
    k.asm().db(&[0xB8, 0x90, 0x90, 0x90, 0x90])?;
    k.print_field("middle", eax)?;
    k.exit(0x22)?;
    k.asm().set_label(&mut over)?;
    k.asm().pop(ebx)?;
    k.asm().inc(ebx)?;
    k.asm().push(ebx)?;
    k.asm().ret()?;
    k.build()
}

/// Physical and linear layout of [`stack_faults`].
mod stack_pages {
    /// The page directory (the kit's identity table follows it).
    pub const PD: u32 = 0x80_0000;
    /// The page table of the stack pages.
    pub const PT_S: u32 = 0x80_2000;
    /// Linear base of the stack pages (page i at S + i * 4 KiB).
    pub const S: u32 = 0x5000_0000;
    /// The frame of stack page `i`.
    pub const fn frame(i: u32) -> u32 {
        0x90_0000 + i * 0x1000
    }
}

/// Ring-3 runs of pushes and pops, the stack operations whose ESP moves the translator folds
/// into one update per run, faulting in the middle of a run: a push into a present page whose
/// PTE is not dirty yet (a hidden fault for the bt engine's shadow MMU), and a push into a
/// not-present page, which the guest's #PF handler makes present. The handler prints CR2, the
/// error code and the ESP and EIP the fault reports; the process stores what it popped and
/// ESP as it went, and INT 0x81 prints them. Exits with value 0x24.
pub fn stack_faults() -> AsmResult<Vec<u8>> {
    use stack_pages::*;
    const NAMES: [&str; 11] = [
        "esp-after-push-run",
        "ebp-after-fault",
        "esp4-after-fault",
        "pop-ecx",
        "pop-edx",
        "pop-ebx",
        "pop-esi",
        "pop-edi",
        "pop-eax",
        "pop-ebp",
        "esp-after-pop-run",
    ];
    let mut k = Kit::new()?;
    let (gdt, gdtr) = k.descriptor_table(&RING_GDT.map(u64::to_le_bytes).concat());
    let (tss, tss_limit) = com1_tss(&mut k);
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let count = k.data(&[0; 4]);
    let results = k.data(&[0; 4 * NAMES.len()]);
    let user_stack = k.data(&[0u8; 4096]) + 4096;
    // #PF: report, make stack page 1 present, retry the instruction.
    handler_address(&mut k, |k| {
        k.asm().pushad()?;
        k.asm().inc(dword_ptr(count))?;
        k.print("pf cr2=")?;
        k.asm().mov(eax, cr2)?;
        k.print_hex(eax)?;
        k.print(" error=")?;
        k.asm().mov(eax, dword_ptr(esp + 32))?;
        k.print_hex(eax)?;
        k.print(" esp=")?;
        k.asm().mov(eax, dword_ptr(esp + 32 + 16))?; // the frame: error, EIP, CS, EFLAGS, ESP
        k.print_hex(eax)?;
        k.print(" eip=+")?;
        k.asm().mov(eax, dword_ptr(esp + 36))?;
        k.asm().sub(eax, KERNEL_BASE)?;
        k.print_hex(eax)?;
        k.print("\n")?;
        k.asm().mov(dword_ptr(PT_S + 4), frame(1) | 7)?;
        k.asm().mov(eax, cr2)?;
        k.asm().invlpg(ptr(eax))?;
        k.asm().popad()?;
        k.asm().add(esp, 4u32)?;
        Ok(k.asm().iretd()?)
    })?;
    set_gate(&mut k, idt, 14, 0x8E)?;
    // INT 0x81: the report, from ring 0.
    handler_address(&mut k, |k| {
        for (i, name) in NAMES.iter().enumerate() {
            k.asm().mov(eax, dword_ptr(results + 4 * i as u32))?;
            k.print_field(name, eax)?;
        }
        for i in 1..4u32 {
            k.asm().mov(eax, dword_ptr(PT_S + 4 * i))?;
            k.asm().and(eax, 0x67u32)?;
            k.print_field(&format!("pte{i}"), eax)?;
        }
        k.asm().mov(eax, dword_ptr(count))?;
        k.print_field("pf-count", eax)?;
        k.exit(0x24)
    })?;
    set_gate(&mut k, idt, 0x81, 0xEE)?;

    load_tables(&mut k, (gdt, gdtr), idtr, tss, tss_limit)?;
    k.asm().mov(eax, 0x10u32)?;
    k.asm().mov(ds, eax)?;
    k.asm().mov(es, eax)?;
    k.asm().mov(ss, eax)?;
    // Identity 0..4 MiB (user-accessible, so the process runs the kit's code); the stack pages:
    // 1 not present, 2 present but not dirty, 3 present, accessed and dirty.
    k.identity_map_4mib(PD)?;
    k.asm().mov(edi, PT_S)?;
    k.asm().xor(eax, eax)?;
    k.asm().mov(ecx, 1024u32)?;
    k.asm().rep().stosd()?;
    for i in 1..4u32 {
        // 4..16 MiB for the kernel (the tables): supervisor 4 MiB pages.
        k.asm().mov(dword_ptr(PD + 4 * i), (i << 22) | 0x83)?;
    }
    k.asm().mov(dword_ptr(PD + 4 * (S >> 22)), PT_S | 7)?;
    k.asm().mov(dword_ptr(PT_S + 4), frame(1) | 6)?;
    k.asm().mov(dword_ptr(PT_S + 8), frame(2) | 7)?;
    k.asm().mov(dword_ptr(PT_S + 12), frame(3) | 0x67)?;
    k.asm().mov(eax, cr4)?;
    k.asm().or(eax, 0x10u32)?; // PSE
    k.asm().mov(cr4, eax)?;
    k.asm().mov(eax, PD)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 0x8000_0000u32)?;
    k.asm().mov(cr0, eax)?;

    enter_ring3(&mut k, user_stack)?;
    let a = k.asm();
    for (r, v) in [
        (eax, 0xA1u32),
        (ebx, 0xB2),
        (ecx, 0xC3),
        (edx, 0xD4),
        (esi, 0x5E),
        (edi, 0xD1),
        (ebp, 0xBB),
    ] {
        a.mov(r, v)?;
    }
    // A push run from page 3 into page 2 (its first write is a hidden fault for bt's shadow
    // MMU, with two pushes pending), then `[esp+8]` after pushes and ESP as a value.
    a.mov(esp, S + 0x3008)?;
    a.push(eax)?;
    a.push(ebx)?;
    a.push(ecx)?; // S + 0x2FFC: page 2, not dirty
    a.push(edx)?;
    a.push(dword_ptr(esp + 8))?; // EBX's copy
    a.mov(dword_ptr(results), esp)?;
    // A push run into page 1: not present, the guest's #PF handler maps it.
    a.lea(esp, dword_ptr(esp - 0xFF0))?; // S + 0x2004
    a.push(esi)?;
    a.push(edi)?; // S + 0x1FFC: #PF with ESP = S + 0x2000
    a.push(ebp)?;
    a.mov(ebp, esp)?;
    a.mov(eax, dword_ptr(esp + 4))?;
    a.mov(dword_ptr(results + 4), ebp)?;
    a.mov(dword_ptr(results + 8), eax)?;
    // A pop run back up through both runs.
    a.pop(ecx)?;
    a.pop(edx)?;
    a.pop(ebx)?;
    a.lea(esp, dword_ptr(esp + 0xFF0))?;
    a.pop(esi)?;
    a.pop(edi)?;
    a.pop(eax)?;
    a.pop(ebp)?;
    for (i, r) in [ecx, edx, ebx, esi, edi, eax, ebp].into_iter().enumerate() {
        a.mov(dword_ptr(results + 12 + 4 * i as u32), r)?;
    }
    a.mov(dword_ptr(results + 40), esp)?;
    a.int(0x81)?;
    k.halt_forever()?;
    k.build()
}

/// Addresses that must stay inside the guest's 4 GiB: effective addresses that wrap past
/// 4 GiB, the bottom of the address space, and INT 0x80 / SYSENTER, which the host must never
/// see. Exits with value 0x23.
pub fn isolation() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let skip = k.data(&[0; 4]);
    for v in [6u32, 13, 0x80] {
        handler_address(&mut k, |k| {
            k.print(&format!("vector={v:02x}\n"))?;
            if v == 13 {
                k.asm().add(esp, 4u32)?;
            }
            if v != 0x80 {
                k.asm().mov(eax, dword_ptr(skip))?;
                k.asm().add(dword_ptr(esp), eax)?;
            }
            Ok(k.asm().iretd()?)
        })?;
        set_gate(&mut k, idt, v, 0x8E)?;
    }
    k.asm().lidt(ptr(idtr))?;

    // A marker at guest address 0x1000, reached through addresses that wrap past 4 GiB.
    k.asm().mov(dword_ptr(0x1000u32), 0xC0FF_EE00u32)?;
    k.asm().mov(ebx, 0xFFFF_F000u32)?;
    k.asm().mov(eax, dword_ptr(ebx + 0x2000))?;
    k.print_field("wrap_base_disp", eax)?;
    k.asm().mov(ecx, 0x4000_0400u32)?;
    k.asm().mov(eax, dword_ptr(ecx * 4))?; // 0x1_0000_1000 wraps to 0x1000
    k.print_field("wrap_index", eax)?;
    k.asm().mov(edx, 0x8000_0000u32)?;
    k.asm().mov(dword_ptr(edx + edx + 0x1004), 0xBEEFu32)?;
    k.asm().mov(eax, dword_ptr(0x1004u32))?;
    k.print_field("wrap_store", eax)?;
    // The stack at the bottom of the address space: a push at ESP = 4 writes guest address 0.
    k.asm().mov(ebp, esp)?;
    k.asm().mov(esp, 4u32)?;
    k.asm().push(0x5A5Au32)?;
    k.asm().mov(esp, ebp)?;
    k.asm().mov(eax, dword_ptr(0u32))?;
    k.print_field("stack_at_0", eax)?;

    // System-call instructions: through the guest's IDT or its own #UD/#GP, never the host.
    k.asm().int(0x80)?;
    k.asm().mov(dword_ptr(skip), 2u32)?;
    k.asm().sysenter()?; // SYSENTER_CS = 0: #GP(0)
    k.print("survived\n")?;
    k.exit(0x23)?;
    k.build()
}

/// Programs the PIT at 100 Hz and spins in a tight loop (no HLT) with interrupts enabled until
/// the timer handler has counted 10 ticks: interrupts must arrive while translated code runs.
/// Exits with value 0x24.
pub fn spin_timer() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let ticks = count_pit_ticks(&mut k)?;
    k.asm().xor(esi, esi)?;
    k.asm().sti()?;
    let mut again = k.asm().create_label();
    k.asm().set_label(&mut again)?;
    k.asm().inc(esi)?;
    k.asm().cmp(dword_ptr(ticks), 10u32)?;
    k.asm().jb(again)?;
    k.asm().cli()?;
    k.asm().mov(eax, dword_ptr(ticks))?;
    k.print_field("ticks", eax)?;
    k.asm().test(esi, esi)?;
    let mut spun = k.asm().create_label();
    k.asm().jnz(spun)?;
    k.print("the loop never ran\n")?;
    k.asm().set_label(&mut spun)?;
    k.exit(0x24)?;
    k.build()
}

/// Iterations of the benchmark loops.
pub const BENCH_ITERATIONS: u32 = 20_000_000;

/// A tight arithmetic loop: 5 instructions per iteration, [`BENCH_ITERATIONS`] times, then
/// prints a checksum. Exits with value 0x30.
pub fn loop_bench() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    k.asm().mov(ecx, BENCH_ITERATIONS)?;
    k.asm().xor(eax, eax)?;
    k.asm().mov(edx, 0x9E37_79B9u32)?;
    let mut top = k.asm().create_label();
    k.asm().set_label(&mut top)?;
    k.asm().add(eax, edx)?;
    k.asm().rol(eax, 5u32)?;
    k.asm().xor(eax, ecx)?;
    k.asm().dec(ecx)?;
    k.asm().jnz(top)?;
    k.print_field("checksum", eax)?;
    k.exit(0x30)?;
    k.build()
}

/// A call-heavy loop: every iteration calls a function that pushes, calls a leaf, and returns
/// (12 instructions per iteration), [`BENCH_ITERATIONS`] / 4 times. Exits with value 0x31.
pub fn call_bench() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let mut leaf = k.asm().create_label();
    let mut func = k.asm().create_label();
    let mut top = k.asm().create_label();
    let mut done = k.asm().create_label();
    k.asm().mov(ecx, BENCH_ITERATIONS / 4)?;
    k.asm().xor(eax, eax)?;
    k.asm().set_label(&mut top)?;
    k.asm().push(ecx)?;
    k.asm().call(func)?;
    k.asm().pop(ecx)?;
    k.asm().dec(ecx)?;
    k.asm().jnz(top)?;
    k.asm().jmp(done)?;
    k.asm().set_label(&mut func)?;
    k.asm().push(ebx)?;
    k.asm().mov(ebx, dword_ptr(esp + 8))?;
    k.asm().call(leaf)?;
    k.asm().pop(ebx)?;
    k.asm().ret()?;
    k.asm().set_label(&mut leaf)?;
    k.asm().add(eax, ebx)?;
    k.asm().ret()?;
    k.asm().set_label(&mut done)?;
    k.print_field("checksum", eax)?;
    k.exit(0x31)?;
    k.build()
}

/// Emits a handler for each `(vector, name, has_error_code)` of `vectors` that prints `name`,
/// the error code, CR2 (for #PF) and, with `regs`, ECX, ESI and EDI as the faulting
/// instruction left them; then resumes at the address held in the data word `resume_at`.
fn resuming_fault_handlers(
    k: &mut Kit,
    idt: u32,
    vectors: &[(u32, &str, bool)],
    resume_at: u32,
    regs: bool,
) -> AsmResult {
    for &(v, name, has_error) in vectors {
        handler_address(k, |k| {
            if !has_error {
                k.asm().push(0u32)?;
            }
            k.asm().push(eax)?;
            k.print(&format!(" {name} err="))?;
            k.asm().mov(eax, dword_ptr(esp + 4))?;
            k.print_hex(eax)?;
            if v == 14 {
                k.print(" cr2=")?;
                k.asm().mov(eax, cr2)?;
                k.print_hex(eax)?;
            }
            if regs {
                for (label, r) in [(" ecx=", ecx), (" esi=", esi), (" edi=", edi)] {
                    k.print(label)?;
                    k.print_hex(r)?;
                }
                k.print("\n")?;
            }
            k.asm().mov(eax, dword_ptr(resume_at))?;
            k.asm().mov(dword_ptr(esp + 8), eax)?;
            k.asm().pop(eax)?;
            k.asm().add(esp, 4u32)?;
            Ok(k.asm().iretd()?)
        })?;
        set_gate(k, idt, v, 0x8E)?;
    }
    Ok(())
}

/// Emits `body` with the fault handlers armed to resume right after it.
fn guarded(k: &mut Kit, resume_at: u32, body: impl FnOnce(&mut Kit) -> AsmResult) -> AsmResult {
    let slot = k.address_slot();
    k.asm().push(eax)?;
    k.asm().mov(eax, dword_ptr(slot))?;
    k.asm().mov(dword_ptr(resume_at), eax)?;
    k.asm().pop(eax)?;
    body(k)?;
    let mut after = k.asm().create_label();
    k.set_label_at(&mut after, slot)?;
    Ok(k.asm().nop()?)
}

/// Paging layout of [`string_edges`]: 0-4 MiB identity-mapped except page 0 and [`HOLE`], and
/// the last page of the address space mapped to [`TOP_FRAME`].
mod edges {
    pub const PD: u32 = 0x20_0000;
    pub const PT0: u32 = 0x20_1000;
    pub const PT_TOP: u32 = 0x20_2000;
    /// A page left unmapped.
    pub const HOLE: u32 = 0x30_0000;
    /// The frame behind linear 0xFFFFF000.
    pub const TOP_FRAME: u32 = 0x30_2000;
    /// Where the self-writing code runs.
    pub const CODE_BUF: u32 = 0x28_1000;
}

/// String instructions with huge counts running into an unmapped page, off the end of the
/// address space (EDI wraps to 0, unmapped) and backwards (DF=1): each #PF reports the exact
/// partial progress (ECX/ESI/EDI after the iterations that completed, as the Intel SDM
/// describes for REP: the registers are updated per iteration and a fault leaves them
/// restartable). Then overlapping `rep movs` copies in both directions, REPE/REPNE scans
/// that stop on their condition (registers and flags of the element that stopped them), and
/// code that overwrites itself with `rep stosb`: the first time before it ran, the second
/// time after it was translated. Exits with value 0x25.
pub fn string_edges() -> AsmResult<Vec<u8>> {
    use edges::*;
    let mut k = Kit::new()?;
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let resume_at = k.data(&[0; 4]);
    resuming_fault_handlers(
        &mut k,
        idt,
        &[(13, "#GP", true), (14, "#PF", true)],
        resume_at,
        true,
    )?;
    k.asm().lidt(ptr(idtr))?;
    const _: () = assert!(PT0 == PD + 0x1000);
    k.identity_map_4mib(PD)?;
    k.asm().mov(dword_ptr(PT0), 0u32)?;
    k.asm().mov(dword_ptr(PT0 + 4 * (HOLE >> 12)), 0u32)?;
    k.asm().mov(dword_ptr(PD + 4 * 1023), PT_TOP | 3)?;
    k.asm().mov(dword_ptr(PT_TOP + 4 * 1023), TOP_FRAME | 3)?;
    k.asm().mov(eax, PD)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 0x8001_0000u32)?;
    k.asm().mov(cr0, eax)?;

    type Body<'a> = &'a dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let case = |k: &mut Kit, name: &str, body: Body| -> AsmResult {
        k.print(name)?;
        guarded(k, resume_at, |k| {
            body(k.asm())?;
            k.print(" no fault\n")
        })
    };
    case(&mut k, "rep stosd up", &|a| {
        a.cld()?;
        a.mov(eax, 0xA1A1_A1A1u32)?;
        a.mov(edi, HOLE - 0x10)?;
        a.mov(ecx, u32::MAX)?;
        a.rep().stosd()
    })?;
    k.asm().mov(eax, dword_ptr(HOLE - 4))?;
    k.print_field("last dword", eax)?;
    case(&mut k, "rep stosd down", &|a| {
        a.std()?;
        a.mov(eax, 0xB2B2_B2B2u32)?;
        a.mov(edi, HOLE + 0x100C)?;
        a.mov(ecx, 0x7FFF_FFFFu32)?;
        a.rep().stosd()?;
        a.cld()
    })?;
    k.asm().cld()?;
    k.asm().mov(eax, dword_ptr(HOLE + 0x1000))?;
    k.print_field("lowest dword", eax)?;
    case(&mut k, "rep movsd from the hole", &|a| {
        a.mov(esi, HOLE - 8)?;
        a.mov(edi, 0x28_0000u32)?;
        a.mov(ecx, 0x4000_0000u32)?;
        a.rep().movsd()
    })?;
    k.asm().mov(eax, dword_ptr(0x28_0004u32))?;
    k.print_field("copied", eax)?;
    case(&mut k, "rep stosd off the top", &|a| {
        a.mov(eax, 0xC3C3_C3C3u32)?;
        a.mov(edi, 0xFFFF_FFF8u32)?;
        a.mov(ecx, 0x1000_0000u32)?;
        a.rep().stosd()
    })?;
    k.asm().mov(eax, dword_ptr(0xFFFF_FFFCu32))?;
    k.print_field("top dword", eax)?;
    case(&mut k, "repne scasb", &|a| {
        a.mov(al, 0x5Au32)?;
        a.mov(edi, HOLE - 0x100)?;
        a.mov(ecx, u32::MAX)?;
        a.repne().scasb()
    })?;
    case(&mut k, "repe cmpsd", &|a| {
        a.mov(esi, HOLE - 0x10)?;
        a.mov(edi, HOLE - 0x10)?;
        a.mov(ecx, u32::MAX)?;
        a.repe().cmpsd()
    })?;
    case(&mut k, "lodsb", &|a| {
        a.mov(esi, HOLE)?;
        a.mov(ecx, 0x1234u32)?;
        a.lodsb()
    })?;
    case(&mut k, "rep movsb, ecx=0", &|a| {
        a.mov(esi, HOLE)?;
        a.mov(edi, 0u32)?;
        a.xor(ecx, ecx)?;
        a.rep().movsb()
    })?;

    // Overlapping copies, element by element as the SDM defines REP MOVS: forward with the
    // destination one byte above the source replicates the first byte; backward with the
    // destination below the source replicates the top dword; forward with the destination
    // below the source is a plain memmove. Each buffer starts as the bytes 0, 1, 2, ... 63.
    let pattern: Vec<u8> = (0..64).collect();
    let pattern = k.data(&pattern);
    for (name, buf, esi_off, edi_off, count, down, dword, shown) in [
        (
            "overlap up movsb",
            0x28_2000u32,
            0u32,
            1u32,
            32u32,
            false,
            false,
            32u32,
        ),
        ("overlap down movsd", 0x28_3000, 32, 28, 8, true, true, 0),
        ("memmove up movsd", 0x28_4000, 4, 0, 8, false, true, 28),
    ] {
        k.asm().cld()?;
        k.asm().mov(esi, pattern)?;
        k.asm().mov(edi, buf)?;
        k.asm().mov(ecx, 16u32)?;
        k.asm().rep().movsd()?;
        k.asm().mov(esi, buf + esi_off)?;
        k.asm().mov(edi, buf + edi_off)?;
        k.asm().mov(ecx, count)?;
        if down {
            k.asm().std()?;
        }
        if dword {
            k.asm().rep().movsd()?;
        } else {
            k.asm().rep().movsb()?;
        }
        k.asm().cld()?;
        k.asm().mov(eax, dword_ptr(buf + shown))?;
        k.print_field(name, eax)?;
    }

    // Scans that stop inside a page on their condition: ECX, EDI (and ESI) count the element
    // that stopped them, and the flags are those of its comparison. The pattern is unchanged;
    // the first overlap buffer now holds 0 x 33, then 33, 34, ...
    for (name, down, cmps, repe, start, value, count) in [
        ("repne scasb up", false, false, false, 0u32, 0x20u32, 100u32),
        ("repne scasb down", true, false, false, 63, 0x05, 100),
        ("repe scasb up", false, false, true, 0, 0x00, 100),
        ("repe cmpsb up", false, true, true, 0, 0, 10),
        ("repne cmpsb up", false, true, false, 1, 0, 100),
    ] {
        if down {
            k.asm().std()?;
        }
        k.asm().mov(eax, value)?;
        k.asm().mov(edi, pattern + start)?;
        k.asm().mov(esi, 0x28_2000 + start)?;
        k.asm().mov(ecx, count)?;
        match (cmps, repe) {
            (false, false) => k.asm().repne().scasb()?,
            (false, true) => k.asm().repe().scasb()?,
            (true, false) => k.asm().repne().cmpsb()?,
            (true, true) => k.asm().repe().cmpsb()?,
        }
        k.asm().pushfd()?;
        k.asm().cld()?;
        k.asm().sub(edi, pattern)?;
        k.asm().sub(esi, 0x28_2000u32)?;
        k.print_field(&format!("{name} ecx"), ecx)?;
        k.print_field(" edi", edi)?;
        k.print_field(" esi", esi)?;
        k.asm().pop(eax)?;
        k.asm().and(eax, 0x8D5u32)?;
        k.print_field(" flags", eax)?;
    }

    // Code that overwrites itself: `rep stosb` (AL = NOP) over the `mov eax, 0xDEADBEEF`
    // after it. The CPU runs the bytes as they are after the store (Intel SDM vol. 3, 11.6:
    // a write to code already fetched is detected and the new code runs).
    let template = k.data(&[0xF3, 0xAA, 0xB8, 0xEF, 0xBE, 0xAD, 0xDE, 0xC3]);
    for (round, count) in [(0, 5u32), (1, 0), (2, 5)] {
        if round != 2 {
            k.asm().mov(esi, template)?;
            k.asm().mov(edi, CODE_BUF)?;
            k.asm().mov(ecx, 2u32)?;
            k.asm().rep().movsd()?;
        }
        k.asm().mov(eax, 0x1234_5690u32)?;
        k.asm().mov(edi, CODE_BUF + 2)?;
        k.asm().mov(ecx, count)?;
        k.asm().mov(ebx, CODE_BUF)?;
        k.asm().call(ebx)?;
        k.print_field(&format!("self-write {round}"), eax)?;
    }
    k.exit(0x25)?;
    k.build()
}

/// Flat code and data segments for each privilege level, and the TSS.
const LEVELS_GDT: [u64; 10] = [
    0,
    0x00CF_9B00_0000_FFFF, // 0x08 code, DPL 0 (SYSENTER_CS)
    0x00CF_9300_0000_FFFF, // 0x10 data, DPL 0
    0x00CF_FB00_0000_FFFF, // 0x18 code, DPL 3 (what SYSEXIT loads)
    0x00CF_F300_0000_FFFF, // 0x20 data, DPL 3
    0,                     // 0x28 TSS, built at run time
    0x00CF_BB00_0000_FFFF, // 0x30 code, DPL 1
    0x00CF_B300_0000_FFFF, // 0x38 data, DPL 1
    0x00CF_DB00_0000_FFFF, // 0x40 code, DPL 2
    0x00CF_D300_0000_FFFF, // 0x48 data, DPL 2
];

/// `int 0x80` (a DPL-3 gate), `int 0x83` (a DPL-0 gate), `syscall`, `sysret`, `sysenter` and
/// `sysexit` at CPL 0, 1, 2 and 3. None may reach the host: INT goes through the guest's IDT
/// (#GP(0x41A) through the DPL-0 gate above CPL 0); SYSCALL and SYSRET are #UD outside long
/// mode on this Intel CPU (Pentium M CPUID: no SYSCALL; Intel SDM vol. 2); SYSENTER is #GP(0)
/// while SYSENTER_CS is 0, then enters CPL 0 from every level; SYSEXIT is #GP(0) above CPL 0.
/// Exits with value 0x26.
pub fn syscalls() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let (gdt, gdtr) = k.descriptor_table(&LEVELS_GDT.map(u64::to_le_bytes).concat());
    let (tss, tss_limit) = crate::kernels::com1_tss(&mut k);
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let resume_at = k.data(&[0; 4]);
    let next_level = k.data(&[0; 4]);
    let stacks: Vec<u32> = (0..4).map(|_| k.data(&[0u8; 2048]) + 2048).collect();
    let sysenter_stack = k.data(&[0u8; 2048]) + 2048;
    resuming_fault_handlers(
        &mut k,
        idt,
        &[(6, "#UD", false), (13, "#GP", true)],
        resume_at,
        false,
    )?;
    // INT 0x80 (DPL 3) and INT 0x83 (DPL 0): print the caller's CS.
    for (v, access) in [(0x80u32, 0xEEu32), (0x83, 0x8E)] {
        handler_address(&mut k, |k| {
            k.print(&format!(" int{v:02x} from cs="))?;
            k.asm().push(eax)?;
            k.asm().mov(eax, dword_ptr(esp + 8))?;
            k.print_hex(eax)?;
            k.asm().pop(eax)?;
            Ok(k.asm().iretd()?)
        })?;
        set_gate(&mut k, idt, v, access)?;
    }
    // INT 0x82 (DPL 3): back to CPL 0, dropping the outer level's frame, on to the next level.
    handler_address(&mut k, |k| {
        k.asm().add(esp, 20u32)?;
        Ok(k.asm().jmp(dword_ptr(next_level))?)
    })?;
    set_gate(&mut k, idt, 0x82, 0xEE)?;
    load_tables(&mut k, (gdt, gdtr), idtr, tss, tss_limit)?;

    // SYSENTER while SYSENTER_CS is 0: #GP(0).
    k.print("cpl0 before the MSRs:")?;
    guarded(&mut k, resume_at, |k| Ok(k.asm().sysenter()?))?;
    k.print("\n")?;
    // SYSENTER's target: prints CS and the caller's level (EBX = its CS, ECX = its ESP, EDX =
    // where to resume), then goes back: an IRET frame to an outer level, a jump at CPL 0.
    let target = k.address_slot();
    k.asm().mov(ecx, 0x174u32)?;
    k.asm().mov(eax, 0x08u32)?;
    k.asm().xor(edx, edx)?;
    k.asm().wrmsr()?;
    k.asm().mov(ecx, 0x175u32)?;
    k.asm().mov(eax, sysenter_stack)?;
    k.asm().wrmsr()?;
    k.asm().mov(ecx, 0x176u32)?;
    k.asm().mov(eax, dword_ptr(target))?;
    k.asm().wrmsr()?;

    let levels = [
        (0u32, 0x08u32, 0x10u32),
        (1, 0x31, 0x39),
        (2, 0x42, 0x4A),
        (3, 0x1B, 0x23),
    ];
    for (level, code_sel, stack_sel) in levels {
        let stack = stacks[level as usize];
        if level > 0 {
            // Into the level with IRET; INT 0x82 brings the code after the probes back.
            let (entry, next) = (k.address_slot(), k.address_slot());
            k.asm().mov(eax, dword_ptr(next))?;
            k.asm().mov(dword_ptr(next_level), eax)?;
            k.asm().push(stack_sel)?;
            k.asm().push(stack)?;
            k.asm().push(0x2u32)?;
            k.asm().push(code_sel)?;
            k.asm().push(dword_ptr(entry))?;
            k.asm().iretd()?;
            let mut at = k.asm().create_label();
            k.set_label_at(&mut at, entry)?;
            k.asm().mov(eax, stack_sel)?;
            k.asm().mov(ds, eax)?;
            k.asm().mov(es, eax)?;
            probes(&mut k, level, code_sel, resume_at)?;
            k.asm().int(0x82)?;
            let mut back = k.asm().create_label();
            k.set_label_at(&mut back, next)?;
            k.asm().mov(eax, 0x10u32)?;
            k.asm().mov(ds, eax)?;
            k.asm().mov(es, eax)?;
        } else {
            probes(&mut k, level, code_sel, resume_at)?;
        }
    }
    k.exit(0x26)?;

    let mut at = k.asm().create_label();
    k.set_label_at(&mut at, target)?;
    k.print(" sysenter to cs=")?;
    k.asm().xor(eax, eax)?;
    k.asm().mov(ax, cs)?;
    k.print_hex(eax)?;
    let mut outer = k.asm().create_label();
    k.asm().test(ebx, 3u32)?;
    k.asm().jnz(outer)?;
    k.asm().mov(esp, ecx)?;
    k.asm().jmp(edx)?;
    k.asm().set_label(&mut outer)?;
    k.asm().lea(eax, dword_ptr(ebx + 8))?; // the level's data selector
    k.asm().push(eax)?;
    k.asm().push(ecx)?;
    k.asm().push(0x2u32)?;
    k.asm().push(ebx)?;
    k.asm().push(edx)?;
    k.asm().iretd()?;
    k.build()
}

/// The system-call instructions at one level (code selector `code_sel`), printing one line.
fn probes(k: &mut Kit, level: u32, code_sel: u32, resume_at: u32) -> AsmResult {
    k.print(&format!("cpl{level}:"))?;
    k.asm().int(0x80)?;
    guarded(k, resume_at, |k| Ok(k.asm().int(0x83)?))?;
    guarded(k, resume_at, |k| Ok(k.asm().syscall()?))?;
    guarded(k, resume_at, |k| Ok(k.asm().sysret()?))?;
    if level > 0 {
        guarded(k, resume_at, |k| Ok(k.asm().sysexit()?))?;
    }
    // SYSENTER, coming back to the label after it.
    let back = k.address_slot();
    k.asm().mov(ebx, code_sel)?;
    k.asm().mov(ecx, esp)?;
    k.asm().mov(edx, dword_ptr(back))?;
    k.asm().sysenter()?;
    let mut after = k.asm().create_label();
    k.set_label_at(&mut after, back)?;
    k.asm().xor(eax, eax)?;
    k.asm().mov(ax, ss)?;
    k.print(" back at ss=")?;
    k.print_hex(eax)?;
    k.print("\n")
}

/// Data segments whose base makes offsets wrap past 4 GiB, an expand-down segment and a
/// byte-granular one, reached through FS, ES (string stores) and DS. Exits with value 0x27.
///
/// Limit violations raise #GP(0) with nothing stored (Intel SDM vol. 3, 5.3: the limit check
/// comes before the access; for an expand-down segment with B=1 the valid offsets are
/// limit+1 to 0xFFFFFFFF). QEMU's TCG does not check data-segment limits, so the SDM, not
/// QEMU, decides this kernel's output.
pub fn segment_edges() -> AsmResult<Vec<u8>> {
    const GDT: [u64; 6] = [
        0,
        0x00CF_9B00_0000_FFFF, // 0x08 code, flat
        0x00CF_9300_0000_FFFF, // 0x10 data, flat
        0xFFCF_93FF_F000_FFFF, // 0x18 data, base 0xFFFFF000, limit 4 GiB
        0x0040_9720_0000_FFFF, // 0x20 data, expand-down, base 0x200000, limit 0xFFFF, B=1
        0x0040_9320_0000_0FFF, // 0x28 data, base 0x200000, byte-granular limit 0xFFF
    ];
    let mut k = Kit::new()?;
    let (_, gdtr) = k.descriptor_table(&GDT.map(u64::to_le_bytes).concat());
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let resume_at = k.data(&[0; 4]);
    resuming_fault_handlers(&mut k, idt, &[(13, "#GP", true)], resume_at, true)?;
    k.asm().lgdt(ptr(gdtr))?;
    k.asm().lidt(ptr(idtr))?;
    // The multiboot entry's CS is 0x08 and DS 0x10, as in this GDT.
    k.asm().mov(eax, 0x10u32)?;
    k.asm().mov(ds, eax)?;
    k.asm().mov(es, eax)?;
    k.asm().mov(ss, eax)?;

    // Base 0xFFFFF000: offset 0x2000 is linear 0x1000 (the sum wraps modulo 4 GiB).
    k.asm().mov(dword_ptr(0x1000u32), 0xC0FF_EE01u32)?;
    k.asm().mov(eax, 0x18u32)?;
    k.asm().mov(fs, eax)?;
    k.asm().mov(eax, dword_ptr(0x2000u32).fs())?;
    k.print_field("fs wrap load", eax)?;
    k.asm().mov(ebx, 0x1000u32)?;
    k.asm().mov(dword_ptr(ebx + 0x1008).fs(), 0xC0FF_EE02u32)?;
    k.asm().mov(eax, dword_ptr(0x1008u32))?;
    k.print_field("fs wrap store", eax)?;
    // ES with that base: string stores wrap too.
    k.asm().mov(eax, 0x18u32)?;
    k.asm().mov(es, eax)?;
    k.asm().cld()?;
    k.asm().mov(edi, 0x2010u32)?;
    k.asm().mov(ecx, 2u32)?;
    k.asm().mov(eax, 0xC0FF_EE03u32)?;
    k.asm().rep().stosd()?;
    k.asm().mov(eax, 0x10u32)?;
    k.asm().mov(es, eax)?;
    k.asm().mov(eax, dword_ptr(0x1014u32))?;
    k.print_field("es wrap rep stosd", eax)?;
    // DS with that base (nothing may print until DS is flat again).
    k.asm().mov(eax, 0x18u32)?;
    k.asm().mov(ds, eax)?;
    k.asm().mov(edx, dword_ptr(0x2000u32))?;
    k.asm().mov(eax, 0x10u32)?;
    k.asm().mov(ds, eax)?;
    k.print_field("ds wrap load", edx)?;

    // Expand-down: offsets 0x10000 and up are valid; 0xFFFFFFFC is linear 0x1FFFFC.
    k.asm().mov(eax, 0x20u32)?;
    k.asm().mov(fs, eax)?;
    k.asm().mov(dword_ptr(0x21_0000u32), 0x0D0D_0001u32)?;
    k.asm().mov(eax, dword_ptr(0x1_0000u32).fs())?;
    k.print_field("expand-down at 0x10000", eax)?;
    k.asm()
        .mov(dword_ptr(0xFFFF_FFFCu32).fs(), 0x0D0D_0002u32)?;
    k.asm().mov(eax, dword_ptr(0x1F_FFFCu32))?;
    k.print_field("expand-down at 0xfffffffc", eax)?;
    for offset in [0xFFFCu32, 0xFFFE] {
        k.print(&format!("expand-down at {offset:#x}:"))?;
        guarded(&mut k, resume_at, |k| {
            k.asm().xor(ecx, ecx)?;
            k.asm().xor(esi, esi)?;
            k.asm().xor(edi, edi)?;
            k.asm().mov(dword_ptr(offset).fs(), 0xBADu32)?;
            k.print(" no fault\n")
        })?;
    }
    k.asm().mov(eax, dword_ptr(0x20_FFFCu32))?;
    k.print_field("below the limit, untouched", eax)?;

    // Limit 0xFFF: rep stosb stops with #GP at the first byte past it; a dword straddling the
    // limit stores nothing.
    k.asm().mov(eax, 0x28u32)?;
    k.asm().mov(es, eax)?;
    k.print("rep stosb past the limit:")?;
    guarded(&mut k, resume_at, |k| {
        k.asm().mov(edi, 0xFF0u32)?;
        k.asm().mov(ecx, 0x20u32)?;
        k.asm().xor(esi, esi)?;
        k.asm().mov(al, 0x77u32)?;
        k.asm().rep().stosb()?;
        k.print(" no fault\n")
    })?;
    k.print("dword across the limit:")?;
    guarded(&mut k, resume_at, |k| {
        k.asm().mov(dword_ptr(0xFFEu32).es(), 0x1111_1111u32)?;
        k.print(" no fault\n")
    })?;
    k.asm().mov(eax, 0x10u32)?;
    k.asm().mov(es, eax)?;
    k.asm().mov(eax, dword_ptr(0x20_0FFCu32))?;
    k.print_field("last dword in the limit", eax)?;
    k.asm().mov(eax, dword_ptr(0x20_1000u32))?;
    k.print_field("first dword past it", eax)?;
    k.exit(0x27)?;
    k.build()
}

/// An instruction that straddles two pages (`mov eax, imm32` whose last three immediate bytes
/// and the `ret` are on the second page): run, run again, then with the second page remapped
/// to another frame (INVLPG), then with that frame's code rewritten. Each call must see the
/// bytes the page tables and memory hold at that moment. Exits with value 0x28.
pub fn page_straddle() -> AsmResult<Vec<u8>> {
    use edges::{PD, PT0};
    const FIRST: u32 = 0x32_0000;
    const SECOND: u32 = FIRST + 0x1000;
    const OTHER_FRAME: u32 = 0x33_1000;
    let mut k = Kit::new()?;
    k.identity_map_4mib(PD)?;
    k.asm().mov(eax, PD)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 0x8001_0000u32)?;
    k.asm().mov(cr0, eax)?;
    k.asm().mov(word_ptr(SECOND - 2), 0x11B8u32)?;
    k.asm().mov(dword_ptr(SECOND), 0xC344_3322u32)?;
    k.asm().mov(dword_ptr(OTHER_FRAME), 0xC377_8899u32)?;
    k.asm().mov(ebx, SECOND - 2)?;
    for round in 0..2 {
        k.asm().call(ebx)?;
        k.print_field(&format!("straddle {round}"), eax)?;
    }
    k.asm()
        .mov(dword_ptr(PT0 + 4 * (SECOND >> 12)), OTHER_FRAME | 3)?;
    k.asm().invlpg(byte_ptr(SECOND))?;
    k.asm().call(ebx)?;
    k.print_field("second page remapped", eax)?;
    k.asm().mov(byte_ptr(SECOND), 0x55u32)?;
    k.asm().call(ebx)?;
    k.print_field("second page rewritten", eax)?;
    k.exit(0x28)?;
    k.build()
}

/// Direct calls from one page into code on a global page (CR4.PGE on, G set in its PTE),
/// made often enough in a loop that bt chains them straight to the target's unit; then the
/// page remapped to another frame (PTE write and INVLPG) and back (PTE write and a CR4.PGE
/// toggle, which flushes global translations: Intel SDM vol. 3, 4.10.4.1). Each loop must
/// run the code the mapping shows at the time: a chain to code on another page is only
/// good while that mapping lasts. Exits with value 0x2A.
pub fn global_chains() -> AsmResult<Vec<u8>> {
    use edges::{PD, PT0};
    const TARGET: u32 = 0x32_0000;
    const OTHER_FRAME: u32 = 0x33_1000;
    const PTE: u32 = PT0 + 4 * (TARGET >> 12);
    const GLOBAL: u32 = 0x103; // present, writable, global
    let mut k = Kit::new()?;
    k.identity_map_4mib(PD)?;
    // `mov eax, imm32; ret` in both frames.
    for (frame, value) in [(TARGET, 0x1111_1111u32), (OTHER_FRAME, 0x2222_2222)] {
        k.asm().mov(byte_ptr(frame), 0xB8u32)?;
        k.asm().mov(dword_ptr(frame + 1), value)?;
        k.asm().mov(byte_ptr(frame + 5), 0xC3u32)?;
    }
    k.asm().mov(dword_ptr(PTE), TARGET | GLOBAL)?;
    k.asm().mov(eax, PD)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, cr4)?;
    k.asm().or(eax, 0x80u32)?;
    k.asm().mov(cr4, eax)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 0x8001_0000u32)?;
    k.asm().mov(cr0, eax)?;
    // One call site for every round: its chain must follow the mapping.
    let (mut calls, mut start) = (k.asm().create_label(), k.asm().create_label());
    k.asm().jmp(start)?;
    let mut again = k.asm().create_label();
    k.asm().set_label(&mut calls)?;
    k.asm().mov(ecx, 50u32)?;
    k.asm().set_label(&mut again)?;
    k.asm().call(u64::from(TARGET))?;
    k.asm().dec(ecx)?;
    k.asm().jnz(again)?;
    k.asm().ret()?;
    k.asm().set_label(&mut start)?;
    let calls = |k: &mut Kit, label: &str| -> AsmResult {
        k.asm().call(calls)?;
        k.print_field(label, eax)
    };
    calls(&mut k, "global")?;
    k.asm().mov(dword_ptr(PTE), OTHER_FRAME | GLOBAL)?;
    k.asm().invlpg(byte_ptr(TARGET))?;
    calls(&mut k, "remapped")?;
    k.asm().mov(dword_ptr(PTE), TARGET | GLOBAL)?;
    k.asm().mov(eax, cr4)?;
    k.asm().and(eax, !0x80u32)?;
    k.asm().mov(cr4, eax)?;
    k.asm().or(eax, 0x80u32)?;
    k.asm().mov(cr4, eax)?;
    calls(&mut k, "back")?;
    k.exit(0x2A)?;
    k.build()
}

/// Layout of [`segment_bases`].
mod based {
    /// DS's base (selector 0x18).
    pub const DS_BASE: u32 = 0x0001_0000;
    /// ES's base (selector 0x20).
    pub const ES_BASE: u32 = 0x0002_0000;
    /// SS's base (selector 0x28).
    pub const SS_BASE: u32 = 0x0003_0000;
    /// A base whose sums with most offsets wrap past 4 GiB (selector 0x30).
    pub const WRAP_BASE: u32 = 0xFFF0_0000;
    /// 64 dwords of pattern A (linear).
    pub const DATA_A: u32 = 0x30_0000;
    /// 64 dwords of pattern B: DS:DATA_A with DS's base.
    pub const DATA_B: u32 = DATA_A + DS_BASE;
    /// ES:DATA_A with ES's base: where string stores land.
    pub const DEST: u32 = DATA_A + ES_BASE;
    /// A page left unmapped.
    pub const HOLE: u32 = 0x36_0000;
    /// Page directory (and its page table after it).
    pub const PD: u32 = 0x38_0000;
}

/// Translated code through DS, ES and SS data segments with non-zero bases and 4 GiB limits,
/// and one base (0xFFF00000) whose sums with offsets wrap past 4 GiB: the same function summed
/// through a flat and a based DS (units of one mode must not run in the other), calls, frames,
/// pushes and pops on a based SS (and on the wrapping one), MOVS/LODS/STOS/CMPS/SCAS between a
/// based DS and ES, a source override to SS, XLAT and an indirect call through a based DS, then
/// page faults through each segment: the handler prints the error code, CR2 (base + offset,
/// modulo 4 GiB: Intel SDM vol. 3, 3.4 and 4.7) and the registers as the faulting instruction
/// saw them. Exits with value 0x29.
pub fn segment_bases() -> AsmResult<Vec<u8>> {
    use based::*;
    const GDT: [u64; 7] = [
        0,
        0x00CF_9B00_0000_FFFF, // 0x08 code, flat
        0x00CF_9300_0000_FFFF, // 0x10 data, flat
        0x00CF_9301_0000_FFFF, // 0x18 data, base 0x00010000, limit 4 GiB
        0x00CF_9302_0000_FFFF, // 0x20 data, base 0x00020000
        0x00CF_9303_0000_FFFF, // 0x28 data, base 0x00030000
        0xFFCF_93F0_0000_FFFF, // 0x30 data, base 0xFFF00000
    ];
    let mut k = Kit::new()?;
    let (_, gdtr) = k.descriptor_table(&GDT.map(u64::to_le_bytes).concat());
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let resume_at = k.data(&[0; 4]);
    let triple_at = k.address_slot();
    let (mut sum16, mut frame, mut triple) = (
        k.asm().create_label(),
        k.asm().create_label(),
        k.asm().create_label(),
    );

    // #PF: prints with DS and ES flat (it may interrupt code with any), on the interrupted
    // code's stack (SS unchanged at CPL 0), then resumes at `resume_at`.
    handler_address(&mut k, |k| {
        k.asm().push(ds)?;
        k.asm().push(es)?;
        k.asm().push(eax)?;
        k.asm().mov(eax, 0x10u32)?;
        k.asm().mov(ds, eax)?;
        k.asm().mov(es, eax)?;
        k.print(" #PF err=")?;
        k.asm().mov(eax, dword_ptr(esp + 12))?;
        k.print_hex(eax)?;
        k.print(" cr2=")?;
        k.asm().mov(eax, cr2)?;
        k.print_hex(eax)?;
        k.print(" eip=+")?;
        k.asm().mov(eax, dword_ptr(esp + 16))?;
        k.asm().sub(eax, KERNEL_BASE)?;
        k.print_hex(eax)?;
        for (label, r) in [(" ecx=", ecx), (" esi=", esi), (" edi=", edi)] {
            k.print(label)?;
            k.print_hex(r)?;
        }
        // ESP before the exception frame: three pushes, the error code, EIP, CS, EFLAGS.
        k.asm().lea(eax, dword_ptr(esp + 28))?;
        k.print(" esp=")?;
        k.print_hex(eax)?;
        k.print("\n")?;
        k.asm().mov(eax, dword_ptr(resume_at))?;
        k.asm().mov(dword_ptr(esp + 16), eax)?;
        k.asm().pop(eax)?;
        k.asm().pop(es)?;
        k.asm().pop(ds)?;
        k.asm().add(esp, 4u32)?;
        Ok(k.asm().iretd()?)
    })?;
    set_gate(&mut k, idt, 14, 0x8E)?;

    // Paging: 0-4 MiB identity-mapped except HOLE.
    k.identity_map_4mib(PD)?;
    k.asm()
        .mov(dword_ptr(PD + 0x1000 + 4 * (HOLE >> 12)), 0u32)?;
    k.asm().mov(eax, PD)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 0x8000_0000u32)?;
    k.asm().mov(cr0, eax)?;
    k.asm().lgdt(ptr(gdtr))?;
    k.asm().lidt(ptr(idtr))?;
    // The multiboot entry's CS is 0x08 and DS 0x10, as in this GDT; FS stays flat throughout.
    k.asm().mov(eax, 0x10u32)?;
    for s in [ds, es, fs, ss] {
        k.asm().mov(s, eax)?;
    }
    // Patterns A and B, DEST cleared, `triple`'s address in B's dword 0x40.
    k.asm().cld()?;
    for (at, first, step) in [
        (DATA_A, 0xA000_0001u32, 0x0101_0101u32),
        (DATA_B, 0xB000_0003, 0x0203_0405),
        (DEST, 0, 0),
    ] {
        k.asm().mov(edi, at)?;
        k.asm().mov(eax, first)?;
        k.asm().mov(ecx, 64u32)?;
        let mut fill = k.asm().create_label();
        k.asm().set_label(&mut fill)?;
        k.asm().stosd()?;
        k.asm().add(eax, step)?;
        k.asm().loop_(fill)?;
    }
    k.asm().mov(eax, dword_ptr(triple_at))?;
    k.asm().mov(dword_ptr(DATA_B + 0x100), eax)?;

    let load = |k: &mut Kit, s: AsmRegisterSegment, sel: u32| -> AsmResult {
        k.asm().push(eax)?;
        k.asm().mov(eax, sel)?;
        k.asm().mov(s, eax)?;
        Ok(k.asm().pop(eax)?)
    };

    // 1. The same function through a flat DS, a based one, and flat again.
    for (label, sel) in [
        ("sum ds flat", 0x10),
        ("sum ds based", 0x18),
        ("sum ds flat again", 0x10),
    ] {
        load(&mut k, ds, sel)?;
        k.asm().mov(ebx, DATA_A)?;
        k.asm().call(sum16)?;
        load(&mut k, ds, 0x10)?;
        k.print_field(label, eax)?;
    }

    // 2. Frames on a based SS (the same linear stack: ESP becomes ESP - base), DS based too.
    k.asm().mov(eax, esp)?;
    k.asm().sub(eax, SS_BASE)?;
    k.asm().mov(ecx, 0x28u32)?;
    k.asm().mov(ss, ecx)?;
    k.asm().mov(esp, eax)?;
    let frames = |k: &mut Kit, label: &str, ds_sel: u32| -> AsmResult {
        load(k, ds, ds_sel)?;
        k.asm().xor(edx, edx)?;
        k.asm().mov(ecx, 5u32)?;
        let mut again = k.asm().create_label();
        k.asm().set_label(&mut again)?;
        k.asm().push(ecx)?;
        k.asm().push(ecx)?;
        k.asm().call(frame)?;
        k.asm().pop(ecx)?;
        k.asm().add(edx, eax)?;
        k.asm().loop_(again)?;
        load(k, ds, 0x10)?;
        k.print_field(label, edx)?;
        k.asm().mov(eax, esp)?;
        k.print_field("  esp", eax)
    };
    frames(&mut k, "frames ss based ds based", 0x18)?;

    // 3. String instructions, XLAT and an indirect call: DS and ES based.
    load(&mut k, ds, 0x18)?;
    load(&mut k, es, 0x20)?;
    k.asm().mov(esi, DATA_A)?;
    k.asm().mov(edi, DATA_A)?;
    for _ in 0..4 {
        k.asm().movsd()?;
    }
    k.asm().lodsd()?;
    k.asm().stosd()?;
    k.asm().mov(esi, DATA_A + 4)?;
    k.asm().mov(edi, DATA_A + 4)?;
    k.asm().cmpsd()?;
    k.asm().sete(bl)?;
    k.asm().mov(eax, dword_ptr(DATA_A + 8))?;
    k.asm().scasd()?;
    k.asm().sete(bh)?;
    k.asm().std()?;
    k.asm().mov(esi, DATA_A + 0x23)?;
    k.asm().mov(edi, DATA_A + 0x40)?;
    k.asm().movsb()?;
    k.asm().cld()?;
    // SS:ESI (a source override) to ES:EDI: pattern A's bytes 0x10.. (linear).
    k.asm().mov(esi, DATA_A - SS_BASE + 0x10)?;
    k.asm().mov(edi, DATA_A + 0x44)?;
    k.asm().db(&[0x36, 0xA5])?; // movsd ss:[esi], es:[edi]
    // REP MOVSD (the interpreter's) from pattern B's dword 0x20 on.
    k.asm().mov(esi, DATA_A + 0x80)?;
    k.asm().mov(ecx, 3u32)?;
    k.asm().rep().movsd()?;
    k.asm().push(esi)?;
    k.asm().push(edi)?;
    k.asm().mov(eax, 0x0000_0007u32)?;
    k.asm().push(ebx)?;
    k.asm().mov(ebx, DATA_A)?;
    k.asm().xlatb()?;
    k.asm().pop(ebx)?;
    k.asm().mov(ecx, 0x0000_0021u32)?;
    k.asm().call(dword_ptr(DATA_A + 0x100))?;
    k.asm().mov(edx, eax)?;
    load(&mut k, ds, 0x10)?;
    load(&mut k, es, 0x10)?;
    k.asm().pop(edi)?;
    k.asm().pop(esi)?;
    k.print_field("strings esi", esi)?;
    k.print_field("strings edi", edi)?;
    k.asm().movzx(eax, bx)?;
    k.print_field("cmpsd/scasd equal", eax)?;
    k.print_field("xlat and indirect call", edx)?;
    k.asm().mov(ebx, DEST)?;
    k.asm().call(sum16)?;
    k.print_field("dest sum", eax)?;
    k.asm().mov(eax, dword_ptr(DEST + 0x40))?;
    k.print_field("dest 0x40", eax)?;

    // 4. The wrapping base: DS, then SS too (ESP + 0x100000 + 0x30000 is the same linear stack).
    load(&mut k, ds, 0x30)?;
    k.asm().mov(ebx, DATA_A.wrapping_sub(WRAP_BASE))?;
    k.asm().mov(ecx, dword_ptr(ebx + 8))?;
    k.asm().mov(dword_ptr(ebx + 0x3C), 0x5EC0_0001u32)?;
    k.asm().lea(esi, dword_ptr(ebx + 0x10))?;
    k.asm().lodsd()?;
    k.asm().mov(edi, eax)?;
    k.asm().call(sum16)?;
    k.asm().mov(edx, eax)?;
    load(&mut k, ds, 0x10)?;
    k.print_field("wrap load", ecx)?;
    k.print_field("wrap lodsd", edi)?;
    k.print_field("wrap sum", edx)?;
    k.asm().mov(eax, dword_ptr(DATA_A + 0x3C))?;
    k.print_field("wrap store", eax)?;
    k.asm().mov(eax, esp)?;
    k.asm().add(eax, SS_BASE.wrapping_sub(WRAP_BASE))?;
    k.asm().mov(ecx, 0x30u32)?;
    k.asm().mov(ss, ecx)?;
    k.asm().mov(esp, eax)?;
    frames(&mut k, "frames ss wrap ds flat", 0x10)?;
    k.asm().mov(eax, esp)?;
    k.asm().add(eax, WRAP_BASE.wrapping_sub(SS_BASE))?;
    k.asm().mov(ecx, 0x28u32)?;
    k.asm().mov(ss, ecx)?;
    k.asm().mov(esp, eax)?;

    // 5. Page faults through each segment (DS and ES based; FS flat keeps `resume_at` in reach).
    let guarded_fs =
        |k: &mut Kit, label: &str, body: &dyn Fn(&mut Kit) -> AsmResult| -> AsmResult {
            load(k, ds, 0x10)?;
            k.print(label)?;
            load(k, ds, 0x18)?;
            let slot = k.address_slot();
            k.asm().push(eax)?;
            k.asm().mov(eax, dword_ptr(slot).fs())?;
            k.asm().mov(dword_ptr(resume_at).fs(), eax)?;
            k.asm().pop(eax)?;
            k.asm().mov(ecx, 0x0C0C_0C0Cu32)?;
            k.asm().mov(esi, 0x5151_5151u32)?;
            k.asm().mov(edi, 0xD1D1_D1D1u32)?;
            body(k)?;
            let mut after = k.asm().create_label();
            k.set_label_at(&mut after, slot)?;
            Ok(k.asm().nop()?)
        };
    load(&mut k, es, 0x20)?;
    guarded_fs(&mut k, "ds load:", &|k| {
        Ok(k.asm().mov(eax, dword_ptr(HOLE - DS_BASE + 0x14))?)
    })?;
    guarded_fs(&mut k, "es stosd:", &|k| {
        k.asm().mov(edi, HOLE - ES_BASE + 8)?;
        Ok(k.asm().stosd()?)
    })?;
    guarded_fs(&mut k, "movsd to es:", &|k| {
        k.asm().mov(esi, DATA_A)?;
        k.asm().mov(edi, HOLE - ES_BASE + 0xFFC)?;
        Ok(k.asm().movsd()?)
    })?;
    guarded_fs(&mut k, "after pushes:", &|k| {
        k.asm().push(1u32)?;
        k.asm().push(2u32)?;
        Ok(k.asm().mov(ecx, dword_ptr(HOLE - DS_BASE + 0x10))?)
    })?;
    k.asm().add(esp, 8u32)?;
    guarded_fs(&mut k, "ebp through ss:", &|k| {
        k.asm().push(ebp)?;
        k.asm().mov(ebp, HOLE - SS_BASE)?;
        Ok(k.asm().mov(eax, dword_ptr(ebp + 0x20))?)
    })?;
    k.asm().pop(ebp)?;
    guarded_fs(&mut k, "lodsd wrapping:", &|k| {
        k.asm().mov(eax, 0x30u32)?;
        k.asm().mov(ds, eax)?;
        k.asm().mov(esi, HOLE.wrapping_sub(WRAP_BASE) + 4)?;
        Ok(k.asm().lodsd()?)
    })?;

    // Flat again.
    load(&mut k, ds, 0x10)?;
    load(&mut k, es, 0x10)?;
    k.asm().mov(eax, esp)?;
    k.asm().add(eax, SS_BASE)?;
    k.asm().mov(ecx, 0x10u32)?;
    k.asm().mov(ss, ecx)?;
    k.asm().mov(esp, eax)?;
    k.print("done\n")?;
    k.exit(0x29)?;

    // sum16: EAX = the sum of the 16 dwords at DS:EBX.
    k.asm().set_label(&mut sum16)?;
    k.asm().push(ecx)?;
    k.asm().xor(eax, eax)?;
    k.asm().xor(ecx, ecx)?;
    let mut next = k.asm().create_label();
    k.asm().set_label(&mut next)?;
    k.asm().add(eax, dword_ptr(ebx + ecx * 4))?;
    k.asm().inc(ecx)?;
    k.asm().cmp(ecx, 16u32)?;
    k.asm().jne(next)?;
    k.asm().pop(ecx)?;
    k.asm().ret()?;

    // frame(n): an EBP frame with locals, stack pushes and pops of memory, PUSHAD/POPAD;
    // EAX = DS:[DATA_A] + 2 * (n + 0x111) + 0x1000 + n.
    k.asm().set_label(&mut frame)?;
    k.asm().push(ebp)?;
    k.asm().mov(ebp, esp)?;
    k.asm().sub(esp, 8u32)?;
    k.asm().mov(eax, dword_ptr(ebp + 8))?;
    k.asm().mov(dword_ptr(ebp - 4), eax)?;
    k.asm().add(dword_ptr(ebp - 4), 0x111u32)?;
    k.asm().push(dword_ptr(ebp - 4))?;
    k.asm().pop(dword_ptr(ebp - 8))?;
    k.asm().push(dword_ptr(DATA_A))?;
    k.asm().pop(eax)?;
    k.asm().add(eax, dword_ptr(ebp - 4))?;
    k.asm().add(eax, dword_ptr(ebp - 8))?;
    k.asm().pushad()?;
    k.asm().add(dword_ptr(esp + 28), 0x1000u32)?; // the saved EAX, which POPAD brings back
    k.asm().xor(eax, eax)?;
    k.asm().popad()?;
    k.asm().add(eax, dword_ptr(ebp + 8))?;
    k.asm().leave()?;
    k.asm().ret_1(4)?;

    // triple(ecx): EAX = AL from XLAT + 3 * ECX, reached through a based DS.
    k.set_label_at(&mut triple, triple_at)?;
    k.asm().movzx(eax, al)?;
    k.asm().lea(eax, dword_ptr(eax + ecx * 2))?;
    k.asm().add(eax, ecx)?;
    k.asm().ret()?;
    k.build()
}
