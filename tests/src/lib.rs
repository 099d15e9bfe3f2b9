//! bt86's workspace-level test support: the guest test-kernel kit, its catalog of kernels,
//! runners for bt86 itself and for the QEMU reference, and the native oracle that checks the
//! interpreter against the host CPU.

pub mod console;
pub mod kernels;
pub mod linux_guest;
pub use bt86_guests::kit;
pub mod mmu_kernels;
pub mod oracle;
pub mod runner;
pub mod translator_kernels;
