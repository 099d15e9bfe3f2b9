//! The 16550A UART on COM1 (ports 0x3F8–0x3FF, IRQ 4), from rust-vmm's vm-superio.
//!
//! The transmitter is always ready: a byte written to THR goes straight to the output backend, and
//! LSR always reports THR empty. Input arrives through [`Uart::receive`] into the 64-byte receive
//! FIFO (with the data-ready interrupt when the guest enabled it); what does not fit waits with the
//! caller, as a real terminal line would be flow-controlled.

use std::io::Write;

use vm_superio::{Serial, Trigger};

use super::IrqLine;
use crate::bus::BusDevice;

/// Base port of COM1.
pub const COM1_BASE: u16 = 0x3F8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u8 = 4;

impl Trigger for IrqLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.raise();
        Ok(())
    }
}

/// A 16550A whose transmitted bytes go to `W`.
pub struct Uart<W: Write + Send> {
    inner: Serial<IrqLine, vm_superio::serial::NoEvents, W>,
    output_failed: bool,
}

impl<W: Write + Send> Uart<W> {
    /// A UART raising `irq` and writing its output to `out`.
    pub fn new(irq: IrqLine, out: W) -> Self {
        Self {
            inner: Serial::new(irq, out),
            output_failed: false,
        }
    }
}

impl<W: Write + Send> Uart<W> {
    /// Whether the guest enabled the received-data interrupt (IER bit 0).
    pub fn rx_interrupt_enabled(&self) -> bool {
        self.inner.state().interrupt_enable & 1 != 0
    }

    /// Moves as many bytes from the front of `input` into the receive FIFO as fit.
    pub fn receive(&mut self, input: &mut std::collections::VecDeque<u8>) {
        let n = self.inner.fifo_capacity().min(input.len());
        if n == 0 {
            return;
        }
        let bytes: Vec<u8> = input.drain(..n).collect();
        // The FIFO has room for all of them, and raising the interrupt cannot fail.
        let _ = self.inner.enqueue_raw_bytes(&bytes);
    }
}

/// A UART shared between the bus and the VM (which feeds it input).
pub struct SharedUart<W: Write + Send>(pub std::sync::Arc<std::sync::Mutex<Uart<W>>>);

impl<W: Write + Send> BusDevice for SharedUart<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, data);
    }
}

impl<W: Write + Send> BusDevice for Uart<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Registers are 8 bits wide; a wider access reads the next registers, as on the ISA bus.
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.inner.read((offset + i as u64) as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            if let Err(e) = self.inner.write((offset + i as u64) as u8, *byte) {
                // The guest cannot be told; say it once and keep the guest running.
                if !self.output_failed {
                    tracing::warn!("serial output failed, further output is lost: {e}");
                    self.output_failed = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LCR: u64 = 3;
    const LSR: u64 = 5;

    #[test]
    fn transmitted_bytes_reach_the_backend() {
        let mut uart = Uart::new(IrqLine::new(COM1_IRQ), Vec::new());
        for b in b"hi" {
            uart.write(THR, &[*b]);
        }
        assert_eq!(uart.inner.writer(), b"hi");
    }

    #[test]
    fn transmitter_is_always_ready() {
        let mut uart = Uart::new(IrqLine::new(COM1_IRQ), Vec::new());
        let mut lsr = [0u8];
        uart.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "THRE and TEMT set");
        uart.write(THR, b"x");
        uart.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "still ready after a write");
    }

    #[test]
    fn thr_empty_interrupt_raises_irq4_when_enabled() {
        let irq = IrqLine::new(COM1_IRQ);
        let mut uart = Uart::new(irq.clone(), Vec::new());
        uart.write(THR, b"a");
        assert_eq!(irq.raised(), 0, "interrupts disabled by default");
        uart.write(IER, &[0x02]); // ETBEI
        uart.write(THR, b"b");
        assert!(irq.raised() >= 1);
    }

    #[test]
    fn divisor_latch_does_not_transmit() {
        let mut uart = Uart::new(IrqLine::new(COM1_IRQ), Vec::new());
        uart.write(LCR, &[0x80]); // DLAB
        uart.write(THR, &[0x01]); // divisor low byte, not data
        uart.write(LCR, &[0x03]);
        uart.write(THR, b"z");
        assert_eq!(uart.inner.writer(), b"z");
    }

    #[test]
    fn received_bytes_fill_the_fifo_raise_data_ready_and_wait_when_full() {
        const RBR: u64 = 0;
        let irq = IrqLine::new(COM1_IRQ);
        let mut uart = Uart::new(irq.clone(), Vec::new());
        uart.write(IER, &[0x01]); // ERBFI: received-data interrupt
        let mut input: std::collections::VecDeque<u8> = (0..100u8).collect();
        uart.receive(&mut input);
        assert_eq!(
            input.len(),
            100 - 64,
            "the FIFO holds 64 bytes; the rest waits"
        );
        assert!(irq.raised() >= 1);
        let mut b = [0u8];
        uart.read(LSR, &mut b);
        assert_eq!(b[0] & 1, 1, "data ready");
        uart.read(RBR, &mut b);
        assert_eq!(b[0], 0);
        uart.receive(&mut input);
        assert_eq!(input.len(), 35);
        for expect in 1..65u8 {
            uart.read(RBR, &mut b);
            assert_eq!(b[0], expect);
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failing_backend_does_not_stop_the_guest() {
        let mut uart = Uart::new(IrqLine::new(COM1_IRQ), Broken);
        uart.write(THR, b"a");
        uart.write(THR, b"b");
        assert!(uart.output_failed);
    }
}
