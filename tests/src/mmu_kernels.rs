//! Kit kernels aimed at the shadow MMU: non-identity and large-page mappings, code reached
//! through changing mappings, live page-table edits relying on INVLPG, copy-on-write done by the
//! guest's own #PF handler, CR0.WP, accessed/dirty bits, many address spaces (more than the bt
//! engine keeps windows for), PAE, and a ring-3 process meeting supervisor and read-only pages.
//! They are ordinary guests: QEMU runs them the same way, and the tests compare.

use iced_x86::code_asm::*;

use crate::kernels::{RING_GDT, handler_address, load_tables, set_gate};
use crate::kit::{AsmResult, Kit};

/// Physical layout shared by the kernels (all above the kit's own 1-2 MiB).
mod phys {
    pub const PD: u32 = 0x80_0000;
    pub const PT0: u32 = 0x80_1000;
    pub const PT_HI: u32 = 0x80_2000;
    /// Frames the mappings point at.
    pub const FRAMES: u32 = 0x90_0000;
    /// Where the #PF handler's copy-on-write takes new frames from.
    pub const COW_POOL: u32 = 0xA0_0000;
    pub const fn frame(i: u32) -> u32 {
        FRAMES + i * 0x1000
    }
}

/// Linear base of the non-identity mappings (PD entry 0x300).
const HI: u32 = 0xC000_0000;

/// The pages a #PF handler treats as copy-on-write.
struct Cow {
    /// Linear range.
    range: (u32, u32),
    /// Address of the page-table entry of the range's first page.
    table: u32,
    /// Flags of the entry made writable for the copy.
    pte_flags: u32,
}

/// Emits a #PF handler and installs it at vector 14 of `idt`. A write to a present page in
/// `cow` is copy-on-write: a fresh frame from the pool at `next_frame`, a copy of the old one,
/// the entry made writable, INVLPG, and the write retried. Any other fault skips the
/// faulting instruction by the byte count in `skip`. Each fault prints CR2 and the error code
/// and counts in `count`. EAX, EDX are clobbered while installing.
fn install_pf_handler(
    k: &mut Kit,
    idt: u32,
    skip: u32,
    count: u32,
    next_frame: u32,
    cow: Cow,
) -> AsmResult {
    let Cow {
        range: (cow_start, cow_end),
        table: cow_table,
        pte_flags,
    } = cow;
    handler_address(k, |k| {
        let mut skip_path = k.asm().create_label();
        k.asm().pushad()?;
        k.asm().inc(dword_ptr(count))?;
        k.print("pf cr2=")?;
        k.asm().mov(eax, cr2)?;
        k.print_hex(eax)?;
        k.print(" error=")?;
        k.asm().mov(ebx, dword_ptr(esp + 32))?;
        k.print_hex(ebx)?;
        k.print("\n")?;
        k.asm().and(ebx, 3u32)?;
        k.asm().cmp(ebx, 3u32)?;
        k.asm().jne(skip_path)?;
        k.asm().cmp(eax, cow_start)?;
        k.asm().jb(skip_path)?;
        k.asm().cmp(eax, cow_end)?;
        k.asm().jae(skip_path)?;
        // The entry: table + 4 * ((cr2 - start) >> 12).
        k.asm().sub(eax, cow_start)?;
        k.asm().shr(eax, 12u32)?;
        k.asm().lea(edi, dword_ptr(eax * 4 + cow_table))?;
        k.asm().mov(esi, dword_ptr(edi))?;
        k.asm().and(esi, 0xFFFF_F000u32)?;
        k.asm().mov(eax, dword_ptr(next_frame))?;
        k.asm().add(dword_ptr(next_frame), 0x1000u32)?;
        k.asm().push(edi)?;
        k.asm().mov(edi, eax)?;
        k.asm().mov(ecx, 1024u32)?;
        k.asm().cld()?;
        k.asm().rep().movsd()?;
        k.asm().pop(edi)?;
        k.asm().or(eax, pte_flags)?;
        k.asm().mov(dword_ptr(edi), eax)?;
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
        Ok(k.asm().iretd()?)
    })?;
    set_gate(k, idt, 14, 0x8E)
}

/// Emits `mov dword [addr], value`.
fn put(k: &mut Kit, addr: u32, value: u32) -> AsmResult {
    Ok(k.asm().mov(dword_ptr(addr), value)?)
}

/// Emits code printing `label=` and the dword at `addr` masked with `mask`.
fn print_masked(k: &mut Kit, label: &str, addr: u32, mask: u32) -> AsmResult {
    k.asm().mov(eax, dword_ptr(addr))?;
    k.asm().and(eax, mask)?;
    k.print_field(label, eax)
}

/// Supervisor-mode paging against the shadow MMU: non-identity mappings, code called through a
/// mapping that changes (and through two aliases of one frame, one of them rewritten), a page
/// table edited 300 times with INVLPG after each edit, a 4 MiB page re-pointed, CR0.WP=0 and
/// =1 writes to a read-only page, copy-on-write by the #PF handler, and accessed/dirty bits.
/// Exits with value 0x19.
pub fn shadow_maps() -> AsmResult<Vec<u8>> {
    use phys::*;
    let mut k = Kit::new()?;
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let skip = k.data(&[0; 4]);
    let count = k.data(&[0; 4]);
    let next_frame = k.data(&COW_POOL.to_le_bytes());
    install_pf_handler(
        &mut k,
        idt,
        skip,
        count,
        next_frame,
        Cow {
            range: (HI + 0x30_0000, HI + 0x34_0000),
            table: PT_HI + 4 * 0x300,
            pte_flags: 3,
        },
    )?;
    k.asm().lidt(ptr(idtr))?;

    // Tables: PT0 identity 0..4 MiB (4 KiB pages), 4 MiB pages for 4..16 MiB, PT_HI at HI.
    k.asm().cld()?;
    k.asm().mov(edi, PD)?;
    k.asm().xor(eax, eax)?;
    k.asm().mov(ecx, 3 * 1024u32)?;
    k.asm().rep().stosd()?;
    k.asm().mov(edi, PT0)?;
    k.asm().mov(eax, 3u32)?;
    k.asm().mov(ecx, 1024u32)?;
    let mut fill = k.asm().create_label();
    k.asm().set_label(&mut fill)?;
    k.asm().stosd()?;
    k.asm().add(eax, 0x1000u32)?;
    k.asm().loop_(fill)?;
    put(&mut k, PD, PT0 | 3)?;
    for i in 1..4 {
        put(&mut k, PD + 4 * i, (i << 22) | 0x83)?;
    }
    put(&mut k, PD + 4 * 0x300, PT_HI | 3)?;
    put(&mut k, PD + 4 * 0x20, 0x0100_0000 | 0x83)?; // 0x0800_0000 -> 16 MiB, 4 MiB page
    // A: PT_HI[i] -> frame(7 - i), each frame's first dword 0xF000 + its number.
    for i in 0..8 {
        put(&mut k, PT_HI + 4 * i, frame(7 - i) | 3)?;
        put(&mut k, frame(i), 0xF000 + i)?;
    }
    // B: two functions `mov eax, imm32; ret` in frames 20 and 21.
    for (f, v) in [(20u32, 0xA0A0u32), (21, 0xB0B0)] {
        put(&mut k, frame(f), 0xB8 | (v << 8))?;
        put(&mut k, frame(f) + 4, 0xC300)?; // imm32 high byte 0, then `ret`
    }
    put(&mut k, PT_HI + 4 * 0x100, frame(20) | 3)?;
    put(&mut k, PT_HI + 4 * 0x101, frame(20) | 3)?;
    put(&mut k, frame(30), 1)?;
    put(&mut k, frame(31), 0x100)?;
    put(&mut k, frame(40), 0x1111)?;
    put(&mut k, PT_HI + 4 * 0x3F0, frame(40) | 1)?; // read-only
    put(&mut k, frame(50), 0x5050)?;
    for i in 0..4 {
        put(&mut k, PT_HI + 4 * (0x300 + i), frame(50) | 1)?; // shared, read-only
    }

    k.asm().mov(eax, cr4)?;
    k.asm().or(eax, 0x10u32)?; // PSE
    k.asm().mov(cr4, eax)?;
    k.asm().mov(eax, PD)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 0x8001_0000u32)?; // PG | WP
    k.asm().mov(cr0, eax)?;
    k.print("paging on\n")?;

    // A: reads through the reversed mapping, a checksum of value * (i + 1).
    k.asm().xor(edx, edx)?;
    for i in 0..8 {
        k.asm().mov(eax, dword_ptr(HI + 0x1000 * i))?;
        k.asm().imul_3(eax, eax, (i + 1) as i32)?;
        k.asm().add(edx, eax)?;
    }
    k.print_field("reversed-checksum", edx)?;
    k.asm().mov(dword_ptr(HI + 0x3008), 0x3333u32)?;
    print_masked(
        &mut k,
        "write-through-hi-read-identity",
        frame(4) + 8,
        u32::MAX,
    )?;

    // B: the same linear address, different code after the PTE changes.
    k.asm().mov(esi, HI + 0x10_0000)?;
    k.asm().call(esi)?;
    k.print_field("code-frame-20", eax)?;
    put(&mut k, PT_HI + 4 * 0x100, frame(21) | 3)?;
    k.asm().invlpg(ptr(esi))?;
    k.asm().call(esi)?;
    k.print_field("code-frame-21", eax)?;
    k.asm().mov(edi, HI + 0x10_1000)?;
    k.asm().call(edi)?;
    k.print_field("code-alias-of-20", eax)?;
    // Rewrite frame 20's immediate through the identity map; call it through its alias.
    k.asm().mov(dword_ptr(frame(20) + 1), 0xC0C0u32)?;
    k.asm().call(edi)?;
    k.print_field("code-alias-after-rewrite", eax)?;
    put(&mut k, PT_HI + 4 * 0x100, frame(20) | 3)?;
    k.asm().invlpg(ptr(esi))?;
    k.asm().call(esi)?;
    k.print_field("code-frame-20-again", eax)?;

    // C: a page table edited 300 times, INVLPG after each edit.
    k.asm().xor(edx, edx)?;
    k.asm().mov(ecx, 300u32)?;
    let mut again = k.asm().create_label();
    k.asm().set_label(&mut again)?;
    k.asm().mov(eax, ecx)?;
    k.asm().and(eax, 1u32)?;
    k.asm().shl(eax, 12u32)?;
    k.asm().add(eax, frame(30) | 3)?;
    k.asm().mov(dword_ptr(PT_HI + 4 * 0x200), eax)?;
    k.asm().invlpg(byte_ptr(HI + 0x20_0000))?;
    k.asm().add(edx, dword_ptr(HI + 0x20_0000))?;
    k.asm().inc(dword_ptr(HI + 0x20_0004))?;
    k.asm().loop_(again)?;
    k.print_field("edited-sum", edx)?;
    print_masked(&mut k, "frame30-writes", frame(30) + 4, u32::MAX)?;
    print_masked(&mut k, "frame31-writes", frame(31) + 4, u32::MAX)?;

    // D: a 4 MiB page, read through a 4 KiB alias, re-pointed and back.
    k.asm().mov(dword_ptr(0x0800_1234u32), 0x4444_5555u32)?;
    put(&mut k, PT_HI + 4 * 0x180, 0x0100_1000 | 3)?;
    print_masked(&mut k, "4m-through-4k-alias", HI + 0x18_0234, u32::MAX)?;
    put(&mut k, PD + 4 * 0x20, 0x0140_0000 | 0x83)?;
    k.asm().invlpg(byte_ptr(0x0800_1234u32))?;
    print_masked(&mut k, "4m-repointed", 0x0800_1234, u32::MAX)?;
    k.asm().mov(dword_ptr(0x0800_1234u32), 0x6666u32)?;
    put(&mut k, PD + 4 * 0x20, 0x0100_0000 | 0x83)?;
    k.asm().invlpg(byte_ptr(0x0800_1234u32))?;
    print_masked(&mut k, "4m-back", 0x0800_1234, u32::MAX)?;
    print_masked(&mut k, "pde-4m.ad", PD + 4 * 0x20, 0x60)?;

    // E: CR0.WP=0 lets the kernel write a read-only page; WP=1 faults (skipped).
    k.asm().mov(eax, cr0)?;
    k.asm().and(eax, !0x1_0000u32)?;
    k.asm().mov(cr0, eax)?;
    k.asm().mov(eax, 0x2222u32)?;
    k.asm().mov(dword_ptr(HI + 0x3F_0000), eax)?;
    print_masked(&mut k, "wp0-write", frame(40), u32::MAX)?;
    print_masked(&mut k, "wp0-pte.ad", PT_HI + 4 * 0x3F0, 0x63)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 0x1_0000u32)?;
    k.asm().mov(cr0, eax)?;
    k.asm().mov(dword_ptr(skip), 5u32)?;
    k.asm().mov(eax, 0x3333u32)?;
    k.asm().mov(dword_ptr(HI + 0x3F_0000), eax)?; // A3 moffs: 5 bytes
    print_masked(&mut k, "wp1-after-fault", frame(40), u32::MAX)?;

    // F: copy-on-write of four pages sharing frame 50.
    k.asm().xor(edx, edx)?;
    for i in 0..4u32 {
        k.asm().add(edx, dword_ptr(HI + 0x30_0000 + 0x1000 * i))?;
        k.asm().mov(dword_ptr(HI + 0x30_0004 + 0x1000 * i), i + 1)?;
    }
    for i in 0..4u32 {
        k.asm().add(edx, dword_ptr(HI + 0x30_0000 + 0x1000 * i))?;
        k.asm().add(edx, dword_ptr(HI + 0x30_0004 + 0x1000 * i))?;
    }
    k.print_field("cow-sum", edx)?;
    print_masked(&mut k, "shared-frame-untouched", frame(50) + 4, u32::MAX)?;
    print_masked(&mut k, "cow-pte", PT_HI + 4 * 0x302, 0xFFF)?;
    print_masked(&mut k, "cow-frame", PT_HI + 4 * 0x302, 0xFFFF_F000)?;

    // G: accessed and dirty bits.
    print_masked(&mut k, "read-pte.ad", PT_HI, 0x60)?;
    print_masked(&mut k, "written-pte.ad", PT_HI + 12, 0x60)?;
    print_masked(&mut k, "untouched-pte.ad", PT_HI + 16 * 4, 0x60)?;
    print_masked(&mut k, "code-pte.ad", PT_HI + 4 * 0x101, 0x60)?;
    print_masked(&mut k, "pde-hi.ad", PD + 4 * 0x300, 0x60)?;
    print_masked(&mut k, "pf-count", count, u32::MAX)?;
    k.exit(0x19)?;
    k.build()
}

/// Physical layout of [`shadow_spaces`].
mod spaces {
    /// Address spaces in the 2-level phase (more than the bt engine's default window budget).
    pub const N: u32 = 24;
    pub const PDS: u32 = 0x80_0000;
    pub const PT_K: u32 = 0x82_0000;
    pub const PTS: u32 = 0x83_0000;
    pub const FRAMES: u32 = 0x86_0000;
    /// PAE phase: four PDPTs, a shared identity directory, a directory and a table per space.
    pub const PDPTS: u32 = 0x88_0000;
    pub const PAE_PD0: u32 = 0x88_1000;
    pub const PAE_PD3: u32 = 0x88_2000;
    pub const PAE_PT: u32 = 0x88_8000;
    pub const BIG: u32 = 0x0200_0000;
}

/// CR3 switches among 24 address spaces (global kernel pages with CR4.PGE) that share some
/// frames, then PAE: four address spaces with 4 KiB and 2 MiB pages, a PDPT entry changed and
/// reloaded with CR3, and a not-present fault. Exits with value 0x1A.
pub fn shadow_spaces() -> AsmResult<Vec<u8>> {
    use spaces::*;
    let mut k = Kit::new()?;
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let skip = k.data(&[0; 4]);
    let count = k.data(&[0; 4]);
    let next_frame = k.data(&phys::COW_POOL.to_le_bytes());
    let no_cow = Cow {
        range: (0, 0),
        table: 0,
        pte_flags: 3,
    };
    install_pf_handler(&mut k, idt, skip, count, next_frame, no_cow)?;
    k.asm().lidt(ptr(idtr))?;

    k.asm().cld()?;
    k.asm().mov(edi, PDS)?;
    k.asm().xor(eax, eax)?;
    k.asm().mov(ecx, (FRAMES + N * 0x1000 - PDS) / 4)?;
    k.asm().rep().stosd()?;
    // The kernel's identity table, global pages.
    k.asm().mov(edi, PT_K)?;
    k.asm().mov(eax, 0x103u32)?;
    k.asm().mov(ecx, 1024u32)?;
    let mut fill = k.asm().create_label();
    k.asm().set_label(&mut fill)?;
    k.asm().stosd()?;
    k.asm().add(eax, 0x1000u32)?;
    k.asm().loop_(fill)?;
    // Space i: PD i -> kernel table, 4 MiB identity pages to 16 MiB, and at 0xC000_0000 its own
    // table mapping its frame and the next space's frame.
    k.asm().xor(ebx, ebx)?;
    let mut each = k.asm().create_label();
    k.asm().set_label(&mut each)?;
    k.asm().mov(edi, ebx)?;
    k.asm().shl(edi, 12u32)?;
    k.asm().lea(esi, dword_ptr(edi + PTS))?;
    k.asm().add(edi, PDS)?;
    k.asm().mov(dword_ptr(edi), PT_K | 3)?;
    for i in 1..4u32 {
        k.asm().mov(dword_ptr(edi + 4 * i), (i << 22) | 0x183)?;
    }
    k.asm().lea(eax, dword_ptr(esi + 3))?;
    k.asm().mov(dword_ptr(edi + 4 * 0x300), eax)?;
    k.asm().mov(eax, ebx)?;
    k.asm().shl(eax, 12u32)?;
    k.asm().lea(edx, dword_ptr(eax + FRAMES))?;
    k.asm().lea(eax, dword_ptr(ebx + 1))?;
    k.asm().mov(dword_ptr(edx), eax)?; // frame i holds i + 1
    k.asm().or(edx, 3u32)?;
    k.asm().mov(dword_ptr(esi), edx)?;
    // The next space's frame (wrapping) at 0xC000_1000.
    k.asm().lea(eax, dword_ptr(ebx + 1))?;
    k.asm().cmp(eax, N)?;
    let mut no_wrap = k.asm().create_label();
    k.asm().jne(no_wrap)?;
    k.asm().xor(eax, eax)?;
    k.asm().set_label(&mut no_wrap)?;
    k.asm().shl(eax, 12u32)?;
    k.asm().add(eax, FRAMES | 3)?;
    k.asm().mov(dword_ptr(esi + 4), eax)?;
    k.asm().inc(ebx)?;
    k.asm().cmp(ebx, N)?;
    k.asm().jne(each)?;

    k.asm().mov(eax, cr4)?;
    k.asm().or(eax, 0x90u32)?; // PSE | PGE
    k.asm().mov(cr4, eax)?;
    k.asm().mov(eax, PDS)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 0x8001_0000u32)?;
    k.asm().mov(cr0, eax)?;
    k.print("paging on\n")?;

    // Three rounds over every space: read its frame, bump the next space's counter.
    k.asm().xor(edx, edx)?;
    k.asm().mov(ebp, 3u32)?;
    let mut round = k.asm().create_label();
    k.asm().set_label(&mut round)?;
    k.asm().xor(ebx, ebx)?;
    let mut space = k.asm().create_label();
    k.asm().set_label(&mut space)?;
    k.asm().mov(eax, ebx)?;
    k.asm().shl(eax, 12u32)?;
    k.asm().add(eax, PDS)?;
    k.asm().mov(cr3, eax)?;
    k.asm().add(edx, dword_ptr(0xC000_0000u32))?;
    k.asm().inc(dword_ptr(0xC000_1004u32))?;
    k.asm().inc(ebx)?;
    k.asm().cmp(ebx, N)?;
    k.asm().jne(space)?;
    k.asm().dec(ebp)?;
    k.asm().jnz(round)?;
    k.print_field("spaces-sum", edx)?;
    k.asm().xor(edx, edx)?;
    for i in 0..N {
        k.asm().add(edx, dword_ptr(FRAMES + 0x1000 * i + 4))?;
    }
    k.print_field("counters-total", edx)?;
    // CR4.PGE off and on again: how kernels flush global translations.
    k.asm().mov(eax, cr4)?;
    k.asm().and(eax, !0x80u32)?;
    k.asm().mov(cr4, eax)?;
    k.asm().or(eax, 0x80u32)?;
    k.asm().mov(cr4, eax)?;
    print_masked(&mut k, "after-pge-toggle", 0xC000_0000, u32::MAX)?;
    print_masked(&mut k, "frame0-counter", FRAMES + 4, u32::MAX)?;
    print_masked(&mut k, "global-kernel-pte.ad", PT_K + 4 * 0x100, 0x160)?;
    print_masked(&mut k, "space5-pte1.ad", PTS + 5 * 0x1000 + 4, 0x60)?;

    // PAE: paging off, four spaces, paging on.
    k.asm().mov(eax, cr0)?;
    k.asm().and(eax, 0x7FFF_FFFFu32)?;
    k.asm().mov(cr0, eax)?;
    k.asm().mov(edi, PDPTS)?;
    k.asm().xor(eax, eax)?;
    k.asm().mov(ecx, (PAE_PT + 4 * 0x1000 - PDPTS) / 4)?;
    k.asm().rep().stosd()?;
    for i in 0..8u32 {
        put(&mut k, PAE_PD0 + 8 * i, (i << 21) | 0x83)?; // identity 0..16 MiB, 2 MiB pages
    }
    for j in 0..4u32 {
        let pdpt = PDPTS + 0x20 * j;
        put(&mut k, pdpt, PAE_PD0 | 1)?;
        put(&mut k, pdpt + 24, (PAE_PD3 + 0x1000 * j) | 1)?;
        put(&mut k, PAE_PD3 + 0x1000 * j, (PAE_PT + 0x1000 * j) | 3)?;
        put(
            &mut k,
            PAE_PD3 + 0x1000 * j + 8,
            (BIG + 0x20_0000 * j) | 0x83,
        )?;
        put(&mut k, PAE_PT + 0x1000 * j, (FRAMES + 0x1000 * j) | 3)?;
    }
    k.asm().mov(eax, cr4)?;
    k.asm().or(eax, 0x20u32)?;
    k.asm().mov(cr4, eax)?;
    k.asm().mov(eax, PDPTS)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 0x8000_0000u32)?;
    k.asm().mov(cr0, eax)?;
    k.print("pae on\n")?;
    k.asm().xor(edx, edx)?;
    for round in 0..2u32 {
        for j in 0..4u32 {
            k.asm().mov(eax, PDPTS + 0x20 * j)?;
            k.asm().mov(cr3, eax)?;
            k.asm().add(edx, dword_ptr(0xC000_0000u32))?;
            if round == 0 {
                k.asm().mov(dword_ptr(0xC020_0008u32), 0x100 * (j + 1))?;
            } else {
                k.asm().add(edx, dword_ptr(0xC020_0008u32))?;
            }
        }
    }
    k.print_field("pae-sum", edx)?;
    print_masked(&mut k, "pae-2m.ad", PAE_PD3 + 0x1000 * 2 + 8, 0x60)?;
    print_masked(&mut k, "pae-4k.ad", PAE_PT + 0x1000 * 3, 0x60)?;
    // A PDPT entry changed takes effect when CR3 is loaded again.
    put(&mut k, PDPTS + 24, (PAE_PD3 + 0x1000) | 1)?;
    k.asm().mov(eax, PDPTS)?;
    k.asm().mov(cr3, eax)?;
    print_masked(&mut k, "pdpte-reloaded", 0xC000_0000, u32::MAX)?;
    // Not present in PAE (the directory entry for 0xC040_0000 is empty): skipped.
    k.asm().mov(dword_ptr(skip), 5u32)?;
    k.asm().mov(eax, dword_ptr(0xC040_0000u32))?;
    print_masked(&mut k, "pf-count", count, u32::MAX)?;
    k.exit(0x1A)?;
    k.build()
}

/// Physical layout of [`shadow_user`].
mod user {
    pub const PD: u32 = 0x80_0000;
    pub const PT_U: u32 = 0x80_2000;
    pub const F0: u32 = 0x90_0000;
    pub const SHARED: u32 = 0x90_8000;
    /// Linear base of the process's test pages.
    pub const U: u32 = 0x4000_0000;
}

/// A ring-3 process against the shadow MMU's user view: user read-write, user read-only and
/// supervisor pages, a supervisor 4 MiB page, copy-on-write of user pages by the #PF handler, a
/// system call whose kernel writes a read-only user page with CR0.WP=0, and the accessed/dirty
/// bits the process left. Exits with value 0x1B.
pub fn shadow_user() -> AsmResult<Vec<u8>> {
    use user::*;
    let mut k = Kit::new()?;
    let (gdt, gdtr) = k.descriptor_table(&RING_GDT.map(u64::to_le_bytes).concat());
    let mut tss = vec![0u8; 104];
    let kernel_stack = k.data(&[0u8; 4096]) + 4096;
    tss[4..8].copy_from_slice(&kernel_stack.to_le_bytes());
    tss[8..10].copy_from_slice(&0x10u16.to_le_bytes());
    tss[0x66..0x68].copy_from_slice(&104u16.to_le_bytes());
    // The I/O bitmap lets ring 3 reach COM1 (ports 0x3F8-0x3FF) for the kit's printing.
    let mut bitmap = vec![0xFFu8; 8192 + 1];
    bitmap[0x3F8 / 8] = 0;
    tss.extend_from_slice(&bitmap);
    let tss_limit = (tss.len() - 1) as u32;
    let tss = k.data(&tss);
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let skip = k.data(&[0; 4]);
    let count = k.data(&[0; 4]);
    let next_frame = k.data(&phys::COW_POOL.to_le_bytes());
    let user_stack = k.data(&[0u8; 4096]) + 4096;
    install_pf_handler(
        &mut k,
        idt,
        skip,
        count,
        next_frame,
        Cow {
            range: (U + 0x3000, U + 0x7000),
            table: PT_U + 4 * 3,
            pte_flags: 7,
        },
    )?;
    // INT 0x80: the kernel writes a read-only user page with WP=0, then restores WP.
    handler_address(&mut k, |k| {
        k.asm().mov(eax, cr0)?;
        k.asm().and(eax, !0x1_0000u32)?;
        k.asm().mov(cr0, eax)?;
        k.asm().mov(dword_ptr(U + 0x1008), 0x5A5Au32)?;
        k.asm().or(eax, 0x1_0000u32)?;
        k.asm().mov(cr0, eax)?;
        Ok(k.asm().iretd()?)
    })?;
    set_gate(&mut k, idt, 0x80, 0xEE)?;
    // INT 0x81: the report, from ring 0.
    handler_address(&mut k, |k| {
        k.print_field("process-sum", eax)?;
        for i in 0..7u32 {
            print_masked(k, &format!("pte{i}"), PT_U + 4 * i, 0x67)?;
        }
        print_masked(k, "kernel-write-wp0", F0 + 0x1000 + 8, u32::MAX)?;
        print_masked(k, "shared-untouched", SHARED + 4, u32::MAX)?;
        print_masked(k, "pf-count", count, u32::MAX)?;
        k.exit(0x1B)
    })?;
    set_gate(&mut k, idt, 0x81, 0xEE)?;

    load_tables(&mut k, (gdt, gdtr), idtr, tss, tss_limit)?;
    k.asm().mov(eax, 0x10u32)?;
    k.asm().mov(ds, eax)?;
    k.asm().mov(es, eax)?;
    k.asm().mov(ss, eax)?;

    // Identity 0..4 MiB user-accessible (the kit's code runs in ring 3 too); 4..16 MiB
    // supervisor-only 4 MiB pages; the test pages at U.
    k.identity_map_4mib(PD)?;
    for i in 1..4 {
        put(&mut k, PD + 4 * i, (i << 22) | 0x83)?;
    }
    k.asm().mov(edi, PT_U)?;
    k.asm().xor(eax, eax)?;
    k.asm().mov(ecx, 1024u32)?;
    k.asm().rep().stosd()?;
    put(&mut k, PD + 4 * (U >> 22), PT_U | 7)?;
    put(&mut k, PT_U, F0 | 7)?; // user read-write
    put(&mut k, PT_U + 4, (F0 + 0x1000) | 5)?; // user read-only
    put(&mut k, PT_U + 8, (F0 + 0x2000) | 3)?; // supervisor read-write
    for i in 3..7 {
        put(&mut k, PT_U + 4 * i, SHARED | 5)?; // copy-on-write candidates
    }
    put(&mut k, SHARED, 0x600D)?;
    k.asm().mov(eax, cr4)?;
    k.asm().or(eax, 0x10u32)?;
    k.asm().mov(cr4, eax)?;
    k.asm().mov(eax, PD)?;
    k.asm().mov(cr3, eax)?;
    k.asm().mov(eax, cr0)?;
    k.asm().or(eax, 0x8001_0000u32)?;
    k.asm().mov(cr0, eax)?;

    k.print("entering ring 3\n")?;
    k.asm().push(0x23u32)?;
    k.asm().push(user_stack)?;
    k.asm().push(0x2u32)?;
    k.asm().push(0x1Bu32)?;
    handler_address(&mut k, |k| {
        k.asm().mov(eax, 0x23u32)?;
        k.asm().mov(ds, eax)?;
        k.asm().mov(es, eax)?;
        k.asm().mov(dword_ptr(skip), 5u32)?;
        k.asm().mov(eax, 0x1111u32)?;
        k.asm().mov(dword_ptr(U), eax)?; // user read-write: fine
        k.asm().mov(eax, dword_ptr(U + 0x1000))?; // user read-only read: fine
        k.print("user write to a read-only page: ")?;
        k.asm().mov(dword_ptr(U + 0x1000), eax)?;
        k.print("user read of a supervisor page: ")?;
        k.asm().mov(eax, dword_ptr(U + 0x2000))?;
        k.print("user write to a supervisor page: ")?;
        k.asm().mov(dword_ptr(U + 0x2000), eax)?;
        k.print("user read of a supervisor 4 MiB page: ")?;
        k.asm().mov(eax, dword_ptr(0x0040_0123u32))?;
        k.print("copy-on-write:\n")?;
        for i in 3..7u32 {
            k.asm().mov(eax, i)?;
            k.asm().mov(dword_ptr(U + 0x1000 * i + 4), eax)?;
        }
        k.asm().int(0x80)?;
        k.asm().xor(eax, eax)?;
        for i in 3..7u32 {
            k.asm().add(eax, dword_ptr(U + 0x1000 * i))?;
            k.asm().add(eax, dword_ptr(U + 0x1000 * i + 4))?;
        }
        k.asm().add(eax, dword_ptr(U))?;
        k.asm().add(eax, dword_ptr(U + 0x1008))?;
        k.asm().int(0x81)?;
        k.halt_forever()
    })?;
    k.asm().push(eax)?;
    k.asm().iretd()?;
    k.build()
}
