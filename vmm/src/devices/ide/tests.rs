//! Unit tests of the IDE controller against shared in-memory backends, driving the ports the
//! way a driver does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use vmdriver::MemoryLayout;

use super::*;
use crate::block::{BlockBackend, BlockError, IoNotifier, check_range};

/// A RAM disk whose bytes and flush count the test can still see after handing it over.
#[derive(Clone)]
struct SharedDisk {
    data: Arc<Mutex<Vec<u8>>>,
    flushes: Arc<AtomicU64>,
    read_only: bool,
}

impl SharedDisk {
    fn new(bytes: usize) -> Self {
        let data: Vec<u8> = (0..bytes).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
        Self {
            data: Arc::new(Mutex::new(data)),
            flushes: Arc::default(),
            read_only: false,
        }
    }
    fn bytes(&self, offset: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[offset..offset + len].to_vec()
    }
}

impl BlockBackend for SharedDisk {
    fn name(&self) -> &str {
        "shared"
    }
    fn len(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let d = self.data.lock().unwrap();
        check_range("shared", offset, buf.len(), d.len() as u64)?;
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        let mut d = self.data.lock().unwrap();
        check_range("shared", offset, data.len(), d.len() as u64)?;
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

struct Rig {
    ide: SharedIde,
    cmd: [IdePorts; 2],
    ctl: [IdePorts; 2],
    bm: IdePorts,
    irq: [IrqLine; 2],
    memory: Arc<GuestMemory>,
    notifier: IoNotifier,
}

const PRD: u32 = 0x1000;

impl Rig {
    fn new(drives: [Option<(Box<dyn BlockBackend>, Media)>; 4]) -> Self {
        let memory = Arc::new(GuestMemory::new(MemoryLayout::new(4).unwrap()).unwrap());
        let notifier = IoNotifier::new();
        let drives = drives.map(|d| {
            d.map(|(b, media)| DriveConfig {
                queue: BlockQueue::spawn(b, notifier.clone()).unwrap(),
                media,
            })
        });
        let irq = [IrqLine::new(14), IrqLine::new(15)];
        let ide = Arc::new(Mutex::new(Ide::new(memory.clone(), irq.clone(), drives)));
        ide.lock().unwrap().set_bus_master_enabled(true);
        let port = |k| IdePorts::new(ide.clone(), k);
        Self {
            cmd: [port(IdePortKind::Command(0)), port(IdePortKind::Command(1))],
            ctl: [port(IdePortKind::Control(0)), port(IdePortKind::Control(1))],
            bm: port(IdePortKind::BusMaster),
            ide,
            irq,
            memory,
            notifier,
        }
    }

    fn disk(disk: &SharedDisk) -> Self {
        Self::new([
            Some((Box::new(disk.clone()), Media::Disk)),
            None,
            None,
            None,
        ])
    }

    fn out(&mut self, ch: usize, reg: u64, v: u8) {
        self.cmd[ch].write(reg, &[v]);
    }
    fn inb(&mut self, ch: usize, reg: u64) -> u8 {
        let mut b = [0u8];
        self.cmd[ch].read(reg, &mut b);
        b[0]
    }
    fn alt(&mut self, ch: usize) -> u8 {
        let mut b = [0u8];
        self.ctl[ch].read(0, &mut b);
        b[0]
    }

    /// Lets the I/O threads finish until the selected drive is not busy.
    fn settle(&mut self, ch: usize) -> u8 {
        for _ in 0..10_000 {
            self.ide.lock().unwrap().poll();
            let s = self.alt(ch);
            if s & status::BSY == 0 {
                return s;
            }
            self.notifier.wait(Duration::from_millis(10));
            self.notifier.take();
        }
        panic!("drive stayed busy");
    }

    fn lba48(&mut self, ch: usize, lba: u64, count: u16) {
        let l = lba.to_le_bytes();
        let c = count.to_le_bytes();
        for (reg, hi, lo) in [
            (2, c[1], c[0]),
            (3, l[3], l[0]),
            (4, l[4], l[1]),
            (5, l[5], l[2]),
        ] {
            self.out(ch, reg, hi);
            self.out(ch, reg, lo);
        }
        self.out(ch, 6, 0x40);
    }

    fn lba28(&mut self, ch: usize, lba: u32, count: u8) {
        let l = lba.to_le_bytes();
        self.out(ch, 2, count);
        self.out(ch, 3, l[0]);
        self.out(ch, 4, l[1]);
        self.out(ch, 5, l[2]);
        self.out(ch, 6, 0xE0 | (l[3] & 0x0F));
    }

    fn read_words(&mut self, ch: usize, bytes: usize) -> Vec<u8> {
        let mut v = Vec::new();
        for _ in 0..bytes / 2 {
            let mut w = [0u8; 2];
            self.cmd[ch].read(0, &mut w);
            v.extend_from_slice(&w);
        }
        v
    }

    fn write_words(&mut self, ch: usize, data: &[u8]) {
        for w in data.chunks(2) {
            self.cmd[ch].write(0, w);
        }
    }

    fn raised(&self, ch: usize) -> u64 {
        self.irq[ch].raised()
    }

    /// Clears INTRQ (reads status), as an interrupt handler does.
    fn ack(&mut self, ch: usize) -> u8 {
        self.inb(ch, 7)
    }

    fn prd(&self, entries: &[(u32, u16, bool)]) {
        for (i, (addr, len, eot)) in entries.iter().enumerate() {
            let mut e = addr.to_le_bytes().to_vec();
            e.extend_from_slice(&len.to_le_bytes());
            e.extend_from_slice(&[0, if *eot { 0x80 } else { 0 }]);
            self.memory
                .write(u64::from(PRD) + 8 * i as u64, &e)
                .unwrap();
        }
    }

    fn start_bm(&mut self, ch: usize, to_memory: bool) {
        let base = 8 * ch as u64;
        self.bm.write(base + 4, &PRD.to_le_bytes());
        self.bm.write(base, &[if to_memory { 0x09 } else { 0x01 }]);
    }

    fn bm_status(&mut self, ch: usize) -> u8 {
        let mut b = [0u8];
        self.bm.read(8 * ch as u64 + 2, &mut b);
        b[0]
    }
}

const SECTORS: usize = 2048;

#[test]
fn power_on_signature_and_status() {
    let disk = SharedDisk::new(SECTORS * 512);
    let cd = SharedDisk::new(64 * 2048);
    let mut r = Rig::new([
        Some((Box::new(disk), Media::Disk)),
        None,
        Some((Box::new(cd), Media::Cdrom)),
        None,
    ]);
    assert_eq!(r.inb(0, 7), status::DRDY | status::DSC);
    assert_eq!(
        (
            r.inb(0, 1),
            r.inb(0, 2),
            r.inb(0, 3),
            r.inb(0, 4),
            r.inb(0, 5)
        ),
        (1, 1, 1, 0, 0)
    );
    assert_eq!((r.inb(1, 4), r.inb(1, 5), r.inb(1, 7)), (0x14, 0xEB, 0));
    // The absent slave: status 0.
    r.out(0, 6, 0xB0);
    assert_eq!(r.inb(0, 7), 0);
    assert_eq!(r.alt(0), 0);
}

#[test]
fn identify_reports_geometry_capacity_and_features() {
    let disk = SharedDisk::new(SECTORS * 512);
    let mut r = Rig::disk(&disk);
    r.out(0, 6, 0xA0);
    r.out(0, 7, 0xEC);
    assert_eq!(r.raised(0), 1);
    assert_eq!(r.alt(0), status::DRDY | status::DSC | status::DRQ);
    let id = r.read_words(0, 512);
    let w = |i: usize| u16::from_le_bytes([id[2 * i], id[2 * i + 1]]);
    assert_eq!((w(1), w(3), w(6)), (2, 16, 63));
    assert_eq!(u32::from(w(60)) | u32::from(w(61)) << 16, SECTORS as u32);
    assert_eq!(w(100), SECTORS as u16);
    assert_eq!(w(83) & 0x3400, 0x3400, "LBA48 and both flushes");
    assert_eq!(w(49) & 0x0300, 0x0300, "LBA and DMA");
    assert_eq!(w(47) & 0xFF, 16);
    assert_eq!(
        &id[54..66],
        b"TB68H RADDSI",
        "ATA strings: first character in the high byte"
    );
    assert_eq!(id.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    assert_eq!(id[510], 0xA5);
    // Data-in ends without another interrupt.
    assert_eq!(r.alt(0), status::DRDY | status::DSC);
    assert_eq!(r.raised(0), 1);
}

#[test]
fn pio_reads_lba28_and_lba48_and_interrupts_per_block() {
    let disk = SharedDisk::new(SECTORS * 512);
    let mut r = Rig::disk(&disk);
    r.lba28(0, 5, 2);
    r.out(0, 7, 0x20);
    r.settle(0);
    assert_eq!(r.raised(0), 1);
    r.ack(0);
    let first = r.read_words(0, 512);
    assert_eq!(first, disk.bytes(5 * 512, 512));
    r.settle(0);
    assert_eq!(r.raised(0), 2, "second block interrupts");
    r.ack(0);
    assert_eq!(r.read_words(0, 512), disk.bytes(6 * 512, 512));
    assert_eq!(r.alt(0), status::DRDY | status::DSC);
    // LBA48 at the last sector.
    r.lba48(0, SECTORS as u64 - 1, 1);
    r.out(0, 7, 0x24);
    r.settle(0);
    r.ack(0);
    assert_eq!(r.read_words(0, 512), disk.bytes((SECTORS - 1) * 512, 512));
}

#[test]
fn out_of_range_is_idnf_and_hob_reads_the_previous_bytes() {
    let disk = SharedDisk::new(SECTORS * 512);
    let mut r = Rig::disk(&disk);
    r.lba48(0, SECTORS as u64, 1);
    r.out(0, 7, 0x24);
    assert_eq!(r.ack(0), status::DRDY | status::ERR);
    assert_eq!(r.inb(0, 1), error::IDNF, "ATA-6: IDNF, not ABRT");
    r.lba48(0, 0x0123_4567_89AB, 1);
    r.cmd[0].write(0, &[0, 0]); // nothing happens: no transfer
    assert_eq!(r.inb(0, 3), 0xAB);
    r.ctl[0].write(0, &[0x80]);
    assert_eq!((r.inb(0, 3), r.inb(0, 4), r.inb(0, 5)), (0x45, 0x23, 0x01));
    // Writing a register clears HOB.
    r.out(0, 2, 1);
    assert_eq!(r.inb(0, 3), 0xAB);
}

#[test]
fn pio_write_multiple_then_flush_reaches_the_backend_before_completion() {
    let disk = SharedDisk::new(SECTORS * 512);
    let mut r = Rig::disk(&disk);
    r.out(0, 6, 0xE0);
    // READ MULTIPLE before SET MULTIPLE MODE aborts.
    r.out(0, 7, 0xC4);
    assert_eq!(r.inb(0, 1), error::ABRT);
    r.out(0, 2, 3);
    r.out(0, 7, 0xC6);
    assert_eq!(r.inb(0, 1), error::ABRT, "not a power of two");
    r.out(0, 2, 4);
    r.out(0, 7, 0xC6);
    assert_eq!(r.ack(0), status::DRDY | status::DSC);
    let pattern: Vec<u8> = (0..6 * 512).map(|i| (i * 7 + 3) as u8).collect();
    r.lba28(0, 100, 6);
    let before = r.raised(0);
    r.out(0, 7, 0xC5);
    assert_eq!(r.alt(0) & status::DRQ, status::DRQ);
    assert_eq!(r.raised(0), before, "no interrupt before the first block");
    r.write_words(0, &pattern[..4 * 512]);
    r.settle(0);
    assert_eq!(r.raised(0), before + 1);
    r.ack(0);
    // The second block is the remaining two sectors.
    r.write_words(0, &pattern[4 * 512..]);
    assert_eq!(r.settle(0), status::DRDY | status::DSC);
    assert_eq!(r.raised(0), before + 2);
    assert_eq!(disk.bytes(100 * 512, 6 * 512), pattern);
    r.ack(0);
    r.out(0, 7, 0xE7);
    assert_eq!(r.settle(0), status::DRDY | status::DSC);
    assert_eq!(disk.flushes.load(Ordering::Relaxed), 1);
    assert_eq!(r.raised(0), before + 3);
}

#[test]
fn write_cache_off_makes_every_write_durable() {
    let disk = SharedDisk::new(SECTORS * 512);
    let mut r = Rig::disk(&disk);
    r.out(0, 1, 0x82);
    r.out(0, 7, 0xEF);
    assert_eq!(r.ack(0), status::DRDY | status::DSC);
    r.lba28(0, 1, 1);
    r.out(0, 7, 0x30);
    r.write_words(0, &[0x55; 512]);
    r.settle(0);
    assert_eq!(disk.flushes.load(Ordering::Relaxed), 1);
}

#[test]
fn read_only_disks_abort_writes() {
    let mut disk = SharedDisk::new(SECTORS * 512);
    disk.read_only = true;
    let mut r = Rig::disk(&disk);
    for cmd in [0x30, 0xCA, 0x35] {
        r.lba28(0, 0, 1);
        r.out(0, 7, cmd);
        assert_eq!(r.ack(0), status::DRDY | status::ERR, "{cmd:#x}");
        assert_eq!(r.inb(0, 1), error::ABRT);
    }
}

#[test]
fn dma_read_and_write_through_prd_tables() {
    let disk = SharedDisk::new(SECTORS * 512);
    let mut r = Rig::disk(&disk);
    // 3 sectors read into two regions: 1024 bytes at 0x20000, 512 at 0x30000.
    r.prd(&[(0x2_0000, 1024, false), (0x3_0000, 512, true)]);
    r.lba28(0, 10, 3);
    r.out(0, 7, 0xC8);
    r.start_bm(0, true);
    r.settle(0);
    assert_eq!(r.raised(0), 1);
    let bm = r.bm_status(0);
    assert_eq!(bm & 0x07, bm_status::INTERRUPT, "done, not active: {bm:#x}");
    let mut got = vec![0u8; 1536];
    r.memory.read(0x2_0000, &mut got[..1024]).unwrap();
    r.memory.read(0x3_0000, &mut got[1024..]).unwrap();
    assert_eq!(got, disk.bytes(10 * 512, 1536));
    r.ack(0);
    r.bm.write(0, &[0]);
    r.bm.write(2, &[bm_status::INTERRUPT]);
    assert_eq!(r.bm_status(0) & 0x07, 0);
    // Write DMA (EXT) from guest memory; the bus master is started before the command.
    r.memory.fill(0x4_0000, 1024, 0xC3).unwrap();
    r.prd(&[(0x4_0000, 1024, true)]);
    r.start_bm(0, false);
    r.lba48(0, 1000, 2);
    r.out(0, 7, 0x35);
    assert_eq!(r.settle(0), status::DRDY | status::DSC);
    assert_eq!(disk.bytes(1000 * 512, 1024), vec![0xC3; 1024]);
}

/// A megabyte moved by DMA is one request to the I/O thread each way: per-request round trips
/// through the I/O thread are what limits throughput (a guest's O_DIRECT megabyte used to cost
/// sixteen of them).
#[test]
fn a_megabyte_of_dma_is_one_medium_request() {
    let disk = SharedDisk::new(SECTORS * 512);
    let mut r = Rig::disk(&disk);
    let table: Vec<_> = (0..16u32)
        .map(|i| (0x10_0000 + i * 0x1_0000, 0, i == 15)) // 0: a 64 KiB region
        .collect();
    r.memory.fill(0x10_0000, 1 << 20, 0x5A).unwrap();
    r.prd(&table);
    r.start_bm(0, false);
    r.lba48(0, 0, SECTORS as u16);
    r.out(0, 7, 0x35); // WRITE DMA EXT
    assert_eq!(r.settle(0), status::DRDY | status::DSC);
    assert_eq!(disk.bytes(0, 1 << 20), vec![0x5A; 1 << 20]);
    let [_, writes, _, _, written] = r.ide.lock().unwrap().drive_stats()[0].1;
    assert_eq!((writes, written), (1, 1 << 20));

    r.ack(0);
    r.bm.write(0, &[0]);
    r.bm.write(2, &[bm_status::INTERRUPT]);
    r.memory.fill(0x10_0000, 1 << 20, 0).unwrap();
    r.prd(&table);
    r.lba48(0, 0, SECTORS as u16);
    r.out(0, 7, 0x25); // READ DMA EXT
    r.start_bm(0, true);
    r.settle(0);
    let mut got = vec![0u8; 1 << 20];
    r.memory.read(0x10_0000, &mut got).unwrap();
    assert_eq!(got, vec![0x5A; 1 << 20]);
    let [reads, _, _, read, _] = r.ide.lock().unwrap().drive_stats()[0].1;
    assert_eq!((reads, read), (1, 1 << 20));
}

#[test]
fn a_short_prd_table_fails_the_command_and_a_long_one_stays_active() {
    let disk = SharedDisk::new(SECTORS * 512);
    let mut r = Rig::disk(&disk);
    r.prd(&[(0x2_0000, 512, true)]);
    r.lba28(0, 0, 2);
    r.out(0, 7, 0xC8);
    r.start_bm(0, true);
    let s = r.settle(0);
    assert_eq!(s & status::ERR, status::ERR);
    assert_eq!(r.bm_status(0) & bm_status::ERROR, bm_status::ERROR);
    r.bm.write(0, &[0]);
    r.bm.write(2, &[0x06]);
    r.prd(&[(0x2_0000, 2048, true)]);
    r.lba28(0, 0, 1);
    r.out(0, 7, 0xC8);
    r.start_bm(0, true);
    r.settle(0);
    let bm = r.bm_status(0);
    assert_eq!(
        bm & 0x07,
        bm_status::INTERRUPT | bm_status::ACTIVE,
        "{bm:#x}"
    );
}

#[test]
fn dma_to_memory_outside_ram_is_a_bus_master_error_not_a_crash() {
    let disk = SharedDisk::new(SECTORS * 512);
    let mut r = Rig::disk(&disk);
    r.prd(&[(0xFEC0_0000, 512, true)]);
    r.lba28(0, 0, 1);
    r.out(0, 7, 0xC8);
    r.start_bm(0, true);
    r.settle(0);
    assert_eq!(r.bm_status(0) & bm_status::ERROR, bm_status::ERROR);
}

#[test]
fn nien_masks_the_line_and_status_reads_clear_intrq() {
    let disk = SharedDisk::new(SECTORS * 512);
    let mut r = Rig::disk(&disk);
    r.ctl[0].write(0, &[0x02]);
    r.out(0, 7, 0xE7);
    r.settle(0);
    assert_eq!(r.raised(0), 0, "nIEN");
    r.ctl[0].write(0, &[0x00]);
    assert_eq!(r.raised(0), 1, "INTRQ still pending shows when nIEN clears");
    // Alternate status leaves INTRQ pending: masking and unmasking shows it again.
    r.alt(0);
    r.ctl[0].write(0, &[0x02]);
    r.ctl[0].write(0, &[0x00]);
    assert_eq!(r.raised(0), 2, "alternate status does not clear INTRQ");
    // Status does.
    r.ack(0);
    r.ctl[0].write(0, &[0x02]);
    r.ctl[0].write(0, &[0x00]);
    assert_eq!(r.raised(0), 2, "status clears INTRQ");
    // Writing the command register clears it too, and the next completion is a new edge.
    r.out(0, 7, 0xE7);
    r.settle(0);
    assert_eq!(r.raised(0), 3);
}

#[test]
fn srst_resets_to_the_signature_and_cancels_the_command() {
    let disk = SharedDisk::new(SECTORS * 512);
    let mut r = Rig::disk(&disk);
    r.lba28(0, 9, 2);
    r.out(0, 7, 0x30);
    assert_eq!(r.alt(0) & status::DRQ, status::DRQ);
    r.ctl[0].write(0, &[0x04]);
    assert_eq!(r.alt(0), status::BSY);
    r.ctl[0].write(0, &[0x00]);
    assert_eq!(r.alt(0), status::DRDY | status::DSC);
    assert_eq!((r.inb(0, 1), r.inb(0, 2), r.inb(0, 3)), (1, 1, 1));
    r.write_words(0, &[1; 512]);
    assert_eq!(
        disk.bytes(9 * 512, 512),
        SharedDisk::new(SECTORS * 512).bytes(9 * 512, 512)
    );
}

#[test]
fn chs_addressing_uses_the_current_geometry() {
    let disk = SharedDisk::new(SECTORS * 512);
    let mut r = Rig::disk(&disk);
    // Cylinder 1, head 2, sector 3 with 16 heads and 63 sectors: (1*16+2)*63+2.
    r.out(0, 2, 1);
    r.out(0, 3, 3);
    r.out(0, 4, 1);
    r.out(0, 5, 0);
    r.out(0, 6, 0xA2);
    r.out(0, 7, 0x20);
    r.settle(0);
    let lba = (16 + 2) * 63 + 2;
    assert_eq!(r.read_words(0, 512), disk.bytes(lba * 512, 512));
    // INITIALIZE DEVICE PARAMETERS: 4 heads, 32 sectors.
    r.out(0, 2, 32);
    r.out(0, 6, 0xA3);
    r.out(0, 7, 0x91);
    assert_eq!(r.ack(0), status::DRDY | status::DSC);
    r.out(0, 2, 1);
    r.out(0, 3, 1);
    r.out(0, 4, 2);
    r.out(0, 6, 0xA1);
    r.out(0, 7, 0x20);
    r.settle(0);
    assert_eq!(
        r.read_words(0, 512),
        disk.bytes(((2 * 4 + 1) * 32) * 512, 512)
    );
}

fn cd_rig(cd: &SharedDisk) -> Rig {
    Rig::new([None, None, Some((Box::new(cd.clone()), Media::Cdrom)), None])
}

fn packet(r: &mut Rig, cdb: &[u8], limit: u16, dma: bool) {
    let mut c = [0u8; 12];
    c[..cdb.len()].copy_from_slice(cdb);
    r.out(1, 6, 0xA0);
    r.out(1, 1, u8::from(dma));
    r.out(1, 4, limit as u8);
    r.out(1, 5, (limit >> 8) as u8);
    r.out(1, 7, 0xA0);
    assert_eq!(r.alt(1) & status::DRQ, status::DRQ);
    assert_eq!(r.inb(1, 2), 1, "C/D: waiting for the packet");
    r.write_words(1, &c);
}

#[test]
fn atapi_identify_packet_and_abort_with_signature() {
    let cd = SharedDisk::new(64 * 2048);
    let mut r = cd_rig(&cd);
    r.out(1, 6, 0xA0);
    r.out(1, 7, 0xEC);
    assert_eq!(r.ack(1) & status::ERR, status::ERR);
    assert_eq!((r.inb(1, 4), r.inb(1, 5)), (0x14, 0xEB));
    r.out(1, 7, 0xA1);
    let id = r.read_words(1, 512);
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), 0x85C0);
}

#[test]
fn atapi_pio_read_splits_by_the_byte_count_limit() {
    let cd = SharedDisk::new(64 * 2048);
    let mut r = cd_rig(&cd);
    // First command: the power-on unit attention.
    packet(&mut r, &[0x00], 0, false);
    assert_eq!(r.ack(1), status::DRDY | status::ERR);
    assert_eq!(r.inb(1, 1), 0x60, "UNIT ATTENTION in the sense key bits");
    assert_eq!(r.inb(1, 2), 3, "I/O and C/D: status");
    packet(&mut r, &[0x00], 0, false);
    assert_eq!(r.ack(1), status::DRDY | status::DSC);
    // READ(10) of 2 blocks from LBA 3 with a 3000-byte limit: 3000, 1096.
    packet(&mut r, &[0x28, 0, 0, 0, 0, 3, 0, 0, 2], 3000, false);
    r.settle(1);
    r.ack(1);
    let mut got = Vec::new();
    for expect in [3000usize, 1096] {
        assert_eq!(r.inb(1, 2), 2, "data to host");
        let n = usize::from(r.inb(1, 4)) | usize::from(r.inb(1, 5)) << 8;
        assert_eq!(n, expect);
        got.extend(r.read_words(1, n));
        r.settle(1);
        r.ack(1);
    }
    assert_eq!(got, cd.bytes(3 * 2048, 4096));
    assert_eq!(r.inb(1, 2), 3);
    assert_eq!(r.alt(1), status::DRDY | status::DSC);
}

#[test]
fn atapi_dma_read_and_sense_after_an_error() {
    let cd = SharedDisk::new(64 * 2048);
    let mut r = cd_rig(&cd);
    packet(&mut r, &[0x00], 0, false);
    r.ack(1);
    r.prd(&[(0x2_0000, 4096, true)]);
    packet(&mut r, &[0x28, 0, 0, 0, 0, 62, 0, 0, 2], 0, true);
    r.start_bm(1, true);
    assert_eq!(r.settle(1), status::DRDY | status::DSC);
    let mut got = vec![0u8; 4096];
    r.memory.read(0x2_0000, &mut got).unwrap();
    assert_eq!(got, cd.bytes(62 * 2048, 4096));
    assert_eq!(r.bm_status(1) & 0x07, bm_status::INTERRUPT);
    // Past the end: ILLEGAL REQUEST, then REQUEST SENSE says why.
    packet(&mut r, &[0x28, 0, 0, 0, 0, 63, 0, 0, 2], 0, false);
    assert_eq!(r.inb(1, 1), 0x50);
    packet(&mut r, &[0x03, 0, 0, 0, 18], 18, false);
    let sense = r.read_words(1, 18);
    assert_eq!((sense[2], sense[12]), (5, 0x21));
}

/// A disk whose reads wait until the test opens a gate: a slow host disk.
struct Gated {
    inner: SharedDisk,
    gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
}

impl BlockBackend for Gated {
    fn name(&self) -> &str {
        "gated"
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let (lock, cv) = &*self.gate;
        let mut open = lock.lock().unwrap();
        while !*open {
            open = cv.wait(open).unwrap();
        }
        drop(open);
        self.inner.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        self.inner.write_at(offset, data)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        Ok(())
    }
}

#[test]
fn a_slow_disk_keeps_the_drive_busy_but_never_blocks_the_vcpu() {
    let disk = SharedDisk::new(SECTORS * 512);
    let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let gated = Gated {
        inner: disk.clone(),
        gate: gate.clone(),
    };
    let mut r = Rig::new([Some((Box::new(gated), Media::Disk)), None, None, None]);
    r.lba28(0, 3, 1);
    // The command write returns while the read waits on the host: the guest sees BSY and
    // keeps running (were the read done on this thread, this call would never return).
    r.out(0, 7, 0x20);
    for _ in 0..3 {
        r.ide.lock().unwrap().poll();
        assert_eq!(r.alt(0) & status::BSY, status::BSY);
    }
    assert!(r.ide.lock().unwrap().in_flight());
    assert_eq!(r.raised(0), 0);
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    assert_eq!(r.settle(0), status::DRDY | status::DSC | status::DRQ);
    assert_eq!(r.raised(0), 1);
    assert_eq!(r.read_words(0, 512), disk.bytes(3 * 512, 512));
}

/// Both channels come up decoding (IDETIM bit 15), as firmware leaves them: Linux's ata_piix
/// ignores a channel whose decode enable bit is clear.
#[test]
fn both_channels_decode_as_firmware_leaves_them() {
    let memory = Arc::new(GuestMemory::new(MemoryLayout::new(4).unwrap()).unwrap());
    let ide = Arc::new(Mutex::new(Ide::new(
        memory,
        [IrqLine::new(14), IrqLine::new(15)],
        [None, None, None, None],
    )));
    let f = PiixIde::new(ide);
    let mut idetim = [0u8; 4];
    f.config().read(0x40, &mut idetim);
    assert_eq!(u16::from_le_bytes([idetim[0], idetim[1]]) & 0x8000, 0x8000);
    assert_eq!(u16::from_le_bytes([idetim[2], idetim[3]]) & 0x8000, 0x8000);
}
