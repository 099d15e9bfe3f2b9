//! The engines that run guest code, behind one trait.

use std::sync::Arc;

use vmdriver::kvm::{InitialCpu, KvmError, KvmVm};
use vmdriver::{GuestMemory, GuestRegisters, IoHandler, VmExit};

use crate::devices::pit::Clock;
use crate::interp::{Interp, InterpError};
use crate::lockstep::LockstepEngine;
use crate::translated::{BtEngine, BtError};

/// Which engine runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// KVM: hardware-assisted virtualization through /dev/kvm.
    Kvm,
    /// The IA-32 interpreter.
    Interp,
    /// The binary translator.
    Bt,
}

impl EngineKind {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Kvm => "kvm",
            EngineKind::Interp => "interp",
            EngineKind::Bt => "bt",
        }
    }

    /// Engines this build can run.
    pub fn available() -> &'static [EngineKind] {
        &[EngineKind::Kvm, EngineKind::Interp, EngineKind::Bt]
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors from an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The KVM engine failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The interpreter stopped.
    #[error(transparent)]
    Interp(#[from] InterpError),
    /// The binary translator stopped.
    #[error(transparent)]
    Bt(#[from] BtError),
    /// The engine cannot trace instructions.
    #[error("--trace is only available with the interp engine, not {0}")]
    NoTrace(EngineKind),
    /// Lockstep mode checks the bt engine only.
    #[error("--lockstep interp checks the bt engine, not {0}")]
    NoLockstep(EngineKind),
    /// Lockstep mode could not start (no memory for the reference, a bad self-test setting).
    #[error("lockstep mode cannot start: {0}")]
    LockstepSetup(String),
    /// Lockstep mode found bt and the interpreter in different states: the report.
    #[error("{0}")]
    Diverged(String),
}

/// An engine: something that runs the vCPU until the VM must look at what happened.
pub trait Engine {
    /// The engine's kind.
    fn kind(&self) -> EngineKind;
    /// Runs guest code; port and MMIO accesses are completed through `io` before returning
    /// [`VmExit::Io`].
    fn run(&mut self, io: &mut dyn IoHandler) -> Result<VmExit, EngineError>;
    /// The vCPU's registers, for reports.
    fn registers(&self) -> Result<GuestRegisters, EngineError>;
    /// Engine-specific counters for `--stats` (name, value).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// The rate at which the guest's TSC advances, in Hz, if the engine knows it.
    fn tsc_hz(&self) -> Option<u64> {
        None
    }
    /// Whether this engine can take interrupts from the VM's interrupt controller.
    fn supports_interrupts(&self) -> bool {
        false
    }
    /// Whether a maskable interrupt can be delivered now (IF set, no interrupt shadow).
    fn interrupt_window(&self) -> bool {
        false
    }
    /// Asks the engine to return as soon as an interrupt can be delivered (engines that check
    /// for interrupts on every return anyway need nothing).
    fn request_interrupt_window(&mut self) {}
    /// When the VM's next timer event is due, in nanoseconds of VM time from now (None: no
    /// timer is armed): an engine that may run guest code for long without returning should
    /// return by then, so the VM can raise the interrupt on time.
    fn set_timer_deadline(&mut self, within_ns: Option<u64>) {
        let _ = within_ns;
    }
    /// The FERR# output: an x87 error waits to be reported outside the CPU (CR0.NE = 0).
    fn ferr(&self) -> bool {
        false
    }
    /// Drives the IGNNE# input: while asserted, x87 errors are ignored by waiting instructions.
    fn set_ignne(&mut self, asserted: bool) {
        let _ = asserted;
    }
    /// What makes this engine return to the run loop soon when called from another thread (an
    /// I/O completion), if running guest code would otherwise not notice for a while.
    fn io_waker(&self) -> Option<crate::block::IoWaker> {
        None
    }
    /// Delivers external interrupt `vector`; returns an exit if delivery shut the CPU down.
    fn inject_interrupt(
        &mut self,
        vector: u8,
        io: &mut dyn IoHandler,
    ) -> Result<Option<VmExit>, EngineError> {
        let _ = (vector, io);
        Ok(None)
    }
}

/// Creates the engine `kind` over `memory`, with the vCPU in `initial` state and (bt, interp)
/// its TSC counting `clock`; with `lockstep`, bt checked step by step against the interpreter
/// ([`LockstepEngine`]).
pub fn create(
    kind: EngineKind,
    memory: Arc<GuestMemory>,
    initial: InitialCpu,
    clock: Arc<dyn Clock>,
    trace: Option<Box<dyn std::io::Write + Send>>,
    lockstep: bool,
) -> Result<Box<dyn Engine>, EngineError> {
    if trace.is_some() && kind != EngineKind::Interp {
        return Err(EngineError::NoTrace(kind));
    }
    if lockstep {
        if kind != EngineKind::Bt {
            return Err(EngineError::NoLockstep(kind));
        }
        return Ok(Box::new(LockstepEngine::new(memory, initial, clock)?));
    }
    match kind {
        EngineKind::Kvm => {
            let mut vm = KvmVm::new(memory)?;
            vm.set_initial_state(initial)?;
            Ok(Box::new(KvmEngine { vm }))
        }
        EngineKind::Interp => {
            let mut interp = Interp::new(memory, initial);
            interp.set_clock(clock);
            if let Some(out) = trace {
                interp.set_trace(out);
            }
            Ok(Box::new(interp))
        }
        EngineKind::Bt => {
            let mut interp = Interp::new(memory.clone(), initial);
            interp.set_clock(clock);
            Ok(Box::new(BtEngine::new(interp, memory)?))
        }
    }
}

struct KvmEngine {
    vm: KvmVm,
}

impl Engine for KvmEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Kvm
    }

    fn run(&mut self, io: &mut dyn IoHandler) -> Result<VmExit, EngineError> {
        Ok(self.vm.run(io)?)
    }

    fn registers(&self) -> Result<GuestRegisters, EngineError> {
        Ok(self.vm.registers()?)
    }

    fn tsc_hz(&self) -> Option<u64> {
        self.vm.tsc_hz()
    }

    fn supports_interrupts(&self) -> bool {
        true
    }

    fn interrupt_window(&self) -> bool {
        self.vm.interrupt_window()
    }

    fn request_interrupt_window(&mut self) {
        self.vm.request_interrupt_window();
    }

    fn inject_interrupt(
        &mut self,
        vector: u8,
        _io: &mut dyn IoHandler,
    ) -> Result<Option<VmExit>, EngineError> {
        self.vm.inject_interrupt(vector)?;
        Ok(None)
    }
}

impl Engine for Interp {
    fn kind(&self) -> EngineKind {
        EngineKind::Interp
    }

    fn run(&mut self, io: &mut dyn IoHandler) -> Result<VmExit, EngineError> {
        Ok(Interp::run(self, io)?)
    }

    fn registers(&self) -> Result<GuestRegisters, EngineError> {
        Ok(Interp::registers(self))
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        Interp::counters(self).to_vec()
    }

    fn tsc_hz(&self) -> Option<u64> {
        Some(crate::interp::system::TSC_HZ)
    }

    fn supports_interrupts(&self) -> bool {
        true
    }

    fn interrupt_window(&self) -> bool {
        Interp::interrupt_window(self)
    }

    fn ferr(&self) -> bool {
        Interp::ferr(self)
    }

    fn set_ignne(&mut self, asserted: bool) {
        Interp::set_ignne(self, asserted)
    }

    fn inject_interrupt(
        &mut self,
        vector: u8,
        io: &mut dyn IoHandler,
    ) -> Result<Option<VmExit>, EngineError> {
        Ok(Interp::inject_interrupt(self, vector, io)?)
    }
}

impl Engine for BtEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Bt
    }

    fn run(&mut self, io: &mut dyn IoHandler) -> Result<VmExit, EngineError> {
        Ok(BtEngine::run(self, io)?)
    }

    fn registers(&self) -> Result<GuestRegisters, EngineError> {
        Ok(self.interp().registers())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        BtEngine::counters(self)
    }

    fn tsc_hz(&self) -> Option<u64> {
        // RDTSC is a callout into the interpreter's handler.
        Some(crate::interp::system::TSC_HZ)
    }

    // x87 instructions are callouts too: the interpreter holds FERR# and IGNNE#.
    fn ferr(&self) -> bool {
        self.interp().ferr()
    }

    fn set_ignne(&mut self, asserted: bool) {
        self.interp_mut().set_ignne(asserted)
    }

    fn supports_interrupts(&self) -> bool {
        true
    }

    fn interrupt_window(&self) -> bool {
        self.interp().interrupt_window()
    }

    fn set_timer_deadline(&mut self, within_ns: Option<u64>) {
        BtEngine::set_timer_deadline(self, within_ns);
    }

    fn request_interrupt_window(&mut self) {
        BtEngine::request_interrupt_window(self);
    }

    fn io_waker(&self) -> Option<crate::block::IoWaker> {
        Some(self.io_waker())
    }

    fn inject_interrupt(
        &mut self,
        vector: u8,
        io: &mut dyn IoHandler,
    ) -> Result<Option<VmExit>, EngineError> {
        Ok(self.interp_mut().inject_interrupt(vector, io)?)
    }
}
