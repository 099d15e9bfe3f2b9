//! The kvm engine on the kit's kernels: flat 32-bit code, port I/O, real mode, and the ways a run
//! ends. On bt86's build machines /dev/kvm is the PVM module, which runs exactly these.

use bt86_tests::runner::{Guest, Outcome, kvm_unavailable, run_bt86, skip_if, write_kit_kernel};

fn run(kernel: &str, extra: &[&str]) -> Option<Outcome> {
    run_with_memory(kernel, 256, extra)
}

fn run_with_memory(kernel: &str, memory_mib: u64, extra: &[&str]) -> Option<Outcome> {
    if skip_if(kernel, kvm_unavailable()) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let name = write_kit_kernel(dir.path(), kernel);
    let mut guest = if kernel == "reset-rom" {
        Guest::bios(dir.path(), &name)
    } else {
        Guest::kernel(dir.path(), &name)
    };
    guest.memory_mib = memory_mib;
    Some(run_bt86(&guest, "kvm", extra))
}

#[test]
fn hello_prints_and_exits_with_status_7() {
    let Some(o) = run("hello", &[]) else { return };
    assert_eq!(o.serial_text(), "hello\n", "{o:?}");
    assert_eq!(o.status, Some(7), "{o:?}");
}

#[test]
fn aout_kludge_kernel_runs() {
    let Some(o) = run("hello-aout", &[]) else {
        return;
    };
    assert_eq!(
        (o.serial_text().as_str(), o.status),
        ("hello\n", Some(7)),
        "{o:?}"
    );
}

#[test]
fn triple_fault_stops_the_vm_with_status_4_and_a_reason() {
    let Some(o) = run("triple-fault", &[]) else {
        return;
    };
    assert!(!o.timed_out, "a triple fault must not hang: {o:?}");
    assert_eq!(o.status, Some(4), "{o:?}");
    assert_eq!(o.serial_text(), "about to triple fault\n");
    assert!(o.stderr.contains("triple-faulted"), "{}", o.stderr);
    assert_eq!(o.stderr.lines().count(), 1, "one-line reason: {}", o.stderr);
}

#[test]
fn halt_with_interrupts_disabled_stops_with_status_6() {
    let Some(o) = run("halt", &[]) else { return };
    assert!(!o.timed_out, "{o:?}");
    assert_eq!(o.status, Some(6), "{o:?}");
    assert!(o.stderr.contains("interrupts are disabled"), "{}", o.stderr);
}

#[test]
fn acpi_power_off_exits_0_at_once() {
    let Some(o) = run("poweroff", &[]) else {
        return;
    };
    assert_eq!(o.status, Some(0), "{o:?}");
    assert_eq!(
        o.serial_text(),
        "powering off\n",
        "nothing runs after the power-off write"
    );
}

#[test]
fn real_mode_firmware_runs_from_the_reset_vector() {
    let Some(o) = run("reset-rom", &[]) else {
        return;
    };
    assert_eq!(o.serial_text(), "real mode at the reset vector\n", "{o:?}");
    assert_eq!(o.status, Some(11), "{o:?}");
}

#[test]
fn fw_cfg_reports_this_vms_ram_and_cpus() {
    let Some(o) = run_with_memory("fw-cfg", 96, &[]) else {
        return;
    };
    let text = o.serial_text();
    assert!(text.contains("signature.lo=554d4551"), "{text}"); // "QEMU"
    assert!(
        text.contains("ram_size.lo=06000000\nram_size.hi=00000000"),
        "{text}"
    );
    assert!(text.contains("nb_cpus.lo=00000001"), "{text}");
    assert_eq!(o.status, Some(0x23), "{o:?}");
}

#[test]
fn stats_count_exits_and_device_accesses() {
    let Some(o) = run("hello", &["--stats"]) else {
        return;
    };
    assert_eq!(o.status, Some(7));
    let line = |name: &str| {
        o.stderr
            .lines()
            .find(|l| l.contains(name))
            .unwrap_or_else(|| panic!("no {name} line in {}", o.stderr))
            .to_string()
    };
    assert!(line("engine kvm").contains("statistics"));
    // "hello\n" is 6 bytes: 6 THR writes, and at least 6 LSR polls before them.
    let uart = line("uart-com1");
    let counts: Vec<u64> = uart
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(counts.last(), Some(&6), "{uart}");
    assert!(
        line("isa-debug-exit").ends_with("0 / 1"),
        "{}",
        line("isa-debug-exit")
    );
}

#[test]
fn serial_output_can_go_to_a_file() {
    if skip_if("serial file", kvm_unavailable()) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let name = write_kit_kernel(dir.path(), "hello");
    let log = dir.path().join("serial.log");
    let spec = format!("file:{}", log.display());
    let o = run_bt86(
        &Guest::kernel(dir.path(), &name),
        "kvm",
        &["--serial", &spec],
    );
    assert_eq!(o.status, Some(7), "{o:?}");
    assert!(o.serial.is_empty(), "nothing on stdout");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\n");
}

#[test]
fn accesses_to_nothing_and_to_rom_are_harmless() {
    let Some(o) = run("mmio-nowhere", &["--stats"]) else {
        return;
    };
    assert_eq!(o.status, Some(0x25), "{o:?}");
    // Unbacked addresses read as all ones and ignore writes; the BIOS area keeps its bytes
    // (the boot GDT's code descriptor, low dword 0x0000FFFF) at both of its addresses.
    let expected = "hole.before=ffffffff\nhole.after=ffffffff\n\
                    vga.before=ffffffff\nvga.after=ffffffff\n\
                    rom_low.before=0000ffff\nrom_low.after=0000ffff\n\
                    rom_high.before=0000ffff\nrom_high.after=0000ffff\n\
                    port=ffffffff\n";
    assert_eq!(o.serial_text(), expected);
    assert!(
        o.stderr.contains("unclaimed ports      1 / 0"),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains("unclaimed MMIO       4 / 4"),
        "{}",
        o.stderr
    );
}

#[test]
fn a_wild_jump_stops_the_vm_with_a_reason() {
    let Some(o) = run("wild-jump", &[]) else {
        return;
    };
    assert!(!o.timed_out, "{o:?}");
    // Real hardware would fetch all-ones bytes and triple-fault; KVM refuses to execute from
    // MMIO. Either way the run ends with a guest-caused status and one line saying why.
    assert!(matches!(o.status, Some(4) | Some(8)), "{o:?}");
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    assert!(o.stderr.contains("d0000000"), "{}", o.stderr);
}
