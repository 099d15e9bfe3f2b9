//! Address-space windows (DESIGN.md §3): a 4 GiB-aligned, 4 GiB-long reservation of host address
//! space in which guest linear address `V` is host address `base + V`. Translated code reaches
//! guest memory only as `gs:[32-bit address]` with GS.base = the window, so its accesses wrap
//! modulo 4 GiB inside the window and cannot reach anything else.
//!
//! For a guest with paging off the window maps guest-physical memory linearly from the memory
//! file: RAM read-write, the firmware area read-only, holes and device memory not at all (every
//! access faults and is emulated). A guard range past the 4 GiB catches the last bytes of an
//! access that starts just below 4 GiB (the guest's wrap-around is emulated).

use std::io;
use std::os::fd::AsRawFd;
use std::ptr;

use crate::memory::{GuestMemory, RegionKind};

const GIB4: u64 = 1 << 32;
/// Inaccessible bytes reserved past the window's 4 GiB (larger than any single access).
const GUARD: u64 = 64 << 10;
const PAGE: u64 = 4096;

/// Errors building or changing a window.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    /// The host refused a reservation, mapping or protection change.
    #[error(
        "the host refused {what} for a guest address-space window (if it is ENOMEM, the process \
         may have hit vm.max_map_count)"
    )]
    Host {
        /// Which host call failed.
        what: &'static str,
        /// The host's error.
        #[source]
        source: io::Error,
    },
}

impl WindowError {
    /// Whether the host ran out of memory mappings (ENOMEM: usually vm.max_map_count).
    pub fn out_of_mappings(&self) -> bool {
        let WindowError::Host { source, .. } = self;
        source.raw_os_error() == Some(libc::ENOMEM)
    }
}

fn host_err(what: &'static str) -> WindowError {
    WindowError::Host {
        what,
        source: io::Error::last_os_error(),
    }
}

/// One window.
#[derive(Debug)]
pub struct Window {
    base: u64,
}

impl Window {
    /// Reserves a window (inaccessible until something is mapped into it).
    pub fn new() -> Result<Self, WindowError> {
        // Reserve twice the size and keep the aligned part.
        let span = 2 * GIB4 + GUARD;
        // SAFETY: a fresh inaccessible reservation at an address the kernel picks.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                span as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(host_err("an 8 GiB address-space reservation"));
        }
        let start = p as u64;
        let base = (start + GIB4 - 1) & !(GIB4 - 1);
        let end = base + GIB4 + GUARD;
        // SAFETY: trims the parts of our own reservation outside the aligned window.
        unsafe {
            if base > start {
                libc::munmap(p, (base - start) as usize);
            }
            if start + span > end {
                libc::munmap(end as *mut libc::c_void, (start + span - end) as usize);
            }
        }
        Ok(Self { base })
    }

    /// Host address of guest address 0.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The guest address a host address inside the window stands for.
    pub fn guest_address(&self, host: u64) -> Option<u32> {
        let off = host.checked_sub(self.base)?;
        (off < GIB4 + GUARD).then_some(off as u32)
    }

    /// Maps guest-physical memory linearly (paging off): RAM read-write, firmware read-only.
    pub fn map_physical(&mut self, memory: &GuestMemory) -> Result<(), WindowError> {
        for r in memory.layout().regions() {
            let prot = match r.kind {
                RegionKind::Ram => libc::PROT_READ | libc::PROT_WRITE,
                RegionKind::Firmware => libc::PROT_READ,
            };
            // SAFETY: replaces part of our own reservation with a shared mapping of the memory
            // file at the region's offset; the range lies inside the window.
            let p = unsafe {
                libc::mmap(
                    (self.base + r.guest_addr) as *mut libc::c_void,
                    r.size as usize,
                    prot,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    memory.fd().as_raw_fd(),
                    r.file_offset as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(host_err("mmap of guest memory into the window"));
            }
        }
        Ok(())
    }

    /// Maps `len` bytes of the memory file at `file_offset` at guest linear address `linear`
    /// (both page-aligned), read-only or read-write: one shadow mapping.
    pub fn map(
        &mut self,
        memory: &GuestMemory,
        linear: u32,
        file_offset: u64,
        len: u64,
        writable: bool,
    ) -> Result<(), WindowError> {
        debug_assert!(linear & 0xFFF == 0 && file_offset & 0xFFF == 0 && len & 0xFFF == 0);
        assert!(
            u64::from(linear) + len <= GIB4 && file_offset + len <= memory.layout().file_size(),
            "a window mapping stays inside the window and the memory file"
        );
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: replaces part of our own reservation (checked to lie inside the window) with
        // a shared mapping of the memory file (checked to lie inside the file).
        let p = unsafe {
            libc::mmap(
                (self.base + u64::from(linear)) as *mut libc::c_void,
                len as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                memory.fd().as_raw_fd(),
                file_offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(host_err("mmap of a guest page into the window"));
        }
        Ok(())
    }

    /// Makes `len` bytes at guest linear `linear` inaccessible again (an unmapped shadow
    /// entry); the reservation stays.
    pub fn unmap(&mut self, linear: u32, len: u64) -> Result<(), WindowError> {
        assert!(
            u64::from(linear) + len <= GIB4,
            "an unmapped range stays inside the window"
        );
        // SAFETY: replaces part of our own window with a fresh inaccessible reservation.
        let p = unsafe {
            libc::mmap(
                (self.base + u64::from(linear)) as *mut libc::c_void,
                len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(host_err("munmap of window pages"));
        }
        Ok(())
    }

    /// Makes `len` mapped bytes at guest linear `linear` inaccessible without unmapping them:
    /// one mprotect, measured at less than half the cost of replacing the mapping with the
    /// reservation ([`Window::unmap`]), which matters when the guest changes one PTE at a time.
    /// The pages keep their host mapping, and the VMA it takes, until something is mapped over
    /// them or the range is unmapped; every access faults meanwhile.
    pub fn revoke(&mut self, linear: u32, len: u64) -> Result<(), WindowError> {
        assert!(
            u64::from(linear) + len <= GIB4,
            "a revoked range stays inside the window"
        );
        let at = self.base + u64::from(linear);
        // SAFETY: changes the protection of pages of our own window (to none).
        if unsafe { libc::mprotect(at as *mut libc::c_void, len as usize, libc::PROT_NONE) } != 0 {
            return Err(host_err("mprotect of window pages"));
        }
        Ok(())
    }

    /// Changes the access of `len` mapped bytes at guest linear `linear`.
    pub fn protect(&mut self, linear: u32, len: u64, writable: bool) -> Result<(), WindowError> {
        assert!(
            u64::from(linear) + len <= GIB4,
            "a protected range stays inside the window"
        );
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let at = self.base + u64::from(linear);
        // SAFETY: changes the protection of pages of our own window.
        if unsafe { libc::mprotect(at as *mut libc::c_void, len as usize, prot) } != 0 {
            return Err(host_err("mprotect of window pages"));
        }
        Ok(())
    }

    /// Makes the window page holding guest address `page_addr` read-only (it holds translated
    /// code: a guest write must fault) or gives it back its normal access (`writable`).
    pub fn protect_page(&mut self, page_addr: u32, writable: bool) -> Result<(), WindowError> {
        let at = self.base + u64::from(page_addr & !0xFFF);
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: changes the protection of one page of our own window.
        if unsafe { libc::mprotect(at as *mut libc::c_void, PAGE as usize, prot) } != 0 {
            return Err(host_err("mprotect of a window page"));
        }
        Ok(())
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly our window and its guard; nothing refers into it any more.
        unsafe { libc::munmap(self.base as *mut libc::c_void, (GIB4 + GUARD) as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryLayout;

    #[test]
    fn the_window_maps_guest_ram_at_its_physical_address() {
        let mem = GuestMemory::new(MemoryLayout::new(4).unwrap()).unwrap();
        mem.write(0x10_0000, b"bt86").unwrap();
        let mut w = Window::new().unwrap();
        assert_eq!(w.base() % GIB4, 0);
        w.map_physical(&mem).unwrap();
        // SAFETY: the window maps RAM at 0x100000 readable.
        let got = unsafe { ptr::read((w.base() + 0x10_0000) as *const [u8; 4]) };
        assert_eq!(&got, b"bt86");
        assert_eq!(w.guest_address(w.base() + 0xFFFF_FFFF), Some(0xFFFF_FFFF));
        assert_eq!(w.guest_address(w.base() - 1), None);
        w.protect_page(0x10_0123, false).unwrap();
        w.protect_page(0x10_0123, true).unwrap();
    }

    #[test]
    fn pages_map_anywhere_in_the_window_and_unmap_again() {
        let mem = GuestMemory::new(MemoryLayout::new(4).unwrap()).unwrap();
        mem.write(0x20_3000, b"page").unwrap();
        let mut w = Window::new().unwrap();
        // Guest linear 0xC000_0000 -> guest-physical 0x20_3000, the way a page table maps it.
        w.map(&mem, 0xC000_0000, 0x20_3000, 4096, false).unwrap();
        let at = (w.base() + 0xC000_0000) as *const [u8; 4];
        // SAFETY: mapped readable just above.
        assert_eq!(unsafe { ptr::read(at) }, *b"page");
        w.protect(0xC000_0000, 4096, true).unwrap();
        // SAFETY: now writable; the write lands in guest memory through the shared mapping.
        unsafe { ptr::write((w.base() + 0xC000_0004) as *mut u8, b'!') };
        let mut b = [0u8; 5];
        mem.read(0x20_3000, &mut b).unwrap();
        assert_eq!(&b, b"page!");
        w.unmap(0xC000_0000, 4096).unwrap();
    }
}
