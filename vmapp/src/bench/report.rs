//! The bench report: a text table for people, JSON for programs, both from the same numbers.

use serde_json::{Value, json};

use super::engines::Availability;
use super::stats;

/// What one engine gave for one workload.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// Nanoseconds per operation, one per run.
    Measured(Vec<f64>),
    /// A run failed (the others were not used).
    Failed {
        /// Why.
        reason: String,
        /// Where its log was kept, if it could be written.
        log: Option<String>,
    },
    /// The engine does not run here.
    Unavailable(String),
}

impl Cell {
    fn median(&self) -> Option<f64> {
        match self {
            Cell::Measured(v) => stats::median(v),
            _ => None,
        }
    }

    fn min(&self) -> Option<f64> {
        match self {
            Cell::Measured(v) => stats::min(v),
            _ => None,
        }
    }
}

/// One workload across the engines (cells in engine column order).
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The workload's name.
    pub workload: String,
    /// What one operation is.
    pub operation: String,
    /// Operations per run.
    pub iterations: u64,
    /// One cell per engine column.
    pub cells: Vec<Cell>,
    /// The same samples timed by the host's clock, per engine column (empty where a cell has
    /// none; an empty vector when the suite times only one way).
    pub host: Vec<Vec<f64>>,
    /// The host CPU time the engine process used in the same samples, in the report's unit,
    /// per engine column (empty where it was not measured; an empty vector when the suite does
    /// not measure it).
    pub cpu: Vec<Vec<f64>>,
    /// The unit of this row's cells when it is not the report's (the linux suite's idle row
    /// reports % of one host core); such rows stay out of the chart.
    pub unit: Option<Unit>,
}

/// What a report's numbers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    /// In words, for table titles ("ns per operation").
    pub what: &'static str,
    /// The unit's symbol, for JSON keys and chart axes ("ns").
    pub symbol: &'static str,
    /// Which clock the main table is timed with, when the report also has a host-clock table.
    pub clock: Option<&'static str>,
    /// Written after each number in the tables ("%"), or nothing.
    pub suffix: &'static str,
}

impl Unit {
    /// Nanoseconds per operation (the nano suite).
    pub const NS_PER_OP: Unit = Unit {
        what: "ns per operation",
        symbol: "ns",
        clock: None,
        suffix: "",
    };
    /// Milliseconds per step, by the guest's clock and by the host's (the linux suite).
    pub const MS_PER_STEP: Unit = Unit {
        what: "ms per step",
        symbol: "ms",
        clock: Some("guest clock"),
        suffix: "",
    };
    /// Host CPU time as a share of host wall time, in % of one host core (the linux suite's
    /// idle row).
    pub const PERCENT_OF_CORE: Unit = Unit {
        what: "% of one host core",
        symbol: "pct",
        clock: None,
        suffix: "%",
    };
}

/// The host clock's table title.
const HOST_CLOCK: &str = "host clock: console line arrival";

/// The host CPU table's title.
const HOST_CPU: &str = "host CPU time of the engine process (all threads)";

/// A whole bench run.
#[derive(Debug, Clone)]
pub struct Report {
    suite: String,
    unit: Unit,
    runs: u32,
    date: String,
    host: String,
    engines: Vec<(String, Availability)>,
    baseline: Option<String>,
    rows: Vec<Row>,
    /// What the reader should know about the numbers, printed under the tables.
    notes: Vec<String>,
}

/// Formats a time with about three significant digits.
fn ns(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Formats a ratio with three significant digits (engines differ by orders of magnitude).
fn ratio_text(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}x")
    } else if r >= 10.0 {
        format!("{r:.1}x")
    } else if r >= 1.0 {
        format!("{r:.2}x")
    } else if r > 0.0 {
        let digits = (2.0 - r.log10().floor()).min(9.0) as usize;
        format!("{r:.digits$}x")
    } else {
        "0x".into()
    }
}

/// "median (min)" of samples, each number followed by `suffix`.
fn median_min(samples: &[f64], suffix: &str) -> String {
    match (stats::median(samples), stats::min(samples)) {
        (Some(m), Some(lo)) => format!("{}{suffix} ({}{suffix})", ns(m), ns(lo)),
        _ => "-".into(),
    }
}

/// What makes two failures one footnote: engine, reason, log.
type FailureKey<'a> = (&'a str, &'a str, Option<&'a str>);

/// A table as text: a header row, then rows; the first column left-aligned.
struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn text(&self, width: usize) -> String {
        let mut out = format!("\n{}\n", self.title);
        for line in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in line.iter().enumerate() {
                if i == 0 {
                    out += &format!("{c:<18}");
                } else {
                    out += &format!("{c:>width$}");
                }
            }
            out += "\n";
        }
        out
    }

    fn markdown(&self) -> String {
        let mut out = format!("\n{}:\n\n", self.title);
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        out += &line(&self.header);
        out += &line(&vec!["---".to_string(); self.header.len()]);
        for r in &self.rows {
            out += &line(r);
        }
        out
    }
}

impl Report {
    /// A report of `rows`, taken now.
    pub fn new(
        suite: &str,
        unit: Unit,
        runs: u32,
        engines: Vec<(String, Availability)>,
        baseline: Option<String>,
        rows: Vec<Row>,
        host: String,
    ) -> Self {
        Report {
            suite: suite.to_string(),
            unit,
            runs,
            date: utc_now(),
            host,
            engines,
            baseline,
            rows,
            notes: Vec::new(),
        }
    }

    /// The report with `notes` printed under its tables.
    pub fn with_notes(mut self, notes: Vec<String>) -> Self {
        self.notes = notes;
        self
    }

    /// The suite's name.
    pub fn suite(&self) -> &str {
        &self.suite
    }

    /// What the numbers are.
    pub fn unit(&self) -> Unit {
        self.unit
    }

    /// When the report was taken ("YYYY-MM-DD HH:MM UTC").
    pub fn date(&self) -> &str {
        &self.date
    }

    /// The host description.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The engine column names.
    pub fn engine_names(&self) -> impl Iterator<Item = &str> {
        self.engines.iter().map(|(n, _)| n.as_str())
    }

    /// (workload, medians per engine column) of the rows in the report's unit.
    pub fn medians(&self) -> impl Iterator<Item = (&str, Vec<Option<f64>>)> {
        self.rows.iter().filter(|r| r.unit.is_none()).map(|r| {
            (
                r.workload.as_str(),
                r.cells.iter().map(Cell::median).collect(),
            )
        })
    }

    fn baseline_index(&self) -> Option<usize> {
        let b = self.baseline.as_deref()?;
        self.engines.iter().position(|(n, _)| n == b)
    }

    /// The median of `row`'s cell `i` divided by the baseline's median.
    fn ratio(&self, row: &Row, i: usize) -> Option<f64> {
        let b = self.baseline_index()?;
        stats::ratio(row.cells[i].median(), row.cells[b].median())
    }

    fn has_host_clock(&self) -> bool {
        self.rows
            .iter()
            .any(|r| r.host.iter().any(|h| !h.is_empty()))
    }

    fn has_host_cpu(&self) -> bool {
        self.rows
            .iter()
            .any(|r| r.cpu.iter().any(|c| !c.is_empty()))
    }

    /// A table of per-sample numbers beside the main one (`pick` chooses them from a row):
    /// "n/a" where a measured cell has none, failures as in the main table.
    fn side_table(
        &self,
        title: String,
        header: &[String],
        failed_note: &[((usize, usize), usize)],
        pick: impl Fn(&Row) -> &Vec<Vec<f64>>,
        missing: &str,
    ) -> Table {
        let rows = self
            .rows
            .iter()
            .enumerate()
            .map(|(r, row)| {
                let mut line = vec![row.workload.clone()];
                for (i, cell) in row.cells.iter().enumerate() {
                    let values = pick(row).get(i).map_or(&[][..], Vec::as_slice);
                    line.push(match cell {
                        Cell::Measured(_) if !values.is_empty() => median_min(values, ""),
                        Cell::Measured(_) => missing.into(),
                        Cell::Failed { .. } => failed_note
                            .iter()
                            .find(|(at, _)| *at == (r, i))
                            .map_or("failed".into(), |(_, n)| format!("failed [{n}]")),
                        Cell::Unavailable(_) => "n/a".into(),
                    });
                }
                line
            })
            .collect();
        Table {
            title,
            header: header.to_vec(),
            rows,
        }
    }

    /// The report's tables (values, host clock when timed, ratios) and its footnotes, the
    /// report's own notes last.
    fn tables(&self) -> (Vec<Table>, Vec<String>) {
        let header: Vec<String> = std::iter::once("workload".to_string())
            .chain(self.engines.iter().map(|(n, _)| n.clone()))
            .collect();
        // ((engine, reason, log), workloads) per footnote.
        let mut failures: Vec<(FailureKey, Vec<&str>)> = Vec::new();
        let mut failed_note = Vec::new(); // (row, column) -> note number
        let mut values = Vec::new();
        for (r, row) in self.rows.iter().enumerate() {
            let mut line = vec![row.workload.clone()];
            for (i, (cell, (engine, _))) in row.cells.iter().zip(&self.engines).enumerate() {
                let suffix = row.unit.unwrap_or(self.unit).suffix;
                line.push(match cell {
                    Cell::Measured(v) => median_min(v, suffix),
                    Cell::Failed { reason, log } => {
                        // One footnote per engine, reason and log, naming every workload.
                        let key = (engine.as_str(), reason.as_str(), log.as_deref());
                        let n = match failures.iter().position(|(k, _)| *k == key) {
                            Some(n) => n,
                            None => {
                                failures.push((key, Vec::new()));
                                failures.len() - 1
                            }
                        };
                        failures[n].1.push(row.workload.as_str());
                        failed_note.push(((r, i), n + 1));
                        format!("failed [{}]", n + 1)
                    }
                    Cell::Unavailable(_) => "n/a".into(),
                });
            }
            values.push(line);
        }
        let mut notes: Vec<String> = failures
            .iter()
            .enumerate()
            .map(|(n, ((engine, reason, log), workloads))| {
                format!(
                    "[{}] {engine} {}: {reason}{}",
                    n + 1,
                    workloads.join(", "),
                    log.map(|l| format!("; log: {l}")).unwrap_or_default()
                )
            })
            .collect();
        let clock = self
            .unit
            .clock
            .map(|c| format!(", {c}"))
            .unwrap_or_default();
        let mut tables = vec![Table {
            title: format!("{}{clock}, median (min)", self.unit.what),
            header: header.clone(),
            rows: values,
        }];
        if self.has_host_clock() {
            tables.push(self.side_table(
                format!("{}, {HOST_CLOCK}, median (min)", self.unit.what),
                &header,
                &failed_note,
                |row| &row.host,
                "-",
            ));
        }
        if self.has_host_cpu() {
            tables.push(self.side_table(
                format!("{}, {HOST_CPU}, median (min)", self.unit.what),
                &header,
                &failed_note,
                |row| &row.cpu,
                "n/a",
            ));
        }
        if let Some(b) = &self.baseline {
            let shown: Vec<usize> = (0..self.engines.len())
                .filter(|&i| self.engines[i].1.runs())
                .collect();
            let rows = self
                .rows
                .iter()
                .map(|row| {
                    std::iter::once(row.workload.clone())
                        .chain(
                            shown
                                .iter()
                                .map(|&i| self.ratio(row, i).map_or("-".to_string(), ratio_text)),
                        )
                        .collect()
                })
                .collect();
            tables.push(Table {
                title: format!("ratio to {b} (median / median{clock})"),
                header: std::iter::once("workload".to_string())
                    .chain(shown.iter().map(|&i| self.engines[i].0.clone()))
                    .collect(),
                rows,
            });
        }
        notes.extend(self.notes.iter().cloned());
        (tables, notes)
    }

    /// The report as text tables.
    pub fn text(&self) -> String {
        let mut out = format!(
            "bt86 bench: {} suite, {} run(s) per workload and engine, interleaved ({})\nhost: {}\n",
            self.suite, self.runs, self.date, self.host
        );
        out += "engines:\n";
        for (name, a) in &self.engines {
            let what = match a {
                Availability::Runs(s) => s.clone(),
                Availability::Unavailable(s) => format!("not available: {s}"),
            };
            out += &format!("  {name:<10} {what}\n");
        }
        let (tables, notes) = self.tables();
        for (i, t) in tables.iter().enumerate() {
            // The ratio table is narrower: ratios are short.
            let ratios = self.baseline.is_some() && i + 1 == tables.len();
            out += &t.text(if ratios { 12 } else { 20 });
        }
        if !notes.is_empty() {
            out += "\n";
            for n in notes {
                out += &n;
                out += "\n";
            }
        }
        out
    }

    /// The report as Markdown (for docs/performance.md): what each workload is, the tables
    /// and the footnotes.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "### {} suite: {} run(s) per workload and engine, interleaved\n\nEngines:\n\n",
            self.suite, self.runs
        );
        for (name, a) in &self.engines {
            let what = match a {
                Availability::Runs(s) => s.clone(),
                Availability::Unavailable(s) => format!("not available: {s}"),
            };
            out += &format!("- `{name}`: {what}\n");
        }
        out += "\nWorkloads:\n\n";
        for row in &self.rows {
            out += &format!(
                "- `{}`: {} ({} per run)\n",
                row.workload, row.operation, row.iterations
            );
        }
        let (tables, notes) = self.tables();
        for t in &tables {
            out += &t.markdown();
        }
        if !notes.is_empty() {
            out += "\n";
            for n in notes {
                out += &format!("- {n}\n");
            }
        }
        out
    }

    /// The report as JSON: every number of the text tables, plus the raw samples.
    pub fn json_value(&self) -> Value {
        let u = self.unit.symbol;
        let engines: Vec<Value> = self
            .engines
            .iter()
            .map(|(name, a)| {
                json!({
                    "name": name,
                    "available": a.runs(),
                    "description": a.reason(),
                })
            })
            .collect();
        let workloads: Vec<Value> = self
            .rows
            .iter()
            .map(|row| {
                let mut results = serde_json::Map::new();
                let ru = row.unit.unwrap_or(self.unit).symbol;
                for (i, (cell, (engine, _))) in row.cells.iter().zip(&self.engines).enumerate() {
                    let v = match cell {
                        Cell::Measured(samples) => {
                            let mut v = serde_json::Map::new();
                            v.insert("status".into(), json!("ok"));
                            v.insert(format!("samples_{ru}"), json!(samples));
                            v.insert(format!("median_{ru}"), json!(cell.median()));
                            v.insert(format!("min_{ru}"), json!(cell.min()));
                            v.insert("ratio_to_baseline".into(), json!(self.ratio(row, i)));
                            for (side, samples) in [("host", &row.host), ("cpu", &row.cpu)] {
                                if let Some(s) = samples.get(i).filter(|s| !s.is_empty()) {
                                    v.insert(format!("{side}_samples_{u}"), json!(s));
                                    v.insert(format!("{side}_median_{u}"), json!(stats::median(s)));
                                    v.insert(format!("{side}_min_{u}"), json!(stats::min(s)));
                                }
                            }
                            Value::Object(v)
                        }
                        Cell::Failed { reason, log } => json!({
                            "status": "failed",
                            "reason": reason,
                            "log": log,
                        }),
                        Cell::Unavailable(reason) => json!({
                            "status": "unavailable",
                            "reason": reason,
                        }),
                    };
                    results.insert(engine.clone(), v);
                }
                json!({
                    "name": row.workload,
                    "unit": row.unit.unwrap_or(self.unit).what,
                    "operation": row.operation,
                    "iterations": row.iterations,
                    "results": results,
                })
            })
            .collect();
        json!({
            "suite": self.suite,
            "runs": self.runs,
            "date": self.date,
            "host": self.host,
            "unit": self.unit.what,
            "clock": self.unit.clock,
            "host_clock": self.has_host_clock().then_some(HOST_CLOCK),
            "host_cpu": self.has_host_cpu().then_some(HOST_CPU),
            "notes": self.notes,
            "baseline": self.baseline,
            "engines": engines,
            "workloads": workloads,
        })
    }

    /// [`Report::json_value`] as pretty-printed text.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(&self.json_value()).unwrap_or_default() + "\n"
    }
}

/// The current UTC time as "YYYY-MM-DD HH:MM UTC".
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs)
}

/// Seconds since the Unix epoch as "YYYY-MM-DD HH:MM UTC" (proleptic Gregorian calendar).
fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let (hh, mm) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Civil date from a day count: shift the epoch to 0000-03-01 so leap days end each
    // 400-year era's years.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {hh:02}:{mm:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        Report::new(
            "nano",
            Unit::NS_PER_OP,
            3,
            vec![
                ("bt".into(), Availability::Unavailable("not built".into())),
                ("interp".into(), Availability::Runs("bt86 interp".into())),
                ("qemu-tcg".into(), Availability::Runs("QEMU 10".into())),
            ],
            Some("qemu-tcg".into()),
            vec![
                Row {
                    workload: "pgfault".into(),
                    operation: "a #PF".into(),
                    iterations: 100,
                    cells: vec![
                        Cell::Unavailable("not built".into()),
                        Cell::Measured(vec![3000.0, 1000.0, 2000.0]),
                        Cell::Measured(vec![500.0, 400.0, 600.0]),
                    ],
                    host: Vec::new(),
                    cpu: Vec::new(),
                    unit: None,
                },
                Row {
                    workload: "ptemod".into(),
                    operation: "a PTE write".into(),
                    iterations: 100,
                    cells: vec![
                        Cell::Unavailable("not built".into()),
                        Cell::Failed {
                            reason: "exit status 4".into(),
                            log: Some("logs/interp-ptemod-run1.log".into()),
                        },
                        Cell::Measured(vec![7.5]),
                    ],
                    host: Vec::new(),
                    cpu: Vec::new(),
                    unit: None,
                },
            ],
            "test host".into(),
        )
    }

    #[test]
    fn text_shows_medians_minimums_ratios_failures_and_unavailable_engines() {
        let t = sample().text();
        assert!(t.contains("2000 (1000)"), "{t}");
        assert!(t.contains("500 (400)"), "{t}");
        assert!(t.contains("4.00x"), "{t}");
        assert!(t.contains("1.00x"), "{t}");
        assert!(t.contains("failed [1]"), "{t}");
        assert!(
            t.contains("[1] interp ptemod: exit status 4; log: logs/interp-ptemod-run1.log"),
            "{t}"
        );
        assert!(t.contains("bt         not available: not built"), "{t}");
        assert!(t.contains("n/a"), "{t}");
        assert!(t.contains("7.50 (7.50)"), "{t}");
    }

    #[test]
    fn json_holds_every_number_of_the_table() {
        let v: Value = serde_json::from_str(&sample().json()).unwrap();
        let pf = &v["workloads"][0]["results"];
        assert_eq!(pf["interp"]["median_ns"], 2000.0);
        assert_eq!(pf["interp"]["min_ns"], 1000.0);
        assert_eq!(pf["interp"]["ratio_to_baseline"], 4.0);
        assert_eq!(pf["qemu-tcg"]["ratio_to_baseline"], 1.0);
        assert_eq!(pf["interp"]["samples_ns"].as_array().unwrap().len(), 3);
        assert_eq!(pf["bt"]["status"], "unavailable");
        let pte = &v["workloads"][1]["results"];
        assert_eq!(pte["interp"]["status"], "failed");
        assert_eq!(pte["interp"]["log"], "logs/interp-ptemod-run1.log");
        assert_eq!(v["baseline"], "qemu-tcg");
        assert_eq!(v["engines"][0]["available"], false);
    }

    /// A linux-suite report: two clocks, one failure shared by two rows, one engine that does
    /// not apply to the boot row.
    fn linux_sample() -> Report {
        let failed = || Cell::Failed {
            reason: "kvm exited with status 8".into(),
            log: Some("logs/kvm-linux-run1.log".into()),
        };
        Report::new(
            "linux",
            Unit::MS_PER_STEP,
            2,
            vec![
                ("bt".into(), Availability::Runs("bt86 bt".into())),
                ("kvm".into(), Availability::Runs("KVM via PVM".into())),
                ("native".into(), Availability::Runs("chroot".into())),
            ],
            Some("bt".into()),
            vec![
                Row {
                    workload: "boot".into(),
                    operation: "kernel boot".into(),
                    iterations: 1,
                    cells: vec![
                        Cell::Measured(vec![4000.0, 5000.0]),
                        failed(),
                        Cell::Unavailable("kernel-side".into()),
                    ],
                    host: vec![vec![8000.0, 9000.0], Vec::new(), Vec::new()],
                    cpu: Vec::new(),
                    unit: None,
                },
                Row {
                    workload: "fork".into(),
                    operation: "fork".into(),
                    iterations: 500,
                    cells: vec![
                        Cell::Measured(vec![120.0, 100.0]),
                        failed(),
                        Cell::Measured(vec![10.0, 12.0]),
                    ],
                    host: vec![vec![130.0, 110.0], Vec::new(), vec![11.0, 13.0]],
                    cpu: Vec::new(),
                    unit: None,
                },
            ],
            "test host".into(),
        )
    }

    #[test]
    fn linux_reports_show_both_clocks_and_one_footnote_per_failure() {
        let r = linux_sample();
        let t = r.text();
        assert!(t.contains("ms per step, guest clock, median (min)"), "{t}");
        assert!(
            t.contains("ms per step, host clock: console line arrival, median (min)"),
            "{t}"
        );
        assert!(t.contains("4500 (4000)"), "{t}");
        assert!(t.contains("8500 (8000)"), "{t}");
        assert!(t.contains("120 (110)"), "{t}");
        assert!(t.contains("12.0 (11.0)"), "{t}");
        assert!(t.contains("0.100x"), "{t}");
        assert_eq!(t.matches("failed [1]").count(), 4, "{t}");
        assert!(!t.contains("[2]"), "{t}");
        assert!(
            t.contains(
                "[1] kvm boot, fork: kvm exited with status 8; log: logs/kvm-linux-run1.log"
            ),
            "{t}"
        );
        let md = r.markdown();
        assert!(md.contains("| workload | bt | kvm | native |"), "{md}");
        assert!(
            md.contains("| boot | 4500 (4000) | failed [1] | n/a |"),
            "{md}"
        );
        assert!(
            md.contains("| fork | 110 (100) | failed [1] | 11.0 (10.0) |"),
            "{md}"
        );
        assert!(md.contains("- `fork`: fork (500 per run)"), "{md}");
        assert!(md.contains("- `kvm`: KVM via PVM"), "{md}");

        let v: Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v["unit"], "ms per step");
        assert_eq!(v["clock"], "guest clock");
        let boot = &v["workloads"][0]["results"];
        assert_eq!(boot["bt"]["median_ms"], 4500.0);
        assert_eq!(boot["bt"]["host_median_ms"], 8500.0);
        assert_eq!(boot["bt"]["host_min_ms"], 8000.0);
        assert_eq!(boot["native"]["status"], "unavailable");
        assert_eq!(boot["kvm"]["status"], "failed");
        let fork = &v["workloads"][1]["results"];
        assert_eq!(fork["native"]["ratio_to_baseline"], 0.1);
        assert_eq!(
            fork["native"]["host_samples_ms"].as_array().unwrap().len(),
            2
        );
        assert!(fork["native"].get("median_ns").is_none(), "{fork}");
    }

    /// A linux-suite report with the host CPU column and the idle row (in % of a core).
    fn idle_sample() -> Report {
        Report::new(
            "linux",
            Unit::MS_PER_STEP,
            3,
            vec![
                ("bt".into(), Availability::Runs("bt86 bt".into())),
                ("qemu-tcg".into(), Availability::Runs("QEMU".into())),
                ("native".into(), Availability::Runs("chroot".into())),
            ],
            Some("qemu-tcg".into()),
            vec![
                Row {
                    workload: "fork".into(),
                    operation: "fork".into(),
                    iterations: 500,
                    cells: vec![
                        Cell::Measured(vec![120.0, 100.0, 110.0]),
                        Cell::Measured(vec![40.0, 50.0, 45.0]),
                        Cell::Measured(vec![10.0, 12.0, 11.0]),
                    ],
                    host: vec![
                        vec![130.0, 110.0, 120.0],
                        vec![41.0, 51.0, 46.0],
                        vec![11.0, 13.0, 12.0],
                    ],
                    // Native: no CPU time followed.
                    cpu: vec![
                        vec![125.0, 105.0, 115.0],
                        vec![60.0, 70.0, 65.0],
                        Vec::new(),
                    ],
                    unit: None,
                },
                Row {
                    workload: "idle".into(),
                    operation: "host CPU while the guest sleeps, seconds".into(),
                    iterations: 30,
                    cells: vec![
                        Cell::Measured(vec![2.5, 3.0, 2.4]),
                        Cell::Measured(vec![1.2, 1.25, 1.3]),
                        Cell::Unavailable("native has no engine".into()),
                    ],
                    host: vec![
                        vec![30_000.0, 30_000.0, 30_000.0],
                        vec![30_010.0, 30_000.0, 30_020.0],
                        Vec::new(),
                    ],
                    cpu: vec![
                        vec![750.0, 900.0, 720.0],
                        vec![360.0, 375.0, 390.0],
                        Vec::new(),
                    ],
                    unit: Some(Unit::PERCENT_OF_CORE),
                },
            ],
            "test host".into(),
        )
        .with_notes(vec!["Host CPU: what it is.".into()])
    }

    #[test]
    fn the_host_cpu_table_and_the_idle_row_in_percent_of_a_core() {
        let r = idle_sample();
        let t = r.text();
        let cpu_at = t
            .find("ms per step, host CPU time of the engine process (all threads), median (min)")
            .expect(&t);
        let ratio_at = t.find("ratio to qemu-tcg").expect(&t);
        let cpu_table = &t[cpu_at..ratio_at];
        let line = |table: &str, name: &str| -> String {
            table
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .unwrap_or_else(|| panic!("no {name} row in {table}"))
                .to_string()
        };
        // CPU time per engine; native's is not followed.
        let fork = line(cpu_table, "fork");
        assert!(
            fork.contains("115 (105)") && fork.contains("65.0 (60.0)"),
            "{t}"
        );
        assert!(fork.trim_end().ends_with("n/a"), "{t}");
        assert!(line(cpu_table, "idle").contains("750 (720)"), "{t}");
        // The idle row's cells are percentages in the main table, its ratio their quotient.
        let main = &t[t.find("guest clock, median (min)").expect(&t)..];
        let idle = line(main, "idle");
        assert!(
            idle.contains("2.50% (2.40%)") && idle.contains("1.25% (1.20%)"),
            "{t}"
        );
        assert!(line(&t[ratio_at..], "idle").contains("2.00x"), "{t}");
        assert!(line(main, "fork").contains("110 (100)") && !line(main, "fork").contains('%'));
        assert!(t.contains("Host CPU: what it is."), "{t}");
        // The chart leaves the row in another unit out.
        let charted: Vec<&str> = r.medians().map(|(w, _)| w).collect();
        assert_eq!(charted, ["fork"]);

        let md = r.markdown();
        assert!(
            md.contains("| idle | 2.50% (2.40%) | 1.25% (1.20%) | n/a |"),
            "{md}"
        );
        assert!(
            md.contains("| fork | 115 (105) | 65.0 (60.0) | n/a |"),
            "{md}"
        );
        assert!(md.contains("- Host CPU: what it is."), "{md}");

        let v: Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(
            v["host_cpu"],
            "host CPU time of the engine process (all threads)"
        );
        assert_eq!(v["notes"][0], "Host CPU: what it is.");
        let fork = &v["workloads"][0];
        assert_eq!(fork["unit"], "ms per step");
        assert_eq!(fork["results"]["bt"]["cpu_median_ms"], 115.0);
        assert_eq!(fork["results"]["bt"]["cpu_min_ms"], 105.0);
        assert_eq!(
            fork["results"]["bt"]["cpu_samples_ms"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        assert!(fork["results"]["native"].get("cpu_median_ms").is_none());
        let idle = &v["workloads"][1];
        assert_eq!(idle["unit"], "% of one host core");
        let bt = &idle["results"]["bt"];
        assert_eq!(bt["median_pct"], 2.5);
        assert_eq!(bt["min_pct"], 2.4);
        assert_eq!(bt["ratio_to_baseline"], 2.0);
        assert_eq!(bt["cpu_median_ms"], 750.0);
        assert_eq!(bt["host_median_ms"], 30_000.0);
        assert!(bt.get("median_ms").is_none(), "{bt}");
        assert_eq!(idle["results"]["native"]["status"], "unavailable");
    }

    #[test]
    fn ratios_keep_three_significant_digits() {
        assert_eq!(ratio_text(1234.4), "1234x");
        assert_eq!(ratio_text(12.345), "12.3x");
        assert_eq!(ratio_text(1.0), "1.00x");
        assert_eq!(ratio_text(0.0123), "0.0123x");
        assert_eq!(ratio_text(0.5), "0.500x");
    }

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(format_utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(format_utc(1_795_349_100), "2026-11-22 12:05 UTC");
    }
}
