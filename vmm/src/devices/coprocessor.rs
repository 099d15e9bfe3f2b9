//! Port 0xF0, the PC/AT's "clear math coprocessor busy" port: a write drops IRQ 13 and asserts
//! the processor's IGNNE# input, so a handler for an x87 error reported through FERR# (CR0.NE
//! = 0, the MS-DOS convention) can let the frozen instruction go on. The chipset drops IGNNE#
//! again when FERR# goes away (the VM's run loop does that, see `Vm::sync_ferr`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::bus::BusDevice;

/// The port.
pub const COPROCESSOR_PORT: u16 = 0xF0;

/// The IGNNE# latch a write to port 0xF0 sets.
#[derive(Debug, Default, Clone)]
pub struct CoprocessorPort {
    ignne: Arc<AtomicBool>,
}

impl CoprocessorPort {
    /// The latch, shared with the VM's run loop.
    pub fn latch(&self) -> Arc<AtomicBool> {
        self.ignne.clone()
    }
}

impl BusDevice for CoprocessorPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }

    fn write(&mut self, offset: u64, _data: &[u8]) {
        if offset == 0 {
            self.ignne.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_to_f0_sets_the_ignne_latch() {
        let mut p = CoprocessorPort::default();
        let latch = p.latch();
        p.write(1, &[0]);
        assert!(
            !latch.load(Ordering::Relaxed),
            "port 0xF1 resets, it does not clear busy"
        );
        p.write(0, &[0]);
        assert!(latch.load(Ordering::Relaxed));
        let mut b = [0u8];
        p.read(0, &mut b);
        assert_eq!(b[0], 0xFF);
    }
}
