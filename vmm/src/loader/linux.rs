//! The Linux/x86 boot protocol, 32-bit entry: a bzImage, an initial ramdisk and a command line.
//!
//! Built from the kernel's Documentation/arch/x86/boot.rst ("32-bit boot protocol") and
//! zero-page.rst. The loader does what a boot loader that skips the kernel's real-mode setup code
//! must do itself:
//!
//! - check the setup header: the boot sector signature 0xAA55 at 0x1FE, "HdrS" at 0x202, protocol
//!   2.06 or newer (`cmdline_size`; everything this loader relies on is older), and a bzImage
//!   (`LOADED_HIGH`: the protected-mode kernel runs at 1 MiB);
//! - load the protected-mode part (everything after the `setup_sects + 1` setup sectors) at 1 MiB,
//!   where the kernel's compressed head relocates and decompresses itself;
//! - build the "zero page" (`struct boot_params`) from the file's setup header, with the E820 map,
//!   the command line, the initrd and, for protocol 2.14+, the ACPI RSDP address;
//! - enter at `code32_start` in flat 32-bit protected mode with paging and interrupts off,
//!   CS = 0x10 and DS/ES/SS = 0x18 (the kernel's `__BOOT_CS`/`__BOOT_DS`), ESI = the zero page and
//!   EBP/EDI/EBX = 0.
//!
//! rust-vmm's linux-loader has these structures as bindgen output, but turning them into guest
//! bytes needs vm-memory's `ByteValued` (unsafe transmutes) and its loaders take vm-memory's
//! `GuestMemory`; the layout is a fixed ABI of byte offsets, so this loader writes the fields at
//! their documented offsets instead.

use vmdriver::{GuestMemory, MemoryError};

use crate::platform::{E820Entry, E820Type};

/// Guest-physical address of the zero page (`struct boot_params`, 4 KiB).
pub const BOOT_PARAMS_ADDR: u64 = 0x7000;
/// Guest-physical address of the kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Where the protected-mode kernel is loaded: 1 MiB, the boot protocol's address for bzImages.
pub const KERNEL_ADDR: u64 = 0x10_0000;
/// Oldest boot protocol supported: 2.06 added `cmdline_size`.
pub const MIN_PROTOCOL: u16 = 0x0206;
/// Code selector at entry (`__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// Data selector at entry (`__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// `type_of_loader` for a boot loader without an assigned ID.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xFF;

/// Zero-page and setup-header offsets (zero-page.rst, boot.rst).
mod off {
    pub const ACPI_RSDP_ADDR: usize = 0x070;
    pub const E820_ENTRIES: usize = 0x1E8;
    pub const SETUP_SECTS: usize = 0x1F1;
    pub const BOOT_FLAG: usize = 0x1FE;
    pub const JUMP: usize = 0x200;
    pub const HEADER: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const CODE32_START: usize = 0x214;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21C;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22C;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const INIT_SIZE: usize = 0x260;
    pub const E820_TABLE: usize = 0x2D0;
}

/// `loadflags`: the protected-mode code is loaded at 0x100000 (a bzImage).
const LOADED_HIGH: u8 = 1 << 0;
/// `loadflags`: suppress early kernel messages.
const QUIET_FLAG: u8 = 1 << 5;
/// Size of the zero page.
const ZERO_PAGE_SIZE: usize = 4096;
/// Slots in the zero page's E820 table.
const E820_MAX: usize = 128;
const PAGE: u64 = 4096;

/// Why a kernel could not be loaded by the Linux boot protocol.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// No boot sector signature or no "HdrS" setup header.
    #[error(
        "is not a Linux bzImage (no boot sector signature 0xAA55 at 0x1FE and setup header \"HdrS\" at 0x202)"
    )]
    NotBzImage,
    /// A boot protocol older than the loader supports.
    #[error(
        "is a Linux bzImage of boot protocol {}.{:02}; bt86 needs protocol 2.06 or newer (Linux 2.6.22+)",
        .0 >> 8, .0 & 0xFF
    )]
    TooOld(u16),
    /// A zImage (protected-mode code at 0x10000), which no modern loader supports.
    #[error("is a Linux zImage (loaded low); only bzImages (LOADED_HIGH) are supported")]
    NotLoadedHigh,
    /// The file ends before the setup code or the kernel.
    #[error("is truncated: its setup header says {need} bytes of setup code, the file has {len}")]
    Truncated {
        /// Bytes the header announces.
        need: usize,
        /// File length.
        len: usize,
    },
    /// The command line is longer than the kernel accepts.
    #[error("command line of {len} bytes is longer than the kernel's limit of {max} bytes")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's `cmdline_size`.
        max: u32,
    },
    /// The kernel and initrd do not fit in guest RAM.
    #[error(
        "the kernel ({kernel} bytes, {init_size} bytes when decompressed) and initrd ({initrd} bytes) \
         do not fit in {ram_mib} MiB of guest RAM; give more --memory"
    )]
    DoesNotFit {
        /// Protected-mode kernel size.
        kernel: usize,
        /// The kernel's `init_size`: memory it needs from its load address while booting.
        init_size: u32,
        /// Initrd size.
        initrd: usize,
        /// RAM in MiB.
        ram_mib: u64,
    },
    /// Writing guest memory failed (a bt86 bug: the loader checks addresses first).
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// Where and how to enter a loaded kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxEntry {
    /// EIP at entry: the header's `code32_start`.
    pub entry: u32,
    /// ESI at entry: the zero page.
    pub boot_params: u32,
    /// Where the initrd was placed (address, length), if there is one.
    pub initrd: Option<(u32, u32)>,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Whether `kernel` looks like a Linux x86 boot image (boot sector signature or "HdrS" header):
/// such a file is for this loader, which then says precisely what is wrong with it, if anything.
pub fn is_linux(kernel: &[u8]) -> bool {
    kernel.get(off::HEADER..off::HEADER + 4) == Some(b"HdrS")
        || u16_at(kernel, off::BOOT_FLAG) == 0xAA55
}

/// The parts of the setup header the loader checks.
#[derive(Debug, Clone, Copy)]
struct Header {
    version: u16,
    setup_size: usize,
    header_end: usize,
    cmdline_size: u32,
    initrd_addr_max: u32,
    init_size: u32,
}

fn parse_header(kernel: &[u8]) -> Result<Header, LinuxError> {
    if kernel.get(off::HEADER..off::HEADER + 4) != Some(b"HdrS")
        || u16_at(kernel, off::BOOT_FLAG) != 0xAA55
    {
        return Err(LinuxError::NotBzImage);
    }
    let version = u16_at(kernel, off::VERSION);
    if version < MIN_PROTOCOL {
        return Err(LinuxError::TooOld(version));
    }
    let loadflags = kernel.get(off::LOADFLAGS).copied().unwrap_or(0);
    if loadflags & LOADED_HIGH == 0 {
        return Err(LinuxError::NotLoadedHigh);
    }
    // setup_sects = 0 means 4, for compatibility with ancient images.
    let sects = match kernel.get(off::SETUP_SECTS).copied().unwrap_or(0) {
        0 => 4,
        n => usize::from(n),
    };
    let setup_size = (sects + 1) * 512;
    // The setup header ends at 0x202 plus the jump's 8-bit displacement (boot.rst).
    let header_end = off::HEADER + usize::from(kernel.get(off::JUMP + 1).copied().unwrap_or(0));
    if kernel.len() <= setup_size || header_end > setup_size {
        return Err(LinuxError::Truncated {
            need: setup_size,
            len: kernel.len(),
        });
    }
    Ok(Header {
        version,
        setup_size,
        header_end,
        cmdline_size: u32_at(kernel, off::CMDLINE_SIZE),
        initrd_addr_max: u32_at(kernel, off::INITRD_ADDR_MAX),
        init_size: u32_at(kernel, off::INIT_SIZE),
    })
}

/// What to boot.
#[derive(Debug, Clone, Copy)]
pub struct LinuxImage<'a> {
    /// The bzImage file.
    pub kernel: &'a [u8],
    /// The initial ramdisk, if any.
    pub initrd: Option<&'a [u8]>,
    /// The command line.
    pub cmdline: &'a str,
}

/// Loads `image` into `memory` with the memory map `e820`, and returns the entry state.
/// `rsdp` is the ACPI RSDP's address, handed to protocol 2.14+ kernels in the zero page (older
/// ones find it by scanning the BIOS area, where it also is).
pub fn load(
    memory: &GuestMemory,
    image: &LinuxImage<'_>,
    e820: &[E820Entry],
    rsdp: Option<u64>,
) -> Result<LinuxEntry, LinuxError> {
    let kernel = image.kernel;
    let h = parse_header(kernel)?;
    let pm = &kernel[h.setup_size..];

    let cmdline = image.cmdline.as_bytes();
    // cmdline_size is the longest command line without its terminating NUL.
    if cmdline.len() as u64 > u64::from(h.cmdline_size) {
        return Err(LinuxError::CmdlineTooLong {
            len: cmdline.len(),
            max: h.cmdline_size,
        });
    }

    // The kernel needs init_size bytes from its load address while it decompresses; the initrd
    // goes as high as RAM and the kernel's initrd_addr_max allow, page-aligned, above that.
    let ram_top = e820
        .iter()
        .filter(|e| e.kind == E820Type::Ram && e.base >= KERNEL_ADDR)
        .map(E820Entry::end)
        .max()
        .unwrap_or(0);
    let kernel_end = KERNEL_ADDR + (pm.len() as u64).max(u64::from(h.init_size));
    let initrd = image.initrd.unwrap_or(&[]);
    let does_not_fit = || LinuxError::DoesNotFit {
        kernel: pm.len(),
        init_size: h.init_size,
        initrd: initrd.len(),
        ram_mib: memory.layout().ram_mib(),
    };
    let initrd_top = ram_top.min(u64::from(h.initrd_addr_max) + 1);
    let initrd_addr = initrd_top
        .checked_sub(initrd.len() as u64)
        .map(|a| a & !(PAGE - 1))
        .filter(|a| *a >= kernel_end)
        .ok_or_else(does_not_fit)?;

    memory.write(KERNEL_ADDR, pm)?;
    let mut cmd = cmdline.to_vec();
    cmd.push(0);
    memory.write(CMDLINE_ADDR, &cmd)?;
    if !initrd.is_empty() {
        memory.write(initrd_addr, initrd)?;
    }

    let mut zp = vec![0u8; ZERO_PAGE_SIZE];
    zp[off::SETUP_SECTS..h.header_end].copy_from_slice(&kernel[off::SETUP_SECTS..h.header_end]);
    let put32 = |zp: &mut [u8], at: usize, v: u32| zp[at..at + 4].copy_from_slice(&v.to_le_bytes());
    zp[off::TYPE_OF_LOADER] = LOADER_TYPE_UNDEFINED;
    zp[off::LOADFLAGS] = (zp[off::LOADFLAGS] | LOADED_HIGH) & !QUIET_FLAG;
    put32(&mut zp, off::CODE32_START, KERNEL_ADDR as u32);
    put32(&mut zp, off::CMD_LINE_PTR, CMDLINE_ADDR as u32);
    if !initrd.is_empty() {
        put32(&mut zp, off::RAMDISK_IMAGE, initrd_addr as u32);
        put32(&mut zp, off::RAMDISK_SIZE, initrd.len() as u32);
    }
    let entries = e820.len().min(E820_MAX);
    zp[off::E820_ENTRIES] = entries as u8;
    for (i, e) in e820.iter().take(entries).enumerate() {
        let at = off::E820_TABLE + i * 20;
        zp[at..at + 8].copy_from_slice(&e.base.to_le_bytes());
        zp[at + 8..at + 16].copy_from_slice(&e.length.to_le_bytes());
        zp[at + 16..at + 20].copy_from_slice(&(e.kind as u32).to_le_bytes());
    }
    if let Some(rsdp) = rsdp.filter(|_| h.version >= 0x020E) {
        zp[off::ACPI_RSDP_ADDR..off::ACPI_RSDP_ADDR + 8].copy_from_slice(&rsdp.to_le_bytes());
    }
    memory.write(BOOT_PARAMS_ADDR, &zp)?;

    Ok(LinuxEntry {
        entry: KERNEL_ADDR as u32,
        boot_params: BOOT_PARAMS_ADDR as u32,
        initrd: (!initrd.is_empty()).then_some((initrd_addr as u32, initrd.len() as u32)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::e820_map;
    use vmdriver::MemoryLayout;

    fn mem(mib: u64) -> GuestMemory {
        GuestMemory::new(MemoryLayout::new(mib).unwrap()).unwrap()
    }

    /// A synthetic bzImage: 2 setup sectors + boot sector, a protected-mode body, and the setup
    /// header fields a 6.1 kernel has (values from Debian's 6.1 686 kernel, scaled down).
    fn bzimage(version: u16, body: &[u8]) -> Vec<u8> {
        let setup_sects = 2u8;
        let mut k = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        k[off::SETUP_SECTS] = setup_sects;
        k[off::BOOT_FLAG..off::BOOT_FLAG + 2].copy_from_slice(&0xAA55u16.to_le_bytes());
        k[off::JUMP] = 0xEB;
        k[off::JUMP + 1] = 0x6A; // header ends at 0x26C (2.15)
        k[off::HEADER..off::HEADER + 4].copy_from_slice(b"HdrS");
        k[off::VERSION..off::VERSION + 2].copy_from_slice(&version.to_le_bytes());
        k[off::LOADFLAGS] = LOADED_HIGH | QUIET_FLAG;
        k[off::CODE32_START..off::CODE32_START + 4].copy_from_slice(&0x10_0000u32.to_le_bytes());
        k[off::INITRD_ADDR_MAX..off::INITRD_ADDR_MAX + 4]
            .copy_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
        k[off::CMDLINE_SIZE..off::CMDLINE_SIZE + 4].copy_from_slice(&0x7FFu32.to_le_bytes());
        k[off::INIT_SIZE..off::INIT_SIZE + 4].copy_from_slice(&0x20_0000u32.to_le_bytes());
        k[0x26B] = 0x5A; // last byte of the header (handover_offset), copied to the zero page
        k.extend_from_slice(body);
        k
    }

    fn read(m: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        m.read(addr, &mut b).unwrap();
        b
    }

    #[test]
    fn kernel_zero_page_cmdline_and_initrd_are_placed_per_the_protocol() {
        let m = mem(64);
        let body: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let kernel = bzimage(0x020F, &body);
        let initrd = vec![0xA5u8; 10_000];
        let e820 = e820_map(m.layout());
        let entry = load(
            &m,
            &LinuxImage {
                kernel: &kernel,
                initrd: Some(&initrd),
                cmdline: "console=ttyS0 quiet",
            },
            &e820,
            Some(0xF_0000),
        )
        .unwrap();
        assert_eq!(entry.entry, 0x10_0000);
        assert_eq!(entry.boot_params, BOOT_PARAMS_ADDR as u32);
        assert_eq!(read(&m, KERNEL_ADDR, body.len()), body);

        let zp = read(&m, BOOT_PARAMS_ADDR, ZERO_PAGE_SIZE);
        assert_eq!(&zp[off::HEADER..off::HEADER + 4], b"HdrS");
        assert_eq!(zp[0x26B], 0x5A, "the whole setup header is copied");
        assert_eq!(zp[off::TYPE_OF_LOADER], 0xFF);
        assert_eq!(zp[off::LOADFLAGS], LOADED_HIGH, "QUIET_FLAG cleared");
        assert_eq!(u32_at(&zp, off::CODE32_START), 0x10_0000);
        assert_eq!(u32_at(&zp, off::CMD_LINE_PTR), CMDLINE_ADDR as u32);
        assert_eq!(read(&m, CMDLINE_ADDR, 20), b"console=ttyS0 quiet\0");
        assert_eq!(u32_at(&zp, 0x070), 0xF_0000, "RSDP for protocol 2.14+");

        // The initrd sits page-aligned at the top of usable RAM (below the firmware tables).
        let (addr, len) = entry.initrd.unwrap();
        assert_eq!(len, 10_000);
        assert_eq!(u32_at(&zp, off::RAMDISK_IMAGE), addr);
        assert_eq!(u32_at(&zp, off::RAMDISK_SIZE), len);
        assert_eq!(addr % 4096, 0);
        let usable_top = 64 * 1024 * 1024 - crate::platform::FIRMWARE_TABLES_SIZE;
        assert!(
            u64::from(addr + len) <= usable_top && u64::from(addr) + 4096 + 10_000 > usable_top
        );
        assert_eq!(read(&m, u64::from(addr), len as usize), initrd);

        // The E820 map is the platform's, entry for entry.
        assert_eq!(usize::from(zp[off::E820_ENTRIES]), e820.len());
        for (i, e) in e820.iter().enumerate() {
            let at = off::E820_TABLE + i * 20;
            assert_eq!(u64::from(u32_at(&zp, at)), e.base & 0xFFFF_FFFF);
            assert_eq!(u64::from(u32_at(&zp, at + 8)), e.length & 0xFFFF_FFFF);
            assert_eq!(u32_at(&zp, at + 16), e.kind as u32);
        }
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let m = mem(64);
        let mut kernel = bzimage(0x020F, &[0x90; 16]);
        kernel[off::INITRD_ADDR_MAX..off::INITRD_ADDR_MAX + 4]
            .copy_from_slice(&0x01FF_FFFFu32.to_le_bytes());
        let initrd = vec![1u8; 5000];
        let e = load(
            &m,
            &LinuxImage {
                kernel: &kernel,
                initrd: Some(&initrd),
                cmdline: "",
            },
            &e820_map(m.layout()),
            None,
        )
        .unwrap();
        let (addr, len) = e.initrd.unwrap();
        assert!(addr + len <= 0x0200_0000);
        assert_eq!(addr, 0x0200_0000 - 8192);
    }

    #[test]
    fn old_protocols_leave_the_rsdp_field_alone() {
        let m = mem(16);
        let kernel = bzimage(0x020A, &[0x90; 16]);
        let img = LinuxImage {
            kernel: &kernel,
            initrd: None,
            cmdline: "x",
        };
        let e = load(&m, &img, &e820_map(m.layout()), Some(0xF_0000)).unwrap();
        assert_eq!(e.initrd, None);
        let zp = read(&m, BOOT_PARAMS_ADDR, ZERO_PAGE_SIZE);
        assert_eq!(u32_at(&zp, 0x070), 0);
        assert_eq!(u32_at(&zp, off::RAMDISK_IMAGE), 0);
    }

    #[test]
    fn foreign_old_and_broken_images_are_refused_with_the_reason() {
        let m = mem(16);
        let e820 = e820_map(m.layout());
        let try_load = |k: &[u8], cmdline: &str| {
            load(
                &m,
                &LinuxImage {
                    kernel: k,
                    initrd: None,
                    cmdline,
                },
                &e820,
                None,
            )
            .unwrap_err()
            .to_string()
        };
        assert!(try_load(b"\x7fELF....", "").contains("not a Linux bzImage"));
        let old = bzimage(0x0204, &[0; 16]);
        let msg = try_load(&old, "");
        assert!(
            msg.contains("protocol 2.04") && msg.contains("2.06"),
            "{msg}"
        );
        let mut zimage = bzimage(0x020F, &[0; 16]);
        zimage[off::LOADFLAGS] = 0;
        assert!(try_load(&zimage, "").contains("zImage"));
        let full = bzimage(0x020F, &[0; 16]);
        assert!(try_load(&full[..1000], "").contains("truncated"));
        let long = "x".repeat(0x800);
        assert!(try_load(&full, &long).contains("longer than the kernel's limit of 2047"));
        assert!(is_linux(&full) && !is_linux(b"\x7fELF"));
    }

    #[test]
    fn a_kernel_that_does_not_fit_is_refused() {
        let m = mem(4);
        let mut kernel = bzimage(0x020F, &[0x90; 16]);
        kernel[off::INIT_SIZE..off::INIT_SIZE + 4].copy_from_slice(&0x0100_0000u32.to_le_bytes());
        let err = load(
            &m,
            &LinuxImage {
                kernel: &kernel,
                initrd: Some(&[1; 100]),
                cmdline: "",
            },
            &e820_map(m.layout()),
            None,
        )
        .unwrap_err();
        assert!(
            matches!(err, LinuxError::DoesNotFit { ram_mib: 4, .. }),
            "{err}"
        );
    }

    #[test]
    fn hostile_headers_never_panic() {
        let m = mem(8);
        let e820 = e820_map(m.layout());
        let base = bzimage(0x020F, &[0x90; 64]);
        for i in 0x1F0..0x270 {
            for v in [0u8, 0x7F, 0xFF] {
                let mut k = base.clone();
                k[i] = v;
                let _ = load(
                    &m,
                    &LinuxImage {
                        kernel: &k,
                        initrd: Some(&[1; 64]),
                        cmdline: "a",
                    },
                    &e820,
                    None,
                );
            }
        }
    }
}
