//! The Kafka sink: events land in a Kafka topic, and count as delivered once the broker's
//! delivery report says so (`acks=all`).
//!
//! A [`Backend`] of [`RemoteSink`] over rdkafka (librdkafka, bundled) with the idempotent
//! producer: librdkafka itself retries within its delivery timeout without reordering or
//! duplicating (a broker that stalls is waited for); a record whose delivery still failed is
//! produced again after a backoff. Every record carries its event id as the header `event-id`
//! (and as the key with `key: event_id`), so consumers can drop what a second producer session
//! wrote again; `received-unix-ns` and `sender` (address and port) beside it, and the record's
//! timestamp is the receive time.
//!
//! Topic: `topic`, or with `topic_prefix` set, the prefix + `.` + the event's topic with `/`
//! turned into `.` (the topics must exist; brokers usually refuse to create them on produce).

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use serde::Deserialize;

use crate::sink::remote::{Backend, Chunk, RemoteSink, Shared, retry_rounds};
use crate::sink::{SinkErrorKind, SinkHealth};

/// What the record key is.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KafkaKey {
    /// The event's topic: one topic's events keep their order in one partition.
    #[default]
    Topic,
    /// The event id: events spread over the partitions.
    EventId,
}

/// `sinks.kafka:`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `sinks.kafka.brokers`: `host:port[,host:port...]`.
    pub brokers: String,
    /// `sinks.kafka.topic`: where every event goes (unless `topic_prefix` is set).
    pub topic: String,
    /// `sinks.kafka.topic_prefix`: map each event topic to `<prefix>.<topic>` instead.
    pub topic_prefix: Option<String>,
    /// `sinks.kafka.key`: `topic` or `event_id`.
    pub key: KafkaKey,
    /// `sinks.kafka.max_in_flight`: records awaiting their delivery report at once, per sink.
    pub max_in_flight: usize,
    /// `sinks.kafka.connect_timeout_secs`: for the first metadata answer.
    pub connect_timeout_secs: u64,
    /// `sinks.kafka.librdkafka`: options passed to librdkafka as they are (they may not turn
    /// off idempotence or `acks=all`).
    pub librdkafka: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: "events".into(),
            topic_prefix: None,
            key: KafkaKey::Topic,
            max_in_flight: 10_000,
            connect_timeout_secs: 10,
            librdkafka: BTreeMap::new(),
        }
    }
}

/// Options this sink's guarantees rest on: an operator's `librdkafka` map may not change them.
pub const FIXED: [(&str, &str); 3] = [
    ("enable.idempotence", "true"),
    ("acks", "all"),
    ("max.in.flight.requests.per.connection", "5"),
];

/// The Kafka topic for an event's `topic`.
pub fn kafka_topic<'c>(cfg: &'c KafkaConfig, topic: &str) -> std::borrow::Cow<'c, str> {
    match &cfg.topic_prefix {
        None => std::borrow::Cow::Borrowed(&cfg.topic),
        Some(p) => std::borrow::Cow::Owned(crate::sink::nats::subject(p, topic)),
    }
}

/// The Kafka side of a [`RemoteSink`].
struct Kafka {
    cfg: KafkaConfig,
    producer: Option<FutureProducer>,
}

impl Backend for Kafka {
    async fn setup(&mut self) -> Result<(), String> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.cfg.brokers);
        for (k, v) in &self.cfg.librdkafka {
            if FIXED.iter().any(|(f, want)| f == k && want != v) {
                return Err(format!(
                    "sinks.kafka.librdkafka.{k}: {v} would break delivery guarantees (this sink sets it to {})",
                    FIXED.iter().find(|(f, _)| f == k).map_or("", |(_, w)| *w)
                ));
            }
            c.set(k, v);
        }
        for (k, v) in FIXED {
            c.set(k, v);
        }
        let producer: FutureProducer = c
            .create()
            .map_err(|e| format!("creating the Kafka producer (sinks.kafka): {e}"))?;
        let timeout = Duration::from_secs(self.cfg.connect_timeout_secs.max(1));
        let topic = (self.cfg.topic_prefix.is_none()).then(|| self.cfg.topic.clone());
        let md = producer
            .client()
            .fetch_metadata(topic.as_deref(), timeout)
            .map_err(|e| {
                format!(
                    "no metadata from {} (sinks.kafka.brokers): {e}",
                    self.cfg.brokers
                )
            })?;
        if let Some(t) = &topic {
            let ok = md
                .topics()
                .iter()
                .any(|m| m.name() == t && m.error().is_none() && !m.partitions().is_empty());
            if !ok {
                return Err(format!(
                    "Kafka topic {t} does not exist on {} (create it first)",
                    self.cfg.brokers
                ));
            }
        }
        self.producer = Some(producer);
        Ok(())
    }

    /// Produces every record until its delivery report is a success, or it can never be (too
    /// large), or the sink is abandoned.
    async fn deliver(&mut self, chunk: &Chunk, shared: &Shared, ids: &str) {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        let Some(producer) = &self.producer else {
            return;
        };
        let health = &*shared.health;
        let max = self.cfg.max_in_flight.max(1);
        let cfg = &self.cfg;
        let pending: Vec<usize> = chunk.iter().map(|r| r.at).collect();
        retry_rounds(shared, pending, async |pending: &[usize]| {
            let mut failed = Vec::new();
            let mut reports = futures_util::stream::FuturesUnordered::new();
            let mut last_error: Option<String> = None;
            for &at in pending {
                let (r, _) = chunk.record(at);
                let id = r.event_id(ids);
                let topic = kafka_topic(cfg, r.topic);
                let key = match cfg.key {
                    KafkaKey::Topic => r.topic,
                    KafkaKey::EventId => id.as_str(),
                };
                let received = r.received_unix_ns.to_string();
                let sender = r.peer.socket_addr().map(|a| a.to_string());
                let mut record = FutureRecord::to(&topic)
                    .payload(r.payload)
                    .key(key)
                    // The record's own timestamp is the receive time (ms, the wall clock).
                    .timestamp((r.received_unix_ns / 1_000_000) as i64)
                    .headers(
                        OwnedHeaders::new()
                            .insert(Header {
                                key: "event-id",
                                value: Some(id.as_str()),
                            })
                            .insert(Header {
                                key: "received-unix-ns",
                                value: Some(received.as_str()),
                            })
                            .insert(Header {
                                key: "sender",
                                value: sender.as_deref(),
                            }),
                    );
                loop {
                    while reports.len() >= max {
                        if let Some((at, rep)) = reports.next().await {
                            settle(at, rep, shared, &mut failed, &mut last_error);
                        }
                    }
                    match producer.send_result(record) {
                        Ok(f) => {
                            reports.push(async move { (at, f.await) });
                            break;
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            // librdkafka's own queue is full: wait for a report, then again.
                            record = back;
                            match reports.next().await {
                                Some((at, rep)) => {
                                    settle(at, rep, shared, &mut failed, &mut last_error)
                                }
                                None => tokio::time::sleep(Duration::from_millis(1)).await,
                            }
                        }
                        Err((
                            KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                            _,
                        )) => {
                            health.fail(
                                SinkErrorKind::Broker,
                                &io::Error::other("message too large for the broker"),
                            );
                            shared.lost(1);
                            break;
                        }
                        Err((e, _)) => {
                            failed.push(at);
                            last_error = Some(e.to_string());
                            break;
                        }
                    }
                }
            }
            while let Some((at, rep)) = reports.next().await {
                settle(at, rep, shared, &mut failed, &mut last_error);
            }
            (failed, last_error)
        })
        .await;
    }
}

/// Counts one delivery report.
fn settle<E>(
    at: usize,
    rep: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>,
    shared: &Shared,
    failed: &mut Vec<usize>,
    last_error: &mut Option<String>,
) {
    match rep {
        Ok(Ok(_)) => shared.durable(1),
        Ok(Err((e, _))) => {
            failed.push(at);
            *last_error = Some(e.to_string());
        }
        Err(_) => {
            failed.push(at);
            *last_error = Some("the producer dropped a delivery report".into());
        }
    }
}

/// Connects (a metadata round trip), checks the topic, and starts a sink producing to it.
/// Event ids are given at receive (see [`crate::sink::remote`]).
///
/// # Errors
/// When no broker answers, the topic does not exist, or an option would break the guarantees.
pub fn open(cfg: &KafkaConfig, node_id: &str, run: u64, name: &str) -> io::Result<RemoteSink> {
    RemoteSink::open(
        "kafka",
        Kafka {
            cfg: cfg.clone(),
            producer: None,
        },
        Arc::new(SinkHealth::new(format!(
            "kafka:{}:{name}",
            cfg.topic_prefix.as_deref().unwrap_or(&cfg.topic)
        ))),
        format!("{node_id}-{run}-"),
        Duration::from_secs(cfg.connect_timeout_secs.max(1) + 5),
    )
}
