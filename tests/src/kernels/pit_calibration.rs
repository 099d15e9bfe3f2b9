//! The `pit-calibration` kernel: Linux 6.1's two TSC calibrations against the 8254
//! (arch/x86/kernel/tsc.c), with their own acceptance rules and nothing looser:
//!
//! - `quick_pit_calibrate`: channel 2 in mode 0 counting down from 0xFFFF with its gate high
//!   (port 0x61 bit 0), the counter's MSB read without a latch (LSB, then MSB) until it changes,
//!   the TSC read at each MSB step; it needs more than 5 reads per MSB value and stops once the
//!   uncertainty of the first and last steps (d1 + d2) is under 1/2048 of the time between them
//!   (500 ppm), failing at the first step if that can never happen within 233 steps (50 ms).
//! - `pit_calibrate_tsc`, as `pit_hpet_ptimer_calibrate_cpu` runs it: channel 2 in mode 0 with a
//!   10 ms count, port 0x61 bit 5 (OUT2) polled until terminal count with the TSC read at every
//!   poll; a try fails if it polled fewer than 1000 times or the longest poll took more than ten
//!   times the shortest (what Linux takes for an SMI). Three tries (50 ms and 5000 polls after two
//!   failures), the lowest result wins.
//!
//! It prints whether each passed and whether the two agree within Linux's 10% window (the one it
//! applies between the PIT and its reference timers), then the measured TSC rates in kHz. Exits
//! with value 0x2C.

use iced_x86::code_asm::*;

use crate::kit::{AsmResult, Kit};

/// The PIT's input clock (PIT_TICK_RATE).
const PIT_TICK_RATE: u32 = 1_193_182;
/// MAX_QUICK_PIT_ITERATIONS: 50 ms of MSB steps of 256 PIT clocks.
const MAX_QUICK_PIT_ITERATIONS: u32 = 50 * PIT_TICK_RATE / 1000 / 256;

/// Emits `outb((inb(0x61) & ~0x02) | 0x01, 0x61)` (gate 2 high, speaker off), then channel 2
/// in mode 0, LSB then MSB, binary, loaded with `count` from memory (low 16 bits).
fn start_channel2(a: &mut CodeAssembler, count: AsmMemoryOperand) -> AsmResult {
    a.in_(al, 0x61)?;
    a.and(al, !2u32 as i32)?;
    a.or(al, 1)?;
    a.out(0x61, al)?;
    a.mov(al, 0xB0)?;
    a.out(0x43, al)?;
    a.mov(eax, count)?;
    a.out(0x42, al)?;
    a.mov(al, ah)?;
    a.out(0x42, al)?;
    Ok(())
}

/// Emits `pit_verify_msb(BL)`: reads the LSB (ignored) and the MSB of channel 2; ZF set if the
/// MSB equals BL.
fn verify_msb(a: &mut CodeAssembler) -> AsmResult {
    a.in_(al, 0x42)?;
    a.in_(al, 0x42)?;
    a.cmp(al, bl)?;
    Ok(())
}

/// Builds the kernel.
pub fn pit_calibration() -> AsmResult<Vec<u8>> {
    let mut k = Kit::new()?;
    let quick_tsc = k.data(&[0; 4]);
    let quick_d1 = k.data(&[0; 4]);
    let quick_i = k.data(&[0; 4]);
    let quick_khz = k.data(&[0; 4]);
    let latch = k.data(&[0; 4]);
    let ms = k.data(&[0; 4]);
    let loopmin = k.data(&[0; 4]);
    let t1 = k.data(&[0; 4]);
    let tscmin = k.data(&[0; 4]);
    let try_n = k.data(&[0; 4]);
    let loop_khz = k.data(&[0; 4]);
    let loops_passed = k.data(&[0; 4]);
    let last_polls = k.data(&[0; 4]);
    let last_max = k.data(&[0; 4]);

    let mut expect_msb = k.asm().create_label();
    let mut calibrate_loop = k.asm().create_label();
    let mut after_subroutines = k.asm().create_label();
    k.asm().jmp(after_subroutines)?;

    // pit_expect_msb(BL): ECX = reads that saw MSB BL (at most 50000), ESI = the TSC at the
    // last of them, EDI = the TSC now minus the TSC at the one before it.
    {
        let a = k.asm();
        let mut again = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut expect_msb)?;
        a.xor(ecx, ecx)?;
        a.xor(esi, esi)?;
        a.xor(ebp, ebp)?;
        a.set_label(&mut again)?;
        a.cmp(ecx, 50_000)?;
        a.jae(done)?;
        verify_msb(a)?;
        a.jne(done)?;
        a.mov(ebp, esi)?;
        a.rdtsc()?;
        a.mov(esi, eax)?;
        a.inc(ecx)?;
        a.jmp(again)?;
        a.set_label(&mut done)?;
        a.rdtsc()?;
        a.sub(eax, ebp)?;
        a.mov(edi, eax)?;
        a.ret()?;
    }

    // pit_calibrate_tsc(latch, ms, loopmin): EAX = TSC kHz, or 0xFFFFFFFF (ULONG_MAX) if the
    // try is rejected.
    {
        let a = k.asm();
        let mut poll = a.create_label();
        let mut not_min = a.create_label();
        let mut not_max = a.create_label();
        let mut terminal = a.create_label();
        let mut rejected = a.create_label();
        a.set_label(&mut calibrate_loop)?;
        start_channel2(a, dword_ptr(latch))?;
        a.rdtsc()?;
        a.mov(dword_ptr(t1), eax)?;
        a.mov(esi, eax)?; // tsc
        a.mov(edi, eax)?; // t2
        a.xor(ecx, ecx)?; // pitcnt
        a.xor(ebp, ebp)?; // tscmax
        a.mov(dword_ptr(tscmin), 0xFFFF_FFFFu32)?;
        a.set_label(&mut poll)?;
        a.in_(al, 0x61)?;
        a.test(al, 0x20)?;
        a.jnz(terminal)?;
        a.rdtsc()?;
        a.mov(edi, eax)?;
        a.sub(eax, esi)?;
        a.mov(esi, edi)?;
        a.cmp(eax, dword_ptr(tscmin))?;
        a.jae(not_min)?;
        a.mov(dword_ptr(tscmin), eax)?;
        a.set_label(&mut not_min)?;
        a.cmp(eax, ebp)?;
        a.jbe(not_max)?;
        a.mov(ebp, eax)?;
        a.set_label(&mut not_max)?;
        a.inc(ecx)?;
        a.jmp(poll)?;
        a.set_label(&mut terminal)?;
        a.mov(dword_ptr(last_polls), ecx)?;
        a.mov(dword_ptr(last_max), ebp)?;
        a.cmp(ecx, dword_ptr(loopmin))?;
        a.jb(rejected)?;
        // tscmax > 10 * tscmin (64-bit product: tscmin may be large on a slow poll).
        a.mov(eax, dword_ptr(tscmin))?;
        a.mov(ecx, 10)?;
        a.mul(ecx)?;
        a.test(edx, edx)?;
        let mut in_ratio = a.create_label();
        a.jnz(in_ratio)?;
        a.cmp(ebp, eax)?;
        a.ja(rejected)?;
        a.set_label(&mut in_ratio)?;
        a.mov(eax, edi)?;
        a.sub(eax, dword_ptr(t1))?;
        a.xor(edx, edx)?;
        a.div(dword_ptr(ms))?;
        a.ret()?;
        a.set_label(&mut rejected)?;
        a.mov(eax, 0xFFFF_FFFFu32)?;
        a.ret()?;
    }
    k.asm().set_label(&mut after_subroutines)?;

    // quick_pit_calibrate.
    let mut quick_failed = k.asm().create_label();
    let mut quick_done = k.asm().create_label();
    {
        let count = k.data(&0xFFFFu32.to_le_bytes());
        let a = k.asm();
        let mut step = a.create_label();
        let mut next = a.create_label();
        let mut not_first = a.create_label();
        let mut success = a.create_label();
        start_channel2(a, dword_ptr(count))?;
        // The count is loaded at the next PIT clock: one 16-bit read of the counter waits.
        a.mov(bl, 0)?;
        verify_msb(a)?;
        a.mov(bl, 0xFF)?;
        a.call(expect_msb)?;
        a.cmp(ecx, 5)?;
        a.jbe(quick_failed)?;
        a.mov(dword_ptr(quick_tsc), esi)?;
        a.mov(dword_ptr(quick_d1), edi)?;
        a.mov(dword_ptr(quick_i), 1)?;
        a.set_label(&mut step)?;
        a.mov(bl, 0xFF)?;
        a.sub(bl, byte_ptr(quick_i))?;
        a.call(expect_msb)?;
        a.cmp(ecx, 5)?;
        a.jbe(quick_failed)?;
        a.sub(esi, dword_ptr(quick_tsc))?; // delta
        a.mov(ebx, dword_ptr(quick_d1))?;
        a.add(ebx, edi)?; // d1 + d2
        a.cmp(dword_ptr(quick_i), 1)?;
        a.jne(not_first)?;
        // i == 1: fail fast if d1 + d2 >= (delta * MAX_QUICK_PIT_ITERATIONS) >> 11.
        a.mov(eax, esi)?;
        a.mov(ecx, MAX_QUICK_PIT_ITERATIONS)?;
        a.mul(ecx)?;
        a.shrd(eax, edx, 11)?;
        a.shr(edx, 11)?;
        a.test(edx, edx)?;
        a.jnz(not_first)?;
        a.cmp(ebx, eax)?;
        a.jae(quick_failed)?;
        a.set_label(&mut not_first)?;
        a.mov(eax, esi)?;
        a.shr(eax, 11)?;
        a.cmp(ebx, eax)?;
        a.jae(next)?;
        // One more read: every TSC value was stable against the PIT.
        a.mov(bl, 0xFE)?;
        a.sub(bl, byte_ptr(quick_i))?;
        verify_msb(a)?;
        a.jne(quick_failed)?;
        a.jmp(success)?;
        a.set_label(&mut next)?;
        a.inc(dword_ptr(quick_i))?;
        a.cmp(dword_ptr(quick_i), MAX_QUICK_PIT_ITERATIONS)?;
        a.jbe(step)?;
        a.jmp(quick_failed)?;
        // kHz = delta * PIT_TICK_RATE / (i * 256 * 1000).
        a.set_label(&mut success)?;
        a.mov(eax, esi)?;
        a.mov(ecx, PIT_TICK_RATE)?;
        a.mul(ecx)?;
        a.imul_3(ecx, dword_ptr(quick_i), 256_000)?;
        a.div(ecx)?;
        a.mov(dword_ptr(quick_khz), eax)?;
    }
    k.print("quick PIT calibration: passed\n")?;
    k.asm().jmp(quick_done)?;
    k.asm().set_label(&mut quick_failed)?;
    k.print("quick PIT calibration: failed\n")?;
    k.asm().set_label(&mut quick_done)?;

    // pit_hpet_ptimer_calibrate_cpu's PIT loops: three tries, CAL_LATCH (10 ms, 1000 polls),
    // then CAL2_LATCH (50 ms, 5000 polls) after two failures; the lowest rate wins.
    {
        let a = k.asm();
        let mut again = a.create_label();
        let mut not_lower = a.create_label();
        let mut failed_try = a.create_label();
        let mut keep_latch = a.create_label();
        a.mov(dword_ptr(latch), PIT_TICK_RATE / 100)?;
        a.mov(dword_ptr(ms), 10)?;
        a.mov(dword_ptr(loopmin), 1000)?;
        a.mov(dword_ptr(loop_khz), 0xFFFF_FFFFu32)?;
        a.mov(dword_ptr(try_n), 0)?;
        a.set_label(&mut again)?;
        a.call(calibrate_loop)?;
        a.cmp(eax, 0xFFFF_FFFFu32)?;
        a.je(failed_try)?;
        a.inc(dword_ptr(loops_passed))?;
        a.set_label(&mut failed_try)?;
        a.cmp(eax, dword_ptr(loop_khz))?;
        a.jae(not_lower)?;
        a.mov(dword_ptr(loop_khz), eax)?;
        a.set_label(&mut not_lower)?;
        a.cmp(dword_ptr(try_n), 1)?;
        a.jne(keep_latch)?;
        a.cmp(dword_ptr(loop_khz), 0xFFFF_FFFFu32)?;
        a.jne(keep_latch)?;
        a.mov(dword_ptr(latch), PIT_TICK_RATE / 20)?;
        a.mov(dword_ptr(ms), 50)?;
        a.mov(dword_ptr(loopmin), 5000)?;
        a.set_label(&mut keep_latch)?;
        a.inc(dword_ptr(try_n))?;
        a.cmp(dword_ptr(try_n), 3)?;
        a.jb(again)?;
    }
    let mut loop_failed = k.asm().create_label();
    let mut loop_done = k.asm().create_label();
    k.asm().cmp(dword_ptr(loop_khz), 0xFFFF_FFFFu32)?;
    k.asm().je(loop_failed)?;
    k.print("PIT loop calibration: passed\n")?;
    k.asm().jmp(loop_done)?;
    k.asm().set_label(&mut loop_failed)?;
    k.print("PIT loop calibration: failed\n")?;
    k.asm().set_label(&mut loop_done)?;

    // Agreement: 90 <= 100 * quick / loop <= 110, when both passed.
    {
        let mut apart = k.asm().create_label();
        let mut agreed = k.asm().create_label();
        let a = k.asm();
        a.mov(ecx, dword_ptr(loop_khz))?;
        a.cmp(ecx, 0xFFFF_FFFFu32)?;
        a.je(apart)?;
        a.mov(eax, dword_ptr(quick_khz))?;
        a.test(eax, eax)?;
        a.jz(apart)?;
        a.mov(edx, 100)?;
        a.mul(edx)?;
        a.div(ecx)?;
        a.cmp(eax, 90)?;
        a.jb(apart)?;
        a.cmp(eax, 110)?;
        a.ja(apart)?;
        k.print("the two agree within 10%: yes\n")?;
        k.asm().jmp(agreed)?;
        k.asm().set_label(&mut apart)?;
        k.print("the two agree within 10%: no\n")?;
        k.asm().set_label(&mut agreed)?;
    }
    k.asm().mov(eax, dword_ptr(quick_khz))?;
    k.print_field("quick.khz", eax)?;
    k.asm().mov(eax, dword_ptr(quick_i))?;
    k.print_field("quick.steps", eax)?;
    k.asm().mov(eax, dword_ptr(loop_khz))?;
    k.print_field("loop.khz", eax)?;
    k.asm().mov(eax, dword_ptr(loops_passed))?;
    k.print_field("loop.tries-passed", eax)?;
    k.asm().mov(eax, dword_ptr(last_polls))?;
    k.print_field("loop.last.polls", eax)?;
    k.asm().mov(eax, dword_ptr(tscmin))?;
    k.print_field("loop.last.tscmin", eax)?;
    k.asm().mov(eax, dword_ptr(last_max))?;
    k.print_field("loop.last.tscmax", eax)?;
    k.exit(0x2C)?;
    k.build()
}
