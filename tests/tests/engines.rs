//! Every engine on the kit's kernels: flat 32-bit code, port I/O, real mode, and the ways a run
//! ends. Each test runs on every engine this machine has — the interpreter always, kvm where
//! /dev/kvm opens (on bt86's build machines that is the PVM module, which runs exactly these) —
//! and expects the same result from each.

use bt86_tests::runner::{
    Guest, Outcome, engines, interrupt_engines, run_bt86, stat, write_kit_kernel,
};

fn run_on(engine: &str, kernel: &str, memory_mib: u64, extra: &[&str]) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let name = write_kit_kernel(dir.path(), kernel);
    let mut guest = if kernel.ends_with("-rom") {
        Guest::bios(dir.path(), &name)
    } else {
        Guest::kernel(dir.path(), &name)
    };
    guest.memory_mib = memory_mib;
    run_bt86(&guest, engine, extra)
}

/// Runs the kit kernel on every available engine and hands each outcome to `check`.
fn each_engine(kernel: &str, memory_mib: u64, extra: &[&str], check: impl Fn(&str, &Outcome)) {
    for engine in engines() {
        check(engine, &run_on(engine, kernel, memory_mib, extra));
    }
}

#[test]
fn hello_prints_and_exits_with_status_7() {
    each_engine("hello", 256, &[], |e, o| {
        assert_eq!(o.serial_text(), "hello\n", "{e}: {o:?}");
        assert_eq!(o.status, Some(7), "{e}: {o:?}");
    });
}

#[test]
fn aout_kludge_kernel_runs() {
    each_engine("hello-aout", 256, &[], |e, o| {
        assert_eq!(
            (o.serial_text().as_str(), o.status),
            ("hello\n", Some(7)),
            "{e}: {o:?}"
        );
    });
}

#[test]
fn triple_fault_stops_the_vm_with_status_4_and_a_reason() {
    each_engine("triple-fault", 256, &[], |e, o| {
        assert!(!o.timed_out, "{e}: a triple fault must not hang: {o:?}");
        assert_eq!(o.status, Some(4), "{e}: {o:?}");
        assert_eq!(o.serial_text(), "about to triple fault\n");
        assert!(o.stderr.contains("triple-faulted"), "{e}: {}", o.stderr);
        assert_eq!(
            o.stderr.lines().count(),
            1,
            "{e}: one-line reason: {}",
            o.stderr
        );
    });
}

#[test]
fn halt_with_interrupts_disabled_stops_with_status_6() {
    each_engine("halt", 256, &[], |e, o| {
        assert!(!o.timed_out, "{e}: {o:?}");
        assert_eq!(o.status, Some(6), "{e}: {o:?}");
        assert!(
            o.stderr.contains("interrupts are disabled"),
            "{e}: {}",
            o.stderr
        );
    });
}

#[test]
fn acpi_power_off_exits_0_at_once() {
    each_engine("poweroff", 256, &[], |e, o| {
        assert_eq!(o.status, Some(0), "{e}: {o:?}");
        assert_eq!(
            o.serial_text(),
            "powering off\n",
            "{e}: nothing runs after power-off"
        );
    });
}

#[test]
fn real_mode_firmware_runs_from_the_reset_vector() {
    each_engine("reset-rom", 256, &[], |e, o| {
        assert_eq!(
            o.serial_text(),
            "real mode at the reset vector\n",
            "{e}: {o:?}"
        );
        assert_eq!(o.status, Some(11), "{e}: {o:?}");
    });
}

#[test]
fn real_mode_timer_interrupts_arrive_halted_and_spinning() {
    // On kvm this needs interrupt injection and the periodic kick (the spinning guest never
    // exits on its own). Not compared with QEMU: its CPU has a local APIC, and firmware that
    // never programs LINT0 for virtual-wire mode (as this one, unlike a BIOS) gets no 8259
    // interrupts there; bt86's CPU has no local APIC yet, so the 8259 drives INTR directly.
    each_engine("timer-rom", 256, &[], |e, o| {
        assert_eq!(
            o.serial_text(),
            "5 ticks while halted\n5 more while spinning\n",
            "{e}: {o:?}"
        );
        assert_eq!(o.status, Some(13), "{e}: {o:?}");
    });
}

#[test]
fn fw_cfg_reports_this_vms_ram_and_cpus() {
    each_engine("fw-cfg", 96, &[], |e, o| {
        let text = o.serial_text();
        assert!(text.contains("signature.lo=554d4551"), "{e}: {text}"); // "QEMU"
        assert!(
            text.contains("ram_size.lo=06000000\nram_size.hi=00000000"),
            "{e}: {text}"
        );
        assert!(text.contains("nb_cpus.lo=00000001"), "{e}: {text}");
        assert_eq!(o.status, Some(0x23), "{e}: {o:?}");
    });
}

#[test]
fn stats_count_exits_and_device_accesses() {
    each_engine("hello", 256, &["--stats"], |e, o| {
        assert_eq!(o.status, Some(7));
        let line = |name: &str| {
            o.stderr
                .lines()
                .find(|l| l.contains(name))
                .unwrap_or_else(|| panic!("{e}: no {name} line in {}", o.stderr))
                .to_string()
        };
        assert!(line(&format!("engine {e}")).contains("statistics"));
        // "hello\n" is 6 bytes: 6 THR writes, each after an LSR poll.
        assert!(
            line("uart-com1").ends_with("6 / 6"),
            "{e}: {}",
            line("uart-com1")
        );
        assert!(
            line("isa-debug-exit").ends_with("0 / 1"),
            "{e}: {}",
            o.stderr
        );
        if e != "kvm" {
            let n: u64 = line("guest instructions")
                .split_whitespace()
                .last()
                .and_then(|w| w.parse().ok())
                .expect("instruction count");
            assert!(
                n > 100,
                "{e}: the hello kernel runs more than 100 instructions: {n}"
            );
        }
    });
}

#[test]
fn serial_output_can_go_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let name = write_kit_kernel(dir.path(), "hello");
    let log = dir.path().join("serial.log");
    let spec = format!("file:{}", log.display());
    let o = run_bt86(
        &Guest::kernel(dir.path(), &name),
        "interp",
        &["--serial", &spec],
    );
    assert_eq!(o.status, Some(7), "{o:?}");
    assert!(o.serial.is_empty(), "nothing on stdout");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\n");
}

#[test]
fn accesses_to_nothing_and_to_rom_are_harmless() {
    each_engine("mmio-nowhere", 256, &["--stats"], |e, o| {
        assert_eq!(o.status, Some(0x25), "{e}: {o:?}");
        // Unbacked addresses read as all ones and ignore writes; the BIOS area keeps its bytes
        // (the boot GDT's code descriptor, low dword 0x0000FFFF) at both of its addresses.
        let expected = "hole.before=ffffffff\nhole.after=ffffffff\n\
                        vga.before=ffffffff\nvga.after=ffffffff\n\
                        rom_low.before=0000ffff\nrom_low.after=0000ffff\n\
                        rom_high.before=0000ffff\nrom_high.after=0000ffff\n\
                        port=ffffffff\n";
        assert_eq!(o.serial_text(), expected, "{e}");
        assert!(
            o.stderr.contains("unclaimed ports      1 / 0"),
            "{e}: {}",
            o.stderr
        );
        assert!(
            o.stderr.contains("unclaimed MMIO       4 / 4"),
            "{e}: {}",
            o.stderr
        );
    });
}

#[test]
fn a_wild_jump_stops_the_vm_with_a_reason() {
    each_engine("wild-jump", 256, &[], |e, o| {
        assert!(!o.timed_out, "{e}: {o:?}");
        // Real hardware fetches all-ones bytes (FF FF is invalid: #UD, no IDT, triple fault),
        // as the interpreter does; KVM refuses to execute from MMIO. Either way the run ends
        // with a guest-caused status and one line saying why.
        let expected = if e != "kvm" {
            Some(4)
        } else {
            o.status.filter(|s| *s == 4 || *s == 8)
        };
        assert_eq!(o.status, expected, "{e}: {o:?}");
        assert!(o.status.is_some());
        assert_eq!(o.stderr.lines().count(), 1, "{e}: {}", o.stderr);
        assert!(o.stderr.contains("d0000000"), "{e}: {}", o.stderr);
    });
}

#[test]
fn interp_traces_each_instruction_with_the_registers_it_changed() {
    let o = run_on("interp", "hello", 256, &["--trace"]);
    assert_eq!(o.status, Some(7), "{}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().collect();
    // The entry stub's first store, then the exit: AL=3 written to port 0xF4.
    assert!(
        lines[0].starts_with("0008:0010000c  mov [0x114000],eax"),
        "{}",
        lines[0]
    );
    let exit = lines
        .iter()
        .position(|l| l.contains("out 0xF4,al"))
        .expect("exit traced");
    assert!(
        lines[exit - 1].ends_with("eax=2badb003"),
        "{}",
        lines[exit - 1]
    );
    assert!(lines.len() > 100, "every instruction is logged");
}

#[test]
fn halted_guests_sleep_until_their_timer_interrupts() {
    for e in interrupt_engines() {
        let o = run_on(e, "timer", 256, &["--stats"]);
        assert_eq!(o.status, Some(0x33), "{e}: {}", o.stderr);
        // The kernel stops after the tenth tick with interrupts off: exactly ten were
        // injected, each ending a HLT.
        assert!(
            o.stderr.contains("interrupts           10 injected"),
            "{e}: {}",
            o.stderr
        );
        assert!(o.stderr.contains("halt 10,"), "{e}: {}", o.stderr);
        // Nothing wakes the halted VM but the guest's own timer: no time slices or kicks
        // while it sleeps (a 1 ms slice signal left armed would add ~100 wake-ups to these ten
        // 10 ms sleeps). Each sleep is one voluntary switch; a few more may come from the
        // host's own blocking (console writes, thread start-up).
        let (sleeps, woken) = (stat(&o, "halted sleeps"), stat(&o, "host switches vol"));
        assert!(sleeps >= 10, "{e}: {}", o.stderr);
        assert!(
            woken <= sleeps + 5,
            "{e}: {woken} host wake-ups for {sleeps} halted sleeps:\n{}",
            o.stderr
        );
    }
}

#[test]
fn misaligned_accesses_at_cpl3_raise_alignment_check_as_the_host_cpu_does() {
    use vmdriver::fpu::{FxImage, fx};
    use vmdriver::native::{CODE_ADDR, DATA_ADDR, NativeEnd, run_native};
    // The host decides: Linux runs user space with CR0.AM set, so a 32-bit snippet that sets
    // EFLAGS.AC and reads a misaligned doubleword takes #AC (vector 17) on the real CPU. (QEMU's
    // TCG does not model alignment checking, so the `alignment` kernel is checked against the
    // SDM and this run, not against QEMU.)
    let mut a = iced_x86::code_asm::CodeAssembler::new(32).unwrap();
    {
        use iced_x86::code_asm::*;
        a.pushfd().unwrap();
        a.or(dword_ptr(esp), 0x4_0000u32).unwrap();
        a.popfd().unwrap();
        a.mov(eax, dword_ptr(DATA_ADDR + 1)).unwrap();
    }
    let code = a.assemble(u64::from(CODE_ADDR)).unwrap();
    let mut image = FxImage::default();
    image.0[fx::FCW..fx::FCW + 2].copy_from_slice(&0x037Fu16.to_le_bytes());
    image.0[fx::MXCSR..fx::MXCSR + 4].copy_from_slice(&0x1F80u32.to_le_bytes());
    let gpr = [0, 0, 0, 0, DATA_ADDR + 0x100, 0, 0, 0];
    // The sandbox reports #AC as vector 17, or, since Linux delivers the SIGBUS with AC still
    // set (so the handler itself faults), as a child killed by SIGBUS: either way the host CPU
    // raised #AC; a completed run would mean it did not.
    match run_native(&code, gpr, 0, &image, &[0; 0x100]) {
        Ok(native) => assert_eq!(native.end, NativeEnd::Exception(17), "{native:?}"),
        Err(e) => assert!(e.to_string().contains("signal 7"), "{e}"),
    }

    for e in bt86_tests::runner::protected_mode_engines() {
        let o = run_on(e, "alignment", 256, &[]);
        assert_eq!(
            o.serial_text(),
            "cpl0 misaligned dword: ok\ncpl3 AC clear, misaligned dword: ok\n\
             cpl3 aligned dword: ok\ncpl3 byte: ok\n\
             cpl3 misaligned word: #AC error=00000000 \n\
             cpl3 misaligned dword store: #AC error=00000000 \n\
             cpl3 misaligned stack push: #AC error=00000000 \ndone\n",
            "{e}: {o:?}"
        );
        assert_eq!(o.status, Some(61), "{e}: {o:?}");
    }
}
