//! The bench chart: one group of horizontal bars per workload, one bar per engine, on a
//! logarithmic nanosecond axis (engines differ by orders of magnitude), as standalone SVG.

use super::report::Report;

const COLOURS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];
const LEFT: f64 = 150.0;
const WIDTH: f64 = 900.0;
const BAR: f64 = 12.0;
const GAP: f64 = 10.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Renders an SVG document as a PNG image, with the host's fonts for its text.
pub fn png(svg: &str) -> Result<Vec<u8>, String> {
    use resvg::{tiny_skia, usvg};
    let mut options = usvg::Options::default();
    options.fontdb_mut().load_system_fonts();
    if options.fontdb.is_empty() {
        tracing::warn!("no fonts found on this host: the PNG chart has no labels");
    }
    let tree = usvg::Tree::from_str(svg, &options).map_err(|e| e.to_string())?;
    let size = tree.size().to_int_size();
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| "the chart has no area".to_string())?;
    resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
    pixmap.encode_png().map_err(|e| e.to_string())
}

/// Draws the medians of each report, one chart under the other.
pub fn svg(reports: &[&Report]) -> String {
    let mut body = String::new();
    let mut y = 0.0;
    for r in reports {
        let (part, height) = chart(r, y);
        body += &part;
        y += height;
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{y}\" \
         font-family=\"DejaVu Sans, Liberation Sans, Arial, sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n"
    )
}

/// One report's chart, its top at `y0`, and its height.
fn chart(report: &Report, y0: f64) -> (String, f64) {
    let unit = report.unit();
    let engines: Vec<&str> = report.engine_names().collect();
    let rows: Vec<(&str, Vec<Option<f64>>)> = report.medians().collect();
    let values = rows.iter().flat_map(|(_, v)| v.iter().flatten().copied());
    let (lo, hi) = values.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    // Whole decades around the data.
    let (d0, d1) = if lo <= hi && lo > 0.0 {
        (
            lo.log10().floor(),
            hi.log10().ceil().max(lo.log10().floor() + 1.0),
        )
    } else {
        (0.0, 1.0)
    };
    let x = |v: f64| LEFT + (v.log10() - d0) / (d1 - d0) * (WIDTH - LEFT - 20.0);
    let group = engines.len() as f64 * BAR + GAP;
    let top = y0 + 40.0 + 18.0 * engines.len() as f64;
    let height = top - y0 + group * rows.len() as f64 + 40.0;
    let clock = unit.clock.map(|c| format!(", {c}")).unwrap_or_default();

    let mut s = format!(
        "<text x=\"10\" y=\"{}\" font-size=\"14\">bt86 bench, {} suite: {}{clock} (median, log scale)</text>\n",
        y0 + 18.0,
        escape(report.suite()),
        unit.what
    );
    for (i, e) in engines.iter().enumerate() {
        let y = y0 + 30.0 + 18.0 * i as f64;
        s += &format!(
            "<rect x=\"10\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{}\"/>\
             <text x=\"28\" y=\"{}\">{}</text>\n",
            COLOURS[i % COLOURS.len()],
            y + 10.0,
            escape(e)
        );
    }
    let mut decade = d0;
    while decade <= d1 {
        let gx = x(10f64.powf(decade));
        let bottom = y0 + height - 30.0;
        s += &format!(
            "<line x1=\"{gx:.1}\" y1=\"{top}\" x2=\"{gx:.1}\" y2=\"{bottom}\" stroke=\"#ccc\"/>\
             <text x=\"{gx:.1}\" y=\"{}\" text-anchor=\"middle\">{} {}</text>\n",
            bottom + 14.0,
            10f64.powf(decade),
            unit.symbol
        );
        decade += 1.0;
    }
    for (r, (name, medians)) in rows.iter().enumerate() {
        let gy = top + group * r as f64;
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\n",
            LEFT - 6.0,
            gy + group / 2.0,
            escape(name)
        );
        for (i, m) in medians.iter().enumerate() {
            let y = gy + BAR * i as f64;
            match m {
                Some(v) => {
                    s += &format!(
                        "<rect x=\"{LEFT}\" y=\"{y}\" width=\"{:.1}\" height=\"{}\" fill=\"{}\">\
                         <title>{}: {v:.2} {}</title></rect>\n",
                        (x(*v) - LEFT).max(1.0),
                        BAR - 2.0,
                        COLOURS[i % COLOURS.len()],
                        escape(engines[i]),
                        unit.symbol
                    );
                }
                None => {
                    s += &format!(
                        "<text x=\"{}\" y=\"{}\" fill=\"#888\">{}: no result</text>\n",
                        LEFT + 4.0,
                        y + BAR - 3.0,
                        escape(engines[i])
                    );
                }
            }
        }
    }
    (s, height)
}

#[cfg(test)]
mod tests {
    use super::super::engines::Availability;
    use super::super::report::{Cell, Row, Unit};
    use super::*;

    #[test]
    fn bars_are_drawn_per_engine_and_missing_results_are_labelled() {
        let report = Report::new(
            "nano",
            Unit::NS_PER_OP,
            1,
            vec![
                ("interp".into(), Availability::Runs("i".into())),
                ("kvm".into(), Availability::Runs("k".into())),
            ],
            None,
            vec![Row {
                workload: "in<1>".into(),
                operation: "x".into(),
                iterations: 1,
                cells: vec![
                    Cell::Measured(vec![1000.0]),
                    Cell::Failed {
                        reason: "r".into(),
                        log: None,
                    },
                ],
                host: Vec::new(),
                cpu: Vec::new(),
                unit: None,
            }],
            "h".into(),
        );
        let svg = svg(&[&report]);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("<title>interp: 1000.00 ns</title>"), "{svg}");
        assert!(svg.contains("kvm: no result"), "{svg}");
        assert!(svg.contains("in&lt;1&gt;"), "{svg}");
        assert!(svg.contains("1000 ns"), "{svg}");
        let png = png(&svg).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    }
}
