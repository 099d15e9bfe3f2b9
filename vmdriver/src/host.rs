//! Facts about the host machine the monitor measures itself: its time-stamp counter's rate.

use std::time::{Duration, Instant};

/// Reads the host's time-stamp counter.
fn rdtsc() -> u64 {
    // SAFETY: RDTSC reads a counter and has no memory effects; every x86-64 CPU has it, and
    // Linux leaves it enabled for user space (CR4.TSD clear) on the hosts bt86 supports.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The host TSC's rate in Hz, measured against the monotonic clock over `window` (50 ms gives
/// about four significant digits). Software emulators such as QEMU TCG hand the host TSC to
/// their guests, so this converts such a guest's cycle counts to time.
pub fn tsc_hz(window: Duration) -> u64 {
    let start = Instant::now();
    let c0 = rdtsc();
    while start.elapsed() < window {
        std::thread::sleep(window / 10);
    }
    let c1 = rdtsc();
    let elapsed = start.elapsed();
    ((c1.wrapping_sub(c0)) as f64 / elapsed.as_secs_f64()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_advances_at_a_plausible_rate() {
        // Any x86-64 host of the last twenty years: between 100 MHz and 10 GHz.
        let hz = tsc_hz(Duration::from_millis(20));
        assert!((100_000_000..10_000_000_000).contains(&hz), "{hz} Hz");
    }
}
