//! The PCI side of QEMU's `pc` machine as bt86 builds it: the i440FX host bridge (00:00.0) with
//! configuration mechanism #1, the PIIX3 ISA bridge (00:01.0) and the PIIX3 IDE controller
//! (00:01.1) with its legacy ports, IRQ 14/15 and drives, and the I/O threads behind the drives.
//!
//! The run loop calls [`Chipset::service`] after every exit: it maps PCI I/O BARs the guest
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
    BarChanges, CONFIG_ADDRESS_PORT, CONFIG_PORTS, PciBus, PciConfigPorts, PlainFunction,
    SharedPciBus,
};
use crate::devices::{IrqChips, IrqLine};

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

/// A drive to attach: where, what kind, and its storage.
pub struct DriveSpec {
    /// Position on the controller.
    pub slot: IdeSlot,
    /// Hard disk or CD-ROM.
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
    notifier: IoNotifier,
    irqs: [IrqLine; 2],
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
        for d in drives {
            let slot = &mut slots[d.slot.index()];
            if slot.is_some() {
                return Err(ChipsetError::SlotTaken(d.slot));
            }
            *slot = Some(DriveConfig {
                queue: BlockQueue::spawn(d.backend, notifier.clone())?,
                media: d.media,
            });
        }
        let irqs = [
            IrqLine::wired(PRIMARY_IRQ, chips),
            IrqLine::wired(SECONDARY_IRQ, chips),
        ];
        let ide = Arc::new(Mutex::new(Ide::new(memory, irqs.clone(), slots)));
        let bar_changes = BarChanges::new();
        let mut bus = PciBus::new(bar_changes.clone());
        bus.add(0, 0, Box::new(PlainFunction::i440fx_host_bridge()));
        bus.add(1, 0, Box::new(PlainFunction::piix3_isa_bridge()));
        bus.add(1, 1, Box::new(PiixIde::new(ide.clone())));
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
        bar_changes.apply(pio);
        Ok(Self {
            pci,
            bar_changes,
            ide,
            notifier,
            irqs,
        })
    }

    /// The PCI bus (for firmware tables and tests).
    pub fn pci(&self) -> &SharedPciBus {
        &self.pci
    }

    /// The IDE channels' interrupt lines.
    pub fn irq_lines(&self) -> &[IrqLine; 2] {
        &self.irqs
    }

    /// Applies PCI BAR moves to `pio` and finishes disk commands whose I/O completed.
    pub fn service(&self, pio: &mut Bus) {
        if self.bar_changes.pending() {
            self.bar_changes.apply(pio);
        }
        if self.notifier.take() {
            self.ide.lock().unwrap_or_else(|e| e.into_inner()).poll();
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
    }

    /// Sleeps until an I/O completion arrives or `timeout` passes.
    pub fn wait_io(&self, timeout: Duration) {
        self.notifier.wait(timeout);
    }

    /// Each drive's I/O counters.
    pub fn drive_stats(&self) -> Vec<DriveStats> {
        self.ide
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drive_stats()
            .into_iter()
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
