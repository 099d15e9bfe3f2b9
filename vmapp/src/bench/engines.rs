//! The engines `bt86 bench` compares, whether each can run here, and how one sample is taken.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bt86_guests::nano;

use super::linux;
use clap::ValueEnum;
use vmm::EngineKind;

/// An engine in the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchEngine {
    /// bt86's binary translator.
    Bt,
    /// bt86's interpreter.
    Interp,
    /// bt86's KVM engine.
    Kvm,
    /// QEMU's software emulator, `qemu-system-i386 -accel tcg`.
    #[value(name = "qemu-tcg")]
    QemuTcg,
    /// The workload's user-space part run directly on the host.
    Native,
}

impl std::fmt::Display for BenchEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BenchEngine::Bt => "bt",
            BenchEngine::Interp => "interp",
            BenchEngine::Kvm => "kvm",
            BenchEngine::QemuTcg => "qemu-tcg",
            BenchEngine::Native => "native",
        })
    }
}

/// Whether an engine runs on this host, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// It runs; the text says what exactly (a version, which KVM).
    Runs(String),
    /// It does not run here, for the reason given.
    Unavailable(String),
}

impl Availability {
    /// Whether samples can be taken.
    pub fn runs(&self) -> bool {
        matches!(self, Availability::Runs(_))
    }

    /// The description or the reason.
    pub fn reason(&self) -> &str {
        match self {
            Availability::Runs(s) | Availability::Unavailable(s) => s,
        }
    }
}

/// One sample of one workload on one engine.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    /// Nanoseconds per operation.
    Ok(f64),
    /// The run failed; `log` is everything it printed.
    Failed {
        /// One line saying why.
        reason: String,
        /// The command, its output and its status.
        log: String,
    },
}

/// Takes samples: starts each engine as a child process with a time limit.
pub struct Runner {
    timeout: Duration,
    bt86: Option<PathBuf>,
    qemu: Option<PathBuf>,
    /// The host TSC's rate, which QEMU TCG passes through to its guests.
    host_tsc_hz: u64,
}

const QEMU: &str = "qemu-system-i386";

impl Runner {
    /// A runner whose samples may take up to `timeout` each.
    pub fn new(timeout: Duration) -> Self {
        Runner {
            timeout,
            bt86: std::env::current_exe().ok(),
            qemu: find_in_path(QEMU),
            host_tsc_hz: vmdriver::host::tsc_hz(Duration::from_millis(50)),
        }
    }

    /// Whether `engine` can run the nano suite here.
    pub fn availability(&self, engine: BenchEngine) -> Availability {
        let own = |kind: EngineKind| {
            if !EngineKind::available().contains(&kind) {
                Availability::Unavailable(format!("the {kind} engine is not built yet"))
            } else if self.bt86.is_none() {
                Availability::Unavailable("cannot find the bt86 executable".into())
            } else {
                Availability::Runs(format!("bt86 {} engine", kind.name()))
            }
        };
        match engine {
            BenchEngine::Bt => own(EngineKind::Bt),
            BenchEngine::Interp => own(EngineKind::Interp),
            BenchEngine::Kvm => match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
            {
                Err(e) => Availability::Unavailable(format!("cannot open /dev/kvm: {e}")),
                Ok(_) => match own(EngineKind::Kvm) {
                    Availability::Runs(_) => Availability::Runs(kvm_description()),
                    other => other,
                },
            },
            BenchEngine::QemuTcg => match &self.qemu {
                None => Availability::Unavailable(format!(
                    "{QEMU} is not installed (scripts/setup.sh installs it)"
                )),
                Some(q) => Availability::Runs(qemu_version(q)),
            },
            BenchEngine::Native => {
                Availability::Runs("the host CPU in 32-bit compatibility mode".into())
            }
        }
    }

    /// Runs the nano kernel `kernel` (for `workload`, timing `iterations` operations) once on
    /// `engine`.
    pub fn nano(
        &self,
        engine: BenchEngine,
        workload: &nano::Workload,
        iterations: u32,
        kernel: &Path,
        dir: &Path,
    ) -> Sample {
        let (mut cmd, tsc_hz) = match engine {
            BenchEngine::Bt | BenchEngine::Interp | BenchEngine::Kvm => {
                let Some(bt86) = &self.bt86 else {
                    return failed("cannot find the bt86 executable", String::new());
                };
                let mut cmd = Command::new(bt86);
                cmd.arg("run")
                    .arg("--kernel")
                    .arg(kernel)
                    .args(["--memory", "32", "--serial", "stdio", "--stats", "--engine"])
                    .arg(engine.to_string());
                (cmd, None)
            }
            BenchEngine::QemuTcg => {
                let Some(qemu) = &self.qemu else {
                    return failed("qemu is not installed", String::new());
                };
                let mut cmd = Command::new(qemu);
                cmd.args(["-accel", "tcg", "-M", "pc", "-m", "32", "-nodefaults"])
                    .args(["-display", "none", "-no-reboot", "-serial", "stdio"])
                    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
                    .arg("-kernel")
                    .arg(kernel);
                (cmd, Some(self.host_tsc_hz))
            }
            BenchEngine::Native => return self.native(workload, iterations),
        };
        cmd.current_dir(dir);
        let run = match run_with_timeout(&mut cmd, self.timeout, dir, None, false) {
            Ok(run) => run,
            Err(e) => return failed(&format!("cannot start {engine}: {e}"), String::new()),
        };
        let log = format!(
            "command: {cmd:?}\nstatus: {}\n--- stdout\n{}\n--- stderr\n{}\n",
            run.status
                .map_or("killed (time limit)".to_string(), |s| s.to_string()),
            run.stdout,
            run.stderr
        );
        let expected = i32::from(nano::EXIT_VALUE) << 1 | 1;
        if run.status != Some(expected) {
            let why = match run.status {
                None => format!("stopped after {} s", self.timeout.as_secs()),
                Some(s) if s == i32::from(nano::FAIL_VALUE) << 1 | 1 => run
                    .stdout
                    .lines()
                    .find(|l| l.contains("unexpected exception"))
                    .map_or("the guest took an unexpected exception".into(), |l| {
                        l.trim_start_matches(&format!("nano {} ", workload.name))
                            .to_string()
                    }),
                Some(s) => format!("exit status {s}, not {expected}"),
            };
            return failed(&why, log);
        }
        let Some(m) = nano::parse_output(workload.name, &run.stdout) else {
            return failed("the guest printed no result line", log);
        };
        let Some(hz) = tsc_hz.or_else(|| stated_tsc_hz(&run.stderr)) else {
            return failed("the engine did not state its TSC rate", log);
        };
        if m.ops == 0 || hz == 0 {
            return failed("the guest timed no operations", log);
        }
        Sample::Ok(m.cycles as f64 * 1e9 / hz as f64 / m.ops as f64)
    }
}

impl Runner {
    /// Whether `engine` can run the linux suite here.
    pub fn linux_availability(&self, engine: BenchEngine) -> Availability {
        match engine {
            BenchEngine::Native if !rustix::process::geteuid().is_root() => {
                Availability::Unavailable(
                    "needs root (chroot, and mounts in a private mount namespace)".into(),
                )
            }
            BenchEngine::Native => Availability::Runs(
                "the host CPU running the guest's i386 busybox in a chroot (user space only)"
                    .into(),
            ),
            other => self.availability(other),
        }
    }

    /// Boots the benchmark guest once on `engine` (or, for native, runs its workload script in
    /// a chroot) and returns one outcome per row (the boot row first when `boot`), and the
    /// run's log when something failed. `timeout` bounds the whole run.
    pub fn linux(
        &self,
        engine: BenchEngine,
        guest: &linux::Guest,
        boot: bool,
        steps: &[&linux::Step],
        dir: &Path,
        timeout: Duration,
    ) -> (Vec<linux::Outcome>, Option<String>) {
        let fail_all = |why: &str| {
            let rows = usize::from(boot) + steps.len();
            (
                vec![linux::Outcome::Failed(why.to_string()); rows],
                None::<String>,
            )
        };
        let mut cmd = match engine {
            BenchEngine::Bt | BenchEngine::Interp | BenchEngine::Kvm => {
                let Some(bt86) = &self.bt86 else {
                    return fail_all("cannot find the bt86 executable");
                };
                let mut cmd = Command::new(bt86);
                cmd.arg("run")
                    .arg("--kernel")
                    .arg(&guest.kernel)
                    .arg("--initrd")
                    .arg(&guest.initrd)
                    .args(["--append", linux::APPEND, "--memory"])
                    .arg(linux::MEMORY_MIB.to_string())
                    .args(["--serial", "stdio", "--stats", "--engine"])
                    .arg(engine.to_string());
                cmd
            }
            BenchEngine::QemuTcg => {
                let Some(qemu) = &self.qemu else {
                    return fail_all("qemu is not installed");
                };
                let mut cmd = Command::new(qemu);
                // A Pentium III with SSE2 is the P6 with SSE2 that bt86's CPUID describes (a
                // Pentium M); the PC machine as bt86's (8259, PIT, 16550, i8042).
                cmd.args(["-accel", "tcg", "-M", "pc", "-cpu", "pentium3,+sse2", "-m"])
                    .arg(linux::MEMORY_MIB.to_string())
                    .args(["-nographic", "-no-reboot", "-kernel"])
                    .arg(&guest.kernel)
                    .arg("-initrd")
                    .arg(&guest.initrd)
                    .args(["-append", linux::APPEND]);
                cmd
            }
            BenchEngine::Native => {
                // The guest's own busybox makes the private mount namespace and the chroot, so
                // the host needs nothing but root.
                let busybox = guest.root.join("bin/busybox");
                let mut cmd = Command::new(&busybox);
                cmd.args(["unshare", "-m", "--propagation", "private"])
                    .arg(&busybox)
                    .arg("chroot")
                    .arg(&guest.root)
                    .args(["/bin/busybox", "sh", "/bench/native.sh"])
                    .env_clear();
                cmd
            }
        };
        // The disk steps' scratch images: empty (sparse) files of the same size for every
        // engine and run, removed when the run ends.
        let scratch = if steps.iter().any(|s| s.disk) {
            let paths: Vec<std::path::PathBuf> = match engine {
                BenchEngine::Native => linux::NATIVE_IMAGES
                    .iter()
                    .map(|p| guest.root.join(p))
                    .collect(),
                _ => ["bench-virtio.img", "bench-ide.img"]
                    .iter()
                    .map(|p| dir.join(p))
                    .collect(),
            };
            for p in &paths {
                let made = std::fs::File::create(p).and_then(|f| f.set_len(linux::DISK_MIB << 20));
                if let Err(e) = made {
                    return fail_all(&format!("cannot create {}: {e}", p.display()));
                }
            }
            let (virtio, ide) = (&paths[0], &paths[1]);
            match engine {
                BenchEngine::Bt | BenchEngine::Interp | BenchEngine::Kvm => {
                    cmd.arg("--disk")
                        .arg(format!("{},if=virtio", virtio.display()))
                        .arg("--disk")
                        .arg(ide);
                }
                BenchEngine::QemuTcg => {
                    // The same devices: a modern virtio-blk and a disk on the PIIX IDE
                    // controller, both through the host's page cache as bt86's backends.
                    cmd.arg("-drive")
                        .arg(format!(
                            "file={},format=raw,if=none,id=vd0,cache=writeback",
                            virtio.display()
                        ))
                        .args(["-device", "virtio-blk-pci,drive=vd0,disable-legacy=on"])
                        .arg("-drive")
                        .arg(format!(
                            "file={},format=raw,if=ide,index=0,cache=writeback",
                            ide.display()
                        ));
                }
                BenchEngine::Native => {}
            }
            paths
        } else {
            Vec::new()
        };
        let _remove_scratch = RemoveOnDrop(scratch);
        cmd.current_dir(dir);
        let done = |l: &str| linux::parse_marker(l) == Some(linux::Marker::Done);
        // The engines are the process started here; the native column's work runs in the
        // short-lived children of a shell, whose CPU time the host reports only once they are
        // reaped, and then only in clock ticks: it is not followed.
        let follow_cpu = engine != BenchEngine::Native;
        // After the last step only the guest's reboot is left; a guest that does not manage
        // it has still measured everything.
        let run = match run_with_timeout(
            &mut cmd,
            timeout,
            dir,
            Some((&done, Duration::from_secs(20))),
            follow_cpu,
        ) {
            Ok(run) => run,
            Err(e) => return fail_all(&format!("cannot start {engine}: {e}")),
        };
        // What the engine itself said last about why it stopped.
        let said = run
            .stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("bt86:") || l.starts_with(QEMU))
            .map(|l| match l.char_indices().nth(140) {
                Some((at, _)) => format!(": {}...", &l[..at]),
                None => format!(": {l}"),
            })
            .unwrap_or_default();
        let ended = if run.timed_out {
            Some(format!("stopped after {} s", timeout.as_secs()))
        } else if linux::finished(&run.lines) {
            None
        } else {
            Some(match run.status {
                Some(s) => format!("{engine} exited with status {s}{said}"),
                None => format!("{engine} was killed{said}"),
            })
        };
        let rows = linux::outcomes(&run.lines, boot, steps, ended.as_deref());
        let log = rows
            .iter()
            .any(|r| matches!(r, linux::Outcome::Failed(_)))
            .then(|| {
                format!(
                    "command: {cmd:?}\nstatus: {}\n--- console (stdout)\n{}\n--- stderr\n{}\n",
                    run.status.map_or("killed".to_string(), |s| s.to_string()),
                    run.stdout,
                    run.stderr
                )
            });
        (rows, log)
    }

    /// Runs `workload`'s loop natively on the host CPU, in the 32-bit sandbox the native oracle
    /// uses, timed with the host TSC.
    fn native(&self, workload: &nano::Workload, iterations: u32) -> Sample {
        use vmdriver::native::{CODE_ADDR, DATA_ADDR, NativeEnd, run_native};
        let code = match nano::native_snippet(workload, iterations, CODE_ADDR, DATA_ADDR) {
            Ok(Some(code)) => code,
            Ok(None) => return failed("a privileged operation cannot run natively", String::new()),
            Err(e) => return failed(&format!("cannot build the native loop: {e}"), String::new()),
        };
        let esp = DATA_ADDR + nano::NATIVE_DATA as u32;
        let data = vec![0u8; nano::NATIVE_DATA];
        // The FPU as FNINIT leaves it (the loops do not use it).
        use vmdriver::fpu::{FxImage, fx};
        let mut image = FxImage::default();
        image.0[fx::FCW..fx::FCW + 2].copy_from_slice(&0x037Fu16.to_le_bytes());
        image.0[fx::MXCSR..fx::MXCSR + 4].copy_from_slice(&0x1F80u32.to_le_bytes());
        let result = match run_native(&code, [0, 0, 0, 0, esp, 0, 0, 0], 0, &image, &data) {
            Ok(r) => r,
            Err(e) => return failed(&format!("the native sandbox failed: {e}"), String::new()),
        };
        if result.end != NativeEnd::Completed {
            return failed(
                &format!("the native loop ended with {:?}", result.end),
                format!("{result:?}"),
            );
        }
        let tsc = |o: usize| u64::from_le_bytes(result.data[o..o + 8].try_into().expect("8 bytes"));
        let cycles = tsc(8).wrapping_sub(tsc(0));
        Sample::Ok(cycles as f64 * 1e9 / self.host_tsc_hz as f64 / f64::from(iterations.max(1)))
    }
}

/// Files removed when it is dropped (the disk steps' scratch images).
struct RemoveOnDrop(Vec<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn failed(reason: &str, log: String) -> Sample {
    Sample::Failed {
        reason: reason.to_string(),
        log,
    }
}

/// The TSC rate `bt86 run --stats` prints.
fn stated_tsc_hz(stats: &str) -> Option<u64> {
    stats.lines().find_map(|l| {
        l.trim()
            .strip_prefix("guest TSC rate")?
            .trim()
            .strip_suffix(" Hz")?
            .parse()
            .ok()
    })
}

struct Finished {
    /// The exit status; None when the child was killed (see `timed_out`).
    status: Option<i32>,
    /// It ran past the time limit and was killed.
    timed_out: bool,
    /// Standard output as text.
    stdout: String,
    /// Standard output's lines with the time each arrived, from the start (and the child's CPU
    /// time by then, when followed).
    lines: Vec<(linux::Stamp, String)>,
    stderr: String,
}

/// A line that says the work is done, and how long the child then has to exit.
type Finish<'a> = (&'a dyn Fn(&str) -> bool, Duration);

/// At most this much of a child's standard output is kept (a guest may print forever).
const STDOUT_LIMIT: usize = 16 << 20;

/// Runs `cmd` in its own process group, its standard output read line by line and stamped with
/// each line's arrival time (and, with `follow_cpu`, the CPU time the child process, all its
/// threads, had consumed when the line was read), its standard error in a file under `dir`. The
/// whole group is killed after `timeout`, or `grace` after a line for which `finished` holds
/// (the work is done and only the child's exit is awaited).
fn run_with_timeout(
    cmd: &mut Command,
    timeout: Duration,
    dir: &Path,
    finished: Option<Finish<'_>>,
    follow_cpu: bool,
) -> std::io::Result<Finished> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let err_path = dir.join("sample.stderr");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&err_path)?)
        .process_group(0)
        .spawn()?;
    let group = rustix::process::Pid::from_child(&child);
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(out);
            let mut kept = 0;
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                // The child is not reaped before its output ends, so `pid` is still its own.
                let at = linux::Stamp {
                    wall: start.elapsed(),
                    cpu_ns: follow_cpu
                        .then(|| vmdriver::host::process_cpu_ns(pid))
                        .flatten(),
                };
                kept += line.len();
                if kept <= STDOUT_LIMIT {
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\n', '\r']).to_string();
                    if tx.send((at, text)).is_err() {
                        break;
                    }
                }
                line.clear();
            }
        });
    }
    let mut lines = Vec::new();
    let mut deadline = start + timeout;
    let mut done_at = None;
    let kill_group = || {
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    };
    // The child is reaped only after its output has been read: until then its pid stays its
    // own (a zombie's CPU-time clock still reads its final total), so no line is stamped with
    // the CPU time of a process that reused the pid.
    let exited = || {
        use rustix::process::{WaitId, WaitIdOptions, waitid};
        let options = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT | WaitIdOptions::NOHANG;
        waitid(WaitId::Pid(group), options).map(|s| s.is_some())
    };
    let killed = loop {
        while let Ok(l) = rx.try_recv() {
            if done_at.is_none()
                && let Some((done, grace)) = finished
                && done(&l.1)
            {
                done_at = Some(Instant::now());
                deadline = deadline.min(Instant::now() + grace);
            }
            lines.push(l);
        }
        if exited()? {
            // Whatever of the group is left cannot keep the output pipe open.
            kill_group();
            break false;
        }
        if Instant::now() > deadline {
            kill_group();
            let _ = child.kill();
            break true;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    // The reader ends at the pipe's end; give it a moment for the last lines.
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
        lines.push(l);
    }
    drop(rx);
    let waited = child.wait()?;
    let status = if killed { None } else { waited.code() };
    let stderr = std::fs::read(&err_path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let mut stdout = String::new();
    for (_, l) in &lines {
        stdout += l;
        stdout.push('\n');
    }
    Ok(Finished {
        status,
        timed_out: status.is_none() && done_at.is_none(),
        stdout,
        lines,
        stderr,
    })
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn qemu_version(qemu: &Path) -> String {
    Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| QEMU.to_string())
}

/// Which KVM this is: on our own machines /dev/kvm is the PVM module (software nested
/// virtualization), whose numbers are not hardware KVM's.
fn kvm_description() -> String {
    if Path::new("/sys/module/kvm_pvm").exists() {
        "KVM via PVM (software nested virtualization, not VT-x/AMD-V)".into()
    } else if Path::new("/sys/module/kvm_intel").exists() {
        "KVM with Intel VT-x".into()
    } else if Path::new("/sys/module/kvm_amd").exists() {
        "KVM with AMD-V".into()
    } else {
        "KVM".into()
    }
}

/// Which KVM this host has, for the report's host description.
pub fn kvm_summary() -> String {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => kvm_description(),
        Err(e) => format!("none usable (/dev/kvm: {e})"),
    }
}

/// One line about the host: CPU model, CPU count, kernel.
pub fn host_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{cpu}, {cpus} CPUs, Linux {kernel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stated_tsc_rate_is_read_from_stats() {
        let stats = "bt86 statistics (engine interp)\n  guest TSC rate       1000000000 Hz\n";
        assert_eq!(stated_tsc_hz(stats), Some(1_000_000_000));
        assert_eq!(stated_tsc_hz("  guest TSC rate       unknown\n"), None);
    }

    #[test]
    fn output_lines_are_stamped_and_a_finished_child_gets_only_its_grace() {
        let dir = tempfile::tempdir().unwrap();
        let done = |l: &str| l == "done";
        let run = run_with_timeout(
            Command::new("sh").args(["-c", "echo first; sleep 0.1; echo done; exec sleep 600"]),
            Duration::from_secs(600),
            dir.path(),
            Some((&done, Duration::from_millis(50))),
            false,
        )
        .unwrap();
        let text: Vec<&str> = run.lines.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(text, ["first", "done"]);
        assert!(run.lines[1].0.wall > run.lines[0].0.wall, "{:?}", run.lines);
        assert_eq!(run.stdout, "first\ndone\n");
        assert!(
            run.lines.iter().all(|(at, _)| at.cpu_ns.is_none()),
            "not followed"
        );
        // Killed after the grace, which is not the time limit.
        assert_eq!(run.status, None);
        assert!(!run.timed_out);
    }

    #[test]
    fn the_time_limit_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        // The background child holds the output pipe: unless it dies too, the reader never
        // sees the end of the pipe.
        let run = run_with_timeout(
            Command::new("sh").args([
                "-c",
                "(sleep 600; echo late) & echo early >&2; echo a; wait",
            ]),
            Duration::from_millis(200),
            dir.path(),
            None,
            false,
        )
        .unwrap();
        assert!(run.timed_out);
        assert_eq!(run.status, None);
        assert_eq!(run.stdout, "a\n");
        assert_eq!(run.stderr, "early\n");
        let run = run_with_timeout(
            Command::new("sh").args(["-c", "echo out; exit 3"]),
            Duration::from_secs(600),
            dir.path(),
            None,
            false,
        )
        .unwrap();
        assert_eq!((run.status, run.timed_out), (Some(3), false));
        assert_eq!(run.stdout, "out\n");
    }

    #[test]
    fn followed_lines_carry_the_child_cpu_time_when_they_arrived() {
        let dir = tempfile::tempdir().unwrap();
        // A single-threaded child: its CPU time never exceeds the wall time since it started.
        let run = run_with_timeout(
            Command::new("sh").args([
                "-c",
                "i=0; while [ $i -lt 20000 ]; do i=$((i + 1)); done; echo busy; sleep 0.1; \
                 echo slept; exit 5",
            ]),
            Duration::from_secs(600),
            dir.path(),
            None,
            true,
        )
        .unwrap();
        assert_eq!(run.stdout, "busy\nslept\n");
        assert_eq!(run.status, Some(5));
        let cpu: Vec<u64> = run
            .lines
            .iter()
            .map(|(at, l)| at.cpu_ns.unwrap_or_else(|| panic!("{l}: no CPU time")))
            .collect();
        assert!(cpu[0] > 0 && cpu[1] >= cpu[0], "{cpu:?}");
        for (at, _) in &run.lines {
            assert!(
                u128::from(at.cpu_ns.unwrap()) <= at.wall.as_nanos(),
                "{at:?}"
            );
        }
    }

    #[test]
    fn native_runs_unprivileged_loops_and_refuses_privileged_ones() {
        let r = Runner::new(Duration::from_secs(5));
        let compute = nano::find("compute").unwrap();
        match r.native(compute, 1000) {
            Sample::Ok(ns) => assert!(ns > 0.0, "{ns}"),
            other => panic!("{other:?}"),
        }
        let pgfault = nano::find("pgfault").unwrap();
        assert!(matches!(r.native(pgfault, 10), Sample::Failed { .. }));
    }
}
