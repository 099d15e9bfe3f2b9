//! The interpreter against the host CPU: a fixed-seed run of generated instruction sequences,
//! each run natively in a 32-bit compatibility-mode sandbox and on the interpreter, compared
//! register by register, flag by flag (less the flags the manuals leave undefined) and byte by
//! byte. Long runs are a separate command: `bt86-oracle --seed N --count N`.

use bt86_tests::oracle::{self, Engine, Options};
use vmdriver::native::NativeError;

/// The fixed seed; a failure names the case, and `bt86-oracle --seed 0xB786 --first I --count 1`
/// runs it again alone.
const SEED: u64 = 0xB786;
/// Cases per run (each 1-8 instructions under test, plus their fix-ups).
const CASES: u64 = 3000;

#[test]
fn the_interpreter_matches_the_host_cpu_on_generated_sequences() {
    check_engine(
        Engine::Interp,
        "the_interpreter_matches_the_host_cpu_on_generated_sequences",
    );
}

/// The same cases through the binary translator: translated code and its callouts must give
/// what the host CPU gives (and so what the interpreter gives).
#[test]
fn the_translator_matches_the_host_cpu_on_generated_sequences() {
    check_engine(
        Engine::Bt,
        "the_translator_matches_the_host_cpu_on_generated_sequences",
    );
}

fn check_engine(engine: Engine, name: &str) {
    let opts = Options {
        seed: SEED,
        first: 0,
        count: CASES,
        threads: 2,
        shrink_budget: 100,
        engine,
    };
    let report = match oracle::run(&opts) {
        Ok(r) => r,
        Err(e @ NativeError::NoCompatMode { .. }) => {
            println!("SKIPPED {name}: {e}");
            return;
        }
        Err(e) => panic!("the native oracle cannot run: {e}"),
    };
    print!("{}", report.coverage);
    print!("{}", report.details(usize::MAX));
    println!("seed {SEED:#x}: {}", report.summary());
    assert_eq!(report.cases, CASES);
    assert!(
        report.coverage.compared.len() + report.coverage.unsupported.len() >= 120,
        "the generator should reach well over a hundred mnemonics"
    );
    // The floating-point share of the cases reaches x87, MMX, SSE and SSE2 (and their state
    // instructions) with the x87/SSE state compared too.
    for m in [
        "fld",
        "fsin",
        "fxsave",
        "paddw",
        "addps",
        "mulsd",
        "cvttsd2si",
        "pshufw",
    ] {
        assert!(
            report.coverage.compared.contains_key(m),
            "no '{m}' compared: the floating-point generator lost a class"
        );
    }
    assert!(
        !report.failed(),
        "{} mismatches and {} errors between {engine:?} and the host CPU (details above): {}",
        report.mismatches,
        report.errors,
        report
            .classes_by_count()
            .iter()
            .map(|(sig, c)| format!("[{sig}] x{}", c.count))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
