//! The bench's table, its JSON record and the latency plot (SVG, no plotting dependency).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Value, json};

pub struct Report {
    run: String,
    args: BTreeMap<&'static str, Value>,
    /// (name, figures, ratio keel / baseline, target ratio or NaN).
    scenarios: Vec<(String, Value, f64, f64)>,
    /// (name, value, limit, higher is better).
    targets: Vec<(String, f64, f64, bool)>,
    memory: BTreeMap<String, f64>,
    series: Vec<(String, Vec<f64>)>,
}

impl Report {
    pub fn new(run: &str, args: &BTreeMap<&'static str, Value>) -> Self {
        Self {
            run: run.to_owned(),
            args: args.clone(),
            scenarios: Vec::new(),
            targets: Vec::new(),
            memory: BTreeMap::new(),
            series: Vec::new(),
        }
    }

    pub fn scenario(&mut self, name: &str, figures: Value, ratio: f64, target: f64) {
        eprintln!("bench: {name}: ratio {ratio:.2} {figures}");
        self.scenarios
            .push((name.to_owned(), figures, ratio, target));
    }

    pub fn target(&mut self, name: &str, value: f64, limit: f64, higher_is_better: bool) {
        self.targets
            .push((name.to_owned(), value, limit, higher_is_better));
    }

    /// Keeps the highest peak seen for `service`.
    pub fn memory(&mut self, service: &str, mib: Option<f64>) {
        if let Some(mib) = mib {
            let peak = self.memory.entry(service.to_owned()).or_insert(0.0);
            *peak = peak.max(mib);
        }
    }

    pub fn peak_memory(&self) -> Vec<(String, f64)> {
        self.memory.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Sorted latencies (ms) for the plot.
    pub fn series(&mut self, name: &str, sorted_ms: Vec<f64>) {
        self.series.push((name.to_owned(), sorted_ms));
    }

    fn verdict(ok: bool) -> &'static str {
        if ok { "met" } else { "MISSED" }
    }

    pub fn finish(&self, out: &Path) -> anyhow::Result<()> {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "\nkeel bench {} (ratios against raw baselines measured in this run)\n",
            self.run
        );
        let _ = writeln!(
            text,
            "{:<28} {:>8} {:>8}  verdict",
            "scenario", "ratio", "target"
        );
        for (name, _, ratio, target) in &self.scenarios {
            let verdict = if target.is_nan() {
                "-"
            } else {
                Self::verdict(ratio >= target)
            };
            let target = if target.is_nan() {
                "-".to_owned()
            } else {
                format!("≥ {target:.2}")
            };
            let _ = writeln!(text, "{name:<28} {ratio:>8.2} {target:>8}  {verdict}");
        }
        let _ = writeln!(text);
        for (name, value, limit, higher) in &self.targets {
            let ok = if *higher {
                value >= limit
            } else {
                value <= limit
            };
            let sign = if *higher { "≥" } else { "≤" };
            let _ = writeln!(
                text,
                "{name:<36} {value:>10.1} {sign} {limit:<8} {}",
                Self::verdict(ok)
            );
        }
        print!("{text}");

        let record = json!({
            "run": self.run,
            "args": self.args,
            "scenarios": self.scenarios.iter().map(|(n, f, r, t)| json!({
                "name": n, "figures": f, "ratio": r, "target": if t.is_nan() { Value::Null } else { json!(t) },
            })).collect::<Vec<_>>(),
            "targets": self.targets.iter().map(|(n, v, l, h)| json!({
                "name": n, "value": v, "limit": l, "higher_is_better": h,
            })).collect::<Vec<_>>(),
            "peak_rss_mib": self.memory,
        });
        let json_path = out.join(format!("{}.json", self.run));
        std::fs::write(&json_path, serde_json::to_string_pretty(&record)?)?;
        let svg_path = out.join(format!("{}-latency.svg", self.run));
        std::fs::write(&svg_path, self.svg())?;
        println!("\nwrote {} and {}", json_path.display(), svg_path.display());
        Ok(())
    }

    /// Latency distributions as percentile curves: x = percentile, y = milliseconds (log).
    fn svg(&self) -> String {
        let (w, h, left, bottom, top, right) = (760.0, 420.0, 70.0, 50.0, 30.0, 200.0);
        let plot_w = w - left - right;
        let plot_h = h - top - bottom;
        let max = self
            .series
            .iter()
            .flat_map(|(_, s)| s.last().copied())
            .fold(1.0f64, f64::max);
        let min = self
            .series
            .iter()
            .flat_map(|(_, s)| s.first().copied())
            .fold(max, f64::min)
            .max(0.01);
        let (lo, hi) = (
            min.log10().floor(),
            max.log10().ceil().max(min.log10().floor() + 1.0),
        );
        let y = |ms: f64| top + plot_h - (ms.max(min).log10() - lo) / (hi - lo) * plot_h;
        let x = |p: f64| left + p / 100.0 * plot_w;
        let colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];
        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = write!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = write!(
            svg,
            r#"<text x="{left}" y="18" font-size="14">keel bench {}: latency by percentile (ms, log scale)</text>"#,
            self.run
        );
        let mut decade = lo;
        while decade <= hi {
            let ms = 10f64.powf(decade);
            let yy = y(ms);
            let _ = write!(
                svg,
                "<line x1=\"{left}\" y1=\"{yy:.1}\" x2=\"{:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{ms}</text>",
                left + plot_w,
                left - 6.0,
                yy + 4.0
            );
            decade += 1.0;
        }
        for p in [0.0, 50.0, 90.0, 99.0, 100.0] {
            let xx = x(p);
            let _ = write!(
                svg,
                "<line x1=\"{xx:.1}\" y1=\"{top}\" x2=\"{xx:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/><text x=\"{xx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">p{p}</text>",
                top + plot_h,
                top + plot_h + 18.0
            );
        }
        for (i, (name, sorted)) in self.series.iter().enumerate() {
            if sorted.is_empty() {
                continue;
            }
            let colour = colours[i % colours.len()];
            let n = sorted.len();
            let points: Vec<String> = (0..200)
                .map(|k| {
                    let p = k as f64 / 199.0 * 100.0;
                    let idx = ((p / 100.0) * (n - 1) as f64).round() as usize;
                    format!("{:.1},{:.1}", x(p), y(sorted[idx.min(n - 1)]))
                })
                .collect();
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                points.join(" ")
            );
            let ly = top + 16.0 * i as f64;
            let _ = write!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="12" height="3" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                left + plot_w + 12.0,
                ly + 4.0,
                left + plot_w + 30.0,
                ly + 9.0,
                name.replace('&', "and").replace(['<', '>'], "")
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}
