//! The kit's catalog of test kernels. Each is built from scratch by the tests that use it; the
//! `bt86-kit` binary writes any of them to a file.

use iced_x86::code_asm::*;

mod alignment;
mod apic;
pub mod chaos;
pub mod disk;
mod modes;
mod pit_calibration;
mod segment_reloads;
mod sensitive;
pub mod virtio;

use crate::kit::{
    AsmResult, ENTRY_REGS, Format, Kit, MB_MEMORY_INFO, MB_PAGE_ALIGN, init_pics,
    pit_rate_generator, reset_rom,
};
use crate::translator_kernels as tk;

/// Emits a piece of test code.
type EmitFn = fn(&mut CodeAssembler) -> AsmResult;

/// A catalog entry.
pub struct Entry {
    /// Name used by `bt86-kit build NAME`.
    pub name: &'static str,
    /// What the kernel does and what a correct run shows.
    pub about: &'static str,
    /// Builds the image.
    pub build: fn() -> AsmResult<Vec<u8>>,
    /// Whether the image is firmware for the reset vector (`--bios`) rather than a kernel.
    pub firmware: bool,
}

/// Every kernel the kit knows.
pub const CATALOG: &[Entry] = &[
    Entry {
        name: "hello",
        about: "prints \"hello\" and exits through port 0xF4 with value 3 (status 7)",
        build: hello,
        firmware: false,
    },
    Entry {
        name: "hello-aout",
        about: "hello, packaged as a flat image with the multiboot a.out kludge",
        build: hello_aout,
        firmware: false,
    },
    Entry {
        name: "entry-dump",
        about: "prints its entry state: registers, multiboot info, command line, modules, memory map",
        build: entry_dump,
        firmware: false,
    },
    Entry {
        name: "fw-cfg",
        about: "reads the fw_cfg signature, ID, CPU counts and RAM size and prints them",
        build: fw_cfg,
        firmware: false,
    },
    Entry {
        name: "exceptions",
        about: "takes #DE, #BP, #OF, #UD, #NP, #GP and INT 0x80 through an IDT and prints each frame",
        build: exceptions,
        firmware: false,
    },
    Entry {
        name: "descriptors",
        about: "loads its own GDT, LDT and TSS, and prints SGDT/SIDT/SLDT/STR/SMSW and LAR/LSL/VERR/VERW results, then LDS/LES/LFS/LGS/LSS and ARPL",
        build: descriptors,
        firmware: false,
    },
    Entry {
        name: "segment-reloads",
        about: "reloads DS/ES/FS/GS with the selector they hold while the GDT entry changes (base, limit, type, DPL, accessed bit, not present), through the LDT, and with the GDT page unmapped; prints bases, faults and accessed bits",
        build: segment_reloads::segment_reloads,
        firmware: false,
    },
    Entry {
        name: "paging",
        about: "identity, alias, 4 MiB and PAE mappings, #PF with fix-up, A/D bits, INVLPG, CR3 switches",
        build: paging,
        firmware: false,
    },
    Entry {
        name: "rings",
        about: "ring 3 through IRET: syscalls, #GP and #PF from user mode, an I/O bitmap, a call gate, SYSENTER/SYSEXIT",
        build: rings,
        firmware: false,
    },
    Entry {
        name: "disk",
        about: "IDE: PCI ids, IDENTIFY, PIO reads (LBA28 and LBA48), PIO/multiple/DMA writes with flushes and read-backs (needs a disk of 0x10000800 sectors)",
        build: disk::disk,
        firmware: false,
    },
    Entry {
        name: "disk-flush",
        about: "writes and flushes one sector of the primary master, prints \"flushed\" and spins",
        build: disk::disk_flush,
        firmware: false,
    },
    Entry {
        name: "disk-spin",
        about: "writes four sectors and flushes, waiting for each completion interrupt by spinning (no HLT) on a memory flag",
        build: disk::disk_spin,
        firmware: false,
    },
    Entry {
        name: "cdrom",
        about: "ATAPI on the secondary master: IDENTIFY PACKET, capacity, TOC, READ(10) by PIO and DMA, sense, eject/load",
        build: disk::cdrom,
        firmware: false,
    },
    Entry {
        name: "virtio-blk",
        about: "virtio-blk (modern PCI): capability walk, negotiation, IN/OUT/FLUSH/GET_ID through direct and indirect chains, a looping chain and the reset after it (needs a 2048-sector virtio disk)",
        build: virtio::virtio_blk,
        firmware: false,
    },
    Entry {
        name: "modes",
        about: "32-bit to 16-bit protected mode (286 gate and TSS task switch), real mode, big real mode, and back",
        build: modes::modes,
        firmware: false,
    },
    Entry {
        name: "alignment",
        about: "#AC: misaligned accesses at CPL 3 with CR0.AM and EFLAGS.AC, not at CPL 0 or with AC clear",
        build: alignment::alignment,
        firmware: false,
    },
    Entry {
        name: "sensitive",
        about: "the 17 sensitive unprivileged instructions (SGDT ... MOV sreg) at CPL 0 and CPL 3",
        build: sensitive::sensitive,
        firmware: false,
    },
    Entry {
        name: "v86",
        about: "a virtual-8086 monitor: #GP on IOPL-sensitive instructions at IOPL 0, INT through the IDT at IOPL 3",
        build: v86,
        firmware: false,
    },
    Entry {
        name: "tasks",
        about: "hardware task switches: CALL/IRET with NT and the link, JMP through a task gate, #DE through an IDT task gate",
        build: tasks,
        firmware: false,
    },
    Entry {
        name: "timer",
        about: "programs the PICs and the PIT at 100 Hz, sleeps in HLT until 10 timer interrupts arrived",
        build: timer,
        firmware: false,
    },
    Entry {
        name: "triple-fault",
        about: "loads an empty IDT and executes UD2: #UD -> #GP -> #DF -> triple fault",
        build: triple_fault,
        firmware: false,
    },
    Entry {
        name: "halt",
        about: "prints a line, then CLI; HLT: nothing can ever wake it",
        build: halt,
        firmware: false,
    },
    Entry {
        name: "poweroff",
        about: "powers off through the ACPI PM1a control port 0x604 (SLP_EN, S5)",
        build: poweroff,
        firmware: false,
    },
    Entry {
        name: "mmio-nowhere",
        about: "reads and writes addresses no device owns and the read-only BIOS area, prints what it reads back",
        build: mmio_nowhere,
        firmware: false,
    },
    Entry {
        name: "wild-jump",
        about: "jumps into the empty MMIO hole at 0xD0000000",
        build: wild_jump,
        firmware: false,
    },
    Entry {
        name: "timer-rom",
        about: "firmware: real-mode PIC and PIT setup, five timer ticks taken halted and five while spinning",
        build: timer_rom,
        firmware: true,
    },
    Entry {
        name: "smc",
        about: "self-modifying code: patches the next instruction, a translated function, code copied by rep movsd, its own loop body",
        build: tk::smc,
        firmware: false,
    },
    Entry {
        name: "precise-faults",
        about: "#DE, #UD, #GP raised amid translated work with the state each saw, and a jump into an instruction's middle",
        build: tk::precise_faults,
        firmware: false,
    },
    Entry {
        name: "stack-faults",
        about: "ring-3 push and pop runs whose ESP moves the translator folds: a #PF on a not-present stack page and hidden shadow faults mid-run, with the ESP, CR2 and error code the guest sees",
        build: tk::stack_faults,
        firmware: false,
    },
    Entry {
        name: "isolation",
        about: "addresses wrapping past 4 GiB, the stack at address 0, INT 0x80 and SYSENTER",
        build: tk::isolation,
        firmware: false,
    },
    Entry {
        name: "string-edges",
        about: "rep string instructions with huge ECX into an unmapped page, off the top of the address space and backwards (#PF with exact partial progress); overlapping rep movs both ways; code that rep-stosb's over itself",
        build: tk::string_edges,
        firmware: false,
    },
    Entry {
        name: "syscalls",
        about: "int 0x80 (DPL 3 and DPL 0 gates), syscall, sysret, sysenter and sysexit at CPL 0, 1, 2 and 3",
        build: tk::syscalls,
        firmware: false,
    },
    Entry {
        name: "segment-edges",
        about: "segment bases that wrap past 4 GiB (FS, ES string stores, DS), expand-down and byte-limit segments (#GP as the SDM says; QEMU does not check limits)",
        build: tk::segment_edges,
        firmware: false,
    },
    Entry {
        name: "segment-bases",
        about: "DS, ES and SS with non-zero bases (one wrapping past 4 GiB) and 4 GiB limits: loops, calls, frames, string instructions, XLAT, page faults through each",
        build: tk::segment_bases,
        firmware: false,
    },
    Entry {
        name: "page-straddle",
        about: "an instruction across a page boundary, run again after its second page is remapped and rewritten",
        build: tk::page_straddle,
        firmware: false,
    },
    Entry {
        name: "global-chains",
        about: "direct calls into a global page, chained, then the page remapped (INVLPG) and back (CR4.PGE toggle)",
        build: tk::global_chains,
        firmware: false,
    },
    Entry {
        name: "spin-timer",
        about: "takes 10 timer interrupts at 100 Hz while spinning in a tight loop (no HLT)",
        build: tk::spin_timer,
        firmware: false,
    },
    Entry {
        name: "loop-bench",
        about: "benchmark: a 5-instruction arithmetic loop, 20 million iterations",
        build: tk::loop_bench,
        firmware: false,
    },
    Entry {
        name: "call-bench",
        about: "benchmark: 5 million iterations of call/push/pop/ret-heavy code (12 instructions each)",
        build: tk::call_bench,
        firmware: false,
    },
    Entry {
        name: "fpu",
        about: "x87, MMX and SSE2 results, #NM (EM and a lazy FXSAVE/FXRSTOR switch), #MF, #UD without OSFXSR",
        build: fpu,
        firmware: false,
    },
    Entry {
        name: "fpu-sdm",
        about: "fpu, then what QEMU's TCG does not model: #XM, #UD for an unmasked SIMD exception without OSXMMEXCPT, FERR# as IRQ 13",
        build: fpu_sdm,
        firmware: false,
    },
    Entry {
        name: "shadow-maps",
        about: "non-identity maps, code through changing maps, 300 PTE edits with INVLPG, 4 MiB pages, WP=0/1, guest copy-on-write, A/D bits",
        build: crate::mmu_kernels::shadow_maps,
        firmware: false,
    },
    Entry {
        name: "shadow-spaces",
        about: "CR3 switches among 24 address spaces with global kernel pages, then four PAE spaces and a PDPT reload",
        build: crate::mmu_kernels::shadow_spaces,
        firmware: false,
    },
    Entry {
        name: "shadow-user",
        about: "a ring-3 process: read-only, supervisor and 4 MiB supervisor pages fault; copy-on-write; a WP=0 kernel write",
        build: crate::mmu_kernels::shadow_user,
        firmware: false,
    },
    Entry {
        name: "apic",
        about: "local APIC and IOAPIC: TPR masking of self-IPIs, LAPIC timer one-shot and periodic, the PIT through IOAPIC pin 2, a level-triggered SCI with remote IRR and EOI",
        build: apic::apic,
        firmware: false,
    },
    Entry {
        name: "pit-calibration",
        about: "Linux's TSC calibrations against the 8254 (quick MSB steps, OUT2 polling through port 0x61) with their own acceptance rules",
        build: pit_calibration::pit_calibration,
        firmware: false,
    },
    Entry {
        name: "reset-rom",
        about: "firmware for --bios: real-mode code at the reset vector prints, calls, and exits",
        build: real_mode_rom,
        firmware: true,
    },
];

/// Looks a kernel up by name.
pub fn find(name: &str) -> Option<&'static Entry> {
    CATALOG.iter().find(|e| e.name == name)
}

/// Prints "hello" and exits with value 3.
pub fn hello() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    k.print("hello\n")?;
    k.exit(3)?;
    k.build()
}

/// `hello` as an a.out-kludge flat image.
pub fn hello_aout() -> AsmResult<Vec<u8>> {
    let mut k = Kit::with_header(Format::AoutKludge, MB_PAGE_ALIGN | MB_MEMORY_INFO)?;
    k.print("hello\n")?;
    k.exit(3)?;
    k.build()
}

/// Prints everything the boot loader handed over, in a format meant to be diffed between
/// loaders, then exits with value 0x10.
pub fn entry_dump() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    for (i, name) in ENTRY_REGS.iter().enumerate() {
        if matches!(*name, "eax" | "ebx") {
            let op = k.entry_reg(i);
            k.asm().mov(eax, op)?;
            k.print_field(name, eax)?;
        }
    }
    // Arithmetic flags are undefined at entry (Multiboot 0.6.96 §3.2): only system flags count.
    let op = k.entry_eflags();
    k.asm().mov(eax, op)?;
    k.asm().and(eax, !0x8D5u32)?;
    k.print_field("eflags_system", eax)?;
    k.asm().mov(eax, cr0)?;
    k.print_field("cr0", eax)?;
    k.asm().mov(eax, cr4)?;
    k.print_field("cr4", eax)?;
    for (name, seg) in [
        ("cs", cs),
        ("ds", ds),
        ("es", es),
        ("fs", fs),
        ("gs", gs),
        ("ss", ss),
    ] {
        k.asm().xor(eax, eax)?;
        k.asm().mov(ax, seg)?;
        k.print_field(name, eax)?;
    }

    // EBP = the multiboot information structure.
    let op = k.entry_reg(3);
    k.asm().mov(ebp, op)?;
    for (name, off) in [
        ("mbi_flags", 0),
        ("mem_lower", 4),
        ("mem_upper", 8),
        ("boot_device", 12),
        ("mods_count", 20),
    ] {
        k.asm().mov(eax, dword_ptr(ebp + off))?;
        k.print_field(name, eax)?;
    }

    // Command line (flag bit 2).
    let mut no_cmdline = k.asm().create_label();
    k.asm().test(dword_ptr(ebp), 1u32 << 2)?;
    k.asm().jz(no_cmdline)?;
    k.print("cmdline='")?;
    k.asm().mov(esi, dword_ptr(ebp + 16))?;
    k.print_at_esi()?;
    k.print("'\n")?;
    k.asm().set_label(&mut no_cmdline)?;
    k.asm().nop()?;

    // Modules (flag bit 3): size, alignment, string, and up to 64 bytes of content.
    let mut mods_done = k.asm().create_label();
    k.asm().test(dword_ptr(ebp), 1u32 << 3)?;
    k.asm().jz(mods_done)?;
    k.asm().mov(ecx, dword_ptr(ebp + 20))?;
    k.asm().mov(edi, dword_ptr(ebp + 24))?;
    let mut next_mod = k.asm().create_label();
    k.asm().set_label(&mut next_mod)?;
    k.asm().test(ecx, ecx)?;
    k.asm().jz(mods_done)?;
    k.print("module size=")?;
    k.asm().mov(eax, dword_ptr(edi + 4))?;
    k.asm().sub(eax, dword_ptr(edi))?;
    k.print_hex(eax)?;
    k.print(" page_offset=")?;
    k.asm().mov(eax, dword_ptr(edi))?;
    k.asm().and(eax, 0xFFFu32)?;
    k.print_hex(eax)?;
    k.print(" string='")?;
    k.asm().mov(esi, dword_ptr(edi + 8))?;
    k.print_at_esi()?;
    k.print("' data='")?;
    k.asm().push(ecx)?;
    k.asm().mov(esi, dword_ptr(edi))?;
    k.asm().mov(ecx, dword_ptr(edi + 4))?;
    k.asm().sub(ecx, esi)?;
    let mut short = k.asm().create_label();
    k.asm().cmp(ecx, 64u32)?;
    k.asm().jbe(short)?;
    k.asm().mov(ecx, 64u32)?;
    k.asm().set_label(&mut short)?;
    k.print_esi_ecx()?;
    k.asm().pop(ecx)?;
    k.print("'\n")?;
    k.asm().add(edi, 16u32)?;
    k.asm().dec(ecx)?;
    k.asm().jmp(next_mod)?;
    k.asm().set_label(&mut mods_done)?;
    k.asm().nop()?;

    // Memory map (flag bit 6): walk entries by their size field.
    let mut mmap_done = k.asm().create_label();
    k.asm().test(dword_ptr(ebp), 1u32 << 6)?;
    k.asm().jz(mmap_done)?;
    k.asm().mov(esi, dword_ptr(ebp + 48))?;
    k.asm().mov(edx, esi)?;
    k.asm().add(edx, dword_ptr(ebp + 44))?;
    let mut next_entry = k.asm().create_label();
    k.asm().set_label(&mut next_entry)?;
    k.asm().cmp(esi, edx)?;
    k.asm().jae(mmap_done)?;
    k.print("mmap base=")?;
    for off in [8, 4] {
        k.asm().mov(eax, dword_ptr(esi + off))?;
        k.print_hex(eax)?;
    }
    k.print(" length=")?;
    for off in [16, 12] {
        k.asm().mov(eax, dword_ptr(esi + off))?;
        k.print_hex(eax)?;
    }
    k.print(" type=")?;
    k.asm().mov(eax, dword_ptr(esi + 20))?;
    k.print_hex(eax)?;
    k.print("\n")?;
    k.asm().mov(eax, dword_ptr(esi))?;
    k.asm().lea(esi, dword_ptr(esi + eax + 4))?;
    k.asm().jmp(next_entry)?;
    k.asm().set_label(&mut mmap_done)?;
    k.asm().nop()?;

    k.print("end of dump\n")?;
    k.exit(0x10)?;
    k.build()
}

/// Reads fw_cfg items through the selector (0x510) and data (0x511) ports.
pub fn fw_cfg() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let mut read4 = k.asm().create_label();
    let mut main = k.asm().create_label();
    k.asm().jmp(main)?;
    // read4: AX = key; returns the item's first 4 bytes (little-endian) in EAX, and the next 4
    // in EDX.
    k.asm().set_label(&mut read4)?;
    k.asm().push(ecx)?;
    k.asm().mov(dx, 0x510u32)?;
    k.asm().out(dx, ax)?;
    k.asm().inc(dx)?;
    for _ in 0..4 {
        k.asm().in_(al, dx)?;
        k.asm().ror(eax, 8u32)?;
    }
    k.asm().mov(ecx, eax)?;
    for _ in 0..4 {
        k.asm().in_(al, dx)?;
        k.asm().ror(eax, 8u32)?;
    }
    k.asm().mov(edx, eax)?;
    k.asm().mov(eax, ecx)?;
    k.asm().pop(ecx)?;
    k.asm().ret()?;
    k.asm().set_label(&mut main)?;
    k.asm().nop()?;
    for (name, key) in [
        ("signature", 0x00u32),
        ("id", 0x01),
        ("ram_size", 0x03),
        ("nb_cpus", 0x05),
        ("max_cpus", 0x0F),
    ] {
        k.asm().mov(eax, key)?;
        k.asm().call(read4)?;
        k.print_field(&format!("{name}.lo"), eax)?;
        k.print_field(&format!("{name}.hi"), edx)?;
    }
    k.exit(0x11)?;
    k.build()
}

/// Installs interrupt gates for a few vectors, then causes each exception. One common handler
/// prints the vector, error code, saved EIP (as an offset from the kernel base) and saved
/// system flags, steps the saved EIP past faulting instructions by the length the test stored in
/// `skip`, and returns with IRETD. Exits with value 0x13.
pub fn exceptions() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let skip = k.data(&[0; 4]);
    let mut common = k.asm().create_label();

    // (vector, pushes an error code)
    for (v, has_error) in [
        (0u32, false),
        (3, false),
        (4, false),
        (6, false),
        (11, true),
        (13, true),
        (0x80, false),
    ] {
        let mut stub = k.asm().create_label();
        let mut install = k.asm().create_label();
        k.asm().call(install)?;
        k.asm().set_label(&mut stub)?;
        if !has_error {
            k.asm().push(0u32)?;
        }
        k.asm().push(v)?;
        k.asm().jmp(common)?;
        k.asm().set_label(&mut install)?;
        // EAX = the stub's address (pushed by the call); build an interrupt gate for it.
        k.asm().pop(eax)?;
        k.asm().mov(edx, eax)?;
        k.asm().and(edx, 0xFFFF_0000u32)?;
        k.asm().or(edx, 0x8E00u32)?; // present, DPL 0, 32-bit interrupt gate
        k.asm().mov(dword_ptr(idt + v * 8 + 4), edx)?;
        k.asm().xor(ecx, ecx)?;
        k.asm().mov(cx, cs)?;
        k.asm().shl(ecx, 16u32)?;
        k.asm().and(eax, 0xFFFFu32)?;
        k.asm().or(eax, ecx)?;
        k.asm().mov(dword_ptr(idt + v * 8), eax)?;
    }
    k.asm().lidt(ptr(idtr))?;

    let cases: [(&str, u32, EmitFn); 9] = [
        ("ud2", 2, |a| Ok(a.ud2()?)),
        ("div by zero", 2, |a| {
            a.xor(ecx, ecx)?;
            a.mov(dword_ptr(0x0010_0000u32 - 4), ecx)?; // harmless store, keeps ECX live
            Ok(a.div(ecx)?)
        }),
        ("divide overflow", 2, |a| {
            a.mov(edx, 1u32)?;
            a.xor(eax, eax)?;
            a.mov(ecx, 1u32)?;
            Ok(a.div(ecx)?)
        }),
        ("int3", 0, |a| Ok(a.int3()?)),
        ("int 0x80", 0, |a| Ok(a.int(0x80)?)),
        ("into", 0, |a| {
            a.mov(al, 0x7Fu32)?;
            a.add(al, 1u32)?;
            Ok(a.into()?)
        }),
        // `mov sreg, r32` has no operand-size prefix: 2 bytes.
        ("bad selector", 2, |a| {
            a.mov(eax, 0x50u32)?;
            Ok(a.mov(ds, eax)?)
        }),
        ("null ss", 2, |a| {
            a.xor(eax, eax)?;
            Ok(a.mov(ss, eax)?)
        }),
        ("gate not present", 2, |a| Ok(a.int(0x90)?)),
    ];
    for (name, len, emit) in cases {
        k.print(&format!("{name}: "))?;
        k.asm().mov(dword_ptr(skip), len)?;
        emit(k.asm())?;
    }
    k.print("all exceptions returned\n")?;
    k.exit(0x13)?;

    // The common handler: [esp] vector, [esp+4] error code, then EIP, CS, EFLAGS.
    k.asm().set_label(&mut common)?;
    k.asm().mov(eax, dword_ptr(esp))?;
    k.print("vector=")?;
    k.print_hex(eax)?;
    k.asm().mov(eax, dword_ptr(esp + 4))?;
    k.print(" error=")?;
    k.print_hex(eax)?;
    k.asm().mov(eax, dword_ptr(esp + 8))?;
    k.asm().sub(eax, crate::kit::KERNEL_BASE)?;
    k.print(" eip=+")?;
    k.print_hex(eax)?;
    // Arithmetic flags are the test's own business; RF is pushed as 1 for faults by the CPU
    // (Intel SDM vol. 3, "RF flag") but as 0 by QEMU, so it is left out of the comparison.
    k.asm().mov(eax, dword_ptr(esp + 16))?;
    k.asm().and(eax, !(0x8D5u32 | 0x1_0000))?;
    k.print(" eflags_system=")?;
    k.print_hex(eax)?;
    k.print("\n")?;
    k.asm().mov(eax, dword_ptr(skip))?;
    k.asm().add(dword_ptr(esp + 8), eax)?;
    k.asm().add(esp, 8u32)?;
    k.asm().iretd()?;
    k.build()
}

/// Descriptors for the `descriptors` kernel's GDT, by selector.
const DESCRIPTOR_GDT: [(u16, u64); 10] = [
    (0x00, 0),
    (0x08, 0x00CF_9B00_0000_FFFF), // flat code, DPL 0
    (0x10, 0x00CF_9300_0000_FFFF), // flat data, DPL 0
    (0x18, 0x00CF_F300_0000_FFFF), // flat data, DPL 3
    (0x20, 0x00CF_9F00_0000_FFFF), // conforming code, DPL 0
    (0x28, 0x0000_8200_0000_0017), // LDT: filled in with its base at run time
    (0x30, 0x0000_8900_0000_0067), // 32-bit available TSS: base filled in at run time
    (0x38, 0x00CF_1300_0000_FFFF), // data, not present
    (0x40, 0x0040_9300_0000_0FFF), // byte-granular data, limit 0xFFF
    (0x48, 0x00CF_FB00_0000_FFFF), // flat code, DPL 3
];

/// Loads a GDT of its own with an LDT and a TSS, then prints what the system instructions
/// report about it, then loads far pointers and adjusts RPLs. Exits with value 0x14.
pub fn descriptors() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let mut gdt = Vec::new();
    for (_, d) in DESCRIPTOR_GDT {
        gdt.extend_from_slice(&d.to_le_bytes());
    }
    let gdt_addr = k.data(&gdt);
    let ldt_addr = k.data(
        &[0x00CF_9300_0000_FFFFu64, 0, 0]
            .map(u64::to_le_bytes)
            .concat(),
    );
    let tss_addr = k.data(&[0u8; 104]);
    let mut gdtr = ((gdt.len() - 1) as u16).to_le_bytes().to_vec();
    gdtr.extend_from_slice(&gdt_addr.to_le_bytes());
    let gdtr = k.data(&gdtr);
    let idtr = k.data(&[0xFF, 0x07, 0x00, 0x00, 0x01, 0x00]); // limit 0x7FF, base 0x10000
    let scratch = k.data(&[0u8; 8]);
    // Put the LDT's and TSS's bases into their descriptors (bits 16..39 and 56..63).
    for (sel, base) in [(0x28u32, ldt_addr), (0x30, tss_addr)] {
        let low = gdt_addr + sel;
        k.asm().mov(eax, base << 16)?;
        k.asm().or(dword_ptr(low), eax)?;
        k.asm().mov(eax, (base >> 16) & 0xFF)?;
        k.asm().or(dword_ptr(low + 4), eax)?;
        k.asm().mov(eax, base & 0xFF00_0000)?;
        k.asm().or(dword_ptr(low + 4), eax)?;
    }
    k.asm().lgdt(ptr(gdtr))?;
    k.asm().lidt(ptr(idtr))?;
    k.asm().mov(eax, 0x10u32)?;
    k.asm().mov(ds, eax)?;
    k.asm().mov(ss, eax)?;
    k.asm().sgdt(ptr(scratch))?;
    k.asm().movzx(eax, word_ptr(scratch))?;
    k.print_field("sgdt.limit", eax)?;
    k.asm().mov(eax, dword_ptr(scratch + 2))?;
    k.asm().sub(eax, gdt_addr)?;
    k.print_field("sgdt.base-gdt", eax)?;
    k.asm().sidt(ptr(scratch))?;
    k.asm().movzx(eax, word_ptr(scratch))?;
    k.print_field("sidt.limit", eax)?;
    k.asm().mov(eax, dword_ptr(scratch + 2))?;
    k.print_field("sidt.base", eax)?;
    k.asm().mov(eax, 0x28u32)?;
    k.asm().lldt(ax)?;
    k.asm().mov(eax, 0x30u32)?;
    k.asm().ltr(ax)?;
    k.asm().mov(eax, 0xFFFF_FFFFu32)?;
    k.asm().sldt(eax)?;
    k.print_field("sldt", eax)?;
    k.asm().mov(eax, 0xFFFF_FFFFu32)?;
    k.asm().str(eax)?;
    k.print_field("str", eax)?;
    k.asm().mov(eax, dword_ptr(gdt_addr + 0x34))?;
    k.asm().and(eax, 0x0000_FF00u32)?;
    k.print_field("tss.access-after-ltr", eax)?;
    k.asm().smsw(eax)?;
    k.print_field("smsw", eax)?;
    // An LDT selector (index 0, TI=1) loads the LDT's flat data descriptor.
    k.asm().mov(eax, 0x04u32)?;
    k.asm().mov(es, eax)?;
    k.asm().xor(eax, eax)?;
    k.asm().mov(ax, es)?;
    k.print_field("es-from-ldt", eax)?;
    for sel in [
        0x00u32, 0x08, 0x10, 0x18, 0x1B, 0x20, 0x28, 0x30, 0x38, 0x40, 0x48, 0x04, 0x0C, 0x50,
    ] {
        for (name, m) in [("lar", 0), ("lsl", 1), ("verr", 2), ("verw", 3)] {
            k.asm().mov(ecx, sel)?;
            k.asm().mov(eax, 0xDEAD_BEEFu32)?;
            match m {
                0 => k.asm().lar(eax, ecx)?,
                1 => k.asm().lsl(eax, ecx)?,
                2 => k.asm().verr(cx)?,
                _ => k.asm().verw(cx)?,
            }
            k.asm().setz(dl)?;
            k.asm().movzx(edx, dl)?;
            k.print(&format!("{name}({sel:#x}) zf="))?;
            k.print_hex(edx)?;
            if m < 2 {
                k.print(" value=")?;
                k.print_hex(eax)?;
            }
            k.print("\n")?;
        }
    }
    far_pointer_loads(&mut k, scratch)?;
    k.exit(0x14)?;
    k.build()
}

/// LDS, LES, LFS, LGS and LSS (32- and 16-bit offsets; a null selector into DS; the LDT; a
/// conforming code segment into ES), then ARPL on registers (16- and 32-bit operand size: only
/// the low word changes) and memory, raising the RPL or leaving it.
fn far_pointer_loads(k: &mut Kit, scratch: u32) -> AsmResult {
    let far = |k: &mut Kit, offset: u32, selector: u32, wide: bool| -> AsmResult {
        k.asm().mov(dword_ptr(scratch), offset)?;
        let at = if wide { scratch + 4 } else { scratch + 2 };
        Ok(k.asm().mov(word_ptr(at), selector)?)
    };
    let print_seg = |k: &mut Kit, name: &str, seg: AsmRegisterSegment| -> AsmResult {
        k.asm().xor(eax, eax)?;
        k.asm().mov(ax, seg)?;
        k.print_field(name, eax)
    };
    far(k, 0x1234_5678, 0x20, true)?;
    k.asm().les(ebx, ptr(scratch))?;
    print_seg(k, "les.es", es)?;
    k.print_field("les.ebx", ebx)?;
    k.asm().mov(ecx, 0xAAAA_AAAAu32)?;
    far(k, 0x9876_5432, 0x40, false)?;
    k.asm().lfs(cx, ptr(scratch))?;
    print_seg(k, "lfs16.fs", fs)?;
    k.print_field("lfs16.ecx", ecx)?;
    k.asm().lsl(edx, dword_ptr(scratch + 2))?; // the selector just loaded: limit 0xFFF
    k.print_field("lfs16.limit", edx)?;
    far(k, 0x0BAD_F00D, 0x04, true)?;
    k.asm().lgs(esi, ptr(scratch))?;
    print_seg(k, "lgs.gs", gs)?;
    k.print_field("lgs.esi", esi)?;
    // A null selector loads into DS (a later DS access would fault); DS comes back by LDS.
    far(k, 0x1111_2222, 0, true)?;
    k.asm().mov(dword_ptr(scratch + 8), 0x5555_6666u32)?;
    k.asm().mov(dword_ptr(scratch + 12), 0x10u32)?;
    k.asm().lds(edi, ptr(scratch))?;
    k.asm().mov(eax, ds)?;
    k.asm().mov(ebx, edi)?;
    k.asm().lds(edi, ptr(scratch + 8).ss())?;
    k.asm().movzx(eax, ax)?;
    k.print_field("lds-null.ds", eax)?;
    k.print_field("lds-null.edi", ebx)?;
    k.print_field("lds.edi", edi)?;
    // LSS: the same stack through a far pointer.
    k.asm().mov(dword_ptr(scratch), esp)?;
    k.asm().mov(word_ptr(scratch + 4), 0x10u32)?;
    k.asm().mov(ebx, esp)?;
    k.asm().xor(esp, esp)?;
    k.asm().lss(esp, ptr(scratch))?;
    k.asm().sub(ebx, esp)?;
    k.print_field("lss.esp-delta", ebx)?;
    print_seg(k, "lss.ss", ss)?;

    for (name, dest, src) in [
        ("arpl16.raise", 0xAAAA_0010u32, 3u32),
        ("arpl16.keep", 0xAAAA_0012, 1),
    ] {
        k.asm().mov(eax, dest)?;
        k.asm().mov(ecx, src)?;
        k.asm().arpl(ax, cx)?;
        k.asm().setz(dl)?;
        k.asm().movzx(edx, dl)?;
        k.print_field(&format!("{name}.zf"), edx)?;
        k.print_field(&format!("{name}.eax"), eax)?;
    }
    k.asm().mov(eax, 0xBBBB_0008u32)?;
    k.asm().mov(ecx, 0xFFFF_0002u32)?;
    k.asm().arpl(eax, ecx)?; // 63 /r without 66h: still a word operation
    k.print_field("arpl32.eax", eax)?;
    k.asm().mov(dword_ptr(scratch), 0xCCCC_0019u32)?;
    k.asm().mov(ecx, 3u32)?;
    k.asm().arpl(word_ptr(scratch), cx)?;
    k.asm().setz(dl)?;
    k.asm().movzx(edx, dl)?;
    k.print_field("arpl-mem.zf", edx)?;
    k.asm().mov(eax, dword_ptr(scratch))?;
    k.print_field("arpl-mem.value", eax)
}

/// Physical addresses of the `paging` kernel's tables (identity-mapped, below 4 MiB).
mod pt {
    pub const PD: u32 = 0x20_0000;
    pub const PT0: u32 = 0x20_1000; // identity 0..4 MiB
    pub const PT1: u32 = 0x20_2000; // linear 0x4000_0000..
    pub const PD_B: u32 = 0x20_3000; // second address space
    pub const PT2: u32 = 0x20_4000;
    pub const PDPT: u32 = 0x20_5000;
    pub const PAE_PD0: u32 = 0x20_6000;
    pub const PAE_PT: u32 = 0x20_7000;
    pub const PAE_PD1: u32 = 0x20_8000;
    pub const END: u32 = 0x20_9000;
    /// Where markers live.
    pub const MARK: u32 = 0x30_0000;
    pub const ALIAS: u32 = 0x4000_0000;
}

/// Exercises paging against a #PF handler that prints each fault and either applies a pending
/// fix-up (a PTE to write, then INVLPG and retry) or skips the faulting instruction. Exits with
/// value 0x15.
pub fn paging() -> AsmResult<Vec<u8>> {
    use pt::*;
    let mut k = Kit::new()?;
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let skip = k.data(&[0; 4]);
    let fix_addr = k.data(&[0; 4]);
    let fix_value = k.data(&[0; 4]);

    // The #PF handler, installed with the call/pop trick for its address.
    let mut install = k.asm().create_label();
    k.asm().call(install)?;
    {
        k.asm().pushad()?;
        k.print("pf cr2=")?;
        k.asm().mov(eax, cr2)?;
        k.print_hex(eax)?;
        k.print(" error=")?;
        k.asm().mov(eax, dword_ptr(esp + 32))?;
        k.print_hex(eax)?;
        k.print(" eip=+")?;
        k.asm().mov(eax, dword_ptr(esp + 36))?;
        k.asm().sub(eax, crate::kit::KERNEL_BASE)?;
        k.print_hex(eax)?;
        k.print("\n")?;
        let mut skip_path = k.asm().create_label();
        k.asm().mov(eax, dword_ptr(fix_addr))?;
        k.asm().test(eax, eax)?;
        k.asm().jz(skip_path)?;
        k.asm().mov(ecx, dword_ptr(fix_value))?;
        k.asm().mov(dword_ptr(eax), ecx)?;
        k.asm().mov(dword_ptr(fix_addr), 0u32)?;
        k.asm().mov(eax, cr2)?;
        k.asm().invlpg(ptr(eax))?;
        k.asm().popad()?;
        k.asm().add(esp, 4u32)?;
        k.asm().iretd()?;
        k.asm().set_label(&mut skip_path)?;
        k.asm().mov(eax, dword_ptr(skip))?;
        k.asm().add(dword_ptr(esp + 36), eax)?;
        k.asm().popad()?;
        k.asm().add(esp, 4u32)?;
        k.asm().iretd()?;
    }
    k.asm().set_label(&mut install)?;
    k.asm().pop(eax)?;
    k.asm().mov(edx, eax)?;
    k.asm().and(edx, 0xFFFF_0000u32)?;
    k.asm().or(edx, 0x8E00u32)?;
    k.asm().mov(dword_ptr(idt + 14 * 8 + 4), edx)?;
    k.asm().and(eax, 0xFFFFu32)?;
    k.asm().or(eax, 0x0008_0000u32)?;
    k.asm().mov(dword_ptr(idt + 14 * 8), eax)?;
    k.asm().lidt(ptr(idtr))?;

    // Zero the tables, fill the identity map, and set the markers.
    k.asm().cld()?;
    k.asm().mov(edi, PD)?;
    k.asm().xor(eax, eax)?;
    k.asm().mov(ecx, (END - PD) / 4)?;
    k.asm().rep().stosd()?;
    k.asm().mov(edi, PT0)?;
    k.asm().mov(eax, 3u32)?;
    k.asm().mov(ecx, 1024u32)?;
    let mut fill = k.asm().create_label();
    k.asm().set_label(&mut fill)?;
    k.asm().stosd()?;
    k.asm().add(eax, 0x1000u32)?;
    k.asm().loop_(fill)?;
    let put = |k: &mut Kit, addr: u32, v: u32| k.asm().mov(dword_ptr(addr), v);
    put(&mut k, PD, PT0 | 3)?;
    put(&mut k, PD + 4 * 0x100, PT1 | 3)?;
    put(&mut k, PD + 4 * 2, 0x40_0000 | 0x83)?; // 4 MiB page at 8 MiB -> 4 MiB
    put(&mut k, PT1, MARK | 3)?;
    put(&mut k, PT1 + 4, 0x40_1000 | 3)?;
    put(&mut k, PT1 + 12, 0x40_3000 | 1)?; // read-only
    put(&mut k, MARK + 0x1000, 0xAAAA_0001)?;
    put(&mut k, MARK + 0x2000, 0xBBBB_0002)?;

    k.asm().mov(eax, cr4)?;
    k.asm().or(eax, 0x10u32)?; // PSE
    k.asm().mov(cr4, eax)?;
    k.asm().mov(eax, PD)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 0x8001_0000u32)?; // PG | WP
    k.asm().mov(cr0, eax)?;
    k.print("paging on\n")?;

    // An alias: write through 0x4000_0000, read through the identity map.
    k.asm().mov(dword_ptr(ALIAS), 0x1122_3344u32)?;
    k.asm().mov(eax, dword_ptr(MARK))?;
    k.print_field("identity-read-of-alias-write", eax)?;
    // A 4 MiB page: write at 8 MiB + 0x1234, read through a 4 KiB alias of the same frame.
    k.asm().mov(dword_ptr(0x80_1234u32), 0x5555_6666u32)?;
    k.asm().mov(eax, dword_ptr(ALIAS + 0x1234))?;
    k.print_field("4m-page-through-4k-alias", eax)?;
    // Not present: skipped.
    k.asm().mov(dword_ptr(skip), 6u32)?; // mov eax, [abs32] is 5 bytes; 6 with a nop after
    k.asm().mov(eax, dword_ptr(0x5000_0000u32))?;
    k.asm().nop()?;
    // Read-only page with WP=1: fixed up to writable, then the write is retried.
    k.asm().mov(dword_ptr(fix_addr), PT1 + 12)?;
    k.asm().mov(dword_ptr(fix_value), 0x40_3000u32 | 3)?;
    k.asm().mov(dword_ptr(ALIAS + 0x3000), 0x7777_8888u32)?;
    k.asm().mov(eax, dword_ptr(ALIAS + 0x3000))?;
    k.print_field("after-fixup", eax)?;
    // Accessed and dirty bits.
    for (name, addr) in [
        ("pde-alias.ad", PD + 4 * 0x100),
        ("pte-alias.ad", PT1),
        ("pte-fixed-up.ad", PT1 + 12),
        ("pte-code.ad", PT0 + 4 * 0x100),
        ("pde-4m.ad", PD + 8),
        ("pte-4k-alias-of-4m.ad", PT1 + 4),
    ] {
        k.asm().mov(eax, dword_ptr(addr))?;
        k.asm().and(eax, 0x60u32)?;
        k.print_field(name, eax)?;
    }
    // INVLPG makes a changed PTE visible.
    put(&mut k, PT1, (MARK + 0x1000) | 3)?;
    k.asm().mov(eax, ALIAS)?;
    k.asm().invlpg(ptr(eax))?;
    k.asm().mov(eax, dword_ptr(ALIAS))?;
    k.print_field("after-invlpg", eax)?;
    // A second address space: copy the directory, repoint the alias, switch CR3 and back.
    k.asm().mov(esi, PD)?;
    k.asm().mov(edi, PD_B)?;
    k.asm().mov(ecx, 1024u32)?;
    k.asm().rep().movsd()?;
    put(&mut k, PD_B + 4 * 0x100, PT2 | 3)?;
    put(&mut k, PT2, (MARK + 0x2000) | 3)?;
    k.asm().mov(eax, PD_B)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, dword_ptr(ALIAS))?;
    k.print_field("space-b", eax)?;
    k.asm().mov(eax, PD)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, dword_ptr(ALIAS))?;
    k.print_field("space-a", eax)?;

    // PAE: paging off, build a PDPT with 2 MiB identity pages and a 4 KiB alias, paging on.
    k.asm().mov(eax, cr0)?;
    k.asm().and(eax, 0x7FFF_FFFFu32)?;
    k.asm().mov(cr0, eax)?;
    put(&mut k, PDPT, PAE_PD0 | 1)?;
    put(&mut k, PDPT + 8, PAE_PD1 | 1)?;
    put(&mut k, PAE_PD0, 0x83)?; // 0..2 MiB
    put(&mut k, PAE_PD0 + 8, 0x20_0000 | 0x83)?; // 2..4 MiB
    put(&mut k, PAE_PD1, PAE_PT | 3)?;
    put(&mut k, PAE_PT, (MARK + 0x2000) | 3)?;
    k.asm().mov(eax, cr4)?;
    k.asm().or(eax, 0x20u32)?; // PAE
    k.asm().mov(cr4, eax)?;
    k.asm().mov(eax, PDPT)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 0x8000_0000u32)?;
    k.asm().mov(cr0, eax)?;
    k.asm().mov(eax, dword_ptr(ALIAS))?;
    k.print_field("pae-alias", eax)?;
    k.asm().mov(eax, dword_ptr(PAE_PD0))?;
    k.asm().and(eax, 0x60u32)?;
    k.print_field("pae-2m-pde.ad", eax)?;
    // A PAE not-present fault in the second gigabyte.
    k.asm().mov(dword_ptr(skip), 6u32)?;
    k.asm().mov(eax, dword_ptr(ALIAS + 0x5000))?;
    k.asm().nop()?;
    k.exit(0x15)?;
    k.build()
}

/// A 32-bit TSS whose ring-0 stack is the kit's stack (SS0 = 0x10) and whose I/O permission
/// bitmap allows only COM1 (ports 0x3F8-0x3FF): returns its address and limit.
pub(crate) fn com1_tss(k: &mut Kit) -> (u32, u32) {
    let mut tss = vec![0u8; 104];
    tss[4..8].copy_from_slice(&0x0011_4000u32.to_le_bytes());
    tss[8..10].copy_from_slice(&0x10u16.to_le_bytes());
    tss[0x66..0x68].copy_from_slice(&104u16.to_le_bytes());
    let mut bitmap = vec![0xFFu8; 8192 + 1];
    bitmap[0x3F8 / 8] = 0;
    tss.extend_from_slice(&bitmap);
    let limit = (tss.len() - 1) as u32;
    (k.data(&tss), limit)
}

/// Emits code writing an available 32-bit TSS descriptor (byte-granular `limit`) for the TSS
/// at `base` into the GDT entry at `entry`.
pub(crate) fn set_tss_descriptor(k: &mut Kit, entry: u32, base: u32, limit: u32) -> AsmResult {
    let low = (base << 16) | (limit & 0xFFFF);
    let high = (base & 0xFF00_0000) | ((base >> 16) & 0xFF) | 0x8900 | (limit & 0xF_0000);
    k.asm().mov(dword_ptr(entry), low)?;
    Ok(k.asm().mov(dword_ptr(entry + 4), high)?)
}

/// The GDT of kernels that run code at CPL 0 and CPL 3 with one TSS (built at run time by
/// [`load_tables`]).
pub(crate) const RING_GDT: [u64; 6] = [
    0,
    0x00CF_9B00_0000_FFFF, // 0x08 code, DPL 0
    0x00CF_9300_0000_FFFF, // 0x10 data, DPL 0
    0x00CF_FB00_0000_FFFF, // 0x18 code, DPL 3
    0x00CF_F300_0000_FFFF, // 0x20 data, DPL 3
    0,                     // 0x28 TSS, built at run time
];

/// Emits the switch to a kernel's own tables with its TSS at GDT selector 0x28: the TSS
/// descriptor (base `tss`, byte-granular `tss_limit`), LGDT, LIDT, and LTR 0x28.
pub(crate) fn load_tables(
    k: &mut Kit,
    gdt: (u32, u32),
    idtr: u32,
    tss: u32,
    tss_limit: u32,
) -> AsmResult {
    set_tss_descriptor(k, gdt.0 + 0x28, tss, tss_limit)?;
    k.asm().lgdt(ptr(gdt.1))?;
    k.asm().lidt(ptr(idtr))?;
    k.asm().mov(eax, 0x28u32)?;
    Ok(k.asm().ltr(ax)?)
}

/// Emits `call over; <handler>; over: pop eax` and returns with EAX = the handler's address:
/// how kit kernels find their own code addresses at run time.
pub(crate) fn handler_address(k: &mut Kit, body: impl FnOnce(&mut Kit) -> AsmResult) -> AsmResult {
    let mut over = k.asm().create_label();
    k.asm().call(over)?;
    body(k)?;
    k.asm().set_label(&mut over)?;
    k.asm().pop(eax)?;
    Ok(())
}

/// Emits an IRET into ring 3 (CS 0x1B, SS 0x23:`user_stack`, EFLAGS 2, interrupts off) that
/// continues right after itself, with DS and ES loaded with 0x23: what follows runs at CPL 3.
pub(crate) fn enter_ring3(k: &mut Kit, user_stack: u32) -> AsmResult {
    let slot = k.address_slot();
    k.asm().push(0x23u32)?;
    k.asm().push(user_stack)?;
    k.asm().push(0x2u32)?;
    k.asm().push(0x1Bu32)?;
    k.asm().push(dword_ptr(slot))?;
    k.asm().iretd()?;
    let mut user = k.asm().create_label();
    k.set_label_at(&mut user, slot)?;
    k.asm().mov(eax, 0x23u32)?;
    k.asm().mov(ds, eax)?;
    Ok(k.asm().mov(es, eax)?)
}

/// Emits code storing a 32-bit interrupt gate for vector `v` at `idt` to the handler whose
/// address the data word `slot` holds, through selector 0x08, with `access` (0x8E: DPL 0
/// interrupt gate; 0xEE: DPL 3).
fn set_gate_from_slot(k: &mut Kit, idt: u32, v: u32, slot: u32, access: u32) -> AsmResult {
    k.asm().mov(eax, dword_ptr(slot))?;
    set_gate(k, idt, v, access)
}

/// Emits code that stores an interrupt gate for vector `v` at `idt`, pointing at EAX through
/// selector 0x08, with `access` (0x8E: DPL 0 interrupt gate; 0xEE: DPL 3).
pub(crate) fn set_gate(k: &mut Kit, idt: u32, v: u32, access: u32) -> AsmResult {
    k.asm().mov(edx, eax)?;
    k.asm().and(edx, 0xFFFF_0000u32)?;
    k.asm().or(edx, access << 8)?;
    k.asm().mov(dword_ptr(idt + v * 8 + 4), edx)?;
    k.asm().and(eax, 0xFFFFu32)?;
    k.asm().or(eax, 0x0008_0000u32)?;
    k.asm().mov(dword_ptr(idt + v * 8), eax)?;
    Ok(())
}

/// Enters ring 3 and exercises the ways back into ring 0. Exits with value 0x16.
pub fn rings() -> AsmResult<Vec<u8>> {
    use pt::*;
    const GDT_ENTRIES: [u64; 11] = [
        0,
        0x00CF_9B00_0000_FFFF, // 0x08 code, DPL 0
        0x00CF_9300_0000_FFFF, // 0x10 data, DPL 0
        0x00CF_FB00_0000_FFFF, // 0x18 code, DPL 3
        0x00CF_F300_0000_FFFF, // 0x20 data, DPL 3
        0,                     // 0x28 TSS, built at run time
        0,                     // 0x30 call gate, built at run time
        0x00CF_9B00_0000_FFFF, // 0x38 SYSENTER_CS: code, DPL 0
        0x00CF_9300_0000_FFFF, // 0x40 data, DPL 0
        0x00CF_FB00_0000_FFFF, // 0x48 code, DPL 3
        0x00CF_F300_0000_FFFF, // 0x50 data, DPL 3
    ];
    let mut k = Kit::new()?;
    let (gdt, gdtr) = k.descriptor_table(&GDT_ENTRIES.map(u64::to_le_bytes).concat());
    // TSS with an I/O bitmap allowing only COM1 (ports 0x3F8-0x3FF), then the terminator.
    let (tss, tss_limit) = com1_tss(&mut k);
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let skip = k.data(&[0; 4]);
    let done = k.data(&[0; 4]);
    let user_stack = k.data(&[0u8; 4096]) + 4096;
    let mut common = k.asm().create_label();

    // Exception stubs: (vector, pushes an error code).
    for (v, has_error) in [(6u32, false), (13, true), (14, true)] {
        handler_address(&mut k, |k| {
            if !has_error {
                k.asm().push(0u32)?;
            }
            k.asm().push(v)?;
            Ok(k.asm().jmp(common)?)
        })?;
        set_gate(&mut k, idt, v, 0x8E)?;
    }
    // INT 0x80: a system call, callable from ring 3.
    handler_address(&mut k, |k| {
        k.print("syscall eax=")?;
        k.print_hex(eax)?;
        k.print(" from-cs=")?;
        k.asm().mov(eax, dword_ptr(esp + 4))?;
        k.print_hex(eax)?;
        k.print(" from-ss=")?;
        k.asm().mov(eax, dword_ptr(esp + 16))?;
        k.print_hex(eax)?;
        k.print(" now-cs=")?;
        k.asm().xor(eax, eax)?;
        k.asm().mov(ax, cs)?;
        k.print_hex(eax)?;
        k.print("\n")?;
        Ok(k.asm().iretd()?)
    })?;
    set_gate(&mut k, idt, 0x80, 0xEE)?;
    // INT 0x81: leave the test.
    handler_address(&mut k, |k| {
        k.print("exit requested from ring 3\n")?;
        k.exit(0x16)
    })?;
    set_gate(&mut k, idt, 0x81, 0xEE)?;
    // The call gate's target: prints its parameter and returns to ring 3 dropping it.
    handler_address(&mut k, |k| {
        k.print("call gate: cs=")?;
        k.asm().xor(eax, eax)?;
        k.asm().mov(ax, cs)?;
        k.print_hex(eax)?;
        k.print(" param=")?;
        k.asm().mov(eax, dword_ptr(esp + 8))?;
        k.print_hex(eax)?;
        k.print(" caller-ss=")?;
        k.asm().mov(eax, dword_ptr(esp + 16))?;
        k.print_hex(eax)?;
        k.print("\n")?;
        Ok(k.asm().retf_1(4)?)
    })?;
    // Call gate descriptor at 0x30: DPL 3, 32-bit, one parameter, to 0x08:EAX.
    k.asm().mov(edx, eax)?;
    k.asm().and(edx, 0xFFFF_0000u32)?;
    k.asm().or(edx, 0xEC01u32)?;
    k.asm().mov(dword_ptr(gdt + 0x34), edx)?;
    k.asm().and(eax, 0xFFFFu32)?;
    k.asm().or(eax, 0x0008_0000u32)?;
    k.asm().mov(dword_ptr(gdt + 0x30), eax)?;
    // SYSENTER's target.
    handler_address(&mut k, |k| {
        k.asm().mov(dword_ptr(done), 1u32)?;
        k.print("sysenter: cs=")?;
        k.asm().xor(eax, eax)?;
        k.asm().mov(ax, cs)?;
        k.print_hex(eax)?;
        k.print(" ss=")?;
        k.asm().mov(ax, ss)?;
        k.print_hex(eax)?;
        k.print("\n")?;
        Ok(k.asm().sysexit()?)
    })?;
    k.asm().mov(ecx, 0x176u32)?;
    k.asm().xor(edx, edx)?;
    k.asm().wrmsr()?;
    k.asm().mov(ecx, 0x174u32)?;
    k.asm().mov(eax, 0x38u32)?;
    k.asm().wrmsr()?;
    k.asm().mov(ecx, 0x175u32)?;
    k.asm().mov(eax, 0x0011_3000u32)?;
    k.asm().wrmsr()?;

    // TSS descriptor at 0x28: base `tss`, byte-granular limit, available 32-bit TSS.
    load_tables(&mut k, (gdt, gdtr), idtr, tss, tss_limit)?;

    // Paging: identity 0..4 MiB, user-accessible except the page at MARK.
    const _: () = assert!(PT0 == PD + 0x1000);
    k.identity_map_4mib(PD)?;
    k.asm().mov(dword_ptr(PT0 + 4 * (MARK >> 12)), MARK | 3)?;
    k.asm().mov(eax, PD)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 0x8001_0000u32)?;
    k.asm().mov(cr0, eax)?;

    // Into ring 3 with IRET: SS:ESP, EFLAGS (IOPL 0), CS:EIP.
    k.print("entering ring 3\n")?;
    k.asm().push(0x23u32)?;
    k.asm().push(user_stack)?;
    k.asm().push(0x2u32)?;
    k.asm().push(0x1Bu32)?;
    handler_address(&mut k, |k| {
        // Ring 3 from here on.
        k.asm().mov(eax, 0x23u32)?;
        k.asm().mov(ds, eax)?;
        k.asm().mov(es, eax)?;
        k.print("ring 3: cs=")?;
        k.asm().xor(eax, eax)?;
        k.asm().mov(ax, cs)?;
        k.print_hex(eax)?;
        k.print("\n")?;
        k.asm().mov(eax, 0x1234u32)?;
        k.asm().int(0x80)?;
        k.print("cli: ")?;
        k.asm().mov(dword_ptr(skip), 1u32)?;
        k.asm().cli()?;
        k.print("out to a denied port: ")?;
        k.asm().mov(dword_ptr(skip), 2u32)?;
        k.asm().out(0xF4, al)?;
        k.print("supervisor page: ")?;
        k.asm().mov(dword_ptr(skip), 5u32)?;
        k.asm().mov(eax, dword_ptr(MARK))?;
        k.print("ring-0 data segment: ")?;
        k.asm().mov(dword_ptr(skip), 2u32)?;
        k.asm().mov(eax, 0x10u32)?;
        k.asm().mov(ds, eax)?;
        k.asm().push(0x5678u32)?;
        k.asm().call_far(0x30, 0)?;
        k.print("back from the call gate: esp-ok=")?;
        k.asm().mov(eax, esp)?;
        k.asm().sub(eax, user_stack - 4)?;
        k.print_hex(eax)?;
        k.print("\n")?;
        // SYSENTER, returning to the `cmp` through EDX: `here` + 1 (POP EDX) + 3 (ADD imm8).
        let mut after = k.asm().create_label();
        let mut here = k.asm().create_label();
        k.asm().call(here)?;
        k.asm().set_label(&mut here)?;
        k.asm().pop(edx)?;
        k.asm().add(edx, 4u32)?;
        k.asm().cmp(dword_ptr(done), 0u32)?;
        k.asm().jne(after)?;
        k.asm().mov(ecx, esp)?;
        k.asm().sysenter()?;
        k.asm().set_label(&mut after)?;
        k.print("after sysexit: cs=")?;
        k.asm().xor(eax, eax)?;
        k.asm().mov(ax, cs)?;
        k.print_hex(eax)?;
        k.print("\n")?;
        k.asm().int(0x81)?;
        k.halt_forever()
    })?;
    k.asm().push(eax)?;
    k.asm().iretd()?;

    // The common exception handler: prints the frame and skips the faulting instruction.
    // [esp] vector, [esp+4] error, then EIP, CS, EFLAGS, ESP, SS of the interrupted ring 3.
    k.asm().set_label(&mut common)?;
    k.print("vector=")?;
    k.asm().mov(eax, dword_ptr(esp))?;
    k.print_hex(eax)?;
    k.print(" error=")?;
    k.asm().mov(eax, dword_ptr(esp + 4))?;
    k.print_hex(eax)?;
    k.print(" cs=")?;
    k.asm().mov(eax, dword_ptr(esp + 12))?;
    k.print_hex(eax)?;
    k.print(" ss=")?;
    k.asm().mov(eax, dword_ptr(esp + 24))?;
    k.print_hex(eax)?;
    k.print(" cr2=")?;
    k.asm().mov(eax, cr2)?;
    k.print_hex(eax)?;
    k.print("\n")?;
    k.asm().mov(eax, dword_ptr(skip))?;
    k.asm().add(dword_ptr(esp + 8), eax)?;
    k.asm().add(esp, 8u32)?;
    k.asm().iretd()?;
    k.build()
}

/// Runs 16-bit code in virtual-8086 mode under a small monitor. Exits with value 0x17.
pub fn v86() -> AsmResult<Vec<u8>> {
    const CODE16: u32 = 0x2_0000; // 2000:0000
    const PHASE2: u32 = 0x100; // 2000:0100
    let mut a = CodeAssembler::new(16)?;
    // Phase 1, IOPL 0.
    out(&mut a, "v86: hello\n")?;
    a.mov(ax, 0x1234u32)?;
    a.mov(bx, 0x1111u32)?;
    a.add(ax, bx)?;
    a.mov(word_ptr(0x10u32), ax)?; // DS = 0x3000: linear 0x30010
    a.push(ax)?;
    a.pop(cx)?;
    a.int(0x30)?;
    a.cli()?;
    a.pushf()?;
    a.hlt()?;
    let phase1 = a.assemble(0)?;
    assert!(
        phase1.len() <= PHASE2 as usize,
        "phase 1 of the v86 code is too long"
    );
    // Phase 2, IOPL 3.
    let mut a = CodeAssembler::new(16)?;
    out(&mut a, "v86: iopl 3\n")?;
    a.cli()?;
    a.sti()?;
    a.pushf()?;
    a.pop(ax)?;
    a.mov(word_ptr(0x12u32), ax)?;
    a.int(0x31)?;
    a.hlt()?;
    let phase2 = a.assemble(u64::from(PHASE2))?;
    let mut code16 = phase1;
    code16.resize(PHASE2 as usize, 0x90);
    code16.extend_from_slice(&phase2);

    let mut k = Kit::new()?;
    let code16_len = code16.len() as u32;
    let code16_src = k.data(&code16);
    let gdt: [u64; 4] = [0, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF, 0];
    let (gdt_addr, gdtr) = k.descriptor_table(&gdt.map(u64::to_le_bytes).concat());
    let (tss, tss_limit) = com1_tss(&mut k);
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let phase = k.data(&[0; 4]);

    // INT 0x31 from v86 at IOPL 3 arrives here through a DPL 3 gate.
    handler_address(&mut k, |k| {
        k.asm().pushad()?;
        k.asm().mov(eax, 0x10u32)?;
        k.asm().mov(ds, eax)?;
        k.asm().mov(es, eax)?;
        k.print("int 0x31 from v86: cs=")?;
        k.asm().mov(eax, dword_ptr(esp + 32 + 4))?;
        k.print_hex(eax)?;
        k.print(" eflags=")?;
        k.asm().mov(eax, dword_ptr(esp + 32 + 8))?;
        k.asm().and(eax, !0x8D5u32)?;
        k.print_hex(eax)?;
        k.print(" ds=")?;
        k.asm().mov(eax, dword_ptr(esp + 32 + 24))?;
        k.print_hex(eax)?;
        k.print(" saved-flags-word=")?;
        k.asm().movzx(eax, word_ptr(0x3_0012u32))?;
        k.asm().and(eax, !0x8D5u32)?;
        k.print_hex(eax)?;
        k.print("\n")?;
        k.asm().popad()?;
        Ok(k.asm().iretd()?)
    })?;
    set_gate(&mut k, idt, 0x31, 0xEE)?;
    // The monitor: #GP from v86. Frame after PUSHAD (32 bytes): error, EIP, CS, EFLAGS, ESP, SS,
    // ES, DS, FS, GS.
    handler_address(&mut k, |k| {
        let f = |n: u32| 32 + 4 * n;
        k.asm().pushad()?;
        k.asm().mov(eax, 0x10u32)?;
        k.asm().mov(ds, eax)?;
        k.asm().mov(es, eax)?;
        // EBX = linear address of the faulting instruction: CS * 16 + IP.
        k.asm().mov(ebx, dword_ptr(esp + f(2)))?;
        k.asm().shl(ebx, 4u32)?;
        k.asm().add(ebx, dword_ptr(esp + f(1)))?;
        k.asm().movzx(ecx, byte_ptr(ebx))?;
        k.print("monitor: #GP cs:ip=")?;
        k.asm().mov(eax, dword_ptr(esp + f(2)))?;
        k.print_hex(eax)?;
        k.print(":")?;
        k.asm().mov(eax, dword_ptr(esp + f(1)))?;
        k.print_hex(eax)?;
        k.print(" opcode=")?;
        k.print_hex(ecx)?;
        k.print(" ss:sp=")?;
        k.asm().mov(eax, dword_ptr(esp + f(5)))?;
        k.print_hex(eax)?;
        k.print(":")?;
        k.asm().mov(eax, dword_ptr(esp + f(4)))?;
        k.print_hex(eax)?;
        k.print(" ds=")?;
        k.asm().mov(eax, dword_ptr(esp + f(7)))?;
        k.print_hex(eax)?;
        k.print(" ax=")?;
        k.asm().mov(eax, dword_ptr(esp + 28))?;
        k.print_hex(eax)?;
        k.print("\n")?;
        let mut not_int = k.asm().create_label();
        let mut not_hlt = k.asm().create_label();
        let mut resume = k.asm().create_label();
        k.asm().cmp(ecx, 0xCDu32)?;
        k.asm().jne(not_int)?;
        k.print("monitor: emulating int ")?;
        k.asm().movzx(eax, byte_ptr(ebx + 1))?;
        k.print_hex(eax)?;
        k.print(", memory at 3000:0010=")?;
        k.asm().movzx(eax, word_ptr(0x3_0010u32))?;
        k.print_hex(eax)?;
        k.print("\n")?;
        k.asm().add(dword_ptr(esp + f(1)), 2u32)?;
        k.asm().jmp(resume)?;
        k.asm().set_label(&mut not_int)?;
        k.asm().cmp(ecx, 0xF4u32)?;
        k.asm().jne(not_hlt)?;
        // HLT ends a phase: the first re-enters at 2000:0100 with IOPL 3, the second exits.
        let mut finish = k.asm().create_label();
        k.asm().cmp(dword_ptr(phase), 0u32)?;
        k.asm().jne(finish)?;
        k.asm().mov(dword_ptr(phase), 1u32)?;
        k.asm().mov(dword_ptr(esp + f(1)), PHASE2)?;
        k.asm().mov(dword_ptr(esp + f(3)), 0x0002_3002u32)?; // VM | IOPL 3
        k.asm().jmp(resume)?;
        k.asm().set_label(&mut finish)?;
        k.print("monitor: done\n")?;
        k.exit(0x17)?;
        k.asm().set_label(&mut not_hlt)?;
        k.asm().add(dword_ptr(esp + f(1)), 1u32)?;
        k.asm().set_label(&mut resume)?;
        k.asm().popad()?;
        k.asm().add(esp, 4u32)?;
        Ok(k.asm().iretd()?)
    })?;
    set_gate(&mut k, idt, 13, 0x8E)?;

    set_tss_descriptor(&mut k, gdt_addr + 0x18, tss, tss_limit)?;
    k.asm().lgdt(ptr(gdtr))?;
    k.asm().lidt(ptr(idtr))?;
    k.asm().mov(eax, 0x18u32)?;
    k.asm().ltr(ax)?;
    k.asm().cld()?;
    k.asm().mov(esi, code16_src)?;
    k.asm().mov(edi, CODE16)?;
    k.asm().mov(ecx, code16_len)?;
    k.asm().rep().movsb()?;
    k.print("entering virtual-8086 mode\n")?;
    // IRET pops EIP, CS, EFLAGS, ESP, SS, ES, DS, FS, GS.
    for v in [
        0u32,
        0,
        0x3000,
        0,
        0x3000,
        0x1000,
        0x0002_0002,
        CODE16 >> 4,
        0,
    ] {
        k.asm().push(v)?;
    }
    k.asm().iretd()?;
    k.build()
}

/// Emits code printing `name=` and a TSS descriptor's busy bit (type bit 1) for GDT entry `sel`.
fn print_busy(k: &mut Kit, gdt: u32, name: &str, sel: u32) -> AsmResult {
    k.asm().movzx(eax, byte_ptr(gdt + sel + 5))?;
    k.asm().shr(eax, 1u32)?;
    k.asm().and(eax, 1u32)?;
    k.print(&format!(" {name}="))?;
    k.print_hex(eax)
}

/// Emits code printing the current TR, NT and both TSS busy bits.
fn print_task_state(k: &mut Kit, gdt: u32, label: &str) -> AsmResult {
    k.print(&format!("{label}: tr="))?;
    k.asm().xor(eax, eax)?;
    k.asm().str(ax)?;
    k.print_hex(eax)?;
    k.print(" nt=")?;
    k.asm().pushfd()?;
    k.asm().pop(eax)?;
    k.asm().shr(eax, 14u32)?;
    k.asm().and(eax, 1u32)?;
    k.print_hex(eax)?;
    print_busy(k, gdt, "busyA", 0x18)?;
    print_busy(k, gdt, "busyB", 0x20)?;
    k.print("\n")
}

/// Switches between three hardware tasks. Exits with value 0x18.
pub fn tasks() -> AsmResult<Vec<u8>> {
    const GDT_ENTRIES: [u64; 7] = [
        0,
        0x00CF_9B00_0000_FFFF, // 0x08 code
        0x00CF_9300_0000_FFFF, // 0x10 data
        0,                     // 0x18 TSS A (main)
        0,                     // 0x20 TSS B
        0,                     // 0x28 TSS C (#DE handler task)
        0,                     // 0x30 task gate to TSS B
    ];
    let mut k = Kit::new()?;
    let (gdt, gdtr) = k.descriptor_table(&GDT_ENTRIES.map(u64::to_le_bytes).concat());
    let stack_b = k.data(&[0u8; 1024]) + 1024;
    let stack_c = k.data(&[0u8; 1024]) + 1024;
    // A TSS image: EFLAGS 2, flat segments, the given stack; EIP filled in at run time.
    let tss_image = |stack_top: u32| {
        let mut t = vec![0u8; 104];
        let mut put = |off: usize, v: u32| t[off..off + 4].copy_from_slice(&v.to_le_bytes());
        put(0x24, 2);
        put(0x38, stack_top);
        for off in [0x48, 0x50, 0x54, 0x58, 0x5C] {
            put(off, 0x10);
        }
        put(0x4C, 0x08);
        t[0x66..0x68].copy_from_slice(&104u16.to_le_bytes());
        t
    };
    let tss_a = k.data(&tss_image(0));
    let tss_b = k.data(&tss_image(stack_b));
    let tss_c = k.data(&tss_image(stack_c));
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    for (sel, base) in [(0x18u32, tss_a), (0x20, tss_b), (0x28, tss_c)] {
        set_tss_descriptor(&mut k, gdt + sel, base, 0x67)?;
    }
    // Task gates: 0x30 in the GDT to TSS B, and vector 0 (#DE) in the IDT to TSS C.
    k.asm().mov(dword_ptr(gdt + 0x30), 0x0020_0000u32)?;
    k.asm().mov(dword_ptr(gdt + 0x34), 0x8500u32)?;
    k.asm().mov(dword_ptr(idt), 0x0028_0000u32)?;
    k.asm().mov(dword_ptr(idt + 4), 0x8500u32)?;

    // Task B: reports, returns with IRET (NT), and later resumes to JMP back to task A.
    handler_address(&mut k, |k| {
        print_task_state(k, gdt, "task B")?;
        k.print("task B: link=")?;
        k.asm().movzx(eax, word_ptr(tss_b))?;
        k.print_hex(eax)?;
        k.print("\n")?;
        k.asm().iretd()?;
        print_task_state(k, gdt, "task B resumed by a JMP")?;
        k.asm().jmp_far(0x18, 0)?;
        k.halt_forever()
    })?;
    k.asm().mov(dword_ptr(tss_b + 0x20), eax)?;
    // Task C: the #DE handler; it steps task A past the DIV and returns.
    handler_address(&mut k, |k| {
        print_task_state(k, gdt, "task C for #DE")?;
        k.print("task C: link=")?;
        k.asm().movzx(eax, word_ptr(tss_c))?;
        k.print_hex(eax)?;
        k.print(" faulting eip=+")?;
        k.asm().mov(eax, dword_ptr(tss_a + 0x20))?;
        k.asm().sub(eax, crate::kit::KERNEL_BASE)?;
        k.print_hex(eax)?;
        k.print("\n")?;
        k.asm().add(dword_ptr(tss_a + 0x20), 2u32)?;
        k.asm().iretd()?;
        k.halt_forever()
    })?;
    k.asm().mov(dword_ptr(tss_c + 0x20), eax)?;

    k.asm().lgdt(ptr(gdtr))?;
    k.asm().lidt(ptr(idtr))?;
    k.asm().mov(eax, 0x18u32)?;
    k.asm().ltr(ax)?;
    print_task_state(&mut k, gdt, "task A")?;
    k.asm().call_far(0x20, 0)?;
    print_task_state(&mut k, gdt, "back in task A after CALL/IRET")?;
    k.asm().jmp_far(0x30, 0)?;
    print_task_state(&mut k, gdt, "task A resumed after JMP")?;
    k.asm().xor(ecx, ecx)?;
    k.asm().div(ecx)?;
    print_task_state(&mut k, gdt, "task A after #DE")?;
    k.asm().mov(eax, cr0)?;
    k.asm().and(eax, 8u32)?;
    k.print_field("cr0.ts", eax)?;
    k.exit(0x18)?;
    k.build()
}

/// Emits the timer setup shared by the interrupt kernels: an IDT whose vector 0x20 counts
/// ticks (with a non-specific EOI), the 8259s remapped to 0x20/0x28 with only IRQ 0 unmasked,
/// and the PIT's channel 0 in mode 2 at 100 Hz. Interrupts stay disabled; returns the address of
/// the tick counter.
pub(crate) fn count_pit_ticks(k: &mut Kit) -> AsmResult<u32> {
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let ticks = k.data(&[0; 4]);
    handler_address(k, |k| {
        k.asm().push(eax)?;
        k.asm().inc(dword_ptr(ticks))?;
        k.asm().mov(al, 0x20u32)?;
        k.asm().out(0x20, al)?; // non-specific EOI
        k.asm().pop(eax)?;
        Ok(k.asm().iretd()?)
    })?;
    set_gate(k, idt, 0x20, 0x8E)?;
    k.asm().lidt(ptr(idtr))?;
    init_pics(k.asm(), (0x20, 0x28), (0xFE, 0xFF))?;
    pit_rate_generator(k.asm(), 11932)?;
    Ok(ticks)
}

/// Takes timer interrupts while halted: the PICs remapped to 0x20/0x28 with only IRQ 0
/// unmasked, the PIT's channel 0 in mode 2 at 100 Hz, and an `sti; hlt` loop until the
/// handler has counted 10 ticks. Exits with value 0x19.
pub fn timer() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let ticks = count_pit_ticks(&mut k)?;
    let outb = |k: &mut Kit, port: u32, v: u32| -> AsmResult {
        k.asm().mov(al, v)?;
        Ok(k.asm().out(port, al)?)
    };
    k.asm().sti()?;
    let mut again = k.asm().create_label();
    k.asm().set_label(&mut again)?;
    k.asm().hlt()?;
    k.asm().cmp(dword_ptr(ticks), 10u32)?;
    k.asm().jb(again)?;
    k.asm().cli()?;
    k.print("ten timer interrupts taken while halted\n")?;
    outb(&mut k, 0x20, 0x0B)?; // OCW3: read ISR
    k.asm().xor(eax, eax)?;
    k.asm().in_(al, 0x20)?;
    k.print_field("master.isr", eax)?;
    k.asm().in_(al, 0x21)?;
    k.print_field("master.imr", eax)?;
    outb(&mut k, 0x43, 0xE2)?; // read-back: status of channel 0
    k.asm().xor(eax, eax)?;
    k.asm().in_(al, 0x40)?;
    k.asm().and(eax, 0x3Fu32)?;
    k.print_field("pit0.status", eax)?;
    k.exit(0x19)?;
    k.build()
}

/// Triple-faults: no IDT, then an invalid opcode.
pub fn triple_fault() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let idtr = k.data(&[0, 0, 0, 0, 0, 0]); // limit 0, base 0
    k.print("about to triple fault\n")?;
    k.asm().lidt(ptr(idtr))?;
    k.asm().ud2()?;
    k.exit(0x7F)?; // never reached
    k.build()
}

/// Prints a line and halts with interrupts disabled.
pub fn halt() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    k.print("halting with interrupts off\n")?;
    k.halt_forever()?;
    k.build()
}

/// Powers off through ACPI PM1a_CNT at port 0x604 (SLP_TYP=0, SLP_EN).
pub fn poweroff() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    k.print("powering off\n")?;
    k.asm().mov(dx, 0x604u32)?;
    k.asm().mov(ax, 0x2000u32)?;
    k.asm().out(dx, ax)?;
    k.print("still running after power-off\n")?;
    k.exit(0x7E)?;
    k.build()
}

/// Touches memory nobody backs: the IOAPIC/MMIO hole, the VGA window, and the read-only
/// firmware area (the boot GDT bt86 puts at 0xE0000), printing what reads return. Exits with
/// value 0x12.
pub fn mmio_nowhere() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    for (name, addr) in [
        ("hole", 0xD000_0000u32),
        ("vga", 0xB_8000),
        ("rom_low", 0xE_0008),
        ("rom_high", 0xFFFE_0008),
    ] {
        k.asm().mov(eax, dword_ptr(addr))?;
        k.print_field(&format!("{name}.before"), eax)?;
        k.asm().mov(dword_ptr(addr), 0x1234_5678u32)?;
        k.asm().mov(eax, dword_ptr(addr))?;
        k.print_field(&format!("{name}.after"), eax)?;
    }
    // A port nobody owns.
    k.asm().mov(dx, 0x2F8u32)?;
    k.asm().in_(eax, dx)?;
    k.print_field("port", eax)?;
    k.exit(0x12)?;
    k.build()
}

/// Jumps to an address with nothing behind it.
pub fn wild_jump() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    k.print("jumping into the MMIO hole\n")?;
    k.asm().mov(eax, 0xD000_0000u32)?;
    k.asm().jmp(eax)?;
    k.exit(0x7D)?;
    k.build()
}

/// Real-mode firmware: starts at the reset vector, sets up a stack, calls a subroutine that prints
/// through COM1, and exits with value 5.
pub fn real_mode_rom() -> AsmResult<Vec<u8>> {
    reset_rom(|a| {
        let mut putc = a.create_label();
        let mut main = a.create_label();
        a.jmp(main)?;
        a.set_label(&mut putc)?;
        a.mov(dx, 0x3F8u32)?;
        a.out(dx, al)?;
        a.ret()?;
        a.set_label(&mut main)?;
        a.xor(ax, ax)?;
        a.mov(ss, ax)?;
        a.mov(sp, 0x7000u32)?;
        for &c in b"real mode at the reset vector\n" {
            a.mov(al, u32::from(c))?;
            a.call(putc)?;
        }
        a.mov(al, 5u32)?;
        a.out(0xF4, al)?;
        a.cli()?;
        a.hlt()?;
        Ok(())
    })
}

/// Emits 16-bit code writing `text` to COM1 one `out` at a time (clobbers AL and DX).
fn out(a: &mut CodeAssembler, text: &str) -> AsmResult {
    a.mov(dx, 0x3F8u32)?;
    for c in text.bytes() {
        a.mov(al, u32::from(c))?;
        a.out(dx, al)?;
    }
    Ok(())
}

/// Real-mode firmware taking PIT interrupts through the IVT: five ticks waited for with HLT, then
/// five while spinning on memory (a guest that never exits on its own). Exits with value 6.
pub fn timer_rom() -> AsmResult<Vec<u8>> {
    const TICKS: u32 = 0x500;
    let body = |a: &mut CodeAssembler, handler_ip: u32, handler: &mut CodeLabel| -> AsmResult {
        a.cli()?;
        a.xor(ax, ax)?;
        a.mov(ds, ax)?;
        a.mov(ss, ax)?;
        a.mov(sp, 0x7000u32)?;
        a.mov(word_ptr(0x20u32), handler_ip)?;
        a.mov(word_ptr(0x22u32), 0xF000u32)?;
        a.mov(word_ptr(TICKS), 0u32)?;
        // 8259A pair: vectors 0x08 and 0x70, cascade on IRQ 2, 8086 mode; only IRQ 0 unmasked.
        init_pics(a, (0x08, 0x70), (0xFE, 0xFF))?;
        // PIT channel 0, mode 2, 100 Hz.
        pit_rate_generator(a, 11932)?;
        a.sti()?;
        let mut halted = a.create_label();
        a.set_label(&mut halted)?;
        a.hlt()?;
        a.cmp(word_ptr(TICKS), 5u32)?;
        a.jb(halted)?;
        out(a, "5 ticks while halted\n")?;
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.cmp(word_ptr(TICKS), 10u32)?;
        a.jb(spin)?;
        a.cli()?;
        out(a, "5 more while spinning\n")?;
        a.mov(al, 6u32)?;
        a.out(0xF4, al)?;
        a.hlt()?;
        // IRQ 0: count and acknowledge.
        a.set_label(handler)?;
        a.push(ax)?;
        a.inc(word_ptr(TICKS))?;
        a.mov(al, 0x20u32)?;
        a.out(0x20, al)?;
        a.pop(ax)?;
        a.iret()?;
        Ok(())
    };
    // First pass: where the handler lands; the second emits the same code with that address.
    let mut a = CodeAssembler::new(16)?;
    let mut handler = a.create_label();
    body(&mut a, 0, &mut handler)?;
    let ip = a
        .assemble_options(
            0,
            iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )?
        .label_ip(&handler)? as u32;
    reset_rom(|a| {
        let mut handler = a.create_label();
        body(a, ip, &mut handler)
    })
}

/// Exercises the floating-point unit the way kernels use it and prints what it sees: exact x87,
/// SSE2 and MMX results, #NM with CR0.EM and Linux-style lazy switching (CR0.TS, then CLTS,
/// FXSAVE and FXRSTOR between two contexts), #MF with CR0.NE = 1, #UD without OSFXSR. Exits
/// with value 0x1B.
///
/// Only results QEMU's TCG computes exactly as the SDM says are printed (correctly rounded
/// arithmetic, exact transcendental cases such as sin 0 and cos 0); the rest of the x87 is
/// checked against the host CPU by the native oracle.
pub fn fpu() -> AsmResult<Vec<u8>> {
    fpu_kernel(false)
}

/// [`fpu`], then what the Intel SDM specifies and QEMU 8's TCG does not do (so this kernel runs
/// on bt86 only, against expected output): an unmasked SIMD exception is #XM with
/// CR4.OSXMMEXCPT = 1 and #UD without it (QEMU's TCG raises neither and completes the
/// instruction as if masked), and with CR0.NE = 0
/// an x87 error is reported through FERR# as IRQ 13, the handler releasing the CPU through port
/// 0xF0 (QEMU aborts on an internal assertion when its FERR# line fires from TCG code).
pub fn fpu_sdm() -> AsmResult<Vec<u8>> {
    fpu_kernel(true)
}

fn fpu_kernel(sdm: bool) -> AsmResult<Vec<u8>> {
    const EM: u32 = 1 << 2;
    const TS: u32 = 1 << 3;
    const NE: u32 = 1 << 5;
    const MP: u32 = 1 << 1;
    let mut k = Kit::new()?;
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let skip = k.data(&[0; 4]);
    let nm_count = k.data(&[0; 4]);
    let ferr_count = k.data(&[0; 4]);
    let owner = k.data(&[0; 4]);
    let current = k.data(&[0; 4]);
    let tmp = k.data(&[0; 16]);
    let result = k.data(&[0; 16]);
    let area = |k: &mut Kit| {
        let a = k.data(&[0; 512 + 16]);
        (a + 15) & !15
    };
    let ctx_a = area(&mut k);
    let ctx_b = area(&mut k);
    let f64c = |k: &mut Kit, v: f64| k.data(&v.to_le_bytes());
    let two = f64c(&mut k, 2.0);
    let one = f64c(&mut k, 1.0);
    let three = f64c(&mut k, 3.0);
    let two_half = f64c(&mut k, 2.5);
    let neg_two_half = f64c(&mut k, -2.5);
    let big = f64c(&mut k, 3e10);
    let int = |k: &mut Kit, v: i32| k.data(&v.to_le_bytes());
    let seven = int(&mut k, 7);
    let i_two = int(&mut k, 2);
    let i_1234 = int(&mut k, 1234);
    let cw_zm = int(&mut k, 0x037B);
    let cw_default = int(&mut k, 0x037F);
    let mx_zm = int(&mut k, 0x1D80);
    let mx_default = int(&mut k, 0x1F80);
    let vec_a = k.data(&[
        1, 2, 3, 4, 250, 251, 252, 253, 0x10, 0x80, 0xFF, 0x7F, 9, 8, 7, 6,
    ]);
    let vec_b = k.data(&[
        9, 8, 7, 6, 10, 20, 30, 40, 0x90, 0x90, 0x01, 0x01, 1, 2, 3, 4,
    ]);
    let ones = k.data(&[1.0f32, 2.0, 10.0, -7.0].map(f32::to_le_bytes).concat());
    let threes = k.data(&[3.0f32, 3.0, 3.0, 3.0].map(f32::to_le_bytes).concat());

    // Handlers.
    handler_address(&mut k, |k| {
        // #NM: CLTS (and clear EM); if another context owns the FPU, switch (Linux's lazy
        // FPU): FXSAVE the owner's, FXRSTOR the current one's.
        k.asm().push(eax)?;
        k.asm().push(ebx)?;
        k.asm().inc(dword_ptr(nm_count))?;
        k.asm().mov(eax, cr0)?;
        k.asm().and(eax, !(EM | TS))?;
        k.asm().mov(cr0, eax)?;
        let mut same = k.asm().create_label();
        k.asm().mov(eax, dword_ptr(owner))?;
        k.asm().mov(ebx, dword_ptr(current))?;
        k.asm().cmp(eax, ebx)?;
        k.asm().je(same)?;
        k.asm().fxsave(ptr(eax))?;
        k.asm().fxrstor(ptr(ebx))?;
        k.asm().mov(dword_ptr(owner), ebx)?;
        k.asm().set_label(&mut same)?;
        k.asm().pop(ebx)?;
        k.asm().pop(eax)?;
        Ok(k.asm().iretd()?)
    })?;
    set_gate(&mut k, idt, 7, 0x8E)?;
    handler_address(&mut k, |k| {
        // #MF: report the status word's exception bits, clear them, retry.
        k.asm().push(eax)?;
        k.asm().fnstsw(ax)?;
        k.asm().and(eax, 0x80BFu32)?;
        k.print("#MF fsw=")?;
        k.print_hex(eax)?;
        k.print("\n")?;
        k.asm().fnclex()?;
        k.asm().pop(eax)?;
        Ok(k.asm().iretd()?)
    })?;
    set_gate(&mut k, idt, 16, 0x8E)?;
    handler_address(&mut k, |k| {
        // #XM: report MXCSR, mask every exception, retry (now masked).
        k.asm().push(eax)?;
        k.asm().stmxcsr(dword_ptr(tmp))?;
        k.asm().mov(eax, dword_ptr(tmp))?;
        k.print("#XM mxcsr=")?;
        k.print_hex(eax)?;
        k.print("\n")?;
        k.asm().or(dword_ptr(tmp), 0x1F80u32)?;
        k.asm().ldmxcsr(dword_ptr(tmp))?;
        k.asm().pop(eax)?;
        Ok(k.asm().iretd()?)
    })?;
    set_gate(&mut k, idt, 19, 0x8E)?;
    handler_address(&mut k, |k| {
        // #UD: report it and step over the instruction (its length is in `skip`).
        k.print("#UD\n")?;
        k.asm().push(eax)?;
        k.asm().mov(eax, dword_ptr(skip))?;
        k.asm().add(dword_ptr(esp + 4), eax)?;
        k.asm().pop(eax)?;
        Ok(k.asm().iretd()?)
    })?;
    set_gate(&mut k, idt, 6, 0x8E)?;
    handler_address(&mut k, |k| {
        // IRQ 13 (FERR#): release the CPU through port 0xF0, clear the error, EOI both PICs.
        k.asm().push(eax)?;
        k.asm().out(0xF0, al)?;
        k.asm().fnclex()?;
        k.asm().inc(dword_ptr(ferr_count))?;
        k.asm().mov(al, 0x20u32)?;
        k.asm().out(0xA0, al)?;
        k.asm().out(0x20, al)?;
        k.asm().pop(eax)?;
        Ok(k.asm().iretd()?)
    })?;
    set_gate(&mut k, idt, 0x2D, 0x8E)?;
    k.asm().lidt(ptr(idtr))?;

    // CR0: NE and MP, no EM/TS; CR4: OSFXSR and OSXMMEXCPT.
    k.asm().mov(eax, cr0)?;
    k.asm().and(eax, !(EM | TS))?;
    k.asm().or(eax, NE | MP)?;
    k.asm().mov(cr0, eax)?;
    k.asm().mov(eax, cr4)?;
    k.asm().or(eax, 0x600u32)?;
    k.asm().mov(cr4, eax)?;
    k.asm().fninit()?;
    k.asm().ldmxcsr(dword_ptr(mx_default))?;

    let show64 = |k: &mut Kit, label: &str| -> AsmResult {
        k.asm().mov(eax, dword_ptr(result + 4))?;
        k.print(&format!("{label}="))?;
        k.print_hex(eax)?;
        k.asm().mov(eax, dword_ptr(result))?;
        k.print_hex(eax)?;
        k.print("\n")
    };
    let show128 = |k: &mut Kit, label: &str| -> AsmResult {
        k.print(&format!("{label}="))?;
        for i in (0..4).rev() {
            k.asm().mov(eax, dword_ptr(result + 4 * i))?;
            k.print_hex(eax)?;
        }
        k.print("\n")
    };

    // x87 results.
    k.asm().fld(qword_ptr(two))?;
    k.asm().fsqrt()?;
    k.asm().fstp(qword_ptr(result))?;
    show64(&mut k, "fsqrt(2)")?;
    k.asm().fild(dword_ptr(seven))?;
    k.asm().fld(qword_ptr(three))?;
    k.asm().fdivp(st1, st0)?;
    k.asm().fstp(qword_ptr(result))?;
    show64(&mut k, "7/3")?;
    k.asm().fld(qword_ptr(three))?;
    k.asm().fld1()?;
    k.asm().fscale()?;
    k.asm().fistp(dword_ptr(result))?;
    k.asm().fstp(st0)?;
    k.asm().mov(eax, dword_ptr(result))?;
    k.print_field("fscale(1,3)", eax)?;
    k.asm().fld(qword_ptr(two_half))?;
    k.asm().frndint()?;
    k.asm().fistp(dword_ptr(result))?;
    k.asm().mov(eax, dword_ptr(result))?;
    k.print_field("frndint(2.5)", eax)?;
    k.asm().fild(dword_ptr(i_1234))?;
    k.asm().fbstp(tword_ptr(result))?;
    k.asm().mov(eax, dword_ptr(result))?;
    k.print_field("fbstp(1234)", eax)?;
    k.asm().fldz()?;
    k.asm().fsin()?;
    k.asm().fstp(dword_ptr(result))?;
    k.asm().fldz()?;
    k.asm().fcos()?;
    k.asm().fstp(dword_ptr(result + 4))?;
    show64(&mut k, "cos0:sin0")?;
    k.asm().fld(qword_ptr(big))?;
    k.asm().fistp(dword_ptr(result))?;
    k.asm().fnstsw(ax)?;
    k.asm().and(eax, 0x3Fu32)?;
    k.print_field("fistp(3e10).fsw", eax)?;
    k.asm().mov(eax, dword_ptr(result))?;
    k.print_field("fistp(3e10)", eax)?;
    k.asm().fnclex()?;
    k.asm().fld1()?;
    k.asm().fldz()?;
    k.asm().fcomi(st0, st1)?;
    k.asm().pushfd()?;
    k.asm().pop(eax)?;
    k.asm().and(eax, 0x8D5u32)?;
    k.print_field("fcomi(0,1).flags", eax)?;
    k.asm().fcompp()?;

    // SSE2 and MMX results.
    k.asm().movsd_2(xmm0, qword_ptr(two))?;
    k.asm().sqrtsd(xmm0, xmm0)?;
    k.asm().movsd_2(qword_ptr(result), xmm0)?;
    show64(&mut k, "sqrtsd(2)")?;
    k.asm().cvttsd2si(eax, qword_ptr(neg_two_half))?;
    k.print_field("cvttsd2si(-2.5)", eax)?;
    k.asm().cvtsd2si(eax, qword_ptr(two_half))?;
    k.print_field("cvtsd2si(2.5)", eax)?;
    k.asm().movups(xmm5, xmmword_ptr(ones))?;
    k.asm().movups(xmm6, xmmword_ptr(threes))?;
    k.asm().divps(xmm5, xmm6)?;
    k.asm().movups(xmmword_ptr(result), xmm5)?;
    show128(&mut k, "divps")?;
    k.asm().movdqu(xmm2, xmmword_ptr(vec_a))?;
    k.asm().movdqu(xmm3, xmmword_ptr(vec_b))?;
    k.asm().movdqa(xmm4, xmm2)?;
    k.asm().paddusb(xmm4, xmm3)?;
    k.asm().movdqu(xmmword_ptr(result), xmm4)?;
    show128(&mut k, "paddusb")?;
    k.asm().movdqa(xmm4, xmm2)?;
    k.asm().pmullw(xmm4, xmm3)?;
    k.asm().pshufd(xmm4, xmm4, 0x1B)?;
    k.asm().movdqu(xmmword_ptr(result), xmm4)?;
    show128(&mut k, "pmullw+pshufd")?;
    k.asm().movdqa(xmm4, xmm2)?;
    k.asm().psadbw(xmm4, xmm3)?;
    k.asm().movdqu(xmmword_ptr(result), xmm4)?;
    show128(&mut k, "psadbw")?;
    k.asm().movdqa(xmm4, xmm2)?;
    k.asm().packsswb(xmm4, xmm3)?;
    k.asm().pmovmskb(eax, xmm4)?;
    k.print_field("packsswb.pmovmskb", eax)?;
    k.asm().movq(mm0, qword_ptr(vec_a))?;
    k.asm().paddsb(mm0, qword_ptr(vec_b))?;
    k.asm().movd(eax, mm0)?;
    k.print_field("paddsb(mm)", eax)?;
    k.asm().emms()?;

    // #NM with EM, #UD for MMX with EM.
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, EM)?;
    k.asm().mov(cr0, eax)?;
    k.asm().fld1()?; // #NM; the handler clears EM and FLD1 runs again
    k.asm().fstp(st0)?;
    k.asm().mov(eax, dword_ptr(nm_count))?;
    k.print_field("#NM with EM, count", eax)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, EM)?;
    k.asm().mov(cr0, eax)?;
    k.asm().mov(dword_ptr(skip), 3u32)?;
    k.print("mmx with EM: ")?;
    k.asm().paddb(mm0, mm1)?; // 0F FC C1
    k.asm().mov(eax, cr0)?;
    k.asm().and(eax, !EM)?;
    k.asm().mov(cr0, eax)?;

    // #MF with NE = 1, at the FWAIT after the faulting division.
    k.asm().fldcw(word_ptr(cw_zm))?;
    k.asm().fld1()?;
    k.asm().fldz()?;
    k.asm().fdivp(st1, st0)?;
    k.print("1/0 done, fwait: ")?;
    k.asm().wait()?;
    k.print("after fwait\n")?;
    k.asm().fldcw(word_ptr(cw_default))?;
    k.asm().fstp(st0)?;

    // #UD without OSFXSR.
    k.asm().xorpd(xmm1, xmm1)?;
    k.asm().mov(eax, cr4)?;
    k.asm().and(eax, !0x200u32)?;
    k.asm().mov(cr4, eax)?;
    k.asm().mov(dword_ptr(skip), 3u32)?;
    k.print("addps without OSFXSR: ")?;
    k.asm().addps(xmm0, xmm1)?; // 0F 58 C1
    k.asm().mov(eax, cr4)?;
    k.asm().or(eax, 0x600u32)?;
    k.asm().mov(cr4, eax)?;
    k.asm().ldmxcsr(dword_ptr(mx_default))?;

    // Lazy switching between two contexts, each starting with 0.0 on its stack.
    k.asm().fninit()?;
    k.asm().fldz()?;
    k.asm().fxsave(ptr(ctx_a))?;
    k.asm().fxsave(ptr(ctx_b))?;
    k.asm().mov(dword_ptr(owner), ctx_a)?;
    k.asm().mov(dword_ptr(nm_count), 0u32)?;
    let switch_to = |k: &mut Kit, ctx: u32| -> AsmResult {
        k.asm().mov(dword_ptr(current), ctx)?;
        k.asm().mov(eax, cr0)?;
        k.asm().or(eax, TS)?;
        Ok(k.asm().mov(cr0, eax)?)
    };
    for _ in 0..3 {
        switch_to(&mut k, ctx_b)?;
        k.asm().fiadd(dword_ptr(seven))?;
        switch_to(&mut k, ctx_a)?;
        k.asm().fiadd(dword_ptr(i_two))?;
    }
    k.asm().fist(dword_ptr(result))?;
    k.asm().mov(eax, dword_ptr(result))?;
    k.print_field("lazy context a", eax)?;
    switch_to(&mut k, ctx_b)?;
    k.asm().fist(dword_ptr(result))?;
    k.asm().mov(eax, dword_ptr(result))?;
    k.print_field("lazy context b", eax)?;
    k.asm().mov(eax, dword_ptr(nm_count))?;
    k.print_field("lazy #NM count", eax)?;
    if !sdm {
        k.print("done\n")?;
        k.exit(0x1B)?;
        return k.build();
    }

    // #XM with OSXMMEXCPT (the handler masks the exception and the division runs again).
    k.asm().ldmxcsr(dword_ptr(mx_zm))?;
    k.asm().movsd_2(xmm0, qword_ptr(one))?;
    k.asm().xorpd(xmm1, xmm1)?;
    k.asm().divsd(xmm0, xmm1)?;
    k.asm().movsd_2(qword_ptr(result), xmm0)?;
    show64(&mut k, "1/0 after #XM")?;
    k.asm().ldmxcsr(dword_ptr(mx_default))?;

    // An unmasked SIMD exception without OSXMMEXCPT: #UD, with the flag set in MXCSR.
    k.asm().mov(eax, cr4)?;
    k.asm().and(eax, !0x400u32)?;
    k.asm().mov(cr4, eax)?;
    k.asm().ldmxcsr(dword_ptr(mx_zm))?;
    k.asm().mov(dword_ptr(skip), 4u32)?;
    k.asm().movsd_2(xmm0, qword_ptr(one))?;
    k.print("unmasked without OSXMMEXCPT: ")?;
    k.asm().divsd(xmm0, xmm1)?; // F2 0F 5E C1
    k.asm().stmxcsr(dword_ptr(tmp))?;
    k.asm().mov(eax, dword_ptr(tmp))?;
    k.print_field("mxcsr", eax)?;
    k.asm().mov(eax, cr4)?;
    k.asm().or(eax, 0x600u32)?;
    k.asm().mov(cr4, eax)?;
    k.asm().ldmxcsr(dword_ptr(mx_default))?;

    // FERR# with NE = 0: IRQ 13 through the PICs (remapped to 0x20/0x28, only IRQ 13 open).
    init_pics(k.asm(), (0x20, 0x28), (0xFB, 0xDF))?;
    k.asm().mov(eax, cr0)?;
    k.asm().and(eax, !NE)?;
    k.asm().mov(cr0, eax)?;
    k.asm().fninit()?;
    k.asm().fldcw(word_ptr(cw_zm))?;
    k.asm().fld1()?;
    k.asm().fldz()?;
    k.asm().fdivp(st1, st0)?;
    k.asm().sti()?;
    k.asm().wait()?;
    let mut wait = k.asm().create_label();
    let mut taken = k.asm().create_label();
    k.asm().set_label(&mut wait)?;
    k.asm().cmp(dword_ptr(ferr_count), 0u32)?;
    k.asm().jne(taken)?;
    k.asm().hlt()?;
    k.asm().jmp(wait)?;
    k.asm().set_label(&mut taken)?;
    k.asm().cli()?;
    k.asm().mov(eax, dword_ptr(ferr_count))?;
    k.print_field("ferr irq13 count", eax)?;
    k.asm().fnstsw(ax)?;
    k.asm().and(eax, 0x80BFu32)?;
    k.print_field("fsw after irq13", eax)?;
    k.print("done\n")?;
    k.exit(0x1C)?;
    k.build()
}
