//! The `apic` kernel: the local APIC and the IOAPIC as an OS drives them, with the 8259s
//! masked: the version register, TPR masking of self-IPIs by priority class, the LAPIC timer in
//! one-shot and periodic mode, the 8254's IRQ 0 routed through IOAPIC pin 2, and a
//! level-triggered IOAPIC pin (the ACPI SCI, driven by the PM timer's TMR_STS) whose remote IRR
//! holds until the local APIC's EOI and whose message repeats while the line stays active.
//! Everything printed is the same on any correct PC (QEMU's included): counts are waited for
//! exactly, with interrupts off while they are compared.

use iced_x86::code_asm::*;

use super::{handler_address, set_gate};
use crate::kit::{AsmResult, Kit, init_pics, pit_rate_generator};

const LAPIC: u32 = 0xFEE0_0000;
const IOAPIC: u32 = 0xFEC0_0000;
const EOI: u32 = LAPIC + 0xB0;

/// Emits `mov dword [addr], value`.
fn store(k: &mut Kit, addr: u32, value: u32) -> AsmResult {
    Ok(k.asm().mov(dword_ptr(addr), value)?)
}

/// Emits a write of `value` to IOAPIC register `reg`.
fn ioapic_write(k: &mut Kit, reg: u32, value: u32) -> AsmResult {
    store(k, IOAPIC, reg)?;
    store(k, IOAPIC + 0x10, value)
}

/// Emits a read of IOAPIC register `reg` into EAX.
fn ioapic_read(k: &mut Kit, reg: u32) -> AsmResult {
    store(k, IOAPIC, reg)?;
    Ok(k.asm().mov(eax, dword_ptr(IOAPIC + 0x10))?)
}

/// Installs a handler for `vector` that increments the dword at `counter`, runs `extra`, and
/// sends the local APIC an EOI.
fn counting_handler(
    k: &mut Kit,
    idt: u32,
    vector: u32,
    counter: u32,
    extra: impl FnOnce(&mut Kit) -> AsmResult,
) -> AsmResult {
    handler_address(k, |k| {
        k.asm().pushad()?;
        k.asm().inc(dword_ptr(counter))?;
        extra(k)?;
        store(k, EOI, 0)?;
        k.asm().popad()?;
        Ok(k.asm().iretd()?)
    })?;
    set_gate(k, idt, vector, 0x8E)
}

/// Emits `sti; hlt; cli` until the dword at `counter` reaches `n`.
fn wait_for(k: &mut Kit, counter: u32, n: u32) -> AsmResult {
    let mut again = k.asm().create_label();
    k.asm().set_label(&mut again)?;
    k.asm().sti()?;
    k.asm().hlt()?;
    k.asm().cli()?;
    k.asm().cmp(dword_ptr(counter), n)?;
    Ok(k.asm().jb(again)?)
}

/// Builds the kernel. Exits with value 0x41.
pub fn apic() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let log = k.data(&[0; 16]); // vectors of the self-IPIs, in the order taken
    let log_len = k.data(&[0; 4]);
    let timer = k.data(&[0; 4]);
    let pit = k.data(&[0; 4]);
    let pic = k.data(&[0; 4]);
    let sci = k.data(&[0; 4]);
    let sci_remote_irr = k.data(&[0; 4]);
    let sci_tmr = k.data(&[0; 4]);

    // Self-IPI handlers note their vector.
    for v in [0x51u32, 0x71] {
        handler_address(&mut k, |k| {
            k.asm().push(eax)?;
            k.asm().mov(eax, dword_ptr(log_len))?;
            k.asm().mov(byte_ptr(eax + log), v)?;
            k.asm().inc(dword_ptr(log_len))?;
            store(k, EOI, 0)?;
            k.asm().pop(eax)?;
            Ok(k.asm().iretd()?)
        })?;
        set_gate(&mut k, idt, v, 0x8E)?;
    }
    counting_handler(&mut k, idt, 0x40, timer, |_| Ok(()))?;
    counting_handler(&mut k, idt, 0x60, pit, |_| Ok(()))?;
    // The 8259's IRQ 0 vector: counted, to show nothing comes that way.
    counting_handler(&mut k, idt, 0x20, pic, |_| Ok(()))?;
    // The SCI: notes remote IRR (pin 9's entry) and the TMR bit of vector 0x70 while in
    // service; the first time it leaves TMR_STS set, so the still-active line sends again after
    // the EOI; the second time it clears TMR_STS and disables the timer's SCI.
    counting_handler(&mut k, idt, 0x70, sci, |k| {
        ioapic_read(k, 0x10 + 2 * 9)?;
        k.asm().shr(eax, 14)?;
        k.asm().and(eax, 1u32)?;
        k.asm().add(dword_ptr(sci_remote_irr), eax)?;
        k.asm().mov(eax, dword_ptr(LAPIC + 0x180 + 0x30))?; // TMR bits 0x60-0x7F
        k.asm().shr(eax, 16)?;
        k.asm().and(eax, 1u32)?;
        k.asm().add(dword_ptr(sci_tmr), eax)?;
        let mut first = k.asm().create_label();
        k.asm().cmp(dword_ptr(sci), 1u32)?;
        k.asm().je(first)?;
        k.asm().mov(dx, 0x602u32)?;
        k.asm().xor(eax, eax)?;
        k.asm().out(dx, ax)?; // PM1_EN: nothing
        k.asm().mov(dx, 0x600u32)?;
        k.asm().mov(eax, 1u32)?;
        k.asm().out(dx, ax)?; // PM1_STS: clear TMR_STS
        k.asm().set_label(&mut first)?;
        Ok(k.asm().nop()?)
    })?;
    k.asm().lidt(ptr(idtr))?;

    // The 8259s remapped to 0x20/0x28 and fully masked; LINT0/LINT1 masked: only the APICs
    // interrupt.
    init_pics(k.asm(), (0x20, 0x28), (0xFF, 0xFF))?;
    store(&mut k, LAPIC + 0xF0, 0x1FF)?; // software enable, spurious vector 0xFF
    store(&mut k, LAPIC + 0x350, 0x1_0700)?; // LINT0: ExtINT, masked
    store(&mut k, LAPIC + 0x360, 0x1_0400)?; // LINT1: NMI, masked
    store(&mut k, LAPIC + 0x320, 0x1_0040)?; // timer: masked
    store(&mut k, LAPIC + 0x80, 0)?; // TPR
    k.asm().mov(eax, dword_ptr(LAPIC + 0x30))?;
    k.print_field("lapic.version", eax)?;
    k.asm().mov(eax, dword_ptr(LAPIC + 0x20))?;
    k.print_field("lapic.id", eax)?;
    ioapic_read(&mut k, 1)?;
    k.asm().shr(eax, 16)?;
    k.asm().and(eax, 0xFFu32)?;
    k.print_field("ioapic.max_entry", eax)?;

    // TPR 0x60 holds back class 5, lets class 7 through.
    store(&mut k, LAPIC + 0x80, 0x60)?;
    store(&mut k, LAPIC + 0x300, (1 << 18) | 0x51)?; // self, fixed
    store(&mut k, LAPIC + 0x300, (1 << 18) | 0x71)?;
    k.asm().mov(eax, dword_ptr(LAPIC + 0x220))?; // IRR 0x40-0x5F
    k.print_field("irr.0x40-0x5f", eax)?;
    k.asm().sti()?;
    k.asm().hlt()?;
    k.asm().cli()?;
    k.asm().mov(eax, dword_ptr(log))?;
    k.print_field("taken.with.tpr.0x60", eax)?;
    k.asm().mov(eax, dword_ptr(LAPIC + 0xA0))?;
    k.print_field("ppr", eax)?;
    store(&mut k, LAPIC + 0x80, 0)?;
    k.asm().sti()?;
    k.asm().hlt()?;
    k.asm().cli()?;
    k.asm().mov(eax, dword_ptr(log))?;
    k.print_field("taken.after.tpr.0", eax)?;

    // The LAPIC timer: one shot, then five periodic interrupts.
    store(&mut k, LAPIC + 0x3E0, 0xB)?; // divide by 1
    store(&mut k, LAPIC + 0x320, 0x40)?; // one-shot, vector 0x40
    store(&mut k, LAPIC + 0x380, 200_000)?;
    wait_for(&mut k, timer, 1)?;
    k.asm().mov(eax, dword_ptr(LAPIC + 0x390))?;
    k.print_field("one-shot.current-count", eax)?;
    store(&mut k, LAPIC + 0x3E0, 0x3)?; // divide by 16
    store(&mut k, LAPIC + 0x320, (1 << 17) | 0x40)?; // periodic
    store(&mut k, LAPIC + 0x380, 50_000)?;
    wait_for(&mut k, timer, 6)?;
    store(&mut k, LAPIC + 0x320, 0x3_0040)?; // masked
    store(&mut k, LAPIC + 0x380, 0)?;
    k.asm().mov(eax, dword_ptr(timer))?;
    k.print_field("lapic-timer.interrupts", eax)?;

    // The 8254 through IOAPIC pin 2 (ISA IRQ 0's override), edge, vector 0x60, to APIC 0.
    ioapic_write(&mut k, 0x10 + 2 * 2 + 1, 0)?;
    ioapic_write(&mut k, 0x10 + 2 * 2, 0x60)?;
    pit_rate_generator(k.asm(), 11932)?;
    wait_for(&mut k, pit, 5)?;
    ioapic_write(&mut k, 0x10 + 2 * 2, 0x1_0060)?; // masked
    k.asm().mov(eax, dword_ptr(pit))?;
    k.print_field("pit-through-pin2.interrupts", eax)?;
    k.asm().mov(eax, dword_ptr(pic))?;
    k.print_field("through-8259.interrupts", eax)?;

    // The SCI on pin 9: level, active high, vector 0x70. TMR_STS is cleared, then TMR_EN makes
    // the PM timer's next bit-23 change raise it.
    ioapic_write(&mut k, 0x10 + 2 * 9 + 1, 0)?;
    ioapic_write(&mut k, 0x10 + 2 * 9, 0x8070)?;
    k.asm().mov(dx, 0x600u32)?;
    k.asm().mov(eax, 1u32)?;
    k.asm().out(dx, ax)?;
    k.asm().mov(dx, 0x602u32)?;
    k.asm().out(dx, ax)?;
    wait_for(&mut k, sci, 2)?;
    k.asm().mov(eax, dword_ptr(sci))?;
    k.print_field("sci.interrupts", eax)?;
    k.asm().mov(eax, dword_ptr(sci_remote_irr))?;
    k.print_field("sci.remote-irr-in-service", eax)?;
    k.asm().mov(eax, dword_ptr(sci_tmr))?;
    k.print_field("sci.tmr-in-service", eax)?;
    ioapic_read(&mut k, 0x10 + 2 * 9)?;
    k.print_field("sci.entry-after-eoi", eax)?;
    k.exit(0x41)?;
    k.build()
}
