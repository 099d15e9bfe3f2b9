//! Facts about the host machine the monitor measures itself: its time-stamp counter's rate, the
//! CPU time the calling thread has had, and the CPU time another process has had.

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

/// The CPU time the whole process `pid` (every thread, including threads that have already
/// exited) has consumed so far, in nanoseconds, or None if there is no such process (or the host
/// cannot tell). This is the scheduler's own per-thread run time (`sum_exec_runtime`, the first
/// field of /proc/PID/task/TID/schedstat) summed by the kernel over the thread group, read through
/// the process's CPU-time clock (clock_getcpuclockid): exact to the nanosecond, unlike utime and
/// stime in /proc/PID/stat, which are sampled at clock ticks. One system call.
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    // Pid 0 would name the calling process itself, and the clock id holds the pid shifted left
    // by 3 bits in an int, so pids past Linux's PID_MAX_LIMIT (2^22) could alias another clock.
    const PID_MAX_LIMIT: u32 = 1 << 22;
    if !(1..=PID_MAX_LIMIT).contains(&pid) {
        return None;
    }
    let pid = libc::pid_t::try_from(pid).ok()?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid, writable clockid_t for the duration of the call; the function
    // only computes the clock id and checks that the process exists.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call; an unknown or
    // stale clock id makes the call fail, which is handled.
    let r = unsafe { libc::clock_gettime(clock, &mut ts) };
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

    /// The first field of every /proc/PID/task/TID/schedstat (nanoseconds on the CPU), summed over
    /// the process's live threads.
    fn schedstat_sum(pid: u32) -> Option<u64> {
        let mut sum = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
            let text = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
            sum += text.split_whitespace().next()?.parse::<u64>().ok()?;
        }
        Some(sum)
    }

    #[test]
    fn another_process_cpu_time_covers_all_its_threads() {
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 20000 ]; do i=$((i + 1)); done; exec sleep 600",
            ])
            .spawn()
            .unwrap();
        let pid = child.id();
        let first = process_cpu_ns(pid).expect("a live child has a CPU clock");
        std::thread::sleep(Duration::from_millis(50));
        // The kernel's sum includes every thread and is read later: never below what the
        // threads' schedstat files said before it. Hosts without schedstats skip that check.
        let threads = schedstat_sum(pid);
        let later = process_cpu_ns(pid).unwrap();
        assert!(later >= first, "{later} < {first}");
        if let Some(threads) = threads {
            assert!(
                later >= threads,
                "clock {later} ns < schedstat {threads} ns"
            );
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Reaped: no such process any more (unless the pid was reused at once).
        let gone = process_cpu_ns(pid);
        assert!(gone.is_none() || std::path::Path::new(&format!("/proc/{pid}")).exists());
        // Pid 0 would be this process; no pid at all is no process.
        assert_eq!(process_cpu_ns(0), None);
        assert_eq!(process_cpu_ns(u32::MAX), None);
        assert_eq!(process_cpu_ns(0x3fff_ffff), None);
        // This process, by its real pid: at least what this thread alone has had.
        let own = thread_cpu_ns().unwrap();
        assert!(process_cpu_ns(std::process::id()).unwrap() >= own);
    }
}
