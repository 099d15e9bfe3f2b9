//! The `virtio-blk` kernel: drives a modern virtio block device (PCI 1AF4:1042) the way a
//! driver does, by the virtio 1.2 specification: finds the function on bus 0, walks its
//! vendor-specific capabilities to locate the common, notification, ISR and device
//! configuration structures (whatever BAR and offset the device put them at), takes the
//! interrupt line firmware wrote, enables bus mastering, and then:
//!
//! - resets and negotiates (VERSION_1, FLUSH, INDIRECT_DESC), sets up a 16-entry queue;
//! - IN of sector 0, OUT of two sectors from two buffers, FLUSH, IN of them back through an
//!   indirect table, GET_ID, an unsupported request type, an IN past the end: each waited for
//!   by its interrupt (`sti; hlt`), its status byte, used length and used index printed;
//! - a descriptor chain that loops: the device must stop with DEVICE_NEEDS_RESET and a
//!   configuration interrupt (and the host must survive it); the kernel resets the device,
//!   sets it up again and reads sector 0 once more.
//!
//! Needs a raw image of [`VIRTIO_SECTORS`] sectors that starts with [`SECTOR0_TEXT`]. Exits
//! with value 0x32.

use iced_x86::code_asm::*;

use crate::kernels::disk::{emit_count_differing, emit_fill};
use crate::kit::{AsmResult, Kit, init_pics};

/// Sectors of the kernel's image.
pub const VIRTIO_SECTORS: u64 = 2048;
/// What the test puts at the start of sector 0.
pub const SECTOR0_TEXT: &[u8] = b"BT86-VIRTIO-sector-zero";
/// Where the kernel writes two sectors, and their pattern seed (see
/// [`crate::kernels::disk::pattern`]).
pub const VIRTIO_WRITE_SECTOR: u64 = 8;
/// Seed of the written data.
pub const VIRTIO_SEED: u32 = 0x5649_5254;

const QSIZE: u32 = 16;
/// Ring memory and buffers, above the kernel.
const DESC: u32 = 0x30_0000;
const AVAIL: u32 = 0x30_1000;
const USED: u32 = 0x30_2000;
const HDR: u32 = 0x30_3000;
const STATUS: u32 = 0x30_3800;
const INDIRECT: u32 = 0x30_4000;
const BUF_A: u32 = 0x31_0000;
const BUF_B: u32 = 0x32_0000;
const BUF_C: u32 = 0x33_0000;

const F_NEXT: u32 = 1;
const F_WRITE: u32 = 2;
const F_INDIRECT: u32 = 4;

/// Data words the kernel keeps.
#[derive(Clone, Copy)]
struct Words {
    /// CONFIG_ADDRESS of the function (bit 31 set, register 0).
    cfg: u32,
    /// Addresses of the structures, indexed by cfg_type (1 common, 2 notify, 3 ISR, 4 device).
    ptrs: u32,
    /// notify_off_multiplier.
    mult: u32,
    /// The notification address of queue 0.
    notify: u32,
    /// Interrupt bookkeeping: flag, count, the ISR value the handler read.
    flag: u32,
    count: u32,
    isr: u32,
}

struct V {
    k: Kit,
    w: Words,
    /// Available index the next request gets (the kernel is straight-line code).
    avail: u32,
    wait_irq: CodeLabel,
}

impl V {
    fn a(&mut self) -> &mut CodeAssembler {
        self.k.asm()
    }

    fn print(&mut self, s: &str) -> AsmResult {
        self.k.print(s)
    }

    fn field(&mut self, label: &str) -> AsmResult {
        self.k.print_field(label, eax)
    }

    /// EAX = configuration dword at register `reg` (a register operand or constant in ECX) of
    /// the function: CONFIG_ADDRESS = [cfg] | ECX.
    fn cfg_read_ecx(&mut self) -> AsmResult {
        let cfg = self.w.cfg;
        self.a().mov(eax, dword_ptr(cfg))?;
        self.a().or(eax, ecx)?;
        self.a().mov(dx, 0xCF8u32)?;
        self.a().out(dx, eax)?;
        self.a().mov(dx, 0xCFCu32)?;
        Ok(self.a().in_(eax, dx)?)
    }

    fn cfg_read(&mut self, reg: u32) -> AsmResult {
        self.a().mov(ecx, reg)?;
        self.cfg_read_ecx()
    }

    fn cfg_write(&mut self, reg: u32, v: u32) -> AsmResult {
        let cfg = self.w.cfg;
        self.a().mov(eax, dword_ptr(cfg))?;
        self.a().or(eax, reg)?;
        self.a().mov(dx, 0xCF8u32)?;
        self.a().out(dx, eax)?;
        self.a().mov(dx, 0xCFCu32)?;
        self.a().mov(eax, v)?;
        Ok(self.a().out(dx, eax)?)
    }

    /// EBX = the address of structure `cfg_type`.
    fn base(&mut self, cfg_type: u32) -> AsmResult {
        let p = self.w.ptrs + 4 * cfg_type;
        Ok(self.a().mov(ebx, dword_ptr(p))?)
    }

    /// Common configuration accessors.
    fn common_w8(&mut self, off: i32, v: u32) -> AsmResult {
        self.base(1)?;
        Ok(self.a().mov(byte_ptr(ebx + off), v)?)
    }
    fn common_w16(&mut self, off: i32, v: u32) -> AsmResult {
        self.base(1)?;
        Ok(self.a().mov(word_ptr(ebx + off), v)?)
    }
    fn common_w32(&mut self, off: i32, v: u32) -> AsmResult {
        self.base(1)?;
        Ok(self.a().mov(dword_ptr(ebx + off), v)?)
    }
    fn common_r8(&mut self, off: i32) -> AsmResult {
        self.base(1)?;
        Ok(self.a().movzx(eax, byte_ptr(ebx + off))?)
    }
    fn common_r16(&mut self, off: i32) -> AsmResult {
        self.base(1)?;
        Ok(self.a().movzx(eax, word_ptr(ebx + off))?)
    }
    fn common_r32(&mut self, off: i32) -> AsmResult {
        self.base(1)?;
        Ok(self.a().mov(eax, dword_ptr(ebx + off))?)
    }

    fn desc(
        &mut self,
        table: u32,
        i: u32,
        addr: u32,
        len: u32,
        flags: u32,
        next: u32,
    ) -> AsmResult {
        let at = table + 16 * i;
        self.a().mov(dword_ptr(at), addr)?;
        self.a().mov(dword_ptr(at + 4), 0u32)?;
        self.a().mov(dword_ptr(at + 8), len)?;
        self.a().mov(dword_ptr(at + 12), flags | (next << 16))?;
        Ok(())
    }

    /// Writes request header `slot` (type, sector) and presets its status byte to 0xEE.
    fn header(&mut self, slot: u32, kind: u32, sector: u32) -> AsmResult<u32> {
        let at = HDR + 16 * slot;
        self.a().mov(dword_ptr(at), kind)?;
        self.a().mov(dword_ptr(at + 4), 0u32)?;
        self.a().mov(dword_ptr(at + 8), sector)?;
        self.a().mov(dword_ptr(at + 12), 0u32)?;
        self.a().mov(byte_ptr(STATUS + slot), 0xEEu32)?;
        Ok(at)
    }

    /// Makes the chain at `head` available, notifies, waits for the interrupt.
    fn kick_and_wait(&mut self, head: u32) -> AsmResult {
        let slot = self.avail % QSIZE;
        self.avail += 1;
        self.a().mov(word_ptr(AVAIL + 4 + 2 * slot), head)?;
        let idx = self.avail & 0xFFFF;
        self.a().mov(word_ptr(AVAIL + 2), idx)?;
        let notify = self.w.notify;
        self.a().mov(ebx, dword_ptr(notify))?;
        self.a().mov(word_ptr(ebx), 0u32)?;
        let flag = self.w.flag;
        self.a().mov(esi, flag)?;
        let w = self.wait_irq;
        self.a().call(w)?;
        Ok(())
    }

    /// Prints the request's status byte, and the used length of the latest used entry.
    fn report(&mut self, slot: u32, label: &str, used_len: bool) -> AsmResult {
        self.a().movzx(eax, byte_ptr(STATUS + slot))?;
        self.field(&format!("{label}.status"))?;
        if used_len {
            let entry = (self.avail - 1) % QSIZE;
            self.a().mov(eax, dword_ptr(USED + 8 + 8 * entry))?;
            self.field(&format!("{label}.used-len"))?;
        }
        self.a().movzx(eax, word_ptr(USED + 2))?;
        self.field(&format!("{label}.used-idx"))
    }

    /// Fills `bytes` at `buf` with the disk kernels' pattern.
    fn fill(&mut self, buf: u32, bytes: u32, seed: u32) -> AsmResult {
        emit_fill(self.a(), buf, bytes, seed)
    }

    /// Prints `label` = how many dwords differ between `a` and `b`.
    fn compare(&mut self, a: u32, b: u32, bytes: u32, label: &str) -> AsmResult {
        emit_count_differing(self.a(), a, b, bytes)?;
        self.field(label)
    }

    /// Resets the device, negotiates and sets up queue 0 with 16 entries, and zeroes the rings.
    fn setup(&mut self, print: bool) -> AsmResult {
        self.common_w8(0x14, 0)?;
        if print {
            self.common_r8(0x14)?;
            self.field("reset.status")?;
        }
        self.a().cld()?;
        self.a().xor(eax, eax)?;
        self.a().mov(edi, DESC)?;
        self.a().mov(ecx, 0x3000u32 / 4)?;
        self.a().rep().stosd()?;
        self.avail = 0;
        self.common_w8(0x14, 3)?;
        self.common_w32(0x00, 1)?;
        self.common_r32(0x04)?;
        if print {
            self.a().and(eax, 1u32)?;
            self.field("features.hi.version1")?;
        }
        self.common_w32(0x00, 0)?;
        self.common_r32(0x04)?;
        if print {
            self.a().and(eax, (1u32 << 28) | (1 << 9) | (1 << 5))?;
            self.field("features.lo.indirect-flush-ro")?;
        }
        self.common_w32(0x08, 0)?;
        self.common_w32(0x0C, (1 << 28) | (1 << 9))?;
        self.common_w32(0x08, 1)?;
        self.common_w32(0x0C, 1)?;
        self.common_w8(0x14, 0x0B)?;
        self.common_r8(0x14)?;
        if print {
            self.field("features-ok.status")?;
        }
        self.common_w16(0x16, 0)?;
        if print {
            self.common_r16(0x18)?;
            self.field("queue0.max-size")?;
        }
        self.common_w16(0x18, QSIZE)?;
        self.common_w32(0x20, DESC)?;
        self.common_w32(0x24, 0)?;
        self.common_w32(0x28, AVAIL)?;
        self.common_w32(0x2C, 0)?;
        self.common_w32(0x30, USED)?;
        self.common_w32(0x34, 0)?;
        // The notification address: notify base + queue_notify_off * multiplier.
        self.common_r16(0x1E)?;
        let mult = self.w.mult;
        self.a().imul_2(eax, dword_ptr(mult))?;
        self.base(2)?;
        self.a().add(eax, ebx)?;
        let notify = self.w.notify;
        self.a().mov(dword_ptr(notify), eax)?;
        self.common_w16(0x1C, 1)?;
        if print {
            self.common_r16(0x1C)?;
            self.field("queue0.enable")?;
        }
        self.common_w8(0x14, 0x0F)?;
        if print {
            self.common_r8(0x14)?;
            self.field("driver-ok.status")?;
        }
        Ok(())
    }
}

/// The `virtio-blk` kernel.
pub fn virtio_blk() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let words = k.data(&[0u8; 64]);
    let w = Words {
        cfg: words,
        ptrs: words + 4,
        mult: words + 28,
        notify: words + 32,
        flag: words + 36,
        count: words + 40,
        isr: words + 44,
    };
    let wait_irq = k.asm().create_label();
    let mut v = V {
        k,
        w,
        avail: 0,
        wait_irq,
    };
    let (idt, idtr) = v.k.descriptor_table(&[0u8; 256 * 8]);

    // wait_irq: ESI = flag; sleeps with interrupts enabled until the handler set it.
    {
        let mut over = v.a().create_label();
        let mut again = v.a().create_label();
        let mut done = v.a().create_label();
        v.a().jmp(over)?;
        let mut wl = v.wait_irq;
        v.a().set_label(&mut wl)?;
        v.wait_irq = wl;
        v.a().cli()?;
        v.a().set_label(&mut again)?;
        v.a().cmp(dword_ptr(esi), 0u32)?;
        v.a().jne(done)?;
        v.a().sti()?;
        v.a().hlt()?;
        v.a().cli()?;
        v.a().jmp(again)?;
        v.a().set_label(&mut done)?;
        v.a().mov(dword_ptr(esi), 0u32)?;
        v.a().ret()?;
        v.a().set_label(&mut over)?;
    }

    // The interrupt handler, on all sixteen PIC vectors (0x20-0x2F): reads the ISR status
    // (which acknowledges the device's interrupt), counts, flags, EOIs both PICs.
    {
        let mut over = v.a().create_label();
        v.a().call(over)?;
        v.a().push(eax)?;
        v.a().push(ebx)?;
        v.base(3)?;
        v.a().movzx(eax, byte_ptr(ebx))?;
        v.a().mov(dword_ptr(w.isr), eax)?;
        v.a().inc(dword_ptr(w.count))?;
        v.a().mov(dword_ptr(w.flag), 1u32)?;
        v.a().mov(al, 0x20u32)?;
        v.a().out(0xA0, al)?;
        v.a().out(0x20, al)?;
        v.a().pop(ebx)?;
        v.a().pop(eax)?;
        v.a().iretd()?;
        v.a().set_label(&mut over)?;
        v.a().pop(eax)?;
        v.a().mov(edx, eax)?;
        v.a().and(edx, 0xFFFF_0000u32)?;
        v.a().or(edx, 0x8E00u32)?;
        v.a().and(eax, 0xFFFFu32)?;
        v.a().or(eax, 0x0008_0000u32)?;
        for vector in 0x20..0x30u32 {
            v.a().mov(dword_ptr(idt + vector * 8), eax)?;
            v.a().mov(dword_ptr(idt + vector * 8 + 4), edx)?;
        }
        v.a().lidt(ptr(idtr))?;
    }

    // Find 1AF4:1042 on bus 0.
    {
        let mut next = v.a().create_label();
        let mut found = v.a().create_label();
        let mut scan = v.a().create_label();
        v.a().mov(ebx, 0x8000_0000u32)?;
        v.a().set_label(&mut scan)?;
        v.a().mov(eax, ebx)?;
        v.a().mov(dx, 0xCF8u32)?;
        v.a().out(dx, eax)?;
        v.a().mov(dx, 0xCFCu32)?;
        v.a().in_(eax, dx)?;
        v.a().cmp(eax, 0x1042_1AF4u32)?;
        v.a().je(found)?;
        v.a().set_label(&mut next)?;
        v.a().add(ebx, 0x800u32)?;
        v.a().cmp(ebx, 0x8001_0000u32)?;
        v.a().jb(scan)?;
        v.print("no virtio-blk device\n")?;
        v.k.exit(0x7F)?;
        v.a().set_label(&mut found)?;
        v.a().mov(dword_ptr(w.cfg), ebx)?;
        v.field("pci.id")?;
    }
    v.cfg_read(0x08)?;
    v.field("pci.class-revision")?;
    v.cfg_read(0x04)?;
    v.a().shr(eax, 16)?;
    v.a().and(eax, 0x10u32)?;
    v.field("pci.status.capabilities")?;
    v.cfg_read(0x3C)?;
    v.a().and(eax, 0xFFFFu32)?;
    v.field("pci.interrupt-pin-line")?;

    // Walk the capability list (at most 48 entries): record each virtio structure's address
    // as BAR base + offset, and the bitmask of the types seen.
    {
        let mut walk = v.a().create_label();
        let mut skip = v.a().create_label();
        let mut done = v.a().create_label();
        v.cfg_read(0x34)?;
        v.a().and(eax, 0xFCu32)?;
        v.a().mov(esi, eax)?;
        v.a().xor(edi, edi)?; // types seen
        v.a().push(48u32)?;
        v.a().set_label(&mut walk)?;
        v.a().test(esi, esi)?;
        v.a().jz(done)?;
        v.a().dec(dword_ptr(esp))?;
        v.a().jz(done)?;
        v.a().mov(ecx, esi)?;
        v.cfg_read_ecx()?;
        v.a().push(eax)?; // [esp] = id, next, len, type
        v.a().cmp(al, 0x09u32)?;
        v.a().jne(skip)?;
        // EBP = cfg_type; record it.
        v.a().mov(ebp, eax)?;
        v.a().shr(ebp, 24)?;
        v.a().bts(edi, ebp)?;
        v.a().cmp(ebp, 5u32)?;
        v.a().jae(skip)?;
        // ECX = BAR register of the structure.
        v.a().lea(ecx, dword_ptr(esi + 4))?;
        v.cfg_read_ecx()?;
        v.a().and(eax, 0xFFu32)?;
        v.a().lea(ecx, dword_ptr(eax * 4 + 0x10))?;
        v.cfg_read_ecx()?;
        v.a().and(eax, 0xFFFF_FFF0u32)?;
        v.a().mov(ebx, eax)?;
        v.a().lea(ecx, dword_ptr(esi + 8))?;
        v.cfg_read_ecx()?;
        v.a().add(ebx, eax)?;
        v.a().mov(dword_ptr(ebp * 4 + w.ptrs), ebx)?;
        v.a().cmp(ebp, 2u32)?;
        v.a().jne(skip)?;
        v.a().lea(ecx, dword_ptr(esi + 16))?;
        v.cfg_read_ecx()?;
        v.a().mov(dword_ptr(w.mult), eax)?;
        v.a().set_label(&mut skip)?;
        v.a().pop(eax)?;
        v.a().shr(eax, 8)?;
        v.a().and(eax, 0xFCu32)?;
        v.a().mov(esi, eax)?;
        v.a().jmp(walk)?;
        v.a().set_label(&mut done)?;
        v.a().pop(eax)?;
        v.a().mov(eax, edi)?;
        v.a().and(eax, 0x1Eu32)?;
        v.field("virtio.structures")?;
    }

    // PICs: vectors 0x20/0x28, the device's line level-triggered (ELCR) and the only one
    // unmasked with the cascade.
    init_pics(v.a(), (0x20, 0x28), (0xFF, 0xFF))?;
    v.cfg_read(0x3C)?;
    v.a().movzx(ecx, al)?;
    v.a().mov(eax, 1u32)?;
    v.a().shl(eax, cl)?;
    v.a().mov(ebx, eax)?;
    v.a().mov(dx, 0x4D0u32)?;
    v.a().out(dx, al)?;
    v.a().mov(al, ah)?;
    v.a().mov(dx, 0x4D1u32)?;
    v.a().out(dx, al)?;
    v.a().mov(eax, ebx)?;
    v.a().not(eax)?;
    v.a().and(eax, 0xFFFBu32)?;
    v.a().out(0x21, al)?;
    v.a().mov(al, ah)?;
    v.a().out(0xA1, al)?;
    // Memory decoding and bus mastering.
    v.cfg_write(0x04, 0x0006)?;

    v.print("setup\n")?;
    v.setup(true)?;
    v.base(4)?;
    v.a().mov(eax, dword_ptr(ebx))?;
    v.field("config.capacity")?;
    v.a().mov(eax, dword_ptr(ebx + 0x14))?;
    v.field("config.blk-size")?;

    v.print("IN sector 0\n")?;
    let h = v.header(0, 0, 0)?;
    v.desc(DESC, 0, h, 16, F_NEXT, 1)?;
    v.desc(DESC, 1, BUF_A, 512, F_NEXT | F_WRITE, 2)?;
    v.desc(DESC, 2, STATUS, 1, F_WRITE, 0)?;
    v.kick_and_wait(0)?;
    v.report(0, "  in", true)?;
    v.a().mov(eax, dword_ptr(BUF_A))?;
    v.field("  dword0")?;

    v.print("OUT 2 sectors from 2 buffers, FLUSH\n")?;
    v.fill(BUF_B, 1024, VIRTIO_SEED)?;
    let h = v.header(1, 1, VIRTIO_WRITE_SECTOR as u32)?;
    v.desc(DESC, 3, h, 16, F_NEXT, 4)?;
    v.desc(DESC, 4, BUF_B, 512, F_NEXT, 5)?;
    v.desc(DESC, 5, BUF_B + 512, 512, F_NEXT, 6)?;
    v.desc(DESC, 6, STATUS + 1, 1, F_WRITE, 0)?;
    v.kick_and_wait(3)?;
    v.report(1, "  out", true)?;
    let h = v.header(2, 4, 0)?;
    v.desc(DESC, 7, h, 16, F_NEXT, 8)?;
    v.desc(DESC, 8, STATUS + 2, 1, F_WRITE, 0)?;
    v.kick_and_wait(7)?;
    v.report(2, "  flush", true)?;

    v.print("IN the 2 sectors through an indirect table\n")?;
    let h = v.header(3, 0, VIRTIO_WRITE_SECTOR as u32)?;
    v.desc(INDIRECT, 0, h, 16, F_NEXT, 1)?;
    v.desc(INDIRECT, 1, BUF_C, 1024, F_NEXT | F_WRITE, 2)?;
    v.desc(INDIRECT, 2, STATUS + 3, 1, F_WRITE, 0)?;
    v.desc(DESC, 9, INDIRECT, 48, F_INDIRECT, 0)?;
    v.kick_and_wait(9)?;
    v.report(3, "  indirect", true)?;
    v.compare(BUF_B, BUF_C, 1024, "  differing-dwords")?;

    v.print("GET_ID, an unsupported type, IN past the end\n")?;
    let h = v.header(4, 8, 0)?;
    v.desc(DESC, 10, h, 16, F_NEXT, 11)?;
    v.desc(DESC, 11, BUF_A, 20, F_NEXT | F_WRITE, 12)?;
    v.desc(DESC, 12, STATUS + 4, 1, F_WRITE, 0)?;
    v.kick_and_wait(10)?;
    v.report(4, "  get-id", false)?;
    let h = v.header(5, 0x1234, 0)?;
    v.desc(DESC, 13, h, 16, F_NEXT, 14)?;
    v.desc(DESC, 14, STATUS + 5, 1, F_WRITE, 0)?;
    v.kick_and_wait(13)?;
    v.report(5, "  unsupported", true)?;
    let h = v.header(6, 0, VIRTIO_SECTORS as u32)?;
    v.desc(DESC, 0, h, 16, F_NEXT, 1)?;
    v.desc(DESC, 1, BUF_A, 512, F_NEXT | F_WRITE, 2)?;
    v.desc(DESC, 2, STATUS + 6, 1, F_WRITE, 0)?;
    v.kick_and_wait(0)?;
    v.report(6, "  past-end", false)?;

    v.print("a looping chain\n")?;
    let h = v.header(7, 0, 0)?;
    v.desc(DESC, 3, h, 16, F_NEXT, 4)?;
    v.desc(DESC, 4, BUF_A, 512, F_NEXT, 3)?;
    v.kick_and_wait(3)?;
    // QEMU sets both ISR bits for a configuration change; the specification defines bit 1.
    v.a().mov(eax, dword_ptr(w.isr))?;
    v.a().and(eax, 2u32)?;
    v.field("  isr.config")?;
    v.common_r8(0x14)?;
    v.field("  status")?;

    v.print("reset, set up again, IN sector 0\n")?;
    v.setup(false)?;
    v.common_r8(0x14)?;
    v.field("  status")?;
    v.a().mov(dword_ptr(BUF_A), 0u32)?;
    let h = v.header(0, 0, 0)?;
    v.desc(DESC, 0, h, 16, F_NEXT, 1)?;
    v.desc(DESC, 1, BUF_A, 512, F_NEXT | F_WRITE, 2)?;
    v.desc(DESC, 2, STATUS, 1, F_WRITE, 0)?;
    v.kick_and_wait(0)?;
    v.report(0, "  in", true)?;
    v.a().mov(eax, dword_ptr(BUF_A))?;
    v.field("  dword0")?;
    v.a().mov(eax, dword_ptr(w.count))?;
    v.field("interrupts")?;
    v.k.exit(0x32)?;
    v.k.build()
}
