//! Shadow address spaces: the host kernel's page tables as the guest's shadow page tables
//! (DESIGN.md §3).
//!
//! A [`ShadowMmu`] keeps one address-space window per (guest CR3, privilege view) — a
//! supervisor view holding every page the guest's tables allow at CPL 0–2, and a user view
//! holding only the pages CPL 3 may touch — plus one window mapping guest-physical memory
//! linearly for paging off. Windows are filled lazily: a guest access to a page not yet mapped
//! faults on the host, and [`ShadowMmu::on_fault`] classifies the fault:
//!
//! - **hidden**: the guest's walk allows the access — the page is mapped (or made writable) and
//!   the instruction runs again;
//! - **true**: the guest's tables forbid it — the guest gets its #PF;
//! - **traced**: a write to a guest page holding a page table this MMU follows — the one
//!   instruction is emulated, then [`ShadowMmu::table_written`] updates the shadow entries;
//! - **code**: a write to a page holding translated code;
//! - **emulate**: device memory (never mapped) or an access that wraps around 4 GiB.
//!
//! Invariants of a mapped window page (checked in the fault path, kept by the traces):
//! it is mapped only if the last guest walk allowed the access at the window's privilege;
//! writable only if the guest allows the write and the entry is dirty (the first write
//! faults and sets D; A is set by the walk that maps it); read-only while the guest page
//! holds a traced page table or translated code; never mapped for device memory.
//!
//! Every guest page holding a directory or table entry that a window mapping (or a code
//! translation) depends on is *traced*: kept read-only in every window and marked in
//! [`GuestMemory`] so writes made by the monitor are reported too, with a copy of its
//! contents. A write is resolved against the copy: only the entries that changed drop the
//! mappings that depend on them. An entry whose only change is a cleared accessed or dirty bit
//! keeps its mapping until the next CR3 load or INVLPG, as a hardware TLB keeps its entry. A
//! table written too often (VMware's adaptive tracing) stops being traced: its pages become
//! writable and the table is resynchronised against the copy at the next CR3 load or INVLPG,
//! which is when a real TLB would see the new entries.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::Arc;

use vmdriver::window::{Window, WindowError};
use vmdriver::{GuestMemory, RegionKind};

use crate::walk::{self, Access, Mode, PhysMem, Translation, pte};

/// Windows kept by default (each reserves 4 GiB of host address space, nothing more until
/// pages are mapped).
pub const DEFAULT_WINDOW_BUDGET: usize = 16;
/// Traced writes a page table takes between two CR3 loads before it stops being traced.
pub const UNTRACE_WRITES: u32 = 64;
/// The `vm.max_map_count` bt86 asks for when it may raise it.
pub const WANTED_MAP_COUNT: u64 = 1 << 20;
/// Window id of the code-translation pseudo-window in the dependency maps.
const CODE: u32 = u32::MAX;
const PAGE: u64 = 4096;

/// Window pages mapped at once for a fault in a large page: the aligned 1 MiB around it, not
/// all of a 4 MiB page. Each page mapped costs bookkeeping when mapped and again when dropped,
/// and a short-lived process touches little of each 4 MiB of the kernel's direct map: 300
/// fork+execs mapped 12.2K pages each with whole large pages, 5.6K with 1 MiB runs, for two
/// more hidden faults each (and ~4K pages for 21 more with 256 KiB runs).
const LARGE_RUN: u32 = 256;

/// Errors of the shadow MMU.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// The host refused a window operation.
    #[error(transparent)]
    Window(#[from] WindowError),
    /// The host ran out of memory mappings even after every other window was recycled.
    #[error(
        "the host refused another memory mapping for the guest's shadow page tables \
         (vm.max_map_count is {limit}): raise it, e.g. `sysctl -w vm.max_map_count={WANTED_MAP_COUNT}`, \
         or run with fewer address-space windows"
    )]
    OutOfMappings {
        /// The host's limit.
        limit: u64,
    },
}

/// The paging state a window follows: CR0.PG, CR3/CR4 as a walk [`Mode`], the PAE PDPTEs
/// loaded with CR3, and whether the CPU runs at CPL 3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    /// CR0.PG.
    pub enabled: bool,
    /// The walk's mode (CR3, PAE, PSE, WP, PGE).
    pub mode: Mode,
    /// The PDPTEs loaded with CR3 (PAE only).
    pub pdptes: [u64; 4],
    /// CPL 3: the user view.
    pub user: bool,
}

/// What a fault in a window was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The address is not in the active window.
    Outside,
    /// A hidden fault: the page is mapped now; run the instruction again.
    Hidden,
    /// A true fault: the guest's page tables forbid the access; the guest takes #PF.
    True,
    /// A write to a traced page table: emulate the instruction, then report the write.
    Traced,
    /// A write to the guest-physical page (number) holding translated code.
    Code(u32),
    /// Device memory or an access wrapping past 4 GiB: emulate the instruction.
    Emulate,
}

/// A cached code-fetch translation: (guest-physical page, user, the entries it was walked
/// through, global).
type CodeFetch = (u32, bool, [Option<u64>; 2], bool);

/// Counters for `--stats`.
#[derive(Debug, Default, Clone)]
pub struct ShadowStats {
    /// Faults resolved by mapping a page (or making it writable).
    pub hidden_faults: u64,
    /// Faults the guest's own page tables raise (#PF to the guest).
    pub true_faults: u64,
    /// Writes to traced page tables.
    pub traced_writes: u64,
    /// Page tables that stopped being traced (adaptive) or were resynchronised.
    pub trace_drops: u64,
    /// Shadow mappings dropped because a guest entry changed.
    pub entries_dropped: u64,
    /// Windows created.
    pub windows_created: u64,
    /// Windows recycled (emptied for another address space, or flushed).
    pub windows_recycled: u64,
    /// mmap calls (maps and unmaps).
    pub mmap_calls: u64,
    /// mprotect calls.
    pub mprotect_calls: u64,
    /// Faults in device memory or wrapping accesses, emulated.
    pub emulated: u64,
    /// Writes to pages holding translated code.
    pub code_writes: u64,
    /// Pages mapped along with a faulting one (large pages, contiguous runs).
    pub eager_pages: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Physical,
    Paged { cr3: u32, user: bool },
}

/// One mapped 4 KiB window page.
#[derive(Debug, Clone, Copy)]
struct PageMap {
    gpa_page: u32,
    writable: bool,
    global: bool,
    /// Size of the guest page it belongs to (INVLPG drops all of a large page).
    page_size: u32,
    entries: [Option<u64>; 2],
}

/// A window's mapped pages by linear page number: a two-level array like the page tables it
/// shadows (1024 groups of 1024 pages, a group allocated when a page in its 4 MiB is mapped),
/// so a large page's 1024 entries are filled and dropped side by side instead of hashed.
#[derive(Default)]
struct PageTable {
    groups: Vec<Option<Box<[Option<PageMap>; 1024]>>>,
    len: usize,
}

impl PageTable {
    fn split(lin: u32) -> (usize, usize) {
        ((lin >> 10) as usize & 0x3FF, lin as usize & 0x3FF)
    }

    fn get(&self, lin: &u32) -> Option<&PageMap> {
        let (g, i) = Self::split(*lin);
        self.groups.get(g)?.as_ref()?[i].as_ref()
    }

    fn get_mut(&mut self, lin: &u32) -> Option<&mut PageMap> {
        let (g, i) = Self::split(*lin);
        self.groups.get_mut(g)?.as_mut()?[i].as_mut()
    }

    fn contains_key(&self, lin: &u32) -> bool {
        self.get(lin).is_some()
    }

    fn insert(&mut self, lin: u32, m: PageMap) {
        let (g, i) = Self::split(lin);
        if self.groups.len() <= g {
            self.groups.resize_with(g + 1, || None);
        }
        let group = self.groups[g].get_or_insert_with(|| Box::new([None; 1024]));
        if group[i].replace(m).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, lin: &u32) -> Option<PageMap> {
        let (g, i) = Self::split(*lin);
        let m = self.groups.get_mut(g)?.as_mut()?[i].take()?;
        self.len -= 1;
        Some(m)
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every mapped page, in linear order; the table is left empty.
    fn drain(&mut self) -> Vec<(u32, PageMap)> {
        let mut all = Vec::with_capacity(self.len);
        for (g, group) in self.groups.iter_mut().enumerate() {
            if let Some(group) = group.take() {
                all.extend(
                    group
                        .iter()
                        .enumerate()
                        .filter_map(|(i, m)| Some(((g << 10 | i) as u32, (*m)?))),
                );
            }
        }
        self.len = 0;
        all
    }
}

struct Space {
    window: Window,
    key: Key,
    pages: PageTable,
    /// Dropped pages whose host mapping was only made inaccessible ([`Window::revoke`]): each
    /// still takes a host VMA until something is mapped over it or the window is emptied.
    revoked: HashSet<u32>,
    last_used: u64,
    pdptes: [u64; 4],
}

/// A traced page table page.
struct Trace {
    copy: Vec<u8>,
    /// Dependencies (window pages, code pages) on entries in it.
    users: u32,
    /// Traced writes since the last CR3 load.
    writes: u32,
    /// Adaptive mode: no longer write-protected; resynchronised at CR3 loads and INVLPG.
    unsynced: bool,
}

/// Guest-physical memory for walks: page tables live in RAM; anything else reads as all ones
/// and ignores A/D updates.
struct WalkMem<'a>(&'a GuestMemory);

impl PhysMem for WalkMem<'_> {
    fn read_u32(&mut self, addr: u64) -> u32 {
        self.0.read_u32(addr).unwrap_or(u32::MAX)
    }
    fn write_u32(&mut self, addr: u64, value: u32) {
        let _ = self.0.write_ram(addr, &value.to_le_bytes());
    }
}

/// Global code pages listed by [`ShadowMmu::take_global_code_changes`] before it says "all".
const GLOBAL_CODE_DROPS: usize = 1024;

/// The shadow MMU of one vCPU.
pub struct ShadowMmu {
    memory: Arc<GuestMemory>,
    spaces: Vec<Space>,
    budget: usize,
    clock: u64,
    current: Option<(Key, usize)>,
    /// Guest-physical page -> window pages mapping it.
    rmap: ReverseMap,
    /// Guest-physical entry address -> window pages (or code pages) depending on it.
    deps: HashMap<u64, HashSet<(u32, u32)>>,
    traces: HashMap<u32, Trace>,
    /// The traced pages in adaptive mode (`Trace::unsynced`), in page order: what every CR3
    /// load and INVLPG resynchronises, without walking all the traces (boot does ~70 K INVLPGs
    /// with hundreds of traces and none of them unsynced).
    unsynced: std::collections::BTreeSet<u32>,
    code: HashSet<u32>,
    /// Code fetch translations of the current CR3 (and global ones of earlier CR3s, as a TLB
    /// keeps them): linear page -> (guest-physical page, user, entries, global).
    code_tlb: HashMap<u32, CodeFetch>,
    code_tlb_cr3: Option<u32>,
    code_epoch: u64,
    local_code_epoch: u64,
    /// The global code pages (linear page numbers) whose cached fetch went since
    /// [`ShadowMmu::take_global_code_changes`], unless `global_code_all` says every one did.
    global_code_dropped: Vec<u32>,
    global_code_all: bool,
    /// Window pages whose entry lost its A or D bit: dropped at the next CR3 load or INVLPG.
    pending: HashSet<(u32, u32)>,
    /// Live single-page mappings (an upper bound on the host VMAs they need).
    live_pages: u64,
    /// Revoked pages in all windows (`Space::revoked`): host VMAs too.
    revoked_pages: u64,
    map_limit: u64,
    /// Counters.
    pub stats: ShadowStats,
}

/// Guest-physical page -> the window pages (window, linear page) that map it: a list per page,
/// in an array over RAM (a large page maps 1024 consecutive frames, which then sit side by side,
/// and the lists are short: one entry per window that maps the frame), and a map for the rest
/// (firmware).
struct ReverseMap {
    ram: Vec<Vec<(u32, u32)>>,
    other: HashMap<u32, Vec<(u32, u32)>>,
}

impl ReverseMap {
    fn new(ram_bytes: u64) -> Self {
        Self {
            ram: vec![Vec::new(); (ram_bytes / PAGE) as usize],
            other: HashMap::default(),
        }
    }

    fn get(&self, page: u32) -> &[(u32, u32)] {
        match self.ram.get(page as usize) {
            Some(v) => v,
            None => self.other.get(&page).map_or(&[], |v| v),
        }
    }

    fn insert(&mut self, page: u32, who: (u32, u32)) {
        let v = match self.ram.get_mut(page as usize) {
            Some(v) => v,
            None => self.other.entry(page).or_default(),
        };
        if !v.contains(&who) {
            v.push(who);
        }
    }

    fn remove(&mut self, page: u32, who: (u32, u32)) {
        let v = match self.ram.get_mut(page as usize) {
            Some(v) => v,
            None => match self.other.get_mut(&page) {
                Some(v) => v,
                None => return,
            },
        };
        if let Some(i) = v.iter().position(|&w| w == who) {
            v.swap_remove(i);
        }
        if v.is_empty() && page as usize >= self.ram.len() {
            self.other.remove(&page);
        }
    }
}

impl std::fmt::Debug for ShadowMmu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowMmu")
            .field("windows", &self.spaces.len())
            .field("budget", &self.budget)
            .field("traced", &self.traces.len())
            .finish_non_exhaustive()
    }
}

/// Reads `vm.max_map_count`, raising it to [`WANTED_MAP_COUNT`] when the process may.
fn map_count_limit() -> u64 {
    const PATH: &str = "/proc/sys/vm/max_map_count";
    let read = || {
        std::fs::read_to_string(PATH)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let now = read().unwrap_or(65530);
    if now >= WANTED_MAP_COUNT {
        return now;
    }
    if std::fs::write(PATH, WANTED_MAP_COUNT.to_string()).is_ok() {
        let raised = read().unwrap_or(now);
        tracing::info!("raised vm.max_map_count from {now} to {raised}");
        return raised;
    }
    tracing::info!(
        "vm.max_map_count is {now} and cannot be raised here: bt86 recycles shadow windows \
         to stay under it"
    );
    now
}

impl ShadowMmu {
    /// A shadow MMU over `memory` keeping at most `budget` windows (at least 2).
    pub fn new(memory: Arc<GuestMemory>, budget: usize) -> Self {
        let ram_bytes = memory.layout().ram_bytes();
        let map_limit = map_count_limit();
        // Each window needs a few VMAs even when empty; leave room for the rest of bt86.
        let by_limit = (map_limit / 4096).max(2) as usize;
        let budget = budget.max(2).min(by_limit);
        Self {
            memory,
            spaces: Vec::new(),
            budget,
            clock: 0,
            current: None,
            rmap: ReverseMap::new(ram_bytes),
            deps: HashMap::default(),
            traces: HashMap::default(),
            unsynced: Default::default(),
            code: HashSet::default(),
            code_tlb: HashMap::default(),
            code_tlb_cr3: None,
            code_epoch: 0,
            local_code_epoch: 0,
            global_code_dropped: Vec::new(),
            global_code_all: false,
            pending: HashSet::default(),
            live_pages: 0,
            revoked_pages: 0,
            map_limit,
            stats: ShadowStats::default(),
        }
    }

    /// The window budget in force (after `vm.max_map_count` was considered).
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Windows alive.
    pub fn windows(&self) -> usize {
        self.spaces.len()
    }

    /// Bumped whenever a code-fetch translation may have changed: indirect-branch lookups
    /// cached by linear EIP must then be forgotten.
    pub fn code_epoch(&self) -> u64 {
        self.code_epoch
    }

    /// What changed among the global code-fetch translations since the last call: `(true, _)`
    /// when they may all have (a global flush, or too many to list), else the linear pages
    /// (address >> 12) whose translation went. Every bump of [`ShadowMmu::code_epoch`] is
    /// one of these.
    pub fn take_global_code_changes(&mut self) -> (bool, Vec<u32>) {
        let all = std::mem::take(&mut self.global_code_all);
        (all, std::mem::take(&mut self.global_code_dropped))
    }

    /// Bumped when the non-global code-fetch translations went (a CR3 load): lookups cached
    /// for code on non-global pages must then be forgotten; those for global pages stay, as a
    /// TLB keeps global translations across CR3 loads.
    pub fn local_code_epoch(&self) -> u64 {
        self.local_code_epoch
    }

    /// Whether the cached fetch translation of the page holding `eip` is global (G set with
    /// CR4.PGE on): it survives CR3 loads.
    pub fn code_is_global(&self, eip: u32) -> bool {
        self.code_tlb.get(&(eip >> 12)).is_some_and(|e| e.3)
    }

    /// Whether guest-physical page `page` is a traced page table.
    pub fn is_traced(&self, page: u32) -> bool {
        self.traces.contains_key(&page)
    }

    fn key_of(p: &Paging) -> Key {
        if p.enabled {
            Key::Paged {
                cr3: p.mode.cr3,
                user: p.user,
            }
        } else {
            Key::Physical
        }
    }

    /// The host base of the window for `p` (creating or recycling one if needed).
    pub fn activate(&mut self, p: &Paging) -> Result<u64, ShadowError> {
        let key = Self::key_of(p);
        self.clock += 1;
        let id = match self.current {
            Some((k, id)) if k == key => id,
            _ => match self.spaces.iter().position(|s| s.key == key) {
                Some(id) => id,
                None => self.create(key, p)?,
            },
        };
        self.current = Some((key, id));
        let pae_stale = p.enabled && p.mode.pae && self.spaces[id].pdptes != p.pdptes;
        if pae_stale {
            // The PDPTEs are loaded with CR3, so the window's mappings follow the old ones.
            self.clear_space(id)?;
            self.spaces[id].pdptes = p.pdptes;
        }
        let s = &mut self.spaces[id];
        s.last_used = self.clock;
        Ok(s.window.base())
    }

    fn create(&mut self, key: Key, p: &Paging) -> Result<usize, ShadowError> {
        let id = if self.spaces.len() < self.budget {
            let window = Window::new()?;
            self.stats.windows_created += 1;
            self.spaces.push(Space {
                window,
                key,
                pages: PageTable::default(),
                revoked: HashSet::default(),
                last_used: 0,
                pdptes: [0; 4],
            });
            self.spaces.len() - 1
        } else {
            // Recycle the least recently used window (never the physical one while paging is
            // off, which cannot happen here: the physical one is then the current key).
            let id = (0..self.spaces.len())
                .filter(|&i| Some(i) != self.current.map(|c| c.1))
                .min_by_key(|&i| self.spaces[i].last_used)
                .expect("a budget of at least two windows");
            // Emptied, not cleared: clearing the physical window maps guest RAM into it again,
            // which a paged address space must never see.
            self.empty_space(id)?;
            self.stats.windows_recycled += 1;
            self.spaces[id].key = key;
            id
        };
        self.spaces[id].pdptes = p.pdptes;
        if key == Key::Physical {
            self.map_physical(id)?;
        }
        Ok(id)
    }

    /// Paging off: guest-physical memory linearly, RAM read-write (code pages read-only),
    /// firmware read-only, device memory not at all.
    fn map_physical(&mut self, id: usize) -> Result<(), ShadowError> {
        let memory = self.memory.clone();
        let s = &mut self.spaces[id];
        s.window.map_physical(&memory)?;
        self.stats.mmap_calls += memory.layout().regions().len() as u64;
        for &page in &self.code {
            if is_ram(&memory, page) {
                s.window.protect(page << 12, PAGE, false)?;
                self.stats.mprotect_calls += 1;
            }
        }
        Ok(())
    }

    /// Empties window `id` and fills it again as its key says: every mapping and every
    /// dependency of it goes; the physical window gets guest-physical memory back.
    fn clear_space(&mut self, id: usize) -> Result<(), ShadowError> {
        self.empty_space(id)?;
        if self.spaces[id].key == Key::Physical {
            self.map_physical(id)?;
        }
        Ok(())
    }

    /// Empties window `id`: every mapping and every dependency of it goes, nothing is mapped.
    fn empty_space(&mut self, id: usize) -> Result<(), ShadowError> {
        let pages = self.spaces[id].pages.drain();
        for (lin, m) in pages {
            self.forget(id as u32, lin, &m);
        }
        let revoked = std::mem::take(&mut self.spaces[id].revoked);
        self.revoked_pages -= revoked.len() as u64;
        self.spaces[id].window.unmap(0, 1 << 32)?;
        self.stats.mmap_calls += 1;
        Ok(())
    }

    /// Removes the bookkeeping of mapping (`id`, `lin`) (not the host mapping itself).
    fn forget(&mut self, id: u32, lin: u32, m: &PageMap) {
        self.live_pages = self.live_pages.saturating_sub(1);
        self.rmap.remove(m.gpa_page, (id, lin));
        self.pending.remove(&(id, lin));
        for e in m.entries.iter().flatten() {
            self.release_dep(*e, (id, lin));
        }
    }

    fn release_dep(&mut self, entry: u64, who: (u32, u32)) {
        if let Some(v) = self.deps.get_mut(&entry) {
            v.remove(&who);
            if v.is_empty() {
                self.deps.remove(&entry);
            }
        }
        let page = (entry >> 12) as u32;
        let gone = match self.traces.get_mut(&page) {
            Some(t) => {
                t.users = t.users.saturating_sub(1);
                t.users == 0
            }
            None => false,
        };
        if gone {
            self.traces.remove(&page);
            self.unsynced.remove(&page);
            self.memory.mark_table_page(page << 12, false);
        }
    }

    /// Records that (`id`, `lin`) depends on the guest entry at `entry`, tracing its page.
    fn add_dep(&mut self, entry: u64, who: (u32, u32)) -> Result<(), ShadowError> {
        self.deps.entry(entry).or_default().insert(who);
        let page = (entry >> 12) as u32;
        if let Some(t) = self.traces.get_mut(&page) {
            t.users += 1;
            return Ok(());
        }
        let mut copy = vec![0u8; PAGE as usize];
        if self.memory.read(u64::from(page) << 12, &mut copy).is_err() {
            // Not RAM: the walk read all ones and nothing can write there.
            copy.fill(0xFF);
        }
        self.traces.insert(
            page,
            Trace {
                copy,
                users: 1,
                writes: 0,
                unsynced: false,
            },
        );
        self.memory.mark_table_page(page << 12, true);
        self.write_protect(page)
    }

    /// Makes every window mapping of guest-physical `page` read-only.
    fn write_protect(&mut self, page: u32) -> Result<(), ShadowError> {
        for &(id, lin) in self.rmap.get(page) {
            let s = &mut self.spaces[id as usize];
            if let Some(m) = s.pages.get_mut(&lin)
                && m.writable
            {
                m.writable = false;
                s.window.protect(lin << 12, PAGE, false)?;
                self.stats.mprotect_calls += 1;
            }
        }
        Ok(())
    }

    /// Drops window page (`id`, `lin`): unmapped, its dependencies released.
    fn drop_page(&mut self, id: u32, lin: u32) -> Result<(), ShadowError> {
        if id == CODE {
            if let Some((_, _, entries, global)) = self.code_tlb.remove(&lin) {
                for e in entries.iter().flatten() {
                    self.release_dep(*e, (CODE, lin));
                }
                // Lookups for code on a non-global page go with the other non-global ones.
                if global {
                    self.code_epoch += 1;
                    if self.global_code_dropped.len() < GLOBAL_CODE_DROPS {
                        self.global_code_dropped.push(lin);
                    } else {
                        self.global_code_all = true;
                    }
                } else {
                    self.local_code_epoch += 1;
                }
            }
            return Ok(());
        }
        let Some(m) = self.spaces[id as usize].pages.remove(&lin) else {
            return Ok(());
        };
        self.forget(id, lin, &m);
        self.unmap_run(id, lin, 1)?;
        self.stats.entries_dropped += 1;
        Ok(())
    }

    /// Drops many window pages (or code pages), unmapping each run of consecutive pages of a
    /// window with one call.
    fn drop_pages(&mut self, mut list: Vec<(u32, u32)>) -> Result<(), ShadowError> {
        list.sort_unstable();
        list.dedup();
        let mut run: Option<(u32, u32, u32)> = None; // (window, first, count)
        for (id, lin) in list {
            if id == CODE {
                self.drop_page(CODE, lin)?;
                continue;
            }
            let Some(m) = self.spaces[id as usize].pages.remove(&lin) else {
                continue;
            };
            self.forget(id, lin, &m);
            self.stats.entries_dropped += 1;
            match run {
                Some((rid, first, n)) if rid == id && first + n == lin => {
                    run = Some((rid, first, n + 1));
                }
                _ => {
                    if let Some((rid, first, n)) = run {
                        self.unmap_run(rid, first, n)?;
                    }
                    run = Some((id, lin, 1));
                }
            }
        }
        if let Some((rid, first, n)) = run {
            self.unmap_run(rid, first, n)?;
        }
        Ok(())
    }

    /// Takes the host mapping of window pages `first..first + n` away. One page (a PTE the
    /// guest changed, an INVLPG: early fixmap setup does ~35 K per boot) is only revoked, at
    /// less than half the cost; a longer run goes back to the reservation.
    fn unmap_run(&mut self, id: u32, first: u32, n: u32) -> Result<(), ShadowError> {
        let s = &mut self.spaces[id as usize];
        if n == 1 {
            s.window.revoke(first << 12, PAGE)?;
            self.stats.mprotect_calls += 1;
            if s.revoked.insert(first) {
                self.revoked_pages += 1;
            }
            return Ok(());
        }
        s.window.unmap(first << 12, u64::from(n) * PAGE)?;
        self.stats.mmap_calls += 1;
        for lin in first..first + n {
            if s.revoked.remove(&lin) {
                self.revoked_pages -= 1;
            }
        }
        Ok(())
    }

    fn walk(
        &self,
        p: &Paging,
        linear: u32,
        access: Access,
    ) -> Result<Translation, walk::PageFault> {
        walk::walk(
            &mut WalkMem(&self.memory),
            p.mode,
            &p.pdptes,
            linear,
            access,
        )
    }

    /// Classifies a host fault at host address `addr` (a `write` or a read) under `p`, mapping
    /// the page when the fault was hidden.
    pub fn on_fault(&mut self, p: &Paging, addr: u64, write: bool) -> Result<Fault, ShadowError> {
        let Some((key, id)) = self.current else {
            return Ok(Fault::Outside);
        };
        debug_assert_eq!(key, Self::key_of(p));
        let base = self.spaces[id].window.base();
        let Some(off) = addr.checked_sub(base) else {
            return Ok(Fault::Outside);
        };
        if off >= 1 << 32 {
            // The guard past 4 GiB: the guest's access wraps around.
            return Ok(if off < (1 << 32) + (64 << 10) {
                self.stats.emulated += 1;
                Fault::Emulate
            } else {
                Fault::Outside
            });
        }
        let linear = off as u32;
        if !p.enabled {
            let page = linear >> 12;
            if write && self.code.contains(&page) && is_ram(&self.memory, page) {
                self.stats.code_writes += 1;
                return Ok(Fault::Code(page));
            }
            self.stats.emulated += 1;
            return Ok(Fault::Emulate);
        }
        let t = match self.walk(
            p,
            linear,
            Access {
                write,
                user: p.user,
            },
        ) {
            Ok(t) => t,
            Err(_) => {
                self.stats.true_faults += 1;
                return Ok(Fault::True);
            }
        };
        let gpa_page = (t.frame >> 12) as u32;
        let Some(kind) = region_kind(&self.memory, t.frame) else {
            self.stats.emulated += 1;
            return Ok(Fault::Emulate);
        };
        self.resync_entries_of(&t)?;
        let lin = linear >> 12;
        let may_write = kind == RegionKind::Ram && (t.writable || (!p.user && !p.mode.wp));
        let protected_code = self.code.contains(&gpa_page);
        // Trace the tables first: the page may hold its own table.
        let who = (id as u32, lin);
        let mut known = self.spaces[id].pages.get(&lin).copied();
        if let Some(old) = known
            && (old.entries != t.entries || old.gpa_page != gpa_page)
        {
            // A stale shadow entry (its table was not traced at the time): replaced below.
            self.forget(who.0, lin, &old);
            self.spaces[id].pages.remove(&lin);
            known = None;
        }
        if known.is_none() {
            for e in t.entries.iter().flatten() {
                self.add_dep(*e, who)?;
            }
        }
        let traced = self.traces.get(&gpa_page).is_some_and(|tr| !tr.unsynced);
        let writable = may_write && t.dirty && !traced && !protected_code;
        let m = PageMap {
            gpa_page,
            writable,
            global: t.global,
            page_size: t.page_size,
            entries: t.entries,
        };
        match known {
            Some(old) => {
                let s = &mut self.spaces[id];
                if old.writable != writable {
                    s.window.protect(lin << 12, PAGE, writable)?;
                    self.stats.mprotect_calls += 1;
                }
                s.pages.insert(lin, m);
            }
            None => {
                let (first, run) = self.run_around(id, lin, m, &t, p.mode.pae)?;
                self.map_run(id, first, &run)?;
            }
        }
        if write && !writable {
            if protected_code {
                self.stats.code_writes += 1;
                return Ok(Fault::Code(gpa_page));
            }
            if traced {
                self.stats.traced_writes += 1;
                if let Some(tr) = self.traces.get_mut(&gpa_page) {
                    tr.writes += 1;
                    if tr.writes > UNTRACE_WRITES {
                        self.untrace(gpa_page)?;
                    }
                }
                return Ok(Fault::Traced);
            }
            // The firmware area: the write is dropped by the emulation.
            self.stats.emulated += 1;
            return Ok(Fault::Emulate);
        }
        self.stats.hidden_faults += 1;
        Ok(Fault::Hidden)
    }

    /// Maps consecutive window pages from `first`, backed by consecutive guest-physical pages,
    /// as `maps` say, in one mmap (read-only pages inside a writable run get an mprotect
    /// each), recycling windows if the host runs out of mappings.
    fn map_run(&mut self, id: usize, first: u32, maps: &[PageMap]) -> Result<(), ShadowError> {
        let n = maps.len() as u64;
        if self.live_pages + self.revoked_pages + n + 1024 >= self.map_limit {
            self.recycle_others(id)?;
        }
        let memory = self.memory.clone();
        let Some(off) = file_offset(&memory, u64::from(maps[0].gpa_page) << 12) else {
            return Ok(());
        };
        let writable = maps.iter().any(|m| m.writable);
        let mut tries = 0;
        loop {
            let r = self.spaces[id]
                .window
                .map(&memory, first << 12, off, n * PAGE, writable);
            self.stats.mmap_calls += 1;
            match r {
                Ok(()) => break,
                Err(e) if e.out_of_mappings() && tries < 2 => {
                    tries += 1;
                    if tries == 1 {
                        self.recycle_others(id)?;
                    } else {
                        self.clear_space(id)?;
                        self.stats.windows_recycled += 1;
                    }
                }
                Err(e) if e.out_of_mappings() => {
                    return Err(ShadowError::OutOfMappings {
                        limit: self.map_limit,
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        for (i, m) in maps.iter().enumerate() {
            let lin = first + i as u32;
            if writable && !m.writable {
                self.spaces[id].window.protect(lin << 12, PAGE, false)?;
                self.stats.mprotect_calls += 1;
            }
            self.live_pages += 1;
            // Mapped over: a revoked page's old host mapping is gone.
            if self.spaces[id].revoked.remove(&lin) {
                self.revoked_pages -= 1;
            }
            self.spaces[id].pages.insert(lin, *m);
            self.rmap.insert(m.gpa_page, (id as u32, lin));
        }
        self.stats.eager_pages += n - 1;
        Ok(())
    }

    /// The pages to map along with (`id`, `lin`) → `m` in one call: the aligned [`LARGE_RUN`]
    /// pages of a large page around it, or the neighbours in the same page table that map
    /// physically contiguous memory with the same rights and were already accessed (so mapping
    /// them early changes no A bit the guest can see). Their dependencies are recorded. Returns
    /// the first page and the run.
    fn run_around(
        &mut self,
        id: usize,
        lin: u32,
        m: PageMap,
        t: &Translation,
        pae: bool,
    ) -> Result<(u32, Vec<PageMap>), ShadowError> {
        let Some(region) = self
            .memory
            .layout()
            .region_of(u64::from(m.gpa_page) << 12, 1)
        else {
            return Ok((lin, vec![m]));
        };
        let (lo, hi) = (
            (region.guest_addr >> 12) as u32,
            ((region.end() >> 12) - 1) as u32,
        );
        let gpa_of = |l: u32| -> Option<u32> {
            let g = i64::from(m.gpa_page) + i64::from(l) - i64::from(lin);
            (i64::from(lo)..=i64::from(hi))
                .contains(&g)
                .then_some(g as u32)
        };
        // Candidate pages, nearest first on each side, and what each would map.
        let mut before = Vec::new();
        let mut after = Vec::new();
        if t.page_size > PAGE as u32 {
            let span = (t.page_size >> 12).min(LARGE_RUN);
            let start = lin & !(span - 1);
            for (side, range) in [
                (&mut before, (start..lin).rev().collect::<Vec<_>>()),
                (&mut after, (lin + 1..start + span).collect()),
            ] {
                for l in range {
                    if self.spaces[id].pages.contains_key(&l) {
                        break;
                    }
                    let Some(g) = gpa_of(l) else { break };
                    let synced = self.traces.get(&g).is_some_and(|tr| !tr.unsynced);
                    let writable = m.writable && !synced && !self.code.contains(&g);
                    side.push((
                        l,
                        PageMap {
                            gpa_page: g,
                            writable,
                            ..m
                        },
                    ));
                }
            }
        } else if let (false, Some(pte_addr)) = (pae, t.entries[1]) {
            // 2-level tables: up to RUN neighbours each side in the same table.
            const RUN: u32 = 16;
            const SAME: u32 = 0x147; // P, RW, US, D, G
            let mut mem = WalkMem(&self.memory);
            let leaf = mem.read_u32(pte_addr);
            let base = pte_addr & !0xFFF;
            let idx = ((pte_addr & 0xFFF) / 4) as u32;
            let first_l = lin - idx;
            let lo_i = idx.saturating_sub(RUN);
            let hi_i = (idx + RUN).min(1023);
            for (side, range) in [
                (&mut before, (lo_i..idx).rev().collect::<Vec<_>>()),
                (&mut after, (idx + 1..=hi_i).collect()),
            ] {
                for j in range {
                    let l = first_l + j;
                    if self.spaces[id].pages.contains_key(&l) {
                        break;
                    }
                    let Some(g) = gpa_of(l) else { break };
                    let e = mem.read_u32(base + 4 * u64::from(j));
                    let accessed = e & 0x21 == 0x21;
                    if !accessed || (e ^ leaf) & SAME != 0 || e >> 12 != g {
                        break;
                    }
                    if self.code.contains(&g) || self.traces.contains_key(&g) {
                        break;
                    }
                    side.push((
                        l,
                        PageMap {
                            gpa_page: g,
                            entries: [t.entries[0], Some(base + 4 * u64::from(j))],
                            ..m
                        },
                    ));
                }
            }
        }
        before.reverse();
        let first = before.first().map_or(lin, |(l, _)| *l);
        for (l, pm) in before.iter().chain(after.iter()) {
            for e in pm.entries.iter().flatten() {
                self.add_dep(*e, (id as u32, *l))?;
            }
        }
        let mut run: Vec<PageMap> = before.into_iter().map(|(_, pm)| pm).collect();
        run.push(m);
        run.extend(after.into_iter().map(|(_, pm)| pm));
        Ok((first, run))
    }

    /// Empties every window but `keep` (the host is short of mappings).
    fn recycle_others(&mut self, keep: usize) -> Result<(), ShadowError> {
        for i in 0..self.spaces.len() {
            let s = &self.spaces[i];
            if i != keep && !(s.pages.is_empty() && s.revoked.is_empty()) {
                self.clear_space(i)?;
                self.stats.windows_recycled += 1;
            }
        }
        Ok(())
    }

    /// Adaptive tracing: `page` takes too many writes; stop write-protecting it and
    /// resynchronise it lazily (CR3 load, INVLPG).
    fn untrace(&mut self, page: u32) -> Result<(), ShadowError> {
        if let Some(t) = self.traces.get_mut(&page) {
            t.unsynced = true;
            self.unsynced.insert(page);
            self.stats.trace_drops += 1;
        }
        // Its window mappings become writable at their next write fault (they are read-only
        // now); nothing to do eagerly.
        Ok(())
    }

    /// Brings the copies of the untraced tables holding `t`'s entries up to date before a
    /// mapping is made from them.
    ///
    /// A dependency means "this mapping holds while the entry keeps the value in the copy".
    /// An untraced table is written directly, so its entries may differ from the copy; a
    /// mapping made from such an entry's current value would otherwise survive the entry going
    /// back to the copy's value (present, then cleared back to the copy's zero when the
    /// process unmaps the page or exits): the next resynchronisation would see no change and
    /// keep a mapping of a frame the guest has freed. Resynchronising the table first drops
    /// what its changed entries supported — what a TLB may do at any time.
    fn resync_entries_of(&mut self, t: &Translation) -> Result<(), ShadowError> {
        for e in t.entries.iter().flatten() {
            let page = (e >> 12) as u32;
            if self.traces.get(&page).is_some_and(|tr| tr.unsynced) {
                self.resync(page)?;
            }
        }
        Ok(())
    }

    /// Guest-physical `page` was written (by emulation, a device or the monitor): resolves the
    /// write against the trace's copy and drops the shadow entries whose guest entry changed.
    pub fn table_written(&mut self, page: u32) -> Result<(), ShadowError> {
        self.table_written_range(page, 0, PAGE as u32)
    }

    /// Like [`ShadowMmu::table_written`], when only bytes `start..end` of the page were written
    /// (what [`GuestMemory::take_written_code_ranges`] reports): only the entries there are
    /// compared with the copy, not the whole page (a PTE write is one entry).
    pub fn table_written_range(
        &mut self,
        page: u32,
        start: u32,
        end: u32,
    ) -> Result<(), ShadowError> {
        match self.traces.get(&page) {
            Some(t) if !t.unsynced => self.resync_range(page, start, end).map(|_| ()),
            _ => Ok(()),
        }
    }

    /// Resolves the current contents of traced `page` against its copy; returns whether
    /// anything changed.
    fn resync(&mut self, page: u32) -> Result<bool, ShadowError> {
        self.resync_range(page, 0, PAGE as u32)
    }

    /// Resolves bytes `start..end` of traced `page` (widened to whole 8-byte entries) against
    /// its copy; returns whether anything changed. A traced page is written only through
    /// [`GuestMemory`], which reports every write's range, so the rest of the copy is current.
    fn resync_range(&mut self, page: u32, start: u32, end: u32) -> Result<bool, ShadowError> {
        let (first, last) = (
            (start & !7) as usize,
            (end.min(PAGE as u32) as usize + 7) & !7,
        );
        if first >= last {
            return Ok(false);
        }
        let Some(t) = self.traces.get_mut(&page) else {
            return Ok(false);
        };
        // Most writes are one entry: read only the range, without clearing a page-sized buffer.
        let (mut small, mut whole);
        let now: &mut [u8] = if last - first <= 64 {
            small = [0u8; 64];
            &mut small[..last - first]
        } else {
            whole = vec![0u8; last - first];
            &mut whole
        };
        if self
            .memory
            .read((u64::from(page) << 12) + first as u64, now)
            .is_err()
        {
            return Ok(false);
        }
        let old = &mut t.copy[first..last];
        if old == now {
            return Ok(false);
        }
        let base = u64::from(page) << 12;
        let mut dropped = Vec::new();
        for (i, (o, n)) in old.chunks_exact(4).zip(now.chunks_exact(4)).enumerate() {
            let old = u32::from_le_bytes(o.try_into().expect("4 bytes"));
            let new = u32::from_le_bytes(n.try_into().expect("4 bytes"));
            if old == new {
                continue;
            }
            let i = first / 4 + i;
            let diff = u64::from(old ^ new);
            let ad = pte::A | pte::D;
            // An entry that only gained A or D changes nothing a window holds; one that lost
            // them keeps its mapping until the TLB would be flushed.
            let only_ad = diff & !ad == 0;
            let lost_ad = u64::from(old) & diff != 0;
            // The dword belongs to a 4-byte entry (legacy) or an 8-byte one (PAE).
            for entry in [base + 4 * i as u64, base + 8 * (i as u64 / 2)] {
                if !only_ad {
                    // Every page that depends on the entry goes: the set goes with them at
                    // once, instead of one removal per page as each is forgotten (a large
                    // page's entry has 1024).
                    if let Some(list) = self.deps.remove(&entry) {
                        dropped.extend(list);
                    }
                    continue;
                }
                let Some(list) = self.deps.get(&entry) else {
                    continue;
                };
                if lost_ad {
                    self.pending
                        .extend(list.iter().filter(|who| who.0 != CODE).copied());
                }
            }
        }
        old.copy_from_slice(now);
        self.drop_pages(dropped)?;
        Ok(true)
    }

    /// A CR3 load (MOV to CR3, a task switch): entries that lost A/D since they were mapped are
    /// flushed (global ones stay while PGE is on), untraced tables resynchronised.
    pub fn cr3_loaded(&mut self, p: &Paging) -> Result<(), ShadowError> {
        let pending: Vec<(u32, u32)> = self
            .pending
            .iter()
            .copied()
            .filter(|(id, lin)| {
                !self.spaces[*id as usize]
                    .pages
                    .get(lin)
                    .is_some_and(|m| m.global && p.mode.pge)
            })
            .collect();
        self.drop_pages(pending)?;
        self.resync_untraced()?;
        for t in self.traces.values_mut() {
            t.writes = 0;
        }
        if self.code_tlb_cr3 != Some(p.mode.cr3) {
            self.clear_local_code_tlb(p.mode.cr3);
        }
        Ok(())
    }

    fn resync_untraced(&mut self) -> Result<(), ShadowError> {
        let unsynced: Vec<u32> = self.unsynced.iter().copied().collect();
        for page in unsynced {
            if self.resync(page)? {
                // Still being written: it stays untraced until a quiet period.
                continue;
            }
            if let Some(t) = self.traces.get_mut(&page) {
                t.unsynced = false;
                t.writes = 0;
            }
            self.unsynced.remove(&page);
            self.write_protect(page)?;
        }
        Ok(())
    }

    /// INVLPG of `linear` under `p`: the page (all of its large page) is dropped from the
    /// current address space's windows, entries pending a flush for it go, untraced tables are
    /// resynchronised.
    pub fn invlpg(&mut self, p: &Paging, linear: u32) -> Result<(), ShadowError> {
        self.resync_untraced()?;
        let lin = linear >> 12;
        for id in 0..self.spaces.len() {
            let cr3_matches =
                matches!(self.spaces[id].key, Key::Paged { cr3, .. } if cr3 == p.mode.cr3);
            let Some(m) = self.spaces[id].pages.get(&lin).copied() else {
                continue;
            };
            if !cr3_matches && !self.pending.contains(&(id as u32, lin)) {
                continue;
            }
            let span = m.page_size >> 12;
            let first = lin & !(span - 1);
            self.drop_pages((first..first + span).map(|l| (id as u32, l)).collect())?;
        }
        self.drop_page(CODE, lin)?;
        Ok(())
    }

    /// CR4.PGE toggled (how guests flush global translations): the windows are coherent with
    /// the guest's tables already, so only what a TLB would still hold goes — entries that
    /// lost A/D (global ones too), untraced tables resynchronised, cached fetches.
    pub fn flush_global(&mut self) -> Result<(), ShadowError> {
        let pending: Vec<(u32, u32)> = self.pending.iter().copied().collect();
        self.drop_pages(pending)?;
        self.resync_untraced()?;
        self.clear_code_tlb();
        Ok(())
    }

    /// A paging-mode change (CR0.PG/WP, CR4.PSE/PAE): every paged window is emptied.
    pub fn flush_all(&mut self) -> Result<(), ShadowError> {
        for id in 0..self.spaces.len() {
            if self.spaces[id].key != Key::Physical {
                self.clear_space(id)?;
                self.stats.windows_recycled += 1;
            }
        }
        self.clear_code_tlb();
        Ok(())
    }

    fn clear_code_tlb(&mut self) {
        let entries: Vec<(u32, [Option<u64>; 2])> = self
            .code_tlb
            .drain()
            .map(|(l, (_, _, e, _))| (l, e))
            .collect();
        for (lin, es) in entries {
            for e in es.iter().flatten() {
                self.release_dep(*e, (CODE, lin));
            }
        }
        self.code_tlb_cr3 = None;
        self.code_epoch += 1;
        self.global_code_all = true;
    }

    /// A new CR3: the non-global fetch translations go (global ones stay, as in a TLB).
    fn clear_local_code_tlb(&mut self, cr3: u32) {
        let local: Vec<(u32, [Option<u64>; 2])> = self
            .code_tlb
            .iter()
            .filter(|(_, e)| !e.3)
            .map(|(l, e)| (*l, e.2))
            .collect();
        for (lin, es) in local {
            self.code_tlb.remove(&lin);
            for e in es.iter().flatten() {
                self.release_dep(*e, (CODE, lin));
            }
        }
        self.code_tlb_cr3 = Some(cr3);
        self.local_code_epoch += 1;
    }

    /// The guest-physical page the code at linear `eip` is fetched from under `p`, as an
    /// instruction fetch at the current privilege sees it (setting A as the fetch does), or None
    /// if the fetch faults or the page is not memory (the interpreter then runs it).
    pub fn code_page(&mut self, p: &Paging, eip: u32) -> Result<Option<u32>, ShadowError> {
        let lin = eip >> 12;
        if !p.enabled {
            return Ok(region_kind(&self.memory, u64::from(lin) << 12).map(|_| lin));
        }
        if self.code_tlb_cr3 != Some(p.mode.cr3) {
            self.clear_local_code_tlb(p.mode.cr3);
        }
        if let Some(&(gpa, user, _, _)) = self.code_tlb.get(&lin)
            && (user || !p.user)
        {
            return Ok(Some(gpa));
        }
        let Ok(t) = self.walk(
            p,
            eip,
            Access {
                write: false,
                user: p.user,
            },
        ) else {
            return Ok(None);
        };
        if region_kind(&self.memory, t.frame).is_none() {
            return Ok(None);
        }
        self.resync_entries_of(&t)?;
        let gpa = (t.frame >> 12) as u32;
        if let Some((_, _, old, _)) = self.code_tlb.remove(&lin) {
            for e in old.iter().flatten() {
                self.release_dep(*e, (CODE, lin));
            }
        }
        // A global translation is kept as a TLB keeps it: until the guest flushes it (INVLPG,
        // CR4.PGE toggled, a paging-mode change), not until the entries it was read from
        // change. Those are often in the page directory of whichever process ran when it was
        // walked, which goes when that process exits and its directory page is reused, though
        // the kernel's mapping is the same in every address space. A guest that changes a
        // global mapping flushes it, as real TLBs require.
        let entries = if t.global { [None, None] } else { t.entries };
        for e in entries.iter().flatten() {
            self.add_dep(*e, (CODE, lin))?;
        }
        self.code_tlb.insert(lin, (gpa, t.user, entries, t.global));
        Ok(Some(gpa))
    }

    /// Guest-physical `page` now holds translated code: every window maps it read-only.
    pub fn mark_code(&mut self, page: u32) -> Result<(), ShadowError> {
        if !self.code.insert(page) {
            return Ok(());
        }
        self.memory.mark_code_page(page << 12, true);
        if is_ram(&self.memory, page) {
            for s in &mut self.spaces {
                if s.key == Key::Physical {
                    s.window.protect(page << 12, PAGE, false)?;
                    self.stats.mprotect_calls += 1;
                }
            }
        }
        self.write_protect(page)
    }

    /// Guest-physical `page` holds no translated code any more: writes may go through again
    /// (at once with paging off; at the next write fault in paged windows).
    pub fn unmark_code(&mut self, page: u32) -> Result<(), ShadowError> {
        if !self.code.remove(&page) {
            return Ok(());
        }
        self.memory.mark_code_page(page << 12, false);
        if is_ram(&self.memory, page) {
            for s in &mut self.spaces {
                if s.key == Key::Physical {
                    s.window.protect(page << 12, PAGE, true)?;
                    self.stats.mprotect_calls += 1;
                }
            }
        }
        Ok(())
    }

    /// Whether guest-physical `page` holds translated code.
    pub fn is_code(&self, page: u32) -> bool {
        self.code.contains(&page)
    }

    /// What the window for `p` maps at `linear`: the guest-physical page and whether it is
    /// writable (None if nothing is mapped there, or the window does not exist).
    pub fn mapping(&self, p: &Paging, linear: u32) -> Option<(u32, bool)> {
        let key = Self::key_of(p);
        let s = self.spaces.iter().find(|s| s.key == key)?;
        s.pages
            .get(&(linear >> 12))
            .map(|m| (m.gpa_page, m.writable))
    }
}

fn region_kind(memory: &GuestMemory, addr: u64) -> Option<RegionKind> {
    memory.layout().region_of(addr, 1).map(|r| r.kind)
}

fn is_ram(memory: &GuestMemory, page: u32) -> bool {
    region_kind(memory, u64::from(page) << 12) == Some(RegionKind::Ram)
}

fn file_offset(memory: &GuestMemory, addr: u64) -> Option<u64> {
    let r = memory.layout().region_of(addr, PAGE as usize)?;
    Some(r.file_offset + (addr - r.guest_addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmdriver::MemoryLayout;

    const PD: u64 = 0x10_0000;
    const PT: u64 = 0x10_1000;
    const DATA: u32 = 0x20_0000;
    const HI: u32 = 0xC000_0000;

    fn put(m: &GuestMemory, addr: u64, v: u32) {
        m.write(addr, &v.to_le_bytes()).unwrap();
    }

    /// HI -> DATA (user, writable); HI+1 page -> the page table itself (supervisor);
    /// HI+2 pages -> DATA+1 page (user, read-only); HI+3 pages -> the local APIC (device).
    fn setup(budget: usize) -> (Arc<GuestMemory>, ShadowMmu, Paging) {
        let mem = Arc::new(GuestMemory::new(MemoryLayout::new(8).unwrap()).unwrap());
        put(&mem, PD + 4 * 0x300, PT as u32 | 7);
        put(&mem, PT, DATA | 7);
        put(&mem, PT + 4, PT as u32 | 3);
        put(&mem, PT + 8, (DATA + 0x1000) | 5);
        put(&mem, PT + 12, 0xFEE0_0000 | 3);
        let shadow = ShadowMmu::new(mem.clone(), budget);
        let p = Paging {
            enabled: true,
            mode: Mode {
                cr3: PD as u32,
                pae: false,
                pse: true,
                wp: true,
                pge: false,
            },
            pdptes: [0; 4],
            user: false,
        };
        (mem, shadow, p)
    }

    fn fault(s: &mut ShadowMmu, p: &Paging, linear: u32, write: bool) -> Fault {
        let base = s.activate(p).unwrap();
        s.on_fault(p, base + u64::from(linear), write).unwrap()
    }

    #[test]
    fn a_read_maps_read_only_until_the_first_write_sets_dirty() {
        let (mem, mut s, p) = setup(4);
        assert_eq!(fault(&mut s, &p, HI + 8, false), Fault::Hidden);
        assert_eq!(
            s.mapping(&p, HI),
            Some((DATA >> 12, false)),
            "clean: read-only"
        );
        assert_eq!(mem.read_u32(PT).unwrap() & 0x60, 0x20, "A set, D not");
        assert_eq!(fault(&mut s, &p, HI + 8, true), Fault::Hidden);
        assert_eq!(s.mapping(&p, HI), Some((DATA >> 12, true)));
        assert_eq!(
            mem.read_u32(PT).unwrap() & 0x60,
            0x60,
            "the first write set D"
        );
        assert!(s.is_traced((PT >> 12) as u32), "the page table is traced");
        assert_eq!(s.stats.hidden_faults, 2);
    }

    #[test]
    fn forbidden_accesses_are_true_faults() {
        let (_mem, mut s, mut p) = setup(4);
        assert_eq!(
            fault(&mut s, &p, HI + 0x40_0000, false),
            Fault::True,
            "no table"
        );
        p.user = true;
        assert_eq!(
            fault(&mut s, &p, HI + 0x1000, false),
            Fault::True,
            "supervisor page"
        );
        assert_eq!(
            fault(&mut s, &p, HI + 0x2000, true),
            Fault::True,
            "read-only page"
        );
        assert_eq!(fault(&mut s, &p, HI + 0x2000, false), Fault::Hidden);
        assert_eq!(s.mapping(&p, HI + 0x1000), None);
        assert_eq!(s.stats.true_faults, 3);
        // WP=0: the supervisor may write the read-only page.
        p.user = false;
        p.mode.wp = false;
        assert_eq!(fault(&mut s, &p, HI + 0x2000, true), Fault::Hidden);
        assert_eq!(s.mapping(&p, HI + 0x2000), Some(((DATA >> 12) + 1, true)));
    }

    #[test]
    fn device_memory_is_never_mapped() {
        let (_mem, mut s, p) = setup(4);
        assert_eq!(fault(&mut s, &p, HI + 0x3000, false), Fault::Emulate);
        assert_eq!(s.mapping(&p, HI + 0x3000), None);
    }

    #[test]
    fn a_changed_entry_drops_exactly_its_mapping() {
        let (mem, mut s, p) = setup(4);
        fault(&mut s, &p, HI, true);
        fault(&mut s, &p, HI + 0x2000, false);
        // The page table, mapped at HI + 0x1000, is read-only: a write there is traced.
        assert_eq!(fault(&mut s, &p, HI + 0x1000, true), Fault::Traced);
        assert_eq!(s.mapping(&p, HI + 0x1000), Some(((PT >> 12) as u32, false)));
        // The emulated write re-points HI; the other entries keep their mappings.
        put(&mem, PT, (DATA + 0x3000) | 7);
        for page in mem.take_written_code_pages() {
            s.table_written(page).unwrap();
        }
        assert_eq!(s.mapping(&p, HI), None);
        assert_eq!(s.mapping(&p, HI + 0x2000), Some(((DATA >> 12) + 1, false)));
        assert_eq!(s.stats.entries_dropped, 1);
        // Clearing A only keeps the mapping (a TLB would keep it) until the next CR3 load.
        fault(&mut s, &p, HI, false);
        for page in mem.take_written_code_pages() {
            s.table_written(page).unwrap(); // the walk's A bit: nothing to drop
        }
        assert!(s.mapping(&p, HI).is_some());
        let e = mem.read_u32(PT).unwrap();
        put(&mem, PT, e & !0x20);
        s.table_written((PT >> 12) as u32).unwrap();
        assert!(s.mapping(&p, HI).is_some());
        s.cr3_loaded(&p).unwrap();
        assert_eq!(s.mapping(&p, HI), None);
    }

    #[test]
    fn invlpg_drops_the_page_and_code_pages_are_read_only() {
        let (_mem, mut s, p) = setup(4);
        fault(&mut s, &p, HI, true);
        s.invlpg(&p, HI + 0x123).unwrap();
        assert_eq!(s.mapping(&p, HI), None);
        fault(&mut s, &p, HI, true);
        assert_eq!(s.mapping(&p, HI), Some((DATA >> 12, true)));
        s.mark_code(DATA >> 12).unwrap();
        assert_eq!(s.mapping(&p, HI), Some((DATA >> 12, false)));
        assert_eq!(fault(&mut s, &p, HI, true), Fault::Code(DATA >> 12));
        s.unmark_code(DATA >> 12).unwrap();
        assert_eq!(fault(&mut s, &p, HI, true), Fault::Hidden);
        assert_eq!(s.mapping(&p, HI), Some((DATA >> 12, true)));
    }

    #[test]
    fn a_fetch_follows_the_tables_and_its_changes() {
        let (mem, mut s, p) = setup(4);
        assert_eq!(s.code_page(&p, HI + 5).unwrap(), Some(DATA >> 12));
        assert!(!s.code_is_global(HI + 5));
        let epochs = (s.code_epoch(), s.local_code_epoch());
        put(&mem, PT, (DATA + 0x3000) | 7);
        s.table_written((PT >> 12) as u32).unwrap();
        assert!(
            s.local_code_epoch() > epochs.1,
            "indirect lookups of non-global code must be forgotten"
        );
        assert_eq!(s.code_epoch(), epochs.0, "global code's lookups stay");
        assert_eq!(s.code_page(&p, HI + 5).unwrap(), Some((DATA >> 12) + 3));
        let mut user = p;
        user.user = true;
        assert_eq!(
            s.code_page(&user, HI + 0x1000).unwrap(),
            None,
            "supervisor code"
        );
    }

    #[test]
    fn global_code_fetches_survive_a_cr3_load_as_in_a_tlb() {
        let (mem, mut s, mut p) = setup(4);
        p.mode.pge = true;
        // HI is global (G, bit 8), HI + 0x2000 is not.
        put(&mem, PT, DATA | 0x107);
        assert_eq!(s.code_page(&p, HI).unwrap(), Some(DATA >> 12));
        assert_eq!(
            s.code_page(&p, HI + 0x2000).unwrap(),
            Some((DATA >> 12) + 1)
        );
        assert!(s.code_is_global(HI) && !s.code_is_global(HI + 0x2000));
        // Another address space, with the same kernel tables.
        let pd2 = PD + 0x10_000;
        put(&mem, pd2 + 4 * 0x300, PT as u32 | 7);
        let epochs = (s.code_epoch(), s.local_code_epoch());
        let mut q = p;
        q.mode.cr3 = pd2 as u32;
        s.cr3_loaded(&q).unwrap();
        assert_eq!(s.code_epoch(), epochs.0, "global lookups stay");
        assert!(s.local_code_epoch() > epochs.1, "non-global lookups go");
        assert!(s.code_is_global(HI), "kept, as a TLB keeps it");
        assert!(!s.code_is_global(HI + 0x2000), "dropped with the old CR3");
        // A change of the global page's entry is seen once the guest flushes it, as a TLB's
        // global entry: until then the fetch follows the old mapping.
        put(&mem, PT, (DATA + 0x3000) | 0x107);
        s.table_written((PT >> 12) as u32).unwrap();
        assert_eq!(s.code_epoch(), epochs.0, "kept until flushed");
        assert_eq!(s.code_page(&q, HI).unwrap(), Some(DATA >> 12));
        // The old address space's directory going (rewritten for something else) changes
        // nothing for the kernel's global code either.
        put(&mem, PD + 4 * 0x300, 0);
        s.table_written((PD >> 12) as u32).unwrap();
        assert_eq!(s.code_epoch(), epochs.0);
        s.invlpg(&q, HI).unwrap();
        assert!(s.code_epoch() > epochs.0, "global lookups go at the flush");
        // ... and it says which page (the chains into it go, not every global chain).
        assert_eq!(s.take_global_code_changes(), (false, vec![HI >> 12]));
        assert_eq!(s.take_global_code_changes(), (false, vec![]), "taken");
        assert_eq!(s.code_page(&q, HI).unwrap(), Some((DATA >> 12) + 3));
        // A global flush (CR4.PGE toggled) is a change of every global page.
        s.flush_global().unwrap();
        assert!(s.take_global_code_changes().0);
    }

    /// A space whose page table at PT was written often enough to stop being traced.
    fn untraced_page_table() -> (Arc<GuestMemory>, ShadowMmu, Paging) {
        let (mem, mut s, p) = setup(4);
        fault(&mut s, &p, HI, true);
        for _ in 0..=UNTRACE_WRITES {
            assert_eq!(fault(&mut s, &p, HI + 0x1000, true), Fault::Traced);
        }
        assert_eq!(s.stats.trace_drops, 1);
        (mem, s, p)
    }

    #[test]
    fn a_mapping_made_from_an_untraced_table_goes_when_its_entry_returns_to_the_copy() {
        let (mem, mut s, p) = untraced_page_table();
        // Entry 4 was empty when the table's copy was taken. The guest fills it (a direct
        // write: the table is untraced), touches the page, then empties it again (munmap) and
        // flushes its TLB with a CR3 load: the frame must not stay mapped.
        let lin = HI + 0x4000;
        put(&mem, PT + 16, (DATA + 0x2000) | 7);
        assert_eq!(fault(&mut s, &p, lin, false), Fault::Hidden);
        assert_eq!(s.mapping(&p, lin), Some(((DATA + 0x2000) >> 12, false)));
        put(&mem, PT + 16, 0);
        s.cr3_loaded(&p).unwrap();
        assert_eq!(s.mapping(&p, lin), None, "a freed frame is still mapped");
        assert_eq!(fault(&mut s, &p, lin, false), Fault::True);
    }

    #[test]
    fn a_table_written_too_often_is_untraced_then_resynchronised() {
        let (mem, mut s, p) = untraced_page_table();
        // Untraced: the table's page becomes writable, and guest writes to it go straight in.
        assert_eq!(fault(&mut s, &p, HI + 0x1000, true), Fault::Hidden);
        assert_eq!(s.mapping(&p, HI + 0x1000), Some(((PT >> 12) as u32, true)));
        put(&mem, PT, (DATA + 0x3000) | 7);
        s.table_written((PT >> 12) as u32).unwrap();
        assert!(
            s.mapping(&p, HI).is_some(),
            "stale until the TLB would be flushed"
        );
        // INVLPG of another page resynchronises the table: the changed entry goes; the table
        // was written, so it stays untraced.
        s.invlpg(&p, HI + 0x2000).unwrap();
        assert_eq!(s.mapping(&p, HI), None);
        assert_eq!(s.mapping(&p, HI + 0x1000), Some(((PT >> 12) as u32, true)));
        // A quiet period: the next CR3 load traces it again.
        s.cr3_loaded(&p).unwrap();
        assert_eq!(s.mapping(&p, HI + 0x1000), Some(((PT >> 12) as u32, false)));
    }

    #[test]
    fn large_pages_and_accessed_neighbours_map_in_one_call() {
        let (mem, mut s, p) = setup(4);
        // A 4 MiB page at 0x0040_0000 -> 4 MiB (the 8 MiB guest has RAM up to 8 MiB).
        put(&mem, PD + 4, 0x40_0000 | 0x83);
        let calls = s.stats.mmap_calls;
        assert_eq!(fault(&mut s, &p, 0x45_6789, false), Fault::Hidden);
        assert_eq!(s.mapping(&p, 0x40_0000), Some((0x400, false)));
        assert_eq!(s.mapping(&p, 0x4F_F000), Some((0x4FF, false)));
        assert_eq!(
            s.stats.mmap_calls,
            calls + 1,
            "one call for the aligned 1 MiB of the large page"
        );
        assert_eq!(
            s.mapping(&p, 0x50_0000),
            None,
            "the rest waits for its faults"
        );
        assert_eq!(fault(&mut s, &p, 0x7F_F123, true), Fault::Hidden);
        assert_eq!(s.mapping(&p, 0x70_0000), Some((0x700, true)));
        assert_eq!(s.mapping(&p, 0x7F_F000), Some((0x7FF, true)));
        assert_eq!(s.mapping(&p, 0x6F_F000), None);
        assert_eq!(s.stats.mmap_calls, calls + 2);
        // 4 KiB pages: neighbours already accessed map along; an unaccessed one stops the run
        // and keeps A clear.
        for i in 0..4u64 {
            let a = if i == 3 { 0 } else { 0x20 };
            put(
                &mem,
                PT + 4 * (0x10 + i),
                (0x30_0000 + 0x1000 * i as u32) | 3 | a,
            );
        }
        let calls = s.stats.mmap_calls;
        assert_eq!(fault(&mut s, &p, HI + 0x1_0000, false), Fault::Hidden);
        assert_eq!(s.stats.mmap_calls, calls + 1);
        assert_eq!(s.mapping(&p, HI + 0x1_2000), Some((0x302, false)));
        assert_eq!(s.mapping(&p, HI + 0x1_3000), None);
        assert_eq!(mem.read_u32(PT + 4 * 0x13).unwrap() & 0x20, 0);
        // INVLPG of the large page drops all of it.
        s.invlpg(&p, 0x40_0000).unwrap();
        assert_eq!(s.mapping(&p, 0x4F_F000), None);
        assert_eq!(s.mapping(&p, 0x7F_F000), None);
    }

    /// The host protection of the mapping holding host address `addr` ("rw-s", "---p", ...).
    fn host_protection(addr: u64) -> Option<String> {
        host_mappings()
            .into_iter()
            .find(|(lo, hi, _)| (*lo..*hi).contains(&addr))
            .map(|(_, _, prot)| prot)
    }

    /// Guest-physical memory for the tests' reference walks: reads only, A/D left alone.
    struct ReadOnly<'a>(&'a GuestMemory);
    impl PhysMem for ReadOnly<'_> {
        fn read_u32(&mut self, addr: u64) -> u32 {
            self.0.read_u32(addr).unwrap_or(u32::MAX)
        }
        fn write_u32(&mut self, _addr: u64, _value: u32) {}
    }

    /// The host mappings of this process: (start, end, protection) from /proc/self/maps.
    fn host_mappings() -> Vec<(u64, u64, String)> {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let (range, prot) = (f.next()?, f.next()?);
                let (lo, hi) = range.split_once('-')?;
                Some((
                    u64::from_str_radix(lo, 16).ok()?,
                    u64::from_str_radix(hi, 16).ok()?,
                    prot.to_string(),
                ))
            })
            .collect()
    }

    /// Checks every paged window against the guest's tables and the host's mappings: a page in
    /// the bookkeeping maps the frame a fresh walk finds (writable only where the guest allows
    /// the write and the entry is dirty) unless a TLB could still hold it (an entry that lost
    /// A/D, or a table being written untraced); a page not in the bookkeeping is not accessible
    /// on the host at all (the reservation, or a revoked mapping where the bookkeeping says
    /// so); the host's protection is the bookkeeping's.
    fn check_windows(s: &ShadowMmu, mem: &GuestMemory, p: &Paging, lins: &[u32], step: usize) {
        let host = host_mappings();
        let prot_at = |addr: u64| {
            host.iter()
                .find(|(lo, hi, _)| (*lo..*hi).contains(&addr))
                .map(|(_, _, prot)| prot.as_str())
        };
        let unsynced: Vec<u32> = {
            let mut v: Vec<u32> = s
                .traces
                .iter()
                .filter(|(_, t)| t.unsynced)
                .map(|(p, _)| *p)
                .collect();
            v.sort_unstable();
            v
        };
        assert_eq!(
            s.unsynced.iter().copied().collect::<Vec<_>>(),
            unsynced,
            "step {step}: the unsynced set and the traces disagree"
        );
        assert_eq!(
            s.revoked_pages,
            s.spaces.iter().map(|x| x.revoked.len() as u64).sum::<u64>(),
            "step {step}: the revoked-page count and the windows disagree"
        );
        for space in &s.spaces {
            assert!(
                space.revoked.iter().all(|l| !space.pages.contains_key(l)),
                "step {step}: a page both mapped and revoked"
            );
        }
        for (id, space) in s.spaces.iter().enumerate() {
            let Key::Paged { cr3, user } = space.key else {
                continue;
            };
            let mode = Mode { cr3, ..p.mode };
            // Low addresses too: no table maps them, but they are where guest RAM would show
            // through if a window still held physical memory.
            for &lin in lins.iter().chain(&[0x20_0000, 0x31_0000]) {
                let at = format!("step {step}, window {id} ({cr3:#x}, user {user}), {lin:#x}");
                let host_prot = prot_at(space.window.base() + u64::from(lin));
                let Some(m) = space.pages.get(&(lin >> 12)) else {
                    // The reservation, or a dropped page's mapping made inaccessible.
                    let want = if space.revoked.contains(&(lin >> 12)) {
                        "---s"
                    } else {
                        "---p"
                    };
                    assert_eq!(host_prot, Some(want), "{at}: reachable but not mapped");
                    continue;
                };
                let want = if m.writable { "rw-s" } else { "r--s" };
                assert_eq!(host_prot, Some(want), "{at}: host and bookkeeping disagree");
                let may_be_stale = s.pending.contains(&(id as u32, lin >> 12))
                    || m.entries.iter().flatten().any(|e| {
                        s.traces
                            .get(&((e >> 12) as u32))
                            .is_some_and(|t| t.unsynced)
                    });
                if may_be_stale {
                    continue;
                }
                let read = Access { write: false, user };
                let t = walk::walk(&mut ReadOnly(mem), mode, &[0; 4], lin, read)
                    .unwrap_or_else(|_| panic!("{at}: mapped, but the guest's walk faults"));
                assert_eq!((t.frame >> 12) as u32, m.gpa_page, "{at}: another frame");
                if m.writable {
                    assert!(
                        t.dirty && (t.writable || (!user && !mode.wp)),
                        "{at}: writable, but the guest does not allow the write"
                    );
                    assert!(
                        s.traces.get(&m.gpa_page).is_none_or(|t| t.unsynced),
                        "{at}: a traced table is writable"
                    );
                }
            }
        }
    }

    /// A random entry of the table page at `page` (directories are `pds`, tables point at
    /// `frames`), and a random value for it: directories point at tables, tables at frames, with
    /// P and some of RW, US, A and D; one time in four not present. Returns (address, value).
    fn random_entry(
        page: u32,
        pds: &[u32],
        pts: &[u32],
        frames: &[u32],
        next: &mut impl FnMut(usize) -> usize,
    ) -> (u64, u32) {
        let (index, v) = if pds.contains(&page) {
            (0x300 + next(2), pts[next(pts.len())] | 7)
        } else {
            let r = next(64);
            (next(6), frames[next(frames.len())] | 1 | (r as u32 & 0x66))
        };
        let v = if next(4) == 0 { 0 } else { v };
        (u64::from(page) + 4 * index as u64, v)
    }

    /// Long random runs (three seeds) of what guests do to their address spaces under a budget of three
    /// windows, so that windows (the physical one included) are recycled all the time: switch
    /// CR3, turn paging off and on, touch pages, rewrite directory and table entries through
    /// their linear mappings (traced, or straight in once untraced) and as the monitor does,
    /// INVLPG. After every step every window is checked by [`check_windows`].
    #[test]
    fn random_address_space_churn_keeps_every_window_true_to_the_tables() {
        for seed in [
            0x2545_F491_4F6C_DD1D,
            0x9E37_79B9_7F4A_7C15,
            0xD1B5_4A32_D192_ED03,
        ] {
            churn(seed);
        }
    }

    /// [`random_address_space_churn_keeps_every_window_true_to_the_tables`] from one seed.
    fn churn(seed: u64) {
        const STEPS: usize = 6000;
        let mem = Arc::new(GuestMemory::new(MemoryLayout::new(8).unwrap()).unwrap());
        let pds = [0x30_0000u32, 0x30_1000, 0x30_2000, 0x30_3000];
        let pts = [0x31_0000u32, 0x31_1000, 0x31_2000];
        // Frames the tables may map: data pages, and the tables themselves.
        let frames: Vec<u32> = (0..5u32)
            .map(|j| 0x20_0000 + j * 0x1000)
            .chain(pts)
            .chain([pds[0]])
            .collect();
        let lins: Vec<u32> = [0x300u32, 0x301]
            .iter()
            .flat_map(|pde| (0..6u32).map(move |i| (pde << 22) | (i << 12)))
            .collect();
        let mut s = ShadowMmu::new(mem.clone(), 3);
        let mut rng = seed;
        let mut next = move |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let mut p = Paging {
            enabled: true,
            mode: Mode {
                cr3: pds[0],
                pae: false,
                pse: true,
                wp: true,
                pge: false,
            },
            pdptes: [0; 4],
            user: false,
        };
        let report = |s: &mut ShadowMmu| {
            // As the bt engine reports them: only the part of each page written.
            for w in mem.take_written_code_ranges() {
                s.table_written_range(w.page, w.start.into(), w.end.into())
                    .unwrap();
            }
        };
        for step in 0..STEPS {
            match next(60) {
                0 | 1 => {
                    p.enabled = next(6) != 0;
                    p.mode.cr3 = pds[next(pds.len())];
                    p.user = next(2) == 0;
                    if p.enabled {
                        s.cr3_loaded(&p).unwrap();
                    }
                }
                2..=9 => {
                    // The monitor (an emulated instruction, a device) writes an entry.
                    let page = if next(3) == 0 {
                        pds[next(pds.len())]
                    } else {
                        pts[next(pts.len())]
                    };
                    let (addr, v) = random_entry(page, &pds, &pts, &frames, &mut next);
                    mem.write(addr, &v.to_le_bytes()).unwrap();
                    report(&mut s);
                }
                10 | 11 if p.enabled => {
                    s.invlpg(&p, lins[next(lins.len())]).unwrap();
                    report(&mut s);
                }
                12..=14 if p.enabled => {
                    // A burst of writes to one table through a linear mapping of it (a fork
                    // copying entries): traced at first, then untraced and written straight in.
                    let lin = lins[next(lins.len())];
                    let (pde, pti) = (lin >> 22, (lin >> 12) & 0x3FF);
                    let pt = pts[next(pts.len())];
                    let target = if next(2) == 0 {
                        pts[next(pts.len())]
                    } else {
                        p.mode.cr3
                    };
                    mem.write(u64::from(p.mode.cr3 + 4 * pde), &(pt | 7).to_le_bytes())
                        .unwrap();
                    mem.write(u64::from(pt + 4 * pti), &(target | 0x67).to_le_bytes())
                        .unwrap();
                    report(&mut s);
                    for _ in 0..80 {
                        let base = s.activate(&p).unwrap();
                        let f = s.on_fault(&p, base + u64::from(lin), true).unwrap();
                        report(&mut s);
                        if !matches!(f, Fault::Traced | Fault::Hidden) {
                            break;
                        }
                        // Any entry but the two this mapping rests on.
                        let (addr, v) = random_entry(target, &pds, &pts, &frames, &mut next);
                        if addr == u64::from(p.mode.cr3 + 4 * pde)
                            || addr == u64::from(pt + 4 * pti)
                        {
                            continue;
                        }
                        mem.write(addr, &v.to_le_bytes()).unwrap();
                        report(&mut s);
                    }
                }
                _ => {
                    // The guest touches a page; a write to a table page it maps changes an
                    // entry there (emulated when traced, straight in when untraced).
                    let lin = lins[next(lins.len())];
                    let write = next(2) == 0;
                    let base = s.activate(&p).unwrap();
                    let f = s.on_fault(&p, base + u64::from(lin), write).unwrap();
                    report(&mut s);
                    let page = s.mapping(&p, lin).map(|(g, _)| g << 12);
                    if let Some(page) =
                        page.filter(|g| write && (pds.contains(g) || pts.contains(g)))
                        && matches!(f, Fault::Traced | Fault::Hidden)
                    {
                        let (addr, v) = random_entry(page, &pds, &pts, &frames, &mut next);
                        mem.write(addr, &v.to_le_bytes()).unwrap();
                        report(&mut s);
                    }
                }
            }
            check_windows(&s, &mem, &p, &lins, step);
        }
        assert!(s.stats.windows_recycled > 50, "{:?}", s.stats);
        assert!(s.stats.trace_drops > 0, "{:?}", s.stats);
        assert!(s.stats.hidden_faults > 100, "{:?}", s.stats);
    }

    #[test]
    fn a_recycled_physical_window_keeps_no_guest_memory_for_its_new_address_space() {
        let (_mem, mut s, mut p) = setup(2);
        // Paging off first (the boot): the physical window maps RAM at its guest addresses.
        p.enabled = false;
        let phys = s.activate(&p).unwrap();
        assert_eq!(
            host_protection(phys + u64::from(DATA)).as_deref(),
            Some("rw-s")
        );
        // Two address spaces later, the physical window (least recently used) is recycled.
        p.enabled = true;
        s.activate(&p).unwrap();
        p.mode.cr3 = 0x30_0000;
        let base = s.activate(&p).unwrap();
        assert_eq!(base, phys, "the physical window was the one recycled");
        assert_eq!(s.stats.windows_recycled, 1);
        // Nothing of guest RAM may show through: an access must fault, so the guest's page
        // tables decide (this directory maps nothing at DATA).
        assert_eq!(
            host_protection(base + u64::from(DATA)).as_deref(),
            Some("---p")
        );
        assert_eq!(fault(&mut s, &p, DATA, false), Fault::True);
    }

    #[test]
    fn windows_are_recycled_within_the_budget() {
        let (mem, mut s, mut p) = setup(2);
        for i in 0..5u32 {
            // Each CR3 a copy of the directory.
            let pd = 0x30_0000 + u64::from(i) * 0x1000;
            put(&mem, pd + 4 * 0x300, PT as u32 | 7);
            p.mode.cr3 = pd as u32;
            assert_eq!(fault(&mut s, &p, HI, false), Fault::Hidden);
        }
        assert_eq!(s.windows(), 2);
        assert_eq!(s.stats.windows_created, 2);
        assert_eq!(s.stats.windows_recycled, 3);
        // The recycled windows gave up their dependencies: only the live ones trace pages.
        assert_eq!(s.mapping(&p, HI), Some((DATA >> 12, false)));
    }
}
