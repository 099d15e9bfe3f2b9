//! The binary translator's own kernels: self-modifying code, precise faults inside translated
//! code, isolation, and interrupts while translated code spins. Each runs under QEMU and every
//! bt86 engine that can run it, with the same serial output and exit status; `--stats` then
//! shows the translator really took the path each kernel is about.

use bt86_tests::runner::{
    Outcome, compare_kit_kernel, interrupt_engines, protected_mode_engines, stat,
};

/// Runs `kernel` under QEMU and on `engines`; returns bt's `--stats` run.
fn compare(kernel: &str, engines: &[&str]) -> Outcome {
    assert!(engines.contains(&"bt"), "bt is always available");
    compare_kit_kernel(kernel, engines)
}

fn translated_and_safe(o: &Outcome) {
    assert!(stat(o, "translated executed") > 0, "{}", o.stderr);
    assert_eq!(
        stat(o, "SUD fired"),
        0,
        "no system call left translated code"
    );
}

#[test]
fn self_modifying_code_runs_its_new_bytes() {
    let o = compare("smc", &protected_mode_engines());
    assert_eq!(
        o.serial_text(),
        "next_instruction=00000042\nfunction=11111111\nfunction=44444444\n\
         function=66666666\ncopied=33333333\ncopied=44444444\nloop_sum=0000000f\n"
    );
    translated_and_safe(&o);
    // Translated code wrote its own pages (write faults) and the interpreter's rep movsd wrote
    // a translated buffer (the code-page bitmap): both invalidated units.
    assert!(stat(&o, "code-page writes") >= 4, "{}", o.stderr);
    assert!(stat(&o, "units invalidated") >= 5, "{}", o.stderr);
}

#[test]
fn faults_inside_translated_code_are_precise() {
    let o = compare("precise-faults", &protected_mode_engines());
    // Each handler saw the state of its faulting instruction (Intel SDM: faults report the
    // faulting instruction and the state before it; QEMU agrees).
    let text = o.serial_text();
    assert!(
        text.starts_with(
            "vector=00 eip=+00000264 esi=11111112 edi=22222222 esp=00113ffc\nafter_div=000000ab\n"
        ),
        "{text}"
    );
    assert!(text.ends_with("middle=00000007\n"), "{text}");
    translated_and_safe(&o);
    assert_eq!(
        stat(&o, "signal SIGFPE"),
        2,
        "both #DE came from translated code"
    );
}

#[test]
fn guest_addresses_wrap_inside_the_window() {
    let o = compare("isolation", &protected_mode_engines());
    assert_eq!(
        o.serial_text(),
        "wrap_base_disp=c0ffee00\nwrap_index=c0ffee00\nwrap_store=0000beef\n\
         stack_at_0=00005a5a\nvector=80\nvector=0d\nsurvived\n"
    );
    translated_and_safe(&o);
    // The wrapped accesses stayed in guest RAM: no fault needed emulating.
    assert_eq!(stat(&o, "exit: fault"), 0, "{}", o.stderr);
}

#[test]
fn a_spinning_guest_still_takes_timer_interrupts() {
    let o = compare("spin-timer", &interrupt_engines());
    assert_eq!(o.serial_text(), "ticks=0000000a\n");
    translated_and_safe(&o);
    assert!(stat(&o, "exit: time slice") > 0, "{}", o.stderr);
}

#[test]
fn the_17_sensitive_instructions_match_qemu_at_cpl0_and_cpl3() {
    let o = compare("sensitive", &protected_mode_engines());
    let text = o.serial_text();
    for tag in ["cpl0", "cpl3"] {
        // SGDT/SIDT/SLDT/STR/SMSW show the guest's own tables and CR0, not the host's.
        assert!(
            text.contains(&format!("{tag} sldt=00000030 str=00000028 smsw=00000011")),
            "{text}"
        );
        assert!(
            text.contains(&format!("{tag} back from the call gate")),
            "{text}"
        );
    }
    // POPF cannot change IF or IOPL at CPL 3 (IOPL 0), and does at CPL 0.
    assert!(
        text.contains("cpl0 popf 0x3202 -> eflags=00003202"),
        "{text}"
    );
    assert!(
        text.contains("cpl3 popf 0x3202 -> eflags=00000002"),
        "{text}"
    );
    // LAR sees the DPL-0 segments at CPL 0 only.
    assert!(
        text.contains("cpl0 sel 08: lar zf=00000001=00c09b00"),
        "{text}"
    );
    assert!(
        text.contains("cpl3 sel 08: lar zf=00000000=deadbeef"),
        "{text}"
    );
    // Loading a DPL-0 data segment and jumping to DPL-0 code fault at CPL 3.
    assert!(
        text.contains("cpl3 pop ds<-0x10: fault error=00000010 ok"),
        "{text}"
    );
    assert!(
        text.contains("cpl3 jmp far 0x08: fault error=00000008 done"),
        "{text}"
    );
    assert!(text.contains("call gate: cs=00000008 caller=0000001b param=12345678"));
    assert_eq!(o.status, Some(59));
    translated_and_safe(&o);
    // None of them ran natively: each is a callout to the interpreter's handler.
    for m in [
        "sgdt", "sidt", "sldt", "smsw", "str", "lar", "lsl", "verr", "verw", "popfd", "pushfd",
    ] {
        assert!(stat(&o, &format!("callout {m} ")) > 0, "{m}: {}", o.stderr);
    }
}
