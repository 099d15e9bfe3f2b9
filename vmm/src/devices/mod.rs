//! Platform device models. Each is a state machine behind [`crate::bus::BusDevice`]; none does host
//! I/O itself (output goes through an injected `Write`, stop requests through [`crate::VmControl`]).

pub mod acpi_pm;
pub mod atapi;
pub mod clock;
pub mod coprocessor;
pub mod debug_exit;
pub mod fw_cfg;
pub mod i8042;
pub mod ide;
pub mod ioapic;
pub mod lapic;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod post;
pub mod rtc;
pub mod serial;
pub mod virtio_blk;
pub mod virtqueue;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ioapic::{IoApic, Message};
use lapic::{LapicEvent, LocalApic};
use pic::Pic;

/// The IOAPIC input (GSI) an ISA IRQ reaches: the 8254's IRQ 0 is wired to pin 2 (the MADT's
/// interrupt source override says so), every other ISA IRQ to the pin of its number.
pub fn isa_gsi(irq: u8) -> usize {
    if irq == 0 { 2 } else { usize::from(irq) }
}

/// The CPU's local APIC and the IOAPIC, under one lock: an IOAPIC message goes straight into
/// the local APIC, and the local APIC's EOI broadcast straight back to the IOAPIC.
#[derive(Debug, Clone)]
pub struct Apics {
    /// The local APIC.
    pub lapic: LocalApic,
    /// The IOAPIC.
    pub ioapic: IoApic,
}

impl Apics {
    /// Both after reset; the IOAPIC has APIC ID `ioapic_id`.
    pub fn new(ioapic_id: u8) -> Self {
        Self {
            lapic: LocalApic::new(),
            ioapic: IoApic::new(ioapic_id),
        }
    }

    /// Drives IOAPIC input `gsi`.
    pub fn set_gsi(&mut self, gsi: usize, high: bool) {
        if let Some(m) = self.ioapic.set_input(gsi, high) {
            self.deliver(m);
        }
    }

    fn deliver(&mut self, m: Message) {
        match m.delivery_mode {
            0 | 1 => {
                if self.lapic.enabled() && self.lapic.matches(m.destination, m.logical) {
                    self.lapic.accept(m.vector, m.level);
                }
            }
            mode => tracing::warn!(
                "an IOAPIC entry with delivery mode {mode:#b} (SMI, NMI, INIT or ExtINT) fired; \
                 bt86 delivers only fixed and lowest-priority interrupts from the IOAPIC"
            ),
        }
    }

    /// A local APIC register write (`offset` in its page, 32 bits) at time `now`.
    pub fn lapic_write(&mut self, offset: u32, value: u32, now: u64) {
        if let Some(LapicEvent::EoiBroadcast(vector)) = self.lapic.write(offset, value, now) {
            for m in self.ioapic.eoi(vector) {
                self.deliver(m);
            }
        }
    }

    /// An IOAPIC register write (`offset` from its base, 32 bits).
    pub fn ioapic_write(&mut self, offset: u64, value: u32) {
        if let Some(m) = self.ioapic.write(offset, value) {
            self.deliver(m);
        }
    }
}

/// The interrupt controllers an ISA interrupt line is wired to: the 8259 pair and the IOAPIC.
#[derive(Debug, Clone)]
pub struct IrqChips {
    /// The 8259 pair.
    pub pic: Arc<Mutex<Pic>>,
    /// The local APIC and the IOAPIC.
    pub apics: Arc<Mutex<Apics>>,
}

impl IrqChips {
    /// Drives ISA IRQ `irq` to a level on both controllers.
    pub fn set_irq(&self, irq: u8, high: bool) {
        self.pic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_irq(irq, high);
        self.apics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_gsi(isa_gsi(irq), high);
    }

    /// An edge on ISA IRQ `irq` (the line rises and falls again).
    pub fn pulse_irq(&self, irq: u8) {
        self.pic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pulse_irq(irq);
        let mut apics = self.apics.lock().unwrap_or_else(|e| e.into_inner());
        apics.set_gsi(isa_gsi(irq), true);
        apics.set_gsi(isa_gsi(irq), false);
    }
}

/// An ISA interrupt request line a device can raise: wired to the PIC and the IOAPIC, and
/// counted for `--stats`.
#[derive(Debug, Clone, Default)]
pub struct IrqLine {
    irq: u8,
    raised: Arc<AtomicU64>,
    level: Arc<AtomicBool>,
    chips: Option<IrqChips>,
}

impl IrqLine {
    /// The line for ISA IRQ `irq`, connected to nothing (it only counts).
    pub fn new(irq: u8) -> Self {
        Self {
            irq,
            raised: Arc::default(),
            level: Arc::default(),
            chips: None,
        }
    }

    /// The line for ISA IRQ `irq`, wired to `chips`.
    pub fn wired(irq: u8, chips: &IrqChips) -> Self {
        Self {
            chips: Some(chips.clone()),
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
        if let Some(chips) = &self.chips {
            chips.pulse_irq(self.irq);
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
        if let Some(chips) = &self.chips {
            chips.set_irq(self.irq, high);
        }
    }

    /// How many times the line was raised.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }
}

/// A PCI interrupt wire (INTx#) routed to an ISA IRQ, shared by the functions on it: the wire is
/// a wired-OR of their requests. INTx# is active-low, so the IOAPIC pin it reaches idles high
/// and goes low while a function requests (an OS programs such a pin level-triggered,
/// active-low, as ACPI's PCI interrupt routing says); the 8259 sees the request through the
/// PIIX's routing as a request on the IRQ (level-triggered once the OS sets the ELCR).
#[derive(Debug, Clone)]
pub struct PciIntxWire {
    line: IrqLine,
    chips: Option<IrqChips>,
    requests: Arc<Mutex<u32>>,
}

impl PciIntxWire {
    /// The wire on ISA IRQ `irq`, connected to `chips` (or to nothing, for tests).
    pub fn new(irq: u8, chips: Option<&IrqChips>) -> Self {
        let wire = Self {
            line: IrqLine::new(irq),
            chips: chips.cloned(),
            requests: Arc::default(),
        };
        wire.drive(false);
        wire
    }

    fn drive(&self, asserted: bool) {
        if let Some(chips) = &self.chips {
            chips
                .pic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_irq(self.line.irq, asserted);
            chips
                .apics
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_gsi(isa_gsi(self.line.irq), !asserted);
        }
    }

    /// The counting line behind the wire (for `--stats`).
    pub fn line(&self) -> &IrqLine {
        &self.line
    }

    /// The pin of function number `source` (0-31) on this wire.
    pub fn pin(&self, source: u8) -> PciIntx {
        PciIntx {
            wire: self.clone(),
            bit: 1 << (source & 31),
        }
    }

    /// Whether some function requests an interrupt now.
    pub fn asserted(&self) -> bool {
        *self.requests.lock().unwrap_or_else(|e| e.into_inner()) != 0
    }
}

/// One function's INTx# pin on a [`PciIntxWire`].
#[derive(Debug, Clone)]
pub struct PciIntx {
    wire: PciIntxWire,
    bit: u32,
}

impl PciIntx {
    /// Requests (or stops requesting) an interrupt.
    pub fn set(&self, request: bool) {
        let mut r = self.wire.requests.lock().unwrap_or_else(|e| e.into_inner());
        let before = *r != 0;
        if request {
            *r |= self.bit;
        } else {
            *r &= !self.bit;
        }
        let after = *r != 0;
        if after != before {
            if after {
                self.wire.line.raised.fetch_add(1, Ordering::Relaxed);
            }
            self.wire.line.level.store(after, Ordering::Relaxed);
            self.wire.drive(after);
        }
    }

    /// Whether this function requests an interrupt.
    pub fn requesting(&self) -> bool {
        *self.wire.requests.lock().unwrap_or_else(|e| e.into_inner()) & self.bit != 0
    }
}

/// The IOAPIC's register window on the MMIO bus (IOREGSEL at +0, IOWIN at +0x10; 32-bit
/// accesses, narrower ones read or write the low bytes of the register).
pub struct IoApicMmio(pub Arc<Mutex<Apics>>);

impl crate::bus::BusDevice for IoApicMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let apics = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let v = apics.ioapic.read(offset & !3).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get((offset & 3) as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = v.get_mut((offset & 3) as usize + i) {
                *slot = *b;
            }
        }
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ioapic_write(offset & !3, u32::from_le_bytes(v));
    }
}

impl Apics {
    /// A read of `data.len()` bytes at `offset` in the local APIC's register page at `now`:
    /// the registers are 32 bits wide at 16-byte strides; the rest of each stride reads 0.
    pub fn lapic_read(&self, offset: u64, data: &mut [u8], now: u64) {
        let v = self.lapic.read((offset & 0xFF0) as u32, now).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get((offset & 0xF) as usize + i).copied().unwrap_or(0);
        }
    }

    /// A write of `data` at `offset` in the local APIC's register page at `now`. A narrower
    /// write replaces those bytes of the register's current value.
    pub fn lapic_write_bytes(&mut self, offset: u64, data: &[u8], now: u64) {
        let reg = (offset & 0xFF0) as u32;
        let mut v = self.lapic.read(reg, now).to_le_bytes();
        if data.len() >= 4 && offset & 0xF == 0 {
            v.copy_from_slice(&data[..4]);
        } else {
            for (i, b) in data.iter().enumerate() {
                if let Some(slot) = v.get_mut((offset & 0xF) as usize + i) {
                    *slot = *b;
                }
            }
        }
        self.lapic_write(reg, u32::from_le_bytes(v), now);
    }
}
