//! The split virtqueue of the virtio 1.x specification (OASIS virtio v1.2, section 2.7): the
//! descriptor table, the driver's available ring and the device's used ring, all in guest
//! memory.
//!
//! Everything the guest wrote is checked before it is used: an available index that moved by
//! more than the queue size, a head or `next` index outside the table, a chain longer than the
//! table (which is how a loop shows), an indirect table whose length is not a whole number of
//! descriptors or which is nested, a buffer outside guest RAM. Each of those is a
//! [`QueueError`]; the device then stops using the queue (virtio's DEVICE_NEEDS_RESET), so a
//! hostile driver can neither panic nor hang the host.

use vmdriver::GuestMemory;
use vmdriver::memory::RegionKind;

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (otherwise it reads it).
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors (VIRTIO_F_INDIRECT_DESC).
pub const DESC_F_INDIRECT: u16 = 4;
/// Available ring flag: the driver does not want an interrupt for used buffers.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Bytes of one descriptor.
const DESC_SIZE: u64 = 16;
/// Longest indirect table accepted (entries); the specification bounds nothing but the driver
/// sizes tables by its segment limit, which is far below this.
pub const MAX_INDIRECT: u32 = 1024;

/// Why a queue cannot be used any more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The available index moved by more than the queue holds.
    #[error("the available index moved from {last} to {now}, more than the queue size {size}")]
    AvailOverrun {
        /// The index the device had consumed up to.
        last: u16,
        /// The driver's index.
        now: u16,
        /// The queue size.
        size: u16,
    },
    /// A descriptor index outside the table.
    #[error("descriptor index {index} is outside a table of {size}")]
    BadIndex {
        /// The index.
        index: u32,
        /// Entries in the table.
        size: u32,
    },
    /// A chain visited more descriptors than its table has: it loops.
    #[error("a descriptor chain is longer than its table of {0} entries (a loop)")]
    Loop(u32),
    /// An indirect descriptor whose table is malformed or nested.
    #[error("bad indirect descriptor: {0}")]
    Indirect(&'static str),
    /// A chain that does not have the shape its device's requests need.
    #[error("malformed request: {0}")]
    Request(&'static str),
    /// A ring, table or buffer lies outside guest RAM.
    #[error("{what} at {addr:#x}+{len:#x} is not in guest RAM")]
    NotRam {
        /// Which structure.
        what: &'static str,
        /// Its guest-physical address.
        addr: u64,
        /// Its length.
        len: u64,
    },
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it.
    pub write: bool,
}

/// A descriptor chain the driver made available.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The head's index: what the used ring reports back.
    pub head: u16,
    /// The buffers, in order (read-only ones first, as the specification requires of drivers).
    pub buffers: Vec<Buffer>,
}

/// A split virtqueue's configuration (set by the driver through the transport) and the
/// device's position in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Queue {
    /// The largest size the device supports (a power of two).
    pub max_size: u16,
    /// The size the driver chose.
    pub size: u16,
    /// Whether the driver enabled the queue.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// The next available-ring entry the device will take.
    pub next_avail: u16,
    /// The used index the device will publish next.
    pub next_used: u16,
}

fn ram(mem: &GuestMemory, what: &'static str, addr: u64, len: u64) -> Result<(), QueueError> {
    let ok = usize::try_from(len).ok().is_some_and(|l| {
        mem.layout()
            .region_of(addr, l)
            .is_some_and(|r| r.kind == RegionKind::Ram)
    });
    if ok {
        Ok(())
    } else {
        Err(QueueError::NotRam { what, addr, len })
    }
}

fn read_u16(mem: &GuestMemory, what: &'static str, addr: u64) -> Result<u16, QueueError> {
    let mut b = [0u8; 2];
    mem.read(addr, &mut b)
        .map_err(|_| QueueError::NotRam { what, addr, len: 2 })?;
    Ok(u16::from_le_bytes(b))
}

#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(mem: &GuestMemory, table: u64, index: u32) -> Result<Desc, QueueError> {
    let addr = table + u64::from(index) * DESC_SIZE;
    let mut b = [0u8; 16];
    mem.read(addr, &mut b).map_err(|_| QueueError::NotRam {
        what: "a descriptor",
        addr,
        len: DESC_SIZE,
    })?;
    Ok(Desc {
        addr: u64::from_le_bytes(b[0..8].try_into().unwrap_or_default()),
        len: u32::from_le_bytes(b[8..12].try_into().unwrap_or_default()),
        flags: u16::from_le_bytes([b[12], b[13]]),
        next: u16::from_le_bytes([b[14], b[15]]),
    })
}

impl Queue {
    /// A queue of at most `max_size` entries, after reset.
    pub fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Self::default()
        }
    }

    /// Back to the state after reset (the size returns to the maximum).
    pub fn reset(&mut self) {
        *self = Self::new(self.max_size);
    }

    /// Checks the rings lie in RAM; called when the driver enables the queue.
    pub fn validate(&self, mem: &GuestMemory) -> Result<(), QueueError> {
        let n = u64::from(self.size);
        ram(mem, "the descriptor table", self.desc, n * DESC_SIZE)?;
        ram(mem, "the available ring", self.avail, 6 + 2 * n)?;
        ram(mem, "the used ring", self.used, 6 + 8 * n)
    }

    /// The next chain the driver made available, if any.
    pub fn pop(&mut self, mem: &GuestMemory) -> Result<Option<Chain>, QueueError> {
        if !self.ready || self.size == 0 {
            return Ok(None);
        }
        let now = read_u16(mem, "the available ring", self.avail + 2)?;
        let pending = now.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > self.size {
            return Err(QueueError::AvailOverrun {
                last: self.next_avail,
                now,
                size: self.size,
            });
        }
        let slot = u64::from(self.next_avail % self.size);
        let head = read_u16(mem, "the available ring", self.avail + 4 + 2 * slot)?;
        let buffers = self.walk(mem, head)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(Chain { head, buffers }))
    }

    /// Follows the chain starting at `head`, through at most one indirect table.
    fn walk(&self, mem: &GuestMemory, head: u16) -> Result<Vec<Buffer>, QueueError> {
        let size = u32::from(self.size);
        let mut buffers = Vec::new();
        let mut index = u32::from(head);
        let mut seen = 0u32;
        loop {
            if index >= size {
                return Err(QueueError::BadIndex { index, size });
            }
            seen += 1;
            if seen > size {
                return Err(QueueError::Loop(size));
            }
            let d = read_desc(mem, self.desc, index)?;
            if d.flags & DESC_F_INDIRECT != 0 {
                if d.flags & DESC_F_NEXT != 0 {
                    return Err(QueueError::Indirect("it also has NEXT set"));
                }
                walk_indirect(mem, d, &mut buffers)?;
                return Ok(buffers);
            }
            buffers.push(checked_buffer(mem, d)?);
            if d.flags & DESC_F_NEXT == 0 {
                return Ok(buffers);
            }
            index = u32::from(d.next);
        }
    }

    /// Publishes `head` as used with `written` bytes written into its buffers.
    pub fn push_used(
        &mut self,
        mem: &GuestMemory,
        head: u16,
        written: u32,
    ) -> Result<(), QueueError> {
        if self.size == 0 {
            return Ok(());
        }
        let slot = u64::from(self.next_used % self.size);
        let mut elem = [0u8; 8];
        elem[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..8].copy_from_slice(&written.to_le_bytes());
        let at = self.used + 4 + 8 * slot;
        let bad = |addr, len| QueueError::NotRam {
            what: "the used ring",
            addr,
            len,
        };
        mem.write_ram(at, &elem).map_err(|_| bad(at, 8))?;
        self.next_used = self.next_used.wrapping_add(1);
        // The element is in place before the index that publishes it (one thread writes both,
        // and the guest reads them in the opposite order).
        mem.write_ram(self.used + 2, &self.next_used.to_le_bytes())
            .map_err(|_| bad(self.used + 2, 2))
    }

    /// Whether the driver asked not to be interrupted (VIRTQ_AVAIL_F_NO_INTERRUPT).
    pub fn interrupts_suppressed(&self, mem: &GuestMemory) -> bool {
        read_u16(mem, "the available ring", self.avail).is_ok_and(|f| f & AVAIL_F_NO_INTERRUPT != 0)
    }
}

fn checked_buffer(mem: &GuestMemory, d: Desc) -> Result<Buffer, QueueError> {
    let what = if d.flags & DESC_F_WRITE != 0 {
        "a device-writable buffer"
    } else {
        "a device-readable buffer"
    };
    if d.len > 0 {
        ram(mem, what, d.addr, u64::from(d.len))?;
    }
    Ok(Buffer {
        addr: d.addr,
        len: d.len,
        write: d.flags & DESC_F_WRITE != 0,
    })
}

fn walk_indirect(mem: &GuestMemory, d: Desc, buffers: &mut Vec<Buffer>) -> Result<(), QueueError> {
    if d.len == 0 || u64::from(d.len) % DESC_SIZE != 0 {
        return Err(QueueError::Indirect(
            "its length is not a whole number of descriptors",
        ));
    }
    let entries = d.len / DESC_SIZE as u32;
    if entries > MAX_INDIRECT {
        return Err(QueueError::Indirect(
            "its table is longer than 1024 descriptors",
        ));
    }
    ram(mem, "an indirect table", d.addr, u64::from(d.len))?;
    let mut index = 0u32;
    let mut seen = 0u32;
    loop {
        if index >= entries {
            return Err(QueueError::BadIndex {
                index,
                size: entries,
            });
        }
        seen += 1;
        if seen > entries {
            return Err(QueueError::Loop(entries));
        }
        let e = read_desc(mem, d.addr, index)?;
        if e.flags & DESC_F_INDIRECT != 0 {
            return Err(QueueError::Indirect("an indirect table holds another"));
        }
        buffers.push(checked_buffer(mem, e)?);
        if e.flags & DESC_F_NEXT == 0 {
            return Ok(());
        }
        index = u32::from(e.next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmdriver::MemoryLayout;

    const DESC: u64 = 0x1_0000;
    const AVAIL: u64 = 0x2_0000;
    const USED: u64 = 0x3_0000;

    fn setup(size: u16) -> (GuestMemory, Queue) {
        let mem = GuestMemory::new(MemoryLayout::new(4).unwrap()).unwrap();
        let mut q = Queue::new(256);
        q.size = size;
        q.desc = DESC;
        q.avail = AVAIL;
        q.used = USED;
        q.ready = true;
        q.validate(&mem).unwrap();
        (mem, q)
    }

    fn desc(mem: &GuestMemory, table: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write(table + 16 * i, &b).unwrap();
    }

    fn offer(mem: &GuestMemory, slot: u16, head: u16, idx: u16) {
        mem.write(AVAIL + 4 + 2 * u64::from(slot), &head.to_le_bytes())
            .unwrap();
        mem.write(AVAIL + 2, &idx.to_le_bytes()).unwrap();
    }

    #[test]
    fn a_chain_is_popped_and_its_head_published_as_used() {
        let (mem, mut q) = setup(8);
        assert_eq!(q.pop(&mem).unwrap(), None);
        desc(&mem, DESC, 3, 0x5000, 16, DESC_F_NEXT, 5);
        desc(&mem, DESC, 5, 0x6000, 512, DESC_F_NEXT | DESC_F_WRITE, 1);
        desc(&mem, DESC, 1, 0x7000, 1, DESC_F_WRITE, 0);
        offer(&mem, 0, 3, 1);
        let c = q.pop(&mem).unwrap().unwrap();
        assert_eq!(c.head, 3);
        assert_eq!(
            c.buffers,
            [
                Buffer {
                    addr: 0x5000,
                    len: 16,
                    write: false
                },
                Buffer {
                    addr: 0x6000,
                    len: 512,
                    write: true
                },
                Buffer {
                    addr: 0x7000,
                    len: 1,
                    write: true
                },
            ]
        );
        assert_eq!(q.pop(&mem).unwrap(), None);
        q.push_used(&mem, 3, 513).unwrap();
        assert_eq!(mem.read_u32(USED + 4).unwrap(), 3);
        assert_eq!(mem.read_u32(USED + 8).unwrap(), 513);
        let mut idx = [0u8; 2];
        mem.read(USED + 2, &mut idx).unwrap();
        assert_eq!(u16::from_le_bytes(idx), 1);
    }

    #[test]
    fn a_looping_chain_ends_with_an_error() {
        let (mem, mut q) = setup(4);
        desc(&mem, DESC, 0, 0x5000, 16, DESC_F_NEXT, 1);
        desc(&mem, DESC, 1, 0x5000, 16, DESC_F_NEXT, 0);
        offer(&mem, 0, 0, 1);
        assert_eq!(q.pop(&mem), Err(QueueError::Loop(4)));
    }

    #[test]
    fn indices_and_buffers_are_bounds_checked() {
        let (mem, mut q) = setup(4);
        offer(&mem, 0, 4, 1);
        assert_eq!(q.pop(&mem), Err(QueueError::BadIndex { index: 4, size: 4 }));
        let (mem, mut q) = setup(4);
        desc(&mem, DESC, 0, 0x5000, 16, DESC_F_NEXT, 9);
        offer(&mem, 0, 0, 1);
        assert_eq!(q.pop(&mem), Err(QueueError::BadIndex { index: 9, size: 4 }));
        let (mem, mut q) = setup(4);
        desc(&mem, DESC, 0, 0xFFFF_F000, 0x2000, 0, 0);
        offer(&mem, 0, 0, 1);
        assert!(matches!(q.pop(&mem), Err(QueueError::NotRam { .. })));
        let (mem, mut q) = setup(4);
        desc(&mem, DESC, 0, 0x5000, u32::MAX, DESC_F_WRITE, 0);
        offer(&mem, 0, 0, 1);
        assert!(matches!(q.pop(&mem), Err(QueueError::NotRam { .. })));
        let (mem, mut q) = setup(4);
        offer(&mem, 0, 0, 5);
        assert!(matches!(q.pop(&mem), Err(QueueError::AvailOverrun { .. })));
    }

    #[test]
    fn indirect_tables_are_followed_once_and_checked() {
        let (mem, mut q) = setup(4);
        let table = 0x8000;
        desc(&mem, table, 0, 0x5000, 16, DESC_F_NEXT, 1);
        desc(&mem, table, 1, 0x6000, 4096, DESC_F_NEXT | DESC_F_WRITE, 2);
        desc(&mem, table, 2, 0x7000, 1, DESC_F_WRITE, 0);
        desc(&mem, DESC, 2, table, 48, DESC_F_INDIRECT, 0);
        offer(&mem, 0, 2, 1);
        let c = q.pop(&mem).unwrap().unwrap();
        assert_eq!(c.head, 2);
        assert_eq!(c.buffers.len(), 3);
        assert_eq!(c.buffers[1].len, 4096);
        // A loop inside the table.
        desc(&mem, table, 2, 0x7000, 1, DESC_F_WRITE | DESC_F_NEXT, 0);
        offer(&mem, 1, 2, 2);
        assert_eq!(q.pop(&mem), Err(QueueError::Loop(3)));
        // Nested, and a length that is not whole descriptors.
        let (mem, mut q) = setup(4);
        desc(&mem, table, 0, table, 16, DESC_F_INDIRECT, 0);
        desc(&mem, DESC, 0, table, 16, DESC_F_INDIRECT, 0);
        offer(&mem, 0, 0, 1);
        assert!(matches!(q.pop(&mem), Err(QueueError::Indirect(_))));
        let (mem, mut q) = setup(4);
        desc(&mem, DESC, 0, table, 20, DESC_F_INDIRECT, 0);
        offer(&mem, 0, 0, 1);
        assert!(matches!(q.pop(&mem), Err(QueueError::Indirect(_))));
    }
}
