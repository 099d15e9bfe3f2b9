//! A guest can do anything; the host process must survive it. Random bytes run as ring-0 code
//! (the `chaos` kernels: every exception restarts them at another offset) under the interpreter
//! and the binary translator. Each run must end the way bt86 documents — the guest's exit
//! status, a triple fault, a halt, a power-off or reset, a clear message naming an instruction
//! the engine does not execute — or still be running (a guest may spin) when the test stops
//! it. Never a panic, a host signal, or an internal error.

use std::time::Duration;

use bt86_tests::kernels::chaos::chaos;
use bt86_tests::runner::{Guest, bt86_command, run_with_timeout, stat};

/// Seeds run per engine (fixed: a failure names its seed and reproduces);
/// `BT86_CHAOS_SEEDS=FIRST..END` runs others.
const SEEDS: std::ops::Range<u64> = 0..32;

fn seeds() -> std::ops::Range<u64> {
    std::env::var("BT86_CHAOS_SEEDS")
        .ok()
        .and_then(|v| {
            let (a, b) = v.split_once("..")?;
            Some(a.parse().ok()?..b.parse().ok()?)
        })
        .unwrap_or(SEEDS)
}

#[test]
fn random_guest_code_never_takes_the_host_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut endings = std::collections::BTreeMap::<String, u32>::new();
    let mut rounds = 0;
    let mut translated = 0;
    let mut based_units = 0;
    let seeds = seeds();
    for seed in seeds.clone() {
        let name = format!("chaos-{seed}.elf");
        std::fs::write(dir.path().join(&name), chaos(seed).unwrap()).unwrap();
        let guest = Guest::kernel(dir.path(), &name);
        for engine in ["interp", "bt"] {
            let cmd = bt86_command(&guest, engine, &["--stats"]);
            let o = run_with_timeout(cmd, Duration::from_secs(5));
            let what = format!("seed {seed} on {engine}");
            assert!(
                !o.stderr.contains("panicked"),
                "{what}: bt86 panicked:\n{}",
                o.stderr
            );
            let ending = match (o.timed_out, o.status) {
                (true, _) => "still running".to_string(),
                // isa-debug-exit: 0x10 is the kernel's own end; random code may write others.
                (false, Some(s)) if s & 1 == 1 => "exit".to_string(),
                (false, Some(0)) => "power-off or reset".to_string(),
                (false, Some(4)) => "triple fault".to_string(),
                (false, Some(6)) => "halted".to_string(),
                (false, Some(8)) if o.stderr.contains("cannot execute") => {
                    let what = o.stderr.split("cannot execute ").nth(1).unwrap_or("");
                    format!("cannot execute {}", what.split(" yet").next().unwrap_or(""))
                }
                (false, status) => panic!(
                    "{what}: ended with status {status:?}, which no guest may cause:\n{}",
                    o.stderr
                ),
            };
            // The stats print when the run ends by itself.
            if engine == "bt" && !o.timed_out && o.stderr.contains("SUD fired") {
                assert_eq!(
                    stat(&o, "SUD fired"),
                    0,
                    "{what}: a system call left the guest"
                );
                translated += stat(&o, "translated executed");
                based_units += stat(&o, "units with segment bases");
            }
            *endings.entry(format!("{engine}: {ending}")).or_default() += 1;
            rounds += o.serial.iter().filter(|&&b| b == b'.').count();
        }
    }
    println!(
        "{rounds} rounds, {translated} translated instructions and {based_units} units for \
         segment bases on bt; {endings:#?}"
    );
    assert!(translated > 0, "bt never ran the random code translated");
    assert!(
        based_units > 0,
        "bt never translated the random code for based segments"
    );
    // The kernels must exercise the random code, not stop at once: most runs go through many
    // rounds (a round ends at an exception or a timer tick).
    assert!(
        rounds as u64 >= (seeds.end - seeds.start) * 2 * 8,
        "only {rounds} rounds in {} runs: {endings:?}",
        (seeds.end - seeds.start) * 2
    );
}
