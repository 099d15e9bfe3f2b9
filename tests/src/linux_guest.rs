//! Scripted runs of the Debian guest from scripts/fetch-guest.sh: a test appends a small cpio
//! archive holding `/bt86/run.sh` (and any data files) to the guest's initramfs, the guest's
//! `/init` runs that script instead of a shell, and the test follows the console line by line
//! (to act on a marker, e.g. SIGKILL bt86 right after the guest reports a completed `sync`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// What a guest script prints before each line the test reads.
pub const MARK: &str = "BT86-TEST: ";

/// The Debian guest and the bt86 binary to boot it with.
#[derive(Debug, Clone)]
pub struct LinuxGuest {
    /// The directory holding `vmlinuz` and `initramfs.gz`.
    pub dir: PathBuf,
    /// An optimised bt86 (booting Linux on a debug build takes far longer).
    pub bin: PathBuf,
}

impl LinuxGuest {
    /// The fetched guest (`$BT86_GUEST_DIR`, else .bt86-cache/guest) and the release binary
    /// (`$BT86_LINUX_BIN`, else target/release/bt86), or why the test must be skipped.
    pub fn find() -> Result<Self, String> {
        let dir = match std::env::var_os("BT86_GUEST_DIR") {
            Some(d) => PathBuf::from(d),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.bt86-cache/guest"),
        };
        if !(dir.join("vmlinuz").is_file() && dir.join("initramfs.gz").is_file()) {
            return Err(format!(
                "no Debian guest in {} (scripts/fetch-guest.sh fetches it; scripts/test.sh runs it)",
                dir.display()
            ));
        }
        let bin = match std::env::var_os("BT86_LINUX_BIN") {
            Some(p) => PathBuf::from(p),
            None => {
                // target/<profile>/deps/<test> -> target/release/bt86
                let exe = std::env::current_exe().unwrap_or_default();
                let release = exe
                    .ancestors()
                    .nth(3)
                    .map(|t| t.join("release/bt86"))
                    .unwrap_or_default();
                if !release.is_file() {
                    return Err(
                        "no release build of bt86 (cargo build --release -p vmapp; scripts/test.sh does it)"
                            .into(),
                    );
                }
                release
            }
        };
        Ok(Self { dir, bin })
    }

    /// The guest's initramfs with `files` appended as a second archive: (path without the
    /// leading '/', contents, mode). Linux unpacks concatenated archives in order; the guest's
    /// `/init` runs `/bt86/run.sh` when there is one.
    pub fn initrd_with(&self, files: &[(&str, &[u8], u32)]) -> std::io::Result<Vec<u8>> {
        let mut initrd = std::fs::read(self.dir.join("initramfs.gz"))?;
        // The kernel looks for the next archive's magic on a 4-byte boundary (zeros skipped).
        initrd.resize(initrd.len().next_multiple_of(4), 0);
        initrd.extend_from_slice(&newc_archive(files));
        Ok(initrd)
    }

    /// `bt86 run --engine ENGINE` on the guest with `initrd` (a file) and the console on
    /// standard output; `extra` adds options (disks, memory...).
    pub fn command(&self, engine: &str, initrd: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["run", "--engine", engine, "--memory", "256"])
            .arg("--kernel")
            .arg(self.dir.join("vmlinuz"))
            .arg("--initrd")
            .arg(initrd)
            .args(["--append", "console=ttyS0 quiet"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }
}

/// A cpio "newc" archive (the initramfs format: Documentation/driver-api/early-userspace/
/// buffer-format.rst) of `files`, with their parent directories, ending with the trailer.
pub fn newc_archive(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ino = 1u32;
    let mut entry = |out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]| {
        let header = format!(
            "070701{ino:08X}{mode:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        ino += 1;
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    };
    let mut dirs: Vec<String> = Vec::new();
    for (path, _, _) in files {
        let mut at = String::new();
        for part in Path::new(path)
            .parent()
            .into_iter()
            .flat_map(|p| p.components())
        {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(&part.as_os_str().to_string_lossy());
            if !dirs.contains(&at) {
                dirs.push(at.clone());
            }
        }
    }
    for d in &dirs {
        entry(&mut out, d, 0o040_755, &[]);
    }
    for (path, data, mode) in files {
        entry(&mut out, path, 0o100_000 | mode, data);
    }
    entry(&mut out, "TRAILER!!!", 0, &[]);
    out
}

/// A running guest whose console the test reads line by line.
pub struct Session {
    child: Child,
    lines: Receiver<String>,
    /// Every console line so far.
    pub console: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// How a session ended.
#[derive(Debug)]
pub struct Ended {
    /// bt86's exit status.
    pub status: ExitStatus,
    /// The whole console.
    pub console: Vec<String>,
    /// bt86's own messages.
    pub stderr: String,
}

impl Ended {
    /// The lines the script printed with [`MARK`], without it.
    pub fn marked(&self) -> Vec<String> {
        marked(&self.console)
    }

    /// The last lines of the console, for failure messages.
    pub fn tail(&self) -> String {
        tail(&self.console)
    }
}

fn marked(console: &[String]) -> Vec<String> {
    console
        .iter()
        .filter_map(|l| {
            l.find(MARK)
                .map(|i| l[i + MARK.len()..].trim_end().to_string())
        })
        .collect()
}

fn tail(console: &[String]) -> String {
    console[console.len().saturating_sub(40)..].join("\n")
}

impl Session {
    /// Starts `cmd` (from [`LinuxGuest::command`]).
    pub fn start(mut cmd: Command) -> std::io::Result<Self> {
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        });
        Ok(Self {
            child,
            lines: rx,
            console: Vec::new(),
            stderr: Some(stderr),
        })
    }

    /// Reads the console until a line holds `MARK` + `what`, the guest's console ends, or
    /// `limit` passes (a safety net for a hung guest, not a timing check).
    pub fn wait_for(&mut self, what: &str, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let needle = format!("{MARK}{what}");
        loop {
            match self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => {
                    let hit = line.contains(&needle);
                    self.console.push(line);
                    if hit {
                        return Ok(());
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "no \"{needle}\" within {limit:?}; console:\n{}",
                        tail(&self.console)
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "the guest's console ended before \"{needle}\"; console:\n{}",
                        tail(&self.console)
                    ));
                }
            }
        }
    }

    /// Kills bt86 with SIGKILL (nothing of bt86's runs after it) and collects what it printed.
    pub fn kill(mut self) -> Ended {
        let _ = self.child.kill();
        self.finish()
    }

    /// Waits for bt86 to end by itself; kills it after `limit` (a safety net).
    pub fn wait(mut self, limit: Duration) -> Ended {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    break;
                }
                Ok(None) => {
                    while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(50)) {
                        self.console.push(line);
                    }
                }
            }
        }
        self.finish()
    }

    fn finish(mut self) -> Ended {
        let status = self.child.wait().expect("wait for bt86");
        // The reader ends when bt86's stdout closes.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.console.push(line);
        }
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        Ended {
            status,
            console: std::mem::take(&mut self.console),
            stderr,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic bytes for test files (xorshift64 from `seed`), so the host knows what the
/// guest was given.
pub fn test_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// The guest's shell helpers, sourced by test scripts (`. /bt86/lib.sh`): `mark` prints a line
/// for the test, `wait_dev` waits for a block device node, `ata_report` prints the kernel's
/// complaints about the disk controllers, `finish` reports and reboots (which ends bt86 with
/// status 0).
pub const GUEST_LIB: &str = r#"
mark() { echo "BT86-TEST: $*"; }
wait_dev() {
    i=0
    while [ ! -b "$1" ]; do
        i=$((i + 1))
        if [ $i -gt 300 ]; then mark "no device $1"; return 1; fi
        usleep 100000
    done
}
ata_report() {
    dmesg | grep -iE 'timeout|failed command|resetting|SRST|exception Emask|I/O error|virtio.*(error|fail|broken|reset|routing)|no GSI' |
        sed 's/^/BT86-TEST: dmesg: /'
}
finish() {
    ata_report
    mark "end"
    reboot -f
}
"#;
