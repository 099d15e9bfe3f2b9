//! The virtio-blk device driven through its BAR the way a driver does (virtio 1.2 section 3.1's
//! initialization sequence), against an in-memory backend.

use std::sync::atomic::Ordering;
use std::time::Duration;

use vmdriver::MemoryLayout;

use super::*;
use crate::block::{IoNotifier, MemoryBackend};
use crate::devices::PciIntxWire;
use crate::devices::virtqueue::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

const DESC: u64 = 0x1_0000;
const AVAIL: u64 = 0x1_1000;
const USED: u64 = 0x1_2000;
const HDR: u64 = 0x2_0000;
const STATUS: u64 = 0x2_1000;
const BUF: u64 = 0x10_0000;
const QSIZE: u16 = 16;

struct Rig {
    dev: VirtioBlk,
    mem: Arc<GuestMemory>,
    wire: PciIntxWire,
    notifier: IoNotifier,
    avail_idx: u16,
    flushes: Arc<std::sync::atomic::AtomicU64>,
}

fn w32(d: &mut VirtioBlk, off: u64, v: u32) {
    d.bar_write(layout::COMMON + off, &v.to_le_bytes());
}
fn w16(d: &mut VirtioBlk, off: u64, v: u16) {
    d.bar_write(layout::COMMON + off, &v.to_le_bytes());
}
fn r32(d: &mut VirtioBlk, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.bar_read(off, &mut b);
    u32::from_le_bytes(b)
}
fn r8(d: &mut VirtioBlk, off: u64) -> u8 {
    let mut b = [0u8; 1];
    d.bar_read(off, &mut b);
    b[0]
}

fn rig_with(data: Vec<u8>, read_only: bool) -> Rig {
    let mem = Arc::new(GuestMemory::new(MemoryLayout::new(64).unwrap()).unwrap());
    let backend = MemoryBackend::new("ram", data, read_only);
    let flushes = backend.flush_counter();
    let notifier = IoNotifier::new();
    let queue = BlockQueue::spawn(Box::new(backend), notifier.clone()).unwrap();
    let wire = PciIntxWire::new(11, None);
    let mut dev = VirtioBlk::new(mem.clone(), queue, wire.pin(3), "SERIAL-1".into());
    dev.command_written(COMMAND_BUS_MASTER);
    let mut r = Rig {
        dev,
        mem,
        wire,
        notifier,
        avail_idx: 0,
        flushes,
    };
    r.init(feature::VERSION_1 | feature::FLUSH | feature::INDIRECT_DESC);
    r
}

fn rig() -> Rig {
    let data = (0..4 << 20)
        .map(|i: u32| (i / 512) as u8 ^ i as u8)
        .collect();
    rig_with(data, false)
}

impl Rig {
    fn init(&mut self, features: u64) {
        let d = &mut self.dev;
        d.bar_write(layout::COMMON + 0x14, &[0]);
        d.bar_write(
            layout::COMMON + 0x14,
            &[status::ACKNOWLEDGE | status::DRIVER],
        );
        w32(d, 0x08, 0);
        w32(d, 0x0C, features as u32);
        w32(d, 0x08, 1);
        w32(d, 0x0C, (features >> 32) as u32);
        d.bar_write(
            layout::COMMON + 0x14,
            &[status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK],
        );
        w16(d, 0x16, 0);
        w16(d, 0x18, QSIZE);
        w32(d, 0x20, DESC as u32);
        w32(d, 0x24, 0);
        w32(d, 0x28, AVAIL as u32);
        w32(d, 0x2C, 0);
        w32(d, 0x30, USED as u32);
        w32(d, 0x34, 0);
        w16(d, 0x1C, 1);
        d.bar_write(layout::COMMON + 0x14, &[0x0F]);
        self.avail_idx = 0;
    }

    fn desc(&self, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write(table + 16 * i, &b).unwrap();
    }

    fn header(&self, slot: u64, kind: u32, sector: u64) -> u64 {
        let at = HDR + 16 * slot;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(at, &h).unwrap();
        self.mem.write(STATUS + slot, &[0xEE]).unwrap();
        at
    }

    /// Offers the chain at `head` and notifies.
    fn kick(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        self.mem
            .write(AVAIL + 4 + 2 * slot, &head.to_le_bytes())
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write(AVAIL + 2, &self.avail_idx.to_le_bytes())
            .unwrap();
        self.dev.bar_write(layout::NOTIFY, &0u16.to_le_bytes());
    }

    /// A three-part request: header, one data buffer, status.
    fn simple(&mut self, slot: u16, kind: u32, sector: u64, buf: u64, len: u32, write_data: bool) {
        let base = u64::from(slot) * 3;
        let h = self.header(u64::from(slot), kind, sector);
        self.desc(DESC, base, h, 16, DESC_F_NEXT, (base + 1) as u16);
        let f = if write_data { DESC_F_WRITE } else { 0 };
        self.desc(DESC, base + 1, buf, len, DESC_F_NEXT | f, (base + 2) as u16);
        self.desc(DESC, base + 2, STATUS + u64::from(slot), 1, DESC_F_WRITE, 0);
        self.kick(base as u16);
    }

    fn used_idx(&self) -> u16 {
        let mut b = [0u8; 2];
        self.mem.read(USED + 2, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    /// Polls until `n` used entries are published.
    fn wait_used(&mut self, n: u16) {
        for _ in 0..10_000 {
            if self.used_idx() == n {
                return;
            }
            self.notifier.wait(Duration::from_millis(10));
            self.notifier.take();
            self.dev.poll();
        }
        panic!("used index stuck at {}, wanted {n}", self.used_idx());
    }

    fn status(&self, slot: u64) -> u8 {
        let mut b = [0u8; 1];
        self.mem.read(STATUS + slot, &mut b).unwrap();
        b[0]
    }

    fn used(&self, i: u64) -> (u32, u32) {
        (
            self.mem.read_u32(USED + 4 + 8 * i).unwrap(),
            self.mem.read_u32(USED + 8 + 8 * i).unwrap(),
        )
    }
}

#[test]
fn negotiation_accepts_offered_features_and_refuses_others() {
    let mut r = rig();
    assert_eq!(r8(&mut r.dev, layout::COMMON + 0x14), 0x0F);
    w32(&mut r.dev, 0x00, 1);
    assert_eq!(r32(&mut r.dev, layout::COMMON + 4) & 1, 1, "VERSION_1");
    // Without VERSION_1, FEATURES_OK does not stick.
    r.init(feature::FLUSH);
    assert_eq!(
        r8(&mut r.dev, layout::COMMON + 0x14) & status::FEATURES_OK,
        0
    );
    // A feature the device does not offer.
    r.init(feature::VERSION_1 | (1 << 29));
    assert_eq!(
        r8(&mut r.dev, layout::COMMON + 0x14) & status::FEATURES_OK,
        0
    );
    // Device configuration: capacity in sectors, seg_max, blk_size.
    assert_eq!(r32(&mut r.dev, layout::DEVICE), 8192);
    assert_eq!(r32(&mut r.dev, layout::DEVICE + 0x0C), SEG_MAX);
    assert_eq!(r32(&mut r.dev, layout::DEVICE + 0x14), 512);
}

#[test]
fn reads_writes_and_flushes_reach_the_backend_and_interrupt() {
    let mut r = rig();
    r.simple(0, req::IN, 3, BUF, 1024, true);
    r.wait_used(1);
    assert_eq!(r.status(0), req_status::OK);
    assert_eq!(r.used(0), (0, 1025));
    let mut got = vec![0u8; 1024];
    r.mem.read(BUF, &mut got).unwrap();
    let want: Vec<u8> = (3 * 512..5 * 512)
        .map(|i: u32| (i / 512) as u8 ^ i as u8)
        .collect();
    assert_eq!(got, want);
    assert!(r.wire.asserted(), "INTx asserted after a used buffer");
    assert_eq!(r8(&mut r.dev, layout::ISR), 1);
    assert!(!r.wire.asserted(), "reading ISR acknowledges");
    assert_eq!(r8(&mut r.dev, layout::ISR), 0);

    r.mem.write(BUF + 0x1000, &[0x5A; 512]).unwrap();
    r.simple(1, req::OUT, 7, BUF + 0x1000, 512, false);
    r.wait_used(2);
    assert_eq!(r.status(1), req_status::OK);
    assert_eq!(r.flushes.load(Ordering::Relaxed), 0);
    r.simple(2, req::FLUSH, 0, BUF, 0, false);
    r.wait_used(3);
    assert_eq!(r.status(2), req_status::OK);
    assert_eq!(r.flushes.load(Ordering::Relaxed), 1);
    r.simple(3, req::IN, 7, BUF + 0x2000, 512, true);
    r.wait_used(4);
    let mut back = vec![0u8; 512];
    r.mem.read(BUF + 0x2000, &mut back).unwrap();
    assert_eq!(back, vec![0x5A; 512]);
}

#[test]
fn get_id_unsupported_types_and_bad_ranges_are_answered() {
    let mut r = rig();
    r.simple(0, req::GET_ID, 0, BUF, 20, true);
    r.wait_used(1);
    assert_eq!(r.status(0), req_status::OK);
    let mut id = [0u8; 20];
    r.mem.read(BUF, &mut id).unwrap();
    assert_eq!(&id[..8], b"SERIAL-1");
    assert_eq!(id[8..], [0; 12]);
    r.simple(1, 0x1234, 0, BUF, 512, true);
    r.wait_used(2);
    assert_eq!(r.status(1), req_status::UNSUPP);
    // Past the end, and a length that is not whole sectors.
    r.simple(2, req::IN, 8192, BUF, 512, true);
    r.wait_used(3);
    assert_eq!(r.status(2), req_status::IOERR);
    r.simple(3, req::IN, 0, BUF, 100, true);
    r.wait_used(4);
    assert_eq!(r.status(3), req_status::IOERR);
    // The device still works.
    r.simple(4, req::IN, 0, BUF, 512, true);
    r.wait_used(5);
    assert_eq!(r.status(4), req_status::OK);
}

#[test]
fn a_read_only_disk_offers_ro_and_fails_writes() {
    let mut r = rig_with(vec![9; 1 << 20], true);
    w32(&mut r.dev, 0x00, 0);
    assert_ne!(r32(&mut r.dev, layout::COMMON + 4) as u64 & feature::RO, 0);
    r.simple(0, req::OUT, 0, BUF, 512, false);
    r.wait_used(1);
    assert_eq!(r.status(0), req_status::IOERR);
}

#[test]
fn requests_larger_than_a_chunk_use_an_indirect_table_and_arrive_whole() {
    let mut r = rig();
    // A 3 MiB write through an indirect table of header, three 1 MiB segments and status.
    let table = 0x3_0000;
    let h = r.header(0, req::OUT, 16);
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7 + 1) as u8).collect();
    r.mem.write(BUF, &data).unwrap();
    r.desc(table, 0, h, 16, DESC_F_NEXT, 1);
    for i in 0..3u64 {
        r.desc(
            table,
            1 + i,
            BUF + (i << 20),
            1 << 20,
            DESC_F_NEXT,
            (2 + i) as u16,
        );
    }
    r.desc(table, 4, STATUS, 1, DESC_F_WRITE, 0);
    r.desc(DESC, 5, table, 5 * 16, DESC_F_INDIRECT, 0);
    r.kick(5);
    r.wait_used(1);
    assert_eq!(r.status(0), req_status::OK);
    // Read it back into another place, split at odd (sector-multiple) boundaries.
    let h = r.header(1, req::IN, 16);
    let dst = 0x80_0000;
    r.desc(table, 0, h, 16, DESC_F_NEXT, 1);
    r.desc(table, 1, dst, 512, DESC_F_NEXT | DESC_F_WRITE, 2);
    r.desc(
        table,
        2,
        dst + 512,
        (3 << 20) - 1024,
        DESC_F_NEXT | DESC_F_WRITE,
        3,
    );
    r.desc(table, 3, dst + (3 << 20) - 512, 513, DESC_F_WRITE, 0);
    r.mem.write(dst + (3 << 20), &[0xEE]).unwrap();
    r.desc(DESC, 6, table, 4 * 16, DESC_F_INDIRECT, 0);
    r.kick(6);
    r.wait_used(2);
    let mut back = vec![0u8; 3 << 20];
    r.mem.read(dst, &mut back).unwrap();
    assert!(back == data, "read-back differs");
    let mut st = [0u8; 1];
    r.mem.read(dst + (3 << 20), &mut st).unwrap();
    assert_eq!(
        st[0],
        req_status::OK,
        "the status byte is the last writable byte"
    );
    assert_eq!(r.used(1), (6, (3 << 20) + 1));
}

#[test]
fn a_looping_chain_needs_a_reset_and_a_reset_recovers() {
    let mut r = rig();
    let h = r.header(0, req::IN, 0);
    r.desc(DESC, 0, h, 16, DESC_F_NEXT, 1);
    r.desc(DESC, 1, BUF, 512, DESC_F_NEXT | DESC_F_WRITE, 0);
    r.kick(0);
    assert!(r.dev.broken().is_some());
    let st = r8(&mut r.dev, layout::COMMON + 0x14);
    assert_eq!(st & status::NEEDS_RESET, status::NEEDS_RESET);
    assert!(r.wire.asserted(), "configuration-change interrupt");
    assert_eq!(r8(&mut r.dev, layout::ISR), 2);
    // Further notifications do nothing until the reset.
    r.simple(1, req::IN, 0, BUF, 512, true);
    assert_eq!(r.used_idx(), 0);
    r.init(feature::VERSION_1);
    assert_eq!(r8(&mut r.dev, layout::COMMON + 0x14), 0x0F);
    r.mem.write(USED + 2, &[0, 0]).unwrap();
    r.simple(0, req::IN, 0, BUF, 512, true);
    r.wait_used(1);
    assert_eq!(r.status(0), req_status::OK);
}

#[test]
fn a_chain_without_header_or_status_needs_a_reset() {
    let mut r = rig();
    r.desc(DESC, 0, HDR, 8, 0, 0);
    r.kick(0);
    assert!(matches!(r.dev.broken(), Some(QueueError::Request(_))));
    let mut r = rig();
    let h = r.header(0, req::IN, 0);
    r.desc(DESC, 0, h, 16, 0, 0);
    r.kick(0);
    assert!(matches!(r.dev.broken(), Some(QueueError::Request(_))));
}

#[test]
fn no_dma_without_bus_mastering() {
    let mut r = rig();
    r.dev.command_written(0);
    r.simple(0, req::IN, 0, BUF, 512, true);
    std::thread::sleep(Duration::from_millis(20));
    r.dev.poll();
    assert_eq!(r.used_idx(), 0);
    // Enabling it lets the device see the notification it missed.
    r.dev.command_written(COMMAND_BUS_MASTER);
    r.wait_used(1);
    assert_eq!(r.status(0), req_status::OK);
}

#[test]
fn the_pci_function_has_the_virtio_capabilities_and_the_access_window() {
    let mem = Arc::new(GuestMemory::new(MemoryLayout::new(16).unwrap()).unwrap());
    let queue = BlockQueue::spawn(
        Box::new(MemoryBackend::new("ram", vec![0; 1 << 20], false)),
        IoNotifier::new(),
    )
    .unwrap();
    let dev = Arc::new(Mutex::new(VirtioBlk::new(
        mem,
        queue,
        PciIntxWire::new(11, None).pin(3),
        String::new(),
    )));
    let mut f = VirtioBlkFunction::new(dev, 11);
    let mut b = [0u8; 4];
    f.config_read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x1042_1AF4);
    assert_eq!(f.config().byte(reg::INTERRUPT_LINE), 11);
    assert_eq!(f.config().byte(reg::STATUS) & 0x10, 0x10);
    // Walk the list: types 1-5, each vendor-specific.
    let mut at = usize::from(f.config().byte(0x34));
    let mut types = Vec::new();
    while at != 0 {
        assert_eq!(f.config().byte(at), 0x09);
        types.push(f.config().byte(at + 3));
        at = usize::from(f.config().byte(at + 1));
    }
    assert_eq!(types, [1, 2, 3, 4, 5]);
    // The access window reads the device configuration (capacity: 2048 sectors).
    f.config_write(CAP_PCI_CFG + 4, &[0]);
    f.config_write(CAP_PCI_CFG + 8, &(layout::DEVICE as u32).to_le_bytes());
    f.config_write(CAP_PCI_CFG + 12, &4u32.to_le_bytes());
    f.config_read(PCI_CFG_DATA, &mut b);
    assert_eq!(u32::from_le_bytes(b), 2048);
    // The device status through the window.
    f.config_write(
        CAP_PCI_CFG + 8,
        &((layout::COMMON + 0x14) as u32).to_le_bytes(),
    );
    f.config_write(CAP_PCI_CFG + 12, &1u32.to_le_bytes());
    f.config_write(PCI_CFG_DATA, &[status::ACKNOWLEDGE]);
    f.config_read(PCI_CFG_DATA, &mut b[..1]);
    assert_eq!(b[0], status::ACKNOWLEDGE);
}
