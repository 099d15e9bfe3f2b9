//! `bt86 bench` end to end: it runs the nano suite on the engines that exist here, reports the
//! ones that do not, and its JSON holds every number of its text table. No timing is asserted.

use std::path::Path;
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
        let shown = |v: f64| {
            if v >= 100.0 {
                format!("{v:.0}")
            } else if v >= 10.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.2}")
            }
        };
        assert!(
            row.contains(&format!("{} ({})", shown(median), shown(min))),
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
