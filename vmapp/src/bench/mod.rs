//! `bt86 bench`: the same guest workloads under every engine in one run, interleaved so that
//! machine noise hits all engines alike, reported as per-operation times and as ratios to a
//! baseline engine.
//!
//! Engines run as child processes (`bt86 run` for bt86's own engines, `qemu-system-i386 -accel
//! tcg` for QEMU), so a guest or engine that misbehaves costs one sample, never the whole
//! report: it shows as failed, with its log kept.

mod docs;
mod engines;
mod linux;
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
use report::{Cell, Report, Row, Unit};

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

    /// Which workloads to run: nano (guest kernels timing one operation each), linux (the
    /// Debian guest with a benchmark /init; scripts/fetch-guest.sh fetches it), or all.
    #[arg(long, value_enum, default_value_t = Suite::Nano)]
    suite: Suite,

    /// Samples per workload and engine (runs are interleaved across engines).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,

    /// Fewer (or more) samples for some engines: ENGINE=N, comma-separated or repeated. With
    /// `--runs 3 --runs-of interp=1` the interpreter, which boots Linux in minutes, takes part
    /// in the first round only.
    #[arg(long, value_name = "ENGINE=N", value_delimiter = ',', value_parser = parse_runs_of)]
    runs_of: Vec<(BenchEngine, u32)>,

    /// The engine ratios are computed against (default: kvm if it runs, else the first engine
    /// that runs).
    #[arg(long, value_enum)]
    baseline: Option<BenchEngine>,

    /// Only these workloads (comma-separated names from any suite run; default: every workload).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,

    /// Operations each nano kernel times (default: each workload's own count).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    iterations: Option<u32>,

    /// How long the linux suite's idle step lets the guest sleep at the shell, in seconds (its
    /// row is the engine's host CPU over that time, in % of one core). Every run of every engine
    /// waits this long: lower it for a quicker suite.
    #[arg(long, value_name = "SECONDS", default_value_t = linux::IDLE_SECONDS,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    idle_seconds: u64,

    /// Seconds one sample may take before it is stopped and counted as failed (default: 300
    /// for a nano kernel; for one run of the linux suite 900, and 3600 on interp, plus the idle
    /// step's seconds).
    #[arg(long)]
    timeout: Option<u64>,

    /// The fetched Debian guest for the linux suite (default: $BT86_GUEST_DIR, else
    /// .bt86-cache/guest in the current directory or in the repository bt86 was built in).
    #[arg(long, value_name = "DIR")]
    guest: Option<PathBuf>,

    /// Write every number of the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// Draw the medians as a bar chart to FILE (.svg or .png).
    #[arg(long, value_name = "FILE.svg|png")]
    plot: Option<PathBuf>,

    /// Write the tables, with the date and the host, into FILE (docs/performance.md): between
    /// its "bt86 bench --update-docs" markers, or under its title when it has none.
    #[arg(long, value_name = "FILE")]
    update_docs: Option<PathBuf>,

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
    let suites: &[Suite] = match args.suite {
        Suite::All => &[Suite::Nano, Suite::Linux],
        Suite::Nano => &[Suite::Nano],
        Suite::Linux => &[Suite::Linux],
    };
    for name in &args.workloads {
        let nano = suites.contains(&Suite::Nano) && nano::find(name).is_some();
        let linux = suites.contains(&Suite::Linux) && linux_row_exists(name);
        if !nano && !linux {
            let mut all: Vec<&str> = Vec::new();
            if suites.contains(&Suite::Nano) {
                all.extend(nano::WORKLOADS.iter().map(|w| w.name));
            }
            if suites.contains(&Suite::Linux) {
                all.push(linux::BOOT);
                all.extend(linux::STEPS.iter().map(|s| s.name));
            }
            bail!(
                "no workload is called {name}; the {} suite has {}",
                suites
                    .iter()
                    .map(|s| format!("{s:?}").to_lowercase())
                    .collect::<Vec<_>>()
                    .join(" and "),
                all.join(", ")
            );
        }
    }
    let mut engines = args.engines.clone();
    engines.dedup();
    let work = tempfile::tempdir().context("cannot create a temporary directory")?;
    let runner = Runner::new(Duration::from_secs(args.timeout.unwrap_or(300)));
    let mut reports = Vec::new();
    for suite in suites {
        let selected = |has: &dyn Fn(&str) -> bool| {
            args.workloads.is_empty() || args.workloads.iter().any(|w| has(w))
        };
        let wanted = match suite {
            Suite::Nano => selected(&|w| nano::find(w).is_some()),
            _ => selected(&linux_row_exists),
        };
        if !wanted {
            continue;
        }
        reports.push(match suite {
            Suite::Nano => nano_report(&args, &runner, &engines, work.path())?,
            _ => linux_report(&args, &runner, &engines, work.path())?,
        });
    }
    for (i, report) in reports.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print!("{}", report.text());
    }
    if cfg!(debug_assertions) {
        println!(
            "\nnote: this bt86 is a debug build; bt86's own engines run several times slower \
             than in a release build (cargo build --release)"
        );
    }
    if let Some(path) = &args.json {
        let text = match &reports[..] {
            [one] => one.json(),
            all => {
                let v = serde_json::json!({
                    "suites": all.iter().map(Report::json_value).collect::<Vec<_>>()
                });
                serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
            }
        };
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let all: Vec<&Report> = reports.iter().collect();
    if let Some(path) = &args.plot {
        let svg = plot::svg(&all);
        let bytes = if path.extension().and_then(|e| e.to_str()) == Some("png") {
            plot::png(&svg).map_err(|e| anyhow::anyhow!("cannot draw the PNG chart: {e}"))?
        } else {
            svg.into_bytes()
        };
        std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.update_docs {
        // Paths under the current directory read better relative (and hide no host detail).
        let cwd = std::env::current_dir()
            .map(|d| format!("{}/", d.display()))
            .unwrap_or_default();
        let command: Vec<String> = std::env::args()
            .map(|a| match a.strip_prefix(&cwd) {
                Some(rel) if !cwd.is_empty() => rel.to_string(),
                _ => a,
            })
            .collect();
        docs::update(path, &all, &command.join(" "))?;
        eprintln!("bt86 bench: wrote the tables into {}", path.display());
    }
    Ok(())
}

/// `--runs-of`'s ENGINE=N.
fn parse_runs_of(text: &str) -> Result<(BenchEngine, u32), String> {
    let (engine, n) = text
        .split_once('=')
        .ok_or_else(|| format!("{text}: give ENGINE=N, for example interp=1"))?;
    let engine = BenchEngine::from_str(engine, true)?;
    match n.parse::<u32>() {
        Ok(n @ 1..=1000) => Ok((engine, n)),
        _ => Err(format!("{text}: N is a number of runs from 1 to 1000")),
    }
}

/// The engine columns of one suite, which of them run here, and how many samples each takes.
struct Columns {
    all: Vec<(BenchEngine, Availability)>,
    running: Vec<BenchEngine>,
    /// Samples per running engine (same order as `running`).
    runs: Vec<u32>,
    /// --runs.
    default_runs: u32,
}

impl Columns {
    fn new(
        engines: &[BenchEngine],
        availability: impl Fn(BenchEngine) -> Availability,
        args: &BenchArgs,
    ) -> Self {
        let all: Vec<(BenchEngine, Availability)> =
            engines.iter().map(|&e| (e, availability(e))).collect();
        let running: Vec<BenchEngine> = all
            .iter()
            .filter(|(_, a)| a.runs())
            .map(|(e, _)| *e)
            .collect();
        let runs = running.iter().map(|&e| runs_of(args, e)).collect();
        Columns {
            all,
            running,
            runs,
            default_runs: args.runs,
        }
    }

    /// How many rounds of samples there are: the most runs any engine takes.
    fn rounds(&self) -> usize {
        self.runs.iter().copied().max().unwrap_or(0) as usize
    }

    /// Samples all running engines take together, per workload they all run.
    fn samples_per_workload(&self, applies: impl Fn(BenchEngine) -> bool) -> u64 {
        self.running
            .iter()
            .zip(&self.runs)
            .filter(|(e, _)| applies(**e))
            .map(|(_, &n)| u64::from(n))
            .sum()
    }

    /// Refuses a --baseline that does not run here.
    fn check_baseline(&self, asked: Option<BenchEngine>, suite: &str) -> anyhow::Result<()> {
        if let Some(b) = asked
            && !self.running.contains(&b)
        {
            bail!(
                "--baseline {b}: that engine is not among the engines that run the {suite} suite here"
            );
        }
        Ok(())
    }

    /// Engine indexes (into `running`) in the order of round `round` of samples, rotated by
    /// `shift` so that no engine always runs first or last; an engine that has taken its
    /// samples sits the round out.
    fn rotation(&self, round: usize, shift: usize) -> impl Iterator<Item = usize> + use<> {
        let n = self.running.len();
        let runs = self.runs.clone();
        (0..n)
            .map(move |k| (k + shift) % n)
            .filter(move |&ei| round < runs[ei] as usize)
    }

    /// The asked baseline, else kvm if it measured anything, else the first engine that did
    /// (`samples[row][running index]`).
    fn baseline(
        &self,
        asked: Option<BenchEngine>,
        samples: &[Vec<Vec<Sample>>],
    ) -> Option<BenchEngine> {
        let measured_any = |e: &BenchEngine| {
            self.running.iter().position(|r| r == e).is_some_and(|ei| {
                samples
                    .iter()
                    .any(|w| !w[ei].is_empty() && w[ei].iter().all(|s| matches!(s, Sample::Ok(_))))
            })
        };
        asked.or_else(|| {
            std::iter::once(BenchEngine::Kvm)
                .chain(self.running.iter().copied())
                .find(|e| self.running.contains(e) && measured_any(e))
        })
    }

    /// One row's cells: `samples[running index]`; `not_applicable` says why an engine does not
    /// run this row at all. Failed samples' logs are kept as `logs/ENGINE-NAME-runN.log`.
    fn cells(
        &self,
        samples: &[Vec<Sample>],
        not_applicable: impl Fn(BenchEngine) -> Option<String>,
        logs: &Path,
        name: &str,
    ) -> Vec<Cell> {
        self.all
            .iter()
            .map(
                |(engine, availability)| match self.running.iter().position(|e| e == engine) {
                    _ if not_applicable(*engine).is_some() => {
                        Cell::Unavailable(not_applicable(*engine).unwrap_or_default())
                    }
                    Some(ei) => keep_logs(&samples[ei], logs, *engine, name),
                    None => Cell::Unavailable(availability.reason().to_string()),
                },
            )
            .collect()
    }

    /// The report's engine list (saying so where an engine took its own number of samples).
    fn described(&self) -> Vec<(String, Availability)> {
        self.all
            .iter()
            .map(|(e, a)| {
                let own = self
                    .running
                    .iter()
                    .position(|r| r == e)
                    .map(|ei| self.runs[ei])
                    .filter(|&n| n != self.default_runs);
                let a = match (a, own) {
                    (Availability::Runs(what), Some(n)) => {
                        Availability::Runs(format!("{what} ({n} run(s), --runs-of)"))
                    }
                    _ => a.clone(),
                };
                (e.to_string(), a)
            })
            .collect()
    }
}

fn progress_bar(total: u64) -> ProgressBar {
    ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    )
}

/// The nano suite: one guest kernel per workload, per engine, per run.
fn nano_report(
    args: &BenchArgs,
    runner: &Runner,
    engines: &[BenchEngine],
    work: &Path,
) -> anyhow::Result<Report> {
    let workloads = select_workloads(&args.workloads)?;
    let columns = Columns::new(engines, |e| runner.availability(e), args);
    columns.check_baseline(args.baseline, "nano")?;
    let running = &columns.running;

    // Build every kernel first: a kit failure is a bt86 bug and should stop before any timing.
    let mut kernels = Vec::new();
    for w in &workloads {
        let iterations = args.iterations.unwrap_or(w.iterations);
        let image = nano::build(w, iterations)
            .with_context(|| format!("cannot build the {} kernel", w.name))?;
        let path = work.join(format!("{}.elf", w.name));
        std::fs::write(&path, image).with_context(|| format!("cannot write {}", path.display()))?;
        kernels.push(path);
    }

    // Native runs only the workloads whose operation is unprivileged.
    let applies =
        |w: &nano::Workload, e: BenchEngine| e != BenchEngine::Native || nano::runs_natively(w);
    let total = workloads
        .iter()
        .map(|w| columns.samples_per_workload(|e| applies(w, e)))
        .sum::<u64>();
    let progress = progress_bar(total);
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); running.len()]; workloads.len()];
    for run in 0..columns.rounds() {
        for (wi, w) in workloads.iter().enumerate() {
            for ei in columns.rotation(run, run + wi) {
                let engine = running[ei];
                if !applies(w, engine) {
                    continue;
                }
                progress.set_message(format!("run {} {} on {engine}", run + 1, w.name));
                let iterations = args.iterations.unwrap_or(w.iterations);
                let sample = runner.nano(engine, w, iterations, &kernels[wi], work);
                samples[wi][ei].push(sample);
                progress.inc(1);
            }
        }
    }
    progress.finish_and_clear();

    let baseline = columns.baseline(args.baseline, &samples);
    let rows = workloads
        .iter()
        .enumerate()
        .map(|(wi, w)| Row {
            workload: w.name.to_string(),
            operation: w.operation.to_string(),
            iterations: u64::from(args.iterations.unwrap_or(w.iterations)),
            cells: columns.cells(
                &samples[wi],
                |e| {
                    (!applies(w, e))
                        .then(|| "a privileged operation cannot run natively".to_string())
                },
                &args.logs,
                w.name,
            ),
            host: Vec::new(),
            cpu: Vec::new(),
            unit: None,
        })
        .collect();
    Ok(Report::new(
        "nano",
        Unit::NS_PER_OP,
        args.runs,
        columns.described(),
        baseline.map(|b| b.to_string()),
        rows,
        engines::host_description(),
    ))
}

/// How many samples `engine` takes.
fn runs_of(args: &BenchArgs, engine: BenchEngine) -> u32 {
    args.runs_of
        .iter()
        .rev()
        .find(|(e, _)| *e == engine)
        .map_or(args.runs, |(_, n)| *n)
}

/// Whether the linux suite has a row called `name`.
fn linux_row_exists(name: &str) -> bool {
    name == linux::BOOT || linux::find(name).is_some()
}

/// Where the fetched Debian guest is: --guest, $BT86_GUEST_DIR, ./.bt86-cache/guest, or the
/// .bt86-cache/guest of the repository whose target/ holds this bt86. Always an absolute path:
/// the engines run in a scratch directory.
fn guest_dir(asked: Option<&Path>) -> PathBuf {
    let dir = find_guest_dir(asked);
    std::path::absolute(&dir).unwrap_or(dir)
}

fn find_guest_dir(asked: Option<&Path>) -> PathBuf {
    if let Some(dir) = asked {
        return dir.to_path_buf();
    }
    if let Some(dir) = std::env::var_os("BT86_GUEST_DIR") {
        return dir.into();
    }
    let local = PathBuf::from(".bt86-cache/guest");
    let beside_build = std::env::current_exe().ok().and_then(|exe| {
        // REPO/target/PROFILE/bt86
        Some(exe.parent()?.parent()?.parent()?.join(".bt86-cache/guest"))
    });
    [Some(local.clone()), beside_build]
        .into_iter()
        .flatten()
        .find(|d| d.join("vmlinuz").is_file())
        .unwrap_or(local)
}

/// The linux suite: one boot of the benchmark guest per engine and run, every step timed in it.
fn linux_report(
    args: &BenchArgs,
    runner: &Runner,
    engines: &[BenchEngine],
    work: &Path,
) -> anyhow::Result<Report> {
    let chosen = |name: &str| args.workloads.is_empty() || args.workloads.iter().any(|w| w == name);
    let boot = chosen(linux::BOOT);
    let steps: Vec<linux::Step> = linux::STEPS
        .iter()
        .filter(|s| chosen(s.name))
        .map(|s| match s.name {
            linux::IDLE => linux::Step {
                count: args.idle_seconds,
                ..*s
            },
            _ => *s,
        })
        .collect();
    let steps: Vec<&linux::Step> = steps.iter().collect();
    let mut columns = Columns::new(engines, |e| runner.linux_availability(e), args);
    let dir = guest_dir(args.guest.as_deref());
    let guest = match linux::Guest::prepare(&dir, &steps, work) {
        Ok(g) => Some(g),
        Err(e) => {
            // Reported, never dropped: every engine's cells say why nothing ran.
            let why = format!("{e:#}");
            for (_, a) in &mut columns.all {
                *a = Availability::Unavailable(why.clone());
            }
            columns.running.clear();
            columns.runs.clear();
            None
        }
    };
    columns.check_baseline(args.baseline, "linux")?;
    let running = &columns.running;

    // Rows: the boot, then the steps. Native runs user space only.
    let mut rows_meta: Vec<(String, String, u64, Option<&linux::Step>)> = Vec::new();
    if boot {
        rows_meta.push((linux::BOOT.into(), linux::BOOT_OPERATION.into(), 1, None));
    }
    for s in &steps {
        rows_meta.push((s.name.into(), s.operation.into(), s.count, Some(*s)));
    }
    let not_applicable = |step: Option<&linux::Step>, e: BenchEngine| -> Option<String> {
        (e == BenchEngine::Native).then_some(())?;
        match step {
            None => Some("kernel-side: the native column runs only the user-space steps".into()),
            Some(s) if s.measure == linux::Measure::HostCpuShare => {
                Some("measures what an engine costs the host; native has no engine".into())
            }
            Some(s) if !s.native => Some("needs the guest's devices".into()),
            Some(_) => None,
        }
    };
    let native_steps: Vec<&linux::Step> = steps.iter().copied().filter(|s| s.native).collect();

    let progress = progress_bar(columns.samples_per_workload(|_| true));
    let mut samples: Vec<Vec<Vec<Sample>>> = vec![vec![Vec::new(); running.len()]; rows_meta.len()];
    let mut host: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); running.len()]; rows_meta.len()];
    let mut cpu: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); running.len()]; rows_meta.len()];
    if let Some(guest) = &guest {
        for run in 0..columns.rounds() {
            for ei in columns.rotation(run, run) {
                let engine = running[ei];
                progress.set_message(format!("run {} linux on {engine}", run + 1));
                // The idle step's sleep comes on top of the work.
                let idle: u64 = steps
                    .iter()
                    .filter(|s| s.measure == linux::Measure::HostCpuShare)
                    .map(|s| s.count)
                    .sum();
                let timeout = Duration::from_secs(args.timeout.unwrap_or(match engine {
                    BenchEngine::Interp => 3600 + idle,
                    _ => 900 + idle,
                }));
                let native = engine == BenchEngine::Native;
                let (engine_boot, engine_steps) = if native {
                    (false, &native_steps)
                } else {
                    (boot, &steps)
                };
                let (outcomes, log) =
                    runner.linux(engine, guest, engine_boot, engine_steps, work, timeout);
                // Map the engine's outcomes back onto the rows it ran.
                let mut outcomes = outcomes.into_iter();
                for (ri, (_, _, _, step)) in rows_meta.iter().enumerate() {
                    if not_applicable(*step, engine).is_some() {
                        continue;
                    }
                    let outcome = outcomes.next().unwrap_or_else(|| {
                        linux::Outcome::Failed("the engine gave no result for this row".into())
                    });
                    let share = step.is_some_and(|s| s.measure == linux::Measure::HostCpuShare);
                    match outcome {
                        linux::Outcome::Timed {
                            guest_ms,
                            host_ms,
                            cpu_ms,
                        } => {
                            // The idle row's value is the engine's CPU share, not a time.
                            let value = if share {
                                cpu_ms.and_then(|c| stats::percent(c, host_ms))
                            } else {
                                Some(guest_ms)
                            };
                            match value {
                                Some(v) => {
                                    samples[ri][ei].push(Sample::Ok(v));
                                    host[ri][ei].push(host_ms);
                                    cpu[ri][ei].extend(cpu_ms);
                                }
                                None => samples[ri][ei].push(Sample::Failed {
                                    reason: format!(
                                        "the host CPU time of the {engine} process could not \
                                         be read"
                                    ),
                                    log: log.clone().unwrap_or_default(),
                                }),
                            }
                        }
                        linux::Outcome::Failed(reason) => samples[ri][ei].push(Sample::Failed {
                            reason,
                            log: log.clone().unwrap_or_default(),
                        }),
                    }
                }
                progress.inc(1);
            }
        }
    }
    progress.finish_and_clear();

    let baseline = columns.baseline(args.baseline, &samples);
    let by_column = |per_engine: &[Vec<f64>]| -> Vec<Vec<f64>> {
        columns
            .all
            .iter()
            .map(|(e, _)| {
                running
                    .iter()
                    .position(|r| r == e)
                    .map_or_else(Vec::new, |ei| per_engine[ei].clone())
            })
            .collect()
    };
    let rows: Vec<Row> = rows_meta
        .iter()
        .enumerate()
        .map(|(ri, (name, operation, count, step))| Row {
            workload: name.clone(),
            operation: operation.clone(),
            iterations: *count,
            cells: columns.cells(
                &samples[ri],
                |e| not_applicable(*step, e),
                &args.logs,
                "linux",
            ),
            host: by_column(&host[ri]),
            cpu: by_column(&cpu[ri]),
            unit: step
                .filter(|s| s.measure == linux::Measure::HostCpuShare)
                .map(|_| Unit::PERCENT_OF_CORE),
        })
        .collect();
    let mut notes = Vec::new();
    if rows.iter().any(|r| r.cpu.iter().any(|c| !c.is_empty())) {
        notes.push(HOST_CPU_NOTE.to_string());
    }
    if let Some(idle) = steps
        .iter()
        .find(|s| s.measure == linux::Measure::HostCpuShare)
    {
        notes.push(format!(
            "{}: the guest sleeps {} s (busybox sleep) with a quiet console, after a sync and a \
             2 s settle (a disk transfer during the sleep fails the step); its cells are the \
             engine process's host CPU time over the step's host wall time, in % of one host \
             core, and its ratios compare those percentages.",
            idle.name, idle.count
        ));
    }
    let mut host_text = engines::host_description();
    if let Some(g) = &guest {
        host_text += &format!("; guest: {} with a busybox benchmark /init", g.version);
    }
    Ok(Report::new(
        "linux",
        Unit::MS_PER_STEP,
        args.runs,
        columns.described(),
        baseline.map(|b| b.to_string()),
        rows,
        host_text,
    )
    .with_notes(notes))
}

/// What the linux suite's host CPU table is.
const HOST_CPU_NOTE: &str = "Host CPU: the CPU time the engine's process (bt86 run, or \
     qemu-system-i386) used on all its threads between the arrival of a step's marker lines \
     (the boot row: from the engine's start), read from the kernel's per-process CPU clock \
     (the scheduler's nanosecond run time, as in /proc/PID/task/*/schedstat, including threads \
     that exited). native: n/a, its work runs in short-lived child processes the host accounts \
     only in clock ticks once they are reaped.";

fn select_workloads(names: &[String]) -> anyhow::Result<Vec<&'static nano::Workload>> {
    if names.is_empty() {
        return Ok(nano::WORKLOADS.iter().collect());
    }
    // Names of other suites were checked by the caller.
    Ok(names.iter().filter_map(|n| nano::find(n)).collect())
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
                let kept = !log.is_empty()
                    && std::fs::create_dir_all(logs)
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    #[test]
    fn a_relative_guest_directory_is_made_absolute() {
        // The engines run in a scratch directory: a relative --guest must still name the
        // user's directory.
        let dir = guest_dir(Some(Path::new("some/guest")));
        assert!(dir.is_absolute(), "{}", dir.display());
        assert_eq!(dir, std::env::current_dir().unwrap().join("some/guest"));
    }

    fn args(line: &[&str]) -> BenchArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(line.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn runs_of_gives_an_engine_its_own_number_of_rounds() {
        let a = args(&["--runs", "3", "--runs-of", "interp=1,kvm=2"]);
        let engines = [BenchEngine::Bt, BenchEngine::Interp, BenchEngine::Kvm];
        let c = Columns::new(&engines, |_| Availability::Runs("x".into()), &a);
        assert_eq!(c.runs, vec![3, 1, 2]);
        assert_eq!(c.rounds(), 3);
        assert_eq!(c.samples_per_workload(|_| true), 6);
        assert_eq!(c.samples_per_workload(|e| e != BenchEngine::Bt), 3);
        // Every engine takes part while it has samples left, the order rotating.
        assert_eq!(c.rotation(0, 0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(c.rotation(1, 1).collect::<Vec<_>>(), vec![2, 0]);
        assert_eq!(c.rotation(2, 2).collect::<Vec<_>>(), vec![0]);
        let described = c.described();
        assert_eq!(described[0].1.reason(), "x");
        assert_eq!(described[1].1.reason(), "x (1 run(s), --runs-of)");

        assert!(parse_runs_of("interp").is_err());
        assert!(parse_runs_of("interp=0").is_err());
        assert!(parse_runs_of("nosuch=1").is_err());
        assert_eq!(parse_runs_of("qemu-tcg=5"), Ok((BenchEngine::QemuTcg, 5)));
    }

    #[test]
    fn the_idle_step_sleeps_thirty_seconds_unless_told() {
        assert_eq!(args(&[]).idle_seconds, 30);
        assert_eq!(args(&["--idle-seconds", "5"]).idle_seconds, 5);
        let refused = |v: &str| Cli::try_parse_from(["bench", "--idle-seconds", v]).is_err();
        assert!(refused("0") && refused("3601") && refused("x"));
    }

    #[test]
    fn an_unavailable_engine_takes_no_samples() {
        let a = args(&["--runs", "2"]);
        let c = Columns::new(
            &[BenchEngine::Kvm, BenchEngine::Bt],
            |e| {
                if e == BenchEngine::Kvm {
                    Availability::Unavailable("no /dev/kvm".into())
                } else {
                    Availability::Runs("bt".into())
                }
            },
            &a,
        );
        assert_eq!(c.running, vec![BenchEngine::Bt]);
        assert_eq!(c.rounds(), 2);
        assert!(c.check_baseline(Some(BenchEngine::Kvm), "nano").is_err());
        let cells = c.cells(
            &[vec![Sample::Ok(5.0)]],
            |_| None,
            Path::new("/nonexistent"),
            "w",
        );
        assert_eq!(cells[0], Cell::Unavailable("no /dev/kvm".into()));
        assert_eq!(cells[1], Cell::Measured(vec![5.0]));
    }
}
