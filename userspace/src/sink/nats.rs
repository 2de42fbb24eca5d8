//! The NATS JetStream sink: events leave the box, and count as delivered only once JetStream
//! acknowledged them (`PublishAck`).
//!
//! A [`Backend`] of [`RemoteSink`]: on the sink's I/O thread, with the async-nats client,
//! each record is published with its event id as `Nats-Msg-Id`, at most `max_in_flight`
//! unacknowledged at once; what fails (a leader election, a broker that is down, an ack that
//! timed out) is published again with the same id after a backoff, so JetStream's duplicate
//! window turns a retry that had in fact landed into a `duplicate` ack rather than a second
//! copy. Nothing is acknowledged twice in the counters: one record, one resolution.
//!
//! Subject: `subject_prefix` + `.` + the topic with `/` turned into `.`. Headers:
//! `Nats-Msg-Id`, `Es-Priority`, `Es-Source` (the ingest path), `Es-Received-Unix-Ns` (receive
//! time on the wall clock) and `Es-Sender` (the sender's address and port, when known).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use serde::Deserialize;

use crate::sink::remote::{BACKOFF, Backend, Chunk, RemoteSink, Shared, retry_rounds};
use crate::sink::{SinkErrorKind, SinkHealth};
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

/// The JetStream side of a [`RemoteSink`].
///
/// Publishes are pipelined across chunks: `deliver` publishes a chunk and returns once the
/// *previous* chunk is settled, keeping a copy of this one while its acks are on their way, so
/// the window of `max_in_flight` publishes never drains between chunks (it would, every
/// chunk, if each waited for its own last ack). What fails is retried from the copy.
struct Nats {
    cfg: NatsConfig,
    js: Option<async_nats::jetstream::Context>,
    /// The last chunk published, copied; its acks may still be outstanding.
    prev: Chunk,
    /// Whether `prev` holds a chunk not yet settled.
    prev_open: bool,
    /// Acks outstanding, tagged with their chunk's generation.
    acks: futures_util::stream::FuturesUnordered<AckFuture>,
    /// Generation of the chunk being published; `prev` is `generation - 1`.
    generation: u64,
    /// Acks outstanding for `prev`.
    prev_outstanding: usize,
    /// Records of `prev` / of the current chunk whose publish failed, to retry.
    prev_failed: Vec<usize>,
    cur_failed: Vec<usize>,
    last_error: Option<String>,
    /// This sink's health: the client's connection events mark it failing the moment the last
    /// server is lost (not an ack timeout later) and healthy again when one answers.
    health: Arc<SinkHealth>,
}

type AckResult = Result<
    async_nats::jetstream::publish::PublishAck,
    async_nats::jetstream::context::PublishError,
>;

type AckFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = (u64, usize, AckResult)> + Send>>;

impl Nats {
    fn new(cfg: NatsConfig, health: Arc<SinkHealth>) -> Self {
        Self {
            health,
            cfg,
            js: None,
            prev: Chunk::default(),
            prev_open: false,
            acks: futures_util::stream::FuturesUnordered::new(),
            generation: 0,
            prev_outstanding: 0,
            prev_failed: Vec::new(),
            cur_failed: Vec::new(),
            last_error: None,
        }
    }

    /// Counts one settled ack.
    fn settled(&mut self, (generation, at, r): (u64, usize, AckResult), shared: &Shared) {
        if generation != self.generation {
            self.prev_outstanding -= 1;
        }
        match r {
            Ok(_) => shared.durable(1),
            Err(e) => {
                self.last_error = Some(e.to_string());
                if generation == self.generation {
                    self.cur_failed.push(at);
                } else {
                    self.prev_failed.push(at);
                }
            }
        }
    }

    /// Publishes the records at `ats` of `chunk` as generation `self.generation`, keeping at most
    /// `max_in_flight` acks outstanding.
    async fn publish(
        &mut self,
        chunk: &Chunk,
        ats: impl Iterator<Item = usize>,
        shared: &Shared,
        ids: &str,
    ) {
        use async_nats::jetstream::context::PublishErrorKind;
        let Some(js) = self.js.clone() else { return };
        let max = self.cfg.max_in_flight.max(1);
        for at in ats {
            while self.acks.len() >= max {
                if let Some(done) = self.acks.next().await {
                    self.settled(done, shared);
                }
            }
            let (r, _) = chunk.record(at);
            let msg = message(&r, ids);
            let generation = self.generation;
            match js
                .send_publish(subject(&self.cfg.subject_prefix, r.topic), msg)
                .await
            {
                Ok(ack) => self
                    .acks
                    .push(Box::pin(async move { (generation, at, ack.await) })),
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    // Never accepted, however often it is sent: counted as failed.
                    shared
                        .health
                        .fail(SinkErrorKind::Broker, &io::Error::other(e.to_string()));
                    shared.lost(1);
                }
                Err(e) => self.settled((generation, at, Err(e)), shared),
            }
        }
    }

    /// Waits for every ack of `prev`, then retries its failures (rounds that publish them
    /// again and wait for all, with backoff) until each is counted or the sink is abandoned.
    async fn settle_prev(&mut self, shared: &Shared, ids: &str) {
        while self.prev_outstanding > 0 {
            match self.acks.next().await {
                Some(done) => self.settled(done, shared),
                None => break,
            }
        }
        if !self.prev_failed.is_empty() {
            if let Some(e) = self.last_error.take() {
                shared
                    .health
                    .fail(SinkErrorKind::Broker, &io::Error::other(e));
            }
            tokio::time::sleep(BACKOFF.0).await;
            shared.health.retried();
            let mut pending = std::mem::take(&mut self.prev_failed);
            pending.sort_unstable();
            let (Some(js), prev) = (self.js.clone(), &self.prev) else {
                return;
            };
            let (max, prefix) = (self.cfg.max_in_flight.max(1), &self.cfg.subject_prefix);
            retry_rounds(shared, pending, async |pending: &[usize]| {
                round(&js, prev, pending, max, prefix, shared, ids).await
            })
            .await;
        } else if self.last_error.is_none() {
            shared.health.recovered();
        }
        self.prev_open = false;
    }
}

/// One retry round: publishes the records at `pending` of `chunk` and waits for every ack;
/// returns those that failed and the last error.
async fn round(
    js: &async_nats::jetstream::Context,
    chunk: &Chunk,
    pending: &[usize],
    max: usize,
    prefix: &str,
    shared: &Shared,
    ids: &str,
) -> (Vec<usize>, Option<String>) {
    use async_nats::jetstream::context::PublishErrorKind;
    let mut failed = Vec::new();
    let mut acks = futures_util::stream::FuturesUnordered::new();
    let mut last_error = None;
    let mut settle = |(at, r): (usize, AckResult), failed: &mut Vec<usize>| match r {
        Ok(_) => shared.durable(1),
        Err(e) => {
            failed.push(at);
            last_error = Some(e.to_string());
        }
    };
    for &at in pending {
        while acks.len() >= max {
            if let Some(done) = acks.next().await {
                settle(done, &mut failed);
            }
        }
        let (r, _) = chunk.record(at);
        match js
            .send_publish(subject(prefix, r.topic), message(&r, ids))
            .await
        {
            Ok(ack) => acks.push(async move { (at, ack.await) }),
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                shared
                    .health
                    .fail(SinkErrorKind::Broker, &io::Error::other(e.to_string()));
                shared.lost(1);
            }
            Err(e) => settle((at, Err(e)), &mut failed),
        }
    }
    while let Some(done) = acks.next().await {
        settle(done, &mut failed);
    }
    (failed, last_error)
}

/// The JetStream message for record `r`: its event id as `Nats-Msg-Id`, and its metadata.
fn message(
    r: &crate::sink::remote::Rec<'_>,
    ids: &str,
) -> async_nats::jetstream::message::PublishMessage {
    let source = Source::ALL
        .get(r.source as usize)
        .map_or("?", |s| s.as_str());
    let msg = async_nats::jetstream::message::PublishMessage::build()
        .payload(bytes::Bytes::copy_from_slice(r.payload))
        .message_id(r.event_id(ids))
        .header("Es-Priority", r.priority.to_string().as_str())
        .header("Es-Source", source)
        .header(
            "Es-Received-Unix-Ns",
            r.received_unix_ns.to_string().as_str(),
        );
    match r.peer.socket_addr() {
        Some(a) => msg.header("Es-Sender", a.to_string().as_str()),
        None => msg,
    }
}

impl Backend for Nats {
    async fn setup(&mut self) -> Result<(), String> {
        let addrs: Vec<async_nats::ServerAddr> = self
            .cfg
            .servers
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|e| format!("sinks.nats.servers: {s}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        let health = Arc::clone(&self.health);
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(self.cfg.connect_timeout_secs))
            .event_callback(move |event| {
                let health = Arc::clone(&health);
                async move {
                    match event {
                        async_nats::Event::Disconnected => health.fail(
                            SinkErrorKind::Broker,
                            &io::Error::new(
                                io::ErrorKind::NotConnected,
                                "disconnected from NATS (reconnecting)",
                            ),
                        ),
                        // Publishes can flow again; an ack that still fails marks it again.
                        async_nats::Event::Connected => health.recovered(),
                        _ => {}
                    }
                }
            })
            .connect(addrs)
            .await
            .map_err(|e| format!("connecting to {:?}: {e}", self.cfg.servers))?;
        let js = async_nats::jetstream::context::ContextBuilder::default()
            .ack_timeout(Duration::from_secs(5))
            .max_ack_inflight(self.cfg.max_in_flight.max(1) * 2)
            .backpressure_on_inflight(true)
            .build(client);
        ensure_stream(&js, &self.cfg).await?;
        self.js = Some(js);
        Ok(())
    }

    /// Publishes every record of `chunk`, then settles the chunk before it (see [`Nats`]).
    async fn deliver(&mut self, chunk: &Chunk, shared: &Shared, ids: &str) {
        self.publish(chunk, chunk.iter().map(|r| r.at), shared, ids)
            .await;
        if self.prev_open {
            self.settle_prev(shared, ids).await;
        }
        // This chunk becomes `prev`: copied, since its buffer goes back to the appender.
        self.prev.copy_from(chunk);
        self.prev_open = true;
        self.prev_outstanding = self.acks.len();
        self.prev_failed = std::mem::take(&mut self.cur_failed);
        self.generation += 1;
    }

    async fn settle(&mut self, shared: &Shared, ids: &str) {
        if self.prev_open {
            self.settle_prev(shared, ids).await;
        }
    }

    fn unsettled(&self) -> bool {
        self.prev_open
    }

    fn take_unsettled(&mut self) -> Option<Chunk> {
        std::mem::take(&mut self.prev_open).then(|| std::mem::take(&mut self.prev))
    }
}

/// Connects, checks (or creates) the stream, and starts a sink publishing to it. `name`
/// identifies this sink within the appliance (`realtime-0`); event ids are
/// given at receive (see [`crate::sink::remote`]).
///
/// # Errors
/// When no server answers, the stream cannot be created, or it exists with other settings.
pub fn open(cfg: &NatsConfig, node_id: &str, run: u64, name: &str) -> io::Result<RemoteSink> {
    let health = Arc::new(SinkHealth::new(format!("nats:{}:{name}", cfg.stream)));
    RemoteSink::open(
        "nats",
        Nats::new(cfg.clone(), Arc::clone(&health)),
        health,
        format!("{node_id}-{run}-"),
        Duration::from_secs(cfg.connect_timeout_secs.max(1)),
    )
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
