//! The I/O APIC (an 82093AA: version 0x11, 24 pins), memory-mapped at 0xFEC00000, as Intel's
//! 82093AA data sheet describes it: IOREGSEL at +0x00 selects a register that IOWIN at +0x10
//! reads and writes (ID, version, arbitration ID, and the 24 64-bit redirection entries).
//!
//! A pin's input is a level. An edge-triggered entry sends its message when the input becomes
//! active; a level-triggered one sends it while the input is active and its remote IRR is clear,
//! sets remote IRR, and sends again after the local APIC's EOI for its vector clears remote IRR
//! with the line still active. Masked pins send nothing (a level pin unmasked while active
//! sends then). Polarity (bit 13) inverts the input.

/// Pins on this IOAPIC (GSIs 0-23).
pub const IOAPIC_PINS: usize = 24;
/// Version register: version 0x11, maximum redirection entry 23.
const VERSION: u32 = ((IOAPIC_PINS as u32 - 1) << 16) | 0x11;

const MASKED: u64 = 1 << 16;
const LEVEL: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
const ACTIVE_LOW: u64 = 1 << 13;
const DELIVERY_STATUS: u64 = 1 << 12;
/// Bits the OS can write: vector, delivery and destination mode, polarity, trigger, mask,
/// destination.
const WRITABLE: u64 = 0xFF00_0000_0001_AFFF;

/// A message the IOAPIC sends to the local APICs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message {
    /// The interrupt vector.
    pub vector: u8,
    /// Delivery mode (0 fixed, 1 lowest priority, 2 SMI, 4 NMI, 5 INIT, 7 ExtINT).
    pub delivery_mode: u8,
    /// Destination mode: logical (true) or physical.
    pub logical: bool,
    /// The destination field.
    pub destination: u8,
    /// Level-triggered (the local APIC sets TMR and broadcasts its EOI).
    pub level: bool,
}

/// The IOAPIC's state.
#[derive(Debug, Clone)]
pub struct IoApic {
    id: u8,
    select: u8,
    entries: [u64; IOAPIC_PINS],
    /// Each pin's input level.
    inputs: [bool; IOAPIC_PINS],
}

impl IoApic {
    /// An IOAPIC after reset with APIC ID `id`: every entry masked.
    pub fn new(id: u8) -> Self {
        Self {
            id,
            select: 0,
            entries: [MASKED; IOAPIC_PINS],
            inputs: [false; IOAPIC_PINS],
        }
    }

    fn active(&self, pin: usize) -> bool {
        self.inputs[pin] != (self.entries[pin] & ACTIVE_LOW != 0)
    }

    fn message(&self, pin: usize) -> Message {
        let e = self.entries[pin];
        Message {
            vector: e as u8,
            delivery_mode: ((e >> 8) & 7) as u8,
            logical: e & (1 << 11) != 0,
            destination: (e >> 56) as u8,
            level: e & LEVEL != 0,
        }
    }

    /// Sends pin `pin`'s message if its entry allows it now (level entries: active, unmasked,
    /// remote IRR clear).
    fn service_level(&mut self, pin: usize) -> Option<Message> {
        let e = self.entries[pin];
        if e & LEVEL == 0 || e & MASKED != 0 || e & REMOTE_IRR != 0 || !self.active(pin) {
            return None;
        }
        self.entries[pin] |= REMOTE_IRR;
        Some(self.message(pin))
    }

    /// Drives input `pin` to `high`. Returns the message it sends, if any.
    pub fn set_input(&mut self, pin: usize, high: bool) -> Option<Message> {
        if pin >= IOAPIC_PINS {
            return None;
        }
        let was = self.active(pin);
        self.inputs[pin] = high;
        let e = self.entries[pin];
        if e & LEVEL != 0 {
            return self.service_level(pin);
        }
        (!was && self.active(pin) && e & MASKED == 0).then(|| self.message(pin))
    }

    /// The local APIC's EOI for `vector`: clears remote IRR on the level entries with that
    /// vector; those whose line is still active send again.
    pub fn eoi(&mut self, vector: u8) -> Vec<Message> {
        let mut out = Vec::new();
        for pin in 0..IOAPIC_PINS {
            let e = self.entries[pin];
            if e & REMOTE_IRR != 0 && e as u8 == vector {
                self.entries[pin] &= !REMOTE_IRR;
                out.extend(self.service_level(pin));
            }
        }
        out
    }

    /// Reads the register window: `offset` 0 is IOREGSEL, 0x10 IOWIN (32-bit).
    pub fn read(&self, offset: u64) -> u32 {
        match offset {
            0x00 => u32::from(self.select),
            0x10 => match self.select {
                0x00 => u32::from(self.id & 0xF) << 24,
                0x01 => VERSION,
                0x02 => u32::from(self.id & 0xF) << 24,
                r @ 0x10..=0x3F => {
                    let e = self.entries[usize::from((r - 0x10) / 2)] & !DELIVERY_STATUS;
                    if r % 2 == 0 {
                        e as u32
                    } else {
                        (e >> 32) as u32
                    }
                }
                _ => 0xFFFF_FFFF,
            },
            _ => 0xFFFF_FFFF,
        }
    }

    /// Writes the register window. Returns the message an unmasked, active level entry sends.
    pub fn write(&mut self, offset: u64, value: u32) -> Option<Message> {
        match offset {
            0x00 => self.select = value as u8,
            0x10 => match self.select {
                0x00 => self.id = ((value >> 24) & 0xF) as u8,
                r @ 0x10..=0x3F => {
                    let pin = usize::from((r - 0x10) / 2);
                    let e = self.entries[pin];
                    let new = if r % 2 == 0 {
                        (e & !0xFFFF_FFFF) | u64::from(value)
                    } else {
                        (e & 0xFFFF_FFFF) | (u64::from(value) << 32)
                    };
                    // Remote IRR is read-only (and meaningless for edge entries).
                    let mut new = (new & WRITABLE) | (e & REMOTE_IRR);
                    if new & LEVEL == 0 {
                        new &= !REMOTE_IRR;
                    }
                    self.entries[pin] = new;
                    return self.service_level(pin);
                }
                _ => {}
            },
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(io: &mut IoApic, pin: u8, low: u32, high: u32) -> Option<Message> {
        io.write(0, u32::from(0x11 + pin * 2));
        io.write(0x10, high);
        io.write(0, u32::from(0x10 + pin * 2));
        io.write(0x10, low)
    }

    fn entry(io: &mut IoApic, pin: u8) -> u32 {
        io.write(0, u32::from(0x10 + pin * 2));
        io.read(0x10)
    }

    #[test]
    fn id_and_version() {
        let mut io = IoApic::new(1);
        io.write(0, 0);
        assert_eq!(io.read(0x10), 1 << 24);
        io.write(0, 1);
        assert_eq!(io.read(0x10), 0x0017_0011);
        assert_eq!(entry(&mut io, 5), 1 << 16, "masked after reset");
    }

    #[test]
    fn edge_pins_send_on_activation_only_when_unmasked() {
        let mut io = IoApic::new(1);
        assert_eq!(io.set_input(2, true), None, "masked");
        io.set_input(2, false);
        program(&mut io, 2, 0x30, 0);
        let m = io.set_input(2, true).expect("message");
        assert_eq!((m.vector, m.level, m.destination), (0x30, false, 0));
        assert_eq!(io.set_input(2, true), None, "no new edge");
        io.set_input(2, false);
        assert!(io.set_input(2, true).is_some());
    }

    #[test]
    fn level_pins_hold_remote_irr_until_eoi() {
        let mut io = IoApic::new(1);
        // The line idles high (inactive for an active-low pin) before the entry is unmasked;
        // unmasking while it is low would send at once (see the next test).
        assert_eq!(io.set_input(9, true), None, "masked");
        assert_eq!(
            program(&mut io, 9, 0x0000_A039, 0x0100_0000), // level, active low, vector 0x39
            None,
            "inactive when unmasked"
        );
        // Active low: a low input is active.
        let m = io.set_input(9, false).expect("message");
        assert!(m.level);
        assert_eq!(m.destination, 1);
        assert_ne!(entry(&mut io, 9) & (1 << 14), 0, "remote IRR");
        assert_eq!(io.set_input(9, false), None, "remote IRR blocks");
        assert_eq!(io.eoi(0x38), vec![], "other vector");
        assert_eq!(io.eoi(0x39).len(), 1, "still active: sent again");
        io.set_input(9, true); // inactive
        assert_eq!(io.eoi(0x39), vec![]);
        assert_eq!(entry(&mut io, 9) & (1 << 14), 0);
    }

    #[test]
    fn unmasking_an_active_level_pin_sends() {
        let mut io = IoApic::new(1);
        program(&mut io, 11, 0x0001_8041, 0);
        assert_eq!(io.set_input(11, true), None, "masked");
        let m = program(&mut io, 11, 0x0000_8041, 0).expect("sent on unmask");
        assert_eq!(m.vector, 0x41);
    }
}
