//! The ACPI tables bt86's firmware would leave in memory, as the ACPI 2.0 specification lays
//! them out (the generation of the Pentium M this machine's CPU reports):
//!
//! - the RSDP (revision 2) in the BIOS area at [`RSDP_ADDR`], where an OS scans for it;
//! - in the reserved RAM at the top of memory (as SeaBIOS places them): the FACS, the DSDT, the
//!   FADT (revision 3), the MADT (when the machine has its APICs), the RSDT and the XSDT.
//!
//! The FADT describes the PIIX4-style fixed hardware of [`crate::devices::acpi_pm`] (PM1a event
//! and control blocks, the PM timer, the SCI on IRQ 9), the reset register at 0xCF9 and a legacy
//! PC (i8042, ISA devices, CMOS century byte). The DSDT, built with the `acpi_tables` crate's AML
//! builder, holds the PCI root bridge and `\_S5`, the package that gives the OS S5's SLP_TYP so
//! that `poweroff` reaches PM1_CNT. The MADT lists the local APIC, the IOAPIC, ISA IRQ 0's
//! override to GSI 2 (the 8254 is wired to IOAPIC pin 2), the SCI's override (level, active
//! high) and LINT1 as NMI.

use acpi_tables::Aml;
use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, IO, Name, Package,
    ResourceTemplate, Scope,
};
use acpi_tables::sdt::Sdt;

use crate::chipset::{FIRST_VIRTIO_DEVICE, MAX_VIRTIO_DISKS, pci_irq};
use crate::devices::acpi_pm::{PM_TMR_PORT, PM1A_CNT_PORT, PM1A_EVT_PORT, SCI_IRQ, SLP_TYP_S5};
use crate::devices::rtc::REG_CENTURY;
use crate::platform::{IOAPIC_BASE, IOAPIC_ID, LAPIC_BASE};

/// Where the RSDP lives: the start of the BIOS segment, 16-byte aligned, inside the range
/// 0xE0000-0xFFFFF that an OS searches.
pub const RSDP_ADDR: u32 = 0xF_0000;
/// The PIIX reset control register, the FADT's reset register.
pub const RESET_PORT: u16 = 0xCF9;
/// The value that resets the machine (SRST | RST_CPU: a hard reset).
pub const RESET_VALUE: u8 = 0x06;

const OEM_ID: [u8; 6] = *b"BT86  ";
const OEM_TABLE_ID: [u8; 8] = *b"BT86PC  ";
const OEM_REVISION: u32 = 1;
const CREATOR: [u8; 8] = *b"BT86\x01\x00\x00\x00";

/// FADT revision 3: the ACPI 2.0 layout (244 bytes), with the reset register and 64-bit fields.
const FADT_REVISION: u8 = 3;
const FADT_LEN: u32 = 244;
const FACS_LEN: usize = 64;

/// The machine the tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiConfig {
    /// RAM size in bytes (PCI memory starts above it).
    pub ram_bytes: u64,
    /// Guest-physical address of the table area (64-byte aligned).
    pub tables_base: u32,
    /// Whether to describe the local APIC and the IOAPIC (the MADT).
    pub apic: bool,
}

/// The built tables: the RSDP (for [`RSDP_ADDR`]) and the table area's contents (for
/// [`AcpiConfig::tables_base`]).
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// The 36-byte RSDP.
    pub rsdp: Vec<u8>,
    /// Everything the RSDP points to, laid out from `tables_base`.
    pub area: Vec<u8>,
}

/// The one-byte sum that makes `bytes` add up to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

fn header(signature: &[u8; 4], length: u32, revision: u8) -> Sdt {
    let mut t = Sdt::new(
        *signature,
        length,
        revision,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    t.write_bytes(28, &CREATOR);
    t
}

/// A Generic Address Structure for a block of `bits` in system I/O space.
fn gas_io(port: u16, bits: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = bits;
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn dsdt(config: &AcpiConfig) -> Sdt {
    let pci_mem_start = u32::try_from(config.ram_bytes).unwrap_or(u32::MAX);
    let bus = AddressSpace::new_bus_number(0u16, 0xFFu16);
    let config_ports = IO::new(0xCF8, 0xCF8, 1, 8);
    let io_low = AddressSpace::new_io(0u16, 0xCF7u16, None);
    let io_high = AddressSpace::new_io(0xD00u16, 0xFFFFu16, None);
    let vga = AddressSpace::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        0xA_0000u32,
        0xB_FFFFu32,
        None,
    );
    let pci_mem = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        pci_mem_start,
        IOAPIC_BASE - 1,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &config_ports, &io_low, &io_high, &vga, &pci_mem]);
    let hid = EISAName::new("PNP0A03");
    let hid_name = Name::new("_HID".into(), &hid);
    let adr = Name::new("_ADR".into(), &aml::ZERO);
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let crs_name = Name::new("_CRS".into(), &crs);
    // _PRT: INTA# of the devices virtio disks use (3 onwards), on the ISA IRQ the PIRQ routing
    // gives them, as GSIs (the IOAPIC's inputs 0-15 are the ISA IRQs; with the 8259s the GSI
    // is the IRQ). No link devices: the routing is fixed, as firmware left it.
    let routes: Vec<(u32, u8, u8, u32)> = (FIRST_VIRTIO_DEVICE
        ..FIRST_VIRTIO_DEVICE + MAX_VIRTIO_DISKS as u8)
        .map(|d| {
            (
                (u32::from(d) << 16) | 0xFFFF,
                0u8,
                0u8,
                u32::from(pci_irq(d)),
            )
        })
        .collect();
    let entries: Vec<Package> = routes
        .iter()
        .map(|(adr, pin, source, gsi)| Package::new(vec![adr, pin, source, gsi]))
        .collect();
    let prt = Package::new(entries.iter().map(|p| p as &dyn Aml).collect());
    let prt_name = Name::new("_PRT".into(), &prt);
    let pci0 = Device::new(
        "PCI0".into(),
        vec![&hid_name, &adr, &uid, &crs_name, &prt_name],
    );
    let sb = Scope::new("\\_SB_".into(), vec![&pci0]);
    // \_S5: SLP_TYPa, SLP_TYPb and two reserved entries.
    let typ = SLP_TYP_S5 as u8;
    let s5 = Package::new(vec![&typ, &typ, &aml::ZERO, &aml::ZERO]);
    let s5_name = Name::new("\\_S5_".into(), &s5);

    let mut t = header(b"DSDT", 36, 2);
    sb.to_aml_bytes(&mut t);
    s5_name.to_aml_bytes(&mut t);
    t.update_checksum();
    t
}

fn facs() -> Vec<u8> {
    let mut f = vec![0u8; FACS_LEN];
    f[0..4].copy_from_slice(b"FACS");
    f[4..8].copy_from_slice(&(FACS_LEN as u32).to_le_bytes());
    f[32] = 1; // version (ACPI 2.0)
    f
}

fn fadt(facs: u32, dsdt: u32) -> Sdt {
    let mut t = header(b"FACP", FADT_LEN, FADT_REVISION);
    t.write_u32(36, facs); // FIRMWARE_CTRL
    t.write_u32(40, dsdt);
    t.write_u8(45, 0); // preferred PM profile: unspecified
    t.write_u16(46, u16::from(SCI_IRQ));
    // SMI_CMD, ACPI_ENABLE, ACPI_DISABLE stay 0: the platform is always in ACPI mode.
    t.write_u32(56, u32::from(PM1A_EVT_PORT));
    t.write_u32(64, u32::from(PM1A_CNT_PORT));
    t.write_u32(76, u32::from(PM_TMR_PORT));
    t.write_u8(88, 4); // PM1_EVT_LEN
    t.write_u8(89, 2); // PM1_CNT_LEN
    t.write_u8(91, 4); // PM_TMR_LEN
    t.write_u16(96, 101); // P_LVL2_LAT > 100: no C2
    t.write_u16(98, 1001); // P_LVL3_LAT > 1000: no C3
    t.write_u8(108, REG_CENTURY as u8);
    t.write_u16(109, 0x0003); // IAPC_BOOT_ARCH: LEGACY_DEVICES | 8042
    // Flags: WBINVD, PROC_C1, PWR_BUTTON and SLP_BUTTON (no fixed-feature buttons), FIX_RTC
    // (no RTC wake status), RESET_REG_SUP.
    t.write_u32(
        112,
        1 | (1 << 2) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 10),
    );
    t.write_bytes(116, &gas_io(RESET_PORT, 8));
    t.write_u8(128, RESET_VALUE);
    // X_FIRMWARE_CTRL stays 0: with both set, an OS may map the FACS twice.
    t.write_u64(140, u64::from(dsdt)); // X_DSDT
    t.write_bytes(148, &gas_io(PM1A_EVT_PORT, 32));
    t.write_bytes(172, &gas_io(PM1A_CNT_PORT, 16));
    t.write_bytes(208, &gas_io(PM_TMR_PORT, 32));
    t
}

fn madt() -> Sdt {
    let mut t = header(b"APIC", 44, 1);
    t.write_u32(36, LAPIC_BASE);
    t.write_u32(40, 1); // PCAT_COMPAT: there are 8259s too
    let mut entries: Vec<u8> = Vec::new();
    // Processor local APIC: processor 0, APIC ID 0, enabled.
    entries.extend_from_slice(&[0, 8, 0, 0, 1, 0, 0, 0]);
    // I/O APIC: its ID, its address, GSI base 0.
    entries.extend_from_slice(&[1, 12, IOAPIC_ID, 0]);
    entries.extend_from_slice(&IOAPIC_BASE.to_le_bytes());
    entries.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source overrides: ISA IRQ 0 -> GSI 2 (bus-conforming polarity and trigger);
    // the SCI: GSI 9, active high (01), level (11).
    for (irq, gsi, flags) in [(0u8, 2u32, 0u16), (SCI_IRQ, u32::from(SCI_IRQ), 0x000D)] {
        entries.extend_from_slice(&[2, 10, 0, irq]);
        entries.extend_from_slice(&gsi.to_le_bytes());
        entries.extend_from_slice(&flags.to_le_bytes());
    }
    // Local APIC NMI: every processor, bus-conforming, LINT1.
    entries.extend_from_slice(&[4, 6, 0xFF, 0, 0, 1]);
    t.append_slice(&entries);
    t
}

/// Builds the tables for `config`.
pub fn build(config: &AcpiConfig) -> AcpiTables {
    let base = config.tables_base;
    let mut area: Vec<u8> = Vec::new();
    let mut place = |bytes: &[u8], align: usize| -> u32 {
        area.resize(area.len().next_multiple_of(align), 0);
        let at = base + area.len() as u32;
        area.extend_from_slice(bytes);
        at
    };
    let facs_addr = place(&facs(), 64);
    let dsdt_addr = place(dsdt(config).as_slice(), 16);
    let fadt_addr = place(fadt(facs_addr, dsdt_addr).as_slice(), 16);
    let mut tables = vec![fadt_addr];
    if config.apic {
        tables.push(place(madt().as_slice(), 16));
    }
    let mut rsdt = header(b"RSDT", 36, 1);
    let mut xsdt = header(b"XSDT", 36, 1);
    for t in &tables {
        rsdt.append_slice(&t.to_le_bytes());
        xsdt.append_slice(&u64::from(*t).to_le_bytes());
    }
    let rsdt_addr = place(rsdt.as_slice(), 16);
    let xsdt_addr = place(xsdt.as_slice(), 16);

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes
    rsdp.extend_from_slice(&OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0
    rsdp.extend_from_slice(&rsdt_addr.to_le_bytes());
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&u64::from(xsdt_addr).to_le_bytes());
    rsdp.extend_from_slice(&[0; 4]); // extended checksum, reserved
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);
    AcpiTables { rsdp, area }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u32 = 0x0FFE_0000;

    fn tables(apic: bool) -> AcpiTables {
        build(&AcpiConfig {
            ram_bytes: 256 << 20,
            tables_base: BASE,
            apic,
        })
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// The table at guest address `addr`, checked: its length field, its checksum.
    fn table(t: &AcpiTables, addr: u32, signature: &[u8; 4]) -> Vec<u8> {
        let at = (addr - BASE) as usize;
        let bytes = &t.area[at..];
        assert_eq!(&bytes[..4], signature);
        let len = u32_at(bytes, 4) as usize;
        let table = bytes[..len].to_vec();
        assert_eq!(
            sum(&table),
            0,
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        table
    }

    #[test]
    fn rsdp_has_both_checksums_and_points_to_rsdt_and_xsdt() {
        let t = tables(true);
        assert_eq!(t.rsdp.len(), 36);
        assert_eq!(&t.rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&t.rsdp[..20]), 0);
        assert_eq!(sum(&t.rsdp), 0);
        assert_eq!(t.rsdp[15], 2);
        let rsdt = table(&t, u32_at(&t.rsdp, 16), b"RSDT");
        let xsdt_addr = u64::from_le_bytes(t.rsdp[24..32].try_into().unwrap());
        let xsdt = table(&t, xsdt_addr as u32, b"XSDT");
        assert_eq!(rsdt.len(), 36 + 2 * 4);
        assert_eq!(xsdt.len(), 36 + 2 * 8);
        for i in 0..2 {
            let x = u64::from_le_bytes(xsdt[36 + 8 * i..44 + 8 * i].try_into().unwrap());
            assert_eq!(u64::from(u32_at(&rsdt, 36 + 4 * i)), x);
        }
        table(&t, u32_at(&rsdt, 36), b"FACP");
        table(&t, u32_at(&rsdt, 40), b"APIC");
    }

    #[test]
    fn without_apics_there_is_no_madt() {
        let t = tables(false);
        let rsdt = table(&t, u32_at(&t.rsdp, 16), b"RSDT");
        assert_eq!(rsdt.len(), 40);
        table(&t, u32_at(&rsdt, 36), b"FACP");
    }

    #[test]
    fn fadt_describes_the_pm_ports_the_sci_and_the_reset_register() {
        let t = tables(true);
        let rsdt = table(&t, u32_at(&t.rsdp, 16), b"RSDT");
        let fadt = table(&t, u32_at(&rsdt, 36), b"FACP");
        assert_eq!(fadt.len(), 244);
        assert_eq!(fadt[8], 3, "revision");
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9, "SCI_INT");
        assert_eq!(u32_at(&fadt, 48), 0, "no SMI_CMD: always ACPI mode");
        assert_eq!(u32_at(&fadt, 56), 0x600);
        assert_eq!(u32_at(&fadt, 64), 0x604);
        assert_eq!(u32_at(&fadt, 76), 0x608);
        assert_eq!((fadt[88], fadt[89], fadt[91]), (4, 2, 4));
        assert_ne!(u32_at(&fadt, 112) & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(&fadt[116..120], &[1, 8, 0, 0]);
        assert_eq!(u32_at(&fadt, 120), 0xCF9);
        assert_eq!(fadt[128], 6);
        let facs = u32_at(&fadt, 36);
        assert_eq!(facs % 64, 0, "FACS is 64-byte aligned");
        let at = (facs - BASE) as usize;
        assert_eq!(&t.area[at..at + 4], b"FACS");
        let dsdt = table(&t, u32_at(&fadt, 40), b"DSDT");
        assert_eq!(
            u64::from(u32_at(&fadt, 40)),
            u64::from_le_bytes(fadt[140..148].try_into().unwrap())
        );
        // \_S5_ = Package(4) { 0, 0, 0, 0 }: NameOp, RootChar, "_S5_", PackageOp, PkgLength 6,
        // NumElements 4, four ZeroOps (ACPI 6.4 §20.2.5).
        let s5 = [
            0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0, 0, 0, 0,
        ];
        assert!(dsdt.windows(s5.len()).any(|w| w == s5), "{dsdt:x?}");
        assert!(dsdt.windows(4).any(|w| w == b"PCI0"));
    }

    #[test]
    fn madt_lists_the_apics_and_the_overrides() {
        let t = tables(true);
        let rsdt = table(&t, u32_at(&t.rsdp, 16), b"RSDT");
        let madt = table(&t, u32_at(&rsdt, 40), b"APIC");
        assert_eq!(u32_at(&madt, 36), 0xFEE0_0000);
        assert_eq!(u32_at(&madt, 40), 1, "PCAT_COMPAT");
        let mut entries = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            entries.push((kind, madt[at..at + len].to_vec()));
            at += len;
        }
        assert_eq!(at, madt.len(), "entries fill the table exactly");
        let kinds: Vec<u8> = entries.iter().map(|e| e.0).collect();
        assert_eq!(kinds, [0, 1, 2, 2, 4]);
        assert_eq!(u32_at(&entries[1].1, 4), 0xFEC0_0000);
        assert_eq!(
            &entries[2].1[2..10],
            &[0, 0, 2, 0, 0, 0, 0, 0],
            "IRQ 0 -> GSI 2"
        );
        assert_eq!(
            &entries[3].1[2..10],
            &[0, 9, 9, 0, 0, 0, 0x0D, 0],
            "SCI level high"
        );
    }
}
