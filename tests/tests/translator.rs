//! The binary translator's own kernels: self-modifying code, precise faults inside translated
//! code, isolation, and interrupts while translated code spins. Each runs under QEMU and every
//! bt86 engine that can run it, with the same serial output and exit status; `--stats` then
//! shows the translator really took the path each kernel is about.

use bt86_tests::runner::{
    Guest, Outcome, compare_kit_kernel, interrupt_engines, protected_mode_engines, run_bt86, stat,
    write_kit_kernel,
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
fn faults_inside_folded_push_runs_see_the_architectural_esp() {
    let o = compare("stack-faults", &protected_mode_engines());
    let text = o.serial_text();
    // The #PF of a push reports the push's own state: CR2 = ESP - 4, a user write to a
    // not-present page (error 6), and ESP as it was before the push (Intel SDM vol. 3 §6.5:
    // a fault's saved state is that before the faulting instruction; QEMU agrees), although
    // the translator had folded the run's earlier push into a pending delta.
    assert!(
        text.starts_with("pf cr2=50001ffc error=00000006 esp=50002000 eip=+"),
        "{text}"
    );
    let report = "esp-after-push-run=50002ff4\nebp-after-fault=50001ff8\n\
                  esp4-after-fault=000000d1\npop-ecx=000000bb\npop-edx=000000d1\n\
                  pop-ebx=0000005e\npop-esi=000000b2\npop-edi=000000d4\npop-eax=000000c3\n\
                  pop-ebp=000000b2\nesp-after-pop-run=50003004\npte1=00000067\n\
                  pte2=00000067\npte3=00000067\npf-count=00000001\n";
    assert!(text.ends_with(report), "{text}");
    assert_eq!(o.status, Some(0x49));
    translated_and_safe(&o);
    // The shadow MMU's first write to the clean page 2 (and the first touches) were hidden
    // faults inside translated runs.
    assert!(stat(&o, "hidden faults") >= 2, "{}", o.stderr);
    assert!(stat(&o, "ESP moves folded away") > 0, "{}", o.stderr);
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

#[test]
fn string_instructions_stop_with_the_exact_partial_progress() {
    let o = compare("string-edges", &protected_mode_engines());
    // QEMU agrees with the Intel SDM here: each iteration of a REP string instruction updates
    // ECX/ESI/EDI after its accesses, so a #PF leaves the count of iterations still to do.
    assert_eq!(
        o.serial_text(),
        "rep stosd up #PF err=00000002 cr2=00300000 ecx=fffffffb esi=00000000 edi=00300000\n\
         last dword=a1a1a1a1\n\
         rep stosd down #PF err=00000002 cr2=00300ffc ecx=7ffffffb esi=00000000 edi=00300ffc\n\
         lowest dword=b2b2b2b2\n\
         rep movsd from the hole #PF err=00000000 cr2=00300000 ecx=3ffffffe esi=00300000 edi=00280008\n\
         copied=a1a1a1a1\n\
         rep stosd off the top #PF err=00000002 cr2=00000000 ecx=0ffffffe esi=00300000 edi=00000000\n\
         top dword=c3c3c3c3\n\
         repne scasb #PF err=00000000 cr2=00300000 ecx=fffffeff esi=00300000 edi=00300000\n\
         repe cmpsd #PF err=00000000 cr2=00300000 ecx=fffffffb esi=00300000 edi=00300000\n\
         lodsb #PF err=00000000 cr2=00300000 ecx=00001234 esi=00300000 edi=00300000\n\
         rep movsb, ecx=0 no fault\n\
         overlap up movsb=23222100\n\
         overlap down movsd=23222120\n\
         memmove up movsd=23222120\n\
         repne scasb up ecx=00000043\n edi=00000021\n esi=00000000\n flags=00000044\n\
         repne scasb down ecx=00000029\n edi=00000004\n esi=0000003f\n flags=00000044\n\
         repe scasb up ecx=00000062\n edi=00000002\n esi=00000000\n flags=00000095\n\
         repe cmpsb up ecx=00000008\n edi=00000002\n esi=00000002\n flags=00000095\n\
         repne cmpsb up ecx=00000043\n edi=00000022\n esi=00000022\n flags=00000044\n\
         self-write 0=12345690\nself-write 1=deadbeef\nself-write 2=12345690\n"
    );
    translated_and_safe(&o);
    // The third self-write ran over a unit already translated.
    assert!(stat(&o, "units invalidated") >= 1, "{}", o.stderr);
}

#[test]
fn system_call_instructions_never_reach_the_host_at_any_cpl() {
    let o = compare("syscalls", &protected_mode_engines());
    let text = o.serial_text();
    assert!(
        text.starts_with("cpl0 before the MSRs: #GP err=00000000\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "cpl0: int80 from cs=00000008 int83 from cs=00000008 #UD err=00000000 \
             #UD err=00000000 sysenter to cs=00000008 back at ss=00000010\n"
        ),
        "{text}"
    );
    for (level, cs, ss) in [(1, 0x31, 0x39), (2, 0x42, 0x4A), (3, 0x1B, 0x23)] {
        let line = format!(
            "cpl{level}: int80 from cs={cs:08x} #GP err=0000041a #UD err=00000000 \
             #UD err=00000000 #GP err=00000000 sysenter to cs=00000008 back at ss={ss:08x}\n"
        );
        assert!(text.contains(&line), "{line} in {text}");
    }
    translated_and_safe(&o);
    for m in ["int", "syscall", "sysret", "sysenter", "sysexit"] {
        assert!(stat(&o, &format!("callout {m} ")) > 0, "{m}: {}", o.stderr);
    }
}

/// The `segment-edges` output. QEMU's TCG does not check data-segment limits, so the Intel SDM
/// decides (vol. 3, 5.3: the check precedes the access; expand-down segments with B=1 allow
/// offsets limit+1..0xFFFFFFFF): every engine must print exactly this.
const SEGMENT_EDGES: &str = "fs wrap load=c0ffee01\nfs wrap store=c0ffee02\n\
    es wrap rep stosd=c0ffee03\nds wrap load=c0ffee01\n\
    expand-down at 0x10000=0d0d0001\nexpand-down at 0xfffffffc=0d0d0002\n\
    expand-down at 0xfffc: #GP err=00000000 ecx=00000000 esi=00000000 edi=00000000\n\
    expand-down at 0xfffe: #GP err=00000000 ecx=00000000 esi=00000000 edi=00000000\n\
    below the limit, untouched=00000000\n\
    rep stosb past the limit: #GP err=00000000 ecx=00000010 esi=00000000 edi=00001000\n\
    dword across the limit: #GP err=00000000 ecx=00000010 esi=00000000 edi=00001000\n\
    last dword in the limit=77777777\nfirst dword past it=00000000\n";

#[test]
fn segment_bases_wrap_and_limits_hold() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let name = write_kit_kernel(dir.path(), "segment-edges");
    let guest = Guest::kernel(dir.path(), &name);
    for engine in protected_mode_engines() {
        let o = run_bt86(&guest, engine, &["--stats"]);
        assert_eq!(o.serial_text(), SEGMENT_EDGES, "{engine}: {}", o.stderr);
        assert_eq!(o.status, Some(0x27 * 2 + 1), "{engine}");
        if engine == "bt" {
            translated_and_safe(&o);
        }
    }
}

/// The `segment-bases` output (QEMU's, checked by hand: pattern sums, frame results, CR2 =
/// base + offset modulo 4 GiB), without the faulting EIPs (which `compare` checks against
/// QEMU).
const SEGMENT_BASES: &str = "sum ds flat=78787888\nsum ds based=f169e288\n\
    sum ds flat again=78787888\nframes ss based ds based=70005ae6\n  esp=000e4000\n\
    strings esi=0030008c\nstrings edi=00300054\ncmpsd/scasd equal=00000101\n\
    xlat and indirect call=00000115\ndest sum=841e2841\ndest 0x40=000000c0\n\
    wrap load=a2020203\nwrap lodsd=a4040405\nwrap sum=28296979\nwrap store=5ec00001\n\
    frames ss wrap ds flat=20005adc\n  esp=00214000\n\
    ds load: #PF err=00000000 cr2=00360014 ecx=0c0c0c0c esi=51515151 edi=d1d1d1d1 esp=000e4000\n\
    es stosd: #PF err=00000002 cr2=00360008 ecx=0c0c0c0c esi=51515151 edi=00340008 esp=000e4000\n\
    movsd to es: #PF err=00000002 cr2=00360ffc ecx=0c0c0c0c esi=00300000 edi=00340ffc esp=000e4000\n\
    after pushes: #PF err=00000000 cr2=00360010 ecx=0c0c0c0c esi=51515151 edi=d1d1d1d1 esp=000e3ff8\n\
    ebp through ss: #PF err=00000000 cr2=00360020 ecx=0c0c0c0c esi=51515151 edi=d1d1d1d1 esp=000e3ffc\n\
    lodsd wrapping: #PF err=00000000 cr2=00360004 ecx=0c0c0c0c esi=00460004 edi=d1d1d1d1 esp=000e4000\n\
    done\n";

#[test]
fn ds_es_and_ss_with_non_zero_bases_run_translated() {
    let o = compare("segment-bases", &protected_mode_engines());
    let text: String = o
        .serial_text()
        .lines()
        .map(|l| match l.find(" eip=+") {
            Some(at) => format!("{}{}\n", &l[..at], &l[at + 14..]),
            None => format!("{l}\n"),
        })
        .collect();
    assert_eq!(text, SEGMENT_BASES);
    assert_eq!(o.status, Some(0x29 * 2 + 1));
    translated_and_safe(&o);
    // The code that ran with the bases was translated for them (not left to the
    // interpreter), and the page faults came from translated code.
    assert!(stat(&o, "units with segment bases") >= 10, "{}", o.stderr);
    assert!(stat(&o, "exit: fault") >= 6, "{}", o.stderr);
}

#[test]
fn an_instruction_across_two_pages_follows_both() {
    let o = compare("page-straddle", &protected_mode_engines());
    assert_eq!(
        o.serial_text(),
        "straddle 0=44332211\nstraddle 1=44332211\nsecond page remapped=77889911\n\
         second page rewritten=77885511\n"
    );
    translated_and_safe(&o);
    assert!(stat(&o, "units invalidated") >= 1, "{}", o.stderr);
}

#[test]
fn chains_into_a_global_page_follow_its_remapping() {
    let o = compare("global-chains", &protected_mode_engines());
    assert_eq!(
        o.serial_text(),
        "global=11111111\nremapped=22222222\nback=11111111\n"
    );
    assert_eq!(o.status, Some(0x2A * 2 + 1));
    translated_and_safe(&o);
    // The calls were chained across pages, and again after each remapping.
    assert!(stat(&o, "chains to global pages") >= 3, "{}", o.stderr);
}

#[test]
fn an_instruction_that_keeps_reaching_device_memory_becomes_a_callout() {
    // The apic kernel polls and writes local APIC and IOAPIC registers from loops: after a
    // few host faults on the unmapped device pages, bt translates those instructions as
    // callouts (adaptive binary translation), with the same results as QEMU.
    let o = compare("apic", &interrupt_engines());
    assert_eq!(o.status, Some(0x83));
    translated_and_safe(&o);
    assert!(stat(&o, "retranslated: device memory") >= 1, "{}", o.stderr);
}
