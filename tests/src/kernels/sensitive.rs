//! The `sensitive` kernel: the 17 sensitive-but-unprivileged instructions of Robin & Irvine
//! (SGDT, SIDT, SLDT, SMSW, PUSHF, POPF, LAR, LSL, VERR, VERW, POP sreg, PUSH sreg, CALL far,
//! JMP far, INT n, RET far, STR, MOV sreg), each executed at CPL 0 and at CPL 3, printing what
//! the guest observes. A translator must never run them natively; the output must match QEMU
//! whatever engine runs it.

use iced_x86::code_asm::*;

use super::{com1_tss, enter_ring3, load_tables, set_gate_from_slot};
use crate::kit::{AsmResult, Kit};

/// Flat ring-0 and ring-3 segments, the TSS, an LDT, a DPL-3 call gate and a DPL-0 data segment.
const GDT: [u64; 9] = [
    0,
    0x00CF_9B00_0000_FFFF, // 0x08 code, DPL 0
    0x00CF_9300_0000_FFFF, // 0x10 data, DPL 0
    0x00CF_FB00_0000_FFFF, // 0x18 code, DPL 3
    0x00CF_F300_0000_FFFF, // 0x20 data, DPL 3
    0,                     // 0x28 TSS, built at run time
    0,                     // 0x30 LDT, built at run time
    0,                     // 0x38 call gate (DPL 3) to 0x08:gate_target, built at run time
    0x0040_9300_0000_0FFF, // 0x40 data, DPL 0, byte-granular, 16-bit limit 0xFFF
];
/// Selectors LAR, LSL, VERR and VERW are tried on (and a null and an out-of-range one).
const PROBED: [u32; 9] = [0x00, 0x08, 0x10, 0x1B, 0x23, 0x28, 0x30, 0x38, 0x40 | 0x3];

/// Emits code that arms the fault handler to resume after what `body` emits.
fn guarded(k: &mut Kit, resume_at: u32, body: impl FnOnce(&mut Kit) -> AsmResult) -> AsmResult {
    let slot = k.address_slot();
    k.asm().mov(eax, dword_ptr(slot))?;
    k.asm().mov(dword_ptr(resume_at), eax)?;
    body(k)?;
    let mut after = k.asm().create_label();
    k.set_label_at(&mut after, slot)?;
    k.asm().nop()?;
    Ok(())
}

/// Emits the probes, run once at CPL 0 and once at CPL 3 (`tag` names the level in the output).
fn probes(k: &mut Kit, tag: &str, scratch: u32, resume_at: u32) -> AsmResult {
    // SGDT, SIDT: the tables' bases and limits.
    k.asm().sgdt(ptr(scratch))?;
    k.print(&format!("{tag} sgdt limit="))?;
    k.asm().movzx(eax, word_ptr(scratch))?;
    k.print_hex(eax)?;
    k.print(" base=")?;
    k.asm().mov(eax, dword_ptr(scratch + 2))?;
    k.print_hex(eax)?;
    k.asm().sidt(ptr(scratch))?;
    k.print(" sidt limit=")?;
    k.asm().movzx(eax, word_ptr(scratch))?;
    k.print_hex(eax)?;
    k.print("\n")?;
    // SLDT, STR, SMSW: 16-bit results.
    k.asm().xor(eax, eax)?;
    k.asm().sldt(ax)?;
    k.print(&format!("{tag} sldt="))?;
    k.print_hex(eax)?;
    k.asm().xor(eax, eax)?;
    k.asm().str(ax)?;
    k.print(" str=")?;
    k.print_hex(eax)?;
    k.asm().xor(eax, eax)?;
    k.asm().smsw(ax)?;
    k.print(" smsw=")?;
    k.print_hex(eax)?;
    k.print("\n")?;
    // PUSHF, then POPF trying to set IF and IOPL 3 and to clear them: what sticks.
    for value in [0x3202u32, 0x0002] {
        k.asm().push(value)?;
        k.asm().popfd()?;
        k.asm().pushfd()?;
        k.asm().pop(eax)?;
        k.print(&format!("{tag} popf {value:#x} -> eflags="))?;
        k.print_hex(eax)?;
        k.print("\n")?;
    }
    k.asm().push(0x0002u32)?;
    k.asm().popfd()?;
    // LAR, LSL, VERR, VERW on each selector: ZF and the result.
    for sel in PROBED {
        k.print(&format!("{tag} sel {sel:02x}:"))?;
        for (name, op) in [("lar", 0), ("lsl", 1), ("verr", 2), ("verw", 3)] {
            k.asm().mov(ecx, sel)?;
            k.asm().mov(eax, 0xDEAD_BEEFu32)?;
            match op {
                0 => k.asm().lar(eax, ecx)?,
                1 => k.asm().lsl(eax, ecx)?,
                2 => k.asm().verr(cx)?,
                _ => k.asm().verw(cx)?,
            }
            k.asm().setz(cl)?;
            k.asm().movzx(ecx, cl)?;
            k.print(&format!(" {name} zf="))?;
            k.print_hex(ecx)?;
            if op < 2 {
                k.print("=")?;
                k.print_hex(eax)?;
            }
        }
        k.print("\n")?;
    }
    // PUSH sreg / POP sreg / MOV sreg: the current selectors, then loading a DPL-0 data
    // segment (faults at CPL 3), then back to the level's own data segment.
    k.asm().push(cs)?;
    k.asm().pop(eax)?;
    k.print(&format!("{tag} push cs="))?;
    k.print_hex(eax)?;
    k.asm().push(ss)?;
    k.asm().pop(eax)?;
    k.print(" push ss=")?;
    k.print_hex(eax)?;
    k.asm().xor(eax, eax)?;
    k.asm().mov(ax, ds)?;
    k.print(" mov from ds=")?;
    k.print_hex(eax)?;
    k.print("\n")?;
    k.print(&format!("{tag} pop ds<-0x10: "))?;
    guarded(k, resume_at, |k| {
        k.asm().push(0x10u32)?;
        Ok(k.asm().pop(ds)?)
    })?;
    k.print("ok\n")?;
    k.print(&format!("{tag} mov es<-0x40: "))?;
    guarded(k, resume_at, |k| {
        k.asm().mov(eax, 0x40u32)?;
        Ok(k.asm().mov(es, eax)?)
    })?;
    k.print("ok\n")?;
    // Each level's own data selector again (CPL 3 may not keep a DPL-0 one).
    k.asm().xor(eax, eax)?;
    k.asm().mov(ax, ss)?;
    k.asm().mov(ds, eax)?;
    k.asm().mov(es, eax)?;
    // INT n (through a DPL-3 gate) and CALL far through the call gate (RET far back).
    k.asm().int(0x80)?;
    // RET far 4 in the target drops the parameter from this stack too.
    k.asm().push(0x1234_5678u32)?;
    k.asm().call_far(0x3B, 0)?;
    k.print(&format!("{tag} back from the call gate\n"))?;
    Ok(())
}

/// Builds the kernel. Exits with value 0x1D.
pub fn sensitive() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let (gdt, gdtr) = k.descriptor_table(&GDT.map(u64::to_le_bytes).concat());
    let (tss, tss_limit) = com1_tss(&mut k);
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let ldt = k.data(&0x00CF_F300_0000_FFFFu64.to_le_bytes());
    let scratch = k.data(&[0; 8]);
    let resume_at = k.data(&[0; 4]);
    let far_pointer = k.data(&[0; 8]);
    let user_stack = k.data(&[0u8; 4096]) + 4096;

    let (fault_slot, int80_slot, gate_slot, jmp0_slot, back0_slot) = (
        k.address_slot(),
        k.address_slot(),
        k.address_slot(),
        k.address_slot(),
        k.address_slot(),
    );
    // Mask both 8259s: POPF sets IF at CPL 0, and no interrupt may arrive then.
    k.asm().mov(al, 0xFFu32)?;
    k.asm().out(0x21, al)?;
    k.asm().out(0xA1, al)?;
    for v in [11, 12, 13] {
        set_gate_from_slot(&mut k, idt, v, fault_slot, 0x8E)?;
    }
    set_gate_from_slot(&mut k, idt, 0x80, int80_slot, 0xEE)?;
    // The call gate at 0x38: DPL 3, 32-bit, one parameter, to 0x08:gate_target.
    k.asm().mov(eax, dword_ptr(gate_slot))?;
    k.asm().mov(edx, eax)?;
    k.asm().and(edx, 0xFFFF_0000u32)?;
    k.asm().or(edx, 0xEC01u32)?;
    k.asm().mov(dword_ptr(gdt + 0x3C), edx)?;
    k.asm().and(eax, 0xFFFFu32)?;
    k.asm().or(eax, 0x0008_0000u32)?;
    k.asm().mov(dword_ptr(gdt + 0x38), eax)?;
    // The LDT descriptor at 0x30: one entry, DPL 0.
    let low = (ldt << 16) | 7;
    let high = (ldt & 0xFF00_0000) | ((ldt >> 16) & 0xFF) | 0x8200;
    k.asm().mov(dword_ptr(gdt + 0x30), low)?;
    k.asm().mov(dword_ptr(gdt + 0x34), high)?;
    load_tables(&mut k, (gdt, gdtr), idtr, tss, tss_limit)?;
    k.asm().mov(eax, 0x30u32)?;
    k.asm().lldt(ax)?;

    // CPL 0, then JMP far (through a far pointer) and RET far at the same level.
    probes(&mut k, "cpl0", scratch, resume_at)?;
    k.asm().mov(eax, dword_ptr(jmp0_slot))?;
    k.asm().mov(dword_ptr(far_pointer), eax)?;
    k.asm().mov(word_ptr(far_pointer + 4), 0x08u32)?;
    k.asm().jmp(fword_ptr(far_pointer))?;
    let mut jmp0 = k.asm().create_label();
    k.set_label_at(&mut jmp0, jmp0_slot)?;
    k.print("cpl0 jmp far to 0x08 ok\n")?;
    k.asm().push(0x08u32)?;
    k.asm().push(dword_ptr(back0_slot))?;
    k.asm().retf()?;
    let mut back0 = k.asm().create_label();
    k.set_label_at(&mut back0, back0_slot)?;
    k.print("cpl0 ret far to 0x08 ok\n")?;

    // Into CPL 3 with IRET (IOPL 0, IF 0).
    enter_ring3(&mut k, user_stack)?;
    probes(&mut k, "cpl3", scratch, resume_at)?;
    // JMP far at CPL 3 to a DPL-0 code segment: #GP.
    k.print("cpl3 jmp far 0x08: ")?;
    guarded(&mut k, resume_at, |k| Ok(k.asm().jmp_far(0x08, 0)?))?;
    k.print("done\n")?;
    k.asm().mov(eax, 0xF4u32)?;
    k.asm().int(0x80)?; // EAX = 0xF4: the handler exits

    // INT 0x80: prints the caller's CS; exits when EAX is 0xF4.
    let mut int80 = k.asm().create_label();
    k.set_label_at(&mut int80, int80_slot)?;
    let mut finish = k.asm().create_label();
    k.asm().cmp(eax, 0xF4u32)?;
    k.asm().je(finish)?;
    k.print("int 0x80 from cs=")?;
    k.asm().mov(eax, dword_ptr(esp + 4))?;
    k.print_hex(eax)?;
    k.print("\n")?;
    k.asm().iretd()?;
    k.asm().set_label(&mut finish)?;
    k.print("done\n")?;
    k.exit(0x1D)?;

    // The call gate's target: prints CS, the caller's CS and the copied parameter; RET far.
    let mut target = k.asm().create_label();
    k.set_label_at(&mut target, gate_slot)?;
    k.print("call gate: cs=")?;
    k.asm().xor(eax, eax)?;
    k.asm().mov(ax, cs)?;
    k.print_hex(eax)?;
    k.print(" caller=")?;
    k.asm().mov(eax, dword_ptr(esp + 4))?;
    k.print_hex(eax)?;
    k.print(" param=")?;
    k.asm().mov(eax, dword_ptr(esp + 8))?;
    k.print_hex(eax)?;
    k.print("\n")?;
    k.asm().retf_1(4)?;

    // #NP, #SS, #GP: print the vector's error code, resume where the probe said.
    let mut fault = k.asm().create_label();
    k.set_label_at(&mut fault, fault_slot)?;
    k.print("fault error=")?;
    k.asm().mov(eax, dword_ptr(esp))?;
    k.print_hex(eax)?;
    k.print(" ")?;
    k.asm().mov(eax, dword_ptr(resume_at))?;
    k.asm().mov(dword_ptr(esp + 4), eax)?;
    k.asm().add(esp, 4u32)?;
    k.asm().iretd()?;
    k.build()
}
