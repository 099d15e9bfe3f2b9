//! Kit kernels aimed at the binary translator: self-modifying code, faults inside translated
//! code, isolation, interrupts while translated code spins, and the two benchmark loops. They
//! are ordinary guests (QEMU runs them the same way); their catalog entries are in
//! [`crate::kernels::CATALOG`].

use iced_x86::code_asm::*;

use crate::kernels::{count_pit_ticks, handler_address, set_gate};
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
