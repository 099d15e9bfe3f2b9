//! bt86's shadow MMU: guest page-table walks, address-space windows (the host's page tables as
//! shadow page tables), hidden vs true page faults, traces on guest page-table pages, accessed and
//! dirty bits, INVLPG and CR3 semantics (DESIGN.md section 3).
//!
//! Built so far: [`walk`], the guest page-table walk the interpreter uses today and the shadow
//! address spaces will use when the translator needs them.

pub mod walk;

pub use walk::{Access, Mode, PageFault, PhysMem, Translation};
