//! A periodic kick for a thread blocked in the guest: a POSIX timer that sends a signal to one
//! thread, so a blocking `KVM_RUN` returns (`EINTR`) and the VM's run loop can service its
//! timers and interrupts even while the guest never exits on its own.
//!
//! The signal's handler does nothing; it is installed with `SA_RESTART`, so ordinary system
//! calls on the thread restart transparently, while `KVM_RUN` returns to its caller.

use std::sync::Once;
use std::time::Duration;

/// The signal a kick sends (a real-time signal nothing else in bt86 uses).
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the do-nothing handler once per process.
fn install_handler() -> std::io::Result<()> {
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
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

/// A timer that signals the thread that created it every `period`.
pub struct Kicker {
    timer: libc::timer_t,
    thread: libc::pid_t,
}

impl Kicker {
    /// A kicker for the calling thread, firing every `period`.
    pub fn for_current_thread(period: Duration) -> std::io::Result<Self> {
        install_handler()?;
        // SAFETY: gettid has no preconditions.
        let thread = unsafe { libc::gettid() };
        // SAFETY: a zeroed sigevent is valid; the fields we set select thread-directed signal
        // delivery to `thread`, which exists (it is us). timer_create writes the new timer's id
        // into `timer` and reads only the sigevent.
        let timer = unsafe {
            let mut event: libc::sigevent = std::mem::zeroed();
            event.sigev_notify = libc::SIGEV_THREAD_ID;
            event.sigev_signo = kick_signal();
            event.sigev_notify_thread_id = thread;
            let mut timer: libc::timer_t = std::ptr::null_mut();
            if libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            timer
        };
        let kicker = Kicker { timer, thread };
        let spec = libc::timespec {
            tv_sec: period.as_secs() as libc::time_t,
            tv_nsec: period.subsec_nanos() as libc::c_long,
        };
        let value = libc::itimerspec {
            it_interval: spec,
            it_value: spec,
        };
        // SAFETY: `timer` is the timer created above; `value` is a valid itimerspec read by the
        // call.
        if unsafe { libc::timer_settime(kicker.timer, 0, &value, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(kicker)
    }

    /// Whether the calling thread is the one this kicker signals.
    pub fn is_current_thread(&self) -> bool {
        // SAFETY: gettid has no preconditions.
        self.thread == unsafe { libc::gettid() }
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        // SAFETY: `timer` was created by timer_create and is deleted exactly once, here.
        unsafe {
            libc::timer_delete(self.timer);
        }
    }
}

// SAFETY: the timer id is a kernel handle usable from any thread of the process; the signal
// keeps going to the thread recorded at creation whichever thread owns the Kicker.
unsafe impl Send for Kicker {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kick_interrupts_a_blocking_call_on_its_thread() {
        let _kicker = Kicker::for_current_thread(Duration::from_millis(5)).unwrap();
        // pause() returns only when a signal handler ran: the kick.
        // SAFETY: pause has no preconditions.
        let rc = unsafe { libc::pause() };
        assert_eq!(rc, -1);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EINTR)
        );
    }
}
