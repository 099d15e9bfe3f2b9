//! How devices ask the VM to stop, and why it stopped.

use std::sync::{Arc, Mutex};

/// A request from the platform to end the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// The guest wrote `value` to the isa-debug-exit port: bt86 exits with `(value << 1) | 1`.
    DebugExit(u32),
    /// The guest powered the machine off (ACPI S5).
    PowerOff,
    /// The guest reset the machine (the keyboard controller's reset line, or the reset control
    /// register).
    Reset,
    /// The host asked to stop: the console's quit key or a signal.
    Host,
}

/// A shared handle through which devices request a stop; the run loop checks it after every
/// device access. The first request wins.
#[derive(Debug, Clone, Default)]
pub struct VmControl {
    stop: Arc<Mutex<Option<StopRequest>>>,
}

impl VmControl {
    /// A handle with no request pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the VM to stop; ignored if a request is already pending.
    pub fn request_stop(&self, request: StopRequest) {
        let mut stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        stop.get_or_insert(request);
    }

    /// The pending request, if any.
    pub fn pending(&self) -> Option<StopRequest> {
        *self.stop.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let c = VmControl::new();
        assert_eq!(c.pending(), None);
        c.clone().request_stop(StopRequest::DebugExit(3));
        c.request_stop(StopRequest::PowerOff);
        assert_eq!(c.pending(), Some(StopRequest::DebugExit(3)));
    }
}
