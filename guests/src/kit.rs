//! The guest test-kernel kit: small multiboot v1 kernels written in Rust with iced-x86's
//! `CodeAssembler`, with no external assembler.
//!
//! A [`Kit`] starts a kernel with a multiboot header and an entry stub that saves the entry
//! registers and sets up a stack; the test writes its code through [`Kit::asm`] and the helpers
//! (`print`, `print_hex`, `exit`), and [`Kit::build`] produces an ELF32 image (or an a.out-kludge
//! flat image). Conventions shared with QEMU-run test kernels: output on COM1 (0x3F8), exit through
//! the isa-debug-exit port 0xF4.

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, IcedError};

/// Guest-physical (and virtual) address kit kernels are linked at.
pub const KERNEL_BASE: u32 = 0x10_0000;
/// Multiboot v1 header magic.
pub const MULTIBOOT_MAGIC: u32 = 0x1BAD_B002;
/// Header flag: align modules on 4 KiB pages.
pub const MB_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag: memory information required.
pub const MB_MEMORY_INFO: u32 = 1 << 1;
/// Header flag: the a.out kludge address fields are valid.
pub const MB_AOUT_KLUDGE: u32 = 1 << 16;

/// Where the kernel's data lives: code takes at most the 64 KiB below it. The kit keeps data at a
/// fixed address because 32-bit code has no RIP-relative addressing, so every data address must be
/// known when the instruction that uses it is emitted.
pub const DATA_BASE: u32 = KERNEL_BASE + 0x1_0000;
const STACK_SIZE: usize = 16 * 1024;
/// Top of the kit's stack (ESP after the entry stub), the first 16 KiB of the data area.
pub const STACK_TOP: u32 = DATA_BASE + STACK_SIZE as u32;
const ENTRY_REGS_ADDR: u32 = STACK_TOP;
const ENTRY_EFLAGS_ADDR: u32 = ENTRY_REGS_ADDR + 32;
const AOUT_HEADER_LEN: u32 = 32;
const ELF_SEGMENT_OFFSET: u32 = 0x1000;
/// The program header type that states the stack's permissions (GNU extension).
const PT_GNU_STACK: u32 = 0x6474_E551;

/// Why a kit kernel could not be built.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    /// iced-x86 rejected an instruction or could not encode the block.
    #[error(transparent)]
    Asm(#[from] IcedError),
    /// The code does not fit below the kit's data area.
    #[error("kit kernel code is {0} bytes; at most 64 KiB fit below the data area")]
    CodeTooLarge(usize),
}

/// Result of the kit's assembler calls.
pub type AsmResult<T = ()> = Result<T, KitError>;

/// How the kernel image is packaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// ELF32 executable with one PT_LOAD segment.
    Elf,
    /// Flat binary whose multiboot header carries load addresses (header flag bit 16).
    AoutKludge,
}

/// Indexes of the registers saved by the entry stub, in encoding order.
pub const ENTRY_REGS: [&str; 8] = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"];

/// A multiboot test kernel under construction.
pub struct Kit {
    a: CodeAssembler,
    format: Format,
    header_flags: u32,
    data: Vec<u8>,
    putc: CodeLabel,
    puts: CodeLabel,
    putn: CodeLabel,
    hex32: CodeLabel,
    start: CodeLabel,
    /// Data words to fill with a label's address once the code is assembled: (label, offset
    /// into `data`).
    label_slots: Vec<(CodeLabel, usize)>,
}

impl Kit {
    /// A new ELF kernel with header flags `MB_PAGE_ALIGN | MB_MEMORY_INFO`.
    pub fn new() -> AsmResult<Self> {
        Self::with_header(Format::Elf, MB_PAGE_ALIGN | MB_MEMORY_INFO)
    }

    /// A new kernel in `format` whose multiboot header has `flags` (bit 16 is set for you for the
    /// a.out kludge).
    pub fn with_header(format: Format, flags: u32) -> AsmResult<Self> {
        let mut a = CodeAssembler::new(32)?;
        let mut k = Kit {
            putc: a.create_label(),
            puts: a.create_label(),
            putn: a.create_label(),
            hex32: a.create_label(),
            start: a.create_label(),
            label_slots: Vec::new(),
            a,
            format,
            header_flags: flags,
            // The stack, then the saved entry registers and EFLAGS.
            data: vec![0; STACK_SIZE + 36],
        };
        k.emit_header_and_entry()?;
        Ok(k)
    }

    fn emit_header_and_entry(&mut self) -> AsmResult {
        let flags = match self.format {
            Format::Elf => self.header_flags,
            Format::AoutKludge => self.header_flags | MB_AOUT_KLUDGE,
        };
        let checksum = 0u32.wrapping_sub(MULTIBOOT_MAGIC).wrapping_sub(flags);
        self.a.dd(&[MULTIBOOT_MAGIC, flags, checksum])?;
        if self.format == Format::AoutKludge {
            // header_addr, load_addr, load_end_addr (0: the whole file), bss_end_addr (0: none),
            // entry_addr: the entry stub follows the 32-byte header.
            let base = KERNEL_BASE;
            self.a.dd(&[base, base, 0, 0, base + AOUT_HEADER_LEN])?;
        }
        self.a.set_label(&mut self.start)?;
        let regs = [eax, ecx, edx, ebx, esp, ebp, esi, edi];
        for (i, reg) in regs.into_iter().enumerate() {
            self.a.mov(dword_ptr(ENTRY_REGS_ADDR + 4 * i as u32), reg)?;
        }
        self.a.mov(esp, STACK_TOP)?;
        self.a.pushfd()?;
        self.a.pop(eax)?;
        self.a.mov(dword_ptr(ENTRY_EFLAGS_ADDR), eax)?;
        self.a.mov(eax, dword_ptr(ENTRY_REGS_ADDR))?;
        Ok(())
    }

    /// The assembler, positioned after the entry stub (or after what the test emitted so far).
    pub fn asm(&mut self) -> &mut CodeAssembler {
        &mut self.a
    }

    /// A memory operand holding the value register `ENTRY_REGS[i]` had at kernel entry.
    pub fn entry_reg(&self, i: usize) -> AsmMemoryOperand {
        dword_ptr(ENTRY_REGS_ADDR + 4 * i as u32)
    }

    /// A memory operand holding EFLAGS at kernel entry.
    pub fn entry_eflags(&self) -> AsmMemoryOperand {
        dword_ptr(ENTRY_EFLAGS_ADDR)
    }

    /// Places `bytes` in the kernel's data (4-byte aligned) and returns their address.
    pub fn data(&mut self, bytes: &[u8]) -> u32 {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
        let addr = DATA_BASE + self.data.len() as u32;
        self.data.extend_from_slice(bytes);
        addr
    }

    /// Reserves a data word that will hold a code address once the kernel is built (see
    /// [`Kit::set_label_at`]): returns the word's address. This is how kit code loads its own
    /// code addresses, since iced's 32-bit `CodeAssembler` cannot take a label as an immediate
    /// (`mov eax, dword_ptr(slot)` can).
    pub fn address_slot(&mut self) -> u32 {
        self.data(&[0; 4])
    }

    /// Places `label` at the next instruction and has the kernel's data word `slot` (from
    /// [`Kit::address_slot`]) hold its address.
    pub fn set_label_at(&mut self, label: &mut CodeLabel, slot: u32) -> AsmResult {
        self.a.set_label(label)?;
        self.label_slots.push((*label, (slot - DATA_BASE) as usize));
        Ok(())
    }

    /// Places a descriptor table (GDT, LDT or IDT contents) in the data and, after it, the
    /// 6-byte pseudo-descriptor (limit, base) that LGDT/LIDT load: returns both addresses.
    pub fn descriptor_table(&mut self, table: &[u8]) -> (u32, u32) {
        let base = self.data(table);
        let mut pointer = ((table.len() - 1) as u16).to_le_bytes().to_vec();
        pointer.extend_from_slice(&base.to_le_bytes());
        (base, self.data(&pointer))
    }

    /// The address of a NUL-terminated copy of `s` in the kernel's data.
    pub fn string(&mut self, s: &str) -> u32 {
        let mut bytes = s.as_bytes().to_vec();
        bytes.push(0);
        self.data(&bytes)
    }

    /// Emits code that prints `s` on COM1. Preserves all registers.
    pub fn print(&mut self, s: &str) -> AsmResult {
        let addr = self.string(s);
        self.a.push(esi)?;
        self.a.mov(esi, addr)?;
        self.a.call(self.puts)?;
        self.a.pop(esi)?;
        Ok(())
    }

    /// Emits code that prints the NUL-terminated string at the address in ESI. Preserves all
    /// registers.
    pub fn print_at_esi(&mut self) -> AsmResult {
        Ok(self.a.call(self.puts)?)
    }

    /// Emits code that prints ECX bytes starting at ESI, verbatim. Preserves all registers.
    pub fn print_esi_ecx(&mut self) -> AsmResult {
        Ok(self.a.call(self.putn)?)
    }

    /// Emits code that prints `reg` as 8 hex digits. Preserves all registers.
    pub fn print_hex(&mut self, reg: AsmRegister32) -> AsmResult {
        self.a.push(eax)?;
        if reg != eax {
            self.a.mov(eax, reg)?;
        }
        self.a.call(self.hex32)?;
        self.a.pop(eax)?;
        Ok(())
    }

    /// Emits code that prints `label=` and the value of `reg` in hex, then a newline.
    pub fn print_field(&mut self, label: &str, reg: AsmRegister32) -> AsmResult {
        self.print(&format!("{label}="))?;
        self.print_hex(reg)?;
        self.print("\n")
    }

    /// Emits code that builds 2-level page tables mapping the first 4 MiB one to one: the page
    /// directory at `pd`, its one page table right after it (`pd + 0x1000`), every PTE and the PDE
    /// with flags 7 (present, writable, user). Uses EAX, ECX and EDI; clears DF.
    pub fn identity_map_4mib(&mut self, pd: u32) -> AsmResult {
        let a = &mut self.a;
        let pt = pd + 0x1000;
        a.cld()?;
        a.mov(edi, pd)?;
        a.xor(eax, eax)?;
        a.mov(ecx, 2048u32)?;
        a.rep().stosd()?;
        a.mov(edi, pt)?;
        a.mov(eax, 7u32)?;
        a.mov(ecx, 1024u32)?;
        let mut fill = a.create_label();
        a.set_label(&mut fill)?;
        a.stosd()?;
        a.add(eax, 0x1000u32)?;
        a.loop_(fill)?;
        a.mov(dword_ptr(pd), pt | 7)?;
        Ok(())
    }

    /// Emits code that writes `code` to the isa-debug-exit port (the VM ends with status
    /// `(code << 1) | 1`), then halts forever in case the port is absent.
    pub fn exit(&mut self, code: u8) -> AsmResult {
        self.a.mov(al, code as u32)?;
        self.a.out(0xF4, al)?;
        self.halt_forever()
    }

    /// Emits `cli; hlt` in a loop.
    pub fn halt_forever(&mut self) -> AsmResult {
        let mut again = self.a.create_label();
        self.a.set_label(&mut again)?;
        self.a.cli()?;
        self.a.hlt()?;
        self.a.jmp(again)?;
        Ok(())
    }

    fn emit_library(&mut self) -> AsmResult {
        let a = &mut self.a;
        // putc: AL = character. Waits for THR empty (LSR bit 5), then writes it.
        a.set_label(&mut self.putc)?;
        a.push(edx)?;
        a.push(eax)?;
        a.mov(dx, 0x3FDu32)?;
        let mut wait = a.create_label();
        a.set_label(&mut wait)?;
        a.in_(al, dx)?;
        a.test(al, 0x20u32)?;
        a.jz(wait)?;
        a.pop(eax)?;
        a.mov(dx, 0x3F8u32)?;
        a.out(dx, al)?;
        a.pop(edx)?;
        a.ret()?;

        // puts: ESI = NUL-terminated string.
        a.set_label(&mut self.puts)?;
        a.push(esi)?;
        a.push(eax)?;
        let mut next = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut next)?;
        a.mov(al, byte_ptr(esi))?;
        a.test(al, al)?;
        a.jz(done)?;
        a.call(self.putc)?;
        a.inc(esi)?;
        a.jmp(next)?;
        a.set_label(&mut done)?;
        a.pop(eax)?;
        a.pop(esi)?;
        a.ret()?;

        // putn: ESI = bytes, ECX = count.
        a.set_label(&mut self.putn)?;
        a.push(esi)?;
        a.push(ecx)?;
        a.push(eax)?;
        let mut next = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut next)?;
        a.test(ecx, ecx)?;
        a.jz(done)?;
        a.mov(al, byte_ptr(esi))?;
        a.call(self.putc)?;
        a.inc(esi)?;
        a.dec(ecx)?;
        a.jmp(next)?;
        a.set_label(&mut done)?;
        a.pop(eax)?;
        a.pop(ecx)?;
        a.pop(esi)?;
        a.ret()?;

        // hex32: EAX = value, printed as 8 lowercase hex digits.
        a.set_label(&mut self.hex32)?;
        a.push(eax)?;
        a.push(ecx)?;
        a.push(edx)?;
        a.mov(edx, eax)?;
        a.mov(ecx, 8u32)?;
        let mut digit = a.create_label();
        let mut decimal = a.create_label();
        a.set_label(&mut digit)?;
        a.rol(edx, 4u32)?;
        a.mov(eax, edx)?;
        a.and(eax, 0xFu32)?;
        a.cmp(al, 10u32)?;
        a.jb(decimal)?;
        a.add(al, (b'a' - b'0' - 10) as u32)?;
        a.set_label(&mut decimal)?;
        a.add(al, b'0' as u32)?;
        a.call(self.putc)?;
        a.dec(ecx)?;
        a.jnz(digit)?;
        a.pop(edx)?;
        a.pop(ecx)?;
        a.pop(eax)?;
        a.ret()?;
        Ok(())
    }

    /// Finishes the kernel: appends the runtime library and the data, and packages it.
    pub fn build(mut self) -> AsmResult<Vec<u8>> {
        self.emit_library()?;
        let result = self.a.assemble_options(
            u64::from(KERNEL_BASE),
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )?;
        let entry = result.label_ip(&self.start)? as u32;
        for (label, offset) in &self.label_slots {
            let ip = result.label_ip(label)? as u32;
            self.data[*offset..*offset + 4].copy_from_slice(&ip.to_le_bytes());
        }
        let mut image = result.inner.code_buffer;
        if image.len() > (DATA_BASE - KERNEL_BASE) as usize {
            return Err(KitError::CodeTooLarge(image.len()));
        }
        image.resize((DATA_BASE - KERNEL_BASE) as usize, 0);
        image.extend_from_slice(&self.data);
        Ok(match self.format {
            Format::Elf => elf32_exec(&image, KERNEL_BASE, KERNEL_BASE, entry),
            Format::AoutKludge => {
                assert_eq!(
                    entry,
                    KERNEL_BASE + AOUT_HEADER_LEN,
                    "entry stub follows the header"
                );
                image
            }
        })
    }
}

/// Packages `image` as an i386 ELF32 executable with one PT_LOAD segment at virtual address
/// `vaddr` and physical address `paddr`, entering at `entry` (a virtual address), and a
/// PT_GNU_STACK header asking for a non-executable stack (without it Linux assumes an old
/// toolchain and makes every readable mapping of the process executable).
pub fn elf32_exec(image: &[u8], vaddr: u32, paddr: u32, entry: u32) -> Vec<u8> {
    let mut f = Vec::with_capacity(ELF_SEGMENT_OFFSET as usize + image.len());
    f.extend_from_slice(&[0x7F, b'E', b'L', b'F', 1, 1, 1, 0]);
    f.resize(16, 0);
    let u16s = |f: &mut Vec<u8>, v: u16| f.extend_from_slice(&v.to_le_bytes());
    let u32s = |f: &mut Vec<u8>, v: u32| f.extend_from_slice(&v.to_le_bytes());
    u16s(&mut f, 2); // ET_EXEC
    u16s(&mut f, 3); // EM_386
    u32s(&mut f, 1); // EV_CURRENT
    u32s(&mut f, entry);
    u32s(&mut f, 52); // e_phoff
    u32s(&mut f, 0); // e_shoff
    u32s(&mut f, 0); // e_flags
    u16s(&mut f, 52); // e_ehsize
    u16s(&mut f, 32); // e_phentsize
    u16s(&mut f, 2); // e_phnum
    u16s(&mut f, 40); // e_shentsize
    u16s(&mut f, 0); // e_shnum
    u16s(&mut f, 0); // e_shstrndx
    u32s(&mut f, 1); // PT_LOAD
    u32s(&mut f, ELF_SEGMENT_OFFSET);
    u32s(&mut f, vaddr);
    u32s(&mut f, paddr);
    u32s(&mut f, image.len() as u32); // p_filesz
    u32s(&mut f, image.len() as u32); // p_memsz
    u32s(&mut f, 7); // RWX
    u32s(&mut f, 0x1000);
    u32s(&mut f, PT_GNU_STACK);
    f.extend_from_slice(&[0; 5 * 4]); // offset, addresses and sizes: unused
    u32s(&mut f, 6); // RW
    u32s(&mut f, 16);
    f.resize(ELF_SEGMENT_OFFSET as usize, 0);
    f.extend_from_slice(image);
    f
}

/// Emits the 8259A pair's initialization as a PC kernel does it (edge-triggered, cascade on
/// IRQ 2, ICW4 for 8086 mode), with the master's vectors at `vectors.0`, the slave's at
/// `vectors.1`, then the interrupt masks `masks` (master, slave). Only `mov al`/`out imm8`: it
/// assembles for 16-bit and 32-bit code alike.
pub fn init_pics(a: &mut CodeAssembler, vectors: (u8, u8), masks: (u8, u8)) -> AsmResult {
    for (port, value) in [
        (0x20, 0x11), // ICW1: edge, cascade, ICW4 follows
        (0x21, vectors.0),
        (0x21, 0x04), // ICW3: a slave on IR2
        (0x21, 0x01), // ICW4: 8086 mode
        (0xA0, 0x11),
        (0xA1, vectors.1),
        (0xA1, 0x02), // ICW3: slave identity 2
        (0xA1, 0x01),
        (0x21, masks.0),
        (0xA1, masks.1),
    ] {
        a.mov(al, u32::from(value))?;
        a.out(port, al)?;
    }
    Ok(())
}

/// Emits the 8254's channel 0 as a rate generator (mode 2, binary) dividing its 1.193182 MHz
/// clock by `divisor` (11932: 100 Hz), the way a PC kernel programs its tick. Only `mov al`/
/// `out imm8`: it assembles for 16-bit and 32-bit code alike.
pub fn pit_rate_generator(a: &mut CodeAssembler, divisor: u16) -> AsmResult {
    let [low, high] = divisor.to_le_bytes();
    for (port, value) in [(0x43, 0x34), (0x40, low), (0x40, high)] {
        a.mov(al, u32::from(value))?;
        a.out(port, al)?;
    }
    Ok(())
}

/// A raw firmware image for the reset vector: `code` (16-bit real-mode code assembled for
/// `F000:0000`) at the start of a 64 KiB image whose last 16 bytes (at `F000:FFF0`) jump to it.
pub fn reset_rom(build: impl FnOnce(&mut CodeAssembler) -> AsmResult) -> AsmResult<Vec<u8>> {
    let mut a = CodeAssembler::new(16)?;
    build(&mut a)?;
    let code = a.assemble(0)?;
    assert!(code.len() < 0xFFF0, "reset ROM code too large");
    let mut rom = vec![0xF4u8; 0x1_0000]; // HLT everywhere else
    rom[..code.len()].copy_from_slice(&code);
    // F000:FFF0: jmp far F000:0000
    rom[0xFFF0..0xFFF5].copy_from_slice(&[0xEA, 0x00, 0x00, 0x00, 0xF0]);
    Ok(rom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_kernel_has_a_valid_multiboot_header_in_the_first_8k() {
        let mut k = Kit::new().unwrap();
        k.print("x").unwrap();
        k.exit(1).unwrap();
        let elf = k.build().unwrap();
        assert_eq!(&elf[..4], b"\x7fELF");
        let off = ELF_SEGMENT_OFFSET as usize;
        let word =
            |i: usize| u32::from_le_bytes(elf[off + i * 4..off + i * 4 + 4].try_into().unwrap());
        assert_eq!(word(0), MULTIBOOT_MAGIC);
        assert_eq!(word(0).wrapping_add(word(1)).wrapping_add(word(2)), 0);
        let entry = u32::from_le_bytes(elf[24..28].try_into().unwrap());
        assert_eq!(
            entry,
            KERNEL_BASE + 12,
            "entry stub follows the 12-byte header"
        );
    }

    #[test]
    fn elf_program_headers_are_one_load_segment_and_a_non_executable_stack() {
        let elf = elf32_exec(&[0x90; 10], 0x0804_9000, 0x0804_9000, 0x0804_9000);
        let half = |at: usize| u16::from_le_bytes(elf[at..at + 2].try_into().unwrap());
        let word = |at: usize| u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
        let (phoff, phentsize, phnum) = (word(28) as usize, half(42) as usize, half(44));
        assert_eq!((phoff, phentsize, phnum), (52, 32, 2));
        let ph = |i: usize, field: usize| word(phoff + i * phentsize + field * 4);
        // p_type, p_offset, p_vaddr, p_filesz, p_flags of the load segment.
        assert_eq!(
            (ph(0, 0), ph(0, 1), ph(0, 2), ph(0, 4), ph(0, 6)),
            (1, ELF_SEGMENT_OFFSET, 0x0804_9000, 10, 7)
        );
        assert_eq!((ph(1, 0), ph(1, 6)), (PT_GNU_STACK, 6), "stack RW, not X");
        assert!(phoff + 2 * phentsize <= ELF_SEGMENT_OFFSET as usize);
        assert_eq!(&elf[ELF_SEGMENT_OFFSET as usize..], &[0x90; 10]);
    }

    #[test]
    fn aout_kernel_carries_its_load_addresses() {
        let mut k = Kit::with_header(Format::AoutKludge, MB_PAGE_ALIGN).unwrap();
        k.exit(0).unwrap();
        let img = k.build().unwrap();
        let word = |i: usize| u32::from_le_bytes(img[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(word(1), MB_PAGE_ALIGN | MB_AOUT_KLUDGE);
        assert_eq!(
            (word(3), word(4), word(7)),
            (KERNEL_BASE, KERNEL_BASE, KERNEL_BASE + 32)
        );
    }

    #[test]
    fn reset_rom_jumps_from_the_reset_vector_to_its_code() {
        let rom = reset_rom(|a| Ok(a.hlt()?)).unwrap();
        assert_eq!(rom.len(), 0x1_0000);
        assert_eq!(rom[0], 0xF4);
        assert_eq!(rom[0xFFF0], 0xEA);
    }
}
