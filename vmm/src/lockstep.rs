//! Lockstep mode (`bt86 run --engine bt --lockstep interp`): the binary translator and the
//! interpreter run the same guest side by side, and the run stops at the first step after
//! which their architectural states differ.
//!
//! bt runs over the VM's memory with chaining and the indirect-branch lookup off, so every
//! translated unit returns to the monitor, and one instruction at a time where bt interprets
//! ([`BtEngine::set_lockstep`]). The reference interpreter runs over a private copy of guest
//! memory (copied when the engine is created, after the loaders ran). After each bt step the
//! reference executes instructions until it has done as much as bt (guest instructions
//! completed plus exceptions raised), and the two complete CPU states are compared: general
//! registers, EIP, EFLAGS, segment registers with their cached descriptors, descriptor tables,
//! control and debug registers, MSRs and the x87/SSE state. Guest memory (RAM and firmware)
//! is compared every [`MEMORY_CHECK_STEPS`] steps and when the guest halts with interrupts
//! disabled or shuts down.
//!
//! Devices are driven once, by bt: the reference interpreter gets the same port and MMIO read
//! values replayed, in order, and must make the same accesses; it reads the same TSC values
//! too. External interrupts are delivered to both. Device DMA into guest memory reaches only
//! the VM's memory, so lockstep supports guests that do programmed I/O.
//!
//! `BT86_LOCKSTEP_CORRUPT=N` is the mode's self-test: after bt's N-th step one bit of its EAX
//! is flipped, and the lockstep report must name that step.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use vmdriver::kvm::InitialCpu;
use vmdriver::{GuestMemory, GuestRegisters, IoHandler, VmExit};

use crate::cpu::CpuState;
use crate::devices::pit::Clock;
use crate::engine::{Engine, EngineError, EngineKind};
use crate::interp::{Interp, TscTape};
use crate::translated::BtEngine;

/// Steps between two comparisons of all of guest memory.
pub const MEMORY_CHECK_STEPS: u64 = 1 << 16;
/// bt steps in one call of [`Engine::run`] before the VM gets a look.
const STEPS_PER_RUN: u32 = 4096;
/// The environment variable of the self-test: flip a bit of bt's EAX after that many steps.
pub const CORRUPT_VAR: &str = "BT86_LOCKSTEP_CORRUPT";
/// Bytes of guest memory compared at a time.
const CHUNK: usize = 1 << 16;

/// Marks an [`Access`] address as a platform MSR's index (`addr` is otherwise a port or a
/// guest-physical address, both below this bit).
const MSR_SPACE: u64 = 1 << 40;

/// One device access, as bt made it. A platform MSR access is a port-space access at
/// `MSR_SPACE | index` whose data is the value (reads: empty when the platform has no such
/// register; writes: the value then the platform's answer, 0 #GP, 1 taken, 2 not the
/// platform's).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Access {
    /// True for MMIO, false for ports.
    mmio: bool,
    write: bool,
    addr: u64,
    data: Vec<u8>,
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (space, dir) = (
            if self.mmio {
                "MMIO"
            } else if self.addr & MSR_SPACE != 0 {
                "MSR"
            } else {
                "port"
            },
            if self.write { "write" } else { "read" },
        );
        write!(f, "{space} {dir} at {:#x} of {:02x?}", self.addr, self.data)
    }
}

/// Performs bt's device accesses and records them.
struct Recorder<'a> {
    io: &'a mut dyn IoHandler,
    log: &'a mut VecDeque<Access>,
}

impl Recorder<'_> {
    fn note(&mut self, mmio: bool, write: bool, addr: u64, data: &[u8]) {
        self.log.push_back(Access {
            mmio,
            write,
            addr,
            data: data.to_vec(),
        });
    }
}

impl IoHandler for Recorder<'_> {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.io.pio_read(port, data);
        self.note(false, false, port.into(), data);
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.io.pio_write(port, data);
        self.note(false, true, port.into(), data);
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.io.mmio_read(addr, data);
        self.note(true, false, addr, data);
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.io.mmio_write(addr, data);
        self.note(true, true, addr, data);
    }
    fn msr_read(&mut self, index: u32) -> Option<u64> {
        let v = self.io.msr_read(index);
        let data = v.map_or(Vec::new(), |v| v.to_le_bytes().to_vec());
        self.note(false, false, MSR_SPACE | u64::from(index), &data);
        v
    }
    fn msr_write(&mut self, index: u32, value: u64) -> Option<bool> {
        let taken = self.io.msr_write(index, value);
        let mut data = value.to_le_bytes().to_vec();
        data.push(taken.map_or(2, u8::from));
        self.note(false, true, MSR_SPACE | u64::from(index), &data);
        taken
    }
}

/// Gives the reference interpreter bt's recorded accesses; notes the first it makes
/// differently.
struct Replayer<'a> {
    log: &'a mut VecDeque<Access>,
    mismatch: &'a mut Option<String>,
}

impl Replayer<'_> {
    fn next(&mut self, mmio: bool, write: bool, addr: u64, data: &mut [u8]) {
        let wanted = Access {
            mmio,
            write,
            addr,
            data: if write {
                data.to_vec()
            } else {
                vec![0; data.len()]
            },
        };
        let got = self.log.pop_front();
        let matches = got.as_ref().is_some_and(|a| {
            a.mmio == mmio
                && a.write == write
                && a.addr == addr
                && a.data.len() == data.len()
                && (!write || a.data == data)
        });
        match got {
            Some(a) if matches => {
                if !write {
                    data.copy_from_slice(&a.data);
                }
            }
            other => {
                data.iter_mut().filter(|_| !write).for_each(|b| *b = 0xFF);
                if self.mismatch.is_none() {
                    let bt = other.map_or("nothing".to_string(), |a| a.to_string());
                    *self.mismatch = Some(format!(
                        "device access differs: interp made a {}, bt made {bt}",
                        if write {
                            wanted.to_string()
                        } else {
                            format!(
                                "{} {} at {addr:#x} of {} bytes",
                                if mmio { "MMIO" } else { "port" },
                                "read",
                                data.len()
                            )
                        }
                    ));
                }
            }
        }
    }
}

impl IoHandler for Replayer<'_> {
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        self.next(false, false, port.into(), data);
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        self.next(false, true, port.into(), &mut data.to_vec());
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        self.next(true, false, addr, data);
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) {
        self.next(true, true, addr, &mut data.to_vec());
    }
    fn msr_read(&mut self, index: u32) -> Option<u64> {
        let addr = MSR_SPACE | u64::from(index);
        match self.log.front() {
            Some(a) if !a.mmio && !a.write && a.addr == addr => {
                let a = self.log.pop_front()?;
                let bytes: [u8; 8] = a.data.as_slice().try_into().ok()?;
                Some(u64::from_le_bytes(bytes))
            }
            _ => {
                self.next(false, false, addr, &mut []);
                None
            }
        }
    }
    fn msr_write(&mut self, index: u32, value: u64) -> Option<bool> {
        let addr = MSR_SPACE | u64::from(index);
        match self.log.front() {
            Some(a)
                if !a.mmio && a.write && a.addr == addr && a.data[..8] == value.to_le_bytes() =>
            {
                let taken = self.log.pop_front()?.data[8];
                (taken != 2).then_some(taken == 1)
            }
            _ => {
                self.next(false, true, addr, &mut value.to_le_bytes().to_vec());
                None
            }
        }
    }
}

/// The reference interpreter's instruction trace, kept for the current step only.
#[derive(Clone, Default)]
struct TraceBuffer(Arc<Mutex<Vec<u8>>>);

impl TraceBuffer {
    fn take(&self) -> String {
        let mut buf = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let text = String::from_utf8_lossy(&buf).into_owned();
        buf.clear();
        text
    }
}

impl std::io::Write for TraceBuffer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// bt checked against the interpreter, step by step.
pub struct LockstepEngine {
    bt: BtEngine,
    reference: Interp,
    memory: Arc<GuestMemory>,
    ref_memory: Arc<GuestMemory>,
    accesses: VecDeque<Access>,
    trace: TraceBuffer,
    steps: u64,
    corrupt_at: Option<u64>,
}

impl LockstepEngine {
    /// bt over `memory`, and the reference interpreter over a copy of it, both in `initial`
    /// state.
    pub fn new(
        memory: Arc<GuestMemory>,
        initial: InitialCpu,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, EngineError> {
        let setup = |what: String| EngineError::LockstepSetup(what);
        let corrupt_at = match std::env::var(CORRUPT_VAR) {
            Ok(v) => Some(
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| setup(format!("{CORRUPT_VAR}={v:?} is not a step count")))?,
            ),
            Err(_) => None,
        };
        let ref_memory = Arc::new(
            GuestMemory::new(*memory.layout())
                .map_err(|e| setup(format!("no memory for the reference interpreter: {e}")))?,
        );
        let mut chunk = vec![0u8; CHUNK];
        for r in memory.layout().regions() {
            let mut at = r.guest_addr;
            while at < r.end() {
                let n = CHUNK.min((r.end() - at) as usize);
                let copied = memory
                    .read(at, &mut chunk[..n])
                    .and_then(|()| ref_memory.write(at, &chunk[..n]));
                copied.map_err(|e| setup(format!("copying guest memory: {e}")))?;
                at += n as u64;
            }
        }
        let tape: TscTape = Arc::default();
        let mut bt_interp = Interp::new(memory.clone(), initial);
        bt_interp.set_clock(clock);
        bt_interp.record_tsc(tape.clone());
        let mut bt = BtEngine::new(bt_interp, memory.clone())?;
        bt.set_lockstep(true);
        let mut reference = Interp::new(ref_memory.clone(), initial);
        reference.replay_tsc(tape);
        reference.track_undefined_flags();
        let trace = TraceBuffer::default();
        reference.set_trace(Box::new(trace.clone()));
        Ok(Self {
            bt,
            reference,
            memory,
            ref_memory,
            accesses: VecDeque::new(),
            trace,
            steps: 0,
            corrupt_at,
        })
    }

    /// Progress as both engines count it: guest instructions completed plus exceptions raised.
    fn progress(interp: &Interp, translated: u64) -> u64 {
        let c = interp.counters();
        translated + c[0].1 + c[1].1
    }

    /// Lets the reference interpreter catch up with bt, then compares them. `what` names the
    /// step for the report.
    fn check(&mut self, what: &str, before: &CpuState) -> Result<(), EngineError> {
        let bt_progress = self.bt.guest_instructions() + self.bt.interp().counters()[1].1;
        let mut mismatch = None;
        while Self::progress(&self.reference, 0) < bt_progress && mismatch.is_none() {
            let mut io = Replayer {
                log: &mut self.accesses,
                mismatch: &mut mismatch,
            };
            self.reference.step_one(&mut io)?;
            self.reference.take_tlb_events();
        }
        if mismatch.is_none() && !self.accesses.is_empty() {
            let a = self.accesses.front().map(ToString::to_string);
            mismatch = Some(format!(
                "device access differs: bt made a {}, interp did not",
                a.unwrap_or_default()
            ));
        }
        self.accesses.clear();
        let trace = self.trace.take();
        // Flags the SDM leaves undefined may differ (the host CPU computed bt's): where they
        // are all that differs, the reference takes bt's values, as later code may read them.
        let undefined = self.reference.take_undefined_flags();
        let bt_flags = self.bt.interp().cpu().eflags;
        let ref_flags = &mut self.reference.cpu_mut().eflags;
        if (bt_flags ^ *ref_flags) & !undefined == 0 {
            *ref_flags = bt_flags;
        }
        let (b, r) = (self.bt.interp().cpu(), self.reference.cpu());
        if mismatch.is_none() && b == r {
            return Ok(());
        }
        let mut text = format!(
            "lockstep: bt and interp diverge at step {} ({what} at {:04x}:{:08x}), after guest \
             instruction {}",
            self.steps,
            before.seg[1].selector,
            before.eip,
            self.bt.guest_instructions(),
        );
        if let Some(m) = mismatch {
            let _ = write!(text, "\n{m}");
        }
        let _ = write!(
            text,
            "\nthe step's instructions, as interp executed them:\n{}",
            indent(&trace)
        );
        text += &format_states(b, r);
        Err(EngineError::Diverged(text))
    }

    /// Compares all of guest memory; reports the first differing bytes.
    fn check_memory(&self) -> Result<(), EngineError> {
        let (mut a, mut b) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        for r in self.memory.layout().regions() {
            let mut at = r.guest_addr;
            while at < r.end() {
                let n = CHUNK.min((r.end() - at) as usize);
                let read = self
                    .memory
                    .read(at, &mut a[..n])
                    .and_then(|()| self.ref_memory.read(at, &mut b[..n]));
                read.map_err(|e| EngineError::LockstepSetup(format!("comparing memory: {e}")))?;
                if a[..n] == b[..n] {
                    at += n as u64;
                    continue;
                }
                if let Some(i) = (0..n).find(|&i| a[i] != b[i]) {
                    let end = (i + 16).min(n);
                    return Err(EngineError::Diverged(format!(
                        "lockstep: guest memory differs at guest-physical {:#010x} (checked at step \
                         {}, after guest instruction {}; memory is compared every {} steps)\n  \
                         bt:     {:02x?}\n  interp: {:02x?}{}",
                        at + i as u64,
                        self.steps,
                        self.bt.guest_instructions(),
                        MEMORY_CHECK_STEPS,
                        &a[i..end],
                        &b[i..end],
                        format_states(self.bt.interp().cpu(), self.reference.cpu()),
                    )));
                }
                at += n as u64;
            }
        }
        Ok(())
    }
}

fn indent(text: &str) -> String {
    let lines: Vec<_> = text.lines().collect();
    // A step is one unit (at most a few dozen instructions) or one instruction; keep the
    // report short even so.
    let skip = lines.len().saturating_sub(64);
    let mut out = String::new();
    if skip > 0 {
        let _ = writeln!(out, "  ... {skip} earlier instructions");
    }
    for l in &lines[skip..] {
        let _ = writeln!(out, "  {l}");
    }
    if lines.is_empty() {
        out += "  (none: the step delivered an interrupt or changed no instruction count)\n";
    }
    out
}

/// Both states side by side, differing rows marked, then any other state that differs.
fn format_states(b: &CpuState, r: &CpuState) -> String {
    let mut rows: Vec<(&str, u64, u64)> = Vec::new();
    const GPR: [&str; 8] = ["EAX", "ECX", "EDX", "EBX", "ESP", "EBP", "ESI", "EDI"];
    for (i, name) in GPR.iter().enumerate() {
        rows.push((name, b.gpr[i].into(), r.gpr[i].into()));
    }
    rows.push(("EIP", b.eip.into(), r.eip.into()));
    rows.push(("EFLAGS", b.eflags.into(), r.eflags.into()));
    for (i, name) in ["ES", "CS", "SS", "DS", "FS", "GS"].iter().enumerate() {
        rows.push((name, b.seg[i].selector.into(), r.seg[i].selector.into()));
    }
    for (name, x, y) in [
        ("CR0", b.cr0, r.cr0),
        ("CR2", b.cr2, r.cr2),
        ("CR3", b.cr3, r.cr3),
        ("CR4", b.cr4, r.cr4),
    ] {
        rows.push((name, x.into(), y.into()));
    }
    let mut out = String::from("\n          bt        interp\n");
    let mut differing = Vec::new();
    for (name, x, y) in rows {
        let mark = if x == y { "" } else { "   <- differs" };
        if x != y {
            differing.push(name);
        }
        let _ = writeln!(out, "  {name:<7} {x:08x}  {y:08x}{mark}");
    }
    let others = [
        ("segment descriptors", b.seg != r.seg),
        ("GDTR", b.gdtr != r.gdtr),
        ("IDTR", b.idtr != r.idtr),
        ("LDTR", b.ldtr != r.ldtr),
        ("TR", b.tr != r.tr),
        ("debug registers", b.dr != r.dr),
        ("MSRs", b.msrs != r.msrs),
        ("x87/SSE state", b.fx != r.fx),
    ];
    for (name, differs) in others {
        if differs {
            differing.push(name);
        }
    }
    if !differing.is_empty() {
        let _ = writeln!(out, "differing: {}", differing.join(", "));
    }
    out
}

impl Engine for LockstepEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Bt
    }

    fn run(&mut self, io: &mut dyn IoHandler) -> Result<VmExit, EngineError> {
        for _ in 0..STEPS_PER_RUN {
            let before = self.bt.interp().cpu().clone();
            let exit = {
                let mut rec = Recorder {
                    io: &mut *io,
                    log: &mut self.accesses,
                };
                self.bt.step_unit(&mut rec)?
            };
            self.steps += 1;
            if self.corrupt_at == Some(self.steps) {
                // The self-test: a wrong result, as a translator bug would leave it.
                self.bt.interp_mut().cpu_mut().gpr[0] ^= 1;
            }
            self.check("the bt step", &before)?;
            // A halt that nothing can wake, or a shutdown, is the end of the run.
            let last = matches!(
                exit,
                Some(
                    VmExit::Halt {
                        interrupts_enabled: false
                    } | VmExit::Shutdown
                )
            );
            if last || self.steps.is_multiple_of(MEMORY_CHECK_STEPS) {
                self.check_memory()?;
            }
            if let Some(exit) = exit {
                return Ok(exit);
            }
        }
        Ok(VmExit::Interrupted)
    }

    fn registers(&self) -> Result<GuestRegisters, EngineError> {
        Ok(self.bt.interp().registers())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut v = self.bt.counters();
        v.push(("lockstep steps", self.steps));
        v
    }

    fn tsc_hz(&self) -> Option<u64> {
        Some(crate::interp::system::TSC_HZ)
    }

    fn ferr(&self) -> bool {
        self.bt.interp().ferr()
    }

    fn set_ignne(&mut self, asserted: bool) {
        self.bt.interp_mut().set_ignne(asserted);
        self.reference.set_ignne(asserted);
    }

    fn supports_interrupts(&self) -> bool {
        true
    }

    fn interrupt_window(&self) -> bool {
        self.bt.interp().interrupt_window()
    }

    fn inject_interrupt(
        &mut self,
        vector: u8,
        io: &mut dyn IoHandler,
    ) -> Result<Option<VmExit>, EngineError> {
        let before = self.bt.interp().cpu().clone();
        let exit = {
            let mut rec = Recorder {
                io: &mut *io,
                log: &mut self.accesses,
            };
            self.bt.interp_mut().inject_interrupt(vector, &mut rec)?
        };
        let mut mismatch = None;
        let mut replay = Replayer {
            log: &mut self.accesses,
            mismatch: &mut mismatch,
        };
        self.reference.inject_interrupt(vector, &mut replay)?;
        if let Some(m) = mismatch {
            return Err(EngineError::Diverged(format!(
                "lockstep: delivering interrupt {vector:#x}: {m}"
            )));
        }
        self.check(&format!("delivering interrupt {vector:#x}"), &before)?;
        Ok(exit)
    }
}
