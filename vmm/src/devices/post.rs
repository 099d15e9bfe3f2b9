//! Port 0x80, the POST diagnostic port: firmware writes progress codes there and Linux writes
//! it as an I/O delay. Writes are kept (the last code is useful when a guest stops); reads
//! return all ones, as from an empty ISA port.

use crate::bus::BusDevice;

/// The POST code port.
pub const POST_PORT: u16 = 0x80;

/// The last code written.
#[derive(Debug, Default)]
pub struct PostCode {
    last: u8,
}

impl PostCode {
    /// The last code written.
    pub fn last(&self) -> u8 {
        self.last
    }
}

impl BusDevice for PostCode {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xFF);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            self.last = *b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_code_and_reads_as_an_empty_port() {
        let mut p = PostCode::default();
        p.write(0, &[0x12]);
        p.write(0, &[0x34]);
        assert_eq!(p.last(), 0x34);
        let mut b = [0u8];
        p.read(0, &mut b);
        assert_eq!(b[0], 0xFF);
    }
}
