//! Platform device models. Each is a state machine behind [`crate::bus::BusDevice`]; none does host
//! I/O itself (output goes through an injected `Write`, stop requests through [`crate::VmControl`]).

pub mod acpi_pm;
pub mod debug_exit;
pub mod fw_cfg;
pub mod pic;
pub mod pit;
pub mod serial;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// An interrupt request line a device can raise.
///
/// bt86 has no interrupt controller yet: the line counts how often it was raised, so `--stats`
/// can show it, and the PIC will read it when it arrives.
#[derive(Debug, Clone, Default)]
pub struct IrqLine {
    irq: u8,
    raised: Arc<AtomicU64>,
}

impl IrqLine {
    /// The line for ISA IRQ `irq`.
    pub fn new(irq: u8) -> Self {
        Self {
            irq,
            raised: Arc::default(),
        }
    }

    /// The ISA IRQ number.
    pub fn irq(&self) -> u8 {
        self.irq
    }

    /// Raises the line (an edge).
    pub fn raise(&self) {
        self.raised.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times the line was raised.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }
}
