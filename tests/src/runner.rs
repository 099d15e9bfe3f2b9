//! Runs a guest under bt86 or under the QEMU reference (`qemu-system-i386 -accel tcg`) with the
//! same conventions — COM1 on standard output, isa-debug-exit at port 0xF4, multiboot modules —
//! and returns what it printed and its exit status, so results can be compared engine by engine.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// What a guest run produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Everything the guest wrote to COM1.
    pub serial: Vec<u8>,
    /// The runner's own diagnostics (stderr).
    pub stderr: String,
    /// Process exit status (None if killed by a signal).
    pub status: Option<i32>,
    /// Whether the run was killed for taking too long.
    pub timed_out: bool,
}

impl Outcome {
    /// The serial output as text (lossy).
    pub fn serial_text(&self) -> String {
        String::from_utf8_lossy(&self.serial).into_owned()
    }
}

/// A guest to boot: a multiboot kernel with its command line and modules, or a firmware image.
/// Paths are relative to `dir`, and both runners start in `dir`, so the kernel sees the same
/// command line and module strings under each.
#[derive(Debug, Clone)]
pub struct Guest {
    /// Working directory of the run.
    pub dir: PathBuf,
    /// Kernel file (relative to `dir`), if booting a kernel.
    pub kernel: Option<String>,
    /// Firmware file (relative to `dir`), if booting from the reset vector.
    pub bios: Option<String>,
    /// Command line after the kernel's name.
    pub append: String,
    /// Modules, each "FILE ARGS...".
    pub modules: Vec<String>,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// Raw hard disk images (relative to `dir`), attached in IDE order: primary master,
    /// primary slave, secondary master.
    pub disks: Vec<String>,
    /// An ISO image for the CD-ROM drive (secondary master), if any.
    pub cdrom: Option<String>,
    /// Raw images attached as virtio block devices (modern, PCI 1AF4:1042) on PCI devices 3,
    /// 4, ... (relative to `dir`).
    pub virtio_disks: Vec<String>,
}

impl Guest {
    /// A kernel in `dir` with no command line or modules and 256 MiB of RAM.
    pub fn kernel(dir: &Path, kernel: &str) -> Self {
        Self {
            dir: dir.to_path_buf(),
            kernel: Some(kernel.to_string()),
            bios: None,
            append: String::new(),
            modules: Vec::new(),
            memory_mib: 256,
            disks: Vec::new(),
            cdrom: None,
            virtio_disks: Vec::new(),
        }
    }

    /// A firmware image in `dir`, started at the reset vector.
    pub fn bios(dir: &Path, bios: &str) -> Self {
        Self {
            kernel: None,
            bios: Some(bios.to_string()),
            ..Self::kernel(dir, "")
        }
    }
}

/// How long a test guest may run before it is killed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Path of the bt86 binary: `$BT86_BIN`, or `bt86` next to the running test's target directory.
pub fn bt86_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("BT86_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/bt86
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("bt86"))
        .expect("test executable lives in target/<profile>/deps");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (cargo build --workspace), or set BT86_BIN",
        bin.display()
    );
    bin
}

/// The bt86 command line that runs `guest` with `--engine engine` and any `extra` arguments.
pub fn bt86_command(guest: &Guest, engine: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bt86_binary());
    cmd.current_dir(&guest.dir)
        .args(["run", "--engine", engine, "--memory"])
        .arg(guest.memory_mib.to_string());
    if let Some(k) = &guest.kernel {
        cmd.args(["--kernel", k, "--append", &guest.append]);
        for m in &guest.modules {
            cmd.args(["--module", m]);
        }
    }
    if let Some(b) = &guest.bios {
        cmd.args(["--bios", b]);
    }
    for d in &guest.disks {
        cmd.args(["--disk", d]);
    }
    if let Some(c) = &guest.cdrom {
        cmd.args(["--cdrom", c]);
    }
    for d in &guest.virtio_disks {
        cmd.args(["--disk", &format!("{d},if=virtio")]);
    }
    cmd.args(extra);
    cmd
}

/// Runs `guest` under bt86 with `--engine engine` and any `extra` arguments.
pub fn run_bt86(guest: &Guest, engine: &str, extra: &[&str]) -> Outcome {
    run_with_timeout(bt86_command(guest, engine, extra), DEFAULT_TIMEOUT)
}

/// The QEMU system emulator, if installed.
pub fn qemu_binary() -> Option<PathBuf> {
    let name = "qemu-system-i386";
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Runs `guest` under `qemu-system-i386 -accel tcg` on QEMU's `pc` machine with an
/// isa-debug-exit device at 0xF4. Returns None when QEMU is not installed.
pub fn run_qemu(guest: &Guest) -> Option<Outcome> {
    let mut cmd = Command::new(qemu_binary()?);
    cmd.current_dir(&guest.dir)
        .args(["-accel", "tcg", "-M", "pc", "-m"])
        .arg(guest.memory_mib.to_string())
        .args([
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    if let Some(k) = &guest.kernel {
        cmd.args(["-kernel", k, "-append", &guest.append]);
        if !guest.modules.is_empty() {
            cmd.args(["-initrd", &guest.modules.join(",")]);
        }
    }
    if let Some(b) = &guest.bios {
        cmd.args(["-bios", b]);
    }
    for (i, d) in guest.disks.iter().enumerate() {
        cmd.args(["-drive", &format!("file={d},format=raw,if=ide,index={i}")]);
    }
    if let Some(c) = &guest.cdrom {
        cmd.args(["-cdrom", c]);
    }
    for (i, d) in guest.virtio_disks.iter().enumerate() {
        cmd.args(["-drive", &format!("file={d},format=raw,if=none,id=vd{i}")]);
        cmd.args([
            "-device",
            &format!(
                "virtio-blk-pci,drive=vd{i},disable-legacy=on,addr={}",
                3 + i
            ),
        ]);
    }
    Some(run_with_timeout(cmd, DEFAULT_TIMEOUT))
}

/// Why the kvm engine cannot run here, if it cannot.
pub fn kvm_unavailable() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/kvm cannot be opened ({e})")),
    }
}

/// The engines this machine can run, printing why any is left out: the interpreter and the
/// binary translator always, kvm where /dev/kvm opens.
pub fn engines() -> Vec<&'static str> {
    let mut v = vec!["interp", "bt"];
    match kvm_unavailable() {
        None => v.push("kvm"),
        Some(why) => eprintln!("SKIPPED engine kvm: {why}"),
    }
    v
}

/// Whether /dev/kvm is the PVM module (software nested virtualization) rather than hardware KVM.
pub fn kvm_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The engines that can run 32-bit protected-mode system code here: like [`engines`], but
/// without kvm when it is PVM, which cannot emulate 32-bit IRET, LAR and similar instructions.
pub fn protected_mode_engines() -> Vec<&'static str> {
    let mut v = engines();
    if kvm_is_pvm() && v.contains(&"kvm") {
        eprintln!(
            "SKIPPED engine kvm: /dev/kvm is PVM, which cannot run 32-bit IRET (DESIGN.md §2)"
        );
        v.retain(|e| *e != "kvm");
    }
    v
}

/// The engines that run protected-mode kernels taking interrupts from bt86's interrupt
/// controller: every engine injects them, so this is [`protected_mode_engines`] (kvm skips where
/// it is PVM, which cannot run 32-bit IRET).
pub fn interrupt_engines() -> Vec<&'static str> {
    protected_mode_engines()
}

/// Reads `r` to its end on a thread of its own (so a child never blocks on a full pipe); join
/// the handle for the bytes.
pub fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `cmd` with piped output, killing it after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Outcome {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let out = drain(child.stdout.take().expect("piped stdout"));
    let err = drain(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + timeout;
    let (status, timed_out) = loop {
        match child.try_wait() {
            Ok(Some(st)) => break (st.code(), false),
            Ok(None) if Instant::now() >= deadline => {
                kill(&mut child);
                break (None, true);
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("waiting for {cmd:?}: {e}"),
        }
    };
    Outcome {
        serial: out.join().unwrap_or_default(),
        stderr: String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned(),
        status,
        timed_out,
    }
}

/// Writes the kit kernel `name` into `dir` (under the same name) and returns its file name.
pub fn write_kit_kernel(dir: &Path, name: &str) -> String {
    let entry = crate::kernels::find(name).unwrap_or_else(|| panic!("no kit kernel {name}"));
    let image = (entry.build)().unwrap_or_else(|e| panic!("building {name}: {e}"));
    std::fs::write(dir.join(name), image).expect("write kernel");
    name.to_string()
}

/// Prints why a test is skipped and returns true when `reason` is Some.
pub fn skip_if(test: &str, reason: Option<String>) -> bool {
    match reason {
        Some(r) => {
            eprintln!("SKIPPED {test}: {r}");
            true
        }
        None => false,
    }
}

/// Runs kit kernel `kernel` under QEMU (when installed; otherwise the interpreter is the
/// reference, and the skip is printed) and on each of `engines`: every engine must give the
/// reference's serial output and exit status. Returns a `bt --stats` run of it, for tests that
/// check which path the translator took.
pub fn compare_kit_kernel(kernel: &str, engines: &[&str]) -> Outcome {
    let dir = tempfile::tempdir().expect("temporary directory");
    let name = write_kit_kernel(dir.path(), kernel);
    let guest = Guest::kernel(dir.path(), &name);
    let reference = if qemu_binary().is_some() {
        run_qemu(&guest).expect("qemu present")
    } else {
        skip_if(
            &format!("{kernel} against QEMU"),
            Some("qemu-system-i386 is not installed (run scripts/setup.sh)".into()),
        );
        run_bt86(&guest, "interp", &[])
    };
    assert!(!reference.timed_out, "{kernel}: the reference timed out");
    for engine in engines {
        let ours = run_bt86(&guest, engine, &[]);
        assert!(!ours.timed_out, "{kernel} on {engine}: timed out");
        assert_eq!(
            ours.serial_text(),
            reference.serial_text(),
            "{kernel} on {engine}: serial output differs (stderr: {})",
            ours.stderr
        );
        assert_eq!(ours.status, reference.status, "{kernel} on {engine}");
    }
    let o = run_bt86(&guest, "bt", &["--stats"]);
    assert_eq!(o.status, reference.status, "{kernel} with --stats");
    o
}

/// The value of a `bt86 run --stats` counter line in `o`'s stderr.
pub fn stat(o: &Outcome, name: &str) -> u64 {
    o.stderr
        .lines()
        .find(|l| l.trim_start().starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no '{name}' in the stats: {}", o.stderr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_kill_the_child() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let start = Instant::now();
        let o = run_with_timeout(cmd, Duration::from_millis(200));
        assert!(o.timed_out);
        assert_eq!(o.status, None);
        assert!(start.elapsed() < Duration::from_secs(20));
    }

    #[test]
    fn output_and_status_are_captured() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "printf out; printf err >&2; exit 5"]);
        let o = run_with_timeout(cmd, DEFAULT_TIMEOUT);
        assert_eq!(o.serial, b"out");
        assert_eq!(o.stderr, "err");
        assert_eq!(o.status, Some(5));
        assert!(!o.timed_out);
    }
}
