//! The Multiboot (version 1, 0.6.96) boot loader: ELF32 kernels and the a.out kludge, a command
//! line, modules, `mem_lower`/`mem_upper` and a memory map.
//!
//! The information is laid out where QEMU's `-kernel` puts it, so kernels written against QEMU
//! see the same addresses: the memory map at 0x9000, the information structure at 0x9500, and
//! command lines, module list and modules in the pages after the kernel image (modules
//! page-aligned). Like QEMU, the command line starts with the kernel's file name.

use goblin::container::{Container, Ctx, Endian};
use goblin::elf::Elf;
use goblin::elf::header::{ELFCLASS32, EM_386};
use goblin::elf::program_header::{PT_LOAD, ProgramHeader};
use vmdriver::{GuestMemory, MemoryError};

use crate::platform::{E820Entry, E820Type};

/// Header magic.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Value of EAX at kernel entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie entirely within this many bytes from the start of the file.
pub const HEADER_SEARCH_LEN: usize = 8192;

/// Guest-physical address of the memory map (QEMU's choice).
pub const MMAP_ADDR: u64 = 0x9000;
/// Guest-physical address of the multiboot information structure (QEMU's choice).
pub const INFO_ADDR: u64 = 0x9500;
/// End of the low area the loader writes.
const LOW_AREA_END: u64 = INFO_ADDR + INFO_SIZE as u64;
const INFO_SIZE: usize = 116;
const PAGE: u64 = 4096;
/// Name reported in `boot_loader_name`.
pub const LOADER_NAME: &str = "bt86";

const FLAG_PAGE_ALIGN: u32 = 1 << 0;
const FLAG_MEMORY_INFO: u32 = 1 << 1;
const FLAG_VIDEO_MODE: u32 = 1 << 2;
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Requirement bits (0–15) bt86 honours; any other set bit in 0–15 must make loading fail.
const SUPPORTED_REQUIREMENTS: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE;

const INFO_MEMORY: u32 = 1 << 0;
const INFO_BOOT_DEVICE: u32 = 1 << 1;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;
/// "No boot device" (BIOS drive 0x80, no partitions), QEMU's value.
const BOOT_DEVICE: u32 = 0x8000_FFFF;

/// Why a kernel could not be loaded. Messages say what is wrong with the file.
#[derive(Debug, thiserror::Error)]
pub enum MultibootError {
    /// No header with the right magic and checksum in the first 8 KiB.
    #[error("has no multiboot v1 header (magic 0x1BADB002) in its first 8 KiB{hint}")]
    NoHeader {
        /// What the file looks like instead, if recognised.
        hint: &'static str,
    },
    /// A header with the right magic but a wrong checksum.
    #[error("has a multiboot header at offset {offset:#x} whose checksum is wrong (corrupt file?)")]
    BadChecksum {
        /// Offset of the header in the file.
        offset: usize,
    },
    /// The header requires a feature bt86 does not provide.
    #[error(
        "requires boot loader features bt86 does not provide (header flags {flags:#x}, unknown requirement bits {unknown:#x})"
    )]
    UnsupportedRequirements {
        /// All header flags.
        flags: u32,
        /// The requirement bits not understood.
        unknown: u32,
    },
    /// Not an ELF file and no a.out kludge.
    #[error(
        "is not an ELF file and its multiboot header has no load addresses (a.out kludge, flag bit 16)"
    )]
    NotElf,
    /// An ELF file that is not a 32-bit i386 executable.
    #[error("is an ELF file but not a 32-bit i386 executable ({0})")]
    WrongElf(String),
    /// The ELF headers are malformed.
    #[error("has a malformed ELF header: {0}")]
    BadElf(String),
    /// The file ends before data the headers describe.
    #[error(
        "is truncated: {what} needs bytes {start:#x}..{end:#x}, but the file has only {len:#x} bytes"
    )]
    Truncated {
        /// What lies beyond the end.
        what: &'static str,
        /// First byte needed.
        start: u64,
        /// One past the last byte needed.
        end: u64,
        /// File length.
        len: usize,
    },
    /// The a.out kludge addresses are inconsistent.
    #[error("has inconsistent multiboot load addresses: {0}")]
    BadAddresses(&'static str),
    /// Nothing to load.
    #[error("has no loadable segments")]
    Empty,
    /// A part of the kernel would land outside guest RAM.
    #[error(
        "loads {what} at {start:#x}..{end:#x}, which is not guest RAM ({ram_mib} MiB); a larger --memory may help"
    )]
    OutsideRam {
        /// What was being placed.
        what: String,
        /// First address.
        start: u64,
        /// One past the last address.
        end: u64,
        /// RAM size in MiB.
        ram_mib: u64,
    },
    /// The kernel overlaps the low area where the boot information goes.
    #[error(
        "loads at {start:#x}..{end:#x}, over the boot information area {MMAP_ADDR:#x}..{LOW_AREA_END:#x}"
    )]
    OverlapsBootInfo {
        /// First address.
        start: u64,
        /// One past the last address.
        end: u64,
    },
    /// The entry point lies outside the loaded image.
    #[error("has entry point {0:#x} outside its loaded image")]
    EntryOutsideImage(u64),
    /// Guest memory refused a write.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// A module to hand to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootModule {
    /// Its contents.
    pub data: Vec<u8>,
    /// Its string (by convention the file name, then arguments).
    pub string: String,
}

/// Where a loaded kernel starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultibootEntry {
    /// Physical entry address (EIP).
    pub entry: u32,
    /// Address of the multiboot information structure (EBX).
    pub info: u32,
    /// One past the highest byte the loader wrote (kernel, information, modules).
    pub end: u64,
}

/// The parsed multiboot header.
#[derive(Debug, Clone, Copy)]
struct Header1 {
    offset: usize,
    flags: u32,
    header_addr: u32,
    load_addr: u32,
    load_end_addr: u32,
    bss_end_addr: u32,
    entry_addr: u32,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Whether `kernel` has a multiboot v1 header (valid checksum) in its first 8 KiB.
pub fn is_multiboot(kernel: &[u8]) -> bool {
    find_header(kernel).is_ok()
}

fn find_header(kernel: &[u8]) -> Result<Header1, MultibootError> {
    let limit = kernel.len().min(HEADER_SEARCH_LEN);
    let mut bad_checksum = None;
    for offset in (0..limit.saturating_sub(11)).step_by(4) {
        if u32_at(kernel, offset) != Some(HEADER_MAGIC) {
            continue;
        }
        let flags = u32_at(kernel, offset + 4).unwrap_or(0);
        let checksum = u32_at(kernel, offset + 8).unwrap_or(0);
        if HEADER_MAGIC.wrapping_add(flags).wrapping_add(checksum) != 0 {
            bad_checksum.get_or_insert(offset);
            continue;
        }
        let field = |i: usize| u32_at(kernel, offset + 12 + 4 * i);
        let mut h = Header1 {
            offset,
            flags,
            header_addr: 0,
            load_addr: 0,
            load_end_addr: 0,
            bss_end_addr: 0,
            entry_addr: 0,
        };
        if flags & FLAG_AOUT_KLUDGE != 0 {
            let (Some(a), Some(b), Some(c), Some(d), Some(e)) =
                (field(0), field(1), field(2), field(3), field(4))
            else {
                return Err(MultibootError::Truncated {
                    what: "the multiboot header's address fields",
                    start: offset as u64,
                    end: offset as u64 + 32,
                    len: kernel.len(),
                });
            };
            (
                h.header_addr,
                h.load_addr,
                h.load_end_addr,
                h.bss_end_addr,
                h.entry_addr,
            ) = (a, b, c, d, e);
        }
        return Ok(h);
    }
    if let Some(offset) = bad_checksum {
        return Err(MultibootError::BadChecksum { offset });
    }
    let hint = if kernel.get(0x202..0x206) == Some(b"HdrS") {
        ": it is a Linux bzImage, and the Linux boot protocol is not supported yet"
    } else if kernel.starts_with(b"\x7fELF") && kernel.get(4) == Some(&2) {
        ": it is a 64-bit ELF file; multiboot v1 kernels are 32-bit"
    } else if kernel.len() < 12 {
        ": the file is too short to hold one (empty or truncated?)"
    } else {
        ""
    };
    Err(MultibootError::NoHeader { hint })
}

/// One piece of the image to place in guest memory.
struct Piece<'a> {
    addr: u64,
    bytes: &'a [u8],
    zero_after: u64,
}

fn check_ram(mem: &GuestMemory, what: String, start: u64, end: u64) -> Result<(), MultibootError> {
    let len = usize::try_from(end - start).unwrap_or(usize::MAX);
    if end > start
        && mem
            .layout()
            .region_of(start, len)
            .is_none_or(|r| r.kind != vmdriver::RegionKind::Ram)
    {
        return Err(MultibootError::OutsideRam {
            what,
            start,
            end,
            ram_mib: mem.layout().ram_mib(),
        });
    }
    Ok(())
}

fn elf_pieces(kernel: &[u8]) -> Result<(Vec<Piece<'_>>, u64), MultibootError> {
    if !kernel.starts_with(b"\x7fELF") {
        return Err(MultibootError::NotElf);
    }
    let header = Elf::parse_header(kernel).map_err(|e| MultibootError::BadElf(e.to_string()))?;
    if header.e_ident[4] != ELFCLASS32 || header.e_machine != EM_386 {
        let class = if header.e_ident[4] == ELFCLASS32 {
            32
        } else {
            64
        };
        return Err(MultibootError::WrongElf(format!(
            "class {class}-bit, machine {}",
            header.e_machine
        )));
    }
    let phoff = header.e_phoff;
    let phend = phoff + u64::from(header.e_phnum) * u64::from(header.e_phentsize);
    if phend > kernel.len() as u64 {
        return Err(MultibootError::Truncated {
            what: "the ELF program header table",
            start: phoff,
            end: phend,
            len: kernel.len(),
        });
    }
    let ctx = Ctx::new(Container::Little, Endian::Little);
    let phdrs = ProgramHeader::parse(kernel, phoff as usize, header.e_phnum as usize, ctx)
        .map_err(|e| MultibootError::BadElf(e.to_string()))?;
    let mut pieces = Vec::new();
    let mut entry = None;
    for ph in phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD && p.p_memsz > 0)
    {
        let start = ph.p_offset;
        let end = start + ph.p_filesz;
        if end > kernel.len() as u64 {
            return Err(MultibootError::Truncated {
                what: "an ELF segment",
                start,
                end,
                len: kernel.len(),
            });
        }
        if ph.p_filesz > ph.p_memsz {
            return Err(MultibootError::BadElf(
                "a segment's file size exceeds its memory size".into(),
            ));
        }
        // The entry point is a virtual address; kernels linked high give it in a segment whose
        // physical address differs, and it is translated the way the segment is.
        if (ph.p_vaddr..ph.p_vaddr + ph.p_memsz).contains(&header.e_entry) {
            entry = Some(header.e_entry - ph.p_vaddr + ph.p_paddr);
        }
        pieces.push(Piece {
            addr: ph.p_paddr,
            bytes: &kernel[start as usize..end as usize],
            zero_after: ph.p_memsz - ph.p_filesz,
        });
    }
    if pieces.is_empty() {
        return Err(MultibootError::Empty);
    }
    let entry = entry.ok_or(MultibootError::EntryOutsideImage(header.e_entry))?;
    Ok((pieces, entry))
}

fn aout_pieces<'a>(kernel: &'a [u8], h: &Header1) -> Result<(Vec<Piece<'a>>, u64), MultibootError> {
    let bad = MultibootError::BadAddresses;
    if h.header_addr < h.load_addr {
        return Err(bad("header_addr is below load_addr"));
    }
    let header_delta = (h.header_addr - h.load_addr) as usize;
    let file_start = h
        .offset
        .checked_sub(header_delta)
        .ok_or(bad("load_addr lies before the start of the file"))?;
    let load_len = if h.load_end_addr == 0 {
        (kernel.len() - file_start) as u64
    } else if h.load_end_addr < h.load_addr {
        return Err(bad("load_end_addr is below load_addr"));
    } else {
        u64::from(h.load_end_addr - h.load_addr)
    };
    let file_end = file_start as u64 + load_len;
    if file_end > kernel.len() as u64 {
        return Err(MultibootError::Truncated {
            what: "the image the a.out kludge describes",
            start: file_start as u64,
            end: file_end,
            len: kernel.len(),
        });
    }
    let load_end = u64::from(h.load_addr) + load_len;
    let bss = if h.bss_end_addr == 0 {
        0
    } else if u64::from(h.bss_end_addr) < load_end {
        return Err(bad("bss_end_addr is below the end of the loaded image"));
    } else {
        u64::from(h.bss_end_addr) - load_end
    };
    let entry = u64::from(h.entry_addr);
    if !(u64::from(h.load_addr)..load_end + bss).contains(&entry) {
        return Err(MultibootError::EntryOutsideImage(entry));
    }
    let piece = Piece {
        addr: u64::from(h.load_addr),
        bytes: &kernel[file_start..file_end as usize],
        zero_after: bss,
    };
    Ok((vec![piece], entry))
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Loads `kernel` (whose file name is `name`) into `mem` with `cmdline` and `modules`, writes
/// the multiboot information describing `e820`, and returns where to enter it.
pub fn load(
    mem: &GuestMemory,
    kernel: &[u8],
    name: &str,
    cmdline: &str,
    modules: &[BootModule],
    e820: &[E820Entry],
) -> Result<MultibootEntry, MultibootError> {
    let header = find_header(kernel)?;
    let unknown = header.flags & 0xFFFF & !SUPPORTED_REQUIREMENTS;
    if unknown != 0 {
        return Err(MultibootError::UnsupportedRequirements {
            flags: header.flags,
            unknown,
        });
    }
    if header.flags & FLAG_VIDEO_MODE != 0 {
        tracing::warn!(
            "the kernel asks for a video mode; bt86 boots it in text mode, as QEMU does"
        );
    }
    let (pieces, entry) = if header.flags & FLAG_AOUT_KLUDGE != 0 {
        aout_pieces(kernel, &header)?
    } else {
        elf_pieces(kernel)?
    };

    let mut image_end = 0;
    for p in &pieces {
        let end = p.addr + p.bytes.len() as u64 + p.zero_after;
        check_ram(mem, "the kernel image".into(), p.addr, end)?;
        if p.addr < LOW_AREA_END && end > MMAP_ADDR {
            return Err(MultibootError::OverlapsBootInfo { start: p.addr, end });
        }
        image_end = image_end.max(end);
    }
    if !pieces
        .iter()
        .any(|p| (p.addr..p.addr + p.bytes.len() as u64 + p.zero_after).contains(&entry))
    {
        return Err(MultibootError::EntryOutsideImage(entry));
    }
    for p in &pieces {
        mem.write(p.addr, p.bytes)?;
        mem.fill(p.addr + p.bytes.len() as u64, p.zero_after as usize, 0)?;
    }

    // Strings and the module list go in the pages after the kernel, then the modules.
    let strings_addr = align_up(image_end, PAGE);
    let mut strings = Vec::new();
    let mut add_string = |s: &str| {
        let addr = strings_addr + strings.len() as u64;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        addr as u32
    };
    let cmdline_addr = add_string(&format!("{name} {cmdline}"));
    let loader_addr = add_string(LOADER_NAME);
    let mod_string_addrs: Vec<u32> = modules.iter().map(|m| add_string(&m.string)).collect();
    let mods_addr = align_up(strings_addr + strings.len() as u64, 16);
    let mut next = align_up(mods_addr + 16 * modules.len() as u64, PAGE);
    let mut mod_list = Vec::with_capacity(16 * modules.len());
    for (m, string_addr) in modules.iter().zip(&mod_string_addrs) {
        let start = next;
        let end = start + m.data.len() as u64;
        check_ram(
            mem,
            format!("module '{}'", m.string),
            start,
            end.max(start + 1),
        )?;
        mem.write(start, &m.data)?;
        for v in [start as u32, end as u32, *string_addr, 0] {
            mod_list.extend_from_slice(&v.to_le_bytes());
        }
        next = align_up(end, PAGE);
    }
    check_ram(
        mem,
        "the boot information".into(),
        strings_addr,
        mods_addr + mod_list.len() as u64,
    )?;
    mem.write(strings_addr, &strings)?;
    mem.write(mods_addr, &mod_list)?;

    // The memory map (entries carry their own size field, which excludes itself).
    let mut mmap = Vec::with_capacity(24 * e820.len());
    for e in e820 {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&e.base.to_le_bytes());
        mmap.extend_from_slice(&e.length.to_le_bytes());
        mmap.extend_from_slice(&(e.kind as u32).to_le_bytes());
    }
    assert!(
        MMAP_ADDR + mmap.len() as u64 <= INFO_ADDR,
        "memory map overflows its area"
    );
    mem.write(MMAP_ADDR, &mmap)?;

    let usable_from = |base: u64| {
        e820.iter()
            .find(|e| e.kind == E820Type::Ram && e.base == base)
            .map_or(0, |e| (e.length / 1024) as u32)
    };
    let mut info = [0u8; INFO_SIZE];
    let mut put = |off: usize, v: u32| info[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put(
        0,
        INFO_MEMORY | INFO_BOOT_DEVICE | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME,
    );
    put(4, usable_from(0));
    put(8, usable_from(0x10_0000));
    put(12, BOOT_DEVICE);
    put(16, cmdline_addr);
    put(20, modules.len() as u32);
    put(24, mods_addr as u32);
    put(44, mmap.len() as u32);
    put(48, MMAP_ADDR as u32);
    put(64, loader_addr);
    mem.write(INFO_ADDR, &info)?;

    Ok(MultibootEntry {
        entry: entry as u32,
        info: INFO_ADDR as u32,
        end: next.max(mods_addr + mod_list.len() as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform::e820_map;
    use vmdriver::MemoryLayout;

    const BASE: u32 = 0x10_0000;

    fn mem(mib: u64) -> GuestMemory {
        GuestMemory::new(MemoryLayout::new(mib).unwrap()).unwrap()
    }

    fn header(flags: u32) -> Vec<u8> {
        let mut h = Vec::new();
        for v in [
            HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags),
        ] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h
    }

    /// An ELF32 file with one segment holding `body` (which starts with a multiboot header).
    fn elf(body: &[u8], vaddr: u32, paddr: u32, entry: u32, memsz: u32) -> Vec<u8> {
        let mut f = vec![0x7F, b'E', b'L', b'F', 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let w16 = |f: &mut Vec<u8>, v: u16| f.extend_from_slice(&v.to_le_bytes());
        let w32 = |f: &mut Vec<u8>, v: u32| f.extend_from_slice(&v.to_le_bytes());
        w16(&mut f, 2);
        w16(&mut f, 3);
        w32(&mut f, 1);
        w32(&mut f, entry);
        w32(&mut f, 52);
        w32(&mut f, 0);
        w32(&mut f, 0);
        for v in [52u16, 32, 1, 40, 0, 0] {
            w16(&mut f, v);
        }
        for v in [
            1u32,
            0x100,
            vaddr,
            paddr,
            body.len() as u32,
            memsz,
            7,
            0x1000,
        ] {
            w32(&mut f, v);
        }
        f.resize(0x100, 0);
        f.extend_from_slice(body);
        f
    }

    fn simple_elf() -> Vec<u8> {
        let mut body = header(FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO);
        body.extend_from_slice(&[0x90, 0xF4]);
        elf(&body, BASE, BASE, BASE + 12, body.len() as u32 + 0x100)
    }

    fn load_simple(
        m: &GuestMemory,
        kernel: &[u8],
        mods: &[BootModule],
    ) -> Result<MultibootEntry, MultibootError> {
        load(m, kernel, "k.elf", "a=1", mods, &e820_map(m.layout()))
    }

    fn read_cstr(m: &GuestMemory, addr: u32) -> String {
        let mut out = Vec::new();
        let mut b = [0u8];
        for a in addr.. {
            m.read(u64::from(a), &mut b).unwrap();
            if b[0] == 0 {
                break;
            }
            out.push(b[0]);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn elf_kernel_is_loaded_with_info_like_qemu() {
        let m = mem(16);
        let mods = [
            BootModule {
                data: b"MEMSIZE=16\n".to_vec(),
                string: "env arg".into(),
            },
            BootModule {
                data: vec![7; 5000],
                string: "blob".into(),
            },
        ];
        let e = load_simple(&m, &simple_elf(), &mods).unwrap();
        assert_eq!(e.entry, BASE + 12);
        assert_eq!(e.info, 0x9500);
        let mut code = [0u8; 2];
        m.read(u64::from(BASE) + 12, &mut code).unwrap();
        assert_eq!(code, [0x90, 0xF4]);
        let info = |off: u64| m.read_u32(0x9500 + off).unwrap();
        assert_eq!(
            info(0),
            0x24F,
            "memory, boot device, cmdline, mods, mmap, loader name"
        );
        assert_eq!(info(4), 639);
        assert_eq!(info(8), (16 * 1024) - 1024 - 128);
        assert_eq!(info(12), 0x8000_FFFF);
        assert_eq!(read_cstr(&m, info(16)), "k.elf a=1");
        assert_eq!(read_cstr(&m, info(64)), "bt86");
        assert_eq!(info(20), 2);
        let mods_addr = info(24);
        let (start0, end0) = (
            m.read_u32(u64::from(mods_addr)).unwrap(),
            m.read_u32(u64::from(mods_addr) + 4).unwrap(),
        );
        assert_eq!(start0 % 4096, 0, "modules are page aligned");
        assert_eq!(end0 - start0, 11);
        assert_eq!(
            read_cstr(&m, m.read_u32(u64::from(mods_addr) + 8).unwrap()),
            "env arg"
        );
        let start1 = m.read_u32(u64::from(mods_addr) + 16).unwrap();
        assert_eq!(start1 % 4096, 0);
        assert!(start1 >= end0);
        let mut data = [0u8; 11];
        m.read(u64::from(start0), &mut data).unwrap();
        assert_eq!(&data, b"MEMSIZE=16\n");
        assert!(start0 > BASE + 0x100, "modules come after the kernel's bss");
        assert_eq!(info(44), 6 * 24);
        assert_eq!(info(48), 0x9000);
        assert_eq!(m.read_u32(0x9000).unwrap(), 20);
        assert!(e.end >= u64::from(start1) + 5000);
    }

    #[test]
    fn bss_is_zeroed() {
        let m = mem(4);
        m.fill(u64::from(BASE), 0x1000, 0xCC).unwrap();
        load_simple(&m, &simple_elf(), &[]).unwrap();
        assert_eq!(m.read_u32(u64::from(BASE) + 0x80).unwrap(), 0);
    }

    #[test]
    fn higher_half_entry_is_translated_to_physical() {
        let mut body = header(0);
        body.extend_from_slice(&[0xF4]);
        let k = elf(&body, 0xC010_0000, BASE, 0xC010_000C, body.len() as u32);
        let e = load_simple(&mem(4), &k, &[]).unwrap();
        assert_eq!(e.entry, BASE + 12);
    }

    #[test]
    fn aout_kludge_kernel_loads_at_its_addresses() {
        let flags = FLAG_AOUT_KLUDGE | FLAG_PAGE_ALIGN;
        let mut k = header(flags);
        for v in [BASE, BASE, 0, BASE + 0x2000, BASE + 32] {
            k.extend_from_slice(&v.to_le_bytes());
        }
        k.extend_from_slice(&[0xFA, 0xF4]);
        let m = mem(4);
        m.fill(u64::from(BASE) + 0x1000, 4, 0xCC).unwrap();
        let e = load_simple(&m, &k, &[]).unwrap();
        assert_eq!(e.entry, BASE + 32);
        let mut code = [0u8; 2];
        m.read(u64::from(BASE) + 32, &mut code).unwrap();
        assert_eq!(code, [0xFA, 0xF4]);
        assert_eq!(
            m.read_u32(u64::from(BASE) + 0x1000).unwrap(),
            0,
            "bss zeroed"
        );
        // Strings start after the bss.
        assert!(m.read_u32(0x9500 + 16).unwrap() >= BASE + 0x2000);
    }

    #[test]
    fn header_must_be_in_the_first_8k() {
        let mut k = vec![0u8; HEADER_SEARCH_LEN];
        k.extend_from_slice(&header(0));
        assert!(matches!(
            load_simple(&mem(4), &k, &[]),
            Err(MultibootError::NoHeader { .. })
        ));
        assert!(!is_multiboot(&k));
        assert!(is_multiboot(&simple_elf()));
    }

    #[test]
    fn corrupt_and_foreign_files_get_specific_errors() {
        let m = mem(4);
        let mut bad = simple_elf();
        bad[0x104] ^= 1; // flip a flag bit: checksum no longer matches
        assert!(matches!(
            load_simple(&m, &bad, &[]),
            Err(MultibootError::BadChecksum { offset: 0x100 })
        ));

        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        let msg = load_simple(&m, &bz, &[]).unwrap_err().to_string();
        assert!(msg.contains("bzImage"), "{msg}");

        let msg = load_simple(&m, &[], &[]).unwrap_err().to_string();
        assert!(msg.contains("too short"), "{msg}");

        let mut raw = header(0);
        raw.extend_from_slice(&[0; 64]);
        assert!(matches!(
            load_simple(&m, &raw, &[]),
            Err(MultibootError::NotElf)
        ));

        let unknown = header(1 << 5);
        assert!(matches!(
            load_simple(&m, &unknown, &[]),
            Err(MultibootError::UnsupportedRequirements { unknown: 0x20, .. })
        ));
    }

    #[test]
    fn truncated_elf_is_reported() {
        let k = simple_elf();
        let cut = &k[..k.len() - 1];
        let err = load_simple(&mem(4), cut, &[]).unwrap_err();
        assert!(matches!(err, MultibootError::Truncated { .. }), "{err}");
        assert!(err.to_string().contains("truncated"));
    }

    #[test]
    fn wrong_machine_is_reported() {
        let mut k = simple_elf();
        k[18] = 62; // EM_X86_64
        assert!(matches!(
            load_simple(&mem(4), &k, &[]),
            Err(MultibootError::WrongElf(_))
        ));
    }

    #[test]
    fn kernel_outside_ram_or_over_boot_info_is_refused() {
        let mut body = header(0);
        body.push(0xF4);
        let high = elf(&body, 0x80_0000, 0x80_0000, 0x80_000C, 1 << 20);
        let err = load_simple(&mem(4), &high, &[]).unwrap_err();
        assert!(matches!(err, MultibootError::OutsideRam { .. }), "{err}");
        assert!(err.to_string().contains("--memory"));

        let low = elf(&body, 0x8000, 0x8000, 0x800C, 0x2000);
        assert!(matches!(
            load_simple(&mem(4), &low, &[]),
            Err(MultibootError::OverlapsBootInfo { .. })
        ));

        let vga = elf(&body, 0xB_8000, 0xB_8000, 0xB_800C, 0x100);
        assert!(matches!(
            load_simple(&mem(4), &vga, &[]),
            Err(MultibootError::OutsideRam { .. })
        ));
    }

    #[test]
    fn modules_that_do_not_fit_are_refused() {
        let m = mem(2);
        let big = BootModule {
            data: vec![0; 2 << 20],
            string: "big".into(),
        };
        let err = load_simple(&m, &simple_elf(), &[big]).unwrap_err();
        assert!(err.to_string().contains("module 'big'"), "{err}");
    }

    #[test]
    fn entry_outside_the_image_is_refused() {
        let mut body = header(0);
        body.push(0xF4);
        let k = elf(&body, BASE, BASE, 0x50_0000, body.len() as u32);
        assert!(matches!(
            load_simple(&mem(8), &k, &[]),
            Err(MultibootError::EntryOutsideImage(_))
        ));
    }

    #[test]
    fn hostile_headers_never_panic() {
        // Every truncation of a valid kernel either loads or fails cleanly.
        let k = simple_elf();
        for len in 0..k.len() {
            let _ = load_simple(&mem(4), &k[..len], &[]);
        }
        // Garbage in every header field of an a.out kludge header.
        for v in [0u32, 1, 0x8000_0000, 0xFFFF_FFFF] {
            let flags = FLAG_AOUT_KLUDGE;
            let mut k = header(flags);
            for _ in 0..5 {
                k.extend_from_slice(&v.to_le_bytes());
            }
            let _ = load_simple(&mem(4), &k, &[]);
        }
    }
}
