//! The engine: one dispatcher thread and three classes of worker, joined by SPSC rings.
//!
//! The [`Dispatcher`] pops the ingest → dispatcher queue in batches, feeds its depth to the
//! [`ControlPlane`], sheds by priority in `DROPPING`/`EMERGENCY`, routes by topic, and pushes
//! each event into one worker's SPSC ring ([`Bus`]: round-robin across a class's workers, or by
//! topic hash where per-topic order or dedup needs it). Events it turns away go to the DLQ
//! worker with their reason. Workers ([`run_worker`]) deliver to a [`Sink`]:
//! - **realtime**: one event at a time, recording sender→worker latency;
//! - **transactional**: drops duplicates within the dedup window (counted, not delivered);
//! - **batch**: groups events per topic and flushes a group when it reaches `batch_max` events or
//!   `batch_window` age, as one sink write.
//!
//! Counting follows the ingest rule: per-thread locals flushed once per batch.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tracing::info;
use xxhash_rust::xxh3::xxh3_64;

use crate::control::{Command, ControlPlane, PipelineState};
use crate::dedup::{DedupWindow, KeyFrom, key};
use crate::event::{Event, monotonic_ns};
use crate::idle::{Idle, backoff};
use crate::latency::{LatencyFrom, LatencyHistogram, LocalLatency, read_stamp, realtime_ns};
use crate::pool::Pooled;
use crate::ring::{mpsc, spsc};
use crate::route::Router;

/// An event on its way through the engine.
pub type Ev<'p, 'a> = Pooled<'p, Event<'a>>;

/// The worker classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerClass {
    /// Lowest latency.
    Realtime,
    /// Exactly once within the dedup window.
    Transactional,
    /// Grouped per topic, written in batches.
    Batch,
}

impl WorkerClass {
    /// All classes, in index order.
    pub const ALL: [WorkerClass; 3] = [Self::Realtime, Self::Transactional, Self::Batch];

    /// The label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Realtime => "realtime",
            Self::Transactional => "transactional",
            Self::Batch => "batch",
        }
    }
}

/// Where a route sends its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    /// The worker class.
    pub class: WorkerClass,
    /// How the transactional worker identifies events.
    pub key: KeyFrom,
}

/// Why the engine turned an event away (the DLQ record's reason and the counter label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DlqReason {
    /// No route matched and there is no default.
    NoRoute = 0,
    /// Shed in `DROPPING`.
    Dropping = 1,
    /// Shed in `EMERGENCY`.
    Emergency = 2,
}

impl DlqReason {
    /// All reasons.
    pub const ALL: [DlqReason; 3] = [Self::NoRoute, Self::Dropping, Self::Emergency];

    /// The label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NoRoute => "no_route",
            Self::Dropping => "dropping",
            Self::Emergency => "emergency",
        }
    }
}

/// Engine totals, flushed once per batch by each thread.
#[derive(Debug, Default)]
pub struct EngineCounters {
    /// Events the dispatcher handed to a worker.
    pub dispatched: AtomicU64,
    /// Events sent to the DLQ, by [`DlqReason`].
    pub dlq: [AtomicU64; 3],
    /// Events delivered by each worker class's sink.
    pub delivered: [AtomicU64; 3],
    /// Duplicates dropped by the transactional workers.
    pub duplicates: AtomicU64,
    /// Dedup keys evicted before their window ended.
    pub dedup_evictions: AtomicU64,
    /// Batch flushes.
    pub batch_flushes: AtomicU64,
    /// The pipeline state (`PipelineState as u8`).
    pub state: AtomicU8,
    /// Set while `PAUSED`: ingest threads stop receiving (checked once per batch).
    pub paused: AtomicBool,
    /// Transitions into each state.
    pub transitions: [AtomicU64; 5],
    /// Latency of realtime events (see [`crate::latency`]), merged from each worker's own
    /// histogram every [`crate::latency::MERGE_INTERVAL_NS`].
    pub latency: LatencyHistogram,
    /// Realtime events with `latency_from: payload` whose payload carried no stamp.
    pub unstamped: AtomicU64,
}

impl EngineCounters {
    /// The current pipeline state.
    pub fn state(&self) -> PipelineState {
        PipelineState::from_u8(self.state.load(Ordering::Relaxed)).unwrap_or(PipelineState::Running)
    }

    /// Events delivered by all workers.
    pub fn delivered_total(&self) -> u64 {
        self.delivered
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Events sent to the DLQ for every reason.
    pub fn dlq_total(&self) -> u64 {
        self.dlq.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// One class's fan-out over its workers' rings (EventBusMulti).
#[derive(Debug)]
pub struct Bus<'p, 'a> {
    rings: Vec<spsc::Producer<Ev<'p, 'a>>>,
    by_topic: bool,
    next: usize,
}

impl<'p, 'a> Bus<'p, 'a> {
    /// A bus over `rings`; `by_topic` picks a ring by topic hash instead of round-robin.
    pub fn new(rings: Vec<spsc::Producer<Ev<'p, 'a>>>, by_topic: bool) -> Self {
        Self {
            rings,
            by_topic,
            next: 0,
        }
    }

    /// Pushes `ev` to its ring, handing it back when that ring is full.
    #[inline]
    fn push(&mut self, ev: Ev<'p, 'a>) -> Result<(), Ev<'p, 'a>> {
        let n = self.rings.len();
        let i = if self.by_topic {
            (xxh3_64(ev.topic().as_bytes()) % n as u64) as usize
        } else {
            self.next = (self.next + 1) % n;
            self.next
        };
        self.rings[i].push(ev)
    }
}

/// What a DLQ record carries.
pub type DlqEntry<'p, 'a> = (Ev<'p, 'a>, DlqReason);

/// The dispatcher thread's state.
#[derive(Debug)]
pub struct Dispatcher<'s, 'p, 'a> {
    /// The ingest → dispatcher queue.
    pub input: mpsc::Consumer<Ev<'p, 'a>>,
    /// Topic routes.
    pub router: Router<Target>,
    /// One bus per [`WorkerClass`], in `WorkerClass::ALL` order.
    pub buses: [Bus<'p, 'a>; 3],
    /// To the DLQ worker.
    pub dlq: spsc::Producer<DlqEntry<'p, 'a>>,
    /// The state machine.
    pub control: ControlPlane,
    /// Operator commands (pause, resume, drain), from the admin endpoint or a signal.
    pub commands: mpsc::Consumer<Command>,
    /// Set when every ingest thread has stopped.
    pub ingest_done: &'s AtomicBool,
    /// Totals.
    pub counters: &'s EngineCounters,
}

impl Dispatcher<'_, '_, '_> {
    fn transition(&self, t: Option<(PipelineState, PipelineState)>) {
        if let Some((from, to)) = t {
            info!(
                from = from.as_str(),
                to = to.as_str(),
                depth = self.input.len(),
                "pipeline state"
            );
            self.counters.state.store(to as u8, Ordering::Relaxed);
            self.counters
                .paused
                .store(to == PipelineState::Paused, Ordering::Relaxed);
            self.counters.transitions[to as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs until ingest is done and the input queue is empty; dropping `self` then closes the
    /// workers' rings, and they finish what is queued.
    pub fn run(mut self) {
        let mut spins = 0;
        let mut idle = Idle::new();
        let (mut dispatched, mut dlq) = (0u64, [0u64; 3]);
        loop {
            while let Some(cmd) = self.commands.pop() {
                let t = self.control.command(cmd);
                self.transition(t);
            }
            let t = self
                .control
                .observe(self.input.len(), self.input.capacity());
            self.transition(t);
            let mut n = 0;
            while n < 256 {
                let Some(ev) = self.input.pop() else { break };
                n += 1;
                let routed = match self.control.admit(ev.priority()) {
                    Err(shed) => Err(match shed {
                        crate::control::Shed::Dropping => DlqReason::Dropping,
                        crate::control::Shed::Emergency => DlqReason::Emergency,
                    }),
                    Ok(()) => self
                        .router
                        .route(ev.topic())
                        .copied()
                        .ok_or(DlqReason::NoRoute),
                };
                match routed {
                    Ok(target) => {
                        let mut ev = ev;
                        if target.class == WorkerClass::Transactional {
                            ev.key = key(target.key, ev.topic(), ev.payload());
                        }
                        while let Err(back) = self.buses[target.class as usize].push(ev) {
                            ev = back;
                            backoff(&mut spins);
                        }
                        dispatched += 1;
                    }
                    Err(reason) => {
                        let mut entry = (ev, reason);
                        while let Err(back) = self.dlq.push(entry) {
                            entry = back;
                            backoff(&mut spins);
                        }
                        dlq[reason as usize] += 1;
                    }
                }
            }
            if dispatched != 0 || dlq.iter().any(|&d| d != 0) {
                self.counters
                    .dispatched
                    .fetch_add(dispatched, Ordering::Relaxed);
                for (c, d) in self.counters.dlq.iter().zip(dlq) {
                    c.fetch_add(d, Ordering::Relaxed);
                }
                (dispatched, dlq) = (0, [0; 3]);
            }
            if n == 0 {
                if self.ingest_done.load(Ordering::Acquire) && self.input.is_empty() {
                    return;
                }
                idle.wait();
            } else {
                idle.busy();
            }
        }
    }
}

/// A stored copy of an event, as sinks keep it.
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

/// Where workers deliver.
pub trait Sink: Send {
    /// Writes a group of events (one topic for the batch worker; one event otherwise).
    ///
    /// # Errors
    /// The sink's I/O error.
    fn write(&mut self, events: &[Ev<'_, '_>], reason: Option<&'static str>) -> io::Result<()>;
    /// Makes what was written durable, per the sink's policy.
    ///
    /// # Errors
    /// The sink's I/O error.
    fn flush(&mut self) -> io::Result<()>;
}

/// A bounded in-memory sink for tests and inspection: keeps the newest `capacity` records.
#[derive(Debug, Clone)]
pub struct MemorySink {
    inner: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Record>>>,
    capacity: usize,
}

impl MemorySink {
    /// Keeps at most `capacity` records.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: std::sync::Arc::default(),
            capacity,
        }
    }

    /// A copy of what it holds, oldest first.
    pub fn records(&self) -> Vec<Record> {
        self.inner
            .lock()
            .map(|g| g.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl Sink for MemorySink {
    fn write(&mut self, events: &[Ev<'_, '_>], reason: Option<&'static str>) -> io::Result<()> {
        // One lock per write call (a batch), off the dispatcher's path; this sink is for tests.
        let mut g = self
            .inner
            .lock()
            .map_err(|_| io::Error::other("memory sink poisoned"))?;
        for ev in events {
            if g.len() == self.capacity {
                g.pop_front();
            }
            g.push_back(Record {
                seq: ev.seq,
                priority: ev.priority(),
                topic: ev.topic().to_owned(),
                payload: ev.payload().to_vec(),
                reason,
            });
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How a worker treats its events.
#[derive(Debug)]
pub enum WorkerKind {
    /// Deliver each event at once and record its latency.
    Realtime {
        /// Where the latency clock starts.
        from: LatencyFrom,
    },
    /// Drop duplicates within the window.
    Transactional {
        /// The window table.
        dedup: DedupWindow,
    },
    /// Group per topic; flush at `max` events or `window` age.
    Batch {
        /// Events per group before a flush.
        max: usize,
        /// Oldest event's age before a flush.
        window: Duration,
    },
}

/// Runs one worker until its ring is closed (the dispatcher is gone) and empty.
///
/// # Errors
/// The sink's I/O error (the worker stops; the caller logs it).
pub fn run_worker<'p, 'a>(
    class: WorkerClass,
    mut kind: WorkerKind,
    mut input: spsc::Consumer<Ev<'p, 'a>>,
    sink: &mut dyn Sink,
    counters: &EngineCounters,
) -> io::Result<()> {
    let mut pending: HashMap<Box<str>, (u64, Vec<Ev<'p, 'a>>)> = HashMap::new();
    let mut latency = LocalLatency::default();
    let mut idle = Idle::new();
    loop {
        let mut n = 0;
        let (mut delivered, mut dups) = (0u64, 0u64);
        let now = monotonic_ns();
        let wall = match kind {
            WorkerKind::Realtime {
                from: LatencyFrom::Payload,
            } => realtime_ns(),
            _ => 0,
        };
        for ev in input.pop_batch(256) {
            n += 1;
            match &mut kind {
                WorkerKind::Realtime { from } => {
                    match from {
                        LatencyFrom::Ingest => latency.record(now.saturating_sub(ev.ingest_ns)),
                        LatencyFrom::Payload => match read_stamp(ev.payload()) {
                            Some((_, sent)) => latency.record(wall.saturating_sub(sent)),
                            None => latency.unstamped += 1,
                        },
                    }
                    sink.write(core::slice::from_ref(&ev), None)?;
                    delivered += 1;
                }
                WorkerKind::Transactional { dedup } => {
                    if dedup.check_and_insert(ev.key, now) {
                        dups += 1;
                    } else {
                        sink.write(core::slice::from_ref(&ev), None)?;
                        delivered += 1;
                    }
                }
                WorkerKind::Batch { .. } => {
                    // The group key allocates once per topic (the map keeps it), not per event.
                    if !pending.contains_key(ev.topic()) {
                        pending.insert(ev.topic().into(), (now, Vec::new()));
                    }
                    let group = pending.get_mut(ev.topic()).expect("inserted above");
                    if group.1.is_empty() {
                        group.0 = now;
                    }
                    group.1.push(ev);
                }
            }
        }
        if let WorkerKind::Batch { max, window } = &kind {
            let closing = n == 0 && input.is_abandoned() && input.is_empty();
            for (_, (opened, group)) in pending.iter_mut() {
                let due =
                    group.len() >= *max || now.saturating_sub(*opened) >= window.as_nanos() as u64;
                if !group.is_empty() && (due || closing) {
                    sink.write(group, None)?;
                    delivered += group.len() as u64;
                    group.clear();
                    counters.batch_flushes.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if delivered != 0 || dups != 0 {
            sink.flush()?;
            counters.delivered[class as usize].fetch_add(delivered, Ordering::Relaxed);
            counters.duplicates.fetch_add(dups, Ordering::Relaxed);
        }
        if let WorkerKind::Realtime { .. } = kind {
            let closing = n == 0 && input.is_abandoned() && input.is_empty();
            latency.merge_into(&counters.latency, now, closing);
            if latency.unstamped != 0 {
                counters
                    .unstamped
                    .fetch_add(core::mem::take(&mut latency.unstamped), Ordering::Relaxed);
            }
        }
        if let WorkerKind::Transactional { dedup, .. } = &kind {
            counters
                .dedup_evictions
                .store(dedup.evictions(), Ordering::Relaxed);
        }
        if n == 0 {
            let drained = pending.values().all(|(_, g)| g.is_empty());
            if input.is_abandoned() && input.is_empty() && drained {
                return Ok(());
            }
            idle.wait();
        } else {
            idle.busy();
        }
    }
}

/// Runs the DLQ worker: writes each turned-away event with its reason, until the dispatcher
/// is gone and the ring is empty.
///
/// # Errors
/// The sink's I/O error.
pub fn run_dlq(mut input: spsc::Consumer<DlqEntry<'_, '_>>, sink: &mut dyn Sink) -> io::Result<()> {
    let mut idle = Idle::new();
    loop {
        let mut n = 0;
        for (ev, reason) in input.pop_batch(256) {
            sink.write(core::slice::from_ref(&ev), Some(reason.as_str()))?;
            n += 1;
        }
        if n > 0 {
            sink.flush()?;
            idle.busy();
        } else if input.is_abandoned() && input.is_empty() {
            return Ok(());
        } else {
            idle.wait();
        }
    }
}
