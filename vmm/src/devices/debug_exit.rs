//! QEMU's isa-debug-exit device: a write of value `v` ends the VM, and bt86 exits with status
//! `(v << 1) | 1`. Test kernels use it to report their result. bt86 maps it at port 0xF4 with four
//! ports, like QEMU's `-device isa-debug-exit,iobase=0xf4,iosize=0x04`.

use crate::bus::{BusDevice, le_value};
use crate::control::{StopRequest, VmControl};

/// Conventional base port.
pub const DEBUG_EXIT_PORT: u16 = 0xF4;
/// Number of ports claimed.
pub const DEBUG_EXIT_PORTS: u16 = 4;

/// The device.
pub struct DebugExit {
    control: VmControl,
}

impl DebugExit {
    /// A device that posts its stop requests to `control`.
    pub fn new(control: VmControl) -> Self {
        Self { control }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // The whole written value counts, whatever its width (QEMU ignores the offset too).
        self.control
            .request_stop(StopRequest::DebugExit(le_value(data) as u32));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_requests_a_stop_with_the_value() {
        let control = VmControl::new();
        let mut dev = DebugExit::new(control.clone());
        assert_eq!(control.pending(), None);
        dev.write(0, &[0x34, 0x12]);
        assert_eq!(control.pending(), Some(StopRequest::DebugExit(0x1234)));
    }
}
