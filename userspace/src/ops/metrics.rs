//! The metrics table: every series the appliance exports, collected once into one [`Table`]
//! that both `GET /metrics` ([`Table::prometheus`]) and the exit report ([`Table::json`])
//! render, so the two cannot disagree and no counter is exported by one and not the other.
//!
//! Names follow the Prometheus conventions operators' tools expect: base units (`_seconds`,
//! `_bytes`), `_total` on counters, histograms with `_bucket`, `_sum` and `_count`, and each
//! event counted in exactly one outcome family (see the README's metric list for the
//! accounting identity the families add up to).

use std::fmt::Write as _;

use serde_json::{Map, Value as Json};

/// What a family is, for `# TYPE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (reset at start).
    Counter,
    /// A value now.
    Gauge,
    /// Cumulative buckets, `_sum` and `_count`.
    Histogram,
}

impl Kind {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// A histogram's exposition: cumulative counts at upper bounds (in seconds), count and sum.
#[derive(Clone, Debug, PartialEq)]
pub struct Hist {
    /// `(le, events at or below it)`, ascending; `+Inf` is `count`.
    pub buckets: Vec<(f64, u64)>,
    /// Events recorded.
    pub count: u64,
    /// Sum of what was recorded, in seconds.
    pub sum: f64,
}

impl Hist {
    /// From a merged latency histogram read at `bounds_ns`.
    pub fn from_ns(b: &crate::engine::latency::Buckets) -> Self {
        Self {
            buckets: b
                .bounds_ns
                .iter()
                .zip(&b.cumulative)
                .map(|(le, n)| (*le as f64 / 1e9, *n))
                .collect(),
            count: b.count,
            sum: b.sum_ns as f64 / 1e9,
        }
    }
}

/// One series' value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A count.
    Int(u64),
    /// A measurement.
    Float(f64),
    /// A histogram.
    Hist(Hist),
}

impl From<u64> for Value {
    fn from(v: u64) -> Self {
        Self::Int(v)
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Self::Float(v)
    }
}

impl From<Hist> for Value {
    fn from(v: Hist) -> Self {
        Self::Hist(v)
    }
}

/// One series: its labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// `(name, value)` pairs, in order.
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: Value,
}

/// A metric family: name, type, help and its series.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    /// The metric name.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// One line of help.
    pub help: &'static str,
    /// Its series.
    pub samples: Vec<Sample>,
}

impl Family {
    /// Adds a series with `labels`.
    pub fn add(&mut self, labels: &[(&'static str, &str)], value: impl Into<Value>) -> &mut Self {
        self.samples.push(Sample {
            labels: labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
            value: value.into(),
        });
        self
    }
}

/// Every family, in declaration order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    /// The families.
    pub families: Vec<Family>,
}

/// Escapes a label value for the text format (backslash, quote, newline).
fn escape(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `name{a="x",b="y"}` (or just `name`), with `extra` appended to the labels.
fn series(
    name: &str,
    suffix: &str,
    labels: &[(&'static str, String)],
    extra: Option<(&str, &str)>,
) -> String {
    let mut s = format!("{name}{suffix}");
    let all = labels
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain(extra)
        .collect::<Vec<_>>();
    if !all.is_empty() {
        s.push('{');
        for (i, (k, v)) in all.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{k}=\"");
            escape(v, &mut s);
            s.push('"');
        }
        s.push('}');
    }
    s
}

fn float(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

impl Table {
    /// Declares a family; add its series to what this returns.
    pub fn family(&mut self, name: &'static str, kind: Kind, help: &'static str) -> &mut Family {
        debug_assert!(
            !self.families.iter().any(|f| f.name == name),
            "{name} declared twice"
        );
        debug_assert!(
            kind != Kind::Counter || name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        self.families.push(Family {
            name,
            kind,
            help,
            samples: Vec::new(),
        });
        self.families.last_mut().expect("just pushed")
    }

    /// A counter family.
    pub fn counter(&mut self, name: &'static str, help: &'static str) -> &mut Family {
        self.family(name, Kind::Counter, help)
    }

    /// A gauge family.
    pub fn gauge(&mut self, name: &'static str, help: &'static str) -> &mut Family {
        self.family(name, Kind::Gauge, help)
    }

    /// A histogram family.
    pub fn histogram(&mut self, name: &'static str, help: &'static str) -> &mut Family {
        self.family(name, Kind::Histogram, help)
    }

    /// The family named `name`.
    pub fn get(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn prometheus(&self) -> String {
        let mut out = String::with_capacity(8192);
        for f in &self.families {
            let _ = writeln!(
                out,
                "# HELP {} {}\n# TYPE {} {}",
                f.name,
                f.help,
                f.name,
                f.kind.as_str()
            );
            for s in &f.samples {
                match &s.value {
                    Value::Int(v) => {
                        let _ = writeln!(out, "{} {v}", series(f.name, "", &s.labels, None));
                    }
                    Value::Float(v) => {
                        let _ =
                            writeln!(out, "{} {}", series(f.name, "", &s.labels, None), float(*v));
                    }
                    Value::Hist(h) => {
                        for (le, n) in &h.buckets {
                            let _ = writeln!(
                                out,
                                "{} {n}",
                                series(f.name, "_bucket", &s.labels, Some(("le", &float(*le))))
                            );
                        }
                        let _ = writeln!(
                            out,
                            "{} {}\n{} {}\n{} {}",
                            series(f.name, "_bucket", &s.labels, Some(("le", "+Inf"))),
                            h.count,
                            series(f.name, "_sum", &s.labels, None),
                            float(h.sum),
                            series(f.name, "_count", &s.labels, None),
                            h.count
                        );
                    }
                }
            }
        }
        out
    }

    /// Every series as one JSON object, `"name{labels}": value` (histograms as their `_count`
    /// and `_sum`), for the exit report.
    pub fn json(&self) -> Json {
        let mut m = Map::new();
        for f in &self.families {
            for s in &f.samples {
                match &s.value {
                    Value::Int(v) => {
                        m.insert(series(f.name, "", &s.labels, None), Json::from(*v));
                    }
                    Value::Float(v) => {
                        m.insert(series(f.name, "", &s.labels, None), Json::from(*v));
                    }
                    Value::Hist(h) => {
                        m.insert(
                            series(f.name, "_count", &s.labels, None),
                            Json::from(h.count),
                        );
                        m.insert(series(f.name, "_sum", &s.labels, None), Json::from(h.sum));
                    }
                }
            }
        }
        Json::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        let mut t = Table::default();
        t.counter("x_events_total", "Events.")
            .add(&[("source", "udp")], 3u64)
            .add(&[("source", "a\"b")], 4u64);
        t.gauge("x_up", "Up.").add(&[], 1.5);
        t.histogram("x_latency_seconds", "Latency.").add(
            &[("stage", "s")],
            Hist {
                buckets: vec![(0.001, 2), (0.01, 5)],
                count: 6,
                sum: 0.25,
            },
        );
        t
    }

    #[test]
    fn prometheus_text_has_types_escapes_and_histogram_parts() {
        let text = table().prometheus();
        assert!(text.contains("# TYPE x_events_total counter\n"));
        assert!(text.contains("x_events_total{source=\"udp\"} 3\n"));
        assert!(text.contains("x_events_total{source=\"a\\\"b\"} 4\n"));
        assert!(text.contains("x_up 1.5\n"));
        assert!(text.contains("x_latency_seconds_bucket{stage=\"s\",le=\"0.001\"} 2\n"));
        assert!(text.contains("x_latency_seconds_bucket{stage=\"s\",le=\"+Inf\"} 6\n"));
        assert!(text.contains("x_latency_seconds_sum{stage=\"s\"} 0.25\n"));
        assert!(text.contains("x_latency_seconds_count{stage=\"s\"} 6\n"));
    }

    #[test]
    fn json_has_every_series_the_text_has() {
        let t = table();
        let j = t.json();
        assert_eq!(j["x_events_total{source=\"udp\"}"], 3);
        assert_eq!(j["x_up"], 1.5);
        assert_eq!(j["x_latency_seconds_count{stage=\"s\"}"], 6);
        assert_eq!(j["x_latency_seconds_sum{stage=\"s\"}"], 0.25);
        assert_eq!(j.as_object().unwrap().len(), 5);
    }

    #[test]
    #[should_panic(expected = "must end in _total")]
    #[cfg(debug_assertions)]
    fn a_counter_without_total_is_refused() {
        Table::default().counter("x_events", "Events.");
    }
}
