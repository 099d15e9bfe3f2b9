//! Drives a guest's serial console the way a person at a terminal would: start the emulator
//! with COM1 on its standard input and output (bt86 `--serial stdio`, QEMU `-serial stdio`),
//! wait for the shell prompt, type a command, read what it printed.
//!
//! The driver is built for a slow, shared machine and for a guest that can do anything:
//! - every wait has a timeout, and a timeout (or the emulator ending) is an error carrying the
//!   transcript's tail, never a hang;
//! - command output is framed by markers the shell computes (`echo @@BT86""-BEGIN-3` prints
//!   `@@BT86-BEGIN-3`), so the terminal echo of the typed line can never be mistaken for output;
//! - the transcript is bounded: a guest that floods the console fails the session instead of
//!   filling the host's memory;
//! - terminal queries in the output (busybox ash asks for the cursor position with `ESC [6n`
//!   before each prompt) are left unanswered, as a dumb terminal would, and stripped from what
//!   a command returns.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread;
use std::time::{Duration, Instant};

/// The most console output one session keeps; more is an error.
pub const MAX_TRANSCRIPT: usize = 8 << 20;

/// How much of the transcript's end an error shows.
const TAIL_BYTES: usize = 3000;

/// The prefix of the markers that frame a command's output.
const MARKER: &str = "@@BT86";

/// Why a console session failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The awaited text did not appear in time.
    #[error("waited {waited:?} for {awaited:?}; the console's last lines:\n{tail}")]
    Timeout {
        /// What the driver waited for.
        awaited: String,
        /// How long it waited.
        waited: Duration,
        /// The end of the transcript.
        tail: String,
    },
    /// The emulator closed its output (it exited) before the awaited text appeared.
    #[error("the console closed while waiting for {awaited:?}; its last lines:\n{tail}")]
    Closed {
        /// What the driver waited for.
        awaited: String,
        /// The end of the transcript.
        tail: String,
    },
    /// The guest printed more than [`MAX_TRANSCRIPT`] bytes.
    #[error("the console printed more than {MAX_TRANSCRIPT} bytes; its last lines:\n{tail}")]
    Flooded {
        /// The end of the transcript.
        tail: String,
    },
    /// Writing to the emulator's standard input failed.
    #[error("cannot type into the console")]
    Input(#[source] std::io::Error),
    /// The emulator did not start.
    #[error("cannot start {program}")]
    Spawn {
        /// The program that did not start.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What one command printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The command as typed.
    pub command: String,
    /// Its output, with carriage returns and terminal queries removed.
    pub text: String,
    /// Its exit status (`$?`).
    pub status: i32,
}

/// How the emulator ended.
#[derive(Debug, Clone)]
pub struct Ended {
    /// The whole console transcript, as received.
    pub transcript: Vec<u8>,
    /// The emulator's standard error (bounded).
    pub stderr: String,
    /// Its exit status (None when it was killed).
    pub status: Option<i32>,
    /// Whether it had to be killed after the timeout.
    pub timed_out: bool,
}

/// A running emulator whose console the driver types into.
pub struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Receiver<Vec<u8>>,
    stderr: Option<thread::JoinHandle<Vec<u8>>>,
    transcript: Vec<u8>,
    /// Everything before this offset has been consumed by a wait.
    cursor: usize,
    closed: bool,
    started: Instant,
    commands: u32,
}

impl Session {
    /// Starts `cmd` with piped standard streams.
    pub fn spawn(mut cmd: Command) -> Result<Self, ConsoleError> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|source| ConsoleError::Spawn {
            program: format!("{:?}", cmd.get_program()),
            source,
        })?;
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let (tx, output) = channel();
        thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send(buf[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let stderr = thread::spawn(move || {
            // Keep the first 64 KiB; read on to the end so the emulator never blocks on it.
            let mut kept = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match stderr.read(&mut buf) {
                    Ok(0) | Err(_) => return kept,
                    Ok(n) => {
                        let room = (64usize << 10).saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                    }
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            output,
            stderr: Some(stderr),
            transcript: Vec::new(),
            cursor: 0,
            closed: false,
            started,
            commands: 0,
        })
    }

    /// Time since the emulator was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The whole transcript so far.
    pub fn transcript(&self) -> &[u8] {
        &self.transcript
    }

    /// The end of the transcript, as text, for error messages.
    pub fn tail(&self) -> String {
        tail_of(&self.transcript)
    }

    /// Takes what the emulator printed, waiting at most `wait`; false once its output closed.
    fn receive(&mut self, wait: Duration) -> Result<bool, ConsoleError> {
        if self.closed {
            return Ok(false);
        }
        match self.output.recv_timeout(wait) {
            Ok(chunk) => {
                self.transcript.extend_from_slice(&chunk);
                // Take whatever else is already there without waiting.
                loop {
                    if self.transcript.len() > MAX_TRANSCRIPT {
                        return Err(ConsoleError::Flooded { tail: self.tail() });
                    }
                    match self.output.try_recv() {
                        Ok(more) => self.transcript.extend_from_slice(&more),
                        Err(_) => return Ok(true),
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => Ok(true),
            Err(RecvTimeoutError::Disconnected) => {
                self.closed = true;
                Ok(false)
            }
        }
    }

    /// Waits until `text` appears after the cursor; returns what came before it and moves the
    /// cursor past it.
    pub fn wait_for(&mut self, text: &str, timeout: Duration) -> Result<String, ConsoleError> {
        let start = Instant::now();
        let needle = text.as_bytes();
        let mut searched = self.cursor;
        loop {
            // Search only what is new, with enough overlap for a needle split between chunks.
            let from = searched.saturating_sub(needle.len()).max(self.cursor);
            if let Some(at) = find(&self.transcript[from..], needle) {
                let at = from + at;
                let before =
                    String::from_utf8_lossy(&self.transcript[self.cursor..at]).into_owned();
                self.cursor = at + needle.len();
                return Ok(before);
            }
            searched = self.transcript.len();
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(ConsoleError::Timeout {
                    awaited: text.to_string(),
                    waited: start.elapsed(),
                    tail: self.tail(),
                });
            }
            if !self.receive(left.min(Duration::from_millis(500)))? {
                return Err(ConsoleError::Closed {
                    awaited: text.to_string(),
                    tail: self.tail(),
                });
            }
        }
    }

    /// Types `text` into the console.
    pub fn send(&mut self, text: &str) -> Result<(), ConsoleError> {
        let stdin = self.stdin.as_mut().ok_or_else(|| {
            ConsoleError::Input(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "standard input already closed",
            ))
        })?;
        stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(ConsoleError::Input)
    }

    /// Runs `command` in the shell whose prompt is `prompt` and returns its output and exit
    /// status, then waits for the next prompt. The caller has already seen the previous prompt.
    /// `command` is one shell command line without a trailing `&` or `;`.
    pub fn run(
        &mut self,
        command: &str,
        prompt: &str,
        timeout: Duration,
    ) -> Result<Output, ConsoleError> {
        self.commands += 1;
        let n = self.commands;
        // The quotes split the marker in the echoed line; the shell's output joins it. One
        // line, so nothing is typed while the command runs (the terminal would echo it into
        // the command's output).
        self.send(&format!(
            "echo {MARKER}\"\"-BEGIN-{n}; {command}; echo {MARKER}\"\"-END-{n} $?\n"
        ))?;
        let begin = format!("{MARKER}-BEGIN-{n}");
        let end = format!("{MARKER}-END-{n} ");
        self.wait_for(&begin, timeout)?;
        self.wait_for("\n", timeout)?;
        let text = self.wait_for(&end, timeout)?;
        let status = self.wait_for("\n", timeout)?;
        self.wait_for(prompt, timeout)?;
        Ok(Output {
            command: command.to_string(),
            text: clean(&text),
            status: status.trim().parse().unwrap_or(-1),
        })
    }

    /// Closes the console's input and waits up to `timeout` for the emulator to exit (killing
    /// it then), collecting the rest of its output.
    pub fn finish(mut self, timeout: Duration) -> Ended {
        self.stdin.take();
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break st.code(),
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    timed_out = true;
                    break self.child.wait().ok().and_then(|s| s.code());
                }
                Ok(None) => {
                    if matches!(self.receive(Duration::from_millis(50)), Err(_) | Ok(false)) {
                        thread::sleep(Duration::from_millis(50));
                    }
                }
                Err(_) => break None,
            }
        };
        // The emulator has exited: its output closes once the reader has drained it.
        while let Ok(true) = self.receive(Duration::from_secs(5)) {
            if self.closed {
                break;
            }
        }
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        Ended {
            transcript: std::mem::take(&mut self.transcript),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            status,
            timed_out,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A session abandoned on an error must not leave an emulator running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The last [`TAIL_BYTES`] of `transcript` as text, from a line start.
pub fn tail_of(transcript: &[u8]) -> String {
    let from = transcript.len().saturating_sub(TAIL_BYTES);
    let text = String::from_utf8_lossy(&transcript[from..]);
    let text = match (from > 0, text.find('\n')) {
        (true, Some(nl)) => &text[nl + 1..],
        _ => &text[..],
    };
    clean(text)
}

/// Console text as a test wants to read it: line ends without carriage returns, and without
/// the cursor-position query (`ESC [6n`) busybox ash sends before each prompt.
pub fn clean(text: &str) -> String {
    text.replace("\x1b[6n", "").replace('\r', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake console: a shell script that prints a prompt with ash's terminal query, echoes
    /// typed lines like a terminal, and runs them.
    fn fake_shell() -> Session {
        let script = r#"
            printf 'booting\r\n'
            while printf 'pr# \033[6n' && IFS= read -r line; do
                printf '%s\r\n' "$line"
                case $line in exit*) eval "$line" ;; esac
                eval "$line" | sed 's/$/\r/'
            done
        "#;
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        Session::spawn(cmd).unwrap()
    }

    #[test]
    fn commands_return_their_output_and_status_without_the_echo() {
        let mut s = fake_shell();
        let t = Duration::from_secs(20);
        assert_eq!(s.wait_for("pr# ", t).unwrap(), "booting\r\n");
        let out = s.run("echo hello; echo world", "pr# ", t).unwrap();
        assert_eq!(out.text, "hello\nworld\n");
        assert_eq!(out.status, 0);
        let out = s.run("false", "pr# ", t).unwrap();
        assert_eq!(out.text, "");
        assert_eq!(out.status, 1);
        s.send("exit 3\n").unwrap();
        let end = s.finish(t);
        assert_eq!(end.status, Some(3));
        assert!(!end.timed_out);
    }

    #[test]
    fn a_missing_marker_times_out_with_the_tail() {
        let mut s = fake_shell();
        let err = s
            .wait_for("never printed", Duration::from_millis(300))
            .unwrap_err();
        match err {
            ConsoleError::Timeout { tail, .. } => assert!(tail.contains("booting"), "{tail}"),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn an_emulator_that_exits_closes_the_wait() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "printf 'bye\\n'"]);
        let mut s = Session::spawn(cmd).unwrap();
        let err = s.wait_for("prompt", Duration::from_secs(60)).unwrap_err();
        assert!(matches!(err, ConsoleError::Closed { .. }), "{err}");
    }

    #[test]
    fn a_flood_of_output_is_an_error_not_a_full_memory() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "yes flood"]);
        let mut s = Session::spawn(cmd).unwrap();
        let err = s.wait_for("prompt", Duration::from_secs(120)).unwrap_err();
        assert!(matches!(err, ConsoleError::Flooded { .. }), "{err}");
    }
}
