//! The code cache: host memory that holds translated code, never writable and executable through
//! the same mapping.
//!
//! All code caches of the process live in one *zone*: a reservation made once, low in the address
//! space, below everything else that executes. Syscall User Dispatch exempts every address above
//! the zone, so only translated code is subject to it (DESIGN.md §4), and the signal handler tells
//! translated code from the monitor by whether the faulting RIP lies in the zone.
//!
//! Each [`CodeCache`] takes one slot of the zone and backs it with a memfd mapped twice: read +
//! execute at the slot (the addresses translated code runs at) and read + write elsewhere (where
//! the translator writes and patches it).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Size of one code cache.
pub const CACHE_SIZE: usize = 16 << 20;
/// Code caches the zone holds at once (one per live translator).
const SLOTS: usize = 64;
/// Addresses tried for the zone, low in the address space (below the executable, the heap and
/// the shared libraries).
const ZONE_HINTS: [u64; 4] = [0x4000_0000, 0x1_0000_0000, 0x2_0000_0000, 0x10_0000_0000];

static ZONE_START: AtomicU64 = AtomicU64::new(0);
static ZONE_END: AtomicU64 = AtomicU64::new(0);
static SLOT_USE: Mutex<[bool; SLOTS]> = Mutex::new([false; SLOTS]);

/// Whether host address `addr` lies in the code-cache zone (async-signal-safe).
pub fn zone_contains(addr: u64) -> bool {
    let start = ZONE_START.load(Ordering::Acquire);
    start != 0 && addr >= start && addr < ZONE_END.load(Ordering::Acquire)
}

/// One past the zone's last byte (0 before the first cache exists).
pub fn zone_end() -> u64 {
    ZONE_END.load(Ordering::Acquire)
}

/// Errors creating a code cache.
#[derive(Debug, thiserror::Error)]
pub enum CodeCacheError {
    /// The host refused a mapping.
    #[error("the host refused {what} for the translated-code cache")]
    Host {
        /// Which host call failed.
        what: &'static str,
        /// The host's error.
        #[source]
        source: io::Error,
    },
    /// Every slot of the zone is in use.
    #[error("too many binary translators at once in one process (at most {SLOTS})")]
    Full,
}

fn host_err(what: &'static str) -> CodeCacheError {
    CodeCacheError::Host {
        what,
        source: io::Error::last_os_error(),
    }
}

/// Reserves the zone once (under the slot lock).
fn ensure_zone() -> Result<u64, CodeCacheError> {
    let start = ZONE_START.load(Ordering::Acquire);
    if start != 0 {
        return Ok(start);
    }
    let size = SLOTS * CACHE_SIZE;
    for hint in ZONE_HINTS {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; the reservation is
        // inaccessible and kept for the process's life.
        let p = unsafe {
            libc::mmap(
                hint as *mut libc::c_void,
                size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_NORESERVE
                    | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            ZONE_END.store(p as u64 + size as u64, Ordering::Release);
            ZONE_START.store(p as u64, Ordering::Release);
            return Ok(p as u64);
        }
    }
    Err(host_err("a low address range for the code-cache zone"))
}

/// One translator's code cache: a bump allocator over [`CACHE_SIZE`] bytes.
pub struct CodeCache {
    fd: OwnedFd,
    exec: u64,
    write: *mut u8,
    used: usize,
    slot: usize,
}

// SAFETY: the mappings are owned by the cache; moving it moves that ownership.
unsafe impl Send for CodeCache {}

impl CodeCache {
    /// Takes a zone slot and maps a fresh cache there.
    pub fn new() -> Result<Self, CodeCacheError> {
        let mut slots = SLOT_USE.lock().unwrap_or_else(|e| e.into_inner());
        let zone = ensure_zone()?;
        let slot = slots
            .iter()
            .position(|used| !used)
            .ok_or(CodeCacheError::Full)?;
        let name = CString::new("bt86-code-cache").expect("static name has no NUL");
        // SAFETY: valid NUL-terminated name.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(host_err("memfd_create"));
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sizes our own file.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), CACHE_SIZE as libc::off_t) } != 0 {
            return Err(host_err("ftruncate"));
        }
        let exec = zone + (slot * CACHE_SIZE) as u64;
        // SAFETY: replaces part of our own PROT_NONE zone reservation (this slot, which no one
        // else uses: the slot table is locked) with the cache file, read + execute.
        let p = unsafe {
            libc::mmap(
                exec as *mut libc::c_void,
                CACHE_SIZE,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(host_err("mmap of the executable view"));
        }
        // SAFETY: a fresh shared mapping of our own file at an address the kernel picks.
        let w = unsafe {
            libc::mmap(
                ptr::null_mut(),
                CACHE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if w == libc::MAP_FAILED {
            let e = host_err("mmap of the writable view");
            release_slot(exec);
            return Err(e);
        }
        slots[slot] = true;
        Ok(Self {
            fd,
            exec,
            write: w.cast(),
            used: 0,
            slot,
        })
    }

    /// Host address of the first byte (in the executable view).
    pub fn exec_base(&self) -> u64 {
        self.exec
    }

    /// Bytes in use.
    pub fn used(&self) -> usize {
        self.used
    }

    /// The executable address the next [`CodeCache::append`] will place code at.
    pub fn next_address(&self) -> u64 {
        self.exec + align16(self.used) as u64
    }

    /// Whether `len` more bytes fit.
    pub fn fits(&self, len: usize) -> bool {
        align16(self.used) + len <= CACHE_SIZE
    }

    /// Copies `code` to [`CodeCache::next_address`] and returns that address, or None when
    /// the cache is full.
    pub fn append(&mut self, code: &[u8]) -> Option<u64> {
        let at = align16(self.used);
        if at + code.len() > CACHE_SIZE {
            return None;
        }
        // SAFETY: `at..at+len` lies within the writable view (checked above); `code` is a
        // separate Rust allocation.
        unsafe { ptr::copy_nonoverlapping(code.as_ptr(), self.write.add(at), code.len()) };
        self.used = at + code.len();
        Some(self.exec + at as u64)
    }

    /// Writes a rel32 field at executable address `at` (a jump being chained or unchained).
    pub fn write_i32(&mut self, at: u64, value: i32) {
        let off = at.checked_sub(self.exec).expect("address inside the cache") as usize;
        assert!(
            off + 4 <= self.used,
            "patch inside the used part of the cache"
        );
        // SAFETY: in bounds of the writable view (checked above); unaligned write of plain bytes.
        unsafe { ptr::write_unaligned(self.write.add(off).cast::<i32>(), value) };
    }

    /// Reads the rel32 field at executable address `at`.
    pub fn read_i32(&self, at: u64) -> i32 {
        let off = at.checked_sub(self.exec).expect("address inside the cache") as usize;
        assert!(
            off + 4 <= self.used,
            "read inside the used part of the cache"
        );
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { ptr::read_unaligned(self.write.add(off).cast::<i32>()) }
    }

    /// Forgets every translation (the bytes stay until overwritten).
    pub fn reset(&mut self) {
        self.used = 0;
    }

    /// Whether executable address `addr` is inside this cache's used part.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.exec && addr < self.exec + self.used as u64
    }
}

fn align16(n: usize) -> usize {
    (n + 15) & !15
}

/// Puts the zone's PROT_NONE reservation back over a slot.
fn release_slot(exec: u64) {
    // SAFETY: replaces our own slot mapping with an inaccessible reservation again.
    unsafe {
        libc::mmap(
            exec as *mut libc::c_void,
            CACHE_SIZE,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
}

impl Drop for CodeCache {
    fn drop(&mut self) {
        // SAFETY: unmaps the writable view created in `new`.
        unsafe { libc::munmap(self.write.cast(), CACHE_SIZE) };
        release_slot(self.exec);
        let mut slots = SLOT_USE.lock().unwrap_or_else(|e| e.into_inner());
        slots[self.slot] = false;
        let _ = &self.fd;
    }
}

impl std::fmt::Debug for CodeCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeCache")
            .field("exec", &format_args!("{:#x}", self.exec))
            .field("used", &self.used)
            .finish()
    }
}

/// The host's transparent huge page size on x86-64.
const HUGE_PAGE: usize = 2 << 20;

/// Zeroed host memory for the translator's indirect-branch lookup tables, which translated code
/// reads at every indirect branch: entries are spread over the table by EIP, so a few hundred
/// lookups touch a few hundred 4 KiB pages, each a TLB miss once the vCPU thread has slept (an
/// idle guest's timer tick). The memory is one anonymous mapping aligned to and sized in 2 MiB
/// and advised for transparent huge pages, so the tables take a few TLB entries where the host
/// allows it (`transparent_hugepage` set to `madvise` or `always`); otherwise it is plain memory.
pub struct LookupMemory {
    base: ptr::NonNull<[u64; 2]>,
    entries: usize,
    map_len: usize,
}

// SAFETY: the mapping is owned by this value alone (nothing else holds its address but the
// translated code of the translator that owns it, which runs on the owner's thread).
unsafe impl Send for LookupMemory {}

impl LookupMemory {
    /// `entries` zeroed entries.
    pub fn new(entries: usize) -> Result<Self, CodeCacheError> {
        let len = (entries * std::mem::size_of::<[u64; 2]>()).max(1);
        let map_len = len.div_ceil(HUGE_PAGE) * HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks, with room
        // to align it to a huge page.
        let raw = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len + HUGE_PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(host_err("mmap of the lookup tables"));
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE);
        let (head, tail) = (aligned - start, start + HUGE_PAGE - aligned);
        // SAFETY: the head and tail trimmed off lie inside the mapping just made, which nothing
        // else uses; the aligned `map_len` bytes between them stay.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + map_len) as *mut libc::c_void, tail);
            }
            // Advice only: a host without transparent huge pages keeps 4 KiB pages.
            libc::madvise(aligned as *mut libc::c_void, map_len, libc::MADV_HUGEPAGE);
        }
        let base = ptr::NonNull::new(aligned as *mut [u64; 2]).expect("mmap never returns null");
        Ok(Self {
            base,
            entries,
            map_len,
        })
    }
}

/// The entries, as a slice.
impl std::ops::Deref for LookupMemory {
    type Target = [[u64; 2]];
    fn deref(&self) -> &Self::Target {
        // SAFETY: `entries` entries of zero-initialised (anonymous) memory owned by `self`,
        // aligned for u64, borrowed for as long as `self` is.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.entries) }
    }
}

impl std::ops::DerefMut for LookupMemory {
    fn deref_mut(&mut self) -> &mut Self::Target {
        // SAFETY: as in `deref`, borrowed exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.entries) }
    }
}

impl Drop for LookupMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping `new` made and kept; no borrow of it outlives `self`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.map_len);
        }
    }
}

impl std::fmt::Debug for LookupMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LookupMemory")
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_is_written_through_one_view_and_seen_in_the_other() {
        let mut c = CodeCache::new().unwrap();
        assert!(zone_contains(c.exec_base()));
        let at = c.append(&[0x90, 0x90, 0xC3, 0, 0, 0, 0]).unwrap();
        assert_eq!(at, c.exec_base());
        c.write_i32(at + 3, 0x1234_5678);
        assert_eq!(c.read_i32(at + 3), 0x1234_5678);
        // SAFETY: reads back a byte of the executable view, which is readable.
        let b = unsafe { *(at as *const u8).add(2) };
        assert_eq!(b, 0xC3);
        let next = c.append(&[1]).unwrap();
        assert_eq!(next % 16, 0, "units start 16-byte aligned");
    }

    #[test]
    fn the_executable_view_is_never_writable() {
        let c = CodeCache::new().unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps
            .lines()
            .find(|l| l.starts_with(&format!("{:x}-", c.exec_base())))
            .expect("the executable view is mapped");
        assert!(line.contains("r-xs"), "{line}");
    }

    #[test]
    fn lookup_memory_is_zeroed_huge_page_aligned_and_advised() {
        let mut m = LookupMemory::new(1 << 16).unwrap();
        assert_eq!(m.len(), 1 << 16);
        assert!(m.iter().all(|e| *e == [0, 0]));
        m[0xFFFF] = [1, 2];
        assert_eq!(m[0xFFFF], [1, 2]);
        let base = m.as_ptr() as usize;
        assert_eq!(base % HUGE_PAGE, 0, "{base:#x}");
        // The advice shows as the "hg" flag of its mapping, where the host has huge pages.
        if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
            let header = format!("{base:x}-");
            let flags = smaps
                .lines()
                .skip_while(|l| !l.starts_with(&header))
                .find(|l| l.starts_with("VmFlags:"))
                .expect("the mapping is listed");
            assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
        }
    }
}
