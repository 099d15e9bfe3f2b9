//! The PIIX3 IDE controller (PCI function 00:01.1, 8086:7010) with its two channels in legacy
//! mode — primary at ports 0x1F0-0x1F7 and 0x3F6 on IRQ 14, secondary at 0x170-0x177 and 0x376 on
//! IRQ 15 — and bus-master DMA registers behind BAR4. Each channel takes an ATA hard disk or an
//! ATAPI CD-ROM as master and slave.
//!
//! Built to ATA/ATAPI-6 (T13/1410D) and the Intel PIIX3/PIIX4 data sheets: the shadowed task
//! file with its LBA48 two-deep FIFO and HOB, the status and alternate status registers (reading
//! status clears INTRQ; alternate status does not), device control (nIEN, SRST with the device
//! signatures), PIO data-in and data-out with DRQ blocks, READ/WRITE MULTIPLE, DMA through PRD
//! tables in guest memory, and the PACKET protocol for ATAPI (12-byte packets, byte count limit,
//! interrupt reason). Medium access goes through each drive's [`BlockQueue`]: a command that
//! needs the medium sets BSY and submits a request; [`Ide::poll`] finishes it when the I/O thread
//! answers, and only then do status and the interrupt say the command is done. FLUSH CACHE
//! therefore completes only after the backend's flush (fdatasync) returned.

use std::sync::{Arc, Mutex};

use vmdriver::GuestMemory;

use super::IrqLine;
use super::atapi::{Atapi, CD_BLOCK, Packet};
use super::pci::{Bar, COMMAND_BUS_MASTER, ConfigSpace, PciFunction};
use crate::block::{BlockCompletion, BlockOp, BlockQueue, BlockRequest, SECTOR_SIZE};
use crate::bus::BusDevice;

/// Primary channel command block.
pub const PRIMARY_COMMAND: u16 = 0x1F0;
/// Primary channel control block (alternate status / device control).
pub const PRIMARY_CONTROL: u16 = 0x3F6;
/// Secondary channel command block.
pub const SECONDARY_COMMAND: u16 = 0x170;
/// Secondary channel control block.
pub const SECONDARY_CONTROL: u16 = 0x376;
/// Primary channel's ISA IRQ.
pub const PRIMARY_IRQ: u8 = 14;
/// Secondary channel's ISA IRQ.
pub const SECONDARY_IRQ: u8 = 15;
/// Ports of a command block.
pub const COMMAND_PORTS: u16 = 8;
/// Ports of the bus-master register block (BAR4).
pub const BUS_MASTER_PORTS: u32 = 16;

/// Status register bits.
pub mod status {
    /// Busy.
    pub const BSY: u8 = 0x80;
    /// Device ready.
    pub const DRDY: u8 = 0x40;
    /// Device fault.
    pub const DF: u8 = 0x20;
    /// Seek complete (obsolete; set by every drive).
    pub const DSC: u8 = 0x10;
    /// Data request.
    pub const DRQ: u8 = 0x08;
    /// Error.
    pub const ERR: u8 = 0x01;
}

/// Error register bits.
pub mod error {
    /// Command aborted.
    pub const ABRT: u8 = 0x04;
    /// Address not found (outside the medium).
    pub const IDNF: u8 = 0x10;
    /// Uncorrectable data error.
    pub const UNC: u8 = 0x40;
}

/// Bus-master status bits.
pub mod bm_status {
    /// The bus master is active.
    pub const ACTIVE: u8 = 0x01;
    /// A DMA transfer failed (write 1 to clear).
    pub const ERROR: u8 = 0x02;
    /// The device raised its interrupt (write 1 to clear).
    pub const INTERRUPT: u8 = 0x04;
}

/// Sectors per block READ/WRITE MULTIPLE can use (IDENTIFY word 47).
pub const MAX_MULTIPLE: u16 = 16;
/// Largest medium request the controller submits at once: a megabyte, so each of a guest's
/// large DMA commands is one round trip to the I/O thread, not one per 64 KiB (measured: a Linux
/// guest's sequential O_DIRECT megabytes went from 107 to 57 ms per 64 MiB written on bt).
const CHUNK: usize = 1024 * 1024;
/// PRD tables cannot cross a 64 KiB boundary: at most 8192 entries.
const MAX_PRD_ENTRIES: usize = 8192;

/// What a drive holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    /// An ATA hard disk.
    Disk,
    /// An ATAPI CD-ROM drive with a medium (an ISO image).
    Cdrom,
}

/// A drive to attach: its backend's queue and its kind.
#[derive(Debug)]
pub struct DriveConfig {
    /// The backend's I/O thread.
    pub queue: BlockQueue,
    /// Disk or CD-ROM.
    pub media: Media,
}

/// Task-file registers with the LBA48 FIFO: index 0 is the last value written, 1 the one
/// before (read with HOB set).
#[derive(Debug, Clone, Copy, Default)]
struct TaskFile {
    feature: [u8; 2],
    count: [u8; 2],
    lba_low: [u8; 2],
    lba_mid: [u8; 2],
    lba_high: [u8; 2],
    device: u8,
}

fn push(r: &mut [u8; 2], v: u8) {
    r[1] = r[0];
    r[0] = v;
}

impl TaskFile {
    fn count28(&self) -> u64 {
        match self.count[0] {
            0 => 256,
            c => u64::from(c),
        }
    }
    fn count48(&self) -> u64 {
        match u16::from_le_bytes([self.count[0], self.count[1]]) {
            0 => 65536,
            c => u64::from(c),
        }
    }
    fn lba28(&self) -> u64 {
        u64::from(self.device & 0x0F) << 24
            | u64::from(self.lba_high[0]) << 16
            | u64::from(self.lba_mid[0]) << 8
            | u64::from(self.lba_low[0])
    }
    fn lba48(&self) -> u64 {
        u64::from(self.lba_high[1]) << 40
            | u64::from(self.lba_mid[1]) << 32
            | u64::from(self.lba_low[1]) << 24
            | u64::from(self.lba_high[0]) << 16
            | u64::from(self.lba_mid[0]) << 8
            | u64::from(self.lba_low[0])
    }
    fn set_lba(&mut self, lba: u64, lba48: bool) {
        let b = lba.to_le_bytes();
        self.lba_low[0] = b[0];
        self.lba_mid[0] = b[1];
        self.lba_high[0] = b[2];
        if lba48 {
            self.lba_low[1] = b[3];
            self.lba_mid[1] = b[4];
            self.lba_high[1] = b[5];
        } else {
            self.device = (self.device & 0xF0) | (b[3] & 0x0F);
        }
    }
}

/// Cylinders, heads, sectors per track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    cylinders: u32,
    heads: u32,
    sectors: u32,
}

impl Geometry {
    /// The default translation of ATA-6 annex B for a disk of `total` sectors: 16 heads, 63
    /// sectors per track, at most 16383 cylinders.
    fn for_sectors(total: u64) -> Self {
        Self::with(total, 16, 63)
    }

    fn with(total: u64, heads: u32, sectors: u32) -> Self {
        let cylinders = (total / u64::from(heads * sectors)).clamp(1, 16383) as u32;
        Self {
            cylinders,
            heads,
            sectors,
        }
    }

    fn capacity(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors)
    }
}

#[derive(Debug)]
enum Kind {
    Disk { sectors: u64 },
    Cdrom(Box<Atapi>),
}

/// Where a transfer's data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Device to host.
    In,
    /// Host to device.
    Out,
}

/// What the command does when its transfer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// ATA PIO or DMA data command on a disk.
    Ata,
    /// READ VERIFY: read the medium, send nothing.
    Verify,
    /// IDENTIFY and other PIO data-in commands without medium access.
    Identify,
    /// An ATAPI packet command's data.
    Packet,
}

/// The data command in progress.
#[derive(Debug)]
struct Xfer {
    dir: Dir,
    protocol: Protocol,
    dma: bool,
    /// Next medium byte to read or write.
    offset: u64,
    /// Medium bytes still to read (In) or write (Out).
    left: u64,
    /// Bytes per PIO DRQ block.
    block: usize,
    /// Data on its way: read from the medium and not yet sent (In), or received and not yet
    /// written (Out).
    buf: Vec<u8>,
    pos: usize,
    /// Medium block size (512 or 2048), for error addresses.
    unit: u64,
    lba48: bool,
    /// Writes must be durable before they complete (write cache disabled).
    durable: bool,
    /// The next PIO data-out block is the first (no interrupt before it).
    first: bool,
}

#[derive(Debug)]
enum Phase {
    Idle,
    /// A request is with the I/O thread.
    Io,
    /// A DRQ data-in block: the host reads `xfer.buf[xfer.pos..end]`.
    PioIn {
        end: usize,
    },
    /// A DRQ data-out block: the host writes until `xfer.buf` holds `len` bytes.
    PioOut {
        len: usize,
    },
    /// The PACKET command waits for its 12 bytes.
    Packet {
        cdb: [u8; 12],
        pos: usize,
    },
    /// A DMA command waits for the bus master.
    DmaWait,
    /// Software reset asserted.
    Reset,
}

#[derive(Debug)]
struct Drive {
    queue: BlockQueue,
    kind: Kind,
    tf: TaskFile,
    status: u8,
    error: u8,
    phase: Phase,
    xfer: Option<Xfer>,
    /// Sectors per block of READ/WRITE MULTIPLE (0: not set).
    multiple: u16,
    write_cache: bool,
    /// The transfer mode SET FEATURES selected (its sector count value), if any.
    transfer_mode: Option<u8>,
    default_geometry: Geometry,
    geometry: Geometry,
    serial: String,
    /// Requests with the I/O thread.
    outstanding: u32,
    /// Tags requests; bumped by every reset, so completions of cancelled commands are dropped.
    generation: u64,
}

/// The bus-master registers of one channel.
#[derive(Debug, Default)]
struct BusMaster {
    command: u8,
    status: u8,
    prd_table: u32,
    prd: Option<PrdCursor>,
}

/// A walk over a PRD table: (address, bytes) regions and how far the transfer got.
#[derive(Debug, Default)]
struct PrdCursor {
    regions: Vec<(u32, u32)>,
    index: usize,
    offset: u32,
    /// The table could not be read (it lies outside RAM).
    bad: bool,
}

impl PrdCursor {
    fn load(memory: &GuestMemory, table: u32) -> Self {
        let mut c = Self::default();
        let mut addr = u64::from(table & !3);
        for _ in 0..MAX_PRD_ENTRIES {
            let mut e = [0u8; 8];
            if memory.read(addr, &mut e).is_err() {
                c.bad = true;
                break;
            }
            let base = u32::from_le_bytes([e[0], e[1], e[2], e[3]]) & !1;
            let count = u32::from(u16::from_le_bytes([e[4], e[5]]) & !1);
            let len = if count == 0 { 0x1_0000 } else { count };
            c.regions.push((base, len));
            if e[7] & 0x80 != 0 {
                break;
            }
            addr += 8;
        }
        c
    }

    fn remaining(&self) -> bool {
        self.index < self.regions.len()
    }

    /// Calls `f(guest address, range of data)` for the next `len` bytes of regions; returns
    /// how many bytes the table covered.
    fn walk(&mut self, len: usize, mut f: impl FnMut(u64, std::ops::Range<usize>)) -> usize {
        let mut done = 0;
        while done < len && self.index < self.regions.len() {
            let (base, size) = self.regions[self.index];
            let n = ((size - self.offset) as usize).min(len - done);
            f(u64::from(base) + u64::from(self.offset), done..done + n);
            done += n;
            self.offset += n as u32;
            if self.offset == size {
                self.index += 1;
                self.offset = 0;
            }
        }
        done
    }
}

/// What the command started (or the block finished) asks of the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Irq {
    None,
    Raise,
}

struct Ctx<'a> {
    memory: &'a GuestMemory,
    bm: &'a mut BusMaster,
    bus_master_enabled: bool,
    tag: u64,
}

impl Drive {
    fn new(config: DriveConfig, serial: String) -> Self {
        let (kind, sectors) = match config.media {
            Media::Disk => {
                let sectors = config.queue.len() / SECTOR_SIZE;
                (Kind::Disk { sectors }, sectors)
            }
            Media::Cdrom => (Kind::Cdrom(Box::new(Atapi::new(config.queue.len()))), 0),
        };
        let geometry = Geometry::for_sectors(sectors);
        let mut d = Self {
            queue: config.queue,
            kind,
            tf: TaskFile::default(),
            status: 0,
            error: 0,
            phase: Phase::Idle,
            xfer: None,
            multiple: 0,
            write_cache: true,
            transfer_mode: None,
            default_geometry: geometry,
            geometry,
            serial,
            outstanding: 0,
            generation: 0,
        };
        d.reset();
        d
    }

    fn is_atapi(&self) -> bool {
        matches!(self.kind, Kind::Cdrom(_))
    }

    /// The state after power-on, SRST or DEVICE RESET: the signature in the task file,
    /// diagnostic code 01h, DRDY for ATA devices (not for packet devices).
    fn reset(&mut self) {
        self.generation += 1;
        self.phase = Phase::Idle;
        self.xfer = None;
        self.set_signature();
        self.error = 0x01;
        self.status = if self.is_atapi() {
            0
        } else {
            status::DRDY | status::DSC
        };
        if let Kind::Cdrom(a) = &mut self.kind {
            a.reset();
        }
    }

    fn set_signature(&mut self) {
        self.tf.count[0] = 1;
        self.tf.lba_low[0] = 1;
        let (mid, high) = if self.is_atapi() {
            (0x14, 0xEB)
        } else {
            (0, 0)
        };
        self.tf.lba_mid[0] = mid;
        self.tf.lba_high[0] = high;
        self.tf.device &= 0x10;
    }

    fn abort(&mut self) -> Irq {
        self.phase = Phase::Idle;
        self.xfer = None;
        self.error = error::ABRT;
        // DSC is obsolete; drives (and QEMU) report errors as DRDY | ERR.
        self.status = status::DRDY | status::ERR;
        if self.is_atapi() {
            self.tf.count[0] = 3;
        }
        Irq::Raise
    }

    fn done(&mut self) -> Irq {
        self.phase = Phase::Idle;
        self.xfer = None;
        self.error = 0;
        self.status = status::DRDY | status::DSC;
        Irq::Raise
    }

    fn busy(&mut self) {
        self.status = status::BSY | (self.status & status::DRDY);
    }

    fn submit(&mut self, tag: u64, op: BlockOp) -> Option<BlockCompletion> {
        self.busy();
        self.phase = Phase::Io;
        let failed = self.queue.submit(BlockRequest { tag, op }).err();
        if failed.is_none() {
            self.outstanding += 1;
        }
        failed
    }

    /// Executes an ATA command. Returns whether to interrupt now.
    fn command(&mut self, cmd: u8, ctx: &mut Ctx) -> Irq {
        self.error = 0;
        if self.is_atapi() {
            return self.atapi_command(cmd, ctx);
        }
        let Kind::Disk { sectors } = self.kind else {
            return self.abort();
        };
        match cmd {
            0xEC => self.identify_in(self.identify_disk()),
            0x20 | 0x21 => self.rw(ctx, Dir::In, false, false, 1),
            0x24 => self.rw(ctx, Dir::In, true, false, 1),
            0xC4 | 0x29 if self.multiple == 0 => self.abort(),
            0xC4 => self.rw(ctx, Dir::In, false, false, self.multiple),
            0x29 => self.rw(ctx, Dir::In, true, false, self.multiple),
            0x30 | 0x31 => self.rw(ctx, Dir::Out, false, false, 1),
            0x34 => self.rw(ctx, Dir::Out, true, false, 1),
            0xC5 | 0x39 if self.multiple == 0 => self.abort(),
            0xC5 => self.rw(ctx, Dir::Out, false, false, self.multiple),
            0x39 => self.rw(ctx, Dir::Out, true, false, self.multiple),
            0xC8 | 0xC9 => self.rw(ctx, Dir::In, false, true, 1),
            0x25 => self.rw(ctx, Dir::In, true, true, 1),
            0xCA | 0xCB => self.rw(ctx, Dir::Out, false, true, 1),
            0x35 => self.rw(ctx, Dir::Out, true, true, 1),
            0x40 | 0x41 => self.verify(ctx, false),
            0x42 => self.verify(ctx, true),
            0xC6 => {
                let n = u16::from(self.tf.count[0]);
                if n > MAX_MULTIPLE || (n != 0 && !n.is_power_of_two()) {
                    return self.abort();
                }
                self.multiple = n;
                self.done()
            }
            0xE7 | 0xEA => match self.submit(ctx.tag, BlockOp::Flush) {
                None => {
                    self.xfer = None;
                    Irq::None
                }
                Some(failed) => self.complete(failed, ctx),
            },
            0x91 => {
                let spt = u32::from(self.tf.count[0]);
                let heads = u32::from(self.tf.device & 0x0F) + 1;
                if spt == 0 {
                    return self.abort();
                }
                self.geometry = Geometry {
                    cylinders: (sectors / u64::from(heads * spt)).min(65535) as u32,
                    heads,
                    sectors: spt,
                };
                self.done()
            }
            0x10..=0x1F => self.done(),
            0x70..=0x7F => {
                // SEEK: the address must exist.
                match self.address(false) {
                    Some(lba) if lba < sectors => self.done(),
                    _ => self.idnf(),
                }
            }
            0xEF => self.set_features(),
            0xF8 => {
                let max = sectors.saturating_sub(1).min(0x0FFF_FFFF);
                self.tf.set_lba(max, false);
                self.done()
            }
            0x27 => {
                self.tf.set_lba(sectors.saturating_sub(1), true);
                self.done()
            }
            0x90 => {
                self.reset();
                Irq::Raise
            }
            0xE5 | 0x98 => {
                self.tf.count[0] = 0xFF; // active or idle
                self.done()
            }
            0xE0..=0xE3 | 0xE6 | 0x94..=0x97 | 0x99 => self.done(),
            _ => self.abort(),
        }
    }

    fn set_features(&mut self) -> Irq {
        match self.tf.feature[0] {
            0x02 => self.write_cache = true,
            0x82 => self.write_cache = false,
            0x03 => {
                let v = self.tf.count[0];
                let ok = match v >> 3 {
                    0 => v <= 1,     // PIO default mode
                    1 => v & 7 <= 4, // PIO flow-control mode 0-4
                    4 => v & 7 <= 2, // multiword DMA 0-2
                    8 => v & 7 <= 5, // Ultra DMA 0-5
                    _ => false,
                };
                if !ok {
                    return self.abort();
                }
                self.transfer_mode = Some(v);
            }
            // Read look-ahead, reverting to defaults, 8-bit PIO off: accepted, nothing changes
            // in an emulated drive.
            0x55 | 0xAA | 0x66 | 0xCC | 0x81 => {}
            _ => return self.abort(),
        }
        self.done()
    }

    fn idnf(&mut self) -> Irq {
        self.phase = Phase::Idle;
        self.xfer = None;
        self.error = error::IDNF;
        self.status = status::DRDY | status::ERR;
        Irq::Raise
    }

    /// The command's starting sector: LBA28/LBA48 or CHS through the current geometry.
    fn address(&self, lba48: bool) -> Option<u64> {
        if lba48 {
            return Some(self.tf.lba48());
        }
        if self.tf.device & 0x40 != 0 {
            return Some(self.tf.lba28());
        }
        let g = self.geometry;
        let cyl = u64::from(u16::from_le_bytes([
            self.tf.lba_mid[0],
            self.tf.lba_high[0],
        ]));
        let head = u64::from(self.tf.device & 0x0F);
        let sector = u64::from(self.tf.lba_low[0]);
        if sector == 0 || sector > u64::from(g.sectors) || head >= u64::from(g.heads) {
            return None;
        }
        Some((cyl * u64::from(g.heads) + head) * u64::from(g.sectors) + sector - 1)
    }

    fn rw(&mut self, ctx: &mut Ctx, dir: Dir, lba48: bool, dma: bool, per_block: u16) -> Irq {
        let Kind::Disk { sectors } = self.kind else {
            return self.abort();
        };
        let count = if lba48 {
            self.tf.count48()
        } else {
            self.tf.count28()
        };
        let Some(lba) = self.address(lba48) else {
            return self.idnf();
        };
        if lba.checked_add(count).is_none_or(|end| end > sectors) {
            return self.idnf();
        }
        if dir == Dir::Out && self.queue.read_only() {
            return self.abort();
        }
        self.xfer = Some(Xfer {
            dir,
            protocol: Protocol::Ata,
            dma,
            offset: lba * SECTOR_SIZE,
            left: count * SECTOR_SIZE,
            block: usize::from(per_block) * SECTOR_SIZE as usize,
            buf: Vec::new(),
            pos: 0,
            unit: SECTOR_SIZE,
            lba48,
            durable: !self.write_cache,
            first: true,
        });
        self.status = status::DRDY | status::DSC;
        self.pump(ctx)
    }

    fn verify(&mut self, ctx: &mut Ctx, lba48: bool) -> Irq {
        let irq = self.rw(ctx, Dir::In, lba48, false, 1);
        if let Some(x) = &mut self.xfer {
            x.protocol = Protocol::Verify;
        }
        irq
    }

    /// Starts a PIO data-in transfer of `data` (IDENTIFY).
    fn identify_in(&mut self, data: Vec<u8>) -> Irq {
        self.xfer = Some(Xfer {
            dir: Dir::In,
            protocol: Protocol::Identify,
            dma: false,
            offset: 0,
            left: 0,
            block: data.len(),
            buf: data,
            pos: 0,
            unit: SECTOR_SIZE,
            lba48: false,
            durable: false,
            first: true,
        });
        let end = self.xfer.as_ref().map_or(0, |x| x.buf.len());
        self.phase = Phase::PioIn { end };
        self.status = status::DRDY | status::DSC | status::DRQ;
        Irq::Raise
    }

    /// Moves the transfer on as far as it can go without the host or the I/O thread: presents
    /// the next PIO block, moves data through the bus master, submits the next medium request,
    /// or ends the command.
    fn pump(&mut self, ctx: &mut Ctx) -> Irq {
        loop {
            let Some(x) = self.xfer.as_mut() else {
                return Irq::None;
            };
            match x.dir {
                Dir::In => {
                    if x.pos < x.buf.len() {
                        if x.protocol == Protocol::Verify {
                            x.pos = x.buf.len();
                            continue;
                        }
                        if x.dma {
                            if !dma_ready(ctx) {
                                self.phase = Phase::DmaWait;
                                return Irq::None;
                            }
                            let (memory, table) = (ctx.memory, ctx.bm.prd_table);
                            let prd = ctx
                                .bm
                                .prd
                                .get_or_insert_with(|| PrdCursor::load(memory, table));
                            let data = &x.buf[x.pos..];
                            let mut failed = false;
                            let n = prd.walk(data.len(), |addr, r| {
                                failed |= memory.write_ram(addr, &data[r]).is_err();
                            });
                            if failed || prd.bad {
                                ctx.bm.status |= bm_status::ERROR;
                            }
                            x.pos += n;
                            if x.pos < x.buf.len() {
                                return self.dma_short(ctx);
                            }
                            continue;
                        }
                        let n = (x.buf.len() - x.pos).min(x.block);
                        let end = x.pos + n;
                        if x.protocol == Protocol::Packet {
                            let [lo, hi] = (n as u16).to_le_bytes();
                            self.tf.lba_mid[0] = lo;
                            self.tf.lba_high[0] = hi;
                            self.tf.count[0] = 2; // I/O = 1, C/D = 0: data to the host
                        }
                        self.phase = Phase::PioIn { end };
                        self.status = status::DRDY | status::DSC | status::DRQ;
                        return Irq::Raise;
                    }
                    if x.left > 0 {
                        let len = chunk_len(x);
                        let offset = x.offset;
                        return match self.submit(ctx.tag, BlockOp::Read { offset, len }) {
                            None => Irq::None,
                            Some(failed) => self.complete(failed, ctx),
                        };
                    }
                    return self.finish(ctx);
                }
                Dir::Out => {
                    if x.left == 0 {
                        return self.finish(ctx);
                    }
                    if x.dma {
                        if !dma_ready(ctx) {
                            self.phase = Phase::DmaWait;
                            return Irq::None;
                        }
                        let len = chunk_len(x);
                        let (memory, table) = (ctx.memory, ctx.bm.prd_table);
                        let prd = ctx
                            .bm
                            .prd
                            .get_or_insert_with(|| PrdCursor::load(memory, table));
                        let mut buf = vec![0u8; len];
                        let mut failed = false;
                        let n = prd.walk(len, |addr, r| {
                            failed |= memory.read(addr, &mut buf[r]).is_err();
                        });
                        if failed || prd.bad {
                            ctx.bm.status |= bm_status::ERROR;
                        }
                        if n < len {
                            return self.dma_short(ctx);
                        }
                        let (offset, durable) = (x.offset, x.durable);
                        let op = BlockOp::Write {
                            offset,
                            data: buf,
                            durable,
                        };
                        return match self.submit(ctx.tag, op) {
                            None => Irq::None,
                            Some(failed) => self.complete(failed, ctx),
                        };
                    }
                    let len = x.block.min(x.left as usize);
                    let first = std::mem::replace(&mut x.first, false);
                    x.buf.clear();
                    self.phase = Phase::PioOut { len };
                    self.status = status::DRDY | status::DSC | status::DRQ;
                    return if first { Irq::None } else { Irq::Raise };
                }
            }
        }
    }

    /// The PRD table ended before the transfer: the command fails (ABRT) and the bus master
    /// reports an error.
    fn dma_short(&mut self, ctx: &mut Ctx) -> Irq {
        ctx.bm.status = (ctx.bm.status | bm_status::ERROR) & !bm_status::ACTIVE;
        ctx.bm.prd = None;
        self.abort()
    }

    /// The transfer's last data moved: the command completes.
    fn finish(&mut self, ctx: &mut Ctx) -> Irq {
        let Some(x) = self.xfer.take() else {
            return Irq::None;
        };
        if x.dma {
            let more = ctx.bm.prd.as_ref().is_some_and(PrdCursor::remaining);
            if !more {
                ctx.bm.status &= !bm_status::ACTIVE;
            }
            ctx.bm.prd = None;
        }
        if x.protocol == Protocol::Ata && !x.dma && x.dir == Dir::In {
            // PIO data-in: the last block's interrupt came before its data; none after it.
            self.phase = Phase::Idle;
            self.status = status::DRDY | status::DSC;
            return Irq::None;
        }
        if x.protocol == Protocol::Identify {
            self.phase = Phase::Idle;
            self.status = status::DRDY | status::DSC;
            return Irq::None;
        }
        if x.protocol == Protocol::Packet {
            self.tf.count[0] = 3; // I/O = 1, C/D = 1: status
        }
        self.done()
    }

    /// An I/O thread completion for this drive's current command.
    fn complete(&mut self, c: BlockCompletion, ctx: &mut Ctx) -> Irq {
        if !matches!(self.phase, Phase::Io) {
            return Irq::None;
        }
        let Some(x) = self.xfer.as_mut() else {
            // FLUSH CACHE.
            return match c.result {
                Ok(_) => self.done(),
                Err(e) => {
                    tracing::warn!("flush failed: {e}");
                    self.abort()
                }
            };
        };
        match c.result {
            Ok(data) => {
                let n = data.len() as u64;
                x.offset += n;
                x.left -= n.min(x.left);
                match x.dir {
                    Dir::In => {
                        x.buf = data;
                        x.pos = 0;
                    }
                    Dir::Out => x.buf.clear(),
                }
                self.pump(ctx)
            }
            Err(e) => {
                tracing::warn!("{e}");
                let lba = x.offset / x.unit;
                let lba48 = x.lba48;
                let dir = x.dir;
                let packet = x.protocol == Protocol::Packet;
                if x.dma {
                    ctx.bm.status &= !bm_status::ACTIVE;
                    ctx.bm.prd = None;
                }
                if packet {
                    if let Kind::Cdrom(a) = &mut self.kind {
                        a.read_failed();
                    }
                    return self.packet_error();
                }
                self.tf.set_lba(lba, lba48);
                let irq = self.abort();
                if dir == Dir::In {
                    self.error = error::UNC;
                }
                irq
            }
        }
    }

    /// The host read data; returns whether the block ended (the caller pumps).
    fn data_in(&mut self, out: &mut [u8]) -> bool {
        let Phase::PioIn { end } = self.phase else {
            out.fill(0);
            return false;
        };
        let Some(x) = self.xfer.as_mut() else {
            out.fill(0);
            return false;
        };
        for b in out.iter_mut() {
            *b = if x.pos < end {
                x.pos += 1;
                x.buf[x.pos - 1]
            } else {
                0
            };
        }
        x.pos >= end
    }

    /// The host wrote data; returns whether the block is complete.
    fn data_out(&mut self, data: &[u8]) -> bool {
        match &mut self.phase {
            Phase::PioOut { len } => {
                let len = *len;
                let Some(x) = self.xfer.as_mut() else {
                    return false;
                };
                let n = data.len().min(len - x.buf.len());
                x.buf.extend_from_slice(&data[..n]);
                x.buf.len() == len
            }
            Phase::Packet { cdb, pos } => {
                for b in data {
                    if *pos < 12 {
                        cdb[*pos] = *b;
                        *pos += 1;
                    }
                }
                *pos == 12
            }
            _ => false,
        }
    }

    /// A completed data-out block.
    fn block_out(&mut self, ctx: &mut Ctx) -> Irq {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Packet { cdb, .. } => self.packet(cdb, ctx),
            Phase::PioOut { .. } => {
                let Some(x) = self.xfer.as_mut() else {
                    return Irq::None;
                };
                let op = BlockOp::Write {
                    offset: x.offset,
                    data: std::mem::take(&mut x.buf),
                    durable: x.durable,
                };
                match self.submit(ctx.tag, op) {
                    None => Irq::None,
                    Some(failed) => self.complete(failed, ctx),
                }
            }
            other => {
                self.phase = other;
                Irq::None
            }
        }
    }

    fn atapi_command(&mut self, cmd: u8, ctx: &mut Ctx) -> Irq {
        match cmd {
            0xA1 => self.identify_in(self.identify_packet()),
            0xA0 => {
                self.xfer = None;
                self.phase = Phase::Packet {
                    cdb: [0; 12],
                    pos: 0,
                };
                self.tf.count[0] = 1; // C/D = 1, I/O = 0: the packet, to the device
                self.status = status::DRDY | status::DRQ;
                let _ = ctx;
                Irq::None
            }
            0x08 => {
                self.reset();
                Irq::None
            }
            0x90 => {
                self.reset();
                Irq::Raise
            }
            0xEF => self.set_features(),
            0xE5 | 0x98 => {
                self.tf.count[0] = 0xFF;
                self.done()
            }
            0xE0..=0xE3 | 0xE6 | 0x94..=0x97 | 0x99 => self.done(),
            // IDENTIFY DEVICE and READ SECTORS to a packet device abort with its signature in
            // the task file, which is how drivers tell the two kinds apart (ATA-6 9.1).
            0xEC | 0x20 | 0x21 => {
                let irq = self.abort();
                self.set_signature();
                irq
            }
            _ => self.abort(),
        }
    }

    fn packet(&mut self, cdb: [u8; 12], ctx: &mut Ctx) -> Irq {
        let dma = self.tf.feature[0] & 1 != 0;
        let limit = usize::from(u16::from_le_bytes([
            self.tf.lba_mid[0],
            self.tf.lba_high[0],
        ]));
        // A byte count limit of 0 is invalid; drives then use the largest even count.
        let block = match limit & !1 {
            0 => 0xFFFE,
            l => l,
        };
        let Kind::Cdrom(atapi) = &mut self.kind else {
            return self.abort();
        };
        let (buf, offset, left) = match atapi.execute(&cdb) {
            Packet::Done => {
                self.tf.count[0] = 3;
                return self.done();
            }
            Packet::Error => return self.packet_error(),
            Packet::Data(d) if d.is_empty() => {
                self.tf.count[0] = 3;
                return self.done();
            }
            Packet::Data(d) => (d, 0, 0),
            Packet::Read { lba, blocks } => (Vec::new(), lba * CD_BLOCK, blocks * CD_BLOCK),
        };
        self.xfer = Some(Xfer {
            dir: Dir::In,
            protocol: Protocol::Packet,
            dma,
            offset,
            left,
            block,
            buf,
            pos: 0,
            unit: CD_BLOCK,
            lba48: false,
            durable: false,
            first: true,
        });
        self.status = status::DRDY | status::DSC;
        self.pump(ctx)
    }

    fn packet_error(&mut self) -> Irq {
        let sense = match &self.kind {
            Kind::Cdrom(a) => a.sense(),
            Kind::Disk { .. } => Default::default(),
        };
        self.phase = Phase::Idle;
        self.xfer = None;
        // The sense key in the error register; ABRT is for commands the ATA layer refused.
        self.error = sense.key << 4;
        self.status = status::DRDY | status::ERR;
        self.tf.count[0] = 3;
        Irq::Raise
    }

    fn identify_disk(&self) -> Vec<u8> {
        let Kind::Disk { sectors } = self.kind else {
            return vec![0; 512];
        };
        let mut w = [0u16; 256];
        let g = self.default_geometry;
        let c = self.geometry;
        w[0] = 0x0040; // fixed device
        w[1] = g.cylinders as u16;
        w[3] = g.heads as u16;
        w[6] = g.sectors as u16;
        ata_string(&mut w[10..20], &self.serial);
        ata_string(&mut w[23..27], "0.1");
        ata_string(&mut w[27..47], "BT86 HARDDISK");
        w[47] = 0x8000 | MAX_MULTIPLE;
        w[49] = 0x0F00; // IORDY, IORDY may be disabled, LBA, DMA
        w[50] = 0x4000;
        w[51] = 0x0200;
        w[53] = 0x0007; // words 54-58, 64-70 and 88 are valid
        w[54] = c.cylinders as u16;
        w[55] = c.heads as u16;
        w[56] = c.sectors as u16;
        let cur = c.capacity().min(u64::from(u32::MAX)) as u32;
        w[57] = cur as u16;
        w[58] = (cur >> 16) as u16;
        if self.multiple != 0 {
            w[59] = 0x0100 | self.multiple;
        }
        let lba28 = sectors.min(0x0FFF_FFFF) as u32;
        w[60] = lba28 as u16;
        w[61] = (lba28 >> 16) as u16;
        self.dma_words(&mut w);
        w[80] = 0x007E; // ATA-1 to ATA-6
        w[82] = 0x4020 | 0x4000; // NOP, write cache
        w[83] = 0x4000 | 0x2000 | 0x1000 | 0x0400; // FLUSH CACHE EXT, FLUSH CACHE, LBA48
        w[84] = 0x4000;
        w[85] = 0x4000 | if self.write_cache { 0x0020 } else { 0 };
        w[86] = 0x2000 | 0x1000 | 0x0400;
        w[87] = 0x4000;
        w[93] = 0x600B;
        for (i, word) in w[100..104].iter_mut().enumerate() {
            *word = (sectors >> (16 * i)) as u16;
        }
        finish_identify(w)
    }

    fn identify_packet(&self) -> Vec<u8> {
        let mut w = [0u16; 256];
        // ATAPI, CD-ROM, removable, DRQ within 50 us, 12-byte packets.
        w[0] = 0x8000 | 0x0500 | 0x0080 | 0x0040;
        ata_string(&mut w[10..20], &self.serial);
        ata_string(&mut w[23..27], "0.1");
        ata_string(&mut w[27..47], "BT86 CD-ROM");
        w[49] = 0x0B00; // IORDY, LBA, DMA
        w[50] = 0x4000;
        w[53] = 0x0006;
        self.dma_words(&mut w);
        w[71] = 30;
        w[72] = 30;
        w[80] = 0x007E;
        w[82] = 0x4010; // NOP, PACKET
        w[83] = 0x4000;
        w[84] = 0x4000;
        w[85] = 0x4010;
        w[87] = 0x4000;
        w[93] = 0x600B;
        finish_identify(w)
    }

    /// Words 63-68 and 88: supported and selected DMA and PIO modes.
    fn dma_words(&self, w: &mut [u16; 256]) {
        w[63] = 0x0007;
        w[64] = 0x0003;
        w[65] = 120;
        w[66] = 120;
        w[67] = 120;
        w[68] = 120;
        w[88] = 0x003F;
        match self.transfer_mode {
            Some(m) if m >> 3 == 4 => w[63] |= 0x100 << (m & 7),
            Some(m) if m >> 3 == 8 => w[88] |= 0x100 << (m & 7),
            _ => {}
        }
    }
}

fn dma_ready(ctx: &Ctx) -> bool {
    ctx.bus_master_enabled && ctx.bm.command & 1 != 0
}

/// The next medium request's length: whole PIO blocks (so no DRQ block straddles two
/// requests), at most [`CHUNK`].
fn chunk_len(x: &Xfer) -> usize {
    let unit = if x.protocol == Protocol::Ata && !x.dma {
        x.block
    } else {
        x.unit as usize
    };
    let per = (CHUNK / unit).max(1) * unit;
    (x.left.min(per as u64)) as usize
}

/// Writes `s` into `words` as an ATA string: two characters per word, the first in the high
/// byte, padded with spaces.
fn ata_string(words: &mut [u16], s: &str) {
    let bytes = s.as_bytes();
    for (i, w) in words.iter_mut().enumerate() {
        let hi = bytes.get(2 * i).copied().unwrap_or(b' ');
        let lo = bytes.get(2 * i + 1).copied().unwrap_or(b' ');
        *w = u16::from_be_bytes([hi, lo]);
    }
}

/// Serializes IDENTIFY data with the integrity word (255): signature A5h and a checksum that
/// makes the 512 bytes sum to zero.
fn finish_identify(mut w: [u16; 256]) -> Vec<u8> {
    w[255] = 0x00A5;
    let mut bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
    let sum = bytes[..511].iter().fold(0u8, |a, b| a.wrapping_add(*b));
    bytes[511] = 0u8.wrapping_sub(sum);
    bytes
}

/// One IDE channel: up to two drives, the device control register, INTRQ and the bus master.
struct Channel {
    drives: [Option<Drive>; 2],
    select: usize,
    control: u8,
    intrq: bool,
    irq: IrqLine,
    bm: BusMaster,
}

impl Channel {
    fn selected(&mut self) -> Option<&mut Drive> {
        self.drives[self.select].as_mut()
    }

    fn any_drive(&self) -> bool {
        self.drives.iter().any(Option::is_some)
    }

    fn update_line(&mut self) {
        self.irq.set_level(self.intrq && self.control & 0x02 == 0);
    }

    fn interrupt(&mut self, irq: Irq) {
        if irq == Irq::Raise {
            self.intrq = true;
            self.bm.status |= bm_status::INTERRUPT;
            self.update_line();
        }
    }

    fn ctx<'a>(
        bm: &'a mut BusMaster,
        memory: &'a GuestMemory,
        bus_master_enabled: bool,
        tag: u64,
    ) -> Ctx<'a> {
        Ctx {
            memory,
            bm,
            bus_master_enabled,
            tag,
        }
    }

    /// Runs `f` on drive `unit` with a context, then raises the interrupt it asks for.
    fn with_drive(
        &mut self,
        unit: usize,
        memory: &GuestMemory,
        bme: bool,
        f: impl FnOnce(&mut Drive, &mut Ctx) -> Irq,
    ) {
        let Channel { drives, bm, .. } = self;
        let Some(drive) = drives[unit].as_mut() else {
            return;
        };
        let mut ctx = Self::ctx(bm, memory, bme, drive.generation);
        let irq = f(drive, &mut ctx);
        self.interrupt(irq);
    }

    fn read_register(&mut self, reg: u64, hob: bool) -> u8 {
        if !self.any_drive() {
            return 0xFF; // nothing drives the bus
        }
        if reg == 7 {
            self.intrq = false;
            self.update_line();
        }
        let select = self.select;
        let other = self.drives[select ^ 1].as_ref().map(|d| d.tf);
        let Some(d) = self.selected() else {
            // Device 0 answers for an absent device 1 (and vice versa): status 0, the task
            // file as last written.
            let tf = other.unwrap_or_default();
            return match reg {
                1 | 7 => 0,
                2 => tf.count[usize::from(hob)],
                3 => tf.lba_low[usize::from(hob)],
                4 => tf.lba_mid[usize::from(hob)],
                5 => tf.lba_high[usize::from(hob)],
                6 => tf.device,
                _ => 0,
            };
        };
        let h = usize::from(hob);
        match reg {
            1 => d.error,
            2 => d.tf.count[h],
            3 => d.tf.lba_low[h],
            4 => d.tf.lba_mid[h],
            5 => d.tf.lba_high[h],
            6 => d.tf.device,
            7 => d.status,
            _ => 0,
        }
    }

    fn alt_status(&mut self) -> u8 {
        if !self.any_drive() {
            return 0xFF;
        }
        self.selected().map_or(0, |d| d.status)
    }

    fn write_register(&mut self, reg: u64, v: u8, memory: &GuestMemory, bme: bool) {
        // A write to any command block register clears HOB.
        self.control &= !0x80;
        if reg == 7 {
            let unit = self.select;
            let busy = self
                .selected()
                .is_none_or(|d| d.status & status::BSY != 0 && !(d.is_atapi() && v == 0x08));
            if busy {
                return;
            }
            self.intrq = false;
            self.update_line();
            if v == 0x90 {
                // EXECUTE DEVICE DIAGNOSTIC runs on both devices; device 0 interrupts.
                for d in self.drives.iter_mut().flatten() {
                    d.reset();
                }
                self.select = 0;
                self.interrupt(Irq::Raise);
                return;
            }
            self.with_drive(unit, memory, bme, |d, ctx| d.command(v, ctx));
            return;
        }
        for d in self.drives.iter_mut().flatten() {
            let tf = &mut d.tf;
            match reg {
                1 => push(&mut tf.feature, v),
                2 => push(&mut tf.count, v),
                3 => push(&mut tf.lba_low, v),
                4 => push(&mut tf.lba_mid, v),
                5 => push(&mut tf.lba_high, v),
                6 => tf.device = v | 0xA0,
                _ => {}
            }
        }
        if reg == 6 {
            self.select = usize::from(v & 0x10 != 0);
        }
    }

    fn write_control(&mut self, v: u8) {
        let was_reset = self.control & 0x04 != 0;
        self.control = v;
        let reset = v & 0x04 != 0;
        if reset && !was_reset {
            for d in self.drives.iter_mut().flatten() {
                d.generation += 1;
                d.phase = Phase::Reset;
                d.xfer = None;
                d.status = status::BSY;
            }
        } else if !reset && was_reset {
            for d in self.drives.iter_mut().flatten() {
                d.reset();
            }
            self.select = 0;
            self.intrq = false;
        }
        self.update_line();
    }

    fn read_data(&mut self, out: &mut [u8], memory: &GuestMemory, bme: bool) {
        let unit = self.select;
        let Some(d) = self.selected() else {
            out.fill(0xFF);
            return;
        };
        if d.data_in(out) {
            self.with_drive(unit, memory, bme, Drive::pump);
        }
    }

    fn write_data(&mut self, data: &[u8], memory: &GuestMemory, bme: bool) {
        let unit = self.select;
        let Some(d) = self.selected() else {
            return;
        };
        if d.data_out(data) {
            self.with_drive(unit, memory, bme, Drive::block_out);
        }
    }

    /// Lets a drive waiting for the bus master go on.
    fn kick_dma(&mut self, memory: &GuestMemory, bme: bool) {
        for unit in 0..2 {
            let waiting = self.drives[unit]
                .as_ref()
                .is_some_and(|d| matches!(d.phase, Phase::DmaWait));
            if waiting {
                self.with_drive(unit, memory, bme, Drive::pump);
            }
        }
    }

    fn write_bus_master(&mut self, reg: u64, v: u8, memory: &GuestMemory, bme: bool) {
        match reg {
            0 => {
                let was = self.bm.command & 1 != 0;
                self.bm.command = v & 0x09;
                let start = v & 1 != 0;
                if start && !was {
                    self.bm.status |= bm_status::ACTIVE;
                    self.bm.prd = None;
                    self.kick_dma(memory, bme);
                } else if !start && was {
                    self.bm.status &= !bm_status::ACTIVE;
                }
            }
            2 => {
                let s = &mut self.bm.status;
                *s &= !(v & (bm_status::ERROR | bm_status::INTERRUPT));
                *s = (*s & !0x60) | (v & 0x60);
            }
            4..=7 => {
                let mut b = self.bm.prd_table.to_le_bytes();
                b[(reg - 4) as usize] = v;
                self.bm.prd_table = u32::from_le_bytes(b) & !3;
            }
            _ => {}
        }
    }

    fn read_bus_master(&self, reg: u64) -> u8 {
        match reg {
            0 => self.bm.command,
            2 => self.bm.status,
            4..=7 => self.bm.prd_table.to_le_bytes()[(reg - 4) as usize],
            _ => 0,
        }
    }

    fn poll(&mut self, memory: &GuestMemory, bme: bool) {
        for unit in 0..2 {
            while let Some(d) = self.drives[unit].as_mut() {
                let Some(c) = d.queue.try_complete() else {
                    break;
                };
                d.outstanding = d.outstanding.saturating_sub(1);
                if c.tag != d.generation {
                    continue;
                }
                self.with_drive(unit, memory, bme, |d, ctx| d.complete(c, ctx));
            }
        }
    }
}

/// The controller: two channels sharing the PCI function.
pub struct Ide {
    channels: [Channel; 2],
    memory: Arc<GuestMemory>,
    bus_master_enabled: bool,
}

/// An [`Ide`] shared by its port adapters, its PCI function and the VM.
pub type SharedIde = Arc<Mutex<Ide>>;

impl Ide {
    /// A controller with `drives` as primary master, primary slave, secondary master and
    /// secondary slave, interrupting through `irqs` (primary, secondary).
    pub fn new(
        memory: Arc<GuestMemory>,
        irqs: [IrqLine; 2],
        drives: [Option<DriveConfig>; 4],
    ) -> Self {
        let [p0, p1, s0, s1] = drives;
        let [irq0, irq1] = irqs;
        let drive =
            |c: Option<DriveConfig>, n: usize| c.map(|c| Drive::new(c, format!("BT86-{n:04}")));
        let channel = |a, b, irq| Channel {
            drives: [a, b],
            select: 0,
            control: 0,
            intrq: false,
            irq,
            bm: BusMaster::default(),
        };
        let mut ide = Self {
            channels: [
                channel(drive(p0, 1), drive(p1, 2), irq0),
                channel(drive(s0, 3), drive(s1, 4), irq1),
            ],
            memory,
            bus_master_enabled: false,
        };
        for ch in &mut ide.channels {
            // Bus-master status bits 5/6: firmware found the drive DMA-capable.
            for (unit, d) in ch.drives.iter().enumerate() {
                if d.is_some() {
                    ch.bm.status |= 0x20 << unit;
                }
            }
        }
        ide
    }

    /// Finishes commands whose I/O completed.
    pub fn poll(&mut self) {
        let bme = self.bus_master_enabled;
        for ch in &mut self.channels {
            ch.poll(&self.memory, bme);
        }
    }

    /// Whether a request is with an I/O thread (a halted CPU will be woken by it).
    pub fn in_flight(&self) -> bool {
        self.channels
            .iter()
            .flat_map(|c| c.drives.iter().flatten())
            .any(|d| d.outstanding > 0)
    }

    /// The drives' I/O counters: (name, reads, writes, flushes, bytes read, bytes written).
    pub fn drive_stats(&self) -> Vec<(String, [u64; 5])> {
        use std::sync::atomic::Ordering::Relaxed;
        self.channels
            .iter()
            .flat_map(|c| c.drives.iter().flatten())
            .map(|d| {
                let c = d.queue.counters();
                (
                    d.queue.name().to_string(),
                    [
                        c.reads.load(Relaxed),
                        c.writes.load(Relaxed),
                        c.flushes.load(Relaxed),
                        c.bytes_read.load(Relaxed),
                        c.bytes_written.load(Relaxed),
                    ],
                )
            })
            .collect()
    }

    fn set_bus_master_enabled(&mut self, on: bool) {
        self.bus_master_enabled = on;
        if on {
            for ch in &mut self.channels {
                ch.kick_dma(&self.memory, true);
            }
        }
    }
}

/// Which of the controller's port ranges an adapter serves.
#[derive(Debug, Clone, Copy)]
pub enum IdePortKind {
    /// A channel's command block (0 primary, 1 secondary).
    Command(usize),
    /// A channel's control block.
    Control(usize),
    /// The bus-master registers (BAR4).
    BusMaster,
}

/// Bus adapter over a shared [`Ide`].
pub struct IdePorts {
    ide: SharedIde,
    kind: IdePortKind,
}

impl IdePorts {
    /// The adapter for `kind`.
    pub fn new(ide: SharedIde, kind: IdePortKind) -> Self {
        Self { ide, kind }
    }
}

impl BusDevice for IdePorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut ide = self.ide.lock().unwrap_or_else(|e| e.into_inner());
        let ide = &mut *ide;
        let bme = ide.bus_master_enabled;
        match self.kind {
            IdePortKind::Command(c) if offset == 0 => {
                ide.channels[c].read_data(data, &ide.memory, bme);
            }
            IdePortKind::Command(c) => {
                let ch = &mut ide.channels[c];
                let hob = ch.control & 0x80 != 0;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = ch.read_register(offset + i as u64, hob);
                }
            }
            IdePortKind::Control(c) => {
                data.fill(0xFF);
                data[0] = ide.channels[c].alt_status();
            }
            IdePortKind::BusMaster => {
                for (i, b) in data.iter_mut().enumerate() {
                    let o = offset + i as u64;
                    *b = ide.channels[(o / 8) as usize & 1].read_bus_master(o % 8);
                }
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut ide = self.ide.lock().unwrap_or_else(|e| e.into_inner());
        let ide = &mut *ide;
        let bme = ide.bus_master_enabled;
        match self.kind {
            IdePortKind::Command(c) if offset == 0 => {
                ide.channels[c].write_data(data, &ide.memory, bme);
            }
            IdePortKind::Command(c) => {
                for (i, v) in data.iter().enumerate() {
                    ide.channels[c].write_register(offset + i as u64, *v, &ide.memory, bme);
                }
            }
            IdePortKind::Control(c) => ide.channels[c].write_control(data[0]),
            IdePortKind::BusMaster => {
                for (i, v) in data.iter().enumerate() {
                    let o = offset + i as u64;
                    ide.channels[(o / 8) as usize & 1].write_bus_master(
                        o % 8,
                        *v,
                        &ide.memory,
                        bme,
                    );
                }
            }
        }
    }
}

/// The PIIX3 IDE function (8086:7010, class 01/01, programming interface 80h: both channels in
/// legacy mode, bus-master capable), with the bus-master block behind BAR4.
pub struct PiixIde {
    config: ConfigSpace,
    ide: SharedIde,
}

impl PiixIde {
    /// The function over `ide`.
    pub fn new(ide: SharedIde) -> Self {
        let mut config = ConfigSpace::new(0x8086, 0x7010, 0x01, 0x01, 0x80, 0x00);
        config.set_bar(4, Bar::io(BUS_MASTER_PORTS));
        // IDETIM (primary, secondary) and SIDETIM: timing registers firmware and drivers
        // program; kept, not acted on.
        config.set_writable(0x40, &[0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
        // IDETIM bit 15, IDE Decode Enable, for both channels: 0 after power-on (PIIX3 data
        // sheet, IDETIM), set by firmware (SeaBIOS writes 8000h to 40h and 42h). bt86 boots
        // Linux with no firmware, so it does the same; Linux's ata_piix checks the bit and
        // silently skips a channel without it (piix_pata_prereset: -ENOENT).
        config.write(0x41, &[0x80]);
        config.write(0x43, &[0x80]);
        // UDMACTL / UDMATIM (PIIX4).
        config.set_writable(0x48, &[0x0F, 0x00, 0x33, 0x33]);
        Self { config, ide }
    }
}

impl PciFunction for PiixIde {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }
    fn config_written(&mut self) {
        let on = self.config.command() & COMMAND_BUS_MASTER != 0;
        self.ide
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_bus_master_enabled(on);
    }
    fn bar_device(&self, index: usize) -> Option<Box<dyn BusDevice>> {
        (index == 4).then(|| {
            Box::new(IdePorts::new(self.ide.clone(), IdePortKind::BusMaster)) as Box<dyn BusDevice>
        })
    }
    fn bar_name(&self, _index: usize) -> &'static str {
        "ide-busmaster"
    }
}

#[cfg(test)]
mod tests;
