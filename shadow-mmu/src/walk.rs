//! The guest page-table walk of a P6-class processor: 2-level 32-bit paging with 4 KiB pages and
//! (CR4.PSE) 4 MiB pages, and PAE paging (CR4.PAE) with 4 KiB and 2 MiB pages, with the U/S and
//! R/W checks (CR0.WP for supervisor writes), accessed/dirty updates and #PF error codes of the
//! Intel SDM vol. 3, chapter 4.
//!
//! The walk is a pure function of guest physical memory, reached through [`PhysMem`], so the
//! interpreter and the translator's shadow page tables share it.

/// Guest physical memory as the walker reads and updates page-table entries.
pub trait PhysMem {
    /// Reads the 32-bit little-endian value at guest-physical `addr` (all ones if unbacked).
    fn read_u32(&mut self, addr: u64) -> u32;
    /// Writes a 32-bit little-endian value at guest-physical `addr` (dropped if unbacked).
    fn write_u32(&mut self, addr: u64, value: u32);

    /// Reads a 64-bit entry as two 32-bit halves.
    fn read_u64(&mut self, addr: u64) -> u64 {
        u64::from(self.read_u32(addr)) | (u64::from(self.read_u32(addr + 4)) << 32)
    }
}

/// Entry bits shared by every level.
pub mod pte {
    /// Present.
    pub const P: u64 = 1 << 0;
    /// Writable.
    pub const RW: u64 = 1 << 1;
    /// User-accessible.
    pub const US: u64 = 1 << 2;
    /// Accessed.
    pub const A: u64 = 1 << 5;
    /// Dirty (last level only).
    pub const D: u64 = 1 << 6;
    /// Page size (in a directory entry: a large page).
    pub const PS: u64 = 1 << 7;
    /// Global (last level, with CR4.PGE).
    pub const G: u64 = 1 << 8;
}

/// #PF error-code bits.
pub mod error {
    /// The page was present (a protection violation) rather than not present.
    pub const PRESENT: u32 = 1 << 0;
    /// The access was a write.
    pub const WRITE: u32 = 1 << 1;
    /// The access was made at CPL 3.
    pub const USER: u32 = 1 << 2;
    /// A reserved bit was set in an entry.
    pub const RSVD: u32 = 1 << 3;
}

/// The paging configuration from CR0, CR3 and CR4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// CR3.
    pub cr3: u32,
    /// CR4.PAE.
    pub pae: bool,
    /// CR4.PSE (ignored under PAE, where large pages always exist).
    pub pse: bool,
    /// CR0.WP: supervisor writes honour read-only pages.
    pub wp: bool,
    /// CR4.PGE: the G bit marks global translations.
    pub pge: bool,
}

/// What kind of access is being translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// A write (or a read-modify-write).
    pub write: bool,
    /// Made at CPL 3 (implicit supervisor accesses such as descriptor loads are not).
    pub user: bool,
}

/// A successful translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Guest-physical address of the byte.
    pub phys: u64,
    /// Guest-physical address of the start of the page (4 KiB granular, for TLBs).
    pub frame: u64,
    /// Whether user accesses are allowed through every level.
    pub user: bool,
    /// Whether writes are allowed through every level (before CR0.WP is applied).
    pub writable: bool,
    /// Whether the last-level entry is dirty (writes through a TLB entry need it set).
    pub dirty: bool,
    /// Whether the translation is global (G set and CR4.PGE on).
    pub global: bool,
    /// Size of the page: 4 KiB, 2 MiB or 4 MiB.
    pub page_size: u32,
    /// Guest-physical addresses of the entries the walk used: the directory entry, then the
    /// table entry (None for a large page). The shadow MMU traces the pages holding them.
    pub entries: [Option<u64>; 2],
}

/// A page fault: the error code the CPU pushes (CR2 is the linear address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The #PF error code.
    pub error: u32,
}

/// Physical-address bits a P6 with PAE supports (36): higher bits in an entry are reserved.
const PAE_ADDR_MASK: u64 = 0x0000_000F_FFFF_F000;
const PAE_RESERVED: u64 = !0x0000_000F_FFFF_FFFF;

/// Reserved bits of a PAE page-directory-pointer-table entry (SDM table 4-8).
pub const PDPTE_RESERVED: u64 = PAE_RESERVED | 0x1E6;

/// The four PDPTEs PAE paging reads when CR3 is loaded. Returns None if one that is present has
/// reserved bits set (the MOV to CR3/CR0/CR4 then raises #GP).
pub fn load_pdptes(mem: &mut dyn PhysMem, cr3: u32) -> Option<[u64; 4]> {
    let base = u64::from(cr3 & !0x1F);
    let mut out = [0u64; 4];
    for (i, e) in out.iter_mut().enumerate() {
        *e = mem.read_u64(base + 8 * i as u64);
        if *e & pte::P != 0 && *e & PDPTE_RESERVED != 0 {
            return None;
        }
    }
    Some(out)
}

/// Translates `linear` for `access`, setting accessed (and, for writes, dirty) bits in the guest
/// page tables as the CPU does. `pdptes` are the PDPTEs loaded with CR3 (PAE only).
pub fn walk(
    mem: &mut dyn PhysMem,
    mode: Mode,
    pdptes: &[u64; 4],
    linear: u32,
    access: Access,
) -> Result<Translation, PageFault> {
    let base_error =
        if access.write { error::WRITE } else { 0 } | if access.user { error::USER } else { 0 };
    let not_present = PageFault { error: base_error };
    let reserved = PageFault {
        error: base_error | error::PRESENT | error::RSVD,
    };
    // Each level's entry address and value, for the permission check and the A/D updates.
    let mut levels: [(u64, u64); 2] = [(0, 0); 2];
    let (leaf_level, page_size, frame);
    if mode.pae {
        let pdpte = pdptes[(linear >> 30) as usize];
        if pdpte & pte::P == 0 {
            return Err(not_present);
        }
        let pde_addr = (pdpte & PAE_ADDR_MASK) + 8 * u64::from((linear >> 21) & 0x1FF);
        let pde = mem.read_u64(pde_addr);
        if pde & pte::P == 0 {
            return Err(not_present);
        }
        levels[0] = (pde_addr, pde);
        if pde & pte::PS != 0 {
            if pde & (PAE_RESERVED | 0x1F_E000) != 0 {
                return Err(reserved);
            }
            leaf_level = 0;
            page_size = 2 << 20;
            frame = (pde & 0x0000_000F_FFE0_0000) | u64::from(linear & 0x1F_F000);
        } else {
            if pde & PAE_RESERVED != 0 {
                return Err(reserved);
            }
            let pte_addr = (pde & PAE_ADDR_MASK) + 8 * u64::from((linear >> 12) & 0x1FF);
            let e = mem.read_u64(pte_addr);
            if e & pte::P == 0 {
                return Err(not_present);
            }
            if e & PAE_RESERVED != 0 {
                return Err(reserved);
            }
            levels[1] = (pte_addr, e);
            leaf_level = 1;
            page_size = 4096;
            frame = e & PAE_ADDR_MASK;
        }
    } else {
        let pde_addr = u64::from(mode.cr3 & 0xFFFF_F000) + 4 * u64::from(linear >> 22);
        let pde = u64::from(mem.read_u32(pde_addr));
        if pde & pte::P == 0 {
            return Err(not_present);
        }
        levels[0] = (pde_addr, pde);
        if pde & pte::PS != 0 && mode.pse {
            leaf_level = 0;
            page_size = 4 << 20;
            frame = (pde & 0xFFC0_0000) | u64::from(linear & 0x3F_F000);
        } else {
            let pte_addr = (pde & 0xFFFF_F000) + 4 * u64::from((linear >> 12) & 0x3FF);
            let e = u64::from(mem.read_u32(pte_addr));
            if e & pte::P == 0 {
                return Err(not_present);
            }
            levels[1] = (pte_addr, e);
            leaf_level = 1;
            page_size = 4096;
            frame = e & 0xFFFF_F000;
        }
    }
    let path = &levels[..=leaf_level];
    let user = path.iter().all(|(_, e)| e & pte::US != 0);
    let writable = path.iter().all(|(_, e)| e & pte::RW != 0);
    let denied = (access.user && !user) || (access.write && !writable && (access.user || mode.wp));
    if denied {
        return Err(PageFault {
            error: base_error | error::PRESENT,
        });
    }
    // Accessed on every level walked; dirty on the leaf for writes.
    let leaf = path[leaf_level];
    for (i, (addr, e)) in path.iter().enumerate() {
        let mut new = *e | pte::A;
        if i == leaf_level && access.write {
            new |= pte::D;
        }
        if new != *e {
            // Only the low 32 bits hold A and D, in either format.
            mem.write_u32(*addr, new as u32);
        }
    }
    let dirty = access.write || leaf.1 & pte::D != 0;
    Ok(Translation {
        phys: frame | u64::from(linear & 0xFFF),
        frame,
        user,
        writable,
        dirty,
        global: mode.pge && leaf.1 & pte::G != 0,
        page_size,
        entries: [Some(levels[0].0), (leaf_level == 1).then_some(levels[1].0)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Mem(HashMap<u64, u32>);
    impl PhysMem for Mem {
        fn read_u32(&mut self, addr: u64) -> u32 {
            *self.0.get(&addr).unwrap_or(&0)
        }
        fn write_u32(&mut self, addr: u64, value: u32) {
            self.0.insert(addr, value);
        }
    }

    const R: Access = Access {
        write: false,
        user: false,
    };
    const W: Access = Access {
        write: true,
        user: false,
    };
    const UR: Access = Access {
        write: false,
        user: true,
    };
    const UW: Access = Access {
        write: true,
        user: true,
    };

    fn legacy(wp: bool) -> Mode {
        Mode {
            cr3: 0x1000,
            pae: false,
            pse: true,
            wp,
            pge: true,
        }
    }

    /// Maps linear 0x0040_3000 -> 0x0077_7000 through PD 0x1000 and PT 0x2000.
    fn two_level(pde_flags: u32, pte_flags: u32) -> Mem {
        let mut m = Mem::default();
        m.write_u32(0x1000 + 4, 0x2000 | pde_flags);
        m.write_u32(0x2000 + 4 * 3, 0x0077_7000 | pte_flags);
        m
    }

    #[test]
    fn four_k_translation_sets_accessed_then_dirty() {
        let mut m = two_level(0x7, 0x7);
        let t = walk(&mut m, legacy(true), &[0; 4], 0x0040_3ABC, R).unwrap();
        assert_eq!(t.phys, 0x0077_7ABC);
        assert_eq!((t.page_size, t.dirty), (4096, false));
        assert_eq!(t.entries, [Some(0x1004), Some(0x200C)]);
        assert_eq!(m.read_u32(0x1004) & 0x20, 0x20, "PDE accessed");
        assert_eq!(m.read_u32(0x200C) & 0x60, 0x20, "PTE accessed, not dirty");
        let t = walk(&mut m, legacy(true), &[0; 4], 0x0040_3000, W).unwrap();
        assert!(t.dirty);
        assert_eq!(m.read_u32(0x200C) & 0x60, 0x60, "PTE dirty after a write");
        assert_eq!(
            m.read_u32(0x1004) & 0x40,
            0,
            "directory entries never get D"
        );
    }

    #[test]
    fn not_present_faults_carry_access_bits() {
        let mut m = two_level(0x7, 0x6); // PTE not present
        let e = walk(&mut m, legacy(true), &[0; 4], 0x0040_3000, UW).unwrap_err();
        assert_eq!(e.error, error::WRITE | error::USER);
        let e = walk(&mut m, legacy(true), &[0; 4], 0x0080_0000, R).unwrap_err();
        assert_eq!(e.error, 0, "empty directory entry");
        assert_eq!(m.read_u32(0x1004) & 0x20, 0, "no A bit on a failed walk");
    }

    #[test]
    fn user_and_write_protection() {
        // Supervisor-only page.
        let mut m = two_level(0x7, 0x3);
        let e = walk(&mut m, legacy(true), &[0; 4], 0x0040_3000, UR).unwrap_err();
        assert_eq!(e.error, error::PRESENT | error::USER);
        // Read-only through the directory: user writes fault, supervisor writes depend on WP.
        let mut m = two_level(0x5, 0x7);
        let e = walk(&mut m, legacy(true), &[0; 4], 0x0040_3000, UW).unwrap_err();
        assert_eq!(e.error, error::PRESENT | error::WRITE | error::USER);
        assert!(walk(&mut m, legacy(false), &[0; 4], 0x0040_3000, W).is_ok());
        let e = walk(&mut m, legacy(true), &[0; 4], 0x0040_3000, W).unwrap_err();
        assert_eq!(e.error, error::PRESENT | error::WRITE);
        assert!(walk(&mut m, legacy(true), &[0; 4], 0x0040_3000, UR).is_ok());
    }

    #[test]
    fn four_m_pages_need_pse() {
        let mut m = Mem::default();
        m.write_u32(0x1000 + 4 * 3, 0x0140_0000 | 0x87 | 0x100); // PS, G
        let t = walk(&mut m, legacy(true), &[0; 4], 0x00C1_2345, R).unwrap();
        assert_eq!(t.phys, 0x0141_2345);
        assert_eq!((t.page_size, t.global), (4 << 20, true));
        assert_eq!(t.frame, 0x0141_2000);
        // Without PSE the PS bit is ignored and the entry points at a page table.
        let no_pse = Mode {
            pse: false,
            ..legacy(true)
        };
        m.write_u32(0x0140_0000 + 4 * 0x12, 0x0055_5007);
        let t = walk(&mut m, no_pse, &[0; 4], 0x00C1_2345, R).unwrap();
        assert_eq!(t.phys, 0x0055_5345);
    }

    #[test]
    fn pae_with_4k_and_2m_pages() {
        let mut m = Mem::default();
        // PDPT at 0x3000: entry 1 (1-2 GiB) -> PD 0x4000.
        m.write_u32(0x3000 + 8, 0x4000 | 1);
        let pdptes = load_pdptes(&mut m, 0x3000).unwrap();
        let mode = Mode {
            cr3: 0x3000,
            pae: true,
            pse: false,
            wp: true,
            pge: false,
        };
        // PD entry 2 -> PT 0x5000; PT entry 7 -> 0x9_0000_0000 (above 4 GiB, 36-bit).
        m.write_u32(0x4000 + 8 * 2, 0x5000 | 7);
        m.write_u32(0x5000 + 8 * 7, 0x0000_0007);
        m.write_u32(0x5000 + 8 * 7 + 4, 0x9);
        let lin = 0x4000_0000 + (2 << 21) + (7 << 12) + 0x123;
        let t = walk(&mut m, mode, &pdptes, lin, R).unwrap();
        assert_eq!(t.phys, 0x9_0000_0123);
        // PD entry 3: a 2 MiB page.
        m.write_u32(0x4000 + 8 * 3, 0x0060_0000 | 0x87);
        let lin = 0x4000_0000 + (3 << 21) + 0x1_2345;
        let t = walk(&mut m, mode, &pdptes, lin, W).unwrap();
        assert_eq!((t.phys, t.page_size), (0x0061_2345, 2 << 20));
        // Reserved bits above bit 35 in a PTE.
        m.write_u32(0x5000 + 8 * 7 + 4, 0x10);
        let lin = 0x4000_0000 + (2 << 21) + (7 << 12);
        let e = walk(&mut m, mode, &pdptes, lin, UR).unwrap_err();
        assert_eq!(e.error, error::PRESENT | error::RSVD | error::USER);
        // Not-present PDPTE.
        assert_eq!(walk(&mut m, mode, &pdptes, 0x123, R).unwrap_err().error, 0);
    }

    #[test]
    fn pdptes_with_reserved_bits_are_refused() {
        let mut m = Mem::default();
        m.write_u32(0x3000, 0x4000 | 1 | 2); // RW is reserved in a PDPTE
        assert_eq!(load_pdptes(&mut m, 0x3000), None);
        m.write_u32(0x3000, 0x4000 | 1);
        assert!(load_pdptes(&mut m, 0x3000).is_some());
    }
}
