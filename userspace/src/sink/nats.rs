//! The NATS JetStream sink: events leave the box, and count as delivered only once JetStream
//! acknowledged them (`PublishAck`).
//!
//! The appending thread (in inline mode, the receive thread) encodes each event once into a
//! batch buffer, as the file log does, and hands whole buffers over an SPSC ring to the sink's
//! own I/O thread, which runs a current-thread tokio runtime with the async-nats client. There
//! each record is published with its event id as `Nats-Msg-Id`, at most `max_in_flight`
//! unacknowledged at once; what fails (a leader election, a broker that is down, an ack that
//! timed out) is published again with the same id after a backoff, so JetStream's duplicate
//! window turns a retry that had in fact landed into a `duplicate` ack rather than a second
//! copy. Nothing is acknowledged twice in the counters: one record, one resolution.
//!
//! Subject: `subject_prefix` + `.` + the topic with `/` turned into `.`. Headers:
//! `Nats-Msg-Id`, `Es-Priority`, `Es-Source`, `Es-Received-Ns` (receive time, `CLOCK_MONOTONIC`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use std::{io, thread};

use futures_util::StreamExt as _;
use serde::Deserialize;

use crate::ring::spsc;
use crate::sink::{EventRef, Sink, SinkErrorKind, SinkHealth, refusal};
use crate::wire::event::Source;

/// `sinks.nats:`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// `sinks.nats.servers`: `nats://host:port` URLs, tried in turn.
    pub servers: Vec<String>,
    /// `sinks.nats.stream`: the JetStream stream, created if missing.
    pub stream: String,
    /// `sinks.nats.subject_prefix`: the stream takes `<prefix>.>`.
    pub subject_prefix: String,
    /// `sinks.nats.replicas`: the stream's replicas (1..=5).
    pub replicas: usize,
    /// `sinks.nats.duplicate_window_secs`: JetStream's dedup window for `Nats-Msg-Id`.
    pub duplicate_window_secs: u64,
    /// `sinks.nats.max_in_flight`: publishes awaiting their ack at once, per sink.
    pub max_in_flight: usize,
    /// `sinks.nats.connect_timeout_secs`: for the first connection and the stream check.
    pub connect_timeout_secs: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".into()],
            stream: "EVENTS".into(),
            subject_prefix: "events".into(),
            replicas: 1,
            duplicate_window_secs: 120,
            max_in_flight: 1024,
            connect_timeout_secs: 10,
        }
    }
}

/// Bytes before a record's topic and payload in a batch buffer: `len u32` (topic + payload),
/// `id u64`, `ingest_ns u64`, `priority u8`, `source u8`, `topic_len u16`.
const REC_HEADER: usize = 24;
/// Buffers per sink: one being built, the rest queued or being published.
const BUFFERS: usize = 8;
/// A batch buffer past this size is handed over before the batch ends.
const BATCH_BYTES: usize = 256 * 1024;
/// A buffer grows up to this while the broker is behind; past it appends are refused.
const MAX_CHUNK: usize = 8 << 20;
/// Longest a healthy but slow broker may hold up the appender.
const BLOCK_LIMIT: Duration = Duration::from_secs(1);
/// Retry backoff after failed publishes: from the first to the last, doubling.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// A batch of records on its way to the I/O thread.
#[derive(Debug, Default)]
struct Chunk {
    bytes: Vec<u8>,
    records: u64,
}

/// What the appender and the I/O thread share.
#[derive(Debug)]
struct Shared {
    /// Records JetStream acknowledged.
    durable: AtomicU64,
    /// Records given up (the broker refused them for good: too large for it).
    lost: AtomicU64,
    /// Publish what is queued, then stop.
    stop: AtomicBool,
    /// Stop now (the shutdown deadline passed).
    abandon: AtomicBool,
    /// Acks that said `duplicate` (a retry of a publish that had landed).
    duplicate_acks: AtomicU64,
    health: Arc<SinkHealth>,
}

/// A [`Sink`] publishing to a JetStream stream.
#[derive(Debug)]
pub struct NatsSink {
    batch: Chunk,
    to_io: spsc::Producer<Chunk>,
    from_io: spsc::Consumer<Chunk>,
    shared: Arc<Shared>,
    io: Option<thread::JoinHandle<()>>,
    /// The next record's sequence within this sink (the last part of its event id).
    next_id: u64,
    handed: u64,
    acked: u64,
    lost: u64,
}

/// One record decoded from a buffer.
struct Rec<'b> {
    id: u64,
    ingest_ns: u64,
    priority: u8,
    source: u8,
    topic: &'b str,
    payload: &'b [u8],
}

/// The record at `at` and where the next one starts.
fn record(b: &[u8], at: usize) -> (Rec<'_>, usize) {
    let h = &b[at..at + REC_HEADER];
    let len = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")) as usize;
    let topic_len = u16::from_le_bytes([h[22], h[23]]) as usize;
    let body = &b[at + REC_HEADER..at + REC_HEADER + len];
    let rec = Rec {
        id: u64::from_le_bytes(h[4..12].try_into().expect("8 bytes")),
        ingest_ns: u64::from_le_bytes(h[12..20].try_into().expect("8 bytes")),
        priority: h[20],
        source: h[21],
        topic: std::str::from_utf8(&body[..topic_len]).unwrap_or(""),
        payload: &body[topic_len..],
    };
    (rec, at + REC_HEADER + len)
}

/// The subject for `topic`: `prefix.topic` with `/` as `.`.
pub fn subject(prefix: &str, topic: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + 1 + topic.len());
    s.push_str(prefix);
    s.push('.');
    s.extend(topic.chars().map(|c| if c == '/' { '.' } else { c }));
    s
}

/// Sets up the stream: created if missing; an existing one must match what is configured.
async fn ensure_stream(
    js: &async_nats::jetstream::Context,
    cfg: &NatsConfig,
) -> Result<(), String> {
    use async_nats::jetstream::stream;
    let want = stream::Config {
        name: cfg.stream.clone(),
        subjects: vec![format!("{}.>", cfg.subject_prefix)],
        num_replicas: cfg.replicas,
        duplicate_window: Duration::from_secs(cfg.duplicate_window_secs),
        ..Default::default()
    };
    let mut s = js
        .get_or_create_stream(want.clone())
        .await
        .map_err(|e| format!("creating or opening stream {}: {e}", cfg.stream))?;
    let info = s
        .info()
        .await
        .map_err(|e| format!("reading stream {}: {e}", cfg.stream))?;
    let have = &info.config;
    if !have.subjects.iter().any(|x| x == &want.subjects[0])
        || have.num_replicas != want.num_replicas
        || have.duplicate_window != want.duplicate_window
    {
        return Err(format!(
            "stream {} exists with subjects {:?}, {} replicas and a {:?} duplicate window; \
             sinks.nats wants {:?}, {} replicas, {:?} (change the config, or the stream)",
            cfg.stream,
            have.subjects,
            have.num_replicas,
            have.duplicate_window,
            want.subjects,
            want.num_replicas,
            want.duplicate_window
        ));
    }
    Ok(())
}

/// What the I/O thread needs besides the rings.
struct Io {
    cfg: NatsConfig,
    /// Event ids are `<id_prefix><sequence>`.
    id_prefix: String,
    shared: Arc<Shared>,
}

impl Io {
    /// Publishes every record of `chunk` until each is acknowledged (or given up for good),
    /// or the sink is abandoned.
    async fn publish(&self, js: &async_nats::jetstream::Context, chunk: &Chunk) {
        use async_nats::jetstream::context::PublishErrorKind;
        let health = &*self.shared.health;
        let mut pending = Vec::with_capacity(chunk.records as usize);
        let mut at = 0;
        while at < chunk.bytes.len() {
            pending.push(at);
            at = record(&chunk.bytes, at).1;
        }
        let mut backoff = BACKOFF.0;
        let max = self.cfg.max_in_flight.max(1);
        while !pending.is_empty() {
            let mut failed = Vec::new();
            let mut acks = futures_util::stream::FuturesUnordered::new();
            let mut last_error = None;
            for &off in &pending {
                while acks.len() >= max {
                    if let Some((off, r)) = acks.next().await {
                        self.resolve(off, r, &mut failed, &mut last_error);
                    }
                }
                let (r, _) = record(&chunk.bytes, off);
                let source = Source::ALL
                    .get(r.source as usize)
                    .map_or("?", |s| s.as_str());
                let msg = async_nats::jetstream::message::PublishMessage::build()
                    .payload(bytes::Bytes::copy_from_slice(r.payload))
                    .message_id(format!("{}{}", self.id_prefix, r.id))
                    .header("Es-Priority", r.priority.to_string().as_str())
                    .header("Es-Source", source)
                    .header("Es-Received-Ns", r.ingest_ns.to_string().as_str());
                match js
                    .send_publish(subject(&self.cfg.subject_prefix, r.topic), msg)
                    .await
                {
                    Ok(ack) => acks.push(async move { (off, ack.await) }),
                    Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                        // Never accepted, however often it is sent: counted as failed.
                        health.fail(SinkErrorKind::Broker, &io::Error::other(e.to_string()));
                        self.shared.lost.fetch_add(1, Ordering::AcqRel);
                    }
                    Err(e) => {
                        failed.push(off);
                        last_error = Some(e.to_string());
                    }
                }
            }
            while let Some((off, r)) = acks.next().await {
                self.resolve(off, r, &mut failed, &mut last_error);
            }
            if let Some(e) = last_error {
                health.fail(SinkErrorKind::Broker, &io::Error::other(e));
            } else {
                health.recovered();
            }
            if failed.is_empty() {
                return;
            }
            if self.shared.abandon.load(Ordering::Acquire) {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF.1);
            health.retried();
            failed.sort_unstable(); // retried in their original order
            pending = failed;
        }
    }

    fn resolve(
        &self,
        off: usize,
        r: Result<
            async_nats::jetstream::publish::PublishAck,
            async_nats::jetstream::context::PublishError,
        >,
        failed: &mut Vec<usize>,
        last_error: &mut Option<String>,
    ) {
        match r {
            Ok(ack) => {
                if ack.duplicate {
                    self.shared.duplicate_acks.fetch_add(1, Ordering::Relaxed);
                }
                self.shared.durable.fetch_add(1, Ordering::AcqRel);
            }
            Err(e) => {
                failed.push(off);
                *last_error = Some(e.to_string());
            }
        }
    }

    /// The I/O thread: connects, checks the stream (reporting the outcome on `ready`), then
    /// publishes buffers in order until stopped.
    fn run(
        self,
        mut from: spsc::Consumer<Chunk>,
        mut back: spsc::Producer<Chunk>,
        ready: std::sync::mpsc::Sender<Result<(), String>>,
    ) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(format!("starting the NATS runtime: {e}")));
                return;
            }
        };
        rt.block_on(async {
            let setup = async {
                let addrs: Vec<async_nats::ServerAddr> = self
                    .cfg
                    .servers
                    .iter()
                    .map(|s| {
                        s.parse()
                            .map_err(|e| format!("sinks.nats.servers: {s}: {e}"))
                    })
                    .collect::<Result<_, _>>()?;
                let client = async_nats::ConnectOptions::new()
                    .connection_timeout(Duration::from_secs(self.cfg.connect_timeout_secs))
                    .connect(addrs)
                    .await
                    .map_err(|e| format!("connecting to {:?}: {e}", self.cfg.servers))?;
                let js = async_nats::jetstream::context::ContextBuilder::default()
                    .ack_timeout(Duration::from_secs(5))
                    .max_ack_inflight(self.cfg.max_in_flight.max(1) * 2)
                    .backpressure_on_inflight(true)
                    .build(client);
                ensure_stream(&js, &self.cfg).await?;
                Ok::<_, String>(js)
            };
            let limit = Duration::from_secs(self.cfg.connect_timeout_secs.max(1));
            let js = match tokio::time::timeout(limit, setup).await {
                Ok(Ok(js)) => js,
                Ok(Err(e)) => return drop(ready.send(Err(e))),
                Err(_) => {
                    return drop(ready.send(Err(format!(
                        "no JetStream answer from {:?} within {limit:?}",
                        self.cfg.servers
                    ))));
                }
            };
            let _ = ready.send(Ok(()));
            loop {
                if self.shared.abandon.load(Ordering::Acquire) {
                    return;
                }
                let Some(mut chunk) = from.pop() else {
                    if self.shared.stop.load(Ordering::Acquire) && from.is_empty() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_micros(500)).await;
                    continue;
                };
                self.publish(&js, &chunk).await;
                chunk.bytes.clear();
                chunk.records = 0;
                // Cannot fail: at most BUFFERS chunks exist, and the ring back holds them all.
                let _ = back.push(chunk);
            }
        });
    }
}

impl NatsSink {
    /// Connects, checks (or creates) the stream, and starts the sink's I/O thread. `name`
    /// identifies this sink within the appliance (`realtime-0`); event ids are
    /// `<node_id>-<run>-<name>-<sequence>`, `run` the start time, so no two runs share one.
    ///
    /// # Errors
    /// When no server answers, the stream cannot be created, or it exists with other settings.
    pub fn open(cfg: &NatsConfig, node_id: &str, run: u64, name: &str) -> io::Result<Self> {
        let health = Arc::new(SinkHealth::new(format!("nats:{}:{name}", cfg.stream)));
        let shared = Arc::new(Shared {
            durable: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            duplicate_acks: AtomicU64::new(0),
            health,
        });
        let (to_io, from_appender) = spsc::channel::<Chunk>(BUFFERS);
        let (mut spare, from_io) = spsc::channel::<Chunk>(BUFFERS);
        for _ in 1..BUFFERS {
            let _ = spare.push(Chunk {
                bytes: Vec::with_capacity(BATCH_BYTES + 64 * 1024),
                records: 0,
            });
        }
        let io = Io {
            cfg: cfg.clone(),
            id_prefix: format!("{node_id}-{run}-{name}-"),
            shared: Arc::clone(&shared),
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = thread::Builder::new()
            .name("nats-sink".into())
            .spawn(move || io.run(from_appender, spare, ready_tx))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(io::Error::other(e));
            }
            Err(_) => {
                let _ = handle.join();
                return Err(io::Error::other(
                    "the NATS sink's thread ended during setup",
                ));
            }
        }
        Ok(Self {
            batch: Chunk {
                bytes: Vec::with_capacity(BATCH_BYTES + 64 * 1024),
                records: 0,
            },
            to_io,
            from_io,
            shared,
            io: Some(handle),
            next_id: 0,
            handed: 0,
            acked: 0,
            lost: 0,
        })
    }

    /// Acks JetStream marked `duplicate` so far (retries of publishes that had landed).
    pub fn duplicate_acks(&self) -> u64 {
        self.shared.duplicate_acks.load(Ordering::Relaxed)
    }

    /// Hands the batch over when due; `false` when it had to and no buffer came free.
    fn hand_over(&mut self, must: bool) -> bool {
        let len = self.batch.bytes.len();
        if len == 0 {
            return true;
        }
        if !must && len < BATCH_BYTES && self.to_io.slots() < self.to_io.capacity() {
            return true; // the I/O thread has work queued: keep filling this one
        }
        let wait = must || len >= MAX_CHUNK;
        let mut spins = 0u32;
        let since = Instant::now();
        let next = loop {
            if let Some(c) = self.from_io.pop() {
                break c;
            }
            if !wait
                || self.shared.health.is_failing()
                || self.shared.abandon.load(Ordering::Acquire)
                || since.elapsed() >= BLOCK_LIMIT
            {
                return !wait;
            }
            crate::engine::idle::backoff(&mut spins);
        };
        let full = core::mem::replace(&mut self.batch, next);
        self.handed += full.records;
        // Cannot fail: a free buffer came back, so the ring to the I/O thread has a slot.
        let pushed = self.to_io.push(full).is_ok();
        debug_assert!(pushed, "BUFFERS chunks fit in the ring");
        true
    }

    fn resolved(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire) + self.shared.lost.load(Ordering::Acquire)
    }

    /// Stops the I/O thread now and joins it.
    fn abandon(&mut self) {
        self.shared.abandon.store(true, Ordering::Release);
        if let Some(h) = self.io.take() {
            let _ = h.join();
        }
    }
}

impl Sink for NatsSink {
    fn append(&mut self, ev: &EventRef<'_>, _reason: Option<&'static str>) -> io::Result<()> {
        let topic_len = u16::try_from(ev.topic.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "topic too long"))?;
        if self.batch.bytes.len() >= MAX_CHUNK && !self.hand_over(false) {
            return Err(refusal(&match self.shared.health.failure() {
                Some(why) => format!("{} is failing: {why}", self.shared.health.name),
                None => format!("{} is full (the broker is behind)", self.shared.health.name),
            }));
        }
        let b = &mut self.batch.bytes;
        b.extend_from_slice(&((ev.topic.len() + ev.payload.len()) as u32).to_le_bytes());
        b.extend_from_slice(&self.next_id.to_le_bytes());
        b.extend_from_slice(&ev.ingest_ns.to_le_bytes());
        b.push(ev.priority);
        b.push(ev.source as u8);
        b.extend_from_slice(&topic_len.to_le_bytes());
        b.extend_from_slice(ev.topic.as_bytes());
        b.extend_from_slice(ev.payload);
        self.next_id += 1;
        self.batch.records += 1;
        if self.batch.bytes.len() >= BATCH_BYTES {
            self.hand_over(false);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.hand_over(false);
        Ok(())
    }

    fn acked(&mut self) -> io::Result<u64> {
        let d = self.shared.durable.load(Ordering::Acquire);
        let n = d - self.acked;
        self.acked = d;
        Ok(n)
    }

    fn lost(&mut self) -> u64 {
        let l = self.shared.lost.load(Ordering::Acquire);
        let n = l - self.lost;
        self.lost = l;
        n
    }

    fn in_flight(&self) -> u64 {
        (self.handed + self.batch.records).saturating_sub(self.resolved())
    }

    fn close(&mut self, deadline: Instant) -> io::Result<()> {
        let mut sent = false;
        loop {
            if !sent {
                sent = self.batch.bytes.is_empty() || self.hand_over(true);
            }
            if sent && self.resolved() >= self.handed {
                self.shared.stop.store(true, Ordering::Release);
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.abandon();
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{}: {} events not acknowledged by the shutdown deadline",
                        self.shared.health.name,
                        self.in_flight()
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn health(&self) -> Option<&Arc<SinkHealth>> {
        Some(&self.shared.health)
    }

    fn kind(&self) -> &'static str {
        "nats"
    }
}

impl Drop for NatsSink {
    fn drop(&mut self) {
        if self.io.is_none() {
            return;
        }
        // Whatever was appended is still handed over; the I/O thread publishes what is queued
        // and stops, or is abandoned after a grace period.
        self.hand_over(true);
        self.shared.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + BLOCK_LIMIT * 5;
        while let Some(h) = &self.io
            && !h.is_finished()
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(1));
        }
        self.abandon();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_map_slashes_to_dots() {
        assert_eq!(subject("events", "a/b/c"), "events.a.b.c");
        assert_eq!(subject("ev", "x.y"), "ev.x.y");
    }
}
