//! bt86's binary translator: decoding guest code with iced-x86, translation units, the translation
//! cache, chaining, indirect-branch lookup, host-RIP → guest-EIP maps, and invalidation by
//! guest-physical page (DESIGN.md sections 4 and 5).
//!
//! Nothing is here yet: the translator lands with its own issue, and `bt86 run --engine bt`
//! refuses to start until it does.
