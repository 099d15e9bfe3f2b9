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
}

/// A whole bench run.
#[derive(Debug, Clone)]
pub struct Report {
    suite: String,
    runs: u32,
    date: String,
    host: String,
    engines: Vec<(String, Availability)>,
    baseline: Option<String>,
    rows: Vec<Row>,
}

/// Formats nanoseconds with about three significant digits.
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

impl Report {
    /// A report of `rows`, taken now.
    pub fn new(
        suite: &str,
        runs: u32,
        engines: Vec<(String, Availability)>,
        baseline: Option<String>,
        rows: Vec<Row>,
        host: String,
    ) -> Self {
        Report {
            suite: suite.to_string(),
            runs,
            date: utc_now(),
            host,
            engines,
            baseline,
            rows,
        }
    }

    /// The engine column names.
    pub fn engine_names(&self) -> impl Iterator<Item = &str> {
        self.engines.iter().map(|(n, _)| n.as_str())
    }

    /// (workload, medians per engine column).
    pub fn medians(&self) -> impl Iterator<Item = (&str, Vec<Option<f64>>)> {
        self.rows.iter().map(|r| {
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
        let width = 20;
        let mut notes = Vec::new();
        out += "\nns per operation, median (min)\n";
        out += &format!("{:<18}", "workload");
        for (name, _) in &self.engines {
            out += &format!("{name:>width$}");
        }
        out += "\n";
        for row in &self.rows {
            out += &format!("{:<18}", row.workload);
            for (cell, (engine, _)) in row.cells.iter().zip(&self.engines) {
                let text = match cell {
                    Cell::Measured(_) => match (cell.median(), cell.min()) {
                        (Some(m), Some(lo)) => format!("{} ({})", ns(m), ns(lo)),
                        _ => "-".into(),
                    },
                    Cell::Failed { reason, log } => {
                        notes.push(format!(
                            "[{}] {engine} {}: {reason}{}",
                            notes.len() + 1,
                            row.workload,
                            log.as_deref()
                                .map(|l| format!("; log: {l}"))
                                .unwrap_or_default()
                        ));
                        format!("failed [{}]", notes.len())
                    }
                    Cell::Unavailable(_) => "n/a".into(),
                };
                out += &format!("{text:>width$}");
            }
            out += "\n";
        }
        if let Some(b) = &self.baseline {
            out += &format!("\nratio to {b} (median / median)\n");
            out += &format!("{:<18}", "workload");
            let shown: Vec<usize> = (0..self.engines.len())
                .filter(|&i| self.engines[i].1.runs())
                .collect();
            for &i in &shown {
                out += &format!("{:>12}", self.engines[i].0);
            }
            out += "\n";
            for row in &self.rows {
                out += &format!("{:<18}", row.workload);
                for &i in &shown {
                    let text = self.ratio(row, i).map_or("-".to_string(), ratio_text);
                    out += &format!("{text:>12}");
                }
                out += "\n";
            }
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

    /// The report as JSON: every number of the text tables, plus the raw samples.
    pub fn json(&self) -> String {
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
                for (i, (cell, (engine, _))) in row.cells.iter().zip(&self.engines).enumerate() {
                    let v = match cell {
                        Cell::Measured(samples) => json!({
                            "status": "ok",
                            "samples_ns": samples,
                            "median_ns": cell.median(),
                            "min_ns": cell.min(),
                            "ratio_to_baseline": self.ratio(row, i),
                        }),
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
                    "operation": row.operation,
                    "iterations": row.iterations,
                    "results": results,
                })
            })
            .collect();
        let doc = json!({
            "suite": self.suite,
            "runs": self.runs,
            "date": self.date,
            "host": self.host,
            "unit": "ns per operation",
            "baseline": self.baseline,
            "engines": engines,
            "workloads": workloads,
        });
        serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
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
