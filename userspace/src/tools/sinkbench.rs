//! `cargo xtask bench --sinks`: each networked sink beside its own client library used bare, on
//! the same server, in one run (PERF.md: each sink >= 0.8 of its bare client).
//!
//! - **NATS JetStream**, R1 (one server) and R3 (three): the sink (in process, events appended
//!   as the data plane would) against an async-nats publish loop sending the same messages (the
//!   payload, a `Nats-Msg-Id` and the sink's metadata headers) with the same number of acks in
//!   flight; and, to show what the metadata costs, the bare loop with the id alone;
//! - **Kafka** (tansu): the sink against an rdkafka `FutureProducer` loop with the sink's fixed
//!   guarantees (idempotence, `acks=all`), the same headers and timestamp (and with the id
//!   alone);
//! - **PostgreSQL**: the sink (binary `COPY` into a staging table, `INSERT ... ON CONFLICT`, one
//!   transaction per `max_in_flight` rows) against a plain binary `COPY` of the same rows in
//!   transactions of the same size.
//!
//! Each figure is events/s from the first append (or publish) to the last acknowledgement,
//! medians of `runs` runs, bare and sink alternating; the ratio is the median of the per-run
//! ratios. Servers run on loopback, started here, and are stopped at the end.

use std::io;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::sink::remote::RemoteSink;
use crate::sink::{EventRef, Sink, is_refusal};
use crate::tools::servers::{NatsCluster, Postgres, Tansu};
use crate::wire::event::{Peer, Source, monotonic_ns};

/// What to measure.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Events per run.
    pub events: u64,
    /// Runs per figure (at least 3).
    pub runs: usize,
    /// Payload bytes per event.
    pub payload: usize,
    /// Where the servers keep their files.
    pub scratch: std::path::PathBuf,
    /// First of the loopback ports the servers take (24 of them).
    pub base_port: u16,
    /// Targets to run (`nats_r1`, `nats_r3`, `kafka`, `postgres`); empty for all.
    pub only: Vec<String>,
}

impl Plan {
    fn wants(&self, target: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|t| t == target)
    }
}

const TOPIC: &str = "bench.events";
/// Acks (NATS), delivery reports (Kafka) or rows per transaction (PostgreSQL) in flight, for the
/// sink and its bare client alike: the sinks' defaults.
const NATS_IN_FLIGHT: usize = 1024;
const KAFKA_IN_FLIGHT: usize = 10_000;
const PG_ROWS: usize = 1024;

fn rt() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn secs_rate(n: u64, t: Duration) -> f64 {
    n as f64 / t.as_secs_f64().max(1e-9)
}

/// Appends `n` events to `sink` as the data plane would (a flush every 64), waits for every
/// acknowledgement, and returns events/s.
fn drive_sink(mut sink: RemoteSink, n: u64, payload: &[u8]) -> io::Result<f64> {
    let t0 = Instant::now();
    let (mut i, mut acked) = (0u64, 0u64);
    let peer = Peer::v4([198, 18, 0, 1], 40_000);
    while i < n {
        let ev = EventRef {
            seq: i,
            sender_id: None,
            source: Source::Udp,
            ingest_ns: monotonic_ns(),
            peer,
            priority: 3,
            topic: TOPIC,
            payload,
        };
        match sink.append(&ev, None) {
            Ok(()) => {
                i += 1;
                if i.is_multiple_of(64) {
                    sink.flush()?;
                    acked += sink.acked()?;
                }
            }
            // Behind: the data plane would count it as failed; the bench waits instead.
            Err(e) if is_refusal(&e) => {
                acked += sink.acked()?;
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(e),
        }
    }
    sink.flush()?;
    let deadline = t0 + Duration::from_secs(300);
    while acked < n {
        // As the data plane's idle ticks do: a partly filled batch waits only while the I/O
        // thread is busy.
        sink.flush()?;
        acked += sink.acked()?;
        if sink.lost() > 0 {
            return Err(io::Error::other("the sink lost events during the bench"));
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{acked} of {n} acknowledged after 300 s"),
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let rate = secs_rate(n, t0.elapsed());
    sink.close(Instant::now() + Duration::from_secs(10))?;
    Ok(rate)
}

/// The metadata every sink record carries beside its id: receive time (Unix ns) and sender.
fn meta_now() -> (String, &'static str) {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (ns.to_string(), "198.18.0.1:40000")
}

/// The bare async-nats loop: `n` publishes with a message id each (and with `meta`, the sink's
/// metadata headers), `NATS_IN_FLIGHT` acks awaited at once.
fn nats_bare(
    urls: &[String],
    subject: &str,
    n: u64,
    payload: &[u8],
    run: u64,
    meta: bool,
) -> io::Result<f64> {
    use futures_util::StreamExt as _;
    use futures_util::stream::FuturesUnordered;
    let io_err = |e: &dyn std::fmt::Display| io::Error::other(e.to_string());
    rt()?.block_on(async {
        let c = async_nats::connect(urls.to_vec())
            .await
            .map_err(|e| io_err(&e))?;
        let js = async_nats::jetstream::new(c);
        let body = bytes::Bytes::copy_from_slice(payload);
        type Ack = std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<()>>>>;
        let mut acks = FuturesUnordered::<Ack>::new();
        let t0 = Instant::now();
        for i in 0..n {
            while acks.len() >= NATS_IN_FLIGHT {
                if let Some(r) = acks.next().await {
                    r?;
                }
            }
            let mut msg = async_nats::jetstream::message::PublishMessage::build()
                .payload(body.clone())
                .message_id(format!("bare-{run}-{meta}-{i}"));
            if meta {
                let (at, from) = meta_now();
                msg = msg
                    .header("Es-Priority", "3")
                    .header("Es-Source", "udp")
                    .header("Es-Received-Unix-Ns", at.as_str())
                    .header("Es-Sender", from);
            }
            let ack = js
                .send_publish(subject.to_owned(), msg)
                .await
                .map_err(|e| io_err(&e))?;
            acks.push(Box::pin(async move {
                ack.await
                    .map(drop)
                    .map_err(|e| io::Error::other(e.to_string()))
            }));
        }
        while let Some(r) = acks.next().await {
            r?;
        }
        Ok(secs_rate(n, t0.elapsed()))
    })
}

/// The bare rdkafka loop: `n` records with the sink's guarantees (and with `meta`, its headers
/// and timestamp), `KAFKA_IN_FLIGHT` reports awaited at once.
fn kafka_bare(
    bootstrap: &str,
    topic: &str,
    n: u64,
    payload: &[u8],
    run: u64,
    meta: bool,
) -> io::Result<f64> {
    use futures_util::StreamExt as _;
    use futures_util::stream::FuturesUnordered;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    for (k, v) in crate::sink::kafka::FIXED {
        c.set(k, v);
    }
    let producer: FutureProducer = c.create().map_err(io::Error::other)?;
    rt()?.block_on(async {
        let mut reports = FuturesUnordered::new();
        let t0 = Instant::now();
        for i in 0..n {
            let key = format!("bare-{run}-{meta}-{i}");
            let (at, from) = meta_now();
            let mut record = FutureRecord::to(topic).payload(payload).key(key.as_str());
            if meta {
                record = record
                    .timestamp((at.parse::<u64>().unwrap_or(0) / 1_000_000) as i64)
                    .headers(
                        OwnedHeaders::new()
                            .insert(Header {
                                key: "event-id",
                                value: Some(key.as_str()),
                            })
                            .insert(Header {
                                key: "received-unix-ns",
                                value: Some(at.as_str()),
                            })
                            .insert(Header {
                                key: "sender",
                                value: Some(from),
                            }),
                    );
            }
            loop {
                while reports.len() >= KAFKA_IN_FLIGHT {
                    if let Some(r) = reports.next().await {
                        check_report(r)?;
                    }
                }
                match producer.send_result(record) {
                    Ok(f) => {
                        reports.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        if let Some(r) = reports.next().await {
                            check_report(r)?;
                        }
                    }
                    Err((e, _)) => return Err(io::Error::other(e)),
                }
            }
        }
        while let Some(r) = reports.next().await {
            check_report(r)?;
        }
        Ok(secs_rate(n, t0.elapsed()))
    })
}

fn check_report<E>(
    r: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>,
) -> io::Result<()> {
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(io::Error::other(e)),
        // The oneshot's sender went away: the producer dropped the report.
        Err(_) => Err(io::Error::other("the producer dropped a delivery report")),
    }
}

/// The bare PostgreSQL loop: binary `COPY` of `n` rows straight into `table`, `PG_ROWS` rows a
/// transaction.
fn pg_bare(url: &str, table: &str, n: u64, payload: &[u8], run: u64) -> io::Result<f64> {
    use tokio_postgres::types::ToSql;
    let io_err = |e: &dyn std::fmt::Display| io::Error::other(e.to_string());
    rt()?.block_on(async {
        let (mut client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| io_err(&e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {table} (event_id text PRIMARY KEY, topic text NOT NULL, \
                 priority smallint NOT NULL, source text NOT NULL, received_at timestamptz NOT NULL, \
                 payload bytea NOT NULL, sender text)"
            ))
            .await
            .map_err(|e| io_err(&e))?;
        let t0 = Instant::now();
        let mut i = 0u64;
        while i < n {
            let tx = client.transaction().await.map_err(|e| io_err(&e))?;
            let sink = tx
                .copy_in(&format!(
                    "COPY {table} ({}) FROM STDIN BINARY",
                    crate::sink::postgres::COLUMNS
                ))
                .await
                .map_err(|e| io_err(&e))?;
            let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(
                sink,
                &crate::sink::postgres::COLUMN_TYPES,
            );
            let mut writer = std::pin::pin!(writer);
            let end = (i + PG_ROWS as u64).min(n);
            while i < end {
                let id = format!("bare-{run}-{i}");
                let now = std::time::SystemTime::now();
                let sender = Some("198.18.0.1:40000");
                let row: [&(dyn ToSql + Sync); 7] =
                    [&id, &TOPIC, &3i16, &"udp", &now, &payload, &sender];
                writer.as_mut().write(&row).await.map_err(|e| io_err(&e))?;
                i += 1;
            }
            writer.finish().await.map_err(|e| io_err(&e))?;
            tx.commit().await.map_err(|e| io_err(&e))?;
        }
        Ok(secs_rate(n, t0.elapsed()))
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One target: `runs` x (bare with the same messages, bare with the id alone where that
/// differs, then the sink), each on fresh ids.
fn measure(
    target: &str,
    plan: &Plan,
    id_only_differs: bool,
    mut bare: impl FnMut(u64, bool) -> io::Result<f64>,
    mut sink: impl FnMut(u64) -> io::Result<RemoteSink>,
) -> io::Result<Value> {
    let payload = vec![0x5a; plan.payload];
    let (mut b, mut s, mut r) = (Vec::new(), Vec::new(), Vec::new());
    let (mut lean, mut lean_r) = (Vec::new(), Vec::new());
    for run in 0..plan.runs as u64 {
        let bare_eps = bare(run, true)?;
        let id_only = if id_only_differs {
            Some(bare(run, false)?)
        } else {
            None
        };
        let sink_eps = drive_sink(sink(run)?, plan.events, &payload)?;
        eprintln!(
            "bench --sinks: {target} run {run}: sink {sink_eps:.0} events/s, bare client {bare_eps:.0} events/s{}",
            id_only.map_or(String::new(), |x| format!(" ({x:.0} with the id alone)"))
        );
        b.push(bare_eps);
        s.push(sink_eps);
        r.push(sink_eps / bare_eps);
        if let Some(x) = id_only {
            lean.push(x);
            lean_r.push(sink_eps / x);
        }
    }
    let stats = |v: &mut Vec<f64>| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        json!({ "median": median(v).round(), "min": lo.round(), "max": hi.round() })
    };
    let ratio = median(&mut r);
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    Ok(json!({
        "target": target,
        "events": plan.events,
        "payload_bytes": plan.payload,
        "sink_events_per_sec": stats(&mut s),
        "bare_events_per_sec": stats(&mut b),
        "sink_over_bare": round(ratio),
        "per_run_ratios": r.iter().map(|x| round(*x)).collect::<Vec<_>>(),
        "bare_id_only_events_per_sec": (!lean.is_empty()).then(|| stats(&mut lean)),
        "sink_over_bare_id_only": (!lean_r.is_empty()).then(|| round(median(&mut lean_r))),
    }))
}

/// Runs every target whose server can be had here; a target whose server is missing is
/// reported as skipped with the reason.
///
/// # Errors
/// A server that starts but fails, or a sink or client error mid-run.
pub fn run(plan: &Plan) -> io::Result<Value> {
    let mut cases = Vec::new();
    let skipped =
        |target: &str, e: &io::Error| json!({ "target": target, "skipped": e.to_string() });
    let payload = vec![0x5a; plan.payload];
    for (target, nodes, slot) in [("nats_r1", 1u16, 0u16), ("nats_r3", 3, 8)] {
        if !plan.wants(target) {
            continue;
        }
        let dir = plan.scratch.join(target);
        let cluster = match NatsCluster::start(&dir, plan.base_port + slot, nodes) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                cases.push(skipped(target, &e));
                continue;
            }
            Err(e) => return Err(e),
        };
        let urls = cluster.urls();
        let cfg = crate::sink::nats::NatsConfig {
            servers: urls.clone(),
            stream: "BENCH".into(),
            subject_prefix: "bench".into(),
            replicas: usize::from(nodes),
            max_in_flight: NATS_IN_FLIGHT,
            connect_timeout_secs: 30,
            ..Default::default()
        };
        // The sink creates the stream on its first open; the bare loop's first run needs it. A
        // new cluster elects its JetStream leader first: retried for a minute.
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            match crate::sink::nats::open(&cfg, "bench", 0, "setup") {
                Ok(s) => break drop(s),
                Err(e) if Instant::now() < end => {
                    eprintln!("bench --sinks: {target}: {e}; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
        let subject = crate::sink::nats::subject("bench", TOPIC);
        cases.push(measure(
            target,
            plan,
            true,
            |run, meta| nats_bare(&urls, &subject, plan.events, &payload, run, meta),
            |run| crate::sink::nats::open(&cfg, "bench", run + 1, "sink"),
        )?);
    }
    match plan
        .wants("kafka")
        .then(|| Tansu::start(plan.base_port + 16))
        .transpose()
    {
        Ok(None) => {}
        Ok(Some(broker)) => {
            broker.create_topic("bench", 3)?;
            let cfg = crate::sink::kafka::KafkaConfig {
                brokers: broker.bootstrap(),
                topic: "bench".into(),
                ..Default::default()
            };
            debug_assert_eq!(cfg.max_in_flight, KAFKA_IN_FLIGHT);
            cases.push(measure(
                "kafka",
                plan,
                true,
                |run, meta| {
                    kafka_bare(
                        &broker.bootstrap(),
                        "bench",
                        plan.events,
                        &payload,
                        run,
                        meta,
                    )
                },
                |run| crate::sink::kafka::open(&cfg, "bench", run + 1, "sink"),
            )?);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => cases.push(skipped("kafka", &e)),
        Err(e) => return Err(e),
    }
    match plan
        .wants("postgres")
        .then(|| Postgres::start(&plan.scratch.join("postgres"), plan.base_port + 20))
        .transpose()
    {
        Ok(None) => {}
        Ok(Some(pg)) => {
            let cfg = crate::sink::postgres::PostgresConfig {
                url: pg.url(),
                table: "bench_sink".into(),
                max_in_flight: PG_ROWS,
                ..Default::default()
            };
            cases.push(measure(
                "postgres",
                plan,
                false,
                |run, _| pg_bare(&pg.url(), "bench_bare", plan.events, &payload, run),
                |run| crate::sink::postgres::open(&cfg, "bench", run + 1, "sink"),
            )?);
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => cases.push(skipped("postgres", &e)),
        Err(e) => return Err(e),
    }
    Ok(json!({ "cases": cases }))
}
