//! Inline mode: the whole engine as a stage of the thread that owns a receive queue.
//!
//! [`Inline`] admits (the pipeline state is read once per batch), routes (the dispatcher's
//! table), and runs the worker classes' steps ([`ClassStep`]) and the DLQ's in the receive
//! thread, so an event's bytes stay in one core's cache from the RX ring to the sink, with no
//! ring, no pool slot and no cross-thread release per event. The control plane stays apart from
//! the per-event path: each data-plane thread publishes its input depth once per batch
//! ([`Inline::publish_depth`]); [`InlineControl`], run by the first data-plane thread on its
//! stage's housekeeping schedule (every [`CONTROL_EVERY`]), takes operator commands, runs the
//! watermarks over the deepest input and publishes the state in one atomic.
//!
//! Order per topic within a queue is kept (one thread, in arrival order). Dedup is exact across
//! queues: every queue's transactional step shares one lock-free window.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::control::{Command, ControlPlane, PipelineState, Shed, admit};
use super::rules::{LiveRules, RulesView};
use super::worker::{BatchClock, ClassStep, DlqStep};
use super::{DlqReason, EngineCounters, Target};
use crate::engine::latency::{BatchSampler, LocalLatency, Stage, realtime_ns};
use crate::wire::event::{Event, monotonic_ns};

/// Depth is published as a fraction of capacity in units of 1 / `DEPTH_ONE`.
pub const DEPTH_ONE: u32 = 1 << 16;

/// How often the inline control plane ticks.
pub const CONTROL_EVERY: Duration = Duration::from_millis(1);

/// The inline control plane: operator commands, then the watermarks over the deepest input
/// (any data-plane thread's receive ring, or the side queue), and the state published. The
/// first data-plane thread runs it on its housekeeping schedule, so no other thread wakes up
/// every millisecond for it.
#[derive(Debug)]
pub struct InlineControl<'s> {
    /// The state machine.
    pub plane: ControlPlane,
    /// Thresholds, as reloaded.
    pub rules: RulesView<'s>,
    /// Operator commands (pause, resume, drain).
    pub commands: crate::ring::mpsc::Consumer<Command>,
    /// Every data-plane thread's published input depth.
    pub depths: &'s [AtomicU32],
    /// Where transitions are published.
    pub counters: &'s EngineCounters,
}

impl InlineControl<'_> {
    /// One tick; `side` is the side queue's (used, capacity).
    pub fn tick(&mut self, side: (usize, usize)) {
        if self.rules.refresh() {
            self.plane.set_config(self.rules.get().control);
        }
        while let Some(cmd) = self.commands.pop() {
            let t = self.plane.command(cmd);
            self.counters.publish_transition(t, side.0);
        }
        let deepest = self
            .depths
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        let side_depth = (side.0 as u64 * u64::from(DEPTH_ONE)) / side.1.max(1) as u64;
        let depth = u64::from(deepest).max(side_depth) as usize;
        let t = self.plane.observe(depth, DEPTH_ONE as usize);
        self.counters.publish_transition(t, depth);
    }
}

/// One data-plane thread's engine.
#[derive(Debug)]
pub struct Inline<'s> {
    /// Routes and thresholds, refreshed once per batch (a reload takes effect there).
    rules: RulesView<'s>,
    /// One step per class, in `WorkerClass::ALL` order.
    steps: [ClassStep<'s>; 3],
    dlq: DlqStep,
    counters: &'s EngineCounters,
    /// This thread's input depth, for the control plane.
    depth: &'s AtomicU32,
    state: PipelineState,
    clock: BatchClock,
    wants_wall: bool,
    dispatched: u64,
    /// The last topic routed and where it went: traffic comes in runs of one topic, and a
    /// byte compare is cheaper than the route table's hash.
    last: RouteCache,
    /// Receive → routed, sampled on the first event of one batch in
    /// [`STAGE_SAMPLE_EVERY`](crate::engine::latency::STAGE_SAMPLE_EVERY).
    routed: LocalLatency,
    /// Whether to sample it (`engine.stage_latency`).
    sample: bool,
    /// Whether this batch's first event was seen.
    sampled: bool,
    /// Which batches with events are sampled.
    batches: BatchSampler,
}

/// Longest topic [`RouteCache`] remembers.
const CACHED_TOPIC: usize = 48;

/// Whether `t` (at most [`CACHED_TOPIC`] bytes) equals the start of `cached`: 8 bytes at a
/// time in registers, for short topics a call to `memcmp` costs more than the compare.
#[inline(always)]
fn same_short(cached: &[u8; CACHED_TOPIC], t: &[u8]) -> bool {
    let mut chunks = t.chunks_exact(8);
    let mut i = 0;
    for chunk in chunks.by_ref() {
        let a = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
        let b = u64::from_ne_bytes(cached[i..i + 8].try_into().expect("8 bytes"));
        if a != b {
            return false;
        }
        i += 8;
    }
    let rest = chunks.remainder();
    let mut diff = 0u8;
    for (k, &x) in rest.iter().enumerate() {
        diff |= x ^ cached[i + k];
    }
    diff == 0
}

/// One remembered route.
#[derive(Debug)]
struct RouteCache {
    len: usize,
    topic: [u8; CACHED_TOPIC],
    target: Option<Target>,
}

impl<'s> Inline<'s> {
    /// An engine over `steps` (realtime, transactional, batch) and `dlq`.
    pub fn new(
        rules: &'s LiveRules,
        steps: [ClassStep<'s>; 3],
        dlq: DlqStep,
        counters: &'s EngineCounters,
        depth: &'s AtomicU32,
    ) -> Self {
        let wants_wall = steps.iter().any(ClassStep::wants_wall);
        Self {
            rules: rules.view(),
            steps,
            dlq,
            counters,
            depth,
            state: PipelineState::Running,
            clock: BatchClock::default(),
            wants_wall,
            dispatched: 0,
            last: RouteCache {
                len: usize::MAX,
                topic: [0; CACHED_TOPIC],
                target: None,
            },
            routed: LocalLatency::default(),
            sample: true,
            sampled: false,
            batches: BatchSampler::default(),
        }
    }

    /// Turns the per-batch stage latency sample on (the default) or off
    /// (`engine.stage_latency`).
    #[must_use]
    pub fn stage_latency(mut self, on: bool) -> Self {
        self.sample = on;
        self
    }

    /// As [`Self::stage_latency`], in place (the engine bench flips it between measurements).
    pub fn set_stage_latency(&mut self, on: bool) {
        self.sample = on;
    }

    /// Where `topic` goes, from the one-entry cache or the route table.
    #[inline]
    fn route(&mut self, topic: &str) -> Option<Target> {
        let t = topic.as_bytes();
        let c = &mut self.last;
        if c.len == t.len() && same_short(&c.topic, t) {
            return c.target;
        }
        let target = self.rules.get().router.route(topic).copied();
        if t.len() <= CACHED_TOPIC {
            c.topic[..t.len()].copy_from_slice(t);
            c.len = t.len();
            c.target = target;
        }
        target
    }

    /// Starts a batch: reads the pipeline state, the rules and the clocks once.
    #[inline]
    pub fn begin(&mut self) {
        if self.rules.refresh() {
            // A route the cache remembers may be gone.
            self.last.len = usize::MAX;
        }
        self.state = self.counters.state();
        self.sampled = false;
        self.clock = BatchClock {
            mono: monotonic_ns(),
            wall: if self.wants_wall { realtime_ns() } else { 0 },
        };
    }

    /// Admits, routes and delivers one event (or turns it away to the DLQ with its reason).
    ///
    /// # Errors
    /// A sink's.
    #[inline]
    pub fn event(&mut self, ev: &mut Event<'_>) -> io::Result<()> {
        if !self.sampled {
            self.sampled = true;
            if self.batches.next_batch() && self.sample {
                self.routed
                    .record(monotonic_ns().saturating_sub(ev.ingest_ns));
            }
        }
        let routed = match admit(&self.rules.get().control, self.state, ev.priority()) {
            Err(Shed::Dropping) => Err(DlqReason::Dropping),
            Err(Shed::Emergency) => Err(DlqReason::Emergency),
            Ok(()) => self.route(ev.topic()).ok_or(DlqReason::NoRoute),
        };
        match routed {
            Ok(target) => {
                super::dedup::identify(ev, target);
                self.dispatched += 1;
                self.steps[target.class as usize].event(ev, self.clock);
            }
            Err(reason) => self.dlq.event(ev, reason),
        }
        Ok(())
    }

    /// Publishes this thread's input depth (`used` of `capacity`) for the control plane.
    #[inline]
    pub fn publish_depth(&self, used: usize, capacity: usize) {
        let f = (used as u64 * u64::from(DEPTH_ONE)) / capacity.max(1) as u64;
        self.depth
            .store(f.min(u64::from(DEPTH_ONE)) as u32, Ordering::Relaxed);
    }

    /// Ends a batch: flushes the sinks written to, writes due batch groups, and publishes the
    /// counts. `closing` writes every open group (shutdown).
    ///
    /// # Errors
    /// A sink's.
    pub fn end(&mut self, closing: bool) -> io::Result<()> {
        // Fresh, not the batch's: idle passes end no batch but must still close windows.
        let now = monotonic_ns();
        for step in &mut self.steps {
            step.end(now, closing, self.counters);
        }
        self.dlq.end(self.counters, closing);
        self.routed.merge_into(
            self.counters.stages.get(Stage::ReceiveToRouted),
            now,
            closing,
        );
        if self.dispatched != 0 {
            self.counters
                .dispatched
                .fetch_add(core::mem::take(&mut self.dispatched), Ordering::Relaxed);
        }
        Ok(())
    }
}
