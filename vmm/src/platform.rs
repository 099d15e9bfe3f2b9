//! The PC platform bt86 presents: its memory map as firmware reports it (E820), and the port map.

use vmdriver::MemoryLayout;
use vmdriver::memory::{FIRMWARE_BASE, HIGH_RAM_START, LOW_RAM_END};

/// Start of the extended BIOS data area: conventional memory the OS may use ends here.
pub const EBDA_START: u64 = 0x9_FC00;
/// The system BIOS segment below 1 MiB, reported reserved.
pub const BIOS_LOW_START: u64 = 0xF_0000;
/// RAM at the top of memory kept back for firmware tables (ACPI, SMBIOS), as SeaBIOS does.
pub const FIRMWARE_TABLES_SIZE: u64 = 0x2_0000;
/// The local APIC's default guest-physical base (IA32_APIC_BASE after reset).
pub const LAPIC_BASE: u32 = 0xFEE0_0000;
/// The IOAPIC's guest-physical base.
pub const IOAPIC_BASE: u32 = 0xFEC0_0000;
/// The IOAPIC's APIC ID (the CPU's local APIC has ID 0).
pub const IOAPIC_ID: u8 = 1;

/// An E820 address-range type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: not to be used by the OS.
    Reserved = 2,
}

/// One entry of the BIOS memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub length: u64,
    /// What it is.
    pub kind: E820Type,
}

impl E820Entry {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.base + self.length
    }
}

/// The memory map for `layout`, as the firmware of QEMU's `pc` machine (SeaBIOS) reports it, so
/// that guests see the same map under bt86 as under QEMU: conventional memory up to the EBDA, the
/// BIOS segment reserved, extended memory up to the firmware tables, and the BIOS under 4 GiB.
pub fn e820_map(layout: &MemoryLayout) -> Vec<E820Entry> {
    let ram_end = layout.ram_bytes();
    let e = |base: u64, end: u64, kind| E820Entry {
        base,
        length: end - base,
        kind,
    };
    vec![
        e(0, EBDA_START, E820Type::Ram),
        e(EBDA_START, LOW_RAM_END, E820Type::Reserved),
        e(BIOS_LOW_START, HIGH_RAM_START, E820Type::Reserved),
        e(
            HIGH_RAM_START,
            ram_end - FIRMWARE_TABLES_SIZE,
            E820Type::Ram,
        ),
        e(ram_end - FIRMWARE_TABLES_SIZE, ram_end, E820Type::Reserved),
        e(FIRMWARE_BASE, 0x1_0000_0000, E820Type::Reserved),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_for_256m_matches_qemu_pc() {
        // What SeaBIOS reports under `qemu-system-i386 -M pc -m 256`.
        let map = e820_map(&MemoryLayout::new(256).unwrap());
        let got: Vec<_> = map
            .iter()
            .map(|e| (e.base, e.length, e.kind as u32))
            .collect();
        assert_eq!(
            got,
            [
                (0, 0x9_FC00, 1),
                (0x9_FC00, 0x400, 2),
                (0xF_0000, 0x1_0000, 2),
                (0x10_0000, 0xFEE_0000, 1),
                (0xFFE_0000, 0x2_0000, 2),
                (0xFFFC_0000, 0x4_0000, 2),
            ]
        );
    }

    #[test]
    fn map_is_sorted_and_disjoint_for_every_size() {
        for mib in [2, 3, 16, 255, 1024, 3072] {
            let map = e820_map(&MemoryLayout::new(mib).unwrap());
            for w in map.windows(2) {
                assert!(w[0].end() <= w[1].base, "{mib} MiB: {w:x?}");
            }
            assert!(map.iter().all(|e| e.length > 0), "{mib} MiB: {map:x?}");
        }
    }
}
