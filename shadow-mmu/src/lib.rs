//! bt86's shadow MMU: guest page-table walks, address-space windows (the host's page tables as
//! shadow page tables), hidden vs true page faults, traces on guest page-table pages, accessed and
//! dirty bits, INVLPG and CR3 semantics (DESIGN.md section 3).
//!
//! - [`walk`]: the guest page-table walk, shared with the interpreter.
//! - [`space`]: the shadow address spaces the translator's code runs in, and the classification
//!   of every fault in them.

pub mod space;
pub mod walk;

pub use space::{Fault, Paging, ShadowError, ShadowMmu, ShadowStats};
pub use walk::{Access, Mode, PageFault, PhysMem, Translation};
