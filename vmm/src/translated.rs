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
//! Translation needs flat 32-bit protected mode with paging off (the shadow MMU is a later
//! step); in any other mode the interpreter runs the guest.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bt::{CodeSource, Translator};
use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use vmdriver::window::Window;
use vmdriver::world::{self, SliceTimer, Vcpu, reason};
use vmdriver::{GuestMemory, IoHandler, RegionKind, VmExit};

use crate::cpu::{SegReg, cr0, flags};
use crate::interp::{Interp, InterpError};

/// How often translated code is made to return so timers and interrupts are serviced.
const TIME_SLICE: Duration = Duration::from_millis(1);
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
    /// A window page's protection could not be changed.
    #[error(transparent)]
    Window(#[from] vmdriver::window::WindowError),
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
    exits_callout: u64,
    exits_signal: u64,
    exits_request: u64,
    interpreted_runs: u64,
    code_faults: u64,
    signals: [u64; 6],
    callouts: HashMap<Mnemonic, u64>,
}

/// Guest code as the translator reads it: paging off, so linear = physical, from RAM or ROM.
struct PhysCode<'a>(&'a GuestMemory);

impl CodeSource for PhysCode<'_> {
    fn read_code(&self, eip: u32, buf: &mut [u8]) -> usize {
        let Some(r) = self.0.layout().region_of(u64::from(eip), 1) else {
            return 0;
        };
        let n = buf.len().min((r.end() - u64::from(eip)) as usize);
        match self.0.read(u64::from(eip), &mut buf[..n]) {
            Ok(()) => n,
            Err(_) => 0,
        }
    }
}

/// The bt engine.
pub struct BtEngine {
    interp: Interp,
    memory: Arc<GuestMemory>,
    window: Window,
    vcpu: Vcpu,
    translator: Translator,
    code_pages: HashSet<u32>,
    _timer: SliceTimer,
    counters: Counters,
}

impl BtEngine {
    /// Wraps `interp` (which holds the initial CPU state) with a translator over `memory`.
    pub fn new(interp: Interp, memory: Arc<GuestMemory>) -> Result<Self, BtError> {
        let setup = |e: &dyn std::fmt::Display| BtError::Setup(e.to_string());
        let mut window = Window::new().map_err(|e| setup(&e))?;
        window.map_physical(&memory).map_err(|e| setup(&e))?;
        let translator = Translator::new()?;
        let mut vcpu = Vcpu::new().map_err(|e| setup(&e))?;
        vcpu.context_mut().lookup = translator.lookup_table();
        let timer = SliceTimer::start(vcpu.exit_requester(), TIME_SLICE).map_err(|e| setup(&e))?;
        Ok(Self {
            interp,
            memory,
            window,
            vcpu,
            translator,
            code_pages: HashSet::new(),
            _timer: timer,
            counters: Counters::default(),
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

    /// Whether the CPU is in a mode translated code handles: flat 32-bit protected mode with
    /// paging off, no v86, no single-stepping or breakpoints, no alignment checks.
    fn translatable(&self) -> bool {
        let c = self.interp.cpu();
        if !c.protected()
            || c.cr0 & cr0::PG != 0
            || c.eflags & (flags::VM | flags::TF | flags::RF) != 0
            || c.dr[7] & 0xFF != 0
            || (c.cr0 & CR0_AM != 0 && c.eflags & flags::AC != 0 && c.cpl() == 3)
            || self.interp.in_shadow()
        {
            return false;
        }
        let flat = |s: SegReg, code: bool| {
            let seg = c.seg(s);
            let kind_ok = if code {
                seg.access & 0x18 == 0x18
            } else {
                // A writable data segment, not expand-down.
                seg.access & 0x1E == 0x12
            };
            seg.base == 0 && seg.limit == u32::MAX && seg.big && seg.present() && kind_ok
        };
        flat(SegReg::Cs, true)
            && flat(SegReg::Ss, false)
            && flat(SegReg::Ds, false)
            && flat(SegReg::Es, false)
    }

    /// Invalidates the translations of guest pages written through the monitor's view (the
    /// interpreter, devices, loaders).
    fn sync_code_writes(&mut self) -> Result<(), BtError> {
        for page in self.memory.take_written_code_pages() {
            self.drop_page(page)?;
        }
        Ok(())
    }

    /// Drops the units of guest page `page` and gives the page back its normal access.
    fn drop_page(&mut self, page: u32) -> Result<(), BtError> {
        self.translator.invalidate_page(page);
        if self.code_pages.remove(&page) {
            self.memory.mark_code_page(page << 12, false);
            let ram = self
                .memory
                .layout()
                .region_of(u64::from(page) << 12, 1)
                .is_some_and(|r| r.kind == RegionKind::Ram);
            if ram {
                self.window.protect_page(page << 12, true)?;
            }
        }
        Ok(())
    }

    /// The host entry of the unit at `eip`, translating it if needed.
    fn unit_for(&mut self, eip: u32) -> Result<u64, BtError> {
        if let Some(host) = self.translator.entry(eip) {
            return Ok(host);
        }
        let t = self.translator.translate(&PhysCode(&self.memory), eip)?;
        for page in t.flushed_pages {
            if page != eip >> 12 {
                self.release_page(page)?;
            }
        }
        let page = eip >> 12;
        if self.code_pages.insert(page) {
            // Guest writes to the page must now fault (translated code) or be noted (monitor).
            self.memory.mark_code_page(eip, true);
            if self.memory.layout().region_of(u64::from(eip), 1).is_some() {
                self.window.protect_page(eip, false)?;
            }
        }
        Ok(t.host)
    }

    /// Gives a page that no longer holds units back its normal access.
    fn release_page(&mut self, page: u32) -> Result<(), BtError> {
        if self.code_pages.remove(&page) {
            self.memory.mark_code_page(page << 12, false);
            let ram = self
                .memory
                .layout()
                .region_of(u64::from(page) << 12, 1)
                .is_some_and(|r| r.kind == RegionKind::Ram);
            if ram {
                self.window.protect_page(page << 12, true)?;
            }
        }
        Ok(())
    }

    fn load_context(&mut self) {
        let cpu = self.interp.cpu();
        let (gpr, eflags) = (cpu.gpr, cpu.eflags);
        let ctx = self.vcpu.context_mut();
        ctx.gpr = gpr;
        ctx.rflags = u64::from(eflags & (flags::ARITH | flags::DF));
    }

    fn store_context(&mut self) {
        let ctx = self.vcpu.context();
        let (gpr, rflags) = (ctx.gpr, ctx.rflags as u32);
        let cpu = self.interp.cpu_mut();
        cpu.gpr = gpr;
        let mask = flags::ARITH | flags::DF;
        cpu.eflags = (cpu.eflags & !mask) | (rflags & mask);
    }

    /// Executes one instruction in the interpreter; returns an exit for the VM, if any.
    fn interpret_one(&mut self, io: &mut dyn IoHandler) -> Result<Option<VmExit>, BtError> {
        let if_before = self.interp.cpu().eflags & flags::IF;
        let exit = self.interp.step_one(io)?;
        self.sync_code_writes()?;
        if exit.is_some() {
            return Ok(exit);
        }
        // IF just went from 0 to 1 (STI, POPF, IRET): let the VM deliver what is pending.
        if if_before == 0 && self.interp.cpu().eflags & flags::IF != 0 {
            return Ok(Some(VmExit::Interrupted));
        }
        Ok(None)
    }

    fn count_callout(&mut self, eip: u32) {
        let mut bytes = [0u8; 15];
        let n = PhysCode(&self.memory).read_code(eip, &mut bytes);
        let m = Decoder::with_ip(32, &bytes[..n], u64::from(eip), DecoderOptions::NONE)
            .decode()
            .mnemonic();
        *self.counters.callouts.entry(m).or_default() += 1;
    }

    /// Runs until the VM must look: an I/O exit, a halt, a time slice's end.
    pub fn run(&mut self, io: &mut dyn IoHandler) -> Result<VmExit, BtError> {
        self.sync_code_writes()?;
        for _ in 0..EXITS_PER_RUN {
            if self.vcpu.exit_requested() {
                self.vcpu.clear_exit_request();
                self.counters.exits_request += 1;
                return Ok(VmExit::Interrupted);
            }
            if !self.translatable() {
                self.counters.interpreted_runs += 1;
                if self.interp.in_shadow() {
                    match self.interpret_one(io)? {
                        Some(exit) => return Ok(exit),
                        None => continue,
                    }
                }
                let exit = self.interp.run(io)?;
                self.sync_code_writes()?;
                return Ok(exit);
            }
            let eip = self.interp.cpu().eip;
            let host = self.unit_for(eip)?;
            self.load_context();
            // SAFETY: `host` is the entry of a unit the translator built under the contract
            // (guest memory only through GS, exits only through the stub), and the window maps
            // only guest memory.
            unsafe { self.vcpu.enter(host, self.window.base()) };
            self.store_context();
            let ctx = self.vcpu.context();
            let (why, target) = (ctx.exit_reason, ctx.exit_eip);
            match why {
                reason::BRANCH => {
                    self.counters.exits_branch += 1;
                    let (unit, slot) = (ctx.exit_unit, ctx.exit_slot);
                    self.interp.cpu_mut().eip = target;
                    if self.translatable() {
                        self.unit_for(target)?;
                        self.translator.chain(unit, slot, target);
                    }
                }
                reason::LOOKUP_MISS => {
                    self.counters.exits_lookup += 1;
                    self.interp.cpu_mut().eip = target;
                    if self.translatable() {
                        let host = self.unit_for(target)?;
                        self.translator.remember_indirect(target, host);
                    }
                }
                reason::CALLOUT => {
                    self.counters.exits_callout += 1;
                    self.interp.cpu_mut().eip = target;
                    self.count_callout(target);
                    if let Some(exit) = self.interpret_one(io)? {
                        return Ok(exit);
                    }
                }
                reason::SIGNAL => {
                    if let Some(exit) = self.on_signal(io)? {
                        return Ok(exit);
                    }
                }
                other => {
                    return Err(BtError::Setup(format!(
                        "translated code left with an unknown exit reason {other}"
                    )));
                }
            }
        }
        Ok(VmExit::Interrupted)
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
        self.interp.cpu_mut().eip = eip;
        if signo == SIGSEGV && self.vcpu.is_poll_address(addr) {
            // A time slice ended: the unit had not started (the poll is its first instruction,
            // before it counts its instructions).
            self.vcpu.clear_exit_request();
            self.counters.exits_request += 1;
            return Ok(Some(VmExit::Interrupted));
        }
        // The unit counted all its instructions at entry; those from the faulting one on did
        // not retire.
        self.vcpu.context_mut().retired -= not_retired;
        self.counters.exits_signal += 1;
        if signo == SIGSEGV
            && let Some(guest) = self.window.guest_address(addr)
            && self.code_pages.contains(&(guest >> 12))
        {
            // A write to a page holding translations (self-modifying code).
            self.counters.code_faults += 1;
            self.drop_page(guest >> 12)?;
        }
        // The registers hold the guest state at the start of the faulting instruction: the
        // interpreter executes it, raising the precise exception or completing the access.
        self.interpret_one(io)
    }

    /// Guest instructions executed so far, translated and interpreted.
    pub fn guest_instructions(&self) -> u64 {
        self.vcpu.context().retired + self.interp.counters()[0].1
    }

    /// Counters for `--stats`.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.translator.stats;
        let c = &self.counters;
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
            ("translation time us", s.time.as_micros() as u64),
            ("chain patches", s.chain_patches),
            ("lookup hits", self.vcpu.context().lookup_hits),
            ("lookup misses", c.exits_lookup),
            ("units invalidated", s.invalidated),
            ("cache flushes", s.flushes),
            ("exit: branch", c.exits_branch),
            ("exit: lookup miss", c.exits_lookup),
            ("exit: callout", c.exits_callout),
            ("exit: fault", c.exits_signal),
            ("exit: time slice", c.exits_request),
            ("exit: interp mode", c.interpreted_runs),
            ("code-page writes", c.code_faults),
        ];
        for (i, (_, name)) in SIGNALS.iter().enumerate() {
            if c.signals[i] != 0 {
                v.push((name, c.signals[i]));
            }
        }
        v.push(("SUD fired", world::sigsys_count()));
        let mut callouts: Vec<_> = c.callouts.iter().collect();
        callouts.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (m, n) in callouts {
            v.push((callout_name(*m), *n));
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
