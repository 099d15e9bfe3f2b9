//! Facts about the host machine the monitor measures itself: its time-stamp counter's rate, and
//! the CPU time the calling thread has had.

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

/// The CPU time the calling thread has consumed so far, in nanoseconds (CLOCK_THREAD_CPUTIME_ID:
/// user and system time, not the time it waited for a host CPU or slept), or None if the host
/// cannot tell. A system call (~0.4 us on our hosts), not a vDSO read: call it sparingly.
pub fn thread_cpu_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call; the clock id is a
    // constant every Linux since 2.6.12 knows.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (r == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
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

    #[test]
    fn thread_cpu_time_counts_work_and_not_sleep() {
        let a = thread_cpu_ns().expect("CLOCK_THREAD_CPUTIME_ID");
        std::thread::sleep(Duration::from_millis(30));
        let b = thread_cpu_ns().unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let c = thread_cpu_ns().unwrap();
        assert!(b - a < 20_000_000, "30 ms asleep cost {} ns of CPU", b - a);
        assert!(c > b, "30 ms of spinning added no CPU time");
    }
}
