//! The translation cache: units by guest EIP and by guest page, their host code in a
//! [`CodeCache`], chaining of direct exits, the indirect-branch lookup table, locating a host
//! RIP's guest instruction, and invalidation.

use std::cell::Cell;
use std::collections::BTreeMap;

use rustc_hash::FxHashMap as HashMap;
use std::time::{Duration, Instant};

use vmdriver::codecache::{CodeCache, CodeCacheError, LookupMemory};

use crate::translate::{
    self, CROSS_FROM, CodeSource, MapEntry, Mode, Slot, TranslateError, may_cross_page,
};

/// Entries of an indirect-branch lookup table (indexed by the guest EIP's low 16 bits).
const LOOKUP_ENTRIES: usize = 1 << 16;

/// Indirect-branch lookup tables kept, one per (translation mode, CPL) recently run. Linux
/// alone runs in six: kernel code with FS and GS each flat or not (the entry code runs before
/// FS is loaded with the per-CPU segment; GS holds the user's TLS segment or null), user code
/// with GS flat or not. With four tables, a fork and exec emptied a kernel table ~6 times,
/// ~3,500 lookup misses each time.
const LOOKUP_TABLES: usize = 8;

/// The key of a lookup table: the translation mode and the CPL its entries were found under.
type LookupKey = (Mode, u8);

/// One indirect-branch lookup table: guest EIP → host entry, for one (mode, CPL).
struct LookupTable {
    /// The (mode, CPL) its entries are valid for; None while unused.
    key: Option<LookupKey>,
    entries: LookupMemory,
    /// Slots filled since it was last cleared.
    used: Vec<u16>,
    /// Slots filled for code on non-global pages since they were last cleared.
    local: Vec<u16>,
    /// When it was last selected (for replacement).
    last_used: u64,
}

impl LookupTable {
    fn new() -> Result<Self, CacheError> {
        Ok(Self {
            key: None,
            entries: LookupMemory::new(LOOKUP_ENTRIES)?,
            used: Vec::new(),
            local: Vec::new(),
            last_used: 0,
        })
    }

    fn clear(&mut self) {
        if self.used.len() > LOOKUP_ENTRIES / 8 {
            self.entries.fill([0, 0]);
        } else {
            for &i in &self.used {
                self.entries[i as usize] = [0, 0];
            }
        }
        self.used.clear();
        self.local.clear();
    }

    fn clear_local(&mut self) {
        for &i in &self.local {
            self.entries[i as usize] = [0, 0];
        }
        self.local.clear();
    }

    /// Empties the entries for code in linear pages `pages` (address >> 12), and for the last
    /// 14 bytes of the page before each, whose instructions may run on into it. An entry for
    /// page P sits at index `eip & 0xFFFF`, among the 4 Ki slots for P's low 4 bits.
    fn clear_pages(&mut self, pages: &[u32]) {
        for &p in pages {
            for (page, first) in [(p, 0), (p.wrapping_sub(1), CROSS_FROM as usize)] {
                let base = ((page & 0xF) << 12) as usize;
                for i in base + first..base + 0x1000 {
                    let key = self.entries[i][0];
                    if key != 0 && (!key as u32) >> 12 == page {
                        self.entries[i] = [0, 0];
                    }
                }
            }
        }
        // Slots emptied here are listed again when refilled: keep the lists bounded.
        if self.used.len() > 2 * LOOKUP_ENTRIES || self.local.len() > 2 * LOOKUP_ENTRIES {
            self.used.sort_unstable();
            self.used.dedup();
            self.local.sort_unstable();
            self.local.dedup();
        }
    }
}

/// Errors from the translation cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The code cache could not be created.
    #[error(transparent)]
    CodeCache(#[from] CodeCacheError),
    /// A unit could not be translated.
    #[error(transparent)]
    Translate(#[from] TranslateError),
}

/// A translation unit in the cache.
#[derive(Debug)]
pub struct Unit {
    /// Guest EIP of its first instruction.
    pub eip: u32,
    /// The guest-physical page (number) its code was read from.
    pub page: u32,
    /// The mode it was translated for.
    pub mode: Mode,
    /// The guest-physical page its instruction runs on into, for a unit whose one instruction
    /// crosses a page boundary.
    pub page2: Option<u32>,
    /// Host address of its entry.
    pub host: u64,
    /// Host code length.
    pub len: u32,
    /// Host-offset → guest-EIP map.
    pub map: Vec<MapEntry>,
    /// Patchable exits.
    pub slots: Vec<Slot>,
    /// Guest instructions translated.
    pub instructions: u32,
    /// One past the last guest byte (linear) its instructions cover.
    pub guest_end: u32,
    /// The instruction the unit ends with a callout for, if any.
    pub callout: Option<iced_x86::Mnemonic>,
    /// The target unit each slot is chained to.
    chained: Vec<Option<u32>>,
    /// Chained predecessors: (unit, slot).
    incoming: Vec<(u32, u32)>,
    /// The rel32 each slot held before chaining (it leads to the slot's exit trampoline).
    original: Vec<i32>,
}

/// Counters for `--stats`.
#[derive(Debug, Default, Clone)]
pub struct CacheStats {
    /// Units translated.
    pub units: u64,
    /// Guest instructions translated.
    pub instructions: u64,
    /// Units translated for a DS, ES or SS with a non-zero base (see [`Mode::segment_bases`]).
    pub based_units: u64,
    /// Stack-pointer moves of the translated stack operations.
    pub esp_moves: u64,
    /// R12D updates emitted for them (the rest were folded into a unit's pending delta).
    pub esp_updates: u64,
    /// Time spent translating.
    pub time: Duration,
    /// Exit jumps patched to lead straight to their target.
    pub chain_patches: u64,
    /// Of those, jumps to code in another page, a global one (paging on).
    pub global_chains: u64,
    /// Units dropped because their guest page was written.
    pub invalidated: u64,
    /// Times the code cache filled up and was emptied.
    pub flushes: u64,
    /// Times every indirect-branch lookup table was emptied (a code mapping changed).
    pub lookup_flushes: u64,
    /// Times the lookup entries for non-global code were emptied (an address-space switch).
    pub lookup_local_flushes: u64,
    /// Times the lookup entries for a few global code pages were emptied (their mappings
    /// changed).
    pub lookup_page_flushes: u64,
    /// Times a lookup table was emptied for another (mode, CPL) than it held.
    pub lookup_recycles: u64,
}

/// What [`Translator::translate`] did.
#[derive(Debug)]
pub struct Translated {
    /// Host entry of the new unit.
    pub host: u64,
    /// Guest pages that lost all their units because the cache was flushed to make room.
    pub flushed_pages: Vec<u32>,
    /// The second page the unit's instruction runs on into, if it does.
    pub page2: Option<u32>,
}

/// Global chains listed before the list is cleared of the ones dropped units left.
const GLOBAL_CHAINS_COMPACT: usize = 1 << 16;

/// Entries of the monitor's own unit cache (a power of two).
const ENTRY_CACHE: usize = 4096;

/// One slot of [`EntryCache`].
#[derive(Clone, Copy, Default)]
struct CachedEntry {
    eip: u32,
    mode: Mode,
    cpl: u8,
    global: bool,
    /// The generations it was entered in (see [`EntryCache`]).
    global_gen: u32,
    local_gen: u32,
    /// 0 for an empty slot.
    host: u64,
}

/// The monitor's cache of unit entries by (linear EIP, mode, CPL), direct-mapped by EIP: where
/// the monitor goes on after a callout or an interrupt, without walking the guest's page
/// tables for the code page and hashing (EIP, page, mode). It follows the lookup tables'
/// rules (entries keyed by linear EIP stay valid while the code mappings do: the
/// non-global ones until any change of the address space, global ones until a global mapping
/// changes), with a generation number per kind instead of emptying the slots.
struct EntryCache {
    slots: Box<[CachedEntry]>,
    global_gen: u32,
    local_gen: u32,
}

impl EntryCache {
    fn new() -> Self {
        Self {
            slots: vec![CachedEntry::default(); ENTRY_CACHE].into_boxed_slice(),
            global_gen: 0,
            local_gen: 0,
        }
    }

    fn slot(eip: u32) -> usize {
        eip as usize & (ENTRY_CACHE - 1)
    }

    fn get(&self, eip: u32, mode: Mode, cpl: u8) -> Option<u64> {
        let e = &self.slots[Self::slot(eip)];
        let live = e.host != 0
            && e.eip == eip
            && e.mode == mode
            && e.cpl == cpl
            && e.global_gen == self.global_gen
            && (e.global || e.local_gen == self.local_gen);
        live.then_some(e.host)
    }

    fn insert(&mut self, eip: u32, mode: Mode, cpl: u8, host: u64, global: bool) {
        self.slots[Self::slot(eip)] = CachedEntry {
            eip,
            mode,
            cpl,
            global,
            global_gen: self.global_gen,
            local_gen: self.local_gen,
            host,
        };
    }

    /// Forgets the entries of a unit that is going away.
    fn forget_unit(&mut self, eip: u32, host: u64) {
        let e = &mut self.slots[Self::slot(eip)];
        if e.host == host {
            e.host = 0;
        }
    }

    // A generation number coming round again after 2^32 flushes could revive a slot not
    // touched since: the slots are emptied then.

    /// Forgets the entries for code in linear pages `pages` (and the last bytes of the page
    /// before each, as [`LookupTable::clear_pages`]).
    fn forget_pages(&mut self, pages: &[u32]) {
        if pages.len() > 16 {
            self.forget_all();
            return;
        }
        for e in self.slots.iter_mut().filter(|e| e.host != 0) {
            let page = e.eip >> 12;
            let tail = may_cross_page(e.eip);
            if pages
                .iter()
                .any(|&p| page == p || (tail && page == p.wrapping_sub(1)))
            {
                e.host = 0;
            }
        }
    }

    fn forget_local(&mut self) {
        self.local_gen = self.local_gen.wrapping_add(1);
        if self.local_gen == 0 {
            self.slots.fill(CachedEntry::default());
        }
    }

    fn forget_all(&mut self) {
        self.global_gen = self.global_gen.wrapping_add(1);
        if self.global_gen == 0 {
            self.slots.fill(CachedEntry::default());
        }
    }
}

/// Slots of [`UnitIndex`]'s direct-mapped front (a power of two: 128 KiB of slots, against the
/// megabytes of the full map once a boot has translated its ~90 K units).
const UNIT_FRONT: usize = 8192;

/// One slot of [`UnitIndex`]'s front: a key and its unit number plus one (0: empty).
#[derive(Clone, Copy, Default)]
struct FrontSlot {
    eip: u32,
    page: u32,
    mode: Mode,
    id_plus_one: u32,
}

/// Units by (linear EIP, guest-physical page of the code, mode), with a small direct-mapped
/// front that the recent lookups fill: the monitor looks units up at every lookup miss and
/// branch exit, and a hash map of every unit translated is mostly cold in the host's caches.
struct UnitIndex {
    map: HashMap<(u32, u32, Mode), u32>,
    front: Box<[Cell<FrontSlot>]>,
}

impl UnitIndex {
    fn new() -> Self {
        Self {
            map: HashMap::default(),
            front: vec![Cell::new(FrontSlot::default()); UNIT_FRONT].into_boxed_slice(),
        }
    }

    fn slot(&self, (eip, page, mode): (u32, u32, Mode)) -> &Cell<FrontSlot> {
        let h = eip ^ (eip >> 13) ^ page.rotate_left(7) ^ u32::from(mode.0).rotate_left(21);
        &self.front[h as usize & (UNIT_FRONT - 1)]
    }

    fn get(&self, key: (u32, u32, Mode)) -> Option<u32> {
        let slot = self.slot(key);
        let s = slot.get();
        if s.id_plus_one != 0 && (s.eip, s.page, s.mode) == key {
            return Some(s.id_plus_one - 1);
        }
        let id = *self.map.get(&key)?;
        slot.set(FrontSlot {
            eip: key.0,
            page: key.1,
            mode: key.2,
            id_plus_one: id + 1,
        });
        Some(id)
    }

    fn insert(&mut self, key: (u32, u32, Mode), id: u32) {
        self.map.insert(key, id);
        // A stale slot for the key (its unit was replaced) would otherwise win.
        self.forget_slot(key);
    }

    /// Removes `key` if it names unit `id`.
    fn remove(&mut self, key: (u32, u32, Mode), id: u32) {
        if self.map.get(&key) == Some(&id) {
            self.map.remove(&key);
            self.forget_slot(key);
        }
    }

    fn forget_slot(&self, key: (u32, u32, Mode)) {
        let slot = self.slot(key);
        let s = slot.get();
        if (s.eip, s.page, s.mode) == key {
            slot.set(FrontSlot::default());
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.front.fill(Cell::new(FrontSlot::default()));
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// The translation cache of one vCPU.
pub struct Translator {
    cache: CodeCache,
    units: Vec<Option<Unit>>,
    /// Units by (linear EIP, guest-physical page of the code, mode): a unit translated under
    /// one address space is only found under another that maps its code to the same page, and
    /// only in the mode it was translated for.
    by_eip: UnitIndex,
    by_page: HashMap<u32, Vec<u32>>,
    by_host: BTreeMap<u64, u32>,
    /// Indirect-branch lookup tables, one per recent (mode, CPL): a switch between user and
    /// kernel code selects another table instead of emptying the one table.
    lookups: Vec<LookupTable>,
    /// The table in use.
    lookup: usize,
    /// Table selections so far (the replacement clock).
    selections: u64,
    /// The monitor's cache of unit entries.
    entries: EntryCache,
    /// Chains made across pages to code on global pages (with paging on), by the target's
    /// linear page: (unit, slot). They hold while that page's global mapping does.
    global_chains: HashMap<u32, Vec<(u32, u32)>>,
    /// How many pairs `global_chains` holds.
    global_chain_count: usize,
    /// The length at which `global_chains` is next cleared of stale pairs.
    global_chains_limit: usize,
    /// Counters.
    pub stats: CacheStats,
}

impl Translator {
    /// An empty cache.
    pub fn new() -> Result<Self, CacheError> {
        Ok(Self {
            cache: CodeCache::new()?,
            units: Vec::new(),
            by_eip: UnitIndex::new(),
            by_page: HashMap::default(),
            by_host: BTreeMap::new(),
            lookups: (0..LOOKUP_TABLES)
                .map(|_| LookupTable::new())
                .collect::<Result<_, _>>()?,
            lookup: 0,
            selections: 0,
            entries: EntryCache::new(),
            global_chains: HashMap::default(),
            global_chain_count: 0,
            global_chains_limit: GLOBAL_CHAINS_COMPACT,
            stats: CacheStats::default(),
        })
    }

    /// Address of the lookup table in use, for the vCPU context (translated code reads it from
    /// there at every lookup).
    pub fn lookup_table(&self) -> u64 {
        self.lookups[self.lookup].entries.as_ptr() as u64
    }

    /// Makes the table for translation mode `mode` at privilege level `cpl` the one in use:
    /// the one kept for them, else the least recently used one, emptied. Returns its address
    /// for the vCPU context.
    pub fn select_lookup(&mut self, mode: Mode, cpl: u8) -> u64 {
        let key = Some((mode, cpl));
        self.selections += 1;
        let i = match self.lookups.iter().position(|t| t.key == key) {
            Some(i) => i,
            None => {
                let (i, t) = self
                    .lookups
                    .iter_mut()
                    .enumerate()
                    .min_by_key(|(_, t)| t.last_used)
                    .expect("LOOKUP_TABLES > 0");
                t.clear();
                if t.key.is_some() {
                    self.stats.lookup_recycles += 1;
                }
                t.key = key;
                i
            }
        };
        self.lookups[i].last_used = self.selections;
        self.lookup = i;
        self.lookup_table()
    }

    /// Host entry of the unit at linear `eip` for `mode` at `cpl` the monitor entered there
    /// last, if the code mappings have not changed since (the caller reports their changes
    /// with [`Translator::forget_indirect`] and [`Translator::forget_local_indirect`], as for
    /// the lookup tables) and the unit is still there.
    pub fn cached_entry(&self, eip: u32, mode: Mode, cpl: u8) -> Option<u64> {
        self.entries.get(eip, mode, cpl)
    }

    /// Notes that the unit at linear `eip` for `mode` at `cpl` is at `host`, for
    /// [`Translator::cached_entry`]; `global` as for [`Translator::remember_indirect`].
    pub fn cache_entry(&mut self, eip: u32, mode: Mode, cpl: u8, host: u64, global: bool) {
        self.entries.insert(eip, mode, cpl, host, global);
    }

    /// Host entry of the unit at guest `eip` whose code is in guest-physical `page`, translated
    /// for `mode`, if there is one.
    pub fn entry(&self, eip: u32, page: u32, mode: Mode) -> Option<u64> {
        let id = self.by_eip.get((eip, page, mode))?;
        self.units[id as usize].as_ref().map(|u| u.host)
    }

    /// The unit number at guest `eip` with its code in guest-physical `page`, translated for
    /// `mode`, if there is one.
    pub fn unit_id(&self, eip: u32, page: u32, mode: Mode) -> Option<u32> {
        self.by_eip.get((eip, page, mode))
    }

    /// A live unit.
    pub fn unit(&self, id: u32) -> Option<&Unit> {
        self.units.get(id as usize)?.as_ref()
    }

    /// Guest pages that hold units.
    pub fn pages(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_page.keys().copied()
    }

    /// Translates the unit at guest `eip`, whose code `src` reads from guest-physical `page`
    /// (and reads on from `page2` past the page's end), for `mode` (which must not be
    /// translated yet).
    pub fn translate(
        &mut self,
        src: &dyn CodeSource,
        eip: u32,
        page: u32,
        page2: Option<u32>,
        mode: Mode,
    ) -> Result<Translated, CacheError> {
        let started = Instant::now();
        let id = self.units.len() as u32;
        let mut encoded = translate::translate(src, eip, id, self.cache.next_address(), mode)?;
        let mut flushed_pages = Vec::new();
        if !self.cache.fits(encoded.code.len()) {
            flushed_pages = self.flush();
            encoded = translate::translate(src, eip, 0, self.cache.next_address(), mode)?;
        }
        let id = self.units.len() as u32;
        let host = self
            .cache
            .append(&encoded.code)
            .expect("an empty cache holds any unit");
        let slots = encoded.slots.len();
        let original = encoded
            .slots
            .iter()
            .map(|s| self.cache.read_i32(host + u64::from(s.rel32_offset)))
            .collect();
        let page2 = page2.filter(|_| encoded.crosses);
        self.units.push(Some(Unit {
            eip,
            page,
            mode,
            page2,
            host,
            len: encoded.code.len() as u32,
            map: encoded.map,
            slots: encoded.slots,
            instructions: encoded.instructions,
            guest_end: encoded.guest_end,
            callout: encoded.callout,
            chained: vec![None; slots],
            incoming: Vec::new(),
            original,
        }));
        self.by_eip.insert((eip, page, mode), id);
        self.by_page.entry(page).or_default().push(id);
        if let Some(p2) = page2 {
            self.by_page.entry(p2).or_default().push(id);
        }
        self.by_host.insert(host, id);
        self.stats.units += 1;
        self.stats.instructions += u64::from(encoded.instructions);
        self.stats.based_units += u64::from(mode.segment_bases());
        self.stats.esp_moves += u64::from(encoded.esp_moves);
        self.stats.esp_updates += u64::from(encoded.esp_updates);
        self.stats.time += started.elapsed();
        Ok(Translated {
            host,
            flushed_pages,
            page2,
        })
    }

    /// Patches exit `slot` of unit `from` to jump straight to the unit at `target` with its
    /// code in guest-physical `page`, translated for the same mode (when both are live).
    /// Returns whether it did. The caller makes sure `target` maps to `page` whenever `from`
    /// runs; a target whose instruction runs on into the next page is only chained to when
    /// `crossing` says the next page cannot map elsewhere either (paging off).
    pub fn chain(&mut self, from: u32, slot: u32, target: u32, page: u32, crossing: bool) -> bool {
        self.patch_chain(from, slot, target, page, crossing)
    }

    /// [`Translator::chain`] for a `target` in another page than `from`'s, a global one
    /// (paging on): `target` maps to `page` in every address space until that global mapping
    /// changes, when the caller undoes the chain with [`Translator::unchain_global`]. Never to
    /// a unit whose instruction runs on into the next page.
    pub fn chain_global(&mut self, from: u32, slot: u32, target: u32, page: u32) -> bool {
        let chained = self.patch_chain(from, slot, target, page, false);
        if chained {
            if self.global_chain_count >= self.global_chains_limit {
                // Units dropped since (their code written) left stale pairs: keep the lists
                // to the chains that still stand.
                let units = &self.units;
                let mut count = 0;
                self.global_chains.retain(|_, list| {
                    list.retain(|&(f, k)| {
                        units
                            .get(f as usize)
                            .and_then(Option::as_ref)
                            .is_some_and(|u| u.chained[k as usize].is_some())
                    });
                    count += list.len();
                    !list.is_empty()
                });
                self.global_chain_count = count;
                self.global_chains_limit = (2 * count).max(GLOBAL_CHAINS_COMPACT);
            }
            self.global_chains
                .entry(target >> 12)
                .or_default()
                .push((from, slot));
            self.global_chain_count += 1;
            self.stats.global_chains += 1;
        }
        chained
    }

    /// Undoes the chains [`Translator::chain_global`] made into the linear pages `pages`
    /// (address >> 12), or into every page with `all`: their global mappings changed.
    pub fn unchain_global(&mut self, all: bool, pages: &[u32]) {
        let lists: Vec<Vec<(u32, u32)>> = if all {
            self.global_chains.drain().map(|(_, l)| l).collect()
        } else {
            pages
                .iter()
                .filter_map(|p| self.global_chains.remove(p))
                .collect()
        };
        for (from, slot) in lists.into_iter().flatten() {
            self.global_chain_count -= 1;
            self.unchain(from, slot);
        }
    }

    fn patch_chain(
        &mut self,
        from: u32,
        slot: u32,
        target: u32,
        page: u32,
        crossing: bool,
    ) -> bool {
        let Some(mode) = self.unit(from).map(|u| u.mode) else {
            return false;
        };
        let Some(to) = self.by_eip.get((target, page, mode)) else {
            return false;
        };
        if !crossing && self.unit(to).is_some_and(|u| u.page2.is_some()) {
            return false;
        }
        let Some(to_host) = self.unit(to).map(|u| u.host) else {
            return false;
        };
        let Some(Some(unit)) = self.units.get_mut(from as usize) else {
            return false;
        };
        let Some(s) = unit.slots.get(slot as usize).copied() else {
            return false;
        };
        if s.target != target || unit.chained[slot as usize].is_some() {
            return false;
        }
        let at = unit.host + u64::from(s.rel32_offset);
        let rel = to_host as i64 - (at as i64 + 4);
        let Ok(rel) = i32::try_from(rel) else {
            return false;
        };
        unit.chained[slot as usize] = Some(to);
        self.cache.write_i32(at, rel);
        if let Some(Some(t)) = self.units.get_mut(to as usize) {
            t.incoming.push((from, slot));
        }
        self.stats.chain_patches += 1;
        true
    }

    /// Enters `eip → host` in the indirect-branch lookup table in use (the unit at `host` must
    /// be translated for the mode and CPL the table was selected for). `global`: the unit's
    /// code is on a global page, so the entry survives [`Translator::forget_local_indirect`].
    pub fn remember_indirect(&mut self, eip: u32, host: u64, global: bool) {
        let t = &mut self.lookups[self.lookup];
        let i = (eip & 0xFFFF) as usize;
        if t.entries[i] == [0, 0] {
            t.used.push(i as u16);
        }
        if !global {
            t.local.push(i as u16);
        }
        t.entries[i] = [!u64::from(eip), host];
    }

    /// Empties the lookup entries for code on non-global pages, in every table (the address
    /// space changed; global translations stay, as in a TLB).
    pub fn forget_local_indirect(&mut self) {
        self.stats.lookup_local_flushes += 1;
        self.entries.forget_local();
        for t in &mut self.lookups {
            t.clear_local();
        }
    }

    /// Empties the lookup entries (and the monitor's entry cache) for code in linear pages
    /// `pages` (address >> 12), whose global mappings changed: every table's other entries
    /// stay. Many pages at once empty everything.
    pub fn forget_indirect_pages(&mut self, pages: &[u32]) {
        if pages.len() > 64 {
            self.forget_indirect();
            return;
        }
        self.stats.lookup_page_flushes += 1;
        self.entries.forget_pages(pages);
        for t in &mut self.lookups {
            t.clear_pages(pages);
        }
    }

    /// Empties every indirect-branch lookup table (their entries are keyed by linear EIP, so
    /// they go whenever the code's address space may have changed).
    pub fn forget_indirect(&mut self) {
        self.stats.lookup_flushes += 1;
        self.entries.forget_all();
        for t in &mut self.lookups {
            t.clear();
        }
    }

    /// The unit and guest instruction a host RIP inside translated code belongs to.
    pub fn locate(&self, rip: u64) -> Option<(&Unit, MapEntry)> {
        let (_, &id) = self.by_host.range(..=rip).next_back()?;
        let unit = self.unit(id)?;
        if rip >= unit.host + u64::from(unit.len) {
            return None;
        }
        let off = (rip - unit.host) as u32;
        let i = unit.map.partition_point(|m| m.host_offset <= off);
        let entry = *unit.map.get(i.checked_sub(1)?)?;
        Some((unit, entry))
    }

    /// Drops every unit translated from guest-physical page `page` (address >> 12), unchaining the
    /// jumps that lead into them. Returns how many were dropped.
    pub fn invalidate_page(&mut self, page: u32) -> usize {
        let Some(ids) = self.by_page.remove(&page) else {
            return 0;
        };
        for &id in &ids {
            self.drop_unit(id);
        }
        ids.len()
    }

    /// Drops the units whose code in guest-physical page `page` overlaps bytes `start..end` of
    /// it (offsets in the page), as [`Translator::invalidate_page`] does for all of them: a
    /// write of a few bytes (the kernel patching one call site) leaves the page's other units
    /// alone, since they were translated from bytes that did not change. Returns whether the
    /// page still holds units.
    pub fn invalidate_range(&mut self, page: u32, start: u32, end: u32) -> bool {
        let Some(ids) = self.by_page.remove(&page) else {
            return false;
        };
        let mut keep = Vec::new();
        for id in ids {
            let Some(Some(u)) = self.units.get(id as usize) else {
                // Dropped already (with the other page of a unit that crosses).
                continue;
            };
            // The unit's bytes as offsets from the start of its first page: [first, last),
            // past 0x1000 in the second page for the one instruction that runs on into it.
            let (first, last) = (u.eip & 0xFFF, u.guest_end.wrapping_sub(u.eip & !0xFFF));
            let overlaps = |a: u32, b: u32| a < end && start < b;
            let written = (u.page == page && overlaps(first, last.min(0x1000)))
                || (u.page2 == Some(page) && overlaps(0, last.saturating_sub(0x1000)));
            if !written {
                keep.push(id);
            } else {
                self.drop_unit(id);
            }
        }
        let live = !keep.is_empty();
        if live {
            self.by_page.insert(page, keep);
        }
        live
    }

    /// Restores exit `slot` of unit `from` to its trampoline, if it is chained (and both units
    /// live).
    fn unchain(&mut self, from: u32, slot: u32) {
        let Some(Some(u)) = self.units.get_mut(from as usize) else {
            return;
        };
        let Some(to) = u.chained.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        let at = u.host + u64::from(u.slots[slot as usize].rel32_offset);
        let original = u.original[slot as usize];
        self.cache.write_i32(at, original);
        if let Some(Some(t)) = self.units.get_mut(to as usize) {
            t.incoming.retain(|&f| f != (from, slot));
        }
    }

    /// Drops unit `id` (if live): out of the maps and the lookup tables, its predecessors'
    /// chained jumps restored.
    fn drop_unit(&mut self, id: u32) {
        let Some(unit) = self.units[id as usize].take() else {
            return;
        };
        self.by_eip.remove((unit.eip, unit.page, unit.mode), id);
        self.by_host.remove(&unit.host);
        self.entries.forget_unit(unit.eip, unit.host);
        for t in &mut self.lookups {
            let entry = &mut t.entries[(unit.eip & 0xFFFF) as usize];
            if entry[0] == !u64::from(unit.eip) {
                *entry = [0, 0];
            }
        }
        for (from, slot) in unit.incoming {
            if let Some(Some(p)) = self.units.get_mut(from as usize)
                && p.chained[slot as usize] == Some(id)
            {
                p.chained[slot as usize] = None;
                let at = p.host + u64::from(p.slots[slot as usize].rel32_offset);
                let original = p.original[slot as usize];
                self.cache.write_i32(at, original);
            }
        }
        for to in unit.chained.iter().flatten() {
            if let Some(Some(t)) = self.units.get_mut(*to as usize) {
                t.incoming.retain(|(f, _)| *f != id);
            }
        }
        self.stats.invalidated += 1;
    }

    /// Empties the cache; returns the guest pages that held units.
    pub fn flush(&mut self) -> Vec<u32> {
        let pages = self.by_page.keys().copied().collect();
        self.units.clear();
        self.by_eip.clear();
        self.by_page.clear();
        self.by_host.clear();
        self.entries = EntryCache::new();
        self.global_chains.clear();
        self.global_chain_count = 0;
        for t in &mut self.lookups {
            t.entries.fill([0, 0]);
            t.used.clear();
            t.local.clear();
        }
        self.cache.reset();
        self.stats.flushes += 1;
        pages
    }
}

impl std::fmt::Debug for Translator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Translator")
            .field("cache", &self.cache)
            .field("units", &self.by_eip.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(t: &Translator, eip: u32) -> [u64; 2] {
        t.lookups[t.lookup].entries[(eip & 0xFFFF) as usize]
    }

    #[test]
    fn the_unit_index_front_never_outlives_the_map() {
        let mut ix = UnitIndex::new();
        let (a, b) = ((0x1000, 7, Mode(1)), (0x1000, 8, Mode(1)));
        // Keys that share a front slot push each other out but are still found.
        let same_slot = (0..u32::MAX)
            .map(|e| (e, 7, Mode(1)))
            .find(|&k| k != a && std::ptr::eq(ix.slot(k), ix.slot(a)))
            .unwrap();
        ix.insert(a, 1);
        ix.insert(b, 2);
        ix.insert(same_slot, 3);
        for _ in 0..2 {
            assert_eq!(ix.get(a), Some(1));
            assert_eq!(ix.get(same_slot), Some(3));
            assert_eq!(ix.get(b), Some(2));
        }
        // A replaced unit's number goes from the front too.
        ix.insert(a, 4);
        assert_eq!(ix.get(a), Some(4));
        // Removing another unit's key leaves it; removing its own takes it out.
        ix.remove(a, 1);
        assert_eq!(ix.get(a), Some(4));
        ix.remove(a, 4);
        assert_eq!(ix.get(a), None);
        assert_eq!(ix.get(b), Some(2));
        ix.clear();
        assert_eq!((ix.get(b), ix.get(same_slot), ix.len()), (None, None, 0));
    }

    #[test]
    fn lookup_tables_are_kept_per_mode_and_cpl_and_local_entries_go_alone() {
        let mut t = Translator::new().unwrap();
        let kernel = t.select_lookup(Mode(Mode::CPL0), 0);
        t.remember_indirect(0xC000_1000, 0x1111, true);
        t.remember_indirect(0xC000_2004, 0x2222, false);
        let user = t.select_lookup(Mode(0), 3);
        assert_ne!(kernel, user);
        assert_eq!(
            entry(&t, 0xC000_1000),
            [0, 0],
            "user code has its own table"
        );
        t.remember_indirect(0x0804_8000, 0x3333, false);
        assert_eq!(t.select_lookup(Mode(Mode::CPL0), 0), kernel);
        assert_eq!(entry(&t, 0xC000_1000), [!0xC000_1000u64, 0x1111], "kept");
        t.forget_local_indirect();
        assert_eq!(entry(&t, 0xC000_1000), [!0xC000_1000u64, 0x1111], "global");
        assert_eq!(entry(&t, 0xC000_2004), [0, 0], "non-global");
        t.select_lookup(Mode(0), 3);
        assert_eq!(entry(&t, 0x0804_8000), [0, 0], "non-global, in every table");
        t.forget_indirect();
        t.select_lookup(Mode(Mode::CPL0), 0);
        assert_eq!(entry(&t, 0xC000_1000), [0, 0], "everything");
    }

    #[test]
    fn a_global_page_whose_mapping_changed_takes_only_its_own_lookups() {
        let mut t = Translator::new().unwrap();
        let k = Mode(Mode::CPL0);
        t.select_lookup(k, 0);
        // In page 0xC0001, just before it (an instruction that may run on into it), and in
        // another page.
        for eip in [0xC000_1010, 0xC000_0FF8, 0xC000_0FF0, 0xC001_2010] {
            t.remember_indirect(eip, 0x1111, true);
            t.cache_entry(eip, k, 0, 0x2222, true);
        }
        t.forget_indirect_pages(&[0xC0001]);
        assert_eq!(entry(&t, 0xC000_1010), [0, 0], "the page's own");
        assert_eq!(entry(&t, 0xC000_0FF8), [0, 0], "may run on into it");
        for eip in [0xC000_1010, 0xC000_0FF8] {
            assert_eq!(t.cached_entry(eip, k, 0), None, "{eip:#x}");
        }
        for eip in [0xC000_0FF0, 0xC001_2010] {
            assert_eq!(entry(&t, eip), [!u64::from(eip), 0x1111], "{eip:#x} stays");
            assert_eq!(t.cached_entry(eip, k, 0), Some(0x2222), "{eip:#x} stays");
        }
        // Another page's entry in the slot the changed page's would use stays too.
        t.remember_indirect(0xC001_1010, 0x3333, true);
        t.forget_indirect_pages(&[0xC0001]);
        assert_eq!(entry(&t, 0xC001_1010), [!0xC001_1010u64, 0x3333]);
        assert_eq!(t.stats.lookup_page_flushes, 2);
        assert_eq!(t.stats.lookup_flushes, 0);
    }

    #[test]
    fn the_entry_cache_forgets_what_the_lookup_tables_forget_and_dropped_units() {
        let mut code = vec![0x90u8; 0x2000];
        code[0..4].copy_from_slice(&[0x40, 0x40, 0x40, 0xC3]); // inc eax x3; ret
        code[0x10..0x14].copy_from_slice(&[0x40, 0x40, 0x40, 0xC3]);
        let src = TwoPages(code);
        let mut t = Translator::new().unwrap();
        let k = Mode(Mode::CPL0);
        let a = t.translate(&src, 0x1000, 7, None, k).unwrap().host;
        let b = t.translate(&src, 0x1010, 7, None, k).unwrap().host;
        t.cache_entry(0x1000, k, 0, a, true);
        t.cache_entry(0x1010, k, 0, b, false);
        assert_eq!(t.cached_entry(0x1000, k, 0), Some(a));
        assert_eq!(t.cached_entry(0x1010, k, 0), Some(b));
        assert_eq!(t.cached_entry(0x1000, Mode(0), 0), None, "another mode");
        assert_eq!(t.cached_entry(0x1000, k, 3), None, "another CPL");
        assert_eq!(t.cached_entry(0x1000 + ENTRY_CACHE as u32, k, 0), None);
        t.forget_local_indirect();
        assert_eq!(t.cached_entry(0x1000, k, 0), Some(a), "global");
        assert_eq!(t.cached_entry(0x1010, k, 0), None, "non-global");
        t.cache_entry(0x1010, k, 0, b, false);
        t.forget_indirect();
        assert_eq!(t.cached_entry(0x1000, k, 0), None, "everything");
        assert_eq!(t.cached_entry(0x1010, k, 0), None, "everything");
        // A unit dropped (its code written) is no longer entered.
        t.cache_entry(0x1000, k, 0, a, true);
        t.cache_entry(0x1010, k, 0, b, true);
        assert!(t.invalidate_range(7, 0x13, 0x14));
        assert_eq!(t.cached_entry(0x1010, k, 0), None, "dropped");
        assert_eq!(t.cached_entry(0x1000, k, 0), Some(a), "not written");
        t.flush();
        assert_eq!(t.cached_entry(0x1000, k, 0), None, "flushed");
    }

    #[test]
    fn global_chains_are_undone_when_their_target_page_changes() {
        let mut code = vec![0x90u8; 0x2000];
        // 0x1000: jmp 0x2000 (rel32, into the next page); 0x2000: ret.
        code[0..5].copy_from_slice(&[0xE9, 0xFB, 0x0F, 0, 0]);
        code[0x1000] = 0xC3;
        let src = TwoPages(code);
        let mut t = Translator::new().unwrap();
        let k = Mode(Mode::CPL0);
        let from = t.translate(&src, 0x1000, 7, None, k).unwrap().host;
        let to = t.translate(&src, 0x2000, 8, None, k).unwrap().host;
        let id = t.unit_id(0x1000, 7, k).unwrap();
        let slot = t.unit(id).unwrap().slots[0];
        assert_eq!(slot.target, 0x2000);
        let at = from + u64::from(slot.rel32_offset);
        let unchained = t.cache.read_i32(at);
        assert!(t.chain_global(id, 0, 0x2000, 8));
        assert_eq!(i64::from(t.cache.read_i32(at)), to as i64 - (at as i64 + 4));
        t.forget_local_indirect();
        t.forget_indirect();
        assert_ne!(t.cache.read_i32(at), unchained, "the lookups alone go");
        t.unchain_global(false, &[0x3]);
        assert_ne!(
            t.cache.read_i32(at),
            unchained,
            "another page's mapping changed"
        );
        t.unchain_global(false, &[0x2]);
        assert_eq!(t.cache.read_i32(at), unchained, "back to its trampoline");
        let target = t.unit(t.unit_id(0x2000, 8, k).unwrap()).unwrap();
        assert!(target.incoming.is_empty());
        assert!(t.chain_global(id, 0, 0x2000, 8));
        t.unchain_global(true, &[]);
        assert_eq!(
            t.cache.read_i32(at),
            unchained,
            "every global mapping changed"
        );
        assert_eq!(t.stats.global_chains, 2);
    }

    /// Guest code: one page at linear 0x1000 (guest-physical page 7), and the one after it.
    struct TwoPages(Vec<u8>);

    impl CodeSource for TwoPages {
        fn read_code(&self, eip: u32, buf: &mut [u8]) -> usize {
            let Some(at) = (eip as usize).checked_sub(0x1000) else {
                return 0;
            };
            let n = buf.len().min(self.0.len().saturating_sub(at));
            buf[..n].copy_from_slice(&self.0[at..at + n]);
            n
        }
    }

    #[test]
    fn a_write_of_a_few_bytes_drops_only_the_units_it_overlaps() {
        let mut code = vec![0x90u8; 0x2000];
        // Units ending in a RET at 0x1000..0x1003, 0x1010..0x1013, 0x1020..0x1023, and one
        // instruction (mov eax, imm32) across the page boundary at 0x1FFE.
        for at in [0x000, 0x010, 0x020] {
            code[at..at + 4].copy_from_slice(&[0x40, 0x40, 0x40, 0xC3]); // inc eax x3; ret
        }
        code[0xFFE..0x1003].copy_from_slice(&[0xB8, 1, 2, 3, 4]);
        let src = TwoPages(code);
        let mut t = Translator::new().unwrap();
        let mode = Mode(Mode::CPL0);
        for eip in [0x1000, 0x1010, 0x1020] {
            t.translate(&src, eip, 7, None, mode).unwrap();
        }
        let crossing = t.translate(&src, 0x1FFE, 7, Some(8), mode).unwrap();
        assert_eq!(crossing.page2, Some(8));
        let live = |t: &Translator, eip: u32, page: u32| t.unit_id(eip, page, mode).is_some();
        // The second unit's last byte (its RET).
        assert!(t.invalidate_range(7, 0x13, 0x14));
        assert!(live(&t, 0x1000, 7) && live(&t, 0x1020, 7));
        assert!(!live(&t, 0x1010, 7), "the unit written goes");
        assert!(
            live(&t, 0x1FFE, 7),
            "bytes the crossing unit does not cover"
        );
        // Bytes between units: nothing goes.
        assert!(t.invalidate_range(7, 0x4, 0x10));
        assert!(live(&t, 0x1000, 7) && live(&t, 0x1020, 7));
        // The next page written after the crossing instruction's bytes, then on them.
        assert!(t.invalidate_range(8, 0x3, 0x804));
        assert!(live(&t, 0x1FFE, 7));
        assert!(
            !t.invalidate_range(8, 0x2, 0x3),
            "page 8 holds no unit of its own"
        );
        assert!(!live(&t, 0x1FFE, 7), "its last byte was written");
        assert!(live(&t, 0x1000, 7), "units of page 7 alone stay");
        // The rest of page 7, written whole.
        assert!(!t.invalidate_range(7, 0, 0x1000), "no units left");
        assert!(!live(&t, 0x1000, 7) && !live(&t, 0x1020, 7));
        assert_eq!(t.stats.invalidated, 4);
    }

    #[test]
    fn the_least_recently_used_lookup_table_is_emptied_for_a_new_mode() {
        let mut t = Translator::new().unwrap();
        t.select_lookup(Mode(Mode::CPL0), 0);
        t.remember_indirect(0xC000_1000, 0x1111, true);
        // As many other user modes as there are tables.
        let last = (LOOKUP_TABLES as u8 - 1) << 1;
        for m in (0..=last).step_by(2) {
            t.select_lookup(Mode(m), 3);
            t.remember_indirect(0x1000, 0x2222, true);
        }
        t.select_lookup(Mode(Mode::CPL0), 0);
        assert_eq!(
            entry(&t, 0xC000_1000),
            [0, 0],
            "its table went to another mode"
        );
        t.select_lookup(Mode(last), 3);
        assert_eq!(
            entry(&t, 0x1000),
            [!0x1000u64, 0x2222],
            "recently used: kept"
        );
        // The first selections took empty tables; the user modes beyond them and the kernel's
        // return each emptied one.
        assert_eq!(t.stats.lookup_recycles, 2);
    }
}
