//! Metrics and admin over HTTP, on one port (default 127.0.0.1:8090), served by the housekeeping
//! thread's runtime ([`crate::daemon::house`]).
//!
//! - `GET /metrics`: Prometheus text. Every family is declared once, in [`collect`], into the
//!   [`Table`] that the exit report renders too.
//! - `GET /healthz`: `ok`, or 503 naming each failing sink.
//! - `GET /state`: the pipeline state as JSON.
//! - `POST /state` with body `pause`, `resume` or `drain`: an operator command.
//! - `POST /config/reload`: reads the configuration file again and puts its routes, control
//!   thresholds and TCP limits in force (`200`), or refuses a bad file with its error (`422`).
//!
//! The hot path never touches this module: it reads the counters the ingest threads, the
//! dispatcher and the workers flush once per batch.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{info, warn};

use crate::engine::control::{Command, PipelineState};
use crate::engine::latency::Stage;
use crate::engine::{DlqReason, EngineCounters, FailReason, WorkerClass};
use crate::ingest::IngestCounters;
use crate::ops::metrics::{Hist, Kind, Table, Value};
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
    /// Each worker class's sink kind, for the `sink` label (`memory`, `file`, `nats`, ...).
    pub sink: [&'static str; 3],
    /// The health of every sink with I/O that can fail (workers' and DLQ's).
    pub sinks: Vec<std::sync::Arc<SinkHealth>>,
    /// The admin server's own counters.
    pub admin: &'s AdminCounters,
    /// The XDP program's verdict counters (all CPUs summed), with AF_XDP.
    pub xdp_verdicts: Box<dyn Fn() -> Option<crate::xdp::VerdictCounts> + Send + Sync + 's>,
    /// Reloads the configuration (`POST /config/reload`): what was put in force, or why not.
    pub reload: Box<dyn Fn() -> Result<String, String> + Send + Sync + 's>,
    /// Reloads put in force and refused (`eventstream_config_reloads_total{result}`).
    pub config_reloads: &'s [std::sync::atomic::AtomicU64; 2],
    /// The TCP listener's accept counters.
    pub tcp: TcpAcceptCounters<'s>,
    /// When the appliance started.
    pub started: Started,
}

/// The TCP listener's accept counters.
#[derive(Clone, Copy, Debug)]
pub struct TcpAcceptCounters<'s> {
    /// Connections refused at a cap.
    pub refused: &'s std::sync::atomic::AtomicU64,
    /// Transient accept errors.
    pub accept_errors: &'s std::sync::atomic::AtomicU64,
}

/// When the appliance started, on both clocks (`eventstream_start_time_seconds`,
/// `eventstream_uptime_seconds`).
#[derive(Clone, Copy, Debug)]
pub struct Started {
    /// Monotonic.
    pub at: std::time::Instant,
    /// Seconds since the Unix epoch.
    pub unix_seconds: f64,
}

impl Started {
    /// Now.
    pub fn now() -> Self {
        Self {
            at: std::time::Instant::now(),
            unix_seconds: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        }
    }
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

/// Binds the admin port; returns the listener and the address it got (for port 0).
///
/// # Errors
/// When the address cannot be bound.
pub fn bind(addr: SocketAddr) -> std::io::Result<(std::net::TcpListener, SocketAddr)> {
    let l = std::net::TcpListener::bind(addr)
        .map_err(|e| std::io::Error::new(e.kind(), format!("admin {addr}: {e}")))?;
    l.set_nonblocking(true)?;
    let bound = l.local_addr()?;
    Ok((l, bound))
}

fn ld(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// Bounds of the latency histograms, 2^i µs from 1 µs to ~16.8 s.
fn latency_bounds() -> Vec<u64> {
    (0..25).map(|i| 1_000u64 << i).collect()
}

/// Every series the appliance exports, read now: the one table `/metrics` and the exit report
/// render. Each accepted event is in exactly one outcome family: delivered, DLQ, discarded
/// (intentionally: duplicates), failed, or still in flight.
#[allow(clippy::too_many_lines)] // One declaration per family, in exposition order.
pub fn collect(v: &MetricsView<'_>) -> Table {
    let mut t = Table::default();
    let by_source = |f: fn(&IngestCounters) -> u64, s: Source| -> u64 {
        v.ingest
            .iter()
            .filter(|(src, _)| *src == s)
            .map(|(_, c)| f(c))
            .sum()
    };
    let per_source = |t: &mut Table, name, help, f: fn(&IngestCounters) -> u64| {
        let fam = t.counter(name, help);
        for s in Source::ALL {
            fam.add(&[("source", s.as_str())], by_source(f, s));
        }
    };

    // The process.
    t.gauge(
        "eventstream_build_info",
        "1, labelled with the version, commit and build profile of the running binary.",
    )
    .add(
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("commit", env!("EVENTSTREAM_COMMIT")),
            (
                "profile",
                if cfg!(debug_assertions) {
                    "debug"
                } else {
                    "release"
                },
            ),
        ],
        1u64,
    );
    t.gauge(
        "eventstream_start_time_seconds",
        "When the appliance started, in seconds since the Unix epoch.",
    )
    .add(&[], v.started.unix_seconds);
    t.gauge(
        "eventstream_uptime_seconds",
        "Seconds since the appliance started.",
    )
    .add(&[], v.started.at.elapsed().as_secs_f64());

    // Ingest.
    per_source(
        &mut t,
        "eventstream_received_events_total",
        "Events accepted from the wire, by ingest path.",
        |c| ld(&c.events),
    );
    per_source(
        &mut t,
        "eventstream_received_bytes_total",
        "Bytes received (UDP payload on the kernel paths, whole frames on AF_XDP), by ingest path.",
        |c| ld(&c.bytes),
    );
    per_source(
        &mut t,
        "eventstream_received_datagrams_total",
        "Datagrams received (UDP and AF_XDP) or TCP reads, by ingest path.",
        |c| ld(&c.datagrams),
    );
    let fam = t.counter(
        "eventstream_protocol_errors_total",
        "Frames rejected as not PROTOCOL.md (never accepted as events), by path and error type.",
    );
    for s in Source::ALL {
        for r in RejectReason::ALL {
            let n: u64 = v
                .ingest
                .iter()
                .filter(|(src, _)| *src == s)
                .map(|(_, c)| c.rejected(r))
                .sum();
            fam.add(&[("source", s.as_str()), ("error_type", r.as_str())], n);
        }
    }
    fam.add(
        &[
            ("source", Source::Xsk.as_str()),
            ("error_type", "bad_packet"),
        ],
        by_source(|c| ld(&c.bad_packets), Source::Xsk),
    );
    per_source(
        &mut t,
        "eventstream_receive_errors_total",
        "Receive calls that failed (other than timeouts), retried.",
        |c| ld(&c.receive_errors),
    );
    t.counter(
        "eventstream_kernel_dropped_datagrams_total",
        "Datagrams the kernel UDP socket dropped (receive buffer full: SO_RXQ_OVFL).",
    )
    .add(
        &[("source", "udp")],
        by_source(|c| ld(&c.kernel_drops), Source::Udp),
    );
    let fam = t.counter(
        "eventstream_xsk_kernel_drops_total",
        "AF_XDP sockets' XDP_STATISTICS, by field.",
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
        fam.add(&[("counter", name)], by_source(f, Source::Xsk));
    }
    t.counter(
        "eventstream_xsk_invalid_descriptors_total",
        "AF_XDP RX descriptors refused in userspace (outside the UMEM, or naming a frame not lent).",
    )
    .add(&[], by_source(|c| ld(&c.invalid_descs), Source::Xsk));
    if let Some(verdicts) = (v.xdp_verdicts)() {
        let fam = t.counter(
            "eventstream_xdp_packets_total",
            "The XDP program's verdicts, by reason (all CPUs).",
        );
        for (verdict, n) in verdicts.labelled() {
            fam.add(&[("verdict", verdict)], n);
        }
    }
    t.counter(
        "eventstream_tcp_refused_connections_total",
        "TCP connections closed at accept: the listener's or a source address's cap was reached.",
    )
    .add(&[], ld(v.tcp.refused));
    t.counter(
        "eventstream_tcp_accept_errors_total",
        "Transient TCP accept errors (EMFILE, ENFILE, ECONNABORTED), retried.",
    )
    .add(&[], ld(v.tcp.accept_errors));

    // The engine: where accepted events went.
    t.counter(
        "eventstream_dispatched_events_total",
        "Events routed to a worker class.",
    )
    .add(&[], ld(&v.engine.dispatched));
    let fam = t.counter(
        "eventstream_delivered_events_total",
        "Events a worker's sink acknowledged (durable, PublishAck, COMMIT, delivery report).",
    );
    for c in WorkerClass::ALL {
        fam.add(
            &[("sink", v.sink[c as usize]), ("worker", c.as_str())],
            ld(&v.engine.delivered[c as usize]),
        );
    }
    let fam = t.counter(
        "eventstream_dlq_events_total",
        "Events the dead-letter queue's sink made durable instead of their route, by reason.",
    );
    for r in DlqReason::ALL {
        fam.add(&[("reason", r.as_str())], ld(&v.engine.dlq[r as usize]));
    }
    t.counter(
        "eventstream_discarded_events_total",
        "Accepted events dropped on purpose, by reason (duplicates within the dedup window).",
    )
    .add(
        &[("reason", "duplicate"), ("intentional", "true")],
        ld(&v.engine.duplicates),
    );
    let fam = t.counter(
        "eventstream_failed_events_total",
        "Accepted events that no sink persisted, by reason.",
    );
    for r in FailReason::ALL {
        fam.add(&[("reason", r.as_str())], ld(&v.engine.failed[r as usize]));
    }
    t.counter(
        "eventstream_dedup_evicted_keys_total",
        "Dedup keys forgotten before their window ended (the window was full).",
    )
    .add(&[], ld(&v.engine.dedup_evictions));
    t.counter(
        "eventstream_batch_flushes_total",
        "Groups the batch workers wrote.",
    )
    .add(&[], ld(&v.engine.batch_flushes));
    t.counter(
        "eventstream_batch_evicted_groups_total",
        "Batch groups written early because a new topic needed the slot (engine.batch_max_topics).",
    )
    .add(&[], ld(&v.engine.batch_evicted_groups));
    t.counter(
        "eventstream_memory_sink_evicted_records_total",
        "Delivered records the memory sink dropped, oldest first, to make room (by design).",
    )
    .add(&[], ld(&v.engine.sink_evicted));
    let (depth, cap) = (v.queue)();
    t.gauge(
        "eventstream_queue_depth",
        "Events waiting in the ingest -> dispatcher queue.",
    )
    .add(&[("queue", "ingest")], depth as u64);
    t.gauge(
        "eventstream_queue_capacity",
        "Slots in the ingest -> dispatcher queue.",
    )
    .add(&[("queue", "ingest")], cap as u64);
    let now = v.engine.state();
    let fam = t.gauge(
        "eventstream_pipeline_state",
        "1 for the current pipeline state.",
    );
    for st in PipelineState::ALL {
        fam.add(&[("state", st.as_str())], u64::from(st == now));
    }
    let fam = t.counter(
        "eventstream_pipeline_transitions_total",
        "Transitions into each pipeline state.",
    );
    for st in PipelineState::ALL {
        fam.add(
            &[("state", st.as_str())],
            ld(&v.engine.transitions[st as usize]),
        );
    }

    // Latency.
    let bounds = latency_bounds();
    let fam = t.histogram(
        "eventstream_stage_latency_seconds",
        "Latency by stage, sampled (the first event of one batch in 8): receive -> routed, routed -> worker (pipelined mode).",
    );
    for stage in Stage::ALL {
        fam.add(
            &[("stage", stage.as_str())],
            Hist::from_ns(&v.engine.stages.get(stage).buckets(&bounds)),
        );
    }
    t.histogram(
        "eventstream_realtime_latency_seconds",
        "Receive (or, with engine.latency_from: payload, sender) -> realtime worker, every event.",
    )
    .add(&[], Hist::from_ns(&v.engine.latency.buckets(&bounds)));
    let q = v.engine.latency.quantiles();
    let fam = t.gauge(
        "eventstream_realtime_latency_quantile_seconds",
        "Realtime latency percentiles from the HDR histogram (0.1 % precision).",
    );
    for (name, ns) in [
        ("0.5", q.p50),
        ("0.99", q.p99),
        ("0.999", q.p999),
        ("1", q.max),
    ] {
        fam.add(&[("quantile", name)], ns as f64 / 1e9);
    }
    t.counter(
        "eventstream_realtime_unstamped_events_total",
        "Realtime events without a sender stamp (engine.latency_from: payload).",
    )
    .add(&[], ld(&v.engine.unstamped));

    // Sinks.
    let per_sink = |t: &mut Table, name, kind, help, f: &dyn Fn(&SinkHealth) -> Value| {
        let fam = t.family(name, kind, help);
        for h in &v.sinks {
            fam.add(&[("sink", &h.name)], f(h));
        }
    };
    per_sink(
        &mut t,
        "eventstream_sink_up",
        Kind::Gauge,
        "1 while a sink's last write succeeded, 0 while it fails and retries.",
        &|h| u64::from(!h.is_failing()).into(),
    );
    per_sink(
        &mut t,
        "eventstream_sink_in_flight_events",
        Kind::Gauge,
        "Events a sink took and has not yet made durable (or lost).",
        &|h| h.in_flight().into(),
    );
    per_sink(
        &mut t,
        "eventstream_sink_sent_events_total",
        Kind::Counter,
        "Events handed to a sink's I/O (written or published, before acknowledgement).",
        &|h| h.sent_totals().0.into(),
    );
    per_sink(
        &mut t,
        "eventstream_sink_sent_bytes_total",
        Kind::Counter,
        "Bytes handed to a sink's I/O, as encoded for it.",
        &|h| h.sent_totals().1.into(),
    );
    per_sink(
        &mut t,
        "eventstream_sink_spilled_events_total",
        Kind::Counter,
        "Events a sink spilled to its disk buffer while the other side was behind or down.",
        &|h| h.spill_totals().0.into(),
    );
    per_sink(
        &mut t,
        "eventstream_sink_replayed_events_total",
        Kind::Counter,
        "Events an earlier run left in a sink's disk buffer, delivered by this run (not part of this run's accepted events).",
        &|h| h.replayed_total().into(),
    );
    per_sink(
        &mut t,
        "eventstream_sink_disk_buffer_bytes",
        Kind::Gauge,
        "Bytes in a sink's disk buffer now (0 once delivered).",
        &|h| h.spill_totals().1.into(),
    );
    per_sink(
        &mut t,
        "eventstream_sink_ack_latency_seconds",
        Kind::Histogram,
        "Worker -> sink acknowledged (durable, PublishAck, COMMIT, delivery report), every event.",
        &|h| {
            let (buckets, count, sum_ns) = h.ack_histogram();
            let mut cum = 0;
            Hist {
                buckets: crate::sink::ACK_BUCKETS_US
                    .iter()
                    .zip(buckets)
                    .map(|(le, n)| {
                        cum += n;
                        (*le as f64 / 1e6, cum)
                    })
                    .collect(),
                count,
                sum: sum_ns as f64 / 1e9,
            }
            .into()
        },
    );
    let fam = t.counter(
        "eventstream_sink_errors_total",
        "Failed sink writes and syncs, by sink and error type.",
    );
    for h in &v.sinks {
        for k in SinkErrorKind::ALL {
            fam.add(
                &[("sink", &h.name), ("error_type", k.as_str())],
                h.errors(k),
            );
        }
    }
    per_sink(
        &mut t,
        "eventstream_sink_retries_total",
        Kind::Counter,
        "Retries of failed sink writes.",
        &|h| h.retries().into(),
    );

    // Operations.
    let fam = t.counter(
        "eventstream_config_reloads_total",
        "Configuration reloads (SIGHUP, POST /config/reload), put in force or refused.",
    );
    for (result, n) in ["ok", "error"].iter().zip(v.config_reloads) {
        fam.add(&[("result", result)], ld(n));
    }
    let a = v.admin;
    t.counter(
        "eventstream_admin_refused_connections_total",
        "Admin connections closed at accept: admin.max_connections were open.",
    )
    .add(&[], ld(&a.refused_connections));
    let fam = t.counter(
        "eventstream_admin_request_errors_total",
        "Admin requests refused, by error type (forbidden: token, Host or Origin).",
    );
    for (error_type, c) in [
        ("bad_request", &a.bad_requests),
        ("forbidden", &a.forbidden),
    ] {
        fam.add(&[("error_type", error_type)], ld(c));
    }
    t.counter(
        "eventstream_admin_accept_errors_total",
        "Transient admin accept errors (EMFILE, ECONNABORTED), retried.",
    )
    .add(&[], ld(&a.accept_errors));
    t
}

/// The table over fresh counters with every optional part present (an XDP program, a sink):
/// every family the appliance can export, for checking dashboards and docs against.
#[doc(hidden)]
pub fn every_family() -> Table {
    let fresh = Fresh::default();
    let view = fresh.view(
        Source::Xsk,
        vec![std::sync::Arc::new(SinkHealth::new("nats"))],
        Box::new(|| Some(crate::xdp::VerdictCounts::default())),
    );
    collect(&view)
}

/// Counters at zero and a [`MetricsView`] over them: what the metric table's own tests, the
/// fuzz harness ([`answer_bytes`]) and the housekeeping thread's tests serve.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct Fresh {
    engine: EngineCounters,
    ingest: IngestCounters,
    admin: AdminCounters,
    zeros: [std::sync::atomic::AtomicU64; 2],
}

impl Fresh {
    /// A view with one ingest source, these sinks and these verdicts; reloads are refused.
    pub fn view<'a>(
        &'a self,
        source: Source,
        sinks: Vec<std::sync::Arc<SinkHealth>>,
        xdp_verdicts: Box<dyn Fn() -> Option<crate::xdp::VerdictCounts> + Send + Sync + 'a>,
    ) -> MetricsView<'a> {
        MetricsView {
            ingest: vec![(source, &self.ingest)],
            engine: &self.engine,
            queue: Box::new(|| (0, 1)),
            sink: ["memory"; 3],
            sinks,
            admin: &self.admin,
            xdp_verdicts,
            reload: Box::new(|| Err("no configuration file here".into())),
            config_reloads: &self.zeros,
            tcp: TcpAcceptCounters {
                refused: &self.zeros[0],
                accept_errors: &self.zeros[1],
            },
            started: Started::now(),
        }
    }
}

/// Renders the Prometheus text exposition of [`collect`].
pub fn render(v: &MetricsView<'_>) -> String {
    collect(v).prometheus()
}

/// The admin server's limits and credentials (from `admin:`).
#[derive(Clone, Debug)]
pub struct Policy {
    /// Connections served at once; more are closed at accept (counted).
    pub max_connections: usize,
    /// Longest a request's headers, or its body, may take to arrive; also the longest a
    /// response may take to be written, and a connection may sit idle.
    pub timeout: Duration,
    /// The bearer token state-changing requests must carry (`admin.token_file`), if any.
    pub token: Option<String>,
    /// `Host` values state-changing requests may name (`host:port`), against DNS rebinding;
    /// an `Origin`, when sent, must be `http://` one of them (CSRF from a browser page).
    pub allowed_hosts: Vec<String>,
}

impl Policy {
    /// The hosts a server bound to `bound` answers to: its address, and `localhost` for a
    /// loopback one, plus `extra` (`admin.allowed_hosts`).
    pub fn hosts_for(bound: SocketAddr, extra: &[String]) -> Vec<String> {
        let port = bound.port();
        let mut hosts = vec![bound.to_string()];
        if bound.ip().is_loopback() {
            hosts.push(format!("localhost:{port}"));
        }
        hosts.extend(extra.iter().cloned());
        hosts
    }
}

/// Largest request head (request line and headers) read.
const MAX_HEAD: usize = 16 * 1024;
/// Most header lines in a request.
const MAX_HEADERS: usize = 32;
/// Largest request body read (the commands are single words).
const MAX_BODY: usize = 64;

/// What the admin server counts about itself.
#[derive(Debug, Default)]
pub struct AdminCounters {
    /// Connections closed at accept because `max_connections` were open.
    pub refused_connections: std::sync::atomic::AtomicU64,
    /// Requests answered 4xx other than 403 (malformed, too large, too slow, unknown).
    pub bad_requests: std::sync::atomic::AtomicU64,
    /// State-changing requests refused for a missing or wrong token, `Host` or `Origin`.
    pub forbidden: std::sync::atomic::AtomicU64,
    /// Transient accept errors (`EMFILE`, `ECONNABORTED`, ...), retried.
    pub accept_errors: std::sync::atomic::AtomicU64,
}

type Reply = hyper::Response<http_body_util::Full<bytes::Bytes>>;

fn reply(code: u16, ctype: &'static str, body: String) -> Reply {
    let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::OK);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    r
}

/// Why a state-changing request is refused, if it is.
fn forbidden(req: &hyper::Request<hyper::body::Incoming>, policy: &Policy) -> Option<&'static str> {
    let h = req.headers();
    let host = h.get(hyper::header::HOST).and_then(|v| v.to_str().ok());
    if !host.is_some_and(|host| {
        policy
            .allowed_hosts
            .iter()
            .any(|a| a.eq_ignore_ascii_case(host))
    }) {
        return Some("Host is not one this server answers to (admin.allowed_hosts)\n");
    }
    if let Some(origin) = h.get(hyper::header::ORIGIN) {
        let ok = origin.to_str().ok().is_some_and(|o| {
            o.strip_prefix("http://").is_some_and(|o| {
                policy
                    .allowed_hosts
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(o))
            })
        });
        if !ok {
            return Some("cross-origin requests may not change state\n");
        }
    }
    if let Some(token) = &policy.token {
        use subtle::ConstantTimeEq as _;
        let given = h
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
            return Some("a valid bearer token is required (admin.token_file)\n");
        }
    }
    None
}

/// Answers one request.
async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    view: &MetricsView<'_>,
    commands: &mpsc::Producer<Command>,
    policy: &Policy,
    counters: &AdminCounters,
) -> Reply {
    use http_body_util::BodyExt as _;
    use hyper::Method;
    let r = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => reply(200, "text/plain; version=0.0.4", render(view)),
        (&Method::GET, "/healthz") => {
            let (code, body) = health(view);
            reply(code, "text/plain", body)
        }
        (&Method::GET, "/state") => reply(
            200,
            "application/json",
            format!("{{\"state\":\"{}\"}}\n", view.engine.state().as_str()),
        ),
        (&Method::POST, "/state") => {
            if let Some(why) = forbidden(&req, policy) {
                counters.forbidden.fetch_add(1, Ordering::Relaxed);
                return reply(403, "text/plain", why.into());
            }
            let body = http_body_util::Limited::new(req.into_body(), MAX_BODY);
            let body = match tokio::time::timeout(policy.timeout, body.collect()).await {
                Err(_) => {
                    return reply(
                        408,
                        "text/plain",
                        "the body did not arrive in time\n".into(),
                    );
                }
                Ok(Err(_)) => {
                    return reply(
                        413,
                        "text/plain",
                        format!("the body is limited to {MAX_BODY} bytes\n"),
                    );
                }
                Ok(Ok(b)) => b.to_bytes(),
            };
            let word = std::str::from_utf8(&body).unwrap_or("").trim();
            let cmd = match word {
                "pause" => Some(Command::Pause),
                "resume" => Some(Command::Resume),
                "drain" => Some(Command::Drain),
                _ => None,
            };
            match cmd {
                Some(c) if commands.push(c).is_ok() => reply(
                    202,
                    "application/json",
                    format!("{{\"accepted\":\"{word}\"}}\n"),
                ),
                Some(_) => reply(503, "text/plain", "command queue full\n".into()),
                None => reply(
                    400,
                    "text/plain",
                    "body must be pause, resume or drain\n".into(),
                ),
            }
        }
        (&Method::POST, "/config/reload") => {
            if let Some(why) = forbidden(&req, policy) {
                counters.forbidden.fetch_add(1, Ordering::Relaxed);
                return reply(403, "text/plain", why.into());
            }
            match (view.reload)() {
                Ok(what) => reply(200, "text/plain", format!("reloaded: {what}\n")),
                Err(why) => reply(
                    422,
                    "text/plain",
                    format!("refused, the configuration in force stays: {why}\n"),
                ),
            }
        }
        (_, "/metrics" | "/healthz" | "/state" | "/config/reload") => {
            reply(405, "text/plain", "method not allowed\n".into())
        }
        _ => reply(404, "text/plain", "not found\n".into()),
    };
    if r.status().is_client_error() {
        counters.bad_requests.fetch_add(1, Ordering::Relaxed);
    }
    r
}

/// The HTTP/1 settings every admin connection is served with.
fn http_builder(policy: &Policy) -> hyper::server::conn::http1::Builder {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(policy.timeout)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS);
    http
}

/// Serves `input` as the bytes of one client connection, with the admin server's own limits,
/// policy checks and handlers over fresh counters, and returns what it answered: the fuzz
/// target's way in (`fuzz/fuzz_targets/admin_request.rs`). Commands it accepts go nowhere.
#[doc(hidden)]
pub fn answer_bytes(input: &[u8]) -> Vec<u8> {
    let fresh = Fresh::default();
    let view = fresh.view(Source::Udp, Vec::new(), Box::new(|| None));
    let admin = AdminCounters::default();
    let (commands, _rx) = mpsc::channel::<Command>(4);
    let policy = Policy {
        max_connections: 1,
        timeout: Duration::from_millis(50),
        token: Some("fuzz-token-0123456789".into()),
        allowed_hosts: vec!["127.0.0.1:8090".into()],
    };
    thread_local! {
        // One runtime per fuzzing thread: building one per input would cost more than the
        // input itself.
        static RT: Option<tokio::runtime::Runtime> = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .ok();
    }
    RT.with(|rt| match rt {
        Some(rt) => serve_bytes(rt, input, &view, &commands, &policy, &admin),
        None => Vec::new(),
    })
}

/// [`answer_bytes`]' connection, on `rt`.
fn serve_bytes(
    rt: &tokio::runtime::Runtime,
    input: &[u8],
    view: &MetricsView<'_>,
    commands: &mpsc::Producer<Command>,
    policy: &Policy,
    admin: &AdminCounters,
) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let service = hyper::service::service_fn(|req| async move {
            Ok::<_, std::convert::Infallible>(answer(req, view, commands, policy, admin).await)
        });
        // The client's end of the input is a half-close: answer what came before it.
        let mut http = http_builder(policy);
        http.half_close(true);
        let conn = http.serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let talk = async {
            let _ = client.write_all(input).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            out
        };
        let (out, _) = tokio::join!(
            tokio::time::timeout(Duration::from_secs(2), talk),
            tokio::time::timeout(Duration::from_secs(2), conn)
        );
        out.unwrap_or_default()
    })
}

/// Serves `listener` for as long as the returned future is polled (the housekeeping thread's
/// runtime drives it, see [`crate::daemon`]): one task per connection (no thread), at most
/// `policy.max_connections`, each request's head limited in size and time, bodies in size and
/// time, and every connection's life bounded, so no client can crash it or hold it. Commands go
/// to the control plane through `commands`. Accept errors are counted and retried; the future
/// ends only with an error from registering the listener with the runtime.
///
/// # Errors
/// When the listener cannot be registered with the runtime.
pub async fn serve(
    listener: std::net::TcpListener,
    view: &MetricsView<'_>,
    commands: &mpsc::Producer<Command>,
    policy: &Policy,
    counters: &AdminCounters,
) -> std::io::Result<()> {
    use futures_util::StreamExt as _;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    info!(addr = ?listener.local_addr().ok(), max_connections = policy.max_connections, token = policy.token.is_some(), "metrics and admin listening");
    let http = http_builder(policy);
    let mut conns = futures_util::stream::FuturesUnordered::new();
    let mut accept_backoff = Duration::from_millis(5);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, _peer)) => {
                    accept_backoff = Duration::from_millis(5);
                    if conns.len() >= policy.max_connections {
                        counters.refused_connections.fetch_add(1, Ordering::Relaxed);
                        continue; // dropped: closed at once
                    }
                    let _ = sock.set_nodelay(true);
                    let service = hyper::service::service_fn(move |req| async move {
                        Ok::<_, std::convert::Infallible>(answer(req, view, commands, policy, counters).await)
                    });
                    let conn = http.serve_connection(hyper_util::rt::TokioIo::new(sock), service);
                    // A connection lives at most this long, however it behaves (a slow
                    // reader of responses included).
                    let life = policy.timeout * 12;
                    conns.push(async move {
                        let _ = tokio::time::timeout(life, conn).await;
                    });
                }
                Err(e) => {
                    // EMFILE, ENFILE, ECONNABORTED...: counted, retried after a pause.
                    let n = counters.accept_errors.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        warn!(reason = %e, errors = n, "admin accept failed; retrying");
                    }
                    tokio::time::sleep(accept_backoff).await;
                    accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                }
            },
            Some(()) = conns.next(), if !conns.is_empty() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_bytes_get_an_answer_or_nothing_never_a_hang() {
        let ok = answer_bytes(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(
            ok.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&ok)
        );
        let drain = answer_bytes(
            b"POST /state HTTP/1.1\r\nHost: 127.0.0.1:8090\r\nContent-Length: 5\r\n\r\ndrain",
        );
        assert!(
            drain.starts_with(b"HTTP/1.1 403"),
            "no token: {}",
            String::from_utf8_lossy(&drain)
        );
        let authed = answer_bytes(b"POST /state HTTP/1.1\r\nHost: 127.0.0.1:8090\r\nAuthorization: Bearer fuzz-token-0123456789\r\nContent-Length: 5\r\n\r\ndrain");
        assert!(
            authed.starts_with(b"HTTP/1.1 202"),
            "{}",
            String::from_utf8_lossy(&authed)
        );
        for bad in [
            &b"GET /metrics HTTP/1.1\r\nContent-Length: 9223372036854775000\r\n\r\n"[..],
            b"POST /state HTTP/1.1\r\nHost: 127.0.0.1:8090\r\nAuthorization: Bearer fuzz-token-0123456789\r\nContent-Length: 5000\r\n\r\nd",
            b"\x00\xff\r\n\r\n",
            b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
        ] {
            let out = answer_bytes(bad);
            assert!(out.is_empty() || out.starts_with(b"HTTP/1."), "{}", String::from_utf8_lossy(&out));
        }
    }
}
