//! The `alignment` kernel: alignment checking (#AC) — misaligned word and doubleword accesses at
//! CPL 3 fault only while both CR0.AM and EFLAGS.AC are set; byte accesses, aligned accesses and
//! CPL 0 never do.

use iced_x86::code_asm::*;

use super::{RING_GDT, com1_tss, enter_ring3, load_tables, set_gate_from_slot};
use crate::kit::{AsmResult, Kit};

/// Builds the kernel. Exits with value 0x1E.
pub fn alignment() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let (gdt, gdtr) = k.descriptor_table(&RING_GDT.map(u64::to_le_bytes).concat());
    let (tss, tss_limit) = com1_tss(&mut k);
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let word = k.data(&0x4433_2211_u64.to_le_bytes());
    let resume_at = k.data(&[0; 4]);
    let user_stack = k.data(&[0u8; 4096]) + 4096;
    let (ac_slot, exit_slot) = (k.address_slot(), k.address_slot());
    for (v, slot) in [(17u32, ac_slot), (0x80, exit_slot)] {
        set_gate_from_slot(&mut k, idt, v, slot, 0xEE)?;
    }
    load_tables(&mut k, (gdt, gdtr), idtr, tss, tss_limit)?;

    // Each probe: arm the handler to resume after it, access, say "ok" if no fault came.
    let probe = |k: &mut Kit, what: &str, access: &dyn Fn(&mut CodeAssembler) -> AsmResult| {
        k.print(&format!("{what}: "))?;
        let slot = k.address_slot();
        k.asm().mov(eax, dword_ptr(slot))?;
        k.asm().mov(dword_ptr(resume_at), eax)?;
        access(k.asm())?;
        k.print("ok")?;
        let mut after = k.asm().create_label();
        k.set_label_at(&mut after, slot)?;
        k.print("\n")
    };
    let set_ac = |k: &mut Kit, on: bool| -> AsmResult {
        k.asm().pushfd()?;
        if on {
            k.asm().or(dword_ptr(esp), 0x4_0000u32)?;
        } else {
            k.asm().and(dword_ptr(esp), !0x4_0000u32)?;
        }
        Ok(k.asm().popfd()?)
    };
    // CPL 0 with AM and AC: no checks.
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 1u32 << 18)?;
    k.asm().mov(cr0, eax)?;
    set_ac(&mut k, true)?;
    probe(&mut k, "cpl0 misaligned dword", &|a| {
        Ok(a.mov(eax, dword_ptr(word + 1))?)
    })?;
    set_ac(&mut k, false)?;

    enter_ring3(&mut k, user_stack)?;
    probe(&mut k, "cpl3 AC clear, misaligned dword", &|a| {
        Ok(a.mov(eax, dword_ptr(word + 1))?)
    })?;
    set_ac(&mut k, true)?;
    probe(&mut k, "cpl3 aligned dword", &|a| {
        Ok(a.mov(eax, dword_ptr(word + 4))?)
    })?;
    probe(&mut k, "cpl3 byte", &|a| Ok(a.mov(al, byte_ptr(word + 1))?))?;
    probe(&mut k, "cpl3 misaligned word", &|a| {
        Ok(a.mov(ax, word_ptr(word + 3))?)
    })?;
    probe(&mut k, "cpl3 misaligned dword store", &|a| {
        Ok(a.mov(dword_ptr(word + 2), eax)?)
    })?;
    probe(&mut k, "cpl3 misaligned stack push", &|a| {
        a.dec(esp)?;
        a.push(eax)?;
        Ok(())
    })?;
    set_ac(&mut k, false)?;
    k.asm().int(0x80)?;

    // #AC: print the error code and the flags, resume after the probe.
    let mut ac = k.asm().create_label();
    k.set_label_at(&mut ac, ac_slot)?;
    k.print("#AC error=")?;
    k.asm().mov(eax, dword_ptr(esp))?;
    k.print_hex(eax)?;
    k.print(" ")?;
    k.asm().mov(eax, dword_ptr(resume_at))?;
    k.asm().mov(dword_ptr(esp + 4), eax)?;
    // Realign the interrupted ESP (the stack probe left it misaligned).
    k.asm().and(dword_ptr(esp + 16), !3u32)?;
    k.asm().add(esp, 4u32)?;
    k.asm().iretd()?;
    let mut exit = k.asm().create_label();
    k.set_label_at(&mut exit, exit_slot)?;
    k.print("done\n")?;
    k.exit(0x1E)?;
    k.build()
}
