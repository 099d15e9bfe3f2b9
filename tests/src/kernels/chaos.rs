//! `chaos` kernels: random bytes executed as ring-0 code, again and again. Every exception or
//! interrupt (the PIT ticks at 1 kHz, so no round spins or halts for long) lands in one handler
//! that restores flat segments and a stack, ends the interrupt at the PICs, and jumps with
//! interrupts on to another pseudo-random offset in the random bytes, until it has been entered
//! [`ROUNDS`] times (it prints a '.' on COM1 each time; odd rounds run with DS, ES and SS
//! based at 2 MiB); then
//! the kernel exits with value 0x10. What the random code does on the way — loads of system
//! registers, port and MMIO accesses, far jumps, stores over its own IDT, GDT, handler or page
//! tables — is up to the seed: the run may also end in a triple fault, a halt, a reset or a
//! spin. The host process has to survive all of it.

use iced_x86::code_asm::*;

use super::handler_address;
use crate::kit::{AsmResult, Kit, init_pics, pit_rate_generator};

/// Handler entries before the kernel exits.
pub const ROUNDS: u32 = 64;
/// Bytes of random code.
const CODE_BYTES: usize = 16 * 1024;

/// Base of the data segment odd rounds run with in DS, ES and SS.
const BASED: u32 = 0x20_0000;

const GDT: [u64; 4] = [
    0,
    0x00CF_9B00_0000_FFFF, // 0x08 code, DPL 0, flat
    0x00CF_9300_0000_FFFF, // 0x10 data, DPL 0, flat
    0x00CF_9320_0000_FFFF, // 0x18 data, DPL 0, base BASED, 4 GiB limit
];

/// A xorshift64* generator: the same bytes for the same seed on every host.
fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// Where odd seeds' page directory and table go (identity map of the first 4 MiB).
const PAGE_DIRECTORY: u32 = 0x30_0000;

/// Builds the kernel for `seed`; odd seeds run with paging on (the first 4 MiB identity-mapped
/// through 4 KiB pages, so the random code also meets the shadow MMU: its stores may land in
/// the page tables, and it may load CR3 or CR0 itself). Exits with value 0x10 after [`ROUNDS`]
/// handler entries.
pub fn chaos(seed: u64) -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let (_, gdtr) = k.descriptor_table(&GDT.map(u64::to_le_bytes).concat());
    let (idt, idtr) = k.descriptor_table(&[0u8; 256 * 8]);
    let rounds = k.data(&[0; 4]);
    let stack = k.data(&[0; 4096]) + 4096;
    let code = k.data(&random_bytes(seed, CODE_BYTES));
    let mut done = k.asm().create_label();

    k.asm().lgdt(ptr(gdtr))?;
    handler_address(&mut k, |k| {
        let a = k.asm();
        a.mov(eax, 0x10u32)?;
        a.mov(ss, eax)?;
        a.mov(esp, stack)?;
        a.mov(ds, eax)?;
        a.mov(es, eax)?;
        a.mov(fs, eax)?;
        a.mov(gs, eax)?;
        // End whatever interrupt brought us here (harmless after an exception), then run the
        // next round with interrupts on: the timer ends rounds that spin or halt.
        a.mov(al, 0x20u32)?;
        a.out(0x20, al)?;
        a.out(0xA0, al)?;
        a.push(0x202u32)?; // IF set; TF, DF, AC, NT clear
        a.popfd()?;
        // One '.' on COM1 per round.
        a.mov(edx, 0x3F8u32)?;
        a.mov(al, b'.' as u32)?;
        a.out(dx, al)?;
        a.inc(dword_ptr(rounds))?;
        a.mov(eax, dword_ptr(rounds))?;
        a.cmp(eax, ROUNDS)?;
        a.jae(done)?;
        // The next start: a multiplicative hash of the round, within the random bytes.
        a.imul_3(eax, eax, 0x9E37_79B1u32 as i32)?;
        a.shr(eax, 32 - CODE_BYTES.trailing_zeros())?;
        a.add(eax, code)?;
        a.mov(edi, eax)?;
        // Odd rounds: DS, ES and SS based at BASED (the stack stays where it is).
        let mut flat = a.create_label();
        a.test(dword_ptr(rounds), 1u32)?;
        a.jz(flat)?;
        a.mov(eax, 0x18u32)?;
        a.mov(ds, eax)?;
        a.mov(es, eax)?;
        a.mov(ss, eax)?;
        a.mov(esp, stack.wrapping_sub(BASED))?;
        a.set_label(&mut flat)?;
        for r in [ebx, ecx, edx, esi, ebp] {
            a.xor(r, r)?;
        }
        a.xor(eax, eax)?;
        Ok(a.jmp(edi)?)
    })?;
    // EAX = the handler: an interrupt gate through 0x08 for every vector, DPL 3 so that INT n
    // reaches it from any privilege level.
    k.asm().mov(edx, eax)?;
    k.asm().and(edx, 0xFFFF_0000u32)?;
    k.asm().or(edx, 0xEE00u32)?;
    k.asm().and(eax, 0xFFFFu32)?;
    k.asm().or(eax, 0x0008_0000u32)?;
    k.asm().mov(ecx, idt)?;
    let mut fill = k.asm().create_label();
    k.asm().set_label(&mut fill)?;
    k.asm().mov(dword_ptr(ecx), eax)?;
    k.asm().mov(dword_ptr(ecx + 4), edx)?;
    k.asm().add(ecx, 8u32)?;
    k.asm().cmp(ecx, idt + 256 * 8)?;
    k.asm().jb(fill)?;
    k.asm().lidt(ptr(idtr))?;
    // IRQ 0 from the PIT at about 1 kHz (mode 2), the only line unmasked.
    init_pics(k.asm(), (0x20, 0x28), (0xFE, 0xFF))?;
    pit_rate_generator(k.asm(), 1193)?;
    if seed % 2 == 1 {
        k.identity_map_4mib(PAGE_DIRECTORY)?;
        k.asm().mov(eax, PAGE_DIRECTORY)?;
        k.asm().mov(cr3, eax)?;
        k.asm().mov(eax, cr0)?;
        k.asm().or(eax, 0x8000_0000u32)?;
        k.asm().mov(cr0, eax)?;
    }
    k.print("chaos\n")?;
    k.asm().int(0x20)?; // the first round starts like the others, from the handler
    k.asm().set_label(&mut done)?;
    k.exit(0x10)?;
    k.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_give_different_fixed_bytes() {
        assert_eq!(random_bytes(1, 64), random_bytes(1, 64));
        assert_ne!(random_bytes(1, 64), random_bytes(2, 64));
        let ones: u32 = random_bytes(3, 4096).iter().map(|b| b.count_ones()).sum();
        assert!((15_000..17_800).contains(&ones), "{ones} of 32768 bits set");
    }
}
