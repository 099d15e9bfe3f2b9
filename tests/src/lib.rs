//! bt86's workspace-level test support: the guest test-kernel kit, its catalog of kernels, and
//! runners for bt86 itself and for the QEMU reference.

pub mod kernels;
pub mod kit;
pub mod runner;
