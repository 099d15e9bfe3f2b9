//! Guest-physical memory: one memfd, laid out like a PC.
//!
//! The memfd holds the guest's RAM followed by a firmware (BIOS ROM) area. Guest-physical RAM
//! address `a` lives at memfd offset `a`, so every later view of guest memory (KVM memory slots, the
//! translator's address-space windows, the monitor's own mapping) maps the same file at the same
//! offsets, and the host kernel's page cache is the single copy of guest RAM.
//!
//! The guest-physical map follows the PC/AT layout (and QEMU's `pc` machine):
//!
//! | guest-physical range        | contents                                                   |
//! |-----------------------------|------------------------------------------------------------|
//! | `0x0_0000..0xA_0000`        | conventional RAM (640 KiB)                                 |
//! | `0xA_0000..0xC_0000`        | legacy VGA window: not RAM, every access goes to the bus   |
//! | `0xC_0000..0xE_0000`        | option-ROM space: not RAM, every access goes to the bus    |
//! | `0xE_0000..0x10_0000`       | the last 128 KiB of the firmware area (read-only alias)    |
//! | `0x10_0000..RAM end`        | extended RAM                                               |
//! | `0xC000_0000..4 GiB`        | the PCI/MMIO hole (IOAPIC, local APIC, ...), then firmware |
//! | `4 GiB - 256 KiB..4 GiB`    | the firmware area (read-only), where the reset vector is   |
//!
//! RAM is at most 3 GiB: a 32-bit guest without PAE cannot address RAM placed above 4 GiB.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// End of conventional memory (start of the VGA window).
pub const LOW_RAM_END: u64 = 0xA_0000;
/// Start of extended memory.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// Start of the 32-bit PCI/MMIO hole; RAM never reaches past it.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// Size of the firmware (BIOS ROM) area: 256 KiB, the size of SeaBIOS's `bios-256k.bin`.
pub const FIRMWARE_SIZE: u64 = 0x4_0000;
/// How much of the firmware area's end also appears below 1 MiB.
pub const FIRMWARE_LOW_SIZE: u64 = 0x2_0000;
/// Guest-physical base of the firmware area, right below 4 GiB (the reset vector is its last 16
/// bytes, at `0xFFFF_FFF0`).
pub const FIRMWARE_BASE: u64 = 0x1_0000_0000 - FIRMWARE_SIZE;
/// Guest-physical base of the firmware area's alias below 1 MiB.
pub const FIRMWARE_LOW_BASE: u64 = HIGH_RAM_START - FIRMWARE_LOW_SIZE;

/// Smallest RAM size accepted, in MiB: the low 1 MiB plus room for a kernel.
pub const MIN_RAM_MIB: u64 = 2;
/// Largest RAM size accepted, in MiB: everything below the MMIO hole.
pub const MAX_RAM_MIB: u64 = MMIO_HOLE_START >> 20;

const MIB: u64 = 1 << 20;

/// Errors setting up or accessing guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested RAM size is outside what a 32-bit PC guest can use.
    #[error(
        "guest memory of {mib} MiB is not supported: choose between {MIN_RAM_MIB} and {MAX_RAM_MIB} MiB \
         (RAM above the 32-bit PCI hole would need PAE)"
    )]
    UnsupportedSize {
        /// The size asked for, in MiB.
        mib: u64,
    },
    /// The host refused to create or size the memory file.
    #[error(
        "the host refused to provide {mib} MiB of guest memory ({what}); try a smaller --memory \
         or free host memory"
    )]
    HostRefused {
        /// Size asked for, in MiB.
        mib: u64,
        /// Which host call failed.
        what: &'static str,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// A guest-physical range is not backed by RAM or firmware.
    #[error("guest-physical range {addr:#x}..{end:#x} is not RAM", end = addr + *len as u64)]
    NotRam {
        /// First byte of the access.
        addr: u64,
        /// Length of the access.
        len: usize,
    },
    /// Firmware image larger than the firmware area.
    #[error(
        "firmware image is {len} bytes; at most {FIRMWARE_SIZE} bytes (256 KiB) fit in the BIOS area"
    )]
    FirmwareTooLarge {
        /// Size of the image.
        len: usize,
    },
}

/// What a guest-physical region holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionKind {
    /// Read-write RAM.
    Ram,
    /// The firmware area (read-only to the guest).
    Firmware,
}

/// One contiguous guest-physical range backed by the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// What the range holds.
    pub kind: RegionKind,
    /// First guest-physical address.
    pub guest_addr: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Offset of the first byte in the memory file.
    pub file_offset: u64,
}

impl Region {
    /// One past the last guest-physical address.
    pub fn end(&self) -> u64 {
        self.guest_addr + self.size
    }
}

/// The size of guest RAM and the regions it produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLayout {
    ram_bytes: u64,
}

impl MemoryLayout {
    /// A layout with `mib` MiB of RAM (the total, like QEMU's `-m`: the 384 KiB under the legacy
    /// holes are shadowed, not relocated).
    pub fn new(mib: u64) -> Result<Self, MemoryError> {
        if !(MIN_RAM_MIB..=MAX_RAM_MIB).contains(&mib) {
            return Err(MemoryError::UnsupportedSize { mib });
        }
        Ok(Self {
            ram_bytes: mib * MIB,
        })
    }

    /// RAM size in bytes (the address one past the last RAM byte).
    pub fn ram_bytes(&self) -> u64 {
        self.ram_bytes
    }

    /// RAM size in MiB.
    pub fn ram_mib(&self) -> u64 {
        self.ram_bytes / MIB
    }

    /// Size of the backing memory file: RAM, then the firmware area.
    pub fn file_size(&self) -> u64 {
        self.ram_bytes + FIRMWARE_SIZE
    }

    /// The guest-physical regions backed by memory, in address order.
    pub fn regions(&self) -> [Region; 4] {
        let fw_offset = self.ram_bytes;
        [
            Region {
                kind: RegionKind::Ram,
                guest_addr: 0,
                size: LOW_RAM_END,
                file_offset: 0,
            },
            Region {
                kind: RegionKind::Firmware,
                guest_addr: FIRMWARE_LOW_BASE,
                size: FIRMWARE_LOW_SIZE,
                file_offset: fw_offset + FIRMWARE_SIZE - FIRMWARE_LOW_SIZE,
            },
            Region {
                kind: RegionKind::Ram,
                guest_addr: HIGH_RAM_START,
                size: self.ram_bytes - HIGH_RAM_START,
                file_offset: HIGH_RAM_START,
            },
            Region {
                kind: RegionKind::Firmware,
                guest_addr: FIRMWARE_BASE,
                size: FIRMWARE_SIZE,
                file_offset: fw_offset,
            },
        ]
    }

    /// The region holding all of `addr..addr+len`, if any.
    pub fn region_of(&self, addr: u64, len: usize) -> Option<Region> {
        let end = addr.checked_add(len as u64)?;
        self.regions()
            .into_iter()
            .find(|r| addr >= r.guest_addr && end <= r.end())
    }
}

/// Guest-physical memory: the memory file and the monitor's own mapping of all of it.
///
/// The monitor reads and writes guest memory only while no vCPU runs guest code on another thread
/// (bt86 runs one vCPU, on the thread that owns the `Vm`), so plain copies are race-free.
pub struct GuestMemory {
    layout: MemoryLayout,
    fd: OwnedFd,
    host: NonNull<u8>,
    len: usize,
    code: CodePages,
}

/// Guest-physical pages that hold translated code or traced page tables, and those of them
/// written since the monitor last looked: how writes the monitor makes on the guest's behalf
/// (the interpreter, device DMA, loaders) invalidate translations and shadow mappings. One bit
/// per 4 KiB page of the 4 GiB space in each of two sets.
struct CodePages {
    marked: Box<[AtomicU64]>,
    tables: Box<[AtomicU64]>,
    any_written: AtomicBool,
    written: Mutex<Vec<WrittenRange>>,
}

/// A write to a marked page ([`GuestMemory::take_written_code_ranges`]): the page and the
/// byte range within it that covers what was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenRange {
    /// The page number (guest-physical address >> 12).
    pub page: u32,
    /// First byte written, as an offset in the page.
    pub start: u16,
    /// One past the last byte written (at most 4096).
    pub end: u16,
}

impl CodePages {
    fn new() -> Self {
        Self {
            marked: (0..(1usize << 20) / 64)
                .map(|_| AtomicU64::new(0))
                .collect(),
            tables: (0..(1usize << 20) / 64)
                .map(|_| AtomicU64::new(0))
                .collect(),
            any_written: AtomicBool::new(false),
            written: Mutex::new(Vec::new()),
        }
    }

    fn note_write(&self, addr: u64, len: usize) {
        if len == 0 {
            return;
        }
        let first = addr >> 12;
        let last = (addr + len as u64 - 1) >> 12;
        for page in first..=last.min((1 << 20) - 1) {
            let bit = 1u64 << (page % 64);
            let w = (page / 64) as usize;
            let watched =
                self.marked[w].load(Ordering::Relaxed) | self.tables[w].load(Ordering::Relaxed);
            if watched & bit != 0 {
                let page_start = page << 12;
                let start = addr.max(page_start) - page_start;
                let end = (addr + len as u64).min(page_start + 0x1000) - page_start;
                let range = WrittenRange {
                    page: page as u32,
                    start: start as u16,
                    end: end as u16,
                };
                let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
                match written.last_mut() {
                    // Consecutive writes to one page (a PTE and its neighbours, a string
                    // store) share one entry covering them all.
                    Some(last) if last.page == range.page => {
                        last.start = last.start.min(range.start);
                        last.end = last.end.max(range.end);
                    }
                    _ => written.push(range),
                }
                self.any_written.store(true, Ordering::Release);
            }
        }
    }
}

// SAFETY: `host` points into a MAP_SHARED mapping owned by this struct for its whole life; moving
// the struct to another thread moves that ownership with it.
unsafe impl Send for GuestMemory {}
// SAFETY: shared access only copies bytes through raw pointers into the shared mapping; no Rust
// reference into guest memory is ever created, so concurrent readers (a vCPU, a device) can at worst
// observe torn guest data, exactly as concurrent CPUs and DMA can on real hardware.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Creates the memory file and maps it into the monitor.
    pub fn new(layout: MemoryLayout) -> Result<Self, MemoryError> {
        let mib = layout.ram_mib();
        let refused = |what, source| MemoryError::HostRefused { mib, what, source };
        let name = CString::new("bt86-guest-ram").expect("static name has no NUL");
        // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no other preconditions.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(refused("memfd_create", io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = layout.file_size();
        // SAFETY: ftruncate on a descriptor we own; failure is reported through errno.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(refused("ftruncate", io::Error::last_os_error()));
        }
        let len = usize::try_from(len).map_err(|_| MemoryError::UnsupportedSize { mib })?;
        // SAFETY: a fresh shared mapping of our own file at an address the kernel picks; it aliases
        // no Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(refused("mmap", io::Error::last_os_error()));
        }
        let host = NonNull::new(ptr.cast::<u8>()).expect("mmap never returns NULL on success");
        Ok(Self {
            layout,
            fd,
            host,
            len,
            code: CodePages::new(),
        })
    }

    /// The layout this memory was created with.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The memory file, for mapping it elsewhere (KVM slots, address-space windows).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The monitor's host address of memory-file offset `file_offset`.
    ///
    /// Valid for `file_size() - file_offset` bytes for as long as `self` lives.
    pub fn host_address(&self, file_offset: u64) -> *mut u8 {
        assert!(
            file_offset <= self.len as u64,
            "offset past the memory file"
        );
        // SAFETY: the offset is within the mapping (checked above).
        unsafe { self.host.as_ptr().add(file_offset as usize) }
    }

    fn file_offset(&self, addr: u64, len: usize) -> Result<usize, MemoryError> {
        let region = self
            .layout
            .region_of(addr, len)
            .ok_or(MemoryError::NotRam { addr, len })?;
        Ok((region.file_offset + (addr - region.guest_addr)) as usize)
    }

    /// Copies guest-physical `addr..addr+buf.len()` into `buf`. The range must lie in one region.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let off = self.file_offset(addr, buf.len())?;
        // SAFETY: `off..off+len` lies within the mapping (a region is within the file), and `buf`
        // is a distinct Rust allocation, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.host.as_ptr().add(off), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Marks (or unmarks) the guest-physical page holding `addr` as holding translated code:
    /// writes through this struct to a marked page are recorded for
    /// [`GuestMemory::take_written_code_pages`].
    pub fn mark_code_page(&self, addr: u32, on: bool) {
        let page = addr >> 12;
        let bit = 1u64 << (page % 64);
        let word = &self.code.marked[(page / 64) as usize];
        if on {
            word.fetch_or(bit, Ordering::Relaxed);
        } else {
            word.fetch_and(!bit, Ordering::Relaxed);
        }
    }

    /// Marks (or unmarks) the guest-physical page holding `addr` as holding a page table the
    /// shadow MMU traces: writes through this struct to it are recorded for
    /// [`GuestMemory::take_written_code_pages`] as well.
    pub fn mark_table_page(&self, addr: u32, on: bool) {
        let page = addr >> 12;
        let bit = 1u64 << (page % 64);
        let word = &self.code.tables[(page / 64) as usize];
        if on {
            word.fetch_or(bit, Ordering::Relaxed);
        } else {
            word.fetch_and(!bit, Ordering::Relaxed);
        }
    }

    /// The page numbers (address >> 12) of marked pages (code or traced page tables) written
    /// since the last call, if any.
    pub fn take_written_code_pages(&self) -> Vec<u32> {
        self.take_written_code_ranges()
            .into_iter()
            .map(|r| r.page)
            .collect()
    }

    /// Like [`GuestMemory::take_written_code_pages`], with the part of each page written: one
    /// range per page, in page order, covering every write to it since the last call.
    pub fn take_written_code_ranges(&self) -> Vec<WrittenRange> {
        // A plain load first: the common case (nothing written) stays off the atomic swap.
        if !self.code.any_written.load(Ordering::Acquire)
            || !self.code.any_written.swap(false, Ordering::AcqRel)
        {
            return Vec::new();
        }
        let mut ranges =
            std::mem::take(&mut *self.code.written.lock().unwrap_or_else(|e| e.into_inner()));
        ranges.sort_unstable_by_key(|r| r.page);
        ranges.dedup_by(|next, kept| {
            if next.page != kept.page {
                return false;
            }
            kept.start = kept.start.min(next.start);
            kept.end = kept.end.max(next.end);
            true
        });
        ranges
    }

    /// Copies `data` to guest-physical `addr`. The range must lie in one region; the monitor may
    /// write the firmware area (the guest cannot).
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let off = self.file_offset(addr, data.len())?;
        self.code.note_write(addr, data.len());
        // SAFETY: as in `read`; the mapping is writable.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.host.as_ptr().add(off), data.len())
        };
        Ok(())
    }

    /// Like [`GuestMemory::write`], but only into RAM: for writes on the guest's behalf (device
    /// DMA), which must not modify the firmware area.
    pub fn write_ram(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        match self.layout.region_of(addr, data.len()) {
            Some(r) if r.kind == RegionKind::Ram => self.write(addr, data),
            _ => Err(MemoryError::NotRam {
                addr,
                len: data.len(),
            }),
        }
    }

    /// Fills guest-physical `addr..addr+len` with `byte`. The range must lie in one region.
    pub fn fill(&self, addr: u64, len: usize, byte: u8) -> Result<(), MemoryError> {
        let off = self.file_offset(addr, len)?;
        self.code.note_write(addr, len);
        // SAFETY: `off..off+len` lies within the writable mapping.
        unsafe { std::ptr::write_bytes(self.host.as_ptr().add(off), byte, len) };
        Ok(())
    }

    /// Reads a little-endian u32 at guest-physical `addr`.
    pub fn read_u32(&self, addr: u64) -> Result<u32, MemoryError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Installs a firmware image at the top of the firmware area, so its last bytes hold the reset
    /// vector at `0xFFFF_FFF0` (and appear below 1 MiB, ending at `0xF_FFFF`).
    pub fn load_firmware(&self, image: &[u8]) -> Result<(), MemoryError> {
        if image.len() as u64 > FIRMWARE_SIZE {
            return Err(MemoryError::FirmwareTooLarge { len: image.len() });
        }
        self.write(0x1_0000_0000 - image.len() as u64, image)
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no reference into it outlives self.
        unsafe { libc::munmap(self.host.as_ptr().cast(), self.len) };
    }
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_rejects_sizes_a_32bit_pc_cannot_use() {
        assert!(matches!(
            MemoryLayout::new(1),
            Err(MemoryError::UnsupportedSize { mib: 1 })
        ));
        assert!(MemoryLayout::new(MAX_RAM_MIB + 1).is_err());
        assert!(MemoryLayout::new(MAX_RAM_MIB).is_ok());
        let msg = MemoryLayout::new(5000).unwrap_err().to_string();
        assert!(msg.contains("5000 MiB") && msg.contains("3072"), "{msg}");
    }

    #[test]
    fn regions_follow_the_pc_layout() {
        let l = MemoryLayout::new(256).unwrap();
        let r = l.regions();
        assert_eq!((r[0].guest_addr, r[0].end()), (0, 0xA_0000));
        assert_eq!((r[1].guest_addr, r[1].end()), (0xE_0000, 0x10_0000));
        assert_eq!((r[2].guest_addr, r[2].end()), (0x10_0000, 256 << 20));
        assert_eq!((r[3].guest_addr, r[3].end()), (0xFFFC_0000, 0x1_0000_0000));
        // Both firmware views share one copy in the file, right after RAM; the low alias shows
        // the last 128 KiB.
        assert_eq!(r[3].file_offset, 256 << 20);
        assert_eq!(r[1].file_offset, (256 << 20) + 0x2_0000);
        assert_eq!(l.region_of(0xB_8000, 2), None, "VGA window is not RAM");
        assert_eq!(l.region_of(0x9_FFFF, 2), None, "access straddling a hole");
        assert_eq!(l.region_of(u64::MAX, 2), None, "overflowing range");
        assert_eq!(l.region_of(256 << 20, 1), None, "past the end of RAM");
    }

    #[test]
    fn reads_see_writes_and_holes_are_refused() {
        let m = GuestMemory::new(MemoryLayout::new(4).unwrap()).unwrap();
        m.write(0x10_0000, b"bt86").unwrap();
        assert_eq!(m.read_u32(0x10_0000).unwrap(), u32::from_le_bytes(*b"bt86"));
        assert!(matches!(
            m.write(0xA_0000, &[1]),
            Err(MemoryError::NotRam { .. })
        ));
        let mut b = [0u8; 4];
        assert!(m.read((4 << 20) - 2, &mut b).is_err());
        m.fill(0x10_0000, 3, 0xAA).unwrap();
        assert_eq!(
            m.read_u32(0x10_0000).unwrap(),
            u32::from_le_bytes([0xAA, 0xAA, 0xAA, b'6'])
        );
        assert!(m.write_ram(0x10_0000, &[1]).is_ok());
        assert!(
            m.write_ram(0xF_0000, &[1]).is_err(),
            "firmware is not RAM for DMA"
        );
    }

    #[test]
    fn writes_to_marked_code_pages_are_recorded() {
        let m = GuestMemory::new(MemoryLayout::new(4).unwrap()).unwrap();
        m.write(0x10_0000, &[1]).unwrap();
        assert!(m.take_written_code_pages().is_empty(), "nothing marked yet");
        m.mark_code_page(0x10_1000, true);
        m.write(0x10_0FFE, &[1, 2, 3]).unwrap();
        m.fill(0x10_1800, 4, 0).unwrap();
        assert_eq!(m.take_written_code_pages(), vec![0x101]);
        assert!(m.take_written_code_pages().is_empty());
        m.mark_code_page(0x10_1000, false);
        m.write(0x10_1000, &[1]).unwrap();
        assert!(m.take_written_code_pages().is_empty());
    }

    #[test]
    fn written_ranges_cover_each_write_per_page() {
        let m = GuestMemory::new(MemoryLayout::new(4).unwrap()).unwrap();
        m.mark_table_page(0x10_1000, true);
        m.mark_code_page(0x10_3000, true);
        // Straddles into the marked page: only its part there counts.
        m.write(0x10_0FFE, &[1, 2, 3]).unwrap();
        m.write(0x10_3FFC, &[0; 4]).unwrap();
        // Not consecutive with the first write to 0x101: merged when taken.
        m.write(0x10_1800, &[0; 4]).unwrap();
        m.write(0x10_2000, &[0; 4]).unwrap(); // not marked
        let r = |page, start, end| WrittenRange { page, start, end };
        assert_eq!(
            m.take_written_code_ranges(),
            vec![r(0x101, 0, 0x804), r(0x103, 0xFFC, 0x1000)]
        );
        assert!(m.take_written_code_ranges().is_empty());
        m.fill(0x10_1000, 0x2000, 0).unwrap();
        assert_eq!(m.take_written_code_ranges(), vec![r(0x101, 0, 0x1000)]);
    }

    #[test]
    fn firmware_sits_under_4g_and_aliases_below_1m() {
        let m = GuestMemory::new(MemoryLayout::new(2).unwrap()).unwrap();
        let mut image = vec![0u8; 0x1_0000];
        image[0xFFF0] = 0xEA; // far jmp at the reset vector
        m.load_firmware(&image).unwrap();
        let mut b = [0u8; 1];
        m.read(0xFFFF_FFF0, &mut b).unwrap();
        assert_eq!(b[0], 0xEA);
        m.read(0xF_FFF0, &mut b).unwrap();
        assert_eq!(b[0], 0xEA, "low alias shows the same bytes");
        assert!(matches!(
            m.load_firmware(&vec![0; FIRMWARE_SIZE as usize + 1]),
            Err(MemoryError::FirmwareTooLarge { .. })
        ));
    }
}
