//! `bt86-oracle`: runs generated instruction sequences on the host CPU and on bt86's interpreter
//! (or binary translator, `--engine bt`) and compares them (the long-run form of the `native_oracle` test).
//!
//! ```text
//! bt86-oracle [--seed N] [--count N] [--first N] [--threads N] [--shrink N] [--show N]
//!             [--engine interp|bt]
//! ```
//!
//! Prints the coverage report, the mismatches (shrunk to their smallest failing form, grouped by
//! shape, one example each) and a summary;
//! exits with status 1 if any case mismatched or could not be run.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use bt86_tests::oracle::{self, Options};

const USAGE: &str = "usage: bt86-oracle [--seed N] [--count N] [--first N] [--threads N] \
                     [--shrink CHECKS] [--show N] [--engine interp|bt]";

fn main() -> anyhow::Result<ExitCode> {
    let mut opts = Options {
        seed: 1,
        first: 0,
        count: 100_000,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        shrink_budget: 200,
        engine: oracle::Engine::Interp,
    };
    let mut show = 20usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            return Ok(ExitCode::SUCCESS);
        }
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = || -> anyhow::Result<u64> {
            let v = value.replace('_', "");
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.with_context(|| format!("{flag} takes a number, not '{value}'"))
        };
        match flag.as_str() {
            "--seed" => opts.seed = number()?,
            "--count" => opts.count = number()?,
            "--first" => opts.first = number()?,
            "--threads" => opts.threads = number()?.max(1) as usize,
            "--shrink" => opts.shrink_budget = number()? as usize,
            "--show" => show = number()? as usize,
            "--engine" => {
                opts.engine = match value.as_str() {
                    "interp" => oracle::Engine::Interp,
                    "bt" => oracle::Engine::Bt,
                    _ => bail!("--engine takes interp or bt, not '{value}'\n{USAGE}"),
                }
            }
            _ => bail!("unknown option {flag}\n{USAGE}"),
        }
    }

    let start = Instant::now();
    let report = match oracle::run(&opts) {
        Ok(r) => r,
        Err(e) => bail!("cannot run natively: {e}"),
    };
    let elapsed = start.elapsed();
    print!("{}", report.coverage);
    // One example of each class of mismatch (the same shrunk shape), most frequent first.
    print!("{}", report.details(show));
    println!(
        "seed {} cases {}..{}: {} in {:.1} s on {} threads",
        opts.seed,
        opts.first,
        opts.first + opts.count,
        report.summary(),
        elapsed.as_secs_f64(),
        opts.threads
    );
    Ok(if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
