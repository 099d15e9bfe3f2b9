//! The Linux boot path: a synthetic bzImage that checks the 32-bit boot protocol's entry state,
//! and Debian's i386 kernel with the busybox initramfs from scripts/fetch-guest.sh.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::{Duration, Instant};

use bt86_tests::console::{self, ConsoleError, Ended, Output, Session};
use bt86_tests::runner::{bt86_binary, drain, qemu_binary};
use iced_x86::code_asm::*;

/// A bzImage whose protected-mode code checks what the boot protocol promises (ESI = the zero
/// page holding "HdrS", CS = 0x10, DS = 0x18, interrupts off, the initrd where the zero page says
/// with its first byte 0x5A, the command line), then waits for one byte on COM1 and exits
/// through isa-debug-exit with it. Any failed check exits with 0x7F.
fn synthetic_bzimage() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    let mut fail = a.create_label();
    let mut poll = a.create_label();
    (|| -> Result<(), IcedError> {
        a.cmp(dword_ptr(esi + 0x202), 0x5372_6448)?; // "HdrS"
        a.jne(fail)?;
        a.mov(eax, cs)?;
        a.cmp(eax, 0x10)?;
        a.jne(fail)?;
        a.mov(eax, ds)?;
        a.cmp(eax, 0x18)?;
        a.jne(fail)?;
        a.pushfd()?;
        a.pop(eax)?;
        a.test(eax, 0x200)?; // IF
        a.jnz(fail)?;
        a.mov(ebx, dword_ptr(esi + 0x218))?; // ramdisk_image
        a.cmp(byte_ptr(ebx), 0x5A)?;
        a.jne(fail)?;
        a.cmp(dword_ptr(esi + 0x21C), 3)?; // ramdisk_size
        a.jne(fail)?;
        a.mov(ebx, dword_ptr(esi + 0x228))?; // cmd_line_ptr
        a.cmp(dword_ptr(ebx), 0x6F6C_6568)?; // "helo"
        a.jne(fail)?;
        a.set_label(&mut poll)?;
        a.mov(dx, 0x3FD)?;
        a.in_(al, dx)?;
        a.test(al, 1)?;
        a.jz(poll)?;
        a.mov(dx, 0x3F8)?;
        a.in_(al, dx)?;
        a.out(0xF4, al)?;
        a.hlt()?;
        a.set_label(&mut fail)?;
        a.mov(al, 0x7F)?;
        a.out(0xF4, al)?;
        a.hlt()
    })()
    .unwrap();
    let body = a.assemble(0x10_0000).unwrap();

    let mut k = vec![0u8; 5 * 512]; // boot sector + 4 setup sectors
    k[0x1F1] = 4; // setup_sects
    k[0x1FE..0x200].copy_from_slice(&0xAA55u16.to_le_bytes());
    k[0x200] = 0xEB;
    k[0x201] = 0x66; // header up to 0x268 (protocol 2.10's fields)
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&0x020Au16.to_le_bytes());
    k[0x211] = 1; // LOADED_HIGH
    k[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    k[0x22C..0x230].copy_from_slice(&0x37FF_FFFFu32.to_le_bytes()); // initrd_addr_max
    k[0x238..0x23C].copy_from_slice(&255u32.to_le_bytes()); // cmdline_size
    k.extend_from_slice(&body);
    k
}

#[test]
fn synthetic_bzimage_gets_the_boot_protocol_entry_state_and_console_input() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bzImage"), synthetic_bzimage()).unwrap();
    std::fs::write(dir.path().join("initrd"), [0x5A, 1, 2]).unwrap();
    let mut child = Command::new(bt86_binary())
        .current_dir(dir.path())
        .args(["run", "--engine", "interp", "--kernel", "bzImage"])
        .args(["--initrd", "initrd", "--append", "helo world"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"A").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // 'A' (0x41) through isa-debug-exit: (0x41 << 1) | 1 = 0x83; a failed check gives 0xFF.
    assert_eq!(out.status.code(), Some(0x83), "stderr: {stderr}");
}

/// The fetched Debian guest, if scripts/fetch-guest.sh has run (scripts/test.sh runs it).
fn debian_guest() -> Option<PathBuf> {
    let dir = match std::env::var_os("BT86_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.bt86-cache/guest"),
    };
    (dir.join("vmlinuz").is_file() && dir.join("initramfs.gz").is_file()).then_some(dir)
}

/// The bt86 binary to boot Linux with: the interpreter needs an optimised build to boot in
/// minutes rather than an hour. `$BT86_LINUX_BIN`, else target/release/bt86 if it is there.
fn release_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BT86_LINUX_BIN") {
        return Some(p.into());
    }
    let debug = bt86_binary();
    let release = debug.parent()?.parent()?.join("release/bt86");
    release.is_file().then_some(release)
}

/// Console lines the Debian boot on interp reaches today, in order: the boot protocol handed over
/// the E820 map, the command line and the initrd, start_kernel set up memory on them, the serial
/// console driver took over COM1, and PIT interrupts through the 8259 advanced jiffies enough to
/// calibrate the delay loop. (Next on the console is the kernel refusing to go on without an
/// x87 FPU, which the interpreter does not have yet.)
const DEBIAN_MILESTONES: &[&str] = &[
    "Linux version 6.1",
    "BIOS-e820: [mem 0x0000000000100000-0x000000000ffdffff] usable",
    // The initrd ends at the top of low RAM below the 128 KiB reserved for ACPI; where it starts
    // depends on the initramfs's size (scripts/fetch-guest.sh adds the disk modules).
    "-0x0ffdffff]",
    "255MB LOWMEM available",
    "Kernel command line: console=ttyS0 nokaslr",
    "printk: console [ttyS0] enabled",
    // "Calibrating delay loop... N BogoMIPS" when the interpreter ran too slowly for the
    // kernel's fast PIT calibration of the TSC, "(skipped)" when that calibration worked.
    "Calibrating delay loop",
    "Spectre V2 : Mitigation: Retpolines",
];

/// Where the boot stops today (no x87 in the interpreter yet), and a kernel panic: the console
/// will show nothing more after these.
const DEBIAN_DEAD_ENDS: &[&str] = &["x86/fpu: Giving up", "Kernel panic"];

/// A safety net for a guest that stops making progress; the test ends as soon as the console
/// shows every milestone or a dead end.
const DEBIAN_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[test]
fn debian_kernel_boots_on_interp_as_far_as_the_platform_allows() {
    let (Some(guest), Some(bin)) = (debian_guest(), release_binary()) else {
        eprintln!(
            "skipped: needs scripts/fetch-guest.sh's guest and a release build of bt86 \
             (scripts/test.sh provides both)"
        );
        return;
    };
    let mut child = Command::new(bin)
        .args(["run", "--engine", "interp", "--memory", "256"])
        .arg("--kernel")
        .arg(guest.join("vmlinuz"))
        .arg("--initrd")
        .arg(guest.join("initramfs.gz"))
        .args(["--append", "console=ttyS0 nokaslr"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + DEBIAN_TIMEOUT;
    let mut console: Vec<String> = Vec::new();
    let mut next = 0;
    while next < DEBIAN_MILESTONES.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if line.contains(DEBIAN_MILESTONES[next]) {
                    next += 1;
                }
                let dead_end = DEBIAN_DEAD_ENDS.iter().any(|d| line.contains(d));
                console.push(line);
                if dead_end {
                    break;
                }
            }
            Err(_) => break, // bt86 ended, or the safety net
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let tail = console[console.len().saturating_sub(30)..].join("\n");
    assert!(
        next == DEBIAN_MILESTONES.len(),
        "console never showed {:?}; last lines:\n{tail}",
        DEBIAN_MILESTONES[next.min(DEBIAN_MILESTONES.len() - 1)]
    );
    assert!(
        !console.iter().any(|l| l.contains("Kernel panic")),
        "last lines:\n{tail}"
    );
}

// ---------------------------------------------------------------------------------------------
// The shell session: Debian's kernel to the busybox prompt, a scripted console session, and a
// clean end, on each engine and under QEMU.

/// The prompt the initramfs's /init gives the shell (scripts/fetch-guest.sh).
const PROMPT: &str = "bt86# ";

/// The kernel command line of every session: the serial console, nothing else (KASLR stays on,
/// as on the user's boot).
const SESSION_APPEND: &str = "console=ttyS0";

/// Safety nets, not timings: the interpreter boots in minutes on an idle machine, and these
/// machines are shared. A wait that runs out fails with the console's tail.
const BOOT_TIMEOUT: Duration = Duration::from_secs(40 * 60);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Run before the scripted commands: only emergency messages reach the console from then on.
const CONSOLE_QUIET: &str = "echo 1 > /proc/sys/kernel/printk";

/// The scripted commands, in order.
const SESSION: &[&str] = &[
    "uname -a",
    "cat /proc/cpuinfo",
    // 100 processes, each forked by the subshell and exec'ing a shell that prints its number.
    // A subshell, so the interactive shell's job-control notices stay out of the output.
    "(for i in $(seq 100); do sh -c 'echo fork-$0-ok' $i & done; wait)",
    "ls -a /",
    "ls -l /init /bin/busybox",
    "ls /bin | wc -l",
    "md5sum /bin/busybox",
    "cat /proc/cmdline",
    "dmesg",
];

/// What a session gave.
struct SessionLog {
    /// Who ran it (for messages).
    who: String,
    /// Each scripted command's output, in `SESSION`'s order.
    outputs: Vec<Output>,
    /// How the emulator ended after the guest powered off.
    ended: Ended,
    /// Wall time from starting the emulator to the first prompt.
    to_prompt: Duration,
}

impl SessionLog {
    fn output(&self, command: &str) -> &Output {
        self.outputs
            .iter()
            .find(|o| o.command == command)
            .expect("a scripted command")
    }
}

/// Boots `cmd` to the prompt, runs the session, powers the guest off (`poweroff -f`: reboot(2)
/// straight away, ACPI S5 under both bt86 and QEMU, which then exit with status 0), and returns
/// what the console showed. Panics with the console's tail if a step does not happen.
fn console_session(who: &str, cmd: Command) -> SessionLog {
    let fail = |e: ConsoleError| -> ! { panic!("{who}: {e}") };
    let mut s = Session::spawn(cmd).unwrap_or_else(|e| fail(e));
    s.wait_for(PROMPT, BOOT_TIMEOUT).unwrap_or_else(|e| fail(e));
    let to_prompt = s.elapsed();
    eprintln!("{who}: at the shell prompt after {to_prompt:.1?} (wall time)");
    // The kernel's own late messages (the TSC's refined calibration about a second after
    // boot, driver probes) go to the console whenever they happen; an engine that reaches the
    // prompt before them would see them inside a command's output. Keep them in the log only
    // (`dmesg` still reads all of it).
    let quiet = s
        .run(CONSOLE_QUIET, PROMPT, COMMAND_TIMEOUT)
        .unwrap_or_else(|e| fail(e));
    assert_eq!(
        quiet.status, 0,
        "{who}: `{CONSOLE_QUIET}` failed: {}",
        quiet.text
    );
    let mut outputs = Vec::new();
    for command in SESSION {
        let out = s
            .run(command, PROMPT, COMMAND_TIMEOUT)
            .unwrap_or_else(|e| fail(e));
        outputs.push(out);
    }
    s.send("poweroff -f\n").unwrap_or_else(|e| fail(e));
    let ended = s.finish(COMMAND_TIMEOUT);
    SessionLog {
        who: who.to_string(),
        outputs,
        ended,
        to_prompt,
    }
}

/// The kernel release the fetched package holds ("linux-image-6.1.0-50-686" -> "6.1.0-50-686").
fn kernel_release(guest: &Path) -> String {
    let pkg = std::fs::read_to_string(guest.join("VERSION")).expect("the guest's VERSION file");
    pkg.trim()
        .strip_prefix("linux-image-")
        .expect("VERSION names a linux-image package")
        .to_string()
}

fn bt86_session_command(bin: &Path, guest: &Path, engine: &str) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--engine", engine, "--memory", "256"])
        .arg("--kernel")
        .arg(guest.join("vmlinuz"))
        .arg("--initrd")
        .arg(guest.join("initramfs.gz"))
        .args(["--append", SESSION_APPEND]);
    cmd
}

/// Console output the kernel prints when something went wrong: an oops, a BUG() or a WARN()
/// (both print a call trace), and timer interrupts the kernel noticed were lost.
const KERNEL_COMPLAINTS: &[&str] = &["Oops", "BUG", "Call Trace", "lost ticks"];

/// Whether `line` contains `word` with no letter or digit on either side ("BUG" matches
/// "BUG: unable to handle" and "kernel BUG at", not "DEBUG").
fn has_word(line: &str, word: &str) -> bool {
    line.match_indices(word).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + word.len()..].chars().next();
        !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
    })
}

#[test]
fn kernel_complaints_are_matched_as_whole_words() {
    assert!(has_word(
        "[    1.0] BUG: unable to handle page fault",
        "BUG"
    ));
    assert!(has_word("kernel BUG at mm/slub.c:42!", "BUG"));
    assert!(!has_word(
        "ACPI BIOS Error (bug): A valid RSDP was not found",
        "BUG"
    ));
    assert!(!has_word("CONFIG_DEBUG_BUGVERBOSE", "BUG"));
    assert!(has_word("[    0.0] Call Trace:", "Call Trace"));
}

/// Checks what the session must show on bt86, whatever the engine.
fn check_bt86_session(log: &SessionLog, release: &str) {
    let who = &log.who;
    for o in &log.outputs {
        assert_eq!(o.status, 0, "{who}: `{}` failed:\n{}", o.command, o.text);
    }
    let uname = &log.output("uname -a").text;
    assert!(
        uname.starts_with(&format!("Linux (none) {release} ")) && uname.contains(" i686 "),
        "{who}: uname -a says {uname:?}; the fetched kernel is {release}"
    );

    // The CPU the interpreter's CPUID describes (vmm/src/interp/system.rs): a Pentium M,
    // family 6 model 13 stepping 6, with the features it really implements.
    let cpuinfo = &log.output("cat /proc/cpuinfo").text;
    let field = |key: &str| {
        cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == key).then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("{who}: no {key:?} in /proc/cpuinfo:\n{cpuinfo}"))
    };
    assert_eq!(field("vendor_id"), "GenuineIntel", "{who}");
    assert_eq!(field("cpu family"), "6", "{who}");
    assert_eq!(field("model"), "13", "{who}");
    assert_eq!(field("stepping"), "6", "{who}");
    let flags = field("flags");
    let flags: Vec<&str> = flags.split_whitespace().collect();
    for f in [
        "fpu", "de", "pse", "tsc", "msr", "pae", "cx8", "sep", "pge", "cmov", "clflush", "mmx",
        "fxsr", "sse", "sse2",
    ] {
        assert!(flags.contains(&f), "{who}: flag {f} missing from {flags:?}");
    }

    let forks = &log.output(SESSION[2]).text;
    let mut seen: Vec<&str> = forks.lines().collect();
    seen.sort_unstable();
    let mut expected: Vec<String> = (1..=100).map(|i| format!("fork-{i}-ok")).collect();
    expected.sort_unstable();
    assert_eq!(
        seen, expected,
        "{who}: the 100 forked shells did not each print their line once:\n{forks}"
    );

    // Each complaint with the line before it, which usually says what it is about.
    let dmesg: Vec<&str> = log.output("dmesg").text.lines().collect();
    let complaints: Vec<String> = (0..dmesg.len())
        .filter(|&i| KERNEL_COMPLAINTS.iter().any(|w| has_word(dmesg[i], w)))
        .map(|i| dmesg[i.saturating_sub(1)..=i].join("\n"))
        .collect();
    assert!(
        complaints.is_empty(),
        "{who}: the kernel log has complaints:\n{}",
        complaints.join("\n")
    );

    let end = &log.ended;
    assert!(
        !end.timed_out && end.status == Some(0),
        "{who}: after `poweroff -f` bt86 should exit 0, got {:?} (timed out: {}); stderr: {}\n\
         console tail:\n{}",
        end.status,
        end.timed_out,
        end.stderr,
        console::tail_of(&end.transcript)
    );
}

/// The guest and the release binary, or None (printing why the test is skipped).
fn session_prerequisites(test: &str) -> Option<(PathBuf, PathBuf)> {
    match (debian_guest(), release_binary()) {
        (Some(g), Some(b)) => Some((g, b)),
        _ => {
            eprintln!(
                "SKIPPED {test}: needs scripts/fetch-guest.sh's guest and a release build of \
                 bt86 (scripts/test.sh provides both)"
            );
            None
        }
    }
}

/// The session on bt, run once for the tests that need it.
fn bt_session(guest: &Path, bin: &Path) -> &'static SessionLog {
    static LOG: OnceLock<SessionLog> = OnceLock::new();
    LOG.get_or_init(|| console_session("bt86 --engine bt", bt86_session_command(bin, guest, "bt")))
}

#[test]
fn debian_shell_session_on_bt() {
    let Some((guest, bin)) = session_prerequisites("debian_shell_session_on_bt") else {
        return;
    };
    check_bt86_session(bt_session(&guest, &bin), &kernel_release(&guest));
}

/// The same session on the interpreter: the longest test of the suite (about 6.5 minutes of
/// CPU, 8.5 minutes of wall time on the shared 2-core machine alongside the rest of the suite),
/// run in parallel with the others.
#[test]
fn debian_shell_session_on_interp() {
    let Some((guest, bin)) = session_prerequisites("debian_shell_session_on_interp") else {
        return;
    };
    let log = console_session(
        "bt86 --engine interp",
        bt86_session_command(&bin, &guest, "interp"),
    );
    check_bt86_session(&log, &kernel_release(&guest));
}

/// QEMU's CPU for the comparison, made as close to bt86's CPUID as QEMU allows: a Pentium III
/// base relabelled family 6 model 13 stepping 6 with SSE2, CLFLUSH and a local APIC (the
/// Pentium M bt86 advertises), without what bt86's CPU does not report (machine check, MTRRs,
/// PSE-36, the hypervisor bit), the same highest basic leaf and no brand string. Both kernels run
/// in APIC mode with the IOAPIC.
const QEMU_CPU: &str = "pentium3,family=6,model=13,stepping=6,+sse2,+clflush,+apic,-mce,-mca,\
                        -mtrr,-pse36,-hypervisor,level=2,model-id=";

/// /proc/cpuinfo lines whose values are allowed to differ between bt86 and QEMU, and why.
const CPUINFO_DIFFERENCES: &[(&str, &str)] = &[
    // Measured by the kernel against each machine's timers (and bt86's guest cannot calibrate
    // its TSC yet: "tsc: Unable to calibrate against PIT", so it shows 0.000).
    ("cpu MHz", "measured"),
    ("bogomips", "measured"),
    // QEMU answers IA32_BIOS_SIGN_ID with microcode revision 1; bt86 with 0, and the kernel
    // leaves the line out.
    ("microcode", "emulator-specific MSR value"),
    // Decoded from CPUID leaf 2's cache descriptors, which each emulator fills differently.
    ("cache size", "emulator-specific CPUID leaf 2"),
];

/// Flags allowed to differ, and why: none (both CPUs report exactly the same feature flags).
const FLAG_DIFFERENCES: &[&str] = &[];

/// `text` with the lines of `CPUINFO_DIFFERENCES` taken out and the flags line reduced to the
/// flags both must share.
fn comparable_cpuinfo(text: &str) -> String {
    text.lines()
        .filter_map(|l| {
            let key = l.split(':').next().unwrap_or("").trim();
            if CPUINFO_DIFFERENCES.iter().any(|(k, _)| *k == key) {
                return None;
            }
            if key == "flags" {
                let (k, v) = l.split_once(':')?;
                let kept: Vec<&str> = v
                    .split_whitespace()
                    .filter(|f| !FLAG_DIFFERENCES.contains(f))
                    .collect();
                return Some(format!("{k}: {}", kept.join(" ")));
            }
            Some(l.to_string())
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A command's output as the comparison sees it: the forked shells print in whatever order
/// they are scheduled, so their lines are sorted; `dmesg` is not compared (each machine's boot
/// log describes its own firmware and devices — QEMU's has ACPI tables, an HPET, PCI devices
/// bt86 does not have — and every line carries a timestamp); the rest must agree byte for byte.
fn comparable(o: &Output) -> Option<String> {
    match o.command.as_str() {
        "dmesg" => None,
        "cat /proc/cpuinfo" => Some(comparable_cpuinfo(&o.text)),
        c if c == SESSION[2] => {
            let mut lines: Vec<&str> = o.text.lines().collect();
            lines.sort_unstable();
            Some(lines.join("\n"))
        }
        _ => Some(o.text.clone()),
    }
}

#[test]
fn debian_shell_session_on_bt_matches_qemu() {
    let test = "debian_shell_session_on_bt_matches_qemu";
    let Some((guest, bin)) = session_prerequisites(test) else {
        return;
    };
    let Some(qemu) = qemu_binary() else {
        eprintln!("SKIPPED {test}: qemu-system-i386 is not installed (run scripts/setup.sh)");
        return;
    };
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-M", "pc", "-cpu", QEMU_CPU, "-m", "256"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initramfs.gz"))
        .args(["-append", SESSION_APPEND]);
    let reference = console_session("qemu-system-i386 -accel tcg", cmd);
    let ours = bt_session(&guest, &bin);
    for (q, b) in reference.outputs.iter().zip(&ours.outputs) {
        assert_eq!(q.status, b.status, "`{}`: exit status", q.command);
        assert_eq!(
            comparable(b),
            comparable(q),
            "`{}` printed differently under bt86 (left) and QEMU (right)",
            q.command
        );
    }
    assert_eq!(reference.ended.status, Some(0), "QEMU after `poweroff -f`");
    assert_eq!(ours.ended.status, Some(0), "bt86 after `poweroff -f`");
    eprintln!(
        "wall time to the shell prompt: bt {:.1?}, qemu-tcg {:.1?}",
        ours.to_prompt, reference.to_prompt
    );
}

// ---- The PC platform under Debian's kernel: ACPI, power-off, the APICs ----------------------

/// Boots the Debian guest on `engine` with `append`, stdin closed, until bt86 exits or the
/// safety net `limit` ends it. Returns the exit code (None if killed) and the console output.
fn boot_debian(
    guest: &Path,
    bin: &Path,
    engine: &str,
    append: &str,
    limit: Duration,
) -> (Option<i32>, String) {
    let mut child = Command::new(bin)
        .args(["run", "--engine", engine, "--memory", "256"])
        .arg("--kernel")
        .arg(guest.join("vmlinuz"))
        .arg("--initrd")
        .arg(guest.join("initramfs.gz"))
        .args(["--append", append])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Both pipes drain while the guest runs: a full stderr pipe would stall bt86.
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut console = String::from_utf8_lossy(&stdout.join().unwrap()).into_owned();
    console.push_str(&String::from_utf8_lossy(&stderr.join().unwrap()));
    (status, console)
}

/// The last `n` lines of `s`, for failure messages.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Debian's kernel booted on bt with busybox as init running `poweroff -f` (the words the kernel
/// does not know are init's arguments): reboot(2) straight away, which powers off through ACPI
/// S5. One boot, shared by the platform tests below.
struct PoweroffBoot {
    status: Option<i32>,
    console: String,
}

impl PoweroffBoot {
    /// The boot, or None (with the reason printed) without the guest or a release build.
    fn get() -> Option<&'static Self> {
        let (Some(guest), Some(bin)) = (debian_guest(), release_binary()) else {
            eprintln!(
                "skipped: needs scripts/fetch-guest.sh's guest and a release build of bt86 \
                 (scripts/test.sh provides both)"
            );
            return None;
        };
        static BOOT: OnceLock<PoweroffBoot> = OnceLock::new();
        Some(BOOT.get_or_init(|| {
            let (status, console) = boot_debian(
                &guest,
                &bin,
                "bt",
                "console=ttyS0 rdinit=/bin/busybox poweroff -f",
                Duration::from_secs(10 * 60),
            );
            PoweroffBoot { status, console }
        }))
    }

    /// The console's last lines, for failure messages.
    fn last(&self) -> String {
        tail(&self.console, 30)
    }

    /// The console showed every line of `want` and none of `bad`, and bt86 exited 0.
    fn check(&self, want: &[&str], bad: &[&str]) {
        let last = self.last();
        for w in want {
            assert!(
                self.console.contains(w),
                "console never showed {w:?}; last lines:\n{last}"
            );
        }
        for b in bad {
            assert!(
                !self.console.contains(b),
                "console showed {b:?}; last lines:\n{last}"
            );
        }
        assert_eq!(
            self.status,
            Some(0),
            "bt86 should exit 0 on power-off; last lines:\n{last}"
        );
    }
}

#[test]
fn debian_kernel_finds_the_acpi_tables_and_powers_off_on_bt() {
    let Some(boot) = PoweroffBoot::get() else {
        return;
    };
    boot.check(
        &[
            "ACPI: RSDP 0x00000000000F0000",
            "ACPI: FACP",
            "ACPI: DSDT",
            "ACPI: Interpreter enabled",
            "ACPI: PM: (supports S0 S5)",
            "ACPI: PCI Root Bridge [PCI0]",
            "ACPI: PM-Timer IO Port: 0x608",
            "ACPI: PM: Preparing to enter system sleep state S5",
            "reboot: Power down",
        ],
        &["RSDP was not found", "unchecked MSR access", "Kernel panic"],
    );
    // The kernel registers the PM timer as a clocksource once it has checked its rate
    // against the PIT over ~50 ms. Both follow host time, so a host that deschedules bt86
    // between the kernel's PM-timer read and the PIT's start makes the PM timer look fast
    // (seen at 107% on a loaded machine). Only that direction is a host artifact: a timer
    // too slow, or far too fast, is a bt86 bug.
    if !boot.console.contains("clocksource: acpi_pm") {
        let rate = boot
            .console
            .split("PM-Timer running at invalid rate: ")
            .nth(1)
            .and_then(|r| r.split('%').next())
            .and_then(|n| n.trim().parse::<u32>().ok());
        assert!(
            rate.is_some_and(|r| (105..=130).contains(&r)),
            "the PM timer never became a clocksource (rate check: {rate:?}%); last lines:\n{}",
            boot.last()
        );
        eprintln!(
            "NOTE acpi test: the kernel measured the PM timer at {}% of its rate against the \
             PIT (the host descheduled bt86 during the check)",
            rate.unwrap_or(0)
        );
    }
}

#[test]
fn debian_kernel_uses_the_local_apic_and_the_ioapic_on_bt() {
    // No "lapic"/"noapic" options: the kernel finds the APICs in the MADT and CPUID, as on a
    // PC.
    let Some(boot) = PoweroffBoot::get() else {
        return;
    };
    boot.check(
        &[
            "ACPI: LAPIC_NMI (acpi_id[0xff] dfl dfl lint[0x1])",
            "IOAPIC[0]: apic_id 1, version 17, address 0xfec00000, GSI 0-23",
            "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
            "ACPI: INT_SRC_OVR (bus 0 bus_irq 9 global_irq 9 high level)",
            "APIC: Switch to symmetric I/O mode setup",
            // check_timer() found the 8254 on IOAPIC pin 2 on its first try.
            "..TIMER: vector=0x30 apic1=0 pin1=2 apic2=-1 pin2=-1",
            "ACPI: Using IOAPIC for interrupt routing",
            "serial8250: ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A",
            "reboot: Power down",
        ],
        &[
            "Local APIC disabled by BIOS",
            "Keep in PIC mode",
            "MP-BIOS bug",
            "lost ticks",
            "APIC error",
            "spurious APIC interrupt",
            "Kernel panic",
        ],
    );
}
