//! The ACPI PM1a control register, enough for a guest to power the machine off.
//!
//! QEMU's `pc` machine has it at port 0x604 (PIIX4 PM base 0x600), Bochs and old QEMU at 0xB004;
//! hobby and test kernels without an ACPI interpreter write `SLP_EN | SLP_TYP(S5)` = 0x2000 there.
//! S5's SLP_TYP is 0 on those machines, and on ours.

use crate::bus::BusDevice;
use crate::control::{StopRequest, VmControl};

/// PM1a_CNT of QEMU's `pc` machine.
pub const PM1A_CNT_PORT: u16 = 0x604;
/// PM1a_CNT of Bochs and older QEMU.
pub const PM1A_CNT_PORT_BOCHS: u16 = 0xB004;

const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;
/// SLP_TYP value for the S5 (soft-off) state on this platform.
const SLP_TYP_S5: u16 = 0;

/// The PM1a_CNT register (16 bits).
pub struct Pm1aControl {
    value: u16,
    control: VmControl,
}

impl Pm1aControl {
    /// A register that posts power-off requests to `control`. ACPI mode is on (SCI_EN set): there
    /// is no SMI handler to switch modes.
    pub fn new(control: VmControl) -> Self {
        Self {
            value: SCI_EN,
            control,
        }
    }
}

impl BusDevice for Pm1aControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = self.value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = self.value.to_le_bytes();
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = bytes.get_mut(offset as usize + i) {
                *slot = *b;
            }
        }
        let written = u16::from_le_bytes(bytes);
        // SLP_EN is write-only: it triggers the transition and reads back as 0.
        self.value = (written & !SLP_EN) | SCI_EN;
        if written & SLP_EN != 0 {
            let typ = (written & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
            if typ == SLP_TYP_S5 {
                self.control.request_stop(StopRequest::PowerOff);
            } else {
                tracing::debug!("guest asked for sleep type {typ}, which this platform lacks");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slp_en_with_s5_powers_off() {
        let control = VmControl::new();
        let mut pm = Pm1aControl::new(control.clone());
        pm.write(0, &0x2000u16.to_le_bytes());
        assert_eq!(control.pending(), Some(StopRequest::PowerOff));
    }

    #[test]
    fn other_sleep_types_and_plain_writes_do_not() {
        let control = VmControl::new();
        let mut pm = Pm1aControl::new(control.clone());
        pm.write(0, &(SLP_EN | (1 << SLP_TYP_SHIFT)).to_le_bytes());
        pm.write(0, &0x0001u16.to_le_bytes());
        assert_eq!(control.pending(), None);
        let mut v = [0u8; 2];
        pm.read(0, &mut v);
        assert_eq!(u16::from_le_bytes(v) & SLP_EN, 0, "SLP_EN reads back as 0");
        assert_eq!(u16::from_le_bytes(v) & SCI_EN, SCI_EN);
    }

    #[test]
    fn byte_writes_to_the_high_half_work() {
        let control = VmControl::new();
        let mut pm = Pm1aControl::new(control.clone());
        pm.write(1, &[0x20]);
        assert_eq!(control.pending(), Some(StopRequest::PowerOff));
    }
}
