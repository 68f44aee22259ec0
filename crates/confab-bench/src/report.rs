//! Latency histograms (HdrHistogram, microseconds), their percentiles, and
//! an SVG plot of latency by percentile.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies in microseconds, 1 µs to 60 s at 3 significant digits.
#[derive(Clone)]
pub struct Latency(Histogram<u64>);

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Latency({})", self.percentiles())
    }
}

impl Default for Latency {
    fn default() -> Self {
        Latency(Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"))
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn record(&mut self, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, 60_000_000);
        self.0.record(us).expect("within bounds");
    }

    pub fn record_us(&mut self, us: u64) {
        self.0
            .record(us.clamp(1, 60_000_000))
            .expect("within bounds");
    }

    pub fn add(&mut self, other: &Latency) {
        self.0.add(&other.0).expect("same bounds");
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    fn ms(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn percentiles(&self) -> Percentiles {
        Percentiles {
            count: self.0.len(),
            mean_ms: self.0.mean() / 1000.0,
            p50_ms: self.ms(0.5),
            p90_ms: self.ms(0.9),
            p99_ms: self.ms(0.99),
            p999_ms: self.ms(0.999),
            max_ms: self.0.max() as f64 / 1000.0,
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms
        )
    }
}

/// Latency by percentile, one line per series; x is `-log10(1 - p)`, so
/// 90, 99, 99.9 and 99.99 are evenly spaced.
pub fn svg(title: &str, series: &[(String, Latency)]) -> String {
    let max_x = 4.0; // p99.99
    let points = |l: &Latency| -> Vec<(f64, f64)> {
        (0..=80)
            .map(|i| {
                let x = max_x * i as f64 / 80.0;
                let q = 1.0 - 10f64.powf(-x);
                (x, l.ms(q.min(0.9999)))
            })
            .collect()
    };
    let lines: Vec<(String, Vec<(f64, f64)>)> =
        series.iter().map(|(n, l)| (n.clone(), points(l))).collect();
    let ticks: Vec<(f64, String)> = ["0", "90", "99", "99.9", "99.99"]
        .iter()
        .enumerate()
        .map(|(i, l)| (i as f64, l.to_string()))
        .collect();
    chart(title, "percentile", "latency (ms)", &ticks, &lines, None)
}

/// p99 against the delivery rate, one line per system, with the 50 ms
/// line a rate must stay under to hold (the `compare` sweep).
pub fn sweep_svg(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let max_x = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let ticks: Vec<(f64, String)> = (0..=5)
        .map(|i| {
            let x = max_x * f64::from(i) / 5.0;
            (x, format!("{:.0}k", x / 1000.0))
        })
        .collect();
    chart(
        title,
        "deliveries per second",
        "p99 latency (ms)",
        &ticks,
        series,
        Some(50.0),
    )
}

/// Lines on axes: `x_ticks` name the x axis (from 0 to the last tick), the
/// y axis runs from 0 to the highest point; `guide` draws a dashed line at
/// that y.
fn chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    x_ticks: &[(f64, String)],
    series: &[(String, Vec<(f64, f64)>)],
    guide: Option<f64>,
) -> String {
    const W: f64 = 720.0;
    const H: f64 = 420.0;
    const LEFT: f64 = 70.0;
    const BOTTOM: f64 = 50.0;
    const TOP: f64 = 40.0;
    const RIGHT: f64 = 20.0;
    const COLOURS: &[&str] = &["#1d4ed8", "#b91c1c", "#15803d", "#a16207", "#7c3aed"];
    let max_x = x_ticks.last().map_or(1.0, |t| t.0).max(f64::MIN_POSITIVE);
    let max_y = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .chain(guide)
        .fold(0.1f64, f64::max)
        * 1.1;
    let sx = |x: f64| LEFT + x / max_x * (W - LEFT - RIGHT);
    let sy = |y: f64| H - BOTTOM - y / max_y * (H - BOTTOM - TOP);
    let mut out = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>
<line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">{}</text>
<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">{}</text>
"##,
        W / 2.0,
        escape(title),
        H - BOTTOM,
        W - RIGHT,
        H - BOTTOM,
        H - BOTTOM,
        (LEFT + W - RIGHT) / 2.0,
        H - 12.0,
        escape(x_label),
        H / 2.0,
        H / 2.0,
        escape(y_label),
    );
    for (x, label) in x_ticks {
        out += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n<line x1=\"{0}\" y1=\"{TOP}\" x2=\"{0}\" y2=\"{}\" stroke=\"#e5e7eb\"/>\n",
            sx(*x),
            H - BOTTOM + 18.0,
            escape(label),
            H - BOTTOM
        );
    }
    for i in 0..=4 {
        let y = max_y * i as f64 / 4.0;
        out += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{y:.1}</text>\n",
            LEFT - 6.0,
            sy(y) + 4.0
        );
    }
    if let Some(y) = guide {
        out += &format!(
            "<line x1=\"{LEFT}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#6b7280\" stroke-dasharray=\"6 4\"/>\n",
            sy(y),
            W - RIGHT
        );
    }
    for (i, (name, pts)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        out += &format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{}</text>\n",
            path.join(" "),
            LEFT + 10.0,
            TOP + 16.0 * (i as f64 + 1.0),
            escape(name)
        );
        for (x, y) in pts.iter().filter(|_| pts.len() < 30) {
            out += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>\n",
                sx(*x),
                sy(*y)
            );
        }
    }
    out + "</svg>\n"
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_plot() {
        let mut l = Latency::default();
        for ms in 1..=100 {
            l.record(Duration::from_millis(ms));
        }
        let p = l.percentiles();
        assert_eq!(p.count, 100);
        assert!((p.p50_ms - 50.0).abs() < 0.5, "{p:?}");
        assert!((p.p99_ms - 99.0).abs() < 0.5, "{p:?}");
        let svg = svg("a <test>", &[("confab".into(), l)]);
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("a &lt;test&gt;")
        );
    }

    #[test]
    fn a_sweep_plots_each_system_under_the_line() {
        let series = vec![
            (
                "confab".to_owned(),
                vec![(100_000.0, 20.0), (200_000.0, 70.0)],
            ),
            (
                "redis".to_owned(),
                vec![(100_000.0, 5.0), (400_000.0, 30.0)],
            ),
        ];
        let svg = sweep_svg("sweep", &series);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains("stroke-dasharray"), "the 50 ms line");
        assert!(
            svg.contains(">400k<"),
            "the x axis reaches the fastest point"
        );
    }
}
