//! bt86's shadow MMU: guest page-table walks, address-space windows (the host's page tables as
//! shadow page tables), hidden vs true page faults, traces on guest page-table pages, accessed and
//! dirty bits, INVLPG and CR3 semantics (DESIGN.md section 3).
//!
//! Nothing is here yet: it lands with the shadow-MMU issue, after the translator.
