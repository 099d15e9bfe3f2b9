//! bt86's virtual machine monitor (VMware's "VMM"): the [`Vm`] — guest memory, the port and MMIO
//! buses with their device models, kernel loaders — and the run loop that drives an engine.
//!
//! `vmm` never does host I/O itself: device output goes through injected writers, and everything
//! that touches the host kernel lives in `vmdriver`.

pub mod acpi;
pub mod block;
pub mod bus;
pub mod chipset;
pub mod control;
pub mod cpu;
pub mod devices;
pub mod engine;
pub mod interp;
pub mod loader;
pub mod lockstep;
pub mod platform;
pub mod translated;
pub mod vm;

pub use control::{StopRequest, VmControl};
pub use engine::{EngineError, EngineKind};
pub use loader::multiboot::BootModule;
pub use vm::{BootSource, RunOutcome, Vm, VmConfig, VmError, VmStats};
pub use vmdriver::GuestRegisters;
