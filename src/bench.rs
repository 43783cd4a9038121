//! Benchmark figures: medians and p95 over several runs, ratios against baselines measured in
//! the same run, and the report (`cargo xtask bench` prints it as Markdown or JSON).

use std::fmt::Write;

use serde::{Deserialize, Serialize};

/// One measured figure over `runs` runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    pub name: String,
    pub unit: String,
    pub median: f64,
    pub p95: f64,
    pub runs: usize,
}

impl Measurement {
    /// Median and p95 (nearest rank) of `samples`; `None` when there are none.
    pub fn of(name: impl Into<String>, unit: &str, samples: &[f64]) -> Option<Self> {
        let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if s.is_empty() {
            return None;
        }
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        let rank = ((n as f64) * 0.95).ceil() as usize;
        Some(Measurement {
            name: name.into(),
            unit: unit.into(),
            median,
            p95: s[rank.clamp(1, n) - 1],
            runs: n,
        })
    }

    /// `self / base`, run by run (paired), so that drift during the run cancels out.
    pub fn ratio_of(name: impl Into<String>, ours: &[f64], base: &[f64]) -> Option<Self> {
        let pairs: Vec<f64> = ours
            .iter()
            .zip(base)
            .filter(|(_, b)| **b != 0.0)
            .map(|(a, b)| a / b)
            .collect();
        Self::of(name, "x", &pairs)
    }
}

/// A whole report: the figures, and what could not be measured here and why.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub machine: String,
    pub measurements: Vec<Measurement>,
    pub skipped: Vec<String>,
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Machine: {}\n", self.machine);
        out.push_str("| measurement | median | p95 | runs |\n|---|---:|---:|---:|\n");
        for m in &self.measurements {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                m.name,
                fmt(m.median, &m.unit),
                fmt(m.p95, &m.unit),
                m.runs
            );
        }
        for s in &self.skipped {
            let _ = writeln!(out, "\nnot measured: {s}");
        }
        out
    }
}

fn fmt(value: f64, unit: &str) -> String {
    match unit {
        "x" => format!("{value:.2}x"),
        "ms" if value < 10.0 => format!("{value:.2} ms"),
        "ms" => format!("{value:.0} ms"),
        "s" => format!("{value:.2} s"),
        _ => format!("{value:.0} {unit}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_p95_and_ratios() {
        let m = Measurement::of("t", "ms", &[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((m.median, m.p95, m.runs), (3.0, 5.0, 3));
        let even = Measurement::of("t", "ms", &[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(even.median, 2.5);
        let many: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(Measurement::of("t", "ms", &many).unwrap().p95, 95.0);
        assert!(Measurement::of("t", "ms", &[]).is_none());
        let r = Measurement::ratio_of("r", &[10.0, 30.0], &[5.0, 10.0]).unwrap();
        assert_eq!(r.median, 2.5);
        assert_eq!(r.unit, "x");
    }

    #[test]
    fn markdown_table() {
        let report = Report {
            machine: "2 cores".into(),
            measurements: vec![Measurement::of("create", "ms", &[1.5]).unwrap()],
            skipped: vec!["docker: no backend".into()],
        };
        let md = report.markdown();
        assert!(md.contains("| create | 1.50 ms | 1.50 ms | 1 |"), "{md}");
        assert!(md.contains("not measured: docker"), "{md}");
        assert_eq!(fmt(2.345, "s"), "2.35 s");
    }
}
