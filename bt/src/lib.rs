//! bt86's binary translator: decoding guest code with iced-x86, translation units, the translation
//! cache, chaining, indirect-branch lookup, host-RIP → guest-EIP maps, and invalidation by
//! guest-physical page (DESIGN.md sections 4 and 5).
//!
//! - [`translate`]: one unit, from guest bytes to host code (the rewrite rules).
//! - `encode`: the one-pass encoder that places a unit's host instructions (the fast path in
//!   front of iced's `BlockEncoder`).
//! - [`cache`]: the units of one vCPU, their chaining, lookup table and invalidation.
//!
//! The translator knows nothing about devices or paging policy: it reads guest code through a
//! [`translate::CodeSource`] and the `vmm` engine decides when to translate, enter and
//! invalidate.

pub mod cache;
mod encode;
pub mod translate;

pub use cache::{CacheError, CacheStats, Translator, Unit};
pub use translate::{
    CROSS_FROM, CodeSource, MAX_INSTRUCTIONS, MID_UNIT, Mode, TranslateError, may_cross_page,
};
