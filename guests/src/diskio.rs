//! `diskio`: a static i386 Linux program for the linux benchmark's disk steps. Busybox cannot
//! do random I/O in one process (a `dd` per block would time fork and exec, not the disk), and
//! `dd if=/dev/zero` times the kernel clearing its buffer as much as the writes.
//!
//! `diskio MODE COUNT 3<FILE` (or `3<>FILE` to write) switches file descriptor 3 to O_DIRECT,
//! takes its size from `lseek(3, 0, SEEK_END)`, and makes COUNT transfers with
//! `pread64`/`pwrite64` from one page-aligned buffer (from `brk`):
//! - `r` / `w`: 4 KiB reads / writes at block-aligned offsets from a fixed pseudo-random
//!   sequence (a 32-bit LCG) over the whole file;
//! - `R` / `W`: 1 MiB reads / writes one after another from offset 0.
//!
//! Exit status 0 when every transfer moved all its bytes, 1 when one did not, 2 on bad
//! arguments. The same binary runs in the guest and, natively, in the benchmark's chroot on the
//! host.

use iced_x86::code_asm::*;

use crate::kit::{AsmResult, elf32_exec};

/// Where the program is loaded (the usual i386 executable base).
const BASE: u32 = 0x0804_8000;
/// Offset of the file's one segment (the ELF header and program header come first).
const SEGMENT_OFFSET: u32 = 0x1000;
/// Bytes per random transfer.
pub const BLOCK: u32 = 4096;
/// Bytes per sequential transfer.
pub const SEQ_BLOCK: u32 = 1 << 20;

/// i386 system call numbers (arch/x86/entry/syscalls/syscall_32.tbl).
mod nr {
    pub const EXIT: u32 = 1;
    pub const LSEEK: u32 = 19;
    pub const BRK: u32 = 45;
    pub const FCNTL: u32 = 55;
    pub const PREAD64: u32 = 180;
    pub const PWRITE64: u32 = 181;
}
const F_GETFL: u32 = 3;
const F_SETFL: u32 = 4;
/// O_DIRECT on i386.
const O_DIRECT: u32 = 0o40000;

fn exit_with(a: &mut CodeAssembler, status: u32) -> AsmResult {
    a.mov(eax, nr::EXIT)?;
    a.mov(ebx, status)?;
    a.int(0x80)?;
    Ok(())
}

/// The program as an ELF executable.
pub fn diskio_elf() -> AsmResult<Vec<u8>> {
    let code_base = BASE + SEGMENT_OFFSET;
    let code = program(code_base)?;
    Ok(elf32_exec(&code, code_base, code_base, code_base))
}

fn program(code_base: u32) -> AsmResult<Vec<u8>> {
    let mut a = CodeAssembler::new(32)?;
    let mut bad_args = a.create_label();
    let mut failed = a.create_label();
    let mut digits = a.create_label();
    let mut parsed = a.create_label();
    let mut again = a.create_label();
    let mut is_read = a.create_label();
    let mut moved = a.create_label();
    let mut transfer = a.create_label();

    // [esp] = argc, [esp+4] = argv[0], [esp+8] = argv[1], [esp+12] = argv[2].
    a.cmp(dword_ptr(esp), 3u32)?;
    a.jne(bad_args)?;
    // EBP = 'r' or 'w'.
    a.mov(eax, dword_ptr(esp + 8))?;
    a.movzx(ebp, word_ptr(eax))?;
    let mut mode_ok = a.create_label();
    for m in [b'r', b'w', b'R'] {
        a.cmp(ebp, u32::from(m))?;
        a.je(mode_ok)?;
    }
    a.cmp(ebp, u32::from(b'W'))?;
    a.jne(bad_args)?;
    a.set_label(&mut mode_ok)?;
    // ESI = COUNT (decimal).
    a.mov(ecx, dword_ptr(esp + 12))?;
    a.xor(esi, esi)?;
    a.set_label(&mut digits)?;
    a.movzx(eax, byte_ptr(ecx))?;
    a.test(eax, eax)?;
    a.jz(parsed)?;
    a.sub(eax, 0x30u32)?;
    a.cmp(eax, 9u32)?;
    a.ja(bad_args)?;
    a.imul_3(esi, esi, 10)?;
    a.add(esi, eax)?;
    a.inc(ecx)?;
    a.jmp(digits)?;
    a.set_label(&mut parsed)?;
    // The buffer: 2 MiB past the current break, its first page boundary in EDI's slot below.
    a.mov(eax, nr::BRK)?;
    a.xor(ebx, ebx)?;
    a.int(0x80)?;
    a.mov(edi, eax)?;
    a.lea(ebx, dword_ptr(eax + 2 * SEQ_BLOCK))?;
    a.mov(eax, nr::BRK)?;
    a.int(0x80)?;
    a.lea(ecx, dword_ptr(edi + 2 * SEQ_BLOCK))?;
    a.cmp(eax, ecx)?;
    a.jb(failed)?;
    a.add(edi, BLOCK - 1)?;
    a.and(edi, !(BLOCK - 1))?;
    a.push(edi)?; // [esp] = buffer
    // fcntl(3, F_SETFL, fcntl(3, F_GETFL) | O_DIRECT)
    a.mov(eax, nr::FCNTL)?;
    a.mov(ebx, 3u32)?;
    a.mov(ecx, F_GETFL)?;
    a.int(0x80)?;
    a.test(eax, eax)?;
    a.js(failed)?;
    a.or(eax, O_DIRECT)?;
    a.mov(edx, eax)?;
    a.mov(eax, nr::FCNTL)?;
    a.mov(ebx, 3u32)?;
    a.mov(ecx, F_SETFL)?;
    a.int(0x80)?;
    a.test(eax, eax)?;
    a.js(failed)?;
    // EDI = blocks in the file (lseek(3, 0, SEEK_END) / 4096; files below 2 GiB).
    a.mov(eax, nr::LSEEK)?;
    a.mov(ebx, 3u32)?;
    a.xor(ecx, ecx)?;
    a.mov(edx, 2u32)?;
    a.int(0x80)?;
    a.test(eax, eax)?;
    a.jle(failed)?;
    a.shr(eax, 12)?;
    a.test(eax, eax)?;
    a.jz(failed)?;
    a.push(eax)?; // [esp] = blocks, [esp+4] = buffer
    a.push(0x1234_5678u32)?; // [esp] = LCG state (or the next sequential block), [esp+4] = blocks
    let mut sequential = a.create_label();
    let mut seq_again = a.create_label();
    let mut seq_transfer = a.create_label();
    a.cmp(ebp, u32::from(b'a'))?;
    a.jb(sequential)?;
    a.set_label(&mut again)?;
    a.test(esi, esi)?;
    a.jz(moved)?;
    // state = state * 1664525 + 1013904223 (Numerical Recipes); block = (state >> 8) % blocks.
    a.imul_3(eax, dword_ptr(esp), 1_664_525)?;
    a.add(eax, 1_013_904_223u32)?;
    a.mov(dword_ptr(esp), eax)?;
    a.shr(eax, 8)?;
    a.xor(edx, edx)?;
    a.div(dword_ptr(esp + 4))?;
    // Byte offset of block EDX: low dword in the pread64/pwrite64 ESI slot, high in EDI.
    a.push(esi)?;
    a.mov(eax, edx)?;
    a.shl(eax, 12)?;
    a.shr(edx, 20)?;
    a.mov(edi, edx)?;
    a.mov(esi, eax)?;
    a.mov(eax, nr::PWRITE64)?;
    a.cmp(ebp, u32::from(b'w'))?;
    a.jne(is_read)?;
    a.jmp(transfer)?;
    a.set_label(&mut is_read)?;
    a.mov(eax, nr::PREAD64)?;
    a.set_label(&mut transfer)?;
    a.mov(ebx, 3u32)?;
    a.mov(ecx, dword_ptr(esp + 12))?;
    a.mov(edx, BLOCK)?;
    a.int(0x80)?;
    a.pop(esi)?;
    a.cmp(eax, BLOCK)?;
    a.jne(failed)?;
    a.dec(esi)?;
    a.jmp(again)?;
    // Sequential: 1 MiB transfers at 0, 1 MiB, 2 MiB, ...
    a.set_label(&mut sequential)?;
    a.mov(dword_ptr(esp), 0u32)?;
    a.set_label(&mut seq_again)?;
    a.test(esi, esi)?;
    a.jz(moved)?;
    a.push(esi)?;
    a.mov(eax, dword_ptr(esp + 4))?;
    a.mov(edi, eax)?;
    a.shr(edi, 12)?;
    a.shl(eax, 20)?;
    a.mov(esi, eax)?;
    a.mov(eax, nr::PWRITE64)?;
    a.cmp(ebp, u32::from(b'W'))?;
    a.je(seq_transfer)?;
    a.mov(eax, nr::PREAD64)?;
    a.set_label(&mut seq_transfer)?;
    a.mov(ebx, 3u32)?;
    a.mov(ecx, dword_ptr(esp + 12))?;
    a.mov(edx, SEQ_BLOCK)?;
    a.int(0x80)?;
    a.pop(esi)?;
    a.cmp(eax, SEQ_BLOCK)?;
    a.jne(failed)?;
    a.inc(dword_ptr(esp))?;
    a.dec(esi)?;
    a.jmp(seq_again)?;
    a.set_label(&mut moved)?;
    exit_with(&mut a, 0)?;
    a.set_label(&mut failed)?;
    exit_with(&mut a, 1)?;
    a.set_label(&mut bad_args)?;
    exit_with(&mut a, 2)?;
    Ok(a.assemble(u64::from(code_base))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program natively (i386 code runs on an x86-64 Linux host) on a file; skipped
    /// where the host cannot run i386 executables or its temporary directory has no O_DIRECT.
    #[test]
    fn reads_and_writes_random_and_sequential_blocks_of_a_file() {
        let dir = std::env::temp_dir().join(format!("bt86-diskio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let prog = dir.join("diskio");
        std::fs::write(&prog, diskio_elf().unwrap()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = dir.join("data");
        std::fs::write(&file, vec![0u8; 4 << 20]).unwrap();
        let run = |args: &str| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("{} {args}", prog.display()))
                .current_dir(&dir)
                .status()
                .unwrap()
                .code()
        };
        let status = run("r 64 3<data");
        if status != Some(0) {
            eprintln!(
                "skipped: diskio exited with {status:?} (no i386 support or no O_DIRECT here)"
            );
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        }
        assert_eq!(run("w 64 3<>data"), Some(0));
        assert_eq!(run("W 4 3<>data"), Some(0));
        assert_eq!(run("R 4 3<data"), Some(0));
        assert_eq!(
            run("R 5 3<data"),
            Some(1),
            "a transfer past the end is short"
        );
        assert_eq!(run("x 64 3<data"), Some(2), "an unknown mode");
        assert_eq!(run("rw 64 3<data"), Some(2), "a mode of two letters");
        assert_eq!(run("r 12a 3<data"), Some(2), "a bad count");
        assert_eq!(run("r 1"), Some(1), "no descriptor 3");
        // A write through a read-only descriptor fails.
        assert_eq!(run("w 1 3<data"), Some(1));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
