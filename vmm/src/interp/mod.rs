//! The interpreter engine: executes guest code one instruction at a time on the architectural
//! state in [`CpuState`], decoding with iced-x86.
//!
//! This is the first step of the interpreter: real mode and 32-bit protected mode with paging
//! off, the integer core (moves, ALU with exact flags, shifts and rotates, stack, near and far
//! control flow, conditional jumps), port I/O, the descriptor-table and control-register
//! instructions a boot path uses, and exception delivery through the IVT/IDT with double- and
//! triple-fault escalation. An instruction this step does not execute yet stops the VM with a
//! message naming it (it is never turned into a silent #UD).

pub mod alu;
mod decode_cache;
mod fpu;
mod ops;
pub mod snippet;
pub mod system;
mod transfer;

use rustc_hash::FxHashMap as HashMap;
use std::cell::{Cell, RefCell};
use std::sync::Arc;

use iced_x86::{
    Code, Decoder, DecoderOptions, EncodingKind, Instruction, Mnemonic, OpKind, Register,
};
use vmdriver::kvm::InitialCpu;
use vmdriver::{GuestMemory, GuestRegisters, IoHandler, RegionKind, VmExit};

use crate::cpu::{CpuState, SegReg, Segment, TableReg, cr0, cr4, flags};
use crate::devices::pit::{Clock, HostClock};
use alu::Shift;
use shadow_mmu::walk::{self as pagewalk, PhysMem};

/// Exception vectors.
mod vector {
    pub const DE: u8 = 0;
    pub const DB: u8 = 1;
    pub const BR: u8 = 5;
    pub const UD: u8 = 6;
    pub const DF: u8 = 8;
    pub const NP: u8 = 11;
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const AC: u8 = 17;
}

/// Why the interpreter stopped without a VM exit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InterpError {
    /// The guest executed something this interpreter does not implement yet.
    #[error("the interp engine cannot execute {what} yet, at {regs}")]
    Unsupported {
        /// The instruction or feature.
        what: String,
        /// Where.
        regs: GuestRegisters,
    },
}

/// An event that ends an instruction early.
#[derive(Debug)]
enum Fault {
    /// A CPU exception, with its error code if it has one.
    Exception(u8, Option<u32>),
    /// A page fault at `linear` (CR2) with its error code.
    Page {
        /// The faulting linear address.
        linear: u32,
        /// The #PF error code.
        error: u32,
    },
    /// Something not implemented yet (the text names it).
    Unsupported(String),
}

type Step<T = ()> = Result<T, Fault>;

fn gp0<T>() -> Step<T> {
    Err(Fault::Exception(vector::GP, Some(0)))
}

fn unsupported<T>(what: impl Into<String>) -> Step<T> {
    Err(Fault::Unsupported(what.into()))
}

/// Fault-class exceptions: they restart the faulting instruction, and the EFLAGS image they push
/// has RF = 1 (Intel SDM vol. 3, "RF flag").
fn fault_class(v: u8) -> bool {
    matches!(v, 0 | 5 | 6 | 7 | 10..=14 | 16 | 17 | 19)
}

/// Exceptions whose delivery failure in turn makes a double fault (Intel SDM vol. 3, table 6-5).
fn contributory(v: u8) -> bool {
    matches!(v, 0 | 10..=13)
}

/// Whether a `second` exception while delivering `first` is a double fault (SDM table 6-5).
fn double_fault(first: u8, second: u8) -> bool {
    (contributory(first) && contributory(second))
        || (first == vector::PF && (contributory(second) || second == vector::PF))
}

/// What raised an interrupt being delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// A processor exception (faults push RF=1).
    Exception,
    /// INT n, INT3, INTO or INT1, returning to the given EIP (checked against the gate's DPL).
    Software(u32),
    /// A maskable interrupt from the interrupt controller.
    External,
    /// INT1 (ICEBP): a debug trap returning to the given EIP, without the gate DPL check.
    Icebp(u32),
}

/// One cached translation of a 4 KiB linear page.
#[derive(Debug, Clone, Copy)]
struct TlbEntry {
    frame: u64,
    user: bool,
    writable: bool,
    dirty: bool,
    global: bool,
}

/// The software TLB: translations by linear page number, flushed the way the hardware's is.
#[derive(Debug, Default)]
struct Tlb {
    entries: HashMap<u32, TlbEntry>,
    /// Whether any entry came from a large page (INVLPG must then flush more than one page).
    has_large: bool,
    /// Flushes since the bt engine last looked (its shadow page tables follow them).
    events: Vec<TlbEvent>,
}

/// A TLB flush the guest asked for, as the bt engine's shadow MMU must follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlbEvent {
    /// CR3 was loaded (MOV to CR3 or a task switch): non-global translations go.
    Cr3Load,
    /// INVLPG of this linear address.
    Invlpg(u32),
    /// CR0 or CR4 changed how linear addresses translate: everything goes.
    All,
    /// More flushes than were kept: treat as a flush of everything.
    Overflow,
}

/// Flush events kept before they collapse into [`TlbEvent::Overflow`].
const TLB_EVENTS: usize = 64;
/// A segment descriptor's accessed bit (type bit 0).
const ACCESSED: u64 = 1 << 40;

impl Tlb {
    fn note(&mut self, e: TlbEvent) {
        if self.events.len() >= TLB_EVENTS {
            self.events.clear();
            self.events.push(TlbEvent::Overflow);
        } else if self.events.first() != Some(&TlbEvent::Overflow) {
            self.events.push(e);
        }
    }
}

/// Instructions between returns to the VM's run loop (timers and interrupts are serviced
/// there): about a third of a millisecond at the interpreter's speed.
const YIELD_INSTRUCTIONS: u64 = 4096;

/// Entries kept before the TLB is emptied (guests never rely on capacity).
const TLB_CAPACITY: usize = 8192;

/// Guest physical memory for the page walker: page tables live in RAM; anything else reads as
/// all ones and ignores A/D updates.
struct WalkMem<'a>(&'a GuestMemory);

impl PhysMem for WalkMem<'_> {
    fn read_u32(&mut self, addr: u64) -> u32 {
        self.0.read_u32(addr).unwrap_or(u32::MAX)
    }
    fn write_u32(&mut self, addr: u64, value: u32) {
        let _ = self.0.write_ram(addr, &value.to_le_bytes());
    }
}

/// The interpreter engine.
pub struct Interp {
    cpu: CpuState,
    memory: Arc<GuestMemory>,
    instructions: u64,
    exceptions: u64,
    /// The first exception or software interrupt, with the EIP its handler would return to.
    first_event: Option<(u8, u32)>,
    /// The clock the TSC counts (the VM's, shared with its timer devices).
    clock: Arc<dyn Clock>,
    tsc_offset: u64,
    tlb: RefCell<Tlb>,
    pdptes: [u64; 4],
    /// External interrupts delivered.
    interrupts: u64,
    trace: Option<Tracer>,
    /// The one-instruction shadow after MOV SS, POP SS and STI.
    shadow: Shadow,
    /// Set by an instruction that must not be followed by a single-step trap.
    trap_suppressed: bool,
    /// Data breakpoints (DR0-DR3, as DR6 B bits) the current instruction has hit.
    data_hits: Cell<u32>,
    /// Whether the current instruction touched device memory (it then exits to the VM like a
    /// port access, so that an interrupt controller's new state is looked at right away).
    device_access: Cell<bool>,
    /// The floating-point unit's engine state (host FPU executor, FERR#/IGNNE#).
    fpu: fpu::FpuUnit,
    /// Lockstep: TSC reads recorded to (false) or replayed from (true) a shared tape.
    tsc_tape: Option<(bool, TscTape)>,
    /// Lockstep: the EFLAGS bits the instructions since the last look left undefined.
    undefined_flags: Option<u32>,
    /// Instructions decoded before, by address.
    decoded: RefCell<decode_cache::DecodeCache>,
    /// The 8 descriptor bytes each segment register was last loaded from by a MOV/POP-style
    /// load (accessed bit as the load left it), 0 if it was not (see
    /// [`Interp::loaded_descriptor`]).
    loaded: [u64; 6],
}

/// TSC values one interpreter read, for another to replay: the lockstep mode gives both
/// engines the same time.
pub type TscTape = Arc<std::sync::Mutex<std::collections::VecDeque<u64>>>;

/// What the instruction just executed holds off until after the next one.
#[derive(Debug, Default, Clone, Copy)]
struct Shadow {
    /// Maskable interrupts (after STI that set IF, and after MOV SS/POP SS).
    interrupts: bool,
    /// A pending single-step trap (after MOV SS/POP SS with TF set).
    trap: bool,
}

/// The `--trace` log: one line per instruction with the registers it changed.
struct Tracer {
    out: Box<dyn std::io::Write + Send>,
    formatter: iced_x86::IntelFormatter,
    failed: bool,
}

impl Interp {
    /// An interpreter over `memory` starting in `initial` state.
    pub fn new(memory: Arc<GuestMemory>, initial: InitialCpu) -> Self {
        let cpu = match initial {
            InitialCpu::Reset => CpuState::reset(),
            InitialCpu::Flat32 {
                eip,
                eax,
                ebx,
                esi,
                gdt_base,
                gdt_limit,
                code_selector,
                data_selector,
            } => {
                let mut cpu = CpuState::reset();
                cpu.cr0 = cr0::PE | cr0::ET;
                cpu.eip = eip;
                cpu.gpr = [0; 8];
                cpu.gpr[0] = eax;
                cpu.gpr[3] = ebx;
                cpu.gpr[6] = esi;
                cpu.gdtr = TableReg {
                    base: gdt_base,
                    limit: gdt_limit,
                };
                cpu.idtr = TableReg::default();
                cpu.seg = [Segment::flat(data_selector, 0x93); 6];
                cpu.seg[SegReg::Cs as usize] = Segment::flat(code_selector, 0x9B);
                cpu
            }
        };
        Self {
            cpu,
            memory,
            instructions: 0,
            exceptions: 0,
            first_event: None,
            clock: Arc::new(HostClock::new()),
            tsc_offset: 0,
            tlb: RefCell::default(),
            pdptes: [0; 4],
            interrupts: 0,
            trace: None,
            shadow: Shadow::default(),
            trap_suppressed: false,
            data_hits: Cell::new(0),
            device_access: Cell::new(false),
            fpu: fpu::FpuUnit::default(),
            tsc_tape: None,
            undefined_flags: None,
            decoded: RefCell::default(),
            loaded: [0; 6],
        }
    }

    /// Makes the TSC count `clock` (the VM's device clock) instead of the host's monotonic
    /// clock from the interpreter's creation.
    pub fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.clock = clock;
    }

    /// Appends every TSC value this interpreter reads (RDTSC, RDMSR) to `tape`.
    pub fn record_tsc(&mut self, tape: TscTape) {
        self.tsc_tape = Some((false, tape));
    }

    /// Takes TSC reads from `tape` (in order) instead of the clock, while it has any.
    pub fn replay_tsc(&mut self, tape: TscTape) {
        self.tsc_tape = Some((true, tape));
    }

    /// Starts noting which EFLAGS bits the executed instructions leave undefined (the SDM's
    /// "undefined" flags, which CPUs set differently), for [`Interp::take_undefined_flags`].
    pub fn track_undefined_flags(&mut self) {
        self.undefined_flags = Some(0);
    }

    /// The EFLAGS bits whose value the instructions executed since the last call left
    /// undefined (and no later one defined again).
    pub fn take_undefined_flags(&mut self) -> u32 {
        self.undefined_flags.as_mut().map_or(0, std::mem::take)
    }

    /// The CPU state.
    pub fn cpu(&self) -> &CpuState {
        &self.cpu
    }

    /// Logs every instruction to `out`: address, disassembly, and the registers it changed.
    pub fn set_trace(&mut self, out: Box<dyn std::io::Write + Send>) {
        use iced_x86::Formatter;
        let mut formatter = iced_x86::IntelFormatter::new();
        formatter.options_mut().set_hex_prefix("0x");
        formatter.options_mut().set_hex_suffix("");
        self.trace = Some(Tracer {
            out,
            formatter,
            failed: false,
        });
    }

    fn trace_line(&mut self, ins: &Instruction, before: &CpuState, fault: Option<&Fault>) {
        use iced_x86::Formatter;
        use std::fmt::Write as _;
        let Some(t) = self.trace.as_mut() else {
            return;
        };
        let mut text = String::new();
        t.formatter.format(ins, &mut text);
        let mut line = format!(
            "{:04x}:{:08x}  {:<40}",
            before.seg(SegReg::Cs).selector,
            before.eip,
            text
        );
        const NAMES: [&str; 8] = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"];
        for (i, name) in NAMES.iter().enumerate() {
            if self.cpu.gpr[i] != before.gpr[i] {
                let _ = write!(line, " {name}={:08x}", self.cpu.gpr[i]);
            }
        }
        if self.cpu.eflags != before.eflags {
            let _ = write!(line, " eflags={:08x}", self.cpu.eflags);
        }
        for (i, name) in ["es", "cs", "ss", "ds", "fs", "gs"].iter().enumerate() {
            if self.cpu.seg[i].selector != before.seg[i].selector {
                let _ = write!(line, " {name}={:04x}", self.cpu.seg[i].selector);
            }
        }
        for (name, new, old) in [
            ("cr0", self.cpu.cr0, before.cr0),
            ("cr2", self.cpu.cr2, before.cr2),
            ("cr3", self.cpu.cr3, before.cr3),
            ("cr4", self.cpu.cr4, before.cr4),
        ] {
            if new != old {
                let _ = write!(line, " {name}={new:08x}");
            }
        }
        match fault {
            Some(Fault::Exception(v, code)) => {
                let _ = write!(line, " => exception {v}");
                if let Some(c) = code {
                    let _ = write!(line, " ({c:#x})");
                }
            }
            Some(Fault::Page { linear, error }) => {
                let _ = write!(line, " => #PF at {linear:08x} ({error:#x})");
            }
            Some(Fault::Unsupported(what)) => {
                let _ = write!(line, " => cannot execute {what}");
            }
            None => {}
        }
        line.truncate(line.trim_end().len());
        line.push('\n');
        if !t.failed && t.out.write_all(line.as_bytes()).is_err() {
            t.failed = true;
            tracing::warn!("the instruction trace could not be written; tracing stops");
        }
    }

    /// Whether a maskable interrupt can be taken now: IF set and no STI/MOV SS shadow.
    pub fn interrupt_window(&self) -> bool {
        self.cpu.eflags & flags::IF != 0 && !self.shadow.interrupts
    }

    /// Delivers external interrupt `vector` (from the interrupt controller) at the current
    /// instruction boundary. Returns a VM exit if delivery ended in a shutdown.
    pub fn inject_interrupt(
        &mut self,
        vector: u8,
        io: &mut dyn IoHandler,
    ) -> Result<Option<VmExit>, InterpError> {
        self.interrupts += 1;
        match self.deliver(vector, None, Event::External, io) {
            Ok(()) => Ok(None),
            Err(Fault::Unsupported(what)) => Err(InterpError::Unsupported {
                what,
                regs: self.registers(),
            }),
            Err(Fault::Exception(v, code)) => self.raise(v, code, io),
            Err(Fault::Page { linear, error }) => {
                self.cpu.cr2 = linear;
                self.raise(vector::PF, Some(error), io)
            }
        }
    }

    /// The descriptor (8 bytes, accessed bit as the load left it) segment register `s` was last
    /// loaded from by a protected-mode MOV or POP to it (or LDS-style and task-switch loads that
    /// share that code), or 0. A cache for the translator's reload fast path, which must check
    /// it still explains the register: it is not updated by anything else that changes the
    /// register (real-mode loads, far transfers, state set from outside).
    pub fn loaded_descriptor(&self, s: SegReg) -> u64 {
        self.loaded[s as usize]
    }

    /// The CPU state, for setting up tests and snippets.
    pub fn cpu_mut(&mut self) -> &mut CpuState {
        &mut self.cpu
    }

    /// The first exception raised since the interpreter was created, if any.
    /// The first exception or software interrupt raised since the interpreter was created,
    /// with the EIP its handler would see (the faulting instruction for faults, the next one
    /// for traps and INT n).
    pub fn first_event(&self) -> Option<(u8, u32)> {
        self.first_event
    }

    /// Guest instructions executed, exceptions raised (delivery attempts), external interrupts
    /// delivered and floating-point instructions run on the host FPU so far.
    pub fn counters(&self) -> [(&'static str, u64); 4] {
        [
            ("guest instructions", self.instructions),
            ("exceptions raised", self.exceptions),
            ("interrupts delivered", self.interrupts),
            ("instructions run on the host FPU", self.fpu.executed),
        ]
    }

    /// The registers, for reports.
    pub fn registers(&self) -> GuestRegisters {
        let c = &self.cpu;
        GuestRegisters {
            gpr: c.gpr,
            eip: c.eip,
            eflags: c.eflags,
            cs: c.seg(SegReg::Cs).selector,
            cs_base: c.seg(SegReg::Cs).base,
            cr0: c.cr0,
            cr3: c.cr3,
        }
    }

    /// Runs until an instruction needs the VM's attention.
    pub fn run(&mut self, io: &mut dyn IoHandler) -> Result<VmExit, InterpError> {
        loop {
            let (exit, completed) = self.instruction(io)?;
            if let Some(exit) = exit {
                return Ok(exit);
            }
            // Let the VM look at its timers now and then, even in a busy loop.
            if completed && self.instructions.is_multiple_of(YIELD_INSTRUCTIONS) {
                return Ok(VmExit::Interrupted);
            }
        }
    }

    /// Executes exactly one instruction with its full semantics: breakpoints, faults delivered
    /// through the guest's IDT, single-step and data-breakpoint traps. Returns the VM exit it
    /// causes, if any. The binary translator's callouts and precise faults go through here.
    pub fn step_one(&mut self, io: &mut dyn IoHandler) -> Result<Option<VmExit>, InterpError> {
        Ok(self.instruction(io)?.0)
    }

    /// The TLB flushes (CR3 loads, INVLPG) since the last call, for the bt engine's shadow
    /// page tables.
    pub fn take_tlb_events(&mut self) -> Vec<TlbEvent> {
        std::mem::take(&mut self.tlb.borrow_mut().events)
    }

    /// The PAE page-directory-pointer entries loaded with CR3.
    pub fn pdptes(&self) -> [u64; 4] {
        self.pdptes
    }

    /// Holds interrupts off for the next instruction, as after an STI that set IF (the bt
    /// engine's inline STI leaves the instruction in its shadow to the interpreter).
    pub fn begin_sti_shadow(&mut self) {
        self.shadow.interrupts = true;
    }

    /// Whether the next instruction runs in an interrupt shadow (after STI, MOV SS or POP SS)
    /// or with a delayed single-step trap pending.
    pub fn in_shadow(&self) -> bool {
        self.shadow.interrupts || self.shadow.trap
    }

    /// One instruction: its exit, and whether it completed (rather than faulted).
    fn instruction(
        &mut self,
        io: &mut dyn IoHandler,
    ) -> Result<(Option<VmExit>, bool), InterpError> {
        let start_eip = self.cpu.eip;
        let cs_base = self.cpu.seg(SegReg::Cs).base;
        let hits = self.instruction_breakpoints(cs_base.wrapping_add(start_eip));
        if hits != 0 {
            // An instruction breakpoint is a fault: EIP stays on the instruction.
            self.cpu.dr[6] = (self.cpu.dr[6] & !0xF) | hits;
            return Ok((self.raise(vector::DB, None, io)?, false));
        }
        self.data_hits.set(0);
        self.device_access.set(false);
        let single_step = self.cpu.eflags & flags::TF != 0;
        let delayed = std::mem::take(&mut self.shadow);
        self.trap_suppressed = false;
        match self.step(io) {
            Ok(exit) => {
                // Debug traps after the instruction, in one #DB reporting every cause:
                // single-step if TF was set before it (not after a software interrupt,
                // which clears TF, and one instruction late after MOV/POP SS), and the
                // data breakpoints it hit.
                let step_trap = (single_step || delayed.trap) && !self.trap_suppressed;
                let mut dr6 = self.data_hits.take();
                if step_trap && !self.shadow.trap {
                    dr6 |= 1 << 14; // DR6.BS
                } else if step_trap {
                    self.shadow.trap = true;
                }
                if dr6 != 0 {
                    self.cpu.dr[6] = (self.cpu.dr[6] & !0xF) | dr6;
                    if let Some(shutdown) = self.raise(vector::DB, None, io)? {
                        return Ok((Some(shutdown), true));
                    }
                }
                let exit = exit.or_else(|| self.device_access.get().then_some(VmExit::Io));
                Ok((exit, true))
            }
            Err(Fault::Exception(v, code)) => {
                self.cpu.eip = start_eip;
                Ok((self.raise(v, code, io)?, false))
            }
            Err(Fault::Page { linear, error }) => {
                self.cpu.eip = start_eip;
                self.cpu.cr2 = linear;
                Ok((self.raise(vector::PF, Some(error), io)?, false))
            }
            Err(Fault::Unsupported(what)) => {
                self.cpu.eip = start_eip;
                Err(InterpError::Unsupported {
                    what,
                    regs: self.registers(),
                })
            }
        }
    }

    /// Delivers exception `v`, escalating to #DF and to shutdown when delivery itself faults.
    fn raise(
        &mut self,
        v: u8,
        code: Option<u32>,
        io: &mut dyn IoHandler,
    ) -> Result<Option<VmExit>, InterpError> {
        let (mut v, mut code) = (v, code);
        self.first_event.get_or_insert((v, self.cpu.eip));
        loop {
            self.exceptions += 1;
            match self.deliver(v, code, Event::Exception, io) {
                Ok(()) => return Ok(None),
                Err(Fault::Unsupported(what)) => {
                    return Err(InterpError::Unsupported {
                        what,
                        regs: self.registers(),
                    });
                }
                Err(fault @ (Fault::Exception(..) | Fault::Page { .. })) => {
                    let (second, second_code) = match fault {
                        Fault::Page { linear, error } => {
                            self.cpu.cr2 = linear;
                            (vector::PF, Some(error))
                        }
                        Fault::Exception(v, c) => (v, c),
                        Fault::Unsupported(_) => unreachable!("matched above"),
                    };
                    if v == vector::DF {
                        return Ok(Some(VmExit::Shutdown));
                    }
                    if double_fault(v, second) {
                        (v, code) = (vector::DF, Some(0));
                    } else {
                        (v, code) = (second, second_code);
                    }
                }
            }
        }
    }

    // ---- memory -------------------------------------------------------------------------

    fn read_phys(&self, addr: u64, buf: &mut [u8], io: &mut dyn IoHandler) {
        if self.memory.read(addr, buf).is_ok() {
            return;
        }
        let backed = |a: u64| self.memory.layout().region_of(a & 0xFFFF_FFFF, 1).is_some();
        self.device_access.set(true);
        if !(0..buf.len()).any(|i| backed(addr + i as u64)) {
            // Entirely device memory: one access of the full width, as the CPU makes it.
            io.mmio_read(addr, buf);
            return;
        }
        for (i, b) in buf.iter_mut().enumerate() {
            let a = (addr + i as u64) & 0xFFFF_FFFF;
            let mut one = [0u8];
            if self.memory.read(a, &mut one).is_err() {
                io.mmio_read(a, &mut one);
            }
            *b = one[0];
        }
    }

    fn write_phys(&self, addr: u64, data: &[u8], io: &mut dyn IoHandler) {
        let ram = |a: u64, len: usize| {
            self.memory
                .layout()
                .region_of(a, len)
                .is_some_and(|r| r.kind == RegionKind::Ram)
        };
        if ram(addr, data.len()) {
            let _ = self.memory.write(addr, data);
            return;
        }
        self.device_access.set(true);
        if !(0..data.len()).any(|i| ram((addr + i as u64) & 0xFFFF_FFFF, 1)) {
            // Entirely outside RAM (device memory, or the read-only firmware area).
            io.mmio_write(addr, data);
            return;
        }
        for (i, b) in data.iter().enumerate() {
            let a = (addr + i as u64) & 0xFFFF_FFFF;
            if ram(a, 1) {
                let _ = self.memory.write(a, &[*b]);
            } else {
                io.mmio_write(a, &[*b]);
            }
        }
    }

    fn paging(&self) -> bool {
        self.cpu.cr0 & cr0::PG != 0
    }

    /// Empties the TLB; with `keep_global`, translations marked global survive (a CR3 load).
    fn flush_tlb(&self, keep_global: bool) {
        let mut tlb = self.tlb.borrow_mut();
        tlb.note(if keep_global {
            TlbEvent::Cr3Load
        } else {
            TlbEvent::All
        });
        if keep_global {
            tlb.entries.retain(|_, e| e.global);
        } else {
            tlb.entries.clear();
            tlb.has_large = false;
        }
    }

    /// INVLPG: drops the translation of the page holding `linear` (all of them if a large page
    /// might cover it).
    fn invalidate_page(&self, linear: u32) {
        let mut tlb = self.tlb.borrow_mut();
        tlb.note(TlbEvent::Invlpg(linear));
        if tlb.has_large {
            tlb.entries.clear();
            tlb.has_large = false;
        } else {
            tlb.entries.remove(&(linear >> 12));
        }
    }

    /// Translates `linear` for an access, through the TLB or a page walk.
    fn translate(&self, linear: u32, write: bool, user: bool) -> Step<u64> {
        if !self.paging() {
            return Ok(u64::from(linear));
        }
        let wp = self.cpu.cr0 & cr0::WP != 0;
        let page = linear >> 12;
        let offset = u64::from(linear & 0xFFF);
        if let Some(e) = self.tlb.borrow().entries.get(&page) {
            let allowed = (!user || e.user) && (!write || e.writable || (!user && !wp));
            if allowed && (!write || e.dirty) {
                return Ok(e.frame | offset);
            }
        }
        let mode = pagewalk::Mode {
            cr3: self.cpu.cr3,
            pae: self.cpu.cr4 & cr4::PAE != 0,
            pse: self.cpu.cr4 & cr4::PSE != 0,
            wp,
            pge: self.cpu.cr4 & cr4::PGE != 0,
        };
        let access = pagewalk::Access { write, user };
        let t = pagewalk::walk(
            &mut WalkMem(&self.memory),
            mode,
            &self.pdptes,
            linear,
            access,
        )
        .map_err(|pf| Fault::Page {
            linear,
            error: pf.error,
        })?;
        let mut tlb = self.tlb.borrow_mut();
        if tlb.entries.len() >= TLB_CAPACITY {
            tlb.entries.clear();
            tlb.has_large = false;
        }
        tlb.has_large |= t.page_size > 4096;
        tlb.entries.insert(
            page,
            TlbEntry {
                frame: t.frame,
                user: t.user,
                writable: t.writable,
                dirty: t.dirty,
                global: t.global,
            },
        );
        Ok(t.phys)
    }

    /// The pieces of `linear..linear+len` that lie in one page each: (linear, length).
    fn page_pieces(linear: u32, len: usize) -> impl Iterator<Item = (u32, usize)> {
        let mut at = 0usize;
        std::iter::from_fn(move || {
            if at >= len {
                return None;
            }
            let lin = linear.wrapping_add(at as u32);
            let n = (4096 - (lin & 0xFFF) as usize).min(len - at);
            at += n;
            Some((lin, n))
        })
    }

    /// Reads linear memory (through paging when it is on). `user` marks a CPL 3 access.
    fn read_lin(&self, linear: u32, buf: &mut [u8], user: bool, io: &mut dyn IoHandler) -> Step {
        self.watch(linear, buf.len(), false);
        self.read_lin_unwatched(linear, buf, user, io)
    }

    /// Like [`Interp::read_lin`], for instruction fetches (which data breakpoints ignore).
    fn read_lin_unwatched(
        &self,
        linear: u32,
        buf: &mut [u8],
        user: bool,
        io: &mut dyn IoHandler,
    ) -> Step {
        let mut at = 0;
        for (lin, n) in Self::page_pieces(linear, buf.len()) {
            let phys = self.translate(lin, false, user)?;
            self.read_phys(phys, &mut buf[at..at + n], io);
            at += n;
        }
        Ok(())
    }

    /// Writes linear memory; every page is translated (and may fault) before any byte is
    /// written, so a faulting write changes nothing.
    fn write_lin(&self, linear: u32, data: &[u8], user: bool, io: &mut dyn IoHandler) -> Step {
        self.watch(linear, data.len(), true);
        let mut phys = [(0u64, 0usize); 4];
        let mut count = 0;
        for (lin, n) in Self::page_pieces(linear, data.len()) {
            if count == phys.len() {
                return unsupported("a write spanning more than four pages");
            }
            phys[count] = (self.translate(lin, true, user)?, n);
            count += 1;
        }
        let mut at = 0;
        for (p, n) in &phys[..count] {
            self.write_phys(*p, &data[at..at + n], io);
            at += n;
        }
        Ok(())
    }

    /// The enabled breakpoints of DR7 with their R/W kind: (index, kind, first, last byte).
    fn breakpoints(&self) -> impl Iterator<Item = (usize, u32, u32, u32)> + '_ {
        let dr7 = self.cpu.dr[7];
        (0..4).filter_map(move |i| {
            if dr7 & (3 << (2 * i)) == 0 {
                return None;
            }
            let kind = (dr7 >> (16 + 4 * i)) & 3;
            let len = [1u32, 2, 8, 4][((dr7 >> (18 + 4 * i)) & 3) as usize];
            let first = self.cpu.dr[i] & !(len - 1);
            Some((i, kind, first, first.wrapping_add(len - 1)))
        })
    }

    /// Records the data breakpoints an access of `len` bytes at `linear` hits.
    fn watch(&self, linear: u32, len: usize, write: bool) {
        if self.cpu.dr[7] & 0xFF == 0 || len == 0 {
            return;
        }
        let last = linear.wrapping_add(len as u32 - 1);
        for (i, kind, first, bp_last) in self.breakpoints() {
            let applies = kind == 0b11 || (kind == 0b01 && write);
            if applies && linear <= bp_last && first <= last {
                self.data_hits.set(self.data_hits.get() | (1 << i));
            }
        }
    }

    /// Records the I/O breakpoints (DR7 R/W = 10, only with CR4.DE) an access of `len` bytes at
    /// `port` hits; like data breakpoints they trap after the instruction.
    fn watch_port(&self, port: u16, len: usize) {
        if self.cpu.dr[7] & 0xFF == 0 || self.cpu.cr4 & cr4::DE == 0 {
            return;
        }
        let (first_port, last_port) = (u32::from(port), u32::from(port) + len as u32 - 1);
        for (i, kind, first, last) in self.breakpoints() {
            if kind == 0b10 && first_port <= last && first <= last_port {
                self.data_hits.set(self.data_hits.get() | (1 << i));
            }
        }
    }

    /// The instruction breakpoints matching the instruction at `linear` (as DR6 B bits).
    fn instruction_breakpoints(&self, linear: u32) -> u32 {
        if self.cpu.dr[7] & 0xFF == 0 || self.cpu.eflags & flags::RF != 0 {
            return 0;
        }
        self.breakpoints()
            .filter(|(_, kind, first, _)| *kind == 0 && *first == linear)
            .fold(0, |bits, (i, ..)| bits | (1 << i))
    }

    fn user_access(&self) -> bool {
        self.cpu.cpl() == 3
    }

    /// Checks `offset..offset+len` against segment `s` and returns the linear address.
    fn linear(&self, s: SegReg, offset: u32, len: u32) -> Step<u32> {
        let seg = self.cpu.seg(s);
        let last = u64::from(offset) + u64::from(len) - 1;
        let expand_down = seg.access & 0x1C == 0x14; // data segment, E bit
        let ok = if expand_down {
            let top = if seg.big { 0xFFFF_FFFF } else { 0xFFFF };
            u64::from(offset) > u64::from(seg.limit) && last <= top
        } else {
            last <= u64::from(seg.limit)
        };
        if !ok {
            let v = if s == SegReg::Ss {
                vector::SS
            } else {
                vector::GP
            };
            return Err(Fault::Exception(v, Some(0)));
        }
        let lin = seg.base.wrapping_add(offset);
        // Alignment check (SDM vol. 3, 6.15 "#AC"): words, doublewords and quadwords at CPL 3
        // (v8086 included) with CR0.AM and EFLAGS.AC, before the page walk.
        if matches!(len, 2 | 4 | 8)
            && lin & (len - 1) != 0
            && self.cpu.cr0 & cr0::AM != 0
            && self.cpu.eflags & flags::AC != 0
            && self.cpu.cpl() == 3
        {
            return Err(Fault::Exception(vector::AC, Some(0)));
        }
        Ok(lin)
    }

    fn read_mem(&self, s: SegReg, offset: u32, len: u32, io: &mut dyn IoHandler) -> Step<u32> {
        if !(1..=4).contains(&len) {
            return unsupported(format!("a {len}-byte memory access"));
        }
        let lin = self.linear(s, offset, len)?;
        let mut b = [0u8; 4];
        self.read_lin(lin, &mut b[..len as usize], self.user_access(), io)?;
        Ok(u32::from_le_bytes(b))
    }

    fn write_mem(&self, s: SegReg, offset: u32, len: u32, v: u32, io: &mut dyn IoHandler) -> Step {
        if !(1..=4).contains(&len) {
            return unsupported(format!("a {len}-byte memory access"));
        }
        let lin = self.linear(s, offset, len)?;
        self.write_lin(
            lin,
            &v.to_le_bytes()[..len as usize],
            self.user_access(),
            io,
        )
    }

    fn stack_big(&self) -> bool {
        self.cpu.seg(SegReg::Ss).big
    }

    fn sp(&self) -> u32 {
        if self.stack_big() {
            self.cpu.gpr[4]
        } else {
            self.cpu.gpr[4] & 0xFFFF
        }
    }

    fn set_sp(&mut self, v: u32) {
        if self.stack_big() {
            self.cpu.gpr[4] = v;
        } else {
            self.cpu.gpr[4] = (self.cpu.gpr[4] & 0xFFFF_0000) | (v & 0xFFFF);
        }
    }

    fn push(&mut self, v: u32, len: u32, io: &mut dyn IoHandler) -> Step {
        let sp = self.sp().wrapping_sub(len);
        let sp = if self.stack_big() { sp } else { sp & 0xFFFF };
        self.write_mem(SegReg::Ss, sp, len, v, io)?;
        self.set_sp(sp);
        Ok(())
    }

    fn pop(&mut self, len: u32, io: &mut dyn IoHandler) -> Step<u32> {
        let sp = self.sp();
        let v = self.read_mem(SegReg::Ss, sp, len, io)?;
        self.set_sp(sp.wrapping_add(len));
        Ok(v)
    }

    // ---- registers and operands ---------------------------------------------------------

    fn reg(&self, r: Register) -> u32 {
        let n = r.number();
        if r.is_gpr8() {
            if n < 4 {
                self.cpu.gpr[n] & 0xFF
            } else {
                (self.cpu.gpr[n - 4] >> 8) & 0xFF
            }
        } else if r.is_gpr16() {
            self.cpu.gpr[n] & 0xFFFF
        } else if r.is_gpr32() {
            self.cpu.gpr[n]
        } else if r.is_segment_register() {
            u32::from(self.cpu.seg[n].selector)
        } else {
            0
        }
    }

    fn set_reg(&mut self, r: Register, v: u32) {
        let n = r.number();
        let g = &mut self.cpu.gpr;
        if r.is_gpr8() {
            if n < 4 {
                g[n] = (g[n] & !0xFF) | (v & 0xFF);
            } else {
                g[n - 4] = (g[n - 4] & !0xFF00) | ((v & 0xFF) << 8);
            }
        } else if r.is_gpr16() {
            g[n] = (g[n] & !0xFFFF) | (v & 0xFFFF);
        } else {
            g[n] = v;
        }
    }

    /// Segment and offset of the instruction's memory operand.
    fn address(&self, ins: &Instruction) -> (SegReg, u32) {
        let base = ins.memory_base();
        let index = ins.memory_index();
        let mut off = ins.memory_displacement32();
        if base != Register::None {
            off = off.wrapping_add(self.reg(base));
        }
        if index != Register::None {
            off = off.wrapping_add(self.reg(index).wrapping_mul(ins.memory_index_scale()));
        }
        let addr16 = base.is_gpr16()
            || index.is_gpr16()
            || (base == Register::None && index == Register::None && ins.memory_displ_size() == 2);
        if addr16 {
            off &= 0xFFFF;
        }
        (seg_of(ins.memory_segment()), off)
    }

    /// Size in bytes of operand `i`.
    fn op_size(ins: &Instruction, i: u32) -> u32 {
        match ins.op_kind(i) {
            OpKind::Register => ins.op_register(i).size() as u32,
            OpKind::Memory => ins.memory_size().size() as u32,
            OpKind::Immediate8 => 1,
            OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
            _ => 4,
        }
    }

    fn read_op(&self, ins: &Instruction, i: u32, io: &mut dyn IoHandler) -> Step<u32> {
        Ok(match ins.op_kind(i) {
            OpKind::Register => self.reg(ins.op_register(i)),
            OpKind::Memory => {
                let (s, off) = self.address(ins);
                self.read_mem(s, off, Self::op_size(ins, i), io)?
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32 => ins.immediate(i) as u32,
            OpKind::Immediate8_2nd => u32::from(ins.immediate8_2nd()),
            k => return unsupported(format!("operand kind {k:?} of {ins}")),
        })
    }

    fn write_op(&mut self, ins: &Instruction, i: u32, v: u32, io: &mut dyn IoHandler) -> Step {
        match ins.op_kind(i) {
            OpKind::Register => {
                let r = ins.op_register(i);
                if r.is_segment_register() {
                    return self.load_segment(seg_of(r), v as u16, io);
                }
                self.set_reg(r, v);
                Ok(())
            }
            OpKind::Memory => {
                let (s, off) = self.address(ins);
                self.write_mem(s, off, Self::op_size(ins, 0), v, io)
            }
            k => unsupported(format!("destination kind {k:?} of {ins}")),
        }
    }

    // ---- segments and descriptor tables -------------------------------------------------

    fn descriptor(&self, selector: u16, io: &mut dyn IoHandler) -> Step<u64> {
        let index = u32::from(selector & !7);
        let (base, limit) = if selector & 4 != 0 {
            let ldt = &self.cpu.ldtr;
            if !ldt.present() {
                return Err(Fault::Exception(vector::GP, Some(u32::from(selector & !3))));
            }
            (ldt.base, ldt.limit)
        } else {
            (self.cpu.gdtr.base, u32::from(self.cpu.gdtr.limit))
        };
        if index + 7 > limit {
            return Err(Fault::Exception(vector::GP, Some(u32::from(selector & !3))));
        }
        let mut d = [0u8; 8];
        self.read_lin(base.wrapping_add(index), &mut d, false, io)?;
        Ok(u64::from_le_bytes(d))
    }

    /// The linear address of the descriptor `selector` names (in the GDT or the LDT); its
    /// table-limit check is [`Interp::descriptor`]'s.
    fn descriptor_address(&self, selector: u16) -> u32 {
        let base = if selector & 4 != 0 {
            self.cpu.ldtr.base
        } else {
            self.cpu.gdtr.base
        };
        base.wrapping_add(u32::from(selector & !7))
    }

    /// MOV/POP to a data or stack segment register.
    fn load_segment(&mut self, s: SegReg, selector: u16, io: &mut dyn IoHandler) -> Step {
        if !self.cpu.protected() || self.cpu.eflags & flags::VM != 0 {
            let access = self.cpu.seg(s).access;
            self.cpu.seg[s as usize] = Segment::real(selector, access);
            self.loaded[s as usize] = 0;
            return Ok(());
        }
        if s == SegReg::Cs {
            return Err(Fault::Exception(vector::UD, None));
        }
        if selector & !3 == 0 {
            if s == SegReg::Ss {
                return gp0();
            }
            self.cpu.seg[s as usize] = Segment {
                selector,
                ..Segment::default()
            };
            self.loaded[s as usize] = 0;
            return Ok(());
        }
        let mut raw = self.descriptor(selector, io)?;
        let seg = Segment::from_descriptor(selector, raw);
        let code = seg.access & 0x08 != 0;
        let readable = !code || seg.access & 0x02 != 0;
        let writable_data = !code && seg.access & 0x02 != 0;
        let err = Some(u32::from(selector & !3));
        let (cpl, rpl, dpl) = (self.cpu.cpl(), (selector & 3) as u8, seg.dpl());
        let conforming_code = code && seg.access & 0x04 != 0;
        let privilege_ok = if s == SegReg::Ss {
            rpl == cpl && dpl == cpl
        } else {
            conforming_code || (dpl >= cpl && dpl >= rpl)
        };
        if seg.access & 0x10 == 0
            || (s == SegReg::Ss && !writable_data)
            || !readable
            || !privilege_ok
        {
            return Err(Fault::Exception(vector::GP, err));
        }
        if !seg.present() {
            let v = if s == SegReg::Ss {
                vector::SS
            } else {
                vector::NP
            };
            return Err(Fault::Exception(v, err));
        }
        // A load sets the descriptor's accessed bit in the table (Intel SDM vol. 3, 3.4.5.1),
        // a write the load faults on if it cannot be made.
        if raw & ACCESSED == 0 {
            raw |= ACCESSED;
            let at = self.descriptor_address(selector).wrapping_add(5);
            self.write_lin(at, &[(raw >> 40) as u8], false, io)?;
        }
        self.cpu.seg[s as usize] = Segment::from_descriptor(selector, raw);
        self.loaded[s as usize] = raw;
        Ok(())
    }

    /// Reads the far pointer (offset, then selector) of an indirect far JMP/CALL: returns
    /// (selector, offset, operand size).
    fn far_pointer(&self, ins: &Instruction, io: &mut dyn IoHandler) -> Step<(u16, u32, u32)> {
        let size = if ins.memory_size().size() == 4 { 2 } else { 4 };
        let (seg, off) = self.address(ins);
        let offset = self.read_mem(seg, off, size, io)?;
        let selector = self.read_mem(seg, off.wrapping_add(size), 2, io)? as u16;
        Ok((selector, offset, size))
    }

    /// Delivers interrupt or exception `v` through the IVT (real mode) or IDT (protected mode).
    /// `event` says what raised it (and, for INT n, the return address).
    fn deliver(&mut self, v: u8, code: Option<u32>, event: Event, io: &mut dyn IoHandler) -> Step {
        let software = matches!(event, Event::Software(_));
        let ret = match event {
            Event::Software(next) | Event::Icebp(next) => next,
            _ => self.cpu.eip,
        };
        if !self.cpu.protected() {
            let entry = u32::from(v) * 4;
            if entry + 3 > u32::from(self.cpu.idtr.limit) {
                return gp0();
            }
            let mut e = [0u8; 4];
            self.read_lin(self.cpu.idtr.base.wrapping_add(entry), &mut e, false, io)?;
            let cs = self.cpu.seg(SegReg::Cs).selector;
            self.push(self.cpu.eflags & 0xFFFF, 2, io)?;
            self.push(u32::from(cs), 2, io)?;
            self.push(ret & 0xFFFF, 2, io)?;
            self.cpu.eflags &= !(flags::IF | flags::TF | flags::AC);
            self.cpu.seg[SegReg::Cs as usize] =
                Segment::real(u16::from_le_bytes([e[2], e[3]]), 0x9B);
            self.cpu.eip = u32::from(u16::from_le_bytes([e[0], e[1]]));
            return Ok(());
        }
        let ext = u32::from(!software);
        let idt_err = Some(u32::from(v) * 8 + 2 + ext);
        let entry = u32::from(v) * 8;
        if entry + 7 > u32::from(self.cpu.idtr.limit) {
            return Err(Fault::Exception(vector::GP, idt_err));
        }
        let mut g = [0u8; 8];
        self.read_lin(self.cpu.idtr.base.wrapping_add(entry), &mut g, false, io)?;
        let gate = u64::from_le_bytes(g);
        let gate_type = ((gate >> 40) & 0x1F) as u8;
        let gate_dpl = ((gate >> 45) & 3) as u8;
        let present = gate & (1 << 47) != 0;
        // (trap gate, push size): 286 gates push 16-bit frames and jump to a 16-bit offset.
        let (trap, size) = match gate_type {
            0x0E => (false, 4),
            0x0F => (true, 4),
            0x06 => (false, 2),
            0x07 => (true, 2),
            0x05 => {
                if software && gate_dpl < self.cpu.cpl() {
                    return Err(Fault::Exception(vector::GP, idt_err));
                }
                if !present {
                    return Err(Fault::Exception(vector::NP, idt_err));
                }
                let tss = (gate >> 16) as u16;
                return self.task_switch(tss, transfer::TaskSwitch::Interrupt, ret, code, io);
            }
            _ => return Err(Fault::Exception(vector::GP, idt_err)),
        };
        if software && gate_dpl < self.cpu.cpl() {
            return Err(Fault::Exception(vector::GP, idt_err));
        }
        if !present {
            return Err(Fault::Exception(vector::NP, idt_err));
        }
        let selector = (gate >> 16) as u16;
        let mut offset = (gate & 0xFFFF) as u32;
        if size == 4 {
            offset |= (gate >> 32) as u32 & 0xFFFF_0000;
        }
        if selector & !3 == 0 {
            return gp0();
        }
        let target = Segment::from_descriptor(selector, self.descriptor(selector, io)?);
        let target_dpl = (target.access >> 5) & 3;
        if target.access & 0x18 != 0x18 {
            return Err(Fault::Exception(vector::GP, Some(u32::from(selector & !3))));
        }
        if target_dpl > self.cpu.cpl() {
            return Err(Fault::Exception(vector::GP, Some(u32::from(selector & !3))));
        }
        if !target.present() {
            return Err(Fault::Exception(vector::NP, Some(u32::from(selector & !3))));
        }
        let eflags = if event == Event::Exception && fault_class(v) {
            self.cpu.eflags | flags::RF
        } else {
            self.cpu.eflags & !flags::RF
        };
        let handler = transfer::Handler {
            target,
            offset,
            size,
        };
        self.enter_handler(handler, eflags, ret, code, io)?;
        self.cpu.eflags &= !(flags::TF | flags::NT | flags::RF | flags::VM);
        if !trap {
            self.cpu.eflags &= !flags::IF;
        }
        Ok(())
    }

    // ---- the instruction loop -----------------------------------------------------------

    fn fetch(&self, io: &mut dyn IoHandler) -> Step<Instruction> {
        let cs = *self.cpu.seg(SegReg::Cs);
        let bitness = if cs.big { 32 } else { 16 };
        let mut bytes = [0u8; 15];
        // Fetch what the CS limit allows (a shorter fetch that cuts an instruction is #GP).
        let room = u64::from(cs.limit) + 1 - u64::from(self.cpu.eip).min(u64::from(cs.limit) + 1);
        let n = room.min(15) as usize;
        if n == 0 {
            return gp0();
        }
        let lin = cs.base.wrapping_add(self.cpu.eip);
        let user = self.user_access();
        // The bytes in the first page are needed; the next page only if the instruction
        // continues into it (a fault there is reported only then).
        let first = (4096 - (lin & 0xFFF) as usize).min(n);
        self.read_lin_unwatched(lin, &mut bytes[..first], user, io)?;
        let mut avail = first;
        let mut second_fault = None;
        if n > first {
            match self.read_lin_unwatched(
                lin.wrapping_add(first as u32),
                &mut bytes[first..n],
                user,
                io,
            ) {
                Ok(()) => avail = n,
                Err(f) => second_fault = Some(f),
            }
        }
        let eip = self.cpu.eip;
        if let Some(ins) = self.decoded.borrow().get(eip, bitness, &bytes[..avail]) {
            return Ok(ins);
        }
        let mut d = Decoder::with_ip(
            bitness,
            &bytes[..avail],
            u64::from(eip),
            DecoderOptions::NONE,
        );
        let ins = d.decode();
        if let Some(f) = second_fault
            && ins.is_invalid()
            && d.last_error() == iced_x86::DecoderError::NoMoreBytes
        {
            return Err(f);
        }
        if ins.is_invalid() {
            return if n < 15 && ins.len() == 0 {
                gp0()
            } else {
                Err(Fault::Exception(vector::UD, None))
            };
        }
        // The CPU is a Pentium M: no VEX, EVEX or XOP encodings (in 32-bit code their first
        // byte is LES, LDS, BOUND or POP with a form that raises #UD) and no 3DNow!.
        if ins.encoding() != EncodingKind::Legacy {
            return Err(Fault::Exception(vector::UD, None));
        }
        self.decoded
            .borrow_mut()
            .put(eip, bitness, &bytes[..avail], ins);
        Ok(ins)
    }

    /// Executes one instruction. Returns the VM exit it causes, if any.
    fn step(&mut self, io: &mut dyn IoHandler) -> Step<Option<VmExit>> {
        let ins = self.fetch(io)?;
        if self.trace.is_some() {
            let before = self.cpu.clone();
            let r = self.step_decoded(&ins, io);
            self.trace_line(&ins, &before, r.as_ref().err());
            return r;
        }
        self.step_decoded(&ins, io)
    }

    fn step_decoded(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step<Option<VmExit>> {
        let mut next = ins.next_ip32();
        if !self.cpu.seg(SegReg::Cs).big {
            next &= 0xFFFF;
        }
        let exit = match self.execute(ins, next, io) {
            // An instruction of a later CPU than the one the guest sees: #UD, as on that CPU.
            Err(Fault::Unsupported(_)) if !on_this_cpu(ins) => {
                return Err(Fault::Exception(vector::UD, None));
            }
            r => r?,
        };
        if matches!(ins.mnemonic(), Mnemonic::Mov | Mnemonic::Pop)
            && ins.op0_kind() == OpKind::Register
            && ins.op0_register() == Register::SS
        {
            self.shadow.interrupts = true;
            self.shadow.trap = self.cpu.eflags & flags::TF != 0;
        }
        // RF suppresses instruction breakpoints for one instruction only; IRET may set it.
        if !matches!(ins.mnemonic(), Mnemonic::Iret | Mnemonic::Iretd) {
            self.cpu.eflags &= !flags::RF;
        }
        self.instructions += 1;
        if let Some(u) = &mut self.undefined_flags {
            *u = (*u & !eflags_of(ins.rflags_modified())) | eflags_of(ins.rflags_undefined());
        }
        Ok(exit)
    }

    fn execute(
        &mut self,
        ins: &Instruction,
        next: u32,
        io: &mut dyn IoHandler,
    ) -> Step<Option<VmExit>> {
        use Mnemonic as M;
        let fl = self.cpu.eflags;
        let bits = Self::op_size(ins, 0) * 8;
        let mut exit = None;
        let mut branch: Option<u32> = None;
        match ins.mnemonic() {
            // 0F 18-0F 1F beyond PREFETCHh and NOP: the P6's reserved-NOP hint space.
            M::Nop | M::Reservednop => {}
            M::Mov => {
                let r0 = ins.op0_register();
                let r1 = ins.op1_register();
                if r0.is_cr() || r1.is_cr() {
                    self.mov_control(ins)?;
                } else if r0.is_dr() || r1.is_dr() {
                    self.system(ins, io)?;
                } else {
                    let v = self.read_op(ins, 1, io)?;
                    self.write_op(ins, 0, v, io)?;
                }
            }
            M::Movzx | M::Movsx => {
                let v = self.read_op(ins, 1, io)?;
                let src_bits = Self::op_size(ins, 1) * 8;
                let v = if ins.mnemonic() == M::Movsx {
                    (((v << (32 - src_bits)) as i32) >> (32 - src_bits)) as u32
                } else {
                    v
                };
                self.write_op(ins, 0, v, io)?;
            }
            M::Lea => {
                let (_, off) = self.address(ins);
                self.write_op(ins, 0, off, io)?;
            }
            M::Xchg => {
                let a = self.read_op(ins, 0, io)?;
                let b = self.read_op(ins, 1, io)?;
                self.write_op(ins, 0, b, io)?;
                if let Err(f) = self.write_op(ins, 1, a, io) {
                    self.write_op(ins, 0, a, io)?;
                    return Err(f);
                }
            }
            M::Add | M::Adc | M::Sub | M::Sbb | M::Cmp | M::And | M::Or | M::Xor | M::Test => {
                let a = self.read_op(ins, 0, io)?;
                let b = self.read_op(ins, 1, io)?;
                let carry = fl & flags::CF != 0;
                let (r, f) = match ins.mnemonic() {
                    M::Add => alu::add(a, b, false, bits, fl),
                    M::Adc => alu::add(a, b, carry, bits, fl),
                    M::Sub | M::Cmp => alu::sub(a, b, false, bits, fl),
                    M::Sbb => alu::sub(a, b, carry, bits, fl),
                    M::And | M::Test => alu::logic(a & b, bits, fl),
                    M::Or => alu::logic(a | b, bits, fl),
                    _ => alu::logic(a ^ b, bits, fl),
                };
                if !matches!(ins.mnemonic(), M::Cmp | M::Test) {
                    self.write_op(ins, 0, r, io)?;
                }
                self.cpu.eflags = f;
            }
            M::Inc | M::Dec | M::Neg | M::Not => {
                let a = self.read_op(ins, 0, io)?;
                let (r, f) = match ins.mnemonic() {
                    M::Inc => alu::inc(a, bits, fl),
                    M::Dec => alu::dec(a, bits, fl),
                    M::Neg => alu::neg(a, bits, fl),
                    _ => (!a, fl),
                };
                self.write_op(ins, 0, r, io)?;
                self.cpu.eflags = f;
            }
            M::Rol | M::Ror | M::Shl | M::Sal | M::Shr | M::Sar => {
                let op = match ins.mnemonic() {
                    M::Rol => Shift::Rol,
                    M::Ror => Shift::Ror,
                    M::Shr => Shift::Shr,
                    M::Sar => Shift::Sar,
                    _ => Shift::Shl,
                };
                let a = self.read_op(ins, 0, io)?;
                let count = if ins.op_count() > 1 {
                    self.read_op(ins, 1, io)?
                } else {
                    1
                };
                let (r, f) = alu::shift(op, a, count, bits, fl);
                self.write_op(ins, 0, r, io)?;
                self.cpu.eflags = f;
            }
            M::Cwde | M::Cbw => {
                let a = self.cpu.gpr[0];
                self.cpu.gpr[0] = if ins.mnemonic() == M::Cwde {
                    a as u16 as i16 as i32 as u32
                } else {
                    (a & 0xFFFF_0000) | (a as u8 as i8 as i16 as u16 as u32)
                };
            }
            M::Cdq | M::Cwd => {
                if ins.mnemonic() == M::Cdq {
                    self.cpu.gpr[2] = ((self.cpu.gpr[0] as i32) >> 31) as u32;
                } else {
                    let hi = ((self.cpu.gpr[0] as i16) >> 15) as u16;
                    self.cpu.gpr[2] = (self.cpu.gpr[2] & 0xFFFF_0000) | u32::from(hi);
                }
            }
            M::Push => {
                let len = if ins.op0_kind() == OpKind::Register || ins.op0_kind() == OpKind::Memory
                {
                    Self::op_size(ins, 0)
                } else if ins.code() == Code::Push_imm16 || ins.code() == Code::Pushw_imm8 {
                    2
                } else {
                    4
                };
                // PUSH Sreg moves the stack by the operand size (a 0x66 prefix selects the
                // other one), storing the selector zero-extended to a dword in 32-bit form.
                let len = if ins.op0_register().is_segment_register() {
                    ins.stack_pointer_increment().unsigned_abs()
                } else {
                    len
                };
                let v = self.read_op(ins, 0, io)?;
                self.push(v, len, io)?;
            }
            M::Pop => {
                let len = Self::op_size(ins, 0);
                let len = if ins.op0_register().is_segment_register() {
                    ins.stack_pointer_increment().unsigned_abs()
                } else {
                    len
                };
                let saved = self.cpu.gpr[4];
                let v = self.pop(len, io)?;
                if let Err(f) = self.write_op(ins, 0, v, io) {
                    self.cpu.gpr[4] = saved;
                    return Err(f);
                }
            }
            M::Pushf | M::Pushfd => {
                if fl & flags::VM != 0 && self.cpu.iopl() < 3 {
                    return gp0();
                }
                let len = if ins.mnemonic() == M::Pushfd { 4 } else { 2 };
                self.push(fl & !(flags::RF | flags::VM), len, io)?;
            }
            M::Popf | M::Popfd => {
                if fl & flags::VM != 0 && self.cpu.iopl() < 3 {
                    return gp0();
                }
                let len = if ins.mnemonic() == M::Popfd { 4 } else { 2 };
                let v = self.pop(len, io)?;
                let cpl = self.cpu.cpl();
                self.load_flags(v & !flags::RF, len, cpl);
            }
            M::Clc => self.cpu.eflags &= !flags::CF,
            M::Stc => self.cpu.eflags |= flags::CF,
            M::Cmc => self.cpu.eflags ^= flags::CF,
            M::Cld => self.cpu.eflags &= !flags::DF,
            M::Std => self.cpu.eflags |= flags::DF,
            M::Cli | M::Sti => {
                if self.cpu.protected() && self.cpu.cpl() > self.cpu.iopl() {
                    return gp0();
                }
                if ins.mnemonic() == M::Cli {
                    self.cpu.eflags &= !flags::IF;
                } else {
                    // STI holds interrupts off until after the next instruction.
                    self.shadow.interrupts |= fl & flags::IF == 0;
                    self.cpu.eflags |= flags::IF;
                }
            }
            M::Jmp => match ins.op0_kind() {
                OpKind::NearBranch16 | OpKind::NearBranch32 => {
                    branch = Some(ins.near_branch_target() as u32);
                }
                OpKind::FarBranch16 | OpKind::FarBranch32 => {
                    let size = if ins.op0_kind() == OpKind::FarBranch16 {
                        2
                    } else {
                        4
                    };
                    let (sel, off) = (ins.far_branch_selector(), ins.far_branch32());
                    self.far_transfer(false, sel, off, size, next, io)?;
                    return Ok(None);
                }
                OpKind::Memory if ins.is_jmp_far_indirect() => {
                    let (sel, off, size) = self.far_pointer(ins, io)?;
                    self.far_transfer(false, sel, off, size, next, io)?;
                    return Ok(None);
                }
                OpKind::Register | OpKind::Memory => {
                    branch = Some(self.read_op(ins, 0, io)?);
                }
                _ => return unsupported(format!("{ins}")),
            },
            M::Call if ins.is_call_far() || ins.is_call_far_indirect() => {
                let (sel, off, size) = if ins.is_call_far() {
                    let size = if ins.op0_kind() == OpKind::FarBranch16 {
                        2
                    } else {
                        4
                    };
                    (ins.far_branch_selector(), ins.far_branch32(), size)
                } else {
                    self.far_pointer(ins, io)?
                };
                self.far_transfer(true, sel, off, size, next, io)?;
                return Ok(None);
            }
            M::Retf => {
                let size = if matches!(ins.code(), Code::Retfw | Code::Retfw_imm16) {
                    2
                } else {
                    4
                };
                let release = if ins.op_count() > 0 {
                    u32::from(ins.immediate16())
                } else {
                    0
                };
                self.far_return(size, release, io)?;
                return Ok(None);
            }
            M::Sysenter => {
                self.sysenter()?;
                return Ok(None);
            }
            M::Sysexit => {
                self.sysexit()?;
                return Ok(None);
            }
            M::Call => {
                let len = if self.cpu.seg(SegReg::Cs).big { 4 } else { 2 };
                let target = match ins.op0_kind() {
                    OpKind::NearBranch16 | OpKind::NearBranch32 => ins.near_branch_target() as u32,
                    OpKind::Register | OpKind::Memory if !ins.is_call_far_indirect() => {
                        self.read_op(ins, 0, io)?
                    }
                    _ => return unsupported(format!("{ins}")),
                };
                let len = if ins.code() == Code::Call_rel16 || ins.code() == Code::Call_rm16 {
                    2
                } else if ins.code() == Code::Call_rel32_32 || ins.code() == Code::Call_rm32 {
                    4
                } else {
                    len
                };
                self.push(next, len, io)?;
                branch = Some(target);
            }
            M::Ret => {
                let len = if ins.code() == Code::Retnw || ins.code() == Code::Retnw_imm16 {
                    2
                } else {
                    4
                };
                let saved = self.cpu.gpr[4];
                let target = self.pop(len, io)?;
                let release = if ins.op_count() > 0 {
                    ins.immediate16() as u32
                } else {
                    0
                };
                self.set_sp(self.sp().wrapping_add(release));
                if target > self.cpu.seg(SegReg::Cs).limit {
                    self.cpu.gpr[4] = saved;
                    return gp0();
                }
                branch = Some(target);
            }
            M::In | M::Out => {
                let port = if matches!(
                    ins.op_kind(if ins.mnemonic() == M::In { 1 } else { 0 }),
                    OpKind::Immediate8
                ) {
                    ins.immediate8() as u16
                } else {
                    self.cpu.gpr[2] as u16
                };
                let width = if ins.mnemonic() == M::In {
                    ins.op0_register().size()
                } else {
                    ins.op1_register().size()
                };
                self.io_permitted(port, width, io)?;
                if ins.mnemonic() == M::In {
                    let r = ins.op0_register();
                    let mut b = [0u8; 4];
                    let len = r.size();
                    io.pio_read(port, &mut b[..len]);
                    self.set_reg(r, u32::from_le_bytes(b));
                } else {
                    let r = ins.op1_register();
                    let v = self.reg(r).to_le_bytes();
                    io.pio_write(port, &v[..r.size()]);
                }
                self.watch_port(port, width);
                exit = Some(VmExit::Io);
            }
            M::Hlt => {
                if self.cpu.cpl() != 0 {
                    return gp0();
                }
                exit = Some(VmExit::Halt {
                    interrupts_enabled: fl & flags::IF != 0,
                });
            }
            M::Lgdt | M::Lidt => {
                if self.cpu.cpl() != 0 {
                    return gp0();
                }
                let (s, off) = self.address(ins);
                let limit = self.read_mem(s, off, 2, io)? as u16;
                let mut base = self.read_mem(s, off.wrapping_add(2), 4, io)?;
                if !self.cpu.seg(SegReg::Cs).big {
                    base &= 0x00FF_FFFF; // 16-bit operand size loads a 24-bit base
                }
                let t = TableReg { base, limit };
                if ins.mnemonic() == M::Lgdt {
                    self.cpu.gdtr = t;
                } else {
                    self.cpu.idtr = t;
                }
            }
            // SYSCALL/SYSRET are #UD outside 64-bit mode on Intel CPUs (Intel SDM vol. 2), and
            // our Pentium M CPUID has no SYSCALL at all (EFER.SCE cannot be set).
            M::Ud0 | M::Ud1 | M::Ud2 | M::Syscall | M::Sysret => {
                return Err(Fault::Exception(vector::UD, None));
            }
            M::Int3 | M::Int | M::Into => {
                let v = match ins.mnemonic() {
                    M::Int3 => 3,
                    M::Into => {
                        if fl & flags::OF == 0 {
                            self.cpu.eip = next;
                            return Ok(None);
                        }
                        4
                    }
                    _ => ins.immediate8(),
                };
                // In virtual-8086 mode INT n (not INT3 or INTO) is IOPL-sensitive.
                if fl & flags::VM != 0 && ins.mnemonic() == M::Int && self.cpu.iopl() < 3 {
                    return gp0();
                }
                self.first_event.get_or_insert((v, next));
                self.deliver(v, None, Event::Software(next), io)?;
                self.trap_suppressed = true;
                return Ok(None);
            }
            M::Iret | M::Iretd => {
                let size = if ins.mnemonic() == M::Iretd { 4 } else { 2 };
                self.iret(size, next, io)?;
                return Ok(None);
            }
            M::Div | M::Idiv | M::Mul | M::Imul if ins.op_count() == 1 => {
                self.mul_div(ins, io)?;
            }
            M::Imul => self.imul_n(ins, io)?,
            M::Movsb
            | M::Movsw
            | M::Stosb
            | M::Stosw
            | M::Stosd
            | M::Lodsb
            | M::Lodsw
            | M::Lodsd
            | M::Cmpsb
            | M::Cmpsw
            | M::Scasb
            | M::Scasw
            | M::Scasd
            | M::Insb
            | M::Insw
            | M::Insd
            | M::Outsb
            | M::Outsw
            | M::Outsd => {
                self.string_op(ins, io)?;
                if m_io(ins.mnemonic()) {
                    exit = Some(VmExit::Io);
                }
            }
            M::Movsd | M::Cmpsd if ins.op_count() == 2 && is_string_form(ins) => {
                self.string_op(ins, io)?;
            }
            M::Bt | M::Bts | M::Btr | M::Btc => self.bit_test(ins, io)?,
            M::Bsf | M::Bsr | M::Tzcnt | M::Lzcnt => self.bit_scan(ins, io)?,
            M::Shld | M::Shrd => {
                let a = self.read_op(ins, 0, io)?;
                let b = self.read_op(ins, 1, io)?;
                let count = self.read_op(ins, 2, io)?;
                let (r, f) = alu::double_shift(ins.mnemonic() == M::Shld, a, b, count, bits, fl);
                self.write_op(ins, 0, r, io)?;
                self.cpu.eflags = f;
            }
            M::Rcl | M::Rcr => {
                let a = self.read_op(ins, 0, io)?;
                let count = if ins.op_count() > 1 {
                    self.read_op(ins, 1, io)?
                } else {
                    1
                };
                let (r, f) = alu::rotate_carry(ins.mnemonic() == M::Rcl, a, count, bits, fl);
                self.write_op(ins, 0, r, io)?;
                self.cpu.eflags = f;
            }
            M::Cmpxchg => self.cmpxchg(ins, io)?,
            M::Cmpxchg8b => self.cmpxchg8b(ins, io)?,
            M::Xadd => self.xadd(ins, io)?,
            M::Bswap => {
                let r = ins.op0_register();
                let v = self.reg(r);
                self.set_reg(r, if r.is_gpr16() { 0 } else { v.swap_bytes() });
            }
            M::Enter => self.enter(ins, io)?,
            M::Leave => self.leave(ins, io)?,
            M::Pusha | M::Pushad | M::Popa | M::Popad => self.push_pop_all(ins, io)?,
            M::Daa | M::Das | M::Aaa | M::Aas | M::Aam | M::Aad => self.decimal(ins)?,
            M::Lahf | M::Sahf => self.ah_flags(ins),
            M::Salc => {
                let v = if fl & flags::CF != 0 { 0xFF } else { 0 };
                self.set_reg(Register::AL, v);
            }
            M::Xlatb => {
                let v = self.read_op(ins, 0, io)?;
                self.set_reg(Register::AL, v);
            }
            M::Loop | M::Loope | M::Loopne | M::Jcxz | M::Jecxz => {
                if self.loop_branch(ins) {
                    branch = Some(ins.near_branch_target() as u32);
                }
            }
            M::Bound => self.bound(ins, io)?,
            M::Lds | M::Les | M::Lfs | M::Lgs | M::Lss => self.load_far_pointer(ins, io)?,
            M::Arpl => self.arpl(ins, io)?,
            M::Pause => {}
            M::Int1 => {
                // ICEBP: a #DB trap, delivered like a hardware event (no gate DPL check).
                self.first_event.get_or_insert((1, next));
                self.deliver(1, None, Event::Icebp(next), io)?;
                self.trap_suppressed = true;
                return Ok(None);
            }
            m => {
                if let Some(cc) = cmovcc(m) {
                    let v = self.read_op(ins, 1, io)?;
                    if alu::condition(cc, fl) {
                        self.write_op(ins, 0, v, io)?;
                    }
                } else if let Some(cc) = jcc(ins) {
                    if alu::condition(cc, fl) {
                        branch = Some(ins.near_branch_target() as u32);
                    }
                } else if let Some(cc) = setcc(m) {
                    let v = u32::from(alu::condition(cc, fl));
                    self.write_op(ins, 0, v, io)?;
                } else if let Some(step) = self.fp(ins, io)? {
                    if step == fpu::FpStep::Freeze {
                        // Waiting for IRQ 13 (FERR#) on the instruction itself.
                        self.trap_suppressed = true;
                        return Ok(Some(VmExit::Halt {
                            interrupts_enabled: fl & flags::IF != 0,
                        }));
                    }
                } else if !self.system(ins, io)? {
                    return unsupported(format!("'{ins}'"));
                }
            }
        }
        match branch {
            Some(target) => {
                let target = if self.cpu.seg(SegReg::Cs).big {
                    target
                } else {
                    target & 0xFFFF
                };
                if target > self.cpu.seg(SegReg::Cs).limit {
                    return gp0();
                }
                self.cpu.eip = target;
            }
            None => self.cpu.eip = next,
        }
        Ok(exit)
    }

    fn mul_div(&mut self, ins: &Instruction, io: &mut dyn IoHandler) -> Step {
        let bits = Self::op_size(ins, 0) * 8;
        let src = u64::from(self.read_op(ins, 0, io)?);
        let g = self.cpu.gpr;
        // The implicit double-width operand: AX, DX:AX or EDX:EAX.
        let (lo, hi) = match bits {
            8 => (u64::from(g[0] & 0xFF), u64::from((g[0] >> 8) & 0xFF)),
            16 => (u64::from(g[0] & 0xFFFF), u64::from(g[2] & 0xFFFF)),
            _ => (u64::from(g[0]), u64::from(g[2])),
        };
        let m = if bits == 32 {
            u64::from(u32::MAX)
        } else {
            (1 << bits) - 1
        };
        let sx = |v: u64, b: u32| ((v << (64 - b)) as i64) >> (64 - b);
        let (q, r): (u64, u64) = match ins.mnemonic() {
            Mnemonic::Mul | Mnemonic::Imul => {
                let (prod, overflow) = if ins.mnemonic() == Mnemonic::Mul {
                    let p = lo * src;
                    (p, p >> bits != 0)
                } else {
                    let p = (sx(lo, bits) * sx(src, bits)) as u64;
                    (p, sx(p & ((m << bits) | m), 2 * bits) != sx(p & m, bits))
                };
                let f = if overflow { flags::CF | flags::OF } else { 0 };
                self.cpu.eflags = (self.cpu.eflags & !(flags::CF | flags::OF)) | f;
                (prod & m, (prod >> bits) & m)
            }
            _ => {
                if src == 0 {
                    return Err(Fault::Exception(vector::DE, None));
                }
                let dividend = (hi << bits) | lo;
                if ins.mnemonic() == Mnemonic::Div {
                    let q = dividend / src;
                    if q > m {
                        return Err(Fault::Exception(vector::DE, None));
                    }
                    (q, dividend % src)
                } else {
                    let n = sx(dividend, 2 * bits);
                    let d = sx(src, bits);
                    let q = n.checked_div(d).ok_or(Fault::Exception(vector::DE, None))?;
                    if q > (m >> 1) as i64 || q < -((m >> 1) as i64) - 1 {
                        return Err(Fault::Exception(vector::DE, None));
                    }
                    (q as u64 & m, (n % d) as u64 & m)
                }
            }
        };
        let g = &mut self.cpu.gpr;
        match bits {
            8 => g[0] = (g[0] & !0xFFFF) | ((r as u32) << 8) | q as u32,
            16 => {
                g[0] = (g[0] & !0xFFFF) | q as u32;
                g[2] = (g[2] & !0xFFFF) | r as u32;
            }
            _ => {
                g[0] = q as u32;
                g[2] = r as u32;
            }
        }
        Ok(())
    }

    fn mov_control(&mut self, ins: &Instruction) -> Step {
        if self.cpu.cpl() != 0 {
            return gp0();
        }
        let (dst, src) = (ins.op0_register(), ins.op1_register());
        if src.is_cr() {
            let v = match src {
                Register::CR0 => self.cpu.cr0,
                Register::CR2 => self.cpu.cr2,
                Register::CR3 => self.cpu.cr3,
                Register::CR4 => self.cpu.cr4,
                _ => return Err(Fault::Exception(vector::UD, None)),
            };
            self.set_reg(dst, v);
            return Ok(());
        }
        let v = self.reg(src);
        match dst {
            Register::CR0 => {
                // Reserved bits are ignored; ET is hard-wired to 1 on a P6.
                const DEFINED: u32 = 0xE005_003F;
                let v = (v & DEFINED) | cr0::ET;
                let (pg, pe, cd, nw) = (1 << 31, 1, 1 << 30, 1 << 29);
                if (v & pg != 0 && v & pe == 0) || (v & nw != 0 && v & cd == 0) {
                    return gp0();
                }
                let old = self.cpu.cr0;
                if v & pg != 0 && old & pg == 0 && self.cpu.cr4 & cr4::PAE != 0 {
                    self.load_pdptes(self.cpu.cr3)?;
                }
                self.cpu.cr0 = v;
                if (old ^ v) & (pg | pe | cr0::WP) != 0 {
                    self.flush_tlb(false);
                }
            }
            Register::CR2 => self.cpu.cr2 = v,
            Register::CR3 => {
                if self.paging() && self.cpu.cr4 & cr4::PAE != 0 {
                    self.load_pdptes(v)?;
                }
                self.cpu.cr3 = v;
                self.flush_tlb(true);
            }
            Register::CR4 => {
                if v & !cr4::SUPPORTED != 0 {
                    return gp0();
                }
                if self.paging() && v & cr4::PAE != 0 && self.cpu.cr4 & cr4::PAE == 0 {
                    self.load_pdptes(self.cpu.cr3)?;
                }
                let old = self.cpu.cr4;
                self.cpu.cr4 = v;
                if (old ^ v) & (cr4::PSE | cr4::PAE | cr4::PGE) != 0 {
                    self.flush_tlb(false);
                }
            }
            _ => return Err(Fault::Exception(vector::UD, None)),
        }
        Ok(())
    }

    /// Loads the four PAE page-directory-pointer entries from the table at `cr3`, as MOV to CR3
    /// (or enabling PAE paging) does: #GP if a present entry has reserved bits set.
    fn load_pdptes(&mut self, cr3: u32) -> Step {
        match pagewalk::load_pdptes(&mut WalkMem(&self.memory), cr3) {
            Some(p) => {
                self.pdptes = p;
                Ok(())
            }
            None => gp0(),
        }
    }
}

/// Whether every CPUID feature `ins` needs is one the guest's CPU (a Pentium M: family 6 model
/// 13) has. Instructions of later CPUs (SSE3's FISTTP, POPCNT, MOVBE, 3DNow!'s PREFETCHW, ...)
/// raise #UD on it, and so does RSM: the guest never runs in system-management mode.
fn on_this_cpu(ins: &Instruction) -> bool {
    use iced_x86::CpuidFeature as F;
    ins.cpuid_features().iter().all(|f| {
        matches!(
            f,
            F::INTEL8086
                | F::INTEL186
                | F::INTEL286
                | F::INTEL386
                | F::INTEL486
                | F::CPUID
                | F::TSC
                | F::MSR
                | F::RDPMC
                | F::CX8
                | F::SEP
                | F::CMOV
                | F::FPU
                | F::FPU287
                | F::FPU387
                | F::MMX
                | F::FXSR
                | F::SSE
                | F::SSE2
                | F::CLFSH
                | F::PAUSE
                | F::MULTIBYTENOP
        )
    })
}

/// The segment register an iced register names (DS for none).
fn seg_of(r: Register) -> SegReg {
    match r {
        Register::ES => SegReg::Es,
        Register::CS => SegReg::Cs,
        Register::SS => SegReg::Ss,
        Register::FS => SegReg::Fs,
        Register::GS => SegReg::Gs,
        _ => SegReg::Ds,
    }
}

/// The condition code of a Jcc, if `ins` is one.
fn jcc(ins: &Instruction) -> Option<u8> {
    use Mnemonic as M;
    let cc = match ins.mnemonic() {
        M::Jo => 0,
        M::Jno => 1,
        M::Jb => 2,
        M::Jae => 3,
        M::Je => 4,
        M::Jne => 5,
        M::Jbe => 6,
        M::Ja => 7,
        M::Js => 8,
        M::Jns => 9,
        M::Jp => 10,
        M::Jnp => 11,
        M::Jl => 12,
        M::Jge => 13,
        M::Jle => 14,
        M::Jg => 15,
        _ => return None,
    };
    Some(cc)
}

/// Whether a string mnemonic does port I/O.
fn m_io(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Insb | M::Insw | M::Insd | M::Outsb | M::Outsw | M::Outsd
    )
}

/// MOVSD and CMPSD name both the string instructions and SSE2 instructions: the string forms
/// have ES:EDI operands.
fn is_string_form(ins: &Instruction) -> bool {
    matches!(
        ins.op0_kind(),
        OpKind::MemoryESEDI | OpKind::MemoryESDI | OpKind::MemorySegESI | OpKind::MemorySegSI
    ) || matches!(ins.op1_kind(), OpKind::MemoryESEDI | OpKind::MemoryESDI)
}

/// The condition code of a CMOVcc mnemonic.
fn cmovcc(m: Mnemonic) -> Option<u8> {
    use Mnemonic as M;
    let cc = match m {
        M::Cmovo => 0,
        M::Cmovno => 1,
        M::Cmovb => 2,
        M::Cmovae => 3,
        M::Cmove => 4,
        M::Cmovne => 5,
        M::Cmovbe => 6,
        M::Cmova => 7,
        M::Cmovs => 8,
        M::Cmovns => 9,
        M::Cmovp => 10,
        M::Cmovnp => 11,
        M::Cmovl => 12,
        M::Cmovge => 13,
        M::Cmovle => 14,
        M::Cmovg => 15,
        _ => return None,
    };
    Some(cc)
}

/// The condition code of a SETcc mnemonic.
fn setcc(m: Mnemonic) -> Option<u8> {
    use Mnemonic as M;
    let cc = match m {
        M::Seto => 0,
        M::Setno => 1,
        M::Setb => 2,
        M::Setae => 3,
        M::Sete => 4,
        M::Setne => 5,
        M::Setbe => 6,
        M::Seta => 7,
        M::Sets => 8,
        M::Setns => 9,
        M::Setp => 10,
        M::Setnp => 11,
        M::Setl => 12,
        M::Setge => 13,
        M::Setle => 14,
        M::Setg => 15,
        _ => return None,
    };
    Some(cc)
}

/// iced's flag bits as EFLAGS bits (the arithmetic flags, which are the ones that can be
/// undefined).
fn eflags_of(bits: u32) -> u32 {
    use iced_x86::RflagsBits as R;
    [
        (R::OF, flags::OF),
        (R::SF, flags::SF),
        (R::ZF, flags::ZF),
        (R::AF, flags::AF),
        (R::CF, flags::CF),
        (R::PF, flags::PF),
    ]
    .iter()
    .filter(|(r, _)| bits & r != 0)
    .fold(0, |acc, (_, f)| acc | f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::BlockEncoderOptions;
    use iced_x86::IcedError;
    use iced_x86::code_asm::*;
    use vmdriver::MemoryLayout;

    const CODE: u32 = 0x10_0000;
    const GDT: u32 = 0x1000;
    const IDT: u32 = 0x2000;
    const STACK: u32 = 0x9_0000;

    /// Records port writes; reads return all ones.
    #[derive(Default)]
    struct Ports(Vec<(u16, u32)>);
    impl IoHandler for Ports {
        fn pio_read(&mut self, _: u16, data: &mut [u8]) {
            data.fill(0xFF);
        }
        fn pio_write(&mut self, port: u16, data: &[u8]) {
            let mut b = [0u8; 4];
            b[..data.len()].copy_from_slice(data);
            self.0.push((port, u32::from_le_bytes(b)));
        }
        fn mmio_read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(0xFF);
        }
        fn mmio_write(&mut self, _: u64, _: &[u8]) {}
    }

    /// A flat 32-bit machine running the assembled code at CODE, with an IDT whose `gates`
    /// (vector, type byte) all point at the `handler` label of that code.
    fn machine(
        build: impl FnOnce(&mut CodeAssembler, &mut CodeLabel) -> Result<(), IcedError>,
        gates: &[(u8, u8)],
    ) -> (Interp, Ports) {
        let mem = Arc::new(GuestMemory::new(MemoryLayout::new(4).unwrap()).unwrap());
        let gdt: [u64; 3] = [0, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF];
        let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
        mem.write(u64::from(GDT), &bytes).unwrap();
        let mut a = CodeAssembler::new(32).unwrap();
        let mut handler = a.create_label();
        build(&mut a, &mut handler).unwrap();
        let r = a
            .assemble_options(
                u64::from(CODE),
                BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
            )
            .unwrap();
        let h = r.label_ip(&handler).unwrap() as u32;
        mem.write(u64::from(CODE), &r.inner.code_buffer).unwrap();
        for (v, ty) in gates {
            let gate = u64::from(h & 0xFFFF)
                | (0x08 << 16)
                | (u64::from(*ty) << 40)
                | (u64::from(h >> 16) << 48);
            mem.write(u64::from(IDT) + u64::from(*v) * 8, &gate.to_le_bytes())
                .unwrap();
        }
        let mut interp = Interp::new(
            mem,
            InitialCpu::Flat32 {
                eip: CODE,
                eax: 0,
                ebx: 0,
                esi: 0,
                gdt_base: GDT,
                gdt_limit: 23,
                code_selector: 0x08,
                data_selector: 0x10,
            },
        );
        interp.cpu.idtr = TableReg {
            base: IDT,
            limit: 0x7FF,
        };
        interp.cpu.gpr[4] = STACK;
        (interp, Ports::default())
    }

    /// Emits the end of a test guest: `value` to port 0x80, then the exit port, then HLT.
    fn report_and_exit(a: &mut CodeAssembler, value: u32) -> Result<(), IcedError> {
        a.mov(eax, value)?;
        a.out(0x80, eax)?;
        a.out(0xF4, al)?;
        a.hlt()
    }

    /// Runs until the guest writes port 0xF4; returns the values it wrote to port 0x80.
    fn run_to_exit(interp: &mut Interp, ports: &mut Ports) -> Vec<u32> {
        for _ in 0..1000 {
            let exit = interp.run(ports);
            assert!(
                matches!(exit, Ok(VmExit::Io | VmExit::Interrupted)),
                "{exit:?}"
            );
            if ports.0.iter().any(|(p, _)| *p == 0xF4) {
                return ports
                    .0
                    .iter()
                    .filter(|(p, _)| *p == 0x80)
                    .map(|(_, v)| *v)
                    .collect();
            }
        }
        panic!("guest did not finish");
    }

    #[test]
    fn faults_push_rf_and_software_interrupts_do_not() {
        // The handler reports the pushed EFLAGS, steps past UD2 (a fault) and returns.
        let (mut i, mut p) = machine(
            |a, handler| {
                a.ud2()?;
                a.int(0x30)?;
                a.out(0xF4, al)?;
                a.hlt()?;
                a.set_label(handler)?;
                a.mov(eax, dword_ptr(esp + 8))?;
                a.out(0x80, eax)?;
                a.mov(eax, dword_ptr(esp))?;
                a.cmp(byte_ptr(eax), 0x0Fu32)?; // UD2 starts with 0F: skip it
                let mut done = a.create_label();
                a.jne(done)?;
                a.add(dword_ptr(esp), 2u32)?;
                a.set_label(&mut done)?;
                a.iretd()?;
                Ok(())
            },
            &[(6, 0x8E), (0x30, 0x8F)],
        );
        let seen = run_to_exit(&mut i, &mut p);
        assert_eq!(seen.len(), 2);
        assert_ne!(seen[0] & flags::RF, 0, "#UD is a fault: RF pushed as 1");
        assert_eq!(seen[1] & flags::RF, 0, "INT n pushes RF as 0");
        assert_eq!(
            i.cpu.eflags & flags::RF,
            0,
            "RF lasts one instruction after IRET"
        );
    }

    #[test]
    fn interrupt_gates_clear_if_and_trap_gates_keep_it() {
        let (mut i, mut p) = machine(
            |a, handler| {
                a.sti()?;
                a.int(0x30)?;
                a.int(0x31)?;
                a.out(0xF4, al)?;
                a.hlt()?;
                a.set_label(handler)?;
                a.pushfd()?;
                a.pop(eax)?;
                a.out(0x80, eax)?;
                a.iretd()?;
                Ok(())
            },
            &[(0x30, 0x8E), (0x31, 0x8F)],
        );
        let f = run_to_exit(&mut i, &mut p);
        assert_eq!(f[0] & flags::IF, 0, "interrupt gate");
        assert_ne!(f[1] & flags::IF, 0, "trap gate");
        assert_ne!(i.cpu.eflags & flags::IF, 0, "IRET restored IF");
    }

    #[test]
    fn a_missing_handler_escalates_to_a_triple_fault() {
        let (mut i, mut p) = machine(
            |a, handler| {
                a.set_label(handler)?;
                a.xor(ecx, ecx)?;
                a.div(ecx)?;
                Ok(())
            },
            &[],
        );
        i.cpu.idtr.limit = 0;
        assert_eq!(i.run(&mut p), Ok(VmExit::Shutdown));
        assert_eq!(
            i.counters()[1].1,
            2,
            "#DE, then #DF, whose failure is the shutdown"
        );
    }

    #[test]
    fn wide_memory_operands_stop_cleanly_instead_of_panicking() {
        // The memory helpers refuse sizes they cannot carry instead of indexing past their
        // buffers.
        let (i, mut p) = machine(
            |a, handler| {
                a.set_label(handler)?;
                a.nop()
            },
            &[],
        );
        let (s, off) = (SegReg::Ds, 0x5000);
        assert!(matches!(
            i.read_mem(s, off, 8, &mut p),
            Err(Fault::Unsupported(_))
        ));
        assert!(matches!(
            i.write_mem(s, off, 0, 0, &mut p),
            Err(Fault::Unsupported(_))
        ));
    }

    #[test]
    fn single_step_traps_after_the_instruction_and_waits_out_mov_ss() {
        // The handler reports the trapped EIP and DR6, then clears TF in the saved EFLAGS.
        // Both traps must land right after a NOP.
        let (mut i, mut p) = machine(
            |a, handler| {
                a.pushfd()?;
                a.or(dword_ptr(esp), 0x100u32)?;
                a.popfd()?; // TF=1 from here: the next instruction traps
                a.nop()?;
                a.mov(ebx, 0x10u32)?;
                a.pushfd()?;
                a.or(dword_ptr(esp), 0x100u32)?;
                a.popfd()?;
                a.mov(ss, ebx)?; // the trap after MOV SS waits ...
                a.nop()?; // ... until after this one
                a.out(0xF4, al)?;
                a.hlt()?;
                a.set_label(handler)?;
                a.mov(eax, dword_ptr(esp))?;
                a.out(0x80, eax)?;
                a.mov(eax, dr6)?;
                a.out(0x80, eax)?;
                a.and(dword_ptr(esp + 8), !0x100u32)?;
                a.iretd()?;
                Ok(())
            },
            &[(1, 0x8E)],
        );
        let seen = run_to_exit(&mut i, &mut p);
        assert_eq!(seen.len(), 4, "two traps: {seen:x?}");
        for trap in [seen[0], seen[2]] {
            let mut b = [0u8];
            i.memory.read(u64::from(trap - 1), &mut b).unwrap();
            assert_eq!(b[0], 0x90, "trap at {trap:#x} follows a NOP");
        }
        assert_ne!(seen[1] & (1 << 14), 0, "DR6.BS");
    }

    #[test]
    fn data_breakpoints_trap_after_the_access() {
        // DR1 watches writes to the dword at 0x5000; the handler reports EIP and DR6.
        let (mut i, mut p) = machine(
            |a, handler| {
                a.mov(eax, 0x5000u32)?;
                a.mov(dr1, eax)?;
                a.mov(eax, (1u32 << 2) | (0b01 << 20) | (0b11 << 22))?; // L1, write, 4 bytes
                a.mov(dr7, eax)?;
                a.mov(dword_ptr(0x6000u32), 1u32)?; // elsewhere: no trap
                a.mov(eax, dword_ptr(0x5000u32))?; // a read: no trap for a write watch
                a.mov(byte_ptr(0x5002u32), 2u32)?; // inside the watched dword: trap
                a.nop()?;
                a.out(0xF4, al)?;
                a.hlt()?;
                a.set_label(handler)?;
                a.mov(eax, dword_ptr(esp))?;
                a.out(0x80, eax)?;
                a.mov(eax, dr6)?;
                a.out(0x80, eax)?;
                a.iretd()?;
                Ok(())
            },
            &[(1, 0x8E)],
        );
        let seen = run_to_exit(&mut i, &mut p);
        assert_eq!(seen.len(), 2, "exactly one hit: {seen:x?}");
        let mut b = [0u8];
        i.memory.read(u64::from(seen[0]), &mut b).unwrap();
        assert_eq!(b[0], 0x90, "trap after the byte store, on the NOP");
        assert_eq!(seen[1] & 0xF, 0b0010, "DR6.B1");
    }

    #[test]
    fn io_breakpoints_need_cr4_de_and_trap_after_the_access() {
        // DR2 watches ports 0x70-0x71 (2 bytes); DR4 is #UD once CR4.DE is set.
        let (mut i, mut p) = machine(
            |a, handler| {
                a.mov(eax, 0x70u32)?;
                a.mov(dr2, eax)?;
                a.mov(eax, (1u32 << 4) | (0b10 << 24) | (0b01 << 26))?; // L2, I/O, 2 bytes
                a.mov(dr7, eax)?;
                a.out(0x71, al)?; // CR4.DE clear: R/W = 10 is not an I/O breakpoint
                a.mov(eax, cr4)?;
                a.or(eax, 1u32 << 3)?;
                a.mov(cr4, eax)?;
                a.out(0x72, al)?; // outside the range
                a.mov(dx, 0x71u32)?;
                a.in_(al, dx)?; // hit: #DB after the IN; the handler skips three NOPs
                a.nop()?;
                a.nop()?;
                a.nop()?;
                a.mov(eax, dr4)?; // #UD with CR4.DE
                a.out(0xF4, al)?;
                a.hlt()?;
                a.set_label(handler)?;
                a.mov(eax, dword_ptr(esp))?;
                a.out(0x80, eax)?;
                a.mov(eax, dr6)?;
                a.out(0x80, eax)?;
                a.add(dword_ptr(esp), 3u32)?; // past the NOPs, or past MOV EAX, DR4
                a.iretd()?;
                Ok(())
            },
            &[(1, 0x8E), (6, 0x8E)],
        );
        let seen = run_to_exit(&mut i, &mut p);
        assert_eq!(seen.len(), 4, "one #DB and one #UD: {seen:x?}");
        let mut b = [0u8; 3];
        i.memory.read(u64::from(seen[0]), &mut b).unwrap();
        assert_eq!(b, [0x90, 0x90, 0x90], "#DB after the IN, on the NOPs");
        assert_eq!(seen[1] & 0xF, 0b0100, "DR6.B2");
        i.memory.read(u64::from(seen[2]), &mut b).unwrap();
        assert_eq!(b, [0x0F, 0x21, 0xE0], "#UD at MOV EAX, DR4");
    }

    #[test]
    fn instruction_breakpoints_fault_before_the_instruction_and_rf_resumes() {
        // CALL over the target, so the pushed return address is the target: arm DR0 with it
        // and jump there.
        let (mut i, mut p) = machine(
            |a, handler| {
                let mut setup = a.create_label();
                a.call(setup)?;
                a.nop()?; // the target
                a.out(0xF4, al)?;
                a.hlt()?;
                a.set_label(&mut setup)?;
                a.pop(eax)?;
                a.mov(dr0, eax)?;
                a.mov(ecx, 1u32)?; // L0, execute, length 1
                a.mov(dr7, ecx)?;
                a.jmp(eax)?;
                a.set_label(handler)?;
                a.mov(eax, dword_ptr(esp))?;
                a.out(0x80, eax)?;
                a.mov(eax, dr6)?;
                a.out(0x80, eax)?;
                a.or(dword_ptr(esp + 8), 0x1_0000u32)?; // RF: do not fault again on return
                a.iretd()?;
                Ok(())
            },
            &[(1, 0x8E)],
        );
        let seen = run_to_exit(&mut i, &mut p);
        assert_eq!(
            seen.len(),
            2,
            "one fault, then RF lets the NOP run: {seen:x?}"
        );
        let mut b = [0u8];
        i.memory.read(u64::from(seen[0]), &mut b).unwrap();
        assert_eq!(b[0], 0x90, "the fault reports the NOP itself");
        assert_eq!(seen[1] & 0xF, 0b0001, "DR6.B0");
    }

    /// Runs `emit` alone with `cr0_set` set in CR0 (EM and TS cleared first) and CR4 =
    /// `cr4_value`; returns
    /// the first exception (no IDT: delivery fails, so the CPU shuts down after it).
    fn first_fp_exception(
        emit: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
        cr0_set: u32,
        cr4_value: u32,
    ) -> Option<u8> {
        let (mut i, mut p) = machine(
            |a, handler| {
                a.set_label(handler)?;
                emit(a)?;
                a.out(0xF4, al)?;
                Ok(())
            },
            &[],
        );
        i.cpu.cr0 = (i.cpu.cr0 & !(cr0::EM | cr0::TS)) | cr0_set;
        i.cpu.cr4 = cr4_value;
        i.cpu.idtr.limit = 0;
        match i.run(&mut p) {
            Ok(VmExit::Shutdown) => i.first_event().map(|(v, _)| v),
            Ok(VmExit::Io) => None,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fp_instructions_follow_cr0_em_mp_ts_and_cr4_osfxsr() {
        const NM: Option<u8> = Some(7);
        const UD: Option<u8> = Some(6);
        let sse = super::cr4::OSFXSR;
        assert_eq!(first_fp_exception(|a| a.fld1(), 0, 0), None);
        assert_eq!(first_fp_exception(|a| a.fld1(), cr0::EM, 0), NM);
        assert_eq!(first_fp_exception(|a| a.fld1(), cr0::TS, 0), NM);
        assert_eq!(first_fp_exception(|a| a.wait(), cr0::TS, 0), None, "MP=0");
        assert_eq!(first_fp_exception(|a| a.wait(), cr0::TS | cr0::MP, 0), NM);
        assert_eq!(first_fp_exception(|a| a.paddb(mm0, mm1), cr0::EM, 0), UD);
        assert_eq!(first_fp_exception(|a| a.paddb(mm0, mm1), cr0::TS, 0), NM);
        assert_eq!(
            first_fp_exception(|a| a.addps(xmm0, xmm1), 0, 0),
            UD,
            "no OSFXSR"
        );
        assert_eq!(
            first_fp_exception(|a| a.addps(xmm0, xmm1), cr0::EM, sse),
            UD
        );
        assert_eq!(
            first_fp_exception(|a| a.addps(xmm0, xmm1), cr0::TS, sse),
            NM
        );
        assert_eq!(first_fp_exception(|a| a.addps(xmm0, xmm1), 0, sse), None);
        assert_eq!(
            first_fp_exception(|a| a.fxsave(ptr(0x5000u32)), cr0::EM, 0),
            NM
        );
    }

    #[test]
    fn fp_memory_rules_and_unmasked_simd_exceptions() {
        const GP: Option<u8> = Some(13);
        let sse = super::cr4::OSFXSR;
        assert_eq!(
            first_fp_exception(|a| a.fxsave(ptr(0x5008u32)), 0, sse),
            GP,
            "alignment"
        );
        assert_eq!(
            first_fp_exception(|a| a.movaps(xmm0, xmmword_ptr(0x5008u32)), 0, sse),
            GP
        );
        assert_eq!(
            first_fp_exception(|a| a.movups(xmm0, xmmword_ptr(0x5008u32)), 0, sse),
            None
        );
        // LDMXCSR with DAZ (not offered by this CPU) or a bit above 15: #GP(0).
        let ldmxcsr = |v: u32| {
            move |a: &mut CodeAssembler| {
                a.mov(dword_ptr(0x5000u32), v)?;
                a.ldmxcsr(dword_ptr(0x5000u32))
            }
        };
        assert_eq!(first_fp_exception(ldmxcsr(0x1F80), 0, sse), None);
        assert_eq!(first_fp_exception(ldmxcsr(0x1FC0), 0, sse), GP);
        assert_eq!(first_fp_exception(ldmxcsr(0x1_1F80), 0, sse), GP);
        // 0/0 with IM unmasked: #XM with OSXMMEXCPT, #UD without.
        let divide = |a: &mut CodeAssembler| {
            a.mov(dword_ptr(0x5000u32), 0x1F00u32)?;
            a.ldmxcsr(dword_ptr(0x5000u32))?;
            a.xorps(xmm0, xmm0)?;
            a.divps(xmm0, xmm0)
        };
        assert_eq!(
            first_fp_exception(divide, 0, sse | super::cr4::OSXMMEXCPT),
            Some(19)
        );
        assert_eq!(first_fp_exception(divide, 0, sse), Some(6));
    }

    #[test]
    fn a_faulting_fp_store_changes_no_fp_state() {
        // FSTP to a dword that wraps past 4 GiB: #GP at the segment limit; the stack is as it
        // was (the value is still there, TOP unchanged).
        let (mut i, mut p) = machine(
            |a, handler| {
                a.set_label(handler)?;
                a.fninit()?; // RESET leaves every register tagged full and every exception unmasked
                a.fld1()?;
                a.fstp(dword_ptr(0xFFFF_FFFEu32))?;
                Ok(())
            },
            &[],
        );
        i.cpu.idtr.limit = 0;
        i.cpu.cr0 &= !(cr0::EM | cr0::TS);
        assert_eq!(i.run(&mut p), Ok(VmExit::Shutdown));
        assert_eq!(i.first_event().map(|(v, _)| v), Some(13));
        let fsw = u16::from_le_bytes([i.cpu.fx.0[2], i.cpu.fx.0[3]]);
        assert_eq!(
            fsw,
            7 << 11,
            "FLD1 pushed, FSTP neither popped nor flagged anything"
        );
        assert_eq!(i.cpu.fx.0[4], 0x80, "ST0 (physical 7) still in use");
        assert_eq!(
            &i.cpu.fx.0[32..42],
            &[0, 0, 0, 0, 0, 0, 0, 0x80, 0xFF, 0x3F]
        );
    }

    #[test]
    fn an_x87_error_with_ne_clear_asserts_ferr_and_waits_at_the_next_fwait() {
        // 1/0 with ZE unmasked and CR0.NE = 0: the FWAIT freezes (a halt exit on the FWAIT,
        // FERR# asserted); with IGNNE# asserted it goes on; FNCLEX drops FERR#.
        let (mut i, mut p) = machine(
            |a, handler| {
                a.set_label(handler)?;
                a.fninit()?;
                a.mov(dword_ptr(0x5000u32), 0x037Bu32)?;
                a.fldcw(word_ptr(0x5000u32))?;
                a.fld1()?;
                a.fldz()?;
                a.fdivp(st1, st0)?;
                a.wait()?;
                a.fnclex()?;
                a.out(0xF4, al)?;
                Ok(())
            },
            &[],
        );
        i.cpu.cr0 &= !(cr0::EM | cr0::TS | cr0::NE);
        assert_eq!(
            i.run(&mut p),
            Ok(VmExit::Halt {
                interrupts_enabled: false
            })
        );
        assert!(i.ferr());
        let at = i.cpu.eip;
        assert_eq!(
            i.run(&mut p),
            Ok(VmExit::Halt {
                interrupts_enabled: false
            })
        );
        assert_eq!(i.cpu.eip, at, "still frozen on the FWAIT");
        i.set_ignne(true);
        assert_eq!(i.run(&mut p), Ok(VmExit::Io));
        assert!(!i.ferr(), "FNCLEX cleared the error");
    }

    #[test]
    fn rdpmc_reads_the_two_p6_counters_and_faults_on_any_other() {
        // SDM: WRMSR to PerfCtr0/1 writes the low 32 bits, sign-extended to the counter's 40;
        // RDPMC returns all 40 with EDX holding bits 39-32; ECX other than 0 or 1 is #GP(0).
        let (mut i, mut p) = machine(
            |a, handler| {
                a.mov(ecx, 0xC2u32)?;
                a.mov(eax, 0x8000_0005u32)?;
                a.mov(edx, 0x1234u32)?;
                a.wrmsr()?;
                a.mov(ecx, 1u32)?;
                a.rdpmc()?;
                a.out(0x80, eax)?;
                a.mov(eax, edx)?;
                a.out(0x80, eax)?;
                a.mov(ecx, 2u32)?;
                a.rdpmc()?;
                a.out(0xF4, al)?;
                a.hlt()?;
                a.set_label(handler)?;
                report_and_exit(a, 0x6D)
            },
            &[(13, 0x8E)],
        );
        assert_eq!(run_to_exit(&mut i, &mut p), [0x8000_0005, 0xFF, 0x6D]);
    }

    #[test]
    fn undefined_opcodes_and_instructions_the_cpu_lacks_are_invalid_opcodes() {
        for bytes in [
            &[0xC5, 0xE9, 0x6C, 0xF2][..],         // vpunpcklqdq xmm6,xmm2,xmm2
            &[0xC4, 0xE2, 0x79, 0x18, 0xC0],       // vbroadcastss xmm0,xmm0
            &[0x62, 0xF1, 0x7C, 0x48, 0x58, 0xC1], // vaddps zmm0,zmm0,zmm1
            &[0x8F, 0xE9, 0x78, 0x80, 0xC1],       // vfrczps xmm0,xmm1 (XOP)
            &[0x0F, 0x0F, 0xC1, 0x0D],             // pi2fd mm0,mm1 (3DNow!)
            &[0xDF, 0x08],                         // fisttp word [eax] (SSE3)
            &[0xF3, 0x0F, 0xB8, 0xC1],             // popcnt eax,ecx
            &[0x0F, 0x38, 0xF0, 0x00],             // movbe eax,[eax]
            &[0x0F, 0x0D, 0x08],                   // prefetchw [eax]
            &[0x66, 0x0F, 0xD0, 0xC1],             // addsubpd xmm0,xmm1 (SSE3)
            &[0x0F, 0xAA],                         // rsm, outside SMM
            &[0x0F, 0xB9, 0x1F],                   // ud1 ebx,[edi]
            &[0x0F, 0xFF, 0xA3, 0, 0, 0, 0],       // ud0 esp,[ebx]
        ] {
            let (mut i, mut p) = machine(
                |a, handler| {
                    a.db(bytes)?;
                    a.out(0xF4, al)?;
                    a.set_label(handler)?;
                    report_and_exit(a, 0x66)
                },
                &[(6, 0x8E)],
            );
            i.cpu.cr4 |= cr4::OSFXSR;
            assert_eq!(run_to_exit(&mut i, &mut p), [0x66], "{bytes:02x?}");
        }
    }

    #[test]
    fn the_reserved_nop_space_executes_as_nop() {
        let (mut i, mut p) = machine(
            |a, handler| {
                a.db(&[0x0F, 0x19, 0x6C, 0x20, 0x5E])?; // hint nop [eax+5Eh],ebp
                a.db(&[0x0F, 0x1E, 0x04, 0x25, 0x00, 0x00, 0x00, 0xC0])?; // its address unread
                report_and_exit(a, 0x99)?;
                a.set_label(handler)?;
                report_and_exit(a, 0x66)
            },
            &[(6, 0x8E), (13, 0x8E), (14, 0x8E)],
        );
        assert_eq!(run_to_exit(&mut i, &mut p), [0x99]);
    }
}
