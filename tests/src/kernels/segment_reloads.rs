//! The `segment-reloads` kernel: data segment registers reloaded with the selector they already
//! hold, while the descriptor behind it changes. bt keeps such reloads inline at CPL 0 when the
//! GDT still holds the bytes the register was loaded from; everything else must do the full
//! load (checks, faults, the accessed bit), exactly as the interpreter, QEMU and hardware do.

use iced_x86::code_asm::*;

use crate::kernels::{handler_address, set_gate};
use crate::kit::{AsmResult, KERNEL_BASE, Kit};

/// The page directory (its page table follows it) identity-mapping the first 4 MiB.
const PD: u32 = 0x20_0000;
const PT: u32 = PD + 0x1000;
/// The GDT straddles two pages: entries 0x00-0x18 (the code and stack segments the CPU needs
/// to deliver a fault) in the first, 0x20 on in the second, which the kernel unmaps.
const GDT: u32 = 0x30_0FE0;
const GDT_LIMIT: u32 = 0x37;
const PAGE_B: u32 = 0x30_1000;
const LDT: u32 = 0x30_1800;
/// Three marker pages: each segment base used below points at one, so a read through the
/// segment shows which base the register holds.
const MARKS: u32 = 0x30_2000;
const B1: u32 = MARKS;
const B2: u32 = MARKS + 0x1000;

/// A segment descriptor from base, access byte, flags nibble (G, D/B) and 20-bit limit.
const fn descriptor(base: u32, access: u8, flags: u8, limit: u32) -> u64 {
    (limit & 0xFFFF) as u64
        | ((base & 0xFF_FFFF) as u64) << 16
        | (access as u64) << 40
        | (((limit >> 16) & 0xF) as u64) << 48
        | ((flags & 0xF) as u64) << 52
        | ((base >> 24) as u64) << 56
}

/// 4 GiB, 32-bit.
const FLAT: (u8, u32) = (0xC, 0xF_FFFF);

/// What GDT entry 0x20 holds before each reload with selector 0x23 (RPL 3), and why.
const STEPS: [(u64, &str); 12] = [
    (descriptor(B1, 0xF3, FLAT.0, FLAT.1), "data base B1"),
    (descriptor(B2, 0xF3, FLAT.0, FLAT.1), "base changed to B2"),
    (descriptor(B2, 0xF2, FLAT.0, FLAT.1), "accessed bit cleared"),
    (descriptor(B2, 0xF3, FLAT.0, FLAT.1), "unchanged"),
    (descriptor(B2, 0xF3, 0x4, 0xFFF), "limit 4 KiB"),
    (descriptor(B1, 0xF1, FLAT.0, FLAT.1), "read-only data"),
    (descriptor(B1, 0xF3, FLAT.0, FLAT.1), "writable again"),
    (descriptor(B1, 0xD3, FLAT.0, FLAT.1), "DPL 2 below RPL 3"),
    (descriptor(B1, 0x73, FLAT.0, FLAT.1), "not present"),
    (descriptor(B1, 0xF9, FLAT.0, FLAT.1), "execute-only code"),
    (descriptor(B1, 0xFB, FLAT.0, FLAT.1), "readable code"),
    (descriptor(B2, 0xF3, FLAT.0, FLAT.1), "data base B2"),
];

/// Builds the kernel. Exits with value 0x33.
pub fn segment_reloads() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let skip = k.data(&[0; 4]);
    let steps = k.data(&STEPS.map(|(d, _)| d.to_le_bytes()).concat());
    let names: Vec<u32> = STEPS.iter().map(|(_, n)| k.string(n)).collect();
    let names = k.data(
        &names
            .iter()
            .flat_map(|a| a.to_le_bytes())
            .collect::<Vec<_>>(),
    );
    let gdtr = k.data(&[&(GDT_LIMIT as u16).to_le_bytes()[..], &GDT.to_le_bytes()].concat());
    install_fault_handlers(&mut k, idt, skip)?;
    k.asm().lidt(ptr(idtr))?;

    // The GDT: null, flat code and data as the loader's (0x08, 0x10), flat data (0x18); 0x20
    // is written by each step; 0x28 unused; 0x30 the LDT's descriptor.
    let put = |k: &mut Kit, addr: u32, v: u64| -> AsmResult {
        k.asm().mov(dword_ptr(addr), v as u32)?;
        Ok(k.asm().mov(dword_ptr(addr + 4), (v >> 32) as u32)?)
    };
    put(&mut k, GDT, 0)?;
    put(&mut k, GDT + 0x08, descriptor(0, 0x9B, FLAT.0, FLAT.1))?;
    put(&mut k, GDT + 0x10, descriptor(0, 0x93, FLAT.0, FLAT.1))?;
    put(&mut k, GDT + 0x18, descriptor(0, 0x93, FLAT.0, FLAT.1))?;
    put(&mut k, GDT + 0x20, STEPS[0].0)?;
    put(&mut k, GDT + 0x28, 0)?;
    put(&mut k, GDT + 0x30, descriptor(LDT, 0x82, 0, 0x17))?;
    put(&mut k, LDT, descriptor(B1, 0xF3, FLAT.0, FLAT.1))?;
    for (i, v) in [0xA1u32, 0xA2, 0xA3].into_iter().enumerate() {
        let page = MARKS + 0x1000 * i as u32;
        k.asm().mov(dword_ptr(page), v)?;
        k.asm().mov(dword_ptr(page + 4), 0u32)?;
    }
    k.asm().lgdt(ptr(gdtr))?;
    k.asm().mov(eax, 0x10u32)?;
    k.asm().mov(ds, eax)?;
    k.asm().mov(es, eax)?;
    k.asm().mov(ss, eax)?;
    k.asm().mov(fs, eax)?;
    k.asm().mov(gs, eax)?;
    k.asm().mov(eax, 0x30u32)?;
    k.asm().lldt(ax)?;
    // Paging on (the #PF case needs it), identity-mapped.
    k.identity_map_4mib(PD)?;
    k.asm().mov(eax, PD)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 0x8000_0000u32)?;
    k.asm().mov(cr0, eax)?;

    // FS by MOV, then GS by POP: every step rewrites entry 0x20 and reloads selector 0x23.
    for (name, reg) in [("fs", fs), ("gs", gs)] {
        k.asm().xor(esi, esi)?;
        let mut top = k.asm().create_label();
        k.asm().set_label(&mut top)?;
        k.asm().mov(eax, dword_ptr(esi * 8 + steps))?;
        k.asm().mov(dword_ptr(GDT + 0x20), eax)?;
        k.asm().mov(eax, dword_ptr(esi * 8 + steps + 4))?;
        k.asm().mov(dword_ptr(GDT + 0x24), eax)?;
        k.print(&format!("{name} step "))?;
        k.print_hex(esi)?;
        k.print(" ")?;
        k.asm().push(esi)?;
        k.asm().mov(esi, dword_ptr(esi * 4 + names))?;
        k.print_at_esi()?;
        k.asm().pop(esi)?;
        k.print(":")?;
        k.asm().mov(eax, 0x23u32)?;
        k.asm().mov(ebp, esp)?;
        if name == "fs" {
            k.asm().mov(dword_ptr(skip), 2u32)?; // mov fs,eax: 8E E0
            k.asm().mov(fs, eax)?;
        } else {
            k.asm().push(eax)?;
            k.asm().mov(dword_ptr(skip), 2u32)?; // pop gs: 0F A9
            k.asm().pop(gs)?;
        }
        // A faulting POP leaves ESP as it was: the same ESP either way from here.
        k.asm().mov(esp, ebp)?;
        observe(&mut k, name, reg, skip)?;
        k.asm().inc(esi)?;
        k.asm().cmp(esi, STEPS.len() as u32)?;
        k.asm().jb(top)?;
    }

    // DS and ES reloaded with flat selector 0x18 after its accessed bit is cleared each time
    // (the load sets it again), then reloaded with it set, by MOV and by PUSH/POP.
    k.asm().mov(ecx, 3u32)?;
    let mut again = k.asm().create_label();
    k.asm().set_label(&mut again)?;
    k.asm().mov(eax, 0x18u32)?;
    for (name, reg) in [("ds", ds), ("es", es)] {
        k.asm().and(byte_ptr(GDT + 0x1D), 0xFEu32)?;
        k.asm().mov(reg, eax)?;
        accessed(&mut k, &format!("{name}.reload"), GDT + 0x18)?;
        k.asm().mov(reg, eax)?;
        k.asm().push(reg)?;
        k.asm().pop(reg)?;
        accessed(&mut k, &format!("{name}.again"), GDT + 0x18)?;
    }
    k.asm().dec(ecx)?;
    k.asm().jnz(again)?;
    k.asm().xor(eax, eax)?;
    k.asm().mov(ax, ds)?;
    k.print_field("ds", eax)?;

    // An LDT selector (TI=1): the descriptor in the LDT changes base between reloads.
    for (step, base) in [(0u32, B1), (1, B2), (2, B1)] {
        put(&mut k, LDT, descriptor(base, 0xF3, FLAT.0, FLAT.1))?;
        k.asm().mov(eax, 0x07u32)?;
        k.asm().mov(fs, eax)?;
        k.asm().mov(eax, dword_ptr(0u32).fs())?;
        k.print_field(&format!("ldt step {step} fs[0]"), eax)?;
    }

    // The GDT's second page unmapped: reloading FS with the selector it holds reads the
    // descriptor there and takes #PF (error 0: a supervisor read of a not-present page); the
    // handler maps the page again and the load is retried. In round 1 the entry was changed
    // (to base B2) before the page went away: the retried load must see it.
    put(&mut k, GDT + 0x20, STEPS[0].0)?;
    k.asm().mov(eax, 0x23u32)?;
    k.asm().mov(fs, eax)?;
    for round in 0..2 {
        k.asm().mov(dword_ptr(PT + (PAGE_B >> 12) * 4), 0u32)?;
        k.asm().invlpg(ptr(PAGE_B))?;
        k.asm().mov(eax, 0x23u32)?;
        k.asm().mov(fs, eax)?;
        k.asm().mov(eax, dword_ptr(0u32).fs())?;
        k.print_field(&format!("unmapped gdt round {round} fs[0]"), eax)?;
        put(&mut k, GDT + 0x20, STEPS[1].0)?;
    }
    k.print("done\n")?;
    k.exit(0x33)?;
    k.build()
}

/// Prints what segment register `reg` (named `name`) now holds: its selector, the dword at
/// offset 0 through it and entry 0x20's accessed bit in memory; then, on a line of its own
/// starting `probe`, the dword at offset 0x1000 (beyond a 4 KiB limit: #GP(0) on a real CPU,
/// Intel SDM vol. 3 5.3; QEMU's TCG does not check data-segment limits). A fault is printed by
/// the handler and skipped.
fn observe(k: &mut Kit, name: &str, reg: AsmRegisterSegment, skip: u32) -> AsmResult {
    k.asm().xor(eax, eax)?;
    k.asm().mov(ax, reg)?;
    k.print(" sel=")?;
    k.print_hex(eax)?;
    let seg = |m: AsmMemoryOperand| if name == "fs" { m.fs() } else { m.gs() };
    for (label, offset) in [(" [0]=", 0u32), ("\nprobe[1000]:", 0x1000)] {
        k.print(label)?;
        k.asm().mov(ebx, offset)?;
        k.asm().mov(eax, 0xDEAD_DEADu32)?;
        k.asm().mov(dword_ptr(skip), 3u32)?; // mov eax,fs:[ebx]: 64 8B 03
        k.asm().mov(eax, seg(dword_ptr(ebx)))?;
        if offset == 0 {
            k.print_hex(eax)?;
            k.asm().movzx(eax, byte_ptr(GDT + 0x25))?;
            k.asm().and(eax, 1u32)?;
            k.print(" accessed=")?;
            k.print_hex(eax)?;
        } else {
            k.print(" value=")?;
            k.print_hex(eax)?;
        }
    }
    k.print("\n")
}

/// Prints `label=` and the accessed bit of the descriptor at `at`. Preserves EAX and ECX.
fn accessed(k: &mut Kit, label: &str, at: u32) -> AsmResult {
    k.asm().push(eax)?;
    k.asm().movzx(eax, byte_ptr(at + 5))?;
    k.asm().and(eax, 1u32)?;
    k.print_field(label, eax)?;
    k.asm().pop(eax)?;
    Ok(())
}

/// Interrupt gates for #NP, #GP and #PF to one handler that prints the vector, the error code
/// and (for #PF) CR2 as an offset from the GDT. #NP and #GP skip the faulting instruction by
/// the length in `skip`; #PF maps the GDT's second page again and retries.
fn install_fault_handlers(k: &mut Kit, idt: u32, skip: u32) -> AsmResult {
    let mut common = k.asm().create_label();
    let mut done = k.asm().create_label();
    for v in [11u32, 13, 14] {
        handler_address(k, |k| {
            k.asm().push(v)?;
            Ok(k.asm().jmp(common)?)
        })?;
        set_gate(k, idt, v, 0x8E)?;
    }
    k.asm().jmp(done)?;

    // [esp] vector, [esp+4] error code, then EIP, CS, EFLAGS; PUSHAD adds 32.
    k.asm().set_label(&mut common)?;
    k.asm().pushad()?;
    k.asm().mov(eax, dword_ptr(esp + 32))?;
    k.print(" fault=")?;
    k.print_hex(eax)?;
    k.asm().mov(eax, dword_ptr(esp + 36))?;
    k.print(" error=")?;
    k.print_hex(eax)?;
    k.asm().mov(eax, dword_ptr(esp + 40))?;
    k.asm().sub(eax, KERNEL_BASE)?;
    k.print(" eip=+")?;
    k.print_hex(eax)?;
    let mut not_pf = k.asm().create_label();
    let mut out = k.asm().create_label();
    k.asm().cmp(dword_ptr(esp + 32), 14u32)?;
    k.asm().jne(not_pf)?;
    k.asm().mov(eax, cr2)?;
    k.asm().sub(eax, GDT)?;
    k.print(" cr2=gdt+")?;
    k.print_hex(eax)?;
    k.asm()
        .mov(dword_ptr(PT + (PAGE_B >> 12) * 4), PAGE_B | 7)?;
    k.asm().invlpg(ptr(PAGE_B))?;
    k.asm().jmp(out)?;
    k.asm().set_label(&mut not_pf)?;
    k.asm().mov(eax, dword_ptr(skip))?;
    k.asm().add(dword_ptr(esp + 40), eax)?;
    k.asm().set_label(&mut out)?;
    k.print("\n")?;
    k.asm().popad()?;
    k.asm().add(esp, 8u32)?;
    k.asm().iretd()?;
    k.asm().set_label(&mut done)?;
    Ok(())
}
