//! The PCI side of QEMU's `pc` machine as bt86 builds it: the i440FX host bridge (00:00.0) with
//! configuration mechanism #1, the PIIX3 ISA bridge (00:01.0) and the PIIX3 IDE controller
//! (00:01.1) with its legacy ports, IRQ 14/15 and drives, virtio block devices from 00:03.0 on,
//! and the I/O threads behind the drives.
//!
//! Like the firmware of a PC, the chipset gives each virtio device a memory BAR in the PCI hole
//! (decoding enabled) and an interrupt line: the PIIX3's PIRQ routing as SeaBIOS programs it
//! for QEMU's `pc` machine (PIRQA-D to IRQ 10, 10, 11, 11; device D's INTA# on PIRQ (D mod 4)),
//! so device 3 interrupts on IRQ 11 as it does under QEMU. The OS may move the BARs.
//!
//! The run loop calls [`Chipset::service`] after every exit: it maps PCI BARs the guest
//! moved, and finishes disk commands whose I/O completed. A halted CPU sleeps in
//! [`Chipset::wait_io`], which an I/O completion ends at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmdriver::GuestMemory;

use crate::block::{BlockBackend, BlockError, BlockQueue, IoNotifier};
use crate::bus::{Bus, BusError};
use crate::devices::ide::{
    COMMAND_PORTS, DriveConfig, Ide, IdePortKind, IdePorts, Media, PRIMARY_COMMAND,
    PRIMARY_CONTROL, PRIMARY_IRQ, PiixIde, SECONDARY_COMMAND, SECONDARY_CONTROL, SECONDARY_IRQ,
    SharedIde,
};
use crate::devices::pci::{
    BarChanges, COMMAND_MEMORY, CONFIG_ADDRESS_PORT, CONFIG_PORTS, PciBus, PciConfigPorts,
    PciFunction, PlainFunction, SharedPciBus, reg,
};
use crate::devices::virtio_blk::{self, SharedVirtioBlk, VirtioBlk, VirtioBlkFunction};
use crate::devices::{IrqChips, IrqLine, PciIntxWire};

/// The PCI device number of the first virtio disk.
pub const FIRST_VIRTIO_DEVICE: u8 = 3;
/// Virtio disks a machine can have (PCI devices 3-10).
pub const MAX_VIRTIO_DISKS: usize = 8;
/// Where the chipset places the first virtio disk's BAR; the next ones follow at
/// [`virtio_blk::BAR_SIZE`] strides. Inside the PCI hole the ACPI tables describe, below the
/// IOAPIC.
pub const VIRTIO_BAR_BASE: u32 = 0xFEA0_0000;
/// The ISA IRQ each PIIX3 PIRQ line is routed to (SeaBIOS's choice for QEMU's `pc` machine).
const PIRQ_IRQS: [u8; 4] = [10, 10, 11, 11];

/// The ISA IRQ PCI device `device`'s INTA# reaches through the PIRQ routing.
pub fn pci_irq(device: u8) -> u8 {
    PIRQ_IRQS[usize::from(device & 3)]
}

/// Where a drive sits on the IDE controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdeSlot {
    /// Primary channel, device 0.
    PrimaryMaster,
    /// Primary channel, device 1.
    PrimarySlave,
    /// Secondary channel, device 0.
    SecondaryMaster,
    /// Secondary channel, device 1.
    SecondarySlave,
}

impl IdeSlot {
    /// The slots in QEMU's `index=` order.
    pub const ALL: [IdeSlot; 4] = [
        IdeSlot::PrimaryMaster,
        IdeSlot::PrimarySlave,
        IdeSlot::SecondaryMaster,
        IdeSlot::SecondarySlave,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Where a drive is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveSlot {
    /// On the IDE controller.
    Ide(IdeSlot),
    /// As a virtio block device of its own on the PCI bus (in order from device 3 on).
    Virtio,
}

/// A drive to attach: where, what kind, and its storage.
pub struct DriveSpec {
    /// Position on the controller.
    pub slot: DriveSlot,
    /// Hard disk or CD-ROM (a virtio drive is a disk).
    pub media: Media,
    /// The image.
    pub backend: Box<dyn BlockBackend>,
}

/// Errors building the chipset.
#[derive(Debug, thiserror::Error)]
pub enum ChipsetError {
    /// Two drives were given the same slot.
    #[error("two drives are attached as IDE {0:?}")]
    SlotTaken(IdeSlot),
    /// More virtio disks than PCI slots for them.
    #[error("at most {MAX_VIRTIO_DISKS} virtio disks")]
    TooManyVirtio,
    /// A CD-ROM on virtio.
    #[error("a CD-ROM cannot be a virtio disk")]
    VirtioCdrom,
    /// A drive's I/O thread could not start.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// Ports clash (a bt86 bug).
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// Per-drive I/O counters for `--stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriveStats {
    /// The image.
    pub name: String,
    /// Read requests.
    pub reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Flushes (fdatasync).
    pub flushes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
}

/// The PCI bus, the IDE controller and the I/O completion notifier.
pub struct Chipset {
    pci: SharedPciBus,
    bar_changes: BarChanges,
    ide: SharedIde,
    virtio: Vec<SharedVirtioBlk>,
    notifier: IoNotifier,
    irqs: Vec<IrqLine>,
}

impl Chipset {
    /// Builds the chipset, maps its fixed ports on `pio` and starts an I/O thread per drive.
    pub fn install(
        pio: &mut Bus,
        memory: Arc<GuestMemory>,
        chips: &IrqChips,
        drives: Vec<DriveSpec>,
    ) -> Result<Self, ChipsetError> {
        let notifier = IoNotifier::new();
        let mut slots: [Option<DriveConfig>; 4] = Default::default();
        let mut virtio_backends = Vec::new();
        for d in drives {
            let ide_slot = match d.slot {
                DriveSlot::Ide(s) => s,
                DriveSlot::Virtio => {
                    if d.media != Media::Disk {
                        return Err(ChipsetError::VirtioCdrom);
                    }
                    if virtio_backends.len() == MAX_VIRTIO_DISKS {
                        return Err(ChipsetError::TooManyVirtio);
                    }
                    virtio_backends.push(d.backend);
                    continue;
                }
            };
            let slot = &mut slots[ide_slot.index()];
            if slot.is_some() {
                return Err(ChipsetError::SlotTaken(ide_slot));
            }
            *slot = Some(DriveConfig {
                queue: BlockQueue::spawn(d.backend, notifier.clone())?,
                media: d.media,
            });
        }
        let ide_irqs = [
            IrqLine::wired(PRIMARY_IRQ, chips),
            IrqLine::wired(SECONDARY_IRQ, chips),
        ];
        let mut irqs = ide_irqs.to_vec();
        let ide = Arc::new(Mutex::new(Ide::new(memory.clone(), ide_irqs, slots)));
        let bar_changes = BarChanges::new();
        let mut bus = PciBus::new(bar_changes.clone());
        bus.add(0, 0, Box::new(PlainFunction::i440fx_host_bridge()));
        bus.add(1, 0, Box::new(PlainFunction::piix3_isa_bridge()));
        bus.add(1, 1, Box::new(PiixIde::new(ide.clone())));
        // One wire per ISA IRQ the PIRQ routing uses, shared by the devices on it.
        let mut wires: Vec<PciIntxWire> = Vec::new();
        let mut virtio = Vec::new();
        for (n, backend) in virtio_backends.into_iter().enumerate() {
            let device = FIRST_VIRTIO_DEVICE + n as u8;
            let irq = pci_irq(device);
            let wire = match wires.iter().find(|w| w.line().irq() == irq) {
                Some(w) => w.clone(),
                None => {
                    let w = PciIntxWire::new(irq, Some(chips));
                    irqs.push(w.line().clone());
                    wires.push(w.clone());
                    w
                }
            };
            let queue = BlockQueue::spawn(backend, notifier.clone())?;
            let blk = Arc::new(Mutex::new(VirtioBlk::new(
                memory.clone(),
                queue,
                wire.pin(device),
                format!("BT86-VIRTIO-{n}"),
            )));
            let mut f = VirtioBlkFunction::new(blk.clone(), irq);
            // What firmware does: place the BAR and enable memory decoding.
            let bar = VIRTIO_BAR_BASE + n as u32 * virtio_blk::BAR_SIZE;
            f.config_mut().write(reg::BAR0, &bar.to_le_bytes());
            f.config_mut()
                .write(reg::COMMAND, &COMMAND_MEMORY.to_le_bytes());
            bus.add(device, 0, Box::new(f));
            virtio.push(blk);
        }
        let pci = Arc::new(Mutex::new(bus));
        pio.insert(
            u64::from(CONFIG_ADDRESS_PORT),
            u64::from(CONFIG_PORTS),
            "pci-config",
            Box::new(PciConfigPorts(pci.clone())),
        )?;
        for (ch, cmd, ctl, names) in [
            (
                0,
                PRIMARY_COMMAND,
                PRIMARY_CONTROL,
                ["ide0-cmd", "ide0-ctl"],
            ),
            (
                1,
                SECONDARY_COMMAND,
                SECONDARY_CONTROL,
                ["ide1-cmd", "ide1-ctl"],
            ),
        ] {
            pio.insert(
                u64::from(cmd),
                u64::from(COMMAND_PORTS),
                names[0],
                Box::new(IdePorts::new(ide.clone(), IdePortKind::Command(ch))),
            )?;
            pio.insert(
                u64::from(ctl),
                1,
                names[1],
                Box::new(IdePorts::new(ide.clone(), IdePortKind::Control(ch))),
            )?;
        }
        Ok(Self {
            pci,
            bar_changes,
            ide,
            virtio,
            notifier,
            irqs,
        })
    }

    /// The PCI bus (for firmware tables and tests).
    pub fn pci(&self) -> &SharedPciBus {
        &self.pci
    }

    /// The disk controllers' interrupt lines (IDE channels, then the PCI wires virtio uses).
    pub fn irq_lines(&self) -> &[IrqLine] {
        &self.irqs
    }

    /// Applies PCI BAR moves to `pio` and `mmio`, and finishes disk commands whose I/O
    /// completed.
    pub fn service(&self, pio: &mut Bus, mmio: &mut Bus) {
        if self.bar_changes.pending() {
            self.bar_changes.apply(pio, mmio);
        }
        if self.notifier.take() {
            self.ide.lock().unwrap_or_else(|e| e.into_inner()).poll();
            for v in &self.virtio {
                v.lock().unwrap_or_else(|e| e.into_inner()).poll();
            }
        }
    }

    /// Sets what makes the running engine return when a disk request completes.
    pub fn set_io_waker(&self, waker: crate::block::IoWaker) {
        self.notifier.set_waker(waker);
    }

    /// How many disk completions made the running engine return early.
    pub fn io_wakeups(&self) -> u64 {
        self.notifier.wakeups()
    }

    /// Whether a disk request is with an I/O thread: a halted CPU will be woken by it.
    pub fn io_in_flight(&self) -> bool {
        self.ide
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .in_flight()
            || self
                .virtio
                .iter()
                .any(|v| v.lock().unwrap_or_else(|e| e.into_inner()).in_flight())
    }

    /// Sleeps until an I/O completion arrives or `timeout` passes.
    pub fn wait_io(&self, timeout: Duration) {
        self.notifier.wait(timeout);
    }

    /// Each drive's I/O counters.
    pub fn drive_stats(&self) -> Vec<DriveStats> {
        let mut all = self
            .ide
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drive_stats();
        all.extend(
            self.virtio
                .iter()
                .map(|v| v.lock().unwrap_or_else(|e| e.into_inner()).drive_stats()),
        );
        all.into_iter()
            .map(
                |(name, [reads, writes, flushes, bytes_read, bytes_written])| DriveStats {
                    name,
                    reads,
                    writes,
                    flushes,
                    bytes_read,
                    bytes_written,
                },
            )
            .collect()
    }
}
