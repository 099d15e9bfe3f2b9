//! The bt engine: guest 32-bit protected-mode code runs as translated host code (DESIGN.md §4–5),
//! with the interpreter for everything the translator hands back.
//!
//! The interpreter owns the architectural state ([`CpuState`]). The engine copies the general
//! registers and arithmetic flags into the vCPU context, enters translated code, and copies them
//! back when it exits. What the exit means:
//!
//! - **branch / lookup miss**: the target is translated if needed; a direct exit is chained (its
//!   jump patched to the target unit) and an indirect target entered in the lookup table.
//! - **callout**: the interpreter executes that one instruction ([`Interp::step_one`]) — the same
//!   code the interp engine runs, so privileged and sensitive instructions behave identically.
//! - **signal**: a host fault in translated code. The host RIP is mapped back to the guest
//!   instruction, whose start state the registers still hold, and the interpreter executes it:
//!   it raises the precise #DE/#UD/#GP, or completes the MMIO access. A write to a page holding
//!   translations first invalidates them. A fault on the poll page is an exit request (a time
//!   slice ended): the engine returns [`VmExit::Interrupted`] so the VM services its devices.
//!
//! Guest memory is reached through the shadow MMU's address-space windows ([`ShadowMmu`]): one
//! window mapping guest-physical memory linearly while paging is off, one per (CR3, privilege
//! view) while it is on. A host fault in a window is classified there (hidden, true, traced
//! write, code write, device memory); whatever is not resolved by mapping is executed by the
//! interpreter, which raises the guest's #PF with its exact error code or performs the access.
//! After every instruction the interpreter executes, the engine brings the shadow up to date:
//! CR0/CR4 paging-bit changes empty the windows, CR3 loads and INVLPG go to the shadow MMU,
//! and writes the monitor made to traced page tables or to translated code are resolved.
//!
//! Units are keyed by linear EIP *and* the guest-physical page their code came from: the unit
//! found for an EIP is always the one translated from the code the current address space maps
//! there. A unit chains directly only to units in its own page while paging is on (the page
//! maps the same way for both). The indirect-branch lookup tables, keyed by EIP, are emptied
//! whenever a code mapping may have changed; there is one per recent (translation mode, CPL),
//! so entering the kernel and returning to user code switch tables instead of emptying one.
//!
//! Translation needs flat 32-bit protected mode; in any other mode the interpreter runs the
//! guest.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bt::{CodeSource, Mode as UnitMode, Translator};
use iced_x86::{Decoder, DecoderOptions, Mnemonic, Register};
use shadow_mmu::space::DEFAULT_WINDOW_BUDGET;
use shadow_mmu::{Fault, Mode, Paging, ShadowError, ShadowMmu};
use vmdriver::fpu::x87_pending;
use vmdriver::world::{self, MAX_SLICE, SegmentReload, SliceTimer, Vcpu, X87_RAN, reason};
use vmdriver::{GuestMemory, IoHandler, VmExit};

use crate::cpu::{MXCSR_MASK, SegReg, Segment, cr0, cr4, flags, fx};
use crate::interp::{Interp, InterpError, TlbEvent};

/// Exits handled in one call of [`BtEngine::run`] before the VM gets a look.
const EXITS_PER_RUN: u32 = 4096;
/// CR0.AM: alignment checks at CPL 3 when EFLAGS.AC is set.
const CR0_AM: u32 = 1 << 18;

/// Errors the bt engine reports.
#[derive(Debug, thiserror::Error)]
pub enum BtError {
    /// The host could not provide what translated code needs.
    #[error("the bt engine cannot start: {0}")]
    Setup(String),
    /// The translation cache failed (a translator bug).
    #[error(transparent)]
    Cache(#[from] bt::CacheError),
    /// The shadow MMU failed (the host refused a window operation).
    #[error(transparent)]
    Shadow(#[from] ShadowError),
    /// Translated code made a system call (Syscall User Dispatch fired): a translator bug.
    #[error("translated code at host {rip:#x} made a system call; the VM is stopped")]
    SystemCall {
        /// Host RIP after the system call.
        rip: u64,
    },
    /// A host signal arrived at a host address no unit covers (a translator bug).
    #[error("signal {signo} at host {rip:#x} in translated code that no unit covers")]
    Unmapped {
        /// The signal.
        signo: i32,
        /// Host RIP.
        rip: u64,
    },
    /// The interpreter stopped.
    #[error(transparent)]
    Interp(#[from] InterpError),
}

/// Counters for `--stats`.
#[derive(Debug, Default)]
struct Counters {
    exits_branch: u64,
    exits_lookup: u64,
    /// Units the monitor entered through its entry cache rather than the cache's maps.
    entry_cache_hits: u64,
    exits_callout: u64,
    exits_signal: u64,
    exits_request: u64,
    /// Time slices that ended between the iterations of a translated REP string instruction.
    exits_request_rep: u64,
    exits_irq_window: u64,
    exits_sti_shadow: u64,
    interpreted_runs: u64,
    fetch_faults: u64,
    retranslated: u64,
    retranslated_device: u64,
    signals: [u64; 6],
    /// Callouts by mnemonic, indexed by `Mnemonic as usize` (a hash per callout showed in
    /// profiles).
    callouts: Vec<u64>,
}

impl Counters {
    fn count_callout(&mut self, m: Mnemonic) {
        self.count_callout_index(m as usize);
    }

    /// Counts a callout by its mnemonic's number (`Mnemonic as usize`); the listing only
    /// names the numbers that are mnemonics.
    fn count_callout_index(&mut self, i: usize) {
        if i >= Mnemonic::values().len() {
            return;
        }
        if i >= self.callouts.len() {
            self.callouts.resize(i + 1, 0);
        }
        self.callouts[i] += 1;
    }
}

/// Guest code as the translator reads it: the linear page holding the unit, from the
/// guest-physical page the address space maps it to (RAM or ROM).
struct PageCode<'a> {
    memory: &'a GuestMemory,
    linear_page: u32,
    phys_page: u32,
    /// The guest-physical page the next linear page maps to, for an instruction that runs on
    /// into it (None: not fetched from).
    next_phys: Option<u32>,
    /// Instructions (EIP, code page) retranslated as callouts because they kept trapping.
    emulated: &'a HashSet<(u32, u32)>,
}

impl PageCode<'_> {
    /// Copies code from guest-physical `phys` up to the end of its page; returns the count.
    fn read_phys(&self, phys: u64, buf: &mut [u8]) -> usize {
        let Some(r) = self.memory.layout().region_of(phys, 1) else {
            return 0;
        };
        let page_end = (phys | 0xFFF) + 1;
        let n = buf.len().min((r.end().min(page_end) - phys) as usize);
        match self.memory.read(phys, &mut buf[..n]) {
            Ok(()) => n,
            Err(_) => 0,
        }
    }
}

impl CodeSource for PageCode<'_> {
    fn read_code(&self, eip: u32, buf: &mut [u8]) -> usize {
        if eip >> 12 != self.linear_page {
            return 0;
        }
        let phys = (u64::from(self.phys_page) << 12) | u64::from(eip & 0xFFF);
        let n = self.read_phys(phys, buf);
        let to_end = (0x1000 - (eip & 0xFFF)) as usize;
        match self.next_phys {
            Some(next) if n == to_end && buf.len() > n => {
                n + self.read_phys(u64::from(next) << 12, &mut buf[n..])
            }
            _ => n,
        }
    }

    fn emulate(&self, eip: u32) -> bool {
        self.emulated.contains(&(eip, self.phys_page))
    }
}

/// The environment variable that sets how many shadow address-space windows bt keeps.
pub const WINDOWS_VAR: &str = "BT86_WINDOWS";

/// Traced-page writes or device-memory accesses one instruction may fault on before it is
/// retranslated as a callout.
const TRAPS_BEFORE_EMULATION: u32 = 4;

/// ESP's index in [`crate::cpu::Cpu::gpr`] (EAX, ECX, EDX, EBX, ESP, ...).
const ESP: usize = 4;

/// CR0 bits whose change empties the shadow windows.
const CR0_PAGING: u32 = cr0::PG | cr0::WP | cr0::PE;
/// CR4 bits whose change empties the shadow windows.
const CR4_PAGING: u32 = cr4::PSE | cr4::PAE | cr4::PGE;

/// The bt engine.
pub struct BtEngine {
    interp: Interp,
    memory: Arc<GuestMemory>,
    shadow: ShadowMmu,
    vcpu: Vcpu,
    translator: Translator,
    /// Time slices; parked while the vCPU is halted.
    timer: SliceTimer,
    /// The VM's next timer event, in nanoseconds from when the VM last said.
    timer_deadline: Option<u64>,
    counters: Counters,
    /// CR0, CR4, CPL and translation mode the shadow and the lookup table were last brought
    /// up to date for.
    seen: (u32, u32, u8, UnitMode),
    /// The VM has an interrupt waiting for IF ([`BtEngine::request_interrupt_window`]).
    window_requested: bool,
    /// The shadow MMU's code epochs (all, non-global) the lookup tables are valid for.
    code_epoch: (u64, u64),
    /// Traced-page write faults by instruction (EIP, code page).
    trapping: HashMap<(u32, u32), u32>,
    /// Instructions retranslated as callouts.
    emulated: HashSet<(u32, u32)>,
    /// Lockstep mode: every unit returns to the monitor ([`BtEngine::set_lockstep`]).
    lockstep: bool,
}

impl BtEngine {
    /// Wraps `interp` (which holds the initial CPU state) with a translator over `memory`.
    /// The window budget is [`DEFAULT_WINDOW_BUDGET`], or `$BT86_WINDOWS` when set.
    pub fn new(interp: Interp, memory: Arc<GuestMemory>) -> Result<Self, BtError> {
        let windows = match std::env::var(WINDOWS_VAR) {
            Ok(v) => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n >= 2)
                .ok_or_else(|| {
                    BtError::Setup(format!(
                        "{WINDOWS_VAR}={v:?} is not a window count: give a number of at least 2"
                    ))
                })?,
            Err(_) => DEFAULT_WINDOW_BUDGET,
        };
        Self::with_window_budget(interp, memory, windows)
    }

    /// Like [`BtEngine::new`], keeping at most `windows` shadow address-space windows.
    pub fn with_window_budget(
        interp: Interp,
        memory: Arc<GuestMemory>,
        windows: usize,
    ) -> Result<Self, BtError> {
        let setup = |e: &dyn std::fmt::Display| BtError::Setup(e.to_string());
        let shadow = ShadowMmu::new(memory.clone(), windows);
        let mut translator = Translator::new()?;
        let mut vcpu = Vcpu::new().map_err(|e| setup(&e))?;
        vcpu.context_mut().lookup = translator.select_lookup(mode_of(&interp), interp.cpu().cpl());
        let timer = SliceTimer::new().map_err(|e| setup(&e))?;
        let seen = (
            interp.cpu().cr0,
            interp.cpu().cr4,
            interp.cpu().cpl(),
            mode_of(&interp),
        );
        Ok(Self {
            interp,
            memory,
            shadow,
            vcpu,
            translator,
            timer,
            timer_deadline: None,
            counters: Counters::default(),
            seen,
            window_requested: false,
            code_epoch: (0, 0),
            trapping: HashMap::default(),
            emulated: HashSet::default(),
            lockstep: false,
        })
    }

    /// The interpreter (which owns the CPU state).
    pub fn interp(&self) -> &Interp {
        &self.interp
    }

    /// The interpreter, for setting up state.
    pub fn interp_mut(&mut self) -> &mut Interp {
        &mut self.interp
    }

    /// The paging state the shadow MMU follows.
    fn paging(&self) -> Paging {
        let c = self.interp.cpu();
        Paging {
            enabled: c.cr0 & cr0::PG != 0,
            mode: Mode {
                cr3: c.cr3,
                pae: c.cr4 & cr4::PAE != 0,
                pse: c.cr4 & cr4::PSE != 0,
                wp: c.cr0 & cr0::WP != 0,
                pge: c.cr4 & cr4::PGE != 0,
            },
            pdptes: self.interp.pdptes(),
            user: c.cpl() == 3,
        }
    }

    /// Whether the CPU is in a mode translated code handles: 32-bit protected mode (paging on
    /// or off) with a flat CS and DS, ES and SS data segments of any base reaching 4 GiB, no
    /// v86, no single-stepping or breakpoints, no alignment checks.
    fn translatable(&self) -> bool {
        let c = self.interp.cpu();
        if !c.protected()
            || c.eflags & (flags::VM | flags::TF | flags::RF) != 0
            || c.dr[7] & 0xFF != 0
            || (c.cr0 & CR0_AM != 0 && c.eflags & flags::AC != 0 && c.cpl() == 3)
            || self.interp.in_shadow()
        {
            return false;
        }
        // A CS base would change what EIP means to chaining and lookup: CS stays flat. DS, ES
        // and SS may have any base (units add it, see `mode_of`), but their limit checks must
        // be no-ops: expand-up with a 4 GiB limit. A read-only segment (#GP on writes) or an
        // expand-down one (offsets at or below the limit fault) stays with the interpreter.
        let flat_limit = |s: SegReg, code: bool| {
            let seg = c.seg(s);
            let kind_ok = if code {
                seg.access & 0x18 == 0x18
            } else {
                // A writable data segment, not expand-down.
                seg.access & 0x1E == 0x12
            };
            seg.limit == u32::MAX && seg.big && seg.present() && kind_ok
        };
        flat_limit(SegReg::Cs, true)
            && c.seg(SegReg::Cs).base == 0
            && flat_limit(SegReg::Ss, false)
            && flat_limit(SegReg::Ds, false)
            && flat_limit(SegReg::Es, false)
    }

    /// Brings the shadow MMU and the translation cache up to date with what the interpreter
    /// (or a device, or a loader) just did: paging-mode changes, CR3 loads and INVLPG, writes to
    /// traced page tables and to translated code, privilege changes.
    fn sync(&mut self) -> Result<(), BtError> {
        let c = self.interp.cpu();
        let now = (c.cr0, c.cr4, c.cpl(), mode_of(&self.interp));
        let events = self.interp.take_tlb_events();
        let (cr0_diff, cr4_diff) = (now.0 ^ self.seen.0, now.1 ^ self.seen.1);
        if cr0_diff & CR0_PAGING == 0 && cr4_diff & CR4_PAGING == cr4::PGE {
            // PGE toggled: a global flush (a superset of the events' flushes), not a new way
            // of translating.
            self.shadow.flush_global()?;
        } else if cr0_diff & CR0_PAGING != 0 || cr4_diff & CR4_PAGING != 0 {
            self.shadow.flush_all()?;
            if (now.0 ^ self.seen.0) & cr0::PG != 0 {
                // Units chained across pages while paging was off must not survive into an
                // address space that maps those pages differently.
                for page in self.translator.flush() {
                    self.shadow.unmark_code(page)?;
                }
            }
        } else if !events.is_empty() {
            let p = self.paging();
            for e in events {
                match e {
                    TlbEvent::Cr3Load => self.shadow.cr3_loaded(&p)?,
                    TlbEvent::Invlpg(linear) => self.shadow.invlpg(&p, linear)?,
                    TlbEvent::All | TlbEvent::Overflow => self.shadow.flush_all()?,
                }
            }
        }
        for w in self.memory.take_written_code_ranges() {
            if self.shadow.is_code(w.page)
                && !self
                    .translator
                    .invalidate_range(w.page, w.start.into(), w.end.into())
            {
                // Only the units the write overlaps go (the kernel patching a call site
                // keeps the rest of the page); a page left without units is plain data again.
                self.shadow.unmark_code(w.page)?;
            }
            if self.shadow.is_traced(w.page) {
                // Only the entries written (a PTE write is one): not the whole page.
                self.shadow
                    .table_written_range(w.page, w.start.into(), w.end.into())?;
            }
        }
        self.check_code_epochs();
        if now.2 != self.seen.2 || now.3 != self.seen.3 {
            // ... and for one privilege level and translation mode, each with its own table:
            // a system call or an interrupt from user code switches tables, not empties them.
            self.vcpu.context_mut().lookup = self.translator.select_lookup(now.3, now.2);
        }
        self.seen = now;
        Ok(())
    }

    /// Forgets the lookup entries a change of code mappings made stale. They are keyed by
    /// linear EIP: valid for one set of code mappings, or, for code on global pages, until a
    /// global mapping changes.
    fn check_code_epochs(&mut self) {
        let epochs = (self.shadow.code_epoch(), self.shadow.local_code_epoch());
        if epochs.0 != self.code_epoch.0 {
            // Lookups and chains for global pages go only where a global mapping changed.
            let (all, pages) = self.shadow.take_global_code_changes();
            if all {
                self.translator.forget_indirect();
            } else {
                self.translator.forget_indirect_pages(&pages);
            }
            self.translator.unchain_global(all, &pages);
        } else if epochs.1 != self.code_epoch.1 {
            self.translator.forget_local_indirect();
        }
        self.code_epoch = epochs;
    }

    /// Enters `eip → host` in the lookup table, as global when the code's page is global (an
    /// instruction that may run on into the next page counts as local).
    fn remember(&mut self, eip: u32, host: u64) {
        let global = self.global_code(eip);
        self.translator.remember_indirect(eip, host, global);
    }

    /// Whether the code at `eip` stays mapped as it is across CR3 loads: its page is global
    /// and the instruction cannot run on into the next page (which may not be).
    fn global_code(&self, eip: u32) -> bool {
        !bt::may_cross_page(eip) && self.shadow.code_is_global(eip)
    }

    /// Drops the units of guest-physical page `page` and gives the page back its normal access.
    fn drop_page(&mut self, page: u32) -> Result<(), BtError> {
        self.translator.invalidate_page(page);
        self.shadow.unmark_code(page)?;
        Ok(())
    }

    /// The host entry of the unit at `eip` in the current address space, translating it if
    /// needed; None if fetching there faults or is not memory (the interpreter executes it).
    fn unit_for(&mut self, eip: u32) -> Result<Option<u64>, BtError> {
        let p = self.paging();
        let mode = mode_of(&self.interp);
        self.unit_in(eip, &p, mode)
    }

    /// [`BtEngine::unit_for`] with the paging state and translation mode the caller already
    /// has (they are the CPU's current ones).
    fn unit_in(&mut self, eip: u32, p: &Paging, mode: UnitMode) -> Result<Option<u64>, BtError> {
        let Some(page) = self.shadow.code_page(p, eip)? else {
            self.counters.fetch_faults += 1;
            return Ok(None);
        };
        let next_linear = (eip | 0xFFF).wrapping_add(1);
        if let Some(unit) = self
            .translator
            .unit_id(eip, page, mode)
            .and_then(|id| self.translator.unit(id))
        {
            let (host, page2) = (unit.host, unit.page2);
            if let Some(p2) = page2
                && self.shadow.code_page(p, next_linear)? != Some(p2)
            {
                // The instruction runs on into a page that now maps elsewhere (or faults):
                // the interpreter fetches it afresh.
                return Ok(None);
            }
            return Ok(Some(host));
        }
        // An instruction near the page's end may run on into the next page.
        let next_phys = if bt::may_cross_page(eip) {
            self.shadow.code_page(p, next_linear)?
        } else {
            None
        };
        let src = PageCode {
            memory: &self.memory,
            linear_page: eip >> 12,
            phys_page: page,
            next_phys,
            emulated: &self.emulated,
        };
        let t = self
            .translator
            .translate(&src, eip, page, next_phys, mode)?;
        for flushed in t.flushed_pages {
            if flushed != page {
                self.shadow.unmark_code(flushed)?;
            }
        }
        // Guest writes to the page must now fault (translated code) or be noted (monitor).
        self.shadow.mark_code(page)?;
        if let Some(p2) = t.page2 {
            self.shadow.mark_code(p2)?;
        }
        Ok(Some(t.host))
    }

    /// Copies the guest state translated code keeps in the context from the interpreter's
    /// CpuState; `mode` is the CPU's translation mode.
    fn load_context(&mut self, mode: UnitMode) {
        let cpu = self.interp.cpu();
        let (gpr, eflags) = (cpu.gpr, cpu.eflags);
        let base = |s: SegReg| cpu.seg(s).base;
        let (fs, gs) = (base(SegReg::Fs), base(SegReg::Gs));
        let (ds, es, ss) = (base(SegReg::Ds), base(SegReg::Es), base(SegReg::Ss));
        let pending = self.window_requested;
        let selectors = cpu.seg.map(|s| u32::from(s.selector));
        let mut reload = [SegmentReload::default(); 6];
        if mode.0 & UnitMode::CPL0 != 0 {
            for s in [SegReg::Ds, SegReg::Es, SegReg::Fs, SegReg::Gs] {
                reload[s as usize] = reload_of(cpu, s, self.interp.loaded_descriptor(s));
            }
        }
        let ctx = self.vcpu.context_mut();
        ctx.selectors = selectors;
        ctx.reload = reload;
        ctx.gpr = gpr;
        ctx.rflags = u64::from(eflags & (flags::ARITH | flags::DF));
        ctx.df_step = if eflags & flags::DF != 0 { -1 } else { 1 };
        ctx.vif = eflags & flags::IF;
        ctx.sysflags = eflags & !(flags::ARITH | flags::DF | flags::IF);
        ctx.fs_base = fs;
        ctx.gs_base = gs;
        ctx.ds_base = ds;
        ctx.es_base = es;
        ctx.ss_base = ss;
        ctx.irq_pending = u32::from(pending);
        ctx.x87_op = 0;
        ctx.x87_ds = 0;
        if mode.0 & UnitMode::FPU != 0 {
            // The units this entry can reach may load the guest's FPU state from here (copied
            // in place: no 512-byte temporary).
            self.vcpu
                .context_mut()
                .fx
                .0
                .copy_from_slice(&self.interp.cpu().fx.0);
        }
    }

    fn store_context(&mut self) {
        let ctx = self.vcpu.context();
        let (gpr, rflags, vif) = (ctx.gpr, ctx.rflags as u32, ctx.vif);
        let cpu = self.interp.cpu_mut();
        cpu.gpr = gpr;
        let mask = flags::ARITH | flags::DF;
        cpu.eflags = (cpu.eflags & !(mask | flags::IF)) | (rflags & mask) | (vif & flags::IF);
        if ctx.fp_saved != 0 {
            self.take_fpu_state();
        }
    }

    /// Takes the guest's x87/SSE state back from the context after translated code ran
    /// floating-point instructions: the registers, control and status as the host FPU left
    /// them, the pointer fields as the guest CPU records them (the host's name host code).
    fn take_fpu_state(&mut self) {
        let ctx = self.vcpu.context_mut();
        ctx.fp_saved = 0;
        let (ip, op, dp, ds) = (ctx.x87_ip, ctx.x87_op, ctx.x87_dp, ctx.x87_ds);
        let saved = ctx.fx.0;
        let cpu = self.interp.cpu_mut();
        let old = cpu.fx.0;
        let img = &mut cpu.fx.0;
        img[..fx::DEFINED_END].copy_from_slice(&saved[..fx::DEFINED_END]);
        // The abridged tag word's high byte is reserved.
        img[fx::FTW + 1] = 0;
        img[fx::FOP..fx::MXCSR].copy_from_slice(&old[fx::FOP..fx::MXCSR]);
        img[fx::MXCSR_MASK..fx::MXCSR_MASK + 4].copy_from_slice(&MXCSR_MASK.to_le_bytes());
        if op & X87_RAN != 0 {
            let cs = u32::from(cpu.seg(SegReg::Cs).selector);
            let img = &mut cpu.fx.0;
            img[fx::FOP..fx::FOP + 2].copy_from_slice(&((op & 0x7FF) as u16).to_le_bytes());
            img[fx::FIP..fx::FIP + 4].copy_from_slice(&ip.to_le_bytes());
            img[fx::FCS..fx::FCS + 4].copy_from_slice(&cs.to_le_bytes());
        }
        if ds != 0 {
            let seg = match ds {
                r if r == Register::ES as u32 => SegReg::Es,
                r if r == Register::CS as u32 => SegReg::Cs,
                r if r == Register::SS as u32 => SegReg::Ss,
                r if r == Register::FS as u32 => SegReg::Fs,
                r if r == Register::GS as u32 => SegReg::Gs,
                _ => SegReg::Ds,
            };
            let sel = u32::from(cpu.seg(seg).selector);
            let img = &mut cpu.fx.0;
            img[fx::FDP..fx::FDP + 4].copy_from_slice(&dp.to_le_bytes());
            img[fx::FDS..fx::FDS + 4].copy_from_slice(&sel.to_le_bytes());
        }
    }

    /// Notes that the VM has an interrupt waiting for IF: inline code that sets IF then leaves
    /// for the monitor at the next instruction boundary the CPU would take it at.
    pub fn request_interrupt_window(&mut self) {
        self.window_requested = true;
    }

    /// Whether an interrupt the VM waits to deliver can be taken now.
    fn window_open(&self) -> bool {
        self.window_requested && self.interp.interrupt_window()
    }

    /// Executes one instruction in the interpreter; returns an exit for the VM, if any.
    fn interpret_one(&mut self, io: &mut dyn IoHandler) -> Result<Option<VmExit>, BtError> {
        let if_before = self.interp.cpu().eflags & flags::IF;
        let exit = self.interp.step_one(io)?;
        self.sync()?;
        if exit.is_some() {
            return Ok(exit);
        }
        // IF just went from 0 to 1 (STI, POPF, IRET), or a waiting interrupt can be taken: let
        // the VM deliver what is pending.
        if (if_before == 0 && self.interp.cpu().eflags & flags::IF != 0) || self.window_open() {
            return Ok(Some(VmExit::Interrupted));
        }
        Ok(None)
    }

    fn count_callout(&mut self, eip: u32) -> Result<(), BtError> {
        let mut bytes = [0u8; 15];
        let p = self.paging();
        let Some(page) = self.shadow.code_page(&p, eip)? else {
            return Ok(());
        };
        let src = PageCode {
            memory: &self.memory,
            linear_page: eip >> 12,
            phys_page: page,
            next_phys: None,
            emulated: &self.emulated,
        };
        let n = src.read_code(eip, &mut bytes);
        let m = Decoder::with_ip(32, &bytes[..n], u64::from(eip), DecoderOptions::NONE)
            .decode()
            .mnemonic();
        self.counters.count_callout(m);
        Ok(())
    }

    /// When the VM's next timer event is due, in nanoseconds from now (None: no timer armed):
    /// the time slice ends then.
    pub fn set_timer_deadline(&mut self, within_ns: Option<u64>) {
        self.timer_deadline = within_ns;
    }

    /// A waker for I/O threads: translated code leaves at its next unit entry, as at the end of
    /// a time slice, so a guest polling or spinning sees a disk interrupt without waiting for
    /// the slice to end.
    pub fn io_waker(&self) -> crate::block::IoWaker {
        let requester = self.vcpu.exit_requester();
        Arc::new(move || requester.request())
    }

    /// Runs until the VM must look: an I/O exit, a halt, a time slice's end.
    pub fn run(&mut self, io: &mut dyn IoHandler) -> Result<VmExit, BtError> {
        let slice_error = |e: std::io::Error| BtError::Setup(format!("the time-slice timer: {e}"));
        let start = Instant::now();
        let within = self.timer_deadline.map_or(MAX_SLICE, Duration::from_nanos);
        self.timer.end_within(within).map_err(slice_error)?;
        let exit = self.run_exits(io);
        if let Ok(VmExit::Halt { .. }) = exit {
            // The VM sleeps until its next timer event (or another event): the slice may not
            // end during that sleep. (A run that ends in HLT touched no device, so the deadline
            // still holds.)
            let wake = self.timer_deadline.map(|d| {
                (start + Duration::from_nanos(d)).saturating_duration_since(Instant::now())
            });
            self.timer.park(wake).map_err(slice_error)?;
        }
        // The VM asks again (before the next run) if the interrupt still waits.
        self.window_requested = false;
        exit
    }

    fn run_exits(&mut self, io: &mut dyn IoHandler) -> Result<VmExit, BtError> {
        self.sync()?;
        for _ in 0..EXITS_PER_RUN {
            if let Some(exit) = self.step_unit(io)? {
                return Ok(exit);
            }
        }
        Ok(VmExit::Interrupted)
    }

    /// Makes every unit return to the monitor (no chaining, no indirect-branch lookup, one
    /// interpreted instruction at a time where bt interprets), so [`BtEngine::step_unit`] runs
    /// exactly one unit or one instruction: the lockstep mode's granularity. Set it before
    /// the engine first runs (units chained before would still run on into each other).
    pub fn set_lockstep(&mut self, on: bool) {
        self.lockstep = on;
    }

    /// Runs one translated unit (or, where bt interprets, the interpreter: one instruction in
    /// lockstep mode) and handles its exit. Returns the exit for the VM, if there is one.
    pub fn step_unit(&mut self, io: &mut dyn IoHandler) -> Result<Option<VmExit>, BtError> {
        if world::take_slice_due() {
            // The slice ended while the monitor ran (a request made from translated code
            // would have faulted its next poll instead).
            self.counters.exits_request += 1;
            return Ok(Some(VmExit::Interrupted));
        }
        if self.vcpu.exit_requested() {
            self.vcpu.clear_exit_request();
            self.counters.exits_request += 1;
            return Ok(Some(VmExit::Interrupted));
        }
        if !self.translatable() {
            self.counters.interpreted_runs += 1;
            // An interrupt shadow, or RF (which the return from every fault handler sets,
            // and which the next instruction clears): one instruction, then translated
            // code again.
            if self.lockstep || self.interp.in_shadow() || self.interp.cpu().eflags & flags::RF != 0
            {
                return self.interpret_one(io);
            }
            let exit = self.interp.run(io)?;
            self.sync()?;
            return Ok(Some(exit));
        }
        let eip = self.interp.cpu().eip;
        // The paging state and translation mode, once for the lookup, the window and the
        // context.
        let (p, mode) = (self.paging(), mode_of(&self.interp));
        // The monitor's entry cache first (once stale entries are gone): a callout's next
        // instruction is usually there, and it saves the code-page walk and the cache's hash
        // lookup.
        self.check_code_epochs();
        let cpl = self.interp.cpu().cpl();
        let host = match self.translator.cached_entry(eip, mode, cpl) {
            Some(host) => {
                self.counters.entry_cache_hits += 1;
                host
            }
            None => {
                let Some(host) = self.unit_in(eip, &p, mode)? else {
                    // The fetch faults (or runs from device memory): the interpreter raises
                    // the #PF or executes it.
                    return self.interpret_one(io);
                };
                let global = self.global_code(eip);
                self.translator.cache_entry(eip, mode, cpl, host, global);
                host
            }
        };
        let base = self.shadow.activate(&p)?;
        self.load_context(mode);
        if world::take_slice_due() {
            // The slice ended while the unit was being looked up: the guest would not notice
            // before the timer's next period.
            self.counters.exits_request += 1;
            return Ok(Some(VmExit::Interrupted));
        }
        // SAFETY: `host` is the entry of a unit the translator built under the contract
        // (guest memory only through GS, exits only through the stub), and the window maps
        // only guest memory.
        unsafe { self.vcpu.enter(host, base) };
        self.store_context();
        let ctx = self.vcpu.context();
        let (why, target) = (ctx.exit_reason, ctx.exit_eip);
        match why {
            reason::BRANCH => {
                self.counters.exits_branch += 1;
                let (unit, slot) = (ctx.exit_unit, ctx.exit_slot);
                self.interp.cpu_mut().eip = target;
                let from = self.translator.unit(unit).map(|u| (u.eip, u.page));
                // While paging is on, only a target in the unit's own page is sure to map
                // to the same code whenever the unit runs.
                let same_page = from.is_some_and(|(eip, _)| eip >> 12 == target >> 12);
                if !self.lockstep
                    && self.translatable()
                    && let Some(host) = self.unit_for(target)?
                {
                    let page = match from {
                        Some((_, page)) if same_page => page,
                        _ => target >> 12,
                    };
                    let p = self.paging();
                    let chained = if same_page || !p.enabled {
                        self.translator.chain(unit, slot, target, page, !p.enabled)
                    } else if self.global_code(target) {
                        // Code on a global page maps the same in every address space until
                        // that page's global mapping changes, when the chain is undone.
                        match self.shadow.code_page(&p, target)? {
                            Some(page) => self.translator.chain_global(unit, slot, target, page),
                            None => false,
                        }
                    } else {
                        false
                    };
                    if !chained {
                        // Another page, which may map elsewhere next time, or an instruction
                        // running on into one: the slot's trampoline looks the target up
                        // first (like an indirect branch).
                        self.remember(target, host);
                    }
                }
            }
            reason::IRQ_WINDOW => {
                // Inline code set IF with an interrupt waiting: the VM delivers it here.
                self.counters.exits_irq_window += 1;
                self.interp.cpu_mut().eip = target;
                return Ok(Some(VmExit::Interrupted));
            }
            reason::STI_SHADOW => {
                // The instruction after an inline STI, executed with the shadow held.
                self.counters.exits_sti_shadow += 1;
                self.interp.cpu_mut().eip = target;
                self.interp.begin_sti_shadow();
                return self.interpret_one(io);
            }
            reason::LOOKUP_MISS => {
                self.counters.exits_lookup += 1;
                self.interp.cpu_mut().eip = target;
                if !self.lockstep
                    && self.translatable()
                    && let Some(host) = self.unit_for(target)?
                {
                    self.remember(target, host);
                }
            }
            reason::CALLOUT => {
                self.counters.exits_callout += 1;
                self.interp.cpu_mut().eip = target;
                if ctx.exit_unit == bt::MID_UNIT {
                    // A callout from inside a unit (a segment load the fast path left to the
                    // interpreter): the exit says which mnemonic.
                    self.counters.count_callout_index(ctx.exit_slot as usize);
                } else {
                    let recorded = self.translator.unit(ctx.exit_unit).and_then(|u| u.callout);
                    match recorded {
                        Some(m) => self.counters.count_callout(m),
                        None => self.count_callout(target)?,
                    }
                }
                return self.interpret_one(io);
            }
            reason::SIGNAL => return self.on_signal(io),
            other => {
                return Err(BtError::Setup(format!(
                    "translated code left with an unknown exit reason {other}"
                )));
            }
        }
        Ok(None)
    }

    /// A host signal interrupted translated code.
    fn on_signal(&mut self, io: &mut dyn IoHandler) -> Result<Option<VmExit>, BtError> {
        let ctx = self.vcpu.context();
        let (signo, addr, rip) = (ctx.signo, ctx.si_addr, ctx.fault_rip);
        if let Some(i) = SIGNALS.iter().position(|(s, _)| *s == signo) {
            self.counters.signals[i] += 1;
        }
        if signo == SIGSYS {
            return Err(BtError::SystemCall { rip });
        }
        let Some((unit, entry)) = self.translator.locate(rip) else {
            return Err(BtError::Unmapped { signo, rip });
        };
        let (eip, not_retired) = (entry.guest_eip, u64::from(unit.instructions - entry.index));
        let code_page = unit.page;
        // The unit kept guest ESP as R12D plus a pending delta: the interpreter (which
        // re-executes the instruction, raising its exception or completing the access) gets
        // the architectural ESP from before the instruction.
        let cpu = self.interp.cpu_mut();
        cpu.eip = eip;
        cpu.gpr[ESP] = cpu.gpr[ESP].wrapping_add(entry.esp_delta as u32);
        if signo == SIGSEGV && self.vcpu.is_poll_address(addr) {
            // A time slice ended. At the unit's first instruction the unit had not started (it
            // counts its instructions after that poll). Anywhere else it is the poll between
            // two iterations of a REP string instruction: the registers say what is left of it
            // (as the CPU leaves them when it takes an interrupt there), EIP is on it, and it
            // and the unit's later instructions have not retired.
            self.vcpu.clear_exit_request();
            self.counters.exits_request += 1;
            if rip != unit.host {
                self.counters.exits_request_rep += 1;
                self.vcpu.context_mut().retired -= not_retired;
                if self.lockstep {
                    // Lockstep compares whole instructions: the interpreter finishes it.
                    return self
                        .interpret_one(io)
                        .map(|e| e.or(Some(VmExit::Interrupted)));
                }
            }
            return Ok(Some(VmExit::Interrupted));
        }
        // The unit counted all its instructions at entry; those from the faulting one on did
        // not retire.
        self.vcpu.context_mut().retired -= not_retired;
        self.counters.exits_signal += 1;
        if signo == SIGSEGV {
            let write = self.vcpu.context().fault_error & 2 != 0;
            let p = self.paging();
            match self.shadow.on_fault(&p, addr, write)? {
                Fault::Code(page) => {
                    // A write to a page holding translations (self-modifying code).
                    self.drop_page(page)?;
                }
                // An instruction that keeps writing page tables, or keeps reaching device
                // memory (a local APIC EOI, an IOAPIC register): retranslate it as a callout,
                // cheaper than a host fault each time (adaptive binary translation, Adams &
                // Agesen, ASPLOS 2006).
                Fault::Traced => self.note_trap(eip, code_page, false)?,
                Fault::Emulate => self.note_trap(eip, code_page, true)?,
                _ => {}
            }
        }
        // The registers hold the guest state at the start of the faulting instruction: the
        // interpreter executes it, raising the precise exception or completing the access.
        self.interpret_one(io)
    }

    /// Counts a hidden fault the instruction at `eip` (code in guest-physical `code_page`)
    /// took for a traced write or (`device`) an access to device memory; after
    /// [`TRAPS_BEFORE_EMULATION`] of them its units are dropped, and translated again with that
    /// instruction as a callout.
    fn note_trap(&mut self, eip: u32, code_page: u32, device: bool) -> Result<(), BtError> {
        let n = self.trapping.entry((eip, code_page)).or_default();
        *n += 1;
        if *n >= TRAPS_BEFORE_EMULATION && self.emulated.insert((eip, code_page)) {
            self.counters.retranslated += 1;
            if device {
                self.counters.retranslated_device += 1;
            }
            self.drop_page(code_page)?;
        }
        Ok(())
    }

    /// Guest instructions executed so far, translated and interpreted.
    pub fn guest_instructions(&self) -> u64 {
        self.vcpu.context().retired + self.interp.counters()[0].1
    }

    /// Counters for `--stats`.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.translator.stats;
        let c = &self.counters;
        let m = &self.shadow.stats;
        let retired = self.vcpu.context().retired;
        let interp = self.interp.counters();
        let interpreted = interp[0].1;
        let mut v = vec![
            ("guest instructions", retired + interpreted),
            ("translated executed", retired),
            ("interpreted", interpreted),
            ("exceptions raised", interp[1].1),
            ("interrupts delivered", interp[2].1),
            ("units translated", s.units),
            ("instrs translated", s.instructions),
            ("units with segment bases", s.based_units),
            ("ESP moves translated", s.esp_moves),
            (
                "ESP moves folded away",
                s.esp_moves - s.esp_updates.min(s.esp_moves),
            ),
            ("translation time us", s.time.as_micros() as u64),
            ("chain patches", s.chain_patches),
            ("chains to global pages", s.global_chains),
            ("lookup hits", self.vcpu.context().lookup_hits),
            (
                "segment reloads inline",
                self.vcpu.context().segment_reloads,
            ),
            ("lookup misses", c.exits_lookup),
            ("entry cache hits", c.entry_cache_hits),
            ("units invalidated", s.invalidated),
            ("cache flushes", s.flushes),
            ("lookup flushes", s.lookup_flushes),
            ("lookup flushes: non-global", s.lookup_local_flushes),
            ("lookup flushes: pages", s.lookup_page_flushes),
            ("lookup tables recycled", s.lookup_recycles),
            ("exit: branch", c.exits_branch),
            ("exit: lookup miss", c.exits_lookup),
            ("exit: callout", c.exits_callout),
            ("exit: fault", c.exits_signal),
            ("exit: time slice", c.exits_request),
            ("exit: time slice in a REP", c.exits_request_rep),
            ("exit: irq window", c.exits_irq_window),
            ("exit: sti shadow", c.exits_sti_shadow),
            ("exit: interp mode", c.interpreted_runs),
            ("code-page writes", m.code_writes),
            ("fetch faults", c.fetch_faults),
            ("retranslated to emulate", c.retranslated),
            ("retranslated: device memory", c.retranslated_device),
            ("hidden faults", m.hidden_faults),
            ("pages mapped eagerly", m.eager_pages),
            ("true faults", m.true_faults),
            ("traced writes", m.traced_writes),
            ("trace drops", m.trace_drops),
            ("shadow entries dropped", m.entries_dropped),
            ("emulated accesses", m.emulated),
            ("windows created", m.windows_created),
            ("windows recycled", m.windows_recycled),
            ("window budget", self.shadow.budget() as u64),
            ("mmap calls", m.mmap_calls),
            ("mprotect calls", m.mprotect_calls),
        ];
        for (i, (_, name)) in SIGNALS.iter().enumerate() {
            if c.signals[i] != 0 {
                v.push((name, c.signals[i]));
            }
        }
        v.push(("SUD fired", world::sigsys_count()));
        let mut callouts: Vec<(Mnemonic, u64)> = Mnemonic::values()
            .filter_map(|m| Some((m, *c.callouts.get(m as usize)?)))
            .filter(|&(_, n)| n != 0)
            .collect();
        callouts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        for (m, n) in callouts {
            v.push((callout_name(m), n));
        }
        v
    }
}

const SIGNALS: [(i32, &str); 6] = {
    let n = world::SIGNAL_NAMES;
    [
        (n[0].0, "signal SIGSEGV"),
        (n[1].0, "signal SIGBUS"),
        (n[2].0, "signal SIGFPE"),
        (n[3].0, "signal SIGILL"),
        (n[4].0, "signal SIGTRAP"),
        (n[5].0, "signal SIGSYS"),
    ]
};
const SIGSEGV: i32 = SIGNALS[0].0;
const SIGSYS: i32 = SIGNALS[5].0;

/// A descriptor's accessed bit (type bit 0).
const ACCESSED: u64 = 1 << 40;

/// How units translated for CPL 0 may reload segment register `s` with the selector it holds
/// ([`SegmentReload`]), given the descriptor the interpreter last loaded it from (0 if none).
/// Armed only if a full load at CPL 0 from those same 8 bytes would change nothing: a
/// non-null GDT selector within the GDT limit, the bytes decode to exactly the register's
/// current hidden part (so they are what it was loaded from, however it was loaded), the
/// checks a data-segment load makes pass at CPL 0 (a readable segment, DPL >= RPL unless
/// conforming code, present), and the accessed bit is set (a load would not write it).
/// Translated code then compares the live GDT bytes with these: a write to the GDT, an LGDT
/// (a callout: the next entry re-arms) or a load of another selector takes the full path.
fn reload_of(cpu: &crate::cpu::CpuState, s: SegReg, raw: u64) -> SegmentReload {
    let seg = cpu.seg(s);
    let sel = seg.selector;
    let decoded = Segment::from_descriptor(sel, raw);
    let access = decoded.access;
    let code = access & 0x08 != 0;
    let readable = !code || access & 0x02 != 0;
    let conforming = code && access & 0x04 != 0;
    let rpl = (sel & 3) as u8;
    let ok = raw & ACCESSED != 0
        && sel & 4 == 0
        && sel & !3 != 0
        && u32::from(sel | 7) <= u32::from(cpu.gdtr.limit)
        && decoded == *seg
        && access & 0x10 != 0
        && decoded.present()
        && readable
        && (conforming || decoded.dpl() >= rpl);
    if !ok {
        return SegmentReload::default();
    }
    let address = cpu.gdtr.base.wrapping_add(u32::from(sel & !7));
    SegmentReload::armed(sel, raw, address)
}

/// The translation mode the CPU is in (see [`UnitMode`]).
fn mode_of(interp: &Interp) -> UnitMode {
    let c = interp.cpu();
    // A present, writable, expand-up data segment reaching 4 GiB: only its base matters.
    let flat_limit = |s: SegReg| {
        let seg = c.seg(s);
        seg.present() && seg.access & 0x1E == 0x12 && seg.limit == u32::MAX
    };
    let mut m = 0;
    if c.cpl() == 0 && c.protected() && c.eflags & flags::VM == 0 {
        m |= UnitMode::CPL0;
    }
    if flat_limit(SegReg::Fs) {
        m |= UnitMode::FS_FLAT;
    }
    if flat_limit(SegReg::Gs) {
        m |= UnitMode::GS_FLAT;
    }
    // DS, ES and SS are flat-limit whenever units run (`translatable`): units translated for a
    // non-zero base add it from the context, the others assume 0.
    for (s, bit) in [
        (SegReg::Ds, UnitMode::DS_BASED),
        (SegReg::Es, UnitMode::ES_BASED),
        (SegReg::Ss, UnitMode::SS_BASED),
    ] {
        if c.seg(s).base != 0 {
            m |= bit;
        }
    }
    // Floating-point instructions run natively only where they cannot fault for the FPU state
    // (no #NM, #UD, #MF or #XM to raise): the callouts that change these leave translated code.
    let fcw = u16::from_le_bytes([c.fx.0[fx::FCW], c.fx.0[fx::FCW + 1]]);
    let mxcsr = u32::from_le_bytes(
        c.fx.0[fx::MXCSR..fx::MXCSR + 4]
            .try_into()
            .expect("4 bytes"),
    );
    if c.cr0 & (cr0::EM | cr0::TS) == 0 && fcw & 0x3F == 0x3F && !x87_pending(&c.fx) {
        m |= UnitMode::FPU;
        if c.cr4 & cr4::OSFXSR != 0 && mxcsr & 0x1F80 == 0x1F80 {
            m |= UnitMode::SSE;
        }
    }
    UnitMode(m)
}

/// "callout <mnemonic>", interned once per mnemonic (a bounded set) for the counters' names.
fn callout_name(m: Mnemonic) -> &'static str {
    static NAMES: OnceLock<Mutex<HashMap<Mnemonic, &'static str>>> = OnceLock::new();
    let mut names = NAMES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    names.entry(m).or_insert_with(|| {
        Box::leak(format!("callout {}", format!("{m:?}").to_lowercase()).into_boxed_str())
    })
}
