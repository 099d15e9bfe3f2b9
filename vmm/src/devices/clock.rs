//! The VM's clock: one timeline for every timer device and for the guest's TSC.
//!
//! A real PC's 8254, PM timer, RTC, local APIC timer and TSC all count the same physical time,
//! and guests rely on it: Linux measures the TSC against the PIT (and the PIT against the PM
//! timer) with tolerances of 500 ppm and less. On a host shared with other work, the vCPU thread
//! is descheduled for milliseconds at a time; counted as guest time, such a gap looks to the
//! guest like an SMI in the middle of a measurement (Linux's calibrations reject it), or like
//! time jumping forward between two instructions.
//!
//! [`VmClock`] in steal-hiding mode counts, while the vCPU runs, only the time the vCPU thread
//! was on a host CPU: between two readings less than [`EXACT_AFTER`] apart it advances by the
//! host's monotonic time (cheap, vDSO), and at a reading after a longer gap it asks the host for
//! the thread's CPU time (a system call) and leaves out whatever part of the wall time since the
//! previous such reading the thread spent waiting for a CPU or blocked. While the guest is halted
//! it follows wall time (the guest is waiting for time to pass). It never goes backwards. The
//! guest therefore sees time that is consistent between all its clocks and free of host
//! scheduling gaps longer than [`EXACT_AFTER`]; on a loaded host it runs behind the host's clock
//! by the time the VM was not given a CPU, as VMware's "apparent time" does.
//!
//! The kvm engine's TSC is the host's, which counts every nanosecond; its devices use the plain
//! host clock ([`VmClock::host`]) so that they agree with it.

use std::sync::Mutex;
use std::thread::ThreadId;
use std::time::Instant;

use super::pit::Clock;

/// `value * num / den` rounded down, in 64-bit arithmetic: `value` is split at multiples of
/// `den` so no product exceeds `num * den`, which must fit in a u64 (the device clocks convert
/// nanoseconds to and from ticks at every VM exit, and a 128-bit division is a library call
/// costing tens of nanoseconds). Saturates where the result would not fit.
#[inline]
pub const fn scale(value: u64, num: u64, den: u64) -> u64 {
    (value / den)
        .saturating_mul(num)
        .saturating_add(value % den * num / den)
}

/// [`scale`] rounded up.
#[inline]
pub const fn scale_ceil(value: u64, num: u64, den: u64) -> u64 {
    (value / den)
        .saturating_mul(num)
        .saturating_add((value % den * num).div_ceil(den))
}

/// The shortest gap between two readings after which the clock checks the vCPU thread's CPU
/// time: host scheduling gaps shorter than this are counted as guest time. A CPU-time reading
/// costs ~0.4 us, so this bounds its cost at 2% of a guest that reads the clock constantly.
pub const EXACT_AFTER: u64 = 20_000;

/// The VM's clock (see the module documentation).
#[derive(Debug)]
pub struct VmClock {
    start: Instant,
    hide_steal: bool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The value the last reading returned.
    last: u64,
    /// Host monotonic ns since `start` at the last reading.
    last_wall: u64,
    /// While the vCPU runs (steal hiding only): its thread and its last exact reading.
    running: Option<Running>,
}

#[derive(Debug, Clone, Copy)]
struct Running {
    thread: ThreadId,
    /// Host monotonic ns since `start` at the last CPU-time reading.
    wall: u64,
    /// The thread's CPU time then.
    cpu: u64,
}

impl VmClock {
    /// A clock that hides the time the vCPU thread does not run (for engines whose TSC is this
    /// clock: bt and interp).
    pub fn virtual_time() -> Self {
        Self::with_mode(true)
    }

    /// A clock that is the host's monotonic clock (for the kvm engine, whose TSC is the host's).
    pub fn host() -> Self {
        Self::with_mode(false)
    }

    fn with_mode(hide_steal: bool) -> Self {
        Self {
            start: Instant::now(),
            hide_steal,
            state: Mutex::new(State::default()),
        }
    }

    fn wall(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The calling thread starts (or goes back to) running the guest: from now on its time off
    /// a host CPU is left out. Time since the last reading counts in full (the guest was halted
    /// or not running).
    pub fn resume(&self) {
        if !self.hide_steal {
            return;
        }
        let Some(cpu) = vmdriver::host::thread_cpu_ns() else {
            return;
        };
        let wall = self.wall();
        let mut s = self.state();
        s.last += wall.saturating_sub(s.last_wall);
        s.last_wall = wall;
        s.running = Some(Running {
            thread: std::thread::current().id(),
            wall,
            cpu,
        });
    }

    /// The guest halts (or stops running): time counts in full until [`VmClock::resume`].
    pub fn halt(&self) {
        if !self.hide_steal {
            return;
        }
        let _ = self.now_ns();
        self.state().running = None;
    }
}

impl Clock for VmClock {
    fn now_ns(&self) -> u64 {
        let wall = self.wall();
        // Host time is the monotonic clock itself: no state to keep, no lock on this path (the
        // guest reads the TSC millions of times a boot).
        if !self.hide_steal {
            return wall;
        }
        let mut s = self.state();
        let gap = wall.saturating_sub(s.last_wall);
        let mut advance = gap;
        if gap >= EXACT_AFTER
            && let Some(r) = s.running.as_mut()
            && r.thread == std::thread::current().id()
            && let Some(cpu) = vmdriver::host::thread_cpu_ns()
        {
            // Wall time since the last exact reading that the thread did not run; readings in
            // between (each less than EXACT_AFTER apart) were counted in full, so the whole
            // of it comes off this gap, as far as the gap goes.
            let waited = wall
                .saturating_sub(r.wall)
                .saturating_sub(cpu.saturating_sub(r.cpu));
            advance = gap - waited.min(gap);
            r.wall = wall;
            r.cpu = cpu;
        }
        s.last += advance;
        s.last_wall = wall;
        s.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn scaling_matches_128_bit_arithmetic() {
        let wide = |v: u64, n: u64, d: u64| (u128::from(v) * u128::from(n) / u128::from(d)) as u64;
        let wide_ceil =
            |v: u64, n: u64, d: u64| (u128::from(v) * u128::from(n)).div_ceil(u128::from(d)) as u64;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for (n, d) in [
            (1_193_182, 1_000_000_000),
            (1_000_000_000, 1_193_182),
            (3_579_545, 1_000_000_000),
            (1_000_000_000, 3_579_545),
        ] {
            for i in 0..10_000u64 {
                // Small values, values near multiples of the divisor, and large ones (hours to
                // years of nanoseconds).
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let v = match i % 3 {
                    0 => i,
                    1 => (i * d).saturating_sub(1),
                    _ => x >> 10,
                };
                assert_eq!(scale(v, n, d), wide(v, n, d), "{v} * {n} / {d}");
                assert_eq!(
                    scale_ceil(v, n, d),
                    wide_ceil(v, n, d),
                    "{v} * {n} / {d} up"
                );
            }
        }
    }

    #[test]
    fn halted_time_counts_and_running_time_counts() {
        let c = VmClock::virtual_time();
        c.halt();
        let a = c.now_ns();
        std::thread::sleep(Duration::from_millis(20));
        let b = c.now_ns();
        assert!(
            b - a >= 20_000_000,
            "halted: {} ns for a 20 ms sleep",
            b - a
        );
        c.resume();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
            let _ = c.now_ns();
        }
        assert!(c.now_ns() > b, "running: the clock did not advance");
    }

    #[test]
    fn a_thread_that_sleeps_while_running_sees_no_time_pass() {
        // Sleeping stands in for being descheduled: the thread is off the CPU either way.
        let c = VmClock::virtual_time();
        c.resume();
        let a = c.now_ns();
        std::thread::sleep(Duration::from_millis(50));
        let b = c.now_ns();
        assert!(
            b - a < 25_000_000,
            "{} ns counted for 50 ms off the CPU",
            b - a
        );
        let host = VmClock::host();
        host.resume();
        let a = host.now_ns();
        std::thread::sleep(Duration::from_millis(50));
        assert!(host.now_ns() - a >= 50_000_000, "the host clock counts it");
    }

    #[test]
    fn readings_from_another_thread_follow_the_host_clock_and_never_go_back() {
        let c = std::sync::Arc::new(VmClock::virtual_time());
        c.resume();
        let first = c.now_ns();
        let other = c.clone();
        let seen = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            other.now_ns()
        })
        .join()
        .unwrap();
        assert!(seen >= first + 10_000_000);
        assert!(c.now_ns() >= seen);
    }
}
