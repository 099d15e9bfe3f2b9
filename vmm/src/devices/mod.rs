//! Platform device models. Each is a state machine behind [`crate::bus::BusDevice`]; none does host
//! I/O itself (output goes through an injected `Write`, stop requests through [`crate::VmControl`]).

pub mod acpi_pm;
pub mod atapi;
pub mod coprocessor;
pub mod debug_exit;
pub mod fw_cfg;
pub mod i8042;
pub mod ide;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod post;
pub mod rtc;
pub mod serial;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pic::Pic;

/// An ISA interrupt request line a device can raise: wired to the PIC, and counted for
/// `--stats`.
#[derive(Debug, Clone, Default)]
pub struct IrqLine {
    irq: u8,
    raised: Arc<AtomicU64>,
    level: Arc<AtomicBool>,
    pic: Option<Arc<Mutex<Pic>>>,
}

impl IrqLine {
    /// The line for ISA IRQ `irq`, connected to nothing (it only counts).
    pub fn new(irq: u8) -> Self {
        Self {
            irq,
            raised: Arc::default(),
            level: Arc::default(),
            pic: None,
        }
    }

    /// The line for ISA IRQ `irq`, wired to `pic`.
    pub fn wired(irq: u8, pic: Arc<Mutex<Pic>>) -> Self {
        Self {
            pic: Some(pic),
            ..Self::new(irq)
        }
    }

    /// The ISA IRQ number.
    pub fn irq(&self) -> u8 {
        self.irq
    }

    /// Raises the line (an edge).
    pub fn raise(&self) {
        self.raised.fetch_add(1, Ordering::Relaxed);
        if let Some(pic) = &self.pic {
            pic.lock()
                .unwrap_or_else(|e| e.into_inner())
                .pulse_irq(self.irq);
        }
    }

    /// Drives the line to a level, for sources that hold their request until it is serviced
    /// (an IDE channel's INTRQ): an edge-triggered PIC input latches the rising edge. Rising
    /// edges are counted as raises.
    pub fn set_level(&self, high: bool) {
        let was = self.level.swap(high, Ordering::Relaxed);
        if high && !was {
            self.raised.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(pic) = &self.pic {
            pic.lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_irq(self.irq, high);
        }
    }

    /// How many times the line was raised.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }
}
