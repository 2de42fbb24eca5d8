//! The worker classes as steps: what each does with one event, and at the end of a batch.
//!
//! - **realtime** (a [`ClassStep`] of [`WorkerClass::Realtime`]): delivers each event as it comes, recording its
//!   latency (ingest → worker, or sender → worker from the payload stamp);
//! - **transactional**: drops duplicates within the dedup window (counted, not delivered);
//! - **batch**: groups events per topic, copied out of their receive frames so no window pins a
//!   frame (and starves the FILL ring), and flushes a group when it reaches `batch_max` events
//!   or `batch_window` age, as one sink batch. The number of groups is bounded: a new topic past
//!   `max_topics` flushes the least recently opened group and takes its place (counted).
//! - **DLQ** ([`DlqStep`]): writes each turned-away event with its reason.
//!
//! The same steps run in both engine modes: in the queue's own thread (inline, see
//! [`super::inline`]) or in a worker thread fed by an SPSC ring ([`run_worker`], pipelined, a [`stage::Stage`]).
//! An event counts as delivered only when the sink's flush that covers it has returned.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::Ordering;
use std::time::Duration;

use xxhash_rust::xxh3::xxh3_64;

use super::{DlqEntry, DlqReason, EngineCounters, Ev, FailReason, WorkerClass};
use crate::engine::dedup::{DedupWindow, SharedDedupWindow};
use crate::engine::latency::{LatencyFrom, LocalLatency, Stage, read_stamp, realtime_ns};
use crate::engine::stage::{self, Pass};
use crate::ring::spsc;
use crate::sink::{EventRef, Sink, is_refusal};
use crate::wire::event::{Event, Peer, Source, monotonic_ns};

/// The clocks a batch is stamped with, read once per batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct BatchClock {
    /// `CLOCK_MONOTONIC` ns.
    pub mono: u64,
    /// `CLOCK_REALTIME` ns, read only where a step needs it (payload latency), else 0.
    pub wall: u64,
}

/// What a sink resolved since the last pass.
#[derive(Clone, Copy, Debug, Default)]
struct Resolved {
    /// Made durable: delivered.
    acked: u64,
    /// Refused at append.
    refused: u64,
    /// Taken and then lost (a failed `fsync`).
    lost: u64,
    /// Still not durable when it closed at the shutdown deadline.
    unpersisted: u64,
}

/// A sink, with what it last reported.
struct Out {
    sink: Box<dyn Sink>,
    evicted: u64,
    /// Appends refused since the last [`Out::flush`].
    refused: u64,
    /// Errors other than refusals (logged at powers of two, not per event).
    errors: u64,
    closed: bool,
}

impl Out {
    fn new(sink: Box<dyn Sink>) -> Self {
        Self {
            sink,
            evicted: 0,
            refused: 0,
            errors: 0,
            closed: false,
        }
    }

    /// Appends; `false` when the sink did not take the event (counted for the caller).
    #[inline]
    fn append(&mut self, ev: &EventRef<'_>, reason: Option<&'static str>) -> bool {
        match self.sink.append(ev, reason) {
            Ok(()) => true,
            Err(e) => {
                self.refused += 1;
                if !is_refusal(&e) {
                    self.error("append", &e);
                }
                false
            }
        }
    }

    #[cold]
    fn error(&mut self, what: &str, e: &io::Error) {
        self.errors += 1;
        if self.errors.is_power_of_two() {
            tracing::warn!(sink = self.sink.kind(), what, error = %e, errors = self.errors, "sink error");
        }
    }

    /// Ends the batch (flushing what was appended, and at `closing` waiting until everything
    /// is durable or the shutdown deadline passed); returns what the sink resolved meanwhile.
    fn flush(&mut self, counters: &EngineCounters, closing: bool) -> Resolved {
        // Every pass, not only after appends: a sink may hold a coalesced buffer until its
        // I/O is free to take it.
        if let Err(e) = self.sink.flush() {
            self.error("flush", &e);
        }
        let closing = closing && !self.closed;
        if closing {
            self.closed = true;
            if let Err(e) = self.sink.close(counters.shutdown_deadline()) {
                tracing::warn!(sink = self.sink.kind(), error = %e, "closing the sink");
            }
        }
        let acked = match self.sink.acked() {
            Ok(n) => n,
            Err(e) => {
                self.error("acknowledgement", &e);
                0
            }
        };
        let (refused, lost) = (core::mem::take(&mut self.refused), self.sink.lost());
        // After close, whatever is still in flight never will be durable.
        let in_flight = self.sink.in_flight();
        let unpersisted = if closing { in_flight } else { 0 };
        if let Some(h) = self.sink.health() {
            h.set_in_flight(if self.closed { 0 } else { in_flight });
        }
        let evicted = self.sink.evicted();
        if evicted != self.evicted {
            counters
                .sink_evicted
                .fetch_add(evicted - self.evicted, Ordering::Relaxed);
            self.evicted = evicted;
        }
        Resolved {
            acked,
            refused,
            lost,
            unpersisted,
        }
    }
}

impl core::fmt::Debug for Out {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Out")
            .field("sink", &self.sink.kind())
            .finish()
    }
}

/// The transactional class's window: owned by one worker, or shared by every queue's thread.
#[derive(Debug)]
pub enum Dedup<'s> {
    /// One worker's own table (pipelined mode: keys reach it by topic hash).
    Own(DedupWindow),
    /// One table for every thread (inline mode).
    Shared(&'s SharedDedupWindow),
}

impl Dedup<'_> {
    #[inline]
    fn check_and_insert(&mut self, key: u64, now: u64) -> bool {
        match self {
            Self::Own(w) => w.check_and_insert(key, now),
            Self::Shared(w) => w.check_and_insert(key, now),
        }
    }

    fn forget(&mut self, key: u64) {
        match self {
            Self::Own(w) => w.forget(key),
            Self::Shared(w) => w.forget(key),
        }
    }

    fn evictions(&self) -> u64 {
        match self {
            Self::Own(w) => w.evictions(),
            Self::Shared(w) => w.evictions(),
        }
    }
}

/// How a worker treats its events (what [`ClassStep::new`] builds from).
#[derive(Debug)]
pub enum WorkerKind<'s> {
    /// Deliver each event at once and record its latency.
    Realtime {
        /// Where the latency clock starts.
        from: LatencyFrom,
    },
    /// Drop duplicates within the window.
    Transactional {
        /// The window table.
        dedup: Dedup<'s>,
    },
    /// Group per topic; flush at `max` events or `window` age.
    Batch {
        /// Events per group before a flush.
        max: usize,
        /// Oldest event's age before a flush.
        window: Duration,
        /// Most topics grouped at once.
        max_topics: usize,
    },
}

/// Bytes before a copied event's payload in a batch group: `seq u64`, `ingest_ns u64`,
/// `source u8`, `priority u8`, `payload_len u32`, `has_sender_id u8`, `sender_id u64`, `peer`
/// ([`Peer::ENCODED`] bytes).
const COPY_HEADER: usize = 31 + Peer::ENCODED;

/// One topic's open group: its events copied out, back to back.
#[derive(Debug)]
struct Group {
    topic: String,
    opened_ns: u64,
    events: usize,
    bytes: Vec<u8>,
}

/// The batch class's groups.
#[derive(Debug)]
struct Groups {
    max: usize,
    window_ns: u64,
    max_topics: usize,
    groups: Vec<Group>,
    /// Topic hash → index in `groups`.
    index: HashMap<u64, usize>,
    flushes: u64,
    evicted_groups: u64,
}

impl Groups {
    fn new(max: usize, window: Duration, max_topics: usize) -> Self {
        let max_topics = max_topics.max(1);
        Self {
            max: max.max(1),
            window_ns: window.as_nanos() as u64,
            max_topics,
            groups: Vec::with_capacity(max_topics),
            index: HashMap::with_capacity(max_topics),
            flushes: 0,
            evicted_groups: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.groups.iter().all(|g| g.events == 0)
    }

    /// Writes group `i` to `out` and empties it.
    fn write(&mut self, i: usize, out: &mut Out) {
        let g = &mut self.groups[i];
        let mut at = 0;
        while at < g.bytes.len() {
            let b = &g.bytes[at..];
            let len = u32::from_le_bytes(b[18..22].try_into().expect("4 bytes")) as usize;
            let ev = EventRef {
                seq: u64::from_le_bytes(b[0..8].try_into().expect("8 bytes")),
                ingest_ns: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
                source: Source::ALL
                    .get(b[16] as usize)
                    .copied()
                    .unwrap_or(Source::Udp),
                priority: b[17],
                sender_id: (b[22] != 0)
                    .then(|| u64::from_le_bytes(b[23..31].try_into().expect("8 bytes"))),
                peer: Peer::from_bytes(b[31..COPY_HEADER].try_into().expect("peer bytes")),
                topic: &g.topic,
                payload: &b[COPY_HEADER..COPY_HEADER + len],
            };
            out.append(&ev, None);
            at += COPY_HEADER + len;
        }
        g.bytes.clear();
        g.events = 0;
        self.flushes += 1;
    }

    /// The group for `topic`, opening (or, past `max_topics`, taking over) one if needed.
    fn group_for(&mut self, topic: &str, now: u64, out: &mut Out) -> usize {
        let h = xxh3_64(topic.as_bytes());
        if let Some(&i) = self.index.get(&h) {
            if self.groups[i].topic == topic {
                return i;
            }
            // A 64-bit hash collision: the newcomer takes the slot over.
            self.take_over(i, h, topic, out);
            return i;
        }
        if self.groups.len() < self.max_topics {
            self.groups.push(Group {
                topic: topic.to_owned(),
                opened_ns: now,
                events: 0,
                bytes: Vec::new(),
            });
            self.index.insert(h, self.groups.len() - 1);
            return self.groups.len() - 1;
        }
        // Full: the group opened longest ago is flushed and reused for this topic.
        let i = (0..self.groups.len())
            .min_by_key(|&i| (self.groups[i].events != 0, self.groups[i].opened_ns))
            .expect("max_topics >= 1");
        self.index.remove(&xxh3_64(self.groups[i].topic.as_bytes()));
        self.take_over(i, h, topic, out);
        i
    }

    fn take_over(&mut self, i: usize, h: u64, topic: &str, out: &mut Out) {
        if self.groups[i].events != 0 {
            self.write(i, out);
        }
        self.evicted_groups += 1;
        let g = &mut self.groups[i];
        g.topic.clear();
        g.topic.push_str(topic);
        self.index.insert(h, i);
    }

    #[inline]
    fn push(&mut self, ev: &Event<'_>, now: u64, out: &mut Out) {
        let i = self.group_for(ev.topic(), now, out);
        let g = &mut self.groups[i];
        if g.events == 0 {
            g.opened_ns = now;
        }
        let p = ev.payload();
        g.bytes.extend_from_slice(&ev.seq.to_le_bytes());
        g.bytes.extend_from_slice(&ev.ingest_ns.to_le_bytes());
        g.bytes.push(ev.source as u8);
        g.bytes.push(ev.priority());
        g.bytes.extend_from_slice(&(p.len() as u32).to_le_bytes());
        g.bytes.push(u8::from(ev.id_from_payload));
        g.bytes.extend_from_slice(&ev.key.to_le_bytes());
        g.bytes.extend_from_slice(&ev.peer().to_bytes());
        g.bytes.extend_from_slice(p);
        g.events += 1;
        if g.events >= self.max {
            self.write(i, out);
        }
    }

    /// Writes every group that is due (full, old, or `closing`).
    fn due(&mut self, now: u64, closing: bool, out: &mut Out) {
        for i in 0..self.groups.len() {
            let g = &self.groups[i];
            if g.events != 0 && (closing || now.saturating_sub(g.opened_ns) >= self.window_ns) {
                self.write(i, out);
            }
        }
    }
}

/// What a class does with its events.
#[derive(Debug)]
enum Kind<'s> {
    Realtime {
        from: LatencyFrom,
        latency: LocalLatency,
    },
    Transactional {
        dedup: Dedup<'s>,
        duplicates: u64,
    },
    Batch(Groups),
}

/// One worker class's step over its sink.
#[derive(Debug)]
pub struct ClassStep<'s> {
    class: WorkerClass,
    kind: Kind<'s>,
    out: Out,
}

impl<'s> ClassStep<'s> {
    /// The step for `kind`, delivering to `sink`.
    pub fn new(kind: WorkerKind<'s>, sink: Box<dyn Sink>) -> Self {
        let (class, kind) = match kind {
            WorkerKind::Realtime { from } => (
                WorkerClass::Realtime,
                Kind::Realtime {
                    from,
                    latency: LocalLatency::default(),
                },
            ),
            WorkerKind::Transactional { dedup } => (
                WorkerClass::Transactional,
                Kind::Transactional {
                    dedup,
                    duplicates: 0,
                },
            ),
            WorkerKind::Batch {
                max,
                window,
                max_topics,
            } => (
                WorkerClass::Batch,
                Kind::Batch(Groups::new(max, window, max_topics)),
            ),
        };
        Self {
            class,
            kind,
            out: Out::new(sink),
        }
    }

    /// The class.
    pub const fn class(&self) -> WorkerClass {
        self.class
    }

    /// Whether the batch's clock needs the wall time (payload latency).
    pub const fn wants_wall(&self) -> bool {
        matches!(
            self.kind,
            Kind::Realtime {
                from: LatencyFrom::Payload,
                ..
            }
        )
    }

    /// Handles one event (its dedup key already in `ev.key` for the transactional class). An
    /// event its sink refuses is counted as failed (`sink_error`) at the end of the batch.
    #[inline]
    pub fn event(&mut self, ev: &Event<'_>, clock: BatchClock) {
        match &mut self.kind {
            Kind::Realtime { from, latency } => {
                match from {
                    LatencyFrom::Ingest => latency.record(clock.mono.saturating_sub(ev.ingest_ns)),
                    LatencyFrom::Payload => match read_stamp(ev.payload()) {
                        Some((_, sent)) => latency.record(clock.wall.saturating_sub(sent)),
                        None => latency.unstamped += 1,
                    },
                }
                self.out.append(&EventRef::of(ev), None);
            }
            Kind::Transactional { dedup, duplicates } => {
                if dedup.check_and_insert(ev.key, clock.mono) {
                    *duplicates += 1;
                } else if !self.out.append(&EventRef::of(ev), None) {
                    // Not kept: a retry of it must not be taken for a duplicate.
                    dedup.forget(ev.key);
                }
            }
            Kind::Batch(groups) => groups.push(ev, clock.mono, &mut self.out),
        }
    }

    /// Ends a batch: writes due groups, flushes the sink, and publishes the counts. `closing`
    /// writes every group and closes the sink (shutdown).
    pub fn end(&mut self, now: u64, closing: bool, counters: &EngineCounters) {
        if let Kind::Batch(groups) = &mut self.kind {
            groups.due(now, closing, &mut self.out);
        }
        let r = self.out.flush(counters, closing);
        if r.acked != 0 {
            counters.delivered[self.class as usize].fetch_add(r.acked, Ordering::Relaxed);
        }
        publish_failed(counters, r);
        match &mut self.kind {
            Kind::Realtime { latency, .. } => {
                latency.merge_into(&counters.latency, now, closing);
                if latency.unstamped != 0 {
                    counters
                        .unstamped
                        .fetch_add(core::mem::take(&mut latency.unstamped), Ordering::Relaxed);
                }
            }
            Kind::Transactional { dedup, duplicates } => {
                if *duplicates != 0 {
                    counters
                        .duplicates
                        .fetch_add(core::mem::take(duplicates), Ordering::Relaxed);
                }
                counters
                    .dedup_evictions
                    .store(dedup.evictions(), Ordering::Relaxed);
            }
            Kind::Batch(groups) => {
                if groups.flushes != 0 {
                    counters
                        .batch_flushes
                        .fetch_add(core::mem::take(&mut groups.flushes), Ordering::Relaxed);
                }
                if groups.evicted_groups != 0 {
                    counters.batch_evicted_groups.fetch_add(
                        core::mem::take(&mut groups.evicted_groups),
                        Ordering::Relaxed,
                    );
                }
            }
        }
    }

    /// Whether nothing is held (no open batch group).
    pub fn is_drained(&self) -> bool {
        match &self.kind {
            Kind::Batch(groups) => groups.is_empty(),
            _ => true,
        }
    }
}

/// Adds what a sink did not persist to the failure counters.
fn publish_failed(counters: &EngineCounters, r: Resolved) {
    if r.refused + r.lost != 0 {
        counters.failed[FailReason::SinkError as usize]
            .fetch_add(r.refused + r.lost, Ordering::Relaxed);
    }
    if r.unpersisted != 0 {
        counters.failed[FailReason::Shutdown as usize].fetch_add(r.unpersisted, Ordering::Relaxed);
    }
}

/// The DLQ's step: each turned-away event with its reason.
///
/// An event counts in `dlq{reason}` once the DLQ's sink made it durable, like a delivered one;
/// records resolve in the order they were appended, so the reasons of the records not yet
/// resolved are kept as runs (one entry per change of reason, not per event).
#[derive(Debug)]
pub struct DlqStep {
    out: Out,
    pending: VecDeque<(DlqReason, u64)>,
}

impl DlqStep {
    /// Writing to `sink`.
    pub fn new(sink: Box<dyn Sink>) -> Self {
        Self {
            out: Out::new(sink),
            pending: VecDeque::with_capacity(64),
        }
    }

    /// Appends one event with its reason.
    #[inline]
    pub fn event(&mut self, ev: &Event<'_>, reason: DlqReason) {
        if self.out.append(&EventRef::of(ev), Some(reason.as_str())) {
            match self.pending.back_mut() {
                Some((r, n)) if *r == reason => *n += 1,
                _ => self.pending.push_back((reason, 1)),
            }
        }
    }

    /// Takes `n` resolved records off the front of the runs, counting them in `into`.
    fn resolve(&mut self, mut n: u64, mut count: impl FnMut(DlqReason, u64)) {
        while n != 0 {
            let Some((reason, run)) = self.pending.front_mut() else {
                return;
            };
            let k = n.min(*run);
            count(*reason, k);
            *run -= k;
            n -= k;
            if *run == 0 {
                self.pending.pop_front();
            }
        }
    }

    /// Flushes what was appended, and counts what the sink resolved.
    pub fn end(&mut self, counters: &EngineCounters, closing: bool) {
        let r = self.out.flush(counters, closing);
        self.resolve(r.acked, |reason, k| {
            counters.dlq[reason as usize].fetch_add(k, Ordering::Relaxed);
        });
        // Lost after it was taken, and left at the deadline (refusals never entered the runs).
        self.resolve(r.lost + r.unpersisted, |_, _| {});
        publish_failed(counters, r);
    }
}

/// A pipelined worker thread as a [`stage::Stage`]: its class's step over the SPSC ring the
/// dispatcher fills; done when that ring is closed (the dispatcher is gone), empty, and the
/// step holds nothing.
struct WorkerStage<'w, 'p, 'a> {
    step: ClassStep<'w>,
    input: spsc::Consumer<Ev<'p, 'a>>,
    counters: &'w EngineCounters,
    /// Routed → worker, sampled on a batch's first event when the dispatcher stamped it (one
    /// of its batches in `STAGE_SAMPLE_EVERY`).
    handed: LocalLatency,
}

impl stage::Stage for WorkerStage<'_, '_, '_> {
    fn poll(&mut self, budget: usize) -> io::Result<Pass> {
        let clock = BatchClock {
            mono: monotonic_ns(),
            wall: if self.step.wants_wall() {
                realtime_ns()
            } else {
                0
            },
        };
        let mut n = 0;
        for ev in self.input.pop_batch(budget) {
            if n == 0 && ev.routed_ns != 0 {
                self.handed.record(clock.mono.saturating_sub(ev.routed_ns));
            }
            n += 1;
            self.step.event(&ev, clock);
        }
        let closing = n == 0 && self.input.is_abandoned() && self.input.is_empty();
        self.handed.merge_into(
            self.counters.stages.get(Stage::RoutedToWorker),
            clock.mono,
            closing,
        );
        self.step.end(clock.mono, closing, self.counters);
        Ok(if n > 0 {
            Pass::Worked(n)
        } else if closing && self.step.is_drained() {
            Pass::Done
        } else {
            Pass::Idle
        })
    }
}

/// Runs one pipelined worker until its ring is closed (the dispatcher is gone) and empty.
///
/// # Errors
/// The sink's I/O error (the worker stops; the caller logs it).
pub fn run_worker(
    step: ClassStep<'_>,
    input: spsc::Consumer<Ev<'_, '_>>,
    counters: &EngineCounters,
) -> io::Result<()> {
    stage::drive(
        &mut WorkerStage {
            step,
            input,
            counters,
            handed: LocalLatency::default(),
        },
        256,
    )
}

/// The pipelined DLQ worker as a [`stage::Stage`].
struct DlqStage<'w, 'p, 'a> {
    step: DlqStep,
    input: spsc::Consumer<DlqEntry<'p, 'a>>,
    counters: &'w EngineCounters,
}

impl stage::Stage for DlqStage<'_, '_, '_> {
    fn poll(&mut self, budget: usize) -> io::Result<Pass> {
        let mut n = 0;
        for (ev, reason) in self.input.pop_batch(budget) {
            self.step.event(&ev, reason);
            n += 1;
        }
        if n > 0 {
            self.step.end(self.counters, false);
            Ok(Pass::Worked(n))
        } else if self.input.is_abandoned() && self.input.is_empty() {
            self.step.end(self.counters, true);
            Ok(Pass::Done)
        } else {
            Ok(Pass::Idle)
        }
    }
}

/// Runs the pipelined DLQ worker until the dispatcher is gone and the ring is empty.
///
/// # Errors
/// The sink's I/O error.
pub fn run_dlq(
    step: DlqStep,
    input: spsc::Consumer<DlqEntry<'_, '_>>,
    counters: &EngineCounters,
) -> io::Result<()> {
    stage::drive(
        &mut DlqStage {
            step,
            input,
            counters,
        },
        256,
    )
}
