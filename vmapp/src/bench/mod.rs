//! `bt86 bench`: the same guest workloads under every engine in one run, interleaved so that
//! machine noise hits all engines alike, reported as per-operation times and as ratios to a
//! baseline engine.
//!
//! Engines run as child processes (`bt86 run` for bt86's own engines, `qemu-system-i386 -accel
//! tcg` for QEMU), so a guest or engine that misbehaves costs one sample, never the whole
//! report: it shows as failed, with its log kept.

mod engines;
mod plot;
mod report;
mod stats;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bt86_guests::nano;
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};

pub use engines::BenchEngine;
use engines::{Availability, Runner, Sample};
use report::{Cell, Report, Row};

/// Which workloads to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// Guest kernels that time one operation each (Adams & Agesen's nanobenchmarks).
    Nano,
    /// The Debian i386 guest running a benchmark /init.
    Linux,
    /// Every suite.
    All,
}

/// `bt86 bench`'s arguments.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Engines to compare, in column order: bt, interp, kvm, qemu-tcg, native. Engines that are
    /// not available on this host are reported as such.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "bt,interp,kvm,qemu-tcg"
    )]
    engines: Vec<BenchEngine>,

    /// Which workloads to run.
    #[arg(long, value_enum, default_value_t = Suite::Nano)]
    suite: Suite,

    /// Samples per workload and engine (runs are interleaved across engines).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,

    /// The engine ratios are computed against (default: kvm if it runs, else the first engine
    /// that runs).
    #[arg(long, value_enum)]
    baseline: Option<BenchEngine>,

    /// Only these workloads (comma-separated names; default: the whole suite).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,

    /// Operations each nano kernel times (default: each workload's own count).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    iterations: Option<u32>,

    /// Seconds one sample may take before it is stopped and counted as failed.
    #[arg(long, default_value_t = 300)]
    timeout: u64,

    /// Write every number of the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Draw the medians as a bar chart to FILE (.svg or .png).
    #[arg(long, value_name = "FILE.svg|png")]
    plot: Option<PathBuf>,

    /// Where the logs of failed samples are kept.
    #[arg(long, value_name = "DIR", default_value = "bt86-bench-logs")]
    logs: PathBuf,
}

/// Runs `bt86 bench`.
pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(plot) = &args.plot
        && !matches!(
            plot.extension().and_then(|e| e.to_str()),
            Some("svg" | "png")
        )
    {
        bail!(
            "--plot {}: bt86 draws SVG or PNG charts; give a file name ending in .svg or .png",
            plot.display()
        );
    }
    if args.suite == Suite::Linux {
        bail!(
            "the linux suite needs the Debian guest to boot to a shell, which this build of bt86 \
             cannot do yet; run --suite nano"
        );
    }
    let mut engines = args.engines.clone();
    engines.dedup();
    let workloads = select_workloads(&args.workloads)?;
    let work = tempfile::tempdir().context("cannot create a temporary directory")?;
    let runner = Runner::new(Duration::from_secs(args.timeout));
    let columns: Vec<(BenchEngine, Availability)> = engines
        .iter()
        .map(|&e| (e, runner.availability(e)))
        .collect();
    let running: Vec<BenchEngine> = columns
        .iter()
        .filter(|(_, a)| a.runs())
        .map(|(e, _)| *e)
        .collect();
    if let Some(b) = args.baseline
        && !running.contains(&b)
    {
        bail!("--baseline {b}: that engine is not among the engines that run here");
    }

    // Build every kernel first: a kit failure is a bt86 bug and should stop before any timing.
    let mut kernels = Vec::new();
    for w in &workloads {
        let iterations = args.iterations.unwrap_or(w.iterations);
        let image = nano::build(w, iterations)
            .with_context(|| format!("cannot build the {} kernel", w.name))?;
        let path = work.path().join(format!("{}.elf", w.name));
        std::fs::write(&path, image).with_context(|| format!("cannot write {}", path.display()))?;
        kernels.push(path);
    }

    // Native runs only the workloads whose operation is unprivileged.
    let applies =
        |w: &nano::Workload, e: BenchEngine| e != BenchEngine::Native || nano::runs_natively(w);
    let pairs = workloads
        .iter()
        .map(|w| running.iter().filter(|&&e| applies(w, e)).count())
        .sum::<usize>();
    let total = u64::from(args.runs) * pairs as u64;
    let progress = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); running.len()]; workloads.len()];
    for run in 0..args.runs as usize {
        for (wi, w) in workloads.iter().enumerate() {
            // Rotate the engine order each time so no engine always runs first or last.
            for k in 0..running.len() {
                let ei = (k + run + wi) % running.len();
                let engine = running[ei];
                if !applies(w, engine) {
                    continue;
                }
                progress.set_message(format!("run {} {} on {engine}", run + 1, w.name));
                let iterations = args.iterations.unwrap_or(w.iterations);
                let sample = runner.nano(engine, w, iterations, &kernels[wi], work.path());
                samples[wi][ei].push(sample);
                progress.inc(1);
            }
        }
    }
    progress.finish_and_clear();

    // Default baseline: kvm if it measured anything, else the first engine that did.
    let measured_any = |e: &BenchEngine| {
        running.iter().position(|r| r == e).is_some_and(|ei| {
            samples
                .iter()
                .any(|w| !w[ei].is_empty() && w[ei].iter().all(|s| matches!(s, Sample::Ok(_))))
        })
    };
    let baseline = args.baseline.or_else(|| {
        std::iter::once(BenchEngine::Kvm)
            .chain(running.iter().copied())
            .find(|e| running.contains(e) && measured_any(e))
    });
    let mut rows = Vec::new();
    for (wi, w) in workloads.iter().enumerate() {
        let mut cells = Vec::new();
        for (engine, availability) in &columns {
            let cell = match running.iter().position(|e| e == engine) {
                _ if !applies(w, *engine) => {
                    Cell::Unavailable("a privileged operation cannot run natively".into())
                }
                Some(ei) => keep_logs(&samples[wi][ei], &args.logs, *engine, w.name),
                None => Cell::Unavailable(availability.reason().to_string()),
            };
            cells.push(cell);
        }
        rows.push(Row {
            workload: w.name.to_string(),
            operation: w.operation.to_string(),
            iterations: u64::from(args.iterations.unwrap_or(w.iterations)),
            cells,
        });
    }
    let report = Report::new(
        "nano",
        args.runs,
        columns
            .iter()
            .map(|(e, a)| (e.to_string(), a.clone()))
            .collect(),
        baseline.map(|b| b.to_string()),
        rows,
        engines::host_description(),
    );
    print!("{}", report.text());
    if cfg!(debug_assertions) {
        println!(
            "\nnote: this bt86 is a debug build; bt86's own engines run several times slower \
             than in a release build (cargo build --release)"
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, report.json())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let svg = plot::svg(&report);
        let bytes = if path.extension().and_then(|e| e.to_str()) == Some("png") {
            plot::png(&svg).map_err(|e| anyhow::anyhow!("cannot draw the PNG chart: {e}"))?
        } else {
            svg.into_bytes()
        };
        std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn select_workloads(names: &[String]) -> anyhow::Result<Vec<&'static nano::Workload>> {
    if names.is_empty() {
        return Ok(nano::WORKLOADS.iter().collect());
    }
    names
        .iter()
        .map(|n| {
            nano::find(n).with_context(|| {
                let all: Vec<&str> = nano::WORKLOADS.iter().map(|w| w.name).collect();
                format!(
                    "no nano workload is called {n}; the suite has {}",
                    all.join(", ")
                )
            })
        })
        .collect()
}

/// Turns one engine's samples of one workload into a report cell, keeping the logs of failures
/// under `logs`.
fn keep_logs(samples: &[Sample], logs: &Path, engine: BenchEngine, workload: &str) -> Cell {
    let mut ns = Vec::new();
    for (run, s) in samples.iter().enumerate() {
        match s {
            Sample::Ok(v) => ns.push(*v),
            Sample::Failed { reason, log } => {
                let path = logs.join(format!("{engine}-{workload}-run{}.log", run + 1));
                let kept = std::fs::create_dir_all(logs)
                    .and_then(|()| std::fs::write(&path, log))
                    .is_ok();
                return Cell::Failed {
                    reason: reason.clone(),
                    log: kept.then(|| path.display().to_string()),
                };
            }
        }
    }
    Cell::Measured(ns)
}
