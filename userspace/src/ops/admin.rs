//! Metrics and admin over HTTP, on one port (default 127.0.0.1:8090), on its own thread.
//!
//! - `GET /metrics`: Prometheus text. Every family is declared once in [`render`]; each drop
//!   reason is its own series of `eventstream_discarded_events_total{reason}`.
//! - `GET /healthz`: `ok`, or 503 naming each failing sink.
//! - `GET /state`: the pipeline state as JSON.
//! - `POST /state` with body `pause`, `resume` or `drain`: an operator command.
//!
//! The hot path never touches this module: it reads the counters the ingest threads, the
//! dispatcher and the workers flush once per batch.

use std::fmt::Write as _;
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{info, warn};

use crate::engine::control::{Command, PipelineState};
use crate::engine::{DlqReason, EngineCounters, FailReason, WorkerClass};
use crate::ingest::IngestCounters;
use crate::ring::mpsc;
use crate::sink::{SinkErrorKind, SinkHealth};
use crate::wire::event::Source;
use crate::wire::protocol::RejectReason;

/// What `/metrics` reads.
pub struct MetricsView<'s> {
    /// Each ingest thread's counters, with its source.
    pub ingest: Vec<(Source, &'s IngestCounters)>,
    /// Engine counters.
    pub engine: &'s EngineCounters,
    /// Ingest → dispatcher queue depth and capacity.
    pub queue: Box<dyn Fn() -> (usize, usize) + Send + Sync + 's>,
    /// The workers' sink kind, for the `sink` label (`memory` or `file`).
    pub sink: &'static str,
    /// The health of every sink with I/O that can fail (workers' and DLQ's).
    pub sinks: Vec<std::sync::Arc<SinkHealth>>,
}

/// The `/healthz` answer: `200 ok`, or `503` naming every failing sink and why.
pub fn health(v: &MetricsView<'_>) -> (u16, String) {
    let mut body = String::new();
    for s in &v.sinks {
        if let Some(why) = s.failure() {
            let _ = writeln!(body, "sink {} failing: {why}", s.name);
        }
    }
    if body.is_empty() {
        (200, "ok\n".into())
    } else {
        (503, body)
    }
}

impl std::fmt::Debug for MetricsView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsView")
            .field("ingest_threads", &self.ingest.len())
            .finish()
    }
}

/// Binds the admin port; returns the server and the address it got (for port 0).
///
/// # Errors
/// When the address cannot be bound.
pub fn bind(addr: SocketAddr) -> std::io::Result<(tiny_http::Server, SocketAddr)> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| std::io::Error::other(format!("admin {addr}: {e}")))?;
    let bound = server.server_addr().to_ip().unwrap_or(addr);
    Ok((server, bound))
}

fn ld(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Renders the Prometheus text exposition.
pub fn render(v: &MetricsView<'_>) -> String {
    let mut out = String::with_capacity(4096);
    let by_source = |f: fn(&IngestCounters) -> u64, s: Source| -> u64 {
        v.ingest
            .iter()
            .filter(|(src, _)| *src == s)
            .map(|(_, c)| f(c))
            .sum()
    };

    family(
        &mut out,
        "eventstream_received_events_total",
        "counter",
        "Events accepted from the wire, by ingest path.",
    );
    for s in Source::ALL {
        let _ = writeln!(
            out,
            "eventstream_received_events_total{{source=\"{}\"}} {}",
            s.as_str(),
            by_source(|c| ld(&c.events), s)
        );
    }
    family(
        &mut out,
        "eventstream_received_bytes_total",
        "counter",
        "Bytes received, by ingest path.",
    );
    for s in Source::ALL {
        let _ = writeln!(
            out,
            "eventstream_received_bytes_total{{source=\"{}\"}} {}",
            s.as_str(),
            by_source(|c| ld(&c.bytes), s)
        );
    }
    family(
        &mut out,
        "eventstream_received_datagrams_total",
        "counter",
        "Datagrams received (UDP and AF_XDP) or TCP reads, by ingest path.",
    );
    for s in Source::ALL {
        let _ = writeln!(
            out,
            "eventstream_received_datagrams_total{{source=\"{}\"}} {}",
            s.as_str(),
            by_source(|c| ld(&c.datagrams), s)
        );
    }
    family(
        &mut out,
        "eventstream_delivered_events_total",
        "counter",
        "Events written to a sink, by sink.",
    );
    for c in WorkerClass::ALL {
        let _ = writeln!(
            out,
            "eventstream_delivered_events_total{{sink=\"{}\",worker=\"{}\"}} {}",
            v.sink,
            c.as_str(),
            ld(&v.engine.delivered[c as usize])
        );
    }
    let _ = writeln!(
        out,
        "eventstream_delivered_events_total{{sink=\"dlq\",worker=\"dlq\"}} {}",
        v.engine.dlq_total()
    );
    family(
        &mut out,
        "eventstream_discarded_events_total",
        "counter",
        "Events not delivered to their route, by reason.",
    );
    for r in RejectReason::ALL {
        let n: u64 = v.ingest.iter().map(|(_, c)| c.rejected(r)).sum();
        let _ = writeln!(
            out,
            "eventstream_discarded_events_total{{reason=\"{}\"}} {n}",
            r.as_str()
        );
    }
    for r in DlqReason::ALL {
        let _ = writeln!(
            out,
            "eventstream_discarded_events_total{{reason=\"{}\"}} {}",
            r.as_str(),
            ld(&v.engine.dlq[r as usize])
        );
    }
    let _ = writeln!(
        out,
        "eventstream_discarded_events_total{{reason=\"duplicate\"}} {}",
        ld(&v.engine.duplicates)
    );
    family(
        &mut out,
        "eventstream_failed_events_total",
        "counter",
        "Accepted events that no sink persisted, by reason.",
    );
    for r in FailReason::ALL {
        let _ = writeln!(
            out,
            "eventstream_failed_events_total{{reason=\"{}\"}} {}",
            r.as_str(),
            ld(&v.engine.failed[r as usize])
        );
    }
    family(
        &mut out,
        "eventstream_sink_up",
        "gauge",
        "1 while a sink's last write succeeded, 0 while it fails and retries.",
    );
    for h in &v.sinks {
        let _ = writeln!(
            out,
            "eventstream_sink_up{{sink=\"{}\"}} {}",
            h.name,
            u8::from(!h.is_failing())
        );
    }
    family(
        &mut out,
        "eventstream_sink_in_flight_events",
        "gauge",
        "Events a sink took and has not yet made durable (or lost).",
    );
    for h in &v.sinks {
        let _ = writeln!(
            out,
            "eventstream_sink_in_flight_events{{sink=\"{}\"}} {}",
            h.name,
            h.in_flight()
        );
    }
    family(
        &mut out,
        "eventstream_sink_errors_total",
        "counter",
        "Failed sink writes and syncs, by sink and reason.",
    );
    for h in &v.sinks {
        for k in SinkErrorKind::ALL {
            let _ = writeln!(
                out,
                "eventstream_sink_errors_total{{sink=\"{}\",reason=\"{}\"}} {}",
                h.name,
                k.as_str(),
                h.errors(k)
            );
        }
    }
    family(
        &mut out,
        "eventstream_sink_retries_total",
        "counter",
        "Retries of failed sink writes.",
    );
    for h in &v.sinks {
        let _ = writeln!(
            out,
            "eventstream_sink_retries_total{{sink=\"{}\"}} {}",
            h.name,
            h.retries()
        );
    }
    family(
        &mut out,
        "eventstream_duplicate_events_total",
        "counter",
        "Duplicates dropped by transactional workers.",
    );
    let _ = writeln!(
        out,
        "eventstream_duplicate_events_total {}",
        ld(&v.engine.duplicates)
    );
    family(
        &mut out,
        "eventstream_xsk_kernel_drops_total",
        "counter",
        "AF_XDP XDP_STATISTICS, by counter.",
    );
    for (name, f) in [
        (
            "rx_dropped",
            (|c: &IngestCounters| ld(&c.xsk_rx_dropped)) as fn(&IngestCounters) -> u64,
        ),
        ("rx_invalid_descs", |c| ld(&c.xsk_rx_invalid_descs)),
        ("rx_ring_full", |c| ld(&c.xsk_rx_ring_full)),
        ("rx_fill_ring_empty_descs", |c| {
            ld(&c.xsk_rx_fill_ring_empty_descs)
        }),
    ] {
        let _ = writeln!(
            out,
            "eventstream_xsk_kernel_drops_total{{counter=\"{name}\"}} {}",
            by_source(f, Source::Xsk)
        );
    }
    let (depth, cap) = (v.queue)();
    family(
        &mut out,
        "eventstream_queue_depth",
        "gauge",
        "Events waiting in the ingest -> dispatcher queue.",
    );
    let _ = writeln!(out, "eventstream_queue_depth{{queue=\"ingest\"}} {depth}");
    family(
        &mut out,
        "eventstream_queue_capacity",
        "gauge",
        "Slots in the ingest -> dispatcher queue.",
    );
    let _ = writeln!(out, "eventstream_queue_capacity{{queue=\"ingest\"}} {cap}");
    family(
        &mut out,
        "eventstream_pipeline_state",
        "gauge",
        "1 for the current pipeline state.",
    );
    let now = v.engine.state();
    for st in PipelineState::ALL {
        let _ = writeln!(
            out,
            "eventstream_pipeline_state{{state=\"{}\"}} {}",
            st.as_str(),
            u8::from(st == now)
        );
    }
    family(
        &mut out,
        "eventstream_pipeline_transitions_total",
        "counter",
        "Transitions into each pipeline state.",
    );
    for st in PipelineState::ALL {
        let _ = writeln!(
            out,
            "eventstream_pipeline_transitions_total{{state=\"{}\"}} {}",
            st.as_str(),
            ld(&v.engine.transitions[st as usize])
        );
    }
    family(
        &mut out,
        "eventstream_realtime_latency_seconds",
        "histogram",
        "Sender to realtime worker latency.",
    );
    // Buckets at 2^i µs, 1 µs .. ~16.8 s, from the merged HDR histogram.
    let bounds: Vec<u64> = (0..25).map(|i| 1_000u64 << i).collect();
    let (cum, total) = v.engine.latency.cumulative(&bounds);
    for (b, c) in bounds.iter().zip(&cum) {
        let le = *b as f64 / 1e9;
        let _ = writeln!(
            out,
            "eventstream_realtime_latency_seconds_bucket{{le=\"{le}\"}} {c}"
        );
    }
    let _ = writeln!(
        out,
        "eventstream_realtime_latency_seconds_bucket{{le=\"+Inf\"}} {total}"
    );
    let _ = writeln!(out, "eventstream_realtime_latency_seconds_count {total}");
    family(
        &mut out,
        "eventstream_realtime_latency_quantile_seconds",
        "gauge",
        "Realtime latency percentiles from the HDR histogram (0.1 % precision).",
    );
    let q = v.engine.latency.quantiles();
    for (name, ns) in [
        ("0.5", q.p50),
        ("0.99", q.p99),
        ("0.999", q.p999),
        ("1", q.max),
    ] {
        let _ = writeln!(
            out,
            "eventstream_realtime_latency_quantile_seconds{{quantile=\"{name}\"}} {}",
            ns as f64 / 1e9
        );
    }
    family(
        &mut out,
        "eventstream_realtime_unstamped_events_total",
        "counter",
        "Realtime events without a sender stamp (engine.latency_from: payload).",
    );
    let _ = writeln!(
        out,
        "eventstream_realtime_unstamped_events_total {}",
        ld(&v.engine.unstamped)
    );
    out
}

/// Serves until `stop` is set. Commands go to the dispatcher through `commands`.
pub fn serve(
    server: &tiny_http::Server,
    view: &MetricsView<'_>,
    commands: &mpsc::Producer<Command>,
    stop: &AtomicBool,
) {
    info!(addr = ?server.server_addr(), "metrics and admin listening");
    let text = |body: String, code: u16, ctype: &str| {
        let header = tiny_http::Header::from_bytes("Content-Type", ctype).expect("static header");
        tiny_http::Response::from_string(body)
            .with_status_code(code)
            .with_header(header)
    };
    while !stop.load(Ordering::Relaxed) {
        let Ok(Some(mut req)) = server.recv_timeout(Duration::from_millis(100)) else {
            continue;
        };
        let resp = match (req.method(), req.url()) {
            (tiny_http::Method::Get, "/metrics") => {
                text(render(view), 200, "text/plain; version=0.0.4")
            }
            (tiny_http::Method::Get, "/healthz") => {
                let (code, body) = health(view);
                text(body, code, "text/plain")
            }
            (tiny_http::Method::Get, "/state") => text(
                format!("{{\"state\":\"{}\"}}\n", view.engine.state().as_str()),
                200,
                "application/json",
            ),
            (tiny_http::Method::Post, "/state") => {
                let mut body = String::new();
                // At most 64 bytes: the commands are single words.
                let _ = std::io::Read::take(req.as_reader(), 64).read_to_string(&mut body);
                let cmd = match body.trim() {
                    "pause" => Some(Command::Pause),
                    "resume" => Some(Command::Resume),
                    "drain" => Some(Command::Drain),
                    _ => None,
                };
                match cmd {
                    Some(c) if commands.push(c).is_ok() => text(
                        format!("{{\"accepted\":\"{}\"}}\n", body.trim()),
                        202,
                        "application/json",
                    ),
                    Some(_) => text("command queue full\n".into(), 503, "text/plain"),
                    None => text(
                        "body must be pause, resume or drain\n".into(),
                        400,
                        "text/plain",
                    ),
                }
            }
            _ => text("not found\n".into(), 404, "text/plain"),
        };
        if let Err(e) = req.respond(resp) {
            warn!(reason = %e, "admin response failed");
        }
    }
}
