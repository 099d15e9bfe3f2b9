//! `bt86 bench --update-docs FILE`: the latest tables, with the date, the host and the command
//! that made them, written into docs/performance.md between two marker lines (the rest of the
//! file, the history of earlier measurements, is left as it is).

use std::path::Path;

use anyhow::Context;

use super::engines;
use super::report::Report;

/// The line that opens the generated section.
const BEGIN: &str = "<!-- bt86 bench --update-docs: begin (generated; edits between the markers are overwritten) -->";
/// The line that closes it.
const END: &str = "<!-- bt86 bench --update-docs: end -->";

/// The generated section for `reports`, made by `command`.
pub fn section(reports: &[&Report], command: &str) -> String {
    let date = reports.first().map_or("", |r| r.date());
    let host = reports.first().map_or("", |r| r.host());
    let build = if cfg!(debug_assertions) {
        "a debug build (bt86's own engines run several times slower than in a release build)"
    } else {
        "a release build"
    };
    let mut out = format!(
        "{BEGIN}\n## Latest full table ({date})\n\n\
         Regenerate with `scripts/bench-docs.sh` (it builds a release bt86, fetches the guest and \
         runs `bt86 bench --suite all ... --update-docs docs/performance.md`). This table came from \
         `{command}`, {build}.\n\n\
         - Host: {host}.\n\
         - KVM: {}.\n\
         - The machine is shared: other builds may have run at the same time, so minimums are the \
         steadier numbers.\n\n",
        engines::kvm_summary()
    );
    for r in reports {
        out += &r.markdown();
        out += "\n";
    }
    out += END;
    out += "\n";
    out
}

/// Puts `section` into `text`: in place of an earlier generated section, else after the first
/// "# " title (or at the top).
fn splice(text: &str, section: &str) -> String {
    if let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END))
        && b < e
    {
        let after = text[e + END.len()..]
            .strip_prefix('\n')
            .unwrap_or(&text[e + END.len()..]);
        return format!("{}{section}{after}", &text[..b]);
    }
    match text.find("\n").filter(|_| text.starts_with("# ")) {
        Some(eol) => format!(
            "{}\n\n{section}\n{}",
            &text[..eol],
            text[eol..].trim_start_matches('\n')
        ),
        None => format!("{section}\n{text}"),
    }
}

/// Writes the reports' tables into the file at `path` (created if missing).
pub fn update(path: &Path, reports: &[&Report], command: &str) -> anyhow::Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    std::fs::write(path, splice(&text, &section(reports, command)))
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_replaces_the_last_one_and_keeps_the_rest() {
        let first = splice("# Measured results\n\n## Older\n\nold table\n", "NEW1\n");
        assert_eq!(
            first,
            "# Measured results\n\nNEW1\n\n## Older\n\nold table\n"
        );
        // Without markers the section goes under the title; with them, in their place.
        let with = splice(
            "# Measured results\n\nintro\n",
            &format!("{BEGIN}\nA\n{END}\n"),
        );
        assert!(
            with.starts_with(&format!("# Measured results\n\n{BEGIN}\nA\n{END}\n")),
            "{with}"
        );
        let again = splice(&with, &format!("{BEGIN}\nB\n{END}\n"));
        assert!(
            again.contains("\nB\n") && !again.contains("\nA\n"),
            "{again}"
        );
        assert!(again.ends_with("\nintro\n"), "{again}");
        assert_eq!(again.matches(BEGIN).count(), 1, "{again}");
        assert_eq!(splice("", "S\n"), "S\n\n");
    }

    #[test]
    fn the_section_carries_the_idle_row_and_the_host_cpu_table() {
        use super::super::engines::Availability;
        use super::super::report::{Cell, Row, Unit};
        let row = |workload: &str, cells: Vec<f64>, unit: Option<Unit>| Row {
            workload: workload.into(),
            operation: "op".into(),
            iterations: 1,
            cells: vec![Cell::Measured(cells)],
            host: vec![vec![30_000.0]],
            cpu: vec![vec![900.0]],
            unit,
        };
        let report = Report::new(
            "linux",
            Unit::MS_PER_STEP,
            1,
            vec![("bt".into(), Availability::Runs("bt86 bt".into()))],
            Some("bt".into()),
            vec![
                row("awk", vec![130.0], None),
                row("idle", vec![3.0], Some(Unit::PERCENT_OF_CORE)),
            ],
            "test host".into(),
        )
        .with_notes(vec!["idle: what the row is.".into()]);
        let s = section(&[&report], "bt86 bench --suite linux");
        assert!(
            s.starts_with(BEGIN) && s.ends_with(&format!("{END}\n")),
            "{s}"
        );
        assert!(s.contains("| idle | 3.00% (3.00%) |"), "{s}");
        assert!(
            s.contains("ms per step, host CPU time of the engine process (all threads)"),
            "{s}"
        );
        assert!(s.contains("| idle | 900 (900) |"), "{s}");
        assert!(s.contains("- idle: what the row is."), "{s}");
    }
}
