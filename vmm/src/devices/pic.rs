//! The two cascaded 8259A programmable interrupt controllers of the PC/AT, with the ELCR of the
//! PIIX (edge/level control). Master at ports 0x20-0x21 (IRQ 0-7), slave at 0xA0-0xA1 (IRQ 8-15)
//! cascaded into master IRQ 2; ELCR at 0x4D0-0x4D1.
//!
//! Modelled after the 8259A data sheet: ICW1-ICW4 initialisation, OCW1 (mask), OCW2 (EOI and
//! rotation), OCW3 (register read, poll, special mask), fully nested priority with rotation,
//! automatic EOI, and the spurious IRQ 7 answer when the request vanished before the
//! acknowledge.

use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;

/// One 8259A.
#[derive(Debug, Clone, Default)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Line levels, for edge detection.
    lines: u8,
    /// Level-triggered inputs (ELCR, or all with ICW1.LTIM).
    level: u8,
    /// Inputs that can never be level-triggered (the ELCR ignores them).
    elcr_mask: u8,
    elcr: u8,
    vector_base: u8,
    /// The IRQ with the lowest priority; the next one up has the highest.
    lowest: u8,
    /// Initialisation state: which ICW comes next (0 = initialised).
    init_step: u8,
    needs_icw4: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    read_isr: bool,
    poll: bool,
    special_mask: bool,
}

impl Chip {
    fn new(elcr_mask: u8) -> Self {
        Self {
            elcr_mask,
            lowest: 7,
            ..Self::default()
        }
    }

    /// IRQs in priority order, highest first.
    fn by_priority(&self) -> impl Iterator<Item = u8> + use<> {
        let first = (self.lowest + 1) & 7;
        (0..8).map(move |i| (first + i) & 7)
    }

    /// The IRQ this chip would present now, if any.
    fn pending(&self) -> Option<u8> {
        let requests = self.irr & !self.imr;
        let best = self.by_priority().find(|i| requests & (1 << i) != 0)?;
        // In-service interrupts of higher or equal priority block it (unless special mask mode,
        // where only the masked in-service bits are ignored).
        let in_service = if self.special_mask {
            self.isr & !self.imr
        } else {
            self.isr
        };
        let blocked = self
            .by_priority()
            .take_while(|i| *i != best)
            .chain(std::iter::once(best))
            .any(|i| in_service & (1 << i) != 0);
        (!blocked).then_some(best)
    }

    fn set_line(&mut self, irq: u8, high: bool) {
        let bit = 1 << irq;
        let was = self.lines & bit != 0;
        if high {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
        let level = (self.level | self.elcr) & bit != 0;
        if level {
            if high {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if high && !was {
            self.irr |= bit;
        }
    }

    /// The INTA cycle for `irq`: moves it from IRR to ISR (unless automatic EOI).
    fn acknowledge(&mut self, irq: u8) {
        let bit = 1 << irq;
        if (self.level | self.elcr) & bit == 0 {
            self.irr &= !bit;
        }
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.lowest = irq;
            }
        } else {
            self.isr |= bit;
        }
    }

    fn highest_in_service(&self) -> Option<u8> {
        self.by_priority().find(|i| self.isr & (1 << i) != 0)
    }

    fn write(&mut self, port: u8, v: u8) {
        if port == 0 {
            if v & 0x10 != 0 {
                // ICW1: start initialisation.
                self.needs_icw4 = v & 0x01 != 0;
                self.single = v & 0x02 != 0;
                self.level = if v & 0x08 != 0 { 0xFF } else { 0 };
                self.imr = 0;
                self.isr = 0;
                self.irr &= self.level | self.elcr;
                self.lowest = 7;
                self.special_mask = false;
                self.read_isr = false;
                self.poll = false;
                self.auto_eoi = false;
                self.rotate_on_auto_eoi = false;
                self.init_step = 2;
            } else if v & 0x08 != 0 {
                // OCW3.
                if v & 0x02 != 0 {
                    self.read_isr = v & 0x01 != 0;
                }
                self.poll = v & 0x04 != 0;
                if v & 0x40 != 0 {
                    self.special_mask = v & 0x20 != 0;
                }
            } else {
                self.ocw2(v);
            }
            return;
        }
        match self.init_step {
            2 => {
                self.vector_base = v & 0xF8;
                self.init_step = if !self.single {
                    3
                } else if self.needs_icw4 {
                    4
                } else {
                    0
                };
            }
            3 => self.init_step = if self.needs_icw4 { 4 } else { 0 },
            4 => {
                self.auto_eoi = v & 0x02 != 0;
                self.init_step = 0;
            }
            _ => self.imr = v,
        }
    }

    fn ocw2(&mut self, v: u8) {
        let level = v & 7;
        match v >> 5 {
            0b001 => {
                if let Some(irq) = self.highest_in_service() {
                    self.isr &= !(1 << irq);
                }
            }
            0b011 => self.isr &= !(1 << level),
            0b101 => {
                if let Some(irq) = self.highest_in_service() {
                    self.isr &= !(1 << irq);
                    self.lowest = irq;
                }
            }
            0b100 => self.rotate_on_auto_eoi = true,
            0b000 => self.rotate_on_auto_eoi = false,
            0b111 => {
                self.isr &= !(1 << level);
                self.lowest = level;
            }
            0b110 => self.lowest = level,
            _ => {}
        }
    }

    /// A poll read: acknowledges the pending IRQ, if any, and reports it.
    fn poll_read(&mut self) -> u8 {
        self.poll = false;
        match self.pending() {
            Some(irq) => {
                self.acknowledge(irq);
                0x80 | irq
            }
            None => 0,
        }
    }

    fn read(&mut self, port: u8) -> u8 {
        if self.poll {
            return self.poll_read();
        }
        match port {
            0 if self.read_isr => self.isr,
            0 => self.irr,
            _ => self.imr,
        }
    }
}

/// The cascaded pair.
#[derive(Debug, Clone)]
pub struct Pic {
    chips: [Chip; 2],
    spurious: u64,
    acknowledged: u64,
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    /// A pair in its power-on state (uninitialised: everything masked off is up to the BIOS or
    /// the OS; QEMU leaves IMR = 0 too).
    pub fn new() -> Self {
        Self {
            chips: [Chip::new(0xF8), Chip::new(0xDE)],
            spurious: 0,
            acknowledged: 0,
        }
    }

    /// Sets the level of ISA interrupt line `irq` (0-15). Edge-triggered inputs latch a request
    /// on a rising edge; level-triggered inputs request while high.
    pub fn set_irq(&mut self, irq: u8, high: bool) {
        if irq < 8 {
            self.chips[0].set_line(irq, high);
        } else if irq < 16 {
            self.chips[1].set_line(irq - 8, high);
            self.update_cascade();
        }
    }

    /// A rising then falling edge on `irq` (how edge-triggered ISA devices signal).
    pub fn pulse_irq(&mut self, irq: u8) {
        self.set_irq(irq, true);
        self.set_irq(irq, false);
    }

    /// Drives master IR2 from the slave's INT output. The request follows that level: if the
    /// slave withdraws it before the acknowledge, the master drops it too.
    fn update_cascade(&mut self) {
        let slave_out = self.chips[1].pending().is_some();
        self.chips[0].set_line(2, slave_out);
        if !slave_out {
            self.chips[0].irr &= !(1 << 2);
        }
    }

    /// Whether the master's INT output is asserted.
    pub fn has_interrupt(&mut self) -> bool {
        self.update_cascade();
        self.chips[0].pending().is_some()
    }

    /// The interrupt-acknowledge cycle: the vector the CPU should take. With nothing pending any
    /// more, answers the spurious IRQ 7 (or 15) without setting ISR, as the 8259A does.
    pub fn acknowledge(&mut self) -> u8 {
        self.update_cascade();
        self.acknowledged += 1;
        let Some(irq) = self.chips[0].pending() else {
            self.spurious += 1;
            return self.chips[0].vector_base | 7;
        };
        self.chips[0].acknowledge(irq);
        if irq != 2 {
            return self.chips[0].vector_base | irq;
        }
        let vector = match self.chips[1].pending() {
            Some(sirq) => {
                self.chips[1].acknowledge(sirq);
                self.chips[1].vector_base | sirq
            }
            None => {
                self.spurious += 1;
                self.chips[1].vector_base | 7
            }
        };
        self.update_cascade();
        vector
    }

    /// Interrupts acknowledged and spurious answers so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.acknowledged, self.spurious)
    }

    fn port_read(&mut self, chip: usize, port: u8) -> u8 {
        let v = self.chips[chip].read(port);
        self.update_cascade();
        v
    }

    fn port_write(&mut self, chip: usize, port: u8, v: u8) {
        self.chips[chip].write(port, v);
        self.update_cascade();
    }

    fn elcr_write(&mut self, chip: usize, v: u8) {
        let c = &mut self.chips[chip];
        c.elcr = v & c.elcr_mask;
    }
}

/// Bus adapters over one shared [`Pic`]: the master's ports, the slave's, and the ELCR.
pub struct PicPorts {
    pic: Arc<Mutex<Pic>>,
    which: PicPortKind,
}

/// Which of the PIC's port ranges an adapter serves.
#[derive(Debug, Clone, Copy)]
pub enum PicPortKind {
    /// 0x20-0x21.
    Master,
    /// 0xA0-0xA1.
    Slave,
    /// 0x4D0-0x4D1.
    Elcr,
}

impl PicPorts {
    /// An adapter for `which` ports of `pic`.
    pub fn new(pic: Arc<Mutex<Pic>>, which: PicPortKind) -> Self {
        Self { pic, which }
    }
}

impl BusDevice for PicPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut pic = self.pic.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in data.iter_mut().enumerate() {
            let off = (offset as usize + i) & 1;
            *b = match self.which {
                PicPortKind::Master => pic.port_read(0, off as u8),
                PicPortKind::Slave => pic.port_read(1, off as u8),
                PicPortKind::Elcr => pic.chips[off].elcr,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut pic = self.pic.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in data.iter().enumerate() {
            let off = (offset as usize + i) & 1;
            match self.which {
                PicPortKind::Master => pic.port_write(0, off as u8, *b),
                PicPortKind::Slave => pic.port_write(1, off as u8, *b),
                PicPortKind::Elcr => pic.elcr_write(off, *b),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Initialises the pair the way BIOSes and Linux do: vectors 0x20/0x28, cascade on IRQ 2,
    /// 8086 mode, everything unmasked.
    fn initialised() -> Pic {
        let mut p = Pic::new();
        for (chip, base, icw3) in [(0, 0x20, 0x04), (1, 0x28, 0x02)] {
            p.port_write(chip, 0, 0x11);
            p.port_write(chip, 1, base);
            p.port_write(chip, 1, icw3);
            p.port_write(chip, 1, 0x01);
            p.port_write(chip, 1, 0x00);
        }
        p
    }

    fn eoi(p: &mut Pic, chip: usize) {
        p.port_write(chip, 0, 0x20);
    }

    #[test]
    fn edge_request_is_acknowledged_with_the_programmed_vector() {
        let mut p = initialised();
        assert!(!p.has_interrupt());
        p.pulse_irq(0);
        assert!(p.has_interrupt());
        assert_eq!(p.acknowledge(), 0x20);
        assert!(!p.has_interrupt(), "IRR cleared, ISR holds it");
        p.port_write(0, 0, 0x0B); // OCW3: read ISR
        assert_eq!(p.port_read(0, 0), 0x01);
        eoi(&mut p, 0);
        assert_eq!(p.port_read(0, 0), 0x00);
    }

    #[test]
    fn priorities_nest_and_eoi_releases_lower_ones() {
        let mut p = initialised();
        p.pulse_irq(3);
        assert_eq!(p.acknowledge(), 0x23);
        p.pulse_irq(5);
        assert!(!p.has_interrupt(), "IRQ 5 waits behind IRQ 3 in service");
        p.pulse_irq(1);
        assert_eq!(p.acknowledge(), 0x21, "IRQ 1 preempts IRQ 3");
        eoi(&mut p, 0); // ends IRQ 1
        assert!(!p.has_interrupt(), "IRQ 3 still in service");
        eoi(&mut p, 0); // ends IRQ 3
        assert_eq!(p.acknowledge(), 0x25);
    }

    #[test]
    fn masks_hold_requests_until_unmasked() {
        let mut p = initialised();
        p.port_write(0, 1, 0x01);
        p.pulse_irq(0);
        assert!(!p.has_interrupt());
        assert_eq!(p.port_read(0, 1), 0x01, "IMR reads back");
        p.port_write(0, 1, 0x00);
        assert_eq!(p.acknowledge(), 0x20);
    }

    #[test]
    fn slave_interrupts_cascade_through_irq2() {
        let mut p = initialised();
        p.pulse_irq(12);
        assert!(p.has_interrupt());
        assert_eq!(p.acknowledge(), 0x2C);
        p.pulse_irq(1);
        assert_eq!(p.acknowledge(), 0x21, "IRQ 1 outranks the cascade");
        eoi(&mut p, 0);
        // IRQ 9 outranks IRQ 12 on the slave, but the master still has the cascade in service.
        p.pulse_irq(9);
        assert!(!p.has_interrupt());
        eoi(&mut p, 1);
        eoi(&mut p, 0);
        assert_eq!(p.acknowledge(), 0x29);
    }

    #[test]
    fn spurious_irq7_when_the_request_is_gone() {
        let mut p = initialised();
        assert_eq!(p.acknowledge(), 0x27);
        p.port_write(0, 0, 0x0B);
        assert_eq!(p.port_read(0, 0), 0, "a spurious IRQ 7 sets no ISR bit");
        assert_eq!(p.counts().1, 1);
    }

    #[test]
    fn level_triggered_lines_follow_the_level() {
        let mut p = initialised();
        p.elcr_write(1, 0x08); // IRQ 11 level-triggered
        p.set_irq(11, true);
        assert_eq!(p.acknowledge(), 0x2B);
        eoi(&mut p, 1);
        eoi(&mut p, 0);
        assert!(p.has_interrupt(), "still high: requests again");
        p.set_irq(11, false);
        assert!(!p.has_interrupt());
        p.elcr_write(0, 0xFF);
        assert_eq!(p.chips[0].elcr, 0xF8, "IRQ 0-2 cannot be level-triggered");
    }

    #[test]
    fn auto_eoi_and_rotation() {
        let mut p = Pic::new();
        p.port_write(0, 0, 0x13); // ICW1: single, ICW4
        p.port_write(0, 1, 0x08);
        p.port_write(0, 1, 0x03); // ICW4: AEOI, 8086
        p.pulse_irq(4);
        assert_eq!(p.acknowledge(), 0x0C);
        p.pulse_irq(4);
        assert_eq!(p.acknowledge(), 0x0C, "no ISR bit with automatic EOI");
        // Rotate: after a specific rotate on IRQ 4, IRQ 5 has the highest priority.
        p.port_write(0, 0, 0xE4);
        p.pulse_irq(3);
        p.pulse_irq(5);
        assert_eq!(p.acknowledge(), 0x0D);
    }

    #[test]
    fn poll_mode_acknowledges_through_a_read() {
        let mut p = initialised();
        p.pulse_irq(6);
        p.port_write(0, 0, 0x0C); // OCW3: poll
        assert_eq!(p.port_read(0, 0), 0x86);
        p.port_write(0, 0, 0x0C);
        assert_eq!(p.port_read(0, 0), 0x00, "IRQ 6 is in service now");
    }

    #[test]
    fn bus_adapters_reach_the_shared_pair() {
        let pic = Arc::new(Mutex::new(Pic::new()));
        let mut master = PicPorts::new(pic.clone(), PicPortKind::Master);
        let mut elcr = PicPorts::new(pic.clone(), PicPortKind::Elcr);
        master.write(1, &[0x5A]);
        let mut b = [0u8];
        master.read(1, &mut b);
        assert_eq!(b[0], 0x5A);
        elcr.write(1, &[0xFF]);
        elcr.read(1, &mut b);
        assert_eq!(b[0], 0xDE);
    }
}
