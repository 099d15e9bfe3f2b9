//! `bt86 bench` end to end: it runs the nano suite on the engines that exist here, reports the
//! ones that do not, and its JSON holds every number of its text table. No timing is asserted.

use std::path::{Path, PathBuf};
use std::process::Command;

fn bt86(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bt86"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run bt86");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn qemu_installed() -> bool {
    Command::new("qemu-system-i386")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn nano_suite_reports_every_engine_and_json_matches_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let mut engines = "interp,native".to_string();
    if qemu_installed() {
        engines += ",qemu-tcg";
    } else {
        eprintln!("SKIPPED the qemu-tcg column: qemu-system-i386 is not installed");
    }
    let (status, stdout, stderr) = bt86(
        dir.path(),
        &[
            "bench",
            "--suite",
            "nano",
            "--engines",
            &engines,
            "--runs",
            "2",
            "--iterations",
            "200",
            "--workloads",
            "pgfault,call-ret,divzero",
            "--json",
            "out.json",
            "--plot",
            "out.svg",
        ],
    );
    assert_eq!(status, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("native     the host CPU"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out.json")).unwrap())
            .unwrap();
    assert_eq!(json["runs"], 2);
    let workloads = json["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 3);
    for w in workloads {
        let name = w["name"].as_str().unwrap();
        let interp = &w["results"]["interp"];
        assert_eq!(interp["status"], "ok", "{name}: {interp}");
        let samples = interp["samples_ns"].as_array().unwrap();
        assert_eq!(samples.len(), 2, "{name}");
        let median = interp["median_ns"].as_f64().unwrap();
        let min = interp["min_ns"].as_f64().unwrap();
        assert!(
            median > 0.0 && min > 0.0 && min <= median,
            "{name}: {interp}"
        );
        // The table prints the same median and minimum.
        let row = stdout
            .lines()
            .find(|l| l.starts_with(name) && l.contains('('))
            .unwrap_or_else(|| panic!("no row for {name}: {stdout}"));
        assert!(
            row.contains(&median_min(median, min)),
            "{name}: {row} vs {interp}"
        );
        // Only the unprivileged operation runs natively.
        let native = &w["results"]["native"];
        if name == "call-ret" {
            assert_eq!(native["status"], "ok", "{native}");
            assert!(native["median_ns"].as_f64().unwrap() > 0.0, "{native}");
        } else {
            assert_eq!(native["status"], "unavailable", "{name}: {native}");
        }
    }
    let svg = std::fs::read_to_string(dir.path().join("out.svg")).unwrap();
    assert!(svg.contains("pgfault") && svg.contains("<rect"), "{svg}");
}

#[test]
fn bad_bench_arguments_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (status, _, stderr) = bt86(dir.path(), &["bench", "--workloads", "nosuch"]);
    assert_eq!(status, Some(2));
    assert!(
        stderr.contains("nosuch") && stderr.contains("pgfault"),
        "{stderr}"
    );
    let (status, _, stderr) = bt86(dir.path(), &["bench", "--plot", "chart.gif"]);
    assert_eq!(status, Some(2));
    assert!(
        stderr.contains("chart.gif") && stderr.contains(".svg"),
        "{stderr}"
    );
}

/// The release build of bt86 (Linux on a debug build's engines takes far longer):
/// `$BT86_LINUX_BIN`, else target/release/bt86 beside the debug binary under test.
fn release_bt86() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BT86_LINUX_BIN") {
        return Some(p.into());
    }
    let debug = Path::new(env!("CARGO_BIN_EXE_bt86"));
    let release = debug.parent()?.parent()?.join("release/bt86");
    release.is_file().then_some(release)
}

/// The Debian guest scripts/fetch-guest.sh fetched (scripts/test.sh runs it).
fn debian_guest() -> Option<PathBuf> {
    let dir = match std::env::var_os("BT86_GUEST_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.bt86-cache/guest"),
    };
    (dir.join("vmlinuz").is_file() && dir.join("initramfs.gz").is_file()).then_some(dir)
}

/// The table cell text bt86 bench prints for a median and a minimum.
fn median_min(median: f64, min: f64) -> String {
    median_min_in(median, min, "")
}

/// The same, each number followed by `suffix` (the idle row's "%").
fn median_min_in(median: f64, min: f64, suffix: &str) -> String {
    let shown = |v: f64| {
        if v >= 100.0 {
            format!("{v:.0}")
        } else if v >= 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.2}")
        }
    };
    format!("{}{suffix} ({}{suffix})", shown(median), shown(min))
}

#[test]
fn linux_suite_on_bt_reports_every_step_and_json_matches_both_tables() {
    let (Some(bin), Some(guest)) = (release_bt86(), debian_guest()) else {
        eprintln!(
            "SKIPPED: needs a release build of bt86 and scripts/fetch-guest.sh's guest \
             (scripts/test.sh provides both)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(bin)
        .current_dir(dir.path())
        .args([
            "bench",
            "--suite",
            "linux",
            "--engines",
            "bt",
            "--runs",
            "1",
            // The idle step's length does not change what is checked here.
            "--idle-seconds",
            "2",
        ])
        .args(["--json", "out.json", "--guest"])
        .arg(&guest)
        .output()
        .expect("run bt86 bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out.json")).unwrap())
            .unwrap();
    assert_eq!(json["suite"], "linux");
    assert_eq!(json["unit"], "ms per step");
    let names: Vec<&str> = json["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "boot",
            "awk",
            "md5sum",
            "fork-exec",
            "fork",
            "dd",
            "page-touch",
            "disk-seq-write-virtio",
            "disk-seq-read-virtio",
            "disk-rand-read-virtio",
            "disk-rand-write-virtio",
            "disk-seq-write-ide",
            "disk-seq-read-ide",
            "disk-rand-read-ide",
            "disk-rand-write-ide",
            "disk-ext2-virtio",
            "idle"
        ]
    );
    // The three tables, by their titles.
    let guest_at = stdout
        .find("ms per step, guest clock")
        .expect("guest-clock table");
    let host_at = stdout
        .find("ms per step, host clock")
        .expect("host-clock table");
    let cpu_at = stdout
        .find("ms per step, host CPU time of the engine process")
        .expect("host CPU table");
    let (guest_table, host_table, cpu_table) = (
        &stdout[guest_at..host_at],
        &stdout[host_at..cpu_at],
        &stdout[cpu_at..],
    );
    let host_cpus = std::thread::available_parallelism().unwrap().get() as f64;
    let row = |table: &str, name: &str| -> String {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} row in {table}"))
            .to_string()
    };
    for w in json["workloads"].as_array().unwrap() {
        let name = w["name"].as_str().unwrap();
        let bt = &w["results"]["bt"];
        match bt["status"].as_str().unwrap() {
            "ok" => {
                let num = |k: &str| bt[k].as_f64().unwrap_or_else(|| panic!("{name} {k}: {bt}"));
                // The engine's host CPU time in the step: there, and no more than every host
                // CPU busy for the whole step (1 ms for the two readings' own skew).
                let (cpu, wall) = (num("cpu_median_ms"), num("host_median_ms"));
                assert!(cpu >= 0.0 && cpu <= wall * host_cpus + 1.0, "{name}: {bt}");
                let cpu_cell = median_min(cpu, num("cpu_min_ms"));
                assert!(
                    row(cpu_table, name).contains(&cpu_cell),
                    "{name}: {bt}\n{stdout}"
                );
                let guest_cell = if name == "idle" {
                    // % of one host core: the CPU time over the wall time.
                    assert_eq!(w["unit"], "% of one host core");
                    let pct = num("median_pct");
                    assert!((pct - cpu / wall * 100.0).abs() < 1e-6, "{bt}");
                    assert!(pct >= 0.0 && pct <= 100.0 * host_cpus + 1.0, "{bt}");
                    median_min_in(pct, num("min_pct"), "%")
                } else {
                    assert_eq!(w["unit"], "ms per step");
                    assert_eq!(bt["samples_ms"].as_array().unwrap().len(), 1, "{bt}");
                    assert!(num("median_ms") > 0.0 && wall > 0.0, "{bt}");
                    median_min(num("median_ms"), num("min_ms"))
                };
                let host_cell = median_min(num("host_median_ms"), num("host_min_ms"));
                assert!(
                    row(guest_table, name).contains(&guest_cell),
                    "{name}: {bt}\n{stdout}"
                );
                assert!(
                    row(host_table, name).contains(&host_cell),
                    "{name}: {bt}\n{stdout}"
                );
            }
            "failed" => {
                // Shown as failed, with the reason in a footnote and the log kept.
                assert!(row(guest_table, name).contains("failed ["), "{stdout}");
                let reason = bt["reason"].as_str().unwrap();
                assert!(stdout.contains(reason), "{reason}\n{stdout}");
                let log = bt["log"].as_str().expect("a failure keeps its log");
                assert!(dir.path().join(log).is_file(), "{log}");
            }
            other => panic!("{name}: status {other}: {bt}"),
        }
    }
    // bt boots the guest to the benchmark /init and runs a user-space step.
    assert_eq!(
        json["workloads"][0]["results"]["bt"]["status"], "ok",
        "{stdout}"
    );
    assert_eq!(
        json["workloads"][1]["results"]["bt"]["status"], "ok",
        "{stdout}"
    );
}
