//! Where delivered events go: the [`Sink`] contract, the bounded in-memory sink, and the file
//! segment log ([`file`](mod@file)) that also backs the DLQ.
//!
//! A sink takes a batch in two calls: [`Sink::append`] once per event (buffered, nothing durable
//! yet), then [`Sink::flush`] once per batch, which writes and makes the batch durable per the
//! sink's policy. An event counts as delivered when the flush that covers it returns `Ok`.
//! Sinks see an [`EventRef`], a borrowed view, so a sink works the same whether the event still
//! points into its receive frame or was copied out by a batch window.
//!
//! A sink never blocks the data plane on a failure: its I/O retries with backoff on its own
//! thread and reports through [`SinkHealth`] (read by `/healthz` and `/metrics`); while it cannot
//! take more, [`Sink::append`] refuses the event ([`is_refusal`]) and the caller sends it to the
//! DLQ or counts it as failed, so no event is lost without a counter.

pub mod file;
pub mod kafka;
pub mod nats;
pub mod postgres;
pub mod remote;

use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use crate::wire::event::{Event, Peer, Source};

/// One event as a sink sees it, borrowed for the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRef<'e> {
    /// Ingest sequence: the stream in its top 16 bits, so unique within a run
    /// ([`crate::wire::event::seq_base`]).
    pub seq: u64,
    /// The sender's id (`key: payload_id` routes), which then names the event everywhere.
    pub sender_id: Option<u64>,
    /// Where it came in.
    pub source: Source,
    /// Receive time, `CLOCK_MONOTONIC` ns.
    pub ingest_ns: u64,
    /// Who sent it.
    pub peer: Peer,
    /// Priority.
    pub priority: u8,
    /// Topic.
    pub topic: &'e str,
    /// Payload.
    pub payload: &'e [u8],
}

impl<'e> EventRef<'e> {
    /// The view of a parsed event.
    #[inline]
    pub fn of(ev: &'e Event<'_>) -> Self {
        Self {
            seq: ev.seq,
            sender_id: ev.id_from_payload.then_some(ev.key),
            source: ev.source,
            ingest_ns: ev.ingest_ns,
            peer: ev.peer(),
            priority: ev.priority(),
            topic: ev.topic(),
            payload: ev.payload(),
        }
    }
}

/// A stored copy of an event, as sinks keep it and readers return it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Ingest sequence.
    pub seq: u64,
    /// Priority.
    pub priority: u8,
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// Why it went to the DLQ, for DLQ records.
    pub reason: Option<&'static str>,
}

/// Why a sink's I/O failed, the `reason` label of `eventstream_sink_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SinkErrorKind {
    /// `ENOSPC` or `EDQUOT`: the disk (or quota) is full.
    NoSpace = 0,
    /// `EIO` and the other errors of a write or an open.
    Io = 1,
    /// An `fsync` failed: what it covered is counted as lost (the kernel may have dropped it).
    Sync = 2,
    /// A broker did not take a publish (down, electing a leader, an ack timed out, refused).
    Broker = 3,
}

impl SinkErrorKind {
    /// All kinds, in index order.
    pub const ALL: [SinkErrorKind; 4] = [Self::NoSpace, Self::Io, Self::Sync, Self::Broker];

    /// The label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoSpace => "no_space",
            Self::Io => "io",
            Self::Sync => "sync",
            Self::Broker => "broker",
        }
    }

    /// The kind of a write's or an open's error.
    pub fn of_write(e: &io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT) => Self::NoSpace,
            _ => Self::Io,
        }
    }
}

/// A sink's health, shared between its I/O thread (which reports), `/healthz` and `/metrics`.
///
/// Written only when something changes (an error, a retry, a recovery), never per event.
#[derive(Debug)]
pub struct SinkHealth {
    /// The sink's name in health answers, logs and the `sink` label (`file:realtime-0`).
    pub name: String,
    failing: AtomicBool,
    errors: [AtomicU64; 4],
    retries: AtomicU64,
    in_flight: AtomicU64,
    sent_events: AtomicU64,
    sent_bytes: AtomicU64,
    spilled_events: AtomicU64,
    disk_buffer_bytes: AtomicU64,
    /// Events an earlier run left in the disk buffer, delivered by this one.
    replayed_events: AtomicU64,
    /// Hand-over to acknowledgement, per event: counts per bucket of [`ACK_BUCKETS_US`].
    ack_buckets: [AtomicU64; ACK_BUCKETS_US.len()],
    ack_count: AtomicU64,
    ack_sum_ns: AtomicU64,
    last_error: Mutex<String>,
}

/// Upper bounds of the ack latency histogram's buckets, µs (2^i for i in 4..=24, 16 µs..16.8 s).
pub const ACK_BUCKETS_US: [u64; 21] = {
    let mut b = [0u64; 21];
    let mut i = 0;
    while i < 21 {
        b[i] = 1 << (i + 4);
        i += 1;
    }
    b
};

impl SinkHealth {
    /// A healthy sink called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            failing: AtomicBool::new(false),
            errors: Default::default(),
            retries: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            sent_events: AtomicU64::new(0),
            sent_bytes: AtomicU64::new(0),
            spilled_events: AtomicU64::new(0),
            disk_buffer_bytes: AtomicU64::new(0),
            replayed_events: AtomicU64::new(0),
            ack_buckets: Default::default(),
            ack_count: AtomicU64::new(0),
            ack_sum_ns: AtomicU64::new(0),
            last_error: Mutex::new(String::new()),
        }
    }

    /// Records a failed attempt: counted, and logged once per burst (when it starts failing).
    pub fn fail(&self, kind: SinkErrorKind, e: &io::Error) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string();
        if !self.failing.swap(true, Ordering::AcqRel) {
            tracing::error!(sink = %self.name, reason = kind.as_str(), error = %e, "sink failing; retrying with backoff");
        }
    }

    /// Records a retry of a failed write.
    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a success after failures.
    pub fn recovered(&self) {
        if self.failing.swap(false, Ordering::AcqRel) {
            tracing::info!(sink = %self.name, retries = self.retries(), "sink recovered");
        }
    }

    /// Whether its last attempt failed.
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    /// Why it is failing, if it is.
    pub fn failure(&self) -> Option<String> {
        self.is_failing().then(|| {
            self.last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
    }

    /// Failed attempts of `kind` so far.
    pub fn errors(&self, kind: SinkErrorKind) -> u64 {
        self.errors[kind as usize].load(Ordering::Relaxed)
    }

    /// Retries so far.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Events taken and not yet resolved, as its owner last published ([`Self::set_in_flight`]).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Publishes the events in flight (once per batch, by the thread that owns the sink).
    pub fn set_in_flight(&self, n: u64) {
        self.in_flight.store(n, Ordering::Relaxed);
    }

    /// Records `events` (`bytes` in all) sent to the sink's I/O (once per buffer).
    pub fn sent(&self, events: u64, bytes: u64) {
        self.sent_events.fetch_add(events, Ordering::Relaxed);
        self.sent_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Records that `events` more were spilled to the disk buffer, which now holds `bytes`.
    pub fn spilled(&self, events: u64, bytes: u64) {
        self.spilled_events.fetch_add(events, Ordering::Relaxed);
        self.disk_buffer_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Records that `events` left in the disk buffer by an earlier run were delivered.
    pub fn replayed(&self, events: u64) {
        self.replayed_events.fetch_add(events, Ordering::Relaxed);
    }

    /// Events left in the disk buffer by an earlier run that this one delivered.
    pub fn replayed_total(&self) -> u64 {
        self.replayed_events.load(Ordering::Relaxed)
    }

    /// Events spilled to the disk buffer so far, and the bytes it holds now.
    pub fn spill_totals(&self) -> (u64, u64) {
        (
            self.spilled_events.load(Ordering::Relaxed),
            self.disk_buffer_bytes.load(Ordering::Relaxed),
        )
    }

    /// Events and bytes sent so far.
    pub fn sent_totals(&self) -> (u64, u64) {
        (
            self.sent_events.load(Ordering::Relaxed),
            self.sent_bytes.load(Ordering::Relaxed),
        )
    }

    /// Records that `events` were acknowledged `latency` after they were handed over (once
    /// per buffer: its events share the figure).
    pub fn acked_after(&self, latency: std::time::Duration, events: u64) {
        let us = latency.as_micros() as u64;
        if let Some(i) = ACK_BUCKETS_US.iter().position(|&b| us <= b) {
            self.ack_buckets[i].fetch_add(events, Ordering::Relaxed);
        }
        self.ack_count.fetch_add(events, Ordering::Relaxed);
        self.ack_sum_ns
            .fetch_add(latency.as_nanos() as u64 * events, Ordering::Relaxed);
    }

    /// The bucket bound (µs) under which a `q` share of acknowledged events fell, if any were.
    pub fn ack_quantile_us(&self, q: f64) -> Option<u64> {
        let (buckets, count, _) = self.ack_histogram();
        let want = (count as f64 * q).ceil() as u64;
        let mut cum = 0;
        for (le, n) in ACK_BUCKETS_US.iter().zip(buckets) {
            cum += n;
            if count > 0 && cum >= want {
                return Some(*le);
            }
        }
        None
    }

    /// The ack latency histogram: per-bucket counts (not cumulative), count, sum in ns.
    pub fn ack_histogram(&self) -> ([u64; ACK_BUCKETS_US.len()], u64, u64) {
        (
            self.ack_buckets
                .each_ref()
                .map(|b| b.load(Ordering::Relaxed)),
            self.ack_count.load(Ordering::Relaxed),
            self.ack_sum_ns.load(Ordering::Relaxed),
        )
    }
}

/// The error [`Sink::append`] returns for an event it did not take (the sink is failing, or
/// full past its limits): the caller keeps the count.
pub fn refusal(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::WouldBlock, why.to_owned())
}

/// Whether `e` is a [`refusal`] rather than an error of the sink's I/O.
pub fn is_refusal(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Where workers deliver.
pub trait Sink: Send {
    /// Adds one event to the current batch. Buffered: nothing is durable until
    /// [`Sink::flush`]. `reason` is set for DLQ records. Never waits long: an event the sink
    /// cannot take now is refused ([`refusal`]), not waited for.
    ///
    /// # Errors
    /// A [`refusal`], or an event the sink cannot store at all (a topic too long).
    fn append(&mut self, ev: &EventRef<'_>, reason: Option<&'static str>) -> io::Result<()>;

    /// Ends the batch: hands what was appended to the sink's I/O. Durability may follow later
    /// ([`Sink::acked`]).
    ///
    /// # Errors
    /// The sink's I/O error.
    fn flush(&mut self) -> io::Result<()>;

    /// Events the sink made durable since the last call: these count as delivered.
    ///
    /// # Errors
    /// The sink's I/O error.
    fn acked(&mut self) -> io::Result<u64>;

    /// Events flushed and not yet acknowledged.
    fn in_flight(&self) -> u64 {
        0
    }

    /// Events the sink took and then lost (an `fsync` that failed) since the last call.
    fn lost(&mut self) -> u64 {
        0
    }

    /// Waits until everything appended is durable, or until `deadline` (shutdown); what is
    /// still [`Sink::in_flight`] after it is not persisted.
    ///
    /// # Errors
    /// The sink's I/O error.
    fn close(&mut self, deadline: Instant) -> io::Result<()> {
        let _ = deadline;
        Ok(())
    }

    /// Its health, for sinks with I/O that can fail.
    fn health(&self) -> Option<&std::sync::Arc<SinkHealth>> {
        None
    }

    /// Records this sink discarded by design since it was made (the memory sink's evictions).
    fn evicted(&self) -> u64 {
        0
    }

    /// The label in metrics and logs.
    fn kind(&self) -> &'static str;
}

/// Bytes of a memory-sink record before its topic and payload: `len u32` (the whole record,
/// padded to 8), `seq u64`, `priority u8`, `reason u8`, `topic_len u16`, `payload_len u32`.
const MEM_HEADER: usize = 20;

/// DLQ reasons the memory sink can store (index + 1 in the record; 0 is none).
const MEM_REASONS: [&str; 5] = ["no_route", "dropping", "emergency", "sink_error", "other"];

/// A bounded in-memory sink: a ring of bytes allocated once, holding the newest records.
///
/// No lock and no allocation per event: a record is copied once into the ring, and the oldest
/// records are evicted (and counted) to make room, by bytes and by count. It belongs to the one
/// thread that writes it; [`MemorySink::records`] decodes what it holds, for tests and
/// inspection.
#[derive(Debug)]
pub struct MemorySink {
    buf: Box<[u8]>,
    /// Offset of the oldest record.
    head: usize,
    /// Offset where the next record goes.
    tail: usize,
    /// Bytes in use, wrap padding included.
    used: usize,
    /// Records held.
    len: usize,
    /// Most records kept.
    max_records: usize,
    evicted: u64,
    /// Appended since the last [`Sink::acked`] (memory is durable at once).
    unacked: u64,
}

impl MemorySink {
    /// Keeps at most `records` records in a ring of `bytes` bytes (at least 4 KiB).
    pub fn new(records: usize, bytes: usize) -> Self {
        Self {
            buf: vec![0u8; bytes.max(4096) & !7].into_boxed_slice(),
            head: 0,
            tail: 0,
            used: 0,
            len: 0,
            max_records: records.max(1),
            evicted: 0,
            unacked: 0,
        }
    }

    /// Records held now.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn rec_len(&self, at: usize) -> usize {
        u32::from_le_bytes(self.buf[at..at + 4].try_into().expect("4 bytes")) as usize
    }

    /// Drops the oldest record (a zero length marks wrap padding up to the end of the ring).
    fn evict_oldest(&mut self) {
        if self.head + 4 > self.buf.len() || self.rec_len(self.head) == 0 {
            self.used -= self.buf.len() - self.head;
            self.head = 0;
        }
        let n = self.rec_len(self.head);
        self.head += n;
        self.used -= n;
        self.len -= 1;
        self.evicted += 1;
        if self.len == 0 {
            (self.head, self.tail, self.used) = (0, 0, 0);
        }
    }

    /// Every record held, oldest first.
    pub fn records(&self) -> Vec<Record> {
        let mut out = Vec::with_capacity(self.len);
        let mut at = self.head;
        for _ in 0..self.len {
            if at + 4 > self.buf.len() || self.rec_len(at) == 0 {
                at = 0;
            }
            let n = self.rec_len(at);
            let r = &self.buf[at..at + n];
            let topic_len = u16::from_le_bytes([r[14], r[15]]) as usize;
            let payload_len = u32::from_le_bytes(r[16..20].try_into().expect("4 bytes")) as usize;
            out.push(Record {
                seq: u64::from_le_bytes(r[4..12].try_into().expect("8 bytes")),
                priority: r[12],
                reason: r[13].checked_sub(1).map(|i| MEM_REASONS[i as usize]),
                topic: String::from_utf8_lossy(&r[MEM_HEADER..MEM_HEADER + topic_len]).into_owned(),
                payload: r[MEM_HEADER + topic_len..][..payload_len].to_vec(),
            });
            at += n;
        }
        out
    }
}

impl Sink for MemorySink {
    fn append(&mut self, ev: &EventRef<'_>, reason: Option<&'static str>) -> io::Result<()> {
        let topic = &ev.topic.as_bytes()[..ev.topic.len().min(usize::from(u16::MAX))];
        // Records are 8-byte aligned so a header never straddles the end of the ring.
        let n = (MEM_HEADER + topic.len() + ev.payload.len() + 7) & !7;
        let cap = self.buf.len();
        self.unacked += 1;
        if n > cap {
            // Larger than the whole ring: kept by nobody, counted as evicted.
            self.evicted += 1;
            return Ok(());
        }
        while self.len >= self.max_records {
            self.evict_oldest();
        }
        loop {
            // Where it would go: at the tail, or at 0 after padding to the end.
            let pad = if self.tail + n > cap {
                cap - self.tail
            } else {
                0
            };
            if self.used + pad + n <= cap {
                if pad > 0 {
                    if pad >= 4 {
                        self.buf[self.tail..self.tail + 4].fill(0);
                    }
                    self.used += pad;
                    self.tail = 0;
                }
                break;
            }
            self.evict_oldest();
        }
        let r = &mut self.buf[self.tail..self.tail + n];
        r[0..4].copy_from_slice(&(n as u32).to_le_bytes());
        r[4..12].copy_from_slice(&ev.seq.to_le_bytes());
        r[12] = ev.priority;
        r[13] = reason.map_or(0, |why| {
            MEM_REASONS
                .iter()
                .position(|r| *r == why)
                .unwrap_or(MEM_REASONS.len() - 1) as u8
                + 1
        });
        r[14..16].copy_from_slice(&(topic.len() as u16).to_le_bytes());
        r[16..20].copy_from_slice(&(ev.payload.len() as u32).to_le_bytes());
        r[MEM_HEADER..MEM_HEADER + topic.len()].copy_from_slice(topic);
        let p = MEM_HEADER + topic.len();
        r[p..p + ev.payload.len()].copy_from_slice(ev.payload);
        self.tail += n;
        if self.tail == cap {
            self.tail = 0;
        }
        self.used += n;
        self.len += 1;
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn acked(&mut self) -> io::Result<u64> {
        Ok(core::mem::take(&mut self.unacked))
    }

    fn evicted(&self) -> u64 {
        self.evicted
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev<'e>(seq: u64, topic: &'e str, payload: &'e [u8]) -> EventRef<'e> {
        EventRef {
            seq,
            sender_id: None,
            source: Source::Udp,
            ingest_ns: 0,
            peer: Peer::UNKNOWN,
            priority: (seq % 7) as u8,
            topic,
            payload,
        }
    }

    #[test]
    fn keeps_the_newest_records_by_count_and_counts_evictions() {
        let mut s = MemorySink::new(10, 1 << 16);
        for i in 0..25u64 {
            s.append(&ev(i, "a/b", &i.to_be_bytes()), None).unwrap();
        }
        let r = s.records();
        assert_eq!(r.len(), 10);
        assert_eq!(s.evicted(), 15);
        for (k, rec) in r.iter().enumerate() {
            let i = 15 + k as u64;
            assert_eq!((rec.seq, rec.priority), (i, (i % 7) as u8));
            assert_eq!(
                (rec.topic.as_str(), &rec.payload[..]),
                ("a/b", &i.to_be_bytes()[..])
            );
        }
    }

    #[test]
    fn wraps_by_bytes_with_mixed_sizes_and_keeps_reasons() {
        let mut s = MemorySink::new(1_000_000, 4096);
        let big = [7u8; 700];
        let mut held = std::collections::VecDeque::new();
        for i in 0..500u64 {
            let len = (i as usize * 37) % big.len();
            let reason = (i % 3 == 0).then_some("dropping");
            s.append(&ev(i, "t", &big[..len]), reason).unwrap();
            held.push_back((i, len, reason));
            let r = s.records();
            while held.len() > r.len() {
                held.pop_front();
            }
            // What is held always fits, and decoding gives exactly the newest records.
            let bytes: usize = held
                .iter()
                .map(|(_, l, _)| (MEM_HEADER + 1 + l + 7) & !7)
                .sum();
            assert!(bytes <= 4096);
            for (rec, (i, len, reason)) in r.iter().zip(&held) {
                assert_eq!(
                    (rec.seq, rec.payload.len(), rec.reason),
                    (*i, *len, *reason)
                );
            }
        }
        assert_eq!(s.evicted() + s.len() as u64, 500);
        let huge = vec![1u8; 8192];
        s.append(&ev(9, "t", &huge), None).unwrap();
        assert_eq!(
            s.evicted() + s.len() as u64,
            501,
            "a record larger than the ring is counted"
        );
    }
}
