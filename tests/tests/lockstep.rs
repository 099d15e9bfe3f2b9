//! Lockstep mode (`bt86 run --engine bt --lockstep interp`): kit kernels run to the end with
//! bt checked against the interpreter after every step and no divergence, with the same output
//! and status as the interpreter alone; and a wrong bt result, planted by the mode's self-test
//! (`BT86_LOCKSTEP_CORRUPT`), is caught at that step with both states printed.

use bt86_tests::runner::{DEFAULT_TIMEOUT, write_kit_kernel};
use bt86_tests::runner::{Guest, Outcome, bt86_command, run_bt86, run_with_timeout};

/// bt86's status for a lockstep divergence (vmapp's `status::DIVERGED`).
const DIVERGED: i32 = 12;

fn lockstep(guest: &Guest, corrupt_at: Option<u64>) -> Outcome {
    let mut cmd = bt86_command(guest, "bt", &["--lockstep", "interp", "--stats"]);
    match corrupt_at {
        Some(n) => cmd.env("BT86_LOCKSTEP_CORRUPT", n.to_string()),
        None => cmd.env_remove("BT86_LOCKSTEP_CORRUPT"),
    };
    run_with_timeout(cmd, DEFAULT_TIMEOUT)
}

/// The value of counter `name` in `--stats` output.
fn counter(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.trim().strip_prefix(name))
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or_else(|| panic!("no counter {name:?} in:\n{stats}"))
}

#[test]
fn kit_kernels_run_in_lockstep_without_divergence() {
    // Flat code, self-modifying code, paging with shadow windows, timer interrupts, the
    // sensitive instructions at CPL 0 and 3 (callouts), inline string instructions faulting
    // part-way, system calls at every CPL, an instruction across two pages, inline STI while
    // the timer runs.
    for kernel in [
        "hello",
        "smc",
        "shadow-maps",
        "timer",
        "sensitive",
        "string-edges",
        "syscalls",
        "page-straddle",
        "segment-bases",
        "segment-reloads",
        "spin-timer",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let name = write_kit_kernel(dir.path(), kernel);
        let guest = Guest::kernel(dir.path(), &name);
        let reference = run_bt86(&guest, "interp", &[]);
        let ours = lockstep(&guest, None);
        assert!(
            !ours.timed_out && !reference.timed_out,
            "{kernel}: timed out"
        );
        assert!(
            !ours.stderr.contains("diverge"),
            "{kernel}: lockstep reported a divergence:\n{}",
            ours.stderr
        );
        assert_eq!(
            ours.serial_text(),
            reference.serial_text(),
            "{kernel}: serial output differs (stderr: {})",
            ours.stderr
        );
        assert_eq!(ours.status, reference.status, "{kernel}: exit status");
        // It really ran translated code, in many checked steps.
        assert!(counter(&ours.stderr, "lockstep steps") > 20, "{kernel}");
        assert!(counter(&ours.stderr, "translated executed") > 0, "{kernel}");
    }
}

#[test]
fn a_wrong_bt_result_is_caught_at_its_step_with_both_states() {
    let dir = tempfile::tempdir().unwrap();
    let name = write_kit_kernel(dir.path(), "smc");
    let guest = Guest::kernel(dir.path(), &name);
    let clean = lockstep(&guest, None);
    let steps = counter(&clean.stderr, "lockstep steps");
    let at = steps / 2;
    assert!(at > 1, "smc runs {steps} steps");

    let out = lockstep(&guest, Some(at));
    assert!(!out.timed_out);
    assert_eq!(out.status, Some(DIVERGED), "stderr:\n{}", out.stderr);
    let report = &out.stderr;
    assert!(report.len() < 8000, "the report stays short:\n{report}");
    assert!(
        report.contains(&format!("diverge at step {at} ")),
        "the report names the step:\n{report}"
    );
    // The step's guest instructions, with their addresses (CS 0008 in the kit's GDT).
    let listing: Vec<_> = report
        .lines()
        .skip_while(|l| !l.contains("as interp executed them"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect();
    assert!(
        !listing.is_empty() && listing.iter().all(|l| l.trim_start().starts_with("0008:")),
        "instruction listing:\n{report}"
    );
    // Both states, EAX differing by exactly the flipped bit, nothing else.
    let eax = report
        .lines()
        .find(|l| l.trim_start().starts_with("EAX "))
        .unwrap_or_else(|| panic!("no EAX row:\n{report}"));
    let cols: Vec<_> = eax.split_whitespace().collect();
    let (bt, interp) = (
        u32::from_str_radix(cols[1], 16).unwrap(),
        u32::from_str_radix(cols[2], 16).unwrap(),
    );
    assert_eq!(bt ^ interp, 1, "{eax}");
    assert!(eax.contains("<- differs"), "{eax}");
    for row in ["EIP ", "EFLAGS ", "CS ", "SS ", "CR0 ", "CR3 "] {
        let line = report
            .lines()
            .find(|l| l.trim_start().starts_with(row))
            .unwrap_or_else(|| panic!("no {row}row:\n{report}"));
        assert!(!line.contains("differs"), "{line}");
    }
    assert!(report.contains("differing: EAX\n"), "{report}");
}

#[test]
fn lockstep_checks_bt_only() {
    let dir = tempfile::tempdir().unwrap();
    let name = write_kit_kernel(dir.path(), "hello");
    let guest = Guest::kernel(dir.path(), &name);
    let out = run_bt86(&guest, "interp", &["--lockstep", "interp"]);
    assert_eq!(out.status, Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("--lockstep interp checks the bt engine")
    );
}
