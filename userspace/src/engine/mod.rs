//! The engine: what happens to an event between ingest and its sink.
//!
//! - [`stage`]: the stage contract every loop follows (poll with a budget, flush after work,
//!   housekeeping on a schedule, done) and its one driver.
//! - [`idle`]: waiting without locks when a ring is full (back off) or empty (yield, then sleep).
//! - [`route`]: topic routes (exact, `*`, `>`/`#`) to a [`Target`].
//! - [`control`]: the pipeline state machine (watermarks, hysteresis, priority shedding).
//! - [`dedup`]: the transactional class's duplicate window.
//! - [`latency`]: the sender's payload stamp, HDR histograms, and latency by stage.
//! - [`worker`]: the three worker classes (realtime, transactional, batch) and the DLQ, as steps.
//! - [`inline`]: inline mode, the engine run to completion in each receive queue's thread.
//! - [`dispatcher`]: pipelined mode's router thread and its fan-out over SPSC rings to worker
//!   threads, for machines with cores to spare.
//!
//! Counting follows the ingest rule: per-thread locals flushed once per batch.

pub mod control;
pub mod dedup;
pub mod dispatcher;
pub mod idle;
pub mod inline;
pub mod latency;
pub mod route;
pub mod rules;
pub mod stage;
pub mod worker;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use crate::engine::control::PipelineState;
use crate::engine::dedup::KeyFrom;
use crate::engine::latency::LatencyHistogram;
use crate::mem::pool::Pooled;
use crate::wire::event::Event;

pub use dispatcher::{Bus, Dispatcher, DlqEntry};
pub use inline::Inline;
pub use worker::{BatchClock, ClassStep, Dedup, DlqStep, WorkerKind, run_dlq, run_worker};

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

/// Why an accepted event was not persisted (the `reason` of `eventstream_failed_events_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FailReason {
    /// Its sink refused it (failing, or full past its limits), or took it and lost it (a
    /// failed `fsync`).
    SinkError = 0,
    /// Still not durable when the shutdown deadline passed.
    Shutdown = 1,
}

impl FailReason {
    /// All reasons.
    pub const ALL: [FailReason; 2] = [Self::SinkError, Self::Shutdown];

    /// The label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SinkError => "sink_error",
            Self::Shutdown => "shutdown",
        }
    }
}

/// Engine totals, flushed once per batch by each thread.
#[derive(Debug, Default)]
pub struct EngineCounters {
    /// Events the dispatcher handed to a worker.
    pub dispatched: AtomicU64,
    /// Events the DLQ's sink made durable, by [`DlqReason`].
    pub dlq: [AtomicU64; 3],
    /// Accepted events that no sink persisted, by [`FailReason`].
    pub failed: [AtomicU64; 2],
    /// When sinks stop waiting for durability at shutdown (`CLOCK_MONOTONIC` ns; 0 until the
    /// stop begins).
    pub shutdown_deadline_ns: AtomicU64,
    /// Events delivered by each worker class's sink.
    pub delivered: [AtomicU64; 3],
    /// Duplicates dropped by the transactional workers.
    pub duplicates: AtomicU64,
    /// Dedup keys evicted before their window ended.
    pub dedup_evictions: AtomicU64,
    /// Batch flushes.
    pub batch_flushes: AtomicU64,
    /// Batch groups flushed early because a new topic needed the slot (`max_topics`).
    pub batch_evicted_groups: AtomicU64,
    /// Records a sink discarded by design (the memory sink's oldest, to make room).
    pub sink_evicted: AtomicU64,
    /// The pipeline state (`PipelineState as u8`).
    pub state: AtomicU8,
    /// Set while `PAUSED`: ingest threads stop receiving (checked once per batch).
    pub paused: AtomicBool,
    /// Transitions into each state.
    pub transitions: [AtomicU64; 5],
    /// Latency of realtime events (see [`crate::engine::latency`]), merged from each worker's own
    /// histogram every [`crate::engine::latency::MERGE_INTERVAL_NS`].
    pub latency: LatencyHistogram,
    /// Realtime events with `latency_from: payload` whose payload carried no stamp.
    pub unstamped: AtomicU64,
    /// Latency by stage, sampled once per batch (see [`crate::engine::latency::Stage`]).
    pub stages: crate::engine::latency::StageLatency,
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

    /// Publishes a state change from the control plane (logged and counted), if there was one.
    pub fn publish_transition(&self, t: Option<(PipelineState, PipelineState)>, depth: usize) {
        if let Some((from, to)) = t {
            tracing::info!(
                from = from.as_str(),
                to = to.as_str(),
                depth,
                "pipeline state"
            );
            self.state.store(to as u8, Ordering::Relaxed);
            self.paused
                .store(to == PipelineState::Paused, Ordering::Relaxed);
            self.transitions[to as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events sent to the DLQ for every reason.
    pub fn dlq_total(&self) -> u64 {
        self.dlq.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Events failed for every reason.
    pub fn failed_total(&self) -> u64 {
        self.failed.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Sets the shutdown deadline `timeout` from now.
    pub fn set_shutdown_deadline(&self, timeout: std::time::Duration) {
        let at = crate::wire::event::monotonic_ns() + timeout.as_nanos() as u64;
        self.shutdown_deadline_ns.store(at, Ordering::Relaxed);
    }

    /// The shutdown deadline as an [`std::time::Instant`] (10 s from now if none was set).
    pub fn shutdown_deadline(&self) -> std::time::Instant {
        let now = std::time::Instant::now();
        match self.shutdown_deadline_ns.load(Ordering::Relaxed) {
            0 => now + std::time::Duration::from_secs(10),
            at => {
                let left = at.saturating_sub(crate::wire::event::monotonic_ns());
                now + std::time::Duration::from_nanos(left)
            }
        }
    }
}
