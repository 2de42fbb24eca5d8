//! `eventstream top`: a terminal view of a running appliance, in the spirit of `vector top`,
//! drawn from its `/metrics` (ratatui).
//!
//! Every interval it scrapes `/metrics` over plain HTTP, takes the difference from the scrape
//! before for rates, and draws: the pipeline state and queue fill; per-source receive rates and
//! kernel drops; per-worker delivered rates; sinks (up, in flight, sent rate, ack p99); drops,
//! discards and failures by reason; the XDP program's verdicts and `XDP_STATISTICS`; and the
//! realtime latency quantiles. `q` or Esc quits. [`Scrape`] and [`draw`] are apart from the
//! terminal, so a test renders a recorded scrape into ratatui's test backend.

use std::collections::BTreeMap;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Cell, Gauge, Paragraph, Row, Table};

/// One scrape: every sample, by series (`name{labels}` exactly as exported).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scrape {
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    /// Parses Prometheus text exposition (comments skipped; a line it cannot read, ignored).
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_owned(), value.trim().parse().ok()?))
            })
            .collect();
        Self { samples }
    }

    /// The value of one series, if exported.
    pub fn get(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }

    /// Every series of family `name` as (label value of `label`, value).
    pub fn by_label<'a>(
        &'a self,
        name: &'a str,
        label: &'a str,
    ) -> impl Iterator<Item = (String, f64)> + 'a {
        let prefix = format!("{name}{{");
        self.samples.iter().filter_map(move |(series, v)| {
            let labels = series.strip_prefix(&prefix)?.strip_suffix('}')?;
            let value = labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == label).then(|| v.trim_matches('"').to_owned())
            })?;
            Some((value, *v))
        })
    }

    /// The `q` quantile (0..=1) of histogram `name`'s series with label set `labels` (without
    /// `le`): the upper bound of the first bucket holding it, in the family's unit; `None`
    /// when it has no samples.
    pub fn quantile(&self, name: &str, labels: &str, q: f64) -> Option<f64> {
        let sep = if labels.is_empty() { "" } else { "," };
        let count = self.get(&format!("{name}_count{{{labels}}}")).or_else(|| {
            labels
                .is_empty()
                .then(|| self.get(&format!("{name}_count")))
                .flatten()
        })?;
        if count <= 0.0 {
            return None;
        }
        let prefix = format!("{name}_bucket{{{labels}{sep}le=\"");
        let mut buckets: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter_map(|(series, v)| {
                let le = series.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                Some((
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().ok()?
                    },
                    *v,
                ))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let want = (q.clamp(0.0, 1.0) * count).ceil().max(1.0);
        buckets.iter().find(|(_, n)| *n >= want).map(|(le, _)| *le)
    }

    /// The label set of every series of family `name`, with its value.
    fn series_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        let prefix = format!("{name}{{");
        self.samples.iter().filter_map(move |(series, v)| {
            Some((series.strip_prefix(&prefix)?.strip_suffix('}')?, *v))
        })
    }
}

/// What the view shows: a scrape, and per-second rates against the one before.
#[derive(Debug)]
pub struct Snapshot<'a> {
    /// The newest scrape.
    pub now: &'a Scrape,
    /// The scrape before it, and the seconds between them (none at the first).
    pub before: Option<(&'a Scrape, f64)>,
    /// Where it was scraped from.
    pub from: &'a str,
}

impl Snapshot<'_> {
    fn rate(&self, series: &str) -> Option<f64> {
        let (b, secs) = self.before?;
        let d = self.now.get(series)? - b.get(series).unwrap_or(0.0);
        Some(d.max(0.0) / secs.max(1e-9))
    }

    fn rate_text(&self, series: &str) -> String {
        self.rate(series).map_or("-".into(), human)
    }
}

/// `1234567` as `1.23M`.
fn human(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.2}G", v / 1e9),
        v if v >= 1e6 => format!("{:.2}M", v / 1e6),
        v if v >= 1e4 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn block(title: &str) -> Block<'_> {
    Block::default().borders(Borders::ALL).title(Line::styled(
        title,
        Style::default().add_modifier(Modifier::BOLD),
    ))
}

fn header(cells: &[&'static str]) -> Row<'static> {
    Row::new(cells.iter().map(|c| Cell::from(*c)))
        .style(Style::default().add_modifier(Modifier::BOLD))
}

/// Draws `s` into `frame`.
pub fn draw(frame: &mut Frame<'_>, s: &Snapshot<'_>) {
    let now = s.now;
    let [top, mid, low, bottom] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(6),
        Constraint::Min(6),
        Constraint::Min(6),
    ])
    .areas(frame.area());

    // Pipeline state and queue fill.
    let state = now
        .by_label("eventstream_pipeline_state", "state")
        .find(|(_, v)| *v >= 1.0)
        .map_or("?".to_owned(), |(st, _)| st);
    let depth = now
        .get("eventstream_queue_depth{queue=\"ingest\"}")
        .unwrap_or(0.0);
    let cap = now
        .get("eventstream_queue_capacity{queue=\"ingest\"}")
        .unwrap_or(1.0)
        .max(1.0);
    let [st, q] = Layout::horizontal([Constraint::Length(48), Constraint::Min(20)]).areas(top);
    let color = match state.as_str() {
        "RUNNING" => Color::Green,
        "DROPPING" | "PAUSED" => Color::Yellow,
        _ => Color::Red,
    };
    frame.render_widget(
        Paragraph::new(Line::styled(
            format!(" {state}  ({})", s.from),
            Style::default().fg(color),
        ))
        .block(block("eventstream top · state")),
        st,
    );
    frame.render_widget(
        Gauge::default()
            .block(block("ingest queue"))
            .ratio((depth / cap).clamp(0.0, 1.0))
            .label(format!("{depth:.0} / {cap:.0}")),
        q,
    );

    // Sources and workers.
    let [src, wrk] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(mid);
    let sources: Vec<Row<'_>> = now
        .by_label("eventstream_received_events_total", "source")
        .map(|(source, total)| {
            let series = |name: &str| format!("{name}{{source=\"{source}\"}}");
            Row::new(vec![
                Cell::from(source.clone()),
                Cell::from(s.rate_text(&series("eventstream_received_events_total"))),
                Cell::from(s.rate_text(&series("eventstream_received_datagrams_total"))),
                Cell::from(
                    s.rate(&series("eventstream_received_bytes_total"))
                        .map_or("-".into(), |b| format!("{}B", human(b))),
                ),
                Cell::from(human(total)),
                Cell::from(human(
                    now.get(&series("eventstream_kernel_dropped_datagrams_total"))
                        .unwrap_or(0.0),
                )),
            ])
        })
        .collect();
    frame.render_widget(
        Table::new(
            sources,
            [
                Constraint::Length(7),
                Constraint::Length(9),
                Constraint::Length(9),
                Constraint::Length(9),
                Constraint::Length(9),
                Constraint::Length(8),
            ],
        )
        .header(header(&[
            "source", "events/s", "dgrams/s", "bytes/s", "total", "k.drops",
        ]))
        .block(block("received")),
        src,
    );
    let workers: Vec<Row<'_>> = now
        .series_of("eventstream_delivered_events_total")
        .map(|(labels, total)| {
            let series = format!("eventstream_delivered_events_total{{{labels}}}");
            // `sink="memory",worker="realtime"` as `memory/realtime`.
            let name = labels
                .split(',')
                .filter_map(|kv| Some(kv.split_once('=')?.1.trim_matches('"')))
                .collect::<Vec<_>>()
                .join("/");
            Row::new(vec![
                Cell::from(name),
                Cell::from(s.rate_text(&series)),
                Cell::from(human(total)),
            ])
        })
        .collect();
    frame.render_widget(
        Table::new(
            workers,
            [
                Constraint::Min(22),
                Constraint::Length(9),
                Constraint::Length(9),
            ],
        )
        .header(header(&["sink, worker", "events/s", "total"]))
        .block(block("delivered")),
        wrk,
    );

    // Sinks, and drops by reason.
    let [snk, drops] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(low);
    let mut sinks: Vec<Row<'_>> = now
        .by_label("eventstream_sink_up", "sink")
        .map(|(sink, up)| {
            let series = |name: &str| format!("{name}{{sink=\"{sink}\"}}");
            Row::new(vec![
                Cell::from(sink.clone()),
                Cell::from(if up >= 1.0 { "up" } else { "FAILING" })
                    .style(Style::default().fg(if up >= 1.0 { Color::Green } else { Color::Red })),
                Cell::from(human(
                    now.get(&series("eventstream_sink_in_flight_events"))
                        .unwrap_or(0.0),
                )),
                Cell::from(s.rate_text(&series("eventstream_sink_sent_events_total"))),
                Cell::from(human(
                    now.get(&series("eventstream_sink_retries_total"))
                        .unwrap_or(0.0),
                )),
            ])
        })
        .collect();
    if sinks.is_empty() {
        sinks.push(Row::new(vec![Cell::from(
            "memory sinks only: nothing that can fail",
        )]));
    }
    frame.render_widget(
        Table::new(
            sinks,
            [
                Constraint::Min(16),
                Constraint::Length(8),
                Constraint::Length(9),
                Constraint::Length(9),
                Constraint::Length(8),
            ],
        )
        .header(header(&["sink", "state", "in flight", "sent/s", "retries"]))
        .block(block("sinks")),
        snk,
    );
    let mut reasons: Vec<Row<'_>> = Vec::new();
    for (family, label, what) in [
        ("eventstream_dlq_events_total", "reason", "dlq"),
        ("eventstream_discarded_events_total", "reason", "discarded"),
        ("eventstream_failed_events_total", "reason", "failed"),
        (
            "eventstream_protocol_errors_total",
            "error_type",
            "rejected",
        ),
        ("eventstream_xsk_kernel_drops_total", "counter", "xsk"),
    ] {
        for (labels, v) in now.series_of(family).filter(|(_, v)| *v > 0.0) {
            let reason = label_value(labels, label).unwrap_or_default();
            let name = match label_value(labels, "source") {
                Some(src) => format!("{what} {src} {reason}"),
                None => format!("{what} {reason}"),
            };
            reasons.push(Row::new(vec![
                Cell::from(name),
                Cell::from(human(v)),
                Cell::from(s.rate_text(&format!("{family}{{{labels}}}"))),
            ]));
        }
    }
    if reasons.is_empty() {
        reasons.push(Row::new(vec![
            Cell::from("nothing dropped"),
            Cell::from(""),
            Cell::from(""),
        ]));
    }
    frame.render_widget(
        Table::new(
            reasons,
            [
                Constraint::Min(24),
                Constraint::Length(9),
                Constraint::Length(8),
            ],
        )
        .header(header(&["drops by reason", "total", "per s"]))
        .block(block("drops")),
        drops,
    );

    // XDP verdicts and latency.
    let [xdp, lat] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(bottom);
    let verdicts: Vec<Row<'_>> = now
        .by_label("eventstream_xdp_packets_total", "verdict")
        .map(|(v, total)| {
            Row::new(vec![
                Cell::from(v.clone()),
                Cell::from(human(total)),
                Cell::from(
                    s.rate_text(&format!("eventstream_xdp_packets_total{{verdict=\"{v}\"}}")),
                ),
            ])
        })
        .collect();
    let xdp_title = if verdicts.is_empty() {
        "XDP (not attached: kernel UDP path)"
    } else {
        "XDP verdicts"
    };
    frame.render_widget(
        Table::new(
            verdicts,
            [
                Constraint::Min(18),
                Constraint::Length(9),
                Constraint::Length(9),
            ],
        )
        .header(header(&["verdict", "total", "per s"]))
        .block(block(xdp_title)),
        xdp,
    );
    // Latency: the realtime worker's quantiles (HDR), and each stage's from its buckets.
    let stage = |labels: &str, q: f64| -> String {
        now.quantile("eventstream_stage_latency_seconds", labels, q)
            .map_or("-".into(), micros)
    };
    let ack = |q: f64| -> String {
        now.series_of("eventstream_sink_ack_latency_seconds_count")
            .filter_map(|(labels, _)| {
                now.quantile("eventstream_sink_ack_latency_seconds", labels, q)
            })
            .reduce(f64::max)
            .map_or("-".into(), micros)
    };
    let lat_rows: Vec<Row<'_>> = now
        .by_label("eventstream_realtime_latency_quantile_seconds", "quantile")
        .map(|(q, secs)| {
            let x = q.parse::<f64>().unwrap_or(1.0);
            let name = if x >= 1.0 {
                "max".to_owned()
            } else {
                format!("p{}", (x * 1000.0).round() / 10.0)
            };
            Row::new(vec![
                Cell::from(name),
                Cell::from(stage("stage=\"receive_to_routed\"", x)),
                Cell::from(stage("stage=\"routed_to_worker\"", x)),
                Cell::from(micros(secs)),
                Cell::from(ack(x)),
            ])
        })
        .collect();
    frame.render_widget(
        Table::new(
            lat_rows,
            [
                Constraint::Length(6),
                Constraint::Length(10),
                Constraint::Length(10),
                Constraint::Length(10),
                Constraint::Min(10),
            ],
        )
        .header(header(&["", "→routed", "→worker", "realtime", "sink ack"]))
        .block(block("latency (≤ bucket bound for stages)")),
        lat,
    );
}

/// `0.000123` (seconds) as `123.0µs`, or in ms / s when larger.
fn micros(secs: f64) -> String {
    match secs {
        s if s >= 1.0 => format!("{s:.2}s"),
        s if s >= 1e-3 => format!("{:.2}ms", s * 1e3),
        s => format!("{:.1}µs", s * 1e6),
    }
}

/// The value of `label` in a series' label set (`a="x",b="y"`).
fn label_value(labels: &str, label: &str) -> Option<String> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == label).then(|| v.trim_matches('"').to_owned())
    })
}

/// One `GET /metrics` from `addr` (plain HTTP/1.0, bounded by `timeout`).
///
/// # Errors
/// When the appliance does not answer, or answers something other than 200.
pub fn scrape(addr: SocketAddr, timeout: Duration) -> io::Result<Scrape> {
    let mut c = TcpStream::connect_timeout(&addr, timeout)?;
    c.set_read_timeout(Some(timeout))?;
    c.set_write_timeout(Some(timeout))?;
    write!(c, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    c.take(64 << 20).read_to_string(&mut body)?;
    let (head, text) = body.split_once("\r\n\r\n").unwrap_or((&body, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(io::Error::other(format!(
            "{addr}/metrics answered {}",
            head.lines().next().unwrap_or("nothing")
        )));
    }
    Ok(Scrape::parse(text))
}

/// Runs the view against the admin endpoint `addr` until `q`, Esc or Ctrl-C.
///
/// # Errors
/// The first scrape's failure (nothing to show), or the terminal's.
pub fn run(addr: SocketAddr, interval: Duration) -> io::Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
    let timeout = Duration::from_secs(2);
    let mut now = scrape(addr, timeout)?;
    let mut before: Option<(Scrape, Instant)> = None;
    let mut taken = Instant::now();
    let from = addr.to_string();
    let mut terminal = ratatui::init();
    let result = (|| -> io::Result<()> {
        loop {
            let snap = Snapshot {
                now: &now,
                before: before
                    .as_ref()
                    .map(|(b, t)| (b, taken.duration_since(*t).as_secs_f64())),
                from: &from,
            };
            terminal.draw(|f| draw(f, &snap))?;
            let until = taken + interval;
            while let Some(wait) = until.checked_duration_since(Instant::now()) {
                if event::poll(wait)?
                    && let Event::Key(k) = event::read()?
                    && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc)
                        || (k.code == KeyCode::Char('c')
                            && k.modifiers.contains(KeyModifiers::CONTROL)))
                {
                    return Ok(());
                }
            }
            // A failed scrape keeps the last view (the appliance may be restarting).
            if let Ok(next) = scrape(addr, timeout) {
                before = Some((std::mem::replace(&mut now, next), taken));
                taken = Instant::now();
            } else {
                taken = Instant::now();
            }
        }
    })();
    ratatui::restore();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrapes_parse_and_labels_are_found() {
        let s = Scrape::parse(
            "# HELP x y\n# TYPE x counter\neventstream_received_events_total{source=\"udp\"} 42\nbad line\neventstream_queue_depth 3\n",
        );
        assert_eq!(s.get("eventstream_queue_depth"), Some(3.0));
        assert_eq!(
            s.by_label("eventstream_received_events_total", "source")
                .collect::<Vec<_>>(),
            [("udp".to_owned(), 42.0)]
        );
        assert_eq!(human(1_234_567.0), "1.23M");
        let h = Scrape::parse(
            "h_bucket{stage=\"a\",le=\"0.001\"} 90\nh_bucket{stage=\"a\",le=\"0.01\"} 99\nh_bucket{stage=\"a\",le=\"+Inf\"} 100\nh_count{stage=\"a\"} 100\n",
        );
        assert_eq!(h.quantile("h", "stage=\"a\"", 0.5), Some(0.001));
        assert_eq!(h.quantile("h", "stage=\"a\"", 0.99), Some(0.01));
        assert_eq!(h.quantile("h", "stage=\"a\"", 1.0), Some(f64::INFINITY));
        assert_eq!(h.quantile("h", "stage=\"b\"", 0.5), None);
        assert_eq!(human(12_345.0), "12.3k");
    }
}
