//! `bt86 run` facing bad input: every mistake gets status 2 and a message that names the file or
//! option and says what is wrong. None of these need /dev/kvm.

use std::path::Path;
use std::process::Command;

use bt86_tests::kernels;

struct Run {
    status: Option<i32>,
    stderr: String,
    stdout: String,
}

fn bt86(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_bt86"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run bt86");
    Run {
        status: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

fn hello(dir: &Path) -> Vec<u8> {
    let image = (kernels::find("hello").unwrap().build)().unwrap();
    std::fs::write(dir.join("hello"), &image).unwrap();
    image
}

fn assert_user_error(r: &Run, needles: &[&str]) {
    assert_eq!(r.status, Some(2), "status for bad input: {}", r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "stderr lacks {n:?}: {}", r.stderr);
    }
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn help_explains_every_flag() {
    let dir = tempfile::tempdir().unwrap();
    let r = bt86(dir.path(), &["run", "--help"]);
    assert_eq!(r.status, Some(0));
    for flag in [
        "--kernel", "--append", "--module", "--initrd", "--bios", "--memory", "--engine",
        "--serial", "--stats",
    ] {
        assert!(r.stdout.contains(flag), "--help lacks {flag}: {}", r.stdout);
    }
    assert!(r.stdout.contains("Exit status"), "{}", r.stdout);
}

#[test]
fn missing_kernel_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let r = bt86(dir.path(), &["run", "--kernel", "no-such-kernel.elf"]);
    assert_user_error(&r, &["no-such-kernel.elf", "No such file"]);
}

#[test]
fn truncated_kernel_is_reported_as_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let image = hello(dir.path());
    std::fs::write(dir.path().join("cut.elf"), &image[..image.len() / 2]).unwrap();
    let r = bt86(dir.path(), &["run", "--kernel", "cut.elf"]);
    assert_user_error(&r, &["kernel cut.elf", "truncated"]);
}

#[test]
fn non_multiboot_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("notes.txt"),
        "just some text, no header here\n",
    )
    .unwrap();
    let r = bt86(dir.path(), &["run", "--kernel", "notes.txt"]);
    assert_user_error(&r, &["kernel notes.txt", "no multiboot v1 header"]);

    let mut bz = vec![0u8; 4096];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(dir.path().join("bzImage"), bz).unwrap();
    let r = bt86(dir.path(), &["run", "--kernel", "bzImage"]);
    assert_user_error(&r, &["kernel bzImage", "Linux bzImage"]);

    std::fs::write(dir.path().join("empty"), "").unwrap();
    let r = bt86(dir.path(), &["run", "--kernel", "empty"]);
    assert_user_error(&r, &["kernel empty", "too short"]);
}

#[test]
fn unknown_engines_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    hello(dir.path());
    let r = bt86(dir.path(), &["run", "--engine", "vmx", "--kernel", "hello"]);
    assert_user_error(&r, &["vmx"]);
}

#[test]
fn memory_sizes_a_32bit_pc_cannot_use_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    hello(dir.path());
    for mib in ["1", "4096"] {
        let r = bt86(dir.path(), &["run", "--memory", mib, "--kernel", "hello"]);
        assert_user_error(&r, &[&format!("{mib} MiB"), "3072"]);
    }
    let r = bt86(
        dir.path(),
        &["run", "--memory", "lots", "--kernel", "hello"],
    );
    assert_user_error(&r, &["lots"]);
}

#[test]
fn modules_that_do_not_fit_ask_for_more_memory() {
    let dir = tempfile::tempdir().unwrap();
    hello(dir.path());
    std::fs::write(dir.path().join("big"), vec![0u8; 3 << 20]).unwrap();
    let r = bt86(
        dir.path(),
        &[
            "run", "--memory", "2", "--kernel", "hello", "--module", "big x",
        ],
    );
    assert_user_error(&r, &["module 'big x'", "--memory"]);
}

#[test]
fn missing_module_and_initrd_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    hello(dir.path());
    let r = bt86(
        dir.path(),
        &["run", "--kernel", "hello", "--module", "gone.bin arg"],
    );
    assert_user_error(&r, &["module gone.bin", "No such file"]);
    let r = bt86(
        dir.path(),
        &["run", "--kernel", "hello", "--initrd", "gone.img"],
    );
    assert_user_error(&r, &["gone.img"]);
}

#[test]
fn bad_serial_backends_and_missing_boot_source_are_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    hello(dir.path());
    let r = bt86(
        dir.path(),
        &["run", "--kernel", "hello", "--serial", "tcp:4444"],
    );
    assert_user_error(&r, &["tcp:4444", "stdio"]);
    let r = bt86(
        dir.path(),
        &[
            "run",
            "--kernel",
            "hello",
            "--serial",
            "file:/nonexistent-dir/x",
        ],
    );
    assert_user_error(&r, &["/nonexistent-dir/x"]);
    let r = bt86(dir.path(), &["run"]);
    assert_user_error(&r, &["--kernel"]);
}

#[test]
fn oversized_firmware_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rom"), vec![0u8; 256 * 1024 + 1]).unwrap();
    let r = bt86(dir.path(), &["run", "--bios", "rom"]);
    assert_user_error(&r, &["firmware rom", "256"]);
}

#[test]
fn host_refusing_guest_memory_gets_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    hello(dir.path());
    // An address-space limit far below 3 GiB makes the host refuse the guest-memory mapping.
    let out = Command::new("prlimit")
        .arg("--as=1000000000")
        .arg(env!("CARGO_BIN_EXE_bt86"))
        .args(["run", "--memory", "3072", "--kernel", "hello"])
        .current_dir(dir.path())
        .output();
    let Ok(out) = out else {
        eprintln!("SKIPPED host refusal: prlimit (util-linux) is not installed");
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{stderr}");
    assert!(stderr.contains("refused to provide 3072 MiB"), "{stderr}");
    assert!(stderr.contains("smaller --memory"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn trace_needs_the_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    hello(dir.path());
    let r = bt86(
        dir.path(),
        &["run", "--engine", "kvm", "--trace", "--kernel", "hello"],
    );
    assert_user_error(&r, &["--trace", "interp"]);
}

/// Kernel files damaged at random (bytes of the ELF and multiboot headers and of the first code
/// overwritten, from a fixed seed): each is refused with status 2 and a message that names the
/// file, or boots and ends as a guest may. bt86 never panics on them.
#[test]
fn damaged_kernel_files_are_refused_by_name_or_run_and_never_crash_bt86() {
    use bt86_tests::runner::run_with_timeout;
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let image = hello(dir.path());
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut refused = 0;
    for i in 0..150 {
        let mut damaged = image.clone();
        for _ in 0..1 + next() % 6 {
            let at = (next() as usize) % damaged.len().min(0x1100);
            damaged[at] = next() as u8;
        }
        let name = format!("damaged-{i}.elf");
        std::fs::write(dir.path().join(&name), &damaged).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bt86"));
        cmd.current_dir(dir.path()).args([
            "run", "--kernel", &name, "--engine", "bt", "--serial", "none", "--memory", "32",
        ]);
        let o = run_with_timeout(cmd, Duration::from_secs(10));
        assert!(!o.stderr.contains("panicked"), "{name}: {}", o.stderr);
        match o.status {
            Some(2) => {
                assert!(o.stderr.contains(&name), "{name} not named: {}", o.stderr);
                refused += 1;
            }
            // Power-off, triple fault, halt, the guest's own exit status.
            Some(s) if s == 0 || s == 4 || s == 6 || s & 1 == 1 => {}
            Some(8) if o.stderr.contains("cannot execute") => {}
            None if o.timed_out => {}
            s => panic!("{name}: status {s:?}: {}", o.stderr),
        }
    }
    assert!(refused > 0, "no damaged file was refused");
}
