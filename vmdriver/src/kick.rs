//! Periodic signals to one thread: a POSIX timer (`SIGEV_THREAD_ID`) that the kernel delivers to
//! the thread that runs a vCPU, with no helper thread to wake.
//!
//! - [`ThreadTimer`] is the timer itself. Its users keep it from firing while the vCPU is
//!   halted, so an idle guest costs no host wake-ups beyond its own timer interrupts.
//! - [`Kicker`] is the kvm engine's use of it: the signal's handler does nothing and is installed
//!   with `SA_RESTART`, so ordinary system calls on the thread restart transparently, while a
//!   blocking `KVM_RUN` returns (`EINTR`) and the VM's run loop can service its timers and
//!   interrupts even while the guest never exits on its own.
//! - The translator's time slices ([`crate::world::SliceTimer`]) use another signal, whose
//!   handler asks translated code to leave.

use std::io;
use std::sync::Once;
use std::time::Duration;

/// A POSIX timer that sends `signal` to the thread that created it: every `period` while armed
/// with [`ThreadTimer::arm`], or first after a chosen time with [`ThreadTimer::arm_after`].
pub struct ThreadTimer {
    timer: libc::timer_t,
    thread: libc::pid_t,
    period: Duration,
    armed: bool,
}

/// The calling thread's kernel id (cached: it is read on every run of a vCPU).
pub fn current_thread() -> libc::pid_t {
    thread_local! {
        static TID: std::cell::Cell<libc::pid_t> = const { std::cell::Cell::new(0) };
    }
    TID.with(|t| {
        if t.get() == 0 {
            // SAFETY: gettid has no preconditions.
            t.set(unsafe { libc::gettid() });
        }
        t.get()
    })
}

impl ThreadTimer {
    /// A disarmed timer that will signal the calling thread with `signal`.
    pub fn for_current_thread(signal: libc::c_int, period: Duration) -> io::Result<Self> {
        let thread = current_thread();
        // SAFETY: a zeroed sigevent is valid; the fields we set select thread-directed signal
        // delivery to `thread`, which exists (it is us). timer_create writes the new timer's id
        // into `timer` and reads only the sigevent.
        let timer = unsafe {
            let mut event: libc::sigevent = std::mem::zeroed();
            event.sigev_notify = libc::SIGEV_THREAD_ID;
            event.sigev_signo = signal;
            event.sigev_notify_thread_id = thread;
            let mut timer: libc::timer_t = std::ptr::null_mut();
            if libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) != 0 {
                return Err(io::Error::last_os_error());
            }
            timer
        };
        Ok(Self {
            timer,
            thread,
            period,
            armed: false,
        })
    }

    /// Programs the timer: the first signal `first` from now (zero disarms), then one every
    /// `interval` (zero: none).
    fn set(&mut self, first: Duration, interval: Duration) -> io::Result<()> {
        let spec = |d: Duration| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        };
        let value = libc::itimerspec {
            it_interval: spec(interval),
            it_value: spec(first),
        };
        // SAFETY: `timer` is the timer created in `for_current_thread`; `value` is a valid
        // itimerspec read by the call.
        if unsafe { libc::timer_settime(self.timer, 0, &value, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Starts the periodic signal (the first one a full period from now); nothing if it runs.
    pub fn arm(&mut self) -> io::Result<()> {
        if !self.armed {
            self.set(self.period, self.period)?;
            self.armed = true;
        }
        Ok(())
    }

    /// Sends a signal `after` from now (at least a microsecond), then one every `period`,
    /// replacing whatever was armed.
    pub fn arm_after(&mut self, after: Duration) -> io::Result<()> {
        self.set(after.max(Duration::from_micros(1)), self.period)?;
        self.armed = true;
        Ok(())
    }

    /// Stops the periodic signal; nothing if it is stopped. A signal already sent may still
    /// arrive.
    pub fn disarm(&mut self) {
        if self.armed {
            // A zero it_value disarms; timer_settime cannot fail on a valid timer.
            let _ = self.set(Duration::ZERO, Duration::ZERO);
            self.armed = false;
        }
    }

    /// Whether the timer was armed and not disarmed since.
    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// Whether the calling thread is the one this timer signals.
    pub fn is_current_thread(&self) -> bool {
        self.thread == current_thread()
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: `timer` was created by timer_create and is deleted exactly once, here.
        unsafe {
            libc::timer_delete(self.timer);
        }
    }
}

// SAFETY: the timer id is a kernel handle usable from any thread of the process; the signal
// keeps going to the thread recorded at creation whichever thread owns the timer.
unsafe impl Send for ThreadTimer {}

/// The signal a kick sends (a real-time signal nothing else in bt86 uses).
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the do-nothing handler once per process.
fn install_handler() -> io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; we fill in the
        // handler (an extern "C" function that touches nothing, so it is async-signal-safe) and
        // SA_RESTART before passing it to sigaction, which only reads it.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_kick as *const () as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(kick_signal(), &action, std::ptr::null_mut())
        };
        if rc != 0 {
            result = Err(io::Error::last_os_error());
        }
    });
    result
}

/// The kvm engine's periodic kick: a [`ThreadTimer`] whose signal interrupts `KVM_RUN`.
pub struct Kicker(ThreadTimer);

impl Kicker {
    /// A kicker for the calling thread, firing every `period` once armed.
    pub fn for_current_thread(period: Duration) -> io::Result<Self> {
        install_handler()?;
        Ok(Self(ThreadTimer::for_current_thread(
            kick_signal(),
            period,
        )?))
    }

    /// Starts the kicks (the guest is about to run).
    pub fn arm(&mut self) -> io::Result<()> {
        self.0.arm()
    }

    /// Stops the kicks (the guest is halted: the VM sleeps until its next event).
    pub fn disarm(&mut self) {
        self.0.disarm();
    }

    /// Whether the calling thread is the one this kicker signals.
    pub fn is_current_thread(&self) -> bool {
        self.0.is_current_thread()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pause_ends_with_a_signal() -> bool {
        // pause() returns only when a signal handler ran: the kick.
        // SAFETY: pause has no preconditions.
        let rc = unsafe { libc::pause() };
        rc == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
    }

    #[test]
    fn a_kick_interrupts_a_blocking_call_on_its_thread() {
        let mut kicker = Kicker::for_current_thread(Duration::from_millis(5)).unwrap();
        kicker.arm().unwrap();
        assert!(pause_ends_with_a_signal());
    }

    #[test]
    fn a_disarmed_timer_sends_nothing_until_armed_again() {
        install_handler().unwrap();
        let period = Duration::from_millis(2);
        let mut timer = ThreadTimer::for_current_thread(kick_signal(), period).unwrap();
        assert!(!timer.is_armed());
        timer.arm().unwrap();
        assert!(pause_ends_with_a_signal());
        timer.disarm();
        assert!(!timer.is_armed());
        // Drain a signal that was already on its way, then look for more: a sleep that a
        // signal would cut short runs to its end.
        std::thread::sleep(period * 3);
        let asked = Duration::from_millis(50);
        let mut left = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let ask = libc::timespec {
            tv_sec: 0,
            tv_nsec: asked.as_nanos() as libc::c_long,
        };
        // SAFETY: both timespecs are valid for the call.
        let rc = unsafe { libc::nanosleep(&ask, &mut left) };
        assert_eq!(rc, 0, "a disarmed timer interrupted a sleep");
        timer.arm().unwrap();
        assert!(pause_ends_with_a_signal());
    }
}
