//! Disk kernels: drive the PIIX IDE controller the way a simple driver does, with interrupts
//! (IRQ 14/15 through the remapped PICs, waited for with `sti; hlt`), PIO and bus-master DMA.
//!
//! - `disk`: PCI identification and BAR4 probing, SRST and signature, IDENTIFY, PIO reads of
//!   sector 0 and of a sector above the LBA28 limit, PIO writes (LBA48) + FLUSH CACHE EXT and a
//!   read back, SET MULTIPLE + WRITE/READ MULTIPLE, WRITE DMA EXT + FLUSH CACHE + READ DMA EXT, a
//!   read past the end. The test checks the image file afterwards.
//! - `disk-flush`: writes [`FLUSH_PATTERN_SEED`] to sector [`FLUSH_LBA`], flushes, prints
//!   "flushed" and spins: the test kills bt86 then and checks the file.
//! - `cdrom`: IDENTIFY PACKET DEVICE, TEST UNIT READY until ready, READ CAPACITY, READ TOC,
//!   MODE SENSE, READ(10) of the primary volume descriptor by PIO and of a file by DMA, and an
//!   eject / load cycle with its media events.
//!
//! Printed values are the ones a real drive and QEMU's model agree on; model strings, serial
//! numbers and vendor-specific IDENTIFY words are not printed.

use iced_x86::code_asm::*;

use crate::kit::{AsmResult, Kit, init_pics};

/// Sectors of the `disk` kernel's image: just above the LBA28 limit, so LBA48 is needed.
pub const DISK_SECTORS: u64 = 0x1000_0800;
/// A sector above the LBA28 limit that the kernel reads by PIO (the test fills it).
pub const HIGH_LBA: u64 = 0x1000_0400;
/// Where the kernel writes two sectors by PIO (WRITE SECTORS EXT).
pub const PIO_WRITE_LBA: u64 = 0x1000_0401;
/// Where the kernel writes six sectors with WRITE MULTIPLE (LBA28).
pub const MULTIPLE_LBA: u64 = 16;
/// Where the kernel writes eight sectors by DMA (WRITE DMA EXT).
pub const DMA_LBA: u64 = 0x1000_0500;
/// Pattern seeds (see [`pattern`]): PIO, multiple, DMA writes.
pub const PIO_SEED: u32 = 0x5049_4F00;
/// Seed of the WRITE MULTIPLE data.
pub const MULTIPLE_SEED: u32 = 0x4D55_4C00;
/// Seed of the DMA data.
pub const DMA_SEED: u32 = 0x444D_4100;
/// The `disk-flush` kernel's sector and pattern.
pub const FLUSH_LBA: u64 = 1;
/// Seed of the `disk-flush` kernel's sector.
pub const FLUSH_PATTERN_SEED: u32 = 0x464C_5300;
/// Step between pattern dwords.
const STEP: u32 = 0x0102_0305;

/// The data the kernels write: `len` bytes of little-endian dwords `seed + i * STEP`.
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len / 4)
        .flat_map(|i| seed.wrapping_add(STEP.wrapping_mul(i as u32)).to_le_bytes())
        .collect()
}

/// Emits code filling `bytes` at `buf` with [`pattern`]`(seed)` (EAX, ECX, EDI clobbered).
pub(crate) fn emit_fill(a: &mut CodeAssembler, buf: u32, bytes: u32, seed: u32) -> AsmResult {
    let mut again = a.create_label();
    a.mov(edi, buf)?;
    a.mov(ecx, bytes / 4)?;
    a.mov(eax, seed)?;
    a.cld()?;
    a.set_label(&mut again)?;
    a.stosd()?;
    a.add(eax, STEP)?;
    a.dec(ecx)?;
    a.jnz(again)?;
    Ok(())
}

/// Emits code leaving in EAX how many dwords differ between the `bytes` at `x` and at `y`
/// (ECX, EDX, ESI, EDI clobbered).
pub(crate) fn emit_count_differing(a: &mut CodeAssembler, x: u32, y: u32, bytes: u32) -> AsmResult {
    let mut again = a.create_label();
    let mut same = a.create_label();
    a.mov(esi, x)?;
    a.mov(edi, y)?;
    a.mov(ecx, bytes / 4)?;
    a.xor(eax, eax)?;
    a.set_label(&mut again)?;
    a.mov(edx, dword_ptr(esi))?;
    a.cmp(edx, dword_ptr(edi))?;
    a.je(same)?;
    a.inc(eax)?;
    a.set_label(&mut same)?;
    a.add(esi, 4u32)?;
    a.add(edi, 4u32)?;
    a.dec(ecx)?;
    a.jnz(again)?;
    Ok(())
}

/// Where the kernels put the bus-master registers (BAR4).
const BM_BASE: u16 = 0xC040;
/// The PRD table and the DMA buffers, in RAM above the kernel.
const PRD: u32 = 0x30_0000;
const BUF_A: u32 = 0x31_0000;
const BUF_B: u32 = 0x32_0000;
const BUF_C: u32 = 0x33_0000;

/// PCI config address of 00:01.1 (the IDE function) register `reg`.
fn ide_fn(reg: u32) -> u32 {
    0x8000_0000 | (1 << 11) | (1 << 8) | reg
}

/// One IDE channel's ports and the kernel's interrupt bookkeeping for it.
#[derive(Clone, Copy)]
struct Channel {
    cmd: u16,
    ctl: u16,
    bm: u16,
    /// Vector its IRQ is remapped to.
    vector: u32,
    /// Data words: interrupt seen, count, status and bus-master status read by the handler.
    flag: u32,
    count: u32,
    status: u32,
    bm_status: u32,
}

struct Disk {
    k: Kit,
    wait_irq: CodeLabel,
}

impl Disk {
    fn a(&mut self) -> &mut CodeAssembler {
        self.k.asm()
    }

    fn outb(&mut self, port: u16, v: u8) -> AsmResult {
        self.a().mov(dx, u32::from(port))?;
        self.a().mov(al, u32::from(v))?;
        Ok(self.a().out(dx, al)?)
    }

    /// EAX = the byte at `port`.
    fn inb(&mut self, port: u16) -> AsmResult {
        self.a().mov(dx, u32::from(port))?;
        self.a().in_(al, dx)?;
        Ok(self.a().movzx(eax, al)?)
    }

    fn out32(&mut self, port: u16, v: u32) -> AsmResult {
        self.a().mov(dx, u32::from(port))?;
        self.a().mov(eax, v)?;
        Ok(self.a().out(dx, eax)?)
    }

    /// EAX = PCI config dword at `address`.
    fn pci_read(&mut self, address: u32) -> AsmResult {
        self.out32(0xCF8, address)?;
        self.a().mov(dx, 0xCFCu32)?;
        Ok(self.a().in_(eax, dx)?)
    }

    fn pci_write(&mut self, address: u32, v: u32) -> AsmResult {
        self.out32(0xCF8, address)?;
        self.out32(0xCFC, v)
    }

    fn print_field(&mut self, label: &str) -> AsmResult {
        self.k.print_field(label, eax)
    }

    /// Remaps the PICs to 0x20/0x28 and unmasks only the cascade and IRQ 14/15.
    fn init_pics(&mut self) -> AsmResult {
        init_pics(self.a(), (0x20, 0x28), (0xFB, 0x3F))
    }

    /// Installs the interrupt handler of `chan` in `idt`: it reads status (clearing INTRQ) and
    /// the bus-master status (writing it back to clear it), counts, flags, and EOIs.
    fn handler(&mut self, idt: u32, chan: Channel) -> AsmResult {
        let mut over = self.a().create_label();
        self.a().call(over)?;
        self.a().push(eax)?;
        self.a().push(edx)?;
        self.inb(chan.cmd + 7)?;
        self.a().mov(dword_ptr(chan.status), eax)?;
        self.inb(chan.bm + 2)?;
        self.a().mov(dword_ptr(chan.bm_status), eax)?;
        self.a().out(dx, al)?;
        self.a().inc(dword_ptr(chan.count))?;
        self.a().mov(dword_ptr(chan.flag), 1u32)?;
        self.a().mov(al, 0x20u32)?;
        self.a().out(0xA0, al)?;
        self.a().out(0x20, al)?;
        self.a().pop(edx)?;
        self.a().pop(eax)?;
        self.a().iretd()?;
        self.a().set_label(&mut over)?;
        self.a().pop(eax)?;
        // Interrupt gate, selector 0x08, DPL 0.
        self.a().mov(edx, eax)?;
        self.a().and(edx, 0xFFFF_0000u32)?;
        self.a().or(edx, 0x8E00u32)?;
        self.a().mov(dword_ptr(idt + chan.vector * 8 + 4), edx)?;
        self.a().and(eax, 0xFFFFu32)?;
        self.a().or(eax, 0x0008_0000u32)?;
        self.a().mov(dword_ptr(idt + chan.vector * 8), eax)?;
        Ok(())
    }

    /// Emits the `wait_irq` subroutine: ESI = the channel's flag word; sleeps in HLT with
    /// interrupts enabled until the handler set it, then clears it (IF is 0 on return).
    fn emit_wait_irq(&mut self) -> AsmResult {
        let mut over = self.a().create_label();
        let mut again = self.a().create_label();
        let mut done = self.a().create_label();
        self.a().jmp(over)?;
        let mut wait = self.wait_irq;
        self.a().set_label(&mut wait)?;
        self.wait_irq = wait;
        self.a().cli()?;
        self.a().set_label(&mut again)?;
        self.a().cmp(dword_ptr(esi), 0u32)?;
        self.a().jne(done)?;
        self.a().sti()?;
        self.a().hlt()?;
        self.a().cli()?;
        self.a().jmp(again)?;
        self.a().set_label(&mut done)?;
        self.a().mov(dword_ptr(esi), 0u32)?;
        self.a().ret()?;
        self.a().set_label(&mut over)?;
        Ok(())
    }

    /// Waits for the channel's interrupt, then prints `label` = the status its handler read.
    fn wait(&mut self, chan: Channel, label: &str) -> AsmResult {
        self.a().mov(esi, chan.flag)?;
        let w = self.wait_irq;
        self.a().call(w)?;
        self.a().mov(eax, dword_ptr(chan.status))?;
        self.print_field(label)
    }

    /// Polls alternate status until BSY clears; EAX = the status.
    fn wait_not_busy(&mut self, chan: Channel) -> AsmResult {
        let mut again = self.a().create_label();
        self.a().set_label(&mut again)?;
        self.inb(chan.ctl)?;
        self.a().test(al, 0x80u32)?;
        self.a().jnz(again)?;
        Ok(())
    }

    fn lba28(&mut self, chan: Channel, lba: u64, count: u8, device: u8) -> AsmResult {
        self.outb(chan.cmd + 2, count)?;
        self.outb(chan.cmd + 3, lba as u8)?;
        self.outb(chan.cmd + 4, (lba >> 8) as u8)?;
        self.outb(chan.cmd + 5, (lba >> 16) as u8)?;
        self.outb(chan.cmd + 6, device | 0x40 | ((lba >> 24) as u8 & 0x0F))
    }

    fn lba48(&mut self, chan: Channel, lba: u64, count: u16) -> AsmResult {
        let l = lba.to_le_bytes();
        let c = count.to_le_bytes();
        for (reg, hi, lo) in [
            (2, c[1], c[0]),
            (3, l[3], l[0]),
            (4, l[4], l[1]),
            (5, l[5], l[2]),
        ] {
            self.outb(chan.cmd + reg, hi)?;
            self.outb(chan.cmd + reg, lo)?;
        }
        self.outb(chan.cmd + 6, 0x40)
    }

    fn insw(&mut self, chan: Channel, buf: u32, words: u32) -> AsmResult {
        self.a().mov(edi, buf)?;
        self.a().mov(ecx, words)?;
        self.a().mov(dx, u32::from(chan.cmd))?;
        self.a().cld()?;
        Ok(self.a().rep().insw()?)
    }

    fn outsw(&mut self, chan: Channel, buf: u32, words: u32) -> AsmResult {
        self.a().mov(esi, buf)?;
        self.a().mov(ecx, words)?;
        self.a().mov(dx, u32::from(chan.cmd))?;
        self.a().cld()?;
        Ok(self.a().rep().outsw()?)
    }

    /// Fills `bytes` at `buf` with [`pattern`]`(seed)`.
    fn fill(&mut self, buf: u32, bytes: u32, seed: u32) -> AsmResult {
        emit_fill(self.a(), buf, bytes, seed)
    }

    /// Prints `label` = how many dwords differ between `a` and `b`.
    fn compare(&mut self, a: u32, b: u32, bytes: u32, label: &str) -> AsmResult {
        emit_count_differing(self.a(), a, b, bytes)?;
        self.print_field(label)
    }

    /// Prints `label` = a rotate-and-add checksum of `bytes` at `buf`.
    fn checksum(&mut self, buf: u32, bytes: u32, label: &str) -> AsmResult {
        let mut again = self.a().create_label();
        self.a().mov(esi, buf)?;
        self.a().mov(ecx, bytes / 4)?;
        self.a().xor(eax, eax)?;
        self.a().set_label(&mut again)?;
        self.a().rol(eax, 1)?;
        self.a().add(eax, dword_ptr(esi))?;
        self.a().add(esi, 4u32)?;
        self.a().dec(ecx)?;
        self.a().jnz(again)?;
        self.print_field(label)
    }

    /// Prints the dword at `addr`.
    fn print_dword(&mut self, addr: u32, label: &str) -> AsmResult {
        self.a().mov(eax, dword_ptr(addr))?;
        self.print_field(label)
    }

    /// Prints the IDENTIFY word `w` of the buffer at `buf`, masked.
    fn print_word(&mut self, buf: u32, w: u32, mask: u32, label: &str) -> AsmResult {
        self.a().movzx(eax, word_ptr(buf + 2 * w))?;
        self.a().and(eax, mask)?;
        self.print_field(label)
    }

    /// Points the channel's bus master at a one- or two-entry PRD table over `regions`, and
    /// sets its direction (`to_memory` for device reads).
    fn prd(&mut self, chan: Channel, regions: &[(u32, u32)], to_memory: bool) -> AsmResult {
        for (i, (addr, len)) in regions.iter().enumerate() {
            let eot = if i + 1 == regions.len() {
                0x8000_0000
            } else {
                0
            };
            self.a().mov(dword_ptr(PRD + 8 * i as u32), *addr)?;
            self.a()
                .mov(dword_ptr(PRD + 8 * i as u32 + 4), (len & 0xFFFF) | eot)?;
        }
        self.out32(chan.bm + 4, PRD)?;
        self.outb(chan.bm, if to_memory { 0x08 } else { 0x00 })
    }

    fn start_dma(&mut self, chan: Channel, to_memory: bool) -> AsmResult {
        self.outb(chan.bm, if to_memory { 0x09 } else { 0x01 })
    }

    fn stop_dma(&mut self, chan: Channel) -> AsmResult {
        self.outb(chan.bm, 0x00)?;
        self.a().mov(eax, dword_ptr(chan.bm_status))?;
        self.a().and(eax, 7u32)?;
        self.print_field("  bm.status")
    }

    /// Software reset of the channel, nIEN cleared; prints the device 0 signature.
    fn reset(&mut self, chan: Channel) -> AsmResult {
        self.outb(chan.ctl, 0x04)?;
        self.outb(chan.ctl, 0x00)?;
        // SRST selects device 0 on real drives (the device register reads 00h after it);
        // QEMU keeps the device selected before, and ignores the device register while the
        // drive is busy: select device 0 until the register says so.
        let mut select = self.a().create_label();
        self.a().set_label(&mut select)?;
        self.outb(chan.cmd + 6, 0xA0)?;
        self.inb(chan.cmd + 6)?;
        self.a().test(al, 0x10u32)?;
        self.a().jnz(select)?;
        self.wait_not_busy(chan)?;
        self.a().xor(ebx, ebx)?;
        for reg in [2u16, 3, 4, 5] {
            self.inb(chan.cmd + reg)?;
            self.a().shl(ebx, 8)?;
            self.a().or(ebx, eax)?;
        }
        self.a().mov(eax, ebx)?;
        self.print_field("signature")
    }
}

fn new_disk(primary: bool) -> AsmResult<(Disk, Channel)> {
    // The channel's data words must exist before the handlers are emitted.
    let mut k = Kit::new()?;
    let words = k.data(&[0u8; 16]);
    let chan = Channel {
        cmd: if primary { 0x1F0 } else { 0x170 },
        ctl: if primary { 0x3F6 } else { 0x376 },
        bm: if primary { BM_BASE } else { BM_BASE + 8 },
        vector: if primary { 0x2E } else { 0x2F },
        flag: words,
        count: words + 4,
        status: words + 8,
        bm_status: words + 12,
    };
    let wait_irq = k.asm().create_label();
    let mut d = Disk { k, wait_irq };
    let (idt, idtr) = d.k.descriptor_table(&[0u8; 256 * 8]);
    d.emit_wait_irq()?;
    d.handler(idt, chan)?;
    d.a().lidt(ptr(idtr))?;
    d.init_pics()?;
    d.pci_write(ide_fn(0x20), u32::from(BM_BASE))?;
    d.pci_write(ide_fn(0x04), 0x0005)?;
    Ok((d, chan))
}

/// The `disk` kernel. Exits with value 0x30.
pub fn disk() -> AsmResult<Vec<u8>> {
    let (mut d, chan) = new_disk(true)?;
    // PCI: the chipset's functions and the IDE function's BAR4 size.
    d.pci_read(0x8000_0000)?;
    d.print_field("pci.00.0.id")?;
    d.pci_read(0x8000_0008)?;
    d.a().shr(eax, 8)?;
    d.print_field("pci.00.0.class")?;
    d.pci_read(0x8000_0800)?;
    d.print_field("pci.01.0.id")?;
    d.pci_read(0x8000_080C)?;
    d.a().shr(eax, 16)?;
    d.a().and(eax, 0xFFu32)?;
    d.print_field("pci.01.0.header")?;
    d.pci_read(ide_fn(0))?;
    d.print_field("pci.01.1.id")?;
    d.pci_read(ide_fn(8))?;
    d.a().shr(eax, 8)?;
    d.print_field("pci.01.1.class")?;
    d.pci_write(ide_fn(0x20), 0xFFFF_FFFF)?;
    d.pci_read(ide_fn(0x20))?;
    // A real PIIX decodes 16 address bits and reads 0 above them; QEMU's BAR reads ones
    // there: only the low half is printed.
    d.a().and(eax, 0xFFFFu32)?;
    d.print_field("pci.01.1.bar4.probe")?;
    d.pci_write(ide_fn(0x20), u32::from(BM_BASE))?;
    d.pci_read(ide_fn(0x20))?;
    d.print_field("pci.01.1.bar4")?;
    d.pci_read(ide_fn(4))?;
    d.a().and(eax, 7u32)?;
    d.print_field("pci.01.1.command")?;

    d.reset(chan)?;
    d.outb(chan.cmd + 6, 0xA0)?;
    d.inb(chan.ctl)?;
    d.print_field("status.after-reset")?;

    d.print("IDENTIFY DEVICE\n")?;
    d.outb(chan.cmd + 7, 0xEC)?;
    d.wait(chan, "  status")?;
    d.insw(chan, BUF_A, 256)?;
    d.inb(chan.ctl)?;
    d.print_field("  status.after-data")?;
    for (w, mask, label) in [
        (1, 0xFFFF, "  cylinders"),
        (3, 0xFFFF, "  heads"),
        (6, 0xFFFF, "  sectors"),
        (49, 0x0300, "  capabilities.lba-dma"),
        (60, 0xFFFF, "  lba28.low"),
        (61, 0xFFFF, "  lba28.high"),
        (83, 0x3400, "  features.lba48-flush"),
        (86, 0x3400, "  enabled.lba48-flush"),
        (100, 0xFFFF, "  lba48.0"),
        (101, 0xFFFF, "  lba48.1"),
        (102, 0xFFFF, "  lba48.2"),
    ] {
        d.print_word(BUF_A, w, mask, label)?;
    }

    d.print("READ SECTORS, LBA 0\n")?;
    d.lba28(chan, 0, 1, 0xA0)?;
    d.outb(chan.cmd + 7, 0x20)?;
    d.wait(chan, "  status")?;
    d.insw(chan, BUF_A, 256)?;
    d.print_dword(BUF_A, "  dword0")?;
    d.checksum(BUF_A, 512, "  checksum")?;

    d.print("READ SECTORS EXT, LBA 0x10000400\n")?;
    d.lba48(chan, HIGH_LBA, 1)?;
    d.outb(chan.cmd + 7, 0x24)?;
    d.wait(chan, "  status")?;
    d.insw(chan, BUF_A, 256)?;
    d.print_dword(BUF_A, "  dword0")?;
    d.checksum(BUF_A, 512, "  checksum")?;

    d.print("WRITE SECTORS EXT, 2 sectors\n")?;
    d.fill(BUF_B, 1024, PIO_SEED)?;
    d.lba48(chan, PIO_WRITE_LBA, 2)?;
    d.outb(chan.cmd + 7, 0x34)?;
    d.wait_not_busy(chan)?;
    d.print_field("  status.drq")?;
    d.outsw(chan, BUF_B, 256)?;
    d.wait(chan, "  status.block1")?;
    d.outsw(chan, BUF_B + 512, 256)?;
    d.wait(chan, "  status.block2")?;
    d.outb(chan.cmd + 7, 0xEA)?;
    d.wait(chan, "  flush-ext.status")?;
    d.lba48(chan, PIO_WRITE_LBA, 2)?;
    d.outb(chan.cmd + 7, 0x24)?;
    d.wait(chan, "  read-back.status")?;
    d.insw(chan, BUF_C, 256)?;
    d.wait(chan, "  read-back.status2")?;
    d.insw(chan, BUF_C + 512, 256)?;
    d.compare(BUF_B, BUF_C, 1024, "  differing-dwords")?;

    d.print("SET MULTIPLE 4, WRITE/READ MULTIPLE 6 sectors\n")?;
    d.outb(chan.cmd + 2, 4)?;
    d.outb(chan.cmd + 7, 0xC6)?;
    d.wait(chan, "  set-multiple.status")?;
    d.fill(BUF_B, 3072, MULTIPLE_SEED)?;
    d.lba28(chan, MULTIPLE_LBA, 6, 0xA0)?;
    d.outb(chan.cmd + 7, 0xC5)?;
    d.wait_not_busy(chan)?;
    d.outsw(chan, BUF_B, 4 * 256)?;
    d.wait(chan, "  write.block1")?;
    d.outsw(chan, BUF_B + 2048, 2 * 256)?;
    d.wait(chan, "  write.block2")?;
    d.lba28(chan, MULTIPLE_LBA, 6, 0xA0)?;
    d.outb(chan.cmd + 7, 0xC4)?;
    d.wait(chan, "  read.block1")?;
    d.insw(chan, BUF_C, 4 * 256)?;
    d.wait(chan, "  read.block2")?;
    d.insw(chan, BUF_C + 2048, 2 * 256)?;
    d.compare(BUF_B, BUF_C, 3072, "  differing-dwords")?;

    d.print("WRITE DMA EXT, FLUSH CACHE, READ DMA EXT: 8 sectors\n")?;
    d.fill(BUF_B, 4096, DMA_SEED)?;
    d.prd(chan, &[(BUF_B, 1024), (BUF_B + 1024, 3072)], false)?;
    d.lba48(chan, DMA_LBA, 8)?;
    d.outb(chan.cmd + 7, 0x35)?;
    d.start_dma(chan, false)?;
    d.wait(chan, "  write.status")?;
    d.stop_dma(chan)?;
    d.outb(chan.cmd + 7, 0xE7)?;
    d.wait(chan, "  flush.status")?;
    d.prd(chan, &[(BUF_C, 2048), (BUF_C + 2048, 2048)], true)?;
    d.lba48(chan, DMA_LBA, 8)?;
    d.outb(chan.cmd + 7, 0x25)?;
    d.start_dma(chan, true)?;
    d.wait(chan, "  read.status")?;
    d.stop_dma(chan)?;
    d.compare(BUF_B, BUF_C, 4096, "  differing-dwords")?;

    d.print("READ SECTORS EXT past the end\n")?;
    d.lba48(chan, DISK_SECTORS, 1)?;
    d.outb(chan.cmd + 7, 0x24)?;
    // ATA-6 says IDNF, QEMU says ABRT: only ERR is printed.
    d.a().mov(esi, chan.flag)?;
    let w = d.wait_irq;
    d.a().call(w)?;
    d.a().mov(eax, dword_ptr(chan.status))?;
    d.a().and(eax, 0xF9u32)?;
    d.print_field("  status")?;

    d.print_dword(chan.count, "interrupts")?;
    d.k.exit(0x30)?;
    d.k.build()
}

/// The `disk-flush` kernel: one sector written and flushed, then "flushed" and a busy loop.
pub fn disk_flush() -> AsmResult<Vec<u8>> {
    let (mut d, chan) = new_disk(true)?;
    d.reset(chan)?;
    d.fill(BUF_B, 512, FLUSH_PATTERN_SEED)?;
    d.lba28(chan, FLUSH_LBA, 1, 0xA0)?;
    d.outb(chan.cmd + 7, 0x30)?;
    d.wait_not_busy(chan)?;
    d.outsw(chan, BUF_B, 256)?;
    d.wait(chan, "write.status")?;
    d.inb(chan.cmd + 1)?;
    d.print_field("write.error")?;
    d.outb(chan.cmd + 7, 0xE7)?;
    d.wait(chan, "flush.status")?;
    d.print("flushed\n")?;
    let mut spin = d.a().create_label();
    d.a().set_label(&mut spin)?;
    d.a().pause()?;
    d.a().jmp(spin)?;
    d.k.build()
}

/// Sectors the `disk-spin` kernel writes (from [`FLUSH_LBA`]), each with its own interrupt.
pub const SPIN_WRITES: u32 = 4;

/// The `disk-spin` kernel: [`SPIN_WRITES`] PIO writes of [`pattern`]`(FLUSH_PATTERN_SEED + i)`
/// to consecutive sectors from [`FLUSH_LBA`], then a FLUSH CACHE; after each command it waits
/// for the completion interrupt by spinning on the handler's flag in memory with interrupts
/// enabled: no HLT and no port access in the loop, so only the interrupt can end it. Prints
/// each status and the interrupt count, and exits with value 0x31.
pub fn disk_spin() -> AsmResult<Vec<u8>> {
    let (mut d, chan) = new_disk(true)?;
    d.reset(chan)?;
    for i in 0..SPIN_WRITES {
        d.fill(BUF_B, 512, FLUSH_PATTERN_SEED + i)?;
        d.lba28(chan, FLUSH_LBA + u64::from(i), 1, 0xA0)?;
        d.outb(chan.cmd + 7, 0x30)?;
        d.wait_not_busy(chan)?;
        d.outsw(chan, BUF_B, 256)?;
        d.spin(chan, &format!("write{i}.status"))?;
    }
    d.outb(chan.cmd + 7, 0xE7)?;
    d.spin(chan, "flush.status")?;
    d.print_dword(chan.count, "interrupts")?;
    d.k.exit(0x31)?;
    d.k.build()
}

impl Disk {
    /// Waits for the channel's interrupt by spinning on its flag with IF = 1, then prints
    /// `label` = the status its handler read.
    fn spin(&mut self, chan: Channel, label: &str) -> AsmResult {
        let mut again = self.a().create_label();
        self.a().sti()?;
        self.a().set_label(&mut again)?;
        self.a().pause()?;
        self.a().cmp(dword_ptr(chan.flag), 0u32)?;
        self.a().je(again)?;
        self.a().cli()?;
        self.a().mov(dword_ptr(chan.flag), 0u32)?;
        self.a().mov(eax, dword_ptr(chan.status))?;
        self.print_field(label)
    }

    fn print(&mut self, s: &str) -> AsmResult {
        self.k.print(s)
    }

    /// Sends the ATAPI packet `cdb` (PIO unless `dma`), with a byte count limit of 0xFFFE, and
    /// waits for the first interrupt: data or completion.
    fn packet(&mut self, chan: Channel, cdb: &[u8], dma: bool, label: &str) -> AsmResult {
        let mut c = [0u8; 12];
        c[..cdb.len()].copy_from_slice(cdb);
        let addr = self.k.data(&c);
        self.outb(chan.cmd + 6, 0xA0)?;
        self.outb(chan.cmd + 1, u8::from(dma))?;
        self.outb(chan.cmd + 4, 0xFE)?;
        self.outb(chan.cmd + 5, 0xFF)?;
        self.outb(chan.cmd + 7, 0xA0)?;
        self.wait_not_busy(chan)?;
        self.outsw(chan, addr, 6)?;
        self.wait(chan, label)
    }

    /// After a data interrupt: reads the byte count into EBX, the data into `buf`, and waits
    /// for the completion interrupt.
    fn packet_data(&mut self, chan: Channel, buf: u32, label: &str) -> AsmResult {
        self.inb(chan.cmd + 5)?;
        self.a().mov(ebx, eax)?;
        self.a().shl(ebx, 8)?;
        self.inb(chan.cmd + 4)?;
        self.a().or(ebx, eax)?;
        self.a().mov(edi, buf)?;
        self.a().mov(ecx, ebx)?;
        self.a().shr(ecx, 1)?;
        self.a().mov(dx, u32::from(chan.cmd))?;
        self.a().cld()?;
        self.a().rep().insw()?;
        self.a().mov(eax, ebx)?;
        self.k.print_field("  bytes", eax)?;
        self.wait(chan, label)?;
        self.inb(chan.cmd + 2)?;
        self.print_field("  reason")
    }

    /// REQUEST SENSE: prints key, ASC and ASCQ as 00KKAAQQ.
    fn sense(&mut self, chan: Channel, label: &str) -> AsmResult {
        self.packet(chan, &[0x03, 0, 0, 0, 18], false, "  sense.status")?;
        self.packet_data_quiet(chan, BUF_C)?;
        self.a().movzx(eax, byte_ptr(BUF_C + 2))?;
        self.a().and(eax, 0x0Fu32)?;
        self.a().shl(eax, 16)?;
        self.a().movzx(ebx, byte_ptr(BUF_C + 12))?;
        self.a().shl(ebx, 8)?;
        self.a().or(eax, ebx)?;
        // The qualifier is not printed: with the tray open real drives say 3A/02 (MEDIUM NOT
        // PRESENT - TRAY OPEN), QEMU says 3A/00.
        self.print_field(label)
    }

    /// Reads a data block and waits for completion without printing.
    fn packet_data_quiet(&mut self, chan: Channel, buf: u32) -> AsmResult {
        self.inb(chan.cmd + 5)?;
        self.a().mov(ecx, eax)?;
        self.a().shl(ecx, 8)?;
        self.inb(chan.cmd + 4)?;
        self.a().or(ecx, eax)?;
        self.a().shr(ecx, 1)?;
        self.a().mov(edi, buf)?;
        self.a().mov(dx, u32::from(chan.cmd))?;
        self.a().cld()?;
        self.a().rep().insw()?;
        self.a().mov(esi, chan.flag)?;
        let w = self.wait_irq;
        Ok(self.a().call(w)?)
    }
}

impl Disk {
    /// TEST UNIT READY until it succeeds (at most 20 times).
    fn until_ready(&mut self, chan: Channel) -> AsmResult {
        let mut again = self.a().create_label();
        let mut ready = self.a().create_label();
        self.a().mov(dword_ptr(BUF_C + 0x1000), 20u32)?;
        self.a().set_label(&mut again)?;
        self.outb(chan.cmd + 6, 0xA0)?;
        self.outb(chan.cmd + 1, 0)?;
        self.outb(chan.cmd + 7, 0xA0)?;
        self.wait_not_busy(chan)?;
        let tur = self.k.data(&[0u8; 12]);
        self.outsw(chan, tur, 6)?;
        self.a().mov(esi, chan.flag)?;
        let w = self.wait_irq;
        self.a().call(w)?;
        self.a().test(dword_ptr(chan.status), 1u32)?;
        self.a().jz(ready)?;
        self.a().dec(dword_ptr(BUF_C + 0x1000))?;
        self.a().jnz(again)?;
        self.a().set_label(&mut ready)?;
        Ok(())
    }
}

/// The `cdrom` kernel. Exits with value 0x31.
pub fn cdrom() -> AsmResult<Vec<u8>> {
    let (mut d, chan) = new_disk(false)?;
    d.reset(chan)?;
    d.print("IDENTIFY PACKET DEVICE\n")?;
    d.outb(chan.cmd + 6, 0xA0)?;
    d.outb(chan.cmd + 7, 0xA1)?;
    d.wait(chan, "  status")?;
    d.insw(chan, BUF_A, 256)?;
    d.print_word(BUF_A, 0, 0xFF03, "  general")?;

    // Unit attentions after reset or power-on come first (how many depends on what the
    // firmware did before, so nothing of this loop is printed).
    d.until_ready(chan)?;
    d.print("TEST UNIT READY: ready\n")?;
    d.a().mov(dword_ptr(chan.count), 0u32)?;

    d.print("READ CAPACITY\n")?;
    d.packet(chan, &[0x25], false, "  status")?;
    d.packet_data(chan, BUF_A, "  done.status")?;
    for (off, label) in [(0, "  last-lba"), (4, "  block-size")] {
        d.a().mov(eax, dword_ptr(BUF_A + off))?;
        d.a().bswap(eax)?;
        d.print_field(label)?;
    }

    d.print("READ TOC (LBA)\n")?;
    d.packet(chan, &[0x43, 0, 0, 0, 0, 0, 0, 0, 20], false, "  status")?;
    d.packet_data(chan, BUF_A, "  done.status")?;
    for off in [0u32, 4, 8, 12, 16] {
        d.a().mov(eax, dword_ptr(BUF_A + off))?;
        d.a().bswap(eax)?;
        if off == 12 {
            // The lead-out's control nibble: 4 (data) on the drives MMC describes, 6 (data,
            // copy permitted) under QEMU: the copy bit is not printed.
            d.a().and(eax, 0xFFFD_FFFFu32)?;
        }
        d.print_field(&format!("  toc.{off}"))?;
    }

    d.print("READ(10) LBA 16 by PIO\n")?;
    d.packet(chan, &[0x28, 0, 0, 0, 0, 16, 0, 0, 1], false, "  status")?;
    d.packet_data(chan, BUF_A, "  done.status")?;
    d.print("  id=")?;
    d.a().mov(esi, BUF_A + 1)?;
    d.a().mov(ecx, 5u32)?;
    d.k.print_esi_ecx()?;
    d.print("\n  volume=")?;
    d.a().mov(esi, BUF_A + 40)?;
    d.a().mov(ecx, 9u32)?;
    d.k.print_esi_ecx()?;
    d.print("\n")?;

    d.print("READ(10) LBA 21 by DMA\n")?;
    d.prd(chan, &[(BUF_B, 2048)], true)?;
    d.start_dma(chan, true)?;
    d.packet(chan, &[0x28, 0, 0, 0, 0, 21, 0, 0, 1], true, "  status")?;
    d.stop_dma(chan)?;
    d.inb(chan.cmd + 2)?;
    d.print_field("  reason")?;
    d.print("  file=")?;
    d.a().mov(esi, BUF_B)?;
    d.k.print_at_esi()?;

    d.print("READ(10) past the end\n")?;
    d.packet(chan, &[0x28, 0, 0, 0, 1, 0, 0, 0, 1], false, "  status")?;
    d.inb(chan.cmd + 1)?;
    d.print_field("  error")?;
    d.sense(chan, "  sense")?;

    d.print("START STOP UNIT: eject\n")?;
    d.packet(chan, &[0x1B, 0, 0, 0, 2], false, "  status")?;
    d.packet(chan, &[0x00], false, "  tur.status")?;
    d.sense(chan, "  sense")?;
    d.print_dword(chan.count, "interrupts")?;
    d.print("START STOP UNIT: load\n")?;
    d.packet(chan, &[0x1B, 0, 0, 0, 3], false, "  status")?;
    // A real drive reports UNIT ATTENTION (medium may have changed) after the tray closes;
    // QEMU does not: wait until ready without printing the attempts.
    d.until_ready(chan)?;
    d.print("TEST UNIT READY: ready\n")?;
    d.k.exit(0x31)?;
    d.k.build()
}

/// An ISO 9660 image with one volume descriptor set (primary + terminator), a root directory
/// and the given files (each at most one 2048-byte block), as mkisofs lays one out.
pub fn iso9660(volume_id: &str, files: &[(&str, &[u8])]) -> Vec<u8> {
    const BLOCK: usize = 2048;
    const ROOT: u32 = 18;
    const L_TABLE: u32 = 19;
    const M_TABLE: u32 = 20;
    const FIRST_FILE: u32 = 21;
    let blocks = FIRST_FILE as usize + files.len().max(1) + 11;
    let mut img = vec![0u8; blocks * BLOCK];
    let both32 = |v: u32| {
        let mut b = v.to_le_bytes().to_vec();
        b.extend_from_slice(&v.to_be_bytes());
        b
    };
    let both16 = |v: u16| {
        let mut b = v.to_le_bytes().to_vec();
        b.extend_from_slice(&v.to_be_bytes());
        b
    };
    let record = |name: &[u8], extent: u32, size: u32, dir: bool| {
        let mut r = vec![0u8; 33];
        r[1] = 0;
        r[2..10].copy_from_slice(&both32(extent));
        r[10..18].copy_from_slice(&both32(size));
        r[18..25].copy_from_slice(&[125, 1, 1, 0, 0, 0, 0]); // 2025-01-01 00:00:00 UTC
        r[25] = if dir { 2 } else { 0 };
        r[28..32].copy_from_slice(&both16(1));
        r[32] = name.len() as u8;
        r.extend_from_slice(name);
        if r.len() % 2 == 1 {
            r.push(0);
        }
        r[0] = r.len() as u8;
        r
    };
    let root_record = record(&[0], ROOT, BLOCK as u32, true);
    // Primary volume descriptor.
    let pvd = &mut img[16 * BLOCK..17 * BLOCK];
    pvd[0] = 1;
    pvd[1..6].copy_from_slice(b"CD001");
    pvd[6] = 1;
    pvd[8..40].fill(b' ');
    pvd[40..72].fill(b' ');
    pvd[40..40 + volume_id.len()].copy_from_slice(volume_id.as_bytes());
    pvd[80..88].copy_from_slice(&both32(blocks as u32));
    pvd[120..124].copy_from_slice(&both16(1));
    pvd[124..128].copy_from_slice(&both16(1));
    pvd[128..132].copy_from_slice(&both16(BLOCK as u16));
    pvd[132..140].copy_from_slice(&both32(10));
    pvd[140..144].copy_from_slice(&L_TABLE.to_le_bytes());
    pvd[148..152].copy_from_slice(&M_TABLE.to_be_bytes());
    pvd[156..156 + 34].copy_from_slice(&root_record);
    pvd[190..813].fill(b' ');
    pvd[813..830].copy_from_slice(b"2025010100000000\0");
    pvd[830..847].copy_from_slice(b"2025010100000000\0");
    pvd[847..864].copy_from_slice(b"0000000000000000\0");
    pvd[864..881].copy_from_slice(b"0000000000000000\0");
    pvd[881] = 1;
    // Terminator.
    let term = &mut img[17 * BLOCK..18 * BLOCK];
    term[0] = 0xFF;
    term[1..6].copy_from_slice(b"CD001");
    term[6] = 1;
    // Root directory: ".", "..", the files.
    let mut dir = record(&[0], ROOT, BLOCK as u32, true);
    dir.extend(record(&[1], ROOT, BLOCK as u32, true));
    for (i, (name, data)) in files.iter().enumerate() {
        let ident = format!("{};1", name.to_ascii_uppercase());
        dir.extend(record(
            ident.as_bytes(),
            FIRST_FILE + i as u32,
            data.len() as u32,
            false,
        ));
        let at = (FIRST_FILE as usize + i) * BLOCK;
        img[at..at + data.len()].copy_from_slice(data);
    }
    img[ROOT as usize * BLOCK..ROOT as usize * BLOCK + dir.len()].copy_from_slice(&dir);
    // Path tables: the root only.
    let mut l = vec![1, 0];
    l.extend_from_slice(&ROOT.to_le_bytes());
    l.extend_from_slice(&1u16.to_le_bytes());
    l.extend_from_slice(&[0, 0]);
    img[L_TABLE as usize * BLOCK..][..10].copy_from_slice(&l);
    let mut m = vec![1, 0];
    m.extend_from_slice(&ROOT.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(&[0, 0]);
    img[M_TABLE as usize * BLOCK..][..10].copy_from_slice(&m);
    img
}
