//! The host side of the bt86 monitor (VMware's "VMDriver"): everything that touches the host kernel
//! on behalf of the virtual machine.
//!
//! - [`memory`]: guest-physical memory as one memfd, laid out like a PC.
//! - [`exit`]: the [`VmExit`] enum every engine returns, and the [`IoHandler`] through which engines
//!   complete port and MMIO accesses.
//! - [`host`]: facts about the host the monitor measures itself (the TSC rate, a thread's CPU time).
//! - [`kick`]: a periodic signal that brings a thread out of a blocking `KVM_RUN`.
//! - [`fpu`]: runs guest x87/MMX/SSE/SSE2 instructions on the host FPU, on the guest's FXSAVE image.
//! - [`kvm`]: the KVM engine (hardware-assisted on hosts with VT-x/AMD-V).
//! - [`native`]: runs unprivileged 32-bit snippets on the host CPU in a 32-bit compatibility-mode
//!   sandbox, the reference the engines' instruction semantics are checked against.
//! - [`window`]: address-space windows, where translated code sees guest memory.
//! - [`codecache`]: the memory translated code lives in (written and executed through different
//!   mappings).
//! - [`world`]: the world switch into and out of translated code, the signal handlers that turn
//!   host faults in it into monitor events, and Syscall User Dispatch as a safety net.
//!
//! This crate decides no policy: it never interprets what a guest does, it only carries it out.

pub mod codecache;
pub mod exit;
pub mod fpu;
pub mod host;
pub mod kick;
pub mod kvm;
pub mod memory;
pub mod native;
pub mod window;
pub mod world;

pub use exit::{GuestRegisters, IoHandler, VmExit};
pub use memory::{GuestMemory, MemoryError, MemoryLayout, Region, RegionKind};
