//! The port-I/O and MMIO buses: address ranges mapped to device models.
//!
//! A device is a plain state machine implementing [`BusDevice`]; the bus finds the device owning an
//! address and hands it the access with the offset from the start of its range. Accesses to
//! addresses no device owns behave like an ISA bus with nothing on it: reads return all ones,
//! writes vanish. Both are counted, because a guest poking at absent hardware explains a lot.

use std::collections::BTreeMap;

/// A device model on a bus.
pub trait BusDevice: Send {
    /// A read of `data.len()` bytes at `offset` from the start of the device's range. Must fill
    /// all of `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` from the start of the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// Two devices claim overlapping ranges.
    #[error("{new} at {base:#x}+{len:#x} overlaps {existing}")]
    Overlap {
        /// The device being added.
        new: &'static str,
        /// The device already there.
        existing: &'static str,
        /// Start of the new range.
        base: u64,
        /// Length of the new range.
        len: u64,
    },
    /// A zero-length range.
    #[error("{0} claims an empty range")]
    Empty(&'static str),
}

struct Slot {
    len: u64,
    name: &'static str,
    device: Box<dyn BusDevice>,
    reads: u64,
    writes: u64,
}

/// Access counts for one device, for `--stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStats {
    /// The device's name.
    pub name: &'static str,
    /// First address of its range.
    pub base: u64,
    /// Reads handled.
    pub reads: u64,
    /// Writes handled.
    pub writes: u64,
}

/// One address space (ports or MMIO) of devices keyed by non-overlapping ranges.
#[derive(Default)]
pub struct Bus {
    slots: BTreeMap<u64, Slot>,
    unclaimed_reads: u64,
    unclaimed_writes: u64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `base..base+len`.
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        name: &'static str,
        device: Box<dyn BusDevice>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(name));
        }
        let end = base.saturating_add(len);
        let clash = self
            .slots
            .range(..end)
            .next_back()
            .filter(|(b, s)| **b + s.len > base);
        if let Some((_, existing)) = clash {
            return Err(BusError::Overlap {
                new: name,
                existing: existing.name,
                base,
                len,
            });
        }
        self.slots.insert(
            base,
            Slot {
                len,
                name,
                device,
                reads: 0,
                writes: 0,
            },
        );
        Ok(())
    }

    /// Unmaps the device mapped at `base` (a PCI BAR that moved) and returns it.
    pub fn remove(&mut self, base: u64) -> Option<Box<dyn BusDevice>> {
        self.slots.remove(&base).map(|s| s.device)
    }

    fn find(&mut self, addr: u64) -> Option<(u64, &mut Slot)> {
        let (base, slot) = self.slots.range_mut(..=addr).next_back()?;
        (addr - *base < slot.len).then_some((addr - *base, slot))
    }

    /// Reads from `addr`: the owning device fills `data`, or all ones if nobody owns it.
    /// Returns whether a device handled it.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, slot)) => {
                slot.reads += 1;
                slot.device.read(offset, data);
                true
            }
            None => {
                self.unclaimed_reads += 1;
                tracing::trace!("read of {} bytes at unclaimed {addr:#x}", data.len());
                data.fill(0xFF);
                false
            }
        }
    }

    /// Writes `data` to `addr`; dropped if nobody owns it. Returns whether a device handled it.
    pub fn write(&mut self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, slot)) => {
                slot.writes += 1;
                slot.device.write(offset, data);
                true
            }
            None => {
                self.unclaimed_writes += 1;
                tracing::trace!("write of {data:02x?} to unclaimed {addr:#x}");
                false
            }
        }
    }

    /// Per-device access counts, in address order.
    pub fn stats(&self) -> Vec<DeviceStats> {
        self.slots
            .iter()
            .map(|(base, s)| DeviceStats {
                name: s.name,
                base: *base,
                reads: s.reads,
                writes: s.writes,
            })
            .collect()
    }

    /// Reads and writes that hit no device.
    pub fn unclaimed(&self) -> (u64, u64) {
        (self.unclaimed_reads, self.unclaimed_writes)
    }
}

/// Returns the little-endian value of an access of 1 to 8 bytes.
pub fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .rev()
        .fold(0, |acc, b| (acc << 8) | u64::from(*b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

    /// Records accesses; reads return the offset.
    struct Probe(Log);
    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    fn probe() -> (Box<Probe>, Log) {
        let log = Arc::new(Mutex::new(Vec::new()));
        (Box::new(Probe(log.clone())), log)
    }

    #[test]
    fn accesses_reach_the_owner_with_offsets() {
        let mut bus = Bus::new();
        let (dev, log) = probe();
        bus.insert(0x3F8, 8, "uart", dev).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3FD, &mut b));
        assert_eq!(b, [5]);
        assert!(bus.write(0x3F8, b"x"));
        assert_eq!(log.lock().unwrap().as_slice(), &[(0, vec![b'x'])]);
        assert_eq!(bus.stats()[0].reads, 1);
        assert_eq!(bus.stats()[0].writes, 1);
    }

    #[test]
    fn unclaimed_addresses_read_all_ones_and_are_counted() {
        let mut bus = Bus::new();
        let (dev, _) = probe();
        bus.insert(0x3F8, 8, "uart", dev).unwrap();
        let mut b = [0u8; 2];
        assert!(!bus.read(0x400, &mut b));
        assert_eq!(b, [0xFF, 0xFF]);
        assert!(!bus.read(0x3F7, &mut b));
        assert!(!bus.write(0x3F7, &[1]));
        assert_eq!(bus.unclaimed(), (2, 1));
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(0x510, 2, "fw_cfg", probe().0).unwrap();
        let err = bus.insert(0x511, 1, "other", probe().0).unwrap_err();
        assert!(matches!(
            err,
            BusError::Overlap {
                existing: "fw_cfg",
                ..
            }
        ));
        assert!(bus.insert(0x50F, 2, "below", probe().0).is_err());
        assert!(bus.insert(0x50F, 1, "adjacent", probe().0).is_ok());
        assert!(bus.insert(0x512, 1, "after", probe().0).is_ok());
        assert_eq!(
            bus.insert(0, 0, "empty", probe().0),
            Err(BusError::Empty("empty"))
        );
    }

    #[test]
    fn le_value_assembles_little_endian() {
        assert_eq!(le_value(&[0x34, 0x12]), 0x1234);
        assert_eq!(le_value(&[0x78, 0x56, 0x34, 0x12]), 0x1234_5678);
        assert_eq!(le_value(&[]), 0);
    }
}
