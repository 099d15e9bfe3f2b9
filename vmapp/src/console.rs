//! The serial console on the terminal: bytes typed on stdin go to the guest's COM1, in raw mode
//! when stdin is a terminal (restored on exit, on a signal and on panic), with QEMU's escape keys:
//! Ctrl-A X quits, Ctrl-A Ctrl-A sends one Ctrl-A. When stdin is not a terminal (a pipe, a test
//! driving the console) bytes are forwarded as they are.

use std::io::{IsTerminal, Read};
use std::os::fd::AsFd;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use rustix::termios::{OptionalActions, Termios, tcgetattr, tcsetattr};
use vmm::{StopRequest, VmControl};

/// Ctrl-A, the escape key.
const ESCAPE: u8 = 0x01;

/// The running VM's stop handle, replaced at each (re)boot.
pub type ControlSlot = Arc<Mutex<Option<VmControl>>>;

fn request_stop(slot: &ControlSlot) {
    if let Some(c) = slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        c.request_stop(StopRequest::Host);
    }
}

/// The terminal state to put back, shared with the panic hook.
static SAVED: Mutex<Option<Termios>> = Mutex::new(None);

fn restore_terminal() {
    if let Some(t) = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = tcsetattr(std::io::stdin().as_fd(), OptionalActions::Now, &t);
    }
}

/// The console while it runs; dropping it restores the terminal.
pub struct Console {
    raw: bool,
}

impl Drop for Console {
    fn drop(&mut self) {
        if self.raw {
            restore_terminal();
        }
    }
}

/// What the escape-key state machine does with one typed byte.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    /// Send these bytes to the guest.
    Send(Vec<u8>),
    /// Quit bt86.
    Quit,
}

/// Ctrl-A handling: after Ctrl-A, `x`/`X` quits, Ctrl-A sends one Ctrl-A, anything else is sent
/// as typed (both bytes).
#[derive(Debug, Default)]
struct Escapes {
    armed: bool,
}

impl Escapes {
    fn key(&mut self, b: u8) -> Key {
        if std::mem::take(&mut self.armed) {
            return match b {
                b'x' | b'X' => Key::Quit,
                ESCAPE => Key::Send(vec![ESCAPE]),
                _ => Key::Send(vec![ESCAPE, b]),
            };
        }
        if b == ESCAPE {
            self.armed = true;
            return Key::Send(Vec::new());
        }
        Key::Send(vec![b])
    }
}

/// Connects stdin to the guest: returns the console guard and the channel of typed bytes.
pub fn start(slot: ControlSlot) -> (Console, Receiver<Vec<u8>>) {
    let (tx, rx) = channel();
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let mut raw = false;
    if tty && let Ok(saved) = tcgetattr(stdin.as_fd()) {
        let mut t = saved.clone();
        t.make_raw();
        // Keep output post-processing so the guest's "\n" still returns the carriage, as the
        // guest's own tty layer expects of a serial terminal.
        t.output_modes = saved.output_modes;
        if tcsetattr(stdin.as_fd(), OptionalActions::Now, &t).is_ok() {
            *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
            raw = true;
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_terminal();
                previous(info);
            }));
            eprintln!("bt86: serial console on this terminal; Ctrl-A X quits\r");
        }
    }
    std::thread::Builder::new()
        .name("bt86-stdin".into())
        .spawn(move || read_stdin(tx, tty, slot))
        .ok();
    (Console { raw }, rx)
}

/// Makes the signals that would end bt86 (SIGINT, SIGTERM, SIGHUP) stop the VM cleanly instead,
/// so the run ends with its status and `--stats` whatever the console is.
pub fn watch_signals(slot: ControlSlot) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(mut signals) => {
            std::thread::Builder::new()
                .name("bt86-signals".into())
                .spawn(move || {
                    for _ in signals.forever() {
                        request_stop(&slot);
                    }
                })
                .ok();
        }
        Err(e) => tracing::warn!("cannot watch for signals ({e}); Ctrl-C ends bt86 abruptly"),
    }
}

fn read_stdin(tx: Sender<Vec<u8>>, tty: bool, slot: ControlSlot) {
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 256];
    let mut escapes = Escapes::default();
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => return, // end of input: the guest just stops getting any
            Ok(n) => n,
        };
        let mut out = Vec::with_capacity(n);
        for &b in &buf[..n] {
            if !tty {
                out.push(b);
                continue;
            }
            match escapes.key(b) {
                Key::Send(bytes) => out.extend(bytes),
                Key::Quit => {
                    request_stop(&slot);
                    return;
                }
            }
        }
        if !out.is_empty() && tx.send(out).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_ctrl_a_sends_one() {
        let mut e = Escapes::default();
        assert_eq!(e.key(b'a'), Key::Send(vec![b'a']));
        assert_eq!(e.key(ESCAPE), Key::Send(vec![]));
        assert_eq!(e.key(ESCAPE), Key::Send(vec![ESCAPE]));
        assert_eq!(e.key(ESCAPE), Key::Send(vec![]));
        assert_eq!(e.key(b'c'), Key::Send(vec![ESCAPE, b'c']));
        assert_eq!(e.key(b'x'), Key::Send(vec![b'x']), "x alone is just x");
        assert_eq!(e.key(ESCAPE), Key::Send(vec![]));
        assert_eq!(e.key(b'x'), Key::Quit);
    }
}
