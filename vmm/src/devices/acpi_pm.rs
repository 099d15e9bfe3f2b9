//! The ACPI fixed hardware of a PIIX4-style power-management function, at the ports of QEMU's
//! `pc` machine (PM base 0x600), as the ACPI specification (§4.8, "ACPI Hardware Model")
//! describes the registers:
//!
//! - PM1a_EVT_BLK, 0x600: PM1_STS (16 bits, write 1 to clear) and PM1_EN (16 bits) at 0x602.
//!   Of the status bits only TMR_STS has a source: it is set whenever bit 23 of the PM timer
//!   changes, and raises the SCI while TMR_EN is set.
//! - PM1a_CNT_BLK, 0x604: PM1_CNT. SCI_EN always reads 1 (there is no SMI handler, so the
//!   platform is always in ACPI mode; the FADT says so with SMI_CMD = 0). Writing SLP_EN with
//!   SLP_TYP = S5 powers the machine off. Bochs and old QEMU have this register at 0xB004, where
//!   hobby and test kernels without an ACPI interpreter write `SLP_EN | SLP_TYP(S5)` = 0x2000;
//!   S5's SLP_TYP is 0 on those machines, and on ours (the DSDT's `\_S5` says so).
//! - PM_TMR_BLK, 0x608: the 24-bit power-management timer, counting at 3.579545 MHz from the
//!   VM's monotonic clock. Linux uses it to calibrate the TSC and as a clocksource.
//!
//! The SCI is ISA IRQ 9, level-triggered and active high (the MADT's interrupt source override
//! says so).

use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;
use crate::control::{StopRequest, VmControl};
use crate::devices::IrqLine;
use crate::devices::pit::Clock;

/// PM1a_EVT_BLK of QEMU's `pc` machine: PM1_STS, then PM1_EN at +2.
pub const PM1A_EVT_PORT: u16 = 0x600;
/// PM1a_CNT of QEMU's `pc` machine.
pub const PM1A_CNT_PORT: u16 = 0x604;
/// PM1a_CNT of Bochs and older QEMU.
pub const PM1A_CNT_PORT_BOCHS: u16 = 0xB004;
/// PM_TMR_BLK of QEMU's `pc` machine.
pub const PM_TMR_PORT: u16 = 0x608;
/// The PM timer's rate in Hz (ACPI §4.8.2.1).
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The ISA IRQ the SCI is wired to.
pub const SCI_IRQ: u8 = 9;
/// S5's SLP_TYP value on this platform (the DSDT's `\_S5` package gives it to the OS).
pub const SLP_TYP_S5: u16 = 0;

/// PM1_STS.TMR_STS and PM1_EN.TMR_EN.
const TMR: u16 = 1 << 0;
/// The PM1_EN bits a PIIX4 implements: TMR_EN, GBL_EN, PWRBTN_EN, RTC_EN.
const PM1_EN_MASK: u16 = TMR | (1 << 5) | (1 << 8) | (1 << 10);
const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;
/// The PM timer's counter width: TMR_VAL_EXT is clear in the FADT.
const TIMER_BITS: u32 = 24;

/// The PM timer's count at `now_ns` nanoseconds, not yet truncated to 24 bits.
fn timer_ticks(now_ns: u64) -> u64 {
    super::clock::scale(now_ns, PM_TIMER_HZ, 1_000_000_000)
}

/// The first instant at which the PM timer reads at least `ticks`.
fn ticks_to_ns(ticks: u64) -> u64 {
    super::clock::scale_ceil(ticks, 1_000_000_000, PM_TIMER_HZ)
}

/// The power-management registers' state.
#[derive(Debug)]
pub struct AcpiPm {
    enable: u16,
    control: u16,
    /// PM timer ticks >> 23 when TMR_STS was last cleared: TMR_STS is set while bit 23 has
    /// changed since (counted, so that a full wrap in between still shows).
    tmr_epoch: u64,
    stop: VmControl,
}

impl AcpiPm {
    /// The registers after reset, posting power-off requests to `stop`.
    pub fn new(stop: VmControl) -> Self {
        Self {
            enable: 0,
            control: SCI_EN,
            tmr_epoch: 0,
            stop,
        }
    }

    fn status(&self, now: u64) -> u16 {
        if timer_ticks(now) >> (TIMER_BITS - 1) != self.tmr_epoch {
            TMR
        } else {
            0
        }
    }

    /// The PM timer's value at `now` (24 bits).
    pub fn timer(&self, now: u64) -> u32 {
        (timer_ticks(now) & ((1 << TIMER_BITS) - 1)) as u32
    }

    /// Whether the SCI is asserted at `now`: an enabled status bit is set.
    pub fn sci_level(&self, now: u64) -> bool {
        self.status(now) & self.enable != 0
    }

    /// When the SCI next rises by itself (the timer's bit 23 changing with TMR_EN set), if it
    /// can.
    pub fn next_deadline(&self, now: u64) -> Option<u64> {
        if self.enable & TMR == 0 || self.status(now) & TMR != 0 {
            return None;
        }
        Some(ticks_to_ns((self.tmr_epoch + 1) << (TIMER_BITS - 1)))
    }

    /// Reads the event block (PM1_STS, PM1_EN) at `offset`.
    pub fn read_event(&self, offset: u64, data: &mut [u8], now: u64) {
        let regs = (u32::from(self.enable) << 16) | u32::from(self.status(now));
        read_bytes(u64::from(regs), offset, data);
    }

    /// Writes the event block: ones clear PM1_STS bits, PM1_EN takes the value.
    pub fn write_event(&mut self, offset: u64, data: &[u8], now: u64) {
        for (i, b) in data.iter().enumerate() {
            match offset + i as u64 {
                0 if b & TMR as u8 != 0 => {
                    self.tmr_epoch = timer_ticks(now) >> (TIMER_BITS - 1);
                }
                2 => self.enable = (self.enable & 0xFF00) | (u16::from(*b) & PM1_EN_MASK),
                3 => self.enable = (self.enable & 0x00FF) | ((u16::from(*b) << 8) & PM1_EN_MASK),
                _ => {}
            }
        }
    }

    /// Reads PM1_CNT.
    pub fn read_control(&self, offset: u64, data: &mut [u8]) {
        read_bytes(u64::from(self.control), offset, data);
    }

    /// Writes PM1_CNT: SLP_EN with SLP_TYP = S5 powers off.
    pub fn write_control(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = self.control.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(offset as usize + i) {
                *slot = *b;
            }
        }
        let written = u16::from_le_bytes(bytes);
        // SLP_EN is write-only: it triggers the transition and reads back as 0.
        self.control = (written & !SLP_EN) | SCI_EN;
        if written & SLP_EN != 0 {
            let typ = (written & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
            if typ == SLP_TYP_S5 {
                self.stop.request_stop(StopRequest::PowerOff);
            } else {
                tracing::debug!("guest asked for sleep type {typ}, which this platform lacks");
            }
        }
    }
}

fn read_bytes(value: u64, offset: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
    }
}

/// Which register block a [`AcpiPmPorts`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcpiPmBlock {
    /// PM1a_EVT_BLK (4 ports).
    Event,
    /// PM1a_CNT_BLK (2 ports).
    Control,
    /// PM_TMR_BLK (4 ports).
    Timer,
}

/// One register block of a shared [`AcpiPm`] on the port bus; writes update the SCI line.
pub struct AcpiPmPorts {
    pm: Arc<Mutex<AcpiPm>>,
    clock: Arc<dyn Clock>,
    sci: IrqLine,
    block: AcpiPmBlock,
}

impl AcpiPmPorts {
    /// The `block` ports of `pm`, reading time from `clock` and driving `sci`.
    pub fn new(
        pm: Arc<Mutex<AcpiPm>>,
        clock: Arc<dyn Clock>,
        sci: IrqLine,
        block: AcpiPmBlock,
    ) -> Self {
        Self {
            pm,
            clock,
            sci,
            block,
        }
    }
}

impl BusDevice for AcpiPmPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let now = self.clock.now_ns();
        let pm = self.pm.lock().unwrap_or_else(|e| e.into_inner());
        match self.block {
            AcpiPmBlock::Event => pm.read_event(offset, data, now),
            AcpiPmBlock::Control => pm.read_control(offset, data),
            AcpiPmBlock::Timer => read_bytes(u64::from(pm.timer(now)), offset, data),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let now = self.clock.now_ns();
        let level = {
            let mut pm = self.pm.lock().unwrap_or_else(|e| e.into_inner());
            match self.block {
                AcpiPmBlock::Event => pm.write_event(offset, data, now),
                AcpiPmBlock::Control => pm.write_control(offset, data),
                AcpiPmBlock::Timer => {} // read-only
            }
            pm.sci_level(now)
        };
        self.sci.set_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slp_en_with_s5_powers_off() {
        let control = VmControl::new();
        let mut pm = AcpiPm::new(control.clone());
        pm.write_control(0, &0x2000u16.to_le_bytes());
        assert_eq!(control.pending(), Some(StopRequest::PowerOff));
    }

    #[test]
    fn other_sleep_types_and_plain_writes_do_not() {
        let control = VmControl::new();
        let mut pm = AcpiPm::new(control.clone());
        pm.write_control(0, &(SLP_EN | (1 << SLP_TYP_SHIFT)).to_le_bytes());
        pm.write_control(0, &0x0001u16.to_le_bytes());
        assert_eq!(control.pending(), None);
        let mut v = [0u8; 2];
        pm.read_control(0, &mut v);
        assert_eq!(u16::from_le_bytes(v) & SLP_EN, 0, "SLP_EN reads back as 0");
        assert_eq!(u16::from_le_bytes(v) & SCI_EN, SCI_EN);
    }

    #[test]
    fn byte_writes_to_the_high_half_work() {
        let control = VmControl::new();
        let mut pm = AcpiPm::new(control.clone());
        pm.write_control(1, &[0x20]);
        assert_eq!(control.pending(), Some(StopRequest::PowerOff));
    }

    #[test]
    fn timer_counts_at_3_579545_mhz_and_wraps_at_24_bits() {
        let pm = AcpiPm::new(VmControl::new());
        assert_eq!(pm.timer(0), 0);
        assert_eq!(pm.timer(1_000_000_000), 3_579_545);
        // 2^24 ticks take 4.687 s.
        let wrap = ticks_to_ns(1 << 24);
        assert_eq!(pm.timer(wrap), 0);
        assert_eq!(pm.timer(wrap - 1), (1 << 24) - 1);
    }

    #[test]
    fn tmr_sts_follows_bit_23_and_raises_the_sci_only_when_enabled() {
        let mut pm = AcpiPm::new(VmControl::new());
        let half = ticks_to_ns(1 << 23);
        let mut v = [0u8; 4];
        pm.read_event(0, &mut v, half - 1);
        assert_eq!(v[0] & 1, 0);
        pm.read_event(0, &mut v, half);
        assert_eq!(v[0] & 1, 1, "TMR_STS once bit 23 changed");
        assert!(!pm.sci_level(half), "TMR_EN is clear");
        pm.write_event(2, &[1], half); // TMR_EN
        assert!(pm.sci_level(half));
        pm.write_event(0, &[1], half); // clear TMR_STS
        assert!(!pm.sci_level(half));
        assert_eq!(pm.next_deadline(half), Some(ticks_to_ns(1 << 24)));
        assert!(pm.sci_level(ticks_to_ns(1 << 24)));
        pm.read_event(0, &mut v, half);
        assert_eq!(u16::from_le_bytes([v[2], v[3]]), TMR, "PM1_EN reads back");
    }
}
