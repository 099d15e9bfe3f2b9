//! The linux suite: Debian's i386 kernel with a benchmark initramfs whose /init runs a list of
//! busybox workloads and prints one line per step, timed with the guest's own clock; bt86 bench
//! stamps the same lines on the host as they arrive on the serial console.
//!
//! The benchmark initramfs is built here, at bench time, from the busybox of the initramfs that
//! `scripts/fetch-guest.sh` made (that initramfs, and its shell prompt, stay as they are). The same
//! workload script also runs on the host in a chroot of the benchmark root (the native column).
//!
//! Adding a workload is one entry in [`STEPS`]: its name, what one operation is, how many, and
//! the shell commands that prepare it (untimed), run it (timed) and clean up after it.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

/// One workload of the benchmark script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Its name: the row in the report and the marker lines' key (letters, digits, '-').
    pub name: &'static str,
    /// What one operation is.
    pub operation: &'static str,
    /// Operations in one step; the shell snippets see it as `$N`.
    pub count: u64,
    /// Untimed shell commands run before the step (may be empty).
    pub setup: &'static str,
    /// The timed shell commands.
    pub run: &'static str,
    /// Untimed shell commands run after the step (may be empty).
    pub cleanup: &'static str,
    /// Whether the step is user-space work the native column can run in a chroot on the host
    /// (a step that needs the guest's own devices cannot).
    pub native: bool,
    /// Whether the step uses the scratch disks: the VM engines get two empty images, one on
    /// the IDE controller (`$BENCH_IDE`, /dev/sda in the guest) and one as a virtio disk
    /// (`$BENCH_VIRTIO`, /dev/vda); the native column runs the same commands on the host
    /// against image files of the same size (the host-direct baseline).
    pub disk: bool,
    /// What the step's row reports.
    pub measure: Measure,
}

/// What a step's row reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// How long the step took (ms per step, by the guest's clock and by the host's), and the
    /// engine's host CPU time in it.
    Time,
    /// The engine process's host CPU time over the step's host wall time, in % of one host
    /// core: what the step costs the host while the guest waits (the idle row).
    HostCpuShare,
}

/// The row for the kernel's boot: from power-on to the benchmark /init running with its file
/// systems mounted.
pub const BOOT: &str = "boot";

/// What the boot row measures.
pub const BOOT_OPERATION: &str = "kernel boot to /init ready (guest: /proc/uptime)";

/// A step on the scratch disks.
macro_rules! disk_step {
    ($name:expr, $operation:expr, $count:expr, $run:expr) => {
        Step {
            name: $name,
            operation: $operation,
            count: $count,
            setup: "",
            run: $run,
            cleanup: "",
            native: true,
            disk: true,
            measure: Measure::Time,
        }
    };
}

/// The workloads, in the order the script runs them.
pub const STEPS: &[Step] = &[
    Step {
        name: "awk",
        operation: "a CPU-bound awk loop (floating-point arithmetic)",
        count: 20_000,
        setup: "",
        run: "awk -v n=\"$N\" 'BEGIN { s = 0; for (i = 0; i < n; i++) s = (s + i * i) % 1000003; print s }'",
        cleanup: "",
        native: true,
        disk: false,
        measure: Measure::Time,
    },
    Step {
        name: "md5sum",
        operation: "md5sum over a tmpfs file (KiB)",
        count: 8192,
        setup: "dd if=/dev/urandom of=/tmp/md5sum.in bs=1024 count=\"$N\"",
        run: "md5sum /tmp/md5sum.in",
        cleanup: "rm -f /tmp/md5sum.in",
        native: true,
        disk: false,
        measure: Measure::Time,
    },
    Step {
        name: "fork-exec",
        operation: "fork+exec of /bin/true",
        count: 500,
        setup: "",
        run: "i=0; while [ $i -lt \"$N\" ]; do /bin/true; i=$((i + 1)); done",
        cleanup: "",
        native: true,
        disk: false,
        measure: Measure::Time,
    },
    Step {
        name: "fork",
        operation: "fork of the shell (a subshell that exits)",
        count: 500,
        setup: "",
        run: "i=0; while [ $i -lt \"$N\" ]; do ( : ); i=$((i + 1)); done",
        cleanup: "",
        native: true,
        disk: false,
        measure: Measure::Time,
    },
    Step {
        name: "dd",
        operation: "dd of 4 KiB blocks from /dev/zero to /dev/null",
        count: 16_384,
        setup: "",
        run: "dd if=/dev/zero of=/dev/null bs=4096 count=\"$N\"",
        cleanup: "",
        native: true,
        disk: false,
        measure: Measure::Time,
    },
    Step {
        name: "page-touch",
        operation: "new tmpfs pages written, then freed",
        count: 8192,
        setup: "",
        run: "dd if=/dev/zero of=/tmp/page-touch bs=4096 count=\"$N\" && rm /tmp/page-touch",
        cleanup: "rm -f /tmp/page-touch",
        native: true,
        disk: false,
        measure: Measure::Time,
    },
    disk_step!(
        "disk-seq-write-virtio",
        "sequential 1 MiB O_DIRECT writes to the virtio disk (diskio W)",
        DISK_MIB,
        "/bench/diskio W \"$N\" 3<>\"$BENCH_VIRTIO\""
    ),
    disk_step!(
        "disk-seq-read-virtio",
        "sequential 1 MiB O_DIRECT reads from the virtio disk (diskio R)",
        DISK_MIB,
        "/bench/diskio R \"$N\" 3<\"$BENCH_VIRTIO\""
    ),
    disk_step!(
        "disk-rand-read-virtio",
        "random 4 KiB O_DIRECT reads from the virtio disk (diskio r)",
        RANDOM_IOS,
        "/bench/diskio r \"$N\" 3<\"$BENCH_VIRTIO\""
    ),
    disk_step!(
        "disk-rand-write-virtio",
        "random 4 KiB O_DIRECT writes to the virtio disk (diskio w)",
        RANDOM_IOS,
        "/bench/diskio w \"$N\" 3<>\"$BENCH_VIRTIO\""
    ),
    disk_step!(
        "disk-seq-write-ide",
        "sequential 1 MiB O_DIRECT writes to the IDE disk (diskio W)",
        DISK_MIB,
        "/bench/diskio W \"$N\" 3<>\"$BENCH_IDE\""
    ),
    disk_step!(
        "disk-seq-read-ide",
        "sequential 1 MiB O_DIRECT reads from the IDE disk (diskio R)",
        DISK_MIB,
        "/bench/diskio R \"$N\" 3<\"$BENCH_IDE\""
    ),
    disk_step!(
        "disk-rand-read-ide",
        "random 4 KiB O_DIRECT reads from the IDE disk (diskio r)",
        RANDOM_IOS,
        "/bench/diskio r \"$N\" 3<\"$BENCH_IDE\""
    ),
    disk_step!(
        "disk-rand-write-ide",
        "random 4 KiB O_DIRECT writes to the IDE disk (diskio w)",
        RANDOM_IOS,
        "/bench/diskio w \"$N\" 3<>\"$BENCH_IDE\""
    ),
    Step {
        name: "disk-ext2-virtio",
        operation: "small files created on ext2 on the virtio disk, then synced and read back",
        count: 500,
        setup: "modprobe crc32c_generic && modprobe ext4 && mke2fs -q -F \"$BENCH_VIRTIO\" && mount -t ext2 \"$BENCH_VIRTIO\" /mnt",
        run: "i=0; while [ $i -lt \"$N\" ]; do echo \"file $i\" >/mnt/f$i; i=$((i + 1)); done; sync; \
              i=0; while [ $i -lt \"$N\" ]; do read line </mnt/f$i; i=$((i + 1)); done; sync",
        cleanup: "umount /mnt",
        // Mounting a file system on the host's image file needs a loop device: guest only.
        native: false,
        disk: true,
        measure: Measure::Time,
    },
    Step {
        name: IDLE,
        operation: "host CPU of the engine while the guest sleeps at the shell with nothing to do \
                    (busybox sleep), % of one host core, seconds",
        count: IDLE_SECONDS,
        // Nothing left over from the steps before it: dirty pages written back, then a moment
        // for the last completions and timers to settle. The console is already quiet (the
        // kernel logs to its buffer only) and nothing else runs in the guest.
        setup: "sync; sleep 2",
        // A disk transfer during the sleep would mean the guest was not idle: the step then
        // fails, saying so in the log, rather than report a busy guest's cost as idle.
        run: "d=$(cat /proc/diskstats); sleep \"$N\"; [ \"$(cat /proc/diskstats)\" = \"$d\" ] || \
              { echo 'disk I/O during the idle step' >&2; false; }",
        cleanup: "",
        // It measures the engine, which the native column does not have.
        native: false,
        disk: false,
        measure: Measure::HostCpuShare,
    },
];

/// The idle step: the guest sits where the shell would wait at its prompt.
pub const IDLE: &str = "idle";

/// How long the idle step sleeps by default (issue 6: "a guest left idle at the prompt for 30 s").
pub const IDLE_SECONDS: u64 = 30;

/// Size of each scratch disk in MiB; the sequential steps cover it whole (the write step
/// first, so the reads after it never meet a hole in the host's image file).
pub const DISK_MIB: u64 = 64;

/// Transfers of the random-I/O steps.
pub const RANDOM_IOS: u64 = 2048;

/// Where the guest finds its scratch disks once the drivers are loaded.
const GUEST_DISKS: &str = "BENCH_VIRTIO=/dev/vda BENCH_IDE=/dev/sda";

/// The kernel modules the guest loads for the disk steps (with what modules.dep lists).
const DISK_MODULES: &str = "virtio_pci virtio_blk ata_piix sd_mod";

/// The step called `name`.
pub fn find(name: &str) -> Option<&'static Step> {
    STEPS.iter().find(|s| s.name == name)
}

/// Every line the script prints for bt86 bench starts with this.
const TAG: &str = "bt86-bench:";

/// The kernel command line of every engine's run. `panic=-1` turns a guest kernel panic into an
/// immediate reboot, which ends the run instead of leaving it to the time limit.
pub const APPEND: &str = "console=ttyS0 panic=-1";

/// Guest RAM in MiB, the same for every engine.
pub const MEMORY_MIB: u32 = 256;

/// How the guest ends its run: `poweroff -f` powers off through ACPI (S5), which ends `bt86 run`
/// with exit status 0 and QEMU too; a kernel panic reboots instead (`panic=-1`, and QEMU runs
/// with `-no-reboot`), so the two ends stay apart.
const END_OF_RUN: &str = "/bin/busybox poweroff -f";

fn shell_name(step: &Step) -> String {
    step.name.replace('-', "_")
}

/// The workload script both the guest's /init and the native chroot source: one function per
/// step, then the steps in order.
pub fn steps_script(steps: &[&Step]) -> String {
    let mut s = String::from(
        "# bt86 bench, linux suite: the workloads (generated by bt86, vmapp/src/bench/linux.rs).\n\
         # Each step prints \"bt86-bench: begin NAME T\" and \"bt86-bench: end NAME T\" with T the\n\
         # guest's clock ($EPOCHREALTIME, microseconds), or \"bt86-bench: failed NAME STATUS\".\n\
         bench_say() { echo \"bt86-bench: $*\"; }\n\
         bench_step() { # NAME FUNCTION N\n\
         \x20   N=$3\n\
         \x20   if ! $2_setup >/dev/null 2>/bench.err; then\n\
         \x20       bench_say \"failed $1 setup\"; head -c 2000 /bench.err; return\n\
         \x20   fi\n\
         \x20   bench_say \"begin $1 $EPOCHREALTIME\"\n\
         \x20   if $2_run >/dev/null 2>/bench.err; then\n\
         \x20       bench_say \"end $1 $EPOCHREALTIME\"\n\
         \x20   else\n\
         \x20       bench_say \"failed $1 $?\"; head -c 2000 /bench.err\n\
         \x20   fi\n\
         \x20   $2_cleanup >/dev/null 2>&1\n\
         }\n",
    );
    for step in steps {
        let f = shell_name(step);
        let body = |b: &str| {
            if b.is_empty() {
                ":".to_string()
            } else {
                b.to_string()
            }
        };
        s += &format!("{f}_setup() {{ {}; }}\n", body(step.setup));
        s += &format!("{f}_run() {{ {}; }}\n", body(step.run));
        s += &format!("{f}_cleanup() {{ {}; }}\n", body(step.cleanup));
    }
    for step in steps {
        s += &format!(
            "bench_step {} {} {}\n",
            step.name,
            shell_name(step),
            step.count
        );
    }
    s += "bench_say done\n";
    s
}

/// What both the guest's /init and the native chroot do first: busybox's applets, PATH, the
/// kernel file systems the workloads use and a fresh tmpfs on /tmp.
const PREAMBLE: &str = "/bin/busybox --install -s /bin\n\
    export PATH=/bin:/sbin HOME=/root\n\
    mount -t proc proc /proc\n\
    mount -t devtmpfs devtmpfs /dev\n\
    mount -t tmpfs tmpfs /tmp\n\
    cd /root\n";

/// Keeps the kernel's late messages (the refined TSC calibration, driver probes) off the
/// console, in the log only: printed in the middle of a marker line they would break it.
const QUIET_CONSOLE: &str = "echo 1 >/proc/sys/kernel/printk";

/// The guest's /init: mount, say "ready" with the guest's uptime, run the steps, end the run.
/// With `disks`, the disk drivers are loaded and the scratch disks waited for after "ready".
fn guest_init(disks: bool) -> String {
    let disks = if disks {
        format!(
            "for m in {DISK_MODULES}; do modprobe $m || echo \"{TAG} modprobe $m failed\"; done\n\
             export {GUEST_DISKS}\n\
             i=0; while [ $i -lt 300 ] && ! [ -b \"$BENCH_VIRTIO\" -a -b \"$BENCH_IDE\" ]; do usleep 100000; i=$((i + 1)); done\n"
        )
    } else {
        String::new()
    };
    format!(
        "#!/bin/busybox sh\n\
         # bt86 bench, linux suite: the benchmark /init (generated by bt86).\n\
         {PREAMBLE}\
         mount -t sysfs sysfs /sys\n\
         {QUIET_CONSOLE}\n\
         read bench_up bench_idle </proc/uptime\n\
         echo \"{TAG} ready $bench_up\"\n\
         {disks}\
         . /bench/steps.sh\n\
         {END_OF_RUN}\n"
    )
}

/// Where the native column's scratch images are, relative to the benchmark root.
pub const NATIVE_IMAGES: [&str; 2] = ["bench/disk-virtio.img", "bench/disk-ide.img"];

/// The script the native column runs in its chroot (in a private mount namespace).
fn native_main() -> String {
    format!(
        "# bt86 bench, linux suite: the native run in a chroot (generated by bt86).\n\
         {PREAMBLE}\
         export BENCH_VIRTIO=/{} BENCH_IDE=/{}\n\
         . /bench/steps.sh\n",
        NATIVE_IMAGES[0], NATIVE_IMAGES[1]
    )
}

/// The files of the benchmark root: (path, mode, contents); directories have no contents.
/// `extra` (the disk steps' kernel modules) is added as it is.
fn root_files(
    busybox: &[u8],
    steps: &[&Step],
    extra: Vec<(String, u32, Vec<u8>)>,
) -> anyhow::Result<Vec<(String, u32, Vec<u8>)>> {
    const DIR: u32 = 0o040_755;
    const EXE: u32 = 0o100_755;
    const FILE: u32 = 0o100_644;
    let disks = steps.iter().any(|s| s.disk);
    let mut files: Vec<(String, u32, Vec<u8>)> = [
        "bin", "sbin", "dev", "proc", "sys", "tmp", "root", "etc", "bench", "mnt",
    ]
    .into_iter()
    .map(|d| (d.to_string(), DIR, Vec::new()))
    .collect();
    files.push(("bin/busybox".into(), EXE, busybox.to_vec()));
    files.push(("init".into(), EXE, guest_init(disks).into_bytes()));
    files.push((
        "bench/steps.sh".into(),
        FILE,
        steps_script(steps).into_bytes(),
    ));
    files.push(("bench/native.sh".into(), FILE, native_main().into_bytes()));
    if disks {
        let diskio = bt86_guests::diskio::diskio_elf()
            .map_err(|e| anyhow::anyhow!("cannot assemble the diskio program: {e}"))?;
        files.push(("bench/diskio".into(), EXE, diskio));
    }
    files.extend(extra);
    Ok(files)
}

/// The kernel modules of a guest initramfs (everything under lib/modules, directories first as
/// the archive has them), for the benchmark root.
fn module_files(archive: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
    cpio_entries(archive)
        .into_iter()
        .filter(|(name, _, _)| name.starts_with("lib"))
        .map(|(name, mode, data)| (name, mode, data.to_vec()))
        .collect()
}

/// The benchmark guest: the kernel, and the benchmark initramfs and native root built from the
/// fetched guest's busybox.
pub struct Guest {
    /// The bzImage.
    pub kernel: std::path::PathBuf,
    /// The benchmark initramfs (uncompressed cpio newc).
    pub initrd: std::path::PathBuf,
    /// The benchmark root extracted for the native chroot.
    pub root: std::path::PathBuf,
    /// The kernel package the guest came from (the fetched VERSION file).
    pub version: String,
}

impl Guest {
    /// Builds the benchmark initramfs and native root under `work` from the fetched guest in
    /// `dir` (vmlinuz, initramfs.gz), for `steps`.
    pub fn prepare(dir: &Path, steps: &[&Step], work: &Path) -> anyhow::Result<Guest> {
        let kernel = dir.join("vmlinuz");
        let initramfs = dir.join("initramfs.gz");
        if !kernel.is_file() || !initramfs.is_file() {
            bail!(
                "the Debian guest is not in {} (run scripts/fetch-guest.sh, or give --guest DIR)",
                dir.display()
            );
        }
        let gz = std::fs::read(&initramfs)
            .with_context(|| format!("cannot read {}", initramfs.display()))?;
        let mut cpio = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut cpio)
            .with_context(|| format!("{} is not a gzip file", initramfs.display()))?;
        let busybox = cpio_file(&cpio, "bin/busybox")
            .with_context(|| format!("{} holds no /bin/busybox", initramfs.display()))?;
        let modules = if steps.iter().any(|s| s.disk) {
            let m = module_files(&cpio);
            if !m.iter().any(|(n, _, _)| n.ends_with("modules.dep")) {
                bail!(
                    "{} holds no kernel modules for the disk steps (run scripts/fetch-guest.sh again)",
                    initramfs.display()
                );
            }
            m
        } else {
            Vec::new()
        };
        let files = root_files(busybox, steps, modules)?;

        let initrd = work.join("bench-initramfs.cpio");
        std::fs::write(&initrd, cpio_archive(&files))
            .with_context(|| format!("cannot write {}", initrd.display()))?;
        let root = work.join("native-root");
        for (path, mode, data) in &files {
            let p = root.join(path);
            if mode & 0o170_000 == 0o040_000 {
                std::fs::create_dir_all(&p)
            } else {
                std::fs::write(&p, data).and_then(|()| {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & 0o7777))
                })
            }
            .with_context(|| format!("cannot write {}", p.display()))?;
        }
        let version = std::fs::read_to_string(dir.join("VERSION"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "Debian i386 kernel".into());
        Ok(Guest {
            kernel,
            initrd,
            root,
            version,
        })
    }
}

/// The contents of the regular file `name` (without a leading "./" or "/") in a cpio newc
/// archive.
fn cpio_file<'a>(archive: &'a [u8], name: &str) -> Option<&'a [u8]> {
    cpio_entries(archive)
        .into_iter()
        .find(|(n, mode, _)| n == name && mode & 0o170_000 == 0o100_000)
        .map(|(_, _, data)| data)
}

/// The entries of a cpio newc archive up to its trailer (or to where it stops making sense):
/// (name without a leading "./" or "/", mode, data). Directories and regular files only.
fn cpio_entries(archive: &[u8]) -> Vec<(String, u32, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some((name, mode, data, next)) = cpio_entry(archive, at) {
        if name == "TRAILER!!!" {
            break;
        }
        if matches!(mode & 0o170_000, 0o040_000 | 0o100_000) && !name.is_empty() && name != "." {
            out.push((name, mode, data));
        }
        at = next;
    }
    out
}

/// The entry at `at`: name, mode, data, and where the next entry starts.
fn cpio_entry(archive: &[u8], at: usize) -> Option<(String, u32, &[u8], usize)> {
    {
        let header = archive.get(at..at + 110)?;
        if &header[..6] != b"070701" && &header[..6] != b"070702" {
            return None;
        }
        let field = |i: usize| {
            std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i])
                .ok()
                .and_then(|h| usize::from_str_radix(h, 16).ok())
        };
        let (mode, size, namesize) = (field(1)?, field(6)?, field(11)?);
        let name_at = at + 110;
        let entry = archive.get(name_at..name_at + namesize.checked_sub(1)?)?;
        let data_at = (name_at + namesize).next_multiple_of(4);
        let data = archive.get(data_at..data_at.checked_add(size)?)?;
        let entry = entry.strip_prefix(b"./").unwrap_or(entry);
        let entry = entry.strip_prefix(b"/").unwrap_or(entry);
        let name = String::from_utf8_lossy(entry).into_owned();
        Some((
            name,
            mode as u32,
            data,
            (data_at + size).next_multiple_of(4),
        ))
    }
}

/// A cpio newc archive (the format the kernel unpacks as initramfs) of `files`, owned by root.
fn cpio_archive(files: &[(String, u32, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entry = |ino: usize, name: &str, mode: u32, data: &[u8]| {
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let fields = [
            ino,
            mode as usize,
            0,
            0,
            nlink,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    };
    for (i, (name, mode, data)) in files.iter().enumerate() {
        entry(i + 1, name, *mode, data);
    }
    entry(0, "TRAILER!!!", 0, &[]);
    out
}

/// One line the script printed for bt86 bench.
#[derive(Debug, Clone, PartialEq)]
pub enum Marker {
    /// /init is running with its file systems mounted; the guest's uptime in seconds.
    Ready(f64),
    /// A step starts; the guest's clock in seconds.
    Begin(String, f64),
    /// A step ended; the guest's clock in seconds.
    End(String, f64),
    /// A step's command failed; what the script said (its exit status, or "setup").
    Failed(String, String),
    /// Every step ran.
    Done,
}

/// The marker in one console line, if it holds one. The tag may follow other text on the same
/// line (a kernel message written before the script's line was complete).
pub fn parse_marker(line: &str) -> Option<Marker> {
    let at = line.find(TAG)?;
    let mut words = line[at + TAG.len()..].split_whitespace();
    let kind = words.next()?;
    let mut name = || words.next().map(str::to_string);
    Some(match kind {
        "ready" => Marker::Ready(name()?.parse().ok()?),
        "begin" => {
            let n = name()?;
            Marker::Begin(n, name()?.parse().ok()?)
        }
        "end" => {
            let n = name()?;
            Marker::End(n, name()?.parse().ok()?)
        }
        "failed" => {
            let n = name()?;
            Marker::Failed(n, name().unwrap_or_default())
        }
        "done" => Marker::Done,
        _ => return None,
    })
}

/// When a console line arrived on the host.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Stamp {
    /// Since the engine was started, by the host's monotonic clock.
    pub wall: Duration,
    /// The CPU time the engine process (all its threads) had consumed by then, in nanoseconds;
    /// None where it is not followed (the native column) or could not be read.
    pub cpu_ns: Option<u64>,
}

/// One row's result from one run: milliseconds by the guest's clock and by the host's, and the
/// engine's host CPU time.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Measured.
    Timed {
        /// By the guest's own clock.
        guest_ms: f64,
        /// Between the marker lines' arrival on the host.
        host_ms: f64,
        /// Host CPU time the engine process consumed between the marker lines' arrival (for
        /// the boot row: from its start), when known.
        cpu_ms: Option<f64>,
    },
    /// Not measured, for this reason.
    Failed(String),
}

/// CPU time between two stamps in milliseconds, when both have it.
fn cpu_between(from: Option<u64>, to: Option<u64>) -> Option<f64> {
    Some(to?.checked_sub(from?)? as f64 / 1e6)
}

/// What one run's console said, row by row: the boot row first (when `boot`), then `steps`.
/// `lines` are the console lines with their arrival time since the run started. `ended` says
/// why the run stopped when it did not finish (it becomes the reason of every row left
/// unmeasured).
pub fn outcomes(
    lines: &[(Stamp, String)],
    boot: bool,
    steps: &[&Step],
    ended: Option<&str>,
) -> Vec<Outcome> {
    let mut ready = None;
    let mut begun: Vec<Option<(f64, Stamp)>> = vec![None; steps.len()];
    let mut done: Vec<Option<Outcome>> = vec![None; steps.len()];
    let index = |name: &str| steps.iter().position(|s| s.name == name);
    for (at, line) in lines {
        match parse_marker(line) {
            Some(Marker::Ready(up)) if ready.is_none() => ready = Some((up, *at)),
            Some(Marker::Begin(n, t)) => {
                if let Some(i) = index(&n) {
                    begun[i] = Some((t, *at));
                }
            }
            Some(Marker::End(n, t)) => {
                if let Some(i) = index(&n) {
                    done[i] = Some(match begun[i] {
                        Some((t0, at0)) => Outcome::Timed {
                            guest_ms: (t - t0) * 1e3,
                            host_ms: at.wall.saturating_sub(at0.wall).as_secs_f64() * 1e3,
                            cpu_ms: cpu_between(at0.cpu_ns, at.cpu_ns),
                        },
                        None => Outcome::Failed("an end line without a begin line".into()),
                    });
                }
            }
            Some(Marker::Failed(n, why)) => {
                if let Some(i) = index(&n) {
                    done[i] = Some(Outcome::Failed(if why == "setup" {
                        "its setup failed in the guest (see the log)".into()
                    } else {
                        format!("its command exited with status {why} (see the log)")
                    }));
                }
            }
            _ => {}
        }
    }
    // Rows a run never reached share one reason (so the report can share one footnote).
    let missing = |during: bool| {
        Outcome::Failed(match (ended, during) {
            (Some(why), false) => why.to_string(),
            (Some(why), true) => format!("{why}, during this step"),
            (None, false) => "the console never showed its begin line".into(),
            (None, true) => "the console never showed its end line".into(),
        })
    };
    let mut out = Vec::new();
    if boot {
        out.push(match ready {
            Some((up, at)) => Outcome::Timed {
                guest_ms: up * 1e3,
                host_ms: at.wall.as_secs_f64() * 1e3,
                cpu_ms: cpu_between(Some(0), at.cpu_ns),
            },
            None => missing(false),
        });
    }
    for i in 0..steps.len() {
        out.push(
            done[i]
                .take()
                .unwrap_or_else(|| missing(begun[i].is_some())),
        );
    }
    out
}

/// Whether the console shows the script's last line.
pub fn finished(lines: &[(Stamp, String)]) -> bool {
    lines
        .iter()
        .any(|(_, l)| parse_marker(l) == Some(Marker::Done))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A console line that arrived `ms` after the start, the engine having used `cpu_ms` of
    /// host CPU by then.
    fn at(ms: u64, cpu_ms: Option<u64>, line: &str) -> (Stamp, String) {
        let stamp = Stamp {
            wall: Duration::from_millis(ms),
            cpu_ns: cpu_ms.map(|c| c * 1_000_000),
        };
        (stamp, line.to_string())
    }

    #[test]
    fn marker_lines_are_parsed_even_after_other_console_text() {
        assert_eq!(
            parse_marker("bt86-bench: ready 4.63"),
            Some(Marker::Ready(4.63))
        );
        assert_eq!(
            parse_marker("bt86-bench: begin fork-exec 1795326056.323806"),
            Some(Marker::Begin("fork-exec".into(), 1795326056.323806))
        );
        assert_eq!(
            parse_marker("[    4.9] random: crng init donebt86-bench: end awk 12.5"),
            Some(Marker::End("awk".into(), 12.5))
        );
        assert_eq!(
            parse_marker("bt86-bench: failed dd 1"),
            Some(Marker::Failed("dd".into(), "1".into()))
        );
        assert_eq!(parse_marker("bt86-bench: done"), Some(Marker::Done));
        assert_eq!(parse_marker("bt86-bench: begin awk"), None);
        assert_eq!(parse_marker("bt86-bench: end awk soon"), None);
        assert_eq!(parse_marker("Linux version 6.1"), None);
    }

    #[test]
    fn outcomes_time_each_step_by_both_clocks_and_name_what_is_missing() {
        let steps: Vec<&Step> = STEPS.iter().take(3).collect();
        let lines = vec![
            at(100, Some(90), "Linux version 6.1.0"),
            at(4_000, Some(3_500), "bt86-bench: ready 3.25"),
            at(4_100, Some(3_550), "bt86-bench: begin awk 100.5"),
            at(6_100, Some(5_500), "bt86-bench: end awk 102.25"),
            at(6_200, Some(5_600), "bt86-bench: begin md5sum 103.0"),
            at(6_300, Some(5_700), "bt86-bench: failed md5sum 1"),
            at(6_400, Some(5_800), "bt86-bench: begin fork-exec 104.0"),
        ];
        let out = outcomes(&lines, true, &steps, Some("stopped after 10 s"));
        assert_eq!(out.len(), 4);
        assert_eq!(
            out[0],
            Outcome::Timed {
                guest_ms: 3250.0,
                host_ms: 4000.0,
                cpu_ms: Some(3500.0)
            }
        );
        assert_eq!(
            out[1],
            Outcome::Timed {
                guest_ms: 1750.0,
                host_ms: 2000.0,
                cpu_ms: Some(1950.0)
            }
        );
        assert_eq!(
            out[2],
            Outcome::Failed("its command exited with status 1 (see the log)".into())
        );
        assert_eq!(
            out[3],
            Outcome::Failed("stopped after 10 s, during this step".into())
        );
        assert!(!finished(&lines));

        // Without the engine's CPU time (the native column), or with a clock that went
        // backwards, the step is still timed, without CPU time.
        let lines = vec![
            at(4_100, None, "bt86-bench: begin awk 100.5"),
            at(6_100, None, "bt86-bench: end awk 102.25"),
            at(6_200, Some(900), "bt86-bench: begin md5sum 103.0"),
            at(6_300, Some(800), "bt86-bench: end md5sum 103.1"),
        ];
        let out = outcomes(&lines, false, &steps[..2], None);
        assert!(
            matches!(out[0], Outcome::Timed { cpu_ms: None, host_ms, .. } if host_ms == 2000.0),
            "{out:?}"
        );
        assert!(
            matches!(out[1], Outcome::Timed { cpu_ms: None, .. }),
            "{out:?}"
        );

        let lines = [at(100, None, "Linux version 6.1.0")];
        let out = outcomes(&lines, false, &steps[..1], None);
        assert_eq!(
            out,
            vec![Outcome::Failed(
                "the console never showed its begin line".into()
            )]
        );
    }

    #[test]
    fn the_script_runs_every_step_in_order_with_its_count() {
        let steps: Vec<&Step> = STEPS.iter().collect();
        let s = steps_script(&steps);
        let calls: Vec<&str> = s.lines().filter(|l| l.starts_with("bench_step ")).collect();
        assert_eq!(calls.len(), STEPS.len());
        assert_eq!(calls[2], "bench_step fork-exec fork_exec 500");
        assert!(s.contains("fork_exec_run() { i=0;"), "{s}");
        assert!(s.contains("awk_setup() { :; }"), "{s}");
        assert!(s.ends_with("bench_say done\n"), "{s}");
        // The idle step comes last, after everything it could inherit work from, and only
        // sleeps; its setup writes back what is dirty and lets the guest settle.
        assert_eq!(
            calls.last(),
            Some(&format!("bench_step idle idle {IDLE_SECONDS}").as_str())
        );
        assert!(
            s.contains("idle_run() { d=$(cat /proc/diskstats); sleep \"$N\"; [ "),
            "{s}"
        );
        assert!(s.contains("idle_setup() { sync; sleep 2; }"), "{s}");
        let idle = find(IDLE).unwrap();
        assert_eq!(idle.measure, Measure::HostCpuShare);
        assert!(!idle.native && !idle.disk, "{idle:?}");
        assert_eq!(
            STEPS
                .iter()
                .filter(|s| s.measure == Measure::HostCpuShare)
                .count(),
            1
        );
        for step in STEPS {
            assert!(
                step.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-'),
                "{}",
                step.name
            );
            assert_ne!(step.name, BOOT);
        }
    }

    #[test]
    fn the_archive_round_trips_through_the_cpio_reader() {
        let files = root_files(b"\x7fELF busybox", &[&STEPS[0]], Vec::new()).unwrap();
        let archive = cpio_archive(&files);
        assert_eq!(&archive[..6], b"070701");
        assert_eq!(archive.len() % 4, 0);
        assert_eq!(
            cpio_file(&archive, "bin/busybox"),
            Some(&b"\x7fELF busybox"[..])
        );
        let init = cpio_file(&archive, "init").unwrap();
        let init = std::str::from_utf8(init).unwrap();
        assert!(init.starts_with("#!/bin/busybox sh\n"), "{init}");
        let ready = init.find("echo \"bt86-bench: ready $bench_up\"");
        assert!(ready.is_some(), "{init}");
        // The kernel's late messages stay off the console before the first marker.
        assert!(init.find(QUIET_CONSOLE) < ready, "{init}");
        assert!(init.trim_end().ends_with("poweroff -f"), "{init}");
        assert!(
            !init.contains("modprobe"),
            "no disk steps, no drivers: {init}"
        );
        assert_eq!(cpio_file(&archive, "bench/diskio"), None);
        // Directories are not files.
        assert_eq!(cpio_file(&archive, "bin"), None);
        assert_eq!(cpio_file(&archive, "nosuch"), None);
        assert_eq!(cpio_file(&archive[..50], "init"), None);
    }

    #[test]
    fn disk_steps_bring_their_drivers_program_and_modules() {
        let disk: Vec<&Step> = STEPS.iter().filter(|s| s.disk).collect();
        assert_eq!(disk.len(), 9);
        for s in disk.iter().filter(|s| s.native) {
            assert!(s.native, "{}: the host baseline runs it", s.name);
            assert!(
                s.run.contains("$BENCH_VIRTIO") || s.run.contains("$BENCH_IDE"),
                "{}",
                s.name
            );
            assert!(s.run.starts_with("/bench/diskio "), "{}", s.name);
        }
        let modules = vec![
            ("lib".to_string(), 0o040_755, Vec::new()),
            (
                "lib/modules/6.1/modules.dep".to_string(),
                0o100_644,
                b"x.ko:\n".to_vec(),
            ),
        ];
        let files = root_files(b"busybox", &disk, modules).unwrap();
        let archive = cpio_archive(&files);
        assert_eq!(module_files(&archive).len(), 2);
        let init = std::str::from_utf8(cpio_file(&archive, "init").unwrap())
            .unwrap()
            .to_string();
        let ready = init.find("ready").unwrap();
        let modprobe = init.find("modprobe").unwrap();
        let steps = init.find(". /bench/steps.sh").unwrap();
        assert!(ready < modprobe && modprobe < steps, "{init}");
        assert!(init.contains("BENCH_VIRTIO=/dev/vda"), "{init}");
        let diskio = cpio_file(&archive, "bench/diskio").unwrap();
        assert_eq!(&diskio[..4], b"\x7fELF");
        let native = std::str::from_utf8(cpio_file(&archive, "bench/native.sh").unwrap())
            .unwrap()
            .to_string();
        assert!(
            native.contains("BENCH_VIRTIO=/bench/disk-virtio.img"),
            "{native}"
        );
    }
}
