//! The shadow MMU: paged guests on the bt engine. Each kit kernel runs under QEMU (the
//! reference) and every bt86 engine that can run it, with the same serial output and exit
//! status; `--stats` then shows bt translated the guest (not everything handed to the
//! interpreter) and took the shadow-MMU path the kernel is about.

use bt86_guests::nano;
use bt86_tests::runner::{
    Guest, Outcome, compare_kit_kernel, protected_mode_engines, run_bt86, stat, write_kit_kernel,
};

/// Runs `kernel` under QEMU and on every protected-mode engine; returns bt's `--stats` run.
fn compare(kernel: &str) -> Outcome {
    compare_kit_kernel(kernel, &protected_mode_engines())
}

/// bt ran the paged guest mostly as translated code, through its shadow windows.
fn translated_paged(o: &Outcome) {
    assert!(
        stat(o, "translated executed") > stat(o, "interpreted"),
        "bt translated most of the guest: {}",
        o.stderr
    );
    assert!(stat(o, "hidden faults") > 0, "{}", o.stderr);
    assert_eq!(stat(o, "SUD fired"), 0);
}

#[test]
fn mappings_code_keying_live_edits_wp_and_copy_on_write_match_qemu() {
    let o = compare("shadow-maps");
    let text = o.serial_text();
    for line in [
        // Frame 7 - i at HI + i pages holds 0xF000 + 7 - i: sum of (0xF007 - i) * (i + 1).
        "reversed-checksum=0021c054",
        "write-through-hi-read-identity=00003333",
        // One linear address, two frames of code: the unit found is the one for the frame
        // mapped now; a frame rewritten through another alias runs its new bytes.
        "code-frame-20=0000a0a0",
        "code-frame-21=0000b0b0",
        "code-alias-after-rewrite=0000c0c0",
        "code-frame-20-again=0000c0c0",
        // 300 edits alternating two frames (150 each of 1 and 0x100), INVLPG after each.
        "edited-sum=00009696",
        "frame30-writes=00000096",
        "4m-repointed=00000000",
        "4m-back=44445555",
        // WP=0: a supervisor write to a read-only page succeeds and sets D; WP=1 faults.
        "wp0-write=00002222",
        "wp0-pte.ad=00000061",
        "pf cr2=c03f0000 error=00000003",
        "wp1-after-fault=00002222",
        // Copy-on-write by the guest's handler: four faults, the shared frame untouched, the
        // new PTE present, writable, accessed and dirty.
        "pf cr2=c0303004 error=00000003",
        "shared-frame-untouched=00000000",
        "cow-pte=00000063",
        // A on read pages, A and D on written ones, neither on a mapped page never touched.
        "read-pte.ad=00000020",
        "written-pte.ad=00000060",
        "untouched-pte.ad=00000000",
        "code-pte.ad=00000020",
        "pf-count=00000005",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    assert_eq!(o.status, Some(0x33));
    translated_paged(&o);
    assert!(stat(&o, "true faults") >= 5, "{}", o.stderr);
    assert!(stat(&o, "traced writes") > 0, "{}", o.stderr);
    assert!(stat(&o, "shadow entries dropped") > 0, "{}", o.stderr);
    // The instruction that edited the table 300 times was retranslated as a callout after a
    // few traced-write faults.
    assert!(stat(&o, "retranslated to emulate") >= 1, "{}", o.stderr);
    assert!(stat(&o, "code-page writes") >= 1, "{}", o.stderr);
}

#[test]
fn many_address_spaces_and_pae_match_qemu() {
    let o = compare("shadow-spaces");
    let text = o.serial_text();
    for line in [
        // 3 rounds over 24 spaces reading frame i (= i + 1): 3 * 300.
        "spaces-sum=00000384",
        "counters-total=00000048",
        "frame0-counter=00000003",
        // Still in the last space after a global flush: its frame holds 24.
        "after-pge-toggle=00000018",
        // PAE: 2 * (1 + 2 + 3 + 4) from 4 KiB pages, 0x100 * (1 + 2 + 3 + 4) from 2 MiB pages.
        "pae-sum=00000a14",
        "pae-2m.ad=00000060",
        // A changed PDPT entry takes effect at the next CR3 load (SDM vol. 3, 4.4.1).
        "pdpte-reloaded=00000002",
        "pf cr2=c0400000 error=00000000",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    assert_eq!(o.status, Some(0x35));
    translated_paged(&o);
    // More address spaces than windows: windows were recycled, never more than the budget.
    assert!(stat(&o, "windows recycled") > 0, "{}", o.stderr);
    assert!(
        stat(&o, "windows created") <= stat(&o, "window budget"),
        "{}",
        o.stderr
    );
}

#[test]
fn a_ring_3_process_meets_protection_and_copy_on_write_as_on_qemu() {
    let o = compare("shadow-user");
    let text = o.serial_text();
    for line in [
        // Error codes: P | W | U for a user write to a read-only page, P | U for a user read of a
        // supervisor page (4 KiB or 4 MiB), P | W | U for a user write to it.
        "user write to a read-only page: pf cr2=40001000 error=00000007",
        "user read of a supervisor page: pf cr2=40002000 error=00000005",
        "user write to a supervisor page: pf cr2=40002000 error=00000007",
        "user read of a supervisor 4 MiB page: pf cr2=00400123 error=00000005",
        "pf cr2=40006004 error=00000007",
        "kernel-write-wp0=00005a5a",
        "shared-untouched=00000000",
        // D | A | U | RW | P for the written user page; D | A | U | P for the read-only one
        // (the kernel's WP=0 write set D); neither A nor D on the supervisor page the process
        // only faulted on (a faulting walk sets no bits).
        "pte0=00000067",
        "pte1=00000065",
        "pte2=00000003",
        "pf-count=00000008",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    assert_eq!(o.status, Some(0x37));
    translated_paged(&o);
    assert!(stat(&o, "true faults") >= 4, "{}", o.stderr);
}

#[test]
fn the_paging_kit_kernels_are_translated_on_bt() {
    for kernel in ["paging", "rings"] {
        let dir = tempfile::tempdir().unwrap();
        let name = write_kit_kernel(dir.path(), kernel);
        let o = run_bt86(&Guest::kernel(dir.path(), &name), "bt", &["--stats"]);
        assert!(!o.timed_out, "{kernel}");
        translated_paged(&o);
    }
}

#[test]
fn every_nano_kernel_runs_translated_on_bt() {
    let dir = tempfile::tempdir().unwrap();
    for w in nano::WORKLOADS {
        let image = nano::build(w, 2000).unwrap();
        let name = format!("{}.elf", w.name);
        std::fs::write(dir.path().join(&name), image).unwrap();
        let o = run_bt86(&Guest::kernel(dir.path(), &name), "bt", &["--stats"]);
        assert!(!o.timed_out, "{}", w.name);
        let m = nano::parse_output(w.name, &o.serial_text());
        assert!(
            m.is_some_and(|m| m.ops == 2000),
            "{}: {} {}",
            w.name,
            o.serial_text(),
            o.stderr
        );
        assert!(
            stat(&o, "translated executed") > 0,
            "{}: {}",
            w.name,
            o.stderr
        );
        assert_eq!(stat(&o, "SUD fired"), 0);
        if w.name == "pgfault" {
            // Every iteration takes a #PF (2000 timed, 200 warming up); the translated
            // iterations find theirs as true faults in a window.
            assert!(stat(&o, "exceptions raised") >= 2200, "{}", o.stderr);
            assert!(stat(&o, "true faults") > 1000, "{}", o.stderr);
        }
    }
}
